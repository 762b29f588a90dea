"""How long a run is and what its learning rate is at each step: the `Schedule` the loop asks for the lr of
a step and whether the run is done, sized to --max-steps, --epochs or a budget (--max-tokens, --max-time)
and revised by the measured pace when the budget is time. The run's wall-clock is a `Stopwatch` on one
module-level `clock`, which tests/test_budget.py swaps for a fake one.
"""

import math
import time

from minimind.trainconfig import default

clock = time.perf_counter  # the run's wall-clock (--max-time, tokens/s); a test swaps in a fake one


class Stopwatch:
    """The run's wall-clock: started when the process began building the run (start-up counts inside
    --max-time: a user waits for it too), plus what a resumed run had spent before (`before`)."""

    def __init__(self):
        self.began = clock()
        self.before = 0.0

    @staticmethod
    def now() -> float:
        return clock()

    def elapsed(self) -> float:
        """Training wall-clock, resumed runs included (what --max-time budgets)."""
        return self.before + clock() - self.began


def lr_at(step: int, progress: float, *, lr: float, min_lr: float, warmup: int, schedule: str,
          decay_frac: float = default("decay_frac")) -> float:
    """Linear warm-up over `warmup` steps, then by `progress` (0 -> 1: how much of the run, in steps or
    in its budget, is done): "cosine" from lr down to min_lr at the end; "wsd" (warmup-stable-decay,
    MiniCPM) flat at lr, then linear down to min_lr over the last `decay_frac` of the run."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "wsd":
        left = 1.0 - progress
        return lr if left >= decay_frac else min_lr + (lr - min_lr) * left / decay_frac
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def total_steps(cfg, *, batches_per_epoch: int, tokens_per_step: int) -> int:
    """The run's length in steps, from --max-steps, --epochs or --max-tokens (the first to end); a run
    with only --max-time has no fixed length: its estimate is revised as the run goes (`Schedule.lr`)."""
    ends = []
    if cfg.max_steps:
        ends.append(cfg.max_steps)
    if cfg.epochs is not None:
        ends.append(math.ceil(cfg.epochs * batches_per_epoch / cfg.grad_accum))
    if cfg.max_tokens:
        ends.append(math.ceil(cfg.max_tokens / tokens_per_step))
    return max(1, min(ends)) if ends else max(1, batches_per_epoch // cfg.grad_accum)


class Schedule:
    """The run's length and lr schedule, from its config (a resolved TrainConfig): `lr(step)` for the lr
    of a step, `done(...)` for whether the run has reached its end, `eta(...)` for the time left.
    `total_steps` follows the measured pace when --max-time budgets the run; `log` hears of it (the
    progress bar) and of a budget reached."""

    def __init__(self, cfg, *, batches_per_epoch: int, tokens_per_step: int, stopwatch: Stopwatch, log):
        self.cfg, self.stopwatch, self.log = cfg, stopwatch, log
        self.total_steps = total_steps(cfg, batches_per_epoch=batches_per_epoch, tokens_per_step=tokens_per_step)
        self.fixed = bool(cfg.max_steps or cfg.epochs is not None or cfg.max_tokens)  # a length known up front

    def lr(self, step: int) -> float:
        cfg = self.cfg
        return lr_at(step, self.progress(step), lr=cfg.lr, min_lr=cfg.min_lr, warmup=cfg.warmup_steps,
                     schedule=cfg.schedule, decay_frac=cfg.decay_frac)

    def progress(self, step: int) -> float:
        """How much of the run is done after `step`, 0 -> 1: the furthest along of its steps and its time
        budget. For a time budget, the total steps are re-estimated from the measured pace, so the ETA
        and the bar follow the budget."""
        cfg = self.cfg
        if cfg.schedule == "cosine" and self.fixed:  # the classic: cosine over the steps after warm-up
            done = (step - cfg.warmup_steps) / max(1, self.total_steps - cfg.warmup_steps)
        else:
            done = (step + 1) / self.total_steps if self.fixed else 0.0  # after this step: the last one is at 1
        if cfg.max_time:
            by_time = self.stopwatch.elapsed() / cfg.max_time
            if step >= max(3, cfg.warmup_steps // 2) and by_time > 0:  # a pace worth extrapolating
                estimate = max(step + 1, round(step / by_time))
                self.total_steps = min(self.total_steps, estimate) if self.fixed else estimate
                self.log.set_total(self.total_steps)
            done = max(done, by_time)
        return done

    def done(self, step: int, *, tokens: int, epoch) -> bool:
        """Whether the run has reached its end after `step` steps, `tokens` tokens and `epoch()` epochs of
        the data: --max-steps, --epochs, or a budget (which the log is told of)."""
        cfg = self.cfg
        if cfg.max_steps and step >= cfg.max_steps:
            return True
        if cfg.max_steps is None and cfg.epochs is not None and epoch() >= cfg.epochs:
            return True
        for flag, limit, spent in (("--max-time", cfg.max_time, self.stopwatch.elapsed()),
                                   ("--max-tokens", cfg.max_tokens, tokens)):
            if limit and spent >= limit:
                self.log.message(f"{flag} {limit:g} reached at step {step}")
                return True
        return False

    def eta(self, step: int, seconds_per_step: float) -> float:
        """Seconds left at the recent pace; under --max-time, at most what the budget has left."""
        cfg = self.cfg
        eta = (self.total_steps - step) * seconds_per_step
        if cfg.max_time:  # the budget is the ETA
            left = max(0.0, cfg.max_time - self.stopwatch.elapsed())
            eta = min(eta, left) if cfg.max_steps or cfg.epochs else left
        return eta

    def describe(self) -> str:
        """The schedule in the run's opening line: its kind and the budget it is sized to."""
        cfg = self.cfg
        budget = " and ".join(b for b in (f"--max-time {cfg.max_time:g}s" if cfg.max_time else "",
                                          f"--max-tokens {cfg.max_tokens}" if cfg.max_tokens else "") if b)
        return f"lr schedule {cfg.schedule}" + (f" sized to the budget {budget}" if budget else "")

    @property
    def estimated(self) -> bool:
        """Whether the length is an estimate that the pace revises (a time budget alone)."""
        return bool(self.cfg.max_time) and not (self.cfg.max_steps or self.cfg.epochs)

    def state_dict(self) -> dict:
        return {"total_steps": self.total_steps, "elapsed_s": round(self.stopwatch.elapsed(), 3)}

    def load_state_dict(self, state: dict) -> None:
        self.stopwatch.before = float(state.get("elapsed_s", 0.0))  # what --max-time has spent already
