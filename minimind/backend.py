"""How an optimizer step runs on the device: a `Backend` holds the model as the step runs it (plain, DDP,
DeepSpeed's engine, compiled), the optimizer, the loss scaler and the autocast dtype, and does the step
(`step`: forward, backward and update over the micro-batches). Plain PyTorch (`TorchBackend`, DDP under
torchrun) and DeepSpeed (`DeepSpeedBackend`) differ only in backward, update, what a checkpoint of the
optimizer is and how it is written, so the loop never asks which one it drives.

Also here: the device and dtype a run uses (`pick_device`, `pick_dtype`, `auto_dtype`).
"""

import dataclasses
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from minimind import distributed
from minimind.checkpoint import DEEPSPEED_STATE, TRAINER_STATE, atomic_dir, publish_dir, read_json
from minimind.errors import UsageError
from minimind.faults import writing
from minimind.optim import build_optimizer
from minimind.watch import nonfinite_weights


def pick_device(name: str) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA device is available")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def pick_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """None or "auto": bf16 on CUDA where supported; on a CPU float32 until `auto_dtype` has timed the
    two at the run's shape (`minimind.dtype_choice`)."""
    if name in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def auto_dtype(cfg, model, *, device: torch.device, dist, log) -> tuple[torch.dtype, dict | None]:
    """--dtype auto on a CPU: a forward and backward at the run's batch shape in float32 and in bfloat16
    autocast, taking turns; the faster (bf16 by at least 10%) is the run's dtype. A resumed run keeps the
    dtype run.json recorded. Every rank times and the sums decide, so all ranks agree.
    -> (the dtype, {dtype name: seconds of a forward + backward}, None when nothing was timed)."""
    from minimind.data.loader import Batch
    from minimind.dtype_choice import choose, describe, train_dtype
    from minimind.objectives import token_nll

    if cfg.resume:
        chosen = read_json(Path(cfg.out) / "run.json", context=" (the run's resolved flags)").get("dtype_chosen")
        if chosen in ("float32", "bfloat16"):
            log.message(f"--dtype auto: {chosen}, as this run chose when it started")
            return pick_dtype(chosen, device), None
    # two rows at the run's length: the same products as its steps, in a fraction of their time
    b, t = min(cfg.batch_size, 2), cfg.seq_len
    gen = torch.Generator().manual_seed(0)  # the run's own random state is left as it is
    ids = torch.randint(model.config.vocab_size, (b, t + 1), generator=gen).to(device)
    batch = Batch(ids[:, :-1], ids[:, 1:], torch.ones(b, t, device=device), None)
    params = [p for p in model.parameters() if p.requires_grad]
    log.message(f"--dtype auto: timing a forward and backward at {b} x {t} in float32 and bfloat16")
    _, times = train_dtype(lambda: token_nll(model, batch)[0], params, device, rounds=1)
    names = list(times)
    summed = dist.all_reduce_sums([times[d] for d in names])
    times = {d: float(s) / dist.world_size for d, s in zip(names, summed)}  # the ranks' mean
    dtype = choose(times)
    log.message(describe(f"--dtype auto, a forward and backward at {b} x {t}", times, dtype))
    return dtype, {str(d).removeprefix("torch."): round(s, 4) for d, s in times.items()}


@dataclasses.dataclass
class Step:
    """One optimizer step's numbers. `sums` (loss, aux loss, metrics; fp64), `grad_norm` and, under DDP,
    `weight` (the step's loss weight over all ranks) stay on the device until `Metrics.read` reads them,
    once per logged step; `tokens` and `useful` (loss-bearing) tokens are this rank's, host numbers."""

    sums: dict
    grad_norm: object
    weight: object
    tokens: int
    useful: int


def accumulate(sums: dict | None, parts, n_micro: int) -> dict:
    """Adds one micro-batch's loss, aux loss and metrics to the step's sums, on the loss's device (fp64: a
    sum over many micro-batches and ranks). Never a read back to the host."""
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


class Backend:
    """The step as plain PyTorch does it: autocast to `dtype`, GradScaler (fp16), clipping to `grad_clip`,
    the optimizer's step. `raw_model` is the model itself, `model` what the forward runs (a subclass
    wraps it)."""

    def __init__(self, model, *, optimizer, scaler, trainable, device, dtype, dist, grad_clip):
        self.raw_model = self.model = model
        self.optimizer, self.scaler, self.trainable = optimizer, scaler, trainable
        self.device, self.dtype, self.dist, self.grad_clip = device, dtype, dist, grad_clip

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

    def step(self, micro: list[tuple], objective) -> Step:
        """One optimizer step over the micro-batches `micro` ([(batch on the host, the same on the device)],
        read and sent a step ahead: `Setup.next_step`). Nothing here reads a device value back (on CUDA
        each read is a host sync that stalls the launch queue): loss weights and token counts come from
        the host copies. Known syncs left: GradScaler's inf check (fp16 with a non-fused optimizer only),
        DeepSpeed's grad norm, and GRPO (whose batches are generated)."""
        local_weight = sum(float(objective.weight(host)) for host, _ in micro)
        tokens = sum(objective.tokens(host) for host, _ in micro)
        useful = sum(objective.useful(host) for host, _ in micro)
        total_weight = self.dist.all_reduce_sum_on_device(local_weight)  # a float, or a device tensor (DDP)
        # each rank's gradient is averaged by DDP (divided by world size), so scale it back up
        scale = self.dist.world_size / (total_weight.clamp_min(1e-12).float() if torch.is_tensor(total_weight)
                                        else max(total_weight, 1e-12))
        sums = None
        for i, (_, batch) in enumerate(micro):
            with self.dist.no_sync(self.model, last=i == len(micro) - 1):
                loss, parts = self.micro_loss(batch, objective, scale=scale, n_micro=len(micro))
                self.backward(loss)
            sums = accumulate(sums, parts, len(micro))
        return Step(sums=sums, grad_norm=self.update(), weight=total_weight, tokens=tokens, useful=useful)

    def micro_loss(self, batch, objective, *, scale, n_micro: int):
        """Forward and loss of one micro-batch already on the device. -> (the loss to backpropagate,
        (summed loss, aux loss, metrics) to accumulate)."""
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            loss_sum, aux, metrics = objective(self.model, batch)
        return loss_sum.float() * scale + aux.float() / n_micro, (loss_sum, aux, metrics)

    def backward(self, loss) -> None:
        self.scaler.scale(loss).backward()

    def update(self):
        """Unscale, clip, step and zero the gradients. -> the gradient norm, a device tensor."""
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, self.grad_clip or float("inf"))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def nonfinite_weights(self) -> list[str]:
        return nonfinite_weights(self.raw_model)

    # checkpoints: what the optimizer's state is, and how a checkpoint directory is written
    def state_dict(self) -> dict:
        """{"optimizer": what trainer_state/optimizer.pt holds (None: the backend writes its own files),
        "scaler": the loss scale}."""
        return {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """`state`: a `state_dict()`'s, as read back (`Checkpointer.resume`); a None part starts fresh."""
        if state["optimizer"] is not None:
            saved, ours = _group_counts(state["optimizer"]), _group_counts(self.optimizer.state_dict())
            if saved != ours:
                raise ValueError(
                    f"--resume: the checkpoint's optimizer state has {saved} parameter groups where this run's "
                    f"optimizer has {ours}: it was written by an older minimind (before 2026-12-08 the embeddings "
                    "shared AdamW's groups; --embed-lr-scale gave them their own). Go on from its weights with a "
                    "fresh optimizer (--init CKPT and a new --out), or resume it with the code that wrote it")
            self.optimizer.load_state_dict(state["optimizer"])
        if state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])

    def write(self, target: Path, fill: Callable[[Path], None], *, need) -> None:
        """Writes checkpoint directory `target` atomically: `fill(tmp)` writes its files; the main rank's."""
        if self.dist.is_main:
            # a step-N already there is an earlier run's, left incomplete (resume skipped it): replaced
            with writing(f"checkpoint {target.name}", target, need=need):
                atomic_dir(target, fill)

    def close(self) -> None:
        pass


class TorchBackend(Backend):
    """Plain PyTorch; the model DDP-wrapped when the run has several processes (torchrun)."""

    def __init__(self, model, **parts):
        super().__init__(model, **parts)
        self.model = distributed.wrap(model, self.dist)


class DeepSpeedBackend(Backend):
    """DeepSpeed's engine (--deepspeed CONFIG.json) on our model and AdamW: it reduces, clips and steps at
    the accumulation boundary, casts the model itself (the loop's autocast is off) and writes the
    optimizer state as its own sharded files."""

    def __init__(self, model, *, cfg, **parts):
        super().__init__(model, **parts)
        self.engine, self.dtype = distributed.deepspeed_engine(model, self.optimizer, cfg, self.dtype)
        self.model = self.engine

    def backward(self, loss) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)
        self.engine.step()

    def update(self):
        return self.engine.get_global_grad_norm() or 0.0

    def nonfinite_weights(self) -> list[str]:
        return []  # ZeRO shards: each rank holds a part; the loss check covers it

    def state_dict(self) -> dict:
        return {"optimizer": None, "scaler": self.scaler.state_dict()}  # the optimizer: DeepSpeed's files

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.engine.load_checkpoint(str(state["deepspeed"]), tag="state", load_lr_scheduler_states=False)

    def write(self, target: Path, fill: Callable[[Path], None], *, need) -> None:
        """Every rank writes its optimizer shard with DeepSpeed's own saver into a shared temp dir; rank 0
        adds the rest (`fill`) and renames the whole directory into place."""
        tmp = target.parent / f".tmp-{target.name}-deepspeed"
        if self.dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / TRAINER_STATE).mkdir(parents=True)
        self.dist.barrier()
        self.engine.save_checkpoint(str(tmp / TRAINER_STATE / DEEPSPEED_STATE), tag="state")
        self.dist.barrier()
        with distributed.gathered_weights(self.raw_model):  # ZeRO-3: model.safetensors gets whole weights
            if self.dist.is_main:
                fill(tmp)
                publish_dir(tmp, target)
        self.dist.barrier()

    def close(self) -> None:
        # destroy() removes the gradient hooks through which autograd (in C++, unseen by Python's collector)
        # keeps the engine and its ZeRO optimizer, holders of the process groups, alive
        self.engine.destroy()


def make_backend(model, *, cfg, trainable, device, dtype, dist, log) -> Backend:
    """The run's backend from its config: the optimizer (--optim), DeepSpeed with --deepspeed, else plain
    PyTorch, and torch.compile on top with --compile."""
    # Muon's iteration in bf16 when the run is (on a CPU: only where bf16 was timed faster)
    ns_dtype = torch.bfloat16 if dtype in (torch.bfloat16, torch.float16) else None
    optimizer = build_optimizer(model, cfg.optim, lr=cfg.lr, weight_decay=cfg.weight_decay, device=device,
                                betas=cfg.adam_betas, ns_dtype=ns_dtype, embed_lr_scale=cfg.embed_lr_scale)
    parts = dict(optimizer=optimizer, scaler=torch.amp.GradScaler(device.type, enabled=dtype == torch.float16),
                 trainable=trainable, device=device, dtype=dtype, dist=dist, grad_clip=cfg.grad_clip)
    if cfg.deepspeed:
        log.message("starting DeepSpeed (it may build its ops on first use)")
        backend = DeepSpeedBackend(model, cfg=cfg, **parts)
    else:
        backend = TorchBackend(model, **parts)
    if cfg.compile:
        log.message(f"torch.compile (mode {cfg.compile_mode}): the first steps compile the model "
                    "(a minute or more on CPU)")
        backend.model = torch.compile(backend.model, mode=cfg.compile_mode)
    return backend


def _group_counts(state: dict) -> list[int]:
    """The parameter groups of an optimizer state: [n] for one optimizer, one per optimizer for several."""
    if "param_groups" in state:
        return [len(state["param_groups"])]
    return [len(part["param_groups"]) for part in state.values()]
