"""Checkpoint directories (SPEC §5): config.json + model.safetensors + tokenizer files, or a LoRA
adapter (adapter_config.json + adapter.safetensors, naming its base), plus trainer_state/ when a run
wrote it. Everything that knows these file names lives here: writing and loading weights and
adapters, finding a checkpoint's tokenizer (`tokenizer_dir`), reading its JSON (`read_json`).

A checkpoint is written into a hidden temp directory beside its target and renamed into place, so
a killed process never leaves a half-written directory under a valid name. Loading checks every
file it reads and names the file and the problem when something is wrong.
"""

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from minimind.config import ModelConfig
from minimind.lora import apply_lora, lora_state_dict, merge_lora

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)
STEP_DIR = re.compile(r"^step-(\d+)$")
# what a training run adds to a checkpoint to resume it (train.py writes and reads them); no pickle but the
# optimizer's tensors, which load with torch's weights-only unpickler
TRAINER_STATE = "trainer_state"
STATE_FILE = "state.json"  # step, tokens seen, time spent, data position and fingerprint, world size, stage
OPTIMIZER_FILE = "optimizer.pt"
RNG_TENSORS, RNG_JSON = "rng.safetensors", "rng.json"  # random state and loss scale
DEEPSPEED_STATE = "deepspeed"  # DeepSpeed's own files instead of optimizer.pt
# a LoRA checkpoint: the adapter alone, with the path and fingerprint of its base checkpoint
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter.safetensors"


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message names the file and what is wrong."""


class NonFiniteCheckpoint(CheckpointError):
    """Weights holding NaN or inf: a diverged or damaged checkpoint (serve, chat, eval and export take
    --allow-nonfinite to use it anyway)."""


ALLOW_NONFINITE_HINT = "; pass --allow-nonfinite to use it anyway"


def nonfinite_tensors(sd: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors in `sd` that hold a NaN or an inf."""
    return [name for name, t in sd.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def check_finite(sd: dict[str, torch.Tensor], source, hint: str = "") -> None:
    """NonFiniteCheckpoint naming `source` and the first bad tensors, unless every weight is finite."""
    bad = nonfinite_tensors(sd)
    if bad:
        raise NonFiniteCheckpoint(f"{source}: {len(bad)} of {len(sd)} tensors hold NaN or inf (e.g. "
                                  f"{', '.join(bad[:3])}): a diverged or damaged checkpoint{hint}")


def weights_finite(ckpt) -> bool:
    """Whether checkpoint `ckpt`'s weights (model or adapter) are readable and finite."""
    ckpt = Path(ckpt)
    file = ckpt / (ADAPTER_WEIGHTS if is_lora_checkpoint(ckpt) else WEIGHTS_FILE)
    try:
        return not nonfinite_tensors(load_file(file))
    except (SafetensorError, OSError, ValueError):
        return False


def atomic_dir(target: Path, fill: Callable[[Path], None]) -> Path:
    """Write a directory by calling fill(tmp) on a temp dir, then renaming it to `target`.

    An existing `target` is replaced only after the new one is complete.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        fill(tmp)
        _fsync_dir(tmp)
        publish_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def publish_dir(tmp: Path, target: Path) -> None:
    """Renames the finished directory `tmp` to `target`. An existing `target` is moved aside first and removed
    only after the rename (a kill in between leaves `.old-NAME-PID`, which rundir.remove_leftovers puts back)."""
    if target.exists():
        old = target.with_name(f".old-{target.name}-{os.getpid()}")
        os.rename(target, old)
        os.rename(tmp, target)
        shutil.rmtree(old)
    else:
        os.rename(tmp, target)
    _fsync_dir(target.parent)


def _fsync_dir(path: Path) -> None:
    for f in path.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def state_dict_for_save(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors with tied lm_head dropped (safetensors refuses shared storage)."""
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)
    return sd


def save_checkpoint(
    path,
    model: torch.nn.Module,
    tokenizer_dir=None,
    extra: Callable[[Path], None] | None = None,
    metadata: dict | None = None,
) -> Path:
    """Write model (its config, weights), the tokenizer files found in tokenizer_dir, and whatever
    `extra(tmp_dir)` adds (e.g. trainer_state/), atomically to `path`."""

    def fill(tmp: Path):
        write_model_files(tmp, model, metadata)
        if tokenizer_dir is not None:
            copy_tokenizer(tokenizer_dir, tmp)
        if extra is not None:
            extra(tmp)

    return atomic_dir(Path(path), fill)


def write_model_files(dir_: Path, model: torch.nn.Module, metadata: dict | None = None) -> None:
    """config.json + model.safetensors into an existing (temporary) directory."""
    model.config.save(Path(dir_) / CONFIG_FILE)
    meta = {"format": "minimind", **{k: str(v) for k, v in (metadata or {}).items()}}
    save_file(state_dict_for_save(model), Path(dir_) / WEIGHTS_FILE, metadata=meta)


def copy_tokenizer(src, dst) -> None:
    src = Path(src)
    found = [name for name in TOKENIZER_FILES if (src / name).is_file()]
    if "tokenizer.json" not in found:
        raise CheckpointError(f"{src}: no tokenizer.json, not a tokenizer directory")
    for name in found:
        shutil.copyfile(src / name, Path(dst) / name)


def resolve_checkpoint(path) -> Path:
    """A checkpoint dir as is; a run dir -> its newest complete step-N checkpoint."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint or run directory")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (a checkpoint is a directory with {CONFIG_FILE})")
    if (path / CONFIG_FILE).exists() or is_lora_checkpoint(path):
        return path
    steps = sorted((int(m.group(1)), p) for p in path.iterdir() if (m := STEP_DIR.match(p.name)) and is_complete(p))
    if not steps:
        raise CheckpointError(f"{path}: neither a checkpoint ({CONFIG_FILE} missing) nor a run with step-N checkpoints")
    return steps[-1][1]


def is_lora_checkpoint(path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).exists() and not (Path(path) / CONFIG_FILE).exists()


def tokenizer_dir(ckpt) -> Path | None:
    """The directory holding a checkpoint's tokenizer: the checkpoint itself, or a LoRA checkpoint's base
    (adapters are saved alone). None when neither has one."""
    ckpt = Path(ckpt)
    if (ckpt / "tokenizer.json").is_file():
        return ckpt
    if is_lora_checkpoint(ckpt):
        return tokenizer_dir(resolve_checkpoint(read_adapter_config(ckpt)["base_checkpoint"]))
    return None


def checkpoint_inputs(ckpt, flag: str) -> list[tuple[str, Path]]:
    """Every path a command reads through `ckpt` (given as `flag`), labelled for messages: the path as given,
    the checkpoint a run dir resolves to, a LoRA adapter's base, the tokenizer's directory. What an output
    must stay clear of (outputs.check_output)."""
    src = resolve_checkpoint(ckpt)
    found = [(flag, Path(ckpt)), (f"the checkpoint of {flag}", src)]
    if is_lora_checkpoint(src):
        base = Path(read_adapter_config(src)["base_checkpoint"])
        found += [(f"the base checkpoint of {flag}", p) for p in (base, resolve_checkpoint(base))]
    tok = tokenizer_dir(src)
    if tok is not None:
        found.append((f"the tokenizer of {flag}", tok))
    return found


def is_complete(p: Path) -> bool:
    """Has the files a checkpoint is loaded from (a step-N a killed or damaged run left without them has not)."""
    return ((p / CONFIG_FILE).exists() and (p / WEIGHTS_FILE).exists()) or (
        (p / ADAPTER_CONFIG).exists() and (p / ADAPTER_WEIGHTS).exists()
    )


def read_json(file, error: type[Exception] = None, context: str = "") -> dict:
    """A JSON object from `file`; anything else raises `error` (CheckpointError by default) naming the
    file and what is wrong, with `context` appended (e.g. ", cannot resume")."""
    error = error or CheckpointError
    try:
        data = json.loads(Path(file).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{file}: missing{context}") from None
    except json.JSONDecodeError as e:
        raise error(f"{file}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}){context}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"{file}: unreadable ({e}){context}") from None
    if not isinstance(data, dict):
        raise error(f"{file}: expected a JSON object, got {type(data).__name__}{context}")
    return data


def load_config(ckpt) -> ModelConfig:
    file = Path(ckpt) / CONFIG_FILE
    data = read_json(file)
    try:
        return ModelConfig.from_dict(data)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{file}: {e}") from None


def load_weights(ckpt, device="cpu") -> dict[str, torch.Tensor]:
    file = Path(ckpt) / WEIGHTS_FILE
    if not file.exists():
        raise CheckpointError(f"{file}: missing")
    try:
        return load_file(file, device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        size = file.stat().st_size
        raise CheckpointError(f"{file}: truncated or corrupt safetensors file ({size} bytes): {e}") from None


def load_state_into(model: torch.nn.Module, sd: dict[str, torch.Tensor], source) -> None:
    """Copy sd into model, checking names, shapes and dtypes, with errors naming `source`."""
    expected = state_dict_for_save(model)
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s): {', '.join(missing[:8])}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensor(s): {', '.join(unexpected[:8])}")
        raise CheckpointError(f"{source}: does not match config.json's architecture; " + "; ".join(parts))
    for name, tensor in sd.items():
        want = expected[name]
        if tensor.shape != want.shape:
            raise CheckpointError(
                f"{source}: tensor {name} has shape {tuple(tensor.shape)}, config.json implies {tuple(want.shape)}"
            )
    model.load_state_dict(sd, strict=False)  # lm_head is tied, everything else was checked above


def load_checkpoint(path, device="cpu", kernels: str | None = None, dtype: torch.dtype | None = None,
                    lora=None, merge_lora: bool = True, allow_nonfinite: bool | None = None):
    """-> (model in eval mode, checkpoint dir). `kernels` overrides the runtime kernel choice.

    A LoRA checkpoint loads its base checkpoint (path recorded in the adapter) plus the adapter;
    `lora=DIR` puts an adapter on top of a full checkpoint. Adapters are merged unless told not to.
    Weights holding NaN or inf raise NonFiniteCheckpoint unless `allow_nonfinite`: every command would
    otherwise run on them and report NaN (or export them) with exit 0. None refuses them too; False (a
    command's --allow-nonfinite not given) adds to the message that the flag exists.
    """
    hint = ALLOW_NONFINITE_HINT if allow_nonfinite is False else ""
    ckpt = resolve_checkpoint(path)
    if is_lora_checkpoint(ckpt):
        lora, ckpt = ckpt, resolve_checkpoint(read_adapter_config(ckpt)["base_checkpoint"])
    model = _load_full(ckpt, device, kernels)
    if not allow_nonfinite:
        check_finite(state_dict_for_save(model), ckpt / WEIGHTS_FILE, hint=hint)
    if lora is not None:
        lora = resolve_checkpoint(lora)  # a LoRA run dir, like --ckpt, means its newest step
        load_adapter(model, lora, base_ckpt=ckpt, merge=merge_lora)
        if not allow_nonfinite:
            check_finite(lora_state_dict(model), Path(lora) / ADAPTER_WEIGHTS, hint=hint)
        ckpt = Path(lora)
    if dtype is not None:
        model.to(dtype)
    return model.eval(), ckpt


def _load_full(ckpt: Path, device, kernels):
    from minimind.model import MiniMindForCausalLM

    config = load_config(ckpt)
    if kernels is not None:
        config.kernels = kernels
    sd = load_weights(ckpt, device)
    with torch.device(device):
        model = MiniMindForCausalLM(config, device=device)
    load_state_into(model, sd, ckpt / WEIGHTS_FILE)
    return model


# state.json's fields: (type check, what it must be); optional ones may be absent (older checkpoints)
STATE_FIELDS = {
    "step": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "tokens_seen": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "world_size": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "stage": (lambda v: isinstance(v, str), "a stage name (string)"),
    "data": (lambda v: isinstance(v, dict), "an object (the data position)"),
}
OPTIONAL_STATE_FIELDS = {
    "total_steps": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "elapsed_s": (lambda v: _is_number(v) and math.isfinite(v) and v >= 0, "a finite number >= 0"),
    "data_fingerprint": (lambda v: v is None or isinstance(v, str), "a string"),
    "spent_s": (lambda v: isinstance(v, dict) and all(isinstance(k, str) and _is_number(s) and math.isfinite(s)
                                                     and s >= 0 for k, s in v.items()),
                "an object of part names to finite seconds >= 0"),
}


def read_trainer_state(state_dir) -> dict:
    """trainer_state/state.json, every field checked; CheckpointError names the file and the field."""
    file = Path(state_dir) / STATE_FILE
    state = read_json(file, context=", cannot resume")
    for key, (ok, expected) in STATE_FIELDS.items():
        if key not in state:
            raise CheckpointError(f"{file}: field {key!r} missing, cannot resume")
        if not ok(state[key]):
            raise CheckpointError(f"{file}: field {key!r} must be {expected}, got {state[key]!r}, cannot resume")
    for key, (ok, expected) in OPTIONAL_STATE_FIELDS.items():
        if key in state and not ok(state[key]):
            raise CheckpointError(f"{file}: field {key!r} must be {expected}, got {state[key]!r}, cannot resume")
    return state


def load_error(e: Exception) -> str:
    """The line of a failed `torch.load(weights_only=True)` that says why (torch's message runs to a
    paragraph of advice, ending with the offending global)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    for line in lines:
        if "Unsupported global" in line or "GLOBAL" in line:
            return line.removeprefix("WeightsUnpickler error: ")
    return lines[0] if lines else type(e).__name__


# ----------------------------------------------------------------- LoRA adapters
def fingerprint_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_adapter(dir_: Path, model: torch.nn.Module, base_ckpt: Path, targets, rank: int, alpha: float,
                  dropout: float) -> None:
    """Write adapter files into an existing (temporary) directory; see checkpoint.atomic_dir."""
    base_ckpt = Path(base_ckpt).resolve()
    config = {
        "format": "minimind-lora",
        "base_checkpoint": str(base_ckpt),
        "base_fingerprint": fingerprint_file(base_ckpt / WEIGHTS_FILE),
        "rank": rank,
        "alpha": alpha,
        "dropout": dropout,
        "targets": list(targets),
    }
    (Path(dir_) / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    save_file(lora_state_dict(model), Path(dir_) / ADAPTER_WEIGHTS)


def read_adapter_config(adapter_dir) -> dict:
    file = Path(adapter_dir) / ADAPTER_CONFIG
    if not file.exists():
        raise CheckpointError(f"{file}: missing (not a LoRA adapter directory)")
    cfg = read_json(file)
    for key in ("base_checkpoint", "rank", "alpha", "targets"):
        if key not in cfg:
            raise CheckpointError(f"{file}: field {key!r} missing")
    _check_adapter_fields(cfg, file)
    return cfg


def _check_adapter_fields(cfg: dict, file: Path) -> None:
    """CheckpointError naming the first field of an adapter config with the wrong type or range."""
    def bad(key, expected):
        raise CheckpointError(f"{file}: field {key!r} must be {expected}, got {cfg[key]!r}")

    if not isinstance(cfg["base_checkpoint"], str) or not cfg["base_checkpoint"]:
        bad("base_checkpoint", "a path (string)")
    if not _is_int(cfg["rank"]) or cfg["rank"] < 1:
        bad("rank", "a positive integer")
    if not _is_number(cfg["alpha"]) or not math.isfinite(cfg["alpha"]) or cfg["alpha"] <= 0:
        bad("alpha", "a finite number above 0")
    if "dropout" in cfg and not (_is_number(cfg["dropout"]) and 0 <= cfg["dropout"] < 1):
        bad("dropout", "a number in [0, 1)")
    targets = cfg["targets"]
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) and t for t in targets):
        bad("targets", "a non-empty list of module names")
    if "base_fingerprint" in cfg and not isinstance(cfg["base_fingerprint"], str):
        bad("base_fingerprint", "a string")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def load_adapter_weights(adapter_dir, device="cpu") -> dict[str, torch.Tensor]:
    """adapter.safetensors of `adapter_dir`; CheckpointError naming the file if it is missing or damaged."""
    file = Path(adapter_dir) / ADAPTER_WEIGHTS
    try:
        return load_file(file, device=str(device))
    except Exception as e:  # safetensors raises several types for truncated files
        raise CheckpointError(f"{file}: missing, truncated or corrupt ({e})") from None


def load_adapter(model: torch.nn.Module, adapter_dir, base_ckpt=None, merge: bool = False) -> dict:
    """Attach the adapter in adapter_dir to `model` (built from its base checkpoint) and load it.

    When base_ckpt is given, its weights must have the fingerprint recorded in the adapter.
    """
    cfg = read_adapter_config(adapter_dir)
    if base_ckpt is not None and "base_fingerprint" in cfg:
        got = fingerprint_file(Path(base_ckpt) / WEIGHTS_FILE)
        if got != cfg["base_fingerprint"]:
            raise CheckpointError(
                f"{Path(adapter_dir) / ADAPTER_CONFIG}: adapter was trained on a different base "
                f"(fingerprint {cfg['base_fingerprint'][:12]}), {base_ckpt} has {got[:12]}"
            )
    try:
        apply_lora(model, rank=cfg["rank"], alpha=cfg["alpha"], dropout=0.0, targets=cfg["targets"])
    except ValueError as e:
        raise CheckpointError(f"{Path(adapter_dir) / ADAPTER_CONFIG}: {e}") from None
    sd = load_adapter_weights(adapter_dir)
    file = Path(adapter_dir) / ADAPTER_WEIGHTS
    expected = lora_state_dict(model)
    missing, unexpected = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{file}: adapter does not fit the model: missing {missing[:4]}, unexpected {unexpected[:4]}"
        )
    model.load_state_dict(sd, strict=False)
    if merge:
        merge_lora(model)
    return cfg
