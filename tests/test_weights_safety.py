"""Issue 8: maps files never execute code (safetensors only; torch.load only with weights_only=True), the
sha256 in the .json is checked, and truncated / corrupted / mismatched files fail with a WeightsError that
names the problem. The loader is fuzzed with random corruptions (checksum updated so the parser is reached)."""
import hashlib
import json
import os
import pathlib
import pickle
import re

import pytest
import torch
from hypothesis import given, settings, strategies as st

from hashattention.core.maps import HashMaps, MapsConfig
from hashattention.weights import WeightsError, load_maps, save_maps

FUZZ = os.environ.get("HASHATTENTION_FUZZ") == "1"
CFG = MapsConfig(num_layers=2, num_q_heads=4, num_kv_heads=2, head_dim=16)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("maps")
    torch.manual_seed(0)
    path = save_maps(HashMaps(CFG), d / "m")
    return path, path.read_bytes(), path.with_suffix(".json").read_text()


def test_roundtrip_and_checksum(saved, tmp_path):
    path, data, meta = saved
    m = load_maps(path)
    assert json.loads(meta)["sha256"] == hashlib.sha256(data).hexdigest()
    p = tmp_path / "x.safetensors"
    p.write_bytes(data[:-10])
    (tmp_path / "x.json").write_text(meta)
    with pytest.raises(WeightsError, match="corrupt or truncated"):
        load_maps(p)
    assert isinstance(m, HashMaps)


def test_missing_and_mismatched_files(saved, tmp_path):
    path, data, meta = saved
    with pytest.raises(WeightsError, match="does not exist"):
        load_maps(tmp_path / "none.safetensors")
    (tmp_path / "a.safetensors").write_bytes(data)
    with pytest.raises(WeightsError, match="does not exist"):
        load_maps(tmp_path / "a.safetensors")  # no .json beside it
    m = json.loads(meta)
    m["config"]["head_dim"] = 32  # config says other shapes than the tensors
    (tmp_path / "a.json").write_text(json.dumps(m))
    with pytest.raises(WeightsError, match="shape"):
        load_maps(tmp_path / "a.safetensors")
    (tmp_path / "a.json").write_text("{not json")
    with pytest.raises(WeightsError, match="not a valid maps config"):
        load_maps(tmp_path / "a.safetensors")


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch " + os.environ.get("HA_EVIL_MARK", "/tmp/ha_evil_mark"),))


def test_pickle_payload_never_executes(tmp_path, monkeypatch):
    mark = tmp_path / "executed"
    monkeypatch.setenv("HA_EVIL_MARK", str(mark))
    p = tmp_path / "evil.safetensors"
    p.write_bytes(pickle.dumps({"x": _Evil()}))
    meta = {"format": "hashattention-maps/1", "config": CFG.to_dict(),
            "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
    (tmp_path / "evil.json").write_text(json.dumps(meta))
    with pytest.raises(WeightsError, match="not a readable safetensors"):
        load_maps(p)
    assert not mark.exists()
    # a torch .pt with a payload: weights_only=True (what the code base uses) refuses it
    pt = tmp_path / "evil.pt"
    torch.save({"x": _Evil()}, pt)
    with pytest.raises(Exception):
        torch.load(pt, weights_only=True)
    assert not mark.exists()


def test_every_torch_load_in_the_package_is_weights_only():
    root = pathlib.Path(__file__).resolve().parents[1] / "hashattention"
    bad = []
    for f in root.rglob("*.py"):
        for m in re.finditer(r"torch\.load\(([^)]*)\)", f.read_text()):
            if "weights_only=True" not in m.group(1):
                bad.append(f"{f.relative_to(root)}: {m.group(0)}")
        if re.search(r"^\s*import pickle|pickle\.loads?\(", f.read_text(), re.M):
            bad.append(f"{f.relative_to(root)}: pickle")
    assert not bad, bad


@settings(max_examples=300 if FUZZ else 30, deadline=None, derandomize=not FUZZ)
@given(cut=st.integers(0, 4000), flips=st.lists(st.tuples(st.integers(0, 10 ** 6), st.integers(1, 255)),
                                                max_size=6), fix_sum=st.booleans())
def test_fuzz_corrupted_files_fail_cleanly(saved, tmp_path_factory, cut, flips, fix_sum):
    path, data, meta = saved
    b = bytearray(data[:max(len(data) - cut, 0)] if cut % 3 else data)
    for pos, x in flips:
        if b:
            b[pos % len(b)] ^= x
    d = tmp_path_factory.mktemp("fz")
    p = d / "f.safetensors"
    p.write_bytes(bytes(b))
    m = json.loads(meta)
    if fix_sum:  # let the corruption reach the safetensors parser and the shape checks
        m["sha256"] = hashlib.sha256(bytes(b)).hexdigest()
    (d / "f.json").write_text(json.dumps(m))
    try:
        maps = load_maps(p)
    except WeightsError:
        return
    # loaded: only possible when the bytes still form a complete file of the right tensors and shapes
    assert fix_sum or bytes(b) == data
    assert all(torch.is_tensor(v) for v in maps.state_dict().values())
