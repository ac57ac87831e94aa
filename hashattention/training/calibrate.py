"""Fitting the adaptive budget's calibration (core.calibration) on held-out text.

For the last ``queries`` positions of captured held-out sequences (decode-like: each sees the whole context),
every layer at once (layers stacked in the batch dimension, no loop over heads): the bit-match scores of the
heavy candidates as a selection sees them (the group's sum or max for "sum" / "max", each query head's own for
"head") and each candidate's share of its row's candidate attention mass (the group's summed softmax weights
for the shared selections, the head's own for "head"); core.calibration averages the share per score value.
"""
from __future__ import annotations

import torch

from ..core.budget import Budget
from ..core.calibration import CAL_SELECTIONS, accumulate, finish, new_accumulators
from ..core.maps import HashMaps
from ..core.selection import forced_and_candidates
from .recall import _layer_blocks, group_similarity, key_input, project_all


def selection_view(match: torch.Tensor, probs: torch.Tensor, selection: str):
    """match int64, probs float [Ly, Hkv, G, C, T] -> (scores [Ly, Hs, C, T], target weights [Ly, Hs, C, T])."""
    if selection == "sum":
        return match.sum(2), probs.sum(2)
    if selection == "max":
        return match.amax(2), probs.sum(2)
    if selection == "head":
        return match.flatten(1, 2), probs.flatten(1, 2)
    raise ValueError(f"a calibration is for one of the selections {', '.join(CAL_SELECTIONS)}, got {selection!r}")


def match_scores(maps: HashMaps, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layers: slice) -> torch.Tensor:
    """Per query head bit matches, int64 [Ly, Hkv, G, C, T] (q [Ly, Hq, C, D], k, v [Ly, Hkv, T, D])."""
    dt = maps.q.weights[0].dtype
    sq = torch.sign(project_all(maps.q, q.to(dt), layers).float())
    sk = torch.sign(project_all(maps.k, key_input(maps, k, v).to(dt), layers).float())
    sq[sq == 0] = -1  # pack_signs reads 0 as bit 0, i.e. -1
    sk[sk == 0] = -1
    return ((group_similarity(sq, sk, k.shape[1]) + maps.config.bits) / 2).round().to(torch.int64)


class Fitter:
    """Accumulates over captured sequences; :meth:`result` gives one Calibration per selection."""

    def __init__(self, maps: HashMaps, selections=("sum",), sink: int = 128, window: int = 128,
                 layer_block: int = 10):
        bad = [s for s in selections if s not in CAL_SELECTIONS]
        if bad or not selections:
            raise ValueError(f"cannot calibrate selection(s) {bad}; available: {', '.join(CAL_SELECTIONS)}")
        c = maps.config
        g = c.num_q_heads // c.num_kv_heads
        self.maps, self.budget, self.layer_block = maps, Budget(heavy=1.0, sink=sink, window=window), layer_block
        self.acc = {s: new_accumulators(c.num_layers, c.num_q_heads if s == "head" else c.num_kv_heads,
                                        c.bits * (g if s == "sum" else 1)) for s in selections}
        self.sequences = 0

    @torch.no_grad()
    def add(self, cap, queries: int):
        """One captured sequence (training.capture.Capture); its last ``queries`` positions are the queries."""
        if not 0 < queries < cap.length:
            raise ValueError(f"{queries} queries do not fit in a {cap.length}-token sequence")
        for sl, q, k, v, vmask, _, probs in _layer_blocks(cap, cap.length - queries, self.layer_block):
            match = match_scores(self.maps, q, k, v, sl)
            _, cand, _ = forced_and_candidates(vmask, self.budget)  # [Ly, 1, C, T]
            for sel, (sums, counts) in self.acc.items():
                scores, w = selection_view(match, probs, sel)
                w = w * cand
                share = w / w.sum(-1, keepdim=True).clamp_min(1e-30)
                accumulate(sums, counts, sl, scores, share, cand)
        self.sequences += 1

    def result(self, min_count: int = 16, info: dict | None = None) -> list:
        return [finish(s, c, sel, min_count, {**(info or {}), "sequences": self.sequences})
                for sel, (s, c) in self.acc.items()]
