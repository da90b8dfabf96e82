"""Every export folder carries a Hugging Face model card that agrees with its report."""

from __future__ import annotations

import json

from explorer.export.model_card import read_card
from explorer.export.writer import export_model
from tests.lib.export.test_writer import per_layer_selection, uniform_selection
from tests.tiny import tiny


def test_cards_say_how_the_model_was_pruned_measured_and_loads(tiny_tokenizer, tmp_path):
    model, s = tiny("llama")
    caller = {"criterion": "taylor", "perplexity_before": 12.5, "perplexity_after": 15.25}
    caller["evaluation"] = {"windows": 4, "length": 256}
    plan = {"model": "HuggingFaceTB/SmolLM2-135M-Instruct", "target": 0.2, "allocation": "global"}
    plan["recovery"] = [{"step": "lora"}]
    for name, selection_of in (("uniform", uniform_selection), ("per_layer", per_layer_selection)):
        folder = tmp_path / name
        export_model(model, tiny_tokenizer, s, selection_of(s), folder, plan=plan, report=caller)
        report = json.loads((folder / "report.json").read_text())
        front, body = read_card((folder / "README.md").read_text())
        assert front["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
        assert front["library_name"] == "transformers"
        assert front["pipeline_tag"] == "text-generation"
        assert {"pruned", "structured-pruning", "criterion-taylor"} <= set(front["tags"])
        assert "license" not in front  # a model built from a config has none to carry
        assert "**12.50** dense → **15.25** pruned" in body and "4 windows of 256" in body
        assert "| Criterion | taylor |" in body and "| Recovery | lora |" in body
        assert "| Target | 20% of decoder-block parameters |" in body
        assert f"{report['params']['total_after']:,}" in body
        remote = name == "per_layer"
        assert ("trust_remote_code=True" in body) == remote
        assert ("per layer (differ)" in body) == remote
