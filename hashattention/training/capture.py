"""Collecting post-rotary queries, keys and values of every layer while a frozen model reads a text.

An attention function registered with transformers (``"hashattention_capture"``) records what each layer's
attention receives (queries after rotary embedding, the cache's keys and values) and then computes ordinary
SDPA attention, so the model's outputs are unchanged. The text is prefilled in chunks, as in decoding.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..integration.compat import cache_kwarg
from ..integration.hf import UnsupportedModelError, _dense, _mask_fn, _set_impl, attention_modules, check_supported

IMPL = "hashattention_capture"
_registered = False


def _capture_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    rec = getattr(module, "_ha_capture", None)
    if rec is not None:
        rec["q"].append(query.detach())
        rec["k"], rec["v"] = key.detach(), value.detach()
    return _dense(module, query, key, value, attention_mask, scaling, dropout=dropout, **kwargs)


def _register():
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
        AttentionInterface.register(IMPL, _capture_forward)
        AttentionMaskInterface.register(IMPL, _mask_fn)
        _registered = True


@dataclass
class Capture:
    """One sequence's attention inputs, all layers stacked (batch 1 squeezed).

    q: [layers, Hq, L, D]; k, v: [layers, Hkv, L, D]; scale: the model's softmax scale.
    """
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    scale: float

    @property
    def length(self) -> int:
        return self.k.shape[2]

    def take_layers(self, layers) -> "Capture":
        """Only these layers (a list of indices), in that order."""
        return Capture(self.q[layers], self.k[layers], self.v[layers], self.scale)


def max_context(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def check_capturable(model, length: int | None = None):
    """Raise before any long work when the model's attention cannot be captured or ``length`` is too long."""
    try:
        check_supported(model)
    except UnsupportedModelError as e:
        raise UnsupportedModelError(f"cannot capture this model's attention: {e}") from None
    m = max_context(model)
    if length is not None and m is not None and length > m:
        raise ValueError(f"context length {length} is longer than the model supports ({m} positions)")


@torch.no_grad()
def capture(model, ids: torch.Tensor, chunk: int = 1024, dtype=None) -> Capture:
    """Run ``ids`` [1, L] (or [L]) through ``model`` in chunks of ``chunk`` tokens; return every layer's q/k/v.

    dtype: storage dtype of the captured tensors (default: the model's).
    """
    from transformers import DynamicCache
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(f"capture takes one sequence [1, L], got {tuple(ids.shape)}")
    check_capturable(model, ids.shape[1])
    _register()
    mods = attention_modules(model)
    dev = next(model.parameters()).device
    prev = model.config._attn_implementation
    recs = [{"q": [], "k": None, "v": None} for _ in mods]
    for m, r in zip(mods, recs):
        m._ha_capture = r
    _set_impl(model, IMPL)
    try:
        cache = DynamicCache()
        for s in range(0, ids.shape[1], chunk):
            model(input_ids=ids[:, s:s + chunk].to(dev), **{cache_kwarg(model): cache}, use_cache=True)
    finally:
        for m in mods:
            if hasattr(m, "_ha_capture"):
                del m._ha_capture
        _set_impl(model, prev)
    if any(r["k"] is None for r in recs):
        raise UnsupportedModelError("the model's attention did not go through the transformers attention "
                                    "interface, so its queries and keys cannot be captured")
    dt = dtype or recs[0]["k"].dtype
    q = torch.stack([torch.cat(r["q"], dim=2)[0] for r in recs]).to(dt)
    k = torch.stack([r["k"][0] for r in recs]).to(dt)
    v = torch.stack([r["v"][0] for r in recs]).to(dt)
    scale = getattr(mods[0], "scaling", None) or q.shape[-1] ** -0.5
    return Capture(q, k, v, float(scale))
