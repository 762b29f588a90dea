"""Fused-op benchmarks: each op of minimind/kernels/ per provider, mode and preset shape, plus a training step.

Providers, side by side in one run: `ref` (the eager torch reference), `compile` (torch.compile of the
reference), `triton` (ours), `liger` (liger-kernel through minimind.kernels.liger_ops). Modes: `fwd`, `bwd`
(backward only: the forward runs in untimed setup), `fwd_bwd`. Shapes: B·T rows x the presets' hidden
sizes (small 512, moe 640, base 768), V = 6400. extra_info records GB/s (bytes each op must move at
least, counted once) or TFLOP/s for the matmul-bound ops, and the peak CUDA memory of one call.

On a CPU only `ref` and `compile` run (Triton and Liger need CUDA here: they skip); smoke mode
(MINIMIND_BENCH_SMOKE=1) uses tiny sizes and skips `compile`, whose compile time alone outlasts a
smoke run. On a GPU: TRITON_INTERPRET=0 (bench/gpu.sh); MINIMIND_BENCH_PRESETS=small,base picks presets.

    pytest bench/bench_kernels.py -k fwd_bwd --benchmark-columns=mean,stddev,rounds
"""

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from minimind import kernels
from minimind.config import ModelConfig
from minimind.model import MiniMindForCausalLM

SMOKE = os.environ.get("MINIMIND_BENCH_SMOKE") == "1"  # as bench/conftest.py; needed at collection
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
# rows N = B*T: 16 x 512 on a GPU, 4 x 256 on the CPU (as bench_model.py), 2 x 32 in smoke mode
B, T = (2, 32) if SMOKE else ((16, 512) if CUDA else (4, 256))
PRESETS = ("tiny",) if SMOKE else (("small", "moe", "base") if CUDA else ("small",))
if os.environ.get("MINIMIND_BENCH_PRESETS") and not SMOKE:  # e.g. "small,base" (bench/gpu.sh)
    PRESETS = tuple(os.environ["MINIMIND_BENCH_PRESETS"].split(","))
PROVIDERS = ("ref", "compile", "triton", "liger")
MODES = ("fwd", "bwd", "fwd_bwd")
EPS = 1e-5


@dataclass
class Case:
    op: str
    preset: str
    args: Callable[[], tuple]  # fresh inputs; float tensors that get gradients have requires_grad
    bind: Callable[[Callable], Callable]  # an implementation of the op -> fn(*args)
    bytes: dict[str, int] | None = None  # per mode: bytes moved at least (memory-bound ops)
    flops: dict[str, int] | None = None  # per mode (matmul-bound ops)


def _t(*shape, grad=True, scale=1.0, dtype=None):
    return (torch.randn(*shape, device=DEVICE) * scale).to(dtype or DTYPE).requires_grad_(grad)


def _cases() -> list[Case]:
    es, n = torch.finfo(DTYPE).bits // 8, B * T
    out = []
    for name in PRESETS:
        c = ModelConfig.from_preset(name)
        d, f, dh, hq, hk = c.hidden_size, c.intermediate_size, c.head_dim, c.num_attention_heads, c.num_key_value_heads
        out += [
            Case("rmsnorm", name, lambda d=d: (_t(n, d), _t(d)), lambda fn: lambda x, w: fn(x, w, EPS),
                 bytes=dict(fwd=2 * n * d * es, bwd=3 * n * d * es, fwd_bwd=5 * n * d * es)),
            Case("add_rmsnorm", name, lambda d=d: (_t(n, d), _t(n, d), _t(d)),
                 lambda fn: lambda x, r, w: fn(x, r, w, EPS),
                 bytes=dict(fwd=4 * n * d * es, bwd=4 * n * d * es, fwd_bwd=8 * n * d * es)),
            Case("rope", name, lambda dh=dh, hq=hq, hk=hk: _rope_args(dh, hq, hk), lambda fn: fn,
                 bytes={m: k * n * (hq + hk) * dh * es for m, k in dict(fwd=2, bwd=2, fwd_bwd=4).items()}),
            Case("swiglu", name, lambda f=f: (_t(n, f), _t(n, f)), lambda fn: fn,
                 bytes=dict(fwd=3 * n * f * es, bwd=5 * n * f * es, fwd_bwd=8 * n * f * es)),
        ]
    c = ModelConfig.from_preset(PRESETS[0])
    d, v = c.hidden_size, c.vocab_size
    targets = lambda: torch.randint(0, v, (n,), device=DEVICE)
    out += [
        Case("cross_entropy", PRESETS[0], lambda: (_t(n, v), targets()), lambda fn: fn,
             bytes=dict(fwd=n * v * es, bwd=n * v * es, fwd_bwd=2 * n * v * es)),
        Case("fused_linear_cross_entropy", PRESETS[0], lambda: (_t(n, d), _t(v, d, scale=d**-0.5), targets()),
             lambda fn: fn, flops=dict(fwd=2 * n * v * d, bwd=4 * n * v * d, fwd_bwd=6 * n * v * d)),
    ]
    c = ModelConfig.from_preset("tiny" if SMOKE else "moe", ["use_moe=true"])
    d, f, e, k = c.hidden_size, c.intermediate_size, c.n_routed_experts, c.num_experts_per_tok
    mm = 2 * n * k * 3 * d * f
    out.append(Case("moe_dispatch_combine", "tiny-moe" if SMOKE else "moe", lambda: _moe_args(n, d, f, e, k),
                    lambda fn: fn, flops=dict(fwd=mm, bwd=2 * mm, fwd_bwd=3 * mm)))
    return out


def _rope_args(dh, hq, hk):
    cos, sin = torch.randn(T, dh // 2, device=DEVICE), torch.randn(T, dh // 2, device=DEVICE)
    pos = torch.arange(T, device=DEVICE).expand(B, T)
    return _t(B, T, hq, dh), _t(B, T, hk, dh), cos, sin, pos


def _moe_args(n, d, f, e, k):
    x = _t(n, d)
    topk_weight, topk_idx, _ = kernels.moe_gate_ref(x.detach(), torch.randn(e, d, device=DEVICE), k, True)
    return (x, topk_weight.requires_grad_(), topk_idx, _t(e, f, d, scale=d**-0.5), _t(e, f, d, scale=d**-0.5),
            _t(e, d, f, scale=f**-0.5))


CASES = _cases()


def _implementation(op: str, provider: str) -> Callable:
    if provider == "ref":
        return getattr(kernels, f"{op}_ref")
    if provider == "compile":
        if SMOKE:
            pytest.skip("torch.compile: its compile time alone outlasts a smoke run")
        return torch.compile(getattr(kernels, f"{op}_ref"), dynamic=False)
    if not CUDA:
        pytest.skip(f"{provider} runs Triton, which needs CUDA here")
    if provider == "triton":
        return getattr(kernels, op)
    if importlib.util.find_spec("liger_kernel") is None:
        pytest.skip("liger-kernel is not installed")
    return getattr(kernels.get_ops("liger"), op)


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _outputs(result):
    outs = result if isinstance(result, tuple) else (result,)
    return [o for o in outs if o.is_floating_point() and o.requires_grad]


def _timed(fn, args, mode):
    """(target, setup or None) for benchmark.pedantic: the timed part of one call in `mode`."""
    inputs = [a for a in args if torch.is_tensor(a) and a.requires_grad]
    upstream = [torch.ones_like(o) for o in _outputs(fn(*args))]  # also the warm-up (compiles, autotunes)

    def forward():
        fn(*args)
        _sync()

    def backward(outs):
        torch.autograd.grad(outs, inputs, upstream, allow_unused=True)
        _sync()

    def setup():
        outs = _outputs(fn(*args))
        _sync()
        return (outs,), {}

    if mode == "fwd":
        return forward, None
    if mode == "bwd":
        return backward, setup
    return lambda: backward(_outputs(fn(*args))), None


def _peak_mib(target, setup) -> float | None:
    if not CUDA:
        return None
    call_args = setup()[0] if setup else ()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    target(*call_args)
    return round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=[f"{c.op}-{c.preset}" for c in CASES])
def test_kernel(benchmark, case, provider, mode):
    torch.manual_seed(0)
    fn = case.bind(_implementation(case.op, provider))
    target, setup = _timed(fn, case.args(), mode)
    peak = _peak_mib(target, setup)
    rounds = 1 if SMOKE else (20 if CUDA else 5)
    benchmark.pedantic(target, setup=setup, rounds=rounds, iterations=1, warmup_rounds=0 if SMOKE else 2)
    mean = benchmark.stats.stats.mean if benchmark.stats else None
    info = dict(op=case.op, preset=case.preset, provider=provider, mode=mode, rows=B * T, dtype=str(DTYPE),
                peak_mib=peak, device=torch.cuda.get_device_name() if CUDA else "cpu")
    if mean and case.bytes:
        info["gb_per_s"] = round(case.bytes[mode] / mean / 1e9, 1)
    if mean and case.flops:
        info["tflops"] = round(case.flops[mode] / mean / 1e12, 2)
    benchmark.extra_info.update(info)


def test_copy_bandwidth(benchmark):
    """The ceiling for the memory-bound ops: a device-to-device copy (bytes read + written)."""
    n = (1 << 16) if SMOKE else ((1 << 28) if CUDA else (1 << 24))
    src = torch.empty(n, device=DEVICE, dtype=torch.float32).normal_()
    dst = torch.empty_like(src)

    def copy():
        dst.copy_(src)
        _sync()

    copy()
    benchmark.pedantic(copy, rounds=1 if SMOKE else 20, iterations=1)
    if benchmark.stats:
        benchmark.extra_info["gb_per_s"] = round(2 * n * 4 / benchmark.stats.stats.mean / 1e9, 1)


# training step: dense `small`, `moe`, and a dense model with the MoE preset's active parameters
# (its FFN as wide as shared + top-2 routed experts together), each with each kernel provider
_MOE_F = ModelConfig.from_preset("moe").intermediate_size
STEP_MODELS = {
    "small": ("small", []),
    "moe": ("moe", []),
    "moe_dense_equiv": ("moe", ["use_moe=false", f"intermediate_size={3 * _MOE_F}"]),
}


# the GPU step is measured at 32 x 512, the shape of the 2026-12-04 H200 record and MiniMind2's figures
STEP_B, STEP_T = (B, T) if SMOKE or not CUDA else (32, 512)


@pytest.mark.parametrize("kernels_name", ["torch", "triton", "liger"])
@pytest.mark.parametrize("model", list(STEP_MODELS))
def test_train_step(benchmark, model, kernels_name):
    if not CUDA and not (SMOKE and kernels_name == "torch" and model == "small"):
        pytest.skip("training steps on the CPU: bench/bench_model.py; here CUDA only (smoke: one tiny torch step)")
    if kernels_name == "liger" and importlib.util.find_spec("liger_kernel") is None:
        pytest.skip("liger-kernel is not installed")
    preset, overrides = STEP_MODELS[model]
    torch.manual_seed(0)
    config = ModelConfig.from_preset("tiny" if SMOKE else preset, overrides, kernels=kernels_name)
    net = MiniMindForCausalLM(config, device=DEVICE).to(DEVICE)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=CUDA)
    b, t = STEP_B, STEP_T
    ids = torch.randint(0, config.vocab_size, (b, t + 1), device=DEVICE)

    def loss():
        out = net(ids[:, :-1], return_hidden=True)
        hidden = out.hidden.reshape(b * t, -1)
        ce = net.ops.fused_linear_cross_entropy(hidden, net.lm_head.weight, ids[:, 1:].reshape(-1), reduction="sum")
        return ce / (b * t) + out.aux_loss

    _time_train_step(benchmark, loss, opt, b * t, model=model, kernels=kernels_name, batch=f"{b}x{t}",
                     params_active=net.num_params(active=True))


def _time_train_step(benchmark, loss_fn, opt, tokens: int, **info):
    """Times forward (bf16 autocast on CUDA), backward and the optimizer step; records tokens/s and `info`."""

    def step():
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=CUDA):
            loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync()

    step()
    benchmark.pedantic(step, rounds=1 if SMOKE else 10, iterations=1, warmup_rounds=0 if SMOKE else 2)
    if benchmark.stats:
        benchmark.extra_info.update(**info, tokens_per_s=round(tokens / benchmark.stats.stats.mean))


def test_train_step_transformers(benchmark):
    """The peer: a stock transformers LlamaForCausalLM of `small`'s shape (tied embeddings, SDPA) trained
    the plain way: bf16 autocast, `labels=`, fused AdamW."""
    if not CUDA and not SMOKE:
        pytest.skip("the GPU table's peer; on the CPU see bench/bench_train.py")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    c = ModelConfig.from_preset("tiny" if SMOKE else "small")
    net = LlamaForCausalLM(LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta,
        max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=True, attn_implementation="sdpa",
    )).to(DEVICE)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=CUDA)
    b, t = STEP_B, STEP_T
    ids = torch.randint(0, c.vocab_size, (b, t), device=DEVICE)

    _time_train_step(benchmark, lambda: net(input_ids=ids, labels=ids).loss, opt, b * t, model="small",
                     kernels="transformers", batch=f"{b}x{t}", params_active=sum(p.numel() for p in net.parameters()))
