"""Fixtures of the hardening suite: a private cache, a user's folder, a tiny model on disk."""

from __future__ import annotations

import pytest


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """A cache folder of this test only (``PRUNING_EXPLORER_CACHE``), with a file in it."""
    cache = tmp_path / "cache"
    (cache / "models").mkdir(parents=True)
    (cache / "gguf").mkdir()
    (cache / "gguf" / "model.gguf").write_bytes(b"GGUF cached bytes")
    monkeypatch.setenv("PRUNING_EXPLORER_CACHE", str(cache))
    return cache


@pytest.fixture
def user_folder(tmp_path):
    """A folder of the user's own files, which nothing may change."""
    folder = tmp_path / "mine"
    (folder / "sub").mkdir(parents=True)
    (folder / "notes.txt").write_text("my notes")
    (folder / "sub" / "data.bin").write_bytes(bytes(range(256)))
    return folder


@pytest.fixture
def tiny_workspace(tiny_llama_dir):
    """The tiny Llama folder loaded as a user would load a local model."""
    from explorer.model.loading import load_model

    return load_model(str(tiny_llama_dir), device="cpu")
