"""Random selection: a seeded, counter-based choice of heavy tokens (a floor any method must beat).

The score of a key is a hash of (seed, layer, head, the key's rank among valid keys, the query's rank), so
the choice is deterministic and does not change with left padding or with the batch.
"""
from __future__ import annotations

import torch

from ..core.selection import mix64
from .base import SelectionPolicy, key_ranks


class RandomPolicy(SelectionPolicy):
    name = "random"

    def __init__(self, budget=None, per_group: bool = True, seed: int = 0):
        super().__init__(budget, per_group)
        self.seed = int(seed)

    def scores(self, layer, state, q, k, v, valid, scale):
        heads = k.shape[1] if self.per_group else q.shape[1]
        kr = key_ranks(valid)  # [B, 1, Lq, Lk]
        qr = valid.sum(-1, keepdim=True).to(torch.int64)  # query's context length
        h = torch.arange(heads, device=q.device, dtype=torch.int64).view(1, -1, 1, 1)
        x = mix64(kr * 0x9E3779B1 + qr * 0x85EBCA77 + h * 0xC2B2AE3D + (layer * 0x27D4EB2F + self.seed))
        return (x & 0xFFFFFF).to(torch.float32)  # 24 bits: exact in float32
