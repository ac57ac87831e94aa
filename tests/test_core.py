"""Core: signatures, selection rule, sparse attention (issue 2)."""
import pytest
import torch
import torch.nn.functional as F

import hashattention as ha
from hashattention.core.selection import causal_valid, forced_and_candidates, select
from hashattention.core.signatures import match_scores, pack_signs, popcount32, unpack_bits


@pytest.mark.parametrize("bits", [32, 64, 96])
def test_pack_roundtrip_and_scores(bits):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(2, 3, 17, bits, generator=g)
    words = pack_signs(x)
    assert words.dtype == torch.int32 and words.shape == (2, 3, 17, bits // 32)
    assert torch.equal(unpack_bits(words), x > 0)
    # bit matches == (bits + <±1, ±1>) / 2
    q, k = torch.randn(2, 3, 5, bits, generator=g), torch.randn(2, 3, 11, bits, generator=g)
    sq, sk = torch.where(q > 0, 1, -1), torch.where(k > 0, 1, -1)
    expect = (bits + sq @ sk.transpose(-1, -2)) // 2
    assert torch.equal(match_scores(pack_signs(q), pack_signs(k)).long(), expect.long())


def test_popcount_matches_python():
    vals = torch.tensor([0, 1, -1, 2**31 - 1, -2**31, 0x0F0F0F0F, -12345, 987654321], dtype=torch.int32)
    assert popcount32(vals).tolist() == [bin(v & 0xFFFFFFFF).count("1") for v in vals.tolist()]


def test_bits_must_be_multiple_of_32():
    with pytest.raises(ValueError, match="multiple of 32"):
        pack_signs(torch.randn(4, 20))
    with pytest.raises(ValueError, match="multiple of 32"):
        ha.MapsConfig(num_layers=1, num_q_heads=2, num_kv_heads=1, head_dim=8, bits=48)


def test_signature_dtype_errors():
    with pytest.raises(TypeError, match="int32"):
        match_scores(torch.zeros(1, 1, 1, 1, dtype=torch.int64), torch.zeros(1, 1, 1, 1, dtype=torch.int32))
    with pytest.raises(TypeError, match="int32"):
        unpack_bits(torch.zeros(3, 1))


def _padded_valid(b, lq, lk, pads):
    valid = causal_valid(b, lq, lk).clone()
    for i, p in enumerate(pads):
        valid[i, :, :, :p] = False
    return valid


@pytest.mark.parametrize("heavy", [0, 1, 7, 0.25, 1 / 16])
@pytest.mark.parametrize("integer", [True, False])
def test_selection_rule(heavy, integer):
    b, h, lq, lk = 3, 4, 9, 70
    budget = ha.Budget(heavy=heavy, sink=4, window=5)
    valid = _padded_valid(b, lq, lk, pads=[0, 13, 40])
    g = torch.Generator().manual_seed(1)
    scores = torch.randint(0, 33, (b, h, lq, lk), generator=g) if integer else torch.randn(b, h, lq, lk, generator=g)
    keep = select(scores, valid, budget, max_score=32 if integer else None)
    assert keep.shape == (b, h, lq, lk)
    assert not (keep & ~valid).any(), "read a future or padded token"
    forced, cand, n = forced_and_candidates(valid, budget)
    assert (keep | ~forced.expand_as(keep)).all(), "sink or window missing"
    n = n.squeeze(-1).expand(b, h, lq)
    heavy_n = torch.floor(n * heavy).long() if isinstance(heavy, float) else torch.full_like(n, heavy)
    expect = torch.minimum(n, budget.sink + budget.window + heavy_n)
    assert torch.equal(keep.sum(-1), expect), "not exactly the budget"
    # the heavy tokens are a top-k: every kept candidate scores >= every dropped candidate
    s = scores.float()
    kept_min = torch.where(keep & cand, s, torch.tensor(float("inf"))).amin(-1)
    drop_max = torch.where(~keep & cand, s, torch.tensor(float("-inf"))).amax(-1)
    assert (kept_min >= drop_max).all()


def test_counting_equals_sorting_and_ties_prefer_recent():
    valid = causal_valid(2, 3, 50)
    scores = torch.randint(0, 5, (2, 3, 3, 50), generator=torch.Generator().manual_seed(0))  # many ties
    budget = ha.Budget(heavy=6, sink=2, window=2)
    a = select(scores, valid, budget, max_score=32)
    b = select(scores.float(), valid, budget)
    assert torch.equal(a, b)
    # all-equal scores: heavy goes to the most recent candidates, like sink+window
    flat = torch.zeros(1, 1, 1, 30, dtype=torch.int32)
    keep = select(flat, causal_valid(1, 1, 30), ha.Budget(heavy=3, sink=2, window=2), max_score=32)
    assert keep[0, 0, 0].nonzero().flatten().tolist() == [0, 1, 23, 24, 25, 26, 27, 28, 29][:2] + [25, 26, 27, 28, 29]


def test_left_padding_does_not_change_selection():
    g = torch.Generator().manual_seed(3)
    scores = torch.randint(0, 33, (1, 2, 1, 40), generator=g)
    budget = ha.Budget(heavy=5, sink=3, window=3)
    base = select(scores, causal_valid(1, 1, 40), budget, max_score=32)
    padded_scores = torch.cat([torch.randint(0, 33, (1, 2, 1, 9), generator=g), scores], -1)
    valid = causal_valid(1, 1, 49).clone()
    valid[..., :9] = False
    padded = select(padded_scores, valid, budget, max_score=32)
    assert torch.equal(padded[..., 9:], base) and not padded[..., :9].any()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (6, 2), (8, 1)])
def test_sparse_equals_sdpa_when_budget_covers_everything(dtype, tol, hq, hkv):
    g = torch.Generator().manual_seed(hq)
    b, lq, lk, d = 2, 5, 37, 16
    q = torch.randn(b, hq, lq, d, generator=g).to(dtype)
    k, v = (torch.randn(b, hkv, lk, d, generator=g).to(dtype) for _ in range(2))
    valid = causal_valid(b, lq, lk)
    budget = ha.Budget(heavy=lk, sink=0, window=0)
    for per_group in (True, False):
        hs = hkv if per_group else hq
        keep = select(torch.randint(0, 33, (b, hs, lq, lk), generator=g), valid, budget, max_score=32)
        assert torch.equal(keep, valid.expand_as(keep))
        out = ha.sparse_attention(q, k, v, keep)
        ref = F.scaled_dot_product_attention(q, k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1),
                                             attn_mask=valid)
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


def test_sparse_attention_reads_only_kept_tokens():
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 2, 1, 8, generator=g), torch.randn(1, 1, 10, 8, generator=g), torch.randn(1, 1, 10, 8, generator=g)
    keep = torch.zeros(1, 1, 1, 10, dtype=torch.bool)
    keep[..., [2, 7]] = True
    out = ha.sparse_attention(q, k, v, keep)
    ref = F.scaled_dot_product_attention(q, k[:, :, [2, 7]].expand(1, 2, 2, 8), v[:, :, [2, 7]].expand(1, 2, 2, 8))
    torch.testing.assert_close(out, ref)


def test_bad_shapes_and_dtypes():
    q = torch.randn(1, 3, 1, 8)
    k = torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match="not a multiple"):
        ha.sparse_attention(q, k, k, torch.ones(1, 1, 1, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="dtype"):
        ha.sparse_attention(q[:, :2], k.double(), k.double(), torch.ones(1, 1, 1, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        ha.sparse_attention(q[:, :2], k, k, torch.ones(1, 1, 1, 5))
    with pytest.raises(ValueError, match="match the mask"):
        select(torch.zeros(1, 1, 2, 5), causal_valid(1, 1, 5), ha.Budget())


def test_budget_parsing_and_errors():
    assert ha.Budget(heavy="1/32").heavy == pytest.approx(1 / 32)
    assert ha.Budget(heavy="512").heavy == 512
    assert ha.Budget(heavy=1 / 16).total(4096) == 128 + 128 + 256
    assert ha.Budget(heavy=1 / 16).total(100) == 100
    with pytest.raises(ValueError, match="larger than the context"):
        ha.Budget(heavy=5000).check_fits(1024)
    for bad in ["abc", 1.5, -3, "0/0"]:
        with pytest.raises((ValueError, TypeError)):
            ha.Budget(heavy=bad)
    with pytest.raises(ValueError, match="sink"):
        ha.Budget(sink=-1)


def test_maps_shapes_and_value_norm():
    cfg = ha.MapsConfig(num_layers=3, num_q_heads=6, num_kv_heads=2, head_dim=16, value_norm=True)
    maps = ha.HashMaps(cfg)
    assert maps.q.weights[0].shape == (3, 6, 16, 128) and maps.k.weights[0].shape == (3, 2, 17, 128)
    assert maps.k.weights[-1].shape == (3, 2, 128, 32)
    q, k = torch.randn(2, 6, 5, 16), torch.randn(2, 2, 5, 16)
    assert maps.query_signature(1, q).shape == (2, 6, 5, 1)
    assert maps.key_signature(1, k, torch.randn(2, 2, 5, 16)).shape == (2, 2, 5, 1)
    with pytest.raises(ValueError, match="log"):
        maps.key_signature(1, k)
    with pytest.raises(ValueError, match="queries must be"):
        maps.query_signature(0, torch.randn(2, 5, 5, 16))
    # batched over heads == per-head MLP
    x = torch.randn(1, 6, 4, 16)
    out = maps.project_q(2, x)
    h = 4
    y = x[0, h]
    for i, w in enumerate(maps.q.weights):
        y = y @ w[2, h] + maps.q.biases[i][2, h]
        y = F.silu(y) if i < 2 else y
    torch.testing.assert_close(out[0, h], y)


@pytest.mark.parametrize("g,w", [(1, 1), (3, 1), (4, 2), (2, 3)])
def test_group_match_scores_equal_summed_popcount_matches(g, w):
    """The policy's ±1-product scorer gives exactly the XOR + popcount matches, summed over a KV group."""
    from hashattention.core.signatures import group_match_scores
    gen = torch.Generator().manual_seed(g * 10 + w)
    q = torch.randint(-2 ** 31, 2 ** 31 - 1, (2, 3, g, 5, w), dtype=torch.int32, generator=gen)
    k = torch.randint(-2 ** 31, 2 ** 31 - 1, (2, 3, 37, w), dtype=torch.int32, generator=gen)
    k[0, 0, :4] = q[0, 0, 0, :4]  # exact matches and their complements: the extreme scores
    k[0, 1, :4] = ~q[0, 1, 0, :4]
    want = sum(ha.match_scores(q[:, :, i], k).long() for i in range(g))
    got = group_match_scores(q, k)
    assert got.dtype == torch.int32 and torch.equal(got.long(), want)
    assert int(got.max()) <= 32 * w * g and int(got.min()) >= 0
    with pytest.raises(TypeError, match="int32"):
        group_match_scores(q.long(), k)
