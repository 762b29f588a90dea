"""Batches over prepared data: deterministic per (seed, epoch), exactly resumable, sharded across ranks.

An epoch is a list of rows fixed by (seed, epoch): pretrain rows are contiguous windows of T + 1
tokens of the token stream (each document ends with the data's end token, meta["eos_id"]; with
`doc_mask`, position_ids restart after it, so a token attends only to its own document, as in packed
chat rows), or with `packed=False` one document a row padded to T (MiniMind2's pretrain layout; a
longer document keeps its first T + 1 tokens). In MiniMind2's document format (`<|im_start|> text
<|im_end|>`, meta["doc_start_id"]) the target after a document's end, the next document's start
token, has weight 0: MiniMind2 never trains it, and so a document's loss is the same packed or alone.
Chat rows are several
conversations packed best-fit-decreasing (position_ids restarting at 0 per document, which is how the
model blocks attention across them), or one conversation padded to T (MiniMind's layout, `packed=False`);
dpo rows are (chosen, rejected) pairs; grpo rows are prompts. The epochs' rows form one endless stream;
a step consumes the next batch_size * world_size rows of it and rank r takes its batch_size of them, so
ranks see disjoint rows, every row once per epoch, and the position (epoch, row) is the same whatever
the world size: a run resumed with another world size continues from the same global position.
"""

import json
from bisect import bisect_left, insort
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from minimind.data.layouts import Batch, layout_of
from minimind.data.layouts import PairBatch as PairBatch  # the batch types, importable from here as before
from minimind.data.layouts import PromptBatch as PromptBatch
from minimind.data.prepare import FORMAT_VERSION
from minimind.data.tokenizer import tokenizer_fingerprint
from minimind.recipes import CHAT_DATA

IGNORE = -100
STATE_VERSION = 1


class DataError(ValueError):
    pass


class Prepared:
    """A prepared directory opened read-only: memory-mapped tokens, offsets, weights; meta as a dict."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.meta = _read_meta(self.path)
        for name, size in self.meta["files"].items():
            f = self.path / name
            if not f.is_file():
                raise DataError(f"{f}: missing (the prepared directory is incomplete; run `minimind prepare` again)")
            if f.stat().st_size != size:
                raise DataError(f"{f}: {f.stat().st_size} bytes, meta.json says {size}: truncated or modified")
        self.tokens = self._map("tokens.bin", self.meta["token_dtype"])
        self.offsets = self._map("offsets.bin", "int64")
        self.lengths = np.diff(self.offsets)
        self.prompt_lens = self._map("prompt_lens.bin", "int32")
        self.codes = self._map("weights.bin", "uint8") if "weights.bin" in self.meta["files"] else None
        self.weight_values = np.asarray(self.meta["weight_values"], dtype=np.float32)
        self.answers = None
        if (self.path / "answers.jsonl").is_file():
            with open(self.path / "answers.jsonl", encoding="utf-8") as f:
                self.answers = [json.loads(line) for line in f]

    def _map(self, name: str, dtype: str) -> np.ndarray:
        if self.path.joinpath(name).stat().st_size == 0:
            return np.zeros(0, dtype=dtype)
        return np.memmap(self.path / name, dtype=dtype, mode="r")

    @property
    def num_docs(self) -> int:
        return len(self.lengths)

    def check_tokenizer(self, tokenizer) -> None:
        """DataError unless `tokenizer` (a tokenizer or its directory) is the one this data was prepared with."""
        fp = tokenizer_fingerprint(tokenizer)
        if fp != self.meta["tokenizer_fingerprint"]:
            raise DataError(
                f"{self.path} was prepared with a different tokenizer (fingerprint "
                f"{self.meta['tokenizer_fingerprint']}, this one is {fp}); run `minimind prepare` again with it")


def _read_meta(path: Path) -> dict:
    meta_file = path / "meta.json"
    if not path.is_dir():
        raise DataError(f"{path}: not a prepared data directory (run `minimind prepare`)")
    if not meta_file.is_file():
        raise DataError(f"{path}: not prepared data (no meta.json; run `minimind prepare`)")
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise DataError(f"{meta_file}: unreadable ({e})") from None
    if not isinstance(meta, dict):
        raise DataError(f"{meta_file}: expected a JSON object, got {type(meta).__name__}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{meta_file}: format_version {meta.get('format_version')!r}, this minimind reads "
                        f"{FORMAT_VERSION}; run `minimind prepare` again")
    _check_meta(meta, meta_file)
    return meta


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


# meta.json's fields as the loader uses them: (check, what it must be)
META_FIELDS = {
    "stage": (lambda v: isinstance(v, str), "a stage name (string)"),
    "tokenizer_fingerprint": (lambda v: isinstance(v, str), "a string"),
    "token_dtype": (lambda v: v in ("uint16", "uint32"), "uint16 or uint32"),
    "eos_id": (_is_count, "a token id (integer >= 0)"),
    "pad_id": (_is_count, "a token id (integer >= 0)"),
    "num_docs": (_is_count, "an integer >= 0"),
    "num_tokens": (_is_count, "an integer >= 0"),
    "weight_values": (lambda v: isinstance(v, list) and all(
        isinstance(w, (int, float)) and not isinstance(w, bool) and np.isfinite(w) and w >= 0 for w in v),
        "a list of finite numbers >= 0"),
    "files": (lambda v: isinstance(v, dict) and all(isinstance(k, str) and _is_count(n) for k, n in v.items())
              and {"tokens.bin", "offsets.bin", "prompt_lens.bin"} <= set(v), "an object of file sizes naming "
              "tokens.bin, offsets.bin and prompt_lens.bin"),
}


def _check_meta(meta: dict, meta_file: Path) -> None:
    """DataError naming the first field of meta.json that is missing or of the wrong type (a hand-edited or
    damaged file must not surface as a KeyError or a numpy error in the middle of a run)."""
    for key, (ok, expected) in META_FIELDS.items():
        if key not in meta:
            raise DataError(f"{meta_file}: field {key!r} missing; run `minimind prepare` again")
        if not ok(meta[key]):
            raise DataError(f"{meta_file}: field {key!r} must be {expected}, got {meta[key]!r}")
    if meta.get("doc_start_id") is not None and not _is_count(meta["doc_start_id"]):
        raise DataError(f"{meta_file}: field 'doc_start_id' must be a token id or null, got {meta['doc_start_id']!r}")


def open_prepared(path, tokenizer=None) -> Prepared:
    """Opens a prepared directory; with `tokenizer`, also checks it is the one the data was prepared with."""
    data = Prepared(Path(path))
    if tokenizer is not None:
        data.check_tokenizer(tokenizer)
    return data


def pack(lengths: list[int], order: np.ndarray, capacity: int, chunk: int = 4096) -> list[np.ndarray]:
    """Documents `order` (lengths <= capacity) packed best-fit-decreasing into rows of `capacity` tokens.

    Chunks of `chunk` documents (in the given order) are packed separately, so the cost stays
    O(N log N) and a document's row mates come from nearby in the shuffled order.
    """
    rows = []
    for c in range(0, len(order), chunk):
        docs = sorted(order[c:c + chunk].tolist(), key=lambda d: -lengths[d])
        free, bins = [], []  # free: sorted (remaining capacity, bin index)
        for d in docs:
            n = lengths[d]
            i = bisect_left(free, (n, -1))
            if i < len(free):
                room, b = free.pop(i)
                bins[b].append(d)
                insort(free, (room - n, b))
            else:
                bins.append([d])
                insort(free, (capacity - n, len(bins) - 1))
        rows.extend(np.asarray(b, dtype=np.int64) for b in bins)
    return rows


class Loader:
    """Endless iterator of batches for one rank; see the module docstring for order, resume and sharding.
    The data's layout (data.layouts) orders each epoch's rows and makes their batch with the methods below."""

    def __init__(self, data: Prepared, *, stage: str, batch_size: int, seq_len: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, packed: bool = True, doc_mask: bool = False):
        _check_stage(data, stage)
        if not 0 <= rank < world_size or batch_size < 1 or seq_len < 2:
            raise DataError(f"need 0 <= rank < world_size, batch_size >= 1, seq_len >= 2; got rank {rank}, "
                            f"world_size {world_size}, batch_size {batch_size}, seq_len {seq_len}")
        self.data, self.stage, self.seed = data, stage, seed
        self.layout = layout_of(stage)
        self.batch_size, self.seq_len, self.rank, self.world_size = batch_size, seq_len, rank, world_size
        self.packed = packed and self.layout.packable
        self.doc_mask = doc_mask and self.layout.masks_documents and self.packed
        self._epoch, self._row, self._consumed = 0, 0, 0
        self._plans: dict[int, object] = {}
        if self._num_rows(0) == 0:
            raise DataError(f"{data.path}: no rows for seq_len {seq_len} ({data.meta['num_tokens']} tokens)")

    # --- order -------------------------------------------------------------------------------------------
    def _plan(self, epoch: int):
        """The rows of an epoch, fixed by (seed, epoch): window/doc/pair/prompt indices, or packed doc lists."""
        if epoch not in self._plans:
            for old in [e for e in self._plans if e < epoch - 1]:
                del self._plans[old]
            self._plans[epoch] = self.layout.plan(self, np.random.default_rng([self.seed, epoch]))
        return self._plans[epoch]

    def _num_rows(self, epoch: int) -> int:
        return len(self._plan(epoch))

    def _next_rows(self, n: int) -> list:
        rows = []
        while len(rows) < n:
            plan = self._plan(self._epoch)
            take = plan[self._row:self._row + n - len(rows)]
            rows.extend(take)
            self._row += len(take)
            if self._row == len(plan):
                self._epoch, self._row = self._epoch + 1, 0
        self._consumed += n
        return rows

    def __iter__(self):
        return self

    def __next__(self):
        rows = self._next_rows(self.batch_size * self.world_size)
        return self.layout.batch(self, rows[self.rank * self.batch_size:(self.rank + 1) * self.batch_size])

    @property
    def epoch(self) -> float:
        """Epochs done, with the fraction of the current one."""
        return self._epoch + self._row / self._num_rows(self._epoch)

    @property
    def rows_per_epoch(self) -> int:
        return self._num_rows(self._epoch)

    def __len__(self) -> int:
        """Steps in the current epoch (the last one may borrow rows from the next epoch)."""
        return -(-self.rows_per_epoch // (self.batch_size * self.world_size))

    # --- resume ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "stage": self.stage, "seed": self.seed, "seq_len": self.seq_len,
                "packed": self.packed, "epoch": self._epoch, "row": self._row, "rows_consumed": self._consumed}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("version", "stage", "seed", "seq_len", "packed"):
            if state.get(key) != mine[key]:
                raise DataError(f"loader state has {key}={state.get(key)!r}, this loader {key}={mine[key]!r}: "
                                "the saved position means nothing for this data order")
        position = [state.get(k) for k in ("epoch", "row", "rows_consumed")]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in position):
            raise DataError(f"loader state: epoch, row and rows_consumed must be integers >= 0, got {position}")
        self._epoch, self._row, self._consumed = position
        if self._row >= self._num_rows(self._epoch):
            raise DataError(f"loader state row {self._row} is past the end of epoch {self._epoch}")

    # --- rows and batches (called by the layout) ----------------------------------------------------------
    @cached_property
    def capped(self) -> list[int]:
        """Each document's length up to T: a chat longer than T keeps its first T tokens (packed pretrain
        never asks: it needs no per-document list)."""
        return np.minimum(self.data.lengths, self.seq_len).tolist()

    def pack_rows(self, order: np.ndarray) -> list[np.ndarray]:
        return pack(self.capped, order, self.seq_len)

    def doc(self, d: int) -> np.ndarray:
        o = self.data.offsets
        return self.data.tokens[o[d]:o[d + 1]]

    def window_batch(self, rows) -> Batch:
        """Pretrain windows of T + 1 tokens of the stream; in MiniMind2's document format a target that is the
        next document's start token has weight 0."""
        t = self.seq_len
        win = np.stack([self.data.tokens[i * t:i * t + t + 1] for i in rows]).astype(np.int64)  # (B, T+1)
        x, y = torch.from_numpy(win[:, :-1].copy()), torch.from_numpy(win[:, 1:].copy())
        pos = torch.from_numpy(document_positions(win[:, :-1], self.data.meta["eos_id"])) if self.doc_mask else None
        w = torch.ones(y.shape, dtype=torch.float32)
        if (doc_start := self.data.meta.get("doc_start_id")) is not None:
            w[y == doc_start] = 0.0
        return Batch(x, y, w, pos)

    def document_batch(self, docs) -> Batch:
        """One pretrain document a row: its first T + 1 tokens, the rest padding with weight 0."""
        inp, tgt, w, _ = self._empty(len(docs))
        for r, d in enumerate(np.asarray(docs).tolist()):
            s = int(self.data.offsets[d])
            ids = self.data.tokens[s:s + min(int(self.data.lengths[d]), self.seq_len + 1)]
            n = len(ids) - 1
            inp[r, :n], tgt[r, :n], w[r, :n] = ids[:-1], ids[1:], 1.0
        return Batch(torch.from_numpy(inp), torch.from_numpy(tgt), torch.from_numpy(w), None)

    def _empty(self, b: int):
        t = self.seq_len
        pad = self.data.meta["pad_id"]
        return (np.full((b, t), pad, np.int64), np.full((b, t), IGNORE, np.int64), np.zeros((b, t), np.float32),
                np.zeros((b, t), np.int64))

    def _put(self, d: int, row: int, at: int, arrays) -> int:
        """Writes document d into `row` at column `at` (inputs, next-token targets, weights, positions)."""
        inp, tgt, w, pos = arrays
        s, n = int(self.data.offsets[d]), self.capped[d]
        ids = self.data.tokens[s:s + n]
        inp[row, at:at + n] = ids
        tgt[row, at:at + n - 1] = ids[1:]
        w[row, at:at + n - 1] = self.data.weight_values[self.data.codes[s + 1:s + n]]
        pos[row, at:at + n] = np.arange(n)
        return at + n

    def _finish(self, arrays, positions: bool) -> Batch:
        inp, tgt, w, pos = arrays
        tgt[w == 0] = IGNORE
        as_t = torch.from_numpy
        return Batch(as_t(inp), as_t(tgt), as_t(w), as_t(pos) if positions else None)

    def packed_batch(self, rows) -> Batch:
        arrays = self._empty(len(rows))
        for r, docs in enumerate(rows):
            at = 0
            for d in docs.tolist():
                at = self._put(d, r, at, arrays)
            arrays[3][r, at:] = np.arange(self.seq_len - at)  # padding: one more "document" of its own
        return self._finish(arrays, positions=True)

    def padded_batch(self, docs) -> Batch:
        arrays = self._empty(len(docs))
        for r, d in enumerate(np.asarray(docs).tolist()):
            self._put(d, r, 0, arrays)
        return self._finish(arrays, positions=False)


def document_positions(ids: np.ndarray, sep: int) -> np.ndarray:
    """(B, T) token ids -> each token's position within its document: 0 at the row's start and right
    after each `sep` (the separator ends its document)."""
    t = ids.shape[1]
    col = np.arange(t)
    starts = np.zeros(ids.shape, dtype=bool)
    starts[:, 0] = True
    starts[:, 1:] = ids[:, :-1] == sep
    return col - np.maximum.accumulate(np.where(starts, col, 0), axis=1)


def _check_stage(data: Prepared, stage: str) -> None:
    prepared = data.meta["stage"]
    ok = prepared == stage or (stage in CHAT_DATA and prepared in CHAT_DATA)  # one conversation format
    if not ok:
        raise DataError(f"{data.path} holds {prepared!r} data, which the {stage!r} stage cannot use")


def make_loader(path, *, stage: str, batch_size: int, seq_len: int, seed: int = 0, rank: int = 0,
                world_size: int = 1, packed: bool = True, doc_mask: bool = False) -> Loader:
    """A Loader over the prepared directory `path` (or an already opened `Prepared`)."""
    data = path if isinstance(path, Prepared) else open_prepared(path)
    return Loader(data, stage=stage, batch_size=batch_size, seq_len=seq_len, seed=seed, rank=rank,
                  world_size=world_size, packed=packed, doc_mask=doc_mask)
