"""Run by tests/test_offload.py (TRITON_INTERPRET=1, CPU) and tests/gpu_offload_check.py (CUDA): the offload
gather kernel against its reference on random inputs, and the engine's Triton path with K/V on the host
against the on-GPU path. Prints ALL OK."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CUDA = os.environ.get("TRITON_INTERPRET") != "1"
assert not CUDA or torch.cuda.is_available(), "without CUDA, run with TRITON_INTERPRET=1"
DEV = "cuda" if CUDA else "cpu"
from conftest import tiny_model  # noqa: E402
from hashattention.core.budget import Budget  # noqa: E402
from hashattention.core.maps import HashMaps  # noqa: E402
from hashattention.engine import Generator, Transformer  # noqa: E402
from hashattention.engine.offload import gather_rows, gather_rows_reference, pinned_empty, use_triton  # noqa: E402
from hashattention.weights import maps_config_for  # noqa: E402

g = torch.Generator().manual_seed(0)
for b, h, s, d, p, k, dtype in [(2, 3, 200, 16, 40, 24, torch.float32), (1, 8, 1000, 64, 70, 33, torch.bfloat16),
                                (3, 2, 50, 128, 20, 5, torch.float16)]:
    src_k = torch.randn(b, h, s, d, generator=g).to(dtype)
    src_v = torch.randn(b, h, s, d, generator=g).to(dtype)
    if CUDA:  # the host cache as the engine makes it: page-locked, read by the kernel where it lives
        pk, pv = pinned_empty(src_k.shape, dtype), pinned_empty(src_v.shape, dtype)
        pk.copy_(src_k), pv.copy_(src_v)
        src_k, src_v = pk, pv
    src = torch.randint(0, s, (b, h, k), generator=g, dtype=torch.int32)
    src[torch.rand(b, h, k, generator=g) < 0.3] = -1
    dst = torch.stack([torch.stack([torch.randperm(p, generator=g)[:k] for _ in range(h)]) for _ in range(b)]).int()
    out = [torch.zeros(b, h, p, d, dtype=dtype, device=DEV) for _ in range(4)]
    gather_rows(src_k, src_v, out[0], out[1], src.to(DEV), dst.to(DEV))
    gather_rows_reference(src_k, src_v, out[2], out[3], src.to(DEV), dst.to(DEV))
    assert torch.equal(out[0], out[2]) and torch.equal(out[1], out[3]), (b, h, s, d)
    assert out[0].abs().sum() > 0
print("gather ok", flush=True)

# the engine's Triton path (rotary kernel writing the host rows, gather, sparse attention over the working set)
torch.set_default_device(DEV)
hf = tiny_model("llama", layers=2).to(DEV).to(torch.bfloat16)
torch.manual_seed(3)
ids = torch.randint(3, 97, (2, 48))
bud = Budget(heavy=1 / 4, sink=4, window=4)
maps = HashMaps(maps_config_for(hf.config)).to(DEV)
m = Transformer.from_hf(hf)
assert use_triton(torch.empty(1, 16, device=DEV))
m.setup_caches(2, 64, maps=maps, budget=bud)
ref = {mode: Generator(m).generate(ids, 6, mode=mode, prefill_chunk=32) for mode in ("hash", "dense")}
for gl, read in ((0, "gather"), (1, "gather"), (0, "direct")):
    kw = {} if CUDA else {"_host_device": "cpu"}
    m.setup_caches(2, 64, maps=maps, budget=bud, offload="host", gpu_layers=gl, offload_read=read, **kw)
    assert not CUDA or m.host_kv.k_host.is_pinned()
    for mode in ("hash", "dense") if (gl, read) == (0, "gather") else ("hash",):
        got = Generator(m).generate(ids, 6, mode=mode, prefill_chunk=32)
        assert torch.equal(got, ref[mode]), (gl, mode, got, ref[mode])
        st = m.offload_stats()  # counted since the prefill: heavy rows looked up in hash mode only
        assert (st["lookups"] > 0) == (mode == "hash") and st["hits"] <= st["lookups"], (mode, st)
print("engine ok", flush=True)
print("ALL OK")
