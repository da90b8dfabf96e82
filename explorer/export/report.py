"""The report.json of a pruning run: one builder, so the CLI and the app write the same fields."""

from __future__ import annotations

from ..planning.plan import Plan


def pruning_report(
    plan: Plan,
    sizes: dict[str, float],
    evaluation_shape: tuple[int, ...],
    dense: float,
    pruned: float,
    recovered: float | None = None,
    **extra: float,
) -> dict:
    """What a run measured: the plan's method, perplexities, sizes, and ``extra`` (e.g. timings).

    ``sizes`` is ``Explorer.sizes(selection)``; ``evaluation_shape`` the (windows, length) of the
    evaluation windows. With recovery, ``perplexity_after`` is the recovered model's and the pruned
    one moves to ``perplexity_before_recovery``.
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
    return report
