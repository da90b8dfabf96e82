"""Block Influence: one minus the mean cosine between a block's input and output streams."""

import torch

from explorer.catalogue import CRITERIA
from explorer.scoring import Needs, ScoreContext, collect_statistics
from tests.tiny import raw_hidden_states, tiny, tokens


def test_block_influence_is_one_minus_the_mean_cosine_of_consecutive_streams():
    model, s = tiny("llama")
    ids = tokens(4, 10)
    stats = collect_statistics(model, s, ids, Needs(hidden_states=True), batch_size=2)
    scores = CRITERIA["block_influence"].score(ScoreContext(model, s, stats))
    assert set(scores) == {"layer"}  # whole layers only: widths are left to width criteria
    h = raw_hidden_states(model, ids)
    expected = torch.stack(
        [1 - torch.cosine_similarity(h[i], h[i + 1], dim=-1).mean() for i in range(s.num_layers)]
    )
    torch.testing.assert_close(scores["layer"], expected, rtol=1e-5, atol=1e-6)
