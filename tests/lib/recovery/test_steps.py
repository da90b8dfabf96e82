"""Recovery: the damped least squares, the layer-wise refit, and LoRA fine-tuning."""

import pytest
import torch
from torch import nn

from explorer.apply.pruning import prune_model
from explorer.catalogue import RECOVERY_STEPS
from explorer.planning.selection import Selection
from explorer.recovery.steps import (
    GramAccumulator,
    damped_solve,
    layerwise_least_squares,
    lora_recovery,
    removed_indices,
)
from tests.tiny import CONFIGS, tiny, tokens

ALL_ROLES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_damped_solve_equals_lstsq_on_the_stacked_tokens():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 6, generator=g, dtype=torch.float64)
    y = torch.randn(50, 4, generator=g, dtype=torch.float64)
    acc = GramAccumulator(6, 4, bias=False, device=x.device)
    for chunk in range(0, 50, 16):  # tokens arrive batch by batch
        acc.add(x[chunk : chunk + 16], y[chunk : chunk + 16])
    weight, bias = acc.solve(0.1)
    lam = 0.1 * (x * x).sum(0).mean()
    stacked_x = torch.cat([x, lam.sqrt() * torch.eye(6, dtype=x.dtype)])
    stacked_y = torch.cat([y, torch.zeros(6, 4, dtype=y.dtype)])
    expected = torch.linalg.lstsq(stacked_x, stacked_y).solution.T
    torch.testing.assert_close(weight, expected)
    assert bias is None
    # Damping towards current weights W0: the extra rows ask for W0 instead of 0.
    w0 = torch.randn(4, 6, generator=g, dtype=torch.float64)
    towards, _ = acc.solve(0.1, prior=(w0, None))
    stacked_y = torch.cat([y, lam.sqrt() * w0.T])
    torch.testing.assert_close(towards, torch.linalg.lstsq(stacked_x, stacked_y).solution.T)
    # Its error is the one measured on the tokens themselves.
    err = (x @ weight.T - y).square().sum() / y.square().sum()
    assert acc.relative_error(weight, None) == pytest.approx(err.item())


def test_bias_is_refit_as_the_weight_of_a_constant_input():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 3, generator=g, dtype=torch.float64)
    y = x @ torch.tensor([[1.0, -2.0, 0.5]], dtype=x.dtype).T + 3.0
    acc = GramAccumulator(3, 1, bias=True, device=x.device)
    acc.add(x, y)
    weight, bias = acc.solve(0.0)
    torch.testing.assert_close(weight, torch.tensor([[1.0, -2.0, 0.5]], dtype=x.dtype))
    torch.testing.assert_close(bias, torch.tensor([3.0], dtype=x.dtype))
    ones = torch.cat([x, torch.ones(40, 1, dtype=x.dtype)], 1)
    direct = torch.linalg.solve(ones.T @ ones + 0.0, ones.T @ y)
    torch.testing.assert_close(damped_solve(acc.xtx, acc.ytx, 0.0), direct.T)


def selection_for(s):
    kv = {2: [0]} if s.kv_heads > 1 else {}
    heads = {0: list(range(0, s.heads, s.group_size))} if s.group_size > 1 else {}
    return Selection.make(
        s, kv=kv, heads=heads, mlp={0: list(range(12)), 2: list(range(0, 40, 3))}, layers=[1]
    )


@pytest.mark.parametrize("family", list(CONFIGS))
def test_removed_indices_are_what_slicing_removes(family):
    model, s = tiny(family)
    sel = Selection.make(s, **{**selection_for(s).__dict__, "hidden": (2, 7), "layers": ()})
    pruned = prune_model(model, s, sel)
    for layer in range(s.num_layers):
        for name in s.family.linears:
            path = s.path(layer, name)
            dense = model.get_submodule(path).weight
            keep = [
                [i for i in range(dense.shape[d]) if i not in removed_indices(s, sel, path, d)]
                for d in (0, 1)
            ]
            expected = dense[keep[0]][:, keep[1]]
            assert torch.equal(pruned.get_submodule(path).weight, expected), path


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_layerwise_refit_maps_modules_and_lowers_the_error(family):
    model, s = tiny(family)
    sel = selection_for(s)
    calib, held_out = tokens(64, 16, seed=1), tokens(8, 16, seed=2)
    pruned = prune_model(model, s, sel)
    with torch.no_grad():
        dense = model(held_out).logits
        before = (pruned(held_out).logits - dense).square().mean()
    report = layerwise_least_squares(model, pruned, s, sel, calib, modules=ALL_ROLES)
    with torch.no_grad():
        after = (pruned(held_out).logits - dense).square().mean()
    assert after < 0.8 * before
    # Pruned layer 1 is dense layer 2 (dense layer 1 is gone); 7 modules in each kept layer.
    assert len(report) == 14 and "model.layers.1.mlp.down_proj" in report
    # Layer 0's q/k/v read the dense input: mapped right, they fit exactly already.
    assert report[s.path(0, s.family.q)][0] < 1e-10
    for name in (s.family.o, s.family.down):
        err_before, err_after = report[s.path(1, name)]
        assert err_after < err_before


def test_layerwise_refit_handles_removed_hidden_channels():
    model, s = tiny("qwen2")
    sel = Selection.make(s, hidden=[0, 5, 9], mlp={1: list(range(8))})
    calib = tokens(16, 16, seed=1)
    pruned = prune_model(model, s, sel)
    report = layerwise_least_squares(model, pruned, s, sel, calib)
    assert sorted(report) == sorted(
        s.path(i, name) for i in range(3) for name in (s.family.o, s.family.down)
    )
    assert all(after < before for before, after in report.values())


def test_lora_lowers_the_loss_and_merges_into_the_same_shapes():
    model, s = tiny("llama")
    pruned = prune_model(model, s, selection_for(s))
    shapes = {name: p.shape for name, p in pruned.named_parameters()}
    weights = {name: p.detach().clone() for name, p in pruned.named_parameters()}
    windows = tokens(8, 16, seed=3)
    losses = lora_recovery(pruned, windows, steps=12, rank=4, lr=1e-2, batch_size=4)
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3])
    assert {name: p.shape for name, p in pruned.named_parameters()} == shapes
    assert all(type(m) is nn.Linear for n, m in pruned.named_modules() if n.endswith("_proj"))
    assert not torch.equal(
        pruned.model.layers[0].mlp.down_proj.weight, weights["model.layers.0.mlp.down_proj.weight"]
    )
    assert torch.equal(pruned.model.embed_tokens.weight, weights["model.embed_tokens.weight"])
    assert all(p.requires_grad for p in pruned.parameters()) and not pruned.training
    with torch.no_grad():
        assert pruned(windows, labels=windows).loss < losses[0]


def test_recovery_steps_run_from_recipe_entries():
    from explorer.errors import PlanError
    from explorer.recovery.steps import RecoveryContext, run_steps

    model, s = tiny("llama")
    sel = selection_for(s)
    ctx = RecoveryContext(model, prune_model(model, s, sel), s, sel, tokens(8, 16, seed=1))
    reports = run_steps(
        [{"step": "layerwise"}, {"step": "lora", "steps": 3, "rank": 2}], ctx, RECOVERY_STEPS
    )
    assert [r["step"] for r in reports] == ["layerwise", "lora"]
    assert (
        reports[0]["modules"] == 4
        and reports[0]["mean_error_after"] < reports[0]["mean_error_before"]
    )
    assert len(reports[1]["losses"]) == 3
    assert RECOVERY_STEPS["lora"].params()["rank"] == 8
    with pytest.raises(PlanError, match="Unknown recovery step 'nope'"):
        run_steps([{"step": "nope"}], ctx, RECOVERY_STEPS)
    with pytest.raises(PlanError, match="no parameter depth"):
        run_steps([{"step": "layerwise", "depth": 2}], ctx, RECOVERY_STEPS)
