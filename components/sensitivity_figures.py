"""Figures of a sensitivity sweep: a layer × ratio heatmap and per-layer curves, with the plan drawn.

Pure functions of a ``Sensitivity`` and the current plan's shares per layer, so the Plan tab can
redraw them on every plan change without measuring anything.
"""

from __future__ import annotations

import math

import numpy as np
import plotly.graph_objects as go

from explorer.apply.sensitivity import Point, Sensitivity

METRICS = {"kl": "KL from dense (nats/token)", "perplexity": "perplexity"}


def _value(p: Point, metric: str) -> float:
    return p.kl if metric == "kl" else p.perplexity


def heatmap(
    sens: Sensitivity, kind: str, shares: list[float] | None, metric: str = "kl"
) -> go.Figure:
    """Damage of cutting ``kind`` in one layer alone (colour, log scale), the plan's shares on top."""
    layers = sorted({p.layer for p in sens.points if p.kind == kind})
    ratios = sorted({p.ratio for p in sens.points if p.kind == kind})
    grid = np.full((len(layers), len(ratios)), np.nan)
    text = [["" for _ in ratios] for _ in layers]
    for p in sens.points:
        if p.kind == kind:
            i, j = layers.index(p.layer), ratios.index(p.ratio)
            value = _value(p, metric)
            grid[i, j] = math.log10(max(value, 1e-6))
            text[i][j] = f"layer {p.layer}, {p.share:.0%} cut: {METRICS[metric]} {value:.4g}"
    fig = go.Figure(
        go.Heatmap(
            z=grid,
            x=ratios,
            y=layers,
            text=text,
            hoverinfo="text",
            colorscale="Viridis",
            colorbar={"title": f"log10 {metric}"},
        )
    )
    if shares is not None:
        fig.add_trace(
            go.Scatter(
                x=[shares[layer] for layer in layers],
                y=layers,
                mode="markers+lines",
                name="current plan",
                marker={"color": "#E45756", "size": 8, "symbol": "diamond"},
                line={"color": "#E45756", "width": 1},
                hovertemplate="layer %{y}: plan cuts %{x:.0%}<extra></extra>",
            )
        )
    fig.update_layout(
        height=420,
        margin={"l": 10, "r": 10, "t": 30, "b": 10},
        xaxis={"title": f"share of the layer's {kind} units cut", "tickformat": ".0%"},
        yaxis={"title": "layer", "autorange": "reversed"},
        title={"text": f"Sensitivity: {kind}", "x": 0.01},
        legend={"orientation": "h", "y": 1.08, "x": 1, "xanchor": "right"},
    )
    return fig


def curves(
    sens: Sensitivity, kind: str, shares: list[float] | None, metric: str = "kl"
) -> go.Figure:
    """One line per layer (damage against share cut); a marker where the plan cuts each layer."""
    fig = go.Figure()
    layers = sorted({p.layer for p in sens.points if p.kind == kind})
    for layer in layers:
        curve = sens.curve(layer, kind)
        xs = [0.0] + [p.share for p in curve]
        ys = [0.0 if metric == "kl" else sens.dense_perplexity] + [_value(p, metric) for p in curve]
        colour = f"hsl({int(260 * layer / max(len(layers) - 1, 1))}, 70%, 45%)"
        fig.add_trace(
            go.Scatter(
                x=xs,
                y=ys,
                mode="lines+markers",
                name=f"layer {layer}",
                line={"color": colour, "width": 1},
                marker={"size": 4},
                legendgroup=str(layer),
            )
        )
        if shares is not None and shares[layer] > 0:
            fig.add_trace(
                go.Scatter(
                    x=[shares[layer]],
                    y=[float(np.interp(shares[layer], xs, ys))],
                    mode="markers",
                    marker={"color": colour, "size": 11, "symbol": "diamond-open"},
                    showlegend=False,
                    legendgroup=str(layer),
                    hovertemplate=f"layer {layer}: plan cuts %{{x:.0%}}<extra></extra>",
                )
            )
    fig.update_layout(
        height=420,
        margin={"l": 10, "r": 10, "t": 30, "b": 10},
        xaxis={"title": f"share of the layer's {kind} units cut", "tickformat": ".0%"},
        yaxis={"title": METRICS[metric], "type": "log" if metric == "kl" else "linear"},
        title={"text": "Per-layer curves (◇ = the current plan)", "x": 0.01},
    )
    return fig
