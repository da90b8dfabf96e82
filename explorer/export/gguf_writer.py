"""GGUF files for llama.cpp: the pruned model as one file that llama.cpp (and the tools on it) run.

llama.cpp's loader reads ``{arch}.attention.head_count``, ``{arch}.attention.head_count_kv`` and
``{arch}.feed_forward_length`` either as one number or as one number per layer, for every
architecture; but only some architectures build their tensors and graph from the per-layer
values. For the families pruned here:

- uniform sizes: the family's own architecture (``llama`` for Llama/SmolLM2/Mistral, ``qwen2``,
  ``qwen3``, ``gemma3``), written as llama.cpp's ``convert_hf_to_gguf.py`` writes it; except a
  Qwen2 with query heads removed, which llama.cpp's ``qwen2`` cannot size (it assumes
  heads x head_dim = hidden size) and which is written as ``deci``.
- per-layer sizes: ``deci``, the architecture of NVIDIA's NAS-pruned Llama-3.1-Nemotron models,
  whose tensors and graph take every layer's head count, kv-head count and MLP width from the
  arrays. It is Llama's decoder (RMSNorm, SwiGLU, rotary attention with optional q/k/v/o and MLP
  biases), so Llama, Mistral and Qwen2 (Llama plus q/k/v biases) map onto it exactly. Qwen3
  (per-head q/k norms) and Gemma3 (four norms per layer, GELU, sliding windows) have no
  per-layer-capable architecture in llama.cpp: they are refused with ``ExportError``.

Llama-style rotary embeddings in llama.cpp rotate consecutive pairs of a head's values
(``rope type NORM``), transformers rotates the two halves, so the q/k rows of ``llama`` and
``deci`` files are permuted per head (``convert_hf_to_gguf``'s ``LlamaModel.permute``); Qwen and
Gemma run llama.cpp's half-rotating ``NEOX`` rope and are written unpermuted. Gemma's norm
weights are stored as w − 1 by transformers and as w by llama.cpp.

The vocabulary is copied verbatim from the source GGUF when the model came from one (the embedded
models do), so llama.cpp tokenises text exactly as the published file did; otherwise it is
written from a byte-level BPE tokenizer (tokens, types, merges, special ids, chat template).
"""

from __future__ import annotations

import importlib.util
import json
import math
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import ExportError
from ..model.families import Family, get_module

# Tensor types the writer produces; the quantised ones are packed by gguf.quants.
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
SOURCE = "source"  # the source GGUF's own type, when the writer can produce it
FAMILY_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
FAMILY_ARCH["gemma3_text"] = "gemma3"
PERMUTED_ARCHS = ("llama", "deci")  # archs whose rope rotates consecutive pairs
PER_LAYER_ARCH = "deci"
PER_LAYER_TYPES = ("llama", "mistral", "qwen2")  # model types deci expresses exactly
# Largest logit difference llama.cpp may show for an f32 file, run with an f32 KV cache: the
# weights are torch's, only the summation order differs (measured: 3e-3 on SmolLM2, whose logits
# reach ~30). f16 weights and quantised types also round the activations in llama.cpp's matrix
# products (to f16, or to 8-bit blocks), which moves a pruned SmolLM2's logits by 1-30: those files
# report their difference and top-1 agreement, and are not held to a bound.
GGUF_TOLERANCE = {"f32": 1e-2}


@dataclass(frozen=True)
class LayerShape:
    heads: int
    kv_heads: int
    intermediate: int


def gguf_type(name: str):
    """The GGML tensor type of ``name`` (one of ``GGUF_TYPES``)."""
    import gguf

    if name not in GGUF_TYPES:
        raise ExportError(
            f"Unknown GGUF type '{name}'. Use one of: {', '.join(GGUF_TYPES)}, or '{SOURCE}'."
        )
    return gguf.GGMLQuantizationType[name.upper()]


def source_gguf(model: nn.Module) -> Path | None:
    """The GGUF file the model was de-quantised from, where it is still known and on disk."""
    from ..model.loading import EMBEDDED, cache_root, embedded_cache_dir

    name = str(getattr(model, "name_or_path", "") or "")
    if name.endswith(".gguf") and Path(name).is_file():
        return Path(name)
    for spec in EMBEDDED.values():
        if name and Path(name).expanduser().resolve() == embedded_cache_dir(spec.name).resolve():
            path = cache_root() / "gguf" / spec.gguf_name
            return path if path.is_file() else None
    return None


def resolve_type(name: str, source: Path | None) -> str:
    """``name``, with ``source`` replaced by the source file's type when the writer supports it."""
    if name != SOURCE:
        gguf_type(name)
        return name
    if source is None:
        raise ExportError(
            "The model did not come from a GGUF file, so it has no source quantisation. "
            f"Choose one of: {', '.join(GGUF_TYPES)}."
        )
    import gguf

    reader = gguf.GGUFReader(str(source))
    field = reader.fields.get("general.file_type")
    file_type = gguf.LlamaFileType(int(field.contents())) if field else None
    found = {
        gguf.LlamaFileType.ALL_F32: "f32",
        gguf.LlamaFileType.MOSTLY_F16: "f16",
        gguf.LlamaFileType.MOSTLY_BF16: "bf16",
        gguf.LlamaFileType.MOSTLY_Q8_0: "q8_0",
        gguf.LlamaFileType.MOSTLY_Q5_1: "q5_1",
        gguf.LlamaFileType.MOSTLY_Q5_0: "q5_0",
        gguf.LlamaFileType.MOSTLY_Q4_1: "q4_1",
        gguf.LlamaFileType.MOSTLY_Q4_0: "q4_0",
    }.get(file_type)
    if found is None:
        label = file_type.name if file_type is not None else "unknown"
        raise ExportError(
            f"The source file is {label}, which this writer cannot quantise to. "
            f"Choose one of: {', '.join(GGUF_TYPES)}."
        )
    return found


def layer_shapes(model: nn.Module, family: Family) -> list[LayerShape]:
    """Every layer's head count, kv-head count and MLP width, read from its weights."""
    head_dim = _head_dim(model, family)
    return [
        LayerShape(
            heads=layer.get_submodule(family.q).weight.shape[0] // head_dim,
            kv_heads=layer.get_submodule(family.k).weight.shape[0] // head_dim,
            intermediate=layer.get_submodule(family.gate).weight.shape[0],
        )
        for layer in get_module(model, family.layers)
    ]


def choose_arch(model: nn.Module, family: Family) -> str:
    """The llama.cpp architecture that loads this model exactly, or ``ExportError``."""
    model_type = model.config.model_type
    if model_type not in FAMILY_ARCH:
        raise ExportError(f"GGUF export does not support models of type '{model_type}'.")
    shapes = layer_shapes(model, family)
    arch = FAMILY_ARCH[model_type]
    if len(set(shapes)) > 1:
        if model_type not in PER_LAYER_TYPES:
            raise ExportError(
                f"llama.cpp has no architecture that runs {model_type} layers of different sizes "
                "(per-layer sizes load only as 'deci', a Llama-style decoder). Export this plan "
                "with uniform sizes (allocation 'uniform'), or export the transformers folder."
            )
        arch = PER_LAYER_ARCH
    if arch == "qwen2" and shapes[0].heads * _head_dim(model, family) != model.config.hidden_size:
        arch = PER_LAYER_ARCH  # llama.cpp's qwen2 sizes q/o as hidden x hidden: no head pruning
    biases = _biases(model, family)
    allowed = _ALLOWED_BIASES[arch]
    if biases - allowed:
        if model_type in PER_LAYER_TYPES and biases <= _ALLOWED_BIASES[PER_LAYER_ARCH]:
            return PER_LAYER_ARCH  # deci takes every bias a Llama-style layer can have
        raise ExportError(
            f"llama.cpp's {arch} architecture has no {', '.join(sorted(biases - allowed))} "
            "bias, which this model carries (bias compensation). Export without that recovery "
            "step, or export the transformers folder."
        )
    return arch


def write_gguf(
    model: nn.Module, tokenizer, family: Family, path: Path, *, outtype: str = "f16"
) -> dict:
    """Write ``model`` to ``path`` as GGUF; returns what was written (arch, types, sizes)."""
    import gguf

    source = source_gguf(model)
    outtype = resolve_type(outtype, source)
    arch = choose_arch(model, family)
    config = model.config
    shapes = layer_shapes(model, family)
    writer = gguf.GGUFWriter(str(path), arch)
    _write_hparams(writer, config, shapes, _head_dim(model, family), arch, outtype)
    vocab_rows = get_module(model, family.embed).weight.shape[0]
    tokenizer_source = _write_vocab(writer, tokenizer, source, vocab_rows)
    types: dict[str, int] = {}
    for name, tensor in _tensors(model, family, arch, shapes):
        data, qtype = _encode(tensor, outtype)
        writer.add_tensor(name, data, raw_dtype=qtype)
        types[qtype.name] = types.get(qtype.name, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    uniform = len(set(shapes)) == 1
    return {
        "file": path.name,
        "architecture": arch,
        "outtype": outtype,
        "tensor_types": types,
        "tensors": sum(types.values()),
        "uniform": uniform,
        "layer_sizes": [vars(s) for s in shapes],
        "tokenizer": tokenizer_source,
        "bytes": path.stat().st_size,
    }


def read_gguf(path: str | Path) -> tuple[dict, dict[str, tuple[int, ...]]]:
    """(scalar and array keys except the vocabulary, tensor name -> numpy shape) of a GGUF file."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    keys = {
        name: field.contents()
        for name, field in reader.fields.items()
        if not name.startswith(("GGUF.", "tokenizer.ggml.tokens", "tokenizer.ggml.merges"))
        and not name.startswith(("tokenizer.ggml.token_type", "tokenizer.ggml.scores"))
    }
    shapes = {t.name: tuple(int(n) for n in reversed(t.shape.tolist())) for t in reader.tensors}
    return keys, shapes


def verify_gguf(path: Path, written: dict, reference: torch.Tensor, ids: torch.Tensor) -> dict:
    """Read the file back, then run it in llama.cpp (where installed) against ``reference`` logits.

    Raises ``ExportError`` when the file reads back differently from what was written, or when an
    f32 file's logits are off by more than ``GGUF_TOLERANCE``; other types only report their
    difference and top-1 agreement (rounding changes logits by design).
    """
    keys, shapes = read_gguf(path)
    arch = keys.get("general.architecture")
    heads = keys.get(f"{arch}.attention.head_count")
    want = [s["heads"] for s in written["layer_sizes"]]
    got = heads if isinstance(heads, list) else [heads] * len(want)
    if arch != written["architecture"] or got != want or len(shapes) != written["tensors"]:
        raise ExportError(
            f"The written GGUF file reads back as {arch} with {len(shapes)} tensors and head "
            f"counts {got}, not as written. Report this as a bug, with the plan that produced it."
        )
    if importlib.util.find_spec("llama_cpp") is None:
        return {
            "loader": "gguf.GGUFReader",
            "max_abs_diff": None,
            "note": "read back with gguf only (keys, tensor shapes); llama-cpp-python is not "
            "installed, so the logits were not compared.",
        }
    logits = llama_cpp_logits(path, ids)
    diff = (logits - reference.float()).abs().max().item()
    top1 = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
    tolerance = GGUF_TOLERANCE.get(written["outtype"])
    if not math.isfinite(diff) or (tolerance is not None and diff >= tolerance):
        raise ExportError(
            f"llama.cpp's logits differ from the pruned model's by {diff:.3g} "
            f"(allowed: {tolerance:g}). The file was not written; report this as a bug."
        )
    return {
        "loader": f"llama.cpp (llama-cpp-python {metadata.version('llama-cpp-python')})",
        "max_abs_diff": diff,
        "tolerance": tolerance,
        "top1_agreement": top1,
        "outtype": written["outtype"],
    }


# -- hyper-parameters -----------------------------------------------------------------------------
_ALLOWED_BIASES = {
    "llama": {"q", "k", "v", "o", "gate", "up", "down"},
    "deci": {"q", "k", "v", "o", "gate", "up", "down"},
    "qwen2": {"q", "k", "v"},
    "qwen3": set(),
    "gemma3": set(),
}


def _biases(model: nn.Module, family: Family) -> set[str]:
    """Short names (q, k, v, o, gate, up, down) of linears that carry a bias in some layer."""
    short = dict(zip(family.linears, ("q", "k", "v", "o", "gate", "up", "down"), strict=True))
    return {
        short[name]
        for layer in get_module(model, family.layers)
        for name in family.linears
        if layer.get_submodule(name).bias is not None
    }


def _head_dim(model: nn.Module, family: Family) -> int:
    """From the attention module: a pruned config's hidden_size // heads is no longer it."""
    return get_module(model, f"{family.layers}.0.{family.attention}").head_dim


def _rope(config) -> tuple[dict, dict | None]:
    """(full-attention rope parameters, sliding-window ones or None)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if "full_attention" in params:
        return params["full_attention"], params.get("sliding_attention")
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    return {**params, "rope_theta": theta}, None


def _write_hparams(
    writer, config, shapes: list[LayerShape], head_dim: int, arch: str, outtype: str
) -> None:
    import gguf

    uniform = len(set(shapes)) == 1

    def per_layer(values: list[int]) -> int | list[int]:
        return values[0] if uniform else values

    writer.add_name(str(getattr(config, "_name_or_path", "") or config.model_type) + " (pruned)")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(len(shapes))
    writer.add_feed_forward_length(per_layer([s.intermediate for s in shapes]))
    writer.add_head_count(per_layer([s.heads for s in shapes]))
    writer.add_head_count_kv(per_layer([s.kv_heads for s in shapes]))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    full, sliding = _rope(config)
    rope_type = full.get("rope_type", "default")
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(full["factor"])
    elif rope_type != "default":
        raise ExportError(
            f"GGUF export does not write '{rope_type}' rotary scaling yet. "
            "Export the transformers folder for this model."
        )
    writer.add_rope_freq_base(full["rope_theta"])
    if arch in PERMUTED_ARCHS:
        writer.add_rope_dimension_count(head_dim)
    if arch == "gemma3":
        _gemma3_hparams(writer, config, sliding, head_dim)
    name = "ALL_F32" if outtype == "f32" else f"MOSTLY_{outtype.upper()}"
    writer.add_file_type(gguf.LlamaFileType[name])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _gemma3_hparams(writer, config, sliding: dict | None, head_dim: int) -> None:
    scalar = getattr(config, "query_pre_attn_scalar", head_dim)
    if scalar != head_dim:
        raise ExportError(
            f"llama.cpp scales Gemma3 attention by 1/sqrt(head_dim = {head_dim}), this model by "
            f"1/sqrt({scalar}); the GGUF file would compute different logits. "
            "Export the transformers folder for this model."
        )
    if getattr(config, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
    layer_types = getattr(config, "layer_types", None)
    if layer_types and "sliding_attention" in layer_types:
        writer.add_sliding_window(config.sliding_window)
        writer.add_sliding_window_pattern([t == "sliding_attention" for t in layer_types])
        if sliding is not None:
            writer.add_rope_freq_base_swa(sliding["rope_theta"])


# -- tensors --------------------------------------------------------------------------------------
def _permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of each head from [first half, second half] order to interleaved pairs."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def _layer_names(family: Family, gemma: bool) -> dict[str, str]:
    """GGUF names of a layer's modules (linears and norms)."""
    names = dict(
        zip(
            family.linears,
            ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"),
            strict=True,
        )
    )
    if gemma:
        norms = ("attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm")
    else:
        norms = ("attn_norm", "ffn_norm")
    names.update(zip(family.hidden_norms, norms, strict=True))
    names.update({"self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"})
    return names


def _tensors(model: nn.Module, family: Family, arch: str, shapes: list[LayerShape]):
    """(GGUF name, fp32 tensor) for every tensor llama.cpp needs, in file order."""
    shift = family.norm_offset  # llama.cpp multiplies by the stored norm weight as is
    embed = get_module(model, family.embed).weight
    yield "token_embd.weight", embed
    yield "output_norm.weight", get_module(model, family.final_norm).weight + shift
    head = get_module(model, family.lm_head).weight
    if head.data_ptr() != embed.data_ptr():
        yield "output.weight", head
    names = _layer_names(family, arch == "gemma3")
    permute = arch in PERMUTED_ARCHS
    for i, (layer, shape) in enumerate(zip(get_module(model, family.layers), shapes, strict=True)):
        for path, short in names.items():
            try:
                module = layer.get_submodule(path)
            except AttributeError:
                continue
            for param in ("weight", "bias"):
                value = getattr(module, param, None)
                if value is None:
                    continue
                if "norm" in short:
                    value = value + shift
                elif permute and path == family.q:
                    value = _permute(value, shape.heads)
                elif permute and path == family.k:
                    value = _permute(value, shape.kv_heads)
                yield f"blk.{i}.{short}.{param}", value


def _encode(tensor: torch.Tensor, outtype: str):
    """(numpy data, GGML type): norms and biases stay f32; a matrix whose rows do not fill whole
    quantisation blocks (a pruned width) falls back to f16, as convert_hf_to_gguf does."""
    import gguf
    from gguf.quants import quantize

    array = tensor.detach().to("cpu", torch.float32).contiguous().numpy()
    qtype = gguf_type(outtype)
    if array.ndim < 2 or qtype == gguf.GGMLQuantizationType.F32:
        return array, gguf.GGMLQuantizationType.F32
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if array.shape[-1] % block:
        qtype = gguf.GGMLQuantizationType.F16
    if qtype == gguf.GGMLQuantizationType.F16:
        return array.astype(np.float16), qtype
    return quantize(array, qtype), qtype


# -- vocabulary -----------------------------------------------------------------------------------
def _write_vocab(writer, tokenizer, source: Path | None, rows: int) -> str:
    """Copy the source GGUF's vocabulary, or write one from a byte-level BPE tokenizer."""
    if source is not None and _copy_vocab(writer, source, rows):
        return f"copied from {source.name}"
    _vocab_from_tokenizer(writer, tokenizer, rows)
    return "written from the transformers tokenizer"


def _copy_vocab(writer, source: Path, rows: int) -> bool:
    import gguf

    reader = gguf.GGUFReader(str(source))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None or len(tokens.data) != rows:
        return False
    for name, field in reader.fields.items():
        if not name.startswith("tokenizer."):
            continue
        main = field.types[0]
        if main == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(name, field.contents(), main, sub_type=field.types[-1])
        else:
            writer.add_key_value(name, field.contents(), main)
    return True


def _vocab_from_tokenizer(writer, tokenizer, rows: int) -> None:
    """tokens, token types and merges as convert_hf_to_gguf's gpt2 vocabulary, via SpecialVocab."""
    import gguf

    backend = (
        json.loads(tokenizer.backend_tokenizer.to_str())
        if hasattr(tokenizer, "backend_tokenizer")
        else {}
    )
    model = backend.get("model", {})
    if model.get("type") != "BPE" or (backend.get("decoder") or {}).get("type") != "ByteLevel":
        raise ExportError(
            "GGUF export writes byte-level BPE vocabularies (Llama 3, SmolLM, Qwen, GPT-2 style); "
            "this tokenizer is not one, and the model did not come from a GGUF file whose "
            "vocabulary could be copied. Export the transformers folder instead."
        )
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = {t.content: t for t in tokenizer.added_tokens_decoder.values()}
    tokens, types = [], []
    for i in range(rows):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif token in added:
            tokens.append(token)
            types.append(
                gguf.TokenType.CONTROL if added[token].special else gguf.TokenType.USER_DEFINED
            )
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=rows)
        special.add_to_gguf(writer, quiet=True)


def llama_cpp_logits(
    path: str | Path, ids: torch.Tensor, *, threads: int | None = None
) -> torch.Tensor:
    """Logits llama.cpp computes for each row of ``ids`` (windows, tokens), one window at a time.

    Needs ``llama-cpp-python``; raises ``ExportError`` where it is not installed.
    """
    try:
        from llama_cpp import Llama
    except ImportError as exc:
        raise ExportError(
            "llama-cpp-python is not installed, so the GGUF file cannot be run here. "
            "Install it with: pip install llama-cpp-python"
        ) from exc
    llm = Llama(
        model_path=str(path),
        n_ctx=max(int(ids.shape[1]), 8),
        n_batch=max(int(ids.shape[1]), 8),
        logits_all=True,
        verbose=False,
        n_threads=threads,
        seed=0,
        type_k=0,  # GGML_TYPE_F32: llama.cpp's default f16 cache alone moves logits by ~1e-2
        type_v=0,
    )
    out = []
    try:
        for row in ids.tolist():
            llm.reset()
            llm.eval(row)
            out.append(torch.from_numpy(np.array(llm.scores[: len(row)], dtype=np.float32)))
    finally:
        llm.close()
    return torch.stack(out)
