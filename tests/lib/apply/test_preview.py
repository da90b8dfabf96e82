"""The live preview equals a full recompute, for random sequences of plan changes."""

import random

import pytest

from explorer.apply.masking import masked
from explorer.apply.preview import LivePreview
from explorer.evaluate import perplexity
from explorer.planning.selection import Selection
from tests.tiny import CONFIGS, tiny, tokens


def random_selection(s, rng: random.Random) -> Selection:
    heads, mlp = {}, {}
    for layer in range(s.num_layers):
        if s.group_size > 1 and rng.random() < 0.4:
            per_group = rng.randint(1, s.group_size - 1)
            heads[layer] = [
                g * s.group_size + h for g in range(s.kv_heads) for h in range(per_group)
            ]
        if rng.random() < 0.6:
            mlp[layer] = rng.sample(range(s.intermediate), rng.randint(1, s.intermediate - 1))
    hidden = rng.sample(range(s.hidden), 3) if rng.random() < 0.2 else []
    layers = [rng.randrange(s.num_layers)] if rng.random() < 0.2 else []
    return Selection.make(s, heads=heads, mlp=mlp, hidden=hidden, layers=layers)


def full(model, s, sel, windows):
    with masked(model, s, sel):
        return perplexity(model, windows, batch_size=2)


@pytest.mark.parametrize("family", list(CONFIGS))
@pytest.mark.parametrize("budget", [1 << 30, 1])  # every boundary kept / only the embeddings
def test_incremental_equals_full_recompute(family, budget):
    model, s = tiny(family)
    windows = tokens(n=5, length=16, seed=1)
    live = LivePreview(model, s, windows, batch_size=2, max_cache_bytes=budget)
    rng = random.Random(family)
    previous = Selection()
    for _ in range(8):
        # Mostly one-layer changes, as a slider makes, sometimes a whole new selection.
        sel = random_selection(s, rng)
        if rng.random() < 0.6 and not previous.hidden:
            layer = rng.randrange(s.num_layers)
            mlp = dict(previous.mlp)
            mlp[layer] = tuple(rng.sample(range(s.intermediate), rng.randint(0, 5)))
            sel = Selection.make(
                s, heads=previous.heads, kv=previous.kv, mlp=mlp, layers=list(previous.layers)
            )
        steps = list(live.run(sel))
        assert [st.done for st in steps] == [2, 4, 5]
        expected = full(model, s, sel, windows)
        assert steps[-1].perplexity == pytest.approx(expected, rel=1e-5)
        previous = sel
    assert live.perplexity(previous) == pytest.approx(full(model, s, previous, windows), rel=1e-5)


def test_cache_is_bounded():
    model, s = tiny("llama")
    windows = tokens(n=4, length=16)
    per_boundary = windows.numel() * s.hidden * 4
    live = LivePreview(model, s, windows, batch_size=2, max_cache_bytes=2 * per_boundary)
    live.perplexity(Selection())
    assert live.cache_bytes <= 2 * per_boundary
    assert live.stride == 2
