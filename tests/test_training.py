"""Training the maps: corpus, capture, targets, loss, resume, recall evaluation, CLI and shipped maps."""
import json

import pytest
import torch

from conftest import tiny_model
from hashattention.core.budget import Budget
from hashattention.core.maps import HashMaps
from hashattention.evaluation.heldout import HELDOUT_MODULES
from hashattention.integration.compat import cache_kwarg
from hashattention.policies.hash import HashAttentionPolicy
from hashattention.training.capture import capture, check_capturable
from hashattention.training.corpus import load_documents, pack_sequences, pydoc_modules
from hashattention.training.recall import evaluate_layers, group_similarity, hash_group_scores, project_all
from hashattention.training.trainer import TrainConfig, chunk_loss, targets, train
from hashattention.weights import maps_config_for

SMALL = dict(context=320, qchunk=64, topk=8, sink=16, window=16, prefill_chunk=64, eval_every=3)


def test_pydoc_split_is_disjoint_and_packs():
    train_mods = set(pydoc_modules("train"))
    assert train_mods and not train_mods & set(HELDOUT_MODULES)
    assert "json" in train_mods and "difflib" not in train_mods

    class Tok:
        eos_token_id = 0

        def __call__(self, text, add_special_tokens=False):
            return type("E", (), {"input_ids": [ord(c) % 50 + 1 for c in text]})()
    seqs = pack_sequences(Tok(), ["a" * 100, "b" * 130], 50)
    assert seqs.shape == (4, 50) and (seqs == 0).sum() >= 1  # documents joined by EOS
    with pytest.raises(ValueError, match="fewer than one sequence"):
        pack_sequences(Tok(), ["abc"], 50)


def test_local_data_and_errors(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"body": "hello world"}) + "\n\n" + json.dumps({"body": "x"}) + "\n")
    docs, _ = load_documents(str(tmp_path / "a.jsonl"), text_field="body")
    assert docs == ["hello world", "x"]
    with pytest.raises(ValueError, match="no string field 'text'"):
        load_documents(str(tmp_path / "a.jsonl"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_documents(str(tmp_path / "missing.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no"):
        load_documents(str(tmp_path / "empty"))
    (tmp_path / "blank.txt").write_text("   \n")
    with pytest.raises(ValueError, match="is empty"):
        load_documents(str(tmp_path / "blank.txt"))


def test_capture_matches_the_cache_and_chunking():
    from transformers import DynamicCache
    model = tiny_model(layers=2)
    ids = torch.randint(3, 97, (1, 200))
    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=ids, **{cache_kwarg(model): cache}, use_cache=True)
    a, b = capture(model, ids, chunk=64), capture(model, ids, chunk=500)
    assert a.q.shape == (2, 6, 200, 16) and a.k.shape == (2, 2, 200, 16)
    for layer in range(2):  # post-rotary keys/values: exactly what the cache holds
        torch.testing.assert_close(a.k[layer], cache.layers[layer].keys[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.v[layer], cache.layers[layer].values[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.q, b.q, atol=1e-5, rtol=1e-5)
    assert model.config._attn_implementation == "sdpa"  # restored


def test_capture_errors():
    model = tiny_model(layers=1)
    with pytest.raises(ValueError, match="longer than the model supports"):
        check_capturable(model, 10_000)
    import transformers
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="cannot capture"):
        check_capturable(gpt2, 10)


@pytest.mark.parametrize("target,score", [("group", "weight"), ("head", "weight_vnorm")])
def test_targets_are_the_heaviest_candidates(target, score):
    model = tiny_model(layers=2)
    cap = capture(model, torch.randint(3, 97, (1, 200)))
    tc = TrainConfig(**{**SMALL, "context": 200, "target": target, "score": score})
    s, e = 60, 80
    labels, cand, _ = targets(cap, s, e, tc)
    assert not (labels & ~cand).any()
    assert (labels.sum(-1) == tc.topk).all()
    # brute force for one layer / KV head / query
    layer, h, i = 1, 1, 7
    p = e - 1 - (e - s - 1) + i  # position of query i
    qh = cap.q[layer, 3 * h:3 * h + 3, s + i]  # the group's query heads
    logits = qh @ cap.k[layer, h, :p + 1].T * cap.scale
    w = torch.softmax(logits, -1)
    if score == "weight_vnorm":
        w = w * cap.v[layer, h, :p + 1].norm(dim=-1)
    w = w.sum(0, keepdim=True) if target == "group" else w
    w[:, :tc.sink] = -1
    w[:, p - tc.window + 1:] = -1
    want = torch.zeros(w.shape[0], e, dtype=torch.bool)
    want.scatter_(-1, w.topk(tc.topk, -1).indices, True)
    got = labels[layer, h, i] if target == "group" else labels[layer, h, :, i]
    assert torch.equal(got.reshape(want.shape), want)


def test_training_lowers_the_loss_and_resumes_exactly(tmp_path):
    model = tiny_model(layers=2)
    seqs = torch.randint(3, 97, (4, 320))
    cfg = maps_config_for(model.config, hidden=32)
    tc = TrainConfig(**SMALL, lr=1e-2)
    cap = capture(model, seqs[:1])
    torch.manual_seed(0)  # the trainer's initial maps
    before = float(chunk_loss(HashMaps(cfg), cap, 100, 164, tc)[0].detach())
    full = train(model, seqs, cfg, tc, checkpoint=str(tmp_path / "a.pt"), progress=False)
    after = float(chunk_loss(full, cap, 100, 164, tc)[0].detach())
    assert after < 0.95 * before  # random tiny model: weak signal, but a no-op trainer fails
    assert full.config.extra["sequences"] == 4 and full.config.extra["steps"] == 4 * 5
    # stop after 2 sequences, resume from the checkpoint: same maps as the uninterrupted run
    train(model, seqs[:2], maps_config_for(model.config, hidden=32), tc, checkpoint=str(tmp_path / "b.pt"),
          progress=False)
    resumed = train(model, seqs, maps_config_for(model.config, hidden=32), tc, checkpoint=str(tmp_path / "b.pt"),
                    resume=True, progress=False, log=lambda *a: None)
    assert resumed.config.extra["steps"] == 20
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="other maps settings"):
        train(model, seqs, maps_config_for(model.config, hidden=16), tc, checkpoint=str(tmp_path / "b.pt"),
              resume=True, progress=False)


def test_recall_scores_are_the_policys_scores():
    model = tiny_model(layers=2)
    cap = capture(model, torch.randint(3, 97, (1, 150)))
    maps = HashMaps(maps_config_for(model.config, hidden=32))
    pol = HashAttentionPolicy(maps, Budget(1 / 8, 16, 16))
    q, k, v = cap.q[:, :, -10:], cap.k, cap.v
    mine = hash_group_scores(maps, q, k, v)
    for layer in range(2):
        st = {}
        pol.update(layer, st, k[layer:layer + 1], v[layer:layer + 1], 0)
        ref = pol.scores(layer, st, q[layer:layer + 1], k[layer:layer + 1], v[layer:layer + 1], None, cap.scale)
        assert torch.equal(mine[layer], ref[0].long())
    r = evaluate_layers({"m": maps}, cap, budgets=(1 / 4,), queries=8, sink=16, window=16)
    rec = r["m"]["1/4"]["recall"]
    assert len(rec) == 2 and all(0 <= x <= 1 for x in rec)
    assert r["oracle"]["1/4"]["recall"] == [1.0, 1.0]
    assert all(e <= m + 1e-6 for e, m in zip(r["oracle"]["1/4"]["rel_error"], [10, 10]))


def _tiny_folder(tmp_path):
    """A tiny llama model with a real (byte-level BPE) tokenizer, saved to a folder: no download."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    from transformers import PreTrainedTokenizerFast
    text = [t for _, t in __import__("hashattention.training.corpus", fromlist=["x"]).pydoc_documents(
        "train", limit_chars=60000)]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(text, trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    model = tiny_model(layers=2, vocab=tk.get_vocab_size())
    model.config.max_position_embeddings = 1024
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    half = len(text) // 2
    (tmp_path / "train.txt").write_text("\n".join(text[:half]))
    (tmp_path / "held.txt").write_text("\n".join(text[half:]))
    return str(tmp_path / "m")


def test_cli_train_and_recall_end_to_end(tmp_path, capsys):
    from hashattention.cli.main import main
    folder = _tiny_folder(tmp_path)
    common = ["--model", folder, "--device", "cpu"]
    out = tmp_path / "maps"
    rc = main(["train", *common, "--data", str(tmp_path / "train.txt"), "--heldout", str(tmp_path / "held.txt"),
               "--context", "320", "--sequences", "3", "--qchunk", "64", "--topk", "8", "--sink", "16",
               "--window", "16", "--hidden", "32", "--dtype", "float32", "--out", str(out), "--quiet",
               "--finetune-passkey", "1", "--lengths", "160,320", "--questions", "2"])
    assert rc == 0
    meta = json.loads((tmp_path / "maps.json").read_text())["config"]
    assert meta["extra"]["sequences"] == 4 and meta["extra"]["tokens"] == 1280 and meta["extra"]["steps"] > 0
    assert meta["extra"]["lengths"] == [160, 320]
    assert "1 passkey prompts" in meta["extra"]["data"]
    assert "2 retrieval questions" in meta["extra"]["data"] and meta["extra"]["question_prompts"] == 2
    assert meta["extra"]["target"] == "group" and "train.txt" in meta["extra"]["data"]
    capsys.readouterr()
    rc = main(["recall", *common, "--maps", str(out), "--names", "learned", "--data", str(tmp_path / "held.txt"),
               "--context", "320", "--sequences", "1", "--queries", "16", "--sink", "16", "--window", "16",
               "--budgets", "1/4,1/8", "--json", str(tmp_path / "r.json")])
    assert rc == 0
    res = json.loads((tmp_path / "r.json").read_text())["results"]
    assert set(res) == {"learned", "simhash-32", "oracle"} and len(res["learned"]["1/8"]["recall"]) == 2
    assert "| learned (recall) | 1/8 |" in capsys.readouterr().out
    # the suite's prompts with their answer appended, one column per layer
    rc = main(["recall", *common, "--maps", str(out), "--names", "learned", "--answers", "niah_single_noise",
               "--suite-length", "320", "--suite-samples", "1", "--sink", "16", "--window", "16", "--budgets", "1/4",
               "--layer-groups", "2", "--no-simhash", "--json", str(tmp_path / "a.json")])
    assert rc == 0
    info = json.loads((tmp_path / "a.json").read_text())
    assert info["sequences"] == 1 and "niah_single_noise" in info["data"] and info["context"] == 320
    assert len(info["results"]["learned"]["1/4"]["rel_error"]) == 2 and info["results"]["oracle"]["1/4"]["recall"]
    out_md = capsys.readouterr().out
    assert "| layer 0 | layer 1 | all layers |" in out_md and "the queries that produce the answer" in out_md
    for argv, msg in [(["--answers", "no_such_task"], "no_such_task"), (["--answers", "vt", "--suite-samples", "0"],
                                                                         "--suite-samples")]:
        assert main(["recall", *common, "--maps", str(out), *argv]) == 2
        assert msg in capsys.readouterr().err
    # bad input: clear one-line errors before any long work
    for argv, msg in [(["--data", str(tmp_path / "missing.txt")], "does not exist"),
                      (["--data", str(tmp_path / "train.txt"), "--context", "5000"], "longer than the model supports"),
                      (["--data", str(tmp_path / "train.txt"), "--context", "320", "--lengths", "640"],
                       "training length 640"),
                      (["--data", str(tmp_path / "train.txt"), "--questions", "-1"], "--questions")]:
        assert main(["train", *common, *argv, "--out", str(tmp_path / "x"), "--quiet"]) == 2
        assert msg in capsys.readouterr().err
    (tmp_path / "empty.txt").write_text("")
    assert main(["train", *common, "--data", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "x")]) == 2
    assert "empty" in capsys.readouterr().err


def test_shipped_maps_fit_the_default_model():
    from hashattention.shipped import DEFAULT_MAPS, has_default_maps, load_default_maps
    from hashattention.weights import _sha256 as maps_sha
    assert has_default_maps()
    maps = load_default_maps()
    c = maps.config
    assert (c.num_layers, c.num_q_heads, c.num_kv_heads, c.head_dim, c.bits) == (30, 9, 3, 64, 32)
    assert c.model_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    e = c.extra
    assert e["kind"] == "learned" and e["data"].startswith("pydoc:train") and e["tokens"] + e["init_tokens"] > 10**6
    # fine-tuned from the text-only maps shipped before, retrieval questions mixed in (docs/quality.md)
    assert e["question_prompts"] > 0 and len(e["init_sha256"]) == 64 and e["init_sha256"] != maps_sha(DEFAULT_MAPS)
    assert c.hidden == 128 and c.depth == 3  # the paper's MLP: head_dim -> 128 -> 128 -> 32
    # one MLP per head, bf16: 30 x 12 x 28.7K weights = 20 MiB; the package (and a device call) stays small
    assert DEFAULT_MAPS.stat().st_size < 24 * 2**20


def test_ctrl_c_during_training_leaves_a_usable_checkpoint(tmp_path, monkeypatch):
    """Ctrl-C in the middle of a run: the checkpoint holds what was learned, and --resume finishes the run."""
    import hashattention.training.trainer as T
    model = tiny_model(layers=2)
    seqs = torch.randint(3, 97, (4, 320))
    tc = TrainConfig(**SMALL, lr=1e-2)  # save_every=10: no regular checkpoint before the interruption
    ck = str(tmp_path / "c.pt")
    real, calls = T.capture, []

    def capture_then_ctrl_c(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **kw)
    monkeypatch.setattr(T, "capture", capture_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        train(model, seqs, maps_config_for(model.config, hidden=32), tc, checkpoint=ck, progress=False,
              log=lambda *a: None)
    saved = torch.load(ck, weights_only=True)
    assert saved["state"]["seq"] == 2 and saved["state"]["step"] == 2 * 5
    monkeypatch.setattr(T, "capture", real)
    resumed = train(model, seqs, maps_config_for(model.config, hidden=32), tc, checkpoint=ck, resume=True,
                    progress=False, log=lambda *a: None)
    assert resumed.config.extra["sequences"] == 4 and resumed.config.extra["steps"] == 20
    torch.manual_seed(0)
    full = train(model, seqs, maps_config_for(model.config, hidden=32), tc, progress=False)
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b)  # interrupted at a sequence boundary: the same maps


def test_hub_dataset_path_on_local_rows(monkeypatch):
    """A Hugging Face dataset name goes through datasets.load_dataset (streaming); here a stand-in module
    serves local rows, so the path is tested without a download."""
    import sys
    import types
    calls = []

    def load_dataset(name, split, streaming):
        calls.append((name, split, streaming))
        rows = {"org/good": [{"text": "first document " * 50}, {"text": "second document " * 50}],
                "org/empty": [], "org/nofield": [{"content": "x"}]}[name]
        return iter(rows)
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    docs, desc = load_documents("org/good", split="train", limit_chars=100)
    assert docs == ["first document " * 50] and desc == "hf:org/good:train"  # stops at limit_chars
    assert calls == [("org/good", "train", True)]
    with pytest.raises(ValueError, match="empty"):
        load_documents("org/empty")
    with pytest.raises(ValueError, match="--text-field"):
        load_documents("org/nofield")
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(ValueError, match="pip install datasets"):
        load_documents("org/good")


def test_cli_train_fits_a_bucket_projection(tmp_path, capsys):
    """`hashattention train --bucket-projection`: the learned projection of bucket hashing comes from the same
    training command and data pipeline; the file loads into the same variant and is refused by another."""
    from hashattention.cli.main import main
    from hashattention.core.budget import Budget
    from hashattention.policies.bucket import parse_variant
    folder = _tiny_folder(tmp_path)
    out = tmp_path / "proj"
    rc = main(["train", "--model", folder, "--device", "cpu", "--data", str(tmp_path / "train.txt"),
               "--context", "256", "--sequences", "2", "--sink", "16", "--window", "16", "--out", str(out), "--quiet",
               "--bucket-projection", "bucket-lsh_b4"])
    assert rc == 0
    res = json.loads((tmp_path / "proj.json").read_text())
    assert res["sequences"] == 2 and res["config"]["agg"] == "proj" and res["config"]["bits"] == 4
    assert res["mse_proj"] <= res["mse_mean"] + 1e-9  # least squares never loses to its own mean-pool input
    cls, kw = parse_variant("bucket-lsh_b4_proj")
    pol = cls(Budget(heavy="1/16", sink=128, window=128), **kw).load_projection(str(tmp_path / "proj.safetensors"))
    assert len(pol.projection) == 2
    cls, kw = parse_variant("bucket-lsh_b8_proj")
    with pytest.raises(ValueError, match="another bucket configuration"):
        cls(Budget(heavy="1/16"), **kw).load_projection(str(tmp_path / "proj.safetensors"))
    capsys.readouterr()
    assert main(["train", "--model", folder, "--device", "cpu", "--data", str(tmp_path / "train.txt"),
                 "--context", "256", "--out", str(out), "--bucket-projection", "bucket-nope"]) == 2
    assert "unknown bucket policy" in capsys.readouterr().err


def test_mixed_lengths_cut_sequences_into_pieces_from_position_zero(monkeypatch):
    """lengths=(80, 160, 320): sequence 0 trains as four 80-token pieces, 1 as two of 160, 2 whole; each piece is
    captured on its own (prefilled from position 0); the steps add up; lengths outside (first query, context]
    are refused before any work."""
    from hashattention.training import trainer as tr
    model = tiny_model(layers=2)
    seqs = torch.randint(3, 97, (3, 320))
    seen = []
    real = tr.capture

    def spy(m, ids, chunk=1024, dtype=None):
        seen.append(ids.clone())
        return real(m, ids, chunk, dtype)
    monkeypatch.setattr(tr, "capture", spy)
    tc = TrainConfig(**SMALL, lengths=(80, 160, 320))
    maps = train(model, seqs, maps_config_for(model.config, hidden=16), tc, progress=False)
    assert [x.shape[1] for x in seen] == [80] * 4 + [160] * 2 + [320]
    assert torch.equal(torch.cat(seen[:4], 1), seqs[:1]) and torch.equal(torch.cat(seen[4:6], 1), seqs[1:2])
    assert maps.config.extra["steps"] == 4 * 1 + 2 * 2 + 5 and maps.config.extra["lengths"] == [80, 160, 320]
    assert [p.shape[1] for p in TrainConfig(**SMALL, lengths=(100,)).pieces(0, seqs[:1])] == [100] * 3  # 20 left
    for bad in [(39,), (640,)]:
        with pytest.raises(ValueError, match="training length"):
            TrainConfig(**SMALL, lengths=bad)


def test_query_weight_mass_counts_each_query_by_its_candidates_weight():
    """query_weight="mass": the loss is the per-query BCE weighted by the candidates' attention weight (the group's
    mean), checked against a direct computation; uniform weights reproduce the plain loss; bad names refused."""
    from hashattention.training.trainer import targets
    model = tiny_model(layers=2)
    cap = capture(model, torch.randint(3, 97, (1, 200)))
    torch.manual_seed(0)
    maps = HashMaps(maps_config_for(model.config, hidden=16))
    s, e = 60, 80
    plain = TrainConfig(**{**SMALL, "context": 200})
    mass_tc = TrainConfig(**{**SMALL, "context": 200, "query_weight": "mass"})
    labels, cand, mass = targets(cap, s, e, mass_tc)
    assert mass.shape == labels.shape[:-1] and (mass >= 0).all() and (mass <= 1 + 1e-5).all()
    # brute force one layer / KV head / query: the group's mean weight on the candidates
    q = cap.q[1, 3:6, s + 5].float()
    w = torch.softmax(q @ cap.k[1, 1, :s + 6].float().T * cap.scale, -1)
    want = w[:, plain.sink:s + 5 - plain.window + 1].sum(-1).mean()
    torch.testing.assert_close(mass[1, 1, 5], want, rtol=1e-4, atol=1e-5)
    loss_u = chunk_loss(maps, cap, s, e, plain)[0]
    loss_m = chunk_loss(maps, cap, s, e, mass_tc)[0]
    # the same per-query sums, reweighted: recompute from the plain loss's pieces
    sq = torch.tanh(project_all(maps.q, cap.q[:, :, s:e].float()))
    sk = torch.tanh(project_all(maps.k, cap.k[:, :, :e].float()))
    sim = group_similarity(sq, sk, cap.k.shape[1]).mean(2)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(sim, labels.float(), reduction="none")
    per_q = (bce * torch.where(labels, 20.0, 1.0)).masked_fill(~cand, 0).sum(-1)
    torch.testing.assert_close(loss_u, per_q.sum() / (cand.sum() * sim.shape[0] * sim.shape[1]), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(loss_m, (per_q * mass).sum() / (mass * cand.sum(-1)).sum(), rtol=1e-4, atol=1e-6)
    assert not torch.isclose(loss_u, loss_m)  # the weighting changes the loss
    with pytest.raises(ValueError, match="query_weight"):
        TrainConfig(**SMALL, query_weight="heavy")


def test_cosine_lr_decay_reaches_zero_and_is_recorded():
    """lr_decay="cosine": the factor falls from 1 to 0 over the run's steps or its time limit, whichever ends first;
    a run records it; bad names refused."""
    from hashattention.training.trainer import _cosine
    assert _cosine({"step": 0}, 10, None, 0.0) == 1.0
    assert abs(_cosine({"step": 5}, 10, None, 0.0) - 0.5) < 1e-9
    assert _cosine({"step": 10}, 10, None, 0.0) < 1e-9
    assert abs(_cosine({"step": 1}, 100, 10.0, 5.0) - 0.5) < 1e-9  # time is further along than steps
    model = tiny_model(layers=2)
    seqs = torch.randint(3, 97, (2, 320))
    seen = []
    real_step = torch.optim.Adam.step

    def spy(self, *a, **k):
        seen.append(self.param_groups[0]["lr"])
        return real_step(self, *a, **k)
    torch.optim.Adam.step = spy
    try:
        maps = train(model, seqs, maps_config_for(model.config, hidden=16),
                     TrainConfig(**SMALL, lr=1e-2, lr_decay="cosine"), progress=False)
    finally:
        torch.optim.Adam.step = real_step
    assert len(seen) == 10 and seen[0] == pytest.approx(1e-2) and seen[-1] < 0.05 * 1e-2
    assert all(a >= b for a, b in zip(seen, seen[1:]))
    assert maps.config.extra["lr_decay"] == "cosine"
    with pytest.raises(ValueError, match="lr_decay"):
        TrainConfig(**SMALL, lr_decay="linear")


def test_ste_relaxation_scores_by_the_hard_bits_with_tanh_gradients():
    """relax="ste": forward values are the signs (0 -> -1), gradients are tanh's; the loss is the hard bit matches'
    BCE; bad names refused."""
    from hashattention.training.trainer import _relaxed_sign
    x = torch.tensor([-2.0, -0.1, 0.0, 0.3, 1.5], requires_grad=True)
    y = _relaxed_sign(x, "ste")
    assert torch.equal(y.detach(), torch.tensor([-1.0, -1.0, -1.0, 1.0, 1.0]))
    y.sum().backward()
    torch.testing.assert_close(x.grad, 1 - torch.tanh(x.detach()) ** 2)
    model = tiny_model(layers=2)
    cap = capture(model, torch.randint(3, 97, (1, 200)))
    torch.manual_seed(0)
    maps = HashMaps(maps_config_for(model.config, hidden=16))
    tc = TrainConfig(**{**SMALL, "context": 200, "relax": "ste"})
    loss, labels, cand = chunk_loss(maps, cap, 60, 80, tc)
    hard = hash_group_scores(maps, cap.q[:, :, 60:80], cap.k[:, :, :80], cap.v[:, :, :80])  # bit matches, group sum
    g = cap.q.shape[1] // cap.k.shape[1]
    sim = (2 * hard.float() - maps.config.bits * g) / g  # the group's mean +-1 dot product
    bce = torch.nn.functional.binary_cross_entropy_with_logits(sim, labels.float(), reduction="none")
    want = (bce * torch.where(labels, 20.0, 1.0)).masked_fill(~cand, 0).sum() / (cand.sum() * sim.shape[0] * sim.shape[1])
    torch.testing.assert_close(loss.detach(), want, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="relax"):
        TrainConfig(**SMALL, relax="sigmoid")


def test_training_some_layers_keeps_the_others_and_matches_a_direct_run(tmp_path, capsys):
    """tc.layers: only the listed layers' maps change (the others are --init's), and they equal a run of the
    layers alone (take_layers / put_layers); --init required; bad indices named; the CLI runs it and
    `recall --selections --layers` evaluates only those layers."""
    from hashattention.cli.main import main
    model = tiny_model(layers=3)
    seqs = torch.randint(3, 97, (2, 320))
    cfg = maps_config_for(model.config, hidden=16)
    torch.manual_seed(5)
    start = HashMaps(cfg)
    tc = TrainConfig(**SMALL, lr=1e-2, layers=(2, 0))
    got = train(model, seqs, maps_config_for(model.config, hidden=16), tc, init=start, progress=False)
    assert got.config.extra["trained_layers"] == [2, 0]
    for (name, a), b in zip(got.state_dict().items(), start.state_dict().values()):
        torch.testing.assert_close(a[1], b[1], msg=name)  # layer 1 untouched
        assert not torch.equal(a[[2, 0]], b[[2, 0]]), name
    # the same steps on the two layers alone
    part = start.take_layers([2, 0])
    opt = torch.optim.Adam(part.parameters(), lr=1e-2)
    torch.manual_seed(0)
    for i in range(2):
        cap = capture(model, seqs[i:i + 1]).take_layers([2, 0])
        for s in range(tc.first_query, 320, tc.qchunk):
            loss = chunk_loss(part, cap, s, min(s + tc.qchunk, 320), tc)[0]
            opt.zero_grad()
            loss.backward()
            opt.step()
    whole = HashMaps(cfg)
    whole.load_state_dict(start.state_dict())
    whole.put_layers([2, 0], part)
    for a, b in zip(got.state_dict().values(), whole.state_dict().values()):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="--init"):
        train(model, seqs, cfg, tc, progress=False)
    with pytest.raises(ValueError, match="not layers of these maps"):
        train(model, seqs, cfg, TrainConfig(**SMALL, layers=(3,)), init=start, progress=False)
    with pytest.raises(ValueError, match="distinct"):
        TrainConfig(**SMALL, layers=(1, 1))
    # CLI
    folder = _tiny_folder(tmp_path)
    common = ["--model", folder, "--device", "cpu"]
    base = tmp_path / "base"
    args = ["--data", str(tmp_path / "train.txt"), "--heldout", str(tmp_path / "held.txt"), "--context", "320",
            "--sequences", "2", "--qchunk", "64", "--topk", "8", "--sink", "16", "--window", "16", "--hidden", "32",
            "--dtype", "float32", "--quiet"]
    assert main(["train", *common, *args, "--out", str(base)]) == 0
    assert main(["train", *common, *args, "--out", str(tmp_path / "part"), "--init", str(base) + ".safetensors",
                 "--layers", "1", "--lr-decay", "cosine"]) == 0
    meta = json.loads((tmp_path / "part.json").read_text())["config"]["extra"]
    assert meta["trained_layers"] == [1] and meta["lr_decay"] == "cosine"
    assert main(["train", *common, *args, "--out", str(tmp_path / "x"), "--layers", "1"]) == 2
    assert "--init" in capsys.readouterr().err
    assert main(["train", *common, *args, "--out", str(tmp_path / "x"), "--layers", "a"]) == 2
    assert "layer indices" in capsys.readouterr().err
    for argv, msg in [(["--layers", "x"], "layer indices"), (["--layers", "1", "--top-p", "0.9"], "adaptive budget"),
                      (["--layers", "5", "--suite-length", "1000"], "not layers of these maps")]:
        assert main(["recall", *common, "--maps", str(tmp_path / "part") + ".safetensors", "--selections", "sum",
                     *argv]) == 2
        assert msg in capsys.readouterr().err
    # the capture's and the maps' layers picked alike: evaluating the part = evaluating that layer
    from hashattention.training.recall import evaluate_selections
    maps = HashMaps(cfg)
    cap = capture(model, seqs[:1])
    one = evaluate_selections(maps.take_layers([1]), cap.take_layers([1]), 300, (1 / 8,), ("sum",), 16, 16)
    both = evaluate_selections(maps, cap, 300, (1 / 8,), ("sum",), 16, 16)
    other = evaluate_selections(maps.take_layers([0, 2]), cap.take_layers([0, 2]), 300, (1 / 8,), ("sum",), 16, 16)
    for key in ("heavy_mass", "top1", "rel_error"):  # the mean over 3 layers = (layer 1 + 2 x the other two) / 3
        assert both["sum@1/8"][key] == pytest.approx((one["sum@1/8"][key] + 2 * other["sum@1/8"][key]) / 3, rel=1e-4)


class _CharTok:
    """Characters as tokens (no chat template): prompts can be checked character by character."""
    chat_template = None

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]


def test_question_prompts_fit_their_length_and_ask_a_fact_of_the_text():
    from hashattention.training.questions import question_prompts
    import random
    r = random.Random(0)
    words = ["".join(r.choice("abcdefghij") for _ in range(6)) for _ in range(60)]
    docs = [" ".join(r.choice(words) for _ in range(8)) + f" {i}" for i in range(400)]
    got = question_prompts(_CharTok(), docs, 6, (900, 1800), seed=3)
    again = question_prompts(_CharTok(), docs, 6, (900, 1800), seed=3)
    assert all(torch.equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(got, again))  # seeded
    for i, (ids, qstart) in enumerate(got):
        n = (900, 1800)[i % 2]
        assert ids.dim() == 2 and ids.shape[0] == 1 and 0.9 * n <= ids.shape[1] <= n
        text = "".join(map(chr, ids[0].tolist()))
        context, tail = text[:qstart], text[qstart:]
        assert tail.split("\n")[0].endswith("?") and "\n\n" not in tail  # the question starts at qstart
        value = tail.rsplit(" ", 1)[1].rstrip(".")
        question = tail.split("\n")[0]
        name = next(w for w in question.rstrip("?").split() if "_" in w)
        facts = [ln for ln in context.split("\n") if name in ln]
        assert len(facts) == 1 and value in facts[0]  # the answer is the asked fact's value, stated once
    # built side by side (one batched tokenization per round, as a fast tokenizer gets them): the same prompts
    # as one at a time from the same random stream
    from hashattention.training.questions import question_prompt

    class _BatchTok(_CharTok):
        is_fast, calls = True, 0

        def __call__(self, texts, add_special_tokens=False):
            self.calls += 1
            return {"input_ids": [self.encode(t) for t in texts]}

    lines = [ln.strip() for d in docs for ln in d.splitlines() if len(ln.strip()) > 20]
    words = sorted({w.lower() for ln in lines for w in __import__("re").findall(r"[A-Za-z]{4,10}", ln)})
    rng, batch, toks = random.Random(10**6 + 3), _BatchTok(), [_BatchTok() for _ in range(6)]
    one = [question_prompt(toks[i], lines, words, (900, 1800)[i % 2], rng) for i in range(6)]
    side = question_prompts(batch, docs, 6, (900, 1800), seed=3)
    assert all(torch.equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(one, side)) and len(side) == 6
    assert all(torch.equal(a[0], b[0]) for a, b in zip(got, side))
    assert batch.calls == max(t.calls for t in toks) < sum(t.calls for t in toks)  # one call per round
    with pytest.raises(ValueError, match="too small"):
        question_prompts(_CharTok(), ["short"], 1, (500,))
    with pytest.raises(ValueError, match="does not fit in 100 tokens"):
        question_prompts(_CharTok(), docs, 1, (100,))


def test_training_with_questions_trains_their_queries_only():
    """The question prompts' steps run after their sequence, from qstart on (the question and the answer):
    the same as a direct loop over those steps; the count is in the maps' facts."""
    model = tiny_model(layers=2)
    seqs = torch.randint(3, 97, (2, 320))
    cfg = maps_config_for(model.config, hidden=16)
    qs = [(torch.randint(3, 97, (1, 300)), 250), (torch.randint(3, 97, (1, 280)), 60)]
    tc = TrainConfig(**SMALL, lr=1e-2)
    torch.manual_seed(1)
    start = HashMaps(cfg)
    got = train(model, seqs, cfg, tc, init=start, progress=False, questions=qs)
    assert got.config.extra["question_prompts"] == 2
    plain = train(model, seqs, cfg, tc, init=start, progress=False)
    steps = lambda L, s0: len(range(s0, L, tc.qchunk))  # noqa: E731
    assert got.config.extra["steps"] == plain.config.extra["steps"] + steps(300, 250) + steps(280, tc.first_query)
    direct = HashMaps(cfg)
    direct.load_state_dict(start.state_dict())
    opt = torch.optim.Adam(direct.parameters(), lr=1e-2)
    work = [(seqs[0:1], tc.first_query), qs[0], (seqs[1:2], tc.first_query), qs[1]]
    for ids, s0 in work:
        cap = capture(model, ids)
        for s in range(max(s0, tc.first_query), ids.shape[1], tc.qchunk):
            loss = chunk_loss(direct, cap, s, min(s + tc.qchunk, ids.shape[1]), tc)[0]
            opt.zero_grad()
            loss.backward()
            opt.step()
    for a, b in zip(got.state_dict().values(), direct.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_recall_selections_compares_several_maps_on_the_same_captures(tmp_path, capsys):
    """`recall --selections --maps A,B --names a,b`: one capture per prompt, rows per maps; the same maps twice
    give the same rows, other maps other rows; names must match the files."""
    from hashattention.cli.main import main
    from hashattention.weights import save_maps
    folder = _tiny_folder(tmp_path)
    conf = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**conf, "max_position_embeddings": 4096}))
    from transformers import AutoConfig
    cfg = maps_config_for(AutoConfig.from_pretrained(folder), hidden=16)
    torch.manual_seed(1)
    save_maps(HashMaps(cfg), tmp_path / "a")
    torch.manual_seed(2)
    save_maps(HashMaps(cfg), tmp_path / "b")
    a, b = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    common = ["recall", "--model", folder, "--device", "cpu", "--selections", "sum", "--suite-length", "2600",
              "--suite-samples", "1", "--sink", "16", "--window", "16", "--budgets", "1/8"]
    assert main([*common, "--maps", f"{a},{a},{b}", "--names", "x,y,z", "--json", str(tmp_path / "s.json")]) == 0
    res = json.loads((tmp_path / "s.json").read_text())
    by = res["rows_by_maps"]
    assert set(by) == {"x", "y", "z"} and res["rows"] == by["x"] and res["maps_files"]["z"] == b
    assert by["x"] == by["y"] and by["x"]["sum@1/8"] != by["z"]["sum@1/8"]
    assert by["x"]["oracle@1/8"] == by["z"]["oracle@1/8"]  # the same captures
    capsys.readouterr()
    assert main([*common, "--maps", f"{a},{b}", "--names", "x"]) == 2
    assert "names" in capsys.readouterr().err
