"""The fast decode engine: same tokens as Hugging Face, memory report arithmetic, bad input (CPU)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import engine_beside_hf, tiny_model
from hashattention import HashAttentionPolicy, enable
from hashattention.core.budget import Budget
from hashattention.core.maps import HashMaps
from hashattention.engine import CacheError, Generator, Transformer, UnsupportedModelError
from hashattention.engine.memory import (cache_bytes, check_fits, kv_bytes_per_token, largest_batch,
                                         memory_report, parse_tokens, resolve_shape, signature_bytes_per_token)
from hashattention.weights import maps_config_for

HERE = os.path.dirname(__file__)


def _hf_greedy(hf, ids, n):
    return hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)[:, ids.shape[1]:]


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_dense_and_full_budget_match_hf(kind):
    hf = tiny_model(kind, layers=2)
    torch.manual_seed(1)
    ids = torch.randint(3, 97, (2, 40))
    ref = _hf_greedy(hf, ids, 12)
    m = Transformer.from_hf(hf)
    m.setup_caches(2, 64, maps=HashMaps(maps_config_for(hf.config)), budget=Budget(heavy=1.0, sink=4, window=4))
    # prefill in chunks of 16: the masked later-chunk path is exercised too
    assert torch.equal(Generator(m).generate(ids, 12, mode="dense", prefill_chunk=16), ref)
    assert torch.equal(Generator(m).generate(ids, 12, mode="hash", prefill_chunk=16), ref)


def test_tied_embeddings_match_hf():
    import transformers
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=96, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=6, num_key_value_heads=2, head_dim=16,
                                   tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(3, 97, (1, 30))
    m = Transformer.from_hf(hf)
    assert m.lm_head.weight is m.embed.weight
    m.setup_caches(1, 40)
    assert torch.equal(Generator(m).generate(ids, 8), _hf_greedy(hf, ids, 8))


def test_hash_matches_hf_integration_small_budget():
    """With a budget far below the context the engine reads exactly what the HF integration reads."""
    hf, ids, bud, maps, m = engine_beside_hf()
    with enable(hf, HashAttentionPolicy(maps, bud, per_group=True), mode="decode"):
        ref = _hf_greedy(hf, ids, 16)
    dense = _hf_greedy(hf, ids, 16)
    assert not torch.equal(ref, dense)  # the selection matters here
    assert torch.equal(Generator(m).generate(ids, 16, mode="hash"), ref)


def test_select_matches_core_selection():
    """The engine's index lists == core.selection.select on match scores, incl. short contexts and ties."""
    from hashattention.core.selection import causal_valid, select
    from hashattention.core.signatures import match_scores
    hf = tiny_model("llama", layers=1, heads=4, kv_heads=2)
    m = Transformer.from_hf(hf)
    torch.manual_seed(0)
    for length, bud in [(300, Budget(heavy=1 / 8, sink=8, window=8)), (12, Budget(heavy=1 / 2, sink=8, window=8)),
                        (200, Budget(heavy=20, sink=0, window=4))]:
        m.setup_caches(1, 320, maps=HashMaps(maps_config_for(hf.config)), budget=bud)
        sig = torch.randint(-2 ** 31, 2 ** 31 - 1, (1, 2, 5, 1), dtype=torch.int32)[:, :, torch.randint(0, 5, (320,))]
        q_sig = torch.randint(-2 ** 31, 2 ** 31 - 1, (1, 4, 1), dtype=torch.int32)
        idx, counts = m.select(q_sig, sig, torch.tensor([length]))
        scores = match_scores(q_sig.view(1, 2, 2, 1), sig).sum(2, keepdim=True)  # [1, 2, 1, 320] per group
        keep = select(scores, causal_valid(1, 1, 320)[..., :320] & (torch.arange(320) < length), bud,
                      max_score=64)
        got = torch.zeros(1, 2, 321, dtype=torch.bool)  # column 320 collects the empty slots (-1)
        got.scatter_(-1, torch.where(idx >= 0, idx.long(), 320), True)
        assert torch.equal(got[..., :320], keep[:, :, 0]), (length, bud)
        assert (idx >= 0).sum(-1).eq(keep[:, :, 0].sum(-1)).all()  # no index twice
        assert idx.shape[-1] == bud.total(320) and counts.tolist() == [int(keep[0, 0, 0].sum())]


def test_engine_triton_kernels():
    """Triton kernels against their references and the HF integration: compiled on a GPU, else in a fresh process
    under TRITON_INTERPRET=1 on the CPU."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    r = subprocess.run([sys.executable, os.path.join(HERE, "engine_triton_check.py")], env=env,
                       capture_output=True, text=True, timeout=300, cwd=os.path.dirname(HERE))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "ALL OK" in r.stdout


# -- memory report -------------------------------------------------------------------------------------
def test_memory_report_llama8b_by_hand():
    r = memory_report("llama-3.1-8b", "128K", 4)
    # 2 (K,V) * 32 layers * 8 KV heads * 128 dims * 2 bytes; 32 layers * 8 heads * 4 bytes
    assert r["kv_bytes_per_token"] == 131072 and r["signature_bytes_per_token"] == 1024
    assert r["kv_bytes"] == 131072 * 131072 * 4 == 64 * 2 ** 30
    assert r["signature_bytes"] == 1024 * 131072 * 4 == 512 * 2 ** 20
    assert r["signature_to_kv_ratio"] == 1 / 128
    assert r["params"] == 8_030_261_248  # Llama-3.1-8B's published parameter count
    rq = memory_report("llama-3.1-8b", 1000, 1, key_heads="q")
    assert rq["signature_bytes_per_token"] == 32 * 32 * 4


def test_memory_report_default_and_config_file(tmp_path):
    r = memory_report("default", 8192, 2)
    # SmolLM2-135M: 30 layers, 3 KV heads, head_dim 64
    assert r["kv_bytes_per_token"] == 2 * 30 * 3 * 64 * 2 == 23040
    assert r["signature_bytes_per_token"] == 30 * 3 * 4 == 360
    assert r["signature_bytes"] == 360 * 8192 * 2
    assert r["signature_to_kv_ratio"] == 1 / 64
    cfg = {"model_type": "llama", "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2,
           "hidden_size": 256, "intermediate_size": 512, "vocab_size": 1000}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    r = memory_report(str(tmp_path), 100, 1, dtype="float32")
    assert r["head_dim"] == 32 and r["kv_bytes_per_token"] == 2 * 4 * 2 * 32 * 4
    assert memory_report(str(tmp_path / "config.json"), 100, 1)["signature_bytes_per_token"] == 4 * 2 * 4
    r = memory_report("llama-3.1-8b", "128K", 4, gpu_memory=80 * 2 ** 30)
    assert r["max_batch_dense"] == 3 and not r["fits"]


def test_memory_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a preset"):
        resolve_shape("no-such-model")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "x", "hidden_size": 8}))
    with pytest.raises(ValueError, match="lacks"):
        resolve_shape(str(tmp_path))
    with pytest.raises(ValueError, match="token count"):
        parse_tokens("lots")
    assert parse_tokens("16K") == 16384 and parse_tokens("128k") == 131072


def test_memory_cli(capsys):
    from hashattention.cli.main import main
    assert main(["memory", "llama-3.1-8b", "--context", "32K", "--batch", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["kv_bytes"] == 131072 * 32768 * 2 and out["signature_bytes"] == 1024 * 32768 * 2
    assert main(["memory", "nope"]) == 2
    assert "neither a preset" in capsys.readouterr().err


# -- bad input -----------------------------------------------------------------------------------------
def test_context_longer_than_cache_and_batch_mismatch():
    hf = tiny_model("llama", layers=1)
    m = Transformer.from_hf(hf)
    m.setup_caches(1, 32)
    g = Generator(m)
    with pytest.raises(CacheError, match="cache holds 32"):
        g.generate(torch.randint(3, 97, (1, 30)), 8)
    with pytest.raises(CacheError, match="leaves no room"):
        m.prefill(torch.randint(3, 97, (1, 40)))
    with pytest.raises(CacheError, match="batch 1"):
        g.generate(torch.randint(3, 97, (2, 10)), 4)
    with pytest.raises(ValueError, match="needs maps"):
        g.generate(torch.randint(3, 97, (1, 10)), 4, mode="hash")
    with pytest.raises(CacheError, match="setup_caches"):
        Generator(Transformer.from_hf(hf))


def test_batch_that_does_not_fit_is_refused_before_allocating():
    c = resolve_shape("llama-3.1-8b")
    need = cache_bytes(c, 4, 131072)
    assert need > 64 * 2 ** 30
    with pytest.raises(CacheError, match="needs .* GiB but only"):
        check_fits(need, "cpu", free=62 * 2 ** 30)
    assert largest_batch(c, 131072, free_bytes=62 * 2 ** 30) == 3
    assert kv_bytes_per_token(c) == 131072 and signature_bytes_per_token(c) == 1024


def test_unsupported_model_type():
    hf = tiny_model("qwen3", layers=1)
    with pytest.raises(UnsupportedModelError, match="supports model types"):
        Transformer.from_hf(hf)
