"""Import of the authors' HashAttention-1.0 map layout into our maps."""
import pytest
import torch
from torch import nn

from hashattention.cli.main import main
from hashattention.core.signatures import match_scores
from hashattention.training.authors import import_usa, load_state_dict
from hashattention.weights import load_maps


def _authors_state_dict(layers=2, heads=4, head_dim=16, hidden=128, bits=32, seed=0):
    """A state dict built exactly like the authors' USA module: ModuleList over layers of modules holding
    learning_to_hash_transformation_{q,k} = ModuleList over query heads of Sequential(Linear, SiLU, ...)."""
    torch.manual_seed(seed)

    class USA(nn.Module):
        def __init__(self):
            super().__init__()
            mk = lambda: nn.Sequential(nn.Linear(head_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                       nn.Linear(hidden, bits))
            self.learning_to_hash_transformation_q = nn.ModuleList(mk() for _ in range(heads))
            self.learning_to_hash_transformation_k = nn.ModuleList(mk() for _ in range(heads))

    mods = nn.ModuleList(USA() for _ in range(layers))
    return mods, mods.state_dict()


def test_import_matches_authors_modules(tmp_path):
    mods, sd = _authors_state_dict()
    assert "1.learning_to_hash_transformation_k.3.4.weight" in sd
    assert tuple(sd["0.learning_to_hash_transformation_q.0.0.weight"].shape) == (128, 16)
    path = tmp_path / "usa.pt"
    torch.save(sd, path)
    maps = import_usa(load_state_dict(path), num_kv_heads=2)
    c = maps.config
    assert (c.num_layers, c.num_q_heads, c.key_heads, c.num_kv_heads, c.depth, c.bits) == (2, 4, 4, 2, 3, 32)
    q = torch.randn(1, 4, 5, 16)
    k = torch.randn(1, 4, 7, 16)
    for layer in range(2):
        ref_q = torch.stack([mods[layer].learning_to_hash_transformation_q[h](q[0, h]) for h in range(4)])[None]
        ref_k = torch.stack([mods[layer].learning_to_hash_transformation_k[h](k[0, h]) for h in range(4)])[None]
        torch.testing.assert_close(maps.project_q(layer, q), ref_q, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(maps.project_k(layer, k), ref_k, atol=1e-5, rtol=1e-5)
    # signatures score like the authors' ±1 dot product: matches = (bits + <sign q, sign k>) / 2
    s = match_scores(maps.query_signature(0, q), maps.key_signature(0, k))
    dot = torch.sign(ref_q := maps.project_q(0, q)) @ torch.sign(maps.project_k(0, k)).transpose(-1, -2)
    assert torch.equal(s.long(), ((32 + dot) / 2).long())


def test_cli_import_roundtrip(tmp_path, capsys):
    _, sd = _authors_state_dict(layers=1, heads=2, head_dim=8, hidden=16, bits=32)
    torch.save(sd, tmp_path / "m.pt")
    assert main(["import-maps", str(tmp_path / "m.pt"), "--kv-heads", "1", "--out", str(tmp_path / "out")]) == 0
    maps = load_maps(tmp_path / "out")
    assert maps.config.key_heads == 2 and maps.config.hidden == 16
    assert maps.config.extra["source_file"] == "m.pt"


def test_bad_files(tmp_path, capsys):
    _, sd = _authors_state_dict(layers=1, heads=2, head_dim=8, hidden=16)
    bad = dict(sd)
    del bad["0.learning_to_hash_transformation_k.1.2.weight"]
    with pytest.raises(ValueError, match=r"missing 0\.learning_to_hash_transformation_k\.1\.2\.weight"):
        import_usa(bad, 1)
    bad = dict(sd)
    bad["0.learning_to_hash_transformation_q.0.2.weight"] = torch.zeros(16, 5)
    with pytest.raises(ValueError, match="shape"):
        import_usa(bad, 1)
    with pytest.raises(ValueError, match="not the authors"):
        import_usa({"foo.weight": torch.zeros(2)}, 1)
    with pytest.raises(ValueError, match="multiple"):
        import_usa(sd, 3)

    class Evil:  # pickles arbitrary code: weights_only=True must refuse it
        def __reduce__(self):
            return (print, ("pwned",))
    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="weights_only"):
        load_state_dict(tmp_path / "evil.pt")
    assert main(["import-maps", str(tmp_path / "nope.pt"), "--kv-heads", "1", "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
