"""What the hardening tests share: a digest of a folder tree, tiny exports, the one error line."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from explorer.model.structure import StructureMap
from explorer.planning.selection import Selection


def tree_digest(root: Path) -> dict[str, str]:
    """Every file and folder under ``root`` (hidden ones too) with its content hash."""
    root = Path(root)
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        base = Path(dirpath)
        for name in dirnames:
            out[str((base / name).relative_to(root)) + "/"] = "dir"
        for name in filenames:
            path = base / name
            out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def small_selection(s: StructureMap) -> Selection:
    """A few MLP channels of every layer: a uniform export."""
    return Selection.make(s, mlp={i: [0, 1, 2, 3] for i in range(s.num_layers)})


def uneven_selection(s: StructureMap) -> Selection:
    """Different MLP widths per layer: a per-layer export (config.layer_sizes)."""
    return Selection.make(s, mlp={0: [0, 1, 2], 1: list(range(10))})


def error_lines(stderr: str) -> list[str]:
    """The lines of ``stderr`` that are the CLI's error message (progress bars left out)."""
    lines = [part.split("\r")[-1] for part in stderr.split("\n")]
    return [line for line in lines if line.startswith("error:")]
