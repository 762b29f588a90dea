"""The benchmarks run (tiny sizes, one round each); the real figures come from `pytest bench/`."""

import os
import subprocess
import sys

from tests.conftest import ROOT


def test_benchmarks_run_in_smoke_mode():
    env = {**os.environ, "MINIMIND_BENCH_SMOKE": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "bench", "-q", "--benchmark-disable", "-p", "no:cacheprovider"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert " passed" in out.stdout
