"""Exports load with the ordinary tools, give the pruned model's logits, and never harm anything."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from explorer.apply.masking import masked
from explorer.apply.pruning import prune_model
from explorer.errors import ExportError
from explorer.export import writer as export
from explorer.export.writer import count_params, export_model, load_pruned
from explorer.model.families import family_for
from explorer.model.structure import StructureMap
from explorer.planning.selection import Selection, param_counts
from tests.tiny import CONFIGS, tiny, tiny_model, tokens

FAMILIES = list(CONFIGS)


def logits(model, ids):
    with torch.no_grad():
        return model(ids.to(next(model.parameters()).device), use_cache=False).logits


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


def uniform_selection(s: StructureMap) -> Selection:
    """One query head per kv group (where a group has several) and 8 MLP channels, every layer."""
    heads = list(range(0, s.heads, s.group_size)) if s.group_size > 1 else []
    return Selection.make(
        s,
        heads={i: heads for i in range(s.num_layers)},
        mlp={i: [i, 7, 11, 20, 21, 30, 33, 39] for i in range(s.num_layers)},
    )


def per_layer_selection(s: StructureMap) -> Selection:
    """Different widths in every layer, a whole kv group gone where there are several."""
    return Selection.make(
        s,
        kv={1: [0]} if s.kv_heads > 1 else {},
        mlp={0: [1, 2, 3], 1: list(range(20)), 2: [5]},
    )


def reference_logits(model, s, sel, ids):
    return logits(prune_model(model, s, sel), ids)


def is_tied(model) -> bool:
    return (
        model.get_output_embeddings().weight.data_ptr()
        == model.get_input_embeddings().weight.data_ptr()
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_uniform_export_loads_with_plain_transformers(family, tiny_tokenizer, tmp_path):
    model, s = tiny(family)
    sel = uniform_selection(s)
    ids = tokens()
    result = export_model(model, tiny_tokenizer, s, sel, tmp_path / "out", plan={"criterion": "l2"})
    assert result.uniform and not result.remote_code
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "auto_map" not in config and "layer_sizes" not in config
    assert config["intermediate_size"] == s.intermediate - 8
    assert config["num_attention_heads"] == s.heads - len(sel.heads.get(0, ()))
    assert not (tmp_path / "out" / "modeling_pruned.py").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert type(reloaded).__name__ == type(model).__name__
    assert max_diff(logits(reloaded, ids), reference_logits(model, s, sel, ids)) < 1e-4
    assert count_params(reloaded) == result.params_after == param_counts(s, sel)["total"]
    assert is_tied(reloaded) == s.tied
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["params"]["total_after"] == result.params_after
    assert report["verification"]["max_abs_diff"] == result.max_abs_diff < 1e-4
    assert json.loads((tmp_path / "out" / "plan.json").read_text()) == {"criterion": "l2"}


@pytest.mark.parametrize("family", FAMILIES)
def test_per_layer_export_loads_with_remote_code_and_load_pruned(family, tiny_tokenizer, tmp_path):
    model, s = tiny(family)
    sel = per_layer_selection(s)
    ids = tokens()
    expected = reference_logits(model, s, sel, ids)
    result = export_model(model, tiny_tokenizer, s, sel, tmp_path / "out")
    assert not result.uniform and result.remote_code
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert [size["intermediate"] for size in config["layer_sizes"]] == [37, 20, 39]
    assert config["auto_map"]["AutoModelForCausalLM"].startswith("modeling_pruned.Pruned")
    for reloaded in (
        AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True),
        load_pruned(tmp_path / "out", device="cpu")[0],
    ):
        assert type(reloaded).__name__.startswith("Pruned")
        assert max_diff(logits(reloaded, ids), expected) < 1e-4
        assert count_params(reloaded) == param_counts(s, sel)["total"]
        assert is_tied(reloaded) == s.tied
        out = reloaded.generate(ids[:1], max_new_tokens=6, min_new_tokens=6, do_sample=False)
        assert out.shape == (1, ids.shape[1] + 6)
    # Without remote code transformers cannot build these shapes, and says so.
    with pytest.raises(RuntimeError, match="mismatched"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "out")


def test_per_layer_mistral_export(tiny_tokenizer, tmp_path):
    model = tiny_model("mistral", perturb=False)
    s = StructureMap(model, family_for(model))
    sel = Selection.make(s, heads={1: [0, 2]}, mlp={0: [4, 5]})
    result = export_model(model, tiny_tokenizer, s, sel, tmp_path / "out")
    assert result.remote_code
    reloaded, tokenizer = load_pruned(tmp_path / "out")
    assert type(reloaded).__name__ == "PrunedMistralForCausalLM"
    assert len(tokenizer) == len(tiny_tokenizer)
    assert max_diff(logits(reloaded, tokens()), reference_logits(model, s, sel, tokens())) < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_hidden_channels_and_layer_removal_export(family, tiny_tokenizer, tmp_path):
    model, s = tiny(family)
    # transformers 5 requires hidden_size to stay a multiple of num_attention_heads.
    sel = Selection.make(s, hidden=list(range(3, 3 + s.heads)), layers=[1])
    ids = tokens()
    result = export_model(model, tiny_tokenizer, s, sel, tmp_path / "out")
    assert result.uniform
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert reloaded.config.hidden_size == s.hidden - s.heads
    assert reloaded.config.num_hidden_layers == s.num_layers - 1
    assert max_diff(logits(reloaded, ids), reference_logits(model, s, sel, ids)) < 1e-4
    assert is_tied(reloaded) == s.tied
    # The same cut with uneven MLP widths goes through the modeling file.
    sel = Selection.make(s, hidden=list(range(s.heads)), layers=[0], mlp={2: [0, 1]})
    export_model(model, tiny_tokenizer, s, sel, tmp_path / "per_layer")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "per_layer", trust_remote_code=True)
    assert max_diff(logits(reloaded, ids), reference_logits(model, s, sel, ids)) < 1e-4
    assert is_tied(reloaded) == s.tied


def test_hidden_size_transformers_refuses_is_refused_before_writing(tiny_tokenizer, tmp_path):
    model, s = tiny("llama")  # 6 heads: 46 hidden channels do not split into them
    with pytest.raises(ExportError, match="multiple of the head count"):
        export_model(model, tiny_tokenizer, s, Selection.make(s, hidden=[0, 1]), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def add_biases(model, names=("self_attn.o_proj", "mlp.down_proj")):
    """What FLAP's bias compensation does: biases where the family has none."""
    torch.manual_seed(1)
    for layer in model.model.layers:
        for name in names:
            linear = layer.get_submodule(name)
            linear.bias = nn.Parameter(0.3 * torch.randn(linear.out_features))


@pytest.mark.parametrize(
    ("family", "plain"),
    [("llama", True), ("qwen2", False), ("qwen3", False), ("gemma3", False)],
)
def test_extra_biases_survive_the_export(family, plain, tiny_tokenizer, tmp_path):
    model, _ = tiny(family)
    add_biases(model)
    s = StructureMap(model, family_for(model))
    sel = uniform_selection(s)
    ids = tokens()
    expected = reference_logits(model, s, sel, ids)
    result = export_model(model, tiny_tokenizer, s, sel, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    if plain:  # Llama's own flags create the biases: zeros for q/k/v/gate/up, plain loading
        assert config["attention_bias"] and config["mlp_bias"] and not result.remote_code
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
        assert torch.count_nonzero(reloaded.model.layers[0].self_attn.q_proj.bias) == 0
    else:
        assert config["extra_biases"] == ["mlp.down_proj", "self_attn.o_proj"]
        assert result.remote_code
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True)
    assert max_diff(logits(reloaded, ids), expected) < 1e-4
    assert max_diff(logits(load_pruned(tmp_path / "out")[0], ids), expected) < 1e-4
    assert count_params(reloaded) == result.params_after


def test_biases_added_to_a_pruned_model_are_exported(tiny_tokenizer, tmp_path):
    """Recovery (e.g. FLAP) works on the sliced model; export takes it as ``pruned``."""
    model, s = tiny("qwen2")
    sel = per_layer_selection(s)
    pruned = prune_model(model, s, sel)
    add_biases(pruned, names=("self_attn.o_proj",))
    ids = tokens()
    expected = logits(pruned, ids)
    before = {k: v.clone() for k, v in pruned.state_dict().items()}
    export_model(model, tiny_tokenizer, s, sel, tmp_path / "out", pruned=pruned)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True)
    assert max_diff(logits(reloaded, ids), expected) < 1e-4
    assert all(torch.equal(v, before[k]) for k, v in pruned.state_dict().items())
    assert not hasattr(pruned.config, "auto_map"), "the caller's pruned model is left alone"


def test_gguf_loaded_model_exports(tiny_tokenizer, tmp_path):
    from transformers import GgufConfig
    from transformers.quantizers.quantizer_gguf import GgufHfQuantizer

    model, s = tiny("llama")
    quantizer = GgufHfQuantizer(GgufConfig(dequantize=True))
    model.hf_quantizer = quantizer
    model.config.quantization_config = quantizer.quantization_config
    with pytest.raises(ValueError, match="not serializable"):
        model.save_pretrained(tmp_path / "plain")
    export_model(model, tiny_tokenizer, s, uniform_selection(s), tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config
    assert model.hf_quantizer is quantizer, "only the copy loses its quantizer"


def test_active_preview_masks_do_not_leak_into_the_export(tiny_tokenizer, tmp_path):
    model, s = tiny("llama")
    sel = per_layer_selection(s)
    ids = tokens()
    with masked(model, s, sel):
        previewed = logits(model, ids)
        export_model(model, tiny_tokenizer, s, sel, tmp_path / "out")
    reloaded, _ = load_pruned(tmp_path / "out")
    assert max_diff(logits(reloaded, ids), previewed) < 1e-4


# -- safety -------------------------------------------------------------------------------------------
def folder_hashes(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def weight_hashes(model) -> dict[str, str]:
    return {
        k: hashlib.sha256(v.detach().cpu().numpy().tobytes()).hexdigest()
        for k, v in model.state_dict().items()
    }


def test_source_weights_config_and_files_untouched(tiny_llama_dir, tiny_tokenizer, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    s = StructureMap(model, family_for(model))
    files, weights = folder_hashes(tiny_llama_dir), weight_hashes(model)
    config = model.config.to_dict()
    sel = Selection.make(s, kv={0: [1]}, mlp={1: [0, 1, 2]}, hidden=[0, 1, 2, 3])
    export_model(model, tiny_tokenizer, s, sel, tmp_path / "out")
    for inside in (tiny_llama_dir, tiny_llama_dir / "pruned"):
        with pytest.raises(ExportError, match="overlaps the source"):
            export_model(model, tiny_tokenizer, s, sel, inside, overwrite=True)
    assert folder_hashes(tiny_llama_dir) == files
    assert weight_hashes(model) == weights
    assert model.config.to_dict() == config
    assert json.loads((tmp_path / "out" / "report.json").read_text())["source"] == str(
        tiny_llama_dir
    )


def test_non_empty_target_is_refused_unless_overwrite(tiny_tokenizer, tmp_path):
    model, s = tiny("qwen3")
    target = tmp_path / "out"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty.*overwrite"):
        export_model(model, tiny_tokenizer, s, uniform_selection(s), target)
    assert (target / "notes.txt").read_text() == "mine"
    with pytest.raises(ExportError, match="not an earlier export"):  # only exports are replaced
        export_model(model, tiny_tokenizer, s, uniform_selection(s), target, overwrite=True)
    assert (target / "notes.txt").read_text() == "mine"
    (target / "notes.txt").unlink()
    export_model(model, tiny_tokenizer, s, uniform_selection(s), target)
    (target / "notes.txt").write_text("inside the export")
    result = export_model(model, tiny_tokenizer, s, uniform_selection(s), target, overwrite=True)
    assert not (target / "notes.txt").exists() and "model.safetensors" in result.files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "no temporary folders left"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match="is a file"):
        export_model(model, tiny_tokenizer, s, uniform_selection(s), tmp_path / "file")


def test_interrupted_export_leaves_nothing_at_the_target(tiny_tokenizer, tmp_path, monkeypatch):
    model, s = tiny("gemma3")
    sel = uniform_selection(s)
    save = type(model).save_pretrained

    def save_then_fail(self, folder, *args, **kwargs):
        save(self, folder, *args, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(type(model), "save_pretrained", save_then_fail)
    with pytest.raises(ExportError, match="disk full"):
        export_model(model, tiny_tokenizer, s, sel, tmp_path / "new")
    assert list(tmp_path.iterdir()) == []
    # With overwrite, the previous export survives an interrupted replacement.
    monkeypatch.undo()
    export_model(model, tiny_tokenizer, s, sel, tmp_path / "old")
    before = folder_hashes(tmp_path / "old")
    monkeypatch.setattr(type(model), "save_pretrained", save_then_fail)
    with pytest.raises(ExportError, match="disk full"):
        export_model(
            model, tiny_tokenizer, s, per_layer_selection(s), tmp_path / "old", overwrite=True
        )
    assert folder_hashes(tmp_path / "old") == before
    assert [p.name for p in tmp_path.iterdir()] == ["old"]


def test_failed_verification_raises_and_writes_nothing(tiny_tokenizer, tmp_path, monkeypatch):
    model, s = tiny("llama")
    reload = export._reload

    def corrupted(*args):
        reloaded = reload(*args)
        with torch.no_grad():
            reloaded.model.layers[0].mlp.down_proj.weight.mul_(1.01)
        return reloaded

    monkeypatch.setattr(export, "_reload", corrupted)
    with pytest.raises(ExportError, match="logits differ"):
        export_model(model, tiny_tokenizer, s, uniform_selection(s), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_progress_and_report(tiny_tokenizer, tmp_path, monkeypatch):
    model, s = tiny("llama")
    sel = Selection.make(s, mlp={0: [1]}, layers=[2])
    steps = []
    monkeypatch.chdir(tmp_path)  # a relative target; a model built from a config has no source
    result = export_model(
        model,
        tiny_tokenizer,
        s,
        sel,
        "out",
        plan={"criterion": "taylor", "target": 0.2},
        report={"perplexity_before": 10.0, "perplexity_after": 12.5, "params": "caller's"},
        progress=lambda fraction, message: steps.append((fraction, message)),
    )
    assert result.path == tmp_path / "out"
    fractions = [f for f, _ in steps]
    assert fractions == sorted(fractions) and fractions[0] == 0.0 and fractions[-1] == 1.0
    assert [m.split()[0] for m in (m for _, m in steps)][:5] == [
        "Pruning",
        "Saving",
        "Reloading",
        "Comparing",
        "Moving",
    ]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["perplexity_before"] == 10.0 and report["perplexity_after"] == 12.5
    assert report["criterion"] == "taylor"
    assert report["params"]["total_before"] == s.total_params == result.params_before
    assert [row["params_after"] for row in report["layers"]][2] == 0
    assert report["layers"][0]["sizes_after"]["intermediate"] == s.intermediate - 1
    assert sum(r["params_before"] for r in report["layers"]) == s.block_params
    assert set(report["versions"]) == {"python", "torch", "transformers", "pruning-explorer"}
    assert report["seconds"] > 0
    replay = json.loads((tmp_path / "out" / "selection.json").read_text())
    assert Selection.from_dict(replay, s) == sel


@pytest.mark.real
def test_smollm2_uniform_20_percent_export(smollm2, tmp_path):
    from explorer.planning.plan import Plan

    ex = smollm2
    sel = ex.select(Plan(criterion="l2", target=0.2))
    assert sel.is_uniform(ex.structure)
    ids = ex.evaluation[:1, :96]
    result = export_model(
        ex.model, ex.workspace.tokenizer, ex.structure, sel, tmp_path / "out", verify_ids=ids
    )
    assert result.uniform and not result.remote_code and result.max_abs_diff < 1e-4
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert (
        count_params(reloaded)
        == report["params"]["total_after"]
        == param_counts(ex.structure, sel)["total"]
    )
    assert report["params"]["removed_share_of_blocks"] == pytest.approx(0.2, abs=0.01)
    assert is_tied(reloaded)
    # The preview (masks) sums in another order through 30 layers: close, not bit-equal.
    with masked(ex.model, ex.structure, sel):
        previewed = logits(ex.model, ids)
    assert max_diff(logits(reloaded, ids), previewed) < 1e-2
