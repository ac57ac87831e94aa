"""FlashInfer's decode kernels beside ours and SDPA, on the same tensors in one process (issue 5).

    python3 bench/flashinfer_ab.py --out bench/results --tag h200_s9

Needs flashinfer-python (0.5.3 here: it JIT-compiles its kernels with the machine's nvcc at first use) and
apache-tvm-ffi; hashattention/benchmarks/flashinfer.py puts its wrappers on our cache layout;
bench/flashinfer_env.sh installs them from the git-ignored .fi/ on the device machine.
Per case (Llama-3.1-8B shapes, bf16; selection 1/32 + sink 128 + window 128, shared per KV group):

    dense   SDPA, our kernel 2 without an index list (kernels.dense_decode), FlashInfer's decode over the whole
            cache (batch 1: single_decode_with_kv_cache on the [Hkv, N, D] cache, HND; batch > 1: the paged
            decode with one request per (sequence, KV head) and pages of 16 rows, a view of the same cache)
    sparse  our kernel 2 (sparse_decode) on score_select's lists, and FlashInfer's paged decode on the same rows:
            pages of one row, one request per (sequence, KV head) with its G query heads, page table = the
            selected positions of that row (a view of the same cache, nothing copied); its plan() runs once on
            the host, outside the timed call
    total   hash_decode_attention (our two kernels), and score_select followed by FlashInfer's paged decode
            (the page table filled on the device from the index list, inside the timed call)

FlashInfer's decode with and without tensor cores (use_tensor_cores=True runs its prefill kernels for the G
query heads of a group). Outputs are checked against SDPA / our kernel 2. Times: median of triton do_bench over
CUDA-graph replays, L2 flushed, microseconds.
"""
import argparse
import json
import os
import time

import torch
import torch.nn.functional as F

from hashattention import Budget
from hashattention.core.budget import parse_heavy
from hashattention.benchmarks.attention import _device_name, _timer, random_case
from hashattention.benchmarks.flashinfer import dense_call, sparse_call
from hashattention.kernels import dense_decode, hash_decode_attention, score_select, sparse_decode


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="1x16K,1x128K,1x512K,8x128K")
    ap.add_argument("--rep", type=int, default=50)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--tag", default="")
    ap.add_argument("--time-limit", type=float, default=420)
    ap.add_argument("--heavy", default="1/32", help="heavy budget (fraction or count)")
    args = ap.parse_args()
    import flashinfer as fi
    import triton
    t0 = time.time()
    dev = torch.device("cuda")
    measure = _timer(args.rep, True)
    hq, hkv, d = 32, 8, 128
    budget = Budget(heavy=parse_heavy(args.heavy), sink=128, window=128)
    rows, log = [], []

    def say(s):
        print(s, flush=True)
        log.append(s)

    say(f"{_device_name(dev)} | torch {torch.__version__} | triton {triton.__version__} | flashinfer "
        f"{fi.__version__}")
    for case in args.cases.split(","):
        if time.time() - t0 > args.time_limit:
            say(f"time limit: {case} and later skipped")
            break
        b, n, q, kc, vc, qs, ks, st, ln = random_case(case, dev, hq, hkv, d)
        r = {"case": case}

        def timed(name, fn, ref=None):
            try:
                out = fn()
                torch.cuda.synchronize()
                t, _ = measure(fn)
                r[name] = t * 1e3
                if ref is not None:
                    r[name + "_rel_diff"] = rel(out, ref)
                say(f"{case:7s} {name:34s} {t * 1e3:7.1f} us" +
                    (f"  diff {r[name + '_rel_diff']:.1e}" if ref is not None else ""))
            except Exception as e:  # a FlashInfer build or launch the machine refuses: say so, go on
                r[name] = None
                r[name + "_failed"] = f"{type(e).__name__}: {str(e)[:300]}"
                say(f"{case:7s} {name:34s} failed: {r[name + '_failed']}")

        dense_ref = F.scaled_dot_product_attention(q[:, :, None], kc, vc, enable_gqa=True)[:, :, 0]
        timed("dense SDPA", lambda: F.scaled_dot_product_attention(q[:, :, None], kc, vc, enable_gqa=True))
        timed("dense ours (kernel 2, no list)", lambda: dense_decode(q, kc, vc, ln, check=False), dense_ref)
        for tc in (False, True):
            tag = (" single" if b == 1 else " paged16") + (" tensor cores" if tc else "")
            try:
                timed("dense flashinfer" + tag, dense_call(fi, q, kc, vc, tc), dense_ref)
            except Exception as e:  # the paged wrapper's plan
                say(f"{case:7s} dense flashinfer{tag} failed: {type(e).__name__}: {str(e)[:300]}")
        idx, cnt = score_select(qs, ks, st, ln, budget, hkv, True)
        k_sel = idx.shape[2]
        sparse_ref = sparse_decode(q, kc, vc, idx, cnt)
        r["selected_per_row"] = k_sel
        timed("sparse ours (kernel 2)", lambda: sparse_decode(q, kc, vc, idx, cnt, check=False))
        timed("total ours (kernels 1+2)", lambda: hash_decode_attention(q, kc, vc, qs, ks, st, ln, budget, True),
              sparse_ref)
        for tc in (False, True):
            tag = " tensor cores" if tc else ""
            try:
                fi_run, pr = sparse_call(fi, q, kc, vc, idx, tc)
            except Exception as e:
                say(f"{case:7s} sparse flashinfer page1{tag} failed: {type(e).__name__}: {str(e)[:300]}")
                continue
            timed("sparse flashinfer page1" + tag, fi_run, sparse_ref)

            def select_then_fi():
                i, _ = score_select(qs, ks, st, ln, budget, hkv, True)
                pr.set_pages(i)
                return pr.run(q)
            timed("total ours kernel 1 + flashinfer" + tag, select_then_fi, sparse_ref)
            del pr, fi_run
        rows.append(r)
        del kc, vc, idx
        torch.cuda.empty_cache()
    res = {"device": _device_name(dev), "torch": torch.__version__, "triton": triton.__version__,
           "flashinfer": fi.__version__, "budget": budget.describe(), "rows": rows, "log": log,
           "timing": "median of triton do_bench over CUDA-graph replays, L2 flushed, microseconds"}
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "flashinfer_ab" + (f"_{args.tag}" if args.tag else ""))
    with open(stem + ".json", "w") as f:
        json.dump(res, f, indent=1)
    names = list(dict.fromkeys(k for r in rows for k in r if k not in ("case", "selected_per_row")
                               and not k.endswith(("_rel_diff", "_failed"))))
    lines = [f"# FlashInfer {res['flashinfer']} beside our kernels and SDPA ({res['device']}, Triton {res['triton']}, "
             f"{budget.describe()}, Llama-3.1-8B shapes, bf16)", "", f"{res['timing']}; see bench/flashinfer_ab.py "
             "for what each row runs. diff: relative L2 difference from SDPA (dense) or our kernel 2 (sparse).", "",
             "| | " + " | ".join(r["case"] for r in rows) + " |", "|---|" + "---|" * len(rows)]
    for k in names:
        cells = []
        for r in rows:
            v = r.get(k, "-")
            cells.append(v if v == "-" else "failed" if v is None else f"{v:.1f}" + (f" (diff {r[k + '_rel_diff']:.0e})"
                                                                   if k + "_rel_diff" in r else ""))
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
