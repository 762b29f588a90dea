"""Shared test set-up. TRITON_INTERPRET must be set before any @triton.jit runs, so it is set here,
before anything imports `kernels`."""

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
