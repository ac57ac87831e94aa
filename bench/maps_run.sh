#!/usr/bin/env bash
# Issue 24's GPU runs of maps variants in two calls (a call may last 10 minutes), on the device machine after
# `. bench/gpu_env.sh`. The maps stay in runs/maps (ignored, so kept between calls while the machine is warm) and
# come back in $OUT, each in two parts (joined with `cat`).
#   bash bench/maps_run.sh train $OUT SECONDS "NAME ARGS..." ["NAME ARGS..." ...]
#       trains the variants side by side (`hashattention train --model default --context 8192` + ARGS, at most
#       three at once: more ran an 80 GB card out of memory beside the suite)
#   bash bench/maps_run.sh eval $OUT DEADLINE NAME [NAME ...]
#       the context mode at 1/32 on the suite's prompts ($SAMPLES, default 48, per task and length; the first of
#       big48's prompts), each maps file paired with the
#       dense records of the committed run `big48` (quality_context_h100_big.json: the same prompts, so dense runs
#       once, and its hash-sum rows are the shipped maps' on the same prompts)
set -u
CMD=${1:?train or eval}; OUT=${2:?out dir}; shift 2
M=runs/maps; W=runs/mq; mkdir -p $M $W
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
if [ "$CMD" = train ]; then
  SECS=${1:?seconds}; shift
  for v in "$@"; do
    set -- $v; n=$1; shift
    python3 -m hashattention train --model default --context 8192 --epochs 4 --max-seconds $SECS --dtype bfloat16 \
      --quiet --out $M/$n "$@" > $W/train_$n.log 2>&1 &
  done
  wait
  for f in $M/*.json; do python3 - "$f" <<'PY'
import json, sys
x = json.load(open(sys.argv[1]))["config"]["extra"]
print(sys.argv[1], {k: x.get(k) for k in ("steps", "seconds", "final_loss", "heldout_recall_1_16", "command")})
PY
  done
  for f in $M/*.safetensors; do n=$(basename $f .safetensors); (cd $M && split -n 2 $n.safetensors $OUT/$n.st.part_); done
  cp $M/*.json $OUT/ 2>/dev/null; tail -n 3 $W/train_*.log
elif [ "$CMD" = eval ]; then
  DEADLINE=${1:?deadline}; shift
  python3 - $W/quality_context_big48.json <<'PY'
import json, sys
d = json.load(open("bench/results/quality_context_h100_big.json"))["bundle"]["big48"]
d.pop("summary", None)
json.dump(d, open(sys.argv[1], "w"))
PY
  P=(--pass "mode=context;policies=dense,hash-sum;budgets=1/32;samples=48;round=8;tag=big48")
  for n in "$@"; do
    P+=(--pass "mode=context;policies=hash-sum;budgets=1/32;samples=${SAMPLES:-48};round=8;maps=$M/$n.safetensors;tag=$n")
  done
  python3 -m hashattention eval --work $W --deadline $DEADLINE "${P[@]}" 2>&1 | grep -v Convert
  tar czf $OUT/mq.tgz -C $W .
fi
ls -la $OUT
