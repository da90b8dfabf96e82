"""Live preview: time to the updated perplexity after one layer's ratio changes, vs a full recompute.

SmolLM2-135M, default preview set of 1,024 tokens (4 windows of 256 from lee.cor). A plan cuts
20% of every layer's MLP; then one layer (at 25%, 50% and 90% depth) gets a different ratio. For
each, in the same run: the full recompute (the masked model's own forward over every window), the
incremental preview (``LivePreview``: restart from the first changed layer), and the time to its
first streamed value. Each timing is the median of ``--repeats`` alternating runs, so the ratios
hold on a noisy machine. The output head's share of a full pass (final norm, the 49,152 x 576
projection and the cross-entropy, timed from the kept final states) gives the floor of any
restart: a restart at layer l still runs the layers after l and the whole head.

    ./run python bench/preview.py [--device cuda] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from _common import machine_line, open_default, write_result

from explorer.apply.masking import masked
from explorer.apply.preview import LivePreview
from explorer.evaluate import perplexity, window_nll
from explorer.planning.selection import Selection


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument(
        "--compensated",
        action="store_true",
        help="only the compensated preview (live surgeon update) against a plain full recompute",
    )
    args = parser.parse_args()
    ex = open_default(args.device, evaluation_windows=4)
    s, model, windows = ex.structure, ex.model, ex.evaluation
    cut = {layer: list(range(0, s.intermediate, 5)) for layer in range(s.num_layers)}
    base = Selection.make(s, mlp=cut)
    if args.compensated:
        compensated(ex, base, cut, args)
        return
    live = LivePreview(model, s, windows, batch_size=1)
    live.perplexity(base)
    rows, head_t = [], []
    for depth in (0.25, 0.5, 0.9):
        layer = int(depth * s.num_layers)
        changed = dict(cut)
        changed[layer] = list(range(0, s.intermediate, 3))
        variants = [Selection.make(s, mlp=changed), base]
        full_t, live_t, first_t = [], [], []
        for i in range(args.repeats):
            sel = variants[i % 2]
            t0 = time.perf_counter()
            with masked(model, s, sel):
                expected = perplexity(model, windows, batch_size=1)
            full_t.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            steps = live.run(sel)
            next(steps)
            first_t.append(time.perf_counter() - t0)
            last = list(steps)[-1]
            live_t.append(time.perf_counter() - t0)
            assert abs(last.perplexity - expected) <= 1e-5 * expected
            head_t.append(head_seconds(live))
        full, inc, first = (statistics.median(t) for t in (full_t, live_t, first_t))
        head = statistics.median(head_t) / full
        floor = head + (1 - head) * (s.num_layers - layer) / s.num_layers
        rows.append(
            f"| layer {layer} ({depth:.0%}) | {full:.2f} | {inc:.2f} | {inc / full:.2f}x | "
            f"{floor:.2f}x | {first:.2f} | {first / full:.2f}x |"
        )
        print(rows[-1], flush=True)
    text = "\n".join(
        [
            f"Preview set {windows.shape[0]} x {windows.shape[1]} tokens, streamed one window at a "
            f"time; median of {args.repeats} runs; incremental results equal the full recompute to "
            f"1e-5 relative (asserted). Kept states: {live.cache_bytes / 2**20:.0f} MiB "
            f"(stride {live.stride}). The output head (final norm, projection, cross-entropy) "
            f"is {statistics.median(head_t):.2f} s of a full pass; 'floor' = head share + the "
            f"share of the layers from the changed one on. {machine_line(ex)}",
            "",
            "| changed layer | full recompute s | incremental s | ratio | floor | first value s "
            "| ratio |",
            "|---|---|---|---|---|---|---|",
            *rows,
        ]
    )
    write_result(args.out / "preview.md", text)


def compensated(ex, base: Selection, cut: dict, args) -> None:
    """Issue 12: one layer changes under the live ``surgeon`` update; against a plain recompute.

    The incremental run restarts at the changed layer and recomputes that layer's correlated
    update from its cached inverse covariance (the other layers' patches are cached); the reference is the masked model's full forward without
    any update, the cost of the preview before it showed what Export writes.
    """
    s, model, windows = ex.structure, ex.model, ex.evaluation
    steps = [{"step": "surgeon"}]
    t0 = time.perf_counter()
    comp = ex.compensation(steps)  # the forward-only pass for the input covariances
    stats_s = time.perf_counter() - t0
    live = LivePreview(model, s, windows, batch_size=1)
    t0 = time.perf_counter()
    live.perplexity(base, comp)
    first_s = time.perf_counter() - t0
    rows = []
    for depth in (0.25, 0.5, 0.9):
        layer = int(depth * s.num_layers)
        full_t, live_t = [], []
        for i in range(args.repeats):
            changed = dict(cut)
            changed[layer] = list(range(0, s.intermediate, 3 + i))  # a new cut: no cached update
            sel = Selection.make(s, mlp=changed)
            t0 = time.perf_counter()
            with masked(model, s, sel):
                perplexity(model, windows, batch_size=1)
            full_t.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            live.perplexity(sel, comp)
            live_t.append(time.perf_counter() - t0)
        full, inc = statistics.median(full_t), statistics.median(live_t)
        rows.append(f"| layer {layer} ({depth:.0%}) | {full:.2f} | {inc:.2f} | {inc / full:.2f}x |")
        print(rows[-1], flush=True)
    text = "\n".join(
        [
            f"Compensated preview: a plan cutting 20% of every layer's MLP previewed with the live "
            f"`surgeon` update (one shot, column update of down_proj from the dense input "
            f"covariance, the update Export applies); then one layer gets a new cut, so its "
            f"update is recomputed (from the cached 1,536 x 1,536 float64 inverse of its input "
            f"covariance: one solve the size of the cut) and the preview restarts there. Reference: the masked model's full forward without any update. Preview set "
            f"{windows.shape[0]} x {windows.shape[1]} tokens; median of {args.repeats} runs. "
            f"Once per session: the input covariances' forward pass over the calibration windows "
            f"({ex.calibration.shape[0]} x {ex.calibration.shape[1]}) {stats_s:.1f} s, the first "
            f"compensated preview (30 updates) {first_s:.1f} s. {machine_line(ex)}",
            "",
            "| changed layer | plain full recompute s | compensated incremental s | ratio |",
            "|---|---|---|---|",
            *rows,
        ]
    )
    write_result(args.out / "preview_compensated.md", text)


@torch.no_grad()
def head_seconds(live: LivePreview) -> float:
    """Time of the output head alone over every window, from the kept final hidden states."""
    last = live.structure.num_layers
    if live.stride != 1:
        raise SystemExit("the head timing needs every boundary kept (stride 1)")
    t0 = time.perf_counter()
    for b in range(live.num_batches):
        window_nll(live.logits(live.kept_state(b, last)), live.batch(b))
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
