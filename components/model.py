"""Model panel: choose the model and the calibration/evaluation text, load it, see its summary."""

from __future__ import annotations

from dataclasses import dataclass, replace

import gradio as gr

from explorer.data import text_source
from explorer.errors import DataError, ExplorerError
from explorer.model.loading import EMBEDDED

from .state import (
    SHARED,
    TRACK,
    Loaded,
    SessionState,
    Settings,
    gradio_progress,
    human,
    scores,
    status,
    user_error,
)

CALIBRATION_KINDS = ["builtin", "file", "dataset", "generated"]
EVALUATION_KINDS = ["builtin", "file", "dataset"]


@dataclass
class ModelPanel:
    source: gr.Dropdown
    dtype: gr.Dropdown
    calib_kind: gr.Radio
    calib_file: gr.File
    calib_dataset: gr.Textbox
    calib_samples: gr.Slider
    eval_kind: gr.Radio
    eval_file: gr.File
    eval_dataset: gr.Textbox
    calib_windows: gr.Number
    calib_length: gr.Number
    load: gr.Button
    status: gr.HTML
    summary: gr.HTML

    @property
    def inputs(self) -> list[gr.components.Component]:
        """The fields a load reads, in the order of /load_model's parameters."""
        return [
            self.source,
            self.dtype,
            self.calib_kind,
            self.calib_file,
            self.calib_dataset,
            self.calib_samples,
            self.eval_kind,
            self.eval_file,
            self.eval_dataset,
            self.calib_windows,
            self.calib_length,
        ]


def text_fields(what: str, kinds: list[str]) -> tuple[gr.Radio, gr.File, gr.Textbox]:
    """The kind, file and dataset fields of one text source, created to be placed later."""
    return (
        gr.Radio(kinds, value="builtin", label=f"{what} text", scale=2, render=False),
        gr.File(label=f"{what} file (.txt / .jsonl)", file_types=[".txt", ".jsonl"], render=False),
        gr.Textbox(
            label=f"{what} dataset", placeholder="NAME[:CONFIG[:SPLIT[:FIELD]]]", render=False
        ),
    )


def build(settings: Settings) -> ModelPanel:
    gr.Markdown(
        "Pick a model and the text used to score units (calibration) and to measure perplexity "
        "(evaluation). The built-in text is the Lee news corpus: 300 background documents "
        "calibrate, 50 held-out documents evaluate."
    )
    # Created in the order of /load_model's parameters (a set of inputs is ordered by creation),
    # then placed in the layout below.
    hidden = {"render": False}
    source = gr.Dropdown(
        list(EMBEDDED),
        value=settings.default_model,
        allow_custom_value=True,
        label="Model",
        info="An embedded model, or type a hub id, a local folder or a .gguf path.",
        elem_id="model-source",
        **hidden,
    )
    dtype = gr.Dropdown(["float32", "bfloat16"], value="float32", label="Precision", **hidden)
    calib_kind, calib_file, calib_dataset = text_fields("Calibration", CALIBRATION_KINDS)
    calib_samples = gr.Slider(
        2,
        32,
        value=8,
        step=1,
        label="Self-generated calibration samples (128 tokens each)",
        **hidden,
    )
    eval_kind, eval_file, eval_dataset = text_fields("Evaluation", EVALUATION_KINDS)
    # Last in /load_model's parameters, so clients that send the older nine keep working.
    calib_windows, calib_length = (
        gr.Number(
            value,
            precision=0,
            minimum=least,
            label=label,
            info=info,
            elem_id=f"model-calib-{name}",
            **hidden,
        )
        for name, value, least, label, info in (
            ("windows", settings.calibration_windows, 1, "Calibration windows",
             "Part of the plan; curvature-based criteria and updates need enough of them."),
            ("length", settings.calibration_length, 2, "Calibration window length (tokens)", None),
        )
    )  # fmt: skip
    with gr.Row():
        with gr.Column(scale=2):
            source.render()
            dtype.render()
        with gr.Column(scale=3):
            for row in (
                (calib_kind, eval_kind),
                (calib_file, eval_file),
                (calib_dataset, eval_dataset),
            ):
                with gr.Row():
                    for field in row:
                        field.render()
            with gr.Row():
                calib_windows.render()
                calib_length.render()
            calib_samples.render()
    load = gr.Button("Load", variant="primary", elem_id="model-load")
    state_box = gr.HTML(elem_id="model-status")
    summary = gr.HTML(elem_id="model-summary")
    return ModelPanel(
        source,
        dtype,
        calib_kind,
        calib_file,
        calib_dataset,
        calib_samples,
        eval_kind,
        eval_file,
        eval_dataset,
        calib_windows,
        calib_length,
        load,
        state_box,
        summary,
    )


def source_dict(kind: str, file: str | None, dataset: str, samples: int) -> dict:
    """The plan's record of a text source, from the panel's fields."""
    if kind == "builtin":
        return {"kind": "builtin"}
    if kind == "file":
        if not file:
            raise DataError("A 'file' text source needs a file. Upload a .txt or .jsonl file.")
        return {"kind": "file", "path": file}
    if kind == "dataset":
        if not (dataset or "").strip():
            raise DataError(
                "A 'dataset' text source needs a dataset name. "
                "Type one, e.g. wikitext:wikitext-2-raw-v1:test."
            )
        return text_source(f"dataset:{dataset.strip()}")
    return {"kind": "generated", "n_samples": int(samples), "length": 128}


def calibration_amount(windows, length) -> dict:
    """The Model tab's calibration windows x length as ``Settings`` fields, or a clear refusal."""
    amount = {"calibration_windows": windows, "calibration_length": length}
    for (name, value), least in zip(amount.items(), (1, 2), strict=True):
        if not isinstance(value, int | float) or value != int(value) or value < least:
            what = name.replace("_", " ").replace("length", "window length")
            raise DataError(f"The {what} must be a whole number of at least {least}; got {value}.")
        amount[name] = int(value)
    return amount


def load(
    panel: ModelPanel, settings: Settings, state: gr.State, values: dict, progress=TRACK
) -> dict:
    """Load (or re-use) the shared model; on failure nothing of the session changes."""
    session: SessionState = values[state]
    source = (values[panel.source] or "").strip()
    if not source:
        raise gr.Error("Choose a model: an embedded one, a hub id, a folder or a .gguf file.")
    try:
        calibration = source_dict(
            values[panel.calib_kind],
            values[panel.calib_file],
            values[panel.calib_dataset],
            values[panel.calib_samples],
        )
        evaluation = source_dict(
            values[panel.eval_kind], values[panel.eval_file], values[panel.eval_dataset], 0
        )
        amount = calibration_amount(values[panel.calib_windows], values[panel.calib_length])
        settings = replace(settings, **amount)
        loaded = SHARED.open(
            source,
            values[panel.dtype],
            calibration,
            evaluation,
            settings,
            gradio_progress(progress),
            session.policy,
        )
    except ExplorerError as exc:
        raise user_error(exc) from exc
    plan = session.plan
    layers = loaded.structure.num_layers
    if session.model_key != loaded.key:
        plan.model, plan.calibration, plan.evaluation = source, calibration, evaluation
        plan.calibration_windows = settings.calibration_windows
        plan.calibration_length = settings.calibration_length
        for name in ("head_ratios", "mlp_ratios"):
            if getattr(plan, name) is not None and len(getattr(plan, name)) != layers:
                setattr(plan, name, None)
        if plan.allocation == "per_layer" and plan.head_ratios is None and plan.mlp_ratios is None:
            plan.allocation = "uniform"
        plan.remove_layers = [i for i in plan.remove_layers if i < layers]
        session.switch_model(loaded.key)
        session.node = None
    return loaded_view(panel, state, session, loaded)


def reflect(panel: ModelPanel, state: gr.State, values: dict) -> dict:
    """After a plan file or preset: the Model tab shows the calibration it (re)loaded."""
    session: SessionState = values[state]
    loaded = SHARED.get(session.model_key)
    return {
        panel.calib_windows: loaded.settings.calibration_windows,
        panel.calib_length: loaded.settings.calibration_length,
        panel.summary: summary_card(loaded),
    }


def loaded_view(panel: ModelPanel, state: gr.State, session: SessionState, loaded: Loaded) -> dict:
    return {
        state: session,
        panel.status: status(f"Loaded {loaded.summary['source']}.", "ok"),
        panel.summary: summary_card(loaded),
    }


def on_page_load(
    panel: ModelPanel, settings: Settings, state: gr.State, values: dict, progress=TRACK
) -> dict:
    """A new page opens on the default model and text, loading them once for every session."""
    session: SessionState = values[state]
    if session.model_key is not None:
        return loaded_view(panel, state, session, SHARED.get(session.model_key))
    defaults = {field: field.value for field in panel.inputs}
    defaults[panel.source] = settings.default_model
    return load(panel, settings, state, {**defaults, state: session}, progress)


def calibrate(panel: ModelPanel, state: gr.State, values: dict, progress=TRACK) -> dict:
    """Right after a load: the one calibration pass every panel needs, with its progress here."""
    session: SessionState = values[state]
    loaded = SHARED.get(session.model_key)
    plan = session.plan
    try:
        scores(loaded, plan.criterion, plan.reduction, gradio_progress(progress))
    except ExplorerError as exc:
        raise user_error(exc) from exc
    message = (
        f"Loaded {loaded.summary['source']}; calibration statistics and {plan.criterion} "
        "scores are ready."
    )
    return {panel.status: status(message, "ok")}


def summary_card(loaded: Loaded) -> str:
    """The architecture and parameter counts as an HTML card."""
    s = loaded.summary
    ex = loaded.explorer
    rows = [
        ("Source", s["source"]),
        ("Family", f"{s['family']} ({s['model_type']})"),
        ("Layers", s["layers"]),
        ("Hidden size", s["hidden_size"]),
        ("Query heads", s["heads"]),
        ("Key-value heads", s["kv_heads"]),
        ("Head dim", s["head_dim"]),
        ("MLP width", s["mlp_width"]),
        (
            "Vocabulary",
            f"{s['vocab_size']:,}" + (" (tied embeddings)" if s["tied_embeddings"] else ""),
        ),
        ("Parameters", f"{human(s['params_total'])} ({s['params_total']:,})"),
        ("  in decoder blocks", f"{human(s['params_blocks'])} ({s['params_blocks']:,})"),
        (
            "  in embeddings / output head",
            f"{human(s['params_embedding'])} ({s['params_embedding']:,})",
        ),
        ("  elsewhere (final norm)", f"{s['params_other']:,}"),
        ("Precision / device", f"{s['dtype']} / {s['device']}"),
        ("Calibration", f"{ex.calibration.shape[0]} windows × {ex.calibration.shape[1]} tokens"),
        ("Evaluation", f"{ex.evaluation.shape[0]} windows × {ex.evaluation.shape[1]} tokens"),
    ]
    body = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    return f'<table class="pe-card">{body}</table>'
