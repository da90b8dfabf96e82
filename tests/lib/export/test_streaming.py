"""A model that does not fit the memory budget is exported shard by shard, to the same folder."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from explorer.errors import ExportError
from explorer.export.streaming import export_streaming
from explorer.export.writer import export_model, load_pruned
from explorer.planning.selection import Selection
from explorer.scoring.offload import resident_bytes
from tests.lib.export.test_writer import per_layer_selection, uniform_selection
from tests.tiny import tiny, tokens


def tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            out.update({name: f.get_tensor(name) for name in f.keys()})  # noqa: SIM118
    return out


def hidden_and_layer(s):
    """Hidden channels and a whole layer removed: the pieces outside the layers change too."""
    return Selection.make(s, hidden=[0, 5, 9, 13], layers=[1], mlp={0: [1, 2, 3]})


CASES = [
    ("llama", per_layer_selection),  # tied head, per-layer sizes (remote code)
    ("qwen2", uniform_selection),  # untied head, q/k/v biases
    ("gemma3", hidden_and_layer),  # embedding scale folded, a layer gone
]


@pytest.mark.parametrize(("family", "selection_of"), CASES)
def test_the_streamed_export_equals_the_in_memory_export(
    family, selection_of, tiny_tokenizer, tmp_path
):
    model, s = tiny(family)
    sel = selection_of(s)
    source = tmp_path / "source"
    model.save_pretrained(source)
    tiny_tokenizer.save_pretrained(source)
    budget = int(0.6 * resident_bytes(model))  # the whole model does not fit
    streamed = export_streaming(source, sel, tmp_path / "streamed", max_memory_bytes=budget)
    in_memory = export_model(model, tiny_tokenizer, s, sel, tmp_path / "memory")

    got, want = tensors(tmp_path / "streamed"), tensors(tmp_path / "memory")
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    verification = streamed.report["verification"]
    assert verification["shards"] == len(sel.kept_layers(s)) + 1
    assert verification["peak_resident_bytes"] <= budget < resident_bytes(model)
    assert streamed.params_after == in_memory.params_after
    assert streamed.remote_code == in_memory.remote_code
    config = json.loads((tmp_path / "streamed" / "config.json").read_text())
    reference = json.loads((tmp_path / "memory" / "config.json").read_text())
    for key in ("hidden_size", "num_hidden_layers", "intermediate_size", "layer_sizes", "auto_map"):
        assert config.get(key) == reference.get(key), key
    ids = tokens()
    with torch.no_grad():
        a = load_pruned(tmp_path / "streamed", device="cpu")[0](ids).logits
        b = load_pruned(tmp_path / "memory", device="cpu")[0](ids).logits
    assert torch.equal(a, b)
    assert (tmp_path / "streamed" / "README.md").is_file()


def test_a_budget_below_one_piece_is_refused(tiny_tokenizer, tmp_path):
    model, s = tiny("llama")
    model.save_pretrained(tmp_path / "source")
    tiny_tokenizer.save_pretrained(tmp_path / "source")
    with pytest.raises(ExportError, match="Raise the budget"):
        export_streaming(tmp_path / "source", Selection(), tmp_path / "out", max_memory_bytes=1000)
    assert not (tmp_path / "out").exists()
