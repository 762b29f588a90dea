"""LoRA (arXiv:2106.09685): low-rank adapters on named nn.Linear projections, our own implementation.

`LoRALinear` subclasses the model's Linear and keeps the base weight at the same name, so a model with
adapters still loads and saves its base tensors unchanged; the adapter adds `lora_A` (r, in) and
`lora_B` (out, r), scaled by alpha / r. B starts at zero, so a fresh adapter changes nothing.
Layers only: a LoRA checkpoint's files (adapter_config.json, adapter.safetensors) are checkpoint.py's.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from minimind.linear import Linear

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRARankError(ValueError):
    """A rank the target matrices cannot take."""


class LoRALinear(Linear):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # shared: same tensors, same names
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout)
        self.merged = False

    def forward(self, x):
        y = super().forward(x)
        if self.merged:
            return y
        return y + F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B) * self.scaling

    def delta(self) -> torch.Tensor:
        return (self.lora_B.float() @ self.lora_A.float() * self.scaling).to(self.weight.dtype)

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self.weight += self.delta()
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.weight -= self.delta()
            self.merged = False


def apply_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
               targets=DEFAULT_TARGETS) -> list[str]:
    """Wrap every nn.Linear whose own name is in `targets`; freeze everything else.

    Returns the wrapped module names. Routed MoE experts are stacked tensors, not Linears, and are
    not adapted (their shared experts are).
    """
    targets = tuple(targets)
    wrapped = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and isinstance(child, nn.Linear) and not isinstance(child, LoRALinear):
                _check_rank(rank, child, f"{name}.{child_name}" if name else child_name)
                setattr(module, child_name, LoRALinear(child, rank, alpha, dropout))
                wrapped.append(f"{name}.{child_name}" if name else child_name)
    if not wrapped:
        raise ValueError(f"--lora-targets {','.join(targets)}: no nn.Linear of the model has one of these names")
    for pname, p in model.named_parameters():
        p.requires_grad = ".lora_" in pname
    return wrapped


def _check_rank(rank: int, linear: nn.Linear, name: str) -> None:
    """A rank above the matrix's smaller side adds nothing a full update would not, and costs far more
    than the matrix itself (rank 100000 on a 128 x 128 matrix: a 5.5 GB adapter)."""
    side = min(linear.in_features, linear.out_features)
    if not 1 <= rank <= side:
        raise LoRARankError(f"LoRA rank {rank} must be between 1 and {side}, the smaller side of {name} "
                         f"({linear.out_features} x {linear.in_features})")


def lora_modules(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in model.state_dict().items() if ".lora_" in k}


def merge_lora(model: nn.Module) -> None:
    for m in lora_modules(model):
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    for m in lora_modules(model):
        m.unmerge()


def strip_lora(model: nn.Module) -> nn.Module:
    """Merge every adapter into its base weight and put plain nn.Linear modules back (for export)."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                child.merge()
                plain = Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                  device="meta")
                plain.weight, plain.bias = child.weight, child.bias
                setattr(module, child_name, plain)
    return model
