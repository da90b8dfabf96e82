"""Stage 5, recovery after pruning: the step type and the built-in steps.

``steps`` holds the step type, running a recipe's list of steps and the layer-wise and LoRA
steps; ``flap_bias`` and ``surgeon`` the FLAP bias compensation and LLM Surgeon's weight update.
"""

from .steps import RecoveryContext, RecoveryStep, run_steps
from .surgeon import surgeon_prune

__all__ = ["RecoveryContext", "RecoveryStep", "run_steps", "surgeon_prune"]
