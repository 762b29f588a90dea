"""Byte-level BPE tokenizer: training (`minimind tokenizer`), loading, fingerprinting, chat rendering.

The trained tokenizer follows MiniMind's layout (`<|endoftext|>` 0 = pad/unk, `<|im_start|>` 1,
`<|im_end|>` 2 = eos) plus `<think>`, `</think>`, `<answer>`, `</answer>` as single, non-special
tokens (3..6, kept by `decode(skip_special_tokens=True)` so a served model can show its reasoning).
The directory loads with `transformers.AutoTokenizer.from_pretrained` and carries a ChatML template.
`ChatRenderer` renders chats with a tokenizer's own template without going through transformers on
every line (prepare's hot path); tests check it equals `apply_chat_template`.
"""

import hashlib
import json
import sys
from datetime import datetime
from pathlib import Path

from minimind.faults import partial_output, writing
from minimind.outputs import OutputError, check_output

PAD = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
TAGS = ("<think>", "</think>", "<answer>", "</answer>")
SPECIAL = (PAD, IM_START, IM_END)
# Longest piece of text the BPE trainer sees. Its time grows with the square of a word's length (a
# 200k-character line without spaces took 26 s; 1M did not finish), so longer texts are cut: at 1024,
# 10M characters on one line train about as fast as the same text in 100-character lines.
MAX_PIECE_CHARS = 1024
# the ideographs `split_cjk` isolates: CJK Unified Ideographs, Extension A, and Compatibility Ideographs
CJK = "[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]"

# ChatML; `reasoning_content` renders as <think>\n...\n</think>\n before the content (SPEC §3).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' and message['reasoning_content'] is defined"
    " and message['reasoning_content'] %}"
    "{{- '<think>\\n' + message['reasoning_content'] + '\\n</think>\\n' }}"
    "{%- endif %}"
    "{{- message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


class TokenizerError(ValueError):
    """A tokenizer that cannot be trained, written or loaded; the message names the file or flag."""


def _iter_texts(files: list[Path]):
    """Yields the text of each jsonl line: pretrain `text`, or every message's content of a chat."""
    for path in files:
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    obj = json.loads(raw.decode("utf-8")) if raw.strip() else {}
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    raise TokenizerError(f"{path}:{lineno}: {e}") from None
                if not isinstance(obj, dict):
                    raise TokenizerError(f"{path}:{lineno}: expected a JSON object")
                texts = [obj["text"]] if "text" in obj else []
                for key in ("conversations", "chosen", "rejected"):
                    for msg in obj.get(key) or ():
                        texts += [msg.get("reasoning_content") or "", msg.get("content") or ""]
                if why := lone_surrogate(raw, texts):
                    raise TokenizerError(f"{path}:{lineno}: {why}")
                yield from texts


def bounded_pieces(text: str, max_len: int = MAX_PIECE_CHARS):
    """`text` in consecutive pieces of at most `max_len` characters, cut before a space or newline in the
    second half of the window where there is one (the byte-level pre-tokenizer starts a word there anyway)."""
    start = 0
    while len(text) - start > max_len:
        end = start + max_len
        cut = max(text.rfind(" ", start + max_len // 2, end), text.rfind("\n", start + max_len // 2, end))
        cut = cut if cut > start else end
        yield text[start:cut]
        start = cut
    yield text[start:]


def lone_surrogate(raw: bytes, texts: list) -> str | None:
    """Why a jsonl line's strings are not valid Unicode, or None. JSON allows an escaped lone surrogate
    ("\\ud800"); nothing downstream can encode it. Only lines with such an escape pay for the check."""
    if b"\\ud" not in raw and b"\\uD" not in raw:
        return None
    for text in texts:
        try:
            if isinstance(text, str):
                text.encode("utf-8")
        except UnicodeEncodeError as e:
            return f"a string holds a lone surrogate (\\u{ord(text[e.start]):04x}), which is not valid Unicode"
    return None


def train_tokenizer(files: list[Path], vocab_size: int = 6400, *, out: Path, force: bool = False,
                    split_digits: bool = False, split_cjk: bool = False) -> Path:
    """Trains byte-level BPE on the jsonl `files` and writes a transformers-loadable directory `out`.

    A non-empty `out` is refused unless `force`, which replaces the tokenizer files in it.
    `split_digits` makes every digit its own token and `split_cjk` every CJK ideograph (as Llama and
    DeepSeek do for digits): on a small corpus BPE otherwise learns whole numbers and whole Chinese
    sentences as single tokens, so "37 + 45" and a sentence it never saw share no pieces with what it
    did see. Either one leaves `prepare`'s tiktoken fast path (fastbpe.py) for tokenizers' own encoder.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 256 + len(SPECIAL) + len(TAGS):
        raise TokenizerError(f"--vocab-size {vocab_size} is below the 256 byte symbols plus 7 special tokens")
    files, out = [Path(f) for f in files], Path(out)
    try:  # never over an input, even with --force
        check_output(out, flag="--out", inputs=[("--input", f) for f in files], force=True, directory=True)
    except OutputError as e:
        raise TokenizerError(str(e)) from None
    if out.is_dir() and any(out.iterdir()) and not force:
        what = "holds a tokenizer" if (out / "tokenizer.json").exists() else "is not empty"
        raise TokenizerError(f"--out {out}: {what}; pass --force to replace it")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    splits = [pre_tokenizers.Split(Regex(CJK), behavior="isolated")] if split_cjk else []
    splits += [pre_tokenizers.Digits(individual_digits=True)] if split_digits else []
    if splits:
        tok.pre_tokenizer = pre_tokenizers.Sequence([*splits, tok.pre_tokenizer])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[*SPECIAL, *TAGS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = 0

    def pieces():
        nonlocal texts
        for text in _iter_texts(files):
            texts += bool(text)
            yield from bounded_pieces(text)

    tok.train_from_iterator(pieces(), trainer=trainer)
    if texts == 0:
        raise TokenizerError(f"{', '.join(map(str, files))}: no text to train on (empty, or no \"text\" or "
                             "message content in any line)")
    spec = json.loads(tok.to_str())
    for added in spec["added_tokens"]:
        # tags are single tokens but ordinary text: decode(skip_special_tokens=True) keeps them
        added["special"] = added["content"] in SPECIAL
    files = {"tokenizer.json": json.dumps(spec, ensure_ascii=False),
             "tokenizer_config.json": json.dumps(_tokenizer_config(spec), ensure_ascii=False, indent=2)}
    # a failure (a full disk, a signal) removes what this call began, so it can simply be run again
    with partial_output(out) as begun, writing("the tokenizer", out, need=sum(len(t.encode()) for t in files.values())):
        out.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            begun.append(out / name)
            (out / name).write_text(text, encoding="utf-8")
    return out


def _tokenizer_config(spec: dict) -> dict:
    decoder = {
        str(t["id"]): {"content": t["content"], "lstrip": False, "normalized": False, "rstrip": False,
                       "single_word": False, "special": t["special"]}
        for t in spec["added_tokens"]
    }
    return {
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "bos_token": IM_START,
        "eos_token": IM_END,
        "pad_token": PAD,
        "unk_token": PAD,
        "clean_up_tokenization_spaces": False,  # else decode() rewrites " ." as "." and round trips break
        "model_max_length": 32768,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": CHAT_TEMPLATE,
    }


def read_tokenizer(path):
    """`path`/tokenizer.json as a `tokenizers.Tokenizer`; TokenizerError names the file if it is not one."""
    from tokenizers import Tokenizer

    file = Path(path) / "tokenizer.json"
    if not file.is_file():
        raise TokenizerError(f"{path}: not a tokenizer directory (no tokenizer.json)")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception: "EOF while parsing ...", "Model missing ..."
        raise TokenizerError(f"{file}: not a valid tokenizer: {e}") from None


def load_tokenizer(path, require_chat_template: bool = True):
    """A `PreTrainedTokenizerFast` from a tokenizer directory (ours or MiniMind's published one); every
    problem with its files (a truncated tokenizer.json, a broken tokenizer_config.json) is a TokenizerError
    naming the file. `require_chat_template=False` for a user that only encodes text (the server's
    completions)."""
    from transformers import AutoTokenizer, PretrainedConfig

    path = Path(path)
    read_tokenizer(path)  # a named error for a broken tokenizer.json, not transformers' KeyError or bare Exception
    try:
        # an empty config: else AutoTokenizer parses a checkpoint's config.json, which is ours, not a
        # transformers config (and warns about its `rope_scaling` on every load)
        tok = AutoTokenizer.from_pretrained(str(path), config=PretrainedConfig())
    except (KeyError, TypeError, ValueError, AttributeError, OSError) as e:  # a broken tokenizer_config.json
        raise TokenizerError(f"{path}: not a valid tokenizer: {type(e).__name__}: {e}") from None
    if require_chat_template and tok.chat_template is None:
        raise TokenizerError(f"{path}: the tokenizer has no chat_template")
    return tok


def _spec_of(tok) -> dict:
    if isinstance(tok, (str, Path)):
        return json.loads((Path(tok) / "tokenizer.json").read_text(encoding="utf-8"))
    backend = getattr(tok, "backend_tokenizer", tok)  # PreTrainedTokenizerFast or tokenizers.Tokenizer
    return json.loads(backend.to_str())


def tokenizer_fingerprint(tok) -> str:
    """sha256 over vocabulary, merges and special tokens: equal for equal tokenizers whatever the file bytes."""
    spec = _spec_of(tok)
    model = spec["model"]
    merges = [m.split(" ") if isinstance(m, str) else list(m) for m in model.get("merges", [])]
    added = sorted((t["id"], t["content"], bool(t["special"])) for t in spec.get("added_tokens", []))
    canon = json.dumps(
        {"type": model.get("type"), "vocab": sorted(model["vocab"].items()), "merges": merges, "added": added},
        ensure_ascii=False, separators=(",", ":"),
    )
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()[:32]


class ChatRenderer:
    """A tokenizer directory's chat template compiled once, rendered as transformers' apply_chat_template does.

    Same jinja environment settings as transformers (trim/lstrip blocks, loopcontrols, tojson,
    raise_exception) and the special tokens passed as variables; `tests/test_tokenizer.py` checks
    equality on every sample chat for both our template and MiniMind's.
    """

    def __init__(self, tokenizer_dir):
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        file = Path(tokenizer_dir) / "tokenizer_config.json"
        try:
            config = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise TokenizerError(f"{file}: not a valid tokenizer config: {e}") from None
        template = config.get("chat_template")
        jinja_file = Path(tokenizer_dir) / "chat_template.jinja"
        if template is None and jinja_file.is_file():
            template = jinja_file.read_text(encoding="utf-8")
        if not isinstance(template, str):
            raise TokenizerError(f"{tokenizer_dir}: the tokenizer has no chat_template")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
        env.globals["raise_exception"] = _raise_template_error
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self.template = env.from_string(template)
        digest = hashlib.sha256(template.encode("utf-8")).hexdigest()
        self.native = render_chatml if template == CHAT_TEMPLATE else NATIVE_TEMPLATES.get(digest)
        self.tokens = {k: _token_str(config.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}

    def __call__(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        # known templates rendered in plain Python (tests check they equal jinja): 10x cheaper per chat
        if self.native is not None and not any("tool_calls" in m or m["role"] == "tool" for m in messages):
            return self.native(messages, add_generation_prompt)
        return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt, **self.tokens)


def render_chatml(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """CHAT_TEMPLATE without jinja (same output; tests compare them)."""
    parts = []
    for m in messages:
        parts.append(IM_START + m["role"] + "\n")
        if m["role"] == "assistant" and m.get("reasoning_content"):
            parts.append("<think>\n" + m["reasoning_content"] + "\n</think>\n")
        parts.append(m["content"] + IM_END + "\n")
    if add_generation_prompt:
        parts.append(IM_START + "assistant\n")
    return "".join(parts)


def render_minimind(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """MiniMind2's published template without tools: a default system prompt, ChatML turns, no reasoning."""
    first = messages[0]
    parts = [IM_START + "system\n" + (first["content"] if first["role"] == "system" else "You are a helpful assistant")
             + IM_END + "\n"]
    for i, m in enumerate(messages):
        content = m["content"] if isinstance(m.get("content"), str) else ""
        if m["role"] == "user" or (m["role"] == "system" and i > 0):
            parts.append(IM_START + m["role"] + "\n" + content + IM_END + "\n")
        elif m["role"] == "assistant":
            parts.append(IM_START + "assistant\n" + content + IM_END + "\n")
    if add_generation_prompt:
        parts.append(IM_START + "assistant\n")
    return "".join(parts)


# sha256 of a template's text -> its plain-Python renderer
NATIVE_TEMPLATES = {"4f57494cd38c0e4e50e27f4632fb6907414a68cc48d0bbc48da5449c596c69fa": render_minimind}


def _token_str(value):
    return value.get("content") if isinstance(value, dict) else value


def _raise_template_error(message):
    import jinja2

    raise jinja2.exceptions.TemplateError(message)


def run(args) -> int:
    """`minimind tokenizer --input FILE... --vocab-size N --out DIR`."""
    try:
        out = train_tokenizer(args.input, vocab_size=args.vocab_size, out=args.out, force=args.force,
                              split_digits=args.split_digits, split_cjk=args.split_cjk)
    except (TokenizerError, json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        print(f"minimind tokenizer: {e}", file=sys.stderr)
        return 2
    tok = load_tokenizer(out)
    if len(tok) < args.vocab_size:
        print(f"minimind tokenizer: the input supports only {len(tok)} of the {args.vocab_size} tokens asked for "
              "(too little distinct text to learn more merges)", file=sys.stderr)
    print(json.dumps({"out": str(out), "vocab_size": len(tok), "fingerprint": tokenizer_fingerprint(tok)}))
    return 0
