"""The non-finite watch: counts, on the device, the steps in a row whose loss or gradient norm is not
finite, and says when a run has diverged. The loop asks it when a step is logged and before every save,
so a diverged run stops within --log-every steps and never saves what diverged; reading the count is
the one read back to the host it costs.
"""

import math
from collections.abc import Callable

import torch


class FiniteWatch:
    """`watch(step)` after every optimizer step (device ops only); `check(read)` at a log line or a save
    -> what diverged, or None. Under fp16, GradScaler skips a step with inf/NaN gradients by design and
    lowers its scale, so there `tolerated` is 5 steps in a row; otherwise it is 1."""

    def __init__(self, tolerated: int = 1):
        self.tolerated = tolerated
        self.bad_run = None  # non-finite steps in a row, now (a device tensor)
        self.worst_run = None  # the most in a row since the last check
        self.last_step = None

    def watch(self, step) -> None:
        """`step`: a backend.Step, whose loss sum and gradient norm are still on the device."""
        loss = step.sums["loss"]
        ok = torch.isfinite(loss) & torch.isfinite(torch.as_tensor(step.grad_norm, device=loss.device))
        bad = ok.logical_not()
        self.bad_run = bad.long() if self.bad_run is None else (self.bad_run + 1) * bad
        self.worst_run = self.bad_run if self.worst_run is None else torch.maximum(self.worst_run, self.bad_run)
        self.last_step = step

    def check(self, read: Callable[[object], dict]) -> str | None:
        """What went non-finite since the last check, if enough steps in a row did; `read(step)` reads a
        step's numbers back to the host (`Metrics.read`), called only then."""
        if self.worst_run is None:
            return None
        worst, self.worst_run = int(self.worst_run), None  # the one read back per log line or save
        if worst < self.tolerated:
            return None
        row = read(self.last_step)
        bad = [k for k in ("loss", "grad_norm") if not math.isfinite(row[k])]
        what = (f"non-finite {' and '.join(bad)} ({', '.join(f'{k} {row[k]}' for k in bad)})" if bad else
                "a non-finite loss or grad_norm at an earlier step since the last log line")
        if worst > 1:
            what += f"; {worst} such steps in a row"
        return what


def nonfinite_weights(model: torch.nn.Module) -> list[str]:
    """The names of the trainable weights of `model` that hold a NaN or an inf."""
    return [n for n, p in model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
