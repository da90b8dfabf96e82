"""LLM Surgeon (van der Ouderaa et al., ICLR 2024, arXiv 2312.17244), structured.

Each linear module's loss curvature is approximated by a Kronecker product F ≈ G ⊗ A of the input
covariance A = E[x xᵀ] and the output-gradient covariance G = E[g gᵀ], each damped by
``damping`` · mean(diag). Removing row r (an output channel) or column c (an input channel) at the
least loss, letting every other weight move, costs

    L_r = ½ W_r A W_rᵀ / [G⁻¹]_rr        L_c = ½ W_:,cᵀ G W_:,c / [A⁻¹]_cc

and the weights that stay move by the closed-form correlated update

    rows R:    ΔW = −G⁻¹ E_R ([G⁻¹]_RR)⁻¹ W_R        columns C:  ΔW = −W_:,C ([A⁻¹]_CC)⁻¹ (A⁻¹)_C,:

(the minimiser of ½ vec(ΔW)ᵀ (G ⊗ A) vec(ΔW) with the removed entries driven to zero; with both
rows and columns the two updates applied one after the other give the joint minimiser, since the
quadratic separates). A coupled group's cost is the sum over its members: rows of q/k/v/gate/up,
columns of o/down (and, for hidden channels, the transposed roles).

A coupled removal is compensated where the unit is *read* (the column update of ``o_proj``,
``down_proj``, or for hidden channels q/k/v/gate/up), which needs only A; the rows it owns in the
modules that write it are sliced without an update (see ``Curvature.apply`` for the measurement
behind that default; the row update stays available).

Multi-shot (``surgeon_prune``): the target is reached in T shots; each shot re-estimates A and G on
the partly pruned model, removes a further share of the units and applies the update, so later
removals see the weights that absorbed the earlier ones.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from functools import cached_property

import torch
from torch import nn

from .criteria import require_stats as require
from .families import get_module
from .importance import Criterion, Needs, ScoreContext, Scores, get_criterion, register
from .masking import masked
from .pruning import prune_model
from .recovery import RecoveryContext, RecoveryStep, register_step, removed_indices
from .selection import Selection
from .statistics import Statistics, collect_statistics
from .structure import Kind, StructureMap

PAPER = "LLM Surgeon (van der Ouderaa et al., ICLR 2024, arXiv 2312.17244)"
ROLES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# k/v read q's input and up reads gate's, so four input covariances cover the seven modules.
SURGEON_NEEDS = Needs(
    covariance=("down_proj", "gate_proj", "o_proj", "q_proj"), output_gradient_covariance=ROLES
)
# The column updates (the default) read only the input covariances.
UPDATE_NEEDS = Needs(covariance=SURGEON_NEEDS.covariance)
Progress = Callable[[float, str], None]
Resolver = Callable[[Scores], Selection]


def damped(matrix: torch.Tensor, damping: float = 0.01) -> torch.Tensor:
    """M + damping · mean(diag M) · I, in float64 (the factors are inverted)."""
    m = matrix.double()
    eye = torch.eye(m.shape[0], dtype=m.dtype, device=m.device)
    return m + damping * m.diagonal().mean().clamp_min(1e-12) * eye


def inverse_diagonal(m: torch.Tensor) -> torch.Tensor:
    """diag(M⁻¹) of a symmetric positive definite ``m`` from its Cholesky factor.

    ‖L⁻¹ eᵢ‖² = [M⁻¹]ᵢᵢ for M = L Lᵀ: a third of the work of a full inverse, and the costs need
    only the diagonal.
    """
    chol = torch.linalg.cholesky(m)
    eye = torch.eye(m.shape[0], dtype=m.dtype, device=m.device)
    return torch.linalg.solve_triangular(chol, eye, upper=False).square().sum(0)


def row_costs(weight: torch.Tensor, a: torch.Tensor, g_inv_diag: torch.Tensor) -> torch.Tensor:
    """L_r = ½ W_r A W_rᵀ / [G⁻¹]_rr for every row of ``weight``."""
    w = weight.double()
    return 0.5 * ((w @ a) * w).sum(1) / g_inv_diag


def column_costs(weight: torch.Tensor, g: torch.Tensor, a_inv_diag: torch.Tensor) -> torch.Tensor:
    """L_c = ½ W_:,cᵀ G W_:,c / [A⁻¹]_cc for every column of ``weight``."""
    w = weight.double()
    return 0.5 * ((g @ w) * w).sum(0) / a_inv_diag


def removal_costs(
    weight: torch.Tensor, a: torch.Tensor, g: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_r per row, L_c per column) of ``weight`` under the damped factors ``a`` and ``g``."""
    return (
        row_costs(weight, a, inverse_diagonal(g)),
        column_costs(weight, g, inverse_diagonal(a)),
    )


def surgeon_update(
    weight: torch.Tensor,
    a: torch.Tensor,
    g: torch.Tensor | None,
    rows: Sequence[int] | None = None,
    cols: Sequence[int] | None = None,
) -> torch.Tensor:
    """``weight`` after removing ``rows`` and ``cols`` with the correlated update (float64).

    The removed entries come out exactly zero; every other weight moves to absorb the loss
    under the curvature G ⊗ A (``a`` and ``g`` already damped).
    """
    w = weight.double()
    if rows:
        r = torch.tensor(list(rows), device=w.device)
        g_inv = torch.linalg.inv(g.double())
        w = w - g_inv[:, r] @ torch.linalg.solve(g_inv[r][:, r], w[r])
        w[r] = 0
    if cols:
        c = torch.tensor(list(cols), device=w.device)
        a_inv = torch.linalg.inv(a.double())
        w = w - w[:, c] @ torch.linalg.solve(a_inv[c][:, c], a_inv[c])
        w[:, c] = 0
    return w


def column_update(
    structure: StructureMap,
    stats: Statistics,
    layer: int,
    name: str,
    weight: torch.Tensor,
    cols: Sequence[int],
    damping: float = 0.01,
) -> torch.Tensor:
    """Module ``name`` of ``layer`` after the correlated update that removes its columns ``cols``.

    Needs only the damped input covariance A (``UPDATE_NEEDS``): the update the ``surgeon`` step
    applies to the reader of a removed unit, and the one the live preview applies (float64 out).
    """
    return surgeon_update(
        weight, input_factor(structure, stats, layer, name, damping), None, None, cols
    )


def input_factor(
    structure: StructureMap, stats: Statistics, layer: int, name: str, damping: float = 0.01
) -> torch.Tensor:
    """Damped A of module ``name`` (float64, not kept: the factors are big).

    k/v read q's input and up reads gate's, so their covariance is the one collected there.
    """
    f = structure.family
    source = {f.k: f.q, f.v: f.q, f.up: f.gate}.get(name, name)
    return damped(stats.cov(structure.path(layer, source)), damping)


# -- the factors of one model --------------------------------------------------------------------------
class Curvature:
    """Damped Kronecker factors and removal costs of every linear module, computed on demand."""

    def __init__(
        self, model: nn.Module, structure: StructureMap, stats: Statistics, damping: float = 0.01
    ):
        self.model, self.structure, self.stats, self.damping = model, structure, stats, damping
        self._costs: dict[tuple[int, str, int], torch.Tensor] = {}

    def _a(self, layer: int, name: str) -> torch.Tensor:
        return input_factor(self.structure, self.stats, layer, name, self.damping)

    def _g(self, layer: int, name: str) -> torch.Tensor:
        return damped(self.stats.grad_cov(self.structure.path(layer, name)), self.damping)

    def costs(self, layer: int, name: str, dim: int) -> torch.Tensor:
        """Row (``dim`` 0) or column (1) costs of module ``name`` of ``layer``, cached.

        Only the side asked for is computed: a head or MLP channel reads rows of the writers and
        columns of the readers, so the other side (needed for hidden channels) is skipped.
        """
        key = (layer, name, dim)
        if key not in self._costs:
            weight = get_module(self.model, self.structure.path(layer, name)).weight.detach()
            a, g = self._a(layer, name), self._g(layer, name)
            if dim == 0:
                self._costs[key] = row_costs(weight, a, inverse_diagonal(g))
            else:
                self._costs[key] = column_costs(weight, g, inverse_diagonal(a))
        return self._costs[key]

    @cached_property
    def _linear_names(self) -> dict[str, tuple[int, str]]:
        s = self.structure
        return {s.path(i, n): (i, n) for i in range(s.num_layers) for n in s.family.linears}

    def member_costs(self, module: str, dim: int, block: int) -> torch.Tensor | None:
        """Cost per unit of a member (rows for dim 0, columns for dim 1); None off the linears."""
        if module not in self._linear_names:
            return None
        return self.costs(*self._linear_names[module], dim).reshape(-1, block).sum(1)

    def scores(
        self, kinds: Sequence[Kind], device: torch.device, progress: Progress | None = None
    ) -> Scores:
        """Group costs: the sum of their members' row and column costs (a layer: all of them)."""
        s = self.structure
        out: Scores = {}
        for i, kind in enumerate(kinds):
            if kind == "hidden":
                out[kind] = self._sum_members(s.members("hidden")).float().to(device)
                continue
            rows = []
            for layer in range(s.num_layers):
                if progress is not None:
                    done = (i + layer / s.num_layers) / len(kinds)
                    progress(done, f"surgeon: factor inverses, {kind} costs of layer {layer + 1}")
                rows.append(
                    self._layer_cost(layer)
                    if kind == "layer"
                    else self._sum_members(s.members(kind, layer))
                )
            out[kind] = torch.stack(rows).float().to(device)
        return out

    def _sum_members(self, members) -> torch.Tensor:
        parts = (
            self.member_costs(m.module, m.dim, m.block) for m in members if m.param == "weight"
        )
        return sum(p for p in parts if p is not None)

    def _layer_cost(self, layer: int) -> torch.Tensor:
        f = self.structure.family
        total = sum(self.costs(layer, n, 0).sum() for n in (f.q, f.k, f.v, f.gate, f.up))
        return total + sum(self.costs(layer, n, 1).sum() for n in (f.o, f.down))

    @torch.no_grad()
    def apply(
        self, selection: Selection, previous: Selection | None = None, *, rows: bool = False
    ) -> None:
        """Update every kept module that ``selection`` removes more from than ``previous``.

        By default only the modules that *read* a removed unit move (columns: ``o_proj`` for
        heads, ``down_proj`` for MLP channels, q/k/v/gate/up for hidden channels), by the
        A-based column update; the rows a unit owns in the modules that *write* it are simply
        sliced, since once its reader ignores it they carry no loss. ``rows=True`` also applies
        the G-based row update to the writers, as a per-module reading of the paper would; on
        SmolLM2-135M at 20% that turned a perplexity of 108 (columns only) into 10⁵: G estimated
        from a few thousand tokens is too noisy to invert. The columns and rows passed are all
        those removed so far, so that weights removed in earlier shots stay at zero.
        """
        s = self.structure
        previous = previous or Selection()

        def removed(sel: Selection, path: str) -> tuple[list[int], list[int]]:
            return removed_indices(s, sel, path, 0) if rows else [], removed_indices(
                s, sel, path, 1
            )

        for layer in selection.kept_layers(s):
            for name in s.family.linears:
                path = s.path(layer, name)
                now = removed(selection, path)
                if now == removed(previous, path):
                    continue
                weight = get_module(self.model, path).weight
                g = self._g(layer, name) if rows else None
                updated = surgeon_update(weight, self._a(layer, name), g, *now)
                weight.copy_(updated.to(weight.dtype))


def _surgeon(ctx: ScoreContext) -> Scores:
    stats = require(ctx, "surgeon", SURGEON_NEEDS)
    return Curvature(ctx.model, ctx.structure, stats).scores(ctx.kinds, ctx.device, ctx.report)


# -- multi-shot ----------------------------------------------------------------------------------------
def surgeon_prune(
    model: nn.Module,
    structure: StructureMap,
    target: Selection | Resolver,
    windows: torch.Tensor,
    *,
    shots: int = 1,
    damping: float = 0.01,
    kinds: Sequence[Kind] = ("head", "kv", "mlp", "layer"),
    update_rows: bool = False,
    criterion: str = "surgeon",
    batch_size: int = 1,
    progress: Progress | None = None,
    stats: Statistics | None = None,
) -> tuple[nn.Module, Selection]:
    """Prune a copy of ``model`` to ``target`` in ``shots`` shots; (pruned model, selection).

    ``target`` is the final ``Selection``, or a resolver ``scores -> Selection`` (e.g. a plan's
    ``resolve``) that each shot calls with that shot's costs, the units already removed scored
    −inf so that it keeps them. Shot t of T collects A and G on the partly pruned model (masked,
    with the weights updated so far), removes the cheapest units of the target until t/T of each
    kind and layer are gone, and applies the correlated update for everything removed so far.
    ``shots=1`` is one-shot LLM Surgeon. ``update_rows``: see ``Curvature.apply``. ``criterion``
    scores each shot (a registered name: ``surgeon``'s costs, or e.g. the greedy ``obs``, whose
    order matches the column update; ``damping`` applies to the update). ``model`` itself is left
    untouched. ``stats``: the dense model's statistics, used instead of a new pass when one shot
    to a known selection needs nothing more (the live preview reads the same, so the two agree).
    """
    if shots < 1:
        raise ValueError("shots must be at least 1")
    s = structure
    work = copy.deepcopy(model)
    current = Selection()
    # One shot to a known selection needs no costs: only the factors its updates read.
    one_shot = shots == 1 and isinstance(target, Selection)
    scorer = get_criterion(criterion)
    needs = UPDATE_NEEDS | (SURGEON_NEEDS if update_rows else Needs())
    needs = needs if one_shot else needs | scorer.needs
    for shot in range(1, shots + 1):

        def report(fraction: float, message: str, shot: int = shot) -> None:
            if progress is not None:
                progress((shot - 1 + fraction) / shots, f"Surgeon shot {shot}/{shots}: {message}")

        if not (one_shot and stats is not None and stats.covers(needs)):
            with masked(work, s, current):
                stats = collect_statistics(
                    work, s, windows, needs, batch_size=batch_size, progress=report
                )
        curvature = Curvature(work, s, stats, damping)
        if isinstance(target, Selection):
            goal = target
            scores = {} if one_shot else _scores(scorer, work, s, stats, _kinds_of(target))
        else:
            scores = _mark_removed(_scores(scorer, work, s, stats, kinds), s, current)
            goal = target(scores)
            if not _contains(goal, current):
                raise ValueError("the resolver dropped units an earlier shot removed")
        chosen = partial_selection(s, goal, current, scores, shot / shots)
        curvature.apply(chosen, current, rows=update_rows)
        current = chosen
        report(1.0, f"{_count(current)} units removed, weights updated")
    return prune_model(work, s, current, inplace=True), current


def _scores(scorer: Criterion, model, s: StructureMap, stats, kinds: Sequence[Kind]) -> Scores:
    ctx = ScoreContext(model, s, stats, kinds=tuple(kinds))
    return {kind: v.cpu() for kind, v in scorer.score(ctx).items()}


def _count(selection: Selection) -> int:
    per_layer = (selection.heads, selection.mlp)
    return sum(len(v) for d in per_layer for v in d.values()) + len(
        selection.hidden + selection.layers
    )


def _kinds_of(selection: Selection) -> list[Kind]:
    present = {
        "head": selection.heads,
        "kv": selection.kv,
        "mlp": selection.mlp,
        "hidden": selection.hidden,
        "layer": selection.layers,
    }
    return [kind for kind, units in present.items() if units]


def _take(done: set[int], pool: Sequence[int], score: torch.Tensor, n: int) -> list[int]:
    """``done`` plus the cheapest units of ``pool`` not in it, ``n`` in all."""
    rest = sorted((u for u in pool if u not in done), key=lambda u: (float(score[u]), u))
    return sorted(done | set(rest[: max(0, n - len(done))]))


def partial_selection(
    structure: StructureMap,
    target: Selection,
    current: Selection,
    scores: Scores,
    fraction: float,
) -> Selection:
    """``current`` plus the cheapest of ``target``'s units, ``fraction`` of each kind and layer.

    Query heads stay even across kv groups: every kv group still there gives up the same number
    of heads (a group the target removes whole gives its cheapest ones meanwhile). Layers the
    target removes whole lose nothing else before they go.
    """
    if fraction >= 1:
        return target
    s = structure

    def count(total: int) -> int:
        return round(fraction * total)

    def row(kind: str, layer: int | None = None) -> torch.Tensor | None:
        if kind not in scores:
            return None
        return scores[kind] if layer is None else scores[kind][layer]

    layers = _take(set(current.layers), target.layers, row("layer"), count(len(target.layers)))
    hidden = _take(set(current.hidden), target.hidden, row("hidden"), count(len(target.hidden)))
    mlp, kv, heads = {}, {}, {}
    for layer in range(s.num_layers):
        later = layer in target.layers
        units = () if later else target.mlp.get(layer, ())
        done = set(current.mlp.get(layer, ()))
        mlp[layer] = _take(done, units, row("mlp", layer), count(len(units)))
        groups = () if later else target.kv.get(layer, ())
        done = set(current.kv.get(layer, ()))
        kv[layer] = _take(done, groups, row("kv", layer), count(len(groups)))
        whole = set(groups)
        wanted = set() if later else set(target.heads.get(layer, ()))
        per_group = sum(h // s.group_size not in whole for h in wanted) // (s.kv_heads - len(whole))
        heads[layer] = []
        for g in range(s.kv_heads):
            if g in kv[layer]:
                continue  # Selection.make adds all its heads
            members = range(g * s.group_size, (g + 1) * s.group_size)
            pool = list(members) if g in whole else [h for h in members if h in wanted]
            done = {h for h in current.heads.get(layer, ()) if h in members}
            heads[layer] += _take(done, pool, row("head", layer), count(per_group))
    return Selection.make(s, heads=heads, kv=kv, mlp=mlp, hidden=hidden, layers=layers)


def _mark_removed(scores: Scores, s: StructureMap, current: Selection) -> Scores:
    """Scores with the units ``current`` removed at −inf, so any ranking keeps them removed."""
    out = {kind: v.clone() for kind, v in scores.items()}
    for kind, per_layer in (("head", current.heads), ("kv", current.kv), ("mlp", current.mlp)):
        for layer, units in per_layer.items():
            if kind in out:
                out[kind][layer, list(units)] = -torch.inf
    for kind, units in (("hidden", current.hidden), ("layer", current.layers)):
        if kind in out and units:
            out[kind][list(units)] = -torch.inf
    return out


def _contains(big: Selection, small: Selection) -> bool:
    def per_layer(a: dict, b: dict) -> bool:
        return all(set(units) <= set(a.get(layer, ())) for layer, units in b.items())

    return (
        per_layer(big.heads, small.heads)
        and per_layer(big.kv, small.kv)
        and per_layer(big.mlp, small.mlp)
        and set(small.hidden) <= set(big.hidden)
        and set(small.layers) <= set(big.layers)
    )


register(
    Criterion(
        name="surgeon",
        title="LLM Surgeon (Kronecker-factored curvature)",
        formula=(
            "row r: ½ W_r A W_rᵀ / [G⁻¹]_rr; column c: ½ W_:,cᵀ G W_:,c / [A⁻¹]_cc; A = E[x xᵀ], "
            "G = E[g gᵀ] per linear module, each + 0.01·mean(diag)·I; group: sum over its rows "
            "of q/k/v/gate/up and columns of o/down; layer: all of its rows and columns."
        ),
        score=_surgeon,
        needs=SURGEON_NEEDS,
        uses_reduction=False,
        paper=PAPER,
    )
)


@torch.no_grad()
def _surgeon_step(
    ctx: RecoveryContext, *, shots: int = 1, damping: float = 0.01, update_rows: bool = False
) -> dict:
    """Redo the pruning with LLM Surgeon's updates and copy the result into the pruned model."""
    updated, _ = surgeon_prune(
        ctx.dense,
        ctx.structure,
        ctx.selection,
        ctx.windows,
        shots=shots,
        damping=damping,
        update_rows=update_rows,
        progress=ctx.progress,
        stats=ctx.stats,
    )
    for name, p in updated.named_parameters():
        ctx.pruned.get_parameter(name).copy_(p)
    return {"shots": shots}


register_step(
    RecoveryStep(
        name="surgeon",
        title="LLM Surgeon weight update (recomputes the weights: put it first)",
        run=_surgeon_step,
        paper=PAPER,
    )
)
