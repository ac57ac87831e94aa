"""Issue 8: long decode runs: no memory growth beyond the caches, no drift between the signature cache and
the KV cache; many generate() calls in a row reuse nothing stale. Default: 2,000 steps; marked slow: 20,000."""
import gc
import os
import time

import pytest
import torch
from transformers import DynamicCache

import hashattention as ha
from conftest import tiny_model
from hashattention.core.maps import HashMaps
from hashattention.integration.compat import cache_kwarg
from hashattention.weights import maps_config_for


def _rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def decode_loop(steps, check_every):
    model = tiny_model("llama", layers=1, heads=2, kv_heads=1, head_dim=16, seed=2)
    maps = HashMaps.simhash(maps_config_for(model.config), seed=1)
    pol = ha.HashAttentionPolicy(maps, ha.Budget(heavy=8, sink=4, window=16))
    cache = DynamicCache()
    tok = torch.tensor([[5, 6, 7, 8]])
    t0 = time.time()
    with torch.no_grad(), ha.enable(model, pol, mode="everywhere") as h:
        out = model(input_ids=tok, **{cache_kwarg(model): cache}, use_cache=True)
        gc.collect()
        rss0, objs0 = _rss(), len(gc.get_objects())
        for i in range(steps):
            tok = out.logits[:, -1:].argmax(-1)
            out = model(input_ids=tok, **{cache_kwarg(model): cache}, use_cache=True)
            if (i + 1) % check_every == 0:
                keys = cache.layers[0].keys
                st = h.states[0]
                assert st["sig"].shape[2] == keys.shape[2] == st["seen"] == 4 + i + 1, "signature cache drift"
                assert torch.equal(st["sig"], maps.key_signature(0, keys)), "stale or shifted signatures"
                if i + 1 == check_every:  # baseline after warm-up (lazy imports, caches of transformers)
                    gc.collect()
                    rss0, objs0 = _rss(), len(gc.get_objects())
        gc.collect()
        grow = _rss() - rss0
        objs = len(gc.get_objects()) - objs0
        n = keys.shape[2]
    cache_bytes = n * (2 * 16 * 4 + 4)  # K, V fp32 + one int32 signature word, 1 layer, 1 KV head
    return {"steps": steps, "seconds": time.time() - t0, "rss_growth_mb": grow / 2**20,
            "cache_mb": cache_bytes / 2**20, "new_python_objects": objs}


def _check(r):
    print(r)
    # allocator slack: the caches are re-allocated by torch.cat each step; 64 MiB bounds any per-step leak
    assert r["rss_growth_mb"] < r["cache_mb"] * 4 + 64, r
    assert r["new_python_objects"] < 200, r


def test_decode_2000_steps_no_growth_no_drift():
    _check(decode_loop(2000, 250))


@pytest.mark.slow
def test_decode_20000_steps_no_growth_no_drift():
    _check(decode_loop(20000, 2000))


def test_many_generate_calls_reuse_nothing_stale():
    model = tiny_model("llama", seed=3)
    pol = ha.make_policy("simhash", ha.Budget(heavy=3, sink=2, window=3), model_config=model.config)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(3, 97, (2, 25), generator=g), torch.randint(3, 97, (1, 40), generator=g)
    gen = lambda x: model.generate(input_ids=x, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    with ha.enable(model, pol, mode="everywhere", chunk=8):
        first_a = gen(a)
        outs = [gen(b), gen(a), gen(b), gen(a[:, 5:]), gen(a)]
    with ha.enable(model, pol, mode="everywhere", chunk=8):
        fresh_b = gen(b)
    assert torch.equal(outs[1], first_a) and torch.equal(outs[4], first_a)
    assert torch.equal(outs[0], fresh_b) and torch.equal(outs[2], fresh_b)
