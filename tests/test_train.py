"""The training loop from the CLI, on the tiny preset and the synthetic corpus: every stage's own
signal moves the right way, exact resume after SIGKILL, and clear usage errors (exit 2)."""

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT

TRAIN = [sys.executable, str(ROOT / "train.py")]
# float32 pinned: --dtype auto times float32 against bf16 at start, and runs these tests compare must agree
FAST = ["--model", "tiny", "--batch-size", "8", "--seq-len", "64", "--log-every", "1", "--device", "cpu",
        "--dtype", "float32"]


def train_cli(*args, check=True, timeout=600):
    """train.py in a subprocess: what a user runs (exit codes, signals)."""
    out = subprocess.run([*TRAIN, *map(str, args)], capture_output=True, text=True, cwd=ROOT, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"train.py {' '.join(map(str, args))} -> {out.returncode}\n{out.stderr[-3000:]}")
    return out


def train(*args):
    """The same entry point in this process (saves ~5 s of imports per run)."""
    from minimind.cli import train_main

    rc = train_main([str(a) for a in args])
    assert rc == 0, f"train.py {' '.join(map(str, args))} -> {rc}"


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def first_last(rows, key, k=3):
    vals = [r[key] for r in rows if key in r]
    return sum(vals[:k]) / k, sum(vals[-k:]) / k


@pytest.fixture(scope="module")
def data(synth_dir, tokenizer_dir, tmp_path_factory):
    from minimind.data.prepare import prepare

    out = tmp_path_factory.mktemp("prepared")
    dirs = {}
    for stage, name in (("pretrain", "pretrain"), ("sft", "sft"), ("dpo", "dpo"), ("reason", "reason"),
                        ("lora", "lora_identity"), ("grpo", "rlaif")):
        max_len = 512 if stage == "pretrain" else 64
        dirs[stage] = prepare(stage, synth_dir / f"{name}.jsonl", tokenizer_dir, out / stage, max_seq_len=max_len)
    return dirs


@pytest.fixture(scope="module")
def pretrained(data, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "pre"
    train("--stage", "pretrain", *FAST, "--data", data["pretrain"], "--out", run, "--max-steps", 40, "--lr", "3e-3",
          "--warmup-steps", 5)
    return run


def test_pretrain_loss_falls_and_writes_the_run(pretrained):
    rows = metrics(pretrained)
    first, last = first_last(rows, "loss")
    assert last < first - 1.0, (first, last)
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "useful_tokens_per_s"):
        assert key in rows[-1]
    assert (pretrained / "step-40" / "model.safetensors").exists()
    assert (pretrained / "step-40" / "tokenizer.json").exists()
    assert (pretrained / "step-40" / "trainer_state" / "optimizer.pt").exists()
    assert (pretrained / "loss.png").read_bytes()[:4] == b"\x89PNG"
    run_cfg = json.loads((pretrained / "run.json").read_text())
    assert run_cfg["stage"] == "pretrain" and run_cfg["lr"] == 3e-3


@pytest.fixture(scope="module")
def sft_run(pretrained, data, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "sft"
    train("--stage", "sft", "--init", pretrained, "--data", data["sft"], "--out", run,
          *FAST[2:], "--max-steps", 30, "--lr", "2e-3", "--warmup-steps", 3, "--val-data", data["sft"],
          "--eval-every", 15)
    return run


def test_sft_loss_falls(sft_run):
    first, last = first_last(metrics(sft_run), "loss")
    assert last < first - 0.5, (first, last)
    rows = metrics(sft_run)
    assert all(r["useful_tokens_per_s"] < r["tokens_per_s"] for r in rows)
    val = {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}
    assert sorted(val) == [15, 30] and val[30] < val[15]


def test_moe_pretrain_logs_its_aux_loss(data, tmp_path):
    train("--stage", "pretrain", *FAST, "--set", "use_moe=true", "--data", data["pretrain"], "--out", tmp_path / "moe",
          "--max-steps", 3)
    rows = metrics(tmp_path / "moe")
    assert all(r["aux_loss"] > 0 for r in rows)


def test_lora_changes_only_adapters(pretrained, data, tmp_path):
    from safetensors.torch import load_file

    train("--stage", "lora", "--init", pretrained, "--data", data["lora"], "--out", tmp_path / "lora",
          *FAST[2:], "--max-steps", 15, "--lora-rank", 4)
    ckpt = tmp_path / "lora" / "step-15"
    assert not (ckpt / "model.safetensors").exists()
    adapter = load_file(ckpt / "adapter.safetensors")
    assert adapter and all(".lora_" in k for k in adapter)
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)
    cfg = json.loads((ckpt / "adapter_config.json").read_text())
    assert Path(cfg["base_checkpoint"]) == (pretrained / "step-40").resolve()
    first, last = first_last(metrics(tmp_path / "lora"), "loss")
    assert last < first


def test_embed_lr_scale_scales_only_the_embeddings_lr(pretrained, data, tmp_path):
    """--embed-lr-scale 0 leaves the (tied) embedding where --init had it while every block matrix moves;
    the loop gives its group lr x 0, the others the schedule's lr."""
    from safetensors.torch import load_file

    out = tmp_path / "frozen-embed"
    train("--stage", "pretrain", "--init", pretrained, *FAST[2:], "--data", data["pretrain"], "--out", out,
          "--max-steps", 3, "--embed-lr-scale", 0)
    before = load_file(pretrained / "step-40" / "model.safetensors")
    after = load_file(out / "step-3" / "model.safetensors")
    assert torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])
    moved = [k for k in before if ".layers." in k and not torch.equal(before[k], after[k])]
    assert len(moved) == len([k for k in before if ".layers." in k])


def test_dpo_margin_and_accuracy_rise(pretrained, data, tmp_path):
    train("--stage", "dpo", "--init", pretrained, "--data", data["dpo"], "--out", tmp_path / "dpo",
          *FAST[2:], "--max-steps", 25, "--lr", "1e-3")
    rows = metrics(tmp_path / "dpo")
    m0, m1 = first_last(rows, "margin")
    a0, a1 = first_last(rows, "accuracy")
    assert m1 > m0 and m1 > 0, (m0, m1)
    assert a1 > a0, (a0, a1)
    assert {"reward_chosen", "reward_rejected"} <= rows[-1].keys()


def test_distill_kl_falls(pretrained, sft_run, data, tmp_path):
    # teacher: the pretrained model after SFT; student: the pretrained model
    train("--stage", "distill", "--init", pretrained, "--teacher", sft_run, "--data", data["sft"],
          "--out", tmp_path / "distill", *FAST[2:], "--max-steps", 20, "--lr", "2e-3")
    k0, k1 = first_last(metrics(tmp_path / "distill"), "kl")
    assert k1 < k0, (k0, k1)


def test_reason_tag_loss_falls(pretrained, data, tmp_path):
    train("--stage", "reason", "--init", pretrained, "--data", data["reason"], "--out", tmp_path / "reason",
          *FAST[2:], "--max-steps", 25, "--lr", "2e-3")
    t0, t1 = first_last(metrics(tmp_path / "reason"), "tag_loss")
    assert t1 < t0 * 0.8, (t0, t1)


def _losses(run):
    return {r["step"]: r["loss"] for r in metrics(run)}


def test_sigkill_then_resume_continues_the_same_curve(data, tmp_path):
    args = ["--stage", "pretrain", *FAST, "--data", data["pretrain"], "--max-steps", 24, "--save-every", 6,
            "--lr", "3e-3", "--keep", "10"]
    train(*args, "--out", tmp_path / "whole")
    killed = tmp_path / "killed"
    proc = subprocess.Popen([*TRAIN, *map(str, args), "--out", str(killed)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "step-12").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (killed / "step-12").exists() and not (killed / "step-24").exists()
    train_cli(*args, "--out", killed, "--resume")
    whole, resumed = _losses(tmp_path / "whole"), _losses(killed)
    assert sorted(resumed) == sorted(whole) == list(range(1, 25))
    for step in range(1, 25):
        assert abs(resumed[step] - whole[step]) <= 1e-6, (step, resumed[step], whole[step])
    from safetensors.torch import load_file

    wa = load_file(tmp_path / "whole" / "step-24" / "model.safetensors")
    wb = load_file(killed / "step-24" / "model.safetensors")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6)


def test_doc_mask_pretrain_trains_and_validates_with_the_same_masks(data, tmp_path):
    out = tmp_path / "masked"
    rc, err = train_inproc("--stage", "pretrain", *FAST, "--data", data["pretrain"], "--max-steps", 3, "--doc-mask",
                           "--val-data", data["pretrain"], "--eval-every", 3, "--out", out)
    assert rc == 0, err[-2000:]
    assert json.loads((out / "run.json").read_text())["doc_mask"] is True
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("val_loss" in r and math.isfinite(r["val_loss"]) for r in rows)


def test_usage_errors_exit_2(data, pretrained, tmp_path):
    cases = [
        (["--stage", "sft", "--data", data["sft"], "--out", tmp_path / "a"], "--init"),
        (["--stage", "pretrain", "--out", tmp_path / "b"], "--data"),
        (["--stage", "sft", "--init", pretrained, "--data", data["pretrain"], "--out", tmp_path / "c"],
         "prepared for stage"),
        (["--stage", "pretrain", "--data", data["pretrain"], "--out", pretrained], "not empty"),
        (["--stage", "pretrain", "--data", data["pretrain"], "--out", tmp_path / "d", "--resume"], "no step-N"),
        (["--stage", "pretrain", "--data", data["pretrain"], "--out", tmp_path / "e", "--lr", "fast"], "--lr"),
        (["--stage", "pretrain", "--data", data["pretrain"], "--out", tmp_path / "f", "--set", "wings=2"], "wings"),
        (["--stage", "distill", "--init", pretrained, "--data", data["sft"], "--out", tmp_path / "g"], "--teacher"),
    ]
    for args, needle in cases:
        rc, err = train_inproc(*args)
        assert rc == 2, (args, err[-2000:])
        assert needle in err, (needle, err[-2000:])


def test_dpo_reference_of_another_architecture_is_refused(data, pretrained, tmp_path):
    from minimind.checkpoint import save_checkpoint
    from minimind.config import ModelConfig
    from minimind.model import MiniMindForCausalLM

    three_layers = MiniMindForCausalLM(ModelConfig.from_preset("tiny", ["num_hidden_layers=3"]))
    other = save_checkpoint(tmp_path / "other", three_layers, tokenizer_dir=pretrained / "step-40")
    rc, err = train_inproc("--stage", "dpo", "--init", pretrained, "--ref", other, "--data", data["dpo"],
                           "--out", tmp_path / "dpo", "--max-steps", 1)
    assert rc == 2 and "--ref" in err and "architecture" in err, err[-2000:]


def test_resume_with_a_different_architecture_is_refused(data, pretrained, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(pretrained, run)
    rc, err = train_inproc("--stage", "pretrain", "--data", data["pretrain"], "--out", run, "--resume", "--model",
                           "tiny", "--set", "num_hidden_layers=3", "--max-steps", 50)
    assert rc == 2 and "architecture" in err, err[-2000:]


def test_cli_exit_code_for_a_bad_flag(tmp_path):
    out = train_cli("--stage", "pretrain", "--batch-size", "-3", "--out", tmp_path / "x", check=False)
    assert out.returncode == 2 and "--batch-size" in out.stderr


def train_inproc(*args):
    """-> (exit code, stderr) of train.py's entry point, run in this process."""
    import contextlib
    import io

    from minimind.cli import train_main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            rc = train_main([str(a) for a in args])
        except SystemExit as e:  # argparse
            rc = e.code
    return rc, err.getvalue()


@pytest.fixture(scope="module")
def reason_run(sft_run, data, tmp_path_factory):
    """SFT then reasoning distillation: a policy that sometimes answers in <think>/<answer> form."""
    run = tmp_path_factory.mktemp("runs") / "reason"
    train("--stage", "reason", "--init", sft_run, "--data", data["reason"], "--out", run, *FAST[2:],
          "--max-steps", 40, "--lr", "2e-3")
    return run


@pytest.mark.parametrize("seed", [0, 1])
def test_grpo_raises_the_reward_on_held_out_arithmetic(reason_run, data, tmp_path, seed):
    """The reward on arithmetic prompts never trained on (synth holds them out of every file) rises."""
    from infer.engine import Engine
    from minimind.checkpoint import load_checkpoint
    from minimind.data.synth import arithmetic_prompts
    from minimind.data.tokenizer import load_tokenizer
    from minimind.grpo import mean_reward

    held_out = arithmetic_prompts(seed=100 + seed, n=32)

    def score(ckpt):
        model, path = load_checkpoint(ckpt)
        tok = load_tokenizer(path)
        return mean_reward(Engine(model, tok, max_batch=32), tok, held_out, max_new_tokens=40)

    before = score(reason_run)
    train("--stage", "grpo", "--init", reason_run, "--data", data["grpo"], "--out", tmp_path / "grpo", "--seed", seed,
          "--batch-size", "4", "--group-size", "6", "--max-new-tokens", "40", "--seq-len", "64", "--log-every", "1",
          "--max-steps", "32", "--lr", "1e-3", "--device", "cpu")
    rows = metrics(tmp_path / "grpo")
    assert {"reward", "kl"} <= rows[-1].keys()
    after = score(tmp_path / "grpo")
    print(f"held-out mean reward, seed {seed}: {before:.3f} -> {after:.3f}")
    assert after > before, (before, after)


def test_wandb_offline_logs_the_run(data, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    train("--stage", "pretrain", *FAST, "--data", data["pretrain"], "--out", tmp_path / "run", "--max-steps", 3,
          "--wandb")
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert runs, list((tmp_path / "run").iterdir())
    assert any(p.suffix == ".wandb" for p in runs[0].iterdir())


def test_raw_jsonl_without_a_tokenizer_trains_one_and_caches_the_data(synth_dir, tmp_path):
    run = tmp_path / "runs" / "pre"
    train("--stage", "pretrain", *FAST, "--data", synth_dir / "pretrain.jsonl", "--out", run, "--max-steps", 2)
    assert (run / "tokenizer" / "tokenizer.json").exists()
    assert (run / "step-2" / "tokenizer.json").read_bytes() == (run / "tokenizer" / "tokenizer.json").read_bytes()
    caches = list((tmp_path / "runs" / ".minimind-cache").iterdir())
    assert len(caches) == 1 and (caches[0] / "meta.json").exists()
    # SFT on raw jsonl reuses the init checkpoint's tokenizer; a second run reuses the prepared cache
    for name in ("sft-a", "sft-b"):
        train("--stage", "sft", "--init", run, *FAST[2:], "--data", synth_dir / "sft.jsonl",
              "--out", tmp_path / "runs" / name, "--max-steps", 2)
    assert len(list((tmp_path / "runs" / ".minimind-cache").iterdir())) == 2
