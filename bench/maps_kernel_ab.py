"""The engine's fused maps kernel (sign the step's query and key heads: MLP D->128->128->32, SiLU, per head)
under launch options, side by side on the same tensors (issue 5 follow-up, session 9). Runs: h200_s9_t36 the
16-row tile path only (warps, tf32); h200_s9b the matrix-vector path (one program per head and sequence, the
default up to 8 sequences) beside it; h200_s9c the same with 4 warps as the default; h200_s9d{,_t36} batches
up to 64 (where the matrix-vector path stops paying, and tile warps: in those runs "tile (s8 default)" is
4 warps); h200_s9e{,_t36} the defaults chosen from them.

    python3 bench/maps_kernel_ab.py --out bench/results --tag h200_s9

Llama-3.1-8B shape: 32 query + 8 key heads, D 128, fp32 map weights (5.9 MB per layer). Per variant: one call
and the time per layer of a chain of 32 layers (each its own weights, one CUDA graph: the weights are never in
L2 when their layer comes, as in a decode step). Sign bits against an fp32 (ieee) torch reference: bits that
differ (only where a pre-sign value is within rounding of zero).
"""
import argparse
import importlib
import json
import os

import torch

from hashattention.benchmarks.attention import _device_name, _timer

K = importlib.import_module("hashattention.engine.kernels")

VARIANTS = [("default", {}, None), ("mv warps 8", {"mv_warps": 8}, None), ("mv warps 16", {"mv_warps": 16}, None),
            ("tile warps 4 (s8)", {"mv_max_batch": 0, "num_warps": 4}, None),
            ("tile warps 8", {"mv_max_batch": 0, "num_warps": 8, "few_warps_from": 1 << 30}, None),
            ("tile tf32 (1 pass)", {"mv_max_batch": 0, "num_warps": 4}, "tf32"),
            ("mv at any batch", {"mv_max_batch": 1 << 30}, None), ("default_again", {}, None)]


def reference_bits(x, ws, li):
    y = x.float()
    for i, w in enumerate(ws):
        y = torch.matmul(y[:, :, None], w[li])[:, :, 0]
        if i < len(ws) - 1:
            y = torch.nn.functional.silu(y)
    return y > 0  # [B, H, 32]


def unpack(words):
    j = torch.arange(32, device=words.device)
    return ((words[..., None] >> j) & 1).bool().flatten(-2)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,7")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--rep", type=int, default=50)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    measure = _timer(args.rep, True)
    hq, hs, d, hid, bits, L = 32, 8, 128, 128, 32, args.layers
    g = torch.Generator(device=dev).manual_seed(0)
    dims = [(d, hid), (hid, hid), (hid, bits)]
    ws = [torch.randn(L, hq + hs, a, b, device=dev, generator=g) / a ** 0.5 for a, b in dims]
    rows = []
    cfg0, prec0 = dict(K.MAPS_CONFIG), K.MAPS_PRECISION
    for b in map(int, args.batches.split(",")):
        x = torch.randn(b, hq + hs, d, device=dev, dtype=torch.bfloat16, generator=g)
        sig = torch.zeros(L, b, hs, 64, 1, dtype=torch.int32, device=dev)
        pos = torch.tensor([5], device=dev)
        ref = reference_bits(x, ws, 0)
        for name, cfg, prec in VARIANTS:
            K.MAPS_CONFIG.update(cfg0, **cfg)
            K.MAPS_PRECISION = prec or prec0
            try:
                qsig = K.fused_signatures(x, ws, None, 0, hq, sig[0], pos)
                got = torch.cat([unpack(qsig), unpack(sig[0][:, :, 5])], 1)
                diff = int((got != ref).sum())
                t1, _ = measure(lambda: K.fused_signatures(x, ws, None, 0, hq, sig[0], pos))
                tl_, _ = measure(lambda: [K.fused_signatures(x, ws, None, li, hq, sig[li], pos) for li in range(L)])
            except Exception as e:
                print(f"B={b} {name}: failed {type(e).__name__}: {str(e)[:200]}", flush=True)
                rows.append({"batch": b, "variant": name, "failed": f"{type(e).__name__}: {e}"[:300]})
                continue
            r = {"batch": b, "variant": name, "single_us": t1 * 1e3, "per_layer_us": tl_ * 1e3 / L,
                 "bits_differing": diff, "bits": ref.numel()}
            rows.append(r)
            print(f"B={b} {name:16s} single {r['single_us']:6.1f} us, per layer in a chain of {L} "
                  f"{r['per_layer_us']:6.1f} us, bits differing from fp32 {diff}/{ref.numel()}", flush=True)
    K.MAPS_CONFIG.update(cfg0)
    K.MAPS_PRECISION = prec0
    res = {"device": _device_name(dev), "torch": torch.__version__, "rows": rows,
           "timing": "median of triton do_bench over CUDA-graph replays, L2 flushed, microseconds"}
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "maps_kernel_ab" + (f"_{args.tag}" if args.tag else ""))
    with open(stem + ".json", "w") as f:
        json.dump(res, f, indent=1)
    lines = [f"# Fused maps kernel launch options ({res['device']}, Llama-3.1-8B shape: 32 + 8 heads, "
             "D 128 -> 128 -> 128 -> 32, fp32 weights)", "", f"{res['timing']}.", "",
             "| batch | variant | single call | per layer (chain of 32) | bits differing from fp32 |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['variant']} | failed | | |" if "failed" in r else
                     f"| {r['batch']} | {r['variant']} | {r['single_us']:.1f} | {r['per_layer_us']:.1f} | "
                     f"{r['bits_differing']}/{r['bits']} |")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
