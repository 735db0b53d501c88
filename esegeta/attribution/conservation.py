"""Does the relevance add up? The axiom check of one result, stated per record.

LRP promises conservation (Bach et al. 2015, doi:10.1371/journal.pone.0130140): the relevance
of the input sums to the explained score. DeepLIFT's summation to delta (Shrikumar et al. 2017,
arXiv:1704.02685) and Integrated Gradients' completeness (Sundararajan et al. 2017,
arXiv:1703.01365) promise Σ attribution = f(x) − f(baseline). Where they fail, the map is not
what the method claims, so every result of such a method carries :class:`Check`: Σ relevance,
the value it should add up to, their ratio and the tolerance; beyond it, a warning names the
likely cause and the fix (:func:`warning`).

What is explained, per method: LRP the target's score (Captum multiplies its normalised
relevance by it) or the seed an adapter starts from (``adapter.relevance_seed = "one"``:
zennit's one-hot); DeepLIFT and IG ``f(x) − f(baseline)`` over the wrapped score (with several
baselines, DeepLiftShap's and DeepSHAP's, their mean ``f``), one more forward pass per baseline.
"""
from __future__ import annotations

from collections.abc import Mapping

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from esegeta.attribution import rules
from esegeta.attribution.backgrounds import make_data
from esegeta.attribution.baselines import make_baselines
from esegeta.spec import cost
from esegeta.spec.registry import Call
from esegeta.spec.targets import Target

#: Relative tolerance of ``|ratio − 1|`` per axiom: DeepLIFT's rules are exact up to rounding;
#: IG's Riemann/Gauss-Legendre sum of ``n_steps`` and LRP's ε stabiliser leave a few per cent.
TOLERANCE = {"conservation": 0.05, "summation-to-delta": 0.01, "completeness": 0.05}
#: The parameter that holds a method's baselines (Captum's, zennit IG's, SHAP DeepExplainer's background).
BASELINE_PARAMS = ("baselines", "baseline_fn", "data")
#: Parameters that, set to False, make a method return multipliers rather than attributions (no axiom then).
_MULTIPLY = "multiply_by_inputs"


@dataclass(frozen=True)
class Check:
    """One result's axiom check: ``total`` (Σ relevance) against ``explained``; ``ratio`` is
    their quotient (None when ``explained`` is about zero), ``holds`` whether
    ``|ratio − 1| <= tolerance``."""
    axiom: str
    total: float
    explained: float
    what: str
    ratio: float | None
    tolerance: float
    #: the rules the method ran with, where esegeta chose them (:mod:`esegeta.attribution.rules`; γ)
    rules: tuple[tuple[str, Any], ...] = ()

    @property
    def holds(self) -> bool | None:
        if self.ratio is None or not math.isfinite(self.ratio):
            return None if self.ratio is None else False
        return abs(self.ratio - 1.0) <= self.tolerance

    def record(self) -> dict[str, Any]:
        """The manifest's ``conservation`` entry (strict JSON: non-finite numbers as None)."""
        def num(v):
            return round(v, 6) if v is not None and math.isfinite(v) else None

        return {"axiom": self.axiom, "sum": num(self.total), "explained": num(self.explained), "of": self.what,
                "ratio": num(self.ratio), "tolerance": self.tolerance, "holds": self.holds,
                **({"rules": dict(self.rules)} if self.rules else {})}


def applies(spec, params: dict[str, Any], noise_tunnel: Any) -> bool:
    """Whether ``spec``'s results are checked: an axiom of :data:`TOLERANCE`, an input or layer
    attribution (a neuron method explains a neuron, not the score), no noise tunnel (an average
    of noisy inputs explains no one input), attributions rather than multipliers."""
    return (spec.axiom in TOLERANCE and spec.kind in ("attribution", "layer") and noise_tunnel is None
            and params.get(_MULTIPLY, True) is not False)


def check_rows(spec, values: Mapping[str, Any], noise_tunnel: Any) -> int:
    """Forward rows the axiom check of one result adds (its baselines' scores, :func:`check`): 0 for
    conservation (it compares with the score) or where nothing is checked; ``values`` are the call's
    resolved parameter values (:func:`esegeta.spec.cost.resolved_values`)."""
    if not applies(spec, dict(values), noise_tunnel) or spec.axiom == "conservation":
        return 0
    name = next((n for n in BASELINE_PARAMS if n in values), None)
    if name == "data" and values.get(name) is None:
        return 0
    return cost.n_baselines(values, name) if name else 1


def check(spec, call: Call, result: torch.Tensor, score: float | None) -> Check | None:
    """The axiom check of ``result``, computed by ``spec`` for ``call`` (one input), whose
    explained ``score`` (the target's column on the unperturbed input) is known; None where
    nothing is checked (:func:`applies`; no target; a baseline that cannot be rebuilt here)."""
    if score is None or call.target is None or not applies(spec, call.params, call.noise_tunnel):
        return None
    total = _sum(result)
    if spec.axiom == "conservation":
        if getattr(spec.adapter, "relevance_seed", "score") == "one":
            explained, what = 1.0, "the output seed (1)"
            if abs(float(score)) <= 1e-12:  # a score of 0 (an empty mask): the seed reaches no input
                return Check(spec.axiom, total, explained, what, None, TOLERANCE[spec.axiom], _rules(spec, call))
        else:
            explained, what = float(score), "score"
    else:
        reference = _baseline_score(spec, call)
        if reference is None:
            return None
        explained, what = float(score) - reference, "f(x) - f(baseline)"
    ratio = total / explained if abs(explained) > 1e-12 else None
    return Check(spec.axiom, total, explained, what, ratio, TOLERANCE[spec.axiom], _rules(spec, call))


def _sum(result: torch.Tensor, part: int = 1 << 22) -> float:
    """Σ ``result`` in float64, part by part: a whole float64 copy of a clinical volume's result
    would cost two volumes at the check (measured: IG at 512×512×300, 3.99 → 1.19 patches' peak)."""
    flat = result.detach().reshape(-1)
    return float(sum(chunk.double().sum() for chunk in flat.split(part))) if flat.numel() else 0.0


def _rules(spec, call: Call) -> tuple[tuple[str, Any], ...]:
    """What the manifest says of the rules: the LRP-conservative substitutes, how LRP crossed the
    graph's branches (:data:`esegeta.attribution.rules.BRANCHES`), and γ where the method takes it."""
    if not rules.applies(spec):
        return ()
    found: list[tuple[str, Any]] = [("substitutes", rules.SUMMARY)]
    if rules.BRANCHES in spec.parameters() and call.network is not None:
        mode = call.params.get(rules.BRANCHES, "auto")
        found.append((rules.BRANCHES, f"{mode} → " + rules.BRANCH_RECORD[rules.splits(call.network, call.inputs, mode)]))
    if rules.CONV_RULE in spec.parameters() and call.network is not None:
        mode = call.params.get(rules.CONV_RULE, "auto")
        found.append((rules.CONV_RULE, f"{mode} → {rules.conv_rule(call.network, call.inputs, mode)}"))
    if "gamma" in spec.parameters():
        found.append(("gamma", float(call.params.get("gamma", 0.0))))
    return tuple(found)


def _baseline_score(spec, call: Call) -> float | None:
    """The mean explained score over the method's baselines (zeros where unset, as upstream)."""
    accepted = spec.parameters()
    name = next((n for n in BASELINE_PARAMS if n in accepted), None)
    x = call.inputs
    value = call.params.get(name) if name else None
    try:
        if name == "data":
            if value is None:
                return None
            base = make_data(value, x, call, f"params.{name}")
        elif value is None:  # a constant as a view of one value: no input-sized copy (a 3D volume)
            base = x.new_zeros(()).expand_as(x)
        else:
            base = make_baselines(value, x, f"params.{name}")
            base = x.new_full((), base).expand_as(x) if not torch.is_tensor(base) else base
    except Exception:  # noqa: BLE001 (a baseline the method itself took in its own way: nothing checked)
        return None
    base = base.to(device=x.device, dtype=x.dtype)
    if base.shape[1:] != x.shape[1:]:
        base = base.expand_as(x)
    with torch.no_grad():
        scores = _forward(call.forward, base)
    column = Target.of(call.target, 1)
    index = column.index(scores.device)[:1].expand(scores.shape[0])
    values = scores[torch.arange(scores.shape[0], device=scores.device), index]
    return float(values.double().mean())


def _forward(forward: nn.Module, base: torch.Tensor) -> torch.Tensor:
    """The scores of a batch of baselines: a wrapped model takes one input at a time (masks frozen per input)."""
    return torch.cat([forward(base[i:i + 1]) for i in range(base.shape[0])])


def warning(spec, found: Check, notes: list[str], wrapper: Any = None) -> str | None:
    """A warning where ``found`` does not hold, naming the likely cause and the fix; ``notes`` are
    the model's known gaps (:func:`esegeta.attribution.architectures.axiom_notes`), ``wrapper``
    the request's wrapper (its activation)."""
    if found.holds is not False and found.ratio is not None:
        return None
    if found.ratio is None:
        what = "the explained score" if found.what == "the output seed (1)" else f"the explained value ({found.what})"
        return (f"{found.axiom} cannot be checked: {what} is about 0 "
                f"(Σ relevance {found.total:.4g}); choose a target or baseline with a score to explain")
    said = f"Σ relevance is {found.ratio:.3g}× {found.what} ({found.total:.4g} vs {found.explained:.4g}; " \
           f"tolerance ±{found.tolerance:g})"
    causes = ["layers without an exact rule: " + "; ".join(notes)] if notes else []
    if spec.axiom == "conservation":
        causes += _lrp_causes(spec, found, wrapper)
    elif spec.axiom == "completeness":
        steps = next((p for p in ("n_steps", "n_iter") if p in spec.parameters()), "n_steps")
        causes.append(f"the path integral's discretisation: raise {steps}")
    else:
        causes.append("a layer DeepLIFT's rules pass as its gradient (a gate, a normalisation, attention): "
                      "use captum.IntegratedGradients (completeness holds on any model) for an exact sum")
    also = f"; also possible: {'; '.join(causes[1:])}" if len(causes) > 1 else ""
    return f"{found.axiom} does not hold: {said}; likely {causes[0]}{also}"


def _lrp_causes(spec, found: Check, wrapper: Any) -> list[str]:
    """Why LRP's relevance may not add up, the likeliest first, each with its fix (short: the README
    explains them). Far off (negative, or beyond 3× either way), relevance grew in cancelling terms:
    a rule of the graph (branches, Captum's ε on convolutions, ε on a transformer's dense layers);
    near, what explains a few per cent to a few times: the wrapper's activation, biases."""
    rules_used = {k: str(v) for k, v in found.rules}
    activation = getattr(wrapper, "activation", None) if wrapper is not None else None
    growth = []
    if "→ upstream" in rules_used.get(rules.BRANCHES, ""):
        growth.append("residual sums crossed whole (set params.branches to \"split\")")
    if spec.library.name == "captum" and rules_used.get(rules.CONV_RULE, "").endswith("epsilon"):
        growth.append("Captum's ε on convolutions of mixed-sign inputs (set params.conv_rule to \"gamma\")")
    if spec.library.name == "zennit":
        growth.append("ε on a transformer's dense layers (params.layer_map "
                      "{\"Linear\": {\"rule\": \"gamma\", \"gamma\": 0.25}})")
    moderate = []
    if activation not in (None, "none"):
        moderate.append(f"the wrapper's {activation}, which LRP passes (activation \"none\" explains the logits)")
    moderate.append("bias absorption (set params.zero_params to \"bias\")" if spec.library.name == "zennit" else
                    "bias absorption (params.conv_rule \"gamma\" leaves biases out of convolutions; "
                    "zennit.EpsilonPlus with zero_params \"bias\" out of every layer)")
    far = found.ratio is not None and not 1 / 3 <= found.ratio <= 3
    return growth + moderate if far else moderate + growth
