"""Mixture-of-experts gating and dispatch/combine (DeepSeek-style routed experts): the torch
references, the Triton kernels, the autograd Functions and the public ops.

Expert weights are stacked: w_gate, w_up (E, F, D) and w_down (E, D, F), so every expert is part of
the graph on every step (an expert that receives no token gets an exact zero gradient, never None,
which DDP needs).

The reference dispatch sorts the N*K token-slots by expert and runs each expert on its contiguous
segment. It reads the per-expert counts on the host, which costs nothing on the CPU. The Triton path
sorts the same way but keeps the counts on the device: a grouped matmul launches an upper bound of
cdiv(N*K, BLOCK_M) + E - 1 row tiles, each finds its expert from the per-expert tile ends, spare
tiles do nothing; the weight gradients are a grouped reduction over each expert's own rows. So there
is no `.item()`, no per-expert launch, nothing that breaks CUDA graphs. Tokens are gathered inside
the matmul (no (N*K, D) copy of the hidden states in the forward); the combine is an index_add of
the gate-weighted expert outputs.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F

from minimind.kernels._triton import cdiv, check_device, define_op, interpreting, jit, next_pow2, tl
from minimind.kernels.swiglu import _swiglu_bwd_op


def moe_gate_ref(
    hidden: torch.Tensor,  # (N, D)
    gate_weight: torch.Tensor,  # (E, D)
    top_k: int,
    norm_topk_prob: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # softmax in fp32: the router's probabilities feed the aux loss and the combine weights.
    probs = F.linear(hidden.float(), gate_weight.float()).softmax(dim=-1)  # (N, E)
    topk_weight, topk_idx = torch.topk(probs, top_k, dim=-1, sorted=False)  # (N, K)
    if top_k > 1 and norm_topk_prob:
        topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20)
    return topk_weight, topk_idx, probs


def moe_dispatch_combine_ref(
    hidden: torch.Tensor,  # (N, D)
    topk_weight: torch.Tensor,  # (N, K)
    topk_idx: torch.Tensor,  # (N, K) int64
    w_gate: torch.Tensor,  # (E, F, D)
    w_up: torch.Tensor,  # (E, F, D)
    w_down: torch.Tensor,  # (E, D, F)
) -> torch.Tensor:
    n, k = topk_idx.shape
    n_experts = w_gate.shape[0]
    flat_idx = topk_idx.reshape(-1)  # (N*K,)
    order = torch.argsort(flat_idx, stable=True)
    token_of_slot = order // k
    x = hidden[token_of_slot]  # (N*K, D), grouped by expert
    counts = torch.bincount(flat_idx, minlength=n_experts).tolist()
    outs = []
    start = 0
    for e, count in enumerate(counts):
        seg = x[start : start + count]
        outs.append(F.linear(F.silu(F.linear(seg, w_gate[e])) * F.linear(seg, w_up[e]), w_down[e]))
        start += count
    y = torch.cat(outs, dim=0)  # (N*K, D)
    y = y * topk_weight.reshape(-1)[order].unsqueeze(-1).to(y.dtype)
    out = torch.zeros_like(hidden)
    return out.index_add(0, token_of_slot, y.to(hidden.dtype))


@jit
def _moe_gate_fwd_kernel(
    LOGITS_ptr, PROBS_ptr, TW_ptr, TI_ptr, n_rows, n_experts,
    TOP_K: tl.constexpr, NORM: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_E: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_E)
    row_mask = rows < n_rows
    mask = row_mask[:, None] & (cols[None, :] < n_experts)
    x = tl.load(LOGITS_ptr + rows[:, None] * n_experts + cols[None, :], mask=mask, other=float("-inf"))
    x = tl.where(row_mask[:, None], x, 0.0)  # rows past n_rows: finite, never stored
    e_x = tl.exp(x - tl.max(x, axis=1)[:, None])
    p = e_x / tl.sum(e_x, axis=1)[:, None]
    tl.store(PROBS_ptr + rows[:, None] * n_experts + cols[None, :], p, mask=mask)
    # top-k by K rounds of argmax (ties: lowest index); padding columns get -1 so they are never picked
    work = tl.where(mask, p, -1.0)
    denom = tl.zeros((BLOCK_ROWS,), dtype=tl.float32)
    for _ in tl.static_range(TOP_K):
        denom += tl.max(work, axis=1)
        work = tl.where(cols[None, :] == tl.argmax(work, axis=1)[:, None], -1.0, work)
    scale = tl.full((BLOCK_ROWS,), 1.0, dtype=tl.float32)
    if NORM:
        scale = 1.0 / (denom + 1e-20)
    work = tl.where(mask, p, -1.0)
    for k in tl.static_range(TOP_K):
        idx = tl.argmax(work, axis=1)
        tl.store(TW_ptr + rows * TOP_K + k, tl.max(work, axis=1) * scale, mask=row_mask)
        tl.store(TI_ptr + rows * TOP_K + k, idx.to(tl.int64), mask=row_mask)
        work = tl.where(cols[None, :] == idx[:, None], -1.0, work)


@jit
def _moe_gate_bwd_kernel(
    PROBS_ptr, TW_ptr, TI_ptr, DTW_ptr, DPROBS_ptr, DLOGITS_ptr, n_rows, n_experts,
    HAS_DPROBS: tl.constexpr, TOP_K: tl.constexpr, NORM: tl.constexpr, BLOCK_ROWS: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_E)
    row_mask = rows < n_rows
    mask = row_mask[:, None] & (cols[None, :] < n_experts)
    offs = rows[:, None] * n_experts + cols[None, :]
    p = tl.load(PROBS_ptr + offs, mask=mask, other=0.0)
    dp = tl.zeros((BLOCK_ROWS, BLOCK_E), dtype=tl.float32)
    if HAS_DPROBS:
        dp += tl.load(DPROBS_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if NORM:
        # tw_k = p_k / S, S = sum of the chosen p: dp_m = (dtw_m - sum_k dtw_k * tw_k) / S
        denom = tl.zeros((BLOCK_ROWS,), dtype=tl.float32)
        dot = tl.zeros((BLOCK_ROWS,), dtype=tl.float32)
        for k in tl.static_range(TOP_K):
            idx = tl.load(TI_ptr + rows * TOP_K + k, mask=row_mask, other=0)
            denom += tl.sum(tl.where(cols[None, :] == idx[:, None], p, 0.0), axis=1)
            dtw = tl.load(DTW_ptr + rows * TOP_K + k, mask=row_mask, other=0.0).to(tl.float32)
            dot += dtw * tl.load(TW_ptr + rows * TOP_K + k, mask=row_mask, other=0.0)
        denom += 1e-20
    for k in tl.static_range(TOP_K):
        idx = tl.load(TI_ptr + rows * TOP_K + k, mask=row_mask, other=0)
        dtw = tl.load(DTW_ptr + rows * TOP_K + k, mask=row_mask, other=0.0).to(tl.float32)
        if NORM:
            dtw = (dtw - dot) / denom
        dp += tl.where(cols[None, :] == idx[:, None], dtw[:, None], 0.0)
    # softmax backward: p * (dp - sum(p * dp))
    dlogits = p * (dp - tl.sum(p * dp, axis=1)[:, None])
    tl.store(DLOGITS_ptr + offs, dlogits, mask=mask)


@jit
def _grouped_mm_kernel(
    A_ptr, A_IDX_ptr, B_ptr, B2_ptr, C_ptr, C2_ptr, ACT_ptr, SEG_START_ptr, SEG_COUNT_ptr, TILE_END_ptr,
    n_experts, n_out, n_inner, stride_a_row, stride_b_e, stride_b_k, stride_b_n, stride_c_row,
    GATHER_A: tl.constexpr, DUAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """C[rows of expert e] = A[rows] @ B[e] (B[e] read as (inner, out) through its strides); with DUAL
    also C2 = A @ B2[e] and ACT = silu(C) * C2. Program (tile, n) finds its expert from the
    per-expert tile ends, on the device: no host sync, empty experts own no tile."""
    tile = tl.program_id(0)
    experts = tl.arange(0, BLOCK_E)
    tile_ends = tl.load(TILE_END_ptr + experts, mask=experts < n_experts, other=1 << 30)
    e = tl.sum((tile_ends <= tile).to(tl.int32), axis=0)
    valid = e < n_experts  # the grid is an upper bound: spare tiles do nothing
    e = tl.minimum(e, n_experts - 1)
    count = tl.load(SEG_COUNT_ptr + e)
    seg_start = tl.load(SEG_START_ptr + e)
    first_tile = tl.load(TILE_END_ptr + e) - tl.cdiv(count, BLOCK_M)
    rows = (seg_start + (tile - first_tile) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_mask = rows < tl.where(valid, seg_start + count, 0)
    a_rows = tl.load(A_IDX_ptr + rows, mask=row_mask, other=0) if GATHER_A else rows
    cols = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    col_mask = cols < n_out
    b_off = e.to(tl.int64) * stride_b_e + cols[None, :] * stride_b_n
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, tl.where(valid, n_inner, 0), BLOCK_K):  # spare tiles skip the loop
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < n_inner
        a = tl.load(A_ptr + a_rows[:, None] * stride_a_row + ks[None, :], mask=row_mask[:, None] & k_mask[None, :],
                    other=0.0)
        b_mask = k_mask[:, None] & col_mask[None, :]
        b = tl.load(B_ptr + b_off + ks[:, None] * stride_b_k, mask=b_mask, other=0.0).to(a.dtype)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        if DUAL:
            b2 = tl.load(B2_ptr + b_off + ks[:, None] * stride_b_k, mask=b_mask, other=0.0).to(a.dtype)
            acc2 = tl.dot(a, b2, acc2, input_precision=DOT_PRECISION)
    c_offs = rows[:, None] * stride_c_row + cols[None, :]
    mask = row_mask[:, None] & col_mask[None, :]
    h1 = acc.to(C_ptr.dtype.element_ty)
    tl.store(C_ptr + c_offs, h1, mask=mask)
    if DUAL:
        h2 = acc2.to(C2_ptr.dtype.element_ty)
        tl.store(C2_ptr + c_offs, h2, mask=mask)
        # silu of the stored (rounded) values: the backward recomputes from exactly these
        g = h1.to(tl.float32)
        tl.store(ACT_ptr + c_offs, (g * tl.sigmoid(g) * h2.to(tl.float32)).to(ACT_ptr.dtype.element_ty), mask=mask)


@jit
def _grouped_wgrad_kernel(
    L_ptr, R_ptr, R_IDX_ptr, OUT_ptr, SEG_START_ptr, SEG_COUNT_ptr,
    n_p, n_q, stride_l_row, stride_r_row, stride_o_e, stride_o_p, stride_o_q,
    GATHER_R: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """OUT[e] (P, Q) = L[seg e].T @ R[seg e]: each expert reduces over its own rows; an expert with no
    rows writes exact zeros (its gradient is 0, never missing)."""
    e = tl.program_id(0).to(tl.int64)
    ps = (tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
    qs = (tl.program_id(2) * BLOCK_Q + tl.arange(0, BLOCK_Q)).to(tl.int64)
    p_mask, q_mask = ps < n_p, qs < n_q
    seg_start = tl.load(SEG_START_ptr + e)
    count = tl.load(SEG_COUNT_ptr + e)
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    for m0 in range(0, count, BLOCK_K):
        ms = tl.arange(0, BLOCK_K) + m0
        m_mask = ms < count
        rows = (seg_start + ms).to(tl.int64)
        lt = tl.load(L_ptr + rows[None, :] * stride_l_row + ps[:, None], mask=p_mask[:, None] & m_mask[None, :],
                     other=0.0)  # (P, K): L transposed by addressing
        r_rows = tl.load(R_IDX_ptr + rows, mask=m_mask, other=0) if GATHER_R else rows
        r = tl.load(R_ptr + r_rows[:, None] * stride_r_row + qs[None, :], mask=m_mask[:, None] & q_mask[None, :],
                    other=0.0).to(lt.dtype)
        acc = tl.dot(lt, r, acc, input_precision=DOT_PRECISION)
    out = OUT_ptr + e * stride_o_e + ps[:, None] * stride_o_p + qs[None, :] * stride_o_q
    tl.store(out, acc.to(OUT_ptr.dtype.element_ty), mask=p_mask[:, None] & q_mask[None, :])


def _gate_rows(n_experts: int) -> tuple[int, int]:
    block_e = next_pow2(n_experts)
    return block_e, max(1, (1 << 14 if interpreting() else 1 << 10) // block_e)


def _gate_fwd(logits, top_k, norm):
    """logits (N, E) fp32 contiguous -> (topk_weight (N, K) fp32, topk_idx (N, K) int64, probs (N, E) fp32)."""
    n, n_experts = logits.shape
    probs = torch.empty_like(logits)
    topk_weight = torch.empty((n, top_k), device=logits.device, dtype=torch.float32)
    topk_idx = torch.empty((n, top_k), device=logits.device, dtype=torch.int64)
    block_e, rows = _gate_rows(n_experts)
    _moe_gate_fwd_kernel[(cdiv(n, rows),)](
        logits, probs, topk_weight, topk_idx, n, n_experts,
        TOP_K=top_k, NORM=norm, BLOCK_ROWS=rows, BLOCK_E=block_e,
    )
    return topk_weight, topk_idx, probs


def _gate_bwd(probs, topk_weight, topk_idx, dtw, dprobs, top_k, norm):
    """d logits (N, E) fp32 from d topk_weight (N, K) fp32 and d probs (N, E) (None: zero)."""
    n, n_experts = probs.shape
    dlogits = torch.empty_like(probs)
    block_e, rows = _gate_rows(n_experts)
    _moe_gate_bwd_kernel[(cdiv(n, rows),)](
        probs, topk_weight, topk_idx, dtw, dprobs.contiguous() if dprobs is not None else probs, dlogits,
        n, n_experts, HAS_DPROBS=dprobs is not None, TOP_K=top_k, NORM=norm, BLOCK_ROWS=rows,
        BLOCK_E=block_e,
    )
    return dlogits


_gate_fwd_op = define_op(
    "moe_gate_fwd(Tensor logits, int top_k, bool norm) -> (Tensor, Tensor, Tensor)",
    _gate_fwd,
    lambda logits, top_k, norm: (
        logits.new_empty((logits.shape[0], top_k)),
        logits.new_empty((logits.shape[0], top_k), dtype=torch.int64),
        torch.empty_like(logits),
    ),
)
_gate_bwd_op = define_op(
    "moe_gate_bwd(Tensor probs, Tensor topk_weight, Tensor topk_idx, Tensor dtw, Tensor? dprobs, int top_k,"
    " bool norm) -> Tensor",
    _gate_bwd,
    lambda probs, topk_weight, topk_idx, dtw, dprobs, top_k, norm: torch.empty_like(probs),
)


class MoEGateFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, gate_weight, top_k, norm_topk_prob):
        with torch.autocast(hidden.device.type, enabled=False):  # the router stays fp32 under autocast
            logits = F.linear(hidden.float(), gate_weight.float()).contiguous()  # (N, E), cuBLAS
        norm = bool(norm_topk_prob and top_k > 1)
        topk_weight, topk_idx, probs = _gate_fwd_op(logits, top_k, norm)
        ctx.save_for_backward(hidden, gate_weight, probs, topk_weight, topk_idx)
        ctx.meta = (top_k, norm)
        ctx.mark_non_differentiable(topk_idx)
        return topk_weight, topk_idx, probs

    @staticmethod
    def backward(ctx, dtw, _didx, dprobs):
        hidden, gate_weight, probs, topk_weight, topk_idx = ctx.saved_tensors
        top_k, norm = ctx.meta
        dtw = torch.zeros_like(topk_weight) if dtw is None else dtw.float().contiguous()
        dlogits = _gate_bwd_op(probs, topk_weight, topk_idx, dtw, dprobs, top_k, norm)
        dhidden = (dlogits @ gate_weight.float()).to(hidden.dtype) if ctx.needs_input_grad[0] else None
        dgate = (dlogits.t() @ hidden.float()).to(gate_weight.dtype) if ctx.needs_input_grad[1] else None
        return dhidden, dgate, None, None


class _Routing(NamedTuple):
    order: torch.Tensor  # (N*K,) slot ids sorted by expert
    tok: torch.Tensor  # (N*K,) the token of each sorted slot
    seg_start: torch.Tensor  # (E,) first sorted row of each expert
    counts: torch.Tensor  # (E,) rows per expert (0 allowed)
    tile_end: torch.Tensor  # (E,) cumulative BLOCK_M tiles
    n_tiles: int  # grid upper bound, known on the host without reading counts


def _route(topk_idx: torch.Tensor, n_experts: int, block_m: int) -> _Routing:
    flat = topk_idx.reshape(-1)
    m = flat.numel()
    order = torch.argsort(flat, stable=True)
    # scatter_add, not bincount: bincount sizes its output from max(idx), a host sync on CUDA
    counts = torch.zeros(n_experts, device=flat.device, dtype=torch.int64).scatter_add_(0, flat, torch.ones_like(flat))
    ends = torch.cumsum(counts, 0)
    tile_end = torch.cumsum((counts + block_m - 1) // block_m, 0)
    n_tiles = max(1, min(m, cdiv(m, block_m) + n_experts - 1))
    # int32 metadata: the kernels' loop bounds and tile ids are int32 (N*K < 2**31)
    i32 = lambda t: t.to(torch.int32)
    return _Routing(order, order // topk_idx.shape[1], i32(ends - counts), i32(counts), i32(tile_end), n_tiles)


def _blocks(block_sizes):
    if block_sizes is not None:
        return block_sizes
    # interpreter: few programs (~1 ms each) but short row tiles, since its tl.dot costs in proportion to
    # the tile (padding rows included: each expert's last tile is padded to BLOCK_M); GPU: 64x64 tiles
    return (16, 128, 128) if interpreting() else (64, 64, 32)


def _precision(a: torch.Tensor) -> str:
    # fp32 operands: exact fp32 products ("ieee"), not TF32's 10-bit mantissa; bf16/fp16: the default
    return "ieee" if a.dtype == torch.float32 else "tf32"


def _grouped_mm(a, tok, w, w2, seg_start, counts, tile_end, n_tiles, transpose, gather, blocks):
    """The launcher behind `_expert_mm`: [c] or, with w2, [c, c2, act], each (M, n_out) in a's dtype."""
    block_m, block_n, block_k = blocks
    w = w.contiguous()
    n_inner, n_out = (w.shape[2], w.shape[1]) if transpose else (w.shape[1], w.shape[2])
    stride_k, stride_n = (w.stride(2), w.stride(1)) if transpose else (w.stride(1), w.stride(2))
    m = tok.numel()
    c = torch.empty((m, n_out), device=a.device, dtype=a.dtype)
    c2 = torch.empty_like(c) if w2 is not None else c
    act = torch.empty_like(c) if w2 is not None else c
    grid = (n_tiles, cdiv(n_out, block_n))
    _grouped_mm_kernel[grid](
        a, tok, w, w2.contiguous() if w2 is not None else w, c, c2, act, seg_start, counts, tile_end,
        w.shape[0], n_out, n_inner, a.stride(0), w.stride(0), stride_k, stride_n, c.stride(0),
        GATHER_A=gather, DUAL=w2 is not None, DOT_PRECISION=_precision(a),
        BLOCK_E=next_pow2(w.shape[0]), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=4, **({} if interpreting() else {"num_stages": 3}),
    )
    return [c, c2, act] if w2 is not None else [c]


def _grouped_mm_fake(a, tok, w, w2, seg_start, counts, tile_end, n_tiles, transpose, gather, blocks):
    n_out = w.shape[1] if transpose else w.shape[2]
    return [a.new_empty((tok.numel(), n_out)) for _ in range(3 if w2 is not None else 1)]


_grouped_mm_op = define_op(
    "moe_grouped_mm(Tensor a, Tensor tok, Tensor w, Tensor? w2, Tensor seg_start, Tensor counts, Tensor tile_end,"
    " int n_tiles, bool transpose, bool gather, int[] blocks) -> Tensor[]",
    _grouped_mm, _grouped_mm_fake,
)


def _expert_mm(a, r: _Routing, w, blocks, *, transpose: bool, gather: bool, w2=None):
    """Per sorted row m of expert e: a[row] @ (w[e].T if transpose else w[e]); rows gathered by r.tok
    when `gather`. With w2: returns (a @ w, a @ w2, silu(a @ w) * (a @ w2))."""
    out = _grouped_mm_op(a, r.tok, w, w2, r.seg_start, r.counts, r.tile_end, r.n_tiles, transpose, gather, blocks)
    return tuple(out) if w2 is not None else out[0]


def _grouped_wgrad(left, right, tok, seg_start, counts, like, gather_right, blocks):
    block_m, block_n, _ = blocks  # the reduction runs over rows, BLOCK_M at a time
    out = torch.empty(like.shape, device=like.device, dtype=like.dtype)
    n_experts, n_p, n_q = out.shape
    grid = (n_experts, cdiv(n_p, block_n), cdiv(n_q, block_n))
    _grouped_wgrad_kernel[grid](
        left, right, tok, out, seg_start, counts, n_p, n_q, left.stride(0), right.stride(0),
        out.stride(0), out.stride(1), out.stride(2),
        GATHER_R=gather_right, DOT_PRECISION=_precision(left), BLOCK_P=block_n, BLOCK_Q=block_n,
        BLOCK_K=block_m, num_warps=4,
    )
    return out


_grouped_wgrad_op = define_op(
    "moe_grouped_wgrad(Tensor left, Tensor right, Tensor tok, Tensor seg_start, Tensor counts, Tensor like,"
    " bool gather_right, int[] blocks) -> Tensor",
    _grouped_wgrad,
    lambda left, right, tok, seg_start, counts, like, gather_right, blocks: like.new_empty(like.shape),
)


def _expert_wgrad(left, right, r: _Routing, like: torch.Tensor, blocks, *, gather_right: bool):
    """(E, P, Q) shaped like `like`: out[e] = left[seg e].T @ right[seg e] (right rows gathered by r.tok)."""
    return _grouped_wgrad_op(left, right, r.tok, r.seg_start, r.counts, like, gather_right, blocks)


class MoEDispatchCombineFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, topk_weight, topk_idx, w_gate, w_up, w_down, blocks):
        hidden = hidden.contiguous()
        r = _route(topk_idx, w_gate.shape[0], blocks[0])
        h1, h2, act = _expert_mm(hidden, r, w_gate, blocks, transpose=True, gather=True, w2=w_up)  # (N*K, F)
        y = _expert_mm(act, r, w_down, blocks, transpose=True, gather=False)  # (N*K, D), sorted order
        w_sorted = topk_weight.reshape(-1)[r.order]
        out = torch.zeros_like(hidden).index_add_(0, r.tok, y * w_sorted.unsqueeze(-1).to(y.dtype))
        ctx.save_for_backward(hidden, topk_weight, w_gate, w_up, w_down, h1, h2, act, y, w_sorted, *r[:5])
        ctx.meta = (blocks, r.n_tiles)
        return out

    @staticmethod
    def backward(ctx, dout):
        hidden, topk_weight, w_gate, w_up, w_down, h1, h2, act, y, w_sorted, *routing = ctx.saved_tensors
        blocks, n_tiles = ctx.meta
        r = _Routing(*routing, n_tiles)
        dy_w = dout.contiguous()[r.tok]  # (N*K, D): d of the weighted expert output
        # d topk_weight of each slot = <dout[token], y[slot]>, scattered back from sorted order
        dtw = torch.empty_like(w_sorted, dtype=torch.float32).scatter_(0, r.order, (dy_w.float() * y.float()).sum(-1))
        dy = dy_w * w_sorted.unsqueeze(-1).to(dy_w.dtype)
        dact = _expert_mm(dy, r, w_down, blocks, transpose=False, gather=False)  # (N*K, F)
        dh1, dh2 = _swiglu_bwd_op(dact, h1, h2, None)
        dx_sorted = _expert_mm(dh1, r, w_gate, blocks, transpose=False, gather=False)
        dx_sorted += _expert_mm(dh2, r, w_up, blocks, transpose=False, gather=False)
        dhidden = torch.zeros_like(hidden).index_add_(0, r.tok, dx_sorted)
        d_down = _expert_wgrad(dy, act, r, w_down, blocks, gather_right=False)  # (E, D, F)
        d_gate = _expert_wgrad(dh1, hidden, r, w_gate, blocks, gather_right=True)  # (E, F, D)
        d_up = _expert_wgrad(dh2, hidden, r, w_up, blocks, gather_right=True)
        return dhidden, dtw.view(topk_weight.shape).to(topk_weight.dtype), None, d_gate, d_up, d_down, None


def moe_gate(hidden, gate_weight, top_k: int, norm_topk_prob: bool):
    """Triton softmax router: (topk_weight (N, K) fp32, topk_idx (N, K) int64, probs (N, E) fp32), top-k
    sorted by weight (ties: lowest expert); same contract as `moe_gate_ref` (whose order is unspecified)."""
    check_device("moe_gate", hidden, gate_weight)
    if hidden.dim() != 2 or gate_weight.dim() != 2 or gate_weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"moe_gate: hidden (N, D) and gate_weight (E, D) expected, got {tuple(hidden.shape)}, "
                         f"{tuple(gate_weight.shape)}")
    if not 1 <= top_k <= gate_weight.shape[0]:
        raise ValueError(f"moe_gate: top_k must be in 1..E ({gate_weight.shape[0]}), got {top_k}")
    return MoEGateFunction.apply(hidden, gate_weight, int(top_k), bool(norm_topk_prob))


def moe_dispatch_combine(hidden, topk_weight, topk_idx, w_gate, w_up, w_down, *, block_sizes=None):
    """Triton grouped-matmul experts: (N, D) = Σ_k topk_weight * down_e(silu(gate_e x) * up_e x); same
    contract as `moe_dispatch_combine_ref`. `block_sizes` = (BLOCK_M, BLOCK_N, BLOCK_K), each >= 16."""
    check_device("moe_dispatch_combine", hidden, topk_weight, topk_idx, w_gate, w_up, w_down)
    n, d = hidden.shape
    n_experts, f, _ = w_gate.shape
    if topk_idx.shape != topk_weight.shape or topk_idx.shape[0] != n or topk_idx.dtype != torch.int64:
        raise ValueError(f"moe_dispatch_combine: topk_idx (N, K) int64 and topk_weight (N, K) expected for N={n}, "
                         f"got {tuple(topk_idx.shape)} {topk_idx.dtype}, {tuple(topk_weight.shape)}")
    if w_gate.shape != (n_experts, f, d) or w_up.shape != w_gate.shape or w_down.shape != (n_experts, d, f):
        raise ValueError(f"moe_dispatch_combine: w_gate, w_up (E, F, D) and w_down (E, D, F) expected with D={d}, "
                         f"got {tuple(w_gate.shape)}, {tuple(w_up.shape)}, {tuple(w_down.shape)}")
    if (not hidden.is_cuda and not torch.compiler.is_compiling() and topk_idx.numel()
            and not 0 <= int(topk_idx.min()) <= int(topk_idx.max()) < n_experts):
        # checked on the CPU only: on CUDA the check would be a host sync, and under torch.compile a graph break
        raise ValueError(f"moe_dispatch_combine: topk_idx values must be in 0..{n_experts - 1}")
    if torch.is_autocast_enabled(hidden.device.type):
        # as F.linear in the reference would: the expert matmuls run in the autocast dtype
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, w_gate, w_up, w_down = (t.to(dtype) for t in (hidden, w_gate, w_up, w_down))
    return MoEDispatchCombineFunction.apply(hidden, topk_weight, topk_idx, w_gate, w_up, w_down, _blocks(block_sizes))
