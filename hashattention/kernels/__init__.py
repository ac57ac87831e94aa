"""Decode-step kernels of HashAttention (Triton on CUDA, PyTorch references elsewhere).

    out = hash_decode_attention(q, k_cache, v_cache, q_sig, k_sig, starts, lengths, budget,
                                per_group=True, scale=None)

One decode step (one query per sequence), FlashAttention-style in one call:

    q            [B, Hq, D]        bf16 / fp16 (fp32 and other head sizes: the reference path)
    k_cache      [B, Hkv, N, D]    same dtype; last dim contiguous, other strides free
    v_cache      [B, Hkv, N, D]
    q_sig        int32 [B, Hq, W]          the query's packed signatures (W = bits / 32)
    k_sig        int32 [B, Hs, N, W]       the key signature cache, Hs = Hkv (or Hq: per-query-head key maps)
    starts       int32/int64 [B]   first valid key of each sequence (left padding)
    lengths      int32/int64 [B]   one past its last valid key (ragged contexts: lengths[b] <= N)
    budget       hashattention.Budget (sink, window, heavy count or fraction of each sequence's context)
    per_group    True: one selection per KV group (bit matches summed over its query heads), each selected
                 K/V row read once per KV head; False: one selection per query head
    selection    "sum" / "max" (shared by the group: summed or best bit matches of its heads) or "head";
                 default from per_group
    scale        softmax scale, default D ** -0.5
    -> [B, Hq, D] in q's dtype (fp32 softmax and accumulation)

It is :func:`score_select` (kernel 1: XOR-popcount scores + counting top-k, merged with sink and window,
as a sorted compact index list) followed by :func:`sparse_decode` (kernel 2: split-K flash decoding over
the list). The selected set is exactly :func:`hashattention.core.selection.select`'s.
"""
from __future__ import annotations

from ..core.budget import Budget
from ._common import INTERPRET, triton, use_triton
from .reference import (hash_decode_attention_reference, score_select_reference, sparse_decode_reference)
from .score_select import SELECTIONS, score_select
from .sparse_decode import check_decode_args, dense_decode, sparse_decode


def hash_decode_attention(q, k_cache, v_cache, q_sig, k_sig, starts, lengths, budget: Budget,
                          per_group: bool = True, scale: float | None = None, strict: bool = True,
                          selection: str | None = None):
    """See the module docstring. ``strict``: an explicit heavy count larger than N is an error."""
    if q.dim() != 3 or k_cache.dim() != 4:
        raise ValueError(f"q must be [B, Hq, D] and k_cache [B, Hkv, N, D], got {tuple(q.shape)}, "
                         f"{tuple(getattr(k_cache, 'shape', ()))}")
    hkv = k_cache.shape[1]
    if q.shape[1] % hkv:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of {hkv} KV heads")
    if q_sig.dim() == 3 and q_sig.shape[:2] != q.shape[:2]:
        raise ValueError(f"q_sig {tuple(q_sig.shape)} does not match q {tuple(q.shape)}")
    if k_sig.dim() == 4 and k_sig.shape[2] != k_cache.shape[2]:
        raise ValueError(f"k_sig covers {k_sig.shape[2]} tokens, the cache {k_cache.shape[2]}")
    idx, counts = score_select(q_sig, k_sig, starts, lengths, budget, hkv, per_group, strict=strict,
                               selection=selection)
    check_decode_args(q, k_cache, v_cache, idx, counts, use_triton(q))  # no position check: score_select's own
    return sparse_decode(q, k_cache, v_cache, idx, counts, scale, check=False)


__all__ = ["hash_decode_attention", "score_select", "sparse_decode", "dense_decode", "hash_decode_attention_reference",
           "score_select_reference", "sparse_decode_reference", "use_triton", "INTERPRET", "triton", "SELECTIONS"]
