"""GGUF exports in llama.cpp next to transformers: file size, perplexity and generation tokens/s of
the dense SmolLM2-135M and its 20% export, in one run.

The pruned model is the uniform plan "Wanda-sp, 20% of the decoder-block parameters, every
attention head kept" (MLP channels only, the better choice on this small GQA model), kept MLP
widths rounded to a multiple of 32 so that every matrix fills whole quantisation blocks. Both
models are written as GGUF by ``explorer.export`` in f16 and q8_0 (the dense one from the same
de-quantised weights, so both sides carry the same rounding) and run
through llama-cpp-python; the embedded source file (Q4_1, as published) runs beside them. The
transformers rows load the same weights in fp32. Perplexity: the project's evaluation protocol
(Lee test documents, 256-token windows, summed cross-entropy) on ``--windows`` windows, in each
runtime. Generation: greedy, batch 1, ``--new-tokens`` after a 32-token prompt; medians (best) of
``--reps`` alternating repetitions, wall clock and this process's CPU time, one thread each.

    ./run python bench/gguf_speed.py [--reps 3] [--windows 4] [--out bench/results/gguf.md]
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
from pathlib import Path

import torch
from _common import machine_line, open_default, write_result
from speed import generation, timed
from transformers import AutoModelForCausalLM

from explorer.evaluate import perplexity
from explorer.export.gguf_writer import llama_cpp_logits, source_gguf
from explorer.export.writer import export_model
from explorer.model.loading import embedded_cache_dir
from explorer.planning.plan import Plan

TYPES = ("f16", "q8_0")


def llama_cpp_perplexity(path: Path, windows: torch.Tensor) -> float:
    """Perplexity from llama.cpp's logits, summed over every window as ``evaluate.perplexity``."""
    logits = llama_cpp_logits(path, windows, threads=1)
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1), reduction="sum"
    )
    return math.exp(nll.item() / windows[:, 1:].numel())


def llama_cpp_generation(llm, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    """Greedy decoding of exactly ``new_tokens`` after ``prompt`` (its prefill included)."""

    def run():
        for produced, _ in enumerate(llm.generate(prompt, temp=0.0, reset=True), start=1):
            if produced == new_tokens:
                break

    return timed(run, torch.device("cpu"))


def main() -> None:
    from llama_cpp import Llama

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", type=float, default=0.2)
    parser.add_argument("--criterion", default="wanda_sp")
    parser.add_argument("--round-to", type=int, default=32, help="kept MLP width multiple")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "gguf.md")
    args = parser.parse_args()
    torch.set_num_threads(1)

    ex = open_default("cpu", evaluation_windows=args.windows)
    machine = machine_line(ex)
    windows = ex.evaluation.cpu()
    prompt = windows[:1, :32]
    plan = Plan(
        criterion=args.criterion, target=args.target, head_ratio=0.0, round_to=args.round_to
    )
    sel = ex.select(plan)
    widths = sorted(
        {sel.kept(ex.structure, i)["intermediate"] for i in sel.kept_layers(ex.structure)}
    )
    sizes_line = "/".join(map(str, widths)) + f" of {ex.structure.intermediate}"
    tmp = Path(tempfile.mkdtemp(prefix="bench-gguf-"))
    files: dict[str, Path] = {"dense Q4_1 (source file)": source_gguf(ex.model)}
    for outtype in TYPES:
        for name, selection in (("dense", type(sel)()), ("pruned", sel)):
            folder = tmp / f"{name}-{outtype}"
            export_model(
                ex.model, ex.workspace.tokenizer, ex.structure, selection, folder,
                plan=plan.to_dict(), format="gguf", gguf_type=outtype, verify_ids=windows[:1, :64],
            )  # fmt: skip
            files[f"{name} {outtype}"] = folder / f"model-{outtype}.gguf"
    pruned_hf = tmp / "pruned-hf"
    export_model(ex.model, ex.workspace.tokenizer, ex.structure, sel, pruned_hf, verify_ids=prompt)
    del ex
    hf = {
        "dense fp32 (transformers)": AutoModelForCausalLM.from_pretrained(
            embedded_cache_dir("smollm2-135m")
        ),
        "pruned fp32 (transformers)": AutoModelForCausalLM.from_pretrained(pruned_hf),
    }
    sizes = {
        "dense fp32 (transformers)": (embedded_cache_dir("smollm2-135m") / "model.safetensors"),
        "pruned fp32 (transformers)": pruned_hf / "model.safetensors",
        **files,
    }
    ppl = {name: perplexity(model.eval(), windows) for name, model in hf.items()}
    ppl.update({name: llama_cpp_perplexity(path, windows) for name, path in files.items()})
    llms = {
        name: Llama(model_path=str(path), n_ctx=256, n_threads=1, verbose=False, seed=0)
        for name, path in files.items()
    }
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in sizes}
    ids = prompt[0].tolist()
    for llm in llms.values():
        llama_cpp_generation(llm, ids, 8)  # warm-up
    for model in hf.values():
        generation(model, prompt, 8)
    for rep in range(args.reps):
        for name, model in hf.items():
            runs[name].append(generation(model, prompt, args.new_tokens))
        for name, llm in llms.items():
            runs[name].append(llama_cpp_generation(llm, ids, args.new_tokens))
        print(f"repetition {rep + 1}/{args.reps} done", flush=True)

    rows = []
    for name in sizes:
        wall = statistics.median(r[0] for r in runs[name])
        cpu = statistics.median(r[1] for r in runs[name])
        best = min(r[0] for r in runs[name])
        rows.append(
            f"| {name} | {sizes[name].stat().st_size / 1e6:.1f} | {ppl[name]:.2f} | "
            f"{args.new_tokens / wall:.1f} ({args.new_tokens / best:.1f}) | "
            f"{args.new_tokens / cpu:.1f} |"
        )
    header = (
        "| model | file MB | perplexity | tokens/s wall, median (best) | tokens per CPU-second |"
    )
    text = "\n".join(
        [
            f"Dense SmolLM2-135M and its export pruned uniformly by {args.target:.0%} of the "
            f"decoder-block parameters ({args.criterion}, every head kept, MLP widths "
            f"{sizes_line}), in llama.cpp (llama-cpp-python, GGUF written by "
            f"`--format gguf`, arch `llama`) and in transformers (fp32 safetensors). Perplexity on "
            f"{windows.shape[0]} x {windows.shape[1]} Lee test tokens in each runtime; generation "
            f"greedy, batch 1, {args.new_tokens} new tokens after a {prompt.shape[1]}-token "
            f"prompt, {args.reps} alternating repetitions, 1 thread. {machine}",
            "",
            header,
            "|---" * header.count(" | ") + "|---|",
            *rows,
        ]
    )
    print("\n" + text)
    write_result(args.out, text)


if __name__ == "__main__":
    main()
