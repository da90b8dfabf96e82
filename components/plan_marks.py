"""The current plan as the Structure and Heads pictures draw it: pure numbers, no Gradio.

Both pictures show the same three things, computed here once so they cannot disagree with each
other or with the Plan tab: which units the plan's ``Selection`` removes, the share of each layer
that stays (one cell per layer: where the cut falls), and a colour per unit for its importance
under the plan's criterion. Importance is shown as a rank over all units of a kind in the model,
not as the raw score: scores of some criteria span orders of magnitude across layers, and a rank
keeps every layer readable while still saying which units the criterion ranks lowest.
"""

from __future__ import annotations

from dataclasses import dataclass

import plotly.colors
import torch

from explorer.errors import ExplorerError
from explorer.model.structure import StructureMap
from explorer.planning.plan import Plan
from explorer.planning.selection import Selection, layer_params
from explorer.scoring.base import Scores

from .state import SHARED, Loaded, select

IMPORTANCE_SCALE = "Viridis"  # dark: ranked least important, yellow: most
KEPT_SCALE = "RdYlGn"  # red: most of the layer cut, green: all kept
REMOVED_COLOUR = "#D62728"
UNIT_KINDS = ("head", "mlp")  # the units the pictures draw one by one


@dataclass(frozen=True)
class PlanMarks:
    """What the pictures mark for one plan on one model."""

    criterion: str
    kept: list[float]  # per layer: share of the layer's parameters the plan keeps
    heads_kept: list[float]  # per layer: share of its query heads kept
    mlp_kept: list[float]  # per layer: share of its MLP channels kept
    removed: dict[str, dict[int, tuple[int, ...]]]  # kind -> layer -> removed units
    shades: dict[str, torch.Tensor]  # kind -> (layers, units) importance rank in [0, 1]
    scores: dict[str, torch.Tensor]  # kind -> (layers, units) the criterion's scores


def removed_units(structure: StructureMap, selection: Selection, kind: str) -> dict[int, tuple]:
    """Per layer, the ``kind`` units (query heads or MLP channels) the selection removes.

    A removed layer loses all of them; the heads of a removed kv group are already listed among
    the removed heads (selections are canonical).
    """
    size = {"head": structure.heads, "mlp": structure.intermediate}[kind]
    per_layer = {"head": selection.heads, "mlp": selection.mlp}[kind]
    out = {}
    for layer in range(structure.num_layers):
        units = tuple(range(size)) if layer in selection.layers else per_layer.get(layer, ())
        if units:
            out[layer] = tuple(sorted(units))
    return out


def kept_shares(structure: StructureMap, selection: Selection) -> list[float]:
    """Per layer, 1 − removed / total parameters of the layer under ``selection``."""
    dense = Selection()
    return [
        layer_params(structure, selection, i) / layer_params(structure, dense, i)
        for i in range(structure.num_layers)
    ]


def unit_kept_shares(structure: StructureMap, selection: Selection, kind: str) -> list[float]:
    """Per layer, the share of its ``kind`` units (query heads or MLP channels) kept."""
    size = {"head": structure.heads, "mlp": structure.intermediate}[kind]
    removed = removed_units(structure, selection, kind)
    return [1 - len(removed.get(i, ())) / size for i in range(structure.num_layers)]


def importance_shades(scores: torch.Tensor) -> torch.Tensor:
    """Each score's rank among all of them, scaled to [0, 1] (0: the lowest), same shape.

    Ties take the mean of their ranks, so equal scores get equal colours.
    """
    flat = scores.detach().float().flatten()
    if flat.numel() < 2:
        return torch.full_like(scores, 0.5, dtype=torch.float32)
    order = flat.argsort(stable=True)
    ranks = torch.empty_like(flat)
    ranks[order] = torch.arange(flat.numel(), dtype=torch.float32)
    values, inverse = torch.unique(flat, return_inverse=True)
    mean_rank = torch.zeros(len(values)).index_add_(0, inverse, ranks)
    mean_rank /= torch.zeros(len(values)).index_add_(0, inverse, torch.ones_like(ranks))
    return (mean_rank[inverse] / (flat.numel() - 1)).view(scores.shape)


def shade_colour(shade: float, scale: str = IMPORTANCE_SCALE) -> str:
    """The colour of a value in [0, 1] on ``scale``, as plotly writes it (``rgb(...)``)."""
    return plotly.colors.sample_colorscale(scale, [min(max(float(shade), 0.0), 1.0)])[0]


def plan_marks(
    structure: StructureMap, selection: Selection, scores: Scores, criterion: str
) -> PlanMarks:
    """The marks of ``selection`` with the importance of the ``scores`` it was allocated from."""
    shown = {k: scores[k].detach().float().cpu() for k in UNIT_KINDS if k in scores}
    return PlanMarks(
        criterion=criterion,
        kept=kept_shares(structure, selection),
        heads_kept=unit_kept_shares(structure, selection, "head"),
        mlp_kept=unit_kept_shares(structure, selection, "mlp"),
        removed={k: removed_units(structure, selection, k) for k in UNIT_KINDS},
        shades={k: importance_shades(v) for k, v in shown.items()},
        scores=shown,
    )


def current_marks(loaded: Loaded, plan: Plan, *, wait: bool) -> PlanMarks | str:
    """The session plan's marks, or why there are none (a message the panel shows).

    ``wait``: compute the selection even when that needs a calibration pass or a sweep (after a
    plan change the Plan tab has just done so; a mere redraw must not start one).
    """
    ex = loaded.explorer
    try:
        if not wait and not ex.ready(plan):
            return "The plan is drawn once its scores are computed (the Plan tab does it)."
        selection = select(loaded, plan, lambda *_: None)
        with SHARED.lock:
            scores = ex.scores(plan.criterion, plan.reduction, hidden=plan.hidden_ratio > 0)
    except ExplorerError as exc:
        return f"The plan is not drawn: {exc}"
    return plan_marks(loaded.structure, selection, scores, plan.criterion)
