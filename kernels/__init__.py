"""Fused ops for minimind: pure-torch references (`op_ref`) and their Triton kernels (`op`).

The model never imports an op directly: it asks `kernels.dispatch.get_ops(name)` for a bundle of
implementations chosen at build time ("torch", "triton", "liger"). The references here are the spec
each kernel is tested against (SPEC §8); they are also the default path on CPU. The plain names
(`kernels.rmsnorm`, ...) always run Triton: on CUDA, or on the CPU under TRITON_INTERPRET=1 (set
before triton is imported); elsewhere they raise. `import kernels` itself needs no triton.

Note: Hugging Face ships an unrelated package that is also imported as `kernels`. The two are not
meant to be installed together; `transformers.utils.is_kernels_available()` stays False with ours
(tests/test_layout.py checks it).
"""

from kernels.cross_entropy import (
    cross_entropy,
    cross_entropy_ref,
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_ref,
)
from kernels.dispatch import IMPLEMENTATIONS, Ops, get_ops, resolve
from kernels.moe import moe_dispatch_combine, moe_dispatch_combine_ref, moe_gate, moe_gate_ref
from kernels.rmsnorm import add_rmsnorm, add_rmsnorm_ref, rmsnorm, rmsnorm_ref
from kernels.rope import rope, rope_ref
from kernels.swiglu import swiglu, swiglu_ref

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
