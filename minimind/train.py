"""`train.py --stage STAGE`: one training loop for every objective (SPEC §5).

The run's knobs are a TrainConfig (trainconfig.py); what a stage is, its record in recipes.py; what
it builds (model, data, objective), a Setup (stages.py, grpo.py). The `Trainer` only trains: the
step runs on a backend (backend.py: plain PyTorch, DDP or DeepSpeed), the lr and the run's end come
from a Schedule (schedule.py), the numbers go out through Metrics (metrics.py), a FiniteWatch
(watch.py) stops a diverging run, and a Checkpointer (checkpointer.py) saves and resumes. It never asks
which stage it runs. Usage problems (bad flag combinations, wrong data for the stage, mismatched
checkpoints) raise UsageError -> exit 2; a diverging run raises TrainingDiverged -> exit 1.
"""

import json
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from minimind import distributed, summary
from minimind.backend import Step, auto_dtype, make_backend, pick_device, pick_dtype
from minimind.checkpoint import CheckpointError, checkpoint_inputs
from minimind.checkpointer import Checkpointer, last_good, saved_any
from minimind.errors import TrainingDiverged, UsageError
from minimind.faults import DiskFull, Interrupted, interrupted_exit, writing
from minimind.metrics import Metrics
from minimind.outputs import OutputError, check_apart
from minimind.recipes import STAGES
from minimind.rundir import RunDir, RunDirBusy
from minimind.schedule import Schedule, Stopwatch
from minimind.stages import Setup
from minimind.summary import Spent
from minimind.trainconfig import TrainConfig, resolve
from minimind.trainlog import RunLog
from minimind.watch import FiniteWatch


def run(args) -> int:
    try:
        trainer = Trainer(resolve(args))
    except (UsageError, CheckpointError, RunDirBusy, NotADirectoryError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # DataError / PrepareError / config errors name their file or field
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    except DiskFull as e:  # preparing raw jsonl, training a tokenizer, run.json: the run was undone
        print(f"train.py: error: {e}. Nothing of this run was kept; free some space and run it again.",
              file=sys.stderr)
        return 1
    except (KeyboardInterrupt, Interrupted) as e:
        return interrupted_exit("train.py", e, " while building the run; nothing of it was kept")
    try:
        return trainer.fit()
    except TrainingDiverged as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 1
    except DiskFull as e:
        print(f"train.py: error: {e}. {trainer.stopped_note(disk_full=True)}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, Interrupted) as e:  # the second Ctrl-C, or one before the loop began
        return interrupted_exit("train.py", e, f" at step {trainer.step}: stopped without saving it. "
                                f"{trainer.stopped_note()}")
    finally:
        trainer.close()


class Trainer:
    """One run of the loop, built from its resolved config (`trainconfig.resolve`): claims --out, builds
    the stage's parts (Setup), the backend, schedule, metrics, watch and checkpointer, resumes if asked,
    and trains (`fit`). `train_step` is one optimizer step, for a caller that drives the steps itself."""

    def __init__(self, cfg: TrainConfig):
        self.stopwatch = Stopwatch()  # start-up counts inside --max-time: a user waits for it too
        self.spent = Spent()  # where that time went (summary.json)
        self.cfg = cfg
        self.dist = distributed.setup(cfg)
        self.device = pick_device(cfg.device) if not self.dist.device else self.dist.device
        self.out = Path(cfg.out)
        self.run_dir = RunDir(self.out)
        self.owns_contents = False  # everything in --out is this run's (a fresh run into an empty dir)
        self.step = 0
        if not cfg.resume:  # a resumed run's directory was checked when it started
            _check_out_apart(cfg)
        notes = self.run_dir.claim() if self.dist.is_main else []
        self.dist.barrier()
        try:
            _check_out_dir(self.out, resume=cfg.resume, empty=self.run_dir.is_empty)
            self.owns_contents = not cfg.resume
            self.dist.barrier()  # every rank has looked before the main one writes run.json
            _seed(cfg.seed, self.dist.rank)
            self.log = RunLog(self.out, enabled=self.dist.is_main, wandb=cfg.wandb, config=cfg.to_dict())
            for note in notes:
                self.log.message(note)
            self._build()
        except BaseException:
            if not self._undo_if_fresh() and self.dist.is_main:
                self.run_dir.abandon()  # free again at once, also for a caller in this process
            raise

    def _build(self):
        self.log.message(f"building the {self.cfg.stage} run: model, tokenizer, data (raw jsonl is prepared once)")
        # model, tokenizer, data, objective, batches, trainable params
        self.setup = Setup(self.cfg, device=self.device, dist=self.dist, log=self.log)
        self.cfg = cfg = self.setup.cfg  # as the run found it (--resume's model, vocab_size=auto): run.json's
        self.spent.add("data preparation", self.setup.prepare_s)
        dtype, timing = pick_dtype(cfg.dtype, self.device), None
        if cfg.dtype in (None, "auto") and self.device.type == "cpu":
            with self.spent.timing("dtype timing"):
                dtype, timing = auto_dtype(cfg, self.setup.model, device=self.device, dist=self.dist, log=self.log)
        self.checkpointer = Checkpointer(cfg, setup=self.setup, dist=self.dist, log=self.log)
        self.schedule = Schedule(cfg, batches_per_epoch=self.setup.batches_per_epoch, log=self.log,
                                 tokens_per_step=self.tokens_per_step, stopwatch=self.stopwatch)
        resumed = self.checkpointer.resume() if cfg.resume else None  # the model's weights, random state, data
        if resumed is None and self.dist.is_main:
            self._write_run_json(dtype, timing)
        self.backend = make_backend(self.setup.model, cfg=cfg, trainable=self.setup.trainable, device=self.device,
                                    dtype=dtype, dist=self.dist, log=self.log)
        self.metrics = Metrics(log=self.log, dist=self.dist, model=self.setup.model, seq_len=cfg.seq_len,
                               device=self.device, dtype=self.backend.dtype)
        self.watch = FiniteWatch(tolerated=5 if self.backend.scaler.is_enabled() else 1)
        self.about = None if not self.dist.is_main else summary.about(  # what summary.json says of the run
            cfg, model=self.setup.model, meta=self.setup.data_meta(), fingerprint=self.checkpointer.fingerprint,
            device=self.device, world_size=self.dist.world_size, dtype=self.backend.dtype)
        if resumed is not None:
            self.backend.load_state_dict(resumed.backend)
            self.load_state_dict(resumed.trainer)
            self.checkpointer.announce(resumed)
        self._epochs_begun = int(self.setup.loader_epoch())

    def _write_run_json(self, dtype: torch.dtype, timing: dict | None):
        """run.json: the config the run uses, and what --dtype auto chose and why."""
        record = self.cfg.to_dict()
        if timing is not None:
            record.update(dtype_chosen=str(dtype).removeprefix("torch."), dtype_timing=timing)
        text = json.dumps(record, indent=2) + "\n"
        with writing("run.json", self.out / "run.json", need=len(text.encode())):
            (self.out / "run.json").write_text(text)

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.batch_size * self.cfg.seq_len * self.cfg.grad_accum * self.dist.world_size

    def _undo_if_fresh(self, unsaved: bool = False):
        """A fresh run that fails before its first step leaves its directory as it found it, so the same
        command can simply be run again; so does one that ran out of disk before its first checkpoint
        (`unsaved`): there is nothing to --resume. Later failures keep metrics.jsonl: the curve is the
        diagnosis."""
        if self.dist.is_main and self.owns_contents and (self.step == 0 or unsaved and not saved_any(self.out)):
            self.run_dir.undo()
            return True
        return False

    def close(self):
        if self.dist.is_main:
            self.run_dir.release()

    def stopped_note(self, disk_full: bool = False) -> str:
        """What a user needs after a run stopped early: the checkpoint that is left, and how to go on."""
        space = "free some space and " if disk_full else ""
        if not saved_any(self.out):
            return f"No checkpoint was kept: {space}run the same command again."
        return f"{last_good(self.out)} To go on from it, {space}run again with --resume."

    # ----------------------------------------------------------------- the loop
    def fit(self) -> int:
        try:
            with SaveOnSignal(lambda: self.step) as stop:
                return self._fit(stop)
        except DiskFull:
            self._undo_if_fresh(unsaved=True)
            raise
        except BaseException:
            self._undo_if_fresh()
            raise

    def _fit(self, stop: "SaveOnSignal") -> int:
        cfg = self.cfg
        last_log, logged = self.stopwatch.now(), self.step
        self.log.start(self.schedule.total_steps, self.step)
        self.spent.started(last_log - self.stopwatch.began)
        self._say_plan(started=last_log)
        exit_code, compiling = 0, cfg.compile
        done = self._done()
        while not done:
            lr = self.schedule.lr(self.step)
            self.backend.set_lr(lr)
            step_began = self.stopwatch.now() if compiling else None
            result = self.train_step()
            self.step += 1
            if compiling:  # the first step of a compiled run is mostly compilation: say how long
                compiling = False
                self.check_finite()  # waits for the step to end, so the time is the step's
                took = self.stopwatch.now() - step_began
                self.spent.add("compile", took)
                self.log.message(f"torch.compile: step {self.step} took {took:.1f}s "
                                 "with compilation (counted in the run's wall-clock and --max-time)")
            self.log.advance()
            self._note_repeats()
            done = self._done()
            if self.step % cfg.log_every == 0 or self.step == self.schedule.total_steps or done:
                final_eval = done and self.setup.val_dir is not None  # a run ends with its held-out loss
                self._log_row(result, lr, self.stopwatch.now() - last_log, self.step - logged, final_eval)
                last_log, logged = self.stopwatch.now(), self.step
            if stop.signum is not None:
                exit_code = 128 + stop.signum
                self.log.message(f"signal {stop.signum}: saving step {self.step} and exiting")
                break
            if self.step % cfg.save_every == 0:
                self.save()
        self.save()
        self.write_summary(finished=exit_code == 0)
        self.log.close()
        self.backend.close()
        if self.dist.enabled:  # DDP, the engine, its optimizer and the model hold the groups (Dist.cleanup)
            self.backend = self.setup = self.checkpointer = None
        self.dist.cleanup()
        return exit_code

    def train_step(self) -> Step:
        """One optimizer step over --grad-accum micro-batches at the lr last set (`backend.set_lr`), counted
        and watched. Reads nothing back from the device: the returned Step's sums stay there."""
        step = self.backend.step(self.setup.next_step(self.cfg.grad_accum), self.setup.objective)
        self.setup.after_step()
        self.metrics.count(step)
        self.watch.watch(step)
        return step

    def _say_plan(self, started: float):
        cfg, schedule = self.cfg, self.schedule
        parts = ", ".join(f"{name} {s:.1f}s" for name, s in self.spent.startup().items())
        self.log.message(f"start-up took {started - self.stopwatch.began:.1f}s ({parts})"
                         + (", counted in --max-time" if cfg.max_time else ""))
        first = min(cfg.log_every * (self.step // cfg.log_every + 1), schedule.total_steps)
        doc_masks = cfg.doc_mask and STAGES[cfg.stage].packs_documents and not cfg.no_packing
        self.log.message(f"training steps {self.step + 1}..{schedule.total_steps}"
                         + (" (estimated)" if schedule.estimated else "")
                         + f" ({cfg.batch_size} x {cfg.seq_len}"
                         + (f" x {cfg.grad_accum} accumulated" if cfg.grad_accum > 1 else "")
                         + f" = {self.tokens_per_step} tokens each), {cfg.optim} at lr {cfg.lr:g}"
                         + (", document masks" if doc_masks else "")
                         + f", {schedule.describe()}; the first log line comes after step {first}"
                         + ("; the first steps compile" if cfg.compile else ""))

    def _log_row(self, step: Step, lr: float, seconds: float, steps: int, evaluate: bool):
        self.check_finite()
        row = self.metrics.row(step, number=self.step, lr=lr, seconds=seconds, elapsed=self.stopwatch.elapsed())
        if evaluate or (self.cfg.eval_every and self.step % self.cfg.eval_every == 0):
            with self.spent.timing("evaluation"):
                row["val_loss"] = self.setup.validate(self.backend.model)
        self.metrics.write(row, eta_s=self.schedule.eta(self.step, seconds / max(1, steps)))

    def _note_repeats(self):
        epoch = int(self.setup.loader_epoch())
        if epoch > self._epochs_begun:
            self._epochs_begun = epoch
            self.log.message(f"the data repeats: epoch {epoch + 1} begins after step {self.step}")

    def _done(self) -> bool:
        return self.schedule.done(self.step, tokens=self.metrics.tokens_so_far(), epoch=self.setup.loader_epoch)

    def check_finite(self):
        """Raises TrainingDiverged if the watch saw enough non-finite steps in a row since it was last asked."""
        what = self.watch.check(self.metrics.read)
        if what is not None:
            raise TrainingDiverged(f"step {self.step}: {what}; stopped without saving it. {last_good(self.out)} "
                                   f"Lower --lr (now {self.cfg.lr}) or check the data.")

    # ----------------------------------------------------------------- checkpoints
    def save(self):
        """step-N/ (`Checkpointer.save`), after checking that the run and its weights are finite; then
        summary.json, which says the run has not finished (the run's end writes it once more)."""
        with self.spent.timing("checkpoints"):
            self._save()
        self.write_summary(finished=False)

    def _save(self):
        self.check_finite()
        bad = self.backend.nonfinite_weights()
        if bad:
            raise TrainingDiverged(f"step {self.step}: {len(bad)} weight tensor(s) are not finite after the update "
                                   f"(e.g. {bad[0]}); stopped without saving them. {last_good(self.out)} "
                                   f"Lower --lr (now {self.cfg.lr}).")
        self.metrics.sync()
        self.checkpointer.save(self.step, self.state_dict(), self.backend)

    def state_dict(self) -> dict:
        """The loop's state as trainer_state/state.json holds it (the checkpointer adds the rest)."""
        return {"step": self.step, **self.metrics.state_dict(), **self.schedule.state_dict(),
                "spent_s": self.spent.split(self.stopwatch.elapsed())}

    def load_state_dict(self, state: dict):
        self.step = state["step"]
        self.metrics.load_state_dict(state)
        self.schedule.load_state_dict(state)
        self.spent.load_state_dict(state.get("spent_s", {}))

    def write_summary(self, finished: bool):
        """DIR/summary.json (summary.py): what the run has cost so far; `finished` once training has ended
        normally (not on a signal). The main rank's."""
        if not self.dist.is_main:
            return
        elapsed = self.stopwatch.elapsed()
        summary.write(self.out, summary.record(self.about, finished=finished, steps=self.step,
                                               tokens_seen=self.metrics.tokens_seen, elapsed=elapsed,
                                               spent=self.spent.split(elapsed), mfu=self.metrics.mfu))


class SaveOnSignal:
    """Within it, the first Ctrl-C or SIGTERM lets the step end, saves it and exits (SPEC §5: `signum`
    says the loop should); a second exits at once, without saving that step (a GRPO step generates for
    many seconds before it ends). `step()` is the steps done so far, for the message."""

    def __init__(self, step: Callable[[], int]):
        self.step, self.signum, self._old = step, None, {}

    def _handler(self, signum, frame):
        if self.signum is not None:
            raise Interrupted(signum)
        self.signum = signum
        _say(f"{signal.Signals(signum).name}: saving a checkpoint when step {self.step() + 1} ends, then "
             "exiting (again to exit now, without saving it)")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}


def _say(text: str) -> None:
    """A line on stderr from a signal handler: os.write, since print may be in the middle of a write to the
    same stream (a reentrant call raises)."""
    try:
        os.write(2, f"\n[{time.strftime('%H:%M:%S')}] {text}\n".encode())
    except OSError:
        pass


def _seed(seed: int, rank: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed + rank)


def _check_out_dir(out: Path, *, resume: bool, empty: Callable[[], bool]):
    """--resume needs a step-N checkpoint in --out; a fresh run needs an empty one."""
    if resume:
        if not saved_any(out):
            raise UsageError(f"--resume: {out} has no step-N checkpoint to resume from")
    elif not empty():
        if (out / "run.json").exists() and not saved_any(out):
            raise UsageError(f"--out {out} holds a run that saved no checkpoint, so there is nothing to "
                             "--resume; remove that directory or pick a new DIR")
        raise UsageError(f"--out {out} is not empty; pass --resume to continue that run or pick a new DIR")


def _check_out_apart(cfg: TrainConfig):
    """A new --out may not be or sit inside a path the run reads (a checkpoint, the data); one that holds
    an input is not empty, which _check_out_dir refuses. Before claim(), which creates the directory."""
    inputs = []
    for field in ("init", "ref", "teacher", "data", "val_data", "tokenizer", "deepspeed"):
        path, flag = getattr(cfg, field), "--" + field.replace("_", "-")
        if path is None:
            continue
        try:
            inputs += checkpoint_inputs(path, flag) if field in ("init", "ref", "teacher") else [(flag, path)]
        except CheckpointError:  # named where the checkpoint is loaded
            inputs.append((flag, path))
    try:
        check_apart(Path(cfg.out), flag="--out", inputs=inputs)
    except OutputError as e:
        raise UsageError(str(e)) from None
