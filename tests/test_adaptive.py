"""Issue 24 item 4: the adaptive (top-p) heavy budget, its calibration, labels and bad input."""
import json
import re

import pytest
import torch

import hashattention as ha
from conftest import tiny_model
from hashattention.core.budget import Budget, parse_adaptive, parse_label
from hashattention.core.calibration import Calibration, accumulate, finish, new_accumulators
from hashattention.core.selection import (causal_valid, forced_and_candidates, select, share_counting, share_sorting,
                                          top_p_counting, top_p_sorting)


def _brute_top_p(s, cand, w, p):
    """Per row: sort candidates by score (desc), fewest whose summed w[score] reaches p of the total."""
    out = torch.zeros(*s.shape[:-1], 1, dtype=torch.int64)
    for idx in torch.cartesian_prod(*[torch.arange(n) for n in s.shape[:-1]]):
        i = tuple(idx.tolist())
        vals = sorted((w[s[i][j]].item() for j in range(s.shape[-1]) if cand[i][j]), reverse=True)
        tot, acc, k = sum(vals), 0.0, 0
        while k < len(vals) and acc < p * tot:
            acc += vals[k]
            k += 1
        out[i] = k
    return out


@pytest.mark.parametrize("p", [0.3, 0.9, 1.0])
def test_top_p_counting_matches_a_sorted_brute_force(p):
    g = torch.Generator().manual_seed(1)
    s = torch.randint(0, 13, (2, 3, 2, 40), generator=g)
    cand = torch.rand(s.shape, generator=g) < 0.8
    w = torch.rand(13, generator=g, dtype=torch.float64) + 0.05
    got = top_p_counting(s, cand, w[None, None, None], p, 12)
    # bins are taken whole from the top: the brute force sorts by weight, so give weights increasing in score
    ws = torch.sort(w).values
    got_sorted = top_p_counting(s, cand, ws[None, None, None], p, 12)
    assert torch.equal(got_sorted, _brute_top_p(s, cand, ws, p))
    assert (got <= cand.sum(-1, keepdim=True)).all() and (got >= 1).all()


def test_top_p_sorting_is_the_fewest_heaviest_keys():
    g = torch.Generator().manual_seed(2)
    m = torch.rand(2, 2, 3, 30, generator=g) ** 4
    cand = torch.rand(m.shape, generator=g) < 0.7
    for p in (0.5, 0.95):
        k = top_p_sorting(m, cand, p)
        srt = torch.sort(torch.where(cand, m, 0.0).double(), -1, descending=True).values
        c = srt.cumsum(-1)
        kk = k.clamp_min(1)
        assert (c.gather(-1, kk - 1) >= p * c[..., -1:] - 1e-12).all()  # k keys reach p
        prev = c.gather(-1, (kk - 2).clamp_min(0))
        assert ((kk == 1) | (prev < p * c[..., -1:])).all()  # k - 1 do not


def test_min_share_takes_the_keys_worth_their_share():
    g = torch.Generator().manual_seed(4)
    s = torch.randint(0, 13, (2, 2, 3, 50), generator=g)
    cand = torch.rand(s.shape, generator=g) < 0.8
    w = torch.sort(torch.rand(13, generator=g, dtype=torch.float64) + 0.01).values
    share = 0.03
    k = share_counting(s, cand, w[None, None, None], share, 12)
    est = torch.where(cand, w[s], 0.0)
    assert torch.equal(k, (cand & (est >= share * est.sum(-1, keepdim=True))).sum(-1, keepdim=True))
    m = torch.rand(s.shape, generator=g) ** 3
    km = share_sorting(m, cand, share)
    mm = torch.where(cand, m, 0.0).double()
    assert torch.equal(km, ((mm >= share * mm.sum(-1, keepdim=True)) & (mm > 0)).sum(-1, keepdim=True))
    valid = torch.ones(2, 1, 3, 50, dtype=torch.bool)
    keep = select(s, valid, Budget(heavy=1.0, sink=0, window=0, min_share=share), max_score=12,
                  weights=w[None, None, None])
    assert torch.equal(keep.sum(-1, keepdim=True), (valid.expand_as(s) & (w[s] >= share * w[s].sum(-1, keepdim=True))
                                                     ).sum(-1, keepdim=True))


def test_select_adaptive_respects_cap_floor_and_full_target():
    g = torch.Generator().manual_seed(3)
    s = torch.randint(0, 33, (1, 2, 4, 300), generator=g)
    valid = causal_valid(1, 4, 300)
    w = torch.exp(torch.linspace(-6, 0, 33))[None, None, None]
    forced, cand, _ = forced_and_candidates(valid, Budget(sink=8, window=8))
    full = select(s, valid, Budget(heavy=1.0, sink=8, window=8, top_p=1.0), max_score=32, weights=w)
    assert torch.equal(full, valid.expand_as(full))  # every weight > 0: p = 1 reads every candidate
    cap = select(s, valid, Budget(heavy=20, sink=8, window=8, top_p=1.0), max_score=32, weights=w)
    assert ((cap & ~forced).sum(-1) == 20).all()
    lo = select(s, valid, Budget(heavy=1.0, sink=8, window=8, top_p=0.05), max_score=32, weights=w)
    floor = select(s, valid, Budget(heavy=1.0, sink=8, window=8, top_p=0.05, heavy_min=50), max_score=32, weights=w)
    assert ((lo & ~forced).sum(-1) < 50).all() and ((floor & ~forced).sum(-1) == 50).all()
    # the adaptive set of a row is the fixed top-k set of its own count (same counting rule and ties)
    k = int((lo & ~forced)[0, 0, 0].sum())
    fixed = select(s[:, :1, :1], valid[:, :, :1], Budget(heavy=k, sink=8, window=8), max_score=32)
    assert torch.equal(fixed, lo[:, :1, :1])
    with pytest.raises(ValueError, match="union"):
        select(s, valid, Budget(heavy=1.0, top_p=0.5), max_score=32, weights=w, union=2)
    with pytest.raises(ValueError, match="calibration"):
        select(s, valid, Budget(heavy=1.0, top_p=0.5), max_score=32)
    with pytest.raises(ValueError, match="must lie in 0..32"):
        select(s + 1, valid, Budget(heavy=1.0, top_p=0.5), max_score=32, weights=w)
    with pytest.raises(ValueError, match="score values"):
        select(s, valid, Budget(heavy=1.0, top_p=0.5), max_score=32, weights=w[..., :10])


def test_budget_and_labels_refuse_targets_outside_their_range():
    for kw, msg in ((dict(top_p=0.0), r"\(0, 1\]"), (dict(top_p=1.5), r"\(0, 1\]"), (dict(top_p=True), r"\(0, 1\]"),
                    (dict(heavy=0, top_p=0.5), "hard cap"), (dict(heavy_min=4), "set top_p"),
                    (dict(heavy=8, top_p=0.5, heavy_min=9), "larger than the cap"),
                    (dict(min_share=1.0), r"\(0, 1\)"), (dict(min_share=0.1, top_p=0.5), "not both"),
                    (dict(heavy=0, min_share=0.1), "hard cap")):
        with pytest.raises(ValueError, match=msg):
            Budget(**kw)
    assert parse_adaptive("p0.9/1/16") == ({"top_p": 0.9}, "1/16") and parse_adaptive("1/32") == ({}, "1/32")
    assert parse_adaptive("s0.002/1/16+r1/64") == ({"min_share": 0.002}, "1/16")
    assert parse_label("p0.9/1/16+r1/64") == (1 / 16, 1 / 64)
    for bad in ("p0/1/16", "p1.2/1/16", "p0.9", "pfoo/1/16", "s1/1/16", "s0/1/16", "s0.01"):
        with pytest.raises(ValueError, match="adaptive budget"):
            parse_adaptive(bad)
    from hashattention.evaluation.runner import budget_from_label, budget_label
    assert budget_label("p0.90/0.0625") == "p0.9/1/16" and budget_label("s0.0020/1/16") == "s0.002/1/16"
    b = budget_from_label("p0.9/1/16+r1/64", 4, 4)
    assert (b.top_p, b.heavy, b.residual, b.sink) == (0.9, 1 / 16, 1 / 64, 4)
    assert Budget(heavy=1 / 16, top_p=0.9).describe().startswith("heavy=p0.9/1/16")


def test_calibration_fit_recovers_means_and_fills_holes():
    sums, counts = new_accumulators(2, 1, 4)
    scores = torch.tensor([0, 1, 1, 3, 3, 3, 4, 0]).view(1, 1, 1, 8).expand(2, 1, 1, 8).clone()
    share = torch.tensor([.1, .2, .4, .3, .3, .6, .9, .1]).view(1, 1, 1, 8).expand(2, 1, 1, 8)
    cand = torch.ones(1, 1, 1, 8, dtype=torch.bool)
    cand[..., -1] = False  # not a candidate: not counted
    accumulate(sums, counts, slice(0, 2), scores, share, cand)
    assert counts[0, 0].tolist() == [1, 2, 0, 3, 1]
    cal = finish(sums, counts, "sum", min_count=2)
    lw = cal.log_weight[0, 0].exp()
    # means .3 (score 1) and .4 (score 3); 0 and 4 are too rare (1 key) and 2 unseen: 0 takes the lowest seen
    # score's value, 2 and 4 the best value below them
    assert torch.allclose(lw, torch.tensor([.3, .3, .3, .4, .4]), atol=1e-6)
    assert torch.allclose(cal.weights(1)[0], torch.tensor([.75, .75, .75, 1, 1]), atol=1e-6)
    again = Calibration.from_dict(json.loads(json.dumps(cal.to_dict())))
    assert torch.allclose(again.log_weight, cal.log_weight, atol=1e-3) and again.selection == "sum"
    with pytest.raises(ValueError, match="no score value"):
        finish(sums, counts, "sum", min_count=10)
    with pytest.raises(ValueError, match="shape"):
        cal.check(3, 1, 4)


def test_calibration_file_beside_maps_is_validated_and_optional(tmp_path):
    model = tiny_model("llama", layers=2)
    maps = ha.HashMaps.simhash(ha.maps_config_for(model.config))
    path = ha.save_maps(maps, tmp_path / "m")
    assert ha.load_maps(path).calibrations == {}  # older files, no calibration: unchanged
    good = Calibration(torch.zeros(2, 2, 97), "sum")  # 2 layers, 2 KV heads, 32 bits x 3 heads summed
    from hashattention.weights import WeightsError, calibration_path, save_calibrations
    save_calibrations([good], path)
    assert torch.equal(ha.load_maps(path).calibrations["sum"].log_weight, good.log_weight)
    save_calibrations([Calibration(torch.zeros(3, 2, 97), "sum")], path)
    with pytest.raises(WeightsError, match=r"shape \(3, 2, 97\).*need \(2, 2, 97\)"):
        ha.load_maps(path)
    meta = json.loads(calibration_path(path).read_text())
    meta["calibrations"] = [good.to_dict()]
    meta["maps_sha256"] = "0" * 64
    calibration_path(path).write_text(json.dumps(meta))
    # maps retrained under the same name: they load (with a warning), an adaptive budget says why it cannot run
    with pytest.warns(UserWarning, match="calibrates other maps"):
        stale = ha.load_maps(path)
    assert stale.calibrations == {}
    with pytest.raises(ValueError, match="hashattention calibrate.*calibrates other maps"):
        ha.HashAttentionPolicy(stale, Budget(heavy=1 / 4, top_p=0.9))
    assert ha.HashAttentionPolicy(stale, Budget(heavy=1 / 4)).budget.top_p is None  # a plain budget runs


def test_adaptive_policy_through_the_integration():
    model = tiny_model("llama", layers=2)
    maps = ha.HashMaps.simhash(ha.maps_config_for(model.config))
    with pytest.raises(ValueError, match="hashattention calibrate"):
        ha.HashAttentionPolicy(maps, Budget(heavy=1 / 4, top_p=0.9))
    with pytest.raises(ValueError, match="cannot use an adaptive budget"):
        ha.make_policy("random", Budget(heavy=1 / 4, top_p=0.9))
    cal = Calibration(torch.linspace(-8, 0, 97).expand(2, 2, 97).clone(), "sum")
    with pytest.raises(ValueError, match="union"):
        ha.HashAttentionPolicy(maps, Budget(heavy=1 / 4, top_p=0.9), selection="union", calibration=cal)
    with pytest.raises(ValueError, match="shape"):
        ha.HashAttentionPolicy(maps, Budget(heavy=1 / 4, top_p=0.9), calibration=Calibration(torch.zeros(2, 2, 33), "sum"))
    maps.calibrations = {"sum": cal}
    ids = torch.randint(3, 97, (1, 200), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense = model(ids).logits
        outs, reads = {}, {}
        for p in (1.0, 0.3):
            pol = ha.HashAttentionPolicy(maps, Budget(heavy=1.0, sink=4, window=4, top_p=p))
            with pol(model, mode="everywhere", chunk=64) as h:
                outs[p] = model(ids).logits
            reads[p] = h.stats()["fraction"]
    assert torch.allclose(outs[1.0], dense, atol=1e-4)  # p = 1 under a full cap reads every key: dense
    assert reads[1.0] == pytest.approx(1.0) and reads[0.3] < 0.8
    assert not torch.allclose(outs[0.3], dense, atol=1e-3)


def test_evaluate_selections_reports_the_adaptive_budget():
    from hashattention.training.capture import capture
    from hashattention.training.recall import evaluate_selections
    model = tiny_model("llama", layers=2)
    cap = capture(model, torch.randint(3, 97, (1, 300), generator=torch.Generator().manual_seed(0)))
    maps = ha.HashMaps.simhash(ha.maps_config_for(model.config))
    with pytest.raises(ValueError, match="calibrate"):
        evaluate_selections(maps, cap, 280, budgets=(1 / 8,), selections=("sum",), top_p=(0.5,))
    maps.calibrations = {"sum": Calibration(torch.linspace(-8, 0, 97).expand(2, 2, 97).clone(), "sum")}
    res = evaluate_selections(maps, cap, 280, budgets=(1 / 8,), selections=("sum", "union"), sink=4, window=4,
                              top_p=(1.0, 0.5), cap_heavy=1.0, min_share=(0.01,))
    assert {"sum-p1@1.0", "sum-p0.5@1.0", "oracle-p1@1.0", "oracle-p0.5@1.0"} <= set(res)
    assert "union-p1@1.0" not in res  # no calibration for it
    assert res["sum-p1@1.0"]["heavy_mass"] == pytest.approx(1.0) and res["sum-p1@1.0"]["rel_error"] < 1e-5
    assert res["sum-p0.5@1.0"]["read"] < res["sum-p1@1.0"]["read"]
    assert res["oracle-p0.5@1.0"]["read"] < res["oracle-p1@1.0"]["read"]
    assert res["sum-s0.01@1.0"]["read"] < res["sum-p1@1.0"]["read"] and "oracle-s0.01@1.0" in res


def test_kernels_and_engine_refuse_an_adaptive_budget():
    from hashattention import kernels
    from conftest import engine_beside_hf
    q_sig = torch.zeros(1, 6, 1, dtype=torch.int32)
    k_sig = torch.zeros(1, 2, 50, 1, dtype=torch.int32)
    n = torch.tensor([50])
    with pytest.raises(ValueError, match="fixed heavy count"):
        kernels.score_select(q_sig, k_sig, torch.tensor([0]), n, Budget(heavy=1 / 4, top_p=0.9), 2)
    *_, engine = engine_beside_hf(batch=1)
    with pytest.raises(ValueError, match="fixed heavy count"):
        engine.set_budget(Budget(heavy=1 / 4, top_p=0.9))


def test_suite_refuses_bad_adaptive_budgets_before_running():
    from hashattention.evaluation.runner import Suite
    model, tok, _ = ha.load_model()
    kw = dict(tasks="vt", lengths="2K", modes=["context"], samples=1, progress=False, ppl_samples=0)
    with pytest.raises(ValueError, match="target mass must be in"):
        Suite(model, tok, policies="dense,hash-sum", budgets=["p1.5/1/16"], **kw)
    with pytest.raises(ValueError, match="cannot use an adaptive budget"):
        Suite(model, tok, policies="dense,random", budgets=["p0.9/1/16"], **kw)
    with pytest.raises(ValueError, match="union"):
        Suite(model, tok, policies="dense,hash-union", budgets=["p0.9/1/16"], maps=ha.load_default_maps(model), **kw)


@pytest.mark.parametrize("argv, msg", [
    (["calibrate", "--selections", "union"], "cannot calibrate selection"),
    (["calibrate", "--queries", "5000", "--context", "4096"], "--queries"),
    (["recall", "--selections", "sum", "--top-p", "1.5"], r"\(0, 1\]"),
    (["recall", "--selections", "sum", "--top-p", "0.9", "--top-p-cap", "0"], "hard cap"),
    (["recall", "--selections", "sum", "--min-share", "1.5"], r"\(0, 1\)"),
])
def test_cli_refuses_bad_adaptive_input_before_loading_the_model(argv, msg, capsys, monkeypatch):
    from hashattention.cli import main as cli
    import hashattention.models
    monkeypatch.setattr(hashattention.models, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and re.search(msg, err), err


def test_suite_fast_path_keeps_the_adaptive_rule():
    from hashattention.evaluation.fastpath import accelerate
    model = tiny_model("llama", layers=2)
    maps = ha.HashMaps.simhash(ha.maps_config_for(model.config))
    maps.calibrations = {"sum": Calibration(torch.linspace(-8, 0, 97).expand(2, 2, 97).clone(), "sum")}
    pol = accelerate(ha.HashAttentionPolicy(maps, Budget(heavy=1.0, sink=4, window=4, min_share=0.05)))
    ids = torch.randint(3, 97, (1, 120), generator=torch.Generator().manual_seed(1))
    with pol(model, mode="everywhere", chunk=64) as h:
        model(ids)
    assert h.stats()["fraction"] < 0.9  # the fixed rule under a full cap would read every key
