"""The one tolerance table the kernel tests (tests/test_kernels_*.py) and bench/gpu.sh compare with.

Kernels and references compute in fp32 and differ only in the order of their sums and in where they
round to the storage dtype, so each row is a few units in the last place of its dtype. `atol` is
scaled by max|expected| when that exceeds 1: a gradient that sums many products errs by a few ulps
of its own largest entries. It is not scaled below 1, because some exact answers are cancellations
of O(1) terms (the weight gradient of a one-row weighted mean is (l - l) / w = 0 up to an ulp of l).
"""

import torch

TOLERANCES: dict[str, dict[str, float]] = {
    # fp32: sums in another order than torch's (tiles, online log-sum-exp): a few ulps
    "float32": dict(rtol=1e-5, atol=1e-5),
    # fp16 (interpreter and GPU): the references round intermediates to fp16 (silu before the product,
    # each expert matmul), the kernels keep fp32 until the store: up to ~4 ulps (eps 9.8e-4) apart
    "float16": dict(rtol=4e-3, atol=4e-3),
    # bf16 (GPU only): 8 mantissa bits, 1 ulp at 1 is 7.8e-3; the same rounding points as fp16
    "bfloat16": dict(rtol=3e-2, atol=3e-2),
    # whole model, fp32: losses and every parameter's gradient after a full forward/backward, and the
    # losses of a few AdamW steps (Adam divides by sqrt(v), so near-zero gradients amplify differences)
    "model": dict(rtol=1e-4, atol=1e-4),
}


def tolerance(dtype_or_row) -> dict[str, float]:
    key = dtype_or_row if isinstance(dtype_or_row, str) else str(dtype_or_row).removeprefix("torch.")
    return TOLERANCES[key]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, row=None, msg: str = "") -> None:
    """torch.testing.assert_close with the table's row for `row` (a dtype or "model"; default: expected's
    dtype), atol scaled by max(1, max|expected|)."""
    tol = tolerance(row if row is not None else expected.dtype)
    scale = max(1.0, expected.detach().abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(
        actual, expected, rtol=tol["rtol"], atol=tol["atol"] * scale, msg=(lambda m: f"{msg}: {m}") if msg else None
    )


def check_against_ref(op, ref, args: tuple, wrt: tuple[int, ...], row=None, msg: str = "") -> None:
    """op(*args) vs ref(*args): every floating output, then the gradient of each args[i] (i in wrt)
    under one random upstream gradient per output (the same for both). The kernel and the reference get
    their own copies of the inputs: a kernel may reuse its inputs' memory in backward (liger's SwiGLU
    writes its gradients into `gate` and `up`), which must not change what the reference sees."""
    mine = [a.detach().clone().requires_grad_(i in wrt) if torch.is_tensor(a) else a for i, a in enumerate(args)]
    theirs = [a.detach().clone().requires_grad_(i in wrt) if torch.is_tensor(a) else a for i, a in enumerate(args)]
    got, want = _as_tuple(op(*mine)), _as_tuple(ref(*theirs))
    assert len(got) == len(want), f"{msg}: {len(got)} outputs, reference has {len(want)}"
    pairs = [(g, w) for g, w in zip(got, want) if w.is_floating_point()]
    for i, (g, w) in enumerate(pairs):
        assert_close(g, w, row, f"{msg} output {i}")
    if not wrt:
        return
    upstream = [torch.randn_like(w) for _, w in pairs]
    got_grads = torch.autograd.grad([g for g, _ in pairs], [mine[i] for i in wrt], upstream, allow_unused=True)
    want_grads = torch.autograd.grad([w for _, w in pairs], [theirs[i] for i in wrt], upstream, allow_unused=True)
    for i, g, w in zip(wrt, got_grads, want_grads):
        assert (g is None) == (w is None), f"{msg}: grad of arg {i}: kernel gave {g}, reference {w}"
        if w is not None:
            assert_close(g, w, row, f"{msg} grad of arg {i}")


def _as_tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def compile_kernels(arch: int = 90) -> list[str]:
    """Compiles every Triton kernel of minimind/kernels/ to a cubin for sm_`arch` with no GPU present (Triton
    bundles ptxas), in bf16 and fp32 and with each constexpr flag, so errors that the interpreter
    cannot see (types of loop-carried values, constexpr branches, dot shapes) show up on a CPU.
    Needs TRITON_INTERPRET unset (under the interpreter there is nothing to compile). Returns what
    was compiled."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    # the modules, not the ops of the same names that minimind/kernels/__init__ exports
    cross_entropy, moe, rmsnorm, rope, swiglu = (
        importlib.import_module(f"minimind.kernels.{name}")
        for name in ("cross_entropy", "moe", "rmsnorm", "rope", "swiglu")
    )
    target, done = GPUTarget("cuda", arch, 32), []
    ints = {"TI_ptr": "*i64", "POS_ptr": "*i64", "TARGETS_ptr": "*i64", "A_IDX_ptr": "*i64", "R_IDX_ptr": "*i64",
            "SEG_START_ptr": "*i32", "SEG_COUNT_ptr": "*i32", "TILE_END_ptr": "*i32"}
    fp32_only = {"RSTD_ptr", "DW_ptr", "NLL_ptr", "W_ptr", "COS_ptr", "SIN_ptr", "PROBS_ptr", "TW_ptr", "DTW_ptr",
                 "DPROBS_ptr", "DLOGITS_ptr"}
    cases = [
        (rmsnorm._rmsnorm_fwd_kernel, dict(HAS_RESIDUAL=True, BLOCK_ROWS=4, BLOCK_SIZE=1024)),
        (rmsnorm._rmsnorm_fwd_kernel, dict(HAS_RESIDUAL=False, BLOCK_ROWS=1, BLOCK_SIZE=512)),
        (rmsnorm._rmsnorm_bwd_kernel, dict(HAS_DRES=True, BLOCK_ROWS=4, BLOCK_SIZE=1024)),
        (rope._rope_kernel, dict(SIGN=-1.0, BLOCK_ROWS=8, BLOCK_HQ=8, BLOCK_HK=2, BLOCK_HALF=32)),
        (swiglu._swiglu_fwd_kernel, dict(BLOCK_SIZE=1024)),
        (swiglu._swiglu_bwd_kernel, dict(BLOCK_SIZE=1024)),
        (cross_entropy._ce_fwd_kernel, dict(HAS_WEIGHTS=True, WRITE_GRAD=True, BLOCK_ROWS=1, BLOCK_SIZE=8192)),
        (moe._moe_gate_fwd_kernel, dict(TOP_K=2, NORM=True, BLOCK_ROWS=256, BLOCK_E=4)),
        (moe._moe_gate_bwd_kernel, dict(HAS_DPROBS=True, TOP_K=2, NORM=True, BLOCK_ROWS=256, BLOCK_E=4)),
        (moe._grouped_mm_kernel, dict(GATHER_A=True, DUAL=True, DOT_PRECISION="tf32", BLOCK_E=4, BLOCK_M=64,
                                      BLOCK_N=64, BLOCK_K=32)),
        (moe._grouped_mm_kernel, dict(GATHER_A=False, DUAL=False, DOT_PRECISION="ieee", BLOCK_E=8, BLOCK_M=64,
                                      BLOCK_N=64, BLOCK_K=32)),
        (moe._grouped_wgrad_kernel, dict(GATHER_R=True, DOT_PRECISION="tf32", BLOCK_P=64, BLOCK_Q=64, BLOCK_K=64)),
    ]
    for fn, constexprs in cases:
        for dtype in ("bf16", "fp32"):
            if dtype == "fp32" and constexprs.get("DOT_PRECISION") == "tf32":
                continue  # fp32 operands always take "ieee"
            signature = {}
            for name in fn.arg_names:
                if name in constexprs:
                    signature[name] = "constexpr"
                elif name.endswith("_ptr"):
                    signature[name] = ints.get(name) or ("*fp32" if name in fp32_only else f"*{dtype}")
                else:
                    signature[name] = "fp32" if name == "eps" else "i32"
            triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=target)
            done.append(f"{fn.__name__}[{dtype}, {constexprs}]")
    return done
