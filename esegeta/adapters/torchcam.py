"""TorchCAM (PyPI ``torchcam``, https://github.com/frgfm/torch-cam): every CAM extractor it ships.

One generic adapter serves the table, with upstream's calling convention::

    with Cls(model, target_layer=layer, **init_params) as extractor:
        scores = model(x)
        maps = extractor(class_idx=[t per input], scores=scores, **call_params)

Segmentation: with a wrapper, the model is the wrapped one (column ``k`` is
``sum(act(out)_k · M_k)`` over the mask frozen on the unperturbed input), so ``class_idx=k``
explains that region's score. The result is upstream's map at the layer's resolution
(ReLU'd, scaled to [0, 1] per input unless ``normalized`` is false), returned as
``(B, 1, *layer spatial)`` float32: a ``layer`` kind, as Captum's LayerGradCam. TorchCAM's
Score-CAM family upsamples trilinearly, so it runs on volumes too (pytorch-grad-cam's does not).
Hooks are removed through the extractor's context manager and the one guard.
``RefineCAM`` fuses two or more layers: its entry's ``layer`` is a list of names (upstream's
``target_layer`` list); its base CAM (``base_method``, Grad-CAM++ by default) runs on every layer,
and the maps, each scaled to [0, 1], are resized to the largest layer's grid (bi/trilinear) and
multiplied: ``(B, 1, *largest layer spatial)``.
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

#: TorchCAM draws noise from torch's RNG only (SS-CAM, SmoothGrad-CAM++).
LIBRARY = Library("torchcam", "torchcam", "torchcam", ("torchcam",), uses_global_rng=False, reads_samples=False,
                  batch_params={"batch_size": None},
                  reference="Fernandez, TorchCAM, https://github.com/frgfm/torch-cam")

#: Upstream arguments a JSON config cannot set: esegeta supplies them, or they take Python objects.
NOT_CONFIGURABLE = frozenset({
    "self", "model", "target_layer", "input_shape", "enable_hooks", "reshape_transform", "score_projection",
    "class_idx", "scores", "targets", "retain_graph", "target_shape",
})
#: Parameters naming a module of the model (resolved on the prepared copy).
LAYER_PARAMS = frozenset({"fc_layer"})
#: FinerCAM's and RefineCAM's ``base_method``: the gradient CAMs FinerCAM accepts (RefineCAM takes any).
BASE_METHODS = ("GradCAM", "GradCAMpp", "LayerCAM")

CHECKS: Mapping[str, Check] = {
    "normalized": BOOL,
    "batch_size": POSITIVE_INT,
    "num_samples": POSITIVE_INT,
    "num_references": POSITIVE_INT,
    "prefix_tokens": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an integer >= 0"),
    "std": (lambda v: number(v) and v >= 0, "a number >= 0"),
    "gamma": (lambda v: number(v) and v >= 0, "a number >= 0"),
    "grid_shape": (lambda v: v is None or (isinstance(v, list) and len(v) == 2 and all(map(positive_int, v))),
                   "null or [height, width] of the patch grid"),
    "comparison_idx": (lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 0)
                       or (isinstance(v, list) and all(isinstance(i, int) and i >= 0 for i in v)),
                       "null, a class index or a list of class indices"),
    "fc_layer": (lambda v: v is None or isinstance(v, str), "null or the name of the model's Linear layer"),
}


class TorchCamAdapter:
    """The one adapter behind every TorchCAM extractor."""

    @staticmethod
    def _methods():
        from esegeta.compat import import_torchvision

        import_torchvision()  # torchcam imports nothing of torchvision, but LeGrad's models do
        import torchcam.methods

        return torchcam.methods

    @cache
    def parameters(self, spec: MethodSpec) -> Mapping[str, inspect.Parameter]:
        cls = getattr(self._methods(), spec.name)
        found = {**keyword_parameters(cls.__init__, NOT_CONFIGURABLE), **keyword_parameters(cls.__call__, NOT_CONFIGURABLE)}
        if "base_method" in found:  # a class: shown (and set) by its name
            found["base_method"] = found["base_method"].replace(default=found["base_method"].default.__name__)
        return found

    def check_value(self, name: str, value: Any, path: str) -> None:
        """Check a JSON value before anything runs."""
        if name == "base_method":
            if value not in BASE_METHODS:
                raise ConfigError(path, f"{value!r} is not a CAM FinerCAM accepts" + did_you_mean(value, BASE_METHODS))
            return
        check_table(CHECKS, name, value, path)

    def run(self, spec: MethodSpec, call: Call):
        import torch

        from esegeta.attribution.architectures import network

        methods = self._methods()
        user_named = network(call.network)  # the user's model inside the prepared copy: names as the user knows them
        cls = getattr(methods, spec.name)
        init_names = frozenset(inspect.signature(cls.__init__).parameters)
        params = dict(call.params)
        if params.get("base_method") is not None:
            params["base_method"] = getattr(methods, params["base_method"])
        if params.get("grid_shape") is not None:
            params["grid_shape"] = tuple(params["grid_shape"])
        for name in LAYER_PARAMS & params.keys():
            if params[name] is not None:
                params[name] = _module(user_named, name, params[name])
        init_kw = {k: v for k, v in params.items() if k in init_names}
        call_kw = {k: v for k, v in params.items() if k not in init_names}
        # LeGrad projects a block's tokens with the classifier's own head (torchvision's ViT): the network itself
        model = user_named if spec.name in NETWORK_MODEL else call.forward
        x = call.inputs.detach()
        targets = call.targets
        class_idx = targets.ints() if targets is not None else None

        with cls(model, target_layer=call.layer, **init_kw) as extractor, torch.enable_grad():
            scores = model(x)
            maps = extractor(class_idx=class_idx, scores=scores, **call_kw)
        return maps[0].detach().float().unsqueeze(1)


def _module(network, param: str, name: str):
    """The module ``name`` of the prepared network, or a ConfigError naming the parameter."""
    modules = dict(network.named_modules())
    if name not in modules:
        raise ConfigError(f"params.{param}", f"no module {name!r} in the model" + did_you_mean(name, modules))
    return modules[name]


ADAPTER = TorchCamAdapter()


def vit_block(model, context) -> list[str]:
    """LeGrad's pre-flight check: the layer is a transformer block of a torchvision VisionTransformer
    (a ``self_attention`` nn.MultiheadAttention child; the model's ``encoder.ln`` and ``heads`` project
    the block's tokens to class scores, as upstream's default ``score_projection`` does)."""
    from torch import nn

    if context is None or context.layer is None:
        return []
    try:
        block = model.get_submodule(context.layer)
    except AttributeError:
        return []
    found = []
    if not isinstance(getattr(block, "self_attention", None), nn.MultiheadAttention):
        found.append(f"layer {context.layer!r} is not a transformer block with a self_attention nn.MultiheadAttention "
                     "(a torchvision VisionTransformer's encoder.layers.encoder_layer_N): choose one, or use "
                     "torchcam.GradCAM")
    if not isinstance(getattr(getattr(model, "encoder", None), "ln", None), nn.Module) or \
            not isinstance(getattr(model, "heads", None), nn.Module):
        found.append("LeGrad projects a block's tokens with the model's encoder.ln and heads (torchvision's "
                     "VisionTransformer); this model has none: use torchcam.GradCAM")
    return found

#: Methods that call the network itself, not the wrapped model (LeGrad reads the model's ``encoder`` and ``heads``).
NETWORK_MODEL = frozenset({"LeGrad"})


def _per_channel(samples: str | None = None) -> cost.Formula:
    """The Score-CAM family: one forward row per channel of the layer (times ``samples``), plus the
    adapter's forward that fills the hooks and upstream's unperturbed forward."""
    def formula(values, x, layer_shape) -> Passes:
        if layer_shape is None or len(layer_shape) < 2:
            return Passes(None, None, False, "one pass per channel of the layer: its size is known at run time")
        n = 1
        if samples is not None:
            if not cost.count(values.get(samples)):
                return Passes(None, None, False, f"{samples} not known")
            n = int(values[samples])
        return Passes(int(layer_shape[1]) * n + 2, 0)
    return formula


def _smooth_passes(values, x, layer_shape) -> Passes:
    """SmoothGrad-CAM++: the adapter's forward, then one forward and backward row per noisy sample."""
    n = values.get("num_samples")
    return Passes(int(n) + 1, int(n)) if cost.count(n) else Passes(None, None, False, "num_samples not known")


_GRADIENT, _FORWARD = cost.gradient, cost.forward_only
_CLS = ("classification",)

#: name → (dims, tasks, reference, passes, batch layout, quick params). The gradient CAMs explain a
#: batch as rows (one backward of the summed target scores); the Score-CAM family interleaves
#: channel rows of several inputs and SmoothGrad-CAM++ draws noise for the whole batch: one input
#: per call. CAM reads the classifier's last Linear layer (``fc_layer``); FinerCAM contrasts the
#: target with the classes of closest score (meaningless for a wrapper's region sums); LeGrad
#: explains torchvision ViT blocks with the model's own head: classifiers only.
TABLE: Mapping[str, tuple] = {
    "CAM": ((2, 3), _CLS, "Zhou et al. 2016, arXiv:1512.04150", _FORWARD, ROWS, {}),
    "ScoreCAM": ((2, 3), None, "Wang et al. 2020, arXiv:1910.01279", _per_channel(), PER_INPUT, {}),
    "SSCAM": ((2, 3), None, "Wang et al. 2020, arXiv:2006.14255", _per_channel("num_samples"), PER_INPUT,
              {"num_samples": 1}),
    "ISCAM": ((2, 3), None, "Naidu et al. 2020, arXiv:2010.03023", _per_channel("num_samples"), PER_INPUT,
              {"num_samples": 1}),
    "GradCAM": ((2, 3), None, "Selvaraju et al. 2017, arXiv:1610.02391", _GRADIENT, ROWS, {}),
    "GradCAMpp": ((2, 3), None, "Chattopadhyay et al. 2018, arXiv:1710.11063", _GRADIENT, ROWS, {}),
    "SmoothGradCAMpp": ((2, 3), None, "Omeiza et al. 2019, arXiv:1908.01224", _smooth_passes, PER_INPUT,
                        {"num_samples": 1}),
    "XGradCAM": ((2, 3), None, "Fu et al. 2020, arXiv:2008.02312", _GRADIENT, ROWS, {}),
    "LayerCAM": ((2, 3), None, "Jiang et al. 2021, doi:10.1109/TIP.2021.3089943", _GRADIENT, ROWS, {}),
    "FinerCAM": ((2, 3), _CLS, "Zhang et al. 2025, arXiv:2501.11309", _GRADIENT, ROWS, {}),
    "LeGrad": ((2,), _CLS, "Bousselham et al. 2024, arXiv:2404.03214", _GRADIENT, ROWS, {}),
    "RefineCAM": ((2, 3), None, "How to Evaluate and Refine your CAM, arXiv:2605.14641", _GRADIENT, ROWS, {}),
}
#: Methods that fuse several layers → the least number of layers their entry lists (upstream's rule).
SEVERAL_LAYERS = {"RefineCAM": 2}

for _name, (_dims, _tasks, _ref, _passes, _layout, _quick) in TABLE.items():
    register(MethodSpec(
        library=LIBRARY, name=_name, kind="layer", adapter=ADAPTER, needs_layer=True, dims=_dims,
        fuses_layers=SEVERAL_LAYERS.get(_name, 0),
        **({"tasks": _tasks} if _tasks else {}), quick_params=_quick, reference=_ref,
        passes=_passes, batch_layout=_layout, axiom="none", preflight=vit_block if _name == "LeGrad" else None,
    ))
