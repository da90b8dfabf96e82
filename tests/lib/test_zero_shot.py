"""Zero-shot accuracy through lm-eval: the local task runs offline and an export scores exactly
as the in-memory model it was written from."""

from __future__ import annotations

import json

import pytest

from explorer import cli
from explorer.apply.pruning import prune_model
from explorer.data import builtin_text
from explorer.errors import ExplorerError
from explorer.export.writer import export_model, load_pruned
from explorer.zero_shot import LOCAL_TASKS, build_lee_cloze, zero_shot
from tests.lib.export.test_writer import per_layer_selection
from tests.tiny import tiny

pytest.importorskip("lm_eval", reason="lm-eval is not installed (./run installs it)")


def test_the_shipped_task_is_the_one_built_from_the_corpus():
    shipped = (LOCAL_TASKS["lee_cloze"] / "lee_cloze.jsonl").read_text().splitlines()
    docs = [json.loads(line) for line in shipped]
    assert docs == build_lee_cloze(builtin_text("evaluation"))
    assert len(docs) == 40 and all(len(d["choices"]) == 4 for d in docs)
    assert all(d["choices"][d["label"]] not in d["context"] for d in docs)


def test_an_export_scores_as_the_in_memory_model(tiny_tokenizer, tmp_path, capsys):
    model, s = tiny("llama")
    sel = per_layer_selection(s)
    export_model(model, tiny_tokenizer, s, sel, tmp_path / "out")
    in_memory = zero_shot(prune_model(model, s, sel), tiny_tokenizer, "lee_cloze", limit=12)
    exported = zero_shot(*load_pruned(tmp_path / "out", device="cpu"), "lee_cloze", limit=12)
    assert in_memory == exported
    assert set(exported["lee_cloze"]) == {"acc", "acc_norm"}
    assert 0 <= exported["lee_cloze"]["acc"] <= 1
    assert cli.main(["evaluate", "--model", str(tmp_path / "out"), "--limit", "12"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line == f"lee_cloze: acc {exported['lee_cloze']['acc']:.4f}, " + (
        f"acc_norm {exported['lee_cloze']['acc_norm']:.4f}"
    )


def test_unknown_tasks_and_gguf_folders_are_refused(tiny_tokenizer, tmp_path, capsys):
    model, _ = tiny("llama")
    with pytest.raises(ExplorerError, match="Unknown lm-eval task"):
        zero_shot(model, tiny_tokenizer, "no_such_task")
    (tmp_path / "model-f16.gguf").write_bytes(b"GGUF")
    assert cli.main(["evaluate", "--model", str(tmp_path)]) == 2
    assert "llama-server" in capsys.readouterr().err
