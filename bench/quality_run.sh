#!/usr/bin/env bash
# Issue 24's GPU run, one call: the default model's maps trained further in the background while the group
# selections are compared in the context mode (shipped maps); then the kernel-backed selection (sum or max)
# that held dense quality best is measured sparse everywhere with perplexity, and the trained maps in the
# context mode, on the same prompts. On the device machine:
#   . bench/gpu_env.sh && bash bench/quality_run.sh $OUT [train_seconds] [deadline]
# Writes $OUT/quality.tgz (results JSON/MD/PNG, logs, the trained maps' .json) and each trained maps file in
# two parts ($OUT/<name>.safetensors.part_a[a|b], joined with `cat`).
set -u
OUT=${1:?out dir}; TRAIN=${2:-200}; DEADLINE=${3:-560}
W=/tmp/quality; T=/tmp/train; mkdir -p $W $T
T0=$(date +%s)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
train() {  # name, extra args
  local n=$1; shift
  python3 -m hashattention train --model default --data pydoc --context 8192 --score weight --epochs 4 \
    --max-seconds $TRAIN --dtype bfloat16 --init shipped --seed 1 --quiet --out $T/$n "$@" > $W/train_$n.log 2>&1 &
}
train long_group --target group
train long_head --target head
train task_group --target group --finetune-passkey 600
timeout 200 python3 tests/gpu_generate_check.py > $W/gpu_generate_check.log 2>&1 &   # issue 26: generate on the GPU
A="policies=dense,oracle,hash-sum,hash-max,hash-union,hash-head;budgets=1/32,1/64,1/16;samples=12;round=4"
python3 -m hashattention eval --work $W --deadline $((TRAIN + 15)) --pass "mode=context;$A" 2>&1 | tee $W/pass_a.log
wait
ls -la $T
SEL=$(python3 - <<'PY'
import json
rows = json.load(open("/tmp/quality/quality_summary.json"))
def mean(sel):  # the context mode's delta at 1/32 and 1/64
    d = [r["delta_vs_dense"] for r in rows if r["mode"] == "context" and r["policy"] == f"hash-{sel}"
         and r["budget"] in ("1/32", "1/64")]
    return sum(d) / len(d) if d else float("-inf")
print(max(("sum", "max"), key=mean))
PY
)
echo "selection for the everywhere mode: $SEL" | tee $W/chosen.txt
LEFT=$((DEADLINE - $(date +%s) + T0 - 25))
M="policies=dense,hash-sum,hash-max;budgets=1/32,1/64;samples=12;round=4"
python3 -m hashattention eval --work $W --deadline $LEFT --pass "mode=context;$A" \
  --pass "mode=everywhere;policies=dense,oracle,hash-$SEL;budgets=1/16,1/32;samples=2;round=2;ppl=2" \
  --pass "mode=context;$M;maps=$T/long_group.safetensors;tag=long_group" \
  --pass "mode=context;$M;maps=$T/long_head.safetensors;tag=long_head" \
  --pass "mode=context;$M;maps=$T/task_group.safetensors;tag=task_group" 2>&1 | tee $W/pass_b.log
cp $T/*.json $W/ 2>/dev/null
tar czf $OUT/quality.tgz -C $W .
for n in long_group long_head task_group; do
  [ -f $T/$n.safetensors ] && (cd $T && split -n 2 $n.safetensors $OUT/$n.safetensors.part_)
done
ls -la $OUT
