"""Stage 2, scoring: calibration statistics, the criterion type and the criteria themselves.

``base`` holds the criterion type, what it reads and how per-weight scores become per-group;
``statistics`` the one calibration pass (and ``Needs``, what a criterion asks of it); the other
modules define criteria, which ``explorer.catalogue`` lists by name.
"""

from .base import REDUCTIONS, SCORED_KINDS, Criterion, ScoreContext, Scores, group_scores
from .offload import load_offloaded, score_offloaded
from .statistics import Needs, Statistics, collect_statistics

__all__ = [
    "REDUCTIONS",
    "SCORED_KINDS",
    "Criterion",
    "Needs",
    "ScoreContext",
    "Scores",
    "Statistics",
    "collect_statistics",
    "group_scores",
    "load_offloaded",
    "score_offloaded",
]
