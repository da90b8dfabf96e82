"""A model that does not fit a memory budget is scored with its layers streamed from disk."""

from __future__ import annotations

import pytest
import torch
from accelerate.hooks import AlignDevicesHook

from explorer.catalogue import CRITERIA
from explorer.errors import ExplorerError, PlanError
from explorer.model.families import family_for
from explorer.model.structure import StructureMap
from explorer.scoring.base import ScoreContext
from explorer.scoring.offload import load_offloaded, resident_bytes, score_offloaded
from explorer.scoring.statistics import collect_statistics
from tests.tiny import tiny, tokens

FORWARD_ONLY = ("random", "l1", "l2", "wanda_sp", "flap", "depth2", "head_similarity")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(dense model, its structure, offloaded copy, its structure, offload plan)."""
    folder = tmp_path_factory.mktemp("model")
    dense, structure = tiny("llama")
    dense.save_pretrained(folder)
    total = resident_bytes(dense)
    model, plan = load_offloaded(
        folder, max_memory_bytes=total // 2, offload_dir=folder / "offload", device="cpu"
    )
    return dense, structure, model, StructureMap(model, family_for(model)), plan


def test_the_model_does_not_fit_and_layers_live_on_disk(pair):
    dense, _, model, _, plan = pair
    assert plan.model_bytes == resident_bytes(dense) > plan.budget_bytes
    assert (plan.kept_layers, plan.offloaded_layers) == (0, 3)
    assert [plan.device_map[f"model.layers.{i}"] for i in range(3)] == ["disk"] * 3
    assert plan.device_map["model.embed_tokens"] == "cpu"
    assert resident_bytes(model) <= plan.budget_bytes


def test_statistics_stream_within_the_budget_and_match_the_dense_pass(pair, monkeypatch):
    dense, structure, model, offloaded_structure, plan = pair
    needs = CRITERIA["head_similarity"].needs | CRITERIA["wanda_sp"].needs
    windows = tokens(3, 10)
    peak = 0
    post_forward = AlignDevicesHook.post_forward

    def measured(self, module, output):  # the moment a streamed module's weights are loaded
        nonlocal peak
        peak = max(peak, resident_bytes(model))
        return post_forward(self, module, output)

    monkeypatch.setattr(AlignDevicesHook, "post_forward", measured)
    got = collect_statistics(model, offloaded_structure, windows, needs, batch_size=3)
    want = collect_statistics(dense, structure, windows, needs, batch_size=3)
    assert resident_bytes(model) < peak <= plan.budget_bytes < plan.model_bytes
    for table in ("input_sum", "input_sq_sum", "covariance", "jsd_sum", "cos_sum"):
        mine, theirs = getattr(got, table), getattr(want, table)
        assert mine.keys() == theirs.keys() and mine
        for key in theirs:
            torch.testing.assert_close(mine[key], theirs[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", FORWARD_ONLY)
def test_forward_only_criteria_score_the_same_offloaded(pair, name):
    dense, structure, model, offloaded_structure, _ = pair
    windows = tokens(2, 10, seed=1)
    needs = CRITERIA[name].needs
    stats = (
        collect_statistics(dense, structure, windows, needs, batch_size=2)
        if any(vars(needs).values())
        else None
    )
    want = CRITERIA[name].score(ScoreContext(dense, structure, stats, reduction="max"))
    got = score_offloaded(
        model, offloaded_structure, CRITERIA[name], windows, reduction="max", batch_size=2
    )
    assert got.keys() == want.keys()
    for kind in want:
        torch.testing.assert_close(got[kind], want[kind], rtol=1e-5, atol=1e-6)


def test_gradient_criteria_and_tiny_budgets_are_refused(pair, tmp_path):
    _, _, model, structure, _ = pair
    with pytest.raises(PlanError, match="forward-only"):
        score_offloaded(model, structure, CRITERIA["taylor"], tokens(1, 6))
    dense, _ = tiny("llama")
    dense.save_pretrained(tmp_path)
    with pytest.raises(ExplorerError, match="Raise the budget"):
        load_offloaded(tmp_path, max_memory_bytes=1000, offload_dir=tmp_path / "o", device="cpu")
