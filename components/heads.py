"""Heads panel: which attention heads of a layer behave alike, and how important each head is.

The similarity graph links heads whose attention distributions are close: an edge where the mean
Jensen–Shannon divergence between two heads' attention rows is below the threshold (0.20 nats in
the distribution-aware pruning paper). Node size is the head's importance under the plan's
criterion, its fill that importance's rank in the model, its outline its key-value group; heads
the current plan removes are red crosses. The heatmap beside it marks the removed heads of every
layer and ends in a strip: the share of each layer's query heads and MLP channels the plan keeps.
Both follow every plan change. The divergences come from the calibration pass, so moving the
threshold or the layer only redraws.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import gradio as gr
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from explorer.errors import ExplorerError
from explorer.scoring.distribution_aware import (
    DEFAULT_TAU,
    greedy_redundant_heads,
    head_similarity_graph,
)

from .plan_marks import KEPT_SCALE, REMOVED_COLOUR, PlanMarks, current_marks, shade_colour
from .state import (
    ATTENTION,
    SHARED,
    TRACK,
    SessionState,
    api,
    gradio_progress,
    handler,
    scores,
    user_error,
)

GROUP_COLOURS = [
    "#4C78A8",
    "#F58518",
    "#54A24B",
    "#E45756",
    "#72B7B2",
    "#B279A2",
    "#FF9DA6",
    "#9D755D",
]


@dataclass
class HeadsPanel:
    layer: gr.Slider
    threshold: gr.Slider
    graph: gr.Plot
    summary: gr.Markdown
    heatmap: gr.Plot


def build() -> HeadsPanel:
    gr.Markdown(
        "Heads linked by an edge attend alike (mean Jensen–Shannon divergence below the "
        "threshold); one of a linked pair can stand in for the other. Node size is importance "
        "under the plan's criterion; red crosses are the heads the current plan removes, and "
        "the strip beside the heatmap is the share of each layer the plan keeps."
    )
    with gr.Row():
        layer = gr.Slider(0, 1, value=0, step=1, label="Layer", elem_id="heads-layer")
        threshold = gr.Slider(
            0.0,
            round(math.log(2), 2),
            value=DEFAULT_TAU,
            step=0.01,
            label="Similarity threshold τ (JSD, nats): link heads closer than this",
            elem_id="heads-threshold",
        )
    with gr.Row():
        graph = gr.Plot(label="Head similarity graph", elem_id="head-graph", scale=1)
        heatmap = gr.Plot(label="Head importance (layer × head)", elem_id="head-heatmap", scale=1)
    summary = gr.Markdown(elem_id="heads-summary")
    return HeadsPanel(layer, threshold, graph, summary, heatmap)


def similarity_figure(
    jsd: torch.Tensor,
    importance: torch.Tensor,
    group_size: int,
    tau: float,
    layer: int,
    marks: PlanMarks | None = None,
) -> go.Figure:
    """Heads on a circle, kv groups together; edges where JSD < ``tau``, thicker when closer.

    With ``marks`` a head's fill is its importance rank in the model and the plan's removed heads
    are red crosses; without, the fill is its kv group.
    """
    graph = head_similarity_graph(jsd, tau)
    n = jsd.shape[0]
    angle = [2 * math.pi * h / n for h in range(n)]
    x = [math.cos(a) for a in angle]
    y = [math.sin(a) for a in angle]
    fig = go.Figure()
    for a, b, attrs in graph.edges(data=True):
        closeness = 1 - attrs["weight"] / tau if tau > 0 else 1.0
        fig.add_trace(
            go.Scatter(
                x=[x[a], x[b]],
                y=[y[a], y[b]],
                mode="lines",
                line={"color": "#888", "width": 1 + 5 * closeness},
                hoverinfo="skip",
                showlegend=False,
            )
        )
    imp = importance.float().cpu()
    top = float(imp.max()) if float(imp.max()) > 0 else 1.0
    sizes = [18 + 30 * max(float(v), 0.0) / top for v in imp]
    groups = [GROUP_COLOURS[(h // group_size) % len(GROUP_COLOURS)] for h in range(n)]
    gone = set(marks.removed["head"].get(layer, ())) if marks is not None else set()
    if marks is None or "head" not in marks.shades:
        fills = list(groups)
    else:
        fills = [shade_colour(float(marks.shades["head"][layer, h])) for h in range(n)]
    fills = [REMOVED_COLOUR if h in gone else fills[h] for h in range(n)]
    fig.add_trace(
        go.Scatter(
            x=x,
            y=y,
            mode="markers+text",
            text=[str(h) for h in range(n)],
            textposition="middle center",
            textfont={"color": "white"},
            customdata=list(range(n)),
            hovertext=[
                f"head {h} (kv group {h // group_size})<br>importance {float(imp[h]):.3g}<br>"
                f"{graph.degree[h]} similar heads"
                + ("<br>removed by the plan" if h in gone else "")
                for h in range(n)
            ],
            hoverinfo="text",
            marker={
                "size": sizes,
                "color": fills,
                "symbol": ["x" if h in gone else "circle" for h in range(n)],
                "line": {"color": groups if marks is not None else "#333", "width": 3},
            },
            showlegend=False,
        )
    )
    if marks is not None:
        fig.add_annotation(
            x=0.5,
            y=-0.02,
            xref="paper",
            yref="paper",
            showarrow=False,
            font={"size": 11},
            text=(
                f"fill: importance rank under {marks.criterion} (dark = low), outline: kv group; "
                f"red ✕: removed by the plan ({len(gone)} of {n} heads)"
            ),
        )
    fig.update_layout(
        title=f"Layer {layer}: {graph.number_of_edges()} linked pairs at τ = {tau:.2f}",
        height=430,
        margin={"l": 10, "r": 10, "t": 40, "b": 10},
        xaxis={"visible": False, "range": [-1.4, 1.4]},
        yaxis={"visible": False, "range": [-1.4, 1.4], "scaleanchor": "x"},
        plot_bgcolor="white",
    )
    return fig


def importance_heatmap(
    scores: torch.Tensor, criterion: str, layer: int, marks: PlanMarks | None = None
) -> go.Figure:
    """Layer × head scores; the chosen layer is outlined. With ``marks``, the plan's removed heads
    are crossed and a strip on the right gives each layer's share of heads and MLP channels kept."""
    z = scores.float().cpu()
    fig = make_subplots(
        rows=1,
        cols=2 if marks is not None else 1,
        shared_yaxes=True,
        column_widths=[0.8, 0.2] if marks is not None else None,
        horizontal_spacing=0.03,
    )
    fig.add_trace(
        go.Heatmap(
            z=z.tolist(),
            colorscale="Viridis",
            colorbar={"title": criterion, "x": 1.02},
            hovertemplate="layer %{y}, head %{x}: %{z:.3g}<extra></extra>",
        ),
        row=1,
        col=1,
    )
    fig.add_shape(
        type="rect",
        x0=-0.5,
        x1=z.shape[1] - 0.5,
        y0=layer - 0.5,
        y1=layer + 0.5,
        line={"color": "red", "width": 2},
        row=1,
        col=1,
    )
    if marks is not None:
        gone = [(h, i) for i, heads in marks.removed["head"].items() for h in heads]
        fig.add_trace(
            go.Scatter(
                x=[h for h, _ in gone],
                y=[i for _, i in gone],
                ids=[f"head:{i}:{h}" for h, i in gone],
                mode="markers",
                name="removed by the plan",
                marker={"symbol": "x", "color": REMOVED_COLOUR, "size": 7},
                hovertemplate="layer %{y}, head %{x}: removed by the plan<extra></extra>",
                showlegend=bool(gone),
            ),
            row=1,
            col=1,
        )
        fig.add_trace(kept_strip(marks), row=1, col=2)
    fig.update_layout(
        height=430,
        margin={"l": 10, "r": 10, "t": 40, "b": 10},
        title=f"Head importance: {criterion}",
        xaxis={"title": "head", "dtick": 1},
        yaxis={"title": "layer", "autorange": "reversed"},
        legend={"orientation": "h", "y": -0.12, "x": 0},
    )
    if marks is not None:
        fig.update_xaxes(title="share kept", row=1, col=2)
    return fig


def kept_strip(marks: PlanMarks) -> go.Heatmap:
    """One row per layer: the share of its query heads and of its MLP channels the plan keeps."""
    layers = range(len(marks.heads_kept))
    z = [[marks.heads_kept[i], marks.mlp_kept[i]] for i in layers]
    return go.Heatmap(
        z=z,
        x=["heads", "MLP"],
        y=list(layers),
        zmin=0.0,
        zmax=1.0,
        colorscale=KEPT_SCALE,
        showscale=False,
        text=[[f"{a:.0%}", f"{b:.0%}"] for a, b in z],
        texttemplate="%{text}",
        textfont={"size": 8},
        name="share kept",
        hovertemplate="layer %{y}: %{text} of its %{x} kept<extra></extra>",
    )


def show(panel: HeadsPanel, state: gr.State, values: dict, progress=TRACK) -> dict:
    """Both figures for ``layer``; the first call collects the statistics (once per model)."""
    session: SessionState = values[state]
    layer, threshold = values[panel.layer], values[panel.threshold]
    loaded = SHARED.get(session.model_key)
    s = loaded.structure
    layer = min(int(layer), s.num_layers - 1)
    plan = session.plan
    try:
        heads = scores(loaded, plan.criterion, plan.reduction, gradio_progress(progress))["head"]
        with SHARED.lock:
            jsd = loaded.explorer.statistics(ATTENTION).jsd(layer)
    except ExplorerError as exc:
        raise user_error(exc) from exc
    except KeyError:  # a criterion of whole layers (Block Influence) scores no heads
        raise gr.Error(
            f"{plan.criterion} does not score attention heads. Pick another criterion."
        ) from None
    marks = current_marks(loaded, plan, wait=True)
    drawn = marks if isinstance(marks, PlanMarks) else None
    redundant = greedy_redundant_heads(jsd, threshold, heads[layer])
    pairs = head_similarity_graph(jsd, threshold).number_of_edges()
    summary = (
        f"Layer {layer}: {pairs} pairs of heads closer than τ = {threshold:.2f}. The greedy rule "
        f"(keep the more important head of each linked pair) marks heads "
        f"{redundant or 'none'} as redundant. Mean JSD between heads: "
        f"{float(jsd.sum() / max(jsd.numel() - jsd.shape[0], 1)):.3f} nats. "
        + (plan_summary(drawn, layer, s.heads) if drawn is not None else marks)
    )
    return {
        panel.layer: gr.Slider(maximum=s.num_layers - 1, value=layer),
        panel.graph: similarity_figure(jsd, heads[layer], s.group_size, threshold, layer, drawn),
        panel.summary: summary,
        panel.heatmap: importance_heatmap(heads, plan.criterion, layer, drawn),
    }


def plan_summary(marks: PlanMarks, layer: int, heads: int) -> str:
    """One sentence: what the plan removes from this layer's heads and from all of them."""
    gone = marks.removed["head"].get(layer, ())
    kept = sum(marks.heads_kept) * heads
    total = heads * len(marks.heads_kept)
    return (
        f"The plan removes {len(gone)} of this layer's {heads} heads ({list(gone) or 'none'}) "
        f"and keeps {kept:.0f} of the model's {total} heads."
    )


def wire(panel: HeadsPanel, session: gr.State) -> None:
    outputs = [panel.layer, panel.graph, panel.summary, panel.heatmap]
    inputs = {session, panel.layer, panel.threshold}
    shown = handler(show, panel, session)
    panel.layer.release(shown, inputs, outputs, **api("head_graph"), trigger_mode="always_last")
    panel.threshold.release(shown, inputs, outputs, **api(None), trigger_mode="always_last")


def follow(panel: HeadsPanel, session: gr.State, events: list) -> None:
    """Redraw after each of ``events`` (the Plan tab's plan changes)."""
    for event in events:
        event.success(
            handler(show, panel, session),
            {session, panel.layer, panel.threshold},
            [panel.layer, panel.graph, panel.summary, panel.heatmap],
            show_progress="hidden",
            **api(None),
        )


def refresh_event(panel: HeadsPanel, session: gr.State, after, name: str | None = None):
    return after.then(
        handler(show, panel, session),
        {session, panel.layer, panel.threshold},
        [panel.layer, panel.graph, panel.summary, panel.heatmap],
        **api(name),
    )
