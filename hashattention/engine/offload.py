"""KV cache in host memory, signatures on the GPU (issue 25): the engine's ``offload="host"`` placement.

Tiered by layer: the first ``gpu_layers`` layers keep K/V on the GPU as before; every other ("host") layer keeps
its K/V in pinned host memory and, on the GPU, a small *working set* per (layer, sequence, KV head):

    k_host, v_host  [Lh, B, Hkv, S, D]        pinned host memory (a plain CPU tensor in the CPU reference path);
                                              with hashing, views of one [Lh, B, Hkv, S, 2, D] tensor (a token's
                                              K and V rows side by side: a miss reads one span)
    ws_k, ws_v      [Lh, B, Hkv, P + 1, D]    GPU; P = sink + ring + C slots, then one trash slot:
                        [0, sink)             the sink tokens 0..sink-1
                        [sink, sink + ring)   the recent window: token p at sink + p % ring (ring = max(window, 1))
                        [sink + ring, P)      the heavy-row cache: C slots of rows fetched from the host
    res             [Lh, B, Hkv, S + 1]       token -> heavy slot or -1 (int16 when C < 32767; column S: a dump
                                              target for masked scatters)
    slot_tok        [Lh, B, Hkv, C + 1]       int32 heavy slot -> token or -1 (slot C: dump)
    lru             [Lh, B, Hkv, C]           int32 the heavy slots from least to most recently selected
    stats           int64 [2]                 heavy lookups and hits over all host layers (read at the end)

A decode step of a host layer (:meth:`HostKV.fetch`): the selection (score_select on the GPU signatures) gives
idx [B, Hkv, K]; each selected token is classified by position (sink: p < sink; window: p >= length - window;
heavy: the rest, at most heavy_slots <= C per row by the shared selection rule). Heavy tokens resident in a slot
are hits; the misses are copied from host memory into victim slots, and the indices are remapped into the
working set, over which the usual sparse attention runs: exactly the tokens the on-GPU step reads.

Replacement rule: exact LRU kept as a queue. ``lru`` lists a row's slots oldest first; a step takes as victims
the first ``misses`` slots of the queue that hold no hit of this step (so a hit is never evicted and two misses
never share a slot; misses <= C - hits as heavy <= C), and moves the step's heavy slots to the back in the order
of their tokens (kept slots shift forward, in order). With steps run in order this is LRU by the step that last
selected a slot, ties by token: the same victims as a sort of "last used" (the rule before), found with a
prefix sum over the queue instead of an argsort over all C slots. Cheaper approximations (CLOCK, FIFO, age
buckets) were not needed: the queue costs one pass over C per step, like they would. Hit rate on real text (the
default model, 8K tokens, heavy 1/32, 48 steps, every layer on the host: ``hashattention bench decode --offload
host --models "" --real-text 8K --real-text-tokens 48 --heavy 1/32 --row-cache 1,2 --device cpu``): 0.636 with
C = 1x the heavy budget and 0.817 with 2x, against 0.635 and 0.814 for the argsort rule (ties by slot), 48/48
tokens equal to the on-GPU path either way.

On CUDA (and the Triton interpreter) the step of a layer is one Triton kernel, one program per (sequence, KV
head): classify + look up + victims + map and queue updates + remapped indices + counters, and either the row
gather too, reading the pinned host tensor directly (zero-copy over unified addressing), or that gather as a second
launch (:func:`gather_rows`, many programs per row: more reads in flight over PCIe) -- :func:`fetch_fused`; the
environment variable HASHATTENTION_OFFLOAD_FETCH picks: auto (default: fused up to FUSED_MAX_K tokens per
(sequence, KV head) or from FUSED_MIN_ROWS programs, split otherwise: :func:`fused_gather`; at 512K x 1 on an H100
fused gave 40.2 against split's 38.3 tok/s at heavy 2048 and 12.9 against 18.2 at 1/32, where 8 programs read too
few rows at a time), split, fused, or reference. Elsewhere
:meth:`HostKV.fetch_reference`, the same rule in torch ops (about 25 small kernels per layer on a GPU). All are
static-shape with no host sync: capturable in a CUDA graph. On a GPU the fused kernel is first checked against the
reference on a tiny state (:func:`fused_fetch_works`, once per process); if it fails to compile or disagrees,
the offload warns and runs the reference.
"""
from __future__ import annotations

import os
import weakref

import torch

from .config import CacheError

try:
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover
    triton = None

GIB = 1024 ** 3


# ---------------------------------------------------------------------------------------------------------
# host memory
def host_available_bytes() -> int:
    """MemAvailable of /proc/meminfo (what can be allocated without swapping), else total physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def pinned_empty(shape, dtype) -> torch.Tensor:
    """An uninitialized CPU tensor page-locked with cudaHostRegister (mapped, portable): the device reads it over
    unified addressing at its own address. Not ``pin_memory=True``: PyTorch's caching host allocator rounds
    every block up to a power of two (a 40 GiB cache would hold 64 GiB)."""
    t = torch.empty(shape, dtype=dtype, device="cpu")
    if t.numel() == 0:
        return t
    rt = torch.cuda.cudart()
    err = rt.cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 3)  # portable | mapped
    if int(err) != 0:
        raise CacheError(f"could not page-lock {t.numel() * t.element_size() / GIB:.2f} GiB of host memory "
                         f"(cudaHostRegister error {int(err)}): raise the locked-memory limit (ulimit -l) or "
                         "use a smaller batch or context")
    weakref.finalize(t, rt.cudaHostUnregister, t.data_ptr())
    return t


def check_device_can_read(t: torch.Tensor, device):
    """A clear error when the GPU cannot address page-locked host memory like ``t`` [..., D] (not page-locked, or
    no unified addressing; Triton would say "cannot be accessed from Triton (cpu tensor?)" at the first decode
    step): a row of a small buffer page-locked the same way, read by the gather kernel at set-up. Not a row of the
    cache itself: a line the GPU has read may stay in its L2 while the host writes the cache behind it."""
    if t.is_cuda or t.numel() == 0:
        return
    if not t.is_pinned():
        raise CacheError("the host K/V are not page-locked: the GPU cannot read them directly")
    row = pinned_empty((1, 1, 1, t.shape[-1]), t.dtype)
    row.fill_(1.5)
    got = torch.zeros(1, 1, 1, t.shape[-1], dtype=t.dtype, device=device)
    one = torch.zeros(1, 1, 1, dtype=torch.int32, device=device)
    try:
        gather_rows(row, row, got, got, one, one)
        torch.cuda.synchronize(device)
    except Exception as e:
        raise CacheError(f"the GPU cannot read pinned host memory directly on this machine ({type(e).__name__}: "
                         f"{e}); offload='host' needs unified virtual addressing (64-bit Linux, CUDA)") from None
    if float(got.view(-1)[0]) != 1.5:
        raise CacheError("the GPU read wrong values from pinned host memory: offload='host' cannot run here")


def copy_rows(k_src, v_src, k_dst, v_dst, start: int, src_start: int = 0):
    """k_dst[:, :, start:start+T] = k_src[:, :, src_start:src_start+T] (and v; T = k_src's rows from src_start, or
    k_dst's room) by GPU loads and stores, either side in pinned host memory. On CUDA every access to the host
    K/V goes through the GPU's own loads and stores (this and :func:`gather_rows`), never a copy engine: the
    GPU's L2 may keep lines of host memory it has read, and a DMA write behind it would leave them stale."""
    b, h = k_src.shape[:2]
    t = min(k_src.shape[2] - src_start, k_dst.shape[2] - start)
    dev = k_dst.device if k_dst.is_cuda else k_src.device
    ar = torch.arange(t, device=dev, dtype=torch.int32).expand(b, h, t)
    gather_rows(k_src, v_src, k_dst, v_dst, ar + src_start, ar + start)


# ---------------------------------------------------------------------------------------------------------
# the gather: rows of the host cache into GPU slots
def gather_rows_reference(k_src, v_src, k_dst, v_dst, src, dst):
    """For every (b, h, j) with src[b, h, j] >= 0: k_dst[b, h, dst[b, h, j]] = k_src[b, h, src[b, h, j]] (and v).
    k_src, v_src [B, Hkv, S, D] (host); k_dst, v_dst [B, Hkv, P, D]; src, dst int [B, Hkv, K]."""
    live = src >= 0
    b, h, _ = torch.nonzero(live, as_tuple=True)
    s, d = src[live].long(), dst[live].long()
    dev = k_dst.device
    k_dst[b.to(dev), h.to(dev), d.to(dev)] = k_src[b.to(k_src.device), h.to(k_src.device), s.to(k_src.device)].to(dev)
    v_dst[b.to(dev), h.to(dev), d.to(dev)] = v_src[b.to(v_src.device), h.to(v_src.device), s.to(v_src.device)].to(dev)


def gather_rows(k_src, v_src, k_dst, v_dst, src, dst, block: int = 16, counts=None):
    """:func:`gather_rows_reference` as one Triton launch (program per (sequence, KV head, ``block`` entries)):
    the loads read k_src / v_src where they live, pinned host memory included (zero-copy over PCIe).
    counts int32 [B * Hkv] (optional): only the first counts[b * Hkv + h] entries of a row are read (a compacted
    list: the programs past it exit after one load)."""
    b, h, k = src.shape
    d = k_src.shape[-1]
    # one set of strides serves K and V (and the last dimension is read whole)
    if k_src.stride() != v_src.stride() or k_src.stride(-1) != 1:
        k_src, v_src = k_src.contiguous(), v_src.contiguous()
    if k_dst.stride() != v_dst.stride() or k_dst.stride(-1) != 1:
        raise ValueError(f"gather_rows: k_dst and v_dst need the same strides with a contiguous last dimension, got "
                         f"{k_dst.stride()} and {v_dst.stride()}")
    src, dst = src.contiguous(), dst.contiguous()
    grid = (b * h, triton.cdiv(k, block))
    _gather_kernel[grid](k_src, v_src, k_dst, v_dst, src, dst, src if counts is None else counts,
                         k_src.stride(0), k_src.stride(1), k_src.stride(2),
                         k_dst.stride(0), k_dst.stride(1), k_dst.stride(2), h, k,
                         D=d, BLOCK=block, COUNTED=counts is not None, num_warps=4)


def use_triton(t: torch.Tensor) -> bool:
    from . import kernels
    return kernels.use_triton(t) and kernels.head_dim_ok(t.shape[-1])


def fetch_fused(idx, length, res, slot_tok, lru, mark, vict, stats, k_src, v_src, k_dst, v_dst, sink: int,
                window: int, gather: bool = True, block_k: int | None = None, block_c: int = 1024) -> torch.Tensor:
    """:meth:`HostKV.fetch_reference` as one Triton launch (two with ``gather`` False), one program per (sequence,
    KV head) and no host sync: the same victims,
    maps, queue, rows and counts. idx int32 [B, Hkv, K]; length int64 [1]; res [B, Hkv, S + 1]; slot_tok int32
    [B, Hkv, C + 1]; lru int32 [B, Hkv, C]; mark int8 [B, Hkv, C] (zero, left zero); vict int32 [B, Hkv, C]
    (scratch); stats int64 [2]; k_src, v_src [B, Hkv, S, D] (host); k_dst, v_dst [B, Hkv, P + 1, D]. ``gather``
    False: the rows are copied by a second launch (:func:`gather_rows`, more programs in flight) instead.
    block_k: selected tokens per iteration (default 64 with the gather in the kernel: its [block_k, D] tiles of K
    and V stay in registers; else 256: fewer dependent iterations); block_c: queue slots per iteration.
    Returns the working-set indices int32 [B, Hkv, K]."""
    b, h, k = idx.shape
    block_k = block_k or (64 if gather else 256)
    c = lru.shape[-1]
    ring = max(window, 1)
    for t in (res, slot_tok, lru, mark, vict):
        assert t.is_contiguous()
    if k_src.stride() != v_src.stride() or k_src.stride(-1) != 1:
        k_src, v_src = k_src.contiguous(), v_src.contiguous()
    assert k_dst.stride() == v_dst.stride() and k_dst.stride(-1) == 1
    idx = idx.contiguous()
    out = torch.empty_like(idx)
    # split: the misses' rows as a compacted list per row (src, dst, and their count): the gather's programs then
    # each copy `block` live rows instead of `block` selected tokens of which most are hits
    src, dst = (out, out) if gather else (torch.empty_like(idx), torch.empty_like(idx))
    cnt = out if gather else torch.empty(b * h, dtype=torch.int32, device=idx.device)
    _fetch_kernel[(b * h,)](idx, out, res, slot_tok, lru, mark, vict, stats, length, k_src, v_src, k_dst, v_dst,
                            src, dst, cnt, k_src.stride(0), k_src.stride(1), k_src.stride(2), k_dst.stride(0),
                            k_dst.stride(1), k_dst.stride(2), h, k, c, res.shape[-1], sink, window, ring, sink + ring,
                            D=k_src.shape[-1], BK=block_k, BC=block_c, GATHER=gather, num_warps=4)
    if not gather:
        gather_rows(k_src, v_src, k_dst, v_dst, src, dst, counts=cnt)
    return out


if triton is not None:
    @triton.jit
    def _gather_kernel(KS, VS, KD, VD, SRC, DST, CNT, ss_b, ss_h, ss_n, sd_b, sd_h, sd_n, H, K,
                       D: tl.constexpr, BLOCK: tl.constexpr, COUNTED: tl.constexpr):
        bh = tl.program_id(0)
        b = bh // H
        h = bh % H
        j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = j < K
        if COUNTED:
            m = m & (j < tl.load(CNT + bh))
        src = tl.load(SRC + bh * K + j, mask=m, other=-1).to(tl.int64)
        dst = tl.load(DST + bh * K + j, mask=m, other=-1).to(tl.int64)
        live = (src >= 0)[:, None]
        d = tl.arange(0, D)[None, :]
        so = b.to(tl.int64) * ss_b + h.to(tl.int64) * ss_h + src[:, None] * ss_n + d  # int64: host caches > 2^31
        do = b.to(tl.int64) * sd_b + h.to(tl.int64) * sd_h + dst[:, None] * sd_n + d
        kr = tl.load(KS + so, mask=live, other=0.0)  # both loads before either store (a store may alias a load, so
        # the compiler keeps the order written): K and V in flight together
        vr = tl.load(VS + so, mask=live, other=0.0)
        tl.store(KD + do, kr, mask=live)
        tl.store(VD + do, vr, mask=live)


    @triton.jit
    def _fetch_kernel(IDX, OUT, RES, STOK, LRU, MARK, VICT, STATS, LEN, KS, VS, KD, VD, SRC, DST, CNT,
                      ss_b, ss_h, ss_n, sd_b, sd_h, sd_n, H, K, C, SEQ1, SINK, WINDOW, RING, BASE,
                      D: tl.constexpr, BK: tl.constexpr, BC: tl.constexpr, GATHER: tl.constexpr):
        """One (sequence, KV head) row of :func:`fetch_fused`, in three passes separated by barriers (each
        reads what other threads of the program wrote in the pass before)."""
        bh = tl.program_id(0)
        b = bh // H
        h = bh % H
        length = tl.load(LEN).to(tl.int64)
        idx_row = IDX + bh * K
        res_row = RES + bh.to(tl.int64) * SEQ1
        stok_row = STOK + bh * (C + 1)
        lru_row = LRU + bh * C
        mark_row = MARK + bh * C
        vict_row = VICT + bh * C
        # 1. classify and look up; mark the slots hit this step (they must not be victims)
        n_heavy = 0
        n_hit = 0
        for k0 in range(0, K, BK):
            j = k0 + tl.arange(0, BK)
            p = tl.load(idx_row + j, mask=j < K, other=-1).to(tl.int64)
            heavy = (p >= SINK) & (p < length - WINDOW)
            slot = tl.load(res_row + p, mask=heavy, other=-1).to(tl.int32)
            hit = heavy & (slot >= 0)
            tl.store(mark_row + slot, tl.full([BK], 1, tl.int8), mask=hit)
            n_heavy += tl.sum(heavy.to(tl.int32))
            n_hit += tl.sum(hit.to(tl.int32))
        n_miss = n_heavy - n_hit
        tl.debug_barrier()
        # 2. walk the queue oldest first: the first n_miss unmarked slots are the victims (in that order); the
        # other unmarked ones move to the front, in order (in place: a slot only moves forward)
        taken = 0
        kept = 0
        for c0 in range(0, C, BC):
            i = c0 + tl.arange(0, BC)
            q = tl.load(lru_row + i, mask=i < C, other=0)
            free = (i < C) & (tl.load(mark_row + q, mask=i < C, other=1) == 0)
            r = taken + tl.cumsum(free.to(tl.int32), 0) - 1
            victim = free & (r < n_miss)
            keep = free & (r >= n_miss)
            kr = kept + tl.cumsum(keep.to(tl.int32), 0) - 1
            tl.debug_barrier()  # every load of this block before the stores move slots within it
            tl.store(vict_row + r, q, mask=victim)
            tl.store(lru_row + kr, q, mask=keep)
            taken += tl.sum(free.to(tl.int32))
            kept += tl.sum(keep.to(tl.int32))
        tl.debug_barrier()
        # 3. the i-th miss takes the i-th victim: maps, the queue's back (this step's heavy slots in token order),
        # the rows from host memory, the remapped indices. No pass reads what another block of it writes: an
        # evicted token was resident, so it is neither a miss nor a hit of this step.
        seen_heavy = 0
        seen_miss = 0
        tail = C - n_heavy
        for k0 in range(0, K, BK):
            j = k0 + tl.arange(0, BK)
            p = tl.load(idx_row + j, mask=j < K, other=-1).to(tl.int64)
            in_sink = (p >= 0) & (p < SINK)
            heavy = (p >= SINK) & (p < length - WINDOW)
            slot = tl.load(res_row + p, mask=heavy, other=-1).to(tl.int32)
            hit = heavy & (slot >= 0)
            miss = heavy & (slot < 0)
            mr = seen_miss + tl.cumsum(miss.to(tl.int32), 0) - 1
            v = tl.load(vict_row + mr, mask=miss, other=0)
            old = tl.load(stok_row + v, mask=miss, other=-1)
            # a [BK] tensor is replicated across warps, which do not run in lockstep: without this barrier one
            # warp's store of res[p] (or stok[v]) can land before another warp's load of it, which then sees a
            # hit (or the new token) where the others saw a miss (found on an H100; the interpreter is sequential)
            tl.debug_barrier()
            tl.store(res_row + old, tl.full([BK], -1, tl.int32).to(RES.dtype.element_ty), mask=miss & (old >= 0))
            tl.store(res_row + p, v.to(RES.dtype.element_ty), mask=miss)
            tl.store(stok_row + v, p.to(tl.int32), mask=miss)
            new = tl.where(hit, slot, v)
            hr = seen_heavy + tl.cumsum(heavy.to(tl.int32), 0) - 1
            tl.store(lru_row + tail + hr, new, mask=heavy)
            tl.store(mark_row + slot, tl.zeros([BK], tl.int8), mask=hit)
            w = tl.where(in_sink, p, tl.where(p >= 0, SINK + p % RING, -1))
            w = tl.where(heavy, BASE + new, w)
            tl.store(OUT + bh * K + j, w.to(tl.int32), mask=j < K)
            if GATHER:  # the misses' rows, read where the host tensor lives
                d = tl.arange(0, D)[None, :]
                so = b.to(tl.int64) * ss_b + h.to(tl.int64) * ss_h + p[:, None] * ss_n + d
                do = b.to(tl.int64) * sd_b + h.to(tl.int64) * sd_h + (BASE + v).to(tl.int64)[:, None] * sd_n + d
                mm = miss[:, None]
                kr = tl.load(KS + so, mask=mm, other=0.0)
                vr = tl.load(VS + so, mask=mm, other=0.0)
                tl.store(KD + do, kr, mask=mm)
                tl.store(VD + do, vr, mask=mm)
            else:  # for gather_rows after the kernel (more programs in flight on the transfer), compacted
                tl.store(SRC + bh * K + mr, p.to(tl.int32), mask=miss)
                tl.store(DST + bh * K + mr, (BASE + v).to(tl.int32), mask=miss)
            seen_heavy += tl.sum(heavy.to(tl.int32))
            seen_miss += tl.sum(miss.to(tl.int32))
        if not GATHER:
            tl.store(CNT + bh, n_miss)
        tl.atomic_add(STATS, n_heavy.to(tl.int64))
        tl.atomic_add(STATS + 1, n_hit.to(tl.int64))


# ---------------------------------------------------------------------------------------------------------
# sizes
def offload_bytes(num_layers: int, gpu_layers: int, batch: int, seq: int, num_kv_heads: int, head_dim: int,
                  elt: int, sink: int, window: int, cache_slots: int, hash_mode: bool = True) -> tuple[int, int]:
    """(GPU bytes, host bytes) of the K/V placement: gpu_layers layers on the GPU, the rest on the host with their
    working sets, residency maps and slot tables on the GPU (signatures, weights etc. not counted)."""
    row = head_dim * elt
    lh = num_layers - gpu_layers
    per = batch * num_kv_heads
    gpu = 2 * gpu_layers * per * seq * row
    host = 2 * lh * per * seq * row
    if hash_mode and lh:
        p = sink + max(window, 1) + cache_slots + 1
        gpu += lh * per * (2 * p * row + (seq + 1) * (2 if cache_slots < 32767 else 4) + (cache_slots + 1) * 8)
        gpu += per * cache_slots * 5  # the step's scratch (marks, victims), shared by the layers
    return gpu, host


FETCH_MODES = ("auto", "split", "fused", "reference")
HOST_LAYOUTS = ("interleaved", "separate")
FUSED_MAX_K = 4096  # auto: tokens per (sequence, KV head) up to which the gather runs inside the fetch kernel
FUSED_MIN_ROWS = 64  # auto: (sequence, KV head) programs from which it does at any K (enough programs in flight)


def fused_gather(k: int, rows: int) -> bool:
    """auto's choice: copy the rows inside the fetch kernel (one program per (sequence, KV head), ``rows`` of
    them, ``k`` selected tokens each) rather than by a second, wider gather kernel. H100 (Llama-3.1-8B shape):
    512K x 1 (8 programs): fused 40.2 vs split 38.3 tok/s at k = 2304, 12.9 vs 18.2 at k = 16640; one host layer
    of 128K x 10 (80 programs, k = 4096, 3/4 hits): fused 1.91-1.96 vs split 2.71-2.75 ms. With K and V side by
    side in host memory (the default layout since): 128K x 10 fused 1.24 vs split 1.92 ms, 512K x 1 (k = 16640)
    split 0.87 vs fused 1.47 ms (``bench fetch``)."""
    return k <= FUSED_MAX_K or rows >= FUSED_MIN_ROWS


_FETCH_OK: dict = {}  # (device, head_dim, dtype, mode) -> whether the fused fetch passed its check


def fused_fetch_works(device, head_dim: int, dtype, mode: str = "split", steps: int = 6) -> bool:
    """Once per process, card, head size and dtype, before a GPU's first offloaded step: the fused fetch
    (``mode`` "split" or "fused") on a tiny random state against :meth:`HostKV.fetch_reference` on the same
    device, step after step (hits, misses, evictions). A kernel this Triton cannot compile, or one that
    disagrees, makes the offload fall back to the reference path with a warning instead of failing or
    decoding wrong tokens."""
    key = (str(device), head_dim, str(dtype), mode)
    if key in _FETCH_OK:
        return _FETCH_OK[key]
    import warnings
    s, sink, window, c, heavy = 160, 4, 4, 16, 8
    g = torch.Generator().manual_seed(0)
    try:
        hks = [HostKV(1, [0], 1, s, 2, head_dim, dtype, device, sink, window, c, True, self_check=False)
               for _ in range(2)]
        hks[0].fetch_mode, hks[1].fetch_mode = mode, "reference"
        rows = torch.randn(2, s, head_dim, generator=g, device="cpu").to(dtype)[None].to(device)
        start = s - steps
        for hk in hks:
            hk.write_chunk(0, 0, rows[:, :, :start], -rows[:, :, :start])
        ok, prev = True, None
        for step in range(steps):
            pos = start + step
            one, length = torch.tensor([pos], device=device), torch.tensor([pos + 1], device=device)
            for hk in hks:
                hk.write_token(0, rows[:, :, pos], -rows[:, :, pos], one, hk.ring_slot(one))
            far = torch.stack([torch.randperm(pos + 1 - window - sink, generator=g, device="cpu")[:heavy] + sink
                               for _ in range(2)])  # [Hkv, heavy]
            if prev is not None and step % 2:  # every other step half the previous step's tokens: hits
                far[:, : heavy // 2] = prev[:, : heavy // 2]
            prev = far
            cpu = far.device  # the draws stay on the CPU whatever torch's default device (one seeded stream)
            idx = torch.cat([torch.arange(sink, device=cpu).expand(2, sink), far,
                             torch.arange(pos + 1 - window, pos + 1, device=cpu).expand(2, window)], 1)
            idx = torch.cat([idx, torch.full((2, 3), -1, device=cpu)], 1)[None].to(torch.int32).to(device)
            got, want = (hk.fetch(0, idx, length) for hk in hks)
            ok = ok and torch.equal(got, want)
            for hk, w in zip(hks, (got, want)):  # the rows each path put where its indices point
                sel = w.long().clamp_min(0)[..., None].expand(-1, -1, -1, head_dim)
                hk._rows = torch.where(w[..., None] >= 0, hk.ws_k[0].gather(2, sel), 0)
            ok = ok and torch.equal(hks[0]._rows, hks[1]._rows) and torch.equal(hks[0].stats, hks[1].stats)
        err = "" if ok else "it disagrees with the reference"
    except Exception as e:  # noqa: BLE001 -- a compile or launch error of this Triton: use the reference
        ok, err = False, f"{type(e).__name__}: {e}"
    if not ok:
        warnings.warn(f"the fused offload fetch kernel ({mode}) failed its check on {device} ({err}); the "
                      "offload uses the torch-ops fetch (HASHATTENTION_OFFLOAD_FETCH=reference): slower, the same "
                      "tokens", RuntimeWarning, stacklevel=3)
    _FETCH_OK[key] = bool(ok)
    return _FETCH_OK[key]


class HostKV:
    """The host layers' K/V and their GPU working sets (see the module docstring). ``host_layers``: the engine's
    layer numbers kept on the host (sorted); ``host_device``: "cpu" = pinned when the GPU is CUDA, a plain CPU
    tensor in the CPU reference path."""

    def __init__(self, num_layers: int, host_layers: list[int], batch: int, seq: int, num_kv_heads: int,
                 head_dim: int, dtype, device, sink: int, window: int, cache_slots: int, hash_mode: bool,
                 self_check: bool = True, layout: str | None = None):
        self.host_layers = list(host_layers)
        self.index = [-1] * num_layers  # engine layer -> host layer or -1
        for i, li in enumerate(self.host_layers):
            self.index[li] = i
        lh = len(self.host_layers)
        self.device = torch.device(device)
        self.sink, self.window, self.ring, self.slots = sink, window, max(window, 1), cache_slots
        self.base = sink + self.ring  # first heavy slot
        self.seq = seq
        # layout: "interleaved" keeps a token's K and V rows side by side ([..., S, 2, D]; k_host and v_host are
        # views of one tensor with the same strides), so a miss reads one 2*D span of host memory, not two rows
        # in separate gigabytes of it; "separate" is two [..., S, D] tensors (the dense baseline streams them)
        self.layout = layout or os.environ.get("HASHATTENTION_OFFLOAD_LAYOUT",
                                               "interleaved" if hash_mode else "separate")
        if self.layout not in HOST_LAYOUTS:
            raise ValueError(f"the host K/V layout (layout= or HASHATTENTION_OFFLOAD_LAYOUT) must be one of "
                             f"{', '.join(HOST_LAYOUTS)}, got {self.layout!r}")
        shape = (lh, batch, num_kv_heads, seq, head_dim)
        shapes = [shape[:-1] + (2, head_dim)] if self.layout == "interleaved" else [shape, shape]
        if self.device.type == "cuda":
            self._host = [pinned_empty(sh, dtype) for sh in shapes]
        else:
            self._host = [torch.zeros(sh, dtype=dtype, device="cpu") for sh in shapes]
        self.k_host, self.v_host = (self._host[0].select(-2, 0), self._host[0].select(-2, 1)) \
            if self.layout == "interleaved" else self._host
        if self.device.type == "cuda" and use_triton(torch.empty(1, head_dim, device=self.device)):
            check_device_can_read(self.k_host, self.device)  # the step will read it with Triton
        # CUDA: the host K/V are only ever touched by GPU loads and stores (copy_rows, gather_rows)
        self.gpu_io = use_triton(torch.empty(1, head_dim, device=self.device))  # the interpreter too (tests)
        self.hash_mode = hash_mode
        self.direct = False  # the engine's offload_read="direct": no working set, kernel 2 reads host rows
        self.stats = torch.zeros(2, dtype=torch.int64, device=device)  # heavy lookups, hits
        if hash_mode:
            p = self.base + cache_slots + 1
            dev = self.device
            self.ws_k = torch.zeros(lh, batch, num_kv_heads, p, head_dim, dtype=dtype, device=dev)
            self.ws_v = torch.zeros_like(self.ws_k)
            mdt = torch.int16 if cache_slots < 32767 else torch.int32
            self.res = torch.full((lh, batch, num_kv_heads, seq + 1), -1, dtype=mdt, device=dev)
            self.slot_tok = torch.full((lh, batch, num_kv_heads, cache_slots + 1), -1, dtype=torch.int32, device=dev)
            self.lru = torch.empty(lh, batch, num_kv_heads, cache_slots, dtype=torch.int32, device=dev)
            self.lru.copy_(torch.arange(cache_slots, dtype=torch.int32, device=dev))
            self._mark = torch.zeros(batch, num_kv_heads, cache_slots, dtype=torch.int8, device=dev)
            self._vict = torch.zeros(batch, num_kv_heads, cache_slots, dtype=torch.int32, device=dev)
            # where Triton runs: "split" = the fused bookkeeping kernel, then gather_rows for the rows (more programs
            # in flight on PCIe than one per row); "fused" = all in one kernel; "reference" = fetch_reference
            self.fetch_mode = os.environ.get("HASHATTENTION_OFFLOAD_FETCH", "auto")
            if self.fetch_mode not in FETCH_MODES:
                raise ValueError(f"HASHATTENTION_OFFLOAD_FETCH must be one of {', '.join(FETCH_MODES)}, got "
                                 f"{self.fetch_mode!r}")
            checks = {"auto": ("fused", "split")}.get(self.fetch_mode, (self.fetch_mode,))
            if self_check and self.device.type == "cuda" and self.fetch_mode != "reference" \
                    and not all(fused_fetch_works(self.device, head_dim, dtype, m) for m in checks):
                self.fetch_mode = "reference"

    def host_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._host)

    def host_tensors(self) -> list:
        """The contiguous host tensors behind k_host and v_host (one when interleaved, else two)."""
        return list(self._host)

    def reset(self):
        """Empty the heavy-row caches and the counters (a new prompt)."""
        self.stats.zero_()
        if self.hash_mode:
            self.res.fill_(-1)
            self.slot_tok.fill_(-1)
            self.lru.copy_(torch.arange(self.slots, dtype=torch.int32, device=self.lru.device))

    def _volatile(self) -> list:
        """The state a decode step run ahead (a CUDA-graph warm-up) would leave wrong for the real step: the ring
        (its slots hold the latest token of their residue) and the counters. The heavy-row cache stays: what it
        holds stays true (prompt rows, with their map and table)."""
        ring = slice(self.sink, self.sink + self.ring)
        return [self.ws_k[..., ring, :], self.ws_v[..., ring, :], self.stats] if self.hash_mode else [self.stats]

    def snapshot(self) -> list:
        return [t.clone() for t in self._volatile()]

    def restore(self, saved: list):
        for t, v in zip(self._volatile(), saved):
            t.copy_(v)

    # -- writes ----------------------------------------------------------------------------------------
    def write_chunk(self, hi: int, s: int, k: torch.Tensor, v: torch.Tensor):
        """Prefill: k, v [B, Hkv, T, D] of positions s..s+T-1 to the host, the sink and the ring."""
        e = s + k.shape[2]
        if self.gpu_io:
            copy_rows(k, v, self.k_host[hi], self.v_host[hi], s)
        else:
            self.k_host[hi, :, :, s:e].copy_(k)
            self.v_host[hi, :, :, s:e].copy_(v)
        if not self.hash_mode:
            return
        if s < self.sink:
            n = min(e, self.sink)
            self.ws_k[hi, :, :, s:n] = k[:, :, :n - s]
            self.ws_v[hi, :, :, s:n] = v[:, :, :n - s]
        lo = max(s, e - self.ring)  # only the last `ring` positions of the chunk survive in the ring
        slots = self.sink + torch.arange(lo, e, device=k.device) % self.ring
        self.ws_k[hi].index_copy_(2, slots, k[:, :, lo - s:])
        self.ws_v[hi].index_copy_(2, slots, v[:, :, lo - s:])

    def read_prefix(self, hi: int, e: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefill of a later chunk: host layer ``hi``'s K/V of positions 0..e-1 on ``device`` [B, Hkv, e, D]."""
        if not self.gpu_io:
            return self.k_host[hi, :, :, :e].to(device), self.v_host[hi, :, :, :e].to(device)
        shape = self.k_host.shape[1:3] + (e, self.k_host.shape[-1])
        k = torch.empty(shape, dtype=self.k_host.dtype, device=device)
        v = torch.empty_like(k)
        copy_rows(self.k_host[hi], self.v_host[hi], k, v, 0)
        return k, v

    def ring_slot(self, pos: torch.Tensor) -> torch.Tensor:
        """int64 [1]: where the token at ``pos`` lives in the working set (a sink slot or its ring slot)."""
        return torch.where(pos < self.sink, pos, self.sink + pos % self.ring)

    def write_token(self, hi: int, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, slot: torch.Tensor,
                    to_host: bool = True):
        """Decode: k, v [B, Hkv, D] of the token at ``pos`` to the working set (``slot`` = :meth:`ring_slot`) and,
        ``to_host``, to the host cache (the fast path writes the host from its rotary kernel instead)."""
        if to_host and self.gpu_io:
            one = pos.to(torch.int32).expand(*k.shape[:2], 1)
            gather_rows(k[:, :, None], v[:, :, None], self.k_host[hi], self.v_host[hi], torch.zeros_like(one), one)
        elif to_host:
            self.k_host[hi].index_copy_(2, pos.to(self.k_host.device), k[:, :, None].to(self.k_host.device))
            self.v_host[hi].index_copy_(2, pos.to(self.v_host.device), v[:, :, None].to(self.v_host.device))
        if self.hash_mode:
            self.ws_k[hi].index_copy_(2, slot, k[:, :, None])
            self.ws_v[hi].index_copy_(2, slot, v[:, :, None])

    # -- the step --------------------------------------------------------------------------------------
    def fetch(self, hi: int, idx: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
        """idx int32 [B, Hkv, K] (token positions, -1 unused) of host layer ``hi``; length int64 [1] -> the same
        tokens as slots of the working set ws_k[hi] [B, Hkv, P + 1, D], int32 [B, Hkv, K] (-1 kept), after
        fetching the heavy misses from the host into the least recently selected slots (module docstring)."""
        if self.fetch_mode != "reference" and use_triton(self.ws_k):
            return fetch_fused(idx, length, self.res[hi], self.slot_tok[hi], self.lru[hi], self._mark, self._vict,
                               self.stats, self.k_host[hi], self.v_host[hi], self.ws_k[hi], self.ws_v[hi],
                               self.sink, self.window, gather=self.fetch_mode == "fused" or
                               (self.fetch_mode == "auto" and fused_gather(idx.shape[-1], idx.shape[0] * idx.shape[1])))
        return self.fetch_reference(hi, idx, length)

    def fetch_reference(self, hi: int, idx: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
        """:meth:`fetch` in torch ops (the CPU path, and what the fused kernel is checked against)."""
        p = idx.long()
        live = p >= 0
        in_sink = live & (p < self.sink)
        in_ring = live & ~in_sink & (p >= length - self.window)
        heavy = live & ~in_sink & ~in_ring
        pc = p.clamp_min(0)
        res, slot_tok, lru = self.res[hi], self.slot_tok[hi], self.lru[hi]
        c, k = self.slots, idx.shape[-1]
        slot = res.gather(-1, pc).long()
        hit = heavy & (slot >= 0)
        miss = heavy & (slot < 0)
        # the queue oldest first: its first n_miss slots not hit this step are the victims, in queue order
        q = lru.long()  # [B, Hkv, C]
        used = torch.zeros(*q.shape[:-1], c + 1, dtype=torch.bool, device=q.device)
        free = ~used.scatter_(-1, torch.where(hit, slot, c), True).gather(-1, q)
        r = free.cumsum(-1) - 1
        n_heavy, n_miss = heavy.sum(-1, keepdim=True), miss.sum(-1, keepdim=True)
        victims = torch.zeros(*q.shape[:-1], k + 1, dtype=torch.long, device=q.device)  # column K: dump
        victims.scatter_(-1, torch.where(free & (r < n_miss), r, k), q)
        victim = victims.gather(-1, (miss.cumsum(-1) - 1).clamp_min(0))  # the i-th miss takes the i-th victim
        # the new queue: the free slots not taken, in order, then this step's heavy slots in token order
        keep = free & (r >= n_miss)
        new = torch.where(hit, slot, victim)
        queue = torch.zeros(*q.shape[:-1], c + 1, dtype=torch.long, device=q.device)  # column C: dump
        queue.scatter_(-1, torch.where(keep, keep.cumsum(-1) - 1, c), q)
        queue.scatter_(-1, torch.where(heavy, c - n_heavy + heavy.cumsum(-1) - 1, c), new)
        lru.copy_(queue[..., :c])
        old = slot_tok.gather(-1, victim).long()
        seqlen = res.shape[-1] - 1
        res.scatter_(-1, torch.where(miss & (old >= 0), old, seqlen), -1)  # evicted tokens leave the map
        res.scatter_(-1, torch.where(miss, pc, seqlen), victim.to(res.dtype))
        slot_tok.scatter_(-1, torch.where(miss, victim, c), p.to(torch.int32))
        src = torch.where(miss, p, -1).to(torch.int32)
        dst = torch.where(miss, self.base + victim, -1).to(torch.int32)
        if use_triton(self.ws_k):
            gather_rows(self.k_host[hi], self.v_host[hi], self.ws_k[hi], self.ws_v[hi], src, dst)
        else:
            gather_rows_reference(self.k_host[hi], self.v_host[hi], self.ws_k[hi], self.ws_v[hi], src, dst)
        self.stats[0] += heavy.sum()
        self.stats[1] += hit.sum()
        widx = torch.where(in_sink, p, torch.where(in_ring, self.sink + p % self.ring,
                                                   torch.where(heavy, self.base + new, -1)))
        return widx.to(torch.int32)

    def working_tokens(self, hi: int, widx: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
        """Which token each working-set slot in ``widx`` [B, Hkv, K] holds (-1 kept): for tests and checks."""
        w = widx.long()
        tok_heavy = self.slot_tok[hi].gather(-1, (w - self.base).clamp(0, self.slots)).long()
        ring_i = (w - self.sink).clamp_min(0)
        cur = length.long() - 1  # the ring slot r holds the latest token <= cur congruent to r
        tok_ring = cur - ((cur - ring_i) % self.ring)
        return torch.where(w < 0, -1, torch.where(w < self.sink, w, torch.where(w < self.base, tok_ring, tok_heavy)))
