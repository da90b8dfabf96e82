"""Export: write a physically smaller model that the ordinary tools load, and prove that they do.

Public pruning code bases stop at ``torch.save`` of a pickled model, or write folders that
transformers cannot rebuild because layer widths differ. An export here is a transformers folder:

- *uniform* sizes (every kept layer alike): a plain folder (safetensors, config, tokenizer,
  generation config) that ``AutoModelForCausalLM.from_pretrained(path)`` loads with no extra code.
- *per-layer* sizes: the config also lists ``layer_sizes``, and ``auto_map`` names a small modeling
  file copied beside the weights (``explorer/pruned_modeling.py``), so
  ``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` builds it; ``load_pruned``
  loads it with this package's copy of that code instead, without remote code.
- *extra biases* (FLAP's bias compensation gives ``o_proj``/``down_proj`` biases a family may
  lack): where the family's config has flags that create them (Llama's ``attention_bias`` /
  ``mlp_bias``, Qwen3's and Gemma3's ``attention_bias``), the flags are set and the sibling
  biases they also create are written as zeros, so a uniform model still loads with plain
  transformers. Otherwise (Qwen2, Mistral, any ``down_proj`` bias outside Llama) the config lists
  them in ``extra_biases`` and the folder loads through the modeling file, like per-layer sizes.

Or, with ``format="gguf"``, one llama.cpp file instead of the transformers files
(``gguf_writer``: the family's architecture, or ``deci`` for per-layer sizes).

Beside the weights: ``plan.json`` (the caller's recipe, as given), ``selection.json`` (exactly
which units went, so the export replays without re-scoring), ``report.json`` (parameter
counts per layer, totals, perplexities the caller measured, criterion, time, library versions and
the verification result) and ``README.md`` (``model_card``: the Hugging Face model card). Every
export is reloaded the way a user would load it and its logits are
compared with the in-memory pruned model before the folder appears at its path: everything is
written to a hidden temporary folder beside the target and renamed into place only once verified.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import platform
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch
from torch import nn

from ..apply import masking
from ..apply.pruning import prune_model
from ..errors import ExportError
from ..model.families import Family, get_module
from ..model.loading import resolve_device, resolve_dtype
from ..model.structure import StructureMap
from ..planning.selection import Selection
from ..progress import Progress
from . import gguf_writer
from .model_card import model_card, source_license
from .pruned_modeling import PRUNED_CLASSES
from .safety import (
    check_target,
    clean_stale_partials,
    partial_prefix,
    swapped_name,
    write_errors,
)

MODELING_FILE = "modeling_pruned.py"
BIAS_FLAGS = ("attention_bias", "mlp_bias")
# Largest logit difference a reload may show: fp32 must match to 1e-4; half precisions round
# differently only if the kernels differ, so they get a looser bound.
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-6}
HALF_TOLERANCE = 5e-2
# report.json keys measured here; the caller's report cannot override them.
MEASURED = ("params", "layers", "verification", "versions", "uniform", "remote_code", "seconds")
MEASURED = (*MEASURED, "format", "gguf")
FORMATS = ("transformers", "gguf")


@dataclass(frozen=True)
class ExportResult:
    """Where the verified export is and what it contains."""

    path: Path
    uniform: bool  # same sizes in every layer
    remote_code: bool  # loads with trust_remote_code=True (or load_pruned), not with plain tools
    params_before: int
    params_after: int
    max_abs_diff: float | None  # largest logit difference of the reload (None: GGUF not run)
    files: list[str]
    report: dict = field(repr=False)


def export_model(
    model: nn.Module,
    tokenizer,
    structure: StructureMap,
    selection: Selection,
    out_dir: str | Path,
    *,
    plan: dict | None = None,
    report: dict | None = None,
    overwrite: bool = False,
    verify_ids: torch.LongTensor | None = None,
    progress: Progress | None = None,
    pruned: nn.Module | None = None,
    format: str = "transformers",
    gguf_type: str = "f16",
) -> ExportResult:
    """Prune a copy of ``model`` by ``selection``, write it to ``out_dir``, reload it and verify it.

    ``format``: ``"transformers"`` (a safetensors folder) or ``"gguf"`` (one llama.cpp file of
    tensor type ``gguf_type`` in the folder, see ``explorer.export.gguf_writer``). Either way the folder
    also holds plan.json, selection.json, report.json and a model card (README.md).

    ``pruned``: the already sliced (and perhaps recovered, e.g. LoRA-merged or bias-compensated)
    model for ``selection``; a copy of it is exported instead of slicing ``model`` again. Neither
    ``model`` nor ``pruned`` is changed, nor are the source model's files.

    ``verify_ids`` (windows, tokens): the inputs whose logits must match after the reload (default:
    two deterministic random windows of 64 tokens). Raises ``ExportError`` for an unusable target
    or a failed verification; the target is then left as it was.
    """
    started = time.perf_counter()
    step = progress or (lambda fraction, message: None)
    plan = plan.to_dict() if hasattr(plan, "to_dict") else plan
    target = Path(out_dir).expanduser().resolve()
    if format not in FORMATS:
        raise ExportError(f"Unknown export format '{format}'. Use one of: {', '.join(FORMATS)}.")
    gguf = format == "gguf"
    check_target(target, str(getattr(model, "name_or_path", "") or ""), overwrite)

    step(0.0, "Pruning a copy of the model")
    out = copy.deepcopy(pruned) if pruned is not None else prune_model(model, structure, selection)
    _drop_preview_masks(out)
    _drop_dequantised_quantizer(out)
    # A GGUF file carries whichever biases the weights have (the architecture choice checks them).
    extra_biases = [] if gguf else _carry_extra_biases(out, structure.family)
    uniform = not getattr(out.config, "layer_sizes", None)
    remote = not gguf and (not uniform or bool(extra_biases))
    if remote:
        cls = PRUNED_CLASSES[out.config.model_type]
        out.config.auto_map = {"AutoModelForCausalLM": f"{Path(MODELING_FILE).stem}.{cls.__name__}"}
    _check_config(out.config)
    ids = verify_ids if verify_ids is not None else default_verify_ids(out.config.vocab_size)
    device, dtype = _device_dtype(out)
    reference = _logits(out, ids)
    layers = _layer_report(model, out, structure, selection)
    params_before, params_after = count_params(model), count_params(out)

    step(0.25, "Saving weights, config and tokenizer")
    with write_errors(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_partials(target)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=partial_prefix(target)))
    try:
        with write_errors(target):
            _write_sidecars(tmp, plan, selection)
        if gguf:
            with write_errors(target):
                written = gguf_writer.write_gguf(
                    out, tokenizer, structure.family, tmp / f"model-{gguf_type}.gguf",
                    outtype=gguf_type,
                )  # fmt: skip
            del out
            step(0.6, "Reading the GGUF file back and running it in llama.cpp")
            verification = gguf_writer.verify_gguf(tmp / written["file"], written, reference, ids)
            diff = verification["max_abs_diff"]
        else:
            with write_errors(target):
                _write(out, tokenizer, tmp, remote)
            del out  # only the reloaded copy stays in memory beside the source

            step(0.55, "Reloading the folder as a user would")
            reloaded = _reload(tmp, remote, dtype, device)

            step(0.8, "Comparing logits with the in-memory pruned model")
            diff = _verify(reloaded, reference, ids, params_after, structure.tied)
            del reloaded
            written = None
            verification = {
                "max_abs_diff": diff,
                "tolerance": _tolerance(dtype),
                "dtype": str(dtype).removeprefix("torch."),
            }
        verification.update(windows=int(ids.shape[0]), tokens_per_window=int(ids.shape[1]))
        full_report = _report(
            model,
            structure,
            plan,
            report,
            uniform=uniform,
            remote=remote,
            extra_biases=extra_biases,
            layers=layers,
            params=(params_before, params_after),
            verification=verification,
            seconds=time.perf_counter() - started,
            gguf=written,
        )
        step(0.95, "Moving the verified folder into place")
        with write_errors(target):
            _write_json(tmp / "report.json", full_report)
            (tmp / "README.md").write_text(model_card(full_report, plan))
            _move_into_place(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    step(1.0, f"Exported to {target}")
    return ExportResult(
        path=target,
        uniform=uniform,
        remote_code=remote,
        params_before=params_before,
        params_after=params_after,
        max_abs_diff=diff,
        files=sorted(p.name for p in target.iterdir()),
        report=full_report,
    )


def load_pruned(
    path: str | Path, *, dtype: str | torch.dtype | None = None, device: str | None = None
) -> tuple[nn.Module, object]:
    """Load an export of either kind with this package's code: no remote code runs.

    ``dtype`` None keeps the saved precision; ``device`` None picks CUDA when available.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise ExportError(
            f"No exported model at '{folder}' (it has no config.json). "
            "Give the folder that export wrote."
        )
    config = AutoConfig.from_pretrained(folder)
    kwargs = {} if dtype is None else {"dtype": resolve_dtype(dtype, ExportError)}
    if getattr(config, "layer_sizes", None) or getattr(config, "extra_biases", None):
        if config.model_type not in PRUNED_CLASSES:
            raise ExportError(
                f"Per-layer models of type '{config.model_type}' are not supported. "
                f"Supported types: {', '.join(PRUNED_CLASSES)}."
            )
        model = PRUNED_CLASSES[config.model_type].from_pretrained(folder, config=config, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, config=config, **kwargs)
    return model.to(resolve_device(device)).eval(), AutoTokenizer.from_pretrained(folder)


def default_verify_ids(vocab_size: int, windows: int = 2, length: int = 64) -> torch.Tensor:
    """Deterministic random token windows: any input must give the same logits after a reload."""
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (windows, length), generator=generator)


def count_params(model: nn.Module) -> int:
    """Parameters, each shared tensor (tied embeddings) counted once."""
    return sum(p.numel() for p in model.parameters())


# -- moving into place -----------------------------------------------------------------------------
def _move_into_place(tmp: Path, target: Path) -> None:
    """Rename the verified folder to ``target``; an old one is swapped out, then deleted."""
    if not target.exists():
        tmp.rename(target)
        return
    old = swapped_name(target, uuid.uuid4().hex[:8])
    target.rename(old)
    try:
        tmp.rename(target)
    except OSError:
        old.rename(target)
        raise
    shutil.rmtree(old, ignore_errors=True)


# -- preparing the copy ---------------------------------------------------------------------------
def _drop_preview_masks(model: nn.Module) -> None:
    """Remove preview masks the copy inherited: they are sized for the dense model."""
    for module in model.modules():
        for hooks in (module._forward_hooks, module._forward_pre_hooks):
            for key, hook in list(hooks.items()):
                if getattr(hook, "__module__", None) == masking.__name__:
                    del hooks[key]
                    module._forward_hooks_with_kwargs.pop(key, None)
                    module._forward_pre_hooks_with_kwargs.pop(key, None)


def _drop_dequantised_quantizer(model: nn.Module) -> None:
    """A GGUF-loaded model holds plain tensors but refuses ``save_pretrained`` until this goes."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config
        return
    method = getattr(quantizer.quantization_config, "quant_method", None)
    method = getattr(method, "value", method)
    if method != "gguf":
        raise ExportError(
            f"The model is quantized with {method}, whose weights cannot be sliced. "
            "Load it in full precision (float32 or bfloat16) to prune and export it."
        )
    quantizer.remove_quantization_config(model)


def _native_biases(layer: nn.Module, config, family: Family) -> set[str]:
    """Linears that the family's own code gives a bias under ``config`` (built on meta: free)."""
    with torch.device("meta"):
        probe = type(layer)(config, 0)
    return {name for name in family.linears if probe.get_submodule(name).bias is not None}


def _carry_extra_biases(model: nn.Module, family: Family) -> list[str]:
    """Make every bias the family's config does not create survive a reload.

    Prefers the smallest set of the family's own bias flags that creates them all (then the
    folder needs no extra code; the flags' other biases are added as zeros). Otherwise lists
    them in ``config.extra_biases`` for the modeling file and returns them.
    """
    layers = get_module(model, family.layers)
    config = model.config
    present = {
        name
        for layer in layers
        for name in family.linears
        if layer.get_submodule(name).bias is not None
    }
    extra = present - _native_biases(layers[0], config, family)
    if hasattr(config, "extra_biases"):
        del config.extra_biases  # recomputed here from the weights themselves
    if not extra:
        return []
    flags = [f for f in BIAS_FLAGS if isinstance(getattr(config, f, None), bool)]
    for n in range(1, len(flags) + 1):
        for chosen in itertools.combinations(flags, n):
            trial = copy.deepcopy(config)
            for flag in chosen:
                setattr(trial, flag, True)
            created = _native_biases(layers[0], trial, family)
            if extra <= created:
                for flag in chosen:
                    setattr(config, flag, True)
                _add_zero_biases(layers, created)
                return []
    config.extra_biases = sorted(extra)
    _add_zero_biases(layers, extra)
    return sorted(extra)


def _add_zero_biases(layers: nn.ModuleList, names: set[str]) -> None:
    for layer in layers:
        for name in names:
            linear = layer.get_submodule(name)
            if linear.bias is None:
                linear.bias = nn.Parameter(torch.zeros_like(linear.weight[:, 0]))


def _check_config(config) -> None:
    """Refuse a config that transformers itself would refuse to load (its strict validation)."""
    if not hasattr(config, "validate"):  # configs without transformers' strict checks
        return
    from huggingface_hub.errors import StrictDataclassError

    try:
        config.validate()
    except (StrictDataclassError, ValueError, TypeError) as exc:
        cause = exc.__cause__ or exc
        raise ExportError(
            f"transformers would refuse the pruned config: {cause}. "
            "Remove hidden channels so that hidden_size stays a multiple of the head count."
        ) from exc


# -- writing, reloading, verifying ------------------------------------------------------------------
def _write(model: nn.Module, tokenizer, folder: Path, remote: bool) -> None:
    model.save_pretrained(folder)  # safetensors; a tied output head is stored once
    tokenizer.save_pretrained(folder)
    if remote:
        shutil.copyfile(Path(__file__).with_name("pruned_modeling.py"), folder / MODELING_FILE)


def _write_sidecars(folder: Path, plan: dict | None, selection: Selection) -> None:
    # The exact units removed, compact: replays without re-scoring (Selection.from_dict).
    (folder / "selection.json").write_text(json.dumps(selection.to_dict()) + "\n")
    if plan is not None:
        _write_json(folder / "plan.json", plan)


def _reload(folder: Path, remote: bool, dtype: torch.dtype, device: torch.device) -> nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, trust_remote_code=remote)
    except Exception as exc:  # whatever transformers raises, the export is unusable
        raise ExportError(
            f"The written folder does not load with transformers: {exc}. "
            "Report this as a bug, with the plan that produced it."
        ) from exc
    return model.to(device).eval()


def _verify(
    reloaded: nn.Module, reference: torch.Tensor, ids: torch.Tensor, params: int, tied: bool
) -> float:
    got = count_params(reloaded)
    if got != params:
        raise ExportError(
            f"The reloaded model has {got:,} parameters, the pruned one {params:,}. "
            "Report this as a bug, with the plan that produced it."
        )
    if tied and (
        reloaded.get_output_embeddings().weight.data_ptr()
        != reloaded.get_input_embeddings().weight.data_ptr()
    ):
        raise ExportError(
            "The reloaded model no longer ties its output head to its embeddings. "
            "Report this as a bug, with the plan that produced it."
        )
    diff = (_logits(reloaded, ids).float() - reference.float()).abs().max().item()
    tolerance = _tolerance(next(reloaded.parameters()).dtype)
    if not math.isfinite(diff) or diff >= tolerance:
        raise ExportError(
            f"The reloaded model's logits differ from the pruned model's by {diff:.3g} "
            f"(allowed: {tolerance:g}). The folder was not written; report this as a bug."
        )
    return diff


@torch.no_grad()
def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    return model(ids.to(device), use_cache=False).logits.cpu()


def _tolerance(dtype: torch.dtype) -> float:
    return TOLERANCE.get(dtype, HALF_TOLERANCE)


def _device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype


# -- the report ---------------------------------------------------------------------------------------
def _report(
    model: nn.Module,
    structure: StructureMap,
    plan: dict | None,
    caller: dict | None,
    *,
    uniform: bool,
    remote: bool,
    extra_biases: list[str],
    layers: list[dict],
    params: tuple[int, int],
    verification: dict,
    seconds: float,
    gguf: dict | None = None,
) -> dict:
    """report.json: the caller's entries (perplexities, timings) merged with what was measured."""
    if gguf is not None:
        loader = f"llama.cpp: llama-cli -m {gguf['file']} (or llama_cpp.Llama(model_path=...))"
    else:
        loader = "AutoModelForCausalLM.from_pretrained(path" + (
            ", trust_remote_code=True)" if remote else ")"
        )
    measured = {
        "format": "gguf" if gguf is not None else "transformers",
        "gguf": gguf,
        "license": source_license(model),
        "source": str(getattr(model, "name_or_path", "") or ""),
        "model_type": model.config.model_type,
        "family": structure.family.name,
        "criterion": (caller or {}).get("criterion") or (plan or {}).get("criterion"),
        "uniform": uniform,
        "remote_code": remote,
        "load_with": loader,
        "extra_biases": extra_biases,
        "params": _totals(layers, *params),
        "layers": layers,
        "verification": {**verification, "loader": loader},
        "versions": _versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(seconds, 3),
    }
    return {**measured, **(caller or {}), **{k: measured[k] for k in MEASURED}}


def _layer_report(
    source: nn.Module, pruned: nn.Module, s: StructureMap, selection: Selection
) -> list[dict]:
    """Per dense layer: parameters and sizes before and after, and its index in the export."""
    before_layers = get_module(source, s.family.layers)
    after_layers = get_module(pruned, s.family.layers)
    new_index = {old: new for new, old in enumerate(selection.kept_layers(s))}
    dense = {"heads": s.heads, "kv_heads": s.kv_heads, "intermediate": s.intermediate}
    rows = []
    for i, layer in enumerate(before_layers):
        j = new_index.get(i)
        rows.append(
            {
                "layer": i,
                "new_index": j,
                "params_before": count_params(layer),
                "params_after": 0 if j is None else count_params(after_layers[j]),
                "sizes_before": dense,
                "sizes_after": None if j is None else selection.kept(s, i),
            }
        )
    return rows


def _totals(layers: list[dict], before: int, after: int) -> dict:
    blocks_before = sum(r["params_before"] for r in layers)
    blocks_after = sum(r["params_after"] for r in layers)
    return {
        "total_before": before,
        "total_after": after,
        "blocks_before": blocks_before,
        "blocks_after": blocks_after,
        "removed_share_of_blocks": 1 - blocks_after / blocks_before,
        "removed_share_of_total": 1 - after / before,
    }


def _versions() -> dict[str, str]:
    import transformers

    try:
        package = metadata.version("pruning-explorer")
    except metadata.PackageNotFoundError:
        package = "not installed (source checkout)"
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "pruning-explorer": package,
    }


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")


def _json_default(value):
    """Numbers from torch/numpy as plain numbers, paths and anything else as text."""
    if hasattr(value, "item"):
        return value.item()
    return str(value)
