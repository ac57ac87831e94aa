"""Issue 27.2 and 27.3: generate() settings the Hugging Face path cannot follow are refused with an error that
names the alternative (beam search, static caches), and the per-layer state follows the cache object itself,
whatever keyword (``cache`` or ``past_key_values``) the installed transformers passes it by."""
import copy
import inspect

import pytest
import torch
from packaging.version import Version

import hashattention as ha
from conftest import tiny_model
from hashattention.core.maps import HashMaps
from hashattention.integration.compat import cache_kwarg, output_cache
from hashattention.weights import maps_config_for


@pytest.fixture(scope="module")
def default_model():
    model, tok, _ = ha.load_model("default", device="cpu")
    return model, tok


def _prompt(tok):
    return tok("The capital of France is", return_tensors="pt")


def _hash_policy(model, heavy=4096):
    return ha.HashAttentionPolicy(ha.load_default_maps(model), ha.Budget(heavy=heavy, sink=4, window=4))


# ------------------------------------------------------------------------------------ beam search, static
def test_beam_search_refused_naming_the_alternative(default_model):
    model, tok = default_model
    batch = _prompt(tok)
    with ha.enable(model, _hash_policy(model, heavy=2)) as h:
        with pytest.raises(ha.UnsupportedGenerationError, match=r"beam search.*num_beams=1.*disable"):
            model.generate(**batch, max_new_tokens=2, do_sample=False, num_beams=2)
        # the handle still works for what it supports (full budget: the same tokens as SDPA)
        h.policy = _hash_policy(model)
        out = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert torch.equal(out, model.generate(**batch, max_new_tokens=3, do_sample=False))


def test_static_cache_refused_naming_the_alternative(default_model):
    from transformers import StaticCache
    model, tok = default_model
    batch = _prompt(tok)
    with ha.enable(model, _hash_policy(model, heavy=2), mode="everywhere"):
        with pytest.raises(ha.UnsupportedGenerationError, match=r"static KV cache.*dynamic cache"):
            model.generate(**batch, max_new_tokens=2, do_sample=False, cache_implementation="static")
        cache = StaticCache(config=model.config, max_cache_len=32)
        with pytest.raises(ha.UnsupportedGenerationError, match="StaticCache"):
            model(**batch, **{cache_kwarg(model): cache}, use_cache=True)


def test_batch_reordering_refused_only_while_enabled():
    from transformers import DynamicCache
    model = tiny_model(layers=1)
    maps = HashMaps.simhash(maps_config_for(model.config), seed=1)
    cache = DynamicCache()
    ids = torch.randint(3, 97, (2, 12))
    with ha.enable(model, ha.HashAttentionPolicy(maps, ha.Budget(heavy=2, sink=1, window=2))):
        with torch.no_grad():
            model(input_ids=ids, **{cache_kwarg(model): cache}, use_cache=True)
        for name, arg in (("reorder_cache", torch.tensor([1, 0])), ("batch_select_indices", torch.tensor([0]))):
            with pytest.raises(ha.UnsupportedGenerationError, match=name):
                getattr(cache, name)(arg)
        other = copy.deepcopy(cache)  # not the cache the states belong to: reordering it is the copy's business
        other.reorder_cache(torch.tensor([1, 0]))
        assert torch.equal(other.layers[0].keys, cache.layers[0].keys.flip(0))
    keys = cache.layers[0].keys.clone()
    cache.reorder_cache(torch.tensor([1, 0]))  # disabled: the cache's own method again
    assert torch.equal(cache.layers[0].keys, keys.flip(0))


# ------------------------------------------------------------------------------------ the cache keyword
def _accepted_keywords(model):
    import transformers
    params = inspect.signature(model.forward).parameters
    kws = [k for k in ("cache", "past_key_values") if k in params]
    if "past_key_values" not in kws and Version(transformers.__version__) < Version("5.40"):
        kws.append("past_key_values")  # deprecated, still renamed to `cache` until 5.40
    return kws


def test_cache_kwarg_follows_the_forward_signature():
    model = tiny_model(layers=1)
    assert cache_kwarg(model) in inspect.signature(model.forward).parameters

    class Old(torch.nn.Module):
        def forward(self, input_ids=None, past_key_values=None, use_cache=None):
            pass

    class New(torch.nn.Module):
        def forward(self, input_ids=None, cache=None, use_cache=None):
            pass
    assert cache_kwarg(Old()) == "past_key_values" and cache_kwarg(New()) == "cache"
    out = model(input_ids=torch.tensor([[5, 6, 7]]), use_cache=True)
    assert output_cache(out).get_seq_length() == 3


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")
@pytest.mark.parametrize("keyword", ["cache", "past_key_values"])
def test_state_follows_a_new_cache_under_either_keyword(keyword):
    """A second, already prefilled cache must not inherit the signatures of the first one: the decode step on
    it reads the same tokens and gives the same logits as with a handle that never saw the first cache."""
    from transformers import DynamicCache
    model = tiny_model(layers=2)
    if keyword not in _accepted_keywords(model):
        pytest.skip(f"this transformers takes no {keyword!r}")
    maps = HashMaps.simhash(maps_config_for(model.config), seed=1)
    g = torch.Generator().manual_seed(0)
    p1, p2 = torch.randint(3, 97, (1, 40), generator=g), torch.randint(3, 97, (1, 40), generator=g)
    step = torch.tensor([[7]])
    c2 = DynamicCache()
    with torch.no_grad():
        model(input_ids=p2, **{cache_kwarg(model): c2}, use_cache=True)  # prefilled without hashattention

    def policy():
        return ha.HashAttentionPolicy(maps, ha.Budget(heavy=3, sink=2, window=2))
    with torch.no_grad():
        with ha.enable(model, policy()) as h:
            model(input_ids=p1, **{keyword: DynamicCache()}, use_cache=True)  # state: p1's 40 keys
            c = copy.deepcopy(c2)
            got = model(input_ids=step, **{keyword: c}, use_cache=True).logits
            sig = h.states[0]["sig"]
            assert torch.equal(sig, maps.key_signature(0, c.layers[0].keys)), "signatures of another cache"
        with ha.enable(model, policy()):
            want = model(input_ids=step, **{keyword: copy.deepcopy(c2)}, use_cache=True).logits
    assert torch.allclose(got, want, atol=1e-6)
