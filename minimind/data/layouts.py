"""The layouts of prepared data (recipes.DataKind.layout), one object each: what a jsonl line of it holds
(SPEC §3), the documents `prepare` makes of it and the files it writes beside tokens.bin, and how the
loader orders an epoch's rows and makes a batch of them. prepare.py and loader.py look the layout up
once (`layout_of`) and call its methods; neither asks which layout it has.

  text     documents in one token stream (pretrain): rows are windows over it, or a document a row
  chat     conversations, loss on the assistant spans (sft, lora, distill, reason): packed, or one a row
  pairs    chosen/rejected conversations sharing a prompt (dpo), loss on the final response: a pair a row
  prompts  a prompt and its checkable answer (grpo): a prompt a row
"""

from __future__ import annotations  # the batches' fields name torch types, which `prepare` never imports

from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from minimind.data.tokenizer import ChatRenderer
from minimind.recipes import DATA

if TYPE_CHECKING:
    import torch

ROLES = ("system", "user", "assistant")


class BadLine(Exception):
    """One bad line (the reason, without file and line)."""


class Batch(NamedTuple):
    input_ids: torch.Tensor  # (B, T) int64
    targets: torch.Tensor  # (B, T) int64, next token or -100
    weights: torch.Tensor  # (B, T) float32, loss weight of each target (0 where targets == -100)
    position_ids: torch.Tensor | None  # (B, T) int64 restarting at 0 per document, or None (plain causal)


class PairBatch(NamedTuple):
    chosen: Batch
    rejected: Batch


class PromptBatch(NamedTuple):
    prompt_ids: list[list[int]]
    answers: list[str | None]


class Layout:
    """What every layout but `text` shares: lines are conversations, rendered with the tokenizer's chat
    template, whose loss weights `prepare` writes to weights.bin; an epoch is its documents shuffled."""

    name = ""
    packable = False  # rows may hold several documents (--no-packing: one a row)
    masks_documents = False  # with packing, --doc-mask restarts positions after each document's end token

    # ----------------------------------------------------------------- prepare: a line -> documents
    def renderer(self, tokenizer: Path):
        return ChatRenderer(tokenizer)

    def doc_format(self, doc_format: str) -> str | None:
        """What meta.json records as the documents' format (DOC_FORMATS): only `text` has one."""
        return None

    def texts(self, obj: dict, render) -> list[str]:
        """The texts to tokenize for one line (a parsed JSON object). Raises BadLine."""
        return [render(messages(obj, "conversations"))]

    def answer(self, obj: dict) -> str | None:
        return None

    def loss_spans(self, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Of the assistant spans of a rendered conversation, those that carry loss."""
        return spans

    def add(self, block, enc, docs, answer) -> None:
        """Adds one line's encoded texts to `block` (prepare._Block) as documents, or counts why not."""
        chats = [block.chat(enc, d) for d in docs]
        if any(c is None for c in chats):
            block.no_assistant += 1
            return
        for ids, codes in chats:
            block.doc(ids, codes, len(codes) - len(codes.lstrip(b"\x00")))  # tokens before the first weighted

    def files(self, tmp: Path) -> dict:
        """The files written beside tokens.bin, offsets.bin and prompt_lens.bin, opened in `tmp`."""
        return {"weights": open(tmp / "weights.bin", "wb")}  # loss weights per token

    # ----------------------------------------------------------------- loader: an epoch's rows, a batch
    def plan(self, loader, rng: np.random.Generator):
        """The rows of one epoch in order, drawn from `rng` (fixed by seed and epoch)."""
        return rng.permutation(loader.data.num_docs)

    def batch(self, loader, rows):
        return loader.padded_batch(rows)


class Text(Layout):
    name = "text"
    packable = True
    masks_documents = True

    def renderer(self, tokenizer: Path):
        return None

    def doc_format(self, doc_format: str) -> str | None:
        return doc_format

    def texts(self, obj: dict, render) -> list[str]:
        text = obj.get("text")
        if not isinstance(text, str):
            raise BadLine('missing field "text"' if text is None else '"text" must be a string')
        if not text.strip():
            raise BadLine('empty "text"')
        return [text]

    def add(self, block, enc, docs, answer) -> None:
        """A document's tokens in the data's format: its start token (if any), at most max_seq_len in all."""
        ids = docs[0].ids
        room = enc.max_seq_len - 1 - (enc.start is not None)
        if len(ids) > room:
            ids, block.truncated = ids[:room], block.truncated + 1
        block.doc(([enc.start] if enc.start is not None else []) + ids + [enc.eos], None, 0)

    def files(self, tmp: Path) -> dict:
        return {}

    def plan(self, loader, rng: np.random.Generator):
        if loader.packed:  # windows of T + 1 tokens over the stream
            return rng.permutation((loader.data.meta["num_tokens"] - 1) // loader.seq_len)
        return rng.permutation(loader.data.num_docs)

    def batch(self, loader, rows):
        return loader.window_batch(rows) if loader.packed else loader.document_batch(rows)


class Chat(Layout):
    name = "chat"
    packable = True

    def plan(self, loader, rng: np.random.Generator):
        order = rng.permutation(loader.data.num_docs)
        if not loader.packed:
            return order
        rows = loader.pack_rows(order)
        return [rows[i] for i in rng.permutation(len(rows))]

    def batch(self, loader, rows):
        return loader.packed_batch(rows) if loader.packed else loader.padded_batch(rows)


class Pairs(Layout):
    """Documents 2i and 2i + 1 are pair i's chosen and rejected conversation."""

    name = "pairs"

    def texts(self, obj: dict, render) -> list[str]:
        chosen, rejected = messages(obj, "chosen"), messages(obj, "rejected")
        if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
            raise BadLine('"chosen" and "rejected" must end with an assistant turn')
        if chosen[:-1] != rejected[:-1]:
            raise BadLine('"chosen" and "rejected" must share the prompt (all turns but the last)')
        return [render(chosen), render(rejected)]

    def loss_spans(self, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
        return spans[-1:]  # the final response only

    def plan(self, loader, rng: np.random.Generator):
        return rng.permutation(loader.data.num_docs // 2)

    def batch(self, loader, rows):
        pairs = np.asarray(rows, dtype=np.int64)
        return PairBatch(loader.padded_batch(2 * pairs), loader.padded_batch(2 * pairs + 1))


class Prompts(Layout):
    """A prompt's tokens end with the assistant header (the model answers from there); answers.jsonl holds
    one JSON value per prompt, its checkable answer or null."""

    name = "prompts"

    def texts(self, obj: dict, render) -> list[str]:
        return [render(prompt_turns(messages(obj, "conversations")), add_generation_prompt=True)]

    def answer(self, obj: dict) -> str | None:
        answer = obj.get("answer")
        if answer is None and obj["conversations"][-1]["role"] == "assistant":
            answer = obj["conversations"][-1]["content"]
        if answer is not None and not isinstance(answer, (str, int, float)):
            raise BadLine('"answer" must be a string or a number')
        return None if answer is None else str(answer)

    def add(self, block, enc, docs, answer) -> None:
        ids = docs[0].ids
        if len(ids) > enc.max_seq_len:
            block.too_long += 1
            return
        block.doc(ids, None, len(ids))
        block.answers.append(answer)

    def files(self, tmp: Path) -> dict:
        return {"answers": open(tmp / "answers.jsonl", "w", encoding="utf-8")}

    def batch(self, loader, rows):
        return PromptBatch([loader.doc(d).tolist() for d in rows], [loader.data.answers[d] for d in rows])


LAYOUTS = {layout.name: layout for layout in (Text(), Chat(), Pairs(), Prompts())}


def layout_of(kind: str) -> Layout:
    """The layout of data kind `kind` (recipes.DATA: a stage's name)."""
    return LAYOUTS[DATA[kind].layout]


# ----------------------------------------------------------------- line formats (SPEC §3)
def messages(obj: dict, field: str) -> list[dict]:
    msgs = obj.get(field)
    if msgs is None:
        raise BadLine(f'missing field "{field}"')
    if not isinstance(msgs, list) or not msgs:
        raise BadLine(f'"{field}" must be a non-empty list of messages')
    for i, m in enumerate(msgs):  # the hot path: plain checks, messages built only on failure
        if type(m) is not dict:
            raise BadLine(f'{field}[{i}]: expected an object with "role" and "content"')
        content = m.get("content")
        if m.get("role") not in ROLES or type(content) is not str or not content.strip() or "reasoning_content" in m:
            _check_message(m, f"{field}[{i}]")
    return msgs


def _check_message(m: dict, where: str) -> None:
    if m.get("role") not in ROLES:
        raise BadLine(f"{where}.role: {m.get('role')!r} is not one of {', '.join(ROLES)}")
    content, reasoning = m.get("content"), m.get("reasoning_content")
    if not isinstance(content, str):
        raise BadLine(f'{where}: missing field "content"' if content is None else f"{where}.content must be a string")
    if reasoning is not None and not isinstance(reasoning, str):
        raise BadLine(f"{where}.reasoning_content must be a string")
    if not content.strip() and not (reasoning or "").strip():
        raise BadLine(f"{where}.content is empty")


def prompt_turns(msgs: list[dict]) -> list[dict]:
    """An rlaif prompt: the chat without its trailing reference assistant turn; must end with a user turn."""
    if msgs[-1]["role"] == "assistant":
        msgs = msgs[:-1]
    if not msgs or msgs[-1]["role"] != "user":
        raise BadLine('"conversations" must end with a user turn (optionally followed by a reference answer)')
    return msgs
