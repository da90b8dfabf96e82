"""Model panel: choose the model and the calibration/evaluation text, load it, see its summary."""

from __future__ import annotations

from dataclasses import dataclass

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
    inputs: list[gr.components.Component]
    load: gr.Button
    status: gr.HTML
    summary: gr.HTML


def build(settings: Settings) -> ModelPanel:
    gr.Markdown(
        "Pick a model and the text used to score units (calibration) and to measure perplexity "
        "(evaluation). The built-in text is the Lee news corpus: 300 background documents "
        "calibrate, 50 held-out documents evaluate."
    )
    with gr.Row():
        with gr.Column(scale=2):
            source = gr.Dropdown(
                list(EMBEDDED),
                value=settings.default_model,
                allow_custom_value=True,
                label="Model",
                info="An embedded model, or type a hub id, a local folder or a .gguf path.",
                elem_id="model-source",
            )
            dtype = gr.Dropdown(["float32", "bfloat16"], value="float32", label="Precision")
        with gr.Column(scale=3):
            with gr.Row():
                calib_kind = gr.Radio(
                    CALIBRATION_KINDS, value="builtin", label="Calibration text", scale=2
                )
                eval_kind = gr.Radio(
                    EVALUATION_KINDS, value="builtin", label="Evaluation text", scale=2
                )
            with gr.Row():
                calib_file = gr.File(
                    label="Calibration file (.txt / .jsonl)", file_types=[".txt", ".jsonl"]
                )
                eval_file = gr.File(
                    label="Evaluation file (.txt / .jsonl)", file_types=[".txt", ".jsonl"]
                )
            with gr.Row():
                calib_dataset = gr.Textbox(
                    label="Calibration dataset", placeholder="NAME[:CONFIG[:SPLIT[:FIELD]]]"
                )
                eval_dataset = gr.Textbox(
                    label="Evaluation dataset", placeholder="NAME[:CONFIG[:SPLIT[:FIELD]]]"
                )
            calib_samples = gr.Slider(
                2, 32, value=8, step=1, label="Self-generated calibration samples (128 tokens each)"
            )
    load = gr.Button("Load", variant="primary", elem_id="model-load")
    state_box = gr.HTML(elem_id="model-status")
    summary = gr.HTML(elem_id="model-summary")
    inputs = [
        source,
        dtype,
        calib_kind,
        calib_file,
        calib_dataset,
        calib_samples,
        eval_kind,
        eval_file,
        eval_dataset,
    ]
    return ModelPanel(inputs, load, state_box, summary)


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


def load(
    settings: Settings,
    session: SessionState,
    source: str,
    dtype: str,
    calib_kind: str,
    calib_file: str | None,
    calib_dataset: str,
    calib_samples: int,
    eval_kind: str,
    eval_file: str | None,
    eval_dataset: str,
    progress=TRACK,
) -> tuple[SessionState, str, str]:
    """Load (or re-use) the shared model; on failure nothing of the session changes."""
    source = (source or "").strip()
    if not source:
        raise gr.Error("Choose a model: an embedded one, a hub id, a folder or a .gguf file.")
    try:
        calibration = source_dict(calib_kind, calib_file, calib_dataset, calib_samples)
        evaluation = source_dict(eval_kind, eval_file, eval_dataset, 0)
        loaded = SHARED.open(
            source,
            dtype,
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
        session.model_key, session.pruned_ppl, session.preview_plan = loaded.key, None, None
        session.recovered, session.node = None, None
    return session, status(f"Loaded {source}.", "ok"), summary_card(loaded)


def on_page_load(
    settings: Settings, session: SessionState, progress=TRACK
) -> tuple[SessionState, str, str]:
    """A new page opens on the default model and text, loading them once for every session."""
    if session.model_key is not None:
        loaded = SHARED.get(session.model_key)
        return session, status(f"Loaded {loaded.summary['source']}.", "ok"), summary_card(loaded)
    return load(
        settings,
        session,
        settings.default_model,
        "float32",
        "builtin",
        None,
        "",
        8,
        "builtin",
        None,
        "",
        progress,
    )


def calibrate(session: SessionState, progress=TRACK) -> str:
    """Right after a load: the one calibration pass every panel needs, with its progress here."""
    loaded = SHARED.get(session.model_key)
    plan = session.plan
    try:
        scores(loaded, plan.criterion, plan.reduction, gradio_progress(progress))
    except ExplorerError as exc:
        raise user_error(exc) from exc
    return status(
        f"Loaded {loaded.summary['source']}; calibration statistics and {plan.criterion} "
        "scores are ready.",
        "ok",
    )


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
