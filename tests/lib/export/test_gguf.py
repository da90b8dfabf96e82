"""GGUF exports: what the file holds, that llama.cpp runs it with the pruned model's logits, and
what cannot be expressed is refused."""

from __future__ import annotations

import json

import pytest
import torch

from explorer.apply.pruning import prune_model
from explorer.errors import ExportError
from explorer.export.gguf_writer import llama_cpp_logits, read_gguf
from explorer.export.model_card import read_card
from explorer.export.writer import export_model
from explorer.model.families import family_for
from explorer.model.structure import StructureMap
from explorer.planning.selection import Selection
from tests.lib.export.test_writer import per_layer_selection, uniform_selection
from tests.tiny import CONFIGS, tiny, tiny_model, tokens

# llama.cpp (f32 weights, f32 KV cache) against transformers on the same pruned weights: only the
# summation order differs. Tiny models: measured below 1e-3; SmolLM2 (logits up to ~35): 3e-3.
TINY_TOLERANCE = 2e-3
REAL_TOLERANCE = 1e-2
ARCH = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3"}
PER_LAYER = ("llama", "qwen2")  # expressible as llama.cpp's "deci"


def tiny_bpe(family: str, **fields):
    """A tiny model whose embedding has a row for every token of ``bpe_tokenizer`` (and 20 more).

    Gemma scales attention by 1/sqrt(head_dim) here, as the real models do and llama.cpp assumes.
    """
    if family == "gemma3":
        fields = {"query_pre_attn_scalar": 32, **fields}
    model = tiny_model(family, vocab_size=320, **fields)
    return model, StructureMap(model, family_for(model))


def export(family, tokenizer, tmp_path, selection_of, outtype="f32"):
    model, s = tiny_bpe(family)
    sel = selection_of(s)
    result = export_model(
        model, tokenizer, s, sel, tmp_path / "out", format="gguf", gguf_type=outtype,
        plan={"criterion": "l2", "target": 0.2}, report={"criterion": "l2"},
    )  # fmt: skip
    return model, s, sel, result


@pytest.mark.parametrize("family", list(CONFIGS))
def test_uniform_gguf_holds_the_pruned_sizes_vocabulary_and_card(family, bpe_tokenizer, tmp_path):
    model, s, sel, result = export(family, bpe_tokenizer, tmp_path, uniform_selection)
    folder = tmp_path / "out"
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md", "model-f32.gguf", "plan.json", "report.json", "selection.json",
    ]  # fmt: skip
    keys, shapes = read_gguf(folder / "model-f32.gguf")
    kept = sel.kept(s, 0)
    # llama.cpp's qwen2 assumes heads x head_dim = hidden: Qwen2 with heads removed is deci.
    arch = "deci" if family == "qwen2" else ARCH[family]
    assert keys["general.architecture"] == arch
    assert keys[f"{arch}.block_count"] == s.num_layers
    assert keys[f"{arch}.attention.head_count"] == kept["heads"]
    assert keys[f"{arch}.attention.head_count_kv"] == kept["kv_heads"]
    assert keys[f"{arch}.feed_forward_length"] == kept["intermediate"] == s.intermediate - 8
    assert keys[f"{arch}.attention.key_length"] == s.head_dim
    assert keys[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    assert keys["tokenizer.ggml.model"] == "gpt2"
    assert keys["tokenizer.ggml.eos_token_id"] == bpe_tokenizer.eos_token_id
    assert shapes["token_embd.weight"] == (320, s.hidden)
    assert shapes["blk.0.ffn_gate.weight"] == (kept["intermediate"], s.hidden)
    assert shapes["blk.2.attn_q.weight"] == (kept["heads"] * s.head_dim, s.hidden)
    assert ("output.weight" in shapes) == (not s.tied)
    report = json.loads((folder / "report.json").read_text())
    assert report["format"] == "gguf" and report["gguf"]["architecture"] == arch
    assert report["params"]["total_after"] == result.params_after
    front, body = read_card((folder / "README.md").read_text())
    assert front["library_name"] == "gguf" and "gguf" in front["tags"]
    assert front["pipeline_tag"] == "text-generation" and "criterion-l2" in front["tags"]
    assert "llama-cli -m model-f32.gguf" in body and f"{result.params_after:,}" in body


@pytest.mark.parametrize("family", PER_LAYER)
def test_per_layer_gguf_is_deci_with_arrays_per_layer(family, bpe_tokenizer, tmp_path):
    _, s, sel, result = export(family, bpe_tokenizer, tmp_path, per_layer_selection)
    keys, shapes = read_gguf(tmp_path / "out" / "model-f32.gguf")
    kept = [sel.kept(s, i) for i in range(s.num_layers)]
    assert keys["general.architecture"] == "deci" and not result.uniform
    assert keys["deci.feed_forward_length"] == [k["intermediate"] for k in kept] == [37, 20, 39]
    assert keys["deci.attention.head_count"] == [k["heads"] for k in kept]
    assert keys["deci.attention.head_count_kv"] == [k["kv_heads"] for k in kept]
    assert shapes["blk.1.attn_k.weight"] == (kept[1]["kv_heads"] * s.head_dim, s.hidden)
    assert shapes["blk.1.ffn_down.weight"] == (s.hidden, 20)


@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_per_layer_sizes_llama_cpp_cannot_run_are_refused(family, bpe_tokenizer, tmp_path):
    with pytest.raises(ExportError, match="llama.cpp has no architecture"):
        export(family, bpe_tokenizer, tmp_path, per_layer_selection)
    assert not (tmp_path / "out").exists()


def test_unwritable_vocabularies_types_and_scalings_are_refused(
    bpe_tokenizer, tiny_tokenizer, tmp_path
):
    model, s = tiny("llama")
    with pytest.raises(ExportError, match="byte-level BPE"):
        export_model(model, tiny_tokenizer, s, Selection(), tmp_path / "a", format="gguf")
    with pytest.raises(ExportError, match="no source quantisation"):
        export(
            "llama", bpe_tokenizer, tmp_path, uniform_selection, outtype="source"
        )  # a model built from a config has no source file
    with pytest.raises(ExportError, match="Unknown export format"):
        export_model(model, bpe_tokenizer, s, Selection(), tmp_path / "b", format="onnx")
    gemma, gs = tiny_bpe("gemma3", query_pre_attn_scalar=256)
    with pytest.raises(ExportError, match="1/sqrt"):
        export_model(gemma, bpe_tokenizer, gs, Selection(), tmp_path / "c", format="gguf")


@pytest.mark.parametrize("outtype", ["f16", "bf16", "q8_0", "q4_0"])
def test_types_pack_matrices_and_keep_norms_f32(outtype, bpe_tokenizer, tmp_path):
    import gguf

    _, s, _, result = export("llama", bpe_tokenizer, tmp_path, uniform_selection, outtype)
    reader = gguf.GGUFReader(str(tmp_path / "out" / f"model-{outtype}.gguf"))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_norm.weight"] == "F32"
    # Kept MLP width 32 fills whole 32-wide quantisation blocks; the hidden size 48 does not, so
    # matrices read along it fall back to f16, as convert_hf_to_gguf does.
    assert types["blk.0.ffn_down.weight"] == outtype.upper()
    quantised = outtype.startswith("q")
    assert types["blk.0.attn_q.weight"] == ("F16" if quantised else outtype.upper())
    assert result.report["gguf"]["outtype"] == outtype


# -- in llama.cpp itself ---------------------------------------------------------------------------
def llama_cpp_required():
    return pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed (./run installs it with the tests)"
    )


@pytest.mark.parametrize(
    ("family", "kind"),
    [(f, "uniform") for f in CONFIGS] + [(f, "per-layer") for f in PER_LAYER],
)
def test_llama_cpp_runs_the_export_with_the_pruned_logits(family, kind, bpe_tokenizer, tmp_path):
    llama_cpp_required()
    selection_of = uniform_selection if kind == "uniform" else per_layer_selection
    model, s, sel, result = export(family, bpe_tokenizer, tmp_path, selection_of)
    ids = tokens(2, 20)  # longer than Gemma's sliding window of 8
    with torch.no_grad():
        want = prune_model(model, s, sel)(ids, use_cache=False).logits
    got = llama_cpp_logits(tmp_path / "out" / "model-f32.gguf", ids)
    assert (got - want).abs().max().item() < TINY_TOLERANCE
    assert result.max_abs_diff is not None and result.max_abs_diff < TINY_TOLERANCE
    assert result.report["verification"]["loader"].startswith("llama.cpp")


@pytest.mark.real
@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_smollm2_gguf_matches_transformers_in_llama_cpp_and_generates(
    allocation, smollm2, tmp_path
):
    llama_cpp = llama_cpp_required()
    from explorer.planning.plan import Plan

    ex = smollm2
    plan = Plan(criterion="l2", allocation=allocation, target=0.2)
    sel = ex.select(plan)
    result = export_model(
        ex.model, ex.workspace.tokenizer, ex.structure, sel, tmp_path / "out",
        plan=plan.to_dict(), format="gguf", gguf_type="f32", verify_ids=ex.evaluation[:1, :64],
    )  # fmt: skip
    arch = "llama" if allocation == "uniform" else "deci"
    assert result.report["gguf"]["architecture"] == arch
    assert result.report["gguf"]["tokenizer"].startswith("copied from SmolLM2")
    path = tmp_path / "out" / "model-f32.gguf"
    pruned = prune_model(ex.model, ex.structure, sel)
    tok = ex.workspace.tokenizer
    for prompt in ("The capital of France is", "Shares in the bank fell after the"):
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            want = pruned(ids.to(pruned.device)).logits.cpu()
        got = llama_cpp_logits(path, ids)
        assert (got - want).abs().max().item() < REAL_TOLERANCE
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, verbose=False, seed=0)
    try:
        assert llm.tokenize(b"The capital of France is", add_bos=False) == ids_of(tok)
        text = llm("The capital of France is", max_tokens=8, temperature=0.0)["choices"][0]["text"]
    finally:
        llm.close()
    assert text.strip()
    front, _ = read_card((tmp_path / "out" / "README.md").read_text())
    assert front["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert front["license"] == "apache-2.0"


def ids_of(tokenizer) -> list[int]:
    return tokenizer("The capital of France is").input_ids
