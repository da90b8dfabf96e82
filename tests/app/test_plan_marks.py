"""The plan on the Structure and Heads pictures: removed units, the kept-share strip, the colours."""

from __future__ import annotations

import pytest
import torch

from components import heads, structure
from components.plan_marks import (
    current_marks,
    importance_shades,
    kept_shares,
    plan_marks,
    removed_units,
    unit_kept_shares,
)
from components.state import Loaded
from explorer.catalogue import CRITERIA
from explorer.planning.plan import Plan, allocate
from explorer.scoring.base import ScoreContext
from tests.tiny import tiny

# Layer 0 loses a quarter of its MLP channels, layer 1 a third of its heads and half its
# channels, layer 2 goes whole.
PLAN = Plan(
    criterion="l2",
    allocation="per_layer",
    target=None,
    head_ratios=[0.0, 1 / 3, 0.0],
    mlp_ratios=[0.25, 0.5, 0.0],
    remove_layers=[2],
)


@pytest.fixture(scope="module")
def planned():
    """The tiny Llama (3 layers, 6 heads in 2 kv groups, 40 MLP channels), PLAN's selection."""
    model, s = tiny("llama")
    scores = CRITERIA["l2"].score(ScoreContext(model, s, None))
    selection = allocate(PLAN, s, scores)
    return s, selection, scores, plan_marks(s, selection, scores, "l2")


def test_removed_units_are_the_selections_and_the_strip_is_one_minus_removed_over_total(planned):
    s, sel, _, marks = planned
    assert removed_units(s, sel, "mlp") == {0: sel.mlp[0], 1: sel.mlp[1], 2: tuple(range(40))}
    assert removed_units(s, sel, "head") == {1: sel.heads[1], 2: tuple(range(6))}
    assert len(sel.mlp[0]) == 10 and len(sel.mlp[1]) == 20 and len(sel.heads[1]) == 2
    # 12,000 parameters a layer: a channel owns 3 × 48, a query head 2 × 8 × 48.
    total = s.group_params("layer")
    assert (total, s.group_params("mlp"), s.group_params("head")) == (12000, 144, 768)
    removed = [10 * 144, 2 * 768 + 20 * 144, total]
    assert kept_shares(s, sel) == pytest.approx([1 - r / total for r in removed])
    assert kept_shares(s, sel) == pytest.approx([0.88, 0.632, 0.0])
    assert unit_kept_shares(s, sel, "head") == pytest.approx([1.0, 4 / 6, 0.0])
    assert unit_kept_shares(s, sel, "mlp") == pytest.approx([0.75, 0.5, 0.0])
    assert marks.kept == kept_shares(s, sel) and marks.removed["head"][1] == sel.heads[1]


def test_importance_shades_are_ranks_with_ties_shared():
    shades = importance_shades(torch.tensor([[3.0, 1.0], [2.0, 2.0]]))
    assert shades.tolist() == [[1.0, 0.0], [0.5, 0.5]]


def test_the_plan_picks_the_lowest_scored_units_and_they_get_the_darkest_shades(planned):
    s, sel, scores, marks = planned
    ranks = marks.shades["mlp"][0]
    gone = list(sel.mlp[0])
    kept = [c for c in range(40) if c not in gone]
    assert ranks[gone].max() < ranks[kept].min()  # l2 removes layer 0's lowest-scored channels
    assert torch.equal(marks.scores["mlp"], scores["mlp"].float())


def test_the_dependency_graph_marks_exactly_the_removed_units_and_draws_the_strip(planned):
    s, sel, _, marks = planned
    fig = structure.dependency_figure(s, {0, 1}, marks=marks)
    traces = {t.name: t for t in fig.data}
    removed = set(traces["removed by the plan"].ids)
    want = {f"mlp:{i}:{c}" for i in (0, 1) for c in sel.mlp[i]}
    want |= {f"head:1:{h}" for h in sel.heads[1]}
    assert removed == want
    kept = set(traces["kept unit (colour: importance rank, dark = low)"].ids)
    assert len(kept) == 2 * (6 + 40) - len(want) and not kept & removed
    strip = traces["share of the layer kept"]
    assert list(strip.marker.color) == pytest.approx(marks.kept)
    assert list(strip.text) == ["88%", "63%", "0%"]
    nodes = fig.data[-1]  # still the last trace: clicks read its customdata
    symbols = dict(zip(nodes.customdata, nodes.marker.symbol, strict=True))
    assert symbols["L2"] == "x" and symbols["L0.q_proj"] == "circle"
    plain = structure.dependency_figure(s, {0, 1})
    assert "share of the layer kept" not in {t.name for t in plain.data}


def test_the_head_pictures_cross_the_removed_heads_and_show_the_kept_strip(planned):
    s, sel, scores, marks = planned
    jsd = torch.rand(6, 6)
    graph = heads.similarity_figure(jsd, scores["head"][1], s.group_size, 0.2, 1, marks)
    symbols = graph.data[-1].marker.symbol
    assert [h for h, sym in enumerate(symbols) if sym == "x"] == list(sel.heads[1])
    heatmap = heads.importance_heatmap(scores["head"], "l2", 1, marks)
    crosses = next(t for t in heatmap.data if t.name == "removed by the plan")
    removed = [(1, h) for h in sel.heads[1]] + [(2, h) for h in range(6)]
    assert set(crosses.ids) == {f"head:{i}:{h}" for i, h in removed}
    strip = next(t for t in heatmap.data if t.name == "share kept")
    assert [v for row in strip.z for v in row] == pytest.approx([1, 0.75, 4 / 6, 0.5, 0, 0])


def test_a_redraw_waits_for_the_plan_tab_but_a_plan_change_draws_it(tiny_session):
    loaded = Loaded("tiny-marks", tiny_session, summary={})
    plan = Plan(criterion="l2", target=0.3)
    assert isinstance(current_marks(loaded, plan, wait=False), str)  # no scores yet: not drawn
    marks = current_marks(loaded, plan, wait=True)
    assert marks.kept == kept_shares(tiny_session.structure, tiny_session.select(plan))
    again = current_marks(loaded, plan, wait=False)  # now a redraw draws it too
    assert again.kept == marks.kept and again.removed == marks.removed
    bad = current_marks(loaded, Plan(criterion="l2", protect_first=5), wait=True)
    assert bad.startswith("The plan is not drawn: ")
