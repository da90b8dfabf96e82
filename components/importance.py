"""Importance panel: a layer × unit heatmap of one criterion, and how far two criteria agree.

Agreement per layer, at a given pruning ratio: the overlap of the two prune sets (the share of the
units one criterion would remove that the other would remove too) and Spearman's rank correlation
of the two score vectors. Two criteria can rank units quite differently and still agree on which
few go, or the other way round, so both are shown.
"""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr
import plotly.graph_objects as go
import torch

from explorer.catalogue import CRITERIA
from explorer.errors import ExplorerError
from explorer.scoring.base import REDUCTIONS

from .state import SHARED, TRACK, SessionState, api, gradio_progress, handler, scores, user_error

UNIT_LABELS = {
    "head": "query heads",
    "kv": "key-value groups",
    "mlp": "MLP channels",
    "layer": "layers",
}
SCALES = ["log10", "raw", "rank in layer"]


@dataclass
class ImportancePanel:
    criterion: gr.Dropdown
    reduction: gr.Dropdown
    kind: gr.Radio
    scale: gr.Radio
    heatmap: gr.Plot
    criterion_b: gr.Dropdown
    ratio: gr.Slider
    agreement: gr.Plot
    table: gr.Dataframe


def build() -> ImportancePanel:
    names = CRITERIA.names()
    with gr.Row():
        criterion = gr.Dropdown(names, value="taylor", label="Criterion", elem_id="imp-criterion")
        reduction = gr.Dropdown(
            list(REDUCTIONS), value="sum", label="Reduction over a group's slices"
        )
        kind = gr.Radio(list(UNIT_LABELS), value="head", label="Unit", elem_id="imp-kind")
        scale = gr.Radio(SCALES, value="log10", label="Colour scale")
    heatmap = gr.Plot(label="Importance (lowest go first)", elem_id="imp-heatmap")
    gr.Markdown("### Agreement with a second criterion")
    with gr.Row():
        criterion_b = gr.Dropdown(
            names,
            value=names[1] if len(names) > 1 else names[0],
            label="Second criterion",
            elem_id="imp-criterion-b",
        )
        ratio = gr.Slider(
            0.05,
            0.9,
            value=0.2,
            step=0.05,
            label="Share of units pruned per layer",
            elem_id="imp-ratio",
        )
    with gr.Row():
        agreement_plot = gr.Plot(label="Agreement per layer", elem_id="imp-agreement", scale=2)
        table = gr.Dataframe(
            headers=["layer", "overlap", "spearman"],
            interactive=False,
            label="Per layer",
            elem_id="imp-agreement-table",
            scale=1,
            max_height=380,
        )
    return ImportancePanel(
        criterion, reduction, kind, scale, heatmap, criterion_b, ratio, agreement_plot, table
    )


# -- numbers ----------------------------------------------------------------------------------------
def ranks(x: torch.Tensor) -> torch.Tensor:
    """0-based ranks along the last axis, ties broken by position (as plan resolution does)."""
    order = torch.sort(x.double(), dim=-1, stable=True).indices
    out = torch.empty_like(order)
    out.scatter_(-1, order, torch.arange(x.shape[-1]).expand_as(order).contiguous())
    return out


def agreement(a: torch.Tensor, b: torch.Tensor, ratio: float) -> list[dict]:
    """Per row (layer): prune-set overlap at ``ratio`` and Spearman's rank correlation."""
    a, b = a.float().cpu(), b.float().cpu()
    if a.dim() == 1:
        a, b = a[None], b[None]
    n = max(1, round(ratio * a.shape[-1]))
    ra, rb = ranks(a).double(), ranks(b).double()
    out = []
    for row in range(a.shape[0]):
        prune_a = set((ra[row] < n).nonzero().flatten().tolist())
        prune_b = set((rb[row] < n).nonzero().flatten().tolist())
        x, y = ra[row] - ra[row].mean(), rb[row] - rb[row].mean()
        denom = float(x.norm() * y.norm())
        out.append(
            {
                "layer": row,
                "overlap": len(prune_a & prune_b) / n,
                "spearman": float((x * y).sum()) / denom if denom else float("nan"),
            }
        )
    return out


# -- figures ----------------------------------------------------------------------------------------
def heatmap_figure(values: torch.Tensor, criterion: str, kind: str, scale: str) -> go.Figure:
    z = values.float().cpu()
    if z.dim() == 1:
        z = z[:, None]
    if scale == "log10":
        z = torch.log10(z.abs() + 1e-12)
    elif scale == "rank in layer":
        z = ranks(z).float() / max(z.shape[-1] - 1, 1)
    fig = go.Figure(
        go.Heatmap(
            z=z.tolist(),
            colorscale="Viridis",
            colorbar={"title": scale},
            hovertemplate="layer %{y}, unit %{x}: %{z:.3g}<extra></extra>",
        )
    )
    fig.update_layout(
        height=460,
        margin={"l": 10, "r": 10, "t": 40, "b": 10},
        title=f"{criterion}: {UNIT_LABELS[kind]} ({scale})",
        xaxis={"title": "unit" if kind != "layer" else ""},
        yaxis={"title": "layer", "autorange": "reversed"},
    )
    return fig


def agreement_figure(rows: list[dict], a: str, b: str, ratio: float) -> go.Figure:
    layers = [r["layer"] for r in rows]
    fig = go.Figure()
    fig.add_trace(go.Bar(x=layers, y=[r["overlap"] for r in rows], name="prune-set overlap"))
    fig.add_trace(
        go.Scatter(
            x=layers, y=[r["spearman"] for r in rows], mode="lines+markers", name="Spearman ρ"
        )
    )
    fig.update_layout(
        height=380,
        margin={"l": 10, "r": 10, "t": 40, "b": 10},
        title=f"{a} vs {b}, {ratio:.0%} pruned per layer",
        xaxis={"title": "layer"},
        yaxis={"range": [-1, 1.05]},
        legend={"orientation": "h", "y": -0.2},
    )
    return fig


# -- handlers ---------------------------------------------------------------------------------------
def show(panel: ImportancePanel, state: gr.State, values: dict, progress=TRACK) -> dict:
    """The heatmap of ``criterion`` and its agreement with ``criterion_b``."""
    session: SessionState = values[state]
    criterion, criterion_b = values[panel.criterion], values[panel.criterion_b]
    reduction, kind, ratio = values[panel.reduction], values[panel.kind], values[panel.ratio]
    loaded = SHARED.get(session.model_key)
    report = gradio_progress(progress)
    try:
        first = scores(loaded, criterion, reduction, report)[kind]
        second = scores(loaded, criterion_b, reduction, report)[kind]
    except ExplorerError as exc:
        raise user_error(exc) from exc
    except KeyError:
        raise gr.Error(
            f"{criterion} or {criterion_b} does not score {UNIT_LABELS[kind]}. Pick another unit."
        ) from None
    rows = agreement(first, second, ratio)
    table = [[r["layer"], round(r["overlap"], 3), round(r["spearman"], 3)] for r in rows]
    title = CRITERIA[criterion].title
    return {
        panel.heatmap: heatmap_figure(first, title, kind, values[panel.scale]),
        panel.agreement: agreement_figure(rows, criterion, criterion_b, ratio),
        panel.table: table,
    }


def _controls(panel: ImportancePanel) -> list:
    """Every control ``show`` reads, in the API's parameter order (their creation order)."""
    return [
        panel.criterion,
        panel.reduction,
        panel.kind,
        panel.scale,
        panel.criterion_b,
        panel.ratio,
    ]


def wire(panel: ImportancePanel, session: gr.State) -> None:
    inputs = {session, *_controls(panel)}
    outputs = [panel.heatmap, panel.agreement, panel.table]
    for control in _controls(panel):
        trigger = control.release if isinstance(control, gr.Slider) else control.input
        trigger(
            handler(show, panel, session),
            inputs,
            outputs,
            **api("importance" if control is panel.criterion else None),
            trigger_mode="always_last",
        )


def refresh_event(panel: ImportancePanel, session: gr.State, after, name: str | None = None):
    return after.then(
        handler(show, panel, session),
        {session, *_controls(panel)},
        [panel.heatmap, panel.agreement, panel.table],
        **api(name),
    )
