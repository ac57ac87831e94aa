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


@pytest.fixture
def tiny():
    return tiny_model
