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
  - ``context``: the protocol of the authors' sparse-attention-hub: a prompt is a context followed by a
    question; the first ``context_length`` tokens of each row (padding not counted) attend densely, the
    question and every generated token are sparse.
"""
from __future__ import annotations

import weakref

import torch

from ..core.selection import causal_valid, residual_sample
from ..policies.base import SelectionPolicy, register_enabler
from .families import (SUPPORTED_MODEL_TYPES, UnsupportedModelError, attention_modules, check_supported,  # noqa: F401
                       sparse_attention_modules)
from .compat import UnsupportedGenerationError, check_cache, find_cache, guard_batch_edits  # noqa: F401

IMPL = "hashattention"
MODES = ("decode", "everywhere", "context")


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


class SparseAttentionHandle:
    """What :func:`enable` returns: holds the policy, the per-layer states and counters; a context manager."""

    def __init__(self, model, policy: SelectionPolicy, mode: str, chunk: int, context_length=None):
        self.model, self.policy, self.mode, self.chunk = model, policy, mode, chunk
        self.disabled = False
        self.context = None
        if mode == "context":
            self.set_context(context_length)
        elif context_length is not None:
            raise ValueError(f"context_length is only used by mode='context' (mode is {mode!r})")
        self.states: dict[int, dict] = {}
        self._cache_id = None
        self._prev_impl = model.config._attn_implementation
        self._stats_layer = sparse_attention_modules(model)[0].layer_idx  # the first layer the policy runs
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

    def set_context(self, context_length):
        """Context tokens per row (an int for every row, or one per row), padding not counted: queries at
        positions >= context_length are sparse (mode 'context')."""
        if context_length is None:
            raise ValueError("mode='context' needs context_length: the number of prompt tokens before the "
                             "question (an int, or one per row of the batch)")
        t = torch.as_tensor(context_length).reshape(-1)
        if t.is_floating_point() or t.numel() == 0 or bool((t < 1).any()):
            raise ValueError(f"context_length must be positive token counts, got {context_length!r}")
        self.context = t.to(torch.int64)
        self._context_checked = False

    def _sparse_rows(self, valid: torch.Tensor) -> torch.Tensor:
        """bool [B, Lq]: the queries after the context (a query's valid keys = its position + 1)."""
        b = valid.shape[0]
        ctx = self.context.to(valid.device)
        if ctx.numel() not in (1, b):
            raise ValueError(f"context_length has {ctx.numel()} entries for a batch of {b} rows")
        return valid[:, 0].sum(-1) > ctx.view(-1, 1)

    # -- state ---------------------------------------------------------------------------------------
    def reset(self):
        self.states.clear()
        self._context_checked = False

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
        # context mode: which queries are past the context (decode steps are, once the first one checked it)
        rows = self._sparse_rows(valid) if self.mode == "context" and (lq > 1 or not self._context_checked) else None
        if rows is not None and lq == 1:  # the first decode step of a sequence: one host sync
            # the first decoded token follows the prompt: at least one question token after the context
            if not bool((valid[:, 0].sum(-1) > self.context.to(valid.device).view(-1, 1) + 1).all()):
                raise ValueError("context_length reaches past the prompt: the question must start inside it "
                                 "(context_length < prompt tokens)")
            self._context_checked = True
        if rows is not None and lq > 1:  # the context's queries attend densely, the rest sparse
            hit = rows.any(0)
            if not bool(hit.any()):
                return _dense(module, query, key, value, mask, scaling, **kwargs)
            first = int(hit.to(torch.int8).argmax())
            if first > 0:
                m = mask[..., :first, :] if mask is not None else valid[:, :, :first]
                head, _ = _dense(module, query[:, :, :first], key, value, m, scaling, **kwargs)
                tail = self._sparse(layer, state, query[:, :, first:], key, value, valid[:, :, first:],
                                    scale, rows[:, first:])
                return torch.cat([head, tail], dim=1), None
            return self._sparse(layer, state, query, key, value, valid, scale, rows), None
        if lq == 1:
            fast = self.policy.decode_attention(layer, state, query, key, value, valid, scale)
            if fast is not None:
                read = state.pop("fast_read", None)  # a fused path reports its tokens read
                if layer == self._stats_layer and read is not None:
                    self._read = self._read.to(read.device) + read
                    self._ctx = self._ctx.to(valid.device) + valid.sum(dtype=torch.float64)
                    self._rows += b
                return fast.transpose(1, 2).contiguous(), None
        return self._sparse(layer, state, query, key, value, valid, scale), None

    def _sparse(self, layer, state, query, key, value, valid, scale, rows=None):
        """The shared sparse path over query blocks of ``chunk``; ``rows`` bool [B, Lq] (mode 'context'):
        False rows read every valid key. Returns [B, Lq, Hq, D]."""
        lq = query.shape[2]
        outs = []
        for s in range(0, lq, self.chunk):
            qc, vc = query[:, :, s:s + self.chunk], valid[:, :, s:s + self.chunk]
            keep = self.policy.select(layer, state, qc, key, value, vc, scale)
            if rows is not None:
                keep = torch.where(rows[:, None, s:s + self.chunk, None], keep, vc)
            bias = None
            if self.policy.budget.residual:  # a weighted sample of the rest (Budget.residual)
                sample, logw = residual_sample(keep, vc, self.policy.budget_for(layer), layer)
                keep, bias = keep | sample, torch.where(sample, logw, torch.zeros((), device=logw.device))
            if self.policy.wants_probs:
                o, p = self.policy.attend(qc, key, value, keep, scale, return_probs=True, bias=bias)
                self.policy.observe(layer, state, p, keep)
            else:
                o = self.policy.attend(qc, key, value, keep, scale, bias=bias)
            outs.append(o)
            if layer == self._stats_layer:  # counters stay on the device: no host sync per step
                self._read = self._read.to(keep.device) + keep.sum(dtype=torch.float64) / keep.shape[1]
                self._ctx = self._ctx.to(vc.device) + vc.sum(dtype=torch.float64)
                self._rows += qc.shape[0] * qc.shape[2]
        out = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
        return out.transpose(1, 2).contiguous()

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


def enable(model, policy: SelectionPolicy, mode: str = "decode", chunk: int = 128,
           context_length=None) -> SparseAttentionHandle:
    """Route ``model``'s attention through ``policy``. Returns a handle (also a context manager).

    mode: "decode" (dense prefill, sparse decode), "everywhere" (every query sparse, prefill in blocks
    of ``chunk`` queries) or "context" (the first ``context_length`` tokens of each row dense, the question
    after them and every generated token sparse; ``handle.set_context`` changes it between prompts).
    Calling enable again replaces the previous policy.
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
    handle = SparseAttentionHandle(model, policy, mode, chunk, context_length)
    for m in sparse_attention_modules(model):  # sliding-window layers keep transformers' attention
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


register_enabler(enable)  # ``with policy(model): ...`` (the policies package does not import this one)
