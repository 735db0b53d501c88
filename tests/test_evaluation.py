"""Evaluation on the user's own model: config block, entry points, outputs, frozen-mask scoring,
Quantus's explain_func, ROAR, ranking and Kendall τ (the metrics' own numbers: test_metrics*)."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from helpers_cli import run_cli, valid_config, write_config

import esegeta
from esegeta.evaluation import ranking, scoring
from esegeta.evaluation.engine import configured
from esegeta.spec.request import from_arguments

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "samples" / "data" / "digits"


def _digits_config(tmp_path, evaluation, **kw):
    methods = [{"id": "captum.Saliency"}, {"id": "captum.IntegratedGradients", "params": {"n_steps": 8}},
               {"id": "captum.LayerGradCam", "layer": "layer2", "label": "gradcam"}]
    return valid_config(tmp_path, methods, inputs={"paths": [str(DIGITS)], "spatial_dims": 2},
                        output={"dir": str(tmp_path / "out"), "formats": ["npy"]}, evaluation=evaluation, **kw)


# -- the config block ----------------------------------------------------------------
@pytest.mark.parametrize("evaluation, path", [
    ({"metrics": ["deletion", "delet"]}, "evaluation.metrics[1].id"),
    ({"metrics": [{"id": "deletion", "params": {"step": 3}}]}, "evaluation.metrics[0].params.step"),
    ({"metrics": ["deletion", "deletion"]}, "evaluation.metrics[1].id"),
    ({"metrics": ["deletion"], "overrides": {"saliency": {"deletion": {"steps": 4}}}}, "evaluation.overrides.saliency"),
    ({"metrics": ["deletion"], "overrides": {"captum.Saliency": {"insertion": False}}},
     "evaluation.overrides.captum.Saliency.insertion"),
    ({"metrics": ["deletion"], "overrides": {"captum.Saliency": {"deletion": {"stepz": 4}}}},
     "evaluation.overrides.captum.Saliency.deletion.stepz"),
    ({"metrics": ["pointing_game"]}, "evaluation.metrics[0].id"),  # no mask and no wrapper
    ({"metrics": []}, "evaluation.metrics"),
    ({"metrics": ["deletion"], "max_batch": 0}, "evaluation.max_batch"),
    ({"metrics": ["pointing_game"], "masks": ["nowhere/*.npy"]}, "evaluation.masks[0]"),
    ({"metrics": ["pointing_game"], "masks": [str(DIGITS / "digit_1_label0.npy"), str(DIGITS / "digit_9_label7.npy")]},
     "evaluation.masks"),
    ({"metrics": ["deletion"], "roar": {"train": "nowhere.py:train", "data": "nowhere.py:data"}},
     "evaluation.roar.train"),
])
def test_config_block_errors_name_their_path(tmp_path, capsys, evaluation, path):
    cfg = write_config(tmp_path, _digits_config(tmp_path, evaluation))
    code, _, err = run_cli(["validate", cfg], capsys)
    assert code == 2
    assert path in err, err
    assert "Traceback" not in err


def test_metrics_command_lists_groups_papers_and_passes(capsys):
    code, out, _ = run_cli(["metrics", "--shape", "1", "8", "8"], capsys)
    assert code == 0
    assert "deletion" in out and "faithfulness" in out and "Petsiuk" in out
    line = next(x for x in out.splitlines() if x.startswith("deletion "))
    assert " 21 " in line  # steps=20: the unperturbed input and 20 steps
    code, out, _ = run_cli(["metrics", "--json"], capsys)
    rows = json.loads(out)
    assert {r["group"] for r in rows} >= {"faithfulness", "randomisation", "localisation", "robustness", "complexity"}
    assert all("forward_passes" in r and r["paper"] for r in rows)


# -- esegeta run / evaluate on a finished run ----------------------------------------
def test_evaluate_a_finished_run_recomputes_no_attribution(tmp_path, capsys):
    evaluation = {"metrics": ["deletion", {"id": "road", "params": {"percentages": [20, 50]}}, "sparseness"],
                  "overrides": {"gradcam": {"road": False}}, "enabled": False}
    cfg = write_config(tmp_path, _digits_config(tmp_path, evaluation))
    code, _, err = run_cli(["run", cfg], capsys)
    assert code == 0, err
    out = tmp_path / "out"
    assert not (out / "evaluation.csv").exists()  # enabled: false, so `run` did not evaluate
    saved = sorted(out.rglob("*.npy"))
    assert len(saved) == 12
    before = {p: p.stat().st_mtime_ns for p in saved}

    code, text, err = run_cli(["check", cfg], capsys)
    assert "evaluation: deletion (faithfulness): 21 forward pass(es) per input and method" in text

    assert "Kendall" not in (out / "report.html").read_text(encoding="utf-8")
    code, text, err = run_cli(["evaluate", cfg], capsys)
    assert code == 0, err
    assert "Kendall" in (out / "report.html").read_text(encoding="utf-8")  # the run's report gained the evaluation
    assert {p: p.stat().st_mtime_ns for p in sorted(out.rglob("*.npy"))} == before  # nothing recomputed
    assert "Ranking of the methods" in text and "Kendall" in text
    rows = list(csv_rows(out / "evaluation.csv"))
    assert len(rows) == 4 * (3 + 3 + 2)  # inputs x (deletion, sparseness for 3 methods; road for 2)
    assert {r["metric"] for r in rows} == {"deletion", "road", "sparseness"}
    assert all(r["value"] not in ("", "nan") for r in rows)
    ranked = list(csv_rows(out / "evaluation_ranking.csv"))
    assert [r["label"] for r in ranked] and set(ranked[0]) >= {"label", "method", "mean_rank", "rank:deletion"}
    assert (out / "evaluation_agreement.csv").is_file() and (out / "evaluation_ranking.md").is_file()
    curves = np.load(out / "evaluation_curves.npz")
    assert any(k.endswith("/deletion/score") for k in curves.files)
    manifest = json.loads((out / "manifest.json").read_text())
    section = manifest["evaluation"]
    assert len(section["values"]) == len(rows)
    assert {m["id"]: m["forward_passes_per_input"] for m in section["metrics"]}["deletion"] == 21
    assert section["files"]["values"] == "evaluation.csv"
    assert any("gradcam" in s and "road" in s for s in section["skipped"])


def csv_rows(path):
    import csv

    with open(path, newline="") as handle:
        yield from csv.DictReader(handle)


def test_evaluate_needs_a_block_and_a_finished_run(tmp_path, capsys):
    cfg = write_config(tmp_path, valid_config(tmp_path))
    code, _, err = run_cli(["evaluate", cfg], capsys)
    assert code == 2 and "evaluation: the config has no evaluation block" in err
    cfg = write_config(tmp_path, _digits_config(tmp_path, {"metrics": ["sparseness"]}), "with.json")
    code, _, err = run_cli(["evaluate", cfg], capsys)
    assert code == 2 and "manifest.json" in err and "esegeta run" in err


def test_run_evaluates_when_the_block_is_enabled_with_mask_files(tmp_path):
    mask = np.zeros((8, 8), dtype=np.float32)
    mask[2:6, 3:5] = 1
    np.save(tmp_path / "mask.npy", mask)
    cfg = _digits_config(tmp_path, {"metrics": ["sparseness", "complexity", "relevance_mass_accuracy"],
                                    "masks": [str(tmp_path / "mask.npy")]})
    cfg["inputs"]["paths"] = [str(DIGITS / "digit_1_label0.npy")]
    result = esegeta.Pipeline(cfg).run()
    assert result.exit_code == 0
    values = result.manifest["evaluation"]["values"]
    assert len(values) == 3 * 3
    saliency = np.abs(result.result("captum.Saliency")).sum(0)
    mass = next(r["value"] for r in values if r["label"] == "captum.Saliency" and r["metric"] == "relevance_mass_accuracy")
    assert mass == pytest.approx(saliency[mask > 0].sum() / saliency.sum(), rel=1e-5)  # the file's mask was used
    assert (result.output_dir / "evaluation_ranking.md").is_file()
    report = (result.output_dir / "report.html").read_text(encoding="utf-8")  # written before, then given the section
    section = report[report.index("<!--esegeta:evaluation-->"):report.index("<!--/esegeta:evaluation-->")]
    assert "Kendall" in section and "relevance_mass_accuracy" in section


# -- scoring a wrapped segmenter: masks frozen on the unperturbed input --------------
class _Identity(nn.Module):
    """A 'segmenter' whose one-channel output is its input: masks are visible in the scores."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return x * self.scale


def test_wrapped_scores_keep_the_masks_of_the_unperturbed_input():
    torch.manual_seed(0)
    x = torch.rand(1, 1, 8, 8)
    request = from_arguments("captum.Saliency", target=1, wrapper={"name": "threshold", "threshold": 0.5})
    forward = scoring.scorer(request, _Identity(), x)
    frozen = (x > 0.5).float()
    z = torch.cat([1 - x, torch.zeros_like(x), x])  # perturbed inputs: other pixels above the threshold
    scores = forward(z)
    expected = torch.stack([(z * (1 - frozen)).flatten(1).sum(1), (z * frozen).flatten(1).sum(1)], 1)
    torch.testing.assert_close(scores, expected)
    recomputed = (z[:1] * (z[:1] > 0.5)).sum()
    assert not torch.isclose(scores[0, 1], recomputed)  # masks recomputed on 1 - x would give this
    assert torch.equal(forward.target_mask(1), (x > 0.5))
    # the metrics see the same: deletion's first point is the unperturbed score of the frozen region
    result = esegeta.evaluate(_Identity(), x, {"captum.Saliency": x.clone()}, ["deletion"], target=1,
                              wrapper={"name": "threshold", "threshold": 0.5})
    curve = result.curves["captum.Saliency/input0/deletion/score"]
    assert curve[0] == pytest.approx(float((x * frozen).sum()), rel=1e-5)


def test_global_patch_scoring_equals_the_whole_input_on_a_pointwise_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(1, 3, 1), nn.Tanh(), nn.Conv3d(3, 2, 1)).eval()
    x = torch.randn(1, 1, 12, 12, 8)
    wrapper = {"name": "multiclass", "activation": "softmax"}
    whole = scoring.scorer(from_arguments("captum.Saliency", target=1, wrapper=wrapper), model, x)
    patched = scoring.scorer(from_arguments("captum.Saliency", target=1, wrapper=wrapper,
                                            patch={"size": [8, 8, 8], "overlap": [4, 4, 0], "mode": "global",
                                                   "batch_size": 2}), model, x)
    assert patched.stitched and not whole.stitched
    z = x + 0.3 * torch.randn(3, *x.shape[1:])
    torch.testing.assert_close(patched(z), whole(z), rtol=1e-4, atol=1e-4)


def test_reexplaining_a_wrapped_method_keeps_the_region_of_the_original_model(retina):
    x = retina.x[:, :, :32, :32]
    request = from_arguments("captum.Saliency", target=1, wrapper=retina.wrapper)
    forward = scoring.scorer(request, retina.model, x)
    explain = scoring.explainer(request, forward)
    same = explain(retina.model, x, torch.tensor([1]))
    torch.testing.assert_close(same, esegeta.explain(retina.model, x, "captum.Saliency", 1, wrapper=retina.wrapper))
    shifted = explain(retina.model, x + 0.2, torch.tensor([1]))  # masks of x, not of x + 0.2
    frozen = forward.score
    y = x + 0.2
    y.requires_grad_(True)
    frozen(retina.model(y))[0, 1].backward()
    torch.testing.assert_close(shifted, y.grad.abs(), rtol=1e-4, atol=1e-6)
    from esegeta.attribution import wrappers

    regrown = wrappers.build(retina.model, x + 0.2, retina.wrapper).score.masks
    assert not torch.equal(regrown, frozen.masks)  # masks of x + 0.2 differ: the test tells them apart


def test_layer_maps_are_interpolated_to_the_input():
    x = torch.zeros(2, 3, 16, 16)
    a = scoring.as_input_attribution(torch.ones(2, 1, 4, 4), x)
    assert a.shape == (2, 1, 16, 16) and torch.allclose(a, torch.ones_like(a))
    assert scoring.as_input_attribution(torch.ones(2, 5, 4, 4), x).shape == (2, 1, 16, 16)


# -- Python API, Quantus, ROAR ---------------------------------------------------------
def _digits_model_and_inputs():
    from esegeta.io.loading import load_model

    model = load_model({"factory": str(ROOT / "samples" / "models.py") + ":DigitResNet",
                        "weights": str(ROOT / "samples" / "checkpoints" / "digit_resnet.pt")}, None)
    x = torch.from_numpy(np.stack([np.load(p) for p in sorted(DIGITS.glob("*.npy"))])).float()
    return model, x


def _counting_digits():
    """The digits model, as a subclass recording the batch size of every forward (a class attribute:
    the engine's prepared copies record there too), and the digits inputs."""
    from samples.models import DigitResNet

    class CountingDigits(DigitResNet):
        batches: list[int] = []

        def forward(self, x):
            type(self).batches.append(x.shape[0])
            return super().forward(x)

    model, x = _digits_model_and_inputs()
    counting = CountingDigits()
    counting.load_state_dict(model.state_dict())
    return counting.eval(), x


def test_python_evaluate_on_tensors_and_labels_need_a_method_to_reexplain():
    model, x = _digits_model_and_inputs()
    attr = esegeta.explain(model, x, "captum.IntegratedGradients", "predicted", n_steps=8)
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(0))
    result = esegeta.evaluate(model, x, {"captum.IntegratedGradients": attr, "random": noise}, ["deletion"])
    assert result.value("captum.IntegratedGradients", "deletion") < result.value("random", "deletion")
    assert result.summary.order[0] == "captum.IntegratedGradients"
    n = x.shape[0]
    assert repr(result).startswith(f"Evaluation({2 * n} values: 2 method(s) × {n} input(s) × 1 metric(s)")
    assert len(repr(result)) < 200  # one line, not every curve
    with pytest.raises(esegeta.ConfigError, match="methods.random"):
        esegeta.evaluate(model, x, {"random": noise}, ["random_logit"])


def test_metrics_of_one_evaluation_share_the_unperturbed_pass():
    """Deletion and region perturbation evaluated together score each input's unperturbed input once
    (the predicted target's pass) and deletion's emptied input (the same for every input) once in all,
    whatever the number of maps; the values are those of each metric evaluated alone."""
    counting, x = _counting_digits()
    x = x[:2]
    maps = {"a": torch.rand(x.shape, generator=torch.Generator().manual_seed(1)),
            "b": torch.rand(x.shape, generator=torch.Generator().manual_seed(2))}
    deletion = {"id": "deletion", "params": {"steps": 4}}
    region = {"id": "region_perturbation", "params": {"patch_size": 2, "regions_evaluation": 4, "baseline": "value"}}
    esegeta.evaluate(counting, x, maps, ["sparseness"])  # the prepared copy, made once
    counts, results = [], []
    for metrics in ([deletion], [region], [deletion, region]):
        type(counting).batches = []
        results.append(esegeta.evaluate(counting, x, maps, metrics))
        counts.append(sum(type(counting).batches))
    perturbed = {"deletion": 2 * (4 - 1), "region_perturbation": 2 * 4}  # two maps' rows per step depending on a map
    unperturbed = 1  # once per input: the predicted target's pass is deletion's first step, region's reference
    emptied = 1  # deletion's last step, the all-zero image: the same for both inputs, scored once in all
    assert counts == [2 * (unperturbed + perturbed["deletion"]) + emptied, 2 * (unperturbed + perturbed["region_perturbation"]),
                      2 * (unperturbed + perturbed["deletion"] + perturbed["region_perturbation"]) + emptied]
    for label in maps:
        for metric_id, alone in (("deletion", results[0]), ("region_perturbation", results[1])):
            assert results[2].value(label, metric_id) == pytest.approx(alone.value(label, metric_id), rel=1e-5, abs=1e-6)


def test_metrics_score_all_inputs_of_a_method_in_one_call_each_input_drawing_its_own_numbers():
    """The engine stacks the inputs of a method into one metric call: their perturbations go through
    the model together (deletion's 3 x 4 perturbed inputs in one forward, not 4 per call) and random
    logit re-explains all of them at once. An input's value does not depend on the inputs beside
    it: each row draws its random numbers (subsets, noise, baselines, other classes) from its own seed."""
    counting, x = _counting_digits()
    batches = type(counting).batches
    x = x[:3]
    saliency = esegeta.explain(counting, x, "captum.Saliency", "predicted")
    batches.clear()
    esegeta.evaluate(counting, x, {"captum.Saliency": saliency}, [{"id": "deletion", "params": {"steps": 4}}])
    assert 3 * 3 in batches  # steps 1-3 of the three inputs (step 0 is the target's pass)
    batches.clear()
    esegeta.evaluate(counting, x, {"captum.Saliency": saliency}, ["random_logit"])
    assert 3 in batches  # the three re-explanations in one forward
    drawing = ["random_logit", {"id": "faithfulness_correlation", "params": {"nr_runs": 4, "subset_size": 8}},
               {"id": "region_perturbation", "params": {"patch_size": 2, "regions_evaluation": 3}},
               {"id": "road", "params": {"percentages": [30, 60]}}, {"id": "infidelity", "params": {"n_perturbations": 4}},
               {"id": "deletion", "params": {"steps": 4, "order": "random"}}]
    three = esegeta.evaluate(counting, x, {"captum.Saliency": saliency}, drawing)
    two = esegeta.evaluate(counting, x[:2], {"captum.Saliency": saliency[:2]}, drawing)
    for metric_id in ("random_logit", "faithfulness_correlation", "region_perturbation", "road", "infidelity", "deletion"):
        for i in range(2):
            assert two.value("captum.Saliency", metric_id, f"input{i}") == \
                pytest.approx(three.value("captum.Saliency", metric_id, f"input{i}"), rel=1e-6, abs=1e-7), metric_id


def test_quantus_scores_esegeta_methods_through_explain_func():
    from esegeta.evaluation.quantus import explain_func

    import quantus

    model, x = _digits_model_and_inputs()
    y = model(x).argmax(1).numpy()
    kwargs = {"method": "captum.IntegratedGradients", "n_steps": 8}
    through = quantus.Sparseness(disable_warnings=True, display_progressbar=False)(
        model=model, x_batch=x.numpy(), y_batch=y, a_batch=None, explain_func=explain_func,
        explain_func_kwargs=kwargs, device="cpu")
    a = torch.cat([esegeta.explain(model, x[i:i + 1], "captum.IntegratedGradients", int(y[i]), n_steps=8)
                   for i in range(len(y))]).numpy()
    given = quantus.Sparseness(disable_warnings=True, display_progressbar=False)(
        model=model, x_batch=x.numpy(), y_batch=y, a_batch=a, device="cpu")
    np.testing.assert_allclose(through, given, rtol=1e-5)
    gradcam = explain_func(model, x.numpy(), y, method="captum.LayerGradCam", layer="layer2")
    assert gradcam.shape == (4, 1, 8, 8)


def test_roar_tiny_run_with_the_digits_training_script():
    sys.path.insert(0, str(ROOT))
    from samples.train_digits import roar_data, roar_train
    from esegeta.evaluation.roar import remove, roar

    x = np.arange(8, dtype=np.float32).reshape(1, 2, 2, 2)
    removed = remove(x, np.array([[[[4.0, 3.0], [1.0, 2.0]]]]), 0.5)  # the two top pixels of each channel
    np.testing.assert_array_equal(removed, [[[[1.5, 1.5], [2, 3]], [[5.5, 5.5], [6, 7]]]])

    model, _ = _digits_model_and_inputs()
    x_train, x_test, y_train, y_test = roar_data()  # a tenth of the split keeps the test fast
    result = roar(roar_train, (x_train[:400], x_test[:100], y_train[:400], y_test[:100]),
                  {"saliency": "captum.Saliency"}, [0.5], model=model, options={"epochs": 15})
    assert result.baseline > 0.5  # the fresh model learns the unmodified digits
    assert {r["label"] for r in result.rows} == {"saliency", "random"}
    assert all(0.0 <= r["score"] <= 1.0 for r in result.rows)
    assert result.csv().splitlines()[0] == "label,method,fraction,score"


# -- ranking and Kendall τ ---------------------------------------------------------------
def test_ranking_and_kendall_tau_on_known_numbers():
    values = {"a": (1.0, 0.1, 5.0), "b": (2.0, 0.3, 5.0), "c": (3.0, 0.2, math.nan)}
    rows = [{"label": k, "method": f"m.{k}", "input": "i", "metric": metric, "value": v[j]}
            for k, v in values.items() for j, metric in enumerate(("x", "y", "z"))]
    summary = ranking.Summary(rows, {"x": True, "y": False, "z": True})
    assert summary.ranks["x"] == {"a": 3.0, "b": 2.0, "c": 1.0}
    assert summary.ranks["y"] == {"a": 1.0, "b": 3.0, "c": 2.0}
    assert summary.ranks["z"] == {"a": 1.5, "b": 1.5}  # ties share their average rank; NaN gets none
    assert summary.mean_rank == pytest.approx({"a": (3 + 1 + 1.5) / 3, "b": (2 + 3 + 1.5) / 3, "c": 1.5})
    assert summary.order == ["c", "a", "b"]
    # x orders c > b > a; y (lower better) a > c > b: one concordant pair of three
    assert summary.tau["x"]["y"] == pytest.approx(-1 / 3)
    assert summary.tau["x"]["x"] == pytest.approx(1.0)
    assert math.isnan(summary.tau["x"]["z"])  # z is constant over the methods both score
    table = summary.markdown()
    assert "| 1 | c | 1.50 |" in table and "Kendall" in table
    assert summary.ranking_csv().splitlines()[0] == "label,method,mean_rank,x,rank:x,y,rank:y,z,rank:z"


def test_configured_metrics_keep_their_parameters():
    from esegeta.spec.evaluation import EvaluationConfig

    block = EvaluationConfig.model_validate({"metrics": ["deletion", {"id": "insertion", "params": {"steps": 5}}],
                                             "overrides": {"x": {"insertion": {"steps": 2}, "deletion": False}}})
    deletion, insertion = configured(block)
    assert insertion.for_method("y", block.overrides)["steps"] == 5
    assert insertion.for_method("x", block.overrides)["steps"] == 2
    assert deletion.for_method("x", block.overrides) is None


def test_wrapped_scoring_stays_on_the_data_device(retina):
    """On torch's meta device a tensor made on the CPU would raise, as one on CUDA would."""
    from esegeta.evaluation.base import Context, metric

    model, x = retina_case_on_meta(retina)
    request = from_arguments("captum.Saliency", target=1, wrapper=retina.wrapper)
    forward = scoring.scorer(request, model, x)
    target = scoring.target_of(request, forward, x)
    ctx = Context(forward=forward, mask=forward.target_mask(1), max_batch=4)
    attribution = torch.rand(1, 1, *x.shape[2:], device="meta")
    for metric_id in ("deletion", "pointing_game"):
        assert metric(metric_id)(ctx, x, attribution, target).values.device.type == "meta"


def retina_case_on_meta(retina):
    import copy

    return copy.deepcopy(retina.model).to("meta"), retina.x[:, :, :32, :32].to("meta")


def test_roar_block_of_a_run_writes_its_table(tmp_path):
    script = ROOT / "samples" / "train_digits.py"
    evaluation = {"metrics": ["sparseness"], "roar": {"train": f"{script}:roar_train", "data": f"{script}:roar_data",
                                                      "fractions": [0.5], "max_images": 200, "options": {"epochs": 1},
                                                      "methods": ["captum.Saliency"]}}
    cfg = _digits_config(tmp_path, evaluation)
    cfg["inputs"]["paths"] = [str(DIGITS / "digit_1_label0.npy")]
    result = esegeta.Pipeline(cfg).run()
    roar = result.manifest["evaluation"]["roar"]
    assert [(r["label"], r["fraction"]) for r in roar["rows"]] == [("captum.Saliency", 0.5), ("random", 0.5)]
    assert (result.output_dir / "evaluation_roar.csv").read_text().startswith("label,method,fraction,score")
