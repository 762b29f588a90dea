"""Process-group set-up for `torchrun` (DDP: gloo on CPU, nccl on CUDA) and the few collectives the
loop needs. A single process is a world of size 1 and every collective is a no-op.
"""

import contextlib
import dataclasses
import gc
import importlib
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist


@dataclasses.dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self):
        if self.enabled:
            dist.barrier()

    def all_reduce_sum(self, value: float) -> float:
        if not self.enabled:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t)
        return float(t.item())

    def all_reduce_sums(self, values: list[float]) -> list[float]:
        """Several sums in one collective (and one read back)."""
        if not self.enabled:
            return list(values)
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t)
        return t.tolist()

    def all_reduce_sum_on_device(self, value: float):
        """The sum over ranks left on the device, so the step goes on without waiting for it. -> `value`
        itself when single-process, else a float64 device tensor (made by a fill kernel: copying a Python
        number in would be a blocking host-to-device copy)."""
        if not self.enabled:
            return value
        t = torch.full((), float(value), dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t)
        return t

    def _comm_device(self):
        return self.device if self.device is not None and self.device.type == "cuda" else torch.device("cpu")

    def no_sync(self, model, last: bool):
        """Skip DDP's gradient all-reduce on all but the last micro-batch of an optimizer step."""
        if self.enabled and not last and hasattr(model, "no_sync"):
            return model.no_sync()
        return contextlib.nullcontext()

    def cleanup(self):
        """Ends the process groups and, with them, gloo's threads (two workers and a socket loop per
        group). destroy_process_group only unregisters a group: a gloo group stops its threads when its
        last reference goes, so a group still referenced keeps them running through the interpreter's
        shutdown and exit(), where one rank once aborted ("terminate called without an active
        exception", exit 250, after a DeepSpeed run had saved its last step). The trainer first lets its
        wrapped model (DDP, or the DeepSpeed engine) go and `setup` keeps imports from holding the
        default group; the collection below then frees the groups here, while every rank is alive."""
        if self.enabled and dist.is_initialized():
            dist.barrier()
            ds_comm = sys.modules.get("deepspeed.comm")
            deepspeed = ds_comm is not None and ds_comm.is_initialized()
            if deepspeed:
                ds_comm.destroy_process_group()  # torch's, and DeepSpeed's module-level group handles
            else:
                dist.destroy_process_group()
            gc.collect()  # DeepSpeed's engine and optimizer are reference cycles: only the collector frees them
            if deepspeed:
                _remove_shm_buffer()


def _remove_shm_buffer() -> None:
    """DeepSpeed's CPU all-reduce creates a shared-memory file per rank (69 MB, in /dev/shm) and never
    removes it: a few dozen runs filled a 24 GB machine's /dev/shm, and the next run was killed for
    memory. Each rank removes its own once every rank is past its last collective (the mapping
    outlives the name)."""
    port, rank = os.environ.get("MASTER_PORT"), os.environ.get("RANK")
    if port is None or rank is None:
        return
    for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_{rank}"):
        path.unlink(missing_ok=True)


def setup(cfg) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    device = None
    if use_cuda:
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # imported before the group exists: imported after, each takes references to the default group
        # that destroy_process_group never drops (torch._dynamo 10, which torch.optim imports with the
        # first optimizer; deepspeed 2), so the group and its gloo threads would outlive `cleanup`
        for module in ("torch._dynamo", "deepspeed") if cfg.deepspeed else ("torch._dynamo",):
            importlib.import_module(module)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(rank=rank, world_size=world, local_rank=local, device=device)


def wrap(model, d: Dist):
    """`model` DDP-wrapped when running under torchrun (world size > 1), else itself."""
    if not d.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [d.device.index] if d.device is not None else None
    return DDP(model, device_ids=ids)


def deepspeed_engine(model, optimizer, cfg, dtype: torch.dtype):
    """deepspeed.initialize on our model and AdamW, with the config's "auto" values filled from the run
    (bf16/fp16 "auto": on where `dtype` is that). -> (the engine, the dtype the loop autocasts to from
    now on: float32, as DeepSpeed casts the model itself; no autocast on top)."""
    import json

    import deepspeed

    with open(cfg.deepspeed) as f:
        try:
            ds = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"--deepspeed {cfg.deepspeed}: not valid JSON ({e})") from None
    autos = {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.grad_clip or 0.0,
    }
    for key, value in autos.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
    ds.pop("train_batch_size", None)  # derived by deepspeed from the two above and the world size
    for key, half in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        if isinstance(ds.get(key), dict) and ds[key].get("enabled") == "auto":
            ds[key]["enabled"] = dtype == half
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds, dist_init_required=False)
    if engine.zero_optimization_partition_weights():  # ZeRO-3: parameters live partitioned across ranks
        # the fused head reads lm_head's weight (tied: the embedding's) outside lm_head's forward; ZeRO-3
        # gathers it for head_loss's forward and backward only once it knows head_loss needs it
        model = engine.module
        deepspeed.zero.register_external_parameter(model.head_loss, model.lm_head.weight)
    return engine, torch.float32


def gathered_weights(model):
    """A context in which every rank holds the model's full weights (all ranks must enter it): under
    ZeRO-3 each rank otherwise holds only its partition and the parameters are empty tensors; a no-op
    for ZeRO-1/2 and DDP, whose ranks hold whole weights."""
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)


# What DeepSpeed's checkpoints pickle besides tensors and containers (ZeRO 1/2/3, deepspeed 0.18)
DEEPSPEED_STATE_CLASSES = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


def vet_deepspeed_state(ds_dir) -> None:
    """DeepSpeed's `load_checkpoint` unpickles its files with `weights_only=False`, so a crafted file
    would run code. Each file is first read with torch's weights-only unpickler, allowing only the
    classes DeepSpeed itself writes; a file holding anything else is refused before DeepSpeed opens it.
    Raises ValueError naming the file."""
    import pickle

    allowed = []
    for name in DEEPSPEED_STATE_CLASSES:
        module, _, attr = name.rpartition(".")
        with contextlib.suppress(ImportError, AttributeError):
            allowed.append(getattr(importlib.import_module(module), attr))
    for file in sorted(Path(ds_dir).rglob("*.pt")):
        try:
            with torch.serialization.safe_globals(allowed):
                torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as e:
            from minimind.checkpoint import load_error

            raise ValueError(f"{file}: refused, it holds more than DeepSpeed's state ({load_error(e)}); "
                             "cannot resume") from None
