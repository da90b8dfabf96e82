"""LLM Surgeon's weight update (van der Ouderaa et al., ICLR 2024, arXiv 2312.17244), structured.

Removing rows R (output channels) or columns C (input channels) of a linear module at the least
loss under its Kronecker-factored curvature G ⊗ A (see ``explorer.scoring.surgeon`` for the costs)
moves the weights that stay by the closed-form correlated update

    rows R:    ΔW = −G⁻¹ E_R ([G⁻¹]_RR)⁻¹ W_R        columns C:  ΔW = −W_:,C ([A⁻¹]_CC)⁻¹ (A⁻¹)_C,:

(the minimiser of ½ vec(ΔW)ᵀ (G ⊗ A) vec(ΔW) with the removed entries driven to zero; with both
rows and columns the two updates applied one after the other give the joint minimiser, since the
quadratic separates). See ``Surgery.apply`` for why by default only the readers of a removed unit
are updated.

Multi-shot (``surgeon_prune``): the target is reached in T shots; each shot re-estimates A and G on
the partly pruned model, removes a further share of the units and applies the update, so later
removals see the weights that absorbed the earlier ones.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..apply.masking import masked
from ..apply.pruning import prune_model
from ..model.families import get_module
from ..model.structure import Kind, StructureMap
from ..planning.selection import Selection
from ..progress import Progress
from ..scoring.base import SCORED_KINDS, Criterion, ScoreContext, Scores
from ..scoring.statistics import Needs, Statistics, collect_statistics
from ..scoring.surgeon import PAPER, SURGEON, SURGEON_NEEDS, Curvature, input_factor
from .steps import RecoveryContext, RecoveryStep, removed_indices

# The column updates (the default) read only the input covariances.
UPDATE_NEEDS = Needs(covariance=SURGEON_NEEDS.covariance)
Resolver = Callable[[Scores], Selection]


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
        w = column_update(w, torch.linalg.inv(a.double()), cols)
    return w


def column_update(weight: torch.Tensor, a_inv: torch.Tensor, cols: Sequence[int]) -> torch.Tensor:
    """``weight`` after the correlated update that removes its columns ``cols`` (float64 out).

    ΔW = −W_:,C ([A⁻¹]_CC)⁻¹ (A⁻¹)_C,: from the damped A's inverse ``a_inv``: the update the
    ``surgeon`` step applies to the reader of a removed unit, and the one the live preview applies.
    Given A⁻¹, it costs one |C| × |C| solve, so a preview that caches A⁻¹ (the O(n³) part) redoes
    a layer's update for a new cut cheaply.
    """
    w = weight.double()
    c = torch.tensor(list(cols), device=w.device)
    w = w - w[:, c] @ torch.linalg.solve(a_inv[c][:, c], a_inv[c])
    w[:, c] = 0
    return w


def input_inverse(
    structure: StructureMap, stats: Statistics, layer: int, name: str, damping: float = 0.01
) -> torch.Tensor:
    """(damped A)⁻¹ of module ``name`` of ``layer``, float64 (needs only ``UPDATE_NEEDS``)."""
    return torch.linalg.inv(input_factor(structure, stats, layer, name, damping))


class Surgery(Curvature):
    """The curvature of every linear module, and the weight update it implies for a selection."""

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


# -- multi-shot ----------------------------------------------------------------------------------------
def surgeon_prune(
    model: nn.Module,
    structure: StructureMap,
    target: Selection | Resolver,
    windows: torch.Tensor,
    *,
    shots: int = 1,
    damping: float = 0.01,
    kinds: Sequence[Kind] = SCORED_KINDS,
    update_rows: bool = False,
    criterion: Criterion = SURGEON,
    batch_size: int = 1,
    progress: Progress | None = None,
    stats: Statistics | None = None,
) -> tuple[nn.Module, Selection]:
    """Prune a copy of ``model`` to ``target`` in ``shots`` shots; (pruned model, selection).

    ``target`` is the final ``Selection``, or a resolver ``scores -> Selection`` (e.g. a plan's
    ``allocate``) that each shot calls with that shot's costs, the units already removed scored
    −inf so that it keeps them. Shot t of T collects A and G on the partly pruned model (masked,
    with the weights updated so far), removes the cheapest units of the target until t/T of each
    kind and layer are gone, and applies the correlated update for everything removed so far.
    ``shots=1`` is one-shot LLM Surgeon. ``update_rows``: see ``Surgery.apply``. ``criterion``
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
    needs = UPDATE_NEEDS | (SURGEON_NEEDS if update_rows else Needs())
    needs = needs if one_shot else needs | criterion.needs
    for shot in range(1, shots + 1):

        def report(fraction: float, message: str, shot: int = shot) -> None:
            if progress is not None:
                progress((shot - 1 + fraction) / shots, f"Surgeon shot {shot}/{shots}: {message}")

        if not (one_shot and stats is not None and stats.covers(needs)):
            with masked(work, s, current):
                stats = collect_statistics(
                    work, s, windows, needs, batch_size=batch_size, progress=report
                )
        curvature = Surgery(work, s, stats, damping)
        if isinstance(target, Selection):
            goal = target
            scores = {} if one_shot else _scores(criterion, work, s, stats, _kinds_of(target))
        else:
            scores = _mark_removed(_scores(criterion, work, s, stats, kinds), s, current)
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


SURGEON_STEP = RecoveryStep(
    name="surgeon",
    title="LLM Surgeon weight update (recomputes the weights: put it first)",
    run=_surgeon_step,
    paper=PAPER,
)
