"""Block Influence (ShortGPT, arXiv 2403.03853): how much a whole decoder block turns the stream.

BI_l = 1 − E_t[cos(h_l, h_{l+1})], the mean over calibration tokens of one minus the cosine between
the residual stream entering and leaving block l. A block that barely turns the stream changes
little when it goes. It scores the ``layer`` kind only: plans choose blocks with it through
``Plan.depth`` and ``Plan.depth_criterion`` (or meet their target with whole layers when it is the
plan's criterion), and leave widths to width criteria.
"""

from __future__ import annotations

from .base import Criterion, ScoreContext, Scores
from .criteria import require_stats
from .statistics import Needs

HIDDEN_STATES = Needs(hidden_states=True)


def _block_influence(ctx: ScoreContext) -> Scores:
    """Only the ``layer`` kind: a plan that asks it for widths is refused by the allocation."""
    if "layer" not in ctx.kinds:
        return {}
    stats = require_stats(ctx, "block_influence", HIDDEN_STATES)
    return {"layer": stats.block_influence().to(ctx.device)}


BLOCK_INFLUENCE = Criterion(
    name="block_influence",
    title="Block Influence (whole layers only)",
    formula="layer: BI_l = 1 − E_t[cos(h_l, h_l+1)] over calibration tokens; no width scores.",
    score=_block_influence,
    needs=HIDDEN_STATES,
    uses_reduction=False,
    paper="ShortGPT (Men et al., arXiv 2403.03853)",
)
