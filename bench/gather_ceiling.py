"""How fast can a GPU gather the selected K/V rows at all? (issue 5: is kernel 2 at the floor of its access pattern?)

    python3 bench/gather_ceiling.py --out bench/results --tag h200_s8

Kernel 2 (sparse_decode) reads 1/32 of the cache as scattered 256-byte rows (head_dim 128, bf16). The bytes floor
in bench/attention.py prices them at copy bandwidth, as if they streamed. This script measures the same rows
read by the simplest Triton kernel that touches each once (load K and V rows, sum them, one [D] store per
program), over a small sweep of launch shapes, for three placements of the same number of rows: the positions
score_select picks on random signatures (scattered), runs of 16 consecutive positions, and one contiguous run;
beside it, kernel 2 itself on the same lists (its split kernel and merge, torch profiler device time, L2
flushed) and SDPA over the whole cache. Llama-3.1-8B shapes, batch 1, 1/32 + sink 128 + window 128.
Writes gather_ceiling_<tag>.{json,md}.
"""
import argparse
import importlib
import json
import os

import torch
import triton
import triton.language as tl

from hashattention import Budget
from hashattention.benchmarks.attention import _device_name, _timer, kernel_breakdown

ss = importlib.import_module("hashattention.kernels.score_select")
sd = importlib.import_module("hashattention.kernels.sparse_decode")


@triton.jit
def _gather_kernel(K, V, IDX, OUT, KTOT, PER, sk_h, sk_n, sv_h, sv_n, BLOCK: tl.constexpr, D: tl.constexpr,
                   STAGES: tl.constexpr):
    """Program (split, head): rows IDX[head, split*PER : (split+1)*PER] of K and V, summed into OUT[head, split]."""
    s = tl.program_id(0)
    h = tl.program_id(1)
    lo = s * PER
    hi = tl.minimum(lo + PER, KTOT)
    d = tl.arange(0, D)
    acc = tl.zeros([D], tl.float32)
    for j in tl.range(lo, hi, BLOCK, num_stages=STAGES):
        o = j + tl.arange(0, BLOCK)
        m = o < hi
        p = tl.load(IDX + h.to(tl.int64) * KTOT + o, mask=m, other=0).to(tl.int64)
        k = tl.load(K + h.to(tl.int64) * sk_h + p[:, None] * sk_n + d[None, :], mask=m[:, None], other=0.0)
        v = tl.load(V + h.to(tl.int64) * sv_h + p[:, None] * sv_n + d[None, :], mask=m[:, None], other=0.0)
        acc += tl.sum(k.to(tl.float32) + v.to(tl.float32), 0)
    tl.store(OUT + (h * tl.num_programs(0) + s) * D + d, acc)


def gather(kc, vc, idx, pps, block, warps, stages, sms):
    """kc, vc [1, H, N, D]; idx int32 [1, H, K]: every listed row of K and V read once."""
    h, ktot, d = kc.shape[1], idx.shape[2], kc.shape[3]
    splits = max(1, min(triton.cdiv(ktot, block), pps * sms // h))
    per = triton.cdiv(triton.cdiv(ktot, splits), block) * block
    splits = triton.cdiv(ktot, per)
    out = torch.empty(h, splits, d, device=kc.device, dtype=torch.float32)
    _gather_kernel[(splits, h)](kc, vc, idx, out, ktot, per, kc.stride(1), kc.stride(2), vc.stride(1), vc.stride(2),
                                BLOCK=block, D=d, STAGES=stages, num_warps=warps)
    return out


def runs_of(n, k, run, h, dev, g):
    """[1, h, k] sorted positions: k // run random aligned runs of ``run`` consecutive rows per head."""
    slots = torch.stack([torch.randperm(n // run, generator=g, device=dev)[:k // run] for _ in range(h)])
    pos = (slots[..., None] * run + torch.arange(run, device=dev)).reshape(h, -1)
    assert pos.shape[1] == k, f"{k} rows are not whole runs of {run}"
    return pos.sort(-1).values.to(torch.int32)[None].contiguous()


def _case(n, dev, g, hq=32, hkv=8, d=128):
    """Llama-3.1-8B shapes at batch 1: caches [1, hkv, n, d] bf16, a query, random signatures, row bounds."""
    kc = torch.empty(1, hkv, n, d, device=dev, dtype=torch.bfloat16).normal_(generator=g)
    vc = torch.empty_like(kc).normal_(generator=g)
    q = torch.randn(1, hq, d, device=dev, dtype=torch.bfloat16, generator=g)
    q_sig = torch.randint(-2 ** 31, 2 ** 31 - 1, (1, hq, 1), device=dev, dtype=torch.int32, generator=g)
    k_sig = torch.randint(-2 ** 31, 2 ** 31 - 1, (1, hkv, n, 1), device=dev, dtype=torch.int32, generator=g)
    st, ln = torch.zeros(1, dtype=torch.int32, device=dev), torch.full((1,), n, dtype=torch.int32, device=dev)
    return kc, vc, q, q_sig, k_sig, st, ln


def ncu_case(n, dev, sms, budget, hkv=8):
    """One call each for Nsight Compute: a contiguous read of the selection's bytes, the gather (the best
    shape at 512K above), kernel 2."""
    kc, vc, q, q_sig, k_sig, st, ln = _case(n, dev, torch.Generator(device=dev).manual_seed(n))
    idx, cnt = ss.score_select(q_sig, k_sig, st, ln, budget, hkv, True)
    torch.randn(2 * idx.numel() * kc.shape[3], device=dev, dtype=torch.bfloat16).sum(dtype=torch.float32)
    gather(kc, vc, idx, 4, 64, 4, 1, sms)
    sd.sparse_decode(q, kc, vc, idx, cnt, check=False)
    torch.cuda.synchronize()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", default="128K,512K")
    ap.add_argument("--rep", type=int, default=50)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--tag", default="")
    ap.add_argument("--dense-max", type=int, default=128 * 1024, help="also the whole cache up to this context")
    ap.add_argument("--md", metavar="JSON", help="rewrite the table of an earlier run's JSON, measure nothing")
    ap.add_argument("--ncu-case", action="store_true",
                    help="one call each (contiguous read, gather, kernel 2) at the first context, for Nsight Compute")
    args = ap.parse_args()
    if args.md:
        with open(args.md) as f:
            res = json.load(f)
        with open(args.md[:-len(".json")] + ".md", "w") as f:
            f.write(markdown(res))
        return
    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    hkv, d = 8, 128
    budget = Budget(heavy=1 / 32, sink=128, window=128)
    if args.ncu_case:
        return ncu_case(int(args.contexts.split(",")[0].rstrip("K")) * 1024, dev, sms, budget, hkv)
    measure = _timer(args.rep, True)
    shapes = [(pps, bl, w, st) for pps in (4, 8, 16) for bl in (32, 64) for w in (4, 8) for st in (1, 3)]
    rows = []
    for ctx in args.contexts.split(","):
        n = int(ctx.rstrip("K")) * 1024
        g = torch.Generator(device=dev).manual_seed(n)
        kc, vc, q, q_sig, k_sig, st, ln = _case(n, dev, g, hkv=hkv, d=d)
        sel, cnt = ss.score_select(q_sig, k_sig, st, ln, budget, hkv, True)
        ktot = sel.shape[2]
        sdpa, _ = measure(lambda: torch.nn.functional.scaled_dot_product_attention(q[:, :, None], kc, vc,
                                                                                   enable_gqa=True))
        lists = {"scattered (score_select)": sel, "runs of 16": runs_of(n, ktot, 16, hkv, dev, g),
                 "contiguous": torch.arange(ktot, device=dev, dtype=torch.int32).expand(1, hkv, ktot).contiguous()}
        if n <= args.dense_max:  # the whole cache, as SDPA reads it: the same kernels at a size where they stream
            lists["all rows"] = torch.arange(n, device=dev, dtype=torch.int32).expand(1, hkv, n).contiguous()
        # one contiguous read of as many bytes (torch.sum, nothing written back): the streaming rate at this size
        src = torch.empty(2 * hkv * ktot * d, device=dev, dtype=torch.bfloat16).normal_(generator=g)
        kred = kernel_breakdown(lambda: src.sum(dtype=torch.float32), lambda s: None)
        red_us = sum(kred.values())
        mb = src.numel() * src.element_size()
        print(f"{ctx:5s} contiguous read (torch.sum) of {mb / 1e6:.1f} MB: {red_us:.1f} us "
              f"({mb / (red_us * 1e-6) / 1e12:.2f} TB/s)", flush=True)
        rows.append({"context": n, "list": "one contiguous read (torch.sum)", "bytes": mb, "read_kernel_us": red_us,
                     "read_TBps": mb / (red_us * 1e-6) / 1e12})
        for name, idx in lists.items():
            nbytes = 2 * hkv * idx.shape[2] * d * kc.element_size()
            cnt_l = torch.full_like(cnt, idx.shape[2])
            best = None
            for pps, bl, w, stg in shapes:
                try:
                    t, _ = measure(lambda: gather(kc, vc, idx, pps, bl, w, stg, sms))
                except Exception as e:  # a shape the compiler refuses: skip it
                    print(f"  {ctx} {name} {pps},{bl},{w},{stg}: failed {type(e).__name__}", flush=True)
                    continue
                if best is None or t < best[0]:
                    best = (t, dict(programs_per_sm=pps, block=bl, warps=w, stages=stg))
            pps, bl, w, stg = best[1].values()
            kg = kernel_breakdown(lambda: gather(kc, vc, idx, pps, bl, w, stg, sms), lambda s: None)
            gk = sum(v for k, v in kg.items() if "_gather" in k)
            t_att, _ = measure(lambda: sd.sparse_decode(q, kc, vc, idx, cnt_l, check=False))
            ka = kernel_breakdown(lambda: sd.sparse_decode(q, kc, vc, idx, cnt_l, check=False), lambda s: None)
            split = sum(v for k, v in ka.items() if "_split" in k)
            merge = sum(v for k, v in ka.items() if "_combine" in k)
            r = {"context": n, "list": name, "rows_per_head": idx.shape[2], "bytes": nbytes, "sdpa_us": sdpa * 1e3,
                 "gather_us": best[0] * 1e3, "gather_kernel_us": gk, "gather_shape": best[1],
                 "gather_TBps": nbytes / (gk * 1e-6) / 1e12, "sparse_decode_us": t_att * 1e3,
                 "split_kernel_us": split, "merge_kernel_us": merge,
                 "split_TBps": nbytes / (split * 1e-6) / 1e12}
            rows.append(r)
            print(f"{ctx:5s} {name:26s} gather kernel {gk:6.1f} us ({r['gather_TBps']:.2f} TB/s, {best[1]}) | "
                  f"kernel 2 split {split:6.1f} us ({r['split_TBps']:.2f} TB/s) + merge {merge:.1f}, call "
                  f"{t_att * 1e3:.1f} | SDPA {sdpa * 1e3:.1f}", flush=True)
        torch.cuda.empty_cache()
    res = {"device": _device_name(dev), "torch": torch.__version__, "triton": triton.__version__,
           "budget": budget.describe(), "rows": rows,
           "timing": "kernel device time (torch profiler, L2 flushed between calls); call = median of triton "
                     "do_bench over CUDA-graph replays"}
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "gather_ceiling" + (f"_{args.tag}" if args.tag else ""))
    with open(stem + ".json", "w") as f:
        json.dump(res, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(markdown(res))


def markdown(res) -> str:
    lines = [f"# Gathering the selected K/V rows ({res['device']}, triton {res['triton']}, {res['budget']}, "
             "batch 1, 8 KV heads x 128, bf16)", "", res["timing"] + ". Gather = the simplest kernel reading "
             "each listed K and V row once (fastest of a launch-shape sweep); kernel 2 = sparse_decode on the same "
             "list (split kernel; the merge beside it); one contiguous read = torch.sum over as many "
             "bytes in one tensor: the streaming rate at this size.", "",
             "| context | list | MB | gather us | gather TB/s | kernel 2 split us | split TB/s | merge us | SDPA us |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        if "read_kernel_us" in r:
            lines.append(f"| {r['context'] // 1024}K | {r['list']} | {r['bytes'] / 1e6:.1f} | "
                         f"{r['read_kernel_us']:.1f} | {r['read_TBps']:.2f} | | | | |")
            continue
        lines.append(f"| {r['context'] // 1024}K | {r['list']} | {r['bytes'] / 1e6:.1f} | {r['gather_kernel_us']:.1f} | "
                     f"{r['gather_TBps']:.2f} | {r['split_kernel_us']:.1f} | {r['split_TBps']:.2f} | "
                     f"{r['merge_kernel_us']:.1f} | {r['sdpa_us']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
