"""The shared interface of esegeta's explanation metrics.

A metric is a function ``fn(ctx, x, attribution, target, **params) -> MetricResult`` over a
batch: ``x`` is (B, C, *S) with two or three spatial axes, ``attribution`` is (B, C|1, *S) on
the same device, ``target`` is (B,) long (the score each attribution explains). What a metric
may use besides the data is in a :class:`Context`: the forward (batch -> (N, K) scores), the
model (for randomisation), a re-explain callable, a ground-truth mask and a seeded generator.
Metrics stack the perturbations of many inputs and steps into one tensor and call
:meth:`Context.scores`, which runs the forward in chunks of at most ``max_batch`` inputs.

Every metric is one :class:`MetricSpec` in one registry (:func:`register`, :func:`all_metrics`,
:func:`metric`); the spec names the paper, the parameter defaults, whether higher is better,
what the metric needs, and how many forward passes it costs per input.
"""
from __future__ import annotations

import copy
import importlib
import inspect
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx.experimental.optimization
from torch import Tensor, nn

from esegeta.errors import ConfigError, did_you_mean

__all__ = [
    "Context", "SharedPasses", "MetricResult", "channels_last", "inference_copy",
    "MetricSpec", "Rule", "METRIC_MODULES", "NEEDS", "GROUPS",
    "register", "all_metrics", "metric", "keyword_defaults",
]

#: What a metric may need from the context beyond the forward.
NEEDS = frozenset({"model", "explain", "mask"})
#: The metric groups, in the order they are listed.
GROUPS = ("faithfulness", "randomisation", "localisation", "robustness", "complexity")
#: Modules of esegeta.evaluation whose import registers metrics.
METRIC_MODULES = ("faithfulness", "road", "randomisation", "localisation", "robustness", "complexity")


def _deepcopy(model: nn.Module, x: Tensor) -> nn.Module:
    return copy.deepcopy(model)


def _plain_forward(model: nn.Module) -> Callable[[Tensor], Tensor]:
    """The model's scores, in eval mode and without gradients (the model's mode is restored). A model
    wholly in eval mode (as the inference copy) is called as it is: ``eval()`` and ``train()`` walk
    every module (~6 ms per call on mobilenet_v3_small, 16 % of a 16-input pass at 224²)."""

    wholly_eval = not any(m.training for m in model.modules())

    def forward(x: Tensor) -> Tensor:
        if wholly_eval and not model.training:
            with torch.no_grad():
                return model(x)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                return model(x)
        finally:
            model.train(was_training)

    return forward


def channels_last(x: Tensor) -> Tensor:
    """``x`` (N, C, *S) stored channels last on the CPU (the values and the logical shape unchanged),
    the layout of :func:`inference_copy`'s weights. Elsewhere, or with one channel, ``x`` as it is."""
    if x.device.type != "cpu" or x.dim() not in (4, 5) or x.shape[1] == 1:
        return x
    return x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)


#: Packages whose modules' forward code :func:`inference_copy` traces: tracing runs a forward on
#: symbolic values, and a user's own forward may write state on the way (a counter in a class
#: attribute), which the trace would corrupt; these libraries' forwards write none.
TRACED_PACKAGES = ("torch", "torchvision", "timm", "monai")
#: What tracing a model for :func:`inference_copy` raises where its forward cannot be traced
#: (data-dependent control flow, untraceable calls): the copy is then left unfolded.
UNTRACEABLE = (torch.fx.proxy.TraceError, TypeError, AttributeError, NotImplementedError, RuntimeError, ValueError,
               AssertionError, KeyError, IndexError)

log = logging.getLogger("esegeta")


def inference_copy(model: nn.Module) -> nn.Module | None:
    """An evaluation-only copy of ``model`` for the metrics' no-grad forward passes on the CPU, made
    once per evaluation: in eval mode, every BatchNorm that only follows a convolution folded into
    it (``torch.fx``'s ``fuse``, PyTorch's own inference fusion), its convolution weights and the
    inputs it is given stored channels last (:class:`ChannelsLastInput`), the layout oneDNN's
    convolutions run fastest (torchvision resnet18 at 224², one thread: 1.15-1.2x the channels-last
    input alone, ~1.4x the default layout; a MONAI 3D UNet at 64³ 1.14x; values within 1e-6
    relative). A channels-last input to a model whose weights are not is slower (2.3x at 64², batch
    1), so only the copy takes its inputs so. It costs one more copy of the weights. A model with
    hooks (which a traced copy would lose), with a module whose code is not from
    :data:`TRACED_PACKAGES`, or whose forward cannot be traced is copied without folding. None
    where ``deepcopy`` refuses the model (tensors of an autograd graph in its attributes): the
    caller scores with the model itself then. The user's model is not touched."""
    try:
        ready = copy.deepcopy(model).eval().requires_grad_(False)
    except RuntimeError as exc:
        log.debug("no evaluation copy: the model cannot be deep-copied (%s)", exc)
        return None
    if all(_traceable(m) for m in ready.modules()):
        try:
            ready = torch.fx.experimental.optimization.fuse(ready, inplace=True)
        except UNTRACEABLE as exc:
            log.debug("evaluation copy left unfolded: the model cannot be traced (%s: %s)", type(exc).__name__, exc)
    for tensor in (*ready.parameters(), *ready.buffers()):
        if tensor.dim() in (4, 5):
            tensor.data = tensor.data.contiguous(memory_format=torch.channels_last if tensor.dim() == 4
                                                 else torch.channels_last_3d)
    return ChannelsLastInput(ready).eval()


class ChannelsLastInput(nn.Module):
    """``module`` called with its input stored channels last (:func:`channels_last`): the inference
    copy, whose weights are."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: Tensor) -> Tensor:
        return self.module(channels_last(x))


#: Values per input from which :func:`inference_copy` scores faster than the model itself, and the
#: forward passes over which it pays for its making: torchvision resnet18, one thread, ms per input at
#: batch 8 plain/copy: 32² 1.89/1.84, 64² 4.17/4.46, 128² 11.4/10.1, 224² 36.3/26.8; the copy takes
#: ~0.15 s to make (deep copy, trace, folding), ~15 passes' saving at 224².
INFERENCE_COPY_MIN_VALUES = 3 * 128 * 128
INFERENCE_COPY_MIN_PASSES = 16


def copy_pays_off(values: int, passes: int) -> bool:
    """Whether an :func:`inference_copy` is worth making for ``passes`` forward passes of inputs of
    ``values`` values each (see :data:`INFERENCE_COPY_MIN_VALUES`): not for small inputs, where
    the plain model is as fast, nor for a few passes (random logit: its one target pass)."""
    return values >= INFERENCE_COPY_MIN_VALUES and passes >= INFERENCE_COPY_MIN_PASSES


def _traceable(module: nn.Module) -> bool:
    """No hook, and the forward code of one of :data:`TRACED_PACKAGES` (see :func:`inference_copy`)."""
    package = type(module).__module__.split(".")[0]
    return package in TRACED_PACKAGES and not (module._forward_hooks or module._forward_pre_hooks)


class SharedPasses:
    """Scores of inputs already sent through one forward, shared by the metrics of one evaluation.

    The engine keeps one per scoring (per input with a wrapper, whose frozen regions are that
    input's), so the unperturbed input's scores (which most faithfulness metrics compare with, and
    the predicted target reads) and the perturbed inputs that are the same for several metrics (an
    input wholly replaced by its baseline) cost one pass per input, not one per metric, and once in
    all where several inputs have it. An entry is found by value (``torch.equal``), so scores are never
    given to another input; at most ``limit`` entries are kept (the oldest dropped)."""

    def __init__(self, limit: int = 8):
        self.limit = limit
        self._entries: dict[tuple, list[tuple[Tensor, Tensor]]] = {}  # by a sketch of the row
        self._count = 0

    @staticmethod
    def _key(row: Tensor) -> tuple:
        flat = row.reshape(-1)
        return (tuple(row.shape), row.dtype, str(row.device), float(flat[:: max(1, flat.numel() // 61)].sum()))

    def get(self, row: Tensor) -> Tensor | None:
        """The (K,) scores of ``row`` (C, *S) if an equal input was scored, else None."""
        for kept, scores in self._entries.get(self._key(row), ()):
            if torch.equal(kept, row):
                return scores
        return None

    def put(self, row: Tensor, scores: Tensor) -> None:
        """Keep the (K,) ``scores`` of ``row`` (C, *S)."""
        self._entries.setdefault(self._key(row), []).append((row.detach().clone(), scores.detach()))
        self._count += 1
        while self._count > self.limit:
            oldest = next(iter(self._entries))
            self._entries[oldest].pop(0)
            self._count -= 1
            if not self._entries[oldest]:
                del self._entries[oldest]


#: Inputs per forward call where ``max_batch`` is not given.
DEFAULT_MAX_BATCH = 64
#: The most input values per forward call on the CPU where ``max_batch`` is not given (8 RGB
#: images of 224²): there a bigger batch of big inputs is no faster per input, and slower
#: (torchvision models at 224² on their inference copies, a quiet machine, ms per input at batch
#: 4/8/16/32, one thread: resnet18 26.9/25.1/28.3/29.4, densenet121 59.6/57.7/61.1/74.1,
#: mobilenet_v3_small 3.4/3.0/2.8/2.6; two threads: resnet18 13.7/12.1/13.1/14.1, densenet121
#: 34.9/32.9/35.2/39.5; ``benchmarks/evaluation_batch.py``), while small inputs (the digits, resnet18
#: at 64²) gain from up to 64 rows per call. Accelerators, and a ``max_batch`` the user gives, take
#: that many inputs per call.
CPU_FORWARD_VALUES = 8 * 3 * 224 * 224


@dataclass
class Context:
    """What a metric may use besides the input, its attribution and the target.

    ``forward`` maps a batch (N, C, *S) to scores (N, K); it defaults to the plain ``model`` in
    eval mode under ``torch.no_grad`` (a segmentation wrapper or a stitched patch forward is
    supplied instead where the model is one). :meth:`scores` runs it in chunks of at most
    :meth:`batch` inputs (``max_batch``; by default 64, fewer for big inputs on the CPU), so a forward itself may
    take any batch. ``model`` is needed by the
    randomisation metrics, ``explain(model, x, target) -> attribution`` by those that
    re-explain (randomisation, robustness), ``mask`` (B, 1|C, *S) bool by localisation.
    ``copy(model, x)`` makes the one copy of the model a randomisation metric changes in place
    (an :class:`esegeta.evaluation.scoring.Explainer`'s prepared copy, which ``explain`` takes as
    it is; default ``copy.deepcopy``).
    ``shared`` (a :class:`SharedPasses`) holds scores other metrics of the evaluation already
    computed: :meth:`reference_scores` reads and fills it.
    ``use_inference_copy``: where the context makes its forward from ``model`` on the CPU, it scores
    an :func:`inference_copy` of it (made once, here), else the model itself.
    ``row_seeds``: the seed of each row's own generator (the engine's: one per input, whatever the
    inputs stacked with it); every draw then has one row per input, each from its row's generator,
    so a row draws what it would draw alone, in any stack.
    ``generator`` (a seeded CPU generator) drives every random draw: draws are made on it and
    moved to the data's device (:meth:`rand`, :meth:`randn`), or, on an accelerator, made by a
    generator of that device seeded from it.
    """
    forward: Callable[[Tensor], Tensor] | None = None
    model: nn.Module | None = None
    explain: Callable[[nn.Module, Tensor, Tensor], Tensor] | None = None
    copy: Callable[[nn.Module, Tensor], nn.Module] | None = None
    mask: Tensor | None = None
    generator: torch.Generator | None = None
    max_batch: int | None = None
    seed: int = 0
    shared: SharedPasses | None = None
    use_inference_copy: bool = True
    row_seeds: list[int] | None = None
    _device_generators: dict = field(default_factory=dict, repr=False)
    _row_contexts: list = field(default_factory=list, repr=False)

    def __post_init__(self):
        if self.forward is None:
            if self.model is None:
                raise ValueError("Context needs a forward or a model")
            on_cpu = all(p.device.type == "cpu" for p in self.model.parameters())
            fast = inference_copy(self.model) if self.use_inference_copy and on_cpu else None
            self.forward = _plain_forward(self.model if fast is None else fast)
        if self.generator is None:
            self.generator = torch.Generator().manual_seed(self.seed)
        if self.copy is None:
            self.copy = _deepcopy
        self._capped = self.max_batch is None  # the default: capped on the CPU (:meth:`batch`)
        if self.max_batch is None:
            self.max_batch = DEFAULT_MAX_BATCH
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")

    # ----------------------------------------------------------------- forward
    def scores(self, x: Tensor) -> Tensor:
        """(N, K) scores of a stacked batch, the forward run in chunks of :meth:`batch` inputs."""
        return torch.cat([self.forward(chunk) for chunk in x.split(self.batch(x))])

    def batch(self, x: Tensor) -> int:
        """Inputs per forward call for inputs like ``x``'s rows: ``max_batch``; where it was not given,
        on the CPU at most :data:`CPU_FORWARD_VALUES` values' worth (at least one input). Metrics build
        their perturbed inputs in chunks of this size too: smaller buffers, reused by the allocator."""
        if x.device.type != "cpu" or not self._capped:
            return self.max_batch
        return max(1, min(self.max_batch, CPU_FORWARD_VALUES // max(1, math.prod(x.shape[1:]))))

    def reference_scores(self, x: Tensor) -> Tensor:
        """(N, K) scores of a batch whose rows repeat a few inputs (the unperturbed input of each
        row, an input wholly replaced by its baseline): each distinct row goes through the forward
        once, and once per evaluation where the engine shares its passes (:class:`SharedPasses`)."""
        if x.device.type == "meta":
            return self.scores(x)  # no values to compare: shapes only
        shared = self.shared if self.shared is not None else SharedPasses(limit=x.shape[0])
        rows = _first_equal_rows(x)
        distinct = sorted(set(rows))
        known = {i: shared.get(x[i]) for i in distinct}
        missing = [i for i in distinct if known[i] is None]
        if missing:
            computed = self.scores(x[missing])
            for i, scores in zip(missing, computed):
                shared.put(x[i], scores)
                known[i] = scores
        return torch.stack([known[i] for i in rows])

    def target_scores(self, x: Tensor, target: Tensor) -> Tensor:
        """(N,) score of ``target[i]`` for each input of the stacked batch ``x`` (N = len(target))."""
        return self.scores(x).gather(1, target.reshape(-1, 1).to(torch.long)).squeeze(1)

    # ----------------------------------------------------------------- random draws
    def _generator_for(self, device: torch.device) -> torch.Generator | None:
        device = torch.device(device)
        if device.type in ("cpu", "meta"):
            return self.generator
        if device not in self._device_generators:
            seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
            self._device_generators[device] = torch.Generator(device=device).manual_seed(seed)
        return self._device_generators[device]

    def _rows(self, shape: tuple[int, ...]) -> list[Context] | None:
        """One context per row where :attr:`row_seeds` are given (a draw of ``shape`` then has one
        row per input), else None."""
        if self.row_seeds is None:
            return None
        if not shape or shape[0] != len(self.row_seeds):
            raise ValueError(f"a draw of shape {shape} in a call stacking {len(self.row_seeds)} inputs: draw one "
                             "row per input")
        if not self._row_contexts:
            self._row_contexts = [Context(forward=self.forward, seed=s) for s in self.row_seeds]
        return self._row_contexts

    def _draw(self, op, shape: tuple[int, ...], device, dtype) -> Tensor:
        rows = self._rows(shape)
        if rows is not None:
            return torch.cat([row._draw(op, (1,) + shape[1:], device, dtype) for row in rows])
        device = torch.device(device)
        generator = self._generator_for(device)
        if generator.device.type == device.type:
            return op(shape, generator=generator, device=device, dtype=dtype)
        return op(shape, generator=generator, dtype=dtype).to(device)

    def rand(self, shape, device, dtype=torch.float32) -> Tensor:
        """Uniform [0, 1) draws of ``shape`` on ``device``, from the context's generator."""
        return self._draw(torch.rand, tuple(shape), device, dtype)

    def randn(self, shape, device, dtype=torch.float32) -> Tensor:
        """Standard normal draws of ``shape`` on ``device``, from the context's generator."""
        return self._draw(torch.randn, tuple(shape), device, dtype)

    def streams(self, rows: int) -> list[int]:
        """One seed per row for :meth:`randn_seeded`, drawn from the context's generator (each row's own
        with :attr:`row_seeds`)."""
        return self.randint(2**62, (rows,), "cpu").tolist()

    @staticmethod
    def randn_seeded(seeds, shape, device, dtype=torch.float32) -> Tensor:
        """(len(seeds), *shape) standard normal draws, row i from a generator seeded with ``seeds[i]``:
        the same numbers whichever chunk a row is drawn in."""
        device = torch.device(device)
        on = device if device.type not in ("meta",) else torch.device("cpu")
        out = [torch.randn(tuple(shape), generator=torch.Generator(device=on).manual_seed(int(s)),
                           device=on, dtype=dtype) for s in seeds]
        return torch.stack(out).to(device)

    def randint(self, high: int, shape, device) -> Tensor:
        """Integers in [0, high) of ``shape`` on ``device`` (long), from the context's generator."""
        rows = self._rows(tuple(shape))
        if rows is not None:
            return torch.cat([row.randint(high, (1,) + tuple(shape)[1:], device) for row in rows])
        device = torch.device(device)
        generator = self._generator_for(device)
        if generator.device.type == device.type:
            return torch.randint(high, tuple(shape), generator=generator, device=device)
        return torch.randint(high, tuple(shape), generator=generator).to(device)


def _first_equal_rows(x: Tensor) -> list[int]:
    """For each row of ``x``, the first row equal to it."""
    if x.shape[0] and x.stride(0) == 0:  # one input expanded to every row
        return [0] * x.shape[0]
    flat = x.reshape(x.shape[0], -1)
    sketch = flat[:, :: max(1, flat.shape[1] // 61)].sum(1).tolist()  # compare only rows that may be equal
    seen: dict[float, list[int]] = {}
    first: list[int] = []
    for i, key in enumerate(sketch):
        same = next((j for j in seen.get(key, ()) if torch.equal(x[j], x[i])), None)
        if same is None:
            seen.setdefault(key, []).append(i)
        first.append(i if same is None else same)
    return first


@dataclass(frozen=True)
class MetricResult:
    """One value per input (``values``, shape (B,)), optional curves for plots (name -> (B, T)
    tensor, e.g. the score after each deletion step), and the direction of the value."""
    values: Tensor
    curves: dict[str, Tensor] | None = None
    higher_is_better: bool = True


@dataclass(frozen=True)
class Rule:
    """What one metric parameter accepts, checked with the config before anything runs: a kind
    (``int`` takes no bool; ``float`` takes ints; ``list`` a non-empty list of numbers, each
    within the range), a range (``low`` <= v, or < v with ``open_low``; v <= ``high``), the
    ``choices`` of a string, and whether ``None`` is allowed (``optional``)."""
    kind: str
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    choices: tuple[str, ...] = ()
    optional: bool = False

    @classmethod
    def of_default(cls, default: Any) -> Rule | None:
        """The rule a default implies where a metric states none (its type), or None (no check)."""
        for kind, types in (("bool", bool), ("int", int), ("float", float), ("str", str), ("list", (list, tuple))):
            if isinstance(default, types):
                return cls(kind)
        return None

    def _number(self, v: Any, integer: bool) -> bool:
        if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)):
            return False
        if self.low is not None and (v <= self.low if self.open_low else v < self.low):
            return False
        return self.high is None or v <= self.high

    def _wanted(self) -> str:
        if self.choices:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        kind = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
                "list": "a non-empty list of numbers"}[self.kind]
        if self.low is not None:
            kind += f" {'>' if self.open_low else '>='} {self.low:g}"
        if self.high is not None:
            kind += f"{' and' if self.low is not None else ''} <= {self.high:g}"
        return kind + (", or null" if self.optional else "")

    def problem(self, value: Any) -> str | None:
        """None if ``value`` is accepted, else what is wanted (for a :class:`ConfigError`)."""
        if value is None and self.optional:
            return None
        if self.kind == "bool":
            ok = isinstance(value, bool)
        elif self.kind in ("int", "float"):
            ok = self._number(value, self.kind == "int")
        elif self.kind == "list":
            ok = isinstance(value, (list, tuple)) and len(value) > 0 and all(self._number(v, False) for v in value)
        else:
            ok = isinstance(value, str) and (not self.choices or value in self.choices)
        if ok:
            return None
        if isinstance(value, str) and self.choices:
            return f"{value!r} is not accepted" + did_you_mean(value, self.choices)
        return f"{value!r} is not accepted; give {self._wanted()}"


def _no_passes(params: Mapping[str, Any], input_shape: tuple[int, ...]) -> int:
    return 0


@dataclass(frozen=True)
class MetricSpec:
    """One registered metric.

    ``id`` is what a config names (``"deletion"``); ``group`` one of :data:`GROUPS`; ``paper`` the
    reference it implements; ``fn`` the batched function; ``params`` its parameters with their
    defaults (the only names accepted; :func:`keyword_defaults` reads them from ``fn``);
    ``higher_is_better`` a bool or, where the direction depends on the parameters (most or least
    relevant first), a function of the full parameters (:meth:`better_higher`);
    ``passes(params, input_shape)`` the forward passes it
    costs per input of shape (C, *S) (re-explanations count as the passes their method costs
    and are not included); ``needs`` what it needs from the :class:`Context` beyond the forward
    (subset of :data:`NEEDS`); ``summary`` one line for ``esegeta metrics``;
    ``explanations(params, n_layers)`` the re-explanations it costs per input, ``n_layers`` being
    the model's number of randomisable layers (:meth:`explanations_per_input`); ``rules``
    {parameter: :class:`Rule`} what a parameter accepts where its default's type does not say it
    all (:meth:`with_defaults` checks every parameter given).

    A metric draws random numbers only through the context, one row per input (the engine stacks
    the inputs of a method into one call and seeds each row's draws by its input:
    :attr:`Context.row_seeds`), so an input's value does not depend on the inputs beside it.
    """
    id: str
    group: str
    paper: str
    fn: Callable[..., MetricResult]
    params: Mapping[str, Any] = field(default_factory=dict)
    higher_is_better: bool | Callable[[Mapping[str, Any]], bool] = True
    passes: Callable[[Mapping[str, Any], tuple[int, ...]], int] = _no_passes
    needs: frozenset[str] = frozenset()
    summary: str = ""
    explanations: Callable[[Mapping[str, Any], int], int] = _no_passes
    rules: Mapping[str, Rule] = field(default_factory=dict)

    def __post_init__(self):
        if self.group not in GROUPS:
            raise ValueError(f"metric {self.id}: group {self.group!r} not in {GROUPS}")
        object.__setattr__(self, "needs", frozenset(self.needs))
        if not self.needs <= NEEDS:
            raise ValueError(f"metric {self.id}: needs {sorted(self.needs - NEEDS)} not in {sorted(NEEDS)}")
        accepted = set(inspect.signature(self.fn).parameters) - {"ctx", "x", "attribution", "target"}
        if set(self.params) != accepted:
            raise ValueError(f"metric {self.id}: params {sorted(self.params)} != fn keywords {sorted(accepted)}")

    def with_defaults(self, params: Mapping[str, Any] | None = None, path: str = "params") -> dict[str, Any]:
        """The full parameter set: the defaults overridden by ``params`` (unknown names are a
        :class:`ConfigError` at ``path.<name>``, and so is a value its :class:`Rule` refuses)."""
        params = dict(params or {})
        for name, value in params.items():
            if name not in self.params:
                raise ConfigError(f"{path}.{name}", f"metric {self.id} has no parameter {name!r}"
                                  + did_you_mean(name, self.params))
            rule = self.rules.get(name) or Rule.of_default(self.params[name])
            problem = rule.problem(value) if rule is not None else None
            if problem is not None:
                raise ConfigError(f"{path}.{name}", f"metric {self.id}: {problem}")
        return {**self.params, **params}

    def better_higher(self, params: Mapping[str, Any] | None = None) -> bool:
        """Whether a higher value is better with ``params`` (defaults filled in)."""
        if callable(self.higher_is_better):
            return bool(self.higher_is_better(self.with_defaults(params)))
        return bool(self.higher_is_better)

    def forward_passes(self, input_shape, params: Mapping[str, Any] | None = None) -> int:
        """Forward passes per input of shape (C, *S) with ``params`` (defaults filled in)."""
        return int(self.passes(self.with_defaults(params), tuple(input_shape)))

    def explanations_per_input(self, model: nn.Module | None, params: Mapping[str, Any] | None = None) -> int:
        """Re-explanations (calls of the explain callable per input) with ``params`` on ``model``."""
        layers = 0
        if model is not None:
            layers = sum(1 for m in model.modules() if hasattr(m, "reset_parameters"))
        return int(self.explanations(self.with_defaults(params), layers))

    def __call__(self, ctx: Context, x: Tensor, attribution: Tensor, target: Tensor,
                 **params) -> MetricResult:
        """Run the metric on a batch after checking its needs and filling its defaults."""
        missing = [n for n in sorted(self.needs) if getattr(ctx, n) is None]
        if missing:
            raise ConfigError("evaluation.metrics", f"metric {self.id} needs {', '.join(missing)} "
                              "in its context (a model to randomise, an explain callable, or a mask)")
        if x.dim() not in (4, 5):
            raise ValueError(f"metric {self.id}: x must be (B, C, H, W) or (B, C, D, H, W), got {tuple(x.shape)}")
        if attribution.shape[0] != x.shape[0] or attribution.shape[2:] != x.shape[2:] \
                or attribution.shape[1] not in (1, x.shape[1]):
            raise ValueError(f"metric {self.id}: attribution {tuple(attribution.shape)} does not match "
                             f"x {tuple(x.shape)} (expected (B, 1|C, *S))")
        target = torch.as_tensor(target, device=x.device).reshape(-1).to(torch.long)
        if target.numel() == 1 and x.shape[0] > 1:
            target = target.expand(x.shape[0])
        params = self.with_defaults(params)
        result = self.fn(ctx, x, attribution, target, **params)
        return MetricResult(result.values, result.curves, self.better_higher(params))


def keyword_defaults(fn: Callable) -> dict[str, Any]:
    """The keyword-only parameters of a metric function with their defaults (a spec's ``params``)."""
    return {n: p.default for n, p in inspect.signature(fn).parameters.items() if p.kind is p.KEYWORD_ONLY}


_REGISTRY: dict[str, MetricSpec] = {}


def register(spec: MetricSpec) -> MetricSpec:
    """Add ``spec`` to the registry (an id may be registered once)."""
    if spec.id in _REGISTRY and _REGISTRY[spec.id] is not spec:
        raise ValueError(f"metric {spec.id} registered twice")
    _REGISTRY[spec.id] = spec
    return spec


def _load() -> None:
    for name in METRIC_MODULES:
        importlib.import_module(f"{__package__}.{name}")


def all_metrics() -> list[MetricSpec]:
    """Every registered metric, by group (in :data:`GROUPS` order) then id."""
    _load()
    return sorted(_REGISTRY.values(), key=lambda s: (GROUPS.index(s.group), s.id))


def metric(id: str, path: str = "evaluation.metrics") -> MetricSpec:
    """The metric registered as ``id`` (an unknown id is a :class:`ConfigError` at ``path``)."""
    _load()
    try:
        return _REGISTRY[id]
    except KeyError:
        raise ConfigError(path, f"unknown metric {id!r}" + did_you_mean(id, _REGISTRY)) from None
