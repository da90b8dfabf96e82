"""Stage 4, applying a selection: reversible masks, physical slicing, and the live preview."""

from .masking import masked
from .preview import LivePreview
from .pruning import prune_model

__all__ = ["LivePreview", "masked", "prune_model"]
