"""Kernel 1: signature scoring fused with counting top-k selection (sink + window + heavy).

    idx, counts = score_select(q_sig, k_sig, starts, lengths, budget, num_kv_heads, per_group=True)

Shapes: q_sig int32 [B, Hq, W]; k_sig int32 [B, Hs, N, W] (Hs = num_kv_heads, or Hq for per-query-head key
maps; last dim contiguous); starts, lengths int32/int64 [B] (sequence b's valid keys are
starts[b] <= p < lengths[b] <= N). Returns idx int32 [B, Hsel, K] (Hsel = num_kv_heads when ``per_group``,
else Hq; K = budget.total(N)): the positions read, ascending (sink, heavy, window), -1 after counts[b];
counts int32 [B]. Same set as :func:`hashattention.core.selection.select` (ties toward the most recent token).

Three steps, no sort, no score tensor in memory (steps 1 and 2 share one launch when FUSE_THRESHOLD):
  1. per block of BLOCK tokens: bit matches (XOR + popcount, summed over the KV group when shared) and a
     histogram of the integer scores of the heavy candidates -> hist [R, NBLK, NBP] (R = B * Hsel);
  2. per row: the threshold (the largest t with #(score >= t) >= k, from the top bins down), per block the
     count above it and how many of its ties it keeps (ties go to the most recent blocks), and each block's
     output offset;
  3. per block again: recompute the scores (signatures are 4 B/token/head, cheaper than storing scores) and
     write sink, kept heavy (ties from the block's end) and window positions to their slots.
"""
from __future__ import annotations

import torch

from ..core.budget import Budget
from ._common import INTERPRET, check_tensor, next_pow2, num_sms, tl, triton, use_triton
from .reference import score_select_reference

_FRAC_CACHE: dict = {}

#: compute each row's threshold in the last histogram block to finish (atomic arrival counter) instead of
#: a separate launch; the benchmark times both
FUSE_THRESHOLD = False
#: tokens per inner step of a block (a block is BLOCK tokens, a multiple of TILE)
TILE = 2048
#: largest block of tokens per program of steps 1 and 3
MAX_BLOCK = 2048


def _frac_tensor(frac: float, device) -> torch.Tensor:
    """The heavy fraction as a float64 device scalar (floor(n * frac) in fp64, exactly as Budget does);
    cached so that CUDA-graph capture never copies from the host."""
    key = (float(frac), str(device))
    t = _FRAC_CACHE.get(key)
    if t is None:
        t = torch.tensor([float(frac)], dtype=torch.float64, device=device)
        _FRAC_CACHE[key] = t
    return t


def check_select_args(q_sig, k_sig, starts, lengths, budget, num_kv_heads, strict: bool = True):
    check_tensor("q_sig", q_sig, 3, (torch.int32,), contiguous=True)
    dev = q_sig.device
    check_tensor("k_sig", k_sig, 4, (torch.int32,), dev)
    check_tensor("starts", starts, 1, (torch.int32, torch.int64), dev)
    check_tensor("lengths", lengths, 1, (torch.int32, torch.int64), dev)
    if not isinstance(budget, Budget):
        raise TypeError(f"budget must be a hashattention.Budget, got {type(budget).__name__}")
    b, hq, w = q_sig.shape
    if k_sig.shape[0] != b or k_sig.shape[3] != w:
        raise ValueError(f"k_sig {tuple(k_sig.shape)} does not match q_sig {tuple(q_sig.shape)} (batch, words)")
    if starts.shape[0] != b or lengths.shape[0] != b:
        raise ValueError(f"starts {tuple(starts.shape)} and lengths {tuple(lengths.shape)} must be [{b}]")
    if not isinstance(num_kv_heads, int) or num_kv_heads <= 0 or hq % num_kv_heads:
        raise ValueError(f"{hq} query heads are not a multiple of num_kv_heads={num_kv_heads!r}")
    if k_sig.shape[1] not in (num_kv_heads, hq):
        raise ValueError(f"k_sig has {k_sig.shape[1]} heads: expected {num_kv_heads} (KV heads) or {hq} "
                         "(query heads)")
    if strict:
        budget.check_fits(k_sig.shape[2])


def score_select(q_sig, k_sig, starts, lengths, budget: Budget, num_kv_heads: int, per_group: bool = True,
                 strict: bool = True):
    """See the module docstring. ``strict`` raises when an explicit heavy count exceeds the cache length
    (the integration passes False: early decode steps may have less context than the budget)."""
    check_select_args(q_sig, k_sig, starts, lengths, budget, num_kv_heads, strict)
    if not use_triton(q_sig):
        return score_select_reference(q_sig, k_sig, starts, lengths, budget, num_kv_heads, per_group)
    b, hq, w = q_sig.shape
    hs, n = k_sig.shape[1], k_sig.shape[2]
    g = hq // num_kv_heads
    hsel = num_kv_heads if per_group else hq
    gs = g if per_group else 1  # query heads summed into one selection row
    max_score = 32 * w * gs
    nbp = next_pow2(max_score + 2)  # bins 0..max_score, then one bin for the non-candidates
    r = b * hsel
    # enough blocks to fill the GPU (about 4 programs per SM), blocks of 256..8192 tokens
    # many small blocks (about 16 programs per SM, at most MAX_BLOCK tokens each): a program's loads are
    # not pipelined, so memory-level parallelism comes from the number of programs in flight
    block = min(MAX_BLOCK, max(256, next_pow2(triton.cdiv(max(n, 1) * r, 16 * num_sms(q_sig.device)))))
    nblk = max(1, triton.cdiv(n, block))
    while nblk > 2048:
        block *= 2
        nblk = triton.cdiv(n, block)
    nblkp = next_pow2(nblk)
    cbin = max(1, min(nbp, 16384 // nblkp))
    k_total = budget.total(n)
    dev = q_sig.device
    hist = torch.empty(r, nblk, nbp, dtype=torch.int32, device=dev)
    off = torch.empty(r, nblk, 3, dtype=torch.int32, device=dev)  # output offset, ties kept, ties
    meta = torch.empty(r, 2, dtype=torch.int32, device=dev)  # threshold, heavy count
    idx = torch.empty(b, hsel, max(k_total, 1), dtype=torch.int32, device=dev)
    counts = torch.empty(b, dtype=torch.int32, device=dev)
    frac = isinstance(budget.heavy, float)
    fr = _frac_tensor(budget.heavy, dev) if frac else counts  # unused pointer when a count
    heavy = 0 if frac else int(budget.heavy)
    common = dict(HSEL=hsel, G=g, GS=gs, KEY_PER_Q=hs != num_kv_heads, W=w, BLOCK=block, NBP=nbp,
                  MAXS=max_score, HW=not INTERPRET, TILE=min(block, TILE))
    strides = (q_sig.stride(0), q_sig.stride(1), k_sig.stride(0), k_sig.stride(1), k_sig.stride(2))
    fuse = FUSE_THRESHOLD
    done = torch.zeros(r, dtype=torch.int32, device=dev) if fuse else counts  # arrival counters
    _hist_kernel[(nblk, r)](q_sig, k_sig, starts, lengths, hist, n, nblk, *strides,
                            budget.sink, budget.window, done, off, meta, counts, idx, fr, k_total, heavy,
                            **common, FUSE=fuse, NBLKP=nblkp, CBIN=cbin, FRAC=frac, num_warps=4)
    if not fuse:
        _threshold_kernel[(r,)](hist, starts, lengths, off, meta, counts, idx, fr, n, nblk, k_total,
                                budget.sink, budget.window, heavy, HSEL=hsel, NBP=nbp, MAXS=max_score,
                                NBLKP=nblkp, CBIN=cbin, FRAC=frac, num_warps=8)
    _emit_kernel[(nblk, r)](q_sig, k_sig, starts, lengths, off, meta, idx, n, nblk, k_total, *strides,
                            budget.sink, budget.window, **common, num_warps=4)
    if k_total == 0:
        idx = idx[..., :0]
    return idx, counts


if triton is not None:
    @triton.jit
    def _popc(x):
        # SWAR popcount on the 32-bit pattern (LLVM turns this idiom into one POPC)
        v = x.to(tl.uint32, bitcast=True)
        v = v - ((v >> 1) & 0x55555555)
        v = (v & 0x33333333) + ((v >> 2) & 0x33333333)
        v = (v + (v >> 4)) & 0x0F0F0F0F
        return ((v * 0x01010101) >> 24).to(tl.int32)

    @triton.jit
    def _popc_hw(x):
        return tl.inline_asm_elementwise("popc.b32 $0, $1;", "=r,r", [x], dtype=tl.int32, is_pure=True, pack=1)

    @triton.jit
    def _row_bounds(START, END, b, N, SINK, WINDOW):
        start = tl.maximum(tl.load(START + b).to(tl.int32), 0)
        end = tl.minimum(tl.load(END + b).to(tl.int32), N)
        n = tl.maximum(end - start, 0)
        sink_c = tl.minimum(n, SINK)
        win_c = tl.minimum(n - sink_c, WINDOW)
        return start, end, n, sink_c, win_c

    @triton.jit
    def _block_scores(QS, KS, b, hs, offs, cand, sq_b, sq_h, sk_b, sk_h, sk_n,
                      G: tl.constexpr, GS: tl.constexpr, KEY_PER_Q: tl.constexpr, W: tl.constexpr,
                      HW: tl.constexpr):
        """Bit matches of the GS query heads hs*GS.. against keys at offs, summed. int32 like offs."""
        score = offs * 0
        kbase = KS + b.to(tl.int64) * sk_b
        qbase = QS + b * sq_b
        for wi in tl.static_range(W):
            if not KEY_PER_Q:  # one key head per KV group: read its words once for the whole group
                kw = tl.load(kbase + ((hs * GS) // G) * sk_h + offs * sk_n + wi, mask=cand, other=0)
            for gi in tl.static_range(GS):
                qh = hs * GS + gi
                if KEY_PER_Q:
                    kw = tl.load(kbase + qh * sk_h + offs * sk_n + wi, mask=cand, other=0)
                qw = tl.load(qbase + qh * sq_h + wi)
                if HW:  # the GPU's POPC instruction
                    score += 32 - _popc_hw(qw ^ kw)
                else:  # the interpreter has no inline assembly
                    score += 32 - _popc(qw ^ kw)
        return score

    @triton.jit
    def _hist_kernel(QS, KS, START, END, HIST, N, NBLK, sq_b, sq_h, sk_b, sk_h, sk_n, SINK, WINDOW,
                     DONE, OFF, META, COUNTS, IDX, FR, KTOT, HEAVY,
                     HSEL: tl.constexpr, G: tl.constexpr, GS: tl.constexpr, KEY_PER_Q: tl.constexpr,
                     W: tl.constexpr, BLOCK: tl.constexpr, NBP: tl.constexpr, MAXS: tl.constexpr,
                     HW: tl.constexpr, FUSE: tl.constexpr, NBLKP: tl.constexpr, CBIN: tl.constexpr,
                     FRAC: tl.constexpr, TILE: tl.constexpr):
        blk = tl.program_id(0)
        row = tl.program_id(1)
        b = row // HSEL
        hs = row % HSEL
        start, end, n, sink_c, win_c = _row_bounds(START, END, b, N, SINK, WINDOW)
        lo = start + sink_c
        hi = end - win_c
        h = tl.zeros([NBP], tl.int32)
        # tiles of TILE tokens keep few values per thread live (a whole block in registers spills)
        for t in range(0, BLOCK, TILE):
            offs = blk * BLOCK + t + tl.arange(0, TILE)
            if (blk * BLOCK + t + TILE > lo) & (blk * BLOCK + t < hi):  # the tile holds candidates
                cand = (offs >= lo) & (offs < hi)
                score = _block_scores(QS, KS, b, hs, offs, cand, sq_b, sq_h, sk_b, sk_h, sk_n, G, GS, KEY_PER_Q,
                                      W, HW)
                bins = tl.where(cand, score, MAXS + 1)  # non-candidates land in a bin nobody reads
                h += tl.histogram(bins, NBP)
        tl.store(HIST + (row * NBLK + blk).to(tl.int64) * NBP + tl.arange(0, NBP), h)
        if FUSE:  # the row's last block to finish computes its threshold: one launch less
            tl.debug_barrier()  # every thread's histogram stores precede the release below
            done = tl.atomic_add(DONE + row, 1, sem="acq_rel")
            if done == NBLK - 1:
                _threshold_row(row, HIST, START, END, OFF, META, COUNTS, IDX, FR, N, NBLK, KTOT, SINK, WINDOW,
                               HEAVY, HSEL, NBP, MAXS, NBLKP, CBIN, FRAC)

    @triton.jit
    def _threshold_kernel(HIST, START, END, OFF, META, COUNTS, IDX, FR, N, NBLK, KTOT, SINK, WINDOW, HEAVY,
                          HSEL: tl.constexpr, NBP: tl.constexpr, MAXS: tl.constexpr, NBLKP: tl.constexpr,
                          CBIN: tl.constexpr, FRAC: tl.constexpr):
        _threshold_row(tl.program_id(0), HIST, START, END, OFF, META, COUNTS, IDX, FR, N, NBLK, KTOT, SINK,
                       WINDOW, HEAVY, HSEL, NBP, MAXS, NBLKP, CBIN, FRAC)

    @triton.jit
    def _threshold_row(row, HIST, START, END, OFF, META, COUNTS, IDX, FR, N, NBLK, KTOT, SINK, WINDOW, HEAVY,
                       HSEL: tl.constexpr, NBP: tl.constexpr, MAXS: tl.constexpr, NBLKP: tl.constexpr,
                       CBIN: tl.constexpr, FRAC: tl.constexpr):
        b = row // HSEL
        start, end, n, sink_c, win_c = _row_bounds(START, END, b, N, SINK, WINDOW)
        n_cand = n - sink_c - win_c
        if FRAC:  # floor(n * frac) in float64, as Budget.heavy_count
            heavy = tl.floor(n.to(tl.float64) * tl.load(FR)).to(tl.int32)
        else:
            heavy = HEAVY + 0 * n
        k = tl.maximum(tl.minimum(heavy, n_cand), 0)
        blks = tl.arange(0, NBLKP)
        bmask = blks < NBLK
        hbase = HIST + (row * NBLK + blks).to(tl.int64)[:, None] * NBP
        above = tl.zeros([NBLKP], tl.int32)  # per block: candidates scoring above the threshold
        ties = tl.zeros([NBLKP], tl.int32)  # per block: candidates scoring exactly the threshold
        carry = n * 0  # candidates in the bins already visited (all above the current chunk)
        thr = carry - 1  # -1 until found
        for i in range(NBP // CBIN):  # bin chunks from the top down
            bins = (NBP // CBIN - 1 - i) * CBIN + tl.arange(0, CBIN)
            live = bins <= MAXS
            tile = tl.load(hbase + bins[None, :], mask=bmask[:, None] & live[None, :], other=0)
            col = tl.sum(tile, 0)
            at_least = carry + tl.cumsum(col, 0, reverse=True)  # #(score >= bin)
            t_here = tl.max(tl.where((at_least >= k) & live, bins, -1), 0)
            active = thr < 0
            t_new = tl.where(active, t_here, thr)
            a_part = tl.sum(tl.where(bins[None, :] > t_new, tile, 0), 1)
            t_part = tl.sum(tl.where(bins[None, :] == t_new, tile, 0), 1)
            above += tl.where(active, a_part, 0)
            ties += tl.where(active, t_part, 0)
            carry += tl.sum(col, 0)
            thr = t_new
        need = k - tl.sum(above, 0)  # ties to keep, the most recent ones
        ties_after = tl.cumsum(ties, 0, reverse=True) - ties
        take = tl.minimum(tl.maximum(need - ties_after, 0), ties)
        take = tl.where(k > 0, take, 0)
        sel = tl.where(k > 0, above, 0) + take
        off = sink_c + tl.cumsum(sel, 0) - sel
        obase = OFF + (row * NBLK + blks).to(tl.int64) * 3
        tl.store(obase, off, mask=bmask)
        tl.store(obase + 1, take, mask=bmask)
        tl.store(obase + 2, ties, mask=bmask)
        tl.store(META + row * 2, thr)
        tl.store(META + row * 2 + 1, k)
        total = sink_c + k + win_c
        tl.store(COUNTS + b, total, mask=(row % HSEL) == 0)
        # -1 after the row's last slot (rows with less context than the cache)
        for s0 in range(0, KTOT, 1024):
            slots = s0 + tl.arange(0, 1024)
            tl.store(IDX + row.to(tl.int64) * KTOT + slots, tl.full([1024], -1, tl.int32),
                     mask=(slots >= total) & (slots < KTOT))

    @triton.jit
    def _emit_kernel(QS, KS, START, END, OFF, META, IDX, N, NBLK, KTOT, sq_b, sq_h, sk_b, sk_h, sk_n,
                     SINK, WINDOW, HSEL: tl.constexpr, G: tl.constexpr, GS: tl.constexpr,
                     KEY_PER_Q: tl.constexpr, W: tl.constexpr, BLOCK: tl.constexpr, NBP: tl.constexpr,
                     MAXS: tl.constexpr, HW: tl.constexpr, TILE: tl.constexpr):
        blk = tl.program_id(0)
        row = tl.program_id(1)
        b = row // HSEL
        hs = row % HSEL
        start, end, n, sink_c, win_c = _row_bounds(START, END, b, N, SINK, WINDOW)
        lo = start + sink_c
        hi = end - win_c
        base = IDX + row.to(tl.int64) * KTOT
        thr = tl.load(META + row * 2)
        k = tl.load(META + row * 2 + 1)
        ob = OFF + (row * NBLK + blk).to(tl.int64) * 3
        off = tl.load(ob)  # first heavy slot of the block
        take = tl.load(ob + 1)  # ties at the threshold the block keeps: its last ``take`` ones
        nties = tl.load(ob + 2)
        seen_ties = take * 0  # ties in earlier tiles of the block
        for t in range(0, BLOCK, TILE):
            t0 = blk * BLOCK + t
            offs = t0 + tl.arange(0, TILE)
            if (t0 + TILE > lo) & (t0 < hi) & (k > 0):  # the tile holds heavy candidates
                cand = (offs >= lo) & (offs < hi)
                score = _block_scores(QS, KS, b, hs, offs, cand, sq_b, sq_h, sk_b, sk_h, sk_n,
                                      G, GS, KEY_PER_Q, W, HW)
                above = cand & (score > thr)
                if take == 0:
                    sel = above
                elif take == nties:
                    sel = above | (cand & (score == thr))
                else:  # the one block where the budget ends inside the ties: keep the most recent
                    tie = (cand & (score == thr)).to(tl.int32)
                    after = nties - seen_ties - tl.cumsum(tie, 0)  # ties after each token in the block
                    sel = above | ((tie > 0) & (after < take))
                    seen_ties += tl.sum(tie, 0)
                si = sel.to(tl.int32)
                slot = off + tl.cumsum(si, 0) - si
                tl.store(base + slot, offs, mask=sel)
                off += tl.sum(si, 0)
            # sink and window: fixed slots before and after the heavy ones
            is_sink = (offs >= start) & (offs < lo)
            is_win = (offs >= hi) & (offs < end)
            if ((t0 < lo) & (t0 + TILE > start)) | ((t0 < end) & (t0 + TILE > hi)):
                slot_f = tl.where(is_sink, offs - start, sink_c + k + offs - hi)
                tl.store(base + slot_f, offs, mask=is_sink | is_win)
