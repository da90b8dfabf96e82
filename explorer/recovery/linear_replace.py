"""Linear replacement of removed blocks (ReplaceMe, arXiv 2505.02819; LLM-Streamline, 2403.19135).

A run of removed blocks i..j is replaced by one linear map T fitted by least squares on calibration
activations, folded into existing weights so the export stays a plain transformer. The exact
folding: the block before the gap, p = i − 1, ends with ``h_out = y + m`` where ``y`` is the
residual after its attention and ``m = W_down a`` its MLP output. The ideal map of the whole
residual, ``h_out T``, cannot be folded — the residual connection ``y`` is an identity no weight
holds — so, as ReplaceMe does, T acts on the MLP output only:

    T = argmin_T ‖M T − (X_out − Y)‖²,   W_down' = Tᵀ W_down   (nn.Linear stores W as (out, in))

with ``M``, ``Y`` the pruned model's own MLP outputs and post-attention residuals of block p (so T
also absorbs errors of width cuts before it) and ``X_out`` the dense model's residual leaving
block j. Then ``y + m T`` is exactly what the folded block outputs. A run starting at block 0 has
no block before it (the embedding is tied to the output head), and a family that normalises the MLP
output before the residual add (Gemma 3's post-feedforward norm) breaks the fold: both are refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import suppress

import torch
from torch import nn

from ..errors import PlanError
from ..model.families import get_module
from ..model.structure import StructureMap
from ..planning.selection import Selection
from .steps import GramAccumulator, RecoveryContext, RecoveryStep, _base_model, _hooks, _Stop


# -- runs of removed blocks ----------------------------------------------------------------------------
def removed_runs(layers: Sequence[int]) -> list[tuple[int, int]]:
    """Maximal runs (first, last) of consecutive removed dense layers, in order."""
    runs: list[tuple[int, int]] = []
    for layer in sorted(layers):
        if runs and runs[-1][1] == layer - 1:
            runs[-1] = (runs[-1][0], layer)
        else:
            runs.append((layer, layer))
    return runs


def _check_foldable(structure: StructureMap, selection: Selection) -> None:
    if "post_feedforward_layernorm" in structure.family.hidden_norms:
        raise PlanError(
            f"Linear replacement folds into down_proj, but the {structure.family.name} family "
            "normalises the MLP output before the residual add. Use another recovery step."
        )
    if 0 in selection.layers:
        raise PlanError(
            "Linear replacement needs a kept block before each removed run; the plan removes "
            "layer 0. Protect the first layer (protect_first 1) or skip this step."
        )


# -- the fit ----------------------------------------------------------------------------------------------
@torch.no_grad()
def dense_run_outputs(
    dense: nn.Module, structure: StructureMap, ends: Sequence[int], batches: Sequence[torch.Tensor]
) -> dict[int, list[torch.Tensor]]:
    """Per dense layer in ``ends``, per batch: the residual stream leaving that layer."""
    layers = get_module(dense, structure.family.layers)
    last = max(ends)
    out: dict[int, list[torch.Tensor]] = {e: [] for e in ends}

    def keep(layer: int):
        def hook(module, args, output):
            out[layer].append((output[0] if isinstance(output, tuple) else output).detach())
            if layer == last:
                raise _Stop

        return layers[layer].register_forward_hook, hook

    with _hooks(keep(e) for e in ends):
        for ids in batches:
            with suppress(_Stop):
                _base_model(dense, structure)(input_ids=ids, use_cache=False)
    return out


@torch.no_grad()
def fit_replacement(
    pruned: nn.Module,
    structure: StructureMap,
    before: int,
    targets: Sequence[torch.Tensor],
    batches: Sequence[torch.Tensor],
    *,
    damping: float = 0.0,
) -> tuple[torch.Tensor, GramAccumulator]:
    """T (d, d) minimising ‖M T − (X_out − Y)‖² + λ‖T − I‖² at pruned layer ``before``.

    ``targets[b]``: the dense residual leaving the removed run, for batch ``b`` (restricted to the
    pruned model's hidden channels). The damping pulls towards T = I, i.e. towards simply dropping
    the blocks; λ = damping · mean(diag MᵀM). Returns T and the accumulator (for its errors).
    """
    layer = get_module(pruned, structure.family.layers)[before]
    down = layer.get_submodule(structure.family.down)
    d = down.out_features
    acc = GramAccumulator(d, d, bias=False, device=down.weight.device)
    seen: dict[str, torch.Tensor] = {}

    def on_down(module, args, output):
        seen["m"] = output

    def on_layer(module, args, output):
        seen["h"] = output[0] if isinstance(output, tuple) else output
        raise _Stop

    hooks = [(down.register_forward_hook, on_down), (layer.register_forward_hook, on_layer)]
    with _hooks(hooks):
        for ids, target in zip(batches, targets, strict=True):
            with suppress(_Stop):
                _base_model(pruned, structure)(input_ids=ids, use_cache=False)
            m = seen["m"]
            acc.add(m, target - (seen["h"] - m))  # y = h − m: the residual after attention
    eye = torch.eye(d, dtype=torch.float64, device=acc.xtx.device)
    weight, _ = acc.solve(damping, prior=(eye, None))  # rows of W = columns of T: W = Tᵀ
    return weight.T, acc


@torch.no_grad()
def replace_removed_blocks(
    dense: nn.Module,
    pruned: nn.Module,
    structure: StructureMap,
    selection: Selection,
    windows: torch.Tensor,
    *,
    damping: float = 0.0,
    batch_size: int = 4,
    progress=None,
) -> list[dict]:
    """Fold one least-squares map per removed run into the down_proj before it (in place).

    Runs are fitted in order on the pruned model as it stands, so a later run sees the earlier
    folds. Returns, per run, its dense layers and the relative error ‖M T − B‖² / ‖B‖² before
    (T = I: the blocks just dropped) and after the fit.
    """
    _check_foldable(structure, selection)
    runs = removed_runs(selection.layers)
    if not runs:
        return []
    kept_layers = selection.kept_layers(structure)
    device = next(pruned.parameters()).device
    batches = [windows[i : i + batch_size].to(device) for i in range(0, len(windows), batch_size)]
    outputs = dense_run_outputs(dense, structure, [last for _, last in runs], batches)
    channels = torch.tensor(
        [c for c in range(structure.hidden) if c not in set(selection.hidden)], device=device
    )
    report = []
    for n, (first, last) in enumerate(runs):
        before = kept_layers.index(first - 1)
        targets = [t.index_select(-1, channels) for t in outputs[last]]
        t, acc = fit_replacement(pruned, structure, before, targets, batches, damping=damping)
        down = get_module(pruned, structure.family.layers)[before].get_submodule(
            structure.family.down
        )
        identity = torch.eye(t.shape[0], dtype=torch.float64, device=t.device)
        error_before = acc.relative_error(identity, None)
        folded = t.T @ down.weight.to(torch.float64)
        down.weight.copy_(folded.to(down.weight.dtype))
        report.append(
            {
                "layers": [first, last],
                "into": structure.path(before, structure.family.down),
                "error_before": error_before,
                "error_after": acc.relative_error(t.T, None),
            }
        )
        if progress is not None:
            progress((n + 1) / len(runs), f"Linear replacement: run {n + 1}/{len(runs)}")
    return report


def _linear_replacement_step(
    ctx: RecoveryContext, *, damping: float = 1e-4, batch_size: int = 4
) -> dict:
    runs = replace_removed_blocks(
        ctx.dense,
        ctx.pruned,
        ctx.structure,
        ctx.selection,
        ctx.windows,
        damping=damping,
        batch_size=batch_size,
        progress=ctx.progress,
    )
    return {"runs": runs}


LINEAR_REPLACE_STEP = RecoveryStep(
    name="linear_replace",
    title="Replace removed blocks by a least-squares linear map (folded into down_proj)",
    run=_linear_replacement_step,
    paper="ReplaceMe (arXiv 2505.02819), LLM-Streamline (arXiv 2403.19135)",
)
