"""bench/gpu.sh, the script a lent GPU runs, checked where a CPU can check it: it skips every part by
name and exits 0 without CUDA; its stage checks (bench/gpu_stages.sh) pass on the CPU device; each
benchmark streams its figures the moment it ends; the summary table survives partial results."""

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

PARTS = ("gpu_tests", "stages", "steps", "decode", "kernels")


def test_gpu_sh_without_cuda_names_each_skipped_part_and_exits_0(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), str(tmp_path)], capture_output=True, text=True,
                         env=env, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    for part in PARTS:
        assert f"{part}: skipped (no CUDA device)" in out.stdout
    assert "## Parts" in (tmp_path / "summary.md").read_text()


def test_every_stage_check_of_gpu_sh_passes_on_the_cpu(tmp_path):
    log = tmp_path / "stages.log"
    env = {**os.environ, "PYTHON": sys.executable, "DEVICE": "cpu",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    out = subprocess.run(["bash", str(ROOT / "bench" / "gpu_stages.sh"), str(log)], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=600)
    lines = log.read_text().splitlines()
    assert out.returncode == 0, log.read_text()
    names = {line.split()[1] for line in lines if line.startswith("ok ")}
    assert names == {"synth", "tokenizer", "pretrain", "pretrain_resume", "pretrain_accum_fp16", "pretrain_compile",
                     "torchrun", "cpu_to_cuda", "sft", "lora", "dpo_distill", "reason_grpo", "sync_free", "generate",
                     "load_on_cpu", "serve", "chat", "eval_ppl", "export"}
    # the step check ran every group it was given (without CUDA it cannot see syncs, and says so)
    assert sum("syncs were not checked" in line for line in lines) == 9, log.read_text()


def test_a_benchmark_streams_its_figures_as_it_ends(tmp_path):
    stream = tmp_path / "kernels.jsonl"
    env = {**os.environ, "MINIMIND_BENCH_SMOKE": "1", "MINIMIND_BENCH_STREAM": str(stream)}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "bench/bench_kernels.py",
                          "-k", "rmsnorm and ref and fwd_bwd"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout[-2000:]
    rows = [json.loads(line) for line in stream.read_text().splitlines()]
    assert {r["op"] for r in rows} == {"rmsnorm", "add_rmsnorm"}
    assert all(r["mean_s"] > 0 and r["provider"] == "ref" for r in rows)


def test_the_summary_takes_what_the_parts_left(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from gpu_summary import summary
    finally:
        sys.path.pop(0)
    (tmp_path / "parts.log").write_text("gpu_tests: exit 0, 40s\nkernels: stopped at its 55s limit, 65s\n")
    rows = [{"name": "test_copy_bandwidth", "mean_s": 1e-3, "gb_per_s": 4000.0},
            {"name": "k1", "mean_s": 2e-3, "op": "rmsnorm", "preset": "small", "mode": "fwd_bwd", "provider": "ref",
             "gb_per_s": 1000.0, "peak_mib": 3.0},
            {"name": "k2", "mean_s": 1e-3, "op": "rmsnorm", "preset": "small", "mode": "fwd_bwd",
             "provider": "triton", "gb_per_s": 2000.0, "peak_mib": 2.0}]
    (tmp_path / "kernels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"name": "torn')
    text = summary(tmp_path)
    assert "kernels: stopped at its 55s limit" in text
    assert "| rmsnorm | small | fwd_bwd | triton | 1.000 | 2000.0 (50%) | 2.0 | 2.00x |" in text
    assert "Training step" not in text  # no steps.jsonl: no table, not a broken one
    (tmp_path / "steps.jsonl").write_text(json.dumps({"name": "s", "mean_s": 0.0131, "model": "small",
                                                      "kernels": "triton", "batch": "32x512",
                                                      "tokens_per_s": 1_250_000}) + "\n")
    assert "| small | triton | 32x512 | 13.1 | 1250000 | 2.08x | >= 1.2M tokens/s |" in summary(tmp_path)
