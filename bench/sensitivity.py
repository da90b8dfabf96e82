"""Sensitivity sweep: time of the incremental sweep against the same points fully recomputed.

SmolLM2-135M, every layer, query heads and MLP channels, 5 ratios (0.1 ... 0.9; ratios that
round to no head, to every head or to the same cut as the previous ratio are skipped or repeated,
as the sweep does), 4 preview windows of 256 tokens from lee.cor, criterion ``--criterion``. In one
run, layer by layer: the sweep's points for that layer (``explorer.sensitivity.sweep``: one
``LivePreview`` restarting at the cut layer) and then the same points each computed by the masked
model's own full forward, so a change in the machine's load hits both alike. The two must agree
(perplexity to 1e-4 relative). Writes the points as JSON/CSV beside the markdown.

    .venv/bin/python bench/sensitivity.py [--criterion l2] [--recovery surgeon]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from _common import machine_line, open_default, write_result

from explorer.apply.masking import masked
from explorer.apply.sensitivity import Point, Sensitivity, mean_kl, single_layer_plan, sweep
from explorer.evaluate import window_nll
from explorer.planning.plan import Plan, allocate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--criterion", default="l2")
    parser.add_argument("--ratios", default="0.1,0.3,0.5,0.7,0.9")
    parser.add_argument("--kinds", default="head,mlp")
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--layer-step", type=int, default=1, help="every n-th layer only")
    parser.add_argument("--recovery", default="", help="live steps applied, e.g. surgeon")
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    ex = open_default(args.device, evaluation_windows=args.windows)
    s, model, windows = ex.structure, ex.model, ex.evaluation
    steps = [{"step": name} for name in args.recovery.split(",") if name]
    plan = Plan(criterion=args.criterion, recovery=steps)
    ratios = [float(r) for r in args.ratios.split(",")]
    kinds = args.kinds.split(",")
    t0 = time.perf_counter()
    scores = ex.scores(args.criterion)
    comp = ex.compensation(steps)
    setup_s = time.perf_counter() - t0
    with torch.no_grad():
        dense_logits = [model(w[None]).logits for w in windows]

    points: list[Point] = []
    sweep_s = full_s = 0.0
    worst = 0.0
    layers = list(range(0, s.num_layers, args.layer_step))
    stream = sweep(
        model,
        s,
        scores,
        windows,
        plan,
        kinds=kinds,
        ratios=ratios,
        compensation=comp,
        layers=layers,
    )
    t0 = time.perf_counter()
    dense_ppl = next(stream)
    sweep_s += time.perf_counter() - t0
    pending = []
    layer_done = -1

    def full_recompute(batch: list[Point]) -> float:
        """The points of one layer, each by the masked (and patched) model's full forward."""
        nonlocal worst
        t = time.perf_counter()
        seen: set[str] = set()
        for p in batch:
            sel = allocate(single_layer_plan(plan, s, p.layer, p.kind, p.ratio), s, scores)
            key = json.dumps(sel.to_dict())
            if key in seen:
                continue
            nll, kl = 0.0, 0.0
            with torch.no_grad(), masked(model, s, sel), _patched(comp, sel):
                for dense, w in zip(dense_logits, windows, strict=True):
                    logits = model(w[None]).logits  # one forward gives both numbers
                    nll += float(window_nll(logits, w[None]).sum())
                    kl += mean_kl(dense, logits) / len(windows)
            ppl = math.exp(nll / (windows.numel() - windows.shape[0]))
            seen.add(key)
            worst = max(worst, abs(ppl - p.perplexity) / ppl, abs(kl - p.kl))
        return time.perf_counter() - t

    while True:
        t0 = time.perf_counter()
        point = next(stream, None)
        sweep_s += time.perf_counter() - t0
        if point is None or (pending and point.layer != layer_done):
            full_s += full_recompute(pending)
            print(f"layer {layer_done}: sweep {sweep_s:.0f} s, full {full_s:.0f} s", flush=True)
            pending = []
        if point is None:
            break
        points.append(point)
        pending.append(point)
        layer_done = point.layer

    sens = Sensitivity(
        criterion=args.criterion,
        reduction="-",
        kinds=kinds,
        ratios=ratios,
        windows=list(windows.shape),
        steps=steps,
        text="evaluation",
        dense_perplexity=dense_ppl,
        points=points,
        seconds=sweep_s,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"sensitivity_{args.criterion}" + (f"_{args.recovery}" if steps else "")
    (args.out / f"{stem}.json").write_text(sens.to_json())
    (args.out / f"{stem}.csv").write_text(sens.to_csv())
    measured = len({(p.layer, p.kind, p.removed) for p in points})
    lines = [
        "## Sensitivity sweep (`bench/sensitivity.py`, issue 12)",
        "",
        f"SmolLM2-135M, criterion `{args.criterion}`, live steps: "
        f"{', '.join(e['step'] for e in steps) or 'none'}; layers {layers}, {', '.join(kinds)}, "
        f"ratios {ratios}; {windows.shape[0]} preview windows x {windows.shape[1]} tokens of "
        f"lee.cor. {len(points)} points, {measured} distinct cuts (ratios that round to the same "
        "cut repeat the point; no head or every head of a layer is skipped). Sweep and full "
        "recomputes interleaved layer by layer in one run. " + machine_line(ex),
        "",
        "| | seconds | per distinct cut |",
        "|---|---|---|",
        f"| sweep (incremental preview, restart at the cut layer) | {sweep_s:.1f} | "
        f"{sweep_s / measured:.2f} |",
        f"| the same points, full recomputes | {full_s:.1f} | {full_s / measured:.2f} |",
        f"| ratio | {sweep_s / full_s:.2f}x | |",
        "",
        f"- scoring and statistics before the sweep: {setup_s:.0f} s; largest disagreement "
        f"(perplexity relative, KL absolute): {worst:.1e}",
        f"- points: `bench/results/{stem}.json` / `.csv`",
    ]
    print("\n".join(lines))
    write_result(args.out / f"{stem}.md", "\n".join(lines))
    print(json.dumps({"sweep_s": sweep_s, "full_s": full_s}))


def _patched(comp, sel):
    from contextlib import nullcontext

    return comp.applied(sel) if comp is not None else nullcontext()


if __name__ == "__main__":
    main()
