"""Cross-entropy with per-token weights (the SFT/reason loss mask) and its linear-fused variant: the
torch references, the Triton kernel, the autograd Functions and the public ops.

reduction="mean" is sum(w * nll) / sum(w) over rows whose target is not `ignore_index`; an all-zero
weight gives 0, not NaN. The training loop uses reduction="sum" and divides by the total weight of
the whole optimizer step itself, so accumulation and DDP match one big batch.

The kernel makes one pass over each row computing the log-sum-exp online (fp32) and a second over
the same row writing w * (softmax - onehot), i.e. the gradient of the unreduced weighted loss, in the
forward (as Liger does); the backward only scales it by the incoming gradient. The fused variant
runs that per chunk of rows on `hidden_chunk @ weight.T`, writing the gradient over the chunk's own
logits and folding it into d hidden and d weight at once, so only one (chunk, V) block of logits
ever exists (chunk * V ~ N * D by default).
"""

import torch
import torch.nn.functional as F

from minimind.kernels._triton import cdiv, check_device, define_op, interpreting, jit, next_pow2, tl

REDUCTIONS = ("mean", "sum", "none")


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


@jit
def _ce_fwd_kernel(
    LOGITS_ptr, TARGETS_ptr, W_ptr, NLL_ptr, GRAD_ptr,
    n_rows, n_cols, ignore_index, stride_logits_row, stride_grad_row,
    HAS_WEIGHTS: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = rows < n_rows
    target = tl.load(TARGETS_ptr + rows, mask=row_mask, other=ignore_index)
    keep = row_mask & (target != ignore_index)
    safe_target = tl.where(keep, target, 0)
    row_ptr = LOGITS_ptr + rows[:, None] * stride_logits_row
    # online log-sum-exp; m starts finite so rows past n_rows (all -inf) never make inf - inf = nan
    m = tl.full((BLOCK_ROWS,), -1e30, dtype=tl.float32)
    s = tl.zeros((BLOCK_ROWS,), dtype=tl.float32)
    for start in range(0, n_cols, BLOCK_SIZE):
        cols = start + tl.arange(0, BLOCK_SIZE)
        mask = row_mask[:, None] & (cols[None, :] < n_cols)
        x = tl.load(row_ptr + cols[None, :], mask=mask, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), axis=1)
        m = m_new
    lse = tl.where(row_mask, m + tl.log(tl.where(row_mask, s, 1.0)), 0.0)  # s >= 1 on real rows
    x_target = tl.load(LOGITS_ptr + rows * stride_logits_row + safe_target, mask=keep, other=0.0).to(tl.float32)
    tl.store(NLL_ptr + rows, tl.where(keep, lse - x_target, 0.0), mask=row_mask)
    if WRITE_GRAD:
        w = keep.to(tl.float32)
        if HAS_WEIGHTS:
            w = w * tl.load(W_ptr + rows, mask=keep, other=0.0).to(tl.float32)
        grad_row_ptr = GRAD_ptr + rows[:, None] * stride_grad_row
        for start in range(0, n_cols, BLOCK_SIZE):
            cols = start + tl.arange(0, BLOCK_SIZE)
            mask = row_mask[:, None] & (cols[None, :] < n_cols)
            x = tl.load(row_ptr + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            p = tl.exp(x - lse[:, None])
            p = tl.where(cols[None, :] == safe_target[:, None], p - 1.0, p)
            tl.store(grad_row_ptr + cols[None, :], (p * w[:, None]).to(GRAD_ptr.dtype.element_ty), mask=mask)


def _ce_rows(logits, targets, weights, ignore_index, grad_out, rows_per_program=None):
    """nll (N,) fp32 (0 on ignored rows) and, when grad_out is given (it may be `logits` itself), writes
    w * (softmax - onehot) there (w = weights on kept rows, else 1, 0 on ignored rows)."""
    n, v = logits.shape
    nll = torch.empty(n, device=logits.device, dtype=torch.float32)
    block = min(next_pow2(v), 2048 if interpreting() else 8192)
    rows = rows_per_program or (max(1, (1 << 14) // block) if interpreting() else 1)
    rows = next_pow2(rows)
    grad = logits if grad_out is None else grad_out
    _ce_fwd_kernel[(cdiv(n, rows),)](
        logits, targets, weights if weights is not None else nll, nll, grad,
        n, v, ignore_index, logits.stride(0), grad.stride(0),
        HAS_WEIGHTS=weights is not None, WRITE_GRAD=grad_out is not None, BLOCK_ROWS=rows, BLOCK_SIZE=block,
        num_warps=min(32, max(4, block // 256)) if not interpreting() else 1,
    )
    return nll


def _ce_fwd(logits, targets, weights, ignore_index, write_grad, rows_per_program):
    """(nll (N,) fp32, w * (softmax - onehot) (N, V) in logits' dtype, or an empty tensor unless write_grad)."""
    grad = torch.empty_like(logits) if write_grad else logits.new_empty(0)
    nll = _ce_rows(logits, targets, weights, ignore_index, grad if write_grad else None, rows_per_program)
    return nll, grad


_ce_fwd_op = define_op(
    "cross_entropy_fwd(Tensor logits, Tensor targets, Tensor? weights, int ignore_index, bool write_grad,"
    " int? rows_per_program) -> (Tensor, Tensor)",
    _ce_fwd,
    lambda logits, targets, weights, ignore_index, write_grad, rows_per_program: (
        logits.new_empty(logits.shape[0], dtype=torch.float32),
        torch.empty_like(logits) if write_grad else logits.new_empty(0),
    ),
)


def _row_weights(targets, weights, ignore_index):
    keep = (targets != ignore_index).float()
    return keep if weights is None else weights.float() * keep


def _loss_and_scale(nll, w, reduction):
    """The reduced loss, and d loss / d (w * nll) as a scalar (mean, sum) or None (none: per row)."""
    loss = _reduce(nll * w, w, reduction)
    if reduction == "sum":
        return loss, torch.ones((), device=nll.device)
    if reduction == "mean":
        denom = w.sum()
        return loss, torch.where(denom > 0, 1.0 / denom.clamp_min(1e-12), 0.0)
    return loss, None


def _weights_grad(dloss, nll, w, keep, reduction, loss):
    """d loss / d weights: nll on kept rows, minus the mean under "mean" (loss = Σwℓ/Σw)."""
    if reduction == "none":
        return dloss * nll * keep
    denom = w.sum()
    per_row = nll - loss if reduction == "mean" else nll
    scale = torch.where(denom > 0, 1.0 / denom.clamp_min(1e-12), 0.0) if reduction == "mean" else 1.0
    return dloss * scale * per_row * keep


class CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, weights, ignore_index, reduction, rows_per_program):
        logits = logits if logits.stride(-1) == 1 else logits.contiguous()
        nll, grad = _ce_fwd_op(logits, targets, weights, ignore_index, ctx.needs_input_grad[0], rows_per_program)
        keep = (targets != ignore_index).float()
        w = keep if weights is None else weights.float() * keep
        loss, scale = _loss_and_scale(nll, w, reduction)
        ctx.save_for_backward(grad, nll, w, keep, scale, loss)
        ctx.reduction = reduction
        ctx.weights_dtype = None if weights is None else weights.dtype
        return loss

    @staticmethod
    def backward(ctx, dloss):
        grad, nll, w, keep, scale, loss = ctx.saved_tensors
        dlogits = dweights = None
        if ctx.needs_input_grad[0]:
            factor = dloss[:, None] if ctx.reduction == "none" else dloss * scale
            dlogits = grad.mul_(factor.to(grad.dtype))  # the buffer is ours and used once
        if ctx.needs_input_grad[2]:
            dweights = _weights_grad(dloss, nll, w, keep, ctx.reduction, loss).to(ctx.weights_dtype)
        return dlogits, None, dweights, None, None, None


def _flce_chunks(hidden, weight, targets, weights, ignore_index, chunk_size, want_grad, row_scale=None):
    """Loops over row chunks: nll (N,), and if want_grad, d hidden (N, D) and d weight (V, D) of
    Σ row_scale * w * nll (row_scale None: 1)."""
    n = hidden.shape[0]
    nll = torch.empty(n, device=hidden.device, dtype=torch.float32)
    dh = torch.empty_like(hidden) if want_grad else None
    # d weight accumulates over chunks in fp32: bf16 partial sums would drop the small chunks' terms
    dw = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if want_grad else None
    eff = weights if row_scale is None else row_scale * (1.0 if weights is None else weights.float())
    for start in range(0, n, chunk_size):
        sl = slice(start, min(n, start + chunk_size))
        logits = hidden[sl] @ weight.t()  # (chunk, V), the only logits alive
        w_c = None if eff is None else eff[sl].contiguous()
        nll[sl] = _ce_rows(logits, targets[sl], w_c, ignore_index, logits if want_grad else None)
        if want_grad:
            dh[sl] = logits @ weight.to(logits.dtype)
            dw.add_(logits.t() @ hidden[sl].to(logits.dtype))
    return nll, dh, (dw.to(weight.dtype) if want_grad else None)


def _flce_fwd(hidden, weight, targets, weights, ignore_index, chunk_size, want_grad, row_scale):
    nll, dh, dw = _flce_chunks(hidden, weight, targets, weights, ignore_index, chunk_size, want_grad, row_scale)
    return nll, (dh if want_grad else hidden.new_empty(0)), (dw if want_grad else weight.new_empty(0))


def _flce_fwd_fake(hidden, weight, targets, weights, ignore_index, chunk_size, want_grad, row_scale):
    nll = hidden.new_empty(hidden.shape[0], dtype=torch.float32)
    if not want_grad:
        return nll, hidden.new_empty(0), weight.new_empty(0)
    return nll, torch.empty_like(hidden), weight.new_empty(weight.shape)


# (nll (N,), d hidden (N, D), d weight (V, D) of Σ row_scale * w * nll; empty gradients unless want_grad)
_flce_fwd_op = define_op(
    "fused_linear_cross_entropy_fwd(Tensor hidden, Tensor weight, Tensor targets, Tensor? weights,"
    " int ignore_index, int chunk_size, bool want_grad, Tensor? row_scale) -> (Tensor, Tensor, Tensor)",
    _flce_fwd, _flce_fwd_fake,
)


def _default_chunk(n: int, d: int, v: int) -> int:
    # chunk * V ~ N * D: the logits block is no larger than the hidden states themselves. Under the
    # interpreter memory is not the point and each launch costs ~100 ms: at least 256 rows a chunk.
    return max(256 if interpreting() else 1, next_pow2(cdiv(n, cdiv(v, d))))


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, weights, ignore_index, reduction, chunk_size):
        chunk = chunk_size or _default_chunk(hidden.shape[0], hidden.shape[1], weight.shape[0])
        want_grad = (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]) and reduction != "none"
        nll, dh, dw = _flce_fwd_op(hidden, weight, targets, weights, ignore_index, chunk, want_grad, None)
        keep = (targets != ignore_index).float()
        w = keep if weights is None else weights.float() * keep
        loss, scale = _loss_and_scale(nll, w, reduction)
        ctx.save_for_backward(hidden, weight, targets, weights, dh, dw, nll, w, keep, scale, loss)
        ctx.meta = (ignore_index, reduction, chunk, want_grad)
        return loss

    @staticmethod
    def backward(ctx, dloss):
        hidden, weight, targets, weights, dh, dw, nll, w, keep, scale, loss = ctx.saved_tensors
        ignore_index, reduction, chunk, want_grad = ctx.meta
        if reduction == "none" and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
            # per-row incoming gradients can't scale a pre-summed d weight: recompute, chunk by chunk
            _, dh, dw = _flce_fwd_op(hidden, weight, targets, weights, ignore_index, chunk, True, dloss.float())
        elif want_grad:
            factor = dloss * scale
            dh, dw = dh * factor.to(dh.dtype), dw * factor.to(dw.dtype)
        dweights = None
        if ctx.needs_input_grad[3]:
            dweights = _weights_grad(dloss, nll, w, keep, reduction, loss).to(weights.dtype)
        return (dh if ctx.needs_input_grad[0] else None), (dw if ctx.needs_input_grad[1] else None), None, \
            dweights, None, None, None


def _check(op, scores, targets, weights, reduction, *tensors):
    check_device(op, scores, targets, *tensors, *(() if weights is None else (weights,)))
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if scores.dim() != 2 or targets.shape != scores.shape[:1]:
        raise ValueError(f"{op}: expected (N, *) scores and (N,) targets, got {tuple(scores.shape)}, "
                         f"{tuple(targets.shape)}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{op}: targets must be integer class indices, got {targets.dtype}")
    if weights is not None and weights.shape != targets.shape:
        raise ValueError(f"{op}: weights must be (N,) = {tuple(targets.shape)}, got {tuple(weights.shape)}")


def cross_entropy(logits, targets, weights=None, ignore_index: int = -100, reduction: str = "mean", *,
                  rows_per_program: int | None = None):
    """Triton weighted cross-entropy of logits (N, V); same contract as `cross_entropy_ref`."""
    _check("cross_entropy", logits, targets, weights, reduction)
    weights = None if weights is None else weights.contiguous()
    return CrossEntropyFunction.apply(logits, targets.contiguous(), weights, ignore_index, reduction,
                                      rows_per_program)


def fused_linear_cross_entropy(hidden, weight, targets, weights=None, ignore_index: int = -100,
                               reduction: str = "mean", *, chunk_size: int | None = None):
    """cross_entropy(hidden @ weight.T, ...) without ever holding the (N, V) logits; same contract as
    `fused_linear_cross_entropy_ref`. `chunk_size` rows of logits exist at a time."""
    _check("fused_linear_cross_entropy", hidden, targets, weights, reduction, weight)
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"fused_linear_cross_entropy: weight must be (V, D={hidden.shape[1]}), "
                         f"got {tuple(weight.shape)}")
    weights = None if weights is None else weights.contiguous()
    return FusedLinearCrossEntropyFunction.apply(hidden, weight, targets.contiguous(), weights, ignore_index,
                                                 reduction, chunk_size)
