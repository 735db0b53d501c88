"""``esegeta check CONFIG``: will each method of a config work, before a long run?

Loads the model and the first input, runs one forward pass on the prepared copy (with a
hook on every module to see layer output shapes and activation sizes) and then, for each
method entry, collects every problem instead of stopping at the first: unknown id or
parameter, unavailable library, 2D/3D support, classifier/segmenter fit, the layer and its
output shape, the wrapper and target, LRP rules for every leaf layer. It reports what the
prepared copy fixed (reused and in-place ReLUs) and an estimate of each method's peak
memory. It runs no attribution. The config itself (JSON, model, inputs) must be valid:
otherwise :class:`~esegeta.errors.ConfigError` as for ``validate``.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import architectures, config as config_mod, numerics, planning
from . import params as params_mod


@dataclass
class MethodCheck:
    """One method entry's verdict: ``ok`` if no problem was found."""

    index: int
    label: str
    id: str
    ok: bool = True
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    layer_shape: list[int] | None = None
    batch: int = 1
    memory_bytes: int | None = None

    def problem(self, message: str) -> None:
        self.ok = False
        self.problems.append(message)


@dataclass
class CheckReport:
    """Everything ``esegeta check`` found; ``exit_code`` 0 if every method will run, else 1."""

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
    evaluation: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 0 if all(m.ok for m in self.methods) else 1

    @property
    def heaviest(self) -> MethodCheck | None:
        """The method that will run with the largest estimated peak memory."""
        sized = [m for m in self.methods if m.ok and m.memory_bytes is not None]
        return max(sized, key=lambda m: m.memory_bytes) if sized else None

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        heaviest = self.heaviest
        data["heaviest"] = heaviest.label if heaviest else None
        data["exit_code"] = self.exit_code
        return data

    def text(self) -> str:
        lines = [f"{self.config}: model {self.model} on {self.device}; input {self.input} {self.input_shape} -> "
                 f"output {self.output_shape}; one forward pass {self.forward_seconds:.3f}s",
                 f"activations of one forward: {_size(self.activation_bytes)}; weights {_size(self.weight_bytes)}"]
        lines += [f"prepared copy: {c}" for c in self.prepared_changes] or ["prepared copy: nothing to fix"]
        lines.append("")
        for m in self.methods:
            memory = f"~{_size(m.memory_bytes)}" if m.memory_bytes is not None else "?"
            shape = f" layer output {m.layer_shape}" if m.layer_shape else ""
            lines.append(f"[{'ok' if m.ok else 'NO'}] methods[{m.index}] {m.label} ({m.id}): est. peak {memory} "
                         f"(batch {m.batch}){shape}")
            lines += [f"      problem: {p}" for p in m.problems]
            lines += [f"      note: {n}" for n in m.notes]
        heaviest = self.heaviest
        if heaviest is not None:
            lines.append(f"\nheaviest method: {heaviest.label}, estimated peak {_size(heaviest.memory_bytes)}")
        lines += self.evaluation
        good = sum(m.ok for m in self.methods)
        lines.append(f"{good}/{len(self.methods)} method(s) will run")
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
    with numerics.fp32_numerics(cfg.runtime.tf32):  # the forward pass as the run computes it
        plan = planning.plan(cfg, base, device=device, every_entry=True)
        x = plan.inputs[0].tensor.to(plan.device)
        forward = _forward_pass(plan.ready, x)
    checks = [_method_check(plan, i, x, forward) for i in range(len(cfg.methods))]
    item = plan.inputs[0]
    from .evaluation.cli import estimate  # the evaluation block's forward passes, if it has one
    return CheckReport(
        config=str(config) if not isinstance(config, dict) else "<dict>", model=type(plan.model).__name__,
        device=str(plan.device), input=item.name, input_shape=list(item.tensor.shape[1:]),
        output_shape=forward.output_shape, forward_seconds=round(forward.seconds, 4),
        prepared_changes=list(plan.ready.changes), activation_bytes=forward.activation_bytes,
        weight_bytes=forward.weight_bytes, methods=checks,
        evaluation=estimate(cfg, item.tensor.shape[1:], forward.seconds, plan.model))


@dataclass
class _Forward:
    """What one forward pass of the prepared copy showed: each module's output shape, sizes, time."""

    layer_shapes: dict[str, Any]
    output_shape: Any
    activation_bytes: int
    weight_bytes: int
    seconds: float


def _forward_pass(ready: nn.Module, x: torch.Tensor) -> _Forward:
    shapes: dict[str, Any] = {}
    leaf_bytes = 0

    def record(name: str, module: nn.Module, output: Any) -> None:
        nonlocal leaf_bytes
        shapes[name] = _shape(output)
        if not list(module.children()):
            leaf_bytes += _tensor_bytes(output)

    handles = [m.register_forward_hook(lambda m, i, o, name=name: record(name, m, o))
               for name, m in ready.model.named_modules() if name]
    try:
        start = time.perf_counter()
        with torch.no_grad():
            out = ready(x)
        seconds = time.perf_counter() - start
    finally:
        for h in handles:
            h.remove()
    weight_bytes = sum(_tensor_bytes(p) for p in ready.parameters()) + sum(_tensor_bytes(b) for b in ready.buffers())
    return _Forward(shapes, _shape(out), leaf_bytes + _tensor_bytes(x) + _tensor_bytes(out), weight_bytes, seconds)


def _method_check(plan: planning.Plan, index: int, x: torch.Tensor, forward: _Forward) -> MethodCheck:
    """One entry's verdict: the plan's problems of it, the layer's output, LRP rules, memory."""
    entry = plan.config.methods[index]
    c = MethodCheck(index, entry.name, entry.id)
    if not entry.enabled:
        c.notes.append("disabled (enabled: false): will not run")
    for problem in (p for p in plan.problems if p.entry == index):
        c.problem(str(problem))
    resolved = next((e for e in plan.entries if e.index == index), None)
    if resolved is None:  # its JSON is at fault: nothing more to learn
        return c
    spec = resolved.spec
    if entry.layer and c.ok:
        c.layer_shape = forward.layer_shapes.get(entry.layer)
        if c.layer_shape is None:
            c.problem(f"methods[{index}].layer: {entry.layer!r} is not called in the forward pass")
    if spec.preflight is not None and c.ok:  # its problems are the plan's (esegeta.architectures.refuse)
        c.notes.append(f"{spec.id}'s pre-flight check of the model passed")
    if c.ok:
        c.notes += architectures.axiom_notes(spec, plan.ready.model, x)
    if plan.config.runtime.amp:
        c.notes.append(numerics.precision_plan(spec, plan.device, amp=True).reason)
    c.batch = params_mod.effective_batch(spec, dict(entry.params), entry.noise_tunnel)
    # Peak ≈ activations (kept for the backward pass) and their gradients for the batch, plus weights.
    c.memory_bytes = 2 * forward.activation_bytes * c.batch + forward.weight_bytes
    return c


__all__ = ["CheckReport", "MethodCheck", "check"]
