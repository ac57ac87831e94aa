"""Calibration of bit-match scores to attention mass, for the adaptive (top-p) heavy budget.

A table per layer and selection head: ``log_weight[l, h, s]`` = log of the mean share of the heavy
candidates' attention mass held by one candidate key whose (group-summed) bit-match score is ``s``, measured
on held-out text (``hashattention calibrate``). A query's score histogram times the table estimates how its
candidate mass spreads over the score values, which is all the top-p rule needs (only ratios matter, so the
table is defined up to a constant per row).

    log_weight: float32 [layers, Hs, max_score + 1]
        (Hs = KV heads for the shared selections "sum" / "max", query heads for "head")

Fitting accumulates, per (layer, head, score), the summed candidate-normalised attention weight and the number
of keys (:func:`accumulate`), then :func:`finish` takes means; scores too rare to estimate (fewer than
``min_count`` keys) take the largest value seen at a lower score (``cummax``; below the lowest seen score, its
value), so the table has no holes and a rare high score is never estimated below the lower ones.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

FORMAT = "hashattention-calibration/1"
#: selections a calibration can be fitted for (the union selection picks k/g per head: no top-p rule yet)
CAL_SELECTIONS = ("sum", "max", "head")


@dataclass
class Calibration:
    """One table (see the module docstring) for one group selection of one maps file."""
    log_weight: torch.Tensor  # float32 [layers, Hs, max_score + 1]
    selection: str
    info: dict = field(default_factory=dict)  # provenance: data, sequences, keys counted, seconds

    def __post_init__(self):
        if self.selection not in CAL_SELECTIONS:
            raise ValueError(f"a calibration is for one of the selections {', '.join(CAL_SELECTIONS)}, "
                             f"got {self.selection!r}")
        t = self.log_weight
        if not isinstance(t, torch.Tensor) or t.dim() != 3 or t.shape[-1] < 2:
            raise ValueError(f"calibration table must be [layers, heads, max_score + 1], got "
                             f"{tuple(getattr(t, 'shape', ()))}")
        if not torch.isfinite(t).all():
            raise ValueError("calibration table holds non-finite values")

    @property
    def max_score(self) -> int:
        return self.log_weight.shape[-1] - 1

    def check(self, num_layers: int, heads: int, max_score: int, what: str = "these maps"):
        """Raise naming the mismatch when the table does not fit ``num_layers`` x ``heads`` x 0..max_score."""
        want = (num_layers, heads, max_score + 1)
        if tuple(self.log_weight.shape) != want:
            raise ValueError(f"calibration ({self.selection}) has shape {tuple(self.log_weight.shape)} "
                             f"[layers, heads, scores], {what} need {want}")

    def weights(self, layer: int, device=None) -> torch.Tensor:
        """float32 [Hs, max_score + 1]: per-key mass weights of ``layer`` (max 1 per head)."""
        w = self.log_weight[layer]
        w = torch.exp(w - w.amax(-1, keepdim=True))
        return w if device is None else w.to(device)

    def to_dict(self) -> dict:
        return {"selection": self.selection, "shape": list(self.log_weight.shape),
                "log_weight": [round(float(x), 3) for x in self.log_weight.flatten()], "info": self.info}

    @classmethod
    def from_dict(cls, d: dict) -> "Calibration":
        try:
            shape = tuple(int(x) for x in d["shape"])
            t = torch.tensor(d["log_weight"], dtype=torch.float32)
            if len(shape) != 3 or t.numel() != shape[0] * shape[1] * shape[2]:
                raise ValueError(f"{t.numel()} values do not fill the shape {shape}")
            return cls(t.view(shape), d["selection"], d.get("info", {}))
        except (KeyError, TypeError) as e:
            raise ValueError(f"not a calibration table: {e!r}") from None


def new_accumulators(num_layers: int, heads: int, max_score: int):
    """Zeroed (sums float64, counts int64) [layers, heads, max_score + 1]."""
    return (torch.zeros(num_layers, heads, max_score + 1, dtype=torch.float64),
            torch.zeros(num_layers, heads, max_score + 1, dtype=torch.int64))


def accumulate(sums: torch.Tensor, counts: torch.Tensor, layers: slice, scores: torch.Tensor,
               share: torch.Tensor, cand: torch.Tensor):
    """Add one block of layers. scores int64 [Ly, Hs, C, T] in 0..max_score; share float [Ly, Hs, C, T] (each
    key's attention weight over its row's candidate mass); cand bool broadcastable to scores (heavy
    candidates: valid and neither sink nor window). One scatter over all layers and heads."""
    ly, hs, s1 = scores.shape[0], scores.shape[1], sums.shape[-1]
    if scores.min() < 0 or scores.max() >= s1:
        raise ValueError(f"scores must lie in 0..{s1 - 1}")
    cand = cand.expand_as(scores)
    base = (torch.arange(ly, device=scores.device)[:, None] * hs + torch.arange(hs, device=scores.device)) * s1
    idx = (base[:, :, None, None] + scores)[cand]
    s = torch.zeros(ly * hs * s1, dtype=torch.float64, device=scores.device)
    s.index_add_(0, idx, share[cand].to(torch.float64))
    c = torch.bincount(idx, minlength=ly * hs * s1)
    sums[layers] += s.view(ly, hs, s1).cpu()
    counts[layers] += c.view(ly, hs, s1).cpu()


def finish(sums: torch.Tensor, counts: torch.Tensor, selection: str, min_count: int = 16,
           info: dict | None = None) -> Calibration:
    """Means per score; rare scores filled from below (see the module docstring)."""
    seen = counts >= min_count
    if not seen.any(-1).all():
        raise ValueError(f"some layer/head saw no score value {min_count} times: calibrate on more text")
    mean = sums / counts.clamp_min(1)
    log = torch.where(seen, torch.log(mean.clamp_min(1e-30)), torch.full_like(mean, float("-inf")))
    log = torch.where(seen, log, torch.cummax(log, -1).values)  # a hole takes the best value below it
    first = torch.gather(log, -1, seen.to(torch.int8).argmax(-1, keepdim=True))  # the lowest seen score's
    log = torch.where(torch.isinf(log), first.expand_as(log), log)  # below the first seen score
    return Calibration(log.float(), selection, {**(info or {}), "min_count": min_count,
                                                "keys": int(counts.sum())})
