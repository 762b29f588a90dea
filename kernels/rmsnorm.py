"""RMSNorm, and RMSNorm fused with the residual add. Reference in plain torch with fp32 math."""

import torch


def rmsnorm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # fp32 math: the mean of squares loses most of its bits in bf16 at hidden sizes >= 512.
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (normed * weight.float()).to(x.dtype)


def add_rmsnorm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    new_residual = x + residual
    return rmsnorm_ref(new_residual, weight, eps), new_residual
