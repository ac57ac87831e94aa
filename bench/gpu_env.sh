# Source on the device machine:  . bench/gpu_env.sh
# Sets up the default model (GGUF carried in two parts, see README "GPU runs") and carried wheels.
mkdir -p /root/m
for p in .gguf/part_*; do [ -f "$p" ] && cp "$p" /root/m/; done
if [ ! -f /root/m/model.gguf ] && [ -f /root/m/part_aa ] && [ -f /root/m/part_ab ]; then
  cat /root/m/part_aa /root/m/part_ab > /root/m/model.gguf
  echo "gguf: $(sha256sum /root/m/model.gguf | cut -c1-16)"
fi
if [ -d .whl ] && [ ! -d /tmp/site/gguf ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD:$PYTHONPATH PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
[ -f /root/m/model.gguf ] && export HASHATTENTION_GGUF=/root/m/model.gguf
true
