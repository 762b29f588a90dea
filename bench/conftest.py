"""Benchmarks: `pytest bench/` (real sizes) or MINIMIND_BENCH_SMOKE=1 (tiny sizes, proves they run)."""

import json
import os

import pytest

SMOKE = os.environ.get("MINIMIND_BENCH_SMOKE") == "1"


@pytest.fixture(scope="session")
def smoke() -> bool:
    return SMOKE


@pytest.fixture(autouse=True)
def _stream_result(request):
    """With MINIMIND_BENCH_STREAM=FILE, each benchmark appends its figures to FILE (one JSON line) the
    moment it ends, so a run that is stopped or hangs at exit (bench/gpu.sh) keeps what it measured."""
    path = os.environ.get("MINIMIND_BENCH_STREAM")
    bench = request.getfixturevalue("benchmark") if path and "benchmark" in request.fixturenames else None
    yield
    if bench is None or bench.stats is None:
        return
    stats = bench.stats.stats
    row = {"name": request.node.name, "mean_s": stats.mean, "stddev_s": stats.stddev, "rounds": stats.rounds,
           **bench.extra_info}
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
