"""Lucent (https://github.com/greentfrapp/lucent): feature visualisation with ``render_vis``.

Feature visualisation optimises an image, not an attribution: starting from noise (or
from the input, for deep dream), the image is changed step by step to maximise an
objective of the model (Olah et al. 2017, doi:10.23915/distill.00007; deep dream:
Mordvintsev et al. 2015). The result is an image of its own (kind ``image``).

``params`` pick lucent's objective and pass render_vis's keywords through:

- ``objective``: any objective of one layer that lucent ships, read from
  ``lucent.optvis.objectives`` with its own argument names (:func:`objectives`): ``channel``
  (``n_channel`` of the entry's ``layer``), ``neuron`` (``n_channel`` at ``x``, ``y``; lucent's
  centre by default), ``direction`` (``direction``: one number per channel), ``channel_weight``,
  ``neuron_weight``, ``localgroup_weight``, ``direction_neuron``, ``alignment``, ``diversity``;
  and esegeta's ``deepdream`` (the whole layer: Lucid's ``mean(activation**2)``, which lucent
  0.1.8 does not ship) and ``class`` (column ``target`` of the scores; with a wrapper, the
  wrapped segmentation score; the ``layer`` is not used). Layers are found on the prepared copy and named as lucent's
  ``hook_model`` names them (dots become underscores).
- ``param_f``: lucent's ``param.image`` keywords (``w``, ``h``, ``sd``, ``fft``,
  ``decorrelate``, ``channels``; the size defaults to the input's, the channels to the
  input's, 3 channels keep lucent's colour decorrelation), or ``"input"``: esegeta's
  pixel parameterisation that starts from the input itself (deep dream on the input; its
  values are not squashed into [0, 1]).
- ``optimizer``: ``{"name": "Adam", "lr": 0.05, ...}`` → ``torch.optim.<name>(params, **rest)``
  (absent: lucent's Adam with lr 0.05); ``transforms``: ``"standard"`` (lucent's default)
  or a list such as ``[{"pad": {"w": 4}}, {"jitter": {"d": 2}}]`` of lucent's transforms
  (the standard ones, pad 12 and jitter 8, are made for ~224-pixel images: on small inputs
  they dominate the image; use smaller ones or ``[]``).
- ``thresholds``, ``verbose``, ``preprocess``, ``progress``, ``fixed_image_size`` as in
  lucent. esegeta's defaults: ``preprocess`` false (the inputs already are what the model
  takes; lucent's ImageNet normalisation fits only RGB torchvision models),
  ``fixed_image_size`` the input's size (lucent upsamples to 224 otherwise, which breaks
  models of fixed input size and the masks a wrapper froze on the input), ``progress`` false.

The result is lucent's last image (the largest threshold), ``(B, C, H, W)``, one image per
input; earlier thresholds go to the extra output ``thresholds``. render_vis hooks every
module and never removes its hooks: the one guard (:func:`esegeta.attribution.guard.run_guarded`) removes
them, even on error; the parameters of the prepared copy do not collect gradients meanwhile. Runs are seeded by the caller
(lucent draws from torch's and numpy's generators). Lucent puts its images on
``cuda:0`` whenever CUDA exists: run the model there too.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from functools import cache
from types import MappingProxyType
from typing import Any, NamedTuple

from esegeta.errors import ConfigError, did_you_mean
from esegeta.hooks import removing
from esegeta.spec.params import BOOL, Check, channels_of_layer, check_table, index, number, positive_int
from esegeta.spec import cost
from esegeta.spec.cost import Passes
from esegeta.spec.registry import PER_INPUT, Call, Library, MethodSpec, keyword_parameters, register

#: Lucent draws its initial images from torch's and numpy's generators; it never reads the run's samples.
LIBRARY = Library("lucent", "torch-lucent", "lucent", ("lucent",), reads_samples=False,
                  reference="Olah et al. 2017, doi:10.23915/distill.00007")

#: render_vis arguments a JSON config cannot set: esegeta supplies them, or they show or save files.
NOT_CONFIGURABLE = frozenset({"model", "objective_f", "show_image", "save_image", "image_name", "show_inline"})


class Objective(NamedTuple):
    """One objective: the params it needs and may take, and its lucent objective from
    (lucent's objectives module, the lucent layer name, the args). ``on_scores`` objectives
    explain the scores (``call.forward``'s output, with the target in the args), the others
    the entry's layer of the prepared copy."""
    needs: frozenset[str]
    takes: frozenset[str]
    build: Callable[[Any, str, dict], Any]
    on_scores: bool = False


def _class(objectives, layer: str, args: dict):
    """Column ``target`` of the scores; a target per input scores input ``i`` on image ``i``."""
    target = args["target"]
    if isinstance(target.value, int):
        return objectives.channel(layer, target.value)
    return objectives.Objective.sum([objectives.channel(layer, t, batch=i) for i, t in enumerate(target.ints())])


def _deepdream(objectives, layer: str, args: dict):
    """Lucid's deepdream objective, mean(activation**2) (Mordvintsev et al. 2015), negated as lucent minimises."""
    return objectives.Objective(lambda hook: -(hook(layer) ** 2).mean(), "deepdream", f"Deepdream [{layer}]")


#: esegeta's objectives, which lucent does not ship; lucent's own are read from it (:func:`objectives`).
OWN_OBJECTIVES: Mapping[str, Objective] = {
    "deepdream": Objective(frozenset(), frozenset(), _deepdream),
    "class": Objective(frozenset(), frozenset(), _class, on_scores=True),
}
#: Objective arguments lucent takes as tensors (given in JSON as lists of numbers, one per channel).
TENSOR_ARGS = frozenset({"weight", "direction"})


def _upstream(name: str, objectives, layer: str, args: dict):
    import torch

    device = args.pop("device")
    return getattr(objectives, name)(layer, **{k: torch.tensor(v, dtype=torch.float32, device=device)
                                               if k in TENSOR_ARGS else v for k, v in args.items()})


@cache
def objectives() -> Mapping[str, Objective]:
    """Every objective of one layer that lucent ships (the functions of
    ``lucent.optvis.objectives`` its ``wrap_objective`` made, whose first parameter is ``layer``:
    channel, neuron, direction, alignment, diversity, ...), with their arguments read from their
    signatures (``batch`` is esegeta's), and esegeta's own."""
    found = {}
    for name, fn in vars(_lucent()[0]).items():
        inner = getattr(fn, "__wrapped__", None)
        parameters = list(inspect.signature(inner).parameters.values()) if callable(inner) else []
        if not parameters or parameters[0].name != "layer":
            continue
        args = [p for p in parameters[1:] if p.name != "batch"]
        found[name] = Objective(frozenset(p.name for p in args if p.default is p.empty),
                                frozenset(p.name for p in args), lambda o, layer, a, name=name: _upstream(name, o, layer, a))
    return MappingProxyType({**found, **OWN_OBJECTIVES})


def _objective_args() -> frozenset[str]:
    return frozenset().union(*(o.takes for o in objectives().values()))
#: lucent.optvis.param.image keywords a config may set (the batch is one image per input).
IMAGE_PARAMS = ("w", "h", "sd", "decorrelate", "fft", "channels")
#: The name under which the explained scores are hooked (the child of the model given to lucent).
SCORES = "scores"


def _size(v: Any) -> bool:
    return positive_int(v) or (isinstance(v, list) and len(v) == 2 and all(map(positive_int, v)))


#: name → (check, what a valid value is): checked before anything runs.
CHECKS: Mapping[str, Check] = {
    "objective": (lambda v: isinstance(v, str) and v in objectives(), "one of lucent's objectives of a layer "
                  "(channel, neuron, direction, ...), deepdream or class"),
    "n_channel": (index, "a channel index (an integer >= 0)"),
    "x": (lambda v: v is None or index(v), "a position in the layer (an integer >= 0) or null"),
    "y": (lambda v: v is None or index(v), "a position in the layer (an integer >= 0) or null"),
    "weight": (lambda v: v is None or (isinstance(v, list) and bool(v) and all(map(number, v))),
               "a list of numbers (one per channel of the layer)"),
    "direction": (lambda v: isinstance(v, list) and bool(v) and all(map(number, v)),
                  "a list of numbers (one per channel of the layer)"),
    "decay_ratio": (number, "a number"), "wx": (positive_int, "a positive integer"),
    "wy": (positive_int, "a positive integer"),
    "thresholds": (lambda v: isinstance(v, list) and bool(v) and all(map(positive_int, v)),
                   "a non-empty list of step counts (integers >= 1)"),
    "verbose": BOOL,
    "preprocess": BOOL,
    "progress": BOOL,
    "fixed_image_size": (lambda v: v is None or _size(v), "a size in pixels, [height, width] or null"),
}


def _lucent():
    from esegeta.compat import import_torchvision

    import_torchvision()  # lucent imports torchvision
    from lucent.optvis import objectives, param, render, transform

    return objectives, param, render, transform


@cache
def transforms() -> tuple[str, ...]:
    """The transform factories lucent defines (``lucent.optvis.transform``), but ``compose``:
    what a ``transforms`` list may name, read from upstream."""
    transform = _lucent()[3]
    return tuple(name for name, fn in vars(transform).items() if inspect.isfunction(fn) and not name.startswith("_")
                 and fn.__module__ == transform.__name__ and name != "compose")


def _keywords(fn) -> dict[str, inspect.Parameter]:
    return keyword_parameters(fn)


def _check_keywords(given: Mapping[str, Any], allowed: Mapping[str, Any], path: str, what: str) -> None:
    if not isinstance(given, dict):
        raise ConfigError(path, f"{what} takes an object of keyword arguments")
    for name in given:
        if name not in allowed:
            raise ConfigError(f"{path}.{name}", f"unknown keyword of {what}" + did_you_mean(name, allowed))


def _check_param_f(value: Any, path: str) -> None:
    if value == "input":
        return
    if not isinstance(value, dict):
        raise ConfigError(path, '"input" (start from the input) or an object of lucent param.image keywords '
                                f"({', '.join(IMAGE_PARAMS)})")
    _check_keywords(value, IMAGE_PARAMS, path, "lucent's param.image")
    for name in ("w", "h", "channels"):
        if name in value and not positive_int(value[name]):
            raise ConfigError(f"{path}.{name}", "must be a positive integer")
    for name in ("fft", "decorrelate"):
        if name in value and not isinstance(value[name], bool):
            raise ConfigError(f"{path}.{name}", "must be true or false")
    if "sd" in value and not (value["sd"] is None or (isinstance(value["sd"], (int, float)) and value["sd"] > 0)):
        raise ConfigError(f"{path}.sd", "must be a positive number or null")
    if value.get("decorrelate") and "channels" in value:
        raise ConfigError(f"{path}.decorrelate", "lucent decorrelates colours only when 'channels' is not set "
                                                 "(its default 3-channel image): remove 'channels' or 'decorrelate'")


def _optimizer_class(name: Any, path: str):
    import torch

    names = [n for n, c in vars(torch.optim).items() if isinstance(c, type) and issubclass(c, torch.optim.Optimizer)
             and c is not torch.optim.Optimizer]
    if name not in names:
        raise ConfigError(path, f"{name!r} is not an optimizer of torch.optim" + did_you_mean(str(name), names))
    return getattr(torch.optim, name)


def _check_optimizer(value: Any, path: str) -> None:
    if value is None:
        return
    if not isinstance(value, dict):
        raise ConfigError(path, 'an object such as {"name": "Adam", "lr": 0.05} (torch.optim.<name> and its keywords)')
    cls = _optimizer_class(value.get("name", "Adam"), f"{path}.name")
    allowed = {n for n in _keywords(cls) if n != "params"} | {"name"}
    _check_keywords(value, allowed, path, f"torch.optim.{cls.__name__}")


def _check_transforms(value: Any, path: str) -> None:
    if value is None or value == "standard":
        return
    if not isinstance(value, list):
        raise ConfigError(path, '"standard" (lucent\'s) or a list of lucent transforms, e.g. '
                                '[{"pad": {"w": 4}}, {"jitter": {"d": 2}}]; [] for none')
    transform = _lucent()[3]
    for i, item in enumerate(value):
        if not (isinstance(item, dict) and len(item) == 1):
            raise ConfigError(f"{path}[{i}]", 'one transform per item: {"<name>": {keywords}}, e.g. {"jitter": {"d": 2}}')
        (name, kwargs), = item.items()
        if name not in transforms():
            raise ConfigError(f"{path}[{i}]", f"unknown lucent transform {name!r}" + did_you_mean(name, transforms()))
        _check_keywords(kwargs, _keywords(getattr(transform, name)), f"{path}[{i}].{name}", f"lucent's {name}")


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _scores_module(model):
    """``model`` as the only child, named :data:`SCORES`, of a Sequential: lucent hooks
    children only, so its output (the scores, for the class objective) becomes a hooked layer."""
    from collections import OrderedDict

    from torch import nn

    return nn.Sequential(OrderedDict([(SCORES, model)]))


def _lucent_name(root, layer, path: str) -> str:
    """The name lucent's hook_model gives ``layer`` inside ``root`` (module path, dots → underscores)."""
    found = [n for n, m in root.named_modules() if m is layer]
    if not found:
        raise ConfigError(path, "the layer is not part of the model given to lucent")
    name = found[0].replace(".", "_")
    if any(n.replace(".", "_") == name and m is not layer for n, m in root.named_modules(remove_duplicate=False)):
        raise ConfigError(path, f"lucent names two modules {name!r} (it joins module names with '_'): pick another layer")
    return name


def _layer_shape(model, layer, x) -> tuple[int, ...]:
    """The shape of ``layer``'s output on ``x`` (one forward without gradients)."""
    import torch

    seen = []
    with removing(layer.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))):
        try:
            with torch.no_grad():
                model(x)
        except RuntimeError:
            if not seen:
                raise
    return seen[0]


@cache
def _parameters() -> Mapping[str, inspect.Parameter]:
    """``objective`` (required) and its arguments, then render_vis's configurable keywords."""
    render = _lucent()[2]
    own = inspect.Parameter("objective", inspect.Parameter.KEYWORD_ONLY)
    args = {n: inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None) for n in sorted(_objective_args())}
    upstream = {n: p for n, p in _keywords(render.render_vis).items() if n not in NOT_CONFIGURABLE}
    return {"objective": own, **args, **upstream}


def _sized(param_f: Callable[[], Any], size: tuple[int, int]) -> Callable[[], Any]:
    param_f.size = size
    return param_f


def _model_size(fixed_image_size: Any, image_size: tuple[int, int]) -> tuple[int, int]:
    """The (height, width) the model sees: render_vis resizes to ``fixed_image_size``, else
    to 224 when the image is smaller, else not at all."""
    if fixed_image_size is None:
        return (224, 224) if min(image_size) < 224 else image_size
    return tuple(fixed_image_size) if isinstance(fixed_image_size, tuple) else (fixed_image_size,) * 2


def _input_param(x):
    """esegeta's param_f "input": the pixels of the input as the learnable image."""
    image = x.detach().clone().requires_grad_(True)
    return [image], lambda: image


class LucentAdapter:
    """The adapter behind ``lucent.render_vis``."""

    def parameters(self, spec: MethodSpec) -> Mapping[str, inspect.Parameter]:
        return _parameters()

    def check_value(self, name: str, value: Any, path: str) -> None:
        if name in CHECKS:
            check_table(CHECKS, name, value, path)
        elif name == "param_f":
            _check_param_f(value, path)
        elif name == "optimizer":
            _check_optimizer(value, path)
        elif name == "transforms":
            _check_transforms(value, path)

    def _objective(self, lucent_objectives, params: dict, call: Call, model, size) -> Any:
        """The lucent objective ``params`` names, on the model given to render_vis."""
        import torch

        from esegeta.attribution.wrappers import WrappedModel

        kind = params.pop("objective")
        objective = objectives()[kind]
        given = {k: params.pop(k) for k in _objective_args() if params.get(k) is not None}
        for k in _objective_args():
            params.pop(k, None)
        for name in objective.needs - set(given):
            raise ConfigError(f"params.{name}", f"objective {kind!r} needs params.{name}")
        for name in set(given) - objective.takes:
            raise ConfigError(f"params.{name}", f"objective {kind!r} takes no {name}; remove it")
        if objective.on_scores:
            if size != tuple(call.inputs.shape[2:]) and isinstance(call.forward, WrappedModel):
                raise ConfigError("params.fixed_image_size", "with a wrapper the model must see images of the "
                                  "input's size (its masks are frozen on the input): remove fixed_image_size")
            if call.targets is None:
                raise ConfigError("target", f"the {kind} objective needs a target (a class, or a wrapped column)")
            return objective.build(lucent_objectives, SCORES, {"target": call.targets})
        name = _lucent_name(model, call.layer, "layer")
        probe = torch.zeros(1, call.inputs.shape[1], *size, device=call.inputs.device)
        shape = _layer_shape(model, call.layer, probe)
        if given.get("n_channel", 0) >= shape[1]:
            raise ConfigError("params.n_channel", f"the layer has {shape[1]} channels (its output is {shape})")
        if {"x", "y"} & objective.takes and len(shape) != 4:
            raise ConfigError("layer", f"the {kind} objective needs a layer with a (B, C, H, W) output, not {shape}")
        for axis, key in ((2, "x"), (3, "y")):  # lucent reads x along axis 2 and y along axis 3
            if key in given and given[key] >= shape[axis]:
                raise ConfigError(f"params.{key}", f"{key} is beyond the layer's output {shape}")
        for key in TENSOR_ARGS & set(given):
            if len(given[key]) != shape[1]:
                raise ConfigError(f"params.{key}", f"{key} needs one number per channel of the layer: {shape[1]}, "
                                                   f"not {len(given[key])}")
        return objective.build(lucent_objectives, name, {**given, "device": call.inputs.device})

    def _param_f(self, value: Any, x) -> Callable[[], Any]:
        """param_f for render_vis: lucent's image (by default of the input's size and channels)
        or the input itself; its ``size`` attribute is the image's (height, width)."""
        param = _lucent()[1]
        if value == "input":
            return _sized(lambda: _input_param(x), tuple(x.shape[2:]))
        value = value or {}
        kwargs = {"w": x.shape[3], "h": x.shape[2]} if "w" not in value else {}  # lucent: h defaults to w
        kwargs.update(batch=x.shape[0], **value)
        if "channels" not in kwargs and x.shape[1] != 3:
            kwargs["channels"] = x.shape[1]
        if kwargs.get("channels", 3) != x.shape[1]:
            raise ConfigError("params.param_f.channels", f"the model takes {x.shape[1]} channels")
        if kwargs.get("decorrelate") and x.shape[1] != 3:
            raise ConfigError("params.param_f.decorrelate", "colour decorrelation needs 3 channels: remove it")
        return _sized(lambda: param.image(**kwargs), (kwargs.get("h") or kwargs["w"], kwargs["w"]))

    @staticmethod
    def _optimizer(value: Any):
        if value is None:
            return None
        kwargs = _tuples({k: v for k, v in value.items() if k != "name"})
        cls = _optimizer_class(value.get("name", "Adam"), "params.optimizer.name")
        return lambda params: cls(params, **kwargs)

    @staticmethod
    def _transforms(value: Any, transform) -> list | None:
        if value is None or value == "standard":
            return None
        return [getattr(transform, name)(**_tuples(kwargs)) for item in value for name, kwargs in item.items()]

    def run(self, spec: MethodSpec, call: Call):
        import torch

        from lucent.optvis.param.spatial import device

        lucent_objectives, _, render, transform = _lucent()
        if torch.device(device) != call.inputs.device:
            raise ConfigError("device", f"lucent puts its images on {device} (cuda:0 whenever CUDA exists): "
                                        f"run {spec.id} on {device}")
        params = dict(call.params)
        size = params.pop("fixed_image_size")
        size = tuple(size) if isinstance(size, list) else size
        image_f = self._param_f(params.pop("param_f", None), call.inputs)
        model = _scores_module(call.forward if objectives()[params["objective"]].on_scores else call.network)
        objective = self._objective(lucent_objectives, params, call, model, _model_size(size, image_f.size))
        kwargs = {
            "param_f": image_f,
            "optimizer": self._optimizer(params.pop("optimizer", None)),
            "transforms": self._transforms(params.pop("transforms", None), transform),
            "thresholds": tuple(params.pop("thresholds", (512,))),
            **params, "fixed_image_size": size, "show_image": False, "save_image": False, "show_inline": False,
        }
        for p in model.parameters():  # the image is optimised, not the model (the guard restores the flags)
            p.requires_grad_(False)
        images = render.render_vis(model, objective, **kwargs)
        images = [torch.as_tensor(image, dtype=torch.float32, device=call.inputs.device).permute(0, 3, 1, 2)
                  for image in images]
        steps = sorted(set(kwargs["thresholds"]))
        if len(images) > 1:
            call.extras["thresholds"] = {f"step_{s}": image for s, image in zip(steps, images[:-1])}
        return images[-1]


ADAPTER = LucentAdapter()


def _render_passes(values, x, layer_shape) -> Passes:
    """One forward and one backward row per optimisation step, up to the last threshold."""
    thresholds = values.get("thresholds")
    steps = max(thresholds) if isinstance(thresholds, (list, tuple)) and thresholds else thresholds
    if not cost.count(steps):
        return Passes(None, None, False, "thresholds not known")
    return Passes(int(steps), int(steps))


register(MethodSpec(
    library=LIBRARY, name="render_vis", kind="image", adapter=ADAPTER, needs_layer=True, dims=(2,),
    defaults={"fixed_image_size": lambda x: list(x.shape[2:]), "preprocess": False, "progress": False},
    quick_params={"objective": "channel", "n_channel": 0, "thresholds": [8]},
    reference="Olah et al. 2017, Feature Visualization, doi:10.23915/distill.00007",
    passes=_render_passes, batch_layout=PER_INPUT, axiom="none", preflight=channels_of_layer("n_channel"),
))
