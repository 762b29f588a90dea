"""Exported models in the Hugging Face training stack: a peft LoRA step and trl DPO / SFT steps on CPU.

The model is the `tiny` checkpoint exported with `minimind export`, loaded by stock transformers with
our tokenizer; the data is the built-in synthetic corpus in MiniMind's jsonl formats, converted to
trl's conversational format. Each test checks that the step really trained something.
"""

import json
import os

import pytest
import torch

from minimind.interop.export import export_hf

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may download; fail fast if something tries
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
peft = pytest.importorskip("peft")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def hf_dir(tiny_ckpt, tmp_path_factory):
    return export_hf(tiny_ckpt, tmp_path_factory.mktemp("hf") / "tiny")


def load(hf_dir):
    return AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32), AutoTokenizer.from_pretrained(hf_dir)


def read_jsonl(path, n):
    rows = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
    return rows[:n]


def test_peft_lora_attaches_and_trains_a_step(hf_dir):
    model, tok = load(hf_dir)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                      task_type="CAUSAL_LM"))
    wrapped = {n.rsplit(".", 1)[-1] for n, m in lora.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert wrapped == set(TARGETS)
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    base_before = lora.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight.clone()
    batch = tok(["The quick brown fox jumps over the lazy dog."] * 2, return_tensors="pt")
    opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(2):
        loss = lora(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[1] < losses[0]
    assert torch.equal(lora.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight, base_before)


def _minimind_dpo_to_trl(row):
    """MiniMind dpo {"chosen": [msgs], "rejected": [msgs]} -> trl's conversational preference format."""
    return {"prompt": row["chosen"][:-1], "chosen": row["chosen"][-1:], "rejected": row["rejected"][-1:]}


def _trl_args(cls, tmp_path, **kw):
    return cls(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, learning_rate=1e-3,
               report_to=[], use_cpu=True, save_strategy="no", logging_steps=1, bf16=False, fp16=False,
               dataloader_num_workers=0, **kw)


def _changed(before: dict, model) -> bool:
    return any(not torch.equal(before[n], p) for n, p in model.named_parameters() if n in before)


def test_trl_dpo_step(hf_dir, synth_dir, tmp_path):
    model, tok = load(hf_dir)
    rows = [_minimind_dpo_to_trl(r) for r in read_jsonl(synth_dir / "dpo.jsonl", 4)]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = trl.DPOTrainer(model=model, args=_trl_args(trl.DPOConfig, tmp_path, max_length=128, beta=0.1),
                             train_dataset=datasets.Dataset.from_list(rows), processing_class=tok)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert trainer.state.global_step == 1 and logged and torch.isfinite(torch.tensor(logged[0]["loss"]))
    assert _changed(before, trainer.model)


def test_trl_sft_step(hf_dir, synth_dir, tmp_path):
    model, tok = load(hf_dir)
    rows = [{"messages": r["conversations"]} for r in read_jsonl(synth_dir / "sft.jsonl", 4)]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = trl.SFTTrainer(model=model, args=_trl_args(trl.SFTConfig, tmp_path, max_length=128),
                             train_dataset=datasets.Dataset.from_list(rows), processing_class=tok)
    trainer.train()
    assert trainer.state.global_step == 1 and _changed(before, trainer.model)
