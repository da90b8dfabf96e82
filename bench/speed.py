"""Inference speed of the dense SmolLM2-135M and its exported 20% model, both loaded with plain
transformers: greedy generation tokens/s (batch 1, 128 new tokens) and prefill time (512 tokens).

The pruned model is the uniform plan "L2, 20% of the decoder-block parameters" (the same heads
and MLP share in every layer), exported with ``explorer.export`` and loaded back with
``AutoModelForCausalLM.from_pretrained`` as any user would. Dense and pruned runs alternate within
each repetition so that a busy machine slows both alike; medians are reported. On the CPU the
process's CPU time is reported beside the wall clock: on a machine shared with other jobs the
wall clock mostly measures the neighbours, CPU time (with ``--threads 1``) the model's own cost.

    ./run python bench/speed.py [--device cuda] [--reps 5] [--threads 1] [--out bench/speed.md]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _common import machine_line, open_default, write_result
from transformers import AutoModelForCausalLM

from explorer.export.writer import count_params, export_model
from explorer.model.loading import embedded_cache_dir
from explorer.planning.plan import Plan


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """(wall-clock seconds, this process's CPU seconds) of ``fn()``, the device synchronised."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    sync()
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    sync()
    return time.perf_counter() - wall, time.process_time() - cpu


@torch.no_grad()
def prefill(model, ids: torch.Tensor) -> tuple[float, float]:
    """One forward pass over the whole prompt, filling the cache: the time to the first token."""
    return timed(lambda: model(ids, use_cache=True), ids.device)


@torch.no_grad()
def generation(model, ids: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """Greedy decoding of exactly ``new_tokens`` tokens after ``ids`` (its prefill included)."""

    def run():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=model.config.eos_token_id,
        )
        assert out.shape[1] == ids.shape[1] + new_tokens

    return timed(run, ids.device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--target", type=float, default=0.2)
    parser.add_argument("--round-to", type=int, default=1, help="kept MLP width multiple")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens for generation")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "speed.md")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    ex = open_default(args.device, evaluation_length=args.prefill, evaluation_windows=1)
    device = ex.workspace.device
    machine = machine_line(ex)
    plan = Plan(criterion="l2", target=args.target, round_to=args.round_to)
    sel = ex.select(plan)
    prefill_ids = ex.evaluation[:1].to(device)
    prompt_ids = prefill_ids[:, : args.prompt]
    with tempfile.TemporaryDirectory() as tmp:
        result = export_model(
            ex.model,
            ex.workspace.tokenizer,
            ex.structure,
            sel,
            Path(tmp) / "pruned",
            plan=plan.to_dict(),
            verify_ids=prefill_ids[:, :128].cpu(),
        )
        del ex  # from here on only plainly loaded models run
        models = {
            "dense": AutoModelForCausalLM.from_pretrained(embedded_cache_dir("smollm2-135m")),
            "pruned": AutoModelForCausalLM.from_pretrained(result.path),
        }
    for model in models.values():
        model.to(device).eval()
        generation(model, prompt_ids, 8)  # warm-up
    runs: dict[str, dict[str, list[tuple[float, float]]]] = {
        name: {"prefill": [], "generation": []} for name in models
    }
    for rep in range(args.reps):
        for name, model in models.items():
            runs[name]["prefill"].append(prefill(model, prefill_ids))
            runs[name]["generation"].append(generation(model, prompt_ids, args.new_tokens))
        print(f"repetition {rep + 1}/{args.reps} done", flush=True)

    def median(name: str, what: str, clock: int) -> float:
        return statistics.median(run[clock] for run in runs[name][what])

    def best(name: str, what: str) -> float:
        return min(run[0] for run in runs[name][what])

    cpu = device.type == "cpu"
    rows = []
    for name, model in models.items():
        cells = [
            name,
            f"{count_params(model):,}",
            f"{model.config.num_attention_heads} / {model.config.intermediate_size}",
            f"{1000 * median(name, 'prefill', 0):.0f} ({1000 * best(name, 'prefill'):.0f})",
            f"{args.new_tokens / median(name, 'generation', 0):.1f} "
            f"({args.new_tokens / best(name, 'generation'):.1f})",
        ]
        if cpu:
            cells += [
                f"{1000 * median(name, 'prefill', 1):.0f}",
                f"{args.new_tokens / median(name, 'generation', 1):.1f}",
            ]
        rows.append("| " + " | ".join(cells) + " |")

    def ratio(what: str, clock: int) -> float:
        return median("dense", what, clock) / median("pruned", what, clock)

    header = "| model | parameters | heads / MLP width | prefill ms | generation tokens/s |"
    summary = (
        f"Pruned vs dense, wall clock (medians): prefill {ratio('prefill', 0):.2f}x as fast, "
        f"generation {ratio('generation', 0):.2f}x the tokens/s."
    )
    if cpu:
        header += " prefill CPU ms | generation tokens per CPU-second |"
        summary += (
            f" CPU time: prefill {ratio('prefill', 1):.2f}x as fast, generation "
            f"{ratio('generation', 1):.2f}x the tokens per CPU-second."
        )
    text = "\n".join(
        [
            f"Dense SmolLM2-135M vs its export pruned uniformly by {args.target:.0%} of the "
            f"decoder-block parameters (L2; {result.report['params']['removed_share_of_total']:.1%} "
            "of all parameters), both loaded with plain `AutoModelForCausalLM.from_pretrained`. "
            f"Medians (best) of {args.reps} alternating repetitions; prefill = one forward pass "
            f"over {prefill_ids.shape[1]} tokens; generation = greedy, batch 1, {args.new_tokens} "
            f"new tokens after a {prompt_ids.shape[1]}-token prompt. {machine}",
            "",
            header,
            "|---" * header.count(" | ") + "|---|",
            *rows,
            "",
            summary,
        ]
    )
    print("\n" + text)
    write_result(args.out, text)


if __name__ == "__main__":
    main()
