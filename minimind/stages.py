"""What differs between training stages: the model (fresh, from --init, with adapters), the data, the
objective, where the batches come from and which parameters train. A `Setup` builds them from the
run's config and what it is handed (device, process group, log) and holds them for the one loop in
train.py; what a stage is, is its record in recipes.py, whose parts are built from the registries at
the end of this file (OBJECTIVES, PARAMS, BATCHES).
"""

import dataclasses
import hashlib
import json
from pathlib import Path

import torch

from minimind import objectives, schedule
from minimind.batches import DataBatches, to_device
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
    state_dict_for_save,
    tokenizer_dir,
    write_adapter,
    write_model_files,
)
from minimind.config import ModelConfig
from minimind.data.loader import open_prepared
from minimind.distributed import Dist
from minimind.errors import UsageError
from minimind.grpo import Rollouts
from minimind.lora import DEFAULT_TARGETS, LoRARankError, apply_lora, lora_state_dict, strip_lora
from minimind.model import MiniMindForCausalLM
from minimind.recipes import STAGES
from minimind.trainconfig import TrainConfig
from minimind.trainlog import RunLog


class Setup:
    """A run's parts, built from what it is given and held here: the model (fresh, from --init, with
    adapters), its tokenizer, the data, the objective, the batch source and the trainable parameters.
    What differs by stage is named in its record (recipes.STAGES) and built from the registries at the
    end of this file; nothing is written back to the caller. `cfg` is the run's config as the run found
    it: a resumed run's model as run.json recorded it, `--set vocab_size=auto` as a number (what a fresh
    run's run.json records). `prepare_s` is the time spent preparing raw jsonl (--data, --val-data): 0 when
    prepared directories were given or the cache had them."""

    def __init__(self, cfg: TrainConfig, *, device: torch.device, dist: Dist, log: RunLog):
        self.cfg = _resumed(cfg)
        self.prepare_s = 0.0
        self.spec = STAGES[cfg.stage]  # the stage's record: what differs is read from it
        self.device, self.dist, self.log = device, dist, log
        self.params = PARAMS[self.spec.params](self.cfg)  # which weights train, what a checkpoint holds
        self.base_ckpt = None
        self.tokenizer_dir = None
        self.model = self._build_model()
        self.tokenizer_dir = self.tokenizer_dir or self._find_tokenizer(self.model.config.vocab_size)
        self._check_shapes()
        source = BATCHES[self.spec.batches]
        self.data_dir = self._prepared(self.cfg.data)
        source.check_data(self, self.data_dir)
        self.loader = self._make_loader(self.data_dir, self.cfg.seed)
        self.val_dir = self._prepared(self.cfg.val_data) if self.cfg.val_data else None
        self.objective = OBJECTIVES[self.spec.objective](self)
        self.batches = source.build(self)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]

    # ----------------------------------------------------------------- model
    def _build_model(self):
        cfg = self.cfg
        if cfg.init is not None:
            model = self._init_model(cfg.init)
        else:
            config = self._fresh_config()
            with torch.device(self.device):
                model = MiniMindForCausalLM(config, device=self.device)
        model.train()
        self.params.fit(model)
        if cfg.grad_checkpointing:
            model.model.grad_checkpointing = True
        return model

    def _init_model(self, init):
        """--init's model. A LoRA checkpoint is merged into its base and its adapters become plain Linears
        again, so a full-weight stage trains that merged model (a merged LoRALinear has no gradient path
        through its frozen base); a new adapter refuses one (`Adapters.check_init`)."""
        lora = is_lora_checkpoint(resolve_checkpoint(init))
        self.params.check_init(init, lora, self.cfg.stage)
        model, self.base_ckpt = load_checkpoint(init, device=self.device, kernels=self.cfg.kernels)
        if lora:
            strip_lora(model)
            model.requires_grad_(True)  # the adapter froze the base; the whole model trains now
            self.log.message(f"--init {init}: a LoRA checkpoint, merged into its base for this run")
        return model

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
        self.cfg = dataclasses.replace(cfg, overrides=[*overrides, f"vocab_size={-(-n // 64) * 64}"])
        self.log.message(f"vocab_size=auto: {n} tokens in {self.tokenizer_dir} -> vocab_size {-(-n // 64) * 64}")
        return ModelConfig.from_preset(cfg.model, self.cfg.overrides, kernels=cfg.kernels)

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
            self.log.message(
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

    def data_meta(self) -> dict:
        """The prepared training data's meta.json (its source, documents and tokens)."""
        return _meta(self.data_dir)

    def frozen(self, path):
        model, _ = load_checkpoint(path, device=self.device, kernels=self.cfg.kernels)
        model.requires_grad_(False)
        return model.eval()

    def write_weights(self, tmp: Path):
        self.params.write(tmp, self.model, self.base_ckpt)

    def load_weights(self, ckpt: Path):
        """The weights of `ckpt` (a step of this run, on --resume), checked: a damaged or non-finite file is a
        CheckpointError naming it, never a run that trains on NaN."""
        self.params.load(ckpt, self.model, self.device)

    def checkpoint_tensors(self) -> list:
        """The tensors a checkpoint of the model holds (what its size is estimated from)."""
        return self.params.saved(self.model)

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

        if self.dist.is_main:
            out.parent.mkdir(parents=True, exist_ok=True)
            self.log.message(f"no tokenizer given: training one on {data} (vocab {vocab_size})")
            train_tokenizer([data], vocab_size=vocab_size, out=out)
        self.dist.barrier()
        return out

    def fingerprint(self):
        """The tokenizer's fingerprint (what prepared data records of the tokenizer it was made with)."""
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
        key = json.dumps([str(path.resolve()), st.st_size, st.st_mtime_ns, self.fingerprint(), self.cfg.seq_len,
                          self.spec.data])
        cache = Path(self.cfg.out).parent / ".minimind-cache" / (
            f"{path.stem}-{self.spec.data}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
        )
        if self.dist.is_main and not (cache / "meta.json").exists():
            self.log.message(f"preparing {path} -> {cache}")
            # pretrain rows are windows over the token stream, so only chat documents are cut to the row length
            max_len = max(512, self.cfg.seq_len) if self.spec.packs_documents else self.cfg.seq_len
            began = schedule.clock()
            prepare(self.spec.data, path, self.tokenizer_dir, cache, max_seq_len=max_len)
            self.prepare_s += schedule.clock() - began
        self.dist.barrier()
        return cache

    def _make_loader(self, data_dir, seed):
        from minimind.data.loader import make_loader

        return make_loader(data_dir, stage=_meta(data_dir)["stage"], batch_size=self.cfg.batch_size,
                           seq_len=self.cfg.seq_len, seed=seed, rank=self.dist.rank,
                           world_size=self.dist.world_size, packed=not self.cfg.no_packing, doc_mask=self.cfg.doc_mask)

    # ----------------------------------------------------------------- batches (the stage's source)
    @property
    def batches_per_epoch(self) -> int:
        per_step = self.cfg.batch_size * self.dist.world_size
        return max(1, -(-self.loader.rows_per_epoch // per_step))

    def next_step(self, n: int) -> list[tuple]:
        """The n micro-batches of one optimizer step, each as (host batch, device batch)."""
        return self.batches.next_step(n)

    def loader_epoch(self) -> float:
        return self.batches.epoch()

    def loader_state(self) -> dict:
        return self.batches.state()

    def load_loader_state(self, state: dict):
        self.batches.load_state(state)

    def after_step(self):
        pass

    # ----------------------------------------------------------------- validation
    @torch.no_grad()
    def validate(self, model, max_batches: int = 20) -> float:
        from minimind.data.loader import make_loader

        dist = self.dist
        loader = make_loader(self.val_dir, stage=_meta(self.val_dir)["stage"], batch_size=self.cfg.batch_size,
                             seq_len=self.cfg.seq_len, seed=0, rank=dist.rank, world_size=dist.world_size,
                             doc_mask=self.cfg.doc_mask)
        n = min(max_batches, max(1, len(loader)))
        was_training = model.training
        model.eval()
        total = weight = 0.0
        it = iter(loader)
        for _ in range(n):
            batch = to_device(next(it), self.device)
            loss_sum, _, _ = self.objective(model, batch)
            total += float(loss_sum)
            weight += float(self.objective.weight(batch))
        model.train(was_training)
        return dist.all_reduce_sum(total) / max(dist.all_reduce_sum(weight), 1e-12)


def _resumed(cfg: TrainConfig) -> TrainConfig:
    """--resume without --model or --init rebuilds the model run.json recorded: `cfg` with its preset and
    --set overrides, or its --init."""
    if cfg.init is not None or not cfg.resume or cfg.model is not None:
        return cfg
    return dataclasses.replace(cfg, **_read_run_json(Path(cfg.out) / "run.json"))


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


# ----------------------------------------------------------------- a stage's parts by name (its record's fields)
# objective: what the loss is (objectives.py)
def _causal_lm(setup: Setup):
    return objectives.CausalLM()


def _reason(setup: Setup):
    return objectives.Reason()


def _dpo(setup: Setup):
    cfg = setup.cfg
    ref = setup.frozen(cfg.ref or setup.base_ckpt)
    if ref.config.to_dict() != setup.model.config.to_dict():
        raise UsageError(f"--ref {cfg.ref}: its architecture differs from the policy's (--init)")
    return objectives.DPO(ref, beta=cfg.beta)


def _distill(setup: Setup):
    cfg = setup.cfg
    teacher = setup.frozen(cfg.teacher)
    if teacher.config.vocab_size != setup.model.config.vocab_size:
        raise UsageError(f"--teacher {cfg.teacher}: vocab {teacher.config.vocab_size} != student's "
                     f"{setup.model.config.vocab_size}")
    return objectives.Distill(teacher, temperature=cfg.temperature, alpha=cfg.alpha)


def _grpo(setup: Setup):  # its reference scores the rollouts (grpo.Rollouts), the loss reads them
    return objectives.GRPO(beta=setup.cfg.beta)  # resolve() filled it from the stage's record


OBJECTIVES = {"causal_lm": _causal_lm, "reason": _reason, "dpo": _dpo, "distill": _distill, "grpo": _grpo}


# params: which weights train and what a checkpoint of them holds
class AllParams:
    """Every weight trains; a checkpoint holds the whole model. A LoRA --init is merged into its base first."""

    def __init__(self, cfg: TrainConfig):
        pass

    def fit(self, model):
        pass

    def check_init(self, init, lora: bool, stage: str):
        pass

    def write(self, tmp: Path, model, base_ckpt):
        write_model_files(tmp, model)

    def load(self, ckpt: Path, model, device):
        saved = load_config(ckpt)
        if saved.to_dict() != model.config.to_dict():
            raise UsageError(f"--resume: {ckpt} has a different architecture than this run's model")
        sd = load_weights(ckpt, device)
        check_finite(sd, ckpt / WEIGHTS_FILE)
        load_state_into(model, sd, ckpt / WEIGHTS_FILE)

    def saved(self, model) -> list:
        return list(state_dict_for_save(model).values())


class Adapters:
    """LoRA: low-rank adapters on the frozen model train (--lora-rank, --lora-alpha, --lora-targets); a
    checkpoint holds them alone and names the full checkpoint they adapt, the base."""

    def __init__(self, cfg: TrainConfig):
        self.rank, self.alpha = cfg.lora_rank, cfg.lora_alpha
        self.targets = tuple(t.strip() for t in cfg.lora_targets.split(",")) if cfg.lora_targets else DEFAULT_TARGETS

    def fit(self, model):
        try:
            apply_lora(model, rank=self.rank, alpha=self.alpha, targets=self.targets)
        except LoRARankError as e:
            raise UsageError(f"--lora-rank: {e}") from None
        except ValueError as e:
            raise UsageError(str(e)) from None

    def check_init(self, init, lora: bool, stage: str):
        if lora:
            raise UsageError(f"--init {init} is a LoRA checkpoint; --stage {stage} trains a new adapter on a "
                             "full checkpoint: pass its base, or merge it first (`minimind export`)")

    def write(self, tmp: Path, model, base_ckpt):
        write_adapter(tmp, model, base_ckpt, self.targets, self.rank, self.alpha, 0.0)

    def load(self, ckpt: Path, model, device):
        file = ckpt / ADAPTER_WEIGHTS
        sd = load_adapter_weights(ckpt, device=device)
        check_finite(sd, file)
        expected = lora_state_dict(model)
        if set(sd) != set(expected) or any(sd[k].shape != expected[k].shape for k in sd):
            raise CheckpointError(f"{file}: the adapter does not fit this run's model (other rank or targets)")
        model.load_state_dict(sd, strict=False)

    def saved(self, model) -> list:
        return [p for p in model.parameters() if p.requires_grad]


PARAMS = {"all": AllParams, "adapters": Adapters}


# batches: where a step's batches come from, and what data that source takes
class _FromData:
    """Read from prepared data of a kind the stage accepts, tokenized with the run's tokenizer."""

    @staticmethod
    def check_data(setup: Setup, data_dir: Path):
        meta, spec = _meta(data_dir), setup.spec
        if meta.get("stage") not in spec.accepts:
            raise UsageError(
                f"--data {data_dir} was prepared for stage {meta.get('stage')!r}; --stage {setup.cfg.stage} needs "
                f"data prepared as {' or '.join(sorted(spec.accepts))}"
            )
        if setup.tokenizer_dir is not None and meta.get("tokenizer_fingerprint"):
            if meta["tokenizer_fingerprint"] != setup.fingerprint():
                raise UsageError(f"--data {data_dir} was tokenized with a different tokenizer than "
                                 f"{setup.tokenizer_dir}")

    @staticmethod
    def build(setup: Setup) -> DataBatches:
        return DataBatches(setup.loader, setup.device)


class _Rollouts:
    """Sampled from the policy (GRPO) for the prompts of prepared grpo data, scored against a frozen
    reference: --ref, else --init."""

    @staticmethod
    def check_data(setup: Setup, data_dir: Path):
        Rollouts.check_data(data_dir)

    @staticmethod
    def build(setup: Setup) -> Rollouts:
        ref = setup.frozen(setup.cfg.ref or setup.base_ckpt)
        return Rollouts(setup.loader, setup.model, ref, setup.tokenizer_dir, setup.cfg, setup.device)


BATCHES = {"data": _FromData, "rollouts": _Rollouts}
