"""Kernel 1's launch shape at the engine's batch sizes (issue 6): `bench attention` tunes it at batch 1 only.

    python3 bench/select_batch_sweep.py --out $OUT [--decode]

Times score_select (CUDA-graph replay, L2 flushed, median) at Llama-3.1-8B shapes (32 query heads, 8 KV heads,
one 32-bit word), 128K keys, 1/32 + sink 128 + window 128, per KV group, at batch 1 and batch 7 (the largest
128K batch of the engine on an H200), under each launch shape. With --decode it then runs the engine's decode
benchmark (128K, batch 1 and the largest) with the shape that was best at batch 7, beside the default shape.
Writes select_batch_sweep_<device>.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hashattention.benchmarks.attention import _timer  # noqa: E402
from hashattention.core.budget import Budget  # noqa: E402
import hashattention.kernels  # noqa: E402,F401

ss = sys.modules["hashattention.kernels.score_select"]  # the module (the package exports the function)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--context", type=int, default=131072)
    ap.add_argument("--batches", default="1,7")
    ap.add_argument("--decode", action="store_true")
    a = ap.parse_args()
    dev = torch.device("cuda")
    measure = _timer(rep=25, graphs=True)
    bud = Budget(heavy=1 / 32, sink=128, window=128)
    n, hq, hkv = a.context, 32, 8
    g = torch.Generator(device=dev).manual_seed(0)
    cases = []
    for b in [int(x) for x in a.batches.split(",")]:
        q = torch.randint(-2 ** 31, 2 ** 31 - 1, (b, hq, 1), device=dev, dtype=torch.int32, generator=g)
        k = torch.randint(-2 ** 31, 2 ** 31 - 1, (b, hkv, n, 1), device=dev, dtype=torch.int32, generator=g)
        st = torch.zeros(b, dtype=torch.int32, device=dev)
        ln = torch.full((b,), n, dtype=torch.int32, device=dev)
        cases.append((b, (q, k, st, ln, bud, hkv, True)))
    default = dict(ss.CONFIG)
    ref = [ss.score_select(*args) for _, args in cases]
    shapes = [(t, p, m, 4) for t in (512, 1024, 2048) for p in (4, 8, 16) for m in (4096, 16384)]
    shapes += [(2048, 4, 16384, 8), (2048, 8, 16384, 8), (4096, 4, 16384, 8)]
    rows = []
    for tile, pps, mb, nw in shapes:
        ss.CONFIG.update(tile=tile, programs_per_sm=pps, max_block=mb, num_warps=nw)
        try:
            times = []
            for (b, args), (i0, c0) in zip(cases, ref):
                i1, c1 = ss.score_select(*args)
                assert torch.equal(i1, i0) and torch.equal(c1, c0), "selection differs from the default shape's"
                times.append(measure(lambda: ss.score_select(*args))[0] * 1e3)
        except Exception as e:  # a shape the compiler refuses
            print(f"{tile},{pps},{mb},{nw}: failed {type(e).__name__}: {e}", flush=True)
            continue
        rows.append({"tile": tile, "programs_per_sm": pps, "max_block": mb, "num_warps": nw, "us": times})
        print(f"tile={tile} pps={pps} max_block={mb} warps={nw}: "
              + ", ".join(f"B={b} {t:.1f} us" for (b, _), t in zip(cases, times)), flush=True)
    ss.CONFIG.clear()
    ss.CONFIG.update(default)
    d_row = next(r for r in rows if all(r[k] == default[k] for k in default))
    best = min(rows, key=lambda r: r["us"][-1])
    res = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__, "context": n,
           "batches": [b for b, _ in cases], "budget": bud.describe(), "default": default,
           "default_us": d_row["us"], "best_at_last_batch": best, "sweep": rows}
    print(f"default {default}: {d_row['us']}; best at B={cases[-1][0]}: {best}", flush=True)
    if a.decode:
        from hashattention.benchmarks import decode as D
        p = argparse.ArgumentParser()
        D.add_arguments(p)
        res["decode"] = {}
        for name, cfg in (("default", default), ("best", {k: best[k] for k in default})):
            ss.CONFIG.update(cfg)
            args = p.parse_args(["--models", "llama-3.1-8b", "--contexts", str(n), "--batches", "1,max",
                                 "--steps", "24", "--modes", "dense,hash", "--out", a.out, "--tag", f"sweep-{name}"])
            t0 = time.time()
            D.run(args)
            res["decode"][name] = {"config": cfg, "seconds": time.time() - t0}
        ss.CONFIG.update(default)
    name = res["device"].replace(" ", "_")
    Path(a.out, f"select_batch_sweep_{name}.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
