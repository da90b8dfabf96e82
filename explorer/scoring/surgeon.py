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
modules that write it are sliced without an update (the update is ``explorer.recovery.surgeon``).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property

import torch
from torch import nn

from ..model.families import get_module
from ..model.structure import Kind, StructureMap
from ..progress import Progress
from .base import Criterion, ScoreContext, Scores
from .criteria import require_stats as require
from .statistics import Needs, Statistics

PAPER = "LLM Surgeon (van der Ouderaa et al., ICLR 2024, arXiv 2312.17244)"
ROLES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# k/v read q's input and up reads gate's, so four input covariances cover the seven modules.
SURGEON_NEEDS = Needs(
    covariance=("down_proj", "gate_proj", "o_proj", "q_proj"), output_gradient_covariance=ROLES
)


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


# -- the factors of one model --------------------------------------------------------------------------
def input_factor(
    structure: StructureMap, stats: Statistics, layer: int, name: str, damping: float = 0.01
) -> torch.Tensor:
    """Damped A of module ``name`` (float64, not kept: the factors are big).

    k/v read q's input and up reads gate's, so their covariance is the one collected there.
    """
    f = structure.family
    source = {f.k: f.q, f.v: f.q, f.up: f.gate}.get(name, name)
    return damped(stats.cov(structure.path(layer, source)), damping)


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


def _surgeon(ctx: ScoreContext) -> Scores:
    stats = require(ctx, "surgeon", SURGEON_NEEDS)
    return Curvature(ctx.model, ctx.structure, stats).scores(ctx.kinds, ctx.device, ctx.report)


SURGEON = Criterion(
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
