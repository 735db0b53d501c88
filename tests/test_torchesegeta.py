"""`esegeta convert-torchesegeta`: TorchEsegeta configs (written here in the ancestor's shape) become
esegeta configs that validate and run on the samples; nothing that does not map is dropped silently."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from esegeta.cli import torchesegeta as te
from esegeta.spec.registry import all_methods
from helpers_cli import REPO, run_cli

SAMPLES = REPO / "samples"
DIGITS = SAMPLES / "data" / "digits"


def entry(name: str, use: bool = True, **keywords) -> dict:
    """One ancestor method entry, with the keys its configs carry on every entry."""
    return {"method_name": name, "library": name.split("_")[0], "inpt_transform_req": False,
            "visualize_method": "heat_map", "sign": "all", "show_colorbar": True, "title": f"{name} title",
            "device_id": "cuda:6", "share_gpu": True, "patch_required": False, "use": use,
            "uncertainity_metrics": False, "uncertainity_cascading": 0, "keywords": {"affine_size": 4, **keywords}}


def ancestor(nature: str, is_3d: bool, methods: list[dict], explain: list[dict] | None = None, **top) -> dict:
    cfg = {"model_nature": nature, "model_name": "net", "is_3d": is_3d, "isDepthFirst": True,
           "batch_dim_present": False, "default": False, "dataset": "samples", "test_run": "t", "resize": 120,
           "centre_crop": 120, "mean_vec": [0.5], "std_vec": [0.2], "patch_overlap": 0, "patch_size": -1,
           "log_level": "INFO", "output_path": "results", "amp_enbled": False, "share_gpu_threads": 1,
           "timeout_enabled": True, "timeout_time": 600, "methods": methods,
           "explain_methods": explain if explain is not None else []}
    cfg.update(top)
    return cfg


def convert_and_run(tmp_path: Path, capsys, cfg: dict, *args: str) -> tuple[dict, dict, str]:
    """Write ``cfg``, convert it (must validate), run the result; (new config, manifest, convert's stderr)."""
    source = tmp_path / "torchesegeta.json"
    source.write_text(json.dumps(cfg))
    new = tmp_path / "esegeta.json"
    code, out, err = run_cli(["convert-torchesegeta", source, "-o", new, "--output-dir", tmp_path / "out", *args], capsys)
    assert code == 0, err
    assert "valid" in out
    converted = json.loads(new.read_text())
    code, _, run_err = run_cli(["run", new, "--device", "cpu"], capsys)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert code == 0, run_err + json.dumps([r for r in manifest["runs"] if r["status"] != "ok"])[:2000]
    return converted, manifest, err


def check_accounted(cfg: dict, converted: dict, err: str, unmappable: set[str]) -> None:
    """Every ancestor entry is an esegeta entry or an unmapped entry with its reason, on stderr too;
    every enabled esegeta entry ran ok (the caller checks the manifest)."""
    names = [e["method_name"] for e in cfg["methods"] + cfg["explain_methods"]]
    mapped = {m["_comment"]["torchesegeta"] for m in converted["methods"]}
    unmapped = {u["value"]["method_name"] for u in converted["_comment"].get("unmapped_entries", [])}
    assert unmapped == unmappable
    assert mapped | unmapped == set(names) and not mapped & unmapped
    for name in unmappable:
        assert name in err
    for m in converted["methods"]:
        if m["_comment"]["torchesegeta"] != "lime_segmentation":  # the explain_methods entry has no figure keys
            assert "show_colorbar" in m["_comment"]["not_mapped"]  # kept, with the reason
    for key in ("default", "log_level", "batch_dim_present"):
        assert key in converted["_comment"]["not_mapped"] and key in err


def enabled_labels(converted: dict) -> set[str]:
    return {m["label"] for m in converted["methods"] if m["enabled"]}


def ran_ok(manifest: dict) -> set[str]:
    assert all(r["status"] == "ok" for r in manifest["runs"]), [r for r in manifest["runs"] if r["status"] != "ok"]
    return {r["label"] for r in manifest["runs"]}


def test_2d_classification_runs_on_the_digits(tmp_path, capsys):
    cfg = ancestor("Classification", False, [
        entry("captum_Saliency", abs=False, nt_type="smoothgrad", n_samples=2),
        entry("cnn_vis_vanilla_backprop", firstLayer="stem[0]"),
        entry("cnn_vis_grad_times_image", firstLayer="stem[0]"),
        entry("cnn_vis_guided_grad_cam", layer="layer2", firstLayer="stem[0]"),
        entry("cnn_vis_score_cam", layer="layer2"),
        entry("cnn_vis_layer_activation_guided_backprop", layer="layer2", filter_pos=3, firstLayer="stem[0]"),
        entry("torchray_Gradcam", layer="layer2"),
        entry("captum_occlusion", use=False, sliding_window_shapes="1,2,2", strides=1, nt_type="", n_samples=2),
        entry("lucent_render_vis", use=False, layer="layer2:3"),
        entry("cnn_vis_inverted_representation", use=True, layer="layer2"),
    ], [{"method_name": "lime_segmentation", "library": "lime", "inpt_transform_req": False, "device_id": "cuda:0",
         "use": True, "keywords": {"top_labels": 3, "num_samples": 20, "num_features": 4}}])
    converted, manifest, err = convert_and_run(
        tmp_path, capsys, cfg, "--model-factory", f"{SAMPLES / 'models.py'}:DigitResNet",
        "--weights", SAMPLES / "checkpoints" / "digit_resnet.pt", "--inputs", DIGITS / "digit_1_label0.npy")
    check_accounted(cfg, converted, err, {"cnn_vis_inverted_representation"})
    assert "wrapper" not in converted and converted["target"] == "predicted"
    by_label = {m["label"]: m for m in converted["methods"]}
    assert by_label["cnn_vis_vanilla_backprop"]["id"] == "captum.Saliency"
    assert by_label["cnn_vis_vanilla_backprop"]["params"] == {"abs": False}
    assert "signed" in by_label["cnn_vis_vanilla_backprop"]["_comment"]["mapped_as"]  # why this equivalent
    assert by_label["cnn_vis_score_cam"]["id"] == "gradcam.ScoreCAM"
    assert by_label["cnn_vis_layer_activation_guided_backprop"]["params"] == {"channel": 3}
    assert by_label["captum_Saliency-noise_tunnel"]["noise_tunnel"] == {"nt_type": "smoothgrad", "nt_samples": 2}
    assert by_label["captum_occlusion"] == {**by_label["captum_occlusion"], "enabled": False, "params": {
        "sliding_window_shapes": [1, 2, 2], "strides": [1, 1, 1]}}
    assert by_label["lucent_render_vis"]["layer"] == "layer2"
    assert by_label["lucent_render_vis"]["params"] == {"objective": "channel", "n_channel": 3}
    assert by_label["lime_segmentation"]["params"] == {"num_samples": 20, "num_features": 4}
    assert converted["runtime"] == {"devices": "auto", "threads_per_device": 1, "amp": False, "timeout_s": 600}
    assert ran_ok(manifest) == enabled_labels(converted) == {
        "captum_Saliency", "captum_Saliency-noise_tunnel", "cnn_vis_vanilla_backprop", "cnn_vis_grad_times_image",
        "cnn_vis_guided_grad_cam", "cnn_vis_score_cam", "cnn_vis_layer_activation_guided_backprop", "torchray_Gradcam",
        "lime_segmentation"}


def test_2d_segmentation_runs_on_the_retina_unet(tmp_path, capsys):
    cfg = ancestor("Segmentation", False, [
        entry("captum_Saliency", abs=True, nt_type="", n_samples=5),
        entry("captum_input_x_gradient"),
        entry("cnn_vis_grad_cam", layer="enc2"),
        entry("torchray_Gradient"),
        entry("captum_layer_conductance", use=False, layer="enc2", device_ids=[6, 5]),
        entry("captum_NeuronMagic", use=False),
    ], [{"method_name": "lime_segmentation", "library": "lime", "inpt_transform_req": False, "device_id": "cuda:0",
         "use": True, "keywords": {"top_labels": 2, "num_samples": 16, "num_features": 5}}])
    converted, manifest, err = convert_and_run(
        tmp_path, capsys, cfg, "--model-factory", f"{SAMPLES / 'models.py'}:VesselUNet2D",
        "--weights", SAMPLES / "checkpoints" / "vessel_unet2d.pt", "--inputs", SAMPLES / "data" / "retina_crop.png")
    check_accounted(cfg, converted, err, {"captum_NeuronMagic"})
    # The ancestor's default segmentation wrapper (threshold_based: Otsu, [background, foreground]).
    assert converted["wrapper"] == {"name": "threshold", "threshold": "otsu"} and converted["target"] == 1
    assert "keywords.device_ids" in converted["methods"][4]["_comment"]["not_mapped"]
    assert ran_ok(manifest) == enabled_labels(converted) == {
        "captum_Saliency", "captum_input_x_gradient", "cnn_vis_grad_cam", "torchray_Gradient", "lime_segmentation"}


def test_3d_segmentation_runs_on_the_tissue_unet_with_patches(tmp_path, capsys):
    cfg = ancestor("Segmentation", True, [
        {**entry("captum_Saliency", abs=True, nt_type="smoothgrad", n_samples=4), "patch_required": True},
        entry("captum_input_x_gradient"),
        entry("captum_LayerGradCam", layer="enc2"),
        entry("cnn_vis_score_cam", layer="enc2"),
        entry("captum_Integrated_Gradients", use=False, nt_type="smoothgrad", n_samples=2),
        entry("lucent_render_vis", use=False, layer="enc2:0"),
    ], patch_size=16, patch_overlap=4)
    converted, manifest, err = convert_and_run(
        tmp_path, capsys, cfg, "--model-factory", f"{SAMPLES / 'models.py'}:TissueUNet3D",
        "--weights", SAMPLES / "checkpoints" / "tissue_unet3d.pt", "--inputs", SAMPLES / "data" / "anatomical.nii.gz",
        "--normalize", "zscore", "--wrapper", "multi_class", "--target", "2")
    # Score-CAM and lucent have no 3D implementation here: reported, with the reason.
    check_accounted(cfg, converted, err, {"cnn_vis_score_cam", "lucent_render_vis"})
    assert "2D inputs only" in err
    assert converted["wrapper"] == {"name": "multiclass"} and converted["target"] == 2
    assert converted["inputs"]["spatial_dims"] == 3 and converted["inputs"]["normalize"] == "zscore"
    saliency = converted["methods"][0]
    assert saliency["patch"] == {"size": [16, 16, 16], "overlap": [4, 4, 4], "mode": "local", "blend": "average"}
    assert "noise_tunnel" not in saliency and "keywords.nt_type" in saliency["_comment"]["not_mapped"]
    assert ran_ok(manifest) == enabled_labels(converted) == {"captum_Saliency", "captum_input_x_gradient",
                                                             "captum_LayerGradCam"}


TINY_3D = '''
import torch
from torch import nn


class Tiny3D(nn.Module):
    """A small 3D classifier (random weights, seeded): 3 classes."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU())
        self.layer1 = nn.Sequential(nn.Conv3d(4, 8, 3, stride=2, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(8, 3))

    def forward(self, x):
        return self.fc(self.pool(self.layer1(self.stem(x))))
'''


def test_3d_classification_runs_on_a_small_3d_classifier(tmp_path, capsys):
    (tmp_path / "tiny3d.py").write_text(TINY_3D)
    cfg = ancestor("Classification", True, [
        entry("captum_Saliency", abs=False, nt_type="smoothgrad", n_samples=2),
        entry("cnn_vis_guided_backprop", firstLayer="stem[0]"),
        entry("captum_LayerGradCam", layer="layer1[0]"),
        entry("torchray_excitation_backprop", layer="layer1[1]"),
        entry("captum_layer_activaltion", layer="stem", neuron_start=0, neuron_end=2),
        entry("captum_deep_lift", use=False, nt_type="smoothgrad", n_samples=2),
        entry("cnn_vis_DeepDream", use=False, layer="layer1", filter_pos=0, shape=[1, 1, 8, 8, 8]),
        entry("captum_Saliency", use=False, abs=True, nt_type=""),
    ], isDepthFirst=False)
    converted, manifest, err = convert_and_run(
        tmp_path, capsys, cfg, "--model-factory", f"{tmp_path / 'tiny3d.py'}:Tiny3D",
        "--inputs", SAMPLES / "data" / "anatomical.nii.gz", "--normalize", "zscore")
    check_accounted(cfg, converted, err, {"cnn_vis_DeepDream"})
    assert converted["inputs"]["depth_axis"] == "last"
    labels = [m["label"] for m in converted["methods"]]
    assert labels.count("captum_Saliency") == 1 and "captum_Saliency-2" in labels  # labels stay unique
    by_label = {m["label"]: m for m in converted["methods"]}
    assert by_label["captum_LayerGradCam"]["layer"] == "layer1.0"
    assert ran_ok(manifest) == enabled_labels(converted) == {
        "captum_Saliency", "cnn_vis_guided_backprop", "captum_LayerGradCam", "torchray_excitation_backprop",
        "captum_layer_activaltion"}


# -- the tables and the details -------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(te.METHODS))
def test_every_ancestor_method_maps_to_a_registered_method_and_its_parameters(name):
    mapping = te.METHODS[name]
    spec = all_methods()[mapping.id]
    accepted = set(spec.adapter.parameters(spec))
    assert set(mapping.keywords.values()) | set(mapping.fixed) <= accepted
    assert bool(mapping.layer) == spec.needs_layer
    if mapping.noise_tunnel:
        assert spec.noise_tunnel_parameters() is not None


def test_duplicate_comment_keys_are_all_kept(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"_comment": "a", "x": 1, "_comment": ["b", "c"], "x": 2, "methods": []}')
    assert te.read(path) == {"_comment": ["a", "b", "c"], "x": 2, "methods": []}


def test_layer_names_and_layer_map(tmp_path):
    assert te.module_name("net[0].net.layer3") == "net.0.net.layer3"
    assert te.module_name("Conv5.conv[0]", {"Conv5.conv[0]": "enc2[3]"}) == "enc2.3"
    cfg = ancestor("Classification", False, [entry("captum_LayerGradCam", layer="net[0].net.layer3"),
                                             entry("captum_guided_grad_cam", layer="Conv5")])
    args = te.Arguments(inputs=[str(DIGITS)], model_factory=f"{SAMPLES / 'models.py'}:DigitResNet",
                        layer_map={"Conv5": "layer2"}, config_dir=tmp_path)
    result = te.convert(cfg, args)
    gradcam, guided = result.config["methods"]
    # A layer the model lacks: the entry is disabled, with the reason, rather than failing validation.
    assert gradcam["layer"] == "net.0.net.layer3" and gradcam["enabled"] is False
    assert "no layer 'net.0.net.layer3'" in gradcam["_comment"]["not_mapped"]["enabled"]["why"]
    assert guided["layer"] == "layer2" and guided["enabled"] is True
    assert any("net.0.net.layer3" in str(n) for n in result.notes)


def test_transform_keep_devices_and_timeout(tmp_path):
    cfg = ancestor("Classification", False, [{**entry("captum_Saliency"), "inpt_transform_req": True}],
                   timeout_enabled=False, centre_crop=8, resize=8, mean_vec=[0.1], std_vec=[0.3])
    args = te.Arguments(inputs=[str(DIGITS)], model_factory=f"{SAMPLES / 'models.py'}:DigitResNet", keep_devices=True,
                        config_dir=tmp_path)
    config = te.convert(cfg, args, check_layers=False).config
    assert config["inputs"]["resize"] == [8, 8] and config["inputs"]["normalize"] == {"mean": [0.1], "std": [0.3]}
    assert config["methods"][0]["device"] == "cuda:6"
    assert "timeout_s" not in config["runtime"] and "timeout_time" in config["_comment"]["not_mapped"]
    assert config["output"]["dir"] == "results/net_samples_t"
    # 3D: the ancestor's transform is torchvision's 2D image transform; not applied, reported.
    config = te.convert({**cfg, "is_3d": True}, args, check_layers=False).config
    assert "resize" not in config["inputs"] and "normalize" not in config["inputs"]
    assert "3D" in config["_comment"]["not_mapped"]["mean_vec"]["why"]


def test_missing_model_or_no_mappable_entry_is_a_clear_error(tmp_path, capsys):
    source = tmp_path / "t.json"
    source.write_text(json.dumps(ancestor("Classification", False, [entry("captum_Saliency")])))
    code, _, err = run_cli(["convert-torchesegeta", source, "-o", tmp_path / "n.json", "--inputs", DIGITS], capsys)
    assert code == 2 and "--model-factory" in err
    source.write_text(json.dumps(ancestor("Classification", False, [entry("nothing_known")])))
    code, _, err = run_cli(["convert-torchesegeta", source, "-o", tmp_path / "n.json", "--inputs", DIGITS,
                            "--model-factory", f"{SAMPLES / 'models.py'}:DigitResNet"], capsys)
    assert code == 2 and "no entry" in err and "nothing_known" in err


def test_the_documented_table_names_every_row():
    page = (REPO / "docs" / "torchesegeta.md").read_text()
    for key in [*te.METHODS, *te.KEYWORDS_DROPPED, *te.ENTRY_DROPPED, *te.TOP_LEVEL_DROPPED, *te.TOP_LEVEL_READ,
                *te.WRAPPERS]:
        assert f"`{key}`" in page, key


def test_a_written_config_that_does_not_validate_exits_2_and_says_so(tmp_path, capsys):
    source, new = tmp_path / "t.json", tmp_path / "n.json"
    source.write_text(json.dumps(ancestor("Classification", False, [entry("captum_Saliency")])))
    # --keep-devices keeps the ancestor's cuda:6, which this machine (or any without 7 GPUs) lacks.
    code, _, err = run_cli(["convert-torchesegeta", source, "-o", new, "--inputs", DIGITS, "--keep-devices",
                            "--model-factory", f"{SAMPLES / 'models.py'}:DigitResNet"], capsys)
    assert code == 2 and "methods[0].device" in err and "does not validate" in err
    assert json.loads(new.read_text())["methods"][0]["device"] == "cuda:6"


def test_channels_beyond_the_layer_are_caught_by_check_and_disabled_entries_are_not_counted(tmp_path, capsys):
    from esegeta.run.check import check

    cfg = ancestor("Classification", False, [
        entry("captum_Saliency"),
        entry("cnn_vis_layer_activation_guided_backprop", layer="layer2", filter_pos=45),  # layer2 has 32 channels
        entry("lucent_render_vis", layer="layer2:99"),
        entry("captum_LayerGradCam", use=False),  # names no layer, disabled: converts, not counted
        entry("torchray_Rise", use=False),
    ])
    source, new = tmp_path / "t.json", tmp_path / "n.json"
    source.write_text(json.dumps(cfg))
    args = ["convert-torchesegeta", source, "-o", new, "--inputs", DIGITS / "digit_1_label0.npy",
            "--model-factory", f"{SAMPLES / 'models.py'}:DigitResNet", "--output-dir", tmp_path / "out"]
    code, _, err = run_cli(args, capsys)
    assert code == 2 and "methods[1].params.channel" in err and "layer 'layer2' has 32 channels" in err
    converted = json.loads(new.read_text())
    by_label = {m["label"]: m for m in converted["methods"]}
    assert by_label["torchray_Rise"]["id"] == "torchray.rise" and not by_label["torchray_Rise"]["enabled"]
    assert "layer" not in by_label["captum_LayerGradCam"] and not by_label["captum_LayerGradCam"]["enabled"]

    report = check(new)
    verdict = {m.label: m for m in report.methods}
    assert "params.channel" in verdict["cnn_vis_layer_activation_guided_backprop"].problems[0]
    assert "params.n_channel" in verdict["lucent_render_vis"].problems[0]
    assert verdict["captum_Saliency"].ok and not verdict["torchray_Rise"].enabled
    assert report.exit_code == 1 and "1/3 method(s) will run (2 disabled, not counted)" in report.text()
    code, _, err = run_cli(["run", new, "--device", "cpu"], capsys)
    assert code == 2 and "params.channel" in err and not (tmp_path / "out" / "manifest.json").exists()

    # Without the faulty entries the converted config runs; the disabled entry without a layer is no obstacle.
    source.write_text(json.dumps({**cfg, "methods": [cfg["methods"][0], cfg["methods"][3]]}))
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    report = check(new)
    assert report.exit_code == 0 and "1/1 method(s) will run (1 disabled, not counted)" in report.text()
