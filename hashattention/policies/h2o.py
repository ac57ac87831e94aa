"""H2O (Zhang et al., NeurIPS 2023): heavy hitters = the keys with the largest attention accumulated over
all queries so far. The accumulation uses the probabilities of the sparse attention actually computed, so
a key that stops being read stops gaining (H2O's eviction, expressed as a per-query token budget).

State: ``state['acc']`` fp32 [B, Hs, Lk] (Hs = KV heads when shared by a group: the sum of the group's
query-head probabilities). Keys that no query has read yet score 0; in ``everywhere`` mode those are only
the current block's keys, which the recent window covers. In ``decode`` mode the prompt was prefilled with
dense attention the policy never saw, so the first sparse block seeds the accumulation with its own dense
attention over the unobserved keys (standing in for H2O's accumulation over the prefill queries).
"""
from __future__ import annotations

import torch

from ..core.attention import _group
from .base import SelectionPolicy, group_sum


class H2OPolicy(SelectionPolicy):
    name = "h2o"
    wants_probs = True

    def _heads(self, q, k):
        return k.shape[1] if self.per_group else q.shape[1]

    def scores(self, layer, state, q, k, v, valid, scale):
        b, hkv, lk, _ = k.shape
        acc = state.get("acc")
        observed = 0 if acc is None else acc.shape[-1]
        if acc is None:
            acc = torch.zeros(b, self._heads(q, k), 0, device=k.device, dtype=torch.float32)
        if lk > acc.shape[-1]:
            acc = torch.cat([acc, acc.new_zeros(b, acc.shape[1], lk - acc.shape[-1])], -1)
        q_len = q.shape[2]
        if observed == 0 and lk > q_len:  # cache filled by a dense prefill this policy did not see
            logits = torch.matmul(_group(q, hkv).float(), k.float().unsqueeze(2).transpose(-1, -2)) * scale
            p = torch.softmax(logits.masked_fill(~valid.unsqueeze(2), float("-inf")), -1).nan_to_num(0.0)
            p = p.sum(2) if self.per_group else p.flatten(1, 2)  # [B, Hs, Lq, Lk]
            acc = acc + p.sum(2)
        state["acc"] = acc
        return acc.unsqueeze(2).expand(b, acc.shape[1], q_len, lk)

    def observe(self, layer, state, probs, keep):
        hs = state["acc"].shape[1]
        p = group_sum(probs.float(), hs) if probs.shape[1] != hs else probs.float()  # [B, Hs, Lq, Lk]
        state["acc"] = state["acc"] + p.sum(2)
