"""SHAP (https://github.com/shap/shap; Lundberg & Lee 2017, arXiv:1705.07874): four explainers for image models.

- ``GradientExplainer`` (expected gradients) and ``DeepExplainer`` (DeepLIFT with a
  background distribution) run on ``call.forward``, the prepared copy of the model: its
  reused and in-place ReLUs are already split (DeepExplainer fails on them, see ENVIRONMENT.md).
- ``PartitionExplainer`` with ``shap.maskers.Image`` (2D only: its partition tree splits three
  axes, H, W and C, and its blur/inpaint masks are OpenCV 2D filters): hierarchical Owen values
  over axis-aligned image partitions; the model function gets numpy ``(N, H, W, C)`` images.
  ``params.masker`` is the mask value: ``"blur(kx,ky)"`` (default: a quarter of the smaller
  side), ``"inpaint_telea"`` or ``"inpaint_ns"`` (OpenCV casts to uint8: 0–255 images only).
- ``KernelExplainer`` over SLIC superpixels/supervoxels (2D and 3D, scikit-image ``slic``
  parameters such as ``n_segments`` under their own names): features are segments on/off;
  an "off" segment takes the background's values there (the model output averaged over the
  background images when there are several). SHAP's ``l1_reg`` default keeps 10 segments.

Background data is ``params.data`` (upstream's name, see :mod:`esegeta.attribution.backgrounds`):
default ``["zeros", "blur"]`` for Gradient/Deep (as esegeta's Captum Shap methods),
``"mean"`` (per-channel mean, as SHAP's superpixel example) for Kernel.

One output is explained, ``call.target``: the model given to SHAP returns that column only
(SHAP computes each output independently, so this equals the target slice of SHAP's all-output
result, at 1/K of the cost). Results are SHAP's values as float32 ``(B, C, *spatial)``;
Kernel's per-segment values painted onto the input grid ``(B, 1, *spatial)``.
"""
from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from esegeta.errors import ConfigError
from esegeta.spec.params import BOOL, Check, check_table, positive_int, seed
from esegeta.spec import cost
from esegeta.spec.cost import Passes
from esegeta.spec.registry import PER_INPUT, Call, Library, MethodSpec, keyword_parameters, register

#: SHAP samples with numpy's global RNG and draws backgrounds from the run's samples.
LIBRARY = Library("shap", "shap", "shap", ("shap",), batch_params={"batch_size": None},
                  step_params=("nsamples", "max_evals"), reference="Lundberg & Lee 2017, arXiv:1705.07874")

#: Upstream arguments a config cannot set: esegeta supplies them, or they take Python objects or pick outputs.
NOT_CONFIGURABLE = frozenset({
    "self", "model", "X", "args", "session", "learning_phase_flags", "ranked_outputs", "output_rank_order",
    "return_variances", "outputs", "output_names", "link", "linearize_link", "feature_names",
})
MASKER = re.compile(r"blur\(\s*[1-9]\d*\s*,\s*[1-9]\d*\s*\)|inpaint_telea|inpaint_ns")


def _param(name: str, default: Any = inspect.Parameter.empty) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default)


def _signature(fn: Callable) -> dict[str, inspect.Parameter]:
    return keyword_parameters(fn, NOT_CONFIGURABLE)


def _pick(params: Mapping[str, Any], fn: Callable) -> dict[str, Any]:
    """The entries of ``params`` that ``fn`` takes."""
    names = inspect.signature(fn).parameters
    return {k: v for k, v in params.items() if k in names}


#: name → (check, what a valid value is), checked before anything runs.
CHECKS: Mapping[str, Check] = {
    "nsamples": (lambda v: positive_int(v) or v == "auto", "a positive integer (or 'auto' for KernelExplainer)"),
    "max_evals": (lambda v: positive_int(v) or v == "auto", "a positive integer or 'auto'"),
    "batch_size": (lambda v: positive_int(v) or v == "auto", "a positive integer"),
    "n_segments": (positive_int, "a positive integer"),
    "rseed": (seed, "a non-negative integer or null"),
    "check_additivity": BOOL,
    "silent": BOOL,
    "masker": (lambda v: isinstance(v, str) and MASKER.fullmatch(v) is not None,
               "'blur(kx,ky)' (box blur, kernel size in pixels), 'inpaint_telea' or 'inpaint_ns'"),
}


def _one_output(values: Any, x) -> Any:
    """SHAP values of a one-output model as a float32 tensor shaped like ``x``.

    shap ≥ 0.45 returns an array with the output axis last, ``(B, *x.shape[1:], 1)``, or
    none for one output; shap < 0.45 returned a list with one array per output.
    """
    import numpy as np
    import torch

    if isinstance(values, list):
        (values,) = values
    values = np.asarray(values)
    if values.ndim == x.ndim + 1:
        values = values[..., 0]
    return torch.as_tensor(np.ascontiguousarray(values, dtype=np.float32), device=x.device)


@cache
def _column_class():
    from torch import nn

    class Column(nn.Module):
        """``forward``'s output column ``index`` as a one-output model ``(N, 1)`` (not a leaf: no hooks on it)."""

        def __init__(self, forward: nn.Module, index: int):
            super().__init__()
            self.model = forward
            self.index = index

        def forward(self, x):
            return self.model(x)[:, self.index:self.index + 1]

    return Column


def _gradient(call: Call, x, target: int, params: dict[str, Any]):
    import shap

    from esegeta.attribution.backgrounds import make_data

    data = make_data(params.pop("data"), x, call, "params.data")
    cls = shap.GradientExplainer
    explainer = cls(_column_class()(call.forward, target), data, **_pick(params, cls.__init__))
    return _one_output(explainer.shap_values(x, **_pick(params, cls.shap_values)), x)


def _deep(call: Call, x, target: int, params: dict[str, Any]):
    import shap

    from esegeta.attribution.backgrounds import make_data

    from esegeta.attribution.architectures import extend_deeplift_rules

    extend_deeplift_rules()  # the rescale rule for SiLU, GELU, Hardswish...
    data = make_data(params.pop("data"), x, call, "params.data")
    cls = shap.DeepExplainer
    explainer = cls(_column_class()(call.forward, target), data)
    return _one_output(explainer.shap_values(x, **_pick(params, cls.shap_values)), x)


def _partition(call: Call, x, target: int, params: dict[str, Any]):
    import numpy as np
    import shap
    import torch

    from esegeta.attribution.backgrounds import numpy_model, to_channels_last

    mask_value = params.pop("masker")
    image = to_channels_last(x)
    if mask_value.startswith("inpaint") and (image.min() < 0 or image.max() <= 1 or image.max() > 255
                                             or image.shape[-1] not in (1, 3)):
        raise ConfigError("params.masker", f"{mask_value} inpaints with OpenCV, which casts the image to uint8: it "
                                           f"needs 1 or 3 channels with values in 0–255 (this input: {image.shape[-1]} "
                                           f"channels in [{image.min():.3g}, {image.max():.3g}]); use 'blur(k,k)'")
    masker = shap.maskers.Image(mask_value, image.shape[1:])
    explainer = shap.PartitionExplainer(numpy_model(call.forward, x.shape[1], x.device), masker)
    params.setdefault("silent", True)  # upstream bars stay silenced: esegeta's progress counts the passes
    explanation = explainer(image, outputs=[target], **params)
    values = np.moveaxis(np.asarray(explanation.values)[..., 0], -1, 1)  # (1, H, W, C, 1) → (1, C, H, W)
    return torch.as_tensor(np.ascontiguousarray(values, dtype=np.float32), device=x.device)


def _kernel(call: Call, x, target: int, params: dict[str, Any]):
    import numpy as np
    import shap
    import torch

    from esegeta.attribution.backgrounds import make_data, paint, slic_parameters, supervoxels

    data = make_data(params.pop("data"), x, call, "params.data")
    segments = supervoxels(x, **{k: params.pop(k) for k in list(params) if k in slic_parameters()})
    n_segments = int(segments.max()) + 1
    ids = torch.as_tensor(segments, device=x.device)

    def f(z: np.ndarray) -> np.ndarray:
        """Segments on (1) or off (0) → the target score, averaged over the background images."""
        scores = []
        for chunk in np.array_split(z, max(1, -(-len(z) // 16))):
            keep = torch.as_tensor(chunk, dtype=x.dtype, device=x.device)[:, ids].unsqueeze(1)  # (n, 1, *spatial)
            images = keep.unsqueeze(1) * x + (1 - keep.unsqueeze(1)) * data  # (n, N_background, C, *spatial)
            with torch.no_grad():
                out = call.forward(images.flatten(0, 1))[:, target]
            scores.append(out.view(len(chunk), -1).mean(1).double().cpu().numpy())
        return np.concatenate(scores)

    explainer = shap.KernelExplainer(f, np.zeros((1, n_segments)))
    params.setdefault("silent", True)  # upstream bars stay silenced: esegeta's progress counts the passes
    values = explainer.shap_values(np.ones((1, n_segments)), **params)
    return paint(segments, np.asarray(values).reshape(n_segments), x)


@dataclass(frozen=True)
class ShapMethod:
    """How one SHAP explainer runs, and where its configurable names come from."""
    run: Callable[[Call, Any, int, dict[str, Any]], Any]
    signatures: Callable[[], tuple[Callable, ...]]
    extra: Callable[[], Mapping[str, inspect.Parameter]] = field(default=lambda: {})


def _kernel_parameters() -> dict[str, inspect.Parameter]:
    from esegeta.attribution.backgrounds import slic_parameters

    shap_values = {"nsamples": "auto", "l1_reg": "num_features(10)", "silent": True, "gc_collect": False}
    return {"data": _param("data"), **{n: _param(n, d) for n, d in shap_values.items()}, **slic_parameters()}


def _shap(name: str) -> Any:
    import shap

    return getattr(shap, name)


METHODS: Mapping[str, ShapMethod] = {
    "GradientExplainer": ShapMethod(_gradient, lambda: (_shap("GradientExplainer").__init__,
                                                        _shap("GradientExplainer").shap_values)),
    "DeepExplainer": ShapMethod(_deep, lambda: (_shap("DeepExplainer").__init__, _shap("DeepExplainer").shap_values)),
    "PartitionExplainer": ShapMethod(_partition, lambda: (_shap("PartitionExplainer").__call__,),
                                     lambda: {"masker": _param("masker")}),
    "KernelExplainer": ShapMethod(_kernel, lambda: (), _kernel_parameters),
}


class ShapAdapter:
    """The adapter behind every SHAP explainer: one upstream call per input, for its target."""
    @cache  # noqa: B019 (one adapter object for the process)
    def parameters(self, spec: MethodSpec) -> Mapping[str, inspect.Parameter]:
        method = METHODS[spec.name]
        names: dict[str, inspect.Parameter] = {}
        for fn in method.signatures():
            names.update(_signature(fn))
        return {**names, **method.extra()}

    def check_value(self, name: str, value: Any, path: str) -> None:
        from esegeta.attribution.backgrounds import check_data

        if name == "data":
            check_data(value, path)
        else:
            check_table(CHECKS, name, value, path)

    def run(self, spec: MethodSpec, call: Call):
        """One upstream call per input, for its target (DeepExplainer's module hooks and the
        ``x``/``y`` tensors it leaves on modules are undone by the guard)."""
        import torch

        if call.targets is None:
            raise ValueError("SHAP explains one output: set a target")
        method = METHODS[spec.name]
        return torch.cat([method.run(call, call.inputs[i:i + 1], call.targets[i], dict(call.params))
                          for i in range(call.inputs.shape[0])])


ADAPTER = ShapAdapter()
_REF = "Lundberg & Lee 2017, arXiv:1705.07874"


def _blur_masker(x) -> str:
    k = max(1, min(x.shape[2:]) // 4)
    return f"blur({k},{k})"


#: Layers SHAP's DeepExplainer has no rule for and passes as if linear, which they are not: its
#: additivity check then fails (normalisation by statistics of the input itself, attention), unless
#: the substitutes cover them (:mod:`esegeta.attribution.rules`: what remains is LocalResponseNorm,
#: subclassed norms, attention with extra key/value biases).
DEEP_NO_RULE = ("InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "GroupNorm", "LayerNorm", "LocalResponseNorm",
                "MultiheadAttention")


def deep_gaps(model, context=None) -> list[str]:
    """DeepExplainer's pre-flight check: layers it has no rule for (see :data:`DEEP_NO_RULE`), and
    max pooling with overlapping windows (kernel larger than stride: its max-pool rule assigns
    each output's difference as if the windows did not overlap, and additivity fails), and products
    of two data-dependent paths (a squeeze-excitation or attention gate, traced on the input)."""
    from torch import nn

    from esegeta.attribution import architectures, rules

    # normalisations and attention the substitutes cover run (esegeta.attribution.rules): exact for
    # the normalisations, approximate through attention (the manifest notes it)
    wrong = [f"{name} ({type(m).__name__})" for name, m in model.named_modules()
             if any(isinstance(m, getattr(nn, t)) for t in DEEP_NO_RULE) and not architectures.normalisation(m)
             and not (isinstance(m, nn.MultiheadAttention) and not rules.unsupported_attention(m))]
    overlapping = [name for name, m in model.named_modules() if isinstance(m, nn.modules.pooling._MaxPoolNd)
                   and any(k > s for k, s in zip(_tuple(m.kernel_size), _tuple(m.stride or m.kernel_size)))]
    found = []
    gates = architectures.products(model, context.x) if context is not None else []
    if gates:  # attention runs on its substitute: its softmax weights held constant
        attended = architectures.attention(model, context.x)
        gates = [g for g in gates if g not in attended and g.rsplit(" (", 1)[0] not in attended]
    if gates:
        found.append(f"shap.DeepExplainer has no rule for a product of two paths that both depend on the input, as in "
                     f"{', '.join(gates[:3])}{' ...' if len(gates) > 3 else ''} (it passes the product as its gradient, "
                     "and its additivity check fails): use captum.DeepLift (it runs; the manifest "
                     "notes the approximation) or shap.GradientExplainer")
    if wrong:
        found.append(f"shap.DeepExplainer has no rule for {', '.join(wrong[:4])}{' ...' if len(wrong) > 4 else ''} "
                     "(it would pass them as linear, and its additivity check fails): use captum.DeepLiftShap "
                     "(the same attribution, Captum's rules) or shap.GradientExplainer")
    if overlapping:
        found.append(f"shap.DeepExplainer's max-pool rule assumes windows that do not overlap; {overlapping[0]} "
                     "overlaps (kernel larger than stride): use captum.DeepLiftShap (the same attribution, "
                     "Captum's max-pool rule) or shap.GradientExplainer")
    return found


def _tuple(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,)


def _gradient_passes(values, x, layer_shape) -> Passes:
    """GradientExplainer: ``nsamples`` rows each way, after one forward of its background."""
    samples = values.get("nsamples")
    if not cost.count(samples):
        return Passes(None, None, False, "nsamples not known")
    return Passes(int(samples) + cost.n_baselines(values, "data"), int(samples))


def _kernel_passes(values, x, layer_shape) -> Passes:
    """KernelExplainer: ``nsamples`` coalitions (``auto``: 2·M + 2048 for M superpixels), each
    evaluated against every background sample."""
    samples = values.get("nsamples")
    segments = values.get("n_segments")
    if samples == "auto":
        if not cost.count(segments):
            return Passes(None, None, False, "nsamples 'auto' depends on the number of superpixels")
        samples = 2 * int(segments) + 2048
    if not cost.count(samples):
        return Passes(None, None, False, "nsamples not known")
    return Passes(int(samples) * cost.n_baselines(values, "data") + 1, 0, False,
                  "superpixels found at run time may be fewer")


# Every SHAP explainer runs one input per call (the adapter sends rows of one input, and the
# samplers draw at random); ``axiom``: what its values add up to.
def _shap_method(name, *, passes, axiom, dims=(2, 3), defaults=None, quick=None, ref=_REF, requires=(),
                 preflight=None):
    register(MethodSpec(library=LIBRARY, name=name, kind="attribution", adapter=ADAPTER, requires=requires,
                        dims=dims, defaults=defaults or {}, quick_params=quick or {}, reference=ref,
                        preflight=preflight, passes=passes, batch_layout=PER_INPUT, axiom=axiom))


_shap_method("GradientExplainer", passes=_gradient_passes, axiom="completeness-in-expectation",
             defaults={"data": ["zeros", "blur"]}, quick={"nsamples": 16, "rseed": 0},
             ref="Lundberg & Lee 2017, arXiv:1705.07874; expected gradients: Erion et al. 2021, arXiv:1906.10670")
# DeepExplainer tiles each input against every background sample (and the background).
_shap_method("DeepExplainer", passes=cost.baseline_pairs("data"), axiom="summation-to-delta",
             defaults={"data": ["zeros", "blur"]}, quick={"data": "blur"}, preflight=deep_gaps,
             ref="Lundberg & Lee 2017, arXiv:1705.07874; DeepLIFT: Shrikumar et al. 2017, arXiv:1704.02685")
# shap's Image masker needs OpenCV for its blur and inpaint masks.
_shap_method("PartitionExplainer", passes=cost.forward_steps("max_evals"), axiom="efficiency", dims=(2,),
             defaults={"masker": _blur_masker}, quick={"max_evals": 24}, requires=("shap", "cv2"),
             ref="Lundberg & Lee 2017, arXiv:1705.07874; Owen values: Owen 1977")
_shap_method("KernelExplainer", passes=_kernel_passes, axiom="efficiency", defaults={"data": "mean"},
             quick={"nsamples": 24, "n_segments": 8, "silent": True})
