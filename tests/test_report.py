"""report.html: written by every run, self-contained, rebuilt and completed with an evaluation from the
folder, and rendered in a real headless Chromium (Debian's package, driven by Playwright) with no
console error, no network request and no blank panel. The manifest records each result's resolved
target."""
import base64
import csv
import io
import json
import os
import platform
import re
import shutil

import numpy as np
import pytest
import torch

import helpers_browser
from esegeta.show import report, viewer
from esegeta.run.runner import Pipeline
from helpers_cli import DIGITS, REPO, run_cli, valid_config

SAMPLES = REPO / "samples"
RETINA = {
    "model": {"factory": f"{SAMPLES / 'models.py'}:VesselUNet2D", "weights": str(SAMPLES / "checkpoints" /
                                                                              "vessel_unet2d.pt")},
    "inputs": {"paths": [str(SAMPLES / "data" / "retina_crop.png")], "spatial_dims": 2},
    "wrapper": {"name": "threshold", "channel": 0, "threshold": 0.5, "activation": "sigmoid"},
    "target": 1,
    "runtime": {"devices": "cpu", "seed": 0},
    "methods": [
        {"id": "captum.Saliency", "params": {"abs": False}},
        {"id": "captum.LayerGradCam", "layer": "enc2", "label": "gradcam-enc2"},
        # stopped by its time limit: the report shows a status that is not ok, with its message
        {"id": "captum.IntegratedGradients", "params": {"n_steps": 3000, "internal_batch_size": 4},
         "timeout_s": 0.5, "label": "ig-too-slow"},
    ],
}


@pytest.fixture(scope="module")
def retina_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("retina")
    cfg = {**RETINA, "output": {"dir": str(out), "formats": ["npy", "png"]}}
    return Pipeline(cfg).run()


@pytest.fixture(scope="module")
def evaluated(retina_run, tmp_path_factory):
    """A copy of the run with the files an evaluation writes (as ``esegeta evaluate`` names them)."""
    folder = tmp_path_factory.mktemp("evaluated") / "run"
    shutil.copytree(retina_run.output_dir, folder)
    with open(folder / report.EVALUATION_FILES["ranking"], "w", newline="") as handle:
        csv.writer(handle).writerows([["label", "method", "mean_rank", "deletion", "rank:deletion"],
                                      ["captum.Saliency", "captum.Saliency", 1.0, 0.12, 1],
                                      ["gradcam-enc2", "captum.LayerGradCam", 2.0, 0.34, 2]])
    with open(folder / report.EVALUATION_FILES["agreement"], "w", newline="") as handle:
        csv.writer(handle).writerows([["metric", "deletion"], ["deletion", 1.0]])
    np.savez(folder / report.EVALUATION_FILES["curves"],
             **{f"{label}/retina_crop/deletion/score": np.linspace(1, 0, 11) ** k
                for k, label in ((1, "captum.Saliency"), (2, "gradcam-enc2"))})
    assert report.update_evaluation(folder) == folder / "report.html"
    return folder


def _html(folder):
    return (folder / "report.html").read_text(encoding="utf-8")


def test_every_run_writes_a_self_contained_report(retina_run):
    html = _html(retina_run.output_dir)
    assert retina_run.manifest["report"] == "report.html"
    for label in ("captum.Saliency", "gradcam-enc2", "ig-too-slow", "retina_crop"):
        assert label in html
    assert "timeout" in html and "status-timeout" in html
    # no resource outside the file: every image is inline, no external script, style or link
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//|file:)""", html)
    assert "<link" not in html and html.count("data:image/png;base64,") >= 3  # input + two maps
    for fact in ("score", "target", "precision", "seconds", "fp32", "raw units", "frozen mask"):
        assert fact in html
    assert "torch" in html and "&quot;wrapper&quot;" in html  # versions and the resolved config (escaped)


def test_manifest_records_resolved_target_and_prediction(retina_run, tmp_path):
    ok = [r for r in retina_run.runs if r["status"] == "ok"]
    assert ok and all(r["target"] == 1 and r["predicted"] in (0, 1) for r in ok)
    # a classifier with target "predicted": the class it resolved to, one per input
    cfg = valid_config(tmp_path, inputs={"paths": [str(DIGITS)], "spatial_dims": 2},
                       output={"dir": str(tmp_path / "digits"), "formats": ["npy"]})
    result = Pipeline(cfg).run()
    from esegeta.io.loading import load_inputs
    from samples.models import DigitResNet

    model = DigitResNet()
    model.load_state_dict(torch.load(SAMPLES / "checkpoints" / "digit_resnet.pt", weights_only=True))
    model.eval()
    for item in load_inputs(cfg["inputs"], None):
        record = next(r for r in result.runs if r["input"] == item.name)
        with torch.no_grad():
            expected = int(model(item.tensor).argmax())
        assert record["target"] == expected == record["predicted"]
        assert f"label{expected}" in item.name  # the sample's true class, which the model gets right
    saved = json.loads((tmp_path / "digits" / "manifest.json").read_text())
    assert [r["target"] for r in saved["runs"]] == [r["target"] for r in result.runs]
    html = _html(tmp_path / "digits")
    for item in load_inputs(cfg["inputs"], None):  # each input's true label, next to the prediction
        assert re.search(rf"<h2>{item.name}</h2>.*?true label {report.label_of(item.name)}</p>", html)


def test_report_is_fit_for_sharing(retina_run):
    """No link into nothing, no absolute input path, Python's version, and what "score" means."""
    html = _html(retina_run.output_dir)
    assert "href='#evaluation'" in html and "id='evaluation'" in html and "esegeta evaluate CONFIG" in html
    where = str(SAMPLES / "data" / "retina_crop.png")
    assert f"<code>{where}</code>" not in html and "retina_crop.png</code>" in html
    assert f"<td>python</td><td>{platform.python_version()}</td>" in html
    assert "<b>score</b>: the value each method explains" in html and "wrapped score" in html


def test_evaluation_slots_in(evaluated):
    html = _html(evaluated)
    assert "id='evaluation'" in html and "Ranking" in html and "Kendall" in html
    assert "0.34" in html and "deletion: score" in html  # the table and the curves' chart
    before = html
    assert report.update_evaluation(evaluated) is not None
    assert _html(evaluated).count("id='evaluation'") == 1 and len(_html(evaluated)) == len(before)


def test_report_rebuilt_from_the_folder(retina_run, tmp_path, capsys):
    folder = tmp_path / "run"
    shutil.copytree(retina_run.output_dir, folder)
    (folder / "report.html").unlink()
    code, _, err = run_cli(["report", folder], capsys)
    assert code == 0 and "report.html" in err
    html = _html(folder)
    assert "gradcam-enc2" in html and html.count("data-panel=\"map\"") == 2
    code, _, err = run_cli(["report", tmp_path / "nothing-here"], capsys)
    assert code == 2 and "RUN_DIR" in err and "manifest.json" in err


@pytest.mark.skipif(helpers_browser.missing() is not None, reason=str(helpers_browser.missing()))
def test_report_in_chromium(evaluated, tmp_path):
    shot = tmp_path / "report.png"
    seen = helpers_browser.render(evaluated / "report.html", screenshot=shot,
                                  wait_for="() => window.Bokeh && Bokeh.documents.length > 0")
    assert seen["console_errors"] == []
    assert seen["requests"] == []
    panels = dict((name, []) for name, _ in seen["panels"])
    for name, spread in seen["panels"]:
        panels[name].append(spread)
    assert len(panels["input"]) == 1 and len(panels["map"]) == 2 and len(panels["curves"]) == 1
    assert min(s for spreads in panels.values() for s in spreads) > 5  # none blank
    assert shot.stat().st_size > 20_000
    if os.environ.get("ESEGETA_KEEP_SCREENSHOTS"):  # to look at it: copied to that folder
        shutil.copy(shot, os.environ["ESEGETA_KEEP_SCREENSHOTS"])


# -- the 3D viewer ------------------------------------------------------------------------
ANATOMICAL = {
    "model": {"factory": f"{SAMPLES / 'models.py'}:TissueUNet3D", "weights": str(SAMPLES / "checkpoints" /
                                                                               "tissue_unet3d.pt")},
    "inputs": {"paths": [str(SAMPLES / "data" / "anatomical.nii.gz")], "spatial_dims": 3, "normalize": "zscore"},
    "wrapper": {"name": "multiclass", "activation": "softmax"},
    "target": 2,
    "runtime": {"devices": "cpu", "seed": 0},
    "methods": [{"id": "captum.InputXGradient"}, {"id": "captum.LayerGradCam", "layer": "enc2", "label": "gradcam-enc2"}],
}


@pytest.fixture(scope="module")
def volume_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("anatomical")
    return Pipeline({**ANATOMICAL, "output": {"dir": str(out), "formats": ["npy"]}}).run()


def test_viewer_volumes_keep_raw_units_affine_and_size():
    """uint8 levels with the scale in the NIfTI header read back as the map's values (zero exact for a
    signed map), block-averaged volumes keep the world extent, and 20 overlays of 128³ stay in the bound."""
    import gzip

    import nibabel as nib

    rng = np.random.default_rng(0)
    signed = rng.normal(size=(1, 128, 128, 128)).astype(np.float32)
    signed[0, :2] = 0.0
    affine = np.diag([0.5, 0.8, 2.5, 1.0])
    affine[:3, 3] = [-10, 5, 7]
    o = viewer.overlay("m", signed, affine, signed.shape[1:], clip=None)
    image = nib.Nifti1Image.from_bytes(gzip.decompress(base64.b64decode(o.data)))
    assert image.get_data_dtype() == np.uint8 and image.shape == (64, 64, 64) and o.factor == 2 and o.signed
    values = image.get_fdata()
    assert values[0, 0, 0] == 0.0  # zero stays zero
    coarse = signed[0].reshape(64, 2, 64, 2, 64, 2).mean(axis=(1, 3, 5))
    assert np.abs(values - coarse).max() <= o.step / 2 + 1e-6

    def corner(a, shape):  # world positions of the volume's two outer corners
        return a @ np.array([-0.5, -0.5, -0.5, 1.0]), a @ np.array([*(s - 0.5 for s in shape), 1.0])

    np.testing.assert_allclose(corner(image.affine, (64,) * 3), corner(affine, (128,) * 3))  # same extent
    positive = viewer.overlay("p", np.abs(signed), affine, signed.shape[1:])
    assert not positive.signed and positive.entry()["cal_min"] > 0
    assert 20 * len(o.data) / 1e6 < viewer.SIZE_BOUND_MB  # noisy maps compress worst


def test_volume_report_embeds_the_viewer(volume_run):
    html = _html(volume_run.output_dir)
    assert "img class='volume'" in html  # the 3D input's views at their drawn size
    if viewer.missing():
        assert "No 3D viewer" in html and "make viewer" in html
        pytest.skip(viewer.missing())
    found = viewer.script()
    assert html.count("data-viewer=") == 1 and f"NiiVue {found.version}" in html and found.licence in html
    assert "captum.InputXGradient</option>" in html and "gradcam-enc2</option>" in html
    assert "<script src" not in html and not re.search(r"""(src|href)\s*=\s*["']?(https?:|//|file:)""", html)


def test_viewer_in_chromium(volume_run, tmp_path):
    """The viewer draws the volume with an overlay, and the method switcher changes it."""
    if helpers_browser.missing() or viewer.missing():
        pytest.skip(helpers_browser.missing() or viewer.missing())
    from PIL import Image

    def pixels(png):
        return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32)

    def interact(page):
        canvas = page.query_selector(".viewer canvas")
        canvas.scroll_into_view_if_needed()
        shots = {}
        for value, name in (("0", "first"), ("1", "second"), ("-1", "none")):
            page.select_option(".viewer select.method", value)
            page.wait_for_function(f"() => document.querySelector('.viewer').dataset.shown === "
                                   f"{json.dumps(['captum.InputXGradient', 'gradcam-enc2', ''][int(value) % 3])}")
            page.wait_for_timeout(300)
            shots[name] = pixels(canvas.screenshot())
        shots["figure_px"] = page.eval_on_selector("img.volume", "e => e.getBoundingClientRect().width")
        return shots

    shot = tmp_path / "viewer.png"
    seen = helpers_browser.render(volume_run.output_dir / "report.html", screenshot=shot, interact=interact,
                                  wait_for="() => document.querySelector('.viewer').dataset.ready === '1'")
    assert seen["console_errors"] == [] and seen["requests"] == []
    shots = seen["interaction"]
    assert shots["none"].std() > 5  # the input is drawn
    assert np.abs(shots["first"] - shots["none"]).mean() > 3  # the overlay shows
    assert np.abs(shots["first"] - shots["second"]).mean() > 3  # the switcher changes it
    assert shots["figure_px"] >= 700  # the 3D input figure at its drawn 720 px (was shrunk to 420: titles ~5 px)
    if os.environ.get("ESEGETA_KEEP_SCREENSHOTS"):
        shutil.copy(shot, os.environ["ESEGETA_KEEP_SCREENSHOTS"])
