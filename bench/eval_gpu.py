"""The full evaluation of the default model on one GPU, in passes ordered by what matters most, under one
deadline (device time is scarce): the model loads once, each pass is a resumable `Suite` run.

    . bench/gpu_env.sh && python3 bench/eval_gpu.py --deadline 360 --work /tmp/ev --out $OUT

Pass 1: sparse everywhere, budgets 1/16 and 1/32, 2 samples per task and length (the acceptance setting).
Pass 2: the same file at 1/4 and 1/8 (the score-against-sparsity plot; the same prompts).
Pass 3: sparse decoding only (dense prefill), 1/16 and 1/32, 2 samples.
Pass 4: pass 1 extended to 4 samples (averages use the samples every policy finished).
A pass cut by the deadline leaves its finished units; `--report` renders the configurations that finished.
First run (2026-11-23, H100, 330 s): pass 1 finished 2K and 4K, and 8K for six policies at 1/16; hash units
then cost 42 s each at 8K (XOR + popcount over all pairs), which the ±1 matrix-product scorer has since removed.
The JSON files (every record and the exact settings) are copied to --out; `hashattention eval --report FILE`
renders their tables and plots.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hashattention.evaluation.runner import Suite  # noqa: E402
from hashattention.models import load_model  # noqa: E402
from hashattention.shipped import DEFAULT_MAPS, load_default_maps  # noqa: E402

PASSES = [
    ("eval_everywhere", dict(modes=["everywhere"], budgets=["1/16", "1/32"], samples=2)),
    ("eval_everywhere", dict(modes=["everywhere"], budgets=["1/4", "1/8"], samples=2)),
    ("eval_decode", dict(modes=["decode"], decode_budgets=["1/16", "1/32"], samples=2, decode_rounds=1)),
    ("eval_everywhere", dict(modes=["everywhere"], budgets=["1/4", "1/8", "1/16", "1/32"], samples=4)),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--deadline", type=float, default=360, help="seconds for all passes (after the model loads)")
    ap.add_argument("--work", default="/tmp/ev")
    ap.add_argument("--out", default=None)
    ap.add_argument("--lengths", default="2K,4K,8K")
    ap.add_argument("--passes", default="1,2,3,4")
    ap.add_argument("--tasks", default="all")
    a = ap.parse_args()
    t_load = time.perf_counter()
    model, tok, _ = load_model("default")
    maps = load_default_maps(model)
    print(f"model on {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}, "
          f"loaded in {time.perf_counter() - t_load:.1f} s", flush=True)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        for i in [int(x) for x in a.passes.split(",")]:
            name, kw = PASSES[i - 1]
            left = a.deadline - (time.perf_counter() - t0)
            if left < 15:
                print(f"pass {i} skipped: {left:.0f} s left", flush=True)
                continue
            print(f"pass {i}: {name} {kw} ({left:.0f} s left)", flush=True)
            suite = Suite(model, tok, tasks=a.tasks, lengths=a.lengths, policies="all", maps=maps, maps_path=DEFAULT_MAPS.name,
                          round_size=2, ppl_samples=2, out=work / f"{name}.json", time_limit=left,
                          progress=False, **kw)
            suite.run()
            tm = suite.data["timing"]
            print("\n".join(f"  {k}: {v:.1f} s" for k, v in tm.items() if k != "total_s"), flush=True)
            print(suite.out.with_suffix(".md").read_text(), flush=True)
    finally:
        if a.out:
            for f in work.glob("*.json"):
                shutil.copy(f, Path(a.out) / f.name)


if __name__ == "__main__":
    main()
