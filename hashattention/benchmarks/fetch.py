"""`hashattention bench fetch`: one host layer's offload fetch in isolation (issue 25): how long
:meth:`HostKV.fetch` takes for each way of copying the misses, at the shape of a decode case.

A step's selection per (sequence, KV head) is sink + window + ``heavy`` tokens; the heavy ones slide over a random
permutation of the middle tokens so that a fraction ``--hit`` of them were selected the step before (a steady
state: the row cache, ``--row-cache`` x heavy slots, holds them). After ``--warmup`` steps fill the cache, each of
``--steps`` steps is timed per mode on the same selections and the same state:

    fused      the fetch kernel copies the misses' rows itself (one program per (sequence, KV head))
    split      the fetch kernel lists the misses, a second, wider gather kernel copies them
    auto       what the engine picks (offload.fused_gather)
    reference  the torch-ops fetch (the CPU path)

Rows: {"mode", "ms_per_layer", "miss_gbps" (bytes of missed K and V rows per second), "hit_rate", "k", ...}.
On a CPU only ``reference`` runs, unless TRITON_INTERPRET=1 (tests).
"""
from __future__ import annotations

import statistics
import time

import torch

from ..core.budget import Budget, parse_heavy
from ..engine.memory import parse_tokens
from ..engine.offload import FETCH_MODES, HOST_LAYOUTS, HostKV, fused_gather, use_triton
from . import device_tag, write_results


def add_arguments(p):
    p.add_argument("--context", default="128K", help="tokens in the cache")
    p.add_argument("--batch", type=int, default=10)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--heavy", default="1/32", help="heavy tokens per (sequence, KV head): a count or a fraction")
    p.add_argument("--sink", type=int, default=128)
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--row-cache", type=float, default=2.0, help="heavy-row cache slots, in multiples of heavy")
    p.add_argument("--hit", type=float, default=0.75, help="fraction of a step's heavy tokens selected the step before")
    p.add_argument("--modes", default="fused,split", help=f"comma list of {', '.join(FETCH_MODES)}")
    p.add_argument("--layouts", default="interleaved", help="comma list of host layouts (interleaved: a token's K "
                   "and V side by side; separate: two tensors)")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=12)
    p.add_argument("--repeats", type=int, default=2, help="passes over the modes (their order alternates)")
    p.add_argument("--device", default=None)
    p.add_argument("--out", default="runs", help="folder for fetch_<device>[_tag].{json,md,png}")
    p.add_argument("--tag", default="")


def _timer(dev):
    if dev.type == "cuda":
        def clock():
            torch.cuda.synchronize(dev)
            return time.perf_counter()
        return clock
    return time.perf_counter


def measure(args) -> dict:
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    s, b, h, d = parse_tokens(args.context), args.batch, args.kv_heads, args.head_dim
    heavy = Budget(heavy=parse_heavy(args.heavy), sink=args.sink, window=args.window).heavy_count(s)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in FETCH_MODES]
    if bad or not modes:
        raise ValueError(f"--modes: unknown {bad}; available: {', '.join(FETCH_MODES)}")
    if not 0 <= args.hit < 1:
        raise ValueError(f"--hit must be in [0, 1), got {args.hit}")
    middle = s - args.sink - args.window
    new = max(1, round(heavy * (1 - args.hit)))  # tokens a step brings in
    need = heavy + new * (args.warmup + len(modes) + args.steps * args.repeats * len(modes))  # per layout
    if heavy < 1 or need > middle:
        raise ValueError(f"a context of {s} tokens holds {middle} between sink and window: too few for {heavy} heavy "
                         f"tokens sliding by {new} over {args.warmup} + steps; use a longer --context or fewer steps")
    slots = int(args.row_cache * heavy)
    if slots < heavy:
        raise ValueError(f"--row-cache {args.row_cache}: the cache must hold at least the heavy budget ({heavy} rows)")
    if "reference" not in modes and not use_triton(torch.empty(1, d, device=dev)):
        raise ValueError(f"the fused and split fetches are Triton kernels: on {dev} run --modes reference "
                         "(or TRITON_INTERPRET=1)")
    g = torch.Generator(device="cpu").manual_seed(0)
    draws = torch.rand(b * h, middle, generator=g, device="cpu")  # on the CPU whatever torch's default device
    perm = (torch.argsort(draws, -1)[:, :need] + args.sink).view(b, h, need).to(dev)
    fixed = torch.cat([torch.arange(args.sink), torch.arange(s - args.window, s)]).to(dev).expand(b, h, -1)

    def selection(t):  # int32 [B, Hkv, sink + heavy + window], ascending
        return torch.cat([fixed, perm[..., t * new: t * new + heavy]], -1).sort(-1).values.int().contiguous()

    layouts = [x.strip() for x in args.layouts.split(",") if x.strip()]
    if not layouts or any(x not in HOST_LAYOUTS for x in layouts):
        raise ValueError(f"--layouts: choose from {', '.join(HOST_LAYOUTS)}, got {args.layouts!r}")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    k = args.sink + heavy + args.window
    elt = torch.empty(0, dtype=dtype).element_size()
    rows = []
    for layout in layouts:
        hk = HostKV(1, [0], b, s, h, d, dtype, dev, args.sink, args.window, slots, hash_mode=True, layout=layout)
        length = torch.tensor([s], device=dev)
        clock = _timer(dev)
        t = 0
        for i in range(args.warmup):  # fill the row cache (any mode: the state is the same)
            hk.fetch(0, selection(t), length)
            t += 1
        for m in modes:  # compile each mode's kernels outside the timing (the first launch of a split fetch is
            hk.fetch_mode = m  # its gather kernel's compile: 70 ms on an H100)
            hk.fetch(0, selection(t), length)
            t += 1
        times = {m: [] for m in modes}
        hits = {m: [0, 0] for m in modes}
        for r in range(args.repeats):
            for m in (modes if r % 2 == 0 else modes[::-1]):
                hk.fetch_mode = m
                sel = [selection(t + i) for i in range(args.steps)]
                hk.stats.zero_()
                t0 = clock()
                for x in sel:
                    hk.fetch(0, x, length)
                times[m].append((clock() - t0) * 1e3 / args.steps)
                st = hk.stats.tolist()
                hits[m][0] += st[0]
                hits[m][1] += st[1]
                t += args.steps
        del hk
        for m in modes:
            ms = statistics.median(times[m])
            hit = hits[m][1] / max(hits[m][0], 1)
            miss_bytes = hits[m][0] / (args.repeats * args.steps) * (1 - hit) * 2 * d * elt
            rows.append({"mode": m, "layout": layout,
                         "copies": ("fused" if fused_gather(k, b * h) else "split") if m == "auto" else m,
                         "ms_per_layer": ms, "ms_all": times[m], "hit_rate": hit, "miss_bytes_per_layer": miss_bytes,
                         "miss_gbps": miss_bytes / ms / 1e6, "context": s, "batch": b, "kv_heads": h, "head_dim": d,
                         "heavy": heavy, "k": k, "row_cache": slots, "device": name})
    return {"device": name, "torch": torch.__version__, "dtype": str(dtype).replace("torch.", ""),
            "steps": args.steps, "repeats": args.repeats, "target_hit": args.hit, "rows": rows}


def markdown(res: dict) -> str:
    r0 = res["rows"][0]
    lines = [f"# One host layer's offload fetch ({res['device']})", "",
             f"torch {res['torch']}, {res['dtype']}; {r0['batch']} x {r0['kv_heads']} (sequence, KV head) rows of "
             f"{r0['context']:,} tokens, {r0['k']:,} selected per row ({r0['heavy']:,} heavy), row cache "
             f"{r0['row_cache']:,}; median of {res['repeats']} passes of {res['steps']} steps.", "",
             "| layout | mode | copies | ms per layer | hit rate | MB of misses | GB/s of misses |",
             "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r.get('layout', 'separate')} | {r['mode']} | {r['copies']} | {r['ms_per_layer']:.3f} | "
                     f"{r['hit_rate']:.3f} | {r['miss_bytes_per_layer'] / 1e6:.1f} | {r['miss_gbps']:.1f} |")
    ms = {(r.get("layout", "separate"), r["mode"]): r["ms_per_layer"] for r in res["rows"]}
    for lay in dict.fromkeys(lay for lay, _ in ms):
        if (lay, "fused") in ms and (lay, "split") in ms:
            lines += ["", f"{lay}: fused against split **{ms[lay, 'split'] / ms[lay, 'fused']:.2f}x** (split's time "
                          "over fused's)"]
    for m in dict.fromkeys(m for _, m in ms):
        if ("interleaved", m) in ms and ("separate", m) in ms:
            lines += ["", f"{m}: interleaved layout against separate **{ms['separate', m] / ms['interleaved', m]:.2f}x**"
                          " (separate's time over interleaved's)"]
    return "\n".join(lines) + "\n"


def plot(res: dict, path: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3))
    rows = res["rows"]
    ax.bar([f"{r['mode']}\n{r.get('layout', 'separate')}" for r in rows], [r["ms_per_layer"] for r in rows],
           color="#4c72b0")
    ax.set_ylabel("ms per host layer")
    ax.set_title(f"offload fetch, {rows[0]['context'] // 1024}K x {rows[0]['batch']} ({res['device']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args) -> int:
    res = measure(args)
    stem = f"fetch_{device_tag(res['device'])}" + (f"_{args.tag}" if args.tag else "")
    print(write_results(res, args.out, stem, markdown, plot))
    return 0
