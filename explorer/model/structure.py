"""Discovery: the coupled structures of a decoder-only LM (LLM-Pruner's first stage).

A *group* is a set of weight slices that must be removed together or the model breaks:

- ``head``: one query head: its ``q_proj`` rows (and bias) and ``o_proj`` columns. Removed evenly
  from every kv group so that ``num_attention_heads / num_key_value_heads`` stays an integer.
- ``kv``: one key-value group: its ``k_proj``/``v_proj`` rows and every query head that reads it.
- ``mlp``: one MLP channel: ``gate_proj`` and ``up_proj`` rows and the ``down_proj`` column.
- ``hidden``: one residual channel, shared by every layer, the embeddings and the norms.
- ``layer``: a whole decoder block (depth pruning).

Groups are described by *members*: a parameter and the axis along which the group's units lie in
contiguous blocks. That one description drives scoring (reduce a per-weight score over each block),
masking and slicing, so the three can never disagree about which weights a unit owns.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import networkx as nx
from torch import nn

from .families import Family, get_module, head_norms_of

Kind = Literal["head", "kv", "mlp", "hidden", "layer"]
KINDS: tuple[Kind, ...] = ("head", "kv", "mlp", "hidden", "layer")


@dataclass(frozen=True)
class Member:
    """One parameter of a group kind: unit ``u`` owns ``param[u*block:(u+1)*block]`` along ``dim``."""

    module: str
    param: str
    dim: int
    block: int


@dataclass(frozen=True)
class Slice:
    """The weights one unit owns in one parameter."""

    module: str
    param: str
    dim: int
    start: int
    stop: int


@dataclass(frozen=True)
class Group:
    """One prunable unit: ``kind`` in ``layer`` (None for model-wide kinds), number ``index``."""

    kind: Kind
    layer: int | None
    index: int

    @property
    def key(self) -> str:
        return f"{self.kind}:{'' if self.layer is None else self.layer}:{self.index}"


class StructureMap:
    """The coupled structures of one loaded model, read from its live modules.

    Sizes are those of the dense model; a ``Selection`` says what is removed from it.
    """

    def __init__(self, model: nn.Module, family: Family):
        cfg = model.config
        self.family = family
        self.num_layers: int = cfg.num_hidden_layers
        self.hidden: int = cfg.hidden_size
        self.heads: int = cfg.num_attention_heads
        self.kv_heads: int = cfg.num_key_value_heads
        self.head_dim: int = getattr(cfg, "head_dim", None) or self.hidden // self.heads
        self.group_size: int = self.heads // self.kv_heads
        self.intermediate: int = cfg.intermediate_size
        self.vocab: int = cfg.vocab_size
        embed = get_module(model, family.embed).weight
        self.tied: bool = get_module(model, family.lm_head).weight is embed
        self.head_norms: tuple[str, ...] = head_norms_of(model, family)
        layer0 = get_module(model, self.layer_path(0))
        self.bias: dict[str, bool] = {
            name: layer0.get_submodule(name).bias is not None for name in family.linears
        }
        self._layer_params: int = sum(p.numel() for p in layer0.parameters())
        self._model_params: int = sum(p.numel() for p in model.parameters())

    # -- paths -----------------------------------------------------------------------------------
    def layer_path(self, layer: int) -> str:
        return f"{self.family.layers}.{layer}"

    def path(self, layer: int, name: str) -> str:
        """Dotted path of a module of ``layer`` (``name`` relative to the layer)."""
        return f"{self.layer_path(layer)}.{name}"

    # -- groups ----------------------------------------------------------------------------------
    def units(self, kind: Kind) -> int:
        """How many units of ``kind`` one layer (or the model, for hidden/layer) has."""
        return {
            "head": self.heads,
            "kv": self.kv_heads,
            "mlp": self.intermediate,
            "hidden": self.hidden,
            "layer": self.num_layers,
        }[kind]

    def groups(self, kind: Kind, layer: int | None = None) -> list[Group]:
        if kind in ("hidden", "layer"):
            return [Group(kind, None, i) for i in range(self.units(kind))]
        layers = range(self.num_layers) if layer is None else [layer]
        return [Group(kind, li, i) for li in layers for i in range(self.units(kind))]

    def members(self, kind: Kind, layer: int | None = None) -> list[Member]:
        """The parameters a unit of ``kind`` spans, in execution order (the last is run last)."""
        f = self.family
        hd = self.head_dim
        if kind == "head":
            return self._linear_members(layer, [(f.q, 0)], hd) + self._linear_members(
                layer, [(f.o, 1)], hd
            )
        if kind == "kv":
            block_q = hd * self.group_size
            return (
                self._linear_members(layer, [(f.q, 0)], block_q)
                + self._linear_members(layer, [(f.k, 0), (f.v, 0)], hd)
                + self._linear_members(layer, [(f.o, 1)], block_q)
            )
        if kind == "mlp":
            return self._linear_members(layer, [(f.gate, 0), (f.up, 0), (f.down, 1)], 1)
        if kind == "hidden":
            return self._hidden_members()
        raise ValueError(f"'{kind}' units are whole layers and have no members")

    def _linear_members(self, layer: int | None, spec: list[tuple[str, int]], block: int):
        out = []
        for name, dim in spec:
            out.append(Member(self.path(layer, name), "weight", dim, block))
            if dim == 0 and self.bias[name]:
                out.append(Member(self.path(layer, name), "bias", 0, block))
        return out

    def _hidden_members(self) -> list[Member]:
        f = self.family
        out = [Member(f.embed, "weight", 1, 1)]
        for layer in range(self.num_layers):
            norms = iter(f.hidden_norms)
            out.append(Member(self.path(layer, next(norms)), "weight", 0, 1))
            out += self._linear_members(layer, [(f.q, 1), (f.k, 1), (f.v, 1)], 1)
            out += self._linear_members(layer, [(f.o, 0)], 1)
            # Gemma's sandwich norms: post-attention, then pre-feed-forward; Llama has only one.
            out += [Member(self.path(layer, n), "weight", 0, 1) for n in norms]
            out += self._linear_members(layer, [(f.gate, 1), (f.up, 1), (f.down, 0)], 1)
        out.append(Member(f.final_norm, "weight", 0, 1))
        if not self.tied:
            out.append(Member(f.lm_head, "weight", 1, 1))
        return out

    def slices(self, group: Group) -> list[Slice]:
        """The weight slices one group owns, in execution order."""
        if group.kind == "layer":
            return [Slice(self.layer_path(group.index), "*", 0, 0, 0)]
        return [
            Slice(m.module, m.param, m.dim, group.index * m.block, (group.index + 1) * m.block)
            for m in self.members(group.kind, group.layer)
        ]

    def group_params(self, kind: Kind) -> int:
        """Parameters one unit of ``kind`` owns in the dense model."""
        f, d, hd, b = self.family, self.hidden, self.head_dim, self.bias
        head = hd * (2 * d + b[f.q])
        if kind == "head":
            return head
        if kind == "kv":
            return self.group_size * head + hd * (2 * d + b[f.k] + b[f.v])
        if kind == "mlp":
            return 3 * d + b[f.gate] + b[f.up]
        if kind == "hidden":
            return self._hidden_params_per_channel()
        return self._layer_params

    def _hidden_params_per_channel(self) -> int:
        f = self.family
        per_layer = (
            (self.heads + 2 * self.kv_heads) * self.head_dim  # q/k/v columns
            + self.heads * self.head_dim  # o row
            + 3 * self.intermediate  # gate/up columns, down row
            + len(f.hidden_norms)
            + self.bias[f.o]
            + self.bias[f.down]
        )
        return (
            self.vocab * (1 if self.tied else 2) + 1 + self.num_layers * per_layer
        )  # embeddings, final norm, layers

    @property
    def total_params(self) -> int:
        return self._model_params

    @property
    def block_params(self) -> int:
        """Parameters inside the decoder blocks: what "prune 20%" refers to by default."""
        return self._layer_params * self.num_layers

    # -- the coupling graph ------------------------------------------------------------------------
    @cached_property
    def graph(self) -> nx.DiGraph:
        """Module nodes; an edge where an output dimension of one is an input dimension of another.

        Node attributes: ``layer`` (None for model-wide), ``role``, ``shape`` (out, in). Edge
        attributes: ``kind`` (the group kind that couples the two dimensions). The residual stream is
        one node, since every hidden channel is shared by everything that reads or writes it.
        """
        f = self.family
        g = nx.DiGraph()
        hd = self.head_dim
        d = self.hidden
        g.add_node("embed", layer=None, role="embed", shape=(self.vocab, d))
        g.add_node("residual", layer=None, role="residual", shape=(d,))
        g.add_edge("embed", "residual", kind="hidden")
        shapes = {
            f.q: (self.heads * hd, d),
            f.k: (self.kv_heads * hd, d),
            f.v: (self.kv_heads * hd, d),
            f.o: (d, self.heads * hd),
            f.gate: (self.intermediate, d),
            f.up: (self.intermediate, d),
            f.down: (d, self.intermediate),
        }
        for layer in range(self.num_layers):

            def node(name: str, layer: int = layer) -> str:
                return f"L{layer}.{name.split('.')[-1]}"

            for name, shape in shapes.items():
                g.add_node(node(name), layer=layer, role=name.split(".")[-1], shape=shape)
            for name in f.hidden_norms:
                g.add_node(node(name), layer=layer, role=name.split(".")[-1], shape=(d,))
            # Hidden channels: every reader and writer of the residual stream.
            for name in (f.q, f.k, f.v, f.gate, f.up, *f.hidden_norms):
                g.add_edge("residual", node(name), kind="hidden")
            for name in (f.o, f.down):
                g.add_edge(node(name), "residual", kind="hidden")
            # Heads: q rows and o columns; kv groups: k/v rows with the o columns of their heads.
            g.add_edge(node(f.q), node(f.o), kind="head")
            g.add_edge(node(f.k), node(f.o), kind="kv")
            g.add_edge(node(f.v), node(f.o), kind="kv")
            g.add_edge(node(f.gate), node(f.down), kind="mlp")
            g.add_edge(node(f.up), node(f.down), kind="mlp")
        g.add_node("final_norm", layer=None, role="norm", shape=(d,))
        g.add_node("lm_head", layer=None, role="lm_head", shape=(self.vocab, d), tied=self.tied)
        g.add_edge("residual", "final_norm", kind="hidden")
        g.add_edge("final_norm", "lm_head", kind="hidden")
        return g
