"""The robust layer-wise refit: sink positions as exact constraints, tokens weighted by size."""

import pytest
import torch

from explorer.apply.pruning import prune_model
from explorer.catalogue import RECOVERY_STEPS
from explorer.planning.selection import Selection
from explorer.recovery.robust_refit import RobustAccumulator
from explorer.recovery.steps import RecoveryContext, run_steps
from tests.tiny import tiny, tokens


def data(seed=0, windows=5, positions=7, n_in=6, n_out=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(windows, positions, n_in, generator=g, dtype=torch.float64)
    x[:, 0] *= 50  # a massive first position, as in LLMs
    y = torch.randn(windows, positions, n_out, generator=g, dtype=torch.float64)
    return x, y


def test_relative_weighting_is_least_squares_on_rows_scaled_by_their_target_norm():
    x, y = data()
    acc = RobustAccumulator(6, 4, bias=False, device=x.device, sink_positions=0, relative=True)
    acc.add(x[:2], y[:2])
    acc.add(x[2:], y[2:])
    weight, _ = acc.solve(0.0)
    scale = 1 / y.reshape(-1, 4).norm(dim=-1, keepdim=True)
    expected = torch.linalg.lstsq(x.reshape(-1, 6) * scale, y.reshape(-1, 4) * scale).solution.T
    torch.testing.assert_close(weight, expected)


@pytest.mark.parametrize("bias", [False, True])
def test_sink_positions_are_met_exactly_and_the_rest_is_the_constrained_optimum(bias):
    x, y = data(1)
    w0 = torch.randn(4, 6, dtype=torch.float64)
    b0 = torch.randn(4, dtype=torch.float64) if bias else None
    acc = RobustAccumulator(6, 4, bias=bias, device=x.device, sink_positions=1, relative=False)
    acc.add(x, y)
    weight, b = acc.solve(0.1, prior=(w0, b0))
    fitted = x @ weight.T + (b if bias else 0)
    torch.testing.assert_close(fitted[:, 0], y[:, 0])  # the five sink tokens, exactly
    # The KKT system written out: [A  X_s; X_sᵀ 0] [Wᵀ; Λᵀ] = [R ᵀ; Y_sᵀ].
    one = lambda t: torch.cat([t, torch.ones_like(t[..., :1])], -1) if bias else t  # noqa: E731
    xr, yr = one(x[:, 1:].reshape(-1, 6)), y[:, 1:].reshape(-1, 4)
    xs, ys = one(x[:, 0]), y[:, 0]
    gram = xr.T @ xr
    lam = 0.1 * gram.diagonal().mean()
    prior = torch.cat([w0, b0[:, None]], 1) if bias else w0
    a = gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype)
    kkt = torch.cat(
        [torch.cat([a, xs.T], 1), torch.cat([xs, torch.zeros(5, 5, dtype=xs.dtype)], 1)]
    )
    rhs = torch.cat([(yr.T @ xr + lam * prior).T, ys])
    expected = torch.linalg.solve(kkt, rhs)[: gram.shape[0]].T
    torch.testing.assert_close(torch.cat([weight, b[:, None]], 1) if bias else weight, expected)


def test_robust_refit_step_lowers_the_module_errors_of_a_pruned_model():
    model, s = tiny("llama")
    sel = Selection.make(s, mlp={i: list(range(0, 40, 3)) for i in range(3)}, heads={1: [0, 3]})
    pruned = prune_model(model, s, sel)
    ctx = RecoveryContext(model, pruned, s, sel, tokens(6, 12))
    (report,) = run_steps([{"step": "layerwise_robust", "damping": 0.001}], ctx, RECOVERY_STEPS)
    assert report["modules"] == 6
    assert report["mean_error_after"] < report["mean_error_before"]
