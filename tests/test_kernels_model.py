"""Model-level golden test: the `tiny` dense and MoE models give the same loss and the same gradient
for every parameter with kernels="torch" and kernels="triton" (interpreter on CPU), and a few AdamW
steps give the same losses. The loss is the one the trainer computes: a weighted fused linear
cross-entropy with reduction="sum" divided by the total weight, plus the MoE aux loss."""

import pytest
import torch

from minimind.config import ModelConfig
from minimind.kernels.testing import assert_close
from minimind.model import MiniMindForCausalLM

VARIANTS = {
    "dense": [],
    "moe": ["use_moe=true", "n_routed_experts=4", "num_experts_per_tok=2"],
}
STEPS = 3


def _pair(variant):
    models = {}
    for kernels in ("torch", "triton"):
        torch.manual_seed(0)
        models[kernels] = MiniMindForCausalLM(ModelConfig.from_preset("tiny", VARIANTS[variant], kernels=kernels))
    models["triton"].load_state_dict(models["torch"].state_dict())
    return models


def _loss(model, ids, weights, position_ids):
    out = model(ids[:, :-1], position_ids=position_ids, return_hidden=True)
    hidden = out.hidden.reshape(-1, out.hidden.shape[-1])  # (N, D)
    targets = ids[:, 1:].reshape(-1)
    ce = model.ops.fused_linear_cross_entropy(hidden, model.lm_head.weight, targets, weights, reduction="sum")
    return ce / weights.sum() + out.aux_loss


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_torch_and_triton_models_agree(variant):
    models = _pair(variant)
    assert models["triton"].ops.name == "triton"
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 6400, (2, 13), generator=g)
    weights = torch.rand(24, generator=g)
    weights[:3] = 0.0  # a masked prompt
    position_ids = torch.cat([torch.arange(5), torch.arange(7)]).expand(2, 12)  # two packed documents
    optims = {k: torch.optim.AdamW(m.parameters(), lr=1e-3) for k, m in models.items()}
    for step in range(STEPS):
        losses = {}
        for k, model in models.items():
            optims[k].zero_grad(set_to_none=True)
            losses[k] = _loss(model, ids, weights, position_ids)
            losses[k].backward()
        assert_close(losses["triton"], losses["torch"], "model", f"{variant} step {step} loss")
        if step == 0:
            grads = {k: dict((n, p.grad) for n, p in m.named_parameters()) for k, m in models.items()}
            for name, want in grads["torch"].items():
                assert want is not None and grads["triton"][name] is not None, name
                assert_close(grads["triton"][name], want, "model", f"{variant} grad {name}")
        for opt in optims.values():
            opt.step()
    assert not torch.equal(losses["torch"], _loss(models["torch"], ids, weights, position_ids)), "training moved"
