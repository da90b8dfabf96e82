"""Perplexity, streamed batch by batch, and seeded generation.

Protocol (the same everywhere, so numbers compare across tools): evaluation text tokenised once,
cut into non-overlapping windows, and perplexity = exp(summed next-token cross-entropy / number of
predicted tokens), every window's first token serving only as context.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .progress import Progress


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@dataclass(frozen=True)
class PerplexityStep:
    """The running result after ``done`` of ``total`` windows."""

    done: int
    total: int
    nll: float  # summed negative log-likelihood so far
    tokens: int  # predicted tokens so far

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.tokens) if self.tokens else float("nan")


def window_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy of each window: shape (batch,)."""
    logp = F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]),
        ids[:, 1:].reshape(-1),
        reduction="none",
    )
    return logp.view(ids.shape[0], -1).sum(1)


def iter_perplexity(
    model: nn.Module, windows: torch.Tensor, *, batch_size: int = 4
) -> Iterator[PerplexityStep]:
    """Yield the running perplexity after every batch of windows."""
    device = model_device(model)
    nll, tokens = 0.0, 0
    total = windows.shape[0]
    with torch.no_grad():
        for start in range(0, total, batch_size):
            ids = windows[start : start + batch_size].to(device)
            logits = model(ids, use_cache=False).logits
            nll += float(window_nll(logits, ids).sum())
            tokens += ids.numel() - ids.shape[0]
            yield PerplexityStep(min(start + batch_size, total), total, nll, tokens)


def perplexity(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    batch_size: int = 4,
    progress: Progress | None = None,
) -> float:
    """Perplexity over all ``windows``; ``progress(fraction, message)`` after every batch."""
    step = None
    for step in iter_perplexity(model, windows, batch_size=batch_size):
        if progress:
            progress(step.done / step.total, f"perplexity {step.perplexity:.2f}")
    return step.perplexity if step else float("nan")


def generate(
    model: nn.Module,
    tokenizer,
    prompt: str,
    *,
    max_new_tokens: int = 40,
    seed: int = 0,
    sample: bool = False,
    chat: bool = True,
) -> tuple[torch.Tensor, int]:
    """Token ids of the prompt followed by its continuation, and the prompt's length.

    Greedy by default; with ``sample`` it uses a fixed seed so that a dense and a pruned view of the
    model see the same random numbers. With ``chat`` and a chat template, the prompt is wrapped as a
    user turn, as an instruction-tuned model expects.
    """
    device = model_device(model)
    if chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(
            ids.to(device),
            attention_mask=torch.ones_like(ids).to(device),
            max_new_tokens=max_new_tokens,
            do_sample=sample,
            top_k=50 if sample else None,
            top_p=None,
            temperature=0.8 if sample else None,
            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
        )
    return out[0].cpu(), ids.shape[1]


def token_logprobs(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Log-probability the model gives each token of ``ids`` (1-D) given the ones before it.

    The first token has no prediction and gets 0. Comparing a dense and a pruned view on the same
    ids shows which tokens pruning hurt most.
    """
    with torch.no_grad():
        logits = model(ids[None].to(model_device(model)), use_cache=False).logits[0].float()
    logp = torch.log_softmax(logits[:-1], -1).gather(1, ids[1:, None].to(logits.device))[:, 0]
    return torch.cat([torch.zeros(1), logp.cpu()])
