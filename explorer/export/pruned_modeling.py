"""Model classes for pruned exports whose layers differ in size, or carry biases the family lacks.

Transformers builds every decoder layer of a model from one config, so a model whose layers kept
different numbers of heads or MLP channels cannot be described by a plain config. This file is
copied into such an export as ``modeling_pruned.py`` and named by the config's ``auto_map``, so
``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` builds it. It reads two
extra config fields:

- ``layer_sizes``: one ``{"heads", "kv_heads", "intermediate"}`` per layer. Each layer is rebuilt
  by the family's own code from a copy of the config at that layer's sizes, so its forward pass is
  exactly the family's.
- ``extra_biases``: linear modules (paths inside a layer, e.g. ``"mlp.down_proj"``) that carry a
  bias although the family's code creates none, e.g. after FLAP's bias compensation.

Self-contained on purpose: it imports only torch and transformers, so the folder loads on machines
without this project. ``explorer.export.load_pruned`` uses the same classes without remote code.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers.models.gemma3.modeling_gemma3 import Gemma3ForCausalLM
from transformers.models.llama.modeling_llama import LlamaForCausalLM
from transformers.models.mistral.modeling_mistral import MistralForCausalLM
from transformers.models.qwen2.modeling_qwen2 import Qwen2ForCausalLM
from transformers.models.qwen3.modeling_qwen3 import Qwen3ForCausalLM


def build_pruned_layers(model: nn.Module, config) -> None:
    """Rebuild ``model.model.layers`` at ``config.layer_sizes`` and add ``config.extra_biases``.

    Runs inside ``__init__``, so under ``from_pretrained`` the new modules are created on the meta
    device like every other module and then filled from the checkpoint.
    """
    layers = model.model.layers
    for index, sizes in enumerate(getattr(config, "layer_sizes", None) or []):
        sized = copy.deepcopy(config)
        sized.num_attention_heads = sizes["heads"]
        sized.num_key_value_heads = sizes["kv_heads"]
        sized.intermediate_size = sizes["intermediate"]
        layer = type(layers[index])(sized, index)
        # Sizes are fixed at construction; everything read later (the attention implementation,
        # which the user may switch) must come from the model's one shared config.
        for module in layer.modules():
            if getattr(module, "config", None) is sized:
                module.config = config
        layers[index] = layer
    for name in getattr(config, "extra_biases", None) or []:
        for layer in layers:
            linear = layer.get_submodule(name)
            if linear.bias is None:
                linear.bias = nn.Parameter(torch.zeros_like(linear.weight[:, 0]))


class PrunedLayersMixin:
    """Builds the family's model, then resizes its layers; put it before the family's class."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        build_pruned_layers(self, config)
        self.post_init()  # again: weight init and tying must see the rebuilt layers


class PrunedLlamaForCausalLM(PrunedLayersMixin, LlamaForCausalLM):
    """Llama (SmolLM2, Llama 2/3) with per-layer sizes."""


class PrunedMistralForCausalLM(PrunedLayersMixin, MistralForCausalLM):
    """Mistral with per-layer sizes."""


class PrunedQwen2ForCausalLM(PrunedLayersMixin, Qwen2ForCausalLM):
    """Qwen2 / Qwen2.5 with per-layer sizes."""


class PrunedQwen3ForCausalLM(PrunedLayersMixin, Qwen3ForCausalLM):
    """Qwen3 with per-layer sizes."""


class PrunedGemma3ForCausalLM(PrunedLayersMixin, Gemma3ForCausalLM):
    """Gemma 3 (text-only) with per-layer sizes."""


PRUNED_CLASSES: dict[str, type] = {
    "llama": PrunedLlamaForCausalLM,
    "mistral": PrunedMistralForCausalLM,
    "qwen2": PrunedQwen2ForCausalLM,
    "qwen3": PrunedQwen3ForCausalLM,
    "gemma3_text": PrunedGemma3ForCausalLM,
}
