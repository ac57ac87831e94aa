"""Issue 5: the Triton decode kernels against their PyTorch references.

On a machine without CUDA the kernels run in Triton's interpreter: unless TRITON_INTERPRET=1 was set
before Python started, one test reruns this file in a subprocess with it. With CUDA the same tests run on
the GPU, and the @gpu tests add long contexts and the Hugging Face fast path.
"""
import os
import subprocess
import sys

import pytest
import torch

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
# Triton picks its interpreter when a function is decorated (its own library's too, at import): without
# CUDA the tests run in a fresh process started with TRITON_INTERPRET=1, leaving this one untouched.
IN_PROCESS = CUDA or os.environ.get("TRITON_INTERPRET") == "1"
pytest.importorskip("triton")
if not IN_PROCESS:
    def test_kernels_in_fresh_interpreter_process():
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                           env=env, cwd=os.path.dirname(__file__), capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]

inproc = pytest.mark.skipif(not IN_PROCESS, reason="runs in a fresh process (triton was imported before)")

import hashattention as ha  # noqa: E402
from hashattention import kernels as K  # noqa: E402
from hashattention.core.attention import sparse_attention  # noqa: E402
from hashattention.core.selection import select  # noqa: E402
from hashattention.kernels.reference import keep_to_indices, selection_scores, valid_mask  # noqa: E402

assert not IN_PROCESS or K.use_triton(torch.empty(1, device=DEV)), "the kernels must really run here"


def _sigs(b, hq, hs, n, w=1, gen=None, few=False):
    lo, hi = -2 ** 31, 2 ** 31 - 1
    q = torch.randint(lo, hi, (b, hq, w), dtype=torch.int32, generator=gen)
    if few:  # a handful of distinct key signatures: many equal scores, so tie-breaking is exercised
        pool = torch.randint(lo, hi, (3, w), dtype=torch.int32, generator=gen)
        k = pool[torch.randint(0, 3, (b, hs, n), generator=gen)]
    else:
        k = torch.randint(lo, hi, (b, hs, n, w), dtype=torch.int32, generator=gen)
    return q.to(DEV), k.to(DEV)


# (GQA ratio, key heads = KV heads?, words, N, budget)
SELECT_CASES = [
    (1, True, 1, 333, ha.Budget(heavy=1 / 8, sink=7, window=5)),
    (3, True, 1, 517, ha.Budget(heavy=1, sink=0, window=0)),  # budget 1
    (3, False, 1, 300, ha.Budget(heavy=300 - 12, sink=4, window=8)),  # budget = context
    (4, True, 2, 701, ha.Budget(heavy=1 / 16, sink=16, window=16)),  # 64-bit signatures
    (4, False, 1, 401, ha.Budget(heavy=1.0, sink=0, window=0)),  # everything, no sink/window
    (8, True, 1, 771, ha.Budget(heavy=1 / 32, sink=32, window=32)),
    (8, False, 1, 257, ha.Budget(heavy=45, sink=3, window=250)),  # window past the context
]


@inproc
@pytest.mark.parametrize("selection", ["sum", "max", "head"])
@pytest.mark.parametrize("case", range(len(SELECT_CASES)))
@inproc
def test_score_select_equals_shared_rule(case, selection):
    g, kv_keys, w, n, budget = SELECT_CASES[case]
    per_group = selection != "head"
    gen = torch.Generator().manual_seed(case * 3 + K.SELECTIONS.index(selection))
    b, hkv = 2, 2
    hq = hkv * g
    for few in (False, True):
        q_sig, k_sig = _sigs(b, hq, hkv if kv_keys else hq, n, w, gen, few)
        starts = torch.tensor([5, 0], device=DEV)  # left padding; a ragged length (tail of the cache unused)
        lengths = torch.tensor([n, n - 37], device=DEV)
        idx, counts = K.score_select(q_sig, k_sig, starts, lengths, budget, hkv, selection=selection)
        # the shared rule, computed directly from core.selection
        scores, max_score = selection_scores(q_sig, k_sig, hkv, per_group, selection)
        valid = valid_mask(starts, lengths, n)[:, None, None]
        keep = select(scores[:, :, None], valid, budget, max_score=max_score)[:, :, 0]  # [B, Hsel, N]
        assert idx.shape == (b, hkv if per_group else hq, budget.total(n))
        ctx = (lengths - starts).tolist()
        want = [min(c, budget.sink + budget.window + budget.heavy_count(c)) for c in ctx]
        assert counts.tolist() == want == keep[:, 0].sum(-1).tolist()
        # same sets, ascending, -1 after each row's count (ties broken identically: equal lists)
        assert torch.equal(idx, keep_to_indices(keep, idx.shape[-1])), few
        live = torch.arange(idx.shape[-1], device=DEV) < counts[:, None, None]
        assert torch.all((idx[..., 1:] > idx[..., :-1]) | ~live[..., 1:])


@inproc
@pytest.mark.parametrize("tile,max_block,num_warps,exact_max,prefetch,small", [
    (64, 256, 4, 256, 0, 0), (128, 128, 2, 256, 0, 0), (64, 256, 4, 0, 0, 0), (64, 256, 4, 256, 1, 0),
    (64, 256, 2, 256, 1, 128)])
def test_score_select_blocks_and_tiles(tile, max_block, num_warps, exact_max, prefetch, small, monkeypatch):
    """Many blocks per row (the threshold and offsets come from the row histograms and the per-block suffix
    tables), several tiles per block (the budget's last ties then fall inside a block, between tiles); then
    the same call again: the workspace must be left zeroed. exact_max 0: the coarse + fine (three-launch)
    path for every score range. prefetch 1: the count loop loads the next tile's words during this one (one
    word per token, one key head per group; other cases take the plain loop). small: blocks that would be one
    tile become blocks (and count tiles) of ``small`` tokens, with warps in proportion."""
    ss = sys.modules["hashattention.kernels.score_select"]
    monkeypatch.setattr(ss, "CONFIG", dict(ss.CONFIG, tile=tile, max_block=max_block, programs_per_sm=64,
                                           num_warps=num_warps, exact_max=exact_max, emit_tile=tile,
                                           emit_warps=num_warps, count_prefetch=prefetch, small_tile=small))
    gen = torch.Generator().manual_seed(7)
    for w, few, n, budgets, groups in ((1, True, 389, 4, ("sum", "head", "max")), (2, False, 300, 1, ("sum", "max"))):
        q_sig, k_sig = _sigs(2, 8, 2, n, w, gen, few=few)
        starts, lengths = torch.tensor([0, 9], device=DEV), torch.tensor([n, n - 9], device=DEV)
        for sel in groups:
            for budget in (ha.Budget(heavy=1 / 8, sink=5, window=6), ha.Budget(heavy=1, sink=0, window=0),
                           ha.Budget(heavy=n - 30, sink=3, window=4),
                           ha.Budget(heavy=0, sink=9, window=9))[:budgets]:
                want = K.score_select_reference(q_sig, k_sig, starts, lengths, budget, 2, sel != "head", sel)
                for _ in range(2):
                    got = K.score_select(q_sig, k_sig, starts, lengths, budget, 2, selection=sel)
                    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (w, few, budget)
    # each workspace: the epoch advanced once per call (both words equal after a call), and the histogram copy
    # the next call counts into is zero again
    assert ss._WORKSPACE
    for (_, rows, ncb, nfb), ws in ss._WORKSPACE.items():
        e0, e1 = ws[-2:].tolist()
        assert e0 == e1 > 0
        c = (e0 & 1)
        assert int(ws[c * rows * ncb:(c + 1) * rows * ncb].abs().sum()) == 0
        f0 = 2 * rows * ncb
        assert int(ws[f0 + c * rows * nfb:f0 + (c + 1) * rows * nfb].abs().sum()) == 0


@inproc
def test_score_select_recovers_after_a_failed_launch(monkeypatch):
    """If the emit launch fails after the count launch has filled a histogram copy (say, it does not compile),
    the error propagates and the workspace is left clean: the next call is right."""
    ss = sys.modules["hashattention.kernels.score_select"]
    gen = torch.Generator().manual_seed(17)
    q_sig, k_sig = _sigs(1, 4, 1, 300, 1, gen)
    st, ln = torch.tensor([0], device=DEV), torch.tensor([300], device=DEV)
    budget = ha.Budget(heavy=1 / 8, sink=2, window=2)
    want = K.score_select_reference(q_sig, k_sig, st, ln, budget, 1, True)

    class Failing:
        def __getitem__(self, grid):
            def launch(*a, **k):
                raise RuntimeError("emit launch failed")
            return launch
    emit = ss._emit_kernel
    monkeypatch.setattr(ss, "_emit_kernel", Failing())
    with pytest.raises(RuntimeError, match="emit launch failed"):
        K.score_select(q_sig, k_sig, st, ln, budget, 1, True)
    monkeypatch.setattr(ss, "_emit_kernel", emit)
    for _ in range(2):
        got = K.score_select(q_sig, k_sig, st, ln, budget, 1, True)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@inproc
@pytest.mark.parametrize("exact_max", [256, 0])
def test_score_select_threshold_at_the_top_scores(exact_max, monkeypatch):
    """Keys equal to the query (score = the largest possible, which shares the exact histogram's top bin
    with the score one below) and one or two bits off it: thresholds at the maximum, one below and two
    below, with ties, for per-head rows (max 32) and summed groups of 4 (max 128)."""
    ss = sys.modules["hashattention.kernels.score_select"]
    monkeypatch.setattr(ss, "CONFIG", dict(ss.CONFIG, tile=64, max_block=128, programs_per_sm=64,
                                           exact_max=exact_max))
    gen = torch.Generator().manual_seed(11)
    n = 333
    for g, per_group in ((1, True), (4, True), (4, False)):
        hkv = 2
        q = torch.randint(-2 ** 31, 2 ** 31 - 1, (1, hkv, 1), dtype=torch.int32, generator=gen)
        q_sig = q.repeat_interleave(g, 1)  # the query heads of a group share a signature: group max = 32 g
        pool = torch.stack([q, q ^ 1, q ^ 3, torch.randint(-2 ** 31, 2 ** 31 - 1, q.shape, dtype=torch.int32,
                                                              generator=gen)], -1)  # [1, Hkv, 1, 4]
        pick = torch.randint(0, 4, (1, hkv, n), generator=gen)
        k_sig = torch.gather(pool.expand(1, hkv, n, 4), 3, pick[..., None]).contiguous()
        q_sig, k_sig = q_sig.to(DEV), k_sig.to(DEV)
        starts, lengths = torch.tensor([3], device=DEV), torch.tensor([n - 5], device=DEV)
        n_top = int((pick[0, 0, 3:n - 5] == 0).sum())
        for heavy in (1, n_top - 7, n_top, n_top + 9, 2 * n_top + 3, n - 40):
            budget = ha.Budget(heavy=heavy, sink=2, window=3)
            want = K.score_select_reference(q_sig, k_sig, starts, lengths, budget, hkv, per_group)
            got = K.score_select(q_sig, k_sig, starts, lengths, budget, hkv, per_group)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (g, per_group, heavy)


@inproc
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_decode_matches_sdpa(dtype):
    """dense_decode (the engine's dense step, kernel 2 without a list) against PyTorch's SDPA over the rows
    below each length: one length shared by the batch and one per sequence, odd lengths, GQA 1/3/4."""
    gen = torch.Generator().manual_seed(5)
    for b, hq, hkv, d, n, lens in ((2, 8, 2, 32, 700, [693]), (3, 9, 3, 64, 333, [333, 1, 129]),
                                   (1, 4, 4, 16, 97, [50])):
        q = torch.randn(b, hq, d, generator=gen).to(DEV, dtype)
        kc, vc = (torch.randn(b, hkv, n, d, generator=gen).to(DEV, dtype) for _ in range(2))
        length = torch.tensor(lens, device=DEV)
        out = K.dense_decode(q, kc, vc, length)
        for i in range(b):
            li = lens[0] if len(lens) == 1 else lens[i]
            want = torch.nn.functional.scaled_dot_product_attention(
                q[i:i + 1, :, None].float(), kc[i:i + 1, :, :li].float(), vc[i:i + 1, :, :li].float(),
                enable_gqa=True)[0, :, 0]
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            assert (out[i].float() - want).abs().max() < tol, (b, hq, hkv, d, n, lens, i)
    with pytest.raises(ValueError, match="length"):
        K.dense_decode(q, kc, vc, torch.tensor([5, 6], device=DEV))
    with pytest.raises(TypeError, match="k_cache"):
        K.dense_decode(q, kc.half() if dtype != torch.float16 else kc.float(), vc, length)


@inproc
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("g,per_group", [(1, True), (3, True), (4, False), (8, True), (8, False)])
@inproc
def test_sparse_decode_matches_reference(g, per_group, dtype):
    torch.manual_seed(g * 10 + per_group)
    b, hkv, n, d = 2, 2, 301, 64
    hq = hkv * g
    q = torch.randn(b, hq, d, dtype=dtype, device=DEV)
    kc = torch.randn(b, hkv, n, d, dtype=dtype, device=DEV)
    vc = torch.randn(b, hkv, n, d, dtype=dtype, device=DEV)
    hsel = hkv if per_group else hq
    budget = ha.Budget(heavy=1 / 4, sink=5, window=9)
    q_sig, k_sig = _sigs(b, hq, hkv, n)
    starts, lengths = torch.tensor([0, 11], device=DEV), torch.tensor([n, n - 2], device=DEV)
    idx, counts = K.score_select_reference(q_sig, k_sig, starts, lengths, budget, hkv, per_group)
    assert idx.shape[1] == hsel
    ref = K.sparse_decode_reference(q.double(), kc.double(), vc.double(), idx, counts, scale=0.1)
    sd = sys.modules["hashattention.kernels.sparse_decode"]
    # the default shapes (a short list: short steps); many splits of the base shape (up to max_splits); a GPU
    # of many SMs (the merge then works on column slices of 16)
    for cfg, sms in (({}, None), ({"block_n": 16, "programs_per_sm": 64, "short_max_steps": 0}, None),
                     ({"combine_cols": 16}, 4096)):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(sd, "CONFIG", dict(sd.CONFIG, **cfg))
            if sms:
                mp.setattr(sd, "num_sms", lambda dev: sms)
            out = K.sparse_decode(q, kc, vc, idx, counts, scale=0.1)
        err = ((out.double() - ref).norm() / ref.norm()).item()
        assert torch.isfinite(out).all() and err < (2e-2 if dtype == torch.bfloat16 else 2e-3), (cfg, err)


@inproc
def test_sparse_decode_more_than_64_splits(monkeypatch):
    """max_splits 128: the merge holds 65..128 splits in one tile (8 warps)."""
    sd = sys.modules["hashattention.kernels.sparse_decode"]
    monkeypatch.setattr(sd, "CONFIG", dict(sd.CONFIG, block_n=16, programs_per_sm=256, max_splits=128,
                                           short_max_steps=0))
    torch.manual_seed(3)
    b, hkv, g, n, d = 1, 1, 4, 2500, 32
    q = torch.randn(b, hkv * g, d, dtype=torch.bfloat16, device=DEV)
    kc = torch.randn(b, hkv, n, d, dtype=torch.bfloat16, device=DEV)
    vc = torch.randn(b, hkv, n, d, dtype=torch.bfloat16, device=DEV)
    q_sig, k_sig = _sigs(b, hkv * g, hkv, n)
    starts, lengths = torch.tensor([0], device=DEV), torch.tensor([n], device=DEV)
    idx, counts = K.score_select_reference(q_sig, k_sig, starts, lengths, ha.Budget(heavy=1 / 2), hkv, True)
    assert idx.shape[-1] > 64 * 16  # more than 64 splits of 16 slots (programs_per_sm allows them)
    out = K.sparse_decode(q, kc, vc, idx, counts)
    ref = K.sparse_decode_reference(q.double(), kc.double(), vc.double(), idx, counts)
    assert ((out.double() - ref).norm() / ref.norm()) < 2e-2


@inproc
def test_hash_decode_attention_end_to_end_and_budget_extremes():
    torch.manual_seed(0)
    b, hq, hkv, n, d = 2, 8, 2, 203, 32
    q = torch.randn(b, hq, d, dtype=torch.float16, device=DEV)
    kc = torch.randn(b, hkv, n, d, dtype=torch.float16, device=DEV)
    vc = torch.randn(b, hkv, n, d, dtype=torch.float16, device=DEV)
    q_sig, k_sig = _sigs(b, hq, hkv, n)
    starts, lengths = torch.tensor([3, 0], device=DEV), torch.tensor([n, 150], device=DEV)
    for budget, per_group in [(ha.Budget(heavy=1 / 8, sink=4, window=4), True),
                              (ha.Budget(heavy=1, sink=0, window=0), False)]:
        out = K.hash_decode_attention(q, kc, vc, q_sig, k_sig, starts, lengths, budget, per_group)
        ref = K.hash_decode_attention_reference(q.double(), kc.double(), vc.double(), q_sig, k_sig, starts,
                                                lengths, budget, per_group)
        assert ((out.double() - ref).norm() / ref.norm()) < 2e-3
    # budget = context: dense attention over the valid keys
    full = ha.Budget(heavy=n, sink=0, window=0)
    out = K.hash_decode_attention(q, kc, vc, q_sig, k_sig, starts, lengths, full)
    keep = valid_mask(starts, lengths, n)[:, None, None]
    dense = sparse_attention(q[:, :, None].double(), kc.double(), vc.double(), keep)[:, :, 0]
    assert ((out.double() - dense).norm() / dense.norm()) < 2e-3
    # an empty sequence reads nothing and gets zeros
    out = K.hash_decode_attention(q, kc, vc, q_sig, k_sig, torch.tensor([5, 0], device=DEV),
                                  torch.tensor([5, n], device=DEV), ha.Budget(heavy=4, sink=1, window=1))
    assert torch.all(out[0] == 0) and torch.isfinite(out).all() and out[1].abs().sum() > 0


@inproc
def test_bad_inputs_raise_clear_errors():
    b, hq, hkv, n, d = 1, 4, 2, 64, 32
    q = torch.randn(b, hq, d, dtype=torch.float16, device=DEV)
    kc = torch.randn(b, hkv, n, d, dtype=torch.float16, device=DEV)
    q_sig, k_sig = _sigs(b, hq, hkv, n)
    st, ln = torch.zeros(1, dtype=torch.long, device=DEV), torch.full((1,), n, device=DEV)
    bud = ha.Budget(heavy=8, sink=2, window=2)
    with pytest.raises(ValueError, match="contiguous"):
        K.score_select(torch.cat([q_sig, q_sig], -1)[..., :1], k_sig, st, ln, bud, hkv)
    with pytest.raises(ValueError, match="contiguous"):
        K.sparse_decode(q, kc.transpose(2, 3), kc, torch.zeros(1, 2, 4, dtype=torch.int32, device=DEV),
                        ln.int())
    with pytest.raises(TypeError, match="int32"):
        K.score_select(q_sig.float(), k_sig, st, ln, bud, hkv)
    with pytest.raises(TypeError, match="bfloat16, float16"):
        K.hash_decode_attention(q.float(), kc.float(), kc.float(), q_sig, k_sig, st, ln, bud)
    with pytest.raises(TypeError, match="k_cache"):
        K.hash_decode_attention(q, kc.bfloat16(), kc, q_sig, k_sig, st, ln, bud)
    with pytest.raises(ValueError, match="larger than the context"):
        K.hash_decode_attention(q, kc, kc, q_sig, k_sig, st, ln, ha.Budget(heavy=n + 1))
    with pytest.raises(ValueError, match="not a multiple"):
        K.hash_decode_attention(q[:, :3], kc, kc, q_sig[:, :3], k_sig, st, ln, bud)
    with pytest.raises(ValueError, match="not a multiple"):
        K.score_select(q_sig, k_sig, st, ln, bud, 3)
    with pytest.raises(ValueError, match="starts"):
        K.score_select(q_sig, k_sig, st.repeat(2), ln, bud, hkv)
    idx = torch.tensor([[[0, 5, n, -1], [1, 2, 3, 77777]]], dtype=torch.int32, device=DEV)
    with pytest.raises(ValueError, match=f"idx reads positions -1..{n}: each must be in 0..{n - 1}"):
        K.sparse_decode(q, kc, kc, idx, torch.tensor([3], device=DEV))
    with pytest.raises(ValueError, match="idx reads positions -2"):
        K.sparse_decode(q, kc, kc, idx.clamp(max=n - 1) - 2, torch.tensor([3], device=DEV))
    # entries after counts[b] are never read: whatever they hold is fine
    assert torch.isfinite(K.sparse_decode(q, kc, kc, idx, torch.tensor([2], device=DEV))).all()


@inproc
def test_sparse_decode_never_reads_outside_the_cache():
    """check=False (the library's own calls, no device sync): a position past the cache is skipped, not read."""
    b, hq, hkv, n, d = 1, 4, 2, 64, 32
    q = torch.randn(b, hq, d, dtype=torch.float16, device=DEV)
    kc = torch.randn(b, hkv, n, d, dtype=torch.float16, device=DEV)
    vc = torch.randn(b, hkv, n, d, dtype=torch.float16, device=DEV)
    if not K.use_triton(q):
        pytest.skip("the PyTorch reference path has no unchecked mode")
    idx = torch.tensor([[[0, 5, n + 1000, 9], [1, 2, 3, n]]], dtype=torch.int32, device=DEV)
    counts = torch.tensor([4], device=DEV)
    out = K.sparse_decode(q, kc, vc, idx, counts, check=False)
    ref = K.sparse_decode_reference(q.double(), kc.double(), vc.double(), torch.where(idx >= n, -1, idx), counts)
    assert ((out.double() - ref).norm() / ref.norm()) < 2e-3


def _policy_case(per_group, dtype=torch.float16, n=90, seed=0):
    torch.manual_seed(seed)
    cfg = ha.MapsConfig(num_layers=1, num_q_heads=6, num_kv_heads=2, head_dim=32)
    maps = ha.HashMaps.simhash(cfg, seed=seed).to(DEV)
    policy = ha.HashAttentionPolicy(maps, ha.Budget(heavy=1 / 8, sink=3, window=4), per_group=per_group)
    b = 3
    q = torch.randn(b, 6, 1, 32, dtype=dtype, device=DEV)
    k = torch.randn(b, 2, n, 32, dtype=dtype, device=DEV)
    v = torch.randn(b, 2, n, 32, dtype=dtype, device=DEV)
    valid = torch.ones(b, 1, 1, n, dtype=torch.bool, device=DEV)
    valid[1, ..., :7] = False  # left padding
    valid[2, ..., :40] = False
    state = {}
    policy.update(0, state, k, v, 0)
    return policy, state, q, k, v, valid


@inproc
@pytest.mark.parametrize("per_group", [True, False])
@inproc
def test_policy_fast_path_equals_reference_path(per_group, monkeypatch):
    policy, state, q, k, v, valid = _policy_case(per_group)
    if not CUDA:
        monkeypatch.setattr(policy, "kernels_on_cpu", True)
    fast = policy.decode_attention(0, state, q, k, v, valid, 0.2)
    keep = policy.select(0, state, q, k, v, valid, 0.2)
    ref = sparse_attention(q.double(), k.double(), v.double(), keep, 0.2)
    assert fast is not None and fast.shape == q.shape
    assert ((fast.double() - ref).norm() / ref.norm()) < 2e-3
    assert float(state.pop("fast_read")) == float(keep.sum() / keep.shape[1])
    holes = valid.clone()
    holes[0, ..., 10] = False  # not one range: the general path must take it
    assert policy.decode_attention(0, state, q, k, v, holes, 0.2) is None
    assert policy.decode_attention(0, state, q.float(), k.float(), v.float(), valid, 0.2) is None


@inproc
def test_policy_fast_path_off_cuda_returns_none():
    if CUDA:
        pytest.skip("CPU behaviour")
    policy, state, q, k, v, valid = _policy_case(True)
    assert policy.decode_attention(0, state, q, k, v, valid, 0.2) is None


@inproc
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("per_group", [True, False])
@inproc
def test_gpu_long_context_selection_and_attention(per_group):
    torch.manual_seed(1)
    b, hkv, g, n, d = 2, 8, 4, 70_001, 128
    hq = hkv * g
    q_sig, k_sig = _sigs(b, hq, hkv, n)
    starts = torch.tensor([0, 1000], device=DEV)
    lengths = torch.tensor([n, 65_537], device=DEV)
    budget = ha.Budget(heavy=1 / 32, sink=128, window=128)
    idx, counts = K.score_select(q_sig, k_sig, starts, lengths, budget, hkv, per_group)
    ref_idx, ref_counts = K.score_select_reference(q_sig, k_sig, starts, lengths, budget, hkv, per_group)
    assert torch.equal(counts, ref_counts) and torch.equal(idx, ref_idx)
    q = torch.randn(b, hq, d, dtype=torch.bfloat16, device=DEV)
    kc = torch.randn(b, hkv, n, d, dtype=torch.bfloat16, device=DEV)
    vc = torch.randn(b, hkv, n, d, dtype=torch.bfloat16, device=DEV)
    out = K.sparse_decode(q, kc, vc, idx, counts)
    ref = K.sparse_decode_reference(q.float(), kc.float(), vc.float(), idx, counts)
    assert ((out.float() - ref).norm() / ref.norm()) < 1e-2


@inproc
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_pdl_chain_in_a_graph_equals_plain_launches(monkeypatch):
    """Programmatic dependent launch (count -> emit, split -> merge) in a CUDA graph of several decode calls
    on different caches, replayed with new inputs each time: the same lists and outputs as plain launches (a
    kernel reading its predecessor's results before they are complete would differ), and as the reference."""
    ss, sd = sys.modules["hashattention.kernels.score_select"], sys.modules["hashattention.kernels.sparse_decode"]
    torch.manual_seed(3)
    b, hkv, g, n, d, calls = 1, 8, 4, 40_000, 128, 4
    hq = hkv * g
    budget = ha.Budget(heavy=1 / 32, sink=128, window=128)
    st, ln = torch.zeros(b, dtype=torch.int32, device=DEV), torch.full((b,), n, dtype=torch.int32, device=DEV)
    q_sig, _ = _sigs(b, hq, hkv, 1)
    ks = [_sigs(b, hq, hkv, n)[1] for _ in range(calls)]
    q = torch.randn(b, hq, d, dtype=torch.bfloat16, device=DEV)
    caches = [(torch.randn(b, hkv, n, d, dtype=torch.bfloat16, device=DEV),
               torch.randn(b, hkv, n, d, dtype=torch.bfloat16, device=DEV)) for _ in range(calls)]

    def step():
        res = []
        for k_sig, (kc, vc) in zip(ks, caches):
            idx, cnt = K.score_select(q_sig, k_sig, st, ln, budget, hkv, True)
            res.append((idx, K.sparse_decode(q, kc, vc, idx, cnt, check=False)))
        return res

    outs = {}
    for pdl in (False, True):
        monkeypatch.setitem(ss.CONFIG, "pdl", pdl)
        monkeypatch.setitem(sd.CONFIG, "pdl_split", pdl)
        monkeypatch.setitem(sd.CONFIG, "pdl_combine", pdl)
        step()  # compile outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            res = step()
        got = []
        for rep in range(3):  # new signatures each replay: stale results would show
            for i, k_sig in enumerate(ks):
                k_sig.copy_(_sigs(b, hq, hkv, n, gen=torch.Generator().manual_seed(100 * rep + i))[1])
            graph.replay()
            torch.cuda.synchronize()
            got.append([(idx.clone(), out.clone()) for idx, out in res])
        outs[pdl] = got
    for rep, (plain, pdl) in enumerate(zip(outs[False], outs[True])):
        for (i0, o0), (i1, o1) in zip(plain, pdl):
            assert torch.equal(i0, i1) and torch.equal(o0, o1), rep
    for k_sig, (idx, _) in zip(ks, outs[True][-1]):  # ks hold the last replay's signatures
        assert torch.equal(idx, K.score_select_reference(q_sig, k_sig, st, ln, budget, hkv, True)[0])


@inproc
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@inproc
def test_gpu_hf_generate_uses_fast_path():
    from conftest import tiny_model
    model = tiny_model("llama").to(DEV, torch.float16)
    ids = torch.randint(3, 97, (2, 300), device=DEV)
    attn = torch.ones_like(ids)
    attn[1, :50] = 0
    budget = ha.Budget(heavy=1 / 8, sink=8, window=8)
    outs, stats, calls = [], [], []
    for fast in (True, False):
        policy = ha.make_policy("simhash", budget, model_config=model.config)
        orig = policy.decode_attention
        if not fast:
            policy.decode_attention = lambda *a, **kw: None
        else:
            policy.decode_attention = lambda *a, **kw: calls.append(1) or orig(*a, **kw)
        with ha.enable(model, policy) as h:
            outs.append(model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=6, do_sample=False))
            stats.append(h.stats())
    assert calls and all(c == 1 for c in calls)
    assert stats[0]["fraction"] == pytest.approx(stats[1]["fraction"])
    assert (outs[0] == outs[1]).float().mean() > 0.9  # fp16 rounding may flip a rare near-tie


@inproc
@pytest.mark.parametrize("numel", [1, 1000, 4096 * 3 + 17])
def test_stream_read_equals_reference(numel):
    """The benchmark's measured read floor (benchmarks/read_floor.py) reads every word once, in every shape."""
    from hashattention.benchmarks.read_floor import SHAPES, stream_read, stream_read_reference
    g = torch.Generator(device=DEV).manual_seed(numel)
    x = torch.randint(-2 ** 31, 2 ** 31 - 1, (numel,), dtype=torch.int32, device=DEV, generator=g)
    for shape in SHAPES:
        got = stream_read(x, *shape)
        assert torch.equal(got.cpu(), stream_read_reference(x, *shape)), shape
    before = stream_read(x, *SHAPES[0]).cpu()
    x[-1] ^= 1  # the last word (a tail when numel is not a multiple of the block) is read too
    assert not torch.equal(stream_read(x, *SHAPES[0]).cpu(), before)
    with pytest.raises(ValueError, match="contiguous int32"):
        stream_read(x.float())
