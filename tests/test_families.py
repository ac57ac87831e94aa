"""More model families (issue 26, item 4): Qwen3, SmolLM3, Phi-3 and Gemma 3 beside the Llama family.

Each family is a tiny random-weight model built here (no download). At full budget the policy's attention
equals transformers' SDPA on a left-padded batch, in both modes; maps train on it for a few steps. Gemma 3's
sliding-window layers keep transformers' own attention (exact at any budget); only its global layers are
sparse. The README's "Supported models" paragraph names exactly the families these tests cover.
"""
import math
import re
from pathlib import Path

import pytest
import torch

import hashattention as ha
from hashattention.integration.families import FAMILIES, SUPPORTED_MODEL_TYPES, sliding_layers

FULL = ha.Budget(heavy=10_000, sink=4, window=4)
NEW = ("qwen3", "smollm3", "phi3", "gemma3_text")
#: families tested in tests/test_integration.py (tiny_model in conftest.py)
LLAMA_FAMILY = ("llama", "mistral", "qwen2")


def family_model(kind: str, seed: int = 0, vocab: int = 97):
    """A tiny random decoder of the given family (float32, SDPA)."""
    import transformers
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, intermediate_size=64, max_position_embeddings=4096, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    if kind == "qwen3":  # q/k norms before the attention function
        cfg = transformers.Qwen3Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, head_dim=32, **common)
        cls = transformers.Qwen3ForCausalLM
    elif kind == "smollm3":  # every 4th layer without rotary embedding
        cfg = transformers.SmolLM3Config(hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                         num_key_value_heads=2, **common)
        cls = transformers.SmolLM3ForCausalLM
    elif kind in ("phi3", "phi3-window"):  # fused qkv_proj; "-window": one window of 8 over every layer
        cfg = transformers.Phi3Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, sliding_window=8 if kind == "phi3-window" else None,
                                      **common)
        cls = transformers.Phi3ForCausalLM
    elif kind == "gemma3_text":
        # one KV head of 256, a window of 8 tokens (prompts are 40), sliding / global / sliding layers;
        # query_pre_attn_scalar 64: the softmax scale (1/8) is not head_dim ** -0.5 (1/16)
        cfg = transformers.Gemma3TextConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=2,
                                            num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=64,
                                            sliding_window=8,
                                            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                            **common)
        cls = transformers.Gemma3ForCausalLM
    else:
        raise ValueError(kind)
    cfg._attn_implementation = "sdpa"
    return cls(cfg).eval()


def _batch(seed=0, vocab=97, length=40):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (2, length), generator=g)
    attn = torch.ones_like(ids)
    attn[1, :11] = 0  # left padding
    ids[attn == 0] = 0
    return ids, attn


def _gen(model, ids, attn, n=4):
    return model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=n, do_sample=False)


@pytest.mark.parametrize("kind", NEW + ("phi3-window",))
@pytest.mark.parametrize("mode", ["decode", "everywhere"])
def test_full_budget_equals_sdpa(kind, mode):
    """Greedy tokens and logits equal SDPA's; with a window over the whole model (Phi-3-mini-4k's 2047,
    Mistral v0.1's 4096; here 8 of 40 tokens) the policy selects inside it (the mask), so that is exact too."""
    model = family_model(kind)
    ids, attn = _batch()
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=attn).logits
    gref = _gen(model, ids, attn)
    policy = ha.make_policy("simhash", FULL, model_config=model.config)
    with ha.enable(model, policy, mode=mode, chunk=16) as h:
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=attn).logits
        if mode == "everywhere":
            assert h.stats()["fraction"] == pytest.approx(1.0)
        h.reset_stats()
        gen = _gen(model, ids, attn)
        assert h.stats()["fraction"] == pytest.approx(1.0) and h.stats()["queries"] > 0
        # the policy ran on every global layer and on no sliding-window layer
        n = model.config.num_hidden_layers
        assert sorted(h.states) == [i for i in range(n) if i not in sliding_layers(model)]
    real = attn.bool()
    torch.testing.assert_close(out[real], ref[real], atol=1e-4, rtol=1e-4)
    assert torch.equal(gen, gref), f"{kind} {mode}"
    assert model.config._attn_implementation == "sdpa"


def test_gemma3_sliding_layers_stay_exact_when_global_layers_are_sparse():
    """A small budget changes the global layer; every sliding-window layer still computes exactly what
    transformers' SDPA computes on the same inputs, and the window matters at this length."""
    model = family_model("gemma3_text", seed=1)
    assert sliding_layers(model) == [0, 2]
    ids, attn = _batch(seed=2)
    real = attn.bool()
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=attn, output_hidden_states=True)
    mods = ha.integration.hf.attention_modules(model)
    seen = {}

    def keep(i):
        def hook(mod, args, kwargs, out):
            seen[i] = (args, dict(kwargs), out[0].detach().clone())
        return hook
    hooks = [mods[i].register_forward_hook(keep(i), with_kwargs=True) for i in (0, 2)]
    small = ha.Budget(heavy=2, sink=1, window=2)
    try:
        with ha.enable(model, ha.SinkWindowPolicy(small), mode="everywhere") as h:
            with torch.no_grad():
                out = model(input_ids=ids, attention_mask=attn, use_cache=False, output_hidden_states=True)
            assert sorted(h.states) == [1] and h.stats()["fraction"] < 0.5
    finally:
        for x in hooks:
            x.remove()
    # layer 0 comes before any sparse layer: its output is the dense one; the sparse global layer changes
    # what follows
    torch.testing.assert_close(out.hidden_states[1][real], ref.hidden_states[1][real], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out.logits[real], ref.logits[real], atol=1e-3)
    # layer 2 reads the sparse layer's output; rerun it with transformers' own SDPA on those inputs
    args, kwargs, got = seen[2]
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        want = mods[2](*args, **kwargs)[0]
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)
    # ... and the window of 8 matters at 40 tokens: the same layer without it gives another output
    causal = torch.ones(40, 40, dtype=torch.bool).tril()
    assert torch.equal(kwargs["attention_mask"], causal & real[:, None, None, :] & ~causal.tril(-8))
    kwargs["attention_mask"] = causal & real[:, None, None, :]
    with torch.no_grad():
        unwindowed = mods[2](*args, **kwargs)[0]
    assert not torch.allclose(unwindowed[real], want[real], atol=1e-3)


@pytest.mark.parametrize("kind", ["gemma3_text", "phi3-window"])
@pytest.mark.parametrize("mode", ["decode", "everywhere"])
def test_suite_batches_with_sliding_caches(kind, mode):
    """The evaluation suite's batches (decode mode shares one dense prefill and crops it back: a sliding
    layer's own cache could not be cropped past its window) give dense's tokens at full budget."""
    from hashattention.evaluation.runner import run_batch
    model = family_model(kind)
    tok = type("Tok", (), {"eos_token_id": 2, "pad_token_id": 0})()
    rows = [list(range(3, 43)), list(range(5, 30))]
    dense = run_batch(model, None, rows, [4, 4], mode=mode, tok=tok)
    out = run_batch(model, ha.make_policy("simhash", FULL, model_config=model.config), rows, [4, 4], mode=mode,
                    tok=tok)
    assert out["tokens"] == dense["tokens"] and out["stats"]["fraction"] == pytest.approx(1.0)


def test_gemma3_uses_the_layers_scaling():
    model = family_model("gemma3_text")
    mods = ha.integration.hf.attention_modules(model)
    assert mods[1].scaling == pytest.approx(64 ** -0.5) and mods[1].head_dim == 256
    cfg = ha.maps_config_for(model.config)  # maps for every layer (sliding ones unused), head_dim 256
    assert (cfg.num_layers, cfg.num_q_heads, cfg.num_kv_heads, cfg.head_dim) == (3, 2, 1, 256)


@pytest.mark.parametrize("kind", NEW)
def test_maps_train_a_few_steps(kind):
    from hashattention.training.capture import capture
    from hashattention.training.trainer import TrainConfig, train
    model = family_model(kind)
    seqs = torch.randint(3, 97, (2, 96))
    cap = capture(model, seqs[:1], chunk=32)
    n = model.config.num_hidden_layers
    hq, hkv = model.config.num_attention_heads, model.config.num_key_value_heads
    assert cap.q.shape[:3] == (n, hq, 96) and cap.k.shape[:3] == (n, hkv, 96)  # sliding layers: every key
    assert cap.scale == pytest.approx(ha.integration.hf.attention_modules(model)[0].scaling)
    tc = TrainConfig(context=96, qchunk=32, topk=4, sink=8, window=8, prefill_chunk=32, eval_every=100, lr=1e-2)
    maps = train(model, seqs, ha.maps_config_for(model.config, hidden=16), tc, progress=False)
    e = maps.config.extra
    assert e["steps"] == 2 * 3 and math.isfinite(e["final_loss"]) and e["final_loss"] > 0
    ids, attn = _batch()
    with ha.enable(model, ha.HashAttentionPolicy(maps, ha.Budget(heavy=4, sink=2, window=2)), mode="everywhere") as h:
        model(input_ids=ids, attention_mask=attn)
        assert 0 < h.stats()["fraction"] < 1


def test_unknown_family_is_refused_with_the_supported_list():
    import types
    import transformers
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50))
    with pytest.raises(ha.UnsupportedModelError,
                       match="'gpt2' is not supported; supported: llama, mistral, qwen2, qwen3, smollm3, phi3, "
                             "gemma3_text .*Gemma 3"):
        ha.enable(gpt2, ha.DensePolicy())
    multimodal = types.SimpleNamespace(config=types.SimpleNamespace(model_type="gemma3"))
    with pytest.raises(ha.UnsupportedModelError, match="supported: llama.*Gemma3ForCausalLM"):
        ha.enable(multimodal, ha.DensePolicy())
    model = family_model("gemma3_text")
    model.config.layer_types = ["sliding_attention"] * 3
    with pytest.raises(ha.UnsupportedModelError, match="no global layer"):
        ha.enable(model, ha.DensePolicy())


@pytest.mark.parametrize("kind", NEW)
def test_the_engine_refuses_families_other_than_llama(kind):
    from hashattention.engine import Transformer, UnsupportedModelError
    with pytest.raises(UnsupportedModelError, match=f"supports model types llama, mistral, qwen2; got '{kind}'"):
        Transformer.from_hf(family_model(kind))


def test_readme_lists_exactly_the_tested_families():
    assert set(SUPPORTED_MODEL_TYPES) == set(NEW) | set(LLAMA_FAMILY)
    text = Path(__file__).resolve().parents[1].joinpath("README.md").read_text()
    para = re.search(r"## Supported models\n\n(.*?)\n\n", text, re.S).group(1)
    listed = re.search(r"transformers 5\.x: (.*?)\.", para).group(1)
    assert [x.strip() for x in re.split(r",| and ", listed) if x.strip()] == list(FAMILIES.values())
