"""Measured serving choices: the dtype to decode in, and how many torch threads the engine thread uses.

`--dtype auto` (the default of `serve` and `chat`) times a decode step of the loaded model in each
dtype this device may run fast and keeps the fastest: at batch 1 decode reads every weight once per
token, so fewer bytes per weight can win even where bf16 arithmetic is slow (a 2-core AVX2 CPU), while
a batch of rows is arithmetic and can lose there. The training dtype says nothing about either.

`engine_threads()` is the torch thread count of a server's engine thread: on a CPU of a few cores the
event loop, the tokenizer and the client need a core of their own, or every OpenMP region of a decode
step waits for a thread the scheduler parked (issue 19). CUDA decode needs no CPU threads of its own.
"""

import copy
import os
import statistics
import time

import torch

from minimind.choices import DTYPES
from minimind.dtype_choice import MARGIN  # a lower precision must be this much faster (training's rule too)

ROUNDS = 10  # timed decode steps per dtype and batch, alternating; the fastest of each counts (on a
# shared machine a step can only be slowed by others, never sped up)
TIMED_LENGTH = 32  # the attended length of a timed decode step (at most the engine's max_len)


def candidates(device: torch.device) -> list[torch.dtype]:
    """The dtypes worth timing on this device, the full-precision one first."""
    if device.type == "cuda":
        half = [torch.bfloat16] if torch.cuda.is_bf16_supported() else []
        return [torch.float32, *half, torch.float16]
    if device.type == "cpu":
        return [torch.float32, torch.bfloat16]
    return [torch.float32]


def fastest_dtype(model, make_engine, rows: int) -> tuple[torch.dtype, str]:
    """Time one decode step of `model` at 1 and at `rows` rows in each candidate dtype, each on a copy
    of the model, through `make_engine(model, max_rows)` (an `Engine`: passed in, so that this module
    does not import the engine that uses it); -> the dtype with the best geometric mean of the two
    speeds, and a line saying so."""
    device = next(model.parameters()).device
    sizes = sorted({1, max(1, rows)})
    engines = {}
    for dtype in candidates(device):
        m = model if dtype == next(model.parameters()).dtype else copy.deepcopy(model).to(dtype)
        engines[dtype] = make_engine(m, sizes[-1])
    times = {(d, n): [] for d in engines for n in sizes}
    with torch.no_grad():
        for e in engines.values():
            e.runner.ensure_cache()
        for i in range(ROUNDS + 1):
            for (dtype, n), ts in times.items():
                t0 = time.perf_counter()
                runner = engines[dtype].runner
                length = min(TIMED_LENGTH, runner.max_len)
                ids, pos = runner.dummy_batch(n, length)
                runner.decode(ids, pos, length).reshape(-1)[:1].cpu()
                if i:  # the first round warms up
                    ts.append(time.perf_counter() - t0)
    speed = {d: statistics.geometric_mean([n / min(times[d, n]) for n in sizes]) for d in engines}
    full = candidates(device)[0]
    best = max(speed, key=speed.get)
    if speed[best] < MARGIN * speed[full]:  # within the noise of a shared machine: keep full precision
        best = full
    figures = ", ".join(f"{_name(d)} " + "/".join(f"{min(times[d, n]) * 1e3:.1f}" for n in sizes) for d in engines)
    rows_said = " and ".join(str(n) for n in sizes) + (" rows" if len(sizes) > 1 else " row")
    said = f"ms per decode step at {rows_said}, best of {ROUNDS}: {figures}"
    return best, f"dtype: {_name(best)}, the fastest here ({said})"


def resolve_dtype(model, make_engine, name: str, rows: int) -> tuple[torch.dtype, str]:
    """`--dtype NAME` -> (dtype, a line to print); "auto" measures (`fastest_dtype`)."""
    if name == "auto":
        return fastest_dtype(model, make_engine, rows)
    if name not in DTYPES:
        raise ValueError(f"dtype must be auto or one of {', '.join(DTYPES)}, got {name!r}")
    return getattr(torch, name), f"dtype: {name} (as asked)"


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def engine_threads(device: torch.device, cores: int | None = None) -> int:
    """Torch threads for a server's engine thread: on a CPU one core stays for the event loop (and
    the tokenizer and, on a small machine, the client) when there are 8 cores or fewer."""
    cores = cores or usable_cores()
    if device.type != "cpu":
        return torch.get_num_threads()
    return max(1, cores - 1) if cores <= 8 else cores
