"""Bit signatures: packing into int32 words, popcount and bit-match scores.

A signature of ``bits`` bits is stored as ``bits // 32`` int32 words (bit ``i`` of the signature is bit
``i % 32`` of word ``i // 32``). The score between a query and a key signature is the number of equal bits,
``bits - popcount(q ^ k)``, an integer in ``0..bits`` (= (bits + <sign(q), sign(k)>) / 2).
"""
from __future__ import annotations

import torch

WORD_BITS = 32


def check_bits(bits: int) -> int:
    if not isinstance(bits, int) or bits <= 0 or bits % WORD_BITS:
        raise ValueError(f"bits must be a positive multiple of {WORD_BITS}, got {bits!r}")
    return bits // WORD_BITS


def pack_signs(x: torch.Tensor) -> torch.Tensor:
    """Pack the signs of ``x`` [..., bits] (bit = x > 0) into int32 words [..., bits // 32]."""
    words = check_bits(x.shape[-1])
    b = (x > 0).to(torch.int64).view(*x.shape[:-1], words, WORD_BITS)
    shifts = torch.arange(WORD_BITS, device=x.device, dtype=torch.int64)
    packed = (b << shifts).sum(-1)  # 0 .. 2^32-1
    # Reinterpret as signed int32 (two's complement) so the storage is exactly 32 bits per word.
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)
    return packed.to(torch.int32)


def unpack_bits(words: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_signs`: int32 [..., W] -> bool [..., W * 32]."""
    if words.dtype != torch.int32:
        raise TypeError(f"packed signatures must be int32, got {words.dtype}")
    w = words.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(WORD_BITS, device=words.device, dtype=torch.int64)
    bits = (w.unsqueeze(-1) >> shifts) & 1
    return bits.bool().flatten(-2)


def popcount32(x: torch.Tensor) -> torch.Tensor:
    """Number of set bits of each int32 (any integer dtype holding 32-bit patterns), as int32."""
    v = x.to(torch.int64) & 0xFFFFFFFF
    v = v - ((v >> 1) & 0x55555555)
    v = (v & 0x33333333) + ((v >> 2) & 0x33333333)
    v = (v + (v >> 4)) & 0x0F0F0F0F
    return ((v * 0x01010101) & 0xFFFFFFFF) >> 24


def match_scores(q_sig: torch.Tensor, k_sig: torch.Tensor) -> torch.Tensor:
    """Bit matches between query and key signatures (reference for the Triton kernel).

    q_sig: int32 [B, H, Lq, W]; k_sig: int32 [B, H, Lk, W] (H equal, or broadcastable).
    Returns int32 [B, H, Lq, Lk] with values in 0..32*W.
    """
    if q_sig.dtype != torch.int32 or k_sig.dtype != torch.int32:
        raise TypeError(f"signatures must be int32, got {q_sig.dtype} and {k_sig.dtype}")
    if q_sig.shape[-1] != k_sig.shape[-1]:
        raise ValueError(f"query and key signatures have {q_sig.shape[-1]} and {k_sig.shape[-1]} words")
    x = q_sig.unsqueeze(-2) ^ k_sig.unsqueeze(-3)  # [B, H, Lq, Lk, W]
    mismatches = popcount32(x).sum(-1)
    return (WORD_BITS * q_sig.shape[-1] - mismatches).to(torch.int32)


def _signs(words: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int32 [..., W] -> ±1 [..., W * 32] in ``dtype`` (bit 1 -> +1)."""
    return unpack_bits(words).to(dtype) * 2 - 1


def group_match_scores(q_sig: torch.Tensor, k_sig: torch.Tensor) -> torch.Tensor:
    """Bit matches summed over the query heads of each KV group, as one ±1 matrix product.

    q_sig: int32 [B, Hk, G, Lq, W]; k_sig: int32 [B, Hk, Lk, W]. Returns int32 [B, Hk, Lq, Lk] equal to
    ``match_scores(q_sig[:, :, g], k_sig).sum over g`` (G = 1 gives :func:`match_scores`). The sum of matches
    is (G * bits + (sum_g q_g) . k) / 2 with ±1 vectors; the products of small integers are exact in
    fp16 (GPU, |score| <= 2048) and fp32 (CPU), and the GEMM is far cheaper than XOR + popcount over every
    (query, key) pair."""
    if q_sig.dtype != torch.int32 or k_sig.dtype != torch.int32:
        raise TypeError(f"signatures must be int32, got {q_sig.dtype} and {k_sig.dtype}")
    if q_sig.dim() != 5 or k_sig.dim() != 4 or q_sig.shape[-1] != k_sig.shape[-1]:
        raise ValueError(f"expected q_sig [B, Hk, G, Lq, W] and k_sig [B, Hk, Lk, W], got {tuple(q_sig.shape)} "
                         f"and {tuple(k_sig.shape)}")
    g, bits = q_sig.shape[2], WORD_BITS * q_sig.shape[-1]
    exact16 = q_sig.is_cuda and g * bits <= 2048
    dt = torch.float16 if exact16 else torch.float32
    qs = _signs(q_sig, torch.float32).sum(2).to(dt)  # [B, Hk, Lq, bits], integers in -G..G
    ks = _signs(k_sig, dt)  # [B, Hk, Lk, bits]
    dot = torch.matmul(qs, ks.transpose(-1, -2))  # [B, Hk, Lq, Lk]
    return ((dot.float() + g * bits) * 0.5).round().to(torch.int32)
