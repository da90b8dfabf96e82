"""The shared app under an unfriendly API client: paths outside the operator's folders (absolute,
``..``, symlinks) for models, datasets, uploads, exports and downloads; oversized uploads, texts,
generations and recovery runs; malformed tables; and eight clients at once.

The app runs on a tiny Llama folder with the policy an operator gets from
``python app.py --host 0.0.0.0 --allow-path DIR --export-root DIR --max-upload-mb 1 ...``:
it listens on loopback here, and the policy does not depend on where a client connects from.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import gradio
import pytest
import torch

from components import state
from explorer.planning.plan import Plan
from explorer.policy import AccessPolicy
from tests.app.fixtures import free_port
from tests.hardening.safety_helpers import tree_digest

pytest_plugins = ["tests.app.fixtures"]

BUILTIN = ("builtin", None, "", 2)  # calibration kind, file, dataset, generated samples
MLP_ONLY = ("uniform", "l1", "sum", 0.2, "head", 0, 0, 1, True)  # the plan controls
TABLE, INFO = 9, 12  # outputs of the plan endpoints
PROMPT = ("the cat sat on the", 8, 0, False)


@pytest.fixture(scope="module")
def tiny_app(tiny_llama_dir, tmp_path_factory, outbound):
    import app

    root = tmp_path_factory.mktemp("shared-app")
    allowed, exports = root / "allowed", root / "exports"
    allowed.mkdir()
    policy = AccessPolicy.make(
        allow_paths=[allowed],
        export_root=exports,
        max_upload_mb=1,
        max_text_chars=400_000,
        max_calibration_tokens=2048,
        max_steps=50,
        max_new_tokens=64,
    )
    demo = app.build_app(
        default_model=str(tiny_llama_dir),
        default_plan=Plan(),  # the best preset protects both of the tiny model's layers
        calibration_windows=2,
        eval_windows=2,
        policy=policy,
    )
    port = free_port()
    app.launch(demo, "127.0.0.1", port, prevent_thread_lock=True, quiet=True)
    try:
        yield SimpleNamespace(
            url=f"http://127.0.0.1:{port}/", root=root, allowed=allowed, exports=exports,
            model=str(tiny_llama_dir),
        )  # fmt: skip
    finally:
        demo.close()
        assert outbound == []  # nothing here reached past loopback


def new_client(tiny_app):
    from gradio_client import Client

    c = Client(tiny_app.url, analytics_enabled=False, verbose=False)
    load(c, tiny_app.model)
    return c


@pytest.fixture
def client(tiny_app):
    return new_client(tiny_app)


def load(client, source, calibration=BUILTIN, evaluation=("builtin", None, "")):
    return client.predict(source, "float32", *calibration, *evaluation, api_name="/load_model")


def refusal(call, *args, **kwargs) -> str:
    """The message of the error the app answers ``call`` with."""
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as info:
        call(*args, **kwargs)
    return str(info.value)


MODEL: list[str] = []  # the tiny model's folder, for tests that need no other fixture


@pytest.fixture(autouse=True)
def _model(tiny_app):
    MODEL[:] = [tiny_app.model]


def test_default_flags_give_the_safe_policy():
    import app

    parser = app.argparse.ArgumentParser()
    app.policy_flags(parser)
    policy = app.policy_from_args(parser.parse_args([]))
    assert policy == AccessPolicy.make()
    assert policy.allow_paths == () and policy.allow_hub == ()
    assert policy.export_root == Path("exports").resolve() and not policy.trust_remote_code


# -- models -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["/etc", "/no/such/folder", "../..", "ALLOWED/../..", "~"])
def test_model_path_outside_the_allowed_folders_is_refused_alike(client, tiny_app, where):
    source = where.replace("ALLOWED", str(tiny_app.allowed))
    assert refusal(load, client, source) == (
        f"'{source}' is not one of the models this server offers. Use an embedded model "
        "(smollm2-135m, gemma3-270m), or ask the operator to allow it (--allow-path, --allow-hub)."
    )  # the same words whether the folder exists or not


def test_model_symlink_out_of_an_allowed_folder_is_refused(client, tiny_app):
    link = tiny_app.allowed / "link-to-model"
    link.symlink_to(tiny_app.model)
    assert "is not one of the models this server offers" in refusal(load, client, str(link))


def test_hub_id_that_is_not_allowed_is_refused(client):
    message = refusal(load, client, "someone/model")
    assert "'someone/model' is not one of the models this server offers" in message


def test_model_with_its_own_code_is_refused_in_the_app(client, tiny_app):
    folder = tiny_app.allowed / "custom"
    folder.mkdir()
    config = json.loads((Path(tiny_app.model) / "config.json").read_text())
    config.update(model_type="evil_lm", auto_map={"AutoConfig": "evil.EvilConfig"})
    (folder / "config.json").write_text(json.dumps(config))
    marker = tiny_app.root / "code-ran"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    assert "needs its own Python code" in refusal(load, client, str(folder))
    assert not marker.exists()


# -- text ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "spec", ["SECRET", "SECRET:default:train:api_key", "UP/SECRET", "/etc/passwd"]
)
def test_dataset_field_cannot_read_server_files(client, tiny_app, tmp_path, spec):
    secret = tmp_path / "secrets.jsonl"
    secret.write_text(json.dumps({"api_key": "sk-THE-SECRET-VALUE"}) + "\n")
    up = "/".join([".."] * len(Path.cwd().parts)) + str(tmp_path)  # a relative path up to /
    name = spec.replace("UP/SECRET", f"{up}/secrets.jsonl").replace("SECRET", str(secret))
    message = refusal(load, client, tiny_app.model, ("dataset", None, name, 2))
    assert "is not one this server offers" in message
    assert "api_key" not in message.replace(name, "") and "SECRET-VALUE" not in message


def raw_call(tiny_app, api_name: str, data: list) -> str:
    """Call an endpoint over plain HTTP (``gradio_client`` would upload any local file named in
    ``data`` itself): the event stream the server answers with."""
    import httpx

    with httpx.Client(trust_env=False, timeout=300) as http:
        url = f"{tiny_app.url}gradio_api/call/{api_name}"
        event = http.post(url, json={"data": data}).json()["event_id"]
        return http.get(f"{url}/{event}").text


@pytest.mark.parametrize("path", ["/etc/passwd", "/tmp/gradio/../../etc/passwd", "TMP/x.txt"])
def test_text_file_the_client_did_not_upload_is_refused(tiny_app, tmp_path, path):
    path = path.replace("TMP", str(tmp_path))
    (tmp_path / "x.txt").write_text("the cat sat on the mat " * 100)
    file = {"path": path, "meta": {"_type": "gradio.FileData"}, "orig_name": "x.txt"}
    answer = raw_call(
        tiny_app,
        "load_model",
        [tiny_app.model, "float32", "file", file, "", 2, "builtin", None, ""],
    )
    assert answer.startswith("event: error")
    assert "root:" not in answer and "the cat sat" not in answer


def test_uploaded_file_names_cannot_climb_out_of_the_upload_folder(tiny_app):
    import httpx

    with httpx.Client(trust_env=False, timeout=60) as http:
        for name in ("../../escaped.txt", "/etc/escaped.txt"):
            answer = http.post(tiny_app.url + "gradio_api/upload", files={"files": (name, b"hi")})
            (stored,) = answer.json()
            uploads = Path(gradio.utils.get_upload_folder()).resolve()
            assert uploads in Path(stored).resolve().parents and Path(stored).name == "escaped.txt"
    assert not Path("/etc/escaped.txt").exists() and not Path("/tmp/escaped.txt").exists()


def test_upload_over_the_size_limit_is_refused(tiny_app):
    import httpx

    big = b"the cat sat on the mat\n" * 70_000  # 1.6 MB, over --max-upload-mb 1
    with httpx.Client(trust_env=False, timeout=60) as http:
        answer = http.post(tiny_app.url + "gradio_api/upload", files={"files": ("big.txt", big)})
    assert answer.status_code == 413 and "maximum" in answer.text.lower()
    uploads = Path(gradio.utils.get_upload_folder())
    assert not any(p.name == "big.txt" for p in uploads.rglob("big.txt"))


def test_text_over_the_length_limit_is_refused(client, tiny_app, tmp_path):
    from gradio_client import handle_file

    long = tmp_path / "long.txt"
    long.write_text("the dog ran in the park\n" * 21_000)  # 504,000 characters, under 1 MB
    message = refusal(load, client, tiny_app.model, ("file", handle_file(str(long)), "", 2))
    assert "504,000 characters; this server reads at most 400,000" in message


def test_calibration_over_the_token_limit_is_refused_and_the_session_keeps_its_model(client):
    evaluation = ("builtin", None, "")
    args = (MODEL[0], "float32", *BUILTIN, *evaluation)
    message = refusal(client.predict, *args, 64, 64, api_name="/load_model")
    assert "64 calibration windows x 64 tokens = 4,096 tokens" in message
    assert "this server calibrates on at most 2,048" in message
    message = refusal(client.predict, *args, 0, 64, api_name="/load_model")
    assert "less than minimum value 1" in message  # the input's own range
    assert client.predict(api_name="/show_plan")[INFO]["error"] is None


def test_plan_file_calibrating_over_the_limit_is_refused_and_the_plan_kept(client, tmp_path):
    from gradio_client import handle_file

    shown = client.predict(api_name="/show_plan")
    plan = Plan.from_dict(shown[INFO]["plan"])
    plan.calibration_windows, plan.calibration_length, plan.target = 32, 256, 0.5
    path = tmp_path / "plan.json"
    plan.save(path)
    message = refusal(client.predict, handle_file(str(path)), api_name="/load_plan")
    assert "32 calibration windows x 256 tokens = 8,192 tokens" in message
    assert client.predict(api_name="/show_plan")[INFO]["plan"] == shown[INFO]["plan"]


# -- plans, generation, recovery ------------------------------------------------------------------------
def test_table_with_the_wrong_number_of_rows_is_refused_and_show_plan_still_works(client):
    shown = client.predict(api_name="/show_plan")
    table = {"headers": shown[TABLE]["headers"], "data": shown[TABLE]["data"][:1]}
    for endpoint in ("/edit_table", "/set_plan"):
        controls = ("per_layer", *MLP_ONLY[1:])
        out = client.predict(*controls, table, api_name=endpoint)
        assert "The per-layer table has 1 rows; the model has 2 layers" in out[INFO]["error"]
    assert client.predict(api_name="/show_plan")[INFO]["error"] is None


def test_generation_longer_than_the_limit_is_refused(client):
    message = refusal(client.predict, "the cat", 10**6, 0, False, api_name="/generate")
    assert "Value 1000000 is greater than maximum value 128" in message  # the slider's range
    message = refusal(client.predict, "the cat", 120, 0, False, api_name="/generate")
    assert "120 new tokens were asked for; this server generates 1 to 64" in message
    message = refusal(client.predict, "the cat " * 1000, 8, 0, False, api_name="/generate")
    assert "The prompt has 8,000 characters; this server takes at most 4,000" in message


def test_recovery_with_more_steps_than_the_limit_is_refused(client):
    from components import recovery

    form = [
        10**7 if (f.step, f.name) == ("lora", "steps") else f.default for f in recovery.fields()
    ]
    message = refusal(client.predict, ["lora"], *form, api_name="/recover")
    assert "steps = 10000000 is more than this server runs (50)" in message
    assert state.SHARED.lock.acquire(timeout=60)
    state.SHARED.lock.release()


def test_plan_file_distilling_on_a_server_file_is_refused_before_any_work(client, tmp_path):
    from gradio_client import handle_file

    from components import recovery

    shown = client.predict(api_name="/show_plan")
    plan = Plan.from_dict(shown[INFO]["plan"])
    plan.recovery = [{"step": "distill", "text_file": "/etc/passwd", "with_calibration": True}]
    path = tmp_path / "plan.json"
    plan.save(path)
    client.predict(handle_file(str(path)), api_name="/load_plan")
    form = [f.default for f in recovery.fields()]
    message = refusal(client.predict, ["distill"], *form, api_name="/recover")
    assert "Only files uploaded to this page can be read" in message and "root:" not in message


def test_a_job_past_the_wall_time_limit_stops_and_frees_the_lock():
    from explorer.policy import JobLimitError

    steps = []

    def work(emit):
        for i in range(10**6):
            steps.append(i)
            emit(i)
            time.sleep(0.01)

    run = state.streamed(work, None, AccessPolicy(max_job_seconds=0.2))
    with pytest.raises(JobLimitError, match="longer than this server allows"):
        for _ in run:
            pass
    assert state.SHARED.lock.acquire(timeout=60)
    state.SHARED.lock.release()
    assert len(steps) < 10**6


# -- exports and downloads ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "target", ["/tmp/elsewhere", "../escaped", "ok/../../escaped", "/tmp/gradio/weights", "."]
)
def test_export_outside_the_export_root_is_refused(client, tiny_app, target):
    before = tree_digest(tiny_app.root)
    message = refusal(client.predict, target, False, api_name="/export")
    assert "Exports go into a folder under the export folder ('exports/')" in message
    assert tree_digest(tiny_app.root) == before
    assert not Path("/tmp/elsewhere").exists() and not Path("/tmp/gradio/weights").exists()


def test_export_through_a_symlink_out_of_the_root_is_refused(client, tiny_app, tmp_path):
    tiny_app.exports.mkdir(exist_ok=True)
    (tiny_app.exports / "link").symlink_to(tmp_path)
    message = refusal(client.predict, "link/model", False, api_name="/export")
    assert "Exports go into a folder under the export folder" in message
    assert list(tmp_path.iterdir()) == []


def test_overwrite_in_the_root_replaces_only_an_earlier_export(client, tiny_app):
    mine = tiny_app.exports / "not-an-export"
    mine.mkdir(parents=True, exist_ok=True)
    (mine / "notes.txt").write_text("mine")
    before = tree_digest(mine)
    assert "is not an earlier export" in refusal(client.predict, "not-an-export", True,
                                                 api_name="/export")  # fmt: skip
    assert tree_digest(mine) == before


def fetch(url: str) -> int:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=60) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_downloads_serve_only_what_the_app_handed_out(client, tiny_app):
    checks, report, files = client.predict("served", False, api_name="/export")
    assert "Verified" in checks and (tiny_app.exports / "served" / "model.safetensors").is_file()
    assert sorted(Path(f).name for f in files) == ["README.md", "plan.json", "report.json"]
    for path in (
        tiny_app.exports / "served" / "model.safetensors",
        Path(tiny_app.model) / "model.safetensors",
        Path("/etc/passwd"),
        Path("/tmp/gradio/../../etc/passwd"),
    ):
        url = tiny_app.url + "gradio_api/file=" + urllib.parse.quote(str(path))
        assert fetch(url) == 403, path


# -- eight clients, and one that leaves --------------------------------------------------------------
def plan_table(client) -> dict:
    shown = client.predict(api_name="/show_plan")
    return {"headers": shown[TABLE]["headers"], "data": shown[TABLE]["data"]}


def session_run(client, target: float) -> tuple:
    """set_plan + preview + generate for one plan: the numbers and texts it gets."""
    controls = (*MLP_ONLY[:3], target, *MLP_ONLY[4:])
    info = client.predict(*controls, plan_table(client), api_name="/set_plan")[INFO]
    assert info["error"] is None
    job = client.submit(api_name="/preview")
    job.result()
    dense, pruned = (float(v) for v in job.outputs()[-1][:2])
    generated = client.predict(*PROMPT, api_name="/generate")
    return info["sizes"]["params_after"], dense, pruned, json.dumps(generated[:2])


def test_eight_clients_at_once_get_what_each_gets_alone(tiny_app):
    targets = [0.05 * (i + 1) for i in range(8)]
    clients = [new_client(tiny_app) for _ in targets]
    results: dict[int, tuple] = {}
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            results[i] = session_run(clients[i], targets[i])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert errors == [] and len(results) == 8
    assert len({r[0] for r in results.values()}) == 8  # eight different plans
    alone = new_client(tiny_app)
    for i, target in enumerate(targets):
        size, dense, pruned, texts = session_run(alone, target)
        got = results[i]
        assert got[0] == size and got[3] == texts
        assert got[1] == pytest.approx(dense, rel=1e-6) and got[2] == pytest.approx(
            pruned, rel=1e-6
        )


@pytest.fixture
def slow_preview(monkeypatch):
    """Every preview batch takes 1.5 s longer: time to leave, or to queue, in the middle."""
    from explorer.apply import preview

    run = preview.LivePreview.run

    def slow(self, selection, *args, **kwargs):
        for step in run(self, selection, *args, **kwargs):
            time.sleep(1.5)
            yield step

    monkeypatch.setattr(preview.LivePreview, "run", slow)


def started(job) -> None:
    """Wait until a streaming job sent its first update."""
    deadline = time.monotonic() + 300
    while not job.outputs():
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_a_client_leaving_mid_preview_leaves_the_model_dense(tiny_app, slow_preview):
    from explorer.model.loading import load_model

    client = new_client(tiny_app)
    controls = (*MLP_ONLY[:3], 0.4, *MLP_ONLY[4:])
    client.predict(*controls, plan_table(client), api_name="/set_plan")
    job = client.submit(api_name="/preview")
    started(job)
    job.cancel()
    client.close()
    assert state.SHARED.lock.acquire(timeout=120)  # the worker finished at its next step
    try:
        loaded = state.SHARED._entries.values()
        models = [e.explorer.model for e in loaded if e.summary["source"] == tiny_app.model]
        fresh = load_model(tiny_app.model, device="cpu").model
        ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
        with torch.no_grad():
            assert models and all(torch.equal(m(ids).logits, fresh(ids).logits) for m in models)
    finally:
        state.SHARED.lock.release()


def test_a_waiting_client_is_shown_its_queue_position(tiny_app, slow_preview):
    from gradio_client.utils import Status

    first, second = new_client(tiny_app), new_client(tiny_app)
    busy = first.submit(api_name="/preview")
    started(busy)
    waiting = second.submit(api_name="/preview")
    seen = []
    deadline = time.monotonic() + 300
    while not waiting.done() and time.monotonic() < deadline:
        status = waiting.status()
        seen.append((status.code, status.rank))
        if status.code == Status.IN_QUEUE and status.rank is not None:
            break
        time.sleep(0.05)
    busy.cancel()
    waiting.cancel()
    assert (Status.IN_QUEUE, 0) in seen  # first in line behind the running preview
    assert state.SHARED.lock.acquire(timeout=120)
    state.SHARED.lock.release()
