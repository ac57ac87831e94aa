"""Kernels 1 and 2 fused: the selection's emit step folded into the sparse attention.

    out = select_attend(q, k_cache, v_cache, q_sig, k_sig, starts, lengths, budget, per_group=True, scale=None)

Same arguments, shapes and result as :func:`hashattention.kernels.hash_decode_attention` (see there), one
launch fewer than score_select + sparse_decode, and the index list stays in L2:
  1. count (kernel 1's first step; refine too on its coarse + fine path): byte scores, row histogram,
     per-block suffix tables.
  2. select + attend, program (row, p): from the row histogram and the suffix tables it knows how many tokens
     each block of positions keeps (heavy + sink + window) and so each block's first slot in the row's
     ascending list. It owns the blocks whose first slot falls in [p * S, (p + 1) * S) (S slots per split,
     as kernel 2 splits the list), writes their positions as the emit step does, then attends over its own
     slots with the group's query heads as one tile. A program's work is S slots plus at most one block.
  3. combine: the splits of each query head merged (kernel 2's second launch).
The selected set is exactly score_select's; the last program of a row zeroes the row histograms.
"""
from __future__ import annotations

import importlib

import torch

from ..core.budget import Budget
from ._common import INTERPRET, next_pow2, pdl_enter, tl, triton, use_triton

# the modules (the package binds their names to the functions); their CONFIGs are read at each call
ss = importlib.import_module(".score_select", __package__)
sd = importlib.import_module(".sparse_decode", __package__)

#: launch shape of the fused kernel (the benchmark may retune it), as sparse_decode.CONFIG
CONFIG = {"block_n": 64, "num_warps": 4, "num_stages": 3, "programs_per_sm": 4, "max_splits": 64}


def select_attend(q, k_cache, v_cache, q_sig, k_sig, starts, lengths, budget: Budget, per_group: bool = True,
                  scale: float | None = None, strict: bool = True):
    """See the module docstring; CUDA (or the interpreter) only: callers check use_triton first."""
    ss.check_select_args(q_sig, k_sig, starts, lengths, budget, k_cache.shape[1] if k_cache.dim() == 4 else -1,
                         strict)
    sd.check_decode_args(q, k_cache, v_cache, None, None, kernel=True)
    if q_sig.shape[:2] != q.shape[:2] or k_sig.shape[2] != k_cache.shape[2] or q_sig.device != q.device:
        raise ValueError(f"q_sig {tuple(q_sig.shape)} / k_sig {tuple(k_sig.shape)} do not match q "
                         f"{tuple(q.shape)} / k_cache {tuple(k_cache.shape)}")
    if not use_triton(q):
        raise RuntimeError("select_attend runs on CUDA tensors (or under TRITON_INTERPRET=1)")
    b, hq, d = q.shape
    hkv = k_cache.shape[1]
    st = ss.count_scores(q_sig, k_sig, starts, lengths, budget, hkv, per_group)
    hsel, r, k_total = st["hsel"], st["rows_n"], st["k_total"]
    gq = hq // hsel
    gp = max(16, next_pow2(gq))
    scale = d ** -0.5 if scale is None else float(scale)
    cfg = CONFIG
    splits, split = sd.split_shape(k_total, r, q.device, cfg)
    o_part, ml_part, out = sd.partials(q, r, splits, gp)
    slots = torch.empty(r, max(k_total, 1), dtype=torch.int32, device=q.device)  # positions, per program
    _select_attend_kernel[(r, splits)](
        *st["tables"], slots, *st["rows"], max(k_total, 1), q, k_cache, v_cache, o_part, ml_part,
        scale * 1.4426950408889634, split, splits, q.stride(0), q.stride(1), k_cache.stride(0),
        k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        NBLKP=next_pow2(st["nblk"]), ETILE=st["emit_tile"], G=hq // hkv, GQ=gq, GP=gp, D=d,
        BLOCK_N=cfg["block_n"], DOT_F32=INTERPRET, **{**st["common"], "num_warps": cfg["num_warps"],
                                                      "num_stages": cfg["num_stages"]},
        launch_pdl=st["common"]["PDL"])
    sd.combine(o_part, ml_part, out, r, splits, hsel, gq, gp)
    return out


if triton is not None:
    @triton.jit
    def _select_attend_kernel(SC, CSUF, CHIST, FSUF, FHIST, DONE, IDX, START, END, FR, N, NBLK, HEAVY, SINK,
                              WINDOW, KTOT, Q, K, V, OP, MLP, qk_scale, SPLIT, SPLITS,
                              sq_b, sq_h, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
                              HSEL: tl.constexpr, BLOCK: tl.constexpr, TILE: tl.constexpr, NB: tl.constexpr,
                              NCB: tl.constexpr, NFB: tl.constexpr, SHIFT: tl.constexpr, MAXS: tl.constexpr,
                              FRAC: tl.constexpr, EXACT: tl.constexpr, PDL: tl.constexpr, NBLKP: tl.constexpr,
                              ETILE: tl.constexpr, G: tl.constexpr, GQ: tl.constexpr, GP: tl.constexpr,
                              D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr):
        pdl_enter(PDL)
        row = tl.program_id(0)
        p = tl.program_id(1)
        b = row // HSEL
        hs = row % HSEL
        start, end, lo, hi, sink_c, k = ss._heavy_count(START, END, FR, b, N, HEAVY, SINK, WINDOW, FRAC)
        thr, sel, drop = ss._row_blocks(CSUF, CHIST, FSUF, FHIST, row, NBLK, k, NBLKP, NB, NCB, NFB, SHIFT, MAXS,
                                        EXACT)
        # each block's kept tokens (heavy + sink + window inside it) and first slot in the ascending list
        blks = tl.arange(0, NBLKP)
        b0 = blks * BLOCK
        b1 = b0 + BLOCK
        cnt = sel + tl.maximum(tl.minimum(lo, b1) - tl.maximum(start, b0), 0) \
            + tl.maximum(tl.minimum(end, b1) - tl.maximum(hi, b0), 0)
        cnt = tl.where(blks < NBLK, cnt, 0)
        first = tl.cumsum(cnt, 0) - cnt
        heavy_first = sink_c + tl.cumsum(sel, 0) - sel
        mine = (cnt > 0) & (first // SPLIT == p)
        j0 = tl.min(tl.where(mine, blks, NBLKP), 0)
        j1 = tl.max(tl.where(mine, blks, -1), 0)
        s0 = tl.sum(tl.where(blks == j0, first, 0), 0)
        s1 = tl.sum(tl.where(blks == j1, first + cnt, 0), 0)
        base = IDX + row.to(tl.int64) * KTOT
        sbase = SC + row.to(tl.int64) * N
        for j in range(j0, j1 + 1):
            if tl.sum(tl.where(blks == j, cnt, 0), 0) > 0:
                off = tl.sum(tl.where(blks == j, heavy_first, 0), 0)
                skip = tl.sum(tl.where(blks == j, drop, 0), 0)
                ss._emit_block(sbase, base, j, start, end, lo, hi, sink_c, k, thr, off, skip, BLOCK, ETILE)
        tl.debug_barrier()  # every thread's positions are written before any thread reads the list
        qh0 = hs * GQ
        kvh = qh0 // G
        g_rows = tl.arange(0, GP)
        gmask = g_rows < GQ
        cols = tl.arange(0, D)
        q = tl.load(Q + b * sq_b + (qh0 + g_rows)[:, None] * sq_h + cols[None, :], mask=gmask[:, None], other=0.0)
        kb = K + b.to(tl.int64) * sk_b + kvh.to(tl.int64) * sk_h
        vb = V + b.to(tl.int64) * sv_b + kvh.to(tl.int64) * sv_h
        m_i, l_i, acc = sd._attend_slots(q, base, kb, vb, s0, s1, sk_n, sv_n, qk_scale, GP, D, BLOCK_N, DOT_F32)
        pb = row * SPLITS + p
        tl.store(OP + (pb * GP + g_rows)[:, None] * D + cols[None, :], acc, mask=gmask[:, None])
        tl.store(MLP + (pb * 2) * GP + g_rows, m_i, mask=gmask)
        tl.store(MLP + (pb * 2 + 1) * GP + g_rows, l_i, mask=gmask)
        ss._release_row(CHIST, FHIST, DONE, row, SPLITS, NCB, NFB, EXACT)
