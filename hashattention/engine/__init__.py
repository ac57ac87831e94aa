"""Fast decoding engine (gpt-fast style): static KV + signature caches, CUDA graphs, dense or HashAttention
decode. See :mod:`hashattention.engine.model` and :mod:`hashattention.engine.generate`."""
from .generate import Generator
from .memory import memory_report
from .model import (CacheError, EngineConfig, Transformer, UnsupportedModelError, preset_config,
                    PRESETS)

__all__ = ["Generator", "Transformer", "EngineConfig", "CacheError", "UnsupportedModelError", "preset_config",
           "PRESETS", "memory_report"]
