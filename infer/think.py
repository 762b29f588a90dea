"""Splitting a reply's `<think>...</think>` reasoning from its content, incrementally.

Our chat template renders reasoning as `<think>\\n...\\n</think>\\n` before the content (SPEC §3), so a
reasoning model's reply starts with `<think>`. The splitter routes streamed text to
`reasoning_content` until `</think>`, then to `content`, holding back text that may be the start of
a tag so a tag split over two deltas is never shown.
"""

from infer.detok import holdback

OPEN, CLOSE = "<think>", "</think>"


class ThinkSplitter:
    def __init__(self):
        self.state = "start"  # start -> think -> content, or start -> content
        self.buf = ""
        self._strip_next = False  # the newline the template puts after a tag

    def feed(self, text: str, final: bool = False) -> tuple[str, str]:
        """-> (reasoning delta, content delta)."""
        self.buf += text
        reasoning = content = ""
        if self.state == "start":
            head = self.buf.lstrip()
            if head.startswith(OPEN):
                self.state, self.buf, self._strip_next = "think", head[len(OPEN) :], True
            elif OPEN.startswith(head) and not final:
                return "", ""
            else:
                self.state = "content"
        if self.state == "think":
            self.buf = self._strip_newline(self.buf, final)
            at = self.buf.find(CLOSE)
            if at >= 0:
                reasoning = self.buf[:at].removesuffix("\n")
                self.state, self.buf, self._strip_next = "content", self.buf[at + len(CLOSE) :], True
            else:
                keep = 0 if final else holdback(self.buf, [CLOSE])
                if not final and self.buf[: len(self.buf) - keep].endswith("\n"):
                    keep += 1  # the newline the template puts before </think>
                reasoning, self.buf = self.buf[: len(self.buf) - keep], self.buf[len(self.buf) - keep :]
                return reasoning, ""
        if self.state == "content":
            self.buf = self._strip_newline(self.buf, final)
            if not self._strip_next:
                content, self.buf = self.buf, ""
        return reasoning, content

    def _strip_newline(self, buf: str, final: bool) -> str:
        if self._strip_next and (buf or final):
            self._strip_next = False
            return buf.removeprefix("\n")
        return buf


def split_reasoning(text: str) -> tuple[str | None, str]:
    """Whole-reply version: (reasoning or None, content)."""
    splitter = ThinkSplitter()
    reasoning, content = splitter.feed(text, final=True)
    more_r, more_c = splitter.feed("", final=True)
    reasoning, content = reasoning + more_r, content + more_c
    return (reasoning if splitter.state != "start" and text.lstrip().startswith(OPEN) else None), content
