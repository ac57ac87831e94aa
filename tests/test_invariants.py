"""Issue 8: invariants of selection and sparse attention under property-based fuzzing (hypothesis).

Default run: a few dozen random cases per property (fast). Heavy run: ``HASHATTENTION_FUZZ=1 pytest -m fuzz``
(or any -m that selects them) multiplies the examples; docs/invariants.md lists the counts actually run.

Properties, for random shapes, budgets (count or fraction), GQA ratios, dtypes, batch and left-padding layouts,
several queries per row (causal), integer and real scores:
  * the keep mask never holds a future or padded key (keep <= valid);
  * the first ``sink`` and the last ``window`` valid keys are always kept;
  * a row keeps exactly min(n, sink + window + heavy(n)) keys, heavy(n) = the budget's count for n valid keys;
  * heavy keys are a top-k: no unselected candidate outscores a selected one, and among equal scores the most
    recent are taken; counting top-k (integer scores) equals the sorting rule;
  * sparse attention equals dense (float64 softmax reference) when the budget covers the context;
  * the Triton kernels equal their PyTorch references (TRITON_INTERPRET=1 on CPU, in a fresh process).
"""
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from hashattention.core.attention import sparse_attention
from hashattention.core.budget import Budget
from hashattention.core.selection import select

FUZZ = os.environ.get("HASHATTENTION_FUZZ") == "1"
N = 400 if FUZZ else 40  # examples per property
settings.register_profile("ha", deadline=None, derandomize=not FUZZ, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile("ha")

#: random cases actually run, per test (written to $HASHATTENTION_CASES_FILE for docs/invariants.md)
CASES: dict = {}


def _count(name):
    CASES[name] = CASES.get(name, 0) + 1


@pytest.fixture(scope="module", autouse=True)
def _report_cases():
    yield
    path = os.environ.get("HASHATTENTION_CASES_FILE")
    if path:
        import json
        old = json.load(open(path)) if os.path.exists(path) else {}
        old.update({f"test_invariants::{k}": v for k, v in CASES.items()})
        json.dump(old, open(path, "w"), indent=1)


@st.composite
def layouts(draw, max_b=3, max_lk=48):
    """A batch layout: B rows of Lk keys, row b left-padded by pad[b], Lq queries at the end (causal)."""
    b = draw(st.integers(1, max_b))
    lk = draw(st.integers(1, max_lk))
    lq = draw(st.integers(1, min(lk, 5)))
    pads = draw(st.lists(st.integers(0, lk - lq), min_size=b, max_size=b))  # each row keeps >= 1 valid key
    hkv = draw(st.sampled_from([1, 2, 3]))
    g = draw(st.sampled_from([1, 2, 3, 4]))
    heavy = draw(st.one_of(st.integers(0, 2 * max_lk), st.sampled_from([1 / 64, 1 / 16, 1 / 8, 0.25, 0.5, 1.0])))
    budget = Budget(heavy=heavy, sink=draw(st.integers(0, 8)), window=draw(st.integers(0, 8)))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    return b, lk, lq, pads, hkv, g, budget, seed


def valid_mask(b, lk, lq, pads):
    """bool [B, 1, Lq, Lk]: key j is valid for query i of row b when pad[b] <= j <= its position."""
    kpos = torch.arange(lk)
    qpos = torch.arange(lk - lq, lk)
    causal = kpos[None, :] <= qpos[:, None]
    pad = torch.tensor(pads)[:, None, None] <= kpos[None, None, :]
    return (causal[None] & pad)[:, None]


def check_selection(keep, valid, scores, budget, max_score=None):
    """Assert every selection invariant row by row (small shapes: plain loops keep the check obvious)."""
    keep = keep.expand(scores.shape if scores is not None else keep.shape)
    valid = valid.expand_as(keep)
    assert not (keep & ~valid).any(), "a future or padded key was selected"
    rows_k = keep.reshape(-1, keep.shape[-1])
    rows_v = valid.reshape(-1, keep.shape[-1])
    rows_s = None if scores is None else scores.reshape(-1, keep.shape[-1])
    for r in range(rows_k.shape[0]):
        kv, vv = rows_k[r], rows_v[r]
        pos = torch.nonzero(vv).flatten()  # valid positions, ascending
        n = len(pos)
        forced = set(pos[:budget.sink].tolist()) | set(pos[max(n - budget.window, 0):].tolist() if budget.window else [])
        kept = set(torch.nonzero(kv).flatten().tolist())
        assert forced <= kept, f"row {r}: sink/window {sorted(forced - kept)} not kept"
        heavy = min(int(budget.heavy_count(n)), n - len(forced))
        assert len(kept) == len(forced) + heavy, f"row {r}: {len(kept)} kept, budget says {len(forced) + heavy}"
        cand = [p for p in pos.tolist() if p not in forced]
        picked = [p for p in cand if p in kept]
        rest = [p for p in cand if p not in kept]
        if rows_s is not None and picked and rest:
            s = rows_s[r]
            lo = min(s[p].item() for p in picked)
            hi = max(s[p].item() for p in rest)
            assert lo >= hi, f"row {r}: unselected score {hi} beats selected {lo}"
            if lo == hi:  # ties go to the most recent token
                assert max(p for p in rest if s[p] == hi) < min(p for p in picked if s[p] == lo)
        elif rows_s is None and picked and rest:
            assert max(rest) < min(picked), "no preference: the most recent candidates go first"


@settings(max_examples=N)
@given(lay=layouts(), integer=st.booleans(), per_q_valid=st.booleans(), none=st.booleans())
def test_selection_invariants(lay, integer, per_q_valid, none):
    b, lk, lq, pads, hkv, g, budget, seed = lay
    gen = torch.Generator().manual_seed(seed)
    hs = hkv * g if per_q_valid else hkv
    valid = valid_mask(b, lk, lq, pads)
    if per_q_valid:  # a per-head mask (e.g. a sliding-window layer) must be honoured too
        valid = valid.expand(b, hs, lq, lk).clone()
        valid &= torch.rand(b, hs, lq, lk, generator=gen) > 0.2
    max_score = None
    if none:
        scores = None
    elif integer:
        max_score = int(torch.randint(1, 70, (), generator=gen))
        # few distinct values: plenty of ties
        scores = torch.randint(0, min(max_score, 4) + 1, (b, hs, lq, lk), generator=gen)
    else:
        scores = torch.randn(b, hs, lq, lk, generator=gen)
    keep = select(scores, valid, budget, max_score=max_score)
    assert keep.dtype == torch.bool
    if scores is not None:
        assert keep.shape == scores.shape
        if integer:  # counting and sorting are the same rule
            assert torch.equal(keep, select(scores.float(), valid, budget))
    check_selection(keep, valid, scores, budget)
    _count("test_selection_invariants")


@settings(max_examples=N)
@given(lay=layouts(max_lk=40), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       d=st.sampled_from([4, 8, 16]), sel_heads=st.sampled_from(["q", "kv", "one"]))
def test_sparse_equals_dense_when_budget_covers_context(lay, dtype, d, sel_heads):
    b, lk, lq, pads, hkv, g, _, seed = lay
    gen = torch.Generator().manual_seed(seed)
    hq = hkv * g
    q = torch.randn(b, hq, lq, d, generator=gen).to(dtype)
    k = torch.randn(b, hkv, lk, d, generator=gen).to(dtype)
    v = torch.randn(b, hkv, lk, d, generator=gen).to(dtype)
    valid = valid_mask(b, lk, lq, pads)
    hs = {"q": hq, "kv": hkv, "one": 1}[sel_heads]
    budget = Budget(heavy=int(torch.randint(lk, 3 * lk + 1, (), generator=gen)), sink=lk % 3, window=lk % 5)
    keep = select(torch.randn(b, hs, lq, lk, generator=gen), valid, budget)
    assert torch.equal(keep, valid.expand_as(keep)), "a covering budget must keep every valid key"
    out = sparse_attention(q, k, v, keep)
    # float64 dense reference with the same mask (GQA: repeat KV heads)
    kk = k.double().repeat_interleave(g, 1)
    vv = v.double().repeat_interleave(g, 1)
    s = q.double() @ kk.transpose(-1, -2) * d ** -0.5
    ref = torch.softmax(s.masked_fill(~valid, float("-inf")), -1) @ vv
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    assert out.dtype == dtype and out.shape == (b, hq, lq, d)
    torch.testing.assert_close(out.double(), ref, atol=tol * 4, rtol=tol * 4)
    _count("test_sparse_equals_dense_when_budget_covers_context")


@settings(max_examples=N)
@given(lay=layouts(max_lk=40))
def test_sparse_attention_reads_only_the_kept_keys(lay):
    """Changing a key/value that is not kept never changes the output (nothing outside the mask leaks)."""
    b, lk, lq, pads, hkv, g, budget, seed = lay
    gen = torch.Generator().manual_seed(seed)
    hq, d = hkv * g, 8
    q = torch.randn(b, hq, lq, d, generator=gen)
    k = torch.randn(b, hkv, lk, d, generator=gen)
    v = torch.randn(b, hkv, lk, d, generator=gen)
    valid = valid_mask(b, lk, lq, pads)
    keep = select(torch.randn(b, hkv, lq, lk, generator=gen), valid, budget)
    out = sparse_attention(q, k, v, keep)
    unread = ~keep.any(2).any(0)  # [Hkv, Lk]: read by no query of no row
    unread = unread[None, :, :, None].expand(b, hkv, lk, d)
    k2 = torch.where(unread, torch.randn(k.shape, generator=gen) * 100, k)
    v2 = torch.where(unread, torch.randn(v.shape, generator=gen) * 100, v)
    assert torch.equal(sparse_attention(q, k2, v2, keep), out)
    _count("test_sparse_attention_reads_only_the_kept_keys")


# -- the Triton kernels vs their references ----------------------------------------------------------------
try:
    import triton  # noqa: F401
    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False
IN_PROCESS = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
DEV = "cuda" if torch.cuda.is_available() else "cpu"
KN = (200 if FUZZ else 12) if IN_PROCESS else 0


@pytest.mark.skipif(not HAVE_TRITON or IN_PROCESS, reason="needs triton; runs the kernel properties in a fresh "
                    "TRITON_INTERPRET=1 process")
def test_kernel_properties_in_interpreter_process():
    # Triton chooses its interpreter when a kernel is decorated: a fresh process with TRITON_INTERPRET=1.
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not gpu",
                        "-k", "kernel_score_select", __file__], env=env, cwd=os.path.dirname(__file__),
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "1 passed" in r.stdout and "skipped" not in r.stdout, r.stdout[-2000:]


@st.composite
def decode_cases(draw):
    b = draw(st.integers(1, 3))
    n = draw(st.integers(1, 80))
    hkv = draw(st.sampled_from([1, 2]))
    g = draw(st.sampled_from([1, 2, 3, 4]))
    w = draw(st.sampled_from([1, 2]))
    per_q_keys = draw(st.booleans())
    per_group = draw(st.booleans())
    starts = draw(st.lists(st.integers(0, n - 1), min_size=b, max_size=b))
    lengths = [draw(st.integers(s + 1, n)) for s in starts]
    heavy = draw(st.one_of(st.integers(0, n), st.sampled_from([1 / 16, 0.25, 1.0])))
    budget = Budget(heavy=heavy, sink=draw(st.integers(0, 6)), window=draw(st.integers(0, 6)))
    few = draw(st.booleans())
    return b, n, hkv, g, w, per_q_keys, per_group, starts, lengths, budget, few, draw(st.integers(0, 2 ** 31 - 1))


@pytest.mark.skipif(not (HAVE_TRITON and IN_PROCESS), reason="kernels run under TRITON_INTERPRET=1 or CUDA")
@settings(max_examples=max(KN, 1))
@given(case=decode_cases(), dtype=st.sampled_from([torch.float16, torch.bfloat16]), d=st.sampled_from([16, 32]))
def test_kernel_score_select_and_decode_equal_reference(case, dtype, d):
    from hashattention import kernels as K
    assert K.use_triton(torch.empty(1, device=DEV)), "the Triton kernels must really run here"
    b, n, hkv, g, w, per_q_keys, per_group, starts, lengths, budget, few, seed = case
    gen = torch.Generator().manual_seed(seed)
    hq = hkv * g
    hs = hq if per_q_keys else hkv
    lo, hi = -2 ** 31, 2 ** 31 - 1
    q_sig = torch.randint(lo, hi, (b, hq, w), dtype=torch.int32, generator=gen)
    if few:  # three distinct key signatures: many equal scores exercise the tie rule
        pool = torch.randint(lo, hi, (3, w), dtype=torch.int32, generator=gen)
        k_sig = pool[torch.randint(0, 3, (b, hs, n), generator=gen)]
    else:
        k_sig = torch.randint(lo, hi, (b, hs, n, w), dtype=torch.int32, generator=gen)
    st_, ln = torch.tensor(starts), torch.tensor(lengths)
    args = (q_sig.to(DEV), k_sig.to(DEV), st_.to(DEV), ln.to(DEV), budget, hkv, per_group)
    idx, counts = K.score_select(*args, strict=False)
    ridx, rcounts = K.score_select_reference(*args)
    assert torch.equal(counts.cpu().long(), rcounts.cpu().long())
    assert torch.equal(idx.cpu(), ridx.cpu()), "selected tokens differ from the shared rule"
    # invariants on the index list itself
    for bb in range(b):
        sel = idx[bb].cpu()
        c = int(counts[bb])
        assert ((sel[:, :c] >= starts[bb]) & (sel[:, :c] < lengths[bb])).all(), "padded or future token read"
        assert (sel[:, c:] == -1).all()
    q = torch.randn(b, hq, d, generator=gen).to(dtype).to(DEV)
    kc = torch.randn(b, hkv, n, d, generator=gen).to(dtype).to(DEV)
    vc = torch.randn(b, hkv, n, d, generator=gen).to(dtype).to(DEV)
    out = K.sparse_decode(q, kc, vc, idx, counts)
    ref = K.sparse_decode_reference(q, kc, vc, ridx, rcounts)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
    _count("test_kernel_score_select_and_decode_equal_reference")


@pytest.mark.slow
@pytest.mark.fuzz
@settings(max_examples=2000 if FUZZ else 300)
@given(lay=layouts(max_b=4, max_lk=96), integer=st.booleans())
def test_selection_invariants_heavy(lay, integer):
    """The same selection properties on larger layouts, many more cases (marker ``fuzz``)."""
    b, lk, lq, pads, hkv, g, budget, seed = lay
    gen = torch.Generator().manual_seed(seed)
    valid = valid_mask(b, lk, lq, pads)
    if integer:
        scores = torch.randint(0, 5, (b, hkv, lq, lk), generator=gen)
        keep = select(scores, valid, budget, max_score=4)
        assert torch.equal(keep, select(scores.float(), valid, budget))
    else:
        scores = torch.randn(b, hkv, lq, lk, generator=gen)
        keep = select(scores, valid, budget)
    check_selection(keep, valid, scores, budget)
    _count("test_selection_invariants_heavy")
