"""tiktoken as the encoder of `prepare` for byte-level BPE tokenizers: the same token ids, 3-5x less CPU.

`tokenizers` and `tiktoken` run BPE differently: tokenizers applies the listed merge with the lowest
rank, tiktoken merges the adjacent pair whose concatenation has the lowest id. For a vocabulary made by
BPE training (every non-byte token is the product of exactly one merge and ids grow in merge order)
the two agree, because training never creates a pair that a later merge could skip. `load_fast`
accepts a tokenizer.json only when it is that kind of vocabulary with the GPT-2 byte-level
pre-tokenizer and no normalizer, and returns None (with the reason) otherwise; `prepare` then uses
tokenizers. Tests compare both on every Unicode code point and on whole corpora, and `prepare`
re-checks a few texts of every block against tokenizers (see `_Encoder.encode`).
"""

import json
from pathlib import Path

# tokenizers' ByteLevel pre-tokenizer pattern (GPT-2's), verbatim
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def byte_symbols() -> dict[int, str]:
    """GPT-2's byte -> printable character table that byte-level BPE vocabularies are written in."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b], extra = chr(256 + extra), extra + 1
    return table


class FastBPE:
    """Encodes like the tokenizer.json it was built from; `byte_len[id]` is each token's length in UTF-8 bytes."""

    def __init__(self, ranks: dict[bytes, int], added: dict[str, int]):
        import tiktoken

        self.core = tiktoken.Encoding("minimind", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens=added)
        self.allowed = set(added)  # added tokens are split out of any text, as tokenizers does
        size = max([*ranks.values(), *added.values()]) + 1
        self.byte_len = [0] * size
        for token, i in ranks.items():
            self.byte_len[i] = len(token)
        for token, i in added.items():
            self.byte_len[i] = len(token.encode("utf-8"))

    def encode(self, text: str) -> list[int]:
        return self.core.encode(text, allowed_special=self.allowed)


def load_fast(tokenizer: Path) -> tuple[FastBPE | None, str]:
    """(FastBPE, "") when the tokenizer provably encodes the same under tiktoken, else (None, why not)."""
    try:
        import tiktoken  # noqa: F401
    except ImportError:
        return None, "tiktoken is not installed"
    spec = json.loads((Path(tokenizer) / "tokenizer.json").read_text(encoding="utf-8"))
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or model.get("dropout") or model.get("byte_fallback") or model.get("ignore_merges"):
        return None, "not a plain BPE model"
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        return None, "BPE with subword affixes"
    if spec.get("normalizer") is not None:
        return None, "has a normalizer"
    if pre.get("type") != "ByteLevel" or not pre.get("use_regex", True) or pre.get("add_prefix_space"):
        return None, "pre-tokenizer is not GPT-2 byte-level"
    added = {}
    for tok in spec.get("added_tokens") or []:
        if tok.get("lstrip") or tok.get("rstrip") or tok.get("single_word"):
            return None, f"added token {tok['content']!r} strips or matches whole words"
        added[tok["content"]] = tok["id"]
    if any(a != b and a in b for a in added for b in added):
        return None, "one added token contains another"
    vocab, merges = model["vocab"], [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    decode = {ch: b for b, ch in byte_symbols().items()}
    singles = [ch for ch in decode if ch in vocab]
    if len(singles) != 256:
        return None, "the vocabulary lacks some of the 256 byte symbols"
    products = [a + b for a, b in merges]
    if any(p not in vocab for p in products) or len(set(products)) != len(products):
        return None, "merges that are not in the vocabulary or make the same token twice"
    ids = [vocab[p] for p in products]
    if any(x >= y for x, y in zip(ids, ids[1:])) or (ids and ids[0] <= max(vocab[c] for c in singles)):
        return None, "token ids are not in merge order"
    if set(vocab) - set(products) - set(singles) - set(added):
        return None, "vocabulary tokens that no merge produces"
    try:
        ranks = {bytes(decode[c] for c in token): i for token, i in vocab.items() if token not in added}
    except KeyError:
        return None, "vocabulary tokens outside the byte alphabet"
    return FastBPE(ranks, added), ""
