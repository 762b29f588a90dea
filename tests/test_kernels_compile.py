"""Every Triton kernel compiles to Hopper (sm_90) machine code, on a machine with no GPU: the
interpreter runs the kernels' Python and cannot see compile-time errors (types of loop-carried
values, constexpr branches, dot shapes), so this is the CPU's check of the GPU path."""

import os
import subprocess
import sys

from tests.conftest import ROOT


def test_every_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("from minimind.kernels.testing import compile_kernels\n"
            "for name in compile_kernels(90): print('compiled', name)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**env, "TRITON_DEFAULT_FP_FUSION": "1"},
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    for kernel in ("_rmsnorm_fwd_kernel", "_rmsnorm_bwd_kernel", "_rope_kernel", "_swiglu_fwd_kernel",
                   "_swiglu_bwd_kernel", "_ce_fwd_kernel", "_moe_gate_fwd_kernel", "_moe_gate_bwd_kernel",
                   "_grouped_mm_kernel", "_grouped_wgrad_kernel"):
        assert f"compiled {kernel}[bf16" in out.stdout, kernel
