"""The report.json of a pruning run: one builder, so the CLI and the app write the same fields."""

from __future__ import annotations

from collections.abc import Sequence

from ..planning.plan import Plan
from ..recovery.heldout import recovery_warnings


def pruning_report(
    plan: Plan,
    sizes: dict[str, float],
    evaluation_shape: tuple[int, ...],
    dense: float,
    pruned: float,
    recovered: float | None = None,
    recovery_reports: Sequence[dict] = (),
    **extra: float,
) -> dict:
    """What a run measured: the plan's method, perplexities, sizes, and ``extra`` (e.g. timings).

    ``sizes`` is ``Explorer.sizes(selection)``; ``evaluation_shape`` the (windows, length) of the
    evaluation windows. With recovery, ``perplexity_after`` is the recovered model's and the pruned
    one moves to ``perplexity_before_recovery``. ``recovery_reports`` (``Explorer.recover``'s)
    give ``recovery_heldout``, each step's held-out calibration perplexity before and after it,
    and ``recovery_warnings``, the steps that made it worse.
    """
    report = {
        "criterion": plan.criterion,
        "reduction": plan.reduction,
        "allocation": plan.allocation,
        "perplexity_before": dense,
        "perplexity_after": pruned,
        "recovery": plan.recovery,
        "evaluation": {"windows": evaluation_shape[0], "length": evaluation_shape[1]},
        **sizes,
        **extra,
    }
    if recovered is not None:
        report["perplexity_after"] = recovered
        report["perplexity_before_recovery"] = pruned
    checked = [r for r in recovery_reports if "heldout_before" in r]
    if checked:
        report["recovery_heldout"] = [
            {"step": r["step"], "before": r["heldout_before"], "after": r["heldout_after"]}
            for r in checked
        ]
        report["recovery_warnings"] = recovery_warnings(checked)
    return report
