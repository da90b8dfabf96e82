"""The app in Debian's chromium: what a person does, on the real SmolLM2, with screenshots.

Each test opens a fresh page (its own Gradio session) on one shared server; the page opens on the
default model. Screenshots of every panel go to assets/screenshots/ for the README.
"""

from __future__ import annotations

import json
import math

import pytest

pytest.register_assert_rewrite("tests.app.fixtures")

from explorer.catalogue import RECOVERY_STEPS  # noqa: E402
from tests.app.fixtures import (  # noqa: E402
    EVAL_WINDOWS,
    SLOW,
    close_toasts,
    number,
    open_tab,
    run_preview,
    screenshot,
    set_cell,
    toast,
    wait_plan,
)

pytest_plugins = ["tests.app.fixtures"]
pytestmark = [pytest.mark.browser, pytest.mark.real, pytest.mark.usefixtures("nothing_phones_home")]


def plotly_point(page, plot_id: str, customdata: str) -> tuple[float, float]:
    """Screen position of the marker whose customdata is ``customdata`` (in the last trace)."""
    page.wait_for_selector(f"#{plot_id} .js-plotly-plot .points path", timeout=SLOW)
    return page.evaluate(
        """([plotId, key]) => {
            const plot = document.querySelector(`#${plotId} .js-plotly-plot`);
            const trace = plot.data.length - 1;
            const index = plot.data[trace].customdata.indexOf(key);
            const traces = plot.querySelectorAll('.scatterlayer .trace');
            const box = traces[trace].querySelectorAll('.points path')[index].getBoundingClientRect();
            return [box.x + box.width / 2, box.y + box.height / 2];
        }""",
        [plot_id, customdata],
    )


def test_opens_on_the_default_model_with_its_summary(page):
    card = page.inner_text("#model-summary")
    assert "llama" in card
    assert "Layers\t30" in card
    assert "Query heads\t9" in card and "Key-value heads\t3" in card
    assert "134,515,008" in card  # SmolLM2-135M's parameter count
    assert f"{EVAL_WINDOWS} windows × 256 tokens" in card
    screenshot(page, "model")


def test_dependency_graph_renders_and_a_click_lists_the_coupled_slices(page):
    open_tab(page, "Structure")
    page.wait_for_selector("#structure-graph .js-plotly-plot .points path", timeout=SLOW)
    markers = page.locator("#structure-graph .scatterlayer .trace").last.locator(".points path")
    # Two expanded layers of 9 modules, 28 collapsed layers, embed/residual/final norm/lm_head.
    assert markers.count() == 2 * 9 + 28 + 4
    page.mouse.click(*plotly_point(page, "structure-graph", "L0.k_proj"))
    details = page.wait_for_selector("#structure-details:has-text('Key-value group')", timeout=SLOW)
    text = details.inner_text()
    assert "294,912 parameters each" in text  # 3 q heads + k + v rows, and o columns: 64-wide
    assert "model.layers.0.self_attn.v_proj" in text
    assert page.input_value("#structure-node input") == "L0.k_proj"
    screenshot(page, "structure")
    # Expand a collapsed layer: its node turns into its nine modules.
    page.mouse.click(*plotly_point(page, "structure-graph", "L5"))
    page.wait_for_selector("#structure-details:has-text('Layer 5 (collapsed)')", timeout=SLOW)
    page.click("#structure-toggle")
    page.wait_for_function(
        """() => {
            const plot = document.querySelector('#structure-graph .js-plotly-plot');
            return plot && plot.data[plot.data.length - 1].customdata.includes('L5.q_proj');
        }""",
        timeout=SLOW,
    )
    assert markers.count() == 3 * 9 + 27 + 4


def test_head_similarity_graph_follows_the_threshold(page):
    open_tab(page, "Heads")
    page.wait_for_selector("#head-graph .js-plotly-plot .points path", timeout=SLOW)
    page.wait_for_selector("#heads-summary:has-text('τ = 0.20')", timeout=SLOW)
    assert page.locator("#head-graph .points path").count() == 9  # SmolLM2's query heads
    page.wait_for_selector("#head-heatmap .js-plotly-plot", timeout=SLOW)
    threshold = page.locator("#heads-threshold input[type=number]")
    threshold.fill("0.1")
    threshold.press("Enter")
    threshold.blur()
    page.wait_for_selector("#heads-summary:has-text('τ = 0.10')", timeout=SLOW)
    screenshot(page, "heads")


def test_importance_heatmap_and_agreement(page):
    open_tab(page, "Importance")
    page.wait_for_selector("#imp-heatmap .js-plotly-plot", timeout=SLOW)
    page.wait_for_selector("#imp-agreement .js-plotly-plot", timeout=SLOW)
    # One row per layer (the grid counts its header row too).
    page.wait_for_selector('#imp-agreement-table [role=grid][aria-rowcount="31"]', timeout=SLOW)
    screenshot(page, "importance")


def test_changing_one_layers_ratio_changes_the_pruned_perplexity_live(page):
    dense, before = run_preview(page)
    assert dense > 1 and before > dense
    page.check("#preview-auto input")  # preview again after every plan change
    open_tab(page, "Plan")
    wait_plan(page, "valid")
    set_cell(page, 3, 2, "0.9")  # layer 3: remove 90% of its MLP channels
    page.wait_for_selector(
        '#plan-table [data-testid="cell-3-5"]:has-text("154/1536")', timeout=SLOW
    )
    assert page.locator("#plan-allocation input:checked").get_attribute("value") == "per_layer"
    wait_plan(page, "valid")
    with page.expect_download() as download:
        page.click("#plan-save")
    saved = json.loads(download.value.path().read_text())
    assert saved["allocation"] == "per_layer" and saved["mlp_ratios"][3] == 0.9
    screenshot(page, "plan")
    open_tab(page, "Preview")
    page.wait_for_function(
        """(before) => {
            const status = document.querySelector('#preview-status').innerText;
            const pruned = Number(document.querySelector('#preview-pruned textarea').value);
            return status.includes('Done') && pruned !== before;
        }""",
        arg=before,
        timeout=SLOW,
    )
    assert number(page, "preview-dense") == dense
    assert number(page, "preview-pruned") != before
    screenshot(page, "preview")


def test_generations_show_side_by_side(page):
    open_tab(page, "Preview")
    page.fill("#gen-prompt textarea", "Name a large city in France.")
    page.fill("#gen-tokens input[type=number]", "16")
    page.click("#gen-run")
    page.wait_for_selector("#gen-status:has-text('Mean log-probability drop')", timeout=SLOW)
    assert page.inner_text("#gen-dense").strip()
    assert page.inner_text("#gen-pruned").strip()
    screenshot(page, "generation")


def choose_recovery_step(page, name: str) -> None:
    """On the Recover tab, choose step ``name`` in the list and wait until the plan has it."""
    open_tab(page, "Recover")
    page.click("#recover-steps input")
    page.get_by_role("option", name=RECOVERY_STEPS[name].title).click()
    page.keyboard.press("Escape")
    page.wait_for_selector("#recover-status:has-text('Saved in the plan')", timeout=SLOW)


def test_layerwise_recovery_shows_the_recovered_perplexity_and_joins_the_plan(page):
    choose_recovery_step(page, "layerwise")
    # The form's parameter groups follow the choice (their update may land after the status).
    page.wait_for_selector("#recover-layerwise-damping", state="visible", timeout=SLOW)
    page.wait_for_selector("#recover-lora-steps", state="hidden", timeout=SLOW)
    page.click("#recover-run")
    page.wait_for_function(
        """() => {
            const status = document.querySelector('#recover-status');
            const recovered = document.querySelector('#recover-recovered textarea');
            return status && status.innerText.includes('Done') && recovered.value !== '';
        }""",
        timeout=SLOW,
    )
    dense, pruned = number(page, "recover-dense"), number(page, "recover-pruned")
    assert 1 < dense < pruned and math.isfinite(number(page, "recover-recovered"))
    assert "mean_error_after" in page.inner_text("#recover-reports")
    screenshot(page, "recover")
    open_tab(page, "Plan")
    with page.expect_download() as download:
        page.click("#plan-save")
    assert json.loads(download.value.path().read_text())["recovery"][0]["step"] == "layerwise"


def test_export_shows_checks_and_report(page, tmp_path):
    target = tmp_path / "pruned"
    open_tab(page, "Export")
    page.fill("#export-folder textarea", str(target))
    page.click("#export-run")
    page.wait_for_selector("#export-checks:has-text('Verified')", timeout=SLOW)
    checks = page.inner_text("#export-checks")
    for step in ("Saving weights", "Reloading the folder", "Comparing logits"):
        assert step in checks
    page.wait_for_selector("#export-report:has-text('perplexity_after')", timeout=SLOW)
    assert page.locator("#export-files a").count() >= 2
    report = json.loads((target / "report.json").read_text())
    assert report["perplexity_after"] > report["perplexity_before"] > 1
    assert (target / "config.json").is_file() and (target / "plan.json").is_file()
    screenshot(page, "export")


def test_bad_input_shows_errors_and_the_app_keeps_working(page, tmp_path):
    # An unknown model id: the error shows, the loaded model stays.
    source = page.locator("#model-source input")
    source.fill("nope/not-a-model")
    source.press("Enter")
    page.click("#model-load")
    toast(page, "Could not fetch 'nope/not-a-model'")
    assert "Loaded smollm2-135m" in page.inner_text("#model-status")
    close_toasts(page)

    # A malformed plan file: refused, the plan stays.
    bad = tmp_path / "plan.json"
    bad.write_text("{not json")
    open_tab(page, "Plan")
    wait_plan(page, "valid")
    page.set_input_files('input[data-testid="Load plan JSON-upload-button"]', str(bad))
    toast(page, "not valid JSON")
    close_toasts(page)

    # A plan that empties a layer: a readable error, the typed plan kept, no counters.
    set_cell(page, 2, 1, "1")
    wait_plan(page, "removes every attention head of layer 2")
    assert "No valid plan" in page.inner_text("#plan-counters")
    screenshot(page, "errors")
    set_cell(page, 2, 1, "0")
    wait_plan(page, "valid")
    assert "Parameters" in page.inner_text("#plan-counters")

    # A non-empty export folder: refused, nothing written.
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    open_tab(page, "Export")
    page.fill("#export-folder textarea", str(full))
    page.click("#export-run")
    toast(page, "is not empty")
    assert sorted(p.name for p in full.iterdir()) == ["keep.txt"]

    # Still working: the plan is intact and the graph still answers.
    open_tab(page, "Structure")
    page.mouse.click(*plotly_point(page, "structure-graph", "L0.gate_proj"))
    page.wait_for_selector("#structure-details:has-text('MLP channel')", timeout=SLOW)


def test_a_distillation_text_file_is_uploaded_into_the_plan(page, tmp_path):
    speeches = tmp_path / "speeches.txt"
    speeches.write_text("The Congress assembles this year to hear the address. " * 100)
    choose_recovery_step(page, "distill")
    page.wait_for_selector("#recover-distill-text_file", state="visible", timeout=SLOW)
    assert "No text file" in page.inner_text("#recover-distill-text_file-note")
    page.set_input_files("#recover-distill-text_file input[type=file]", str(speeches))
    page.wait_for_selector("#recover-status:has-text('speeches.txt saved')", timeout=SLOW)
    assert "speeches.txt" in page.inner_text("#recover-distill-text_file-note")
    open_tab(page, "Plan")
    with page.expect_download() as download:
        page.click("#plan-save")
    (entry,) = json.loads(download.value.path().read_text())["recovery"]
    assert entry["step"] == "distill" and entry["text_file"].endswith("speeches.txt")
