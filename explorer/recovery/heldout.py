"""Does a recovery step generalise? Held-out calibration perplexity before and after each step.

A recovery step fits the pruned model to its calibration windows; on other text of the same
source it can still make the model worse (a LoRA run that over-fits, an ill-damped refit, an
update fitted to a few outlier tokens). The session keeps a few windows of the calibration text
that no scoring pass or step ever sees (``data.split_heldout``); ``run_steps`` measures their
perplexity around every step, and a step that raised it gets a ``warning`` in its report, which
the CLI prints, report.json keeps and the app shows before Export writes the model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ..evaluate import perplexity

# A rise smaller than this (relative) is rounding, not damage: such a step counts as neutral.
WORSE = 1e-3


def heldout_perplexity(model: nn.Module, windows: torch.Tensor | None) -> float | None:
    """Perplexity on the held-out windows; None when there are none (nothing to judge by)."""
    if windows is None or windows.shape[0] == 0:
        return None
    return perplexity(model, windows)


def judged(step: str, before: float | None, after: float | None) -> dict:
    """The held-out fields of a step's report: both perplexities and, if it got worse, a warning.

    A perplexity that is not finite after the step (a diverged update) counts as worse.
    """
    if before is None or after is None:
        return {}
    fields: dict = {"heldout_before": before, "heldout_after": after}
    if not (math.isfinite(after) and after <= before * (1 + WORSE)):
        fields["warning"] = (
            f"Recovery step '{step}' made the model worse on held-out calibration text: "
            f"perplexity {before:.2f} -> {after:.2f} ({after / before - 1:+.1%}). "
            "Drop the step or change its parameters; the export still works."
        )
    return fields


def recovery_warnings(reports: Sequence[dict]) -> list[str]:
    """The warnings of a run's step reports, in step order."""
    return [r["warning"] for r in reports if r.get("warning")]
