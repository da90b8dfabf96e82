"""Issue 12's quality search: which update-compensated MLP-only plan, from which calibration.

SmolLM2-135M at ``--target`` of the decoder-block parameters, no fine-tuning. Calibration comes
from lee_background minus its last tenth of documents (as in bench/methods.py), or from text the
model generates itself (``--source generated``); the held-out tenth chooses between the settings;
lee.cor (20 x 256, the default protocol) and the off-domain Wikipedia text (20 x 256) are only
reported. Each setting's plan is resolved from one calibration pass, then previewed with the
correlated column update (``surgeon`` step, one shot) applied live: the number Export writes.
``--mix FILE`` takes half the calibration windows and half the sweep's windows from a third-domain
text (bench/RESULTS.md, 2026-12-06: it allocates a flatter, worse 20% plan).

    .venv/bin/python bench/quality.py --windows 32 64 --damping 0.01 0.1 --allocation global
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from _common import machine_line, mixed_windows

from explorer.apply.preview import LivePreview
from explorer.catalogue import CRITERIA
from explorer.data import builtin_text, self_generated_text, split_heldout, token_windows
from explorer.evaluate import perplexity
from explorer.model.loading import load_model
from explorer.planning.plan import Plan
from explorer.recovery.surgeon import UPDATE_NEEDS
from explorer.session import Explorer


def optional(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def texts(source: str, ws) -> str:
    """The calibration text of ``source``; the library holds its last tenth out."""
    if source == "lee":
        return builtin_text("calibration")
    return self_generated_text(ws.model, ws.tokenizer, n_samples=72, length=256, seed=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", type=float, nargs="+", default=[0.2])
    parser.add_argument("--sensitivity-windows", type=int, default=4)
    parser.add_argument("--heldout-windows", type=int, default=16, help="for choosing settings")
    parser.add_argument("--metric", nargs="+", default=["kl"], choices=("kl", "perplexity"))
    parser.add_argument("--windows", type=int, nargs="+", default=[32])
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--source", nargs="+", default=["lee"], choices=("lee", "generated"))
    parser.add_argument("--damping", type=float, nargs="+", default=[0.01])
    parser.add_argument(
        "--sensitivity-damping",
        type=float,
        nargs="+",
        default=None,
        help="dampings of the sensitivity allocation (each a sweep of its own; default --damping)",
    )
    parser.add_argument("--allocation", nargs="+", default=["global"])
    parser.add_argument("--max-ratio", type=optional, nargs="+", default=[None])
    parser.add_argument("--criterion", default="surgeon_greedy")
    parser.add_argument("--protect", type=int, nargs="+", default=[1])
    parser.add_argument("--head-ratio", type=optional, default=0.0, help="none: heads cut too")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.15, 0.3, 0.45, 0.6])
    parser.add_argument(
        "--mix",
        type=Path,
        default=None,
        help="a third-domain text file (bench/sotu_text.py): half the calibration windows (seed 2) "
        "and half the sweep's windows (seed 3) come from it; settings are still chosen on "
        "lee_background's held-out windows",
    )
    parser.add_argument("--log", type=Path, default=Path(__file__).parent / "results/quality.jsonl")
    args = parser.parse_args()
    torch.manual_seed(0)
    ws = load_model("smollm2-135m")
    # Every source's settings are compared on the same held-out tail of lee_background.
    _, held_text = split_heldout(builtin_text("calibration"))
    # Its first windows are the sweep's (the session's held-out), so choices use the ones after.
    sweep_n = args.sensitivity_windows
    held = token_windows(ws.tokenizer, held_text, 256, sweep_n + args.heldout_windows)[sweep_n:]
    off = token_windows(ws.tokenizer, builtin_text("offdomain"), 256, 20)
    args.log.parent.mkdir(parents=True, exist_ok=True)
    print(machine_line_for(ws), flush=True)
    for source in args.source:
        text = texts(source, ws)
        for n in args.windows:
            t0 = time.perf_counter()
            # The sweep runs on the session's held-out windows (the calibration text's tail),
            # every choice on ``held``: never on lee.cor or the off-domain text.
            ex = Explorer.from_texts(
                ws,
                text,
                builtin_text("evaluation"),
                calibration_windows=n,
                calibration_length=args.length,
                evaluation_windows=20,
            )
            if args.mix:
                ex = replace(
                    ex,
                    calibration=mixed_windows(ex, ex.calibration, args.mix, seed=2),
                    heldout=mixed_windows(ex, ex.heldout[:sweep_n], args.mix, seed=3),
                )
            ex.statistics(CRITERIA[args.criterion].needs | UPDATE_NEEDS)
            ex.scores(args.criterion)
            score_s = time.perf_counter() - t0
            for alloc in args.allocation:
                for cap in args.max_ratio:
                    for protect in args.protect:
                        sweep_alloc = alloc == "sensitivity"
                        for damping, target, metric in itertools.product(
                            args.sensitivity_damping or args.damping
                            if sweep_alloc
                            else args.damping,
                            args.target,
                            args.metric if sweep_alloc else args.metric[:1],
                        ):
                            steps = [{"step": "surgeon", "damping": damping}]
                            plan = Plan(
                                criterion=args.criterion,
                                target=target,
                                allocation=alloc,
                                head_ratio=args.head_ratio,
                                protect_first=protect,
                                protect_last=protect,
                                max_ratio=cap,
                                calibration_windows=n,
                                calibration_length=args.length,
                                recovery=steps,
                                sensitivity_ratios=args.ratios,
                                sensitivity_windows=args.sensitivity_windows,
                                sensitivity_metric=metric,
                            )
                            t1 = time.perf_counter()
                            sel = ex.select(plan, progress=log)
                            texts_ = {"heldout": held, "lee": ex.evaluation, "offdomain": off}
                            row = measure(ex, sel, steps, texts_)
                            row["resolve_s"] = round(time.perf_counter() - t1, 1)
                            row["plan"] = plan.to_dict()
                            row["mlp_removed"] = {k: len(v) for k, v in sel.mlp.items()}
                            row["selection"] = sel.to_dict()
                            if sweep_alloc:  # replayable: `prune --sensitivity FILE`
                                sweep_file = args.log.with_name(f"sweep_d{damping}.json")
                                sweep_file.write_text(ex.known_sensitivity(plan).to_json())
                            row.update(
                                source=source,
                                mix=args.mix.name if args.mix else None,
                                windows=n,
                                length=args.length,
                                allocation=alloc,
                                max_ratio=cap,
                                protect=protect,
                                damping=damping,
                                metric=metric,
                                target=target,
                                criterion=args.criterion,
                                scoring_s=round(score_s, 1),
                            )
                            print(json.dumps(row), flush=True)
                            with args.log.open("a") as f:
                                f.write(json.dumps(row) + "\n")


def log(fraction: float, message: str) -> None:
    print(f"  {fraction:4.0%} {message}", file=sys.stderr, flush=True)


def measure(ex: Explorer, sel, steps, texts_: dict) -> dict:
    """Perplexity of ``sel`` with ``steps`` applied live on each of ``texts_``, and the dense."""
    out = {}
    for name, windows in texts_.items():
        live = LivePreview(ex.model, ex.structure, windows, batch_size=1)
        out[name] = live.perplexity(sel, ex.compensation(steps))
        out[f"{name}_dense"] = dense(ex, name, windows)
    return out


_DENSE: dict[str, float] = {}


def dense(ex: Explorer, name: str, windows) -> float:
    if name not in _DENSE:
        _DENSE[name] = perplexity(ex.model, windows)
    return _DENSE[name]


def machine_line_for(ws) -> str:
    return machine_line(Explorer(ws, torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2)))


if __name__ == "__main__":
    main()
