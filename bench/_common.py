"""What every benchmark shares: the default model and text, and a line naming the machine."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from explorer.data import read_text_file, token_windows  # noqa: E402
from explorer.planning.plan import Plan  # noqa: E402
from explorer.session import Explorer  # noqa: E402


def open_default(device: str | None = None, **windows) -> Explorer:
    """SmolLM2-135M on the Lee corpus, with the project's evaluation protocol (the default plan)."""
    return Explorer.open(Plan(), device=device, **windows)


def mixed_windows(ex: Explorer, windows: torch.Tensor, path: Path, seed: int) -> torch.Tensor:
    """``windows`` with their second half replaced by windows of a third-domain text file.

    News windows alone make a selection (and an update) that keeps what news uses; windows of a
    domain neither evaluation text is make it less domain-specific. bench/RESULTS.md measures the
    update's calibration mixed alone (off-domain 36.27 against 36.92 before fine-tuning at 20%,
    no gain after distillation) and the sensitivity sweep mixed too (``bench/quality.py --mix``).
    """
    keep = len(windows) // 2
    other = token_windows(
        ex.workspace.tokenizer,
        read_text_file(str(path)),
        windows.shape[1],
        len(windows) - keep,
        seed=seed,
    )
    return torch.cat([windows[:keep], other.to(windows.device)])


def machine_line(ex: Explorer) -> str:
    device = str(ex.workspace.device)
    if device.startswith("cuda"):
        device = torch.cuda.get_device_name()
    else:
        device = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    return (
        f"Machine: {device}; torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{torch.get_num_threads()} threads, fp32."
    )


def write_result(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    print(f"\nwritten to {path}")
