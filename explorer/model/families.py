"""Model families described as data.

A family says where the prunable modules of a decoder-only LM live and which extras it has. Adding a
family is adding one ``Family`` value; every other module reads these names and never hard-codes a
model's layout. ``check_family`` compares the description with the live module shapes when a model
loads, so a wrong description fails at load time, not as silently misaligned pruning.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class Family:
    """Where one family keeps its modules; paths are relative to a decoder layer unless noted."""

    name: str
    model_types: tuple[str, ...]
    q: str = "self_attn.q_proj"
    k: str = "self_attn.k_proj"
    v: str = "self_attn.v_proj"
    o: str = "self_attn.o_proj"
    gate: str = "mlp.gate_proj"
    up: str = "mlp.up_proj"
    down: str = "mlp.down_proj"
    attention: str = "self_attn"
    # Norms over the hidden size inside a layer, in execution order.
    hidden_norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")
    # Norms over head_dim applied per head to queries and keys (Qwen3, Gemma3); untouched by pruning.
    head_norms: tuple[str, ...] = ()
    # Model-level paths.
    layers: str = "model.layers"
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    # Gemma multiplies the embedding output by sqrt(hidden_size) and stores norm weights as w - 1.
    embed_scaled: bool = False
    norm_offset: float = 0.0

    @property
    def linears(self) -> tuple[str, ...]:
        """The seven prunable linear modules of a layer, in execution order."""
        return (self.q, self.k, self.v, self.o, self.gate, self.up, self.down)


LLAMA = Family(name="llama", model_types=("llama", "mistral"))
QWEN = Family(name="qwen", model_types=("qwen2", "qwen3"))
GEMMA3 = Family(
    name="gemma3",
    model_types=("gemma3_text",),
    hidden_norms=(
        "input_layernorm",
        "post_attention_layernorm",
        "pre_feedforward_layernorm",
        "post_feedforward_layernorm",
    ),
    embed_scaled=True,
    norm_offset=1.0,
)
FAMILIES: tuple[Family, ...] = (LLAMA, QWEN, GEMMA3)


def supported_model_types() -> list[str]:
    """Every ``config.model_type`` some family covers."""
    return sorted(t for f in FAMILIES for t in f.model_types)


def family_for(model: nn.Module) -> Family:
    """The family of a loaded model, checked against its live modules."""
    model_type = getattr(model.config, "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            check_family(model, family)
            return family
    raise UnsupportedArchitectureError(
        f"Architecture '{model_type}' is not supported. "
        f"Use a model of one of these types: {', '.join(supported_model_types())}."
    )


def head_norms_of(model: nn.Module, family: Family) -> tuple[str, ...]:
    """The per-head q/k norms this particular model has (Qwen3 has them, Qwen2 does not)."""
    layer = get_module(model, f"{family.layers}.0")
    return tuple(n for n in ("self_attn.q_norm", "self_attn.k_norm") if _has(layer, n))


def get_module(root: nn.Module, path: str) -> nn.Module:
    """``root.get_submodule`` that also accepts the empty path."""
    return root.get_submodule(path) if path else root


def _has(root: nn.Module, path: str) -> bool:
    try:
        root.get_submodule(path)
    except AttributeError:
        return False
    return True


def check_family(model: nn.Module, family: Family) -> None:
    """Raise if the live shapes contradict the description and the config.

    Checks every layer: q/k/v/o and gate/up/down weights must have the shapes that
    ``num_attention_heads``, ``num_key_value_heads``, ``head_dim``, ``intermediate_size`` and
    ``hidden_size`` imply, so that head and channel slices line up with real heads and channels.
    """
    cfg = model.config
    d = cfg.hidden_size
    heads = cfg.num_attention_heads
    kv = cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or d // heads
    inter = cfg.intermediate_size
    if heads % kv:
        raise UnsupportedArchitectureError(
            f"{heads} query heads do not split evenly over {kv} key-value heads. "
            "Check the model's config."
        )
    expected = {
        family.q: (heads * hd, d),
        family.k: (kv * hd, d),
        family.v: (kv * hd, d),
        family.o: (d, heads * hd),
        family.gate: (inter, d),
        family.up: (inter, d),
        family.down: (d, inter),
    }
    layers = get_module(model, family.layers)
    for i, layer in enumerate(layers):
        for path, shape in expected.items():
            if not _has(layer, path):
                raise UnsupportedArchitectureError(
                    f"Layer {i} has no module '{path}' that the {family.name} family expects. "
                    "The model's layout differs from its declared type."
                )
            got = tuple(layer.get_submodule(path).weight.shape)
            if got != shape:
                raise UnsupportedArchitectureError(
                    f"Layer {i} '{path}' has shape {got}, the config implies {shape}. "
                    "The model's layout differs from its declared type."
                )
        for path in family.hidden_norms:
            if not _has(layer, path):
                raise UnsupportedArchitectureError(
                    f"Layer {i} has no norm '{path}' that the {family.name} family expects."
                )
    for path in (family.embed, family.final_norm, family.lm_head):
        if not _has(model, path):
            raise UnsupportedArchitectureError(
                f"The model has no '{path}' that the {family.name} family expects."
            )
