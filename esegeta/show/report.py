"""``report.html``: one self-contained page per run that opens anywhere, with no network.

Everything is inside the file: styles inline, figures as base64 PNG (drawn by
:mod:`esegeta.show.figures` in raw units, colour bar, clipping stated, frozen-mask outline),
interactive charts (the evaluation's curves) as Bokeh with inline resources. Sections:

- the run: when, where, how many results ok / failed, time per method;
- the evaluation (when the folder holds one: ``evaluation_ranking.csv``,
  ``evaluation_agreement.csv``, ``evaluation_curves.npz``): the ranking, the agreement between
  metrics and the curves (:func:`evaluation_section`; :func:`update_evaluation` puts it into an
  existing report after ``esegeta evaluate``);
- per input (the first :data:`MAX_INPUTS`): the input with the frozen mask's outline and the
  prediction, then every method's map with its colour bar, score, target, precision, time and
  status (a failed method shows its error); for a 3D input, an interactive viewer of the volume
  with each method's map as an overlay (:mod:`esegeta.show.viewer`, NiiVue, inline);
- the versions of esegeta and the libraries, and the resolved config.

:class:`esegeta.run.writer.Writer` writes it at the end of a run; ``esegeta report RUN_DIR``
rebuilds it from a finished run's folder.
"""
from __future__ import annotations

import base64
import csv
import html
import io
import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from esegeta.show import figures, viewer
from esegeta.errors import ConfigError
from esegeta.io.outputs import atomic_write_bytes
from esegeta.spec.config import FigureConfig
from esegeta.spec.registry import all_methods
from esegeta.io import datasets
from esegeta.spec.config import parse

log = logging.getLogger("esegeta")

REPORT = "report.html"
#: Inputs shown with every method's map; the rest are listed (the explorer shows datasets).
MAX_INPUTS = 20
#: Resolution of the embedded figures (dots per inch).
DPI = 100
_EVAL_START, _EVAL_END = "<!--esegeta:evaluation-->", "<!--/esegeta:evaluation-->"
EVALUATION_FILES = {"ranking": "evaluation_ranking.csv", "agreement": "evaluation_agreement.csv",
                    "values": "evaluation.csv", "curves": "evaluation_curves.npz"}

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:1.5em auto;max-width:1400px;
color:#222;padding:0 1em}
h1{font-size:1.6em;margin-bottom:.2em}h2{font-size:1.3em;border-bottom:1px solid #ccc;padding-bottom:.2em;
margin-top:1.6em}h3{font-size:1.05em;margin:.2em 0}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}td,th{border:1px solid #ddd;padding:.2em .5em;
text-align:left;vertical-align:top}th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
.summary{color:#555}.cards{display:flex;flex-wrap:wrap;gap:12px}
.card{border:1px solid #ddd;border-radius:6px;padding:8px;width:300px;background:#fff}
.card.wide{width:640px}.card img{width:100%;height:auto;display:block}.card table{font-size:.75em;width:100%}
.input{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start;margin-bottom:10px}.input img{max-width:420px;height:auto}
.input img.volume{max-width:min(100%,760px)}
.failed{background:#fff4f4;border-color:#e0a0a0}.timeout{background:#fff8e8;border-color:#e0c080}
.status-ok{color:#1a7f37}.status-failed,.status-timeout{color:#b42318;font-weight:600}
.error{font-family:ui-monospace,monospace;font-size:.75em;white-space:pre-wrap;word-break:break-word;color:#802}
.bar{background:#4c78a8;height:.8em;display:inline-block;vertical-align:middle}
pre{background:#f7f7f7;padding:.6em;overflow:auto;font-size:.8em;max-height:40em}
nav a{margin-right:.8em}.note{color:#666;font-size:.85em}
"""


@dataclass(frozen=True)
class Results:
    """Where the report finds each record's arrays: ``array(record, item)`` → the result as the
    model saw it (or None), ``mask(record)`` → its frozen mask (or None); ``kinds``: method id →
    ``attribution`` or ``image`` (a feature visualisation, not aligned with the input)."""
    array: Callable[[dict, Any], np.ndarray | None]
    mask: Callable[[dict], np.ndarray | None] = lambda record: None
    kinds: Mapping[str, str] = field(default_factory=dict)


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _number(value: Any, digits: int = 4) -> str:
    if value is None:
        return "&ndash;"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return _e(value)


def png_data_uri(fig: Any, dpi: int = DPI) -> str:
    """A matplotlib figure as a ``data:image/png;base64,...`` URI (the figure is closed)."""
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=dpi)
    finally:
        fig.clear()
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _img(uri: str, alt: str, panel: str) -> str:
    return f'<img src="{uri}" alt="{_e(alt)}" data-panel="{panel}">'


# -- sections -----------------------------------------------------------------------------
@dataclass
class _Tally:
    """What the report shows of a run's records, from one pass over them (a run's records are read from
    disk as they are iterated: :mod:`esegeta.run.records`): the count per status, per method label its
    row of the methods' table, and the records of the inputs drawn (by input name)."""
    counts: dict[str, int] = field(default_factory=dict)
    methods: dict[Any, dict[str, Any]] = field(default_factory=dict)
    shown: dict[str, list[Mapping[str, Any]]] = field(default_factory=dict)

    @classmethod
    def of(cls, runs: Any, shown: Sequence[str] = ()) -> _Tally:
        tally = cls(shown={name: [] for name in shown})
        for r in runs:
            tally.counts[r.get("status", "?")] = tally.counts.get(r.get("status", "?"), 0) + 1
            row = tally.methods.setdefault(r.get("label"), {"method": r.get("method"), "ok": 0, "other": 0,
                                                            "seconds": [], "precision": set(), "errors": set()})
            row["ok" if r.get("status") == "ok" else "other"] += 1
            if isinstance(r.get("seconds"), (int, float)):
                row["seconds"].append(float(r["seconds"]))
            if r.get("precision"):
                row["precision"].add(r["precision"])
            if r.get("error"):
                row["errors"].add(str(r["error"])[:160])
            if r.get("input") in tally.shown:
                tally.shown[r["input"]].append(r)
        return tally


def _head(manifest: Mapping[str, Any], tally: _Tally | None = None) -> str:
    tally = tally or _Tally.of(manifest.get("runs", []))
    status = ", ".join(f"{n} {s}" for s, n in sorted(tally.counts.items()))
    methods = list(tally.methods)
    return (f"<h1>esegeta report</h1><p class='summary'>{len(manifest.get('inputs', []))} input(s) &times; "
            f"{len(methods)} method(s): {_e(status) or 'no results'}. Created {_e(manifest.get('created'))} with "
            f"esegeta {_e(manifest.get('esegeta'))} on {_e(', '.join(manifest.get('devices', [])) or manifest.get('device'))}."
            "</p><p class='note'>Maps are drawn in each method's raw units: signed values in a diverging colour map "
            "centred at zero (red positive, blue negative), or a sequential one from zero for a map with no negative "
            "value; where the colours are clipped at a percentile of "
            "|value| the colour bar says so and gives the true range. A thin black outline is the frozen mask of a "
            "segmentation wrapper (the region whose score is explained).</p><p class='note'><b>score</b>: the value "
            "each method explains, on the unperturbed input: the model's output at the target column, or for a "
            "wrapped segmenter the wrapped score (the activation summed, or averaged, over the frozen mask of the "
            "target column); <b>target</b>: that column.</p>")


def _methods_table(manifest: Mapping[str, Any], tally: _Tally | None = None) -> str:
    """Per method: results ok / failed, mean time (with a bar), precision, errors."""
    rows = (tally or _Tally.of(manifest.get("runs", []))).methods
    if not rows:
        return ""
    longest = max((np.mean(v["seconds"]) for v in rows.values() if v["seconds"]), default=0.0) or 1.0
    body = []
    for label, v in rows.items():
        mean = float(np.mean(v["seconds"])) if v["seconds"] else None
        bar = f"<span class='bar' style='width:{120 * (mean or 0) / longest:.0f}px'></span> " if mean else ""
        body.append(f"<tr><td>{_e(label)}</td><td>{_e(v['method'])}</td><td class='num'>{v['ok']}</td>"
                    f"<td class='num'>{v['other']}</td><td>{bar}{_number(mean, 3)}</td>"
                    f"<td>{_e(', '.join(sorted(v['precision'])))}</td>"
                    f"<td class='error'>{_e('; '.join(sorted(v['errors'])))}</td></tr>")
    return ("<h2 id='methods'>Methods</h2><table><tr><th>label</th><th>method</th><th>ok</th><th>not ok</th>"
            "<th>mean seconds per input</th><th>precision</th><th>errors</th></tr>" + "".join(body) + "</table>")


def _record_table(r: Mapping[str, Any]) -> str:
    status = r.get("status", "?")
    rows = [("method", _e(r.get("method"))), ("status", f"<span class='status-{_e(status)}'>{_e(status)}</span>"),
            ("score", _number(r.get("score"))), ("target", _number(r.get("target"))),
            ("predicted", _number(r.get("predicted"))), ("precision", _e(r.get("precision"))),
            ("seconds", _number(r.get("seconds"), 3)), ("device", _e(r.get("device")))]
    if c := r.get("conservation"):  # Σ relevance against what it explains (esegeta.attribution.conservation)
        ratio = "?" if c.get("ratio") is None else f"{c['ratio']:.4g}"
        rows.append((_e(c.get("axiom")), _e(f"Σ = {ratio} × {c.get('of')} (tolerance ±{c.get('tolerance')}"
                                            f"{'' if c.get('holds') else ': does not hold'})")))
    if r.get("warnings"):
        rows.append(("warnings", _e("; ".join(map(str, r["warnings"])))))
    table = "<table>" + "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows) + "</table>"
    if r.get("error"):
        table += f"<div class='error'>{_e(r['error'])}</div>"
    return table


def _card(r: Mapping[str, Any], item: Any, image: np.ndarray | None, results: Results, fig_cfg: Any) -> str:

    label, status = r.get("label"), r.get("status")
    picture = ""
    if status == "ok":
        try:
            arr = results.array(dict(r), item)
            if arr is not None:
                kind = results.kinds.get(r.get("method"), "attribution")
                if kind == "image":
                    fig = figures.attribution_figure(arr, None, kind="image", title=str(label))
                else:
                    fig = figures.map_figure(arr, image, sign=getattr(fig_cfg, "sign", "all"),
                                             clip=getattr(fig_cfg, "clip", figures.DEFAULT_CLIP),
                                             mask=results.mask(dict(r)), title="",
                                             outline=getattr(fig_cfg, "mask_outline", "all"),
                                             caption=figures.result_caption(r.get("score"), r.get("target")))
                picture = _img(png_data_uri(fig), f"{label} on {r.get('input')}", "map")
            else:
                picture = "<p class='note'>result not kept in memory and no .npy saved</p>"
        except Exception as exc:  # noqa: BLE001 (one figure must not sink the report)
            picture = f"<div class='error'>could not draw: {_e(type(exc).__name__)}: {_e(exc)}</div>"
    css = "card" + ("" if status == "ok" else f" {_e(status)}") + (" wide" if image is not None and image.ndim == 4 else "")
    return f"<div class='{css}' data-label='{_e(label)}'><h3>{_e(label)}</h3>{picture}{_record_table(r)}</div>"


def _viewer_section(n: int, item: Any, image: np.ndarray, records: Sequence[Mapping[str, Any]], results: Results,
                    fig_cfg: Any) -> str:
    """The interactive 3D viewer of one 3D input: every ok attribution as an overlay (feature
    visualisations, not aligned with the input, are left out); volumes in the file's voxel order."""
    maps = []
    for r in records:
        if r.get("status") != "ok" or results.kinds.get(r.get("method"), "attribution") == "image":
            continue
        try:
            arr = results.array(dict(r), item)
        except Exception as exc:  # noqa: BLE001 (one unreadable map must not sink the viewer)
            log.warning("report viewer: %s on %s: %s", r.get("label"), item.name, exc)
            continue
        if arr is not None and np.ndim(arr) == 4:
            maps.append((str(r.get("label")), item.own_order(np.asarray(arr), channels=False)))
    try:
        return viewer.section(n, item.name, item.own_order(image, channels=False), getattr(item, "affine", None),
                              maps, clip=getattr(fig_cfg, "clip", figures.DEFAULT_CLIP))
    except Exception as exc:  # noqa: BLE001
        return f"<div class='error'>could not build the 3D viewer: {_e(type(exc).__name__)}: {_e(exc)}</div>"


def shared_path(path: Any, base: Path | None) -> str:
    """A path fit for a file meant for sharing: relative to the config's folder ``base`` when it lies
    below it, else the file name alone (no user's home or machine layout)."""
    if path is None or str(path) == "":
        return ""
    path = Path(str(path))
    if not path.is_absolute():
        return str(path)
    if base is not None:
        try:
            return str(path.relative_to(Path(base).resolve()))
        except ValueError:
            pass
    return path.name


#: Regions a report's summary table shows per input (summaries.csv holds them all).
SUMMARY_ROWS = 40
#: Per kind of summary row: the share the report's table shows, and what it says it is.
SUMMARY_SHARES = {"region": ("share_positive", "share of the map's positive relevance"),
                  "channel": ("share_abs", "share of the map's |relevance|")}


def _summaries_tables(records: Sequence[Mapping[str, Any]]) -> str:
    """An input's region and channel totals (``output.summaries``): per kind a table, a row per region or
    channel, a column per method; each cell the share (see :data:`SUMMARY_SHARES`) and the sum."""
    summarised = [r for r in records if r.get("status") == "ok" and r.get("summaries")]
    runs = [r for r in summarised if r["summaries"].get("rows")]
    if not summarised:
        return ""
    parts = []
    for kind, (share, what) in SUMMARY_SHARES.items():
        cells = {(r.get("label"), row["key"]): row for r in runs for row in r["summaries"]["rows"] if row["kind"] == kind}
        keys = list(dict.fromkeys((row["key"], row["name"]) for r in runs for row in r["summaries"]["rows"]
                                  if row["kind"] == kind))
        if not keys:
            continue
        shown = keys[:SUMMARY_ROWS]
        head = f"<tr><th>{_e(kind)}</th>" + "".join(f"<th>{_e(r.get('label'))}</th>" for r in runs) + "</tr>"
        body = ""
        for key, name in shown:
            row_cells = []
            for r in runs:
                row = cells.get((r.get("label"), key))
                row_cells.append("<td>&ndash;</td>" if row is None else
                                 f"<td>{'&ndash;' if row[share] is None else f'{row[share]:.1%}'} "
                                 f"<span class='note'>({_number(row['sum'], 3)})</span></td>")
            body += f"<tr><th>{_e(name)}</th>{''.join(row_cells)}</tr>"
        more = f"<p class='note'>{len(keys) - len(shown)} more in summaries.csv</p>" if len(keys) > len(shown) else ""
        parts.append(f"<p>per {_e(kind)}: {_e(what)} (sum)</p><table>{head}{body}</table>{more}")
    source = next((r["summaries"].get("labels") for r in summarised if r["summaries"].get("labels")), None)
    notes = sorted({f"{r.get('label')}: {note}" for r in summarised for note in r["summaries"].get("notes", [])})
    about = f"<p>label map: <code>{_e(source)}</code></p>" if source else ""
    about += "".join(f"<p class='note'>{_e(note)}</p>" for note in notes)
    return f"<div class='summaries'><h3>Relevance per region and channel</h3>{about}{''.join(parts)}</div>"


def _input_section(n: int, item: Any, records: Sequence[Mapping[str, Any]], results: Results, fig_cfg: Any,
                   with_viewer: bool = False, base: Path | None = None) -> str:

    image = item.tensor[0].detach().cpu().numpy()
    mask = next((m for m in (results.mask(dict(r)) for r in records) if m is not None), None)
    predicted = next((r.get("predicted") for r in records if r.get("predicted") is not None), None)
    target = next((r.get("target") for r in records if r.get("target") is not None), None)
    facts = []
    if predicted is not None:
        facts.append(f"predicted column {predicted}")
    if target is not None:
        facts.append(f"explained column (target) {target}")
    if mask is not None:
        facts.append(f"frozen mask: {int(np.count_nonzero(mask))} of {mask.size} pixels (black outline)")
    try:
        outlined = mask if getattr(fig_cfg, "mask_outline", "all") != "none" else None
        fig = figures.input_figure(image, outlined, title=item.name)
        picture = _img(png_data_uri(fig), item.name, "input")
        if image.ndim == 4:  # views of a volume: drawn 720 px wide, shown at that size (titles stay readable)
            picture = picture.replace("<img ", "<img class='volume' ", 1)
    except Exception as exc:  # noqa: BLE001
        picture = f"<div class='error'>could not draw the input: {_e(type(exc).__name__)}: {_e(exc)}</div>"
    truth = getattr(item, "label", None)
    truth = label_of(item.name) if truth is None else truth
    if truth is not None:
        facts.insert(0, f"true label {truth}")
    shape = "&times;".join(str(s) for s in image.shape)
    about = (f"<div><p>shape {shape} (channels first), from <code>{_e(shared_path(getattr(item, 'path', None), base))}"
             "</code></p>"
             + "".join(f"<p>{_e(f)}</p>" for f in facts) + "</div>")
    cards = "".join(_card(r, item, image, results, fig_cfg) for r in records)
    shown = _viewer_section(n, item, image, records, results, fig_cfg) if with_viewer and image.ndim == 4 else ""
    return (f"<section id='input-{n}'><h2>{_e(item.name)}</h2><div class='input'>{picture}{about}</div>"
            f"{shown}{_summaries_tables(records)}<div class='cards'>{cards}</div></section>")


def _csv_table(path: Path, max_rows: int = 200) -> str:
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    if not rows:
        return ""
    head, body = rows[0], rows[1:max_rows + 1]

    def cell(value: str) -> str:
        try:
            return f"<td class='num'>{float(value):.4g}</td>"
        except ValueError:
            return f"<td>{_e(value)}</td>"

    more = f"<p class='note'>{len(rows) - 1 - max_rows} more rows in {path.name}</p>" if len(rows) - 1 > max_rows else ""
    return ("<table><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>"
            + "".join("<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in body) + "</table>" + more)


def _curve_plots(path: Path) -> str:
    """One Bokeh chart per (metric, curve): each method's curve averaged over the inputs."""
    from bokeh.embed import components
    from bokeh.layouts import gridplot
    from bokeh.models import HoverTool
    from bokeh.palettes import Category10_10
    from bokeh.plotting import figure
    from bokeh.resources import Resources

    grouped: dict[tuple[str, str], dict[str, list[np.ndarray]]] = {}
    with np.load(path) as data:
        for key in data.files:
            parts = key.split("/")
            if len(parts) < 4:
                continue
            label, metric, curve = parts[0], parts[-2], parts[-1]
            grouped.setdefault((metric, curve), {}).setdefault(label, []).append(np.asarray(data[key], float))
    if not grouped:
        return ""
    plots = []
    for (metric, curve), by_label in sorted(grouped.items()):
        p = figure(title=f"{metric}: {curve} (mean over inputs)", width=420, height=280, x_axis_label="step",
                   y_axis_label=curve, tools="pan,wheel_zoom,box_zoom,reset,save")
        for k, (label, curves) in enumerate(sorted(by_label.items())):
            n = min(len(c) for c in curves)
            y = np.mean([c[:n] for c in curves], axis=0)
            p.line(np.arange(n), y, legend_label=label, line_width=2, color=Category10_10[k % 10])
        p.add_tools(HoverTool(tooltips=[("step", "$x{0}"), (curve, "$y{0.000}")]))
        p.legend.label_text_font_size = "8pt"
        p.legend.click_policy = "hide"
        plots.append(p)
    script, div = components(gridplot(plots, ncols=3))
    return Resources(mode="inline", components=["bokeh"]).render() + script + f"<div data-panel='curves'>{div}</div>"


def evaluation_section(run_dir: Path | None, manifest: Mapping[str, Any] | None = None) -> str:
    """The evaluation's ranking, agreement and curves when ``run_dir`` holds them, else ``""``.

    Reads the files ``esegeta evaluate`` writes (:data:`EVALUATION_FILES`); a file that cannot be
    read is named with the reason instead of failing the report."""
    if run_dir is None:
        return ""
    run_dir = Path(run_dir)
    parts = []
    for name, title in (("ranking", "Ranking (rank 1 = best per metric; mean rank over metrics)"),
                        ("agreement", "Agreement between metrics (Kendall \u03c4 of their orderings of the methods)")):
        path = run_dir / EVALUATION_FILES[name]
        if path.is_file():
            try:
                parts.append(f"<h3>{_e(title)}</h3>" + _csv_table(path))
            except (OSError, csv.Error, UnicodeDecodeError) as exc:
                parts.append(f"<p class='error'>{_e(path.name)}: {_e(exc)}</p>")
    curves = run_dir / EVALUATION_FILES["curves"]
    if curves.is_file():
        try:
            plots = _curve_plots(curves)
            if plots:
                parts.append("<h3>Curves</h3>" + plots)
        except Exception as exc:  # noqa: BLE001 (a bad curve file must not sink the report)
            parts.append(f"<p class='error'>{_e(curves.name)}: {_e(type(exc).__name__)}: {_e(exc)}</p>")
    if not parts:
        return ""
    values = run_dir / EVALUATION_FILES["values"]
    note = f"<p class='note'>Every value: {values.name} (one row per method, input and metric).</p>" if values.is_file() else ""
    return "<h2 id='evaluation'>Evaluation</h2>" + note + "".join(parts)


def _evaluation_or_note(run_dir: Path | None, manifest: Mapping[str, Any] | None = None) -> str:
    """The evaluation section, or a note where the navigation's link lands when there is none yet."""
    return evaluation_section(run_dir, manifest) or (
        "<h2 id='evaluation'>Evaluation</h2><p class='note'>This run has no evaluation: add an "
        "<code>evaluation</code> block to the config and run <code>esegeta evaluate CONFIG</code>; it is "
        "put here.</p>")


def _versions(manifest: Mapping[str, Any], extra: Mapping[str, str] | None = None) -> str:
    libs = {**(manifest.get("libraries") or {}), **(extra or {})}
    rows = "".join(f"<tr><td>{_e(k)}</td><td>{_e(v if v is not None else 'not installed')}</td></tr>"
                   for k, v in libs.items())
    config = json.dumps(manifest.get("config", {}), indent=2, sort_keys=False)
    prepared = "".join(f"<li>{_e(c)}</li>" for c in manifest.get("prepared_model") or [])
    return ("<h2 id='versions'>Versions and configuration</h2>"
            f"<table><tr><th>package</th><th>version</th></tr>{rows}</table>"
            + (f"<p>Changes made to the prepared copy of the model (the user's model is untouched):</p><ul>{prepared}</ul>"
               if prepared else "")
            + f"<details open><summary>resolved config (paths relative to the config's folder, "
            f"{_e(Path(manifest.get('config_dir') or '.').name or '.')})</summary>"
            f"<pre>{_e(config)}</pre></details>")


def build_report(manifest: Mapping[str, Any], inputs: Sequence[Any], results: Results, fig_cfg: Any = None,
                 run_dir: Path | None = None, max_inputs: int = MAX_INPUTS) -> str:
    """The report's HTML text. ``inputs``: :class:`esegeta.io.loading.InputItem` (``name``, ``tensor``);
    ``fig_cfg``: the config's ``output.figure`` (sign and clipping of the maps)."""
    import time

    start = time.perf_counter()
    shown = list(inputs[:max_inputs])
    tally = _Tally.of(manifest.get("runs", []), [item.name for item in shown])  # the records, read once
    nav = "".join(f"<a href='#input-{n}'>{_e(item.name)}</a>" for n, item in enumerate(shown))
    volumes = any(item.tensor.ndim == 5 for item in shown)
    found = viewer.script() if volumes else None
    base = Path(manifest["config_dir"]) if manifest.get("config_dir") else None
    sections = [_input_section(n, item, tally.shown[item.name], results, fig_cfg,
                               with_viewer=found is not None, base=base)
                for n, item in enumerate(shown)]
    if len(inputs) > max_inputs:
        sections.append(f"<p class='note'>{len(inputs) - max_inputs} more input(s) are not shown here: their maps "
                        "are in the folder, and <code>esegeta explore RUN_DIR</code> shows a whole dataset.</p>")
    body = (_head(manifest, tally) + f"<nav><a href='#methods'>methods</a><a href='#evaluation'>evaluation</a>"
            f"<a href='#versions'>versions</a> inputs: {nav}</nav>" + _methods_table(manifest, tally)
            + _EVAL_START + _evaluation_or_note(run_dir, manifest) + _EVAL_END
            + (viewer.about(found) + (viewer.head(found) if found else "") if volumes else "")
            + "".join(sections) + (viewer.tail(found) if found else "")
            + _versions(manifest, viewer.versions(found) if volumes else {}))
    title = f"esegeta report: {len(inputs)} input(s)"
    log.debug("report: %d input(s) drawn in %.1f s", len(shown), time.perf_counter() - start)
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{_e(title)}</title>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'><style>{_CSS}</style></head>"
            f"<body>{body}</body></html>")


def notebook_summary(manifest: Mapping[str, Any], output_dir: Path) -> str:
    """A run in a Jupyter cell (``RunResult._repr_html_``): the counts, the methods' table, the
    overview inline, and where the report and the files are. Styles inline; no script."""
    overview = Path(output_dir) / "overview.png"
    picture = ""
    if overview.is_file():
        picture = ("<img style='max-width:100%' alt='overview' src='data:image/png;base64,"
                   + base64.b64encode(overview.read_bytes()).decode("ascii") + "'>")
    report = Path(output_dir) / REPORT
    tally = _Tally.of(manifest.get("runs", []))  # the records, read once
    where = (f"<p>Every map with its colour bar, score and target: <code>{_e(report)}</code></p>"
             if report.is_file() else "")
    return (f"<div><style>{_CSS.replace('body{', '.esegeta-run{')}</style><div class='esegeta-run'>"
            + _head(manifest, tally).replace("<h1>esegeta report</h1>", f"<h3>esegeta run: {_e(output_dir)}</h3>")
            + _methods_table(manifest, tally).replace("<h2 id='methods'>Methods</h2>", "") + picture + where
            + "</div></div>")


def read_manifest(run_dir: Path) -> dict[str, Any]:
    """The ``manifest.json`` of a finished run in ``run_dir``; a ConfigError naming RUN_DIR if there is none."""
    path = Path(run_dir) / "manifest.json"
    if not path.is_file():
        raise ConfigError("RUN_DIR", f"{run_dir} holds no manifest.json: give the output folder of a finished run")
    return json.loads(path.read_text(encoding="utf-8"))


def update_evaluation(run_dir: str | Path) -> Path | None:
    """Put the evaluation now in ``run_dir`` into its existing report (after ``esegeta evaluate``);
    the report's path, or None if the folder has no report to update."""
    path = Path(run_dir) / REPORT
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8")
    start, end = text.find(_EVAL_START), text.find(_EVAL_END)
    if start < 0 or end < start:
        return None
    text = text[:start + len(_EVAL_START)] + _evaluation_or_note(Path(run_dir)) + text[end:]
    atomic_write_bytes(path, text.encode("utf-8"))
    return path


def write_report(run_dir: str | Path, max_inputs: int = MAX_INPUTS) -> Path:
    """Rebuild ``report.html`` of a finished run from its folder: ``manifest.json``, the saved
    ``.npy`` results and the inputs the manifest names (frozen masks are not saved, so their
    outlines are left out). Raises :class:`esegeta.errors.ConfigError` for a folder without a run."""
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    inputs = load_run_inputs(manifest)
    by_name = {item.name: item for item in inputs}

    kinds = method_kinds(manifest)

    def array(record: dict, item: Any) -> np.ndarray | None:
        rel = (record.get("files") or {}).get("npy")
        if not rel or not (run_dir / rel).is_file():
            return None
        saved = np.load(run_dir / rel)
        return saved if kinds.get(record.get("method")) == "image" else item.model_order(saved)

    fig_cfg = FigureConfig.model_validate(((manifest.get("config") or {}).get("output") or {}).get("figure") or {})
    html_text = build_report(manifest, [by_name[i["name"]] for i in manifest.get("inputs", []) if i["name"] in by_name],
                             Results(array, kinds=kinds), fig_cfg, run_dir, max_inputs)
    return atomic_write_bytes(run_dir / REPORT, html_text.encode("utf-8"))


def method_kinds(manifest: Mapping[str, Any]) -> dict[str, str]:
    """Method id → ``attribution`` or ``image`` for the methods of a run (the registry's kinds)."""
    specs = all_methods()
    return {r["method"]: specs[r["method"]].kind for r in manifest.get("runs", []) if r.get("method") in specs}


def load_run_inputs(manifest: Mapping[str, Any]) -> list:
    """The inputs of a finished run (not loaded until used: :class:`esegeta.io.datasets.InputRef`),
    from its resolved config, named as the run named them."""
    config = parse(dict(manifest.get("config") or {}))
    base = Path(manifest.get("config_dir") or ".")
    return datasets.refs(datasets.source(config.inputs, base, config.model))


def label_of(name: str, entry: Mapping[str, Any] | None = None) -> int | None:
    """An input's class label: the manifest entry's ``label`` if it has one, else ``label<k>`` in
    its file name (the digits sample: ``digit_1_label0.npy`` → 0), else None."""
    if entry is not None and entry.get("label") is not None:
        try:
            return int(entry["label"])
        except (TypeError, ValueError):
            return None
    match = re.search(r"label[_-]?(\d+)", name)
    return int(match[1]) if match else None
