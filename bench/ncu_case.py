"""One HashAttention decode step at 512K (batch 1, Llama-3.1-8B shapes, 1/32), run a few times: the case
profiled with Nsight Compute (bench/h200_kernels.sh ncu)."""
import torch

from hashattention import Budget, kernels as K

dev, b, hq, hkv, n, d = "cuda", 1, 32, 8, 524288, 128
g = torch.Generator(device=dev).manual_seed(0)
kc = torch.empty(b, hkv, n, d, device=dev, dtype=torch.bfloat16).normal_(generator=g)
vc = torch.empty_like(kc).normal_(generator=g)
q = torch.randn(b, hq, d, device=dev, dtype=torch.bfloat16, generator=g)
q_sig = torch.randint(-2 ** 31, 2 ** 31 - 1, (b, hq, 1), device=dev, dtype=torch.int32, generator=g)
k_sig = torch.randint(-2 ** 31, 2 ** 31 - 1, (b, hkv, n, 1), device=dev, dtype=torch.int32, generator=g)
st, ln = torch.zeros(b, dtype=torch.int32, device=dev), torch.full((b,), n, dtype=torch.int32, device=dev)
for _ in range(3):
    idx, cnt = K.score_select(q_sig, k_sig, st, ln, Budget(heavy=1 / 32), hkv, True)
    out = K.sparse_decode(q, kc, vc, idx, cnt)
torch.cuda.synchronize()
print("ok", out.shape)
