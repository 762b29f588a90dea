"""The pure-torch references of minimind/kernels/ against plain, obviously-correct formulations.

(The Triton kernels are tested against these references, so these must be right.)
"""

import pytest
import torch
import torch.nn.functional as F

from minimind.kernels import (
    add_rmsnorm_ref,
    cross_entropy_ref,
    fused_linear_cross_entropy_ref,
    get_ops,
    moe_dispatch_combine_ref,
    moe_gate_ref,
    rmsnorm_ref,
    swiglu_ref,
)


def test_rmsnorm_ref_matches_torch_rms_norm():
    x, w = torch.randn(3, 37, 123), torch.randn(123)
    torch.testing.assert_close(rmsnorm_ref(x, w, 1e-6), F.rms_norm(x, (123,), w, 1e-6))
    normed, res = add_rmsnorm_ref(x, x * 2, w, 1e-6)
    torch.testing.assert_close(res, x * 3)
    torch.testing.assert_close(normed, F.rms_norm(x * 3, (123,), w, 1e-6))
    half = rmsnorm_ref(x.half(), w, 1e-6)
    assert half.dtype == torch.float16


def test_swiglu_ref():
    g, u = torch.randn(5, 7), torch.randn(5, 7)
    torch.testing.assert_close(swiglu_ref(g, u), g * torch.sigmoid(g) * u)


def test_cross_entropy_ref_weighted_mean_sum_none():
    n, v = 11, 13
    logits, targets = torch.randn(n, v), torch.randint(0, v, (n,))
    targets[3] = -100
    w = torch.rand(n)
    nll = -torch.log_softmax(logits, -1)[torch.arange(n), targets.clamp_min(0)]
    keep = (targets != -100).float()
    want_sum = (nll * w * keep).sum()
    torch.testing.assert_close(cross_entropy_ref(logits, targets, w, reduction="sum"), want_sum)
    torch.testing.assert_close(cross_entropy_ref(logits, targets, w), want_sum / (w * keep).sum())
    torch.testing.assert_close(cross_entropy_ref(logits, targets, w, reduction="none"), nll * w * keep)
    torch.testing.assert_close(cross_entropy_ref(logits, targets), F.cross_entropy(logits, targets))
    zero = cross_entropy_ref(logits, targets, torch.zeros(n))
    assert zero.item() == 0.0
    h, wt = torch.randn(n, 8), torch.randn(v, 8)
    torch.testing.assert_close(
        fused_linear_cross_entropy_ref(h, wt, targets, w), cross_entropy_ref(h @ wt.T, targets, w)
    )


def _moe_loop(x, topk_weight, topk_idx, w_gate, w_up, w_down):
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        for j in range(topk_idx.shape[1]):
            e = topk_idx[n, j]
            h = F.silu(w_gate[e] @ x[n]) * (w_up[e] @ x[n])
            out[n] += topk_weight[n, j] * (w_down[e] @ h)
    return out


@pytest.mark.parametrize("top_k", [1, 2])
def test_moe_dispatch_ref_equals_loop_over_tokens(top_k):
    n, d, f, e = 9, 16, 24, 5
    x = torch.randn(n, d, requires_grad=True)
    w_gate, w_up = torch.randn(e, f, d, requires_grad=True), torch.randn(e, f, d, requires_grad=True)
    w_down = torch.randn(e, d, f, requires_grad=True)
    topk_weight, topk_idx, probs = moe_gate_ref(x.detach(), torch.randn(e, d), top_k, norm_topk_prob=True)
    if top_k > 1:
        torch.testing.assert_close(topk_weight.sum(-1), torch.ones(n))
    torch.testing.assert_close(probs.sum(-1), torch.ones(n))
    chosen = probs.gather(1, topk_idx)
    torch.testing.assert_close(topk_weight, chosen / chosen.sum(-1, keepdim=True) if top_k > 1 else chosen)
    topk_idx = torch.stack([torch.randperm(4)[:top_k] for _ in range(n)])  # expert 4 gets no token
    tw = topk_weight.clone().requires_grad_(True)
    got = moe_dispatch_combine_ref(x, tw, topk_idx, w_gate, w_up, w_down)
    want = _moe_loop(x, tw, topk_idx, w_gate, w_up, w_down)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    g = torch.randn_like(got)
    grads = torch.autograd.grad(got, (x, tw, w_gate, w_up, w_down), g)
    want_grads = torch.autograd.grad(want, (x, tw, w_gate, w_up, w_down), g)
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert torch.count_nonzero(grads[2][4]) == 0


def test_dispatch_layer():
    ops = get_ops("torch")
    assert ops.rmsnorm is rmsnorm_ref
    assert get_ops("auto", "cpu").name == "torch"
    with pytest.raises(ValueError, match="kernels must be one of"):
        get_ops("cuda")
