"""Kernel 2: decode attention over selected tokens, split along the selected list (flash-decoding).

    out = sparse_decode(q, k_cache, v_cache, idx, counts, scale=None)
    out = dense_decode(q, k_cache, v_cache, length, scale=None)   # the same kernels over rows 0..length-1

Shapes: q [B, Hq, D] (bf16 or fp16; D a power of two <= 256); k_cache, v_cache [B, Hkv, N, D] (same dtype,
last dim contiguous, any other strides); idx int32 [B, Hsel, K] with Hsel = Hkv (one list shared by a KV
group) or Hq (one list per query head); counts int32 [B]: sequence b reads idx[b, h, :counts[b]].
Returns [B, Hq, D] in q's dtype; fp32 softmax and accumulation. A sequence with counts 0 gets zeros.

Launch 1: program (row, split) takes one slice of a selection row's list; when the list is shared, it holds
the G query heads of the group as one [G, D] tile, so each selected K/V row is read once per KV head.
Launch 2: per query head (and slice of head_dim when the rows are few), the splits' (max, sum, acc) are merged
in one tile.
dense_decode (the engine's dense step): no list, the rows below ``length`` (int [1] shared by the batch, or
[B]); q may also be fp32 there (exact fp32 dots).
"""
from __future__ import annotations

import torch

from ._common import (INTERPRET, check_tensor, gdc_trigger, gdc_wait, next_pow2, num_sms, pdl_launch, tl, triton,
                      use_triton)
from .reference import sparse_decode_reference

DTYPES = (torch.bfloat16, torch.float16)

#: launch shape (the benchmark may retune these): rows per step, warps, pipeline depth (2: ~1 us faster than 3
#: at 512K on an H200, kernel_ab_h200_s5f; 1 slower, kernel_ab_h200_s6c), programs per SM: 3, as many as are
#: resident at once, so the splits run in one wave (H200, kernel_ab_h200_s6g: 512K 33.9 vs 36.4 us with 4,
#: 128K x 8 53.2 vs 60.2; 2 is slower at 512K); dense_decode keeps 4 (mixed there: 128K x 4 500 vs 514 us,
#: SmolLM2 shapes x 8 27.7 vs 26.3; dense_decode_pps_h200_s6.txt)
#: max_splits: splits of one row's list (the merge holds them all in one tile). It binds only when there are
#: few rows: 128 keeps dense_decode as fast as the engine's former kernel with 3 KV heads (SmolLM2; 64: 14%
#: slower at 8K, dense_decode_ab_h200_s6.txt); Llama-8B shapes (8 rows) get at most 66 either way.
CONFIG = {"block_n": 64, "num_warps": 4, "num_stages": 2, "programs_per_sm": 3, "dense_programs_per_sm": 4,
          "max_splits": 128, "short_block_n": 32, "short_programs_per_sm": 6, "short_max_steps": 4,
          "combine_cols": 32, "pdl_split": False, "pdl_combine": True}
#: short lists (sparse only): when a split would take at most short_max_steps steps of block_n rows, steps of
#: short_block_n rows and short_programs_per_sm programs per SM instead (twice the programs for the same bytes;
#: H200, kernel_ab_h200_s7e: 128K x 1 30.3 vs 31.7 us, 512K x 1 68.9 vs 69.5 (6 steps), 128K x 8 (10 steps)
#: 1.6 us slower, so long splits keep the default shape).
#: combine_cols: the merge splits head_dim into slices down to this many columns while its programs stay
#: within one per SM (batch 1: 4x the programs; 16K merge 1.6 vs 2.1 us, and with the short shape's 2x splits
#: 2.3 vs 3.6 us at 128K)
#: pdl_combine: the merge launched with programmatic dependent launch (scheduled while the split kernel drains);
#: pdl_split: the split kernel too, after score_select's emit step (it loads q before it waits). H200, Triton
#: 3.9, kernel_ab_h200_s12c (with score_select's pdl): the merge's 128K 24.4 -> 22.9 us both kernels, 512K
#: 45.3 -> 44.0; the split kernel's as well made it ~1 us slower again (128K x 8 under Triton 3.6: 91.6 against
#: 88.5 us), off.


def check_decode_args(q, k_cache, v_cache, idx, counts, kernel: bool = True):
    """``kernel``: the Triton path's limits (bf16/fp16, power-of-two head_dim) apply."""
    check_tensor("q", q, 3, DTYPES if kernel else DTYPES + (torch.float32,))
    dev = q.device
    check_tensor("k_cache", k_cache, 4, (q.dtype,), dev)
    check_tensor("v_cache", v_cache, 4, (q.dtype,), dev)
    check_tensor("idx", idx, 3, (torch.int32,), dev)
    check_tensor("counts", counts, 1, (torch.int32, torch.int64), dev)
    b, hq, d = q.shape
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ")
    if k_cache.shape[0] != b or k_cache.shape[3] != d:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} does not match q {tuple(q.shape)} (batch, head_dim)")
    hkv = k_cache.shape[1]
    if hq % hkv:
        raise ValueError(f"{hq} query heads are not a multiple of {hkv} KV heads")
    if kernel and (d & (d - 1) or not 16 <= d <= 256):
        raise ValueError(f"head_dim must be a power of two in 16..256, got {d}")
    if idx.shape[0] != b or idx.shape[1] not in (hkv, hq):
        raise ValueError(f"idx {tuple(idx.shape)} must be [{b}, {hkv} or {hq}, K]")
    if counts.shape[0] != b:
        raise ValueError(f"counts {tuple(counts.shape)} must be [{b}]")


def check_positions(idx, counts, n: int):
    """The positions sequence b reads, idx[b, :, :counts[b]], are rows of a cache of n, or -1 (unused). One
    device sync: the library's own calls, whose lists come from score_select, skip it."""
    if idx.numel():
        live = torch.arange(idx.shape[2], device=idx.device) < counts.to(idx.device).long()[:, None, None]
        lo, hi = (int(v) for v in torch.aminmax(torch.where(live, idx, -1)))
        if lo < -1 or hi >= n:
            raise ValueError(f"idx reads positions {lo}..{hi}: each must be in 0..{n - 1} (the cache holds {n} "
                             "rows), or -1 for an unused slot")


def sparse_decode(q, k_cache, v_cache, idx, counts, scale: float | None = None, check: bool = True):
    """See the module docstring. ``check``: validate shapes, dtypes and the positions idx reads (one device
    sync); False skips all of it (a position outside the cache is then skipped, never read)."""
    kernel = use_triton(q)
    if check:
        check_decode_args(q, k_cache, v_cache, idx, counts, kernel)
        check_positions(idx, counts, k_cache.shape[2])
    if not kernel:
        return sparse_decode_reference(q, k_cache, v_cache, idx, counts, scale)
    return _decode(q, k_cache, v_cache, idx, counts, idx.shape[2], scale)


def dense_decode(q, k_cache, v_cache, length, scale: float | None = None, check: bool = True):
    """Flash decoding over rows 0..length-1 of the caches (see the module docstring): one query per sequence,
    GQA, fp32 softmax and accumulation. Returns [B, Hq, D] in q's dtype."""
    kernel = use_triton(q)
    if check:
        check_tensor("q", q, 3, DTYPES + (torch.float32,))
        check_tensor("k_cache", k_cache, 4, (q.dtype,), q.device)
        check_tensor("v_cache", v_cache, 4, (q.dtype,), q.device)
        check_tensor("length", length, 1, (torch.int32, torch.int64), q.device)
        b, hq, d = q.shape
        if k_cache.shape != v_cache.shape or k_cache.shape[0] != b or k_cache.shape[3] != d:
            raise ValueError(f"caches {tuple(k_cache.shape)}, {tuple(v_cache.shape)} do not match q {tuple(q.shape)}")
        if hq % k_cache.shape[1]:
            raise ValueError(f"{hq} query heads are not a multiple of {k_cache.shape[1]} KV heads")
        if length.shape[0] not in (1, b):
            raise ValueError(f"length {tuple(length.shape)} must be [1] or [{b}]")
        if kernel and (d & (d - 1) or not 16 <= d <= 256):
            raise ValueError(f"head_dim must be a power of two in 16..256, got {d}")
    if not kernel:
        n = k_cache.shape[2]
        rows = torch.arange(n, device=q.device, dtype=torch.int32)
        idx = rows.expand(q.shape[0], k_cache.shape[1], n)
        return sparse_decode_reference(q, k_cache, v_cache, idx, length.expand(q.shape[0]).clamp(max=n), scale)
    return _decode(q, k_cache, v_cache, None, length, k_cache.shape[2], scale)


def _decode(q, k_cache, v_cache, idx, counts, kmax: int, scale):
    """Both launches; idx None: the rows 0..counts-1 themselves (counts [1]: one length for the batch)."""
    b, hq, d = q.shape
    hkv = k_cache.shape[1]
    hsel = hkv if idx is None else idx.shape[1]
    g = hq // hkv
    gq = hq // hsel  # query heads sharing one list: G, or 1 for per-query-head lists
    gp = max(16, next_pow2(gq))  # tl.dot needs >= 16 rows
    scale = d ** -0.5 if scale is None else float(scale)
    r = b * hsel
    cfg = CONFIG
    bn, pps = cfg["block_n"], cfg["dense_programs_per_sm"] if idx is None else cfg["programs_per_sm"]
    steps, splits = _split_shape(kmax, r, bn, pps, q.device)
    if idx is not None and steps <= cfg["short_max_steps"]:
        bn, pps = cfg["short_block_n"], cfg["short_programs_per_sm"]
        steps, splits = _split_shape(kmax, r, bn, pps, q.device)
    split = steps * bn
    dev = q.device
    o_part = torch.empty(r, splits, gp, d, dtype=torch.float32, device=dev)
    ml_part = torch.empty(r, splits, 2, gp, dtype=torch.float32, device=dev)
    out = torch.empty(b, hq, d, dtype=q.dtype, device=dev)
    dense = idx is None
    pdl_s, pdl_c = pdl_launch(dev, cfg["pdl_split"]), pdl_launch(dev, cfg["pdl_combine"])
    _split_kernel[(r, splits)](
        q, k_cache, v_cache, counts if dense else idx, counts, o_part, ml_part, scale * 1.4426950408889634, split,
        kmax, k_cache.shape[2], q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), 0 if dense else idx.stride(0),
        0 if dense else idx.stride(1), counts.stride(0) if counts.shape[0] == b and b > 1 else 0,
        splits, HSEL=hsel, G=g, GQ=gq, GP=gp, D=d, BLOCK_N=bn, DENSE=dense,
        DOT_F32=INTERPRET or q.dtype == torch.float32, PDL=pdl_s, TRIGGER=pdl_c, num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"], launch_pdl=pdl_s)
    sp = next_pow2(splits)
    dc = d
    while dc > cfg["combine_cols"] and r * gq * (2 * d // dc) <= num_sms(dev):
        dc //= 2
    _combine_kernel[(r, gq, d // dc)](o_part, ml_part, out, out.stride(0), out.stride(1), splits,
                                      HSEL=hsel, GQ=gq, GP=gp, D=d, DC=dc, SP=sp, PDL=pdl_c,
                                      num_warps=4 if sp * dc <= 64 * 128 else 8, launch_pdl=pdl_c)
    return out


def _split_shape(kmax: int, rows: int, bn: int, pps: int, device) -> tuple[int, int]:
    """Steps of bn rows per split and the number of splits of a list of kmax: enough programs to fill the GPU
    (pps per SM), at most max_splits so the merge holds all splits in one tile."""
    nblocks = max(1, triton.cdiv(kmax, bn))
    splits = max(1, min(nblocks, CONFIG["max_splits"], triton.cdiv(pps * num_sms(device), rows)))
    steps = triton.cdiv(nblocks, splits)
    return steps, max(1, triton.cdiv(kmax, steps * bn))


if triton is not None:
    @triton.jit
    def _split_kernel(Q, K, V, IDX, CNT, OP, MLP, qk_scale, SPLIT, KMAX, NK,
                      sq_b, sq_h, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, si_b, si_h, sc_b, SPLITS,
                      HSEL: tl.constexpr, G: tl.constexpr, GQ: tl.constexpr, GP: tl.constexpr,
                      D: tl.constexpr, BLOCK_N: tl.constexpr, DENSE: tl.constexpr, DOT_F32: tl.constexpr,
                      PDL: tl.constexpr, TRIGGER: tl.constexpr):
        row = tl.program_id(0)
        sp = tl.program_id(1)
        b = row // HSEL
        hs = row % HSEL
        qh0 = hs * GQ  # first query head of the row
        kvh = qh0 // G
        g_rows = tl.arange(0, GP)
        gmask = g_rows < GQ
        cols = tl.arange(0, D)
        q = tl.load(Q + b * sq_b + (qh0 + g_rows)[:, None] * sq_h + cols[None, :], mask=gmask[:, None], other=0.0)
        # PDL: q and the caches are the caller's (written before the selection's first kernel started); the list
        # and its counts come from the kernel before this one
        gdc_wait(PDL)
        gdc_trigger(TRIGGER)
        count = tl.minimum(tl.load(CNT + b * sc_b).to(tl.int32), KMAX)
        m_i = tl.full([GP], float("-inf"), tl.float32)
        l_i = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, D], tl.float32)
        lo = sp * SPLIT
        hi = tl.minimum(lo + SPLIT, count)
        ib = IDX + b.to(tl.int64) * si_b + hs * si_h
        kb = K + b.to(tl.int64) * sk_b + kvh.to(tl.int64) * sk_h
        vb = V + b.to(tl.int64) * sv_b + kvh.to(tl.int64) * sv_h
        for n0 in range(lo, hi, BLOCK_N):
            offs = n0 + tl.arange(0, BLOCK_N)
            live = offs < hi
            if DENSE:  # the rows themselves
                rows = tl.where(live, offs, 0).to(tl.int64)
            else:
                rows = tl.load(ib + offs, mask=live, other=0)
                live = live & (rows >= 0) & (rows < NK)  # never a read outside the cache (check=False callers)
                rows = tl.where(live, rows, 0).to(tl.int64)
            k = tl.load(kb + rows[:, None] * sk_n + cols[None, :], mask=live[:, None], other=0.0)
            v = tl.load(vb + rows[:, None] * sv_n + cols[None, :], mask=live[:, None], other=0.0)
            if DOT_F32:  # Triton's CPU interpreter gets bf16 dots wrong: fp32 there
                s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee") * qk_scale
            else:
                s = tl.dot(q, tl.trans(k)) * qk_scale  # [GP, BLOCK_N], log2 domain
            s = tl.where(live[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_safe[:, None])
            alpha = tl.math.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            if DOT_F32:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32),
                                                    input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        base = row * SPLITS + sp
        tl.store(OP + (base * GP + g_rows)[:, None] * D + cols[None, :], acc, mask=gmask[:, None])
        tl.store(MLP + (base * 2) * GP + g_rows, m_i, mask=gmask)
        tl.store(MLP + (base * 2 + 1) * GP + g_rows, l_i, mask=gmask)

    @triton.jit
    def _combine_kernel(OP, MLP, OUT, so_b, so_h, SPLITS, HSEL: tl.constexpr, GQ: tl.constexpr,
                        GP: tl.constexpr, D: tl.constexpr, DC: tl.constexpr, SP: tl.constexpr, PDL: tl.constexpr):
        # one program per (row, query head, DC columns): all splits in one [SP, DC] tile, so a single round trip
        gdc_wait(PDL)
        gdc_trigger(PDL)
        row = tl.program_id(0)
        gi = tl.program_id(1)
        b = row // HSEL
        qh = (row % HSEL) * GQ + gi
        sp = tl.arange(0, SP)
        smask = sp < SPLITS
        cols = tl.program_id(2) * DC + tl.arange(0, DC)
        base = row * SPLITS + sp
        m = tl.load(MLP + (base * 2) * GP + gi, mask=smask, other=float("-inf"))
        lsum = tl.load(MLP + (base * 2 + 1) * GP + gi, mask=smask, other=0.0)
        acc = tl.load(OP + (base * GP + gi)[:, None] * D + cols[None, :], mask=smask[:, None], other=0.0)
        mx = tl.max(m, 0)
        mx = tl.where(mx == float("-inf"), 0.0, mx)
        w = tl.where(smask, tl.math.exp2(m - mx), 0.0)
        den = tl.sum(w * lsum, 0)
        num = tl.sum(w[:, None] * acc, 0)
        out = num / tl.where(den > 0, den, 1.0)
        tl.store(OUT + b * so_b + qh * so_h + cols, out.to(OUT.dtype.element_ty))
