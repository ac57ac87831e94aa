"""Issue 25: K/V in host memory, signatures on the GPU (engine offload="host"), on the CPU.

A plain CPU tensor stands in for pinned memory (the private ``_host_device`` hook); the Triton gather kernel and
the engine's Triton path run under TRITON_INTERPRET=1 in a fresh process (tests/offload_triton_check.py);
tests/gpu_offload_check.py repeats the checks on CUDA with pinned memory.
"""
import json
import os
import random
import subprocess
import sys

import pytest
import torch

from conftest import tiny_model
from hashattention.core.budget import Budget
from hashattention.core.maps import HashMaps
from hashattention.engine import CacheError, Generator, Transformer
from hashattention.engine.offload import HostKV
from hashattention.weights import maps_config_for

HERE = os.path.dirname(__file__)


@torch.no_grad()
def _greedy(m, ids, n, mode="hash", prefill=True):
    """Greedy decoding step by step: (tokens [B, n], logits [n, B, V]). prefill=False: the caches already hold
    the prompt (from an earlier call; its decoded positions are overwritten)."""
    logits = m.prefill(ids, chunk=512) if prefill else m._prompt_logits
    m._prompt_logits = logits
    pos = torch.tensor([ids.shape[1]])
    toks, lg = [], []
    tok = logits.argmax(-1)
    for _ in range(n):
        toks.append(tok)
        logits = m.decode_step(tok, pos, mode)
        lg.append(logits)
        tok = logits.argmax(-1)
        pos += 1
    return torch.stack(toks, 1), torch.stack(lg)


def test_default_model_offload_equals_gpu_path():
    """Default model, maps, hash mode, a 1K-token prompt and a small heavy budget: the all-host offload path
    gives the on-GPU path's tokens, and its logits within float rounding (the working set sums in another order)."""
    import hashattention as ha
    model, tok, _ = ha.load_model()
    maps = ha.load_default_maps(model)
    text = ("The pass key is 71. Remember it. The grass is green and the sky is blue; the river flows to the sea. "
            * 80)
    ids = tok(text, return_tensors="pt").input_ids[:, :1024]
    assert ids.shape[1] == 1024
    m = Transformer.from_hf(model)
    bud = Budget(heavy=24, sink=16, window=16)
    m.setup_caches(1, 1060, maps=maps, budget=bud)
    ref, ref_logits = _greedy(m, ids, 16)
    dense, _ = _greedy(m, ids, 16, mode="dense", prefill=False)  # same prompt in the caches: no second prefill
    assert not torch.equal(ref, dense)  # the heavy selection matters at this budget
    m.setup_caches(1, 1060, maps=maps, budget=bud, offload="host", gpu_layers=0, _host_device="cpu")
    assert m.k_cache.shape[0] == 0 and len(m.host_kv.host_layers) == m.c.num_layers
    got, got_logits = _greedy(m, ids, 16)
    assert torch.equal(got, ref)
    assert (got_logits - ref_logits).abs().max() < 1e-3
    st = m.offload_stats()
    assert st["lookups"] == 16 * m.c.num_layers * m.c.num_kv_heads * 24  # every step reads 24 heavy rows per head
    assert 0 < st["hits"] < st["lookups"] and st["bytes_fetched"] == st["rows_fetched"] * 2 * m.c.head_dim * 4


def _on_gpu_caches(layers: int, prompt: int, max_len: int, heavy: float):
    """A tiny engine with its caches on the device (the reference), random maps and two prompts."""
    hf = tiny_model("llama", layers=layers)
    torch.manual_seed(3)
    ids = torch.randint(3, 97, (2, prompt))
    bud = Budget(heavy=heavy, sink=4, window=4)
    maps = HashMaps(maps_config_for(hf.config))
    m = Transformer.from_hf(hf)
    m.setup_caches(2, max_len, maps=maps, budget=bud)
    return m, maps, bud, ids


@pytest.mark.parametrize("gpu_layers,read", [(0, "gather"), (1, "gather"), (2, "gather"), (1, "direct")])
def test_tiered_placement_equals_all_gpu(gpu_layers, read):
    """Some layers on the GPU, the rest on the host: the same tokens as all-GPU, hash and dense, through the
    Generator, with prefill in chunks (the later chunks attend over host memory). read="direct": no row cache,
    attention reads the selected host rows where they are."""
    m, maps, bud, ids = _on_gpu_caches(layers=3, prompt=120, max_len=160, heavy=1 / 8)
    ref = {mode: Generator(m).generate(ids, 24, mode=mode, prefill_chunk=50) for mode in ("hash", "dense")}
    m.setup_caches(2, 160, maps=maps, budget=bud, offload="host", gpu_layers=gpu_layers, _host_device="cpu",
                   row_cache=40, offload_read=read)
    assert m.k_cache.shape[0] == gpu_layers and m.host_kv.host_layers == list(range(gpu_layers, 3))
    for mode in ("dense", "hash"):
        assert torch.equal(Generator(m).generate(ids, 24, mode=mode, prefill_chunk=50), ref[mode]), mode
    st = m.offload_stats()
    if read == "direct":  # every selected row of every host layer crossed: sink + window + heavy(length) each
        want = sum(min(L, 8 + L // 8) for L in range(121, 121 + 23)) * 2 * 2 * (3 - gpu_layers)
        assert not hasattr(m.host_kv, "ws_k") and st["hits"] == 0 and st["lookups"] == want
    elif gpu_layers < 3:
        assert 0 < st["hits"] < st["lookups"]


def test_steps_run_ahead_and_taken_back_leave_the_tokens():
    """A CUDA graph's capture runs decode steps ahead, then takes them back (Generator._warmup): with the K/V in
    host memory those steps overwrite ring slots of tokens still in the window, so the ring is restored too (on
    an H100 the offload tokens differed from the on-GPU ones from the second token before this)."""
    m, maps, bud, ids = _on_gpu_caches(layers=2, prompt=48, max_len=64, heavy=1 / 4)
    ref = Generator(m).generate(ids, 8, mode="hash", prefill_chunk=32)
    m.setup_caches(2, 64, maps=maps, budget=bud, offload="host", gpu_layers=0, _host_device="cpu")
    gen = Generator(m)
    gen._start(ids, 8, "hash", 32)
    for _ in range(7):  # a warm-up before every step: the worst case
        gen._warmup("hash", steps=3)
        gen.run_steps(1, "hash")
    assert torch.equal(gen.out[:, :8], ref)


class BruteCache:
    """The row cache of one (layer, sequence, KV head) in plain Python: C slots; a step's heavy tokens that are
    resident are hits; misses (in ascending token order) take the slots not selected this step, least recently
    selected first (ties: the slot of the lower token, then the lower slot)."""

    def __init__(self, c):
        self.tok, self.last = [-1] * c, [-1] * c

    def step(self, heavy, t):
        hits = [p for p in heavy if p in self.tok]
        used = {self.tok.index(p) for p in hits}
        free = sorted((s for s in range(len(self.tok)) if s not in used), key=lambda s: (self.last[s], self.tok[s], s))
        for p, s in zip([p for p in heavy if p not in self.tok], free):
            self.tok[s] = p
        for p in heavy:
            self.last[self.tok.index(p)] = t
        return len(hits)


@pytest.mark.parametrize("factor", [1, 2])
def test_row_cache_bookkeeping_against_brute_force(factor):
    """Random selections step after step: the working set holds exactly the selected tokens (their rows), the hit
    counts and the slot contents equal a brute-force model of the cache, the residency map is its inverse."""
    b, h, s, d, sink, window, heavy = 2, 3, 300, 8, 4, 8, 12
    c = factor * heavy
    hk = HostKV(1, [0], b, s, h, d, torch.float32, "cpu", sink, window, c, hash_mode=True)
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(b, h, s, d, generator=g)
    start = 100
    hk.write_chunk(0, 0, rows[:, :, :start], rows[:, :, :start] * 2)
    brute = [[BruteCache(c) for _ in range(h)] for _ in range(b)]
    rng = random.Random(0)
    k = sink + window + heavy
    total_hits = 0
    for step in range(40):
        pos = start + step
        length = torch.tensor([pos + 1])
        hk.write_token(0, rows[:, :, pos], rows[:, :, pos] * 2, torch.tensor([pos]), hk.ring_slot(torch.tensor([pos])))
        idx = torch.full((b, h, k), -1, dtype=torch.int32)
        for bi in range(b):
            for hj in range(h):
                pool = list(range(sink, sink + 30)) + rng.sample(range(sink, pos + 1 - window), 20)
                n = rng.randint(0, heavy)
                hv = sorted(set(rng.sample(pool, n)))
                sel = sorted(set(range(sink)) | set(range(pos + 1 - window, pos + 1)) | set(hv))
                idx[bi, hj, :len(sel)] = torch.tensor(sel, dtype=torch.int32)
                total_hits += brute[bi][hj].step(hv, pos + 1)
        widx = hk.fetch(0, idx, length)
        assert torch.equal(hk.working_tokens(0, widx, length), idx.long())
        live = idx >= 0
        wk = hk.ws_k[0].gather(2, widx.long().clamp_min(0)[..., None].expand(-1, -1, -1, d))
        want = rows.gather(2, idx.long().clamp_min(0)[..., None].expand(-1, -1, -1, d))
        assert torch.equal(wk[live], want[live])
        wv = hk.ws_v[0].gather(2, widx.long().clamp_min(0)[..., None].expand(-1, -1, -1, d))
        assert torch.equal(wv[live], 2 * want[live])
        assert hk.stats[1].item() == total_hits
        assert [[x.tok for x in r] for r in brute] == hk.slot_tok[0, :, :, :c].tolist()
        res = hk.res[0, :, :, :s].long()
        for bi in range(b):
            for hj in range(h):
                st = hk.slot_tok[0, bi, hj, :c]
                assert torch.equal(res[bi, hj][st[st >= 0].long()], torch.nonzero(st >= 0)[:, 0])
                assert int((res[bi, hj] >= 0).sum()) == int((st >= 0).sum())
    assert 0 < total_hits < hk.stats[0].item()


def test_offload_triton_path_in_interpreter():
    """The gather kernel against its reference on random inputs, and the engine's Triton path with offload,
    under TRITON_INTERPRET=1 in a fresh process (compiled on the GPU: tests/gpu_offload_check.py)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, os.path.join(HERE, "offload_triton_check.py")], env=env,
                       capture_output=True, text=True, timeout=300, cwd=os.path.dirname(HERE))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "ALL OK" in r.stdout


# -- bad input ------------------------------------------------------------------------------------------
def _model():
    hf = tiny_model("llama", layers=2)
    return Transformer.from_hf(hf), HashMaps(maps_config_for(hf.config))


def test_offload_refuses_bad_input_before_allocating():
    m, maps = _model()
    bud = Budget(heavy=1 / 4, sink=4, window=4)
    with pytest.raises(CacheError, match="needs a CUDA device"):  # the public API without CUDA
        m.setup_caches(1, 64, maps=maps, budget=bud, offload="host")
    with pytest.raises(CacheError, match=r"needs 0\.03 MiB of host memory, 0\.00 MiB are available"):
        m.setup_caches(1, 64, maps=maps, budget=bud, offload="host", host_memory=1000, _host_device="cpu")
    with pytest.raises(CacheError, match="more than the GPU row cache stages"):
        m.setup_caches(1, 64, maps=maps, budget=bud, offload="host", row_cache=8, _host_device="cpu")
    with pytest.raises(ValueError, match="needs maps"):
        m.setup_caches(1, 64, offload="host", _host_device="cpu")
    with pytest.raises(ValueError, match="offload must be None or 'host'"):
        m.setup_caches(1, 64, maps=maps, budget=bud, offload="disk", _host_device="cpu")
    with pytest.raises(ValueError, match="gpu_layers"):
        m.setup_caches(1, 64, maps=maps, budget=bud, offload="host", gpu_layers=5, _host_device="cpu")
    assert m.k_cache is None and m.host_kv is None  # nothing half-allocated
    # the exact need in the message: 2 layers x 2 (K, V) x 2 KV heads x 1M tokens x 16 dims x 4 bytes = 0.5 GiB
    with pytest.raises(CacheError, match=r"needs 0\.50 GiB of host memory, 0\.25 GiB are available"):
        m.setup_caches(1, 2 ** 20, maps=maps, budget=bud, offload="host", host_memory=2 ** 28, _host_device="cpu")
    assert m.k_cache is None and m.host_kv is None
    m.setup_caches(1, 64, maps=maps, budget=bud, offload="host", _host_device="cpu")
    with pytest.raises(CacheError, match="needs setup_caches again"):  # a larger heavy budget than staged
        m.set_budget(Budget(heavy=1.0, sink=4, window=4))  # 64 heavy rows, 2 x 16 slots


def test_dense_baseline_streams_host_rows():
    """Without maps offload is the dense baseline only: dense_baseline=True, mode dense, the on-GPU tokens."""
    m, _ = _model()
    ids = torch.randint(3, 97, (1, 40), generator=torch.Generator().manual_seed(1))
    m.setup_caches(1, 64)
    ref = Generator(m).generate(ids, 10)
    m.setup_caches(1, 64, offload="host", dense_baseline=True, _host_device="cpu")
    assert m.host_kv is not None and not m.host_kv.hash_mode and m.offload_stats() == {}
    assert torch.equal(Generator(m).generate(ids, 10), ref)
    with pytest.raises(ValueError, match="needs maps"):
        Generator(m).generate(ids, 10, mode="hash")


# -- memory report ----------------------------------------------------------------------------------------
def test_memory_report_offload(capsys):
    from hashattention.cli.main import main
    from hashattention.engine.memory import GIB, memory_report, offload_plan, resolve_shape
    r = memory_report("llama-3.1-8b", "128K", 8, gpu_memory=80 * GIB, host_memory=128 * GIB)
    p = r["placements"]
    assert not p["dense"]["fits"] and not p["hash_gpu"]["fits"] and p["hash_offload"]["fits"]
    assert r["max_batch_dense"] == 3 and r["max_batch_offload"] >= 2 * r["max_batch_dense"]
    off = p["hash_offload"]
    # the host holds exactly the K/V of the layers that are not on the GPU: 128 KiB per token over 32 layers
    assert off["host_bytes"] == (32 - off["gpu_layers"]) * 4096 * 131072 * 8 and 0 < off["gpu_layers"] < 32
    assert off["row_cache"] == 2 * 4096  # twice 1/32 of 128K
    r = memory_report("llama-3.1-8b", "512K", 1, gpu_memory=80 * GIB, host_memory=128 * GIB)
    assert not r["placements"]["hash_gpu"]["fits"] and r["placements"]["hash_offload"]["fits"]
    # no GPU room for K/V at all: everything on the host, and too little host memory is said so
    c = resolve_shape("llama-3.1-8b")
    plan = offload_plan(c, 1, 524288, gpu_free=18 * GIB, host_free=60 * GIB, weights=15 * GIB, row_cache=2048)
    assert plan["gpu_layers"] == 0 and plan["host_bytes"] == 64 * GIB and not plan["fits"]
    assert main(["memory", "llama-3.1-8b", "--context", "512K", "--gpu-memory", "80GiB", "--host-memory",
                 "128GiB", "--heavy", "2048"]) == 0
    out = capsys.readouterr().out
    assert "HashAttention, K/V offloaded   fits" in out and "4096 heavy-row slots" in out
    assert "HashAttention on the GPU       does NOT fit" in out


# -- the benchmark's report (CPU, tiny sizes: the numbers mean nothing, the format and the counting do) -------
def test_bench_offload_report_format(tmp_path, monkeypatch):
    import json

    from hashattention.cli import main as cli
    from hashattention.engine import config
    monkeypatch.setitem(config.PRESETS, "tiny-test", dict(
        model_type="llama", vocab_size=97, hidden_size=96, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, max_position_embeddings=4096,
        tie_word_embeddings=False, rope_theta=10000.0))
    monkeypatch.delenv("OUT", raising=False)
    assert cli.main(["bench", "decode", "--offload", "host", "--device", "cpu", "--models", "tiny-test",
                     "--contexts", "200", "--batches", "1", "--heavy", "16", "--steps", "2", "--warmup", "1",
                     "--sink", "8", "--window", "8", "--gpu-layers", "1", "--offload-read", "gather,direct",
                     "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "offload_cpu.json").read_text())
    keys = {"context", "batch", "mode", "heavy", "tok_s", "pcie_bytes_per_step", "hit_rate", "gpu_peak_gib",
            "host_gib", "device"}
    rows = {r["mode"] + ("-direct" if r.get("read") == "direct" else ""): r for r in res["rows"]}
    assert set(rows) == {"hash-offload", "hash-offload-direct", "dense-offload", "dense-gpu", "hash-gpu"}
    direct = rows.pop("hash-offload-direct")  # every selected row of the host layer, every step, no hits
    assert direct["hit_rate"] == 0 and direct["pcie_bytes_per_step"] == 2 * (8 + 8 + 16) * 128
    for r in rows.values():
        assert keys <= set(r) and r["context"] == 200 and r["batch"] == 1 and r["tok_s"] > 0, r
    off, dense = rows["hash-offload"], rows["dense-offload"]
    # 1 of 2 layers on the host, 2 KV heads, 16 dims, fp32 on the CPU: a row is 128 bytes (K and V)
    assert off["gpu_layers"] == 1 and off["host_gib"] == 2 * 1 * 2 * (200 + 2 + 1 + 8) * 16 * 4 / 2 ** 30
    assert dense["pcie_bytes_per_step"] == 1 * 2 * (200 + 1) * 128  # every host row, every step
    assert off["heavy_rows_per_step"] == 1 * 2 * 16 and 0 <= off["hit_rate"] <= 1
    assert off["pcie_bytes_per_step"] == pytest.approx((1 - off["hit_rate"]) * off["heavy_rows_per_step"] * 128)
    assert set(off["breakdown_ms"]) == {"rest_of_model", "attention_working_set", "selection_and_transfer"}
    md = (tmp_path / "offload_cpu.md").read_text()
    assert "| 200 | 1 | hash-offload | 16 | 32 | 1 |" in md and "dense-offload" in md and "format check only" in md
    pytest.importorskip("matplotlib")
    assert (tmp_path / "offload_cpu.png").stat().st_size > 0


def test_generate_offload_needs_cuda(capsys, monkeypatch):
    from hashattention.cli import generate as gen_cli
    from hashattention.cli import main as cli
    for name in ("load_model", "load_tokenizer"):
        monkeypatch.setattr(gen_cli, name, lambda *a: pytest.fail("loaded the model before refusing"))
    assert cli.main(["generate", "--prompt", "hi", "--offload", "host", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "--offload host" in err and "needs CUDA" in err


def test_synthetic_fill_handles_empty_and_odd_sizes():
    """The benchmark's cache filler: an empty tensor (no host layer: every layer fitted on the card, as the GPU
    check found at 16K) is left alone; a tensor not a multiple of the block is filled to its end."""
    from hashattention.benchmarks.offload import _fill
    _fill(torch.empty(0), torch.Generator().manual_seed(0))
    t = torch.zeros(1000)
    _fill(t, torch.Generator().manual_seed(0), block=300)
    assert (t != 0).all() and torch.equal(t[:300], t[300:600])


def test_query_drift_flips_the_asked_fraction_of_bits():
    """bench --query-drift: each step's synthetic query signatures differ from the step before in about the
    asked fraction of their bits, per layer; off again, the model's own signatures are used."""
    m, maps = _model()
    m.setup_caches(2, 64, maps=maps, budget=Budget(heavy=1 / 4, sink=4, window=4))
    m.set_query_drift(0.1, torch.Generator().manual_seed(0))
    before = m._q_drift[1].clone()
    a = m._drifted_q_sig(1).clone()
    assert torch.equal(m._q_drift[1][0], before[0])  # the other layer did not move
    flipped = [bin(x & 0xFFFFFFFF).count("1") for x in (a ^ before[1]).view(-1).tolist()]
    assert 0.06 < sum(flipped) / (32 * len(flipped)) < 0.14, sum(flipped) / (32 * len(flipped))
    ids = torch.randint(3, 97, (2, 20), generator=torch.Generator().manual_seed(1))
    Generator(m).generate(ids, 3, mode="hash")  # decode steps run on the drifting signatures
    m.set_query_drift(None)
    assert m._q_drift is None


def test_fused_fetch_self_check_falls_back_on_a_wrong_or_failing_kernel(monkeypatch):
    """A GPU's first offload runs the fused fetch against the reference on a tiny state: a kernel that disagrees
    (or cannot compile on that Triton) is reported and the torch-ops fetch is used instead."""
    from hashattention.engine import offload
    monkeypatch.setattr(offload, "_FETCH_OK", {})
    assert offload.fused_fetch_works("cpu", 16, torch.float32, "split")  # on the CPU both paths are the reference
    real = HostKV.fetch

    def wrong(self, hi, idx, length):  # a "kernel" that gets one slot wrong
        out = real(self, hi, idx, length)
        return out if self.fetch_mode == "reference" else torch.where(out == out.max(), out - 1, out)

    def failing(self, hi, idx, length):
        if self.fetch_mode != "reference":
            raise RuntimeError("triton: cannot compile")
        return real(self, hi, idx, length)

    for fake, why in ((wrong, "disagrees"), (failing, "cannot compile")):
        monkeypatch.setattr(offload, "_FETCH_OK", {})
        monkeypatch.setattr(HostKV, "fetch", fake)
        with pytest.warns(RuntimeWarning, match=why):
            assert not offload.fused_fetch_works("cpu", 16, torch.float32, "fused")
        assert offload._FETCH_OK[("cpu", 16, "torch.float32", "fused")] is False  # checked once per process


def test_bench_fetch_reaches_the_hit_rate_it_asks_for_and_refuses_bad_input(tmp_path):
    """`hashattention bench fetch` on the CPU (the torch-ops fetch): steps whose heavy tokens are 3/4 the step
    before's hit 3/4 of the time once the cache is warm; its files are written; bad input is named."""
    import argparse
    from hashattention.benchmarks import fetch
    p = argparse.ArgumentParser()
    fetch.add_arguments(p)
    args = p.parse_args(["--context", "4K", "--batch", "2", "--kv-heads", "2", "--head-dim", "16", "--heavy", "64",
                         "--sink", "4", "--window", "4", "--modes", "reference", "--steps", "3", "--warmup", "3",
                         "--device", "cpu", "--out", str(tmp_path), "--layouts", "interleaved,separate"])
    assert fetch.run(args) == 0
    res = json.loads((tmp_path / "fetch_cpu.json").read_text())
    assert [r["layout"] for r in res["rows"]] == ["interleaved", "separate"]
    for row in res["rows"]:
        assert row["hit_rate"] == pytest.approx(0.75, abs=0.01) and row["k"] == 72 and row["ms_per_layer"] > 0
        assert row["miss_bytes_per_layer"] == pytest.approx(2 * 2 * 16 * 2 * 16 * 4, rel=0.05)  # 16 misses a row
    md = (tmp_path / "fetch_cpu.md").read_text()
    assert "| interleaved | reference |" in md and "reference: interleaved layout against separate" in md
    # auto's rule at the measured shapes: 512K x 1 at heavy 2048 and 1/32, 128K x 10 at 1/32 (8 KV heads)
    from hashattention.engine.offload import fused_gather
    assert fused_gather(2304, 8) and not fused_gather(16640, 8) and fused_gather(4352, 80)
    for bad, msg in [(["--modes", "fast"], "unknown"), (["--hit", "1"], "--hit"), (["--context", "200"], "too few"),
                     (["--row-cache", "0.5"], "at least the heavy budget"), (["--modes", "fused"], "Triton"),
                     (["--layouts", "rows"], "--layouts")]:
        a = p.parse_args(["--context", "4K", "--heavy", "64", "--batch", "1", "--kv-heads", "1", "--head-dim", "16",
                          "--device", "cpu", "--modes", "reference"] + bad)
        with pytest.raises(ValueError, match=msg):
            fetch.measure(a)


def test_host_layouts_hold_the_same_rows_and_refuse_unknown(monkeypatch):
    """A token's K and V side by side ([..., S, 2, D], the default with hashing) or two tensors: the same fetched
    rows, steps and counters; k_host and v_host are views of one tensor with equal strides; the host bytes are
    the same; an unknown layout is named."""
    b, h, s, d, sink, window, heavy = 2, 2, 200, 8, 4, 4, 16
    kvs = {lay: HostKV(1, [0], b, s, h, d, torch.float32, "cpu", sink, window, 2 * heavy, hash_mode=True, layout=lay)
           for lay in ("interleaved", "separate")}
    il, sep = kvs["interleaved"], kvs["separate"]
    assert HostKV(1, [0], b, s, h, d, torch.float32, "cpu", sink, window, 32, hash_mode=True).layout == "interleaved"
    assert HostKV(1, [0], b, s, h, d, torch.float32, "cpu", sink, window, 0, hash_mode=False).layout == "separate"
    assert il.k_host.stride() == il.v_host.stride() and il.v_host.data_ptr() - il.k_host.data_ptr() == d * 4
    assert len(il.host_tensors()) == 1 and len(sep.host_tensors()) == 2 and il.host_bytes() == sep.host_bytes()
    g = torch.Generator().manual_seed(1)
    rows = torch.randn(b, h, s, d, generator=g)
    for hk in kvs.values():
        hk.write_chunk(0, 0, rows[:, :, :150], -rows[:, :, :150])
    assert torch.equal(il.k_host[0], sep.k_host[0]) and torch.equal(il.v_host[0], sep.v_host[0])
    for step in range(6):
        pos = 150 + step
        length, one = torch.tensor([pos + 1]), torch.tensor([pos])
        far = torch.stack([torch.randperm(pos + 1 - window - sink, generator=g)[:heavy] + sink for _ in range(b * h)])
        idx = torch.cat([torch.arange(sink).expand(b * h, sink), far.sort(-1).values,
                         torch.arange(pos + 1 - window, pos + 1).expand(b * h, window)], 1).view(b, h, -1).int()
        out = []
        for hk in kvs.values():
            hk.write_token(0, rows[:, :, pos], -rows[:, :, pos], one, hk.ring_slot(one))
            w = hk.fetch(0, idx, length)
            sel = w.long()[..., None].expand(-1, -1, -1, d)
            out.append((w, hk.ws_k[0].gather(2, sel), hk.ws_v[0].gather(2, sel), hk.stats.clone()))
        for a, r in zip(*out):
            assert torch.equal(a, r), step
        want = rows.gather(2, idx.long()[..., None].expand(-1, -1, -1, d))
        assert torch.equal(out[0][1], want) and torch.equal(out[0][2], -want)
    monkeypatch.setenv("HASHATTENTION_OFFLOAD_LAYOUT", "rows")
    with pytest.raises(ValueError, match="HASHATTENTION_OFFLOAD_LAYOUT"):
        HostKV(1, [0], b, s, h, d, torch.float32, "cpu", sink, window, 32, hash_mode=True)



def test_fetch_self_check_ignores_torch_default_device():
    """The once-per-process check draws its random state on the CPU whatever torch's default device is (a user's
    torch.set_default_device("cuda") made it fail and fall back to the slow torch-ops fetch, found on an H100)."""
    import warnings
    from hashattention.engine import offload as off
    off._FETCH_OK.clear()
    torch.set_default_device("meta")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert off.fused_fetch_works(torch.device("cpu"), 16, torch.float32, "reference")
    finally:
        torch.set_default_device("cpu")
        off._FETCH_OK.clear()
