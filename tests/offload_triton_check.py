"""Run by tests/test_offload.py (TRITON_INTERPRET=1, CPU) and tests/gpu_offload_check.py (CUDA): the offload
gather kernel and the fused fetch kernel against their references on random inputs, and the engine's Triton path
with K/V on the host (fused fetch, and the reference bookkeeping) against the on-GPU path. Prints ALL OK."""
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
from hashattention.engine.offload import (HostKV, fetch_fused, gather_rows, gather_rows_reference,  # noqa: E402
                                          pinned_empty, use_triton)  # noqa: E402
from hashattention.weights import maps_config_for  # noqa: E402
import hashattention.engine.offload as offload_mod  # noqa: E402

CUT = offload_mod.FUSED_MAX_K

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
    # a compacted list: only the first counts[row] entries are read, whatever follows them
    counts = torch.randint(0, k + 1, (b * h,), generator=g, dtype=torch.int32)
    cut = torch.where(torch.arange(k) < counts.view(b, h, 1), src, -1)
    out = [torch.zeros(b, h, p, d, dtype=dtype, device=DEV) for _ in range(4)]
    gather_rows(src_k, src_v, out[0], out[1], src.to(DEV), dst.to(DEV), counts=counts.to(DEV))
    gather_rows_reference(src_k, src_v, out[2], out[3], cut.to(DEV), dst.to(DEV))
    assert torch.equal(out[0], out[2]) and torch.equal(out[1], out[3]), ("counts", b, h, s, d)
print("gather ok", flush=True)


def check_fused_fetch(b, h, s, d, sink, window, heavy, c, steps, seed, dtype=torch.bfloat16, layout="interleaved"):
    """The fused fetch kernel against HostKV.fetch_reference, step after step on two copies of the same state,
    with selections that mix hits and misses: rows whose heavy set repeats the last one (all hits), rows of
    fresh tokens only (all misses), rows with few heavy tokens (-1 padding); 2 host layers; both ways of copying
    the rows (in the kernel, and by gather_rows after it). Everything must be equal: indices, maps, queue,
    working-set rows of the selected tokens, counters."""
    g = torch.Generator().manual_seed(seed)
    start = s - steps - 1
    rows = torch.randn(2, b, h, s, d, generator=g).to(dtype)
    # the kernel on the given host layout against the reference on two separate tensors
    hks = [HostKV(2, [0, 1], b, s, h, d, dtype, DEV, sink, window, c, hash_mode=True, layout=lay)
           for lay in (layout, "separate")]
    fused_kv, ref_kv = hks
    for hk in hks:
        for hi in range(2):
            hk.write_chunk(hi, 0, rows[hi, :, :, :start].to(DEV), -rows[hi, :, :, :start].to(DEV))
    k = sink + window + heavy
    last = {}
    for step in range(steps):
        pos = start + step
        length = torch.tensor([pos + 1], device=DEV)
        for hi in range(2):
            for hk in hks:
                one = torch.tensor([pos], device=DEV)
                hk.write_token(hi, rows[hi, :, :, pos].to(DEV), -rows[hi, :, :, pos].to(DEV), one, hk.ring_slot(one))
            idx = torch.full((b, h, k), -1, dtype=torch.int32)
            for bi in range(b):
                for hj in range(h):
                    kind = (step + bi + hj + hi) % 4  # 0: mixed, 1: repeat (all hits), 2: fresh, 3: few
                    far = torch.arange(sink, pos + 1 - window)
                    if kind == 1 and (hi, bi, hj) in last:
                        hv = last[hi, bi, hj]
                    elif kind == 2:
                        hv = far[torch.randperm(len(far), generator=g)[:heavy]]
                    else:
                        n = heavy if kind == 0 else int(torch.randint(0, 3, (1,), generator=g))
                        pool = torch.cat([far[:2 * heavy], far[torch.randperm(len(far), generator=g)[:heavy]]])
                        hv = pool[torch.randperm(len(pool), generator=g)[:n]].unique()[:heavy]
                    last[hi, bi, hj] = hv
                    sel = torch.cat([torch.arange(sink), hv, torch.arange(max(pos + 1 - window, 0), pos + 1)])
                    sel = sel.unique()
                    idx[bi, hj, :len(sel)] = sel.int()
            idx = idx.to(DEV)
            hk = fused_kv
            w_f = fetch_fused(idx, length, hk.res[hi], hk.slot_tok[hi], hk.lru[hi], hk._mark, hk._vict, hk.stats,
                              hk.k_host[hi], hk.v_host[hi], hk.ws_k[hi], hk.ws_v[hi], sink, window,
                              gather=step % 2 == 0, block_k=16 if step % 4 < 2 else 128,
                              block_c=64 if step % 3 == 1 else 1024)
            w_r = ref_kv.fetch_reference(hi, idx, length)
            assert torch.equal(w_f, w_r), (step, hi)
            for name in ("res", "slot_tok", "lru"):  # the last column of res and slot_tok: a dump, not state
                a, r = getattr(fused_kv, name), getattr(ref_kv, name)
                n = c if name == "lru" else a.shape[-1] - 1
                assert torch.equal(a[..., :n], r[..., :n]), (name, step, hi)
            assert torch.equal(fused_kv.stats, ref_kv.stats) and not fused_kv._mark.any(), step
            assert torch.equal(hk.working_tokens(hi, w_f, length), idx.long())
            live = (idx >= 0)[..., None].expand(-1, -1, -1, d)
            wi = w_f.long().clamp_min(0)[..., None].expand(-1, -1, -1, d)
            want = rows[hi].to(DEV).gather(2, idx.long().clamp_min(0)[..., None].expand(-1, -1, -1, d))
            for ws, sign in ((hk.ws_k, 1), (hk.ws_v, -1)):
                got = ws[hi].gather(2, wi)
                assert torch.equal(got[live], sign * want[live]), (step, hi)
                assert torch.equal(got, ref_kv.ws_k[hi].gather(2, wi) if sign == 1 else ref_kv.ws_v[hi].gather(2, wi))
    lookups, hits = fused_kv.stats.tolist()
    assert 0 < hits < lookups, (hits, lookups)


# (b, h, s, d, sink, window, heavy, C, steps): C = 2x heavy, C == heavy (the edge), no window, several blocks
for case in [(2, 3, 160, 16, 4, 8, 12, 24, 12), (1, 2, 120, 32, 2, 4, 16, 16, 12), (2, 2, 100, 16, 3, 0, 10, 20, 8),
             (1, 2, 400, 16, 4, 4, 150, 300, 6)]:
    check_fused_fetch(*case, seed=sum(case), layout="separate" if case[2] == 100 else "interleaved")
from hashattention.engine.offload import fused_fetch_works  # noqa: E402
for mode in ("split", "fused"):  # the engine's own once-per-process check passes with the real kernel
    assert fused_fetch_works(DEV, 64, torch.bfloat16, mode), mode
print("fused fetch ok", flush=True)

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
        for fetch in ("auto", "auto-wide", "split", "fused", "reference") if (gl, mode, read) == (0, "hash", "gather") \
                else ("split",):
            if m.host_kv.hash_mode:  # the fused kernel (the rows copied by it, or after it), the reference; auto
                m.host_kv.fetch_mode = fetch.split("-")[0]  # picks by tokens per KV head: "wide" lowers the cut
            offload_mod.FUSED_MAX_K = 0 if fetch == "auto-wide" else CUT  # (2 x 2 programs: under FUSED_MIN_ROWS)
            got = Generator(m).generate(ids, 6, mode=mode, prefill_chunk=32)
            assert torch.equal(got, ref[mode]), (gl, mode, fetch, got, ref[mode])
        st = m.offload_stats()  # counted since the prefill: heavy rows looked up in hash mode only
        assert (st["lookups"] > 0) == (mode == "hash") and st["hits"] <= st["lookups"], (mode, st)
print("engine ok", flush=True)

# `hashattention bench fetch`: every way of copying the misses gives the steady state's hit rate
import argparse  # noqa: E402
from hashattention.benchmarks import fetch as fetch_bench  # noqa: E402
ap = argparse.ArgumentParser()
fetch_bench.add_arguments(ap)
res = fetch_bench.measure(ap.parse_args(["--context", "2K", "--batch", "1", "--kv-heads", "2", "--head-dim", "16",
                                         "--heavy", "32", "--sink", "4", "--window", "4", "--steps", "2", "--warmup",
                                         "3", "--repeats", "1", "--modes", "fused,split,auto,reference", "--device", DEV]))
assert [r["hit_rate"] for r in res["rows"]] == [0.75] * 4, res["rows"]
assert [r["copies"] for r in res["rows"]] == ["fused", "split", "fused", "reference"]  # k = 40 <= FUSED_MAX_K
print("bench fetch ok", flush=True)
print("ALL OK")
