"""Recover panel: repair the pruned model with the registered recovery steps, then measure it.

Recovery changes the kept weights, so unlike the preview it works on a physically pruned copy
(``Explorer.recover``) and never touches the shared model. The steps chosen here, in their order
and with their parameters, are the plan's ``recovery``: saved with the plan, applied by Export and
replayed by the command line. The session keeps its last recovered model with the model and plan
it was made for, so exporting that plan re-uses it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import plotly.graph_objects as go

from explorer.catalogue import RECOVERY_STEPS
from explorer.errors import ExplorerError, PlanError
from explorer.evaluate import iter_perplexity
from explorer.planning.selection import Selection
from explorer.recovery.heldout import recovery_warnings
from explorer.recovery.steps import RecoveryStep

from .plan import plan_file
from .preview import measure, measuring, perplexities, shown, stopped
from .state import (
    SHARED,
    Loaded,
    Recovered,
    SessionState,
    api,
    handler,
    select,
    status,
    stop_runs,
    streamed,
    user_error,
)


@dataclass(frozen=True)
class Field:
    """A step's parameter that the form shows: a number, a yes/no, or one of a step's choices."""

    step: str
    name: str
    default: bool | int | float | str
    choices: tuple[str, ...] = ()


def fields() -> list[Field]:
    """The form's parameters, step by step in registry order (the order of the form's inputs)."""
    return [
        Field(name, param, default, tuple(step.choices.get(param, ())))
        for name, step in RECOVERY_STEPS.items()
        for param, default in step.params().items()
        if isinstance(default, bool | int | float) or param in step.choices
    ]


def text_files() -> list[tuple[str, str]]:
    """(step, parameter) of each step's text-file parameter (distillation's ``text_file``).

    A path typed by a client would be a path on the server, so the form takes an upload instead
    of a box (the access policy allows exactly the upload folder), and the path joins the plan.
    """
    return [
        (name, param)
        for name, step in RECOVERY_STEPS.items()
        for param, default in step.params().items()
        if isinstance(default, str) and param.endswith("_file")
    ]


def with_parameters() -> list[str]:
    """The steps with a parameter group in the form, in registry order."""
    return list(dict.fromkeys(f.step for f in fields()))


@dataclass
class RecoverPanel:
    steps: gr.Dropdown
    groups: dict[str, gr.Group]  # a step's parameters, shown while the step is chosen
    params: list[gr.components.Component]  # one per ``fields()``, in that order
    files: dict[tuple[str, str], gr.File]  # one upload per ``text_files()`` entry
    file_notes: dict[tuple[str, str], gr.Markdown]  # which file the plan holds there
    run: gr.Button
    stop: gr.Button
    status: gr.HTML
    dense: gr.Textbox
    pruned: gr.Textbox
    recovered: gr.Textbox
    reports: gr.JSON
    losses: gr.Plot

    @property
    def form(self) -> list:
        return [self.steps, *self.params]


def build() -> RecoverPanel:
    gr.Markdown(
        "Repair what pruning broke, on a pruned copy (the shared model is not changed), and "
        "measure the result on the evaluation windows. The chosen steps are part of the plan: "
        "the saved plan JSON carries them and Export applies them."
    )
    steps = gr.Dropdown(
        [(step.title, name) for name, step in RECOVERY_STEPS.items()],
        value=[],
        multiselect=True,
        label="Recovery steps, in the order they run",
        elem_id="recover-steps",
    )
    groups, params, files, notes = {}, [], {}, {}
    for name in with_parameters():
        step = RECOVERY_STEPS[name]
        with gr.Group(visible=False) as groups[name]:
            gr.Markdown(f"**{step.title}** · {step.paper}")
            with gr.Row():
                params.extend(control(f) for f in fields() if f.step == name)
            for key in (k for k in text_files() if k[0] == name):
                with gr.Row():
                    files[key] = gr.File(
                        label=f"{key[1].replace('_', ' ')}: a third-domain text (.txt / .jsonl)",
                        file_types=[".txt", ".jsonl"],
                        elem_id=f"recover-{name}-{key[1]}",
                        scale=1,
                    )
                    notes[key] = gr.Markdown(file_note(""), elem_id=f"recover-{name}-{key[1]}-note")
    with gr.Row():
        run = gr.Button("Recover and measure", variant="primary", elem_id="recover-run")
        stop = gr.Button("Stop", variant="stop", elem_id="recover-stop")
    recover_status = gr.HTML(elem_id="recover-status")
    with gr.Row():
        dense = gr.Textbox(label="Dense perplexity", interactive=False, elem_id="recover-dense")
        pruned = gr.Textbox(label="Pruned perplexity", interactive=False, elem_id="recover-pruned")
        recovered = gr.Textbox(
            label="Recovered perplexity", interactive=False, elem_id="recover-recovered"
        )
    with gr.Row():
        reports = gr.JSON(label="What each step reported", elem_id="recover-reports", scale=1)
        losses = gr.Plot(label="Training loss", elem_id="recover-losses", scale=2)
    return RecoverPanel(
        steps,
        groups,
        params,
        files,
        notes,
        run,
        stop,
        recover_status,
        dense,
        pruned,
        recovered,
        reports,
        losses,
    )


def file_note(path: str) -> str:
    """What the plan holds for a text-file parameter, and what it does."""
    if not path:
        return (
            "No text file: the step trains on the calibration windows. Upload one to train on "
            "`text windows` windows of it (the calibration windows' length) instead, or beside "
            "them with `with calibration`. Use a domain neither evaluation text is."
        )
    return f"The plan's step trains on windows of **{Path(path).name}**."


def control(f: Field) -> gr.components.Component:
    label, elem_id = f.name.replace("_", " "), f"recover-{f.step}-{f.name}"
    if f.choices:
        return gr.Dropdown(list(f.choices), value=f.default, label=label, elem_id=elem_id)
    if isinstance(f.default, bool):
        return gr.Checkbox(f.default, label=label, elem_id=elem_id)
    whole = isinstance(f.default, int)
    return gr.Number(f.default, precision=0 if whole else None, label=label, elem_id=elem_id)


# -- the plan's recovery entries ----------------------------------------------------------------------
def recipe(chosen: Sequence[str] | None, values: Sequence, previous: list[dict]) -> list[dict]:
    """The plan's ``recovery``: the chosen steps in their order, each with the form's values.

    Parameters the form does not show (a list of modules, say) are kept from ``previous``.
    """
    steps = RECOVERY_STEPS
    given = dict(zip(fields(), values, strict=True))
    before = {entry.get("step"): entry for entry in previous}
    out = []
    for name in chosen or []:  # Gradio refuses a name that is not one of the choices
        entry = {**before.get(name, {}), "step": name}
        for f, value in given.items():
            if f.step == name:
                entry[f.name] = checked(steps[name], f, value)
        out.append(entry)
    return out


def checked(step: RecoveryStep, f: Field, value) -> bool | int | float | str:
    """A form value as the step takes it, refused when out of range.

    Numbers must be finite and not negative; a count whose default is at least 1 (steps, rank,
    batch size, shots) must be at least 1; a choice must be one of the step's.
    """
    if f.choices:
        if value not in f.choices:
            raise PlanError(f"{step.title}: {f.name} must be one of {', '.join(f.choices)}.")
        return value
    if isinstance(f.default, bool):
        return bool(value)
    whole = isinstance(f.default, int)
    least = 1 if whole and f.default >= 1 else 0
    number = float("nan") if value is None else float(value)
    if not math.isfinite(number) or number < least or (whole and number != int(number)):
        kind = f"a whole number of {least} or more" if whole else "a number of 0 or more"
        raise PlanError(f"{step.title}: {f.name} = {value} is out of range; use {kind}.")
    return int(number) if whole else number


def shown_groups(panel: RecoverPanel, chosen: Sequence[str] | None) -> dict:
    """Each parameter group shown while its step is chosen."""
    return {group: gr.Group(visible=name in (chosen or [])) for name, group in panel.groups.items()}


def set_recovery(panel: RecoverPanel, state: gr.State, plan_save, values: dict) -> dict:
    """A change of the form: the plan's recovery (and its saved JSON) follow, when valid."""
    session: SessionState = values[state]
    chosen = values[panel.steps]
    try:
        form = [values[c] for c in panel.params]
        session.plan.recovery = recipe(chosen, form, session.plan.recovery)
    except ExplorerError as exc:
        return {panel.status: status(str(exc), "error"), **shown_groups(panel, chosen)}
    return {
        plan_save: plan_file(session),
        panel.status: status("Saved in the plan.", "ok"),
        **shown_groups(panel, chosen),
    }


def set_text_file(
    panel: RecoverPanel, state: gr.State, plan_save, key: tuple[str, str], values: dict
) -> dict:
    """An upload (or its removal) for a step's text file: the plan's entry follows, when the
    server's text rules allow the file."""
    session: SessionState = values[state]
    name, param = key
    path = values[panel.files[key]] or ""
    entries = [entry for entry in session.plan.recovery if entry.get("step") == name]
    if not entries:
        message = f"Choose “{RECOVERY_STEPS[name].title}” in the list first, then upload the file."
        return {panel.status: status(message, "error")}
    try:
        if path:
            session.policy.check_recovery([{**entries[0], param: path}])
    except ExplorerError as exc:
        return {panel.status: status(str(exc), "error")}
    for entry in entries:
        if path:
            entry[param] = path
        else:
            entry.pop(param, None)
    said = f"{Path(path).name} saved in the plan." if path else "The text file was removed."
    return {
        plan_save: plan_file(session),
        panel.status: status(said, "ok"),
        panel.file_notes[key]: file_note(path),
    }


def show(panel: RecoverPanel, state: gr.State, values: dict) -> dict:
    """The form for the session's plan (after a plan is loaded or changed elsewhere)."""
    session: SessionState = values[state]
    steps = RECOVERY_STEPS
    entries = {entry.get("step"): entry for entry in session.plan.recovery}
    chosen = [name for name in entries if name in steps]
    unknown = [str(name) for name in entries if name not in steps]
    form = [entries.get(f.step, {}).get(f.name, f.default) for f in fields()]
    out = {panel.steps: chosen, **dict(zip(panel.params, form, strict=True))}
    out.update(shown_groups(panel, chosen))
    for key, note in panel.file_notes.items():  # a server path is named, never offered back
        out[note] = file_note(str(entries.get(key[0], {}).get(key[1], "")))
        out[panel.files[key]] = None
    if unknown:
        out[panel.status] = status(
            f"The plan names unknown recovery steps ({', '.join(unknown)}); choose from the list.",
            "error",
        )
    return out


# -- recovering and measuring -------------------------------------------------------------------------
def recover(
    loaded: Loaded,
    selection: Selection,
    steps: list[dict],
    say: Callable[[str], None],
    made_for: tuple[str | None, str],
) -> Recovered:
    """The recovered copy, its step reports and perplexity; ``say(message)`` as it goes.

    Runs in a worker that holds the lock (see ``state.streamed``); a stop raises from ``say``.
    """
    ex = loaded.explorer
    say("Recovering (pruning a copy of the model)")
    model, reports = ex.recover(selection, steps, lambda _, message: say(f"Recovering ({message})"))
    evaluation = iter_perplexity(model, ex.evaluation)
    perplexity = measure(evaluation, "recovered", lambda item: say(measuring(item)))
    return Recovered(made_for, model, reports, perplexity)


def loss_figure(reports: list[dict]) -> go.Figure | None:
    """The training loss of every step that reports one (LoRA, distillation), per training step."""
    curves = [(r["step"], r["losses"]) for r in reports if r.get("losses")]
    if not curves:
        return None
    fig = go.Figure(
        [
            go.Scatter(x=list(range(1, len(losses) + 1)), y=losses, mode="lines+markers", name=name)
            for name, losses in curves
        ]
    )
    fig.update_layout(
        height=300,
        margin={"l": 10, "r": 10, "t": 30, "b": 10},
        xaxis={"title": "training step"},
        yaxis={"title": "loss (lora: next-token cross-entropy; distill: KL to the dense model)"},
        legend={"orientation": "h", "y": 1.1, "x": 1, "xanchor": "right"},
    )
    return fig


def run_recovery(panel: RecoverPanel, state: gr.State, values: dict, request: gr.Request):
    """Recover the plan's selection with the chosen steps and measure dense, pruned, recovered."""
    session: SessionState = values[state]
    loaded = SHARED.get(session.model_key)
    try:
        form = [values[c] for c in panel.params]
        steps = recipe(values[panel.steps], form, session.plan.recovery)
        if not steps:
            raise PlanError("No recovery step is chosen. Choose at least one from the list.")
        session.policy.check_recovery(steps)
        session.plan.recovery = steps
        selection = select(loaded, session.plan, lambda *_: None)
    except ExplorerError as exc:
        raise user_error(exc) from exc
    known, made_for = session.known_pruned_ppl(), session.recovery_key()

    def work(emit):
        dense, pruned = perplexities(loaded, selection, lambda item: emit(measuring(item)), known)
        return dense, pruned, recover(loaded, selection, steps, emit, made_for)

    yield {
        state: session,
        panel.status: status("Starting…"),
        panel.dense: "",
        panel.pruned: "",
        panel.recovered: "",
        panel.reports: None,
        panel.losses: None,
    }
    try:
        for kind, value in streamed(work, getattr(request, "session_hash", None), session.policy):
            if kind == "item":
                yield {state: session, panel.status: status(value)}
                continue
            dense, pruned, done = value
            session.pruned_ppl, session.preview_plan = pruned, session.pruning_json()
            session.recovered = done
            change = done.perplexity / pruned - 1 if pruned else math.nan
            result = (
                f"Done on {loaded.explorer.evaluation.shape[0]} windows: pruned {pruned:.3f} → "
                f"recovered {done.perplexity:.3f} ({change:+.1%}); dense {dense:.3f}."
            )
            message = done_status(result, recovery_warnings(done.reports))
            yield {
                state: session,
                panel.status: message,
                panel.dense: shown(dense),
                panel.pruned: shown(pruned),
                panel.recovered: shown(done.perplexity),
                panel.reports: done.reports,
                panel.losses: loss_figure(done.reports),
            }
            return
    except ExplorerError as exc:
        raise user_error(exc) from exc
    yield {state: session, panel.status: stopped()}


def done_status(result: str, warnings: list[str]) -> str:
    """The finished run's status line: a warning (also a toast) when a step made the model worse
    on the held-out calibration windows, so the user knows before exporting it."""
    if not warnings:
        return status(result, "ok")
    for warning in warnings:
        gr.Warning(warning, duration=20)
    return status(f"{result} {' '.join(warnings)}", "warn")


def wire(panel: RecoverPanel, session: gr.State, plan_events: list, plan_save) -> None:
    """Connect the form; ``plan_events`` (a loaded or changed plan) redraw it from the plan."""
    groups = list(panel.groups.values())
    for control in panel.form:
        control.input(
            handler(set_recovery, panel, session, plan_save),
            {session, *panel.form},
            [plan_save, panel.status, *groups],
            trigger_mode="always_last",
            show_progress="hidden",
            **api(None),
        )
    for key, upload in panel.files.items():
        outputs = [plan_save, panel.status, panel.file_notes[key]]
        change = handler(set_text_file, panel, session, plan_save, key)
        upload.upload(change, {session, upload}, outputs, **api(f"recover_{key[1]}"))
        upload.clear(change, {session, upload}, outputs, **api(None))
    files = [*panel.files.values(), *panel.file_notes.values()]
    for event in plan_events:
        event.success(
            handler(show, panel, session),
            {session},
            [*panel.form, *groups, panel.status, *files],
            show_progress="hidden",
            **api(None),
        )
    outputs = [
        session,
        panel.status,
        panel.dense,
        panel.pruned,
        panel.recovered,
        panel.reports,
        panel.losses,
    ]
    run = panel.run.click(
        handler(run_recovery, panel, session),
        {session, *panel.form},
        outputs,
        show_progress_on=[panel.status],
        **api("recover"),
    )
    panel.stop.click(stop_runs, None, None, cancels=[run], queue=False, **api(None)).then(
        stopped, None, panel.status, **api(None)
    )
