"""Criterion x target -> perplexity, parameter count, scoring time, on the default model and text.

One protocol everywhere: the evaluation documents joined with blank lines, tokenised once, cut
into non-overlapping 256-token windows, summed cross-entropy; calibration windows (10 x 64 tokens,
LLM-Pruner's amount) drawn from the calibration text only. Every criterion shares one calibration
pass (the session collects the union of what they need once), so the scoring time of a criterion
is the time of its own arithmetic plus, for the first one that needs a pass, that pass.

    ./run python bench/criteria.py [--targets 0.2 0.3 0.5] [--device cuda] [--out bench/results]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from _common import machine_line, open_default, write_result

from explorer.catalogue import CRITERIA
from explorer.planning.plan import Plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--targets", type=float, nargs="+", default=[0.2, 0.3, 0.5])
    parser.add_argument("--criteria", nargs="+", default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--protect-first", type=int, default=4)
    parser.add_argument("--protect-last", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    ex = open_default(args.device)
    dense = ex.dense_perplexity()
    criteria = args.criteria or CRITERIA.names()
    # Collect every criterion's needs in one pass first, and time it on its own.
    t0 = time.perf_counter()
    needs = None
    for name in criteria:
        crit = CRITERIA[name]
        needs = crit.needs if needs is None else needs | crit.needs
    ex.statistics(needs)
    pass_s = time.perf_counter() - t0
    rows = []
    for name in criteria:
        t0 = time.perf_counter()
        ex.scores(name, "sum")
        score_s = time.perf_counter() - t0
        for target in args.targets:
            plan = Plan(
                criterion=name,
                target=target,
                protect_first=args.protect_first,
                protect_last=args.protect_last,
            )
            sel = ex.select(plan)
            sizes = ex.sizes(sel)
            ppl = ex.perplexity(sel)
            block_share = 1 - sizes["block_params_after"] / sizes["block_params_before"]
            all_share = 1 - sizes["params_after"] / sizes["params_before"]
            rows.append(
                f"| {name} | {target:.0%} | {ppl:.2f} | {sizes['params_after']:,} | "
                f"{block_share:.1%} | {all_share:.1%} | {score_s:.2f} |"
            )
            print(rows[-1], flush=True)
    text = "\n".join(
        [
            f"Dense perplexity {dense:.2f}; {ex.evaluation.shape[0]} x {ex.evaluation.shape[1]} "
            f"evaluation tokens (lee.cor), calibration {ex.calibration.shape[0]} x "
            f"{ex.calibration.shape[1]} tokens (lee_background.cor). Allocation: uniform ratio "
            f"for heads and MLP channels, first {args.protect_first} and last "
            f"{args.protect_last} layers whole (LLM-Pruner's default), MLP count fitted to the "
            "target. Shared calibration pass (gradients, Fisher, activations): "
            f"{pass_s:.1f} s. {machine_line(ex)}",
            "",
            "| criterion | target (block params) | perplexity | params after | block params "
            "removed | all params removed | scoring s |",
            "|---|---|---|---|---|---|---|",
            *rows,
        ]
    )
    write_result(args.out / "criteria.md", text)


if __name__ == "__main__":
    main()
