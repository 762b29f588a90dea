"""`minimind chat`: a terminal chat with streaming output, history, `/reset` and `/exit`.

The reply streams as the engine produces it; reasoning (`<think>...</think>`) is shown apart from
the answer: dimmed on a terminal, between `[thinking]` and `[/thinking]` markers when piped. When the
history outgrows the context, the oldest turns are dropped (the system prompt stays).
"""

import itertools
import sys

from infer.engine import Engine
from infer.sampling import SamplingParams
from infer.think import ThinkSplitter

HELP = "commands: /reset (forget the conversation), /exit (or Ctrl-D)"


class ChatSession:
    def __init__(self, engine: Engine, params: SamplingParams, system: str | None = None):
        self.engine, self.params, self.system = engine, params, system
        self.history: list[dict] = []

    def messages(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.history

    def reset(self) -> None:
        self.history = []

    def _prompt(self) -> list[int]:
        """The chat so far as token ids, dropping the oldest turns until a reply has room."""
        while True:
            ids = self.engine.encode_chat(self.messages())
            room = self.engine.max_len - len(ids)
            if room >= min(self.params.max_new_tokens, 16) or len(self.history) <= 1:
                return ids
            self.history = self.history[2:] if len(self.history) > 2 else self.history[1:]

    def send(self, text: str):
        """Yields (reasoning delta, content delta) pairs; the reply joins the history at the end."""
        self.history.append({"role": "user", "content": text})
        ids = self._prompt()
        room = self.engine.max_len - len(ids)
        if room <= 0:
            self.history.pop()
            raise ValueError(f"the message is too long for the context ({len(ids)} of {self.engine.max_len} tokens)")
        params = SamplingParams(**{**vars(self.params), "max_new_tokens": min(self.params.max_new_tokens, room)})
        splitter, reasoning, content = ThinkSplitter(), [], []
        for delta in self.engine.stream(ids, params):
            r, c = splitter.feed(delta.text, final=delta.finish_reason is not None)
            reasoning.append(r)
            content.append(c)
            if r or c:
                yield r, c
        reply = {"role": "assistant", "content": "".join(content)}
        if "".join(reasoning):
            reply["reasoning_content"] = "".join(reasoning)
        self.history.append(reply)


class _Printer:
    """Writes reasoning distinctly from the answer."""

    def __init__(self, out, tty: bool):
        self.out, self.tty, self.thinking = out, tty, False

    def write(self, reasoning: str, content: str) -> None:
        if reasoning:
            if not self.thinking:
                self.out.write("\033[2;3m" if self.tty else "[thinking] ")
                self.thinking = True
            self.out.write(reasoning)
        if content:
            self._close()
            self.out.write(content)
        self.out.flush()

    def _close(self) -> None:
        if self.thinking:
            self.out.write("\033[0m\n" if self.tty else " [/thinking]\n")
            self.thinking = False

    def end(self) -> None:
        self._close()
        self.out.write("\n")
        self.out.flush()


class ChatInputError(ValueError):
    """Input the chat cannot take (not UTF-8); `run` reports it and exits 2."""


def read_line(stdin, lineno: int) -> str:
    """The next line of `stdin` as valid Unicode ('' at the end). Python decodes stdin strictly (a
    UnicodeDecodeError) or, under a C locale, with surrogate escapes that the tokenizer then rejects with
    a TypeError: both become a ChatInputError naming the line."""
    try:
        line = stdin.readline()
        line.encode("utf-8")
    except (UnicodeDecodeError, UnicodeEncodeError):
        raise ChatInputError(f"stdin line {lineno}: not valid UTF-8 text") from None
    return line


def repl(session: ChatSession, stdin=sys.stdin, out=sys.stdout) -> None:
    tty = out.isatty()
    out.write(f"minimind chat ({HELP})\n")
    for lineno in itertools.count(1):
        out.write("\n> " if tty else "> ")
        out.flush()
        line = read_line(stdin, lineno)
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            session.reset()
            out.write("(conversation reset)\n")
            continue
        if text.startswith("/"):
            out.write(f"unknown command {text}; {HELP}\n")
            continue
        printer = _Printer(out, tty)
        try:
            for reasoning, content in session.send(text):
                printer.write(reasoning, content)
        except ValueError as e:
            out.write(f"error: {e}\n")
            continue
        except KeyboardInterrupt:
            out.write(" [interrupted]")
        printer.end()


def run(args) -> int:
    from minimind.checkpoint import CheckpointError

    try:
        engine = Engine.from_checkpoint(args.ckpt, lora=args.lora, device=args.device, max_batch=1,
                                        max_len=args.max_len, compile=args.compile,
                                        dtype=args.dtype,
                                        allow_nonfinite=getattr(args, "allow_nonfinite", False))
        params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                                top_k=args.top_k, seed=args.seed)
    except (CheckpointError, OSError, ValueError) as e:
        print(f"minimind chat: {e}", file=sys.stderr)
        return 2
    for line in (engine.dtype_report, engine.warmup_report, engine.graphs_report):
        if line:
            print(line, file=sys.stderr, flush=True)
    try:
        repl(ChatSession(engine, params, system=args.system))
    except ChatInputError as e:
        print(f"\nminimind chat: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print()
    return 0
