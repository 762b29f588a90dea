"""A run directory read back for the report card: its config (run.json), its logged rows (metrics.jsonl),
what it cost (summary.json, written by runs since the report existed) and its newest checkpoint.

Older runs have no summary.json and rows without `elapsed_s` / `tokens`: their wall-clock and tokens are
then rebuilt from each row's tokens/s and the run's tokens per step, and the card says so ("estimated").
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

from minimind.checkpoint import CheckpointError, resolve_checkpoint
from minimind.eval import json_lines

CHAT_STAGES = ("sft", "lora", "dpo", "distill", "reason", "grpo")


class ReportError(ValueError):
    """Input the report cannot use; the message names the directory, file or line."""


@dataclass
class Run:
    path: Path
    config: dict  # run.json
    rows: list[dict]  # metrics.jsonl, with elapsed_s and tokens filled in where the run did not log them
    summary: dict | None  # summary.json
    checkpoint: Path
    estimated_clock: bool = False  # elapsed_s / tokens were rebuilt from tokens/s (older runs)
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def stage(self) -> str:
        return self.config.get("stage", "?")

    @property
    def is_chat(self) -> bool:
        return self.stage in CHAT_STAGES

    @property
    def elapsed_s(self) -> float | None:
        if self.summary and self.summary.get("elapsed_s") is not None:
            return self.summary["elapsed_s"]
        return self.rows[-1].get("elapsed_s") if self.rows else None

    @property
    def tokens_seen(self) -> int | None:
        if self.summary and self.summary.get("tokens_seen") is not None:
            return self.summary["tokens_seen"]
        return self.rows[-1].get("tokens") if self.rows else None

    @property
    def data_file(self) -> Path | None:
        """The run's training data as a file on disk: a raw jsonl as given, a prepared directory's source."""
        path = Path(self.config["data"]) if self.config.get("data") else None
        if path is not None and path.is_dir():
            source = (_read_json_or_none(path / "meta.json") or {}).get("source")
            path = Path(source) if isinstance(source, str) else None
        return path if path is not None and path.is_file() else None


def read_run(path) -> Run:
    """The run in directory `path`; ReportError says why it is not one (no run.json, no metrics, no checkpoint)."""
    path = Path(path)
    if not path.is_dir():
        raise ReportError(f"{path}: not a directory (a run directory holds run.json, metrics.jsonl and step-N/)")
    config = _read_json(path / "run.json", missing=f"{path}: not a run directory (no run.json); give the --out "
                                                    "directory of a train.py run")
    rows = read_rows(path / "metrics.jsonl")
    if not rows:
        raise ReportError(f"{path}: the run has no metrics (metrics.jsonl is missing or empty): it logged no step")
    try:
        checkpoint = resolve_checkpoint(path)
    except CheckpointError:
        raise ReportError(f"{path}: the run has no complete step-N checkpoint to evaluate") from None
    summary = _read_json(path / "summary.json") if (path / "summary.json").is_file() else None
    run = Run(path=path, config=config, rows=rows, summary=summary, checkpoint=checkpoint)
    run.estimated_clock = fill_clock(rows, tokens_per_step=_tokens_per_step(config, summary))
    if summary is None:
        run.notes.append("no summary.json (a run from before the report card): costs from metrics.jsonl only")
    return run


def read_rows(file: Path) -> list[dict]:
    if not file.is_file():
        return []
    rows = []
    for line, row in json_lines(file.read_text(encoding="utf-8").splitlines(), file, ReportError):
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise ReportError(f"{file}:{line}: expected an object with an integer 'step'")
        rows.append(row)
    return rows


def fill_clock(rows: list[dict], tokens_per_step: int) -> bool:
    """Fills each row's `tokens` and `elapsed_s` where the run did not log them: tokens = step x tokens per
    step, time = the sum over rows of (tokens since the last row) / tokens_per_s. -> whether any was filled."""
    filled, last_tokens, clock = False, 0, 0.0
    for row in rows:
        if "tokens" not in row:
            row["tokens"], filled = row["step"] * tokens_per_step, True
        if "elapsed_s" not in row:
            rate = row.get("tokens_per_s") or 0
            clock += (row["tokens"] - last_tokens) / rate if rate > 0 else 0.0
            row["elapsed_s"], filled = round(clock, 3), True
        else:
            clock = row["elapsed_s"]
        last_tokens = row["tokens"]
    return filled


def _tokens_per_step(config: dict, summary: dict | None) -> int:
    world = (summary or {}).get("world_size") or 1
    return int(config.get("batch_size") or 0) * int(config.get("seq_len") or 0) * int(
        config.get("grad_accum") or 1) * int(world)


def _read_json(file: Path, missing: str | None = None) -> dict:
    if not file.is_file():
        raise ReportError(missing or f"{file}: missing")
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ReportError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ReportError(f"{file}: expected a JSON object")
    return value


def _read_json_or_none(file: Path) -> dict | None:
    try:
        return _read_json(file)
    except ReportError:
        return None
