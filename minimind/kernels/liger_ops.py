"""The `kernels="liger"` provider: liger-kernel's ops where it has an equivalent, adapted to our
signatures (SPEC §8), and our torch references where it has none. A benchmark peer, never a
dependency of the core: importing this module without liger-kernel raises an ImportError that says so.

Liger ops used: RMSNorm, fused add+RMSNorm, RoPE (its (B, H, T, Dh) layout, so q and k are transposed
around it), SiLU-mul, cross-entropy and fused linear cross-entropy when there are no per-token
weights (Liger's `weight` is per class), and its fused MoE (gate and up concatenated to its (E, 2F, D)
layout per call). The router (`moe_gate`) and the weighted losses are our references. Liger's
cross-entropy overwrites its logits argument with their gradient (its design, to save memory).
"""

import torch

from minimind.kernels.cross_entropy import cross_entropy_ref, fused_linear_cross_entropy_ref
from minimind.kernels.dispatch import Ops
from minimind.kernels.moe import moe_gate_ref

try:
    from liger_kernel.ops import LigerFusedMoEFunction
    from liger_kernel.transformers.functional import (
        liger_cross_entropy,
        liger_fused_add_rms_norm,
        liger_fused_linear_cross_entropy,
        liger_rms_norm,
        liger_rope,
        liger_swiglu,
    )
except ImportError as e:
    raise ImportError(
        "kernels='liger' needs liger-kernel, which is not installed: `pip install liger-kernel` (add --no-deps "
        "if pip wants another torch), or use kernels='triton' or 'torch'"
    ) from e


def rmsnorm(x, weight, eps):
    return liger_rms_norm(x, weight, eps, in_place=False)


def add_rmsnorm(x, residual, weight, eps):
    # Liger returns (normed, x + residual), our order
    return liger_fused_add_rms_norm(x, residual, weight, eps, in_place=False)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient: Liger's RoPE backward reads its
    incoming gradient as contiguous, and ours arrives as a transposed view."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def rope(q, k, cos, sin, position_ids):
    c, s = cos[position_ids], sin[position_ids]  # (B, T, Dh/2): Liger takes the half tables with rotary_dim
    # Liger reads (B, H, T, Dh) as laid out contiguously: a transposed view gives wrong results
    q2, k2 = liger_rope(q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(), c, s, rotary_dim=q.shape[-1])
    return _ContiguousGrad.apply(q2).transpose(1, 2), _ContiguousGrad.apply(k2).transpose(1, 2)


def swiglu(gate, up):
    # liger's backward writes the gradients into `gate` and `up` (to save memory): fine in the model,
    # where nothing else reads the two projections, but a caller must not reuse them after backward
    return liger_swiglu(gate, up)


def cross_entropy(logits, targets, weights=None, ignore_index=-100, reduction="mean"):
    if weights is not None:  # per-token weights: Liger has none
        return cross_entropy_ref(logits, targets, weights, ignore_index, reduction)
    return liger_cross_entropy(logits, targets, ignore_index=ignore_index, reduction=reduction)


def fused_linear_cross_entropy(hidden, weight, targets, weights=None, ignore_index=-100, reduction="mean"):
    if weights is not None:
        return fused_linear_cross_entropy_ref(hidden, weight, targets, weights, ignore_index, reduction)
    return liger_fused_linear_cross_entropy(hidden, weight, targets, ignore_index=ignore_index, reduction=reduction)


def moe_dispatch_combine(hidden, topk_weight, topk_idx, w_gate, w_up, w_down):
    gate_up = torch.cat((w_gate, w_up), dim=1)  # (E, 2F, D), gate first
    return LigerFusedMoEFunction.apply(hidden, gate_up, w_down, topk_idx.to(torch.int32), topk_weight.to(hidden.dtype))


OPS = Ops(
    name="liger",
    rmsnorm=rmsnorm,
    add_rmsnorm=add_rmsnorm,
    rope=rope,
    swiglu=swiglu,
    cross_entropy=cross_entropy,
    fused_linear_cross_entropy=fused_linear_cross_entropy,
    moe_gate=moe_gate_ref,
    moe_dispatch_combine=moe_dispatch_combine,
)
