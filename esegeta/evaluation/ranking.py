"""Ranks of methods per metric, the agreement between metrics, and the evaluation's files.

Files an evaluation writes in the run's output folder (all plain text but the curves;
``NaN`` cells are empty in the CSV files):

- ``evaluation.csv``: one row per (method, input, metric), columns
  ``label, method, input, metric, group, value, higher_is_better, forward_passes, error``
  (``label``: the method entry's label, ``method``: its registry id; ``forward_passes``: the
  metric's model calls for that input, re-explanations not counted; ``error``: why ``value``
  is empty, if it failed).
- ``evaluation_ranking.csv``: one row per method, best first, columns
  ``label, method, mean_rank``, then per metric ``<metric>`` (the method's mean value over
  the inputs) and ``rank:<metric>`` (1 = best in the metric's own direction; ties share the
  average rank). ``mean_rank`` is the mean of the method's ranks over the metrics it has.
- ``evaluation_agreement.csv``: the Kendall τ between every two metrics' orderings of the
  methods (``scipy.stats.kendalltau`` of the direction-corrected mean values: +1 = the two
  metrics rank the methods alike, −1 = reversed), first column ``metric``, then one column
  per metric; empty where fewer than two methods have both values.
- ``evaluation_ranking.md``: both tables, readable (a Markdown table each).
- ``evaluation_curves.npz``: curve data for plots: one array ``<label>/<input>/<metric>/<curve>``
  per curve (the metric's x-axis is its step index; e.g. deletion's score after each step).
- ``evaluation_roar.csv`` (only with a ``roar`` block, see :mod:`.roar`): ``label, method,
  fraction, score``, one row per retraining; the row ``unmodified`` is the score without removal.

The manifest's ``evaluation`` holds the same: ``metrics`` (id, group, paper, params,
higher_is_better, forward_passes_per_input), ``values`` (the rows of ``evaluation.csv``),
``ranking`` (the rows of ``evaluation_ranking.csv``), ``kendall_tau`` ({metric: {metric: τ}}),
``skipped`` (what was not scored, and why), ``files``, ``seconds`` and, with ROAR, ``roar``.
"""
from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from esegeta.io.outputs import atomic_path, atomic_write_bytes

FILES = {"values": "evaluation.csv", "ranking": "evaluation_ranking.csv", "agreement": "evaluation_agreement.csv",
         "table": "evaluation_ranking.md", "curves": "evaluation_curves.npz"}
VALUE_COLUMNS = ("label", "method", "input", "metric", "group", "value", "higher_is_better", "forward_passes", "error")


def method_means(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """{metric: {label: mean value over inputs}} (non-finite values are left out of the mean)."""
    sums: dict[str, dict[str, list[float]]] = {}
    for r in rows:
        values = sums.setdefault(r["metric"], {}).setdefault(r["label"], [])
        if r["value"] is not None and math.isfinite(r["value"]):
            values.append(float(r["value"]))
    return {m: {label: float(np.mean(v)) if v else math.nan for label, v in by.items()} for m, by in sums.items()}


def ranks(means: Mapping[str, Mapping[str, float]], higher_is_better: Mapping[str, bool]
          ) -> tuple[list[str], dict[str, dict[str, float]], dict[str, float]]:
    """(methods best first, {metric: {label: rank}}, {label: mean rank}). Rank 1 is the best
    value in the metric's direction; ties share their average rank; a NaN gets no rank."""
    from scipy.stats import rankdata

    per_metric: dict[str, dict[str, float]] = {}
    for metric, by in means.items():
        labels = [label for label, v in by.items() if math.isfinite(v)]
        sign = -1.0 if higher_is_better[metric] else 1.0
        ranked = rankdata([sign * by[label] for label in labels], method="average")
        per_metric[metric] = {label: float(r) for label, r in zip(labels, ranked)}
    labels = list(dict.fromkeys(label for by in means.values() for label in by))
    mean_rank = {}
    for label in labels:
        mine = [per_metric[m][label] for m in means if label in per_metric[m]]
        mean_rank[label] = float(np.mean(mine)) if mine else math.nan
    order = sorted(labels, key=lambda label: (math.isnan(mean_rank[label]), mean_rank[label], labels.index(label)))
    return order, per_metric, mean_rank


def agreement(means: Mapping[str, Mapping[str, float]], higher_is_better: Mapping[str, bool]
              ) -> dict[str, dict[str, float]]:
    """Kendall τ between every two metrics over the methods both score (NaN if fewer than two,
    or if one metric gives every method the same value)."""
    from scipy.stats import kendalltau

    metrics = list(means)
    tau: dict[str, dict[str, float]] = {m: {} for m in metrics}
    for a in metrics:
        for b in metrics:
            shared = [label for label in means[a] if label in means[b]
                      and math.isfinite(means[a][label]) and math.isfinite(means[b][label])]
            if len(shared) < 2:
                tau[a][b] = math.nan
                continue
            sa = 1.0 if higher_is_better[a] else -1.0
            sb = 1.0 if higher_is_better[b] else -1.0
            value = kendalltau([sa * means[a][label] for label in shared], [sb * means[b][label] for label in shared])
            tau[a][b] = float(value.statistic)
    return tau


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _csv(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([[_cell(v) for v in row] for row in rows])
    return buffer.getvalue()


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


class Summary:
    """The ranking and agreement of an evaluation's rows (see the module docstring)."""

    def __init__(self, rows: Sequence[Mapping[str, Any]], higher_is_better: Mapping[str, bool]):
        self.rows = list(rows)
        self.higher_is_better = dict(higher_is_better)
        self.methods = {r["label"]: r["method"] for r in self.rows}
        self.means = method_means(self.rows)
        self.metrics = list(self.means)
        self.order, self.ranks, self.mean_rank = ranks(self.means, self.higher_is_better)
        self.tau = agreement(self.means, self.higher_is_better)

    def ranking_rows(self) -> list[dict[str, Any]]:
        """One dict per method, best first: label, method, mean_rank, values and ranks per metric."""
        out = []
        for label in self.order:
            row: dict[str, Any] = {"label": label, "method": self.methods[label], "mean_rank": self.mean_rank[label]}
            for m in self.metrics:
                row[m] = self.means[m].get(label, math.nan)
                row[f"rank:{m}"] = self.ranks[m].get(label, math.nan)
            out.append(row)
        return out

    def as_dict(self) -> dict[str, Any]:
        """The manifest's view: ranking rows and the Kendall τ matrix."""
        return {"ranking": self.ranking_rows(), "kendall_tau": self.tau}

    def ranking_csv(self) -> str:
        header = ["label", "method", "mean_rank"] + [c for m in self.metrics for c in (m, f"rank:{m}")]
        return _csv(header, [[row[c] for c in header] for row in self.ranking_rows()])

    def agreement_csv(self) -> str:
        return _csv(["metric"] + self.metrics, [[a] + [self.tau[a][b] for b in self.metrics] for a in self.metrics])

    def values_csv(self) -> str:
        return _csv(VALUE_COLUMNS, [[r.get(c) for c in VALUE_COLUMNS] for r in self.rows])

    def markdown(self) -> str:
        """The ranking (value and rank per metric; ↑ higher is better, ↓ lower) and the τ matrix."""
        arrows = {m: "↑" if self.higher_is_better[m] else "↓" for m in self.metrics}
        header = ["#", "method", "mean rank"] + [f"{m} {arrows[m]}" for m in self.metrics]
        body = []
        for n, row in enumerate(self.ranking_rows(), 1):
            cells = [f"{_cell(row[m])} ({_cell(row[f'rank:{m}']) or '-'})" if math.isfinite(row[m]) else "-"
                     for m in self.metrics]
            body.append([str(n), row["label"], f"{row['mean_rank']:.2f}" if math.isfinite(row["mean_rank"]) else "-"]
                        + cells)
        short = {m: f"m{i + 1}" for i, m in enumerate(self.metrics)}
        tau_rows = [[f"{short[a]} {a}"] + [f"{self.tau[a][b]:+.2f}" if math.isfinite(self.tau[a][b]) else ""
                                           for b in self.metrics] for a in self.metrics]
        return ("## Ranking of the methods\n\nvalue (rank) per metric, mean over the inputs; rank 1 is best.\n\n"
                + _markdown(header, body)
                + "\n\n## Agreement between metrics (Kendall τ over the methods)\n\n+1: the two metrics order the "
                  "methods alike; 0: unrelated; -1: reversed.\n\n"
                + _markdown(["metric"] + [short[m] for m in self.metrics], tau_rows) + "\n")


def write(out: Path, summary: Summary, curves: Mapping[str, np.ndarray], token: str | None = None) -> dict[str, str]:
    """Write the evaluation's files into ``out`` (atomically); returns {kind: file name}."""
    texts = {"values": summary.values_csv(), "ranking": summary.ranking_csv(), "agreement": summary.agreement_csv(),
             "table": summary.markdown()}
    for kind, text in texts.items():
        atomic_write_bytes(out / FILES[kind], text.encode("utf-8"), token)
    files = {kind: FILES[kind] for kind in texts}
    if curves:
        with atomic_path(out / FILES["curves"], token) as tmp:
            with open(tmp, "wb") as handle:
                np.savez_compressed(handle, **{k: np.asarray(v) for k, v in curves.items()})
        files["curves"] = FILES["curves"]
    return files


__all__ = ["FILES", "Summary", "agreement", "method_means", "ranks", "write"]
