"""`minimind export --format gguf|ollama`, proven by llama.cpp itself (llama-cpp-python loads the file):
its tokenizer splits a mixed zh/en/digits/emoji text into our token ids, its logits at the first
positions equal ours (f32 to 1e-3; f16, bf16 and q8_0 to the tolerances below) for `tiny`, a
`small`-shaped model and a QK-norm model; the chat template and special ids ride along; tokenizers and
models llama.cpp cannot reproduce are refused by name."""

import json

import numpy as np
import pytest
import torch

from minimind.checkpoint import save_checkpoint
from minimind.cli import main as cli_main
from minimind.config import ModelConfig
from minimind.data.tokenizer import load_tokenizer, train_tokenizer
from minimind.interop.gguf_export import GGUFExportError, export_gguf, read_vocab
from minimind.model import MiniMindForCausalLM

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (the lock's gguf group) is not installed")

MIXED = "Hello, 世界! 我有1234567个苹果 and 42.50 apples 🍎🚀 — naïve café\n\n  tabs\tend 2026年12月8日"
# f32: absolute (measured 2e-5). The others relative to the largest |logit| (~40 here): llama.cpp rounds
# the weights (f16: 11 bits, bf16: 8, q8_0: 8 bits per block of 32) and also the activations it
# multiplies them with (to f16, or to q8_0). Measured at most: f32 9e-5 absolute, f16 8.5e-4, bf16 7.1e-3,
# q8_0 2.4e-2 (BENCHMARKS.md, "GGUF export")
TOLERANCE = {"f32": 1e-3, "f16": 2e-3, "bf16": 2e-2, "q8_0": 5e-2}


def random_model(preset: str, *overrides: str, seed: int = 0) -> MiniMindForCausalLM:
    """Weights wide enough that the logits differ from position to position (the standard init gives
    near-uniform ones, which would hide a wrong RoPE), with each product's gain a little under 1 (std
    0.9/sqrt(fan-in)), as a trained model's are: a deeper net of gains above 1 amplifies the rounding of
    the quantized formats layer by layer, which a trained model does not."""
    torch.manual_seed(seed)
    model = MiniMindForCausalLM(ModelConfig.from_preset(preset, list(overrides), kernels="torch"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.5 if "embed" in name else 0.9 / p.shape[1] ** 0.5)
    return model.eval()


def ours(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().numpy()


def llama(path, **kw):
    return llama_cpp.Llama(model_path=str(path), verbose=False, n_threads=2, **kw)


def theirs(path, ids) -> np.ndarray:
    llm = llama(path, n_ctx=64, logits_all=True, type_k=0, type_v=0)  # an f32 KV cache (f16 by default)
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float64)


@pytest.fixture(scope="module")
def minimind2_tokenizer(shared_dir_module):
    return shared_dir_module / "minimind_tokenizer"


@pytest.fixture(scope="module")
def shared_dir_module():
    from tests.conftest import ROOT

    shared = ROOT.parent / "shared"
    if not (shared / "minimind_tokenizer").is_dir():
        pytest.skip("../shared/minimind_tokenizer is absent")
    return shared


@pytest.fixture(scope="module")
def digits_tokenizer(synth_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok-digits")
    return train_tokenizer([synth_dir / "pretrain.jsonl"], vocab_size=1000, out=out, split_digits=True)


def checkpoint(tmp_path, model, tokenizer):
    return save_checkpoint(tmp_path / "run" / "step-1", model, tokenizer_dir=tokenizer)


@pytest.mark.parametrize("which", ["minimind2", "ours", "ours_split_digits"])
def test_llama_cpp_tokenizes_the_mixed_text_into_our_ids(which, minimind2_tokenizer, tokenizer_dir, digits_tokenizer,
                                                          tmp_path):
    tokenizer = {"minimind2": minimind2_tokenizer, "ours": tokenizer_dir, "ours_split_digits": digits_tokenizer}[which]
    tok = load_tokenizer(tokenizer)
    model = random_model("tiny", f"vocab_size={len(tok)}")
    out = export_gguf(checkpoint(tmp_path, model, tokenizer), tmp_path / "m.gguf", outtype="f32")
    llm = llama(out, vocab_only=True)
    for text in (MIXED, " leading space", "x" * 3 + " 000 1 22 333 4444"):
        assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=False) == tok.encode(text), text
    # special tokens parse as one id each when asked to, as our chat template relies on
    chat = "<|im_start|>user\nhi<|im_end|>\n"
    assert llm.tokenize(chat.encode(), add_bos=False, special=True) == tok.encode(chat)


def test_a_cjk_splitting_tokenizer_is_refused_by_name(synth_dir, tmp_path):
    tokenizer = train_tokenizer([synth_dir / "pretrain.jsonl"], vocab_size=1000, out=tmp_path / "tok", split_cjk=True)
    with pytest.raises(GGUFExportError, match="--split-cjk"):
        read_vocab(tokenizer, 1000)


@pytest.mark.parametrize("preset, overrides", [
    ("tiny", ()),
    ("small", ()),  # small-shaped: 8 heads over 2 KV heads, 64-dim heads, 8 layers
    ("tiny", ("qk_norm=true", "tie_word_embeddings=false")),  # llama.cpp's qwen3
])
@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16", "q8_0"])
def test_llama_cpp_logits_equal_ours(preset, overrides, outtype, tokenizer_dir, tmp_path):
    tok = load_tokenizer(tokenizer_dir)
    model = random_model(preset, f"vocab_size={len(tok)}", *overrides)
    out = export_gguf(checkpoint(tmp_path, model, tokenizer_dir), tmp_path / "m.gguf", outtype=outtype)
    ids = tok.encode("The capital of Ada's town is north of the river; 3 plus 4 is 7.")[:24]
    want, got = ours(model, ids), theirs(out, ids)
    err = np.abs(got - want).max() / (1.0 if outtype == "f32" else np.abs(want).max())
    assert err < TOLERANCE[outtype], f"max |logit difference| {err:.2e}"
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= (1.0 if outtype == "f32" else 0.9)  # rounding flips near-ties


def test_metadata_carries_the_chat_template_and_special_ids(minimind2_tokenizer, tmp_path):
    import gguf

    tok = load_tokenizer(minimind2_tokenizer)
    out = export_gguf(checkpoint(tmp_path, random_model("tiny"), minimind2_tokenizer), tmp_path / "m.gguf")
    reader = gguf.GGUFReader(out)

    def field(key):
        f = reader.fields[key]
        return f.contents()

    config = json.loads((minimind2_tokenizer / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert field("tokenizer.chat_template") == config["chat_template"]
    assert field("tokenizer.ggml.eos_token_id") == tok.convert_tokens_to_ids("<|im_end|>")
    assert field("tokenizer.ggml.pre") == "gpt-2" and field("general.architecture") == "llama"
    # and llama.cpp answers a chat through that template, stopping at <|im_end|>
    llm = llama(out, n_ctx=128)
    reply = llm.create_chat_completion([{"role": "user", "content": "hi"}], max_tokens=4, temperature=0)
    assert reply["choices"][0]["finish_reason"] in ("stop", "length")


def test_moe_and_bad_outputs_are_refused_by_name(tokenizer_dir, tmp_path):
    moe = random_model("tiny", "use_moe=true")
    ckpt = checkpoint(tmp_path, moe, tokenizer_dir)
    with pytest.raises(GGUFExportError, match="MoE"):
        export_gguf(ckpt, tmp_path / "moe.gguf")
    assert not (tmp_path / "moe.gguf").exists()
    with pytest.raises(GGUFExportError, match="NAME.gguf"):
        export_gguf(ckpt, tmp_path / "out_dir")


def test_the_cli_writes_gguf_and_an_ollama_directory(tokenizer_dir, tmp_path, capsys):
    tok = load_tokenizer(tokenizer_dir)
    model = random_model("tiny", f"vocab_size={len(tok)}")
    ckpt = checkpoint(tmp_path, model, tokenizer_dir)
    assert cli_main(["export", "--ckpt", str(ckpt), "--format", "gguf", "--outtype", "q8_0",
                     "--out", str(tmp_path / "m.gguf")]) == 0
    assert cli_main(["export", "--ckpt", str(ckpt), "--format", "gguf", "--out", str(tmp_path / "m.gguf")]) == 2
    assert "--force" in capsys.readouterr().err  # an existing file is not overwritten without it
    assert cli_main(["export", "--ckpt", str(ckpt), "--format", "ollama", "--out", str(tmp_path / "ollama")]) == 0
    modelfile = (tmp_path / "ollama" / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./model.gguf") and 'PARAMETER stop "<|im_end|>"' in modelfile
    ids = tok.encode("3 plus 4 is 7")
    want = ours(model, ids)
    got = theirs(tmp_path / "ollama" / "model.gguf", ids)
    assert np.abs(got - want).max() < TOLERANCE["f16"] * np.abs(want).max()


@pytest.mark.parametrize("which", ["minimind2", "ours_padded"])
def test_greedy_chat_generation_equals_our_engines(which, minimind2_tokenizer, tokenizer_dir, tmp_path):
    """32 greedy tokens after a chat prompt, f32: llama.cpp's and our engine's are the same tokens. With
    our synthetic tokenizer the model's 6,400 rows outnumber its tokens: the rest are written unused."""
    from infer.engine import Engine
    from infer.sampling import SamplingParams
    from tests.test_server import wide_checkpoint  # its greedy output depends on the whole prompt

    tokenizer = minimind2_tokenizer if which == "minimind2" else tokenizer_dir
    assert which == "minimind2" or len(load_tokenizer(tokenizer)) < 6400
    ckpt = wide_checkpoint(tmp_path / "run" / "step-1", tokenizer)
    out = export_gguf(ckpt, tmp_path / "m.gguf", outtype="f32")
    engine = Engine.from_checkpoint(ckpt, max_batch=1, max_len=128)
    prompt = engine.encode_chat([{"role": "user", "content": "What is 3 plus 4?"}])
    ours_ids = engine.generate([prompt], SamplingParams(max_new_tokens=32, temperature=0.0, ignore_eos=True))[0]
    llm = llama(out, n_ctx=128, logits_all=True, type_k=0, type_v=0)
    llm.eval(prompt)
    theirs_ids = []
    for _ in range(32):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        theirs_ids.append(token)
        llm.eval([token])
    assert theirs_ids == ours_ids.token_ids
    assert len(set(theirs_ids)) >= 8  # a reply, not one token repeated


def render_ollama(template: str, system: str | None, messages: list[dict]) -> str:
    """The Go text/template subset our Modelfile's TEMPLATE uses, with Ollama's semantics: `{{- ...}}`
    trims the whitespace before it, `{{ if .System }}`, `{{ range .Messages }}` with `.Role`/`.Content`."""
    import re

    out, stack = [], []
    tokens = re.split(r"({{-?\s*.*?\s*-?}})", template)
    def emit(text):
        if all(stack_entry[0] for stack_entry in stack):
            out.append(text)
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("{{"):
            emit(tok)
            i += 1
            continue
        if tok.startswith("{{-") and out:
            out[-1] = out[-1].rstrip()
        action = tok.strip("{}- ").strip()
        if action == "if .System":
            stack.append((bool(system), "if"))
        elif action == "range .Messages":
            body_start, depth, j = i + 1, 1, i + 1
            while depth:
                a = tokens[j].strip("{}- ").strip() if tokens[j].startswith("{{") else None
                depth += a is not None and (a.startswith("if") or a.startswith("range"))
                depth -= a == "end"
                j += 1
            body = "".join(tokens[body_start:j - 1])
            for m in messages:
                out.append(render_ollama(body.replace("{{ .Role }}", m["role"]).replace("{{ .Content }}", m["content"]),
                                         system, []))
            i = j
            continue
        elif action == "end":
            stack.pop()
        elif action == ".System":
            emit(system or "")
        i += 1
    return "".join(out)


def test_the_ollama_template_renders_our_chat_format(minimind2_tokenizer, tmp_path):
    import re

    from minimind.interop.gguf_export import modelfile

    text = modelfile(minimind2_tokenizer)
    template = re.search(r'TEMPLATE """(.*?)"""', text, re.S).group(1)
    system = json.loads(re.search(r"^SYSTEM (.*)$", text, re.M).group(1))
    tok = load_tokenizer(minimind2_tokenizer)
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
             {"role": "user", "content": "3 plus 4?"}]
    for sys_message in (None, "You are terse."):
        messages = ([{"role": "system", "content": sys_message}] if sys_message else []) + turns
        want = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert render_ollama(template, sys_message or system, turns) == want


def test_an_out_inside_the_checkpoint_or_a_bad_outtype_is_refused(tokenizer_dir, tmp_path):
    from minimind.outputs import OutputError

    ckpt = checkpoint(tmp_path, random_model("tiny"), tokenizer_dir)
    before = sorted(p.name for p in ckpt.iterdir())
    with pytest.raises(OutputError):
        export_gguf(ckpt, ckpt / "model.safetensors.gguf")
    with pytest.raises((OutputError, GGUFExportError)):
        export_gguf(ckpt.parent, ckpt.parent / "x.gguf", outtype="q4_0")
    assert sorted(p.name for p in ckpt.iterdir()) == before
