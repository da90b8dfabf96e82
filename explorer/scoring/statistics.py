"""Calibration statistics: one pass over the calibration windows, hooks feeding running sums.

Every criterion declares its ``Needs``; the pass collects their union, so switching criterion never
re-reads the data when the statistics already ``cover`` the new needs. Nothing per token is kept:
each hook folds its tensor into a sum the moment it sees it, so memory is the model, plus one
parameter-sized buffer for gradients and one for the Fisher diagonal when asked (the embedding and
output head excluded unless ``Needs.embeddings``: only hidden-channel scores read them), plus the
per-layer matrices. All sums are fp32 on the device of the module they come from.

Units: the loss is the summed next-token cross-entropy over all windows. ``mean_grad`` divides by
the predicted tokens (the gradient of the mean CE), ``fisher_diag`` is LLM-Pruner's
``(1/N) Σ_j (∇ mean CE of window j)²``, so ``g·w − ½ w² F`` is a Taylor estimate of the change of
the mean CE per token, in the same units for every layer.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DataError
from ..evaluate import window_nll
from ..model.families import get_module
from ..model.structure import StructureMap
from ..progress import Progress

# Largest temporary of the pairwise JSD, in elements (chunks of query positions stay below it).
_JSD_CHUNK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class Needs:
    """What a criterion needs from the calibration pass; the pass collects the union, no more."""

    gradients: bool = False  # weight gradients of the summed loss
    fisher: bool = False  # sum over samples of squared per-sample gradients
    input_moments: bool = False  # per-channel sum and sum of squares of each linear's input
    covariance: tuple[str, ...] = ()  # roles ("q_proj", "down_proj", ...) whose input X^T X is kept
    output_gradient_covariance: tuple[str, ...] = ()  # roles whose output-gradient G is kept
    attention: bool = False  # per-layer head-pair Jensen-Shannon divergences
    hidden_states: bool = False  # block influence: cosine between consecutive hidden states
    # Gradients/Fisher of the embedding and output head too: only hidden-channel scores read them,
    # and they are the largest parameters (21% of SmolLM2's), so they are skipped unless asked.
    embeddings: bool = False

    def __or__(self, other: Needs) -> Needs:
        return Needs(
            gradients=self.gradients or other.gradients,
            fisher=self.fisher or other.fisher,
            input_moments=self.input_moments or other.input_moments,
            covariance=tuple(sorted(set(self.covariance) | set(other.covariance))),
            output_gradient_covariance=tuple(
                sorted(set(self.output_gradient_covariance) | set(other.output_gradient_covariance))
            ),
            attention=self.attention or other.attention,
            hidden_states=self.hidden_states or other.hidden_states,
            embeddings=self.embeddings or other.embeddings,
        )

    def covers(self, other: Needs) -> bool:
        """True when everything ``other`` asks for is part of this."""
        return (self | other) == self


@dataclass
class Statistics:
    """Sums over the calibration tokens, with the counts that turn them into means.

    Keys: parameters by their dotted name (``model.layers.0.mlp.up_proj.weight``; tied parameters
    under each of their names), linear modules by their dotted path, layers by index.
    """

    needs: Needs
    samples: int = 0  # windows seen
    tokens: int = 0  # token positions fed (every hook below sees each once)
    loss_tokens: int = 0  # predicted tokens: the first of each window is context only
    loss: float = 0.0  # summed next-token cross-entropy (when a backward pass ran)
    gradients: dict[str, torch.Tensor] = field(default_factory=dict)  # Σ ∇(summed CE)
    fisher: dict[str, torch.Tensor] = field(default_factory=dict)  # Σ_j (∇ mean CE of window j)²
    input_sum: dict[str, torch.Tensor] = field(default_factory=dict)  # Σ_t x_t, (in,)
    input_sq_sum: dict[str, torch.Tensor] = field(default_factory=dict)  # Σ_t x_t², (in,)
    covariance: dict[str, torch.Tensor] = field(default_factory=dict)  # Σ_t x_t x_tᵀ, (in, in)
    # Σ_t g_t g_tᵀ of the gradient of the summed CE at the module's output, (out, out).
    output_gradient_covariance: dict[str, torch.Tensor] = field(default_factory=dict)
    # Σ over windows and query positions of the JSD (nats) between heads' attention rows, (H, H).
    jsd_sum: dict[int, torch.Tensor] = field(default_factory=dict)
    cos_sum: dict[int, torch.Tensor] = field(default_factory=dict)  # Σ_t cos(h_l, h_l+1)

    def covers(self, needs: Needs) -> bool:
        """True when these statistics hold everything ``needs`` asks for."""
        return self.needs.covers(needs)

    # -- gradients -----------------------------------------------------------------------------
    def grad(self, path: str, param: str = "weight") -> torch.Tensor:
        """Σ over windows of the gradient of the summed cross-entropy."""
        return _get(self.gradients, f"{path}.{param}", "gradients")

    def mean_grad(self, path: str, param: str = "weight") -> torch.Tensor:
        """Gradient of the mean next-token cross-entropy."""
        return self.grad(path, param) / self.loss_tokens

    def fisher_diag(self, path: str, param: str = "weight") -> torch.Tensor:
        """Empirical Fisher diagonal: mean over windows of the squared per-window gradient."""
        return _get(self.fisher, f"{path}.{param}", "fisher") / self.samples

    # -- inputs of the linear modules ----------------------------------------------------------
    def mean_input(self, path: str) -> torch.Tensor:
        """E_t[x] per input channel."""
        return _get(self.input_sum, path, "input_moments") / self.tokens

    def input_sq(self, path: str) -> torch.Tensor:
        """Σ_t x² per input channel (squared column norms of the input matrix X)."""
        return _get(self.input_sq_sum, path, "input_moments")

    def input_norm(self, path: str) -> torch.Tensor:
        """‖X_:,j‖₂ per input channel j, the activation factor of Wanda."""
        return self.input_sq(path).sqrt()

    def input_var(self, path: str) -> torch.Tensor:
        """Var_t[x] per input channel (population variance), FLAP's fluctuation."""
        mean = self.mean_input(path)
        return (self.input_sq(path) / self.tokens - mean.square()).clamp_min(0)

    def cov(self, path: str) -> torch.Tensor:
        """E_t[x xᵀ] of the module input: LLM Surgeon's Kronecker factor A (undamped)."""
        return _get(self.covariance, path, "covariance") / self.tokens

    def grad_cov(self, path: str) -> torch.Tensor:
        """E_t[g gᵀ] of the output gradient: LLM Surgeon's Kronecker factor G (undamped)."""
        return _get(self.output_gradient_covariance, path, "output_gradient_covariance") / (
            self.tokens
        )

    # -- attention and depth -------------------------------------------------------------------
    def jsd(self, layer: int) -> torch.Tensor:
        """Mean over windows and query positions of the head-pair JSD (nats, at most ln 2)."""
        return _get(self.jsd_sum, layer, "attention") / self.tokens

    def block_influence(self) -> torch.Tensor:
        """ShortGPT's BI_l = 1 − E_t[cos(h_l, h_l+1)] per layer, shape (layers,)."""
        sums = [_get(self.cos_sum, i, "hidden_states") for i in sorted(self.cos_sum) or [0]]
        return 1 - torch.stack([s.to(sums[0].device) for s in sums]) / self.tokens


def _get(table: dict, key, need: str) -> torch.Tensor:
    if key not in table:
        raise KeyError(f"these statistics hold no '{need}' entry for {key!r}; collect it first")
    return table[key]


def _add(table: dict, key, value: torch.Tensor) -> None:
    """table[key] += value, creating an fp32 buffer of our own on first sight."""
    if key in table:
        table[key] += value
    else:
        table[key] = value.to(torch.float32, copy=True)


def _add_gram(table: dict, key, rows: torch.Tensor) -> None:
    """table[key] += rowsᵀ rows for fp32 ``rows`` (tokens, d), in place: no (d, d) temporary."""
    if key in table:
        table[key].addmm_(rows.T, rows)
    else:
        table[key] = rows.T @ rows


# -- the pass ------------------------------------------------------------------------------------
def collect_statistics(
    model: nn.Module,
    structure: StructureMap,
    windows: torch.Tensor,
    needs: Needs,
    *,
    batch_size: int = 1,
    progress: Progress | None = None,
) -> Statistics:
    """Run the calibration windows once and return the sums ``needs`` asks for.

    With gradients, Fisher or output-gradient covariances needed, each batch runs forward and
    backward on its summed cross-entropy; the Fisher needs per-window gradients, so it forces
    batches of one window (a sample is a window, as LLM-Pruner's E2). Otherwise the pass is
    forward-only under ``torch.no_grad()``. Attention probabilities need eager attention: the pass
    runs with it and restores the model's own implementation afterwards. The model ends in eval
    mode, without ``.grad``, with ``requires_grad`` as it was.
    """
    weight_grads = needs.gradients or needs.fisher
    backward = weight_grads or bool(needs.output_gradient_covariance)
    _check_windows(windows, needs, structure, backward)
    stats = Statistics(needs=needs | Needs(gradients=weight_grads))
    step = 1 if needs.fisher else max(1, batch_size)
    device = get_module(model, structure.family.embed).weight.device
    model.eval()
    collector = _Collector(model, structure, stats)
    n = windows.shape[0]
    with ExitStack() as stack:
        stack.enter_context(collector.hooks(backward))
        if needs.attention:
            stack.enter_context(_eager_attention(model))
        stack.enter_context(torch.enable_grad() if backward else torch.no_grad())
        for start in range(0, n, step):
            ids = windows[start : start + step].to(device)
            collector.run(ids, backward)
            if progress:
                done = min(start + step, n)
                progress(done / n, f"calibration window {done}/{n}")
    collector.alias_tied()
    return stats


def _check_windows(windows: torch.Tensor, needs: Needs, s: StructureMap, backward: bool) -> None:
    if windows.dim() != 2 or windows.shape[0] == 0 or windows.is_floating_point():
        raise DataError(
            f"Calibration windows must be token ids of shape (windows, length), got "
            f"{tuple(windows.shape)}. Cut the calibration text into windows first."
        )
    if backward and windows.shape[1] < 2:
        raise DataError("Gradients need windows of at least 2 tokens. Use longer windows.")
    roles = {name.rpartition(".")[2] for name in s.family.linears}
    unknown = set(needs.covariance + needs.output_gradient_covariance) - roles
    if unknown:
        raise ValueError(f"unknown module roles {sorted(unknown)}; choose from {sorted(roles)}")


@contextmanager
def _eager_attention(model: nn.Module) -> Iterator[None]:
    """Run with eager attention, the only implementation that returns the probabilities."""
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(before)


class _Collector:
    """The hooks of one pass, writing into one ``Statistics``."""

    def __init__(self, model: nn.Module, structure: StructureMap, stats: Statistics):
        self.model, self.structure, self.stats = model, structure, stats
        self.window_tokens = 0  # predicted tokens of the window being back-propagated

    def run(self, ids: torch.Tensor, backward: bool) -> None:
        st = self.stats
        st.samples += ids.shape[0]
        st.tokens += ids.numel()
        if not backward:
            self.model(ids, use_cache=False, logits_to_keep=1)  # the output head is not needed
            return
        loss = window_nll(self.model(ids, use_cache=False).logits, ids).sum()
        self.window_tokens = ids.numel() - ids.shape[0]
        st.loss_tokens += self.window_tokens
        st.loss += float(loss.detach())
        loss.backward()

    @contextmanager
    def hooks(self, backward: bool) -> Iterator[None]:
        model, s, needs = self.model, self.structure, self.stats.needs
        weight_grads = needs.gradients  # set whenever the Fisher is asked for too
        params = list(model.named_parameters())
        requires = [p.requires_grad for _, p in params]
        skipped = set() if needs.embeddings else self._embedding_params()
        handles = []
        try:
            for name, p in params:
                p.grad = None
                wanted = weight_grads and id(p) not in skipped
                p.requires_grad_(wanted)
                if wanted:
                    handles.append(p.register_post_accumulate_grad_hook(self._on_grad(name)))
            if backward and not weight_grads:
                # Output gradients alone: let the graph start at the embedding output instead of
                # computing weight gradients nobody reads.
                embed = get_module(model, s.family.embed)
                handles.append(embed.register_forward_hook(lambda m, a, out: out.requires_grad_()))
            for layer in range(s.num_layers):
                for name in s.family.linears:
                    handles += self._linear_hooks(s.path(layer, name), name.rpartition(".")[2])
                if needs.attention:
                    attn = get_module(model, s.path(layer, s.family.attention))
                    handles.append(attn.register_forward_hook(self._on_attention(layer)))
                if needs.hidden_states:
                    block = get_module(model, s.layer_path(layer))
                    handles.append(
                        block.register_forward_hook(self._on_block(layer), with_kwargs=True)
                    )
            yield
        finally:
            for h in handles:
                h.remove()
            for (_, p), req in zip(params, requires, strict=True):
                p.grad = None
                p.requires_grad_(req)

    def _embedding_params(self) -> set[int]:
        """ids of the embedding and output-head parameters (one tensor when they are tied)."""
        f = self.structure.family
        return {
            id(p)
            for path in (f.embed, f.lm_head)
            for p in get_module(self.model, path).parameters()
        }

    def alias_tied(self) -> None:
        """File tied parameters' sums under each of their names too (same tensors, no copies)."""
        canonical = {id(p): name for name, p in self.model.named_parameters()}
        for table in (self.stats.gradients, self.stats.fisher):
            if table:
                for name, p in self.model.named_parameters(remove_duplicate=False):
                    if canonical[id(p)] in table:
                        table[name] = table[canonical[id(p)]]

    # -- hooks ---------------------------------------------------------------------------------
    def _on_grad(self, name: str):
        """Fold this window's gradient into the sums and free it (the model keeps no .grad)."""
        st = self.stats

        def hook(p: nn.Parameter) -> None:
            g = p.grad.float()
            p.grad = None
            _add(st.gradients, name, g)
            if st.needs.fisher:
                # The per-window gradient of the window's mean CE is g / its predicted tokens.
                scale = 1.0 / self.window_tokens**2
                if name in st.fisher:
                    st.fisher[name].addcmul_(g, g, value=scale)
                else:
                    st.fisher[name] = g.square() * scale

        return hook

    def _linear_hooks(self, path: str, role: str) -> list:
        st, needs = self.stats, self.stats.needs
        module = get_module(self.model, path)
        cov = role in needs.covariance
        handles = []
        if needs.input_moments or cov:

            def pre(module, args):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
                if needs.input_moments:
                    _add(st.input_sum, path, x.sum(0))
                    _add(st.input_sq_sum, path, x.square().sum(0))
                if cov:
                    _add_gram(st.covariance, path, x)

            handles.append(module.register_forward_pre_hook(pre))
        if role in needs.output_gradient_covariance:

            def on_output_grad(g: torch.Tensor) -> None:
                g = g.reshape(-1, g.shape[-1]).float()
                _add_gram(st.output_gradient_covariance, path, g)

            def post(module, args, output):
                if output.requires_grad:
                    output.register_hook(on_output_grad)

            handles.append(module.register_forward_hook(post))
        return handles

    def _on_attention(self, layer: int):
        def hook(module, args, output):
            probs = output[1]
            if probs is None:
                raise RuntimeError("attention probabilities missing: eager attention is not active")
            _add(self.stats.jsd_sum, layer, pairwise_jsd_sum(probs.detach().float()))

        return hook

    def _on_block(self, layer: int):
        def hook(module, args, kwargs, output):
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = output[0] if isinstance(output, tuple) else output
            cos = F.cosine_similarity(h_in.detach().float(), h_out.detach().float(), dim=-1)
            _add(self.stats.cos_sum, layer, cos.sum())

        return hook


def pairwise_jsd_sum(probs: torch.Tensor) -> torch.Tensor:
    """Σ over batch and query rows of JSD(P_i, P_j) for every head pair: (H, H), in nats.

    ``probs`` is (batch, heads, queries, keys). JSD = ½ Σ p log p + ½ Σ q log q − Σ m log m with
    m = (p + q)/2 and 0·log 0 = 0, so causally masked zeros need no special case. Only pairs i < j
    are computed (the matrix is symmetric with a zero diagonal by construction), in chunks of query
    positions so the temporary stays below ``_JSD_CHUNK_ELEMENTS``.
    """
    b, h, q, k = probs.shape
    i, j = torch.triu_indices(h, h, 1, device=probs.device)
    neg_entropy = torch.xlogy(probs, probs).sum(-1)  # (b, h, q)
    total = torch.zeros(i.numel(), device=probs.device)
    chunk = max(1, _JSD_CHUNK_ELEMENTS // max(1, i.numel() * k * b))
    for start in range(0, q, chunk):
        p = probs[:, :, start : start + chunk]
        m = (p[:, i] + p[:, j]) / 2  # (b, pairs, chunk, k)
        e = neg_entropy[:, :, start : start + chunk]
        jsd = (e[:, i] + e[:, j]) / 2 - torch.xlogy(m, m).sum(-1)
        total += jsd.clamp_min(0).sum((0, 2))
    out = torch.zeros(h, h, device=probs.device)
    out[i, j] = total
    out[j, i] = total
    return out
