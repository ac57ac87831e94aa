"""How the L2 flush before each timed call changes the decode-attention times (issue 5), side by side in one
process: triton's do_bench zeroes 256 MB before each call ("write": L2 then holds up to its size in dirty lines,
whose write-back the timed call pays), against a read of 256 MB ("read": clean lines, as after the weight reads
that come before attention in a decode step).

    python3 bench/l2_flush.py --out bench/results --tag h200_s11

Rows: SDPA, kernel 1 (score_select), kernel 2 (sparse_decode on its rows), the two together
(hash_decode_attention), and torch.sum over a tensor of kernel 2's bytes (a plain read of as many bytes).
Batch 1 and 8, Llama-3.1-8B shapes, 1/32 + sink 128 + window 128, selection shared by each KV group.
"""
import argparse
import json
import os

import torch
import torch.nn.functional as F

from hashattention import Budget, kernels as K
from hashattention.benchmarks.attention import _device_name, _timer, random_case


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="1x16K,1x128K,1x512K,8x128K,8x512K")
    ap.add_argument("--rep", type=int, default=50)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    dev = torch.device("cuda")
    timers = {f: _timer(args.rep, True, f) for f in ("write", "read")}
    budget = Budget(heavy=1 / 32, sink=128, window=128)
    rows = []
    for case in args.cases.split(","):
        b, n, q, kc, vc, q_sig, k_sig, st, ln = random_case(case, dev)
        idx, cnt = K.score_select(q_sig, k_sig, st, ln, budget, 8, True)
        kv_bytes = 2 * idx.numel() * kc.shape[-1] * kc.element_size()
        plain = torch.ones(kv_bytes // 2, dtype=torch.bfloat16, device=dev)
        calls = {
            "sdpa": lambda: F.scaled_dot_product_attention(q[:, :, None], kc, vc, enable_gqa=True),
            "select": lambda: K.score_select(q_sig, k_sig, st, ln, budget, 8, True),
            "attention": lambda: K.sparse_decode(q, kc, vc, idx, cnt, check=False),
            "total": lambda: K.hash_decode_attention(q, kc, vc, q_sig, k_sig, st, ln, budget, True),
            "sum_kv_bytes": lambda: torch.sum(plain, dtype=torch.float32),
        }
        for rnd in range(2):  # twice, alternating, so that a drift of the machine shows
            for flush, measure in timers.items():
                r = {"case": case, "flush": flush, "round": rnd, "kv_mb": kv_bytes / 1e6}
                for name, fn in calls.items():
                    r[name + "_us"] = measure(fn)[0] * 1e3
                r["speedup"] = r["sdpa_us"] / r["total_us"]
                rows.append(r)
                print(f"{case:7s} {flush:5s} " + " ".join(f"{k[:-3]} {v:7.1f}" for k, v in r.items()
                                                          if k.endswith("_us")) + f" x{r['speedup']:.2f}", flush=True)
        del kc, vc, plain
        torch.cuda.empty_cache()
    res = {"device": _device_name(dev), "torch": torch.__version__, "budget": budget.describe(), "rows": rows,
           "timing": "median over CUDA-graph replays, us; write: triton do_bench (zeroes 256 MB before each call); "
                     "read: a read of 256 MB before each call"}
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "l2_flush" + (f"_{args.tag}" if args.tag else ""))
    with open(stem + ".json", "w") as f:
        json.dump(res, f, indent=1)
    lines = [f"# L2 flush: write (do_bench) vs read ({res['device']}, {budget.describe()}, shared selection)", "",
             res["timing"] + ". kv MB: the K/V rows kernel 2 reads; sum: torch.sum over as many bytes.", "",
             "| case | flush | round | SDPA | select | attention | total | x SDPA | sum of kv MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['flush']} | {r['round']} | {r['sdpa_us']:.1f} | {r['select_us']:.1f} | "
                     f"{r['attention_us']:.1f} | {r['total_us']:.1f} | {r['speedup']:.2f} | "
                     f"{r['sum_kv_bytes_us']:.1f} ({r['kv_mb']:.0f} MB) |")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
