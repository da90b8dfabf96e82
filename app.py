"""Pruning Explorer: see a model's structure, tune a pruning plan, watch the model change, export.

    python app.py [--host 127.0.0.1] [--port 7860] [--allow-path DIR] [--allow-hub ID]
                  [--export-root DIR] [--max-upload-mb 10] [--trust-remote-code] ...

Opens on the embedded SmolLM2-135M and the built-in Lee corpus (loaded on the first page load,
with a progress bar). Without --host/--port, Gradio's GRADIO_SERVER_NAME / GRADIO_SERVER_PORT
apply; the default is loopback only. Each tab is one module of ``components/``, which only calls
the ``explorer`` library. What a client may make the server read, write and run is the
operator's ``AccessPolicy`` (``explorer/policy.py``), set by the flags below and the same for
every client; the defaults are safe on a network address.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

# Before gradio is imported: no usage analytics unless the user asked for them.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import gradio as gr  # noqa: E402

from components import (  # noqa: E402
    export,
    heads,
    importance,
    model,
    plan,
    preview,
    recovery,
    sensitivity,
    structure,
)
from components.state import SessionState, Settings, handler  # noqa: E402
from explorer.errors import ExplorerError  # noqa: E402
from explorer.model.loading import cache_root  # noqa: E402
from explorer.planning.plan import Plan  # noqa: E402
from explorer.planning.presets import DEFAULT, load_preset  # noqa: E402
from explorer.policy import AccessPolicy  # noqa: E402

ASSETS = Path(__file__).resolve().parent / "assets"
TITLE = "Pruning Explorer"


def build_app(
    *,
    default_model: str = "smollm2-135m",
    default_plan: Plan | None = None,
    calibration_windows: int | None = None,
    eval_windows: int | None = None,
    policy: AccessPolicy | None = None,
) -> gr.Blocks:
    """The app, opening on ``default_plan`` (None: the best measured recipe, ``presets.DEFAULT``)
    with the calibration amount that plan names (the Model tab's inputs start there).
    ``calibration_windows`` and ``eval_windows`` override the plan's calibration windows and
    limit the evaluation windows (tests use a few).

    ``policy``: what clients may do (default: the safe defaults of ``AccessPolicy.make``); the
    start-up model and Gradio's upload folder are added to it here.
    """
    policy = server_policy(policy or AccessPolicy.make(), default_model)
    opening = load_preset(DEFAULT) if default_plan is None else default_plan
    opening.model = default_model
    if calibration_windows is not None:
        opening.calibration_windows = calibration_windows
    settings = Settings(
        default_model=default_model,
        calibration_windows=opening.calibration_windows,
        calibration_length=opening.calibration_length,
        evaluation_windows=eval_windows,
    )
    with gr.Blocks(title=TITLE) as demo:
        session = gr.State(SessionState(plan=opening, policy=policy))
        gr.Markdown(
            f"# {TITLE}\nStructured pruning of causal LMs: look at the coupled structure, score "
            "units, plan how much to cut where, preview perplexity and text live, recover, export."
        )
        with gr.Tabs(elem_id="tabs"):
            with gr.Tab("Model", id="model", elem_id="tab-model"):
                model_panel = model.build(settings)
            with gr.Tab("Structure", id="structure", elem_id="tab-structure"):
                structure_panel = structure.build()
            with gr.Tab("Heads", id="heads", elem_id="tab-heads"):
                heads_panel = heads.build()
            with gr.Tab("Importance", id="importance", elem_id="tab-importance"):
                importance_panel = importance.build()
            with gr.Tab("Plan", id="plan", elem_id="tab-plan"):
                plan_panel = plan.build()
                sensitivity_panel = sensitivity.build()
            with gr.Tab("Preview", id="preview", elem_id="tab-preview"):
                preview_panel = preview.build()
            with gr.Tab("Recover", id="recover", elem_id="tab-recover"):
                recovery_panel = recovery.build()
            with gr.Tab("Export", id="export", elem_id="tab-export"):
                export_panel = export.build(default_model)

        loaded_outputs = [session, model_panel.status, model_panel.summary]
        on_open = demo.load(
            handler(model.on_page_load, model_panel, settings, session),
            {session},
            loaded_outputs,
            api_visibility="private",
            show_progress_on=[model_panel.summary],
        )
        on_load = model_panel.load.click(
            handler(model.load, model_panel, settings, session),
            {session, *model_panel.inputs},
            loaded_outputs,
            api_name="load_model",
            show_progress_on=[model_panel.summary],
        )
        # After a load the panels redraw; only the Load button's chain is a public endpoint.
        for loaded, public in ((on_open, False), (on_load, True)):
            structure.refresh_event(
                structure_panel, session, loaded, "structure" if public else None
            )
            # One calibration pass serves every panel; its progress shows on the Model tab.
            calibrated = loaded.success(
                handler(model.calibrate, model_panel, session),
                {session},
                model_panel.status,
                show_progress_on=[model_panel.status],
                api_visibility="private",
            )
            shown = plan.refresh_event(
                plan_panel, session, calibrated, "show_plan" if public else None
            )
            heads.refresh_event(heads_panel, session, shown, "show_heads" if public else None)
            structure.follow(structure_panel, session, [shown])  # the plan, once it is scored
            importance.refresh_event(importance_panel, session, shown, None)

        structure.wire(structure_panel, session)
        heads.wire(heads_panel, session)
        importance.wire(importance_panel, session)
        plan_events = plan.wire(plan_panel, session)
        for replaced in plan_panel.replacing:  # a plan file or preset may recalibrate
            replaced.success(
                handler(model.reflect, model_panel, session),
                {session},
                [model_panel.calib_windows, model_panel.calib_length, model_panel.summary],
                api_visibility="private",
                show_progress="hidden",
            )
        structure.follow(structure_panel, session, plan_events)
        heads.follow(heads_panel, session, plan_events)
        preview.wire(preview_panel, session, plan_events)
        sensitivity.wire(sensitivity_panel, session, plan_events)
        recovery.wire(recovery_panel, session, plan_events, plan_panel.save)
        export.wire(export_panel, session)
        demo.load(None, js=(ASSETS / "bridge.js").read_text())
    demo.access_policy = policy  # read by ``launch`` (upload size)
    return demo


def server_policy(policy: AccessPolicy, default_model: str) -> AccessPolicy:
    """``policy`` with the start-up model and Gradio's upload folder; refuses an export root that
    Gradio would serve files from (then any export could be downloaded by anyone)."""
    uploads = Path(gr.utils.get_upload_folder()).resolve()
    served = (uploads, Path(gr.utils.get_cache_folder()).resolve(), cache_root().resolve())
    root = policy.export_root
    for folder in served:
        if root == folder or folder in root.parents or root in folder.parents:
            raise ExplorerError(
                f"The export root '{root}' overlaps '{folder}' (Gradio's files or the model "
                "cache). Choose another --export-root."
            )
    return replace(policy, start_model=default_model, upload_dirs=(uploads,))


def launch(demo: gr.Blocks, host: str | None = None, port: int | None = None, **options):
    """Start the server with the app's stylesheet; host/port None defer to Gradio's env vars.

    Uploads are limited to the policy's size; the model cache is never served.
    """
    policy = getattr(demo, "access_policy", None) or AccessPolicy.make()
    return demo.launch(
        server_name=host,
        server_port=port,
        css_paths=[ASSETS / "app.css"],
        share=False,
        ssr_mode=False,
        mcp_server=False,
        max_file_size=f"{policy.max_upload_mb:g}mb",
        blocked_paths=[str(cache_root())],
        **options,
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default=None, help="address to bind (default: 127.0.0.1)")
    parser.add_argument(
        "--port", type=int, default=None, help="port (default: 7860 or the next free)"
    )
    parser.add_argument(
        "--model", default="smollm2-135m", help="model opened on the first page load"
    )
    parser.add_argument(
        "--eval-windows", type=int, default=None, help="limit the evaluation windows (default: all)"
    )
    policy_flags(parser)
    args = parser.parse_args(argv)
    try:
        policy = policy_from_args(args)
        demo = build_app(default_model=args.model, eval_windows=args.eval_windows, policy=policy)
    except ExplorerError as exc:
        parser.exit(2, f"error: {exc}\n")
    launch(demo, args.host, args.port)


# The policy's limits as flags: type and help.
LIMITS = {
    "max_upload_mb": (float, "largest upload"),
    "max_text_chars": (int, "most characters of calibration or evaluation text read per load"),
    "max_calibration_tokens": (int, "most calibration tokens (windows x length) per load"),
    "max_steps": (int, "most training/update steps of a recovery step (LoRA steps, shots)"),
    "max_new_tokens": (int, "longest generation"),
    "max_job_seconds": (float, "wall time after which a job holding the shared model stops"),
}


def policy_flags(parser: argparse.ArgumentParser) -> None:
    """The operator's flags that widen or tighten what clients may do (see the README)."""
    d = AccessPolicy()
    group = parser.add_argument_group("what clients may do (defaults are safe on a network)")
    add = group.add_argument
    add(
        "--allow-path",
        action="append",
        default=[],
        metavar="DIR",
        help="a model folder, .gguf file or text/data folder clients may load (repeatable)",
    )
    add(
        "--allow-hub",
        action="append",
        default=[],
        metavar="PATTERN",
        help="hub model/dataset ids clients may fetch, e.g. 'HuggingFaceTB/*' (repeatable)",
    )
    add(
        "--export-root",
        default="exports",
        metavar="DIR",
        help="the folder exports go into, and the only one (default: ./exports)",
    )
    for name, (kind, text) in LIMITS.items():
        add(f"--{name.replace('_', '-')}", type=kind, default=getattr(d, name), help=text)
    add(
        "--trust-remote-code",
        action="store_true",
        help="let allowed models run their own Python code (off: such models are refused)",
    )


def policy_from_args(args: argparse.Namespace) -> AccessPolicy:
    for name in LIMITS:
        if getattr(args, name) <= 0:
            raise ExplorerError(f"--{name.replace('_', '-')} must be more than 0.")
    return AccessPolicy.make(
        allow_paths=args.allow_path,
        allow_hub=args.allow_hub,
        export_root=args.export_root,
        trust_remote_code=args.trust_remote_code,
        **{name: getattr(args, name) for name in LIMITS},
    )


if __name__ == "__main__":
    main()
