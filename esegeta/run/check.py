"""``esegeta check CONFIG``: will each method of a config work, before a long run?

Loads the model and the first input, runs one forward pass on the prepared copy (with a
hook on every module to see layer output shapes and activation sizes) and then, for each
method entry, collects every problem instead of stopping at the first: unknown id or
parameter, unavailable library, 2D/3D support, classifier/segmenter fit, the layer and its
output shape, the wrapper and target, LRP rules for every leaf layer, and the method's trial
(``MethodSpec.trial``: what its library does to the model, tried on a copy of it, e.g. zennit's
canonizers). It reports what the prepared copy fixed (reused and in-place ReLUs) and an
estimate of each method's peak memory. It runs no attribution. The config itself (JSON,
model, inputs) must be valid: otherwise :class:`~esegeta.errors.ConfigError` as for ``validate``.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from esegeta.attribution import architectures, numerics, streamed
from esegeta.attribution.wrappers import BUILTIN
from esegeta.spec import config as config_mod, cost
from esegeta.run import plan as planning
from esegeta.spec import params as params_mod
from esegeta.evaluation.catalogue import estimate
from esegeta.evaluation.engine import check as evaluation_check
from esegeta.run.evaluate import mask_problems
from esegeta.errors import raise_problems
from esegeta.spec.registry import layer_names
from esegeta.attribution.patcher import Grid
from esegeta.run.writer import check_dir, output_folder
from esegeta.hooks import removing


@dataclass
class MethodCheck:
    """One method entry's verdict: ``ok`` if no problem was found; a disabled entry (``enabled:
    false``) is checked and shown but neither runs nor counts."""
    index: int
    label: str
    id: str
    ok: bool = True
    enabled: bool = True
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    layer_shape: list[int] | None = None
    batch: int = 1
    memory_bytes: int | None = None
    forward_rows: int | None = None
    backward_rows: int | None = None
    passes_exact: bool = True
    seconds: float | None = None
    cost_note: str = ""
    fitting_batch: int | None = None

    def problem(self, message: str) -> None:
        self.ok = False
        self.problems.append(message)

    def cost_text(self) -> str:
        """``"~50,000 passes, ~12 min"`` per input, or what cannot be known."""
        if self.forward_rows is None:
            return "passes: cannot know before running" + (f" ({self.cost_note})" if self.cost_note else "")
        total = self.forward_rows + (self.backward_rows or 0)
        approx = "" if self.passes_exact else "~"
        detail = f" ({self.forward_rows:,} forward + {self.backward_rows or 0:,} backward)" if self.backward_rows else ""
        return f"{approx}{total:,} passes{detail}, {cost.duration_text(self.seconds)} per input"


@dataclass
class CheckReport:
    """Everything ``esegeta check`` found; ``exit_code`` 0 if every enabled method will run, else 1."""
    config: str
    model: str
    device: str
    input: str
    input_shape: list[int]
    output_shape: Any
    forward_seconds: float
    prepared_changes: list[str]
    activation_bytes: int
    weight_bytes: int
    methods: list[MethodCheck]
    available_bytes: int | None = None
    row_seconds: float | None = None
    evaluation: list[str] = field(default_factory=list)
    #: the spatial shape the forward pass ran on when it is not the input's (global patches: a patch)
    forward_shape: list[int] | None = None

    @property
    def enabled(self) -> list[MethodCheck]:
        """The entries a run would run (disabled ones are shown, not counted)."""
        return [m for m in self.methods if m.enabled]

    @property
    def exit_code(self) -> int:
        return 0 if all(m.ok for m in self.enabled) else 1

    @property
    def heaviest(self) -> MethodCheck | None:
        """The method that will run with the largest estimated peak memory."""
        sized = [m for m in self.enabled if m.ok and m.memory_bytes is not None]
        return max(sized, key=lambda m: m.memory_bytes) if sized else None

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        heaviest = self.heaviest
        data["heaviest"] = heaviest.label if heaviest else None
        data["exit_code"] = self.exit_code
        return data

    def text(self) -> str:
        lines = [f"{self.config}: model {self.model} on {self.device}; input {self.input} {self.input_shape} -> "
                 f"output {self.output_shape}; one forward pass {self.forward_seconds * 1000:.2f} ms"
                 + (f" (on a patch {self.forward_shape}: every method runs in global patch mode)"
                    if self.forward_shape else ""),
                 f"activations of one forward: {_size(self.activation_bytes)}; weights {_size(self.weight_bytes)}"]
        lines += [f"prepared copy: {c}" for c in self.prepared_changes] or ["prepared copy: nothing to fix"]
        lines.append(f"memory available on {self.device}: "
                     + (_size(self.available_bytes) if self.available_bytes is not None else "cannot know"))
        lines.append("")
        for m in self.methods:
            memory = f"~{_size(m.memory_bytes)}" if m.memory_bytes is not None else "?"
            shape = f" layer output {m.layer_shape}" if m.layer_shape else ""
            verdict = ("ok" if m.ok else "NO") if m.enabled else "off"
            lines.append(f"[{verdict}] methods[{m.index}] {m.label} ({m.id}): {m.cost_text()}; "
                         f"est. peak {memory} (batch {m.batch}){shape}")
            lines += [f"      problem: {p}" for p in m.problems]
            lines += [f"      note: {n}" for n in m.notes]
        heaviest = self.heaviest
        if heaviest is not None:
            lines.append(f"\nheaviest method: {heaviest.label}, estimated peak {_size(heaviest.memory_bytes)}")
        lines += self.evaluation
        good = sum(m.ok for m in self.enabled)
        off = len(self.methods) - len(self.enabled)
        lines.append(f"{good}/{len(self.enabled)} method(s) will run" + (f" ({off} disabled, not counted)" if off else ""))
        lines.append("(check runs no attribution: a failure inside a library on this model, or a result's "
                     "values, cannot be known before running; times are estimates from one forward pass)")
        return "\n".join(lines)


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _tensor_bytes(value: Any) -> int:
    if torch.is_tensor(value):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_tensor_bytes(v) for v in value)
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    return 0


def _shape(value: Any) -> Any:
    if torch.is_tensor(value):
        return list(value.shape)
    if isinstance(value, (tuple, list)):
        return [_shape(v) for v in value]
    if isinstance(value, dict):
        return {k: _shape(v) for k, v in value.items()}
    return type(value).__name__


def check(config: str | Path | dict, *, base_dir: str | Path | None = None, device: str | None = None) -> CheckReport:
    """Pre-flight report for ``config`` (a path or a dict); see the module docstring."""
    if isinstance(config, dict):
        cfg, base = config_mod.parse(config), Path(base_dir).resolve() if base_dir else Path.cwd()
    else:
        cfg, base = config_mod.read(config)
    if cfg.evaluation is not None:  # what validate refuses in the evaluation block, check refuses
        evaluation_check(cfg, base)
    with numerics.fp32_numerics(cfg.runtime.tf32):  # the forward pass as the run computes it
        plan = planning.plan(cfg, base, device=device, every_entry=True)
        raise_problems(mask_problems(plan))
        check_dir(output_folder(cfg.output.dir, base), create=False)  # what run refuses first (nothing created)
        x = plan.inputs[0].tensor.to(plan.device)
        probe = _probe(plan, x)
        forward = _forward_pass(plan.ready, probe)
        forward.seconds, forward.ready = _timed_forward(plan.ready, probe), plan.ready
        forward.voxels, forward.probe = math.prod(probe.shape[2:]), probe
        available = available_memory(plan.device)
        checks = [_method_check(plan, i, x, forward, available) for i in range(len(cfg.methods))]
    item = plan.inputs[0]
    return CheckReport(
        config=str(config) if not isinstance(config, dict) else "<dict>", model=type(plan.model).__name__,
        device=str(plan.device), input=item.name, input_shape=list(item.tensor.shape[1:]),
        output_shape=forward.output_shape, forward_seconds=round(forward.seconds, 6),
        prepared_changes=list(plan.ready.changes), activation_bytes=forward.activation_bytes,
        weight_bytes=forward.weight_bytes, methods=checks, available_bytes=available,
        row_seconds=forward.seconds / max(1, x.shape[0]),
        evaluation=estimate(cfg, item.tensor.shape[1:], forward.seconds, plan.model),
        forward_shape=list(probe.shape[2:]) if probe is not x else None)


@dataclass
class _Forward:
    """What one forward pass of the prepared copy showed: each module's output shape, sizes, time."""
    layer_shapes: dict[str, Any]
    output_shape: Any
    activation_bytes: int
    weight_bytes: int
    seconds: float
    ready: nn.Module | None = None
    #: spatial voxels of the input the pass ran on (a patch for global-patch configs: :func:`_probe`)
    voxels: int = 0
    probe: torch.Tensor | None = None
    row_seconds: dict[int, float] = field(default_factory=dict)


def _probe(plan: planning.Plan, x: torch.Tensor) -> torch.Tensor:
    """What check's forward pass runs on: ``x``, or, when every entry runs in global patch mode,
    its first patch (a forward on the whole volume is the memory global mode is there to avoid;
    a fully convolutional model's activations and time scale with the voxels)."""
    patches = [e.request.patch for e in plan.entries]
    if not patches or any(p is None or p.mode != "global" for p in patches):
        return x
    size = [max(p.size[i] for p in patches) for i in range(x.ndim - 2)]
    return x[(slice(None), slice(None), *(slice(0, s) for s in size))]


def _forward_pass(ready: nn.Module, x: torch.Tensor) -> _Forward:
    shapes: dict[str, Any] = {}
    leaf_bytes = 0

    def record(name: str, module: nn.Module, output: Any) -> None:
        nonlocal leaf_bytes
        shapes[name] = _shape(output)
        if not list(module.children()):
            leaf_bytes += _tensor_bytes(output)

    with removing() as handles:
        handles.extend(m.register_forward_hook(lambda m, i, o, name=name: record(name, m, o))
                       for name, m in ready.model.named_modules() if name)
        start = time.perf_counter()
        with torch.no_grad():
            out = ready(x)
        seconds = time.perf_counter() - start
    weight_bytes = sum(_tensor_bytes(p) for p in ready.parameters()) + sum(_tensor_bytes(b) for b in ready.buffers())
    return _Forward(shapes, _shape(out), leaf_bytes + _tensor_bytes(x) + _tensor_bytes(out), weight_bytes, seconds)


def available_memory(device: torch.device) -> int | None:
    """Bytes free for a run on ``device`` now (CUDA: the driver's free memory; CPU: the system's
    available memory), or None when it cannot be known."""
    try:
        if device.type == "cuda":
            return int(torch.cuda.mem_get_info(device)[0])
        if device.type == "cpu":
            try:
                import psutil

                return int(psutil.virtual_memory().available)
            except ImportError:
                with open("/proc/meminfo", encoding="ascii") as meminfo:
                    for line in meminfo:
                        if line.startswith("MemAvailable:"):
                            return int(line.split()[1]) * 1024
    except (OSError, RuntimeError, ValueError):
        return None
    return None


def _timed_forward(ready: nn.Module, x: torch.Tensor, repeats: int = 3) -> float:
    """Seconds of one forward pass on ``x`` without hooks: the fastest of ``repeats`` after a warm-up."""
    best = float("inf")
    with torch.no_grad():
        ready(x)
        for _ in range(repeats):
            if x.device.type == "cuda":
                torch.cuda.synchronize(x.device)
            start = time.perf_counter()
            ready(x)
            if x.device.type == "cuda":
                torch.cuda.synchronize(x.device)
            best = min(best, time.perf_counter() - start)
    return best


def _row_seconds(forward: _Forward, x: torch.Tensor, batch: int) -> float:
    """Seconds of one input row at the method's batch (rows in a batch are cheaper than alone):
    one timed forward of ``min(batch, 16)`` copies, remembered per batch size."""
    b = max(1, min(batch, ROW_BATCH_CAP))
    x = forward.probe if forward.probe is not None else x
    if b not in forward.row_seconds:
        if b == 1 or forward.ready is None:
            forward.row_seconds[b] = forward.seconds / max(1, x.shape[0])
        else:
            forward.row_seconds[b] = _timed_forward(forward.ready, x[:1].expand(b, *x.shape[1:]).contiguous(), 1) / b
    return forward.row_seconds[b]


#: The largest batch timed to estimate a row's time (more copies cost memory, and time, in check).
ROW_BATCH_CAP = 16


def _costs(c: MethodCheck, spec, entry, x: torch.Tensor, forward: _Forward, patch=None,
           entry_wrapper: bool = False) -> None:
    """Passes per input and the time they take at the measured speed of one forward row."""
    try:
        passes = cost.expected_passes(spec, dict(entry.params), x, noise_tunnel=entry.noise_tunnel,
                                      layer_shape=c.layer_shape if isinstance(c.layer_shape, list) else None)
    except Exception as exc:  # noqa: BLE001 (a formula that cannot read these values: say so)
        c.cost_note = f"{type(exc).__name__}: {exc}"
        return
    row_seconds = _row_seconds(forward, x, min(c.batch, passes.forward or c.batch))
    if patch is not None and passes.known:
        grid = Grid.over(tuple(x.shape[2:]), list(patch.size), list(patch.overlap) if patch.overlap else None,
                         patch.blend)
        n = len(grid.locations)
        backward = (passes.backward or 0) * n
        if patch.mode == "global":  # the stitched prediction once, and every backward recomputes its patches
            forward_rows, extra = passes.forward * n + backward + n, "; the stitched prediction and recomputed patches"
        else:  # each patch is a call of its own, with its own wrapper
            forward_rows = passes.forward * n + (n if entry_wrapper else 0)
            extra = "; each patch's wrapper" if entry_wrapper else ""
        passes = cost.Passes(forward_rows, backward, False,
                             f"{n} patches of {list(grid.size[:x.ndim - 2])}: rows are patch-sized{extra}")
        row_seconds *= math.prod(grid.size) / (forward.voxels or math.prod(grid.shape))
    c.forward_rows, c.backward_rows, c.passes_exact = passes.forward, passes.backward, passes.exact
    c.cost_note = passes.note
    if passes.forward is not None:
        c.seconds = cost.estimated_seconds(passes, row_seconds)
        if patch is not None and passes.known and c.seconds is not None:  # time linear in the patches
            c.notes.append(f"{cost.duration_text(c.seconds / n)} per patch × {n} patches")
    if passes.note:
        c.notes.append(f"passes {'estimated' if passes.known else 'unknown'}: {passes.note}")


def _trial(c: MethodCheck, spec, entry, plan: planning.Plan, x: torch.Tensor) -> None:
    """Run the method's trial (``MethodSpec.trial``: what its library does to the model, tried on a
    copy, e.g. zennit's canonizers): its problems are the entry's, its notes are shown."""
    context = architectures.Context(x, entry.layer, dict(entry.params), model=plan.ready.model, spec=spec)
    problems, notes = spec.trial(plan.ready.model, context)
    for problem in problems:
        c.problem(f"methods[{c.index}].{problem.path}: {problem.message}" if problem.path
                  else f"methods[{c.index}]: {problem.message}")
    c.notes += notes


def _method_check(plan: planning.Plan, index: int, x: torch.Tensor, forward: _Forward,
                  available: int | None = None) -> MethodCheck:
    """One entry's verdict: the plan's problems of it, the layer's output, LRP rules, canonizers,
    passes and time, memory against what the device has free."""
    entry = plan.config.methods[index]
    c = MethodCheck(index, entry.name, entry.id, enabled=entry.enabled)
    if not entry.enabled:
        c.notes.append("disabled (enabled: false): will not run")
    for problem in (p for p in plan.problems if p.entry == index):
        c.problem(str(problem))
    resolved = next((e for e in plan.entries if e.index == index), None)
    if resolved is None:  # its JSON is at fault: nothing more to learn
        return c
    spec = resolved.spec
    if entry.layer and c.ok:
        names = layer_names(entry.layer)
        for i, name in enumerate(names):
            if forward.layer_shapes.get(name) is None:
                at = "layer" if isinstance(entry.layer, str) else f"layer[{i}]"
                c.problem(f"methods[{index}].{at}: {name!r} is not called in the forward pass")
        c.layer_shape = forward.layer_shapes.get(names[0]) if len(names) == 1 else None
    if spec.preflight is not None and c.ok:  # its problems are the plan's (esegeta.attribution.architectures.refuse)
        c.notes.append(f"{spec.id}'s pre-flight check of the model passed")
    if c.ok:
        c.notes += architectures.axiom_notes(spec, plan.ready.model, x)
    if plan.config.runtime.amp:
        c.notes.append(numerics.precision_plan(spec, plan.device, amp=True).reason)
    if c.ok and spec.trial is not None:
        _trial(c, spec, entry, plan, x)
    c.batch = params_mod.effective_batch(spec, dict(entry.params), entry.noise_tunnel)
    patch = resolved.request.patch
    c.memory_bytes = planned_peak(forward, x, c.batch, patch, request=resolved.request)
    _costs(c, spec, entry, x, forward, patch, resolved.request.wrapper is not None)
    budget_gb = plan.config.runtime.memory_gb
    budget = int(budget_gb * 2**30) if budget_gb is not None else available
    if budget is None:
        c.notes.append("free memory on the device: cannot know; the peak estimate is not checked against it")
        return c
    room = (f"the runtime.memory_gb budget ({_size(budget)})" if budget_gb is not None
            else f"the {_size(budget)} free on {plan.device}")
    global_mode = patch is not None and patch.mode == "global"
    fits = fitting_batch(forward, x, patch, budget, request=resolved.request)
    if global_mode and fits is not None:  # a global step sends rows × patch.batch_size patches per call
        fits = fits // max(1, c.batch) or None
    what = ("patch.batch_size" if global_mode else "the method's batch parameter")
    if c.memory_bytes > budget:
        fix = (f"set {what} to {fits} or less" if fits
               else "lower the method's batch parameter (or runtime.batch_size), or use a larger device")
        c.problem(f"methods[{index}]: estimated peak {_size(c.memory_bytes)} exceeds {room}; {fix}")
        return c
    if c.memory_bytes > 0.8 * budget:
        c.notes.append(f"estimated peak {_size(c.memory_bytes)} is close to {room}")
    if fits:
        c.fitting_batch = fits
        chosen = " (the run uses it: patch.batch_size is not set)" if global_mode and patch is not None \
            and "batch_size" not in patch.model_fields_set else ""
        c.notes.append(f"within {room}: {what} up to {fits}{chosen}")
    return c


#: Whole-input tensors one step of a global-patch explanation through the method's adapter holds
#: beside the model's activations, in input volumes: the input, Captum's baseline, scaled input,
#: gradient, scaled gradient, running sum and result, the frozen masks and the blending weights;
#: the stitched output (the model's output channels) comes on top. Calibrated on
#: ``benchmarks/patch_memory.py`` (IG, 256³: 11 volumes beside the patch's activations, 2 of
#: them the stitched output). Methods esegeta streams (:mod:`esegeta.attribution.streamed`)
#: hold far less: :func:`streamed_bytes`.
VOLUME_COPIES = 9
#: A streamed method's patch batch, in the forward pass's activations (saved for the backward; the
#: gradients live one layer at a time): calibrated on ``benchmarks/patch_memory.py`` (the tiny
#: segmenter, 64³ patches, Saliency at 128³: 44 MiB measured for 37 MiB of activations).
STREAMED_ACTIVATIONS = 1.2


def streamed_bytes(request: Any, grid: Grid, voxels: int, input_bytes: int, output_bytes: int) -> int | None:
    """Bytes at the volume's size a global-patch explanation holds when esegeta streams the method
    (None: it runs through its adapter): input and result, the masks (``threshold``: two columns,
    ``multiclass``: one per output channel; where patches tile the input a bit per voxel and
    column, else a byte; a ``region`` wrapper's float weights) and SmoothGrad's noise of one
    sample. Where the patches overlap, also the stitched output of one step (turned into its
    gradient; DeepLIFT: the input's and the baseline's, :data:`esegeta.attribution.streamed.BLENDED_ROWS`),
    the sum of windows and SmoothGrad's gradient of one sample; and the masks are
    frozen on the stitched output (output, activation, int64 labels, float masks, sum of windows):
    the larger of the two."""
    wrapper = request.wrapper
    if not streamed.covers(request.spec, request.params, request.noise_tunnel) or wrapper is None \
            or wrapper.name not in BUILTIN:
        return None
    channels = max(1, output_bytes // (4 * voxels))
    columns = 2 if wrapper.name == "threshold" else channels
    noise = input_bytes if request.noise_tunnel is not None else 0
    if grid.separable and wrapper.name != "region" and wrapper.threshold != "otsu":
        return 2 * input_bytes + columns * voxels // 8 + noise
    mask_bytes = columns * voxels * (4 if wrapper.name == "region" else 1)
    held = 2 * input_bytes + mask_bytes + noise
    step = held + streamed.BLENDED_ROWS.get(request.spec.id, 1) * output_bytes + 4 * voxels + noise
    build = input_bytes + 2 * output_bytes + 8 * voxels + 4 * columns * voxels + 4 * voxels
    return max(step, build)


def planned_peak(forward: _Forward, x: torch.Tensor, batch: int, patch: Any = None,
                 patches_per_call: int | None = None, request: Any = None) -> int:
    """Estimated peak bytes of a method sending ``batch`` copies of its input through the model
    per step: activations (kept for the backward) and their gradients, plus the weights. With
    patches the activations are a patch's (scaled by voxels: a fully convolutional model);
    global mode runs one whole-input row at a time (:func:`esegeta.attribution.patcher.rows_one_at_a_time`)
    with ``batch × patch.batch_size`` patches per call, and holds at the volume's size what
    :func:`streamed_bytes` counts for a streamed method (``request`` given), else
    :data:`VOLUME_COPIES` input volumes and the stitched output."""
    if patch is None:
        return 2 * forward.activation_bytes * batch + forward.weight_bytes
    share = math.prod(min(s, n) for s, n in zip(patch.size, x.shape[2:])) / (forward.voxels or math.prod(x.shape[2:]))
    per_call = batch * (patches_per_call or patch.batch_size)
    activations = 2 * forward.activation_bytes * share * per_call
    if patch.mode != "global":
        return int(activations + forward.weight_bytes)
    input_bytes = x[:1].numel() * x.element_size()
    output_bytes = int(_output_bytes(forward) // max(1, x.shape[0]) * math.prod(x.shape[2:]) / (forward.voxels or
                                                                                               math.prod(x.shape[2:])))
    held = None
    if request is not None:
        grid = Grid.over(tuple(x.shape[2:]), list(patch.size), list(patch.overlap) if patch.overlap else None,
                         patch.blend)
        held = streamed_bytes(request, grid, math.prod(x.shape[2:]), input_bytes, output_bytes)
    if held is None:
        held = VOLUME_COPIES * input_bytes + output_bytes
    else:  # one recomputed patch batch at a time: its saved activations, gradients one layer at a time
        activations = activations / 2 * streamed.activation_factor(request.spec, STREAMED_ACTIVATIONS)
    return int(activations + forward.weight_bytes + held)


def fitting_batch(forward: _Forward, x: torch.Tensor, patch: Any, budget: int, limit: int = 4096,
                  request: Any = None) -> int | None:
    """The largest batch that :func:`planned_peak` puts within ``budget`` bytes: patches per
    model call in global mode, else input copies per step (None: not even one fits)."""
    def peak(n: int) -> int:
        if patch is not None and patch.mode == "global":
            return planned_peak(forward, x, 1, patch, patches_per_call=n, request=request)
        return planned_peak(forward, x, n, patch)

    if peak(1) > budget:
        return None
    low, high = 1, limit
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if peak(mid) <= budget else (low, mid - 1)
    return low


def patch_batch(request: Any, ready: nn.Module, x: torch.Tensor, budget: int | None) -> int | None:
    """The ``patch.batch_size`` a global-patch ``request`` runs with when its config sets none: the
    largest that :func:`planned_peak` puts within ``budget`` bytes (one forward pass of a patch-sized
    crop of ``x`` on the prepared ``ready`` copy), at most the number of patches; None where the
    budget is unknown or the request is not global (the configured value stands)."""
    patch = request.patch
    if budget is None or patch is None or patch.mode != "global":
        return None
    probe = x[(slice(0, 1), slice(None)) + tuple(slice(0, min(s, n)) for s, n in zip(patch.size, x.shape[2:]))]
    forward = _forward_pass(ready, probe)
    forward.voxels = math.prod(probe.shape[2:])
    rows = params_mod.effective_batch(request.spec, dict(request.params), request.noise_tunnel)
    fits = fitting_batch(forward, x[:1], patch, budget, request=request)
    grid = Grid.over(tuple(x.shape[2:]), list(patch.size), list(patch.overlap) if patch.overlap else None, patch.blend)
    return max(1, min(len(grid.locations), (fits or 1) // max(1, rows) or 1))


def _output_bytes(forward: _Forward) -> int:
    """Bytes of the model's output in the checked forward pass (from its recorded shape)."""
    def count(shape: Any) -> int:
        if isinstance(shape, list) and all(isinstance(v, int) for v in shape):
            return math.prod(shape) * 4
        if isinstance(shape, list):
            return sum(count(v) for v in shape)
        if isinstance(shape, dict):
            return sum(count(v) for v in shape.values())
        return 0

    return count(forward.output_shape)


__all__ = ["CheckReport", "MethodCheck", "check"]
