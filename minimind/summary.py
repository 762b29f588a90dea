"""A run's summary.json: what the run cost (its wall-clock split by where it went, tokens, throughput,
MFU) and what it ran on (model, device, dtype, optimizer, code, data), in one small file beside
metrics.jsonl, so a report can show a run without reading its checkpoints or its log. The Trainer
writes it at every checkpoint save (`finished` false) and once more when training has ended.

The wall-clock is --max-time's (schedule.Stopwatch). `Spent` counts the parts that are not training;
training is what they leave of the elapsed time, so the parts add up to the elapsed time exactly and
time nobody measured (the loop's own bookkeeping, logging) counts as training. "compile" is the whole
first step of a --compile run (and of each --resume of one): its compute is small beside compilation,
and a later step to subtract is not there yet when the first ends; recompilations later in the run
(another shape) count as training.
"""

import contextlib
import json
import os
import platform
import subprocess
from pathlib import Path

import torch

from minimind import schedule
from minimind.faults import writing

FORMAT = 1
SUMMARY_FILE = "summary.json"
COUNTED = ("model and data", "data preparation", "dtype timing", "compile", "checkpoints", "evaluation")
PARTS = (*COUNTED, "training")
STARTUP = COUNTED[:3]  # the parts spent before the first step


class Spent:
    """Seconds of the run's wall-clock by part (COUNTED): what this process spent (`here`) on top of what a
    resumed run had spent before it (`before`, from trainer_state/state.json), as the Stopwatch keeps
    its `before`. A checkpoint's state.json cannot hold the time of its own writing, as its elapsed_s
    cannot: both stop where the state was taken."""

    def __init__(self):
        self.here = dict.fromkeys(COUNTED, 0.0)
        self.before = dict.fromkeys(COUNTED, 0.0)

    def add(self, part: str, seconds: float) -> None:
        self.here[part] += max(0.0, seconds)

    @contextlib.contextmanager
    def timing(self, part: str):
        """Adds the block's time to `part`, on the run's clock (schedule.clock, which tests swap)."""
        began = schedule.clock()
        try:
            yield
        finally:
            self.add(part, schedule.clock() - began)

    def started(self, seconds: float) -> None:
        """The run's start-up took `seconds`: what data preparation and dtype timing leave of it went into
        building the run (model, tokenizer, data, optimizer, a resumed checkpoint's state)."""
        self.add("model and data", seconds - self.here["data preparation"] - self.here["dtype timing"])

    def startup(self) -> dict[str, float]:
        """This process's start-up by part, for its log line: model and data, and the others it spent time on."""
        return {k: self.here[k] for k in STARTUP if k == STARTUP[0] or self.here[k]}

    def split(self, elapsed: float) -> dict[str, float]:
        """The run's `elapsed` seconds by part (PARTS), rounded to the millisecond; training is the rest,
        never negative."""
        counted = {k: self.before[k] + self.here[k] for k in COUNTED}
        counted["training"] = max(0.0, elapsed - sum(counted.values()))
        return {k: round(v, 3) for k, v in counted.items()}

    def load_state_dict(self, saved: dict) -> None:
        """What an earlier run spent (state.json's spent_s; absent in older checkpoints: zeros). Its
        training is not read: it is what the elapsed time leaves."""
        self.before = {k: float(saved.get(k, 0.0)) for k in COUNTED}


def about(cfg, *, model, meta: dict, fingerprint: str, device: torch.device, world_size: int,
          dtype: torch.dtype) -> dict:
    """What a run is, fixed at its start: model size, device, precision, optimizer, code and data (`meta`:
    the prepared training data's meta.json)."""
    return {
        "stage": cfg.stage,
        "model": {"params_total": model.num_params(), "params_active": model.num_params(active=True),
                  "preset": cfg.model},
        "device": device.type,
        "device_name": device_name(device),
        "world_size": world_size,
        "dtype": str(dtype).removeprefix("torch."),
        "optim": cfg.optim,
        "code": code_version(Path(__file__).resolve().parent),
        "data": {"path": str(cfg.data), "source": meta.get("source"), "documents": meta.get("num_docs"),
                 "tokens": meta.get("num_tokens"), "fingerprint": fingerprint},
    }


def record(about: dict, *, finished: bool, steps: int, tokens_seen: int, elapsed: float, spent: dict,
           mfu) -> dict:
    """summary.json's contents. tokens_per_s is over the training part alone (not start-up, compilation,
    checkpoints or evaluation); MFU is `mfu` of it (Metrics.mfu: None where no peak is known, as on a
    CPU), which, MFU being proportional to throughput, is the per-step MFU's mean weighted by time."""
    tokens_per_s = tokens_seen / spent["training"] if spent["training"] > 0 else None
    head = {"format": FORMAT, "stage": about["stage"], "finished": finished}
    return {**head, **{k: v for k, v in about.items() if k != "stage"},
            "steps": steps, "tokens_seen": tokens_seen, "elapsed_s": round(elapsed, 3),
            "tokens_per_s": None if tokens_per_s is None else round(tokens_per_s, 3),
            "mfu": None if tokens_per_s is None else mfu(tokens_per_s), "spent_s": spent}


def write(out: Path, summary: dict) -> None:
    """DIR/summary.json, replaced whole (a temp file renamed over it): a reader never sees half of one."""
    text = json.dumps(summary, indent=2) + "\n"
    file, tmp = Path(out) / SUMMARY_FILE, Path(out) / f".{SUMMARY_FILE}.tmp"
    try:
        with writing(SUMMARY_FILE, file, need=len(text.encode())):
            tmp.write_text(text)
            os.replace(tmp, file)
    finally:
        tmp.unlink(missing_ok=True)  # what a full disk left of it


def device_name(device: torch.device) -> str:
    """The GPU's name; on a CPU, /proc/cpuinfo's model name (Linux), else the platform's word for it."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def code_version(package_dir: Path) -> dict:
    """The commit of the git checkout that holds `package_dir`, and whether the checkout has changes
    (`git status --porcelain` says anything, untracked files included); both None where that is not a
    checkout, git is missing or slow (5 s each), or the package only sits inside another repository's
    tree without being tracked there (an install into a project's ignored venv is not that project's code)."""
    def git(*args) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(package_dir), *args], capture_output=True, text=True,
                                  timeout=5)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None or git("ls-files", "--error-unmatch", "__init__.py") is None:
        return {"commit": None, "dirty": None}
    status = git("status", "--porcelain")
    return {"commit": commit.strip(), "dirty": None if status is None else bool(status.strip())}

