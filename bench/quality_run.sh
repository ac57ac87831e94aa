#!/usr/bin/env bash
# Issue 24's GPU run of maps variants, one call: two maps trained side by side in the background, then each
# measured in the context mode (dense context, sparse question and answer) on the suite's prompts, paired with
# dense. At most two trainings at once: three of them and the suite ran an 80 GB card out of memory.
# On the device machine:
#   . bench/gpu_env.sh && bash bench/quality_run.sh $OUT [train_seconds] [deadline] [corpus.tar.xz]
# The variants: `varied` (from the shipped maps, on pydoc + vim's manual + /usr/share/doc text: the corpus
# tarball, made here first by `bash bench/quality_run.sh --corpus`, carried as `.corpus.tar.xz`), `bits64`
# (64-bit signatures from scratch on pydoc).
# Writes $OUT/quality.tgz (results JSON/MD/PNG, logs, the maps' .json) and each maps file in two parts
# ($OUT/<name>.safetensors.part_a[a|b], joined with `cat`).
set -u
if [ "${1:-}" = "--corpus" ]; then  # on the developer's machine: ~5 MB each of pydoc (train split), vim, docs
  D=$(mktemp -d)/varied; mkdir -p $D
  ${PYTHON:-.venv/bin/python} - "$D" <<'PY'
import glob, os, random, sys
from hashattention.training.corpus import pydoc_documents
out, cap = sys.argv[1], 5_000_000
def dump(name, texts):
    n = 0
    with open(f"{out}/{name}.txt", "w") as f:
        for t in texts:
            if n > cap:
                break
            f.write(t + "\n\n"); n += len(t)
    print(name, n, "characters")
dump("pydoc", (t for _, t in pydoc_documents("train", limit_chars=cap)))
dump("vim", (open(p, errors="ignore").read() for p in sorted(glob.glob("/usr/share/vim/vim*/doc/*.txt"))))
docs = [p for p in glob.glob("/usr/share/doc/**/*", recursive=True) if os.path.isfile(p)
        and (os.path.basename(p).startswith("README") or p.endswith((".txt", ".md", ".rst")))]
random.Random(0).shuffle(docs)
dump("docs", (t for t in (open(p, errors="ignore").read() for p in docs) if len(t) >= 2000))
PY
  tar cJf .corpus.tar.xz -C $(dirname $D) varied && ls -la .corpus.tar.xz; exit
fi
OUT=${1:?out dir}; TRAIN=${2:-200}; DEADLINE=${3:-460}; CORPUS=${4:-.corpus.tar.xz}
W=/tmp/quality; T=/tmp/train; mkdir -p $W $T /tmp/corpus
T0=$(date +%s)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
DATA=pydoc
if [ -f "$CORPUS" ]; then tar xJf "$CORPUS" -C /tmp/corpus && DATA=$(ls -d /tmp/corpus/*/ | head -1); fi
train() {  # name, extra args
  local n=$1; shift
  python3 -m hashattention train --model default --context 8192 --score weight --epochs 4 --max-seconds $TRAIN \
    --dtype bfloat16 --seed 1 --quiet --out $T/$n "$@" > $W/train_$n.log 2>&1 &
}
train varied --data "$DATA" --init shipped --target group
train bits64 --data pydoc --bits 64 --target group
wait
ls -la $T
LEFT=$((DEADLINE - $(date +%s) + T0 - 20))
M="policies=dense,hash-sum;budgets=1/32,1/64;samples=8;round=4"
python3 -m hashattention eval --work $W --deadline $LEFT \
  --pass "mode=context;$M;maps=$T/varied.safetensors;tag=varied" \
  --pass "mode=context;$M;maps=$T/bits64.safetensors;tag=bits64" 2>&1 | grep -v Convert | tee $W/eval.log
cp $T/*.json $W/ 2>/dev/null
tar czf $OUT/quality.tgz -C $W .
for n in varied bits64; do
  [ -f $T/$n.safetensors ] && (cd $T && split -n 2 $n.safetensors $OUT/$n.safetensors.part_)
done
ls -la $OUT
