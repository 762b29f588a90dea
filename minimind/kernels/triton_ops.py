"""The `kernels="triton"` provider: every op of the bundle is this package's Triton kernel.

Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (the tests); anywhere else each op
raises instead of falling back to its reference.
"""

from minimind.kernels.cross_entropy import cross_entropy, fused_linear_cross_entropy
from minimind.kernels.dispatch import Ops
from minimind.kernels.moe import moe_dispatch_combine, moe_gate
from minimind.kernels.rmsnorm import add_rmsnorm, rmsnorm
from minimind.kernels.rope import rope
from minimind.kernels.swiglu import swiglu

OPS = Ops(
    name="triton",
    rmsnorm=rmsnorm,
    add_rmsnorm=add_rmsnorm,
    rope=rope,
    swiglu=swiglu,
    cross_entropy=cross_entropy,
    fused_linear_cross_entropy=fused_linear_cross_entropy,
    moe_gate=moe_gate,
    moe_dispatch_combine=moe_dispatch_combine,
)
