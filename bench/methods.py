"""Issue 5's table: each method at 20% of the block parameters, without recovery, with layer-wise
least squares and with LoRA, on the default model and text; the best one also at 50%.

Calibration comes from lee_background only, split by document: the last tenth is a held-out
*selection* slice, used to choose between allocations without touching lee.cor; the rest gives the
calibration windows (many more than LLM-Pruner's 10 x 64: a 1,536-wide input covariance needs far
more than a thousand tokens). The in-project baseline (Taylor E1) keeps LLM-Pruner's own 10 x 64
windows and allocation. Every row is appended to the markdown as soon as it is measured.

Issue 11 adds an off-domain column (Wikipedia lead paragraphs, ``builtin_text("offdomain")``,
never used for calibration or recovery), depth plans (Block Influence, depth + width mixes) and
the recovery steps ``distill``, ``linear_replace`` and ``layerwise_robust``; ``+`` chains steps.

    ./run python bench/methods.py [--windows 32] [--length 256] [--lora-steps 20] [--shots 2]
    ./run python bench/methods.py --best "depth2, MLP only, protect 1+1" --rows best:distill
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from _common import machine_line, mixed_windows, write_result

from explorer.apply.masking import masked
from explorer.apply.pruning import prune_model
from explorer.catalogue import CRITERIA, RECOVERY_STEPS
from explorer.data import builtin_text, split_heldout, token_windows
from explorer.evaluate import generate, perplexity
from explorer.model.loading import load_model
from explorer.planning.plan import Plan, allocate
from explorer.planning.selection import Selection
from explorer.recovery.distill import PROMPT_TOKENS
from explorer.recovery.steps import RecoveryContext, lora_recovery, run_steps
from explorer.recovery.surgeon import surgeon_prune
from explorer.recovery.training import PRECISIONS, SCHEDULES
from explorer.scoring.flap import FLAP_NEEDS
from explorer.session import Explorer

CALIBRATION = "lee_background (first 9/10)"
ROWS = [
    f"{key}:{recovery}"
    for key in (
        "best",
        "taylor_e1",
        "wanda_sp",
        "flap",
        "depth2",
        "surgeon",
        "surgeon_mlp",
        "obs",
        "surgeon_greedy",
    )
    for recovery in ("none", "layerwise", "lora")
] + ["dense:lora", "half:none", "half:layerwise", "greedy_half:none", "greedy_half:layerwise"]
HALF_KEYS = ("half", "greedy_half", "bi_half", "mix_half")
STEP_LABELS = {
    "none": "none",
    "layerwise": "layer-wise LS",
    "layerwise_robust": "robust layer-wise LS",
    "lora": "LoRA",
    "distill": "distillation",
    "linear_replace": "linear replacement",
}
PROMPT = "Write a short news report about a bushfire threatening homes near Sydney."


Spent = tuple[float, float]  # (wall seconds, CPU seconds of this process, all its threads)


def now() -> Spent:
    return time.perf_counter(), time.process_time()


def since(start: Spent) -> Spent:
    wall, cpu = now()
    return wall - start[0], cpu - start[1]


def plus(a: Spent, b: Spent) -> Spent:
    return a[0] + b[0], a[1] + b[1]


@dataclass
class Method:
    """A table row's recipe: the plan, and the steps that belong to the method itself."""

    key: str
    label: str
    plan: Plan
    own_steps: list[dict] = field(default_factory=list)  # e.g. FLAP's bias compensation
    small_calibration: bool = False  # LLM-Pruner's 10 x 64 windows
    shots: int = 0  # > 0: LLM Surgeon multi-shot with its weight updates
    surgeon_windows: bool = True  # multi-shot on --surgeon-windows windows only (else all)


@dataclass
class Bench:
    ex: Explorer  # large calibration
    small: Explorer  # LLM-Pruner's calibration
    selection_windows: torch.Tensor
    offdomain: torch.Tensor  # the second evaluation domain (Wikipedia)
    args: argparse.Namespace
    rows: list[str] = field(default_factory=list)
    last: torch.nn.Module | None = None
    notes: list[str] = field(default_factory=list)
    pruned: dict[str, tuple] = field(default_factory=dict)  # method key -> prune() result
    _dense_off: float | None = None
    distill_windows: torch.Tensor | None = None  # distillation's own text (else calibration's)
    calibration_text: str = CALIBRATION

    # -- pruning --------------------------------------------------------------------------------------
    def prune(self, m: Method) -> tuple[torch.nn.Module, object, float]:
        """(a fresh copy of the method's pruned model with its own steps, selection, seconds).

        Each method is pruned once; its recovery rows start from copies of that model.
        """
        if m.key not in self.pruned:
            self.pruned[m.key] = self._prune(m)
        model, sel, seconds = self.pruned[m.key]
        return copy.deepcopy(model), sel, seconds

    def _prune(self, m: Method) -> tuple[torch.nn.Module, object, float]:
        ex = self.small if m.small_calibration else self.ex
        t0 = now()
        if m.shots:
            scores_to_sel = lambda scores: allocate(m.plan, ex.structure, scores)  # noqa: E731
            model, sel = surgeon_prune(
                ex.model,
                ex.structure,
                scores_to_sel,
                self.shot_windows(m, ex),
                shots=m.shots,
                criterion=CRITERIA[m.plan.criterion],
                batch_size=4,
            )
        else:
            sel = ex.select(m.plan)
            model = prune_model(ex.model, ex.structure, sel)
            run_steps(m.own_steps, self.context(model, sel, ex), RECOVERY_STEPS)
        return model, sel, since(t0)

    def context(self, pruned, sel, ex: Explorer | None = None) -> RecoveryContext:
        ex = ex or self.ex
        return RecoveryContext(
            ex.model,
            pruned,
            ex.structure,
            sel,
            self.ex.calibration,
            ex._stats,
            progress=log,
            heldout=self.selection_windows,  # each step's report: held-out before and after
            tokenizer=ex.workspace.tokenizer,
        )

    # -- rows -------------------------------------------------------------------------------------------
    def row(self, label: str, recovery: str, model, sel, seconds: Spent, calib: str) -> float:
        ex = self.ex
        ppl = perplexity(model, ex.evaluation)
        off = perplexity(model, self.offdomain)
        sizes = ex.sizes(sel)
        block = 1 - sizes["block_params_after"] / sizes["block_params_before"]
        share = 1 - sizes["params_after"] / sizes["params_before"]
        n_params = sum(p.numel() for p in model.parameters())
        self.rows.append(
            f"| {label} | {recovery} | {ppl:.2f} | {off:.2f} | {n_params:,} | {block:.1%} | "
            f"{share:.1%} | "
            f"{ex.evaluation.shape[1]} | {calib} | {self.calibration_text} | lee.cor | "
            f"{seconds[0]:.0f} | {seconds[1]:.0f} |"
        )
        print(self.rows[-1], flush=True)
        self.write()
        return ppl

    def shot_windows(self, m: Method, ex: Explorer) -> torch.Tensor:
        return ex.calibration[: self.args.surgeon_windows] if m.surgeon_windows else ex.calibration

    def calib_label(self, m: Method) -> str:
        ex = self.small if m.small_calibration else self.ex
        c = ex.calibration
        if m.shots:
            c = self.shot_windows(m, ex)
        return f"{c.shape[0]} x {c.shape[1]}"

    def run_row(self, m: Method, recovery: str) -> None:
        """One row: ``m`` pruned, then ``recovery`` (none, layerwise, lora or layerwise+lora)."""
        if m.key == "dense":
            model, sel, seconds = copy.deepcopy(self.ex.model), Selection(), (0.0, 0.0)
        else:
            model, sel, seconds = self.prune(m)
        t0 = now()
        for step in recovery.split("+"):
            if step == "lora":
                losses = self.lora(model)
                self.notes.append(
                    f"{m.label}, {recovery}: LoRA loss {losses[0]:.3f} -> {losses[-1]:.3f}"
                )
            elif step != "none":
                ex = self.small if m.small_calibration else self.ex
                context = self.context(model, sel, ex)
                if step == "distill" and self.distill_windows is not None:
                    context = replace(context, windows=self.distill_windows)
                (report,) = run_steps([self.step_entry(step)], context, RECOVERY_STEPS)
                if "heldout_before" in report:
                    self.notes.append(
                        f"{m.label}, {recovery}: {step} on the held-out slice "
                        f"{report['heldout_before']:.2f} -> {report['heldout_after']:.2f}"
                    )
                if report.get("losses"):
                    losses = report["losses"]
                    self.notes.append(
                        f"{m.label}, {recovery}: {step} loss {losses[0]:.4f} -> {losses[-1]:.4f} "
                        f"({len(losses)} steps, {report.get('tokens', 0):,} tokens of "
                        f"{report.get('text', 'calibration')} text)"
                    )
                elif step == "linear_replace":
                    runs = ", ".join(
                        f"{r['layers']}: {r['error_before']:.3f} -> {r['error_after']:.3f}"
                        for r in report["runs"]
                    )
                    self.notes.append(f"{m.label}, {recovery}: gap errors {runs}")
        label = " + ".join(STEP_LABELS[step] for step in recovery.split("+"))
        self.row(m.label, label, model, sel, plus(seconds, since(t0)), self.calib_label(m))
        self.last = model

    def step_entry(self, step: str) -> dict:
        """A recovery step with this run's parameters (distillation's from the command line)."""
        if step != "distill":
            return {"step": step}
        a = self.args
        return {
            "step": "distill",
            "steps": a.distill_steps,
            "lr": a.distill_lr,
            "batch_size": a.distill_batch,
            "top_k": a.distill_top_k,
            "temperature": a.distill_temperature,
            "schedule": a.distill_schedule,
            "warmup": a.distill_warmup,
            "precision": a.distill_precision,
            "hidden_weight": a.distill_hidden,
            "lora_rank": a.distill_lora_rank,
            "generated": a.distill_generated,
            "generated_count": a.distill_generated_count,
            "generated_prompt": a.distill_generated_prompt,
            "text_file": str(a.distill_text or ""),
            "text_windows": a.distill_text_windows,
            "with_calibration": a.distill_with_calibration,
            "cache_teacher": a.distill_top_k > 0,
        }

    def sample(self, m: Method, recovery: str) -> None:
        tok = self.ex.workspace.tokenizer
        ids, n = generate(self.last, tok, PROMPT, max_new_tokens=60)
        text = tok.decode(ids[n:], skip_special_tokens=True).replace("\n", " ")
        self.notes.append(f"{m.label} ({recovery}), greedy, prompt {PROMPT!r}: {text!r}")
        self.write()

    def lora(self, model) -> list[float]:
        a = self.args
        return lora_recovery(
            model, self.ex.calibration, steps=a.lora_steps, batch_size=a.lora_batch, lr=a.lora_lr
        )

    def heldout(self, sel) -> float:
        """Perplexity of the masked view on the selection slice of the calibration text."""
        with masked(self.ex.model, self.ex.structure, sel):
            return perplexity(self.ex.model, self.selection_windows)

    # -- output -------------------------------------------------------------------------------------------
    def write(self) -> None:
        ex, a = self.ex, self.args
        text = "\n".join(
            [
                "# Issues 5 and 11: the papers' methods, depth pruning and recovery",
                "",
                f"SmolLM2-135M, dense perplexity {ex.dense_perplexity():.2f} on lee.cor "
                f"({ex.evaluation.shape[0]} x {ex.evaluation.shape[1]} non-overlapping tokens) "
                f"and {self.dense_offdomain():.2f} off-domain (Wikipedia lead paragraphs from the "
                f"gensim wheel, {self.offdomain.shape[0]} x {self.offdomain.shape[1]}). "
                f"Calibration: lee_background.cor minus its last tenth of documents (held out "
                f"for choosing settings: {self.selection_windows.shape[0]} x "
                f"{self.selection_windows.shape[1]} tokens), {a.windows} x {a.length} token "
                "windows, except the Taylor E1 baseline's scores (LLM-Pruner's 10 x 64). "
                "Layer-wise recovery refits o_proj and down_proj (damping 0.01, towards the "
                f"current weights) on the {a.windows} x {a.length} windows. LoRA: rank 8, "
                f"{a.lora_steps} steps x {a.lora_batch} windows of {a.length} tokens, lr "
                f"{a.lora_lr} (LLM-Pruner trains ~2 epochs on 50k samples: far fewer here). "
                f"Distillation: {a.distill_steps} steps x {a.distill_batch} windows, lr "
                f"{a.distill_lr} ({a.distill_schedule}, warm-up {a.distill_warmup:.0%}), "
                f"{a.distill_precision}, T {a.distill_temperature}, top-k {a.distill_top_k or 'all'}, "
                f"hidden weight {a.distill_hidden}, "
                f"{'LoRA rank ' + str(a.distill_lora_rank) if a.distill_lora_rank else 'all block weights'}"
                f"{generated_text(a)}"
                f"{f' on {a.distill_windows} x 256 fresh lee_background windows' if a.distill_windows else ''}"
                f"{third_text(a)}. "
                "Time: pruning (calibration pass share, scoring, updates) plus recovery, "
                "evaluation excluded, as wall seconds and as CPU seconds of the benchmark process "
                "(all its threads; on a shared machine the wall time inflates, the CPU time much "
                f"less). Load average at the end: {os.getloadavg()[0]:.1f}. {machine_line(ex)}",
                "",
                "| method | recovery | lee.cor | off-domain | params after | block params removed | "
                "all params removed | context | calibration windows x length | calibration text | "
                "evaluation text | time s | CPU s |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
                *self.rows,
                "",
                *[f"- {n}" for n in self.notes],
            ]
        )
        write_result(a.out / "methods.md", text)

    def dense_offdomain(self) -> float:
        if self._dense_off is None:
            self._dense_off = perplexity(self.ex.model, self.offdomain)
        return self._dense_off


def methods(args, best_plan: Plan, best_label: str) -> list[Method]:
    p = dict(target=args.target)
    mlp_surgeon = copy.deepcopy(best_plan)
    mlp_surgeon.criterion = "surgeon"
    greedy = greedy_plan(args, args.target)
    return [
        Method(
            "taylor_e1",
            "taylor_e1 (uniform, protect 4+2)",
            Plan(criterion="taylor_e1", protect_first=4, protect_last=2, **p),
            small_calibration=True,
        ),
        Method(
            "wanda_sp",
            "wanda_sp (uniform, protect 4+2)",
            Plan(criterion="wanda_sp", protect_first=4, protect_last=2, **p),
        ),
        Method(
            "flap",
            "flap (global, bias compensation)",
            Plan(criterion="flap", allocation="global", **p),
            own_steps=[{"step": "flap_bias"}],
        ),
        Method(
            "surgeon",
            f"surgeon ({args.shots} shots, global)",
            Plan(criterion="surgeon", allocation="global", **p),
            shots=args.shots,
        ),
        Method(
            "surgeon_mlp",
            f"surgeon ({args.shots} shots, {best_label.split(', ', 1)[1]})",
            mlp_surgeon,
            shots=args.shots,
        ),
        *(
            Method(
                name,
                f"{name} ({greedy.allocation}, MLP only, protect 1+1), {args.greedy_shots} shots",
                replace(greedy, criterion=name),
                shots=args.greedy_shots,
                surgeon_windows=False,
            )
            for name in ("obs", "surgeon_greedy")
        ),
        Method(
            "depth2",
            "depth2 (uniform, protect 4+2)",
            Plan(criterion="depth2", protect_first=4, protect_last=2, **p),
        ),
        *depth_methods(args.target, "", args.mix_depth),
        *depth_methods(0.5, "_half", args.mix_depth_half),
    ]


def depth_methods(target: float, suffix: str, mix_depth: int) -> list[Method]:
    """Whole layers by Block Influence alone, and a few of them plus MLP-only depth2 widths."""
    at = f" at {target:.0%}" if suffix else ""
    return [
        Method(
            f"bi{suffix}",
            f"block_influence (whole layers, protect 1+1){at}",
            Plan(criterion="block_influence", target=target, protect_first=1, protect_last=1),
        ),
        Method(
            f"mix{suffix}",
            f"{mix_depth} layers by block_influence + depth2 MLP only (protect 1+1){at}",
            Plan(
                criterion="depth2",
                target=target,
                head_ratio=0.0,
                protect_first=1,
                protect_last=1,
                depth=mix_depth,
                depth_criterion="block_influence",
            ),
        ),
    ]


def greedy_plan(args, target: float, criterion: str = "obs") -> Plan:
    """The greedy OBS criteria's plan: MLP channels only, first and last layer whole."""
    return Plan(
        criterion=criterion,
        target=target,
        allocation=args.greedy_allocation,
        head_ratio=0.0,
        protect_first=1,
        protect_last=1,
        max_ratio=args.greedy_max_ratio,
    )


def candidates(target: float) -> dict[str, Plan]:
    """Allocations compared on the held-out selection slice (forward-only criteria)."""
    out = {}
    for crit in ("depth2", "wanda_sp", "flap"):
        out[f"{crit}, MLP only, protect 4+2"] = Plan(
            criterion=crit, target=target, head_ratio=0.0, protect_first=4, protect_last=2
        )
        out[f"{crit}, global"] = Plan(criterion=crit, target=target, allocation="global")
    out["depth2, MLP only, protect 1+1"] = Plan(
        criterion="depth2", target=target, head_ratio=0.0, protect_first=1, protect_last=1
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", type=float, default=0.2)
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--selection-windows", type=int, default=4)
    parser.add_argument("--lora-steps", type=int, default=40)
    parser.add_argument("--lora-batch", type=int, default=1)
    parser.add_argument("--lora-lr", type=float, default=5e-4)
    parser.add_argument("--shots", type=int, default=2)
    parser.add_argument("--distill-steps", type=int, default=60)
    parser.add_argument("--distill-lr", type=float, default=5e-5)
    parser.add_argument("--distill-batch", type=int, default=2)
    parser.add_argument("--distill-top-k", type=int, default=64)
    parser.add_argument("--distill-temperature", type=float, default=1.0)
    parser.add_argument("--distill-schedule", default="cosine", choices=SCHEDULES)
    parser.add_argument("--distill-warmup", type=float, default=0.1)
    parser.add_argument("--distill-precision", default="fp32", choices=PRECISIONS)
    parser.add_argument("--distill-hidden", type=float, default=0.0)
    parser.add_argument("--distill-lora-rank", type=int, default=0)
    parser.add_argument("--distill-generated", action="store_true")
    parser.add_argument("--distill-generated-count", type=int, default=0, help="0: one per window")
    parser.add_argument(
        "--distill-generated-prompt",
        type=int,
        default=PROMPT_TOKENS,
        help="tokens of each calibration window that prompt a generated window (1: LLM-QAT's "
        "data-free text)",
    )
    parser.add_argument("--distill-with-calibration", action="store_true")
    parser.add_argument(
        "--distill-windows",
        type=int,
        default=0,
        help="distil on this many 256-token windows of the calibration text's fit part "
        "(seed 1; 0: on the calibration windows)",
    )
    parser.add_argument(
        "--distill-text",
        type=Path,
        default=None,
        help="distil also on windows of this third-domain text file (bench/sotu_text.py "
        "writes one; with --distill-with-calibration beside the calibration windows)",
    )
    parser.add_argument("--distill-text-windows", type=int, default=256)
    parser.add_argument(
        "--calibration-mix",
        type=Path,
        default=None,
        help="calibrate (channel order, updates) on half lee_background windows and half "
        "windows of this third-domain text file (seed 2); the held-out slice stays lee_background's",
    )
    parser.add_argument("--mix-depth", type=int, default=2, help="layers the 20%% mix removes")
    parser.add_argument("--mix-depth-half", type=int, default=4, help="... and the 50%% mix")
    parser.add_argument("--surgeon-windows", type=int, default=16)
    parser.add_argument("--greedy-allocation", default="global", choices=("uniform", "global"))
    parser.add_argument("--greedy-max-ratio", type=float, default=None)
    parser.add_argument("--greedy-shots", type=int, default=1)
    parser.add_argument("--greedy-half", default="obs", help="greedy criterion of the 50%% row")
    parser.add_argument("--best", default=None, help="a candidates() label: skip the selection")
    parser.add_argument("--rows", nargs="+", default=ROWS, help="method:recovery entries")
    parser.add_argument(
        "--recipe",
        nargs="+",
        default=[],
        metavar="KEY=PLAN.json",
        help="plan JSONs as methods KEY (their recovery steps are the method's own)",
    )
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.manual_seed(0)
    ws = load_model("smollm2-135m", device=args.device)
    calibration, evaluation = builtin_text("calibration"), builtin_text("evaluation")
    # The library calibrates on the first 9/10 of the documents; the last tenth is the held-out.
    ex = Explorer.from_texts(
        ws,
        calibration,
        evaluation,
        calibration_windows=args.windows,
        calibration_length=args.length,
        heldout_windows=args.selection_windows,
    )
    calibration_text = CALIBRATION
    if args.calibration_mix:
        ex = replace(
            ex, calibration=mixed_windows(ex, ex.calibration, args.calibration_mix, seed=2)
        )
        calibration_text = f"half {CALIBRATION}, half {args.calibration_mix.name}"
    small = Explorer.from_texts(ws, calibration, evaluation)
    held = ex.heldout
    offdomain = token_windows(ws.tokenizer, builtin_text("offdomain"), 256, 20)
    bench = Bench(ex, small, held, offdomain, args, calibration_text=calibration_text)
    if args.distill_windows:
        fit, _ = split_heldout(calibration)
        bench.distill_windows = token_windows(ws.tokenizer, fit, 256, args.distill_windows, seed=1)
    print("dense", ex.dense_perplexity(), flush=True)

    # One forward-only pass for every forward-only criterion, on the large calibration set.
    t0 = time.perf_counter()
    needs = FLAP_NEEDS
    for name in ("depth2", "wanda_sp", "flap", "block_influence"):
        needs = needs | CRITERIA[name].needs
    ex.statistics(needs)
    pass_s = time.perf_counter() - t0
    bench.notes.append(f"forward-only calibration pass (depth2, wanda_sp, flap): {pass_s:.0f} s")

    if args.best is None:
        best_label = choose(bench, args.target)
    else:
        best_label = args.best
        bench.notes.append(f"allocation {best_label!r} chosen on the held-out slice earlier")
    best_plan = candidates(args.target)[best_label]
    half = copy.deepcopy(best_plan)
    half.target = 0.5
    table = {m.key: m for m in methods(args, best_plan, best_label)}
    table["best"] = Method("best", f"best on held-out: {best_label}", best_plan)
    table["half"] = Method("half", f"{best_label} at 50%", half)
    table["dense"] = Method("dense", "dense", Plan(target=0.0))
    greedy_half = greedy_plan(args, 0.5, args.greedy_half)
    table["greedy_half"] = Method(
        "greedy_half",
        f"{args.greedy_half} ({greedy_half.allocation}, MLP only, protect 1+1), "
        f"{args.greedy_shots} shots, 50%",
        greedy_half,
        shots=args.greedy_shots,
        surgeon_windows=False,
    )
    for entry in args.recipe:
        key, path = entry.split("=", 1)
        plan = Plan.load(path)
        steps = ", ".join(e["step"] for e in plan.recovery) or "no update"
        label = f"{Path(path).stem} ({plan.criterion}, {plan.allocation}, {steps})"
        table[key] = Method(key, label, plan, own_steps=list(plan.recovery))
    for entry in args.rows:
        key, recovery = entry.split(":")
        bench.run_row(table[key], recovery)
        if key in HALF_KEYS or (table[key].plan.target or 0) >= 0.5:
            bench.sample(table[key], recovery)


def generated_text(a: argparse.Namespace) -> str:
    """The header's words for distillation's self-generated text, if any."""
    if not a.distill_generated:
        return ""
    count = f"{a.distill_generated_count} windows of" if a.distill_generated_count else ""
    beside = " beside the calibration windows" if a.distill_with_calibration else ""
    prompt = f" (prompts of {a.distill_generated_prompt} tokens)"
    return f", on {count} self-generated text{prompt}{beside}".replace("  ", " ")


def third_text(a: argparse.Namespace) -> str:
    """The header's words for distillation's third-domain text file, if any."""
    if not a.distill_text:
        return ""
    how = "plus" if a.distill_with_calibration else "replaced by"
    return f" {how} {a.distill_text_windows} x 256 windows of {a.distill_text.name}"


def choose(bench: Bench, target: float) -> str:
    """The allocation with the lowest perplexity on the held-out slice of the calibration text."""
    scored = {}
    for label, plan in candidates(target).items():
        scored[label] = bench.heldout(bench.ex.select(plan))
        print(f"held-out {label}: {scored[label]:.2f}", flush=True)
    dense = perplexity(bench.ex.model, bench.selection_windows)
    bench.notes.append(
        f"held-out selection perplexity (dense {dense:.2f}): "
        + ", ".join(f"{k} {v:.2f}" for k, v in sorted(scored.items(), key=lambda kv: kv[1]))
    )
    return min(scored, key=scored.get)


def log(fraction: float, message: str) -> None:
    """A recovery step's progress, timestamped on stderr (where a long step's pace shows)."""
    print(f"  {time.strftime('%H:%M:%S')} {fraction:4.0%} {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
