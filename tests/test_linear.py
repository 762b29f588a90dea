"""`minimind.linear.Linear`: the packed oneDNN path for small no-grad CPU products equals F.linear, follows
weight changes, and stays out of training, large batches, state_dict and copies."""

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F

from minimind.linear import PACKED_MAX_ROWS, PACKED_MIN_NUMEL, Linear, drop_packed, onednn_available

needs_onednn = pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN (mkldnn)")


def _layer(n_in, bias, n_out=None):
    """A layer big enough for the packed path (odd widths: n_out rounds up past PACKED_MIN_NUMEL / n_in)."""
    torch.manual_seed(0)
    return Linear(n_in, n_out or -(-PACKED_MIN_NUMEL // n_in) + 3, bias=bias)


@needs_onednn
@pytest.mark.parametrize("shape", [(1, 64), (3, 5, 123), (64, 37), (2, 1, 512)])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_equals_f_linear(shape, bias):
    layer = _layer(shape[-1], bias)
    x = torch.randn(shape)
    with torch.no_grad():
        y = layer(x)
    assert "_packed_weight" in layer.__dict__, "a small no-grad fp32 CPU product should take the packed path"
    # fp32, K <= 512: only the summation order differs from MKL's
    torch.testing.assert_close(y, F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)


@needs_onednn
def test_follows_in_place_weight_changes():
    layer, x = _layer(64, False), torch.randn(2, 64)
    with torch.no_grad():
        layer(x)
        layer.weight.mul_(-2.0)  # what an optimizer step or a LoRA merge does: the version counter moves
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight), rtol=1e-5, atol=1e-5)
        layer.load_state_dict({"weight": torch.randn_like(layer.weight)})
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight), rtol=1e-5, atol=1e-5)


@needs_onednn
def test_drop_packed_sees_writes_through_data():
    model = torch.nn.Sequential(_layer(64, False))
    x = torch.randn(2, 64)
    with torch.no_grad():
        before = model(x)
        model[0].weight.data.copy_(torch.randn_like(model[0].weight))  # `.data` does not move the version counter
        stale = model(x)
        drop_packed(model)
        fresh = model(x)
    torch.testing.assert_close(stale, before)  # documented: such writes need drop_packed
    torch.testing.assert_close(fresh, F.linear(x, model[0].weight), rtol=1e-5, atol=1e-5)


def test_training_large_batches_and_small_weights_take_f_linear():
    layer = _layer(64, True)
    x = torch.randn(4, 64, requires_grad=True)
    layer(x).sum().backward()
    assert layer.weight.grad is not None and x.grad is not None
    with torch.no_grad():
        big = torch.randn(PACKED_MAX_ROWS + 1, 64)
        torch.testing.assert_close(layer(big), F.linear(big, layer.weight, layer.bias))
    assert "_packed_weight" not in layer.__dict__
    small = _layer(64, False, n_out=PACKED_MIN_NUMEL // 64 - 1)
    with torch.no_grad():
        x = torch.randn(2, 64)
        torch.testing.assert_close(small(x), F.linear(x, small.weight))
    assert "_packed_weight" not in small.__dict__


@needs_onednn
def test_not_state_and_not_copied():
    layer = _layer(64, True)
    with torch.no_grad():
        layer(torch.randn(1, 64))
    assert set(layer.state_dict()) == {"weight", "bias"}
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert "_packed_weight" not in clone.__dict__
        torch.testing.assert_close(clone.weight, layer.weight)
