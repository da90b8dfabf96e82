"""The core importance criteria: random, magnitude, LLM-Pruner's Taylor family and Wanda-sp.

Element-wise criteria define a score per weight (``per_weight``); ``group_scores`` sums it over each
unit's block in every member parameter (a slice) and reduces the slices of a group with the chosen
reduction. A whole layer is one slice made of every parameter of its block.

Value convention: a norm weight (any 1-D ``weight``) is scored at its *effective* value, the stored
value plus the family's ``norm_offset`` (Gemma stores w − 1 and scales by 1 + w), so every score
measures what setting a weight's effect to zero would cost. Gradients are those of the mean
next-token cross-entropy (``Statistics.mean_grad``): Taylor scores estimate the change of the mean
loss per token, in the same units in every layer, so one global ranking across layers is fair.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..errors import PlanError
from ..model.structure import KINDS
from .base import (
    Criterion,
    Needs,
    ScoreContext,
    Scores,
    group_scores,
    score_shape,
)
from .statistics import Statistics

LLM_PRUNER = "LLM-Pruner (Ma et al., NeurIPS 2023, arXiv 2305.11627)"
GRADIENTS = Needs(gradients=True)
SECOND_ORDER = Needs(gradients=True, fisher=True)
ACTIVATIONS = Needs(input_moments=True, hidden_states=True)


def _value(ctx: ScoreContext, path: str, param: str) -> torch.Tensor:
    """A parameter as the model uses it: norm weights get the family's offset added."""
    w = ctx.weight(path, param).float()
    if param == "weight" and w.dim() == 1:
        return w + ctx.structure.family.norm_offset
    return w


def require_stats(ctx: ScoreContext, name: str, needs: Needs) -> Statistics:
    """The context's statistics, refusing ones that lack what criterion ``name`` needs."""
    if ctx.stats is None or not ctx.stats.covers(needs):
        raise PlanError(
            f"Criterion '{name}' needs calibration statistics it was not given. "
            "Collect them with collect_statistics(..., criterion.needs) first."
        )
    return ctx.stats


# -- data-free --------------------------------------------------------------------------------------
def _random(ctx: ScoreContext) -> Scores:
    """Uniform scores in [0, 1); each kind has its own generator, so adding a kind changes none."""
    out: Scores = {}
    for kind in ctx.kinds:
        gen = torch.Generator().manual_seed(ctx.seed * len(KINDS) + KINDS.index(kind))
        out[kind] = torch.rand(score_shape(ctx.structure, kind), generator=gen).to(ctx.device)
    return out


def _l1(ctx: ScoreContext) -> Scores:
    return group_scores(ctx, lambda path, param: _value(ctx, path, param).abs())


def _l2(ctx: ScoreContext) -> Scores:
    return group_scores(ctx, lambda path, param: _value(ctx, path, param).square())


# -- LLM-Pruner's Taylor family ---------------------------------------------------------------------
def _first_order(ctx: ScoreContext, stats: Statistics, path: str, param: str) -> torch.Tensor:
    """∇W_k · W_k per weight: minus the first-order change of the loss when W_k becomes 0."""
    return stats.mean_grad(path, param) * _value(ctx, path, param)


def _taylor(ctx: ScoreContext) -> Scores:
    stats = require_stats(ctx, "taylor", GRADIENTS)
    return group_scores(
        ctx, lambda path, param: _first_order(ctx, stats, path, param), per_slice=torch.abs
    )


def _taylor_e1(ctx: ScoreContext) -> Scores:
    stats = require_stats(ctx, "taylor_e1", GRADIENTS)
    return group_scores(ctx, lambda path, param: _first_order(ctx, stats, path, param).abs())


def _taylor_e2(ctx: ScoreContext) -> Scores:
    stats = require_stats(ctx, "taylor_e2", SECOND_ORDER)

    def per_weight(path: str, param: str) -> torch.Tensor:
        w = _value(ctx, path, param)
        curvature = 0.5 * w.square() * stats.fisher_diag(path, param)
        return (_first_order(ctx, stats, path, param) - curvature).abs()

    return group_scores(ctx, per_weight)


# -- Wanda-sp ---------------------------------------------------------------------------------------
def _wanda_sp(ctx: ScoreContext) -> Scores:
    stats = require_stats(ctx, "wanda_sp", ACTIVATIONS)
    f = ctx.structure.family

    def on_inputs_of(roles: tuple[str, ...]):
        """|W_ij| · ‖X_:,j‖₂ on the weights of ``roles``; every other member is skipped."""

        def per_weight(path: str, param: str) -> torch.Tensor | None:
            if param != "weight" or not path.endswith(tuple(f".{r}" for r in roles)):
                return None
            return ctx.weight(path).abs().float() * stats.input_norm(path)

        return per_weight

    ctx = replace(ctx, reduction="sum")  # one slice per unit for widths; a plain sum for hidden
    out: Scores = {}
    widths = tuple(k for k in ctx.kinds if k in ("head", "kv", "mlp"))
    if widths:
        out |= group_scores(replace(ctx, kinds=widths), on_inputs_of((f.o, f.down)))
    if "hidden" in ctx.kinds:
        readers = on_inputs_of((f.q, f.k, f.v, f.gate, f.up))
        out |= group_scores(replace(ctx, kinds=("hidden",)), readers)
    if "layer" in ctx.kinds:
        out["layer"] = stats.block_influence().to(ctx.device)
    return {kind: out[kind] for kind in ctx.kinds}


RANDOM = Criterion(
    name="random",
    title="Random (control)",
    formula="I ~ U[0, 1), seeded per kind; the reduction is ignored.",
    score=_random,
    uses_reduction=False,
)
L1 = Criterion(
    name="l1",
    title="Magnitude L1",
    formula="slice: Σ_k |W_k|; group: reduction over slices; layer: Σ |W| over the block.",
    score=_l1,
)
L2 = Criterion(
    name="l2",
    title="Magnitude L2",
    formula=(
        "slice: Σ_k W_k² (no root, as Torch-Pruning's MagnitudeImportance, so 'sum' gives the "
        "group's squared Frobenius norm); layer: Σ W² over the block."
    ),
    score=_l2,
)
TAYLOR = Criterion(
    name="taylor",
    title="Taylor, vector-wise (LLM-Pruner)",
    formula=(
        "slice: |Σ_k ∇W_k · W_k| (the sum inside the abs); group: reduction over slices; "
        "layer: |Σ ∇W · W| over the whole block. ∇ of the mean next-token CE."
    ),
    score=_taylor,
    needs=GRADIENTS,
    paper=LLM_PRUNER,
)
TAYLOR_E1 = Criterion(
    name="taylor_e1",
    title="Taylor, element-wise first order (LLM-Pruner E1)",
    formula="slice: Σ_k |∇W_k · W_k|; layer: Σ |∇W · W| over the block.",
    score=_taylor_e1,
    needs=GRADIENTS,
    paper=LLM_PRUNER,
)
TAYLOR_E2 = Criterion(
    name="taylor_e2",
    title="Taylor, element-wise second order (LLM-Pruner E2)",
    formula=(
        "slice: Σ_k |∇W_k · W_k − ½ W_k² F_kk|, F_kk = (1/N) Σ_j (∂L_j/∂W_k)² over the N "
        "calibration windows (L_j: window j's mean CE); layer: the same sum over the block."
    ),
    score=_taylor_e2,
    needs=SECOND_ORDER,
    paper=LLM_PRUNER,
)
WANDA_SP = Criterion(
    name="wanda_sp",
    title="Wanda-sp (weights × input norms)",
    formula=(
        "I_j = Σ_i |W_ij| · ‖X_:,j‖₂ over the input columns j a unit owns in o_proj (heads; kv "
        "groups: their heads) and down_proj (MLP channels); hidden channel c: the same on "
        "column c of q/k/v/gate/up; layer: block influence 1 − E[cos(h_l, h_l+1)]."
    ),
    score=_wanda_sp,
    needs=ACTIVATIONS,
    uses_reduction=False,
    paper="Wanda-sp (An et al., FLAP baseline, arXiv 2312.11983); BI: ShortGPT (2403.03853)",
)
