"""What a client of a shared app may make the server read, write and run: the access policy.

Once the app listens on a network address, every text box is input from someone else. The policy
is the operator's (``app.py`` flags) and the same for every client, wherever it connects from:

- models: the embedded ones, the operator's start-up model, folders under ``allow_paths`` and hub
  ids matching an ``allow_hub`` pattern. Everything else gets one message that does not say
  whether the path exists.
- text: the built-in corpus, self-generated text, files the client uploaded (Gradio keeps them in
  its upload folder), datasets under ``allow_paths`` or on the hub under ``allow_hub``; at most
  ``max_text_chars`` characters of it.
- exports: only under ``export_root`` (relative targets are taken relative to it), never through a
  symlink or ``..`` out of it.
- work: calibration of at most ``max_calibration_tokens`` tokens (windows x length, chosen on
  the Model tab), recovery steps of at most ``max_steps`` steps; a job holding the shared model stops at its
  next step after ``max_job_seconds``. A model's own code runs only with ``trust_remote_code``.

Defaults are the safe ones: no folders, no hub ids, uploads of at most 10 MB.
"""

from __future__ import annotations

import codecs
import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .data import read_text_file
from .errors import DataError, ExplorerError, ExportError, ModelSourceError, PlanError
from .model.loading import EMBEDDED
from .text_safety import check_length

# Parameters of a recovery step that count training or update steps (LoRA's steps, Surgeon's
# shots...): bounded by ``max_steps`` so that one request cannot train for days.
STEP_PARAMS = ("steps", "shots", "epochs", "iterations")


class JobLimitError(ExplorerError):
    """A job held the shared model longer than the server allows; it was stopped."""


@dataclass(frozen=True)
class AccessPolicy:
    """The operator's limits on what clients may do; see the module docstring."""

    allow_paths: tuple[Path, ...] = ()
    allow_hub: tuple[str, ...] = ()  # fnmatch patterns of hub ids, e.g. "HuggingFaceTB/*"
    export_root: Path = field(default_factory=lambda: Path("exports").resolve())
    upload_dirs: tuple[Path, ...] = ()  # where the web framework keeps uploaded files
    start_model: str | None = None  # the model the operator opened the app on
    max_upload_mb: float = 10.0
    max_text_chars: int = 5_000_000
    max_calibration_tokens: int = 32_768  # 4x the opening recipe's 32 x 256
    max_steps: int = 1000
    max_new_tokens: int = 256
    max_prompt_chars: int = 4000
    max_job_seconds: float = 900.0
    trust_remote_code: bool = False

    @classmethod
    def make(
        cls,
        *,
        allow_paths: Iterable[str | Path] = (),
        allow_hub: Iterable[str] = (),
        export_root: str | Path | None = None,
        **limits,
    ) -> AccessPolicy:
        """A policy from the operator's flags: paths resolved once, at start-up."""
        root = Path(export_root or "exports").expanduser().resolve()
        paths = tuple(Path(p).expanduser().resolve() for p in allow_paths)
        return cls(allow_paths=paths, allow_hub=tuple(allow_hub), export_root=root, **limits)

    # -- models ---------------------------------------------------------------------------------------
    def check_model(self, source: str) -> None:
        """Refuse a model source this server does not offer (one message for every reason)."""
        if source in EMBEDDED or source == self.start_model or self._allowed_source(source):
            return
        raise ModelSourceError(
            f"'{source}' is not one of the models this server offers. Use an embedded model "
            f"({', '.join(EMBEDDED)}), or ask the operator to allow it (--allow-path, --allow-hub)."
        )

    # -- text -----------------------------------------------------------------------------------------
    def check_text_source(self, source: dict) -> None:
        """Refuse a text source that would read anything but uploads and allowed data."""
        kind = source.get("kind")
        if kind in ("builtin", "generated"):
            return
        if kind == "file":
            path = str(source.get("path", ""))
            if self._allowed_path(path, self.allow_paths + self.upload_dirs):
                return
            raise DataError("Only files uploaded to this page can be read. Upload the file.")
        name = str(source.get("name", ""))
        if kind == "dataset" and self._allowed_source(name):
            return
        raise DataError(
            f"The dataset '{name}' is not one this server offers. Upload a .txt or .jsonl file, "
            "or ask the operator to allow it (--allow-path, --allow-hub)."
        )

    # -- work -----------------------------------------------------------------------------------------
    def check_calibration(self, windows: int, length: int) -> None:
        """Refuse a calibration amount whose pass (with gradients, for some criteria) would hold
        the shared model for longer than the operator allows one client."""
        if windows * length > self.max_calibration_tokens:
            raise DataError(
                f"{windows} calibration windows x {length} tokens = {windows * length:,} tokens; "
                f"this server calibrates on at most {self.max_calibration_tokens:,}. Use fewer "
                "or shorter windows."
            )

    def check_recovery(self, steps: list[dict]) -> None:
        """Refuse recovery steps that would train or update for more than ``max_steps`` steps,
        or read a text file (distillation's ``text_file``) that the text rules do not allow."""
        for entry in steps:
            if entry.get("text_file"):
                self._check_text_file(str(entry["text_file"]))
            for name in STEP_PARAMS:
                value = entry.get(name)
                if isinstance(value, int | float) and value > self.max_steps:
                    raise PlanError(
                        f"{entry.get('step')}: {name} = {value} is more than this server runs "
                        f"({self.max_steps}). Use fewer {name}."
                    )

    def _check_text_file(self, path: str) -> None:
        """An allowed file of at most ``max_text_chars`` characters, as calibration text is.

        The text never has more characters than the file has bytes, so a small file passes
        unread. A .txt file is UTF-8, at most four bytes a character after an optional BOM, so
        a larger one than that fails unread; otherwise (and always for a .jsonl file, whose text
        is its fields) it is read and its characters are counted.
        """
        self.check_text_source({"kind": "file", "path": path})
        size = Path(path).stat().st_size if Path(path).is_file() else 0
        if size <= self.max_text_chars:
            return
        most_bytes = 4 * self.max_text_chars + len(codecs.BOM_UTF8)
        if Path(path).suffix != ".jsonl" and size > most_bytes:
            raise DataError(
                f"The distillation text file has {size:,} bytes, more than {self.max_text_chars:,} "
                f"characters of UTF-8; this server reads at most {self.max_text_chars:,}. "
                "Use a shorter file."
            )
        check_length(read_text_file(path), "distillation", self.max_text_chars)

    def check_generation(self, prompt: str, max_new_tokens: int) -> None:
        """Refuse a generation longer than the server runs for one request."""
        if len(prompt) > self.max_prompt_chars:
            raise DataError(
                f"The prompt has {len(prompt):,} characters; this server takes at most "
                f"{self.max_prompt_chars:,}. Use a shorter prompt."
            )
        if not 1 <= max_new_tokens <= self.max_new_tokens:
            raise DataError(
                f"{max_new_tokens} new tokens were asked for; this server generates 1 to "
                f"{self.max_new_tokens}. Ask for fewer tokens."
            )

    def job_limit(self) -> JobLimitError:
        return JobLimitError(
            f"The job ran longer than this server allows ({self.max_job_seconds:g} s) and was "
            "stopped so that others can use the model. Use a smaller job."
        )

    # -- exports --------------------------------------------------------------------------------------
    def export_target(self, folder: str) -> Path:
        """The folder under the export root that ``folder`` names; refuses anything outside it."""
        root = self.export_root
        given = Path(folder.strip()).expanduser()
        target = (given if given.is_absolute() else root / given).resolve()
        if target == root or root not in target.parents:
            raise ExportError(
                f"Exports go into a folder under the export folder ('{root.name}/'). "
                "Type a folder name such as my-model-pruned."
            )
        return target

    # -- helpers --------------------------------------------------------------------------------------
    def _allowed_source(self, name: str) -> bool:
        """A path under an allowed folder, or a hub id matching an allowed pattern."""
        if self._is_path(name):
            return self._allowed_path(name)
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.allow_hub)

    @staticmethod
    def _is_path(source: str) -> bool:
        """A path rather than a hub id: by its spelling, or because it exists here."""
        return (
            source.startswith(("/", ".", "~"))
            or "\\" in source
            or source.count("/") > 1
            or source.endswith((".gguf", ".json", ".jsonl", ".txt", ".csv", ".parquet"))
            or Path(source).expanduser().exists()
        )

    def _allowed_path(self, source: str, roots: tuple[Path, ...] | None = None) -> bool:
        """Whether ``source`` (symlinks followed, ``..`` resolved) lies in or under a root."""
        try:
            path = Path(source).expanduser().resolve()
        except (OSError, RuntimeError):
            return False
        roots = self.allow_paths if roots is None else roots
        return any(path == root or root in path.parents for root in roots)
