"""`minimind prepare`: jsonl -> memory-mapped tokens, document index, loss weights and meta.json (SPEC §4).

The main process streams the input in ~1 MB blocks of whole lines (never the whole file) to worker
processes, at most two blocks per worker in flight, and appends their results in input order to files
in a temporary directory that is renamed into place only when complete, with meta.json written last:
nothing half-written looks like prepared data. Workers validate each line (SPEC §3), render chats
with the tokenizer's own chat template, tokenize, and mark loss weights by character spans of the
rendered text: assistant content plus its closing <|im_end|> (DPO: only the final response), the
reason stage's <think>/<answer> tags at `tag_weight` (every token a tag overlaps, when the tokenizer
splits it). Layout of a prepared directory:
  tokens.bin    all documents back to back, uint16 while the vocabulary fits, else uint32
  offsets.bin   int64 (num_docs + 1,), document d is tokens[offsets[d]:offsets[d + 1]]
  weights.bin   uint8 per token, an index into meta["weight_values"] (chat stages)
  prompt_lens.bin  int32 per document, tokens before the final response (dpo: doc 2i chosen, 2i+1 rejected)
  answers.jsonl one JSON value per prompt, the checkable answer or null (grpo)
  meta.json     stage, tokenizer fingerprint, counts, file sizes, format version
"""

import itertools
import json
import multiprocessing
import os
import shutil
import sys
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from functools import lru_cache
from pathlib import Path

import numpy as np

from minimind.data.tokenizer import IM_END, IM_START, PAD, TAGS, ChatRenderer, tokenizer_fingerprint

FORMAT_VERSION = 1
STAGES = ("pretrain", "sft", "lora", "dpo", "distill", "reason", "grpo")
CHAT_STAGES = ("sft", "lora", "distill", "reason")
ROLES = ("system", "user", "assistant")
BLOCK_BYTES = 1 << 20
COUNTS = ("lines", "skipped_bad", "skipped_no_assistant", "truncated", "skipped_too_long")
ASSISTANT_HEADER = IM_START + "assistant\n"


class PrepareError(ValueError):
    """Bad input or output: the message is "FILE:LINE: reason" (or "FILE: reason")."""


class _Bad(Exception):
    """One bad line (the reason, without file and line)."""


@lru_cache(maxsize=1)
def _encoder(stage: str, tokenizer: str, max_seq_len: int, tag_weight: float) -> "_Encoder":
    # one per worker process, built on its first block (tokenizer loading is the expensive part)
    return _Encoder(stage, Path(tokenizer), max_seq_len, tag_weight)


class _Encoder:
    def __init__(self, stage: str, tokenizer: Path, max_seq_len: int, tag_weight: float):
        from tokenizers import Tokenizer

        self.stage, self.max_seq_len, self.tag_weight = stage, max_seq_len, tag_weight
        self.tok = Tokenizer.from_file(str(tokenizer / "tokenizer.json"))
        self.render = ChatRenderer(tokenizer) if stage != "pretrain" else None
        self.eos = self.tok.token_to_id(PAD)
        self.im_end = self.tok.token_to_id(IM_END)
        self.dtype = np.uint16 if self.tok.get_vocab_size() <= 1 << 16 else np.uint32

    def parse(self, raw: bytes) -> dict:
        """A line's JSON object, or raises _Bad."""
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _Bad(f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1})") from None
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise _Bad(f"invalid JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(obj, dict):
            raise _Bad(f"expected a JSON object, got {type(obj).__name__}")
        return obj

    def texts(self, obj: dict) -> list[str]:
        """The texts to tokenize for one line: 1, or 2 for a dpo pair (chosen, rejected). Raises _Bad."""
        if self.stage == "pretrain":
            text = obj.get("text")
            if not isinstance(text, str):
                raise _Bad('missing field "text"' if text is None else '"text" must be a string')
            if not text.strip():
                raise _Bad('empty "text"')
            return [text]
        if self.stage == "dpo":
            chosen, rejected = _messages(obj, "chosen"), _messages(obj, "rejected")
            if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
                raise _Bad('"chosen" and "rejected" must end with an assistant turn')
            if chosen[:-1] != rejected[:-1]:
                raise _Bad('"chosen" and "rejected" must share the prompt (all turns but the last)')
            return [self.render(chosen), self.render(rejected)]
        msgs = _messages(obj, "conversations")
        if self.stage == "grpo":
            return [self.render(_prompt_turns(msgs), add_generation_prompt=True)]
        return [self.render(msgs)]

    def weights(self, text: str, encoding) -> bytearray:
        """Weight codes (0, 1, 2 = tag), one byte per token, from assistant character spans of the rendered text.

        A span's tokens run from the first token starting inside it to the token holding its last
        character (the closing <|im_end|>); char_to_token keeps this to a few calls per span.
        """
        spans = _assistant_spans(text)
        if self.stage == "dpo":
            spans = spans[-1:]
        codes = bytearray(len(encoding))  # bytes, not numpy: a few slices per chat, numpy's call overhead dominates
        for a, b in spans:
            first, last = _token_range(encoding, a, b)
            codes[first:last] = b"\x01" * (last - first)
            if self.stage == "reason":
                for ta, tb in _tag_spans(text, a, b):
                    t0, t1 = max(encoding.char_to_token(ta), first), encoding.char_to_token(tb - 1) + 1
                    codes[t0:t1] = b"\x02" * (t1 - t0)  # every token a tag overlaps, when it is split
        return codes


def _token_range(encoding, a: int, b: int) -> tuple[int, int]:
    first = encoding.char_to_token(a)
    if encoding.token_to_chars(first)[0] < a:  # merged with the header's newline: it belongs to the header
        first += 1
    return first, encoding.char_to_token(b - 1) + 1


def _messages(obj: dict, field: str) -> list[dict]:
    msgs = obj.get(field)
    if msgs is None:
        raise _Bad(f'missing field "{field}"')
    if not isinstance(msgs, list) or not msgs:
        raise _Bad(f'"{field}" must be a non-empty list of messages')
    for i, m in enumerate(msgs):
        where = f"{field}[{i}]"
        if not isinstance(m, dict):
            raise _Bad(f'{where}: expected an object with "role" and "content"')
        if m.get("role") not in ROLES:
            raise _Bad(f"{where}.role: {m.get('role')!r} is not one of {', '.join(ROLES)}")
        content, reasoning = m.get("content"), m.get("reasoning_content")
        if not isinstance(content, str):
            raise _Bad(f'{where}: missing field "content"' if content is None else f"{where}.content must be a string")
        if reasoning is not None and not isinstance(reasoning, str):
            raise _Bad(f"{where}.reasoning_content must be a string")
        if not content.strip() and not (reasoning or "").strip():
            raise _Bad(f"{where}.content is empty")
    return msgs


def _prompt_turns(msgs: list[dict]) -> list[dict]:
    """An rlaif prompt: the chat without its trailing reference assistant turn; must end with a user turn."""
    if msgs[-1]["role"] == "assistant":
        msgs = msgs[:-1]
    if not msgs or msgs[-1]["role"] != "user":
        raise _Bad('"conversations" must end with a user turn (optionally followed by a reference answer)')
    return msgs


def _answer(obj: dict):
    answer = obj.get("answer")
    if answer is None and obj["conversations"][-1]["role"] == "assistant":
        answer = obj["conversations"][-1]["content"]
    if answer is not None and not isinstance(answer, (str, int, float)):
        raise _Bad('"answer" must be a string or a number')
    return None if answer is None else str(answer)


def _assistant_spans(text: str) -> list[tuple[int, int]]:
    """Character spans [a, b) of each assistant turn's content through its closing <|im_end|> (ChatML)."""
    spans, pos = [], 0
    while (i := text.find(ASSISTANT_HEADER, pos)) >= 0:
        a = i + len(ASSISTANT_HEADER)
        j = text.find(IM_END, a)
        b = len(text) if j < 0 else j + len(IM_END)
        spans.append((a, b))
        pos = b
    return spans


def _tag_spans(text: str, a: int, b: int):
    for tag in TAGS:
        pos = a
        while (i := text.find(tag, pos, b)) >= 0:
            yield i, i + len(tag)
            pos = i + len(tag)


def _cut(codes: bytearray, ids: list[int], im_end: int, max_len: int) -> int:
    """Where to truncate a chat longer than max_len: after the last assistant turn that fits, else max_len."""
    ends = [k + 1 for k in range(min(len(ids), max_len)) if ids[k] == im_end and codes[k] > 0]
    return ends[-1] if ends else max_len


def encode_block(args) -> dict:
    """Worker: one block of lines -> arrays and counts. args = (settings, block bytes, first line number)."""
    settings, block, first_line = args
    enc = _encoder(*settings["encoder"])
    lines = block.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    out = _Block()
    pieces, owners = [], []  # texts to tokenize; per good line, (how many of them, its grpo answer)
    for k, raw in enumerate(lines):
        lineno = first_line + k
        if not raw.strip():
            continue  # blank lines are skipped (SPEC §3)
        out.lines += 1
        try:
            obj = enc.parse(raw)
            texts = enc.texts(obj)
            answer = _answer(obj) if enc.stage == "grpo" else None
        except _Bad as e:
            out.bad += 1
            if not settings["skip_bad"]:
                out.error = (lineno, str(e))
                return out.finish(enc.dtype)  # prepare stops at this line; nothing of the block is kept
            continue
        owners.append((len(texts), answer))
        pieces.extend(texts)
    encodings = enc.tok.encode_batch(pieces, add_special_tokens=False) if pieces else []
    k = 0
    for n, answer in owners:
        out.add_line(enc, pieces[k:k + n], encodings[k:k + n], answer)
        k += n
    return out.finish(enc.dtype)


class _Block:
    """What a worker hands back for one block: token/weight arrays, per-document lengths, counts."""

    def __init__(self):
        self.tokens, self.codes, self.lengths, self.prompt_lens, self.answers = [], [], [], [], []
        self.lines = self.bad = self.no_assistant = self.truncated = self.too_long = 0
        self.error = None

    def add_line(self, enc: _Encoder, texts, encodings, answer) -> None:
        if enc.stage == "pretrain":
            ids = encodings[0].ids
            if len(ids) >= enc.max_seq_len:
                ids, self.truncated = ids[: enc.max_seq_len - 1], self.truncated + 1
            self._doc(ids + [enc.eos], None, 0)
        elif enc.stage == "grpo":
            ids = encodings[0].ids
            if len(ids) > enc.max_seq_len:
                self.too_long += 1
                return
            self._doc(ids, None, len(ids))
            self.answers.append(answer)
        else:
            docs = [self._chat(enc, t, e) for t, e in zip(texts, encodings)]
            if any(d is None for d in docs):
                self.no_assistant += 1
                return
            for ids, codes in docs:
                self._doc(ids, codes, len(codes) - len(codes.lstrip(b"\x00")))  # tokens before the first weighted

    def _chat(self, enc: _Encoder, text: str, encoding):
        ids, codes = encoding.ids, enc.weights(text, encoding)
        if len(ids) > enc.max_seq_len:
            n = _cut(codes, ids, enc.im_end, enc.max_seq_len)
            ids, codes = ids[:n], codes[:n]
            self.truncated += 1
        return (ids, codes) if codes.count(0) < len(codes) else None

    def _doc(self, ids, codes, prompt_len: int) -> None:
        self.tokens.append(ids)
        self.lengths.append(len(ids))
        self.prompt_lens.append(prompt_len)
        if codes is not None:
            self.codes.append(codes)

    def finish(self, dtype) -> dict:
        flat = itertools.chain.from_iterable(self.tokens)
        return {
            "tokens": np.fromiter(flat, dtype=dtype, count=sum(self.lengths)),
            "codes": np.frombuffer(b"".join(self.codes), dtype=np.uint8),
            "lengths": np.asarray(self.lengths, dtype=np.int64),
            "prompt_lens": np.asarray(self.prompt_lens, dtype=np.int32),
            "answers": self.answers,
            "counts": dict(zip(COUNTS, (self.lines, self.bad, self.no_assistant, self.truncated, self.too_long))),
            "error": self.error,
        }


def _blocks(path: Path):
    """(block bytes, first line number) of whole lines, ~BLOCK_BYTES each; the file is never held whole."""
    lineno = 1
    with open(path, "rb") as f:
        while block := f.read(BLOCK_BYTES):
            if not block.endswith(b"\n"):
                block += f.readline()
            yield block, lineno
            lineno += block.count(b"\n") + (0 if block.endswith(b"\n") else 1)


class _Writer:
    """Appends worker results, in input order, to the files of a prepared directory being built."""

    def __init__(self, tmp: Path, stage: str):
        self.stage, self.tmp = stage, tmp
        self.files = {"tokens": open(tmp / "tokens.bin", "wb"), "offsets": open(tmp / "offsets.bin", "wb"),
                      "prompt_lens": open(tmp / "prompt_lens.bin", "wb")}
        if stage != "pretrain" and stage != "grpo":
            self.files["weights"] = open(tmp / "weights.bin", "wb")
        if stage == "grpo":
            self.answers = open(tmp / "answers.jsonl", "w", encoding="utf-8")
        self.num_tokens = self.num_docs = self.num_weighted = 0
        self.counts = dict.fromkeys(COUNTS, 0)
        self.files["offsets"].write(np.zeros(1, np.int64).tobytes())

    def add(self, res: dict) -> None:
        self.files["tokens"].write(res["tokens"].tobytes())
        ends = self.num_tokens + np.cumsum(res["lengths"])
        self.files["offsets"].write(ends.astype(np.int64).tobytes())
        self.files["prompt_lens"].write(res["prompt_lens"].tobytes())
        if "weights" in self.files:
            self.files["weights"].write(res["codes"].tobytes())
            self.num_weighted += int(np.count_nonzero(res["codes"]))
        for answer in res["answers"]:
            self.answers.write(json.dumps(answer, ensure_ascii=False) + "\n")
        self.num_tokens += len(res["tokens"])
        self.num_docs += len(res["lengths"])
        for k, v in res["counts"].items():
            self.counts[k] += v

    def close(self) -> None:
        for f in self.files.values():
            f.close()
        if self.stage == "grpo":
            self.answers.close()


def _run_blocks(path: Path, settings: dict, workers: int, writer: _Writer, bar) -> None:
    """Feeds blocks to `workers` processes (at most 2 each in flight), writing results in order."""
    if workers == 1:
        for block, first in _blocks(path):
            _take(encode_block((settings, block, first)), len(block), path, writer, bar)
        return
    # fork: workers start in milliseconds and need no importable __main__; they never touch torch.
    # A worker that dies raises BrokenProcessPool here instead of hanging the run.
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init) as pool:
        pending = deque()
        for block, first in _blocks(path):
            pending.append((pool.submit(encode_block, (settings, block, first)), len(block)))
            if len(pending) >= 2 * workers:
                res, size = pending.popleft()
                _take(res.result(), size, path, writer, bar)
        while pending:
            res, size = pending.popleft()
            _take(res.result(), size, path, writer, bar)


def _worker_init() -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the processes are the parallelism; rayon threads would fight them


def _take(res: dict, size: int, path: Path, writer: _Writer, bar) -> None:
    if res["error"] is not None:
        lineno, reason = res["error"]
        raise PrepareError(f"{path}:{lineno}: {reason}")
    writer.add(res)
    bar.update(size)


def prepare(stage: str, input: Path, tokenizer: Path, out: Path, max_seq_len: int = 512, workers: int = 2,
            skip_bad: bool = False, tag_weight: float = 10.0, progress: bool = True) -> Path:
    """Tokenizes `input` (jsonl of `stage`'s format) once into the prepared directory `out`; returns `out`."""
    from tqdm import tqdm

    input, tokenizer, out = Path(input), Path(tokenizer), Path(out)
    _check_args(stage, input, tokenizer, out, max_seq_len, workers)
    settings = {"encoder": (stage, str(tokenizer.resolve()), max_seq_len, float(tag_weight)), "skip_bad": skip_bad}
    enc = _encoder(*settings["encoder"])
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        writer = _Writer(tmp, stage)
        with tqdm(total=input.stat().st_size, unit="B", unit_scale=True, desc=f"prepare {stage}",
                  disable=not progress, file=sys.stderr) as bar:
            try:
                _run_blocks(input, settings, workers, writer, bar)
            finally:
                writer.close()
        _check_result(input, writer)
        meta = _meta(stage, input, tokenizer, max_seq_len, tag_weight, enc, writer)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False), encoding="utf-8")
        _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _check_args(stage, input: Path, tokenizer: Path, out: Path, max_seq_len: int, workers: int) -> None:
    if stage not in STAGES:
        raise PrepareError(f"--stage: {stage!r} is not one of {', '.join(STAGES)}")
    if not input.is_file():
        raise PrepareError(f"{input}: no such file")
    if not (tokenizer / "tokenizer.json").is_file():
        raise PrepareError(f"{tokenizer}: not a tokenizer directory (no tokenizer.json)")
    if max_seq_len < 8 or workers < 1:
        raise PrepareError(f"--max-seq-len must be >= 8 and --workers >= 1, got {max_seq_len} and {workers}")
    if out.exists() and any(out.iterdir()) and not (out / "meta.json").is_file():
        raise PrepareError(f"{out}: exists, is not empty and is not prepared data; refusing to overwrite it")


def _check_result(input: Path, writer: _Writer) -> None:
    if writer.counts["lines"] == 0:
        raise PrepareError(f"{input}: empty file (no JSON lines)")
    if writer.num_docs == 0:
        raise PrepareError(f"{input}: no usable documents ({_report(writer.counts)})")


def _report(counts: dict) -> str:
    return ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in counts.items())


def _meta(stage, input: Path, tokenizer: Path, max_seq_len, tag_weight, enc: _Encoder, writer: _Writer) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "stage": stage,
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "tokenizer": str(tokenizer.resolve()),
        "vocab_size": enc.tok.get_vocab_size(),
        "token_dtype": np.dtype(enc.dtype).name,
        "eos_id": enc.eos,
        "pad_id": enc.eos,
        "max_seq_len": max_seq_len,
        "source": str(input.resolve()),
        "source_bytes": input.stat().st_size,
        "num_docs": writer.num_docs,
        "num_tokens": writer.num_tokens,
        "num_weighted_tokens": writer.num_weighted,
        "weight_values": [0.0, 1.0, float(tag_weight) if stage == "reason" else 1.0],
        "counts": writer.counts,
        "files": {p.name: p.stat().st_size for p in sorted(writer.tmp.iterdir())},
    }


def _publish(tmp: Path, out: Path) -> None:
    """Renames the finished directory into place, replacing an older prepared `out`."""
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old)
    else:
        os.rename(tmp, out)


def run(args) -> int:
    """`minimind prepare --stage STAGE --input FILE --tokenizer DIR --out DIR [...]`."""
    try:
        out = prepare(args.stage, args.input, args.tokenizer, args.out, max_seq_len=args.max_seq_len,
                      workers=args.workers, skip_bad=args.skip_bad, tag_weight=getattr(args, "tag_weight", 10.0))
    except PrepareError as e:
        print(f"minimind prepare: {e}", file=sys.stderr)
        return 2
    meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    print(f"minimind prepare: {meta['num_docs']} documents, {meta['num_tokens']} tokens -> {out} "
          f"({_report(meta['counts'])})", file=sys.stderr)
    return 0
