"""Scoring a model larger than memory: decoder layers streamed from disk (or host RAM) one by one.

``load_offloaded`` builds an accelerate device map by hand: the embedding, the final norm and the
output head stay on the execution device, then whole decoder layers are kept there while they fit a
byte budget, and the rest live on disk (on a CPU run) or in host RAM (on a CUDA run). Accelerate's
hooks load an offloaded module's weights just before it runs and drop them right after, so the
weights resident at any moment are the kept ones plus one module, and the model's own ``forward``
runs unchanged: ``collect_statistics`` and its hooks work on it as on a model in memory.

Offloaded parameters sit on the ``meta`` device between calls; criteria read every weight through
``ScoreContext.weight`` (``importance.read_weight``), which fetches it from the offload store. Only
forward-only statistics are supported: a backward pass would keep every layer's weights alive in
the autograd graph and accelerate's streamed copies never receive ``.grad``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import ExplorerError, PlanError
from ..model.families import family_for, get_module
from ..model.loading import resolve_dtype
from ..model.structure import StructureMap
from ..progress import Progress
from .base import Criterion, ScoreContext, Scores
from .statistics import Needs, Statistics, collect_statistics


def module_bytes(module: nn.Module, dtype: torch.dtype) -> int:
    """Bytes the parameters of ``module`` take in ``dtype`` (tied ones once; buffers are tiny)."""
    return sum(p.numel() for p in module.parameters()) * torch.empty((), dtype=dtype).itemsize


def resident_bytes(model: nn.Module) -> int:
    """Bytes of parameters materialised in the model right now (offloaded ones are ``meta``)."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if not p.is_meta)


@dataclass(frozen=True)
class OffloadPlan:
    """Where each top module goes, and the bytes that decided it."""

    device_map: dict[str, str]
    kept_layers: int  # decoder layers resident on the execution device
    offloaded_layers: int  # decoder layers streamed in when they run
    model_bytes: int
    budget_bytes: int


def plan_offload(
    model: nn.Module, budget_bytes: int, dtype: torch.dtype, device: torch.device
) -> OffloadPlan:
    """Device map of ``model`` (on ``meta``) that keeps at most ``budget_bytes`` of weights resident.

    Everything but the decoder layers stays on ``device``; layers follow in order while the kept
    bytes plus room to stream the largest offloaded layer fit the budget. The overflow goes to
    ``"disk"`` on a CPU run and to host RAM (``"cpu"``) on an accelerator.
    """
    layers_path = family_for(model).layers
    layers = get_module(model, layers_path)
    sizes = [module_bytes(layer, dtype) for layer in layers]
    main, spill = str(device), ("disk" if device.type == "cpu" else "cpu")
    device_map: dict[str, str] = {}
    _map_outside(model, "", layers_path, main, device_map)
    fixed = module_bytes(model, dtype) - sum(sizes)
    kept, used = 0, fixed + max(sizes, default=0)  # room for one streamed layer
    while kept < len(sizes) and used + sizes[kept] <= budget_bytes:
        used += sizes[kept]
        kept += 1
    if used > budget_bytes:
        raise ExplorerError(
            f"A memory budget of {budget_bytes:,} bytes cannot hold the embedding, the output head "
            f"and one decoder layer ({used:,} bytes). Raise the budget."
        )
    for i in range(len(sizes)):
        device_map[f"{layers_path}.{i}"] = main if i < kept else spill
    return OffloadPlan(
        device_map, kept, len(sizes) - kept, module_bytes(model, dtype), budget_bytes
    )


def _map_outside(module: nn.Module, prefix: str, layers_path: str, main: str, out: dict) -> None:
    """Map every module that does not contain the decoder layers to ``main``."""
    for name, child in module.named_children():
        path = f"{prefix}{name}"
        if layers_path.startswith(f"{path}.") and path != layers_path:
            _map_outside(child, f"{path}.", layers_path, main, out)
        elif path != layers_path:
            out[path] = main


def load_offloaded(
    folder: str | Path,
    *,
    max_memory_bytes: int,
    offload_dir: str | Path,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device | None = None,
) -> tuple[nn.Module, OffloadPlan]:
    """Load a transformers folder keeping at most ``max_memory_bytes`` of weights resident.

    The device defaults to CUDA when present. Offloaded layers are read from ``offload_dir`` (or
    straight from the folder's safetensors files) each time they run, so feed the calibration
    windows in large batches to read them once per pass.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    torch_dtype = resolve_dtype(dtype)
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if target.type == "cuda" and target.index is None:
        target = torch.device("cuda", torch.cuda.current_device())
    config = AutoConfig.from_pretrained(str(folder))
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    skeleton.tie_weights()  # so a tied output head is counted once
    plan = plan_offload(skeleton, max_memory_bytes, torch_dtype, target)
    model = AutoModelForCausalLM.from_pretrained(
        str(folder), device_map=plan.device_map, offload_folder=str(offload_dir), dtype=torch_dtype
    )
    return model.eval(), plan


def score_offloaded(
    model: nn.Module,
    structure: StructureMap,
    criterion: Criterion,
    windows: torch.Tensor | None = None,
    *,
    stats: Statistics | None = None,
    reduction: str = "sum",
    seed: int = 0,
    batch_size: int = 1,
    progress: Progress | None = None,
) -> Scores:
    """Scores of a forward-only ``criterion`` on an offloaded model.

    Statistics are collected from ``windows`` unless ``stats`` already cover the criterion's needs.
    """
    needs = criterion.needs
    if needs.gradients or needs.fisher or needs.output_gradient_covariance:
        raise PlanError(
            f"Criterion '{criterion.name}' needs gradients, which an offloaded model does not provide. "
            "Pick a forward-only criterion (wanda_sp, flap, depth2, l1, l2) or load the model whole."
        )
    if needs != Needs() and (stats is None or not stats.covers(needs)):
        if windows is None:
            raise PlanError(f"Criterion '{criterion.name}' needs calibration windows. Pass them.")
        stats = collect_statistics(
            model, structure, windows, needs, batch_size=batch_size, progress=progress
        )
    ctx = ScoreContext(model, structure, stats, reduction=reduction, seed=seed)
    return criterion.score(ctx)
