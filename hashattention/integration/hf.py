"""Hugging Face integration: one call routes a model's attention through a selection policy.

    handle = hashattention.enable(model, policy, mode="decode")   # or: with policy(model): ...
    model.generate(...)
    handle.disable()

It registers an attention function ``"hashattention"`` (and a mask function for it, so that left-padded
batches get a real boolean mask) with transformers' ``AttentionInterface``. Each attention module gets a
per-layer state; the state is reset whenever a new KV cache object starts, and the policy is told about
every new key exactly once (so a signature cache can never drift from the KV cache).

Modes:
  - ``decode``: prefill (more than one query) runs transformers' own SDPA; decode steps are sparse.
  - ``everywhere``: every query, prefill included, reads only its selected tokens. Queries are processed
    in blocks of ``chunk`` (the paper's chunked-prefill evaluation; per-query selection is causal, so a
    block gives the same result as prefilling chunk by chunk).
"""
from __future__ import annotations

import weakref

import torch

from ..core.selection import causal_valid
from ..policies.base import SelectionPolicy
from .compat import UnsupportedGenerationError, check_cache, find_cache, guard_batch_edits  # noqa: F401

IMPL = "hashattention"
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "smollm3")
MODES = ("decode", "everywhere")


class UnsupportedModelError(ValueError):
    pass


def _mask_fn(*args, **kwargs):
    from transformers.masking_utils import sdpa_mask
    kwargs["allow_is_causal_skip"] = False  # always a real mask: padding must reach the policy
    return sdpa_mask(*args, **kwargs)


def _dense(module, query, key, value, mask, scaling, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    return sdpa_attention_forward(module, query, key, value, mask, scaling=scaling, **kwargs)


def _attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    handle = getattr(module, "_hashattention", None)
    if handle is None or handle.disabled:
        return _dense(module, query, key, value, attention_mask, scaling, dropout=dropout, **kwargs)
    return handle.attend(module, query, key, value, attention_mask, scaling, kwargs)


_registered = False


def _register():
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    AttentionInterface.register(IMPL, _attention_forward)
    AttentionMaskInterface.register(IMPL, _mask_fn)
    _registered = True


def attention_modules(model) -> list:
    """Attention modules of a decoder model, in layer order."""
    mods = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "num_key_value_groups")
            and hasattr(m, "q_proj")]
    return sorted(mods, key=lambda m: m.layer_idx)


def check_supported(model):
    cfg = getattr(model, "config", None)
    mt = getattr(cfg, "model_type", None)
    if mt not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model type {mt!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)} "
            f"(decoder models with rotary attention)")
    if not attention_modules(model):
        raise UnsupportedModelError(f"no attention modules with layer_idx found in this {mt} model")


class SparseAttentionHandle:
    """What :func:`enable` returns: holds the policy, the per-layer states and counters; a context manager."""

    def __init__(self, model, policy: SelectionPolicy, mode: str, chunk: int):
        self.model, self.policy, self.mode, self.chunk = model, policy, mode, chunk
        self.disabled = False
        self.states: dict[int, dict] = {}
        self._cache_id = None
        self._prev_impl = model.config._attn_implementation
        self.reset_stats()

    # -- statistics (tokens read per query, as a fraction of the context) ----------------------------
    def reset_stats(self):
        self._read = torch.zeros((), dtype=torch.float64)
        self._ctx = torch.zeros((), dtype=torch.float64)
        self._rows = 0

    def stats(self) -> dict:
        rows = max(self._rows, 1)
        read, ctx = float(self._read), float(self._ctx)
        return {"tokens_read": read / rows, "context": ctx / rows, "fraction": read / ctx if ctx else 0.0,
                "queries": self._rows}

    # -- state ---------------------------------------------------------------------------------------
    def reset(self):
        self.states.clear()

    def _pre_forward(self, module, args, kwargs):
        # the KV cache is found by its type, whatever the installed transformers calls the argument (cache,
        # past_key_values); _cache_id holds a weak reference to it (an id() can be reused by the next cache)
        cache = find_cache(args, kwargs)
        if cache is not None and (self._cache_id is None or self._cache_id() is not cache):
            check_cache(cache)  # static caches: refused
            guard_batch_edits(cache, self)  # beam search (cache reordering): refused
            self._cache_id = weakref.ref(cache)
            self.reset()
        return None

    def attend(self, module, query, key, value, mask, scaling, kwargs):
        b, hq, lq, d = query.shape
        lk = key.shape[2]
        if mask is None:
            valid = causal_valid(b, lq, lk, query.device)
        elif mask.dtype == torch.bool:
            valid = mask
        else:  # additive float mask
            valid = mask == 0
        if valid.shape[-1] != lk:
            raise RuntimeError(f"attention mask covers {valid.shape[-1]} keys, the cache holds {lk} "
                               "(static caches are not supported by the Hugging Face path)")
        layer = module.layer_idx
        state = self.states.setdefault(layer, {"seen": 0})
        if state["seen"] > lk - lq:  # a new sequence reuses this layer: start its state afresh
            state.clear()
            state["seen"] = 0
        if state["seen"] < lk:
            self.policy.update(layer, state, key, value, state["seen"])
            state["seen"] = lk
        if self.mode == "decode" and lq > 1:
            return _dense(module, query, key, value, mask, scaling, **kwargs)
        scale = scaling if scaling is not None else d ** -0.5
        if lq == 1:
            fast = self.policy.decode_attention(layer, state, query, key, value, valid, scale)
            if fast is not None:
                read = state.pop("fast_read", None)  # a fused path reports its tokens read
                if layer == 0 and read is not None:
                    self._read = self._read.to(read.device) + read
                    self._ctx = self._ctx.to(valid.device) + valid.sum(dtype=torch.float64)
                    self._rows += b
                return fast.transpose(1, 2).contiguous(), None
        outs = []
        for s in range(0, lq, self.chunk):
            qc, vc = query[:, :, s:s + self.chunk], valid[:, :, s:s + self.chunk]
            keep = self.policy.select(layer, state, qc, key, value, vc, scale)
            if self.policy.wants_probs:
                o, p = self.policy.attend(qc, key, value, keep, scale, return_probs=True)
                self.policy.observe(layer, state, p, keep)
            else:
                o = self.policy.attend(qc, key, value, keep, scale)
            outs.append(o)
            if layer == 0:  # counters stay on the device: no host sync per step
                self._read = self._read.to(keep.device) + keep.sum(dtype=torch.float64) / keep.shape[1]
                self._ctx = self._ctx.to(vc.device) + vc.sum(dtype=torch.float64)
                self._rows += qc.shape[0] * qc.shape[2]
        out = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
        return out.transpose(1, 2).contiguous(), None

    # -- on / off ------------------------------------------------------------------------------------
    def disable(self):
        if self.disabled:
            return
        self.disabled = True
        for m in attention_modules(self.model):
            if getattr(m, "_hashattention", None) is self:
                del m._hashattention
        self._hook.remove()
        _set_impl(self.model, self._prev_impl)
        if getattr(self.model, "_hashattention_handle", None) is self:
            del self.model._hashattention_handle
        self.states.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.disable()
        return False


def _set_impl(model, impl: str):
    try:
        model.set_attn_implementation(impl)
    except (AttributeError, ValueError, TypeError, ImportError):
        model.config._attn_implementation = impl


def enable(model, policy: SelectionPolicy, mode: str = "decode", chunk: int = 128) -> SparseAttentionHandle:
    """Route ``model``'s attention through ``policy``. Returns a handle (also a context manager).

    mode: "decode" (dense prefill, sparse decode) or "everywhere" (every query sparse, prefill in blocks
    of ``chunk`` queries). Calling enable again replaces the previous policy.
    """
    if not isinstance(policy, SelectionPolicy):
        raise TypeError(f"policy must be a SelectionPolicy, got {type(policy).__name__}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not isinstance(chunk, int) or chunk <= 0:
        raise ValueError(f"chunk must be a positive integer, got {chunk!r}")
    check_supported(model)
    maps = getattr(policy, "maps", None)
    if maps is not None:
        from ..weights import check_maps_match_model
        check_maps_match_model(maps.config, model.config)
    disable(model)
    _register()
    handle = SparseAttentionHandle(model, policy, mode, chunk)
    for m in attention_modules(model):
        m._hashattention = handle
    handle._hook = model.register_forward_pre_hook(handle._pre_forward, with_kwargs=True)
    model._hashattention_handle = handle
    _set_impl(model, IMPL)
    if maps is not None:
        dev = next(model.parameters()).device
        maps.to(dev)
    return handle


def disable(model) -> None:
    """Restore the model's previous attention (no-op when nothing is enabled)."""
    handle = getattr(model, "_hashattention_handle", None)
    if handle is not None:
        handle.disable()
