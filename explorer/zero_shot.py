"""Zero-shot accuracy through EleutherAI's lm-evaluation-harness, on a pruned model or an export.

Papers judge pruned models by zero-shot accuracy (hellaswag, piqa, arc, winogrande...) besides
perplexity; those tasks download their data, so this package also ships one local task that runs
offline: ``lee_cloze``, multiple-choice sentence completions built from the Lee corpus' held-out
documents (``build_lee_cloze``). lm-eval scores each choice by the model's log-likelihood of it
after the context (``acc``; ``acc_norm`` divides by the choice's length in bytes).

``zero_shot`` takes a model in memory (lm-eval's ``HFLM`` wraps the object itself): the pruned
model of a session, or an export loaded with ``load_pruned`` (per-layer sizes need no remote code);
both give the same numbers for the same weights. GGUF files are not evaluated here: lm-eval
reaches llama.cpp only through a running ``llama-server`` (``GGUF_HINT``).
"""

from __future__ import annotations

import random
import re
import tempfile
from pathlib import Path

import torch
from torch import nn

from .errors import ExplorerError

TASKS_DIR = Path(__file__).with_name("tasks")
LOCAL_TASKS = {"lee_cloze": TASKS_DIR / "lee_cloze"}
CHOICES = 4
GGUF_HINT = (
    "lm-eval runs GGUF files only through llama.cpp's server: start `llama-server -m FILE` and use "
    "`lm_eval --model gguf --model_args base_url=http://127.0.0.1:8080`, or evaluate the "
    "transformers export."
)
CONTINUATION_WORDS = 3


def build_lee_cloze(text: str, questions: int = 40, seed: int = 0) -> list[dict]:
    """Multiple-choice completions: a sentence's start, its true last words and three other endings.

    Sentences of 12 to 40 words are used; the context is the sentence before it (same document)
    plus this one's start; distractors are the endings of other sentences, so every choice is
    fluent text and only the context tells them apart.
    """
    items = []
    for document in text.split("\n\n"):
        sentences = re.split(r"(?<=[.!?])\s+", document.strip())
        for previous, sentence in zip(["", *sentences], sentences, strict=False):
            words = sentence.split()
            if 12 <= len(words) <= 40 and sentence.endswith("."):
                cut = len(words) - CONTINUATION_WORDS
                context = f"{previous} {' '.join(words[:cut])}".strip()
                items.append((context, " " + " ".join(words[cut:])))
    rng = random.Random(seed)
    rng.shuffle(items)
    chosen, rest = items[:questions], items[questions:]
    endings = [ending for _, ending in rest]
    docs = []
    for i, (context, ending) in enumerate(chosen):
        others = rng.sample([e for e in endings if e != ending], CHOICES - 1)
        label = rng.randrange(CHOICES)
        choices = [*others[:label], ending, *others[label:]]
        docs.append({"id": i, "context": context, "choices": choices, "label": label})
    return docs


def task_names(tasks: str | list[str]) -> list[str]:
    """``"a,b"`` or a list, as a list of task names."""
    names = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise ExplorerError("Name at least one task, e.g. lee_cloze (or hellaswag with network).")
    return names


def zero_shot(
    model: nn.Module,
    tokenizer,
    tasks: str | list[str] = "lee_cloze",
    *,
    limit: int | None = None,
    batch_size: int = 8,
    device: str | None = None,
) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` from lm-eval for a model (an export: ``load_pruned`` it first).

    ``limit``: at most this many questions per task. Tasks other than the local ones are looked up
    in lm-eval's catalogue and download their data (they need network).
    """
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise ExplorerError(
            "lm-evaluation-harness is not installed. Install it with: pip install lm-eval"
        ) from exc
    if tokenizer is None:
        raise ExplorerError("Pass the tokenizer with the model (zero_shot(model, tokenizer, ...)).")
    names = task_names(tasks)
    device = device or str(next(model.parameters()).device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    with tempfile.TemporaryDirectory() as folder:
        manager = TaskManager(include_path=_local_tasks(Path(folder), names))
        unknown = [n for n in names if n not in manager.all_tasks]
        if unknown:
            raise ExplorerError(
                f"Unknown lm-eval task(s): {', '.join(unknown)}. Use lee_cloze (local) or a "
                "task from `lm_eval --tasks list`."
            )
        with torch.no_grad():
            out = lm_eval.simple_evaluate(
                model=lm, tasks=names, task_manager=manager, limit=limit, log_samples=False
            )
    return {
        task: {
            key.split(",")[0]: float(value)
            for key, value in metrics.items()
            if "," in key and isinstance(value, int | float) and "stderr" not in key
        }
        for task, metrics in out["results"].items()
    }


def _local_tasks(folder: Path, names: list[str]) -> str:
    """Copies of the local task YAMLs that name their JSONL by absolute path (lm-eval hands
    ``data_files`` to ``datasets`` as is, relative to the working directory)."""
    import yaml

    for name in names:
        if name not in LOCAL_TASKS:
            continue
        source = LOCAL_TASKS[name]
        config = yaml.safe_load((source / f"{name}.yaml").read_text())
        config["dataset_kwargs"] = {"data_files": {"test": str(source / f"{name}.jsonl")}}
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return str(folder)
