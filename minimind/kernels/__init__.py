"""Fused ops for minimind: pure-torch references (`op_ref`) and their Triton kernels (`op`).

The model never imports an op directly: it asks `minimind.kernels.dispatch.get_ops(name)` for a bundle of
implementations chosen at build time ("torch", "triton", "liger"). The references here are the spec
each kernel is tested against (SPEC §8); they are also the default path on CPU. The plain names
(`minimind.kernels.rmsnorm`, ...) always run Triton: on CUDA, or on the CPU under TRITON_INTERPRET=1
(set before triton is imported); elsewhere they raise. `import minimind.kernels` itself needs no triton.

The package lives inside `minimind` because the top-level name `kernels` belongs to Hugging Face's
package of that name, which transformers requires (tests/test_layout.py keeps our import names ours).
"""

from minimind.kernels.cross_entropy import (
    cross_entropy,
    cross_entropy_ref,
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_ref,
)
from minimind.kernels.dispatch import IMPLEMENTATIONS, Ops, get_ops, resolve
from minimind.kernels.moe import moe_dispatch_combine, moe_dispatch_combine_ref, moe_gate, moe_gate_ref
from minimind.kernels.rmsnorm import add_rmsnorm, add_rmsnorm_ref, rmsnorm, rmsnorm_ref
from minimind.kernels.rope import rope, rope_ref
from minimind.kernels.swiglu import swiglu, swiglu_ref

__all__ = [
    "IMPLEMENTATIONS",
    "Ops",
    "add_rmsnorm",
    "add_rmsnorm_ref",
    "cross_entropy",
    "cross_entropy_ref",
    "fused_linear_cross_entropy",
    "fused_linear_cross_entropy_ref",
    "get_ops",
    "moe_dispatch_combine",
    "moe_dispatch_combine_ref",
    "moe_gate",
    "moe_gate_ref",
    "resolve",
    "rmsnorm",
    "rmsnorm_ref",
    "rope",
    "rope_ref",
    "swiglu",
    "swiglu_ref",
]
