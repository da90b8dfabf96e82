"""Issue 12, item 4: does the held-out check of recovery steps flag the step that hurts?

The `best` preset's plan at the app's old calibration (10 x 64 tokens), with the surgeon update
as the preset damps it (0.1) and at the step's default damping, which the issue saw make the
Recover tab's number worse. Each row: evaluation perplexity (lee.cor, 4 x 256) before and after
the step, and what the session's held-out calibration slice (4 x 256 of lee_background's last
tenth) said, with the warning if any.

    python bench/heldout_check.py [--windows 10] [--length 64]
"""

from __future__ import annotations

import argparse
import time

from _common import machine_line

from explorer.evaluate import perplexity
from explorer.planning.presets import load_preset
from explorer.session import Explorer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--windows", type=int, default=10)
    parser.add_argument("--length", type=int, default=64)
    args = parser.parse_args()
    plan = load_preset("best")
    plan.calibration_windows, plan.calibration_length = args.windows, args.length
    ex = Explorer.open(plan, evaluation_windows=4)
    print(machine_line(ex))
    sel = ex.select(plan)
    pruned = ex.perplexity(sel)
    print(f"masks only: lee.cor {pruned:.2f}")
    for steps in (plan.recovery, [{"step": "surgeon"}]):
        t0 = time.perf_counter()
        model, (report,) = ex.recover(sel, steps)
        after = perplexity(model, ex.evaluation)
        print(
            f"{steps}: lee.cor {pruned:.2f} -> {after:.2f}; held-out "
            f"{report['heldout_before']:.2f} -> {report['heldout_after']:.2f}; "
            f"{time.perf_counter() - t0:.0f} s; warning: {report.get('warning')}"
        )


if __name__ == "__main__":
    main()
