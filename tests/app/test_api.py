"""The app driven through its API with ``gradio_client``: the same steps a person takes, and two
sessions at once that each keep their own plan. Plus the agreement numbers the Importance tab shows.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.register_assert_rewrite("tests.app.fixtures")

import gradio as gr  # noqa: E402

from components import recovery, state  # noqa: E402
from components.importance import agreement  # noqa: E402
from components.model import source_dict  # noqa: E402
from explorer.errors import DataError, PlanError  # noqa: E402
from explorer.planning.plan import Plan  # noqa: E402
from tests.app.fixtures import CALIBRATION_WINDOWS, EVAL_WINDOWS  # noqa: E402

pytest_plugins = ["tests.app.fixtures"]

BUILTIN = ("builtin", None, "", 8)  # calibration kind, file, dataset, generated samples
# Outputs of every plan endpoint, after the session state: the controls, then these.
KEEP_HEADS, TABLE, COUNTERS, STATUS, INFO, PLAN_FILE = 8, 9, 10, 11, 12, 13
CONTROLS = ("uniform", "taylor", "sum", 0.2, "head", 0, 0, 1, False)


def load(client, source: str = "smollm2-135m"):
    return client.predict(source, "float32", *BUILTIN, "builtin", None, "", api_name="/load_model")


def plan_table(shown) -> dict:
    return {"headers": shown[TABLE]["headers"], "data": shown[TABLE]["data"]}


def edit_layer(client, shown, layer: int, column: int, value: float):
    """Change one cell of the per-layer table, as a person editing the table does."""
    table = plan_table(shown)
    table["data"][layer][column] = value
    controls = [shown[i] for i in range(9)]
    return client.predict(*controls, table, api_name="/edit_table")


def preview(client) -> list:
    """Every update the streaming preview sent, in order."""
    job = client.submit(api_name="/preview")
    job.result()
    return job.outputs()


def recover(client, steps: list[str], **values) -> list:
    """Every update the streaming recovery sent; ``values``: form fields as ``step_param=value``."""
    form = [values.get(f"{f.step}_{f.name}", f.default) for f in recovery.fields()]
    job = client.submit(steps, *form, api_name="/recover")
    job.result()
    return job.outputs()


def shared_weights() -> dict[str, str]:
    """A digest of every shared model's parameters (and which of them train), per loaded model."""
    digests = {}
    for key, loaded in state.SHARED._entries.items():
        digest = hashlib.sha256()
        for name, p in loaded.explorer.model.named_parameters():
            digest.update(f"{name}:{p.requires_grad}".encode())
            digest.update(p.detach().cpu().numpy().tobytes())
        digests[key] = digest.hexdigest()
    return digests


@pytest.fixture(scope="module")
def client(client_factory):
    c = client_factory()
    load(c)
    return c


@pytest.mark.real
def test_loading_returns_the_model_card(client):
    status, card = load(client)
    assert "Loaded smollm2-135m" in status
    assert "134,515,008" in card and f"{EVAL_WINDOWS} windows × 256 tokens" in card


@pytest.mark.real
def test_structure_and_node_selection(client):
    expanded, figure, nodes, details = client.predict([], False, False, api_name="/structure")
    assert expanded["value"] == ["0", "29"]
    assert json.loads(figure["plot"])["data"]  # a plotly figure
    figure, node, details = client.predict(
        "L4.up_proj", ["4"], False, False, api_name="/select_node"
    )
    assert node["value"] == "L4.up_proj"
    assert "MLP channel" in details and "1,728 parameters each" in details  # 3 × 576


@pytest.mark.real
def test_head_graph_and_importance(client):
    layer, graph, summary, heatmap = client.predict(0, 0.2, api_name="/show_heads")
    assert layer["maximum"] == 29
    heads = json.loads(graph["plot"])["data"][-1]
    assert heads["customdata"] == list(range(9))
    assert "τ = 0.20" in summary
    _, _, summary = client.predict(7, 0.05, api_name="/show_heads")[:3]
    assert summary.startswith("Layer 7:")
    heatmap, agreement_plot, table = client.predict(
        "taylor", "sum", "mlp", "log10", "l1", 0.2, api_name="/importance"
    )
    rows = table["data"]
    assert len(rows) == 30
    assert all(0.0 <= overlap <= 1.0 and -1.0 <= rho <= 1.0 for _, overlap, rho in rows)


@pytest.mark.real
def test_one_layer_ratio_changes_counters_and_pruned_perplexity(client):
    shown = client.predict(api_name="/show_plan")
    assert shown[INFO]["error"] is None
    before = preview(client)
    assert len(before) >= 2  # streamed: batch updates, then the final one
    dense, pruned_before = float(before[-1][0]), float(before[-1][1])
    assert "Done" in before[-1][2]
    edited = edit_layer(client, shown, 12, 2, 0.75)
    info = edited[INFO]
    assert edited[0] == "per_layer"
    assert info["kept"][12]["intermediate"] == 1536 - 1152
    assert info["sizes"]["params_after"] < shown[INFO]["sizes"]["params_after"]
    after = preview(client)[-1]
    assert float(after[0]) == pytest.approx(dense)
    assert float(after[1]) != pytest.approx(pruned_before)


@pytest.mark.real
def test_keeping_every_head_cuts_mlp_channels_only(client):
    table = plan_table(client.predict(api_name="/show_plan"))
    for allocation in ("uniform", "global"):
        controls = (allocation, "wanda_sp", "sum", 0.2, "head", 1, 1, 1, True)
        shown = client.predict(*controls, table, api_name="/set_plan")
        info = shown[INFO]
        assert shown[KEEP_HEADS] is True and info["plan"]["head_ratio"] == 0.0
        assert all(layer["heads"] == 9 for layer in info["kept"])
        assert "0 of 270 query heads" in shown[COUNTERS]
        assert info["sizes"]["block_params_after"] <= 0.8 * info["sizes"]["block_params_before"]
    shown = client.predict(*CONTROLS, table, api_name="/set_plan")
    assert shown[KEEP_HEADS] is False and shown[INFO]["plan"]["head_ratio"] is None


@pytest.mark.real
def test_generation_and_export(client, tmp_path):
    dense, pruned, summary = client.predict(
        "Name a large city in France.", 16, 0, False, api_name="/generate"
    )
    assert dense and pruned and "nats/token" in summary
    labels = {token["class_or_confidence"] for token in dense}
    assert labels <= {None, "fell > 2 nats", "fell 1–2 nats"}
    checks, report, files = client.predict(str(tmp_path / "out"), False, api_name="/export")
    assert "Verified" in checks
    assert report["perplexity_after"] > report["perplexity_before"] > 1
    assert sorted(name.rsplit("/", 1)[-1] for name in files) == [
        "README.md",
        "plan.json",
        "report.json",
    ]
    assert (tmp_path / "out" / "model.safetensors").is_file()
    # The same plan as GGUF for llama.cpp, and its zero-shot accuracy next to the dense model's.
    checks, report, files = client.predict(
        str(tmp_path / "gguf"), False, "gguf", "q8_0", api_name="/export"
    )
    assert "Verified" in checks and report["gguf"]["outtype"] == "q8_0"
    assert (tmp_path / "gguf" / "model-q8_0.gguf").stat().st_size == report["gguf"]["bytes"]
    accuracy = client.predict("lee_cloze", 8, api_name="/zero_shot")
    assert set(accuracy) == {"dense", "pruned"}
    assert all(0 <= accuracy[m]["lee_cloze"]["acc"] <= 1 for m in accuracy)


@pytest.mark.real
def test_layerwise_recovery_is_saved_in_the_plan_and_exported(client_factory, tmp_path):
    from gradio_client import handle_file

    client = client_factory()
    load(client)
    before = shared_weights()
    updates = recover(client, ["layerwise"])
    assert any("Recovering (Layer-wise refit: layer 30/30)" in u[0] for u in updates)
    message, dense, pruned, recovered, reports, losses = updates[-1]
    assert "Done" in message and losses is None
    dense, pruned, recovered = float(dense), float(pruned), float(recovered)
    assert math.isfinite(recovered) and 1 < dense < pruned
    (report,) = reports
    assert report["step"] == "layerwise" and report["modules"] == 2 * 30  # o_proj, down_proj
    assert report["mean_error_after"] < report["mean_error_before"]
    assert shared_weights() == before  # recovered on a copy

    # The plan carries the step: its JSON, and another session that loads it.
    shown = client.predict(api_name="/show_plan")
    steps = [{"step": "layerwise", "damping": 0.01, "shrink_to_current": True}]
    assert shown[INFO]["plan"]["recovery"] == steps
    assert json.loads(Path(shown[PLAN_FILE]).read_text())["recovery"] == steps
    other = client_factory()
    load(other)
    loaded = other.predict(handle_file(shown[PLAN_FILE]), api_name="/load_plan")
    assert loaded[INFO]["plan"]["recovery"] == steps

    # Export re-uses the recovered model made for this plan, and reports both perplexities.
    checks, exported, _ = client.predict(str(tmp_path / "out"), False, api_name="/export")
    assert "Verified" in checks and "Recovering" not in checks
    assert exported["recovery"] == steps
    assert exported["perplexity_after"] == pytest.approx(recovered, rel=1e-3)
    assert exported["perplexity_before_recovery"] == pytest.approx(pruned, rel=1e-3)
    assert exported["perplexity_before"] == pytest.approx(dense, rel=1e-3)


@pytest.mark.real
def test_lora_recovery_reports_its_losses_and_an_export_recovers_on_its_own(
    client_factory, tmp_path
):
    from gradio_client import handle_file

    client = client_factory()
    load(client)
    before = shared_weights()
    message, _, _, recovered, reports, losses = recover(client, ["lora"], lora_steps=3)[-1]
    assert "Done" in message and math.isfinite(float(recovered))
    (report,) = reports
    assert report["step"] == "lora" and len(report["losses"]) == 3
    assert all(math.isfinite(loss) for loss in report["losses"])
    (curve,) = json.loads(losses["plot"])["data"]
    assert curve["y"] == pytest.approx(report["losses"])

    # A plan whose recovery was never run on the Recover tab: the export runs it itself.
    plan = Plan(  # on the loaded calibration: another amount would recalibrate (a new entry)
        calibration_windows=CALIBRATION_WINDOWS, recovery=[{"step": "lora", "steps": 2, "rank": 4}]
    )
    plan.save(tmp_path / "plan.json")
    client.predict(handle_file(str(tmp_path / "plan.json")), api_name="/load_plan")
    checks, exported, _ = client.predict(str(tmp_path / "out"), False, api_name="/export")
    assert "Recovering (LoRA step 2/2" in checks and "Verified" in checks
    assert exported["recovery"] == plan.recovery
    assert math.isfinite(exported["perplexity_after"])
    assert exported["perplexity_before_recovery"] > exported["perplexity_before"] > 1
    assert shared_weights() == before


@pytest.mark.real
def test_distillation_trains_on_an_uploaded_text_file(client_factory, tmp_path):
    from gradio_client import handle_file

    client = client_factory()
    load(client)
    speeches = tmp_path / "speeches.txt"
    speeches.write_text("The Congress assembles this year to hear the address. " * 400)
    refused = client.predict(handle_file(str(speeches)), api_name="/recover_text_file")
    assert "first, then upload the file" in refused[1]  # the step is not chosen yet
    plan = Plan(calibration_windows=CALIBRATION_WINDOWS, recovery=[{"step": "distill"}])
    plan.save(tmp_path / "plan.json")
    client.predict(handle_file(str(tmp_path / "plan.json")), api_name="/load_plan")
    plan_file, message, note = client.predict(
        handle_file(str(speeches)), api_name="/recover_text_file"
    )
    assert "speeches.txt saved in the plan" in message and "**speeches.txt**" in note
    (entry,) = json.loads(Path(plan_file).read_text())["recovery"]
    assert Path(entry["text_file"]).name == "speeches.txt"
    updates = recover(client, ["distill"], distill_steps=1, distill_text_windows=3)
    (report,) = updates[-1][4]
    assert report["text"] == "speeches.txt" and len(report["losses"]) == 1
    assert report["tokens"] == 3 * 64  # three windows of the calibration windows' 64 tokens
    (entry,) = client.predict(api_name="/show_plan")[INFO]["plan"]["recovery"]
    assert Path(entry["text_file"]).name == "speeches.txt"  # the form's run kept it


@pytest.mark.real
def test_a_running_recovery_stops_at_its_next_step(client_factory):
    client = client_factory()
    load(client)
    form = [200 if (f.step, f.name) == ("lora", "steps") else f.default for f in recovery.fields()]
    job = client.submit(["lora"], *form, api_name="/recover")
    deadline = time.monotonic() + 600
    while not any("LoRA step 1/200" in update[0] for update in job.outputs()):
        assert time.monotonic() < deadline and not job.done()
        time.sleep(0.2)
    client.predict(api_name="/stop")  # the session's Stop: ends whichever run it has
    job.result()
    updates = job.outputs()
    assert "Stopped" in updates[-1][0]
    assert not any("LoRA step 10/200" in update[0] for update in updates)
    assert state.SHARED.lock.acquire(timeout=60)
    state.SHARED.lock.release()


@pytest.mark.real
def test_bad_recovery_input_is_refused_and_the_session_keeps_working(client):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="No recovery step is chosen"):
        recover(client, [])
    with pytest.raises(AppError, match=r"steps = -3 is out of range; use a whole number of 1"):
        recover(client, ["lora"], lora_steps=-3)
    with pytest.raises(AppError, match=r"damping = -1.0 is out of range"):
        recover(client, ["layerwise"], layerwise_damping=-1.0)
    assert client.predict(api_name="/show_plan")[INFO]["error"] is None


@pytest.mark.real
def test_bad_input_is_refused_and_the_session_keeps_working(client, tmp_path, tiny_tokenizer):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError
    from transformers import GPT2Config, GPT2LMHeadModel

    shown = client.predict(api_name="/show_plan")
    with pytest.raises(AppError, match="Could not fetch 'nope/not-a-model'"):
        load(client, "nope/not-a-model")
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32)).save_pretrained(gpt2)
    tiny_tokenizer.save_pretrained(gpt2)
    with pytest.raises(AppError, match="Architecture 'gpt2' is not supported"):
        load(client, str(gpt2))
    bad = tmp_path / "bad.json"
    bad.write_text('{"criterion": "taylor", "colour": "red"}')
    with pytest.raises(AppError, match="Unknown plan field"):
        client.predict(handle_file(str(bad)), api_name="/load_plan")
    emptied = edit_layer(client, shown, 2, 1, 1.0)
    assert "removes every attention head of layer 2" in emptied[INFO]["error"]
    assert emptied[INFO]["plan"]["head_ratios"][2] == 1.0  # the typed plan is kept
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    restored = edit_layer(client, emptied, 2, 1, 0.0)
    assert restored[INFO]["error"] is None
    with pytest.raises(AppError, match="is not empty"):
        client.predict(str(full), False, api_name="/export")
    assert [p.name for p in full.iterdir()] == ["keep.txt"]
    assert client.predict(api_name="/show_plan")[INFO]["error"] is None


@pytest.mark.real
def test_text_from_uploaded_files(client_factory, tmp_path):
    from gradio_client import handle_file

    from explorer.data import builtin_text

    calibration, evaluation = tmp_path / "calibration.txt", tmp_path / "evaluation.jsonl"
    calibration.write_text(builtin_text("calibration")[:20_000])
    docs = builtin_text("evaluation").split("\n\n")
    evaluation.write_text("\n".join(json.dumps({"text": d}) for d in docs))
    client = client_factory()
    status, card = client.predict(
        "smollm2-135m",
        "float32",
        "file",
        handle_file(str(calibration)),
        "",
        8,
        "file",
        handle_file(str(evaluation)),
        "",
        api_name="/load_model",
    )
    assert "Loaded smollm2-135m" in status
    assert f"{EVAL_WINDOWS} windows × 256 tokens" in card
    # The saved plan records where its text came from (the client would turn the path dicts of
    # the info output into downloads, so read the plan file instead).
    saved = Path(client.predict(api_name="/show_plan")[PLAN_FILE])
    plan = json.loads(saved.read_text())
    assert plan["calibration"]["kind"] == plan["evaluation"]["kind"] == "file"
    assert plan["evaluation"]["path"].endswith("evaluation.jsonl")


@pytest.mark.real
def test_a_saved_plan_loads_in_another_session(client_factory):
    from gradio_client import handle_file

    first, second = client_factory(), client_factory()
    load(first)
    load(second)
    table = plan_table(first.predict(api_name="/show_plan"))
    shown = first.predict(*CONTROLS, table, api_name="/set_plan")
    edited = edit_layer(first, shown, 20, 1, 2 / 3)
    loaded = second.predict(handle_file(edited[PLAN_FILE]), api_name="/load_plan")
    assert loaded[INFO]["plan"] == edited[INFO]["plan"]
    assert loaded[INFO]["sizes"] == edited[INFO]["sizes"]


@pytest.mark.real
def test_two_sessions_at_once_keep_their_own_plans_and_results(client_factory):
    a, b = client_factory(), client_factory()
    load(a)
    load(b)
    shown_a = edit_layer(a, a.predict(api_name="/show_plan"), 5, 1, 2 / 3)
    table_b = plan_table(b.predict(api_name="/show_plan"))
    shown_b = b.predict(
        "global", "taylor", "sum", 0.3, "head", 0, 0, 1, False, table_b, api_name="/set_plan"
    )
    assert shown_a[INFO]["plan"]["allocation"] == "per_layer"
    assert shown_b[INFO]["plan"]["allocation"] == "global"

    # At once on the one shared model: A's preview masks it, B generates with its own masks.
    prompt = ("Name a large city in France.", 12, 0, False)
    jobs = {"a": a.submit(api_name="/preview"), "b": b.submit(*prompt, api_name="/generate")}
    done = {name: threading.Thread(target=job.result) for name, job in jobs.items()}
    for t in done.values():
        t.start()
    for t in done.values():
        t.join()
    results = {"a": float(jobs["a"].outputs()[-1][1]), "b": jobs["b"].outputs()[-1]}
    # Each alone gives exactly the same again, and each session still has its own plan.
    assert float(preview(a)[-1][1]) == pytest.approx(results["a"], rel=1e-6)
    assert b.predict(*prompt, api_name="/generate") == results["b"]
    plan_a = a.predict(api_name="/show_plan")[INFO]["plan"]
    plan_b = b.predict(api_name="/show_plan")[INFO]["plan"]
    assert plan_a["allocation"] == "per_layer" and plan_a["head_ratios"][5] == pytest.approx(2 / 3)
    assert plan_b["allocation"] == "global" and plan_b["target"] == 0.3
    assert plan_b["head_ratios"] is None


def test_agreement_of_identical_and_reversed_scores():
    scores = torch.tensor([[3.0, 1.0, 2.0, 0.0], [0.5, 0.1, 0.9, 0.3]])
    same = agreement(scores, scores, 0.5)
    assert [r["overlap"] for r in same] == [1.0, 1.0]
    assert [r["spearman"] for r in same] == pytest.approx([1.0, 1.0])
    flipped = agreement(scores, -scores, 0.5)
    assert [r["overlap"] for r in flipped] == [0.0, 0.0]
    assert [r["spearman"] for r in flipped] == pytest.approx([-1.0, -1.0])
    # Layer scores are one row: unit 0 and 3 swap places, the rest agree.
    one = agreement(torch.tensor([0.0, 1.0, 2.0, 3.0]), torch.tensor([3.0, 1.0, 2.0, 0.0]), 0.25)
    assert one[0]["overlap"] == 0.0
    assert one[0]["spearman"] == pytest.approx(1 - 6 * (9 + 0 + 0 + 9) / (4 * 15))


def test_a_stopped_or_abandoned_run_stops_at_its_next_step_and_frees_the_model():
    """What the Stop button and Gradio's cancel do to the worker behind a streaming handler."""
    steps: list[int] = []

    def work(emit):
        for i in range(10_000):
            steps.append(i)
            emit(i)
            time.sleep(0.001)
        return "finished"

    run = state.streamed(work, "session-x")
    assert next(run) == ("item", 0)
    state.stop_runs(SimpleNamespace(session_hash="session-x"))
    assert all(kind == "item" for kind, _ in run)  # ends without a result
    assert state.SHARED.lock.acquire(timeout=60)
    state.SHARED.lock.release()
    assert len(steps) < 10_000

    steps.clear()
    run = state.streamed(work, None)
    next(run)
    run.close()  # Gradio closes the generator of a cancelled event
    assert state.SHARED.lock.acquire(timeout=60)
    state.SHARED.lock.release()
    assert len(steps) < 10_000


def test_errors_of_the_worker_reach_the_page():
    def work(emit):
        emit("first")
        raise PlanError("The plan removes every MLP channel of layer 1.")

    run = state.streamed(work, None)
    assert next(run) == ("item", "first")
    with pytest.raises(PlanError, match="every MLP channel"):
        next(run)
    assert state.SHARED.lock.acquire(timeout=60)
    state.SHARED.lock.release()


def test_a_plans_recovery_fills_the_recover_form_and_comes_back_from_it():
    fields = recovery.fields()
    plan = Plan(
        recovery=[
            {"step": "lora", "steps": 3, "lr": 1e-3},
            {"step": "layerwise", "modules": ["down_proj"]},
            {"step": "nope"},
        ]
    )
    with gr.Blocks():
        panel, session = recovery.build(), gr.State()
    shown = recovery.show(panel, session, {session: state.SessionState(plan=plan)})
    chosen, values = shown[panel.steps], [shown[control] for control in panel.params]
    assert chosen == ["lora", "layerwise"]  # the plan's order
    form = {(f.step, f.name): v for f, v in zip(fields, values, strict=True)}
    assert form["lora", "steps"] == 3 and form["lora", "lr"] == 1e-3
    assert form["lora", "rank"] == 8 and form["layerwise", "damping"] == 0.01  # defaults
    visible = {name: shown[group].visible for name, group in panel.groups.items()}
    hidden = ("layerwise_robust", "distill", "linear_replace", "surgeon")
    assert visible == {"layerwise": True, "lora": True} | dict.fromkeys(hidden, False)
    assert "unknown recovery steps (nope)" in shown[panel.status]
    # Back into the plan: what the form does not show (layer-wise's modules) is kept.
    assert recovery.recipe(chosen, values, plan.recovery) == [
        {"step": "lora", "steps": 3, "lr": 1e-3, "rank": 8, "batch_size": 4, "seed": 0},
        {"step": "layerwise", "modules": ["down_proj"], "damping": 0.01, "shrink_to_current": True},
    ]
    zero_rank = [0 if key == ("lora", "rank") else v for key, v in form.items()]
    with pytest.raises(PlanError, match="rank = 0 is out of range"):
        recovery.recipe(["lora"], zero_rank, [])
    # Text parameters are dropdowns of the step's choices, refused outside them.
    assert form["distill", "precision"] == "fp32" and form["distill", "schedule"] == "cosine"
    (distill,) = recovery.recipe(["distill"], values, [])
    assert distill["precision"] == "fp32" and distill["warmup"] == 0.1
    fp8 = ["fp8" if key == ("distill", "precision") else v for key, v in form.items()]
    with pytest.raises(PlanError, match="precision must be one of fp32, bf16"):
        recovery.recipe(["distill"], fp8, [])


def test_the_loss_curve_shows_every_step_that_trains():
    reports = [
        {"step": "linear_replace", "runs": []},
        {"step": "distill", "losses": [0.7, 0.5, 0.4]},
        {"step": "lora", "losses": [3.0, 2.5]},
    ]
    figure = recovery.loss_figure(reports)
    assert [(t.name, list(t.y)) for t in figure.data] == [
        ("distill", [0.7, 0.5, 0.4]),
        ("lora", [3.0, 2.5]),
    ]


def test_text_sources_from_the_model_panel(tmp_path):
    assert source_dict("builtin", None, "", 8) == {"kind": "builtin"}
    assert source_dict("dataset", None, "wikitext:wikitext-2-raw-v1:test", 8) == {
        "kind": "dataset",
        "name": "wikitext",
        "config": "wikitext-2-raw-v1",
        "split": "test",
    }
    assert source_dict("generated", None, "", 4) == {
        "kind": "generated",
        "n_samples": 4,
        "length": 128,
    }
    with pytest.raises(DataError, match="Upload a .txt or .jsonl file"):
        source_dict("file", None, "", 8)
    with pytest.raises(DataError, match="dataset name"):
        source_dict("dataset", None, " ", 8)
