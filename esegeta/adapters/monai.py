"""MONAI's ``monai.visualize`` (https://monai.io): the eight explainers, under the names MONAI users call.

Upstream's calling conventions, mapped to the spec:

- ``CAM``, ``GradCAM``, ``GradCAMpp``: ``Cls(nn_module=model, target_layers=NAME, **init)(x,
  class_idx=...)``; the layer is the entry's ``layer`` (its name inside the model upstream sees),
  ``fc_layers`` (CAM) a module name of the user's model. The map is upsampled to the input
  (bi/trilinear) and post-processed by MONAI's ``default_normalizer``, which maps each map's
  (min, max) to (1, 0): upstream flips magnitudes, and esegeta returns it as computed.
- ``VanillaGrad``, ``SmoothGrad``, ``GuidedBackpropGrad``, ``GuidedBackpropSmoothGrad``:
  ``Cls(model, **init)(x, index=...)``, one input per call (upstream's rule); guided
  backpropagation swaps every module whose name contains ``relu`` for the span of the call.
- ``OcclusionSensitivity``: ``Cls(nn_module=model, **init)(x, b_box=...)`` slides a
  ``mask_size`` occluder over the input through MONAI's sliding-window inferer (Gaussian-blended
  by default) and returns the (activated) score of every class per voxel; esegeta keeps the
  target's channel, ``(1, 1, *spatial)`` (the inferer's MetaTensor as a plain tensor).

Segmentation: with a wrapper the model is the wrapped one, whose column ``k`` is the region
score of class ``k`` (frozen masks), so ``class_idx=k``/``index=k`` explains it. MONAI's
progress bars (``verbose``) default to off here (esegeta shows its own). MONAI registers its
CAM hooks without handles and sets ``inplace=False`` on hooked layers: the one guard undoes
both on the prepared copy.
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping
from functools import cache
from typing import Any

from esegeta.errors import ConfigError, did_you_mean
from esegeta.spec import cost
from esegeta.spec.cost import Passes
from esegeta.spec.params import BOOL, POSITIVE_INT, Check, check_table, number, positive_int
from esegeta.spec.registry import PER_INPUT, ROWS, Call, Library, MethodSpec, keyword_parameters, register

#: MONAI draws SmoothGrad's noise from torch's RNG only.
LIBRARY = Library("monai", "monai", "monai", ("monai",), uses_global_rng=False, reads_samples=False,
                  batch_params={"n_batch": None},
                  reference="MONAI Consortium, monai.visualize, https://monai.io")

#: Upstream arguments a JSON config cannot set: esegeta supplies them, or they take Python objects.
NOT_CONFIGURABLE = frozenset({
    "self", "nn_module", "model", "target_layers", "upsampler", "postprocessing", "x", "class_idx", "index",
    "layer_idx", "retain_graph",
})
#: esegeta's own default for an upstream parameter (results unchanged): MONAI's tqdm bars off.
QUIET = {"verbose": False}


def _sizes(v: Any) -> bool:
    return positive_int(v) or (isinstance(v, list) and len(v) > 0 and all(map(positive_int, v)))


CHECKS: Mapping[str, Check] = {
    "verbose": BOOL,
    "magnitude": BOOL,
    "activate": BOOL,
    "n_samples": POSITIVE_INT,
    "n_batch": POSITIVE_INT,
    "stdev_spread": (lambda v: number(v) and v >= 0, "a number >= 0"),
    "overlap": (lambda v: number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "mask_size": (_sizes, "a positive integer or one per spatial axis"),
    "mode": (lambda v: v in ("gaussian", "mean_patch", "mean_img") or (number(v) and not isinstance(v, int)),
             "'gaussian', 'mean_patch', 'mean_img' or a float (the occluder's value)"),
    "b_box": (lambda v: v is None or (isinstance(v, list) and len(v) % 2 == 0 and len(v) > 0
                                      and all(isinstance(i, int) and not isinstance(i, bool) and i >= -1 for i in v)),
              "null or [min1, max1, min2, max2, ...] per spatial axis (inclusive; -1: the whole axis)"),
    "fc_layers": (lambda v: isinstance(v, str), "the name of the model's fully-connected layer"),
}


def _name_in(root, module) -> str:
    """The name ``module`` has inside ``root`` (MONAI hooks layers by name)."""
    return next(name for name, m in root.named_modules() if m is module)


class MonaiAdapter:
    """The one adapter behind every ``monai.visualize`` explainer."""

    @staticmethod
    def _module():
        import monai.visualize

        return monai.visualize

    @cache
    def parameters(self, spec: MethodSpec) -> Mapping[str, inspect.Parameter]:
        cls = getattr(self._module(), spec.name)
        found = {**keyword_parameters(cls.__init__, NOT_CONFIGURABLE), **keyword_parameters(cls.__call__, NOT_CONFIGURABLE)}
        return {name: p.replace(default=QUIET[name]) if name in QUIET else p for name, p in found.items()}

    def check_value(self, name: str, value: Any, path: str) -> None:
        """Check a JSON value before anything runs."""
        check_table(CHECKS, name, value, path)

    def run(self, spec: MethodSpec, call: Call):
        import torch

        from esegeta.attribution.architectures import network

        cls = getattr(self._module(), spec.name)
        init_names = frozenset(inspect.signature(cls.__init__).parameters)
        params = {**{k: v for k, v in QUIET.items() if k in init_names}, **call.params}
        if isinstance(params.get("mask_size"), list):
            params["mask_size"] = tuple(params["mask_size"])
        if spec.name == "CAM":  # a name of the user's model (upstream's default "fc" too), whatever wraps it
            name = params.get("fc_layers", "fc")
            modules = dict(network(call.network).named_modules())
            if name not in modules:
                raise ConfigError("params.fc_layers", f"no module {name!r} in the model" + did_you_mean(name, modules))
            params["fc_layers"] = lambda _model, fc=modules[name]: fc
        init_kw = {k: v for k, v in params.items() if k in init_names}
        call_kw = {k: v for k, v in params.items() if k not in init_names}
        targets = call.targets
        classes = targets.ints() if targets is not None else [None] * call.inputs.shape[0]
        x = call.inputs.detach()
        kind = KINDS[spec.name]
        if spec.name in GUIDED:
            _single_sites(call.forward)
        if kind == "cam":
            explainer = cls(nn_module=call.forward, target_layers=_name_in(call.forward, call.layer), **init_kw)
            if spec.name == "CAM":  # upstream picks one class per input from a sequence
                return explainer(x, class_idx=classes, **call_kw).float()
            if len(set(classes)) == 1:  # GradCAM's score is logits[:, class_idx]: one class for the batch
                return explainer(x, class_idx=classes[0], **call_kw).float()
            return torch.cat([explainer(x[i:i + 1], class_idx=c, **call_kw) for i, c in enumerate(classes)]).float()
        explainer = cls(call.forward, **init_kw) if kind == "gradient" else cls(nn_module=call.forward, **init_kw)
        maps = []
        for i, c in enumerate(classes):  # upstream takes one input per call
            one = x[i:i + 1].clone()
            if kind == "gradient":
                maps.append(explainer(one, index=c, **call_kw))
            else:
                sensitivity, _ = explainer(one, **call_kw)
                sensitivity = sensitivity.as_tensor() if hasattr(sensitivity, "as_tensor") else sensitivity
                maps.append(sensitivity[:, c:c + 1] if c is not None else sensitivity)
        return torch.cat(maps).detach().float()


ADAPTER = MonaiAdapter()

#: The explainers that swap every module whose name contains ``relu`` for MONAI's guided ReLU.
GUIDED = frozenset({"GuidedBackpropGrad", "GuidedBackpropSmoothGrad"})


def _single_sites(model) -> None:
    """Put back, for this call, the one module the prepared copy split per call site
    (:class:`esegeta.attribution.prepare.CallSites`, named ``relu.sites.k``): MONAI replaces a
    ``relu`` module and then looks for the ``relu.sites.k`` it has just removed. One module at every
    site is what MONAI sees on the user's model; the guard restores the split afterwards."""
    from esegeta.attribution.prepare import CallSites

    for name, module in list(model.named_modules()):
        if isinstance(module, CallSites):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, module.sites[0])


def _occlusion_passes(values, x, layer_shape) -> Passes:
    """One forward row per window position of MONAI's sliding-window inferer over the (b_box-cropped)
    input: per axis ``ceil((size - mask) / int(mask · (1 - overlap))) + 1`` (1 where the mask spans it)."""
    spatial = list(x.shape[2:])
    masks = cost.as_list(values.get("mask_size"), len(spatial))
    overlap = values.get("overlap")
    if masks is None or not number(overlap):
        return Passes(None, None, False, "mask_size or overlap not known")
    box = values.get("b_box")
    if isinstance(box, list) and len(box) == 2 * len(spatial):
        edges = [(m - 1) // 2 for m in masks]
        spatial = [(s if hi == -1 else min(hi + e, s)) - max(lo - e, 0)
                   for s, lo, hi, e in zip(spatial, box[::2], box[1::2], edges)]
        masks = [min(m, s) for m, s in zip(masks, spatial)]
    strides = [m if m == s else max(1, int(m * (1 - float(overlap)))) for m, s in zip(masks, spatial)]
    return Passes(cost.windows(spatial, masks, strides, ceil=True), 0)


_GRADIENT, _FORWARD = cost.gradient, cost.forward_only
_CLS = ("classification",)

#: name → (kind, needs_layer, tasks, reference, passes, batch layout, quick params).
#: CAM reads a Linear layer's weights at every position of the layer (a classifier's head);
#: GradCAMpp weighs gradients by exp(score): a wrapper's region sums overflow it (inf · 0 = NaN), classifiers only.
#: The gradient explainers and occlusion take one input per call upstream.
TABLE: Mapping[str, tuple] = {
    "CAM": ("cam", True, _CLS, "Zhou et al. 2016, arXiv:1512.04150", _FORWARD, ROWS, {}),
    "GradCAM": ("cam", True, None, "Selvaraju et al. 2017, arXiv:1610.02391", _GRADIENT, ROWS, {}),
    "GradCAMpp": ("cam", True, _CLS, "Chattopadhyay et al. 2018, arXiv:1710.11063", _GRADIENT, ROWS, {}),
    "VanillaGrad": ("gradient", False, None, "Simonyan et al. 2014, arXiv:1312.6034", _GRADIENT, PER_INPUT, {}),
    "SmoothGrad": ("gradient", False, None, "Smilkov et al. 2017, arXiv:1706.03825", cost.steps("n_samples"),
                   PER_INPUT, {"n_samples": 2}),
    "GuidedBackpropGrad": ("gradient", False, None, "Springenberg et al. 2015, arXiv:1412.6806", _GRADIENT,
                           PER_INPUT, {}),
    "GuidedBackpropSmoothGrad": ("gradient", False, None, "Springenberg et al. 2015 with Smilkov et al. 2017",
                                 cost.steps("n_samples"), PER_INPUT, {"n_samples": 2}),
    "OcclusionSensitivity": ("occlusion", False, None, "Zeiler & Fergus 2014, arXiv:1311.2901 (MONAI's Gaussian "
                             "occluder)", _occlusion_passes, PER_INPUT, {"mask_size": 4, "overlap": 0.0}),
}
#: name → how upstream is called (see the module docstring).
KINDS = {name: row[0] for name, row in TABLE.items()}

for _name, (_kind, _layer, _tasks, _ref, _passes, _layout, _quick) in TABLE.items():
    register(MethodSpec(
        library=LIBRARY, name=_name, kind="attribution", adapter=ADAPTER, needs_layer=_layer,
        **({"tasks": _tasks} if _tasks else {}), quick_params=_quick, reference=_ref,
        passes=_passes, batch_layout=_layout, axiom="none",
    ))
