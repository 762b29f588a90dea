"""The kernel providers: `kernels="triton"` is our Triton ops, the plain names never fall back to the
references, `import minimind.kernels` works without triton, and `kernels="liger"` either adapts liger-kernel
correctly or says clearly that it is not installed."""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from minimind import kernels
from minimind.kernels.testing import check_against_ref
from tests.conftest import ROOT

HAS_LIGER = importlib.util.find_spec("liger_kernel") is not None


def _python(code: str, **env) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**base, **env}, capture_output=True,
                          text=True, timeout=300)


def test_triton_provider_is_our_triton_ops():
    ops = kernels.get_ops("triton")
    assert ops.name == "triton"
    for name in ("rmsnorm", "add_rmsnorm", "rope", "swiglu", "cross_entropy", "fused_linear_cross_entropy",
                 "moe_gate", "moe_dispatch_combine"):
        assert getattr(ops, name) is getattr(kernels, name), name
        assert getattr(kernels, name) is not getattr(kernels, f"{name}_ref")


def test_plain_names_refuse_cpu_tensors_without_the_interpreter():
    out = _python(
        "import torch\nfrom minimind import kernels\n"
        "try:\n"
        "    kernels.rmsnorm(torch.randn(2, 4), torch.ones(4), 1e-5)\n"
        "except RuntimeError as e:\n"
        "    print('refused:', e)\n"
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "refused: minimind.kernels.rmsnorm runs Triton: it needs CUDA tensors, or TRITON_INTERPRET=1" in out.stdout


def test_import_kernels_and_the_torch_path_need_no_triton():
    out = _python(
        "import sys; sys.modules['triton'] = None  # as if triton were not installed\n"
        "import torch\nfrom minimind import kernels\n"
        "from minimind.config import ModelConfig\n"
        "from minimind.model import MiniMindForCausalLM\n"
        "m = MiniMindForCausalLM(ModelConfig.from_preset('tiny', kernels='torch'))\n"
        "print('logits', tuple(m(torch.zeros(1, 3, dtype=torch.long)).logits.shape))\n"
        "try:\n"
        "    kernels.swiglu(torch.randn(3), torch.randn(3))\n"
        "except ImportError as e:\n"
        "    print('refused:', e)\n"
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "logits (1, 3, 6400)" in out.stdout
    assert "refused: minimind.kernels.swiglu needs triton, which is not installed" in out.stdout


def test_liger_provider_without_liger_kernel_says_so():
    out = _python(
        "import sys; sys.modules['liger_kernel'] = None  # as if liger-kernel were not installed\n"
        "from minimind import kernels\n"
        "try:\n"
        "    kernels.get_ops('liger')\n"
        "except ImportError as e:\n"
        "    print('refused:', e)\n"
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "refused: kernels='liger' needs liger-kernel, which is not installed" in out.stdout


@pytest.mark.skipif(not HAS_LIGER, reason="liger-kernel is not installed")
def test_liger_adapters_match_the_references():
    # Only the liger ops that run under the interpreter: its RMSNorm and SiLU-mul kernels do not
    # (they are compared on the GPU, tests/test_kernels_gpu.py).
    ops = kernels.get_ops("liger")
    q, k = torch.randn(2, 5, 4, 8), torch.randn(2, 5, 2, 8)
    tables = (torch.randn(12, 4), torch.randn(12, 4), (torch.arange(5) % 3).expand(2, 5))
    check_against_ref(ops.rope, kernels.rope_ref, (q, k, *tables), wrt=(0, 1))
    logits, targets = torch.randn(6, 40), torch.tensor([1, -100, 3, 39, 0, 7])
    # Liger's cross-entropy overwrites its logits with their gradient (by design): give it a copy
    liger_ce = lambda x, t: ops.cross_entropy(x.clone(), t)
    check_against_ref(liger_ce, kernels.cross_entropy_ref, (logits, targets), wrt=(0,))
    hidden, weight = torch.randn(6, 16), torch.randn(40, 16)
    check_against_ref(ops.fused_linear_cross_entropy, kernels.fused_linear_cross_entropy_ref,
                      (hidden, weight, targets), wrt=(0, 1))
    # per-token weights: Liger has none, the provider uses our reference
    w = torch.rand(6)
    assert torch.equal(ops.cross_entropy(logits, targets, w), kernels.cross_entropy_ref(logits, targets, w))
