#!/usr/bin/env bash
# On a lent GPU (an H200 here; see the device notes in DEVELOPERS.md): the GPU kernel tests, the kernel
# benchmarks (fwd_bwd, hidden 512 and 768, every provider), the copy-bandwidth ceiling and the
# training-step benchmark, then one short table. About 8 minutes; run from anywhere:
#     bash bench/gpu.sh [OUT_DIR]        # logs, bench.json and table.md land in OUT_DIR
# The machine's own python3 (torch, triton, pytest, pytest-benchmark) runs the working tree as it is
# (PYTHONPATH=.). liger-kernel is used if importable or carried as a wheel in .whl/, else skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-/tmp/minimind-gpu}}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" TRITON_INTERPRET=0 PYTHONUNBUFFERED=1

if ! $PY -c "import liger_kernel" 2>/dev/null; then
    if ls .whl/liger_kernel-*.whl >/dev/null 2>&1; then
        $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/liger-site .whl/liger_kernel-*.whl \
            && export PYTHONPATH="$PYTHONPATH:/tmp/liger-site"
    fi
    $PY -c "import liger_kernel" 2>/dev/null || echo "liger-kernel is not installed: the liger provider is skipped"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__)"

echo "== GPU kernel tests"
timeout 200 $PY -m pytest -q -p no:cacheprovider tests/test_kernels_gpu.py 2>&1 | tee "$OUT_DIR/gpu_tests.log" | tail -8

# two runs with their own time limits, so one that overruns still leaves the other's figures
echo "== kernel benchmarks"
MINIMIND_BENCH_PRESETS=small,base timeout 300 $PY -m pytest -q -p no:cacheprovider bench/bench_kernels.py \
    -k "fwd_bwd or copy" --benchmark-json="$OUT_DIR/bench_kernels.json" --benchmark-columns=mean,rounds \
    >"$OUT_DIR/bench_kernels.log" 2>&1
tail -2 "$OUT_DIR/bench_kernels.log"
echo "== training-step benchmarks"
timeout 180 $PY -m pytest -q -p no:cacheprovider bench/bench_kernels.py -k train_step \
    --benchmark-json="$OUT_DIR/bench_steps.json" --benchmark-columns=mean,rounds >"$OUT_DIR/bench_steps.log" 2>&1
tail -2 "$OUT_DIR/bench_steps.log"

$PY - "$OUT_DIR"/bench_kernels.json "$OUT_DIR"/bench_steps.json <<'PYEOF' | tee "$OUT_DIR/table.md"
import json, os, sys
from collections import defaultdict
runs = [b for path in sys.argv[1:] if os.path.exists(path) for b in json.load(open(path))["benchmarks"]]
copy = next((b["extra_info"].get("gb_per_s") for b in runs if b["name"].startswith("test_copy")), None)
print(f"device-to-device copy: {copy} GB/s\n")
rows = defaultdict(dict)
for b in runs:
    e = b["extra_info"]
    if "op" in e:
        rows[(e["op"], e["preset"])][e["provider"]] = (b["stats"]["mean"] * 1e3, e.get("gb_per_s"), e.get("tflops"), e.get("peak_mib"))
print("| op (fwd_bwd) | preset | provider | ms | GB/s (% copy) or TFLOP/s | peak MiB | vs ref | vs compile | vs liger |")
print("|---|---|---|---|---|---|---|---|---|")
for (op, preset), by in sorted(rows.items()):
    for prov, (ms, gbs, tfl, peak) in sorted(by.items()):
        rate = f"{gbs} ({100 * gbs / copy:.0f}%)" if gbs and copy else f"{tfl} TFLOP/s"
        rel = lambda other: f"{by[other][0] / ms:.2f}x" if other in by else "-"
        print(f"| {op} | {preset} | {prov} | {ms:.3f} | {rate} | {peak} | {rel('ref')} | {rel('compile')} | {rel('liger')} |")
steps = [b for b in runs if b["name"].startswith("test_train_step")]
if steps:
    print("\n| training step (bf16 autocast) | kernels | ms | tokens/s |")
    print("|---|---|---|---|")
    for b in sorted(steps, key=lambda b: b["name"]):
        e = b["extra_info"]
        print(f"| {e['model']} | {e['kernels']} | {b['stats']['mean'] * 1e3:.1f} | {e['tokens_per_s']} |")
PYEOF
