"""Held-out calibration perplexity around every recovery step, and the warning of a harmful one."""

from __future__ import annotations

import math

import pytest
import torch

from explorer.apply.pruning import prune_model
from explorer.catalogue import RECOVERY_STEPS
from explorer.evaluate import perplexity
from explorer.export.report import pruning_report
from explorer.planning.plan import Plan
from explorer.planning.selection import Selection
from explorer.recovery.heldout import judged, recovery_warnings
from explorer.recovery.steps import RecoveryContext, run_steps
from tests.tiny import VOCAB, tiny


def counting(n: int, length: int, seed: int) -> torch.Tensor:
    """Windows that count upwards from a random token: text a tiny model can learn."""
    start = torch.randint(3, VOCAB, (n, 1), generator=torch.Generator().manual_seed(seed))
    return (start + torch.arange(length)) % (VOCAB - 3) + 3


@pytest.fixture(scope="module")
def pruned_setup():
    model, s = tiny("llama")
    sel = Selection.make(s, mlp={0: list(range(20)), 1: list(range(20))})
    return model, s, sel, counting(16, 16, seed=1), counting(4, 16, seed=2)


def recovered(setup, steps: list[dict]) -> list[dict]:
    model, s, sel, calib, held = setup
    pruned = prune_model(model, s, sel)
    reports = run_steps(
        steps, RecoveryContext(model, pruned, s, sel, calib, heldout=held), RECOVERY_STEPS
    )
    assert reports[-1]["heldout_after"] == pytest.approx(
        perplexity(pruned, held), rel=1e-9, nan_ok=True
    )
    return reports


def test_a_step_that_makes_the_model_worse_on_held_out_text_is_warned_about(pruned_setup):
    helpful, absurd = recovered(
        pruned_setup,
        [{"step": "lora", "steps": 30, "lr": 3e-3}, {"step": "lora", "steps": 5, "lr": 5.0}],
    )
    # Measured: 98.28 -> 86.02 for the sensible LoRA; the learning rate of 5 diverges.
    assert helpful["heldout_after"] < 0.95 * helpful["heldout_before"]
    assert "warning" not in helpful
    assert absurd["heldout_before"] == helpful["heldout_after"]  # one measurement between steps
    assert not absurd["heldout_after"] <= absurd["heldout_before"]
    assert absurd["warning"].startswith("Recovery step 'lora' made the model worse on held-out")
    assert recovery_warnings([helpful, absurd]) == [absurd["warning"]]


def test_a_neutral_step_is_not_warned_about_and_report_json_carries_the_check(pruned_setup):
    (neutral,) = recovered(pruned_setup, [{"step": "layerwise", "damping": 1e6}])
    assert neutral["heldout_after"] == pytest.approx(neutral["heldout_before"], rel=1e-4)
    assert "warning" not in neutral
    worse = {"step": "surgeon", **judged("surgeon", 50.0, 55.0)}
    assert "(+10.0%)" in worse["warning"]
    sizes = dict.fromkeys(["params_before", "params_after"], 1)
    report = pruning_report(Plan(), sizes, (4, 16), 34.0, 60.0, 55.0, [neutral, worse])
    assert report["recovery_heldout"] == [
        {
            "step": "layerwise",
            "before": neutral["heldout_before"],
            "after": neutral["heldout_after"],
        },
        {"step": "surgeon", "before": 50.0, "after": 55.0},
    ]
    assert report["recovery_warnings"] == [worse["warning"]]
    assert math.isnan(judged("x", 1.0, float("nan"))["heldout_after"])  # a diverged step is worse
    assert "warning" in judged("x", 1.0, float("nan"))


def test_the_session_holds_out_calibration_text_for_the_check(tiny_session):
    ex = tiny_session
    assert ex.heldout is not None and ex.heldout.shape[0] >= 1
    assert ex.heldout.shape[1] == ex.evaluation.shape[1]  # windows of the calibration text's tail
    sel = ex.select(Plan(criterion="l2", target=0.3))
    _, (report,) = ex.recover(sel, [{"step": "layerwise"}])
    assert {"heldout_before", "heldout_after"} <= set(report)
