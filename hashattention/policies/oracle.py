"""Oracle top-k: the true attention weights choose the tokens (the upper bound of any top-k method)."""
from __future__ import annotations

import torch

from ..core.attention import _group
from .base import SelectionPolicy


class OracleTopKPolicy(SelectionPolicy):
    """Per query head: top-k of q.k. Shared by a KV group: top-k of the group's summed softmax weights."""

    name = "oracle"
    adaptive = True  # top-p on the true weights (the group's summed softmax weights: per_group only)

    @property
    def scores_are_mass(self):
        return self.per_group

    def scores(self, layer, state, q, k, v, valid, scale):
        hkv = k.shape[1]
        logits = torch.matmul(_group(q, hkv).float(), k.float().unsqueeze(2).transpose(-1, -2)) * scale
        m = valid.unsqueeze(2)  # [B, 1, 1, Lq, Lk]
        if not self.per_group:
            return logits.masked_fill(~m, float("-inf")).flatten(1, 2)
        probs = torch.softmax(logits.masked_fill(~m, float("-inf")), -1).nan_to_num(0.0)
        return probs.sum(2)  # [B, Hkv, Lq, Lk]
