"""Quest (Tang et al., ICML 2024): keys are grouped in pages of ``page_size`` tokens; each page keeps the
per-channel minimum and maximum of its keys, and a query scores a page by the upper bound of q.k over it:

    bound(q, page) = sum_c max(q_c * max_c, q_c * min_c) = relu(q) . max + min(q, 0) . min

Every token of a page gets its page's bound, so the shared top-k (ties toward the most recent token) reads
whole pages in order of their bound, with at most one partial page at the budget's edge. Pages are aligned
to each sequence's own first valid token (left padding does not move them). Shared by a KV group, a page's
score is the sum of the group's query-head bounds.
"""
from __future__ import annotations

import torch

from ..core.attention import _group
from .base import SelectionPolicy, key_ranks


class QuestPolicy(SelectionPolicy):
    name = "quest"

    def __init__(self, budget=None, per_group: bool = True, page_size: int = 16):
        super().__init__(budget, per_group)
        if not isinstance(page_size, int) or page_size <= 0:
            raise ValueError(f"page_size must be a positive integer, got {page_size!r}")
        self.page_size = page_size

    def page_bounds(self, k: torch.Tensor, seen: torch.Tensor):
        """Per-page channel min / max of the keys. k [B, Hkv, Lk, D], seen bool [B, Lk] (keys any query of
        the block may read). Returns (page [B, Lk] int64 page id, or P for unseen keys; kmin, kmax
        [B, Hkv, P, D] fp32, 0 for empty pages)."""
        b, hkv, lk, d = k.shape
        rank = key_ranks(seen)  # [B, Lk]
        pages = int(seen.sum(-1).max()) // self.page_size + 1
        page = torch.where(seen, rank // self.page_size, torch.full_like(rank, pages))
        idx = page[:, None, :, None].expand(b, hkv, lk, d)
        kf = k.float()
        kmax = torch.full((b, hkv, pages + 1, d), float("-inf"), device=k.device)
        kmin = torch.full((b, hkv, pages + 1, d), float("inf"), device=k.device)
        kmax.scatter_reduce_(2, idx, kf, "amax")
        kmin.scatter_reduce_(2, idx, kf, "amin")
        kmax, kmin = kmax[:, :, :pages], kmin[:, :, :pages]
        empty = torch.isinf(kmax)  # a page no valid key falls in (never gathered; keep it finite)
        return page, kmin.masked_fill(empty, 0.0), kmax.masked_fill(empty, 0.0)

    def scores(self, layer, state, q, k, v, valid, scale):
        b, hkv, lk, d = k.shape
        seen = valid.any(2).any(1)  # [B, Lk]
        page, kmin, kmax = self.page_bounds(k, seen)
        qg = _group(q, hkv).float()  # [B, Hkv, G, Lq, D]
        bound = (torch.matmul(qg.clamp_min(0), kmax.unsqueeze(2).transpose(-1, -2))
                 + torch.matmul(qg.clamp_max(0), kmin.unsqueeze(2).transpose(-1, -2)))  # [B, Hkv, G, Lq, P]
        own, qpage = self._own_page_bound(k, page, valid, qg)  # [B, Hkv, G, Lq], [B, Lq]
        if self.per_group:
            bound, own = bound.sum(2), own.sum(2)  # [B, Hkv, Lq, P], [B, Hkv, Lq]
        else:
            bound, own = bound.flatten(1, 2), own.flatten(1, 2)  # [B, Hq, Lq, P], [B, Hq, Lq]
        pg = page.clamp_max(bound.shape[-1] - 1)[:, None, None, :].expand(*bound.shape[:3], lk)
        out = bound.gather(-1, pg)  # [B, Hs, Lq, Lk]; unseen keys are not candidates anyway
        same = (page[:, None, :] == qpage[:, :, None])[:, None]  # [B, 1, Lq, Lk]: the query's own page
        return torch.where(same, own.unsqueeze(-1), out)

    def _own_page_bound(self, k, page, valid, qg):
        """The bound of each query's own (partial) page over the keys it can see, as one decode step would
        compute it; the block-wide page min/max would also cover keys after the query (chunked prefill).
        Only the last Lq + page_size keys can be in an own page, so the segmented prefix min/max runs there."""
        b, hkv, lk, d = k.shape
        lq = qg.shape[-2]
        vis = valid.any(1)  # [B, Lq, Lk]
        ar = torch.arange(1, lk + 1, device=k.device)
        last = (vis.long() * ar).amax(-1) - 1  # [B, Lq] the last key each query sees, -1 for none
        t0 = max(0, lk - lq - self.page_size)
        if bool((last[last >= 0] < t0).any()):  # not a causal block: fall back to the block-wide bounds
            t0 = 0
        kt = k[:, :, t0:].float()  # [B, Hkv, T, D]
        pt = page[:, t0:]  # [B, T]
        cmax, cmin = kt.clone(), kt.clone()
        for s in range(1, min(self.page_size, kt.shape[2])):  # segmented prefix max/min within a page
            same = (pt[:, s:] == pt[:, :-s])[:, None, :, None]
            cmax[:, :, s:] = torch.where(same, torch.maximum(cmax[:, :, s:], kt[:, :, :-s]), cmax[:, :, s:])
            cmin[:, :, s:] = torch.where(same, torch.minimum(cmin[:, :, s:], kt[:, :, :-s]), cmin[:, :, s:])
        idx = (last - t0).clamp_min(0)  # [B, Lq]
        g = idx[:, None, :, None].expand(b, hkv, lq, d)
        omax, omin = cmax.gather(2, g), cmin.gather(2, g)  # [B, Hkv, Lq, D]
        own = (qg.clamp_min(0) * omax.unsqueeze(2)).sum(-1) + (qg.clamp_max(0) * omin.unsqueeze(2)).sum(-1)
        qpage = torch.where(last >= 0, page.gather(1, last.clamp_min(0)), torch.full_like(last, -1))
        return own, qpage  # [B, Hkv, G, Lq], [B, Lq]

    def extra_bits_per_token(self, num_kv_heads: int, num_q_heads: int) -> int:
        # min and max per channel per page, at the key's precision (16 bits assumed), spread over the page
        return 0  # not a per-token signature; reported separately by callers that care

    def __repr__(self):
        return f"QuestPolicy(page={self.page_size}, {self.budget.describe()}, per_group={self.per_group})"
