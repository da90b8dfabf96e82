"""Plan tab, sensitivity: measure what cutting each layer alone costs, and see the plan against it.

*Measure sensitivity* runs the sweep the session's plan asks for (its criterion, its live
recovery steps, ``sensitivity_ratios`` on ``sensitivity_windows`` windows of the calibration text's held-out
tail, never the evaluation text), streaming
each point with a Stop; the result is cached on the shared session, so the ``sensitivity``
allocation and every later redraw reuse it. The heatmap and the per-layer curves carry the
current plan's share per layer, redrawn on every plan change.
"""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from explorer.errors import ExplorerError

from .plan import ratios_of
from .sensitivity_figures import curves, heatmap
from .state import SHARED, SessionState, api, select, status, stop_runs, streamed, user_error


@dataclass
class SensitivityPanel:
    run: gr.Button
    stop: gr.Button
    kind: gr.Radio
    status: gr.HTML
    heatmap: gr.Plot
    curves: gr.Plot


def build() -> SensitivityPanel:
    with gr.Accordion("Per-layer sensitivity (measured damage of cutting one layer alone)"):
        with gr.Row():
            run = gr.Button("Measure sensitivity", elem_id="sens-run")
            stop = gr.Button("Stop", variant="stop", elem_id="sens-stop")
            kind = gr.Radio(["mlp", "head"], value="mlp", label="Show", elem_id="sens-kind")
        sens_status = gr.HTML(elem_id="sens-status")
        with gr.Row():
            heat = gr.Plot(label="Layer x ratio", elem_id="sens-heatmap")
            lines = gr.Plot(label="Per-layer curves", elem_id="sens-curves")
    return SensitivityPanel(run, stop, kind, sens_status, heat, lines)


def shares(session: SessionState, kind: str) -> list[float] | None:
    """The current plan's share cut per layer (None when the plan cannot be built)."""
    loaded = SHARED.get(session.model_key)
    try:
        selection = select(loaded, session.plan, lambda *_: None)
    except ExplorerError:
        return None
    heads, mlp = ratios_of(loaded, selection)
    return mlp if kind == "mlp" else heads


def figures(session: SessionState, kind: str):
    """Heatmap and curves of the session plan's sweep, if measured (else left as they are)."""
    if session.model_key is None:
        return gr.skip(), gr.skip()
    loaded = SHARED.get(session.model_key)
    sens = loaded.explorer.known_sensitivity(session.plan)
    if sens is None or kind not in sens.kinds:
        return gr.skip(), gr.skip()
    plan_shares = shares(session, kind)
    return heatmap(sens, kind, plan_shares), curves(sens, kind, plan_shares)


def run_sweep(session: SessionState, kind: str, request: gr.Request):
    """Stream the sweep's progress; draw the figures when it is complete."""
    loaded = SHARED.get(session.model_key)
    ex, plan = loaded.explorer, session.plan
    request_ = ex.sensitivity_request(plan)

    def work(emit):
        for _ in ex.iter_sensitivity(plan, progress=lambda f, m: emit(f"{f:.0%}: {m}")):
            pass
        return ex.known_sensitivity(plan)

    steps = ", ".join(e["step"] for e in request_.steps) or "none"
    yield (
        status(
            f"Measuring {', '.join(request_.kinds)} of every layer at {request_.ratios} on "
            f"{request_.windows[0]} x {request_.windows[1]} tokens of {request_.text} text "
            f"(criterion {plan.criterion}, "
            f"live steps: {steps})…"
        ),
        gr.skip(),
        gr.skip(),
    )
    try:
        for item, value in streamed(work, getattr(request, "session_hash", None)):
            if item == "done":
                message = status(
                    f"Done: {len(value.points)} points in {value.seconds:.0f} s. The "
                    "'sensitivity' allocation now uses them.",
                    "ok",
                )
                yield message, *figures(session, kind)
                return
            yield status(value), gr.skip(), gr.skip()
    except ExplorerError as exc:
        raise user_error(exc) from exc
    yield stopped(session)[0], gr.skip(), gr.skip()


def stopped(session: SessionState) -> tuple:
    """After Stop: say so at once (the stopped run shows nothing more), unless the sweep is done."""
    loaded = SHARED.get(session.model_key)
    done = loaded.explorer.known_sensitivity(session.plan) is not None
    return (gr.skip() if done else status("Stopped; nothing kept.", "info"),)


def wire(panel: SensitivityPanel, session: gr.State, plan_events: list) -> None:
    outputs = [panel.status, panel.heatmap, panel.curves]
    # "always_last": a press that lands while the page still counts a stopped run as pending is
    # kept and runs once that run has ended, instead of being dropped ("once", the default).
    run = panel.run.click(
        run_sweep,
        [session, panel.kind],
        outputs,
        show_progress_on=[panel.status],
        trigger_mode="always_last",
        **api("sweep"),
    )
    panel.stop.click(stop_runs, None, None, cancels=[run], queue=False, **api(None)).then(
        stopped, [session], [panel.status], **api(None)
    )
    redraw = {"show_progress": "hidden", **api(None)}
    panel.kind.input(figures, [session, panel.kind], [panel.heatmap, panel.curves], **redraw)
    for event in plan_events:
        event.then(figures, [session, panel.kind], [panel.heatmap, panel.curves], **redraw)
