"""LoRA adapters: only adapters train, merge == unmerged, adapter checkpoints load on their base."""

import pytest
import torch

from minimind.checkpoint import CheckpointError, atomic_dir, load_checkpoint, save_checkpoint, write_adapter
from minimind.config import ModelConfig
from minimind.lora import (
    LoRALinear,
    apply_lora,
    lora_state_dict,
    merge_lora,
    strip_lora,
    unmerge_lora,
)
from minimind.model import MiniMindForCausalLM


def tiny(*overrides):
    return MiniMindForCausalLM(ModelConfig.from_preset("tiny", list(overrides), kernels="torch"))


def _perturb(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(std=0.05)


@pytest.mark.parametrize("moe", [False, True])
def test_only_adapters_train_and_merge_equals_unmerged(moe):
    model = tiny(f"use_moe={moe}")
    wrapped = apply_lora(model, rank=4, alpha=8)
    assert any(name.endswith("self_attn.q_proj") for name in wrapped)
    assert all(".lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    ids = torch.randint(0, 6400, (2, 8))
    model.eval()
    base_logits = model(ids).logits
    _perturb(model)
    unmerged = model(ids).logits
    assert not torch.allclose(unmerged, base_logits)
    merge_lora(model)
    torch.testing.assert_close(model(ids).logits, unmerged, rtol=1e-4, atol=1e-5)
    unmerge_lora(model)
    torch.testing.assert_close(model(ids).logits, unmerged, rtol=1e-5, atol=1e-6)
    strip_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    torch.testing.assert_close(model(ids).logits, unmerged, rtol=1e-4, atol=1e-5)


def test_a_fresh_adapter_changes_nothing():
    model = tiny().eval()
    ids = torch.randint(0, 6400, (1, 6))
    before = model(ids).logits
    apply_lora(model, rank=2, alpha=4)
    assert torch.equal(model(ids).logits, before)


def test_adapter_checkpoint_round_trip(tmp_path):
    base = tiny()
    save_checkpoint(tmp_path / "base", base)
    apply_lora(base, rank=4, alpha=8, targets=("q_proj", "v_proj"))
    _perturb(base)
    targets = ("q_proj", "v_proj")
    atomic_dir(tmp_path / "adapter", lambda d: write_adapter(d, base, tmp_path / "base", targets, 4, 8, 0))
    assert all(".q_proj." in k or ".v_proj." in k for k in lora_state_dict(base))
    ids = torch.randint(0, 6400, (1, 7))
    want = base.eval()(ids).logits
    loaded, path = load_checkpoint(tmp_path / "adapter")
    assert path == tmp_path / "adapter"
    torch.testing.assert_close(loaded(ids).logits, want, rtol=1e-4, atol=1e-5)
    again, _ = load_checkpoint(tmp_path / "base", lora=tmp_path / "adapter", merge_lora=False)
    torch.testing.assert_close(again(ids).logits, want, rtol=1e-5, atol=1e-6)


def test_adapter_on_a_different_base_is_refused(tmp_path):
    base = tiny()
    save_checkpoint(tmp_path / "base", base)
    apply_lora(base, rank=2, alpha=2, targets=("q_proj",))
    atomic_dir(tmp_path / "adapter", lambda d: write_adapter(d, base, tmp_path / "base", ("q_proj",), 2, 2, 0))
    save_checkpoint(tmp_path / "other", tiny())
    with pytest.raises(CheckpointError, match="different base"):
        load_checkpoint(tmp_path / "other", lora=tmp_path / "adapter")
