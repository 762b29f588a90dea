"""A run's checkpoints: `Checkpointer` writes step-N/ (the model or adapter, the tokenizer and
trainer_state/: the optimizer's state, random state and loss scale, and state.json) atomically, keeps
the newest --keep, and resumes a run from the newest complete one, checking first that it is this
run's (stage, data, optimizer, DeepSpeed or not). The file names are checkpoint.py's.

The loop's own state (step, tokens seen, time spent) comes in and goes out as a dict (the trainer's
`state_dict`); the optimizer's as its backend's `state_dict`, written by the backend's `write`.
"""

import dataclasses
import json
import pickle
import random
import shutil
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
    copy_tokenizer,
    is_complete,
    load_error,
    read_json,
    read_trainer_state,
    resolve_checkpoint,
    weights_finite,
)
from minimind.errors import UsageError


@dataclasses.dataclass
class Resumed:
    """What `Checkpointer.resume` read: the checkpoint, the trainer's state (state.json) and the
    backend's (`Backend.load_state_dict`: the optimizer's state or DeepSpeed's files, the loss scale)."""

    ckpt: Path
    trainer: dict
    backend: dict


class Checkpointer:
    """The checkpoints of the run whose config is `cfg` (--out, --keep, the stage, --data, --optim,
    --deepspeed); `setup` (stages.Setup) writes and loads the model and the data position."""

    def __init__(self, cfg, *, setup, dist, log):
        self.cfg, self.setup, self.dist, self.log = cfg, setup, dist, log
        self.out = Path(cfg.out)
        self.fingerprint = setup.data_fingerprint()
        self.saved_step = None  # the step whose checkpoint this process wrote (or resumed from)

    def save(self, step: int, state: dict, backend) -> None:
        """step-N/ with the model (or adapter), tokenizer and trainer_state/, written by `backend`; `state`:
        the trainer's. Keeps the newest --keep. Once per step: a second call for it does nothing."""
        if self.saved_step == step:  # the periodic save at the last step, or the checkpoint resumed from
            return
        target = self.out / f"step-{step}"
        backend.write(target, lambda tmp: self._fill(tmp, state, backend), need=lambda: self._bytes(backend))
        if self.dist.is_main:
            self._prune()
            self.log.save(step, target)
        self.dist.barrier()
        self.saved_step = step

    def _fill(self, tmp: Path, state: dict, backend):
        self.setup.write_weights(tmp)
        if self.setup.tokenizer_dir is not None:
            copy_tokenizer(self.setup.tokenizer_dir, tmp)
        state_dir = tmp / TRAINER_STATE
        state_dir.mkdir(exist_ok=True)
        saved = backend.state_dict()
        if saved["optimizer"] is not None:  # through a Python file, whose OSError names a full disk (torch's does not)
            with open(state_dir / OPTIMIZER_FILE, "wb") as f:
                torch.save(saved["optimizer"], f)  # read back with weights_only
        write_rng_state(state_dir, scaler=saved["scaler"])
        state = {**state, "world_size": self.dist.world_size, "data": self.setup.loader_state(),
                 "stage": self.cfg.stage, "data_fingerprint": self.fingerprint}
        (state_dir / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")

    def _bytes(self, backend) -> int:
        """About what a checkpoint takes (the full disk's message): weights, optimizer state, tokenizer."""
        tok = self.setup.tokenizer_dir
        tok_bytes = sum((tok / n).stat().st_size for n in TOKENIZER_FILES if (tok / n).is_file()) if tok else 0
        tensors = [*self.setup.checkpoint_tensors(), *_tensors_in(backend.state_dict())]
        return sum(t.numel() * t.element_size() for t in tensors) + tok_bytes

    def _prune(self):
        """Keeps the newest --keep complete checkpoints; removes older step dirs, complete or not (an
        incomplete one is never counted among the kept, so it cannot push out a good one)."""
        steps = sorted((int(m.group(1)), p) for p in self.out.iterdir() if (m := STEP_DIR.match(p.name)))
        kept = [n for n, path in steps if is_complete(path)][-self.cfg.keep:]
        for n, path in steps:
            if kept and n < kept[0]:
                shutil.rmtree(path, ignore_errors=True)

    def resume(self) -> Resumed:
        """Reads the newest complete checkpoint of --out and checks it is this run's; loads its weights,
        random state and data position. -> what the trainer and the backend load (then `announce`)."""
        cfg = self.cfg
        ckpt = resolve_checkpoint(self.out)
        state_dir = ckpt / TRAINER_STATE
        ds_dir = state_dir / DEEPSPEED_STATE
        if ds_dir.exists() != bool(cfg.deepspeed):
            raise UsageError(f"--resume: {ckpt} was {'' if ds_dir.exists() else 'not '}written by a DeepSpeed run; "
                             "resume it the same way")
        state = read_trainer_state(state_dir)
        self._check_state(ckpt, state)
        try:  # weights_only: a tensor-only unpickler that runs no code from the file
            opt = None if ds_dir.exists() else torch.load(state_dir / OPTIMIZER_FILE, map_location=self.setup.device,
                                                          weights_only=True)
        except (OSError, ValueError, RuntimeError, pickle.UnpicklingError, EOFError) as e:
            raise CheckpointError(f"{state_dir / OPTIMIZER_FILE}: cannot resume from it ({load_error(e)})") from None
        if ds_dir.exists():
            try:
                distributed.vet_deepspeed_state(ds_dir)
            except ValueError as e:
                raise CheckpointError(str(e)) from None
        rng = read_rng_state(state_dir)
        self.setup.load_weights(ckpt)
        if opt is not None:
            saved = "muon" if set(opt) == {"adamw", "muon"} else "adamw"
            if saved != cfg.optim:
                raise UsageError(f"--resume: {ckpt} was trained with --optim {saved}; resume it with the same --optim "
                                 f"(or start a new run with --init {ckpt})")
        if rng is None:
            self.log.message(f"{state_dir}: no rng.json (a checkpoint from before 2026-12-04, whose rng.pt is a "
                             "pickle and is not read): random state and fp16 loss scale start fresh")
        elif state["world_size"] == self.dist.world_size:
            set_rng_state(rng)
        try:
            self.setup.load_loader_state(state["data"])
        except ValueError as e:  # DataError: a position that does not fit this data
            raise CheckpointError(f"{state_dir / STATE_FILE}: field 'data': {e}, cannot resume") from None
        self.saved_step = state["step"]
        backend = {"optimizer": opt, "scaler": None if rng is None else rng["scaler"],
                   "deepspeed": ds_dir if ds_dir.exists() else None}
        return Resumed(ckpt=ckpt, trainer=state, backend=backend)

    def _check_state(self, ckpt: Path, state: dict):
        """The checkpoint is of this stage and was trained on this data."""
        if state["stage"] != self.cfg.stage:
            raise UsageError(f"--resume: {ckpt} is a {state['stage']!r} run, not {self.cfg.stage!r}")
        saved_data = state.get("data_fingerprint")
        if saved_data is not None and saved_data != self.fingerprint:
            state_file = ckpt / TRAINER_STATE / STATE_FILE
            raise UsageError(f"--resume: --data {self.cfg.data} is not the data this run was trained on (data "
                             f"fingerprint {self.fingerprint}, {state_file} has {saved_data}), so its saved data "
                             f"position would be wrong; to train on new data start a new run with --init {ckpt}")

    def announce(self, resumed: Resumed) -> None:
        """Once everything is loaded: metrics.jsonl loses the rows logged after the checkpoint (the resumed
        run writes them again), and the log says where the run goes on from."""
        step = resumed.trainer["step"]
        self.log.truncate_after(step)
        self.log.message(f"resumed from {resumed.ckpt} at step {step}")
        newer = sorted(p.name for p in self.out.iterdir()
                       if (m := STEP_DIR.match(p.name)) and int(m.group(1)) > step)
        if newer:  # resolve_checkpoint skipped them: they lack config.json or their weights
            self.log.message(f"{', '.join(newer)} in {self.out}: incomplete, skipped; replaced when the run saves "
                             "that step")


def saved_any(out: Path) -> bool:
    """Whether run directory `out` holds a step-N checkpoint, complete or not."""
    out = Path(out)
    return out.is_dir() and any(STEP_DIR.match(p.name) for p in out.iterdir())


def last_good(out: Path) -> str:
    """Names the newest checkpoint in `out` whose weights are finite: one that is not (a run resumed from a
    damaged checkpoint with its check bypassed, or a bit flip since) is no place to go back to."""
    steps = sorted((int(m.group(1)), p) for p in Path(out).iterdir() if (m := STEP_DIR.match(p.name)))
    if not steps:
        return "No checkpoint was written."
    for _, path in reversed(steps):
        if weights_finite(path):
            return f"The last good checkpoint is {path}."
    return f"No checkpoint in {out} has finite weights."


def _tensors_in(tree) -> list[torch.Tensor]:
    if torch.is_tensor(tree):
        return [tree]
    items = tree.values() if isinstance(tree, dict) else tree if isinstance(tree, (list, tuple)) else ()
    return [t for item in items for t in _tensors_in(item)]


# Random state and loss scale as tensors (safetensors) + JSON (checkpoint.RNG_TENSORS, RNG_JSON): no pickle
def write_rng_state(state_dir: Path, scaler: dict) -> None:
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


def read_rng_state(state_dir: Path) -> dict | None:
    """The random state and loss scale `write_rng_state` wrote, or None for a checkpoint without them."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not (state_dir / RNG_JSON).exists():
        return None
    meta = read_json(state_dir / RNG_JSON, context=", cannot resume")
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


def set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
