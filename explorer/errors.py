"""The project's own exception types.

Every error a user can cause is raised as one of these, with a message that says what went wrong
and, on its last sentence, how to fix it. The UI shows ``str(error)`` as is, so keep it to one or
two plain sentences.
"""


class ExplorerError(Exception):
    """Base class: anything the user can fix by changing their input."""


class ModelSourceError(ExplorerError):
    """The model source does not exist, cannot be fetched, or is not a causal LM."""


class UnsupportedArchitectureError(ExplorerError):
    """The model loaded, but no family description covers its architecture."""


class DataError(ExplorerError):
    """Calibration or evaluation text is missing, too short, or overlaps."""


class PlanError(ExplorerError):
    """A plan is malformed, out of range, or would empty part of the model."""


class ExportError(ExplorerError):
    """An export target is unusable, or the written model failed verification."""
