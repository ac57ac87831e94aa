# Source on the device machine (after bench/gpu_env.sh) to run the kernels under Triton 3.9 instead of the
# machine's 3.6. Why: Triton 3.9 lowers tl.histogram to shared-memory atomics (ATOMS.POPC.INC), 3.6 to ballots;
# compiled for sm_90 here (bench/sass_local.py), the count pass's loop is 340 instructions per 1024-token tile
# under 3.9 against 623 under 3.6, and that pass is bound by integer instructions (session 6 Nsight).
# The package is too large for one call: a minimal copy of the cp312 wheel (no AMD backend, Blackwell ptxas,
# CUPTI or proton), tar + xz (101 MB), split in four (`split -n 4 -d`: with the ~30 MB working tree a call carries
# at most ~64 MB) under .triton39/ (git-ignored), one part per call, e.g.
#   run(carry=[".triton39/part_00"], command=". bench/gpu_env.sh; . bench/triton39_env.sh")
#   run(carry=[".triton39/part_01"], command=". bench/gpu_env.sh; . bench/triton39_env.sh")   (and part_02)
#   run(carry=[".triton39/part_03"], command=". bench/gpu_env.sh; . bench/triton39_env.sh; bash bench/h200_kernels.sh t39 $OUT h200_s8")
# on one warm machine (the t39 stage: kernel tests under 3.9, then bench/kernel_ab.py under 3.6 and 3.9 in turn). Rebuild the parts: see attention_notes_h100.md, session 7.
mkdir -p /root/t39
for p in .triton39/part_*; do [ -f "$p" ] && cp "$p" /root/t39/; done
if [ ! -d /tmp/t39/triton ] && [ "$(ls /root/t39/part_0* 2>/dev/null | wc -l)" = 4 ]; then
  cat /root/t39/part_0* > /root/t39/t39.tar.xz
  if sha256sum /root/t39/t39.tar.xz | grep -q "^4cc656d1ac0e1394"; then
    mkdir -p /tmp/t39 && tar -C /tmp/t39 -xJf /root/t39/t39.tar.xz && echo "triton 3.9: unpacked"
  else
    echo "triton 3.9: parts do not match the expected sha256"
  fi
fi
if [ -d /tmp/t39/triton ]; then  # not put on PYTHONPATH here: prefix a command with PYTHONPATH=$TRITON39:$PYTHONPATH
  export TRITON39=/tmp/t39
  # Triton 3.9 compiles sm_90 with its "ptxas-blackwell" (CUDA 13.4), left out of the parts for size; its CUDA
  # 12.9 ptxas makes the same count loop (bench/sass_local.py: 340 instructions, 8 ATOMS). Triton 3.6 reads this
  # variable only for sm_100 and up.
  export TRITON_PTXAS_BLACKWELL_PATH=$TRITON39/triton/backends/nvidia/bin/ptxas TRITON_DEFAULT_FP_FUSION=1
  PYTHONPATH=$TRITON39:$PYTHONPATH python3 -c "import triton; print('triton', triton.__version__, triton.__file__)"
else
  echo "triton 3.9: $(ls /root/t39/part_* 2>/dev/null | wc -l) of 4 parts here"
fi
