"""Evaluation at its pass count, checked before it runs, with honest exit codes (issue 25)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from helpers_cli import run_cli, valid_config, write_config

import esegeta
from esegeta.attribution import prepare as prepare_module
from esegeta.evaluation import Context, metric
from esegeta.evaluation import scoring
from esegeta.spec.request import from_arguments


def test_randomisation_prepares_one_copy_and_keeps_the_values(digits, monkeypatch):
    """MPRT re-explains once per layer on one prepared copy randomised in place: one preparation
    per metric call, not one per layer; the values are those of a fresh deep copy per call."""
    x, model = digits.x, digits.model
    target = model(x).argmax(1)
    explain = scoring.explainer(from_arguments("captum.Saliency"))
    attribution = explain(model, x, target)
    layers = metric("mprt").explanations_per_input(model)
    assert layers > 3
    made = []
    original = prepare_module.prepare
    counted = lambda *a: made.append(1) or original(*a)  # noqa: E731
    monkeypatch.setattr(prepare_module, "prepare", counted)
    monkeypatch.setattr(scoring, "prepare", counted)
    fast = metric("mprt")(Context(model=model, explain=explain, copy=explain.copy), x, attribution, target)
    assert len(made) == 1
    made.clear()
    slow = metric("mprt")(Context(model=model, explain=explain), x, attribution, target)  # a deep copy, re-prepared
    assert len(made) == layers
    torch.testing.assert_close(fast.values, slow.values)
    torch.testing.assert_close(fast.curves["similarity"], slow.curves["similarity"])


# -- values checked before the run, honest exit codes ---------------------------------
ROOT = Path(__file__).resolve().parent.parent
DIGIT = ROOT / "samples" / "data" / "digits" / "digit_1_label0.npy"


def _config(tmp_path, evaluation, formats=("npy",), inputs=None):
    return valid_config(tmp_path, [{"id": "captum.Saliency"}], evaluation=evaluation,
                        inputs=inputs or {"paths": [str(DIGIT)], "spatial_dims": 2},
                        output={"dir": str(tmp_path / "out"), "formats": list(formats)})


@pytest.mark.parametrize("params, field", [
    ({"steps": "10"}, "steps"), ({"steps": 0}, "steps"), ({"steps": -3}, "steps"),
    ({"baseline": "blak"}, "baseline"), ({"order": "best"}, "order"), ({"softmax": 1}, "softmax"),
])
def test_validate_and_check_refuse_bad_parameter_values(tmp_path, capsys, params, field):
    cfg = write_config(tmp_path, _config(tmp_path, {"metrics": [{"id": "deletion", "params": params}]}))
    for command in ("validate", "check"):
        code, _, err = run_cli([command, cfg], capsys)
        assert code == 2, (command, err)
        assert f"evaluation.metrics[0].params.{field}" in err and "Traceback" not in err


@pytest.mark.parametrize("metrics, overrides, path, words", [
    ([{"id": "road", "params": {"percentages": [10, 120]}}], {}, "evaluation.metrics[0].params.percentages", "<= 100"),
    (["mprt"], {"captum.Saliency": {"mprt": {"similarity": "spearmann"}}},
     "evaluation.overrides.captum.Saliency.mprt.similarity", "did you mean spearman"),
])
def test_ranges_enums_and_overrides_are_checked(tmp_path, capsys, metrics, overrides, path, words):
    cfg = write_config(tmp_path, _config(tmp_path, {"metrics": metrics, "overrides": overrides}))
    code, _, err = run_cli(["validate", cfg], capsys)
    assert code == 2 and path in err and words in err, err


def test_a_mask_of_the_wrong_shape_is_refused_before_the_run(tmp_path, capsys):
    np.save(tmp_path / "volume.npy", np.ones((4, 8, 8), dtype=np.float32))  # 3D mask, 2D 8x8 input
    cfg = write_config(tmp_path, _config(tmp_path, {"metrics": ["pointing_game"], "masks": [str(tmp_path / "volume.npy")]}))
    for command in ("validate", "run"):
        code, _, err = run_cli([command, cfg], capsys)
        assert code == 2, err
        assert "evaluation.masks" in err and "(4, 8, 8)" in err and "2D input of spatial shape (8, 8)" in err
    assert not (tmp_path / "out" / "manifest.json").exists()  # nothing ran


def test_one_mask_serves_every_input(tmp_path):
    mask = np.zeros((8, 8), dtype=np.float32)
    mask[2:6, 2:6] = 1
    np.save(tmp_path / "mask.npy", mask)
    inputs = {"paths": [str(DIGIT), str(DIGIT.parent / "digit_9_label7.npy")], "spatial_dims": 2}
    cfg = _config(tmp_path, {"metrics": ["relevance_mass_accuracy"], "masks": [str(tmp_path / "mask.npy")]},
                  inputs=inputs)
    result = esegeta.Pipeline(cfg).run()
    assert result.exit_code == 0, result.error
    values = result.manifest["evaluation"]["values"]
    assert len(values) == 2 and all(0 < v["value"] < 1 for v in values)


def test_run_exits_1_when_the_evaluation_fails(tmp_path, capsys):
    """ROAD with 26 neighbours is a 3D setting: every value of this 2D run fails, so the run does."""
    cfg = write_config(tmp_path, _config(tmp_path, {"metrics": [{"id": "road", "params": {"neighbours": 26}}]}))
    code, _, err = run_cli(["run", cfg], capsys)
    assert code == 1
    assert "evaluation: 1 of 1 value(s) failed" in err and "neighbours" in err
    assert (tmp_path / "out" / "manifest.json").is_file()  # the attributions are kept


def test_evaluate_on_a_run_without_maps_exits_2(tmp_path, capsys):
    cfg = write_config(tmp_path, _config(tmp_path, {"metrics": ["sparseness"], "enabled": False}, formats=("png",)))
    code, _, err = run_cli(["run", cfg], capsys)
    assert code == 0, err
    code, _, err = run_cli(["evaluate", cfg], capsys)
    assert code == 2 and "no saved attribution" in err and "npy" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "evaluation.csv").exists()


# -- the Python API ----------------------------------------------------------------------
def test_python_evaluate_takes_one_target_per_input(digits):
    x = digits.x[:2] if digits.x.shape[0] >= 2 else torch.cat([digits.x, digits.x.flip(-1)])
    maps = torch.rand(x.shape, generator=torch.Generator().manual_seed(0))
    metrics = [{"id": "deletion", "params": {"steps": 4}}]
    both = esegeta.evaluate(digits.model, x, {"captum.Saliency": maps}, metrics, target=[3, 7])
    each = [esegeta.evaluate(digits.model, x[i:i + 1], {"captum.Saliency": maps[i:i + 1]}, metrics, target=t)
            for i, t in enumerate((3, 7))]
    assert [r["value"] for r in both.rows] == pytest.approx([e.rows[0]["value"] for e in each], rel=1e-6, abs=1e-7)
    three = torch.cat([x, x[:1]])  # inputs of one target scored together, rows in the inputs' order
    mixed = esegeta.evaluate(digits.model, three, {"captum.Saliency": torch.cat([maps, maps[:1]])}, metrics,
                             target=[3, 7, 3])
    assert [r["input"] for r in mixed.rows] == ["input0", "input1", "input2"]
    assert [r["value"] for r in mixed.rows] == pytest.approx([e.rows[0]["value"] for e in each]
                                                             + [each[0].rows[0]["value"]], rel=1e-6, abs=1e-7)
    other = esegeta.evaluate(digits.model, x, {"captum.Saliency": maps}, metrics, target=[7, 3])
    assert [r["value"] for r in other.rows] != [r["value"] for r in both.rows]  # the targets do matter
    with pytest.raises(esegeta.ConfigError, match="one per input"):
        esegeta.evaluate(digits.model, x, {"captum.Saliency": maps}, metrics, target=[3, 7, 1])
    with pytest.raises(esegeta.ConfigError, match="target 99 of input1 does not exist: the model output has 10 columns"):
        esegeta.evaluate(digits.model, x, {"captum.Saliency": maps}, metrics, target=[3, 99])


def test_a_map_with_fewer_channels_than_the_reexplanation_gets_esegetas_error():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(4, 3)).eval()
    x = torch.rand(2, 3, 8, 8)
    one_channel = torch.rand(2, 1, 8, 8)
    result = esegeta.evaluate(model, x, {"captum.Saliency": one_channel}, ["random_logit", "mprt"])
    errors = [r.get("error", "") for r in result.rows]
    assert len(errors) == 4 and all("1 channel(s), the method's re-explanation 3" in e for e in errors), errors
    assert not any("RuntimeError" in e for e in errors)
    full = esegeta.evaluate(model, x, {"captum.Saliency": torch.rand(2, 3, 8, 8)}, ["random_logit"])
    assert not any(r.get("error") for r in full.rows)


def test_mprt_scores_every_input_of_a_method_in_one_call(digits, monkeypatch):
    """One randomised copy re-explains all inputs together; each input's value is its value alone."""
    x = torch.cat([digits.x[:1], digits.x[:1].flip(-1), digits.x[:1].flip(-2)])
    maps = torch.rand(x.shape, generator=torch.Generator().manual_seed(0))
    metrics = ["mprt", "efficient_mprt"]
    alone = [esegeta.evaluate(digits.model, x[i:i + 1], {"captum.Saliency": maps[i:i + 1]}, metrics).rows
             for i in range(3)]
    made = []
    original = prepare_module.prepare
    counted = lambda *a: made.append(1) or original(*a)  # noqa: E731
    monkeypatch.setattr(scoring, "prepare", counted)
    together = esegeta.evaluate(digits.model, x, {"captum.Saliency": maps}, metrics).rows
    assert len(made) == 2  # one randomised copy per metric, not one per input
    assert [(r["input"], r["metric"]) for r in together] == [(f"input{i}", m) for i in range(3) for m in metrics]
    for i in range(3):
        for row, single in zip(together[2 * i:2 * i + 2], alone[i]):
            assert row["value"] == pytest.approx(single["value"], rel=1e-5, abs=1e-6)
