"""hashattention: learned-signature sparse attention (HashAttention, Desai et al., ICML 2025) for
Hugging Face decoder models, with the peer selection policies behind one interface.

    import hashattention as ha
    model, tok, _ = ha.load_model()                       # embedded SmolLM2-135M-Instruct
    policy = ha.HashAttentionPolicy(ha.load_default_maps(model), ha.Budget(heavy=1/16))
    with ha.enable(model, policy):
        model.generate(...)
"""
from .core.attention import sparse_attention
from .core.budget import Budget
from .core.maps import HashMaps, MapsConfig
from .core.selection import select
from .core.signatures import match_scores, pack_signs, unpack_bits
from .integration.compat import UnsupportedGenerationError
from .integration.hf import UnsupportedModelError, disable, enable
from .models import load_model
from .policies import (DensePolicy, HashAttentionPolicy, OracleTopKPolicy, RandomPolicy, SelectionPolicy,
                       SinkWindowPolicy, make_policy, POLICIES)
from .weights import WeightsError, load_maps, maps_config_for, save_maps
from .shipped import load_default_maps

__all__ = [
    "Budget", "HashMaps", "MapsConfig", "sparse_attention", "select", "match_scores", "pack_signs",
    "unpack_bits", "enable", "disable", "UnsupportedModelError", "load_model", "SelectionPolicy",
    "DensePolicy", "HashAttentionPolicy", "OracleTopKPolicy", "RandomPolicy", "SinkWindowPolicy",
    "make_policy", "POLICIES", "WeightsError", "load_maps", "save_maps", "maps_config_for",
    "load_default_maps", "UnsupportedGenerationError",
]
__version__ = "0.1.0"
