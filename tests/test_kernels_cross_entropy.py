"""Triton cross-entropy and fused linear cross-entropy vs their references (interpreter on CPU):
reductions mean/sum/none, per-token weights (and their gradient), ignored rows, an all-zero weight,
odd vocab sizes spanning several column blocks, several row chunks, fp32/fp16."""

import pytest
import torch

from minimind.kernels import (
    cross_entropy,
    cross_entropy_ref,
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_ref,
)
from minimind.kernels.testing import assert_close, check_against_ref

REDUCTIONS = ["mean", "sum", "none"]


def _targets(n, v, ignore=(2,)):
    t = torch.randint(0, v, (n,))
    t[[i for i in ignore if i < n]] = -100
    return t


@pytest.mark.parametrize("n, v", [(13, 300), (1, 7), (4, 6400), (9, 2500)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True])
def test_cross_entropy(n, v, dtype, reduction, weighted):
    logits, targets = torch.randn(n, v, dtype=dtype) * 3, _targets(n, v)
    weights = torch.rand(n) * 2 if weighted else None
    op = lambda x, t, w: cross_entropy(x, t, w, reduction=reduction, rows_per_program=2)
    ref = lambda x, t, w: cross_entropy_ref(x, t, w, reduction=reduction)
    wrt = (0, 2) if weighted else (0,)
    check_against_ref(op, ref, (logits, targets, weights), wrt=wrt, msg=f"ce {n}x{v} {reduction}")


@pytest.mark.parametrize("n, d, v, chunk", [(13, 24, 300, 4), (1, 8, 7, None), (10, 64, 6400, 3), (6, 33, 97, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_fused_linear_cross_entropy(n, d, v, chunk, dtype, reduction):
    hidden, weight = torch.randn(n, d, dtype=dtype), (torch.randn(v, d) / d**0.5).to(dtype)
    targets, weights = _targets(n, v), torch.rand(n)
    op = lambda h, w, t, tw: fused_linear_cross_entropy(h, w, t, tw, reduction=reduction, chunk_size=chunk)
    ref = lambda h, w, t, tw: fused_linear_cross_entropy_ref(h, w, t, tw, reduction=reduction)
    check_against_ref(op, ref, (hidden, weight, targets, weights), wrt=(0, 1, 3), msg=f"flce {n}x{d}x{v}")


def test_unweighted_fused_matches_reference():
    hidden, weight, targets = torch.randn(7, 16), torch.randn(50, 16), _targets(7, 50)
    check_against_ref(lambda h, w, t: fused_linear_cross_entropy(h, w, t, chunk_size=2),
                      fused_linear_cross_entropy_ref, (hidden, weight, targets), wrt=(0, 1))


def test_all_zero_weight_and_all_ignored_give_zero_not_nan():
    logits = torch.randn(5, 11, requires_grad=True)
    targets = torch.randint(0, 11, (5,))
    loss = cross_entropy(logits, targets, torch.zeros(5))
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(logits.grad) == 0
    ignored = cross_entropy(logits, torch.full((5,), -100))
    assert ignored.item() == 0.0
    assert_close(ignored, cross_entropy_ref(logits, torch.full((5,), -100)))


def test_custom_ignore_index():
    logits, targets = torch.randn(6, 9), torch.tensor([1, 0, 3, 0, 8, 2])
    op = lambda x, t: cross_entropy(x, t, ignore_index=0)
    check_against_ref(op, lambda x, t: cross_entropy_ref(x, t, ignore_index=0), (logits, targets), wrt=(0,))


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="reduction must be"):
        cross_entropy(torch.randn(2, 3), torch.zeros(2, dtype=torch.long), reduction="avg")
    with pytest.raises(ValueError, match="integer class indices"):
        cross_entropy(torch.randn(2, 3), torch.zeros(2))
    with pytest.raises(ValueError, match=r"weights must be \(N,\)"):
        cross_entropy(torch.randn(2, 3), torch.zeros(2, dtype=torch.long), torch.ones(3))
    with pytest.raises(ValueError, match=r"weight must be \(V, D=4\)"):
        fused_linear_cross_entropy(torch.randn(2, 4), torch.randn(5, 3), torch.zeros(2, dtype=torch.long))
