"""`hashattention bench decode`: end-to-end decode tokens/s and memory, dense against HashAttention, one GPU.

For each model, context and batch (1 and the largest that fits), the engine's caches are set up once and
four CUDA graphs of the decode step are timed on the same caches, side by side:

    dense       split-K flash decoding over the whole context
    hash        sign the query, score the signature cache, top-k, sparse attention over K indices
    none        no attention at all (weights + everything else): the floor both paths share
    hash-fixed  sparse attention over a fixed index list, no scoring/selection

so the step time splits into: rest of the model (none), dense attention (dense - none), sparse attention
(hash-fixed - none) and selection (hash - hash-fixed). The cache contents are synthetic by default (a
random-weight model has no meaningful text, and the time of a step does not depend on the values); the
default model's tokens are compared with Hugging Face's on a real prompt first.

``--offload host`` runs :mod:`hashattention.benchmarks.offload` instead (K/V in host memory).

Optionally (``--hf-baseline 16K``) transformers' own static-cache ``generate`` (auto-compiled with
torch.compile) is timed on the same weights at batch 1, and the engine's dense path beside it.
"""
from __future__ import annotations

import json
import os
import time

import torch

from ..core.budget import Budget, parse_heavy
from ..engine.memory import GIB, largest_batch, parse_tokens
from ..engine.model import ATTENTION_MODES, Transformer
from ..engine.generate import Generator
from . import write_results
from .engine_setup import _device_name, _fixed_index, _load, _maps_for

MODES = ATTENTION_MODES  # all four by default: the time breakdown needs the two ablations


def add_arguments(p):
    p.add_argument("--models", default="llama-3.1-8b,default",
                   help="comma list: a preset (random weights, e.g. llama-3.1-8b), 'default' (the embedded "
                        "model, real weights) or a local model folder")
    p.add_argument("--contexts", default="16K,32K,64K,128K", help="comma list of context lengths")
    p.add_argument("--batches", default="1,max", help="comma list of batch sizes; 'max' = largest that fits")
    p.add_argument("--max-batch", type=int, default=64, help="cap for 'max'")
    p.add_argument("--reserve-gib", type=float, default=3.0,
                   help="GPU memory left free when sizing 'max' (graph pools, kernels, workspaces)")
    p.add_argument("--heavy", default="1/32", help="heavy budget (fraction or count)")
    p.add_argument("--selection", default=None, choices=["sum", "max"],
                   help="how a KV group's query heads share one selection (default: the library's)")
    p.add_argument("--sink", type=int, default=128)
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--steps", type=int, default=32, help="timed decode steps per mode")
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--modes", default=",".join(MODES),
                   help="comma list of " + ", ".join(MODES) + " (none and hash-fixed: ablations for the time "
                        "breakdown)")
    p.add_argument("--hf-baseline", default="", help="contexts (batch 1) at which to time transformers' "
                   "static-cache compiled generate beside the engine's dense path, e.g. 16K")
    p.add_argument("--hf-models", default="llama-3.1-8b",
                   help="models for --hf-baseline (the 8B shape builds a random HF model, ~16 GB)")
    p.add_argument("--check-tokens", type=int, default=32,
                   help="new tokens compared with Hugging Face's greedy output for real-weight models (0: skip)")
    p.add_argument("--time-limit", type=float, default=0, help="stop starting new cases after this many seconds")
    p.add_argument("--out", default="runs", help="folder for decode_<device>[_tag].{json,md,png} "
                   "(git-ignored; the runs the docs cite are copied to bench/results)")
    p.add_argument("--tag", default="", help="suffix of the result files")
    p.add_argument("--replot", default="", help="only redraw table and plot from this JSON file")
    p.add_argument("--device", default="cuda")
    from .offload import add_arguments as offload_arguments
    offload_arguments(p)  # --offload host: K/V in host memory (hashattention.benchmarks.offload)


def _synthetic_fill(m: Transformer, context: int, seed: int = 0):
    g = torch.Generator(device=m.device).manual_seed(seed)
    m.k_cache[:, :, :, :context].normal_(generator=g)
    m.v_cache[:, :, :, :context].normal_(generator=g)
    if m.sig_cache is not None:
        m.sig_cache[:, :, :, :context].random_(-2 ** 31, 2 ** 31 - 1, generator=g)


def _bench_case(m, maps, budget, context, batch, args, modes):
    dev = m.device
    s = context + max(args.steps, args.warmup) + 8
    torch.cuda.reset_peak_memory_stats(dev)
    m.setup_caches(batch, s, maps=maps, budget=budget, selection=args.selection)
    _synthetic_fill(m, context)
    gen = Generator(m, max_new_tokens=max(args.steps, args.warmup) + 2)
    try:
        return _time_modes(m, gen, context, batch, s, args, modes)
    finally:  # also on errors: drop the graphs and caches before the next case
        del gen
        m.k_cache = m.v_cache = m.sig_cache = None
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()


def _time_modes(m, gen, context, batch, s, args, modes):
    dev = m.device
    if "hash-fixed" in modes:
        gen.fixed_index = _fixed_index(m, context)
    row = {"context": context, "batch": batch, "cache_len": s, "index_slots": m.index_slots(),
           "kv_cache_gib": (m.k_cache.nbytes + m.v_cache.nbytes) / GIB,
           "sig_cache_gib": m.sig_cache.nbytes / GIB}
    for mode in modes:
        ms = gen.time_steps(mode, context, steps=args.steps, warmup=args.warmup)
        row[f"{mode}_ms"] = ms
        row[f"{mode}_tok_s"] = batch * 1e3 / ms
    torch.cuda.synchronize(dev)
    row["peak_gib"] = torch.cuda.max_memory_allocated(dev) / GIB
    if "dense_ms" in row and "hash_ms" in row:
        row["speedup"] = row["dense_ms"] / row["hash_ms"]
    if all(f"{k}_ms" in row for k in MODES):
        row["breakdown_ms"] = {
            "rest_of_model": row["none_ms"], "dense_attention": row["dense_ms"] - row["none_ms"],
            "sparse_attention": row["hash-fixed_ms"] - row["none_ms"],
            "selection": row["hash_ms"] - row["hash-fixed_ms"]}
    return row


def _check_tokens(m, hf, tok, maps, n_new: int, dev) -> dict:
    """Greedy tokens of the engine (dense; hash with a budget covering the context; hash at 1/32)
    against transformers on a real prompt."""
    from ..integration.hf import enable
    from ..policies.hash import HashAttentionPolicy
    text = ("HashAttention encodes keys and queries in Hamming space with learned maps, and each query reads "
            "only the tokens whose signatures match its own best. ") * 40
    ids = tok(text, return_tensors="pt").input_ids[:, :1024].to(dev)
    t = ids.shape[1]
    out = {"prompt_tokens": t, "new_tokens": n_new}
    ref = hf.generate(ids, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)[:, t:]

    def agree(a, b):
        same = (a == b)[0].tolist()
        return same.index(False) if False in same else len(same)
    m.setup_caches(1, t + n_new, maps=maps, budget=Budget(heavy=1.0, sink=128, window=128))
    out["dense_tokens_equal_to_hf"] = agree(Generator(m).generate(ids, n_new, mode="dense"), ref)
    out["hash_full_budget_tokens_equal_to_hf"] = agree(Generator(m).generate(ids, n_new, mode="hash"), ref)
    bud = Budget(heavy=1 / 32, sink=128, window=128)
    m.setup_caches(1, t + n_new, maps=maps, budget=bud)
    mine = Generator(m).generate(ids, n_new, mode="hash")
    with enable(hf, HashAttentionPolicy(maps, bud, per_group=True), mode="decode"):
        ref_h = hf.generate(ids, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)[:, t:]
    out["hash_1_32_tokens_equal_to_hf_integration"] = agree(mine, ref_h)
    m.k_cache = m.v_cache = m.sig_cache = None
    return out


def _hf_baseline(m, hf, context: int, args, dev) -> dict:
    """ms per new token of transformers' static-cache generate (auto-compiled) vs the engine's dense path."""
    n1, n2 = 4, 4 + args.steps
    torch.manual_seed(0)
    ids = torch.randint(100, 1000, (1, context), device=dev)
    kw = dict(do_sample=False, cache_implementation="static", pad_token_id=0)
    times = {}
    t0 = time.perf_counter()
    hf.generate(ids, max_new_tokens=n2, min_new_tokens=n2, **kw)  # compiles; sets the cache length
    torch.cuda.synchronize(dev)
    first = time.perf_counter() - t0
    for n in (n1, n2, n1, n2):
        torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        hf.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        torch.cuda.synchronize(dev)
        times.setdefault(n, []).append(time.perf_counter() - t0)
    hf_ms = (min(times[n2]) - min(times[n1])) * 1e3 / (n2 - n1)
    compiled = getattr(hf, "_compiled_call", None) is not None
    # the engine, same weights and prompt, real prefill
    m.setup_caches(1, context + n2 + 8)
    gen = Generator(m, max_new_tokens=n2 + 2)
    m.prefill(ids)
    eng_ms = gen.time_steps("dense", context, steps=args.steps, warmup=args.warmup)
    m.k_cache = m.v_cache = None
    del gen
    torch.cuda.empty_cache()
    return {"context": context, "batch": 1, "hf_static_compiled_ms": hf_ms, "hf_compiled": compiled,
            "hf_first_call_s": first, "engine_dense_ms": eng_ms, "engine_over_hf": hf_ms / eng_ms}


def run(args) -> int:
    if args.replot:
        with open(args.replot) as f:
            res = json.load(f)
        if "rows" in res:  # an offload file (bench decode --offload host)
            from .offload import write as write_offload
            write_offload(res, os.path.dirname(args.replot) or ".", os.path.basename(args.replot)[:-5])
        else:
            _write(res, os.path.dirname(args.replot) or ".", os.path.basename(args.replot)[:-5])
        return 0
    if args.offload:
        from .offload import run as run_offload
        return run_offload(args)
    dev = torch.device(args.device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        raise ValueError("bench decode measures CUDA graphs on a GPU: run it on a CUDA device")
    modes = [x.strip() for x in args.modes.split(",") if x.strip()]
    bad = [x for x in modes if x not in MODES]
    if bad:
        raise ValueError(f"unknown modes {bad}; choose from {MODES}")
    contexts = [parse_tokens(x) for x in args.contexts.split(",") if x.strip()]
    budget = Budget(heavy=parse_heavy(args.heavy), sink=args.sink, window=args.window)
    dtype = torch.bfloat16
    t_start = time.perf_counter()
    res = {"device": _device_name(dev), "torch": torch.__version__, "budget": budget.describe(),
           "steps": args.steps, "fill": "synthetic (random K/V and signatures; step time does not depend on them)",
           "models": []}
    import triton
    res["triton"] = triton.__version__
    try:
        import transformers
        res["transformers"] = transformers.__version__
    except Exception:
        pass
    out_dir = os.environ.get("OUT") or args.out
    from . import device_tag
    name = f"decode_{device_tag(res['device'])}" + (f"_{args.tag}" if args.tag else "")
    hf_ctx = [parse_tokens(x) for x in args.hf_baseline.split(",") if x.strip()]
    hf_models = {x.strip() for x in args.hf_models.split(",")}
    for spec in [x.strip() for x in args.models.split(",") if x.strip()]:
        if args.time_limit and time.perf_counter() - t_start > args.time_limit:
            print(f"time limit reached: skipping {spec}", flush=True)
            continue
        want_hf = bool(hf_ctx) and spec in hf_models
        real = spec == "default" or os.path.isdir(spec)
        m, hf, tok, desc = _load(spec, dev, dtype, keep_hf=real)
        maps, maps_kind = _maps_for(m, spec, dev)
        entry = {"model": spec, "description": desc, "maps": maps_kind, "config": m.c.to_dict(),
                 "weights_gib": sum(p.nbytes for p in m.parameters()) / GIB,
                 "signature_bytes_per_token": m.c.num_layers * maps.config.key_heads * maps.config.bits // 8,
                 "kv_bytes_per_token": 2 * m.c.num_layers * m.c.num_kv_heads * m.c.head_dim * 2,
                 "cases": [], "hf_baseline": []}
        res["models"].append(entry)
        print(f"== {spec}: {desc}, maps {maps_kind}", flush=True)
        if real and tok is not None and args.check_tokens > 0:
            entry["token_check"] = _check_tokens(m, hf, tok, maps, args.check_tokens, dev)
            print("token check", entry["token_check"], flush=True)
        if not want_hf:
            hf = None
        torch.cuda.empty_cache()
        for ctx in contexts:
            s = ctx + max(args.steps, args.warmup) + 8
            torch.cuda.empty_cache()
            free = torch.cuda.mem_get_info(dev)[0]
            # spare room beyond the caches: CUDA graph pools of four step variants, Triton modules
            fit = min(args.max_batch, largest_batch(m.c, s, free, dtype, maps.config, reserve=args.reserve_gib * GIB))
            for bs in args.batches.split(","):
                bs = bs.strip()
                batch = fit if bs == "max" else int(bs)
                if batch < 1:
                    entry["cases"].append({"context": ctx, "batch": bs, "error": "does not fit"})
                    continue
                if bs == "max" and batch == 1 and "1" in args.batches.split(","):
                    continue
                if args.time_limit and time.perf_counter() - t_start > args.time_limit:
                    print(f"time limit reached: skipping {spec} {ctx} x {batch}", flush=True)
                    continue
                try:
                    row = _bench_case(m, maps, budget, ctx, batch, args, modes)
                except Exception as e:  # keep the other cases; the error is recorded with the case
                    row = {"context": ctx, "batch": batch, "error": f"{type(e).__name__}: {e}"[:500]}
                    del e
                torch.cuda.empty_cache()
                row["largest_batch"] = fit
                entry["cases"].append(row)
                print(json.dumps(row), flush=True)
                _write(res, out_dir, name)
        if want_hf and not (args.time_limit and time.perf_counter() - t_start > args.time_limit):
            # after the sweep (the HF copy would shrink the largest batch): same weights in both
            if hf is None:
                del m
                torch.cuda.empty_cache()
                m, hf, _, _ = _load(spec, dev, dtype, keep_hf=True)
            for ctx in hf_ctx:
                try:
                    r = _hf_baseline(m, hf, ctx, args, dev)
                except Exception as e:  # recorded, the other results stay
                    r = {"context": ctx, "error": f"{type(e).__name__}: {e}"[:500]}
                entry["hf_baseline"].append(r)
                print("hf baseline", r, flush=True)
                _write(res, out_dir, name)
        del m, maps, hf
        torch.cuda.empty_cache()
    res["wall_s"] = time.perf_counter() - t_start
    _write(res, out_dir, name)
    print(_table(res))
    return 0


def _table(res: dict) -> str:
    lines = [f"# Decode throughput, dense vs HashAttention ({res['device']})", "",
             f"torch {res.get('torch')}, triton {res.get('triton')}, transformers {res.get('transformers')}; "
             f"budget {res['budget']}; {res['steps']} timed steps per mode (CUDA graphs); cache fill: {res['fill']}.",
             ""]
    for e in res["models"]:
        lines += [f"## {e['model']}: {e['description']}, maps {e['maps']}", "",
                  f"weights {e['weights_gib']:.2f} GiB; per token: KV {e['kv_bytes_per_token']:,} B, signatures "
                  f"{e['signature_bytes_per_token']:,} B (1/{e['kv_bytes_per_token'] / e['signature_bytes_per_token']:.0f})",
                  ""]
        if e.get("token_check"):
            lines += [f"tokens equal to Hugging Face's (greedy, first N that agree): {e['token_check']}", ""]
        lines += ["| context | batch | dense ms | hash ms | dense tok/s | hash tok/s | speedup | rest of model ms | "
                  "dense attn ms | sparse attn ms | selection ms | KV GiB | sig GiB | peak GiB |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in e["cases"]:
            if "error" in r:
                lines.append(f"| {r['context']} | {r['batch']} | error: {r['error']} |")
                continue
            bd = r.get("breakdown_ms", {})
            f = lambda k: f"{r[k]:.2f}" if k in r else "-"
            g = lambda k: f"{bd[k]:.2f}" if k in bd else "-"
            lines.append(f"| {r['context']:,} | {r['batch']} | {f('dense_ms')} | {f('hash_ms')} | "
                         f"{r.get('dense_tok_s', 0):.1f} | {r.get('hash_tok_s', 0):.1f} | "
                         f"{r.get('speedup', 0):.2f}x | {g('rest_of_model')} | {g('dense_attention')} | "
                         f"{g('sparse_attention')} | {g('selection')} | {r['kv_cache_gib']:.2f} | "
                         f"{r['sig_cache_gib']:.3f} | {r['peak_gib']:.2f} |")
        if e.get("hf_baseline"):
            lines += ["", "| context | batch | HF static compiled ms/token | engine dense ms/token | engine speedup |",
                      "|---|---|---|---|---|"]
            for r in e["hf_baseline"]:
                if "error" in r:
                    lines.append(f"| {r['context']:,} | 1 | error: {r['error']} | | |")
                    continue
                lines.append(f"| {r['context']:,} | 1 | {r['hf_static_compiled_ms']:.2f} "
                             f"{'' if r['hf_compiled'] else '(not compiled)'} | {r['engine_dense_ms']:.2f} | "
                             f"{r['engine_over_hf']:.2f}x |")
        lines.append("")
    return "\n".join(lines)


def _write(res: dict, out_dir: str, name: str):
    write_results(res, out_dir, name, _table, _plot)


def _plot(res: dict, path: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    models = [e for e in res["models"] if any("dense_tok_s" in r for r in e["cases"])]
    if not models:
        return
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, e in zip(axes[0], models):
        rows = [r for r in e["cases"] if "dense_tok_s" in r]
        for kind, style in (("b1", "-"), ("max", "--")):
            sel = [r for r in rows if (r["batch"] == 1) == (kind == "b1")]
            if not sel:
                continue
            x = [r["context"] // 1024 for r in sel]
            lab = "batch 1" if kind == "b1" else "largest batch (" + ",".join(str(r["batch"]) for r in sel) + ")"
            ax.plot(x, [r["dense_tok_s"] for r in sel], "o" + style, color="tab:gray", label=f"dense, {lab}")
            ax.plot(x, [r["hash_tok_s"] for r in sel], "s" + style, color="tab:red", label=f"HashAttention, {lab}")
            for r in sel:
                ax.annotate(f"{r['speedup']:.2f}x", (r["context"] // 1024, r["hash_tok_s"]), fontsize=8,
                            textcoords="offset points", xytext=(4, 4))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (K tokens)")
        ax.set_ylabel("tokens / s (all sequences)")
        ax.set_title(f"{e['model']} ({e['maps']} maps)", fontsize=10)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(f"Decode throughput, {res['budget']}, {res['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
