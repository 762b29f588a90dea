"""Triton RMSNorm and add+RMSNorm vs their references (interpreter on CPU): outputs and every gradient
over odd shapes, fp32/fp16, several rows-per-program, and the residual stream's two outputs."""

import pytest
import torch

from minimind.kernels import add_rmsnorm, add_rmsnorm_ref, rmsnorm, rmsnorm_ref
from minimind.kernels.testing import check_against_ref

SHAPES = [(3, 37, 123), (1, 1, 8), (1, 7, 768), (5, 1, 640), (2, 3, 512)]
DTYPES = [torch.float32, torch.float16]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows_per_program", [None, 4])
def test_rmsnorm(shape, dtype, rows_per_program):
    x = torch.randn(shape, dtype=dtype) * 3
    w = torch.randn(shape[-1]).to(dtype)
    op = lambda x, w: rmsnorm(x, w, 1e-6, rows_per_program=rows_per_program)
    check_against_ref(op, lambda x, w: rmsnorm_ref(x, w, 1e-6), (x, w), wrt=(0, 1), msg=f"rmsnorm {shape}")


@pytest.mark.parametrize("shape", [(1, 7, 768), (5, 1, 640)])
def test_rmsnorm_one_row_per_program(shape):
    x, w = torch.randn(shape), torch.randn(shape[-1])
    op = lambda x, w: rmsnorm(x, w, 1e-6, rows_per_program=1)
    check_against_ref(op, lambda x, w: rmsnorm_ref(x, w, 1e-6), (x, w), wrt=(0, 1), msg=f"rmsnorm {shape}")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rmsnorm(shape, dtype):
    x, r = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
    w = torch.randn(shape[-1]).to(dtype)
    op = lambda x, r, w: add_rmsnorm(x, r, w, 1e-5, rows_per_program=8)
    check_against_ref(op, lambda x, r, w: add_rmsnorm_ref(x, r, w, 1e-5), (x, r, w), wrt=(0, 1, 2),
                      msg=f"add_rmsnorm {shape}")


def test_fp32_weight_with_fp16_input_keeps_each_dtype():
    x, w = torch.randn(4, 96, dtype=torch.float16, requires_grad=True), torch.randn(96, requires_grad=True)
    y = rmsnorm(x, w, 1e-5)
    assert y.dtype == torch.float16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float16 and w.grad.dtype == torch.float32
    check_against_ref(lambda x, w: rmsnorm(x, w, 1e-5), lambda x, w: rmsnorm_ref(x, w, 1e-5), (x, w), wrt=(0, 1))


def test_new_residual_is_exactly_the_sum_and_normed_uses_it():
    x, r, w = torch.randn(6, 33), torch.randn(6, 33), torch.randn(33)
    normed, res = add_rmsnorm(x, r, w, 1e-5)
    assert torch.equal(res, x + r)
    assert torch.equal(normed, rmsnorm(x + r, w, 1e-5))


def test_bad_weight_shape_is_a_clear_error():
    with pytest.raises(ValueError, match=r"weight must be \(D,\)"):
        rmsnorm(torch.randn(2, 8), torch.randn(7), 1e-5)
    with pytest.raises(ValueError, match="residual shape"):
        add_rmsnorm(torch.randn(2, 8), torch.randn(3, 8), torch.randn(8), 1e-5)
