"""What differs between transformers versions, and what the Hugging Face path refuses.

transformers 5.x renames the KV cache argument of a model's ``forward`` from ``past_key_values`` to ``cache``
(5.25 takes both and warns; ``past_key_values`` goes in 5.40 for ``forward``, 6.0 for ``generate``), and the
output's ``past_key_values`` to ``cache``. Code that calls a model by hand uses::

    out = model(input_ids=ids, **{cache_kwarg(model): cache}, use_cache=True)
    cache = output_cache(out)

The integration itself never names the argument: it finds the cache among a forward's arguments by its type.
"""
from __future__ import annotations

import functools
import inspect
import types
import weakref


class UnsupportedGenerationError(ValueError):
    """A generate() setting or cache kind the Hugging Face path would silently get wrong (beam search, static
    caches): the message names what to use instead."""


BEAM_SEARCH_MESSAGE = (
    "hashattention does not support beam search (nor any reordering of the KV cache's batch: Cache.{method} "
    "was called, as generate() does between beam-search steps): the policy's per-layer state (signatures, H2O "
    "scores) would not follow it. "
    "Generate with num_beams=1 (greedy or sampling), or call handle.disable() / leave the `with` block "
    "to run beam search with the model's own attention.")

STATIC_CACHE_MESSAGE = (
    "hashattention does not support static KV caches (got a {kind}; cache_implementation='static' makes one): "
    "it is preallocated, its key count never grows, so the policy cannot tell the new keys from the empty rows. "
    "Use the default dynamic cache (leave cache_implementation unset, or pass a transformers.DynamicCache), "
    "or call handle.disable() / leave the `with` block to use a static cache with the model's own attention.")


@functools.lru_cache(maxsize=None)
def _forward_takes_cache(cls) -> bool:
    try:
        params = inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):
        return False
    return "cache" in params


def cache_kwarg(model) -> str:
    """The keyword this model's ``forward`` takes its KV cache by: ``"cache"`` (transformers >= 5.25) or
    ``"past_key_values"`` (earlier releases)."""
    return "cache" if _forward_takes_cache(type(model)) else "past_key_values"


def output_cache(out):
    """The KV cache a model's output returns (``out.cache``, formerly ``out.past_key_values``), or None."""
    for name in ("cache", "past_key_values"):  # a ModelOutput is a dict of its fields that are set
        if isinstance(out, dict) and out.get(name) is not None:
            return out[name]
    return None


def _cache_type():
    try:
        from transformers.cache_utils import Cache
    except ImportError:  # pragma: no cover
        return None
    return Cache


def find_cache(args, kwargs):
    """The KV cache among a forward call's arguments (by type, whatever its keyword), or None."""
    cls = _cache_type()
    if cls is None:
        return None
    for v in kwargs.values():
        if isinstance(v, cls):
            return v
    for v in args:
        if isinstance(v, cls):
            return v
    return None


def is_static_cache(cache) -> bool:
    """A preallocated cache (transformers' StaticCache, or any cache with a static layer)."""
    try:
        from transformers.cache_utils import StaticCache, StaticLayer
    except ImportError:  # pragma: no cover
        return type(cache).__name__.startswith("Static")
    return isinstance(cache, StaticCache) or any(isinstance(x, StaticLayer) for x in getattr(cache, "layers", ()))


def check_cache(cache) -> None:
    """Raise :class:`UnsupportedGenerationError` for a cache the Hugging Face path cannot follow."""
    if is_static_cache(cache):
        raise UnsupportedGenerationError(STATIC_CACHE_MESSAGE.format(kind=type(cache).__name__))


#: Cache methods that reorder or resize the batch (beam search: reorder_cache); none of them updates a policy's state
BATCH_EDITS = ("reorder_cache", "batch_select_indices", "batch_repeat_interleave")

#: the handles whose current cache may be guarded (a guard asks them at call time)
_HANDLES = weakref.WeakSet()


def _current_cache(handle):
    ref = getattr(handle, "_cache_id", None)  # a weak reference to the cache the handle's states belong to
    return ref() if isinstance(ref, weakref.ref) else None


def _guard(name: str):
    def guarded(cache, *args, **kwargs):
        for handle in list(_HANDLES):
            if not handle.disabled and _current_cache(handle) is cache:
                raise UnsupportedGenerationError(BEAM_SEARCH_MESSAGE.format(method=name))
        return getattr(type(cache), name)(cache, *args, **kwargs)
    guarded._hashattention_guard = True
    return guarded


_GUARDS = {name: _guard(name) for name in BATCH_EDITS}


def guard_batch_edits(cache, handle) -> None:
    """Make ``cache``'s batch-reordering methods raise while it is the current cache of an enabled ``handle``
    (otherwise, after ``disable`` included, they work as before; a deep copy of the cache keeps the guard, bound
    to the copy). Idempotent."""
    _HANDLES.add(handle)
    for name in BATCH_EDITS:
        method = getattr(cache, name, None)
        if method is None or getattr(getattr(method, "__func__", None), "_hashattention_guard", False):
            continue
        setattr(cache, name, types.MethodType(_GUARDS[name], cache))
