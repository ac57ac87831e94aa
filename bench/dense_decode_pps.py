"""dense_decode with 4 vs 3 programs per SM, side by side (session 6, H200: dense_decode_pps_h200_s6.txt, run
when both paths shared CONFIG["programs_per_sm"]; dense_decode now reads dense_programs_per_sm)."""
import torch
from hashattention.benchmarks.attention import _timer
from hashattention.kernels import sparse_decode as sdm
import importlib
sd = importlib.import_module("hashattention.kernels.sparse_decode")
measure = _timer(50, True)
dev = torch.device("cuda")
for (b, hq, hkv, d, n) in [(1, 32, 8, 128, 32768), (1, 32, 8, 128, 131072), (4, 32, 8, 128, 131072),
                           (1, 9, 3, 64, 8192), (8, 9, 3, 64, 8192)]:
    q = torch.randn(b, hq, d, device=dev, dtype=torch.bfloat16)
    kc = torch.randn(b, hkv, n, d, device=dev, dtype=torch.bfloat16); vc = torch.randn_like(kc)
    L = torch.tensor([n], device=dev)
    res = []
    for pps in (4, 3, 4, 3):
        sd.CONFIG["dense_programs_per_sm"] = pps
        t, _ = measure(lambda: sd.dense_decode(q, kc, vc, L, check=False))
        res.append(f"pps{pps} {t*1e3:.1f}")
    sd.CONFIG["dense_programs_per_sm"] = 4
    print(f"dense_decode b{b} hq{hq} hkv{hkv} d{d} n{n}: " + "  ".join(res), flush=True)
