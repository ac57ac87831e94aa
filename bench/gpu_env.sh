# Source on the device machine:  . bench/gpu_env.sh
# Sets up the default model (GGUF carried in three parts, see README "GPU runs") and carried wheels.
mkdir -p /root/m
for p in .gguf/part_*; do [ -f "$p" ] && cp "$p" /root/m/; done
# the parts arrive one per call (`split -n 3`: the package's maps leave no room for a larger part); joined once
# all of them are there, which the file's sha256 tells
if [ ! -f /root/m/model.gguf ] && ls /root/m/part_* >/dev/null 2>&1; then
  cat /root/m/part_* > /root/m/joined.gguf
  if sha256sum /root/m/joined.gguf | grep -q "^b179c9523d0e6a0f"; then
    mv /root/m/joined.gguf /root/m/model.gguf; echo "gguf: joined $(ls /root/m/part_* | wc -l) parts"
  else
    rm /root/m/joined.gguf; echo "gguf: $(ls /root/m/part_* | wc -l) parts here, not all yet"
  fi
fi
if [ -d .whl ] && [ ! -d /tmp/site/gguf ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD:$PYTHONPATH PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
[ -f /root/m/model.gguf ] && export HASHATTENTION_GGUF=/root/m/model.gguf
true
