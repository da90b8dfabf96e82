"""The pipeline end to end: session caches, the command line, and the real SmolLM2."""

import math

import pytest
import torch

from explorer.cli import main
from explorer.errors import DataError, PlanError
from explorer.importance import criterion_names
from explorer.masking import masked
from explorer.plan import Plan
from explorer.pruning import prune_model
from explorer.selection import Selection, param_counts
from explorer.session import Explorer
from tests.conftest import SENTENCES

CALIBRATION = "\n\n".join(SENTENCES[:3] * 20)
EVALUATION = "\n\n".join(SENTENCES[3:] * 12)


@pytest.fixture
def texts(tmp_path):
    calib, evaluation = tmp_path / "calib.txt", tmp_path / "eval.txt"
    calib.write_text(CALIBRATION)
    evaluation.write_text(EVALUATION)
    return calib, evaluation


def test_cli_prunes_a_local_model_with_every_criterion(tiny_llama_dir, texts, capsys):
    calib, evaluation = texts
    for criterion in criterion_names():
        code = main(
            [
                "prune",
                "--model",
                str(tiny_llama_dir),
                "--criterion",
                criterion,
                "--target",
                "0.3",
                "--calibration",
                str(calib),
                "--evaluation",
                str(evaluation),
                "--eval-length",
                "16",
                "--calibration-length",
                "16",
            ]
        )
        out, err = capsys.readouterr()
        assert code == 0, (criterion, err[-300:])
        assert "of block parameters removed" in out and "perplexity" in out
        pruned = float(out.split("pruned ")[-1].split()[0])
        assert math.isfinite(pruned)


def test_cli_reports_bad_input(tiny_llama_dir, texts, tmp_path, capsys):
    calib, _ = texts
    bad_plan = tmp_path / "bad.json"
    bad_plan.write_text('{"target": 7}')
    cases = [
        (["prune", "--model", str(tmp_path / "nope")], "No model"),
        (["prune", "--plan", str(bad_plan)], "out of range"),
        (
            ["prune", "--model", str(tiny_llama_dir), "--calibration", str(calib)]
            + ["--evaluation", str(calib)],
            "same",
        ),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "error: " in err and message.lower() in err.lower(), err


def test_calibration_must_differ_from_evaluation(tiny_llama_dir):
    from explorer.loading import load_model

    ws = load_model(str(tiny_llama_dir))
    with pytest.raises(DataError):
        Explorer.from_texts(ws, EVALUATION, EVALUATION, calibration_length=8)


def test_plans_cutting_hidden_channels_resolve_with_every_criterion(tiny_llama_dir):
    """Hidden-channel scores are computed when a plan asks for them (and only then)."""
    from explorer.loading import load_model

    ex = Explorer.from_texts(
        load_model(str(tiny_llama_dir)),
        CALIBRATION,
        EVALUATION,
        calibration_length=16,
        evaluation_length=16,
    )
    s = ex.structure
    for criterion in criterion_names():
        plan = Plan(criterion=criterion, target=None, head_ratio=0.0, mlp_ratio=0.0)
        assert not ex.resolve(plan).hidden
        plan.hidden_ratio = 0.25
        # defined on module inputs, or on whole layers only
        if criterion in ("flap", "obs", "surgeon_greedy", "block_influence"):
            with pytest.raises(PlanError, match="hidden"):
                ex.resolve(plan)
            continue
        sel = ex.resolve(plan)
        assert len(sel.hidden) == s.hidden // 4 and (s.hidden - len(sel.hidden)) % s.heads == 0
        assert "hidden" in ex.scores(criterion, hidden=True)
        assert math.isfinite(ex.perplexity(sel)), criterion


@pytest.mark.real
def test_real_smollm2_pipeline(smollm2):
    """SmolLM2: dense perplexity, a 20% plan, masks equal slicing on the real weights."""
    ex = smollm2
    dense = ex.dense_perplexity()
    sel = ex.resolve(Plan(criterion="taylor_e1", target=0.2, protect_first=3, protect_last=2))
    sizes = ex.sizes(sel)
    assert sizes["block_params_before"] == 106_202_880
    assert 0.195 < 1 - sizes["block_params_after"] / sizes["block_params_before"] < 0.205
    pruned = ex.perplexity(sel)
    assert math.isfinite(pruned) and pruned > dense
    # Switching back to the dense view and again to the plan gives the same numbers.
    assert ex.perplexity(Selection()) == pytest.approx(dense, rel=1e-6)
    assert ex.perplexity(sel) == pytest.approx(pruned, rel=1e-5)
    # Real weights: the sliced model computes what the masks preview.
    mixed = Selection.make(
        ex.structure,
        heads={4: [0, 3, 6]},
        kv={9: [1]},
        mlp={5: list(range(0, 1536, 3))},
        layers=[20],
    )
    ids = ex.evaluation[:1, :64]
    with torch.no_grad(), masked(ex.model, ex.structure, mixed):
        masked_logits = ex.model(ids).logits
    small = prune_model(ex.model, ex.structure, mixed)
    with torch.no_grad():
        assert (small(ids).logits - masked_logits).abs().max() < 1e-4
    assert sum(p.numel() for p in small.parameters()) == param_counts(ex.structure, mixed)["total"]


def test_cli_recovers_and_exports(tiny_llama_dir, texts, tmp_path, capsys):
    calib, evaluation = texts
    out = tmp_path / "pruned"
    argv = ["prune", "--model", str(tiny_llama_dir), "--criterion", "wanda_sp"]
    argv += ["--target", "0.3", "--calibration", str(calib), "--evaluation", str(evaluation)]
    argv += ["--eval-length", "16", "--calibration-length", "16", "--recovery", "layerwise"]
    assert main([*argv, "--out", str(out), "--save-plan", str(tmp_path / "plan.json")]) == 0
    text = capsys.readouterr().out
    assert "after recovery (layerwise)" in text and "exported to" in text
    import json

    report = json.loads((out / "report.json").read_text())
    assert json.loads((out / "plan.json").read_text())["recovery"] == [{"step": "layerwise"}]
    recovered = float(text.split("after recovery (layerwise): perplexity ")[1].split()[0])
    assert report["perplexity_after"] == pytest.approx(recovered, abs=0.006)
    # The folder is refused a second time unless --overwrite.
    assert main([*argv, "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err.lower()
    # The saved plan replays through the export command.
    replay = ["export", "--plan", str(tmp_path / "plan.json"), "--out", str(tmp_path / "again")]
    assert main([*replay, "--eval-length", "16"]) == 0


def test_cli_depth_plan_with_parametrised_recovery_steps(tiny_llama_dir, texts, tmp_path, capsys):
    """Whole layers by Block Influence, then linear replacement and distillation with parameters."""
    import json

    calib, evaluation = texts
    argv = ["prune", "--model", str(tiny_llama_dir), "--criterion", "wanda_sp", "--target", "0.5"]
    argv += ["--depth", "1", "--depth-criterion", "block_influence", "--protect-first", "1"]
    argv += ["--calibration", str(calib), "--evaluation", str(evaluation)]
    argv += ["--eval-length", "16", "--calibration-length", "16"]
    steps = "linear_replace,distill:steps=2:lora_rank=2:lr=0.01:top_k=5"
    assert main([*argv, "--recovery", steps, "--out", str(tmp_path / "out")]) == 0
    assert "after recovery (linear_replace, distill)" in capsys.readouterr().out
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    assert plan["depth"] == 1 and plan["depth_criterion"] == "block_influence"
    assert plan["recovery"] == [
        {"step": "linear_replace"},
        {"step": "distill", "steps": 2, "lora_rank": 2, "lr": 0.01, "top_k": 5},
    ]
    assert main([*argv, "--recovery", "distill:steps"]) == 2
    assert "key=value" in capsys.readouterr().err
    assert main([*argv, "--recovery", "distill:stepz=2"]) == 2
    assert "no parameter stepz" in capsys.readouterr().err


def test_cli_runs_the_greedy_obs_plan_with_its_update(tiny_llama_dir, texts, tmp_path, capsys):
    """The best setting of bench/methods.py, from the command line: MLP only, global, capped."""
    calib, evaluation = texts
    argv = ["prune", "--model", str(tiny_llama_dir), "--criterion", "obs", "--target", "0.2"]
    argv += ["--allocation", "global", "--head-ratio", "0", "--max-ratio", "0.5"]
    argv += ["--calibration", str(calib), "--evaluation", str(evaluation), "--recovery", "surgeon"]
    argv += ["--eval-length", "16", "--calibration-length", "16"]
    assert main([*argv, "--save-plan", str(tmp_path / "plan.json")]) == 0
    text = capsys.readouterr().out
    recovered = float(text.split("after recovery (surgeon): perplexity ")[1].split()[0])
    assert math.isfinite(recovered)  # the update's benefit is tested in test_surgeon.py
    plan = Plan.load(tmp_path / "plan.json")
    assert (plan.max_ratio, plan.head_ratio, plan.allocation) == (0.5, 0.0, "global")
