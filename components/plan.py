"""Plan panel: how much to cut where, with live parameter and FLOP counters; save/load as JSON.

The table has one row per layer of whatever model is loaded. Under a uniform or global allocation
its ratio columns show what the plan allocated; editing a ratio there turns the plan into a
per-layer one that starts from exactly those values. Every change re-allocates the plan on the
cached scores (milliseconds) and redraws the counters; nothing re-reads the calibration data unless
a criterion is chosen whose statistics have not been collected yet.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import gradio as gr

from explorer.catalogue import CRITERIA
from explorer.errors import ExplorerError, PlanError
from explorer.planning.plan import ALLOCATIONS, Plan
from explorer.planning.presets import TITLES, load_preset, preset_names
from explorer.planning.selection import Selection, layer_params
from explorer.scoring.base import REDUCTIONS

from .state import (
    SHARED,
    TRACK,
    Loaded,
    SessionState,
    api,
    gradio_progress,
    handler,
    human,
    select,
    status,
    user_error,
)

COLUMNS = ["layer", "head ratio", "MLP ratio", "remove", "heads kept", "MLP kept", "parameters"]
RATIO_TOLERANCE = 1e-3


@dataclass
class PlanPanel:
    allocation: gr.Radio
    criterion: gr.Dropdown
    reduction: gr.Dropdown
    target: gr.Slider
    attention_unit: gr.Radio
    protect_first: gr.Number
    protect_last: gr.Number
    round_to: gr.Dropdown
    keep_heads: gr.Checkbox
    table: gr.Dataframe
    counters: gr.HTML
    status: gr.HTML
    info: gr.JSON
    save: gr.DownloadButton
    load: gr.UploadButton
    preset: gr.Dropdown
    # The events that replace the whole plan (preset, plan file), set by ``wire``: the app then
    # shows on the Model tab the calibration they may have reloaded.
    replacing: list = field(default_factory=list)

    @property
    def controls(self) -> list:
        return [
            self.allocation,
            self.criterion,
            self.reduction,
            self.target,
            self.attention_unit,
            self.protect_first,
            self.protect_last,
            self.round_to,
            self.keep_heads,
            self.table,
        ]

    @property
    def outputs(self) -> list:
        """What every plan change redraws (the session state is prepended by ``wire``)."""
        return [*self.controls, self.counters, self.status, self.info, self.save]

    def read(self, values: dict, base: Plan) -> Plan:
        """``base`` with the panel's values (a handler's input dict); table ratios count only for
        per_layer, and ``allocation`` overrides the radio's (an edited table switches it)."""
        allocation = values[self.allocation]
        table = values[self.table]
        removed = _column(table, 3, bool)
        per_layer = allocation == "per_layer"
        return replace(
            base,
            allocation=allocation,
            criterion=values[self.criterion],
            reduction=values[self.reduction],
            target=float(values[self.target]),
            attention_unit=values[self.attention_unit],
            protect_first=int(values[self.protect_first] or 0),
            protect_last=int(values[self.protect_last] or 0),
            round_to=int(values[self.round_to]),
            remove_layers=[i for i, r in enumerate(removed) if r],
            head_ratio=0.0 if values[self.keep_heads] and not per_layer else None,
            mlp_ratio=None,
            head_ratios=_column(table, 1, float) if per_layer else None,
            mlp_ratios=_column(table, 2, float) if per_layer else None,
        )


def build() -> PlanPanel:
    plan = Plan()
    with gr.Row():
        allocation = gr.Radio(
            list(ALLOCATIONS),
            value=plan.allocation,
            label="Allocation",
            info="uniform: the same cut in every unprotected layer; global: cheapest units "
            "first across layers; sensitivity: the least measured damage (runs the sweep "
            "below); per_layer: the table below.",
            elem_id="plan-allocation",
            scale=3,
        )
        criterion = gr.Dropdown(
            CRITERIA.names(), value=plan.criterion, label="Criterion", elem_id="plan-criterion"
        )
        reduction = gr.Dropdown(list(REDUCTIONS), value=plan.reduction, label="Reduction")
    with gr.Row():
        target = gr.Slider(
            0.0,
            0.9,
            value=plan.target,
            step=0.01,
            label="Global target: share of decoder-block parameters to remove",
            info="uniform and global allocations",
            elem_id="plan-target",
            scale=3,
        )
        attention_unit = gr.Radio(["head", "kv"], value=plan.attention_unit, label="Attention unit")
        # Created here, shown in the next row: creation order is the API's parameter order.
        protect_first, protect_last = (
            gr.Number(
                value, precision=0, minimum=0, label=f"Protect the {end} N layers", render=False
            )
            for end, value in (("first", plan.protect_first), ("last", plan.protect_last))
        )
        round_to = gr.Dropdown(
            [1, 8, 32, 64], value=plan.round_to, label="Keep MLP width a multiple of"
        )
    with gr.Row():
        protect_first.render()
        protect_last.render()
        keep_heads = gr.Checkbox(
            value=plan.head_ratio == 0,
            label="Keep every attention head (cut MLP channels only)",
            info="uniform and global allocations; on small GQA models heads cost the most",
            elem_id="plan-keep-heads",
        )
    counters = gr.HTML(elem_id="plan-counters")
    plan_status = gr.HTML(elem_id="plan-status")
    table = gr.Dataframe(
        headers=COLUMNS,
        datatype=["number", "number", "number", "bool", "str", "str", "str"],
        static_columns=[0, 4, 5, 6],
        interactive=True,
        label="Per layer: share of query heads and MLP channels to remove (edit to make the "
        "plan per-layer), or remove the whole layer",
        elem_id="plan-table",
        max_height=420,
    )
    with gr.Row():
        save = gr.DownloadButton("Save plan JSON", elem_id="plan-save")
        load = gr.UploadButton("Load plan JSON", file_types=[".json"], elem_id="plan-load")
        preset = gr.Dropdown(
            [TITLES[name] for name in preset_names()],
            value=None,
            label="Preset: fill the plan with a named recipe",
            elem_id="plan-preset",
            scale=2,
        )
    info = gr.JSON(visible=False, elem_id="plan-info")
    return PlanPanel(
        allocation,
        criterion,
        reduction,
        target,
        attention_unit,
        protect_first,
        protect_last,
        round_to,
        keep_heads,
        table,
        counters,
        plan_status,
        info,
        save,
        load,
        preset,
    )


# -- the table ----------------------------------------------------------------------------------------
def ratios_of(loaded: Loaded, selection: Selection) -> tuple[list[float], list[float]]:
    """Per layer, the share of query heads and MLP channels ``selection`` removes."""
    s = loaded.structure
    heads = [round(len(selection.heads.get(i, ())) / s.heads, 4) for i in range(s.num_layers)]
    mlp = [round(len(selection.mlp.get(i, ())) / s.intermediate, 4) for i in range(s.num_layers)]
    return heads, mlp


def table_rows(loaded: Loaded, plan: Plan, selection: Selection | None) -> list[list]:
    s = loaded.structure
    if plan.allocation == "per_layer":
        heads = plan.head_ratios or [0.0] * s.num_layers
        mlp = plan.mlp_ratios or [0.0] * s.num_layers
    elif selection is not None:
        heads, mlp = ratios_of(loaded, selection)
    else:
        heads = mlp = [None] * s.num_layers
    rows = []
    for i in range(s.num_layers):
        removed = i in plan.remove_layers
        if selection is None:
            kept = ["—", "—", "—"]
        elif removed:
            kept = ["0 (layer removed)", "0", "0"]
        else:
            k = selection.kept(s, i)
            kept = [
                f"{k['heads']}/{s.heads} ({k['kv_heads']} kv)",
                f"{k['intermediate']}/{s.intermediate}",
                human(layer_params(s, selection, i)),
            ]
        rows.append([i, heads[i], mlp[i], removed, *kept])
    return rows


def _rows(table) -> list:
    return table.values.tolist() if hasattr(table, "values") else list(table or [])


def check_rows(table, num_layers: int) -> None:
    """Refuse a table (from an API client, say) without one full row per layer."""
    rows = _rows(table)
    if len(rows) != num_layers or any(len(row) < 4 for row in rows):
        raise PlanError(
            f"The per-layer table has {len(rows)} rows; the model has {num_layers} layers. "
            "Send one row per layer (layer, head ratio, MLP ratio, remove)."
        )


def _column(table, index: int, cast) -> list:
    rows = _rows(table)
    out = []
    for row in rows:
        value = row[index]
        if cast is bool:
            out.append(value in (True, "true", "True", 1, "1"))
            continue
        try:
            out.append(float(value))
        except (TypeError, ValueError):
            raise PlanError(
                f"Layer {row[0]}: '{value}' is not a number. Type a share between 0 and 1."
            ) from None
    return out


# -- applying a plan ---------------------------------------------------------------------------------
def evaluate_plan(
    loaded: Loaded, plan: Plan, progress: gr.Progress
) -> tuple[Selection | None, str | None]:
    """The selection, or the reason the plan cannot be built."""
    try:
        return select(loaded, plan, gradio_progress(progress)), None
    except ExplorerError as exc:
        return None, str(exc)


def render(
    panel: PlanPanel, state: gr.State, session: SessionState, selection: Selection | None, error
) -> dict:
    """Every output of a plan change, for the session's (possibly invalid) plan."""
    loaded = SHARED.get(session.model_key)
    plan = session.plan
    info = {"plan": plan.to_dict(), "error": error, "sizes": None, "kept": None}
    if selection is not None:
        sizes = loaded.explorer.sizes(selection)
        info["sizes"] = sizes
        info["kept"] = [
            selection.kept(loaded.structure, i) for i in range(loaded.structure.num_layers)
        ]
        counters = counters_html(sizes, selection, loaded)
        message = status("The plan is valid.", "ok")
    else:
        counters = counters_html(None, None, loaded)
        message = status(error or "", "error")
    return {
        state: session,
        panel.allocation: plan.allocation,
        panel.criterion: plan.criterion,
        panel.reduction: plan.reduction,
        panel.target: plan.target if plan.target is not None else 0.0,
        panel.attention_unit: plan.attention_unit,
        panel.protect_first: plan.protect_first,
        panel.protect_last: plan.protect_last,
        panel.round_to: plan.round_to,
        panel.keep_heads: plan.head_ratio == 0,
        panel.table: table_rows(loaded, plan, selection),
        panel.counters: counters,
        panel.status: message,
        panel.info: info,
        panel.save: plan_file(session),
    }


def plan_file(session: SessionState) -> str:
    """The session's plan as ``plan.json`` in its own folder, for the download button."""
    path = session.scratch("plan") / "plan.json"
    session.plan.save(path)
    return str(path)


def counters_html(sizes: dict | None, selection: Selection | None, loaded: Loaded) -> str:
    """Parameters and estimated FLOPs per token, before and after."""
    if sizes is None:
        return '<div class="pe-counters pe-muted">No valid plan: counters unavailable.</div>'

    def box(title: str, before: float, after: float) -> str:
        change = (after - before) / before if before else 0.0
        return (
            f'<div class="pe-counter"><div class="pe-counter-title">{title}</div>'
            f'<div class="pe-counter-value">{human(before)} → <b>{human(after)}</b></div>'
            f'<div class="pe-counter-change">{change:+.1%}</div></div>'
        )

    s = loaded.structure
    removed_heads = sum(len(v) for k, v in selection.heads.items() if k not in selection.layers)
    removed_mlp = sum(len(v) for k, v in selection.mlp.items() if k not in selection.layers)
    context = loaded.explorer.evaluation.shape[1]
    return (
        '<div class="pe-counters">'
        + box("Parameters", sizes["params_before"], sizes["params_after"])
        + box("Decoder blocks", sizes["block_params_before"], sizes["block_params_after"])
        + box(f"FLOPs / token (context {context})", sizes["flops_before"], sizes["flops_after"])
        + f'<div class="pe-counter"><div class="pe-counter-title">Removed</div>'
        f'<div class="pe-counter-value">{removed_heads} of {s.heads * s.num_layers} query heads, '
        f"{removed_mlp:,} of {s.intermediate * s.num_layers:,} MLP channels, "
        f"{len(selection.layers)} of {s.num_layers} layers</div></div>"
        "</div>"
    )


def apply(panel: PlanPanel, state: gr.State, values: dict, progress=TRACK) -> dict:
    """Any change of a control: the new plan, re-allocated, with its counters."""
    return _apply(panel, state, values, values[panel.allocation], progress)


def edit_table(panel: PlanPanel, state: gr.State, values: dict, progress=TRACK) -> dict:
    """A table edit: an edited ratio turns the plan into a per-layer one, for good.

    The allocation comes from the session's plan, not from the radio's value sent with the
    event: an edit queued behind the one that switched the plan to per-layer still carries the
    old allocation, and taking it turned the plan back (the edit "reverted" seconds later). A
    cell that is not a number is refused while the plan, and so every other cell, stays as it
    was.
    """
    session = values[state]
    loaded = SHARED.get(session.model_key)
    shown, _ = evaluate_plan(loaded, session.plan, progress)
    table = values[panel.table]
    try:
        check_rows(table, loaded.structure.num_layers)
        _column(table, 1, float), _column(table, 2, float)
    except PlanError as exc:
        return render(panel, state, session, shown, str(exc))
    edited = shown is not None and _differs(table, *ratios_of(loaded, shown))
    allocation = "per_layer" if edited else session.plan.allocation
    return _apply(panel, state, values, allocation, progress)


def _apply(panel: PlanPanel, state: gr.State, values: dict, allocation: str, progress) -> dict:
    session = values[state]
    loaded = SHARED.get(session.model_key)
    try:
        check_rows(values[panel.table], loaded.structure.num_layers)
        session.plan = panel.read({**values, panel.allocation: allocation}, session.plan)
        session.plan.check(loaded.structure.num_layers, CRITERIA)
    except PlanError as exc:
        return render(panel, state, session, None, str(exc))
    return render(panel, state, session, *evaluate_plan(loaded, session.plan, progress))


def _differs(table, heads: list[float], mlp: list[float]) -> bool:
    pairs = zip(_column(table, 1, float) + _column(table, 2, float), heads + mlp, strict=True)
    return any(abs(a - b) > RATIO_TOLERANCE for a, b in pairs)


def show(panel: PlanPanel, state: gr.State, values: dict, progress=TRACK) -> dict:
    """Redraw for the session's plan (after a model load)."""
    session = values[state]
    loaded = SHARED.get(session.model_key)
    try:
        session.plan.check(loaded.structure.num_layers, CRITERIA)
    except PlanError as exc:
        return render(panel, state, session, None, str(exc))
    return render(panel, state, session, *evaluate_plan(loaded, session.plan, progress))


def load_plan(panel: PlanPanel, state: gr.State, values: dict, progress=TRACK) -> dict:
    """A plan file from the user: refused with a readable error, the current plan kept."""
    session, path = values[state], values[panel.load]
    try:
        if not path:
            raise PlanError("No file was uploaded. Choose a plan .json file.")
        plan = Plan.load(path)
    except ExplorerError as exc:
        raise user_error(exc) from exc
    return use_plan(panel, state, session, plan, progress)


def choose_preset(panel: PlanPanel, state: gr.State, values: dict, progress=TRACK) -> dict:
    """A shipped recipe from the preset menu (the same file ``--preset`` replays)."""
    names = {TITLES[name]: name for name in preset_names()}
    try:
        if values[panel.preset] not in names:
            raise PlanError("Unknown preset. Choose one from the menu.")
        plan = load_preset(names[values[panel.preset]])
    except ExplorerError as exc:
        raise user_error(exc) from exc
    return use_plan(panel, state, values[state], plan, progress)


def use_plan(panel: PlanPanel, state: gr.State, session, plan: Plan, progress) -> dict:
    """Make ``plan`` the session's, on the loaded model and text (warning where they differ).

    A plan that calibrates on another amount than the loaded one is recalibrated on its own
    (the shared entry for that amount, loaded if needed): the plan is what every number is for.
    """
    loaded = SHARED.get(session.model_key)
    try:
        plan.check(loaded.structure.num_layers, CRITERIA)
        amount = (plan.calibration_windows, plan.calibration_length)
        if amount != (loaded.settings.calibration_windows, loaded.settings.calibration_length):
            loaded = SHARED.reopen(loaded, *amount, gradio_progress(progress), session.policy)
    except ExplorerError as exc:
        raise user_error(exc) from exc
    if loaded.key != session.model_key:
        session.switch_model(loaded.key)
        gr.Info(f"Recalibrated on the plan's {amount[0]} x {amount[1]} tokens.")
    source = loaded.summary["source"]
    if plan.model != source:
        gr.Warning(f"The plan was made for {plan.model}; it is applied to {source}.")
        plan.model = source
    current = session.plan
    if (plan.calibration, plan.evaluation) != (current.calibration, current.evaluation):
        gr.Warning(
            "The plan names other calibration or evaluation text; the loaded text is used. "
            "Choose the plan's text on the Model tab and load again to use it."
        )
    plan.calibration, plan.evaluation = current.calibration, current.evaluation
    session.plan = plan
    return render(panel, state, session, *evaluate_plan(loaded, plan, progress))


def wire(panel: PlanPanel, session: gr.State) -> list:
    """Connect the controls; returns the events that change the plan (for the live preview).

    Handlers take the set of their inputs as one dict keyed by component; Gradio orders a set by
    creation, which is the API's parameter order (``build`` creates the controls in that order).
    """
    inputs = {session, *panel.controls}
    outputs = [session, *panel.outputs]
    events = []
    for control in panel.controls[:-1]:
        trigger = control.release if isinstance(control, gr.Slider) else control.input
        events.append(
            trigger(
                handler(apply, panel, session),
                inputs,
                outputs,
                **api("set_plan" if control is panel.allocation else None),
                trigger_mode="always_last",
                show_progress_on=[panel.counters],
            )
        )
    events.append(
        panel.table.input(
            handler(edit_table, panel, session),
            inputs,
            outputs,
            **api("edit_table"),
            trigger_mode="always_last",
            show_progress_on=[panel.counters],
        )
    )
    panel.replacing[:] = [
        panel.preset.input(
            handler(choose_preset, panel, session),
            {session, panel.preset},
            outputs,
            show_progress_on=[panel.counters],
            **api("choose_preset"),
        ),
        panel.load.upload(
            handler(load_plan, panel, session),
            {session, panel.load},
            outputs,
            show_progress_on=[panel.counters],  # a plan may recalibrate (see ``use_plan``)
            **api("load_plan"),
        ),
    ]
    return events + panel.replacing


def refresh_event(panel: PlanPanel, session: gr.State, after, name: str | None = None):
    return after.success(
        handler(show, panel, session),
        {session},
        [session, *panel.outputs],
        **api(name),
        show_progress_on=[panel.counters],
    )
