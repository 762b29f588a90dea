"""The one place that decides which implementation of each fused op the model runs.

`get_ops("torch")` is the pure-torch references; "triton" and "liger" are provided by modules
registered in `_PROVIDERS` (filled in by the Kernels work). The choice is made when a model is
built, from `ModelConfig.kernels` or `--kernels`, never baked into a saved checkpoint (SPEC §9).
"""

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch

from minimind.choices import KERNELS as IMPLEMENTATIONS  # one list of names, shared with the CLI

# name -> module that defines `OPS: Ops`. Modules are imported only when asked for, so a machine
# without triton (or liger-kernel) can still build a torch-path model.
_PROVIDERS = {
    "triton": "minimind.kernels.triton_ops",
    "liger": "minimind.kernels.liger_ops",
}


@dataclass(frozen=True)
class Ops:
    name: str
    rmsnorm: Callable
    add_rmsnorm: Callable
    rope: Callable
    swiglu: Callable
    cross_entropy: Callable
    fused_linear_cross_entropy: Callable
    moe_gate: Callable
    moe_dispatch_combine: Callable


def resolve(name: str, device: torch.device | str | None = None) -> str:
    """'auto' is 'triton' on CUDA and 'torch' elsewhere; anything else must be a known name."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"kernels must be one of {', '.join(IMPLEMENTATIONS)}, got {name!r}")
    if name != "auto":
        return name
    on_cuda = device is not None and torch.device(device).type == "cuda"
    if on_cuda and importlib.util.find_spec(_PROVIDERS["triton"]) is not None:
        return "triton"
    return "torch"


def get_ops(name: str, device: torch.device | str | None = None) -> Ops:
    name = resolve(name, device)
    if name == "torch":
        return _torch_ops()
    module_name = _PROVIDERS[name]
    if importlib.util.find_spec(module_name) is None:
        raise NotImplementedError(f"kernels={name!r} is not implemented yet (no module {module_name})")
    return importlib.import_module(module_name).OPS


def _torch_ops() -> Ops:
    from minimind.kernels.cross_entropy import cross_entropy_ref, fused_linear_cross_entropy_ref
    from minimind.kernels.moe import moe_dispatch_combine_ref, moe_gate_ref
    from minimind.kernels.rmsnorm import add_rmsnorm_ref, rmsnorm_ref
    from minimind.kernels.rope import rope_ref
    from minimind.kernels.swiglu import swiglu_ref

    return Ops(
        name="torch",
        rmsnorm=rmsnorm_ref,
        add_rmsnorm=add_rmsnorm_ref,
        rope=rope_ref,
        swiglu=swiglu_ref,
        cross_entropy=cross_entropy_ref,
        fused_linear_cross_entropy=fused_linear_cross_entropy_ref,
        moe_gate=moe_gate_ref,
        moe_dispatch_combine=moe_dispatch_combine_ref,
    )
