"""Bucket hash attention (policies/bucket.py, bucket_hashing.py): hashing, aggregation, heads, bad input."""
import hashlib
import struct
import subprocess
import sys

import pytest
import torch

from hashattention import Budget, enable, make_policy, sparse_attention
from hashattention.core.selection import causal_valid
from hashattention.policies import POLICIES
from hashattention.policies.bucket import (BUCKET_POLICIES, BucketPolicy, average_rounds, bucket_head_mask,
                                           fit_projection, mean_pool)
from hashattention.policies.bucket_hashing import HASH_KINDS, BucketHasher, quantize

def _blake3_available():
    try:
        import blake3  # noqa: F401
        return True
    except ImportError:
        return False


ALL_KINDS = [k for k in HASH_KINDS if k != "blake3" or _blake3_available()]


class FixedHasher:
    """Stands in for BucketHasher: bucket ids given by hand. ids(x) reads the id from x[..., 0]."""
    def __init__(self, rounds=1, bits=4):
        self.rounds, self.bits, self.kind = rounds, bits, "fixed"

    def __call__(self, layer, x, kv_head, num_kv):
        ids = x[..., 0].round().to(torch.int64)  # [B, H, L]
        return ids.unsqueeze(0).expand(self.rounds, *ids.shape)

    def describe(self):
        return "fixed"


# -------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("bits", [0, 33, -1, 8.0, True, "16"])
def test_bits_out_of_range(bits):
    with pytest.raises(ValueError, match="bucket bits"):
        BucketPolicy(bits=bits)


@pytest.mark.parametrize("f", [-0.1, 1.5, float("nan"), "0.5"])
def test_fraction_outside_unit_interval(f):
    with pytest.raises(ValueError, match=r"bucket_fraction must be a fraction in \[0, 1\]"):
        BucketPolicy(bucket_fraction=f)


def test_unknown_names():
    with pytest.raises(ValueError, match="unknown bucket hash 'md5'.*sha256"):
        BucketPolicy(hash="md5")
    with pytest.raises(ValueError, match="unknown aggregation 'max'"):
        BucketPolicy(agg="max")
    with pytest.raises(ValueError, match="unknown empty-bucket rule"):
        BucketPolicy(empty="nan")
    with pytest.raises(ValueError, match="coarse_bits"):
        BucketPolicy(hash="hybrid", bits=8, coarse_bits=9)
    with pytest.raises(ValueError, match="rounds"):
        BucketPolicy(rounds=0)


def test_registered_names():
    for name in ("bucket-sha256", "bucket-blake3", "bucket-lsh", "bucket-hybrid", "bucket-multiround",
                 "bucket-hier", "bucket-mixed", "bucket-keyed"):
        assert name in POLICIES
    p = make_policy("bucket-multiround", Budget(), bits=8)
    assert p.hasher.rounds == 4 and p.hasher.bits == 8 and p.hasher.kind == "lsh"


# ----------------------------------------------------------------------------- bucket assignment
@pytest.mark.parametrize("kind", ALL_KINDS)
def test_hash_deterministic_and_in_range(kind):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 7, 16, generator=g)
    kv = torch.tensor([0, 0, 1, 1])
    a = BucketHasher(kind, bits=12, rounds=2, seed=3)(5, x, kv, 2)
    b = BucketHasher(kind, bits=12, rounds=2, seed=3)(5, x.clone(), kv, 2)  # a fresh instance: same ids
    assert a.shape == (2, 2, 4, 7) and a.dtype == torch.int64
    assert torch.equal(a, b)
    assert int(a.min()) >= 0 and int(a.max()) < 2 ** 12
    c = BucketHasher(kind, bits=12, rounds=2, seed=4)(5, x, kv, 2)
    assert not torch.equal(a, c)  # the seed (hash key / planes) matters
    assert not torch.equal(a[0], a[1])  # rounds are different hash functions
    # a query head and its KV head hash alike: the same vector in head 0 and 1 (same KV head) -> same id
    y = x.clone()
    y[:, 1] = y[:, 0]
    h = BucketHasher(kind, bits=12, seed=3)(5, y, kv, 2)
    assert torch.equal(h[:, :, 0], h[:, :, 1])


def test_sha256_matches_hashlib():
    x = torch.tensor([[[[0.3, -1.0, 2.0, 0.06]]]])
    h = BucketHasher("sha256", bits=20, seed=7, quant_step=0.125)
    got = int(h(2, x, torch.tensor([1]), 2)[0, 0, 0, 0])
    q = [2, -8, 16, 0]  # round(x / 0.125)
    data = struct.pack("<4q", 7, 2, 0, 1) + struct.pack("<4h", *q)
    want = int.from_bytes(hashlib.sha256(data).digest()[:8], "little") & (2 ** 20 - 1)
    assert got == want


def test_keyed_hash_same_in_a_fresh_process():
    """Deterministic across runs: a new interpreter derives the same keyed and LSH ids."""
    code = ("import torch;from hashattention.policies.bucket_hashing import BucketHasher as B;"
            "x=torch.linspace(-3,3,2*3*5*8).view(1,6,5,8).sin()*4;kv=torch.arange(6)//2;"
            "print([int(v) for v in B('keyed',bits=32,rounds=2,seed=9)(3,x,kv,3).flatten()]+"
            "[int(v) for v in B('lsh',bits=32,seed=9)(3,x,kv,3).flatten()])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    x = torch.linspace(-3, 3, 2 * 3 * 5 * 8).view(1, 6, 5, 8).sin() * 4
    kv = torch.arange(6) // 2
    here = [int(v) for v in BucketHasher("keyed", bits=32, rounds=2, seed=9)(3, x, kv, 3).flatten()] + \
           [int(v) for v in BucketHasher("lsh", bits=32, seed=9)(3, x, kv, 3).flatten()]
    assert eval(out) == here


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_keyed_and_lsh_same_on_gpu():
    x = (torch.randn(2, 6, 33, 64, generator=torch.Generator().manual_seed(0)) * 3)
    kv = torch.arange(6) // 2
    for kind in ("keyed", "lsh", "hybrid", "sha256"):
        h = BucketHasher(kind, bits=32, rounds=2, seed=1)
        assert torch.equal(h(0, x, kv, 3), h(0, x.cuda(), kv, 3).cpu()), kind


def test_crypto_buckets_ignore_similarity_lsh_keeps_it():
    """The article's trade-off, measured: one quantization step apart -> SHA-256 ids unrelated, SimHash
    ids mostly equal; identical vectors share a bucket for every hash."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1, 400, 32, generator=g)
    near = x + 0.2 * torch.randn(x.shape, generator=g)
    kv = torch.tensor([0])
    for kind in ALL_KINDS:
        h = BucketHasher(kind, bits=16)
        assert torch.equal(h(0, x, kv, 1), h(0, x.clone(), kv, 1))
    sha = BucketHasher("sha256", bits=16)
    lsh = BucketHasher("lsh", bits=8)
    assert (sha(0, x, kv, 1) == sha(0, near, kv, 1)).float().mean() < 0.01
    assert (lsh(0, x, kv, 1) == lsh(0, near, kv, 1)).float().mean() > 0.2


def test_quantize():
    assert quantize(torch.tensor([0.3, -0.3, 1e9]), 0.25).tolist() == [1, -1, 32767]


def test_update_incremental_equals_once():
    g = torch.Generator().manual_seed(0)
    k = torch.randn(1, 2, 20, 8, generator=g)
    for name in ("bucket-sha256", "bucket-lsh", "bucket-keyed"):
        p = make_policy(name, Budget())
        a, b = {}, {}
        p.update(0, a, k, k, 0)
        p.update(0, b, k[:, :, :12], k[:, :, :12], 0)
        p.update(0, b, k, k, 12)
        assert torch.equal(a["kb"], b["kb"])


# ------------------------------------------------------------------------------------- aggregation
def _hand_case():
    """One query, 4 keys; buckets (x[..., 0]): query 7, keys 7, 3, 7, 5. Values chosen for hand math."""
    q = torch.tensor([[[[7.0, 1.0]]]])
    k = torch.tensor([[[[7.0, 0.0], [3.0, 0.0], [7.0, 0.0], [5.0, 0.0]]]])
    v = torch.tensor([[[[1.0, 0.0], [9.0, 9.0], [4.0, 4.0], [2.0, 2.0]]]])
    return q, k, v


def _run(policy, q, k, v, valid=None):
    state = {}
    policy.update(0, state, k, v, 0)
    valid = causal_valid(q.shape[0], q.shape[2], k.shape[2]) if valid is None else valid
    keep = policy.select(0, state, q, k, v, valid, 1.0)
    return keep, policy.attend(q, k, v, keep, 1.0)


def test_mean_pool_hand_computed():
    q, k, v = _hand_case()
    p = BucketPolicy(Budget(heavy=1, sink=0, window=0), agg="mean")
    p.hasher = FixedHasher()
    keep, out = _run(p, q, k, v)
    assert keep[0, 0, 0].tolist() == [True, False, True, False]  # valid & same bucket
    assert torch.allclose(out[0, 0, 0], torch.tensor([2.5, 2.0]))  # mean of v0, v2


def test_softmax_hand_computed():
    q, k, v = _hand_case()
    # logits q.k (scale 1): key0 = 49, key2 = 49 + log(3) via the second coordinate -> weights 1/4, 3/4
    k = k.clone()
    k[0, 0, 2, 1] = torch.log(torch.tensor(3.0))
    p = BucketPolicy(Budget(heavy=1, sink=0, window=0), agg="softmax")
    p.hasher = FixedHasher()
    _, out = _run(p, q, k, v)
    assert torch.allclose(out[0, 0, 0], 0.25 * v[0, 0, 0] + 0.75 * v[0, 0, 2], atol=1e-6)
    assert torch.allclose(out[0, 0, 0], torch.tensor([3.25, 3.0]), atol=1e-6)


def test_empty_bucket_zeros_or_sink_window():
    q, k, v = _hand_case()
    q = q.clone()
    q[..., 0] = 6.0  # no key in bucket 6
    p = BucketPolicy(Budget(heavy=1, sink=1, window=1), agg="mean")
    p.hasher = FixedHasher()
    keep, out = _run(p, q, k, v)
    assert not keep.any() and torch.equal(out, torch.zeros_like(out))  # pure: zeros, as the reference does
    p = BucketPolicy(Budget(heavy=1, sink=1, window=1), agg="mean", empty="sink_window")
    p.hasher = FixedHasher()
    keep, out = _run(p, q, k, v)
    assert keep[0, 0, 0].tolist() == [True, False, False, True]  # first + last key
    assert torch.allclose(out[0, 0, 0], torch.tensor([1.5, 1.0]))
    # sink_window=True: always read, on top of a non-empty bucket
    q, k, v = _hand_case()
    p = BucketPolicy(Budget(heavy=1, sink=0, window=1), agg="mean", sink_window=True)
    p.hasher = FixedHasher()
    keep, out = _run(p, q, k, v)
    assert keep[0, 0, 0].tolist() == [True, False, True, True]
    assert torch.allclose(out[0, 0, 0], torch.tensor([7 / 3, 2.0]))


def test_rounds_averaged_over_non_empty():
    v = torch.tensor([[[[1.0], [3.0], [10.0]]]])  # [B, Hkv, Lk, D]
    masks = torch.tensor([[True, True, False], [False, False, True], [False, False, False]]).view(3, 1, 1, 1, 3)
    means, cnt = mean_pool(v, masks)
    assert means.flatten().tolist() == [2.0, 10.0, 0.0]
    assert average_rounds(means, cnt).flatten().tolist() == [6.0]  # (2 + 10) / 2: the empty round is skipped


def test_reference_attention_agrees_with_softmax_policy_on_real_hash():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 9, 8, generator=g), torch.randn(2, 2, 9, 8, generator=g),
               torch.randn(2, 2, 9, 8, generator=g))
    p = make_policy("bucket-lsh", Budget(), bits=2, agg="softmax")
    keep, out = _run(p, q, k, v)
    assert keep.shape == (2, 4, 9, 9) and keep.any()
    assert torch.allclose(out, sparse_attention(q, k, v, keep, 1.0), atol=1e-6)


def test_hierarchical_refines_until_small():
    # ids (4 bits): query 0b1010; keys 1010, 1011, 1000, 0010, 1010 -> prefix counts at levels 1..4: 4, 4, 3, 2
    ids = [10, 11, 8, 2, 10]
    k = torch.tensor(ids, dtype=torch.float32).view(1, 1, 5, 1)
    q = torch.tensor([10.0]).view(1, 1, 1, 1)
    valid = torch.ones(1, 1, 1, 5, dtype=torch.bool)
    for cap, want in ((4, [1, 1, 1, 0, 1]), (3, [1, 1, 0, 0, 1]), (2, [1, 0, 0, 0, 1]), (1, [0, 0, 0, 0, 1])):
        p = BucketPolicy(Budget(heavy=1, sink=0, window=0), hierarchical=True, max_bucket=cap, bits=4)
        p.hasher = FixedHasher(bits=4)
        keep, _ = _run(p, q, k, k, valid)
        assert keep.flatten().int().tolist() == want, cap
    # the finest level empty -> the parent, cut to the cap's most recent keys
    q = torch.tensor([12.0]).view(1, 1, 1, 1)  # 1100: levels 1..4 counts 4, 0, 0, 0
    p = BucketPolicy(Budget(heavy=1, sink=0, window=0), hierarchical=True, max_bucket=2, bits=4)
    p.hasher = FixedHasher(bits=4)
    keep, _ = _run(p, q, k, k, valid)
    assert keep.flatten().int().tolist() == [0, 0, 1, 0, 1]


# ------------------------------------------------------------------------------------- mixed heads
def test_bucket_head_mask():
    assert bucket_head_mask(8, 0.5).tolist() == [True] * 4 + [False] * 4
    assert bucket_head_mask(9, 0.75).sum() == 6 and bucket_head_mask(9, 0.0).sum() == 0


def test_mixed_heads():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 4, 6, 8, generator=g), torch.randn(1, 2, 6, 8, generator=g),
               torch.randn(1, 2, 6, 8, generator=g))
    valid = causal_valid(1, 6, 6)
    dense = sparse_attention(q, k, v, valid, 1.0)
    pure_keep, pure = _run(make_policy("bucket-lsh", Budget(), bits=2), q, k, v)
    keep, out = _run(make_policy("bucket-mixed", Budget(), bits=2, bucket_fraction=0.5), q, k, v)
    assert keep.shape == (1, 4, 6, 6)  # per query head (Hs = Hq)
    assert torch.equal(keep[:, 2:], valid.expand(1, 2, 6, 6))  # dense heads read every valid key
    assert torch.equal(keep[:, :2], pure_keep[:, :2])
    assert torch.allclose(out[:, 2:], dense[:, 2:], atol=1e-6)
    assert torch.allclose(out[:, :2], pure[:, :2], atol=1e-6)
    _, none = _run(make_policy("bucket-mixed", Budget(), bits=2, bucket_fraction=0.0), q, k, v)
    assert torch.allclose(none, dense, atol=1e-6)


# ------------------------------------------------------------------------- projection and model
def test_fit_projection_and_roundtrip(tiny, tmp_path):
    model = tiny("llama", layers=2, heads=4, kv_heads=2, head_dim=16)
    ids = torch.randint(3, 97, (3, 48), generator=torch.Generator().manual_seed(0))
    p = make_policy("bucket-lsh", Budget(heavy=4, sink=2, window=2), bits=2, agg="proj")
    res = fit_projection(model, p, ids, ridge=1e-3, chunk=16)
    assert res["layers"] == 2 and set(p.projection) == {0, 1}
    assert p.projection[0].shape == (4, 17, 16)
    assert res["mse_proj"] <= res["mse_mean"] + 1e-9 and res["mse_proj"] <= res["mse_zero"] + 1e-9
    f = tmp_path / "proj.safetensors"
    p.save_projection(str(f))
    q = make_policy("bucket-lsh", Budget(heavy=4, sink=2, window=2), bits=2, agg="proj").load_projection(str(f))
    assert torch.equal(q.projection[1], p.projection[1])
    with pytest.raises(ValueError, match="another bucket configuration"):
        make_policy("bucket-lsh", Budget(), bits=3, agg="proj").load_projection(str(f))


@pytest.mark.parametrize("name", list(BUCKET_POLICIES))
def test_every_variant_runs_in_a_model(tiny, name):
    if name == "bucket-blake3" and not _blake3_available():
        pytest.skip("blake3 not installed")
    model = tiny("llama", layers=2, heads=4, kv_heads=2, head_dim=16)
    ids = torch.randint(3, 97, (2, 40), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding
    for agg in ("mean", "softmax", "proj"):
        p = make_policy(name, Budget(heavy=4, sink=2, window=2), bits=3, agg=agg)
        with torch.no_grad(), enable(model, p, mode="everywhere", chunk=16) as h:
            out = model(input_ids=ids, attention_mask=mask).logits
        assert torch.isfinite(out).all()
        assert 0 < h.stats()["fraction"] <= 1
