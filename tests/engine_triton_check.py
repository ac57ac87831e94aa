"""Run by tests/test_engine.py: the engine's Triton kernels against their PyTorch references, and the engine
(Triton path) against the Hugging Face integration. Without CUDA it runs with TRITON_INTERPRET=1 on the CPU;
with CUDA, compiled on the GPU (every tensor is made there: torch.set_default_device). Prints ALL OK."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
DEV = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
assert DEV == "cpu" or torch.cuda.is_available(), "without CUDA, run with TRITON_INTERPRET=1"
torch.set_default_device(DEV)
from conftest import engine_beside_hf  # noqa: E402
from hashattention import HashAttentionPolicy, enable  # noqa: E402
from hashattention.core.maps import HashMaps, MapsConfig  # noqa: E402
from hashattention.engine import Generator, kernels as K  # noqa: E402
from hashattention.engine.model import _rms_norm, _rotate_half  # noqa: E402

torch.manual_seed(0)
# dense decode attention
for (b, hq, hkv, d, s) in [(2, 8, 2, 32, 700), (1, 4, 4, 16, 300)]:
    q, kc, vc = torch.randn(b, hq, d), torch.randn(b, hkv, s, d), torch.randn(b, hkv, s, d)
    L = torch.tensor([s - 7])
    assert torch.allclose(K.decode_attention(q, kc, vc, length=L), K.decode_attention_reference(q, kc, vc, length=L),
                          atol=1e-5)
# bf16 (the GPU dtype)
q, kc, vc = torch.randn(2, 6, 16).bfloat16(), torch.randn(2, 2, 80, 16).bfloat16(), torch.randn(2, 2, 80, 16).bfloat16()
L = torch.tensor([61])
assert (K.decode_attention(q, kc, vc, length=L).float()
        - K.decode_attention_reference(q, kc, vc, length=L).float()).abs().max() < 2e-2
# fused maps vs HashMaps (depth 3 with bias, depth 2, depth 1 SimHash-like); batch 3: one program per (head,
# sequence) (matrix-vector path), batch 19: 16-sequence tiles with a ragged last one (tl.dot path)
for depth, bias, hqq, hkv, d, b in [(3, True, 8, 2, 32, 3), (3, True, 8, 2, 32, 19), (2, False, 4, 2, 16, 3),
                                    (2, True, 4, 2, 16, 19), (1, False, 6, 3, 16, 3), (1, False, 6, 3, 16, 19)]:
    assert (b <= K.MAPS_CONFIG["mv_max_batch"]) == (b == 3)
    maps = HashMaps(MapsConfig(num_layers=2, num_q_heads=hqq, num_kv_heads=hkv, head_dim=d, depth=depth,
                               bias=bias, hidden=32))
    ws = [torch.cat([maps.q.weights[i], maps.k.weights[i]], 1).detach() for i in range(depth)]
    bs = [torch.cat([maps.q.biases[i], maps.k.biases[i]], 1).detach()[:, :, None] for i in range(depth)] \
        if bias else None
    q, k = torch.randn(b, hqq, 1, d), torch.randn(b, hkv, 1, d)
    sig = torch.zeros(b, hkv, 10, 1, dtype=torch.int32)
    qs = K.fused_signatures(torch.cat([q[:, :, 0], k[:, :, 0]], 1), ws, bs, 1, hqq, sig, torch.tensor([4]))
    assert torch.equal(qs, maps.query_signature(1, q)[:, :, 0])
    assert torch.equal(sig[:, :, 4], maps.key_signature(1, k)[:, :, 0]) and sig[:, :, 5].abs().sum() == 0
# norm, rotary + cache write, silu * up (bit-exact with the eager ops)
x, r, wt = torch.randn(3, 96), torch.randn(3, 96), torch.randn(96)
s_, y = K.rms_norm(x, wt, 1e-5, residual=r)
assert torch.equal(s_, x + r) and torch.allclose(y, _rms_norm(x + r, wt, 1e-5), atol=1e-6)
gu = torch.randn(3, 64)
assert torch.allclose(K.silu_mul(gu), torch.nn.functional.silu(gu[:, :32]) * gu[:, 32:], atol=1e-6)
hq, hkv, d = 4, 2, 16
qkv = torch.randn(2, (hq + 2 * hkv) * d)
cos, sin = torch.randn(1, d), torch.randn(1, d)
kc, vc = torch.zeros(2, hkv, 8, d), torch.zeros(2, hkv, 8, d)
qk = K.rope_and_cache(qkv, cos, sin, kc, vc, torch.tensor([5]), hq, hkv)
x4 = qkv.view(2, hq + 2 * hkv, d)
ref = x4[:, :hq + hkv] * cos + _rotate_half(x4[:, :hq + hkv]) * sin
assert torch.allclose(qk, ref, atol=1e-6) and torch.equal(kc[:, :, 5], qk[:, hq:]) and torch.equal(vc[:, :, 5], x4[:, hq + hkv:])
# the whole engine on the Triton path: the HF integration's tokens
hf, ids, bud, maps, m = engine_beside_hf()
with enable(hf, HashAttentionPolicy(maps, bud, per_group=True), mode="decode"):
    ref = hf.generate(ids, max_new_tokens=10, min_new_tokens=10, do_sample=False)[:, 60:]
dense_ref = hf.generate(ids, max_new_tokens=10, min_new_tokens=10, do_sample=False)[:, 60:]
assert torch.equal(Generator(m).generate(ids, 10, mode="hash"), ref)
assert torch.equal(Generator(m).generate(ids, 10, mode="dense"), dense_ref)
print("ALL OK")
