#!/bin/bash
# One device session on an H200 (2026-11-29), in stages that each fit one `run` call (<= 10 min):
#   decode  issue 6: dense vs HashAttention decode, Llama-3.1-8B shape, 64K/128K, batch 1 and the largest batch
#   tests   the library kernels and the engine (hash mode now runs the library kernels) on the GPU
#   default the engine's tokens against Hugging Face on the default model (needs the GGUF: . bench/gpu_env.sh)
#   train   issue 4: maps with the paper's hidden width 128, trained longer than the 170 s variant run
#   eval    held-out recall of those maps beside the shipped ones, then the suite for them (same prompts as
#           bench/eval_gpu.py: sparse everywhere at every budget, then sparse decoding only)
# On the device machine:  . bench/gpu_env.sh && bash bench/h200_gpu.sh STAGE $OUT [TRAIN_SECONDS]
set -e
STAGE=$1; OUT=${2:-/tmp/out}; CAP=${3:-280}; mkdir -p $OUT /tmp/fv; L=$OUT/h200_log.txt
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a $L
case $STAGE in
decode)
  python3 -m hashattention bench decode --models llama-3.1-8b --contexts 64K,128K --batches 1,max --steps 24 \
    --time-limit 420 --out $OUT --tag h200 2>&1 | grep -v "it/s\]" | tee -a $L ;;
tests)
  python3 -m pytest -q tests/test_kernels.py tests/test_engine.py 2>&1 | tail -15 | tee -a $L ;;
default)
  python3 -m hashattention bench decode --models default --contexts 16K --batches 1 --steps 16 --check-tokens 32 \
    --out $OUT --tag h200-default 2>&1 | grep -v "it/s\]" | tail -25 | tee -a $L ;;
train)
  python3 -m hashattention train --data pydoc --context 8192 --target group --score weight --epochs 4 \
    --max-seconds $CAP --hidden 128 --out /tmp/fv/h128 --dtype bfloat16 --quiet 2>&1 | grep -v "it/s\]" | tee -a $L
  cp /tmp/fv/h128.json /tmp/fv/h128.safetensors $OUT/ ;;
eval)
  python3 -m hashattention recall --maps default,/tmp/fv/h128 --names shipped,h128 --context 8192 --sequences 2 \
    --queries 64 --json $OUT/recall_h128.json --md $OUT/recall_h128.md 2>>$L | tail -12 | tee -a $L
  python3 -m hashattention eval --maps /tmp/fv/h128.safetensors --policies hash --budgets 1/4,1/8,1/16,1/32 \
    --lengths 2K,4K,8K --modes everywhere --samples 2 --no-progress --out $OUT/eval_h128_everywhere.json >> $L 2>&1
  python3 -m hashattention eval --maps /tmp/fv/h128.safetensors --policies hash --decode-budgets 1/16,1/32 \
    --lengths 2K,4K,8K --modes decode --samples 2 --no-progress --out $OUT/eval_h128_decode.json >> $L 2>&1
  grep -h "| hash" $OUT/eval_h128_*.md | tee -a $L ;;
esac
