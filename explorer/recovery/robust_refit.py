"""A layer-wise least-squares refit that the attention-sink positions cannot dominate.

The plain refit (``explorer.recovery.steps.layerwise_least_squares``) minimises the summed
squared error over every calibration token. In LLMs a few positions — the first token of every window above all,
the attention sink — carry massive activations, hundreds of times the norm of the others, so that
sum is almost only their error: the refit trades the quality of every ordinary token for a little
less error at the sinks, and hurts models that were already good (MLP-only and compensated cuts).
Dropping the sink tokens from the fit is worse: nothing then holds their huge outputs in place.

This refit separates the two roles:

- the first ``sink_positions`` positions of every window are fitted **exactly**, as equality
  constraints W x_s = y_s (a KKT system; redundant constraints are satisfied in least squares);
- every other token is weighted by ``1 / ‖y_t‖²`` when ``relative`` (each token's *relative* error
  counts once; a token with a large target no longer outweighs the rest), then fitted by damped
  least squares towards the current weights as before.

With W₀ the prior, A = X̂ᵂX̂ᵂᵀ + λI and R = YᵂX̂ᵂᵀ + λW₀ (ᵂ: rows scaled by √w), the solution is
W = (R − Λ X_sᵀ) A⁻¹ with Λ = (R A⁻¹ X_s − Y_s)(X_sᵀ A⁻¹ X_s)⁺.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch

from .steps import GramAccumulator, RecoveryContext, RecoveryStep, refit_report


class RobustAccumulator(GramAccumulator):
    """Weighted Gram sums of the ordinary tokens; the sink tokens kept apart as constraints.

    Inputs arrive as (windows, positions, features), so positions are known. ``relative_error``
    (inherited) reports the weighted error of the ordinary tokens.
    """

    def __init__(
        self,
        n_in: int,
        n_out: int,
        *,
        bias: bool,
        device: torch.device,
        sink_positions: int = 1,
        relative: bool = True,
    ):
        super().__init__(n_in, n_out, bias=bias, device=device)
        self.sink_positions = sink_positions
        self.relative = relative
        self.sink_x: list[torch.Tensor] = []
        self.sink_y: list[torch.Tensor] = []

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if x.dim() < 3:  # no position axis: every token is ordinary
            x, y = x.reshape(1, -1, x.shape[-1]), y.reshape(1, -1, y.shape[-1])
        k = min(self.sink_positions, x.shape[1])
        if k:
            self.sink_x.append(x[:, :k].reshape(-1, x.shape[-1]).to(torch.float64))
            self.sink_y.append(y[:, :k].reshape(-1, y.shape[-1]).to(torch.float64))
        x, y = x[:, k:].to(torch.float64), y[:, k:].to(torch.float64)
        if self.relative:
            energy = y.square().sum(-1, keepdim=True)
            scale = energy.clamp_min(1e-12 * float(energy.mean().clamp_min(1e-30))).rsqrt()
            x, y = x * scale, y * scale
        super().add(x, y)

    def solve(
        self, damping: float, prior: tuple[torch.Tensor, torch.Tensor | None] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.sink_x:
            return super().solve(damping, prior)
        xs = torch.cat(self.sink_x).to(self.xtx.device)
        if self.bias:
            xs = torch.cat([xs, torch.ones_like(xs[:, :1])], dim=1)
        ys = torch.cat(self.sink_y).to(self.xtx.device)
        lam = damping * self.xtx.diagonal().mean().clamp_min(1e-12)
        a = self.xtx + lam * torch.eye(self.xtx.shape[0], dtype=self.xtx.dtype, device=xs.device)
        rhs = self.ytx.clone()
        if prior is not None:
            w0 = prior[0].to(self.xtx)
            if self.bias:
                b0 = prior[1] if prior[1] is not None else torch.zeros_like(w0[:, 0])
                w0 = torch.cat([w0, b0.to(self.xtx)[:, None]], dim=1)
            rhs = rhs + lam * w0
        a_inv_xs = torch.linalg.solve(a, xs.T)  # A⁻¹ X_s, (width, sinks)
        a_inv_rhs = torch.linalg.solve(a, rhs.T).T  # R A⁻¹, (out, width)
        multipliers = (a_inv_rhs @ xs.T - ys.T) @ torch.linalg.pinv(xs @ a_inv_xs)
        solution = a_inv_rhs - multipliers @ a_inv_xs.T
        if self.bias:
            return solution[:, :-1], solution[:, -1]
        return solution, None


def _robust_layerwise_step(
    ctx: RecoveryContext,
    *,
    damping: float = 0.01,
    modules: Sequence[str] = ("o_proj", "down_proj"),
    sink_positions: int = 1,
    relative: bool = True,
    shrink_to_current: bool = True,
) -> dict:
    robust = partial(RobustAccumulator, sink_positions=sink_positions, relative=relative)
    return refit_report(
        ctx, robust, damping=damping, modules=modules, shrink_to_current=shrink_to_current
    )


ROBUST_LAYERWISE_STEP = RecoveryStep(
    name="layerwise_robust",
    title="Layer-wise least squares, sink positions exact, tokens weighted by their size",
    run=_robust_layerwise_step,
    paper="after arXiv 2407.19126; massive activations: Sun et al., arXiv 2402.17762",
)
