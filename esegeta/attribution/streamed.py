"""esegeta's own streamed gradient methods for global patch mode: Captum's arithmetic, window by window.

In global patch mode (:mod:`esegeta.attribution.patcher`) Captum's gradient and path methods
would hold whole-volume tensors per step: the scaled (or noised) input, its gradient, the
accumulated gradients and the stitched output, each at the volume's size. Here the same
methods run patch by patch against the stitched score (a :class:`~esegeta.attribution.patcher.
StitchedColumn`): each step's input is made per patch on the fly from a slice of the input
(Integrated Gradients: ``b + α(x − b)``; SmoothGrad: ``x + noise``), its gradient comes from
that patch's recomputation, and it is added into ONE result volume, allocated once. What
exists at the volume's size: the input, the result, the wrapper's masks; where patches
overlap, the stitched output of one step (its channels); SmoothGrad's noise of one sample
(drawn at once, as Captum draws it, so that the result equals Captum's on the same seed).

The arithmetic is Captum's (``IntegratedGradients`` with its quadrature from
``captum.attr._utils.approximation_methods``, ``Saliency``, ``InputXGradient``, and
``NoiseTunnel`` ``smoothgrad``/``smoothgrad_sq`` around the last two); tests check each equals
Captum's call on the whole stitched model, and the unpatched result on a pointwise model.
Calls these algorithms do not cover (convergence delta, additional forward arguments, tuple
baselines, VarGrad, baselines drawn from a distribution, custom wrappers) go to Captum
(:func:`esegeta.attribution.guard.run_guarded`).
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from esegeta.attribution.guard import restored, run_guarded
from esegeta.spec.registry import Call, MethodSpec


def run(spec: MethodSpec, call: Call) -> torch.Tensor:
    """The call computed by esegeta's streamed algorithm for ``spec`` where one applies (a built-in
    wrapper's stitched score, parameters it covers), else by the method's adapter."""
    algorithm = ALGORITHMS.get(spec.id)
    column_of = getattr(call.forward, "column", None)
    if algorithm is None or column_of is None or call.target is None or call.inputs.shape[0] != 1:
        return run_guarded(spec, call)
    params = _values(spec.parameters(), call.params)
    nt = _values(spec.noise_tunnel_parameters() or {}, call.noise_tunnel) if call.noise_tunnel is not None else None
    with restored(call.forward, call.network):
        result = algorithm(column_of(call.target), _volume(call.inputs.detach()), params, nt)
    if result is None:
        return run_guarded(spec, call)
    return result.squeeze(-1) if call.inputs.ndim == 4 else result


def _values(accepted: Mapping[str, inspect.Parameter], given: Mapping[str, Any]) -> dict[str, Any]:
    """Upstream's defaults with the given values over them."""
    values = {name: p.default for name, p in accepted.items() if p.default is not inspect.Parameter.empty}
    return {**values, **dict(given)}


def _volume(x: torch.Tensor) -> torch.Tensor:
    return x.unsqueeze(-1) if x.ndim == 4 else x


def _baseline(value: Any, x5: torch.Tensor) -> torch.Tensor | float | None:
    """Captum's baseline as a number or a view of ``x5``'s shape (None: a form left to Captum)."""
    if value is None:
        return 0.0
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if torch.is_tensor(value):
        value = value.to(device=x5.device, dtype=x5.dtype)
        if value.ndim == x5.ndim - 1:  # a 2D input's baseline
            value = value.unsqueeze(-1)
        try:
            return torch.broadcast_to(value, x5.shape)
        except RuntimeError:
            return None
    return None


def _window(value: torch.Tensor | float, region: tuple[slice, ...]) -> torch.Tensor | float:
    return value[region] if torch.is_tensor(value) else value


def _slabs(x5: torch.Tensor, thickness: int):
    """Slabs of a volume view along its first spatial axis (elementwise work without volume temporaries)."""
    for start in range(0, x5.shape[2], thickness):
        yield (slice(None), slice(None), slice(start, start + thickness))


def _add(column, result: torch.Tensor, inputs: Callable, rows: int,
         per_patch: Callable[[torch.Tensor, tuple[slice, ...]], torch.Tensor]) -> None:
    """``result[patch] += per_patch(gradient of the patch's rows, patch)`` for every patch."""
    for chunk, grads in column.gradients(inputs, rows, result.device):
        for loc, grad in zip(chunk, grads):
            region = column.grid.slices(loc)
            result[region] += per_patch(grad, region)


def integrated_gradients(column, x5: torch.Tensor, params: dict, nt: dict | None) -> torch.Tensor | None:
    """Integrated Gradients (Sundararajan et al. 2017, arXiv:1703.01365) as Captum computes it:
    ``(x − b) · Σ_s w_s ∂S/∂x(b + α_s(x − b))`` with Captum's quadrature (``method``), the steps
    ``internal_batch_size`` at a time where patches tile the input."""
    from captum.attr._utils.approximation_methods import approximation_parameters

    baseline = _baseline(params.get("baselines"), x5)
    if (nt is not None or baseline is None or params.get("additional_forward_args") is not None
            or params.get("return_convergence_delta")):
        return None
    n_steps, method = int(params["n_steps"]), params["method"]
    step_sizes, alphas = (f(n_steps) for f in approximation_parameters(method))
    rows = column.rows(column.stitched.rows)
    result = torch.zeros_like(x5)
    for start in range(0, n_steps, rows):
        shape = (-1,) + (1,) * (x5.ndim - 1)
        alpha = torch.tensor(alphas[start:start + rows], dtype=x5.dtype, device=x5.device).view(shape)
        step = torch.tensor(step_sizes[start:start + rows], dtype=x5.dtype, device=x5.device).view(shape)

        def inputs(chunk, alpha=alpha):
            scaled = []
            for loc in chunk:
                region = column.grid.slices(loc)
                b = _window(baseline, region)
                scaled.append(b + alpha * (x5[region] - b))
            return torch.stack(scaled)

        _add(column, result, inputs, len(alpha), lambda grad, region, step=step: (grad * step).sum(0, keepdim=True))
    if params.get("multiply_by_inputs", True):
        for slab in _slabs(x5, int(column.grid.size[0])):
            result[slab] *= x5[slab] - _window(baseline, slab)
    return result


def _gradient_method(finish: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], linear: bool):
    """A method whose result is ``finish(gradient, input)`` (elementwise), with or without
    Captum's ``NoiseTunnel`` (``smoothgrad``, ``smoothgrad_sq``; Smilkov et al. 2017,
    arXiv:1706.03825): ``linear`` when ``finish`` is linear in the gradient, so that overlapping
    patches' shares may be finished one by one."""

    def compute(column, x5: torch.Tensor, params: dict, nt: dict | None) -> torch.Tensor | None:
        if params.get("additional_forward_args") is not None:
            return None
        if nt is None:
            grad = torch.zeros_like(x5)
            _add(column, grad, lambda chunk: torch.stack([x5[column.grid.slices(loc)] for loc in chunk]), 1,
                 lambda g, region: g[0:1])
            for slab in _slabs(x5, int(column.grid.size[0])):
                grad[slab] = finish(grad[slab], x5[slab], params)
            return grad
        stdev = nt["stdevs"]
        if (nt["nt_type"] not in ("smoothgrad", "smoothgrad_sq") or nt.get("draw_baseline_from_distrib")
                or not isinstance(stdev, float)):
            return None
        square = nt["nt_type"] == "smoothgrad_sq"
        total = torch.zeros_like(x5)
        one_pass = column.separable or (linear and not square)
        for _ in range(int(nt["nt_samples"])):
            noisy = torch.normal(0.0, stdev, size=x5.shape, device=x5.device).add_(x5)  # Captum's draw: x + noise

            def inputs(chunk, noisy=noisy):
                return torch.stack([noisy[column.grid.slices(loc)] for loc in chunk])

            if one_pass:
                def per_patch(g, region, noisy=noisy):
                    value = finish(g[0:1], noisy[region], params)
                    return value * value if square else value
                _add(column, total, inputs, 1, per_patch)
                continue
            sample = torch.zeros_like(x5)
            _add(column, sample, inputs, 1, lambda g, region: g[0:1])
            for slab in _slabs(x5, int(column.grid.size[0])):
                value = finish(sample[slab], noisy[slab], params)
                total[slab] += value * value if square else value
            del sample
        return total.div_(int(nt["nt_samples"]))

    return compute


def _saliency(grad: torch.Tensor, x: torch.Tensor, params: dict) -> torch.Tensor:
    return grad.abs() if params.get("abs", True) else grad


def _input_x_gradient(grad: torch.Tensor, x: torch.Tensor, params: dict) -> torch.Tensor:
    return x * grad if params.get("multiply_by_inputs", True) else grad


def occlusion(column, x5: torch.Tensor, params: dict, nt: dict | None) -> torch.Tensor | None:
    """Occlusion (Zeiler & Fergus 2014, arXiv:1311.2901) as Captum computes it: each block of
    ``sliding_window_shapes`` at ``strides`` (the first axis moving fastest, blocks clipped at the
    border) replaced by the baseline, ``S(x) − S(x with the block occluded)`` added over the
    block, the sum divided by how many blocks cover each voxel. Where patches tile the input the
    score is a sum over patches, so only the patches a block touches are recomputed (with the
    block occluded in them, made per patch), ``patch.batch_size × perturbations_per_eval`` per call."""
    baseline = _baseline(params.get("baselines"), x5)
    window, strides = params.get("sliding_window_shapes"), params.get("strides") or 1
    if (nt is not None or baseline is None or not column.separable or params.get("additional_forward_args")
            is not None or not isinstance(window, (tuple, list)) or not isinstance(strides, (int, tuple, list))):
        return None
    dims = x5.ndim - 1  # (C, *spatial) of the volume view
    window = tuple(window) + (1,) * (dims - len(window))
    strides = (tuple(strides) + (1,) * (dims - len(strides))) if not isinstance(strides, int) else (strides,) * dims
    shape = tuple(x5.shape[1:])
    if len(window) != dims or any(w > n for w, n in zip(window, shape)):
        return None
    counts = [int(np.ceil((n - w) / s)) + 1 for n, w, s in zip(shape, window, strides)]
    grid, locations = column.grid, list(column.grid.locations)
    per_call = max(1, column.stitched.batch_size)
    initial = torch.cat([column.values(chunk, torch.cat([x5[grid.slices(loc)] for loc in chunk]))
                         for chunk in column.grid.chunks(per_call)])
    result = torch.zeros_like(x5)
    pending: list[tuple[int, int, torch.Tensor]] = []  # (feature, window index, occluded patch); whole features
    blocks: dict[int, tuple[slice, ...]] = {}

    def evaluate() -> None:
        diffs: dict[int, list] = {}
        modified = column.values([locations[j] for _, j, _ in pending], torch.stack([p for _, _, p in pending]))
        for (feature, j, _), value in zip(pending, modified):
            diffs.setdefault(feature, []).append(initial[j] - value)
        for feature, values in diffs.items():  # in Captum's order
            result[(slice(None),) + blocks.pop(feature)] += torch.stack(values).sum()
        pending.clear()

    for feature in range(int(np.prod(counts))):
        offsets, rest = [], feature
        for count, stride in zip(counts, strides):  # Captum's order: the first axis fastest
            offsets.append((rest % count) * stride)
            rest //= count
        block = tuple(slice(o, min(o + w, n)) for o, w, n in zip(offsets, window, shape))
        touched = [j for j, loc in enumerate(locations)
                   if all(b.start < int(hi) and int(lo) < b.stop for b, lo, hi in zip(block[1:], loc[:3], loc[3:]))]
        if len(pending) + len(touched) > per_call:
            evaluate()
        for j in touched:
            loc = locations[j]
            patch = x5[grid.slices(loc)][0].clone()
            inside = (block[0],) + tuple(slice(max(b.start, int(lo)) - int(lo), min(b.stop, int(hi)) - int(lo))
                                         for b, lo, hi in zip(block[1:], loc[:3], loc[3:]))
            whole = (block[0],) + tuple(slice(max(b.start, int(lo)), min(b.stop, int(hi)))
                                        for b, lo, hi in zip(block[1:], loc[:3], loc[3:]))
            patch[inside] = _window(baseline, (slice(0, 1),) + whole)[0] if torch.is_tensor(baseline) else baseline
            pending.append((feature, j, patch))
        blocks[feature] = block
    if pending:
        evaluate()
    # each voxel's count of covering blocks: a product of per-axis counts
    cover = []
    for n, w, s, count in zip(shape, window, strides, counts):
        axis = torch.zeros(n, dtype=x5.dtype, device=x5.device)
        for k in range(count):
            axis[k * s:min(k * s + w, n)] += 1
        cover.append(axis)
    for slab in _slabs(x5, int(column.grid.size[0])):
        weights = cover[0].view(-1, 1, 1, 1) * cover[1][slab[2]].view(1, -1, 1, 1) * cover[2].view(1, 1, -1, 1) \
            * cover[3].view(1, 1, 1, -1)
        result[slab] /= weights
    return result


#: The methods computed here in global patch mode, by id (the rest go to their adapter).
ALGORITHMS: Mapping[str, Callable[..., torch.Tensor | None]] = {
    "captum.IntegratedGradients": integrated_gradients,
    "captum.Saliency": _gradient_method(_saliency, linear=False),
    "captum.InputXGradient": _gradient_method(_input_x_gradient, linear=True),
    "captum.Occlusion": occlusion,
}
