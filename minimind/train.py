"""`train.py --stage STAGE`: one training loop for every objective (SPEC §5).

The run's knobs are a TrainConfig (trainconfig.py); what a stage is, its record in recipes.py; what
it builds (model, data, objective), a Setup (stages.py, grpo.py). The loop owns precision,
accumulation, clipping, schedule, logging, checkpoints and resume, each written once, and never asks
which stage it runs. Usage problems (bad flag combinations, wrong data for the stage, mismatched
checkpoints) raise UsageError -> exit 2; a diverging run raises TrainingDiverged -> exit 1.
"""

import json
import math
import os
import pickle
import random
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

from minimind import distributed
from minimind.checkpoint import (
    DEEPSPEED_STATE,
    OPTIMIZER_FILE,
    RNG_JSON,
    RNG_TENSORS,
    STATE_FILE,
    STEP_DIR,
    TOKENIZER_FILES,
    TRAINER_STATE,
    CheckpointError,
    atomic_dir,
    checkpoint_inputs,
    copy_tokenizer,
    is_complete,
    load_error,
    publish_dir,
    read_json,
    read_trainer_state,
    resolve_checkpoint,
    weights_finite,
)
from minimind.errors import TrainingDiverged, UsageError
from minimind.faults import DiskFull, Interrupted, interrupted_exit, writing
from minimind.optim import build_optimizer
from minimind.outputs import OutputError, check_apart
from minimind.recipes import STAGES
from minimind.rundir import RunDir, RunDirBusy
from minimind.stages import Setup
from minimind.trainconfig import resolve
from minimind.trainlog import RunLog

clock = time.perf_counter  # the run's wall-clock (--max-time, tokens/s); a test swaps in a fake one


def run(args) -> int:
    try:
        trainer = Trainer(args)
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


def pick_device(name: str) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA device is available")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def pick_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """None or "auto": bf16 on CUDA where supported; on a CPU float32 until `Trainer._time_dtype` has
    timed the two at the run's shape (`minimind.dtype_choice`)."""
    if name in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def lr_at(step: int, progress: float, *, lr: float, min_lr: float, warmup: int, schedule: str,
          decay_frac: float = 0.2) -> float:
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


class Trainer:
    def __init__(self, args):
        self._began = clock()  # start-up counts inside --max-time: a user waits for it too
        self.cfg = resolve(args)
        self.stage = args.stage
        self.dist = distributed.setup(self.cfg)
        self.device = pick_device(self.cfg.device) if not self.dist.device else self.dist.device
        self.dtype = pick_dtype(self.cfg.dtype, self.device)
        self.out = Path(self.cfg.out)
        self.run_dir = RunDir(self.out)
        self.owns_contents = False  # everything in --out is this run's (a fresh run into an empty dir)
        self.step = 0
        self.saved_step = None  # the step whose checkpoint this process wrote (or resumed from)
        if not self.cfg.resume:  # a resumed run's directory was checked when it started
            self._check_out_apart()
        notes = self.run_dir.claim() if self.dist.is_main else []
        self.dist.barrier()
        try:
            self._check_out_dir()
            self.owns_contents = not self.cfg.resume
            self.dist.barrier()  # every rank has looked before the main one writes run.json
            self._seed(self.cfg.seed)
            self.log = RunLog(self.out, enabled=self.dist.is_main, wandb=self.cfg.wandb, config=self.cfg.to_dict())
            for note in notes:
                self.log.message(note)
            self._build()
        except BaseException:
            if not self._undo_if_fresh() and self.dist.is_main:
                self.run_dir.abandon()  # free again at once, also for a caller in this process
            raise

    def _build(self):
        self.log.message(f"building the {self.stage} run: model, tokenizer, data (raw jsonl is prepared once)")
        began = clock()
        # model, tokenizer, data, objective, batches, trainable params
        self.setup = Setup(self.cfg, device=self.device, dist=self.dist, log=self.log)
        self.cfg = self.setup.cfg  # as the run found it (--resume's model, vocab_size=auto): what run.json records
        self.startup_s = {"model and data": clock() - began}
        self.model = self.setup.model
        self.ds_engine = None  # deepspeed engine
        self.raw_model = self.model
        self.dtype_timing = None  # --dtype auto on a CPU: {dtype name: seconds of a forward + backward}
        if self.cfg.dtype in (None, "auto") and self.device.type == "cpu":
            self.startup_s["dtype timing"] = self._time_dtype()
        # Muon's iteration in bf16 when the run is (on a CPU: only where bf16 was timed faster)
        ns_dtype = torch.bfloat16 if self.dtype in (torch.bfloat16, torch.float16) else None
        self.optimizer = build_optimizer(self.model, self.cfg.optim, lr=self.cfg.lr,
                                         weight_decay=self.cfg.weight_decay, device=self.device,
                                         betas=self.cfg.adam_betas, ns_dtype=ns_dtype,
                                         embed_lr_scale=self.cfg.embed_lr_scale)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.tokens_seen = 0
        self._tokens = self._useful = 0  # this rank's counts since the last _count_tokens()
        self._window = (0, 0)  # all ranks' (tokens, useful tokens) since the last log line
        self.bad_run = self.worst_run = None  # non-finite steps in a row: now, and the most since the last check
        self.last_step = None
        self.total_steps = self._total_steps()
        self.data_fingerprint = self.setup.data_fingerprint()
        self._elapsed_before = 0.0  # a resumed run's time before this process (_resume)
        if self.cfg.resume:
            self._resume()
        elif self.dist.is_main:
            record = self.cfg.to_dict()
            if self.dtype_timing is not None:
                record.update(dtype_chosen=str(self.dtype).removeprefix("torch."), dtype_timing=self.dtype_timing)
            text = json.dumps(record, indent=2) + "\n"
            with writing("run.json", self.out / "run.json", need=len(text.encode())):
                (self.out / "run.json").write_text(text)
        if self.cfg.deepspeed:
            self.log.message("starting DeepSpeed (it may build its ops on first use)")
            self.ds_engine, self.dtype = distributed.deepspeed_engine(self.model, self.optimizer, self.cfg, self.dtype)
            self.model = self.ds_engine
            if getattr(self, "_deepspeed_resume_dir", None) is not None:
                self.ds_engine.load_checkpoint(str(self._deepspeed_resume_dir), tag="state",
                                            load_lr_scheduler_states=False)
        else:
            self.model = distributed.wrap(self)
        if self.cfg.compile:
            self.log.message(f"torch.compile (mode {self.cfg.compile_mode}): the first steps compile the model "
                             "(a minute or more on CPU)")
            self.model = torch.compile(self.model, mode=self.cfg.compile_mode)
        self.stop_signal = None
        self._compiling = self.cfg.compile
        self._start = self._began
        self._epochs_begun = int(self.setup.loader_epoch())

    def _time_dtype(self) -> float:
        """--dtype auto on a CPU: a forward and backward at the run's batch shape in float32 and in
        bfloat16 autocast, taking turns; the faster (bf16 by at least 10%) is the run's dtype. A
        resumed run keeps the dtype run.json recorded. Every rank times and the sums decide, so all
        ranks agree. -> seconds spent."""
        from minimind.data.loader import Batch
        from minimind.dtype_choice import choose, describe, train_dtype
        from minimind.objectives import token_nll

        if self.cfg.resume:
            chosen = read_json(self.out / "run.json", context=" (the run's resolved flags)").get("dtype_chosen")
            if chosen in ("float32", "bfloat16"):
                self.dtype = pick_dtype(chosen, self.device)
                self.log.message(f"--dtype auto: {chosen}, as this run chose when it started")
                return 0.0
        started = clock()
        # two rows at the run's length: the same products as its steps, in a fraction of their time
        b, t = min(self.cfg.batch_size, 2), self.cfg.seq_len
        gen = torch.Generator().manual_seed(0)  # the run's own random state is left as it is
        ids = torch.randint(self.raw_model.config.vocab_size, (b, t + 1), generator=gen).to(self.device)
        batch = Batch(ids[:, :-1], ids[:, 1:], torch.ones(b, t, device=self.device), None)
        params = [p for p in self.raw_model.parameters() if p.requires_grad]
        self.log.message(f"--dtype auto: timing a forward and backward at {b} x {t} in float32 and bfloat16")
        _, times = train_dtype(lambda: token_nll(self.raw_model, batch)[0], params, self.device, rounds=1)
        names = list(times)
        summed = self.dist.all_reduce_sums([times[d] for d in names])
        times = dict(zip(names, (float(x) for x in summed)))
        times = {d: s / self.dist.world_size for d, s in times.items()}  # the ranks' mean
        self.dtype = choose(times)
        self.dtype_timing = {str(d).removeprefix("torch."): round(s, 4) for d, s in times.items()}
        self.log.message(describe(f"--dtype auto, a forward and backward at {b} x {t}", times, self.dtype))
        return clock() - started

    def _undo_if_fresh(self, unsaved: bool = False):
        """A fresh run that fails before its first step leaves its directory as it found it, so the same
        command can simply be run again; so does one that ran out of disk before its first checkpoint
        (`unsaved`): there is nothing to --resume. Later failures keep metrics.jsonl: the curve is the
        diagnosis."""
        if self.dist.is_main and self.owns_contents and (self.step == 0 or unsaved and not self._saved_any()):
            self.run_dir.undo()
            return True
        return False

    def _saved_any(self) -> bool:
        return self.out.is_dir() and any(STEP_DIR.match(p.name) for p in self.out.iterdir())

    def close(self):
        if self.dist.is_main:
            self.run_dir.release()

    def log_message(self, text: str):
        self.log.message(text)

    # ----------------------------------------------------------------- set-up helpers
    def _check_out_dir(self):
        if self.cfg.resume:
            if not self.out.is_dir() or not any(STEP_DIR.match(p.name) for p in self.out.iterdir()):
                raise UsageError(f"--resume: {self.out} has no step-N checkpoint to resume from")
        elif not self.run_dir.is_empty():
            if (self.out / "run.json").exists() and not any(STEP_DIR.match(p.name) for p in self.out.iterdir()):
                raise UsageError(f"--out {self.out} holds a run that saved no checkpoint, so there is nothing to "
                                 "--resume; remove that directory or pick a new DIR")
            raise UsageError(f"--out {self.out} is not empty; pass --resume to continue that run or pick a new DIR")

    def _check_out_apart(self):
        """A new --out may not be or sit inside a path the run reads (a checkpoint, the data); one that holds
        an input is not empty, which _check_out_dir refuses. Before claim(), which creates the directory."""
        inputs = []
        for field in ("init", "ref", "teacher", "data", "val_data", "tokenizer", "deepspeed"):
            path, flag = getattr(self.cfg, field), "--" + field.replace("_", "-")
            if path is None:
                continue
            try:
                inputs += checkpoint_inputs(path, flag) if field in ("init", "ref", "teacher") else [(flag, path)]
            except CheckpointError:  # named where the checkpoint is loaded
                inputs.append((flag, path))
        try:
            check_apart(self.out, flag="--out", inputs=inputs)
        except OutputError as e:
            raise UsageError(str(e)) from None

    def _seed(self, seed: int):
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed + self.dist.rank)

    def _tokens_per_step(self) -> int:
        return self.cfg.batch_size * self.cfg.seq_len * self.cfg.grad_accum * self.dist.world_size

    def _total_steps(self) -> int:
        """The run's length in steps, from --max-steps, --epochs or --max-tokens (the first to end); a run
        with only --max-time has no fixed length: its estimate is revised as the run goes (`_progress`)."""
        cfg, ends = self.cfg, []
        if cfg.max_steps:
            ends.append(cfg.max_steps)
        if cfg.epochs is not None:
            ends.append(math.ceil(cfg.epochs * self.setup.batches_per_epoch / cfg.grad_accum))
        if cfg.max_tokens:
            ends.append(math.ceil(cfg.max_tokens / self._tokens_per_step()))
        return max(1, min(ends)) if ends else max(1, self.setup.batches_per_epoch // cfg.grad_accum)

    def _elapsed(self) -> float:
        """Training wall-clock, resumed runs included (what --max-time budgets)."""
        return self._elapsed_before + clock() - self._start

    def _progress(self) -> float:
        """How much of the run is done, 0 -> 1: the furthest along of its steps and its time budget. For
        a time budget, the total steps are re-estimated from the measured pace, so the ETA and the bar
        follow the budget."""
        cfg = self.cfg
        fixed = cfg.max_steps or cfg.epochs is not None or cfg.max_tokens
        if cfg.schedule == "cosine" and fixed:  # the classic: cosine over the steps after warm-up
            done = (self.step - cfg.warmup_steps) / max(1, self.total_steps - cfg.warmup_steps)
        else:
            done = (self.step + 1) / self.total_steps if fixed else 0.0  # after this step: the last one is at 1
        if cfg.max_time:
            by_time = self._elapsed() / cfg.max_time
            if self.step >= max(3, cfg.warmup_steps // 2) and by_time > 0:  # a pace worth extrapolating
                estimate = max(self.step + 1, round(self.step / by_time))
                self.total_steps = min(self.total_steps, estimate) if fixed else estimate
                self.log.set_total(self.total_steps)
            done = max(done, by_time)
        return done

    # ----------------------------------------------------------------- the loop
    def fit(self) -> int:
        try:
            return self._fit()
        except DiskFull:
            self._undo_if_fresh(unsaved=True)
            raise
        except BaseException:
            self._undo_if_fresh()
            raise
        finally:
            self._restore_signal_handlers()

    def stopped_note(self, disk_full: bool = False) -> str:
        """What a user needs after a run stopped early: the checkpoint that is left, and how to go on."""
        space = "free some space and " if disk_full else ""
        if not self._saved_any():
            return f"No checkpoint was kept: {space}run the same command again."
        return f"{self._last_good()} To go on from it, {space}run again with --resume."

    def _doc_masks(self) -> bool:
        return bool(self.cfg.doc_mask) and STAGES[self.stage].packs_documents and not self.cfg.no_packing

    def _fit(self) -> int:
        cfg = self.cfg
        self._install_signal_handlers()
        last_log_time = clock()
        self.log.start(self.total_steps, self.step)
        parts = ", ".join(f"{name} {s:.1f}s" for name, s in self.startup_s.items())
        self.log.message(f"start-up took {last_log_time - self._began:.1f}s ({parts})"
                         + (", counted in --max-time" if cfg.max_time else ""))
        tokens = self._tokens_per_step()
        first = min(cfg.log_every * (self.step // cfg.log_every + 1), self.total_steps)
        budget = " and ".join(b for b in (f"--max-time {cfg.max_time:g}s" if cfg.max_time else "",
                                          f"--max-tokens {cfg.max_tokens}" if cfg.max_tokens else "") if b)
        self.log.message(f"training steps {self.step + 1}..{self.total_steps}"
                         + (" (estimated)" if cfg.max_time and not (cfg.max_steps or cfg.epochs) else "")
                         + f" ({cfg.batch_size} x {cfg.seq_len}"
                         + (f" x {cfg.grad_accum} accumulated" if cfg.grad_accum > 1 else "")
                         + f" = {tokens} tokens each), {cfg.optim} at lr {cfg.lr:g}"
                         + (", document masks" if self._doc_masks() else "")
                         + f", lr schedule {cfg.schedule}"
                         + (f" sized to the budget {budget}" if budget else "")
                         + f"; the first log line comes after step {first}"
                         + ("; the first steps compile" if cfg.compile else ""))
        exit_code = 0
        logged = self.step
        done = self._done()
        while not done:
            lr = lr_at(self.step, self._progress(), lr=cfg.lr, min_lr=cfg.min_lr, warmup=cfg.warmup_steps,
                       schedule=cfg.schedule, decay_frac=cfg.decay_frac)
            for group in self.optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            step_start = clock() if self._compiling else None
            step = self._optimizer_step()
            self._watch_finite(step)
            self.step += 1
            if self._compiling:  # the first step of a compiled run is mostly compilation: say how long
                self._compiling = False
                self._check_finite_so_far()  # waits for the step to end, so the time is the step's
                self.log.message(f"torch.compile: step {self.step} took {clock() - step_start:.1f}s "
                                 "with compilation (counted in the run's wall-clock and --max-time)")
            self.log.advance()
            self._note_repeats()
            done = self._done()
            if self.step % cfg.log_every == 0 or self.step == self.total_steps or done:
                final_eval = done and self.setup.val_dir is not None  # a run ends with its held-out loss
                self._log_row(step, lr, clock() - last_log_time, self.step - logged, final_eval)
                last_log_time, logged = clock(), self.step
            if self.stop_signal is not None:
                exit_code = 128 + self.stop_signal
                self.log.message(f"signal {self.stop_signal}: saving step {self.step} and exiting")
                break
            if self.step % cfg.save_every == 0:
                self.save()
        self.save()
        self.log.close()
        if self.ds_engine is not None:
            # destroy() removes the gradient hooks through which autograd (in C++, unseen by Python's
            # collector) keeps the engine and its ZeRO optimizer, holders of the process groups, alive
            self.ds_engine.destroy()
        if self.dist.enabled:  # DDP, the engine, its optimizer and the model hold the groups (Dist.cleanup)
            self.model = self.raw_model = self.ds_engine = self.optimizer = self.setup = None
        self.dist.cleanup()
        self._restore_signal_handlers()
        return exit_code

    def _log_row(self, step: dict, lr: float, elapsed: float, steps: int, evaluate: bool):
        cfg = self.cfg
        self._check_finite_so_far()
        row = self._read_row(step)
        self._count_tokens()
        (window_tokens, window_useful), self._window = self._window, (0, 0)
        row.update(step=self.step, lr=lr, tokens_per_s=window_tokens / elapsed,
                   useful_tokens_per_s=window_useful / elapsed)
        if evaluate or (cfg.eval_every and self.step % cfg.eval_every == 0):
            row["val_loss"] = self.setup.validate(self.model)
        row["mfu"] = self._mfu(row["tokens_per_s"])
        eta = (self.total_steps - self.step) * elapsed / max(1, steps)
        if cfg.max_time:  # the budget is the ETA
            eta = min(eta, max(0.0, cfg.max_time - self._elapsed())) if cfg.max_steps or cfg.epochs else \
                max(0.0, cfg.max_time - self._elapsed())
        self.log.row(row, eta_s=eta)

    def _note_repeats(self):
        epoch = int(self.setup.loader_epoch())
        if epoch > self._epochs_begun:
            self._epochs_begun = epoch
            self.log.message(f"the data repeats: epoch {epoch + 1} begins after step {self.step}")

    def _done(self) -> bool:
        """Whether the run has reached its end: --max-steps, --epochs, or a budget."""
        cfg = self.cfg
        if cfg.max_steps and self.step >= cfg.max_steps:
            return True
        if cfg.max_steps is None and cfg.epochs is not None and self.setup.loader_epoch() >= cfg.epochs:
            return True
        tokens = self.tokens_seen + self._tokens * self.dist.world_size
        for flag, limit, spent in (("--max-time", cfg.max_time, self._elapsed()),
                                   ("--max-tokens", cfg.max_tokens, tokens)):
            if limit and spent >= limit:
                self.log.message(f"{flag} {limit:g} reached at step {self.step}")
                return True
        return False

    def _optimizer_step(self) -> dict:
        """One optimizer step over --grad-accum micro-batches. Nothing here reads a device value back (on
        CUDA each read is a host sync that stalls the launch queue): the loss, aux loss, metrics, gradient
        norm and, under DDP, the step's loss weight stay on the device in the returned row until
        `_read_row` reads them, once per logged step. The batches were read and sent to the device a step
        ahead (`Setup.next_step`); loss weights and token counts come from their host copies.
        Known syncs left: GradScaler's inf check (fp16 with a non-fused optimizer only), DeepSpeed's
        grad norm, and GRPO (whose batches are generated)."""
        cfg, setup = self.cfg, self.setup
        micro = setup.next_step(cfg.grad_accum)  # [(batch on the host, the same on the device)]
        objective = setup.objective
        local_weight = sum(float(objective.weight(host)) for host, _ in micro)
        self._tokens += sum(objective.tokens(host) for host, _ in micro)
        self._useful += sum(objective.useful(host) for host, _ in micro)
        total_weight = self.dist.all_reduce_sum_on_device(local_weight)  # a float, or a device tensor (DDP)
        # each rank's gradient is averaged by DDP (divided by world size), so scale it back up
        scale = self.dist.world_size / (total_weight.clamp_min(1e-12).float() if torch.is_tensor(total_weight)
                                        else max(total_weight, 1e-12))
        sums = None
        for i, (_, batch) in enumerate(micro):
            with self.dist.no_sync(self.model, last=i == len(micro) - 1):
                loss, parts = self._micro_loss(batch, scale, len(micro))
                self._backward(loss)
            sums = self._accumulate(sums, parts, len(micro))
        grad_norm = self._update()
        setup.after_step()
        return {"_sums": sums, "_grad_norm": grad_norm, "_weight": total_weight}

    def _count_tokens(self):
        """Adds all ranks' tokens and useful (loss-bearing) tokens since the last call to tokens_seen and
        to the log window. Called when a step is logged and before a save: the one all-reduce of them."""
        tokens, useful = self.dist.all_reduce_sums([self._tokens, self._useful])
        self._tokens = self._useful = 0
        self.tokens_seen += int(tokens)
        self._window = (self._window[0] + int(tokens), self._window[1] + int(useful))

    def _micro_loss(self, batch, scale: float, n_micro: int):
        """Forward and loss of one micro-batch already on the device. -> (the loss to backpropagate,
        (summed loss, aux loss, metrics) to accumulate)."""
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            loss_sum, aux, metrics = self.setup.objective(self.model, batch)
        return loss_sum.float() * scale + aux.float() / n_micro, (loss_sum, aux, metrics)

    def _backward(self, loss):
        if self.ds_engine is not None:  # deepspeed: it reduces, clips and steps at the boundary
            self.ds_engine.backward(loss, scale_wrt_gas=False)
            self.ds_engine.step()
        else:
            self.scaler.scale(loss).backward()

    @staticmethod
    def _accumulate(sums: dict | None, parts, n_micro: int) -> dict:
        """Adds one micro-batch's loss, aux loss and metrics to the step's sums, on the loss's device
        (fp64: a sum over many micro-batches and ranks). Never a read back to the host."""
        loss_sum, aux, metrics = parts
        if sums is None:
            zero = torch.zeros((), dtype=torch.float64, device=loss_sum.device)
            sums = {"loss": zero.clone(), "aux_loss": zero.clone()}
        sums["loss"] += loss_sum.detach().double()
        sums["aux_loss"] += aux.detach().double() / n_micro
        for k, v in metrics.items():
            v = torch.as_tensor(v).detach().double().to(sums["loss"].device)
            sums[k] = sums[k] + v / n_micro if k in sums else v / n_micro
        return sums

    def _update(self):
        """Unscale, clip, step and zero the gradients. -> the gradient norm, a device tensor."""
        if self.ds_engine is not None:
            return self.ds_engine.get_global_grad_norm() or 0.0
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.setup.trainable, self.cfg.grad_clip or float("inf"))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def _read_row(self, row: dict) -> dict:
        """The step's numbers as Python floats, reduced over ranks: the one read back per logged step."""
        sums, weight = row["_sums"], float(row["_weight"])
        out = {"loss": self.dist.all_reduce_sum(float(sums["loss"])) / max(weight, 1e-12),
               "grad_norm": float(row["_grad_norm"])}
        if self.raw_model.config.use_moe:
            out["aux_loss"] = self.dist.all_reduce_sum(float(sums["aux_loss"])) / self.dist.world_size
        for k, v in sums.items():
            if k not in ("loss", "aux_loss"):
                out[k] = self.dist.all_reduce_sum(float(v)) / self.dist.world_size
        return out

    def _watch_finite(self, step: dict):
        """Counts, on the device, consecutive steps whose loss or gradient norm is not finite, and keeps the
        longest such run since the last check; `_check_finite_so_far` reads it when a step is logged and
        before every save, so a diverged run stops within --log-every steps and never saves what diverged.
        Under fp16, GradScaler skips a step with inf/NaN gradients by design and lowers its scale, so
        there only a run of 5 such steps stops; otherwise one does."""
        loss = step["_sums"]["loss"]
        ok = torch.isfinite(loss) & torch.isfinite(torch.as_tensor(step["_grad_norm"], device=loss.device))
        bad = ok.logical_not()
        self.bad_run = bad.long() if self.bad_run is None else (self.bad_run + 1) * bad
        self.worst_run = self.bad_run if self.worst_run is None else torch.maximum(self.worst_run, self.bad_run)
        self.last_step = step

    def _check_finite_so_far(self):
        if self.worst_run is None:
            return
        worst, self.worst_run = int(self.worst_run), None  # the one read back per log line or save
        if worst < (5 if self.scaler.is_enabled() else 1):
            return
        row = self._read_row(self.last_step)
        bad = [k for k in ("loss", "grad_norm") if not math.isfinite(row[k])]
        what = (f"non-finite {' and '.join(bad)} ({', '.join(f'{k} {row[k]}' for k in bad)})" if bad else
                "a non-finite loss or grad_norm at an earlier step since the last log line")
        if worst > 1:
            what += f"; {worst} such steps in a row"
        raise TrainingDiverged(f"step {self.step}: {what}; stopped without saving it. {self._last_good()} "
                               f"Lower --lr (now {self.cfg.lr}) or check the data.")

    def _check_finite_weights(self):
        if self.ds_engine is not None:  # ZeRO shards: each rank holds a part; the loss check covers it
            return
        bad = [n for n, p in self.raw_model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
        if bad:
            raise TrainingDiverged(f"step {self.step}: {len(bad)} weight tensor(s) are not finite after the update "
                                   f"(e.g. {bad[0]}); stopped without saving them. {self._last_good()} "
                                   f"Lower --lr (now {self.cfg.lr}).")

    def _last_good(self) -> str:
        """Names the newest checkpoint whose weights are finite: one that is not (a run resumed from a damaged
        checkpoint with its check bypassed, or a bit flip since) is no place to go back to."""
        steps = sorted((int(m.group(1)), p) for p in self.out.iterdir() if (m := STEP_DIR.match(p.name)))
        if not steps:
            return "No checkpoint was written."
        for _, path in reversed(steps):
            if weights_finite(path):
                return f"The last good checkpoint is {path}."
        return f"No checkpoint in {self.out} has finite weights."

    def _mfu(self, tokens_per_s: float):
        peak = _device_peak_flops(self.device, self.dtype)
        if peak is None:
            return None
        c = self.raw_model.config
        n = self.raw_model.num_params(active=True)
        flops_per_token = 6 * n + 12 * c.num_hidden_layers * c.hidden_size * self.cfg.seq_len
        return tokens_per_s * flops_per_token / (peak * self.dist.world_size)

    # ----------------------------------------------------------------- checkpoints
    def _install_signal_handlers(self):
        """The first Ctrl-C or SIGTERM lets the step end, saves it and exits (SPEC §5); a second exits at
        once, without saving that step (a GRPO step generates for many seconds before it ends)."""
        def handler(signum, frame):
            if self.stop_signal is not None:
                raise Interrupted(signum)
            self.stop_signal = signum
            _say(f"{signal.Signals(signum).name}: saving a checkpoint when step {self.step + 1} ends, then "
                 "exiting (again to exit now, without saving it)")

        self._old_handlers = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old_handlers[sig] = signal.signal(sig, handler)

    def _restore_signal_handlers(self):
        for sig, old in getattr(self, "_old_handlers", {}).items():
            signal.signal(sig, old)
        self._old_handlers = {}

    def save(self):
        """step-N/ with model (or adapter), tokenizer and trainer_state/, atomically; keep the newest --keep."""
        self._check_finite_so_far()
        self._check_finite_weights()
        self._count_tokens()
        if self.saved_step == self.step:  # the periodic save at the last step, or the checkpoint resumed from
            return
        if self.ds_engine is not None:
            self._save_deepspeed()
        elif self.dist.is_main:
            # a step-N already there is an earlier run's, left incomplete (resume skipped it): replaced
            target = self.out / f"step-{self.step}"
            with writing(f"checkpoint {target.name}", target, need=self._checkpoint_bytes):
                atomic_dir(target, self._fill_checkpoint)
            self._prune()
            self.log.save(self.step, target)
        self.dist.barrier()
        self.saved_step = self.step

    def _fill_checkpoint(self, tmp: Path, deepspeed: bool = False):
        self.setup.write_weights(tmp)
        if self.setup.tokenizer_dir is not None:
            copy_tokenizer(self.setup.tokenizer_dir, tmp)
        state_dir = tmp / TRAINER_STATE
        state_dir.mkdir(exist_ok=True)
        if not deepspeed:  # through a Python file, whose OSError names a full disk (torch's own writer does not)
            with open(state_dir / OPTIMIZER_FILE, "wb") as f:
                torch.save(self.optimizer.state_dict(), f)  # read back with weights_only
        _write_rng_state(state_dir, scaler=self.scaler.state_dict())
        state = {
            "step": self.step, "tokens_seen": self.tokens_seen, "total_steps": self.total_steps,
            "elapsed_s": round(self._elapsed(), 3),
            "world_size": self.dist.world_size, "data": self.setup.loader_state(), "stage": self.stage,
            "data_fingerprint": self.data_fingerprint,
        }
        (state_dir / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")

    def _checkpoint_bytes(self) -> int:
        """About what a checkpoint takes (the full disk's message): weights, optimizer state, tokenizer."""
        weights = self.setup.checkpoint_tensors()
        tok = self.setup.tokenizer_dir
        tok_bytes = sum((tok / n).stat().st_size for n in TOKENIZER_FILES if (tok / n).is_file()) if tok else 0
        tensors = [*weights, *_tensors_in(self.optimizer.state_dict())]
        return sum(t.numel() * t.element_size() for t in tensors) + tok_bytes

    def _save_deepspeed(self):
        """Every rank writes its optimizer shard with DeepSpeed's own saver into a shared temp dir; rank
        0 adds the model files and renames the whole directory into place."""
        target = self.out / f"step-{self.step}"
        tmp = self.out / f".tmp-{target.name}-deepspeed"
        if self.dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / TRAINER_STATE).mkdir(parents=True)
        self.dist.barrier()
        self.ds_engine.save_checkpoint(str(tmp / TRAINER_STATE / DEEPSPEED_STATE), tag="state")
        self.dist.barrier()
        with distributed.gathered_weights(self.raw_model):  # ZeRO-3: model.safetensors gets whole weights
            if self.dist.is_main:
                self._fill_checkpoint(tmp, deepspeed=True)
                publish_dir(tmp, target)
                self._prune()
                self.log.save(self.step, target)
        self.dist.barrier()

    def _prune(self):
        """Keeps the newest --keep complete checkpoints; removes older step dirs, complete or not (an
        incomplete one is never counted among the kept, so it cannot push out a good one)."""
        steps = sorted((int(m.group(1)), p) for p in self.out.iterdir() if (m := STEP_DIR.match(p.name)))
        kept = [n for n, path in steps if is_complete(path)][-self.cfg.keep:]
        for n, path in steps:
            if kept and n < kept[0]:
                shutil.rmtree(path, ignore_errors=True)

    def _resume(self):
        ckpt = resolve_checkpoint(self.out)
        state_dir = ckpt / TRAINER_STATE
        ds_dir = state_dir / DEEPSPEED_STATE
        if ds_dir.exists() != bool(self.cfg.deepspeed):
            raise UsageError(f"--resume: {ckpt} was {'' if ds_dir.exists() else 'not '}written by a DeepSpeed run; "
                             "resume it the same way")
        state = read_trainer_state(state_dir)
        if state["stage"] != self.stage:
            raise UsageError(f"--resume: {ckpt} is a {state['stage']!r} run, not {self.stage!r}")
        saved_data = state.get("data_fingerprint")
        if saved_data is not None and saved_data != self.data_fingerprint:
            raise UsageError(f"--resume: --data {self.cfg.data} is not the data this run was trained on (data "
                             f"fingerprint {self.data_fingerprint}, {state_dir / STATE_FILE} has {saved_data}), "
                             "so its saved data position would be wrong; to train on new data start a new run "
                             f"with --init {ckpt}")
        try:  # weights_only: a tensor-only unpickler that runs no code from the file
            opt = None if ds_dir.exists() else torch.load(state_dir / OPTIMIZER_FILE, map_location=self.device,
                                                          weights_only=True)
        except (OSError, ValueError, RuntimeError, pickle.UnpicklingError, EOFError) as e:
            raise CheckpointError(f"{state_dir / OPTIMIZER_FILE}: cannot resume from it ({load_error(e)})") from None
        if ds_dir.exists():
            try:
                distributed.vet_deepspeed_state(ds_dir)
            except ValueError as e:
                raise CheckpointError(str(e)) from None
        rng = _read_rng_state(state_dir)
        self.setup.load_weights(ckpt)
        if opt is not None:
            saved = "muon" if set(opt) == {"adamw", "muon"} else "adamw"
            if saved != self.cfg.optim:
                raise UsageError(f"--resume: {ckpt} was trained with --optim {saved}; resume it with the same --optim "
                                 f"(or start a new run with --init {ckpt})")
            self.optimizer.load_state_dict(opt)
        else:
            self._deepspeed_resume_dir = ds_dir
        if rng is None:
            self.log.message(f"{state_dir}: no rng.json (a checkpoint from before 2026-12-04, whose rng.pt is a "
                             "pickle and is not read): random state and fp16 loss scale start fresh")
        else:
            self.scaler.load_state_dict(rng["scaler"])
            if state["world_size"] == self.dist.world_size:
                _set_rng_state(rng)
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self._elapsed_before = float(state.get("elapsed_s", 0.0))  # what --max-time has spent already
        try:
            self.setup.load_loader_state(state["data"])
        except ValueError as e:  # DataError: a position that does not fit this data
            raise CheckpointError(f"{state_dir / STATE_FILE}: field 'data': {e}, cannot resume") from None
        self.log.truncate_after(self.step)
        self.saved_step = self.step
        self.log.message(f"resumed from {ckpt} at step {self.step}")
        newer = sorted(p.name for p in self.out.iterdir()
                       if (m := STEP_DIR.match(p.name)) and int(m.group(1)) > self.step)
        if newer:  # resolve_checkpoint skipped them: they lack config.json or their weights
            self.log.message(f"{', '.join(newer)} in {self.out}: incomplete, skipped; replaced when the run saves "
                             "that step")


def _read_json(file: Path) -> dict:
    return read_json(file, context=", cannot resume")


def _tensors_in(tree) -> list[torch.Tensor]:
    if torch.is_tensor(tree):
        return [tree]
    items = tree.values() if isinstance(tree, dict) else tree if isinstance(tree, (list, tuple)) else ()
    return [t for item in items for t in _tensors_in(item)]


def _say(text: str) -> None:
    """A line on stderr from a signal handler: os.write, since print may be in the middle of a write to the
    same stream (a reentrant call raises)."""
    try:
        os.write(2, f"\n[{time.strftime('%H:%M:%S')}] {text}\n".encode())
    except OSError:
        pass


# Random state and loss scale as tensors (safetensors) + JSON (checkpoint.RNG_TENSORS, RNG_JSON): no pickle


def _write_rng_state(state_dir: Path, scaler: dict) -> None:
    from safetensors.torch import save_file

    version, internal, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(keys.astype(np.int64))}
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    tensors.update({f"cuda_{i}": t for i, t in enumerate(cuda)})
    save_file(tensors, state_dir / RNG_TENSORS)
    meta = {"python": [version, list(internal), gauss_next],
            "numpy": {"name": name, "pos": int(pos), "has_gauss": int(has_gauss),
                      "cached_gaussian": float(cached_gaussian)},
            "cuda_devices": len(cuda), "scaler": scaler}
    (state_dir / RNG_JSON).write_text(json.dumps(meta) + "\n")


def _read_rng_state(state_dir: Path) -> dict | None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not (state_dir / RNG_JSON).exists():
        return None
    meta = _read_json(state_dir / RNG_JSON)
    try:
        tensors = load_file(state_dir / RNG_TENSORS)
        version, internal, gauss_next = meta["python"]
        np_state = meta["numpy"]
        return {
            "python": (version, tuple(internal), gauss_next),
            "numpy": (np_state["name"], tensors["numpy_keys"].numpy().astype(np.uint32), np_state["pos"],
                      np_state["has_gauss"], np_state["cached_gaussian"]),
            "torch": tensors["torch"],
            "cuda": [tensors[f"cuda_{i}"] for i in range(meta["cuda_devices"])] or None,
            "scaler": meta["scaler"],
        }
    except (SafetensorError, OSError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{state_dir}: unreadable random state ({type(e).__name__}: {e}), "
                              "cannot resume") from None


def _set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


# dense bf16 peak FLOP/s by device name fragment (vendor datasheets)
_PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "4090": 165e12, "A10": 125e12}


def _device_peak_flops(device: torch.device, dtype: torch.dtype):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in _PEAKS.items():
        if key in name:
            return peak if dtype != torch.float32 else peak / 2
    return None
