"""`Linear`: the model's nn.Linear. Small products without grad on CPU use a weight packed once for oneDNN.

Why: a decode step multiplies each weight by a few rows (B <= 64). That is bound by reading the weight.
For such skinny shapes MKL's sgemm re-packs the whole weight on every call. On a 2-core AVX2 machine,
16 rows then cost ~2.3x one row, and MKL's matrix-vector product of a 6400 x 512 lm_head takes 4x
oneDNN's. oneDNN reads a weight reordered ahead of time as it is. Whole engine decode of `small` at 16
rows gets 1.2-1.7x faster (`bench/bench_infer.py`).

The packed copy is made on first use. It is remade when the weight's storage or version counter
changes: an optimizer step, merging a LoRA adapter, or `load_state_dict`. So a model that trains
between rollouts (GRPO) stays correct. These cases take plain `F.linear`, unchanged:
- training (grad enabled);
- weights under `PACKED_MIN_NUMEL` elements, where oneDNN's fixed cost per call outweighs the gain.
  Packing `tiny`'s 128-wide projections too made its batch-1 decode 0.74-0.82x as fast;
- more than `PACKED_MAX_ROWS` rows (prefill, evaluation);
- CUDA, dtypes other than fp32, and code under `torch.compile` (inductor picks its own GEMMs).

The copy is not state: it is not in `state_dict`, and copies or pickles of the module drop it. It
doubles the resident size of weights that take this path.
"""

import functools

import torch
import torch.nn.functional as F
from torch import nn

PACKED_MAX_ROWS = 64
PACKED_MIN_NUMEL = 1 << 16  # oneDNN costs ~50 us a call; MKL is faster on smaller weights
PACK_ROWS_HINT = 16  # oneDNN picks the weight layout for this many rows; 8-32 measured within noise


@functools.cache
def onednn_available() -> bool:
    ops = torch.ops.mkldnn
    return torch.backends.mkldnn.is_available() and hasattr(ops, "_reorder_linear_weight") and \
        hasattr(ops, "_linear_pointwise")


def _version(w: torch.Tensor) -> int:
    try:
        return w._version
    except RuntimeError:  # an inference-mode tensor has no version counter, and cannot change outside it
        return -1


def pack_weight(w: torch.Tensor, rows_hint: int = PACK_ROWS_HINT) -> torch.Tensor:
    """(N, K) weight -> oneDNN's own layout for products with about `rows_hint` rows."""
    return torch.ops.mkldnn._reorder_linear_weight(w.detach(), rows_hint)


def packed_product(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, w, bias) with w given as `pack_weight(w)`."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


_CACHE = ("_packed_weight", "_packed_key")  # instance attributes, not state


class Linear(nn.Linear):
    def forward(self, x):
        w = self.weight
        if (torch.is_grad_enabled() or x.device.type != "cpu" or x.dtype != torch.float32
                or w.dtype != torch.float32 or x.numel() > PACKED_MAX_ROWS * x.shape[-1]
                or w.numel() < PACKED_MIN_NUMEL or torch.compiler.is_compiling() or not onednn_available()):
            return F.linear(x, w, self.bias)
        return packed_product(x, self._packed(w), self.bias)

    def _packed(self, w: torch.Tensor) -> torch.Tensor:
        key = (w.data_ptr(), _version(w), tuple(w.shape))
        if self.__dict__.get("_packed_key") != key:
            self._packed_weight = pack_weight(w)
            self._packed_key = key
        return self._packed_weight

    def drop_packed(self) -> None:
        for name in _CACHE:
            self.__dict__.pop(name, None)

    def __getstate__(self):  # deepcopy / pickle: the packed copy is a cache, and oneDNN tensors don't copy
        return {k: v for k, v in self.__dict__.items() if k not in _CACHE}


def drop_packed(model: nn.Module) -> None:
    """Forget every packed copy in `model`. Call it when weights may have been written in a way the
    version counter does not see (through `.data`, as DeepSpeed's ZeRO optimizers do)."""
    for m in model.modules():
        if isinstance(m, Linear):
            m.drop_packed()
