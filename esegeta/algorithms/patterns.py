"""PatternNet and PatternAttribution (Kindermans et al. 2018, ICLR, arXiv:1705.05598).

A linear unit ``y = wᵀx`` filters its input: ``w`` must cancel distractors, so it need not
point along the signal. The *pattern* ``a`` is the direction the signal actually takes in
the input, estimated from data: with ``cov = E+[x y] − E+[x] E[y]`` (§4 of the paper; ``E+``
over the samples where the unit's pre-activation is positive, ``E`` over all; iNNvestigate's
``relu`` estimator), ``a = cov / (wᵀ cov)``. The ``linear`` estimator uses ``E`` throughout
(``a = cov(x, y) / var(y)`` for a unit that recovers its signal). Statistics are taken over
every output position of a convolution, with the layer's output computed without bias (as
iNNvestigate does).

- PatternNet backpropagates the output signal with the patterns in place of the weights:
  the estimated signal in input space.
- PatternAttribution backpropagates with ``w ⊙ a``: each input's contribution of signal to
  the output.
Both start from the target score's value (iNNvestigate's convention) and pass every other
operation as its gradient: ReLUs gate, pooling, concatenation and upsampling route.
Values are returned as computed by default: since ``wᵀa = 1``, a pattern is about ``1/|w|``
long, and the factor compounds over layers (on the sample U-Nets the ``relu`` signal reaches
~1e14, the ``linear`` one ~1e7). ``project_bottlenecks`` rescales the signal per sample to
[-1, 1] at every module output all paths pass (a layer's, a residual block's; iNNvestigate's
default), which changes the scale only: a positive factor per sample. Where the signal
overflows float32 without it, it is computed again with it (logged), the same map at a
scale float32 can hold.

Supported layers: ``Linear``, ``Conv1d/2d/3d`` and ``ConvTranspose1d/2d/3d`` (groups 1); a
``BatchNorm`` that takes a layer's output directly is folded into it (the folded layer is
what the pattern describes, and the ReLU mask sees the normalised value); any other
``BatchNorm`` passes its gradient (treated as the linear map it is in eval mode). Other
layers with parameters are refused rather than silently passed as gradients. The
backward is set by forward hooks on the prepared copy, removed even on error.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import pickle
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from esegeta.errors import ConfigError
from esegeta.hooks import removing
from esegeta.spec.registry import Call
from esegeta.attribution.prepare import PreparedModel
from esegeta.io.loading import load_inputs
from esegeta.io.outputs import atomic_path
from esegeta.io.loading import resolve

log = logging.getLogger("esegeta")

KERNELS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _along(v: torch.Tensor, axis: int, ndim: int) -> torch.Tensor:
    """``v`` (one value per channel) shaped to broadcast along ``axis`` of a rank-``ndim`` tensor."""
    shape = [1] * ndim
    shape[axis] = -1
    return v.reshape(shape)


@dataclass
class Kernel:
    """A linear or convolutional layer, with the batch norm fed by it directly (folded into it)."""
    name: str
    module: nn.Module
    norm: nn.Module | None = None

    @property
    def out_axis(self) -> int:
        """The weight's axis of output channels."""
        return 1 if getattr(self.module, "transposed", False) else 0

    def _scale_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.module.weight
        channels = w.shape[self.out_axis]
        if self.norm is None:
            return torch.ones(channels, device=w.device), torch.zeros(channels, device=w.device)
        n = self.norm
        gamma = n.weight.detach() if n.weight is not None else torch.ones(channels, device=w.device)
        beta = n.bias.detach() if n.bias is not None else torch.zeros(channels, device=w.device)
        scale = gamma / torch.sqrt(n.running_var + n.eps)
        return scale, beta - n.running_mean * scale

    def weight(self) -> torch.Tensor:
        """The (folded) weight."""
        w = self.module.weight.detach()
        return w * _along(self._scale_shift()[0], self.out_axis, w.ndim)

    def bias(self) -> torch.Tensor:
        """The (folded) bias, one value per output channel."""
        scale, shift = self._scale_shift()
        bias = self.module.bias
        return shift if bias is None else bias.detach() * scale + shift

    def apply(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The layer's linear map with ``weight`` in place of its own, without bias."""
        m = self.module
        if isinstance(m, nn.Linear):
            return F.linear(x, weight)
        if m.transposed:
            return _CONV_TRANSPOSE[x.ndim - 2](x, weight, None, m.stride, m.padding, m.output_padding, m.groups,
                                               m.dilation)
        return m._conv_forward(x, weight, None)

    def channel_axis(self, y: torch.Tensor) -> int:
        return y.ndim - 1 if isinstance(self.module, nn.Linear) else 1


def _unwrapped_names(network: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Named modules as in the user's model (the prepared copy's ``model.`` prefix dropped)."""
    prefix = "model." if isinstance(network, PreparedModel) else ""
    for name, module in network.named_modules():
        if name.startswith(prefix) and ".sites." not in name:
            yield name[len(prefix):], module


def unsupported(network: nn.Module, context=None, method: str = "PatternNet") -> list[str]:
    """The pre-flight check: the layers with parameters the pattern backward cannot handle (a
    normalisation other than BatchNorm, attention...), as problems naming the first."""
    try:
        for name, module in _unwrapped_names(network):
            _check_supported(name, module, method)
    except ConfigError as exc:
        return [exc.message]
    return []


def _check_supported(name: str, module: nn.Module, method: str) -> None:
    if module._parameters and not isinstance(module, KERNELS + NORMS):
        raise ConfigError("model", f"{method} supports Linear, Conv, ConvTranspose and BatchNorm layers; "
                                   f"{name} is a {type(module).__name__} with parameters: use captum.DeepLift or "
                                   "zennit.EpsilonGammaBox (exact through normalisation and attention on esegeta's "
                                   "substitutes), or captum.IntegratedGradients (esegeta.PatternNet's patterns are "
                                   "defined for those layers only: a pattern is fitted per linear unit, and a "
                                   "normalisation's scale changes with every input)")
    if isinstance(module, KERNELS) and getattr(module, "transposed", False) and module.groups != 1:
        raise ConfigError("model", f"{method} does not support grouped transposed convolutions ({name})")


def kernels(network: nn.Module, x: torch.Tensor, method: str) -> list[Kernel]:
    """The linear/conv layers ``network`` calls on ``x``, in call order, with the norms to fold."""
    named = dict(_unwrapped_names(network))
    for name, module in named.items():
        _check_supported(name, module, method)
    seen: list = []
    watched = {n: m for n, m in named.items() if isinstance(m, KERNELS + NORMS)}
    with removing() as handles, torch.no_grad():
        handles.extend(m.register_forward_hook(lambda m, i, o, n=n: seen.append((n, m, i[0], o))) for n, m in watched.items())
        network(x)
    found: list[Kernel] = []
    produced: dict[int, Kernel] = {}
    for name, module, inp, out in seen:
        if isinstance(module, KERNELS):
            if any(k.module is module for k in found):
                raise ConfigError("model", f"{method}: layer {name} is called more than once per forward (shared "
                                           "weights); patterns are per layer call, which is not supported")
            kernel = Kernel(name, module)
            found.append(kernel)
            produced[id(out)] = kernel
        elif id(inp) in produced and produced[id(inp)].norm is None and module.running_var is not None:
            produced[id(inp)].norm = module
    if not found:
        raise ConfigError("model", f"{method} needs a model with Linear or Conv layers")
    return found


class _Statistics:
    """Running sums for one layer's pattern: E+[x y], E+[x], E[y] (``relu``) or E over all (``linear``)."""

    def __init__(self, kernel: Kernel, pattern_type: str):
        self.kernel = kernel
        self.pattern_type = pattern_type
        w = kernel.weight()
        self.sum_xy = torch.zeros_like(w, dtype=torch.float64)
        self.sum_x = torch.zeros_like(w, dtype=torch.float64)
        self.count = torch.zeros(w.shape[kernel.out_axis], dtype=torch.float64, device=w.device)
        self.sum_y = torch.zeros_like(self.count)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        k = self.kernel
        with torch.enable_grad():
            weight = k.weight().requires_grad_(True)
            y = k.apply(x.detach(), weight)
            axis = k.channel_axis(y)
            if self.pattern_type == "relu":
                mask = (y.detach() + _along(k.bias(), axis, y.ndim) > 0).to(y.dtype)
            else:
                mask = torch.ones_like(y)
            # Σ over samples and positions of x_patch·g is the weight's gradient for output gradient g.
            sum_xy, = torch.autograd.grad(y, weight, grad_outputs=y.detach() * mask, retain_graph=True)
            sum_x, = torch.autograd.grad(y, weight, grad_outputs=mask)
        others = tuple(d for d in range(y.ndim) if d != axis)
        self.sum_xy += sum_xy.double()
        self.sum_x += sum_x.double()
        self.count += mask.sum(others).double()
        self.sum_y += y.detach().sum(others).double()
        self.n += y.numel() // y.shape[axis]

    def pattern(self) -> torch.Tensor:
        k = self.kernel
        w = k.weight().double()
        count = _along(self.count + (self.count == 0), k.out_axis, w.ndim)
        mean_y = _along(self.sum_y / max(self.n, 1), k.out_axis, w.ndim)
        cov = self.sum_xy / count - self.sum_x / count * mean_y
        others = tuple(d for d in range(w.ndim) if d != k.out_axis)
        w_cov = _along((w * cov).sum(others), k.out_axis, w.ndim)
        return (cov / (w_cov + (w_cov == 0))).float()


def fit(network: nn.Module, found: list[Kernel], batches: Iterator[torch.Tensor], pattern_type: str
        ) -> dict[str, torch.Tensor]:
    """Patterns of every layer in ``found``, from the network's forward passes on ``batches``.

    Always in the network's own precision, autocast off: patterns are statistics of the
    data, not the explained computation, so a run under ``amp`` fits the same patterns."""
    stats = {k.name: _Statistics(k, pattern_type) for k in found}
    n = 0
    with removing() as handles, torch.no_grad():
        handles.extend(k.module.register_forward_hook(lambda m, i, o, s=stats[k.name]: s.add(i[0])) for k in found)
        for batch in batches:
            with _without_autocast(batch.device):
                network(batch)
            n += batch.shape[0]
    if n < 2:
        log.warning("patterns fitted on %d input: a dense layer's pattern needs several inputs to vary over "
                    "(set params.fit_inputs)", n)
    return {name: s.pattern() for name, s in stats.items()}


@contextlib.contextmanager
def _without_autocast(device: torch.device):
    """Autocast off on ``device`` within the block (devices without autocast, e.g. ``meta``, as they are)."""
    if torch.amp.is_autocast_available(device.type):
        with torch.autocast(device.type, enabled=False):
            yield
    else:
        yield


def precision(network: nn.Module, device: torch.device) -> str:
    """The precision a computation on ``device`` runs in here: the autocast dtype when autocast
    is on, else the network's parameter dtype."""
    if torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type):
        return f"autocast:{str(torch.get_autocast_dtype(device.type)).removeprefix('torch.')}"
    dtype = next((p.dtype for p in network.parameters()), torch.float32)
    return str(dtype).removeprefix("torch.")


@contextlib.contextmanager
def backward_weights(found: list[Kernel], weights: dict[str, torch.Tensor], outputs: list | None = None):
    """Within the block, each layer of ``found`` backpropagates with ``weights[name]`` (forward unchanged);
    the layers' outputs are appended to ``outputs`` if given."""
    with removing() as handles:
        for k in found:
            handles.append(k.module.register_forward_hook(functools.partial(_swap, k, weights[k.name], outputs)))
            if k.norm is not None:  # folded into the layer's backward weight
                handles.append(k.norm.register_forward_hook(_pass_gradient))
        yield


def _swap(kernel: Kernel, weight: torch.Tensor, outputs: list | None, module, inputs, output):
    z = kernel.apply(inputs[0], weight)
    swapped = output.detach() + (z - z.detach())
    if outputs is not None:
        outputs.append(swapped)
    return swapped


def _pass_gradient(module, inputs, output):
    return output.detach() + (inputs[0] - inputs[0].detach())


def _bottlenecks(score: torch.Tensor, x: torch.Tensor, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The ``tensors`` every path from ``x`` to ``score`` passes through (in the autograd graph)."""
    def reaches_input(skip) -> bool:
        stack, seen = [score.grad_fn], set()
        while stack:
            node = stack.pop()
            if node is None or node is skip or id(node) in seen:
                continue
            seen.add(id(node))
            if getattr(node, "variable", None) is x:
                return True
            stack.extend(fn for fn, _ in node.next_functions)
        return False

    return [t for t in tensors if t.grad_fn is not None and not reaches_input(t.grad_fn)]


def _project(grad: torch.Tensor) -> torch.Tensor:
    """iNNvestigate's bottleneck projection: each sample's backward signal scaled to max |·| = 1."""
    absmax = grad.abs().amax(dim=tuple(range(1, grad.ndim)), keepdim=True)
    return grad / (absmax + (absmax == 0))


# ---------------------------------------------------------------------------- fitting data and files

def _fit_data(fit_inputs: Any, call: Call, method: str) -> list[torch.Tensor]:
    """The fitting inputs as tensors (N, C, *spatial): the run's samples, a tensor or files."""
    path = "params.fit_inputs"
    if torch.is_tensor(fit_inputs):
        tensors = [fit_inputs]
    elif isinstance(fit_inputs, str) and fit_inputs == "samples":
        tensors = [call.samples if call.samples is not None else call.inputs]
    else:
        cfg = dict(fit_inputs) if isinstance(fit_inputs, dict) else {
            "paths": [fit_inputs] if isinstance(fit_inputs, str) else list(fit_inputs)}
        cfg["spatial_dims"] = call.inputs.ndim - 2
        try:
            tensors = [item.tensor for item in load_inputs(cfg, call.base_dir, path)]
        except ConfigError as exc:
            if exc.path.startswith(path):  # a key of fit_inputs, named as it is
                raise
            raise ConfigError(path, exc.message) from None
    expected = call.inputs.shape[1]
    for t in tensors:
        if t.ndim != call.inputs.ndim or t.shape[1] != expected:
            raise ConfigError(path, f"{method} fitting inputs of shape {tuple(t.shape)} do not match the model's "
                                    f"inputs {tuple(call.inputs.shape)} (batch, channels, *spatial)")
    return [t.to(device=call.inputs.device, dtype=torch.float32) for t in tensors]


def _batches(tensors: list[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    for t in tensors:
        yield from t.split(batch_size)


def _load(file, found: list[Kernel], pattern_type: str, device) -> dict[str, torch.Tensor]:
    path = "params.patterns"
    try:
        data = torch.load(file, map_location=device, weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        raise ConfigError(path, f"cannot read {file}: {type(exc).__name__}: {str(exc).splitlines()[0]}; delete it "
                                "to fit the patterns again") from None
    if not isinstance(data, dict) or not isinstance(data.get("patterns"), dict):
        raise ConfigError(path, f"{file} is not a patterns file written by esegeta; delete it or name another file")
    if data.get("pattern_type") != pattern_type:
        raise ConfigError(path, f"{file} holds {data.get('pattern_type')!r} patterns, not {pattern_type!r}: set "
                                f"pattern_type to {data.get('pattern_type')!r} or name another file")
    expected = {k.name: tuple(k.module.weight.shape) for k in found}
    got = {name: tuple(t.shape) for name, t in data["patterns"].items() if torch.is_tensor(t)}
    if got != expected:
        differ = sorted(set(expected.items()) ^ set(got.items()))[:3]
        raise ConfigError(path, f"{file} holds patterns for another model (layers or shapes differ, e.g. {differ}); "
                                "delete it to fit again, or name another file")
    return data["patterns"]


def _save(file, patterns: dict[str, torch.Tensor], pattern_type: str) -> None:

    with atomic_path(file) as tmp:
        torch.save({"pattern_type": pattern_type, "patterns": {n: t.cpu() for n, t in patterns.items()}}, tmp)


#: prepared copy → [(samples or fitting tensor (weakly), key, patterns)] with key = (pattern_type, device,
#: precision): with a wrapper the batch is explained one input at a time, and each of those calls would
#: otherwise refit. Fitting runs autocast off (:func:`fit`), but the key still names the device and the
#: precision of the call, so an fp16 attempt and its fp32 retry never share an entry by accident.
_fitted: weakref.WeakKeyDictionary[nn.Module, list] = weakref.WeakKeyDictionary()
_fitted_lock = threading.Lock()


def patterns_for(call: Call, found: list[Kernel], method: str, fit_inputs: Any, patterns: str | None,
                 pattern_type: str, batch_size: int) -> dict[str, torch.Tensor]:
    """The patterns for ``found``: loaded from ``patterns`` if that file exists, else fitted (and saved there)."""
    file = resolve(patterns, call.base_dir) if patterns else None
    if file is not None and file.is_file():
        return _load(file, found, pattern_type, call.inputs.device)
    from_samples = isinstance(fit_inputs, str) and fit_inputs == "samples"
    source = call.samples if call.samples is not None and from_samples else fit_inputs
    cacheable = torch.is_tensor(source)
    device = call.inputs.device
    key = (pattern_type, str(device), precision(call.network, device))
    with _fitted_lock:
        cached = list(_fitted.get(call.network, [])) if cacheable else []
    result = next((p for ref, k, p in cached if ref() is source and k == key), None)
    if result is None:
        data = _fit_data(fit_inputs, call, method)
        result = fit(call.network, found, _batches(data, batch_size), pattern_type)
        if cacheable:
            with _fitted_lock:
                kept = [c for c in _fitted.get(call.network, []) if c[0]() is not None][-3:]
                _fitted[call.network] = kept + [(weakref.ref(source), key, result)]
    if file is not None:
        _save(file, result, pattern_type)
    return result


# ---------------------------------------------------------------------------- the methods

def _explain(call: Call, method: str, backward: Callable[[Kernel, torch.Tensor], torch.Tensor], fit_inputs: Any,
             patterns: str | None, pattern_type: str, batch_size: int, project_bottlenecks: bool) -> torch.Tensor:
    if call.target is None:
        raise ConfigError("target", f"{method} needs a target (a class index, a wrapped column or 'predicted')")
    found = kernels(call.network, call.inputs[:1], method)
    fitted = patterns_for(call, found, method, fit_inputs, patterns, pattern_type, batch_size)
    weights = {k.name: backward(k, fitted[k.name].to(k.module.weight)) for k in found}
    signal = _backproject(call, method, found, weights, project_bottlenecks)
    if not torch.isfinite(signal).all() and not project_bottlenecks:
        # every path passes a bottleneck, so the projected signal is this one times a positive factor per
        # sample: the same map, at a scale float32 can hold
        log.warning("%s: the backprojected signal overflowed float32 (patterns are ~1/|w| long and compound over "
                    "layers); computed again with project_bottlenecks (the same map scaled per sample to max |.| = 1 "
                    "at each bottleneck; set params.project_bottlenecks to true to skip the first pass)", method)
        signal = _backproject(call, method, found, weights, True)
    if not torch.isfinite(signal).all():
        raise FloatingPointError(f"{method}: the backprojected signal overflowed float32 even with project_bottlenecks "
                                 "(it rescales only at layer outputs every path passes, and this model has too few): "
                                 "use esegeta.PatternAttribution, pattern_type \"linear\", or a gradient method")
    return signal


def _backproject(call: Call, method: str, found: list[Kernel], weights: dict[str, torch.Tensor],
                 project_bottlenecks: bool) -> torch.Tensor:
    """The target's signal backpropagated with ``weights`` in place of the layers' own."""
    x = call.inputs.detach().clone().requires_grad_(True)
    outputs: list[torch.Tensor] = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(backward_weights(found, weights, outputs))
        if project_bottlenecks:  # every module's output is a candidate (a residual block's, not only a layer's)
            stack.enter_context(_module_outputs(call.network, outputs))
        stack.enter_context(torch.enable_grad())
        scores = call.forward(x)
        if not torch.is_tensor(scores) or scores.ndim != 2:
            raise ConfigError("wrapper", f"{method} explains (batch, classes) scores; for a segmentation model "
                                         "set a wrapper")
        target = torch.as_tensor(call.target, device=scores.device).reshape(-1, 1).expand(scores.shape[0], 1)
        start = torch.zeros_like(scores).scatter_(1, target, scores.detach().gather(1, target))
        if project_bottlenecks:
            unique = list({id(t): t for t in outputs}.values())
            for t in _bottlenecks(scores, x, unique):
                t.register_hook(_project)
        signal, = torch.autograd.grad(scores, x, grad_outputs=start)
    return signal


@contextlib.contextmanager
def _module_outputs(network: nn.Module, outputs: list):
    """Within the block, the tensor outputs of every submodule of ``network`` are appended to ``outputs``."""
    def keep(module, inputs, output):
        if torch.is_tensor(output) and output.requires_grad:
            outputs.append(output)

    with removing() as handles:
        handles.extend(m.register_forward_hook(keep) for m in network.modules() if m is not network)
        yield


def pattern_net(call: Call, *, fit_inputs: Any = "samples", patterns: str | None = None,
                pattern_type: str = "relu", batch_size: int = 64, project_bottlenecks: bool = False) -> torch.Tensor:
    """PatternNet: the target's signal backprojected with the patterns, (B, C, *spatial).

    ``fit_inputs``: ``"samples"`` (the run's inputs), files/globs, or ``{"paths": [...], "normalize": ...}``
    as in ``inputs``; ``patterns``: a ``.pt`` file, loaded if it exists, else written after fitting;
    ``pattern_type``: ``"relu"`` (two-component a+) or ``"linear"`` (an existing file wins over
    ``fit_inputs``, and must hold patterns of that type for this model); ``batch_size``: inputs per
    fitting forward pass; ``project_bottlenecks``: as iNNvestigate's ``reverse_project_bottleneck_layers``,
    rescale each sample's signal to max |·| = 1 at every layer output all paths pass through (a
    positive factor per sample: same direction, bounded magnitude, for deep networks).
    """
    return _explain(call, "esegeta.PatternNet", lambda k, a: a, fit_inputs, patterns, pattern_type, batch_size,
                    project_bottlenecks)


def pattern_attribution(call: Call, *, fit_inputs: Any = "samples", patterns: str | None = None,
                        pattern_type: str = "relu", batch_size: int = 64,
                        project_bottlenecks: bool = False) -> torch.Tensor:
    """PatternAttribution: the target backpropagated with ``w ⊙ a``, (B, C, *spatial); params as PatternNet."""
    return _explain(call, "esegeta.PatternAttribution", lambda k, a: k.weight() * a, fit_inputs, patterns,
                    pattern_type, batch_size, project_bottlenecks)
