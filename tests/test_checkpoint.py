"""Checkpoint directories: exact round trip, atomic writes, run-dir resolution, clear errors."""

import json
import os

import pytest
import torch

from minimind.checkpoint import (
    CheckpointError,
    atomic_dir,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)
from minimind.config import ModelConfig
from minimind.model import MiniMindForCausalLM


def tiny(*overrides):
    return MiniMindForCausalLM(ModelConfig.from_preset("tiny", list(overrides)))


@pytest.mark.parametrize("overrides", [[], ["use_moe=true"], ["tie_word_embeddings=false", "qk_norm=true"]])
def test_round_trip_is_bitwise_equal(tmp_path, overrides):
    model = tiny(*overrides)
    save_checkpoint(tmp_path / "ck", model)
    loaded, path = load_checkpoint(tmp_path / "ck")
    assert path == tmp_path / "ck"
    assert loaded.config.to_dict() == model.config.to_dict()
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    ids = torch.randint(0, 6400, (2, 9))
    with torch.no_grad():
        assert torch.equal(model.eval()(ids).logits, loaded(ids).logits)


def test_parameter_names_follow_hugging_face_llama(tmp_path):
    from safetensors import safe_open

    save_checkpoint(tmp_path / "ck", tiny())
    with safe_open(tmp_path / "ck" / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    for name in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.0.self_attn.q_proj.weight",
                 "model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.v_proj.weight",
                 "model.layers.0.self_attn.o_proj.weight", "model.layers.1.mlp.gate_proj.weight",
                 "model.layers.1.mlp.up_proj.weight", "model.layers.1.mlp.down_proj.weight",
                 "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight"):
        assert name in keys, name
    assert "lm_head.weight" not in keys  # tied


def test_tokenizer_files_are_copied(tmp_path, shared_dir):
    save_checkpoint(tmp_path / "ck", tiny(), tokenizer_dir=shared_dir / "minimind_tokenizer")
    src = shared_dir / "minimind_tokenizer" / "tokenizer.json"
    assert (tmp_path / "ck" / "tokenizer.json").read_bytes() == src.read_bytes()
    assert (tmp_path / "ck" / "tokenizer_config.json").exists()


def test_truncated_weights_name_the_file(tmp_path):
    save_checkpoint(tmp_path / "ck", tiny())
    weights = tmp_path / "ck" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated or corrupt"):
        load_checkpoint(tmp_path / "ck")
    weights.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        load_checkpoint(tmp_path / "ck")


def test_corrupt_config_names_the_file(tmp_path):
    save_checkpoint(tmp_path / "ck", tiny())
    config = tmp_path / "ck" / "config.json"
    config.write_text('{"hidden_size": 128,')
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        load_checkpoint(tmp_path / "ck")
    config.write_text(json.dumps({"hidden_size": 128, "n_wings": 2}))
    with pytest.raises(CheckpointError, match=r"config\.json: unknown model config field.*n_wings"):
        load_checkpoint(tmp_path / "ck")


def test_mismatched_architecture_names_tensors(tmp_path):
    save_checkpoint(tmp_path / "ck", tiny())
    config = tmp_path / "ck" / "config.json"
    d = json.loads(config.read_text())
    d["num_hidden_layers"] = 3
    config.write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match=r"missing .*model\.layers\.2\."):
        load_checkpoint(tmp_path / "ck")
    d["num_hidden_layers"], d["hidden_size"] = 2, 256
    config.write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match=r"shape"):
        load_checkpoint(tmp_path / "ck")


def test_missing_files_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither a checkpoint"):
        load_checkpoint(tmp_path / "empty")
    save_checkpoint(tmp_path / "ck", tiny())
    os.remove(tmp_path / "ck" / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: missing"):
        load_checkpoint(tmp_path / "ck")


def test_run_dir_resolves_to_newest_complete_step(tmp_path):
    run = tmp_path / "run"
    for step in (9, 10, 2):
        save_checkpoint(run / f"step-{step}", tiny())
    (run / "step-11").mkdir()  # incomplete: no files
    (run / ".tmp-step-12-abc").mkdir()
    assert resolve_checkpoint(run) == run / "step-10"  # numeric, not lexicographic order
    model, path = load_checkpoint(run)
    assert path == run / "step-10"


def test_failed_write_leaves_no_directory_and_keeps_the_old_one(tmp_path):
    model = tiny()
    save_checkpoint(tmp_path / "ck", model)
    before = (tmp_path / "ck" / "model.safetensors").read_bytes()

    def boom(tmp):
        (tmp / "half").write_text("x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_dir(tmp_path / "ck", boom)
    with pytest.raises(KeyboardInterrupt):
        atomic_dir(tmp_path / "new", boom)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    assert (tmp_path / "ck" / "model.safetensors").read_bytes() == before
    # overwrite replaces whole
    save_checkpoint(tmp_path / "ck", tiny("dropout=0.1"))
    assert json.loads((tmp_path / "ck" / "config.json").read_text())["dropout"] == 0.1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_kernels_override_at_load(tmp_path):
    save_checkpoint(tmp_path / "ck", tiny())
    model, _ = load_checkpoint(tmp_path / "ck", kernels="torch")
    assert model.ops.name == "torch"
