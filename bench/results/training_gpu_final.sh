#!/bin/bash
# The GPU run that trained the shipped maps (after training_gpu_run.sh chose the variant group/weight):
# two epochs of the pydoc training split at 8K, then the acceptance checks (recall vs SimHash, passkey 1/16, 1/32).
# On the device machine: . bench/gpu_env.sh && bash bench/results/training_gpu_final.sh $OUT
set -e
OUT=${1:-/tmp/out}; mkdir -p $OUT; L=$OUT/training_final_log.txt
nvidia-smi --query-gpu=name --format=csv,noheader | tee -a $L
T0=$SECONDS
python3 -m hashattention train --data pydoc --context 8192 --hidden 64 --target group --score weight --epochs 2 \
  --out /tmp/fm/smollm2-135m-instruct --dtype bfloat16 --quiet >> $L 2>&1
cp /tmp/fm/smollm2-135m-instruct.safetensors /tmp/fm/smollm2-135m-instruct.json $OUT/
echo "train: $((SECONDS - T0)) s wall (model load + corpus + training)" >> $L
python3 -m hashattention recall --maps $OUT/smollm2-135m-instruct --names learned --context 8192 --sequences 2 \
  --queries 64 --json $OUT/recall_8k.json --md $OUT/recall_8k.md 2>>$L
for b in 16 32; do
  python3 -m hashattention demo --maps $OUT/smollm2-135m-instruct.safetensors --lengths 1024,2048,4096,8000 \
    --samples 4 --budget 1/$b --policies dense,hash,simhash,sink_window --json $OUT/passkey_1_$b.json 2>/dev/null >> $L \
    || echo "demo 1/$b failed" >> $L
done
