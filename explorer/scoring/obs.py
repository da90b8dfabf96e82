"""Greedy reader-side removal: LLM Surgeon's column costs, one unit at a time (Optimal Brain Surgeon).

A head or an MLP channel is *read* by a few columns of one module (``o_proj``, ``down_proj``).
Removing a set C of those columns and letting the other columns absorb it (the column update of
``explorer.scoring.surgeon``, which needs only the input covariance A) costs, under the curvature G ⊗ A,

    ΔL(C) = ½ tr(W_:,Cᵀ G W_:,C ([A⁻¹]_CC)⁻¹).

``explorer.scoring.surgeon`` ranks units by the *sum* of their members' costs, each computed as if it were
removed alone, and also charges the rows the unit owns in the modules that write it, though those
rows are sliced without an update. Here the cost is the one of the update that is applied, and
units are taken greedily: remove the cheapest, update the weights and A⁻¹ (a rank-|C| downdate),
recompute the costs, repeat, so two correlated channels are never both judged as if the other
stayed. This is Optimal Brain Surgeon's greedy order (as in SlimGPT / ZipLM for structured
pruning); after any prefix of it the weights equal the one-shot correlated update of that prefix,
so the order is a ranking: a unit's score is the cumulative cost at its removal (made monotone),
comparable across layers as a loss estimate.

Two criteria: ``obs`` takes G = I (reconstruct the module's output; forward pass only), and
``surgeon_greedy`` takes LLM Surgeon's G = E[g gᵀ] of the output gradient (needs a backward pass).
Apply the matching weight update with the ``surgeon`` recovery step (one shot).
"""

from __future__ import annotations

import torch

from ..errors import PlanError
from ..model.structure import StructureMap
from .base import Criterion, Needs, ScoreContext, Scores
from .criteria import require_stats
from .surgeon import PAPER, damped

READERS = ("o_proj", "down_proj")
OBS_NEEDS = Needs(covariance=READERS)
GREEDY_NEEDS = Needs(covariance=READERS, output_gradient_covariance=READERS)


@torch.no_grad()
def greedy_order(
    weight: torch.Tensor,
    a: torch.Tensor,
    block: int = 1,
    g: torch.Tensor | None = None,
    per_step: int = 1,
) -> tuple[list[int], torch.Tensor]:
    """Column blocks of ``weight`` in greedy removal order, and each one's cumulative cost.

    ``a`` (in, in) and ``g`` (out, out; None: identity) are damped factors. ``per_step`` units are
    taken per downdate (1: exact greedy; more: fewer downdates on wide modules). Returns
    (unit indices in removal order, cost per unit index), the costs non-decreasing along the order.
    """
    out = weight.shape[0]
    w = weight.double()
    # W, and below it G W when G is given: one matrix, so one downdate moves both (with G = I,
    # G W is W itself and is not kept twice).
    both = w.clone() if g is None else torch.cat([w, g.double() @ w])

    def split(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return m[:out], (m if g is None else m[out:])

    a_inv = torch.linalg.inv(a.double())
    offsets = torch.arange(block, device=w.device)
    ids = torch.arange(w.shape[1] // block, device=w.device)  # original index of each position
    alive = torch.ones_like(ids, dtype=torch.bool)
    order: list[int] = []
    score = torch.zeros(ids.numel(), dtype=torch.float64, device=w.device)
    total = 0.0
    while alive.any():
        if alive.sum() < 0.75 * alive.numel():
            # Drop the removed units' (zero) columns now and then: the downdates shrink with the
            # matrices, and the copies stay rare.
            kept = (alive.nonzero()[:, :1] * block + offsets).flatten()
            both = both.index_select(1, kept)
            a_inv = a_inv.index_select(0, kept).index_select(1, kept)
            ids, alive = ids[alive], alive[alive]
        left = alive.nonzero()[:, 0]
        costs = block_costs(*split(both), a_inv, block, left)
        picked = costs.topk(min(per_step, left.numel()), largest=False).indices
        chosen = left[picked]
        cols = (chosen[:, None] * block + offsets).flatten()
        a_c = a_inv.index_select(0, cols)
        m = a_c.index_select(1, cols)
        step = torch.linalg.solve(m, a_c)  # ([A⁻¹]_CC)⁻¹ (A⁻¹)_C,:
        both_c = both.index_select(1, cols)
        w_c, gw_c = split(both_c)
        joint = 0.5 * float((w_c * (gw_c @ torch.linalg.inv(m))).sum())
        for p, u in zip(picked.tolist(), chosen.tolist(), strict=True):
            # within a step: cheapest first, never above the joint cost of the step
            score[ids[u]] = total + min(float(costs[p]), joint)
            order.append(int(ids[u]))
        total += max(joint, 0.0)
        both.addmm_(both_c, step, alpha=-1)
        a_inv.addmm_(a_c.T, step, alpha=-1)
        alive[chosen] = False
    return order, score


def block_costs(
    w: torch.Tensor,
    gw: torch.Tensor,
    a_inv: torch.Tensor,
    block: int,
    units: torch.Tensor | None = None,
) -> torch.Tensor:
    """½ tr(W_Bᵀ G W_B ([A⁻¹]_BB)⁻¹) for the column blocks ``units`` (None: all) of width ``block``."""
    if units is None:
        units = torch.arange(w.shape[1] // block, device=w.device)
    if block == 1:
        return (0.5 * (w * gw).sum(0) / a_inv.diagonal())[units]  # removed ones: 0/0, dropped
    idx = units[:, None] * block + torch.arange(block, device=w.device)  # (units, block)
    p = torch.einsum("oub,ouc->ubc", w[:, idx], gw[:, idx])  # W_Bᵀ G W_B per unit
    m = a_inv[idx[:, :, None], idx[:, None, :]]  # diagonal blocks of A⁻¹
    return 0.5 * torch.linalg.solve(m, p).diagonal(dim1=-2, dim2=-1).sum(-1)


def _per_step(units: int) -> int:
    """Units per downdate: exact greedy for heads, 1/64 of the channels at a time for MLPs."""
    return max(1, units // 64)


def greedy_scores(ctx: ScoreContext, with_g: bool, damping: float = 0.01) -> Scores:
    """Cumulative greedy costs of heads, kv groups and MLP channels (layers: their sum)."""
    name = "surgeon_greedy" if with_g else "obs"
    stats = require_stats(ctx, name, GREEDY_NEEDS if with_g else OBS_NEEDS)
    if "hidden" in ctx.kinds:
        raise PlanError(
            f"'{name}' does not score hidden channels. Set the hidden ratio to 0 or use another "
            "criterion."
        )
    s: StructureMap = ctx.structure
    f = s.family
    blocks = {"head": (f.o, s.head_dim), "kv": (f.o, s.head_dim * s.group_size), "mlp": (f.down, 1)}
    wanted = set(ctx.kinds) | ({"head", "mlp"} if "layer" in ctx.kinds else set())
    out: dict[str, list[torch.Tensor]] = {kind: [] for kind in ctx.kinds}
    for layer in range(s.num_layers):
        ctx.report(layer / s.num_layers, f"{name}: greedy walk, layer {layer + 1}/{s.num_layers}")
        full = {}  # kind -> cumulative cost of removing every unit of the layer
        for kind in [k for k in blocks if k in wanted]:
            module, block = blocks[kind]
            path = s.path(layer, module)
            a = damped(stats.cov(path), damping)
            g = damped(stats.grad_cov(path), damping) if with_g else None
            weight = ctx.weight(path)
            _, score = greedy_order(weight, a, block, g, _per_step(weight.shape[1] // block))
            full[kind] = score.max()
            if kind in out:
                out[kind].append(score)
        if "layer" in out:
            out["layer"].append(full["head"] + full["mlp"])
    ctx.report(1.0, f"{name}: greedy walks done")
    return {kind: torch.stack(v).float().to(ctx.device) for kind, v in out.items()}


OBS = Criterion(
    name="obs",
    title="Optimal Brain Surgeon, greedy on the reading columns (output reconstruction)",
    formula=(
        "units of o_proj / down_proj columns taken greedily by ½ tr(W_Cᵀ W_C ([A⁻¹]_CC)⁻¹), "
        "A = E[x xᵀ] + 0.01·mean(diag)·I, downdating A⁻¹ and W after each; score = "
        "cumulative cost at removal"
    ),
    score=lambda ctx: greedy_scores(ctx, with_g=False),
    needs=OBS_NEEDS,
    uses_reduction=False,
    paper="Optimal Brain Surgeon (Hassibi & Stork 1993), structured as in ZipLM / SlimGPT",
)
SURGEON_GREEDY = Criterion(
    name="surgeon_greedy",
    title="LLM Surgeon, greedy on the reading columns (costs of the update applied)",
    formula=(
        "as obs, with LLM Surgeon's G = E[g gᵀ] of the output gradient: "
        "½ tr(W_Cᵀ G W_C ([A⁻¹]_CC)⁻¹)"
    ),
    score=lambda ctx: greedy_scores(ctx, with_g=True),
    needs=GREEDY_NEEDS,
    uses_reduction=False,
    paper=PAPER,
)
