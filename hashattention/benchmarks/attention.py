"""`hashattention bench attention`: decode attention latency, HashAttention kernels against dense SDPA.

One decode step (one query per sequence) at Llama-3.1-8B attention shapes by default (32 query heads,
8 KV heads, head_dim 128, bf16), for each context, batch and heavy budget (sink and window included):

    sdpa        torch scaled_dot_product_attention over the whole cache (dense, enable_gqa)
    group       HashAttention, one selection per KV group: kernel 1 (score + select) and kernel 2 (sparse
                attention) timed alone and together (total = hash_decode_attention)
    head        the same with one selection per query head
    flashinfer  FlashInfer's decode over the whole cache (dense) and, beside kernel 2, over the same selected
                rows (pages of one row), when the package imports on the machine (the faster of its CUDA-core
                and tensor-core paths; benchmarks/flashinfer.py)
    read        the simplest kernel reading the signatures once (benchmarks/read_floor.py): the selection's
                measured floor, beside the bytes / copy-bandwidth one
    chain       batch 1: the call (and kernel 1 alone) per call in a chain of --chain calls in one CUDA graph,
                each on its own copy of the caches, as the layers of a decode step run them

Every time is the median of triton.testing.do_bench (L2 flushed before each run) over CUDA-graph replays
of the call (eager totals are reported beside them), all measured in the same run on the same tensors.
Bytes: the fewest each version must move (dense: all K and V; HashAttention: the signatures once, the
selected K/V rows and the index list), and the fraction of the measured copy bandwidth each reaches.
Results: <out>/attention_<device>[_tag].{json,md,png} (device: h100, h200, ...).
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import sys
import time

import torch

from ..core.budget import Budget, parse_heavy
from . import flashinfer, write_results
from .read_floor import SHAPES, stream_read


def parse_tokens(text: str) -> int:
    """'128K' -> 131072, '1M' -> 1048576, '5000' -> 5000."""
    t = text.strip().upper()
    mult = {"K": 1024, "M": 1024 ** 2}.get(t[-1:], 1)
    try:
        v = int(float(t[:-1] if mult > 1 else t) * mult)
    except ValueError:
        raise SystemExit(f"cannot read a token count from {text!r}")
    if v <= 0:
        raise SystemExit(f"token counts must be positive, got {text!r}")
    return v


def random_case(case: str, dev, hq: int = 32, hkv: int = 8, d: int = 128, dtype=torch.bfloat16):
    """A decode step on random tensors for the side-by-side bench scripts, seeded by the case ('8x128K': batch 8,
    128K keys): (b, n, q [b, hq, d], k_cache, v_cache [b, hkv, n, d], q_sig int32 [b, hq, 1],
    k_sig int32 [b, hkv, n, 1], starts, lengths int32 [b]: every sequence full)."""
    b, n = case.lower().split("x")
    b, n = int(b), parse_tokens(n)
    g = torch.Generator(device=dev).manual_seed(n + b)
    kc = torch.empty(b, hkv, n, d, device=dev, dtype=dtype).normal_(generator=g)
    vc = torch.empty_like(kc).normal_(generator=g)
    q = torch.randn(b, hq, d, device=dev, dtype=dtype, generator=g)
    q_sig = torch.randint(-2 ** 31, 2 ** 31 - 1, (b, hq, 1), device=dev, dtype=torch.int32, generator=g)
    k_sig = torch.randint(-2 ** 31, 2 ** 31 - 1, (b, hkv, n, 1), device=dev, dtype=torch.int32, generator=g)
    starts = torch.zeros(b, dtype=torch.int32, device=dev)
    lengths = torch.full((b,), n, dtype=torch.int32, device=dev)
    return b, n, q, kc, vc, q_sig, k_sig, starts, lengths


#: bench mode -> the kernels' selection (group: shared by the KV group, summed bit matches)
MODE_SELECTION = {"group": "sum", "max": "max", "head": "head"}


def add_arguments(p):
    p.add_argument("--contexts", default="16K,32K,64K,128K,256K,512K", help="comma list of context lengths")
    p.add_argument("--batches", default="1,8", help="comma list of batch sizes")
    p.add_argument("--budgets", default="1/8,1/16,1/32", help="comma list of heavy budgets (fraction or count)")
    p.add_argument("--sink", type=int, default=128)
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--q-heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    p.add_argument("--modes", default="group,max,head", help="comma list of: group (one selection shared by a "
                   "KV group, the group's bit matches summed), max (shared, the best bit matches of any head of the "
                   "group), head (one selection per query head)")
    p.add_argument("--rep", type=int, default=100, help="repetition time per measurement (ms)")
    p.add_argument("--flush", default="read", choices=["read", "write"],
                   help="how L2 is emptied before each timed call: read 256 MB (clean lines, as in a decode step) "
                        "or write 256 MB (triton's do_bench: the call then also pays the write-back)")
    p.add_argument("--no-graphs", action="store_true", help="time eager calls only")
    p.add_argument("--no-tune", action="store_true", help="skip the sparse-attention launch-shape sweep")
    p.add_argument("--no-check", action="store_true", help="skip the correctness check against the reference")
    p.add_argument("--chain", type=int, default=8,
                   help="batch 1, shared selection: also time this many calls in one CUDA graph, each on its own "
                        "copy of the caches, as the layers of a decode step run them (0: off)")
    p.add_argument("--time-limit", type=float, default=0, help="stop starting new cases after this many seconds")
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default="runs", help="folder for attention_<device>[_tag].{json,md,png} "
                   "(git-ignored; the runs the docs cite are copied to bench/results)")
    p.add_argument("--tag", default="", help="suffix of the result files")
    p.add_argument("--replot", default="", help="only redraw the table and plot from this JSON file")


def _device_name(dev) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return platform.processor() or "cpu"


_FLUSH: dict = {}


def _flush_read(dev):
    """Fill L2 with clean lines: read a 256 MB buffer written long before (no write-back left pending)."""
    buf = _FLUSH.get(str(dev))
    if buf is None:
        buf = _FLUSH[str(dev)] = torch.ones(1 << 26, dtype=torch.int32, device=dev)
    return lambda: torch.sum(buf, dtype=torch.int64)


def _median_read_flushed(fn, rep_ms: float) -> float:
    """Median time (ms) of fn, each call after a read of 256 MB: do_bench's way, but with a clean L2."""
    flush = _flush_read(torch.device("cuda", torch.cuda.current_device()))
    fn()
    torch.cuda.synchronize()
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
    ev[0].record()
    for _ in range(5):
        fn()
    ev[1].record()
    torch.cuda.synchronize()
    n = int(min(1000, max(20, rep_ms / max(ev[0].elapsed_time(ev[1]) / 5 + 0.06, 1e-3))))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(10):  # warm-up
        flush()
        fn()
    for i in range(n):
        flush()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return float(torch.tensor([s.elapsed_time(e) for s, e in zip(starts, ends)]).median())


def _timer(rep: int, graphs: bool, flush: str = "read"):
    """measure(fn) -> (CUDA-graph replay time, eager time) in ms, medians, L2 flushed before each call.
    flush "write": triton's do_bench, which zeroes 256 MB before each call, so L2 starts full of dirty lines
    whose write-back the timed call pays (up to ~50 MB: ~10 us on an H100 or H200, a large share of a call that
    reads 20-90 MB); "read": a read of 256 MB instead, so L2 holds clean lines, as after a layer's weight reads in
    a decode step."""
    from triton.testing import do_bench

    if flush not in ("read", "write"):
        raise ValueError(f"flush must be 'read' or 'write', got {flush!r}")

    def bench(fn):
        if flush == "write":
            return do_bench(fn, warmup=10, rep=rep, return_mode="median")
        return _median_read_flushed(fn, rep)

    def measure(fn):
        fn()
        torch.cuda.synchronize()
        eager = bench(fn)
        if not graphs:
            return eager, eager
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        t = bench(g.replay)
        del g
        return t, eager
    return measure


def copy_bandwidth(dev, measure) -> float:
    """Device-to-device copy of 1 GiB, bytes read + written per second."""
    x = torch.empty(1 << 29, dtype=torch.int16, device=dev).random_()
    y = torch.empty_like(x)
    t, eager = measure(lambda: y.copy_(x))  # a graph may run the copy on a copy engine: take the faster
    bw = 2 * x.numel() * 2 / (min(t, eager) * 1e-3)
    del x, y
    torch.cuda.empty_cache()
    return bw


def tune_decode(q, kc, vc, idx, counts, measure, log) -> dict:
    """Time kernel 2 under a few launch shapes on one case; keep the fastest in sparse_decode.CONFIG."""
    sd = sys.modules["hashattention.kernels.sparse_decode"]  # the module (the package exports the function)
    base = dict(sd.CONFIG)
    shapes = [(64, 4, 2, 3), (64, 4, 2, 4), (64, 4, 3, 3), (32, 4, 3, 4), (64, 4, 4, 4), (64, 8, 3, 4),
              (128, 8, 3, 4), (64, 4, 2, 2), (64, 4, 3, 8), (32, 4, 4, 8)]
    results = []
    for bn, nw, ns, pps in shapes:
        sd.CONFIG.update(block_n=bn, num_warps=nw, num_stages=ns, programs_per_sm=pps)
        try:
            t, _ = measure(lambda: sd.sparse_decode(q, kc, vc, idx, counts, check=False))
        except Exception as e:  # a shape the compiler refuses (shared memory): skip it
            log(f"  tune {bn},{nw},{ns},{pps}: failed {type(e).__name__}")
            continue
        results.append({"block_n": bn, "num_warps": nw, "num_stages": ns, "programs_per_sm": pps, "ms": t})
        log(f"  tune block_n={bn} warps={nw} stages={ns} programs/SM={pps}: {t * 1e3:.1f} us")
    best = min(results, key=lambda r: r["ms"]) if results else {**base, "ms": None}
    sd.CONFIG.update({k: best[k] for k in base if k in best})
    return {"sweep": results, "chosen": dict(sd.CONFIG)}


def tune_select(cases, measure, log) -> dict:
    """Time kernel 1 under a few launch shapes on each case (args of score_select); keep the shape with the
    smallest sum of times relative to each case's best in score_select.CONFIG."""
    ss = sys.modules["hashattention.kernels.score_select"]
    base = dict(ss.CONFIG)
    # (tile, programs per SM, max block, warps, exact_max): exact_max 0 is the three-launch coarse + fine path
    shapes = [(1024, 8, 4096, 4, 256), (1024, 8, 4096, 4, 0), (1024, 4, 4096, 4, 256), (1024, 16, 4096, 4, 256),
              (1024, 8, 16384, 4, 256), (512, 8, 4096, 4, 256), (2048, 8, 16384, 8, 256), (512, 16, 4096, 4, 256),
              (1024, 8, 4096, 8, 256), (2048, 4, 8192, 8, 256)]
    results = []
    for tile, pps, mb, nw, em in shapes:
        ss.CONFIG.update(tile=tile, programs_per_sm=pps, max_block=mb, num_warps=nw, exact_max=em)
        times = []
        try:
            for args in cases:
                times.append(measure(lambda: ss.score_select(*args))[0])
        except Exception as e:  # a shape the compiler refuses: skip it
            log(f"  tune select {tile},{pps},{mb},{nw},{em}: failed {type(e).__name__}: {e}")
            continue
        results.append({"tile": tile, "programs_per_sm": pps, "max_block": mb, "num_warps": nw, "exact_max": em,
                        "ms": times})
        log(f"  tune select tile={tile} programs/SM={pps} max_block={mb} warps={nw} exact_max={em}: "
            + ", ".join(f"{t * 1e3:.1f} us" for t in times))
    if not results:
        return {"sweep": [], "chosen": base}
    best_each = [min(r["ms"][i] for r in results) for i in range(len(cases))]
    best = min(results, key=lambda r: sum(t / b for t, b in zip(r["ms"], best_each)))
    ss.CONFIG.update({k: best[k] for k in base if k in best})
    return {"sweep": results, "chosen": dict(ss.CONFIG)}


@contextlib.contextmanager
def _pdl_off():
    """Kernels launched with programmatic dependent launch start before the one they follow ends and wait for
    it: their profiler time would include that wait. Off while kernel_breakdown profiles."""
    import importlib  # the modules: the package binds these names to the functions
    ss = importlib.import_module("hashattention.kernels.score_select")
    sd = importlib.import_module("hashattention.kernels.sparse_decode")
    saved = ss.CONFIG["pdl"], sd.CONFIG["pdl_split"], sd.CONFIG["pdl_combine"]
    ss.CONFIG["pdl"] = sd.CONFIG["pdl_split"] = sd.CONFIG["pdl_combine"] = False
    try:
        yield
    finally:
        ss.CONFIG["pdl"], sd.CONFIG["pdl_split"], sd.CONFIG["pdl_combine"] = saved


def kernel_breakdown(fn, log, iters: int = 20) -> dict:
    """Device time of each kernel of ``fn`` (torch profiler, mean over ``iters`` eager calls, L2 flushed between
    calls by a read of 256 MB, as in _timer; until session 11 by zeroing it), microseconds. Programmatic
    dependent launch is off meanwhile (each kernel's own time, not its wait for the one before)."""
    with _pdl_off():
        return _kernel_breakdown(fn, log, iters)


def _kernel_breakdown(fn, log, iters: int) -> dict:
    from torch.profiler import ProfilerActivity, profile
    flush = _flush_read(torch.device("cuda", torch.cuda.current_device()))

    def totals(call):  # device time per kernel name over iters calls, us
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(iters):
                call()
            torch.cuda.synchronize()
        res = {}
        for e in prof.key_averages():
            t = getattr(e, "device_time_total", None)
            if t is None:
                t = getattr(e, "cuda_time_total", 0)
            if e.count and t:
                res[e.key] = (t, e.count)
        return res

    fn()
    torch.cuda.synchronize()
    base = totals(flush)  # the flush's own kernels, taken out below (fn may run a kernel of the same name)

    def both():
        flush()
        fn()
    # the kernels fn launched: more launches than the flush alone made (a name both run: the flush's time out)
    out = {k: (t - base.get(k, (0.0, 0))[0]) / iters for k, (t, c) in totals(both).items()
           if c > base.get(k, (0.0, 0))[1]}
    for k, v in sorted(out.items(), key=lambda kv: -kv[1]):
        log(f"  kernel {k[:60]}: {v:.1f} us per call")
    return out


def check_against_reference(dev, dtype, hq, hkv, d, log) -> list:
    """Selection identical to the reference, attention within bf16 rounding, on random ragged inputs."""
    from .. import kernels as K
    out = []
    g = torch.Generator(device=dev).manual_seed(0)
    for n, b, sel in [(16_411, 2, "sum"), (16_411, 2, "head"), (16_411, 2, "max"), (131_073, 1, "sum"),
                      (131_073, 1, "max")]:
        per_group = sel != "head"
        q = torch.randn(b, hq, d, device=dev, dtype=dtype, generator=g)
        kc = torch.randn(b, hkv, n, d, device=dev, dtype=dtype, generator=g)
        vc = torch.randn(b, hkv, n, d, device=dev, dtype=dtype, generator=g)
        q_sig = torch.randint(-2 ** 31, 2 ** 31 - 1, (b, hq, 1), device=dev, dtype=torch.int32, generator=g)
        k_sig = torch.randint(-2 ** 31, 2 ** 31 - 1, (b, hkv, n, 1), device=dev, dtype=torch.int32, generator=g)
        starts = torch.tensor([0, 77][:b], device=dev)
        lengths = torch.tensor([n, n - 1000][:b], device=dev)
        budget = Budget(heavy=1 / 32)
        idx, counts = K.score_select(q_sig, k_sig, starts, lengths, budget, hkv, selection=sel)
        ridx, rcounts = K.score_select_reference(q_sig, k_sig, starts, lengths, budget, hkv, per_group, sel)
        o = K.sparse_decode(q, kc, vc, idx, counts)
        ref = K.sparse_decode_reference(q.float(), kc.float(), vc.float(), ridx, rcounts)
        err = float((o.float() - ref).norm() / ref.norm())
        same = bool(torch.equal(idx, ridx) and torch.equal(counts, rcounts))
        out.append({"context": n, "batch": b, "per_group": per_group, "selection": sel, "same_selection": same,
                    "rel_err": err})
        log(f"check n={n} b={b} selection={sel}: selection identical={same} rel_err={err:.2e}")
        if not same or not err < 2e-2:
            raise RuntimeError(f"kernel check failed: {out[-1]}")
    return out


def run(args) -> int:
    if args.replot:
        with open(args.replot) as f:
            res = json.load(f)
        _write(res, os.path.dirname(args.replot) or ".", os.path.basename(args.replot)[:-5])
        return 0
    dev = torch.device(args.device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        print("bench attention needs a CUDA GPU")
        return 2
    from .. import kernels as K
    from ..kernels import score_select, sparse_decode
    import torch.nn.functional as F
    t_start = time.time()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    es = 2
    hq, hkv, d = args.q_heads, args.kv_heads, args.head_dim
    contexts = [parse_tokens(c) for c in args.contexts.split(",") if c.strip()]
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    heavies = [parse_heavy(h) for h in args.budgets.split(",") if h.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in modes:
        if m not in MODE_SELECTION:
            raise SystemExit(f"unknown mode {m!r}: use {', '.join(MODE_SELECTION)}")
    measure = _timer(args.rep, not args.no_graphs, args.flush)
    name = _device_name(dev)
    log_lines = []

    def log(s):
        print(s, flush=True)
        log_lines.append(s)

    import triton
    log(f"device {name} | torch {torch.__version__} | triton {triton.__version__}")
    bw = copy_bandwidth(dev, measure)
    log(f"copy bandwidth {bw / 1e12:.2f} TB/s (read + write)")
    fi, fi_why = flashinfer.load()
    if fi is None:
        log(f"flashinfer: not measured ({fi_why})")
    tune = None
    if not args.no_tune:  # kernel 2's launch shape, on the longest context at batch 1, 1/32, shared selection
        n = max(contexts)
        budget = Budget(heavy=1 / 32, sink=args.sink, window=args.window)
        g = torch.Generator(device=dev).manual_seed(1)
        kc = torch.empty(1, hkv, n, d, device=dev, dtype=dtype).normal_(generator=g)
        vc = torch.empty_like(kc).normal_(generator=g)
        q = torch.randn(1, hq, d, device=dev, dtype=dtype, generator=g)
        q_sig = torch.randint(-2 ** 31, 2 ** 31 - 1, (1, hq, 1), device=dev, dtype=torch.int32, generator=g)
        k_sig = torch.randint(-2 ** 31, 2 ** 31 - 1, (1, hkv, n, 1), device=dev, dtype=torch.int32, generator=g)
        se = torch.zeros(1, dtype=torch.int32, device=dev), torch.full((1,), n, dtype=torch.int32, device=dev)
        n2 = min(contexts, key=lambda c: abs(c - 131072))  # a second, shorter case for kernel 1
        se2 = torch.zeros(1, dtype=torch.int32, device=dev), torch.full((1,), n2, dtype=torch.int32, device=dev)
        log(f"tuning kernel 1 launch shape at B=1 N={n} and N={n2} {budget.describe()}")
        tune_sel = tune_select([(q_sig, k_sig, *se, budget, hkv, True),
                                (q_sig, k_sig[:, :, :n2], *se2, budget, hkv, True)], measure, log)
        idx, counts = score_select(q_sig, k_sig, *se, budget, hkv, True)
        log(f"tuning kernel 2 launch shape at B=1 N={n} {budget.describe()}")
        tune = tune_decode(q, kc, vc, idx, counts, measure, log)
        tune["case"] = {"batch": 1, "context": n, "budget": budget.describe(), "mode": "group"}
        tune["select"] = tune_sel
        tune["kernels_us"] = kernel_breakdown(lambda: K.hash_decode_attention(q, kc, vc, q_sig, k_sig, *se, budget,
                                                                               True), log)
        del kc, vc, q, q_sig, k_sig, idx, counts
        torch.cuda.empty_cache()
    # with the launch shapes the tuning chose
    checks = [] if args.no_check else check_against_reference(dev, dtype, hq, hkv, d, log)
    rows = []
    for b in batches:
        for n in contexts:
            if args.time_limit and time.time() - t_start > args.time_limit:
                log(f"time limit reached: skipping batch {b} context {n} and later")
                break
            g = torch.Generator(device=dev).manual_seed(n + b)
            try:
                kc = torch.empty(b, hkv, n, d, device=dev, dtype=dtype).normal_(generator=g)
                vc = torch.empty(b, hkv, n, d, device=dev, dtype=dtype).normal_(generator=g)
            except torch.OutOfMemoryError:
                log(f"batch {b} context {n}: out of memory, skipped")
                torch.cuda.empty_cache()
                continue
            q = torch.randn(b, hq, d, device=dev, dtype=dtype, generator=g)
            q4 = q[:, :, None]
            q_sig = torch.randint(-2 ** 31, 2 ** 31 - 1, (b, hq, 1), device=dev, dtype=torch.int32, generator=g)
            k_sig = torch.randint(-2 ** 31, 2 ** 31 - 1, (b, hkv, n, 1), device=dev, dtype=torch.int32,
                                  generator=g)
            starts = torch.zeros(b, dtype=torch.int32, device=dev)
            lengths = torch.full((b,), n, dtype=torch.int32, device=dev)
            t_sdpa, e_sdpa = measure(lambda: F.scaled_dot_product_attention(q4, kc, vc, enable_gqa=True))
            layers = _chain_copies(args.chain if b == 1 and not args.no_graphs else 0, kc, vc, k_sig, log)
            t_sdpa_chain = None
            if layers:
                t_sdpa_chain = measure(lambda: [F.scaled_dot_product_attention(q4, kc_, vc_, enable_gqa=True)
                                                for kc_, vc_, _ in layers])[0] / len(layers)
            dense_bytes = 2 * b * hkv * n * d * es + 2 * b * hq * d * es
            t_read, read_shape = _read_floor(measure, k_sig)
            t_read_chain = None
            if layers:
                t_read_chain = measure(lambda: [stream_read(ks_, *read_shape) for _, _, ks_ in layers])[0] / len(layers)
            t_fi, fi_path = None, None
            if fi is not None:
                t_fi, fi_path = flashinfer.fastest(measure, lambda tc: flashinfer.dense_call(fi, q, kc, vc, tc), log,
                                                   "dense")
            base = {"batch": b, "context": n, "sdpa_ms": t_sdpa, "sdpa_eager_ms": e_sdpa,
                    "dense_bytes": dense_bytes, "sdpa_bw_frac": dense_bytes / (t_sdpa * 1e-3) / bw,
                    "flashinfer_ms": t_fi, "flashinfer_path": fi_path, "sdpa_chain_ms": t_sdpa_chain,
                    "chain": len(layers), "sig_read_measured_ms": t_read, "sig_read_shape": read_shape,
                    "sig_read_chain_ms": t_read_chain}
            log(f"B={b} N={n}: sdpa {t_sdpa * 1e3:.1f} us ({base['sdpa_bw_frac']:.0%} of copy bw)" +
                (f", flashinfer {t_fi * 1e3:.1f} us ({fi_path})" if t_fi else ""))
            for heavy in heavies:
                budget = Budget(heavy=heavy, sink=args.sink, window=args.window)
                k_sel = budget.total(n)
                row = {**base, "budget": budget.describe(), "heavy": heavy, "selected": k_sel}
                for mode in modes:
                    sel = MODE_SELECTION[mode]
                    per_group = sel != "head"
                    idx, counts = score_select(q_sig, k_sig, starts, lengths, budget, hkv, selection=sel)
                    t_sel, _ = measure(lambda: score_select(q_sig, k_sig, starts, lengths, budget, hkv,
                                                            selection=sel))
                    t_att, _ = measure(lambda: sparse_decode(q, kc, vc, idx, counts, check=False))
                    t_tot, e_tot = measure(lambda: K.hash_decode_attention(q, kc, vc, q_sig, k_sig, starts,
                                                                           lengths, budget, selection=sel))
                    hs = hkv if per_group else hq
                    sig_bytes = b * hkv * n * 4
                    kv_bytes = 2 * b * hs * k_sel * d * es  # per query head: its own rows (upper bound)
                    idx_bytes = 2 * b * hs * k_sel * 4  # written by kernel 1, read by kernel 2
                    floor = sig_bytes + kv_bytes + idx_bytes + 2 * b * hq * d * es
                    sig_read_ms = sig_bytes / bw * 1e3
                    row[mode] = {"select_ms": t_sel, "attention_ms": t_att, "total_ms": t_tot,
                                 "total_eager_ms": e_tot, "bytes": floor, "sig_bytes": sig_bytes,
                                 "kv_bytes": kv_bytes, "bw_frac": floor / (t_tot * 1e-3) / bw,
                                 "attention_bw_frac": (kv_bytes + idx_bytes / 2) / (t_att * 1e-3) / bw,
                                 "select_over_sig_read": t_sel / sig_read_ms,
                                 "select_over_measured_read": t_sel / t_read,
                                 "speedup_vs_sdpa": t_sdpa / t_tot, "bytes_ratio": dense_bytes / floor}
                    if fi is not None and per_group:  # FlashInfer's decode over the same rows, beside kernel 2
                        t, path = flashinfer.fastest(
                            measure, lambda tc: flashinfer.sparse_call(fi, q, kc, vc, idx, tc)[0], log, "sparse")
                        row[mode]["flashinfer_attention_ms"], row[mode]["flashinfer_attention_path"] = t, path
                    if layers and per_group:
                        t_ch = measure(lambda: [K.hash_decode_attention(q, kc_, vc_, q_sig, ks_, starts, lengths,
                                                                        budget, selection=sel)
                                                for kc_, vc_, ks_ in layers])[0] / len(layers)
                        t_sel_ch = measure(lambda: [score_select(q_sig, ks_, starts, lengths, budget, hkv,
                                                                 selection=sel)
                                                    for _, _, ks_ in layers])[0] / len(layers)
                        row[mode].update(chain_ms=t_ch, chain_speedup_vs_sdpa=t_sdpa_chain / t_ch,
                                         select_chain_ms=t_sel_ch,
                                         select_chain_over_sig_read=t_sel_ch / sig_read_ms,
                                         select_chain_over_measured_read=t_sel_ch / t_read_chain)
                        log(f"  {budget.describe()} {mode}, per call in a chain of {len(layers)}: "
                            f"{t_ch * 1e3:.1f} us vs sdpa {t_sdpa_chain * 1e3:.1f} us = {t_sdpa_chain / t_ch:.1f}x; "
                            f"select {t_sel_ch * 1e3:.1f} us ({t_sel_ch / sig_read_ms:.1f}x sig read at copy bw, "
                            f"{t_sel_ch / t_read_chain:.1f}x a measured read, {t_read_chain * 1e3:.1f} us)")
                    log(f"  {budget.describe()} {mode}: select {t_sel * 1e3:.1f} us "
                        f"({t_sel / sig_read_ms:.1f}x sig read at copy bw, {t_sel / t_read:.1f}x a measured read, "
                        f"{t_read * 1e3:.1f} us) + attention {t_att * 1e3:.1f} us = total {t_tot * 1e3:.1f} us "
                        f"(eager {e_tot * 1e3:.1f}); {t_sdpa / t_tot:.1f}x vs sdpa, bytes ratio "
                        f"{dense_bytes / floor:.1f}x, {row[mode]['bw_frac']:.0%} of copy bw")
                    del idx, counts
                rows.append(row)
            del kc, vc, q, q_sig, k_sig, layers
            torch.cuda.empty_cache()
    result = {"device": name, "torch": torch.__version__, "triton": triton.__version__,
              "copy_bandwidth_Bps": bw, "shapes": {"q_heads": hq, "kv_heads": hkv, "head_dim": d,
                                                   "dtype": args.dtype, "sink": args.sink,
                                                   "window": args.window},
              "timing": ("median of triton do_bench, L2 flushed by writing 256 MB" if args.flush == "write" else
                         "median over calls each after a read of 256 MB (L2 flushed, clean)") +
                        ", CUDA-graph replay" + ("" if not args.no_graphs else " (disabled: eager)"),
              "flush": args.flush,
              "flashinfer": None if fi is None else fi.__version__,
              "flashinfer_not_measured_because": fi_why, "checks": checks, "tune": tune, "rows": rows,
              "acceptance": acceptance(rows), "log": log_lines}
    from . import device_tag
    stem = f"attention_{device_tag(name)}" + (f"_{args.tag}" if args.tag else "")
    print(_write(result, args.out, stem))
    return 0


def _write(res: dict, out_dir: str, stem: str) -> str:
    return write_results(res, out_dir, stem, markdown, plot)


def plot(res: dict, path: str):
    """Speedup over SDPA against the context, one line per batch and budget (shared selection), the per-query-
    head selection and the per-call chain dashed; the issue's targets as crosses. Left: the whole call; right:
    the selection's time over one read of the signatures at copy bandwidth (single call, and dashed per call in a
    chain)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in res["rows"] if "group" in r]
    if not rows:
        return
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    heavy = {r["budget"].split()[0]: r["heavy"] for r in rows}
    for key in sorted({(r["batch"], r["budget"].split()[0]) for r in rows}, key=lambda k: (k[0], -heavy[k[1]])):
        b, bud = key
        sel = sorted((r for r in rows if (r["batch"], r["budget"].split()[0]) == key), key=lambda r: r["context"])
        x = [r["context"] // 1024 for r in sel]
        lab = f"B={b}, {bud.replace('heavy=', '')}"
        line, = ax.plot(x, [r["group"]["speedup_vs_sdpa"] for r in sel], "o-" if b == 1 else "^-", label=lab)
        if all("head" in r for r in sel):
            ax.plot(x, [r["head"]["speedup_vs_sdpa"] for r in sel], ":", color=line.get_color(), alpha=0.6)
        chain = [r for r in sel if r["group"].get("chain_speedup_vs_sdpa")]
        if chain:
            ax.plot([r["context"] // 1024 for r in chain], [r["group"]["chain_speedup_vs_sdpa"] for r in chain],
                    "s--", color=line.get_color(), label=f"{lab}, per call in a chain")
        ax2.plot(x, [r["group"]["select_over_sig_read"] for r in sel], "o-" if b == 1 else "^-",
                 color=line.get_color(), label=lab)
        chain = [r for r in sel if r["group"].get("select_chain_over_sig_read")]
        if chain:
            ax2.plot([r["context"] // 1024 for r in chain], [r["group"]["select_chain_over_sig_read"] for r in chain],
                     "s--", color=line.get_color(), label=f"{lab}, per call in a chain")
    for n, want in ((128, 6.0), (512, 12.0)):
        ax.plot([n], [want], "kx", markersize=9)
    ax.plot([], [], "kx", label="targets (B=1, 1/32, on an H100)")
    ax.plot([], [], "k:", label="per-query-head selection")
    ax2.plot([512], [3.0], "kx", markersize=9, label="target (512K, on an H100)")
    from matplotlib.ticker import FuncFormatter
    ctx = sorted({r["context"] // 1024 for r in rows})
    for a, title, ylab in ((ax, "decode attention, speedup over SDPA", "SDPA time / HashAttention time"),
                           (ax2, "selection time / one read of the signatures", "ratio")):
        a.set_xscale("log", base=2)
        a.set_yscale("log", base=2)
        a.set_xticks(ctx)
        a.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}K"))
        a.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        a.set_xlabel("context (K tokens)")
        a.set_ylabel(ylab)
        a.set_title(title, fontsize=10)
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    sh = res["shapes"]
    fig.suptitle(f"{res['device']}: {sh['q_heads']} q / {sh['kv_heads']} KV heads x {sh['head_dim']}, "
                 f"{sh['dtype']}, sink {sh['sink']} + window {sh['window']}, shared selection", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _read_floor(measure, k_sig) -> tuple:
    """The fastest single-call time (ms) of read_floor.stream_read over k_sig among its SHAPES, and that shape."""
    best = None
    for shape in SHAPES:
        t = measure(lambda: stream_read(k_sig, *shape))[0]
        if best is None or t < best[0]:
            best = (t, shape)
    return best


def _chain_copies(n: int, kc, vc, k_sig, log) -> list:
    """n copies of (k_cache, v_cache, k_sig), or none when they would take over half the free memory."""
    if n <= 0:
        return []
    need = n * (kc.numel() * kc.element_size() * 2 + k_sig.numel() * 4)
    free, _ = torch.cuda.mem_get_info(kc.device)
    if need > free // 2:
        log(f"chain of {n}: {need / 2 ** 30:.1f} GiB of copies, over half the free memory: skipped")
        return []
    return [(kc.clone(), vc.clone(), k_sig.clone()) for _ in range(n)]


def acceptance(rows) -> dict:
    """The issue's targets at batch 1, budget 1/32 (selection shared by each KV group)."""
    out = {}
    for r in rows:
        if r["batch"] != 1 or not isinstance(r["heavy"], float) or abs(r["heavy"] - 1 / 32) > 1e-12:
            continue
        for mode in MODE_SELECTION:
            if mode in r:
                out[f"{mode}_{r['context']}"] = {
                    "speedup_vs_sdpa": r[mode]["speedup_vs_sdpa"], "total_ms": r[mode]["total_ms"],
                    "select_over_sig_read": r[mode]["select_over_sig_read"], "sdpa_ms": r["sdpa_ms"],
                    **{k: r[mode].get(k) for k in ("chain_speedup_vs_sdpa", "select_chain_over_sig_read",
                                                   "select_over_measured_read", "select_chain_over_measured_read")}}
    targets = {}
    for n, want in ((131072, 6.0), (524288, 12.0)):
        got = out.get(f"group_{n}")
        if got:
            targets[f"speedup_{n}"] = {"want": want, "got": got["speedup_vs_sdpa"],
                                       "met": got["speedup_vs_sdpa"] >= want}
    got = out.get("group_524288")
    if got:
        # judged on the single call; the per-call figure in a chain (launch and timer paid once for 8 calls) and
        # the ratios to a measured read of the signatures are reported beside it
        targets["select_within_3x_sig_read_524288"] = {"want": 3.0, "got": got["select_over_sig_read"],
                                                       "met": got["select_over_sig_read"] <= 3.0,
                                                       "chain": got["select_chain_over_sig_read"],
                                                       "vs_measured_read": got["select_over_measured_read"],
                                                       "chain_vs_measured_read":
                                                           got["select_chain_over_measured_read"]}
    return {"cases": out, "targets": targets}


def markdown(res) -> str:
    bw = res["copy_bandwidth_Bps"]
    sh = res["shapes"]
    lines = [f"# Decode attention: HashAttention kernels vs SDPA ({res['device']})", "",
             f"{sh['q_heads']} query heads, {sh['kv_heads']} KV heads, head_dim {sh['head_dim']}, {sh['dtype']}; "
             f"sink {sh['sink']} + window {sh['window']} + heavy budget. torch {res['torch']}, triton "
             f"{res['triton']}. Copy bandwidth {bw / 1e12:.2f} TB/s (read + write). Times: {res['timing']}, "
             "in microseconds. group = one selection per KV group; head = one per query head. "
             "sel = kernel 1 (scoring + selection), att = kernel 2 (sparse attention), tot = both in one call. "
             "x = speedup over SDPA; bytes = dense bytes / HashAttention floor bytes; bw = floor bytes / time as a "
             "fraction of copy bandwidth; sel/sig = kernel 1 time over one read of the signatures at copy "
             "bandwidth.", ""]
    fi = any(r.get("flashinfer_ms") for r in res["rows"])
    if fi:
        lines += [f"FlashInfer {res.get('flashinfer')} (bench/flashinfer_env.sh): FI = its decode over the whole cache "
                  "(batch 1 single_decode_with_kv_cache, else its paged decode on pages of 16 rows), FI att = its paged "
                  "decode over kernel 1's rows (pages of one row), beside att; each the faster of its CUDA-core and "
                  "tensor-core paths.", ""]
    elif res.get("flashinfer_not_measured_because"):
        lines += [f"FlashInfer: not measured ({res['flashinfer_not_measured_because']}); "
                  "bench/flashinfer_env.sh installs it on the device machine.", ""]
    acc = res["acceptance"]["targets"]
    if acc:
        lines += ["Targets (batch 1, 1/32, shared by KV group): " + "; ".join(
            f"{k}: {v['got']:.2f} (want {'>=' if 'speedup' in k else '<='} {v['want']}, "
            f"{'met' if v['met'] else 'MISSED'})" for k, v in acc.items()), ""]
        sel = acc.get("select_within_3x_sig_read_524288", {})
        if sel.get("vs_measured_read") is not None:
            lines += ["Selection at 512K beside that single-call ratio: " + "; ".join(
                f"{lab} {sel[k]:.2f}" for k, lab in (
                    ("chain", "per call in a chain, over the read at copy bandwidth"),
                    ("vs_measured_read", "single call, over a measured read of the signatures (read = "
                                         "benchmarks/read_floor.py, same timer)"),
                    ("chain_vs_measured_read", "per call in a chain, over the measured read in the same chain"))
                if sel.get(k) is not None), ""]
    head = ("| B | budget | N | SDPA | SDPA bw |" + (" FI |" if fi else "") + " group sel | att |" +
            (" FI att |" if fi else "") + " tot | x | sel/sig | bw | bytes | head sel | att | tot | x |")
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for r in res["rows"]:
        gp, hd = r.get("group"), r.get("head")

        def us(x):
            return f"{x * 1e3:.1f}" if x is not None else "-"
        cells = [str(r["batch"]), r["budget"].split()[0].replace("heavy=", ""), f"{r['context'] // 1024}K",
                 us(r["sdpa_ms"]), f"{r['sdpa_bw_frac']:.0%}"]
        if fi:
            cells.append(us(r.get("flashinfer_ms")))
        cells += ([us(gp["select_ms"]), us(gp["attention_ms"])] +
                  ([us(gp.get("flashinfer_attention_ms"))] if fi else []) +
                  [us(gp["total_ms"]), f"{gp['speedup_vs_sdpa']:.1f}", f"{gp['select_over_sig_read']:.1f}",
                   f"{gp['bw_frac']:.0%}", f"{gp['bytes_ratio']:.1f}"] if gp else ["-"] * (8 if fi else 7))
        cells += ([us(hd["select_ms"]), us(hd["attention_ms"]), us(hd["total_ms"]),
                   f"{hd['speedup_vs_sdpa']:.1f}"] if hd else ["-"] * 4)
        lines.append("| " + " | ".join(cells) + " |")
    chained = [r for r in res["rows"] if r.get("group", {}).get("chain_ms")]
    if chained:
        lines += ["", f"Per call in a chain (batch 1, shared selection): {chained[0]['chain']} calls captured in one "
                  "CUDA graph, each on its own copy of the caches (none of it in L2 when its turn comes), as the "
                  "layers of a decode step run them; the graph's launch and the timer's events are then paid once "
                  "for all of them instead of once per call. Same timer otherwise.", "",
                  "sel = kernel 1 alone in such a chain, read = a kernel reading the signatures once "
                  "(benchmarks/read_floor.py) in such a chain, sel/sig = sel over one read of the signatures at copy "
                  "bandwidth.", "",
                  "| budget | N | SDPA | HashAttention | x | x single call | sel | read | sel/sig | sel/read |",
                  "|---|---|---|---|---|---|---|---|---|---|"]

        def cell(x, scale=1.0):
            return "-" if x is None else f"{x * scale:.1f}"
        for r in chained:
            gp = r["group"]
            lines.append(f"| {r['budget'].split()[0].replace('heavy=', '')} | {r['context'] // 1024}K | "
                         f"{r['sdpa_chain_ms'] * 1e3:.1f} | {gp['chain_ms'] * 1e3:.1f} | "
                         f"{gp['chain_speedup_vs_sdpa']:.1f} | {gp['speedup_vs_sdpa']:.1f} | "
                         f"{cell(gp.get('select_chain_ms'), 1e3)} | {cell(r.get('sig_read_chain_ms'), 1e3)} | "
                         f"{cell(gp.get('select_chain_over_sig_read'))} | "
                         f"{cell(gp.get('select_chain_over_measured_read'))} |")
    cmp = [r for r in res["rows"] if sum(m in r for m in MODE_SELECTION) > 1]
    if cmp:
        modes = [m for m in MODE_SELECTION if any(m in r for r in cmp)]
        lines += ["", "Selections side by side (tot = both kernels, single call, us; x = over SDPA; chain = per call in "
                  "a chain; rel = x over the group selection's x, same run): " + ", ".join(
                      f"{m} = {MODE_SELECTION[m]}" for m in modes) + ".", "",
                  "| B | budget | N | " + " | ".join(f"{m} tot | x | chain x | rel" for m in modes) + " |",
                  "|---|---|---|" + "---|---|---|---|" * len(modes)]
        for r in cmp:
            cells = [str(r["batch"]), r["budget"].split()[0].replace("heavy=", ""), f"{r['context'] // 1024}K"]
            for m in modes:
                e, g = r.get(m), r.get("group")
                if e is None:
                    cells += ["-"] * 4
                    continue
                ch = e.get("chain_speedup_vs_sdpa")
                cells += [f"{e['total_ms'] * 1e3:.1f}", f"{e['speedup_vs_sdpa']:.2f}",
                          "-" if ch is None else f"{ch:.2f}",
                          "-" if g is None else f"{e['speedup_vs_sdpa'] / g['speedup_vs_sdpa']:.0%}"]
            lines.append("| " + " | ".join(cells) + " |")
    if res.get("tune"):
        c = res["tune"]["chosen"]
        lines += ["", f"Kernel 2 launch shape (fastest of a sweep on {res['tune'].get('case')}): {c}"]
        if res["tune"].get("select"):
            lines += ["", "Kernel 1 launch shape (smallest relative time at the longest context and near 128K, "
                      f"batch 1, 1/32): {res['tune']['select']['chosen']}"]
    if res.get("checks"):
        lines += ["", "Checks against the PyTorch reference: " + "; ".join(
            f"N={c['context']} B={c['batch']} {c.get('selection', c['per_group'])}: same selection {c['same_selection']}, "
            f"rel err {c['rel_err']:.1e}" for c in res["checks"])]
    return "\n".join(lines) + "\n"
