"""Every knob of a training run, with its default, in one dataclass: `TrainConfig`.

`train.py`'s flags are checked against it (tests/test_trainconfig.py) and take their defaults from
it; a knob whose default depends on the stage is None here and filled from the stage's record
(recipes.py) by `resolve`. A run's `run.json` is `dataclasses.asdict` of the resolved config.
"""

import dataclasses
import math
from pathlib import Path

from minimind.errors import UsageError
from minimind.recipes import STAGES

STAGE_DEFAULT = None  # "the stage's record decides" (recipes.Stage)


@dataclasses.dataclass
class TrainConfig:
    stage: str
    # where from, where to
    model: str | None = None  # a fresh preset; `tiny` when neither --model nor --init is given
    init: str | None = None  # a checkpoint or run dir to start from
    overrides: list[str] = dataclasses.field(default_factory=list)  # --set FIELD=VALUE on a fresh model
    data: str | None = None
    val_data: str | None = None
    eval_every: int | None = None
    tokenizer: str | None = None
    out: str | None = None  # runs/<stage>
    resume: bool = False
    deepspeed: str | None = None
    # how long: --max-steps, --epochs, and the budgets --max-time / --max-tokens; whichever ends first ends
    # the run, and the learning-rate schedule is sized to it. Nothing given: one epoch. A budget without
    # --epochs repeats the data as often as it allows.
    max_steps: int | None = None
    epochs: float | None = None
    max_time: float | None = None
    max_tokens: int | None = None
    schedule: str = "auto"  # "wsd" with a time or token budget, else "cosine"
    decay_frac: float = 0.2  # wsd: the last fraction of the run, in which the lr falls linearly to --min-lr
    # the optimizer step
    batch_size: int | None = STAGE_DEFAULT
    seq_len: int | None = STAGE_DEFAULT
    grad_accum: int = 1
    lr: float | None = STAGE_DEFAULT
    min_lr: float | None = None  # lr / 10
    warmup_steps: int | None = STAGE_DEFAULT
    weight_decay: float | None = STAGE_DEFAULT
    grad_clip: float = 1.0
    adam_betas: tuple[float, float] | None = STAGE_DEFAULT  # AdamW's (beta1, beta2); torch's is (0.9, 0.999)
    optim: str | None = STAGE_DEFAULT  # "adamw" or "muon" (minimind/optim.py); adamw with --deepspeed
    embed_lr_scale: float = 1.0  # the embeddings' (and tied head's) lr is --lr times this
    dtype: str | None = None  # bf16 on CUDA where supported, else fp32
    device: str = "auto"
    compile: bool = False
    compile_mode: str = "default"  # which mode wins on a GPU is for bench/gpu.sh to measure
    kernels: str = "auto"
    grad_checkpointing: bool = False
    no_packing: bool = False
    doc_mask: bool | None = STAGE_DEFAULT  # pretrain: attention within each document, positions restart
    seed: int = 0
    # bookkeeping
    save_every: int = 500
    keep: int = 3
    log_every: int = 10
    wandb: bool = False
    # per objective
    ref: str | None = None  # dpo, grpo: the reference model (default: --init)
    beta: float | None = STAGE_DEFAULT  # dpo, grpo
    teacher: str | None = None  # distill
    temperature: float = 1.5  # distill
    alpha: float = 0.5  # distill
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: str | None = None  # comma-separated module names (default: every projection)
    group_size: int = 4  # grpo
    max_new_tokens: int = 64  # grpo
    sample_rounds: int = 1  # grpo: rounds a step may sample to replace groups without signal (1: off)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
STAGE_FIELDS = ("batch_size", "seq_len", "lr", "warmup_steps", "weight_decay", "adam_betas", "beta", "optim",
                "doc_mask")
PATH_FIELDS = ("init", "data", "val_data", "tokenizer", "out", "ref", "teacher", "deepspeed")
# float knobs that must be finite (an `inf` learning rate trains NaN without a word), and positive ones
FINITE = ("lr", "min_lr", "weight_decay", "grad_clip", "beta", "temperature", "alpha", "lora_alpha", "epochs",
          "max_time", "decay_frac", "embed_lr_scale")
POSITIVE = ("lr", "epochs", "max_time", "temperature", "lora_alpha")


def default(name: str):
    """A knob's default as argparse should show it (None for one the stage decides)."""
    f = FIELDS[name]
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def resolve(given) -> TrainConfig:
    """argparse's namespace, or a TrainConfig with the knobs a caller sets (None: the default) -> the run's
    config, a new TrainConfig: stage defaults filled, combinations checked."""
    given = dataclasses.asdict(given) if isinstance(given, TrainConfig) else vars(given)
    stage = STAGES[given["stage"]]
    cfg = TrainConfig(**{k: v for k, v in given.items() if k in FIELDS and v is not None})
    if cfg.resume and cfg.out is None:
        raise UsageError("--resume needs --out (the run directory to continue)")
    if cfg.out is None:
        cfg.out = str(Path("runs") / cfg.stage)  # an existing non-empty one is refused later, naming it
    if stage.needs_init and cfg.init is None and not cfg.resume:
        raise UsageError(f"--stage {cfg.stage} needs --init CKPT (e.g. the pretrain or SFT run)")
    if cfg.init is None and cfg.model is None and not cfg.resume:
        cfg.model = "tiny"
    if cfg.data is None:
        raise UsageError("--data PATH is required (a prepared data dir or a raw .jsonl)")
    if cfg.overrides and cfg.init is not None:
        raise UsageError("--set changes the architecture of a fresh --model; it cannot be used with --init")
    if stage.needs_teacher and cfg.teacher is None:
        raise UsageError(f"--stage {cfg.stage} needs --teacher CKPT")
    if cfg.optim == "muon" and cfg.deepspeed:
        raise UsageError("--optim muon cannot be used with --deepspeed (DeepSpeed takes one optimizer of its own)")
    if cfg.optim is None and cfg.deepspeed:
        cfg.optim = "adamw"
    if cfg.eval_every and cfg.val_data is None:
        raise UsageError("--eval-every needs --val-data PATH")
    on_cpu = cfg.device == "cpu" or (cfg.device == "auto" and not _cuda())
    for name in STAGE_FIELDS:
        if getattr(cfg, name) is None:
            setattr(cfg, name, stage.default(name, on_cpu))
    if cfg.min_lr is None:
        cfg.min_lr = cfg.lr / 10
    if cfg.max_steps is None and cfg.epochs is None and not (cfg.max_time or cfg.max_tokens):
        cfg.epochs = 1.0
    if cfg.schedule == "auto":
        cfg.schedule = "wsd" if cfg.max_time or cfg.max_tokens else "cosine"
    cfg.adam_betas = tuple(cfg.adam_betas)
    if len(cfg.adam_betas) != 2 or not all(0 <= b < 1 for b in cfg.adam_betas):
        raise UsageError(f"--adam-betas must be two numbers in [0, 1), got {cfg.adam_betas}")
    if not 0 < cfg.decay_frac <= 1:
        raise UsageError(f"--decay-frac must be in (0, 1], got {cfg.decay_frac}")
    _check_numbers(cfg)
    _check_combinations(cfg, stage)
    for name in PATH_FIELDS:
        if getattr(cfg, name) is not None:
            setattr(cfg, name, str(Path(getattr(cfg, name)).resolve()))
    return cfg


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _check_combinations(cfg: TrainConfig, stage) -> None:
    """Numbers that are each fine alone but make no sense together, or for this stage."""
    if cfg.min_lr > cfg.lr:
        raise UsageError(f"--min-lr {cfg.min_lr:g} is above --lr {cfg.lr:g}: the schedule would raise the lr "
                         "towards its end; --min-lr is the floor it decays to")
    if stage.batches == "rollouts" and cfg.group_size < 2:
        raise UsageError(f"--group-size {cfg.group_size}: GRPO scores each completion against the others of its "
                         "group, so a group needs at least 2")
    if stage.params == "adapters" and cfg.optim == "muon":
        raise UsageError(f"--optim muon with --stage {cfg.stage}: Muon trains the blocks' full weight matrices, "
                         "which LoRA freezes (its adapters are low-rank factors); use --optim adamw")


def _check_numbers(cfg: TrainConfig) -> None:
    for name in FINITE:
        value = getattr(cfg, name)
        flag = "--" + name.replace("_", "-")
        if value is None:
            continue
        if not math.isfinite(value):
            raise UsageError(f"{flag} must be a finite number, got {value}")
        if name in POSITIVE and value <= 0:
            raise UsageError(f"{flag} must be positive, got {value}")
        if value < 0:
            raise UsageError(f"{flag} must not be negative, got {value}")
