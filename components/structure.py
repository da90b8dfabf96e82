"""Structure panel: the coupled-structure dependency graph, laid out by layer.

Each decoder layer is a column. A collapsed layer is one node; an expanded one shows its modules
(norms on top, q/k/v feeding o, gate/up feeding down) with the edges that couple them: a query
head couples ``q_proj`` rows to ``o_proj`` columns, a kv group couples ``k_proj``/``v_proj`` rows to
the ``o_proj`` columns of its heads, an MLP channel couples ``gate``/``up`` rows to a ``down``
column. The residual stream is a bus along the bottom: every hidden channel is shared by everything
that reads or writes it. Clicking a node (or choosing it in the list) highlights every module its
groups span and lists the slices one unit owns with its parameter count; all of that is read from
``StructureMap.members``, so the picture cannot disagree with what pruning removes.

The current plan is drawn on it (``plan_marks``): a strip along the top with one cell per layer,
the share of the layer's parameters the plan keeps; under each expanded layer its query heads (in
order) and its MLP channels (sorted by importance rank, so the cut shows as one block), coloured
by their importance rank under the plan's criterion, the removed ones red (heads as crosses); a
removed layer's node is a red cross. It is redrawn on every plan change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import gradio as gr
import plotly.graph_objects as go

from explorer.model.structure import Group, Kind, StructureMap

from .plan_marks import KEPT_SCALE, REMOVED_COLOUR, PlanMarks, current_marks, shade_colour
from .state import SHARED, SessionState, api, handler, human

KIND_TITLES: dict[str, str] = {
    "head": "Query head",
    "kv": "Key-value group",
    "mlp": "MLP channel",
    "hidden": "Hidden (residual) channel",
    "layer": "Whole layer",
}
EDGE_COLOURS = {"head": "#4C78A8", "kv": "#B279A2", "mlp": "#54A24B", "hidden": "#BBBBBB"}
ROLE_COLOURS = {"attention": "#4C78A8", "mlp": "#54A24B", "norm": "#9D9D9D", "model": "#B279A2"}
LAYER_COLOUR = "#F58518"
# Where a module sits inside an expanded layer's column: (x offset, y).
LINEAR_POSITIONS = {
    "q": (0.8, 3.0),
    "k": (0.8, 2.0),
    "v": (0.8, 1.0),
    "o": (2.1, 2.0),
    "gate": (3.5, 2.6),
    "up": (3.5, 1.4),
    "down": (4.8, 2.0),
}
EXPANDED_WIDTH, COLLAPSED_WIDTH, BUS_Y, NORM_Y = 6.0, 1.0, 0.0, 4.0
STRIP_Y = NORM_Y + 1.6  # the per-layer strip of the share kept
UNITS_TOP, UNITS_DEPTH = BUS_Y - 0.45, 1.5  # where an expanded layer's units sit, below the bus
MLP_COLUMNS = 48


@dataclass
class StructurePanel:
    expanded: gr.Dropdown
    show_hidden: gr.Checkbox
    only_expanded: gr.Checkbox
    plot: gr.Plot
    node: gr.Dropdown
    click: gr.Textbox
    toggle: gr.Button
    details: gr.Markdown


def build() -> StructurePanel:
    gr.Markdown(
        "Modules of the chosen layers and the edges that couple their dimensions. Click a node "
        "(or pick it below) to highlight everything coupled to it and list the slices one unit "
        "owns. Collapsed layers are one orange node each."
    )
    # Created first, shown below: creation order is the order of /select_node's parameters.
    node = gr.Dropdown(
        [],
        label="Selected node",
        elem_id="structure-node",
        scale=3,
        allow_custom_value=True,
        render=False,
    )
    with gr.Row():
        expanded = gr.Dropdown(
            [],
            multiselect=True,
            label="Expanded layers",
            elem_id="structure-layers",
            scale=3,
        )
        show_hidden = gr.Checkbox(label="Show residual-stream edges", value=False, scale=1)
        only_expanded = gr.Checkbox(label="Hide collapsed layers", value=False, scale=1)
    plot = gr.Plot(label="Dependency graph", elem_id="structure-graph")
    with gr.Row():
        node.render()
        toggle = gr.Button("Expand / collapse its layer", scale=1, elem_id="structure-toggle")
    click = gr.Textbox(visible="hidden", elem_id="structure-click")
    details = gr.Markdown(elem_id="structure-details")
    return StructurePanel(expanded, show_hidden, only_expanded, plot, node, click, toggle, details)


# -- what a node is coupled to ----------------------------------------------------------------------
def node_module(structure: StructureMap, node: str) -> str | None:
    """Dotted module path of a graph node (``L3.q_proj`` -> ``model.layers.3.self_attn.q_proj``)."""
    attrs = structure.graph.nodes[node]
    f = structure.family
    if attrs["layer"] is None:
        return {"embed": f.embed, "final_norm": f.final_norm, "lm_head": f.lm_head}.get(node)
    names = {name.rpartition(".")[2]: name for name in (*f.linears, *f.hidden_norms)}
    return structure.path(attrs["layer"], names[attrs["role"]])


def node_kinds(structure: StructureMap, node: str) -> list[Kind]:
    """The group kinds whose units own slices of this node's weights."""
    if node.startswith("L") and node[1:].isdigit():
        return ["layer"]
    layer = structure.graph.nodes[node]["layer"]
    module = node_module(structure, node)
    kinds: list[Kind] = []
    if layer is not None:
        for kind in ("head", "kv", "mlp"):
            if module in {m.module for m in structure.members(kind, layer)}:
                kinds.append(kind)
    if (
        node == "residual"
        or module in {m.module for m in structure.members("hidden")}
        or (node == "lm_head" and structure.tied)
    ):
        kinds.append("hidden")
    return kinds


def highlighted_kinds(structure: StructureMap, node: str) -> list[Kind]:
    """The kinds a click highlights: a module's own layer's groups when it has any.

    Every linear module also reads or writes the residual stream, so highlighting hidden-channel
    coupling for them would light up the whole model; that coupling is listed, not drawn.
    """
    kinds = node_kinds(structure, node)
    local = [k for k in kinds if k not in ("hidden",)]
    return local or kinds


def coupled_nodes(structure: StructureMap, node: str) -> set[str]:
    """Every node whose weights share a highlighted group with ``node`` (itself included)."""
    kinds = highlighted_kinds(structure, node)
    if kinds == ["layer"]:
        return {node}
    layer = structure.graph.nodes[node]["layer"]
    modules: set[str] = set()
    for kind in kinds:
        modules |= {m.module for m in structure.members(kind, None if kind == "hidden" else layer)}
    out = {node}
    for other in structure.graph.nodes:
        if node_module(structure, other) in modules:
            out.add(other)
    if "hidden" in kinds:
        out |= {"residual", "lm_head"}
    return out


def node_details(structure: StructureMap, node: str) -> str:
    """Markdown: the node's shape and, per group kind, the slices one unit owns and its size."""
    if node.startswith("L") and node[1:].isdigit():
        layer = int(node[1:])
        lines = [f"### Layer {layer} (collapsed)", ""]
        lines.append(
            f"A whole decoder block: **{human(structure.group_params('layer'))}** parameters "
            f"({structure.group_params('layer'):,}); it holds {structure.heads} query heads in {structure.kv_heads} "
            f"key-value groups and {structure.intermediate} MLP channels. Expand it to see its modules."
        )
        return "\n".join(lines)
    attrs = structure.graph.nodes[node]
    shape = " × ".join(str(d) for d in attrs["shape"])
    lines = [f"### {node}", "", f"Role `{attrs['role']}`, shape {shape}."]
    module = node_module(structure, node)
    if module:
        lines.append(f"Module `{module}`.")
    kinds = node_kinds(structure, node)
    shown = highlighted_kinds(structure, node)
    for kind in shown:
        layer = None if kind == "hidden" else attrs["layer"]
        units = structure.units(kind)
        per_unit = structure.group_params(kind)
        where = "in the model" if kind == "hidden" else f"in layer {layer}"
        lines += [
            "",
            f"**{KIND_TITLES[kind]}** — {units} units {where}, **{per_unit:,} parameters each** "
            f"({human(per_unit * units)} in all). Unit *u* owns block *u* of every member; "
            "unit 0:",
            "",
            "| module | parameter | axis | slice |",
            "|---|---|---|---|",
        ]
        slices = structure.slices(Group(kind, layer, 0))
        for sl in slices[:12]:
            axis = "rows" if sl.dim == 0 else "columns"
            lines.append(f"| `{sl.module}` | {sl.param} | {axis} | {sl.start}:{sl.stop} |")
        if len(slices) > 12:
            lines.append(f"| … {len(slices) - 12} more slices | | | |")
    if "hidden" in kinds and "hidden" not in shown:
        per = structure.group_params("hidden")
        lines += [
            "",
            f"It also reads or writes the residual stream: each of its {structure.hidden} hidden channels "
            f"is one **{KIND_TITLES['hidden']}** group of {per:,} parameters spanning every "
            "layer (select `residual` to see its slices).",
        ]
    return "\n".join(lines)


# -- the figure -------------------------------------------------------------------------------------
def _norm_offsets(count: int) -> list[float]:
    """x offsets of a layer's hidden-size norms: before attention, between, after the MLP."""
    return {1: [0.2], 2: [0.2, 2.8], 4: [0.2, 2.4, 3.0, 5.2]}.get(
        count, [0.2 + 5.0 * i / max(count - 1, 1) for i in range(count)]
    )


def layout(
    structure: StructureMap, expanded: set[int], only_expanded: bool
) -> dict[str, tuple[float, float]]:
    """Positions of the visible nodes; collapsed layers are keyed ``L<i>``."""
    f = structure.family
    pos: dict[str, tuple[float, float]] = {"embed": (-1.2, 2.0)}
    short = {name.rpartition(".")[2]: key for key, name in zip("qkvo", f.linears[:4], strict=True)}
    short |= {f.gate.rpartition(".")[2]: "gate", f.up.rpartition(".")[2]: "up"}
    short |= {f.down.rpartition(".")[2]: "down"}
    norm_x = dict(
        zip(
            (n.rpartition(".")[2] for n in f.hidden_norms),
            _norm_offsets(len(f.hidden_norms)),
            strict=True,
        )
    )
    x = 0.0
    for layer in range(structure.num_layers):
        if layer in expanded:
            for node, attrs in structure.graph.nodes(data=True):
                if attrs["layer"] != layer:
                    continue
                role = attrs["role"]
                if role in short:
                    dx, y = LINEAR_POSITIONS[short[role]]
                else:
                    dx, y = norm_x[role], NORM_Y
                pos[node] = (x + dx, y)
            x += EXPANDED_WIDTH
        elif not only_expanded:
            pos[f"L{layer}"] = (x + 0.3, 2.0)
            x += COLLAPSED_WIDTH
    pos["final_norm"] = (x + 0.3, 2.0)
    pos["lm_head"] = (x + 1.3, 2.0)
    pos["residual"] = ((x - 1.2) / 2, BUS_Y)
    return pos


def dependency_figure(
    structure: StructureMap,
    expanded: set[int],
    *,
    selected: str | None = None,
    show_hidden: bool = False,
    only_expanded: bool = False,
    marks: PlanMarks | None = None,
) -> go.Figure:
    """The graph; with ``marks`` the plan on it (strip of shares kept, units, removed ones)."""
    pos = layout(structure, expanded, only_expanded)
    spans = layer_spans(structure, pos)
    lit = coupled_nodes(structure, selected) if selected in pos else set()
    fig = go.Figure()
    left, right = min(x for x, _ in pos.values()), max(x for x, _ in pos.values())
    fig.add_trace(
        go.Scatter(
            x=[left, right],
            y=[BUS_Y, BUS_Y],
            mode="lines",
            line={"color": EDGE_COLOURS["hidden"], "width": 6},
            hoverinfo="skip",
            showlegend=False,
        )
    )
    for kind in ("hidden", "head", "kv", "mlp"):
        if kind == "hidden" and not show_hidden:
            continue
        xs, ys = [], []
        for a, b, attrs in structure.graph.edges(data=True):
            if attrs["kind"] != kind:
                continue
            # Hidden edges run to the bus right below the module, not to the residual node.
            a_pos = (pos[b][0], BUS_Y) if a == "residual" and b in pos else pos.get(a)
            b_pos = (pos[a][0], BUS_Y) if b == "residual" and a in pos else pos.get(b)
            if a_pos is None or b_pos is None:
                continue
            xs += [a_pos[0], b_pos[0], None]
            ys += [a_pos[1], b_pos[1], None]
        fig.add_trace(
            go.Scatter(
                x=xs,
                y=ys,
                mode="lines",
                name=f"{kind} coupling",
                line={"color": EDGE_COLOURS[kind], "width": 1 if kind == "hidden" else 2},
                hoverinfo="skip",
            )
        )
    if marks is not None:
        for trace in plan_traces(structure, spans, marks):
            fig.add_trace(trace)
    gone = set(marks_removed_layers(structure, marks)) if marks is not None else set()
    nodes = list(pos)
    colours, sizes, texts, hovers, lines, symbols = [], [], [], [], [], []
    for node in nodes:
        colour, size, label, hover = _node_look(structure, node)
        removed = structure_layer(structure, node) in gone
        colours.append(REMOVED_COLOUR if removed else colour)
        sizes.append(size)
        texts.append(label)
        hovers.append(f"{hover}<br>removed by the plan" if removed else hover)
        lines.append(3 if node in lit else 0.5)
        symbols.append("x" if removed else "circle")
    fig.add_trace(
        go.Scatter(
            x=[pos[n][0] for n in nodes],
            y=[pos[n][1] for n in nodes],
            mode="markers+text",
            text=texts,
            textposition="top center",
            textfont={"size": 9},
            customdata=nodes,
            hovertext=hovers,
            hoverinfo="text",
            marker={
                "color": colours,
                "size": sizes,
                "symbol": symbols,
                "opacity": [1.0 if not lit or n in lit else 0.25 for n in nodes],
                "line": {
                    "color": ["#D62728" if n in lit else "#333" for n in nodes],
                    "width": lines,
                },
            },
            showlegend=False,
        )
    )
    for layer in sorted(expanded):
        if layer in spans and not _collapsed(spans[layer]):
            low, high = spans[layer]
            fig.add_shape(
                type="rect",
                x0=low - 0.5,
                x1=high + 0.5,
                y0=0.5,
                y1=NORM_Y + 0.7,
                fillcolor="#F6F8FA",
                line={"color": "#D0D7DE"},
                layer="below",
            )
            fig.add_annotation(
                x=(low + high) / 2, y=NORM_Y + 0.9, text=f"layer {layer}", showarrow=False
            )
    units_shown = marks is not None and any(not _collapsed(span) for span in spans.values())
    bottom = UNITS_TOP - UNITS_DEPTH - 0.3 if units_shown else BUS_Y - 0.5
    top = STRIP_Y + 0.5 if marks is not None else NORM_Y + 1.2
    fig.update_layout(
        height=520 + (160 if units_shown else 0) + (50 if marks is not None else 0),
        margin={"l": 10, "r": 10, "t": 40, "b": 10},
        xaxis={"visible": False},
        yaxis={"visible": False, "range": [bottom, top]},
        plot_bgcolor="white",
        legend={
            "orientation": "h",
            "y": -0.02,
            "x": 0.5,
            "xanchor": "center",
            "itemsizing": "constant",
        },
        clickmode="event",
        hovermode="closest",
        dragmode="pan",
    )
    return fig


def layer_spans(structure: StructureMap, pos: dict) -> dict[int, tuple[float, float]]:
    """Per visible layer, the x extent of its nodes (one point for a collapsed layer)."""
    spans: dict[int, tuple[float, float]] = {}
    for node, (x, _) in pos.items():
        layer = structure_layer(structure, node)
        if layer is not None:
            low, high = spans.get(layer, (x, x))
            spans[layer] = (min(low, x), max(high, x))
    return spans


def _collapsed(span: tuple[float, float]) -> bool:
    return span[0] == span[1]


def structure_layer(structure: StructureMap, node: str) -> int | None:
    """The layer a node belongs to (``L3`` or a module of layer 3), None for model-wide nodes."""
    if node.startswith("L") and node[1:].isdigit():
        return int(node[1:])
    return structure.graph.nodes[node]["layer"] if node in structure.graph.nodes else None


def marks_removed_layers(structure: StructureMap, marks: PlanMarks) -> list[int]:
    """The layers the plan removes whole (every parameter gone)."""
    return [i for i, kept in enumerate(marks.kept) if kept == 0]


def unit_positions(span: tuple[float, float], kind: str, count: int) -> list[tuple[float, float]]:
    """The slots of an expanded layer's units below the bus, across the layer's width: its query
    heads in one row, then its MLP channels in a grid of ``MLP_COLUMNS`` per row."""
    left, right = span[0] - 0.3, span[1] + 0.3
    columns = count if kind == "head" else min(count, MLP_COLUMNS)
    top = UNITS_TOP if kind == "head" else UNITS_TOP - 0.3
    rows = math.ceil(count / columns)
    dx = (right - left) / max(columns - 1, 1)
    dy = min(0.2, (UNITS_DEPTH - 0.3) / max(rows - 1, 1))
    return [(left + (k % columns) * dx, top - (k // columns) * dy) for k in range(count)]


def display_order(marks: PlanMarks, kind: str, layer: int, count: int) -> list[int]:
    """Units in the order they are drawn: heads by index (their kv groups stay together), MLP
    channels by importance rank, lowest first, so the plan's cut shows as one block."""
    if kind == "head" or kind not in marks.shades:
        return list(range(count))
    return marks.shades[kind][layer].argsort(stable=True).tolist()


def plan_traces(
    structure: StructureMap, spans: dict[int, tuple[float, float]], marks: PlanMarks
) -> list[go.Scatter]:
    """The plan's traces: the strip of shares kept, then the kept and the removed units.

    Each unit point's ``ids`` entry is ``kind:layer:unit`` (points carry no ``customdata``, so a
    click on them selects no node).
    """
    layers = sorted(spans)
    strip = go.Scatter(
        x=[(spans[i][0] + spans[i][1]) / 2 for i in layers],
        y=[STRIP_Y] * len(layers),
        ids=[f"kept:{i}" for i in layers],
        mode="markers+text",
        name="share of the layer kept",
        text=[f"{marks.kept[i]:.0%}" for i in layers],
        textposition="top center",
        textfont={"size": 8},
        hovertext=[
            f"layer {i}: {marks.kept[i]:.1%} of its parameters kept<br>query heads "
            f"{marks.heads_kept[i]:.0%}, MLP channels {marks.mlp_kept[i]:.0%}"
            for i in layers
        ],
        hoverinfo="text",
        marker={
            "symbol": "square",
            "size": 16,
            "color": [marks.kept[i] for i in layers],
            "colorscale": KEPT_SCALE,
            "cmin": 0.0,
            "cmax": 1.0,
            "line": {"color": "#555", "width": 0.5},
            "colorbar": {"title": {"text": "share kept"}, "len": 0.5, "y": 0.8, "thickness": 12},
        },
        showlegend=False,
    )
    kept_name, removed_name = (
        "kept unit (colour: importance rank, dark = low)",
        "removed by the plan",
    )
    groups: dict[str, dict[str, list]] = {
        name: {key: [] for key in ("x", "y", "ids", "hover", "color", "size", "symbol")}
        for name in (kept_name, removed_name)
    }
    titles = {"head": "query head", "mlp": "MLP channel"}
    for layer in layers:
        if _collapsed(spans[layer]):
            continue
        for kind in ("head", "mlp"):
            gone = set(marks.removed[kind].get(layer, ()))
            count = structure.heads if kind == "head" else structure.intermediate
            size = 9 if kind == "head" else (3 if count > 200 else 7)
            slots = unit_positions(spans[layer], kind, count)
            for unit, (x, y) in zip(display_order(marks, kind, layer, count), slots, strict=True):
                about = f"layer {layer}, {titles[kind]} {unit}"
                shade = float(marks.shades[kind][layer, unit]) if kind in marks.shades else 0.5
                if kind in marks.scores:
                    score = float(marks.scores[kind][layer, unit])
                    about += f"<br>{marks.criterion} {score:.3g} (rank {shade:.0%} of the model's)"
                removed = unit in gone
                group = groups[removed_name if removed else kept_name]
                group["x"].append(x)
                group["y"].append(y)
                group["ids"].append(f"{kind}:{layer}:{unit}")
                group["hover"].append(f"{about}<br>removed by the plan" if removed else about)
                group["color"].append(REMOVED_COLOUR if removed else shade_colour(shade))
                group["size"].append(size + 2 if removed and kind == "head" else size)
                group["symbol"].append("x" if removed and kind == "head" else "square")
    traces = [strip]
    for name, group in groups.items():
        if group["x"]:
            traces.append(
                go.Scatter(
                    x=group["x"],
                    y=group["y"],
                    ids=group["ids"],
                    mode="markers",
                    name=name,
                    hovertext=group["hover"],
                    hoverinfo="text",
                    marker={k: group[k] for k in ("color", "size", "symbol")},
                )
            )
    return traces


def _node_look(s: StructureMap, node: str) -> tuple[str, float, str, str]:
    """Colour, marker size, label and hover text of a node."""
    if node.startswith("L") and node[1:].isdigit():
        p = s.group_params("layer")
        return LAYER_COLOUR, 16, node, f"layer {node[1:]} (collapsed): {human(p)} parameters"
    attrs = s.graph.nodes[node]
    role, layer = attrs["role"], attrs["layer"]
    numel = 1
    for d in attrs["shape"]:
        numel *= d
    if layer is None:
        colour = ROLE_COLOURS["model"]
    elif "norm" in role:
        colour = ROLE_COLOURS["norm"]
    elif role in {n.rpartition(".")[2] for n in s.family.linears[:4]}:
        colour = ROLE_COLOURS["attention"]
    else:
        colour = ROLE_COLOURS["mlp"]
    size = 8 + 3 * max(0.0, (len(str(numel)) - 3))
    shape = "×".join(str(d) for d in attrs["shape"])
    label = role.replace("_proj", "").replace("_layernorm", " norm") if layer is not None else node
    if node == "residual":
        return colour, 18, "residual stream", f"residual stream ({s.hidden} channels)"
    return colour, size, label, f"{node}<br>{shape} ({human(numel)} weights)"


# -- handlers ---------------------------------------------------------------------------------------
def parse_layers(values: list | None) -> set[int]:
    return {int(v) for v in values or []}


def planned_figure(
    session: SessionState, expanded: set[int], selected, show_hidden, only_expanded, wait: bool
) -> go.Figure:
    """The graph with the session's plan on it, titled with the plan (or why it is not drawn)."""
    loaded = SHARED.get(session.model_key)
    marks = current_marks(loaded, session.plan, wait=wait)
    drawn = marks if isinstance(marks, PlanMarks) else None
    fig = dependency_figure(
        loaded.structure,
        expanded,
        selected=selected,
        show_hidden=show_hidden,
        only_expanded=only_expanded,
        marks=drawn,
    )
    title = (
        f"The plan ({drawn.criterion}): top row, the share of each layer kept. Below each "
        "expanded layer its heads, then its MLP channels by importance rank (dark = low); "
        "red: removed"
        if drawn is not None
        else marks
    )
    fig.update_layout(title={"text": title, "font": {"size": 13}})
    return fig


def refresh(panel: StructurePanel, state: gr.State, values: dict) -> dict:
    """Redraw for the session's model; on a new model, offer its layers and nodes."""
    return _redraw(panel, state, values, wait=False)


def follow_plan(panel: StructurePanel, state: gr.State, values: dict) -> dict:
    """A plan change: redraw with the new plan's marks (its selection was just computed)."""
    return _redraw(panel, state, values, wait=True)


def _redraw(panel: StructurePanel, state: gr.State, values: dict, wait: bool) -> dict:
    session: SessionState = values[state]
    expanded = values[panel.expanded]
    show_hidden, only_expanded = values[panel.show_hidden], values[panel.only_expanded]
    s = SHARED.get(session.model_key).structure
    layers = [str(i) for i in range(s.num_layers)]
    chosen = [v for v in (expanded or []) if v in layers] or ["0", layers[-1]]
    nodes = [f"L{i}" for i in range(s.num_layers)] + list(s.graph.nodes)
    selected = session.node if session.node in nodes else None
    fig = planned_figure(session, parse_layers(chosen), selected, show_hidden, only_expanded, wait)
    return {
        panel.expanded: gr.Dropdown(choices=layers, value=chosen),
        panel.plot: fig,
        panel.node: gr.Dropdown(choices=nodes, value=selected),
        panel.details: node_details(s, selected)
        if selected
        else "Click a node to see what it is coupled to.",
    }


def select_node(panel: StructurePanel, state: gr.State, values: dict) -> dict:
    """A node chosen by click (``node|nonce`` from the JS bridge) or from the list."""
    session: SessionState = values[state]
    expanded = values[panel.expanded]
    show_hidden, only_expanded = values[panel.show_hidden], values[panel.only_expanded]
    s = SHARED.get(session.model_key).structure
    node = (values.get(panel.click) or values.get(panel.node) or "").split("|")[0]
    known = node in s.graph.nodes or (node.startswith("L") and node[1:].isdigit())
    if not known:
        raise gr.Error(f"There is no node '{node}' in this model. Pick one from the list.")
    session.node = node
    fig = planned_figure(session, parse_layers(expanded), node, show_hidden, only_expanded, False)
    return {
        state: session,
        panel.plot: fig,
        panel.node: gr.Dropdown(value=node),
        panel.details: node_details(s, node),
    }


def toggle_layer(panel: StructurePanel, state: gr.State, values: dict) -> dict:
    """Expand the selected node's layer, or collapse it when it is already expanded."""
    session: SessionState = values[state]
    expanded = values[panel.expanded]
    s = SHARED.get(session.model_key).structure
    node = session.node
    if node is None:
        raise gr.Error("Select a node first: click one in the graph or pick it in the list.")
    if node.startswith("L") and node[1:].isdigit():
        layer = int(node[1:])
    else:
        layer = s.graph.nodes[node]["layer"]
    if layer is None:
        raise gr.Error(f"'{node}' belongs to the whole model, not to one layer.")
    chosen = parse_layers(expanded) ^ {layer}
    if layer in chosen:
        session.node = None
    else:
        session.node = f"L{layer}"
    return {state: session, panel.expanded: sorted((str(i) for i in chosen), key=int)}


def wire(panel: StructurePanel, session: gr.State) -> None:
    view = {session, panel.expanded, panel.show_hidden, panel.only_expanded}
    redraw = [panel.expanded, panel.plot, panel.node, panel.details]
    draw, pick = handler(refresh, panel, session), handler(select_node, panel, session)
    for control in (panel.expanded, panel.show_hidden, panel.only_expanded):
        control.input(draw, view, redraw, **api(None))
    selected = [session, panel.plot, panel.node, panel.details]
    shown = {"show_progress_on": [panel.details]}
    panel.node.input(pick, {*view, panel.node}, selected, **shown, **api("select_node"))
    panel.click.change(pick, {*view, panel.click}, selected, **shown, **api(None))
    panel.toggle.click(
        handler(toggle_layer, panel, session),
        {session, panel.expanded},
        [session, panel.expanded],
        **api(None),
    ).then(draw, view, redraw, **api(None))


def follow(panel: StructurePanel, session: gr.State, events: list) -> None:
    """Redraw after each of ``events`` (the Plan tab's plan changes, or its first showing)."""
    for event in events:
        event.success(
            handler(follow_plan, panel, session),
            {session, panel.expanded, panel.show_hidden, panel.only_expanded},
            [panel.expanded, panel.plot, panel.node, panel.details],
            show_progress="hidden",
            **api(None),
        )


def refresh_event(panel: StructurePanel, session: gr.State, after, name: str | None = None) -> None:
    """Redraw once a model is (re)loaded."""
    after.success(
        handler(refresh, panel, session),
        {session, panel.expanded, panel.show_hidden, panel.only_expanded},
        [panel.expanded, panel.plot, panel.node, panel.details],
        **api(name),
    )
