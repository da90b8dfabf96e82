"""The Recover and Export handlers say so when a recovery step made the model worse on the
held-out calibration windows (a tiny model, no server: the handlers are called directly)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from components import export, recovery, state
from explorer.planning.plan import Plan
from explorer.policy import AccessPolicy


@pytest.fixture
def harmed_session(tiny_session, harmful_step, tmp_path):
    """A session on the tiny model whose plan ends with the harmful ``scramble`` step."""
    key = "tiny-held-out-warning"
    state.SHARED._entries[key] = state.Loaded(key, tiny_session, summary={})
    plan = Plan(
        criterion="l2",
        target=0.3,
        recovery=[{"step": "layerwise", "damping": 1e6}, {"step": harmful_step}],
    )
    session = state.SessionState(
        model_key=key, plan=plan, policy=AccessPolicy.make(export_root=tmp_path / "exports")
    )
    try:
        yield session
    finally:
        state.SHARED._entries.pop(key, None)


def recover_panel() -> SimpleNamespace:
    names = ["status", "dense", "pruned", "recovered", "reports", "losses"]
    params = [f"{f.step}.{f.name}" for f in recovery.fields()]
    return SimpleNamespace(steps="steps", params=params, **{n: n for n in names})


def test_the_recover_tab_warns_about_a_step_that_hurt_held_out_text(harmed_session, harmful_step):
    panel = recover_panel()
    values = {"state": harmed_session, "steps": ["layerwise", harmful_step]}
    values |= {p: f.default for p, f in zip(panel.params, recovery.fields(), strict=True)}
    values["layerwise.damping"] = 1e6  # the form's value wins: a refit that keeps the weights
    request = SimpleNamespace(session_hash=None)
    final = list(recovery.run_recovery(panel, "state", values, request))[-1]
    assert 'class="pe-status pe-warn"' in final["status"]
    assert f"Recovery step &#x27;{harmful_step}&#x27; made the model worse" in final["status"]
    assert "layerwise" not in final["status"].split("Recovery step")[1]  # the neutral one is not
    scrambled = final["reports"][-1]
    assert scrambled["heldout_after"] > scrambled["heldout_before"]


def test_the_export_tab_shows_the_warning_before_writing_and_report_json_keeps_it(
    harmed_session, harmful_step
):
    panel = SimpleNamespace(
        folder="folder", overwrite="overwrite", format="format", gguf_type="gguf_type",
        checks="checks", report="report", files="files",
    )  # fmt: skip
    values = {"state": harmed_session, "folder": "out", "overwrite": False}
    values |= {"format": "transformers", "gguf_type": "f16"}
    updates = list(export.run_export(panel, "state", values, SimpleNamespace(session_hash=None)))
    first = next(i for i, u in enumerate(updates) if "pe-warn" in u["checks"])
    saved = next(
        i for i, u in enumerate(updates) if "Saving" in u["checks"] or "Writing" in u["checks"]
    )
    assert first < saved  # the user is told before the folder is written
    final = updates[-1]
    assert "pe-warn" in final["checks"] and f"&#x27;{harmful_step}&#x27;" in final["checks"]
    (warning,) = final["report"]["recovery_warnings"]
    assert warning.startswith(f"Recovery step '{harmful_step}' made the model worse")
    assert (harmed_session.policy.export_root / "out" / "config.json").is_file()  # it still exports
