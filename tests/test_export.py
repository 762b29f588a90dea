"""`minimind export --format hf`: stock transformers loads the directory and reproduces our logits.

Dense variants load as LlamaForCausalLM / Qwen3ForCausalLM without trust_remote_code; MoE loads
with it. Logits are compared in fp32 at atol = rtol = 1e-5 (measured max difference ~5e-7 on logits
of magnitude ~2.5: SDPA on both sides, RoPE tables in fp64 here and fp32 in transformers).
"""

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from minimind.checkpoint import atomic_dir, save_checkpoint, write_adapter
from minimind.cli import main
from minimind.config import PRESETS, ModelConfig
from minimind.interop.export import export_hf
from minimind.lora import apply_lora
from minimind.model import MiniMindForCausalLM
from tests.conftest import ROOT

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM  # noqa: E402

TOL = dict(atol=1e-5, rtol=1e-5)
YARN = {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
        "max_position_embeddings": 256}
MOE = {"use_moe": True, "n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1}
VARIANTS = {
    "dense": ({}, "LlamaForCausalLM"),
    "untied": ({"tie_word_embeddings": False}, "LlamaForCausalLM"),
    "qk_norm": ({"qk_norm": True}, "Qwen3ForCausalLM"),
    "yarn": (YARN, "LlamaForCausalLM"),
    "moe": (MOE, "MiniMindMoEForCausalLM"),
    "moe_qk_norm": ({**MOE, "qk_norm": True}, "MiniMindMoEForCausalLM"),
}


def tiny_model(seed=0, **overrides) -> MiniMindForCausalLM:
    torch.manual_seed(seed)
    config = ModelConfig.from_dict({**PRESETS["tiny"], **overrides}, kernels="torch")
    return MiniMindForCausalLM(config).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name -> (our model, exported dir), one checkpoint per variant, saved and exported once."""
    root = tmp_path_factory.mktemp("export")
    out = {}
    for name, (overrides, _) in VARIANTS.items():
        model = tiny_model(**overrides)
        ckpt = save_checkpoint(root / name / "ckpt", model)
        out[name] = (model, export_hf(ckpt, root / name / "hf"))
    return out


def load_hf(path, remote=False):
    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=remote, dtype=torch.float32).eval()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_stock_transformers_logits_equal_ours(exported, name):
    model, out = exported[name]
    hf = load_hf(out, remote=name.startswith("moe"))
    assert type(hf).__name__ == VARIANTS[name][1]
    ids = torch.randint(0, model.config.vocab_size, (2, 200 if name == "yarn" else 24))
    with torch.no_grad():
        ours, theirs = model(ids).logits, hf(ids).logits
    torch.testing.assert_close(theirs, ours, **TOL)


def test_yarn_is_really_applied(exported):
    """The yarn export must differ from plain RoPE by far more than the tolerance, or the test above checks nothing."""
    model, out = exported["yarn"]
    hf = load_hf(out)
    assert hf.config.rope_parameters["rope_type"] == "yarn"
    plain = tiny_model(**{**YARN, "rope_scaling": None})
    ids = torch.randint(0, model.config.vocab_size, (1, 200))
    with torch.no_grad():
        gap = (plain(ids).logits - hf(ids).logits).abs().max().item()
    assert gap > 100 * TOL["atol"]


def test_config_json_fields(exported):
    model, out = exported["dense"]
    cfg = json.loads((out / "config.json").read_text())
    c = model.config
    assert cfg["architectures"] == ["LlamaForCausalLM"] and "auto_map" not in cfg
    assert cfg["rope_theta"] == c.rope_theta == cfg["rope_parameters"]["rope_theta"]
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (c.num_attention_heads, c.num_key_value_heads)
    assert cfg["tie_word_embeddings"] is True and cfg["rms_norm_eps"] == c.rms_norm_eps
    moe = json.loads((exported["moe"][1] / "config.json").read_text())
    assert moe["auto_map"]["AutoModelForCausalLM"] == "modeling_minimind_moe.MiniMindMoEForCausalLM"
    assert (exported["moe"][1] / "modeling_minimind_moe.py").is_file()


def _greedy_full_forward(model, ids, n):
    for _ in range(n):
        with torch.no_grad():
            nxt = model(ids).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids


def _truncate_at(tokens: list[int], stop: frozenset) -> list[int]:
    for i, t in enumerate(tokens):
        if t in stop:
            return tokens[: i + 1]  # the engine keeps the stop token that ended a sequence
    return tokens


@pytest.mark.parametrize("name", ["dense", "moe"])
def test_transformers_generate_equals_our_greedy(exported, name, tokenizer_dir):
    """Greedy tokens: transformers' generate == argmax over our full forwards == our engine (KV cache)."""
    model, out = exported[name]
    hf = load_hf(out, remote=name == "moe")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = torch.randint(3, len(tokenizer), (2, 6))  # ids the tokenizer knows: the engine checks them
    theirs = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                         pad_token_id=0)  # the export has no tokenizer, so no eos: all 12 tokens come
    assert theirs.shape == (2, 18)
    assert torch.equal(theirs, _greedy_full_forward(model, ids, 12))
    if importlib.util.find_spec("infer.engine") is None:
        pytest.skip("infer.engine not available: compared with full-forward greedy only")
    from infer.engine import Engine, SamplingParams

    engine = Engine(model, tokenizer)
    done = engine.generate(ids.tolist(), SamplingParams(max_new_tokens=12, temperature=0))
    for row, completion in zip(theirs[:, 6:].tolist(), done):
        assert list(completion.token_ids) == _truncate_at(row, engine.end_ids)


def test_export_needs_force_for_non_empty_dir(exported, tmp_path, capsys):
    model, _ = exported["dense"]
    ckpt = save_checkpoint(tmp_path / "ckpt", model)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user file")
    assert main(["export", "--ckpt", str(ckpt), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "--force" in err and (out / "keep.txt").exists()
    assert main(["export", "--ckpt", str(ckpt), "--out", str(out), "--force"]) == 0
    assert (out / "keep.txt").read_text() == "user file" and (out / "model.safetensors").is_file()


@pytest.fixture(scope="module")
def lora_ckpt(tmp_path_factory):
    """(our model with a trained-looking adapter, LoRA checkpoint dir)."""
    root = tmp_path_factory.mktemp("lora")
    base_ckpt = save_checkpoint(root / "base", tiny_model())
    model = tiny_model()
    apply_lora(model, rank=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(std=0.05)  # a fresh adapter is the identity: give it something to carry
    atomic_dir(root / "adapter", lambda tmp: write_adapter(tmp, model, base_ckpt, ("q_proj", "v_proj", "down_proj"),
                                                           rank=4, alpha=8.0, dropout=0.0))
    return model.eval(), root / "adapter"


def test_lora_exports_merged(lora_ckpt, tmp_path):
    model, adapter = lora_ckpt
    out = export_hf(adapter, tmp_path / "hf")
    hf = load_hf(out)
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    with torch.no_grad():
        ours, theirs = model(ids).logits, hf(ids).logits
    torch.testing.assert_close(theirs, ours, **TOL)
    plain = tiny_model()
    with torch.no_grad():
        assert (plain(ids).logits - ours).abs().max() > 100 * TOL["atol"]  # the adapter matters


def test_lora_exports_as_peft_adapter(lora_ckpt, tmp_path):
    peft = pytest.importorskip("peft")
    model, adapter = lora_ckpt
    out = export_hf(adapter, tmp_path / "hf", lora_format="peft")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4
    hf = peft.PeftModel.from_pretrained(load_hf(out / "base"), out).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids).logits, **TOL)


def test_peft_format_needs_a_lora_checkpoint(exported, tmp_path, capsys):
    ckpt = save_checkpoint(tmp_path / "ckpt", exported["dense"][0])
    assert main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "out"), "--lora-format", "peft"]) == 2
    assert "not a LoRA checkpoint" in capsys.readouterr().err


def test_tokenizer_and_generation_config_exported(tiny_ckpt, tmp_path):
    out = export_hf(tiny_ckpt, tmp_path / "hf")
    tok = transformers.AutoTokenizer.from_pretrained(out)
    cfg = json.loads((out / "config.json").read_text())
    gen = json.loads((out / "generation_config.json").read_text())
    assert cfg["eos_token_id"] == tok.eos_token_id == gen["eos_token_id"] is not None
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert "hi" in text and text.rstrip().endswith("assistant")  # the template ran, with a generation prompt


@pytest.mark.parametrize("where", ["repository root", "another directory"])
def test_export_then_stock_from_pretrained_from_anywhere(where, tiny_ckpt, tmp_path):
    """The console script exports and stock transformers loads the result, in fresh processes started in
    the repository root (where `kernels` was once ours) and elsewhere (Fresh-install issue)."""
    cwd = ROOT if where == "repository root" else tmp_path
    script = ROOT / ".venv" / "bin" / "minimind"
    export = [str(script)] if script.exists() else [sys.executable, "-m", "minimind.cli"]
    out = tmp_path / "hf"
    done = subprocess.run([*export, "export", "--ckpt", str(tiny_ckpt), "--out", str(out)],
                          capture_output=True, text=True, cwd=cwd, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    load = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        "model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)\n"
        "print(type(model).__name__, tuple(model(torch.tensor([[1, 2, 3]])).logits.shape))\n"
    )
    done = subprocess.run([sys.executable, "-c", load, str(out)], capture_output=True, text=True, cwd=cwd, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    vocab = json.loads((tiny_ckpt / "config.json").read_text())["vocab_size"]
    assert done.stdout.split() == ["LlamaForCausalLM", "(1,", "3,", f"{vocab})"]
