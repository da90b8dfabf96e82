"""Where an export may write, what it may replace, and what a failed one leaves behind.

An export is written into a hidden ``.NAME.partial-PID-XXXX`` folder beside its target and renamed
into place once verified. These rules make that safe on a machine with other people's files:

- ``--overwrite`` replaces only a folder this project wrote (it holds the ``report.json`` and
  ``selection.json`` that every export writes), never the working folder or a parent of it, the
  cache (``cache_root()``), or the source model's folder; those are refused even when empty.
- A write that fails (a full disk, a read-only folder) becomes one ``ExportError`` naming the
  cause; the partial folder is removed on the way out.
- A process killed mid-export cannot remove its partial folder, so the next export beside the same
  target removes every partial or swapped-out folder whose process (the PID in its name) is gone.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from ..errors import ExportError
from ..model.loading import cache_root

# Files every export writes; a folder with both (and a report that says it was verified) is one.
EXPORT_MARKERS = ("report.json", "selection.json")
_OWNED = re.compile(r"\.(?P<name>.+)\.(?:partial|old)-(?P<pid>\d+)-[^/]*\Z")
_LEGACY = re.compile(r"\.(?P<name>.+)\.partial-[a-z0-9_]{8}\Z")  # before the PID was in the name


def partial_prefix(target: Path) -> str:
    """The name prefix of this process's temporary folder beside ``target``."""
    return f".{target.name}.partial-{os.getpid()}-"


def swapped_name(target: Path, tag: str) -> Path:
    """Where an overwritten export waits while the new one is renamed into place."""
    return target.with_name(f".{target.name}.old-{os.getpid()}-{tag}")


def is_project_export(folder: Path) -> bool:
    """Whether ``folder`` holds an export this project wrote (its report names a verification)."""
    if not all((folder / name).is_file() for name in EXPORT_MARKERS):
        return False
    try:
        report = json.loads((folder / "report.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(report, dict) and "verification" in report and "params" in report


def check_target(target: Path, source: str | None, overwrite: bool) -> None:
    """Refuse an export target that is unusable or that an export must never replace.

    ``target`` is resolved (symlinks followed); ``source`` is the model's name or folder.
    """
    target = target.expanduser().resolve()
    if target.exists() and not target.is_dir():
        raise ExportError(f"'{target}' is a file. Choose a folder path for the export.")
    cwd = Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        raise ExportError(
            f"'{target}' is the working folder or a folder above it, which an export never "
            "replaces. Choose a new folder, e.g. pruned/."
        )
    cache = cache_root().expanduser().resolve()
    if _overlaps(target, cache):
        raise ExportError(
            f"'{target}' overlaps the model cache '{cache}', which an export never writes into. "
            "Choose a folder outside the cache."
        )
    if source:
        folder = Path(source).expanduser()
        if folder.exists() and _overlaps(target, folder.resolve()):
            raise ExportError(
                f"The export folder '{target}' overlaps the source model's folder "
                f"'{folder.resolve()}', and an export never writes into its source. "
                "Choose another folder."
            )
    if not (target.is_dir() and any(target.iterdir())):
        return
    if not overwrite:
        raise ExportError(
            f"The folder '{target}' is not empty. "
            "Choose a new folder, or pass overwrite=True (--overwrite) to replace it."
        )
    if not is_project_export(target):
        raise ExportError(
            f"The folder '{target}' is not an earlier export (it has no report.json and "
            "selection.json), and overwrite only replaces an export. Choose a new folder."
        )


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def clean_stale_partials(target: Path) -> list[Path]:
    """Remove the temporary folders that killed exports left beside ``target``; returns them."""
    parent = target.parent
    if not parent.is_dir():
        return []
    removed = []
    for entry in parent.iterdir():
        owned, legacy = _OWNED.match(entry.name), _LEGACY.match(entry.name)
        match = owned or legacy
        if not match or match["name"] != target.name or not entry.is_dir() or entry.is_symlink():
            continue
        if owned and _alive(int(owned["pid"])):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True  # this process's exports clean up after themselves
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


@contextlib.contextmanager
def write_errors(target: Path) -> Iterator[None]:
    """Turn a failed write (full disk, read-only folder, ...) into one clear ``ExportError``."""
    from safetensors import SafetensorError

    try:
        yield
    except OSError as exc:
        reason = exc.strerror or str(exc)
        hint = {
            errno.ENOSPC: "Free some disk space or choose a folder on another disk.",
            errno.EDQUOT: "Free some disk space or choose a folder on another disk.",
            errno.EROFS: "Choose a folder on a writable disk.",
            errno.EACCES: "Choose a folder you may write to.",
            errno.EPERM: "Choose a folder you may write to.",
        }.get(exc.errno, "Check the folder and the disk.")
        raise ExportError(
            f"Could not write the export to '{target}' ({reason}); nothing was left there. {hint}"
        ) from exc
    except SafetensorError as exc:
        raise ExportError(
            f"Could not write the weights of the export to '{target}' ({exc}); nothing was left "
            "there. Free some disk space or choose another folder."
        ) from exc
