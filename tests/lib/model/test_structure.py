"""Discovery, masking and slicing agree, for every family and every group kind."""

import pytest
import torch

from explorer.apply.masking import masked
from explorer.apply.pruning import prune_model
from explorer.errors import PlanError, UnsupportedArchitectureError
from explorer.model.families import family_for
from explorer.model.structure import StructureMap
from explorer.planning.selection import Selection, param_counts
from tests.tiny import CONFIGS, tiny, tiny_model, tokens

FAMILIES = list(CONFIGS)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


SELECTIONS = {
    "head": lambda s: (
        Selection.make(
            s,
            heads={
                0: list(range(1, s.heads, s.group_size)),
                2: list(range(0, s.heads, s.group_size)),
            },
        )
        if s.group_size > 1
        else None
    ),
    "kv": lambda s: Selection.make(s, kv={1: [1]}) if s.kv_heads > 1 else None,
    "mlp": lambda s: Selection.make(s, mlp={0: [1, 5, 7], 2: list(range(20))}),
    "hidden": lambda s: Selection.make(s, hidden=[0, 3, 17, 40]),
    "layer": lambda s: Selection.make(s, layers=[1]),
    "mixed": lambda s: Selection.make(
        s, mlp={1: [0, 2]}, hidden=[5, 6], layers=[0], kv={2: [0]} if s.kv_heads > 1 else {}
    ),
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", list(SELECTIONS))
def test_slicing_equals_masking(family, kind):
    model, s = tiny(family)
    sel = SELECTIONS[kind](s)
    if sel is None:
        pytest.skip(f"{family} has no {kind} groups to remove")
    ids = tokens()
    dense = logits(model, ids)
    with masked(model, s, sel):
        masked_logits = logits(model, ids)
    assert torch.equal(logits(model, ids), dense), "masks must be removable"
    pruned = prune_model(model, s, sel)
    sliced = logits(pruned, ids)
    assert (sliced - masked_logits).abs().max().item() < 1e-4
    assert (sliced - dense).abs().max().item() > 1e-3, "the selection must change the model"
    assert sum(p.numel() for p in pruned.parameters()) == param_counts(s, sel)["total"]
    assert torch.equal(logits(model, ids), dense), "pruning a copy leaves the source alone"


@pytest.mark.parametrize("family", FAMILIES)
def test_family_description_matches_live_model(family):
    model, s = tiny(family)
    cfg = model.config
    assert family_for(model).name == {"qwen2": "qwen", "qwen3": "qwen"}.get(family, family)
    assert s.num_layers == cfg.num_hidden_layers and s.heads == cfg.num_attention_heads
    assert s.total_params == sum(p.numel() for p in model.parameters())
    assert param_counts(s, Selection())["total"] == s.total_params
    # A unit's parameter count is what slicing it out removes.
    for kind in ("head", "kv", "mlp", "hidden"):
        if kind == "head" and s.group_size == 1 or kind == "kv" and s.kv_heads == 1:
            continue
        sel = SELECTIONS[kind](s)
        n_units = (
            len(sel.hidden)
            if kind == "hidden"
            else sum(len(v) for v in getattr(sel, kind if kind != "head" else "heads").values())
        )
        removed = s.total_params - param_counts(s, sel)["total"]
        assert removed == n_units * s.group_params(kind)
    assert s.group_params("layer") * s.num_layers == s.block_params


def test_qwen3_has_head_norms_and_qwen2_biases():
    _, s3 = tiny("qwen3")
    _, s2 = tiny("qwen2")
    assert s3.head_norms == ("self_attn.q_norm", "self_attn.k_norm")
    assert s2.bias[s2.family.q] and not s2.bias[s2.family.o]
    assert not tiny("gemma3")[1].tied or tiny("gemma3")[1].family.embed_scaled


def test_members_and_slices_name_the_right_weights():
    model, s = tiny("llama")
    slices = s.slices(s.groups("kv", 1)[1])
    names = [(x.module.split(".")[-1], x.dim, x.start, x.stop) for x in slices]
    g = s.group_size * s.head_dim
    assert names == [
        ("q_proj", 0, g, 2 * g),
        ("k_proj", 0, 8, 16),
        ("v_proj", 0, 8, 16),
        ("o_proj", 1, g, 2 * g),
    ]
    assert [x.module.split(".")[-1] for x in s.slices(s.groups("mlp", 0)[3])] == [
        "gate_proj",
        "up_proj",
        "down_proj",
    ]


def test_graph_couples_modules():
    _, s = tiny("gemma3")
    g = s.graph
    assert g.edges["L0.q_proj", "L0.o_proj"]["kind"] == "head"
    assert g.edges["L2.k_proj", "L2.o_proj"]["kind"] == "kv"
    assert g.edges["L1.up_proj", "L1.down_proj"]["kind"] == "mlp"
    assert g.has_edge("residual", "L1.pre_feedforward_layernorm")
    assert g.number_of_nodes() == 3 * (7 + 4) + 4


def test_bad_selections_are_refused():
    _, s = tiny("llama")
    with pytest.raises(PlanError, match="every attention head of layer 0"):
        Selection.make(s, kv={0: [0, 1]})
    with pytest.raises(PlanError, match="same number"):
        Selection.make(s, heads={0: [0]})
    with pytest.raises(PlanError, match="every MLP channel"):
        Selection.make(s, mlp={1: list(range(s.intermediate))})
    with pytest.raises(PlanError, match="out of range"):
        Selection.make(s, mlp={1: [s.intermediate]})
    with pytest.raises(PlanError, match="every layer"):
        Selection.make(s, layers=[0, 1, 2])
    # Removing the whole layer is the way to empty it.
    Selection.make(s, kv={0: [0, 1]}, layers=[0])


def test_selection_round_trips():
    _, s = tiny("llama")
    sel = Selection.make(s, kv={1: [0]}, mlp={2: [3, 1]}, hidden=[4], layers=[0])
    assert Selection.from_dict(sel.to_dict(), s) == sel


def test_unsupported_architecture_names_supported_ones():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedArchitectureError, match="llama"):
        family_for(model)


def test_wrong_description_fails_at_load():
    model = tiny_model("llama")
    model.config.intermediate_size = 41
    with pytest.raises(UnsupportedArchitectureError, match="shape"):
        StructureMap(model, family_for(model))
