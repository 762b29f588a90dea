"""Rotary position embedding with rotate-half pairing (i, i + Dh/2), as in Hugging Face Llama: the
torch reference, the Triton kernel, the autograd Function and the public op.

`cos`/`sin` are tables of shape (P, Dh/2) indexed by `position_ids`, so packed sequences (positions
restarting at 0) and decode offsets need nothing special. One launch rotates q and k together
(GQA: Hq != Hk); a program takes `rows_per_program` tokens and every head of each. The backward is
the same kernel rotating by -θ (the rotation is orthogonal), so nothing but the tables and the
positions is saved. For inference, `inplace=True` rotates q and k in their own memory.
"""

import torch

from minimind.kernels._triton import cdiv, check_device, default_rows_per_program, define_op, jit, next_pow2, tl


def rope_ref(
    q: torch.Tensor,  # (B, T, Hq, Dh)
    k: torch.Tensor,  # (B, T, Hk, Dh)
    cos: torch.Tensor,  # (P, Dh/2)
    sin: torch.Tensor,  # (P, Dh/2)
    position_ids: torch.Tensor,  # (B, T) int64
) -> tuple[torch.Tensor, torch.Tensor]:
    # a gather by row (embedding), not advanced indexing: the same values, and it also runs under fake CUDA
    c = torch.nn.functional.embedding(position_ids, cos).unsqueeze(2).float()  # (B, T, 1, Dh/2)
    s = torch.nn.functional.embedding(position_ids, sin).unsqueeze(2).float()
    return _rotate(q, c, s), _rotate(k, c, s)


def _rotate(x: torch.Tensor, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


@jit
def _rotate_tile(X_ptr, Y_ptr, rows, row_mask, c, s, n_heads, half, stride_x_row, stride_x_head,
                 stride_y_row, stride_y_head, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    heads = tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_HALF)
    mask = row_mask[:, None, None] & (heads[None, :, None] < n_heads) & (cols[None, None, :] < half)
    x_offs = rows[:, None, None] * stride_x_row + heads[None, :, None] * stride_x_head + cols[None, None, :]
    y_offs = rows[:, None, None] * stride_y_row + heads[None, :, None] * stride_y_head + cols[None, None, :]
    x1 = tl.load(X_ptr + x_offs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(X_ptr + x_offs + half, mask=mask, other=0.0).to(tl.float32)
    c3, s3 = c[:, None, :], s[:, None, :]
    tl.store(Y_ptr + y_offs, (x1 * c3 - x2 * s3).to(Y_ptr.dtype.element_ty), mask=mask)
    tl.store(Y_ptr + y_offs + half, (x2 * c3 + x1 * s3).to(Y_ptr.dtype.element_ty), mask=mask)


@jit
def _rope_kernel(
    Q_ptr, K_ptr, QO_ptr, KO_ptr, COS_ptr, SIN_ptr, POS_ptr,
    n_rows, n_q_heads, n_k_heads, half,
    stride_q_row, stride_q_head, stride_k_row, stride_k_head,
    stride_qo_row, stride_qo_head, stride_ko_row, stride_ko_head, stride_cos_row, stride_sin_row,
    SIGN: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = rows < n_rows
    cols = tl.arange(0, BLOCK_HALF)
    pos = tl.load(POS_ptr + rows, mask=row_mask, other=0)
    tmask = row_mask[:, None] & (cols[None, :] < half)
    c = tl.load(COS_ptr + pos[:, None] * stride_cos_row + cols[None, :], mask=tmask, other=0.0).to(tl.float32)
    s = tl.load(SIN_ptr + pos[:, None] * stride_sin_row + cols[None, :], mask=tmask, other=0.0).to(tl.float32)
    s = s * SIGN  # SIGN = -1 in the backward: rotating by -θ is the transpose of rotating by θ
    _rotate_tile(Q_ptr, QO_ptr, rows, row_mask, c, s, n_q_heads, half, stride_q_row, stride_q_head,
                 stride_qo_row, stride_qo_head, BLOCK_H=BLOCK_HQ, BLOCK_HALF=BLOCK_HALF)
    _rotate_tile(K_ptr, KO_ptr, rows, row_mask, c, s, n_k_heads, half, stride_k_row, stride_k_head,
                 stride_ko_row, stride_ko_head, BLOCK_H=BLOCK_HK, BLOCK_HALF=BLOCK_HALF)


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, T, H, Dh) -> (N, H, Dh) with a unit stride on Dh (a view when it can be)."""
    x = x.reshape(-1, x.shape[-2], x.shape[-1])
    return x if x.stride(-1) == 1 else x.contiguous()


def _rope_launch(q, k, cos, sin, pos, sign, rows_per_program, inplace=False):
    q3, k3 = _tokens(q), _tokens(k)
    n, hq, dh = q3.shape
    hk = k3.shape[1]
    # in place: each program loads its elements before it stores them, so reading and writing one buffer is safe
    new = lambda x3: torch.empty(x3.shape, device=x3.device, dtype=x3.dtype)  # contiguous, as the fake says
    qo, ko = (q3, k3) if inplace else (new(q3), new(k3))
    block_half = next_pow2(dh // 2)
    block_hq, block_hk = next_pow2(hq), next_pow2(hk)
    rows = next_pow2(rows_per_program or default_rows_per_program((block_hq + block_hk) * 2 * block_half))
    num_warps = min(8, max(1, rows * (block_hq + block_hk) * block_half // 256))
    _rope_kernel[(cdiv(n, rows),)](
        q3, k3, qo, ko, cos, sin, pos, n, hq, hk, dh // 2,
        q3.stride(0), q3.stride(1), k3.stride(0), k3.stride(1),
        qo.stride(0), qo.stride(1), ko.stride(0), ko.stride(1), cos.stride(0), sin.stride(0),
        SIGN=sign, BLOCK_ROWS=rows, BLOCK_HQ=block_hq, BLOCK_HK=block_hk, BLOCK_HALF=block_half,
        num_warps=num_warps,
    )
    if inplace:
        for x, x3 in ((q, q3), (k, k3)):
            if x3.data_ptr() != x.data_ptr():  # _tokens had to copy: write the result back
                x.copy_(x3.view(x.shape))
        return q, k
    return qo.view(q.shape), ko.view(k.shape)


# pos: (B*T,) int64, the position of every token; sign -1 rotates by -θ (the backward)
_rope_op = define_op(
    "rope(Tensor q, Tensor k, Tensor cos, Tensor sin, Tensor pos, float sign, int? rows_per_program)"
    " -> (Tensor, Tensor)",
    _rope_launch,
    lambda q, k, cos, sin, pos, sign, rows_per_program: (q.new_empty(q.shape), k.new_empty(k.shape)),
)


def _rope_inplace(q, k, cos, sin, pos, rows_per_program):
    _rope_launch(q, k, cos, sin, pos, 1.0, rows_per_program, inplace=True)


_rope_inplace_op = define_op(
    "rope_(Tensor(a!) q, Tensor(b!) k, Tensor cos, Tensor sin, Tensor pos, int? rows_per_program) -> ()",
    _rope_inplace,
    lambda q, k, cos, sin, pos, rows_per_program: None,
)


def _table_grads(dq, dk, q, k, pos, cos):
    """d cos, d sin (P, Dh/2), in torch: the model's tables are buffers, so this runs only when a caller
    asks for gradients of the tables themselves."""
    dc = torch.zeros(cos.shape, device=cos.device, dtype=torch.float32)
    ds = torch.zeros_like(dc)
    for dy, x in ((dq, q), (dk, k)):
        x1, x2 = x.float().chunk(2, dim=-1)  # (B, T, H, Dh/2)
        d1, d2 = dy.float().chunk(2, dim=-1)
        dc.index_add_(0, pos.reshape(-1), (d1 * x1 + d2 * x2).sum(2).reshape(-1, dc.shape[1]))
        ds.index_add_(0, pos.reshape(-1), (d2 * x1 - d1 * x2).sum(2).reshape(-1, dc.shape[1]))
    return dc, ds


class RoPEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin, position_ids, rows_per_program):
        pos = position_ids.expand(q.shape[0], q.shape[1]).reshape(-1).contiguous()
        qo, ko = _rope_op(q, k, cos, sin, pos, 1.0, rows_per_program)
        tables_need_grad = ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
        ctx.save_for_backward(cos, sin, pos, *((q, k) if tables_need_grad else ()))
        ctx.rows_per_program = rows_per_program
        return qo, ko

    @staticmethod
    def backward(ctx, dqo, dko):
        cos, sin, pos, *qk = ctx.saved_tensors
        dqo = torch.zeros_like(dqo) if dqo is None else dqo
        dko = torch.zeros_like(dko) if dko is None else dko
        dq, dk = _rope_op(dqo, dko, cos, sin, pos, -1.0, ctx.rows_per_program)
        dcos = dsin = None
        if qk:
            dcos, dsin = _table_grads(dqo, dko, qk[0], qk[1], pos.view(dqo.shape[:2]), cos)
            dcos, dsin = dcos.to(cos.dtype), dsin.to(sin.dtype)
        return dq, dk, dcos, dsin, None, None


def rope(q, k, cos, sin, position_ids, *, rows_per_program: int | None = None, inplace: bool = False):
    """Triton RoPE of q (B, T, Hq, Dh) and k (B, T, Hk, Dh) in one launch; same contract as `rope_ref`.
    `inplace=True` (inference: nothing may need a gradient) rotates q and k in their own memory."""
    check_device("rope", q, k, cos, sin, position_ids)
    if q.dim() != 4 or k.dim() != 4 or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"rope: q (B, T, Hq, Dh) and k (B, T, Hk, Dh) expected, got {tuple(q.shape)}, {tuple(k.shape)}"
        )
    dh = q.shape[-1]
    if dh % 2 or cos.shape[-1] != dh // 2 or sin.shape != cos.shape:
        raise ValueError(
            f"rope: cos/sin must be (P, Dh/2) = (P, {dh // 2}), got {tuple(cos.shape)}, {tuple(sin.shape)}"
        )
    if position_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"rope: position_ids must be an integer tensor, got {position_ids.dtype}")
    if inplace:
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, cos, sin)):
            raise ValueError("rope(inplace=True) is for inference: q, k, cos and sin must not need gradients")
        pos = position_ids.expand(q.shape[0], q.shape[1]).reshape(-1).contiguous()
        _rope_inplace_op(q, k, cos, sin, pos, rows_per_program)
        return q, k
    return RoPEFunction.apply(q, k, cos, sin, position_ids, rows_per_program)
