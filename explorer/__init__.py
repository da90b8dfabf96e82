"""Pruning Explorer: structured pruning of causal LMs (library; no UI imports).

``explorer.load_pruned(path)`` loads any export of this project without remote code. It is
imported lazily: the per-layer modeling code imports every supported family's model module.
"""

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "load_pruned":
        from .export import load_pruned

        return load_pruned
    raise AttributeError(f"module 'explorer' has no attribute {name!r}")
