"""`hashattention generate` (issue 26): streamed text under any policy, the same tokens as transformers' generate
under the same policy, the engine's path equal to the Hugging Face path at full budget (here on the CPU, with the
engine's PyTorch step; tests/gpu_generate_check.py checks the CUDA graphs and kernels), sampling reproducible
from its seed, and bad input refused before the model loads."""
import io
import json

import pytest
import torch

import hashattention as ha
from hashattention.cli import generate as gen_cli
from hashattention.cli import main as cli

PROMPT = ("The pass key is 4096. Remember it. The grass is green. The sky is blue. The sun is bright. "
          "The grass is green. The sky is blue. What is the pass key? The pass key is")


@pytest.fixture(scope="module")
def default_model():
    model, tok, model_id = ha.load_model()
    return model, tok, model_id


@pytest.fixture
def loaded(default_model, monkeypatch):
    """The CLI's loaders hand out the module's model (loading it takes most of a CPU test's time)."""
    model, tok, model_id = default_model
    monkeypatch.setattr(gen_cli, "load_tokenizer", lambda name: (tok, model.config))
    monkeypatch.setattr(gen_cli, "load_model", lambda name, device: (model, model_id))
    return model, tok


def _gen(tmp_path, capsys, *argv, name="out.json"):
    out = tmp_path / name
    assert cli.main(["generate", *argv, "--json", str(out)]) == 0
    cap = capsys.readouterr()
    res = json.loads(out.read_text())
    return res, cap.out, cap.err


def test_tokens_equal_transformers_generate_under_the_same_policy(loaded, tmp_path, capsys):
    model, tok = loaded
    res, out, err = _gen(tmp_path, capsys, "--prompt", PROMPT, "--max-new-tokens", "4", "--policy", "hash",
                         "--budget", "1/4", "--sink", "4", "--window", "4", "--engine", "off")
    ids = tok(PROMPT, return_tensors="pt").input_ids
    pol = ha.HashAttentionPolicy(ha.load_default_maps(model), ha.Budget(heavy=1 / 4, sink=4, window=4))
    with ha.enable(model, pol, mode="decode") as h:
        ref = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)[0, ids.shape[1]:]
        read = h.stats()["tokens_read"]
    assert res["tokens"] == ref.tolist() and res["path"] == "hf"
    text = tok.decode(ref, skip_special_tokens=True)
    assert out == text + ("" if text.endswith("\n") else "\n")  # stdout: the text alone, streamed
    assert "path: hf" in err and "tokens/s" in err and "tokens read per step" in err and "KV cache" in err
    assert res["tokens_read_per_step"] == pytest.approx(read) and read < res["context_per_step"]  # sparse


def test_engine_path_equals_the_hf_path_at_full_budget(loaded, tmp_path, capsys):
    """The engine's step (here its PyTorch references; the CUDA graphs and kernels: tests/gpu_generate_check.py)
    gives the tokens of the Hugging Face path. Its selection at smaller budgets equals the integration's:
    tests/test_engine.py."""
    common = ["--prompt", PROMPT, "--max-new-tokens", "4", "--policy", "hash", "--budget", "full"]
    eng, out_e, err_e = _gen(tmp_path, capsys, *common, "--engine", "on")
    hf, out_h, _ = _gen(tmp_path, capsys, *common, "--engine", "off")
    assert eng["path"] == "engine" and "path: engine" in err_e and hf["path"] == "hf"
    assert eng["tokens"] == hf["tokens"] and out_e == out_h
    assert eng["tokens_read_per_step"] == eng["context_per_step"]  # full budget reads everything


def test_sampling_is_reproducible_from_the_seed(loaded, tmp_path, capsys):
    args = ["--prompt", "Once upon a time", "--max-new-tokens", "4", "--temperature", "0.8", "--top-p", "0.9",
            "--engine", "off", "--seed", "1"]
    a, _, _ = _gen(tmp_path, capsys, *args)
    b, _, _ = _gen(tmp_path, capsys, *args)
    assert a["tokens"] == b["tokens"] and a["temperature"] == 0.8


def test_engine_sampling_is_reproducible_from_the_seed():
    """The engine samples on the device from numbers drawn with its seed: the same seed, the same tokens, with
    generate or stream; another seed, other tokens."""
    from conftest import engine_beside_hf
    from hashattention.engine import Generator
    _, ids, _, _, m = engine_beside_hf(batch=1)
    run = lambda seed: Generator(m, temperature=0.8, top_p=0.9, seed=seed).generate(ids, 12, mode="hash")  # noqa
    a, b, c = run(1), run(1), run(2)
    seen = []
    s = Generator(m, temperature=0.8, top_p=0.9, seed=1).stream(ids, 12, mode="hash", on_token=seen.append)
    assert torch.equal(a, b) and torch.equal(a, s) and not torch.equal(a, c)
    assert [t[0] for t in seen] == a[0].tolist()
    greedy = Generator(m).generate(ids, 12, mode="hash")
    stop = int(greedy[0, 3])
    assert torch.equal(Generator(m).stream(ids, 12, mode="hash", stop_tokens=[stop]), greedy[:, :4])


def test_chat_template_and_prompt_file(loaded, tmp_path, capsys):
    f = tmp_path / "p.txt"
    f.write_text("What is 2 + 2?")
    res, _, err = _gen(tmp_path, capsys, "--prompt-file", str(f), "--chat", "--max-new-tokens", "2", "--engine", "off")
    _, tok = loaded
    assert res["prompt_tokens"] > len(tok("What is 2 + 2?").input_ids) and "chat template" in err


def test_prompt_sources():
    import argparse
    ns = lambda **kw: argparse.Namespace(**{"text": None, "prompt": None, "prompt_file": None, **kw})  # noqa
    assert gen_cli.read_prompt(ns(prompt_file="-"), stdin=io.StringIO("from stdin")) == "from stdin"
    assert gen_cli.read_prompt(ns(), stdin=io.StringIO("piped")) == "piped"
    assert gen_cli.read_prompt(ns(text="arg")) == "arg"

    class Tty(io.StringIO):
        def isatty(self):
            return True
    with pytest.raises(ValueError, match="no prompt"):
        gen_cli.read_prompt(ns(), stdin=Tty())
    with pytest.raises(ValueError, match="empty"):
        gen_cli.read_prompt(ns(), stdin=io.StringIO(" \n"))


class _NoChat:
    chat_template = None
    pad_token = "x"


@pytest.mark.parametrize("argv,match", [
    (["--prompt", ""], "empty"),
    (["   \n"], "empty"),
    (["hi", "--prompt", "hi"], "once"),
    (["--prompt", "hi", "--policy", "bogus_policy"], "unknown policy 'bogus_policy'; available: .*quest"),
    (["--prompt", "hi", "--mode", "sometimes"], "unknown mode 'sometimes'"),
    (["--prompt", "hi", "--budget", "two"], "two"),
    (["--prompt", "hi", "--temperature", "-1"], "temperature"),
    (["--prompt", "hi", "--top-p", "0"], "top_p"),
    (["--prompt", "hi", "--max-new-tokens", "0"], "max-new-tokens"),
    (["--prompt", "hi", "--prompt-file", "/no/such/prompt.txt"], "once"),
    (["--prompt-file", "/no/such/prompt.txt"], "/no/such/prompt.txt"),
    (["--prompt", "hi", "--maps", "/no/such/maps"], "/no/such/maps"),
])
def test_bad_arguments_fail_before_anything_loads(argv, match, monkeypatch, capsys):
    monkeypatch.setattr(gen_cli, "load_tokenizer", lambda *a: pytest.fail("the tokenizer was loaded before checking"))
    monkeypatch.setattr(gen_cli, "load_model", lambda *a: pytest.fail("the model was loaded before checking"))
    assert cli.main(["generate", *argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    import re
    assert re.search(match, err), err


def test_unknown_family_and_hash_without_maps_fail_before_loading(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gen_cli, "load_tokenizer", lambda *a: pytest.fail("the tokenizer was loaded before checking"))
    monkeypatch.setattr(gen_cli, "load_model", lambda *a: pytest.fail("the model was loaded before checking"))
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    assert cli.main(["generate", "--prompt", "hi", "--model", str(gpt2)]) == 2
    err = capsys.readouterr().err
    assert "'gpt2' is not supported" in err and "llama" in err
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert cli.main(["generate", "--prompt", "hi", "--model", str(llama)]) == 2
    assert "needs --maps" in capsys.readouterr().err
    assert cli.main(["generate", "--prompt", "hi", "--model", str(llama), "--policy", "quest", "--engine", "on"]) == 2
    assert "engine" in capsys.readouterr().err


def test_too_long_prompt_cache_and_chat_fail_before_the_model_loads(default_model, monkeypatch, capsys):
    model, tok, _ = default_model
    monkeypatch.setattr(gen_cli, "load_tokenizer", lambda name: (tok, model.config))
    monkeypatch.setattr(gen_cli, "load_model", lambda *a: pytest.fail("the model was loaded before checking"))
    window = model.config.max_position_embeddings
    assert cli.main(["generate", "--prompt", "word " * (window + 10)]) == 2
    assert f"longer than the model's window ({window} tokens)" in capsys.readouterr().err
    assert cli.main(["generate", "--prompt", "hi", "--max-new-tokens", str(window)]) == 2
    assert "--max-new-tokens" in capsys.readouterr().err
    assert cli.main(["generate", "--prompt", "one two three", "--max-new-tokens", "8", "--cache-len", "6"]) == 2
    assert "planned cache of 6 tokens" in capsys.readouterr().err
    assert cli.main(["generate", "--prompt", "hi", "--budget", "5000"]) == 2
    assert "5000" in capsys.readouterr().err
    monkeypatch.setattr(gen_cli, "load_tokenizer", lambda name: (_NoChat(), model.config))
    assert cli.main(["generate", "--prompt", "hi", "--chat"]) == 2
    assert "no chat template" in capsys.readouterr().err


def test_text_stream_waits_for_whole_characters():
    class Tok:  # token ids are bytes of UTF-8
        def decode(self, ids, skip_special_tokens=True):
            return bytes(ids).decode("utf-8", errors="replace")
    out = io.StringIO()
    s = gen_cli.TextStream(Tok(), out)
    s.put(torch.tensor([[1, 2]]))  # the prompt: skipped
    for b in "hé!".encode():
        s.put(torch.tensor([b]))
        assert "\ufffd" not in out.getvalue()
    s.end()
    assert out.getvalue() == "hé!\n" and s.text == "hé!"


def test_sample_top_p_keeps_the_nucleus():
    from hashattention.engine.generate import sample_top_p
    logits = torch.tensor([[0.0, 1.0, 5.0, 2.0]]).repeat(200, 1)
    u = torch.rand(200, generator=torch.Generator().manual_seed(0))
    assert set(sample_top_p(logits, 1.0, 0.5, u).tolist()) == {2}  # the top token alone holds > 0.5
    assert set(sample_top_p(logits, 1.0, 0.99, u).tolist()) == {1, 2, 3}
    assert set(sample_top_p(logits, 1.0, 1.0, u).tolist()) <= {0, 1, 2, 3}
    assert sample_top_p(logits, 1.0, 1.0, torch.full((200,), 0.999999)).max() <= 3
