"""Measurements of bucket hash attention against the seed article's claims (results: bench/results/bucket_*,
named ``<what>_<device>``; the exact commands: docs/bucket-hash-report.md).

    python -m hashattention.benchmarks.bucket eval    --out bench/results/bucket_eval_decode_cpu.json ...
    python -m hashattention.benchmarks.bucket fit     --variant bucket-lsh_b8 --text ...  # bucket_proj_lsh_b8_r1
    python -m hashattention.benchmarks.bucket speed   --out bench/results/bucket_speed_cpu.json
    python -m hashattention.benchmarks.bucket memory  --out bench/results/bucket_memory_cpu.json
    python -m hashattention.benchmarks.bucket determinism --out bench/results/bucket_determinism_cpu.json
    python -m hashattention.benchmarks.bucket table bench/results/bucket_eval_*_cpu*.json --out NAME

Variant names for the suite: a registered bucket policy, then ``_``-separated options:
``b<bits>``, ``r<rounds>``, ``c<coarse_bits>``, ``f<percent of bucket heads>``, ``cap<max_bucket>``,
``mean|softmax|proj``, ``sw`` (sink + window always read), ``fb`` (empty bucket -> sink + window).
E.g. ``bucket-lsh_b8_softmax_sw``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from ..policies.bucket import BucketPolicy, parse_variant  # noqa: F401 (parse_variant: also used from here)

PROJ_DIR = Path("bench/maps")  # fitted projections (artifacts, not results)


def proj_path(policy: BucketPolicy) -> Path:
    c = policy.config()
    tag = f"{c['hash']}_b{c['bits']}_r{c['rounds']}" + ("_hier" if c["hierarchical"] else "") \
        + (f"_f{round(c['bucket_fraction'] * 100)}" if c["bucket_fraction"] < 1 else "") \
        + ("_sw" if c["sink_window"] else "") + ("_fb" if c["empty"] != "zeros" else "")
    return PROJ_DIR / f"bucket_proj_{tag}.safetensors"


def build(name: str, budget):
    cls, kw = parse_variant(name)
    pol = cls(budget, **kw)
    if pol.agg == "proj":
        path = proj_path(pol)
        if not path.is_file():
            raise FileNotFoundError(f"{name}: no fitted projection at {path}; run `python -m hashattention.benchmarks.bucket fit` first")
        pol.load_projection(str(path))
    return pol


def _load(device=None):
    from ..models import load_model
    return load_model("default", device=device)


# ------------------------------------------------------------------------------------------------ eval
def cmd_eval(a) -> int:
    from ..evaluation import runner
    from ..policies import POLICIES
    model, tok, _ = _load(a.device)
    bucket = [n for n in a.policies.split(",") if n.startswith("bucket")]
    for n in bucket:  # validate, then make the names known to the suite's policy check (this process only)
        parse_variant(n)
        POLICIES.setdefault(n, BucketPolicy)

    class BucketSuite(runner.Suite):
        def make(self, name, budget):
            if name.startswith("bucket"):
                from ..core.budget import Budget
                return build(name, Budget(heavy=budget, sink=self.sink, window=self.window))
            return super().make(name, budget)

    maps = None
    if "hash" in a.policies.split(","):
        from ..shipped import load_default_maps
        maps = load_default_maps(model)
    suite = BucketSuite(model, tok, tasks=a.tasks, lengths=a.lengths, policies=a.policies, budgets=[a.budget],
                        samples=a.samples, round_size=a.samples, modes=a.modes, decode_budgets=[a.budget],
                        sink=a.sink, window=a.window, ppl_samples=a.ppl_samples, ppl_from=a.ppl_from,
                        out=a.out, maps=maps, progress=False, accelerate=True, log=print,
                        time_limit=a.time_limit)
    try:
        suite.run()
    except ValueError as e:  # the runner's own summary of "1/16"-style keys; every record is already saved
        print(f"suite summary failed ({e}); records are in {a.out}: use `python -m hashattention.benchmarks.bucket table`")
    return 0


# ------------------------------------------------------------------------------------------------- fit
def cmd_fit(a) -> int:
    from ..core.budget import Budget
    from ..policies.bucket import fit_projection
    model, tok, _ = _load(a.device)
    cls, kw = parse_variant(a.variant)
    pol = cls(Budget(heavy=a.budget, sink=a.sink, window=a.window), **{**kw, "agg": "proj"})
    text = "\n\n".join(Path(p).read_text() for p in a.text)
    ids = tok(text, return_tensors="pt").input_ids[0]
    n = len(ids) // a.length
    if n < 1:
        raise ValueError(f"the training text has {len(ids)} tokens, fewer than one row of {a.length}")
    rows = ids[: n * a.length].view(n, a.length)
    t = time.perf_counter()
    res = fit_projection(model, pol, rows, ridge=a.ridge)
    res.update({"seconds": time.perf_counter() - t, "rows": n, "length": a.length, "ridge": a.ridge,
                "text": [str(p) for p in a.text], "variant": a.variant, "config": pol.config()})
    out = Path(a.out) if a.out else proj_path(pol)
    pol.save_projection(str(out))
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    return 0


# ----------------------------------------------------------------------------------------------- speed
def _median_time(fn, reps: int, device: torch.device) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def bucket_decode_mean(q_bucket: torch.Tensor, k_bucket: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One decode step of mean-pool bucket attention by index (no dense mask): q_bucket [H], k_bucket
    [H, n], v [H, n, D] -> [H, D] fp32. O(n) integer compares + a gather of the bucket's values."""
    h, j = torch.nonzero(k_bucket == q_bucket[:, None], as_tuple=True)
    out = torch.zeros(v.shape[0], v.shape[-1], dtype=torch.float32, device=v.device)
    out.index_add_(0, h, v[h, j].float())
    cnt = torch.bincount(h, minlength=v.shape[0]).clamp_min(1)
    return out / cnt[:, None]


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def cmd_speed(a) -> int:
    """Per decode step, one layer of a Llama-2-7B shape (32 heads, head_dim 128): dense SDPA vs bucket
    routing by index (hash the query + compare n ids + gather the bucket), and the hash cost per vector.
    Key ids are made once per key at update time and are not timed; for SHA-256 they are drawn uniformly
    (what a cryptographic hash gives) instead of hashing millions of keys in Python."""
    import torch.nn.functional as F
    from ..policies.bucket_hashing import BucketHasher
    dev = torch.device(a.device)
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    g = torch.Generator(device=dev).manual_seed(0)
    heads, d = 32, 128
    res = {"device": device_label(dev), "torch": torch.__version__, "dtype": str(dtype).replace("torch.", ""),
           "shape": {"heads": heads, "head_dim": d, "batch": 1, "layers_timed": 1}, "reps": a.reps,
           "decode": [], "hash_cost": {}}
    x = torch.randn(1, heads, 64, d, device=dev, generator=g)
    kvh = torch.arange(heads)
    for kind in ("sha256", "blake3", "keyed", "lsh", "hybrid"):
        try:
            hs = BucketHasher(kind, bits=16)
        except ImportError as e:  # blake3 is not installed everywhere (e.g. the GPU machine)
            res["hash_cost"][kind] = {"error": str(e)}
            continue
        t = _median_time(lambda: hs(0, x, kvh, heads), a.reps, dev)
        res["hash_cost"][kind] = {"us_per_vector": t / (heads * 64) * 1e6, "vectors_per_call": heads * 64}
        print(kind, res["hash_cost"][kind])
    for n in a.lengths:
        k = torch.randn(1, heads, n, d, device=dev, dtype=dtype, generator=g)
        v = torch.randn(1, heads, n, d, device=dev, dtype=dtype, generator=g)
        q = torch.randn(1, heads, 1, d, device=dev, dtype=dtype, generator=g)
        dense = _median_time(lambda: F.scaled_dot_product_attention(q, k, v), a.reps, dev)
        row = {"context": n, "dense_sdpa_ms": dense * 1e3}
        for kind, bits in (("lsh", 16), ("lsh", 8), ("lsh", 4), ("keyed", 16), ("sha256", 16)):
            hs = BucketHasher(kind, bits=bits)
            if kind == "sha256":
                kb = torch.randint(0, 2 ** bits, (heads, n), device=dev, generator=g)
            else:
                kb = torch.cat([hs(0, k[:, :, i:i + 16384], kvh, heads)[0, 0]  # [H, n], in slices:
                                for i in range(0, n, 16384)], -1)  # the keyed hash's temporaries are [.., D] int64

            def step():
                qb = hs(0, q, kvh, heads)[0, 0, :, 0].to(dev)  # hash this step's query, every head
                return bucket_decode_mean(qb, kb, v[0])
            t = _median_time(step, a.reps, dev)
            qb = hs(0, q, kvh, heads)[0, 0, :, 0].to(dev)
            tag = f"bucket_{kind}_b{bits}"
            row[f"{tag}_ms"] = t * 1e3
            row[f"{tag}_speedup"] = dense / t
            row[f"{tag}_mean_bucket"] = float((kb == qb[:, None]).sum(-1).float().mean())
        res["decode"].append(row)
        print(json.dumps(row))
    Path(a.out).write_text(json.dumps(res, indent=1))
    return 0


# ---------------------------------------------------------------------------------------------- memory
def memory_table(layers=32, kv_heads=32, head_dim=128, context=131072, kv_bytes=2, bits=(16, 32), rounds=1):
    """Exact bytes for a decoder at ``context`` tokens: the KV cache, the values alone, and the bucket ids."""
    gib = 2 ** 30
    kv_tok = 2 * layers * kv_heads * head_dim * kv_bytes
    v_tok = kv_tok // 2
    out = {"shape": {"layers": layers, "kv_heads": kv_heads, "head_dim": head_dim, "context": context,
                     "bytes_per_element": kv_bytes},
           "kv_cache_bytes_per_token": kv_tok, "kv_cache_GiB": kv_tok * context / gib,
           "values_only_GiB": v_tok * context / gib,
           "one_fp16_score_matrix_GiB": context * context * 2 / gib,
           "bucket": {}}
    for b in bits:
        ids_tok = layers * kv_heads * rounds * b / 8
        out["bucket"][f"b{b}"] = {
            "ids_bytes_per_token": ids_tok, "ids_GiB": ids_tok * context / gib,
            "mean_pool_needs_GiB": (ids_tok + v_tok) * context / gib,  # ids + values
            "softmax_needs_GiB": (ids_tok + kv_tok) * context / gib,  # ids + keys + values
            "per_bucket_sums_GiB": layers * kv_heads * (2 ** b) * (head_dim * kv_bytes + 4) / gib,
        }
    return out


def cmd_memory(a) -> int:
    article = {"7B@128K": {"traditional_GB": 32, "hash_GB": 1.2}, "7B@1M": {"traditional_GB": 2000, "hash_GB": 9.6},
               "70B@128K": {"traditional_GB": 256, "hash_GB": 9.6}, "70B@1M": {"traditional_GB": 16000, "hash_GB": 76.8}}
    res = {"article": article,
           "llama2_7b_128k": memory_table(context=131072),
           "llama2_7b_1m": memory_table(context=2 ** 20),
           "llama2_70b_128k": memory_table(layers=80, kv_heads=8, context=131072),  # GQA: 8 KV heads
           "note": "fp16 K/V; bucket ids: bits per token per layer per KV head; per_bucket_sums: the only "
                   "n-independent store (mean pooling as running sums per bucket: D values + a count)"}
    # the method's two memory terms on the default model, measured on real tensors
    model, tok, _ = _load("cpu")
    from ..integration.compat import output_cache
    from ..integration.hf import enable
    from ..core.budget import Budget
    from ..policies.bucket import BucketLSHPolicy
    ids = tok("\n".join(["The grass is green. The sky is blue."] * 120), return_tensors="pt").input_ids[:, :1024]
    pol = BucketLSHPolicy(Budget(), bits=16)
    with torch.no_grad(), enable(model, pol, mode="everywhere") as h:
        out = model(input_ids=ids, use_cache=True)
        kb_bytes = sum(s["kb"].numel() * 32 // 8 for s in h.states.values())  # 32-bit ids would do for b<=32
    kv = output_cache(out)
    kv_bytes = sum(t.numel() * 2 for layer in kv.layers for t in (layer.keys, layer.values))  # as fp16
    res["default_model_1024_tokens"] = {"kv_cache_fp16_bytes": kv_bytes, "bucket_ids_bytes_int32": kb_bytes,
                                        "ratio": kv_bytes / kb_bytes}
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    return 0


# ----------------------------------------------------------------------------------------- determinism
def cmd_determinism(a) -> int:
    """Is routing deterministic, and is dense any less so? Same text (1) twice, (2) alone vs left-padded in
    a batch with a longer text, (3) prefilled at once vs in chunks of 128: compare keys, dense outputs and
    bucket ids bit for bit."""
    from ..policies.bucket_hashing import BucketHasher
    model, tok, _ = _load("cpu")
    text = Path(a.text).read_text()
    ids = tok(text, return_tensors="pt").input_ids[:, :a.length]
    other = tok(Path(a.other).read_text(), return_tensors="pt").input_ids[:, :a.length + 37]
    hashers = {k: BucketHasher(k, bits=16) for k in ("sha256", "keyed", "lsh")}

    def keys_and_logits(input_ids, mask=None, chunk=None):
        from transformers import DynamicCache
        from ..integration.compat import cache_kwarg
        cache = DynamicCache()
        ck = cache_kwarg(model)
        with torch.no_grad():
            if chunk is None:
                lg = model(input_ids=input_ids, attention_mask=mask, **{ck: cache}, use_cache=True).logits
            else:
                parts = []
                for s in range(0, input_ids.shape[1], chunk):
                    parts.append(model(input_ids=input_ids[:, s:s + chunk], **{ck: cache},
                                       use_cache=True).logits)
                lg = torch.cat(parts, 1)
        return [layer.keys for layer in cache.layers], lg

    def compare(ka, la, kb_, lb, tag):
        n_layers = len(ka)
        out = {"logits_bitwise_equal": bool(torch.equal(la, lb)),
               "logits_max_abs_diff": float((la - lb).abs().max()),
               "argmax_agree": float((la.argmax(-1) == lb.argmax(-1)).float().mean()),
               "keys_bitwise_equal_layers": sum(bool(torch.equal(x, y)) for x, y in zip(ka, kb_)),
               "layers": n_layers, "keys_max_abs_diff": max(float((x - y).abs().max()) for x, y in zip(ka, kb_))}
        for kind, hs in hashers.items():
            changed = total = 0
            for li, (x, y) in enumerate(zip(ka, kb_)):
                kv = torch.arange(x.shape[1])
                bx, by = hs(li, x, kv, x.shape[1]), hs(li, y, kv, y.shape[1])
                changed += int((bx != by).sum())
                total += bx.numel()
            out[f"{kind}_bucket_ids_changed"] = changed / total
        res[tag] = out
        print(tag, json.dumps(out))

    res = {"device": f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
           "length": int(ids.shape[1]), "torch": torch.__version__}
    k1, l1 = keys_and_logits(ids)
    k2, l2 = keys_and_logits(ids)
    compare(k1, l1, k2, l2, "same_input_twice")
    # left padding inside a batch with a longer text
    p = other.shape[1] - ids.shape[1]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    batch = torch.cat([torch.cat([torch.full((1, p), pad), ids], 1), other], 0)
    mask = torch.cat([torch.cat([torch.zeros(1, p, dtype=torch.long), torch.ones_like(ids)], 1),
                      torch.ones_like(other)], 0)
    kb_, lb = keys_and_logits(batch, mask)
    compare(k1, l1, [x[:1, :, p:] for x in kb_], lb[:1, p:], "alone_vs_left_padded_batch")
    kc, lc = keys_and_logits(ids, chunk=128)
    compare(k1, l1, kc, lc, "one_call_vs_chunks_of_128")
    Path(a.out).write_text(json.dumps(res, indent=1))
    return 0


# ----------------------------------------------------------------------------------------- table, plot
def _split_key(k: str, n_tail: int):
    """Record keys are mode|policy|budget|... (runner) or mode/policy/budget/... (stats, older files; a budget
    label such as "1/16" holds a slash itself)."""
    if "|" in k:
        parts = k.split("|")
        return parts[0], parts[1], parts[2], parts[3:]
    parts = k.split("/")
    return parts[0], parts[1], "/".join(parts[2:len(parts) - n_tail]), parts[len(parts) - n_tail:]


def aggregate(path) -> tuple:
    """Rows per (mode, policy, budget) from a suite results file: mean score per length over the (task,
    index) prompts every config of the mode finished, perplexity, tokens read. Reads the records directly."""
    from ..evaluation.perplexity import ppl
    data = json.loads(Path(path).read_text())
    scores, nll = {}, {}
    for k, v in data["records"].items():
        mode, pol, bud, (L, task, idx) = _split_key(k, 3)
        if task == "ppl":
            nll.setdefault((mode, pol, bud), {}).setdefault(L, {})[idx] = (v["nll"], v["tokens"])
        else:
            scores.setdefault((mode, pol, bud), {})[(L, task, idx)] = v["score"]
    rows = []
    for mode in sorted({c[0] for c in scores}):
        cfgs = {c: d for c, d in scores.items() if c[0] == mode}
        # per length: the prompts every config that ran this length finished (a run cut short may lack one)
        common = set()
        for L in sorted({x[0] for d in cfgs.values() for x in d}, key=int):
            have = [set(x for x in d if x[0] == L) for d in cfgs.values() if any(x[0] == L for x in d)]
            common |= set.intersection(*have)
        for c, d in cfgs.items():
            mine = [x for x in common if x in d]
            by_len = {L: statistics.mean(d[x] for x in mine if x[0] == L)
                      for L in sorted({x[0] for x in mine}, key=int)}
            by_task = {}
            for x in mine:
                by_task.setdefault(x[1], []).append(d[x])
            st = {}
            for k, v in data["stats"].items():
                m, pol, bud, (L,) = _split_key(k, 1)
                if (m, pol, bud) == c:
                    st[L] = v
            pp = {}
            for L, items in nll.get(c, {}).items():
                pp[L] = ppl(sum(a for a, _ in items.values()), sum(b for _, b in items.values()))
            rows.append({"mode": mode, "policy": c[1], "budget": c[2], "prompts": len(mine),
                         "average": statistics.mean(d[x] for x in mine), "by_length": by_len,
                         "by_task": {t: statistics.mean(v) for t, v in sorted(by_task.items())}, "ppl": pp,
                         "tokens_read": {L: v["tokens_read"] for L, v in st.items()},
                         "read_fraction": statistics.mean(v["fraction"] for v in st.values()) if st else 1.0})
    return rows, data["settings"]


def _order(r):
    base = ["dense", "oracle", "hash", "simhash", "sink_window"]
    return (base.index(r["policy"]) if r["policy"] in base else len(base), r["policy"])


def cmd_table(a) -> int:
    """Markdown table (<out>.md), JSON summary (<out>.json) and plot (<out>.png) of suite result files."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    files = [f for f in a.inputs if Path(f).is_file()]
    lines, summary = [], {}
    fig, axes = plt.subplots(1, len(files), figsize=(8 * len(files), 6), squeeze=False)
    for ax, f in zip(axes[0], files):
        rows, st = aggregate(f)
        rows.sort(key=_order)
        summary[str(f)] = rows
        mode = rows[0]["mode"]
        lengths = sorted({L for r in rows for L in r["by_length"]}, key=int)
        plens = sorted({L for r in rows for L in r["ppl"]}, key=int)
        lines += [f"## {Path(f).name}: sparse {mode}", "",
                  f"{st['model']} on {st['device']} ({st['dtype']}); sink {st['sink']}, window {st['window']}, "
                  f"heavy budget {st['budgets'][0] if mode == 'everywhere' else st['decode_budgets'][0]} "
                  f"(used by oracle/simhash/sink_window and the *_sw, *_fb, hier variants); "
                  f"{max(r['prompts'] for r in rows)} prompts per config ({len(st['tasks'])} RULER-style tasks x lengths x 1 sample; "
                  "'-': length not run before the time limit). "
                  "Score: RULER string match (%). Read: tokens read per query per head (layer 0) "
                  "/ context, averaged over lengths.", ""]
        head = ["policy", "avg (lengths run)"] + [f"{L}" for L in lengths] + [f"ppl {L}" for L in plens] + \
            ["read", "tokens read/query"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            cells = [r["policy"], f"{r['average']:.1f}"] + [f"{r['by_length'][L]:.1f}" if L in r["by_length"]
                                                            else "-" for L in lengths]
            cells += [f"{r['ppl'].get(L, float('nan')):.2f}" for L in plens]
            cells += [f"{r['read_fraction']:.3f}",
                      ", ".join(f"{v:.1f}" for _, v in sorted(r["tokens_read"].items(), key=lambda x: int(x[0])))
                      or "all"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        use_ppl = bool(plens)  # perplexity separates the configs better than 1 sample per task
        for r in rows:
            bucket = r["policy"].startswith("bucket")
            y = r["ppl"].get(plens[0], float("nan")) if use_ppl else r["average"]
            ax.scatter(max(r["read_fraction"], 1e-4), y, marker="o" if bucket else "s",
                       color="tab:red" if bucket else "tab:blue", s=30)
            ax.annotate(r["policy"].replace("bucket-", "b:"), (max(r["read_fraction"], 1e-4), y),
                        fontsize=6, xytext=(3, 2), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("tokens read per query / context (1e-4 = nothing read)")
        if use_ppl:
            ax.set_yscale("log")
            ax.set_ylabel(f"perplexity, held-out text, {plens[0]} tokens (lower is better)")
        else:
            ax.set_ylabel("suite average (%)")
        ax.set_title(f"sparse {mode}: lengths {lengths}, {rows[0]['prompts']} prompts per config, "
                     f"sink {st['sink']} window {st['window']}", fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(f"bucket hash attention (red) vs dense / oracle / simhash / sink_window (blue) - "
                 f"{st['model']} - {st['device']}", fontsize=9)
    fig.tight_layout()
    out = Path(a.out)
    fig.savefig(out.with_suffix(".png"), dpi=130)
    out.with_suffix(".md").write_text("\n".join(lines))
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    print("\n".join(lines))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m hashattention.benchmarks.bucket")
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("eval")
    e.add_argument("--policies", required=True)
    e.add_argument("--tasks", default="all")
    e.add_argument("--lengths", default="1024")
    e.add_argument("--budget", default="1/16")
    e.add_argument("--samples", type=int, default=1, help="samples per task and length (the --limit)")
    e.add_argument("--modes", default="decode")
    e.add_argument("--sink", type=int, default=128)
    e.add_argument("--window", type=int, default=128)
    e.add_argument("--ppl-samples", type=int, default=0)
    e.add_argument("--ppl-from", type=int, default=512)
    e.add_argument("--device", default=None)
    e.add_argument("--time-limit", type=float, default=None, help="seconds; stop (results kept) after")
    e.add_argument("--out", required=True)
    f = sub.add_parser("fit")
    f.add_argument("--variant", default="bucket-lsh_b8")
    f.add_argument("--text", nargs="+", required=True)
    f.add_argument("--length", type=int, default=1024)
    f.add_argument("--ridge", type=float, default=1e-2)
    f.add_argument("--budget", default="1/16")
    f.add_argument("--sink", type=int, default=128)
    f.add_argument("--window", type=int, default=128)
    f.add_argument("--device", default=None)
    f.add_argument("--out", default=None)
    s = sub.add_parser("speed")
    s.add_argument("--lengths", type=lambda x: [int(v) for v in x.split(",")], default=[2048, 8192, 32768])
    s.add_argument("--reps", type=int, default=7)
    s.add_argument("--device", default="cpu")
    s.add_argument("--out", required=True)
    m = sub.add_parser("memory")
    m.add_argument("--out", required=True)
    d = sub.add_parser("determinism")
    d.add_argument("--text", required=True)
    d.add_argument("--other", required=True)
    d.add_argument("--length", type=int, default=512)
    d.add_argument("--out", required=True)
    pl = sub.add_parser("table")
    pl.add_argument("inputs", nargs="+")
    pl.add_argument("--out", required=True)
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return {"eval": cmd_eval, "fit": cmd_fit, "speed": cmd_speed, "memory": cmd_memory,
            "determinism": cmd_determinism, "table": cmd_table}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
