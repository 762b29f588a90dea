"""Shared test set-up. TRITON_INTERPRET must be set before any @triton.jit runs, so it is set here,
before anything imports `minimind.kernels`."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


@pytest.fixture
def shared_dir() -> Path:
    """../shared beside the clone (CI has it); tests that need it skip on a user's fresh clone."""
    if not (SHARED / "SPEC.md").exists():
        pytest.skip(f"{SHARED} is absent (it sits beside the clone in CI)")
    return SHARED


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _require(module: str):
    import importlib.util

    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not implemented yet")


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    """The built-in synthetic corpus at its smallest scale (minimind synth)."""
    _require("minimind.data.synth")
    from minimind.data.synth import write_corpus

    out = tmp_path_factory.mktemp("synth")
    write_corpus(out, seed=0, scale=0.2)
    return out


@pytest.fixture(scope="session")
def tokenizer_dir(synth_dir, tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer (vocab <= 6400) trained on the synthetic corpus."""
    _require("minimind.data.tokenizer")
    from minimind.data.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer([synth_dir / "pretrain.jsonl", synth_dir / "sft.jsonl"], vocab_size=6400, out=out)
    return out


@pytest.fixture(scope="session")
def tiny_ckpt(tokenizer_dir, tmp_path_factory) -> Path:
    """An untrained `tiny` checkpoint (random weights, fixed seed) carrying the tokenizer."""
    from minimind.checkpoint import save_checkpoint
    from minimind.config import ModelConfig
    from minimind.model import MiniMindForCausalLM

    torch.manual_seed(1234)
    model = MiniMindForCausalLM(ModelConfig.from_preset("tiny", kernels="torch"))
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", model, tokenizer_dir=tokenizer_dir)


def free_port() -> int:
    """A TCP port nobody listens on right now (for a server or rendezvous a test starts)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
