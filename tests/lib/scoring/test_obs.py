"""Greedy reader-side removal (OBS order with LLM Surgeon's costs) against direct solves."""

import pytest
import torch

from explorer.catalogue import CRITERIA
from explorer.errors import PlanError
from explorer.planning.plan import Plan, allocate
from explorer.planning.selection import Selection
from explorer.recovery.surgeon import surgeon_prune, surgeon_update
from explorer.scoring.base import Needs, ScoreContext
from explorer.scoring.obs import GREEDY_NEEDS, block_costs, greedy_order
from explorer.scoring.statistics import collect_statistics
from tests.lib.recovery.test_surgeon import direct_minimiser, spd
from tests.tiny import tiny, tokens


@pytest.fixture
def case():
    g = torch.Generator().manual_seed(3)
    return torch.randn(4, 6, generator=g, dtype=torch.float64), spd(6, 4), spd(4, 5)


def removed_columns(units, block, rows=4):
    return {(i, u * block + j) for u in units for j in range(block) for i in range(rows)}


@pytest.mark.parametrize("block", [1, 2])
@pytest.mark.parametrize("with_g", [False, True])
def test_greedy_order_takes_the_cheapest_next_unit_and_scores_its_cumulative_loss(
    case, block, with_g
):
    """Each step's choice and score equal a brute-force search over direct constrained solves."""
    w, a, g = case
    g = g if with_g else torch.eye(4, dtype=torch.float64)
    order, score = greedy_order(w, a, block, g if with_g else None)
    done: list[int] = []
    for u in order:
        losses = {
            v: direct_minimiser(w, a, g, removed_columns([*done, v], block))[1].item()
            for v in range(6 // block)
            if v not in done
        }
        assert u == min(losses, key=losses.get)
        assert score[u].item() == pytest.approx(losses[u], rel=1e-9)
        done.append(u)
    assert torch.all(score[order].diff() >= 0)


def test_block_costs_equal_single_removals(case):
    w, a, g = case
    gw, a_inv = g @ w, torch.linalg.inv(a)
    for block in (1, 2, 3):
        costs = block_costs(w, gw, a_inv, block)
        for u in range(6 // block):
            _, loss = direct_minimiser(w, a, g, removed_columns([u], block))
            assert costs[u].item() == pytest.approx(loss.item(), rel=1e-9)


def test_several_units_per_step_keep_the_score_monotone(case):
    w, a, _ = case
    order, score = greedy_order(w, a, per_step=2)
    assert sorted(order) == list(range(6)) and torch.all(score[order].diff() >= 0)


@pytest.fixture(scope="module")
def llama_stats():
    model, s = tiny("llama")
    return model, s, collect_statistics(model, s, tokens(6, 12, seed=1), GREEDY_NEEDS)


@pytest.mark.parametrize("name", ["obs", "surgeon_greedy"])
def test_criteria_rank_units_in_greedy_order(llama_stats, name):
    model, s, stats = llama_stats
    scores = CRITERIA[name].score(ScoreContext(model, s, stats))
    assert scores["mlp"].shape == (s.num_layers, s.intermediate)
    assert scores["head"].shape == (s.num_layers, s.heads)
    assert scores["kv"].shape == (s.num_layers, s.kv_heads)
    assert torch.all(scores["layer"] >= scores["mlp"].max(1).values)
    # the first MLP channel the greedy removes is the one with the lowest single removal cost
    path = s.path(1, s.family.down)
    w = model.get_submodule(path).weight.detach().double()
    a = stats.cov(path).double()
    a = a + 0.01 * a.diagonal().mean() * torch.eye(a.shape[0], dtype=a.dtype)
    gw = w if name == "obs" else None
    if gw is None:
        g = stats.grad_cov(path).double()
        gw = (g + 0.01 * g.diagonal().mean() * torch.eye(g.shape[0], dtype=g.dtype)) @ w
    single = block_costs(w, gw, torch.linalg.inv(a), 1)
    assert int(scores["mlp"][1].argmin()) == int(single.argmin())


def test_obs_is_forward_only_and_refuses_hidden_channels(llama_stats):
    model, s, stats = llama_stats
    assert CRITERIA["obs"].needs == Needs(covariance=("o_proj", "down_proj"))
    with pytest.raises(PlanError, match="hidden"):
        CRITERIA["obs"].score(ScoreContext(model, s, stats, kinds=("mlp", "hidden")))


def test_one_shot_update_to_the_greedy_prefix_equals_the_greedy_weights(llama_stats):
    """The surgeon step's column update of the chosen prefix is where the greedy walk ends."""
    model, s, stats = llama_stats
    scores = CRITERIA["obs"].score(ScoreContext(model, s, stats))
    sel = allocate(Plan(criterion="obs", target=None, head_ratio=0.0, mlp_ratio=0.25), s, scores)
    path = s.path(1, s.family.down)
    w = model.get_submodule(path).weight.detach()
    a = stats.cov(path).double()
    a = a + 0.01 * a.diagonal().mean() * torch.eye(a.shape[0], dtype=a.dtype)
    pruned, final = surgeon_prune(model, s, sel, tokens(6, 12, seed=1), shots=1)
    assert final == sel and sel.mlp[1]
    expected = surgeon_update(w, a, None, cols=sel.mlp[1])
    kept = [c for c in range(s.intermediate) if c not in sel.mlp[1]]
    got = pruned.get_submodule(path).weight.double()
    torch.testing.assert_close(got, expected[:, kept], rtol=1e-4, atol=1e-6)
    assert isinstance(final, Selection)


def test_multi_shot_with_the_greedy_order_reaches_the_plan():
    model, s = tiny("llama")
    plan = Plan(criterion="obs", target=0.2, allocation="global", head_ratio=0.0)
    messages = []
    pruned, final = surgeon_prune(
        model,
        s,
        lambda scores: allocate(plan, s, scores),
        tokens(6, 12, seed=1),
        shots=2,
        criterion=CRITERIA["obs"],
        progress=lambda f, m: messages.append(m),
    )
    assert not final.heads and final.mlp
    removed = sum(len(v) for v in final.mlp.values()) * s.group_params("mlp")
    assert 0.2 * s.block_params <= removed < 0.2 * s.block_params + s.group_params("mlp")
    assert "shot 2/2" in messages[-1]
