"""Does running independent rows of one decode step on parallel CUDA streams overlap the selection (integer-bound)
with the attention reads (memory-bound)? Issue 5 experiment, session 9.

    python3 bench/stream_overlap.py --out bench/results --tag h200_s9

Each case (Llama-3.1-8B shapes, 1/32 + sink 128 + window 128, shared per KV group) is run as one call
(score_select + sparse_decode over all rows) and as P parts (KV heads at batch 1, sequences at batch > 1), part i
on its own stream, the streams forked from and joined to the caller's (in a CUDA graph: parallel branches). Times:
median of triton do_bench over CUDA-graph replays, L2 flushed; --chain L also the time per call in a chain of L
calls on L copies of the caches (as the layers of a decode step run them). Index lists must equal the one-call
ones; outputs may differ by the split shape's rounding.
"""
import argparse
import importlib
import json
import os

import torch

from hashattention import Budget
from hashattention.benchmarks.attention import _device_name, _timer, random_case

ss = importlib.import_module("hashattention.kernels.score_select")
sd = importlib.import_module("hashattention.kernels.sparse_decode")

_orig_ws = ss._workspace
_WS: dict = {}


def _stream_workspace(device, rows, ncb, nfb):
    """One histogram workspace per stream: concurrent calls must not count into the same copy."""
    key = (torch.cuda.current_stream().cuda_stream, rows, ncb, nfb)
    if key not in _WS:
        ss._WORKSPACE.pop((str(device), rows, ncb, nfb), None)
        _WS[key] = _orig_ws(device, rows, ncb, nfb)
        ss._WORKSPACE.pop((str(device), rows, ncb, nfb), None)
    return _WS[key]


def step(q, kc, vc, qs, ks, st, ln, budget, hkv):
    idx, cnt = ss.score_select(qs, ks, st, ln, budget, hkv, True)
    return sd.sparse_decode(q, kc, vc, idx, cnt, check=False), idx


def parts_of(q, kc, vc, qs, ks, st, ln, p):
    """The P slices of one step's inputs: by sequence when the batch divides, else by KV head."""
    b, hkv = kc.shape[:2]
    if b % p == 0 and b > 1:
        c = b // p
        return [(q[i * c:(i + 1) * c], kc[i * c:(i + 1) * c], vc[i * c:(i + 1) * c], qs[i * c:(i + 1) * c],
                 ks[i * c:(i + 1) * c], st[i * c:(i + 1) * c], ln[i * c:(i + 1) * c], hkv) for i in range(p)]
    c, g = hkv // p, q.shape[1] // hkv
    return [(q[:, i * c * g:(i + 1) * c * g], kc[:, i * c:(i + 1) * c], vc[:, i * c:(i + 1) * c],
             qs[:, i * c * g:(i + 1) * c * g], ks[:, i * c:(i + 1) * c], st, ln, c) for i in range(p)]


def run_parts(parts, budget, streams):
    cur = torch.cuda.current_stream()
    outs = []
    for i, (q, kc, vc, qs, ks, st, ln, h) in enumerate(parts):
        s = cur if i == 0 else streams[i - 1]
        if i:
            s.wait_stream(cur)
        with torch.cuda.stream(s):
            outs.append(step(q, kc, vc, qs, ks, st, ln, budget, h))
    for s in streams[:len(parts) - 1]:
        cur.wait_stream(s)
    return outs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="1x16K,1x128K,1x512K,8x128K")
    ap.add_argument("--parts", default="1,2,4")
    ap.add_argument("--rep", type=int, default=50)
    ap.add_argument("--chain", type=int, default=8)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    ss._workspace = _stream_workspace
    dev = torch.device("cuda")
    measure = _timer(args.rep, True)
    hq, hkv, d = 32, 8, 128
    budget = Budget(heavy=1 / 32, sink=128, window=128)
    streams = [torch.cuda.Stream() for _ in range(7)]
    rows = []
    for case in args.cases.split(","):
        b, n, q, kc, vc, qs, ks, st, ln = random_case(case, dev, hq, hkv, d)
        sdpa, _ = measure(lambda: torch.nn.functional.scaled_dot_product_attention(
            q[:, :, None], kc, vc, enable_gqa=True))
        copies = [(kc.clone(), vc.clone(), ks.clone()) for _ in range(args.chain)]
        sdpa_chain, _ = measure(lambda: [torch.nn.functional.scaled_dot_product_attention(
            q[:, :, None], k_, v_, enable_gqa=True) for k_, v_, _ in copies]) if copies else (float("nan"), 0)
        ref_out, ref_idx = step(q, kc, vc, qs, ks, st, ln, budget, hkv)
        for p in map(int, args.parts.split(",")):
            parts = parts_of(q, kc, vc, qs, ks, st, ln, p)
            outs = run_parts(parts, budget, streams)
            torch.cuda.synchronize()
            by_batch = b % p == 0 and b > 1
            out = torch.cat([o for o, _ in outs], 0 if by_batch else 1)
            idx = torch.cat([i for _, i in outs], 0 if by_batch else 1)
            err = float((out.float() - ref_out.float()).norm() / ref_out.float().norm())
            t, _ = measure(lambda: run_parts(parts, budget, streams))
            r = {"case": case, "parts": p, "split_by": "batch" if by_batch else "kv_heads", "us": t * 1e3,
                 "sdpa_us": sdpa * 1e3, "idx_equal": bool(torch.equal(idx, ref_idx)), "rel_diff": err}
            if copies:
                chain_parts = [parts_of(q, k_, v_, qs, s_, st, ln, p) for k_, v_, s_ in copies]
                tc, _ = measure(lambda: [run_parts(cp, budget, streams) for cp in chain_parts])
                r["chain_us"] = tc * 1e3 / len(copies)
                r["sdpa_chain_us"] = sdpa_chain * 1e3 / len(copies)
            rows.append(r)
            print(f"{case:7s} parts {p} ({r['split_by']}): {r['us']:6.1f} us (SDPA {r['sdpa_us']:6.1f}, "
                  f"x{r['sdpa_us'] / r['us']:.2f})" + (f"; chain per call {r['chain_us']:6.1f} (SDPA "
                  f"{r['sdpa_chain_us']:6.1f}, x{r['sdpa_chain_us'] / r['chain_us']:.2f})" if copies else "")
                  + f" idx==one call {r['idx_equal']} diff {err:.1e}", flush=True)
        del kc, vc, copies
        torch.cuda.empty_cache()
    import triton
    res = {"device": _device_name(dev), "torch": torch.__version__, "triton": triton.__version__,
           "budget": budget.describe(), "rows": rows,
           "timing": "median of triton do_bench over CUDA-graph replays, L2 flushed, microseconds"}
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "stream_overlap" + (f"_{args.tag}" if args.tag else ""))
    with open(stem + ".json", "w") as f:
        json.dump(res, f, indent=1)
    lines = [f"# One decode step's rows on P parallel streams ({res['device']}, Triton {res['triton']}, "
             f"{budget.describe()}, Llama-3.1-8B shapes, bf16)", "", f"{res['timing']}.", "",
             "| case | parts | split by | single call | x SDPA | per call, chain | x SDPA | idx equal |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['parts']} | {r['split_by']} | {r['us']:.1f} | {r['sdpa_us'] / r['us']:.2f} | "
                     f"{r.get('chain_us', float('nan')):.1f} | "
                     f"{r.get('sdpa_chain_us', float('nan')) / r.get('chain_us', float('nan')):.2f} | {r['idx_equal']} |")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
