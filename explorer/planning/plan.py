"""Plans: the recipe (JSON) that says how much to cut where, and its allocation into a selection.

A plan names the model, the data, the criterion and an *allocation*:

- ``uniform``: the same head and MLP ratios in every layer except the protected first/last ones.
  With only ``target`` given, both ratios are equal (LLM-Pruner's default) and the MLP count is
  then adjusted so that exactly ``target`` of the decoder-block parameters go despite the coarse
  head granularity.
- ``per_layer``: ``head_ratios[l]`` and ``mlp_ratios[l]``, set by hand (the app's sliders).
- ``global``: one ranking over every head slot and MLP channel of the unprotected layers, by score
  per parameter, removing the cheapest until ``target`` of the block parameters are gone. The
  sizes per layer then follow from the scores.
- ``sensitivity``: per-layer sizes from a measured sensitivity sweep (``explorer.sensitivity``):
  the cheapest measured damage per parameter is spent first until ``target`` is met (see
  ``_allocate_sensitivity``); within a layer the criterion's scores pick the units.

Heads are removed either as query heads taken evenly from every kv group (``attention_unit="head"``:
``num_attention_heads / num_key_value_heads`` stays an integer) or as whole kv groups (``"kv"``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Literal, Protocol

import torch

from ..errors import PlanError
from ..model.structure import StructureMap
from ..scoring.base import REDUCTIONS, Scores
from .checks import check_layers, check_types
from .selection import Selection, param_counts


class Sweep(Protocol):
    """What the sensitivity allocation reads of a sweep (``explorer.apply.sensitivity``)."""

    dense_perplexity: float

    def curve(self, layer: int, kind: str) -> Sequence:
        """The measured points (``removed``, ``kl``, ``perplexity``) of one layer and kind."""
        ...


Allocation = Literal["uniform", "per_layer", "global", "sensitivity"]
ALLOCATIONS: tuple[str, ...] = ("uniform", "per_layer", "global", "sensitivity")
PLAN_VERSION = 1


@dataclass
class Plan:
    """A pruning recipe. ``to_json``/``from_json`` round-trip it exactly."""

    model: str = "smollm2-135m"
    criterion: str = "taylor"
    reduction: str = "sum"
    allocation: Allocation = "uniform"
    target: float | None = 0.2  # share of decoder-block parameters to remove
    head_ratio: float | None = None  # uniform: share of query heads (or kv groups) per layer
    mlp_ratio: float | None = None  # uniform: share of MLP channels per layer
    head_ratios: list[float] | None = None  # per_layer
    mlp_ratios: list[float] | None = None  # per_layer
    attention_unit: Literal["head", "kv"] = "head"
    protect_first: int = 0
    protect_last: int = 0
    round_to: int = 1  # kept MLP channels rounded up to a multiple of this
    max_ratio: float | None = None  # global: at most this share of any layer's heads / channels
    remove_layers: list[int] = field(default_factory=list)
    hidden_ratio: float = 0.0
    calibration: dict = field(default_factory=lambda: {"kind": "builtin"})
    evaluation: dict = field(default_factory=lambda: {"kind": "builtin"})
    calibration_windows: int = 10
    calibration_length: int = 64
    seed: int = 0
    recovery: list[dict] = field(default_factory=list)
    # sensitivity allocation: the sweep's grid, preview windows and the damage it minimises
    sensitivity_ratios: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])
    sensitivity_windows: int = 4
    sensitivity_metric: str = "kl"
    version: int = PLAN_VERSION

    def check(self, num_layers: int | None = None, criteria: Collection[str] | None = None) -> None:
        """Raise ``PlanError`` for anything out of range, before any work is done.

        ``criteria`` are the names the criterion must be one of (the catalogue's ``CRITERIA``,
        which sits above this module); a plan read from JSON alone is checked without them.
        """
        check_types(self)
        if criteria is not None and self.criterion not in criteria:
            raise PlanError(
                f"Unknown criterion '{self.criterion}'. Choose one of: {', '.join(criteria)}."
            )
        if self.reduction not in REDUCTIONS:
            raise PlanError(f"Unknown reduction '{self.reduction}'. Choose one of: {REDUCTIONS}.")
        if self.allocation not in ALLOCATIONS:
            raise PlanError(
                f"Unknown allocation '{self.allocation}'. Use one of: {', '.join(ALLOCATIONS)}."
            )
        if self.attention_unit not in ("head", "kv"):
            raise PlanError("attention_unit must be 'head' or 'kv'.")
        for name in ("target", "head_ratio", "mlp_ratio", "hidden_ratio", "max_ratio"):
            _check_ratio(name, getattr(self, name))
        for name in ("head_ratios", "mlp_ratios"):
            values = getattr(self, name)
            for i, r in enumerate(values or []):
                _check_ratio(f"{name}[{i}]", r)
            if values is not None and num_layers is not None and len(values) != num_layers:
                raise PlanError(
                    f"{name} has {len(values)} entries but the model has {num_layers} layers. "
                    "Give one ratio per layer."
                )
        if self.allocation == "per_layer" and self.head_ratios is None and self.mlp_ratios is None:
            raise PlanError("A per_layer plan needs head_ratios and/or mlp_ratios.")
        if self.allocation in ("global", "sensitivity") and self.target is None:
            raise PlanError(
                f"A {self.allocation} plan needs a target share of parameters to remove."
            )
        if self.sensitivity_metric not in ("kl", "perplexity"):
            raise PlanError("sensitivity_metric must be 'kl' or 'perplexity'.")
        for r in self.sensitivity_ratios:
            _check_ratio("sensitivity_ratios", r)
        if self.round_to < 1:
            raise PlanError("round_to must be a positive whole number (1, 8, 32, 64).")
        if self.protect_first < 0 or self.protect_last < 0:
            raise PlanError("protect_first and protect_last must be zero or more.")
        if self.calibration == self.evaluation and self.calibration.get("kind") != "builtin":
            raise PlanError(
                "Calibration and evaluation text are the same; evaluate on held-out text."
            )
        if num_layers is not None:
            check_layers(self, num_layers)

    # -- JSON --------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        if not isinstance(d, dict):
            raise PlanError("A plan must be a JSON object.")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise PlanError(f"Unknown plan field(s): {', '.join(unknown)}. Check the spelling.")
        if d.get("version", PLAN_VERSION) != PLAN_VERSION:
            raise PlanError(f"Plan version {d['version']} is not supported (expected 1).")
        plan = cls(**d)
        plan.check()
        return plan

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise PlanError(f"The plan is not valid JSON ({e.msg} at line {e.lineno}).") from e
        return cls.from_dict(d)

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        p = Path(path)
        if not p.is_file():
            raise PlanError(f"No plan file at {p}. Give the path of a saved plan.json.")
        return cls.from_json(p.read_text())

    def save(self, path: str | Path) -> None:
        try:
            Path(path).write_text(self.to_json())
        except OSError as exc:
            raise PlanError(f"Could not save the plan to '{path}' ({exc.strerror}).") from exc


def _check_ratio(name: str, value: float | None) -> None:
    if value is None:
        return
    if not isinstance(value, int | float) or not 0.0 <= value <= 1.0 or math.isnan(value):
        raise PlanError(f"{name} = {value} is out of range; use a share between 0 and 1.")


# -- allocation -----------------------------------------------------------------------------------
def pruned_layers(plan: Plan, structure: StructureMap) -> list[int]:
    """Layers a uniform or global plan may cut: not protected, not removed whole."""
    last = structure.num_layers - plan.protect_last
    return [i for i in range(plan.protect_first, last) if i not in plan.remove_layers]


def allocate(
    plan: Plan, structure: StructureMap, scores: Scores, sensitivity: Sweep | None = None
) -> Selection:
    """Which units go under ``plan``, given importance ``scores`` (lowest go first).

    A ``sensitivity`` plan also needs the measured ``sensitivity`` sweep.
    """
    plan.check(structure.num_layers)
    layers = sorted(set(plan.remove_layers))
    # transformers requires hidden_size to stay a multiple of the head count: keep rounded up.
    n_hidden = _removal_count(
        plan.hidden_ratio * structure.hidden, structure.hidden, structure.heads
    )
    hidden = _lowest(scores, "hidden", n_hidden) if n_hidden else []
    if plan.allocation == "global":
        heads, kv, mlp = _allocate_global(plan, structure, scores)
    elif plan.allocation == "sensitivity":
        if sensitivity is None:
            raise PlanError("A sensitivity plan needs a measured sensitivity sweep. Run it first.")
        heads, kv, mlp = _allocate_sensitivity(plan, structure, scores, sensitivity)
    else:
        heads, kv, mlp = {}, {}, {}
        for layer, head_r, mlp_r in _layer_ratios(plan, structure):
            _cut_attention(plan, structure, scores, layer, head_r, heads, kv)
            n_mlp = _removal_count(
                mlp_r * structure.intermediate, structure.intermediate, plan.round_to
            )
            mlp[layer] = _lowest_in_layer(scores, "mlp", layer, n_mlp)
        if plan.allocation == "uniform" and plan.target is not None and plan.mlp_ratio is None:
            mlp = _fit_mlp_to_target(plan, structure, scores, heads, kv, layers, hidden)
    return Selection.make(structure, heads=heads, kv=kv, mlp=mlp, hidden=hidden, layers=layers)


def _layer_ratios(plan: Plan, s: StructureMap) -> list[tuple[int, float, float]]:
    if plan.allocation == "per_layer":
        n = s.num_layers
        heads = plan.head_ratios or [0.0] * n
        mlps = plan.mlp_ratios or [0.0] * n
        return [(i, heads[i], mlps[i]) for i in range(n) if i not in plan.remove_layers]
    layers = pruned_layers(plan, s)
    if plan.head_ratio is not None or plan.mlp_ratio is not None:
        return [(i, plan.head_ratio or 0.0, plan.mlp_ratio or 0.0) for i in layers]
    # Spread the target over the unprotected layers (check_layers refused a share above 1).
    share = (plan.target or 0.0) * s.num_layers / max(len(layers), 1)
    return [(i, share, share) for i in layers]


def _cut_attention(plan, s, scores, layer, ratio, heads, kv) -> None:
    if plan.attention_unit == "kv":
        n = round(ratio * s.kv_heads)
        if n:
            kv[layer] = _lowest_in_layer(scores, "kv", layer, n)
        return
    per_group = round(ratio * s.group_size)
    if per_group:
        heads[layer] = _heads_evenly(scores, s, layer, per_group)


def _heads_evenly(scores: Scores, s: StructureMap, layer: int, per_group: int) -> list[int]:
    """The ``per_group`` lowest-scoring query heads of every kv group."""
    out = []
    row = scores["head"][layer]
    for g in range(s.kv_heads):
        members = list(range(g * s.group_size, (g + 1) * s.group_size))
        order = sorted(members, key=lambda h: (float(row[h]), h))
        out += order[:per_group]
    return out


def _removal_count(n_remove: float, width: int, round_to: int) -> int:
    """Channels to remove so that the kept width is a multiple of ``round_to`` (rounded up)."""
    kept = width - round(n_remove)
    kept = min(width, math.ceil(kept / round_to) * round_to) if kept > 0 else 0
    return width - kept


def _lowest(scores: Scores, kind: str, n: int) -> list[int]:
    if kind not in scores:
        raise PlanError(
            f"The chosen criterion does not score {kind} units. Pick another criterion."
        )
    return _argsort(scores[kind])[:n]


def _lowest_in_layer(scores: Scores, kind: str, layer: int, n: int) -> list[int]:
    if n <= 0:
        return []
    if kind not in scores:
        raise PlanError(f"The chosen criterion does not score {kind} units. Pick another one.")
    return _argsort(scores[kind][layer])[:n]


def _argsort(v: torch.Tensor) -> list[int]:
    """Ascending, ties broken by index, so resolution is deterministic."""
    return sorted(range(v.numel()), key=lambda i: (float(v[i]), i))


def _fit_mlp_to_target(plan, s, scores, heads, kv, layers, hidden) -> dict[int, list[int]]:
    """Uniform MLP cut that, with the heads already chosen, removes ``target`` of block params."""
    goal = (1.0 - plan.target) * s.block_params
    attn = Selection.make(s, heads=heads, kv=kv, hidden=hidden, layers=layers)
    excess = param_counts(s, attn)["blocks"] - goal
    cut = pruned_layers(plan, s)
    per_channel = 3 * (s.hidden - len(hidden)) + s.bias[s.family.gate] + s.bias[s.family.up]
    n = max(0.0, excess / per_channel / max(len(cut), 1))
    n_mlp = _removal_count(min(n, s.intermediate - 1), s.intermediate, plan.round_to)
    return {layer: _lowest_in_layer(scores, "mlp", layer, n_mlp) for layer in cut}


def _allocate_global(plan: Plan, s: StructureMap, scores: Scores):
    """Remove the cheapest units (score per parameter) across layers until the target is met.

    Within a layer, units are offered in ascending score order (for query heads: one more head
    from every kv group per slot), so their costs ascend too and a sort by cost never takes a
    unit before a cheaper one of the same layer. Each layer keeps at least one head per kv group
    (or one kv group) and ``round_to`` MLP channels; ``max_ratio`` caps the share of a layer's
    heads and channels that may go (scores are rarely comparable enough across layers to let a
    ranking gut one), and ``head_ratio`` 0 keeps every head.
    """
    cap = 1.0 if plan.max_ratio is None else plan.max_ratio
    cut_heads = plan.head_ratio != 0
    candidates: list[tuple[float, int, str, list[int]]] = []
    for layer in pruned_layers(plan, s):
        if cut_heads and plan.attention_unit == "kv":
            per = s.group_params("kv")
            most = min(s.kv_heads - 1, math.floor(cap * s.kv_heads))
            for g in _argsort(scores["kv"][layer])[:most]:
                candidates.append((float(scores["kv"][layer][g]) / per, layer, "kv", [g]))
        elif cut_heads:
            previous: list[int] = []
            for k in range(1, min(s.group_size - 1, math.floor(cap * s.group_size)) + 1):
                heads = _heads_evenly(scores, s, layer, k)
                new = [h for h in heads if h not in previous]
                score = sum(float(scores["head"][layer][h]) for h in new)
                candidates.append((score / (len(new) * s.group_params("head")), layer, "head", new))
                previous = heads
        per = s.group_params("mlp")
        most = min(s.intermediate - plan.round_to, math.floor(cap * s.intermediate))
        for c in _argsort(scores["mlp"][layer])[:most]:
            candidates.append((float(scores["mlp"][layer][c]) / per, layer, "mlp", [c]))
    candidates.sort(key=lambda c: c[0])
    budget = (plan.target or 0.0) * s.block_params
    removed = 0
    taken: dict[str, dict[int, list[int]]] = {"head": {}, "kv": {}, "mlp": {}}
    for _, layer, kind, units in candidates:
        if removed >= budget:
            break
        taken[kind].setdefault(layer, []).extend(units)
        removed += len(units) * s.group_params(kind)
    mlp = {
        layer: chans[: _removal_count(len(chans), s.intermediate, plan.round_to)]
        for layer, chans in taken["mlp"].items()
    }
    return taken["head"], taken["kv"], mlp


def _allocate_sensitivity(plan: Plan, s: StructureMap, scores: Scores, sens: Sweep):
    """Spend the parameter budget on the cheapest measured damage per parameter.

    Each (layer, kind) curve — no cut, then the measured cuts, damage made non-decreasing — is
    replaced by its lower convex hull, so its segments come in ascending damage per parameter and
    a greedy choice by that slope over all segments solves the relaxed problem (damages assumed
    additive, interpolated linearly between measured ratios) optimally; a dynamic programme over
    the grid would need the ratios to be the only choices, which would miss the target by up to
    a grid step per layer. Attention segments are taken whole (a head count is coarse) and only
    when they fit; the MLP segment that crosses the budget is cut to the channel, so the target
    is met as the global allocation meets it: removed >= target, one channel fewer would miss.
    """
    attention = "kv" if plan.attention_unit == "kv" else "head"
    kinds = ["mlp"] + ([attention] if plan.head_ratio != 0 else [])
    segments: list[tuple[float, int, str, int, int]] = []  # slope, layer, kind, from, to units
    for layer in pruned_layers(plan, s):
        for kind in kinds:
            curve = [(0, 0.0)]
            for p in sens.curve(layer, kind):
                damage = p.kl if plan.sensitivity_metric == "kl" else p.perplexity
                if plan.sensitivity_metric == "perplexity":
                    damage -= sens.dense_perplexity
                if p.removed > curve[-1][0]:  # two ratios may round to the same cut
                    curve.append((p.removed, max(damage, curve[-1][1])))
            per = s.group_params("head" if kind == "head" else kind)
            for (u0, d0), (u1, d1) in _lower_hull(curve):
                segments.append(((d1 - d0) / ((u1 - u0) * per), layer, kind, u0, u1))
    if not segments:
        raise PlanError(
            "The sensitivity sweep has no points for the layers this plan may cut. Run the sweep "
            "for its criterion and unit kinds."
        )
    segments.sort(key=lambda seg: seg[0])
    budget = (plan.target or 0.0) * s.block_params
    counts: dict[tuple[int, str], int] = {}
    removed = 0.0
    for _, layer, kind, u0, u1 in segments:
        if removed >= budget:
            break
        if counts.get((layer, kind), 0) != u0:
            continue  # an earlier segment of this curve was skipped
        per = s.group_params("head" if kind == "head" else kind)
        if kind != "mlp" and removed + (u1 - u0) * per > budget:
            continue
        take = u1 - u0 if kind != "mlp" else min(u1 - u0, math.ceil((budget - removed) / per))
        counts[(layer, kind)] = u0 + take
        removed += take * per
    if removed < budget:
        raise PlanError(
            f"The measured cuts remove at most {removed / s.block_params:.1%} of the block "
            "parameters. Add larger ratios to the sweep or lower the target."
        )
    heads, kv, mlp = {}, {}, {}
    for (layer, kind), n in counts.items():
        if kind == "mlp":
            mlp[layer] = _lowest_in_layer(scores, "mlp", layer, n)
        elif kind == "kv":
            kv[layer] = _lowest_in_layer(scores, "kv", layer, n)
        else:
            heads[layer] = _heads_evenly(scores, s, layer, n // s.kv_heads)
    return heads, kv, mlp


def _lower_hull(curve: list[tuple[int, float]]) -> list[tuple[tuple[int, float], ...]]:
    """Segments of the lower convex hull of points sorted by x (x strictly increasing)."""
    hull: list[tuple[int, float]] = []
    for point in curve:
        while len(hull) >= 2:
            (x0, y0), (x1, y1) = hull[-2], hull[-1]
            if (y1 - y0) * (point[0] - x0) >= (point[1] - y0) * (x1 - x0):
                hull.pop()  # hull[-1] lies on or above the chord: not on the lower hull
            else:
                break
        hull.append(point)
    return list(zip(hull, hull[1:], strict=False))
