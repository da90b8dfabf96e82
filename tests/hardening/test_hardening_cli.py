"""Bad input to the command line: exit code 2 and one ``error:`` line on stderr, checked before
anything expensive runs, and nothing on disk changed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from explorer import cli, session
from tests.hardening.safety_helpers import error_lines, tree_digest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if the model would be loaded: the refusal must come before that."""
    monkeypatch.setattr(session, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))


def run_cli(capsys, *args: str) -> str:
    """``python -m explorer ARGS`` in this process: its one error line (exit code 2 asserted)."""
    assert cli.main(list(args)) == 2
    (line,) = error_lines(capsys.readouterr().err)
    return line


def test_overwrite_of_the_working_folder_is_refused(capsys, user_folder, monkeypatch, no_loading):
    monkeypatch.chdir(user_folder)
    before = tree_digest(user_folder)
    line = run_cli(capsys, "export", "--model", "smollm2-135m", "--out", ".", "--overwrite")
    assert "working folder" in line
    assert tree_digest(user_folder) == before


def test_overwrite_of_the_cache_is_refused(capsys, private_cache, no_loading):
    before = tree_digest(private_cache)
    line = run_cli(capsys, "export", "--out", str(private_cache / "gguf"), "--overwrite")
    assert "overlaps the model cache" in line
    assert tree_digest(private_cache) == before


def test_overwrite_of_a_folder_that_is_not_an_export_is_refused(capsys, user_folder, no_loading):
    before = tree_digest(user_folder)
    line = run_cli(capsys, "export", "--out", str(user_folder), "--overwrite")
    assert "is not an earlier export" in line
    assert tree_digest(user_folder) == before


def test_non_empty_out_is_refused_before_the_evaluation(capsys, user_folder, no_loading):
    line = run_cli(capsys, "prune", "--target", "0.2", "--out", str(user_folder))
    assert "is not empty" in line


def test_negative_eval_windows_are_refused(capsys, no_loading):
    assert "--eval-windows -3 is out of range" in run_cli(capsys, "prune", "--eval-windows", "-3")


def test_negative_calibration_windows_are_refused(capsys, no_loading):
    line = run_cli(capsys, "prune", "--calibration-windows", "0")
    assert "calibration_windows = 0 is out of range" in line


def test_save_plan_into_a_missing_folder_is_refused_before_the_work(capsys, tmp_path, no_loading):
    line = run_cli(capsys, "prune", "--save-plan", str(tmp_path / "missing" / "plan.json"))
    assert "does not exist. Create it first." in line
    assert list(tmp_path.iterdir()) == []


def test_plan_json_with_a_wrong_type_is_refused(capsys, tmp_path, no_loading):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"protect_first": "two"}))
    line = run_cli(capsys, "prune", "--plan", str(plan))
    assert "Plan field 'protect_first' is 'two'; it must be a whole number." in line


def test_protecting_more_layers_than_the_model_has_is_refused(capsys, tiny_llama_dir):
    line = run_cli(
        capsys, "prune", "--model", str(tiny_llama_dir), "--protect-first", "2",
        "--protect-last", "1", "--device", "cpu",
    )  # fmt: skip
    assert "protects 3 layers" in line and "the model has 2" in line


def test_cuda_on_a_cpu_only_torch_is_refused(capsys, tiny_llama_dir, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = run_cli(capsys, "prune", "--model", str(tiny_llama_dir), "--device", "cuda")
    assert "no CUDA device available. Use --device cpu." in line


def test_read_only_out_fails_with_one_line(capsys, tiny_llama_dir, tmp_path, monkeypatch):
    import errno
    import tempfile

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "cal.txt").write_text("the cat sat on the mat " * 400)
    (texts / "eval.txt").write_text("a dog ran in the park " * 400)
    line = run_cli(
        capsys, "prune", "--model", str(tiny_llama_dir), "--device", "cpu", "--out",
        str(tmp_path / "out"), "--calibration", str(texts / "cal.txt"), "--evaluation",
        str(texts / "eval.txt"), "--eval-windows", "1", "--calibration-windows", "2",
    )  # fmt: skip
    assert "Read-only file system" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["texts"]


def subprocess_cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "explorer", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_model_with_its_own_code_never_prompts_in_a_real_run(tiny_llama_dir, tmp_path):
    marker = tmp_path / "code-ran"
    folder = tmp_path / "custom"
    folder.mkdir()
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    config.update(
        model_type="evil_lm",
        auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"},
    )
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    done = subprocess_cli("prune", "--model", str(folder), "--device", "cpu", stdin="y\ny\n")
    assert done.returncode == 2
    (line,) = error_lines(done.stderr)
    assert "needs its own Python code" in line
    assert not marker.exists()


def test_bad_eval_windows_in_a_real_run():
    done = subprocess_cli("prune", "--eval-windows", "-3")
    assert done.returncode == 2
    assert error_lines(done.stderr) == ["error: --eval-windows -3 is out of range; use 1 or more."]
