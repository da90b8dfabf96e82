"""Command line: the same pipeline as the app, headless, so a plan replays on a bigger machine.

python -m explorer prune --model smollm2-135m --criterion taylor --target 0.2
python -m explorer prune --plan plan.json --out pruned/
python -m explorer export --plan plan.json --model smollm2-135m --out pruned/
python -m explorer evaluate --model pruned/ --tasks lee_cloze
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from .apply.pruning import prune_model
from .apply.sensitivity import Sensitivity
from .catalogue import CRITERIA, RECOVERY_STEPS
from .data import builtin_text, text_source
from .errors import ExplorerError, PlanError
from .evaluate import perplexity
from .export.gguf_writer import GGUF_TYPES, SOURCE
from .export.report import pruning_report
from .export.safety import check_target
from .model.loading import EMBEDDED, cache_root, load_model
from .planning.plan import Plan
from .planning.presets import load_preset, preset_names
from .planning.selection import Selection
from .recovery.heldout import recovery_warnings
from .recovery.live import split_steps
from .scoring.base import REDUCTIONS
from .session import Explorer


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m explorer", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    prune = sub.add_parser("prune", help="score, plan, and report perplexity before/after")
    _common(prune)
    prune.add_argument("--criterion", choices=CRITERIA.names(), default=None)
    prune.add_argument("--reduction", choices=REDUCTIONS, default=None)
    prune.add_argument(
        "--target", type=float, default=None, help="share of decoder-block parameters to remove"
    )
    prune.add_argument("--allocation", choices=("uniform", "global", "sensitivity"), default=None)
    prune.add_argument(
        "--sensitivity", type=Path, default=None, help="sensitivity allocation: a saved sweep"
    )
    prune.add_argument("--head-ratio", type=float, default=None, help="uniform: share of heads")
    prune.add_argument("--mlp-ratio", type=float, default=None, help="uniform: share of channels")
    prune.add_argument("--attention-unit", choices=("head", "kv"), default=None)
    prune.add_argument("--protect-first", type=int, default=None)
    prune.add_argument("--protect-last", type=int, default=None)
    prune.add_argument("--round-to", type=int, default=None)
    prune.add_argument("--depth", type=int, default=None, help="whole layers to remove first")
    prune.add_argument(
        "--depth-criterion", choices=CRITERIA.names(), default=None, help="scores those layers"
    )
    prune.add_argument(
        "--max-ratio", type=float, default=None, help="global: most of one layer that may go"
    )
    _data(prune)
    prune.add_argument("--save-plan", type=Path, default=None, help="write the plan JSON here")
    prune.add_argument("--prompt", default=None, help="also generate from this prompt")
    sens = sub.add_parser(
        "sensitivity", help="per-layer damage of cutting one layer alone, written as JSON/CSV"
    )
    _common(sens)
    sens.add_argument("--criterion", choices=CRITERIA.names(), default=None)
    sens.add_argument("--reduction", choices=REDUCTIONS, default=None)
    sens.add_argument("--kinds", default="head,mlp", help="comma-separated: head, kv, mlp, layer")
    sens.add_argument("--ratios", default=None, help="comma-separated grid (default 0.1,...,0.9)")
    sens.add_argument("--windows", type=int, default=None, help="preview windows (default 4)")
    _data(sens)
    sens.add_argument("--out", type=Path, required=True, help="write the sweep JSON here")
    sens.add_argument("--csv", type=Path, default=None, help="also write the points as CSV")
    fetch = sub.add_parser("fetch", help="fetch and cache the embedded model and corpus")
    fetch.add_argument("--model", default="smollm2-135m", choices=tuple(EMBEDDED))
    evaluate = sub.add_parser("evaluate", help="zero-shot accuracy with lm-evaluation-harness")
    evaluate.add_argument("--model", required=True, help="an export folder (or a model source)")
    evaluate.add_argument(
        "--plan", type=Path, default=None, help="prune --model in memory by this plan first"
    )
    evaluate.add_argument("--tasks", default="lee_cloze", help="comma-separated lm-eval tasks")
    evaluate.add_argument("--limit", type=int, default=None, help="at most N questions per task")
    evaluate.add_argument("--batch-size", type=int, default=8)
    evaluate.add_argument(
        "--device", default=None, help="cpu or cuda (default: cuda when available)"
    )
    evaluate.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    export = sub.add_parser("export", help="replay a plan and export the pruned model")
    _common(export)
    for p in (prune, export):
        p.add_argument("--out", type=Path, default=None, help="export the pruned model here")
        p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
        p.add_argument(
            "--format",
            choices=("transformers", "gguf"),
            default="transformers",
            help="what --out holds: a transformers folder or a GGUF file for llama.cpp",
        )
        p.add_argument(
            "--gguf-type",
            choices=(*GGUF_TYPES, SOURCE),
            default="f16",
            help="GGUF tensor type ('source': the source GGUF's own quantisation)",
        )
    return parser


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help=f"{', '.join(EMBEDDED)}, a hub id, folder, .gguf")
    p.add_argument("--plan", type=Path, default=None, help="a saved plan.json to run")
    p.add_argument("--preset", choices=preset_names(), default=None, help="a shipped recipe")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--eval-length", type=int, default=256, help="evaluation window length")
    p.add_argument("--eval-windows", type=int, default=None, help="limit evaluation windows")
    p.add_argument(
        "--offdomain-windows",
        type=int,
        default=20,
        help="windows of 256 tokens of the second text domain (Wikipedia leads) reported next to "
        "the evaluation text (0: skip)",
    )


def recovery_entry(text: str) -> dict:
    """``name`` or ``name:key=value:...`` as a plan's recovery entry (values read as JSON)."""
    name, *pairs = (part.strip() for part in text.split(":"))
    entry: dict = {"step": name}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise PlanError(f"Recovery parameter '{pair}' is not key=value, e.g. steps=50.")
        try:
            entry[key] = json.loads(value)
        except json.JSONDecodeError:
            entry[key] = value
    return entry


def _data(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calibration", default=None, help="builtin, generated, FILE, dataset:...")
    p.add_argument("--evaluation", default=None, help="builtin, FILE, dataset:...")
    p.add_argument("--calibration-windows", type=int, default=None)
    p.add_argument("--calibration-length", type=int, default=None)
    p.add_argument(
        "--recovery",
        default=None,
        help=(
            f"comma-separated recovery steps after pruning: {', '.join(RECOVERY_STEPS)}; "
            "parameters after colons, e.g. distill:steps=50:lora_rank=8"
        ),
    )


def _ratios(text: str) -> list[float]:
    try:
        return [float(r) for r in text.split(",") if r.strip()]
    except ValueError as e:
        raise ExplorerError(f"--ratios must be numbers separated by commas ({e}).") from e


def build_plan(args: argparse.Namespace) -> Plan:
    """The plan file (if any) with the command line's explicit options on top."""
    if args.plan and args.preset:
        raise ExplorerError("Give --plan or --preset, not both.")
    plan = Plan.load(args.plan) if args.plan else Plan()
    if args.preset:
        plan = load_preset(args.preset)
    overrides = {
        "model": args.model,
        "criterion": getattr(args, "criterion", None),
        "reduction": getattr(args, "reduction", None),
        "target": getattr(args, "target", None),
        "allocation": getattr(args, "allocation", None),
        "head_ratio": getattr(args, "head_ratio", None),
        "mlp_ratio": getattr(args, "mlp_ratio", None),
        "attention_unit": getattr(args, "attention_unit", None),
        "protect_first": getattr(args, "protect_first", None),
        "protect_last": getattr(args, "protect_last", None),
        "round_to": getattr(args, "round_to", None),
        "max_ratio": getattr(args, "max_ratio", None),
        "depth": getattr(args, "depth", None),
        "depth_criterion": getattr(args, "depth_criterion", None),
        "calibration_windows": getattr(args, "calibration_windows", None),
        "calibration_length": getattr(args, "calibration_length", None),
        "sensitivity_windows": getattr(args, "windows", None),
    }
    if getattr(args, "ratios", None):
        overrides["sensitivity_ratios"] = _ratios(args.ratios)
    for key, value in overrides.items():
        if value is not None:
            setattr(plan, key, value)
    if overrides["allocation"] not in (None, "per_layer"):  # ratios the new allocation replaces
        plan.head_ratios = plan.mlp_ratios = None
    if getattr(args, "recovery", None):
        plan.recovery = [recovery_entry(text) for text in args.recovery.split(",") if text]
    for key in ("calibration", "evaluation"):
        spec = getattr(args, key, None)
        if spec is not None:
            setattr(plan, key, text_source(spec))
    plan.check(criteria=CRITERIA)
    return plan


class _Bar:
    """A tqdm bar driven by ``progress(fraction, message)`` callbacks."""

    def __init__(self, desc: str):
        self.bar = tqdm(total=1000, desc=desc, leave=False, file=sys.stderr)

    def __call__(self, fraction: float, message: str) -> None:
        self.bar.n = int(1000 * min(max(fraction, 0.0), 1.0))
        self.bar.set_postfix_str(message[:60], refresh=True)

    def close(self) -> None:
        self.bar.close()


def _with_bar(desc: str, fn, *args, **kwargs):
    bar = _Bar(desc)
    try:
        return fn(*args, progress=bar, **kwargs)
    finally:
        bar.close()


def print_selection(explorer: Explorer, selection: Selection) -> None:
    s = explorer.structure
    print("layer  heads kept  kv kept  mlp kept   (removed: heads / mlp channels)")
    for layer in range(s.num_layers):
        if layer in selection.layers:
            print(f"{layer:5d}  removed whole layer")
            continue
        k = selection.kept(s, layer)
        print(
            f"{layer:5d}  {k['heads']:4d}/{s.heads:<4d}  {k['kv_heads']:3d}/{s.kv_heads:<3d}"
            f"  {k['intermediate']:5d}/{s.intermediate:<5d}"
            f"  {len(selection.heads.get(layer, ())):3d} / {len(selection.mlp.get(layer, ())):5d}"
        )
    if selection.hidden:
        print(f"hidden channels removed: {len(selection.hidden)} of {s.hidden}")


def open_explorer(plan: Plan, args: argparse.Namespace) -> Explorer:
    """The plan's model and data, with the command line's evaluation protocol."""
    return _with_bar(
        "load model",
        Explorer.open,
        plan,
        dtype=args.dtype,
        device=args.device,
        evaluation_length=args.eval_length,
        evaluation_windows=args.eval_windows,
    )


def second_domain(ex: Explorer, sel: Selection, live: list, recovered, n: int) -> dict:
    """Dense and pruned perplexity on ``n`` windows of the off-domain text (and previewed /
    recovered), printed."""
    out = {"text": "builtin offdomain (Wikipedia lead paragraphs)", "windows": n, "length": 256}
    out["dense"] = _with_bar("off-domain dense", ex.offdomain_perplexity, Selection(), windows=n)
    out["pruned"] = _with_bar("off-domain pruned", ex.offdomain_perplexity, sel, windows=n)
    line = f"off-domain ({n} x 256 tokens): dense {out['dense']:.2f} -> pruned {out['pruned']:.2f}"
    if live:
        out["preview"] = _with_bar(
            "off-domain preview", ex.offdomain_perplexity, sel, live, None, n
        )
        line += f", with the live steps {out['preview']:.2f}"
    if recovered is not None:
        out["after"] = _with_bar(
            "off-domain recovered", ex.offdomain_perplexity, sel, (), recovered, n
        )
        line += f", after recovery {out['after']:.2f}"
    print(line)
    return out


def run(plan: Plan, args: argparse.Namespace) -> dict:
    """Score, select, evaluate (and export): prints a report, returns it as a dict."""
    started = time.perf_counter()
    ex = open_explorer(plan, args)
    if getattr(args, "sensitivity", None):
        load_sensitivity(ex, plan, args.sensitivity)
    t0 = time.perf_counter()
    sel = _with_bar(f"score ({plan.criterion})", ex.select, plan)
    scoring_s = time.perf_counter() - t0
    sizes = ex.sizes(sel)
    dense = _with_bar("dense perplexity", ex.dense_perplexity)
    pruned = _with_bar("pruned perplexity", ex.perplexity, sel)
    live, later = split_steps(plan.recovery)
    if live:  # what the app's preview shows for this plan: masks plus the live recovery steps
        previewed = _with_bar("preview", ex.perplexity, sel, steps=live)
    print_selection(ex, sel)
    block_share = 1 - sizes["block_params_after"] / sizes["block_params_before"]
    all_share = 1 - sizes["params_after"] / sizes["params_before"]
    print(
        f"\nmodel {plan.model}: criterion {plan.criterion} ({plan.reduction}), "
        f"allocation {plan.allocation}"
    )
    print(
        f"parameters: {sizes['params_before']:,} -> {sizes['params_after']:,} "
        f"({all_share:.1%} of all parameters removed)"
    )
    print(
        f"decoder blocks: {sizes['block_params_before']:,} -> {sizes['block_params_after']:,} "
        f"({block_share:.1%} of block parameters removed)"
    )
    print(f"FLOPs/token: {sizes['flops_before']:.3g} -> {sizes['flops_after']:.3g}")
    print(
        f"perplexity ({ex.evaluation.shape[0]} x {ex.evaluation.shape[1]} tokens): "
        f"dense {dense:.2f} -> pruned {pruned:.2f}"
    )
    if live:
        names = ", ".join(e["step"] for e in live)
        print(f"preview with the live steps ({names}): perplexity {previewed:.2f}")
    pruned_model = recovered = None
    steps: list[dict] = []
    if plan.recovery:
        pruned_model, steps = _with_bar("recovery", ex.recover, sel, plan.recovery)
        recovered = _with_bar("recovered perplexity", perplexity, pruned_model, ex.evaluation)
        print(f"after recovery ({', '.join(s['step'] for s in steps)}): perplexity {recovered:.2f}")
        for warning in recovery_warnings(steps):
            print(f"warning: {warning}")
    offdomain = {}
    if getattr(args, "offdomain_windows", 0):
        offdomain = second_domain(ex, sel, live, pruned_model, args.offdomain_windows)
    if getattr(args, "prompt", None):
        print(f"\nprompt: {args.prompt}")
        print("dense :", ex.generate(Selection(), args.prompt)[0])
        print("pruned:", ex.generate(sel, args.prompt)[0])
    report = pruning_report(
        plan,
        sizes,
        ex.evaluation.shape,
        dense,
        pruned,
        recovered,
        recovery_reports=steps,
        scoring_seconds=scoring_s,
    )
    if live:
        report["perplexity_preview"] = previewed
    if offdomain:
        report["offdomain"] = offdomain
    if args.out:
        from .export.writer import export_model

        report["total_seconds"] = time.perf_counter() - started
        result = _with_bar(
            "export",
            export_model,
            ex.model,
            ex.workspace.tokenizer,
            ex.structure,
            sel,
            args.out,
            plan=plan.to_dict(),
            report=report,
            overwrite=args.overwrite,
            verify_ids=ex.evaluation[:2],
            pruned=pruned_model,
            format=args.format,
            gguf_type=args.gguf_type,
        )
        diff = result.max_abs_diff
        check = "not run in llama.cpp" if diff is None else f"max |logit diff| on reload {diff:.2e}"
        print(f"exported to {result.path} ({check})")
    return report


def evaluate(args: argparse.Namespace) -> dict:
    """Zero-shot accuracy of an export folder, a model source, or a plan applied to a source."""
    from .export.writer import load_pruned
    from .zero_shot import GGUF_HINT, zero_shot

    folder = Path(args.model).expanduser()
    if args.plan is not None:
        plan = Plan.load(args.plan)
        plan.model = args.model
        ex = _with_bar("load model", Explorer.open, plan, dtype=args.dtype, device=args.device)
        sel = _with_bar(f"score ({plan.criterion})", ex.select, plan)
        model, tokenizer = prune_model(ex.model, ex.structure, sel), ex.workspace.tokenizer
    elif folder.is_dir() and any(folder.glob("*.gguf")) and not (folder / "config.json").exists():
        raise ExplorerError(f"'{folder}' holds a GGUF file. {GGUF_HINT}")
    elif (folder / "config.json").is_file():
        model, tokenizer = load_pruned(folder, dtype=args.dtype, device=args.device)
    else:
        ws = _with_bar("load model", load_model, args.model, dtype=args.dtype, device=args.device)
        model, tokenizer = ws.model, ws.tokenizer
    results = zero_shot(
        model,
        tokenizer,
        args.tasks,
        limit=args.limit,
        batch_size=args.batch_size,
        device=args.device,
    )
    for task, metrics in results.items():
        shown = ", ".join(f"{name} {value:.4f}" for name, value in sorted(metrics.items()))
        print(f"{task}: {shown}")
    return results


def run_sensitivity(plan: Plan, args: argparse.Namespace) -> Sensitivity:
    """Measure the sweep the plan and ``--kinds`` ask for; write its JSON (and CSV)."""
    ex = open_explorer(plan, args)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    request = ex.sensitivity_request(plan, kinds)
    total = len(request.ratios) * len(kinds) * ex.structure.num_layers
    print(
        f"sensitivity of {plan.model} under {plan.criterion}: {', '.join(kinds)} at "
        f"{request.ratios} on {request.windows[0]} x {request.windows[1]} tokens of "
        f"{request.text} text (up to {total} points), live steps: {request.steps or 'none'}"
    )
    _with_bar("sensitivity", lambda progress: list(ex.iter_sensitivity(plan, kinds, progress)))
    sens = ex.known_sensitivity(plan, kinds)
    args.out.write_text(sens.to_json())
    if args.csv:
        args.csv.write_text(sens.to_csv())
    print(f"{len(sens.points)} points in {sens.seconds:.1f} s, written to {args.out}")
    return sens


def load_sensitivity(ex: Explorer, plan: Plan, path: Path) -> None:
    """Use a sweep saved by ``sensitivity --out`` for ``plan``: its grid and windows become the plan's."""
    if not path.is_file():
        raise ExplorerError(f"No sensitivity file at {path}. Run `sensitivity --out` first.")
    sens = Sensitivity.from_dict(json.loads(path.read_text()))
    if sens.criterion != plan.criterion:
        raise ExplorerError(
            f"The sweep in {path} was measured under '{sens.criterion}', the plan uses "
            f"'{plan.criterion}'. Measure it for this criterion."
        )
    plan.sensitivity_ratios, plan.sensitivity_windows = list(sens.ratios), sens.windows[0]
    ex.add_sensitivity(sens)


def fetch(model: str) -> None:
    """Cache an embedded model and the built-in corpus, so later runs need no network."""
    _with_bar("fetch model", load_model, model)
    for split in ("calibration", "evaluation", "offdomain"):
        builtin_text(split)
    print(f"cached {model}, the Lee corpus and the off-domain text in {cache_root()}")


def check_outputs(plan: Plan, args: argparse.Namespace) -> None:
    """Refuse bad counts and unusable output paths before the model loads, not after scoring."""
    for name, least in (("eval_windows", 1), ("eval_length", 2), ("offdomain_windows", 0)):
        value = getattr(args, name)
        if value is not None and value < least:
            flag = "--" + name.replace("_", "-")
            raise ExplorerError(f"{flag} {value} is out of range; use {least} or more.")
    save = getattr(args, "save_plan", None)
    if save is not None and not save.expanduser().parent.is_dir():
        raise ExplorerError(
            f"--save-plan {save}: the folder '{save.parent}' does not exist. Create it first."
        )
    if args.command != "sensitivity" and args.out:  # sensitivity's --out is a JSON file
        check_target(args.out, plan.model, args.overwrite)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "fetch":
            fetch(args.model)
            return 0
        if args.command == "evaluate":
            evaluate(args)
            return 0
        plan = build_plan(args)
        if args.command == "export" and not args.out:
            raise ExplorerError("export needs --out DIR: the folder to write the model to.")
        check_outputs(plan, args)
        if getattr(args, "save_plan", None):
            plan.save(args.save_plan)
        if args.command == "sensitivity":
            run_sensitivity(plan, args)
        else:
            run(plan, args)
    except ExplorerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
