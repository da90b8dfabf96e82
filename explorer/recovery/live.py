"""Live recovery steps: the weight updates cheap enough to apply inside the preview.

The masked preview shows what slicing alone does; Export writes the model *after* the plan's
recovery steps. Two of those steps change each kept layer from that layer's own dense calibration
statistics only, never from what earlier layers became, so the preview can apply them layer by
layer and still restart at the first changed layer:

- ``surgeon`` (one shot, column update): the reader of every removed unit (``o_proj`` for heads,
  ``down_proj`` for MLP channels, q/k/v/gate/up for hidden channels) gets LLM Surgeon's /
  Optimal Brain Surgeon's correlated update, ΔW = −W_:,C ([A⁻¹]_CC)⁻¹ (A⁻¹)_C,: — after any prefix
  of the greedy ``obs`` / ``surgeon_greedy`` walk, exactly the weights that walk reached.
- ``flap_bias``: FLAP's bias compensation, W_:,P · mean(X_P) added to the reader's output.

Both read the session's dense statistics (the same object the Export's recovery reads), so the
previewed number and the exported folder's agree to float precision (tested). Steps that depend on
the pruned model's own activations (``layerwise`` refits every later layer on a new pass over the
calibration windows; ``lora`` trains) cannot run live and are listed as not included.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from ..model.families import get_module
from ..model.structure import StructureMap
from ..planning.selection import Selection
from ..scoring.flap import FLAP_NEEDS
from ..scoring.statistics import Needs, Statistics
from .steps import removed_indices
from .surgeon import UPDATE_NEEDS, column_update, input_inverse

LIVE_NEEDS = {"surgeon": UPDATE_NEEDS, "flap_bias": FLAP_NEEDS}


def is_live(entry: dict) -> bool:
    """Whether the recovery entry ``{"step": name, **params}`` can run inside the preview."""
    name = entry.get("step")
    if name == "surgeon":
        return int(entry.get("shots", 1)) == 1 and not entry.get("update_rows", False)
    return name == "flap_bias"


def split_steps(steps: Sequence[dict]) -> tuple[list[dict], list[dict]]:
    """(the steps the preview includes, the steps it does not) of a plan's recovery list."""
    return [dict(e) for e in steps if is_live(e)], [dict(e) for e in steps if not is_live(e)]


def steps_key(steps: Sequence[dict]) -> str:
    return json.dumps(list(steps), sort_keys=True)


def live_needs(steps: Sequence[dict]) -> Needs:
    needs = Needs()
    for entry in steps:
        needs = needs | LIVE_NEEDS[entry["step"]]
    return needs


@dataclass
class Compensation:
    """The live steps' per-module patches of one model: new reader weights and bias shifts.

    Patches are cached per (module, removed columns), so moving one layer's ratio recomputes that
    layer's update only, and the inverse input covariance each update starts from is cached per
    module (least recently used first out beyond ``inverse_bytes``), so that recompute is one
    |C| × |C| solve rather than a fresh n × n inverse.
    """

    model: nn.Module
    structure: StructureMap
    stats: Statistics
    steps: list[dict]
    inverse_bytes: int = 2**30
    _inverses: OrderedDict[tuple[str, float], torch.Tensor] = field(default_factory=OrderedDict)
    _weights: dict[tuple[str, tuple[int, ...]], torch.Tensor] = field(default_factory=dict)
    _biases: dict[tuple[str, tuple[int, ...]], torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for entry in self.steps:
            if not is_live(entry):
                raise ValueError(f"recovery step {entry} cannot run inside the preview")

    @property
    def key(self) -> str:
        """Identifies what the patches compute: a preview restarts when it changes."""
        return steps_key(self.steps)

    def _damping(self) -> float | None:
        for entry in self.steps:
            if entry["step"] == "surgeon":
                return float(entry.get("damping", 0.01))
        return None

    def _with_flap(self) -> bool:
        return any(e["step"] == "flap_bias" for e in self.steps)

    def patches(self, selection: Selection) -> Iterator[tuple[str, torch.Tensor | None, object]]:
        """(module path, new weight or None, bias shift or None) of every patched module."""
        s, damping = self.structure, self._damping()
        for layer in selection.kept_layers(s):
            for name in s.family.linears:
                path = s.path(layer, name)
                cols = tuple(removed_indices(s, selection, path, 1))
                if not cols:
                    continue
                weight = self._weight(layer, name, path, cols, damping) if damping else None
                flap = self._with_flap() and name in self._readers
                bias = self._bias(path, cols) if flap else None
                if weight is not None or bias is not None:
                    yield path, weight, bias

    @property
    def _readers(self) -> tuple[str, str]:
        return (self.structure.family.o, self.structure.family.down)

    def _weight(self, layer: int, name: str, path: str, cols, damping: float) -> torch.Tensor:
        key = (path, cols)
        if key not in self._weights:
            dense = get_module(self.model, path).weight.detach()
            new = column_update(dense, self._inverse(layer, name, path, damping), cols)
            self._weights[key] = new.to(dense.dtype)
        return self._weights[key]

    def _inverse(self, layer: int, name: str, path: str, damping: float) -> torch.Tensor:
        key = (path, damping)
        if key in self._inverses:
            self._inverses.move_to_end(key)
            return self._inverses[key]
        inverse = input_inverse(self.structure, self.stats, layer, name, damping)
        self._inverses[key] = inverse
        used = sum(t.numel() * t.element_size() for t in self._inverses.values())
        while used > self.inverse_bytes and len(self._inverses) > 1:
            _, dropped = self._inverses.popitem(last=False)
            used -= dropped.numel() * dropped.element_size()
        return inverse

    def _bias(self, path: str, cols) -> torch.Tensor:
        key = (path, cols)
        if key not in self._biases:
            weight = get_module(self.model, path).weight.detach()
            index = torch.tensor(cols, device=weight.device)
            mean = self.stats.mean_input(path).to(weight.device)[index]
            self._biases[key] = weight.float().index_select(1, index) @ mean
        return self._biases[key]

    @contextmanager
    def applied(self, selection: Selection) -> Iterator[None]:
        """Run the model with the patches of ``selection``; the dense weights come back after."""
        saved: list[tuple[nn.Parameter, torch.Tensor]] = []
        handles = []
        try:
            with torch.no_grad():
                for path, weight, bias in self.patches(selection):
                    module = get_module(self.model, path)
                    if weight is not None:
                        saved.append((module.weight, module.weight.detach().clone()))
                        module.weight.copy_(weight)
                    if bias is not None:
                        bias = bias.clone()
                        bias[list(selection.hidden)] = 0  # the export keeps the kept rows only
                        handles.append(module.register_forward_hook(_add_output(bias)))
            yield
        finally:
            with torch.no_grad():
                for param, original in saved:
                    param.copy_(original)
            for h in handles:
                h.remove()


def _add_output(shift: torch.Tensor):
    def hook(module, args, output):
        return output + shift.to(output.dtype)

    return hook
