"""The command line: every criterion, bad input, recovery and export, a saved plan replayed."""

import json
import math

import pytest

from explorer.catalogue import CRITERIA
from explorer.cli import main
from explorer.planning.plan import Plan
from tests.tiny import tiny_model


def test_cli_prunes_a_local_model_with_every_criterion(tiny_llama_dir, texts, capsys):
    calib, evaluation = texts
    for criterion in CRITERIA.names():
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


def test_cli_recovers_and_exports(tiny_llama_dir, texts, tmp_path, capsys):
    calib, evaluation = texts
    out = tmp_path / "pruned"
    argv = ["prune", "--model", str(tiny_llama_dir), "--criterion", "wanda_sp"]
    argv += ["--target", "0.3", "--calibration", str(calib), "--evaluation", str(evaluation)]
    argv += ["--eval-length", "16", "--calibration-length", "16", "--recovery", "layerwise"]
    assert main([*argv, "--out", str(out), "--save-plan", str(tmp_path / "plan.json")]) == 0
    text = capsys.readouterr().out
    assert "after recovery (layerwise)" in text and "exported to" in text
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


def test_cli_exports_gguf(bpe_tokenizer, tiny_llama_dir, texts, tmp_path, capsys):
    """--format gguf writes the llama.cpp file; a vocabulary it cannot write is one clear line."""
    calib, evaluation = texts
    argv = ["prune", "--criterion", "l2", "--target", "0.3", "--calibration", str(calib)]
    argv += ["--evaluation", str(evaluation), "--eval-length", "16", "--calibration-length", "16"]
    argv += ["--format", "gguf", "--gguf-type", "q8_0"]
    assert main([*argv, "--model", str(tiny_llama_dir), "--out", str(tmp_path / "a")]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bars
    assert last.startswith("error: GGUF export writes byte-level BPE")
    source = tmp_path / "bpe-llama"
    tiny_model("llama", vocab_size=320).save_pretrained(source)
    bpe_tokenizer.save_pretrained(source)
    assert main([*argv, "--model", str(source), "--out", str(tmp_path / "b")]) == 0
    assert "exported to" in capsys.readouterr().out
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    assert report["gguf"]["outtype"] == "q8_0" and (tmp_path / "b" / "model-q8_0.gguf").is_file()


def test_cli_warns_when_a_recovery_step_hurts_held_out_calibration_text(
    tiny_llama_dir, texts, tmp_path, capsys, harmful_step
):
    calib, evaluation = texts
    argv = ["prune", "--model", str(tiny_llama_dir), "--criterion", "l2", "--target", "0.3"]
    argv += ["--calibration", str(calib), "--evaluation", str(evaluation)]
    argv += ["--eval-length", "16", "--calibration-length", "16", "--eval-windows", "2"]
    out = tmp_path / "out"
    assert (
        main([*argv, "--recovery", f"layerwise:damping=1e6,{harmful_step}", "--out", str(out)]) == 0
    )
    lines = capsys.readouterr().out.splitlines()
    warned = [line for line in lines if line.startswith("warning: ")]
    # The neutral refit (damping 1e6 keeps the weights) is not warned about; the scramble is.
    assert len(warned) == 1 and f"Recovery step '{harmful_step}' made the model worse" in warned[0]
    assert any(line.startswith("exported to") for line in lines)  # the export still happens
    report = json.loads((out / "report.json").read_text())
    assert report["recovery_warnings"] == [warned[0].removeprefix("warning: ")]
    assert [r["step"] for r in report["recovery_heldout"]] == ["layerwise", harmful_step]


def test_cli_reports_the_second_domain_next_to_the_evaluation_text(
    tiny_llama_dir, texts, tmp_path, capsys
):
    """Off-domain perplexity, dense and pruned, in the output and report.json; with a live step
    the previewed number there equals the recovered model's, as on the evaluation text."""
    calib, evaluation = texts
    out = tmp_path / "pruned"
    argv = ["prune", "--model", str(tiny_llama_dir), "--criterion", "wanda_sp", "--target", "0.3"]
    argv += ["--calibration", str(calib), "--evaluation", str(evaluation), "--eval-length", "16"]
    argv += ["--calibration-length", "16", "--recovery", "surgeon", "--offdomain-windows", "3"]
    assert main([*argv, "--out", str(out)]) == 0
    assert "off-domain (3 x 256 tokens): dense " in capsys.readouterr().out
    off = json.loads((out / "report.json").read_text())["offdomain"]
    assert off["windows"] == 3 and off["pruned"] > off["dense"] > 1
    assert off["preview"] == pytest.approx(off["after"], rel=1e-4)
    assert main([*argv[:-2], "--offdomain-windows", "-1"]) == 2
