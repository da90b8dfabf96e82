"""Text sources, token windows and the calibration/evaluation separation."""

from __future__ import annotations

import json
import random
from itertools import pairwise

import pytest
import torch

from explorer.data import (
    TextSource,
    builtin_text,
    dataset_text,
    ensure_disjoint,
    read_text_file,
    self_generated_text,
    split_heldout,
    token_windows,
    wiki_paragraphs,
)
from explorer.errors import DataError


@pytest.fixture
def text(sentences) -> str:
    return " ".join(sentences * 20)


def test_first_windows_in_order(tiny_tokenizer, text):
    ids = tiny_tokenizer(text, add_special_tokens=False).input_ids
    windows = token_windows(tiny_tokenizer, text, 16)
    assert windows.dtype == torch.long
    assert windows.shape == (len(ids) // 16, 16)
    assert windows.flatten().tolist() == ids[: windows.numel()]
    assert torch.equal(token_windows(tiny_tokenizer, text, 16, 3), windows[:3])


def test_seeded_windows_are_deterministic_and_disjoint(tiny_tokenizer, sentences):
    words = " ".join(sentences).split()
    text = " ".join(random.Random(0).choices(words, k=400))  # aperiodic: each window found once
    a = token_windows(tiny_tokenizer, text, 16, 5, seed=1)
    b = token_windows(tiny_tokenizer, text, 16, 5, seed=1)
    c = token_windows(tiny_tokenizer, text, 16, 5, seed=2)
    assert a.shape == (5, 16) and torch.equal(a, b) and not torch.equal(a, c)
    ids = tiny_tokenizer(text, add_special_tokens=False).input_ids
    starts = []
    for row in a.tolist():  # each window is a real slice of the text
        (start,) = [i for i in range(len(ids) - 15) if ids[i : i + 16] == row]
        starts.append(start)
    starts.sort()
    assert all(later - earlier >= 16 for earlier, later in pairwise(starts))


def test_bos_follows_the_tokenizer(tiny_tokenizer, tiny_bos_tokenizer, text):
    bos = tiny_bos_tokenizer.bos_token_id
    with_bos = token_windows(tiny_bos_tokenizer, text, 8, 4)
    assert with_bos.shape == (4, 8) and (with_bos[:, 0] == bos).all()
    assert (with_bos[:, 1:] != bos).all()
    ids = tiny_bos_tokenizer(text, add_special_tokens=False).input_ids
    assert with_bos[:, 1:].flatten().tolist() == ids[:28]  # 7 text tokens per window
    assert (token_windows(tiny_tokenizer, text, 8, 4)[:, 0] != bos).any()
    forced = token_windows(tiny_tokenizer, text, 8, 4, add_bos=True)
    assert (forced[:, 0] == bos).all()


def test_too_short_text_is_refused(tiny_tokenizer, text):
    with pytest.raises(DataError, match="room for 0 windows"):
        token_windows(tiny_tokenizer, "the cat", 16)
    with pytest.raises(DataError, match="Use more text"):
        token_windows(tiny_tokenizer, text, 16, 10_000, seed=0)


def test_ensure_disjoint():
    cal = "\n\n".join(f"calibration document {i}" for i in range(10))
    evaluation = "\n\n".join(f"evaluation document {i}" for i in range(10))
    ensure_disjoint(cal, evaluation)
    with pytest.raises(DataError, match="is the calibration text"):
        ensure_disjoint(cal, cal)
    with pytest.raises(DataError, match="is the calibration text"):
        ensure_disjoint(cal, "Calibration   document 3")  # normalised containment
    half = "\n\n".join(cal.split("\n\n")[:5] + evaluation.split("\n\n")[:5])
    with pytest.raises(DataError, match="50% of the evaluation paragraphs"):
        ensure_disjoint(cal, half)
    ensure_disjoint(cal, "\n\n".join(cal.split("\n\n")[:2] + evaluation.split("\n\n")))
    with pytest.raises(DataError, match="empty"):
        ensure_disjoint(cal, " \n ")


def test_read_text_file(tmp_path, sentences):
    txt = tmp_path / "a.txt"
    txt.write_text("line one\nline two\n")
    assert read_text_file(txt) == "line one\nline two\n"
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("\n".join(json.dumps({"body": s}) for s in sentences[:3]) + "\n")
    assert read_text_file(jsonl, field="body") == "\n\n".join(sentences[:3])
    with pytest.raises(DataError, match="line 1 has no field 'text'"):
        read_text_file(jsonl)
    with pytest.raises(DataError, match="No text file"):
        read_text_file(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(DataError, match="contains no text"):
        read_text_file(tmp_path / "empty.txt")


def test_dataset_text_from_disk_and_data_files(tmp_path, sentences):
    import datasets

    datasets.Dataset.from_dict({"text": sentences, "n": list(range(5))}).save_to_disk(
        tmp_path / "saved"
    )
    assert dataset_text(str(tmp_path / "saved")) == "\n\n".join(sentences)
    assert dataset_text(str(tmp_path / "saved"), limit=2) == "\n\n".join(sentences[:2])
    with pytest.raises(DataError, match="no column 'body'.*text, n"):
        dataset_text(str(tmp_path / "saved"), field="body")
    datasets.DatasetDict(
        {"validation": datasets.Dataset.from_dict({"text": sentences[:2]})}
    ).save_to_disk(tmp_path / "dict")
    assert dataset_text(str(tmp_path / "dict"), split="validation") == "\n\n".join(sentences[:2])
    csv = tmp_path / "rows.csv"
    csv.write_text("text\n" + "\n".join(sentences) + "\n")
    assert dataset_text(str(csv)) == "\n\n".join(sentences)
    with pytest.raises(DataError, match="no-such/dataset"):
        dataset_text("no-such/dataset")


def test_self_generated_text_is_deterministic(tiny_llama_dir):
    from explorer.model.loading import load_model

    ws = load_model(str(tiny_llama_dir), device="cpu")
    steps = []
    a = self_generated_text(ws.model, ws.tokenizer, n_samples=3, length=10, seed=5)
    b = self_generated_text(
        ws.model,
        ws.tokenizer,
        n_samples=3,
        length=10,
        seed=5,
        progress=lambda f, m: steps.append(f),
    )
    assert a == b and a.strip()
    assert 1 <= len(a.split("\n\n")) <= 3
    assert steps[-1] == 1.0
    assert a != self_generated_text(ws.model, ws.tokenizer, n_samples=3, length=10, seed=6)


def test_text_source_round_trip_and_read(tmp_path, tiny_llama_dir):
    from explorer.model.loading import load_model

    path = tmp_path / "cal.txt"
    path.write_text("some calibration text")
    source = TextSource("file", {"path": str(path)})
    assert TextSource.from_dict(json.loads(json.dumps(source.to_dict()))) == source
    assert source.read("calibration") == "some calibration text"
    generated = TextSource("generated", {"n_samples": 2, "length": 4})
    with pytest.raises(DataError, match="needs a loaded model"):
        generated.read("calibration")
    ws = load_model(str(tiny_llama_dir), device="cpu")
    assert generated.read("calibration", ws) == self_generated_text(
        ws.model, ws.tokenizer, n_samples=2, length=4
    )
    with pytest.raises(DataError, match="Unknown text source"):
        TextSource("web")
    with pytest.raises(DataError, match="required: path"):
        TextSource("file", {"fields": "x"})
    assert TextSource.from_dict({"kind": "builtin"}) == TextSource()


@pytest.mark.real
def test_builtin_lee_corpus():
    cal, evaluation = builtin_text("calibration"), builtin_text("evaluation")
    assert len(cal.split("\n\n")) == 300
    assert len(evaluation.split("\n\n")) == 50
    assert evaluation.startswith("The national executive of the strife-torn Democrats")
    assert "£" in evaluation  # latin-1, decoded as such
    ensure_disjoint(cal, evaluation)
    with pytest.raises(DataError):
        ensure_disjoint(evaluation, evaluation)
    assert TextSource().read("evaluation") == evaluation


@pytest.mark.real
def test_lee_windows_for_smollm2():
    from explorer.model.loading import load_model

    tokenizer = load_model("smollm2-135m", device="cpu").tokenizer
    evaluation = builtin_text("evaluation")
    windows = token_windows(tokenizer, evaluation, 256)
    assert windows.shape == (20, 256)
    assert windows[0, 0] != tokenizer.bos_token_id  # SmolLM2 adds no BOS
    calib = token_windows(tokenizer, builtin_text("calibration"), 256, 32, seed=0)
    assert calib.shape == (32, 256)
    assert torch.equal(
        calib, token_windows(tokenizer, builtin_text("calibration"), 256, 32, seed=0)
    )


def test_offdomain_text_is_clean_prose_disjoint_from_lee():
    text = builtin_text("offdomain")
    paragraphs = text.split("\n\n")
    assert len(paragraphs) > 200 and len(text) > 100_000
    assert not any(mark in text for mark in ("{{", "}}", "[[", "]]", "<ref", "&quot;"))
    assert paragraphs[0].startswith("Anarchism is a political philosophy")
    ensure_disjoint(builtin_text("calibration"), text)
    ensure_disjoint(text, builtin_text("evaluation"))


def test_wiki_paragraphs_keeps_link_text_and_drops_markup():
    markup = (
        "{{Infobox|a={{nested}}}}'''Albedo''' is the [[Reflection (physics)|reflection]] of "
        "[[light]]<ref>Some book</ref> by a surface, measured from zero to one on a scale of "
        "[[diffuse reflection]]s; see [http://example.org the source] for more on it.\n\n"
        "== History ==\n* a list line\n[[Category:Physics]]"
    )
    (paragraph,) = wiki_paragraphs(markup, min_chars=50)
    assert paragraph.startswith("Albedo is the reflection of light by a surface")
    assert "the source for more" in paragraph and "Some book" not in paragraph


def test_the_held_out_tail_of_a_calibration_text_is_never_calibrated_on():
    paragraphs = [f"paragraph {i} " + "word " * 5 for i in range(30)]
    fit, held = split_heldout("\n\n".join(paragraphs))
    assert fit == "\n\n".join(paragraphs[:27]) and held == "\n\n".join(paragraphs[27:])
    fit, held = split_heldout("one two three four five six seven eight nine ten")
    assert (fit, held) == ("one two three four five six seven eight", "nine ten")
