"""`minimind prepare`: jsonl -> memory-mapped tokens, document index, loss weights and meta.json (SPEC §4).

The main process streams the input in ~256 KB blocks of whole lines (never the whole file) to worker
processes, at most two blocks per worker in flight, and appends their results in input order to files
in a temporary directory that is renamed into place only when complete, with meta.json written last:
nothing half-written looks like prepared data. Workers validate each line (SPEC §3), render chats
with the tokenizer's own chat template, tokenize (with tiktoken where it gives tokenizers' ids, see
fastbpe.py; else tokenizers), and mark loss weights by character (or byte) spans of the rendered
text: assistant content plus its closing <|im_end|> (DPO: only the final response), the reason
stage's <think>/<answer> tags at `tag_weight` (every token a tag overlaps, when the tokenizer splits
it). Layout of a prepared directory:
  tokens.bin    all documents back to back, uint16 while the vocabulary fits, else uint32
  offsets.bin   int64 (num_docs + 1,), document d is tokens[offsets[d]:offsets[d + 1]]
  weights.bin   uint8 per token, an index into meta["weight_values"] (chat stages)
  prompt_lens.bin  int32 per document, tokens before the final response (dpo: doc 2i chosen, 2i+1 rejected)
  answers.jsonl one JSON value per prompt, the checkable answer or null (grpo)
  meta.json     stage, tokenizer fingerprint, counts, file sizes, format version, encoder used
"""

import bisect
import itertools
import json
import math
import multiprocessing
import os
import shutil
import signal
import sys
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from functools import lru_cache
from pathlib import Path

import numpy as np

from minimind.data.fastbpe import load_fast
from minimind.data.layouts import BadLine, layout_of
from minimind.data.tokenizer import (
    IM_END,
    IM_START,
    PAD,
    TAGS,
    TokenizerError,
    lone_surrogate,
    read_tokenizer,
    tokenizer_fingerprint,
)
from minimind.faults import die_with_parent, tree_bytes, writing
from minimind.outputs import OutputError, carry_over, check_output
from minimind.recipes import DATA, DATA_KINDS, TAG_WEIGHT

FORMAT_VERSION = 1
BLOCK_BYTES = 1 << 18  # 256 KB: enough blocks for two workers to finish together on small files
COUNTS = ("lines", "skipped_bad", "skipped_no_assistant", "truncated", "skipped_too_long")
ASSISTANT_HEADER = IM_START + "assistant\n"
CHECK_TEXTS = 4  # texts of every block the fast encoder's ids are checked against tokenizers'
# a pretrain document's tokens: "minimind" (the default): <|im_start|> text <|im_end|>, as MiniMind2's
# PretrainDataset writes them (README, "our document layout"); "eos": text <|endoftext|>, ours before
DOC_FORMATS = ("minimind", "eos")
# every file a prepared directory may hold: what --force replaces (a user's other files in --out stay)
PREPARED_FILES = ("tokens.bin", "offsets.bin", "weights.bin", "prompt_lens.bin", "answers.jsonl", "meta.json")


class PrepareError(ValueError):
    """Bad input or output: the message is "FILE:LINE: reason" (or "FILE: reason")."""


@lru_cache(maxsize=1)
def _encoder(stage: str, tokenizer: str, max_seq_len: int, tag_weight: float, fast: bool = True,
             doc_format: str = "minimind") -> "_Encoder":
    # built once in the main process, before the workers fork (tokenizer loading is the expensive part)
    return _Encoder(stage, Path(tokenizer), max_seq_len, tag_weight, fast, doc_format)


class _Encoder:
    def __init__(self, stage: str, tokenizer: Path, max_seq_len: int, tag_weight: float, fast: bool = True,
                 doc_format: str = "minimind"):
        self.stage, self.max_seq_len, self.tag_weight = stage, max_seq_len, tag_weight
        self.kind, self.layout = DATA[stage], layout_of(stage)
        self.tok = read_tokenizer(tokenizer)
        self.fast, self.why_slow = load_fast(tokenizer) if fast else (None, "disabled")
        self.render = self.layout.renderer(tokenizer)
        self.pad = self.tok.token_to_id(PAD)
        self.im_end = self.tok.token_to_id(IM_END)
        # a pretrain document's tokens: DOC_FORMATS; eos ends it (and is what doc masks split at)
        self.doc_format = self.layout.doc_format(doc_format)
        self.start = self.tok.token_to_id(IM_START) if doc_format == "minimind" else None
        self.eos = self.im_end if self.start is not None else self.pad
        self.dtype = np.uint16 if self.tok.get_vocab_size() <= 1 << 16 else np.uint32

    def parse(self, raw: bytes) -> dict:
        """A line's JSON object, or raises BadLine."""
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadLine(f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1})") from None
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise BadLine(f"invalid JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(obj, dict):
            raise BadLine(f"expected a JSON object, got {type(obj).__name__}")
        return obj

    def texts(self, obj: dict) -> list[str]:
        """The texts to tokenize for one line: 1, or 2 for a dpo pair (chosen, rejected). Raises BadLine."""
        return self.layout.texts(obj, self.render)

    def encode(self, texts: list[str]) -> list:
        """One doc (ids and the way back to text positions) per text: tiktoken when it applies, else tokenizers.

        The fast encoder's ids for the first CHECK_TEXTS texts of every block are compared with
        tokenizers'; on a difference this process warns and uses tokenizers from then on.
        """
        if self.fast is not None:
            docs = [_BytesDoc(t, self.fast.encode(t), self.fast.byte_len) for t in texts]
            check = self.tok.encode_batch(texts[:CHECK_TEXTS], add_special_tokens=False)
            if all(d.ids == e.ids for d, e in zip(docs, check)):
                return docs
            self.fast, self.why_slow = None, "its ids differed from tokenizers' on this input"
            print("minimind prepare: the fast encoder's ids differ from tokenizers' here; using tokenizers",
                  file=sys.stderr)
        return [_CharDoc(t, e) for t, e in zip(texts, self.tok.encode_batch(texts, add_special_tokens=False))]

    def weights(self, doc) -> bytearray:
        """Weight codes (0, 1, 2 = tag), one byte per token, from assistant spans of the rendered text.

        A span's tokens run from the first token starting inside it to the token holding its last
        character (the closing <|im_end|>); a few lookups per span, not a pass per token.
        """
        text = doc.text
        spans = self.layout.loss_spans(_assistant_spans(text))
        codes = bytearray(len(doc.ids))  # bytes, not numpy: a few slices per chat, numpy's call overhead dominates
        for a, b in spans:
            first, last = _token_range(doc, a, b)
            codes[first:last] = b"\x01" * (last - first)
            if self.kind.tag_weights:
                for ta, tb in _tag_spans(text, a, b):
                    t0, t1 = max(doc.token_at(ta), first), doc.token_at(tb - 1) + 1
                    codes[t0:t1] = b"\x02" * (t1 - t0)  # every token a tag overlaps, when it is split
        return codes


class _CharDoc:
    """A tokenizers Encoding: positions are characters of the text."""

    def __init__(self, text: str, encoding):
        self.text, self.ids, self.encoding = text, encoding.ids, encoding

    def token_at(self, pos: int) -> int:
        return self.encoding.char_to_token(pos)

    def token_start(self, t: int) -> int:
        return self.encoding.token_to_chars(t)[0]


class _BytesDoc:
    """tiktoken ids: positions are bytes of the UTF-8 text, from each token's byte length (computed when asked)."""

    def __init__(self, text: str, ids: list[int], byte_len: list[int]):
        self._text, self.ids, self._byte_len, self._ends = text, ids, byte_len, None

    @property
    def text(self) -> bytes:
        return self._text.encode("utf-8")

    @property
    def ends(self) -> list[int]:
        """Each token's end, in bytes of the text."""
        if self._ends is None:
            self._ends = list(itertools.accumulate(map(self._byte_len.__getitem__, self.ids)))
        return self._ends

    def token_at(self, pos: int) -> int:
        return bisect.bisect_right(self.ends, pos)

    def token_start(self, t: int) -> int:
        return self.ends[t - 1] if t else 0


def _token_range(doc, a: int, b: int) -> tuple[int, int]:
    first = doc.token_at(a)
    if doc.token_start(first) < a:  # merged with the header's newline: it belongs to the header
        first += 1
    return first, doc.token_at(b - 1) + 1


def _assistant_spans(text: str | bytes) -> list[tuple[int, int]]:
    """Spans [a, b) (of characters, or of bytes) of each assistant turn's content through its closing <|im_end|>."""
    header, end = (ASSISTANT_HEADER, IM_END) if isinstance(text, str) else (ASSISTANT_HEADER_B, IM_END_B)
    spans, pos = [], 0
    while (i := text.find(header, pos)) >= 0:
        a = i + len(header)
        j = text.find(end, a)
        b = len(text) if j < 0 else j + len(end)
        spans.append((a, b))
        pos = b
    return spans


ASSISTANT_HEADER_B, IM_END_B, TAGS_B = ASSISTANT_HEADER.encode(), IM_END.encode(), tuple(t.encode() for t in TAGS)


def _tag_spans(text: str | bytes, a: int, b: int):
    for tag in TAGS if isinstance(text, str) else TAGS_B:
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
            if why := lone_surrogate(raw, texts):
                raise BadLine(why)
            answer = enc.layout.answer(obj)
        except BadLine as e:
            out.bad += 1
            if not settings["skip_bad"]:
                out.error = (lineno, str(e))
                return out.finish(enc)  # prepare stops at this line; nothing of the block is kept
            continue
        owners.append((len(texts), answer))
        pieces.extend(texts)
    docs = enc.encode(pieces) if pieces else []
    k = 0
    for n, answer in owners:
        enc.layout.add(out, enc, docs[k:k + n], answer)
        k += n
    return out.finish(enc)


class _Block:
    """What a worker hands back for one block: token/weight arrays, per-document lengths, counts. The data's
    layout adds each line's documents (`Layout.add`)."""

    def __init__(self):
        self.tokens, self.codes, self.lengths, self.prompt_lens, self.answers = [], [], [], [], []
        self.lines = self.bad = self.no_assistant = self.truncated = self.too_long = 0
        self.error = None

    def chat(self, enc: _Encoder, doc):
        """A conversation's ids and weight codes, cut when longer than max_seq_len (`_cut`); None when no
        token of it carries loss."""
        ids, codes = doc.ids, enc.weights(doc)
        if len(ids) > enc.max_seq_len:
            n = _cut(codes, ids, enc.im_end, enc.max_seq_len)
            ids, codes = ids[:n], codes[:n]
            self.truncated += 1
        return (ids, codes) if codes.count(0) < len(codes) else None

    def doc(self, ids, codes, prompt_len: int) -> None:
        self.tokens.append(ids)
        self.lengths.append(len(ids))
        self.prompt_lens.append(prompt_len)
        if codes is not None:
            self.codes.append(codes)

    def finish(self, enc: _Encoder) -> dict:
        dtype, self.fast = enc.dtype, enc.fast is not None
        flat = itertools.chain.from_iterable(self.tokens)
        return {
            "tokens": np.fromiter(flat, dtype=dtype, count=sum(self.lengths)),
            "codes": np.frombuffer(b"".join(self.codes), dtype=np.uint8),
            "lengths": np.asarray(self.lengths, dtype=np.int64),
            "prompt_lens": np.asarray(self.prompt_lens, dtype=np.int32),
            "answers": self.answers,
            "counts": dict(zip(COUNTS, (self.lines, self.bad, self.no_assistant, self.truncated, self.too_long))),
            "error": self.error,
            "encoder": "tiktoken" if self.fast else "tokenizers",
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
                      "prompt_lens": open(tmp / "prompt_lens.bin", "wb"), **layout_of(stage).files(tmp)}
        self.num_tokens = self.num_docs = self.num_weighted = 0
        self.counts = dict.fromkeys(COUNTS, 0)
        self.encoders = set()
        self.files["offsets"].write(np.zeros(1, np.int64).tobytes())

    def add(self, res: dict) -> None:
        self.files["tokens"].write(res["tokens"].tobytes())
        ends = self.num_tokens + np.cumsum(res["lengths"])
        self.files["offsets"].write(ends.astype(np.int64).tobytes())
        self.files["prompt_lens"].write(res["prompt_lens"].tobytes())
        if "weights" in self.files:
            self.files["weights"].write(res["codes"].tobytes())
            self.num_weighted += int(np.count_nonzero(res["codes"]))
        for answer in res["answers"]:  # prompts (answers.jsonl)
            self.files["answers"].write(json.dumps(answer, ensure_ascii=False) + "\n")
        self.num_tokens += len(res["tokens"])
        self.num_docs += len(res["lengths"])
        for k, v in res["counts"].items():
            self.counts[k] += v
        self.encoders.add(res["encoder"])

    def close(self) -> None:
        for f in self.files.values():
            f.close()


def _run_blocks(path: Path, settings: dict, workers: int, writer: _Writer, bar) -> None:
    """Feeds blocks to `workers` processes (at most 2 each in flight), writing results in order."""
    if workers == 1:
        for block, first in _blocks(path):
            _take(encode_block((settings, block, first)), len(block), path, writer, bar)
        return
    # fork: workers start in milliseconds and need no importable __main__; they never touch torch.
    # A worker that dies raises BrokenProcessPool here instead of hanging the run.
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init, initargs=(os.getpid(),))
    try:
        pending = deque()
        for block, first in _blocks(path):
            pending.append((pool.submit(encode_block, (settings, block, first)), len(block)))
            if len(pending) >= 2 * workers:
                res, size = pending.popleft()
                _take(res.result(), size, path, writer, bar)
        while pending:
            res, size = pending.popleft()
            _take(res.result(), size, path, writer, bar)
    except BaseException:  # a bad line, a full disk, Ctrl-C, SIGTERM: the blocks not yet sent are dropped
        # and each worker ends after the one it holds. Not terminated: a worker killed while it sends a result
        # leaves the pool's manager thread waiting for the rest of it, and the interpreter joins that thread at
        # exit, forever. A program stopped by a signal exits at once (cli) and the kernel ends its workers.
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()


def _worker_init(parent: int) -> None:
    """Workers end with the main process, however it ends, and leave signals to it: Ctrl-C reaches the
    whole process group, and the main process, not each worker, decides what happens."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the processes are the parallelism; rayon threads would fight them
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's handler, inherited through fork
    die_with_parent(parent)


def _take(res: dict, size: int, path: Path, writer: _Writer, bar) -> None:
    if res["error"] is not None:
        lineno, reason = res["error"]
        raise PrepareError(f"{path}:{lineno}: {reason}")
    writer.add(res)
    bar.update(size)


def prepare(stage: str, input: Path, tokenizer: Path, out: Path, max_seq_len: int = 512, workers: int = 2,
            skip_bad: bool = False, tag_weight: float = TAG_WEIGHT, progress: bool = True, fast: bool = True,
            doc_format: str = "minimind", force: bool = False) -> Path:
    """Tokenizes `input` (jsonl of `stage`'s format) once into the prepared directory `out`; returns `out`.

    An existing prepared `out` is replaced only with `force`; a directory holding anything else is refused.

    `doc_format` (pretrain): a document's tokens, one of DOC_FORMATS.
    `fast=False` encodes with tokenizers even where tiktoken gives the same ids (fastbpe.py).
    """
    from tqdm import tqdm

    input, tokenizer, out = Path(input), Path(tokenizer), Path(out)
    _check_args(stage, input, tokenizer, out, max_seq_len, workers, force)
    if doc_format not in DOC_FORMATS:
        raise PrepareError(f"--doc-format: {doc_format!r} is not one of {', '.join(DOC_FORMATS)}")
    if not (math.isfinite(tag_weight) and tag_weight >= 0):  # a loss weight: nan or -5 would train nonsense
        raise PrepareError(f"--tag-weight must be a finite number >= 0, got {tag_weight}")
    settings = {"encoder": (stage, str(tokenizer.resolve()), max_seq_len, float(tag_weight), fast, doc_format),
                "skip_bad": skip_bad}
    try:
        enc = _encoder(*settings["encoder"])
    except TokenizerError as e:  # "DIR/tokenizer.json: not a valid tokenizer: ..."
        raise PrepareError(str(e)) from None
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    _remove_dead_temps(out)
    read = [0]  # input bytes encoded when the disk filled: what the estimate of the space needed scales by
    try:
        with writing("prepared data", out, need=lambda: _projected_bytes(tmp, read[0], input.stat().st_size)):
            tmp.mkdir(parents=True)
            writer = _Writer(tmp, stage)
            with tqdm(total=input.stat().st_size, unit="B", unit_scale=True, desc=f"prepare {stage}",
                      disable=not progress, file=sys.stderr) as bar:
                try:
                    _run_blocks(input, settings, workers, writer, bar)
                finally:
                    read[0] = bar.n
                    writer.close()
            _check_result(input, writer)
            meta = _meta(stage, input, tokenizer, max_seq_len, tag_weight, enc, writer)
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False), encoding="utf-8")
            _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _remove_dead_temps(out: Path) -> None:
    """Removes the temp directories of prepares into `out` that were SIGKILLed (the only way to leave one):
    those whose process is gone."""
    for tmp in out.parent.glob(f".{out.name}.tmp-*"):
        pid = tmp.name.rpartition("-")[2]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _projected_bytes(tmp: Path, read: int, total: int) -> int:
    """The prepared directory's size, projected from what was written for the input read so far; before
    the first block, the input's size (2-4 bytes a token and a byte of weight, ~4 bytes of text a token)."""
    return tree_bytes(tmp) * total // read if read else total


def _check_args(stage, input: Path, tokenizer: Path, out: Path, max_seq_len: int, workers: int, force: bool) -> None:
    if stage not in DATA_KINDS:
        raise PrepareError(f"--stage: {stage!r} is not one of {', '.join(DATA_KINDS)}")
    if not input.is_file():
        raise PrepareError(f"{input}: no such file")
    if not (tokenizer / "tokenizer.json").is_file():
        raise PrepareError(f"{tokenizer}: not a tokenizer directory (no tokenizer.json)")
    if max_seq_len < 8 or workers < 1:
        raise PrepareError(f"--max-seq-len must be >= 8 and --workers >= 1, got {max_seq_len} and {workers}")
    try:  # never an input, even with --force
        check_output(out, flag="--out", inputs=[("--input", input), ("--tokenizer", tokenizer)], force=True,
                     directory=True)
    except OutputError as e:
        raise PrepareError(str(e)) from None
    if out.is_dir() and any(out.iterdir()):
        if not (out / "meta.json").is_file():
            raise PrepareError(f"{out}: exists, is not empty and is not prepared data; refusing to overwrite it")
        if not force:
            raise PrepareError(f"--out {out}: already holds prepared data; pass --force to replace it")


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
        "eos_id": enc.eos,  # ends a document
        "pad_id": enc.pad,
        "doc_format": enc.doc_format,
        "doc_start_id": enc.start,
        "max_seq_len": max_seq_len,
        "source": str(input.resolve()),
        "source_bytes": input.stat().st_size,
        "num_docs": writer.num_docs,
        "num_tokens": writer.num_tokens,
        "num_weighted_tokens": writer.num_weighted,
        "weight_values": [0.0, 1.0, float(tag_weight) if DATA[stage].tag_weights else 1.0],
        "encoder": " + ".join(sorted(writer.encoders)),  # tiktoken where it gives tokenizers' ids (fastbpe.py)
        "counts": writer.counts,
        "files": {p.name: p.stat().st_size for p in sorted(writer.tmp.iterdir())},
    }


def _publish(tmp: Path, out: Path) -> None:
    """Renames the finished directory into place, replacing an older prepared `out` (but not files that
    prepare does not write)."""
    if out.exists():
        carry_over(out, tmp, owned=PREPARED_FILES)
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
                      workers=args.workers, skip_bad=args.skip_bad, tag_weight=getattr(args, "tag_weight", TAG_WEIGHT),
                      doc_format=getattr(args, "doc_format", "minimind"), force=getattr(args, "force", False))
    except PrepareError as e:
        print(f"minimind prepare: {e}", file=sys.stderr)
        return 2
    meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    print(f"minimind prepare: {meta['num_docs']} documents, {meta['num_tokens']} tokens -> {out} "
          f"({_report(meta['counts'])})", file=sys.stderr)
    return 0
