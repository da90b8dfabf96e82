"""Recovery after pruning: layer-wise least-squares refits, and LoRA fine-tuning.

Layer-wise recovery (arXiv 2407.19126, after arXiv 2310.13191) walks the pruned model in execution
order and refits each chosen linear module so that, on the inputs the *already recovered* pruned
model feeds it, it reproduces what the dense model's module outputs on the dense inputs:
W̄ = Y X̂ᵀ (X̂ X̂ᵀ + λI)⁻¹. Because each module sees the real pruned inputs, earlier errors are
absorbed instead of compounding. Only the Gram matrices X̂X̂ᵀ and YX̂ᵀ are accumulated; the hidden
states entering the current layer are kept for every calibration window (two of them: dense and
pruned), which is what sequential layer-by-layer methods need.

LoRA recovery trains low-rank adapters with ``peft`` under ``accelerate`` and merges them back, so
the pruned model keeps its shapes and saves as a plain model.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from ..errors import PlanError
from ..model.families import get_module
from ..model.structure import StructureMap
from ..planning.selection import Selection
from ..progress import Progress
from ..registry import Registry
from ..scoring.statistics import Statistics
from .heldout import heldout_perplexity, judged
from .training import train


# -- recovery steps: listed in explorer.catalogue, so the CLI and the app never name one -------------
@dataclass
class RecoveryContext:
    """What a recovery step works on: the sliced ``pruned`` model is changed in place."""

    dense: nn.Module
    pruned: nn.Module
    structure: StructureMap  # of the dense model
    selection: Selection
    windows: torch.Tensor  # calibration windows
    stats: Statistics | None = None  # the dense model's, when already collected
    progress: Progress | None = None
    heldout: torch.Tensor | None = None  # calibration windows no step sees, to judge each step
    tokenizer: object | None = None  # cuts a step's own text into windows (distill's text_file)


@dataclass(frozen=True)
class RecoveryStep:
    """A registered step: ``run(ctx, **params)`` returns a JSON-friendly report."""

    name: str
    title: str
    run: Callable[..., dict]
    paper: str = ""
    choices: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # text parameters' values

    def params(self) -> dict[str, object]:
        """The step's parameters with their defaults (for forms and recipe checks)."""
        sig = inspect.signature(self.run).parameters
        return {n: p.default for n, p in sig.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}


def run_steps(
    entries: Sequence[dict], ctx: RecoveryContext, steps: Registry[RecoveryStep]
) -> list[dict]:
    """Run recipe entries ``{"step": name, **params}`` in order; one report per step.

    ``steps`` is the catalogue's ``RECOVERY_STEPS`` (passed in: this module is below it). With
    ``ctx.heldout`` windows each report also has their perplexity before and after the step, and a
    ``warning`` when the step made it worse (``explorer.recovery.heldout``), after any warning of
    the step's own (a slow precision, say).
    """
    reports = []
    before = heldout_perplexity(ctx.pruned, ctx.heldout)
    for entry in entries:
        params = dict(entry)
        name = params.pop("step", None)
        step = steps[name]
        unknown = set(params) - set(step.params())
        if unknown:
            raise PlanError(
                f"Recovery step '{name}' has no parameter {', '.join(sorted(unknown))}. "
                f"It takes: {', '.join(step.params()) or 'none'}."
            )
        for param, allowed in step.choices.items():
            if param in params and params[param] not in allowed:
                raise PlanError(
                    f"Recovery step '{name}': {param} = {params[param]!r} is not one of "
                    f"{', '.join(allowed)}."
                )
        report = {"step": name, **step.run(ctx, **params)}
        after = heldout_perplexity(ctx.pruned, ctx.heldout)
        judgement = judged(name, before, after)
        warnings = [w for w in (report.pop("warning", None), judgement.pop("warning", None)) if w]
        reports.append(
            {**report, **judgement, **({"warning": " ".join(warnings)} if warnings else {})}
        )
        before = after
    return reports


# -- which dense indices a selection removes -----------------------------------------------------------
def removed_indices(
    structure: StructureMap, selection: Selection, path: str, dim: int, param: str = "weight"
) -> list[int]:
    """Indices along ``dim`` of the dense ``path.param`` that ``selection`` removes (sorted).

    Read from the structure's members, the description slicing uses, so this agrees with
    ``prune_model`` for heads, kv groups, MLP channels and hidden channels.
    """
    s = structure
    layer = _layer_of(s, path)
    gone: set[int] = set()
    per_layer = {"head": selection.heads, "kv": selection.kv, "mlp": selection.mlp}
    if layer is not None:
        for kind, removed in per_layer.items():
            units = removed.get(layer, ())
            for m in s.members(kind, layer) if units else ():
                if (m.module, m.param, m.dim) == (path, param, dim):
                    gone.update(u * m.block + j for u in units for j in range(m.block))
    if selection.hidden and any(
        (m.module, m.param, m.dim) == (path, param, dim) for m in s.members("hidden")
    ):
        gone.update(selection.hidden)
    return sorted(gone)


def kept_indices_of(
    structure: StructureMap, selection: Selection, path: str, dim: int, size: int
) -> torch.Tensor:
    """The complement of ``removed_indices`` in ``range(size)``."""
    gone = set(removed_indices(structure, selection, path, dim))
    return torch.tensor([i for i in range(size) if i not in gone], dtype=torch.long)


def _layer_of(s: StructureMap, path: str) -> int | None:
    prefix = s.family.layers + "."
    if not path.startswith(prefix):
        return None
    return int(path[len(prefix) :].split(".", 1)[0])


# -- damped least squares ------------------------------------------------------------------------------
class GramAccumulator:
    """Accumulates X̂X̂ᵀ and YX̂ᵀ over tokens for one module, then solves for its weights.

    With ``bias`` a constant 1 is appended to every input so that the bias is refit jointly.
    Sums are kept in float64: calibration sets reach 10⁵ tokens and the systems are ill-conditioned.
    """

    def __init__(self, n_in: int, n_out: int, *, bias: bool, device: torch.device):
        width = n_in + int(bias)
        self.bias = bias
        self.xtx = torch.zeros(width, width, dtype=torch.float64, device=device)
        self.ytx = torch.zeros(n_out, width, dtype=torch.float64, device=device)
        self.yty = torch.zeros((), dtype=torch.float64, device=device)

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """``x`` (..., n_in) inputs and ``y`` (..., n_out) target outputs of the same tokens."""
        x = x.reshape(-1, x.shape[-1]).to(self.xtx.device, torch.float64)
        y = y.reshape(-1, y.shape[-1]).to(self.xtx.device, torch.float64)
        if self.bias:
            x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        self.xtx += x.T @ x
        self.ytx += y.T @ x
        self.yty += y.pow(2).sum()

    def relative_error(self, weight: torch.Tensor, bias: torch.Tensor | None) -> float:
        """‖W X̂ + b − Y‖² / ‖Y‖² over the accumulated tokens, from the Gram matrices alone."""
        w = weight.to(self.xtx)
        if self.bias:
            w = torch.cat([w, bias.to(self.xtx)[:, None]], dim=1)
        err = ((w @ self.xtx) * w).sum() - 2 * (w * self.ytx).sum() + self.yty
        return float(err.clamp_min(0) / self.yty.clamp_min(1e-30))

    def solve(
        self, damping: float, prior: tuple[torch.Tensor, torch.Tensor | None] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W, b) minimising ‖W X̂ + b − Y‖² + λ‖[W b] − prior‖², λ = damping · mean(diag X̂X̂ᵀ).

        ``prior`` (W₀, b₀) is what the damping pulls towards; None pulls towards zero.
        """
        anchor = None
        if prior is not None:
            anchor = prior[0].to(self.xtx)
            if self.bias:
                b0 = prior[1] if prior[1] is not None else torch.zeros_like(anchor[:, 0])
                anchor = torch.cat([anchor, b0.to(self.xtx)[:, None]], dim=1)
        solution = damped_solve(self.xtx, self.ytx, damping, anchor)
        if self.bias:
            return solution[:, :-1], solution[:, -1]
        return solution, None


def damped_solve(
    xtx: torch.Tensor, ytx: torch.Tensor, damping: float, prior: torch.Tensor | None = None
) -> torch.Tensor:
    """(Y X̂ᵀ + λ W₀)(X̂X̂ᵀ + λI)⁻¹, λ = damping · mean(diag X̂X̂ᵀ): ridge regression towards W₀.

    With W₀ = 0 this is the plain damped least squares Y X̂ᵀ (X̂X̂ᵀ + λI)⁻¹. λ is set by the
    mean input energy, and LLMs have a few "massive" input channels that dominate that mean: a
    pull towards zero then wipes out the weights of every ordinary channel, while a pull towards
    the current weights W₀ only leaves weakly excited directions as they were.
    """
    lam = damping * xtx.diagonal().mean().clamp_min(1e-12)
    eye = torch.eye(xtx.shape[0], dtype=xtx.dtype, device=xtx.device)
    rhs = ytx if prior is None else ytx + lam * prior
    # The system is symmetric positive definite; solve for Wᵀ instead of forming the inverse.
    return torch.linalg.solve(xtx + lam * eye, rhs.T).T


# -- running one decoder layer at a time ---------------------------------------------------------------
class _Stop(Exception):
    """Raised by a hook to end a forward pass once the input it wanted is captured."""


def _base_model(model: nn.Module, structure: StructureMap) -> nn.Module:
    return get_module(model, structure.family.layers.rpartition(".")[0])


def _layer_inputs(model: nn.Module, structure: StructureMap, ids: torch.Tensor):
    """(hidden states entering layer 0, per-layer (args, kwargs) without the hidden states).

    Positions, masks and rotary embeddings depend on the layer type (Gemma's sliding layers), so
    each layer's own call arguments are recorded during one forward of the dense model.
    """
    layers = get_module(model, structure.family.layers)
    calls: list[tuple[tuple, dict]] = []
    first: list[torch.Tensor] = []

    def record(module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        if not first:
            first.append(hidden.detach())
        calls.append((tuple(args[1:]), kwargs))

    handles = [layer.register_forward_pre_hook(record, with_kwargs=True) for layer in layers]
    try:
        _base_model(model, structure)(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return first[0], calls


def _first_hidden(model: nn.Module, structure: StructureMap, ids: torch.Tensor) -> torch.Tensor:
    """The hidden states entering layer 0 (the forward stops there)."""
    seen: list[torch.Tensor] = []

    def stop(module, args, kwargs):
        seen.append(args[0] if args else kwargs["hidden_states"])
        raise _Stop

    first = get_module(model, structure.family.layers)[0]
    register = partial(first.register_forward_pre_hook, with_kwargs=True)
    with _hooks([(register, stop)]), suppress(_Stop):
        _base_model(model, structure)(input_ids=ids, use_cache=False)
    return seen[0]


def _run_layer(layer: nn.Module, hidden: torch.Tensor, call: tuple[tuple, dict]) -> torch.Tensor:
    args, kwargs = call
    out = layer(hidden, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@contextmanager
def _hooks(pairs):
    handles = [register(fn) for register, fn in pairs]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _stages(structure: StructureMap, roles: Sequence[str]) -> list[tuple[str, ...]]:
    """The requested modules grouped by shared input, in execution order (q/k/v read one input)."""
    f = structure.family
    wanted = set(roles)
    stages = [(f.q, f.k, f.v), (f.o,), (f.gate, f.up), (f.down,)]
    out = []
    for stage in stages:
        chosen = tuple(n for n in stage if n.split(".")[-1] in wanted)
        if chosen:
            out.append(chosen)
    return out


@torch.no_grad()
def layerwise_least_squares(
    dense_model: nn.Module,
    pruned_model: nn.Module,
    structure: StructureMap,
    selection: Selection,
    windows: torch.Tensor,
    *,
    damping: float = 0.01,
    modules: Sequence[str] = ("o_proj", "down_proj"),
    shrink_to_current: bool = True,
    batch_size: int = 4,
    progress: Progress | None = None,
    accumulator: Callable[..., GramAccumulator] = GramAccumulator,
) -> dict[str, tuple[float, float]]:
    """Refit the ``modules`` (roles) of every kept layer of ``pruned_model`` in place.

    ``pruned_model`` is ``prune_model(dense_model, structure, selection)`` (possibly with biases
    added since, e.g. by FLAP's compensation, which are refit too): its layer ``i`` is dense layer
    ``selection.kept_layers()[i]``, and a module's targets are the dense module's outputs
    restricted to the rows the pruned module kept (kept heads, kv groups, MLP or hidden channels).
    The damping pulls towards the pruned module's current weights (``shrink_to_current``) or,
    as in the paper's formula, towards zero (see ``damped_solve``). Returns ``{pruned module
    path: (relative error before, after)}``, the error being ‖W X̂ + b − Y‖² / ‖Y‖² on the
    calibration tokens. ``accumulator`` builds each module's least-squares system (a subclass
    may weight tokens or constrain some, see ``explorer.robust_refit``).
    """
    s = structure
    kept_layers = selection.kept_layers(s)
    stages = _stages(s, modules)
    device = next(dense_model.parameters()).device
    batches = [windows[i : i + batch_size].to(device) for i in range(0, len(windows), batch_size)]
    dense_h, calls = [], []
    for ids in batches:
        h, c = _layer_inputs(dense_model, s, ids)
        dense_h.append(h)
        calls.append(c)
    pruned_h = [_first_hidden(pruned_model, s, ids) for ids in batches]
    dense_layers = get_module(dense_model, s.family.layers)
    pruned_layers = get_module(pruned_model, s.family.layers)
    report: dict[str, tuple[float, float]] = {}
    for layer in range(s.num_layers):
        layer_calls = [c[layer] for c in calls]
        if layer in kept_layers:
            index = kept_layers.index(layer)
            targets = _dense_targets(
                s, selection, layer, dense_layers[layer], stages, dense_h, layer_calls
            )
            p_layer = pruned_layers[index]
            for stage in stages:
                fits = _refit_stage(
                    p_layer,
                    stage,
                    pruned_h,
                    layer_calls,
                    targets,
                    damping,
                    shrink_to_current,
                    accumulator,
                )
                report.update({f"{s.path(index, n)}": e for n, e in fits.items()})
            pruned_h = [
                _run_layer(p_layer, h, c) for h, c in zip(pruned_h, layer_calls, strict=True)
            ]
        dense_h = [
            _run_layer(dense_layers[layer], h, c) for h, c in zip(dense_h, layer_calls, strict=True)
        ]
        if progress is not None:
            progress(
                (layer + 1) / s.num_layers, f"Layer-wise refit: layer {layer + 1}/{s.num_layers}"
            )
    return report


def _dense_targets(s, selection, layer, d_layer, stages, dense_h, calls) -> dict[str, list]:
    """Per module name, per batch: the dense module's outputs on its rows the pruned model kept."""
    names = [name for stage in stages for name in stage]
    targets: dict[str, list[torch.Tensor]] = {name: [] for name in names}

    def keep_rows(name: str):
        module = d_layer.get_submodule(name)
        rows = kept_indices_of(s, selection, s.path(layer, name), 0, module.out_features)
        rows = rows.to(module.weight.device)

        def hook(module, args, output):
            targets[name].append(output.index_select(-1, rows))

        return module.register_forward_hook, hook

    with _hooks(keep_rows(name) for name in names):
        for h, c in zip(dense_h, calls, strict=True):
            _run_layer(d_layer, h, c)
    return targets


def _refit_stage(
    p_layer, stage, pruned_h, calls, targets, damping, shrink_to_current, accumulator
) -> dict[str, tuple[float, float]]:
    """Refit the modules of one stage (one shared input) of a pruned layer; errors before/after."""
    first = p_layer.get_submodule(stage[0])
    inputs: list[torch.Tensor] = []

    def capture(module, args):
        inputs.append(args[0])
        raise _Stop

    accumulators = {}
    for name in stage:
        module = p_layer.get_submodule(name)
        accumulators[name] = accumulator(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            device=module.weight.device,
        )
    with _hooks([(first.register_forward_pre_hook, capture)]):
        for b, (h, c) in enumerate(zip(pruned_h, calls, strict=True)):
            with suppress(_Stop):
                _run_layer(p_layer, h, c)
            for name, acc in accumulators.items():
                acc.add(inputs[b], targets[name][b])
    errors = {}
    for name, acc in accumulators.items():
        module = p_layer.get_submodule(name)
        before = acc.relative_error(module.weight, module.bias)
        prior = (module.weight, module.bias) if shrink_to_current else None
        weight, bias = acc.solve(damping, prior)
        module.weight.copy_(weight.to(module.weight.dtype))
        if bias is not None:
            module.bias.copy_(bias.to(module.bias.dtype))
        errors[name] = (before, acc.relative_error(module.weight, module.bias))
    return errors


# -- LoRA ------------------------------------------------------------------------------------------
def lora_recovery(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    steps: int = 200,
    rank: int = 8,
    alpha: float | None = None,
    lr: float = 3e-4,
    batch_size: int = 4,
    target_modules: str | Sequence[str] = "all-linear",
    seed: int = 0,
    progress: Progress | None = None,
) -> list[float]:
    """Fine-tune LoRA adapters on ``windows`` (next-token loss), merge them in; the loss per step.

    ``model`` is changed in place and keeps its shapes: after ``merge_and_unload`` its linear
    modules are plain ``nn.Linear`` again with the low-rank update folded into the weights, so it
    saves and exports like any pruned model. ``"all-linear"`` adapts every linear module except
    the output head. The loop runs under ``accelerate``'s ``Accelerator``: started with
    ``accelerate launch`` it trains data-parallel on several devices with no change here.
    """
    return train(
        model,
        [windows],
        lambda m, ids: m(input_ids=ids, labels=ids, use_cache=False).loss,
        steps=steps,
        lr=lr,
        batch_size=batch_size,
        lora_rank=rank,
        lora_alpha=alpha,
        target_modules=target_modules,
        seed=seed,
        label="LoRA",
        progress=progress,
    )


# -- the steps defined here ------------------------------------------------------------------------
def _layerwise_step(
    ctx: RecoveryContext,
    *,
    damping: float = 0.01,
    modules: Sequence[str] = ("o_proj", "down_proj"),
    shrink_to_current: bool = True,
) -> dict:
    return refit_report(
        ctx, GramAccumulator, damping=damping, modules=modules, shrink_to_current=shrink_to_current
    )


def refit_report(
    ctx: RecoveryContext, accumulator: Callable[..., GramAccumulator], **options
) -> dict:
    """The layer-wise refit of ``ctx.pruned`` with ``accumulator``; how many modules it refit
    and their mean relative error before and after."""
    errors = layerwise_least_squares(
        ctx.dense,
        ctx.pruned,
        ctx.structure,
        ctx.selection,
        ctx.windows,
        progress=ctx.progress,
        accumulator=accumulator,
        **options,
    )
    before = [b for b, _ in errors.values()]
    after = [a for _, a in errors.values()]
    return {
        "modules": len(errors),
        "mean_error_before": sum(before) / max(len(before), 1),
        "mean_error_after": sum(after) / max(len(after), 1),
    }


def _lora_step(
    ctx: RecoveryContext,
    *,
    steps: int = 200,
    rank: int = 8,
    lr: float = 3e-4,
    batch_size: int = 4,
    seed: int = 0,
) -> dict:
    losses = lora_recovery(
        ctx.pruned,
        ctx.windows,
        steps=steps,
        rank=rank,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
        progress=ctx.progress,
    )
    return {"losses": losses}


LAYERWISE_STEP = RecoveryStep(
    name="layerwise",
    title="Layer-wise least squares (refit to the dense outputs)",
    run=_layerwise_step,
    paper="arXiv 2407.19126 (after arXiv 2310.13191)",
)
LORA_STEP = RecoveryStep(
    name="lora",
    title="LoRA fine-tuning, merged (peft + accelerate)",
    run=_lora_step,
    paper="LoRA (Hu et al., arXiv 2106.09685), as LLM-Pruner's recovery",
)
