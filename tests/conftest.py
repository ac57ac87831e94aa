import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long tests, not in the default suite (pytest -m slow)")
    config.addinivalue_line("markers", "gpu: needs CUDA")
    config.addinivalue_line("markers", "fuzz: heavy property-based fuzzing (also marked slow; HASHATTENTION_FUZZ=1 for more cases)")


def tiny_model(kind: str = "llama", layers: int = 2, heads: int = 6, kv_heads: int = 2, head_dim: int = 16,
               vocab: int = 97, seed: int = 0):
    """A tiny random decoder model of the given family (no download)."""
    import transformers
    torch.manual_seed(seed)
    cfg_cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
               "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}[kind]
    cfg = cfg_cls(vocab_size=vocab, hidden_size=heads * head_dim, intermediate_size=64, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                  max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                  tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    model_cls = {"llama": transformers.LlamaForCausalLM, "mistral": transformers.MistralForCausalLM,
                 "qwen2": transformers.Qwen2ForCausalLM, "qwen3": transformers.Qwen3ForCausalLM}[kind]
    model = model_cls(cfg).eval()
    return model


def engine_beside_hf(batch: int = 2, prompt: int = 60, cache: int = 80):
    """A tiny HF model, prompts, a small budget, random maps, and the engine built from that model with hash
    caches set up: what the engine-vs-integration comparisons start from. Returns (hf, ids, budget, maps,
    engine)."""
    from hashattention.core.budget import Budget
    from hashattention.core.maps import HashMaps
    from hashattention.engine import Transformer
    from hashattention.weights import maps_config_for
    hf = tiny_model("llama", layers=2)
    torch.manual_seed(3)
    ids = torch.randint(3, 97, (batch, prompt))
    bud = Budget(heavy=1 / 4, sink=4, window=4)
    maps = HashMaps(maps_config_for(hf.config))
    m = Transformer.from_hf(hf)
    m.setup_caches(batch, cache, maps=maps, budget=bud)
    return hf, ids, bud, maps, m


@pytest.fixture
def tiny():
    return tiny_model
