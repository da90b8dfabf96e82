"""Plans: JSON round-trip, refusal of bad plans, and resolution against known scores."""

import pytest
import torch

from explorer.catalogue import CRITERIA
from explorer.errors import PlanError
from explorer.planning.plan import Plan, allocate
from explorer.planning.selection import Selection, param_counts
from tests.tiny import tiny


def known_scores(s):
    """Scores where the lowest units are obvious: head h scores h, channel c scores c."""
    return {
        "head": torch.arange(s.heads).float().repeat(s.num_layers, 1),
        "kv": torch.arange(s.kv_heads).float().repeat(s.num_layers, 1),
        "mlp": torch.arange(s.intermediate).float().flip(0).repeat(s.num_layers, 1),
        "hidden": torch.arange(s.hidden).float(),
        "layer": torch.tensor([3.0, 1.0, 2.0]),
    }


@pytest.fixture
def llama():
    return tiny("llama")[1]


def test_plan_json_round_trip(tmp_path):
    plan = Plan(
        criterion="taylor_e1",
        allocation="per_layer",
        head_ratios=[0.0, 0.5, 0.0],
        mlp_ratios=[0.1, 0.2, 0.3],
        calibration={"kind": "file", "path": "a.txt"},
        recovery=[{"step": "layerwise"}],
    )
    path = tmp_path / "plan.json"
    plan.save(path)
    assert Plan.load(path) == plan
    assert Plan.from_json(plan.to_json()).to_dict() == plan.to_dict()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"target": 1.5}, "out of range"),
        ({"mlp_ratio": -0.1}, "out of range"),
        ({"criterion": "nope"}, "Unknown criterion"),
        ({"reduction": "median"}, "Unknown reduction"),
        ({"allocation": "per_layer"}, "head_ratios"),
        ({"round_to": 0}, "round_to"),
        ({"color": "red"}, "Unknown plan field"),
        (
            {
                "calibration": {"kind": "file", "path": "x"},
                "evaluation": {"kind": "file", "path": "x"},
            },
            "same",
        ),
    ],
)
def test_bad_plans_are_refused(change, message):
    with pytest.raises(PlanError, match=message):
        Plan.from_dict({**Plan().to_dict(), **change}).check(criteria=CRITERIA)


def test_malformed_json_and_missing_file(tmp_path):
    with pytest.raises(PlanError, match="not valid JSON"):
        Plan.from_json("{criterion: taylor")
    with pytest.raises(PlanError, match="No plan file"):
        Plan.load(tmp_path / "missing.json")


def test_per_layer_ratio_count_must_match(llama):
    plan = Plan(allocation="per_layer", mlp_ratios=[0.1, 0.2])
    with pytest.raises(PlanError, match="3 layers"):
        allocate(plan, llama, known_scores(llama))


def test_plan_that_empties_a_layer_is_refused(llama):
    plan = Plan(allocation="per_layer", head_ratios=[0.0, 1.0, 0.0])
    with pytest.raises(PlanError, match="every attention head of layer 1"):
        allocate(plan, llama, known_scores(llama))
    # ...unless the layer goes whole.
    plan.remove_layers = [1]
    assert allocate(plan, llama, known_scores(llama)).layers == (1,)


def test_per_layer_takes_the_lowest_units(llama):
    s = llama
    plan = Plan(allocation="per_layer", head_ratios=[0.0, 0.34, 0.0], mlp_ratios=[0.1, 0.0, 0.5])
    sel = allocate(plan, s, known_scores(s))
    # One head per kv group (group size 3): the lowest-scoring head of each group.
    assert sel.heads == {1: (0, 3)}
    # MLP scores descend with the index, so the highest indices go first.
    assert sel.mlp[0] == (36, 37, 38, 39)
    assert sel.mlp[2] == tuple(range(20, 40))


def test_uniform_target_removes_that_share_of_block_params(llama):
    s = llama
    sel = allocate(Plan(target=0.3), s, known_scores(s))
    after = param_counts(s, sel)["blocks"]
    share = 1 - after / s.block_params
    # Within one MLP channel per layer of the target.
    assert abs(share - 0.3) <= 3 * s.group_params("mlp") / s.block_params
    assert all(len(v) == 2 for v in sel.heads.values())  # round(0.3 * 3) = 1 head per group


def test_protected_layers_stay_whole(llama):
    sel = allocate(Plan(target=0.2, protect_first=1, protect_last=1), llama, known_scores(llama))
    assert set(sel.mlp) == {1} and set(sel.heads) <= {1}
    with pytest.raises(PlanError, match="impossible"):
        allocate(Plan(target=0.5, protect_first=1, protect_last=1), llama, known_scores(llama))


def test_round_to_keeps_multiples(llama):
    plan = Plan(head_ratio=0.0, mlp_ratio=0.3, round_to=8)
    sel = allocate(plan, llama, known_scores(llama))
    for layer in range(3):
        assert sel.kept(llama, layer)["intermediate"] % 8 == 0
        assert sel.kept(llama, layer)["intermediate"] == 32  # 40 - 12 = 28, rounded up to 32


def test_kv_unit_removes_whole_groups(llama):
    sel = allocate(
        Plan(head_ratio=0.5, mlp_ratio=0.0, attention_unit="kv"), llama, known_scores(llama)
    )
    assert sel.kv == {0: (0,), 1: (0,), 2: (0,)}
    assert sel.heads[0] == (0, 1, 2)


def test_global_takes_cheapest_per_parameter(llama):
    s = llama
    scores = known_scores(s)
    scores["mlp"][2] += 1000  # layer 2's channels are precious
    scores["head"] += 1e6  # heads are precious everywhere
    sel = allocate(Plan(allocation="global", target=0.15), s, scores)
    assert 2 not in sel.mlp and not sel.heads
    assert 1 - param_counts(s, sel)["blocks"] / s.block_params >= 0.15
    # Never more than needed: one channel fewer would miss the target.
    removed = sum(len(v) for v in sel.mlp.values()) * s.group_params("mlp")
    assert removed - s.group_params("mlp") < 0.15 * s.block_params


def test_global_keeps_a_head_per_group_and_channels(llama):
    sel = allocate(Plan(allocation="global", target=0.9), llama, known_scores(llama))
    assert isinstance(sel, Selection)
    for layer in range(3):
        assert sel.kept(llama, layer)["heads"] >= llama.kv_heads
        assert sel.kept(llama, layer)["intermediate"] >= 1


def test_global_cap_and_mlp_only(llama):
    s = llama
    scores = known_scores(s)
    scores["mlp"][1:] += 1000  # layer 0's channels are cheapest by far
    scores["head"] -= 1e6  # and heads cheaper still
    sel = allocate(Plan(allocation="global", target=0.2, head_ratio=0.0, max_ratio=0.5), s, scores)
    assert not sel.heads and not sel.kv
    assert len(sel.mlp[0]) == s.intermediate // 2, "the cap stops the ranking at half of layer 0"
    assert all(len(v) <= s.intermediate // 2 for v in sel.mlp.values())
    assert 1 - param_counts(s, sel)["blocks"] / s.block_params >= 0.2 - 1e-9
    capped = allocate(Plan(allocation="global", target=0.3, max_ratio=0.34), s, scores)
    assert all(len(v) <= 0.34 * s.heads for v in capped.heads.values()) and capped.heads
    with pytest.raises(PlanError, match="max_ratio"):
        Plan(allocation="global", max_ratio=1.5).check()


def test_hidden_ratio_keeps_a_multiple_of_heads():
    _, s = tiny("llama")
    scores = {"hidden": torch.arange(s.hidden).float(), "mlp": torch.zeros(3, s.intermediate)}
    sel = allocate(Plan(target=None, head_ratio=0.0, mlp_ratio=0.0, hidden_ratio=0.3), s, scores)
    kept = s.hidden - len(sel.hidden)
    assert kept % s.heads == 0 and kept == 36  # 48 - 14 = 34, rounded up to 36
    assert sel.hidden == tuple(range(12))
