"""`minimind import`: MiniMind2-style `.pth` state dicts and Hugging Face directories -> our checkpoints.

The `.pth` files are built here from MiniMind2's key names and shapes (fp16, `_orig_mod.` prefix,
per-expert Linears, lm_head saved beside the tied embedding), not from our own state_dict, so a
naming slip on our side fails. Round trips compare logits in fp32 at atol = rtol = 1e-5.
"""

import pytest
import torch

from minimind.checkpoint import load_checkpoint, save_checkpoint
from minimind.cli import main
from minimind.config import ModelConfig
from minimind.interop.export import export_hf
from minimind.model import MiniMindForCausalLM

TOL = dict(atol=1e-5, rtol=1e-5)
MOE_SET = ["--set", "use_moe=true", "--set", "n_routed_experts=4", "--set", "num_experts_per_tok=2",
           "--set", "n_shared_experts=1"]


def minimind2_state_dict(moe: bool, prefix: str = "_orig_mod.") -> dict[str, torch.Tensor]:
    """What MiniMind2's train scripts save for the tiny shape: D=128, 2 layers, 4 q / 2 kv heads, F=384."""
    d, layers, hq, hk, dh, f, v, e, shared = 128, 2, 4, 2, 32, 384, 6400, 4, 1
    g = torch.Generator().manual_seed(7)
    rnd = lambda *shape: (torch.randn(*shape, generator=g) * 0.05).half()
    sd = {"model.embed_tokens.weight": rnd(v, d), "model.norm.weight": (1 + rnd(d)).half()}
    for i in range(layers):
        p = f"model.layers.{i}."
        sd |= {p + "self_attn.q_proj.weight": rnd(hq * dh, d), p + "self_attn.k_proj.weight": rnd(hk * dh, d),
               p + "self_attn.v_proj.weight": rnd(hk * dh, d), p + "self_attn.o_proj.weight": rnd(d, hq * dh),
               p + "input_layernorm.weight": (1 + rnd(d)).half(),
               p + "post_attention_layernorm.weight": (1 + rnd(d)).half()}
        ffns = [f"mlp.experts.{j}." for j in range(e)] + [f"mlp.shared_experts.{j}." for j in range(shared)]
        if moe:
            sd[p + "mlp.gate.weight"] = rnd(e, d)
        for ffn in ffns if moe else ["mlp."]:
            sd |= {p + ffn + "gate_proj.weight": rnd(f, d), p + ffn + "up_proj.weight": rnd(f, d),
                   p + ffn + "down_proj.weight": rnd(d, f)}
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"]  # tied: both names are in a state_dict
    return {prefix + k: t for k, t in sd.items()}


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_minimind_pth_imports_and_runs(tmp_path, moe, capsys):
    sd = minimind2_state_dict(moe)
    torch.save(sd, tmp_path / "full_sft_128.pth")
    out = tmp_path / "ckpt"
    argv = ["import", "--from", "minimind-pth", str(tmp_path / "full_sft_128.pth"), "--config", "tiny",
            "--out", str(out)] + (MOE_SET if moe else [])
    assert main(argv) == 0, capsys.readouterr().err
    model, _ = load_checkpoint(out, kernels="torch")
    ours = model.state_dict()
    src = lambda k: sd["_orig_mod." + k].float()
    assert torch.equal(ours["model.layers.1.self_attn.k_proj.weight"], src("model.layers.1.self_attn.k_proj.weight"))
    assert torch.equal(ours["lm_head.weight"], src("model.embed_tokens.weight"))
    if moe:
        for j in range(4):  # stacked in index order, down_proj as (E, D, F)
            assert torch.equal(ours["model.layers.0.mlp.experts.gate_proj"][j],
                               src(f"model.layers.0.mlp.experts.{j}.gate_proj.weight"))
            assert torch.equal(ours["model.layers.0.mlp.experts.down_proj"][j],
                               src(f"model.layers.0.mlp.experts.{j}.down_proj.weight"))
        assert torch.equal(ours["model.layers.1.mlp.gate.weight"], src("model.layers.1.mlp.gate.weight"))
    ids = torch.randint(0, 6400, (2, 12))
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (2, 12, 6400) and torch.isfinite(logits).all()


def test_pth_missing_and_unknown_keys_are_named(tmp_path, capsys):
    sd = minimind2_state_dict(moe=False, prefix="")
    del sd["model.layers.1.mlp.up_proj.weight"]
    sd["model.layers.0.mlp.bonus.weight"] = torch.zeros(3)
    torch.save(sd, tmp_path / "m.pth")
    assert main(["import", "--from", "minimind-pth", str(tmp_path / "m.pth"), "--config", "tiny",
                 "--out", str(tmp_path / "ckpt")]) == 2
    err = capsys.readouterr().err
    assert "model.layers.1.mlp.up_proj.weight" in err and "model.layers.0.mlp.bonus.weight" in err
    assert not (tmp_path / "ckpt").exists()


def test_pth_wrong_preset_names_tensor_and_shape(tmp_path, capsys):
    torch.save(minimind2_state_dict(moe=False), tmp_path / "m.pth")
    assert main(["import", "--from", "minimind-pth", str(tmp_path / "m.pth"), "--config", "small",
                 "--out", str(tmp_path / "ckpt")]) == 2
    err = capsys.readouterr().err
    assert "model.embed_tokens.weight (6400, 128)" in err and "(6400, 512)" in err


def test_pth_without_config_and_existing_out_are_usage_errors(tmp_path, capsys):
    torch.save(minimind2_state_dict(moe=False), tmp_path / "m.pth")
    assert main(["import", "--from", "minimind-pth", str(tmp_path / "m.pth"), "--out", str(tmp_path / "c")]) == 2
    assert "--config" in capsys.readouterr().err
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "x").write_text("")
    assert main(["import", "--from", "minimind-pth", str(tmp_path / "m.pth"), "--config", "tiny",
                 "--out", str(tmp_path / "c")]) == 2
    assert "--force" in capsys.readouterr().err


@pytest.mark.parametrize("overrides", [{}, {"qk_norm": True, "tie_word_embeddings": False},
                                       {"use_moe": True, "n_routed_experts": 4, "num_experts_per_tok": 2},
                                       {"use_moe": True, "qk_norm": True}],
                         ids=["llama", "qwen3", "moe", "moe_qk_norm"])
def test_hf_round_trip(tmp_path, overrides, tokenizer_dir):
    config = ModelConfig.from_preset("tiny", [f"{k}={v}" for k, v in overrides.items()], kernels="torch")
    torch.manual_seed(3)
    model = MiniMindForCausalLM(config).eval()
    hf_dir = export_hf(save_checkpoint(tmp_path / "ckpt", model, tokenizer_dir=tokenizer_dir), tmp_path / "hf")
    assert main(["import", "--from", "hf", str(hf_dir), "--out", str(tmp_path / "back")]) == 0
    back, _ = load_checkpoint(tmp_path / "back", kernels="torch")
    assert back.config.to_dict() == config.to_dict()
    assert (tmp_path / "back" / "tokenizer.json").is_file()
    ids = torch.randint(0, config.vocab_size, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, **TOL)


def test_import_stock_transformers_llama(tmp_path):
    """A directory written by transformers itself (not by our exporter) imports with equal logits."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                                   max_position_embeddings=128, rope_parameters={"rope_type": "default",
                                                                                 "rope_theta": 5e5})
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    assert main(["import", "--from", "hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt")]) == 0
    ours, _ = load_checkpoint(tmp_path / "ckpt", kernels="torch")
    assert ours.config.rope_theta == 5e5 and not ours.config.tie_word_embeddings
    ids = torch.randint(0, 512, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, **TOL)


def test_hf_unsupported_config_is_named(tmp_path, capsys):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text('{"model_type": "llama", "hidden_act": "gelu", "hidden_size": 64}')
    assert main(["import", "--from", "hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt")]) == 2
    err = capsys.readouterr().err
    assert "config.json" in err and "hidden_act" in err


def test_hf_truncated_weights_are_named(tmp_path, capsys):
    model = MiniMindForCausalLM(ModelConfig.from_preset("tiny", kernels="torch"))
    hf_dir = export_hf(save_checkpoint(tmp_path / "ckpt", model), tmp_path / "hf")
    weights = hf_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert main(["import", "--from", "hf", str(hf_dir), "--out", str(tmp_path / "back")]) == 2
    assert "model.safetensors" in capsys.readouterr().err and not (tmp_path / "back").exists()
