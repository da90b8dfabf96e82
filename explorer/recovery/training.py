"""The training loop recovery steps share: LoRA (merged afterwards) or chosen weights, under accelerate.

LoRA fine-tuning and distillation differ only in their loss; both shuffle calibration windows,
step AdamW, report each step (where the Recover tab's Stop ends the run) and leave a plain model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..progress import Progress

LossFn = Callable[..., torch.Tensor]


def train(
    model: nn.Module,
    data: Sequence[torch.Tensor],
    loss_fn: LossFn,
    *,
    steps: int,
    lr: float,
    batch_size: int,
    lora_rank: int = 0,
    lora_alpha: float | None = None,
    target_modules: str | Sequence[str] = "all-linear",
    trainable: Callable[[str], bool] | None = None,
    seed: int = 0,
    label: str = "Training",
    progress: Progress | None = None,
) -> list[float]:
    """Minimise ``loss_fn(model, *batch)`` over shuffled batches of ``data`` (in place); losses.

    ``lora_rank`` > 0 trains LoRA adapters (``"all-linear"``: every linear module but the output
    head; alpha 2 · rank unless given) and merges them back, so the model keeps plain ``nn.Linear``
    modules; 0 trains the parameters whose names ``trainable`` accepts (None: all). Runs under ``accelerate``: the model is moved to its device (CUDA when
    present); data batches arrive there too. Each step reports through ``progress``, which is
    where a Stop ends the run.
    """
    from accelerate import Accelerator
    from peft import LoraConfig, get_peft_model
    from torch.utils.data import DataLoader, TensorDataset

    accelerator = Accelerator()
    before = {name: p.requires_grad for name, p in model.named_parameters()}
    if lora_rank > 0:
        config = LoraConfig(
            r=lora_rank,
            lora_alpha=lora_alpha if lora_alpha is not None else 2 * lora_rank,
            lora_dropout=0.0,
            target_modules=target_modules
            if isinstance(target_modules, str)
            else list(target_modules),
            bias="none",
        )
        wrapped = get_peft_model(model, config)
    else:
        wrapped = model
        for name, p in model.named_parameters():
            p.requires_grad_(trainable is None or trainable(name))
    optimizer = torch.optim.AdamW(
        [p for p in wrapped.parameters() if p.requires_grad], lr=lr, weight_decay=0.0
    )
    loader = DataLoader(
        TensorDataset(*data),
        batch_size=batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    wrapped, optimizer, loader = accelerator.prepare(wrapped, optimizer, loader)
    wrapped.train()
    losses: list[float] = []
    batches = iter(loader)
    for step in range(steps):
        try:
            batch = next(batches)
        except StopIteration:  # another epoch over the windows
            batches = iter(loader)
            batch = next(batches)
        loss = loss_fn(wrapped, *batch)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(accelerator.gather(loss.detach()).mean()))
        if progress is not None:
            progress((step + 1) / steps, f"{label} step {step + 1}/{steps}: loss {losses[-1]:.3f}")
    result = accelerator.unwrap_model(wrapped)
    if lora_rank > 0:
        result = result.merge_and_unload()
    result.eval()
    for name, p in result.named_parameters():
        p.requires_grad_(before[name])
    accelerator.free_memory()
    return losses
