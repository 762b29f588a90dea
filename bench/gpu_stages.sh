#!/usr/bin/env bash
# Part 2 of bench/gpu.sh: everything a user runs, on CUDA, for a few steps (the 2026-12-04 run crashed at
# step 1 of every stage): every stage; a resume; fp16 with accumulation; --compile; torchrun; the step
# without host syncs (bench/sync_check.py); then from the CUDA-trained run: generation, `minimind serve`
# through the openai client, chat, eval and export; and checkpoints crossing devices both ways.
# One line per check in LOG as it ends: "ok NAME Ns" or "FAILED NAME (exit N)" with the error's last
# lines. Checks that do not depend on each other run at once (the card and 16 cores have room), in
# three waves: the data and a pretrain run; what needs only that run (an SFT run among them); what
# needs the SFT run.
#     bash bench/gpu_stages.sh LOG
set -uo pipefail
LOG=$1
PY=${PYTHON:-python3}
W=$(mktemp -d)
: >"$LOG"
check() {  # check NAME COMMAND...
    local name=$1 start rc line
    shift
    start=$(date +%s)
    "$@" >"$W/$name.out" 2>&1
    rc=$?
    if [ "$rc" = 0 ]; then
        line="ok $name $(( $(date +%s) - start ))s"
    else
        line="FAILED $name (exit $rc)
$(tail -5 "$W/$name.out" | sed 's/^/    /')"
    fi
    echo "$line" >>"$LOG"
    echo "$line"
}
DEVICE=${DEVICE:-cuda}  # the CPU test runs the same checks with DEVICE=cpu
MM="$PY -m minimind.cli"
FAST="--max-steps 4 --save-every 2 --log-every 2 --batch-size 4 --seq-len 128"
T="$PY train.py --device $DEVICE $FAST"
PRE="--stage pretrain --model tiny --data $W/data/pretrain.jsonl --tokenizer $W/tok"

# wave 1: data, tokenizer, a pretrain run
check synth $MM synth --out "$W/data" --scale 0.1
check tokenizer $MM tokenizer --input "$W/data/pretrain.jsonl" "$W/data/sft.jsonl" --out "$W/tok"
check pretrain $T $PRE --out "$W/pre"

# wave 2: what needs only the pretrain run
resume() { cp -r "$W/pre" "$W/pre_r" && $T $PRE --out "$W/pre_r" --resume --max-steps 6; }
cpu_to_cuda() {  # trained on the CPU, generates on $DEVICE
    $PY train.py --device cpu $FAST $PRE --out "$W/pre_cpu" --max-steps 2 && $PY -c "
import sys
from infer.engine import Engine, SamplingParams
e = Engine.from_checkpoint(sys.argv[1], device=sys.argv[2])
print(e.generate([e.tokenizer.encode('1 + 1 =')], SamplingParams(max_new_tokens=8))[0].text)" "$W/pre_cpu" "$DEVICE"
}
check pretrain_resume resume &
check pretrain_accum_fp16 $T $PRE --out "$W/pre16" --grad-accum 2 --dtype float16 &
check pretrain_compile $T $PRE --out "$W/prec" --compile &
[ "$DEVICE" = cuda ] && check pretrain_compile_graphs $T $PRE --out "$W/precg" --compile --compile-mode reduce-overhead &
check torchrun $PY -m torch.distributed.run --standalone --nproc_per_node 1 train.py --device "$DEVICE" $FAST $PRE \
    --out "$W/pre_ddp" &
check cpu_to_cuda cpu_to_cuda &
check sft $T --stage sft --init "$W/pre" --data "$W/data/sft.jsonl" --out "$W/sft"
wait

# wave 3: what needs the SFT run
SYNC="--device $DEVICE --batch-size 4 --seq-len 128"
sync_free() {
    $PY bench/sync_check.py -- --stage pretrain $SYNC $PRE --out "$W/s1" \
        :: --stage pretrain $SYNC $PRE --out "$W/s2" --dtype float16 --grad-accum 2 --optim adamw \
        :: --stage sft $SYNC --init "$W/sft" --data "$W/data/sft.jsonl" --out "$W/s3" \
        :: --stage lora $SYNC --init "$W/sft" --data "$W/data/lora_identity.jsonl" --out "$W/s4" \
        :: --stage dpo $SYNC --init "$W/sft" --data "$W/data/dpo.jsonl" --out "$W/s5" \
        :: --stage distill $SYNC --init "$W/sft" --teacher "$W/sft" --data "$W/data/sft.jsonl" --out "$W/s6" \
        :: --stage reason $SYNC --init "$W/sft" --data "$W/data/reason.jsonl" --out "$W/s7" \
        :: --stage pretrain $SYNC $PRE --set use_moe=true --out "$W/s8" \
        :: --stage pretrain $SYNC $PRE --optim adamw --out "$W/s9"
}
dpo_distill() {
    $T --stage dpo --init "$W/sft" --data "$W/data/dpo.jsonl" --out "$W/dpo" \
        && $T --stage distill --init "$W/sft" --teacher "$W/dpo" --data "$W/data/sft.jsonl" --out "$W/distill"
}
reason_grpo() {
    $T --stage reason --init "$W/sft" --data "$W/data/reason.jsonl" --out "$W/reason" \
        && $T --stage grpo --init "$W/reason" --data "$W/data/rlaif.jsonl" --out "$W/grpo" --max-steps 2
}
chat() { printf 'What is 1 + 1?\n/exit\n' | $MM chat --ckpt "$W/sft" --device "$DEVICE" --max-new-tokens 16; }
eval_ppl() { head -50 "$W/data/pretrain.jsonl" >"$W/val.jsonl" && $MM eval ppl --ckpt "$W/sft" --data "$W/val.jsonl" \
    --device "$DEVICE" --seq-len 128 --batch-size 4; }
check lora $T --stage lora --init "$W/sft" --data "$W/data/lora_identity.jsonl" --out "$W/lora" &
check dpo_distill dpo_distill &
check reason_grpo reason_grpo &
check sync_free sync_free &
check generate $PY -c "
import sys
from infer.engine import Engine, SamplingParams
e = Engine.from_checkpoint(sys.argv[1], device=sys.argv[2])
out = e.generate([e.tokenizer.encode('1 + 1 =')], SamplingParams(max_new_tokens=16))
print(out[0].text)" "$W/sft" "$DEVICE" &
check load_on_cpu $PY -c "
import sys
from minimind.checkpoint import load_checkpoint
load_checkpoint(sys.argv[1], device='cpu')" "$W/sft" &
check serve $PY bench/serve_check.py "$W/sft" "$DEVICE" &
check chat chat &
check eval_ppl eval_ppl &
check export $MM export --ckpt "$W/sft" --out "$W/hf" &
wait
grep -E "^(ok|SYNC|FAILED) " "$W/sync_free.out" | sed 's/^/    sync_check: /' >>"$LOG" 2>/dev/null
rm -rf "$W"
! grep -q FAILED "$LOG"
