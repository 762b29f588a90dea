"""SwiGLU activation silu(gate) * up: the torch reference, the Triton kernels (elementwise, fp32
math), the autograd Function and the public op.

The backward recomputes sigmoid(gate) from the saved inputs instead of storing silu(gate), which
saves one (N, F) activation per MLP; the kernels are memory-bound, so the recompute is free.
"""

import torch
import torch.nn.functional as F

from minimind.kernels._triton import cdiv, check_device, define_op, interpreting, jit, tl


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


@jit
def _swiglu_fwd_kernel(G_ptr, U_ptr, Y_ptr, n_elements, BLOCK_SIZE: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < n_elements
    g = tl.load(G_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    tl.store(Y_ptr + offs, y.to(Y_ptr.dtype.element_ty), mask=mask)


@jit
def _swiglu_bwd_kernel(DY_ptr, G_ptr, U_ptr, DG_ptr, DU_ptr, n_elements, BLOCK_SIZE: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < n_elements
    dy = tl.load(DY_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    # d silu/dg = sig * (1 + g * (1 - sig))
    tl.store(DG_ptr + offs, (dy * u * sig * (1.0 + g * (1.0 - sig))).to(DG_ptr.dtype.element_ty), mask=mask)
    tl.store(DU_ptr + offs, (dy * silu).to(DU_ptr.dtype.element_ty), mask=mask)


def _block(block_size: int | None) -> tuple[int, int]:
    # 16K elements per program under the interpreter (~1 ms each); 1K with 4 warps on a GPU
    block = block_size or ((1 << 14) if interpreting() else 1024)
    return block, max(1, min(16, block // 256))


def _swiglu_fwd(gate, up, block_size):
    """gate and up contiguous, of one shape."""
    y = torch.empty(gate.shape, device=gate.device, dtype=torch.result_type(gate, up))
    block, num_warps = _block(block_size)
    n = gate.numel()
    _swiglu_fwd_kernel[(cdiv(n, block),)](gate, up, y, n, BLOCK_SIZE=block, num_warps=num_warps)
    return y


def _swiglu_bwd(dy, gate, up, block_size):
    dy = dy.contiguous()
    dg = torch.empty(gate.shape, device=gate.device, dtype=gate.dtype)
    du = torch.empty(up.shape, device=up.device, dtype=up.dtype)
    block, num_warps = _block(block_size)
    n = gate.numel()
    _swiglu_bwd_kernel[(cdiv(n, block),)](dy, gate, up, dg, du, n, BLOCK_SIZE=block, num_warps=num_warps)
    return dg, du


_swiglu_fwd_op = define_op(
    "swiglu_fwd(Tensor gate, Tensor up, int? block_size) -> Tensor",
    _swiglu_fwd,
    lambda gate, up, block_size: gate.new_empty(gate.shape, dtype=torch.result_type(gate, up)),
)
_swiglu_bwd_op = define_op(
    "swiglu_bwd(Tensor dy, Tensor gate, Tensor up, int? block_size) -> (Tensor, Tensor)",
    _swiglu_bwd,
    lambda dy, gate, up, block_size: (gate.new_empty(gate.shape), up.new_empty(up.shape)),
)


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, block_size):
        g, u = gate.contiguous(), up.contiguous()
        ctx.save_for_backward(g, u)
        ctx.block_size = block_size
        return _swiglu_fwd_op(g, u, block_size)

    @staticmethod
    def backward(ctx, dy):
        g, u = ctx.saved_tensors
        dg, du = _swiglu_bwd_op(dy, g, u, ctx.block_size)
        return dg, du, None


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, block_size: int | None = None) -> torch.Tensor:
    """Triton silu(gate) * up; same contract as `swiglu_ref` (gate and up of one shape)."""
    check_device("swiglu", gate, up)
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} must have one shape")
    return SwiGLUFunction.apply(gate, up, block_size)
