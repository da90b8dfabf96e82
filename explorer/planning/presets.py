"""Named recipes: plan JSON files shipped with the package, for the app's preset menu and the CLI.

Each file in ``explorer/planning/recipes/`` is an ordinary plan (``python -m explorer prune --plan FILE``
replays it; ``--preset NAME`` names it). ``DEFAULT`` is the best plan measured on the embedded
model, the one the app opens on (bench/RESULTS.md, issue 12's section).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import PlanError
from .plan import Plan

RECIPES = Path(__file__).parent / "recipes"
TITLES: dict[str, str] = {
    "best": "Best measured: per-layer MLP cuts from the held-out sensitivity sweep, "
    "surgeon_greedy order, correlated update",
    "best_50": "Best measured at 50%: per-layer head and MLP cuts from the held-out sensitivity "
    "sweep (KL), surgeon_greedy order, correlated update",
    "llm_pruner_taylor": "LLM-Pruner: Taylor, uniform over layers 4-27 (10 x 64 calibration)",
    "wanda_sp": "Wanda-sp: |W|·‖X‖, uniform over layers 4-27",
    "flap": "FLAP: fluctuation, one global threshold, bias compensation",
    "llm_surgeon": "LLM Surgeon: Kronecker-factored costs, global, one-shot update",
}
DEFAULT = "best"


def preset_names() -> list[str]:
    return list(TITLES)


def preset_path(name: str) -> Path:
    if name not in TITLES:
        raise PlanError(f"Unknown preset '{name}'. Choose one of: {', '.join(TITLES)}.")
    return RECIPES / f"{name}.json"


def load_preset(name: str) -> Plan:
    """The named recipe as a fresh ``Plan``."""
    return Plan.load(preset_path(name))
