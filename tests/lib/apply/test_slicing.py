"""Slicing computes what the masks preview, on the real SmolLM2 weights (tiny families: test_structure)."""

import pytest
import torch

from explorer.apply.masking import masked
from explorer.apply.pruning import prune_model
from explorer.planning.selection import Selection, param_counts


@pytest.mark.real
def test_real_smollm2_slicing_equals_masking(smollm2):
    ex = smollm2
    mixed = Selection.make(
        ex.structure,
        heads={4: [0, 3, 6]},
        kv={9: [1]},
        mlp={5: list(range(0, 1536, 3))},
        layers=[20],
    )
    ids = ex.evaluation[:1, :64]
    with torch.no_grad(), masked(ex.model, ex.structure, mixed):
        masked_logits = ex.model(ids).logits
    small = prune_model(ex.model, ex.structure, mixed)
    with torch.no_grad():
        assert (small(ids).logits - masked_logits).abs().max() < 1e-4
    assert sum(p.numel() for p in small.parameters()) == param_counts(ex.structure, mixed)["total"]
