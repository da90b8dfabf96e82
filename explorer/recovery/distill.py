"""Recovery by distillation from the dense model (Minitron, arXiv 2407.14679).

The dense model is the teacher, the pruned one the student. The loss per token is

    T² · KL(softmax(z_t / T) ‖ softmax(z_s / T)),   averaged over every position of every window,

optionally restricted to the teacher's top-k tokens: the KL then runs over k + 1 bins, the k
tokens and the rest of the vocabulary as one, with both models' true probabilities (the teacher's
from its full softmax, whose normaliser is kept beside the top k). That binned KL is zero exactly
when the student matches the teacher on the k tokens and on the tail's total mass. Renormalising
the teacher over its top k instead would put the optimum where the student puts no mass at all
outside those k: a student sharper than the teacher, which pays for it on every
real token outside them. Plus, with
``hidden_weight`` > 0, the relative squared error ‖h_s − h_t‖² / ‖h_t‖² between each kept block's
output and the dense block it came from, per token and then averaged (relative per token, because
a few massive-activation positions would otherwise dominate a plain MSE or a ratio of sums).
Unlike fine-tuning on the language-modelling loss, the target is the dense model's own
distribution: distilling the dense model into itself changes nothing, so what the student gains
is repair, not adaptation to the training text.

The text is the calibration windows, or with ``generated`` text the dense model samples itself
(``generated_count`` windows, each continuing a calibration window's first ``generated_prompt``
tokens; ``with_calibration`` keeps the calibration windows beside them). A prompt of one token
leaves the text to the teacher, as in LLM-QAT's data-free distillation (Liu et al., arXiv
2305.17888), which starts each sequence from a single random token: the student then sees the
teacher's own broad distribution rather than the calibration domain's. A calibration text of a few
hundred windows is soon seen several times over, and the student then fits it; sampled text is
fresh and from the teacher's own distribution, so more of it costs generation time but no data.
``text_file`` adds ``text_windows`` windows of a text of a third domain (one neither evaluation
text is), read like a calibration file; ``with_calibration`` again keeps the calibration windows.

Training runs under ``accelerate`` (its device: CUDA when present), either on LoRA adapters
(``lora_rank`` > 0, merged afterwards) or on every kept weight of the decoder blocks and the final
norm (the tied embedding / output head stays frozen). With ``top_k`` > 0 and no hidden loss the
teacher runs once over the windows before training; ``cache_teacher`` keeps that top-k slice in
the project cache, keyed by the teacher's weights, the windows and k, so a rerun skips it. The
learning rate warms up over the first tenth of the steps and then decays on a cosine to zero
(``schedule``, ``warmup``), the usual recipe for short fine-tuning runs: the first steps do not
kick a freshly pruned model with full-size updates, and the last ones are small. ``precision``
"bf16" runs the student's and the teacher's forward passes under bfloat16 autocast (see
``training.train``): the targets are then the dense model's bf16 distribution (SmolLM2 on lee.cor:
34.36 against 34.33 in fp32), and a forward pass takes about 2.6 times less time on this project's
CPU (that evaluation: 13.3 s against 34.4 s).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..data import read_text_file, sample_tokens, token_windows
from ..errors import PlanError
from ..model.families import get_module
from ..model.loading import cache_root
from ..model.structure import StructureMap
from ..progress import Progress
from .steps import RecoveryContext, RecoveryStep, _hooks
from .training import PRECISIONS, SCHEDULES, precision_caution, train

PROMPT_TOKENS = 8  # generated text: each window continues the first tokens of a calibration window
# Windows sampled at once, at most. A decoding step for 128 windows costs about twice one for 32
# on a CPU, so larger batches are faster (SmolLM2-135M, bf16, 2 cores: 0.69 s a 256-token window
# at 128 against 1.40 s at 32). The batch is also kept to a key/value cache of at most
# GENERATION_CACHE_BYTES (``generation_batch``): 128 SmolLM2 windows take 1.5 GB, 128 windows of
# a 7B model's 256 tokens would take 34 GB.
GENERATION_BATCH = 128
GENERATION_CACHE_BYTES = 2 << 30


# -- the loss ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TeacherLogits:
    """The teacher's logits for a batch: all of them (``indices`` None), or its top k by index."""

    logits: torch.Tensor  # (batch, length, vocab) or (batch, length, k)
    indices: torch.Tensor | None = None  # (batch, length, k)
    log_normalizer: torch.Tensor | None = None  # (batch, length): logsumexp of all logits / T

    @classmethod
    def of(cls, logits: torch.Tensor, top_k: int = 0, temperature: float = 1.0) -> TeacherLogits:
        if top_k <= 0 or top_k >= logits.shape[-1]:
            return cls(logits)
        top = logits.topk(top_k, dim=-1)
        lse = torch.logsumexp(_at_least_fp32(logits) / temperature, dim=-1)
        return cls(top.values, top.indices, lse)


def distillation_loss(
    student_logits: torch.Tensor, teacher: TeacherLogits, temperature: float = 1.0
) -> torch.Tensor:
    """T² · mean over tokens of KL(p_t ‖ p_s) at temperature T (see the module docstring)."""
    t = temperature
    log_q = F.log_softmax(_at_least_fp32(student_logits) / t, dim=-1)
    if teacher.indices is None:
        log_p = F.log_softmax(_at_least_fp32(teacher.logits) / t, dim=-1)
        kl = (log_p.exp() * (log_p - log_q)).sum(-1)
        return t * t * kl.mean()
    if teacher.log_normalizer is None:
        raise ValueError("Top-k teacher logits need the full normaliser (TeacherLogits.of).")
    log_p = _at_least_fp32(teacher.logits) / t - teacher.log_normalizer.unsqueeze(-1)
    log_q = log_q.gather(-1, teacher.indices)  # the student's true log-probabilities there
    log_p_rest, log_q_rest = _log_rest(log_p), _log_rest(log_q)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1) + log_p_rest.exp() * (log_p_rest - log_q_rest)
    return t * t * kl.mean()


def _log_rest(log_probs: torch.Tensor) -> torch.Tensor:
    """log(1 − Σ p) over the last axis: the log of the mass outside these tokens."""
    inside = torch.logsumexp(log_probs, dim=-1).clamp(max=0.0)
    return torch.log((-torch.expm1(inside)).clamp(min=1e-30))


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def hidden_state_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]):
    """Mean over matched layers and over tokens of ‖h_s − h_t‖² / ‖h_t‖², one token at a time.

    Each token is normalised by its own teacher norm: summed over the tokens first, the ratio
    would be the error of the few massive-activation positions and the rest of the text would
    not count (SmolLM2, layer 15's output on 4 × 256 calibration tokens: the largest token norm
    is 161 times the median, and the top 1% of tokens hold 98.9% of the squared norm).
    """
    terms = []
    for s, t in zip(student, teacher, strict=True):
        s, t = s.float(), t.float()  # (batch, length, hidden)
        error = (s - t).square().sum(-1) / t.square().sum(-1).clamp(min=1e-12)
        terms.append(error.mean())
    return torch.stack(terms).mean()


class LayerOutputs:
    """Records the residual stream leaving the chosen decoder layers on every forward."""

    def __init__(self, model: nn.Module, structure: StructureMap, layers: Sequence[int]):
        self.layers = get_module(model, structure.family.layers)
        self.chosen = list(layers)
        self.seen: dict[int, torch.Tensor] = {}

    def hooks(self):
        def keep(index: int):
            def hook(module, args, output):
                self.seen[index] = output[0] if isinstance(output, tuple) else output

            return self.layers[index].register_forward_hook, hook

        return _hooks(keep(i) for i in self.chosen)

    def outputs(self, channels: torch.Tensor | None = None) -> list[torch.Tensor]:
        out = [self.seen[i] for i in self.chosen]
        return out if channels is None else [h.index_select(-1, channels.to(h.device)) for h in out]


# -- the teacher's targets, once -------------------------------------------------------------------------
@torch.no_grad()
def teacher_top_k(
    teacher: nn.Module,
    windows: torch.Tensor,
    top_k: int,
    batch_size: int = 4,
    progress=None,
    precision: str = "fp32",
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values, indices, normaliser): the teacher's top-k logits per position, each (windows,
    length, k), and the logsumexp of all its logits / T, (windows, length)."""
    device = next(teacher.parameters()).device
    values, indices, normalizers = [], [], []
    for start in range(0, len(windows), batch_size):
        ids = windows[start : start + batch_size].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = teacher(input_ids=ids, use_cache=False).logits
        target = TeacherLogits.of(logits.float(), top_k, temperature)
        values.append(target.logits.cpu())
        indices.append(target.indices.cpu())
        normalizers.append(target.log_normalizer.cpu())
        if progress is not None:
            done = min(start + batch_size, len(windows))
            progress(done / len(windows), f"Teacher logits {done}/{len(windows)}")
    return torch.cat(values), torch.cat(indices), torch.cat(normalizers)


def teacher_cache_path(
    teacher: nn.Module,
    windows: torch.Tensor,
    top_k: int,
    precision: str = "fp32",
    temperature: float = 1.0,
) -> Path:
    """The cache file for these weights, windows, k, precision and temperature (a digest)."""
    digest = hashlib.sha256()
    digest.update(teacher.config.to_json_string().encode())
    with torch.no_grad():
        sums = torch.stack([p.detach().double().sum() for p in teacher.parameters()])
    digest.update(sums.cpu().numpy().tobytes())
    digest.update(windows.cpu().numpy().tobytes())
    digest.update(f"{top_k} {precision} {temperature!r} with-normaliser".encode())
    return cache_root() / "distill" / f"teacher-top{top_k}-{digest.hexdigest()[:24]}.pt"


def cached_teacher_top_k(
    teacher: nn.Module,
    windows: torch.Tensor,
    top_k: int,
    progress=None,
    precision: str = "fp32",
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``teacher_top_k``, read from or written to the project cache."""
    path = teacher_cache_path(teacher, windows, top_k, precision, temperature)
    if path.is_file():
        saved = torch.load(path, weights_only=True)
        return saved["values"], saved["indices"], saved["normalizers"]
    values, indices, normalizers = teacher_top_k(
        teacher, windows, top_k, progress=progress, precision=precision, temperature=temperature
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"values": values, "indices": indices, "normalizers": normalizers}, tmp)
    tmp.replace(path)
    return values, indices, normalizers


def distill(
    teacher: nn.Module,
    student: nn.Module,
    structure: StructureMap,
    kept_layers: Sequence[int],
    windows: torch.Tensor,
    *,
    steps: int = 100,
    lr: float = 5e-5,
    batch_size: int = 4,
    temperature: float = 1.0,
    top_k: int = 0,
    hidden_weight: float = 0.0,
    lora_rank: int = 0,
    cache_teacher: bool = False,
    kept_hidden: torch.Tensor | None = None,
    schedule: str = "cosine",
    warmup: float = 0.1,
    precision: str = "fp32",
    seed: int = 0,
    progress: Progress | None = None,
) -> list[float]:
    """Distil ``teacher`` into ``student`` (changed in place) on ``windows``; the loss per step.

    ``kept_layers[i]`` is the teacher layer that student layer ``i`` came from; ``kept_hidden``
    the teacher's residual channels the student kept (None: all). See the module docstring.
    """
    if temperature <= 0:
        raise PlanError("The distillation temperature must be positive (1.0 is the usual).")
    teacher_device = next(teacher.parameters()).device
    precomputed = top_k > 0 and hidden_weight == 0
    data: list[torch.Tensor] = [windows]
    if precomputed:
        top = cached_teacher_top_k if cache_teacher else teacher_top_k
        data += list(
            top(
                teacher,
                windows,
                top_k,
                progress=progress,
                precision=precision,
                temperature=temperature,
            )
        )
    student_out = LayerOutputs(student, structure, range(len(kept_layers)))
    teacher_out = LayerOutputs(teacher, structure, kept_layers)

    def loss_fn(model, ids, *cached):
        if cached:
            target = TeacherLogits(*cached)
        else:
            with torch.no_grad(), teacher_out.hooks():
                logits = teacher(input_ids=ids.to(teacher_device), use_cache=False).logits
            target = TeacherLogits.of(logits.to(ids.device), top_k, temperature)
        with student_out.hooks():
            logits = model(input_ids=ids, use_cache=False).logits
        loss = distillation_loss(logits, target, temperature)
        if hidden_weight > 0:
            hidden_t = [h.to(ids.device) for h in teacher_out.outputs(kept_hidden)]
            loss = loss + hidden_weight * hidden_state_loss(student_out.outputs(), hidden_t)
        return loss

    layers = structure.family.layers + "."
    final_norm = structure.family.final_norm + "."
    return train(
        student,
        data,
        loss_fn,
        steps=steps,
        lr=lr,
        batch_size=batch_size,
        lora_rank=lora_rank,
        trainable=lambda name: name.startswith((layers, final_norm)),
        schedule=schedule,
        warmup=warmup,
        precision=precision,
        seed=seed,
        label="Distillation",
        progress=progress,
    )


def generation_batch(structure: StructureMap, length: int, element_bytes: int) -> int:
    """How many windows of ``length`` tokens to sample at once: ``GENERATION_BATCH``, or fewer
    where their key/value cache (keys and values of every layer's kv heads) would pass
    ``GENERATION_CACHE_BYTES``; at least one."""
    s = structure
    per_window = 2 * s.num_layers * s.kv_heads * s.head_dim * length * element_bytes
    return max(1, min(GENERATION_BATCH, GENERATION_CACHE_BYTES // per_window))


def generated_windows(
    teacher: nn.Module,
    windows: torch.Tensor,
    seed: int = 0,
    progress=None,
    *,
    count: int | None = None,
    prompt_tokens: int = PROMPT_TOKENS,
    precision: str = "fp32",
    batch_size: int = GENERATION_BATCH,
) -> torch.Tensor:
    """``count`` windows of the teacher's own text (None: one per calibration window), each
    continuing a calibration window's first ``prompt_tokens`` tokens (at most all but one); the
    prompts cycle when more windows than calibration windows are asked for.

    Sampled ``batch_size`` windows at a time (batch ``b`` with seed ``seed + b``), which bounds
    the key/value cache; ``precision`` "bf16" samples under bfloat16 autocast, as the training
    that follows does. More windows than the calibration text holds is how a short text stops
    being the limit: each is fresh text from the dense model's own distribution.
    """
    device = next(teacher.parameters()).device
    count = len(windows) if count is None else count
    if count < 1:
        raise PlanError(f"{count} generated windows were asked for; ask for at least one.")
    if prompt_tokens < 1:
        raise PlanError(
            f"generated_prompt = {prompt_tokens}; a generated window continues at least one token."
        )
    prompt = min(prompt_tokens, windows.shape[1] - 1)
    prompts = windows[torch.arange(count) % len(windows), :prompt]
    parts = []
    for start in range(0, count, batch_size):
        n = min(batch_size, count - start)

        def report(fraction: float, _message: str, start: int = start, n: int = n) -> None:
            done = start + fraction * n
            progress(done / count, f"Generating text: {done:.0f}/{count} windows")

        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            ids = sample_tokens(
                teacher,
                prompts[start : start + n].to(device),
                windows.shape[1] - prompt,
                seed + start // batch_size,
                report if progress is not None else None,
            )
        parts.append(ids.cpu())
    return torch.cat(parts).clone()  # a normal tensor: inference tensors cannot be trained on


# -- the step --------------------------------------------------------------------------------------------
def _distill_step(
    ctx: RecoveryContext,
    *,
    steps: int = 100,
    lr: float = 5e-5,
    batch_size: int = 4,
    temperature: float = 1.0,
    top_k: int = 0,
    hidden_weight: float = 0.0,
    lora_rank: int = 0,
    generated: bool = False,
    generated_count: int = 0,
    generated_prompt: int = PROMPT_TOKENS,
    text_file: str = "",
    text_windows: int = 256,
    with_calibration: bool = False,
    cache_teacher: bool = False,
    schedule: str = "cosine",
    warmup: float = 0.1,
    precision: str = "fp32",
    seed: int = 0,
) -> dict:
    s, sel = ctx.structure, ctx.selection
    caution = precision_caution(precision, next(ctx.dense.parameters()).device)
    if caution and ctx.progress is not None:  # said before the slow part, not only after it
        ctx.progress(0.0, caution)
    extra = []
    if text_file:
        extra.append(file_windows(ctx, text_file, text_windows, seed + 1))
    if generated:
        extra.append(
            generated_windows(
                ctx.dense,
                ctx.windows,
                seed,
                ctx.progress,
                count=generated_count or None,
                prompt_tokens=generated_prompt,
                precision=precision,
                batch_size=generation_batch(
                    s, ctx.windows.shape[1], next(ctx.dense.parameters()).element_size()
                ),
            )
        )
    windows = torch.cat(([ctx.windows] if with_calibration or not extra else []) + extra)
    gone = set(sel.hidden)
    kept_hidden = torch.tensor([c for c in range(s.hidden) if c not in gone]) if gone else None
    losses = distill(
        ctx.dense,
        ctx.pruned,
        s,
        sel.kept_layers(s),
        windows,
        steps=steps,
        lr=lr,
        batch_size=batch_size,
        temperature=temperature,
        top_k=top_k,
        hidden_weight=hidden_weight,
        lora_rank=lora_rank,
        cache_teacher=cache_teacher,
        kept_hidden=kept_hidden,
        schedule=schedule,
        warmup=warmup,
        precision=precision,
        seed=seed,
        progress=ctx.progress,
    )
    return {
        "losses": losses,
        "text": _text_label(generated, text_file, with_calibration),
        "tokens": int(windows.numel()),
        **({"warning": caution} if caution else {}),
    }


def file_windows(ctx: RecoveryContext, path: str, count: int, seed: int) -> torch.Tensor:
    """``count`` windows of the calibration windows' length at random offsets of a text file.

    A text of another domain than calibration and evaluation (bench/RESULTS.md: State of the
    Union addresses) is more text for the student without fitting either one.
    """
    if ctx.tokenizer is None:
        raise PlanError("Distilling on a text file needs the tokenizer in the recovery context.")
    if count < 1:
        raise PlanError(f"text_windows = {count}; ask for at least one window of the text file.")
    return token_windows(
        ctx.tokenizer, read_text_file(path), ctx.windows.shape[1], count, seed=seed
    )


def _text_label(generated: bool, text_file: str, with_calibration: bool) -> str:
    parts = [Path(text_file).name] if text_file else []
    parts += ["generated by the dense model"] if generated else []
    if not parts or with_calibration:
        parts.insert(0, "calibration")
    return " and ".join(parts)


DISTILL_STEP = RecoveryStep(
    name="distill",
    title="Distillation from the dense model (KL on next-token logits; LoRA or all weights)",
    run=_distill_step,
    paper="Minitron (Muralidharan et al., arXiv 2407.14679)",
    choices={"schedule": SCHEDULES, "precision": PRECISIONS},
)
