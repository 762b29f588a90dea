"""Triton MoE router and grouped-matmul dispatch/combine (interpreter on CPU) vs a plain loop over
experts and vs the references: top_k 1 and 2, experts that receive no token (exact zero gradients),
several row tiles per expert, fp32/fp16, every gradient."""

import pytest
import torch
import torch.nn.functional as F

from minimind.kernels import moe_dispatch_combine, moe_dispatch_combine_ref, moe_gate, moe_gate_ref
from minimind.kernels.testing import assert_close, check_against_ref


def _loop_over_experts(x, topk_weight, topk_idx, w_gate, w_up, w_down):
    """The obvious formulation: for each expert, the (token, slot) pairs routed to it."""
    out = torch.zeros_like(x)
    for e in range(w_gate.shape[0]):
        rows, slots = torch.nonzero(topk_idx == e, as_tuple=True)
        h = F.silu(x[rows] @ w_gate[e].T) * (x[rows] @ w_up[e].T)
        out = out.index_add(0, rows, (h @ w_down[e].T) * topk_weight[rows, slots, None].to(x.dtype))
    return out


def _experts(e, d, f, dtype):
    return tuple((torch.randn(*shape) / shape[-1] ** 0.5).to(dtype) for shape in ((e, f, d), (e, f, d), (e, d, f)))


def _routing(n, top_k, used_experts):
    """Each token picks top_k distinct experts among the first `used_experts` (the rest get none)."""
    idx = torch.stack([torch.randperm(used_experts)[:top_k] for _ in range(n)])
    weight = torch.rand(n, top_k)
    return weight / weight.sum(-1, keepdim=True), idx


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n, d, f, e, blocks", [(9, 20, 40, 5, (16, 16, 16)), (37, 64, 96, 4, None)])
def test_dispatch_combine_vs_loop_over_experts(top_k, dtype, n, d, f, e, blocks):
    x = torch.randn(n, d, dtype=dtype)
    topk_weight, topk_idx = _routing(n, top_k, used_experts=e - 1)  # the last expert receives no token
    w_gate, w_up, w_down = _experts(e, d, f, dtype)
    op = lambda x, tw, ti, wg, wu, wd: moe_dispatch_combine(x, tw, ti, wg, wu, wd, block_sizes=blocks)
    args = (x, topk_weight, topk_idx, w_gate, w_up, w_down)
    # row=dtype: topk_weight is fp32 but its gradient comes from `dtype` expert outputs
    check_against_ref(op, _loop_over_experts, args, wrt=(0, 1, 3, 4, 5), row=dtype, msg=f"moe top{top_k} {dtype}")
    check_against_ref(op, moe_dispatch_combine_ref, args, wrt=(), row=dtype, msg="moe vs ref")


def test_empty_experts_get_exact_zero_gradients():
    n, d, f, e = 6, 16, 32, 6
    x = torch.randn(n, d, requires_grad=True)
    weights = [w.requires_grad_() for w in _experts(e, d, f, torch.float32)]
    topk_idx = torch.tensor([[0, 2]] * n)  # experts 1, 3, 4, 5 receive nothing
    out = moe_dispatch_combine(x, torch.full((n, 2), 0.5), topk_idx, *weights, block_sizes=(16, 16, 16))
    out.square().sum().backward()
    for w in weights:
        assert w.grad is not None
        assert torch.count_nonzero(w.grad[[1, 3, 4, 5]]) == 0
        assert torch.count_nonzero(w.grad[[0, 2]]) > 0


def test_every_token_on_one_expert_spans_many_tiles():
    n, d, f, e = 40, 16, 16, 3
    x, (w_gate, w_up, w_down) = torch.randn(n, d), _experts(e, d, f, torch.float32)
    topk_idx, topk_weight = torch.full((n, 1), 1), torch.rand(n, 1)
    op = lambda *a: moe_dispatch_combine(*a, block_sizes=(16, 16, 16))  # 3 row tiles for expert 1
    check_against_ref(op, _loop_over_experts, (x, topk_weight, topk_idx, w_gate, w_up, w_down), wrt=(0, 1, 3, 4, 5))


def _gate_objective(outputs, g_slots, g_probs):
    """An upstream gradient that does not depend on the order of the top-k slots."""
    topk_weight, topk_idx, probs = outputs
    return (topk_weight * g_slots.gather(1, topk_idx)).sum() + (probs * g_probs).sum()


@pytest.mark.parametrize("top_k, norm", [(1, True), (2, True), (2, False), (3, True)])
@pytest.mark.parametrize("n, d, e", [(9, 20, 5), (1, 8, 4), (33, 64, 8)])
def test_gate(top_k, norm, n, d, e):
    hidden = torch.randn(n, d, requires_grad=True)
    gate_weight = torch.randn(e, d, requires_grad=True)
    got, want = moe_gate(hidden, gate_weight, top_k, norm), moe_gate_ref(hidden, gate_weight, top_k, norm)
    assert got[1].dtype == torch.int64 and got[0].dtype == want[0].dtype
    assert_close(got[2], want[2])
    assert torch.equal(got[1].sort(-1).values, want[1].sort(-1).values)
    order = want[1].argsort(-1)
    assert_close(got[0].gather(1, got[1].argsort(-1)), want[0].gather(1, order))
    assert torch.all(got[0][:, :-1] >= got[0][:, 1:])  # ours: sorted by weight
    g_slots, g_probs = torch.randn(n, e), torch.randn(n, e)
    got_grads = torch.autograd.grad(_gate_objective(got, g_slots, g_probs), (hidden, gate_weight))
    want_grads = torch.autograd.grad(_gate_objective(want, g_slots, g_probs), (hidden, gate_weight))
    for g, w in zip(got_grads, want_grads):
        assert_close(g, w)


def test_gate_fp16_hidden():
    hidden, gate_weight = torch.randn(7, 16, dtype=torch.float16), torch.randn(4, 16, dtype=torch.float16)
    got, want = moe_gate(hidden, gate_weight, 2, True), moe_gate_ref(hidden, gate_weight, 2, True)
    assert_close(got[2], want[2])
    assert torch.equal(got[1].sort(-1).values, want[1].sort(-1).values)


def test_bad_input_is_a_clear_error():
    x, (w_gate, w_up, w_down) = torch.randn(4, 8), _experts(3, 8, 16, torch.float32)
    with pytest.raises(ValueError, match="topk_idx values must be in 0..2"):
        moe_dispatch_combine(x, torch.ones(4, 1), torch.full((4, 1), 3), w_gate, w_up, w_down)
    with pytest.raises(ValueError, match=r"w_down \(E, D, F\)"):
        moe_dispatch_combine(x, torch.ones(4, 1), torch.zeros(4, 1, dtype=torch.long), w_gate, w_up, w_gate)
    with pytest.raises(ValueError, match="top_k must be in 1..E"):
        moe_gate(x, torch.randn(3, 8), 4, True)
