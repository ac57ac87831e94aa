"""Issue 24: the context mode (the authors' sparse-attention-hub protocol), the group selections (sum, max,
union, head) and the paired bootstrap intervals of the quality summary."""
import json

import numpy as np
import pytest
import torch

import hashattention as ha
from conftest import tiny_model
from hashattention.core.selection import select
from hashattention.evaluation.quality import bootstrap_ci, quality_rows, stratified_mean, write_summary

FULL = ha.Budget(heavy=10_000, sink=4, window=4)


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (3, 40), generator=g)
    attn = torch.ones_like(ids)
    attn[1, :7] = 0
    attn[2, :19] = 0
    ids[attn == 0] = 0
    return ids, attn


# ------------------------------------------------------------------------------------------ context mode
@pytest.mark.parametrize("selection", ["sum", "max", "union", "head"])
def test_context_mode_full_budget_equals_sdpa_on_left_padded_batch(selection):
    model = tiny_model("llama")
    ids, attn = _batch()
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=attn).logits
        gen_ref = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=6, do_sample=False)
    maps = ha.HashMaps.simhash(ha.maps_config_for(model.config))
    pol = ha.HashAttentionPolicy(maps, FULL, selection=selection)
    with ha.enable(model, pol, mode="context", context_length=[10, 12, 9]) as h, torch.no_grad():
        out = model(input_ids=ids, attention_mask=attn).logits
        h.reset()
        gen = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=6, do_sample=False)
    m = attn.bool()
    assert torch.allclose(out[m], ref[m], atol=1e-4)
    assert torch.equal(gen, gen_ref)


def test_context_rows_are_dense_and_question_rows_sparse():
    model = tiny_model("llama", seed=1)
    ids, attn = _batch(seed=2)
    ctx = [20, 15, 12]  # valid tokens before the question in each row
    small = ha.Budget(heavy=1, sink=1, window=1)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=attn).logits
        with ha.enable(model, ha.SinkWindowPolicy(small), mode="context", context_length=ctx):
            out = model(input_ids=ids, attention_mask=attn).logits
    for b, c in enumerate(ctx):
        valid = attn[b].nonzero()[:, 0]
        dense_pos, sparse_pos = valid[:c], valid[c:]
        assert torch.allclose(out[b, dense_pos], ref[b, dense_pos], atol=1e-4), b
        assert not torch.allclose(out[b, sparse_pos], ref[b, sparse_pos], atol=1e-3), b


def test_context_mode_bad_splits_raise_clear_errors():
    model = tiny_model("llama")
    ids, attn = _batch()
    pol = ha.SinkWindowPolicy(ha.Budget(heavy=2, sink=1, window=1))
    with pytest.raises(ValueError, match="needs context_length"):
        ha.enable(model, pol, mode="context")
    for bad in (0, -3, 2.5, []):
        with pytest.raises(ValueError, match="context_length"):
            ha.enable(model, pol, mode="context", context_length=bad)
    with pytest.raises(ValueError, match="only used by mode='context'"):
        ha.enable(model, pol, mode="decode", context_length=5)
    with pytest.raises(ValueError, match="reaches past the prompt"):  # the whole prompt is context
        with ha.enable(model, pol, mode="context", context_length=40):
            model.generate(input_ids=ids[:1], max_new_tokens=2, do_sample=False)
    with pytest.raises(ValueError, match="entries for a batch"):
        with ha.enable(model, pol, mode="context", context_length=[5, 6]):
            model(input_ids=ids, attention_mask=attn)
    assert model.config._attn_implementation == "sdpa"


def test_suite_prompts_know_where_the_question_starts():
    from hashattention.evaluation import ruler
    model, tok, _ = ha.load_model()
    res = ruler.Resources()
    for task in ("niah_single_text", "vt", "cwe", "fwe", "niah_multiquery_noise"):
        s = ruler.make_sample(tok, task, 1024, 0, 0, res)
        assert 0 < s.context_len < len(s.ids) - 5
        q = tok.decode(s.ids[s.context_len:])
        assert q.lstrip().startswith(("What are", "Question:")), (task, q[:40])
        assert "\n" in tok.decode(s.ids[s.context_len - 2:s.context_len])


# ------------------------------------------------------------------------------------ group selections
def test_union_selection_reads_each_heads_own_top_and_at_most_k():
    g = torch.Generator().manual_seed(0)
    b, hkv, grp, n = 2, 3, 3, 200
    scores = torch.randint(0, 33, (b, hkv * grp, 1, n), generator=g)
    valid = torch.ones(b, 1, 1, n, dtype=torch.bool)
    budget = ha.Budget(heavy=30, sink=2, window=3)
    keep = select(scores, valid, budget, max_score=32, union=grp)
    assert keep.shape == (b, hkv, 1, n)
    own = select(scores, valid, ha.Budget(heavy=10, sink=2, window=3), max_score=32)  # each head's top-10
    grouped = own.view(b, hkv, grp, 1, n)
    assert torch.equal(keep, grouped.any(2))  # exactly the union of each head's top-k/g
    heavy = keep.sum(-1) - 5
    assert bool((heavy <= 30).all()) and bool((heavy >= 10).all())
    from hashattention.evaluation.fastpath import topk_select
    assert torch.equal(topk_select(scores, valid, budget, union=grp), keep)  # the suite's fast path agrees
    everything = select(scores, valid, ha.Budget(heavy=10_000, sink=2, window=3), max_score=32, union=grp)
    assert bool(everything.all())  # a budget covering the context reads it all, union or not


def test_max_selection_is_top_k_of_the_best_head():
    model = tiny_model("llama")
    maps = ha.HashMaps.simhash(ha.maps_config_for(model.config))
    pol = {s: ha.HashAttentionPolicy(maps, ha.Budget(heavy=5, sink=1, window=1), selection=s)
           for s in ("max", "head", "union")}
    assert pol["max"].max_score == 32 and pol["max"].per_group and not pol["head"].per_group
    assert pol["union"].union_groups == 3 and pol["max"].union_groups == 1
    q, k = torch.randn(1, 6, 1, 16), torch.randn(1, 2, 30, 16)
    state = {}
    pol["max"].update(0, state, k, k, 0)
    valid = torch.ones(1, 1, 1, 30, dtype=torch.bool)
    s_max = pol["max"].scores(0, state, q, k, k, valid, 0.25)
    s_head = pol["head"].scores(0, state, q, k, k, valid, 0.25)
    assert torch.equal(s_max, s_head.view(1, 2, 3, 1, 30).amax(2))
    with pytest.raises(ValueError, match="selection must be one of"):
        ha.HashAttentionPolicy(maps, selection="mean")


# ----------------------------------------------------------------------------------- bootstrap intervals
def test_bootstrap_interval_covers_the_truth_and_narrows_with_items():
    rng = np.random.default_rng(0)
    widths = []
    for per_cell in (10, 90):
        cells = np.repeat(np.arange(10), per_cell)
        x = rng.normal(-2.0, 15.0, cells.size)
        lo, hi = bootstrap_ci(x, cells, reps=1000)
        assert lo < stratified_mean(x, cells) < hi
        assert lo < -2.0 + 3 * 15 / np.sqrt(cells.size) and hi > -2.0 - 3 * 15 / np.sqrt(cells.size)
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 2.3  # ~ 1/sqrt(9) = 1/3
    assert bootstrap_ci(np.zeros(20), np.repeat(np.arange(4), 5)) == (0.0, 0.0)
    with pytest.raises(ValueError, match="no paired items"):
        bootstrap_ci(np.zeros(0), np.zeros(0, dtype=np.int64))


def test_quality_rows_pair_items_and_weigh_cells_equally(tmp_path):
    recs = {}
    for task, n in (("a", 4), ("b", 2)):
        for i in range(n):
            recs[f"context|dense|full|2048|{task}|{i}"] = {"score": 100.0}
            recs[f"context|hash|1/32|2048|{task}|{i}"] = {"score": 100.0 if task == "a" else 0.0}
    recs["context|hash|1/32|2048|a|9"] = {"score": 0.0}  # no dense partner: not paired
    data = {"settings": {"device": "test", "maps": "m"}, "records": recs}
    (row,) = quality_rows(data, reps=200)
    assert row["n_items"] == 6 and row["score"] == 50.0 and row["delta_vs_dense"] == -50.0
    assert row["ci95"] == [-50.0, -50.0] and row["mode"] == "context" and row["maps"] == "m"
    path = write_summary([row], tmp_path / "quality_summary.json")
    assert json.loads(path.read_text())[0]["delta_vs_dense"] == -50.0
    assert "-50.0 [-50.0, -50.0]" in path.with_suffix(".md").read_text()
    assert path.with_suffix(".png").stat().st_size > 1000



def test_bundled_results_summarize_member_by_member(tmp_path):
    """Maps variants, each with its own dense rows, in one bundle file: rows labelled by tag, paired within
    their member only (the other member's dense is not mixed in)."""
    from hashattention.evaluation.quality import bundle_files, summarize_files
    files = []
    for tag, dense in (("v1", 100.0), ("v2", 50.0)):
        recs = {f"context|{p}|{b}|2048|a|{i}": {"score": dense if p == "dense" else 25.0}
                for i in range(3) for p, b in (("dense", "full"), ("hash-sum", "1/32"))}
        files.append(tmp_path / f"{tag}.json")
        files[-1].write_text(json.dumps({"settings": {"device": "test"}, "records": recs}))
    b = bundle_files(files, ["v1", "v2"], tmp_path / "bundle.json")
    rows = json.loads(summarize_files([b], tmp_path / "s.json").read_text())
    assert {(r["maps"], r["delta_vs_dense"]) for r in rows} == {("v1", -75.0), ("v2", -25.0)}
    # one label for the whole bundle (two runs of the same maps): per budget, the run with more items stays
    more = {f"context|{p}|{b}|2048|a|{i}": {"score": 100.0 if p == "dense" else 0.0}
            for i in range(5) for p, b in (("dense", "full"), ("hash-sum", "1/32"))}
    more.update({f"context|{p}|{b}|2048|a|{i}": {"score": 100.0} for i in range(2) for p, b in
                 (("dense", "full"), ("hash-sum", "1/64"))})
    (tmp_path / "v3.json").write_text(json.dumps({"settings": {"device": "test"}, "records": more}))
    b2 = bundle_files([files[0], tmp_path / "v3.json"], ["small", "large"], tmp_path / "bundle2.json")
    rows = json.loads(summarize_files([b2], tmp_path / "s2.json", maps_names=["shipped"]).read_text())
    assert sorted((r["budget"], r["maps"], r["n_items"], r["delta_vs_dense"]) for r in rows) == [
        ("1/32", "shipped", 5, -100.0), ("1/64", "shipped", 2, 0.0)]
    with pytest.raises(ValueError, match="own tag"):
        bundle_files(files, ["v1", "v1"], tmp_path / "x.json")
    with pytest.raises(ValueError, match="is a bundle: name a member"):
        bundle_files([b], ["b"], tmp_path / "x.json")
    (tmp_path / "bad.json").write_text(json.dumps({"settings": {}}))
    with pytest.raises(ValueError, match="not a suite results file"):
        bundle_files([tmp_path / "bad.json"], ["b"], tmp_path / "x.json")
    # a bundle grows: its members named BUNDLE#TAG beside a new file
    b3 = bundle_files([f"{b}#v1", f"{b}#v2", tmp_path / "v3.json"], ["v1", "v2", "v3"], tmp_path / "bundle3.json")
    grown = json.loads(b3.read_text())["bundle"]
    assert grown["v1"] == json.loads(b.read_text())["bundle"]["v1"] and grown["v3"]["records"] == more
    # one member summarized alone, labelled by its tag or by the label given
    rows = json.loads(summarize_files([f"{b}#v2", f"{b3}#v1"], tmp_path / "s3.json", ["", "shipped"]).read_text())
    assert {(r["maps"], r["delta_vs_dense"]) for r in rows} == {("v2", -25.0), ("shipped", -75.0)}
    with pytest.raises(ValueError, match="one of"):
        summarize_files([f"{b}#v9"], tmp_path / "s4.json")

# --------------------------------------------------------------------------------------- residual sample
def test_residual_sample_counts_weights_and_bad_input():
    from hashattention.core.selection import residual_sample
    keep = torch.zeros(2, 3, 4, 1000, dtype=torch.bool)
    keep[..., :50] = True
    valid = torch.ones(2, 1, 4, 1000, dtype=torch.bool)
    valid[1, ..., :100] = False
    sample, logw = residual_sample(keep, valid, ha.Budget(heavy=1 / 32, residual=64), salt=3)
    assert bool((sample.sum(-1) == 64).all()) and not bool((sample & keep).any()) and not bool((sample & ~valid).any())
    assert torch.allclose(logw[0].exp(), torch.full_like(logw[0], 950 / 64))
    assert torch.allclose(logw[1].exp(), torch.full_like(logw[1], 900 / 64))
    again, _ = residual_sample(keep, valid, ha.Budget(heavy=1 / 32, residual=64), salt=3)
    assert torch.equal(sample, again)  # deterministic
    for bad in (-1, 1.0, 1.5, "x"):
        with pytest.raises(ValueError):
            ha.Budget(residual=bad)
    with pytest.raises(ValueError, match="residual sample of 500 tokens is larger than the context"):
        ha.Budget(heavy=1 / 32, residual=500).check_fits(400)


def test_residual_sample_estimates_the_dropped_mass():
    """Keys beyond the top-k carry a flat share of the attention: dropping them biases the output toward
    the kept keys; the weighted sample removes most of that error."""
    g = torch.Generator().manual_seed(0)
    b, h, n, d = 1, 2, 4096, 32
    q = torch.randn(b, h, 8, d, generator=g)
    k = torch.randn(b, h, n, d, generator=g) * 0.3
    v = torch.randn(b, h, n, d, generator=g)
    k[:, :, :40] += q.mean(2, keepdim=True) * 0.6  # a few heavy keys
    valid = torch.ones(b, 1, 8, n, dtype=torch.bool)
    dense = ha.sparse_attention(q, k, v, valid.expand(b, h, 8, n))
    pol = ha.OracleTopKPolicy(ha.Budget(heavy=64, sink=0, window=0), per_group=False)
    keep = pol.select(0, {}, q, k, v, valid, d ** -0.5)
    plain = ha.sparse_attention(q, k, v, keep)
    from hashattention.core.selection import residual_sample
    sample, logw = residual_sample(keep, valid, ha.Budget(heavy=64, sink=0, window=0, residual=256), salt=1)
    bias = torch.where(sample, logw, torch.zeros(()))
    est = ha.sparse_attention(q, k, v, keep | sample, bias=bias)
    err = lambda x: float((x - dense).norm() / dense.norm())  # noqa: E731
    assert err(est) < 0.6 * err(plain), (err(est), err(plain))


def test_residual_budget_through_the_integration_is_exact_at_full_budget():
    model = tiny_model("llama")
    ids, attn = _batch()
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=attn).logits
        pol = ha.OracleTopKPolicy(ha.Budget(heavy=10_000, sink=4, window=4, residual=8))
        with ha.enable(model, pol, mode="everywhere", chunk=16):
            out = model(input_ids=ids, attention_mask=attn).logits
        pol = ha.OracleTopKPolicy(ha.Budget(heavy=3, sink=2, window=2, residual=10))
        with ha.enable(model, pol, mode="everywhere", chunk=16) as h:
            sparse = model(input_ids=ids, attention_mask=attn).logits
            assert h.stats()["tokens_read"] <= 2 + 2 + 3 + 10
    m = attn.bool()
    assert torch.allclose(out[m], ref[m], atol=1e-4)
    assert not torch.allclose(sparse[m], ref[m], atol=1e-3)


def test_evaluate_selections_on_a_tiny_model():
    from hashattention.training.capture import capture
    from hashattention.training.recall import evaluate_selections
    model = tiny_model("llama", layers=2)
    ids = torch.randint(3, 97, (1, 300), generator=torch.Generator().manual_seed(0))
    cap = capture(model, ids)
    maps = ha.HashMaps.simhash(ha.maps_config_for(model.config))
    res = evaluate_selections(maps, cap, 280, budgets=(1 / 8,), selections=("sum", "max", "union", "head",
                                                                          "soft-sum", "qsoft-sum", "tanh-sum"),
                              sink=4, window=4)
    assert set(res) == {f"{n}@1/8" for n in ("sum", "max", "union", "head", "soft-sum", "qsoft-sum", "tanh-sum",
                                               "oracle", "oracle-head")}
    assert res["tanh-sum@1/8"]["heavy_mass"] != res["sum@1/8"]["heavy_mass"]  # real-valued keys rank otherwise
    assert res["oracle-head@1/8"]["top1"] == 1.0  # each head's own top-k holds its heaviest candidate
    for n, r in res.items():
        assert 0 < r["heavy_mass"] <= res["oracle-head@1/8"]["heavy_mass"] + 1e-6 or n == "oracle", n
        assert 0 < r["mass"] <= 1 and r["rel_error"] >= 0
    budget_rows = sum(8 + (281 + i) // 8 for i in range(20)) / 20  # sink + window + 1/8 of each query's context
    assert res["oracle@1/8"]["read"] == pytest.approx(budget_rows) and res["sum@1/8"]["read"] == pytest.approx(budget_rows)
    assert res["head@1/8"]["read"] >= res["sum@1/8"]["read"]
    with pytest.raises(ValueError, match="outside the sequence"):
        evaluate_selections(maps, cap, 300)


def test_suite_refuses_a_residual_sample_larger_than_its_contexts_before_running():
    from hashattention.evaluation.runner import Suite
    model, tok, _ = ha.load_model()
    with pytest.raises(ValueError, match="residual sample of 5000 tokens is larger than the context"):
        Suite(model, tok, tasks="vt", lengths="2K", policies="dense,oracle", budgets=["1/32+r5000"],
              modes=["context"], samples=1, progress=False, ppl_samples=0)


# ------------------------------------------------------------------------------------------ per-layer budgets
def test_layer_budgets_keep_the_total_and_reach_every_path():
    from hashattention.core.budget import layer_budgets
    from hashattention.evaluation.fastpath import accelerate
    b = ha.Budget(heavy=1 / 32)
    per = layer_budgets(b, "2:4,1:2", 6)
    assert sorted(per) == list(range(6))
    assert per[2].heavy == pytest.approx(4 * per[0].heavy) and per[1].heavy == pytest.approx(2 * per[0].heavy)
    assert sum(p.heavy for p in per.values()) / 6 == pytest.approx(1 / 32)  # the same heavy reads in all
    assert layer_budgets(ha.Budget(heavy=64), {0: 3}, 2)[0].heavy == 96  # counts stay counts
    assert layer_budgets(ha.Budget(heavy=0.9), {0: 3}, 2)[0].heavy == 1.0  # a fraction is capped at the whole context
    for bad, msg in [("20:4", "model has 6 layers"), ("x:1", "layer:weight"), ("3", "layer:weight"),
                     ({1: 0}, "must be > 0"), ({-1: 2}, "integer >= 0")]:
        with pytest.raises(ValueError, match=msg):
            layer_budgets(b, bad, 6)
    # the policy reads each layer's own count, in the reference select and in the eval's fast select
    model = tiny_model("llama", layers=2)
    maps = ha.HashMaps.simhash(ha.maps_config_for(model.config))
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 6, 1, 16, generator=g), torch.randn(1, 2, 400, 16, generator=g)
    valid = torch.ones(1, 1, 1, 400, dtype=torch.bool)
    for fast in (False, True):
        pol = ha.HashAttentionPolicy(maps, ha.Budget(heavy=1 / 8, sink=4, window=4)).set_layer_weights("1:3", 2)
        pol = accelerate(pol) if fast else pol
        reads = []
        for layer in (0, 1):
            st = {}
            pol.update(layer, st, k, k, 0)
            reads.append(int(pol.select(layer, st, q, k, k, valid, 0.25)[0, 0, 0].sum()))
        assert reads == [8 + int(400 * pol.budget_for(i).heavy) for i in (0, 1)], (fast, reads)
        assert reads[1] > 2 * reads[0]
    with pytest.raises(ValueError, match="its own rule"):  # a policy whose selection would ignore them
        ha.make_policy("bucket", ha.Budget(heavy=1 / 8)).set_layer_weights("1:3", 2)


def test_suite_checks_layer_weights_before_running():
    from hashattention.evaluation.passes import parse_pass
    from hashattention.evaluation.runner import Suite
    assert parse_pass("mode=context;layers=20:4,19:2")["layers"] == "20:4,19:2"
    model, tok, _ = ha.load_model()
    with pytest.raises(ValueError, match="model has 30 layers"):
        Suite(model, tok, tasks="vt", lengths="2K", policies="dense,hash-sum", budgets=["1/32"], modes=["context"],
              samples=1, progress=False, ppl_samples=0, layer_weights="40:2")


def test_compare_two_runs_is_paired_on_shared_prompts(tmp_path, capsys):
    """eval --compare A B: per (mode, policy, budget) the stratified mean of A - B over the prompts both answered,
    its interval, the count; a bundle's member by FILE#TAG; dense left out; bad specs named."""
    from hashattention.cli.main import main
    from hashattention.evaluation.quality import compare_runs, load_results

    def run(scores):  # {(policy, task, idx): score}
        recs = {f"context|{p}|{'full' if p == 'dense' else '1/32'}|2048|{t}|{i}": {"score": s}
                for (p, t, i), s in scores.items()}
        return {"settings": {}, "records": recs}
    a = run({("hash-sum", "vt", 0): 100, ("hash-sum", "vt", 1): 50, ("hash-sum", "cwe", 0): 20,
             ("hash-sum", "cwe", 9): 70, ("dense", "vt", 0): 100})
    b = run({("hash-sum", "vt", 0): 80, ("hash-sum", "vt", 1): 50, ("hash-sum", "cwe", 0): 60,
             ("dense", "vt", 0): 0})
    rows = compare_runs(a, b, reps=200)
    assert len(rows) == 1 and rows[0]["policy"] == "hash-sum" and rows[0]["n_items"] == 3  # cwe 9 unpaired
    assert rows[0]["delta"] == pytest.approx(((20 + 0) / 2 + -40) / 2)  # cells weighted equally
    assert rows[0]["ci95"][0] <= rows[0]["delta"] <= rows[0]["ci95"][1]
    (tmp_path / "b.json").write_text(json.dumps({"bundle": {"x": b}}))
    (tmp_path / "a.json").write_text(json.dumps(a))
    assert load_results(f"{tmp_path / 'b.json'}#x") == b
    assert main(["eval", "--compare", str(tmp_path / "a.json"), f"{tmp_path / 'b.json'}#x"]) == 0
    assert "| context | hash-sum | 1/32 | -15.0 [" in capsys.readouterr().out
    with pytest.raises(ValueError, match="is a bundle"):
        load_results(str(tmp_path / "b.json"))
    with pytest.raises(ValueError, match="not a bundle"):
        load_results(f"{tmp_path / 'a.json'}#x")
    with pytest.raises(FileNotFoundError):
        load_results(str(tmp_path / "none.json"))
