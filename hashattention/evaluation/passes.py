"""Several suite passes under one deadline, one model load, then the quality summary: ``hashattention eval
--pass ...`` (issue 24's runs on one GPU; device time is scarce).

    hashattention eval --work /tmp/quality --deadline 500 \
        --pass "mode=context;policies=dense,oracle,hash-sum,hash-max;budgets=1/32,1/64;samples=12" \
        --pass "mode=everywhere;policies=dense,oracle,hash-max;budgets=1/16,1/32;samples=4;ppl=2" \
        --pass "mode=context;policies=hash-max;budgets=1/32;samples=12;maps=/tmp/t/long.safetensors;tag=long" \
        --pass "mode=context;policies=hash-sum;budgets=1/32;samples=12;layers=20:4;tag=l20x4"

Each pass is a resumable `Suite` run of one mode (its own results file, ``quality_<mode>_<tag>.json``); passes
of the same mode share the prompts (same seed), and a pass with other maps reuses the dense records of the
mode's first pass instead of recomputing them. ``layers=20:4,19:2``: the heavy budget shared unevenly over the
layers at the same total (a listed layer reads its weight times an unlisted one; core.budget.layer_budgets). At
the end every results file is summarised into ``quality_summary.{json,md,png}`` (paired deltas against dense with
95% bootstrap intervals, :mod:`hashattention.evaluation.quality`).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from .quality import summarize_files
from .runner import Suite

KEYS = {"mode", "policies", "budgets", "samples", "round", "ppl", "maps", "tag", "lengths", "tasks", "chunk", "layers"}


def parse_pass(text: str) -> dict:
    """"key=value;key=value" -> dict (keys: KEYS, mode required)."""
    kv = dict(item.split("=", 1) for item in text.split(";") if "=" in item)
    bad = set(kv) - KEYS
    if bad or "mode" not in kv or any(item.strip() and "=" not in item for item in text.split(";")):
        raise ValueError(f"bad --pass {text!r}: 'key=value;...' with keys {', '.join(sorted(KEYS))} (mode required)")
    return kv


def seed_dense(src: Path, dst: Path, mode: str):
    """Give ``dst`` the dense records of ``src`` it lacks (same prompts), so dense runs once per mode."""
    if not src.exists():
        return
    data = json.loads(src.read_text())
    dense = {k: v for k, v in data["records"].items() if k.split("|")[1] == "dense" and k.startswith(mode + "|")}
    old = json.loads(dst.read_text()) if dst.exists() else {"settings": data["settings"], "records": {},
                                                           "stats": {}, "timing": {}}
    old["records"] = {**dense, **old["records"]}
    dst.write_text(json.dumps(old))


def run_passes(model, tok, passes: list, work, deadline: float, lengths: str = "2K,4K,8K", shipped=None,
               shipped_name: str = "shipped", log=print) -> Path | None:
    """Run ``passes`` (dicts from :func:`parse_pass`) with ``model``; returns the summary's JSON path."""
    from ..weights import load_maps
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    first, files, names = {}, [], []
    try:
        for p in passes:
            mode, tag = p["mode"], p.get("tag", "shipped")
            maps_path = p.get("maps", "shipped")
            maps = shipped if maps_path == "shipped" else load_maps(maps_path, model.config, device=model.device)
            out = work / f"quality_{mode}_{tag}.json"
            if mode in first and first[mode] != out:
                seed_dense(first[mode], out, mode)
            first.setdefault(mode, out)
            left = deadline - (time.perf_counter() - t0)
            if left < 20:
                log(f"pass {p} skipped: {left:.0f} s left")
                continue
            log(f"pass {p} ({left:.0f} s left)")
            budgets = p.get("budgets", "1/16,1/32").split(",")
            samples = int(p.get("samples", 4))
            suite = Suite(model, tok, tasks=p.get("tasks", "all"), lengths=p.get("lengths", lengths),
                          policies=p.get("policies", "dense,oracle,hash"), budgets=budgets, context_budgets=budgets,
                          samples=samples, round_size=int(p.get("round", samples)), modes=[mode],
                          decode_budgets=budgets, decode_rounds=10 ** 6, maps=maps,
                          maps_path=shipped_name if maps_path == "shipped" else Path(maps_path).name,
                          ppl_samples=int(p.get("ppl", 0)), chunk=int(p.get("chunk", 128)), out=out,
                          layer_weights=p.get("layers"),
                          time_limit=left, progress=False, log=log)
            suite.run()
            log("\n".join(f"  {k}: {v:.1f} s" for k, v in suite.data["timing"].items() if k != "total_s"))
            log(suite.out.with_suffix(".md").read_text())
            if out not in files:
                files.append(out)
                names.append(tag)
    finally:
        if files:
            path = summarize_files(files, work / "quality_summary.json", names)
            log(path.with_suffix(".md").read_text())
    return work / "quality_summary.json" if files else None
