"""What every Triton kernel file shares: a guarded `triton` import and the launch checks.

`import minimind.kernels` must work where triton is not installed (the torch path needs none of this), so the
kernel files import `triton`, `tl` and `jit` from here: without triton, `jit` turns each kernel into a
function that raises, and `tl.constexpr` annotations still evaluate. The checks make the public ops
refuse, with a clear message, to run where Triton cannot: they never fall back to the reference.

`define_op` registers each launcher as a `torch.library` operator `minimind::<name>` with a fake
(shape-only) implementation, so `torch.compile(fullgraph=True)` records one opaque node per launch
instead of breaking the graph at the Triton call (issue 17). The autograd Functions call these ops;
Dynamo traces the Functions' forward and backward around them.
"""

import os

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # a machine without triton: the kernels raise when called, the refs still work
    triton = None
    HAS_TRITON = False

    class _NoTriton:
        constexpr = None

        def __getattr__(self, name):
            raise ImportError("triton is not installed; use kernels='torch' (the *_ref ops)")

    tl = _NoTriton()


# the operator registry of this package (torch.ops.minimind); "FRAGMENT": every kernel file adds its own ops
_LIB = torch.library.Library("minimind", "FRAGMENT")


def define_op(schema: str, impl, fake):
    """`schema` is "name(args) -> outputs" in torch's schema language; `impl` runs for CPU and CUDA
    tensors (the launcher), `fake` returns empty outputs of the right shapes, dtypes and strides for
    tracing. Returns the op overload, which dispatches in ~2 µs (a `torch.library.custom_op` with
    `register_autograd` costs ~10 µs more a call in eager, which is why autograd stays in the Functions)."""
    name = schema.split("(", 1)[0]
    # exact strides: inductor must hand each launcher the layout its fake promised (unit column strides,
    # flat contiguous buffers), never a padded or reordered one (inductor's default for custom ops since
    # torch 2.8, pytorch#150511; the tag keeps it so whatever functorch.config says)
    _LIB.define(schema, tags=(torch.Tag.needs_exact_strides,))
    for key in ("CPU", "CUDA"):
        _LIB.impl(name, impl, key)
    torch.library.register_fake(f"minimind::{name}", fake, lib=_LIB)
    return getattr(torch.ops.minimind, name).default


def jit(fn):
    if HAS_TRITON:
        return triton.jit(fn)

    def missing(*args, **kwargs):
        raise ImportError(f"{fn.__name__} needs triton, which is not installed; use kernels='torch'")

    return missing


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def check_device(op: str, *tensors: torch.Tensor) -> None:
    """Triton runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1; nothing else."""
    if not HAS_TRITON:
        raise ImportError(f"minimind.kernels.{op} needs triton, which is not installed; use kernels='torch'")
    for t in tensors:
        if t.is_cuda:
            continue
        if t.device.type == "cpu" and interpreting():
            continue
        raise RuntimeError(
            f"minimind.kernels.{op} runs Triton: it needs CUDA tensors, or TRITON_INTERPRET=1 (set before triton "
            f"is imported) for CPU tensors; got a {t.device.type} tensor. kernels='torch' runs the reference."
        )


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def default_rows_per_program(block_cols: int) -> int:
    """Rows one program handles. On a GPU ~4K elements per program keeps loads wide without spilling;
    under the interpreter every program costs ~1 ms, so there a program takes up to 64 rows at once."""
    budget = 1 << 14 if interpreting() else 1 << 12
    return max(1, min(64, budget // block_cols))


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def persistent_programs(n_tiles: int, device: torch.device) -> int:
    """Programs for a grid-stride loop: a few per SM on a GPU, 4 under the interpreter."""
    if interpreting() or device.type != "cuda":
        return max(1, min(n_tiles, 4))
    return max(1, min(n_tiles, torch.cuda.get_device_properties(device).multi_processor_count * 4))
