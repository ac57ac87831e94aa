"""The engine's configuration: what it runs (model types, :class:`EngineConfig`), its errors, and the presets
(shapes of public checkpoints for random-weight benchmarks and the memory report). No torch needed: both
:mod:`.model` and :mod:`.memory` build on it."""
from __future__ import annotations

from dataclasses import asdict, dataclass

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


class UnsupportedModelError(ValueError):
    """The engine cannot run this model (family or feature)."""


class CacheError(ValueError):
    """A request that does not fit the preallocated caches (too long, too many sequences)."""


@dataclass
class EngineConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 8192
    sliding_window: int | None = None  # the engine attends to the whole cache: caches may not exceed it

    @property
    def group(self) -> int:
        return self.num_heads // self.num_kv_heads

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_hf(cls, config) -> "EngineConfig":
        """From a transformers config; raises :class:`UnsupportedModelError` naming what is not supported."""
        mt = getattr(config, "model_type", None)
        if mt not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(f"the fast decode engine supports model types "
                                        f"{', '.join(SUPPORTED_MODEL_TYPES)}; got {mt!r}")
        sw = getattr(config, "sliding_window", None)
        if mt == "qwen2" and not getattr(config, "use_sliding_window", False):
            sw = None
        if getattr(config, "hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"activation {config.hidden_act!r} is not supported (silu only)")
        hq = config.num_attention_heads
        hkv = getattr(config, "num_key_value_heads", None) or hq
        return cls(model_type=mt, vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                   intermediate_size=config.intermediate_size, num_layers=config.num_hidden_layers,
                   num_heads=hq, num_kv_heads=hkv,
                   head_dim=getattr(config, "head_dim", None) or config.hidden_size // hq,
                   rms_norm_eps=config.rms_norm_eps,
                   attention_bias=bool(getattr(config, "attention_bias", False) or mt == "qwen2"),
                   tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
                   max_position_embeddings=getattr(config, "max_position_embeddings", 8192),
                   sliding_window=sw)


# --- presets: shapes of public checkpoints (for random-weight benchmarks and the memory report) ----------
PRESETS = {
    "llama-3.1-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                         rms_norm_eps=1e-5, max_position_embeddings=131072, tie_word_embeddings=False,
                         rope_theta=500000.0,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "llama-3.2-1b": dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                         rms_norm_eps=1e-5, max_position_embeddings=131072, tie_word_embeddings=True,
                         rope_theta=500000.0,
                         rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "llama-2-7b": dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, head_dim=128,
                       rms_norm_eps=1e-5, max_position_embeddings=4096, tie_word_embeddings=False,
                       rope_theta=10000.0),
    "mistral-7b": dict(model_type="mistral", vocab_size=32768, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                       rms_norm_eps=1e-5, max_position_embeddings=32768, tie_word_embeddings=False,
                       rope_theta=1000000.0, sliding_window=None),
    # the embedded default model (SmolLM2-135M-Instruct), so "default" needs no GGUF file for a report
    "smollm2-135m": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                         rms_norm_eps=1e-5, max_position_embeddings=8192, tie_word_embeddings=True,
                         rope_theta=100000.0),
}
PRESET_ALIASES = {"default": "smollm2-135m", "llama-3.1-8b-instruct": "llama-3.1-8b", "llama3.1-8b": "llama-3.1-8b",
                  "8b": "llama-3.1-8b", "mistral-7b-instruct-v0.3": "mistral-7b"}


def preset_names() -> list[str]:
    return sorted(PRESETS) + sorted(PRESET_ALIASES)


def preset_config(name: str):
    """A transformers config object (no weights) for a preset name."""
    import transformers
    key = PRESET_ALIASES.get(name.lower(), name.lower())
    if key not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(preset_names())}")
    kw = dict(PRESETS[key])
    mt = kw.pop("model_type")
    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "qwen2": transformers.Qwen2Config}[mt]
    cfg = cls(**kw)
    cfg._name_or_path = key
    return cfg
