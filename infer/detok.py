"""Incremental detokenizing and stop-string handling for one generated sequence.

Byte-level BPE tokens can end in the middle of a multi-byte UTF-8 character; decoding such a prefix
gives U+FFFD. `IncrementalDetokenizer` re-decodes a short window of recent tokens (as vLLM does) and
holds text back until the character is complete, so a streamed delta never splits a character.
"""

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # window start: tokens before it are already text
        self.read = 0  # tokens up to here have been turned into text

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        """The new text this token completes ('' while a character is still partial)."""
        self.ids.append(token_id)
        done = self._decode(self.ids[self.prefix : self.read])
        full = self._decode(self.ids[self.prefix :])
        if full.endswith(REPLACEMENT) or len(full) <= len(done):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return full[len(done) :]

    def flush(self) -> str:
        """Whatever is left when the sequence ends (a dangling partial character becomes U+FFFD)."""
        done = self._decode(self.ids[self.prefix : self.read])
        full = self._decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return full[len(done) :]


def find_stop(text: str, stops: list[str], start: int) -> int:
    """Index of the earliest stop string in text[start:] (searching a little before, since a stop
    can straddle the previous end), or -1."""
    hits = [i for s in stops if (i := text.find(s, max(0, start - len(s) + 1))) >= 0]
    return min(hits) if hits else -1


def holdback(text: str, stops: list[str]) -> int:
    """How many trailing characters might be the start of a stop string, so must not be streamed yet."""
    longest = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), longest, -1):
            if s.startswith(text[-k:]):
                longest = k
                break
    return longest
