"""PyTorch references of the decode kernels (same arguments, same results; used off CUDA and in tests).

Shapes (one decode step, one query per sequence):
    q        [B, Hq, D]            k_cache, v_cache [B, Hkv, N, D]
    q_sig    int32 [B, Hq, W]      k_sig int32 [B, Hs, N, W]   (Hs = Hkv, or Hq for per-query-head key maps)
    starts, lengths  int [B]: the valid keys of sequence b are positions starts[b] <= p < lengths[b]
    idx      int32 [B, Hsel, K]: selected positions, ascending, -1 after counts[b]
             (Hsel = Hkv when one selection is shared by each KV group, else Hq; K = budget.total(N))
    counts   int32 [B]: tokens each sequence reads (the same for every head)

Selection is exactly :func:`hashattention.core.selection.select` (sink and window over the valid positions,
top-k bit matches among the rest with ties toward the most recent token, counting top-k), with the bit
matches of a KV group summed when the selection is shared.
"""
from __future__ import annotations

import torch

from ..core.attention import sparse_attention
from ..core.budget import Budget
from ..core.selection import select
from ..core.signatures import match_scores


def valid_mask(starts: torch.Tensor, lengths: torch.Tensor, n: int) -> torch.Tensor:
    """bool [B, n]: starts[b] <= p < lengths[b]."""
    p = torch.arange(n, device=starts.device)
    return (p >= starts.long()[:, None]) & (p < lengths.long()[:, None])


def selection_scores(q_sig: torch.Tensor, k_sig: torch.Tensor, num_kv_heads: int, per_group: bool,
                     selection: str | None = None):
    """Bit matches [B, Hsel, N] (int64) and the largest possible score. A shared selection (``per_group``)
    combines the group's query heads by ``selection``: "sum" (default) or "max"."""
    b, hq, w = q_sig.shape
    hs, n = k_sig.shape[1], k_sig.shape[2]
    g = hq // num_kv_heads
    if hs == hq:
        s = match_scores(q_sig[:, :, None], k_sig)[:, :, 0]  # [B, Hq, N]
    else:
        s = match_scores(q_sig.view(b, hs, hq // hs, w), k_sig).reshape(b, hq, n)
    s = s.long()
    if per_group and selection == "max":
        return s.view(b, num_kv_heads, g, n).amax(2), 32 * w
    if per_group:
        return s.view(b, num_kv_heads, g, n).sum(2), 32 * w * g
    return s, 32 * w


def keep_to_indices(keep: torch.Tensor, k: int) -> torch.Tensor:
    """bool [..., N] -> int32 [..., k]: True positions ascending, then -1."""
    n = keep.shape[-1]
    p = torch.arange(n, device=keep.device).expand_as(keep)
    key = torch.where(keep, p, torch.full_like(p, n))
    srt = torch.sort(key, dim=-1).values
    if srt.shape[-1] < k:
        srt = torch.cat([srt, srt.new_full((*srt.shape[:-1], k - srt.shape[-1]), n)], -1)
    srt = srt[..., :k]
    return torch.where(srt >= n, torch.full_like(srt, -1), srt).to(torch.int32)


def score_select_reference(q_sig, k_sig, starts, lengths, budget: Budget, num_kv_heads: int,
                           per_group: bool = True, selection: str | None = None):
    """Returns (idx int32 [B, Hsel, K], counts int32 [B]); see the module docstring."""
    n = k_sig.shape[2]
    scores, max_score = selection_scores(q_sig, k_sig, num_kv_heads, per_group, selection)
    valid = valid_mask(starts, lengths, n)[:, None, None, :]  # [B, 1, 1, N]
    keep = select(scores[:, :, None, :], valid, budget, max_score=max_score)[:, :, 0]  # [B, Hsel, N]
    counts = keep[:, 0].sum(-1).to(torch.int32)
    return keep_to_indices(keep, budget.total(n)), counts


def sparse_decode_reference(q, k_cache, v_cache, idx, counts, scale: float | None = None):
    """Attention of q [B, Hq, D] over the rows idx[b, h, :counts[b]] of its KV head (fp32 softmax).
    idx [B, Hkv or Hq, K]. Returns [B, Hq, D] in q's dtype; a sequence with counts 0 gets zeros."""
    b, hq, d = q.shape
    n = k_cache.shape[2]
    live = torch.arange(idx.shape[-1], device=idx.device) < counts.long()[:, None, None]
    keep = torch.zeros(*idx.shape[:2], n + 1, dtype=torch.bool, device=idx.device)
    pos = torch.where(live & (idx >= 0), idx.long(), torch.full_like(idx, n, dtype=torch.long))
    keep.scatter_(-1, pos, True)
    keep = keep[..., :n]
    return sparse_attention(q[:, :, None], k_cache, v_cache, keep[:, :, None], scale)[:, :, 0]


def hash_decode_attention_reference(q, k_cache, v_cache, q_sig, k_sig, starts, lengths, budget: Budget,
                                    per_group: bool = True, scale: float | None = None):
    idx, counts = score_select_reference(q_sig, k_sig, starts, lengths, budget, k_cache.shape[1], per_group)
    return sparse_decode_reference(q, k_cache, v_cache, idx, counts, scale)
