# Source on the device machine (after bench/gpu_env.sh) to run the kernels under Triton 3.9 instead of an older
# Triton that torch pins (3.6 for torch 2.11). Why: Triton 3.9 lowers tl.histogram, which bounds the selection's
# count pass, to shared-memory atomics (3.6: warp ballots), and the selection is faster for it (docs/performance.md).
# Not needed where pip can install it: `pip install --no-deps triton==3.9.0`.
# On a machine with no index: a minimal copy of the cp312 wheel (no AMD backend, Blackwell ptxas, CUPTI or proton),
# tar + xz (101 MB), split in four (`split -n 4 -d`) under .triton39/ (git-ignored), carried one part per call:
#   run(carry=[".triton39/part_00"], command=". bench/gpu_env.sh; . bench/triton39_env.sh")   (then part_01 .. 03)
# then, on the same warm machine, e.g.
#   . bench/gpu_env.sh; . bench/triton39_env.sh; PYTHONPATH=$TRITON39:$PYTHONPATH python3 -m hashattention bench attention --rep 50
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
  # 12.9 ptxas makes the same count loop. Triton 3.6 reads this variable only for sm_100 and up.
  export TRITON_PTXAS_BLACKWELL_PATH=$TRITON39/triton/backends/nvidia/bin/ptxas TRITON_DEFAULT_FP_FUSION=1
  PYTHONPATH=$TRITON39:$PYTHONPATH python3 -c "import triton; print('triton', triton.__version__, triton.__file__)"
else
  echo "triton 3.9: $(ls /root/t39/part_* 2>/dev/null | wc -l) of 4 parts here"
fi
