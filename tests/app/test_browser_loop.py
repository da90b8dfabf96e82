"""The hand-tuning loop in Debian's chromium, on a tiny random model: the sensitivity sweep, the
``sensitivity`` allocation, row edits that stick under every allocation, a bad cell that leaves
the others alone, the stale mark, the compensated preview, the calibration amount on the Model
tab, and a first preview that equals the library's number for the opening recipe.

One app serves the module: a 4-layer Llama (byte-level BPE, so the built-in text is real tokens)
opened on the app's own default recipe (the ``best`` preset) with 8 calibration windows and 2
evaluation windows. Every number asserted is read from the page.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import replace
from types import SimpleNamespace

import pytest

pytest.register_assert_rewrite("tests.app.fixtures")

from playwright.sync_api import TimeoutError as PlaywrightTimeout  # noqa: E402

from components import state  # noqa: E402
from components.preview import STALE  # noqa: E402
from explorer.planning.presets import DEFAULT, TITLES, load_preset  # noqa: E402
from explorer.policy import AccessPolicy  # noqa: E402
from explorer.session import Explorer  # noqa: E402
from tests.app.fixtures import (  # noqa: E402
    SLOW,
    number,
    open_page,
    open_tab,
    run_preview,
    served,
    set_cell,
    wait_plan,
)
from tests.tiny import tiny_model  # noqa: E402

pytest_plugins = ["tests.app.fixtures"]
pytestmark = [
    pytest.mark.browser,
    pytest.mark.usefixtures("nothing_phones_home"),
]

CALIBRATION_WINDOWS, EVAL_WINDOWS = 8, 2
WIDTH = 128  # MLP channels per layer of the tiny model
LAYERS = 4

# Installed before an action: records that some output went pending (Gradio marks the targets
# of ``show_progress_on`` with the class), so ``quiet`` can wait for the action's events to end.
WATCH = """() => {
    window.__busy = false;
    if (window.__watch) return;
    const busy = (text) => /\\b(pending|generating)\\b/.test(text || '');
    window.__watch = new MutationObserver((records) => {
        for (const r of records) {
            if (busy(r.oldValue) || busy(r.target.getAttribute && r.target.getAttribute('class')))
                window.__busy = true;
        }
    });
    window.__watch.observe(document.body, {
        attributes: true, attributeFilter: ['class'], attributeOldValue: true, subtree: true,
    });
}"""
QUIET = "() => window.__busy && !document.querySelector('.pending, .generating')"


@pytest.fixture(scope="module")
def loop_app(bpe_tokenizer, tmp_path_factory, outbound):
    """The app on a tiny 4-layer Llama folder, opening on the default recipe."""
    import app

    root = tmp_path_factory.mktemp("loop-app")
    folder = root / "tiny-llama"
    model = tiny_model(
        "llama",
        hidden_size=64,
        intermediate_size=WIDTH,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=len(bpe_tokenizer),
        tie_word_embeddings=False,
    )
    model.save_pretrained(folder)
    bpe_tokenizer.save_pretrained(folder)
    policy = AccessPolicy.make(allow_paths=[root], export_root=root / "exports")
    demo = app.build_app(
        default_model=str(folder),
        default_plan=opening(),
        calibration_windows=CALIBRATION_WINDOWS,
        eval_windows=EVAL_WINDOWS,
        policy=policy,
    )
    with served(demo) as url:
        yield SimpleNamespace(url=url, model=str(folder))


@pytest.fixture
def loop_page(browser_context, loop_app, page_requests):
    """A fresh page (its own session) once the opening calibration is done."""
    page = open_page(browser_context, loop_app.url, page_requests, loop_app.model)
    page.wait_for_selector("#model-status:has-text('scores are ready')", timeout=SLOW)
    open_tab(page, "Plan")
    wait_plan(page, "valid")
    try:
        yield page
    finally:
        page.close()


def quietly(page, action) -> None:
    """Do ``action`` and wait until every event it started (and their follow-ups) ended."""
    page.evaluate(WATCH)
    action()
    page.wait_for_function(QUIET, timeout=SLOW)


def until(condition, seconds: float = 60) -> None:
    """Wait for a condition on the server's side (the app runs in this process)."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the server did not get there"
        time.sleep(0.05)


def cell(page, row: int, col: int) -> str:
    return page.inner_text(f'#plan-table [data-testid="cell-{row}-{col}"]').strip()


def table(page) -> list[list[str]]:
    return [[cell(page, row, col) for col in range(7)] for row in range(LAYERS)]


def allocation(page) -> str:
    return page.locator("#plan-allocation input:checked").get_attribute("value")


def removed_channels(page) -> int:
    """The MLP channels the counters say the plan removes."""
    text = page.inner_text("#plan-counters")
    return int(re.search(r"([\d,]+) of [\d,]+ MLP channels", text).group(1).replace(",", ""))


def kept_channels(page, row: int) -> int:
    return int(cell(page, row, 5).split("/")[0])


def choose_allocation(page, name: str) -> None:
    if allocation(page) != name:  # choosing the chosen one sends nothing
        quietly(page, lambda: page.check(f"#plan-allocation input[value={name}]"))
    assert allocation(page) == name


def auto_preview(page, on: bool) -> None:
    open_tab(page, "Preview")
    box = page.locator("#preview-auto input")
    box.set_checked(on)
    open_tab(page, "Plan")


def opening():
    """The default recipe on the 4-layer model: its per-layer MLP ratios are SmolLM2's 30, so the
    tiny app opens on the same recipe allocated globally (criterion, update, protection kept).
    Its grid ends at 0.9, not the recipe's 0.6: with two of the four layers protected, MLP cuts
    of at most 60% in the other two cannot remove 20% of the block parameters."""
    recipe = load_preset(DEFAULT)
    return replace(
        recipe, allocation="global", mlp_ratios=None, sensitivity_ratios=[0.1, 0.3, 0.5, 0.7, 0.9]
    )


@pytest.fixture(scope="module")
def library(loop_app):
    """The opening recipe through the library alone: (session, plan), as the CLI opens it."""
    recipe = opening()
    recipe.model, recipe.calibration_windows = loop_app.model, CALIBRATION_WINDOWS
    return Explorer.open(recipe, evaluation_windows=EVAL_WINDOWS), recipe


def library_perplexity(library, **changes) -> float:
    ex, recipe = library
    plan = replace(recipe, **changes)
    return ex.perplexity(ex.select(plan), steps=plan.recovery)


def close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-4 * b


def test_the_first_preview_is_the_default_recipes_number(loop_page, library):
    open_tab(loop_page, "Preview")
    assert loop_page.locator("#preview-auto input").is_checked()  # re-preview on every change
    dense, pruned = run_preview(loop_page)
    assert "Includes the live steps: surgeon" in loop_page.inner_text("#preview-status")
    assert pruned > 10 and pruned != dense
    assert close(pruned, library_perplexity(library))
    assert close(dense, library[0].dense_perplexity())


def test_the_compensated_preview_follows_the_plan(loop_page, library):
    page = loop_page
    _, first = run_preview(page)
    open_tab(page, "Plan")
    target = page.locator("#plan-target input[type=number]")

    def move():
        target.fill("0.3")
        target.press("Enter")
        target.blur()

    quietly(page, move)  # the plan change, then the preview it reruns
    open_tab(page, "Preview")
    status = page.inner_text("#preview-status")
    assert "Done" in status and "Includes the live steps: surgeon" in status
    pruned = number(page, "preview-pruned")
    assert pruned != first and close(pruned, library_perplexity(library, target=0.3))


def test_the_stale_mark_appears_at_once_and_the_preview_reruns_by_default(loop_page):
    page = loop_page
    _, first = run_preview(page)
    auto_preview(page, False)
    choose_allocation(page, "uniform")
    open_tab(page, "Preview")
    assert STALE in page.inner_text("#preview-status")
    assert number(page, "preview-pruned") == first  # not run again
    auto_preview(page, True)
    choose_allocation(page, "global")  # back to the previewed plan: previewed again
    open_tab(page, "Preview")
    assert "Done" in page.inner_text("#preview-status")
    assert number(page, "preview-pruned") == first
    open_tab(page, "Plan")
    choose_allocation(page, "uniform")
    open_tab(page, "Preview")
    assert "Done" in page.inner_text("#preview-status")
    assert number(page, "preview-pruned") != first


def test_the_sweep_runs_from_the_plan_tab_stops_and_draws_its_figures(loop_page):
    page = loop_page
    # While another job holds the shared model the sweep has announced itself and waits; Stop
    # then ends it before its first point.
    with state.SHARED.lock:
        page.click("#sens-run")
        page.wait_for_selector("#sens-status:has-text('Measuring mlp of every layer')")
        page.click("#sens-stop")
        page.wait_for_selector("#sens-status:has-text('Stopped; nothing kept')")
    assert page.locator("#sens-heatmap .js-plotly-plot").count() == 0
    # The page takes a click on a button whose last run it still counts as running for nothing:
    # wait until the stopped run has ended on the server.
    until(lambda: not state._RUNS)
    measure_after_stop(page)
    status = page.inner_text("#sens-status")
    # Every layer at the plan's 5 ratios, MLP channels only (the plan keeps every head).
    assert re.search(r"Done: (\d+) points", status).group(1) == str(
        LAYERS * len(opening().sensitivity_ratios)
    )
    page.wait_for_selector("#sens-heatmap .js-plotly-plot")
    page.wait_for_selector("#sens-curves .js-plotly-plot")
    heat = traces(page, "sens-heatmap")
    assert [len(heat[0]["z"]), len(heat[0]["z"][0])] == [LAYERS, len(opening().sensitivity_ratios)]
    assert heat[-1]["name"] == "current plan" and len(heat[-1]["x"]) == LAYERS
    names = [trace["name"] for trace in traces(page, "sens-curves")]
    assert [f"layer {i}" in names for i in range(LAYERS)] == [True] * LAYERS


def measure_after_stop(page) -> None:
    """Press Measure again and wait for its "Done" on the status line itself.

    Waiting for the page to go busy and quiet (``quietly``) hung in loaded runs: the page never
    went busy, probably because it dropped a click that came while it still counted the
    cancelled run as pending (not confirmed). The status line says which run it shows, so the
    test waits on it and presses again only while the page still shows the stopped run.
    """
    done = "#sens-status:has-text('Done:')"
    for _ in range(10):
        page.click("#sens-run")
        try:
            page.wait_for_selector(f"{done}, #sens-status:has-text('Measuring')", timeout=15_000)
            break
        except PlaywrightTimeout:
            continue
    page.wait_for_selector(done, timeout=SLOW)


def traces(page, plot_id: str) -> list[dict]:
    """The drawn traces of a plotly figure (plotly's decoded copy of the data)."""
    return page.evaluate(
        """(id) => document.querySelector(`#${id} .js-plotly-plot`)._fullData.map(t => ({
            name: t.name, x: Array.from(t.x || []), z: Array.from(t.z || [], r => Array.from(r)),
        }))""",
        plot_id,
    )


def decoder_cut(page) -> float:
    """The share of decoder-block parameters the counters say the plan removes."""
    text = page.inner_text("#plan-counters")
    return -float(re.search(r"Decoder blocks\s+\S+ → \S+\s+([-+][\d.]+)%", text).group(1)) / 100


def test_the_sensitivity_allocation_fills_the_table(loop_page):
    page = loop_page
    choose_allocation(page, "sensitivity")
    wait_plan(page, "valid")
    rows = table(page)
    ratios = [float(row[2]) for row in rows]
    assert ratios[0] == ratios[-1] == 0  # protected
    assert any(r > 0 for r in ratios)
    assert [kept_channels(page, i) for i in range(LAYERS)] == [
        WIDTH - round(r * WIDTH) for r in ratios
    ]
    assert removed_channels(page) == sum(WIDTH - kept_channels(page, i) for i in range(LAYERS))
    assert 0.2 <= decoder_cut(page) < 0.21  # the global target, met


@pytest.mark.parametrize("start", ["uniform", "global", "sensitivity", "per_layer"])
def test_a_row_edit_sticks_under_each_allocation_and_the_counters_follow(loop_page, start):
    page = loop_page
    choose_allocation(page, start)
    wait_plan(page, "valid")
    before, removed = table(page), removed_channels(page)
    value = "0.125" if before[1][2] != "0.125" else "0.25"
    quietly(page, lambda: set_cell(page, 1, 2, value))
    page.wait_for_timeout(3000)  # later events (the preview it started, redraws) change nothing
    assert allocation(page) == "per_layer"
    wait_plan(page, "valid")
    after = table(page)
    assert after[1][2] == value and kept_channels(page, 1) == WIDTH - round(float(value) * WIDTH)
    others = [row[1:4] for i, row in enumerate(after) if i != 1]
    assert others == [row[1:4] for i, row in enumerate(before) if i != 1]
    assert removed_channels(page) == sum(WIDTH - kept_channels(page, i) for i in range(LAYERS))
    assert removed_channels(page) != removed


def test_a_bad_cell_is_refused_and_every_other_cell_keeps_its_value(loop_page):
    page = loop_page
    before = table(page)
    # Text in a number column never leaves the page: the cell keeps its value, the plan too.
    set_cell(page, 2, 2, "abc")
    assert table(page) == before and allocation(page) == "global"
    quietly(page, lambda: set_cell(page, 2, 2, "1.5"))
    wait_plan(page, "mlp_ratios[2] = 1.5 is out of range")
    after = table(page)
    assert after[2][2] == "1.5"  # shown as typed, to be fixed
    assert [r[1:4] for r in after] == [
        r[1:4] if i != 2 else [r[1], "1.5", r[3]] for i, r in enumerate(before)
    ]
    assert "No valid plan" in page.inner_text("#plan-counters")
    quietly(page, lambda: set_cell(page, 2, 2, "0.25"))
    wait_plan(page, "valid")
    assert kept_channels(page, 2) == 96 and allocation(page) == "per_layer"
    fixed = table(page)
    assert [r for i, r in enumerate(fixed) if i != 2] == [r for i, r in enumerate(before) if i != 2]
    assert removed_channels(page) == sum(WIDTH - kept_channels(page, i) for i in range(LAYERS))


def test_the_calibration_amount_is_a_choice_on_the_model_tab_and_part_of_the_plan(
    loop_page, loop_app
):
    page = loop_page
    open_tab(page, "Model")
    windows, length = (
        page.locator("#model-calib-windows input"),
        page.locator("#model-calib-length input"),
    )
    assert (windows.input_value(), length.input_value()) == (str(CALIBRATION_WINDOWS), "256")
    assert f"{CALIBRATION_WINDOWS} windows × 256 tokens" in page.inner_text("#model-summary")
    windows.fill("4")
    length.fill("128")
    quietly(page, lambda: page.click("#model-load"))
    assert "4 windows × 128 tokens" in page.inner_text("#model-summary")
    assert "scores are ready" in page.inner_text("#model-status")
    # Its own entry of the shared cache: the other sessions' statistics are not this one's.
    keys = [key for key in state.SHARED._entries if loop_app.model in key]
    assert (
        len(keys) == 2
        and len({state.SHARED._entries[k].explorer.calibration.shape for k in keys}) == 2
    )
    assert saved_plan(page)[:2] == (4, 128)
    # A preset names its own amount: the session recalibrates on it, and the Model tab says so
    # (FLAP's: the default's per-layer ratios are SmolLM2's 30 layers, refused on this model).
    open_tab(page, "Plan")
    page.click("#plan-preset input")
    quietly(page, lambda: page.get_by_role("option", name=TITLES["flap"]).click())
    assert saved_plan(page)[:2] == (32, 256)
    open_tab(page, "Model")
    assert (windows.input_value(), length.input_value()) == ("32", "256")
    assert "32 windows × 256 tokens" in page.inner_text("#model-summary")


def saved_plan(page) -> tuple:
    """The calibration windows and length of the plan JSON the Plan tab hands out."""
    open_tab(page, "Plan")
    with page.expect_download() as download:
        page.click("#plan-save")
    saved = json.loads(download.value.path().read_text())
    return saved["calibration_windows"], saved["calibration_length"]
