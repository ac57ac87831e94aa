"""Model, maps and index helpers shared by the engine benchmarks (:mod:`.decode`, :mod:`.offload`)."""
from __future__ import annotations

import os
import platform

import torch

from ..core.maps import HashMaps
from ..engine.model import Transformer, preset_config
from ..weights import maps_config_for


def _device_name(dev) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return platform.processor() or "cpu"


def _maps_for(model: Transformer, spec: str, dev):
    """Shipped maps for the default model when they exist, else SimHash; random-init maps otherwise."""
    if spec == "default":
        from ..shipped import has_default_maps
        if has_default_maps():
            from ..weights import load_maps
            from ..shipped import DEFAULT_MAPS
            return load_maps(DEFAULT_MAPS, model.hf_config, allow_other_model=True, device=dev), "shipped"
        return HashMaps.simhash(maps_config_for(model.hf_config)).to(dev), "simhash"
    torch.manual_seed(0)
    return HashMaps(maps_config_for(model.hf_config)).to(dev), "random-init"


def _load(spec: str, dev, dtype, keep_hf: bool):
    """(engine model, hf model or None, tokenizer or None, description)."""
    if spec == "default" or os.path.isdir(spec):
        from ..models import load_model
        hf, tok, model_id = load_model(spec, device=dev, dtype=dtype)
        m = Transformer.from_hf(hf)
        return m, (hf if keep_hf else None), tok, f"{model_id} (real weights)"
    cfg = preset_config(spec)
    if keep_hf:
        import transformers
        cls = {"llama": transformers.LlamaForCausalLM, "mistral": transformers.MistralForCausalLM,
               "qwen2": transformers.Qwen2ForCausalLM}[cfg.model_type]
        cfg._attn_implementation = "sdpa"
        prev = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # initialise in bf16 directly (an fp32 8B model would need 32 GB)
        try:
            with torch.device(dev):
                hf = cls(cfg).eval()
        finally:
            torch.set_default_dtype(prev)
        return Transformer.from_hf(hf), hf, None, f"{spec} shape, random weights (HF init)"
    return Transformer.random(cfg, device=dev, dtype=dtype), None, None, f"{spec} shape, random weights"


def _fixed_index(m: Transformer, context: int) -> tuple:
    """A realistic index list (what the selection picks for a random query at this context)."""
    c, mc = m.c, m.maps.config
    q_sig = torch.randint(-2 ** 31, 2 ** 31 - 1, (m.batch, c.num_heads, mc.words), device=m.device,
                          dtype=torch.int32)
    return m.select(q_sig, m.sig_cache[0], torch.tensor([context + 1], device=m.device))
