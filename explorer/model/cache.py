"""Is a cache entry whole? Truncated downloads and half-written model folders are rebuilt.

A download cut short, a full disk or a killed process can leave a GGUF file or a de-quantised
model folder in the cache that looks present but is not whole. Loading it would fail deep in
transformers (or, worse, succeed with garbage), so the embedded loader checks each entry first
and rebuilds what is not whole; entries are checked cheaply (sizes and headers), hashes are
computed once per file and remembered beside it.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"


def model_folder_is_whole(folder: Path) -> bool:
    """A saved model folder with a readable config and every safetensors file complete."""
    try:
        json.loads((folder / "config.json").read_text())
        if (folder / INDEX).is_file():
            shards = set(json.loads((folder / INDEX).read_text())["weight_map"].values())
        else:
            shards = {WEIGHTS}
        return bool(shards) and all(safetensors_is_whole(folder / name) for name in shards)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def safetensors_is_whole(path: Path) -> bool:
    """The file's header parses and its size is exactly what the header's offsets say."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > size - 8:
                return False
            header = json.loads(f.read(length))
    except (OSError, ValueError, struct.error):
        return False
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
    return size == 8 + length + max(ends, default=0)


def file_has_hash(path: Path, sha256: str) -> bool:
    """Whether ``path`` hashes to ``sha256``; remembered in ``PATH.sha256`` (size and mtime)."""
    stamp = path.with_name(path.name + ".sha256")
    try:
        stat = path.stat()
    except OSError:
        return False
    expected = f"{sha256} {stat.st_size} {stat.st_mtime_ns}"
    try:
        if stamp.read_text().strip() == expected:
            return True
    except OSError:
        pass
    if sha256_of(path) != sha256:
        return False
    stamp.write_text(expected + "\n")
    return True


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
