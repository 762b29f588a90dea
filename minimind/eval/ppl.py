"""`minimind eval ppl`: perplexity and bits per byte on held-out text.

`--data` is a jsonl file of `{"text": ...}` lines (MiniMind's pretrain format) or any other file,
read as one UTF-8 document. Each document is tokenized as the pretrain stage sees it, the
tokenizer's bos token first, so its first text token is predicted too; its text tokens are the
targets. Long documents are cut into windows of `--seq-len` targets that do not overlap (a window
does not see the one before it). Perplexity = exp(mean NLL per token); bits per byte = total NLL
/ ln 2 / UTF-8 bytes of the text, comparable across tokenizers.
"""

import math
import sys

import torch
import torch.nn.functional as F
from tqdm import tqdm

from minimind.checkpoint import CheckpointError
from minimind.eval import (
    EvalDataError,
    check_data_file,
    check_report,
    check_report_path,
    json_lines,
    load_for_eval,
    special_token,
    write_report,
)
from minimind.outputs import OutputError


def run(args) -> int:
    try:
        check_report_path(args.report)
        check_report(args, [("--data", args.data)])
        docs = read_documents(args.data)
        model, tokenizer, tok_config = load_for_eval(args.ckpt, device=args.device, dtype=args.dtype,
                                                     allow_nonfinite=args.allow_nonfinite)
        seq_len = min(args.seq_len, model.config.max_position_embeddings)
        report = perplexity(model, tokenizer, docs, bos=special_token(tok_config, "bos"), seq_len=seq_len,
                            batch_size=args.batch_size)
    except (EvalDataError, CheckpointError, OutputError) as e:
        print(f"minimind eval ppl: {e}", file=sys.stderr)
        return 2
    report.update(ckpt=str(args.ckpt), data=str(args.data))
    write_report(report, args.report)
    return 0


def read_documents(file) -> list[str]:
    file = check_data_file(file)
    try:
        raw = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise EvalDataError(f"{file}: not UTF-8 text ({e})") from None
    except OSError as e:
        raise EvalDataError(f"{file}: unreadable ({e.strerror or e})") from None
    if file.suffix != ".jsonl":
        if not raw.strip():
            raise EvalDataError(f"{file}: empty file")
        return [raw]
    docs = []
    for line, obj in json_lines(raw.splitlines(), file):
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise EvalDataError(f"{file}:{line}: expected an object with a string field 'text'")
        docs.append(obj["text"])
    if not docs:
        raise EvalDataError(f"{file}: no documents (empty file)")
    return docs


def windows(tokens: list[int], n_context: int, seq_len: int) -> list[tuple[list[int], list[int]]]:
    """(inputs, targets) pairs covering tokens[n_context:] as targets exactly once."""
    out = []
    for start in range(n_context, len(tokens), seq_len):
        targets = tokens[start : start + seq_len]
        inputs = tokens[start - 1 : start - 1 + len(targets)]
        out.append((inputs, targets))
    return out


def perplexity(model, tokenizer, docs: list[str], bos: str | None, seq_len: int, batch_size: int) -> dict:
    bos_id = tokenizer.token_to_id(bos) if bos is not None else None
    pieces, n_bytes = [], 0
    for text in docs:
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        if bos_id is not None:
            ids = [bos_id] + ids
        pieces += windows(ids, 1, seq_len)
        # without a bos the first token has no context and is not a target; neither are its bytes
        n_bytes += len(text.encode("utf-8")) if bos_id is not None else len(tokenizer.decode(ids[1:]).encode())
    if not pieces:
        raise EvalDataError("no tokens to score (every document is empty)")
    nll, n_tokens = _total_nll(model, pieces, batch_size)
    return {"documents": len(docs), "tokens": n_tokens, "bytes": n_bytes, "nll_per_token": nll / n_tokens,
            "perplexity": _exp(nll / n_tokens), "bits_per_byte": nll / math.log(2) / max(n_bytes, 1),
            "seq_len": seq_len}


def _exp(x: float) -> float:
    """exp that gives inf (written as null) instead of raising OverflowError past e**709."""
    return math.exp(x) if x < 709 else math.inf


@torch.no_grad()
def _total_nll(model, pieces, batch_size: int) -> tuple[float, int]:
    device = next(model.parameters()).device
    pieces = sorted(pieces, key=lambda p: -len(p[0]))
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    for start in tqdm(range(0, len(pieces), batch_size), desc="eval ppl", unit="batch", leave=False):
        batch = pieces[start : start + batch_size]
        t = len(batch[0][0])
        ids = torch.zeros(len(batch), t, dtype=torch.long, device=device)
        targets = torch.full((len(batch), t), -100, dtype=torch.long, device=device)
        for r, (inp, tgt) in enumerate(batch):
            ids[r, : len(inp)] = torch.tensor(inp, device=device)
            targets[r, : len(tgt)] = torch.tensor(tgt, device=device)
        logits = model(ids).logits  # (B, T, V); right padding is invisible to earlier tokens
        # NLL summed in fp32 per batch, accumulated in fp64 across batches
        nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
        total += nll.double()
        count += sum(len(tgt) for _, tgt in batch)
    return total.item(), count
