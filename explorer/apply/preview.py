"""Live preview: the pruned view's perplexity, recomputed only from the first layer that changed.

A slider moves one layer's ratio; every layer before it computes exactly what it computed last
time. ``LivePreview`` keeps, for the current view, the hidden states of the evaluation windows at
layer boundaries, and on a new selection restarts each batch from the last kept boundary at or
before the first changed layer, streaming the running perplexity batch by batch.

The decoder layers are called directly with the keyword arguments the model itself passed them
(captured once with hooks: masks, rotary embeddings, whatever the family needs), so the result is
the model's own computation, batch for batch, and equals a full recompute to float precision.

Memory is bounded by ``max_cache_bytes``: boundaries are kept every ``stride`` layers, the stride
chosen so the states fit; a larger stride only means recomputing a few more layers.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from typing import Protocol

import torch
from torch import nn

from ..evaluate import PerplexityStep, model_device, window_nll
from ..model.families import get_module
from ..model.structure import StructureMap
from ..planning.selection import Selection
from .masking import masked


class Patch(Protocol):
    """Weight patches applied to a view (the live recovery steps, ``explorer.recovery.live``)."""

    key: str  # what the patches compute: a view with another key restarts from scratch

    def applied(self, selection: Selection) -> AbstractContextManager: ...


class LivePreview:
    """Incremental perplexity of pruned views of one model over fixed evaluation windows."""

    def __init__(
        self,
        model: nn.Module,
        structure: StructureMap,
        windows: torch.Tensor,
        *,
        batch_size: int = 4,
        max_cache_bytes: int = 512 * 2**20,
    ):
        self.model, self.structure, self.batch_size = model, structure, batch_size
        self.windows = windows
        self.layers = get_module(model, structure.family.layers)
        self.num_batches = math.ceil(windows.shape[0] / batch_size)
        per_boundary = windows.numel() * structure.hidden * _itemsize(model)
        boundaries = structure.num_layers + 1
        fit = max(1, max_cache_bytes // max(per_boundary, 1))
        self.stride = max(1, math.ceil(boundaries / fit))
        self._kwargs: list[list[dict]] = []  # per batch, per layer: the layer's call kwargs
        self._states: list[dict[int, torch.Tensor]] = []  # per batch: boundary -> hidden state
        self._nll: list[float] = []
        self._current: Selection | None = None
        self._patch_key: str | None = None  # which live recovery steps the cached view has

    @property
    def cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for b in self._states for t in b.values())

    def _restart_layer(self, selection: Selection, patch_key: str | None) -> int:
        """First layer whose input may differ from the cached view's (num_layers: none).

        A live step's patches of a layer depend on that layer's removals only, so with the same
        steps the first changed layer is still where the views part.
        """
        if self._current is None or selection.hidden != self._current.hidden:
            return -1  # the embeddings themselves change: start from scratch
        if patch_key != self._patch_key:
            return -1
        changed = selection.changed_layers(self._current)
        return min(changed) if changed else self.structure.num_layers

    def run(
        self,
        selection: Selection,
        compensation: Patch | None = None,
        observe: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
    ) -> Iterator[PerplexityStep]:
        """Yield the running perplexity of ``selection``'s view after each batch of windows.

        ``compensation``: the live recovery steps, applied to the view (see
        ``explorer.recovery.live``). ``observe(batch, logits, ids)`` sees each recomputed batch's
        logits (the sensitivity sweep's KL divergence); an unchanged view replays without them.
        """
        key = compensation.key if compensation is not None else None
        start = self._restart_layer(selection, key)
        if start == self.structure.num_layers:
            yield from self._replay()
            return
        if start < 0:
            self._kwargs, self._states = [[] for _ in range(self.num_batches)], []
            self._states = [{} for _ in range(self.num_batches)]
            self._nll = [0.0] * self.num_batches
        total, nll, tokens = self.windows.shape[0], 0.0, 0
        self._current = None  # a cancelled run leaves no half-updated view behind
        patched = compensation.applied(selection) if compensation is not None else nullcontext()
        with torch.no_grad(), masked(self.model, self.structure, selection), patched:
            for b in range(self.num_batches):
                ids = self.batch(b)
                logits = self._full(b, ids) if start < 0 else self._from(b, start)
                if observe is not None:
                    observe(b, logits, ids)
                self._nll[b] = float(window_nll(logits, ids).sum())
                nll += self._nll[b]
                tokens += ids.numel() - ids.shape[0]
                done = min((b + 1) * self.batch_size, total)
                yield PerplexityStep(done, total, nll, tokens)
        self._current, self._patch_key = selection, key

    def _from(self, b: int, start: int) -> torch.Tensor:
        """Logits of batch ``b``, running the layers from the kept boundary at or before ``start``."""
        begin = (start // self.stride) * self.stride
        hidden = self._states[b][begin]
        for layer in range(begin, self.structure.num_layers):
            hidden = _first(self.layers[layer](hidden, **self._kwargs[b][layer]))
            if (layer + 1) % self.stride == 0:
                self._states[b][layer + 1] = hidden
        return self.logits(hidden)

    def _full(self, b: int, ids: torch.Tensor) -> torch.Tensor:
        """The model's own forward, recording each layer's call kwargs and kept input states."""
        calls: list[dict] = [{} for _ in range(self.structure.num_layers)]
        handles = [
            layer.register_forward_pre_hook(self._recorder(b, i, calls), with_kwargs=True)
            for i, layer in enumerate(self.layers)
        ]
        try:
            logits = self.model(ids, use_cache=False).logits
        finally:
            for h in handles:
                h.remove()
        self._kwargs[b] = calls
        return logits

    def _recorder(self, b: int, index: int, calls: list[dict]):
        def hook(module, args, kwargs):
            kwargs = dict(kwargs)
            hidden = args[0] if args else kwargs.pop("hidden_states")
            calls[index] = kwargs
            if index % self.stride == 0:
                self._states[b][index] = hidden

        return hook

    def perplexity(
        self,
        selection: Selection,
        compensation: Patch | None = None,
        observe: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
    ) -> float:
        return deque(self.run(selection, compensation, observe), maxlen=1)[0].perplexity

    def _replay(self) -> Iterator[PerplexityStep]:
        nll, tokens, total = 0.0, 0, self.windows.shape[0]
        for b in range(self.num_batches):
            ids = self.batch(b)
            nll += self._nll[b]
            tokens += ids.numel() - ids.shape[0]
            yield PerplexityStep(min((b + 1) * self.batch_size, total), total, nll, tokens)

    def kept_state(self, batch: int, boundary: int) -> torch.Tensor | None:
        """The cached hidden state of ``batch`` entering layer ``boundary`` (None if not kept).

        ``boundary`` = ``num_layers`` is the last layer's output, what the output head reads.
        """
        return self._states[batch].get(boundary) if batch < len(self._states) else None

    def batch(self, index: int) -> torch.Tensor:
        """Evaluation windows of batch ``index``, on the model's device."""
        start = index * self.batch_size
        return self.windows[start : start + self.batch_size].to(model_device(self.model))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The output head (final norm, lm_head, soft-capping) on a last-layer hidden state."""
        f = self.structure.family
        hidden = get_module(self.model, f.final_norm)(hidden)
        logits = get_module(self.model, f.lm_head)(hidden)
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def _itemsize(model: nn.Module) -> int:
    return next(model.parameters()).element_size()
