"""Stage 1, the model: supported families, loading a model for pruning, and its prunable structure."""

from .families import Family, family_for, get_module
from .loading import EMBEDDED, Workspace, cache_root, load_model, resolve_dtype
from .structure import KINDS, Group, Kind, Member, StructureMap

__all__ = [
    "EMBEDDED",
    "KINDS",
    "Family",
    "Group",
    "Kind",
    "Member",
    "StructureMap",
    "Workspace",
    "cache_root",
    "family_for",
    "get_module",
    "load_model",
    "resolve_dtype",
]
