"""Bad export targets and faults during an export: refused or failed with one clear message, and
nothing the user had (their folders, the source model, the cache) changed."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from explorer.errors import ExportError
from explorer.export import export_model
from explorer.export.safety import check_target, clean_stale_partials
from explorer.model.structure import StructureMap
from tests.hardening.safety_helpers import small_selection, tree_digest

ROOT = Path(__file__).resolve().parents[2]


def export(ws, target, **kwargs):
    s = StructureMap(ws.model, ws.family)
    return export_model(ws.model, ws.tokenizer, s, small_selection(s), target, **kwargs)


def test_overwrite_refuses_a_folder_that_is_not_an_earlier_export(tiny_workspace, user_folder):
    before = tree_digest(user_folder)
    with pytest.raises(ExportError, match="is not an earlier export"):
        export(tiny_workspace, user_folder, overwrite=True)
    assert tree_digest(user_folder) == before


def test_overwrite_refuses_the_working_folder(tiny_workspace, user_folder, monkeypatch):
    monkeypatch.chdir(user_folder)
    before = tree_digest(user_folder)
    with pytest.raises(ExportError, match="working folder"):
        export(tiny_workspace, ".", overwrite=True)
    assert tree_digest(user_folder) == before


def test_export_refuses_a_parent_of_the_working_folder(tiny_workspace, user_folder, monkeypatch):
    monkeypatch.chdir(user_folder / "sub")
    before = tree_digest(user_folder)
    with pytest.raises(ExportError, match="folder above it"):
        export(tiny_workspace, "..", overwrite=True)
    assert tree_digest(user_folder) == before


def test_export_refuses_a_folder_inside_the_cache(tiny_workspace, private_cache):
    before = tree_digest(private_cache)
    with pytest.raises(ExportError, match="overlaps the model cache"):
        export(tiny_workspace, private_cache / "gguf", overwrite=True)
    with pytest.raises(ExportError, match="overlaps the model cache"):
        export(tiny_workspace, private_cache / "new-export")  # even a new, empty folder
    assert tree_digest(private_cache) == before


def test_export_refuses_a_folder_above_the_cache(private_cache):
    with pytest.raises(ExportError, match="overlaps the model cache"):
        check_target(private_cache.parent / ".", None, True)


def test_export_refuses_the_source_folder_through_a_symlink(tiny_workspace, tmp_path):
    link = tmp_path / "link-to-source"
    link.symlink_to(tiny_workspace.model.name_or_path)
    before = tree_digest(Path(tiny_workspace.model.name_or_path))
    with pytest.raises(ExportError, match="overlaps the source model"):
        export(tiny_workspace, link, overwrite=True)
    assert tree_digest(Path(tiny_workspace.model.name_or_path)) == before


def test_full_disk_fails_clearly_and_leaves_source_and_cache_intact(
    tiny_workspace, private_cache, tmp_path, monkeypatch
):
    from transformers import modeling_utils

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    source = Path(tiny_workspace.model.name_or_path)
    before = tree_digest(source), tree_digest(private_cache)
    monkeypatch.setattr(modeling_utils, "safe_save_file", full_disk)
    target = tmp_path / "exports" / "out"
    with pytest.raises(ExportError, match="No space left on device.*Free some disk space"):
        export(tiny_workspace, target)
    assert (tree_digest(source), tree_digest(private_cache)) == before
    assert list((tmp_path / "exports").iterdir()) == []  # no target, no partial folder


def test_weights_writer_error_is_an_export_error(tiny_workspace, tmp_path, monkeypatch):
    from safetensors import SafetensorError
    from transformers import modeling_utils

    def broken(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(No space left on device)")

    monkeypatch.setattr(modeling_utils, "safe_save_file", broken)
    with pytest.raises(ExportError, match="Could not write the weights"):
        export(tiny_workspace, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_read_only_filesystem_fails_clearly(tiny_workspace, tmp_path, monkeypatch):
    import tempfile

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    with pytest.raises(ExportError, match="Read-only file system.*writable disk"):
        export(tiny_workspace, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_stale_partial_folders_are_removed_by_the_next_export(tiny_workspace, tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".out.partial-{dead_pid}-abcd1234"
    legacy = tmp_path / ".out.partial-k3j4h5g6"  # named before the PID was part of the name
    swapped = tmp_path / f".out.old-{dead_pid}-0badf00d"
    live = tmp_path / f".out.partial-{os.getppid()}-live0000"  # a running process's export
    other = tmp_path / f".other.partial-{dead_pid}-abcd1234"  # beside another target
    for folder in (stale, legacy, swapped, live, other):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"x" * 100)
    export(tiny_workspace, tmp_path / "out")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(["out", live.name, other.name])


KILLED_EXPORT = """
import sys, time
import explorer.export.writer as export
from explorer.model.loading import load_model
from explorer.planning.selection import Selection
from explorer.model.structure import StructureMap

def hang(folder, *args):
    (folder / "WRITTEN").write_text("")  # tell the test the weights are on disk
    time.sleep(600)

export._reload = hang
ws = load_model(sys.argv[1], device="cpu")
s = StructureMap(ws.model, ws.family)
sel = Selection.make(s, mlp={0: [0, 1]})
export.export_model(ws.model, ws.tokenizer, s, sel, sys.argv[2])
"""


def test_killed_export_leaves_no_target_and_its_partial_is_removed_next_run(
    tiny_workspace, tiny_llama_dir, tmp_path
):
    target = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_EXPORT, str(tiny_llama_dir), str(target)],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 300
        while not list(tmp_path.glob(".out.partial-*/WRITTEN")):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        proc.kill()  # SIGKILL: nothing of the export's own clean-up runs
        proc.wait()
    (partial,) = tmp_path.glob(".out.partial-*")
    assert (partial / "model.safetensors").is_file() and not target.exists()
    assert clean_stale_partials(target) == [partial]
    partial.mkdir()  # once more, for the next export to find
    export(tiny_workspace, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
