"""Hugging Face integration (issue 2): same tokens as transformers' SDPA when the budget covers everything."""
import pytest
import torch

import hashattention as ha
from conftest import tiny_model

FULL = ha.Budget(heavy=10_000, sink=4, window=4)


def _batch(vocab=97, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (3, 40), generator=g)
    attn = torch.ones_like(ids)
    attn[1, :7] = 0
    attn[2, :19] = 0
    ids[attn == 0] = 0
    return ids, attn


def _gen(model, ids, attn, n=10):
    return model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=n, do_sample=False)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("mode", ["decode", "everywhere"])
def test_generate_equals_sdpa_when_budget_covers_everything(kind, mode):
    model = tiny_model(kind)
    ids, attn = _batch()
    ref = _gen(model, ids, attn)
    for policy in [ha.DensePolicy(), ha.OracleTopKPolicy(FULL),
                   ha.make_policy("simhash", FULL, model_config=model.config),
                   ha.make_policy("simhash", FULL, model_config=model.config, per_group=False)]:
        with ha.enable(model, policy, mode=mode, chunk=16) as h:
            out = _gen(model, ids, attn)
            assert h.stats()["fraction"] == pytest.approx(1.0)
        assert torch.equal(out, ref), f"{kind} {mode} {policy}"
    assert model.config._attn_implementation == "sdpa"


def test_sparse_policies_really_drop_tokens_and_change_output():
    model = tiny_model("llama", seed=1)
    ids, attn = _batch(seed=2)
    ref = model(input_ids=ids, attention_mask=attn).logits
    small = ha.Budget(heavy=2, sink=1, window=2)
    with ha.enable(model, ha.SinkWindowPolicy(small), mode="everywhere") as h:
        out = model(input_ids=ids, attention_mask=attn).logits
        st = h.stats()
    assert st["tokens_read"] <= 5 and st["fraction"] < 0.5
    assert not torch.allclose(out[0, -1], ref[0, -1], atol=1e-4)


def test_each_new_cache_starts_new_signature_cache():
    model = tiny_model("llama")
    ids, attn = _batch()
    policy = ha.make_policy("simhash", ha.Budget(heavy=3, sink=2, window=2), model_config=model.config)
    with ha.enable(model, policy) as h:
        a = _gen(model, ids, attn, 6)
        assert all(s["seen"] == 45 and s["sig"].shape[2] == 45 for s in h.states.values())
        b = _gen(model, ids[:, 5:], attn[:, 5:], 6)  # shorter prompt, new cache
        assert all(s["sig"].shape[2] == 40 for s in h.states.values())
        c = _gen(model, ids, attn, 6)
    assert torch.equal(a, c)
    assert b.shape[1] == 35 + 6


def test_enable_disable_and_function_api():
    model = tiny_model("qwen2")
    handle = ha.enable(model, ha.DensePolicy())
    assert model.config._attn_implementation == "hashattention"
    ha.enable(model, ha.RandomPolicy(ha.Budget(heavy=2, sink=1, window=1)))  # replaces the first
    assert not any(getattr(m, "_hashattention", None) is handle for m in model.modules())
    ha.disable(model)
    assert model.config._attn_implementation == "sdpa"
    assert not any(hasattr(m, "_hashattention") for m in model.modules())
    ha.disable(model)  # no-op


def test_kvpress_style_call():
    model = tiny_model("llama")
    ids, attn = _batch()
    ref = _gen(model, ids, attn, 4)
    with ha.OracleTopKPolicy(FULL)(model, mode="everywhere"):
        assert torch.equal(_gen(model, ids, attn, 4), ref)


def test_unsupported_architecture_and_bad_arguments():
    import transformers
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50))
    with pytest.raises(ha.UnsupportedModelError, match="gpt2.*supported: llama"):
        ha.enable(gpt2, ha.DensePolicy())
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="mode"):
        ha.enable(model, ha.DensePolicy(), mode="sometimes")
    with pytest.raises(TypeError, match="SelectionPolicy"):
        ha.enable(model, "dense")
    with pytest.raises(ValueError, match="unknown policy 'nope'.*dense"):
        ha.make_policy("nope")


def test_maps_for_another_model_rejected(tmp_path):
    model = tiny_model("llama", layers=2)
    other = ha.HashMaps(ha.MapsConfig(num_layers=3, num_q_heads=6, num_kv_heads=2, head_dim=16, model_id="x/y"))
    with pytest.raises(ha.WeightsError, match="num_layers: maps 3 vs model 2"):
        ha.enable(model, ha.HashAttentionPolicy(other))
    path = ha.save_maps(other, tmp_path / "m")
    with pytest.raises(ha.WeightsError, match="another model"):
        ha.load_maps(path, model.config)
    loaded = ha.load_maps(path)
    for a, b in zip(loaded.parameters(), other.parameters()):
        assert torch.equal(a, b)
    # same shapes, different model id
    same = ha.HashMaps(ha.maps_config_for(model.config))
    same.config.model_id = "org/other-model"
    model.config._hashattention_model_id = "org/this-model"
    p2 = ha.save_maps(same, tmp_path / "n")
    with pytest.raises(ha.WeightsError, match="trained for 'org/other-model'"):
        ha.load_maps(p2, model.config)
    ha.load_maps(p2, model.config, allow_other_model=True)


def test_corrupt_weights_file(tmp_path):
    model = tiny_model("llama")
    path = ha.save_maps(ha.HashMaps(ha.maps_config_for(model.config)), tmp_path / "m")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ha.WeightsError, match="corrupt or truncated"):
        ha.load_maps(path, model.config)
    with pytest.raises(ha.WeightsError, match="does not exist"):
        ha.load_maps(tmp_path / "missing.safetensors")
