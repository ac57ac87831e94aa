"""Kernel 1: signature scoring fused with counting top-k selection (sink + window + heavy).

    idx, counts = score_select(q_sig, k_sig, starts, lengths, budget, num_kv_heads, per_group=True)

Shapes: q_sig int32 [B, Hq, W]; k_sig int32 [B, Hs, N, W] (Hs = num_kv_heads, or Hq for per-query-head key
maps; last dim contiguous); starts, lengths int32/int64 [B] (sequence b's valid keys are
starts[b] <= p < lengths[b] <= N). Returns idx int32 [B, Hsel, K] (Hsel = num_kv_heads when ``per_group``,
else Hq; K = budget.total(N)): the positions read, ascending (sink, heavy, window), -1 after counts[b];
counts int32 [B]. Same set as :func:`hashattention.core.selection.select` (ties toward the most recent token).

Two launches when the largest score fits one histogram (max_score <= CONFIG["exact_max"]: 32-bit signatures
summed over up to 8 query heads), three otherwise; no sort (R = B * Hsel selection rows, NBLK blocks of BLOCK
tokens per row). Scores are kept as score + 1 for a row's heavy candidates and 0 for every other token (so
the emit step needs no candidate mask), one byte per token (two when score + 1 can exceed 255).
  Exact (two launches): NB = next_pow2(max_score) bins, the top bin holding the values NB - 1 and NB (so a
  score of 32 or 128 needs no doubled histogram) and #(score == NB) counted beside it.
  1. count: per block, bit matches (XOR + popcount, summed over the KV group when shared: for one 32-bit word
     and one key head per group, as a weighted popcount of the key word, see _group_bit_weights), the histogram
     of the heavy candidates' scores -> the row histogram (atomics) and the block's suffix counts #(score >= v).
  2. emit: every block finds the row's threshold t (the largest score with #(score >= t) >= k) and, from the
     suffix tables, its output offset and how many of its ties at t it keeps (ties go to the most recent
     blocks); then writes its kept heavy positions with one prefix sum per tile (a block keeping all or none of
     its ties: of one flag, stored scores >= a per-block threshold; the one block of a row that splits its ties:
     of two counts), and its sink and window positions.
  Coarse + fine (three launches, larger scores): a score is split into a coarse part (score >> SHIFT, at most
  31 values) and a fine part (its low SHIFT bits), so that every histogram stays small (Triton's histogram
  costs per element about as many instructions as bins per lane): count histograms the coarse part; refine
  finds the coarse threshold C and histograms the fine part of the scores in bin C; emit works as above with
  t = C << SHIFT | f and the two suffix tables.
The row histograms are a small workspace kept per (device, rows, bins), in two copies used by turns: a device
counter (the epoch) says which, the emit step zeroes the other copy for the next call and advances the
epoch, so no memset launch and no arrival atomics are needed. Calls that share a workspace must not run at the
same time on different streams.
"""
from __future__ import annotations

import torch

from ..core.budget import Budget
from ._common import (INTERPRET, check_tensor, gdc_trigger, gdc_wait, next_pow2, num_sms, pdl_launch, tl, triton,
                      use_triton)
from .reference import score_select_reference

_FRAC_CACHE: dict = {}
_WORKSPACE: dict = {}

#: launch shape (the benchmark may retune it): tokens per inner step (a block is a multiple of it), programs
#: per SM the block size aims at, the largest block, warps per program
#: per the side-by-side sweep of bench/select_batch_sweep.py (H200): max_block 4096 leaves batch 1 unchanged
#: up to 512K keys and is 4.5% faster at 128K x batch 7 (the engine's largest batch) than 16384
#: exact_max: the largest max_score that takes the two-launch path (one histogram of next_pow2(max_score) bins)
#: emit_tile, emit_warps: tokens per step of the emit step (at most the block), its warps per program (2048
#: and 4: 72 registers, 16 tokens a thread; 4096 with 8 warps or 1024 with 4 were slower, kernel_ab_h200_s11b);
#: emit_maxnreg: a register cap for the emit step (None: the compiler's choice; it mattered for the earlier
#: emit step, 127 registers, which the cap of 96 made faster);
#: count_prefetch: the count loop loads the next tile's signature words while it scores this one (one word per
#: token, one key head per group), the group's query words once (bench/kernel_ab.py, H200, Triton 3.9: count
#: 12.3 -> 11.6 us at 512K, 21.0 -> 19.5 at 128K x 8, 5.8 -> 5.6 at 128K; Triton 3.6 alike; two tiles ahead,
#: 71 registers, or 64 with spills: count 8.2 -> 10.1 / 8.8 us at 512K, kernel_ab_h200_s12a_t39, not kept);
#: pdl: programmatic dependent launch from the count step to the emit step (and refine): the emit step is
#: scheduled while the count step drains and reads the row bounds before it waits (H200, kernel_ab_h200_s12c:
#: select 19.5 -> 18.7 us at 512K, 12.7 -> 12.3 at 128K)
#: small_tile: when the blocks aimed at programs_per_sm per SM would hold one tile (small problems: up to about
#: a million tokens x rows, e.g. 128K x 8 KV heads), blocks and count tiles of small_tile tokens instead, with
#: warps in proportion: half the programs, so the fixed work of each (the group's bit weights, the suffix table
#: and atomics, the emit step's threshold and block table) is paid once per 2048 tokens (H200, Triton 3.9,
#: kernel_ab_h200_s12d: 128K 23.0 -> 22.2 us both kernels; _s12e, this rule against none: 22.4 -> 21.8, per call
#: in a chain of 8 19.3 -> 18.5, other cases unchanged; blocks of 8192 at 512K, 4 tiles of 2048 each, were slower)
CONFIG = {"tile": 1024, "programs_per_sm": 8, "max_block": 4096, "num_warps": 4, "exact_max": 256,
          "emit_tile": 2048, "emit_warps": 4, "emit_maxnreg": None, "count_prefetch": 1, "pdl": True,
          "small_tile": 2048}
NCB = 32  # coarse bins: coarse scores 0..30, bin 31 for the tokens that are not heavy candidates


def _frac_tensor(frac: float, device) -> torch.Tensor:
    """The heavy fraction as a float64 device scalar (floor(n * frac) in fp64, exactly as Budget does);
    cached so that CUDA-graph capture never copies from the host."""
    key = (float(frac), str(device))
    t = _FRAC_CACHE.get(key)
    if t is None:
        t = torch.tensor([float(frac)], dtype=torch.float64, device=device)
        _FRAC_CACHE[key] = t
    return t


def _workspace(device, rows: int, ncb: int, nfb: int):
    """Coarse [2, rows, ncb] and fine [2, rows, nfb] row histograms (two copies used by turns) and the epoch
    [2]: a call counts into copy epoch[0] & 1, which is zero; its emit step zeroes the other copy and sets
    epoch[0] to epoch[1] = epoch[0] + 1 (written by the count step)."""
    key = (str(device), rows, ncb, nfb)
    ws = _WORKSPACE.get(key)
    if ws is None:
        ws = torch.zeros(2 * rows * (ncb + nfb) + 2, dtype=torch.int32, device=device)
        _WORKSPACE[key] = ws
    c, f = 2 * rows * ncb, 2 * rows * (ncb + nfb)
    return ws[:c], ws[c:f], ws[f:]


def _shift(max_score: int) -> int:
    """Smallest s with max_score >> s <= NCB - 2."""
    s = 0
    while max_score >> s > NCB - 2:
        s += 1
    return s


def check_select_args(q_sig, k_sig, starts, lengths, budget, num_kv_heads, strict: bool = True):
    check_tensor("q_sig", q_sig, 3, (torch.int32,), contiguous=True)
    dev = q_sig.device
    check_tensor("k_sig", k_sig, 4, (torch.int32,), dev)
    check_tensor("starts", starts, 1, (torch.int32, torch.int64), dev)
    check_tensor("lengths", lengths, 1, (torch.int32, torch.int64), dev)
    if not isinstance(budget, Budget):
        raise TypeError(f"budget must be a hashattention.Budget, got {type(budget).__name__}")
    if budget.adaptive:  # one count per sequence here; the adaptive rule is the reference path's
        raise ValueError("the decode kernels read a fixed heavy count: an adaptive budget (top_p, min_share) runs through "
                         "core.selection.select (the policy's select path)")
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


#: how a shared selection combines the bit matches of a KV group's query heads ("head": no sharing)
SELECTIONS = ("sum", "max", "head")


def score_select(q_sig, k_sig, starts, lengths, budget: Budget, num_kv_heads: int, per_group: bool = True,
                 strict: bool = True, selection: str | None = None):
    """See the module docstring. ``strict`` raises when an explicit heavy count exceeds the cache length
    (the integration passes False: early decode steps may have less context than the budget). ``selection``
    (one of SELECTIONS; default "sum" when ``per_group``, else "head"): "max" scores a key of a shared
    selection by the best bit matches of any head of the group (scores 0..32 W instead of 0..32 W g)."""
    if selection is None:
        selection = "sum" if per_group else "head"
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {', '.join(SELECTIONS)}, got {selection!r}")
    per_group = selection != "head"
    check_select_args(q_sig, k_sig, starts, lengths, budget, num_kv_heads, strict)
    if not use_triton(q_sig):
        return score_select_reference(q_sig, k_sig, starts, lengths, budget, num_kv_heads, per_group, selection)
    b, hq, w = q_sig.shape
    hs, n = k_sig.shape[1], k_sig.shape[2]
    g = hq // num_kv_heads
    hsel = num_kv_heads if per_group else hq
    gs = g if per_group else 1  # query heads combined into one selection row
    agg_max = selection == "max"
    max_score = 32 * w * (1 if agg_max else gs)
    if max_score + 1 > 32767:
        raise ValueError(f"{w} signature words summed over {gs} query heads: scores up to {max_score} do not fit "
                         "the int16 score buffer")
    cfg = CONFIG
    exact = max_score <= cfg["exact_max"]
    if exact:  # one histogram: bins 0..NB-1 (the top one holds NB - 1 and NB), #(score == NB) at index NB
        nb, shift = max(32, next_pow2(max_score)), 0
        ncb, nfb = 2 * nb, 1
    else:
        nb, shift = NCB, _shift(max_score)
        ncb, nfb = NCB, next_pow2((1 << shift) + 1)  # fine bins 0..2^shift - 1, one for tokens outside bin C
    r = b * hsel
    dev = q_sig.device
    tile = min(cfg["tile"], next_pow2(max(n, 16)))
    block = next_pow2(triton.cdiv(max(n, 1) * r, cfg["programs_per_sm"] * num_sms(dev)))
    block = max(tile, min(cfg["max_block"], block))
    warps = cfg["num_warps"]
    if block == tile and cfg["small_tile"] > tile and n >= cfg["small_tile"]:  # one tile a block: see CONFIG
        tile = block = cfg["small_tile"]
        warps = min(16, cfg["num_warps"] * cfg["small_tile"] // cfg["tile"])  # the same tokens per thread
    nblk = max(1, triton.cdiv(n, block))
    while nblk > 4096:
        block *= 2
        nblk = triton.cdiv(n, block)
    chist, fhist, epoch = _workspace(dev, r, ncb, nfb)
    # suffix tables bin-major: the emit step reads one bin of every block of a row as one contiguous run
    csuf = torch.empty(r, ncb, nblk, dtype=torch.int32, device=dev)
    fsuf = csuf if exact else torch.empty(r, nfb, nblk, dtype=torch.int32, device=dev)
    scores = torch.empty(r, n, dtype=torch.uint8 if max_score + 1 <= 255 else torch.int16, device=dev)
    frac = isinstance(budget.heavy, float)
    fr = _frac_tensor(budget.heavy, dev) if frac else epoch  # unused pointer when a count
    heavy = 0 if frac else int(budget.heavy)
    pdl = pdl_launch(dev, cfg["pdl"])  # count, refine, emit, then sparse_decode's kernels may overlap their set-up
    common = dict(HSEL=hsel, BLOCK=block, TILE=tile, NB=nb, NCB=ncb, NFB=nfb, SHIFT=shift, MAXS=max_score,
                  FRAC=frac, EXACT=exact, PDL=pdl, num_warps=warps, num_stages=3)
    rows = (starts, lengths, fr, n, nblk, heavy, budget.sink, budget.window)
    k_total = budget.total(n)
    idx = torch.empty(b, hsel, max(k_total, 1), dtype=torch.int32, device=dev)
    counts = torch.empty(b, dtype=torch.int32, device=dev)
    try:
        _count_kernel[(nblk, r)](q_sig, k_sig, scores, csuf, chist, epoch, *rows, q_sig.stride(0),
                                 q_sig.stride(1), k_sig.stride(0), k_sig.stride(1), k_sig.stride(2), G=g, GS=gs,
                                 KEY_PER_Q=hs != num_kv_heads, W=w, HW=not INTERPRET, AGG_MAX=agg_max,
                                 PREFETCH=cfg["count_prefetch"] if w == 1 and hs == num_kv_heads else 0,
                                 LOG2NB=nb.bit_length() - 1, **common)
        if not exact:
            _refine_kernel[(nblk, r)](scores, csuf, chist, fsuf, fhist, epoch, *rows, **common, launch_pdl=pdl)
        _emit_kernel[(nblk, r)](scores, csuf, chist, fsuf, fhist, epoch, idx, counts, *rows, k_total,
                                NBLKP=next_pow2(nblk), ETILE=min(block, next_pow2(cfg["emit_tile"])), HW=not INTERPRET,
                                **{**common, "num_warps": cfg["emit_warps"]},
                                **({"maxnreg": cfg["emit_maxnreg"]} if cfg["emit_maxnreg"] and not INTERPRET else {}),
                                launch_pdl=pdl)
    except BaseException:  # e.g. a later kernel failing to compile: the counted copy must not stay dirty
        _WORKSPACE[(str(dev), r, ncb, nfb)].zero_()  # in place: captured CUDA graphs keep their pointers
        raise
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
                      HW: tl.constexpr, AGG_MAX: tl.constexpr):
        """Bit matches of the GS query heads hs*GS.. against keys at offs, summed (AGG_MAX: the largest of
        the heads' matches, each summed over the W words). int32 like offs."""
        score = offs * 0
        kbase = KS + b.to(tl.int64) * sk_b
        qbase = QS + b * sq_b
        if AGG_MAX:
            for gi in tl.static_range(GS):
                qh = hs * GS + gi
                head = offs * 0
                for wi in tl.static_range(W):
                    kh = qh if KEY_PER_Q else (hs * GS) // G
                    kw = tl.load(kbase + kh * sk_h + offs * sk_n + wi, mask=cand, other=0)
                    head += _matches(tl.load(qbase + qh * sq_h + wi), kw, HW)
                score = tl.maximum(score, head)
            return score
        for wi in tl.static_range(W):
            if not KEY_PER_Q:  # one key head per KV group: read its words once for the whole group
                kw = tl.load(kbase + ((hs * GS) // G) * sk_h + offs * sk_n + wi, mask=cand, other=0)
            for gi in tl.static_range(GS):
                qh = hs * GS + gi
                if KEY_PER_Q:
                    kw = tl.load(kbase + qh * sk_h + offs * sk_n + wi, mask=cand, other=0)
                score += _matches(tl.load(qbase + qh * sq_h + wi), kw, HW)
        return score

    @triton.jit
    def _group_max(kw, qv, GS: tl.constexpr, HW: tl.constexpr):
        """The best bit matches of key words kw against the group's GS query words qv (a tuple)."""
        score = _matches(qv[0], kw, HW)
        for gi in tl.static_range(1, GS):
            score = tl.maximum(score, _matches(qv[gi], kw, HW))
        return score

    @triton.jit
    def _matches(qw, kw, HW: tl.constexpr):
        """Bit matches of 32-bit words."""
        if HW:  # the GPU's POPC instruction
            return 32 - _popc_hw(qw ^ kw)
        else:  # the interpreter has no inline assembly
            return 32 - _popc(qw ^ kw)

    @triton.jit
    def _group_bit_weights(qv, GS: tl.constexpr):
        """The group's summed bit matches as a weighted popcount of the key word. With c_j the number of the GS
        query words with bit j set and w_j = 2 c_j - GS, sum_i matches(q_i, k) = 32 GS - sum_j c_j + sum_j k_j w_j;
        with z = k ^ sgn (sgn: the bits where w_j < 0) that is const + sum_j |w_j| z_j, and |w_j| (of GS's
        parity, at most GS) = GS % 2 + 2 sum_t [|w_j| >= 2t + GS % 2], t = 1..GS // 2: masks[t - 1].
        Returns sgn, masks (a tuple of GS // 2 words), const. For GS = 4: 2 AND-XOR + 2 POPC a token, not 4 + 4."""
        j = tl.arange(0, 32)
        c = j * 0
        for gi in tl.static_range(GS):
            c += (qv[gi] >> j) & 1
        w = 2 * c - GS
        bit = 1 << j  # bit 31: the int32 minimum, and a sum of distinct bits is their OR
        sgn = tl.sum(tl.where(w < 0, bit, 0), 0)
        masks = ()
        for t in tl.static_range(1, GS // 2 + 1):
            masks = masks + (tl.sum(tl.where(tl.abs(w) >= 2 * t + GS % 2, bit, 0), 0),)
        const = 32 * GS - tl.sum(c, 0) - tl.sum(tl.where(w < 0, -w, 0), 0)
        return sgn, masks, const

    @triton.jit
    def _group_matches(kw, sgn, masks, const, GS: tl.constexpr, HW: tl.constexpr):
        """Bit matches of key words kw summed over the group's GS query words (see _group_bit_weights)."""
        acc = kw * 0
        for t in tl.static_range(GS // 2):
            if HW:  # (k ^ sgn) & mask as one LOP3 (ptxas otherwise computes k ^ sgn once and ANDs it per mask)
                acc += tl.inline_asm_elementwise(
                    "{ .reg .b32 t; lop3.b32 t, $1, $2, $3, 0x28; popc.b32 $0, t; }", "=r,r,r,r",
                    [kw, kw * 0 + sgn, kw * 0 + masks[t]], dtype=tl.int32, is_pure=True, pack=1)
            else:
                acc += _popc((kw ^ sgn) & masks[t])
        if GS % 2 == 1:
            return const + 2 * acc + _matches(~sgn, kw, HW)
        else:
            return const + 2 * acc

    @triton.jit
    def _heavy_count(START, END, FR, b, N, HEAVY, SINK, WINDOW, FRAC: tl.constexpr):
        """Row bounds and k, the heavy tokens to pick: the budget at this sequence's length, at most the
        candidates between sink and window."""
        start, end, n, sink_c, win_c = _row_bounds(START, END, b, N, SINK, WINDOW)
        if FRAC:  # floor(n * frac) in float64, as Budget.heavy_count
            heavy = tl.floor(n.to(tl.float64) * tl.load(FR)).to(tl.int32)
        else:
            heavy = HEAVY + 0 * n
        lo = start + sink_c
        hi = end - win_c
        return start, end, lo, hi, sink_c, tl.maximum(tl.minimum(heavy, hi - lo), 0)

    @triton.jit
    def _hist_copy(HIST, COPY, p, idx):
        """Entries idx of copy p of a two-copy histogram (COPY entries apart): both copies are loaded, so no
        load waits on p (the epoch)."""
        return tl.where(p == 0, tl.load(HIST + idx), tl.load(HIST + COPY + idx))

    @triton.jit
    def _top_bin(HIST, COPY, p, NB: tl.constexpr, LIMIT, need):
        """In copy p of a histogram of NB bins (bins above LIMIT empty): the largest bin c with #(>= c) >= need,
        and #(> c). need >= 1 and #(all) >= need, else c = LIMIT."""
        bins = tl.arange(0, NB)
        h = _hist_copy(HIST, COPY, p, bins)
        at_least = tl.cumsum(h, 0, reverse=True)
        c = tl.max(tl.where((at_least >= need) & (bins <= LIMIT), bins, 0), 0)
        return c, tl.sum(tl.where(bins > c, h, 0), 0)

    @triton.jit
    def _tile_count(SPTR, score, cand, inb, hc, top_v, NB: tl.constexpr, MAXS: tl.constexpr,
                    LOG2NB: tl.constexpr, HW: tl.constexpr, MASKED: tl.constexpr):
        """One tile of the exact count step: its score bytes stored at SPTR (score + 1 for a heavy candidate, 0
        for any other token: the emit step then needs no candidate mask, and the store is a full vector store),
        its candidates' scores added to the histogram hc (and, when MAXS = NB, the count of NB to top_v).
        MASKED False: every token of the tile is a candidate inside the cache."""
        if MASKED:
            sc = tl.where(cand, score, 0)
            st = sc + cand.to(tl.int32)
        else:
            sc = score
            st = score + 1
        if HW:  # an opaque copy: LLVM would otherwise narrow the arithmetic above to 16 bits, which sm_90 runs
            # as sign extensions and masks (about 4 instructions per token more)
            st = tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [st], dtype=tl.int32, is_pure=True, pack=1)
        if MASKED:
            tl.store(SPTR, st.to(SPTR.dtype.element_ty), mask=inb)
        else:
            tl.store(SPTR, st.to(SPTR.dtype.element_ty))
        # 0 <= sc <= MAXS <= NB; the masks tell the compiler the bin is in range (no range check and branch per
        # token in tl.histogram)
        if MAXS < NB:  # a bin for every score (max_score not a power of 2)
            hc += tl.histogram(sc & (NB - 1), NB)
        else:  # the top bin takes NB - 1 and NB; sc >> LOG2NB counts NB
            top_v += sc >> LOG2NB
            hc += tl.histogram((sc - (sc >> LOG2NB)) & (NB - 1), NB)
        return hc, top_v

    @triton.jit
    def _count_kernel(QS, KS, SC, CSUF, CHIST, EPOCH, START, END, FR, N, NBLK, HEAVY, SINK, WINDOW,
                      sq_b, sq_h, sk_b, sk_h, sk_n, HSEL: tl.constexpr, BLOCK: tl.constexpr, TILE: tl.constexpr,
                      NB: tl.constexpr, NCB: tl.constexpr, NFB: tl.constexpr, SHIFT: tl.constexpr,
                      MAXS: tl.constexpr, FRAC: tl.constexpr, EXACT: tl.constexpr, G: tl.constexpr,
                      GS: tl.constexpr, KEY_PER_Q: tl.constexpr, W: tl.constexpr, HW: tl.constexpr,
                      PREFETCH: tl.constexpr, LOG2NB: tl.constexpr, PDL: tl.constexpr, AGG_MAX: tl.constexpr):
        blk = tl.program_id(0)
        row = tl.program_id(1)
        b = row // HSEL
        hs = row % HSEL
        gdc_wait(PDL)  # launched plainly (the chain's first kernel): returns at once
        gdc_trigger(PDL)  # the emit step may be scheduled now (it waits for this step's end)
        if PREFETCH > 0:  # one word per token, one key head per group: the group's query words, loaded once
            krow = KS + b.to(tl.int64) * sk_b + ((hs * GS) // G) * sk_h
            qv = ()
            for gi in tl.static_range(GS):
                qv = qv + (tl.load(QS + b * sq_b + (hs * GS + gi) * sq_h),)
            if not AGG_MAX:
                sgn, masks, const = _group_bit_weights(qv, GS)
            offs0 = blk * BLOCK + tl.arange(0, TILE)
            kw = tl.load(krow + offs0 * sk_n, mask=offs0 < N, other=0)
        start, end, lo, hi, sink_c, k = _heavy_count(START, END, FR, b, N, HEAVY, SINK, WINDOW, FRAC)
        e = tl.load(EPOCH)
        if (blk == 0) & (row == 0):  # the emit step reads the epoch from here (EPOCH[0] stays put meanwhile)
            tl.store(EPOCH + 1, e + 1)
        hrow = CHIST + (e & 1) * (tl.num_programs(1) * NCB) + row * NCB  # this call's (zeroed) copy
        hc = tl.zeros([NB], tl.int32)
        top_v = tl.zeros([TILE], tl.int32)  # exact: candidates scoring NB (they share the top bin with NB - 1),
        # per lane: one reduction per block, not one per tile
        outside = blk * 0  # exact: tokens that are not candidates (counted in bin 0, taken out below)
        sbase = SC + row.to(tl.int64) * N
        # no branch around the loads, and their mask is the cache's bounds, not the row's: the signature loads
        # need not wait for the row bounds, and the loop stays pipelined (non-candidates are masked below)
        r = tl.arange(0, TILE)
        for t in range(0, BLOCK, TILE):
            t0 = blk * BLOCK + t
            offs = t0 + r
            # masks as the loop-invariant r against this tile's scalar bounds: 32-bit compares (on offs the
            # compiler widens them to 64 bits, as offs also indexes memory)
            cand = (r >= lo - t0) & (r < hi - t0)
            inb = r < N - t0
            if PREFETCH > 0:  # the next tile's words load while this one is scored (Triton's pipeliner stages
                # loads that feed dots, not integer work)
                kw_next = tl.load(krow + (offs + TILE) * sk_n, mask=r < tl.where(t + TILE < BLOCK, N - t0 - TILE, 0),
                                  other=0)
                if AGG_MAX:
                    score = _group_max(kw, qv, GS, HW)
                else:
                    score = _group_matches(kw, sgn, masks, const, GS, HW)
                kw = kw_next
            else:
                score = _block_scores(QS, KS, b, hs, offs, inb, sq_b, sq_h, sk_b, sk_h, sk_n, G, GS,
                                      KEY_PER_Q, W, HW, AGG_MAX)
            if EXACT:
                # the tiles inside the row's candidates (all but the edge ones) need no per-token masks
                if (t0 >= lo) & (t0 + TILE <= hi):
                    hc, top_v = _tile_count(sbase + offs, score, cand, inb, hc, top_v, NB, MAXS, LOG2NB, HW, False)
                else:
                    hc, top_v = _tile_count(sbase + offs, score, cand, inb, hc, top_v, NB, MAXS, LOG2NB, HW, True)
                # the candidates of a tile are one range: no reduction needed
                outside += TILE - tl.maximum(tl.minimum(hi, t0 + TILE) - tl.maximum(lo, t0), 0)
            else:
                tl.store(sbase + offs, tl.where(cand, score + 1, 0).to(SC.dtype.element_ty), mask=inb)
                hc += tl.histogram(tl.where(cand, score >> SHIFT, NB - 1), NB)
        bins = tl.arange(0, NB)
        if EXACT:
            top = tl.sum(top_v, 0)
            hc = tl.where(bins == 0, hc - outside, hc)
        else:
            hc = tl.where(bins <= (MAXS >> SHIFT), hc, 0)
        sbase = CSUF + row.to(tl.int64) * NCB * NBLK + blk  # entry v at sbase + v * NBLK
        tl.store(sbase + bins * NBLK, tl.cumsum(hc, 0, reverse=True))
        tl.atomic_add(hrow + bins, hc, mask=hc > 0, sem="relaxed")
        if EXACT:  # #(score >= NB) at index NB of the suffix table (and 0 at NB + 1) and of the row histogram
            tl.store(sbase + (NB + tl.arange(0, 2)) * NBLK, tl.where(tl.arange(0, 2) == 0, top, 0))
            tl.atomic_add(hrow + NB, top, mask=top > 0, sem="relaxed")

    @triton.jit
    def _refine_kernel(SC, CSUF, CHIST, FSUF, FHIST, EPOCH, START, END, FR, N, NBLK, HEAVY, SINK, WINDOW,
                       HSEL: tl.constexpr, BLOCK: tl.constexpr, TILE: tl.constexpr, NB: tl.constexpr,
                       NCB: tl.constexpr, NFB: tl.constexpr, SHIFT: tl.constexpr, MAXS: tl.constexpr,
                       FRAC: tl.constexpr, EXACT: tl.constexpr, PDL: tl.constexpr):
        blk = tl.program_id(0)
        row = tl.program_id(1)
        b = row // HSEL
        start, end, lo, hi, sink_c, k = _heavy_count(START, END, FR, b, N, HEAVY, SINK, WINDOW, FRAC)
        gdc_wait(PDL)
        gdc_trigger(PDL)
        rows_ = tl.num_programs(1)
        p = (tl.load(EPOCH + 1) - 1) & 1  # this call's copy
        c, _ = _top_bin(CHIST + row * NCB, rows_ * NCB, p, NCB, MAXS >> SHIFT, k)
        hf = tl.zeros([NFB], tl.int32)
        sbase = SC + row.to(tl.int64) * N
        for t in range(0, BLOCK, TILE):
            offs = blk * BLOCK + t + tl.arange(0, TILE)
            cand = (offs >= lo) & (offs < hi)
            score = tl.load(sbase + offs, mask=cand, other=0).to(tl.int32) - 1
            inbin = cand & ((score >> SHIFT) == c)
            hf += tl.histogram(tl.where(inbin, score & ((1 << SHIFT) - 1), NFB - 1), NFB)
        bins = tl.arange(0, NFB)
        hf = tl.where(bins < (1 << SHIFT), hf, 0)
        tl.store(FSUF + row.to(tl.int64) * NFB * NBLK + blk + bins * NBLK, tl.cumsum(hf, 0, reverse=True))
        tl.atomic_add(FHIST + p * (rows_ * NFB) + row * NFB + bins, hf, mask=hf > 0, sem="relaxed")

    @triton.jit
    def _threshold_exact(HIST, COPY, p, NB: tl.constexpr, k):
        """The row's threshold t (the largest score with #(score >= t) >= k) and #(score > t), from copy p of
        the exact histogram (bins 0..NB-1, the top one holding NB - 1 and NB; #(score == NB) at index NB)."""
        bins = tl.arange(0, NB)
        h = _hist_copy(HIST, COPY, p, bins)
        top = _hist_copy(HIST, COPY, p, NB)
        at_least = tl.cumsum(h, 0, reverse=True)
        t = tl.max(tl.where(at_least >= k, bins, 0), 0)
        t = tl.where((t == NB - 1) & (top >= k), NB, t)
        above = tl.sum(tl.where(bins > t, h, 0), 0) + tl.where(t == NB - 1, top, 0)
        return t, above

    @triton.jit
    def _row_blocks(CSUF, CHIST, FSUF, FHIST, p, row, ROWS, NBLK, k, NBLKP: tl.constexpr, NB: tl.constexpr,
                    NCB: tl.constexpr, NFB: tl.constexpr, SHIFT: tl.constexpr, MAXS: tl.constexpr,
                    EXACT: tl.constexpr):
        """The row's threshold t, and per block [NBLKP]: the heavy tokens it keeps, its ties at t and how many
        of its first ties it drops (the row keeps the most recent ties), from the row histograms and suffix
        tables."""
        blks = tl.arange(0, NBLKP)
        bm = blks < NBLK
        cs = CSUF + row.to(tl.int64) * NCB * NBLK + blks  # bin v of every block: cs + v * NBLK
        if EXACT:
            thr, above_row = _threshold_exact(CHIST + row * NCB, ROWS * NCB, p, NB, k)
            at_t = tl.load(cs + thr * NBLK, mask=bm, other=0)
            above = tl.load(cs + (thr + 1) * NBLK, mask=bm, other=0)  # index NB + 1 holds 0
        else:  # t = c << SHIFT | f: the coarse bin, then the fine part inside it
            c, above_c = _top_bin(CHIST + row * NCB, ROWS * NCB, p, NCB, MAXS >> SHIFT, k)
            f, above_f = _top_bin(FHIST + row * NFB, ROWS * NFB, p, NFB, (1 << SHIFT) - 1, k - above_c)
            thr = (c << SHIFT) + f
            above_row = above_c + above_f
            fs = FSUF + row.to(tl.int64) * NFB * NBLK + blks
            above_cb = tl.load(cs + (c + 1) * NBLK, mask=bm, other=0)  # c + 1 <= NCB - 1
            at_t = above_cb + tl.load(fs + f * NBLK, mask=bm, other=0)
            above = above_cb + tl.load(fs + (f + 1) * NBLK, mask=bm, other=0)
        need = k - above_row  # ties at the threshold the row keeps
        ties = at_t - above
        ties_after = tl.cumsum(ties, 0, reverse=True) - ties
        take = tl.minimum(tl.maximum(need - ties_after, 0), ties)  # the most recent ties are kept
        return thr, tl.where(k > 0, above + take, 0), ties, ties - take

    @triton.jit
    def _scatter(ptrs, vals, mask, HW: tl.constexpr):
        """ptrs[i] = vals[i] (int32) where mask[i] (bool, or int32 nonzero). On the GPU one predicated st.global
        per element, in the layout the values already have: tl.store of a scatter first moves pointers, values
        and mask through shared memory into a layout of one element per thread (the pointers' contiguity is 1)."""
        if HW:
            tl.inline_asm_elementwise(
                "{ .reg .pred p; setp.ne.s32 p, $3, 0; @p st.global.b32 [$1], $2; mov.u32 $0, 0; }",
                "=r,l,r,r", [ptrs.to(tl.int64), vals, mask.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)
        else:  # the interpreter has no inline assembly
            tl.store(ptrs, vals, mask=mask != 0)

    @triton.jit
    def _emit_tile(score, thr, base, offs, slot0, HW: tl.constexpr):
        """Write the positions offs [TILE] whose stored score is >= thr to the slots slot0 + 1, slot0 + 2, ...
        in order; returns how many."""
        # keep as 0/1 from the sign of thr - 1 - score (no predicate held across the prefix sum)
        keep = ((thr - 1 - score).to(tl.uint32, bitcast=True) >> 31).to(tl.int32, bitcast=True)
        _scatter(base + (slot0 + tl.cumsum(keep, 0)), offs, keep, HW)
        return tl.sum(keep, 0)

    @triton.jit
    def _emit_tile_ties(score, thr1, skip, a_run, t_run, base, offs, off, HW: tl.constexpr):
        """_emit_tile for the block whose ties at thr1 are split: its first ``skip`` ties are dropped (a_run,
        t_run: tokens above thr1 and ties in its earlier tiles). Returns the new a_run, t_run."""
        a_i = (score > thr1).to(tl.int32)
        t_i = (score == thr1).to(tl.int32)
        pre = tl.cumsum(a_i + (t_i << 15), 0)  # both counts in one prefix sum (a tile holds < 2^15 tokens)
        a_inc = a_run + (pre & 0x7FFF)
        t_inc = t_run + (pre >> 15)
        keep = score >= thr1 + (t_inc <= skip).to(tl.int32)
        _scatter(base + (off - 1 + a_inc + tl.maximum(t_inc - skip, 0)), offs, keep, HW)
        tot = tl.sum(a_i + (t_i << 15), 0)
        return a_run + (tot & 0x7FFF), t_run + (tot >> 15)

    @triton.jit
    def _emit_block(sbase, base, blk, N, start, end, lo, hi, sink_c, k, thr, off, ties, skip, first,
                    BLOCK: tl.constexpr, TILE: tl.constexpr, HW: tl.constexpr):
        """Write block blk's selected positions into the row's list at base: heavy tokens from slot off on
        (its first ``skip`` of ``ties`` ties at thr dropped), sink and window tokens at their fixed slots.
        sbase: the row's byte scores; first: the block's first tile of them, already loaded."""
        # the stored scores are score + 1 for the heavy candidates, 0 for all others; no heavy tokens: a stored
        # threshold above every stored score
        thr1 = tl.where(k > 0, thr + 1, 1 << 20)
        split = (skip > 0) & (skip < ties)  # one block of a row at most; the others keep all or none of their ties
        thr_b = thr1 + (skip > 0).to(tl.int32)  # and so keep the stored scores >= thr_b
        a_run = skip * 0  # tokens kept (split: above thr1) in earlier tiles of the block
        t_run = skip * 0  # split: ties in earlier tiles
        r = tl.arange(0, TILE)
        for t in tl.static_range(0, BLOCK, TILE):
            t0 = blk * BLOCK + t
            offs = t0 + r
            if t == 0:
                score = first.to(tl.int32)
            else:
                score = tl.load(sbase + offs, mask=offs < N, other=0).to(tl.int32)
            if split:
                a_run, t_run = _emit_tile_ties(score, thr1, skip, a_run, t_run, base, offs, off, HW)
            else:
                a_run += _emit_tile(score, thr_b, base, offs, off + a_run - 1, HW)
            if (t0 < lo) | (t0 + TILE > hi):  # sink and window: fixed slots before and after the heavy ones
                is_sink = (offs >= start) & (offs < lo)
                is_win = (offs >= hi) & (offs < end)
                _scatter(base + tl.where(is_sink, offs - start, sink_c + k + offs - hi), offs, is_sink | is_win, HW)

    @triton.jit
    def _clear_other_copy(CHIST, FHIST, EPOCH, e1, p, row, ROWS, blk, NCB: tl.constexpr, NFB: tl.constexpr,
                          EXACT: tl.constexpr):
        """Block 0 of each row zeroes the row's other histogram copy (the next call counts into it); block 0 of
        row 0 advances the epoch. Nobody reads that copy's values in this call, nor EPOCH[0]."""
        if blk == 0:
            q = 1 - p
            tl.store(CHIST + q * (ROWS * NCB) + row * NCB + tl.arange(0, NCB), tl.zeros([NCB], tl.int32))
            if not EXACT:
                tl.store(FHIST + q * (ROWS * NFB) + row * NFB + tl.arange(0, NFB), tl.zeros([NFB], tl.int32))
            if row == 0:
                tl.store(EPOCH, e1)

    @triton.jit
    def _emit_kernel(SC, CSUF, CHIST, FSUF, FHIST, EPOCH, IDX, COUNTS, START, END, FR, N, NBLK, HEAVY, SINK,
                     WINDOW, KTOT, HSEL: tl.constexpr, BLOCK: tl.constexpr, TILE: tl.constexpr,
                     NB: tl.constexpr, NCB: tl.constexpr, NFB: tl.constexpr, SHIFT: tl.constexpr,
                     MAXS: tl.constexpr, FRAC: tl.constexpr, EXACT: tl.constexpr, NBLKP: tl.constexpr,
                     ETILE: tl.constexpr, HW: tl.constexpr, PDL: tl.constexpr):
        blk = tl.program_id(0)
        row = tl.program_id(1)
        rows_ = tl.num_programs(1)
        b = row // HSEL
        sbase = SC + row.to(tl.int64) * N
        # set-up that reads only the caller's inputs (written before the count step waited), then the wait
        start, end, lo, hi, sink_c, k = _heavy_count(START, END, FR, b, N, HEAVY, SINK, WINDOW, FRAC)
        gdc_wait(PDL)
        gdc_trigger(PDL)
        # the first tile's scores, loaded first: no load after the wait waits on another (the bytes outside the
        # row's candidates are never used)
        offs = blk * BLOCK + tl.arange(0, ETILE)
        first = tl.load(sbase + offs, mask=offs < N, other=0)
        e1 = tl.load(EPOCH + 1)
        p = (e1 - 1) & 1  # this call's histogram copy
        thr, sel, ties, drop = _row_blocks(CSUF, CHIST, FSUF, FHIST, p, row, rows_, NBLK, k, NBLKP, NB, NCB, NFB,
                                           SHIFT, MAXS, EXACT)
        blks = tl.arange(0, NBLKP)
        off = sink_c + tl.sum(tl.where(blks < blk, sel, 0), 0)  # first heavy slot of the block
        skip = tl.sum(tl.where(blks == blk, drop, 0), 0)  # the block's first ``skip`` ties are not kept
        ties = tl.sum(tl.where(blks == blk, ties, 0), 0)
        base = IDX + row.to(tl.int64) * KTOT
        _emit_block(sbase, base, blk, N, start, end, lo, hi, sink_c, k, thr, off, ties, skip, first, BLOCK, ETILE,
                    HW)
        if blk == 0:
            total = sink_c + k + (end - hi)
            tl.store(COUNTS + b, total, mask=(row % HSEL) == 0)
            for s0 in range(0, KTOT, 1024):  # -1 after the row's last slot (less context than the cache)
                slots = s0 + tl.arange(0, 1024)
                tl.store(base + slots, tl.full([1024], -1, tl.int32), mask=(slots >= total) & (slots < KTOT))
        _clear_other_copy(CHIST, FHIST, EPOCH, e1, p, row, rows_, blk, NCB, NFB, EXACT)
