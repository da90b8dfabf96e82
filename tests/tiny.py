"""The one tiny-model factory: random models of every supported family, fast and offline.

Every test that needs a model builds it here (``tiny``/``tiny_model``; the ``tiny_llama_dir``
fixture saves one to disk), so the shapes the suite runs on are defined in one place.
"""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

from explorer.model.families import family_for
from explorer.model.structure import StructureMap

VOCAB = 97

CONFIGS = {
    "llama": (
        LlamaConfig,
        dict(
            hidden_size=48,
            intermediate_size=40,
            num_hidden_layers=3,
            num_attention_heads=6,
            num_key_value_heads=2,
            head_dim=8,
            vocab_size=VOCAB,
            tie_word_embeddings=True,
        ),
    ),
    "qwen2": (
        Qwen2Config,
        dict(
            hidden_size=48,
            intermediate_size=40,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=VOCAB,
            tie_word_embeddings=False,
        ),
    ),
    "qwen3": (
        Qwen3Config,
        dict(
            hidden_size=48,
            intermediate_size=40,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            vocab_size=VOCAB,
            tie_word_embeddings=True,
        ),
    ),
    "gemma3": (
        Gemma3TextConfig,
        dict(
            hidden_size=48,
            intermediate_size=40,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=32,
            vocab_size=VOCAB,
            sliding_window=8,
        ),
    ),
}
# Families one test covers on its own, outside the parametrised ones above.
EXTRA_CONFIGS = {
    "mistral": (
        MistralConfig,
        dict(
            hidden_size=48,
            intermediate_size=40,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=12,
            vocab_size=VOCAB,
        ),
    ),
}


def tiny_config(name: str, **fields):
    """The tiny config of family ``name``, with ``fields`` replacing its defaults."""
    config_class, defaults = {**CONFIGS, **EXTRA_CONFIGS}[name]
    return config_class(**{**defaults, **fields})


def tiny_model(name: str, seed: int = 0, *, perturb: bool = True, **fields):
    """A random fp32 model of family ``name`` (config ``fields`` as in ``tiny_config``).

    ``perturb`` gives it non-trivial norms and biases, which random init leaves at 1 and 0.
    """
    torch.manual_seed(seed)
    cfg = tiny_config(name, **fields)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    if not perturb:
        return model
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname or pname.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))  # random init leaves these at 0/1
    return model


def tiny(name: str, seed: int = 0):
    """(model, structure) for a tiny random model of family ``name``."""
    model = tiny_model(name, seed)
    return model, StructureMap(model, family_for(model))


def tokens(n: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n, length), generator=g)
