"""Each token id as the exact bytes it stands for, and the text logprobs show for it (OpenAI's spelling).

A byte-level BPE token can hold part of a UTF-8 character: decoding it alone gives U+FFFD, so many
ids share that one text, and the legacy completions `top_logprobs` (a dict keyed by text) lost
entries (issue 26). Here each id keeps its true bytes; a token whose bytes are valid UTF-8 is that
string, one whose bytes are not is spelled as OpenAI does, `bytes:\\xe4\\xb8`, and a dict key that an
earlier id already took becomes `token_id:N`. `token_table(tokenizer)` builds this once per tokenizer
(6,400 ids: milliseconds), so a logprobs response decodes nothing per token.
"""

import codecs
import functools
from dataclasses import dataclass


@dataclass(frozen=True)
class TokenTable:
    raw: tuple[bytes, ...]  # by id: the bytes the token adds to the text
    text: tuple[str, ...]  # by id: raw as UTF-8, or "bytes:\\xNN..." when it is not valid UTF-8
    key: tuple[str, ...]  # by id: text, unique across ids (a dict of top logprobs never loses one)

    def text_offsets(self, ids: list[int]) -> list[int]:
        """Where each token starts in the text `ids` decode to, in characters. A token that continues a
        character an earlier token began starts where that character does; a character split over
        tokens counts once (per-token texts would count one U+FFFD per piece and drift from the text)."""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        offsets, done = [], 0
        for i in ids:
            offsets.append(done)
            done += len(decoder.decode(self.raw[i]))
        return offsets


@functools.lru_cache(maxsize=8)
def token_table(tokenizer) -> TokenTable:
    """The table of a Hugging Face tokenizer (cached per tokenizer object; they are not mutated after loading)."""
    from tokenizers.decoders import ByteLevel

    ids = range(len(tokenizer))
    if isinstance(tokenizer.backend_tokenizer.decoder, ByteLevel):
        raw = [_byte_level_bytes(t) for t in tokenizer.convert_ids_to_tokens(list(ids))]
    else:  # not byte-level (no stock minimind tokenizer): a token is its decoded text
        raw = [tokenizer.decode([i], skip_special_tokens=False).encode() for i in ids]
    text = [_spelling(b) for b in raw]
    key, taken = [], set()
    for i, t in zip(ids, text):
        key.append(t if t not in taken else f"token_id:{i}")
        taken.add(key[-1])
    return TokenTable(raw=tuple(raw), text=tuple(text), key=tuple(key))


def _byte_level_bytes(token: str) -> bytes:
    """As the `tokenizers` ByteLevel decoder does: every character through GPT-2's byte map, or, when
    one is outside it (an added token such as <|im_end|> is stored as itself), the token's own UTF-8."""
    out = bytearray()
    for c in token:
        b = _BYTE_OF_CHAR.get(c)
        if b is None:
            return token.encode()
        out.append(b)
    return bytes(out)


def _spelling(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def _gpt2_bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 bytes to printable characters (Radford et al. 2019,
    encoder.py): printable Latin-1 bytes stand for themselves, the rest become chr(256 + n) in order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out = {b: chr(b) for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in out):
        out[b] = chr(256 + n)
    return out


_BYTE_OF_CHAR = {c: b for b, c in _gpt2_bytes_to_unicode().items()}
