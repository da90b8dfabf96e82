"""Stage 6, export: the report, and writing (and verifying) the pruned model as a folder.

The writer is imported lazily: its modeling code imports every supported family's model module.
"""

from typing import Any

from .report import pruning_report

__all__ = ["ExportResult", "export_model", "load_pruned", "pruning_report"]


def __getattr__(name: str) -> Any:
    if name in ("ExportResult", "export_model", "load_pruned"):
        from . import writer

        return getattr(writer, name)
    raise AttributeError(f"module 'explorer.export' has no attribute {name!r}")
