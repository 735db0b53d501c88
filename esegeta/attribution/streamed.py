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
DeepLIFT and LRP (Captum's, and zennit's composites) call their library per patch batch, seeded
with the patch's share of what enters the stitched output; zennit's ``Gradient`` and
``IntegratedGradients`` attributors without a composite are the gradient and path algorithms
with zennit's arithmetic (tests: equal to zennit on the whole stitched model).
Calls these algorithms do not cover (convergence delta, additional forward arguments, tuple
baselines, VarGrad, baselines drawn from a distribution, custom wrappers) go to Captum
(:func:`esegeta.attribution.guard.run_guarded`).
"""
from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from esegeta.attribution.baselines import make_baselines
from esegeta.attribution.guard import restored, run_guarded
from esegeta.attribution.rules import PairedSoftmax, applies, attention_names
from esegeta.hooks import removing
from esegeta.spec.registry import Call, MethodSpec


#: The key of ``Call.extras`` under which :func:`run` says how a global-patch result was computed
#: (the runner moves it into the manifest record's ``provenance``; it is no output to save).
PROVENANCE = "provenance"


def run(spec: MethodSpec, call: Call, *, network: nn.Module | None = None, sample: torch.Tensor | None = None
        ) -> torch.Tensor:
    """The call computed by esegeta's streamed algorithm for ``spec`` where one applies (a built-in
    wrapper's stitched score, parameters it covers), else by the method's adapter on the stitched
    model; which one is noted in ``call.extras[PROVENANCE]``. ``network``: the prepared network
    the stitched model runs patch by patch, named as the call's network for the streamed
    algorithms and the rule methods (LRP, DeepLIFT: their substitutes, rule maps by layer name),
    as each patch's call names it; its structure is read on ``sample`` (the first patch), so the
    substitutes' trace never runs a stitched output at the volume's size. The call is changed in
    place: what reads it after the run (the axiom check's record of how LRP crossed the branches)
    reads the same network (on the stitched model that trace held ~1.5 volumes at 256³)."""
    algorithm = algorithm_of(spec)
    if network is not None and (algorithm is not None or applies(spec)):
        if sample is not None:
            attention_names(network, sample)  # remembered per network: the whole call's trace reads it
        call.network = network
    column_of = getattr(call.forward, "column", None)
    result = None
    if algorithm is not None and column_of is not None and call.target is not None and call.inputs.shape[0] == 1:
        params = _values(spec.parameters(), call.params)
        nt = _values(spec.noise_tunnel_parameters() or {}, call.noise_tunnel) if call.noise_tunnel is not None else None
        with restored(call.forward, call.network):
            result = algorithm(column_of(call.target), _volume(call.inputs.detach()), params, nt,
                               **({"spec": spec, "call": call} if algorithm in _PER_PATCH_UPSTREAM else {}))
    if result is None:
        call.extras[PROVENANCE] = {"computed_by": f"{spec.id} on the stitched model (global patches)"}
        return run_guarded(spec, call)
    upstream = f"; {spec.id} per patch batch" if algorithm in _PER_PATCH_UPSTREAM else ""
    call.extras[PROVENANCE] = {"computed_by": f"esegeta.attribution.streamed.{algorithm.__name__} "
                                              f"(global patches, streamed{upstream})"}
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
    return _path_integral(column, x5, baseline, list(alphas), list(step_sizes),
                          params.get("multiply_by_inputs", True))


def zennit_integrated_gradients(column, x5: torch.Tensor, params: dict, nt: dict | None) -> torch.Tensor | None:
    """zennit's ``IntegratedGradients`` attributor without a composite: ``(x − b) · Σ_k ∂S/∂x(b +
    α_k(x − b)) / n`` with ``α_k = torch.linspace(1/n, 1, n)`` and the baseline its adapter makes
    from ``baseline_fn`` on the whole input (zeros by default)."""
    if not _plain_zennit(params, nt):
        return None
    n = int(params["n_iter"])
    value = params.get("baseline_fn")
    x = x5.squeeze(-1) if column.stitched.dims == 2 else x5  # the baseline of the input as the adapter sees it
    baseline = 0.0 if value is None else _baseline(make_baselines(value, x, "params.baseline_fn"), x5)
    if baseline is None:
        return None
    alphas = torch.linspace(1.0 / n, 1.0, n).tolist()
    return _path_integral(column, x5, baseline, alphas, [1.0 / n] * n, True)


def _plain_zennit(params: dict, nt: dict | None) -> bool:
    """A zennit attributor entry without a composite, a trace or a noise tunnel: a plain gradient method."""
    return nt is None and params.get("composite") is None and not params.get("trace")


def _path_integral(column, x5: torch.Tensor, baseline: torch.Tensor | float, alphas: list[float],
                   step_sizes: list[float], multiply: bool) -> torch.Tensor:
    """``Σ_s w_s ∂S/∂x(b + α_s(x − b))`` (times ``x − b`` where ``multiply``), the steps as many at a
    time as the method's rows where patches tile the input, each step's input made per patch."""
    rows = column.rows(column.stitched.rows)
    result = torch.zeros_like(x5)
    for start in range(0, len(alphas), rows):
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
    if multiply:
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

    compute.__name__ = finish.__name__.strip("_")
    return compute


def _saliency(grad: torch.Tensor, x: torch.Tensor, params: dict) -> torch.Tensor:
    return grad.abs() if params.get("abs", True) else grad


def _input_x_gradient(grad: torch.Tensor, x: torch.Tensor, params: dict) -> torch.Tensor:
    return x * grad if params.get("multiply_by_inputs", True) else grad


def _gradient(grad: torch.Tensor, x: torch.Tensor, params: dict) -> torch.Tensor:
    return grad


def _plain_zennit_only(algorithm: Callable[..., torch.Tensor | None]) -> Callable[..., torch.Tensor | None]:
    """``algorithm`` for a zennit attributor entry, where it runs without a composite or a trace."""
    def compute(column, x5: torch.Tensor, params: dict, nt: dict | None) -> torch.Tensor | None:
        return algorithm(column, x5, params, nt) if _plain_zennit(params, nt) else None

    compute.__name__ = f"zennit_{algorithm.__name__}"
    return compute


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


class _PatchShare(nn.Module):
    """A patch batch's share of the stitched score, linearised at the output: per row, one in value
    with the gradient ``seed`` with respect to the network's output ``y`` on the patches (``Σ y ·
    seed − its value + 1``). DeepLIFT's multipliers and LRP's relevances are linear in the seed
    (for fixed forward activations), so each patch gets its part of the whole input's; a value of
    one leaves LRP's relevance as propagated (Captum multiplies it by the output). The arithmetic
    here is no module: the methods' rules act only inside the network, as in the stitched call.
    DeepLIFT's second half of the rows (the baselines) gets the same seed. ``seed`` is a tensor, or
    a function of the (detached) output that makes it: where patches tile the input, from the
    patch's own output, with no forward pass of its own."""

    def __init__(self, stitched, seed: torch.Tensor | Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.stitched, self.seed = stitched, seed

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        y = self.stitched.outputs(_volume(patches))
        seed = self.seed(y.detach()) if callable(self.seed) else self.seed
        seed = seed.repeat(y.shape[0] // seed.shape[0], *(1,) * (seed.ndim - 1))
        share = (y * seed.to(y.dtype)).flatten(1).sum(1)
        return share - share.detach() + 1


def _explain_patches(spec: MethodSpec, call: Call, column, x5: torch.Tensor, seeds, baseline=None) -> torch.Tensor:
    """Σ over patch batches of the method's upstream call (guarded, the adapter's rules) on
    :class:`_PatchShare` with each batch's ``seeds``, added into one result volume (a ``baseline``
    sliced per patch, as a tensor)."""
    grid, dims = column.grid, call.inputs.ndim - 2
    result = torch.zeros_like(x5)
    upstream = {k: v for k, v in call.params.items() if k != "baselines"}
    for chunk, seed in seeds:
        inputs = torch.cat([x5[grid.slices(loc)] for loc in chunk])
        params = dict(upstream)
        if baseline is not None:
            params["baselines"] = torch.cat([_full(_window(baseline, grid.slices(loc)), x5[grid.slices(loc)])
                                             for loc in chunk])
            params["baselines"] = params["baselines"].squeeze(-1) if dims == 2 else params["baselines"]
        # the network is the prepared model, not the stitched one: what the method's guards trace
        # (rules.attention_names) runs on the patch, never a stitched output at the volume's size
        patch_call = dataclasses.replace(call, forward=_PatchShare(column.stitched, seed), target=None,
                                         network=column.stitched.model,
                                         inputs=inputs.squeeze(-1) if dims == 2 else inputs, params=params,
                                         noise_tunnel=None)
        attr = _volume(run_guarded(spec, patch_call).detach())
        for loc, a in zip(chunk, attr):
            result[grid.slices(loc)] += a
    return result


def _rule(activation: nn.Module) -> str | None:
    """Which DeepLIFT rule acts on the wrapper's activation: ``"paired"`` for a softmax (the exact
    multiplier it gets while DeepLIFT runs whole, :class:`esegeta.attribution.rules.PairedSoftmax`),
    else Captum's (``captum.attr._core.deep_lift.SUPPORTED_NON_LINEAR``): ``"rescale"`` (Captum's
    ``nonlinear``), ``"softmax"``, ``"gradient"`` (no rule: an identity); None for another rule."""
    from captum.attr._core import deep_lift

    if isinstance(activation, (nn.Softmax, PairedSoftmax)) and isinstance(activation.dim, int):
        return "paired"
    rule = deep_lift.SUPPORTED_NON_LINEAR.get(type(activation))
    return {None: "gradient", deep_lift.nonlinear: "rescale", deep_lift.softmax: "softmax"}.get(rule)


def _output_multipliers(column, out: torch.Tensor, region: tuple[slice, ...], eps: float
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepLIFT's multipliers of the column with respect to the output ``out`` (rows: input,
    baseline) on ``region``, by Captum's rule for the wrapper's activation (:func:`_rule`; the
    rescale rule ``Δa/Δo``, the gradient where ``|Δo| < eps``). Returns the input row's multipliers
    and the sum over both rows of all the multipliers: Captum's ``softmax`` rule subtracts their
    mean over the whole tensor, which the caller does once every region is seen."""
    from captum.attr._core import deep_lift

    activation = column.score.activation
    value = column.mask(region).to(out.dtype) * column.scale  # ∂column/∂(activated output), its channel
    grad_out = torch.zeros_like(out).index_copy_(1, column.channel, value.expand(out.shape[0], *value.shape[1:]))
    rule = _rule(activation)
    if rule == "gradient":
        return grad_out[0:1], grad_out.sum()
    if rule == "paired":  # per voxel over the classes: each region's multipliers are its own
        with torch.enable_grad():
            o = out.detach().requires_grad_(True)
            (grad_in,) = torch.autograd.grad(PairedSoftmax(activation.dim)(o), o, grad_out)
        return grad_in[0:1], grad_in.sum()
    with torch.enable_grad():
        o = out.detach().requires_grad_(True)
        a = activation(o)
        (grad_in,) = torch.autograd.grad(a, o, grad_out)
    multipliers = deep_lift.nonlinear(activation, o.detach(), a.detach(), grad_in, grad_out, eps=eps)
    return multipliers[0:1], multipliers.sum()


def deeplift(column, x5: torch.Tensor, params: dict, nt: dict | None, *, spec: MethodSpec, call: Call
             ) -> torch.Tensor | None:
    """DeepLIFT (Shrikumar et al. 2017, arXiv:1704.02685) as Captum computes it on the stitched
    score, patch by patch. The multipliers are linear in the output's multipliers for fixed forward
    activations, and the stitched output is a weighted sum of patch outputs: so the whole input's
    multipliers are the sum over patches of each patch's, seeded with the score's multipliers on the
    blended output (the wrapper's activation by the rescale rule between the blended outputs of the
    input and the baseline, :func:`_output_multipliers`) times the patch's share of the blend. Each
    patch's part is Captum's own ``DeepLift`` (through :func:`run_guarded`: the adapter's rules and
    guards) on :class:`_PatchShare`; results ``(x − b) · multipliers`` add into one volume."""
    baseline = _baseline(params.get("baselines"), x5)
    if (nt is not None or baseline is None or params.get("additional_forward_args") is not None
            or params.get("return_convergence_delta") or params.get("custom_attribution_func") is not None):
        return None
    rule = _rule(column.score.activation)
    if rule is None:
        return None
    eps = float(params.get("eps", 1e-10))
    grid, per_call = column.grid, _patches_per_call(column)

    def pairs(chunk):  # (P, 2, C, *size): each patch of the input and of the baseline
        return torch.stack([torch.cat([x5[grid.slices(loc)], _full(_window(baseline, grid.slices(loc)),
                                                                   x5[grid.slices(loc)])]) for loc in chunk])

    normalise = rule == "softmax"
    seeds = _tiled_seeds(column, pairs, per_call, eps, normalise) if column.separable else \
        _blended_seeds(column, pairs, per_call, eps, normalise, x5.device)
    return _explain_patches(spec, call, column, x5, seeds, baseline)


def _full(value: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    return value if torch.is_tensor(value) else torch.full_like(like, value)


def _tiled_seeds(column, pairs: Callable, per_call: int, eps: float, normalise: bool):
    """Where patches tile the input: each patch's seed from its own outputs (the score is a sum over
    patches), made inside the upstream call's forward pass; Captum's softmax normalisation needs a
    first pass (no gradients) over every patch for its mean."""
    grid, stitched = column.grid, column.stitched

    def multipliers(chunk, y: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per patch of ``chunk``: from ``y``, the outputs of its input rows, then of its baseline rows."""
        n = len(chunk)
        return [_output_multipliers(column, torch.cat([y[i:i + 1], y[n + i:n + i + 1]]), grid.slices(loc), eps)
                for i, loc in enumerate(chunk)]

    shift = 0.0
    if normalise:  # Captum's softmax rule: minus the mean over both rows, all channels, all voxels
        total, channels = 0.0, 1
        for chunk in grid.chunks(per_call):
            with torch.no_grad():
                y = stitched.outputs(pairs(chunk).transpose(0, 1).flatten(0, 1))
            total, channels = total + sum(m[1] for m in multipliers(chunk, y)), y.shape[1]
        shift = total / (2 * channels * int(np.prod(grid.shape)))
    for chunk in grid.chunks(per_call):
        yield chunk, lambda y, chunk=chunk: torch.cat([m[0] for m in multipliers(chunk, y)]) - shift


def _blended_seeds(column, pairs: Callable, per_call: int, eps: float, normalise: bool, device: torch.device):
    """Where patches overlap: the blended outputs of the input and the baseline (two rows at the
    volume's size), turned slab by slab into the input row's multipliers; each patch's seed is its
    region of them times its blending weight ``w / Σ w``."""
    stitched, grid = column.stitched, column.grid
    out = stitched.blended(pairs, 2, device, per_call * 2)
    window, total = stitched.weights(device)
    multiplier_sum = 0.0
    for slab in _slabs(out, int(grid.size[0])):
        first, both = _output_multipliers(column, out[slab], slab, eps)
        out[slab][0:1] = first
        multiplier_sum = multiplier_sum + both
    multipliers = out[0:1]
    if normalise:  # Captum's softmax rule: minus the mean over both rows, all channels, all voxels
        multipliers -= multiplier_sum / out.numel()
    multipliers /= total
    for chunk in grid.chunks(per_call):
        yield chunk, torch.cat([multipliers[grid.slices(loc)] * window for loc in chunk])


def _patches_per_call(column) -> int:
    """Patches per upstream call: the patch batch (the stitched model's rows per patch divided out)."""
    return max(1, column.stitched.batch_size // max(1, column.stitched.rows))


def _relevance(column, out: torch.Tensor, region: tuple[slice, ...]) -> torch.Tensor:
    """The column's relevance on the output ``out`` over ``region`` as LRP hands it to the network
    with esegeta's rules on the wrapper (:func:`esegeta.adapters.captum.lrp_rule_for`): the masked
    sum's ε rule gives each voxel its term ``a · mask · scale`` of the score, the activation's
    identity rule passes it on to the output (the ε rule's ``S / (S + ε)``, ε = 1e-9, left out)."""
    activated = column.score.activation(out).index_select(1, column.channel)
    value = activated * column.mask(region).to(out.dtype) * column.scale
    return torch.zeros_like(out).index_copy_(1, column.channel, value)


def lrp(column, x5: torch.Tensor, params: dict, nt: dict | None, *, spec: MethodSpec, call: Call
        ) -> torch.Tensor | None:
    """Layer-wise relevance propagation (Bach et al. 2015, doi:10.1371/journal.pone.0130140) as
    Captum's ``LRP`` with esegeta's rules computes it on a wrapped model, on the stitched score,
    patch by patch. Captum's LRP refuses a module called more than once, so it cannot run on the
    stitched model itself; what it would give there: the relevance entering the stitched output
    (:func:`_relevance`) shared among the patches by their blending weights ``w / Σ w`` (the blend
    is linear, relevance flows through it as a gradient), then each patch's network by the layers'
    rules. Relevance is linear in what enters the network (for fixed forward activations), so each
    patch's part is Captum's own ``LRP`` (through :func:`run_guarded`: the adapter's rules) on
    :class:`_PatchShare` seeded with its share; the parts add into one result volume. Equal to
    Captum's LRP on the whole input where the stitched prediction is the whole one (tests)."""
    if (nt is not None or params.get("additional_forward_args") is not None
            or params.get("return_convergence_delta")):
        return None
    grid, stitched, per_call = column.grid, column.stitched, _patches_per_call(column)

    def patches(chunk):  # (P, C, *size)
        return torch.cat([x5[grid.slices(loc)] for loc in chunk])

    def seeds():
        if column.separable:  # each voxel's relevance from its one patch's output, in the upstream's forward
            for chunk in grid.chunks(per_call):
                yield chunk, lambda y, chunk=chunk: torch.cat([_relevance(column, y[i:i + 1], grid.slices(loc))
                                                               for i, loc in enumerate(chunk)])
            return
        out = stitched.blended(lambda chunk: patches(chunk)[:, None], 1, x5.device, per_call)
        window, total = stitched.weights(x5.device)
        for slab in _slabs(out, int(grid.size[0])):
            out[slab] = _relevance(column, out[slab], slab) / total[slab[2:]]
        for chunk in grid.chunks(per_call):
            yield chunk, torch.cat([out[grid.slices(loc)] * window for loc in chunk])

    return _explain_patches(spec, call, column, x5, seeds())


def _stabilised(z: torch.Tensor, epsilon: float) -> torch.Tensor:
    """zennit's ε-stabilised denominator (``zennit.core.stabilize``: ``z + ε·sign(z)``, +ε at 0), with
    the ε its adapter gives the wrapper's masked sum."""
    return z + ((z == 0).to(z) + z.sign()) * epsilon


def _zennit_relevance(column, out: torch.Tensor, region: tuple[slice, ...], score: torch.Tensor, rule
                      ) -> torch.Tensor:
    """The column's relevance on the output ``out`` over ``region`` as a zennit LRP composite hands
    it to the network on the wrapped model (:mod:`esegeta.adapters.zennit`): the masked sum's ε rule
    gives each voxel ``a · mask · scale / stabilised(score)`` (its share of a seed of one), then the
    composite's rule on the activation (``rule``: a zennit hook, registered for this pass only; None:
    its gradient) passes it to the output."""
    with torch.enable_grad(), removing() as handles:
        if rule is not None:
            handles.append(rule.copy().register(column.score.activation))
        o = out.detach().requires_grad_(True)
        activated = column.score.activation(o)
        share = activated.index_select(1, column.channel).detach() * column.mask(region).to(out.dtype) \
            * column.scale / score
        seed = torch.zeros_like(activated).index_copy_(1, column.channel, share)
        (relevance,) = torch.autograd.grad(activated, o, seed)
    return relevance


def zennit_lrp(column, x5: torch.Tensor, params: dict, nt: dict | None, *, spec: MethodSpec, call: Call
               ) -> torch.Tensor | None:
    """A zennit LRP composite (Bach et al. 2015; Montavon et al. 2019, doi:10.1007/978-3-030-28954-6_10)
    as zennit computes it with esegeta's adapter on the wrapped stitched model, patch by patch: the
    relevance entering the stitched output (:func:`_zennit_relevance`, the score's ε denominator from
    the wrapper's unperturbed score, or from the blended output where patches overlap) shared among
    the patches by their blending weights (the blend passes relevance as a gradient), then each
    patch's part is the composite's own call (through :func:`run_guarded`: the adapter's rules,
    canonizers and guards) on :class:`_PatchShare` seeded with its share. Every LRP rule is linear
    in the relevance it receives, for fixed forward activations, so the parts add up to the whole
    call's (:func:`esegeta.adapters.zennit.seed_linear`: not the ReLU rules that clip its sign, not
    ``trace``). The z^B rule's default bounds are the whole input's
    (:func:`esegeta.adapters.zennit.volume_bounds`)."""
    zennit = spec.adapter  # esegeta.adapters.zennit's composite adapter (above this module: read, not imported)
    if nt is not None or not zennit.seed_linear(call.params):
        return None
    call = dataclasses.replace(call, params=zennit.volume_bounds(spec.name, call.params, call.inputs))
    rule = zennit.head_activation_rule(spec.name, call.params, call, column.score.activation)
    grid, stitched, per_call = column.grid, column.stitched, _patches_per_call(column)

    def seeds():
        if column.separable:  # each voxel's relevance from its one patch's output, in the upstream's forward
            score = _stabilised(call.forward.unperturbed[0].index_select(0, column.index).to(x5.dtype),
                                 zennit.head_epsilon)
            for chunk in grid.chunks(per_call):
                yield chunk, lambda y, chunk=chunk: torch.cat([
                    _zennit_relevance(column, y[i:i + 1], grid.slices(loc), score, rule)
                    for i, loc in enumerate(chunk)])
            return
        out = stitched.blended(lambda chunk: torch.cat([x5[grid.slices(loc)] for loc in chunk])[:, None], 1,
                               x5.device, per_call)
        window, total = stitched.weights(x5.device)
        slabs = list(_slabs(out, int(grid.size[0])))
        score = _stabilised(sum(column.value(out[slab], slab) for slab in slabs), zennit.head_epsilon)
        for slab in slabs:
            out[slab] = _zennit_relevance(column, out[slab], slab, score, rule) / total[slab[2:]]
        for chunk in grid.chunks(per_call):
            yield chunk, torch.cat([out[grid.slices(loc)] * window for loc in chunk])

    return _explain_patches(spec, call, column, x5, seeds())


def algorithm_of(spec: MethodSpec) -> Callable[..., torch.Tensor | None] | None:
    """The streamed algorithm that computes ``spec`` in global mode, or None (its adapter runs it on
    the stitched model): Captum's by id (:data:`ALGORITHMS`), a library's where its adapter names one
    (its ``streams(spec)``, e.g. zennit's LRP composites: :data:`LIBRARY_ALGORITHMS`)."""
    found = ALGORITHMS.get(spec.id)
    streams = getattr(spec.adapter, "streams", None)
    return found if found is not None or streams is None else LIBRARY_ALGORITHMS.get(streams(spec))


def covers(spec: MethodSpec, params: Mapping[str, Any], noise_tunnel: Mapping[str, Any] | None) -> bool:
    """Whether global mode computes ``spec`` with ``params`` as a streamed algorithm here (as far as
    the request tells before the run; the algorithms may still hand a call to the adapter)."""
    algorithm = algorithm_of(spec)
    if algorithm is None:
        return False
    if algorithm is zennit_lrp:
        return noise_tunnel is None and spec.adapter.seed_linear(params)
    if spec.library.name == "zennit":
        return _plain_zennit(dict(params), noise_tunnel)
    return True


def activation_factor(spec: MethodSpec, default: float) -> float:
    """One patch batch's upstream memory in the patch's forward activations (:data:`ACTIVATION_FACTOR`)."""
    if spec.id in ACTIVATION_FACTOR:
        return ACTIVATION_FACTOR[spec.id]
    return ZENNIT_LRP_FACTOR.get(spec.name, 6.2) if algorithm_of(spec) is zennit_lrp else default


#: The methods computed here in global patch mode, by id (the rest go to their adapter, but for
#: :data:`LIBRARY_ALGORITHMS`).
ALGORITHMS: Mapping[str, Callable[..., torch.Tensor | None]] = {
    "captum.IntegratedGradients": integrated_gradients,
    "captum.Saliency": _gradient_method(_saliency, linear=False),
    "captum.InputXGradient": _gradient_method(_input_x_gradient, linear=True),
    "captum.Occlusion": occlusion,
    "captum.DeepLift": deeplift,
    "captum.LRP": lrp,
}
#: The streamed algorithms an adapter names for its methods (``adapter.streams(spec)``): zennit's
#: LRP composites (every composite that conserves relevance, not the gradient-modifying ones), its
#: ``Gradient`` and ``IntegratedGradients`` attributors without a composite.
LIBRARY_ALGORITHMS: Mapping[str, Callable[..., torch.Tensor | None]] = {
    "zennit_lrp": zennit_lrp,
    "zennit_gradient": _plain_zennit_only(_gradient_method(_gradient, linear=True)),
    "zennit_integrated_gradients": zennit_integrated_gradients,
}
#: Methods whose upstream cannot run on the stitched model, with the reason: global mode needs the
#: streamed algorithm for them (:func:`esegeta.attribution.patcher.check_global`).
STREAMED_ONLY: Mapping[str, str] = {
    "captum.LRP": "Captum's LRP refuses a module called more than once, and the stitched model calls the "
                  "network once per patch batch",
}
#: Rows of the stitched output an algorithm holds at the volume's size where patches overlap (one
#: where not listed; DeepLIFT: the input's and the baseline's).
BLENDED_ROWS: Mapping[str, int] = {"captum.DeepLift": 2}
#: Memory of one patch batch's upstream call, in the patch's forward activations, where it is not
#: the 1.2 of a plain gradient (:data:`esegeta.run.check.STREAMED_ACTIVATIONS`): DeepLIFT runs the
#: input's and the baseline's rows and Captum's hooks clone each nonlinear module's input and
#: output; Captum's LRP clones each layer's output and keeps its input over two forward passes.
#: Calibrated on ``benchmarks/patch_memory.py`` (the tiny segmenter, one 64³ patch: DeepLIFT 186 MiB,
#: LRP 114 MiB for 37 MiB of activations). zennit's composites keep each hooked layer's input and
#: output and run a modified forward per rule term (one 64³ patch: EpsilonPlus 132 MiB, EpsilonAlpha2Beta1
#: 211, EpsilonGammaBox 227: z^B's three passes on the first layer); composites of rule maps: the largest.
ACTIVATION_FACTOR: Mapping[str, float] = {"captum.DeepLift": 5.0, "captum.LRP": 3.1}
#: zennit's LRP composites by name (6.2 where not listed).
ZENNIT_LRP_FACTOR: Mapping[str, float] = {"EpsilonPlus": 3.6, "EpsilonPlusFlat": 3.6, "ExcitationBackprop": 3.6,
                                          "EpsilonAlpha2Beta1": 5.8, "EpsilonAlpha2Beta1Flat": 5.8}
#: The algorithms that call the method's upstream per patch (they get its spec and call).
_PER_PATCH_UPSTREAM = (deeplift, lrp, zennit_lrp)
