"""TorchRay (https://github.com/facebookresearch/TorchRay): its nine attribution functions.

TorchRay explains classifiers with one calling convention, ``f(model, input, target, **kwargs)``
(layer methods take ``saliency_layer``). One generic adapter serves the table below: it calls
the function on ``call.forward`` (the wrapped ``(B, K)`` scores with a wrapper) with the
config's params under TorchRay's names and returns what TorchRay returns, as float32:

- gradient, deconvnet, guided_backprop: ``(B, 1, *spatial)``, TorchRay's default reduction
  ``max`` over channels of ``|pseudo-gradient|`` (Captum keeps signs and channels);
- grad_cam, linear_approx, (contrastive_)excitation_backprop: ``(B, 1, *layer spatial)``,
  summed over the layer's channels (``resize`` brings them to the input's size);
- rise: ``(B, 1, H, W)`` for the target (see its table entry);
- extremal_perturbation: the optimised masks in [0, 1], ``(B, len(areas), H, W)`` (TorchRay
  returns the areas along the batch axis of its single input); its energies go to the extra
  output ``hist``.

What the adapter has to take care of, because TorchRay does not:

- TorchRay sets the model's parameters to ``requires_grad=False`` (``contrastive_excitation_backprop``
  and ``extremal_perturbation`` never restore them, the others not after an error) and may leave
  its probes' hooks when a call fails: both are undone after every call by the one guard
  (:func:`esegeta.attribution.guard.run_guarded`);
- deconvnet, guided backprop and excitation backprop patch functions of ``torch`` for the
  duration of the call (``torch.relu``, ``torch.nn.functional.conv2d``...); TorchRay undoes
  the patches in ``with`` blocks, the adapter serialises TorchRay calls so that two threads
  never stack patches, and these methods are ``exclusive``: the runner runs no other job beside
  them (code of other libraries in another thread would see the patches);
- TorchRay runs with torch-function modes (``__torch_function__``) disabled: excitation backprop's
  patches fail or compute something else under one, and RISE draws its masks from its own ``seed``;
- the input is passed as a copy (TorchRay sets ``requires_grad`` and ``.grad`` on it), and so is
  the layer's output after the probe has taken it (the model may modify it in place).
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

from esegeta.errors import ConfigError
from esegeta.hooks import removing
from esegeta.spec.params import check_number, index
from esegeta.spec import cost
from esegeta.spec.cost import Passes
from esegeta.spec.registry import PER_INPUT, ROWS, Call, Library, MethodSpec, keyword_parameters, register

log = logging.getLogger("esegeta")

#: TorchRay draws from torch's RNG only (RISE from its own ``seed``).
LIBRARY = Library("torchray", "torchray", "torchray", ("torchray",), uses_global_rng=False, reads_samples=False,
                  batch_params={"batch_size": None}, step_params=("num_masks",),
                  reference="Fong et al. 2019, arXiv:1910.08485 (TorchRay)")

#: Upstream arguments a JSON config cannot or must not set: esegeta supplies the model, input,
#: target and layer; callables are code, not config; ``debug`` returns probes left attached.
NOT_CONFIGURABLE = frozenset({
    "model", "input", "target", "saliency_layer", "context_builder", "gradient_to_saliency",
    "get_backward_gradient", "debug", "filter_masks",
})
#: Parameters naming a layer of the user's model (resolved on the prepared copy); null means
#: the method's own layer for those marked True, upstream's automatic choice for the others.
LAYER_PARAMS = {"contrast_layer": True, "classifier_layer": False}
#: Parameters naming one of TorchRay's own functions.
FUNCTION_PARAMS = {"reward_func": ("simple_reward", "contrastive_reward")}
CHOICES = {
    "variant": ("preserve", "delete", "dual"),
    "perturbation": ("blur", "fade"),
    # TorchRay resizes with align_corners=False, which interpolate() accepts only for these modes
    # (bilinear/bicubic for 2D, trilinear for 3D).
    "resize_mode": ("bilinear", "bicubic", "trilinear"),
}
POSITIVE_INTS = frozenset({"num_masks", "num_cells", "batch_size", "max_iter", "num_levels", "step", "print_iter"})
NUMBERS = frozenset({"p", "sigma", "smooth"})
BOOLS = frozenset({"jitter"})

#: One lock for every TorchRay call: some patch torch's functions for their duration.
_LOCK = threading.Lock()


def _check_resize(value: Any, path: str) -> None:
    ok = isinstance(value, bool) or (
        isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                                  for v in value))
    if not ok:
        raise ConfigError(path, f"resize must be true, false or a size [width, height], not {value!r}")


def _check_areas(value: Any, path: str) -> None:
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, float) and 0 < v < 1 for v in values):
        raise ConfigError(path, f"areas must be a fraction or a list of fractions strictly between 0 and 1 "
                                f"(e.g. [0.1]), not {value!r}")


@dataclass(frozen=True)
class TorchRayAdapter:
    """One TorchRay function: ``module.function``; ``delegate`` is the function its ``**kwargs``
    go to (their names are configurable too); ``targets`` says how TorchRay wants the target:
    ``"seed"`` an int or one int per input (the gradient seed), ``"list"`` one int per input,
    ``"each"`` an int with one input per call; ``returns_hist`` for ``(masks, energies)`` results;
    ``sigmoid_scores`` for methods that pass the scores through a sigmoid (RISE); ``torchvision``
    for modules that import torchvision (on CPU-only torch it needs :func:`esegeta.compat.import_torchvision`)."""
    module: str
    function: str
    delegate: str | None = None
    targets: str = "seed"
    returns_hist: bool = False
    sigmoid_scores: bool = False
    torchvision: bool = False

    def _fn(self, name: str | None = None):
        import importlib

        from esegeta.compat import import_torchvision

        if self.torchvision:
            import_torchvision()
        module_name, _, fn_name = (name or f"{self.module}.{self.function}").rpartition(".")
        return getattr(importlib.import_module(module_name), fn_name)

    @cache
    def parameters(self, spec: MethodSpec) -> Mapping[str, inspect.Parameter]:
        functions = [self._fn()] + ([self._fn(self.delegate)] if self.delegate else [])
        params: dict[str, inspect.Parameter] = {}
        for fn in reversed(functions):  # the function's own defaults win over its delegate's
            params.update(keyword_parameters(fn, NOT_CONFIGURABLE))
        return params

    def check_value(self, name: str, value: Any, path: str) -> None:
        """Check a JSON value before anything runs."""
        if name in CHOICES and value not in CHOICES[name]:
            raise ConfigError(path, f"{value!r} is not one of {', '.join(CHOICES[name])}")
        if name in FUNCTION_PARAMS and value not in FUNCTION_PARAMS[name]:
            raise ConfigError(path, f"{name} names one of TorchRay's functions: {', '.join(FUNCTION_PARAMS[name])}")
        if name in LAYER_PARAMS and value is not None and not isinstance(value, str):
            raise ConfigError(path, f"{name} must be a layer name of the model (e.g. \"layer4\"), not {value!r}")
        if (name in POSITIVE_INTS or name in NUMBERS) and not (name == "print_iter" and value is None):
            check_number(name, value, path, POSITIVE_INTS)
        if name == "seed" and not index(value):
            raise ConfigError(path, f"seed must be a non-negative integer, not {value!r}")
        if name in BOOLS and not isinstance(value, bool):
            raise ConfigError(path, f"{name} must be true or false, not {value!r}")
        if name == "resize":
            _check_resize(value, path)
        if name == "areas":
            _check_areas(value, path)

    def convert(self, name: str, value: Any, call: Call, path: str) -> Any:
        """A JSON parameter value as TorchRay wants it."""
        from esegeta.attribution.call import find_layer

        if name in LAYER_PARAMS:
            if value is None:
                return call.layer if LAYER_PARAMS[name] else None
            return find_layer(call.network, value, path)
        if name in FUNCTION_PARAMS:
            return self._fn(f"{self.module}.{value}")
        return value

    def run(self, spec: MethodSpec, call: Call):
        from esegeta.attribution.architectures import token_grid

        if not spec.needs_layer:
            return self._call(spec, call)
        with token_grid(call) as on_grid:  # a token layer: its tokens as maps on their grid
            return self._call(spec, on_grid)

    def _call(self, spec: MethodSpec, call: Call):
        import torch

        fn = self._fn()
        kwargs = {k: self.convert(k, v, call, f"params.{k}") for k, v in call.params.items()}
        if spec.needs_layer:
            kwargs["saliency_layer"] = call.layer
        if self.sigmoid_scores:
            _warn_if_saturated(spec, call)
        x = call.inputs.detach().clone()
        n = x.shape[0]
        target = call.target
        per_input = call.targets.ints()
        # TorchRay's patches break under a torch-function mode (the runner's per-job RNG is one):
        # F.batch_norm re-dispatches to the patched global with keywords an autograd Function cannot
        # take, and patched pools would apply the excitation rule twice. RISE seeds its own masks (seed).
        with _LOCK, torch._C.DisableTorchFunction(), _probe_output_copied(call.layer if spec.needs_layer else None):
            if self.targets == "each":
                outputs = [fn(call.forward, x[i:i + 1], target=per_input[i], **kwargs) for i in range(n)]
            else:
                outputs = [fn(call.forward, x, target=per_input if self.targets == "list" else target, **kwargs)]
        if self.returns_hist:
            # extremal_perturbation returns (masks, energies), one mask per area along the batch axis
            # for its single input: the areas become channels, the energies an extra output.
            call.extras["hist"] = torch.stack([hist for _, hist in outputs])
            outputs = [masks.transpose(0, 1) for masks, _ in outputs]
        return torch.cat(outputs).float()


@contextlib.contextmanager
def _probe_output_copied(layer):
    """Within the block, each call of ``layer`` passes on a copy of what TorchRay's probe holds.

    The probe (a forward hook) makes the layer's output a leaf tensor that requires gradients,
    on which the model's next in-place operation fails (DenseNet's ``F.relu(features,
    inplace=True)``; esegeta's out-of-place mode cannot run beside TorchRay's patches). A
    pre-hook appends, on every call, a forward hook that runs after the probe's and returns a
    clone: the probe keeps the leaf, the gradient reaches it through the clone, the values are
    the same."""
    if layer is None:
        yield
        return
    import torch

    with removing() as handles:
        def after_probe(module, args):
            def copy(m, inputs, output):
                handle.remove()  # once per call: the next call appends its own after the hooks present then
                return output.clone() if torch.is_tensor(output) else output

            handle = module.register_forward_hook(copy)
            handles.append(handle)  # removed at the end too, if the call failed before the hook ran

        handles.append(layer.register_forward_pre_hook(after_probe))
        yield


def _warn_if_saturated(spec: MethodSpec, call: Call) -> None:
    """RISE scores ``sigmoid(model(x))``: made for logits, it saturates on a wrapper's sums."""
    scores = getattr(call.forward, "unperturbed", None)
    if scores is not None and float(scores.abs().max()) > 10:
        log.warning("%s passes the scores through a sigmoid, and the wrapped scores reach %.3g, where it saturates "
                    "and the map flattens: set the wrapper's \"reduction\": \"mean\"", spec.id,
                    float(scores.abs().max()))


_REF_GRAD = "Simonyan et al. 2014, arXiv:1312.6034"
_REF_EBP = "Zhang et al. 2016, Top-down neural attention by excitation backprop, arXiv:1608.00507"
_SALIENCY = "torchray.attribution.common.saliency"


def _quick_step(x) -> int:
    """A mask step for extremal perturbation scaled to the input (upstream's 7 is for 224-pixel images)."""
    return max(1, min(x.shape[2:]) // 8)


def _quick_sigma(x) -> float:
    return 3.0 * _quick_step(x)  # upstream's ratio: step 7, sigma 21


def _layer_preflight(excitation: bool):
    """The check of TorchRay's layer methods: a token layer gives no spatial map unless its tokens
    lie on a square grid (explained on it: :func:`esegeta.attribution.architectures.token_grid`); excitation
    backprop has no rule for attention. (An in-place operation on the layer's output, which
    would fail on the probe's leaf tensor, is taken care of: :func:`_probe_output_copied`.)"""

    def preflight(model, context) -> list[str]:
        from esegeta.attribution.architectures import attention, token_layout

        found = []
        if context.layer is not None:
            shape = context.layer_shape()
            if shape is not None and len(shape) != context.x.ndim and not token_layout(shape, context.x.ndim - 2):
                found.append(f"layer {context.layer!r} outputs {tuple(shape)}, tokens rather than (batch, channels, "
                             "*spatial) maps, and not on a square grid: use gradcam.GradCAM with params.reshape_transform "
                             "\"vit\" or \"tokens\"")
        if excitation and attention(model):
            found.append(f"TorchRay's excitation backprop has no rule for attention ({attention(model)[0]}: "
                         "MultiheadAttention): use captum.IntegratedGradients or gradcam.GradCAM with "
                         "params.reshape_transform \"vit\"")
        return found

    return preflight


def _extremal_passes(values, x, layer_shape) -> Passes:
    """One forward and one backward row per optimisation step and area."""
    iters, areas = values.get("max_iter"), values.get("areas")
    n_areas = len(areas) if isinstance(areas, (list, tuple)) else 1
    if not cost.count(iters):
        return Passes(None, None, False, "max_iter not known")
    return Passes(int(iters) * n_areas, int(iters) * n_areas)


def _torchray(name, adapter, *, passes, layout, axiom, kind="attribution", layer=False, dims=(2, 3), defaults=None,
              quick=None, ref="", exclusive=False):
    register(MethodSpec(
        library=LIBRARY, name=name, kind=kind, adapter=adapter, needs_layer=layer, dims=dims,
        defaults=defaults or {}, quick_params=quick or {}, reference=ref, exclusive=exclusive,
        preflight=_layer_preflight("excitation" in name) if layer else None,
        passes=passes, batch_layout=layout, axiom=axiom,
    ))


_A = "torchray.attribution"
# The saliency methods cost one gradient (or modified gradient) each. The input-level ones explain a batch
# of wrapped inputs as rows (tests/test_batching.py); the others run one input per call. Excitation
# backprop passes the target's probability mass down layer by layer (its marginal winning probabilities
# sum to one at every layer); its contrastive map, a difference of two, conserves nothing.
_torchray("gradient", TorchRayAdapter(f"{_A}.gradient", "gradient", _SALIENCY), passes=cost.gradient, layout=ROWS,
          axiom="none", ref=_REF_GRAD)
# deconvnet, guided backprop and (contrastive) excitation backprop patch torch's functions
# (torch.relu, F.conv2d...) process-wide while they run: exclusive, no other job beside them.
_torchray("deconvnet", TorchRayAdapter(f"{_A}.deconvnet", "deconvnet", _SALIENCY), passes=cost.gradient,
          layout=ROWS, axiom="none", exclusive=True, ref="Zeiler & Fergus 2014, doi:10.1007/978-3-319-10590-1_53")
_torchray("guided_backprop", TorchRayAdapter(f"{_A}.guided_backprop", "guided_backprop", _SALIENCY),
          passes=cost.gradient, layout=ROWS, axiom="none", exclusive=True, ref="Springenberg et al. 2015, arXiv:1412.6806")
# grad_cam averages the gradient over axes (2, 3) only: 2D by construction.
_torchray("grad_cam", TorchRayAdapter(f"{_A}.grad_cam", "grad_cam", _SALIENCY), passes=cost.gradient,
          layout=PER_INPUT, axiom="none", kind="layer", layer=True, dims=(2,), ref="Selvaraju et al. 2017, arXiv:1610.02391")
_torchray("linear_approx", TorchRayAdapter(f"{_A}.linear_approx", "linear_approx", _SALIENCY), passes=cost.gradient,
          layout=PER_INPUT, axiom="none", kind="layer", layer=True,
          ref="TorchRay's linear approximation (gradient x activation at a layer)")
_torchray("excitation_backprop",
          TorchRayAdapter(f"{_A}.excitation_backprop", "excitation_backprop", _SALIENCY, torchvision=True),
          passes=cost.gradient, layout=PER_INPUT, axiom="conservation", kind="layer", layer=True, exclusive=True,
          ref=_REF_EBP)
# contrast_layer (required upstream) defaults to the saliency layer: clamp(P - N) there, the
# target's excitation minus its dual's (classifier weights negated), the paper's contrastive map.
# TorchRay's excitation backprop is linear in the signal it propagates, so any contrast layer between the
# saliency layer and the classifier gives the same map.
_torchray("contrastive_excitation_backprop",
          TorchRayAdapter(f"{_A}.excitation_backprop", "contrastive_excitation_backprop", torchvision=True),
          passes=cost.gradient, layout=PER_INPUT, axiom="none", kind="layer", layer=True,
          defaults={"contrast_layer": None}, exclusive=True, ref=_REF_EBP)
# torchray.rise ignores the target and maps every class; rise_class, its class-specific front-end
# with the same parameters, gives the target's map. Both assert 2D inputs. One forward row per mask,
# plus the unperturbed input.
_torchray("rise", TorchRayAdapter(f"{_A}.rise", "rise_class", f"{_A}.rise.rise", targets="list", sigmoid_scores=True),
          passes=cost.forward_steps("num_masks", 1), layout=PER_INPUT, axiom="none", dims=(2,),
          quick={"num_masks": 128}, ref="Petsiuk et al. 2018, arXiv:1806.07421")
# One 2D input per call (the mask generator and the jitter flip are 2D).
_torchray("extremal_perturbation",
          TorchRayAdapter(f"{_A}.extremal_perturbation", "extremal_perturbation", targets="each", returns_hist=True),
          passes=_extremal_passes, layout=PER_INPUT, axiom="none", dims=(2,),
          quick={"max_iter": 12, "step": _quick_step, "sigma": _quick_sigma}, ref="Fong et al. 2019, arXiv:1910.08485")
