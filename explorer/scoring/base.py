"""The criterion type, what it reads (``ScoreContext``), and how per-weight scores become per-group.

A criterion turns the model's weights and the calibration ``Statistics`` into a score per unit
(higher = more important; the lowest go first). Scores are a dict ``kind -> tensor``:
``head``/``kv``/``mlp`` have shape (layers, units), ``hidden`` (hidden,) and ``layer`` (layers,).

Element-wise criteria give a score per weight; ``group_scores`` sums it over each unit's block in
every member parameter (a *slice score*), then reduces the slice scores of a group with ``sum``,
``prod``, ``max`` or ``last`` (the slice executed last), as in LLM-Pruner. Criteria that score
units directly (FLAP, the distribution-aware scores, LLM Surgeon) ignore the reduction.

New criteria are ``Criterion`` values listed in ``explorer.catalogue``; the CLI and the app list
the catalogue's ``CRITERIA`` and never name one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..model.families import get_module
from ..model.structure import Kind, StructureMap
from .statistics import Needs, Statistics

Scores = dict[Kind, torch.Tensor]
REDUCTIONS: tuple[str, ...] = ("sum", "prod", "max", "last")
# Scored for every plan; hidden channels only on demand (they cost a pass over the embeddings).
SCORED_KINDS: tuple[Kind, ...] = ("head", "kv", "mlp", "layer")


@dataclass(frozen=True)
class ScoreContext:
    """Everything a criterion may read."""

    model: nn.Module
    structure: StructureMap
    stats: Statistics | None
    reduction: str = "sum"
    seed: int = 0
    kinds: tuple[Kind, ...] = SCORED_KINDS
    progress: Callable[[float, str], None] | None = None  # scoring after the pass reports here

    def report(self, fraction: float, message: str) -> None:
        """Progress of a criterion's own work (factor inverses, greedy walks), when asked for."""
        if self.progress is not None:
            self.progress(fraction, message)

    def weight(self, path: str, param: str = "weight") -> torch.Tensor:
        return read_weight(get_module(self.model, path), param)

    @property
    def device(self) -> torch.device:
        """Where scores live: the device of the embedding (the first module of the model)."""
        return get_module(self.model, self.structure.family.embed).weight.device


def score_shape(structure: StructureMap, kind: Kind) -> tuple[int, ...]:
    """Shape of the scores of ``kind``: (layers, units) per layer, (units,) model-wide."""
    if kind in ("hidden", "layer"):
        return (structure.units(kind),)
    return (structure.num_layers, structure.units(kind))


@dataclass(frozen=True)
class Criterion:
    """A registered importance criterion. ``score`` returns Scores for ``ctx.kinds``."""

    name: str
    title: str
    formula: str
    score: Callable[[ScoreContext], Scores]
    needs: Needs = field(default_factory=Needs)
    uses_reduction: bool = True
    paper: str = ""


def read_weight(module: nn.Module, param: str = "weight") -> torch.Tensor:
    """``module.<param>`` as a real tensor, also when accelerate has offloaded it (meta device).

    Offloaded modules (see ``explorer.scoring.offload``) keep their weights in accelerate's store and put
    them back only while they run; criteria read them from the store instead.
    """
    value = getattr(module, param)
    if not value.is_meta:
        return value.detach()
    hook = getattr(module, "_hf_hook", None)
    if hook is None or getattr(hook, "weights_map", None) is None:
        raise RuntimeError(f"'{param}' is on the meta device and no offload store holds it")
    return hook.weights_map[param].to(hook.execution_device, value.dtype)


# -- from per-weight scores to per-group scores ------------------------------------------------------
def slice_scores(per_weight: torch.Tensor, dim: int, block: int) -> torch.Tensor:
    """Sum a per-weight score over each unit's block along ``dim``: shape (units,)."""
    moved = per_weight.movedim(dim, 0)
    return moved.reshape(moved.shape[0] // block, -1).sum(1)


def reduce(slice_scores_: list[torch.Tensor], reduction: str) -> torch.Tensor:
    """Combine the slice scores of a group kind (each of shape (units,)) into one per unit."""
    stacked = torch.stack(slice_scores_)
    if reduction == "sum":
        return stacked.sum(0)
    if reduction == "prod":
        return stacked.prod(0)
    if reduction == "max":
        return stacked.max(0).values
    if reduction == "last":
        return stacked[-1]
    raise ValueError(f"unknown reduction '{reduction}'; choose one of {REDUCTIONS}")


PerWeight = Callable[[str, str], torch.Tensor | None]


def group_scores(
    ctx: ScoreContext,
    per_weight: PerWeight,
    per_slice: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Scores:
    """Scores of every kind in ``ctx.kinds`` from a per-weight score function.

    ``per_weight(module_path, param)`` returns a tensor shaped like that parameter (or None to skip
    the member, e.g. biases for a criterion that ignores them). ``per_slice`` maps each slice's
    summed score before the reduction (LLM-Pruner's vector-wise Taylor takes ``abs`` there, so the
    sum sits inside the absolute value). A whole layer is scored as one slice made of every
    parameter of the block (weights, biases and norms), since depth pruning removes all of them.
    """
    s = ctx.structure
    finish = per_slice or (lambda x: x)
    out: Scores = {}
    for kind in ctx.kinds:
        if kind == "layer":
            out[kind] = torch.stack(
                [finish(_block_score(ctx, i, per_weight)) for i in range(s.num_layers)]
            )
            continue
        layers = [None] if kind == "hidden" else range(s.num_layers)
        rows = []
        for layer in layers:
            parts = []
            for m in s.members(kind, layer):
                w = per_weight(m.module, m.param)
                if w is not None:
                    parts.append(finish(slice_scores(w.float(), m.dim, m.block)).to(ctx.device))
            rows.append(reduce(parts, ctx.reduction))
        out[kind] = rows[0] if kind == "hidden" else torch.stack(rows)
    return out


def _block_score(ctx: ScoreContext, layer: int, per_weight: PerWeight) -> torch.Tensor:
    """Sum of every per-weight score of one decoder block (members scored None are skipped)."""
    path = ctx.structure.layer_path(layer)
    total = torch.zeros((), device=ctx.device)
    for name, _ in get_module(ctx.model, path).named_parameters():
        module, _, param = f"{path}.{name}".rpartition(".")
        w = per_weight(module, param)
        if w is not None:
            total = total + w.float().sum().to(ctx.device)
    return total
