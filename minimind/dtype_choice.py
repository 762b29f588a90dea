"""Timed dtype choices for training on a CPU, where the right one depends on the chip: with AVX-512
BF16 (or AMX) a bf16 matrix product runs ~2x a float32 one, with AVX2 only it runs ~30x slower. So
nothing is assumed: the candidates are timed on the run's own work at start, taking turns, and the
lower precision is kept only when it is at least MARGIN faster (the fastest of each: on a shared
machine a run can only be slowed by others, never sped up).

`train_dtype`: float32 against bfloat16 autocast, a forward and backward of the run's model at its
batch shape (`train.py --dtype auto`, the default on CPU). Muon's iteration follows the choice
(`minimind.optim`).
"""

import time
from collections.abc import Callable

import torch

MARGIN = 1.1  # a lower precision must be this much faster to be chosen over float32
CANDIDATES = (torch.float32, torch.bfloat16)


def fastest(run: Callable[[torch.dtype], object], candidates=CANDIDATES, rounds: int = 2, margin: float = MARGIN,
            clock: Callable[[], float] = time.perf_counter) -> tuple[torch.dtype, dict[torch.dtype, float]]:
    """Times `run(dtype)` for each candidate (one untimed warm-up each, then `rounds` turns each) ->
    (the chosen dtype, the fastest time of each). The first candidate is the reference: another is
    chosen only when `margin` times faster than it."""
    for dtype in candidates:
        run(dtype)
    best = {dtype: float("inf") for dtype in candidates}
    for _ in range(rounds):
        for dtype in candidates:
            t = clock()
            run(dtype)
            best[dtype] = min(best[dtype], clock() - t)
    return choose(best, margin), best


def choose(times: dict[torch.dtype, float], margin: float = MARGIN) -> torch.dtype:
    """The first dtype of `times` unless another is `margin` times faster; then the fastest."""
    reference = next(iter(times))
    quickest = min(times, key=times.get)
    return quickest if times[quickest] * margin <= times[reference] else reference


def describe(what: str, times: dict[torch.dtype, float], chosen: torch.dtype) -> str:
    figures = ", ".join(f"{_name(d)} {t * 1e3:.0f} ms" for d, t in times.items())
    return f"{what}: {figures} (fastest of each); {_name(chosen)} chosen"


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def train_dtype(loss_of: Callable[[], torch.Tensor], params, device: torch.device, rounds: int = 2):
    """float32 against bfloat16 autocast for a step's forward and backward, `loss_of()` building the
    loss of one batch at the run's shape. Gradients are cleared after each pass. -> (dtype, times)."""

    def step(dtype):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = loss_of()
        loss.float().backward()
        for p in params:
            p.grad = None

    return fastest(step, rounds=rounds)
