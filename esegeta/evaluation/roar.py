"""ROAR: remove and retrain (Hooker, Erhan, Kindermans, Kim 2019, "A Benchmark for
Interpretability Methods in Deep Neural Networks", NeurIPS).

For each method and each fraction ``f``: the top ``f`` of every training and test image's
pixels (voxels) by the method's attribution (summed over channels, most relevant first) are
replaced by that image's per-channel mean; a fresh model is trained on the modified training
images with the user's training callable and tested on the modified test images. A method
whose removed pixels hurt the retrained model most (the lowest mean score over the
fractions) points at the pixels the task needs. Controls: ``random`` (pixels removed at
random, seeded) and the unmodified data (fraction 0). One training per (method, fraction):
the cost is that of the user's training times ``len(fractions) × (methods + 1) + 1``.

The training callable is ``train(x_train, y_train, x_test, y_test, **options) -> score``
(e.g. test accuracy; higher is better); ``samples/train_digits.py``'s ``roar_train`` and
``roar_data`` are the worked example (10 epochs on scikit-learn's digits: ~3 s a training).
Results: ``evaluation_roar.csv`` (``label, method, fraction, score``) and the manifest's
``evaluation.roar``.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from esegeta.errors import ConfigError
from esegeta.evaluation.scoring import explainer
from esegeta.spec.request import from_arguments
from esegeta.io.loading import load_callable
from esegeta.io.outputs import atomic_write_bytes
from esegeta.evaluation.engine import model_on_device

log = logging.getLogger("esegeta")
Attribute = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def remove(x: np.ndarray, attribution: np.ndarray, fraction: float) -> np.ndarray:
    """``x`` (N, C, *S) with the top ``fraction`` of each image's pixels by ``attribution``
    (N, C|1, *S, summed over channels) replaced by the image's per-channel mean."""
    x = np.array(x, dtype=np.float32, copy=True)
    n, c = x.shape[:2]
    relevance = np.asarray(attribution, dtype=np.float64).sum(axis=1).reshape(n, -1)
    k = int(round(fraction * relevance.shape[1]))
    if k == 0:
        return x
    order = np.argsort(-relevance, axis=1, kind="stable")[:, :k]
    flat = x.reshape(n, c, -1)
    means = flat.mean(axis=2, keepdims=True)
    rows = np.arange(n)[:, None]
    for channel in range(c):
        flat[rows, channel, order] = means[:, channel]
    return flat.reshape(x.shape)


@dataclass
class RoarResult:
    """Scores by (label, fraction); ``baseline`` the score on the unmodified data."""
    rows: list[dict[str, Any]]
    baseline: float

    def mean_score(self, label: str) -> float:
        """The label's mean score over the fractions (lower: its removed pixels mattered more)."""
        return float(np.mean([r["score"] for r in self.rows if r["label"] == label]))

    def as_dict(self) -> dict[str, Any]:
        labels = list(dict.fromkeys(r["label"] for r in self.rows))
        return {"baseline": self.baseline, "rows": self.rows,
                "mean_score": {label: self.mean_score(label) for label in labels}}

    def csv(self) -> str:
        lines = ["label,method,fraction,score"]
        lines += [f"{r['label']},{r['method']},{r['fraction']:g},{r['score']:.6g}" for r in self.rows]
        lines.append(f"unmodified,-,0,{self.baseline:.6g}")
        return "\n".join(lines) + "\n"


def _attributions(attribute: Attribute, x: np.ndarray, y: np.ndarray, batch: int, device) -> np.ndarray:
    parts = []
    for start in range(0, len(x), batch):
        xb = torch.as_tensor(x[start:start + batch], device=device)
        yb = torch.as_tensor(y[start:start + batch], device=device)
        parts.append(attribute(xb, yb).detach().float().cpu().numpy())
    return np.concatenate(parts)


def roar(train: Callable[..., float], data: Sequence[np.ndarray],
         methods: Mapping[str, str | tuple[str, Attribute]], fractions: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9), *,
         model: torch.nn.Module | None = None, options: Mapping[str, Any] | None = None, random_control: bool = True,
         seed: int = 0, batch: int = 64, device: str | torch.device = "cpu") -> RoarResult:
    """ROAR of ``methods`` with the user's ``train`` on ``data`` = (x_train, x_test, y_train,
    y_test); see the module docstring. ``methods`` maps a label to a registry id (explained
    with :func:`esegeta.explain` on ``model``, each image for its label) or to
    ``(method id, attribute(x, y) -> attribution)``."""
    methods = {label: _explained(value, model) if isinstance(value, str) else value for label, value in methods.items()}
    x_train, x_test, y_train, y_test = (np.asarray(a) for a in data)
    options = dict(options or {})
    baseline = float(train(x_train, y_train, x_test, y_test, **options))
    log.info("roar: unmodified data scores %.4f", baseline)
    maps: dict[str, tuple[str, np.ndarray, np.ndarray]] = {}
    for label, (method, attribute) in methods.items():
        maps[label] = (method, _attributions(attribute, x_train, y_train, batch, device),
                       _attributions(attribute, x_test, y_test, batch, device))
    if random_control:
        rng = np.random.default_rng(seed)
        maps["random"] = ("random", rng.random((len(x_train), 1, *x_train.shape[2:])),
                          rng.random((len(x_test), 1, *x_test.shape[2:])))
    rows = []
    for label, (method, a_train, a_test) in maps.items():
        for fraction in fractions:
            score = float(train(remove(x_train, a_train, fraction), y_train, remove(x_test, a_test, fraction), y_test,
                                **options))
            log.info("roar: %s, %.0f%% removed: %.4f", label, 100 * fraction, score)
            rows.append({"label": label, "method": method, "fraction": float(fraction), "score": score})
    return RoarResult(rows, baseline)


def _explained(method: str, model: torch.nn.Module | None) -> tuple[str, Attribute]:

    if model is None:
        raise ConfigError("model", f"roar explains {method!r} on a model: pass model=")
    explain = explainer(from_arguments(method))
    return method, lambda x, y: explain(model, x, y)


def roar_for_plan(plan, out, token: str | None = None) -> dict[str, Any]:
    """``evaluation.roar`` of a run: the config's methods (attribution kind) explained on the
    data with :func:`esegeta.evaluation.scoring.explainer` (each image for its label), then
    :func:`roar`; writes ``evaluation_roar.csv`` and returns the manifest's section."""
    cfg = plan.config.evaluation.roar
    train = load_callable(cfg.train, plan.base_dir, "evaluation.roar.train")
    x_train, x_test, y_train, y_test = (np.asarray(a) for a in load_callable(cfg.data, plan.base_dir,
                                                                              "evaluation.roar.data")())
    if cfg.max_images is not None:
        x_train, y_train = x_train[:cfg.max_images], y_train[:cfg.max_images]
        x_test, y_test = x_test[:cfg.max_images], y_test[:cfg.max_images]
    model = model_on_device(plan.model, plan.device)
    methods = {}
    for e in plan.entries:
        if (cfg.methods is None or e.label in cfg.methods) and e.spec.kind in ("attribution", "layer"):
            explain = explainer(e.request, None, plan.base_dir, plan.config.evaluation.seed)
            methods[e.label] = (e.spec.id, lambda x, y, explain=explain: explain(model, x, y))
    result = roar(train, (x_train.astype(np.float32), x_test.astype(np.float32), y_train, y_test), methods,
                  cfg.fractions, options=cfg.options, seed=plan.config.evaluation.seed, device=plan.device)
    atomic_write_bytes(out / "evaluation_roar.csv", result.csv().encode("utf-8"), token)
    return result.as_dict()


__all__ = ["RoarResult", "remove", "roar", "roar_for_plan"]
