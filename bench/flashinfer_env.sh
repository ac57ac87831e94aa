# Source on the device machine (after bench/gpu_env.sh) to measure FlashInfer beside our kernels: with it,
# `hashattention bench attention` adds FlashInfer's dense decode (FI) and its paged decode over kernel 1's rows
# (FI att) to its table. The wheels sit in the git-ignored .fi/ (10 MB: flashinfer-python 0.5.3, which JIT-
# compiles its CUDA kernels with the machine's nvcc at first use, apache-tvm-ffi cp312, einops, tabulate, click);
# carry it: run(carry=[".fi"], command=". bench/gpu_env.sh; . bench/flashinfer_env.sh; python3 -m hashattention bench attention --rep 50").
# Rebuild .fi/: pip download --no-deps --python-version 3.12 --only-binary=:all: --platform manylinux_2_28_x86_64
#   -d .fi flashinfer-python==0.5.3 apache-tvm-ffi einops tabulate click
if [ -d .fi ] && [ ! -d /tmp/fisite/flashinfer ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/fisite .fi/*.whl
fi
export PYTHONPATH=/tmp/fisite:$PYTHONPATH FLASHINFER_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 CUDA_HOME=/usr/local/cuda
python3 -c "import flashinfer; print('flashinfer', flashinfer.__version__)"
