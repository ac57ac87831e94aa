#!/bin/bash
# Issue 4's "real effort" on the maps, on one GPU: variants of the shipped recipe (hidden 64, 32 bits, per-group
# attention-weight targets, 2 epochs of pydoc at 8K), each trained under the same time cap, then held-out recall
# of all of them beside the shipped maps and SimHash, then the suite (sparse everywhere, 2K/4K, 1/16 and 1/32,
# 2 samples: the prompts of bench/eval_gpu.py's pass 1) for each variant's policy 'hash'.
# On the device machine:  . bench/gpu_env.sh && bash bench/train_variants_gpu.sh $OUT [CAP_S] [STAGE] [ONLY]
# CAP_S: training seconds per variant (the shipped maps trained 168 s); STAGE: all (default), train (training),
# recall, eval (stages run on maps trained by an earlier call on the same machine, kept in /tmp/fv);
# ONLY: comma list of variant names to train (default all).
set -e
OUT=${1:-/tmp/out}; CAP=${2:-170}; STAGE=${3:-all}; ONLY=${4:-all}; mkdir -p $OUT /tmp/fv; L=$OUT/variants_log.txt
nvidia-smi --query-gpu=name --format=csv,noheader | tee -a $L
VARIANTS=(
  "h128 --hidden 128"
  "vnorm --hidden 64 --value-norm"
  "bits64 --hidden 64 --bits 64"
)
if [ "$STAGE" = all ] || [ "$STAGE" = train ]; then
  for v in "${VARIANTS[@]}"; do
    set -- $v; name=$1; shift
    [ "$ONLY" = all ] || [[ ",$ONLY," == *",$name,"* ]] || continue
    T0=$SECONDS
    python3 -m hashattention train --data pydoc --context 8192 --target group --score weight --epochs 2 \
      --max-seconds $CAP "$@" --out /tmp/fv/$name --dtype bfloat16 --quiet >> $L 2>&1 || echo "train $name failed" >> $L
    echo "train $name ($*): $((SECONDS - T0)) s wall" | tee -a $L
    cp /tmp/fv/$name.json $OUT/maps_$name.json 2>/dev/null || true
    cp /tmp/fv/$name.safetensors $OUT/maps_$name.safetensors 2>/dev/null || true
  done
fi
if [ "$STAGE" = all ] || [ "$STAGE" = recall ]; then
  maps=default; names=shipped
  for v in "${VARIANTS[@]}"; do set -- $v; [ -f /tmp/fv/$1.safetensors ] && maps=$maps,/tmp/fv/$1 && names=$names,$1; done
  python3 -m hashattention recall --maps $maps --names $names --context 8192 --sequences 2 --queries 64 \
    --json $OUT/recall_variants2.json --md $OUT/recall_variants2.md 2>>$L | tail -20
fi
if [ "$STAGE" = all ] || [ "$STAGE" = eval ]; then
  for v in "${VARIANTS[@]}"; do
    set -- $v; name=$1
    [ -f /tmp/fv/$name.safetensors ] || continue
    python3 -m hashattention eval --maps /tmp/fv/$name.safetensors --policies hash --budgets 1/16,1/32 \
      --lengths 2K,4K --modes everywhere --samples 2 --no-progress --out $OUT/eval_variant_$name.json >> $L 2>&1 \
      || echo "eval $name failed" >> $L
    grep -i "average" $OUT/eval_variant_$name.md | head -3 | tee -a $L || true
  done
fi
