"""Sensitivity sweep points are real previews, and the sensitivity allocation meets its target."""

from __future__ import annotations

import json

import pytest
import torch

from explorer.apply.masking import masked
from explorer.apply.preview import LivePreview
from explorer.apply.sensitivity import Sensitivity, mean_kl, single_layer_plan
from explorer.cli import main
from explorer.errors import PlanError
from explorer.model.loading import load_model
from explorer.planning.plan import Plan, allocate
from explorer.planning.selection import param_counts
from explorer.session import Explorer
from tests.conftest import CALIBRATION, EVALUATION


@pytest.fixture
def session(tiny_session):
    return tiny_session


@pytest.mark.parametrize("steps", [[], [{"step": "surgeon"}]])
def test_points_equal_the_same_single_layer_plan_previewed_from_scratch(session, steps):
    ex = session
    plan = Plan(
        criterion="wanda_sp",
        allocation="sensitivity",
        sensitivity_ratios=[0.25, 0.5, 0.75],
        sensitivity_windows=3,
        recovery=steps,
    )
    points = list(ex.iter_sensitivity(plan, kinds=["head", "kv", "mlp", "layer"]))
    s, windows = ex.structure, ex.heldout[:3]  # settings are measured off the evaluation text
    assert ex.known_sensitivity(plan, ["head", "kv", "mlp", "layer"]).text == "held-out calibration"
    assert {p.kind for p in points} == {"head", "kv", "mlp", "layer"}
    assert len(points) >= s.num_layers * 4
    scores = ex.scores("wanda_sp")
    comp = ex.compensation(steps)
    with torch.no_grad():
        dense = ex.model(windows).logits
    for p in points:
        sel = allocate(single_layer_plan(plan, s, p.layer, p.kind, p.ratio), s, scores)
        fresh = LivePreview(ex.model, s, windows, batch_size=3).perplexity(sel, comp)
        assert abs(fresh - p.perplexity) / fresh < 1e-5, p
        with torch.no_grad(), masked(ex.model, s, sel), comp.applied(sel) if comp else _null():
            logits = ex.model(windows).logits
        assert abs(mean_kl(dense, logits) - p.kl) <= 1e-5 * max(1.0, p.kl), p
        assert p.kl >= 0
    # measured once: asking again replays the cache
    again = list(ex.iter_sensitivity(plan, kinds=["head", "kv", "mlp", "layer"]))
    assert again == points


def _null():
    from contextlib import nullcontext

    return nullcontext()


@pytest.mark.parametrize("target", [0.1, 0.25])
@pytest.mark.parametrize("head_ratio", [None, 0.0])
def test_sensitivity_allocation_meets_its_target_exactly(session, target, head_ratio):
    ex = session
    s = ex.structure
    plan = Plan(
        criterion="l2",
        allocation="sensitivity",
        target=target,
        head_ratio=head_ratio,
        sensitivity_ratios=[0.2, 0.4, 0.6, 0.8],
    )
    sel = ex.select(plan)
    removed = s.block_params - param_counts(s, sel)["blocks"]
    budget = target * s.block_params
    # as the global allocation: enough, and one MLP channel fewer would miss
    assert budget <= removed < budget + s.group_params("mlp")
    if head_ratio == 0:
        assert not sel.heads
    # the cheapest measured layer gives up more than the dearest one
    sens = ex.sensitivity(plan)
    at = {p.layer: p.kl for p in sens.points if p.kind == "mlp" and p.ratio == 0.4}
    cheap, dear = min(at, key=at.get), max(at, key=at.get)
    assert len(sel.mlp.get(cheap, ())) >= len(sel.mlp.get(dear, ()))


def test_sensitivity_plan_needs_a_sweep_and_round_trips(session):
    s = session.structure
    plan = Plan(criterion="l2", allocation="sensitivity", target=0.2)
    with pytest.raises(PlanError, match="sensitivity sweep"):
        allocate(plan, s, session.scores("l2"))
    assert Plan.from_json(plan.to_json()) == plan
    old = json.loads(plan.to_json())
    for key in ("sensitivity_ratios", "sensitivity_windows", "sensitivity_metric"):
        old.pop(key)
    old["allocation"] = "uniform"
    assert Plan.from_dict(old).sensitivity_metric == "kl"  # plans saved before still load


def test_cli_sensitivity_writes_json_and_csv(tiny_llama_dir, texts, tmp_path, capsys):
    calib, evaluation = texts
    out = tmp_path / "sens.json"
    data = ["--model", str(tiny_llama_dir), "--criterion", "l2", "--eval-length", "16"]
    data += ["--calibration", str(calib), "--evaluation", str(evaluation)]
    data += ["--calibration-length", "16"]
    sweep_args = ["--kinds", "head,mlp", "--ratios", "0.25,0.5", "--windows", "2"]
    sweep_args += ["--out", str(out), "--csv", str(tmp_path / "sens.csv")]
    code = main(["sensitivity", *data, *sweep_args])
    assert code == 0, capsys.readouterr().err[-300:]
    sens = Sensitivity.from_dict(json.loads(out.read_text()))
    assert {p.kind for p in sens.points} == {"head", "mlp"} and sens.windows[0] == 2
    rows = (tmp_path / "sens.csv").read_text().splitlines()
    assert rows[0].startswith("layer,kind,ratio") and len(rows) == len(sens.points) + 1
    # the prune command replays it: a sensitivity plan from the saved sweep
    replay = ["--allocation", "sensitivity", "--sensitivity", str(out), "--target", "0.2"]
    code = main(["prune", *data, *replay])
    assert code == 0, capsys.readouterr().err[-300:]


def test_every_scoring_phase_reports_progress(tiny_llama_dir):
    ws = load_model(str(tiny_llama_dir), device="cpu")
    ex = Explorer.from_texts(
        ws,
        CALIBRATION,
        EVALUATION,
        calibration_windows=4,
        calibration_length=16,
        evaluation_length=16,
    )
    for criterion, phase in (("surgeon_greedy", "greedy walk"), ("surgeon", "factor inverses")):
        messages: list[str] = []
        ex.scores(criterion, progress=lambda f, m, seen=messages: seen.append(m))
        assert any("calibration window" in m for m in messages), criterion
        assert any(phase in m for m in messages), (criterion, messages[-3:])
