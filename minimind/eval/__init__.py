"""Evaluation: multiple-choice accuracy (C-Eval/CMMLU CSV), perplexity and bits per byte, and
lm-evaluation-harness tasks, all on a checkpoint directory (SPEC §2 `minimind eval`).

`load_for_eval` is what the three share: the model in eval mode on the chosen device, plus its
tokenizer loaded with the `tokenizers` library (fast, and no transformers import for choice/ppl).
"""

import json
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


def load_for_eval(ckpt, device: str = "auto", dtype: str | None = None):
    """-> (model, tokenizers.Tokenizer, tokenizer_config dict) for checkpoint or run dir `ckpt`."""
    from tokenizers import Tokenizer

    from minimind.checkpoint import CheckpointError, resolve_checkpoint, tokenizer_dir

    device = pick_device(device)
    torch_dtype = getattr(torch, dtype) if dtype else None
    model, _ = load_checkpoint(ckpt, device=device, dtype=torch_dtype)
    tok_dir = tokenizer_dir(resolve_checkpoint(ckpt))
    if tok_dir is None:
        raise CheckpointError(f"{ckpt}: the checkpoint has no tokenizer.json; evaluation needs its tokenizer")
    tok_config_file = tok_dir / "tokenizer_config.json"
    tok_config = json.loads(tok_config_file.read_text()) if tok_config_file.is_file() else {}
    return model, Tokenizer.from_file(str(tok_dir / "tokenizer.json")), tok_config


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
    text = json.dumps(report, indent=2, ensure_ascii=False)
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
