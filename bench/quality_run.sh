#!/usr/bin/env bash
# Issue 24's GPU run: maps trained further (in the background) while the selections are compared in the
# context mode, then the trained maps evaluated on the same prompts. On the device machine:
#   . bench/gpu_env.sh && bash bench/quality_run.sh $OUT [train_seconds] [deadline]
# Writes $OUT/quality.tgz (results JSON/MD/PNG, logs) and each trained maps file split in two parts
# ($OUT/<name>.safetensors.part_a[a|b]; the .json in the archive), joined again with `cat`.
set -u
OUT=${1:?out dir}; TRAIN=${2:-240}; DEADLINE=${3:-450}
W=/tmp/quality; T=/tmp/train; mkdir -p $W $T
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
train() {  # name, extra args
  local n=$1; shift
  python3 -m hashattention train --model default --data pydoc --context 8192 --score weight --epochs 4 \
    --max-seconds $TRAIN --dtype bfloat16 --init shipped --seed 1 --quiet --out $T/$n "$@" > $W/train_$n.log 2>&1 &
}
train long_group --target group
train long_head --target head
train task_group --target group --finetune-passkey 600
P="policies=dense,oracle,hash-sum,hash-max,hash-union,hash-head;budgets=1/32,1/64,1/16;samples=12;round=4"
python3 -m hashattention eval --work $W --deadline $((TRAIN + 30)) --pass "mode=context;$P" 2>&1 | tee $W/pass_a.log
wait
ls -la $T
M="policies=dense,hash-sum,hash-max;budgets=1/32,1/64;samples=12;round=4"
python3 -m hashattention eval --work $W --deadline $((DEADLINE - TRAIN - 60)) --pass "mode=context;$P" \
  --pass "mode=context;$M;maps=$T/long_group.safetensors;tag=long_group" \
  --pass "mode=context;$M;maps=$T/long_head.safetensors;tag=long_head" \
  --pass "mode=context;$M;maps=$T/task_group.safetensors;tag=task_group" 2>&1 | tee $W/pass_b.log
cp $T/*.json $W/ 2>/dev/null
tar czf $OUT/quality.tgz -C $W .
for n in long_group long_head task_group; do
  [ -f $T/$n.safetensors ] && (cd $T && split -n 2 $n.safetensors $OUT/$n.safetensors.part_)
done
ls -la $OUT
