#!/usr/bin/env bash
# On a lent GPU (an H200 here): what must run on CUDA, then its figures, in at most 8 minutes.
#     bash bench/gpu.sh [OUT_DIR]        # default: $OUT, else /tmp/minimind-gpu
# Parts, in this order, each under its own time limit and each writing its results the moment it ends
# (a part that hangs, as pytest once did at exit, loses nothing already written):
#   1 gpu_tests  tests that need CUDA (kernels, the model, op providers, decode CUDA graphs)    90 s
#   2 stages     every stage, resume, fp16, --compile, torchrun, no host syncs in the step,
#                then serve/chat/eval/export from the CUDA run (bench/gpu_stages.sh)          170 s
#   3 steps      training-step figures (each model x kernel provider)                          75 s
#   4 decode     decode batch 1: eager, CUDA graphs, transformers' generate(), the weights floor   45 s
#   5 kernels    kernel benchmarks (fwd_bwd, presets small and base, every provider)           50 s
# (430 s of limits, plus up to 10 s each to kill a part that ignores its limit)
# then summary.md, one table of what ran. Files in OUT_DIR (8 at most): env.txt, gpu_tests.log,
# stages.log, steps.jsonl, decode.jsonl, kernels.jsonl, parts.log, summary.md.
# On a machine without CUDA it says which parts it skipped and exits 0 in seconds.
# The machine's own python3 runs the working tree as it is (PYTHONPATH=.); liger-kernel is used if
# importable, and fastapi/uvicorn/openai (serve, decode) too, if carried as wheels in .whl/ (made by
# bench/gpu_wheels.sh on a machine with PyPI; the device tool carries .whl/ along).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-/tmp/minimind-gpu}}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
PY=${PYTHON:-python3}
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
PARTS="$OUT_DIR/parts.log"
: >"$PARTS"

part() {  # part NAME SECONDS COMMAND...: run it under its own limit; one line in parts.log when it ends
    local name=$1 limit=$2 start rc
    shift 2
    start=$(date +%s)
    echo "== $name (at most ${limit}s)"
    timeout --kill-after=10 "$limit" "$@"
    rc=$?
    local how="exit $rc"
    [ "$rc" = 124 ] || [ "$rc" = 137 ] && how="stopped at its ${limit}s limit"
    echo "$name: $how, $(( $(date +%s) - start ))s" | tee -a "$PARTS"
}

skip() {
    echo "$1: skipped ($2)" | tee -a "$PARTS"
}

if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    for name in gpu_tests stages steps decode kernels; do skip "$name" "no CUDA device"; done
    $PY bench/gpu_summary.py "$OUT_DIR" >"$OUT_DIR/summary.md" && cat "$OUT_DIR/summary.md"
    exit 0
fi

# the machine has no network: what the serving checks and the liger peer need comes as wheels in .whl/
if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/minimind-site \
        .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/minimind-site"
fi
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    $PY -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__)"
    $PY -c "import liger_kernel" 2>/dev/null && echo "liger-kernel: yes" || echo "liger-kernel: not installed"
    date -u +"%Y-%m-%d %H:%M UTC"
} >"$OUT_DIR/env.txt" 2>&1
cat "$OUT_DIR/env.txt"

XDIST=$($PY -c "import xdist" 2>/dev/null && echo "-n 4")
# shellcheck disable=SC2086
part gpu_tests 90 $PY -m pytest -q -p no:cacheprovider $XDIST tests/test_kernels_gpu.py tests/test_engine_graphs.py \
    >"$OUT_DIR/gpu_tests.log" 2>&1
tail -3 "$OUT_DIR/gpu_tests.log"

part stages 170 bash bench/gpu_stages.sh "$OUT_DIR/stages.log"

export MINIMIND_BENCH_STREAM="$OUT_DIR/steps.jsonl"
part steps 75 $PY -m pytest -q -p no:cacheprovider bench/bench_kernels.py -k train_step --benchmark-columns=mean,rounds

if $PY -c "import fastapi, openai, uvicorn" 2>/dev/null; then
    export MINIMIND_BENCH_STREAM="$OUT_DIR/decode.jsonl"
    export MINIMIND_BENCH_DECODE=engine_eager,engine_graphs,transformers,weights_floor  # no compile: its warm-up
    part decode 45 $PY -m pytest -q -p no:cacheprovider bench/bench_infer.py -k "decode_batch1 and not interleaved"
else
    skip decode "fastapi/openai/uvicorn not installed (carry them in .whl/)"
fi

export MINIMIND_BENCH_STREAM="$OUT_DIR/kernels.jsonl"
export MINIMIND_BENCH_PRESETS=small,base
part kernels 50 $PY -m pytest -q -p no:cacheprovider bench/bench_kernels.py \
    -k "fwd_bwd or copy" --benchmark-columns=mean,rounds

$PY bench/gpu_summary.py "$OUT_DIR" >"$OUT_DIR/summary.md"
cat "$OUT_DIR/summary.md"
