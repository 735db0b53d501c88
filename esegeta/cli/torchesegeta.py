"""Convert TorchEsegeta's JSON configs into esegeta configs (``esegeta convert-torchesegeta``).

TorchEsegeta (https://github.com/soumickmj/TorchEsegeta), esegeta's ancestor, reads a JSON
config of its own shape: top-level switches (``is_3d``, ``patch_size``, ``amp_enbled``, ...),
and two lists, ``methods`` and ``explain_methods``, whose entries name one of its own methods
(``captum_Saliency``, ``cnn_vis_score_cam``, ``lime_segmentation``, ...) with a ``use`` flag,
figure settings and ``keywords``. It set the model, the inputs and the target in Python;
here they come from :class:`Arguments`.

The mapping is this module's tables, in one place: :data:`METHODS` (each ancestor method →
an esegeta id, its keyword renames and the settings that reproduce it), and
:data:`TOP_LEVEL_DROPPED`, :data:`ENTRY_DROPPED` and :data:`KEYWORDS_DROPPED` (what has no
counterpart here, with the reason). Nothing is dropped silently: :func:`convert` returns
every key and entry that does not map as a :class:`Note`, and the config keeps each of them,
with its value and the reason, in its ``_comment`` fields (the top level's for top-level keys
and whole entries, the entry's for its own keys). ``docs/torchesegeta.md`` documents the tables.
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from esegeta.errors import ConfigError

NO_NOISE_TUNNEL_3D = "the ancestor ran the noise tunnel on 2D inputs only"


@dataclass(frozen=True)
class MethodMap:
    """What one ancestor method becomes: the esegeta ``id``; ``keywords``: ancestor keyword →
    upstream parameter name; ``fixed``: parameters that make the esegeta method the ancestor's
    (e.g. signed gradients for vanilla backprop); ``layer``: its ``layer`` keyword is the
    entry's layer (``"lucent"``: lucent's ``name_with_underscores:channel`` form);
    ``noise_tunnel``: ``nt_type``/``n_samples`` asked for a second, noise-tunnelled result;
    ``layer_params``: parameters that name modules too; ``why``: how the two relate."""
    id: str
    keywords: Mapping[str, str] = field(default_factory=dict)
    fixed: Mapping[str, Any] = field(default_factory=dict)
    layer: bool | str = False
    noise_tunnel: bool = False
    layer_params: tuple[str, ...] = ()
    why: str = "the same upstream method"


def _m(id: str, why: str = "the same upstream method", **kw: Any) -> MethodMap:
    return MethodMap(id, why=why, **kw)


#: Every method of TorchEsegeta's method table (methods.py, explainMethods.py) → its esegeta equivalent.
METHODS: Mapping[str, MethodMap] = MappingProxyType({
    # Captum, called by the ancestor as here (its NoiseTunnel ran as a second result in 2D).
    "captum_Saliency": _m("captum.Saliency", keywords={"abs": "abs"}, noise_tunnel=True),
    "captum_Integrated_Gradients": _m("captum.IntegratedGradients", noise_tunnel=True),
    "captum_Feature_Ablation": _m("captum.FeatureAblation", keywords={"perturbations_per_eval": "perturbations_per_eval"},
                                  noise_tunnel=True),
    "captum_occlusion": _m("captum.Occlusion", keywords={"sliding_window_shapes": "sliding_window_shapes",
                                                         "strides": "strides"}, noise_tunnel=True),
    "captum_guided_backprop": _m("captum.GuidedBackprop", noise_tunnel=True),
    "captum_deep_lift": _m("captum.DeepLift", noise_tunnel=True),
    "captum_deconvolution": _m("captum.Deconvolution", noise_tunnel=True),
    "captum_guided_grad_cam": _m("captum.GuidedGradCam", layer=True, noise_tunnel=True),
    "captum_layer_activaltion": _m("captum.LayerActivation", layer=True),
    "captum_layer_conductance": _m("captum.LayerConductance", layer=True),
    "captum_internal_influence": _m("captum.InternalInfluence", layer=True),
    "captum_layer_grad_shap": _m("captum.LayerGradientShap", layer=True, keywords={
        "attribute_to_layer_input": "attribute_to_layer_input", "n_samples": "n_samples", "stdiv": "stdevs"}),
    "captum_gradient_shap": _m("captum.GradientShap", keywords={"n_samples": "n_samples", "stdiv": "stdevs"},
                               why="the same; the ancestor's baselines [zeros, input] have no shorthand: esegeta's default"),
    "captum_input_x_gradient": _m("captum.InputXGradient"),
    "captum_deep_lift_shap": _m("captum.DeepLiftShap",
                                why="the same; the ancestor's baselines [zeros, 1e-5 x input]: esegeta's default applies"),
    "captum_LayerGradientXActivation": _m("captum.LayerGradientXActivation", layer=True,
                                          keywords={"attribute_to_layer_input": "attribute_to_layer_input"}),
    "captum_LayerDeepLift": _m("captum.LayerDeepLift", layer=True,
                               keywords={"attribute_to_layer_input": "attribute_to_layer_input"}),
    "captum_LayerGradCam": _m("captum.LayerGradCam", layer=True,
                              keywords={"attribute_to_layer_input": "attribute_to_layer_input"}),
    "captum_ShapleyValueSampling": _m("captum.ShapleyValueSampling", keywords={
        "n_samples": "n_samples", "perturbations_per_eval": "perturbations_per_eval"}),
    # pytorch-cnn-visualizations (Ozbulak's hand-written methods) → the upstream implementations.
    "cnn_vis_vanilla_backprop": _m("captum.Saliency", fixed={"abs": False},
                                   why="vanilla backprop is the plain input gradient: Captum's Saliency, signed (abs false)"),
    "cnn_vis_grad_times_image": _m("captum.InputXGradient", why="gradient × image is Captum's InputXGradient"),
    "cnn_vis_guided_backprop": _m("captum.GuidedBackprop", why="guided backpropagation (Springenberg et al.)"),
    "cnn_vis_integrated_grad": _m("captum.IntegratedGradients", keywords={"n_samples": "n_steps"},
                                  why="integrated gradients from a zero baseline; the ancestor's steps (n_samples) "
                                      "are Captum's n_steps"),
    "cnn_vis_grad_cam": _m("gradcam.GradCAM", layer=True,
                           why="Grad-CAM upsampled to the input, as pytorch-grad-cam's GradCAM computes it"),
    "cnn_vis_guided_grad_cam": _m("captum.GuidedGradCam", layer=True,
                                  why="guided Grad-CAM: guided backprop × upsampled Grad-CAM, Captum's GuidedGradCam"),
    "cnn_vis_score_cam": _m("gradcam.ScoreCAM", layer=True, why="Score-CAM (Wang et al.), pytorch-grad-cam's ScoreCAM"),
    "cnn_vis_layer_activation_guided_backprop": _m(
        "esegeta.LayerActivationGuidedBackprop", layer=True, keywords={"filter_pos": "channel"},
        why="guided backprop of one channel's activation of a layer (filter_pos → channel)"),
    "cnn_vis_layer_visualization": _m(
        "lucent.render_vis", layer=True, keywords={"filter_pos": "n_channel"}, fixed={"objective": "channel", "thresholds": [30]},
        why="an image optimised from noise to excite one channel (filter_pos) of a layer, 30 steps as the ancestor ran"),
    "cnn_vis_DeepDream": _m(
        "lucent.render_vis", layer=True, keywords={"filter_pos": "n_channel"},
        fixed={"objective": "channel", "thresholds": [250]},
        why="the ancestor's deep dream starts from a random image and maximises one channel (filter_pos) for 250 steps: "
            "lucent's channel objective from noise"),
    "lucent_render_vis": _m("lucent.render_vis", layer="lucent", fixed={"objective": "channel"},
                            why="'layer:channel' is lucent's channel objective of that layer"),
    # TorchRay.
    "torchray_excitation_backprop": _m("torchray.excitation_backprop", layer=True),
    "torchray_contrast_excitation_backprop": _m(
        "torchray.contrastive_excitation_backprop", layer=True,
        keywords={"contrast_layer": "contrast_layer", "classifier_layer": "classifier_layer"},
        layer_params=("contrast_layer", "classifier_layer")),
    "torchray_Deconv": _m("torchray.deconvnet"),
    "torchray_Gradcam": _m("torchray.grad_cam", layer=True),
    "torchray_Gradient": _m("torchray.gradient"),
    "torchray_Guidedbackprop": _m("torchray.guided_backprop"),
    "torchray_Linearapprox": _m("torchray.linear_approx", layer=True),
    "torchray_Rise": _m("torchray.rise"),
    # LIME (the ancestor's explain_methods).
    "lime_segmentation": _m("lime.LimeImageExplainer", keywords={"num_samples": "num_samples", "num_features": "num_features"},
                            why="LIME on superpixels: lime's LimeImageExplainer"),
})

#: Method keywords without a counterpart here, and why.
KEYWORDS_DROPPED: Mapping[str, str] = MappingProxyType({
    "affine_size": "esegeta writes NIfTI results with the input's own affine, not an identity of this size",
    "firstLayer": "esegeta takes the gradient at the input itself; no hook on the first layer is needed",
    "device_ids": "DataParallel over several GPUs: esegeta runs one model copy per device instead (runtime.devices)",
    "neuron_start": "the channels the ancestor plotted; esegeta saves the layer's whole activation",
    "neuron_end": "the channels the ancestor plotted; esegeta saves the layer's whole activation",
    "init_color_low": "the value range of the ancestor's random starting image; lucent draws its own (params.param_f)",
    "init_color_high": "the value range of the ancestor's random starting image; lucent draws its own (params.param_f)",
    "shape": "the size of the rendered image: esegeta renders at the input's size (params.param_f w/h to change it)",
    "top_labels": "LIME's top labels: esegeta explains the entry's target",
    "depth": "the slice the ancestor's LIME explained in 3D: esegeta's LIME explains the whole volume",
})

#: Entry keys without a counterpart here, and why.
ENTRY_DROPPED: Mapping[str, str] = MappingProxyType({
    "show_colorbar": "esegeta's figures are set once, in output.figure",
    "title": "esegeta names results by the entry's label (the ancestor's method_name)",
    "share_gpu": "esegeta shares every device between runtime.threads_per_device workers, for every method",
    "uncertainity_metrics": "esegeta computes no uncertainty metrics",
    "uncertainity": "esegeta computes no uncertainty metrics",
    "uncertainity_cascading": "esegeta runs no cascading randomisation",
    "device_id": "the run's devices are runtime.devices ('auto') or --device; --keep-devices keeps the ancestor's",
})

#: Top-level keys without a counterpart here, and why.
TOP_LEVEL_DROPPED: Mapping[str, str] = MappingProxyType({
    "default": "selected the ancestor's bundled model and image; esegeta takes them from --model-factory/--weights/--inputs",
    "batch_dim_present": "esegeta loads files itself and adds the batch axis",
    "log_level": "esegeta logs at INFO; `esegeta run --debug` for more",
})

#: Entry keys the converter reads (everything else is reported).
ENTRY_READ = frozenset({"method_name", "library", "use", "keywords", "patch_required", "inpt_transform_req",
                        "visualize_method", "sign", "_comment"})
#: Top-level keys the converter reads.
TOP_LEVEL_READ = frozenset({"model_nature", "model_name", "dataset", "test_run", "output_path", "is_3d", "isDepthFirst",
                            "patch_size", "patch_overlap", "amp_enbled", "share_gpu_threads", "timeout_enabled",
                            "timeout_time", "resize", "centre_crop", "mean_vec", "std_vec", "methods", "explain_methods",
                            "_comment"})
TRANSFORM_KEYS = ("resize", "centre_crop", "mean_vec", "std_vec")

#: The ancestor's segmentation wrappers (its ``wrapper_fnction``) → esegeta's.
WRAPPERS: Mapping[str, dict[str, Any]] = MappingProxyType({
    "threshold_based": {"name": "threshold", "threshold": "otsu"},
    "multi_class": {"name": "multiclass"},
})
FIGURE_METHODS = ("heat_map", "blended_heat_map", "masked_image", "alpha_scaling")
FIGURE_SIGNS = ("all", "positive", "negative", "absolute_value")


@dataclass(frozen=True)
class Note:
    """One key or entry that did not map (``where`` as a JSON path of the ancestor's config)."""
    where: str
    value: Any
    reason: str

    def __str__(self) -> str:
        return f"{self.where} = {json.dumps(self.value)[:80]}: {self.reason}"


@dataclass
class Arguments:
    """What the ancestor set in Python: model, inputs, wrapper, target; and where outputs go.
    Paths are written relative to the new config's folder (``config_dir``)."""
    inputs: list[str]
    model_factory: str | None = None
    weights: str | None = None
    wrapper: str | None = None
    target: int | str | None = None
    output_dir: str | None = None
    normalize: str | None = None
    keep_devices: bool = False
    layer_map: Mapping[str, str] = field(default_factory=dict)
    config_dir: Path = Path(".")


@dataclass
class Conversion:
    """The esegeta config (a dict, valid JSON) and what did not map."""
    config: dict[str, Any]
    notes: list[Note]
    mapped: int = 0  # ancestor entries that became esegeta entries
    unmapped: int = 0  # ancestor entries that did not


def read(path: str | Path) -> dict[str, Any]:
    """An ancestor config; a key given twice keeps its last value (as Python's json did for the
    ancestor), but a repeated ``_comment`` keeps every value, as a list."""

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in items:
            if key == "_comment" and key in out:
                old = out[key]
                out[key] = (old if isinstance(old, list) else [old]) + (value if isinstance(value, list) else [value])
            else:
                out[key] = value
        return out

    path = Path(path)
    if not path.is_file():
        raise ConfigError("", f"{path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"), object_pairs_hook=pairs)
    except json.JSONDecodeError as exc:
        raise ConfigError("", f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("methods", []), list):
        raise ConfigError("", f"{path} is not a TorchEsegeta config (a JSON object with a 'methods' list)")
    return data


def module_name(name: str, map_: Mapping[str, str] | None = None) -> str:
    """The ancestor's Python attribute path (``net[0].net.layer3``) as a module name (``net.0.net.layer3``)."""
    name = (map_ or {}).get(name, name)
    return re.sub(r"\[(\d+)\]", r".\1", name).strip(".")


class _Converter:
    def __init__(self, source: dict[str, Any], args: Arguments, modules: Callable[[], set[str]] | None):
        self.src, self.args, self.notes = source, args, []
        self.dims = 3 if source.get("is_3d") else 2
        self._modules, self._module_names = modules, None

    # -- helpers -------------------------------------------------------------------
    def note(self, where: str, value: Any, reason: str, comment: dict | None = None, key: str | None = None) -> None:
        self.notes.append(Note(where, value, reason))
        if comment is not None:
            comment.setdefault("not_mapped", {})[key or where] = {"value": value, "why": reason}

    def modules(self) -> set[str] | None:
        if self._module_names is None and self._modules is not None:
            self._module_names = self._modules()
        return self._module_names

    def layer(self, name: str, lucent: bool = False) -> tuple[str, str | None]:
        """(esegeta layer name, why it is not in the model or None)."""
        names = self.modules()
        if lucent:
            mapped = self.args.layer_map.get(name)
            if mapped is not None:
                name = module_name(mapped)
            elif names is not None:
                found = [n for n in names if n.replace(".", "_") == name]
                name = found[0] if found else name.replace("_", ".")
            else:
                name = name.replace("_", ".")
        else:
            name = module_name(name, self.args.layer_map)
        if names is not None and name not in names:
            return name, f"the model has no layer {name!r}; give --layer-map OLD=NEW, or set 'layer' and 'enabled': true"
        return name, None

    # -- the whole config ----------------------------------------------------------
    def run(self) -> Conversion:
        src = self.src
        model = self.model()
        top: dict[str, Any] = {"converted_from": "TorchEsegeta"}
        if "_comment" in src:
            top["ancestor_comments"] = src["_comment"]
        for key in sorted(set(src) - TOP_LEVEL_READ):
            reason = TOP_LEVEL_DROPPED.get(key, "not a TorchEsegeta key this converter knows")
            self.note(key, src[key], reason, top, key)

        entries = [("methods", i, e) for i, e in enumerate(src.get("methods") or [])]
        entries += [("explain_methods", i, e) for i, e in enumerate(src.get("explain_methods") or [])]
        used = [e for _, _, e in entries if isinstance(e, dict) and e.get("use") is True]
        transform = self.transform(used, top)
        every = [e for _, _, e in entries if isinstance(e, dict)]
        figure = self.figure([e for e in used if e.get("visualize_method")] or every)

        methods: list[dict[str, Any]] = []
        mapped = unmapped = 0
        for section, i, entry in entries:
            where = f"{section}[{i}]"
            converted = self.entry(where, entry, transform, figure)
            if isinstance(converted, str):
                unmapped += 1
                top.setdefault("unmapped_entries", []).append({"entry": where, "value": entry, "why": converted})
                self.notes.append(Note(where, (entry or {}).get("method_name") if isinstance(entry, dict) else entry,
                                       converted))
            else:
                mapped += 1
                methods.extend(converted)
        _unique_labels(methods)
        if not methods:
            raise ConfigError("methods", "no entry of the TorchEsegeta config maps to an esegeta method: " + "; ".join(
                f"{u['entry']} ({u['value'].get('method_name') if isinstance(u['value'], dict) else u['value']}): "
                f"{u['why']}" for u in top.get("unmapped_entries", [])))

        config: dict[str, Any] = {"_comment": top, "model": model, "inputs": self.inputs(transform)}
        wrapper = self.wrapper(top)
        if wrapper is not None:
            config["wrapper"] = wrapper
        config["target"] = self.target(wrapper)
        config["runtime"] = self.runtime(top)
        config["output"] = {"dir": self.output_dir(top), "formats": ["npy", "png", "nii"] if self.dims == 3 else ["npy", "png"],
                            "figure": figure}
        config["methods"] = methods
        return Conversion(config, self.notes, mapped, unmapped)

    def model(self) -> dict[str, Any]:
        if not (self.args.model_factory or self.args.weights):
            raise ConfigError("--model-factory", "TorchEsegeta set the model in Python: give --model-factory "
                                                 "'file.py:callable' (and --weights), or --weights alone for TorchScript")
        out: dict[str, Any] = {}
        if self.args.model_factory:
            out["factory"] = _factory_path(self.args.model_factory, self.args.config_dir)
        if self.args.weights:
            out["weights"] = _relative(self.args.weights, self.args.config_dir)
        return out

    def inputs(self, transform: dict[str, Any]) -> dict[str, Any]:
        if not self.args.inputs:
            raise ConfigError("--inputs", "TorchEsegeta read its inputs in Python: give --inputs FILE_OR_FOLDER ...")
        out: dict[str, Any] = {"paths": [_relative(p, self.args.config_dir) for p in self.args.inputs],
                               "spatial_dims": self.dims}
        if self.dims == 3 and "isDepthFirst" in self.src:
            out["depth_axis"] = "first" if self.src["isDepthFirst"] else "last"
        elif "isDepthFirst" in self.src:
            self.note("isDepthFirst", self.src["isDepthFirst"], "2D: esegeta reads images and arrays channels first itself")
        out.update(transform)
        if self.args.normalize:
            out["normalize"] = self.args.normalize
        return out

    def transform(self, used: list[dict], top: dict) -> dict[str, Any]:
        """The ancestor's Resize → CenterCrop → Normalize, applied per method (inpt_transform_req);
        esegeta preprocesses every input once, for every method: applied when an enabled entry asks for it."""
        present = {k: self.src[k] for k in TRANSFORM_KEYS if k in self.src}
        wanted = [e for e in used if e.get("inpt_transform_req") is True]
        if not present:
            return {}
        if not wanted or self.dims == 3:
            why = ("torchvision's 2D Resize/CenterCrop/Normalize of images: not applied to 3D volumes (--normalize "
                   "sets inputs.normalize)" if wanted else "no enabled entry sets inpt_transform_req: the inputs are "
                   "fed as they are")
            for key, value in present.items():
                self.note(key, value, why, top, key)
            return {}
        out: dict[str, Any] = {}
        if "centre_crop" in present:
            out["resize"] = [int(present["centre_crop"])] * 2
            if present.get("resize") != present["centre_crop"]:
                self.note("resize", present.get("resize"), "esegeta resizes to the crop size directly "
                          "(inputs.resize); Resize then CenterCrop differ unless both sizes are equal", top, "resize")
            else:
                self.note("resize", present.get("resize"), "Resize(n) then CenterCrop(n) is inputs.resize [n, n] for "
                          "square inputs; a non-square input is stretched, not cropped", top, "resize")
        if "mean_vec" in present and "std_vec" in present:
            out["normalize"] = {"mean": present["mean_vec"], "std": present["std_vec"]}
        if len(wanted) != len(used):
            self.note("inpt_transform_req", [e.get("method_name") for e in used if e.get("inpt_transform_req") is not True],
                      "esegeta preprocesses the inputs once for every method: these enabled entries get the transform too",
                      top, "inpt_transform_req")
        return out

    def figure(self, entries: list[dict]) -> dict[str, str]:
        """output.figure: the most common of the entries' visualize_method and sign."""
        methods = Counter(e.get("visualize_method") for e in entries if e.get("visualize_method") in FIGURE_METHODS)
        signs = Counter(e.get("sign") for e in entries if e.get("sign") in FIGURE_SIGNS)
        return {"method": methods.most_common(1)[0][0] if methods else "blended_heat_map",
                "sign": signs.most_common(1)[0][0] if signs else "absolute_value"}

    def wrapper(self, top: dict) -> dict[str, Any] | None:
        nature = self.src.get("model_nature", "Classification")
        given = self.args.wrapper
        if nature not in ("Classification", "Segmentation"):
            self.note("model_nature", nature, "neither Classification nor Segmentation: read as Classification", top)
        if given is None:
            return dict(WRAPPERS["threshold_based"]) if nature == "Segmentation" else None
        if given in WRAPPERS:
            return dict(WRAPPERS[given])
        if given.lstrip().startswith("{"):
            try:
                value = json.loads(given)
            except json.JSONDecodeError as exc:
                raise ConfigError("--wrapper", f"not valid JSON: {exc}") from None
            return value
        return {"name": given}

    def target(self, wrapper: dict | None) -> int | str:
        target = self.args.target
        if target is None:
            # The ancestor's threshold wrapper scores [background, foreground]: explain the foreground.
            return 1 if wrapper is not None and wrapper.get("name") == "threshold" else "predicted"
        return target

    def runtime(self, top: dict) -> dict[str, Any]:
        src = self.src
        out: dict[str, Any] = {"devices": "auto"}
        if "share_gpu_threads" in src:
            threads = src["share_gpu_threads"]
            if isinstance(threads, int) and threads >= 1:
                out["threads_per_device"] = threads
            else:
                self.note("share_gpu_threads", threads, "not a positive whole number", top)
        if "amp_enbled" in src:
            out["amp"] = bool(src["amp_enbled"])
        if src.get("timeout_enabled"):
            seconds = src.get("timeout_time")
            if isinstance(seconds, (int, float)) and seconds > 0:
                out["timeout_s"] = seconds
            else:
                self.note("timeout_time", seconds, "not a positive number of seconds", top)
        elif "timeout_time" in src:
            self.note("timeout_time", src["timeout_time"], "timeout_enabled is false: no time limit", top)
        return out

    def output_dir(self, top: dict | None = None) -> str:
        """``--output-dir``, else the ancestor's ``output_path/model_dataset_run`` kept inside the new
        config's folder: an absolute or climbing ``output_path`` (written for another machine; a run
        once made a folder at the file-system root) becomes ``results``, with a note. What is not
        used is noted, never dropped silently."""
        read = {k: self.src[k] for k in ("output_path", "model_name", "dataset", "test_run") if self.src.get(k)}
        if self.args.output_dir:
            for key, value in read.items():
                self.note(key, value, "--output-dir names the results folder instead", top, key)
            return _relative(self.args.output_dir, self.args.config_dir)
        name = "_".join(str(read[k]) for k in ("model_name", "dataset", "test_run") if k in read)
        base = str(read.get("output_path") or "results")
        if Path(base).is_absolute() or ".." in Path(base).parts or re.match(r"^[A-Za-z]:[\\/]", base):
            self.note("output_path", base, "an absolute or climbing path of the ancestor's machine: results go to "
                                           "'results' beside the new config (or --output-dir)", top, "output_path")
            base = "results"
        return str(Path(base) / re.sub(r"[^A-Za-z0-9._+-]", "_", name)) if name else base

    def patch(self) -> dict[str, Any] | None:
        size = self.src.get("patch_size")
        if not isinstance(size, int) or size <= 0:
            return None
        overlap = self.src.get("patch_overlap") or 0
        return {"size": [size] * self.dims, "overlap": [int(overlap)] * self.dims, "mode": "local", "blend": "average"}

    # -- one entry -----------------------------------------------------------------
    def entry(self, where: str, entry: Any, transform: dict, figure: dict) -> list[dict[str, Any]] | str:
        """The esegeta entries of one ancestor entry, or why there is none."""
        from esegeta.spec.registry import all_methods

        if not isinstance(entry, dict) or "method_name" not in entry:
            return "not a method entry (a JSON object with 'method_name')"
        name = entry["method_name"]
        mapping = METHODS.get(name)
        if mapping is None:
            return f"{name!r} is not a TorchEsegeta method this converter knows"
        spec = all_methods().get(mapping.id)
        if spec is None:
            return f"{mapping.id} is not in this esegeta's registry"
        if self.dims not in spec.dims:
            return f"{mapping.id} (the equivalent of {name}) runs on {'/'.join(f'{d}D' for d in spec.dims)} inputs only"
        comment: dict[str, Any] = {"torchesegeta": name}
        if mapping.why != MethodMap.why:
            comment["mapped_as"] = mapping.why
        if "_comment" in entry:
            comment["ancestor_comments"] = entry["_comment"]
        out: dict[str, Any] = {"id": mapping.id, "label": _label(name), "enabled": entry.get("use") is True}
        params: dict[str, Any] = dict(mapping.fixed)
        noise: dict[str, Any] = {}

        for key in sorted(set(entry) - ENTRY_READ):
            if key == "device_id" and self.args.keep_devices:
                out["device"] = entry[key]
                continue
            self.note(f"{where}.{key}", entry[key], ENTRY_DROPPED.get(key, "not a TorchEsegeta entry key this converter "
                                                                          "knows"), comment, key)
        for key in ("visualize_method", "sign"):
            value = entry.get(key)
            if value not in (None, "") and value != figure["method" if key == "visualize_method" else "sign"]:
                self.note(f"{where}.{key}", value, f"one figure setting for every method: output.figure uses "
                                                   f"{figure['method' if key == 'visualize_method' else 'sign']!r}",
                          comment, key)
        if entry.get("patch_required") is True:
            patch = self.patch()
            if patch is None:
                self.note(f"{where}.patch_required", True, "patch_size is -1 (no patches): explained whole", comment,
                          "patch_required")
            else:
                out["patch"] = patch
        if entry.get("inpt_transform_req") is True and not out["enabled"] and not transform:
            self.note(f"{where}.inpt_transform_req", True, "the transform is not applied (no enabled entry asks for it); "
                      "enabling this entry alone changes nothing", comment, "inpt_transform_req")

        keywords = entry.get("keywords") or {}
        if not isinstance(keywords, dict):
            self.note(f"{where}.keywords", keywords, "not a JSON object", comment, "keywords")
            keywords = {}
        disabled_because: str | None = None
        for key, value in keywords.items():
            at = f"{where}.keywords.{key}"
            if key == "layer" and mapping.layer:
                layer, missing = self.layer(str(value).split(":")[0] if mapping.layer == "lucent" else str(value),
                                            lucent=mapping.layer == "lucent")
                out["layer"] = layer
                if mapping.layer == "lucent" and ":" in str(value):
                    params["n_channel"] = int(str(value).split(":")[1])
                disabled_because = disabled_because or missing
            elif key in ("nt_type", "n_samples") and mapping.noise_tunnel:
                if value in ("", None):
                    continue
                noise[key] = value
            elif key in mapping.keywords:
                target = mapping.keywords[key]
                if target in mapping.layer_params:
                    value, missing = self.layer(str(value))
                    disabled_because = disabled_because or missing
                params[target] = value
            else:
                self.note(at, value, KEYWORDS_DROPPED.get(key, f"not a keyword of {name} this converter knows"),
                          comment, f"keywords.{key}")
        if mapping.layer and "layer" not in out and spec.needs_layer:
            disabled_because = disabled_because or "the ancestor's entry names no layer; set 'layer' and 'enabled': true"
        _occlusion_shapes(params)

        if params:
            out["params"] = params
        if disabled_because and out["enabled"]:
            out["enabled"] = False
            self.note(f"{where}.keywords.layer", keywords.get("layer"), f"entry disabled: {disabled_because}", comment,
                      "enabled")
        elif disabled_because:
            self.note(f"{where}.keywords.layer", keywords.get("layer"), f"(entry not enabled) {disabled_because}", comment,
                      "layer")
        results = [out]
        if noise.get("nt_type"):
            if self.dims == 3:
                self.note(f"{where}.keywords.nt_type", noise, NO_NOISE_TUNNEL_3D, comment, "keywords.nt_type")
            else:
                tunnel = {"nt_type": noise["nt_type"]}
                if isinstance(noise.get("n_samples"), int):
                    tunnel["nt_samples"] = noise["n_samples"]
                second = {**out, "label": out["label"] + "-noise_tunnel", "noise_tunnel": tunnel}
                results.append(second)
        elif "n_samples" in noise:
            self.note(f"{where}.keywords.n_samples", noise["n_samples"], "nt_type is empty: no noise tunnel", comment,
                      "keywords.n_samples")
        for result in results:
            result["_comment"] = comment
        return results


def summary(notes: list[Note]) -> list[str]:
    """One line per note, but a key of many entries with one reason is one line (``methods[*].title``)."""
    groups: dict[tuple[str, str], list[Note]] = {}
    for note in notes:
        pattern = re.sub(r"^(\w+)\[\d+\]", r"\1[*]", note.where)
        groups.setdefault((pattern if pattern != note.where else note.where, note.reason), []).append(note)
    lines = []
    for (pattern, reason), members in groups.items():
        if len(members) == 1:
            lines.append(str(members[0]))
        else:
            lines.append(f"{pattern} ({len(members)} entries): {reason}")
    return lines


def _label(name: str) -> str:
    label = re.sub(r"[^A-Za-z0-9._+-]", "-", name)
    return label if re.match(r"^[A-Za-z0-9]", label) else "m" + label


def _unique_labels(methods: list[dict[str, Any]]) -> None:
    seen: Counter[str] = Counter()
    for m in methods:
        seen[m["label"]] += 1
        if seen[m["label"]] > 1:
            m["label"] = f"{m['label']}-{seen[m['label']]}"


def _occlusion_shapes(params: dict[str, Any]) -> None:
    """The ancestor wrote Occlusion's window as a string ``"3,11,11"`` and strides as one number."""
    window = params.get("sliding_window_shapes")
    if isinstance(window, str):
        params["sliding_window_shapes"] = window = [int(v) for v in window.replace(" ", "").split(",") if v]
    strides = params.get("strides")
    if isinstance(strides, str):
        params["strides"] = strides = [int(v) for v in strides.replace(" ", "").split(",") if v]
    if isinstance(strides, int) and isinstance(window, list):
        params["strides"] = [strides] * len(window)


def _relative(path: str, base: Path) -> str:
    """``path`` (as given, relative to the working folder) relative to the new config's folder."""
    p = Path(path).expanduser().resolve()
    try:
        return os.path.relpath(p, base.resolve())
    except ValueError:  # another drive (Windows)
        return str(p)


def _factory_path(factory: str, base: Path) -> str:
    """``file.py:callable`` with the file made relative to the new config; ``module:callable`` as given."""
    file, sep, name = factory.rpartition(":")
    if sep and file.endswith(".py"):
        return f"{_relative(file, base)}:{name}"
    return factory


def convert(source: dict[str, Any] | str | Path, args: Arguments, *, check_layers: bool = True) -> Conversion:
    """An esegeta config from a TorchEsegeta config (a dict, or a file :func:`read` reads).

    With ``check_layers`` the model is built (``args.model_factory``/``weights``) and every
    layer name looked up in it; an enabled entry whose layer the model lacks is disabled, with
    the reason (``args.layer_map`` renames the ancestor's layers first)."""
    data = read(source) if isinstance(source, (str, Path)) else source
    modules = _module_names(args) if check_layers else None
    return _Converter(data, args, modules).run()


def _module_names(args: Arguments) -> Callable[[], set[str]]:
    def load() -> set[str]:
        from esegeta.io.loading import load_model

        model_cfg: dict[str, Any] = {}
        if args.model_factory:
            model_cfg["factory"] = _factory_path(args.model_factory, args.config_dir)
        if args.weights:
            model_cfg["weights"] = _relative(args.weights, args.config_dir)
        model = load_model(model_cfg, args.config_dir)
        return {name for name, _ in model.named_modules() if name}

    return load


def write(conversion: Conversion, path: str | Path) -> None:
    Path(path).write_text(json.dumps(conversion.config, indent=2) + "\n", encoding="utf-8")
