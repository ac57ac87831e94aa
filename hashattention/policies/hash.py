"""HashAttention: learned 32-bit signatures, heavy tokens = most bit matches with the query's signature."""
from __future__ import annotations

import torch

from ..core.maps import HashMaps
from ..core.selection import DEFAULT_GROUP_SELECTION, GROUP_SELECTIONS
from ..core.signatures import group_match_scores
from .base import SelectionPolicy


class HashAttentionPolicy(SelectionPolicy):
    """Keys are signed once when they enter the cache (``state['sig']``: int32 [B, key_heads, Lk, W]);
    each query is signed and scored against every cached signature (bit matches: XOR + popcount in the
    kernels, an exact ±1 matrix product here).

    ``selection`` says how the query heads of a KV group choose (``SELECTIONS``):
      - ``"sum"``: one selection per KV group by the group's summed bit matches (each K/V row read once);
      - ``"max"``: one selection per KV group by the best bit matches of any head of the group (same bytes);
      - ``"union"``: each query head picks its own top-floor(k/g); the group reads the union of those (at
        most k heavy rows, read once per KV head) and every head attends over all of it;
      - ``"head"``: one selection of k per query head (up to g times the rows read); ``per_group=False``.

    An adaptive budget (``Budget(heavy=cap, top_p=p)``) needs ``calibration`` (core.calibration.Calibration for
    this selection), by default the one loaded beside the maps (``maps.calibrations``, written by
    ``hashattention calibrate``).
    """

    name = "hash"
    SELECTIONS = GROUP_SELECTIONS
    adaptive = True

    def __init__(self, maps: HashMaps, budget=None, per_group: bool = True, selection: str | None = None,
                 calibration=None):
        if selection is None:  # per_group=False is the older spelling of selection="head"
            selection = DEFAULT_GROUP_SELECTION if per_group else "head"
        if selection not in self.SELECTIONS:
            raise ValueError(f"selection must be one of {', '.join(self.SELECTIONS)}, got {selection!r}")
        super().__init__(budget, selection != "head")
        if not isinstance(maps, HashMaps):
            raise TypeError(f"maps must be HashMaps, got {type(maps).__name__}")
        self.maps = maps
        self.selection = selection
        self.calibration = None
        if self.budget.adaptive:
            if selection == "union":
                raise ValueError("an adaptive budget (top_p, min_share) has no rule for the union selection; use sum, max or head")
            cal = calibration if calibration is not None else getattr(maps, "calibrations", {}).get(selection)
            if cal is None:
                raise ValueError(f"an adaptive budget (top_p, min_share) needs a calibration of these maps for selection "
                                 f"{selection!r}: run `hashattention calibrate --maps <maps> --selections {selection}`"
                                 + (f" ({maps.calibration_note})" if getattr(maps, "calibration_note", None) else ""))
            if cal.selection != selection:
                raise ValueError(f"calibration is for selection {cal.selection!r}, the policy uses {selection!r}")
            c = maps.config
            heads = c.num_q_heads if selection == "head" else c.num_kv_heads
            cal.check(c.num_layers, heads, self.max_score)
            self.calibration = cal
            self._weights = {}

    def mass_weights(self, layer, device=None):
        """float32 [1, Hs, 1, max_score + 1] of the calibration (cached per layer and device)."""
        if self.calibration is None:
            return None
        key = (layer, str(device))
        w = self._weights.get(key)
        if w is None:
            w = self._weights[key] = self.calibration.weights(layer, device)[None, :, None, :]
        return w

    @property
    def group(self) -> int:
        c = self.maps.config
        return c.num_q_heads // c.num_kv_heads

    @property
    def max_score(self):
        return self.maps.config.bits * (self.group if self.selection == "sum" else 1)

    @property
    def union_groups(self) -> int:
        return self.group if self.selection == "union" else 1

    def update(self, layer, state, k, v, start):
        c = self.maps.config
        if layer >= c.num_layers:
            raise ValueError(f"maps cover {c.num_layers} layers, the model has more (layer {layer})")
        k_new, v_new = k[:, :, start:], v[:, :, start:]
        if c.key_heads != k.shape[1]:  # authors' layout: one key map per query head
            g = c.key_heads // k.shape[1]
            k_new, v_new = k_new.repeat_interleave(g, 1), v_new.repeat_interleave(g, 1)
        sig = self.maps.key_signature(layer, k_new, v_new if c.value_norm else None)
        old = state.get("sig")
        state["sig"] = sig if old is None or start == 0 else torch.cat([old[:, :, :start], sig], dim=2)

    def scores(self, layer, state, q, k, v, valid, scale):
        c = self.maps.config
        q_sig = self.maps.query_signature(layer, q)  # [B, Hq, Lq, W]
        k_sig = state["sig"]  # [B, key_heads, Lk, W]
        b, hq, lq, w = q_sig.shape
        hkv = k.shape[1]
        g = hq // hkv
        if c.key_heads == hq:  # one key map per query head (the authors' layout)
            s = group_match_scores(q_sig.unsqueeze(2), k_sig)  # [B, Hq, Lq, Lk]
        elif self.selection == "sum":  # the group's bit matches summed: one product with the summed ±1 queries
            return group_match_scores(q_sig.view(b, hkv, g, lq, w), k_sig)  # [B, Hkv, Lq, Lk]
        else:
            s = group_match_scores(q_sig.view(b, hkv, 1, g * lq, w), k_sig)  # [B, Hkv, G*Lq, Lk]
            s = s.view(b, hkv, g, lq, -1).flatten(1, 2)  # [B, Hq, Lq, Lk]
        if self.selection == "sum":
            return s.view(b, hkv, g, lq, -1).sum(2)
        if self.selection == "max":
            return s.view(b, hkv, g, lq, -1).amax(2)
        return s  # per query head ("head", "union")

    #: run the fused kernels on CPU tensors too (tests under TRITON_INTERPRET=1 only)
    kernels_on_cpu = False

    def decode_attention(self, layer, state, q, k, v, valid, scale):
        """Fused decode step on CUDA (kernels.hash_decode_attention: scoring + counting selection, then
        split-K sparse attention): same tokens as :meth:`select` and the same attention as the reference
        path. None (use the reference path) off CUDA, without Triton, for dtypes or head sizes the kernels
        do not take, or when the valid keys of a row are not one range [start, Lk) (left padding)."""
        from .. import kernels
        if not (q.is_cuda or self.kernels_on_cpu) or kernels.triton is None or not kernels.use_triton(q) \
                or self.selection not in kernels.SELECTIONS or self.budget.residual \
                or self.budget.adaptive:  # the kernels read a fixed count per sequence
            return None
        b, hq, lq, d = q.shape
        lk = k.shape[2]
        if (lq != 1 or q.dtype not in (torch.bfloat16, torch.float16) or k.dtype != q.dtype
                or v.dtype != q.dtype or d & (d - 1) or not 16 <= d <= 256 or k.stride(-1) != 1
                or v.stride(-1) != 1 or "sig" not in state or state["sig"].shape[2] != lk):
            return None
        if valid.dim() != 4 or valid.shape[1] != 1 or valid.shape[2] != 1 or valid.shape[0] != b:
            return None
        row = valid[:, 0, 0, :]  # [B, Lk]
        n_valid = row.sum(-1)
        starts = lk - n_valid
        ranges = torch.arange(lk, device=row.device)[None, :] >= starts[:, None]
        if not bool(torch.equal(row, ranges)):  # not left padding only: the general path handles it
            return None
        q_sig = self.maps.query_signature(layer, q)[:, :, 0].contiguous()  # [B, Hq, W]
        k_sig = state["sig"]
        if k_sig.stride(-1) != 1:
            k_sig = k_sig.contiguous()
        lengths = torch.full_like(starts, lk)
        idx, counts = kernels.score_select(q_sig, k_sig, starts, lengths, self.budget_for(layer), k.shape[1],
                                           per_group=self.per_group, strict=False, selection=self.selection)
        out = kernels.sparse_decode(q[:, :, 0], k, v, idx, counts, scale, check=False)  # checked above
        state["fast_read"] = counts.sum(dtype=torch.float64)  # tokens read, for the handle's statistics
        return out[:, :, None]

    def extra_bits_per_token(self, num_kv_heads: int, num_q_heads: int) -> int:
        return self.maps.config.bits * self.maps.config.key_heads

    def __repr__(self):
        kind = self.maps.config.extra.get("kind", "learned")
        return f"HashAttentionPolicy({kind}, bits={self.maps.config.bits}, {self.budget.describe()}, " \
               f"selection={self.selection})"
