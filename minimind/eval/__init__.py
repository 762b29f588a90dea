"""Evaluation: multiple-choice accuracy (C-Eval/CMMLU CSV), perplexity and bits per byte, and
lm-evaluation-harness tasks, all on a checkpoint directory (SPEC §2 `minimind eval`).

`load_for_eval` is what the three share: the model in eval mode on the chosen device, plus its
tokenizer loaded with the `tokenizers` library (fast, and no transformers import for choice/ppl).
"""

import json
import math
import os
from pathlib import Path

import torch

from minimind.checkpoint import checkpoint_inputs, load_checkpoint
from minimind.faults import writing
from minimind.outputs import check_output


class EvalDataError(ValueError):
    """Evaluation data that cannot be used; the message names the file, line or column."""


def pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_for_eval(ckpt, device: str = "auto", dtype: str | None = None, allow_nonfinite: bool = False):
    """-> (model, tokenizers.Tokenizer, tokenizer_config dict) for checkpoint or run dir `ckpt`. A damaged
    tokenizer file is a CheckpointError naming it; so are non-finite weights unless `allow_nonfinite`."""
    from minimind.checkpoint import CheckpointError, read_json, resolve_checkpoint, tokenizer_dir
    from minimind.data.tokenizer import TokenizerError, read_tokenizer

    device = pick_device(device)
    torch_dtype = getattr(torch, dtype) if dtype else None
    model, _ = load_checkpoint(ckpt, device=device, dtype=torch_dtype, allow_nonfinite=allow_nonfinite)
    tok_dir = tokenizer_dir(resolve_checkpoint(ckpt))
    if tok_dir is None:
        raise CheckpointError(f"{ckpt}: the checkpoint has no tokenizer.json; evaluation needs its tokenizer")
    tok_config_file = tok_dir / "tokenizer_config.json"
    tok_config = read_json(tok_config_file) if tok_config_file.is_file() else {}
    try:
        return model, read_tokenizer(tok_dir), tok_config
    except TokenizerError as e:
        raise CheckpointError(str(e)) from None


def json_lines(lines: list[str], where, error: type[Exception] = EvalDataError):
    """(line number, parsed value) of each non-blank line of a jsonl file; a line that is not JSON raises
    `error` naming `where`:LINE and the column."""
    for number, text in enumerate(lines, 1):
        if not text.strip():
            continue
        try:
            yield number, json.loads(text)
        except json.JSONDecodeError as e:
            raise error(f"{where}:{number}: not valid JSON (column {e.colno}: {e.msg})") from None


def check_data_file(file: Path) -> Path:
    """--data must be a readable file (an existing directory gives IsADirectoryError deep in the reader)."""
    file = Path(file)
    if file.is_dir():
        raise EvalDataError(f"--data {file}: is a directory; expected a file")
    return file


def check_report_path(path: Path | None) -> None:
    """--report must name a file (checked before the evaluation runs, not after)."""
    if path is not None and Path(path).is_dir():
        raise EvalDataError(f"--report {path}: is a directory; expected a file name "
                            f"(e.g. {Path(path) / 'report.json'})")


def finite_or_none(value):
    """JSON has no NaN or inf: a non-finite float in a report becomes null (Python's json would write a bare
    `NaN`, which JSON parsers refuse)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite_or_none(v) for v in value]
    return value


def special_token(tok_config: dict, role: str) -> str | None:
    token = tok_config.get(f"{role}_token")
    return token.get("content") if isinstance(token, dict) else token


def check_report(args, inputs: list[tuple[str, Path | None]]) -> None:
    """Before any work: `--report` must not be or sit inside the checkpoint (its base, its tokenizer) or
    another input (`inputs`), and replaces an existing file only with `--force`. Raises OutputError, or
    CheckpointError for a --ckpt that cannot be resolved."""
    if args.report is not None:
        check_output(args.report, flag="--report", inputs=[*checkpoint_inputs(args.ckpt, "--ckpt"), *inputs],
                     force=args.force)


def write_report(report: dict, path: Path | None) -> None:
    text = json.dumps(finite_or_none(report), indent=2, ensure_ascii=False, allow_nan=False)
    print(text)
    if path is not None:
        _write_whole(Path(path), text + "\n")


def _write_whole(path: Path, text: str) -> None:
    """Writes through a temp file renamed into place: a full disk leaves no half report (and no temp)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with writing("the report", path, need=len(text.encode())):
            tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
