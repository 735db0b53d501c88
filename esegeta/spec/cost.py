"""What one method call costs before it runs: model passes per input, and a time from them.

A method's cost is counted in *rows*: one input (one sample of the batch) through the model's
forward pass is one forward row; backpropagating one such row is one backward row. Integrated
Gradients with ``n_steps=50`` is 50 forward and 50 backward rows per input, whatever its
``internal_batch_size`` (which only groups the rows into fewer, larger calls); Occlusion is one
forward row per window position plus the unperturbed input; RISE one per mask. The counts
follow each library's own algorithm and defaults (the upstream signature's defaults, then
esegeta's input-derived defaults, then the entry's parameters), so they change with them.

Where the count depends on something only the run knows (a layer's channel count that was not
given, the number of superpixels a segmentation function finds, an optimiser that may stop
early), :class:`Passes` says so in ``note`` and ``exact`` is False; a count that cannot be
estimated at all is ``None``.

- :func:`expected_passes`: the :class:`Passes` of one entry on inputs shaped like ``x``.
- :func:`estimated_seconds`: forward rows × the measured seconds of one forward row, backward
  rows × twice that (a backward pass costs about two forward passes).

Every registered method has a formula in :data:`FORMULAS` (a test checks it): adding a method
is adding its line here too.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from esegeta.spec.params import with_defaults

#: grad-cam's ``aug_smooth`` runs every map under 6 test-time augmentations (flip × 3 scales).
GRADCAM_AUGMENTATIONS = 6
#: A backward row costs about this many forward rows (the usual rule of thumb for convolutions).
BACKWARD_COST = 2.0


@dataclass(frozen=True)
class Passes:
    """Model rows one method call needs per input: ``forward`` and ``backward`` (None: unknown).

    ``exact`` is False when the count is an estimate (``note`` says why)."""
    forward: int | None
    backward: int | None
    exact: bool = True
    note: str = ""

    @property
    def known(self) -> bool:
        return self.forward is not None

    def times(self, factor: int) -> "Passes":
        """These passes repeated ``factor`` times (a noise tunnel's samples, augmentations)."""
        return Passes(None if self.forward is None else self.forward * factor,
                      None if self.backward is None else self.backward * factor, self.exact, self.note)

    def text(self) -> str:
        """``"50 forward + 50 backward rows"``, ``"~8,001 forward rows (...)"`` or ``"unknown (...)"``."""
        if self.forward is None:
            return f"unknown ({self.note})" if self.note else "unknown"
        approx = "" if self.exact else "~"
        back = f" + {approx}{self.backward:,} backward" if self.backward else ""
        note = f" ({self.note})" if self.note else ""
        return f"{approx}{self.forward:,} forward{back} rows{note}"

    def as_dict(self) -> dict[str, Any]:
        return {"forward": self.forward, "backward": self.backward, "exact": self.exact, "note": self.note}


def _gradient(values, x, layer_shape) -> Passes:
    return Passes(1, 1)


def _forward_only(values, x, layer_shape) -> Passes:
    return Passes(1, 0)


def _steps(name: str) -> Callable[..., Passes]:
    """One forward and one backward row per step of ``name`` (``n_steps``, ``n_samples``, ``n_iter``...)."""
    def formula(values, x, layer_shape) -> Passes:
        steps = values.get(name)
        return Passes(int(steps), int(steps)) if _count(steps) else Passes(None, None, False, f"{name} not known")
    return formula


def _forward_steps(name: str, plus: int = 0) -> Callable[..., Passes]:
    """One forward row per ``name`` (masks, samples, evaluations), plus ``plus`` unperturbed rows."""
    def formula(values, x, layer_shape) -> Passes:
        steps = values.get(name)
        if not _count(steps):
            return Passes(None, None, False, f"{name} is {steps!r}: known at run time only")
        return Passes(int(steps) + plus, 0)
    return formula


def _count(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0


def _n_baselines(values: Mapping[str, Any], name: str = "baselines") -> int:
    """How many baselines a (list of) JSON baseline(s) or a tensor of baselines stands for."""
    b = values.get(name)
    if isinstance(b, list):
        return max(1, len(b))
    if torch.is_tensor(b) and b.dim() >= 1:
        return max(1, int(b.shape[0]))
    return 1


def _deeplift(values, x, layer_shape) -> Passes:
    """Captum's DeepLift runs inputs and baselines in one batch: 2 rows per baseline."""
    rows = 2 * _n_baselines(values)
    return Passes(rows, rows)


def _shap_gradient(values, x, layer_shape) -> Passes:
    """SHAP's GradientExplainer: ``nsamples`` rows each way, after one forward of its background."""
    samples = values.get("nsamples")
    if not _count(samples):
        return Passes(None, None, False, "nsamples not known")
    return Passes(int(samples) + _n_baselines(values, "data"), int(samples))


def _shap_deep(values, x, layer_shape) -> Passes:
    """SHAP's DeepExplainer tiles each input against every background sample (and the background)."""
    rows = 2 * _n_baselines(values, "data")
    return Passes(rows, rows)


def n_features(values: Mapping[str, Any], x: torch.Tensor, name: str = "feature_mask") -> int:
    """Features a perturbation method switches off one by one: a grid's blocks, a tensor mask's
    distinct ids, else every element of one input (Captum's default)."""
    mask = values.get(name)
    spatial = list(x.shape[2:])
    if isinstance(mask, dict) and isinstance(mask.get("grid"), list) and len(mask["grid"]) == len(spatial):
        return math.prod(-(-s // int(b)) for s, b in zip(spatial, mask["grid"]))
    if torch.is_tensor(mask) and mask.device.type != "meta":
        return int(torch.unique(mask).numel())
    return math.prod(x.shape[1:])


def _windows(shape: Sequence[int], window: Sequence[int], stride: Sequence[int], ceil: bool = False) -> int:
    """Window positions per axis multiplied; ``ceil``: a last, partial step counts too (Captum's
    Occlusion: ``ceil((size - window) / stride) + 1``)."""
    step = (lambda a, b: -(-a // b)) if ceil else (lambda a, b: a // b)
    return math.prod(max(0, step(s - w, max(1, st))) + 1 for s, w, st in zip(shape, window, stride))


def _as_list(v: Any, n: int) -> list[int] | None:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return [int(v)] * n
    if isinstance(v, (list, tuple)) and len(v) == n and all(_count(e) for e in v):
        return [int(e) for e in v]
    return None


def _captum_occlusion(values, x, layer_shape) -> Passes:
    shape = list(x.shape[1:])
    window = _as_list(values.get("sliding_window_shapes"), len(shape))
    stride = _as_list(values.get("strides") if values.get("strides") is not None else 1, len(shape))
    if window is None or stride is None:
        return Passes(None, None, False, "sliding_window_shapes/strides not known")
    return Passes(_windows(shape, window, stride, ceil=True) + 1, 0)


def _zennit_occlusion(values, x, layer_shape) -> Passes:
    spatial = list(x.shape[2:])
    stride = _as_list(values.get("stride"), len(spatial))
    if stride is None:
        return Passes(None, None, False, "stride not known")
    # zennit rolls the window to every multiple of the stride, wrapping around the edges
    return Passes(math.prod(-(-s // max(1, st)) for s, st in zip(spatial, stride)) + 1, 0)


def _ablation(values, x, layer_shape) -> Passes:
    return Passes(n_features(values, x) + 1, 0)


def _layer_ablation(values, x, layer_shape) -> Passes:
    if values.get("layer_mask") is None and layer_shape is None:
        return Passes(None, None, False, "one pass per layer element: the layer's size is known at run time")
    count = math.prod(layer_shape[1:]) if values.get("layer_mask") is None else n_features(values, x, "layer_mask")
    return Passes(count + 1, 0)


def _shapley_sampling(values, x, layer_shape) -> Passes:
    samples = values.get("n_samples")
    if not _count(samples):
        return Passes(None, None, False, "n_samples not known")
    return Passes(int(samples) * n_features(values, x) + 1, 0)


def _per_channel(fraction_key: str | None = None) -> Callable[..., Passes]:
    """grad-cam's ScoreCAM and AblationCAM: one forward row per channel of the layer."""
    def formula(values, x, layer_shape) -> Passes:
        if layer_shape is None or len(layer_shape) < 2:
            return Passes(None, None, False, "one pass per channel of the layer: its size is known at run time")
        channels = int(layer_shape[1])
        if fraction_key is not None and _count(values.get(fraction_key)):
            channels = max(1, math.ceil(channels * float(values[fraction_key])))
        return Passes(channels + 1, 0)
    return formula


def _shap_kernel(values, x, layer_shape) -> Passes:
    """KernelExplainer: ``nsamples`` coalitions (``auto``: 2·M + 2048 for M superpixels), each
    evaluated against every background sample."""
    samples = values.get("nsamples")
    segments = values.get("n_segments")
    if samples == "auto":
        if not _count(segments):
            return Passes(None, None, False, "nsamples 'auto' depends on the number of superpixels")
        samples = 2 * int(segments) + 2048
    if not _count(samples):
        return Passes(None, None, False, "nsamples not known")
    return Passes(int(samples) * _n_baselines(values, "data") + 1, 0, False, "superpixels found at run time may be fewer")


def _extremal(values, x, layer_shape) -> Passes:
    iters, areas = values.get("max_iter"), values.get("areas")
    n_areas = len(areas) if isinstance(areas, (list, tuple)) else 1
    if not _count(iters):
        return Passes(None, None, False, "max_iter not known")
    return Passes(int(iters) * n_areas, int(iters) * n_areas)


def _lucent(values, x, layer_shape) -> Passes:
    thresholds = values.get("thresholds")
    steps = max(thresholds) if isinstance(thresholds, (list, tuple)) and thresholds else thresholds
    if not _count(steps):
        return Passes(None, None, False, "thresholds not known")
    return Passes(int(steps), int(steps))


def _patterns(values, x, layer_shape) -> Passes:
    return Passes(1, 1, False, "plus one forward pass over the fitting inputs, once per run")


def _lime(values, x, layer_shape) -> Passes:
    return _forward_steps("num_samples")(values, x, layer_shape)


def _gradcam(values, x, layer_shape) -> Passes:
    return Passes(1, 1)


def _gradcam_sess(values, x, layer_shape) -> Passes:
    scales = values.get("num_scales")
    if not _count(scales):
        return Passes(None, None, False, "num_scales not known")
    return Passes(None, None, False, f"{int(scales)} scales × sliding windows: counted at run time")


_CAPTUM = {
    "Saliency": _gradient, "InputXGradient": _gradient, "GuidedBackprop": _gradient, "Deconvolution": _gradient,
    "GuidedGradCam": _gradient, "LRP": _gradient, "IntegratedGradients": _steps("n_steps"), "DeepLift": _deeplift,
    "DeepLiftShap": _deeplift, "GradientShap": _steps("n_samples"), "FeatureAblation": _ablation,
    "Occlusion": _captum_occlusion, "ShapleyValueSampling": _shapley_sampling, "KernelShap": _forward_steps("n_samples", 1),
    "Lime": _forward_steps("n_samples", 1), "LayerActivation": _forward_only, "LayerConductance": _steps("n_steps"),
    "LayerGradCam": _gradient, "LayerGradientShap": _steps("n_samples"), "LayerGradientXActivation": _gradient,
    "LayerDeepLift": _deeplift, "LayerDeepLiftShap": _deeplift, "LayerIntegratedGradients": _steps("n_steps"),
    "LayerFeatureAblation": _layer_ablation, "LayerLRP": _gradient, "InternalInfluence": _steps("n_steps"),
    "NeuronGuidedBackprop": _gradient, "NeuronGradient": _gradient, "NeuronIntegratedGradients": _steps("n_steps"),
    "NeuronConductance": _steps("n_steps"), "NeuronDeconvolution": _gradient, "NeuronDeepLift": _deeplift,
    "NeuronDeepLiftShap": _deeplift, "NeuronGradientShap": _steps("n_samples"), "NeuronFeatureAblation": _ablation,
}
_GRADCAM = {
    **{name: _gradcam for name in ("GradCAM", "HiResCAM", "GradCAMElementWise", "GradCAMPlusPlus", "XGradCAM",
                                    "LayerCAM", "FullGrad", "RandomCAM", "ShapleyCAM", "FinerCAM", "RefineCAM")},
    **{name: _forward_only for name in ("EigenCAM", "EigenGradCAM", "KPCA_CAM", "FEM", "SegEigenCAM")},
    "AblationCAM": _per_channel("ratio_channels_to_ablate"), "ScoreCAM": _per_channel(), "SESS": _gradcam_sess,
}
_ZENNIT_GRADIENT = ("EpsilonGammaBox", "EpsilonPlus", "EpsilonAlpha2Beta1", "EpsilonPlusFlat", "EpsilonAlpha2Beta1Flat",
                    "DeconvNet", "GuidedBackprop", "ExcitationBackprop", "BetaSmooth", "LayerMapComposite",
                    "SpecialFirstLayerMapComposite", "NameLayerMapComposite", "Gradient")

#: The cost formula of every registered method, by id: ``formula(values, x, layer_shape) -> Passes``.
FORMULAS: dict[str, Callable[..., Passes]] = {
    **{f"captum.{k}": v for k, v in _CAPTUM.items()},
    **{f"gradcam.{k}": v for k, v in _GRADCAM.items()},
    **{f"zennit.{k}": _gradient for k in _ZENNIT_GRADIENT},
    "zennit.SmoothGrad": _steps("n_iter"), "zennit.IntegratedGradients": _steps("n_iter"),
    "zennit.Occlusion": _zennit_occlusion,
    "lime.LimeImageExplainer": _lime,
    "lucent.render_vis": _lucent,
    "esegeta.CAM": _forward_only, "esegeta.PatternNet": _patterns, "esegeta.PatternAttribution": _patterns,
    "esegeta.LayerActivationGuidedBackprop": _gradient,
    "shap.GradientExplainer": _shap_gradient, "shap.DeepExplainer": _shap_deep,
    "shap.PartitionExplainer": _forward_steps("max_evals"), "shap.KernelExplainer": _shap_kernel,
    **{f"torchray.{k}": _gradient for k in ("gradient", "deconvnet", "guided_backprop", "grad_cam", "linear_approx",
                                             "excitation_backprop", "contrastive_excitation_backprop")},
    "torchray.rise": _forward_steps("num_masks", 1), "torchray.extremal_perturbation": _extremal,
}


def resolved_values(spec, params: Mapping[str, Any], x: torch.Tensor) -> dict[str, Any]:
    """The values a call will use: upstream defaults, then esegeta's defaults from ``x``, then ``params``."""
    try:
        upstream = {n: p.default for n, p in spec.parameters().items() if p.default is not p.empty}
    except Exception:  # noqa: BLE001 (an adapter that cannot list its parameters: the entry's values only)
        upstream = {}
    return {**upstream, **with_defaults(spec, params, x)}


def expected_passes(spec, params: Mapping[str, Any], x: torch.Tensor, *,
                    noise_tunnel: Mapping[str, Any] | None = None, layer_shape: Sequence[int] | None = None) -> Passes:
    """The model rows one call of ``spec`` with ``params`` needs per input shaped like ``x`` (a batch,
    any device, ``meta`` included: only its shape is read). ``layer_shape`` is the method's layer
    output shape when known (per-channel methods count by it)."""
    formula = FORMULAS.get(spec.id)
    if formula is None:
        return Passes(None, None, False, f"no cost formula for {spec.id}")
    values = resolved_values(spec, params, x)
    passes = formula(values, x, layer_shape)
    if values.get("aug_smooth") is True and spec.library.name == "gradcam":
        passes = passes.times(GRADCAM_AUGMENTATIONS)
    if noise_tunnel is not None:
        samples = noise_tunnel.get("nt_samples", 5)
        passes = passes.times(int(samples)) if _count(samples) else Passes(None, None, False, "nt_samples not known")
    return passes


def estimated_seconds(passes: Passes, forward_row_seconds: float) -> float | None:
    """Seconds the call should take per input, from the measured seconds of one forward row."""
    if passes.forward is None:
        return None
    return (passes.forward + BACKWARD_COST * (passes.backward or 0)) * forward_row_seconds


def duration_text(seconds: float | None) -> str:
    """``"~40 ms"``, ``"~12 s"``, ``"~12 min"``, ``"~3.1 h"``; ``"unknown"`` for None."""
    if seconds is None:
        return "unknown"
    if seconds < 1:
        return f"~{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"~{seconds:.0f} s"
    if seconds < 7200:
        return f"~{seconds / 60:.0f} min"
    return f"~{seconds / 3600:.1f} h"
