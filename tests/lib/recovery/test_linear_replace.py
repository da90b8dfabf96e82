"""Linear replacement of removed blocks: the lstsq map, folded, exported as a plain model."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from explorer.apply.pruning import prune_model
from explorer.catalogue import RECOVERY_STEPS
from explorer.errors import PlanError
from explorer.export import export_model
from explorer.planning.selection import Selection
from explorer.recovery.linear_replace import removed_runs, replace_removed_blocks
from explorer.recovery.steps import RecoveryContext, run_steps
from tests.tiny import CONFIGS, raw_hidden_states, tiny, tokens


def test_removed_runs_are_maximal_consecutive_stretches():
    assert removed_runs([5, 2, 3, 9, 8]) == [(2, 3), (5, 5), (8, 9)]
    assert removed_runs([]) == []


def down_outputs(model, layer, ids):
    seen = []
    down = model.model.layers[layer].mlp.down_proj
    handle = down.register_forward_hook(lambda m, a, out: seen.append(out))
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    return seen[0]


def test_linear_replacement_is_the_lstsq_map_folded_into_the_block_before(tiny_tokenizer, tmp_path):
    model, s = tiny("llama")
    ids = tokens(6, 12)
    sel = Selection.make(s, layers=[1], mlp={0: [1, 5], 2: [0, 3]})  # depth and width
    pruned = prune_model(model, s, sel)
    # The fit's data, read independently: M = down_proj output of pruned layer 0, Y = its
    # output minus M, X_out = the dense stream leaving dense layer 1.
    m = down_outputs(pruned, 0, ids).double().reshape(-1, s.hidden)
    y = raw_hidden_states(pruned, ids)[1].double().reshape(-1, s.hidden) - m
    x_out = raw_hidden_states(model, ids)[2].double().reshape(-1, s.hidden)
    # M has rank <= 38 kept MLP channels < 48: the damping towards T = I makes the fit unique,
    # and is least squares on M stacked over sqrt(lambda) I, with I as those rows' target.
    damping = 0.01
    root = (damping * m.square().sum(0).mean()).sqrt() * torch.eye(s.hidden, dtype=m.dtype)
    t = torch.linalg.lstsq(torch.cat([m, root]), torch.cat([x_out - y, root])).solution
    w_down = pruned.model.layers[0].mlp.down_proj.weight.detach().double().clone()

    ctx = RecoveryContext(model, pruned, s, sel, ids)
    (report,) = run_steps(
        [{"step": "linear_replace", "damping": damping, "batch_size": 4}], ctx, RECOVERY_STEPS
    )
    (run,) = report["runs"]
    assert run["layers"] == [1, 1] and run["into"] == "model.layers.0.mlp.down_proj"
    folded = pruned.model.layers[0].mlp.down_proj.weight.double()
    torch.testing.assert_close(folded, t.T @ w_down, rtol=1e-4, atol=1e-5)
    error = (m @ t - (x_out - y)).square().sum() / (x_out - y).square().sum()
    assert run["error_after"] == pytest.approx(error.item(), rel=1e-3)
    assert run["error_before"] == pytest.approx(
        ((m - (x_out - y)).square().sum() / (x_out - y).square().sum()).item(), rel=1e-3
    )
    assert run["error_after"] < run["error_before"]

    # The folded model is a plain transformer: it exports, reloads without remote code, and
    # gives the logits of the in-memory model.
    result = export_model(model, tiny_tokenizer, s, sel, tmp_path / "out", pruned=pruned)
    assert not result.remote_code
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=False)
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(input_ids=ids).logits, pruned(input_ids=ids).logits, rtol=1e-4, atol=1e-4
        )


@pytest.mark.parametrize("family", [f for f in CONFIGS if f != "gemma3"])
def test_linear_replacement_lowers_the_gap_error_in_every_foldable_family(family):
    model, s = tiny(family)
    ids = tokens(6, 12)
    sel = Selection.make(s, layers=[1, 2])  # a run at the end: the target is the last stream
    pruned = prune_model(model, s, sel)
    (run,) = replace_removed_blocks(model, pruned, s, sel, ids, damping=1e-3)
    assert run["layers"] == [1, 2] and run["error_after"] < run["error_before"]


def test_linear_replacement_refuses_what_it_cannot_fold():
    model, s = tiny("llama")
    sel = Selection.make(s, layers=[0])
    with pytest.raises(PlanError, match="layer 0"):
        replace_removed_blocks(model, prune_model(model, s, sel), s, sel, tokens())
    gemma, g = tiny("gemma3")
    sel = Selection.make(g, layers=[1])
    with pytest.raises(PlanError, match="normalises the MLP output"):
        replace_removed_blocks(gemma, prune_model(gemma, g, sel), g, sel, tokens())
