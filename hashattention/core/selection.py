"""Shared token selection: sink + recent window + top-k of a policy's scores.

Every policy only produces scores; this module turns them into the set of tokens a query reads, so that all
policies are compared under exactly the same rule. Shapes:

    scores: [B, Hs, Lq, Lk]  (Hs = query heads, or KV heads when selection is shared by a group)
    valid:  bool [B, 1 or Hs, Lq, Lk]  (causal and padding mask: True = the query may see the key)
    keep:   bool [B, Hs, Lq, Lk]

Sink and window count *valid* positions, so left padding does not change what a sequence reads. Ties are
broken toward the more recent token. Integer scores (bit matches, 0..bits) are selected by counting: a
histogram over the score values gives the threshold, no sort.
"""
from __future__ import annotations

import torch

from .budget import Budget


#: how the query heads of a KV group choose the tokens their KV head reads (HashAttentionPolicy.selection):
#: "sum" / "max" of the heads' scores (one shared top-k), "union" of each head's top-k/g, "head" (no sharing)
GROUP_SELECTIONS = ("sum", "max", "union", "head")
#: the library's default, chosen by the side-by-side measurements in bench/results/quality_summary.md
DEFAULT_GROUP_SELECTION = "sum"


def forced_and_candidates(valid: torch.Tensor, budget: Budget):
    """Split valid keys into always-read (sink, window) and candidates for the heavy budget.

    Returns (forced, candidates, n_valid [B, *, Lq, 1]).
    """
    v = valid.to(torch.int32)
    r_start = torch.cumsum(v, dim=-1)  # 1-based rank among valid keys
    n = r_start[..., -1:]
    r_end = n - r_start + 1
    forced = valid & ((r_start <= budget.sink) | (r_end <= budget.window))
    return forced, valid & ~forced, n


def heavy_counts(n_valid: torch.Tensor, candidates: torch.Tensor, budget: Budget, union: int = 1) -> torch.Tensor:
    """Heavy tokens per row: the budget (its 1/union share per head of a union), but never more than the
    candidates. [B, *, Lq, 1] int64."""
    k = budget.heavy_count(n_valid.to(torch.int64))
    if union > 1:
        k = union_heavy(k, union)
    return torch.minimum(k, candidates.sum(-1, keepdim=True))


def _pick_last(mask: torch.Tensor, need: torch.Tensor) -> torch.Tensor:
    """The ``need`` most recent True entries of ``mask`` along the last dim."""
    from_end = torch.flip(torch.cumsum(torch.flip(mask.to(torch.int32), [-1]), -1), [-1])
    return mask & (from_end <= need)


def topk_counting(scores: torch.Tensor, candidates: torch.Tensor, k: torch.Tensor, max_score: int) -> torch.Tensor:
    """Top-``k`` integer scores in 0..max_score among ``candidates``, by a histogram threshold (no sort)."""
    s = torch.where(candidates, scores.to(torch.int64), torch.full_like(scores, -1, dtype=torch.int64))
    if s.max() > max_score or (candidates & (s < 0)).any():
        raise ValueError(f"integer scores must lie in 0..{max_score}")
    hist = torch.zeros(*s.shape[:-1], max_score + 2, dtype=torch.int64, device=s.device)
    hist.scatter_add_(-1, s + 1, torch.ones_like(s))  # bin 0 holds the non-candidates
    at_least = torch.flip(torch.cumsum(torch.flip(hist[..., 1:], [-1]), -1), [-1])  # [..., t] = #(s >= t)
    # threshold = the largest t with #(s >= t) >= k (0 when k == 0 rows pick nothing below)
    thr = (at_least >= k).sum(-1, keepdim=True) - 1
    thr = thr.clamp_min(0)
    above = s > thr
    need = k - above.sum(-1, keepdim=True)
    ties = _pick_last(s == thr, need)
    return (above | ties) & (k > 0)


def _weighted_hist(scores, candidates, weights, max_score):
    """(hist int64, w float64) [..., max_score + 1]: candidates per score value and the per-key mass weights."""
    s = torch.where(candidates, scores.to(torch.int64), torch.full_like(scores, -1, dtype=torch.int64))
    if s.max() > max_score or (candidates & (s < 0)).any():
        raise ValueError(f"integer scores must lie in 0..{max_score}")
    hist = torch.zeros(*s.shape[:-1], max_score + 2, dtype=torch.int64, device=s.device)
    hist.scatter_add_(-1, s + 1, torch.ones_like(s))
    hist = hist[..., 1:]
    if weights.dim() != 4 or weights.shape[-1] != max_score + 1 or weights.shape[1] not in (1, hist.shape[1]):
        raise ValueError(f"mass weights {tuple(weights.shape)} must be [*, 1 or {hist.shape[1]} heads, *, "
                         f"{max_score + 1} score values]")
    return hist, weights.to(torch.float64).expand(hist.shape)


def share_counting(scores: torch.Tensor, candidates: torch.Tensor, weights: torch.Tensor, share: float,
                   max_score: int) -> torch.Tensor:
    """Adaptive heavy counts, min-share rule: per row, the candidates whose estimated share of the row's
    estimated candidate mass (weights[score] / sum over candidates) is at least ``share``. Shapes as
    :func:`top_p_counting`; int64 [B, Hs, Lq, 1]."""
    hist, w = _weighted_hist(scores, candidates, weights, max_score)
    total = (hist * w).sum(-1, keepdim=True)
    return (hist * (w >= share * total)).sum(-1, keepdim=True)


def share_sorting(mass: torch.Tensor, candidates: torch.Tensor, share: float) -> torch.Tensor:
    """The min-share rule on real masses (the oracle's weights). mass float >= 0 [B, Hs, Lq, Lk] -> int64
    [B, Hs, Lq, 1]."""
    m = torch.where(candidates, mass.to(torch.float64), torch.zeros((), dtype=torch.float64, device=mass.device))
    total = m.sum(-1, keepdim=True)
    return ((m >= share * total) & (m > 0)).sum(-1, keepdim=True)


def top_p_counting(scores: torch.Tensor, candidates: torch.Tensor, weights: torch.Tensor, p: float,
                   max_score: int) -> torch.Tensor:
    """Adaptive heavy counts: per row, the fewest top-scoring candidates whose estimated mass reaches ``p`` of
    the estimated mass of all candidates. int64 [B, Hs, Lq, 1].

    scores int [B, Hs, Lq, Lk] in 0..max_score; weights float [B or 1, Hs or 1, Lq or 1, max_score + 1] (>= 0,
    a key's estimated mass per score value: core.calibration). The histogram is the one topk_counting builds;
    only the threshold rule differs (cumulative weight x count instead of cumulative count). Within the
    threshold bin, as many keys as the missing mass needs at that bin's weight."""
    hist, w = _weighted_hist(scores, candidates, weights, max_score)
    suffix = torch.flip(torch.cumsum(torch.flip(hist * w, [-1]), -1), [-1])  # [..., t] = mass of s >= t
    at_least = torch.flip(torch.cumsum(torch.flip(hist, [-1]), -1), [-1])
    target = p * suffix[..., :1]
    thr = ((suffix >= target).sum(-1, keepdim=True) - 1).clamp(0, max_score)  # largest t reaching the target
    pad = torch.zeros_like(suffix[..., :1])
    above_mass = torch.cat([suffix[..., 1:], pad], -1).gather(-1, thr)
    above = torch.cat([at_least[..., 1:], pad.to(torch.int64)], -1).gather(-1, thr)
    need = torch.ceil((target - above_mass) / w.gather(-1, thr).clamp_min(1e-300))
    return above + torch.minimum(need.clamp_min(0).to(torch.int64), hist.gather(-1, thr))


def top_p_sorting(mass: torch.Tensor, candidates: torch.Tensor, p: float) -> torch.Tensor:
    """The same rule on real masses (the oracle's own attention weights): fewest candidates holding ``p`` of
    the candidates' mass. mass float >= 0 [B, Hs, Lq, Lk] -> int64 [B, Hs, Lq, 1]."""
    m = torch.where(candidates, mass.to(torch.float64), torch.zeros((), dtype=torch.float64, device=mass.device))
    srt = torch.sort(m, dim=-1, descending=True).values
    csum = torch.cumsum(srt, -1)
    return (csum < p * csum[..., -1:]).sum(-1, keepdim=True) + (csum[..., -1:] > 0).to(torch.int64)


def topk_sorting(scores: torch.Tensor, candidates: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Top-``k`` real scores among ``candidates`` (ties to the most recent token)."""
    s = torch.where(candidates, scores.float(), torch.full_like(scores, float("-inf"), dtype=torch.float32))
    s = torch.flip(s, [-1])  # stable descending sort keeps the earliest of equal scores: flip => most recent
    order = torch.argsort(s, dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(s.shape[-1], device=s.device).expand_as(order))
    return torch.flip(rank, [-1]) < k


def union_heavy(k: torch.Tensor, groups: int) -> torch.Tensor:
    """Heavy tokens each of ``groups`` heads picks for a union read once by their KV head: floor(k / groups),
    so that the union never holds more than k."""
    return k // groups


def union_of_group(keep: torch.Tensor, groups: int) -> torch.Tensor:
    """bool [B, Hq, Lq, Lk] -> [B, Hq / groups, Lq, Lk]: a token is read when any head of its group picked it."""
    b, h = keep.shape[:2]
    return keep.view(b, h // groups, groups, *keep.shape[2:]).any(2)


def select(scores: torch.Tensor | None, valid: torch.Tensor, budget: Budget,
           max_score: int | None = None, union: int = 1, weights: torch.Tensor | None = None,
           scores_are_mass: bool = False) -> torch.Tensor:
    """Tokens read by each query: sink | window | top-k(scores) among the rest. See module docstring.

    scores None means "no preference": the heavy budget goes to the most recent candidates.
    max_score given (integer scores 0..max_score) selects by counting; otherwise by a stable sort.
    union = g > 1: scores are per query head [B, Hq, ...]; each head picks its top-floor(k/g) and the result is
    the union over each group of g consecutive heads, [B, Hq/g, Lq, Lk] (at most k heavy tokens per group).
    An adaptive budget (budget.top_p or budget.min_share) sets k per row by :func:`top_p_counting` /
    :func:`share_counting` with ``weights`` (float [B or 1, Hs or 1, Lq or 1, max_score + 1], a calibration's
    per-score mass), or by :func:`top_p_sorting` / :func:`share_sorting` when ``scores_are_mass`` (real
    attention weights); then clamps it to [heavy_min, heavy].
    """
    if valid.dtype != torch.bool:
        raise TypeError(f"valid mask must be bool, got {valid.dtype}")
    forced, cand, n = forced_and_candidates(valid, budget)
    if scores is None:
        k = heavy_counts(n, cand, budget)
        return forced | _pick_last(cand, k)
    if scores.dim() != 4:
        raise ValueError(f"scores must be [B, H, Lq, Lk], got {tuple(scores.shape)}")
    shape = scores.shape
    if valid.dim() != 4 or valid.shape[0] != shape[0] or valid.shape[2:] != shape[2:] or \
            valid.shape[1] not in (1, shape[1]):
        raise ValueError(f"scores {tuple(scores.shape)} do not match the mask {tuple(valid.shape)}")
    forced, cand = forced.expand(shape), cand.expand(shape)
    if union > 1 and shape[1] % union:
        raise ValueError(f"{shape[1]} score heads do not form groups of {union}")
    k = heavy_counts(n, cand, budget, union).expand(*shape[:-1], 1)
    if budget.adaptive:
        if union > 1:
            raise ValueError("an adaptive budget (top_p, min_share) has no rule for the union selection; use sum, "
                             "max or head")
        p, sh = budget.top_p, budget.min_share
        if max_score is not None and weights is not None:
            kp = (top_p_counting(scores, cand, weights, p, max_score) if p is not None
                  else share_counting(scores, cand, weights, sh, max_score))
        elif scores_are_mass:
            kp = top_p_sorting(scores, cand, p) if p is not None else share_sorting(scores, cand, sh)
        else:
            raise ValueError("an adaptive budget (top_p, min_share) needs integer scores with a calibration's mass "
                             "weights (or real attention weights as scores)")
        kp = torch.maximum(kp, budget.heavy_min_count(n.to(torch.int64)))
        k = torch.minimum(torch.minimum(kp, k), cand.sum(-1, keepdim=True))
    if max_score is not None:
        heavy = topk_counting(scores, cand, k, max_score)
    else:
        heavy = topk_sorting(scores, cand, k)
    keep = forced | heavy
    return union_of_group(keep, union) if union > 1 else keep


def causal_valid(batch: int, q_len: int, kv_len: int, device=None) -> torch.Tensor:
    """bool [batch, 1, q_len, kv_len]: query i (at position kv_len - q_len + i) sees keys <= its position."""
    qpos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    kpos = torch.arange(kv_len, device=device)[None, :]
    return (kpos <= qpos).expand(batch, 1, q_len, kv_len)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64-style integer mixing (int64 arithmetic wraps identically on every device)."""
    x = x ^ (x >> 31)
    x = x * 0x7FB5D329728EA185
    x = x ^ (x >> 27)
    x = x * 0x1B873593CC9E2D51
    return x ^ (x >> 33)


def residual_sample(keep: torch.Tensor, valid: torch.Tensor, budget: Budget, salt: int = 0):
    """A systematic sample of the valid keys a query does not read (vAttention's residual), and the log of
    their weight. keep bool [B, Hs, Lq, Lk], valid bool [B, 1 or Hs, Lq, Lk] -> (sample bool like keep,
    log_weight float32 [B, Hs, Lq, 1]): n_rest / r, so that sum over the sample of w * exp(s) v estimates the
    dropped part of the softmax sums without bias. The start of each row's stride comes from a hash of (salt,
    query position), so the sample is deterministic and does not depend on padding or the batch."""
    rest = valid & ~keep
    n_rest = rest.sum(-1, keepdim=True)
    n_valid = valid.sum(-1, keepdim=True).to(torch.int64)
    r = torch.minimum(budget.residual_count(n_valid), n_rest)
    rank = torch.cumsum(rest.to(torch.int32), -1) - 1  # 0-based rank among the rest
    step = n_rest.to(torch.float64) / r.clamp_min(1).to(torch.float64)
    x = mix64(n_valid * 0x9E3779B1 + (salt * 0x27D4EB2F + 0x85EBCA77))  # the query's position and the salt
    u = (x & 0xFFFFFF).to(torch.float64) / float(1 << 24)  # [0, 1)
    off = u * step
    rk = rank.to(torch.float64)
    hit = torch.floor((rk + 1 - off) / step) - torch.floor((rk - off) / step) > 0  # a point m * step + off in [j, j + 1)
    sample = rest & hit & (r > 0)
    logw = torch.where(r > 0, torch.log(n_rest.to(torch.float32) / r.clamp_min(1).to(torch.float32)),
                       torch.zeros((), device=keep.device))
    return sample, logw
