"""FLAP's bias compensation (An et al., AAAI 2024, arXiv 2312.11983) as a recovery step.

What a pruned unit contributed on average is not lost: W_:,P · mean(X_P) moves into the bias of
the module that read it, so only the fluctuation around the mean (FLAP's score, see
``explorer.scoring.flap``) is.
"""

from __future__ import annotations

import torch
from torch import nn

from ..apply.pruning import kept_indices
from ..model.families import get_module
from ..model.structure import StructureMap
from ..planning.selection import Selection
from ..scoring.flap import FLAP_NEEDS, PAPER
from ..scoring.statistics import Statistics, collect_statistics
from .steps import RecoveryContext, RecoveryStep, removed_indices


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


def _bias_step(ctx: RecoveryContext) -> dict:
    stats = ctx.stats
    if stats is None or not stats.covers(FLAP_NEEDS):
        stats = collect_statistics(
            ctx.dense, ctx.structure, ctx.windows, FLAP_NEEDS, progress=ctx.progress
        )
    changed = flap_bias_compensation(ctx.pruned, ctx.dense, stats, ctx.structure, ctx.selection)
    return {"biases_changed": len(changed)}


FLAP_BIAS_STEP = RecoveryStep(
    name="flap_bias",
    title="FLAP bias compensation (b += W_:,P · mean(X_P))",
    run=_bias_step,
    paper=PAPER,
)
