"""The compensated preview shows what Export writes: same perplexity as the reloaded folder."""

from __future__ import annotations

import math

import pytest

from explorer.apply.preview import LivePreview
from explorer.evaluate import perplexity
from explorer.export.writer import export_model, load_pruned
from explorer.planning.selection import Selection
from explorer.recovery.live import Compensation, split_steps

LIVE = {
    "surgeon": [{"step": "surgeon", "damping": 0.01}],
    "flap_bias": [{"step": "flap_bias"}],
    "both": [{"step": "surgeon", "damping": 0.05}, {"step": "flap_bias"}],
}


@pytest.fixture
def session(tiny_session):
    return tiny_session


def plan_selection(s, layer1_mlp: int) -> Selection:
    return Selection.make(
        s,
        heads={0: [1, 3]},
        mlp={0: list(range(0, 128, 3)), 1: list(range(layer1_mlp))},
    )


def rel(a: float, b: float) -> float:
    return abs(a - b) / b


@pytest.mark.parametrize("name", list(LIVE))
def test_compensated_preview_equals_the_exported_folder(session, name, tmp_path):
    ex, steps = session, LIVE[name]
    s = ex.structure
    masks_only = ex.perplexity(plan_selection(s, 40))
    for width in (40, 70):  # the second one is an incremental one-layer change
        sel = plan_selection(s, width)
        previewed = ex.perplexity(sel, steps=steps)
        pruned, reports = ex.recover(sel, steps)
        out = tmp_path / f"out{width}"
        export_model(ex.model, ex.workspace.tokenizer, s, sel, out, pruned=pruned)
        reloaded, _ = load_pruned(out, device="cpu")
        exported = perplexity(reloaded, ex.evaluation)
        assert rel(previewed, exported) <= 1e-4, (name, width, previewed, exported)
        fresh = LivePreview(ex.model, s, ex.evaluation).perplexity(sel, ex.compensation(steps))
        assert rel(previewed, fresh) <= 1e-5
    assert math.isfinite(masks_only) and rel(masks_only, previewed) > 1e-4  # the update counts
    # the shared model is dense again
    assert rel(ex.perplexity(Selection()), perplexity(ex.model, ex.evaluation)) < 1e-6


def test_steps_that_cannot_run_live_are_listed_as_not_included():
    included, excluded = split_steps(
        [{"step": "surgeon"}, {"step": "lora", "steps": 5}, {"step": "surgeon", "shots": 2}]
    )
    assert included == [{"step": "surgeon"}]
    assert [e["step"] for e in excluded] == ["lora", "surgeon"]


def test_cached_inverses_give_the_same_patches_within_their_memory_bound(session):
    """An inverse input covariance is reused across cuts and evicted beyond ``inverse_bytes``."""
    ex = session
    s = ex.structure
    steps = LIVE["surgeon"]
    stats = ex.compensation(steps).stats
    one = Compensation(ex.model, s, stats, steps, inverse_bytes=1)
    cold = {p: w for p, w, _ in one.patches(plan_selection(s, 40))}
    assert len(one._inverses) == 1  # a bound below one matrix keeps only the newest
    fresh = Compensation(ex.model, s, stats, steps)
    for width in (70, 40):  # the second selection reuses both layers' cached inverses
        patched = {p: w for p, w, _ in fresh.patches(plan_selection(s, width))}
    assert len(fresh._inverses) == len(cold)
    for path, weight in cold.items():
        assert weight.equal(patched[path])
