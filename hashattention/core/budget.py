"""Token budget: sink tokens + recent window + heavy tokens (a count, or a fraction of the context)."""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import torch


def parse_heavy(value) -> int | float:
    """'1/16' -> 0.0625, '0.1' -> 0.1, '512' -> 512, 0.25 -> 0.25."""
    if isinstance(value, str):
        v = value.strip()
        try:
            value = float(Fraction(v)) if "/" in v else (int(v) if v.isdigit() else float(v))
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"cannot read a budget from {value!r}: use a count like 512 or a fraction like 1/16")
    return value


@dataclass(frozen=True)
class Budget:
    """Which tokens a query may read.

    heavy: tokens chosen by the policy's scores, as a count (int >= 0) or a fraction of the context
        (float in (0, 1]: 1/16 means "16x fewer heavy tokens than the context").
    sink: the first tokens of the sequence, always read.  window: the most recent tokens, always read.
    """
    heavy: int | float = 1 / 16
    sink: int = 128
    window: int = 128
    #: residual: besides sink, window and heavy tokens, a systematic sample of this many of the other keys (a
    #: count, or a fraction of the context) whose softmax terms are weighted by (keys left) / (sampled): an
    #: unbiased estimate of the rest of the softmax sums instead of dropping them (vAttention, Desai et al. 2025)
    residual: int | float = 0
    #: top_p: an adaptive heavy budget. Per row (query, selection head) the heavy tokens are read from the
    #: highest score down until their *estimated* attention mass (a calibration table of the mean attention
    #: weight per score value, core.calibration) reaches top_p of the estimated mass of all heavy candidates;
    #: ``heavy`` is then the hard cap and ``heavy_min`` a floor. None: the fixed top-``heavy`` rule.
    top_p: float | None = None
    #: min_share: the other adaptive rule: per row, read the keys whose estimated share of the candidates' mass
    #: is at least min_share (one threshold on the share for every row: at a given mean count, the most mean
    #: captured share, where top-p spends reads on flat rows); same cap and floor
    min_share: float | None = None
    heavy_min: int | float = 0

    def __post_init__(self):
        r = parse_heavy(self.residual)
        object.__setattr__(self, "residual", r)
        if isinstance(r, bool) or not isinstance(r, (int, float)) or (isinstance(r, float) and not 0 <= r < 1) \
                or (isinstance(r, int) and r < 0):
            raise ValueError(f"residual sample must be a count >= 0 or a fraction in [0, 1), got {self.residual!r}")
        h = parse_heavy(self.heavy)
        object.__setattr__(self, "heavy", h)
        if isinstance(h, bool) or not isinstance(h, (int, float)):
            raise TypeError(f"heavy budget must be an int count or a float fraction, got {h!r}")
        if isinstance(h, float) and not (0.0 < h <= 1.0):
            raise ValueError(f"a fractional heavy budget must be in (0, 1], got {h}")
        if isinstance(h, int) and h < 0:
            raise ValueError(f"heavy budget must be >= 0, got {h}")
        p = self.top_p
        if p is not None:
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < float(p) <= 1.0:
                raise ValueError(f"top_p (target attention mass) must be in (0, 1], got {p!r}")
            object.__setattr__(self, "top_p", float(p))
            if h == 0:
                raise ValueError("an adaptive budget (top_p) needs a hard cap: heavy must be > 0")
        ms = self.min_share
        if ms is not None:
            if isinstance(ms, bool) or not isinstance(ms, (int, float)) or not 0.0 < float(ms) < 1.0:
                raise ValueError(f"min_share (a key's estimated share of the candidates' mass) must be in (0, 1), "
                                 f"got {ms!r}")
            if p is not None:
                raise ValueError("give one adaptive rule: top_p or min_share, not both")
            object.__setattr__(self, "min_share", float(ms))
            if h == 0:
                raise ValueError("an adaptive budget (min_share) needs a hard cap: heavy must be > 0")
        m = parse_heavy(self.heavy_min)
        object.__setattr__(self, "heavy_min", m)
        if isinstance(m, bool) or not isinstance(m, (int, float)) or m < 0 or (isinstance(m, float) and m > 1):
            raise ValueError(f"heavy_min must be a count >= 0 or a fraction in [0, 1], got {self.heavy_min!r}")
        if m and not self.adaptive:
            raise ValueError("heavy_min (a floor) only applies to an adaptive budget: set top_p or min_share too")
        if m and type(m) is type(h) and m > h:
            raise ValueError(f"heavy_min {m} is larger than the cap heavy={h}")
        for name in ("sink", "window"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {v!r}")

    @property
    def adaptive(self) -> bool:
        """The heavy count is set per row (top_p or min_share) under the cap ``heavy``."""
        return self.top_p is not None or self.min_share is not None

    def heavy_count(self, context: torch.Tensor | int):
        """Heavy tokens allowed for a context of ``context`` tokens (tensor or int)."""
        if isinstance(self.heavy, float):
            if isinstance(context, torch.Tensor):
                return torch.floor(context.to(torch.float64) * self.heavy).to(torch.int64)
            return int(context * self.heavy)
        return self.heavy if not isinstance(context, torch.Tensor) else torch.full_like(context, self.heavy)

    def heavy_min_count(self, context: torch.Tensor | int):
        """Floor of an adaptive budget at a context of ``context`` tokens (tensor or int)."""
        return Budget(heavy=self.heavy_min).heavy_count(context) if self.heavy_min else (
            torch.zeros_like(context) if isinstance(context, torch.Tensor) else 0)

    def residual_count(self, context: torch.Tensor | int):
        """Residual sample size at a context of ``context`` tokens (tensor or int)."""
        r = self.residual
        if isinstance(r, float):
            if isinstance(context, torch.Tensor):
                return torch.floor(context.to(torch.float64) * r).to(torch.int64)
            return int(context * r)
        return r if not isinstance(context, torch.Tensor) else torch.full_like(context, r)

    def total(self, context: int) -> int:
        """Tokens read by one query at this context length (never more than the context)."""
        return min(context, self.sink + self.window + self.heavy_count(context) + self.residual_count(context))

    def describe(self) -> str:
        h = self.heavy
        hs = (f"1/{round(1 / h)}" if isinstance(h, float) and abs(1 / h - round(1 / h)) < 1e-9 else str(h))
        res = f" residual={self.residual}" if self.residual else ""
        if self.adaptive:
            rule = f"p{self.top_p:g}" if self.top_p is not None else f"s{self.min_share:g}"
            hs = f"{rule}/{hs}" + (f" heavy_min={self.heavy_min}" if self.heavy_min else "")
        return f"heavy={hs} sink={self.sink} window={self.window}{res}"

    def check_fits(self, context: int):
        """Raise when an explicit heavy count cannot fit in a context of ``context`` tokens."""
        if isinstance(self.heavy, int) and self.heavy > context:
            raise ValueError(f"budget of {self.heavy} heavy tokens is larger than the context ({context} tokens)")
        if isinstance(self.residual, int) and self.residual > context:
            raise ValueError(f"residual sample of {self.residual} tokens is larger than the context ({context} tokens)")


def parse_label(label: str) -> tuple:
    """A suite budget label -> (heavy, residual): '1/32' -> (0.03125, 0), '1/64+r1/64' -> (0.015625, 0.015625).
    An adaptive label 'p0.9/1/16' (top-p 0.9 under a cap of 1/16) gives its cap as heavy (see parse_adaptive)."""
    heavy, _, res = str(label).partition("+r")
    _, heavy = parse_adaptive(heavy)
    return parse_heavy(heavy), parse_heavy(res) if res else 0


def parse_adaptive(label: str) -> tuple:
    """The adaptive rule of a label and its cap: 'p0.9/1/16' -> ({'top_p': 0.9}, '1/16'), 's0.002/1/16' ->
    ({'min_share': 0.002}, '1/16'), '1/32' -> ({}, '1/32'). Raises on a target outside its range or a missing
    cap (before any long work: the suite parses every label first)."""
    s = str(label).strip().partition("+r")[0]
    if not s[:1] in ("p", "s"):
        return {}, s
    v, sep, cap = s[1:].partition("/")
    try:
        x = float(v)
    except ValueError:
        x = None
    if x is None or not sep or not cap:
        raise ValueError(f"cannot read an adaptive budget from {label!r}: use p<target mass>/<cap> (e.g. p0.9/1/16) "
                         "or s<min share>/<cap> (e.g. s0.002/1/16)")
    if s[0] == "p" and not 0.0 < x <= 1.0:
        raise ValueError(f"adaptive budget {label!r}: the target mass must be in (0, 1], got {x}")
    if s[0] == "s" and not 0.0 < x < 1.0:
        raise ValueError(f"adaptive budget {label!r}: the min share must be in (0, 1), got {x}")
    return {"top_p" if s[0] == "p" else "min_share": x}, cap


def parse_layer_weights(text) -> dict:
    """'20:4,19:2' -> {20: 4.0, 19: 2.0} (layer -> weight of its heavy budget); a dict passes through checked."""
    if isinstance(text, dict):
        items = list(text.items())
    else:
        items = []
        for part in filter(str.strip, str(text).split(",")):
            layer, sep, w = part.partition(":")
            try:
                items.append((int(layer), float(w)) if sep else None)
            except ValueError:
                items.append(None)
            if items[-1] is None:
                raise ValueError(f"cannot read layer weights from {text!r}: use layer:weight,... (e.g. 20:4,19:2)")
    out = {}
    for layer, w in items:
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
            raise ValueError(f"layer weights: a layer must be an integer >= 0, got {layer!r}")
        if not (isinstance(w, (int, float)) and w > 0):
            raise ValueError(f"layer weights: layer {layer}'s weight must be > 0, got {w!r}")
        out[layer] = float(w)
    return out


def layer_budgets(budget: Budget, weights, num_layers: int) -> dict:
    """Per-layer budgets that spend the same heavy tokens as ``budget`` on every layer, shared unevenly: a
    listed layer reads ``weight`` times what each unlisted layer reads, the mean over the ``num_layers`` layers
    staying ``budget.heavy`` (a fraction is capped at 1, a count at nothing: check_fits applies per layer).
    weights: {layer: weight} or 'layer:weight,...'. Returns {layer: Budget} for every layer."""
    from dataclasses import replace
    w = parse_layer_weights(weights)
    bad = [i for i in w if i >= num_layers]
    if bad:
        raise ValueError(f"layer weights name layer {bad[0]}, but the model has {num_layers} layers (0..{num_layers - 1})")
    unit = num_layers / (sum(w.values()) + num_layers - len(w))

    def scaled(x, f):  # a fraction stays a fraction (at most 1), a count a count
        return min(float(x) * f, 1.0) if isinstance(x, float) else int(round(x * f))
    return {i: replace(budget, heavy=scaled(budget.heavy, w.get(i, 1.0) * unit),
                       heavy_min=scaled(budget.heavy_min, w.get(i, 1.0) * unit) if budget.heavy_min else 0)
            for i in range(num_layers)}
