"""Tiny random models of every supported family, built from configs: fast and offline."""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    Qwen2Config,
    Qwen3Config,
)

from explorer.families import family_for
from explorer.structure import StructureMap

VOCAB = 97

CONFIGS = {
    "llama": lambda: LlamaConfig(
        hidden_size=48,
        intermediate_size=40,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=VOCAB,
        tie_word_embeddings=True,
    ),
    "qwen2": lambda: Qwen2Config(
        hidden_size=48,
        intermediate_size=40,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        tie_word_embeddings=False,
    ),
    "qwen3": lambda: Qwen3Config(
        hidden_size=48,
        intermediate_size=40,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=VOCAB,
        tie_word_embeddings=True,
    ),
    "gemma3": lambda: Gemma3TextConfig(
        hidden_size=48,
        intermediate_size=40,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=32,
        query_pre_attn_scalar=32,  # as in the real Gemma3 models: scores scaled by 1/sqrt(head_dim)
        vocab_size=VOCAB,
        sliding_window=8,
    ),
}


def tiny_model(name: str, seed: int = 0, vocab: int = VOCAB):
    """A random fp32 model of family ``name`` with non-trivial norms and biases."""
    torch.manual_seed(seed)
    cfg = CONFIGS[name]()
    cfg.vocab_size = vocab
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname or pname.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))  # random init leaves these at 0/1
    return model


def tiny(name: str, seed: int = 0, vocab: int = VOCAB):
    """(model, structure) for a tiny random model of family ``name``."""
    model = tiny_model(name, seed, vocab)
    return model, StructureMap(model, family_for(model))


def tokens(n: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n, length), generator=g)
