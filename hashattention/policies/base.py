"""The one interface every selection policy implements (``which tokens does this query read``).

A policy turns a query block and the cached keys into *scores*; the shared rule in
:mod:`hashattention.core.selection` turns scores into the tokens read (sink + window + top-k), and one
sparse attention path reads them. Policies keep per-layer state (signature caches, page summaries,
accumulated attention) in a dict the integration hands them, reset whenever a new KV cache starts.

Shapes: q [B, Hq, Lq, D]; k, v [B, Hkv, Lk, D]; valid bool [B, 1, Lq, Lk];
scores [B, Hs, Lq, Lk] with Hs = Hkv when ``per_group`` (one selection per KV group: each K/V row is
read once) and Hs = Hq otherwise.
"""
from __future__ import annotations

import torch

from ..core.attention import sparse_attention
from ..core.budget import Budget
from ..core.selection import select


class SelectionPolicy:
    """Base class. Subclasses override :meth:`scores` (and :meth:`update` / :meth:`observe` for state)."""

    name = "policy"
    #: integer scores in 0..max_score are selected by counting instead of sorting
    max_score: int | None = None
    #: g > 1: scores are per query head and each group of g heads reads the union of its heads' top-k/g
    union_groups: int = 1

    def __init__(self, budget: Budget | None = None, per_group: bool = True):
        self.budget = budget if budget is not None else Budget()
        if not isinstance(self.budget, Budget):
            raise TypeError(f"budget must be a hashattention.Budget, got {type(budget).__name__}")
        self.per_group = per_group
        if self.budget.adaptive and not self.adaptive:
            raise ValueError(f"policy {self.name!r} cannot use an adaptive budget (top_p, min_share): it needs bit-match scores "
                             "and a calibration (the hash policy) or true attention weights (the oracle)")

    #: layer -> Budget overriding ``budget`` on that layer (core.budget.layer_budgets: an uneven share of the
    #: same total); set with :meth:`set_layer_weights`
    layer_budgets: dict = {}

    def budget_for(self, layer: int) -> Budget:
        """The budget this policy reads with on ``layer``."""
        return self.layer_budgets.get(layer, self.budget)

    def set_layer_weights(self, weights, num_layers: int) -> "SelectionPolicy":
        """Share the heavy budget unevenly over the layers at the same total: ``weights`` {layer: w} or
        'layer:w,...' (a listed layer reads w times an unlisted one). Returns self."""
        from ..core.budget import layer_budgets
        if weights and type(self).select is not SelectionPolicy.select:  # its own rule reads self.budget
            raise ValueError(f"policy {self.name!r} selects by its own rule: per-layer budgets apply to the "
                             "policies on the shared top-k selection (hash, oracle, quest, h2o, ...)")
        self.layer_budgets = layer_budgets(self.budget, weights, num_layers) if weights else {}
        return self

    #: the policy can set its heavy count per row from a target mass (Budget.top_p): see mass_weights
    adaptive = False
    #: the scores are attention weights themselves (the oracle): top-p on them needs no calibration
    scores_are_mass = False

    def mass_weights(self, layer: int, device=None) -> torch.Tensor | None:
        """float [1, Hs, 1, max_score + 1]: estimated attention mass of a key per integer score (a calibration),
        for an adaptive budget; None when the policy has none."""
        return None

    # -- state ---------------------------------------------------------------------------------------
    def update(self, layer: int, state: dict, k: torch.Tensor, v: torch.Tensor, start: int) -> None:
        """Keys/values at positions ``start..Lk-1`` of k, v [B, Hkv, Lk, D] are new in the cache."""

    def observe(self, layer: int, state: dict, probs: torch.Tensor, keep: torch.Tensor) -> None:
        """Attention probabilities [B, Hq, Lq, Lk] the sparse path just used (for accumulating policies)."""

    wants_probs = False  # set True in policies that implement observe()

    # -- selection -----------------------------------------------------------------------------------
    def scores(self, layer: int, state: dict, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               valid: torch.Tensor, scale: float) -> torch.Tensor | None:
        """[B, Hs, Lq, Lk], higher = more worth reading; None = no preference (most recent first)."""
        return None

    def select(self, layer: int, state: dict, q, k, v, valid: torch.Tensor, scale: float) -> torch.Tensor:
        """bool keep mask [B, Hs, Lq, Lk]."""
        w = self.mass_weights(layer, q.device) if self.budget.adaptive else None
        return select(self.scores(layer, state, q, k, v, valid, scale), valid, self.budget_for(layer),
                      max_score=self.max_score, union=self.union_groups, weights=w,
                      scores_are_mass=self.scores_are_mass)

    def decode_attention(self, layer: int, state: dict, q, k, v, valid, scale: float):
        """Optional fused fast path for one decode step (Lq == 1): return [B, Hq, 1, D], or None to use the
        shared select + sparse_attention path."""
        return None

    def attend(self, q, k, v, keep: torch.Tensor, scale: float, return_probs: bool = False, bias=None):
        """Aggregate the values of the kept tokens; softmax attention unless a policy says otherwise. ``bias``
        (float like keep): log weights of residual samples (Budget.residual)."""
        return sparse_attention(q, k, v, keep, scale, return_probs=return_probs, bias=bias)

    def extra_bits_per_token(self, num_kv_heads: int, num_q_heads: int) -> int:
        """Extra memory this policy keeps per cached token per layer, in bits, all KV heads together."""
        return 0

    def __repr__(self):
        return f"{type(self).__name__}({self.budget.describe()}, per_group={self.per_group})"

    # kvpress-style use: ``with policy(model): model.generate(...)``
    def __call__(self, model, mode: str = "decode", **kwargs):
        if _enabler is None:
            raise RuntimeError("no integration is registered to enable a policy on a model: "
                               "import hashattention (or hashattention.integration.hf) first")
        return _enabler(model, self, mode=mode, **kwargs)


#: what ``policy(model, ...)`` calls: :func:`hashattention.integration.hf.enable`, registered by that module
#: when it loads (the integration builds on the policies, so the policies never import it)
_enabler = None


def register_enabler(fn) -> None:
    """Make ``policy(model, mode=..., **kwargs)`` call ``fn(model, policy, mode=..., **kwargs)``."""
    global _enabler
    _enabler = fn


def group_sum(x: torch.Tensor, hkv: int) -> torch.Tensor:
    """[B, Hq, Lq, Lk] -> [B, Hkv, Lq, Lk], summing the query heads of each KV group."""
    b, hq = x.shape[:2]
    return x.reshape(b, hkv, hq // hkv, *x.shape[2:]).sum(2)


def key_ranks(valid: torch.Tensor) -> torch.Tensor:
    """Position of each key among the valid keys of its row (0-based), independent of left padding."""
    return torch.cumsum(valid.to(torch.int64), -1) - 1
