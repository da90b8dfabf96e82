"""Every built-in criterion and reduction against numbers worked out by hand or by explicit loops."""

import math

import pytest
import torch

from explorer.catalogue import CRITERIA
from explorer.errors import PlanError
from explorer.model.families import get_module
from explorer.scoring.base import (
    REDUCTIONS,
    Needs,
    ScoreContext,
    reduce,
)
from explorer.scoring.statistics import Statistics
from tests.tiny import tiny

ALL_KINDS = ("head", "kv", "mlp", "hidden", "layer")
HELD = Needs(gradients=True, fisher=True, input_moments=True, hidden_states=True, embeddings=True)


def score(name, model, s, stats, reduction="sum", kinds=ALL_KINDS, seed=0):
    ctx = ScoreContext(model, s, stats, reduction=reduction, seed=seed, kinds=kinds)
    return CRITERIA[name].score(ctx)


def test_reductions_on_a_hand_example():
    parts = [torch.tensor([1.0, 2.0, 0.0]), torch.tensor([3.0, 0.5, 4.0])]
    assert reduce(parts, "sum").tolist() == [4.0, 2.5, 4.0]
    assert reduce(parts, "prod").tolist() == [3.0, 1.0, 0.0]
    assert reduce(parts, "max").tolist() == [3.0, 2.0, 4.0]
    assert reduce(parts, "last").tolist() == [3.0, 0.5, 4.0]
    with pytest.raises(ValueError):
        reduce(parts, "mean")


def test_the_builtin_criteria_are_registered():
    assert {"random", "l1", "l2", "taylor", "taylor_e1", "taylor_e2", "wanda_sp"} <= set(
        CRITERIA.names()
    )
    for name in CRITERIA.names():
        crit = CRITERIA[name]
        assert crit.formula and crit.title
    with pytest.raises(PlanError, match="Unknown criterion"):
        CRITERIA["nope"]


# -- a layer small enough to score by hand ------------------------------------------------------------
# Llama tiny: hidden 48, 6 query heads of 8 dims in 2 kv groups of 3 heads, 40 MLP channels.
# Layer 0 is zero except: q rows of head 1 = 0.5, o columns of head 1 = -1, down column 3 = 2.
# Mean gradients: q alternates +1/-1 along its columns, o is -1, down is 0.25; Fisher diagonals:
# q 4, o 2, down 1; input ‖X_:,j‖² = 4 for o, 9 for down; Σ cos(h_l, h_l+1) = 20, 30, 40 of 40.
T, N, TOKENS = 36, 2, 40


def hand_case():
    model, s = tiny("llama")
    q, o, down = (s.path(0, n) for n in (s.family.q, s.family.o, s.family.down))
    with torch.no_grad():
        for p in get_module(model, s.layer_path(0)).parameters():
            p.zero_()
        get_module(model, q).weight[8:16] = 0.5
        get_module(model, o).weight[:, 8:16] = -1.0
        get_module(model, down).weight[:, 3] = 2.0
    stats = Statistics(needs=HELD, samples=N, tokens=TOKENS, loss_tokens=T)
    for name, p in model.named_parameters(remove_duplicate=False):
        stats.gradients[name] = torch.zeros_like(p)
        stats.fisher[name] = torch.zeros_like(p)
    stats.gradients[f"{q}.weight"][:, 0::2] = T
    stats.gradients[f"{q}.weight"][:, 1::2] = -T
    stats.gradients[f"{o}.weight"].fill_(-T)
    stats.gradients[f"{down}.weight"].fill_(0.25 * T)
    stats.fisher[f"{q}.weight"].fill_(4.0 * N)
    stats.fisher[f"{o}.weight"].fill_(2.0 * N)
    stats.fisher[f"{down}.weight"].fill_(1.0 * N)
    for layer in range(s.num_layers):
        for name in s.family.linears:
            path = s.path(layer, name)
            n_in = get_module(model, path).in_features
            stats.input_sum[path] = torch.zeros(n_in)
            stats.input_sq_sum[path] = torch.ones(n_in)
    stats.input_sq_sum[o].fill_(4.0)
    stats.input_sq_sum[down].fill_(9.0)
    stats.cos_sum = {0: torch.tensor(20.0), 1: torch.tensor(30.0), 2: torch.tensor(40.0)}
    return model, s, stats


# criterion -> (head 1 slices [q, o], kv group 0 slices [q, k, v, o], MLP 3 slices [gate, up, down],
# layer 0), each worked out from the numbers above.
HAND = {
    # |0.5| on 8x48 q weights = 192; |-1| on 48x8 o weights = 384; |2| on 48 down weights = 96.
    "l1": ([192, 384], [192, 0, 0, 384], [0, 0, 96], 672),
    # 0.25 * 384 = 96; 384; 4 * 48 = 192.
    "l2": ([96, 384], [96, 0, 0, 384], [0, 0, 192], 672),
    # q: the signs cancel inside the abs; o: |Σ (-1)(-1)| = 384; down: |Σ 0.25 * 2| = 24.
    "taylor": ([0, 384], [0, 0, 0, 384], [0, 0, 24], 408),
    "taylor_e1": ([192, 384], [192, 0, 0, 384], [0, 0, 24], 600),
    # q: |±0.5 - ½·0.25·4| is 0 or 1, half of 384 weights: 192; o: |1 - ½·1·2| = 0;
    # down: |0.5 - ½·4·1| = 1.5 on 48 weights = 72.
    "taylor_e2": ([192, 0], [192, 0, 0, 0], [0, 0, 72], 264),
}


def hand_reduce(parts: list[float], reduction: str) -> float:
    return {"sum": sum, "prod": math.prod, "max": max, "last": lambda p: p[-1]}[reduction](parts)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", list(HAND))
def test_element_wise_criteria_by_hand(name, reduction):
    model, s, stats = hand_case()
    head, kv, mlp, layer = HAND[name]
    got = score(name, model, s, stats, reduction)
    assert got["head"][0, 1].item() == pytest.approx(hand_reduce(head, reduction))
    assert got["kv"][0, 0].item() == pytest.approx(hand_reduce(kv, reduction))
    assert got["mlp"][0, 3].item() == pytest.approx(hand_reduce(mlp, reduction))
    assert got["layer"][0].item() == pytest.approx(layer)
    # Units whose weights are all zero score zero, whatever the reduction.
    for kind, unit in (("head", 0), ("head", 5), ("kv", 1), ("mlp", 0)):
        assert got[kind][0, unit].item() == 0.0


def test_wanda_sp_by_hand():
    model, s, stats = hand_case()
    for reduction in REDUCTIONS:  # ignored: one slice per unit
        got = score("wanda_sp", model, s, stats, reduction)
        assert got["head"][0].tolist() == [0, 384 * 2, 0, 0, 0, 0]  # Σ |W_o| · ‖X‖ = 384 · 2
        assert got["kv"][0].tolist() == [768, 0]
        assert got["mlp"][0, 3].item() == 48 * 2 * 3
        assert got["mlp"][0].sum().item() == 288
        assert got["layer"].tolist() == [0.5, 0.25, 0.0]  # 1 - Σcos / tokens
    assert not CRITERIA["wanda_sp"].uses_reduction


def test_norms_are_scored_at_their_effective_value():
    """Gemma stores norm weights as w - 1: a stored -1 is a norm that zeroes its input."""
    model, s = tiny("gemma3")
    with torch.no_grad():
        for p in get_module(model, s.layer_path(0)).parameters():
            p.zero_()
    ctx = ScoreContext(model, s, None, kinds=("layer",))
    norm_weights = 4 * s.hidden + 2 * s.head_dim  # four sandwich norms, q_norm and k_norm
    assert CRITERIA["l1"].score(ctx)["layer"][0].item() == norm_weights
    with torch.no_grad():
        for name, p in get_module(model, s.layer_path(0)).named_parameters():
            if "norm" in name:
                p.fill_(-1.0)
    assert CRITERIA["l1"].score(ctx)["layer"][0].item() == 0.0


# -- every unit of every kind, against explicit loops -------------------------------------------------
def random_stats(model, s) -> Statistics:
    g = torch.Generator().manual_seed(7)
    stats = Statistics(needs=HELD, samples=3, tokens=30, loss_tokens=27)
    drawn: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):  # tied names share tensors
        if id(p) not in drawn:
            drawn[id(p)] = (
                torch.randn(p.shape, generator=g),
                30 * torch.rand(p.shape, generator=g),
            )
        stats.gradients[name], stats.fisher[name] = drawn[id(p)]
    for layer in range(s.num_layers):
        for name in s.family.linears:
            path = s.path(layer, name)
            n_in = get_module(model, path).in_features
            stats.input_sum[path] = torch.zeros(n_in)
            stats.input_sq_sum[path] = 10 * torch.rand(n_in, generator=g)
        stats.cos_sum[layer] = 30 * torch.rand((), generator=g)
    return stats


def by_hand(model, stats, name):
    """The per-weight score of ``name`` and what is done to each slice sum, written out again."""

    def value(path, param):
        return get_module(model, path).get_parameter(param).detach()

    def first(path, param):
        return stats.gradients[f"{path}.{param}"] / stats.loss_tokens * value(path, param)

    def e2(path, param):
        fisher = stats.fisher[f"{path}.{param}"] / stats.samples
        return (first(path, param) - 0.5 * value(path, param) ** 2 * fisher).abs()

    return {
        "l1": (lambda p, n: value(p, n).abs(), float),
        "l2": (lambda p, n: value(p, n) ** 2, float),
        "taylor": (first, abs),
        "taylor_e1": (lambda p, n: first(p, n).abs(), float),
        "taylor_e2": (e2, float),
    }[name]


def unit_slices(s, kind, layer, u):
    """(module, param, index) of each slice unit ``u`` owns, in execution order (Llama/Qwen2)."""
    hd, gs = s.head_dim, s.group_size
    attn = s.layer_path(layer) + ".self_attn."
    mlp = s.layer_path(layer) + ".mlp."
    every = slice(None)
    if kind in ("head", "kv"):
        q = slice(u * hd * (gs if kind == "kv" else 1), (u + 1) * hd * (gs if kind == "kv" else 1))
        kv = slice(u * hd, (u + 1) * hd)
        out = [(attn + "q_proj", "weight", (q, every))]
        out += [(attn + "q_proj", "bias", (q,))] if s.bias["self_attn.q_proj"] else []
        if kind == "kv":
            for m in ("k_proj", "v_proj"):
                out.append((attn + m, "weight", (kv, every)))
                out += [(attn + m, "bias", (kv,))] if s.bias[f"self_attn.{m}"] else []
        return out + [(attn + "o_proj", "weight", (every, q))]
    if kind == "mlp":
        return [
            (mlp + "gate_proj", "weight", (u, every)),
            (mlp + "up_proj", "weight", (u, every)),
            (mlp + "down_proj", "weight", (every, u)),
        ]
    out = [("model.embed_tokens", "weight", (every, u))]  # hidden channel u
    for layer in range(s.num_layers):
        attn = s.layer_path(layer) + ".self_attn."
        mlp = s.layer_path(layer) + ".mlp."
        out.append((s.layer_path(layer) + ".input_layernorm", "weight", (u,)))
        out += [(attn + m, "weight", (every, u)) for m in ("q_proj", "k_proj", "v_proj")]
        out.append((attn + "o_proj", "weight", (u, every)))
        out.append((s.layer_path(layer) + ".post_attention_layernorm", "weight", (u,)))
        out += [(mlp + m, "weight", (every, u)) for m in ("gate_proj", "up_proj")]
        out.append((mlp + "down_proj", "weight", (u, every)))
    out.append(("model.norm", "weight", (u,)))
    return out + ([] if s.tied else [("lm_head", "weight", (every, u))])


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", list(HAND))
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_element_wise_criteria_by_loops(family, name, reduction):
    model, s = tiny(family)
    stats = random_stats(model, s)
    per_weight, finish = by_hand(model, stats, name)
    got = score(name, model, s, stats, reduction)
    for kind in ("head", "kv", "mlp", "hidden"):
        layers = [None] if kind == "hidden" else range(s.num_layers)
        for layer in layers:
            for u in range(s.units(kind)):
                parts = [
                    finish(per_weight(m, p)[idx].sum().item())
                    for m, p, idx in unit_slices(s, kind, layer, u)
                ]
                want = hand_reduce(parts, reduction)
                have = got[kind][u] if layer is None else got[kind][layer, u]
                assert have.item() == pytest.approx(want, rel=1e-4, abs=1e-30), (kind, layer, u)
    for layer in range(s.num_layers):
        block = get_module(model, s.layer_path(layer))
        total = 0.0
        for pname, _ in block.named_parameters():
            module, _, param = f"{s.layer_path(layer)}.{pname}".rpartition(".")
            total += per_weight(module, param).sum().item()
        assert got["layer"][layer].item() == pytest.approx(finish(total), rel=1e-4)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_wanda_sp_by_loops(family):
    model, s = tiny(family)
    stats = random_stats(model, s)
    got = score("wanda_sp", model, s, stats)
    hd = s.head_dim

    def wanda(layer, name, cols):
        path = s.path(layer, name)
        w = get_module(model, path).weight.detach()
        norm = stats.input_sq_sum[path].sqrt()
        return sum((w[:, j].abs() * norm[j]).sum().item() for j in cols)

    for layer in range(s.num_layers):
        for h in range(s.heads):
            want = wanda(layer, "self_attn.o_proj", range(h * hd, (h + 1) * hd))
            assert got["head"][layer, h].item() == pytest.approx(want, rel=1e-4)
        for g in range(s.kv_heads):
            heads = range(g * s.group_size, (g + 1) * s.group_size)
            assert got["kv"][layer, g].item() == pytest.approx(
                sum(got["head"][layer, h].item() for h in heads), rel=1e-4
            )
        for c in range(s.intermediate):
            want = wanda(layer, "mlp.down_proj", [c])
            assert got["mlp"][layer, c].item() == pytest.approx(want, rel=1e-4)
        bi = 1 - stats.cos_sum[layer].item() / stats.tokens
        assert got["layer"][layer].item() == pytest.approx(bi, rel=1e-6)
    readers = [f"self_attn.{m}_proj" for m in "qkv"] + ["mlp.gate_proj", "mlp.up_proj"]
    for c in range(s.hidden):
        want = sum(wanda(layer, m, [c]) for layer in range(s.num_layers) for m in readers)
        assert got["hidden"][c].item() == pytest.approx(want, rel=1e-4)


def test_random_is_seeded_and_independent_of_the_kinds_asked():
    model, s = tiny("llama")
    a = score("random", model, s, None, seed=3)
    assert torch.equal(a["mlp"], score("random", model, s, None, seed=3, kinds=("mlp",))["mlp"])
    assert not torch.equal(a["mlp"], score("random", model, s, None, seed=4)["mlp"])
    assert {k: tuple(v.shape) for k, v in a.items()} == {
        "head": (3, 6),
        "kv": (3, 2),
        "mlp": (3, 40),
        "hidden": (48,),
        "layer": (3,),
    }
    assert all(((v >= 0) & (v < 1)).all() for v in a.values())
    assert not CRITERIA["random"].uses_reduction


@pytest.mark.parametrize("name", ["taylor", "taylor_e2", "wanda_sp"])
def test_criteria_refuse_missing_statistics(name):
    model, s = tiny("llama")
    with pytest.raises(PlanError, match=name):
        score(name, model, s, None)
    partial = Statistics(needs=Needs(input_moments=True) if name != "wanda_sp" else Needs())
    with pytest.raises(PlanError, match="collect_statistics"):
        score(name, model, s, partial)
