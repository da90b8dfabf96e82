"""Calibration and evaluation text, and the token windows cut from it.

The built-in corpus is the Lee news corpus shipped inside the ``gensim`` wheel: its 300 background
documents calibrate, its 50 test documents evaluate, so calibration and evaluation never share text.
Every source reduces to one string of documents separated by blank lines; ``token_windows`` turns a
string into fixed-length windows, and ``TextSource`` records a source in a plan so it can be replayed.
"""

from __future__ import annotations

import bz2
import html
import inspect
import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from .errors import DataError
from .model.loading import cache_root, extract_members, pip_download
from .progress import Progress
from .text_safety import decode_text, tokenize_in_chunks

if TYPE_CHECKING:
    from .model.loading import Workspace

Split = Literal["calibration", "evaluation", "offdomain"]

GENSIM_WHEEL = "gensim==4.4.0"
CORPUS_FILES: dict[str, str] = {
    "calibration": "lee_background.cor",
    "evaluation": "lee.cor",
    "offdomain": "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
}
OFFDOMAIN_CHARS = 300_000  # ~60k tokens: far more than any evaluation protocol reads
NEUTRAL_PROMPTS = ("The", "In", "A", "It", "This", "When", "After", "One")
TOP_K = 50  # sampling from the top 50 at temperature 1: varied text, yet rarely garbage


def builtin_text(split: Split) -> str:
    """A built-in text as documents joined with blank lines.

    ``calibration`` and ``evaluation`` are the Lee news corpus (each .cor line is a document);
    ``offdomain`` is encyclopedic prose that neither ever sees: the lead paragraphs of the ~100
    English Wikipedia articles in the same gensim wheel, markup stripped, so that quality can be
    judged on a second domain (an update fitted to news text can fit the news domain).
    """
    if split not in CORPUS_FILES:
        raise DataError(f"Unknown split '{split}'. Use 'calibration', 'evaluation' or 'offdomain'.")
    if split == "offdomain":
        return _offdomain_text()
    raw = _corpus_file(CORPUS_FILES[split]).read_text(encoding="latin-1")
    return "\n\n".join(line.strip() for line in raw.splitlines() if line.strip())


def _corpus_file(name: str) -> Path:
    """Extract every built-in corpus file from the gensim wheel once, into the cache."""
    folder = cache_root() / "corpus"
    if not all((folder / f).is_file() for f in CORPUS_FILES.values()):
        (wheel,) = pip_download([GENSIM_WHEEL], only_binary=True, error=DataError)
        for f in CORPUS_FILES.values():
            extract_members([(wheel, f"gensim/test/test_data/{f}")], folder / f)
        wheel.unlink()
    return folder / name


def _offdomain_text() -> str:
    """Lead paragraphs (up to three) of each Wikipedia article, in dump order, cached as text."""
    cached = cache_root() / "corpus" / "offdomain.txt"
    if not cached.is_file():
        dump = bz2.decompress(_corpus_file(CORPUS_FILES["offdomain"]).read_bytes()).decode()
        docs: list[str] = []
        for body in re.findall(r"<text[^>]*>(.*?)</text>", dump, flags=re.S):
            if not body.lstrip().upper().startswith("#REDIRECT"):
                docs.extend(wiki_paragraphs(body)[:3])
        text = "\n\n".join(docs)[:OFFDOMAIN_CHARS]
        tmp = cached.with_suffix(".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(cached)
    return cached.read_text(encoding="utf-8")


def wiki_paragraphs(markup: str, min_chars: int = 200) -> list[str]:
    """The prose paragraphs of one article's wikitext: templates, tables, references, files,
    categories, headings and list lines dropped; links reduced to their text."""
    text = html.unescape(markup)
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    text = re.sub(r"<ref[^>/]*/>", "", text)
    text = re.sub(r"<ref[^>]*>.*?</ref>", "", text, flags=re.S)
    text = _drop_nested(_drop_nested(text, "{{", "}}"), "{|", "|}")
    text = re.sub(
        r"\[\[(?:File|Image|Category|[a-z\-]{2,12}):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]",
        "",
        text,
    )
    text = re.sub(r"\[\[(?:[^\]|]*\|)?([^\]]*)\]\]", r"\1", text)
    text = re.sub(r"\[https?://\S+ ([^\]]*)\]", r"\1", text)
    text = re.sub(r"\[https?://\S+\]|<[^>]+>|'{2,}", "", text)
    paragraphs = []
    for block in re.split(r"\n\s*\n", text):
        lines = [line.strip() for line in block.splitlines()]
        prose = " ".join(
            ln for ln in lines if ln and not ln.startswith(("=", "|", "!", "*", "#", ":", ";"))
        )
        prose = re.sub(r"\(\s*[,;]?\s*\)", "", re.sub(r"\s+", " ", prose)).strip()
        if len(prose) >= min_chars:
            paragraphs.append(prose)
    return paragraphs


def _drop_nested(text: str, opening: str, closing: str) -> str:
    """``text`` without any (possibly nested) ``opening ... closing`` spans."""
    kept, depth, i = [], 0, 0
    while i < len(text):
        if text.startswith(opening, i):
            depth, i = depth + 1, i + len(opening)
        elif depth and text.startswith(closing, i):
            depth, i = depth - 1, i + len(closing)
        else:
            if not depth:
                kept.append(text[i])
            i += 1
    return "".join(kept)


def read_text_file(path: str | Path, field: str = "text") -> str:
    """A .txt file as is, or a .jsonl file's ``field`` values joined with blank lines."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"No text file at '{path}'. Check the path.")
    text = decode_text(path.read_bytes(), path.name)
    if path.suffix == ".jsonl":
        docs = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{path.name} line {number} is not valid JSON ({exc.msg})."
                ) from exc
            if not isinstance(record, dict) or field not in record:
                raise DataError(
                    f"{path.name} line {number} has no field '{field}'. "
                    "Name the field that holds the text."
                )
            docs.append(str(record[field]).strip())
        text = "\n\n".join(d for d in docs if d)
    if not text.strip():
        raise DataError(f"'{path}' contains no text. Use a file with some text in it.")
    return text


def dataset_text(
    name: str,
    config: str | None = None,
    split: str = "train",
    field: str = "text",
    limit: int | None = None,
) -> str:
    """The ``field`` of a dataset's rows joined with blank lines.

    ``name`` may be a folder written by ``save_to_disk``, a data file (json/jsonl/csv/parquet/txt), a
    folder of data files, or a hub dataset id.
    """
    import datasets

    path = Path(name).expanduser()
    try:
        if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
            data = datasets.load_from_disk(str(path))
            if isinstance(data, datasets.DatasetDict):
                data = data[split]
        elif path.is_file():
            builder = {".jsonl": "json", ".txt": "text"}.get(path.suffix, path.suffix.lstrip("."))
            data = datasets.load_dataset(builder, data_files={split: str(path)}, split=split)
        else:
            data = datasets.load_dataset(name, config, split=split)
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(
            f"Could not load the dataset '{name}' (split '{split}'): {exc}. "
            "Check the name, split and your connection, or use a local file."
        ) from exc
    if field not in data.column_names:
        raise DataError(
            f"The dataset '{name}' has no column '{field}'. "
            f"Use one of: {', '.join(data.column_names)}."
        )
    if limit is not None:
        data = data.select(range(min(limit, len(data))))
    text = "\n\n".join(str(t).strip() for t in data[field] if t is not None and str(t).strip())
    if not text:
        raise DataError(f"The dataset '{name}' has no text in column '{field}'.")
    return text


@torch.inference_mode()
def self_generated_text(
    model,
    tokenizer,
    n_samples: int = 8,
    length: int = 128,
    seed: int = 0,
    progress: Progress | None = None,
) -> str:
    """Text the model samples itself, for calibrating without any data.

    Each sample starts from one neutral one-token prompt (after BOS when the tokenizer uses one),
    so all samples share a length and run as one batch. Top-k sampling from a seeded generator
    makes the text reproducible from the seed alone.
    """
    device = next(model.parameters()).device
    bos = [tokenizer.bos_token_id] if _adds_bos(tokenizer) else []
    prompts = [NEUTRAL_PROMPTS[i % len(NEUTRAL_PROMPTS)] for i in range(n_samples)]
    starts = [bos + tokenizer(p, add_special_tokens=False).input_ids[:1] for p in prompts]
    ids = sample_tokens(model, torch.tensor(starts, device=device), length, seed, progress)
    samples = []
    for row in ids.tolist():
        row = row[len(bos) :]
        if tokenizer.eos_token_id in row:
            row = row[: row.index(tokenizer.eos_token_id)]
        samples.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return "\n\n".join(s for s in samples if s)


@torch.inference_mode()
def sample_tokens(
    model,
    ids: torch.Tensor,
    length: int,
    seed: int = 0,
    progress: Callable[[float, str], None] | None = None,
) -> torch.Tensor:
    """``ids`` (batch, prompt) followed by ``length`` tokens sampled from the model's top 50.

    Seeded, so the same model, prompts and seed give the same tokens (as inference tensors:
    ``clone()`` them outside inference mode before training on them).
    """
    generator = torch.Generator(device=ids.device).manual_seed(seed)
    out = model(input_ids=ids, use_cache=True)
    for step in range(length):
        top = out.logits[:, -1, :].float().topk(min(TOP_K, out.logits.shape[-1]), dim=-1)
        choice = torch.multinomial(top.values.softmax(-1), 1, generator=generator)
        token = top.indices.gather(-1, choice)
        ids = torch.cat([ids, token], dim=1)
        if step + 1 < length:
            out = model(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
        if progress is not None:
            progress((step + 1) / length, f"Generating text ({step + 1}/{length})")
    return ids


def token_windows(
    tokenizer,
    text: str,
    length: int,
    n_windows: int | None = None,
    *,
    seed: int | None = None,
    add_bos: bool | None = None,
) -> torch.LongTensor:
    """Non-overlapping windows of ``length`` tokens, shape ``(n, length)``.

    The text is tokenised once without special tokens. Without a seed the first ``n_windows`` in
    order are returned (all if None): the evaluation protocol. With a seed, ``n_windows`` windows
    at random non-overlapping offsets: calibration. When BOS is used (by default exactly when the
    tokenizer adds it itself) every window is BOS followed by ``length - 1`` text tokens, as the
    model saw text in training.
    """
    use_bos = _adds_bos(tokenizer) if add_bos is None else add_bos
    if use_bos and tokenizer.bos_token_id is None:
        raise DataError("This tokenizer has no BOS token. Use add_bos=False.")
    span = length - 1 if use_bos else length
    if span < 1:
        raise DataError(f"A window of {length} tokens is too short. Use a longer window.")
    if n_windows is not None and n_windows < 1:
        raise DataError(f"{n_windows} windows were asked for. Ask for at least one window.")
    ids = tokenize_in_chunks(tokenizer, text)
    available = len(ids) // span
    n = available if n_windows is None else n_windows
    if available == 0 or n > available:
        raise DataError(
            f"The text has {len(ids)} tokens: room for {available} windows of {length}, "
            f"{n} asked. Use more text, shorter windows or fewer windows."
        )
    if seed is None:
        offsets = [i * span for i in range(n)]
    else:
        # n intervals placed uniformly: draw the free space before each, in sorted order.
        slack = len(ids) - n * span
        gaps = sorted(random.Random(seed).choices(range(slack + 1), k=n))
        offsets = [gap + i * span for i, gap in enumerate(gaps)]
    windows = torch.tensor([ids[o : o + span] for o in offsets], dtype=torch.long)
    if use_bos:
        bos = torch.full((n, 1), tokenizer.bos_token_id, dtype=torch.long)
        windows = torch.cat([bos, windows], dim=1)
    return windows


def split_heldout(text: str, fraction: float = 0.1) -> tuple[str, str]:
    """(fit, held-out) parts of a calibration text: its last ``fraction`` of paragraphs held out.

    Settings chosen by measurement (a sensitivity sweep, whether a recovery step helped) must
    not be chosen on the evaluation text, nor on the text the weights were fitted to; the tail of
    the calibration text is neither. Text with fewer than ten paragraphs is split at the last
    whitespace before ``1 - fraction`` of its characters.
    """
    paragraphs = text.split("\n\n")
    if len(paragraphs) >= 10:
        cut = len(paragraphs) - int(len(paragraphs) * fraction)
        return "\n\n".join(paragraphs[:cut]), "\n\n".join(paragraphs[cut:])
    at = int(len(text) * (1 - fraction))
    space = text.rfind(" ", 0, at)
    at = space if space > 0 else at
    return text[:at], text[at:].lstrip()


def ensure_disjoint(calibration_text: str, evaluation_text: str) -> None:
    """Refuse evaluation text that is, or largely repeats, the calibration text.

    Scoring and evaluating on the same documents flatters every pruning method, so at least half of
    the evaluation paragraphs (compared normalised) appearing in calibration is an error.
    """
    calibration = _paragraphs(calibration_text)
    evaluation = _paragraphs(evaluation_text)
    if not evaluation:
        raise DataError("The evaluation text is empty. Choose some evaluation text.")
    joined_cal, joined_eval = " ".join(calibration), " ".join(evaluation)
    if joined_eval == joined_cal or joined_eval in joined_cal:
        raise DataError(
            "The evaluation text is the calibration text. Use different text for evaluation."
        )
    shared = sum(p in set(calibration) for p in evaluation) / len(evaluation)
    if shared >= 0.5:
        raise DataError(
            f"{shared:.0%} of the evaluation paragraphs also appear in the calibration text. "
            "Use evaluation text that was not used for calibration."
        )


def _paragraphs(text: str) -> list[str]:
    """Blank-line separated paragraphs, lowercased with whitespace collapsed."""
    parts = (" ".join(p.split()).lower() for p in re.split(r"\n\s*\n", text))
    return [p for p in parts if p]


def _adds_bos(tokenizer) -> bool:
    """Whether the tokenizer itself puts BOS in front of text (Gemma does, SmolLM2 does not)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a").input_ids[:1] == [bos]


SourceKind = Literal["builtin", "file", "dataset", "generated"]
SOURCE_KINDS: tuple[str, ...] = ("builtin", "file", "dataset", "generated")


@dataclass(frozen=True)
class TextSource:
    """Where a plan's text comes from, as JSON-friendly data, so the plan can replay it.

    ``args`` are the keyword arguments of the reader for ``kind``: none for "builtin" (the split
    picks the Lee file), ``read_text_file``'s for "file", ``dataset_text``'s for "dataset", and
    ``self_generated_text``'s (less model, tokenizer and progress) for "generated".
    """

    kind: SourceKind = "builtin"
    args: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in SOURCE_KINDS:
            raise DataError(
                f"Unknown text source '{self.kind}'. Use one of: {', '.join(SOURCE_KINDS)}."
            )
        reader = _READERS.get(self.kind)
        params = inspect.signature(reader).parameters if reader else {}
        allowed = set(params) - _NOT_ARGS
        required = {n for n in allowed if params[n].default is inspect.Parameter.empty}
        unknown, missing = set(self.args) - allowed, required - set(self.args)
        if unknown or missing:
            raise DataError(
                f"A '{self.kind}' text source takes {', '.join(sorted(allowed)) or 'no arguments'}"
                f" (required: {', '.join(sorted(required)) or 'none'}); got {', '.join(sorted(self.args)) or 'none'}."
            )

    def to_dict(self) -> dict:
        return {"kind": self.kind, **self.args}

    @classmethod
    def from_dict(cls, data: dict) -> TextSource:
        args = dict(data)
        return cls(kind=args.pop("kind", "builtin"), args=args)

    def read(self, split: Split, workspace: Workspace | None = None) -> str:
        """The text this source names; ``split`` only matters for the built-in corpus."""
        if self.kind == "builtin":
            return builtin_text(split)
        if self.kind == "generated":
            if workspace is None:
                raise DataError("Self-generated text needs a loaded model. Load a model first.")
            return self_generated_text(workspace.model, workspace.tokenizer, **self.args)
        return _READERS[self.kind](**self.args)


# The built-in corpus takes no arguments: the split alone picks its file.
_READERS: dict[str, Callable[..., str]] = {
    "file": read_text_file,
    "dataset": dataset_text,
    "generated": self_generated_text,
}
_NOT_ARGS = {"model", "tokenizer", "progress"}


def text_source(spec: str) -> dict:
    """``builtin``, ``generated``, ``dataset:NAME[:CONFIG[:SPLIT[:FIELD]]]`` or a file path."""
    if spec == "builtin":
        return {"kind": "builtin"}
    if spec == "generated":
        return {"kind": "generated"}
    if spec.startswith("dataset:"):
        parts = spec.split(":")[1:]
        keys = ("name", "config", "split", "field")
        return {"kind": "dataset", **{k: v for k, v in zip(keys, parts, strict=False) if v}}
    return {"kind": "file", "path": spec}
