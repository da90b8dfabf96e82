"""FLAP: fluctuation-based adaptive structured pruning (An et al., AAAI 2024, arXiv 2312.11983).

A unit is scored by how much its output *fluctuates* around its mean over the calibration tokens,
S_j = Var_n(X_n,j) · ‖W_:,j‖², j an input channel of ``o_proj`` (a head sums its columns) or of
``down_proj`` (an MLP channel). The constant part of what a pruned unit contributed is not lost:
``flap_bias_compensation`` adds W_:,P · mean(X_P) to the module's bias, so only the fluctuation
is, which is why fluctuation is the score.

Scores are standardised within each layer and module (z-scores over that layer's heads, its kv
groups or its MLP channels) and ranked globally with one threshold, so each layer keeps as many
units as stand out *within it*: the per-layer sizes follow from the data. The planner's global
allocation ranks score per parameter; the returned scores are therefore z · (parameters of the
unit), so that its ranking is FLAP's ranking of z-scores, while per-layer rankings are unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from .criteria import require_stats as require
from .errors import PlanError
from .families import get_module
from .importance import Criterion, Needs, ScoreContext, Scores, register
from .pruning import kept_indices
from .recovery import RecoveryContext, RecoveryStep, register_step, removed_indices
from .selection import Selection
from .statistics import Statistics, collect_statistics
from .structure import StructureMap

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


@torch.no_grad()
def flap_bias_compensation(
    pruned_model: nn.Module,
    dense_model: nn.Module,
    stats: Statistics,
    structure: StructureMap,
    selection: Selection,
) -> list[str]:
    """Add W_:,P · mean(X_P) to the bias of ``o_proj`` and ``down_proj`` of the pruned model.

    P are the input channels of the dense module that ``selection`` removed (its heads' columns,
    its MLP channels), W the dense weight and mean(X) the dense calibration inputs in ``stats``
    (collected with ``FLAP_NEEDS``). Rows follow the pruned module (removed hidden channels are
    dropped). Modules without a bias get one, in every kept layer so that all layers stay alike,
    and the config lists them in ``extra_biases`` for the export. Returns the pruned module paths
    whose bias changed.
    """
    s, f = structure, structure.family
    kept_layers = selection.kept_layers(s)
    rows = kept_indices(s.hidden, selection.hidden)
    changed = []
    for role in (f.o, f.down):
        for index, layer in enumerate(kept_layers):
            dense_path = s.path(layer, role)
            module = get_module(pruned_model, s.path(index, role))
            if module.bias is None:
                module.bias = nn.Parameter(
                    torch.zeros_like(module.weight[:, 0]), requires_grad=module.weight.requires_grad
                )
            pruned = removed_indices(s, selection, dense_path, 1)
            if not pruned:
                continue
            weight = get_module(dense_model, dense_path).weight
            cols = torch.tensor(pruned, device=weight.device)
            mean = stats.mean_input(dense_path).to(weight.device)[cols]
            shift = weight.float().index_select(1, cols) @ mean
            module.bias += shift[rows.to(shift.device)].to(module.bias)
            changed.append(s.path(index, role))
        if not s.bias[role]:
            extra = list(getattr(pruned_model.config, "extra_biases", None) or [])
            pruned_model.config.extra_biases = sorted(set(extra) | {role})
    return changed


register(
    Criterion(
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
)


def _bias_step(ctx: RecoveryContext) -> dict:
    stats = ctx.stats
    if stats is None or not stats.covers(FLAP_NEEDS):
        stats = collect_statistics(
            ctx.dense, ctx.structure, ctx.windows, FLAP_NEEDS, progress=ctx.progress
        )
    changed = flap_bias_compensation(ctx.pruned, ctx.dense, stats, ctx.structure, ctx.selection)
    return {"biases_changed": len(changed)}


register_step(
    RecoveryStep(
        name="flap_bias",
        title="FLAP bias compensation (b += W_:,P · mean(X_P))",
        run=_bias_step,
        paper=PAPER,
    )
)
