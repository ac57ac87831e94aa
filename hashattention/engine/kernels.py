"""Decode-step kernels of the engine, each a Triton kernel with a PyTorch reference of the same semantics.

- :func:`decode_attention`: dense split-K flash decoding over the first ``length`` cache rows, one query
  per sequence, GQA: :func:`hashattention.kernels.dense_decode`, the sparse step's attention kernel without an
  index list (it reads the keys of a KV head once for all query heads of its group; a second launch merges).
- :func:`fused_signatures`: phi_q of a step's query heads and phi_kv of its key heads (per-head MLPs,
  fp32, tf32x3 tensor-core dots on the GPU), signed and packed, the key words written into the signature cache.
- :func:`rms_norm`, :func:`rope_and_cache`, :func:`silu_mul`: the rest of a decode step in fewer kernels,
  rounded like transformers' eager ops.
- :func:`pack_signs32`: sign bits -> int32 words with the bit order of :mod:`hashattention.core.signatures`.

The Triton versions run on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (tests). Set
``HASHATTENTION_ENGINE_KERNELS=torch`` to force the references.
"""
from __future__ import annotations

import os

import torch

from ..kernels.sparse_decode import dense_decode

try:  # Triton is optional on CPU-only installs
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover
    triton = None


def use_triton(t: torch.Tensor) -> bool:
    if triton is None or os.environ.get("HASHATTENTION_ENGINE_KERNELS", "") == "torch":
        return False
    return t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def head_dim_ok(d: int) -> bool:
    """The Triton kernels tile the head dimension whole: a power of two >= 16."""
    return d >= 16 and d & (d - 1) == 0


# ---------------------------------------------------------------------------------------------------------
# signatures
_BIT_WEIGHTS: dict = {}


def pack_signs32(x: torch.Tensor) -> torch.Tensor:
    """Sign bits of x [..., bits] (bit = x > 0) -> int32 [..., bits // 32]; same words as core pack_signs,
    computed in int32 (three kernels instead of int64 arithmetic)."""
    bits = x.shape[-1]
    if bits % 32:
        raise ValueError(f"signature width must be a multiple of 32, got {bits}")
    key = x.device
    w = _BIT_WEIGHTS.get(key)
    if w is None:
        w64 = torch.tensor([1 << i for i in range(32)], dtype=torch.int64)
        w = torch.where(w64 >= 2 ** 31, w64 - 2 ** 32, w64).to(torch.int32).to(x.device)
        _BIT_WEIGHTS[key] = w
    b = (x > 0).to(torch.int32).view(*x.shape[:-1], bits // 32, 32)
    # bits are disjoint, so the int32 sum never overflows: it equals the bitwise OR
    return (b * w).sum(-1, dtype=torch.int32)


# ---------------------------------------------------------------------------------------------------------
# dense decode attention
def decode_attention_reference(q, k_cache, v_cache, length, scale=None):
    """q [B, Hq, D]; k_cache, v_cache [B, Hkv, S, D]; length int64 [1]: the rows < length are read. fp32
    softmax. Returns [B, Hq, D] in q's dtype."""
    b, hq, d = q.shape
    hkv = k_cache.shape[1]
    scale = d ** -0.5 if scale is None else scale
    qg = q.view(b, hkv, hq // hkv, d).float()
    k, v = k_cache.float(), v_cache.float()
    valid = (torch.arange(k.shape[2], device=q.device) < length)[None, None, None, :]
    s = torch.matmul(qg, k.transpose(-1, -2)) * scale  # [B, Hkv, G, N]
    s = s.masked_fill(~valid, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return torch.matmul(p, v).view(b, hq, d).to(q.dtype)


def decode_attention(q, k_cache, v_cache, length, scale=None):
    """See :func:`decode_attention_reference` (same arguments and result): on the Triton path, kernel 2 of
    :mod:`hashattention.kernels` without an index list (:func:`~hashattention.kernels.dense_decode`), so the
    engine's dense and hash steps run the same attention kernel."""
    if not use_triton(q) or not head_dim_ok(q.shape[-1]):
        return decode_attention_reference(q, k_cache, v_cache, length, scale)
    return dense_decode(q, k_cache, v_cache, length, scale, check=False)


# ---------------------------------------------------------------------------------------------------------
#: fp32 matmul precision of the fused maps on the GPU: "tf32x3" (three tensor-core passes, ~fp32 accuracy)
#: or "ieee" (exact fp32 FMA; slow for 128-wide tiles)
MAPS_PRECISION = os.environ.get("HASHATTENTION_MAPS_PRECISION", "tf32x3")
#: launch shape of the fused maps kernel: up to mv_max_batch sequences, one program per (head, sequence) runs
#: the MLP as fp32 matrix-vector products (no 16-row tile to fill, exact fp32 FMAs) with mv_warps warps; above,
#: one program per (head, bp sequences: >= 16, tl.dot's rows) with num_warps warps, 4 from few_warps_from
#: sequences on (bench/results/maps_kernel_ab_h200_s9e_t36.md, per layer at the 8B shape: matrix-vector 9.0 us
#: against 10.7 for 8-warp tiles at 9 sequences, 13.9 against 10.7 at 12; 8-warp tiles 10.9 against 13.4 for
#: 4-warp ones at 48, 18.0 against 16.5 at 64)
MAPS_CONFIG = {"mv_max_batch": 10, "mv_warps": 4, "bp": 16, "num_warps": 8, "few_warps_from": 64}


# fused maps: phi_q of the new query heads and phi_kv of the new key heads of one layer, signed and packed
def fused_signatures(x: torch.Tensor, ws: list, bs: list | None, layer: int, num_q_heads: int,
                     sig_cache_layer: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """x [B, Hq + Hs, D] (the step's rotated queries, then its keys); ws[i] [L, Hq+Hs, a_i, b_i] fp32 stacked
    map weights, bs[i] [L, Hq+Hs, 1, b_i] biases (or None). Writes the key signatures into
    sig_cache_layer [B, Hs, S, W] at position ``pos`` and returns the query signatures int32 [B, Hq, W].
    One program per (head, 16 sequences) runs the whole MLP and packs the sign bits; at small batches one per
    (head, sequence), as matrix-vector products (MAPS_CONFIG)."""
    b, h, d = x.shape
    depth = len(ws)
    bits = ws[-1].shape[-1]
    hid = ws[0].shape[-1] if depth > 1 else bits
    words = bits // 32
    q_out = torch.empty(b, num_q_heads, words, device=x.device, dtype=torch.int32)
    x = x.contiguous()
    bp = MAPS_CONFIG["bp"]  # rows (sequences) per program: larger tiles spill registers at 128-wide maps
    w = [t[layer] for t in ws] + [ws[0][layer]] * (3 - depth)  # unused slots point anywhere valid
    bb = [t[layer] for t in bs] + [bs[0][layer]] * (3 - depth) if bs is not None else [w[0]] * 3
    sc = sig_cache_layer
    if b <= MAPS_CONFIG["mv_max_batch"]:
        _maps_mv_kernel[(h, b)](x, w[0], bb[0], w[1], bb[1], w[2], bb[2], q_out, sc, pos,
                                x.stride(0), x.stride(1), q_out.stride(0), q_out.stride(1),
                                sc.stride(0), sc.stride(1), sc.stride(2),
                                HQ=num_q_heads, D=d, HID=hid, BITS=bits, WORDS=words, DEPTH=depth,
                                HAS_BIAS=bs is not None, num_warps=MAPS_CONFIG["mv_warps"])
        return q_out
    _maps_kernel[(h, triton.cdiv(b, bp))](x, w[0], bb[0], w[1], bb[1], w[2], bb[2], q_out, sc, pos, b,
                       x.stride(0), x.stride(1), q_out.stride(0), q_out.stride(1),
                       sc.stride(0), sc.stride(1), sc.stride(2),
                       HQ=num_q_heads, D=d, HID=hid, BITS=bits, WORDS=words, DEPTH=depth, BP=bp,
                       HAS_BIAS=bs is not None, PREC=MAPS_PRECISION if x.is_cuda else "ieee",
                       num_warps=4 if b >= MAPS_CONFIG["few_warps_from"] else MAPS_CONFIG["num_warps"])
    return q_out


if triton is not None:
    @triton.jit
    def _dense_layer(x, W, Bv, h, K: tl.constexpr, N: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
                     PREC: tl.constexpr):
        kk = tl.arange(0, K)
        nn_ = tl.arange(0, N)
        wt = tl.load(W + h * K * N + kk[:, None] * N + nn_[None, :])
        y = tl.dot(x, wt, input_precision=PREC)
        if HAS_BIAS:
            y = y + tl.load(Bv + h * N + nn_)[None, :]
        if ACT:
            y = y * tl.sigmoid(y)
        return y

    @triton.jit
    def _maps_kernel(X, W1, B1, W2, B2, W3, B3, QO, SC, POS, B,
                     sx_b, sx_h, sq_b, sq_h, ss_b, ss_h, ss_n,
                     HQ: tl.constexpr, D: tl.constexpr, HID: tl.constexpr, BITS: tl.constexpr,
                     WORDS: tl.constexpr, DEPTH: tl.constexpr, BP: tl.constexpr, HAS_BIAS: tl.constexpr,
                     PREC: tl.constexpr):
        h = tl.program_id(0)
        rows = tl.program_id(1) * BP + tl.arange(0, BP)
        rmask = rows < B
        cols = tl.arange(0, D)
        x = tl.load(X + rows[:, None] * sx_b + h * sx_h + cols[None, :], mask=rmask[:, None], other=0.0)
        x = x.to(tl.float32)
        if DEPTH == 1:
            y = _dense_layer(x, W1, B1, h, D, BITS, HAS_BIAS, False, PREC)
        elif DEPTH == 2:
            y = _dense_layer(x, W1, B1, h, D, HID, HAS_BIAS, True, PREC)
            y = _dense_layer(y, W2, B2, h, HID, BITS, HAS_BIAS, False, PREC)
        else:
            y = _dense_layer(x, W1, B1, h, D, HID, HAS_BIAS, True, PREC)
            y = _dense_layer(y, W2, B2, h, HID, HID, HAS_BIAS, True, PREC)
            y = _dense_layer(y, W3, B3, h, HID, BITS, HAS_BIAS, False, PREC)
        j = tl.arange(0, BITS)
        one = tl.full([BP, BITS], 1, tl.int32)
        bit = tl.where(y > 0, one << (j % 32)[None, :], 0)  # bit j of word j // 32; disjoint, so sum == OR
        packed = tl.sum(tl.reshape(bit, [BP, WORDS, 32]), axis=2)  # [BP, WORDS]
        wcol = tl.arange(0, WORDS)
        hh = h + 0 * (rows[:, None] + wcol[None, :])  # the head index as a full [BP, WORDS] tensor
        live = rmask[:, None] & (wcol[None, :] < WORDS)
        tl.store(QO + rows[:, None] * sq_b + h * sq_h + wcol[None, :], packed, mask=live & (hh < HQ))
        pos = tl.load(POS)
        kh = tl.maximum(hh - HQ, 0)
        tl.store(SC + rows[:, None] * ss_b + kh * ss_h + pos * ss_n + wcol[None, :], packed,
                 mask=live & (hh >= HQ))


    @triton.jit
    def _mv_layer(x, W, Bv, h, K: tl.constexpr, N: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
                  T: tl.constexpr):
        """y [N] = x [K] @ W[h] [K, N] (+ bias, SiLU) in fp32. T: the tile is held as [N, K] and reduced over
        axis 1, so the layers alternate the axis they reduce and each output already has the layout the next
        layer broadcasts (no layout conversion between layers)."""
        kk = tl.arange(0, K)
        nn_ = tl.arange(0, N)
        if T:
            y = tl.sum(tl.load(W + h * K * N + kk[None, :] * N + nn_[:, None]) * x[None, :], axis=1)
        else:
            y = tl.sum(tl.load(W + h * K * N + kk[:, None] * N + nn_[None, :]) * x[:, None], axis=0)
        if HAS_BIAS:
            y = y + tl.load(Bv + h * N + nn_)
        if ACT:
            y = y * tl.sigmoid(y)
        return y

    @triton.jit
    def _maps_mv_kernel(X, W1, B1, W2, B2, W3, B3, QO, SC, POS, sx_b, sx_h, sq_b, sq_h, ss_b, ss_h, ss_n,
                        HQ: tl.constexpr, D: tl.constexpr, HID: tl.constexpr, BITS: tl.constexpr,
                        WORDS: tl.constexpr, DEPTH: tl.constexpr, HAS_BIAS: tl.constexpr):
        """One (head, sequence) per program: the head's MLP on one vector, signed and packed."""
        h = tl.program_id(0)
        r = tl.program_id(1)
        x = tl.load(X + r * sx_b + h * sx_h + tl.arange(0, D)).to(tl.float32)
        if DEPTH == 1:
            y = _mv_layer(x, W1, B1, h, D, BITS, HAS_BIAS, False, False)
        elif DEPTH == 2:
            y = _mv_layer(x, W1, B1, h, D, HID, HAS_BIAS, True, False)
            y = _mv_layer(y, W2, B2, h, HID, BITS, HAS_BIAS, False, True)
        else:
            y = _mv_layer(x, W1, B1, h, D, HID, HAS_BIAS, True, False)
            y = _mv_layer(y, W2, B2, h, HID, HID, HAS_BIAS, True, True)
            y = _mv_layer(y, W3, B3, h, HID, BITS, HAS_BIAS, False, False)
        j = tl.arange(0, BITS)
        bit = tl.where(y > 0, tl.full([BITS], 1, tl.int32) << (j % 32), 0)  # disjoint bits: sum == OR
        packed = tl.sum(tl.reshape(bit, [WORDS, 32]), axis=1)  # [WORDS]
        wcol = tl.arange(0, WORDS)
        if h < HQ:
            tl.store(QO + r * sq_b + h * sq_h + wcol, packed)
        else:
            tl.store(SC + r * ss_b + (h - HQ) * ss_h + tl.load(POS) * ss_n + wcol, packed)


# ---------------------------------------------------------------------------------------------------------
# fused pieces of the decode step outside attention (fewer kernels per layer inside the CUDA graph)
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """transformers' LlamaRMSNorm of x [R, H] (or of x + residual, also returned): normalize in fp32, cast
    to x's dtype, then scale by weight. Returns y, or (x + residual, y)."""
    r, hdim = x.shape
    y = torch.empty_like(x)
    s = torch.empty_like(x) if residual is not None else x
    _rms_kernel[(r,)](x, residual if residual is not None else x, weight, y, s, hdim, eps,
                      HAS_RES=residual is not None, BLOCK=triton.next_power_of_2(hdim), num_warps=8)
    return (s, y) if residual is not None else y


def rope_and_cache(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, pos: torch.Tensor, num_q_heads: int, num_kv_heads: int):
    """qkv [B, (Hq + 2 Hkv) * D] of one step -> rotated q and k as one tensor [B, Hq + Hkv, D]; the
    rotated k and the v are written into k_cache, v_cache [B, Hkv, S, D] at ``pos``. cos, sin [1, D] in
    the model dtype (the products are rounded like transformers' bf16 arithmetic)."""
    b = qkv.shape[0]
    d = cos.shape[-1]
    nqk = num_q_heads + num_kv_heads
    out = torch.empty(b, nqk, d, device=qkv.device, dtype=qkv.dtype)
    _rope_kernel[(b, nqk + num_kv_heads)](qkv, cos, sin, out, k_cache, v_cache, pos, qkv.stride(0),
                                          k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                                          HQ=num_q_heads, NQK=nqk, D=d, num_warps=1)
    return out


def silu_mul(gu: torch.Tensor) -> torch.Tensor:
    """gu [R, 2 I] (gate then up) -> silu(gate) * up [R, I], rounded like the eager bf16 ops."""
    r, two_i = gu.shape
    i = two_i // 2
    out = torch.empty(r, i, device=gu.device, dtype=gu.dtype)
    block = 1024
    _silu_mul_kernel[(r, triton.cdiv(i, block))](gu, out, i, BLOCK=block, num_warps=4)
    return out


if triton is not None:
    @triton.jit
    def _rms_kernel(X, RES, W, Y, S, H, eps, HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        m = cols < H
        x = tl.load(X + row * H + cols, mask=m, other=0.0)
        if HAS_RES:
            x = (x.to(tl.float32) + tl.load(RES + row * H + cols, mask=m, other=0.0).to(tl.float32)).to(X.dtype.element_ty)
            tl.store(S + row * H + cols, x, mask=m)
        xf = x.to(tl.float32)
        var = tl.sum(xf * xf, 0) / H
        h = (xf * tl.math.rsqrt(var + eps)).to(X.dtype.element_ty)
        w = tl.load(W + cols, mask=m, other=0.0)
        tl.store(Y + row * H + cols, (w.to(tl.float32) * h.to(tl.float32)).to(Y.dtype.element_ty), mask=m)

    @triton.jit
    def _rope_kernel(QKV, COS, SIN, OUT, KC, VC, POS, s_row, sk_b, sk_h, sk_n,
                     HQ: tl.constexpr, NQK: tl.constexpr, D: tl.constexpr):
        b = tl.program_id(0)
        h = tl.program_id(1)
        half: tl.constexpr = D // 2
        j = tl.arange(0, D)
        x = tl.load(QKV + b * s_row + h * D + j)
        pos = tl.load(POS)
        if h < NQK:
            partner = tl.load(QKV + b * s_row + h * D + (j + half) % D)
            rot = tl.where(j < half, -partner.to(tl.float32), partner.to(tl.float32)).to(x.dtype)
            c = tl.load(COS + j)
            s = tl.load(SIN + j)
            a = (x.to(tl.float32) * c.to(tl.float32)).to(x.dtype)
            bb = (rot.to(tl.float32) * s.to(tl.float32)).to(x.dtype)
            y = (a.to(tl.float32) + bb.to(tl.float32)).to(x.dtype)
            tl.store(OUT + (b * NQK + h) * D + j, y)
            if h >= HQ:
                tl.store(KC + b * sk_b + (h - HQ) * sk_h + pos * sk_n + j, y)
        else:
            tl.store(VC + b * sk_b + (h - NQK) * sk_h + pos * sk_n + j, x)

    @triton.jit
    def _silu_mul_kernel(GU, OUT, I, BLOCK: tl.constexpr):
        r = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = cols < I
        g = tl.load(GU + r * 2 * I + cols, mask=m, other=0.0)
        u = tl.load(GU + r * 2 * I + I + cols, mask=m, other=0.0)
        gf = g.to(tl.float32)
        act = (gf * tl.sigmoid(gf)).to(g.dtype)
        tl.store(OUT + r * I + cols, (act.to(tl.float32) * u.to(tl.float32)).to(g.dtype), mask=m)
