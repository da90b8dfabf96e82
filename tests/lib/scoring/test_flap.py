"""FLAP: fluctuation on a hand case, standardised scores, and bias compensation."""

import pytest
import torch

from explorer.apply.pruning import prune_model
from explorer.catalogue import CRITERIA, RECOVERY_STEPS
from explorer.planning.plan import Plan, allocate
from explorer.planning.selection import Selection
from explorer.recovery.flap_bias import flap_bias_compensation
from explorer.scoring.base import ScoreContext
from explorer.scoring.flap import FLAP_NEEDS, fluctuation, standardise
from explorer.scoring.statistics import Statistics, collect_statistics
from tests.tiny import tiny, tokens


def test_fluctuation_on_a_hand_case():
    # Inputs (1, 0) and (3, 2): mean (2, 1), population variance (1, 1).
    stats = Statistics(needs=FLAP_NEEDS, tokens=2)
    stats.input_sum["m"] = torch.tensor([4.0, 2.0])
    stats.input_sq_sum["m"] = torch.tensor([10.0, 4.0])
    weight = torch.tensor([[1.0, 2.0], [0.0, 1.0]])  # squared column norms (1, 5)
    assert fluctuation(weight, stats, "m").tolist() == [1.0, 5.0]
    torch.testing.assert_close(
        standardise(torch.tensor([1.0, 2.0, 3.0])), torch.tensor([-1.0, 0, 1])
    )
    assert standardise(torch.tensor([[7.0]])).tolist() == [[0.0]]


@pytest.fixture(scope="module")
def qwen2():
    model, s = tiny("qwen2")  # q/k/v biases, so module inputs have non-zero means
    calib = tokens(6, 12, seed=1)
    return model, s, calib, collect_statistics(model, s, calib, FLAP_NEEDS)


def test_scores_are_z_scores_within_each_layer_times_unit_size(qwen2):
    model, s, _, stats = qwen2
    scores = CRITERIA["flap"].score(ScoreContext(model, s, stats))
    for kind in ("head", "kv", "mlp"):
        z = scores[kind] / s.group_params(kind)
        torch.testing.assert_close(z.mean(1), torch.zeros(s.num_layers), atol=1e-5, rtol=0)
        torch.testing.assert_close(z.std(1), torch.ones(s.num_layers))
    # The MLP ranking inside a layer is the ranking of raw fluctuations.
    layer = 1
    path = s.path(layer, s.family.down)
    raw = fluctuation(model.get_submodule(path).weight, stats, path)
    assert torch.equal(scores["mlp"][layer].argsort(), raw.argsort())
    # One global threshold: each layer keeps what stands out within it, so sizes differ.
    sel = allocate(Plan(criterion="flap", allocation="global", target=0.3), s, scores)
    assert len({len(sel.mlp.get(i, ())) for i in range(s.num_layers)}) > 1


def mean_output(model, path, ids):
    """Mean over the tokens of ``ids`` of the output of the module at ``path``."""
    seen = []
    hook = model.get_submodule(path).register_forward_hook(
        lambda m, a, out: seen.append(out.reshape(-1, out.shape[-1]).mean(0))
    )
    with torch.no_grad():
        model(ids)
    hook.remove()
    return seen[0]


def test_bias_compensation_adds_biases_everywhere_alike(qwen2):
    model, s, _, stats = qwen2
    f = s.family
    sel = Selection.make(s, heads={0: [1, 3]}, mlp={0: list(range(0, 40, 2)), 2: [1, 2]})
    pruned = prune_model(model, s, sel)
    changed = flap_bias_compensation(pruned, model, stats, s, sel)
    assert changed == [s.path(0, f.o), s.path(0, f.down), s.path(2, f.down)]
    assert pruned.config.extra_biases == ["mlp.down_proj", "self_attn.o_proj"]
    assert all(pruned.get_submodule(s.path(i, f.o)).bias is not None for i in range(3))
    assert not pruned.get_submodule(s.path(1, f.down)).bias.any()


@pytest.mark.parametrize("kind", ["head", "mlp"])
def test_bias_compensation_keeps_the_mean_output(qwen2, kind):
    model, s, calib, stats = qwen2
    # Layer 0's o_proj / down_proj see the dense inputs on the calibration text, so with the
    # compensation their mean output over those tokens is exactly the dense one.
    if kind == "head":
        sel, path = Selection.make(s, heads={0: [1, 3]}), s.path(0, s.family.o)
    else:
        sel, path = Selection.make(s, mlp={0: list(range(0, 40, 2))}), s.path(0, s.family.down)
    dense = mean_output(model, path, calib)
    plain = prune_model(model, s, sel)
    assert (mean_output(plain, path, calib) - dense).abs().max() > 5e-4
    flap_bias_compensation(plain, model, stats, s, sel)
    torch.testing.assert_close(mean_output(plain, path, calib), dense, rtol=1e-4, atol=2e-6)


def test_bias_step_collects_what_it_needs(qwen2):
    from explorer.recovery.steps import RecoveryContext, run_steps

    model, s, calib, stats = qwen2
    sel = Selection.make(s, mlp={0: list(range(0, 40, 2))})
    with_stats = prune_model(model, s, sel)
    run_steps(
        [{"step": "flap_bias"}],
        RecoveryContext(model, with_stats, s, sel, calib, stats),
        RECOVERY_STEPS,
    )
    without = prune_model(model, s, sel)
    report = run_steps(
        [{"step": "flap_bias"}], RecoveryContext(model, without, s, sel, calib), RECOVERY_STEPS
    )
    assert report == [{"step": "flap_bias", "biases_changed": 1}]
    path = s.path(0, s.family.down)
    assert torch.equal(with_stats.get_submodule(path).bias, without.get_submodule(path).bias)
