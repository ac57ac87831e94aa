"""Quality of the default model's sparse attention on one GPU, paired against dense, under one deadline.

    . bench/gpu_env.sh && python3 bench/quality_gpu.py --out $OUT --deadline 500 \
        --pass "mode=context;policies=dense,oracle,hash-sum,hash-max;budgets=1/32,1/64;samples=12" \
        --pass "mode=everywhere;policies=dense,oracle,hash-max;budgets=1/16,1/32;samples=4;ppl=2" \
        --pass "mode=context;policies=hash-max;budgets=1/32;samples=12;maps=/tmp/t/long.safetensors;tag=long"

Each pass is a resumable `Suite` run of one mode (its own results file, `quality_<mode>_<tag>.json`); passes
of the same mode share the prompts (same seed), and a pass with other maps reuses the dense records of the
mode's first pass instead of recomputing them. The model loads once. At the end every results file is
summarised into `quality_summary.{json,md,png}` (paired deltas against dense with 95% bootstrap intervals,
hashattention.evaluation.quality) and everything is copied to --out.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hashattention.evaluation.quality import summarize_files  # noqa: E402
from hashattention.evaluation.runner import Suite  # noqa: E402
from hashattention.models import load_model  # noqa: E402
from hashattention.shipped import DEFAULT_MAPS, load_default_maps  # noqa: E402
from hashattention.weights import load_maps  # noqa: E402

KEYS = {"mode", "policies", "budgets", "samples", "round", "ppl", "maps", "tag", "lengths", "tasks", "chunk"}


def parse_pass(text: str) -> dict:
    kv = dict(item.split("=", 1) for item in text.split(";") if item.strip())
    bad = set(kv) - KEYS
    if bad or "mode" not in kv:
        raise SystemExit(f"bad --pass {text!r}: keys {sorted(KEYS)}, mode required")
    return kv


def seed_dense(src: Path, dst: Path, mode: str):
    """Start ``dst`` with the dense records of ``src`` (same prompts), so dense runs once per mode."""
    if dst.exists() or not src.exists():
        return
    data = json.loads(src.read_text())
    keep = {k: v for k, v in data["records"].items() if k.split("|")[1] == "dense" and k.startswith(mode + "|")}
    dst.write_text(json.dumps({"settings": data["settings"], "records": keep, "stats": {}, "timing": {}}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pass", dest="passes", action="append", required=True)
    ap.add_argument("--deadline", type=float, default=500, help="seconds for all passes after the model loads")
    ap.add_argument("--work", default="/tmp/quality")
    ap.add_argument("--out", default=None)
    ap.add_argument("--lengths", default="2K,4K,8K")
    a = ap.parse_args()
    passes = [parse_pass(p) for p in a.passes]
    t_load = time.perf_counter()
    model, tok, _ = load_model("default")
    shipped = load_default_maps(model)
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"model on {dev}, loaded in {time.perf_counter() - t_load:.1f} s", flush=True)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    first = {}
    files, names = [], []
    try:
        for p in passes:
            mode, tag = p["mode"], p.get("tag", "shipped")
            maps_path = p.get("maps", "shipped")
            maps = shipped if maps_path == "shipped" else load_maps(maps_path, model.config, device=model.device)
            out = work / f"quality_{mode}_{tag}.json"
            if mode in first and first[mode] != out:
                seed_dense(first[mode], out, mode)
            first.setdefault(mode, out)
            left = a.deadline - (time.perf_counter() - t0)
            if left < 20:
                print(f"pass {p} skipped: {left:.0f} s left", flush=True)
                continue
            print(f"pass {p} ({left:.0f} s left)", flush=True)
            budgets = p.get("budgets", "1/16,1/32").split(",")
            samples = int(p.get("samples", 4))
            suite = Suite(model, tok, tasks=p.get("tasks", "all"), lengths=p.get("lengths", a.lengths),
                          policies=p.get("policies", "dense,oracle,hash"), budgets=budgets, context_budgets=budgets,
                          samples=samples, round_size=int(p.get("round", samples)), modes=[mode],
                          decode_budgets=budgets, decode_rounds=10 ** 6, maps=maps,
                          maps_path=DEFAULT_MAPS.name if maps_path == "shipped" else Path(maps_path).name,
                          ppl_samples=int(p.get("ppl", 0)), chunk=int(p.get("chunk", 128)), out=out,
                          time_limit=left, progress=False)
            suite.run()
            tm = suite.data["timing"]
            print("\n".join(f"  {k}: {v:.1f} s" for k, v in tm.items() if k != "total_s"), flush=True)
            print(suite.out.with_suffix(".md").read_text(), flush=True)
            if out not in files:
                files.append(out)
                names.append(tag)
    finally:
        if files:
            summarize_files(files, work / "quality_summary.json", names)
            print((work / "quality_summary.md").read_text(), flush=True)
        if a.out:
            for f in list(work.glob("*.json")) + list(work.glob("*.md")) + list(work.glob("quality_summary.png")):
                shutil.copy(f, Path(a.out) / f.name)


if __name__ == "__main__":
    main()
