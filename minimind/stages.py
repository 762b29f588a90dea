"""What differs between training stages: the model (fresh, from --init, with adapters), the data, the
objective and the trainable parameters. A `Setup` (or grpo.GRPOSetup, for stages whose batches are
rollouts) is what the one loop in train.py drives; per-stage defaults are records in recipes.py.
"""

import hashlib
import json
from pathlib import Path

import torch

from minimind import objectives
from minimind.checkpoint import (
    ADAPTER_WEIGHTS,
    WEIGHTS_FILE,
    CheckpointError,
    check_finite,
    is_lora_checkpoint,
    load_adapter_weights,
    load_checkpoint,
    load_config,
    load_state_into,
    load_weights,
    read_json,
    resolve_checkpoint,
    tokenizer_dir,
    write_model_files,
)
from minimind.config import ModelConfig
from minimind.data.loader import open_prepared
from minimind.errors import UsageError
from minimind.lora import lora_state_dict, strip_lora
from minimind.model import MiniMindForCausalLM
from minimind.recipes import STAGES


def to_device(x, device):
    """A batch (a NamedTuple of tensors, nested or not) on `device`. To CUDA the copies leave from pinned
    memory without blocking the host; a pageable copy would wait for the GPU to drain (a host sync)."""
    if x is None or isinstance(x, (list, str, int, float)):
        return x
    if isinstance(x, torch.Tensor):
        if device.type == "cuda" and x.device.type == "cpu":
            x = x.pin_memory()
        return x.to(device, non_blocking=True)
    if hasattr(x, "_fields"):  # NamedTuple batches
        return type(x)(*(to_device(v, device) for v in x))
    return x


class Setup:
    def __init__(self, trainer):
        self.trainer = trainer
        self.cfg = trainer.cfg
        self.stage = trainer.stage
        self.spec = STAGES[trainer.stage]  # the stage's record: what differs is read from it
        self.device = trainer.device
        self.base_ckpt = None
        self.lora_targets = None
        self.tokenizer_dir = None
        self.model = self._build_model()
        self.tokenizer_dir = self.tokenizer_dir or self._find_tokenizer(self.model.config.vocab_size)
        self._check_shapes()
        self.data_dir = self._prepared(self.cfg.data)
        self._check_data(self.data_dir)
        self.loader = self._make_loader(self.data_dir, self.cfg.seed)
        self.val_dir = self._prepared(self.cfg.val_data) if self.cfg.val_data else None
        self.objective = self._objective()
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self._iter = iter(self.loader)
        self._ahead = None  # the next step's batches, read and sent to the device a step early
        self._handed = None  # (loader state, epoch) after the batches handed out so far

    # ----------------------------------------------------------------- model
    def _build_model(self):
        cfg = self.cfg
        kernels = cfg.kernels
        if cfg.init is not None:
            model, ckpt = self._init_model(cfg.init, kernels)
            self.base_ckpt = ckpt
        elif self.trainer.cfg.resume and cfg.model is None:
            run = _read_run_json(Path(cfg.out) / "run.json")
            cfg.model, cfg.overrides, cfg.init = run["model"], run["overrides"], run["init"]
            return self._build_model()
        else:
            config = self._fresh_config()
            with torch.device(self.device):
                model = MiniMindForCausalLM(config, device=self.device)
        model.train()
        if self.spec.adapters:
            from minimind.lora import DEFAULT_TARGETS, LoRARankError, apply_lora

            targets = DEFAULT_TARGETS
            if cfg.lora_targets:
                targets = tuple(t.strip() for t in cfg.lora_targets.split(","))
            try:
                apply_lora(model, rank=cfg.lora_rank, alpha=cfg.lora_alpha, targets=targets)
            except LoRARankError as e:
                raise UsageError(f"--lora-rank: {e}") from None
            except ValueError as e:
                raise UsageError(str(e)) from None
            self.lora_targets = targets
        if cfg.grad_checkpointing:
            model.model.grad_checkpointing = True
        return model

    def _init_model(self, init, kernels):
        """--init's model. A LoRA checkpoint is merged into its base and its adapters become plain Linears
        again, so a full-weight stage trains that merged model (a merged LoRALinear has no gradient path
        through its frozen base). A new adapter needs a full checkpoint to record as its base."""
        lora = is_lora_checkpoint(resolve_checkpoint(init))
        if lora and self.spec.adapters:
            raise UsageError(f"--init {init} is a LoRA checkpoint; --stage {self.stage} trains a new adapter on a "
                             "full checkpoint: pass its base, or merge it first (`minimind export`)")
        model, ckpt = load_checkpoint(init, device=self.device, kernels=kernels)
        if lora:
            strip_lora(model)
            model.requires_grad_(True)  # the adapter froze the base; the whole model trains now
            self.trainer.log_message(f"--init {init}: a LoRA checkpoint, merged into its base for this run")
        return model, ckpt

    def _fresh_config(self) -> ModelConfig:
        """The preset with --set applied; `--set vocab_size=auto` sizes the vocabulary to the tokenizer (rounded
        up to a multiple of 64), and run.json records the number so a resume rebuilds the same model."""
        cfg = self.cfg
        overrides = [o for o in cfg.overrides if o.replace(" ", "") != "vocab_size=auto"]
        config = ModelConfig.from_preset(cfg.model, overrides, kernels=cfg.kernels)
        if len(overrides) == len(cfg.overrides):
            return config
        self.tokenizer_dir = self._find_tokenizer(config.vocab_size)
        if self.tokenizer_dir is None:
            raise UsageError("--set vocab_size=auto needs a tokenizer: pass --tokenizer DIR")
        n = _tokenizer_len(self.tokenizer_dir)
        cfg.overrides = [*overrides, f"vocab_size={-(-n // 64) * 64}"]
        self.trainer.log_message(f"vocab_size=auto: {n} tokens in {self.tokenizer_dir} -> vocab_size "
                                 f"{-(-n // 64) * 64}")
        return ModelConfig.from_preset(cfg.model, cfg.overrides, kernels=cfg.kernels)

    def _check_shapes(self):
        """What would otherwise surface as an IndexError deep in the first step."""
        config, cfg = self.model.config, self.cfg
        if cfg.seq_len > config.max_position_embeddings:
            raise UsageError(f"--seq-len {cfg.seq_len} is longer than the model's context "
                         f"(max_position_embeddings {config.max_position_embeddings})")
        if self.tokenizer_dir is None:
            return
        n = _tokenizer_len(self.tokenizer_dir)
        fresh = cfg.init is None
        if n > config.vocab_size:
            hint = "--set vocab_size=auto sizes a fresh model to it" if fresh else "pass the model's own tokenizer"
            raise UsageError(f"the tokenizer {self.tokenizer_dir} has {n} tokens but the model's vocab_size is "
                         f"{config.vocab_size}: ids from {config.vocab_size} on have no embedding ({hint})")
        if n < config.vocab_size and fresh:
            self.trainer.log_message(
                f"the tokenizer has {n} tokens, the model's vocab_size is {config.vocab_size}: "
                f"{config.vocab_size - n} embedding rows will never be used (--set vocab_size=auto sizes it "
                "to the tokenizer)")

    def data_fingerprint(self) -> str:
        """Identifies the training data by content, not place: a hash of the prepared directory's meta.json
        (source size, tokenizer fingerprint, document and token counts, file sizes) without its paths, so a
        moved or re-prepared copy of the same data still resumes."""
        meta = {k: v for k, v in _meta(self.data_dir).items() if k not in ("source", "tokenizer", "encoder")}
        meta = json.dumps(meta, sort_keys=True)
        return hashlib.sha256(meta.encode()).hexdigest()[:16]

    def _frozen(self, path):
        model, _ = load_checkpoint(path, device=self.device, kernels=self.cfg.kernels)
        model.requires_grad_(False)
        return model.eval()

    def write_weights(self, tmp: Path):
        if self.spec.adapters:
            from minimind.checkpoint import write_adapter

            write_adapter(tmp, self.model, self.base_ckpt, self.lora_targets, self.cfg.lora_rank,
                          self.cfg.lora_alpha, 0.0)
        else:
            write_model_files(tmp, self.model)

    def load_weights(self, ckpt: Path):
        """The weights of `ckpt` (a step of this run, on --resume), checked: a damaged or non-finite file is a
        CheckpointError naming it, never a run that trains on NaN."""
        if self.spec.adapters:
            file = ckpt / ADAPTER_WEIGHTS
            sd = load_adapter_weights(ckpt, device=self.device)
            check_finite(sd, file)
            expected = lora_state_dict(self.model)
            if set(sd) != set(expected) or any(sd[k].shape != expected[k].shape for k in sd):
                raise CheckpointError(f"{file}: the adapter does not fit this run's model (other rank or targets)")
            self.model.load_state_dict(sd, strict=False)
            return
        saved = load_config(ckpt)
        if saved.to_dict() != self.model.config.to_dict():
            raise UsageError(f"--resume: {ckpt} has a different architecture than this run's model")
        sd = load_weights(ckpt, self.device)
        check_finite(sd, ckpt / WEIGHTS_FILE)
        load_state_into(self.model, sd, ckpt / WEIGHTS_FILE)

    # ----------------------------------------------------------------- tokenizer and data
    def _find_tokenizer(self, vocab_size: int):
        """--tokenizer, else the --init checkpoint's, the run's own, the prepared data's; for a fresh pretrain
        on raw jsonl, one trained on it (vocab_size entries at most)."""
        cfg = self.cfg
        if cfg.tokenizer:
            return Path(cfg.tokenizer)
        if self.base_ckpt is not None and (found := tokenizer_dir(self.base_ckpt)) is not None:
            return found
        run_tok = Path(cfg.out) / "tokenizer"
        if run_tok.exists():
            return run_tok
        data = Path(cfg.data)
        if data.is_dir():
            meta = _meta(data)
            tok = meta.get("tokenizer_dir") or meta.get("tokenizer")
            if tok and Path(tok).exists():
                return Path(tok)
            return None
        if not self.spec.needs_init and cfg.init is None:  # a fresh model may bring its own tokenizer
            return self._train_tokenizer(data, run_tok, vocab_size)
        raise UsageError(f"--data {data} is raw jsonl and no tokenizer is known: pass --tokenizer DIR")

    def _train_tokenizer(self, data: Path, out: Path, vocab_size: int) -> Path:
        from minimind.data.tokenizer import train_tokenizer

        dist = self.trainer.dist
        if dist.is_main:
            out.parent.mkdir(parents=True, exist_ok=True)
            self.trainer.log_message(f"no tokenizer given: training one on {data} (vocab {vocab_size})")
            train_tokenizer([data], vocab_size=vocab_size, out=out)
        dist.barrier()
        return out

    def _fingerprint(self):
        from minimind.data.tokenizer import load_tokenizer, tokenizer_fingerprint

        return tokenizer_fingerprint(load_tokenizer(self.tokenizer_dir))

    def _prepared(self, path) -> Path:
        """A prepared dir as is; a raw .jsonl is prepared once into a cache beside the run dir."""
        path = Path(path)
        if path.is_dir():
            return path
        if self.tokenizer_dir is None:
            raise UsageError(f"--data {path}: cannot prepare raw jsonl without a tokenizer (pass --tokenizer DIR)")
        from minimind.data.prepare import prepare
        st = path.stat()
        key = json.dumps([str(path.resolve()), st.st_size, st.st_mtime_ns, self._fingerprint(), self.cfg.seq_len,
                          self.spec.data])
        cache = Path(self.cfg.out).parent / ".minimind-cache" / (
            f"{path.stem}-{self.spec.data}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
        )
        dist = self.trainer.dist
        if dist.is_main and not (cache / "meta.json").exists():
            self.trainer.log_message(f"preparing {path} -> {cache}")
            # pretrain rows are windows over the token stream, so only chat documents are cut to the row length
            max_len = max(512, self.cfg.seq_len) if self.spec.packs_documents else self.cfg.seq_len
            prepare(self.spec.data, path, self.tokenizer_dir, cache, max_seq_len=max_len)
        dist.barrier()
        return cache

    def _check_data(self, data_dir: Path):
        meta = _meta(data_dir)
        if meta.get("stage") not in self.spec.accepts:
            raise UsageError(
                f"--data {data_dir} was prepared for stage {meta.get('stage')!r}; --stage {self.stage} needs "
                f"data prepared as {' or '.join(sorted(self.spec.accepts))}"
            )
        if self.tokenizer_dir is not None and meta.get("tokenizer_fingerprint"):
            if meta["tokenizer_fingerprint"] != self._fingerprint():
                raise UsageError(f"--data {data_dir} was tokenized with a different tokenizer than "
                                 f"{self.tokenizer_dir}")

    def _make_loader(self, data_dir, seed):
        from minimind.data.loader import make_loader

        dist = self.trainer.dist
        return make_loader(data_dir, stage="grpo" if self.spec.rollouts else _meta(data_dir)["stage"],
                           batch_size=self.cfg.batch_size, seq_len=self.cfg.seq_len, seed=seed,
                           rank=dist.rank, world_size=dist.world_size, packed=not self.cfg.no_packing,
                           doc_mask=self.cfg.doc_mask)

    @property
    def batches_per_epoch(self) -> int:
        per_step = self.cfg.batch_size * self.trainer.dist.world_size
        return max(1, -(-self.loader.rows_per_epoch // per_step))

    def next_step(self, n: int) -> list[tuple]:
        """The n micro-batches of one optimizer step, each as (host batch, device batch). The next step's
        are read and their copies issued right after, a step ahead: the loader and the pinned copies
        run while the GPU still works through this step's queued kernels, so a step never waits for its
        data. The copies go on the compute stream: a few hundred KB a step is microseconds of copy
        engine time, too little to pay for a second stream's events. Resume and epoch accounting see
        only the batches handed out (`loader_state`, `loader_epoch`)."""
        step = self._ahead or self._read(n)
        self._handed = (self.loader.state_dict(), self.loader.epoch)
        self._ahead = self._read(n)
        return step

    def _read(self, n: int) -> list[tuple]:
        host = [next(self._iter) for _ in range(n)]
        return [(b, self.to_device(b)) for b in host]

    def loader_epoch(self) -> float:
        return self._handed[1] if self._handed else self.loader.epoch

    def loader_state(self) -> dict:
        return self._handed[0] if self._handed else self.loader.state_dict()

    def load_loader_state(self, state: dict):
        self.loader.load_state_dict(state)
        self._iter = iter(self.loader)
        self._ahead = self._handed = None

    def to_device(self, batch):
        return to_device(batch, self.device)

    @staticmethod
    def tokens_in(batch) -> int:
        if hasattr(batch, "chosen"):
            return batch.chosen.input_ids.numel() + batch.rejected.input_ids.numel()
        return batch.input_ids.numel()

    @staticmethod
    def useful_in(batch) -> int:
        if hasattr(batch, "chosen"):
            return int((batch.chosen.weights > 0).sum() + (batch.rejected.weights > 0).sum())
        return int((batch.weights > 0).sum())

    def after_step(self):
        pass

    # ----------------------------------------------------------------- objective and validation
    def _objective(self):
        return OBJECTIVES[self.spec.objective](self)

    @torch.no_grad()
    def validate(self, model, max_batches: int = 20) -> float:
        from minimind.data.loader import make_loader

        dist = self.trainer.dist
        loader = make_loader(self.val_dir, stage=_meta(self.val_dir)["stage"], batch_size=self.cfg.batch_size,
                             seq_len=self.cfg.seq_len, seed=0, rank=dist.rank, world_size=dist.world_size,
                             doc_mask=self.cfg.doc_mask)
        n = min(max_batches, max(1, len(loader)))
        was_training = model.training
        model.eval()
        total = weight = 0.0
        it = iter(loader)
        for _ in range(n):
            batch = self.to_device(next(it))
            loss_sum, _, _ = self.objective(model, batch)
            total += float(loss_sum)
            weight += float(self.objective.weight(batch))
        model.train(was_training)
        return dist.all_reduce_sum(total) / max(dist.all_reduce_sum(weight), 1e-12)


def _tokenizer_len(tokenizer_dir) -> int:
    from minimind.data.tokenizer import load_tokenizer

    return len(load_tokenizer(tokenizer_dir))


def _read_run_json(file: Path) -> dict:
    """What a resumed run rebuilds its model from: the preset and --set overrides of a fresh run, or the
    --init checkpoint of one that started from a checkpoint (its model is null)."""
    run = read_json(file, context=" (the run's resolved flags), cannot resume")
    model, overrides, init = run.get("model"), run.get("overrides", []), run.get("init")
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise CheckpointError(f"{file}: field 'overrides' must be a list of FIELD=VALUE strings, got {overrides!r}, "
                              "cannot resume")
    for key, value in (("model", model), ("init", init)):
        if value is not None and not isinstance(value, str):
            raise CheckpointError(f"{file}: field {key!r} must be a string or null, got {value!r}, cannot resume")
    if model is None and init is None:
        raise CheckpointError(f"{file}: neither 'model' nor 'init' is set, so the run's model cannot be rebuilt; "
                              "pass --model or --init with --resume")
    return {"model": model if init is None else None, "overrides": overrides, "init": init}


def _meta(data_dir: Path) -> dict:
    return open_prepared(data_dir).meta


# ----------------------------------------------------------------- objectives by name (Stage.objective)
def _causal_lm(setup: Setup):
    return objectives.CausalLM()


def _reason(setup: Setup):
    return objectives.Reason()


def _dpo(setup: Setup):
    cfg = setup.cfg
    ref = setup._frozen(cfg.ref or setup.base_ckpt)
    if ref.config.to_dict() != setup.model.config.to_dict():
        raise UsageError(f"--ref {cfg.ref}: its architecture differs from the policy's (--init)")
    return objectives.DPO(ref, beta=cfg.beta)


def _distill(setup: Setup):
    cfg = setup.cfg
    teacher = setup._frozen(cfg.teacher)
    if teacher.config.vocab_size != setup.model.config.vocab_size:
        raise UsageError(f"--teacher {cfg.teacher}: vocab {teacher.config.vocab_size} != student's "
                     f"{setup.model.config.vocab_size}")
    return objectives.Distill(teacher, temperature=cfg.temperature, alpha=cfg.alpha)


# grpo: GRPOSetup builds its own (its batches are rollouts scored against a reference)
OBJECTIVES = {"causal_lm": _causal_lm, "reason": _reason, "dpo": _dpo, "distill": _distill}
