"""The package, its console script and the import name `kernels` (SPEC §2, §9)."""

import subprocess
import sys

import pytest

from tests.conftest import ROOT

SUBCOMMANDS = ["synth", "tokenizer", "prepare", "train", "info", "chat", "serve", "eval", "export", "import"]
TRAIN_FLAGS = [
    "--stage", "--model", "--set", "--init", "--data", "--tokenizer", "--out", "--max-steps", "--epochs",
    "--max-time", "--batch-size", "--seq-len", "--grad-accum", "--lr", "--min-lr", "--warmup-steps",
    "--weight-decay", "--grad-clip", "--dtype", "--device", "--compile", "--kernels", "--save-every", "--keep",
    "--log-every", "--resume", "--seed", "--wandb", "--deepspeed", "--ref", "--beta", "--teacher",
    "--temperature", "--alpha", "--lora-rank", "--lora-alpha", "--lora-targets", "--group-size",
    "--max-new-tokens", "--val-data", "--eval-every", "--grad-checkpointing",
]


def run(*args):
    return subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_minimind_help_lists_every_subcommand():
    out = run(sys.executable, "-m", "minimind.cli", "--help")
    assert out.returncode == 0, out.stderr
    for name in SUBCOMMANDS:
        assert name in out.stdout, name


def test_console_script_is_installed():
    exe = ROOT / ".venv" / "bin" / "minimind"
    if not exe.exists():
        pytest.skip("not running from the project's .venv")
    out = run(str(exe), "info", "--model", "tiny")
    assert out.returncode == 0, out.stderr
    assert '"params_total"' in out.stdout


def test_train_help_lists_spec_flags():
    out = run(sys.executable, "train.py", "--help")
    assert out.returncode == 0, out.stderr
    missing = [f for f in TRAIN_FLAGS if f not in out.stdout]
    assert not missing, missing


def test_bad_flag_names_the_flag_and_exits_2():
    out = run(sys.executable, "train.py", "--stage", "sft", "--batch-size", "many")
    assert out.returncode == 2
    assert "--batch-size" in out.stderr
    out = run(sys.executable, "-m", "minimind.cli", "info", "--ckpt", "/no/such/ckpt")
    assert out.returncode == 2
    assert "/no/such/ckpt" in out.stderr
    out = run(sys.executable, "train.py", "--stage", "pretrain", "--no-such-flag")
    assert out.returncode == 2
    assert "--no-such-flag" in out.stderr


def test_deepspeed_local_rank_is_accepted():
    import argparse

    from minimind.cli import add_train_arguments

    p = argparse.ArgumentParser()
    add_train_arguments(p)
    args = p.parse_args(["--stage", "pretrain", "--local_rank=1"])
    assert args.local_rank == 1


def test_info_prints_full_config_and_counts():
    import json

    out = run(sys.executable, "-m", "minimind.cli", "info", "--model", "moe", "--set", "num_hidden_layers=2")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["config"]["num_hidden_layers"] == 2
    assert info["config"]["use_moe"] is True
    assert info["params_active"] < info["params_total"]


def test_unknown_set_field_is_an_error():
    out = run(sys.executable, "-m", "minimind.cli", "info", "--model", "tiny", "--set", "hiden_size=3")
    assert out.returncode == 2
    assert "hiden_size" in out.stderr


def test_transformers_does_not_take_our_kernels_for_hf_kernels():
    from transformers.utils import import_utils

    import kernels

    assert kernels.__file__.startswith(str(ROOT))
    import_utils.is_kernels_available.cache_clear()
    assert import_utils.is_kernels_available() is False
    # and a stock model still builds and runs with our `kernels` importable
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2)
    out = LlamaForCausalLM(cfg)(torch.randint(0, 64, (1, 5)))
    assert out.logits.shape == (1, 5, 64)
