"""The metrics as ``esegeta metrics`` lists them, and their cost as ``esegeta check`` estimates it.

Cost is counted in forward passes of the model per input (``MetricSpec.passes`` for the
input's shape and the metric's parameters); a metric that re-explains (randomisation,
robustness) also costs its method's own passes per re-explanation, which are not counted.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any
from esegeta.evaluation.base import all_metrics
from esegeta.errors import ConfigError
from esegeta.evaluation.engine import configured


#: Randomisable layers assumed where ``esegeta metrics`` counts re-explanations without a model.
LAYERS = 10


def metric_rows(shape: Sequence[int]) -> list[dict[str, Any]]:
    """One dict per registered metric: id, group, paper, direction, needs, parameters, passes for ``shape``."""
    rows = []
    for spec in all_metrics():
        try:
            passes = spec.forward_passes(tuple(shape))
        except Exception as exc:  # noqa: BLE001 (a count that fails for this shape is reported, not raised)
            passes = f"n/a ({type(exc).__name__})"
        rows.append({"id": spec.id, "group": spec.group, "paper": spec.paper, "summary": spec.summary,
                     "higher_is_better": spec.better_higher(), "needs": sorted(spec.needs),
                     "params": dict(spec.params), "forward_passes": passes,
                     "explanations": int(spec.explanations(spec.with_defaults(), LAYERS))})
    return rows


def metrics_command(args) -> int:
    """``esegeta metrics [--shape C H W [D]] [--json]``."""
    if not 3 <= len(args.shape) <= 4 or min(args.shape) < 1:
        raise ConfigError("--shape", f"{args.shape}: give (C, H, W) or (C, H, W, D), positive")
    rows = metric_rows(args.shape)
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    width = max(len(r["id"]) for r in rows) + 1
    print(f"{'id':{width}} {'group':14} {'better':7} {'needs':14} {'passes':>9} {'explains':>8}  paper")
    for r in rows:
        needs = ",".join(r["needs"]) or "-"
        better = "higher" if r["higher_is_better"] else "lower"
        print(f"{r['id']:{width}} {r['group']:14} {better:7} {needs:14} {str(r['forward_passes']):>9} "
              f"{r['explanations']:>8}  {r['paper']}")
    print(f"{len(rows)} metrics; passes: model forward passes per input of shape {tuple(args.shape)} at the default "
          "parameters (--shape to change); explains: re-explanations per input, each costing its method's passes "
          f"(randomisation: for a model of {LAYERS} randomisable layers); esegeta metrics --json: parameters")
    return 0


def estimate(config, input_shape: Sequence[int], forward_seconds: float | None = None, model=None) -> list[str]:
    """``esegeta check``'s lines on an evaluation block: each metric's forward passes per input
    and in total over the config's methods (inputs of ``input_shape``); with ``forward_seconds``
    (one unbatched forward) an upper bound of the time per input, batching makes it less; with
    ``model`` the re-explanations of randomisation and robustness metrics are counted on it."""
    ev = config.evaluation
    if ev is None:
        return []
    try:
        metrics = configured(ev)
    except ConfigError as exc:
        return [f"evaluation: {exc}"]
    methods = [m for m in config.methods if m.enabled]
    lines, total = [], 0
    for m in metrics:
        per_input = m.spec.forward_passes(tuple(input_shape), m.params)
        count = sum(1 for method in methods if ev.overrides.get(method.name, {}).get(m.id) is not False)
        total += per_input * count
        again = m.spec.explanations_per_input(model, m.params) if "explain" in m.spec.needs else 0
        lines.append(f"evaluation: {m.id} ({m.spec.group}): {per_input} forward pass(es) per input and method"
                     + (f", plus {again} re-explanation(s) by the method" if again else ""))
    time = f", at most ~{total * forward_seconds:.0f} s per input unbatched" if forward_seconds else ""
    lines.append(f"evaluation: about {total} forward pass(es) per input in all ({len(methods)} method(s), "
                 f"max_batch {ev.max_batch or 'default'}{time})")
    return lines


__all__ = ["estimate", "metric_rows", "metrics_command"]
