"""The session: windows from texts or a recipe, hidden-channel plans, and the real SmolLM2."""

import math

import pytest

from explorer.catalogue import CRITERIA
from explorer.errors import DataError, PlanError
from explorer.planning.plan import Plan
from explorer.planning.selection import Selection
from explorer.session import Explorer
from tests.conftest import CALIBRATION, EVALUATION


def test_calibration_must_differ_from_evaluation(tiny_llama_dir):
    from explorer.model.loading import load_model

    ws = load_model(str(tiny_llama_dir))
    with pytest.raises(DataError):
        Explorer.from_texts(ws, EVALUATION, EVALUATION, calibration_length=8)


def test_open_cuts_the_recipes_windows_from_its_texts(tiny_llama_dir, texts):
    """``Explorer.open(plan)`` is ``from_texts`` on the plan's model, texts and window settings."""
    from explorer.model.loading import load_model

    calib, evaluation = texts
    plan = Plan(
        model=str(tiny_llama_dir),
        calibration={"kind": "file", "path": str(calib)},
        evaluation={"kind": "file", "path": str(evaluation)},
        calibration_windows=3,
        calibration_length=8,
        seed=5,
    )
    seen = []
    ex = Explorer.open(plan, evaluation_length=16, progress=lambda f, m: seen.append((f, m)))
    want = Explorer.from_texts(
        load_model(str(tiny_llama_dir)),
        CALIBRATION,
        EVALUATION,
        calibration_windows=3,
        calibration_length=8,
        evaluation_length=16,
        seed=5,
    )
    assert ex.calibration.equal(want.calibration) and ex.evaluation.equal(want.evaluation)
    assert ex.seed == 5 and ex.calibration.shape == (3, 8)
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[0] >= 0.0 and fractions[-1] <= 1.0


def test_plans_cutting_hidden_channels_select_with_every_criterion(tiny_llama_dir):
    """Hidden-channel scores are computed when a plan asks for them (and only then)."""
    from explorer.model.loading import load_model

    ex = Explorer.from_texts(
        load_model(str(tiny_llama_dir)),
        CALIBRATION,
        EVALUATION,
        calibration_length=16,
        evaluation_length=16,
    )
    s = ex.structure
    for criterion in CRITERIA.names():
        plan = Plan(criterion=criterion, target=None, head_ratio=0.0, mlp_ratio=0.0)
        assert not ex.select(plan).hidden
        plan.hidden_ratio = 0.25
        if criterion in ("flap", "obs", "surgeon_greedy"):  # defined on module inputs only
            with pytest.raises(PlanError, match="hidden"):
                ex.select(plan)
            continue
        sel = ex.select(plan)
        assert len(sel.hidden) == s.hidden // 4 and (s.hidden - len(sel.hidden)) % s.heads == 0
        assert "hidden" in ex.scores(criterion, hidden=True)
        assert math.isfinite(ex.perplexity(sel)), criterion


@pytest.mark.real
def test_real_smollm2_pipeline(smollm2):
    """SmolLM2: dense perplexity, a 20% plan, masks equal slicing on the real weights."""
    ex = smollm2
    dense = ex.dense_perplexity()
    sel = ex.select(Plan(criterion="taylor_e1", target=0.2, protect_first=3, protect_last=2))
    sizes = ex.sizes(sel)
    assert sizes["block_params_before"] == 106_202_880
    assert 0.195 < 1 - sizes["block_params_after"] / sizes["block_params_before"] < 0.205
    pruned = ex.perplexity(sel)
    assert math.isfinite(pruned) and pruned > dense
    # Switching back to the dense view and again to the plan gives the same numbers.
    assert ex.perplexity(Selection()) == pytest.approx(dense, rel=1e-6)
    assert ex.perplexity(sel) == pytest.approx(pruned, rel=1e-5)
