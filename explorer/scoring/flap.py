"""FLAP: fluctuation-based adaptive structured pruning (An et al., AAAI 2024, arXiv 2312.11983).

A unit is scored by how much its output *fluctuates* around its mean over the calibration tokens,
S_j = Var_n(X_n,j) · ‖W_:,j‖², j an input channel of ``o_proj`` (a head sums its columns) or of
``down_proj`` (an MLP channel). The constant part of what a pruned unit contributed is not lost:
``explorer.recovery.flap_bias`` adds W_:,P · mean(X_P) to the module's bias, so only the fluctuation
is, which is why fluctuation is the score.

Scores are standardised within each layer and module (z-scores over that layer's heads, its kv
groups or its MLP channels) and ranked globally with one threshold, so each layer keeps as many
units as stand out *within it*: the per-layer sizes follow from the data. The planner's global
allocation ranks score per parameter; the returned scores are therefore z · (parameters of the
unit), so that its ranking is FLAP's ranking of z-scores, while per-layer rankings are unchanged.
"""

from __future__ import annotations

import torch

from ..errors import PlanError
from .base import Criterion, ScoreContext, Scores
from .criteria import require_stats as require
from .statistics import Needs, Statistics

PAPER = "FLAP (An et al., AAAI 2024, arXiv 2312.11983)"
FLAP_NEEDS = Needs(input_moments=True)


def fluctuation(weight: torch.Tensor, stats: Statistics, path: str) -> torch.Tensor:
    """S_j = Var(x_j) · ‖W_:,j‖² per input channel j of the linear module at ``path``."""
    return stats.input_var(path).to(weight.device) * weight.float().square().sum(0)


def standardise(x: torch.Tensor) -> torch.Tensor:
    """z-scores along the last axis (FLAP's unbiased std); a single unit scores 0."""
    if x.shape[-1] < 2:
        return torch.zeros_like(x)
    std = x.std(-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
    return (x - x.mean(-1, keepdim=True)) / std


def fluctuation_scores(ctx: ScoreContext, stats: Statistics) -> dict[str, torch.Tensor]:
    """Raw fluctuations per kind: head/kv/mlp (layers, units), layer (layers,)."""
    s, f = ctx.structure, ctx.structure.family
    heads, mlp = [], []
    for layer in range(s.num_layers):
        o_path, down_path = s.path(layer, f.o), s.path(layer, f.down)
        per_column = fluctuation(ctx.weight(o_path), stats, o_path)
        heads.append(per_column.reshape(s.heads, s.head_dim).sum(-1).to(ctx.device))
        mlp.append(fluctuation(ctx.weight(down_path), stats, down_path).to(ctx.device))
    head = torch.stack(heads)
    mlp_ = torch.stack(mlp)
    return {
        "head": head,
        "kv": head.reshape(s.num_layers, s.kv_heads, s.group_size).sum(-1),
        "mlp": mlp_,
        "layer": head.sum(-1) + mlp_.sum(-1),
    }


def _flap(ctx: ScoreContext) -> Scores:
    stats = require(ctx, "flap", FLAP_NEEDS)
    s = ctx.structure
    if "hidden" in ctx.kinds:
        raise PlanError(
            "FLAP does not score hidden channels. Set the hidden ratio to 0 or use another criterion."
        )
    raw = fluctuation_scores(ctx, stats)
    return {kind: standardise(raw[kind]) * s.group_params(kind) for kind in ctx.kinds}


FLAP = Criterion(
    name="flap",
    title="FLAP fluctuation (standardised, adaptive)",
    formula=(
        "S_j = Var_n(X_n,j) · ‖W_:,j‖² over the input channels j of o_proj (head: sum over "
        "its columns; kv group: sum over its heads) and down_proj (MLP channel); z-scored "
        "within each layer per kind; layer: z-score of its total S across layers. Returned "
        "as z × unit parameters so a global per-parameter ranking is FLAP's global threshold."
    ),
    score=_flap,
    needs=FLAP_NEEDS,
    uses_reduction=False,
    paper=PAPER,
)
