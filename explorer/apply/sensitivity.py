"""Per-layer sensitivity: the measured damage of cutting one layer alone, at a grid of ratios.

For every layer and unit kind (query heads or kv groups, MLP channels, the whole layer) the plan
that cuts only that layer, at each ratio of the grid, is previewed: perplexity and the mean KL
divergence of the pruned next-token distribution from the dense one, on the preview windows. The
points run through one ``LivePreview``, so each costs only the layers from the cut one on (the
layers before it replay their kept states), with the plan's live recovery steps applied when
given: the damage measured is the damage of the model Export would write.

The points say where a cut is cheap; ``explorer.planning.plan``'s ``sensitivity`` allocation spends a
parameter budget on the cheapest measured damage (see ``allocate``).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field

import torch

from ..errors import PlanError
from ..model.structure import StructureMap
from ..planning.plan import Plan, allocate
from ..planning.selection import Selection, param_counts
from ..scoring.base import Scores
from .preview import LivePreview, Patch

KINDS = ("head", "kv", "mlp", "layer")
DEFAULT_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
Progress = Callable[[float, str], None]


@dataclass(frozen=True)
class Point:
    """One measured cut: ``removed`` of the layer's ``kind`` units (``share`` of them) gone."""

    layer: int
    kind: str
    ratio: float  # the grid ratio asked for
    removed: int  # units removed (query heads for "head")
    share: float  # removed / units of the layer
    params: int  # decoder-block parameters removed
    perplexity: float
    kl: float  # mean KL(dense || pruned) per predicted token, in nats


@dataclass
class Sensitivity:
    """A sweep's points and what they were measured on (the cache key is ``key``)."""

    criterion: str
    reduction: str
    kinds: list[str]
    ratios: list[float]
    windows: list[int]  # [count, length]
    steps: list[dict]  # the live recovery steps applied
    text: str = "held-out calibration"  # what the windows are cut from
    dense_perplexity: float = math.nan
    points: list[Point] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def key(self) -> str:
        meta = {k: v for k, v in asdict(self).items() if k not in ("points", "seconds")}
        meta.pop("dense_perplexity")
        meta["kinds"] = sorted(meta["kinds"])
        return json.dumps(meta, sort_keys=True)

    def curve(self, layer: int, kind: str) -> list[Point]:
        """The points of one layer and kind, by units removed."""
        return sorted(
            (p for p in self.points if p.layer == layer and p.kind == kind), key=lambda p: p.removed
        )

    # -- files --------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, d: dict) -> Sensitivity:
        try:
            points = [Point(**p) for p in d.get("points", [])]
            return cls(**{**d, "points": points})
        except TypeError as e:
            raise PlanError(f"Not a sensitivity file ({e}).") from e

    def to_csv(self) -> str:
        buf = io.StringIO()
        names = [f for f in Point.__dataclass_fields__]
        writer = csv.DictWriter(buf, fieldnames=names)
        writer.writeheader()
        for p in self.points:
            writer.writerow(asdict(p))
        return buf.getvalue()


def single_layer_plan(plan: Plan, s: StructureMap, layer: int, kind: str, ratio: float) -> Plan:
    """``plan`` reduced to cutting ``kind`` in ``layer`` alone, at ``ratio``."""
    zeros = [0.0] * s.num_layers
    ratios = list(zeros)
    ratios[layer] = ratio
    return Plan(
        model=plan.model,
        criterion=plan.criterion,
        reduction=plan.reduction,
        allocation="per_layer",
        target=None,
        head_ratios=ratios if kind in ("head", "kv") else zeros,
        mlp_ratios=ratios if kind == "mlp" else zeros,
        attention_unit="kv" if kind == "kv" else "head",
        remove_layers=[layer] if kind == "layer" else [],
    )


def _units(s: StructureMap, sel: Selection, layer: int, kind: str) -> tuple[int, int]:
    """(units removed, units in the layer) of ``kind``."""
    if kind == "layer":
        return int(layer in sel.layers), 1
    if kind == "mlp":
        return len(sel.mlp.get(layer, ())), s.intermediate
    if kind == "kv":
        return len(sel.kv.get(layer, ())), s.kv_heads
    return len(sel.heads.get(layer, ())), s.heads


def sweep(
    model: torch.nn.Module,
    structure: StructureMap,
    scores: Scores,
    windows: torch.Tensor,
    base: Plan,
    *,
    kinds: Sequence[str] = ("head", "mlp"),
    ratios: Sequence[float] = DEFAULT_RATIOS,
    compensation: Patch | None = None,
    progress: Progress | None = None,
    layers: Sequence[int] | None = None,
) -> Iterator[Point | float]:
    """Yield the dense perplexity, then every measured point as it is measured.

    Ratios that resolve to no unit or to every unit of a layer (not a model) are skipped, and a
    ratio that resolves to the same cut as the previous one repeats its numbers. ``layers``: only
    these (default: all).
    """
    s = structure
    for kind in kinds:
        if kind not in KINDS:
            raise PlanError(f"Unknown unit kind '{kind}'. Use one of {', '.join(KINDS)}.")
    live = LivePreview(model, s, windows, batch_size=1)
    dense_logits: list[torch.Tensor] = [torch.empty(0)] * live.num_batches
    kl = [0.0]  # summed over the positions of the current point

    def keep_dense(b: int, logits: torch.Tensor, ids: torch.Tensor) -> None:
        dense_logits[b] = logits.clone()

    def add_kl(b: int, logits: torch.Tensor, ids: torch.Tensor) -> None:
        kl[0] += mean_kl(dense_logits[b], logits) * ids.shape[0] * (ids.shape[1] - 1)

    yield live.perplexity(Selection(), compensation, keep_dense)
    tokens = windows.shape[0] * (windows.shape[1] - 1)
    every = range(s.num_layers) if layers is None else layers
    jobs = [(layer, kind) for layer in every for kind in kinds]
    grid = {kind: ((1.0,) if kind == "layer" else tuple(ratios)) for kind in kinds}
    total = sum(len(grid[kind]) for _, kind in jobs)
    done = 0
    for layer, kind in jobs:
        previous: tuple[Selection, Point] | None = None
        for ratio in grid[kind]:
            done += 1
            try:
                sel = allocate(single_layer_plan(base, s, layer, kind, ratio), s, scores)
            except PlanError:
                continue  # every unit of the layer: not a model
            removed, units = _units(s, sel, layer, kind)
            if removed == 0:
                continue
            if previous is not None and previous[0] == sel:
                point = Point(**{**asdict(previous[1]), "ratio": ratio})
            else:
                kl[0] = 0.0
                ppl = live.perplexity(sel, compensation, add_kl)
                params = param_counts(s, Selection())["blocks"] - param_counts(s, sel)["blocks"]
                point = Point(
                    layer, kind, ratio, removed, removed / units, params, ppl, kl[0] / tokens
                )
                previous = (sel, point)
            if progress is not None:
                progress(
                    done / total,
                    f"layer {layer} {kind} {point.share:.0%}: perplexity {point.perplexity:.2f}, "
                    f"KL {point.kl:.4f} ({done}/{total})",
                )
            yield point


def mean_kl(dense_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean KL(dense || pruned) over every position but the last (the ones perplexity scores)."""
    logp = dense_logits[:, :-1].float().log_softmax(-1)
    logq = logits[:, :-1].float().log_softmax(-1)
    return float((logp.exp() * (logp - logq)).sum(-1).mean())
