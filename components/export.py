"""Export panel: write the pruned model to a folder, watching each check pass, then the report.

The export is verified before it appears at its path (``explorer.export.export_model`` reloads the
folder as a user would and compares logits). Its report carries the perplexities of this plan: the
session's last preview when it was run for exactly this pruning, measured here otherwise. A plan
with recovery steps exports the recovered model: the Recover tab's when it was made for exactly
this plan, recovered here otherwise; its perplexity is then ``perplexity_after``.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from html import escape
from pathlib import Path

import gradio as gr

from explorer.apply.pruning import prune_model
from explorer.errors import ExplorerError, ExportError
from explorer.export.gguf_writer import GGUF_TYPES, SOURCE
from explorer.export.report import pruning_report
from explorer.export.writer import export_model
from explorer.recovery.heldout import recovery_warnings
from explorer.zero_shot import task_names, zero_shot

from .preview import measuring, perplexities
from .recovery import recover
from .state import SHARED, SessionState, api, handler, human, select, streamed, user_error


@dataclass
class ExportPanel:
    folder: gr.Textbox
    overwrite: gr.Checkbox
    format: gr.Radio
    gguf_type: gr.Dropdown
    run: gr.Button
    checks: gr.HTML
    report: gr.JSON
    files: gr.File
    tasks: gr.Textbox
    limit: gr.Number
    evaluate: gr.Button
    accuracy: gr.JSON


def build(default_model: str) -> ExportPanel:
    gr.Markdown(
        "Writes a transformers folder (safetensors, config, tokenizer, plan.json, "
        "selection.json, report.json, a model card README.md). Per-layer sizes load with "
        "`trust_remote_code=True`; uniform ones with plain `AutoModelForCausalLM.from_pretrained`. "
        "*GGUF* writes one llama.cpp file instead (per-layer sizes as the `deci` architecture)."
    )
    with gr.Row():
        folder = gr.Textbox(
            label="Target folder",
            value=f"{default_model}-pruned",
            info="A folder under the server's export folder.",
            elem_id="export-folder",
            scale=3,
        )
        overwrite = gr.Checkbox(label="Replace a non-empty folder", value=False, scale=1)
    with gr.Row():
        format = gr.Radio(
            ["transformers", "gguf"], value="transformers", label="Format", elem_id="export-format"
        )
        gguf_type = gr.Dropdown(
            [*GGUF_TYPES, SOURCE], value="f16", label="GGUF tensor type", elem_id="export-gguf-type"
        )
    run = gr.Button("Export", variant="primary", elem_id="export-run")
    checks = gr.HTML(elem_id="export-checks")
    with gr.Row():
        report = gr.JSON(label="report.json", elem_id="export-report", scale=2)
        files = gr.File(
            label="Download plan and report", file_count="multiple", elem_id="export-files", scale=1
        )
    gr.Markdown(
        "### Zero-shot accuracy (lm-evaluation-harness)\n"
        "Dense and pruned model (recovered, when the Recover tab made it for this plan) on "
        "lm-eval tasks: `lee_cloze` is local (multiple-choice completions from the Lee "
        "corpus); standard tasks (`hellaswag`, `piqa`, `arc_easy`, ...) download their data."
    )
    with gr.Row():
        tasks = gr.Textbox(label="Tasks", value="lee_cloze", elem_id="zero-shot-tasks", scale=3)
        limit = gr.Number(label="Questions per task (0: all)", value=0, precision=0, scale=1)
    evaluate = gr.Button("Evaluate dense and pruned", elem_id="zero-shot-run")
    accuracy = gr.JSON(label="Accuracy", elem_id="zero-shot-accuracy")
    return ExportPanel(
        folder, overwrite, format, gguf_type, run, checks, report, files, tasks, limit, evaluate,
        accuracy,
    )  # fmt: skip


def run_zero_shot(panel: ExportPanel, state: gr.State, values: dict) -> dict:
    """lm-eval accuracy of the dense and the pruned model for the session's plan."""
    session: SessionState = values[state]
    tasks, limit = values[panel.tasks], values[panel.limit]
    loaded = SHARED.get(session.model_key)
    try:
        selection = select(loaded, session.plan, lambda *_: None)
        ex = loaded.explorer
        recovered = session.reusable_recovery()
        with SHARED.lock:
            pruned = (
                recovered.model
                if recovered is not None
                else prune_model(ex.model, ex.structure, selection)
            )
            run = {"limit": int(limit) if limit else None, "tasks": task_names(tasks)}
            return {
                "dense": zero_shot(ex.model, ex.workspace.tokenizer, **run),
                "pruned": zero_shot(pruned, ex.workspace.tokenizer, **run),
            }
    except ExplorerError as exc:
        raise user_error(exc) from exc


class Caution(str):
    """A message of the export's worker that is a warning, not a check (shown first, in amber)."""


def checklist(
    done: list[str], current: str | None, failed: str | None = None, cautions: list[str] = ()
) -> str:
    items = [f'<li class="pe-warn">⚠ {escape(m)}</li>' for m in cautions]
    items += [f"<li>✓ {escape(m)}</li>" for m in done]
    if current:
        items.append(f"<li>… {escape(current)}</li>")
    if failed:
        items.append(f'<li class="pe-error">⚠ {escape(failed)}</li>')
    return f'<ul class="pe-checks">{"".join(items)}</ul>'


def run_export(panel: ExportPanel, state: gr.State, values: dict, request: gr.Request):
    """Stream the checks as they pass; end with the report and the plan/report downloads."""
    session: SessionState = values[state]
    folder, overwrite = values[panel.folder], values[panel.overwrite]
    format, gguf_type = values[panel.format], values[panel.gguf_type]
    loaded = SHARED.get(session.model_key)
    if not (folder or "").strip():
        raise gr.Error("Type the folder to export to.")
    try:
        target = session.policy.export_target(folder)
        session.policy.check_recovery(session.plan.recovery)
        selection = select(loaded, session.plan, lambda *_: None)
    except ExplorerError as exc:
        raise user_error(exc) from exc
    plan = session.plan
    ex = loaded.explorer
    known, made_for, recovered = (
        session.known_pruned_ppl(),
        session.recovery_key(),
        session.reusable_recovery(),
    )

    def work(emit):
        dense, pruned = perplexities(loaded, selection, lambda item: emit(measuring(item)), known)
        model = recovered_ppl = None
        reports: list[dict] = []
        if plan.recovery:
            done = recovered or recover(loaded, selection, plan.recovery, emit, made_for)
            session.recovered = done
            recovered_ppl, model, reports = done.perplexity, done.model, done.reports
            for warning in recovery_warnings(reports):  # said before anything is written
                emit(Caution(warning))
        sizes = ex.sizes(selection)
        report = pruning_report(
            plan, sizes, ex.evaluation.shape, dense, pruned, recovered_ppl, recovery_reports=reports
        )
        return export_model(
            ex.model,
            ex.workspace.tokenizer,
            ex.structure,
            selection,
            target,
            plan=plan.to_dict(),
            report=report,
            overwrite=overwrite,
            verify_ids=ex.evaluation[:2],
            progress=lambda fraction, message: emit(message),
            pruned=model,
            format=format,
            gguf_type=gguf_type,
        )

    done: list[str] = []
    cautions: list[str] = []
    current = None
    try:
        for kind, value in streamed(work, getattr(request, "session_hash", None), session.policy):
            if kind == "done":
                result = value
                break
            if isinstance(value, Caution):
                cautions.append(value)
                gr.Warning(value, duration=20)
            else:
                if current is not None and _step(current) != _step(value):
                    done.append(current)
                current = value
            yield {panel.checks: checklist(done, current, cautions=cautions)}
        else:
            yield {
                panel.checks: checklist(done, None, "Stopped.", cautions),
                panel.report: None,
                panel.files: None,
            }
            return
    except ExportError as exc:
        yield {
            panel.checks: checklist(done, None, str(exc), cautions),
            panel.report: None,
            panel.files: None,
        }
        raise user_error(exc) from exc
    except ExplorerError as exc:
        raise user_error(exc) from exc
    if current:
        done.append(current)
    diff = result.max_abs_diff
    checked = (
        "Verified: read back (llama.cpp not installed, logits not compared)"
        if diff is None
        else f"Verified: reloaded logits within {diff:.1e} of the pruned model"
    )
    done.append(
        f"{checked}; {human(result.params_before)} → {human(result.params_after)} parameters"
        + (" (load with trust_remote_code=True)" if result.remote_code else "")
    )
    yield {
        panel.checks: checklist(done, None, cautions=cautions),
        panel.report: result.report,
        panel.files: downloads(session, result.path),
    }


def _step(message: str) -> str:
    """Messages of one step differ only in their parenthesised counts."""
    return message.split(" (")[0]


def downloads(session: SessionState, folder: Path) -> list[str]:
    """Copies of plan.json and report.json that Gradio may serve wherever the export went."""
    spare = session.scratch("export")
    out = []
    for name in ("plan.json", "report.json", "README.md"):
        if (folder / name).is_file():
            shutil.copy(folder / name, spare / name)
            out.append(str(spare / name))
    return out


def wire(panel: ExportPanel, session: gr.State) -> None:
    panel.run.click(
        handler(run_export, panel, session),
        {session, panel.folder, panel.overwrite, panel.format, panel.gguf_type},
        [panel.checks, panel.report, panel.files],
        show_progress_on=[panel.report],
        **api("export"),
    )
    panel.evaluate.click(
        handler(run_zero_shot, panel, session),
        {session, panel.tasks, panel.limit},
        [panel.accuracy],
        **api("zero_shot"),
    )
