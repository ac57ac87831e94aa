"""Faster evaluation path for any policy, same selections: used by the suite runner.

Two replacements, applied per policy instance by :func:`accelerate` (the policy's own scores are untouched):

- :func:`topk_select`: the shared rule of :func:`hashattention.core.selection.select` (sink + window +
  top-k of the scores, ties toward the most recent token) computed from ``torch.topk`` values (the k-th
  largest score as a threshold) instead of a full argsort or a histogram. Same keep mask, tested against
  the reference; on a GPU it avoids a segmented sort of every [Lq, Lk] row.
- :func:`sdpa_attend`: the softmax over the kept tokens through ``scaled_dot_product_attention`` with the
  keep mask (fused kernel, the model's dtype) instead of the fp32 reference (same tokens, rounding differs
  like the dense SDPA baseline's). Policies that need the probabilities (H2O) keep the reference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core.budget import Budget
from ..core.selection import _pick_last, forced_and_candidates, heavy_counts, select, union_of_group
from ..policies.base import SelectionPolicy


def topk_select(scores: torch.Tensor | None, valid: torch.Tensor, budget: Budget, union: int = 1) -> torch.Tensor:
    """Same result as ``select(scores, valid, budget, union=union)``. scores [B, Hs, Lq, Lk] (finite for valid
    keys), valid bool [B, 1 or Hs, Lq, Lk] -> keep bool [B, Hs / union, Lq, Lk]."""
    if scores is None:
        return select(None, valid, budget)
    forced, cand, n = forced_and_candidates(valid, budget)
    shape = torch.broadcast_shapes(scores.shape, valid.shape)
    if shape != scores.shape:
        raise ValueError(f"scores {tuple(scores.shape)} do not match the mask {tuple(valid.shape)}")
    forced, cand = forced.expand(shape), cand.expand(shape)
    k = heavy_counts(n, cand, budget, union).expand(*shape[:-1], 1)  # [B, Hs, Lq, 1] int64
    kmax = int(k.max())
    if kmax == 0:
        return union_of_group(forced, union) if union > 1 else forced
    s = torch.where(cand, scores.float(), torch.full((), float("-inf"), device=scores.device))
    top = torch.topk(s, kmax, dim=-1, sorted=True).values  # [B, Hs, Lq, kmax], descending
    thr = top.gather(-1, (k - 1).clamp_min(0))  # the k-th largest candidate score of each row
    above = s > thr
    need = k - above.sum(-1, keepdim=True)
    ties = _pick_last(cand & (s == thr), need)  # equal scores: the most recent ones
    keep = forced | ((above | ties) & (k > 0))
    return union_of_group(keep, union) if union > 1 else keep


def sdpa_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, scale: float,
                return_probs: bool = False, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention of q [B, Hq, Lq, D] over the kept keys of k, v [B, Hkv, Lk, D]; keep bool
    [B, Hq or Hkv or 1, Lq, Lk]. Rows with nothing kept (padding queries) read every key instead of
    producing NaN (their output is never used, but NaN would leak through 0-weights later)."""
    if return_probs:
        raise ValueError("sdpa_attend does not return probabilities; use the reference path")
    b, hq, lq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    if keep.shape[1] == hkv and g > 1:
        keep = keep.repeat_interleave(g, dim=1)
        bias = bias.repeat_interleave(g, dim=1) if bias is not None else None
    keep = keep | ~keep.any(-1, keepdim=True)
    if g > 1:
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    mask = keep if bias is None else torch.where(keep, bias.to(q.dtype), torch.full((), float("-inf"), dtype=q.dtype,
                                                                                     device=q.device))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def accelerate(policy: SelectionPolicy) -> SelectionPolicy:
    """Route ``policy`` through :func:`topk_select` and :func:`sdpa_attend` where it uses the shared
    defaults (a policy with its own ``select``/``attend``, or that observes probabilities, keeps them)."""
    cls = type(policy)
    if cls.select is SelectionPolicy.select and not policy.budget.adaptive:  # topk_select has no adaptive rule
        def fast_select(layer, state, q, k, v, valid, scale, _p=policy):
            return topk_select(_p.scores(layer, state, q, k, v, valid, scale), valid, _p.budget_for(layer), _p.union_groups)
        policy.select = fast_select
    if cls.attend is SelectionPolicy.attend and not policy.wants_probs:
        policy.attend = sdpa_attend
    return policy
