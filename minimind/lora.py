"""LoRA (arXiv:2106.09685): low-rank adapters on named nn.Linear projections, our own implementation.

`LoRALinear` subclasses the model's Linear and keeps the base weight at the same name, so a model with
adapters still loads and saves its base tensors unchanged; the adapter adds `lora_A` (r, in) and
`lora_B` (out, r), scaled by alpha / r. B starts at zero, so a fresh adapter changes nothing.
A LoRA checkpoint is a directory with `adapter_config.json` (rank, alpha, targets, and the path and
fingerprint of the base checkpoint) and `adapter.safetensors`.
"""

import hashlib
import json
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from minimind.linear import Linear

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter.safetensors"


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
                setattr(module, child_name, LoRALinear(child, rank, alpha, dropout))
                wrapped.append(f"{name}.{child_name}" if name else child_name)
    if not wrapped:
        raise ValueError(f"--lora-targets {','.join(targets)}: no nn.Linear of the model has one of these names")
    for pname, p in model.named_parameters():
        p.requires_grad = ".lora_" in pname
    return wrapped


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


def fingerprint_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_adapter(dir_: Path, model: nn.Module, base_ckpt: Path, targets, rank: int, alpha: float,
                  dropout: float) -> None:
    """Write adapter files into an existing (temporary) directory; see checkpoint.atomic_dir."""
    from minimind.checkpoint import WEIGHTS_FILE

    base_ckpt = Path(base_ckpt).resolve()
    config = {
        "format": "minimind-lora",
        "base_checkpoint": str(base_ckpt),
        "base_fingerprint": fingerprint_file(base_ckpt / WEIGHTS_FILE),
        "rank": rank,
        "alpha": alpha,
        "dropout": dropout,
        "targets": list(targets),
    }
    (Path(dir_) / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    save_file(lora_state_dict(model), Path(dir_) / ADAPTER_WEIGHTS)


def read_adapter_config(adapter_dir) -> dict:
    from minimind.checkpoint import CheckpointError

    file = Path(adapter_dir) / ADAPTER_CONFIG
    try:
        cfg = json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{file}: missing (not a LoRA adapter directory)") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None
    for key in ("base_checkpoint", "rank", "alpha", "targets"):
        if key not in cfg:
            raise CheckpointError(f"{file}: field {key!r} missing")
    return cfg


def load_adapter(model: nn.Module, adapter_dir, base_ckpt=None, merge: bool = False) -> dict:
    """Attach the adapter in adapter_dir to `model` (built from its base checkpoint) and load it.

    When base_ckpt is given, its weights must have the fingerprint recorded in the adapter.
    """
    from minimind.checkpoint import WEIGHTS_FILE, CheckpointError

    cfg = read_adapter_config(adapter_dir)
    if base_ckpt is not None and "base_fingerprint" in cfg:
        got = fingerprint_file(Path(base_ckpt) / WEIGHTS_FILE)
        if got != cfg["base_fingerprint"]:
            raise CheckpointError(
                f"{Path(adapter_dir) / ADAPTER_CONFIG}: adapter was trained on a different base "
                f"(fingerprint {cfg['base_fingerprint'][:12]}), {base_ckpt} has {got[:12]}"
            )
    apply_lora(model, rank=cfg["rank"], alpha=cfg["alpha"], dropout=0.0, targets=cfg["targets"])
    file = Path(adapter_dir) / ADAPTER_WEIGHTS
    try:
        sd = load_file(file)
    except Exception as e:  # safetensors raises several types for truncated files
        raise CheckpointError(f"{file}: missing, truncated or corrupt ({e})") from None
    expected = lora_state_dict(model)
    missing, unexpected = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{file}: adapter does not fit the model: missing {missing[:4]}, unexpected {unexpected[:4]}"
        )
    model.load_state_dict(sd, strict=False)
    if merge:
        merge_lora(model)
    return cfg
