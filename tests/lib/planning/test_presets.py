"""The shipped recipes are plans the command line replays, and the default one is among them."""

from __future__ import annotations

import pytest

from explorer.cli import main
from explorer.errors import PlanError
from explorer.planning.plan import Plan
from explorer.planning.presets import DEFAULT, load_preset, preset_names, preset_path
from tests.conftest import SENTENCES


def test_every_preset_is_a_plan_file():
    assert DEFAULT in preset_names()
    for name in preset_names():
        plan = load_preset(name)
        assert Plan.from_json(preset_path(name).read_text()) == plan
        assert plan.target == (0.5 if name == "best_50" else 0.2)
        assert plan.model == "smollm2-135m"
    with pytest.raises(PlanError, match="Unknown preset"):
        load_preset("nope")


@pytest.mark.parametrize("name", preset_names())
def test_cli_replays_each_preset(name, tiny_llama_dir, tmp_path, capsys):
    calib, evaluation = tmp_path / "c.txt", tmp_path / "e.txt"
    calib.write_text("\n\n".join(SENTENCES[:3] * 40))
    evaluation.write_text("\n\n".join(SENTENCES[3:] * 12))
    args = ["prune", "--preset", name, "--model", str(tiny_llama_dir)]
    args += ["--calibration", str(calib), "--evaluation", str(evaluation)]
    args += ["--calibration-windows", "8", "--calibration-length", "16", "--eval-length", "16"]
    args += ["--protect-first", "0", "--protect-last", "0"]  # the tiny model has 2 layers
    if load_preset(name).allocation == "per_layer":
        # Ratios measured for SmolLM2's 30 layers: refused on another depth, with the reason;
        # the allocation that produced them (sensitivity) replays on any model.
        assert main(args) == 2
        assert "30 entries but the model has 2 layers" in capsys.readouterr().err
        args += ["--allocation", "sensitivity"]
    assert main(args) == 0, capsys.readouterr().err[-300:]
    out = capsys.readouterr().out
    assert "of block parameters removed" in out
    if any(step["step"] in ("surgeon", "flap_bias") for step in load_preset(name).recovery):
        preview = float(out.split("live steps")[1].split("perplexity ")[1].split()[0])
        recovered = float(out.split("after recovery")[1].split("perplexity ")[1].split()[0])
        assert abs(preview - recovered) <= 1e-4 * recovered  # the preview is what recovery gives
