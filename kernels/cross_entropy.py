"""Cross-entropy with per-token weights (the SFT/reason loss mask) and its linear-fused variant.

reduction="mean" is sum(w * nll) / sum(w) over rows whose target is not `ignore_index`; an all-zero
weight gives 0, not NaN. The training loop uses reduction="sum" and divides by the total weight of
the whole optimizer step itself, so accumulation and DDP match one big batch.
"""

import torch
import torch.nn.functional as F


def cross_entropy_ref(
    logits: torch.Tensor,  # (N, V)
    targets: torch.Tensor,  # (N,)
    weights: torch.Tensor | None = None,  # (N,)
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    # log-softmax in fp32: bf16 logits over V=6400 lose the small probabilities entirely.
    nll = F.cross_entropy(logits.float(), targets, ignore_index=ignore_index, reduction="none")
    keep = (targets != ignore_index).float()
    w = keep if weights is None else weights.float() * keep
    return _reduce(nll * w, w, reduction)


def fused_linear_cross_entropy_ref(
    hidden: torch.Tensor,  # (N, D)
    weight: torch.Tensor,  # (V, D)
    targets: torch.Tensor,
    weights: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    return cross_entropy_ref(
        hidden @ weight.t(), targets, weights=weights, ignore_index=ignore_index, reduction=reduction
    )


def _reduce(weighted: torch.Tensor, w: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return weighted
    total = weighted.sum()
    if reduction == "sum":
        return total
    if reduction == "mean":
        denom = w.sum()
        return torch.where(denom > 0, total / denom.clamp_min(1e-12), total * 0.0)
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
