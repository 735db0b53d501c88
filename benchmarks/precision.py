"""Is mixed precision safe, method by method? fp32 against bf16 and fp16 autocast, measured.

Every registered method runs through :func:`esegeta.explain` on every sample it applies to
(the three conformance cases of tests/conftest.py, with the layer, target, wrapper,
``quick_params`` and most-active neuron that tests/test_conformance.py uses, plus the demo's
full 128x128 retina crop of configs/retina.json unless ``--no-full-retina``), once in fp32 and
once under each reduced precision, inside ``esegeta.attribution.numerics.autocast(name, device)`` as
the runner does under ``runtime.amp`` (the wrapper's masks are frozen under autocast too).
Each call starts from the same seeds (torch, numpy, random: 0).

Per (method, sample, precision) the table records the status (ok, failed with the error,
non-finite, timeout), the Pearson correlation of the flattened result with the fp32 result,
and, for the methods below that have an axiom, its error under that precision and in fp32.

Axioms (``AXIOMS``): the relative error ``|sum(attr) - D| / |D|``, where D is the quantity
the attributions must add up to, computed with the fp32 (wrapped) model on the unperturbed
input, masks frozen from it:

- completeness / summation-to-delta, D = F(x) - mean_b F(b) over the method's baselines:
  captum.IntegratedGradients and zennit.IntegratedGradients (baseline zeros), captum.DeepLift
  (zeros), captum.DeepLiftShap and captum.GradientShap (esegeta's default baselines zeros and
  blur; GradientShap only in expectation), shap.DeepExplainer (its additivity, background blur
  as in the quick params);
- conservation, D = F(x): captum.LRP (Captum seeds the relevance with the target score);
- conservation, D = 1: zennit's LRP composites (esegeta seeds them with the target's one-hot).

These are the axioms tests/test_axioms.py asserts (IG completeness, DeepLift summation to
delta) and their direct relatives. Layer and neuron methods get none: with the U-Nets' skip
connections a layer's attributions need not add up to a difference of model outputs.
IG and GradientShap run with the demo's step/sample counts (``AXIOM_PARAMS``: 32 steps, 16
samples) rather than the conformance suite's quick ones, so that fp32 comes close to the
axiom. Even so fp32 is not exact (IG's discretisation, GradientShap holds only in
expectation, epsilon rules let biases absorb relevance), so the tolerance is relative to
fp32: a reduced precision keeps the axiom when its error is at most the fp32 error +
``AXIOM_TOLERANCE`` (0.02, i.e. 2 % of D) on every sample where fp32 keeps it within
``AXIOM_HOLDS`` (0.5). Where fp32 is further off (Captum's LRP and the zennit composites on
these models: errors from 1 to 10^4) the axiom holds in no precision, is recorded, and does not
decide.

``safe`` per (method, precision): no failure, no non-finite result, r >= 0.95 on every sample
the method applies to (where the fp32 result is constant r is undefined: the reduced result
must then be constant too, at a level within 5 %), and the axiom kept. Otherwise the reason
names the worst sample. Where r < 0.95 (or undefined) fp32 is run a second time under the same
seeds: ``fp32_repeat_r`` tells a precision effect from a method that is not reproducible.

fp16 on the CPU (``--device cpu``, default) is measured with CPU autocast as a proxy for CUDA
fp16 (same dtype, different kernels); ``--device cuda`` measures fp16 and bf16 on the GPU.

    python benchmarks/precision.py                      # everything: esegeta/amp_safety.json, benchmarks/precision.md
    python benchmarks/precision.py --only captum.LRP    # re-measure some methods, merged into the JSON
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
for _p in (ROOT, ROOT / "tests"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import esegeta  # noqa: E402
from esegeta.attribution import numerics, wrappers  # noqa: E402
from esegeta.spec import registry  # noqa: E402
from esegeta.attribution.baselines import make_baselines  # noqa: E402
from esegeta.attribution.prepare import prepared  # noqa: E402
from esegeta.run.timeouts import TimeLimitExceeded, call_with_limit  # noqa: E402

from conftest import CASES, Case, retina_case  # noqa: E402
from test_conformance import _most_active_neuron  # noqa: E402 (the conformance suite's choice of neuron)

MIN_R = 0.95
AXIOM_TOLERANCE = 0.02
#: the axiom is judged on a sample only where fp32 keeps it this well (else it holds in no precision)
AXIOM_HOLDS = 0.5
#: below this, a second fp32 run disagrees with the first: the method is not reproducible under fixed seeds
REPEAT_R = 0.999
JSON_PATH = ROOT / "esegeta" / "spec" / "amp_safety.json"
MD_PATH = ROOT / "benchmarks" / "precision.md"

_ZERO = ["zeros"]
_SHAP = ["zeros", "blur"]
_LRP_COMPOSITES = ("EpsilonPlus", "EpsilonPlusFlat", "EpsilonAlpha2Beta1", "EpsilonAlpha2Beta1Flat",
                   "EpsilonGammaBox", "ExcitationBackprop", "LayerMapComposite", "SpecialFirstLayerMapComposite",
                   "NameLayerMapComposite")
#: method id -> (axiom name, what the attributions add up to: baselines (D = F(x) - mean F(b)),
#: "output" (D = F(x)) or "one" (D = 1)).
AXIOMS: dict[str, tuple[str, object]] = {
    "captum.IntegratedGradients": ("completeness", _ZERO),
    "zennit.IntegratedGradients": ("completeness", _ZERO),
    "captum.DeepLift": ("summation to delta", _ZERO),
    "captum.DeepLiftShap": ("summation to delta (mean over baselines zeros, blur)", _SHAP),
    "captum.GradientShap": ("completeness in expectation (baselines zeros, blur)", _SHAP),
    "shap.DeepExplainer": ("additivity (background blur)", ["blur"]),
    "captum.LRP": ("conservation: sum = F(x)", "output"),
    **{f"zennit.{name}": ("conservation: sum = 1 (one-hot seed)", "one") for name in _LRP_COMPOSITES},
}
#: For the axiom methods with a step or sample count, the demo's count (configs/retina.json) instead of
#: the conformance suite's quick one, so that fp32 itself comes close to the axiom (they are cheap).
AXIOM_PARAMS = {
    "captum.IntegratedGradients": {"n_steps": 32},
    "zennit.IntegratedGradients": {"n_iter": 32},
    "captum.GradientShap": {"n_samples": 16},
}


# -- the samples ---------------------------------------------------------------------
def full_retina_case() -> Case:
    """The demo's input (configs/retina.json): the whole 128x128 retina crop."""
    case = retina_case(size=10_000)
    case.name = "retina2d-full"
    return case


def cases(full_retina: bool) -> list[Case]:
    out = [make() for make in CASES.values()]
    if full_retina:
        out.append(full_retina_case())
    return out


def applies(spec, case: Case) -> bool:
    return case.dims in spec.dims and case.task in spec.tasks


def call_arguments(spec, case: Case, x: torch.Tensor, model) -> dict:
    """explain's keyword arguments as tests/test_conformance.py builds them."""
    layer = case.layer_for(spec)
    params = {k: (v(x) if callable(v) else v) for k, v in spec.quick_params.items()}
    params.update(AXIOM_PARAMS.get(spec.id, {}))
    if spec.kind == "neuron":
        params["neuron_selector"] = _most_active_neuron(model, x, layer)
    return {"target": case.target if spec.needs_target else None, "wrapper": case.wrapper, "layer": layer,
            **params}


# -- one measurement -----------------------------------------------------------------
def _seed() -> None:
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)


def run_once(spec, case: Case, model, x, device: torch.device, precision: str, limit: float) -> dict:
    """One explain call under ``precision``: {"status", "attr", "error", "seconds"}."""
    kwargs = call_arguments(spec, case, x, model)

    def compute():
        # autocast is thread-local: enter it in the thread that computes (as the runner does)
        _seed()
        with numerics.autocast(precision, device):
            return esegeta.explain(model, x, spec.id, **kwargs)

    start = time.perf_counter()
    try:
        modules = list(prepared(model, x).modules())
        attr = call_with_limit(compute, limit, modules, name=f"precision-{spec.id}")
    except TimeLimitExceeded as exc:
        return {"status": "timeout", "attr": None, "error": f"timeout: {exc}",
                "seconds": time.perf_counter() - start}
    except Exception as exc:  # noqa: BLE001 - every failure is a measurement
        message = f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:300]
        return {"status": "failed", "attr": None, "error": message, "seconds": time.perf_counter() - start,
                "traceback": traceback.format_exc()}
    seconds = time.perf_counter() - start
    attr = attr.detach().float().cpu()
    if not torch.isfinite(attr).all():
        bad = int((~torch.isfinite(attr)).sum())
        return {"status": "non-finite", "attr": attr, "error": f"{bad} of {attr.numel()} values not finite",
                "seconds": seconds}
    return {"status": "ok", "attr": attr, "error": None, "seconds": seconds}


def pearson(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Pearson r of the flattened tensors; None when either is constant (r undefined)."""
    if a.shape != b.shape:
        return None
    a = a.double().flatten()
    b = b.double().flatten()
    a = a - a.mean()
    b = b - b.mean()
    den = float(a.norm() * b.norm())
    if den == 0.0 or not math.isfinite(den):
        return None
    return float((a * b).sum()) / den


def _describe(t: torch.Tensor) -> str:
    if float(t.double().std()) > 0:
        return "not constant"
    value = float(t.flatten()[0])
    return "all zero" if value == 0 else f"all {value:.4g}"


def constant_note(ref: torch.Tensor, got: torch.Tensor, precision: str) -> tuple[str, bool]:
    """Why r is undefined, and whether the results still agree: both constant and within
    ``1 - MIN_R`` (5 %) of each other relatively (a constant map carries no spatial information
    in either precision; only its level can differ)."""
    if float(ref.double().std()) == 0.0:
        note = f"fp32 result constant ({_describe(ref)}), {precision} {_describe(got)}"
        if float(got.double().std()) == 0.0:
            a, b = float(ref.flatten()[0]), float(got.flatten()[0])
            return note, abs(a - b) <= (1 - MIN_R) * max(abs(a), 1e-12)
        return note, False
    return f"{precision} result constant ({_describe(got)})", False


class Axiom:
    """The quantity D the attributions of one (method, sample) must add up to, fp32 model."""

    def __init__(self, method: str, case: Case, model, x):
        self.name, kind = AXIOMS[method]
        if kind == "one":
            self.total = 1.0
            return
        ready = prepared(model, x)
        forward = wrappers.build(ready, x, case.wrapper, ROOT) if case.wrapper else ready
        target = case.target
        with torch.no_grad():
            fx = float(forward(x)[0, target])
            if kind == "output":
                self.total = fx
            else:
                fb = [float(forward(make_baselines(b, x, "baselines"))[0, target]) for b in kind]
                self.total = fx - float(np.mean(fb))

    def error(self, attr: torch.Tensor) -> float:
        total = float(attr.double().sum())
        return abs(total - self.total) / max(abs(self.total), 1e-12)


# -- the decision --------------------------------------------------------------------
def _r(v: float | None) -> float | None:
    """4 decimals; 4 significant digits below 0.001 (an fp32 axiom error of 5e-7 is not 0)."""
    if v is None or not math.isfinite(v):
        return None
    return float(f"{v:.4g}") if abs(v) < 1e-3 else round(v, 4)


def decide(samples: dict[str, dict]) -> dict:
    """safe / reason / min_r / worst axiom errors of one (method, precision) from its samples."""
    failures, low, axiom_bad, constant, unrepeatable = [], [], [], [], []
    rs, errs = [], []
    measured = [name for name, s in samples.items() if s["status"] != "fp32 failed"]
    for name in measured:
        s = samples[name]
        if s["status"] == "timeout" and "limit_s" in s:
            failures.append(("timeout", f"over the {s['limit_s']:g} s limit (fp32: {s['fp32_seconds']:.2f} s)",
                             name))
            continue
        if s["status"] != "ok":
            failures.append((s["status"], s["error"], name))
            continue
        if s["r"] is None:
            if not s.get("equal_constant"):
                constant.append(f"r undefined on {name}: {s['r_note']}")
        else:
            rs.append((s["r"], name))
            if s["r"] < MIN_R:
                low.append((s["r"], name))
        if s.get("fp32_repeat_r", 1.0) is None or s.get("fp32_repeat_r", 1.0) < REPEAT_R:
            unrepeatable.append(f"{name} (r = {s['fp32_repeat_r']})")
        if s["axiom_error"] is not None and s["fp32_axiom_error"] <= AXIOM_HOLDS:
            errs.append((s["axiom_error"], s["fp32_axiom_error"], name))
            if s["axiom_error"] > s["fp32_axiom_error"] + AXIOM_TOLERANCE:
                axiom_bad.append((s["axiom_error"] - s["fp32_axiom_error"], s["axiom_error"], s["fp32_axiom_error"],
                                  name))
    min_r = min(rs)[0] if rs else None
    worst_err = max(errs) if errs else None
    reasons = []
    if failures:  # one line per kind of failure, naming every sample it happened on
        grouped: dict[tuple[str, str], list[str]] = {}
        for status, error, name in failures:
            key = (status, error if status != "non-finite" else "")
            grouped.setdefault(key, []).append(name)
        for (status, error), names in grouped.items():
            if status == "non-finite":
                first = samples[names[0]]["error"]
                error = first if len(names) == 1 else f"{first} on {names[0]}"
            reasons.append(f"{status} on {', '.join(names)}: {error}")
    if low:
        r, name = min(low)
        reasons.append(f"r = {r:.2f} on {name} (< {MIN_R})")
    if axiom_bad:
        _, err, ref, name = max(axiom_bad)
        reasons.append(f"{axiom_name(samples)} error {err:.3g} on {name} (fp32: {ref:.3g})")
    if constant:
        reasons.append("; ".join(constant))
    if unrepeatable and (low or constant):
        reasons.append("fp32 itself not reproducible under fixed seeds on " + ", ".join(unrepeatable))
    if not measured:
        safe, reason = False, "not measured: the fp32 result failed on every sample"
    elif reasons:
        safe, reason = False, "; ".join(reasons)
    else:
        safe = True
        flat = [n for n in measured if samples[n]["r"] is None]
        reason = f"r >= {MIN_R} on {', '.join(n for n in measured if n not in flat)}"
        if flat:
            reason += f"; constant in fp32 and {precision_of(samples)} alike (within 5 %) on {', '.join(flat)}"
        if errs:
            reason += f"; {axiom_name(samples)} error within fp32 + {AXIOM_TOLERANCE}"
    skipped = [n for n, s in samples.items() if s["status"] == "fp32 failed"]
    if skipped:
        reason += f" (fp32 itself failed on {', '.join(skipped)}: not compared there)"
    return {"safe": safe, "reason": reason, "min_r": _r(min_r),
            "axiom_error": _r(worst_err[0]) if worst_err else None,
            "fp32_axiom_error": _r(worst_err[1]) if worst_err else None,
            "samples": samples}


def precision_of(samples: dict) -> str:
    return next((s["r_note"].split(", ")[1].split()[0] for s in samples.values() if ", " in s.get("r_note", "")),
                "reduced precision")


def axiom_name(samples: dict) -> str:
    return next((s["axiom"] for s in samples.values() if s.get("axiom")), "axiom")


# -- one (method, sample) in a worker process ------------------------------------------
def measure_unit(method: str, case: Case, device: torch.device, precisions: list[str], limit: float) -> dict:
    """fp32, then each precision in turn, of one method on one sample.

    Stops at the first call over the time limit: its thread may still be running (Python cannot
    stop it) and would slow down or block every later call, so the worker is replaced and
    the rest of the unit is measured again in a fresh one. Returns {"entries": {precision:
    entry}, "line": progress text, "timed_out": bool}."""
    spec = registry.get(method)
    model = case.model.to(device)
    x = case.x.to(device)
    ref = run_once(spec, case, model, x, device, "fp32", limit)
    line = f"  {case.name:14s} fp32 {ref['status']:8s} {ref['seconds']:6.2f}s"
    entries: dict[str, dict] = {}
    if ref["status"] != "ok":
        for p in precisions:
            entries[p] = {"status": "fp32 failed", "r": None, "axiom_error": None, "error": ref["error"]}
        return {"entries": entries, "line": line + f" ({ref['error'][:100]})", "timed_out": ref["status"] == "timeout"}
    axiom = ref_err = None
    if method in AXIOMS:
        axiom = Axiom(method, case, model, x)
        ref_err = axiom.error(ref["attr"])
        line += f" axiom {ref_err:.3g}"
    for p in precisions:
        got = run_once(spec, case, model, x, device, p, limit)
        entry = {"status": got["status"], "r": None, "axiom_error": None, "seconds": round(got["seconds"], 3),
                 "fp32_seconds": round(ref["seconds"], 3)}
        if got["error"]:
            entry["error"] = got["error"]
        if got["status"] == "timeout":
            entry["limit_s"] = limit
        if got["status"] == "ok":
            r = pearson(ref["attr"], got["attr"])
            entry["r"] = _r(r)
            if r is None:
                if got["attr"].shape != ref["attr"].shape:
                    entry["r_note"] = f"shape {tuple(got['attr'].shape)} vs fp32 {tuple(ref['attr'].shape)}"
                else:
                    entry["r_note"], entry["equal_constant"] = constant_note(ref["attr"], got["attr"], p)
            if axiom is not None:
                entry["axiom"] = axiom.name
                entry["axiom_error"] = _r(axiom.error(got["attr"]))
                entry["fp32_axiom_error"] = _r(ref_err)
        if entry["status"] == "ok" and (entry["r"] is None or entry["r"] < MIN_R):
            if "repeat" not in ref:  # is fp32 itself reproducible under the same seeds?
                again = run_once(spec, case, model, x, device, "fp32", limit)
                ref["repeat"] = pearson(ref["attr"], again["attr"]) if again["status"] == "ok" else None
                if ref["repeat"] is None and again["status"] == "ok" and torch.equal(ref["attr"], again["attr"]):
                    ref["repeat"] = 1.0
            entry["fp32_repeat_r"] = _r(ref["repeat"])
        entries[p] = entry
        r_text = "-" if entry["r"] is None else f"{entry['r']:.3f}"
        line += f" | {p} {got['status']} r={r_text} {got['seconds']:.2f}s"
        if entry["axiom_error"] is not None:
            line += f" axiom {entry['axiom_error']:.3g}"
        if got["error"]:
            line += f" ({got['error'][:80]})"
        if got["status"] == "timeout":
            return {"entries": entries, "line": line, "timed_out": True}
    return {"entries": entries, "line": line, "timed_out": False}


def _worker(conn, full_retina: bool) -> None:
    """Serve (method, sample, device, precisions, limit) units over ``conn`` until told to stop."""
    import warnings

    warnings.filterwarnings("ignore")
    by_name = {c.name: c for c in cases(full_retina)}
    conn.send("ready")
    while True:
        job = conn.recv()
        if job is None:
            return
        method, name, device, precisions, limit = job
        try:
            result = measure_unit(method, by_name[name], torch.device(device), precisions, limit)
        except Exception as exc:  # noqa: BLE001 - a bug here must not lose the other methods
            message = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            result = {"entries": {p: {"status": "failed", "r": None, "axiom_error": None,
                                      "error": f"measurement failed: {message}"} for p in precisions},
                      "line": f"  {name:14s} measurement failed: {message}", "timed_out": False}
        conn.send(result)


class Worker:
    """A child process that measures units; replaced after a timeout (its stuck thread dies with it)."""

    def __init__(self, full_retina: bool):
        import multiprocessing as mp

        self.full_retina = full_retina
        self.ctx = mp.get_context("spawn")
        self.proc = None
        self.conn = None

    def _start(self) -> None:
        parent, child = self.ctx.Pipe()
        self.proc = self.ctx.Process(target=_worker, args=(child, self.full_retina), daemon=True)
        self.proc.start()
        self.conn = parent
        if not parent.poll(300) or parent.recv() != "ready":
            raise RuntimeError("the measuring worker did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.join()
        self.proc = self.conn = None

    def run(self, job: tuple, wait_s: float) -> dict | None:
        """The unit's result, or None when the worker did not answer within ``wait_s`` (it is killed)."""
        if self.proc is None or not self.proc.is_alive():
            self._start()
        self.conn.send(job)
        if self.conn.poll(wait_s):
            try:
                return self.conn.recv()
            except EOFError:
                pass
        self.stop()
        return None


def measure(method: str, all_cases: list[Case], worker: Worker, device: torch.device, precisions: list[str],
            limit: float) -> dict:
    """Every applicable sample of one method, then the verdict per precision."""
    spec = registry.get(method)
    out: dict[str, dict] = {p: {} for p in precisions}
    for case in all_cases:
        if not applies(spec, case):
            continue
        todo = list(precisions)
        while todo:
            # fp32 + the precisions left; a hung worker gets every call's limit and a margin
            result = worker.run((method, case.name, str(device), todo, limit), limit * (len(todo) + 2) + 60)
            if result is None:
                print(f"  {case.name:14s} the worker stopped answering: {', '.join(todo)} recorded as timeout",
                      flush=True)
                for p in todo:
                    out[p][case.name] = {"status": "timeout", "r": None, "axiom_error": None,
                                         "error": "timeout: the measuring process stopped answering"}
                break
            print(result["line"], flush=True)
            for p, entry in result["entries"].items():
                out[p][case.name] = entry
            todo = [p for p in todo if p not in result["entries"]]
            if result["timed_out"]:
                worker.stop()  # the timed-out thread may still run: measure the rest in a fresh process
    return {p: decide(samples) for p, samples in out.items()}


# -- outputs -------------------------------------------------------------------------
def _clean(obj):
    """Strict JSON: no NaN/Infinity, floats rounded to 4 digits."""
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clean(v) for v in obj]
    if isinstance(obj, float):
        return _r(obj)
    return obj


def markdown(table: dict) -> str:
    precisions = ("bf16", "fp16")
    lines = [
        "# Mixed precision, method by method",
        "",
        f"Generated by `{table['command']}` (torch {table['torch']}, measured on {table['measured_on']}). "
        f"{table['note']}",
        "",
        f"Safe: Pearson r with the fp32 result >= {table['min_r']} on every sample the method applies to, "
        f"no failure or non-finite value, and, where the method has an axiom, its relative error at most the "
        f"fp32 error + {table['axiom_tolerance']}. Axiom error: the worst over the samples of "
        "|sum(attr) - D| / |D| (D: what the attributions must add up to; fp32 error in brackets). "
        "Reasons and per-sample figures: esegeta/amp_safety.json.",
        "",
        "| method | bf16 min r | bf16 axiom err | bf16 safe | fp16 min r | fp16 axiom err | fp16 safe |",
        "|---|---|---|---|---|---|---|",
    ]

    def fmt_r(row):
        v = row.get("min_r")
        text = "–" if v is None else f"{v:.3f}"
        bad = [s["status"] for s in row.get("samples", {}).values() if s["status"] in ("failed", "non-finite", "timeout")]
        if bad:
            kinds = sorted(set(bad))
            text += f" ({len(bad)} of {len(row['samples'])} {'/'.join(kinds)})"
        return text

    def fmt_err(row):
        if row.get("axiom_error") is None:
            return ""
        return f"{row['axiom_error']:.3g} ({row['fp32_axiom_error']:.3g})"

    def fmt_safe(row):
        return {True: "yes", False: "**no**", None: "n/a"}[row.get("safe")]

    for method in sorted(table["methods"], key=lambda m: tuple(m.split(".", 1))):
        rows = table["methods"][method]
        cells = [f"`{method}`"]
        for p in precisions:
            row = rows.get(p, {})
            cells += [fmt_r(row), fmt_err(row), fmt_safe(row)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Unsafe: why", ""]
    for method in sorted(table["methods"], key=lambda m: tuple(m.split(".", 1))):
        for p in precisions:
            row = table["methods"][method].get(p, {})
            if row.get("safe") is False:
                lines.append(f"- `{method}` {p}: {row['reason']}")
    counts = {p: (sum(r.get(p, {}).get("safe") is True for r in table["methods"].values()), len(table["methods"]))
              for p in precisions}
    lines += ["", "Safe: " + ", ".join(f"{p} {n} of {total}" for p, (n, total) in counts.items()) + ".", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", metavar="ID", help="re-measure these methods, merged into the JSON")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--limit", type=float, default=60.0, help="seconds per call before it counts as timeout")
    parser.add_argument("--no-full-retina", action="store_true", help="skip the demo's 128x128 retina input")
    parser.add_argument("--output", type=Path, default=None, help=f"JSON (default {JSON_PATH.relative_to(ROOT)}; "
                                                                   "with --device cuda amp_safety_cuda.json beside it)")
    parser.add_argument("--markdown", type=Path, default=None, help=f"default {MD_PATH.relative_to(ROOT)}")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no GPU here")
    if device.type == "cuda":
        torch.backends.cudnn.allow_tf32 = False  # fp32 means fp32 (runtime.tf32 defaults to false)
        torch.backends.cuda.matmul.allow_tf32 = False
    json_path = args.output or (JSON_PATH if device.type == "cpu" else JSON_PATH.with_name("amp_safety_cuda.json"))
    md_path = args.markdown or (MD_PATH if device.type == "cpu" else MD_PATH.with_name("precision_cuda.md"))
    precisions = ["bf16", "fp16"]
    methods = sorted(registry.all_methods())
    if args.only:
        unknown = [m for m in args.only if m not in methods]
        if unknown:
            parser.error(f"unknown method ids: {', '.join(unknown)}")
        methods = list(args.only)

    if device.type == "cpu":
        note = ("fp16 measured with CPU autocast (torch.autocast('cpu', dtype=torch.float16)) as a proxy for CUDA "
                "fp16: same dtype, different kernels (and CPU fp16 convolutions are several times slower than "
                "fp32); bf16 is what runtime.amp uses on the CPU. Re-measure on a GPU with --device cuda.")
    else:
        note = f"measured on {torch.cuda.get_device_name(device)} with CUDA autocast; TF32 off for the fp32 reference."
    previous = {}
    if args.only and json_path.exists():
        previous = json.loads(json_path.read_text()).get("methods", {})
    all_cases = cases(not args.no_full_retina)
    print(f"samples: {', '.join(c.name for c in all_cases)}; precisions: fp32 vs {', '.join(precisions)} "
          f"on {device}", flush=True)
    start = time.perf_counter()
    results = dict(previous)
    worker = Worker(not args.no_full_retina)
    for n, method in enumerate(methods, 1):
        t0 = time.perf_counter()
        print(f"[{n}/{len(methods)}] {method}", flush=True)
        results[method] = measure(method, all_cases, worker, device, precisions, args.limit)
        verdict = ", ".join(f"{p} {'safe' if r['safe'] else 'UNSAFE' if r['safe'] is False else 'n/a'}"
                            for p, r in results[method].items())
        print(f"  -> {verdict} ({time.perf_counter() - t0:.1f}s)", flush=True)
    worker.stop()
    elapsed = time.perf_counter() - start
    table = {
        "command": "python benchmarks/precision.py" + (" --device cuda" if device.type == "cuda" else ""),
        "torch": torch.__version__.split("+")[0],
        "measured_on": device.type,
        "min_r": MIN_R,
        "note": note,
        "axiom_tolerance": AXIOM_TOLERANCE,
        "axioms": {m: AXIOMS[m][0] for m in sorted(AXIOMS)},
        "samples": [c.name for c in all_cases],
        "methods": {m: results[m] for m in sorted(results)},
    }
    table = _clean(table)
    text = json.dumps(table, indent=1, allow_nan=False)
    json_path.write_text(text + "\n")
    md_path.write_text(markdown(table))
    counts = {p: sum(r.get(p, {}).get("safe") is True for r in table["methods"].values()) for p in precisions}
    print(f"done in {elapsed:.0f}s: safe " + ", ".join(f"{p} {c}/{len(table['methods'])}" for p, c in counts.items())
          + f"; wrote {json_path.relative_to(ROOT) if json_path.is_relative_to(ROOT) else json_path} and "
          f"{md_path.relative_to(ROOT) if md_path.is_relative_to(ROOT) else md_path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
