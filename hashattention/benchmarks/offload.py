"""`hashattention bench decode --offload host`: HashAttention with the K/V in host memory (issue 25), beside
the FlexGen-style dense baseline (every host row streamed every step) and dense / HashAttention on the GPU.

Per case (context, batch, heavy budget) and mode:

    hash-offload   engine offload="host": signatures, sink, window and a heavy-row cache on the GPU; only the
                   selected rows that miss the cache cross PCIe (a Triton gather reading pinned memory)
    dense-offload  the same placement without maps: dense attention reads every host row over PCIe (zero-copy)
    dense-gpu      everything on the GPU, dense attention (where it fits)
    hash-gpu       everything on the GPU, HashAttention (where it fits)

Batches: "1" and "max" (hash-offload: the largest batch card plus host memory hold, tiered by layer; the
GPU modes: the largest the card holds). The cache contents are synthetic (random K/V and signatures: the
step time does not depend on the values, the hit rate does: random signatures select nearly at random, so
their hit rate is a lower bound). ``--query-drift F`` makes each step's query signatures flip a fraction F of
the bits of the step before instead, a model of decode's temporal locality: at the real-text case's shape (default
model, 8K, heavy 1/32, every layer on the host, 47 steps from a cold cache) F = 0.04 gives its hit rate with C =
1x heavy (0.635 against 0.636 on real text) but 0.730 at 2x (real text 0.817, F = 0.02 gives 0.831): a random
walk brings back fewer rows dropped a few steps ago than text does. ``--real-text`` adds the default model on
held-out text with offload forced (every layer on the host), where hit rate and bytes per step are those of real
decoding.

Counters live on the device (no sync per step): heavy lookups and hits, read once after the timed steps.
"""
from __future__ import annotations

import json
import os
import time

import torch

from ..core.budget import Budget, parse_heavy
from ..engine.generate import Generator
from ..engine.memory import GIB, largest_batch, largest_offload_batch, offload_plan, parse_bytes, parse_tokens
from ..engine.offload import host_available_bytes
from . import write_results

OFFLOAD_MODES = ("hash-offload", "dense-offload", "dense-gpu", "hash-gpu")


def add_arguments(p):
    p.add_argument("--offload", default="", choices=["", "host"],
                   help="host: K/V in host memory, signatures on the GPU (writes offload_<device>.*)")
    p.add_argument("--offload-modes", default=",".join(OFFLOAD_MODES), help="with --offload: comma list of "
                   + ", ".join(OFFLOAD_MODES))
    p.add_argument("--gpu-layers", default="auto", help="with --offload: layers whose K/V stay on the GPU "
                   "(auto: as many as fit; 0: every layer's K/V in host memory)")
    p.add_argument("--row-cache", default="2", help="with --offload: GPU heavy-row cache per KV head, in "
                   "multiples of the heavy budget (comma list to compare, e.g. 1,2)")
    p.add_argument("--offload-read", default="gather", help="with --offload: how hash-offload reads the host rows: "
                   "gather (misses copied into the GPU row cache) and/or direct (attention reads every selected "
                   "host row zero-copy, no cache); a comma list to compare")
    p.add_argument("--host-memory", default="", help="with --offload: host memory to use (default: available)")
    p.add_argument("--host-reserve-gib", type=float, default=8.0, help="host memory left free when sizing 'max'")
    p.add_argument("--dense-offload-batches", default="1", help="with --offload: batches ('1', 'max') at which "
                   "the dense-offload baseline runs (it streams the whole host cache every step)")
    p.add_argument("--real-text", default="", help="with --offload: context (e.g. 8K) of the real-text case: the "
                   "default model on held-out text, offload forced")
    p.add_argument("--real-text-tokens", type=int, default=64, help="decode steps of the real-text case")
    p.add_argument("--query-drift", type=float, default=0.0, help="with --offload, synthetic cases: each step's "
                   "query signatures flip this fraction of the bits of the step before (a model of decode's temporal "
                   "locality: hits in the heavy-row cache); 0 (default): random signatures each step, the hit "
                   "rate's lower bound")
    p.add_argument("--offload-breakdown", default="on", choices=["on", "off"], help="with --offload: also time "
                   "the step without attention and with a fixed resident selection (the time breakdown)")


def measure_h2d(dev, nbytes: int = GIB, reps: int = 5) -> float | None:
    """Bytes/s of a pinned host -> GPU copy (the best of ``reps``)."""
    if dev.type != "cuda":
        return None
    src = torch.empty(nbytes, dtype=torch.uint8, device="cpu", pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    best = float("inf")
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src, non_blocking=True)
        b.record()
        b.synchronize()
        best = min(best, a.elapsed_time(b) / 1e3)
    del src, dst
    return nbytes / best


def _fill(t: torch.Tensor, g: torch.Generator, block: int = 1 << 24):
    """Random values into a large tensor (host or GPU) cheaply: one random block, copied along it."""
    flat = t.view(-1)
    if not flat.numel():  # e.g. no host layer: every layer fitted on the card
        return
    r = torch.randn(min(block, flat.numel()), generator=g, device=t.device).to(t.dtype)
    for i in range(0, flat.numel(), r.numel()):
        n = min(r.numel(), flat.numel() - i)
        flat[i:i + n].copy_(r[:n])


def _synthetic(m, context: int):
    g = torch.Generator(device=m.device).manual_seed(0)
    gh = torch.Generator().manual_seed(0)
    if m.k_cache.numel():
        _fill(m.k_cache, g)
        _fill(m.v_cache, g)
    hk = m.host_kv
    if hk is not None:
        for t in hk.host_tensors():
            _fill(t, gh)
        if hk.hash_mode:
            _fill(hk.ws_k, g)
            _fill(hk.ws_v, g)
            hk.reset()
    if m.sig_cache is not None:
        m.sig_cache[:, :, :, :context].random_(-2 ** 31, 2 ** 31 - 1, generator=g)


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _time(gen, mode, pos, steps, warmup, dev) -> float:
    """ms per step over ``steps`` steps from ``pos`` after ``warmup`` (:meth:`Generator.time_steps`: the offload
    counters then hold the timed steps only)."""
    return gen.time_steps(mode, pos, steps, warmup)


def _free(m):
    m.k_cache = m.v_cache = m.sig_cache = None
    m.host_kv = None
    if m.device.type == "cuda":
        torch.cuda.synchronize(m.device)
        torch.cuda.empty_cache()


def _case(m, maps, budget, heavy_label, context, batch, mode, args, slots, gpu_layers, bw, device_name,
          read="gather") -> dict:
    from .engine_setup import _fixed_index
    dev = m.device
    steps, warmup = args.steps, args.warmup
    s = context + steps + warmup + 8
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    offload = mode.endswith("offload")
    hashed = mode.startswith("hash")
    kw = {}
    if offload and gpu_layers is None and dev.type == "cuda":
        # as many layers on the GPU as fit with the benchmark's spare room (graph pools, kernels' temporaries)
        torch.cuda.empty_cache()
        gpu_layers = offload_plan(m.c, batch, s, torch.cuda.mem_get_info(dev)[0], args.host_bytes, dtype=m.dtype,
                                  maps_config=maps.config if hashed else None, sink=args.sink, window=args.window,
                                  row_cache=slots if hashed else 0, reserve=int(args.reserve_gib * GIB),
                                  host_reserve=0)["gpu_layers"]
    if offload:
        kw = dict(offload="host", gpu_layers=gpu_layers, row_cache=slots if hashed else None,
                  dense_baseline=not hashed, host_memory=args.host_bytes, offload_read=read)
        if dev.type != "cuda":
            kw["_host_device"] = "cpu"  # the CPU run checks the report's format only
    m.setup_caches(batch, s, maps=maps if hashed else None, budget=budget, **kw)
    row = {"context": context, "batch": batch, "mode": mode, "heavy": heavy_label, "device": device_name}
    if offload and hashed:
        row["read"] = read
        if read == "gather" and m.host_kv is not None and m.host_kv.hash_mode:
            row["fetch"] = m.host_kv.fetch_mode  # HASHATTENTION_OFFLOAD_FETCH (auto, split, fused, reference)
    try:
        _synthetic(m, context)
        if hashed and getattr(args, "query_drift", 0):
            m.set_query_drift(args.query_drift, torch.Generator(device=dev).manual_seed(1))
        gen = Generator(m, max_new_tokens=max(steps, warmup) + 2)
        ms = _time(gen, "hash" if hashed else "dense", context, steps, warmup, dev)
        row["ms_per_step"] = ms
        row["tok_s"] = batch * 1e3 / ms
        hk = m.host_kv
        row_bytes = 2 * m.c.head_dim * m.dtype.itemsize  # one token's K and V of one KV head
        pcie, hit = 0.0, None
        if offload and hashed:
            st = m.offload_stats()
            pcie = st["rows_fetched"] * row_bytes / steps
            hit = st["hit_rate"]
            row["heavy_rows_per_step"] = st["lookups"] / steps
        elif offload:  # every host row of the context, every step
            pcie = float(len(hk.host_layers) * batch * m.c.num_kv_heads * (context + steps / 2) * row_bytes)
        row.update(pcie_bytes_per_step=pcie, hit_rate=hit)
        if offload:
            row["gpu_layers"] = m.c.num_layers - len(hk.host_layers)
            row["row_cache"] = hk.slots if hashed and read == "gather" else 0
            row["layout"] = hk.layout
        if bw and pcie:
            row["bw_fraction"] = pcie / (ms / 1e3) / bw
        if offload and hashed and read == "gather" and args.offload_breakdown == "on":
            # rest of the model (no attention) and attention over a fixed, resident selection (no transfer,
            # no selection): the step = rest + attention + (selection + transfer)
            gen.fixed_index = _fixed_index(m, context)
            none_ms = _time(gen, "none", context, steps, warmup, dev)
            fixed_ms = _time(gen, "hash-fixed", context, steps, warmup, dev)
            row["breakdown_ms"] = {"rest_of_model": none_ms, "attention_working_set": fixed_ms - none_ms,
                                   "selection_and_transfer": ms - fixed_ms}
        del gen
        _sync(dev)
        row["gpu_peak_gib"] = torch.cuda.max_memory_allocated(dev) / GIB if dev.type == "cuda" else None
        row["host_gib"] = hk.host_bytes() / GIB if hk is not None else 0.0
    finally:
        _free(m)
    return row


def _real_text(args, dev, dtype, device_name, heavies, factors) -> list:
    """The default model on held-out text at ``--real-text`` tokens, every layer's K/V on the host: hit rate and
    bytes per step of real decoding, and its tokens against the on-GPU HashAttention path."""
    from ..evaluation.perplexity import perplexity_rows
    from .engine_setup import _load, _maps_for
    ctx = parse_tokens(args.real_text)
    m, _, tok, _ = _load("default", dev, dtype, keep_hf=False)
    maps, _ = _maps_for(m, "default", dev)
    ids = torch.tensor(perplexity_rows(tok, 1, ctx), device=dev)
    n = args.real_text_tokens
    rows = []
    for label, heavy in heavies:
        budget = Budget(heavy=heavy, sink=args.sink, window=args.window)
        m.setup_caches(1, ctx + n + 8, maps=maps, budget=budget)
        ref = Generator(m).generate(ids, n, mode="hash")
        _free(m)
        for f in factors:
            slots = max(1, round(f * budget.heavy_count(ctx + n + 8)))
            kw = {"_host_device": "cpu"} if dev.type != "cuda" else {}
            m.setup_caches(1, ctx + n + 8, maps=maps, budget=budget, offload="host", gpu_layers=0, row_cache=slots,
                           **kw)
            gen = Generator(m, max_new_tokens=n + 2)
            gen.capture("hash")  # before the prefill, which resets the row caches
            gen._start(ids, n, "hash", 8192)
            _sync(dev)
            t0 = time.perf_counter()
            gen.run_steps(n - 1, "hash")
            _sync(dev)
            dt = time.perf_counter() - t0
            st = m.offload_stats()
            same = (gen.out[:, :n] == ref).all(0).tolist()
            rows.append({"context": ctx, "batch": 1, "mode": "hash-offload", "heavy": label, "text": "real",
                         "model": "default", "tok_s": (n - 1) / dt, "ms_per_step": dt * 1e3 / (n - 1),
                         "pcie_bytes_per_step": st["bytes_fetched"] / (n - 1), "hit_rate": st["hit_rate"],
                         "row_cache": slots, "row_cache_factor": f, "gpu_layers": 0,
                         "heavy_rows_per_step": st["lookups"] / (n - 1),
                         "tokens_equal_to_gpu_path": same.index(False) if False in same else len(same),
                         "new_tokens": n, "gpu_peak_gib": (torch.cuda.max_memory_allocated(dev) / GIB
                                                           if dev.type == "cuda" else None),
                         "host_gib": m.host_kv.host_bytes() / GIB, "device": device_name})
            print(json.dumps(rows[-1]), flush=True)
            del gen
            _free(m)
    del m
    return rows


def run(args) -> int:
    from . import device_tag
    from .engine_setup import _device_name, _load, _maps_for
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("bench decode --offload host needs CUDA (or --device cpu for a format check at tiny sizes)")
    modes = [x.strip() for x in args.offload_modes.split(",") if x.strip()]
    bad = [x for x in modes if x not in OFFLOAD_MODES]
    if bad:
        raise ValueError(f"unknown offload modes {bad}; choose from {OFFLOAD_MODES}")
    gpu_layers = None if args.gpu_layers == "auto" else int(args.gpu_layers)
    factors = [float(x) for x in args.row_cache.split(",") if x.strip()]
    heavies = [(x.strip(), parse_heavy(x.strip())) for x in args.heavy.split(",") if x.strip()]
    contexts = [parse_tokens(x) for x in args.contexts.split(",") if x.strip()]
    host_total = parse_bytes(args.host_memory) if args.host_memory else host_available_bytes()
    args.host_bytes = host_total
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32  # CPU matmuls are slow in bf16
    t_start = time.perf_counter()
    name_dev = _device_name(dev)
    res = {"device": name_dev, "torch": torch.__version__, "steps": args.steps, "sink": args.sink,
           "window": args.window, "host_memory_gib": host_total / GIB, "h2d_bandwidth_Bps": measure_h2d(dev),
           "fill": "synthetic K/V and signatures (random: the hit rate is a lower bound); real text: see rows "
                   "with text=real", "rows": []}
    if getattr(args, "query_drift", 0):
        res["query_drift"] = args.query_drift
        res["fill"] = (f"synthetic K/V and signatures, query signatures drifting ({args.query_drift:g} of the bits "
                       "flipped per step); real text: see rows with text=real")
    if dev.type != "cuda":
        res["note"] = "CPU run: a format check only, the numbers mean nothing"
    out_dir = os.environ.get("OUT") or args.out
    name = f"offload_{device_tag(name_dev)}" + (f"_{args.tag}" if args.tag else "")

    def add(row):
        res["rows"].append(row)
        print(json.dumps(row), flush=True)
        write(res, out_dir, name)

    for spec in [x.strip() for x in args.models.split(",") if x.strip()]:
        m, _, _, desc = _load(spec, dev, dtype, keep_hf=False)
        maps, maps_kind = _maps_for(m, spec, dev)
        res.setdefault("models", []).append({"model": spec, "description": desc, "maps": maps_kind})
        for ctx in contexts:
            for label, heavy in heavies:
                budget = Budget(heavy=heavy, sink=args.sink, window=args.window)
                s = ctx + args.steps + args.warmup + 8
                for f in factors:
                    slots = max(1, round(f * budget.heavy_count(s)))
                    if dev.type == "cuda":
                        torch.cuda.empty_cache()
                        free = torch.cuda.mem_get_info(dev)[0]
                    else:
                        free = host_total  # the CPU run: the "GPU" is the host
                    reserve = args.reserve_gib * GIB
                    hostroom = host_total
                    fit_off = min(args.max_batch, largest_offload_batch(
                        m.c, s, free, hostroom, dtype=dtype, maps_config=maps.config, sink=args.sink,
                        window=args.window, row_cache=slots, reserve=reserve,
                        host_reserve=int(args.host_reserve_gib * GIB), limit=args.max_batch))
                    fit_dense = min(args.max_batch, largest_batch(m.c, s, free, dtype, None, reserve=reserve))
                    fit_hash = min(args.max_batch, largest_batch(m.c, s, free, dtype, maps.config, reserve=reserve))
                    plan = []
                    reads = [x.strip() for x in args.offload_read.split(",") if x.strip()]
                    for bs in [x.strip() for x in args.batches.split(",") if x.strip()]:
                        for mode, read in [(md, rd) for md in modes
                                           for rd in (reads if md == "hash-offload" else ["gather"])]:
                            if read == "direct" and f != factors[0]:
                                continue  # no row cache to vary
                            fit = {"hash-offload": fit_off, "dense-offload": fit_off, "dense-gpu": fit_dense,
                                   "hash-gpu": fit_hash}[mode]
                            if mode == "dense-offload" and bs not in args.dense_offload_batches.split(","):
                                continue
                            if mode.endswith("gpu") and f != factors[0]:
                                continue  # the row cache does not matter there
                            if mode.startswith("dense") and (label != heavies[0][0] or f != factors[0]):
                                continue  # nor the heavy budget: dense runs once per context
                            b = fit if bs == "max" else int(bs)
                            if b < 1 or b > fit:
                                plan.append((mode, bs, None, read))
                            elif (mode, b, read) not in [(p[0], p[2], p[3]) for p in plan]:
                                plan.append((mode, bs, b, read))
                    for mode, bs, b, read in plan:
                        if args.time_limit and time.perf_counter() - t_start > args.time_limit:
                            print(f"time limit reached: skipping {mode} {ctx} x {bs}", flush=True)
                            continue
                        hl = "-" if mode.startswith("dense") else label
                        if b is None:
                            add({"context": ctx, "batch": bs, "mode": mode, "heavy": hl, "device": name_dev,
                                 "error": "does not fit"})
                            continue
                        try:
                            row = _case(m, maps, budget, hl, ctx, b, mode, args, slots, gpu_layers,
                                        res["h2d_bandwidth_Bps"], name_dev, read)
                        except Exception as e:  # keep the other cases; the error is recorded with the case
                            row = {"context": ctx, "batch": b, "mode": mode, "heavy": hl, "device": name_dev,
                                   "error": f"{type(e).__name__}: {e}"[:500]}
                            _free(m)
                        row.update(largest_batch=fit_off if mode.endswith("offload") else
                                   (fit_dense if mode == "dense-gpu" else fit_hash), row_cache_factor=f, model=spec)
                        add(row)
        del m, maps
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    if args.real_text and not (args.time_limit and time.perf_counter() - t_start > args.time_limit):
        for row in _real_text(args, dev, dtype, name_dev, heavies, factors):
            add(row)
    res["wall_s"] = time.perf_counter() - t_start
    write(res, out_dir, name)
    print(table(res))
    return 0


def summary(res: dict) -> list[str]:
    """The acceptance comparisons found in the rows, each within one run (rows joined from several runs carry
    their ``run``): hash-offload over dense-offload at the same case, direct reads against the row cache, and the
    largest tiered batch against the largest dense batch on the card (with their throughput)."""
    rows = [r for r in res["rows"] if "tok_s" in r and r.get("text") != "real"]
    out = []
    same = lambda a, b: (a["context"], a["batch"], a.get("run")) == (b["context"], b["batch"], b.get("run"))  # noqa: E731
    for r in rows:
        if r["mode"] != "hash-offload":
            continue
        for d in rows:
            if d["mode"] == "dense-offload" and same(r, d):
                out.append(f"- {r['context']:,} x {r['batch']}, heavy {r['heavy']}, "
                           f"{'direct reads' if r.get('read') == 'direct' else 'row cache ' + str(r.get('row_cache'))}"
                           f"{_variant(r) if r.get('read') != 'direct' else ''}: "
                           f"hash-offload {r['tok_s']:.1f} tok/s, dense-offload {d['tok_s']:.2f} tok/s: "
                           f"**{r['tok_s'] / d['tok_s']:.1f}x**")
            if r.get("read") == "direct" and d["mode"] == "hash-offload" and d.get("read") != "direct" \
                    and d["heavy"] == r["heavy"] and same(r, d):
                out.append(f"- {r['context']:,} x {r['batch']}, heavy {r['heavy']}: direct reads {r['tok_s']:.1f} "
                           f"tok/s against the row cache's {d['tok_s']:.1f}: **{r['tok_s'] / d['tok_s']:.2f}x**")
            if r.get("layout") == "interleaved" and d.get("layout") == "separate" and d["mode"] == "hash-offload" \
                    and d["heavy"] == r["heavy"] and d.get("row_cache") == r.get("row_cache") and same(r, d):
                out.append(f"- {r['context']:,} x {r['batch']}, heavy {r['heavy']}: a token's K and V side by side in "
                           f"host memory {r['tok_s']:.1f} tok/s against two separate tensors' {d['tok_s']:.1f}: "
                           f"**{r['tok_s'] / d['tok_s']:.2f}x**")
            if r.get("fetch") == "fused" and d.get("fetch") == "split" and d["heavy"] == r["heavy"] and same(r, d):
                out.append(f"- {r['context']:,} x {r['batch']}, heavy {r['heavy']}: the rows copied inside the fetch "
                           f"kernel {r['tok_s']:.1f} tok/s against a second gather kernel's {d['tok_s']:.1f}: "
                           f"**{r['tok_s'] / d['tok_s']:.2f}x**")
    for ctx, run in sorted({(r["context"], r.get("run") or "") for r in rows}):
        here = [r for r in rows if r["context"] == ctx and (r.get("run") or "") == run]
        off = [r for r in here if r["mode"] == "hash-offload"]
        dense = [r for r in here if r["mode"] == "dense-gpu"]
        if off and dense:
            bo = max(off, key=lambda r: (r["batch"], r.get("layout") != "separate", r["tok_s"]))  # the default
            bd = max(dense, key=lambda r: (r["batch"], r["tok_s"]))
            drift = f", query drift {bo['query_drift']:g}" if bo.get("query_drift") else ""
            tag = f", run {run}" if run else ""
            out.append(f"- {ctx:,}{drift}{tag}: largest batch with offload {bo['batch']} ({bo['tok_s']:.1f} tok/s, "
                       f"{bo.get('gpu_layers')} layers' K/V on the GPU) against the largest dense batch on the card "
                       f"{bd['batch']} ({bd['tok_s']:.1f} tok/s): **{bo['batch'] / bd['batch']:.2f}x** the batch, "
                       f"**{bo['tok_s'] / bd['tok_s']:.2f}x** the throughput")
    return out


def _variant(r: dict) -> str:
    """How hash-offload read its rows, where a run compared ways: direct reads, or the fetch kernel's mode."""
    if r.get("read") == "direct":
        return " (direct)"
    ways = [f"{r['fetch']} fetch"] if r.get("fetch") and r.get("run") else []
    if r.get("layout") and r.get("run") and r["mode"] == "hash-offload":
        ways.append(r["layout"])
    return f" ({', '.join(ways)})" if ways else ""


def table(res: dict) -> str:
    bw = res.get("h2d_bandwidth_Bps")
    lines = [f"# Decode with the K/V in host memory ({res['device']})", "",
             f"torch {res.get('torch')}; sink {res['sink']}, window {res['window']}; {res['steps']} timed steps per "
             f"case (CUDA graphs); host memory {res['host_memory_gib']:.1f} GiB; pinned host -> GPU copy "
             + (f"{bw / 1e9:.1f} GB/s" if bw else "not measured") + f"; cache fill: {res['fill']}.", ""]
    if res.get("note"):
        lines += [f"**{res['note']}**", ""]
    lines += ["| context | batch | mode | heavy | row cache | GPU layers | tok/s | ms/step | PCIe MB/step | hit rate | "
              "% of H2D | GPU peak GiB | host GiB | text |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        if "error" in r:
            lines.append(f"| {r['context']:,} | {r['batch']} | {r['mode']} | {r['heavy']} | error: {r['error']} |")
            continue
        f = lambda v, fmt: "-" if v is None else format(v, fmt)
        lines.append(
            f"| {r['context']:,} | {r['batch']} | {r['mode']}{_variant(r)} | "
            f"{r['heavy']} | {r.get('row_cache', '-')} | "
            f"{r.get('gpu_layers', '-')} | {r['tok_s']:.2f} | {r['ms_per_step']:.2f} | "
            f"{r['pcie_bytes_per_step'] / 1e6:.2f} | {f(r.get('hit_rate'), '.3f')} | "
            f"{f(r.get('bw_fraction') and 100 * r['bw_fraction'], '.0f')} | {f(r.get('gpu_peak_gib'), '.2f')} | "
            f"{r['host_gib']:.2f} | {r.get('text', 'synthetic')}"
            f"{', drift ' + format(r['query_drift'], 'g') if r.get('query_drift') else ''} |")
    bd = [r for r in res["rows"] if r.get("breakdown_ms")]
    if bd:
        lines += ["", "Time per step of hash-offload (ms): rest of the model (no attention), attention over the GPU "
                  "working set (a fixed resident selection), selection + transfer (the rest of the step).", "",
                  "| context | batch | heavy | rest of model | attention | selection + transfer |", "|---|---|---|---|---|---|"]
        for r in bd:
            b = r["breakdown_ms"]
            lines.append(f"| {r['context']:,} | {r['batch']} | {r['heavy']} | {b['rest_of_model']:.2f} | "
                         f"{b['attention_working_set']:.2f} | {b['selection_and_transfer']:.2f} |")
    s = summary(res)
    if s:
        lines += ["", "Comparisons (same run):", ""] + s
    if res.get("fetch"):  # `bench fetch` runs joined to this file: one host layer's fetch alone
        from .fetch import markdown as fetch_markdown
        for f in res["fetch"]:
            lines += [""] + ["#" + x if x.startswith("# ") else x for x in fetch_markdown(f).splitlines()]
    return "\n".join(lines) + "\n"


def write(res: dict, out_dir: str, name: str):
    write_results(res, out_dir, name, table, plot)


def plot(res: dict, path: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in res["rows"] if "tok_s" in r]
    if not rows:
        return
    colors = {"hash-offload": "tab:red", "dense-offload": "tab:gray", "dense-gpu": "tab:blue", "hash-gpu": "tab:orange"}
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(rows) + 2), 4.5))
    labels = [f"{r['context'] // 1024}K x{r['batch']}\n{r['heavy']}" + ("\nreal" if r.get("text") == "real" else "")
              for r in rows]
    ax.bar(range(len(rows)), [r["tok_s"] for r in rows], color=[colors[r["mode"]] for r in rows])
    for i, r in enumerate(rows):
        if r.get("hit_rate") is not None:
            ax.annotate(f"hit {r['hit_rate']:.2f}", (i, r["tok_s"]), fontsize=7, ha="center",
                        textcoords="offset points", xytext=(0, 3))
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("tokens / s (all sequences)")
    ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=c) for c in colors.values()], labels=list(colors),
              fontsize=7)
    ax.set_title(f"Decode with K/V in host memory, {res['device']}", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
