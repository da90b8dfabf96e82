"""Time to scores for every criterion together, vs one plain forward+backward pass.

Each phase runs in its own process so that its peak memory is its own: ``plain`` (forward and
backward over the calibration windows, one window at a time, gradients discarded), ``all`` (one
shared calibration pass collecting what every registered criterion needs, then every criterion's
scores), and, to show where the time goes, the same for subsets: every criterion but LLM Surgeon,
LLM-Pruner's gradient criteria, and the forward-only ones. Peak memory is the process's peak resident size (CPU) or peak allocated
(CUDA), minus what it held right after loading the model, and is also given as a multiple of the
fp32 model size.

    ./run python bench/scoring.py [--device cuda] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from _common import machine_line, open_default, write_result

from explorer.catalogue import CRITERIA
from explorer.evaluate import window_nll
from explorer.scoring.base import Needs


def peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


SURGEON = ("surgeon",)
PHASES = {
    "all": lambda c: True,
    "all but surgeon": lambda c: c not in SURGEON,
    "LLM-Pruner's (gradients, Fisher)": lambda c: c in ("taylor", "taylor_e1", "taylor_e2"),
    "forward-only": lambda c: (
        CRITERIA[c].needs.gradients is False and not CRITERIA[c].needs.output_gradient_covariance
    ),
}


def phase(name: str, device: str | None) -> dict:
    ex = open_default(device)
    dev = ex.workspace.device
    model_bytes = sum(p.numel() * p.element_size() for p in ex.model.parameters())
    base = peak_bytes(dev)
    t0 = time.perf_counter()
    if name == "plain":
        for ids in ex.calibration:
            ids = ids[None].to(dev)
            window_nll(ex.model(ids, use_cache=False).logits, ids).sum().backward()
        ex.model.zero_grad(set_to_none=True)
    else:
        chosen = [c for c in CRITERIA.names() if PHASES[name](c)]
        needs = Needs()
        for c in chosen:
            needs = needs | CRITERIA[c].needs
        ex.statistics(needs)
        for c in chosen:
            ex.scores(c, "sum")
    if dev.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "extra": peak_bytes(dev) - base, "model": model_bytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--phase", choices=("plain", *PHASES), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(phase(args.phase, args.device)))
        return
    runs: dict[str, list[dict]] = {"plain": [], **{name: [] for name in PHASES}}
    for _ in range(args.repeats):
        for name in runs:  # alternate, so load changes hit both alike
            cmd = [sys.executable, __file__, "--phase", name]
            if args.device:
                cmd += ["--device", args.device]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            runs[name].append(json.loads(out.strip().splitlines()[-1]))
            print(name, runs[name][-1], flush=True)
    med = {k: statistics.median(r["seconds"] for r in v) for k, v in runs.items()}
    extra = {k: max(r["extra"] for r in v) for k, v in runs.items()}
    model = runs["all"][0]["model"]
    ex = open_default(args.device)
    text = "\n".join(
        [
            f"Calibration {ex.calibration.shape[0]} x {ex.calibration.shape[1]} tokens; criteria: "
            f"{', '.join(CRITERIA.names())}; median of {args.repeats} alternating runs, each "
            f"in a fresh process. fp32 model: {model / 2**20:.0f} MiB. {machine_line(ex)}",
            "",
            "| phase | seconds | ratio | extra peak memory | x model size |",
            "|---|---|---|---|---|",
            *(
                f"| {k} | {med[k]:.2f} | {med[k] / med['plain']:.2f}x | "
                f"{extra[k] / 2**20:.0f} MiB | {(extra[k] + model) / model:.2f}x |"
                for k in runs
            ),
        ]
    )
    write_result(args.out / "scoring.md", text)


if __name__ == "__main__":
    main()
