"""Distribution-aware, output-preserving scores (Li, Dong, Lei; arXiv 2407.19126).

Forward passes only. A *depth-2 unit* is an output channel of a module together with the matching
input channel of the next one; its score is the energy it adds to the residual stream per token:

- MLP channel j: ‖W_down[:, j]‖² · E[h_j²], h the input of ``down_proj``. That is the paper's
  ``‖W_down[:, j]‖² · W_up[j] Σ W_up[j]ᵀ`` with the activation folded in, so gated MLPs
  (gate ⊙ up) need no special case.
- query head h: E‖W_o[:, h] x_h‖² = tr(W_o[:, h]ᵀ W_o[:, h] · E[x_h x_hᵀ]), x_h the head's slice
  of the ``o_proj`` input: the energy of the head's output, exact (its covariance block, not only
  its diagonal). A kv group scores the sum of its heads.
- hidden channel c (optional kind): Σ over the modules that read the residual stream of
  ‖W[:, c]‖² · E[x_c²].
- layer: block influence 1 − E[cos(h_l, h_l+1)] (ShortGPT), the depth analogue.

Both widths are in the same unit (squared residual-stream norm per token), so a global ranking of
heads against MLP channels is meaningful.

Head similarity: the mean Jensen–Shannon divergence D_ij between the attention rows of heads i and
j (``Statistics.jsd``) links heads with D_ij < τ (0.20 in the paper); the greedy rule marks one
head of each linked pair for pruning, the other stays and stands in for it.

Data-free mode is only a matter of calibration text: collect the statistics on
``explorer.data.self_generated_text``; nothing here reads real text.
"""

from __future__ import annotations

import math
from dataclasses import replace

import networkx as nx
import torch

from ..model.structure import StructureMap
from .base import Criterion, Needs, ScoreContext, Scores
from .criteria import require_stats as require
from .statistics import Statistics

PAPER = "Distribution-aware pruning (Li, Dong, Lei, arXiv 2407.19126)"
DEFAULT_TAU = 0.20
DEPTH2_NEEDS = Needs(input_moments=True, covariance=("o_proj",), hidden_states=True)
SIMILARITY_NEEDS = DEPTH2_NEEDS | Needs(attention=True)


# -- depth-2 energies --------------------------------------------------------------------------------
def head_energy(ctx: ScoreContext, stats: Statistics, layer: int) -> torch.Tensor:
    """E‖W_o[:, h] x_h‖² per query head of ``layer``: shape (heads,)."""
    s = ctx.structure
    path = s.path(layer, s.family.o)
    w = ctx.weight(path).float()
    cov = stats.cov(path).to(w.device)
    hd = s.head_dim
    out = []
    for h in range(s.heads):
        cols = slice(h * hd, (h + 1) * hd)
        gram = w[:, cols].T @ w[:, cols]
        out.append((gram * cov[cols, cols]).sum())
    return torch.stack(out).to(ctx.device)


def channel_energy(ctx: ScoreContext, stats: Statistics, path: str) -> torch.Tensor:
    """‖W[:, j]‖² · E[x_j²] per input channel j of the linear module at ``path``."""
    w = ctx.weight(path).float()
    mean_sq = stats.input_sq(path).to(w.device) / stats.tokens
    return (w.square().sum(0) * mean_sq).to(ctx.device)


def depth2_scores(ctx: ScoreContext, stats: Statistics) -> Scores:
    """Depth-2 energies of every kind in ``ctx.kinds`` (see the module docstring)."""
    s, f = ctx.structure, ctx.structure.family
    out: Scores = {}
    if "head" in ctx.kinds or "kv" in ctx.kinds:
        heads = torch.stack([head_energy(ctx, stats, layer) for layer in range(s.num_layers)])
        out["head"] = heads
        out["kv"] = heads.reshape(s.num_layers, s.kv_heads, s.group_size).sum(-1)
    if "mlp" in ctx.kinds:
        out["mlp"] = torch.stack(
            [channel_energy(ctx, stats, s.path(i, f.down)) for i in range(s.num_layers)]
        )
    if "hidden" in ctx.kinds:
        readers = (f.q, f.k, f.v, f.gate, f.up)
        out["hidden"] = sum(
            channel_energy(ctx, stats, s.path(i, name))
            for i in range(s.num_layers)
            for name in readers
        )
    if "layer" in ctx.kinds:
        out["layer"] = stats.block_influence().to(ctx.device)
    return {kind: out[kind] for kind in ctx.kinds}


def _depth2(ctx: ScoreContext) -> Scores:
    return depth2_scores(ctx, require(ctx, "depth2", DEPTH2_NEEDS))


# -- head similarity ---------------------------------------------------------------------------------
def head_similarity_graph(jsd: torch.Tensor, tau: float = DEFAULT_TAU) -> nx.Graph:
    """Heads as nodes, an edge (weight D_ij) between every pair whose mean JSD is below ``tau``."""
    graph = nx.Graph()
    n = jsd.shape[0]
    graph.add_nodes_from(range(n))
    for i in range(n):
        for j in range(i + 1, n):
            d = float(jsd[i, j])
            if d < tau:
                graph.add_edge(i, j, weight=d)
    return graph


def greedy_redundant_heads(
    jsd: torch.Tensor, tau: float = DEFAULT_TAU, importance: torch.Tensor | None = None
) -> list[int]:
    """The paper's greedy rule: for each linked pair with neither head marked, mark one.

    Pairs are visited from the most similar (lowest D_ij) up; of a pair, the less important head
    is marked (by ``importance``, e.g. ``head_energy``; without it the higher-numbered one).
    Every marked head is linked to a head that stays, so it is redundant with a kept head.
    """
    graph = head_similarity_graph(jsd, tau)
    edges = sorted(graph.edges(data="weight"), key=lambda e: (e[2], e[0], e[1]))
    marked: set[int] = set()
    for i, j, _ in edges:
        if i in marked or j in marked:
            continue
        if importance is not None and float(importance[i]) < float(importance[j]):
            marked.add(i)
        else:
            marked.add(j)
    return sorted(marked)


def redundancy_scores(jsd: torch.Tensor, importance: torch.Tensor | None = None) -> torch.Tensor:
    """Per head: how far it was from its nearest remaining head when greedily eliminated.

    Repeatedly take the closest pair among the remaining heads and eliminate its less important
    head (by ``importance``; else the higher-numbered one), scoring it that pair's D. The minimum
    over the pairs of a shrinking set can only grow, so scores rise in elimination order and
    removing the k lowest-scoring heads removes the k first eliminated. The last head scores
    ln 2, the largest possible JSD. Near-duplicates go first; the head that stood in for them
    stays longer.
    """
    n = jsd.shape[0]
    d = jsd.double().clone().cpu()
    d.fill_diagonal_(math.inf)
    rank = (importance if importance is not None else -torch.arange(n)).double().tolist()
    scores = torch.full((n,), math.log(2), dtype=torch.float64)
    alive = list(range(n))
    while len(alive) > 1:
        sub = d[alive][:, alive]
        flat = int(sub.argmin())
        i, j = alive[flat // len(alive)], alive[flat % len(alive)]
        victim = i if (rank[i], -i) < (rank[j], -j) else j
        scores[victim] = float(sub.min())
        alive.remove(victim)
    return scores.to(jsd.dtype)


def _head_similarity(ctx: ScoreContext) -> Scores:
    """Heads by redundancy (``redundancy_scores``, head energy breaking ties between partners);
    kv groups by the sum over their heads; MLP channels, hidden channels and layers by depth-2."""
    stats = require(ctx, "head_similarity", SIMILARITY_NEEDS)
    s = ctx.structure
    others = tuple(k for k in ctx.kinds if k not in ("head", "kv"))
    out = depth2_scores(replace(ctx, kinds=others), stats) if others else {}
    if "head" in ctx.kinds or "kv" in ctx.kinds:
        heads = torch.stack(
            [
                redundancy_scores(stats.jsd(i).float(), head_energy(ctx, stats, i))
                for i in range(s.num_layers)
            ]
        ).to(ctx.device)
        out["head"] = heads
        out["kv"] = heads.reshape(s.num_layers, s.kv_heads, s.group_size).sum(-1)
    return {kind: out[kind] for kind in ctx.kinds}


def redundant_heads(
    structure: StructureMap, stats: Statistics, tau: float = DEFAULT_TAU
) -> dict[int, list[int]]:
    """Per layer, the heads the greedy rule marks (no importance tie-break): for the head graph."""
    return {
        layer: greedy_redundant_heads(stats.jsd(layer), tau)
        for layer in range(structure.num_layers)
    }


DEPTH2 = Criterion(
    name="depth2",
    title="Depth-2 output energy (distribution-aware)",
    formula=(
        "MLP channel j: ‖W_down[:, j]‖² · E[h_j²] (h: down_proj input); head h: "
        "E‖W_o[:, h] x_h‖² from the o_proj input covariance; kv group: sum of its heads; "
        "hidden channel c: Σ_readers ‖W[:, c]‖² E[x_c²]; layer: 1 − E[cos(h_l, h_l+1)]. "
        "Forward passes only."
    ),
    score=_depth2,
    needs=DEPTH2_NEEDS,
    uses_reduction=False,
    paper=PAPER,
)
HEAD_SIMILARITY = Criterion(
    name="head_similarity",
    title="Head similarity (attention JSD, distribution-aware)",
    formula=(
        "head: greedily eliminate the less energetic head of the closest remaining pair "
        "(mean Jensen–Shannon divergence of attention rows); score = that pair's D, so "
        "near-duplicates go first; kv group: sum of its heads; MLP, hidden, layer: depth2."
    ),
    score=_head_similarity,
    needs=SIMILARITY_NEEDS,
    uses_reduction=False,
    paper=PAPER,
)
