"""Evaluation at its pass count, checked before it runs, with honest exit codes (issue 25)."""
from __future__ import annotations

import torch

from esegeta.attribution import prepare as prepare_module
from esegeta.evaluation import Context, metric
from esegeta.evaluation import scoring
from esegeta.spec.request import from_arguments


def test_randomisation_prepares_one_copy_and_keeps_the_values(digits, monkeypatch):
    """MPRT re-explains once per layer on one prepared copy randomised in place: one preparation
    per metric call, not one per layer; the values are those of a fresh deep copy per call."""
    x, model = digits.x, digits.model
    target = model(x).argmax(1)
    explain = scoring.explainer(from_arguments("captum.Saliency"))
    attribution = explain(model, x, target)
    layers = metric("mprt").explanations_per_input(model)
    assert layers > 3
    made = []
    original = prepare_module.prepare
    counted = lambda *a: made.append(1) or original(*a)  # noqa: E731
    monkeypatch.setattr(prepare_module, "prepare", counted)
    monkeypatch.setattr(scoring, "prepare", counted)
    fast = metric("mprt")(Context(model=model, explain=explain, copy=explain.copy), x, attribution, target)
    assert len(made) == 1
    made.clear()
    slow = metric("mprt")(Context(model=model, explain=explain), x, attribution, target)  # a deep copy, re-prepared
    assert len(made) == layers
    torch.testing.assert_close(fast.values, slow.values)
    torch.testing.assert_close(fast.curves["similarity"], slow.curves["similarity"])
