"""The tokenizer: special tokens, lossless round trips, chat rendering equal to transformers', fingerprints.

Run against our trained tokenizer and against MiniMind's published one (../shared/minimind_tokenizer/),
which every command taking --tokenizer must accept unchanged.
"""

import json
import shutil

import pytest
from transformers import AutoTokenizer

from minimind.cli import main
from minimind.data.fastbpe import load_fast
from minimind.data.tokenizer import (
    CHAT_TEMPLATE,
    ChatRenderer,
    TokenizerError,
    load_tokenizer,
    render_chatml,
    tokenizer_fingerprint,
    train_tokenizer,
)

TEXTS = [
    "Hello, world. The river runs north.",
    "小明早上七点起床，先喝一杯温水。",
    "表情和符号：😀 👍 ✓ ©，混合 English 和中文。",
    "Line one.\nLine two with a tab\tand \"quotes\".\n\nA paragraph after a blank line.\n",
    "  leading spaces, trailing spaces  ",
    "<think>\nmaybe\n</think>\n<answer>\n42\n</answer>",
    "\n\n\n",
]


@pytest.fixture(params=["ours", "minimind"])
def any_tokenizer(request, tokenizer_dir, shared_dir):
    return tokenizer_dir if request.param == "ours" else shared_dir / "minimind_tokenizer"


def _sample_texts(shared_dir):
    with open(shared_dir / "samples" / "pretrain.jsonl", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def _sample_chats(shared_dir, synth_dir):
    chats = []
    for name in ("sft", "reason", "rlaif", "dpo"):
        with open(shared_dir / "samples" / f"{name}.jsonl", encoding="utf-8") as f:
            for line in f:
                obj = json.loads(line)
                chats.extend(obj[k] for k in ("conversations", "chosen", "rejected") if k in obj)
    with open(synth_dir / "sft.jsonl", encoding="utf-8") as f:
        chats.extend(json.loads(next(f))["conversations"] for _ in range(20))
    with open(synth_dir / "reason.jsonl", encoding="utf-8") as f:
        chats.extend(json.loads(line)["conversations"] for line in f)
    return chats


def test_special_tokens_are_minimind_layout(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    assert tok.convert_ids_to_tokens(list(range(7))) == [
        "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<answer>", "</answer>"]
    assert (tok.pad_token, tok.unk_token, tok.eos_token, tok.bos_token) == (
        "<|endoftext|>", "<|endoftext|>", "<|im_end|>", "<|im_start|>")
    assert tok.pad_token_id == 0 and tok.eos_token_id == 2
    assert len(tok) <= 6400
    for tag_id, tag in zip(range(3, 7), ("<think>", "</think>", "<answer>", "</answer>")):
        assert tok.encode(tag, add_special_tokens=False) == [tag_id]
    # tags are text, not control tokens: a served model's reasoning survives skip_special_tokens
    ids = tok.encode("<think>\nx\n</think>\n<|im_end|>", add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=True) == "<think>\nx\n</think>\n"


def test_loads_with_stock_autotokenizer(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    assert tok.chat_template == CHAT_TEMPLATE
    assert tokenizer_fingerprint(tok) == tokenizer_fingerprint(tokenizer_dir)


def test_round_trip(any_tokenizer, shared_dir):
    tok = load_tokenizer(any_tokenizer)
    for text in TEXTS + _sample_texts(shared_dir):
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text


def test_renderer_equals_apply_chat_template(any_tokenizer, shared_dir, synth_dir):
    tok, render = load_tokenizer(any_tokenizer), ChatRenderer(any_tokenizer)
    chats = _sample_chats(shared_dir, synth_dir)
    assert len(chats) > 30
    for chat in chats:
        for gen in (False, True):
            assert render(chat, add_generation_prompt=gen) == tok.apply_chat_template(
                chat, tokenize=False, add_generation_prompt=gen)


def test_native_renderers_equal_jinja(any_tokenizer, synth_dir, shared_dir):
    render = ChatRenderer(any_tokenizer)
    assert render.native is not None  # both known templates take the plain-Python path in prepare
    for chat in _sample_chats(shared_dir, synth_dir):
        for gen in (False, True):
            assert render.native(chat, gen) == render.template.render(
                messages=chat, add_generation_prompt=gen, **render.tokens)
    assert render_chatml([{"role": "user", "content": "x"}]) == "<|im_start|>user\nx<|im_end|>\n"


def test_template_renders_reasoning_content_and_no_default_system(tokenizer_dir, shared_dir):
    chat = [{"role": "user", "content": "9乘以6是多少？"},
            {"role": "assistant", "reasoning_content": "10*6-6=54", "content": "54。"}]
    ours = load_tokenizer(tokenizer_dir).apply_chat_template(chat, tokenize=False)
    assert ours == ("<|im_start|>user\n9乘以6是多少？<|im_end|>\n"
                    "<|im_start|>assistant\n<think>\n10*6-6=54\n</think>\n54。<|im_end|>\n")
    theirs = load_tokenizer(shared_dir / "minimind_tokenizer").apply_chat_template(chat, tokenize=False)
    assert theirs.startswith("<|im_start|>system\nYou are a helpful assistant<|im_end|>\n")


def test_fingerprint_covers_content_not_bytes(tokenizer_dir, shared_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tokenizer_dir, copy)
    spec = json.loads((copy / "tokenizer.json").read_text(encoding="utf-8"))
    (copy / "tokenizer.json").write_text(json.dumps(spec, indent=4, ensure_ascii=True))  # other bytes
    fp = tokenizer_fingerprint(tokenizer_dir)
    assert tokenizer_fingerprint(copy) == fp == tokenizer_fingerprint(load_tokenizer(copy))
    assert tokenizer_fingerprint(shared_dir / "minimind_tokenizer") != fp
    spec["model"]["merges"] = spec["model"]["merges"][:-1]
    (copy / "tokenizer.json").write_text(json.dumps(spec))
    assert tokenizer_fingerprint(copy) != fp
    spec = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    spec["added_tokens"][3]["special"] = True
    (copy / "tokenizer.json").write_text(json.dumps(spec))
    assert tokenizer_fingerprint(copy) != fp


def test_train_is_deterministic(synth_dir, tmp_path):
    files = [synth_dir / "sft.jsonl"]
    a = train_tokenizer(files, vocab_size=1000, out=tmp_path / "a")
    b = train_tokenizer(files, vocab_size=1000, out=tmp_path / "b")
    assert tokenizer_fingerprint(a) == tokenizer_fingerprint(b)
    assert len(load_tokenizer(a)) == 1000


def test_bad_input_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(TokenizerError, match=rf"{bad}:2: "):
        train_tokenizer([bad], out=tmp_path / "tok")
    surrogate = tmp_path / "surrogate.jsonl"
    surrogate.write_text('{"text": "emoji \\ud83d\\ude00 is fine"}\n{"text": "a lone \\ud800 is not"}\n')
    with pytest.raises(TokenizerError, match=rf"{surrogate}:2: a string holds a lone surrogate"):
        train_tokenizer([surrogate], out=tmp_path / "tok")
    with pytest.raises(TokenizerError, match="vocab-size"):
        train_tokenizer([bad], vocab_size=100, out=tmp_path / "tok")
    with pytest.raises(TokenizerError, match="not a tokenizer directory"):
        load_tokenizer(tmp_path)


def test_cli(synth_dir, tmp_path, capsys):
    assert main(["tokenizer", "--input", str(synth_dir / "sft.jsonl"), "--vocab-size", "600",
                 "--out", str(tmp_path / "tok")]) == 0
    assert json.loads(capsys.readouterr().out)["vocab_size"] == 600
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "\xff"}\n')
    assert main(["tokenizer", "--input", str(bad), "--out", str(tmp_path / "t2")]) == 2
    assert f"{bad}:1:" in capsys.readouterr().err


def test_split_digits_and_cjk_make_numbers_and_ideographs_compose(synth_dir, tmp_path, capsys):
    files = [synth_dir / "pretrain.jsonl", synth_dir / "sft.jsonl"]
    whole = load_tokenizer(train_tokenizer(files, vocab_size=6400, out=tmp_path / "whole"))
    assert main(["tokenizer", "--input", *map(str, files), "--vocab-size", "6400", "--out", str(tmp_path / "split"),
                 "--split-digits", "--split-cjk"]) == 0
    split = AutoTokenizer.from_pretrained(str(tmp_path / "split"))  # stock transformers reads the pre-tokenizer
    pieces = lambda tok, text: [tok.decode([i]) for i in tok.encode(text, add_special_tokens=False)]  # noqa: E731
    # trained on the same text, the plain tokenizer learns whole numbers and multi-character Chinese tokens
    assert "58" in pieces(whole, "7 + 51 = 58.") or " 58" in pieces(whole, "7 + 51 = 58.")
    assert any(len(p) > 1 for p in pieces(whole, "最喜欢红色") if "\ufffd" not in p)
    assert pieces(split, "7 + 51 = 58.") == ["7", " +", " ", "5", "1", " =", " ", "5", "8", "."]
    zh = pieces(split, "最喜欢红色，12岁")
    assert [p for p in zh if p.strip()] == ["最", "喜", "欢", "红", "色", "，", "1", "2", "岁"]
    for text in TEXTS + ["3.14159 and ２０２６ and 一二三"]:
        assert split.decode(split.encode(text, add_special_tokens=False)) == text
    fast, why = load_fast(tmp_path / "split")  # prepare encodes it with tokenizers itself
    assert fast is None and "not GPT-2 byte-level" in why
