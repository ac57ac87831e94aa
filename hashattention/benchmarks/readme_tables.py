"""The README's and docs' result tables, rendered from the committed results files (never copied by hand).

Each table sits between markers in a Markdown file::

    <!-- table:kernels -->
    ...generated...
    <!-- /table:kernels -->

and is rendered by the function of that name in :data:`TABLES` from files in ``bench/results/``. Regenerate
after a new results file lands (and commit both)::

    python -m hashattention.benchmarks.readme_tables            # rewrites README.md and docs/performance.md
    python -m hashattention.benchmarks.readme_tables --check    # exit 1 if a file differs (tests/test_readme.py)

Quality: ``bench/results/quality_summary.json`` (rows ``{"mode", "budget", "policy", "score", "dense",
"delta_vs_dense", "ci95": [lo, hi] of the paired difference, "n_items", "device", "maps"}``), written by
``hashattention eval --summarize`` / ``--pass`` (:mod:`hashattention.evaluation.quality`).
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = "bench/results"
FILES = ("README.md", "docs/performance.md", "docs/quality.md")
QUALITY_SUMMARY = "quality_summary.json"
KERNEL_FILES = ("attention_h200.json", "attention_h100.json")
DECODE_FILES = ("decode_h200.json", "decode_h100.json")
MEMORY_FILE = "memory_h100.json"
SELECTION_FILE = "selection_cpu.json"
QUESTIONS_FILE = "questions_cpu.json"  # maps trained with retrieval questions, on SELECTION_FILE's prompts
OFFLOAD_FILE = "offload_h100.json"
ADAPTIVE_FILES = ("adaptive_cpu.json", "adaptive_share_cpu.json")  # top-p, then min-share (same prompts)
MODE_ORDER = ("context", "everywhere", "decode")
POLICY_ORDER = ("dense", "oracle", "hash", "simhash", "quest", "sink_window", "h2o", "random")
MARKER = re.compile(r"(<!-- table:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /table:(?P=name) -->)", re.S)


# -- helpers ------------------------------------------------------------------------------------------------
def _load(root: Path, name: str) -> dict:
    path = Path(root) / RESULTS / name
    if not path.is_file():
        raise FileNotFoundError(f"results file {path} is missing (the tables are rendered from it)")
    return json.loads(path.read_text())


def device_label(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'H100', 'NVIDIA H200' -> 'H200', 'cpu (x86_64, 2 cores)' -> 'CPU'."""
    from . import device_tag
    return device_tag(name).upper()


def _ctx(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def _bytes(n: float) -> str:
    for unit, size in (("GiB", 1024 ** 3), ("MiB", 1024 ** 2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.{0 if n / size >= 100 else 1}f} {unit}"
    return f"{int(n)} B"


def _table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def _budget_key(b: str) -> float:
    if b in ("full", "all", "dense", None):
        return 2.0
    from fractions import Fraction
    try:
        return float(Fraction(b))
    except (ValueError, ZeroDivisionError):
        return 0.0


# -- quality ------------------------------------------------------------------------------------------------
def render_quality_rows(rows: list[dict]) -> str:
    """The quality table from rows of the quality-summary schema (hashattention.evaluation.quality): the
    score, dense's score on the same prompts, and the paired difference with its 95% bootstrap interval."""
    def key(r):
        mode = MODE_ORDER.index(r["mode"]) if r["mode"] in MODE_ORDER else len(MODE_ORDER)
        base = r["policy"].split("-")[0]
        pol = POLICY_ORDER.index(base) if base in POLICY_ORDER else len(POLICY_ORDER)
        return (mode, str(r.get("device")), -_budget_key(r.get("budget")), str(r.get("maps")), pol, r["policy"])

    def num(x, signed=False):
        if x is None or (isinstance(x, float) and math.isnan(x)):
            return "-"
        return f"{x:+.1f}" if signed else f"{x:.1f}"
    out = []
    for r in sorted(rows, key=key):
        lo, hi = r.get("ci95") or (None, None)
        delta = num(r.get("delta_vs_dense"), True)
        if lo is not None and hi is not None:
            delta += f" [{num(lo, True)}, {num(hi, True)}]"
        pol = f"**{r['policy']}**" if r["policy"].startswith("hash") else r["policy"]
        out.append([r["mode"], pol, r.get("maps") or "-", r.get("budget") or "-", num(r.get("score")),
                    num(r.get("dense")), delta, r.get("n_items", "-"), device_label(str(r.get("device", "-")))])
    return _table(["mode", "policy", "maps", "budget", "score %", "dense %", "vs dense [95% CI]", "items", "device"],
                  out)


#: what the README's quality table shows of the summary (the whole of it: quality_summary.md beside it)
README_QUALITY = {"mode": ("context", "everywhere"), "budget": ("1/16", "1/32", "1/64"),
                  "policy": ("oracle", "simhash", "quest", "hash", "hash-sum"),
                  "maps": (None, "-", "shipped", "pydoc")}


def quality(root: Path = ROOT) -> str:
    path = Path(root) / RESULTS / QUALITY_SUMMARY
    data = _load(root, QUALITY_SUMMARY)
    rows = [r for r in (data["rows"] if isinstance(data, dict) else data)
            if all(r.get(k) in v for k, v in README_QUALITY.items())]
    devices = ", ".join(sorted({device_label(str(r.get("device"))) for r in rows}))
    beside = [f"`{path.with_suffix(ext).name}`" for ext in (".md", ".png") if path.with_suffix(ext).is_file()]
    return (render_quality_rows(rows) + f"\n\nFrom `{RESULTS}/{QUALITY_SUMMARY}` ({devices}"
            + (f"; beside it {', '.join(beside)}" if beside else "") + ").")


def quality_maps(root: Path = ROOT) -> str:
    """The context mode's rows of every maps file measured (shipped, shipped before and trained further)."""
    data = _load(root, QUALITY_SUMMARY)
    rows = [r for r in (data["rows"] if isinstance(data, dict) else data)
            if r["mode"] == "context" and r["policy"] in ("oracle", "hash-sum")]
    return render_quality_rows(rows) + f"\n\nFrom `{RESULTS}/{QUALITY_SUMMARY}`."


# -- kernels ------------------------------------------------------------------------------------------------
def _attention_row(res: dict, batch: int, ctx: int, heavy: float = 1 / 32):
    for r in res["rows"]:
        if r["batch"] == batch and r["context"] == ctx and abs(r["heavy"] - heavy) < 1e-9:
            return r
    return None


def kernels(root: Path = ROOT) -> str:
    rows, notes = [], []
    for name in KERNEL_FILES:
        res = _load(root, name)
        dev = device_label(res["device"])
        for batch, ctx in ((1, 131072), (1, 524288), (8, 131072), (8, 524288)):
            r = _attention_row(res, batch, ctx)
            if r is None:
                continue
            g, h = r["group"], r["head"]
            tot = g["total_ms"] * 1e3
            split = f" ({g['select_ms'] * 1e3:.1f} + {g['attention_ms'] * 1e3:.1f})" if batch == 1 else ""
            chain = f"{g['chain_speedup_vs_sdpa']:.1f}x" if g.get("chain_speedup_vs_sdpa") else "-"
            rows.append([f"{dev} (Triton {res['triton']})", f"{_ctx(ctx)} x {batch}", f"{r['sdpa_ms'] * 1e3:.1f}",
                         f"{tot:.1f}{split}", f"**{g['speedup_vs_sdpa']:.1f}x**", chain,
                         f"{h['speedup_vs_sdpa']:.1f}x"])
        notes.append(f"`{name.replace('.json', '.md')}`")
    return (_table(["device", "context x batch", "SDPA µs", "HashAttention µs (select + attend)", "speedup",
                    "in a chain of 8", "per-query-head selection"], rows)
            + "\n\n32 query / 8 KV heads x 128, bf16, heavy 1/32 + sink 128 + window 128, one selection per KV "
              "group; medians of CUDA-graph replays, L2 flushed (" + ", ".join(notes) + ").")


# -- end-to-end decoding ------------------------------------------------------------------------------------
def _model_label(e: dict) -> str:
    if e["model"] == "default":
        return "SmolLM2-135M"
    return e["model"].replace("llama-3.1-8b", "Llama-3.1-8B") + " shape"


def decode(root: Path = ROOT) -> str:
    rows, notes = [], []
    for name in DECODE_FILES:
        res = _load(root, name)
        dev = device_label(res["device"])
        for e in res["models"]:
            ok = [c for c in e["cases"] if "speedup" in c]
            if not ok:
                continue
            ctx = max(c["context"] for c in ok)
            for c in sorted((c for c in ok if c["context"] == ctx), key=lambda c: c["batch"]):
                largest = c["batch"] > 1 and c["batch"] == c.get("largest_batch")
                rows.append([f"{dev} (Triton {res['triton']})", _model_label(e),
                             f"{_ctx(ctx)} x {c['batch']}" + (" (largest that fits)" if largest else ""),
                             f"{c['dense_tok_s']:.1f}", f"{c['hash_tok_s']:.1f}", f"**{c['speedup']:.2f}x**"])
            for b in e.get("hf_baseline") or []:
                if "error" not in b:
                    notes.append(f"the engine's dense step against transformers' compiled static-cache `generate` "
                                 f"({e['model']} shape, {_ctx(b['context'])}, {dev}): "
                                 f"{b['engine_dense_ms']:.2f} against {b['hf_static_compiled_ms']:.2f} ms per token "
                                 f"({b['engine_over_hf']:.2f}x)")
            tc = e.get("token_check")
            if tc:
                notes.append(f"greedy tokens equal to transformers' ({e['model']} model, {dev}): dense "
                             f"{tc['dense_tokens_equal_to_hf']}/{tc['new_tokens']}, hash at full budget "
                             f"{tc['hash_full_budget_tokens_equal_to_hf']}/{tc['new_tokens']}, hash 1/32 against "
                             f"the integration {tc['hash_1_32_tokens_equal_to_hf_integration']}/{tc['new_tokens']}")
    files = ", ".join(f"`{n.replace('.json', '.md')}`" for n in DECODE_FILES)
    return (_table(["device", "model", "context x batch", "dense tok/s", "HashAttention tok/s", "speedup"], rows)
            + f"\n\nHeavy 1/32 + sink 128 + window 128, tokens/s of all sequences ({files}). "
            + " ".join(n[0].upper() + n[1:] + "." for n in notes))


def decode_breakdown(root: Path = ROOT) -> str:
    """Per-step time split of the engine's decode step (docs/performance.md)."""
    rows = []
    for name in DECODE_FILES:
        res = _load(root, name)
        dev = device_label(res["device"])
        for e in res["models"]:
            for c in e["cases"]:
                bd = c.get("breakdown_ms")
                if not bd or c["context"] != max(x["context"] for x in e["cases"] if "breakdown_ms" in x):
                    continue
                rows.append([dev, _model_label(e), f"{_ctx(c['context'])} x {c['batch']}", f"{c['dense_ms']:.2f}",
                             f"{c['hash_ms']:.2f}", f"{bd['rest_of_model']:.2f}", f"{bd['dense_attention']:.2f}",
                             f"{bd['sparse_attention']:.2f}", f"{bd['selection']:.2f}"])
    return (_table(["device", "model", "context x batch", "dense step ms", "HashAttention step ms",
                    "rest of the model", "dense attention", "sparse attention", "selection"], rows)
            + f"\n\nFrom `{RESULTS}/decode_h200.json` and `decode_h100.json`: rest of the model = the step with no "
              "attention; dense attention = dense step - that; sparse attention = the step over a fixed index "
              "list - that; selection = the HashAttention step - the fixed-list step (signing, scoring, top-k).")


def kernel_breakdown(root: Path = ROOT) -> str:
    """Profiler time of each kernel of one call at 512K (docs/performance.md)."""
    names = {"_count_kernel": "count", "_refine_kernel": "refine", "_emit_kernel": "emit",
             "_split_kernel": "attention (split-K)", "_combine_kernel": "merge"}
    rows = []
    for name in KERNEL_FILES:
        res = _load(root, name)
        ku = (res.get("tune") or {}).get("kernels_us")
        if not ku:
            continue
        parts = ", ".join(f"{names.get(k, k)} {v:.1f}" for k, v in ku.items())
        r = _attention_row(res, 1, 524288)
        rows.append([f"{device_label(res['device'])} (Triton {res['triton']})", parts, f"{sum(ku.values()):.1f}",
                     f"{r['group']['total_ms'] * 1e3:.1f}" if r else "-"])
    return (_table(["device", "kernels at 512K x 1, 1/32 (µs, profiler, eager, L2 flushed)", "sum",
                    "one call (CUDA graph)"], rows)
            + f"\n\nFrom the `tune.kernels_us` of `{RESULTS}/" + "` and `".join(
                n for n in KERNEL_FILES if (_load(root, n).get("tune") or {}).get("kernels_us")) + "`.")


def selection_floor(root: Path = ROOT) -> str:
    """The selection against reads of the signatures at 512K (docs/performance.md)."""
    res = _load(root, KERNEL_FILES[0])
    r = _attention_row(res, 1, 524288)
    g = r["group"]
    sig_mb = g["sig_bytes"] / 1e6
    copy_us = g["sig_bytes"] / res["copy_bandwidth_Bps"] * 1e6
    rows = [["single call", f"{g['select_ms'] * 1e3:.1f}", f"{g['select_over_sig_read']:.1f}x",
             f"{r['sig_read_measured_ms'] * 1e3:.1f}", f"{g['select_over_measured_read']:.1f}x"]]
    if g.get("select_chain_ms"):
        rows.append(["per call in a chain of 8", f"{g['select_chain_ms'] * 1e3:.1f}",
                     f"{g['select_chain_over_sig_read']:.1f}x", f"{r['sig_read_chain_ms'] * 1e3:.1f}",
                     f"{g['select_chain_over_measured_read']:.1f}x"])
    return (_table(["512K x 1, 1/32, " + device_label(res["device"]), "selection µs",
                    f"over one read at copy bandwidth ({copy_us:.1f} µs)", "measured read µs", "over measured read"],
                   rows)
            + f"\n\n{sig_mb:.1f} MB of signatures; measured read = the simplest kernel reading them once "
              f"(`hashattention/benchmarks/read_floor.py`, same timer). From `{RESULTS}/attention_h200.json`.")


# -- memory -------------------------------------------------------------------------------------------------
def memory(root: Path = ROOT) -> str:
    data = _load(root, MEMORY_FILE)
    rows = []
    for r in data["reports"]:
        if r["context"] != 131072:
            continue
        rows.append([r["model"], f"{r['kv_heads']} of {r['q_heads']}", _bytes(r["kv_bytes"]),
                     _bytes(r["signature_bytes"]), f"1/{1 / r['signature_to_kv_ratio']:.0f}",
                     f"{r['max_batch_dense']} / {r['max_batch_hash']}"])
    gib = data["reports"][0].get("gpu_memory", 0) / 1024 ** 3
    return (_table(["model (bf16)", "KV heads", "KV cache per 128K sequence", "signatures", "signatures / KV",
                    f"128K sequences on {gib:.0f} GiB (H100): dense / HashAttention"], rows)
            + f"\n\nComputed from the model shapes (`hashattention memory`, `{MEMORY_FILE}`).")


def group_selections(root: Path = ROOT) -> str:
    """Attention-level comparison of the group selections on the suite's questions (``recall --selections``)."""
    data = _load(root, SELECTION_FILE)
    rows = []
    for k, v in sorted(data["rows"].items(), key=lambda x: (-_budget_key(x[0].split("@")[1]), x[0])):
        name, b = k.split("@")
        rows.append([f"**{name}**" if name == "sum" else name, b, f"{v['heavy_mass']:.3f}", f"{v['top1']:.3f}",
                     f"{v['mass']:.3f}", f"{v['rel_error']:.3f}", f"{v['read']:.0f}"])
    return (_table(["selection", "budget", "heavy mass", "top-1 hit", "mass", "output error", "rows read"], rows)
            + f"\n\n{data['prompts']} suite prompts x {_ctx(data['length'])} tokens (one per task), the question's "
            f"tokens as queries, the `pydoc` maps (shipped until 2026-12-08), {device_label(data['device'])} "
            f"(`{SELECTION_FILE}`, "
            f"`{data['command']}`).")


def question_maps(root: Path = ROOT) -> str:
    """The `pydoc` maps (shipped before) against maps trained further from them (with and without retrieval
    questions), the same suite questions."""
    ship, new = _load(root, SELECTION_FILE), _load(root, QUESTIONS_FILE)
    if (ship["length"], ship["prompts"]) != (new["length"], new["prompts"]):
        raise ValueError(f"{SELECTION_FILE} and {QUESTIONS_FILE} measured other prompts")
    sources = [("pydoc", ship["rows"])] + list(new.get("rows_by_maps", {Path(new["maps"]).stem: new["rows"]}).items())
    rows = []
    order = {"sum": 0, "oracle": 2}
    for key in sorted(new["rows"], key=lambda k: (-_budget_key(k.split("@")[1]), order.get(k.split("@")[0], 1), k)):
        name, b = key.split("@")
        if name == "oracle-head":
            continue
        for label, data in (sources if name != "oracle" else [("-", new["rows"])]):
            v = data[key]
            rows.append([label, f"**{name}**" if name == "sum" else name, b, f"{v['heavy_mass']:.3f}",
                         f"{v['top1']:.3f}", f"{v['rel_error']:.3f}"])
    return (_table(["maps", "scores", "budget", "heavy mass", "top-1 hit", "output error"], rows)
            + f"\n\n{new['prompts']} suite prompts x {_ctx(new['length'])} tokens, the question's tokens as queries, every "
            f"layer, {device_label(new['device'])} (`{QUESTIONS_FILE}`: `{new['command']}`; the `pydoc` maps' rows "
            f"from `{SELECTION_FILE}`).")


def offload(root: Path = ROOT) -> str:
    """Decode with the K/V in host memory against the dense baselines (docs/performance.md)."""
    from .offload import _variant, summary
    res = _load(root, OFFLOAD_FILE)
    rows = []
    for r in res["rows"]:
        if "tok_s" not in r:
            continue
        hit = "-" if r.get("hit_rate") is None else f"{r['hit_rate']:.3f}"
        rows.append([f"{r['context'] // 1024}K x {r['batch']}", r["mode"] + _variant(r), str(r["heavy"]),
                     str(r.get("row_cache", "-") or "-"), str(r.get("gpu_layers", "-")),
                     "-" if r.get("text") == "real" else f"{r['tok_s']:.2f}",  # the real-text rows: CPU
                     f"{r['pcie_bytes_per_step'] / 1e6:,.{0 if r['pcie_bytes_per_step'] >= 1e8 else 2}f}", hit,
                     "real (CPU)" if r.get("text") == "real" else
                     f"synthetic, drift {r['query_drift']:g}" if r.get("query_drift") else "synthetic", r.get("run") or "-",
                     device_label(str(r["device"]))])
    return (_table(["context x batch", "mode", "heavy", "row cache", "GPU layers", "tok/s", "PCIe MB/step",
                    "hit rate", "cache", "run", "device"], rows)
            + "\n\n" + "\n".join(summary(res)) + f"\n\nSynthetic rows: Llama-3.1-8B shape (random weights), bf16, "
            f"sink and window 128. From `{RESULTS}/{OFFLOAD_FILE}` ({res.get('note', '')}).")


def adaptive_budget(root: Path = ROOT) -> str:
    """The adaptive heavy budgets beside fixed top-k, by rows read (``recall --selections --top-p / --min-share``;
    the files' fixed rows are of the same prompts, the first file's are kept)."""
    files = [_load(root, f) for f in ADAPTIVE_FILES]
    merged = {}
    for data in files:
        for k, v in data["rows"].items():
            merged.setdefault(k, v)
    rows = []
    for k, v in sorted(merged.items(), key=lambda x: (not x[0].startswith("sum"), x[1]["read"])):
        name, b = k.split("@")
        if name == "oracle-head":  # per-head rows: not comparable by rows read per KV head
            continue
        who, _, rule = name.partition("-")
        rule = (f"top-p {rule[1:]}, cap {b}" if rule[:1] == "p" else f"min share {rule[1:]}, cap {b}" if rule
                else f"top-k {b}")
        rows.append([f"**{who}**" if "cap" in rule else who, rule, f"{v['read']:.0f}", f"{v['heavy_mass']:.3f}",
                     f"{v['top1']:.3f}", f"{v['rel_error']:.3f}"])
    d = files[0]
    return (_table(["scores", "heavy budget", "rows read", "heavy mass", "top-1 hit", "output error"], rows)
            + f"\n\n{d['prompts']} suite prompts x {_ctx(d['length'])} tokens (one per task), the question's "
            f"tokens as queries, the `pydoc` maps (shipped until 2026-12-08) and their calibration, "
            f"{device_label(d['device'])} ("
            + "; ".join(f"`{f}`: `{x['command']}`" for f, x in zip(ADAPTIVE_FILES, files)) + ").")


TABLES = {"quality": quality, "kernels": kernels, "decode": decode, "memory": memory,
          "decode-breakdown": decode_breakdown, "kernel-breakdown": kernel_breakdown,
          "selection-floor": selection_floor, "group-selections": group_selections,
          "question-maps": question_maps, "quality-maps": quality_maps,
          "offload": offload, "adaptive-budget": adaptive_budget}


# -- the files ----------------------------------------------------------------------------------------------
def render(text: str, root: Path = ROOT) -> str:
    """``text`` with every marked table rendered again from the results files."""
    def sub(m):
        name = m.group("name")
        if name not in TABLES:
            raise ValueError(f"unknown table {name!r} in a marker; known: {', '.join(TABLES)}")
        return m.group(1) + TABLES[name](root).rstrip("\n") + "\n" + m.group(4)
    return MARKER.sub(sub, text)


def update(files=FILES, root: Path = ROOT, check: bool = False) -> list[str]:
    """Render the tables of ``files`` (paths relative to ``root``); returns the files that differed (and, unless
    ``check``, were rewritten)."""
    changed = []
    for f in files:
        path = Path(root) / f
        old = path.read_text()
        new = render(old, root)
        if new != old:
            changed.append(str(f))
            if not check:
                path.write_text(new)
    return changed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hashattention.benchmarks.readme_tables",
                                 description="Render the README's and docs' tables from bench/results.")
    ap.add_argument("files", nargs="*", default=list(FILES))
    ap.add_argument("--check", action="store_true", help="only report files whose tables are not up to date")
    ap.add_argument("--root", default=str(ROOT))
    a = ap.parse_args(argv)
    changed = update(a.files, Path(a.root), check=a.check)
    for f in changed:
        print(f"{f}: {'tables out of date' if a.check else 'tables rendered'}")
    return 1 if (a.check and changed) else 0


if __name__ == "__main__":
    sys.exit(main())
