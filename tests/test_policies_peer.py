"""Quest and H2O against small hand-computed cases, and the fast selection against the shared rule."""
import torch

from hashattention.core.budget import Budget
from hashattention.core.selection import causal_valid, select
from hashattention.evaluation.fastpath import topk_select
from hashattention.policies import make_policy
from hashattention.policies.h2o import H2OPolicy
from hashattention.policies.quest import QuestPolicy


def test_quest_page_bounds_hand_computed():
    # 1 KV head, 1 query head, D=2, pages of 2 keys: page0 = k0,k1, page1 = k2,k3, page2 = k4,k5
    k = torch.tensor([[1., 0.], [0., 1.], [-1., 0.], [0., -1.], [3., 3.], [0., 0.]]).view(1, 1, 6, 2)
    q = torch.tensor([[1., -1.]]).view(1, 1, 1, 2)
    valid = torch.ones(1, 1, 1, 6, dtype=torch.bool)
    pol = QuestPolicy(Budget(heavy=2, sink=0, window=0), page_size=2)
    s = pol.scores(0, {}, q, k, k, valid, 1.0)[0, 0, 0]
    # page0 max=(1,1) min=(0,0): q+ . max + q- . min = 1 + 0 = 1; page1 max=(0,0) min=(-1,-1): 0 + 1 = 1;
    # page2 max=(3,3) min=(0,0): 3 + 0 = 3
    assert s.tolist() == [1., 1., 1., 1., 3., 3.]
    keep = pol.select(0, {}, q, k, k, valid, 1.0)[0, 0, 0]
    assert keep.tolist() == [False, False, False, False, True, True]


def test_h2o_accumulates_observed_attention():
    pol = H2OPolicy(Budget(heavy=1, sink=1, window=1))
    state = {}
    k = torch.zeros(1, 1, 5, 2)
    q = torch.zeros(1, 1, 1, 2)
    valid = torch.ones(1, 1, 1, 5, dtype=torch.bool)
    pol.scores(0, state, q, k, k, valid, 1.0)  # seeds with dense attention: uniform 0.2 each
    probs = torch.tensor([0., 0.1, 0.6, 0.3, 0.]).view(1, 1, 1, 5)
    pol.observe(0, state, probs, valid)
    acc = state["acc"][0, 0]
    assert torch.allclose(acc, torch.tensor([0.2, 0.3, 0.8, 0.5, 0.2]))
    keep = pol.select(0, state, q, k, k, valid, 1.0)[0, 0, 0]
    # sink = key 0, window = key 4, heavy 1 of keys 1..3 = key 2 (accumulated 0.8)
    assert keep.tolist() == [True, False, True, False, True]


def test_registered_and_fast_select_matches_shared_rule():
    for name in ("quest", "h2o"):
        assert make_policy(name, Budget(heavy=0.25)).name == name
    torch.manual_seed(0)
    for trial in range(60):
        valid = causal_valid(2, 5, 40).clone()
        valid[1, :, :, :7] = False
        ints = trial % 2 == 0
        s = torch.randint(0, 4, (2, 3, 5, 40)) if ints else torch.randn(2, 3, 5, 40)
        b = Budget(heavy=[0.25, 0.1, 3, 0][trial % 4], sink=trial % 3, window=trial % 5)
        assert torch.equal(select(s, valid, b, max_score=3 if ints else None), topk_select(s, valid, b))
