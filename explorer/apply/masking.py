"""Reversible masks: make a loaded model compute exactly what its pruned copy would.

Nothing in the shared weights changes; forward hooks zero what a removed unit would have
contributed, so a dense and a pruned view of one model can be evaluated one after the other and a
plan can change without reloading. Tests check that masking and slicing give the same logits.

- heads and MLP channels: zero their inputs to ``o_proj`` / ``down_proj`` (pre-hooks).
- layers: the block still runs (so a generation cache stays consistent) but its output is replaced
  by its input.
- hidden channels: zero them where they enter the residual stream (embedding, ``o_proj``,
  ``down_proj`` outputs), and rescale every hidden-size RMSNorm as if it averaged over the kept
  channels only, which is what the sliced norm computes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..model.families import get_module
from ..model.structure import StructureMap
from ..planning.selection import Selection


def keep_vector(n: int, removed: tuple[int, ...], block: int, like: torch.Tensor) -> torch.Tensor:
    """A 0/1 vector of length ``n * block`` that is 0 on the blocks of the removed units."""
    keep = torch.ones(n, block, dtype=like.dtype, device=like.device)
    if removed:
        keep[list(removed)] = 0
    return keep.flatten()


class MaskSet:
    """The hooks of one selection on one model; ``remove()`` restores the dense model."""

    def __init__(self, model: nn.Module, structure: StructureMap, selection: Selection):
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        s, f = structure, structure.family
        like = get_module(model, f.embed).weight
        for layer in range(s.num_layers):
            if layer in selection.layers:
                self._hook(model, s.layer_path(layer), forward=_skip_layer, with_kwargs=True)
                continue
            if selection.heads.get(layer):
                keep = keep_vector(s.heads, selection.heads[layer], s.head_dim, like)
                self._hook(model, s.path(layer, f.o), pre=_scale_input(keep))
            if selection.mlp.get(layer):
                keep = keep_vector(s.intermediate, selection.mlp[layer], 1, like)
                self._hook(model, s.path(layer, f.down), pre=_scale_input(keep))
        if selection.hidden:
            keep = keep_vector(s.hidden, selection.hidden, 1, like)
            writers = [f.embed] + [
                s.path(i, name) for i in range(s.num_layers) for name in (f.o, f.down)
            ]
            for path in writers:
                self._hook(model, path, forward=_scale_output(keep))
            norms = [f.final_norm] + [
                s.path(i, name) for i in range(s.num_layers) for name in f.hidden_norms
            ]
            for path in norms:
                self._hook(model, path, forward=_renormalise(keep, get_module(model, path)))

    def _hook(self, model, path, *, pre=None, forward=None, with_kwargs=False) -> None:
        module = get_module(model, path)
        if pre is not None:
            self.handles.append(module.register_forward_pre_hook(pre))
        if forward is not None:
            self.handles.append(module.register_forward_hook(forward, with_kwargs=with_kwargs))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


@contextmanager
def masked(model: nn.Module, structure: StructureMap, selection: Selection) -> Iterator[MaskSet]:
    """``with masked(model, s, sel): ...`` runs the pruned view, then restores the dense model."""
    masks = MaskSet(model, structure, selection)
    try:
        yield masks
    finally:
        masks.remove()


def _scale_input(keep: torch.Tensor):
    def hook(module, args):
        return (args[0] * keep.to(args[0].dtype),) + tuple(args[1:])

    return hook


def _scale_output(keep: torch.Tensor):
    def hook(module, args, output):
        return output * keep.to(output.dtype)

    return hook


def _skip_layer(module, args, kwargs, output):
    hidden = args[0] if args else kwargs["hidden_states"]
    if isinstance(output, tuple):
        return (hidden,) + tuple(output[1:])
    return hidden


def norm_eps(norm: nn.Module) -> float:
    return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))


def _renormalise(keep: torch.Tensor, norm: nn.Module):
    """RMSNorm over d channels -> RMSNorm over the kept d' (masked inputs are already zero)."""
    eps = norm_eps(norm)
    d, d_kept = keep.numel(), float(keep.sum())

    def hook(module, args, output):
        x = args[0].float()
        sq = x.pow(2).sum(-1, keepdim=True)
        factor = torch.rsqrt(sq / d_kept + eps) / torch.rsqrt(sq / d + eps)
        return (output.float() * factor * keep.float()).to(output.dtype)

    return hook
