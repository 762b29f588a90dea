"""Triton SwiGLU vs its reference (interpreter on CPU): odd sizes, fp32/fp16, both gradients."""

import pytest
import torch

from minimind.kernels import swiglu, swiglu_ref
from minimind.kernels.testing import check_against_ref


@pytest.mark.parametrize("shape", [(3, 37, 123), (1, 1, 1), (1, 341), (2, 5, 1408)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("block_size", [None, 2048])
def test_swiglu(shape, dtype, block_size):
    gate, up = torch.randn(shape, dtype=dtype) * 4, torch.randn(shape, dtype=dtype)
    op = lambda g, u: swiglu(g, u, block_size=block_size)
    check_against_ref(op, swiglu_ref, (gate, up), wrt=(0, 1), msg=f"swiglu {shape}")


def test_swiglu_extreme_gates_stay_finite():
    gate = torch.tensor([-100.0, -20.0, 0.0, 20.0, 100.0])
    check_against_ref(swiglu, swiglu_ref, (gate, torch.ones(5)), wrt=(0, 1))


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="must have one shape"):
        swiglu(torch.randn(2, 3), torch.randn(3, 2))
