"""Stage 3, planning: the recipe (``Plan``) and its allocation into a ``Selection`` of units."""

from .plan import PLAN_VERSION, Plan, allocate
from .selection import Selection, flops_per_token, param_counts

__all__ = ["PLAN_VERSION", "Plan", "Selection", "allocate", "flops_per_token", "param_counts"]
