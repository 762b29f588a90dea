"""Benchmarks: `pytest bench/` (real sizes) or MINIMIND_BENCH_SMOKE=1 (tiny sizes, proves they run)."""

import os

import pytest

SMOKE = os.environ.get("MINIMIND_BENCH_SMOKE") == "1"


@pytest.fixture(scope="session")
def smoke() -> bool:
    return SMOKE
