"""The calibration pass: every sum equals the same quantity computed directly, on tiny models."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from explorer.errors import DataError
from explorer.model.families import get_module
from explorer.scoring import statistics
from explorer.scoring.base import Needs
from explorer.scoring.statistics import collect_statistics, pairwise_jsd_sum
from tests.tiny import tiny, tokens

EVERYTHING = Needs(
    gradients=True,
    fisher=True,
    input_moments=True,
    covariance=("down_proj", "q_proj"),
    output_gradient_covariance=("gate_proj", "o_proj"),
    attention=True,
    hidden_states=True,
)


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def summed_loss(model, ids: torch.Tensor) -> torch.Tensor:
    logits = model(ids, use_cache=False).logits
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
    )


def linear_paths(s) -> list[str]:
    return [s.path(layer, name) for layer in range(s.num_layers) for name in s.family.linears]


def capture(model, paths, *, outputs: bool = False):
    """Record the inputs (or outputs, with gradients retained) of the modules at ``paths``."""
    seen: dict[str, list[torch.Tensor]] = {p: [] for p in paths}
    handles = []
    for path in paths:
        module = get_module(model, path)
        if outputs:

            def hook(m, a, out, path=path):
                out.retain_grad()
                seen[path].append(out)

            handles.append(module.register_forward_hook(hook))
        else:
            handles.append(
                module.register_forward_pre_hook(
                    lambda m, a, path=path: seen[path].append(a[0].detach())
                )
            )
    return seen, handles


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_gradients_are_those_of_the_summed_loss(family):
    model, s = tiny(family)
    ids = tokens(3, 10)
    stats = collect_statistics(model, s, ids, Needs(gradients=True, embeddings=True), batch_size=2)
    ref = copy.deepcopy(model)
    loss = summed_loss(ref, ids)
    loss.backward()
    for name, p in ref.named_parameters(remove_duplicate=False):  # tied names included
        assert close(stats.gradients[name], p.grad), name
    path, _, param = "model.layers.1.mlp.up_proj.weight".rpartition(".")
    assert close(stats.mean_grad(path, param), get_module(ref, path).weight.grad / 27)
    assert (stats.samples, stats.tokens, stats.loss_tokens) == (3, 30, 27)
    assert stats.loss == pytest.approx(loss.item(), rel=1e-5)
    assert not stats.fisher and not stats.input_sum


def test_fisher_is_the_sum_of_squared_per_window_gradients():
    model, s = tiny("llama")
    ids = tokens(3, 9)
    stats = collect_statistics(model, s, ids, Needs(fisher=True, embeddings=True), batch_size=3)
    assert stats.needs.gradients, "the Fisher pass also yields the gradients, for free"
    ref = copy.deepcopy(model)
    names, params = zip(*ref.named_parameters(), strict=True)
    fisher = [torch.zeros_like(p) for p in params]
    for row in ids:
        per_window = summed_loss(ref, row[None]) / (ids.shape[1] - 1)  # the window's mean CE
        for acc, g in zip(fisher, torch.autograd.grad(per_window, params), strict=True):
            acc += g.square()
    summed = torch.autograd.grad(summed_loss(ref, ids), params)
    for name, f, g in zip(names, fisher, summed, strict=True):
        assert close(stats.fisher[name], f), name
        assert close(stats.gradients[name], g), name
        path, _, param = name.rpartition(".")
        assert close(stats.fisher_diag(path, param), f / 3), name
    assert stats.fisher["lm_head.weight"] is stats.fisher["model.embed_tokens.weight"]


def test_embedding_gradients_only_when_asked():
    """Only hidden-channel scores read them; the rest of the sums are unchanged without them."""
    model, s = tiny("llama")
    ids = tokens(2, 8)
    full = collect_statistics(model, s, ids, Needs(fisher=True, embeddings=True))
    lean = collect_statistics(model, s, ids, Needs(fisher=True))
    embed = {"model.embed_tokens.weight", "lm_head.weight"}
    assert embed <= set(full.gradients) and not embed & (set(lean.gradients) | set(lean.fisher))
    assert set(lean.gradients) == set(full.gradients) - embed
    for name, g in lean.gradients.items():
        assert torch.equal(g, full.gradients[name]) and torch.equal(
            lean.fisher[name], full.fisher[name]
        )
    assert all(p.requires_grad for p in model.parameters()), "requires_grad is restored"


@pytest.mark.parametrize("batch_size", [1, 3])
def test_input_moments_and_covariance_equal_the_captured_inputs(batch_size):
    model, s = tiny("qwen3")
    ids = tokens(3, 8)
    needs = Needs(input_moments=True, covariance=("down_proj", "o_proj"))
    stats = collect_statistics(model, s, ids, needs, batch_size=batch_size)
    seen, handles = capture(model, linear_paths(s))
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    for path, xs in seen.items():
        x = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs])
        assert x.shape[0] == stats.tokens == 24
        assert close(stats.input_sum[path], x.sum(0))
        assert close(stats.input_sq(path), x.square().sum(0))
        assert close(stats.input_norm(path), x.norm(dim=0))
        assert close(stats.mean_input(path), x.mean(0))
        assert close(stats.input_var(path), x.var(0, unbiased=False))
        if path.endswith(("down_proj", "o_proj")):
            assert close(stats.covariance[path], x.T @ x)
            assert close(stats.cov(path), x.T @ x / 24)
        else:
            assert path not in stats.covariance, "only the roles asked for"
    assert stats.loss_tokens == 0 and not stats.gradients, "a forward-only pass"


@pytest.mark.parametrize("with_weight_grads", [False, True])
def test_output_gradient_covariance_equals_g_transpose_g(with_weight_grads):
    model, s = tiny("qwen2")
    ids = tokens(3, 8)
    needs = Needs(gradients=with_weight_grads, output_gradient_covariance=("gate_proj", "o_proj"))
    stats = collect_statistics(model, s, ids, needs, batch_size=2)
    ref = copy.deepcopy(model)
    paths = [p for p in linear_paths(s) if p.endswith(("gate_proj", "o_proj"))]
    seen, handles = capture(ref, paths, outputs=True)
    summed_loss(ref, ids).backward()
    for h in handles:
        h.remove()
    for path in paths:
        (out,) = seen[path]
        g = out.grad.reshape(-1, out.shape[-1])
        assert close(stats.output_gradient_covariance[path], g.T @ g), path
        assert close(stats.grad_cov(path), g.T @ g / 24)
    assert set(stats.output_gradient_covariance) == set(paths)
    assert bool(stats.gradients) == with_weight_grads


def hand_jsd(p: list[float], q: list[float]) -> float:
    total = 0.0
    for a, b in zip(p, q, strict=True):
        m = (a + b) / 2
        total += 0.5 * (a * math.log(a / m) if a > 0 else 0.0)
        total += 0.5 * (b * math.log(b / m) if b > 0 else 0.0)
    return total


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_attention_jsd_matches_a_hand_computation(family):
    model, s = tiny(family)
    with torch.no_grad():  # random init attends almost uniformly: sharpen it, so heads differ
        for layer in range(s.num_layers):
            get_module(model, s.path(layer, s.family.q)).weight.mul_(40)
    ids = tokens(2, 7)
    stats = collect_statistics(model, s, ids, Needs(attention=True))
    assert model.config._attn_implementation == "sdpa", "the implementation is restored"
    model.set_attn_implementation("eager")
    with torch.no_grad():
        probs = model(ids, output_attentions=True).attentions
    model.set_attn_implementation("sdpa")
    layer = 1
    p = probs[layer].tolist()  # (batch, heads, queries, keys)
    expected = torch.zeros(s.heads, s.heads)
    for i in range(s.heads):
        for j in range(s.heads):
            rows = [hand_jsd(p[b][i][t], p[b][j][t]) for b in range(2) for t in range(7)]
            expected[i, j] = sum(rows) / len(rows)
    got = stats.jsd(layer)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-7)
    assert torch.equal(got, got.T) and torch.all(got.diagonal() == 0)
    assert 0.005 < got.max() <= math.log(2)
    assert set(stats.jsd_sum) == set(range(s.num_layers))


def test_jsd_chunking_changes_nothing(monkeypatch):
    probs = torch.softmax(torch.randn(2, 5, 9, 9, generator=torch.Generator().manual_seed(1)), -1)
    probs = probs * torch.ones(9, 9).tril()  # causal zeros; rows need not be renormalised here
    whole = pairwise_jsd_sum(probs)
    monkeypatch.setattr(statistics, "_JSD_CHUNK_ELEMENTS", 1)
    assert torch.allclose(pairwise_jsd_sum(probs), whole, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_block_influence_is_one_minus_mean_cosine(family):
    model, s = tiny(family)
    ids = tokens(2, 6)
    stats = collect_statistics(model, s, ids, Needs(hidden_states=True))
    pairs = []
    handles = [
        get_module(model, s.layer_path(i)).register_forward_hook(
            lambda m, a, kw, out: pairs.append((a[0] if a else kw["hidden_states"], out)),
            with_kwargs=True,
        )
        for i in range(s.num_layers)
    ]
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    expected = torch.stack([1 - F.cosine_similarity(h, o, dim=-1).mean() for h, o in pairs])
    assert close(stats.block_influence(), expected)


def test_model_is_left_as_it_was():
    model, s = tiny("gemma3")
    ids = tokens(2, 6)
    frozen = s.path(0, s.family.q) + ".weight"
    model.get_parameter(frozen).requires_grad_(False)
    requires = {n: p.requires_grad for n, p in model.named_parameters()}
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        before = model(ids).logits
    calls = []
    stats = collect_statistics(
        model, s, ids, EVERYTHING, batch_size=4, progress=lambda f, m: calls.append(f)
    )
    assert calls == [0.5, 1.0], "one report per window (the Fisher forces windows of one)"
    assert not model.training
    assert model.config._attn_implementation == "sdpa"
    assert all(p.grad is None for p in model.parameters())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == requires
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before), "no hook is left behind"
    assert stats.gradients[frozen].abs().sum() > 0, "frozen parameters are scored too"


def test_covers_tells_when_statistics_can_be_reused():
    model, s = tiny("llama")
    stats = collect_statistics(model, s, tokens(1, 5), Needs(fisher=True, covariance=("o_proj",)))
    assert stats.covers(Needs(gradients=True))
    assert stats.covers(Needs(fisher=True, covariance=("o_proj",)))
    assert not stats.covers(Needs(covariance=("o_proj", "down_proj")))
    assert not stats.covers(Needs(input_moments=True))
    with pytest.raises(KeyError, match="input_moments"):
        stats.mean_input(s.path(0, s.family.o))


def test_bad_windows_are_refused():
    model, s = tiny("llama")
    with pytest.raises(DataError, match="token ids"):
        collect_statistics(model, s, torch.rand(2, 5), Needs())
    with pytest.raises(DataError, match="token ids"):
        collect_statistics(model, s, tokens(1, 5)[0], Needs())
    with pytest.raises(DataError, match="2 tokens"):
        collect_statistics(model, s, tokens(2, 1), Needs(gradients=True))
