#!/usr/bin/env bash
# Part 2 of bench/gpu.sh: every training stage runs on CUDA for a few steps (the 2026-12-04 run crashed
# at step 1 of every stage), then a resume and a generation from a CUDA-trained checkpoint. One line per
# check in LOG as it ends: "ok NAME Ns" or "FAILED NAME (exit N)" with the error's last lines.
#     bash bench/gpu_stages.sh LOG
set -uo pipefail
LOG=$1
PY=${PYTHON:-python3}
W=$(mktemp -d)
: >"$LOG"
check() {  # check NAME COMMAND...
    local name=$1 start rc
    shift
    start=$(date +%s)
    "$@" >"$W/$name.out" 2>&1
    rc=$?
    if [ "$rc" = 0 ]; then
        echo "ok $name $(( $(date +%s) - start ))s" >>"$LOG"
    else
        { echo "FAILED $name (exit $rc)"; tail -5 "$W/$name.out" | sed 's/^/    /'; } >>"$LOG"
    fi
    tail -1 "$LOG"
}
DEVICE=${DEVICE:-cuda}  # the CPU test runs the same checks with DEVICE=cpu
T="$PY train.py --device $DEVICE --max-steps 4 --save-every 2 --log-every 2 --batch-size 4 --seq-len 128"
check synth $PY -m minimind.cli synth --out "$W/data" --scale 0.1
check tokenizer $PY -m minimind.cli tokenizer --input "$W/data/pretrain.jsonl" "$W/data/sft.jsonl" --out "$W/tok"
check pretrain $T --stage pretrain --model tiny --data "$W/data/pretrain.jsonl" --tokenizer "$W/tok" --out "$W/pre"
check pretrain_resume $T --stage pretrain --model tiny --data "$W/data/pretrain.jsonl" --tokenizer "$W/tok" \
    --out "$W/pre" --resume --max-steps 6
check pretrain_accum_fp16 $T --stage pretrain --model tiny --data "$W/data/pretrain.jsonl" --tokenizer "$W/tok" \
    --out "$W/pre16" --grad-accum 2 --dtype float16
check sft $T --stage sft --init "$W/pre" --data "$W/data/sft.jsonl" --out "$W/sft"
check lora $T --stage lora --init "$W/sft" --data "$W/data/lora_identity.jsonl" --out "$W/lora"
check dpo $T --stage dpo --init "$W/sft" --data "$W/data/dpo.jsonl" --out "$W/dpo"
check distill $T --stage distill --init "$W/sft" --teacher "$W/dpo" --data "$W/data/sft.jsonl" --out "$W/distill"
check reason $T --stage reason --init "$W/sft" --data "$W/data/reason.jsonl" --out "$W/reason"
check grpo $T --stage grpo --init "$W/reason" --data "$W/data/rlaif.jsonl" --out "$W/grpo" --max-steps 2
check generate $PY -c "
import sys
from infer.engine import Engine, SamplingParams
e = Engine.from_checkpoint(sys.argv[1], device=sys.argv[2])
out = e.generate([e.tokenizer.encode('1 + 1 =')], SamplingParams(max_new_tokens=16))
print(out[0].text)" "$W/sft" "$DEVICE"
check load_on_cpu $PY -c "
import sys
from minimind.checkpoint import load_checkpoint
load_checkpoint(sys.argv[1], device='cpu')" "$W/sft"
rm -rf "$W"
! grep -q FAILED "$LOG"
