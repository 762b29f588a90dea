"""The Triton kernels compiled for a real GPU (run by bench/gpu.sh with TRITON_INTERPRET=0): each op vs
its reference at preset sizes in bf16 and fp32, the MoE dispatch captured in a CUDA graph (no host
sync), the liger provider's adapters, and the model-level torch vs triton check on CUDA."""

import importlib.util

import pytest
import torch

from minimind import kernels
from minimind.config import ModelConfig
from minimind.kernels.testing import assert_close, check_against_ref
from minimind.model import MiniMindForCausalLM
from tests.test_kernels_model import VARIANTS

pytestmark = pytest.mark.gpu
DTYPES = [torch.bfloat16, torch.float32]
CUDA = "cuda"


@pytest.fixture(autouse=True)
def _compiled_not_interpreted():
    if kernels._triton.interpreting():
        pytest.skip("TRITON_INTERPRET=1: these check the compiled kernels (bench/gpu.sh unsets it)")


def _randn(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, device=CUDA) * scale).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, d", [(4096, 512), (4093, 640), (8192, 768), (1, 768)])
def test_norms(dtype, n, d):
    x, r, w = _randn(n, d, dtype=dtype), _randn(n, d, dtype=dtype), _randn(d, dtype=dtype)
    check_against_ref(lambda x, w: kernels.rmsnorm(x, w, 1e-5), lambda x, w: kernels.rmsnorm_ref(x, w, 1e-5),
                      (x, w), wrt=(0, 1))
    check_against_ref(lambda *a: kernels.add_rmsnorm(*a, 1e-5), lambda *a: kernels.add_rmsnorm_ref(*a, 1e-5),
                      (x, r, w), wrt=(0, 1, 2))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b, t, hq, hk, dh", [(8, 512, 8, 2, 64), (4, 333, 8, 2, 80), (2, 1, 8, 2, 64)])
def test_rope(dtype, b, t, hq, hk, dh):
    q, k = _randn(b, t, hq, dh, dtype=dtype), _randn(b, t, hk, dh, dtype=dtype)
    cos, sin = _randn(2048, dh // 2), _randn(2048, dh // 2)
    pos = torch.randint(0, 2048, (b, t), device=CUDA)
    check_against_ref(kernels.rope, kernels.rope_ref, (q, k, cos, sin, pos), wrt=(0, 1))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4096, 1408), (4093, 1728), (8192, 2048)])
def test_swiglu(dtype, shape):
    check_against_ref(kernels.swiglu, kernels.swiglu_ref, (_randn(*shape, dtype=dtype), _randn(*shape, dtype=dtype)),
                      wrt=(0, 1))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy(dtype, reduction):
    n, d, v = 2048, 512, 6400
    targets = torch.randint(0, v, (n,), device=CUDA)
    targets[::7] = -100
    weights = torch.rand(n, device=CUDA)
    logits = _randn(n, v, dtype=dtype, scale=3)
    check_against_ref(lambda *a: kernels.cross_entropy(*a, reduction=reduction),
                      lambda *a: kernels.cross_entropy_ref(*a, reduction=reduction), (logits, targets, weights),
                      wrt=(0, 2))
    hidden, weight = _randn(n, d, dtype=dtype), _randn(v, d, dtype=dtype, scale=d**-0.5)
    check_against_ref(lambda *a: kernels.fused_linear_cross_entropy(*a, reduction=reduction),
                      lambda *a: kernels.fused_linear_cross_entropy_ref(*a, reduction=reduction),
                      (hidden, weight, targets, weights), wrt=(0, 1, 3))


def _moe_inputs(dtype, n=2048, d=640, f=1728, e=4, k=2):
    x = _randn(n, d, dtype=dtype)
    topk_weight, topk_idx, _ = kernels.moe_gate_ref(x, _randn(e, d), k, True)
    topk_idx[:, :] = topk_idx % (e - 1)  # the last expert receives no token
    topk_idx[:, 1] = (topk_idx[:, 0] + 1) % (e - 1)
    ws = [_randn(e, f, d, dtype=dtype, scale=d**-0.5), _randn(e, f, d, dtype=dtype, scale=d**-0.5),
          _randn(e, d, f, dtype=dtype, scale=f**-0.5)]
    return x, topk_weight, topk_idx, *ws


@pytest.mark.parametrize("dtype", DTYPES)
def test_moe(dtype):
    args = _moe_inputs(dtype)
    check_against_ref(kernels.moe_dispatch_combine, kernels.moe_dispatch_combine_ref, args, wrt=(0, 1, 3, 4, 5),
                      row=dtype)
    got = kernels.moe_gate(args[0], _randn(4, 640), 2, True)
    assert got[1].shape == (2048, 2)


def test_moe_dispatch_captures_in_a_cuda_graph():
    args = _moe_inputs(torch.bfloat16, n=256)
    want = kernels.moe_dispatch_combine(*args)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        kernels.moe_dispatch_combine(*args)  # warm-up (compiles) outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = kernels.moe_dispatch_combine(*args)
    graph.replay()
    torch.cuda.synchronize()
    assert_close(out, want, torch.bfloat16)


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="liger-kernel is not installed")
def test_liger_provider():
    ops = kernels.get_ops("liger")
    x, w = _randn(1024, 640, dtype=torch.bfloat16), _randn(640, dtype=torch.bfloat16)
    check_against_ref(lambda x, w: ops.rmsnorm(x, w, 1e-5), lambda x, w: kernels.rmsnorm_ref(x, w, 1e-5), (x, w),
                      wrt=(0, 1))
    check_against_ref(ops.swiglu, kernels.swiglu_ref, (x, x * 0.5), wrt=(0, 1))
    check_against_ref(lambda *a: ops.add_rmsnorm(*a, 1e-5), lambda *a: kernels.add_rmsnorm_ref(*a, 1e-5),
                      (x, x * 0.5, w), wrt=(0, 1, 2))
    # bf16 q/k with the model's fp32 tables
    q, k = _randn(4, 128, 8, 64, dtype=torch.bfloat16), _randn(4, 128, 2, 64, dtype=torch.bfloat16)
    tables = (_randn(256, 32), _randn(256, 32), torch.randint(0, 256, (4, 128), device=CUDA))
    check_against_ref(ops.rope, kernels.rope_ref, (q, k, *tables), wrt=(0, 1))
    targets = torch.randint(0, 6400, (512,), device=CUDA)
    hidden, weight = _randn(512, 640, dtype=torch.bfloat16), _randn(6400, 640, dtype=torch.bfloat16, scale=0.04)
    check_against_ref(ops.fused_linear_cross_entropy, kernels.fused_linear_cross_entropy_ref,
                      (hidden, weight, targets), wrt=(0, 1))
    check_against_ref(ops.moe_dispatch_combine, kernels.moe_dispatch_combine_ref, _moe_inputs(torch.bfloat16, n=512),
                      wrt=(), row=torch.bfloat16)


@pytest.mark.parametrize("variant", ["dense", "moe"])
def test_model_on_cuda(variant):
    models = {}
    for name in ("torch", "triton"):
        torch.manual_seed(0)
        config = ModelConfig.from_preset("tiny", VARIANTS[variant], kernels=name)
        models[name] = MiniMindForCausalLM(config, device=CUDA).to(CUDA)
    models["triton"].load_state_dict(models["torch"].state_dict())
    ids = torch.randint(0, 6400, (4, 65), device=CUDA)
    losses = {}
    for name, m in models.items():
        out = m(ids[:, :-1], return_hidden=True)
        h = out.hidden.reshape(-1, out.hidden.shape[-1])
        losses[name] = m.ops.fused_linear_cross_entropy(h, m.lm_head.weight, ids[:, 1:].reshape(-1)) + out.aux_loss
        losses[name].backward()
    assert_close(losses["triton"], losses["torch"], "model")
    for (n, p), q in zip(models["torch"].named_parameters(), models["triton"].parameters()):
        assert_close(q.grad, p.grad, "model", n)


@pytest.mark.parametrize("variant", ["dense", "moe"])
def test_model_compiles_with_inductor(variant):
    """The triton provider under torch.compile(fullgraph=True) with inductor and real Triton (the CPU tests
    use aot_eager): one graph each way, the same loss and gradients as eager."""
    torch.manual_seed(0)
    model = MiniMindForCausalLM(ModelConfig.from_preset("tiny", VARIANTS[variant], kernels="triton"), device=CUDA)
    model = model.to(CUDA)
    ids = torch.randint(0, 6400, (4, 65), device=CUDA)

    def loss_fn(ids):
        out = model(ids[:, :-1], return_hidden=True)
        h = out.hidden.reshape(-1, out.hidden.shape[-1])
        return model.ops.fused_linear_cross_entropy(h, model.lm_head.weight, ids[:, 1:].reshape(-1)) + out.aux_loss

    torch._dynamo.reset()
    grads = {}
    for mode, fn in (("eager", loss_fn), ("inductor", torch.compile(loss_fn, fullgraph=True, backend="inductor"))):
        model.zero_grad(set_to_none=True)
        loss = fn(ids)
        loss.backward()
        grads[mode] = [loss.detach()] + [p.grad for p in model.parameters()]
    for i, (got, want) in enumerate(zip(grads["inductor"], grads["eager"])):
        assert_close(got, want, "model", f"{variant}: loss and grads [{i}]")
