"""esegeta's own figures ('map' mode): raw units, diverging colours centred at zero, clipping stated,
the frozen mask outlined, 3D as mid-slices and MIPs, the overview as a wrapped grid (real matplotlib)."""
import numpy as np
import pytest

from esegeta.show import figures
from esegeta.spec.config import FigureConfig
from esegeta.show.figures import attribution_figure, map_figure, map_scale, overview_figure
from esegeta.io.outputs import save_figure
from helpers_cli import REPO


def _disc(shape=(32, 32), centre=(10, 20), r=6):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return ((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 < r * r).astype(np.float32)


@pytest.fixture(scope="module")
def signed():
    """A map with a positive and a negative region and one huge outlier (captum.LRP on the demo)."""
    a = 2.0 * _disc() - 1.5 * _disc(centre=(24, 8))
    a[2, 2] = 3.8e6
    return a[None]


def _colorbar_label(fig):
    return " ".join(ax.get_xlabel() for ax in fig.axes)


def test_map_scale_is_centred_at_zero_and_states_the_clipping(signed):
    shown, scale = map_scale(signed, "all", 99.5)
    assert scale.cmap == "RdBu_r" and scale.vmin == -scale.vmax
    assert scale.vmax == pytest.approx(2.0, rel=0.05)  # the outlier does not set the range
    assert scale.clipped and scale.extend == "both"
    assert "clipped at \u00b12" in scale.note and "99.5th" in scale.note and "3.8e+06" in scale.note
    np.testing.assert_array_equal(shown, signed)  # the values themselves are drawn, not normalised
    full = map_scale(signed, "all", None)[1]
    assert full.vmax == pytest.approx(3.8e6) and not full.clipped and "clipped" not in full.note


@pytest.mark.parametrize("sign, cmap, lo, hi", [("positive", "Reds", 0.0, 2.0), ("negative", "Blues_r", -1.5, 0.0),
                                                ("absolute_value", "inferno", 0.0, 2.0)])
def test_map_scale_signs(signed, sign, cmap, lo, hi):
    shown, scale = map_scale(signed, sign, 99.5)
    assert scale.cmap == cmap
    assert (scale.vmin, scale.vmax) == pytest.approx((lo, hi), rel=0.05)
    assert (shown >= 0).all() if sign != "negative" else (shown <= 0).all()


def test_non_negative_map_gets_a_sequential_scale_over_the_whole_bar():
    """Saliency, Grad-CAM, Score-CAM: no value below zero, so no unused (blue) half of a diverging bar."""
    cam = (np.random.default_rng(0).random((1, 16, 16)) + 0.3).astype(np.float32)  # Score-CAM's ~0.3 background
    shown, scale = map_scale(cam, "all", None)
    assert scale.cmap == "Reds" and (scale.vmin, scale.vmax) == (0.0, pytest.approx(cam.max()))
    assert "none < 0" in scale.label
    np.testing.assert_array_equal(shown, cam)
    cam[0, 0, 0] = -1e-6  # one negative value: diverging again, centred at zero
    assert map_scale(cam, "all", None)[1].cmap == "RdBu_r"


def test_map_scale_sparse_zero_and_nonfinite():
    sparse = np.zeros((1, 50, 50))
    sparse[0, 3, 4], sparse[0, 10, 10] = 5.0, -2.0  # the 99.5th percentile of |value| is 0: use the non-zero ones
    assert map_scale(sparse)[1].vmax > 0
    assert "all zero" in map_scale(np.zeros((1, 4, 4)))[1].note
    assert "no positive values" in map_scale(-np.ones((1, 4, 4)), "positive")[1].note
    bad = np.ones((1, 4, 4))
    bad[0, 0, 0] = np.nan
    shown, scale = map_scale(bad)
    assert "1 non-finite shown as 0" in scale.note and np.isfinite(shown).all()


def test_mask_outline_reads_on_the_fundus_and_can_stay_off_the_map(signed):
    """The outline contrasts (WCAG ratio >= 3) with the retina sample's red and a map's white zero
    (the old #00b400: 1.6 and 2.8); ``outline='input'`` leaves the map panel uncovered."""
    import matplotlib.colors as mc
    from PIL import Image


    def luminance(rgb):
        c = np.where(rgb <= 0.03928, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
        return 0.2126 * c[0] + 0.7152 * c[1] + 0.0722 * c[2]

    def contrast(a, b):
        lo, hi = sorted([luminance(np.asarray(a)), luminance(np.asarray(b))])
        return (hi + 0.05) / (lo + 0.05)

    fundus = np.asarray(Image.open(REPO / "samples" / "data" / "retina_crop.png").convert("RGB"), float).reshape(-1, 3)
    outline = mc.to_rgb(figures.MASK_COLOR)
    assert contrast(outline, fundus.mean(axis=0) / 255) >= 3 and contrast(outline, (1, 1, 1)) >= 3
    image, mask = np.random.default_rng(0).random((3, 32, 32)), _disc(centre=(16, 16), r=10)

    def outlines(**kw):
        fig = attribution_figure(signed, image, mask=mask, **kw)
        return [len(ax.collections) for ax in fig.axes if ax.images]

    assert outlines() == [1, 1] and outlines(outline="input") == [1, 0] and outlines(outline="none") == [0, 0]


def test_result_figure_2d_shows_input_map_units_and_mask(tmp_path, signed):
    image = np.random.default_rng(0).random((3, 32, 32)) * 255
    mask = _disc(centre=(16, 16), r=10)
    fig = attribution_figure(signed, image, mask=mask, title="captum.LRP - x", caption="score 3.2 \u00b7 target 1")
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 2 and len(fig.axes) == 3  # input, map, and the colour bar
    image_ax, map_ax = panels[0], panels[1]
    assert "frozen mask" in image_ax.get_title()
    drawn = map_ax.images[0]
    np.testing.assert_allclose(np.asarray(drawn.get_array()), signed[0])  # raw values
    lo, hi = drawn.get_clim()
    assert lo == -hi and drawn.get_cmap().name == "RdBu_r"
    assert image_ax.collections and map_ax.collections  # the mask's outline on both panels
    assert "raw units" in _colorbar_label(fig) and "clipped" in _colorbar_label(fig)
    assert "score 3.2" in fig.get_suptitle() and "target 1" in fig.get_suptitle()
    save_figure(fig, tmp_path / "f.png", dpi=40)


def test_layer_resolution_map_is_resampled_and_negative_values_kept():
    """LayerGradCam-like: a coarse map with mostly negative values stays negative (blue)."""
    coarse = -np.ones((1, 4, 4))
    coarse[0, 1, 1] = 3.0
    fig = attribution_figure(coarse, np.ones((1, 16, 16)))
    drawn = [ax for ax in fig.axes if ax.images][1].images[0]
    arr = np.asarray(drawn.get_array())
    assert arr.shape == (16, 16) and (arr < 0).mean() > 0.6 and arr.max() > 0


def test_result_figure_3d_mid_slices_and_mips(tmp_path):
    rng = np.random.default_rng(1)
    vol, attr = rng.random((1, 8, 9, 10)), rng.standard_normal((1, 8, 9, 10))
    mask = vol[0] > 0.5
    fig = attribution_figure(attr, vol, mask=mask, title="IG 3D")
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert len(titles) == 12
    for word in ("input, mid-slice x", "map, mid-slice z", "input, MIP along y", "map, MIP along z"):
        assert word in titles
    maps = [ax.images[0] for ax in fig.axes if ax.get_title().startswith("map")]
    assert len({im.get_clim() for im in maps}) == 1  # one scale for every view
    assert "raw units" in _colorbar_label(fig)
    save_figure(fig, tmp_path / "v.png", dpi=40)
    fig = map_figure(attr, vol, mask=mask, title="only the map")
    assert len([ax for ax in fig.axes if ax.get_title()]) == 6


def test_overview_is_a_wrapped_grid_with_method_score_target(tmp_path, signed):
    image = np.random.default_rng(2).random((1, 32, 32))
    cells = [{"label": f"library.Method{i}", "array": signed * (i - 5), "score": 1.5 * i, "target": 1,
              "mask": _disc()} for i in range(11)]
    cells.append(("failed.Method", None, "failed: RuntimeError: out of memory"))
    rows = [("input_a.png", image, cells, {"mask": _disc(), "caption": "predicted 1"}),
            ("input_b.png", image, cells[:2])]
    fig = overview_figure(rows, max_columns=6)
    w, h = fig.get_size_inches()
    assert w == pytest.approx(6 * figures.CELL_WIDTH)
    assert h == pytest.approx((3 + 1) * figures.CELL_HEIGHT + 0.4)  # 12 cells: 3 lines of 5, then 1 line
    assert w * 100 <= 1600  # legible at 100 %: at most 1,600 pixels wide at the default 100 dpi
    titles = [ax.get_title() for ax in fig.axes]
    assert any("library.Method7" in t and "score 10.5" in t and "target 1" in t for t in titles)
    assert any("input_a.png" in t and "predicted 1" in t for t in titles)
    texts = " ".join(t.get_text().replace("\n", " ") for ax in fig.axes for t in ax.texts)
    assert "out of memory" in texts
    assert "raw units" in _colorbar_label(fig)
    save_figure(fig, tmp_path / "overview.png", dpi=40)


def test_overview_3d_and_bad_cells(tmp_path):
    rng = np.random.default_rng(3)
    vol = rng.random((1, 6, 7, 8))
    rows = [("vol", vol, [{"label": "IG", "array": rng.standard_normal((1, 6, 7, 8)), "mask": vol[0] > 0.5},
                          {"label": "layer", "array": rng.random((1, 2, 2, 2))},
                          {"label": "bad", "array": np.zeros(3)}, {"label": "x", "nonsense": 1}])]
    fig = overview_figure(rows, projection="mip")
    assert "maximum-intensity projection" in fig.get_suptitle()
    texts = " ".join(t.get_text() for ax in fig.axes for t in ax.texts)
    assert "could not draw" in texts and "bad cell" in texts
    save_figure(fig, tmp_path / "ov3d.png", dpi=40)


def test_config_defaults_and_captum_modes_stay():
    cfg = FigureConfig()
    assert (cfg.method, cfg.sign, cfg.clip) == ("map", "all", 99.5)
    old = FigureConfig(method="blended_heat_map", sign="absolute_value", projection="mip", clip=None)
    assert old.method in figures.CAPTUM_METHODS and set(figures.CAPTUM_METHODS) < set(figures.METHODS)


def test_drawing_and_running_leave_the_process_s_backend_as_it_is(tmp_path):
    """A notebook's backend (here "svg", one that exists headless and is not Agg) stays set after
    esegeta draws every kind of figure (its own maps, captum's modes, the overview), after a run
    of ``esegeta.Pipeline`` that writes pngs, and after both display as Jupyter would show them
    (``_repr_png_``, ``_repr_html_``): figures are ``Figure`` objects, never pyplot's."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from helpers_cli import valid_config

    config = tmp_path / "config.json"
    config.write_text(json.dumps(valid_config(tmp_path)))
    script = f"""
import sys
import matplotlib
matplotlib.use("svg")
import numpy as np
import esegeta
from esegeta.show.figures import attribution_figure, map_figure, overview_figure
from esegeta.io.outputs import save_figure
from helpers_cli import REPO

rng = np.random.default_rng(0)
attr, image = rng.standard_normal((1, 16, 16)), rng.random((3, 16, 16))
figures = [map_figure(attr, image), overview_figure([("x", image, [{{"label": "m", "array": attr}}])])]
figures += [attribution_figure(attr, image, method=m) for m in ("map", "heat_map", "blended_heat_map", "masked_image")]
figures.append(attribution_figure(rng.standard_normal((1, 6, 7, 8)), rng.random((1, 6, 7, 8)), method="heat_map"))
for i, fig in enumerate(figures):
    save_figure(fig, {str(tmp_path)!r} + f"/f{{i}}.png", dpi=20)
result = esegeta.Pipeline({str(config)!r}).run()
assert result.exit_code == 0, result.manifest
# what Jupyter calls to show them inline: PNG bytes of every figure, the run as HTML with its overview
assert all(fig._repr_png_().startswith(b"\\x89PNG") for fig in figures)
html = result._repr_html_()
assert "data:image/png;base64," in html and "report.html" in html and "captum.Saliency" in html
pyplot = sys.modules.get("matplotlib.pyplot")
print("backend", matplotlib.get_backend(), "pyplot figures", pyplot.get_fignums() if pyplot else [])
"""
    root = Path(__file__).resolve().parent
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    env["PYTHONPATH"] = os.pathsep.join([str(root.parent), str(root)])
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-5:] == ["backend", "svg", "pyplot", "figures", "[]"]
    assert (tmp_path / "f6.png").stat().st_size > 0 and list((tmp_path / "out").rglob("*.png"))
