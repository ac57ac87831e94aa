"""Benchmarks run by `hashattention bench` (GPU)."""
import json
import os
import re


def device_tag(name: str) -> str:
    """The device part of a results file name (``<what>_<device>[_<variant>]``, bench/results/README.md):
    'NVIDIA H100 80GB HBM3' -> 'h100', 'NVIDIA H200' -> 'h200', 'NVIDIA A100-SXM4-80GB' -> 'a100', a CPU -> 'cpu'."""
    m = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Za-z]?)\b", name or "")
    if m and "nvidia" in (name or "").lower():
        return m.group(1).lower()
    if not name or name.lower().startswith(("cpu", "x86", "arm", "aarch")):
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def write_results(res: dict, out_dir: str, stem: str, markdown, plot) -> str:
    """<stem>.json, <stem>.md (``markdown(res)``, returned) and <stem>.png (``plot(res, path)``, when matplotlib
    is there) in ``out_dir``: the three files every benchmark leaves for bench/results."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, stem + ".json"), "w") as f:
        json.dump(res, f, indent=1)
    md = markdown(res)
    with open(os.path.join(out_dir, stem + ".md"), "w") as f:
        f.write(md)
    try:
        plot(res, os.path.join(out_dir, stem + ".png"))
    except ImportError:
        pass
    return md
