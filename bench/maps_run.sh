#!/usr/bin/env bash
# Issue 24's GPU runs of maps variants in two calls (a call may last 10 minutes), on the device machine after
# `. bench/gpu_env.sh`. The maps stay in runs/maps (ignored, so kept between calls while the machine is warm) and
# come back in $OUT, each in two parts (joined with `cat`); the rest comes back as tarballs.
#   bash bench/maps_run.sh train $OUT SECONDS "NAME ARGS..." ["NAME ARGS..." ...]
#       trains the variants side by side (`hashattention train --model default --context 8192` + ARGS, at most
#       three at once on an 80 GB card; an eval beside them ran it out of memory). SECONDS counts training steps
#       only: building 3000 retrieval questions (`--questions`) takes about 150 s more before the first step.
#   bash bench/maps_run.sh eval $OUT DEADLINE NAME [NAME ...]     (NAME `shipped`: the package's maps)
#       one process, passes in this order: the context mode at 1/32 on big48's prompts ($SAMPLES, default 48, per
#       task and length) for each maps file, paired with the dense records of the committed run `big48`
#       (quality_context_h100_big.json: the same prompts, so dense runs once, and its hash-sum rows are the
#       `pydoc` maps'); then every query sparse at 1/16 and 1/32 with perplexity (ppl=2) on the prompts of
#       the committed quality_everywhere_h100.json, whose dense records and perplexities are reused likewise.
#       (Two eval processes side by side need about 45 GB each at 8K.)
set -u
CMD=${1:?train or eval}; OUT=${2:?out dir}; shift 2
M=runs/maps; W=runs/mq; mkdir -p $M $W
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
seed() {  # seed OUT.json FILE [MEMBER]: a committed results file (or a bundle's member), summary dropped
  python3 - "$@" <<'PY'
import json, sys
d = json.load(open(sys.argv[2]))
d = d["bundle"][sys.argv[3]] if len(sys.argv) > 3 else d
d.pop("summary", None)
json.dump(d, open(sys.argv[1], "w"))
PY
}
if [ "$CMD" = train ]; then
  SECS=${1:?seconds}; shift
  for v in "$@"; do
    set -- $v; n=$1; shift
    python3 -m hashattention train --model default --context 8192 --epochs 4 --max-seconds $SECS --dtype bfloat16 \
      --quiet --out $M/$n "$@" > $W/train_$n.log 2>&1 &
  done
  wait
  for f in $M/*.safetensors; do n=$(basename $f .safetensors); (cd $M && split -n 2 $n.safetensors $OUT/$n.st.part_); done
  tar czf $OUT/train.tgz $M/*.json $W/train_*.log; tail -c 700 $W/train_*.log
elif [ "$CMD" = eval ]; then
  DEADLINE=${1:?deadline}; shift
  E=$W/e; mkdir -p $E
  seed $E/quality_context_big48.json bench/results/quality_context_h100_big.json big48
  seed $E/quality_everywhere_ew.json bench/results/quality_everywhere_h100.json
  maps() { [ "$1" = shipped ] && echo hashattention/data/smollm2-135m-instruct.safetensors || echo $M/$1.safetensors; }
  P=(--pass "mode=context;policies=dense,hash-sum;budgets=1/32;samples=48;round=8;tag=big48")
  for n in "$@"; do
    P+=(--pass "mode=context;policies=hash-sum;budgets=1/32;samples=${SAMPLES:-48};round=8;maps=$(maps $n);tag=$n")
  done
  P+=(--pass "mode=everywhere;policies=dense,hash;budgets=1/16,1/32;samples=8;round=4;ppl=2;tag=ew")
  for n in "$@"; do
    P+=(--pass "mode=everywhere;policies=hash;budgets=1/16,1/32;samples=8;round=4;ppl=2;maps=$(maps $n);tag=$n")
  done
  # the call's limit kills what runs past it: stop the eval first so that its files come back
  timeout $((${DEADLINE%.*} + 80)) python3 -m hashattention eval --work $E --deadline $DEADLINE "${P[@]}" > $OUT/eval.log 2>&1
  tar czf $OUT/eval.tgz $E; grep -v Convert $OUT/eval.log | tail -n 40
fi
ls -la $OUT
