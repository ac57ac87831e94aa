"""The embedded default model (SmolLM2-135M-Instruct GGUF) at a short context (issue 2)."""
import pytest
import torch

import hashattention as ha
from hashattention.evaluation.passkey import passkey_prompt, run_passkey


@pytest.fixture(scope="module")
def default_model():
    model, tok, model_id = ha.load_model("default", device="cpu")
    assert model_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    return model, tok


def test_default_model_same_tokens_as_sdpa(default_model):
    model, tok = default_model
    batch = tok(["The capital of France is", "Write one word about the sea, then stop:"], return_tensors="pt",
                padding=True, padding_side="left")
    ref = model.generate(**batch, max_new_tokens=8, do_sample=False)
    full = ha.Budget(heavy=4096, sink=4, window=4)
    for mode in ("decode", "everywhere"):
        policy = ha.make_policy("simhash", full, model_config=model.config)
        with ha.enable(model, policy, mode=mode):
            out = model.generate(**batch, max_new_tokens=8, do_sample=False)
        assert torch.equal(out, ref), mode


def test_default_model_passkey_at_1k(default_model):
    model, tok = default_model
    ids, key = passkey_prompt(tok, 1024, seed=5)
    assert 900 < ids.shape[1] <= 1100 and key in tok.decode(ids[0])
    policies = {"dense": ha.DensePolicy(), "oracle": ha.OracleTopKPolicy(ha.Budget(heavy=1 / 16, sink=32, window=32))}
    res = {r.policy: r for r in run_passkey(model, tok, policies, [1024], samples=1, seed=1)}
    assert res["dense"].correct == 1, res["dense"].answers
    assert res["oracle"].correct == 1, res["oracle"].answers
    assert res["oracle"].tokens_read < 0.2 * res["oracle"].context


def test_readme_example_runs_and_finds_the_key(default_model, monkeypatch, capsys):
    """The README's Python example, as written (the model load is served by this module's fixture)."""
    import re
    from pathlib import Path
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.findall(r"```python\n(.*?)```", readme, re.S)[0]
    assert "ha.load_model()" in code and "load_default_maps" in code
    model, tok = default_model
    monkeypatch.setattr(ha, "load_model", lambda *a, **k: (model, tok, "HuggingFaceTB/SmolLM2-135M-Instruct"))
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "12345" in out and "'fraction'" in out
    frac = float(re.search(r"'fraction': ([0-9.]+)", out).group(1))
    assert frac < 0.5  # 1/16 + sink 128 + window 128 of ~1K tokens really is sparse
