"""The plan on the pictures, in Debian's chromium: the Structure tab's strip of shares kept and its
removed-unit crosses, and the Heads tab's strip, follow a plan change made in the Plan tab."""

from __future__ import annotations

import pytest

pytest.register_assert_rewrite("tests.app.fixtures")

from tests.app.fixtures import (  # noqa: E402
    SLOW,
    open_tab,
    screenshot,
    set_cell,
    wait_plan,
)

pytest_plugins = ["tests.app.fixtures"]
pytestmark = [pytest.mark.browser, pytest.mark.real, pytest.mark.usefixtures("nothing_phones_home")]

# What the Structure graph shows of layer 0 (expanded by default): its strip cell's hover text
# and how many of its MLP channels are crossed out.
LAYER0 = """() => {
    const plot = document.querySelector('#structure-graph .js-plotly-plot');
    const named = (name) => plot && plot.data.find((t) => t.name === name);
    const strip = named('share of the layer kept');
    const removed = named('removed by the plan');
    if (!strip) return null;
    const index = strip.ids.indexOf('kept:0');
    const crossed = removed ? removed.ids.filter((id) => id.startsWith('mlp:0:')).length : 0;
    return {kept: strip.marker.color[index], hover: strip.hovertext[index], crossed};
}"""
HEADS_STRIP = """() => {
    const plot = document.querySelector('#head-heatmap .js-plotly-plot');
    const strip = plot && plot.data.find((t) => t.name === 'share kept');
    return strip ? strip.z[0] : null;
}"""


def test_the_strip_and_the_removed_marks_follow_a_plan_change(page):
    open_tab(page, "Plan")
    wait_plan(page, "valid")
    open_tab(page, "Structure")
    page.wait_for_function(f"() => ({LAYER0})() !== null", timeout=SLOW)
    before = page.evaluate(LAYER0)
    assert 0 < before["kept"] < 1 and before["crossed"] > 0  # the default plan cuts every layer

    open_tab(page, "Plan")
    set_cell(page, 0, 2, "0.5")  # layer 0: remove half of its 1,536 MLP channels
    page.wait_for_selector(
        '#plan-table [data-testid="cell-0-5"]:has-text("768/1536")', timeout=SLOW
    )
    open_tab(page, "Structure")
    page.wait_for_function(f"() => ({LAYER0})().crossed === 768", timeout=SLOW)
    after = page.evaluate(LAYER0)
    assert "MLP channels 50%" in after["hover"]
    assert after["kept"] < before["kept"]
    screenshot(page, "structure-plan")

    open_tab(page, "Heads")
    page.wait_for_function(
        f"() => {{ const z = ({HEADS_STRIP})(); return z !== null && z[1] === 0.5; }}",
        timeout=SLOW,
    )
    page.wait_for_selector("#heads-summary:has-text('The plan removes')", timeout=SLOW)
    screenshot(page, "heads-plan")
