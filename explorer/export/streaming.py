"""Exporting a model larger than memory: the pruned folder written shard by shard.

The source folder's weights are never loaded whole. A skeleton of the model is built on the
``meta`` device (no memory); then, one piece at a time (the embedding, final norm and output head;
then each kept decoder layer), a copy of the skeleton gets only that piece's tensors read from the
source safetensors, ``prune_model`` slices it exactly as it slices a model in memory (on ``meta``
the other pieces cost nothing), and the piece's pruned tensors go to their own safetensors shard.
At any moment the resident weights are one source piece and its pruned copy, which must fit
``max_memory_bytes``. The folder (shards, ``model.safetensors.index.json``, config, tokenizer,
plan, selection, report, model card) is the one ``export_model`` writes for the same selection,
tensor for tensor; it is checked against the pruned skeleton's names and shapes before it is moved
into place (its logits are not compared: the model it would be compared with does not fit).
Recovery steps need the whole model in memory and are not available here.
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from ..apply.pruning import prune_model
from ..errors import ExportError
from ..model.families import family_for, get_module
from ..model.loading import resolve_dtype
from ..model.structure import StructureMap
from ..planning.selection import Selection
from ..progress import Progress
from . import writer
from .model_card import model_card
from .pruned_modeling import PRUNED_CLASSES
from .safety import check_target, clean_stale_partials, partial_prefix, write_errors

INDEX = "model.safetensors.index.json"


def export_streaming(
    source: str | Path,
    selection: Selection,
    out_dir: str | Path,
    *,
    max_memory_bytes: int,
    dtype: str | torch.dtype = "float32",
    plan: dict | None = None,
    report: dict | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> writer.ExportResult:
    """Prune the transformers folder ``source`` by ``selection`` into ``out_dir``, piece by piece.

    Raises ``ExportError`` when one piece and its pruned copy do not fit ``max_memory_bytes``.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    step = progress or (lambda fraction, message: None)
    folder = Path(source).expanduser()
    target = Path(out_dir).expanduser().resolve()
    torch_dtype = resolve_dtype(dtype, ExportError)
    config = AutoConfig.from_pretrained(folder)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    skeleton.name_or_path = str(folder)
    skeleton.tie_weights()
    check_target(target, str(folder), overwrite)
    structure = StructureMap(skeleton, family_for(skeleton))
    pruned_skeleton = prune_model(skeleton, structure, selection)
    files = _source_files(folder)
    pieces = _pieces(skeleton, structure.family.layers, selection.kept_layers(structure))
    kept = range(len(selection.kept_layers(structure)))
    pruned_pieces = _pieces(pruned_skeleton, structure.family.layers, kept)
    need = _bytes(skeleton, pieces) + _bytes(pruned_skeleton, pruned_pieces)
    if need > max_memory_bytes:
        raise ExportError(
            f"The largest piece of the model and its pruned copy take up to {need:,} bytes, more "
            f"than the budget of {max_memory_bytes:,}. Raise the budget."
        )

    with write_errors(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_partials(target)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=partial_prefix(target)))
    try:
        weight_map, shapes, peak, total = {}, {}, 0, 0
        for k, names in enumerate(pieces):
            step(k / len(pieces), f"Pruning piece {k + 1} of {len(pieces)}")
            tensors, resident = _prune_piece(skeleton, structure, selection, names, files)
            shard = f"model-{k + 1:05d}-of-{len(pieces):05d}.safetensors"
            _save(tensors, tmp / shard)
            weight_map.update(dict.fromkeys(tensors, shard))
            shapes.update({name: tuple(t.shape) for name, t in tensors.items()})
            total += sum(t.numel() * t.element_size() for t in tensors.values())
            peak = max(peak, resident)
        _check_complete(pruned_skeleton, shapes)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        uniform = not getattr(pruned_skeleton.config, "layer_sizes", None)
        if not uniform:
            cls = PRUNED_CLASSES[pruned_skeleton.config.model_type]
            module = Path(writer.MODELING_FILE).stem
            pruned_skeleton.config.auto_map = {"AutoModelForCausalLM": f"{module}.{cls.__name__}"}
            shutil.copyfile(
                Path(writer.__file__).with_name("pruned_modeling.py"), tmp / writer.MODELING_FILE
            )
        pruned_skeleton.config.save_pretrained(tmp)
        if (folder / "generation_config.json").is_file():
            shutil.copyfile(folder / "generation_config.json", tmp / "generation_config.json")
        AutoTokenizer.from_pretrained(folder).save_pretrained(tmp)
        writer._write_sidecars(tmp, plan, selection)
        layers = writer._layer_report(skeleton, pruned_skeleton, structure, selection)
        params = (writer.count_params(skeleton), writer.count_params(pruned_skeleton))
        full_report = writer._report(
            skeleton,
            structure,
            plan,
            report,
            uniform=uniform,
            remote=not uniform,
            extra_biases=[],
            layers=layers,
            params=params,
            verification={
                "max_abs_diff": None,
                "loader": "names and shapes against the pruned skeleton",
                "note": "streamed shard by shard; logits not compared (the source does not fit)",
                "peak_resident_bytes": peak,
                "budget_bytes": max_memory_bytes,
                "shards": len(pieces),
            },
            seconds=time.perf_counter() - started,
        )
        writer._write_json(tmp / "report.json", full_report)
        (tmp / "README.md").write_text(model_card(full_report, plan))
        step(0.95, "Moving the checked folder into place")
        with write_errors(target):
            writer._move_into_place(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    step(1.0, f"Exported to {target}")
    return writer.ExportResult(
        path=target,
        uniform=uniform,
        remote_code=not uniform,
        params_before=params[0],
        params_after=params[1],
        max_abs_diff=None,
        files=sorted(p.name for p in target.iterdir()),
        report=full_report,
    )


def _pieces(model: nn.Module, layers_path: str, layers) -> list[list[str]]:
    """Parameter names per piece: everything outside the decoder layers, then each listed layer."""
    prefix = f"{layers_path}."
    names = [n for n, _ in model.named_parameters()]  # a tied head appears once, as the embedding
    outside = [n for n in names if not n.startswith(prefix)]
    return [outside, *([n for n in names if n.startswith(f"{prefix}{i}.")] for i in layers)]


def _bytes(model: nn.Module, pieces: list[list[str]]) -> int:
    """Bytes of the largest piece, in the model's dtype."""
    return max(
        sum(model.get_parameter(n).numel() * model.get_parameter(n).element_size() for n in names)
        for names in pieces
    )


def _source_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file that holds it (one file, or a sharded index)."""
    index = folder / INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / "model.safetensors"
    if not single.is_file():
        raise ExportError(
            f"'{folder}' has no safetensors weights. Streaming export reads a transformers folder "
            "saved with safetensors (save_pretrained writes one)."
        )
    from safetensors import safe_open

    with safe_open(str(single), framework="pt") as f:
        return dict.fromkeys(f.keys(), single)


def _prune_piece(
    skeleton: nn.Module,
    s: StructureMap,
    selection: Selection,
    names: list[str],
    files: dict[str, Path],
) -> tuple[dict[str, torch.Tensor], int]:
    """(pruned tensors of this piece by their new names, bytes resident while it was pruned)."""
    from accelerate.utils import set_module_tensor_to_device
    from safetensors import safe_open

    model = copy.deepcopy(skeleton)  # every tensor on meta: free
    dtype = next(model.parameters()).dtype
    loaded = 0
    for name in names:
        if name not in files:
            raise ExportError(f"The source weights have no tensor '{name}'. Is the folder whole?")
        with safe_open(str(files[name]), framework="pt") as f:
            value = f.get_tensor(name).to(dtype)
        set_module_tensor_to_device(model, name, "cpu", value=value)
        loaded += value.numel() * value.element_size()
    if s.tied and s.family.embed + ".weight" in names:
        get_module(model, s.family.lm_head).weight = get_module(model, s.family.embed).weight
    pruned = prune_model(model, s, selection, inplace=True)
    tensors = {
        name: p.detach().contiguous()
        for name, p in pruned.named_parameters()  # the tied head once, as in save_pretrained
        if not p.is_meta
    }
    return tensors, loaded + sum(t.numel() * t.element_size() for t in tensors.values())


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})


def _check_complete(pruned: nn.Module, shapes: dict[str, tuple[int, ...]]) -> None:
    """The shards must hold exactly the pruned skeleton's tensors, at its shapes."""
    want = {n: tuple(p.shape) for n, p in pruned.named_parameters()}
    if shapes != want:
        wrong = sorted(n for n in set(want) | set(shapes) if want.get(n) != shapes.get(n))
        raise ExportError(
            f"The streamed shards do not match the pruned model ({', '.join(wrong[:3])}). "
            "Report this as a bug, with the plan that produced it."
        )
