"""Distribution-aware scores: depth-2 energies, the head-similarity graph and its greedy rule."""

import math

import pytest
import torch

from explorer.catalogue import CRITERIA
from explorer.scoring.base import Needs, ScoreContext
from explorer.scoring.distribution_aware import (
    DEPTH2_NEEDS,
    SIMILARITY_NEEDS,
    channel_energy,
    greedy_redundant_heads,
    head_similarity_graph,
    redundancy_scores,
)
from explorer.scoring.statistics import Statistics, collect_statistics
from tests.tiny import tiny, tokens

# Four heads: 0-1 near duplicates, 0-3 and 1-2 linked, everything else apart.
JSD = torch.tensor(
    [
        [0.00, 0.05, 0.30, 0.10],
        [0.05, 0.00, 0.15, 0.40],
        [0.30, 0.15, 0.00, 0.50],
        [0.10, 0.40, 0.50, 0.00],
    ]
)


def test_graph_links_heads_below_the_threshold():
    graph = head_similarity_graph(JSD, tau=0.2)
    assert sorted(graph.nodes) == [0, 1, 2, 3]
    edges = sorted(graph.edges(data="weight"))
    assert [(i, j) for i, j, _ in edges] == [(0, 1), (0, 3), (1, 2)]
    assert [w for _, _, w in edges] == pytest.approx([0.05, 0.10, 0.15])
    assert head_similarity_graph(JSD, tau=0.05).number_of_edges() == 0


def test_greedy_rule_marks_one_head_of_each_linked_pair():
    # (0,1) marks 1; (0,3): neither marked, marks 3; (1,2): 1 is marked, skipped.
    assert greedy_redundant_heads(JSD, tau=0.2) == [1, 3]
    # With importances the less important of a pair goes: (0,1) marks 0, (1,2) marks 2.
    assert greedy_redundant_heads(JSD, 0.2, torch.tensor([1.0, 5.0, 2.0, 0.5])) == [0, 2]
    assert greedy_redundant_heads(JSD, tau=0.01) == []


def test_redundancy_scores_follow_greedy_elimination():
    # Closest pair (0,1): 1 goes at 0.05; then (0,3): 3 at 0.10; then (0,2): 2 at 0.30.
    expected = torch.tensor([math.log(2), 0.05, 0.30, 0.10])
    torch.testing.assert_close(redundancy_scores(JSD), expected)
    # Head 0 is the weaker partner: it goes first, and 1 stands in for it.
    scores = redundancy_scores(JSD, torch.tensor([1.0, 5.0, 2.0, 3.0]))
    assert int(scores.argmin()) == 0 and scores[0] == pytest.approx(0.05)


def test_channel_energy_on_a_hand_case():
    model, s = tiny("llama")
    path = s.path(0, s.family.down)
    with torch.no_grad():
        model.get_submodule(path).weight.zero_()[:2, :2] = torch.tensor([[1.0, 0.0], [2.0, 1.0]])
    stats = Statistics(needs=Needs(input_moments=True), tokens=2)
    stats.input_sq_sum[path] = torch.tensor([2.0, 8.0] + [1.0] * (s.intermediate - 2))
    energy = channel_energy(ScoreContext(model, s, stats), stats, path)
    # ‖W[:, j]‖² = (5, 1, 0, ...), E[h²] = (1, 4, 0.5, ...)
    assert energy[:3].tolist() == [5.0, 4.0, 0.0]


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_depth2_scores_are_output_energies(family):
    model, s = tiny(family)
    ids = tokens(3, 10)
    stats = collect_statistics(model, s, ids, DEPTH2_NEEDS)
    scores = CRITERIA["depth2"].score(ScoreContext(model, s, stats))
    # Measure directly: the energy each head / channel adds to the o_proj / down_proj output.
    f, layer, hd = s.family, 1, s.head_dim
    inputs = {}
    hooks = [
        model.get_submodule(s.path(layer, n)).register_forward_pre_hook(
            lambda m, a, n=n: inputs.__setitem__(n, a[0].reshape(-1, a[0].shape[-1]))
        )
        for n in (f.o, f.down)
    ]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    w_o = model.get_submodule(s.path(layer, f.o)).weight
    heads = torch.stack(
        [
            (inputs[f.o][:, h * hd : (h + 1) * hd] @ w_o[:, h * hd : (h + 1) * hd].T)
            .square()
            .sum(1)
            .mean()
            for h in range(s.heads)
        ]
    )
    w_down = model.get_submodule(s.path(layer, f.down)).weight
    mlp = (inputs[f.down].square().mean(0)) * w_down.square().sum(0)
    torch.testing.assert_close(scores["head"][layer], heads, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(scores["mlp"][layer], mlp, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(
        scores["kv"][layer], heads.view(s.kv_heads, -1).sum(1), rtol=1e-4, atol=1e-7
    )
    torch.testing.assert_close(scores["layer"], stats.block_influence())
    assert not (DEPTH2_NEEDS.gradients or DEPTH2_NEEDS.output_gradient_covariance)


def test_head_similarity_puts_a_duplicated_head_first():
    model, s = tiny("llama")  # 6 query heads, 3 per kv group
    hd = s.head_dim
    q = model.get_submodule(s.path(2, s.family.q)).weight
    with torch.no_grad():
        q[4 * hd : 5 * hd] = q[3 * hd : 4 * hd]  # heads 3 and 4 read kv group 1 alike
    stats = collect_statistics(model, s, tokens(3, 10), SIMILARITY_NEEDS)
    assert stats.jsd(2)[3, 4] < 1e-6
    ctx = ScoreContext(model, s, stats, kinds=("head", "kv", "mlp"))
    scores = CRITERIA["head_similarity"].score(ctx)
    assert int(scores["head"][2].argmin()) in (3, 4) and scores["head"][2].min() < 1e-6
    assert set(greedy_redundant_heads(stats.jsd(2), tau=1e-6)) & {3, 4}
    torch.testing.assert_close(scores["kv"], scores["head"].view(3, s.kv_heads, -1).sum(-1))
    depth2 = CRITERIA["depth2"].score(ScoreContext(model, s, stats, kinds=("mlp",)))
    torch.testing.assert_close(scores["mlp"], depth2["mlp"])


def test_data_free_calibration_on_self_generated_text(tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from explorer.data import self_generated_text, token_windows
    from explorer.model.families import family_for
    from explorer.model.structure import StructureMap

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    text = self_generated_text(model, tokenizer, n_samples=4, length=32, seed=1)
    windows = token_windows(tokenizer, text, 8, 4, seed=0)
    s = StructureMap(model, family_for(model))
    stats = collect_statistics(model, s, windows, SIMILARITY_NEEDS)
    for name in ("depth2", "head_similarity"):
        scores = CRITERIA[name].score(ScoreContext(model, s, stats))
        assert all(torch.isfinite(v).all() for v in scores.values())
