"""Distillation recovery: the loss by hand, training that lowers it, caching, export."""

import math
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from explorer.apply.pruning import prune_model
from explorer.catalogue import RECOVERY_STEPS
from explorer.data import token_windows
from explorer.errors import PlanError
from explorer.export import export_model
from explorer.planning.selection import Selection
from explorer.recovery.distill import (
    GENERATION_BATCH,
    GENERATION_CACHE_BYTES,
    TeacherLogits,
    distillation_loss,
    file_windows,
    generated_windows,
    generation_batch,
    hidden_state_loss,
    teacher_cache_path,
)
from explorer.recovery.steps import RecoveryContext, run_steps
from explorer.recovery.training import lr_factor
from tests.tiny import tiny, tokens


def pruned_pair(family: str = "llama"):
    model, s = tiny(family)
    sel = Selection.make(s, mlp={0: list(range(20)), 2: list(range(0, 40, 2))}, layers=[1])
    return model, s, sel, prune_model(model, s, sel)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.double()


def kl_by_hand(z_t, z_s, temperature, top_k=None) -> float:
    """T² · mean over tokens of Σ_bins p log(p / q), one token at a time; with ``top_k`` the bins
    are the teacher's top k tokens and the rest of the vocabulary as one, at true probabilities."""
    total, n = 0.0, 0
    for zt, zs in zip(z_t.reshape(-1, z_t.shape[-1]), z_s.reshape(-1, z_s.shape[-1]), strict=True):
        support = zt.topk(top_k).indices.tolist() if top_k else range(len(zt))
        p_norm = sum(math.exp(x / temperature) for x in zt.tolist())
        q_norm = sum(math.exp(x / temperature) for x in zs.tolist())
        p_in = q_in = 0.0
        for v in support:
            p = math.exp(zt[v] / temperature) / p_norm
            q = math.exp(zs[v] / temperature) / q_norm
            total += p * math.log(p / q)
            p_in, q_in = p_in + p, q_in + q
        if top_k:
            total += (1 - p_in) * math.log((1 - p_in) / (1 - q_in))
        n += 1
    return temperature**2 * total / n


@pytest.mark.parametrize(("temperature", "top_k"), [(1.0, 0), (2.0, 0), (1.5, 5)])
def test_distillation_loss_is_the_tempered_kl_by_hand(temperature, top_k):
    model, _, _, pruned = pruned_pair()
    ids = tokens(2, 5)
    z_t, z_s = logits(model, ids), logits(pruned, ids)
    loss = distillation_loss(z_s, TeacherLogits.of(z_t, top_k, temperature), temperature)
    assert loss.item() == pytest.approx(kl_by_hand(z_t, z_s, temperature, top_k), rel=1e-4)
    # The teacher itself is the optimum, with or without the top-k bins.
    itself = distillation_loss(z_t, TeacherLogits.of(z_t, top_k, temperature), temperature)
    assert itself.item() == pytest.approx(0.0, abs=1e-6)


def run_distill(model, s, sel, pruned, ids, **params):
    ctx = RecoveryContext(model, pruned, s, sel, ids)
    (report,) = run_steps([{"step": "distill", **params}], ctx, RECOVERY_STEPS)
    return report


@pytest.mark.parametrize(("lora_rank", "lr"), [(0, 1e-3), (4, 1e-2)])
def test_distillation_starts_at_the_kl_of_the_pruned_model_and_lowers_it(lora_rank, lr):
    model, s, sel, pruned = pruned_pair()
    ids = tokens(4, 10)
    first = distillation_loss(logits(pruned, ids), TeacherLogits.of(logits(model, ids)), 2.0)
    report = run_distill(
        model, s, sel, pruned, ids, steps=12, lr=lr, batch_size=4, temperature=2.0,
        lora_rank=lora_rank,
    )  # fmt: skip
    losses = report["losses"]
    assert len(losses) == 12 and losses[0] == pytest.approx(first.item(), rel=1e-4)
    assert losses[-1] < 0.5 * losses[0]
    after = distillation_loss(logits(pruned, ids), TeacherLogits.of(logits(model, ids)), 2.0)
    assert after < first  # the model changed in place and is plain again (no adapters left)
    assert not any("lora" in name for name, _ in pruned.named_parameters())
    assert model.model.embed_tokens.weight.requires_grad  # requires_grad flags are restored


def test_hidden_state_loss_adds_the_relative_error_of_matched_layers():
    model, s, sel, pruned = pruned_pair()
    ids = tokens(4, 10)
    plain = run_distill(model, s, sel, pruned, ids, steps=1, lr=0.0, batch_size=4)["losses"][0]
    with torch.no_grad():
        hs = pruned(input_ids=ids, output_hidden_states=True).hidden_states
        ht = model(input_ids=ids, output_hidden_states=True).hidden_states
    # Student layer 0 is dense layer 0; student layer 1 (the last, whose hidden state transformers
    # gives after the final norm) is dense layer 2: compare the first pair here by hand, one token
    # at a time, each relative to its own teacher norm.
    per_token = [
        sum((a - b) ** 2 for a, b in zip(u.tolist(), v.tolist(), strict=True))
        / sum(b * b for b in v.tolist())
        for u, v in zip(hs[1].flatten(0, 1), ht[1].flatten(0, 1), strict=True)
    ]
    first = sum(per_token) / len(per_token)
    assert hidden_state_loss([hs[1]], [ht[1]]).item() == pytest.approx(first, rel=1e-5)
    both = run_distill(
        model, s, sel, pruned, ids, steps=1, lr=0.0, batch_size=4, hidden_weight=0.5
    )["losses"][0]
    assert both > plain + 0.5 * first / 2  # the mean of two layers' relative errors, weighted


def test_cached_teacher_is_written_once_and_gives_the_same_training(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNING_EXPLORER_CACHE", str(tmp_path))
    model, s, sel, _ = pruned_pair()
    ids = tokens(4, 10)
    params = dict(steps=3, lr=1e-3, batch_size=2, top_k=8)
    live = run_distill(model, s, sel, prune_model(model, s, sel), ids, **params)["losses"]
    cached = run_distill(
        model, s, sel, prune_model(model, s, sel), ids, **params, cache_teacher=True
    )["losses"]
    path = teacher_cache_path(model, ids, 8)
    assert path.is_file() and path.is_relative_to(tmp_path / "distill")
    again = run_distill(
        model, s, sel, prune_model(model, s, sel), ids, **params, cache_teacher=True
    )["losses"]
    assert live == pytest.approx(cached, rel=1e-5) and cached == again


def test_generated_windows_continue_the_calibration_prompts():
    model, _, _, _ = pruned_pair()
    ids = tokens(3, 12)
    text = generated_windows(model, ids, seed=1)
    assert text.shape == ids.shape and torch.equal(text[:, :8], ids[:, :8])
    assert not torch.equal(text, ids) and torch.equal(text, generated_windows(model, ids, seed=1))
    assert not text.is_inference()


def test_more_generated_windows_than_prompts_cycle_the_prompts_with_fresh_samples():
    model, _, _, _ = pruned_pair()
    ids = tokens(3, 12)
    text = generated_windows(model, ids, seed=1, count=7, batch_size=2)
    assert text.shape == (7, 12)
    assert torch.equal(text[:, :8], ids[torch.arange(7) % 3, :8])
    assert not torch.equal(text[0], text[3])  # the same prompt, another batch's seed
    assert torch.equal(text[:2], generated_windows(model, ids, seed=1, count=2, batch_size=2))
    with pytest.raises(PlanError, match="at least one"):
        generated_windows(model, ids, count=0)


def test_a_one_token_prompt_leaves_the_generated_text_to_the_teacher():
    model, s, sel, pruned = pruned_pair()
    ids = tokens(3, 12)
    text = generated_windows(model, ids, seed=1, prompt_tokens=1)
    assert torch.equal(text[:, :1], ids[:, :1]) and not torch.equal(text[:, 1:8], ids[:, 1:8])
    longest = generated_windows(model, ids, seed=1, prompt_tokens=50)  # all but the last token
    assert torch.equal(longest[:, :11], ids[:, :11])
    with pytest.raises(PlanError, match="at least one token"):
        run_distill(model, s, sel, pruned, ids, steps=1, generated=True, generated_prompt=0)


def test_the_generation_batch_keeps_the_key_value_cache_bounded():
    small = SimpleNamespace(num_layers=30, kv_heads=3, head_dim=64)  # SmolLM2-135M
    large = SimpleNamespace(num_layers=32, kv_heads=32, head_dim=128)  # a 7B model without GQA
    assert generation_batch(small, 256, 4) == GENERATION_BATCH
    per_window = 2 * 32 * 32 * 128 * 256 * 4
    assert generation_batch(large, 256, 4) == GENERATION_CACHE_BYTES // per_window == 8
    assert generation_batch(large, 1 << 20, 4) == 1


def test_generated_text_beside_the_calibration_windows():
    model, s, sel, pruned = pruned_pair()
    ids = tokens(3, 12)
    report = run_distill(
        model, s, sel, pruned, ids, steps=2, generated=True, generated_count=5,
        with_calibration=True, precision="bf16",
    )  # fmt: skip
    assert report["tokens"] == (3 + 5) * 12
    assert report["text"] == "calibration and generated by the dense model"
    only = run_distill(model, s, sel, prune_model(model, s, sel), ids, steps=1, generated=True)
    assert only["tokens"] == 3 * 12 and only["text"] == "generated by the dense model"


def test_text_file_windows_join_the_calibration_windows(tiny_tokenizer, tmp_path, sentences):
    model, s, sel, pruned = pruned_pair()
    ids = tokens(3, 12)
    path = tmp_path / "speeches.txt"
    path.write_text("\n\n".join(sentences * 20))
    ctx = RecoveryContext(model, pruned, s, sel, ids, tokenizer=tiny_tokenizer)
    step = {"step": "distill", "steps": 2, "text_file": str(path), "text_windows": 5}
    (beside,) = run_steps([{**step, "with_calibration": True}], ctx, RECOVERY_STEPS)
    assert beside["tokens"] == (3 + 5) * 12
    assert beside["text"] == "calibration and speeches.txt"
    (alone,) = run_steps([step], replace(ctx, pruned=prune_model(model, s, sel)), RECOVERY_STEPS)
    assert alone["tokens"] == 5 * 12 and alone["text"] == "speeches.txt"
    windows = file_windows(ctx, str(path), 5, seed=1)  # the step's windows: its seed + 1
    assert windows.shape == (5, 12)
    assert torch.equal(windows, token_windows(tiny_tokenizer, path.read_text(), 12, 5, seed=1))
    with pytest.raises(PlanError, match="tokenizer"):
        file_windows(replace(ctx, tokenizer=None), str(path), 5, seed=1)
    with pytest.raises(PlanError, match="at least one window"):
        file_windows(ctx, str(path), 0, seed=1)


def test_bad_temperature_is_refused():
    model, s, sel, pruned = pruned_pair()
    with pytest.raises(PlanError, match="temperature"):
        run_distill(model, s, sel, pruned, tokens(), temperature=0.0)


def test_distilled_model_exports_and_reloads_with_the_same_logits(tiny_tokenizer, tmp_path):
    model, s, sel, pruned = pruned_pair()
    ids = tokens(4, 10)
    before = logits(pruned, ids)
    run_distill(model, s, sel, pruned, ids, steps=3, lr=1e-2, lora_rank=4, generated=True)
    assert not torch.allclose(logits(pruned, ids), before)
    result = export_model(model, tiny_tokenizer, s, sel, tmp_path / "out", pruned=pruned)
    assert not result.remote_code
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(logits(reloaded, ids), logits(pruned, ids), rtol=1e-4, atol=1e-4)


def test_cosine_schedule_warms_up_then_decays_to_zero():
    factors = [lr_factor(k, 20, "cosine", 0.1) for k in range(20)]
    assert factors[:3] == [0.5, 1.0, 1.0]  # two warm-up steps, then the full rate
    assert all(a >= b for a, b in zip(factors[1:], factors[2:], strict=False))
    assert factors[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 17 / 18)))
    assert [lr_factor(k, 5, "constant", 0.0) for k in range(5)] == [1.0] * 5


def test_unknown_schedule_is_refused():
    model, s, sel, pruned = pruned_pair()
    with pytest.raises(PlanError, match="schedule"):
        run_distill(model, s, sel, pruned, tokens(), schedule="linear")


def test_bf16_distillation_starts_at_the_fp32_loss_lowers_it_and_keeps_fp32_weights():
    model, s, sel, pruned = pruned_pair()
    ids = tokens(4, 10)
    first = distillation_loss(logits(pruned, ids), TeacherLogits.of(logits(model, ids)), 1.0)
    report = run_distill(
        model, s, sel, pruned, ids, steps=12, lr=1e-3, batch_size=4, precision="bf16"
    )
    losses = report["losses"]
    assert losses[0] == pytest.approx(first.item(), rel=0.05)  # bf16 rounding only
    assert losses[-1] < 0.5 * losses[0]
    assert {p.dtype for p in pruned.parameters()} == {torch.float32}
    with pytest.raises(PlanError, match="precision"):
        run_distill(model, s, sel, pruned, ids, precision="fp8")


@pytest.mark.parametrize("native", [False, True])
def test_bf16_without_native_support_warns_first_and_in_the_report(monkeypatch, native):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    model, s, sel, pruned = pruned_pair()
    ids = tokens(2, 10)
    said: list[str] = []
    ctx = RecoveryContext(
        model, pruned, s, sel, ids, progress=lambda f, m: said.append(m), heldout=ids[:1]
    )
    step = {"step": "distill", "steps": 1, "lr": 50.0, "precision": "bf16"}
    (report,) = run_steps([step], ctx, RECOVERY_STEPS)
    # lr 50 wrecks the student, so the held-out warning is there too, after the step's own
    assert report["warning"].endswith("the export still works.")
    assert ("use precision fp32 here" in report["warning"]) is not native
    assert ("use precision fp32 here" in said[0]) is not native
    (plain,) = run_steps([{"step": "distill", "steps": 1, "lr": 0.0}], ctx, RECOVERY_STEPS)
    assert "warning" not in plain
