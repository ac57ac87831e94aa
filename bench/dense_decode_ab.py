"""One-off A/B: the engine's own dense decode kernel vs kernels.sparse_decode.dense_decode (same kernels as
sparse decode), same tensors, CUDA graphs."""
import torch
from hashattention.benchmarks.attention import _timer
from hashattention.engine import kernels as E
from hashattention.kernels.sparse_decode import dense_decode

measure = _timer(50, True)
dev = torch.device("cuda")
for (b, hq, hkv, d, n) in [(1, 32, 8, 128, 4096), (1, 32, 8, 128, 32768), (1, 32, 8, 128, 131072),
                           (4, 32, 8, 128, 32768), (4, 32, 8, 128, 131072), (1, 9, 3, 64, 8192), (8, 9, 3, 64, 8192)]:
    q = torch.randn(b, hq, d, device=dev, dtype=torch.bfloat16)
    kc = torch.randn(b, hkv, n + 64, d, device=dev, dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    L = torch.tensor([n], device=dev)
    ref = torch.nn.functional.scaled_dot_product_attention(q[:, :, None], kc[:, :, :n], vc[:, :, :n],
                                                           enable_gqa=True)[:, :, 0].float()
    t_old, _ = measure(lambda: E.decode_attention(q, kc, vc, length=L))
    t_new, _ = measure(lambda: dense_decode(q, kc, vc, L, check=False))
    e_old = float((E.decode_attention(q, kc, vc, length=L).float() - ref).abs().max())
    e_new = float((dense_decode(q, kc, vc, L).float() - ref).abs().max())
    print(f"b{b} hq{hq} hkv{hkv} d{d} n{n}: engine {t_old*1e3:7.1f} us  dense_decode {t_new*1e3:7.1f} us  "
          f"ratio {t_new/t_old:.3f}  maxerr {e_old:.1e} {e_new:.1e}", flush=True)
