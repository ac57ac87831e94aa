#!/bin/bash
# The GPU run that trained and checked the shipped maps (one H100 call): three training variants with the same
# time budget, held-out recall of all three against SimHash, the best (mean 1/16 recall) becomes the shipped
# maps, then passkey at 1/16 and 1/32. Usage on the device machine: . bench/gpu_env.sh && bash <this> $OUT
set -e
OUT=${1:-/tmp/out}; SECS=${SECS:-45}; EPOCHS=${EPOCHS:-1}; M=/tmp/maps; mkdir -p $M $OUT
nvidia-smi --query-gpu=name --format=csv,noheader | tee -a $OUT/training_log.txt
for v in "group weight" "head weight" "group weight_vnorm"; do
  set -- $v
  T0=$SECONDS; python3 -m hashattention train --data pydoc --context 8192 --hidden 64 \
    --target $1 --score $2 --epochs $EPOCHS --max-seconds $SECS --out $M/$1_$2 --dtype bfloat16 --quiet >> $OUT/training_log.txt 2>&1
  echo "variant $1/$2: $((SECONDS - T0)) s wall (model load + corpus + training)" >> $OUT/training_log.txt
done
python3 -m hashattention recall --maps $M/group_weight,$M/head_weight,$M/group_weight_vnorm \
  --names group_weight,head_weight,group_weight_vnorm --context 8192 --sequences 2 --queries 64 \
  --json $OUT/recall_variants.json --md $OUT/recall_variants.md 2>>$OUT/training_log.txt
BEST=$(python3 -c "
import json; r=json.load(open('$OUT/recall_variants.json'))['results']
c={n: sum(r[n]['1/16']['recall']) for n in r if not n.startswith(('simhash','oracle'))}
print(max(c, key=c.get))")
echo "best: $BEST" | tee -a $OUT/training_log.txt
cp $M/$BEST.safetensors $OUT/smollm2-135m-instruct.safetensors
cp $M/$BEST.json $OUT/smollm2-135m-instruct.json
for b in 16 32; do
  python3 -m hashattention demo --maps $OUT/smollm2-135m-instruct.safetensors --lengths 1024,2048,4096,8000 \
    --samples 4 --budget 1/$b --policies dense,hash,simhash,sink_window --json $OUT/passkey_1_$b.json \
    >> $OUT/training_log.txt 2>&1 || echo "demo 1/$b failed" >> $OUT/training_log.txt
done
