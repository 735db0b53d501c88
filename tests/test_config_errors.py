"""Bad configs of every kind: exit code 2 and a message on stderr naming the field (SPEC §2, §3, §8).

Every case starts from a valid, cheap digits config (absolute paths, one input, Saliency),
breaks one thing, writes it to ``tmp_path`` and runs ``esegeta validate`` and ``esegeta
run`` in-process through :func:`esegeta.cli.commands.main`. Each must return 2, print the JSON path
of the fault and a hint on stderr, show no traceback, and (for ``run``) write nothing.
Cases that esegeta gets wrong today are strict xfails whose reason starts with ``BUG:``.

The bugs these cases first found (unreadable inputs and failing factories crashing
with a traceback, integer targets and baselines only checked while the methods ran, union
tags and section owners instead of the key in JSON paths, ``runtime.devices`` named for
``--device`` and ``methods[i].device``, a wrapper on a classifier misreported, ``patch`` in
a method entry called an unknown key) are fixed; their cases now check the precise messages.
"""
from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from helpers_cli import FACTORY, ONE_DIGIT, SAMPLES, output_files, run_cli, valid_config, write_config

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")

TINY_SEG = """
import torch
from torch import nn


class TinySeg(nn.Module):
    '''A 2-channel segmentation model for (1, 8, 8) digits: output (B, 2, 8, 8).'''

    def __init__(self, out_channels=2):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.head = nn.Conv2d(4, out_channels, 1)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)))
"""


# --------------------------------------------------------------------------- #
# building bad configs
# --------------------------------------------------------------------------- #
def base(tmp: Path, **overrides: Any) -> dict:
    return valid_config(tmp, **overrides)


def with_methods(*methods: dict) -> Callable[[Path], dict]:
    return lambda tmp: base(tmp, methods=list(methods))


def edit(section: str, **values: Any) -> Callable[[Path], dict]:
    """The valid config with ``values`` set inside ``section`` (``None`` deletes a key)."""

    def build(tmp: Path) -> dict:
        cfg = base(tmp)
        cfg.setdefault(section, {})
        for key, value in values.items():
            if value is None:
                cfg[section].pop(key, None)
            else:
                cfg[section][key] = value(tmp) if callable(value) else value
        return cfg

    return build


def without(key: str) -> Callable[[Path], dict]:
    def build(tmp: Path) -> dict:
        cfg = base(tmp)
        del cfg[key]
        return cfg

    return build


def seg_model(tmp: Path, **overrides: Any) -> dict:
    """A config for a tiny 2-channel segmentation model (no weights), for wrapper cases."""
    (tmp / "seg.py").write_text(TINY_SEG)
    cfg = base(tmp, model={"factory": f"{tmp / 'seg.py'}:TinySeg"}, target=0,
               wrapper={"name": "threshold", "activation": "sigmoid"})
    cfg.update(overrides)
    return cfg


def file_with(name: str, write: Callable[[Path], None]) -> Callable[[Path], str]:
    """A path-valued builder: writes ``tmp/name`` with ``write`` and returns its path."""

    def make(tmp: Path) -> str:
        path = tmp / name
        write(path)
        return str(path)

    return make


def np_file(array: np.ndarray, **kw: Any) -> Callable[[Path], None]:
    return lambda path: np.save(path, array, **kw)


def torch_file(obj: Any) -> Callable[[Path], None]:
    return lambda path: torch.save(obj, path)


def raw_bytes(data: bytes) -> Callable[[Path], None]:
    return lambda path: path.write_bytes(data)


def region_mask(shape: tuple[int, ...]) -> Callable[[Path], dict]:
    def build(tmp: Path) -> dict:
        np.save(tmp / "mask.npy", np.ones(shape, np.float32))
        return seg_model(tmp, wrapper={"name": "region", "mask": str(tmp / "mask.npy")})

    return build


class Evil:
    """Unpickling this creates the marker file (a stand-in for running any code)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def evil_raw_pickle(path: Path) -> None:
    path.write_bytes(pickle.dumps(Evil(path.parent / "pwned")))


def evil_torch_save(path: Path) -> None:
    torch.save({"weight": Evil(path.parent / "pwned")}, path)


def other_model_weights(path: Path) -> None:
    torch.save(torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.Linear(3, 2)).state_dict(), path)


def file_text(name: str, text: str) -> Callable[[Path], str]:
    return file_with(name, lambda path: path.write_text(text))


# --------------------------------------------------------------------------- #
# the cases
# --------------------------------------------------------------------------- #
@dataclass
class Bad:
    """One bad config: how to build it, the JSON path the message must name, hint words."""

    id: str
    build: Callable[[Path], Any]  # a dict, or a str written verbatim
    where: str  # the JSON path; the message must contain "<where>:" ("" = no path)
    hints: tuple[str, ...] = ()
    argv: tuple[str, ...] = ()  # extra arguments for `esegeta run`
    commands: tuple[str, ...] = ("validate", "run")
    marks: tuple = ()


CASES: list[Bad] = [
    # -- the file itself ----------------------------------------------------------------------------
    Bad("not-json", lambda tmp: "{model: nope", "", ("is not valid JSON",)),
    Bad("empty-file", lambda tmp: "", "", ("is not valid JSON",)),
    Bad("json-list", lambda tmp: json.dumps([base(tmp)]), "", ("a config is a JSON object",)),
    Bad("json-null", lambda tmp: "null", "", ("a config is a JSON object",)),
    # -- structure ----------------------------------------------------------------------------------
    Bad("missing-model", without("model"), "model", ("required key is missing",)),
    Bad("missing-inputs", without("inputs"), "inputs", ("required key is missing",)),
    Bad("missing-methods", without("methods"), "methods", ("required key is missing",)),
    Bad("empty-methods", lambda tmp: base(tmp, methods=[]), "methods", ("at least 1",)),
    Bad("methods-not-a-list", lambda tmp: base(tmp, methods={"id": "captum.Saliency"}), "methods", ("list",)),
    Bad("method-as-string", lambda tmp: base(tmp, methods=["captum.Saliency"]), "methods[0]", ("dictionary",)),
    Bad("model-null", lambda tmp: base(tmp, model=None), "model", ("dictionary",)),
    Bad("unknown-key-typo", lambda tmp: base(tmp, wrapr={"name": "threshold"}), "wrapr",
        ("unknown key", "did you mean wrapper?")),
    Bad("unknown-nested-key", edit("runtime", sed=1), "runtime.sed", ("unknown key", "did you mean seed?")),
    Bad("unknown-method-key", with_methods({"id": "captum.Saliency", "param": {}}), "methods[0].param",
        ("did you mean params?",)),
    Bad("unknown-wrapper-key", lambda tmp: base(tmp, wrapper={"name": "threshold", "treshold": 0.5}),
        "wrapper.treshold", ("did you mean threshold?",)),
    Bad("unknown-output-key", edit("output", dirr="x"), "output.dirr", ("did you mean dir?",)),
    Bad("patch-odd-overlap", lambda tmp: base(tmp, patch={"size": [4, 4], "overlap": [1, 0], "mode": "local"}),
        "patch.overlap", ("even",)),
    Bad("runtime-amp-not-bool", edit("runtime", amp="yes"), "runtime.amp", ("valid boolean",)),
    Bad("runtime-timeout-zero", edit("runtime", timeout_s=0), "runtime.timeout_s", ("greater than 0",)),
    Bad("runtime-threads-zero", edit("runtime", threads_per_device=0), "runtime.threads_per_device",
        ("greater than or equal to 1",)),
    # a method entry may override patch (checked against the inputs' rank) and timeout_s (must be positive)
    Bad("method-patch-rank", with_methods({"id": "captum.Saliency", "patch": {"size": [4, 4, 4]}}),
        "methods[0].patch.size", ("needs 2 sizes",)),
    Bad("method-timeout-negative", with_methods({"id": "captum.Saliency", "timeout_s": -5}),
        "methods[0].timeout_s", ("greater than 0",)),
    # -- wrong types and values -----------------------------------------------------------------------
    Bad("spatial-dims-4", edit("inputs", spatial_dims=4), "inputs.spatial_dims", ("2 or 3",)),
    # a union (class index or "predicted"): every member's complaint on the field's one line
    Bad("target-negative", lambda tmp: base(tmp, target=-1), "target",
        ("target: Input should be greater than or equal to 0 | or: Input should be 'predicted'",)),
    Bad("target-word", lambda tmp: base(tmp, target="best"), "target",
        ("target: Input should be a valid integer", "| or: Input should be 'predicted'")),
    Bad("method-target-negative", with_methods({"id": "captum.Saliency", "target": -2}), "methods[0].target",
        ("methods[0].target: Input should be greater than or equal to 0 | or: Input should be 'predicted'",)),
    Bad("format-gif", edit("output", formats=["gif"]), "output.formats[0]", ("'npy', 'png', 'nii' or 'zarr'",)),
    Bad("figure-method", edit("output", figure={"method": "heatmap"}), "output.figure.method", ("heat_map",)),
    Bad("params-not-a-dict", with_methods({"id": "captum.Saliency", "params": [1]}), "methods[0].params",
        ("dictionary",)),
    Bad("resize-zero", edit("inputs", resize=[8, 0]), "inputs.resize[1]", ("greater than 0",)),
    # the evaluation block coerces nothing either: "64" is not 64, true is not a seed
    Bad("evaluation-batch-string", lambda tmp: base(tmp, evaluation={"metrics": ["deletion"], "max_batch": "64"}),
        "evaluation.max_batch", ("valid integer", "not '64'")),
    Bad("evaluation-seed-bool", lambda tmp: base(tmp, evaluation={"metrics": ["deletion"], "seed": True}),
        "evaluation.seed", ("valid integer", "not True")),
    # -- methods ------------------------------------------------------------------------------------
    Bad("method-id-typo", with_methods({"id": "captum.IntegratedGradient"}), "methods[0].id",
        ("unknown method", "did you mean captum.IntegratedGradients?")),
    Bad("method-unknown-library", with_methods({"id": "foo.Bar"}), "methods[0].id",
        ("unknown method 'foo.Bar'", "valid: captum.")),
    Bad("method-without-library", with_methods({"id": "Saliency"}), "methods[0].id",
        ("did you mean captum.Saliency?",)),
    Bad("method-error-in-second-entry", with_methods({"id": "captum.Saliency"}, {"id": "captum.Salency"}),
        "methods[1].id", ("did you mean captum.Saliency?",)),
    Bad("param-typo", with_methods({"id": "captum.IntegratedGradients", "params": {"n_step": 8}}),
        "methods[0].params.n_step", ("unknown parameter for captum.IntegratedGradients; did you mean n_steps?",)),
    Bad("target-in-params", with_methods({"id": "captum.Saliency", "params": {"target": 1}}),
        "methods[0].params.target", ("unknown parameter", "'target'")),
    Bad("layer-missing", with_methods({"id": "captum.LayerGradCam"}), "methods[0].layer", ("needs a 'layer'",)),
    Bad("layer-not-taken", with_methods({"id": "captum.Saliency", "layer": "layer2"}), "methods[0].layer",
        ("takes no layer",)),
    Bad("layer-typo", with_methods({"id": "captum.LayerGradCam", "layer": "layer22"}), "methods[0].layer",
        ("no layer 'layer22'", "did you mean layer2?")),
    Bad("neuron-selector-missing", with_methods({"id": "captum.NeuronGradient", "layer": "layer2"}),
        "methods[0].params", ("neuron_selector",)),
    # Occlusion's window and strides against the input (digits: 1 channel, 8 × 8), before the run
    Bad("occlusion-window-too-big", with_methods({"id": "captum.Occlusion", "params": {"sliding_window_shapes": [1, 9, 3]}}),
        "methods[0].params.sliding_window_shapes", ("larger than the input's (channels, *spatial) = [1, 8, 8]",)),
    Bad("occlusion-window-axes", with_methods({"id": "captum.Occlusion", "params": {"sliding_window_shapes": [3, 3]}}),
        "methods[0].params.sliding_window_shapes", ("give 3 positive sizes",)),
    Bad("occlusion-stride-zero", with_methods({"id": "captum.Occlusion",
                                               "params": {"sliding_window_shapes": [1, 3, 3], "strides": 0}}),
        "methods[0].params.strides", ("positive integer",)),
    Bad("occlusion-stride-past-window", with_methods({"id": "captum.Occlusion",
                                                      "params": {"sliding_window_shapes": [1, 2, 2], "strides": [1, 3, 3]}}),
        "methods[0].params.strides", ("larger than the window [1, 2, 2]",)),
    # JSON text stays strict (explain takes Python's forms: tests/test_api.py): a string is not a list or a number
    Bad("occlusion-window-as-text", with_methods({"id": "captum.Occlusion", "params": {"sliding_window_shapes": "(1, 2, 2)"}}),
        "methods[0].params.sliding_window_shapes", ("must be a list", "not '(1, 2, 2)'")),
    Bad("n-steps-as-text", with_methods({"id": "captum.IntegratedGradients", "params": {"n_steps": "32"}}),
        "methods[0].params.n_steps", ("n_steps counts", "not '32'")),
    Bad("noise-tunnel-key-typo", with_methods({"id": "captum.Saliency", "noise_tunnel": {"nt_sample": 4}}),
        "methods[0].noise_tunnel.nt_sample", ("did you mean nt_samples?",)),
    Bad("noise-tunnel-type", with_methods({"id": "captum.Saliency", "noise_tunnel": {"nt_type": "smoothgrd"}}),
        "methods[0].noise_tunnel.nt_type", ("smoothgrad", "vargrad")),
    Bad("duplicate-labels", with_methods({"id": "captum.Saliency", "label": "a"},
                                         {"id": "captum.InputXGradient", "label": "a"}),
        "methods[1].label", ("'a' is already used by methods[0]", "give each entry a unique 'label'")),
    Bad("duplicate-ids-without-label", with_methods({"id": "captum.Saliency"}, {"id": "captum.Saliency"}),
        "methods[1].label", ("'captum.Saliency' is already used by methods[0]", "give each entry a unique 'label'")),
    Bad("label-with-slash", with_methods({"id": "captum.Saliency", "label": "../escape"}), "methods[0].label",
        ("pattern",)),
    Bad("label-empty", with_methods({"id": "captum.Saliency", "label": ""}), "methods[0].label", ("pattern",)),
    Bad("baseline-name", with_methods({"id": "captum.Saliency"},
                                      {"id": "captum.IntegratedGradients", "params": {"baselines": "foo"}}),
        "methods[1].params.baselines",
        ("unknown baseline 'foo'; use a number or one of zeros, mean, min, blur, blur:SIGMA",)),
    # -- model --------------------------------------------------------------------------------------
    Bad("factory-file-missing", edit("model", factory=lambda tmp: f"{tmp / 'nope.py'}:DigitResNet"),
        "model.factory", ("does not exist",)),
    Bad("factory-callable-typo", edit("model", factory=FACTORY.replace("DigitResNet", "DigitResNt")),
        "model.factory", ("has no 'DigitResNt'", "did you mean DigitResNet?")),
    Bad("factory-not-file-colon-callable", edit("model", factory=str(SAMPLES / "models.py")),
        "model.factory", ("'file.py:callable'",)),
    Bad("factory-dotted-no-colon", edit("model", factory="samples.models.DigitResNet"), "model.factory",
        ("'file.py:callable' or 'module:callable'",)),
    Bad("factory-module-missing", edit("model", factory="no_such_module_xyz:Net"), "model.factory",
        ("cannot import module 'no_such_module_xyz'",)),
    Bad("factory-syntax-error", edit("model", factory=lambda tmp: file_text("broken.py", "def make(:\n")(tmp) + ":make"),
        "model.factory", ("importing", "SyntaxError")),
    Bad("factory-not-a-module", edit("model", factory="builtins:dict", weights=None), "model.factory",
        ("not a torch.nn.Module",)),
    Bad("factory-kwargs-typo", edit("model", kwargs={"num_class": 3}), "model.kwargs", ("num_class",)),
    Bad("factory-raises", edit("model", weights=None, factory=lambda tmp: file_text(
        "raising.py", "def make():\n    raise ValueError('unsupported depth')\n")(tmp) + ":make"),
        "model.factory", ("raising.py:make failed: ValueError: unsupported depth",)),
    Bad("factory-kwargs-negative", edit("model", kwargs={"num_classes": -1}), "model.kwargs",
        ("models.py:DigitResNet failed: RuntimeError:", "negative dimension -1")),
    Bad("weights-missing", edit("model", weights=lambda tmp: str(tmp / "nope.pt")), "model.weights",
        ("does not exist",)),
    Bad("weights-other-model", edit("model", weights=file_with("other.pt", other_model_weights)), "model.weights",
        ("do not fit",)),
    Bad("weights-shape-mismatch", edit("model", kwargs={"num_classes": 3}), "model.weights",
        ("do not fit", "of another shape")),
    Bad("weights-not-a-state-dict", edit("model", weights=file_with("list.pt", torch_file([1, 2]))),
        "model.weights", ("state dict",)),
    Bad("weights-dict-of-ints", edit("model", weights=file_with("ints.pt", torch_file({"a": 1}))),
        "model.weights", ("state dict",)),
    Bad("weights-junk-bytes", edit("model", weights=file_with("junk.pt", raw_bytes(b"not a checkpoint"))),
        "model.weights", ("refused",)),
    Bad("weights-malicious-raw-pickle", edit("model", weights=file_with("evil.pkl", evil_raw_pickle)),
        "model.weights", ("refused", "weights_only=True")),
    Bad("weights-malicious-torch-save", edit("model", weights=file_with("evil.pt", evil_torch_save)),
        "model.weights", ("refused", "weights_only=True")),
    Bad("no-factory-no-torchscript", edit("model", factory=None), "model", ("TorchScript",)),
    # -- inputs -------------------------------------------------------------------------------------
    Bad("inputs-glob-matches-nothing", edit("inputs", paths=lambda tmp: [str(tmp / "nothing*.npy")]),
        "inputs.paths[0]", ("matches no file",)),
    Bad("inputs-file-missing", edit("inputs", paths=lambda tmp: [str(tmp / "nothing.npy")]),
        "inputs.paths[0]", ("matches no file",)),
    Bad("inputs-second-path-missing", edit("inputs", paths=lambda tmp: [str(ONE_DIGIT), str(tmp / "no.npy")]),
        "inputs.paths[1]", ("matches no file",)),
    Bad("inputs-empty-folder", edit("inputs", paths=lambda tmp: [str((tmp / "empty").mkdir() or tmp / "empty")]),
        "inputs.paths[0]", ("matches no file",)),
    Bad("inputs-empty-list", edit("inputs", paths=[]), "inputs.paths", ("at least 1",)),
    Bad("inputs-txt-suffix", edit("inputs", paths=lambda tmp: [file_text("a.txt", "1 2 3")(tmp)]),
        "inputs.paths[0]", ("unsupported file type", ".npy")),
    Bad("inputs-wrong-rank", edit("inputs", paths=lambda tmp: [
        file_with("rank4.npy", np_file(np.zeros((8, 8, 8, 8), np.float32)))(tmp)]),
        "inputs.spatial_dims", ("(8, 8, 8, 8)", "2D")),
    Bad("inputs-resize-count", edit("inputs", resize=[8]), "inputs.resize", ("needs 2 sizes (one per spatial axis)",)),
    Bad("inputs-normalize-count", edit("inputs", normalize={"mean": [0.1, 0.2], "std": [1, 1]}),
        "inputs.normalize", ("one per channel",)),
    Bad("inputs-channels-do-not-fit-model", edit("inputs", paths=lambda tmp: [
        file_with("rgb.npy", np_file(np.zeros((3, 8, 8), np.float32)))(tmp)]),
        "inputs.color", ("rgb.npy has 3", "grayscale")),
    Bad("inputs-pt-not-a-tensor", edit("inputs", paths=lambda tmp: [file_with("d.pt", torch_file({"x": 1}))(tmp)]),
        "inputs.paths", ("does not hold a tensor",)),
    Bad("inputs-object-npy", edit("inputs", paths=lambda tmp: [
        file_with("obj.npy", np_file(np.array([{"a": 1}], dtype=object), allow_pickle=True))(tmp)]),
        "inputs.paths", ("cannot read obj.npy: ValueError:",)),
    Bad("inputs-junk-npy", edit("inputs", paths=lambda tmp: [file_with("junk.npy", raw_bytes(b"junk"))(tmp)]),
        "inputs.paths", ("cannot read junk.npy: ValueError:",)),
    Bad("inputs-junk-png", edit("inputs", paths=lambda tmp: [file_with("junk.png", raw_bytes(b"junk"))(tmp)]),
        "inputs.paths", ("cannot read junk.png: UnidentifiedImageError:",)),
    Bad("inputs-junk-pt", edit("inputs", paths=lambda tmp: [file_with("junk.pt", raw_bytes(b"junk"))(tmp)]),
        "inputs.paths", ("cannot read junk.pt:",)),
    Bad("inputs-malicious-pt", edit("inputs", paths=lambda tmp: [file_with("evil_in.pt", evil_torch_save)(tmp)]),
        "inputs.paths", ("cannot read evil_in.pt: UnpicklingError:",)),
    # -- wrappers and targets -------------------------------------------------------------------------
    Bad("wrapper-name-typo", lambda tmp: base(tmp, wrapper={"name": "treshold"}), "wrapper.name",
        ("unknown wrapper", "did you mean threshold?")),
    Bad("wrapper-region-without-mask", lambda tmp: base(tmp, wrapper={"name": "region"}), "wrapper.mask",
        ("the region wrapper needs a mask file",)),
    Bad("wrapper-mask-for-threshold", lambda tmp: base(tmp, wrapper={"name": "threshold", "mask": "m.npy"}),
        "wrapper.mask", ("only the region wrapper uses a mask",)),
    Bad("wrapper-mask-file-missing", lambda tmp: seg_model(tmp, wrapper={"name": "region", "mask": "nomask.npy"}),
        "wrapper.mask", ("does not exist",)),
    Bad("wrapper-mask-shape", region_mask((4, 4)), "wrapper.mask", ("(4, 4)", "(8, 8)")),
    # any wrapper on a classifier's (B, K) output is the fault, whatever its channel
    Bad("wrapper-channel-classifier", lambda tmp: base(tmp, wrapper={"name": "threshold", "channel": 12}),
        "wrapper", ("the model outputs shape (1, 10): remove the wrapper for a classifier",)),
    Bad("wrapper-channel-segmenter", lambda tmp: seg_model(tmp, wrapper={"name": "threshold", "channel": 3}),
        "wrapper.channel", ("channel 3 does not exist", "2 channels")),
    Bad("wrapper-target-too-big", lambda tmp: seg_model(tmp, target=5), "target",
        ("target 5 does not exist", "2 columns")),
    Bad("wrapper-method-target-too-big", lambda tmp: seg_model(tmp, methods=[{"id": "captum.Saliency", "target": 5}]),
        "methods[0].target", ("target 5 does not exist",)),
    Bad("segmenter-without-wrapper", lambda tmp: {k: v for k, v in seg_model(tmp, target="predicted").items()
                                                  if k != "wrapper"},
        "wrapper", ("(1, 2, 8, 8)", "set a wrapper")),
    Bad("segmenter-without-wrapper-int-target", lambda tmp: {k: v for k, v in seg_model(tmp, target=1).items()
                                                             if k != "wrapper"},
        "wrapper", ("the model output has shape (1, 2, 8, 8), not (batch, classes)",
                    "for a segmentation model set a wrapper")),
    Bad("wrapper-custom-file-missing", lambda tmp: seg_model(tmp, wrapper={"name": "nowrap.py:make"}),
        "wrapper.name", ("does not exist",)),
    Bad("classifier-target-too-big", lambda tmp: base(tmp, target=12), "target",
        ("target 12 does not exist", "10 columns")),
    Bad("classifier-method-target-too-big", with_methods({"id": "captum.Saliency", "target": 12}),
        "methods[0].target", ("target 12 does not exist", "10 columns")),
    # -- devices and --only -----------------------------------------------------------------------------
    Bad("device-cuda-in-config", edit("runtime", devices="cuda:0"), "runtime.devices",
        ("cuda:0", "CUDA is not available"), marks=(NO_CUDA,)),
    Bad("device-list-cuda-first", edit("runtime", devices=["cuda:0", "cpu"]), "runtime.devices[0]",
        ("CUDA is not available",), marks=(NO_CUDA,)),
    Bad("device-not-a-device", edit("runtime", devices="gpu"), "runtime.devices", ("'gpu' is not a device",)),
    Bad("device-cuda-flag", base, "--device", ("cuda:0", "CUDA is not available"), argv=("--device", "cuda:0"),
        commands=("run",), marks=(NO_CUDA,)),
    Bad("device-cuda-in-method", with_methods({"id": "captum.Saliency", "device": "cuda:0"}), "methods[0].device",
        ("cuda:0 requested but CUDA is not available", "use 'cpu' or 'auto'"), marks=(NO_CUDA,)),
    Bad("only-unknown-method", base, "--only", ("no method with id or label 'captum.IntegratedGradients'",),
        argv=("--only", "captum.IntegratedGradients"), commands=("run",)),
    Bad("only-typo", base, "--only", ("did you mean captum.Saliency?",), argv=("--only", "captum.Salency"),
        commands=("run",)),
]


def _params():
    for bad in CASES:
        for command in bad.commands:
            yield pytest.param(bad, command, id=f"{bad.id}-{command}", marks=bad.marks)


def _write(bad: Bad, tmp_path: Path) -> Path:
    return write_config(tmp_path, bad.build(tmp_path), "bad.json")


@pytest.mark.parametrize("bad, command", list(_params()))
def test_bad_config_exits_2_naming_the_field(bad: Bad, command: str, tmp_path, capsys):
    cfg = _write(bad, tmp_path)
    argv = [command, cfg, *(bad.argv if command == "run" else ())]
    code, out, err = run_cli(argv, capsys)
    assert code == 2, f"exit {code}; stderr:\n{err}"
    assert err.startswith("esegeta: invalid"), err
    if bad.where:
        assert f"{bad.where}:" in err, f"the message does not name {bad.where!r}:\n{err}"
    for hint in bad.hints:
        assert hint in err, f"{hint!r} missing from:\n{err}"
    assert "Traceback" not in err + out
    assert not (tmp_path / "pwned").exists()
    if command == "run":
        assert not any(p.name == "manifest.json" for p in output_files(tmp_path / "out")), output_files(tmp_path)
        assert not (tmp_path / "out").exists()


def test_case_ids_are_unique():
    ids = [bad.id for bad in CASES]
    assert len(ids) == len(set(ids))


# --------------------------------------------------------------------------- #
# the valid config, --debug, and other exits
# --------------------------------------------------------------------------- #
def test_valid_config_validates_and_writes_nothing(tmp_path, capsys):
    cfg = write_config(tmp_path, base(tmp_path, methods=[
        {"id": "captum.Saliency"}, {"id": "captum.LayerGradCam", "layer": "layer2", "label": "gradcam"}]))
    code, out, err = run_cli(["validate", cfg], capsys)
    assert code == 0, err
    assert "valid: 1 input(s), 2 method(s), model DigitResNet on cpu" in out
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()  # validate runs no method and writes no result


def test_the_committed_digits_config_validates(capsys):
    from helpers_cli import REPO

    code, out, err = run_cli(["validate", REPO / "configs" / "digits.json"], capsys)
    assert code == 0, err
    assert "digits.json: valid: 4 input(s)" in out


@pytest.mark.parametrize("command", ["validate", "run"])
def test_debug_shows_the_traceback_instead_of_exit_2(command, tmp_path, capsys):
    from esegeta.errors import ConfigError

    cfg = write_config(tmp_path, base(tmp_path, methods=[{"id": "captum.IntegratedGradients",
                                                          "params": {"n_step": 8}}]))
    with pytest.raises(ConfigError) as info:
        run_cli([command, cfg, "--debug"], capsys)
    assert "methods[0].params.n_step: unknown parameter" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_config_file_missing(tmp_path, capsys):
    for command in ("validate", "run"):
        code, _, err = run_cli([command, tmp_path / "nope.json"], capsys)
        assert code == 2
        assert "nope.json does not exist" in err and "Traceback" not in err


def test_several_faults_are_reported_together(tmp_path, capsys):
    cfg = base(tmp_path, wrapr={}, target=-1)
    cfg["runtime"]["sed"] = 1
    code, _, err = run_cli(["validate", write_config(tmp_path, cfg)], capsys)
    assert code == 2
    for where in ("wrapr: unknown key", "runtime.sed: unknown key", "target: Input should be"):
        assert where in err


@pytest.mark.parametrize("weights", ["evil.pkl", "evil.pt"])
def test_malicious_weights_never_run(weights, tmp_path, capsys):
    """The pickle's payload (touch a file) must never run: weights load with weights_only=True."""
    path = tmp_path / weights
    (evil_raw_pickle if weights.endswith(".pkl") else evil_torch_save)(path)
    cfg = base(tmp_path)
    cfg["model"]["weights"] = str(path)
    for command in ("validate", "run"):
        code, _, err = run_cli([command, write_config(tmp_path, cfg)], capsys)
        assert code == 2
        assert f"model.weights: refused to load {weights}" in err
    assert not (tmp_path / "pwned").exists()
    # the payload is real: unpickling it without weights_only does create the marker
    pickle.loads(pickle.dumps(Evil(tmp_path / "control")))
    assert (tmp_path / "control").exists()


def test_malicious_input_file_never_runs(tmp_path, capsys):
    """A pickled .pt *input* is not executed either: exit 2 naming inputs.paths."""
    evil_torch_save(tmp_path / "evil_in.pt")
    cfg = base(tmp_path)
    cfg["inputs"]["paths"] = [str(tmp_path / "evil_in.pt")]
    code, _, err = run_cli(["validate", write_config(tmp_path, cfg)], capsys)
    assert code == 2, err
    assert "inputs.paths: cannot read evil_in.pt" in err
    assert not (tmp_path / "pwned").exists()


# --------------------------------------------------------------------------- #
# precise paths and messages (each was once a bug), and one that is still unclear
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("where, value", [("target", -1), ("target", "best"), ("methods[0].target", -1)])
def test_target_message_has_no_pydantic_tags(where, value, tmp_path, capsys):
    cfg = base(tmp_path, target=value) if where == "target" else base(
        tmp_path, methods=[{"id": "captum.Saliency", "target": value}])
    code, _, err = run_cli(["validate", write_config(tmp_path, cfg)], capsys)
    assert code == 2
    assert f"{where}: Input should be" in err
    assert "| or: Input should be 'predicted'" in err  # both members of the union, on the field's line
    assert len([line for line in err.splitlines() if "target" in line]) == 1, err
    assert "constrained-int" not in err and "literal[" not in err


@pytest.mark.parametrize("where, message", [
    ("inputs.resize", "needs 2 sizes (one per spatial axis)"),
    ("wrapper.mask", "the region wrapper needs a mask file with the input's spatial shape"),
    ("methods[1].label", "'a' is already used by methods[0]; give each entry a unique 'label'"),
])
def test_model_level_checks_name_the_key(where, message, tmp_path, capsys):
    cfg = {
        "inputs.resize": lambda: edit("inputs", resize=[8])(tmp_path),
        "wrapper.mask": lambda: base(tmp_path, wrapper={"name": "region"}),
        "methods[1].label": lambda: base(tmp_path, methods=[{"id": "captum.Saliency", "label": "a"},
                                                            {"id": "captum.InputXGradient", "label": "a"}]),
    }[where]()
    code, _, err = run_cli(["validate", write_config(tmp_path, cfg)], capsys)
    assert code == 2
    assert f"{where}: {message}" in err


@pytest.mark.parametrize("wrapper", [{"name": "threshold", "channel": 3}, {"name": "multiclass"}],
                         ids=["threshold", "multiclass"])
def test_wrapper_on_a_classifier_says_so(wrapper, tmp_path, capsys):
    cfg = base(tmp_path, wrapper=wrapper)
    code, _, err = run_cli(["validate", write_config(tmp_path, cfg)], capsys)
    assert code == 2
    assert ("wrapper: wrappers turn segmentation outputs (batch, channels, *spatial) into scores; "
            "the model outputs shape (1, 10): remove the wrapper for a classifier") in err
    assert "set a wrapper" not in err


@pytest.mark.parametrize("where, name, write", [
    ("inputs.paths", "junk.npy", raw_bytes(b"junk")),
    ("inputs.paths", "evil_in.pt", evil_torch_save),
    ("model.weights", "evil.pt", evil_torch_save),
    ("model.weights", "junk.pt", raw_bytes(b"not a checkpoint")),
], ids=["input-junk.npy", "input-evil_in.pt", "weights-evil.pt", "weights-junk.pt"])
def test_unreadable_file_message_gives_no_unsafe_advice(where, name, write, tmp_path, capsys):
    write(tmp_path / name)
    cfg = base(tmp_path)
    if where == "inputs.paths":
        cfg["inputs"]["paths"] = [str(tmp_path / name)]
    else:
        cfg["model"]["weights"] = str(tmp_path / name)
    code, _, err = run_cli(["validate", write_config(tmp_path, cfg)], capsys)
    assert code == 2
    assert f"{where}: " in err and name in err
    for advice in ("allow_pickle", "pickle.load()", "two options", "trust", "weights_only` set to `False"):
        assert advice not in err, err
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("window, strides", [
    ([1, 3, 3], [1, 2, 2]), ([1, 8, 8], [1, 9, 9]), ([1, 3, 3], 3), ([1, 3, 3], 4), ([1, 9, 3], 1), ([2, 3, 3], 1),
    ([1, 3, 3], [1, 4, 1]), ([1, 8, 3], [1, 20, 3]), ([1, 3], [1, 1]), ([1, 3, 3], [1, 1]),
])
def test_occlusion_preflight_agrees_with_captum(window, strides):
    """What esegeta refuses before the run is what Captum's Occlusion asserts on mid-run, and no more."""
    from captum.attr import Occlusion

    from esegeta.adapters.captum import occlusion_fits
    from esegeta.attribution.architectures import Context

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(128, 3))
    x = torch.randn(1, 1, 8, 8)
    refused = occlusion_fits(model, Context(x, params={"sliding_window_shapes": window, "strides": strides}))
    try:
        Occlusion(model).attribute(x, target=0, sliding_window_shapes=tuple(window),
                                   strides=tuple(strides) if isinstance(strides, list) else strides)
        ran = True
    except (AssertionError, ValueError, IndexError, RuntimeError):
        ran = False
    assert ran == (not refused), refused
