"""The training stages as records: one `Stage` per name, read by the CLI (choices), `prepare` (data
kinds), the loop (defaults, what data a stage accepts) and `stages.Setup` (its parts: objective, batch
source, trained parameters: each named here, built from one registry in stages.py).
Nothing here imports the loop; adding a stage starts with a record here.
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class DataKind:
    """What `minimind prepare --stage NAME` writes and the loader reads."""

    name: str
    layout: str  # a key of data.layouts.LAYOUTS: "text": documents in one token stream | "chat": conversations,
    #              loss on assistant spans | "pairs": chosen/rejected conversations (dpo) | "prompts": prompts +
    #              reference answers (grpo)
    tag_weights: bool = False  # <think>/<answer> tags get their own loss weight (reason)


TAG_WEIGHT = 10.0  # the loss weight of a tag_weights kind's <think>/<answer> tags (`minimind prepare --tag-weight`)
DATA = {k.name: k for k in (
    DataKind("pretrain", "text"), DataKind("sft", "chat"), DataKind("lora", "chat"), DataKind("dpo", "pairs"),
    DataKind("distill", "chat"), DataKind("reason", "chat", tag_weights=True), DataKind("grpo", "prompts"),
)}
DATA_KINDS = tuple(DATA)
CHAT_DATA = frozenset(k.name for k in DATA.values() if k.layout == "chat")  # one conversation format


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    data: str  # what a raw jsonl is prepared as for this stage
    accepts: frozenset  # prepared data kinds this stage trains on
    lr: float
    batch_size: int
    seq_len: int = 256
    weight_decay: float = 0.1
    warmup_steps: int = 10
    adam_betas: tuple = (0.9, 0.95)  # AdamW's (beta1, beta2)
    beta: float = 0.1  # DPO's and GRPO's KL weight
    # the stage's parts, by name (stages.OBJECTIVES, BATCHES, PARAMS): what the loss is, where its batches come
    # from, which parameters train and what a checkpoint of them holds
    objective: str = "causal_lm"  # causal_lm | reason | dpo | distill | grpo
    batches: str = "data"  # "data": read from prepared data | "rollouts": sampled from the policy (GRPO)
    params: str = "all"  # "all" | "adapters": LoRA adapters on the frozen model, saved alone (a LoRA checkpoint)
    needs_init: bool = True  # starts from a checkpoint (every stage but pretrain, which may train a tokenizer)
    needs_teacher: bool = False  # distillation: --teacher CKPT
    packs_documents: bool = False  # pretrain rows are windows over one token stream
    optim: str = "adamw"
    doc_mask: bool = False  # pretrain: attention within each document (trainconfig.doc_mask)
    cpu: tuple = ()  # (field, value) pairs that replace the above when the run is on the CPU

    def default(self, name: str, on_cpu: bool):
        """The stage's default for TrainConfig field `name` (trainconfig.STAGE_FIELDS) on this device."""
        return dict(self.cpu).get(name, getattr(self, name)) if on_cpu else getattr(self, name)


STAGES = {s.name: s for s in (
    # Pretrain defaults from bench/realtext.py's sweep on real text at equal wall-clock (BENCHMARKS.md, "Loss
    # per second on real text"): Muon (held-out loss after 5 minutes far below AdamW's at any lr and batch),
    # document masks (each document trained as it is scored: alone), lr 2e-3. On the CPU a step costs about
    # the same per token at any batch, so a small batch buys more updates per second and wins (12 x 256,
    # issue 27); a GPU is idle at that size, so it keeps 16 rows (its own sweep is pending: no GPU yet).
    # Warmup 3 and AdamW's beta1 0.8 (for the embeddings and norms; Muon has its own momentum): issue 27's
    # sweep at 56 steps, 4.077 -> 4.010 nats/token held out; weight decay, decay fraction, the embeddings'
    # lr and the init scale were tried and kept.
    Stage("pretrain", data="pretrain", accepts=frozenset({"pretrain"}), lr=2e-3, batch_size=16, warmup_steps=3,
          adam_betas=(0.8, 0.95), needs_init=False, packs_documents=True, optim="muon", doc_mask=True,
          cpu=(("batch_size", 12),)),
    Stage("sft", data="sft", accepts=CHAT_DATA, lr=2e-4, batch_size=16),
    Stage("lora", data="lora", accepts=CHAT_DATA, lr=1e-3, batch_size=16, weight_decay=0.0, params="adapters"),
    Stage("dpo", data="dpo", accepts=frozenset({"dpo"}), lr=1e-5, batch_size=8, weight_decay=0.0, warmup_steps=0,
          objective="dpo"),
    Stage("distill", data="distill", accepts=CHAT_DATA, lr=2e-4, batch_size=16, objective="distill",
          needs_teacher=True),
    Stage("reason", data="reason", accepts=frozenset({"reason"}), lr=2e-4, batch_size=16, objective="reason"),
    Stage("grpo", data="grpo", accepts=frozenset({"grpo"}), lr=5e-6, batch_size=4, weight_decay=0.0,
          warmup_steps=0, beta=0.04, objective="grpo", batches="rollouts"),
)}
STAGE_NAMES = tuple(STAGES)
