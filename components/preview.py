"""Preview panel: dense vs pruned perplexity streamed batch by batch, and side-by-side generations.

The pruned view is the shared model under reversible masks, so nothing is copied. The dense
perplexity is measured once per loaded model; the pruned one restarts from the first layer the plan
changed since the last preview (``Explorer.iter_perplexity``), so moving one late layer's ratio
recomputes only the layers after it. A running preview stops at the next batch when Stop is pressed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass

import gradio as gr
import plotly.graph_objects as go
import torch

from explorer.errors import ExplorerError
from explorer.planning.selection import Selection
from explorer.recovery.live import split_steps
from explorer.session import OFFDOMAIN_WINDOWS

from .state import (
    SHARED,
    TRACK,
    Loaded,
    SessionState,
    api,
    gradio_progress,
    handler,
    select,
    status,
    stop_runs,
    streamed,
    user_error,
)

BIG_DROP, DROP = 2.0, 1.0  # nats: how far a token's log-probability fell to be highlighted
LABELS = {"big": f"fell > {BIG_DROP:g} nats", "drop": f"fell {DROP:g}–{BIG_DROP:g} nats"}
DIVERGES = "pruned output diverges here"
OFF_DENSE, OFF_PRUNED = "off-domain dense", "off-domain pruned"
STALE = "Stale: the plan changed since this result. Run the preview again."


@dataclass
class PreviewPanel:
    run: gr.Button
    stop: gr.Button
    auto: gr.Checkbox
    dense: gr.Textbox
    pruned: gr.Textbox
    second: gr.Checkbox
    offdomain: gr.Textbox
    status: gr.HTML
    curve: gr.Plot
    prompt: gr.Textbox
    max_new_tokens: gr.Slider
    seed: gr.Number
    sample: gr.Checkbox
    generate: gr.Button
    dense_text: gr.HighlightedText
    pruned_text: gr.HighlightedText
    generation_status: gr.Markdown


def build() -> PreviewPanel:
    gr.Markdown(
        "Perplexity on the evaluation windows, dense and pruned (masks on the shared model, "
        "nothing copied), updated after every batch."
    )
    with gr.Row():
        run = gr.Button("Run preview", variant="primary", elem_id="preview-run")
        stop = gr.Button("Stop", variant="stop", elem_id="preview-stop")
        auto = gr.Checkbox(
            value=True, label="Preview again after every plan change", elem_id="preview-auto"
        )
    with gr.Row():
        dense = gr.Textbox(label="Dense perplexity", interactive=False, elem_id="preview-dense")
        pruned = gr.Textbox(label="Pruned perplexity", interactive=False, elem_id="preview-pruned")
    with gr.Row():
        second = gr.Checkbox(
            value=True,
            label=f"Also on a second text domain (Wikipedia lead paragraphs, {OFFDOMAIN_WINDOWS} x "
            "256 tokens) that calibration and recovery never read",
            elem_id="preview-second",
        )
        offdomain = gr.Textbox(
            label="Off-domain perplexity: dense → pruned",
            interactive=False,
            elem_id="preview-offdomain",
        )
    preview_status = gr.HTML(elem_id="preview-status")
    curve = gr.Plot(label="Running perplexity", elem_id="preview-curve")
    gr.Markdown("### The same prompt, dense and pruned")
    with gr.Row():
        prompt = gr.Textbox(
            value="What is the capital of France?",
            label="Prompt",
            elem_id="gen-prompt",
            scale=3,
        )
        max_new_tokens = gr.Slider(
            8, 128, value=40, step=8, label="New tokens", elem_id="gen-tokens"
        )
        seed = gr.Number(0, precision=0, label="Seed")
        sample = gr.Checkbox(value=False, label="Sample (top-k 50) instead of greedy")
    generate = gr.Button("Generate with both", elem_id="gen-run")
    colours = {LABELS["big"]: "#E45756", LABELS["drop"]: "#F2B134", DIVERGES: "#4C78A8"}
    with gr.Row():
        dense_text = gr.HighlightedText(
            label="Dense (highlighted: tokens the pruned model finds much less likely)",
            color_map=colours,
            show_legend=True,
            elem_id="gen-dense",
        )
        pruned_text = gr.HighlightedText(
            label="Pruned", color_map=colours, show_legend=True, elem_id="gen-pruned"
        )
    generation_status = gr.Markdown(elem_id="gen-status")
    return PreviewPanel(
        run,
        stop,
        auto,
        dense,
        pruned,
        second,
        offdomain,
        preview_status,
        curve,
        prompt,
        max_new_tokens,
        seed,
        sample,
        generate,
        dense_text,
        pruned_text,
        generation_status,
    )


# -- perplexity ---------------------------------------------------------------------------------------
def perplexities(
    loaded: Loaded,
    selection: Selection,
    emit: Callable,
    known: float | None = None,
    steps: Sequence[dict] = (),
) -> tuple[float, float]:
    """Dense (once per model) then pruned perplexity; ``emit((view, step))`` after every batch.

    ``known``: the pruned perplexity when a preview already measured it (not measured again).
    ``steps``: recovery steps; the live ones are applied (``explorer.recovery.live``).
    Runs in a worker that holds the lock (see ``state.streamed``).
    """
    ex = loaded.explorer
    if loaded.dense_ppl is None:
        loaded.dense_ppl = measure(ex.iter_perplexity(Selection()), "dense", emit)
    if known is not None:
        return loaded.dense_ppl, known
    return loaded.dense_ppl, measure(ex.iter_perplexity(selection, steps), "pruned", emit)


def offdomain_perplexities(
    loaded: Loaded, selection: Selection, emit: Callable, steps: Sequence[dict] = ()
) -> tuple[float, float]:
    """Dense (once per model) and pruned perplexity on the second domain, the live steps applied,
    with its own incremental preview; ``emit`` as in ``perplexities``."""
    ex = loaded.explorer
    if loaded.dense_offdomain is None:
        loaded.dense_offdomain = measure(ex.iter_offdomain(Selection()), OFF_DENSE, emit)
    return loaded.dense_offdomain, measure(ex.iter_offdomain(selection, steps), OFF_PRUNED, emit)


def offdomain_text(dense: float | None, pruned: float | None) -> str:
    if dense is None:
        return ""
    return f"{dense:.3f} → {pruned:.3f}" if pruned is not None else f"{dense:.3f} → …"


def included(steps: Sequence[dict]) -> str:
    """Which recovery steps the previewed number includes, and which it does not."""
    live, later = split_steps(steps)
    names = ", ".join(e["step"] for e in live)
    text = f"Includes the live steps: {names}." if live else "Masks only (no recovery step)."
    if later:
        text += (
            f" Not included: {', '.join(e['step'] for e in later)} (they cannot run live; "
            "Recover or Export gives the number with them)."
        )
    return text


def preview_key(session: SessionState) -> str:
    """What a preview's number depends on: the pruning, and the live steps when there are any."""
    live, _ = split_steps(session.plan.recovery)
    return session.plan_json() if live else session.pruning_json()


def measure(steps: Iterator, view: str, emit: Callable) -> float:
    """Run a perplexity stream to its end, ``emit((view, step))`` after every batch."""
    step = None
    with closing(steps):  # a stop closes the run at once, taking its masks off
        for step in steps:
            emit((view, step))
    return step.perplexity if step is not None else math.nan


def measuring(item: tuple) -> str:
    """What an emitted ``(view, step)`` of ``measure`` reads as in a status line."""
    view, step = item
    return (
        f"Measuring {view} perplexity ({step.done}/{step.total} windows, "
        f"running {step.perplexity:.2f})"
    )


def curve_figure(curves: dict[str, list[tuple[int, float]]], total: int) -> go.Figure:
    fig = go.Figure()
    for view, colour in (("dense", "#4C78A8"), ("pruned", "#E45756")):
        points = curves.get(view) or []
        fig.add_trace(
            go.Scatter(
                x=[p[0] for p in points],
                y=[p[1] for p in points],
                mode="lines+markers",
                name=view,
                line={"color": colour},
            )
        )
    fig.update_layout(
        height=300,
        margin={"l": 10, "r": 10, "t": 30, "b": 10},
        xaxis={"title": "evaluation windows done", "range": [0, total + 0.5]},
        yaxis={"title": "running perplexity (log scale)", "type": "log"},
        legend={"orientation": "h", "y": 1.1, "x": 1, "xanchor": "right"},
    )
    return fig


def shown(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def run_preview(panel: PreviewPanel, state: gr.State, values: dict, request: gr.Request):
    """Stream both perplexities; the session records the pruned one with the plan it belongs to."""
    session: SessionState = values[state]
    loaded = SHARED.get(session.model_key)
    try:
        selection = select(loaded, session.plan, lambda *_: None)
    except ExplorerError as exc:
        yield {
            state: session,
            panel.pruned: "",
            panel.status: status(f"No preview: {exc}", "error"),
        }
        return

    def outputs(message: str) -> dict:
        return {
            state: session,
            panel.dense: shown(dense),
            panel.pruned: shown(pruned),
            panel.status: message,
            panel.curve: curve_figure(curves, total),
            panel.offdomain: offdomain_text(*off),
        }

    pruning, steps = preview_key(session), list(session.plan.recovery)
    total = loaded.explorer.evaluation.shape[0]
    curves: dict[str, list] = {"dense": [], "pruned": []}
    if loaded.dense_ppl is not None:  # measured once per model: a flat line
        curves["dense"] = [(1, loaded.dense_ppl), (total, loaded.dense_ppl)]
    dense, pruned = loaded.dense_ppl, None
    second = session.second_domain
    off: list[float | None] = [loaded.dense_offdomain if second else None, None]

    def work(emit: Callable) -> tuple:
        main = perplexities(loaded, selection, emit, steps=steps)
        return main + (offdomain_perplexities(loaded, selection, emit, steps) if second else ())

    try:
        for kind, value in streamed(work, getattr(request, "session_hash", None), session.policy):
            if kind == "done":
                dense, pruned = value[:2]
                off = list(value[2:]) or off
                session.pruned_ppl, session.preview_plan = pruned, pruning
                change = pruned / dense - 1 if dense else math.nan
                text = f"Done on {total} windows: dense {dense:.3f}, pruned {pruned:.3f} ({change:+.1%})"
                if second:
                    text += f"; off-domain {off[0]:.3f} → {off[1]:.3f} ({off[1] / off[0] - 1:+.1%})"
                message = status(f"{text}. {included(steps)}", "ok")
                yield outputs(message)
                return
            view, step = value
            if view in curves:
                curves[view].append((step.done, step.perplexity))
            if view == "dense":
                dense = step.perplexity
            elif view == "pruned":
                pruned = step.perplexity
            else:
                off[view == OFF_PRUNED] = step.perplexity
            message = status(
                f"{view}: {step.done}/{step.total} windows, running perplexity "
                f"{step.perplexity:.3f}"
            )
            yield outputs(message)
    except ExplorerError as exc:
        raise user_error(exc) from exc
    yield outputs(status("Stopped.", "info"))


def choose_second_domain(panel: PreviewPanel, state: gr.State, values: dict) -> dict:
    """Whether this session's previews also measure the off-domain text."""
    session: SessionState = values[state]
    session.second_domain = bool(values[panel.second])
    return {state: session}


def auto_preview(panel: PreviewPanel, state: gr.State, values: dict, request: gr.Request):
    """After a plan change: preview again when asked to; else mark the shown result stale."""
    session = values[state]
    stale = session.preview_plan is not None and session.preview_plan != preview_key(session)
    if stale:  # at once, before a new run has anything to show
        yield {panel.status: status(STALE, "error")}
    if values[panel.auto]:
        yield from run_preview(panel, state, values, request)
    elif not stale:
        yield {}


def stopped() -> str:
    return status("Stopped.", "info")


# -- generation ---------------------------------------------------------------------------------------
def continuation(explorer, selection: Selection, prompt: str, **kwargs) -> tuple[torch.Tensor, int]:
    """All token ids (prompt + continuation) of one view, and where the continuation starts."""
    _, ids, prompt_length = explorer.generate(selection, prompt, **kwargs)
    return ids, prompt_length


def highlighted(tokenizer, ids: torch.Tensor, labels: list[str | None]) -> list[tuple]:
    """(token text, label) pairs; line breaks drawn as ↵ so a run of them stays visible."""
    return [
        (tokenizer.decode([int(i)]).replace("\n", "↵"), label)
        for i, label in zip(ids, labels, strict=True)
    ]


def generate(panel: PreviewPanel, state: gr.State, values: dict, progress=TRACK) -> dict:
    """Dense and pruned continuations of one prompt with one seed, the drops highlighted."""
    session: SessionState = values[state]
    prompt = values[panel.prompt]
    loaded = SHARED.get(session.model_key)
    if not (prompt or "").strip():
        raise gr.Error("Type a prompt first.")
    options = {
        "max_new_tokens": int(values[panel.max_new_tokens]),
        "seed": int(values[panel.seed] or 0),
        "sample": values[panel.sample],
    }
    report = gradio_progress(progress)
    try:
        session.policy.check_generation(prompt, options["max_new_tokens"])
        selection = select(loaded, session.plan, report)
        ex = loaded.explorer
        with SHARED.lock:
            report(0.1, "Generating with the dense model")
            dense_ids, start = continuation(ex, Selection(), prompt, **options)
            report(0.45, "Generating with the pruned model")
            pruned_ids, _ = continuation(ex, selection, prompt, **options)
            report(0.8, "Scoring the dense text with both")
            drop = ex.logprob_drop(selection, dense_ids)[start:]
    except ExplorerError as exc:
        raise user_error(exc) from exc
    tok = ex.workspace.tokenizer
    dense_new, pruned_new = dense_ids[start:], pruned_ids[start:]
    dense_labels = [
        LABELS["big"] if d >= BIG_DROP else LABELS["drop"] if d >= DROP else None
        for d in drop.tolist()
    ]
    pruned_labels: list[str | None] = [None] * len(pruned_new)
    same = [int(a) == int(b) for a, b in zip(dense_new, pruned_new, strict=False)]
    first = same.index(False) if False in same else None
    if first is not None:
        pruned_labels[first] = DIVERGES
    mean_drop = float(drop.mean()) if drop.numel() else 0.0
    summary = (
        f"Mean log-probability drop over the dense continuation: **{mean_drop:.2f} nats/token**; "
        + (
            f"the pruned text diverges at token {first + 1}."
            if first is not None
            else "the pruned text is identical."
        )
    )
    return {
        panel.dense_text: highlighted(tok, dense_new, dense_labels),
        panel.pruned_text: highlighted(tok, pruned_new, pruned_labels),
        panel.generation_status: summary,
    }


def wire(panel: PreviewPanel, session: gr.State, plan_events: list) -> None:
    outputs = [session, panel.dense, panel.pruned, panel.status, panel.curve, panel.offdomain]
    shown = {"show_progress_on": [panel.status]}
    run = handler(run_preview, panel, session)
    runs = [panel.run.click(run, {session}, outputs, **shown, **api("preview"))]
    auto = handler(auto_preview, panel, session)
    for event in plan_events:
        runs.append(event.then(auto, {session, panel.auto}, outputs, **shown, **api(None)))
    panel.second.change(
        handler(choose_second_domain, panel, session),
        {session, panel.second},
        [session],
        **api(None),
    )
    panel.stop.click(stop_runs, None, None, cancels=runs, **api("stop"), queue=False).then(
        stopped, None, panel.status, **api(None)
    )
    panel.generate.click(
        handler(generate, panel, session),
        {session, panel.prompt, panel.max_new_tokens, panel.seed, panel.sample},
        [panel.dense_text, panel.pruned_text, panel.generation_status],
        show_progress_on=[panel.generation_status],
        **api("generate"),
    )
