"""Every built-in criterion and recovery step, listed by name: the one place that knows them all.

Modules below define ``Criterion`` and ``RecoveryStep`` values and register nothing themselves;
this module imports them explicitly and lists them in the order the CLI and the app show. A new
criterion is a ``Criterion`` in a module of ``explorer.scoring`` added to ``CRITERIA`` here; a new
recovery step is a ``RecoveryStep`` in ``explorer.recovery`` added to ``RECOVERY_STEPS``.
"""

from __future__ import annotations

from .recovery.flap_bias import FLAP_BIAS_STEP
from .recovery.steps import LAYERWISE_STEP, LORA_STEP, RecoveryStep
from .recovery.surgeon import SURGEON_STEP
from .registry import Registry
from .scoring import criteria, distribution_aware, flap, obs, surgeon
from .scoring.base import Criterion

CRITERIA: Registry[Criterion] = Registry(
    "criterion",
    [
        criteria.RANDOM,
        criteria.L1,
        criteria.L2,
        criteria.TAYLOR,
        criteria.TAYLOR_E1,
        criteria.TAYLOR_E2,
        criteria.WANDA_SP,
        distribution_aware.DEPTH2,
        distribution_aware.HEAD_SIMILARITY,
        flap.FLAP,
        surgeon.SURGEON,
        obs.OBS,
        obs.SURGEON_GREEDY,
    ],
)

RECOVERY_STEPS: Registry[RecoveryStep] = Registry(
    "recovery step", [LAYERWISE_STEP, LORA_STEP, FLAP_BIAS_STEP, SURGEON_STEP]
)

__all__ = ["CRITERIA", "RECOVERY_STEPS"]
