"""A selection: exactly which units go. What a plan allocates, and what masks and slicing apply.

Canonical form: ``heads[l]`` lists every removed query head of layer ``l``, including the heads of
removed kv groups, and ``kv[l]`` the removed kv groups. ``validate`` enforces what transformers
needs to rebuild the model: each kept kv group keeps the same number of query heads, at least one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import PlanError
from ..model.structure import StructureMap


def _sorted_dict(d: dict[int, list[int]] | None) -> dict[int, tuple[int, ...]]:
    return {int(k): tuple(sorted(set(v))) for k, v in (d or {}).items() if len(v)}


@dataclass(frozen=True)
class Selection:
    """Removed units per layer (query heads, kv groups, MLP channels), hidden channels and layers."""

    heads: dict[int, tuple[int, ...]] = field(default_factory=dict)
    kv: dict[int, tuple[int, ...]] = field(default_factory=dict)
    mlp: dict[int, tuple[int, ...]] = field(default_factory=dict)
    hidden: tuple[int, ...] = ()
    layers: tuple[int, ...] = ()

    @classmethod
    def make(
        cls,
        structure: StructureMap,
        *,
        heads: dict[int, list[int]] | None = None,
        kv: dict[int, list[int]] | None = None,
        mlp: dict[int, list[int]] | None = None,
        hidden: list[int] | None = None,
        layers: list[int] | None = None,
    ) -> Selection:
        """Build a canonical, validated selection: the heads of removed kv groups are added."""
        heads_all = {k: set(v) for k, v in (heads or {}).items()}
        for layer, groups in (kv or {}).items():
            for g in groups:
                start = g * structure.group_size
                heads_all.setdefault(layer, set()).update(
                    range(start, start + structure.group_size)
                )
        sel = cls(
            heads=_sorted_dict({k: list(v) for k, v in heads_all.items()}),
            kv=_sorted_dict(kv),
            mlp=_sorted_dict(mlp),
            hidden=tuple(sorted(set(hidden or []))),
            layers=tuple(sorted(set(layers or []))),
        )
        sel.validate(structure)
        return sel

    def validate(self, structure: StructureMap) -> None:
        """Raise ``PlanError`` unless the pruned model can be built."""
        for name, per_layer, n in (
            ("head", self.heads, structure.heads),
            ("kv", self.kv, structure.kv_heads),
        ):
            for layer, idx in per_layer.items():
                _check_range(f"layer {layer} {name}", idx, n)
                _check_range("layer index", [layer], structure.num_layers)
        for layer, idx in self.mlp.items():
            _check_range(f"layer {layer} MLP channel", idx, structure.intermediate)
            _check_range("layer index", [layer], structure.num_layers)
        _check_range("hidden channel", self.hidden, structure.hidden)
        _check_range("layer", self.layers, structure.num_layers)
        if len(self.hidden) >= structure.hidden:
            raise PlanError("The plan removes every hidden channel. Lower the hidden ratio.")
        if len(self.layers) >= structure.num_layers:
            raise PlanError("The plan removes every layer. Keep at least one layer.")
        for layer in range(structure.num_layers):
            if layer in self.layers:
                continue
            counts = self.heads_per_kv_group(structure, layer)
            if not any(counts.values()):
                raise PlanError(
                    f"The plan removes every attention head of layer {layer}. "
                    "Lower that layer's head ratio, or remove the whole layer instead."
                )
            if len(set(counts.values())) > 1 or 0 in counts.values():
                raise PlanError(
                    f"Layer {layer} keeps {sorted(counts.values())} query heads in its kv groups; "
                    "every kept kv group must keep the same number (at least one). "
                    "Remove query heads evenly from every kv group."
                )
            if len(self.mlp.get(layer, ())) >= structure.intermediate:
                raise PlanError(
                    f"The plan removes every MLP channel of layer {layer}. "
                    "Lower that layer's MLP ratio, or remove the whole layer instead."
                )

    def heads_per_kv_group(self, structure: StructureMap, layer: int) -> dict[int, int]:
        """Kept kv group -> how many of its query heads stay."""
        removed = set(self.heads.get(layer, ()))
        out = {}
        for g in range(structure.kv_heads):
            if g in self.kv.get(layer, ()):
                continue
            out[g] = sum(
                h not in removed
                for h in range(g * structure.group_size, (g + 1) * structure.group_size)
            )
        return out

    def kept(self, structure: StructureMap, layer: int) -> dict[str, int]:
        """Sizes of a kept layer after pruning: query heads, kv heads, MLP width."""
        return {
            "heads": structure.heads - len(self.heads.get(layer, ())),
            "kv_heads": structure.kv_heads - len(self.kv.get(layer, ())),
            "intermediate": structure.intermediate - len(self.mlp.get(layer, ())),
        }

    def kept_layers(self, structure: StructureMap) -> list[int]:
        return [i for i in range(structure.num_layers) if i not in self.layers]

    def is_uniform(self, structure: StructureMap) -> bool:
        """True when every kept layer has the same sizes: a plain transformers config fits."""
        return (
            len({tuple(self.kept(structure, i).values()) for i in self.kept_layers(structure)}) <= 1
        )

    @property
    def is_empty(self) -> bool:
        return not (self.heads or self.mlp or self.hidden or self.layers)

    def changed_layers(self, other: Selection) -> list[int]:
        """Layers whose removed units differ between two selections (hidden changes touch all)."""
        layers = set(self.heads) | set(other.heads) | set(self.mlp) | set(other.mlp)
        layers |= set(self.layers) ^ set(other.layers)
        return sorted(
            i
            for i in layers
            if self.heads.get(i) != other.heads.get(i)
            or self.mlp.get(i) != other.mlp.get(i)
            or (i in self.layers) != (i in other.layers)
        )

    # -- serialisation -----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "heads": {str(k): list(v) for k, v in self.heads.items()},
            "kv": {str(k): list(v) for k, v in self.kv.items()},
            "mlp": {str(k): list(v) for k, v in self.mlp.items()},
            "hidden": list(self.hidden),
            "layers": list(self.layers),
        }

    @classmethod
    def from_dict(cls, d: dict, structure: StructureMap) -> Selection:
        def per_layer(key: str) -> dict[int, list[int]]:
            return {int(k): list(v) for k, v in d.get(key, {}).items()}

        return cls.make(
            structure,
            heads=per_layer("heads"),
            kv=per_layer("kv"),
            mlp=per_layer("mlp"),
            hidden=list(d.get("hidden", [])),
            layers=list(d.get("layers", [])),
        )


def _check_range(what: str, idx, n: int) -> None:
    bad = [i for i in idx if not 0 <= int(i) < n]
    if bad:
        raise PlanError(f"{what} index {bad[0]} is out of range 0..{n - 1}.")


# -- sizes ------------------------------------------------------------------------------------------
def layer_params(structure: StructureMap, selection: Selection, layer: int) -> int:
    """Parameters of one decoder layer after ``sel`` (0 for a removed layer)."""
    if layer in selection.layers:
        return 0
    f, b, hd = structure.family, structure.bias, structure.head_dim
    d = structure.hidden - len(selection.hidden)
    k = selection.kept(structure, layer)
    q_out, kv_out, inter = k["heads"] * hd, k["kv_heads"] * hd, k["intermediate"]
    n = q_out * (d + b[f.q]) + 2 * kv_out * d + kv_out * (b[f.k] + b[f.v])
    n += d * (q_out + b[f.o])
    n += inter * (2 * d + b[f.gate] + b[f.up]) + d * (inter + b[f.down])
    n += len(structure.head_norms) * hd + len(f.hidden_norms) * d
    return n


def param_counts(structure: StructureMap, selection: Selection) -> dict[str, int]:
    """Total, decoder-block and embedding parameters after ``sel``."""
    d = structure.hidden - len(selection.hidden)
    blocks = sum(layer_params(structure, selection, i) for i in range(structure.num_layers))
    embeddings = structure.vocab * d * (1 if structure.tied else 2)
    return {"total": blocks + embeddings + d, "blocks": blocks, "embeddings": embeddings}


def flops_per_token(structure: StructureMap, selection: Selection, context: int = 256) -> float:
    """Estimated forward FLOPs per token at an average ``context`` length.

    2 FLOPs per weight of every matrix multiply (the output head included, the embedding lookup
    not), plus attention scores and the weighted sum: 4 * heads * head_dim * context per layer.
    """
    d = structure.hidden - len(selection.hidden)
    total = 2.0 * structure.vocab * d
    for layer in selection.kept_layers(structure):
        norms = (
            len(structure.head_norms) * structure.head_dim + len(structure.family.hidden_norms) * d
        )
        total += 2.0 * (layer_params(structure, selection, layer) - norms)
        total += 4.0 * selection.kept(structure, layer)["heads"] * structure.head_dim * context
    return total
