"""Paired comparisons against dense with bootstrap intervals, and the quality summary a user reads.

Every policy of a suite run answers the same prompts as dense, so its quality is measured as a *paired*
difference: for each prompt (task, length, sample) the policy's score minus dense's. The suite average weighs
every (task, length) cell equally, so the interval comes from a stratified bootstrap: prompts are resampled
with replacement inside each cell, the cell means averaged, 2000 times; the 95% interval is the 2.5th and
97.5th percentiles of those averages.

    rows = quality_rows(data, maps="shipped")      # data: a suite results JSON (runner.Suite.data)
    write_summary(rows, "bench/results/quality_summary.json")   # + .md and .png beside it

A row: {"mode", "budget", "policy", "score", "delta_vs_dense", "ci95": [lo, hi], "n_items", "device",
"maps"} (+ "ppl" and "ppl_dense" by length for the everywhere mode, where the run measured perplexity).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

DENSE = "dense"
FULL = "full"
REPS = 2000


def paired_deltas(data: dict, mode: str, policy: str, budget: str):
    """(deltas [n], cells [n] int, scores [n], dense scores [n]) over the prompts both the policy and dense
    answered in ``mode``."""
    recs = data["records"]
    pol, den, cells = [], [], []
    cell_ids: dict = {}
    for k, v in recs.items():
        m, p, b, L, task, idx = k.split("|")
        if m != mode or p != policy or b != budget or "score" not in v:
            continue
        d = recs.get(f"{mode}|{DENSE}|{FULL}|{L}|{task}|{idx}")
        if d is None:
            continue
        pol.append(v["score"])
        den.append(d["score"])
        cells.append(cell_ids.setdefault((task, L), len(cell_ids)))
    pol, den = np.asarray(pol, dtype=np.float64), np.asarray(den, dtype=np.float64)
    return pol - den, np.asarray(cells, dtype=np.int64), pol, den


def stratified_mean(x: np.ndarray, cells: np.ndarray) -> float:
    """Mean over cells of the cell means (the suite average's weighting)."""
    n = np.bincount(cells)
    return float(np.mean(np.bincount(cells, weights=x)[n > 0] / n[n > 0]))


def bootstrap_ci(x: np.ndarray, cells: np.ndarray, reps: int = REPS, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Stratified bootstrap interval of :func:`stratified_mean`: items resampled within their cell."""
    if x.size == 0:
        raise ValueError("no paired items to bootstrap")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    order = np.argsort(cells, kind="stable")
    xs, cs = x[order], cells[order]
    _, starts, counts = np.unique(cs, return_index=True, return_counts=True)
    # one draw per item: an offset inside its own cell
    u = rng.random((reps, xs.size))
    pick = starts.repeat(counts)[None, :] + np.floor(u * counts.repeat(counts)[None, :]).astype(np.int64)
    sums = np.add.reduceat(xs[pick], starts, axis=1)  # [reps, cells]: items are sorted by cell
    means = (sums / counts[None, :]).mean(1)
    a = (1 - level) / 2
    lo, hi = np.quantile(means, [a, 1 - a])
    return float(lo), float(hi)


def _budget_key(b: str) -> float:
    """Tokens read beyond sink and window as a fraction of the context ('1/64+r1/64': heavy + residual)."""
    from ..core.budget import parse_label
    return 1.0 if b == FULL else float(sum(parse_label(b)))


def quality_rows(data: dict, maps: str | None = None, reps: int = REPS) -> list[dict]:
    """One row per (mode, budget, policy) of a suite results dict (dense included, delta 0)."""
    recs = data["records"]
    device = data.get("settings", {}).get("device", "")
    maps = maps if maps is not None else (data.get("settings", {}).get("maps") or "")
    cfgs = sorted({tuple(k.split("|")[:3]) for k in recs if k.split("|")[4] != "ppl"})
    summary = data.get("summary") or {}
    rows = []
    for mode, pol, bud in cfgs:
        if pol == DENSE:
            continue
        d, cells, ps, ds = paired_deltas(data, mode, pol, bud)
        if d.size == 0:
            continue
        lo, hi = bootstrap_ci(d, cells, reps)
        row = {"mode": mode, "budget": bud, "policy": pol, "score": round(stratified_mean(ps, cells), 3),
               "dense": round(stratified_mean(ds, cells), 3), "delta_vs_dense": round(stratified_mean(d, cells), 3),
               "ci95": [round(lo, 3), round(hi, 3)], "n_items": int(d.size), "device": device,
               "maps": maps if pol == "hash" or pol.startswith("hash-") else "-"}
        e = summary.get(mode, {}).get(f"{pol}@{bud}", {})
        dn = summary.get(mode, {}).get(f"{DENSE}@{FULL}", {})
        if e.get("ppl"):
            row["ppl"] = {k: round(v, 4) for k, v in e["ppl"].items()}
            row["ppl_dense"] = {k: round(v, 4) for k, v in dn.get("ppl", {}).items()}
        rows.append(row)
    return rows


def sort_rows(rows: list[dict]) -> list[dict]:
    modes = ["context", "everywhere", "decode"]
    return sorted(rows, key=lambda r: (modes.index(r["mode"]) if r["mode"] in modes else 9, -_budget_key(r["budget"]),
                                       r["maps"], r["policy"]))


def markdown(rows: list[dict]) -> str:
    """The summary table: score, paired delta against dense with its 95% interval, items, perplexity."""
    rows = sort_rows(rows)
    devices = sorted({r["device"] for r in rows})
    lines = ["# Quality against dense (paired, 95% stratified bootstrap intervals)", "",
             f"Device: {', '.join(devices)}. Score: suite average (%), each (task, length) cell weighted equally; "
             "delta: policy minus dense on the same prompts. Modes: context = dense context, sparse question and "
             "answer (the authors' sparse-attention-hub protocol); everywhere = every query sparse, chunked "
             "prefill (the HashAttention paper's evaluation); decode = dense prefill, sparse answer.", "",
             "| mode | budget | policy | maps | score | dense | delta [95% CI] | items | ppl (dense) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ppl = ", ".join(f"{int(L) // 1024}K {v:.3f} ({r.get('ppl_dense', {}).get(L, float('nan')):.3f})"
                        for L, v in sorted(r.get("ppl", {}).items(), key=lambda x: int(x[0]))) or "-"
        lo, hi = r["ci95"]
        lines.append(f"| {r['mode']} | {r['budget']} | {r['policy']} | {r['maps']} | {r['score']:.1f} | "
                     f"{r['dense']:.1f} | {r['delta_vs_dense']:+.1f} [{lo:+.1f}, {hi:+.1f}] | {r['n_items']} | {ppl} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path):
    """Delta against sparsity with the intervals drawn, one panel per mode."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    modes = [m for m in ("context", "everywhere", "decode") if any(r["mode"] == m for r in rows)]
    if not modes:
        raise ValueError("no rows to plot")
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.4), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        series = sorted({(r["policy"], r["maps"]) for r in rows if r["mode"] == mode})
        for i, (pol, maps) in enumerate(series):
            pts = sorted((1 / _budget_key(r["budget"]), r["delta_vs_dense"], r["ci95"]) for r in rows
                         if r["mode"] == mode and r["policy"] == pol and r["maps"] == maps)
            x = np.array([p[0] for p in pts]) * (1 + 0.03 * (i - len(series) / 2))  # side by side
            y = np.array([p[1] for p in pts])
            err = np.array([[p[1] - p[2][0] for p in pts], [p[2][1] - p[1] for p in pts]])
            label = pol if len({s[1] for s in series}) == 1 else f"{pol} ({maps})"
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=label)
        ax.axhline(0, color="black", lw=1, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sparsity (context / heavy tokens)")
        ax.set_ylabel("score minus dense (points, 95% CI)")
        ax.set_title(mode)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Quality against dense, paired ({', '.join(sorted({r['device'] for r in rows}))})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_summary(rows: list[dict], out) -> Path:
    """``out``.json (the rows), .md (the table) and .png (the plot)."""
    out = Path(out)
    if not rows:
        raise ValueError("no quality rows to write")
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = sort_rows(rows)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(rows))
    plot(rows, out.with_suffix(".png"))
    return out.with_suffix(".json")


def summarize_files(files: list, out, maps_names: list | None = None, skip: list | None = None) -> Path:
    """Rows of several suite results files into one summary. ``maps_names``: the label of each file's hash
    maps (default: the file's setting; a bundle's members: their tags, or all this label when given); a file
    may be one member of a bundle, 'BUNDLE#TAG' (labelled by its tag unless a label is given);
    ``skip``: per file, policies to leave out (e.g. hash rows of maps that are no longer shipped). Where rows
    of several files measure the same thing (mode, budget, policy, maps, device), the one with the most paired
    items stays (a larger run of the same prompts supersedes a smaller one)."""
    rows = []
    for i, f in enumerate(files):
        one = str(f).partition("#")[2]  # 'BUNDLE#TAG': that member alone
        data = load_results(f) if one else json.loads(Path(f).read_text())
        leave = set(skip[i]) if skip else set()
        label = maps_names[i] if maps_names else None
        members = [(one, data)] if one else data["bundle"].items() if "bundle" in data else [(label, data)]
        for tag, member in members:
            rows += [r for r in quality_rows(member, label or tag) if r["policy"] not in leave]
    return write_summary(largest_runs(rows), out)


def largest_runs(rows: list[dict]) -> list[dict]:
    """One row per (mode, budget, policy, maps, device): the one with the most paired items (first on ties)."""
    best: dict = {}
    for r in rows:
        key = (r["mode"], r["budget"], r["policy"], r["maps"], r.get("device"))
        if key not in best or r["n_items"] > best[key]["n_items"]:
            best[key] = r
    return list(best.values())


def bundle_files(files: list, tags: list, out) -> Path:
    """Several suite results files (e.g. one per maps variant, each paired with its own dense rows) as one
    file {"bundle": {tag: results}}, which :func:`summarize_files` reads member by member. A file may be a
    member of another bundle, 'BUNDLE#TAG' (so a bundle grows by rewriting it with a new member)."""
    if len(set(tags)) != len(tags) or not all(tags):
        raise ValueError(f"every bundled file needs its own tag (FILE@TAG), got {tags}")
    bundle = {t: load_results(f) for f, t in zip(files, tags)}
    out = Path(out)
    out.write_text(json.dumps({"bundle": bundle}) + "\n")
    return out


def load_results(spec: str) -> dict:
    """A suite results file, or one member of a bundle: 'FILE' or 'FILE#TAG'."""
    path, _, tag = str(spec).partition("#")
    if not Path(path).is_file():
        raise FileNotFoundError(f"results file {path} does not exist")
    data = json.loads(Path(path).read_text())
    if "bundle" in data:
        if tag not in data["bundle"]:
            raise ValueError(f"{path} is a bundle: name a member as {path}#TAG, one of {sorted(data['bundle'])}")
        data = data["bundle"][tag]
    elif tag:
        raise ValueError(f"{path} is not a bundle, so it has no member {tag!r}")
    if "records" not in data:
        raise ValueError(f"{spec}: not a suite results file (no records)")
    return data


def compare_runs(a: dict, b: dict, reps: int = REPS) -> list[dict]:
    """Paired differences between two runs on the prompts both answered (e.g. two maps files on the same
    prompts): one row per (mode, policy, budget) that both ran, other than dense, with the stratified mean of
    a - b, its 95% bootstrap interval and the number of paired prompts."""
    ra, rb = a["records"], b["records"]
    groups: dict = {}
    for k, v in ra.items():
        mode, pol, bud, L, task, idx = k.split("|")
        w = rb.get(k)
        if pol == DENSE or task == "ppl" or w is None or "score" not in v or "score" not in w:
            continue
        g = groups.setdefault((mode, pol, bud), ([], [], {}))
        g[0].append(v["score"] - w["score"])
        g[1].append(g[2].setdefault((task, L), len(g[2])))
    rows = []
    for (mode, pol, bud), (d, cells, _) in sorted(groups.items()):
        d, cells = np.asarray(d, dtype=np.float64), np.asarray(cells, dtype=np.int64)
        lo, hi = bootstrap_ci(d, cells, reps)
        rows.append({"mode": mode, "policy": pol, "budget": bud, "delta": round(stratified_mean(d, cells), 3),
                     "ci95": [round(lo, 3), round(hi, 3)], "n_items": int(d.size)})
    return rows


def parse_summary_spec(spec: str) -> tuple[str, str | None, set]:
    """'results.json[@maps label[@policy+policy]]' -> (path, label or None, policies to leave out)."""
    parts = spec.split("@")
    if not parts[0] or len(parts) > 3:
        raise ValueError(f"bad --summarize item {spec!r}: FILE[@MAPS_LABEL[@POLICY+POLICY]]")
    if not Path(parts[0].partition("#")[0]).is_file():
        raise FileNotFoundError(f"results file {parts[0]} does not exist")
    return parts[0], (parts[1] or None) if len(parts) > 1 else None, set(filter(None, parts[2].split("+"))) \
        if len(parts) > 2 else set()
