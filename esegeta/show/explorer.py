"""The dataset explorer: one offline, interactive HTML page to look across many inputs.

For every method the attribution maps of all inputs are embedded in 2D with UMAP (umap-learn;
McInnes et al. 2018), and so are the inputs themselves and all methods' maps together. Each
point is one (input, method); hovering shows the input's and the map's thumbnails, and the
points are coloured by the input's label, the model's prediction or the method (a menu). The
page is Bokeh with inline resources: it opens from disk with no network and no server.

Maps are compared by shape, not size: each is summed over channels and divided by its largest
``|value|`` (sign kept) before the embedding, since methods (and inputs) differ in scale.

``esegeta explore RUN_DIR`` builds ``explorer.html`` from a finished run; :func:`build` takes
arrays directly (e.g. attributions computed in batches with :func:`esegeta.explain`).
"""
from __future__ import annotations

import base64
import io
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from esegeta.show.figures import match_resolution, to_display_image
from esegeta.errors import ConfigError
from esegeta.io import store
from esegeta.show.report import label_of, load_run_inputs, method_kinds, read_manifest
from esegeta.io.outputs import atomic_write_bytes

log = logging.getLogger("esegeta")

EXPLORER = "explorer.html"
#: Largest side of a hover thumbnail in pixels (larger inputs are downsampled for it).
THUMB = 64
INPUTS_VIEW, ALL_VIEW = "inputs", "all methods"


@dataclass
class Dataset:
    """What the explorer shows: ``inputs`` ``(N, C, *spatial)``, ``maps`` label → ``(N, C', *spatial')``
    (a row of NaN where the method failed on that input), and per input its name, label and
    prediction (None where unknown)."""
    inputs: np.ndarray
    maps: dict[str, np.ndarray]
    names: list[str] = field(default_factory=list)
    labels: list[Any] = field(default_factory=list)
    predicted: list[Any] = field(default_factory=list)

    def __post_init__(self):
        n = len(self.inputs)
        self.names = list(self.names) or [f"input {i}" for i in range(n)]
        self.labels = list(self.labels) or [None] * n
        self.predicted = list(self.predicted) or [None] * n
        for what, values in (("names", self.names), ("labels", self.labels), ("predicted", self.predicted)):
            if len(values) != n:
                raise ValueError(f"{what} has {len(values)} entries for {n} inputs")
        for label, maps in self.maps.items():
            if len(maps) != n:
                raise ValueError(f"maps of {label!r} has {len(maps)} rows for {n} inputs")


# -- numbers ------------------------------------------------------------------------------
def map_features(maps: np.ndarray) -> np.ndarray:
    """``(N, C, *spatial)`` maps → ``(N, D)``: summed over channels, each divided by its largest
    ``|value|`` (an all-zero map stays zero; non-finite values count as 0)."""
    a = np.nan_to_num(np.asarray(maps, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    a = a.sum(axis=1).reshape(len(a), -1)
    top = np.abs(a).max(axis=1, keepdims=True)
    return a / np.where(top > 0, top, 1.0)


def input_features(inputs: np.ndarray) -> np.ndarray:
    """``(N, C, *spatial)`` inputs → ``(N, D)`` standardised per feature (constant features → 0)."""
    a = np.asarray(inputs, dtype=np.float32).reshape(len(inputs), -1)
    std = a.std(axis=0)
    return (a - a.mean(axis=0)) / np.where(std > 0, std, 1.0)


def embed(features: np.ndarray, seed: int = 0, n_neighbors: int = 15, min_dist: float = 0.1,
          n_epochs: int = 200) -> np.ndarray:
    """UMAP of ``features`` ``(N, D)`` → ``(N, 2)`` (seeded: the same page each time; 200 epochs,
    UMAP's own choice for large data, a third of the time of its 500 for small data). Fewer than
    four points are laid out on a line (UMAP needs neighbours)."""
    features = np.asarray(features, dtype=np.float32)
    n = len(features)
    if n < 4:
        return np.stack([np.arange(n, dtype=np.float32), np.zeros(n, dtype=np.float32)], axis=1)
    os.environ.setdefault("NUMBA_CACHE_DIR", str(Path.home() / ".cache" / "esegeta" / "numba"))
    import umap

    reducer = umap.UMAP(n_neighbors=min(n_neighbors, n - 1), min_dist=min_dist, random_state=seed, n_jobs=1,
                        n_epochs=n_epochs, n_components=2, init="spectral" if n > 10 else "random")
    return np.asarray(reducer.fit_transform(features), dtype=np.float32)


# -- thumbnails ---------------------------------------------------------------------------
def _png_uri(rgb: np.ndarray) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _small(a: np.ndarray) -> np.ndarray:
    """A 2D (or (H, W, 3)) array reduced to at most :data:`THUMB` pixels a side by striding."""
    step = max(1, int(np.ceil(max(a.shape[:2]) / THUMB)))
    return a[::step, ::step]


def _plane(arr: np.ndarray) -> np.ndarray:
    """``(C, *spatial)`` → a 2D view ``(C, H, W)``: 3D volumes give their mid-slice along the last axis."""
    return arr[..., arr.shape[-1] // 2] if arr.ndim == 4 else arr


def input_thumbnail(image: np.ndarray) -> str:
    """The input ``(C, *spatial)`` as a PNG data URI (min-max normalised; grey or RGB)."""
    disp = to_display_image(_plane(np.asarray(image)))
    rgb = np.moveaxis(disp, 0, -1)
    rgb = np.repeat(rgb, 3, axis=-1) if rgb.shape[-1] == 1 else rgb
    return _png_uri((_small(rgb) * 255).round().astype(np.uint8))


def map_thumbnail(attr: np.ndarray) -> str:
    """A map ``(C', *spatial)`` as a PNG data URI: channel sum in a diverging colour map centred at
    zero (red positive, blue negative), scaled by its largest ``|value|``."""
    from matplotlib import colormaps

    a = np.nan_to_num(_plane(np.asarray(attr, dtype=np.float32)).sum(axis=0))
    top = float(np.abs(a).max())
    scaled = 0.5 + 0.5 * (a / top if top > 0 else a)
    rgb = colormaps["RdBu_r"](_small(scaled))[..., :3]
    return _png_uri((rgb * 255).round().astype(np.uint8))


# -- the page -----------------------------------------------------------------------------
def _palette(values: Sequence[Any]) -> dict[Any, str]:
    from bokeh.palettes import Category10_10, Category20_20, Turbo256

    keys = sorted({v for v in values if v is not None}, key=lambda v: (isinstance(v, str), v))
    colours = Category10_10 if len(keys) <= 10 else Category20_20 if len(keys) <= 20 else [
        Turbo256[int(i)] for i in np.linspace(0, 255, len(keys))]
    return {k: colours[i % len(colours)] for i, k in enumerate(keys)}


def _legend(title: str, palette: Mapping[Any, str]) -> str:
    items = "".join(f"<span style='margin-right:10px'><span style='display:inline-block;width:10px;height:10px;"
                    f"background:{c};margin-right:3px'></span>{k}</span>" for k, c in palette.items())
    return f"<b>{title}</b>: {items or 'unknown'}"


def build(data: Dataset, *, title: str = "esegeta explorer", seed: int = 0, n_neighbors: int = 15) -> str:
    """The explorer page (HTML text) of ``data``: UMAP views of the inputs, of each method's maps
    and of all maps together, hover thumbnails, colour by label, prediction or method."""
    from bokeh.embed import components
    from bokeh.layouts import column, row
    from bokeh.models import ColumnDataSource, CustomJS, Div, HoverTool, InlineStyleSheet, Select, TabPanel, Tabs
    from bokeh.plotting import figure
    from bokeh.resources import Resources

    t0 = time.perf_counter()
    n = len(data.inputs)
    methods = list(data.maps)
    ok = {m: np.isfinite(np.asarray(data.maps[m], dtype=np.float32).reshape(n, -1)).all(axis=1) for m in methods}
    labels = [None if v is None else str(v) for v in data.labels]
    predicted = [None if v is None else str(v) for v in data.predicted]
    classes = _palette(labels + predicted)
    method_colours = _palette(methods)
    grey = "#bbbbbb"

    input_thumbs = [input_thumbnail(x) for x in data.inputs]
    common = {"name": data.names, "label": [v or "?" for v in labels], "pred": [v or "?" for v in predicted],
              "input_thumb": input_thumbs}
    views: list[tuple[str, dict[str, Any]]] = []
    xy = embed(input_features(data.inputs), seed, n_neighbors)
    views.append((INPUTS_VIEW, {**common, "x": xy[:, 0], "y": xy[:, 1], "method": ["(input)"] * n}))
    joint_rows: list[tuple[int, str]] = []
    feats = {}
    for m in methods:
        keep = np.flatnonzero(ok[m])
        if len(keep) == 0:
            continue
        feats[m] = map_features(np.asarray(data.maps[m])[keep])
        xy = embed(feats[m], seed, n_neighbors)
        views.append((m, {**{k: [v[i] for i in keep] for k, v in common.items()}, "x": xy[:, 0], "y": xy[:, 1],
                          "method": [m] * len(keep),
                          "map_thumb": [map_thumbnail(data.maps[m][i]) for i in keep]}))
        joint_rows += [(int(i), m) for i in keep]
    if len(feats) > 1:  # one embedding of all maps, each summed over channels at the input's resolution
        spatial = tuple(data.inputs.shape[2:])
        joint = [map_features(np.stack([match_resolution(np.asarray(data.maps[m][i]).sum(axis=0, keepdims=True),
                                                         spatial) for i in np.flatnonzero(ok[m])]))
                 for m in feats]
        xy = embed(np.concatenate(joint), seed, n_neighbors)
        thumbs = {name: v["map_thumb"] for name, v in views[1:]}
        position = {m: {int(i): k for k, i in enumerate(np.flatnonzero(ok[m]))} for m in feats}
        views.append((ALL_VIEW, {"x": xy[:, 0], "y": xy[:, 1], "name": [data.names[i] for i, _ in joint_rows],
                                 "label": [common["label"][i] for i, _ in joint_rows],
                                 "pred": [common["pred"][i] for i, _ in joint_rows],
                                 "method": [m for _, m in joint_rows],
                                 "input_thumb": [input_thumbs[i] for i, _ in joint_rows],
                                 "map_thumb": [thumbs[m][position[m][i]] for i, m in joint_rows]}))
    embed_s = time.perf_counter() - t0

    def tooltip(with_map: bool) -> str:
        image = "<img src='@{}' width='64' height='64' style='image-rendering:pixelated;border:1px solid #999'> "
        return ("<div style='width:150px'>" + image.format("input_thumb") + (image.format("map_thumb") if with_map else "")
                + "<div style='font-size:11px'>@name<br>label @label, predicted @pred<br>@method</div></div>")

    sources, panels = [], []
    for name, columns in views:
        colours = {"label_color": [classes.get(v, grey) for v in columns["label"]],
                   "pred_color": [classes.get(v, grey) for v in columns["pred"]],
                   "method_color": [method_colours.get(v, grey) for v in columns["method"]]}
        default = "label_color" if any(v != "?" for v in columns["label"]) else "pred_color"
        source = ColumnDataSource({**columns, **colours, "color": list(colours[default])})
        p = figure(width=760, height=600, title=f"UMAP of {'the inputs' if name == INPUTS_VIEW else name}",
                   tools="pan,wheel_zoom,box_zoom,reset,save", active_scroll="wheel_zoom")
        p.scatter("x", "y", source=source, color="color", size=6 if len(columns["x"]) < 3000 else 4, alpha=0.8,
                  line_color=None)
        p.add_tools(HoverTool(tooltips=tooltip(name != INPUTS_VIEW)))
        p.xaxis.visible = p.yaxis.visible = False
        p.grid.visible = False
        sources.append(source)
        panels.append(TabPanel(child=p, title=name))
    has_labels = any(v is not None for v in labels)
    options = (["label"] if has_labels else []) + ["prediction", "method"]
    legends = {"label": _legend("label", {k: v for k, v in classes.items() if k in set(labels)}),
               "prediction": _legend("prediction", {k: v for k, v in classes.items() if k in set(predicted)}),
               "method": _legend("method", method_colours)}
    legend = Div(text=legends[options[0]], width=760)
    select = Select(title="colour by", value=options[0], options=options, width=200)
    select.js_on_change("value", CustomJS(args={"sources": sources, "legend": legend, "legends": legends}, code="""
        const column = {label: 'label_color', prediction: 'pred_color', method: 'method_color'}[this.value];
        for (const s of sources) { s.data['color'] = s.data[column].slice(); s.change.emit(); }
        legend.text = legends[this.value];
    """))
    # many methods: the tab strip wraps onto more lines instead of running off the screen
    wrap = ".bk-header{flex-wrap:wrap}.bk-headers-wrapper{display:flex;flex-wrap:wrap;max-width:100%}"
    tabs = Tabs(tabs=panels, stylesheets=[InlineStyleSheet(css=wrap)])
    layout = column(row(select), legend, tabs)
    script, div = components(layout)
    resources = Resources(mode="inline", components=["bokeh", "bokeh-widgets"]).render()
    facts = (f"{n} inputs, {len(methods)} method(s) ({', '.join(methods)}); UMAP (n_neighbors={n_neighbors}, "
             f"seed {seed}) of the inputs, of each method's maps (each divided by its largest |value|, sign kept) and "
             f"of all maps together (each summed over channels and resampled to the input's resolution); "
             f"computed in {embed_s:.1f} s. Hover a point for the input and its map (red "
             f"positive, blue negative).")
    failed = {m: int((~ok[m]).sum()) for m in methods if (~ok[m]).any()}
    if failed:
        facts += " Left out (the method failed there): " + ", ".join(f"{m}: {k}" for m, k in failed.items()) + "."
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{title}</title>{resources}"
            "<style>body{font-family:system-ui,sans-serif;margin:1em 2em;color:#222}p{max-width:60em}</style></head>"
            f"<body><h1>{title}</h1><p>{facts}</p><div data-panel='explorer'>{div}</div>{script}</body></html>")


# -- from a run folder --------------------------------------------------------------------
def from_run(run_dir: str | Path) -> Dataset:
    """The :class:`Dataset` of a finished run: inputs loaded again from its config, every ok result's
    ``.npy`` or attribution-store row (methods that draw an image of their own, e.g. feature visualisations, are left out),
    labels (:func:`esegeta.show.report.label_of`) and predicted columns from the manifest."""
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    kinds = method_kinds(manifest)
    items = load_run_inputs(manifest)
    entries = {e["name"]: e for e in manifest.get("inputs", [])}
    items = [i for i in items if i.name in entries] or items
    index = {item.name: k for k, item in enumerate(items)}
    shapes = {tuple(item.tensor.shape[1:]) for item in items}
    if len(shapes) != 1:
        raise ConfigError("RUN_DIR", f"the explorer needs inputs of one shape; this run has {len(shapes)} shapes")
    maps: dict[str, np.ndarray] = {}
    predicted: list[Any] = [None] * len(items)
    stored: dict[str, tuple[dict[str, int], np.ndarray, Any]] = {}

    def saved(r: Mapping[str, Any], item: Any) -> np.ndarray | None:
        """The result of record ``r`` in the model's axis order: its ``.npy``, else its row of the
        method's attribution store (a run that wrote only ``zarr``), else None."""
        files = r.get("files") or {}
        if files.get("npy") and (run_dir / files["npy"]).is_file():
            return item.model_order(np.load(run_dir / files["npy"]))
        rel = files.get("zarr")
        if not rel or not (run_dir / rel).is_dir():
            return None
        if rel not in stored:  # read once per method: the explorer holds every map anyway
            group = store.open_store(run_dir, r["label"])
            stored[rel] = ({name: k for k, name in enumerate(group.inputs)}, group.written, group.attributions[:])
        rows, written, values = stored[rel]
        k = rows.get(r.get("input"))
        return None if k is None or not written[k] else np.asarray(values[k])  # stores hold the model's order

    for r in manifest.get("runs", []):
        k = index.get(r.get("input"))
        if k is None or kinds.get(r.get("method")) == "image":
            continue
        if predicted[k] is None and r.get("predicted") is not None:
            predicted[k] = r["predicted"]
        arr = saved(r, items[k]) if r.get("status") == "ok" else None
        if arr is None:
            continue
        if r["label"] not in maps:
            maps[r["label"]] = np.full((len(items),) + arr.shape, np.nan, dtype=np.float32)
        if maps[r["label"]].shape[1:] == arr.shape:
            maps[r["label"]][k] = arr
    if not maps:
        raise ConfigError("RUN_DIR", f"{run_dir} has no saved attribution to explore (output.formats needs 'npy' or "
                                     "'zarr')")
    inputs = np.concatenate([item.tensor.detach().cpu().numpy() for item in items])
    labels = [label_of(item.name, entries.get(item.name)) for item in items]
    return Dataset(inputs, maps, [item.name for item in items], labels, predicted)


def write(run_dir: str | Path, output: str | Path | None = None, **options: Any) -> Path:
    """Build the explorer of a finished run into ``output`` (default ``RUN_DIR/explorer.html``)."""
    data = from_run(run_dir)
    page = build(data, title=f"esegeta explorer: {Path(run_dir).name}", **options)
    return atomic_write_bytes(Path(output) if output else Path(run_dir) / EXPLORER, page.encode("utf-8"))
