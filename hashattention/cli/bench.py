"""`hashattention bench attention|decode|fetch`: kernel-level and end-to-end benchmarks (GPU)."""
from __future__ import annotations

import importlib

BENCHES = {"attention": "decode attention latency, HashAttention kernels vs SDPA (and FlashInfer)",
           "decode": "end-to-end tokens/s and memory, dense vs HashAttention engine",
           "fetch": "one host layer's offload fetch in isolation: the misses copied by the fetch kernel or after it"}


def add_parser(sub):
    p = sub.add_parser("bench", help="GPU benchmarks: attention kernels, end-to-end decoding")
    bsub = p.add_subparsers(dest="bench", metavar="BENCH")
    for name, help_ in BENCHES.items():
        try:
            mod = importlib.import_module(f"hashattention.benchmarks.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"hashattention.benchmarks.{name}":
                continue
            raise
        bp = bsub.add_parser(name, help=help_)
        mod.add_arguments(bp)
        bp.set_defaults(func=mod.run)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
