"""prepare's tiktoken encoder gives exactly tokenizers' ids, or is not used (minimind/data/fastbpe.py)."""

import json
import random

import pytest

from minimind.data import prepare as prepare_module
from minimind.data.fastbpe import load_fast
from minimind.data.prepare import prepare

pytest.importorskip("tiktoken")


@pytest.fixture(params=["ours", "minimind"])
def tok_dir(request, tokenizer_dir, shared_dir):
    return tokenizer_dir if request.param == "ours" else shared_dir / "minimind_tokenizer"


def _every_code_point_in_context(seed=0, per_text=256):
    """Every Unicode scalar value once, in runs mixed with whitespace, digits, contractions and added tokens."""
    rng = random.Random(seed)
    glue = [" ", "  ", "\n", "\n\n", " \n", "\t", "\r\n", "'s", "'ll ", "1", " 12", "a", " ab", "中文", "\u3000",
            "\u00a0", "\u2028", "\x85", "\x0b", "<|im_end|>", "<|im_start|>user\n", "<think>", "</answer>", "😀"]
    chars = [chr(c) for c in range(0x110000) if not 0xD800 <= c < 0xE000]
    return ["".join(c + (rng.choice(glue) if rng.random() < 0.3 else "") for c in chars[i:i + per_text])
            for i in range(0, len(chars), per_text)]


def test_same_ids_as_tokenizers_on_every_code_point(tok_dir):
    from tokenizers import Tokenizer

    fast, why = load_fast(tok_dir)
    assert fast is not None, why
    texts = _every_code_point_in_context()
    ref = Tokenizer.from_file(str(tok_dir / "tokenizer.json")).encode_batch(texts, add_special_tokens=False)
    mismatches = [i for i, (t, e) in enumerate(zip(texts, ref)) if fast.encode(t) != e.ids]
    assert not mismatches, f"{len(mismatches)} of {len(texts)} differ, first near code point {mismatches[0] * 256:#x}"
    # byte lengths: a text's token byte lengths sum to its UTF-8 length
    assert all(sum(fast.byte_len[i] for i in e.ids) == len(t.encode()) for t, e in zip(texts, ref))


@pytest.mark.parametrize("stage,file", [("pretrain", "pretrain"), ("sft", "sft"), ("reason", "reason"),
                                        ("dpo", "dpo"), ("grpo", "rlaif"), ("lora", "lora_identity")])
def test_prepared_files_equal_tokenizers_path(tmp_path, tok_dir, synth_dir, stage, file):
    src = synth_dir / f"{file}.jsonl"
    fast = prepare(stage, src, tok_dir, tmp_path / "fast", workers=1, progress=False)
    slow = prepare(stage, src, tok_dir, tmp_path / "slow", workers=1, progress=False, fast=False)
    assert json.loads((fast / "meta.json").read_text())["encoder"] == "tiktoken"
    assert json.loads((slow / "meta.json").read_text())["encoder"] == "tokenizers"
    names = sorted(p.name for p in slow.iterdir() if p.name != "meta.json")
    assert names == sorted(p.name for p in fast.iterdir() if p.name != "meta.json")
    for name in names:
        assert (fast / name).read_bytes() == (slow / name).read_bytes(), name


def _edited(tokenizer_dir, tmp_path, edit):
    spec = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    edit(spec)
    out = tmp_path / "edited"
    out.mkdir()
    (out / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    return out


def _swap_two_merges(spec):
    merges = spec["model"]["merges"]
    merges[10], merges[11] = merges[11], merges[10]


@pytest.mark.parametrize("edit,reason", [
    (lambda s: s.update(normalizer={"type": "NFC"}), "normalizer"),
    (lambda s: s["model"].update(dropout=0.1), "plain BPE"),
    (lambda s: s["pre_tokenizer"].update(add_prefix_space=True), "byte-level"),
    (_swap_two_merges, "merge order"),
    (lambda s: s["model"]["merges"].pop(), "no merge produces"),
    (lambda s: s["added_tokens"][0].update(lstrip=True), "strips"),
])
def test_refuses_tokenizers_it_cannot_match(tmp_path, tokenizer_dir, edit, reason):
    fast, why = load_fast(_edited(tokenizer_dir, tmp_path, edit))
    assert fast is None and reason in why


def test_a_disagreeing_fast_encoder_falls_back_to_tokenizers(tmp_path, tokenizer_dir, synth_dir, capsys, monkeypatch):
    src = synth_dir / "sft.jsonl"
    slow = prepare("sft", src, tokenizer_dir, tmp_path / "slow", workers=1, progress=False, fast=False)
    prepare_module._encoder.cache_clear()
    enc = prepare_module._encoder("sft", str(tokenizer_dir.resolve()), 512, 10.0, True, "minimind")  # prepare's key
    real = enc.fast.encode
    monkeypatch.setattr(enc.fast, "encode", lambda text: real(text)[::-1])  # wrong ids
    try:
        out = prepare("sft", src, tokenizer_dir, tmp_path / "fell_back", workers=1, progress=False)
    finally:
        prepare_module._encoder.cache_clear()
    assert "using tokenizers" in capsys.readouterr().err
    assert json.loads((out / "meta.json").read_text())["encoder"] == "tokenizers"
    for name in ("tokens.bin", "offsets.bin", "weights.bin"):
        assert (out / name).read_bytes() == (slow / name).read_bytes()
