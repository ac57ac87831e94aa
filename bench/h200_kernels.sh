#!/bin/bash
# Issue 5 on an H200 (2026-11-29, session 5): kernel tests compiled on the GPU, then the attention benchmark.
#   quick  tests + kernel-1/kernel-2 sweeps + batch 1 and 8 at 16K/128K/512K, 1/32 (side by side with SDPA)
#   full   the whole table (16K..512K, batch 1 and 8, 1/8 1/16 1/32, group and head)
#   ab     bench/kernel_ab.py (launch options side by side), then Nsight Compute on the 512K case
#   sass   Nsight Compute of the 512K step: sections of count + emit, then count's per-instruction (SASS)
#          counters as CSV, summarised by bench/ncu_top_sass.py (session 6: ncu_h200_s6.txt, ncu_count_sass_h200_s6.csv);
#          since session 13 the emit step's too, and the pipe and memory sections
#   abq    the kernel tests (time-boxed: a grid barrier that never opens must not eat the session), then
#          bench/kernel_ab.py
#   t39    (after bench/triton39_env.sh unpacked Triton 3.9 into $TRITON39) the kernel tests under Triton 3.9, then
#          bench/kernel_ab.py under 3.6, 3.9, 3.6, 3.9 (one Triton per process), kernel times included
#   pf     (Triton 3.9 unpacked, as for t39) the selection tests under 3.9, then bench/kernel_ab.py under 3.9
#          and 3.6 (session 10: s10pf the count loop prefetching the next tile's words, s10reg emit register caps,
#          s10c-e with AB_ARGS="--base NAME=.ab/NAME.py": the code before each change, carried in .ab/)
#   gather kernel 2's reads against the simplest gather and one contiguous read (bench/gather_ceiling.py), then
#          Nsight Compute of the 512K case (session 8: gather_ceiling_h200_s8.md, ncu_gather_h200_s8.txt)
# On the device machine:  . bench/gpu_env.sh && bash bench/h200_kernels.sh STAGE $OUT TAG
set -e
STAGE=$1; OUT=${2:-/tmp/out}; TAG=${3:-h200}; mkdir -p $OUT; L=$OUT/kernels_log_$TAG.txt
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a $L
case $STAGE in
quick)
  python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py 2>&1 | tail -4 | tee -a $L
  python3 -m hashattention bench attention --contexts 16K,128K,512K --batches 1,8 --budgets 1/32 --rep 50 \
    --time-limit 420 --out $OUT --tag $TAG 2>&1 | tee -a $L | grep -v "^|" ;;
full)
  python3 -m hashattention bench attention --rep 50 --time-limit 420 --out $OUT --tag $TAG 2>&1 | tee -a $L \
    | grep -v "^|" ;;
abq)
  timeout 120 python3 bench/launch_overhead.py --out $OUT --tag $TAG 2>&1 | grep -v Warn | tee -a $L
  timeout 240 python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels.py 2>&1 | tail -6 | tee -a $L
  timeout 300 python3 bench/kernel_ab.py --out $OUT --tag $TAG 2>&1 | grep -v Warn | tee -a $L ;;
sass)
  ncu -k regex:"_emit_kernel|_count_kernel" -s 2 -c 2 --section SpeedOfLight --section Occupancy --section LaunchStats \
    --section WarpStateStats --section SourceCounters --section SchedulerStats --section ComputeWorkloadAnalysis \
    --section MemoryWorkloadAnalysis python3 bench/ncu_case.py > $OUT/ncu_$TAG.txt 2>&1
  for k in count emit; do
    ncu -k regex:"_${k}_kernel" -s 1 -c 1 --section SourceCounters --section WarpStateStats --page source \
      --print-source sass --csv python3 bench/ncu_case.py > $OUT/ncu_${k}_sass_$TAG.csv 2>/dev/null
    python3 bench/ncu_top_sass.py $OUT/ncu_${k}_sass_$TAG.csv "Warp Stall Sampling (All" 30 | tee -a $L
  done ;;
ab)
  python3 bench/kernel_ab.py --out $OUT --tag $TAG 2>&1 | grep -v Warn | tee -a $L
  ncu -k regex:"_count_kernel|_emit_kernel|_fused_kernel|_split_kernel" -c 3 --section SpeedOfLight --section Occupancy \
    --section LaunchStats --section WarpStateStats --section SchedulerStats --section ComputeWorkloadAnalysis \
    --section MemoryWorkloadAnalysis python3 bench/ncu_case.py > $OUT/ncu_$TAG.txt 2>&1 || tail -5 $OUT/ncu_$TAG.txt ;;
t39)
  [ -d "$TRITON39/triton" ] || { echo "no Triton 3.9 unpacked (source bench/triton39_env.sh)"; exit 1; }
  PYTHONPATH=$TRITON39:$PYTHONPATH timeout 240 python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels.py \
    2>&1 | tail -3 | tee -a $L
  for v in t36 t39 t36b t39b; do
    case $v in t39*) PP=$TRITON39:$PYTHONPATH ;; *) PP=$PYTHONPATH ;; esac
    PYTHONPATH=$PP timeout 150 python3 bench/kernel_ab.py --cases 1x16K,1x128K,1x512K,8x128K --kernels --out $OUT \
      --tag ${TAG}_$v 2>&1 | grep -v "Warn\|warn" | tee -a $L
  done ;;
pf)
  [ -d "$TRITON39/triton" ] || { echo "no Triton 3.9 unpacked (source bench/triton39_env.sh)"; exit 1; }
  PYTHONPATH=$TRITON39:$PYTHONPATH timeout 90 python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels.py \
    -k "blocks_and_tiles or equals_shared_rule" 2>&1 | tail -2 | tee -a $L
  for v in t39 t36; do
    case $v in t39*) PP=$TRITON39:$PYTHONPATH ;; *) PP=$PYTHONPATH ;; esac
    PYTHONPATH=$PP timeout 230 python3 bench/kernel_ab.py --cases 1x16K,1x128K,1x512K,8x128K --kernels --out $OUT \
      --tag ${TAG}_$v $AB_ARGS 2>&1 | grep -v "Warn\|warn" | grep -v kernels | tee -a $L
  done
  timeout 60 python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels.py \
    -k "blocks_and_tiles or equals_shared_rule" 2>&1 | tail -2 | tee -a $L ;;
gather)
  timeout 500 python3 bench/gather_ceiling.py --out $OUT --tag $TAG 2>&1 | grep -v "Warn\|warn" | tee -a $L
  ncu -k regex:"_gather_kernel|_split_kernel|reduce_kernel" --section SpeedOfLight --section Occupancy \
    --section MemoryWorkloadAnalysis --section WarpStateStats --section LaunchStats \
    python3 bench/gather_ceiling.py --ncu-case --contexts 512K > $OUT/ncu_gather_$TAG.txt 2>&1 ;;
esac
