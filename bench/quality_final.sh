#!/usr/bin/env bash
# Issue 24's second GPU call, right after bench/quality_run.sh on the same (warm) machine: picks the maps and
# the kernel-backed group selection (sum or max) that held dense quality best in that run's context mode, then
# measures the final table: context mode with more prompts, everywhere mode with perplexity at each length.
#   . bench/gpu_env.sh && bash bench/quality_final.sh $OUT [deadline]
set -u
OUT=${1:?out dir}; DEADLINE=${2:-520}
W=/tmp/quality; T=/tmp/train
read -r MAPS SEL < <(python3 - <<'PY'
import json, os
rows = json.load(open("/tmp/quality/quality_summary.json"))
def score(tag, sel):  # mean delta at 1/32 and 1/64 in the context mode
    d = [r["delta_vs_dense"] for r in rows if r["mode"] == "context" and r["maps"] == tag
         and r["policy"] == f"hash-{sel}" and r["budget"] in ("1/32", "1/64")]
    return sum(d) / len(d) if len(d) == 2 else float("-inf")
tags = [t for t in ("shipped", "long_group", "long_head") if t == "shipped" or os.path.exists(f"/tmp/train/{t}.safetensors")]
best = max(((score(t, s), t, s) for t in tags for s in ("sum", "max")))
print(best[1], best[2])
PY
)
echo "chosen maps: $MAPS, selection: $SEL"
MP=$([ "$MAPS" = shipped ] && echo shipped || echo $T/$MAPS.safetensors)
C="policies=dense,oracle,hash-sum,hash-max,hash-union,hash-head;budgets=1/16,1/32,1/64;samples=12"
E="policies=dense,oracle,hash-$SEL;budgets=1/16,1/32;samples=2;ppl=2;maps=$MP;tag=$MAPS"
EXTRA=""
[ "$MAPS" != shipped ] && EXTRA="mode=context;policies=dense,hash-sum,hash-max,hash-union,hash-head;budgets=1/16,1/32,1/64;samples=12;maps=$MP;tag=$MAPS"
python3 -m hashattention eval --work $W --deadline $DEADLINE --pass "mode=context;$C" ${EXTRA:+--pass "$EXTRA"} \
  --pass "mode=everywhere;$E" 2>&1 | tee $W/final.log
echo "$MAPS $SEL" > $W/chosen.txt
tar czf $OUT/quality_final.tgz -C $W .
ls -la $OUT
