"""dense_decode under two launch options, side by side, alternating (A B A B), on one GPU.

    python3 bench/dense_decode_pps.py pps    # 4 vs 3 programs per SM (session 6, H200: dense_decode_pps_h200_s6.txt,
                                             # run when both paths shared CONFIG["programs_per_sm"])
    python3 bench/dense_decode_pps.py cols   # the merge over head_dim slices of 32 columns vs whole rows (session 7)
"""
import importlib
import sys

import torch

from hashattention.benchmarks.attention import _timer

sd = importlib.import_module("hashattention.kernels.sparse_decode")
OPTIONS = {"pps": ("dense_programs_per_sm", (4, 3)), "cols": ("combine_cols", (32, 128))}
key, values = OPTIONS[sys.argv[1] if len(sys.argv) > 1 else "pps"]
measure = _timer(50, True)
dev = torch.device("cuda")
default = sd.CONFIG[key]
for (b, hq, hkv, d, n) in [(1, 32, 8, 128, 32768), (1, 32, 8, 128, 131072), (4, 32, 8, 128, 131072),
                           (1, 9, 3, 64, 8192), (8, 9, 3, 64, 8192)]:
    q = torch.randn(b, hq, d, device=dev, dtype=torch.bfloat16)
    kc = torch.randn(b, hkv, n, d, device=dev, dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    length = torch.tensor([n], device=dev)
    res = []
    for v in values + values:
        sd.CONFIG[key] = v
        t, _ = measure(lambda: sd.dense_decode(q, kc, vc, length, check=False))
        res.append(f"{key}={v} {t * 1e3:.1f}")
    sd.CONFIG[key] = default
    print(f"dense_decode b{b} hq{hq} hkv{hkv} d{d} n{n}: " + "  ".join(res), flush=True)
