"""Physical pruning: slice the selected units out of the weights.

The result is an ordinary transformers model with smaller matrices. Every slice comes from the
structure map's members, the same description that masking and scoring use. The config is updated
to the new sizes; when layers differ, ``config.layer_sizes`` lists each layer's sizes (the export
module writes it, and builds models from it).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from ..model.families import get_module
from ..model.structure import StructureMap
from ..planning.selection import Selection


def kept_indices(n: int, removed: tuple[int, ...], block: int = 1) -> torch.Tensor:
    """Indices of the kept elements when ``removed`` units of ``block`` elements go."""
    gone = set(removed)
    return torch.tensor(
        [u * block + j for u in range(n) if u not in gone for j in range(block)], dtype=torch.long
    )


def slice_parameter(module: nn.Module, name: str, dim: int, keep: torch.Tensor) -> None:
    """Keep only ``keep`` along ``dim`` of ``module.<name>``, fixing the module's size attributes."""
    param = getattr(module, name)
    new = nn.Parameter(
        param.data.index_select(dim, keep.to(param.device)).clone(),
        requires_grad=param.requires_grad,
    )
    setattr(module, name, new)
    if isinstance(module, nn.Linear) and name == "weight":
        module.out_features, module.in_features = new.shape
    elif isinstance(module, nn.Embedding):
        module.embedding_dim = new.shape[1]


def prune_model(
    model: nn.Module, structure: StructureMap, selection: Selection, *, inplace: bool = False
) -> nn.Module:
    """Return ``model`` with ``selection`` sliced out (a deep copy unless ``inplace``)."""
    s, f = structure, structure.family
    selection.validate(s)
    if not inplace:
        model = copy.deepcopy(model)
    for layer in selection.kept_layers(s):
        for kind, removed, n in (
            ("head", selection.heads.get(layer, ()), s.heads),
            ("kv", selection.kv.get(layer, ()), s.kv_heads),
            ("mlp", selection.mlp.get(layer, ()), s.intermediate),
        ):
            if not removed:
                continue
            for m in s.members(kind, layer):
                if kind == "kv" and m.module.endswith((f.q, f.o)):
                    continue  # query heads of removed kv groups are listed under "head"
                keep = kept_indices(n, removed, m.block)
                slice_parameter(get_module(model, m.module), m.param, m.dim, keep)
        attn = get_module(model, s.path(layer, f.attention))
        kept = selection.kept(s, layer)
        attn.num_key_value_groups = kept["heads"] // kept["kv_heads"]
    if selection.hidden:
        _prune_hidden(model, s, selection)
    if selection.layers:
        _remove_layers(model, s, selection)
    _update_config(model, s, selection)
    return model


def _prune_hidden(model: nn.Module, s: StructureMap, selection: Selection) -> None:
    f = s.family
    keep = kept_indices(s.hidden, selection.hidden)
    for m in s.members("hidden"):
        slice_parameter(get_module(model, m.module), m.param, m.dim, keep)
    embed = get_module(model, f.embed)
    if s.tied:
        get_module(model, f.lm_head).weight = embed.weight
    if f.embed_scaled:
        # The rebuilt model scales embeddings by sqrt(d') instead of sqrt(d): fold the difference
        # into the embedding, and, when the output head shares it, undo it in the final norm.
        d, d_kept = s.hidden, s.hidden - len(selection.hidden)
        ratio = math.sqrt(d / d_kept)
        with torch.no_grad():
            embed.weight.mul_(ratio)
            embed.embed_scale.fill_(math.sqrt(d_kept))
            if hasattr(embed, "scalar_embed_scale"):
                embed.scalar_embed_scale = math.sqrt(d_kept)
            if s.tied:
                norm = get_module(model, f.final_norm).weight
                norm.copy_((norm + f.norm_offset) / ratio - f.norm_offset)


def _remove_layers(model: nn.Module, s: StructureMap, selection: Selection) -> None:
    f = s.family
    parent_path, _, name = f.layers.rpartition(".")
    parent = get_module(model, parent_path)
    kept = selection.kept_layers(s)
    layers = get_module(model, f.layers)
    setattr(parent, name, nn.ModuleList([layers[i] for i in kept]))
    for new_index, layer in enumerate(getattr(parent, name)):
        attn = layer.get_submodule(f.attention)
        attn.layer_idx = new_index
        if hasattr(layer, "layer_idx"):
            layer.layer_idx = new_index
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in kept]


def layer_sizes(structure: StructureMap, selection: Selection) -> list[dict[str, int]]:
    """Each kept layer's sizes, in the new layer order."""
    return [selection.kept(structure, i) for i in selection.kept_layers(structure)]


def _update_config(model: nn.Module, s: StructureMap, selection: Selection) -> None:
    cfg = model.config
    sizes = layer_sizes(s, selection)
    cfg.head_dim = s.head_dim  # explicit: hidden / heads no longer gives it
    cfg.hidden_size = s.hidden - len(selection.hidden)
    cfg.num_hidden_layers = len(sizes)
    widest = {k: max(size[k] for size in sizes) for k in sizes[0]}
    cfg.num_attention_heads = widest["heads"]
    cfg.num_key_value_heads = widest["kv_heads"]
    cfg.intermediate_size = widest["intermediate"]
    if selection.is_uniform(s):
        if hasattr(cfg, "layer_sizes"):
            del cfg.layer_sizes
    else:
        cfg.layer_sizes = sizes
