"""RULER-style generators, scoring, bad input, and one tiny CPU suite run (byte tokenizer, tiny model)."""
import json

import pytest

from hashattention.evaluation import ruler


class ByteTok:
    eos_token_id = 0
    pad_token_id = 0
    chat_template = None

    def encode(self, text, add_special_tokens=False):
        return [b % 250 + 3 for b in text.encode()]

    def decode(self, ids, skip_special_tokens=True):
        return bytes(i - 3 for i in ids if i >= 3).decode(errors="replace")


RES = ruler.Resources(sentences=[f"Sentence number {i} says nothing much." for i in range(50)],
                      words=[f"word{chr(97 + i % 26)}{chr(97 + i // 26)}" for i in range(60)])


def test_same_seed_same_prompt_and_fits():
    tok = ByteTok()
    a = ruler.make_sample(tok, "niah_single_noise", 600, 0, 0, RES)
    b = ruler.make_sample(tok, "niah_single_noise", 600, 0, 0, RES)
    c = ruler.make_sample(tok, "niah_single_noise", 600, 1, 0, RES)
    assert a.ids == b.ids and a.ids != c.ids
    assert len(a.ids) + a.max_new <= 600 and len(a.ids) > 500
    assert a.answers[0] in tok.decode(a.ids)


def test_score_and_bad_input():
    assert ruler.score("the numbers are 123 and 456", ["123", "456"]) == 100.0
    assert ruler.score("only 123", ["123", "456"]) == 50.0
    with pytest.raises(ValueError, match="available"):
        ruler.check_tasks("niah_single_noise,nope")
    with pytest.raises(ValueError, match="empty"):
        ruler.Resources(sentences=[], words=RES.words)


def test_tiny_suite_runs_and_resumes(tmp_path, tiny):
    from hashattention.evaluation.runner import Suite
    model = tiny("llama", vocab=256, heads=4, kv_heads=2)
    with pytest.raises(ValueError, match="window"):
        Suite(model, ByteTok(), lengths=[8192], resources=RES)
    with pytest.raises(ValueError, match="available"):
        Suite(model, ByteTok(), lengths=[512], policies="dense,bogus", resources=RES)
    out = tmp_path / "r.json"
    kw = dict(tasks="niah_single_noise", lengths=[512], policies="dense,quest,h2o,sink_window",
              budgets=["1/4"], samples=1, ppl_samples=0, out=out, progress=False, resources=RES,
              modes=("everywhere", "decode"), decode_budgets=["1/4"], sink=16, window=16)
    Suite(model, ByteTok(), **kw).run()
    data = json.loads(out.read_text())
    assert len(data["records"]) == 8  # 4 configs x 2 modes
    assert out.with_suffix(".md").is_file() and out.with_suffix(".png").is_file()
    s = Suite(model, ByteTok(), **kw)
    before = dict(s.data["records"])
    s.run()
    assert s.data["records"] == before


def test_heldout_text_is_the_same_in_every_process():
    """The held-out text (haystacks, perplexity) must not depend on the process: pydoc prints object
    addresses in default values, which change with every run."""
    import subprocess
    import sys
    code = "from hashattention.evaluation.heldout import text_digest; print(text_digest())"
    a, b = (subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
            for _ in range(2))
    assert a.strip() and a == b


def test_report_renders_a_subset_of_a_results_file(tmp_path):
    """`hashattention eval --report`: a run cut short by its time limit is still readable for the configs that
    finished every length (here the committed H100 run with one config's 8K records left out)."""
    import json
    from pathlib import Path
    from hashattention.evaluation.runner import render
    data = json.loads((Path(__file__).resolve().parents[1] / "bench/results/eval_everywhere_h100.json").read_text())
    data["records"] = {k: v for k, v in data["records"].items()
                       if not (k.startswith("everywhere|quest|1/32|8192|") and not k.endswith(("|ppl|0", "|ppl|1")))}
    src = tmp_path / "cut.json"
    src.write_text(json.dumps(data))
    everything = render(src, tmp_path / "all.json")
    assert "| 8K |" not in everything and "| 4K |" in everything  # 8K is not finished by every config
    sub = render(src, tmp_path / "sub.json", policies=["dense", "hash"], budgets=["1/16"])
    assert "| 8K |" in sub and "| simhash |" not in sub and (tmp_path / "sub.png").stat().st_size > 0
    rows = [l for l in sub.splitlines() if l.startswith("| dense") or l.startswith("| hash")]
    assert len(rows) == 2
    with pytest.raises(ValueError, match="no results"):
        render(src, tmp_path / "none.json", policies=["nope"])


def test_ctrl_c_during_eval_keeps_the_finished_results(tmp_path, tiny, monkeypatch):
    """Ctrl-C inside a batch: every finished (policy, budget) unit is on disk as valid JSON, and the rerun
    completes with the same records as an uninterrupted run."""
    import hashattention.evaluation.runner as R
    model = tiny("llama", vocab=256, heads=4, kv_heads=2)
    kw = dict(tasks="niah_single_noise", lengths=[512], policies="dense,sink_window,random", budgets=["1/4"],
              samples=1, ppl_samples=0, progress=False, resources=RES, sink=16, window=16)
    R.Suite(model, ByteTok(), out=tmp_path / "full.json", **kw).run()
    real, calls = R.run_batch, []

    def batch_then_ctrl_c(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(R, "run_batch", batch_then_ctrl_c)
    out = tmp_path / "cut.json"
    with pytest.raises(KeyboardInterrupt):
        R.Suite(model, ByteTok(), out=out, **kw).run()
    assert len(json.loads(out.read_text())["records"]) == 2
    monkeypatch.setattr(R, "run_batch", real)
    R.Suite(model, ByteTok(), out=out, **kw).run()
    full, cut = (json.loads((tmp_path / f).read_text())["records"] for f in ("full.json", "cut.json"))
    assert cut.keys() == full.keys() and all(cut[k]["pred"] == full[k]["pred"] for k in full)


def test_per_head_selection_is_a_setting_that_resume_checks(tmp_path, tiny):
    from hashattention.evaluation.runner import Suite
    model = tiny("llama", vocab=256, heads=4, kv_heads=2)
    kw = dict(tasks="niah_single_noise", lengths=[512], policies="dense,random", budgets=["1/4"], samples=1,
              ppl_samples=0, progress=False, resources=RES, sink=16, window=16, out=tmp_path / "r.json")
    s = Suite(model, ByteTok(), per_group=False, **kw)
    assert s.make("random", "1/4").per_group is False and s.settings["selection"] == "per query head"
    s.run()
    with pytest.raises(ValueError, match="selection"):
        Suite(model, ByteTok(), **kw)  # per KV group: another setting, refused instead of mixed
    data = json.loads((tmp_path / "r.json").read_text())
    del data["settings"]["selection"]  # a file written before the setting existed reads as per KV group
    (tmp_path / "r.json").write_text(json.dumps(data))
    assert len(Suite(model, ByteTok(), **kw).data["records"]) == 2
