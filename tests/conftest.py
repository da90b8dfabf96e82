"""Shared fixtures: offline hub, tiny word-level tokenizers, a tiny Llama folder on disk."""

from __future__ import annotations

import os

# Before transformers/huggingface_hub are imported anywhere: tests never reach the hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_EVALUATE_OFFLINE"] = "1"  # lm-eval's metrics
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import ipaddress  # noqa: E402
import socket  # noqa: E402

import pytest  # noqa: E402

_connect = socket.socket.connect


def _local_only(self, address):
    """Tests reach this machine only (the app's own port, the browser): never the network."""
    if self.family in (socket.AF_INET, socket.AF_INET6):
        host = address[0]
        try:
            local = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            local = False
        if not local:
            raise ConnectionRefusedError(f"tests must not reach the network (connect to {host})")
    return _connect(self, address)


socket.socket.connect = _local_only

SENTENCES = [
    "the cat sat on the mat",
    "a dog ran in the park",
    "the market fell as shares in the bank dropped",
    "rain is expected in the south on monday",
    "the minister said the plan would cost more than expected",
]


def _tokenizer(add_bos: bool):
    """A word-level tokenizer trained on ``SENTENCES``, no downloads; pad left unset on purpose."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        SENTENCES, trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>"])
    )
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


# Disjoint calibration and evaluation texts in the tiny tokenizers' words.
CALIBRATION = "\n\n".join(SENTENCES[:3] * 20)
EVALUATION = "\n\n".join(SENTENCES[3:] * 12)


@pytest.fixture(scope="module")
def tiny_session(tiny_llama_dir):
    """An ``Explorer`` on the tiny Llama folder with ``CALIBRATION`` / ``EVALUATION`` (16 tokens)."""
    from explorer.model.loading import load_model
    from explorer.session import Explorer

    ws = load_model(str(tiny_llama_dir), device="cpu")
    return Explorer.from_texts(
        ws,
        CALIBRATION,
        EVALUATION,
        calibration_windows=12,
        calibration_length=16,
        evaluation_length=16,
    )


@pytest.fixture
def texts(tmp_path):
    """``CALIBRATION`` and ``EVALUATION`` as files: (calibration path, evaluation path)."""
    calib, evaluation = tmp_path / "calib.txt", tmp_path / "eval.txt"
    calib.write_text(CALIBRATION)
    evaluation.write_text(EVALUATION)
    return calib, evaluation


@pytest.fixture
def sentences() -> list[str]:
    """The words the tiny tokenizers know."""
    return list(SENTENCES)


@pytest.fixture
def tiny_tokenizer():
    """Adds no BOS itself, like SmolLM2's."""
    return _tokenizer(add_bos=False)


@pytest.fixture(scope="session")
def bpe_tokenizer():
    """A byte-level BPE tokenizer (the kind GGUF vocabularies are written from) of 300 tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(SENTENCES, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


@pytest.fixture
def tiny_bos_tokenizer():
    """Puts BOS in front of every text, like Gemma's."""
    return _tokenizer(add_bos=True)


@pytest.fixture
def harmful_step(monkeypatch) -> str:
    """A recovery step ``scramble`` (registered for one test) that adds large noise to every
    weight of the pruned model: a step certain to make it worse on any held-out text."""
    import torch

    from explorer.catalogue import RECOVERY_STEPS
    from explorer.recovery.steps import RecoveryStep

    def scramble(ctx, *, scale: float = 0.3) -> dict:
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in ctx.pruned.parameters():
                p.add_(scale * torch.randn(p.shape, generator=g))
        return {"scale": scale}

    step = RecoveryStep("scramble", "Scramble the weights (a test's harmful step)", scramble)
    monkeypatch.setitem(RECOVERY_STEPS._items, step.name, step)
    return step.name


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A random 2-layer GQA Llama saved with its tokenizer, as a user's local model folder."""
    from tests.tiny import tiny_model

    tokenizer = _tokenizer(add_bos=False)
    model = tiny_model(
        "llama",
        perturb=False,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=len(tokenizer),
        tie_word_embeddings=False,
    )
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M with the Lee corpus: 10 x 64 calibration, 4 x 256 evaluation tokens."""
    from explorer.planning.plan import Plan
    from explorer.session import Explorer

    return Explorer.open(Plan(), evaluation_windows=4)
