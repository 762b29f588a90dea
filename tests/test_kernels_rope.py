"""Triton RoPE vs its reference (interpreter on CPU): GQA head counts, odd head dims, T=1 decode at
an offset, packed sequences whose positions restart, fp32/fp16, q/k gradients and the tables'."""

import pytest
import torch

from minimind.kernels import rope, rope_ref
from minimind.kernels.testing import check_against_ref

# (B, T, Hq, Hk, Dh)
SHAPES = [(2, 5, 6, 2, 10), (1, 1, 8, 2, 64), (3, 7, 4, 4, 32), (1, 9, 3, 1, 6)]


def _positions(b, t, kind):
    if kind == "plain":
        return torch.arange(t).expand(b, t)
    if kind == "decode":  # each row at its own offset, e.g. T=1 decode steps of different lengths
        return torch.arange(t).expand(b, t) + torch.arange(b).unsqueeze(1) * 3 + 11
    doc = torch.arange(t) % 3  # packed documents: positions restart at 0
    return doc.expand(b, t)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("positions", ["plain", "decode", "packed"])
def test_rope(shape, dtype, positions):
    b, t, hq, hk, dh = shape
    q, k = torch.randn(b, t, hq, dh, dtype=dtype), torch.randn(b, t, hk, dh, dtype=dtype)
    cos, sin = torch.randn(32, dh // 2), torch.randn(32, dh // 2)
    pos = _positions(b, t, positions)
    op = lambda q, k, c, s, p: rope(q, k, c, s, p, rows_per_program=4)
    check_against_ref(op, rope_ref, (q, k, cos, sin, pos), wrt=(0, 1), msg=f"rope {shape} {positions}")


def test_rope_table_gradients():
    q, k = torch.randn(2, 5, 4, 8), torch.randn(2, 5, 2, 8)
    cos, sin = torch.randn(12, 4), torch.randn(12, 4)
    check_against_ref(rope, rope_ref, (q, k, cos, sin, _positions(2, 5, "packed")), wrt=(0, 1, 2, 3))


def test_rope_reads_strided_q_and_k():
    # q and k as the model makes them: views of one (B, T, (Hq + 2 Hk) * Dh) projection
    qkv = torch.randn(2, 6, (4 + 2 + 2) * 8)
    q, k = qkv[..., :32].view(2, 6, 4, 8), qkv[..., 32:48].view(2, 6, 2, 8)
    cos, sin = torch.randn(6, 4), torch.randn(6, 4)
    check_against_ref(rope, rope_ref, (q, k, cos, sin, _positions(2, 6, "plain")), wrt=())


@pytest.mark.parametrize("strided", [False, True])
def test_rope_in_place_for_inference(strided):
    # strided: (T, B, ...) storage seen as (B, T, ...): B and T do not flatten into one row index
    q, k = torch.randn(2, 3, 3, 16), torch.randn(2, 3, 1, 16)
    if strided:
        q, k = torch.randn(3, 2, 3, 16).transpose(0, 1), torch.randn(3, 2, 1, 16).transpose(0, 1)
    cos, sin, pos = torch.randn(8, 8), torch.randn(8, 8), _positions(2, 3, "decode") - 10
    want_q, want_k = rope_ref(q, k, cos, sin, pos)
    with torch.no_grad():
        got_q, got_k = rope(q, k, cos, sin, pos, inplace=True)
    assert got_q is q and got_k is k
    torch.testing.assert_close(q, want_q)
    torch.testing.assert_close(k, want_k)
    with pytest.raises(ValueError, match="inplace=True. is for inference"):
        rope(q.requires_grad_(), k, cos, sin, pos, inplace=True)


def test_bad_tables_are_a_clear_error():
    q, k = torch.randn(1, 2, 2, 8), torch.randn(1, 2, 1, 8)
    with pytest.raises(ValueError, match=r"cos/sin must be \(P, Dh/2\)"):
        rope(q, k, torch.randn(4, 8), torch.randn(4, 8), torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        rope(q, k, torch.randn(4, 4), torch.randn(4, 4), torch.zeros(1, 2))
