"""The training loop recovery steps share: LoRA (merged afterwards) or chosen weights, under accelerate.

LoRA fine-tuning and distillation differ only in their loss; both shuffle calibration windows,
step AdamW, report each step (where the Recover tab's Stop ends the run) and leave a plain model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..errors import PlanError
from ..progress import Progress

LossFn = Callable[..., torch.Tensor]
SCHEDULES = ("constant", "cosine")
PRECISIONS = ("fp32", "bf16")


def bf16_is_native(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 matrices in hardware.

    On a CPU that means AVX512-BF16 or AMX: without them PyTorch emulates bf16 and autocast is far
    slower than fp32 (an AVX2 EPYC here: a 4 x 256 forward and backward of SmolLM2-135M took 237 s
    under bf16 against 12 s in fp32), where a CPU with AVX512-BF16 runs it 2.3-3x faster.
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return True  # other accelerators: the user's choice stands unjudged


def precision_caution(precision: str, device: torch.device) -> str | None:
    """A warning for ``precision`` on ``device`` when it will run slowly, else None.

    Only a warning, not a switch to fp32: bf16 and fp32 train to different weights, and a plan
    must give the same model wherever it runs.
    """
    if precision != "bf16" or bf16_is_native(device):
        return None
    lacks = "AVX512-BF16 or AMX" if device.type == "cpu" else "bf16 support"
    return (
        f"precision bf16 on this {device.type.upper()} (no {lacks}) is emulated and runs many "
        "times slower than fp32 (20x measured on an AVX2 CPU): use precision fp32 here."
    )


def lr_factor(step: int, steps: int, schedule: str, warmup: float) -> float:
    """The learning-rate multiplier for 0-based ``step`` of ``steps``.

    A linear warm-up over the first ``warmup`` share of the steps, then either constant or a
    cosine decay to zero at the last step: the usual shape for short fine-tuning runs, where
    full-size first steps on a freshly pruned model and full-size last steps both add noise.
    """
    ramp = max(1, round(warmup * steps))
    if warmup > 0 and step < ramp:
        return (step + 1) / ramp
    if schedule == "constant":
        return 1.0
    start = ramp if warmup > 0 else 0
    progress = (step - start) / max(1, steps - start)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


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
    schedule: str = "constant",
    warmup: float = 0.0,
    precision: str = "fp32",
    seed: int = 0,
    label: str = "Training",
    progress: Progress | None = None,
) -> list[float]:
    """Minimise ``loss_fn(model, *batch)`` over shuffled batches of ``data`` (in place); losses.

    ``lora_rank`` > 0 trains LoRA adapters (``"all-linear"``: every linear module but the output
    head; alpha 2 · rank unless given) and merges them back, so the model keeps plain ``nn.Linear``
    modules; 0 trains the parameters whose names ``trainable`` accepts (None: all). The learning
    rate follows ``lr_factor`` (``schedule``, ``warmup``). ``precision="bf16"`` computes the loss
    under bfloat16 autocast while the weights, their gradients and AdamW's state stay fp32 (mixed
    precision): on a CPU with AVX512-BF16 or AMX, and on recent GPUs, the matrix products run
    several times faster (forward and backward 2.3-3x on such a CPU), and elsewhere far slower
    (``precision_caution``). Runs under ``accelerate``: the model is moved to its device (CUDA
    when present); data batches arrive there too. Each step reports through ``progress``, which is where a Stop ends the run.
    """
    if schedule not in SCHEDULES:  # before anything touches the model
        raise PlanError(f"Unknown learning-rate schedule {schedule!r}; use one of {SCHEDULES}.")
    if precision not in PRECISIONS:
        raise PlanError(f"Unknown training precision {precision!r}; use one of {PRECISIONS}.")
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
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, steps, schedule, warmup)
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
        # autocast here, not accelerate's mixed_precision: that one is process-wide state, fixed by
        # the first Accelerator, and LoRA and distillation may ask differently in one session.
        with torch.autocast(
            accelerator.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"
        ):
            loss = loss_fn(wrapped, *batch)
        accelerator.backward(loss)
        optimizer.step()
        scheduler.step()
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
