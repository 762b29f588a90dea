"""The package, its console script and its import names (SPEC §2, §9)."""

import fnmatch
import importlib.metadata
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


def _our_top_level_names() -> set[str]:
    """The top-level import names pyproject installs: root folders with an __init__.py that match
    [tool.setuptools.packages.find] include."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pytest depends on tomli below 3.11
        import tomli as tomllib
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    return {d.name for d in ROOT.iterdir() if (d / "__init__.py").exists()
            and any(fnmatch.fnmatchcase(d.name, pattern) for pattern in include)}


def _other_providers(names) -> dict[str, list[str]]:
    """{import name: installed distributions other than minimind that ship it}."""
    installed = importlib.metadata.packages_distributions()
    return {n: others for n in sorted(names) if (others := [d for d in installed.get(n, []) if d != "minimind"])}


def _hf_kernels_installed() -> bool:
    try:
        return importlib.metadata.distribution("kernels") is not None
    except importlib.metadata.PackageNotFoundError:  # transformers < 5.21 (the lock's choice on Python 3.10)
        return False


def test_no_other_installed_distribution_ships_our_import_names():
    names = _our_top_level_names()
    assert "minimind" in names and "kernels" not in names, names
    assert _other_providers(names) == {}
    # the check sees a clash where there is one: transformers >= 5.21 installs Hugging Face's `kernels`,
    # the name our kernels package had before it moved into minimind/
    if _hf_kernels_installed():
        assert _other_providers({"kernels"}) == {"kernels": ["kernels"]}


@pytest.mark.parametrize("where", ["repository root", "another directory"])
def test_transformers_imports_with_hf_kernels_from_anywhere(where, tmp_path):
    """The 2026-12-04 break: from the root, `kernels` was ours and transformers' hub_kernels failed to import."""
    if not _hf_kernels_installed():
        pytest.skip("Hugging Face's kernels is not installed (transformers < 5.21 does not need it)")
    code = (
        "import minimind.kernels, transformers, kernels\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "from transformers.utils import import_utils\n"
        "import torch\n"
        "assert import_utils.is_kernels_available()\n"
        "cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,\n"
        "                  num_attention_heads=4, num_key_value_heads=2)\n"
        "print(LlamaForCausalLM(cfg)(torch.randint(0, 64, (1, 5))).logits.shape)\n"
        "import importlib.metadata, pathlib\n"
        "hf = importlib.metadata.distribution('kernels').locate_file('kernels/__init__.py')\n"
        "print('ours', minimind.kernels.__file__)\n"
        "print('hf', kernels.__file__, pathlib.Path(kernels.__file__).samefile(hf))\n"
    )
    cwd = ROOT if where == "repository root" else tmp_path
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "torch.Size([1, 5, 64])" in out.stdout
    ours = out.stdout.split("ours ")[1].split()[0]
    assert ours.startswith(str(ROOT / "minimind" / "kernels")), ours
    hf, is_hf_distribution = out.stdout.split("hf ")[1].split()[:2]
    assert is_hf_distribution == "True", f"`import kernels` found {hf}, not Hugging Face's distribution"
