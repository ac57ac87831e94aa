"""The model families the Hugging Face path supports, and the two things that differ between them.

Every supported family calls transformers' attention interface with post-rotary queries and keys
[B, H, L, D] and the layer's own ``scaling`` (Gemma 3: ``query_pre_attn_scalar ** -0.5``, not
``head_dim ** -0.5``), so one attention function serves all of them. What differs:

  - where the attention modules are: each has ``layer_idx``, ``num_key_value_groups`` and ``o_proj``;
    the queries come from ``q_proj`` (Llama, Mistral, Qwen2/3, SmolLM3, Gemma 3) or from Phi-3's fused
    ``qkv_proj``;
  - which layers attend globally. A layer marked ``"sliding_attention"`` in ``config.layer_types``
    (Gemma 3 interleaves five of them per global layer; Qwen2/3 and SmolLM3 with ``use_sliding_window``)
    keeps transformers' own attention, the dense SDPA with the sliding-window mask, so its output is exact;
    only the global layers go through the policy. A window over the whole model without ``layer_types``
    (Mistral, Phi-3 configs with ``sliding_window``) stays sparse: the mask limits the selection to it.

The maps (``maps_config_for``) cover every layer, sliding ones included, so a layer's maps are found by its
``layer_idx``; the maps of sliding layers are never read.
"""
from __future__ import annotations

#: model_type -> the family's name in messages and in the README's "Supported models" paragraph.
#: Every entry is covered by a tiny random-weight test (tests/test_integration.py, tests/test_families.py).
FAMILIES = {
    "llama": "Llama",
    "mistral": "Mistral",
    "qwen2": "Qwen2",
    "qwen3": "Qwen3",
    "smollm3": "SmolLM3",
    "phi3": "Phi-3",
    "gemma3_text": "Gemma 3",
}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)

#: model types that are close to a supported one: what to do instead
_HINTS = {
    "gemma3": "load the text model (Gemma3ForCausalLM, model_type 'gemma3_text'); the multimodal "
              "Gemma3ForConditionalGeneration is not supported",
}

SLIDING = "sliding_attention"


class UnsupportedModelError(ValueError):
    """A model the Hugging Face path cannot run (family or feature)."""


def supported_list() -> str:
    return ", ".join(SUPPORTED_MODEL_TYPES)


def attention_modules(model) -> list:
    """Attention modules of a decoder model, in layer order (fused ``qkv_proj`` included: Phi-3)."""
    mods = [m for m in model.modules()
            if isinstance(getattr(m, "layer_idx", None), int) and hasattr(m, "num_key_value_groups")
            and hasattr(m, "o_proj") and (hasattr(m, "q_proj") or hasattr(m, "qkv_proj"))]
    return sorted(mods, key=lambda m: m.layer_idx)


def is_sliding(module, config=None) -> bool:
    """Whether this attention module is a sliding-window layer of a model that also has global layers."""
    types = getattr(config if config is not None else getattr(module, "config", None), "layer_types", None)
    if types is not None and module.layer_idx < len(types):
        return types[module.layer_idx] == SLIDING
    return bool(getattr(module, "is_sliding", False))


def sparse_attention_modules(model) -> list:
    """The attention modules a policy runs: every global layer (sliding-window layers stay exact)."""
    cfg = getattr(model, "config", None)
    return [m for m in attention_modules(model) if not is_sliding(m, cfg)]


def sliding_layers(model) -> list[int]:
    """Layer indices that keep transformers' own attention (sliding-window layers)."""
    cfg = getattr(model, "config", None)
    return [m.layer_idx for m in attention_modules(model) if is_sliding(m, cfg)]


def check_supported(model):
    """Raise :class:`UnsupportedModelError`, naming the supported model types, unless ``model`` is one."""
    cfg = getattr(model, "config", None)
    mt = getattr(cfg, "model_type", None)
    if mt not in FAMILIES:
        hint = f"; {_HINTS[mt]}" if mt in _HINTS else ""
        raise UnsupportedModelError(
            f"model type {mt!r} is not supported; supported: {supported_list()} "
            f"(decoder models with rotary attention: "
            f"{', '.join(dict.fromkeys(FAMILIES.values()))}){hint}")
    mods = attention_modules(model)
    if not mods:
        raise UnsupportedModelError(f"no attention modules with layer_idx found in this {mt} model")
    n = getattr(cfg, "num_hidden_layers", None)
    if n is not None and len(mods) != n:
        raise UnsupportedModelError(f"found {len(mods)} attention modules in this {mt} model, its config has "
                                    f"{n} layers")
    if not sparse_attention_modules(model):
        raise UnsupportedModelError(f"every layer of this {mt} model attends through a sliding window "
                                    "(config.layer_types): there is no global layer to make sparse")
