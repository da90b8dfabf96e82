"""LLM Surgeon: closed forms against a direct solve, group costs, and multi-shot pruning."""

import pytest
import torch

from explorer.apply.pruning import prune_model
from explorer.catalogue import CRITERIA, RECOVERY_STEPS
from explorer.planning.plan import Plan, allocate
from explorer.planning.selection import Selection, param_counts
from explorer.recovery.surgeon import Surgery, partial_selection, surgeon_prune, surgeon_update
from explorer.scoring.base import ScoreContext
from explorer.scoring.statistics import collect_statistics
from explorer.scoring.surgeon import SURGEON_NEEDS, damped, removal_costs
from tests.tiny import tiny, tokens


def spd(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(n, n, generator=g, dtype=torch.float64)
    return m @ m.T + 0.5 * torch.eye(n, dtype=torch.float64)


def direct_minimiser(w, a, g, removed):
    """argmin ½ vec(ΔW)ᵀ (G ⊗ A) vec(ΔW) with (W + ΔW)_e = 0 on the removed entries e.

    Solved on the full Kronecker matrix: the removed entries are fixed at −W_e and the free ones
    satisfy F_ff x_f = −F_fe x_e. Returns (W + ΔW, the minimum).
    """
    f = torch.kron(g, a)  # row-major vec: entry (i, j) is index i * in + j
    mask = torch.zeros_like(w, dtype=torch.bool)
    for i, j in removed:
        mask[i, j] = True
    e, free = mask.flatten(), ~mask.flatten()
    x = torch.zeros(w.numel(), dtype=torch.float64)
    x[e] = -w.flatten()[e]
    x[free] = torch.linalg.solve(f[free][:, free], -f[free][:, e] @ x[e])
    return w + x.view_as(w), 0.5 * x @ f @ x


@pytest.fixture
def case():
    g = torch.Generator().manual_seed(0)
    return torch.randn(5, 4, generator=g, dtype=torch.float64), spd(4, 1), spd(5, 2)


@pytest.mark.parametrize(
    "rows, cols", [([1, 3], None), (None, [2]), ([0], [1, 3]), ([4], [0, 1, 2])]
)
def test_update_is_the_constrained_quadratic_minimiser(case, rows, cols):
    w, a, g = case
    removed = {(i, j) for i in rows or [] for j in range(4)}
    removed |= {(i, j) for i in range(5) for j in cols or []}
    expected, _ = direct_minimiser(w, a, g, removed)
    got = surgeon_update(w, a, g, rows=rows, cols=cols)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
    assert all(got[i, j] == 0 for i, j in removed)


def test_costs_are_the_minimum_loss_of_each_removal(case):
    w, a, g = case
    row_costs, col_costs = removal_costs(w, a, g)
    for r in range(5):
        _, loss = direct_minimiser(w, a, g, {(r, j) for j in range(4)})
        assert row_costs[r].item() == pytest.approx(loss.item(), rel=1e-9)
    for c in range(4):
        _, loss = direct_minimiser(w, a, g, {(i, c) for i in range(5)})
        assert col_costs[c].item() == pytest.approx(loss.item(), rel=1e-9)


def test_damping_adds_a_share_of_the_mean_diagonal():
    m = torch.tensor([[2.0, 1.0], [1.0, 4.0]])
    torch.testing.assert_close(damped(m, 0.01), torch.tensor([[2.03, 1.0], [1.0, 4.03]]).double())


@pytest.fixture(scope="module")
def llama_stats():
    model, s = tiny("llama")
    return model, s, collect_statistics(model, s, tokens(6, 12, seed=1), SURGEON_NEEDS)


def test_group_cost_is_the_sum_over_its_members(llama_stats):
    model, s, stats = llama_stats
    scores = CRITERIA["surgeon"].score(
        ScoreContext(model, s, stats, kinds=("head", "kv", "mlp", "layer"))
    )
    f, layer = s.family, 1

    def costs(name, source=None):
        w = model.get_submodule(s.path(layer, name)).weight
        a = damped(stats.cov(s.path(layer, source or name)))
        return removal_costs(w, a, damped(stats.grad_cov(s.path(layer, name))))

    gate, up, down = costs(f.gate), costs(f.up, f.gate), costs(f.down)
    mlp = gate[0] + up[0] + down[1]
    torch.testing.assert_close(scores["mlp"][layer], mlp.float())
    hd = s.head_dim
    q, o = costs(f.q), costs(f.o)
    head = q[0].view(-1, hd).sum(1) + o[1].view(-1, hd).sum(1)
    torch.testing.assert_close(scores["head"][layer], head.float())
    k, v = costs(f.k, f.q), costs(f.v, f.q)
    kv = head.view(s.kv_heads, -1).sum(1) + k[0].view(-1, hd).sum(1) + v[0].view(-1, hd).sum(1)
    torch.testing.assert_close(scores["kv"][layer], kv.float())
    assert (scores["mlp"] > 0).all() and (scores["layer"] > scores["mlp"].sum(1)).all()


def selection_of(s):
    return Selection.make(
        s,
        kv={2: [0]},
        heads={0: [1, 3], 2: [4]},
        mlp={0: list(range(0, 40, 3)), 1: list(range(10)), 2: [5, 6]},
    )


def test_one_shot_equals_scoring_updating_and_slicing_once(llama_stats):
    model, s, stats = llama_stats
    sel = selection_of(s)
    pruned, final = surgeon_prune(model, s, sel, tokens(6, 12, seed=1), shots=1)
    assert final == sel
    by_hand = prune_model(model, s, Selection())
    Surgery(by_hand, s, stats).apply(sel)
    by_hand = prune_model(by_hand, s, sel)
    for (name, p), (_, q) in zip(
        pruned.named_parameters(), by_hand.named_parameters(), strict=True
    ):
        torch.testing.assert_close(p, q, msg=name)


def test_one_shot_with_a_plan_allocates_the_surgeon_scores(llama_stats):
    model, s, stats = llama_stats
    plan = Plan(criterion="surgeon", allocation="global", target=0.3)
    scores = CRITERIA["surgeon"].score(ScoreContext(model, s, stats))
    _, final = surgeon_prune(model, s, lambda sc: allocate(plan, s, sc), tokens(6, 12, seed=1))
    assert final == allocate(plan, s, scores)


def contains(big: Selection, small: Selection) -> bool:
    return all(
        set(units) <= set(getattr(big, kind).get(layer, ()))
        for kind in ("heads", "kv", "mlp")
        for layer, units in getattr(small, kind).items()
    )


def test_multi_shot_reaches_the_target_through_growing_selections(monkeypatch):
    model, s = tiny("llama")
    calib = tokens(6, 12, seed=1)
    applied, messages = [], []
    apply = Surgery.apply

    def spy(self, selection, previous=None, **kwargs):
        applied.append(selection)
        apply(self, selection, previous, **kwargs)

    monkeypatch.setattr(Surgery, "apply", spy)
    plan = Plan(criterion="surgeon", allocation="global", target=0.3)
    _, final = surgeon_prune(
        model,
        s,
        lambda scores: allocate(plan, s, scores),
        calib,
        shots=3,
        progress=lambda f, m: messages.append((f, m)),
    )
    assert len(applied) == 3 and final == applied[-1]
    sizes = [param_counts(s, sel)["blocks"] for sel in applied]
    assert sizes[0] > sizes[1] > sizes[2]
    assert sizes[2] <= (1 - 0.3) * s.block_params < sizes[2] + s.group_params("head")
    assert all(contains(b, a) for a, b in zip(applied, applied[1:], strict=False))
    assert messages[-1][0] == pytest.approx(1.0) and "shot 3/3" in messages[-1][1]
    assert [f for f, _ in messages] == sorted(f for f, _ in messages)


def test_multi_shot_to_a_fixed_target_beats_plain_slicing():
    model, s = tiny("llama")
    calib, held_out = tokens(6, 12, seed=1), tokens(4, 12, seed=2)
    sel = selection_of(s)
    with torch.no_grad():
        dense = model(held_out).logits
        plain = (prune_model(model, s, sel)(held_out).logits - dense).pow(2).mean()
        for shots in (1, 3):
            pruned, final = surgeon_prune(model, s, sel, calib, shots=shots)
            assert final == sel
            updated = (pruned(held_out).logits - dense).pow(2).mean()
            assert updated < 0.75 * plain


def test_partial_selection_keeps_query_heads_even():
    _, s = tiny("llama")  # 6 heads in 2 kv groups of 3
    target = Selection.make(s, kv={0: [0]}, heads={0: [4, 5]}, mlp={1: [0, 1, 2, 3]})
    scores = {
        "head": torch.arange(18.0).view(3, 6).flip(1),
        "kv": torch.zeros(3, 2),
        "mlp": torch.arange(120.0).view(3, 40),
    }
    half = partial_selection(s, target, Selection(), scores, 0.5)
    # Group 0 (going whole later) gives up its cheapest head meanwhile, group 1 its cheaper one.
    assert half.heads == {0: (2, 5)} and half.kv == {} and half.mlp == {1: (0, 1)}
    assert partial_selection(s, target, half, scores, 1.0) == target


def test_surgeon_step_rewrites_the_pruned_weights():
    from explorer.recovery.steps import RecoveryContext, run_steps

    model, s = tiny("llama")
    sel, calib = selection_of(s), tokens(6, 12, seed=1)
    pruned = prune_model(model, s, sel)
    run_steps(
        [{"step": "surgeon", "shots": 2}],
        RecoveryContext(model, pruned, s, sel, calib),
        RECOVERY_STEPS,
    )
    expected, _ = surgeon_prune(model, s, sel, calib, shots=2)
    for (name, p), q in zip(pruned.named_parameters(), expected.parameters(), strict=True):
        assert torch.equal(p, q), name
