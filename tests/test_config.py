"""ModelConfig, presets and overrides."""

import json

import pytest
import torch

from minimind.config import PRESETS, ModelConfig, parse_overrides
from minimind.model import MiniMindForCausalLM

# The seed README's table: MiniMind2-Small 26M (25.8M in its text), MiniMind2 104M, MiniMind2-MoE 145M.
SEED_PARAMS = {"small": 25.8e6, "base": 104e6, "moe": 145e6}


@pytest.mark.parametrize("preset", sorted(SEED_PARAMS))
def test_preset_parameter_counts_match_the_seed(preset):
    with torch.device("meta"):
        model = MiniMindForCausalLM(ModelConfig.from_preset(preset))
    assert model.num_params() == pytest.approx(SEED_PARAMS[preset], rel=0.03)


def test_tiny_is_about_a_million():
    model = MiniMindForCausalLM(ModelConfig.from_preset("tiny"))
    assert 0.5e6 < model.num_params() < 2e6


def test_small_shape_is_minimind2_small():
    c = ModelConfig.from_preset("small")
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (512, 8, 8, 2)
    assert (c.vocab_size, c.rope_theta, c.intermediate_size, c.head_dim) == (6400, 1e6, 1408, 64)


def test_moe_active_params_count_k_of_e_experts():
    c = ModelConfig.from_preset("moe")
    with torch.device("meta"):
        m = MiniMindForCausalLM(c)
    per_expert = 3 * c.hidden_size * c.intermediate_size
    assert m.num_params() - m.num_params(active=True) == c.num_hidden_layers * 2 * per_expert


def test_overrides_are_type_checked():
    assert parse_overrides(["hidden_size=256", "qk_norm=true", "rope_theta=1e4", "dim=64"]) == {
        "hidden_size": 64, "qk_norm": True, "rope_theta": 1e4,
    }
    assert parse_overrides(['rope_scaling={"rope_type": "yarn", "factor": 2}'])["rope_scaling"]["factor"] == 2
    assert parse_overrides(["intermediate_size=none"]) == {"intermediate_size": None}
    with pytest.raises(ValueError, match="hidden_size"):
        parse_overrides(["hidden_size=big"])
    with pytest.raises(ValueError, match="unknown field"):
        parse_overrides(["nope=1"])
    with pytest.raises(ValueError, match="FIELD=VALUE"):
        parse_overrides(["hidden_size"])


def test_invalid_shapes_are_rejected():
    with pytest.raises(ValueError, match="num_key_value_heads"):
        ModelConfig(num_attention_heads=8, num_key_value_heads=3)
    with pytest.raises(ValueError, match="kernels"):
        ModelConfig(kernels="cuda")
    with pytest.raises(ValueError, match="unknown preset"):
        ModelConfig.from_preset("huge")


def test_kernels_is_a_runtime_choice_not_saved(tmp_path):
    c = ModelConfig.from_preset("tiny", kernels="torch")
    c.save(tmp_path / "config.json")
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "kernels" not in saved and "head_dim" not in saved
    again = ModelConfig.from_dict(saved)
    assert again.kernels == "auto"
    assert again.to_dict() == c.to_dict()


def test_minimind_names_are_accepted():
    c = ModelConfig.from_dict({"dim": 256, "n_layers": 3, "n_heads": 4, "n_kv_heads": 1})
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (256, 3, 4, 1)


def test_every_preset_builds():
    for name in PRESETS:
        with torch.device("meta"):
            MiniMindForCausalLM(ModelConfig.from_preset(name))
