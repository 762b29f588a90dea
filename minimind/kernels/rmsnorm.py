"""RMSNorm, and RMSNorm fused with the residual add: the torch reference (fp32 math, the spec),
the Triton kernels, their launchers, the autograd Function and the public ops.

Each program normalises a tile of `rows_per_program` rows at once (2-D block), so small hidden
sizes still give wide loads on a GPU, and the interpreter (~1 ms per program) stays fast. The
backward recomputes nothing but x̂ = x * rstd from the saved input and the saved rstd (N,) fp32;
each backward program keeps a running dw for the tiles it visits, and the (programs, D) partials
are summed at the end, so no atomics and a deterministic dw.
"""

import torch

from minimind.kernels._triton import (
    cdiv,
    check_device,
    default_rows_per_program,
    define_op,
    jit,
    next_pow2,
    persistent_programs,
    tl,
)


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


@jit
def _rmsnorm_fwd_kernel(
    X_ptr, R_ptr, W_ptr, Y_ptr, RES_ptr, RSTD_ptr,
    n_rows, n_cols, eps,
    stride_x_row, stride_r_row, stride_y_row, stride_res_row,
    HAS_RESIDUAL: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_SIZE)
    row_mask = rows < n_rows
    mask = row_mask[:, None] & (cols[None, :] < n_cols)
    x = tl.load(X_ptr + rows[:, None] * stride_x_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(R_ptr + rows[:, None] * stride_r_row + cols[None, :], mask=mask, other=0.0)
        # round the sum to the residual's dtype first: the norm must see exactly the stored residual
        res = (x + r.to(tl.float32)).to(RES_ptr.dtype.element_ty)
        tl.store(RES_ptr + rows[:, None] * stride_res_row + cols[None, :], res, mask=mask)
        x = res.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / n_cols + eps)  # (BLOCK_ROWS,)
    w = tl.load(W_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    y = x * rstd[:, None] * w[None, :]
    tl.store(Y_ptr + rows[:, None] * stride_y_row + cols[None, :], y.to(Y_ptr.dtype.element_ty), mask=mask)
    tl.store(RSTD_ptr + rows, rstd, mask=row_mask)


@jit
def _rmsnorm_bwd_kernel(
    DY_ptr, X_ptr, W_ptr, RSTD_ptr, DRES_ptr, DX_ptr, DW_ptr,
    n_rows, n_cols,
    stride_dy_row, stride_x_row, stride_dres_row, stride_dx_row,
    HAS_DRES: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_SIZE)
    col_mask = cols < n_cols
    w = tl.load(W_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_SIZE,), dtype=tl.float32)
    n_tiles = tl.cdiv(n_rows, BLOCK_ROWS)
    for tile in range(pid, n_tiles, n_programs):
        rows = (tile * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)  # int64 before the stride
        row_mask = rows < n_rows
        mask = row_mask[:, None] & col_mask[None, :]
        dy = tl.load(DY_ptr + rows[:, None] * stride_dy_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X_ptr + rows[:, None] * stride_x_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD_ptr + rows, mask=row_mask, other=0.0)
        xhat = x * rstd[:, None]
        g = dy * w[None, :]
        # d/dx of x*rstd(x): rstd * (g - x̂ * mean(g * x̂))
        dx = rstd[:, None] * (g - xhat * (tl.sum(g * xhat, axis=1) / n_cols)[:, None])
        if HAS_DRES:
            dx += tl.load(DRES_ptr + rows[:, None] * stride_dres_row + cols[None, :], mask=mask, other=0.0).to(
                tl.float32
            )
        tl.store(DX_ptr + rows[:, None] * stride_dx_row + cols[None, :], dx.to(DX_ptr.dtype.element_ty), mask=mask)
        dw += tl.sum(dy * xhat, axis=0)
    tl.store(DW_ptr + pid.to(tl.int64) * n_cols + cols, dw, mask=col_mask)


def _launch_params(n_cols: int, rows_per_program: int | None) -> tuple[int, int, int]:
    block = next_pow2(n_cols)
    rows = next_pow2(rows_per_program or default_rows_per_program(block))
    num_warps = min(16, max(1, block * rows // 512))
    return block, rows, num_warps


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., D) -> (N, D) with unit column stride (a view when it can be)."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def _rmsnorm_fwd(x, residual, weight, eps, rows_per_program):
    """(y (N, D), new residual (N, D) or an empty tensor without `residual`, rstd (N,) fp32)."""
    x2 = _rows(x)
    n, d = x2.shape
    y = torch.empty((n, d), device=x.device, dtype=x.dtype)
    rstd = torch.empty(n, device=x.device, dtype=torch.float32)
    if residual is not None:
        r2 = _rows(residual)
        res = torch.empty((n, d), device=x.device, dtype=torch.result_type(x, residual))
    else:
        r2, res = x2, x.new_empty(0)  # unused (HAS_RESIDUAL=False)
    block, rows, num_warps = _launch_params(d, rows_per_program)
    _rmsnorm_fwd_kernel[(cdiv(n, rows),)](
        x2, r2, weight, y, res if residual is not None else y, rstd, n, d, eps,
        x2.stride(0), r2.stride(0), y.stride(0), res.stride(0) if residual is not None else 0,
        HAS_RESIDUAL=residual is not None, BLOCK_ROWS=rows, BLOCK_SIZE=block, num_warps=num_warps,
    )
    return y, res, rstd


def _rmsnorm_fwd_fake(x, residual, weight, eps, rows_per_program):
    n, d = x.numel() // x.shape[-1], x.shape[-1]
    res = x.new_empty((n, d), dtype=torch.result_type(x, residual)) if residual is not None else x.new_empty(0)
    return x.new_empty((n, d)), res, x.new_empty(n, dtype=torch.float32)


_rmsnorm_fwd_op = define_op(
    "rmsnorm_fwd(Tensor x, Tensor? residual, Tensor weight, float eps, int? rows_per_program)"
    " -> (Tensor, Tensor, Tensor)",
    _rmsnorm_fwd, _rmsnorm_fwd_fake,
)


def _rmsnorm_bwd(dy, x, weight, rstd, dres, rows_per_program, dx_dtype):
    """(dx (N, D) in dx_dtype, dw (D,)): dres, the new residual's own gradient, is added to dx."""
    dy2, x2 = _rows(dy), _rows(x)
    n, d = x2.shape
    dres2 = _rows(dres) if dres is not None else dy2
    block, rows, num_warps = _launch_params(d, rows_per_program)
    n_tiles = cdiv(n, rows)
    n_programs = persistent_programs(n_tiles, x.device)
    dx = torch.empty((n, d), device=x.device, dtype=dx_dtype)
    dw_partial = torch.empty((n_programs, d), device=x.device, dtype=torch.float32)
    _rmsnorm_bwd_kernel[(n_programs,)](
        dy2, x2, weight, rstd, dres2, dx, dw_partial, n, d,
        dy2.stride(0), x2.stride(0), dres2.stride(0), dx.stride(0),
        HAS_DRES=dres is not None, BLOCK_ROWS=rows, BLOCK_SIZE=block, num_warps=num_warps,
    )
    return dx, dw_partial.sum(0).to(weight.dtype)


def _rmsnorm_bwd_fake(dy, x, weight, rstd, dres, rows_per_program, dx_dtype):
    return x.new_empty((x.numel() // x.shape[-1], x.shape[-1]), dtype=dx_dtype), torch.empty_like(weight)


_rmsnorm_bwd_op = define_op(
    "rmsnorm_bwd(Tensor dy, Tensor x, Tensor weight, Tensor rstd, Tensor? dres, int? rows_per_program,"
    " ScalarType dx_dtype) -> (Tensor, Tensor)",
    _rmsnorm_bwd, _rmsnorm_bwd_fake,
)


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, rows_per_program):
        y, _, rstd = _rmsnorm_fwd_op(x, None, weight, eps, rows_per_program)
        ctx.save_for_backward(x, weight, rstd)
        ctx.rows_per_program = rows_per_program
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = _rmsnorm_bwd_op(dy, x, weight, rstd, None, ctx.rows_per_program, x.dtype)
        return dx.view(x.shape), dw, None, None


class AddRMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, eps, rows_per_program):
        y, res, rstd = _rmsnorm_fwd_op(x, residual, weight, eps, rows_per_program)
        ctx.save_for_backward(res, weight, rstd)
        ctx.rows_per_program = rows_per_program
        ctx.dtypes = (x.dtype, residual.dtype)
        ctx.shape = x.shape
        return y.view(x.shape), res.view(x.shape)

    @staticmethod
    def backward(ctx, dy, dres):
        res, weight, rstd = ctx.saved_tensors
        # x and residual both receive d(new_residual) = norm's dx + the returned residual's gradient
        dsum, dw = _rmsnorm_bwd_op(dy, res, weight, rstd, dres, ctx.rows_per_program, res.dtype)
        dsum = dsum.view(ctx.shape)
        return dsum.to(ctx.dtypes[0]), dsum.to(ctx.dtypes[1]), dw, None, None


def _check(op, x, weight, *others):
    check_device(op, x, weight, *others)
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"{op}: weight must be (D,) = ({x.shape[-1]},), got {tuple(weight.shape)}")
    for o in others:
        if o.shape != x.shape:
            raise ValueError(f"{op}: residual shape {tuple(o.shape)} != x shape {tuple(x.shape)}")


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, rows_per_program: int | None = None):
    """Triton RMSNorm over the last dim; same contract as `rmsnorm_ref`."""
    _check("rmsnorm", x, weight)
    return RMSNormFunction.apply(x, weight, eps, rows_per_program)


def add_rmsnorm(x, residual, weight, eps: float, *, rows_per_program: int | None = None):
    """Triton (rmsnorm(x + residual), x + residual) in one pass; same contract as `add_rmsnorm_ref`."""
    _check("add_rmsnorm", x, weight, residual)
    return AddRMSNormFunction.apply(x, residual, weight, eps, rows_per_program)
