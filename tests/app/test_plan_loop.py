"""The hand-tuning loop through the app's API: edits that stick, bad cells that keep the rest, the
stale mark, presets, and a compensated preview that the command line reproduces."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

pytest.register_assert_rewrite("tests.app.fixtures")

from components import preview as preview_panel  # noqa: E402
from components.state import SessionState  # noqa: E402
from explorer.cli import main  # noqa: E402
from explorer.planning.plan import Plan  # noqa: E402
from explorer.planning.presets import TITLES  # noqa: E402
from tests.app.fixtures import EVAL_WINDOWS  # noqa: E402
from tests.app.test_api import INFO, STATUS, edit_layer, load, plan_table  # noqa: E402

pytest_plugins = ["tests.app.fixtures"]


@pytest.fixture(scope="module")
def client(client_factory):
    c = client_factory()
    load(c)
    return c


@pytest.mark.real
@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_a_row_edit_sticks_under_each_allocation_and_the_counters_follow(client, allocation):
    table = plan_table(client.predict(api_name="/show_plan"))
    controls = (allocation, "wanda_sp", "sum", 0.2, "head", 1, 1, 1, True)
    shown = client.predict(*controls, table, api_name="/set_plan")
    assert shown[0] == allocation and shown[INFO]["error"] is None
    edited = edit_layer(client, shown, 10, 2, 0.5)
    assert edited[0] == "per_layer"
    assert edited[INFO]["kept"][10]["intermediate"] == 768
    assert edited[INFO]["sizes"]["params_after"] != shown[INFO]["sizes"]["params_after"]
    # The same edit arriving again with the radio's old value (a queued event) keeps it.
    stale = [allocation, *[edited[i] for i in range(1, 9)]]
    again = client.predict(*stale, plan_table(edited), api_name="/edit_table")
    assert again[0] == "per_layer" and again[INFO]["kept"][10]["intermediate"] == 768
    # Other rows kept what the allocation had given them.
    rows, before = plan_table(again)["data"], plan_table(shown)["data"]
    assert [r[2] for i, r in enumerate(rows) if i != 10] == [
        r[2] for i, r in enumerate(before) if i != 10
    ]


@pytest.mark.real
def test_a_bad_cell_is_refused_and_every_other_cell_keeps_its_value(client):
    table = plan_table(client.predict(api_name="/show_plan"))
    controls = ("global", "wanda_sp", "sum", 0.2, "head", 1, 1, 1, True)
    shown = client.predict(*controls, table, api_name="/set_plan")
    bad = plan_table(shown)
    bad["data"][5][2] = 1.5
    refused = client.predict(*[shown[i] for i in range(9)], bad, api_name="/edit_table")
    assert "out of range" in refused[STATUS]
    ratios = [(r[1], r[2]) for i, r in enumerate(plan_table(refused)["data"]) if i != 5]
    assert ratios == [(r[1], r[2]) for i, r in enumerate(plan_table(shown)["data"]) if i != 5]
    fixed = edit_layer(client, refused, 5, 2, 0.25)  # and fixing a cell then works
    assert fixed[INFO]["error"] is None and fixed[0] == "per_layer"


def test_a_result_for_another_plan_is_marked_stale_at_once():
    session = SessionState(plan=Plan())
    session.preview_plan = preview_panel.preview_key(session)
    panel = SimpleNamespace(auto="auto", status="status")
    values = {"state": session, "auto": False}
    request = SimpleNamespace(session_hash=None)
    updates = list(preview_panel.auto_preview(panel, "state", values, request))
    assert preview_panel.STALE not in str(updates)
    session.plan.target = 0.3
    first = next(preview_panel.auto_preview(panel, "state", values, request))
    assert preview_panel.STALE in first["status"]


@pytest.mark.real
def test_a_preset_previews_with_its_live_step_and_the_cli_agrees(client, tmp_path, capsys):
    shown = client.predict(TITLES["flap"], api_name="/choose_preset")
    plan = shown[INFO]["plan"]
    assert plan["criterion"] == "flap" and plan["recovery"] == [{"step": "flap_bias"}]
    job = client.submit(api_name="/preview")
    job.result()
    final = job.outputs()[-1]
    assert "Includes the live steps: flap_bias" in final[2]
    app_ppl = float(final[1])
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    capsys.readouterr()
    assert main(["prune", "--plan", str(path), "--eval-windows", str(EVAL_WINDOWS)]) == 0
    out = capsys.readouterr().out
    cli_ppl = float(out.split("live steps (flap_bias): perplexity ")[1].split()[0])
    assert abs(cli_ppl - app_ppl) <= 1e-3 * app_ppl  # one plan JSON, one number (2 decimals)
    recovered = float(out.split("after recovery")[1].split("perplexity ")[1].split()[0])
    assert abs(recovered - cli_ppl) <= 1e-3 * cli_ppl  # what Export writes
    # ... and on the second text domain, previewed with the same live step.
    app_off = float(final[4].split("→")[1])
    cli_off = float(out.split("off-domain (")[1].split("with the live steps ")[1].split(",")[0])
    assert abs(cli_off - app_off) <= 1e-3 * app_off
