"""Tests for esegeta.io.outputs (atomic writers) and esegeta.show.figures (real matplotlib/captum)."""
import gzip
import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from esegeta.show import figures
from esegeta.show.figures import (
    METHODS,
    SIGNS,
    attribution_figure,
    match_resolution,
    overview_figure,
    to_display_image,
    views_3d,
)
from esegeta.io.outputs import atomic_path, atomic_write_bytes, layer_affine, save_figure, save_json, save_nifti, save_npy

DPI = 40


# --------------------------------------------------------------------------- #
# atomic writes
# --------------------------------------------------------------------------- #
def test_atomic_path_failure_leaves_nothing(tmp_path):
    target = tmp_path / "sub" / "result.bin"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(target) as tmp:
            assert tmp.parent == target.parent
            tmp.write_bytes(b"half-written")
            raise RuntimeError("boom")
    assert not target.exists()
    assert list(target.parent.iterdir()) == []


def test_atomic_path_failure_keeps_previous_file(tmp_path):
    target = tmp_path / "result.txt"
    target.write_text("old")
    with pytest.raises(ValueError):
        with atomic_path(target) as tmp:
            tmp.write_text("new but broken")
            raise ValueError
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.txt"]


def test_atomic_path_success_leaves_only_final(tmp_path):
    target = tmp_path / "a" / "b" / "result.nii.gz"
    with atomic_path(target) as tmp:
        assert tmp.name.endswith(".nii.gz")  # extension kept for format sniffing
        assert tmp != target
        tmp.write_bytes(b"data")
    assert target.read_bytes() == b"data"
    assert [p.name for p in target.parent.iterdir()] == ["result.nii.gz"]


def test_atomic_path_nothing_written_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        with atomic_path(tmp_path / "x.bin"):
            pass
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_bytes_overwrites(tmp_path):
    target = tmp_path / "deep" / "f.bin"
    atomic_write_bytes(target, b"one")
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    assert [p.name for p in target.parent.iterdir()] == ["f.bin"]


def test_save_npy_roundtrip(tmp_path):
    arr = np.arange(24, dtype=np.float64).reshape(1, 2, 3, 4) / 7
    out = save_npy(tmp_path / "x" / "attr.npy", arr)
    back = np.load(out)
    assert back.dtype == np.float32 and back.shape == arr.shape
    np.testing.assert_allclose(back, arr, rtol=1e-6)
    # a name without ".npy" is kept as given (numpy would otherwise append one)
    out2 = save_npy(tmp_path / "noext", arr[0])
    assert out2.exists() and np.load(out2).shape == (2, 3, 4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["noext", "x"]


def test_save_json_numpy_paths_tuples(tmp_path):
    obj = {
        "f": np.float32(1.5),
        "i": np.int64(3),
        "b": np.bool_(True),
        "a": np.arange(3),
        "p": Path("/tmp/x.png"),
        "t": (1, (2, 3)),
        np.int64(7): "numpy key",
        "nested": [{"arr": np.zeros((2, 2), dtype=np.float32)}],
    }
    out = save_json(tmp_path / "r" / "summary.json", obj)
    text = out.read_text()
    assert "\n  " in text  # indent=2
    back = json.loads(text)
    assert back["f"] == 1.5 and back["i"] == 3 and back["b"] is True
    assert back["a"] == [0, 1, 2] and back["p"] == "/tmp/x.png"
    assert back["t"] == [1, [2, 3]] and back["7"] == "numpy key"
    assert back["nested"][0]["arr"] == [[0.0, 0.0], [0.0, 0.0]]
    with pytest.raises(TypeError):
        save_json(tmp_path / "bad.json", {"x": object()})
    assert not (tmp_path / "bad.json").exists()


def _affine():
    theta = 0.3
    rot = np.array(
        [[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]]
    )
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([0.8, 1.2, 2.5])
    aff[:3, 3] = [-10.0, 4.0, 7.5]
    return aff


@pytest.mark.parametrize("name", ["a.nii.gz", "a.nii"])
def test_save_nifti_single_channel(tmp_path, name):
    nib = pytest.importorskip("nibabel")
    arr = np.random.default_rng(0).standard_normal((1, 4, 5, 6))
    aff = _affine()
    out = save_nifti(tmp_path / "n" / name, arr, aff)
    assert [p.name for p in out.parent.iterdir()] == [name]
    if name.endswith(".gz"):
        with open(out, "rb") as f:
            assert f.read(2) == b"\x1f\x8b"  # really gzip-compressed
    img = nib.load(str(out))
    assert img.shape == (4, 5, 6)
    assert img.get_data_dtype() == np.float32
    np.testing.assert_allclose(img.affine, aff, atol=1e-5)
    np.testing.assert_allclose(np.asarray(img.dataobj), arr[0], rtol=1e-6)


def test_save_nifti_multi_channel_and_identity(tmp_path):
    nib = pytest.importorskip("nibabel")
    arr = np.random.default_rng(1).standard_normal((2, 3, 4, 5)).astype(np.float32)
    out = save_nifti(tmp_path / "m.nii.gz", arr, None)
    img = nib.load(str(out))
    assert img.shape == (3, 4, 5, 2)
    np.testing.assert_allclose(img.affine, np.eye(4))
    data = np.asarray(img.dataobj)
    np.testing.assert_allclose(data[..., 1], arr[1])
    with gzip.open(out) as f:
        assert len(f.read()) > arr.nbytes


def test_layer_affine_centres_line_up():
    aff = _affine()
    input_shape, attr_shape = (32, 40, 24), (4, 5, 3)
    coarse = layer_affine(aff, input_shape, attr_shape)

    def world(a, ijk):
        return a[:3, :3] @ np.asarray(ijk, float) + a[:3, 3]

    fine_centre = (np.array(input_shape) - 1) / 2
    coarse_centre = (np.array(attr_shape) - 1) / 2
    np.testing.assert_allclose(world(coarse, coarse_centre), world(aff, fine_centre), atol=1e-9)
    # voxel size scaled by 8 on every axis
    np.testing.assert_allclose(
        np.linalg.norm(coarse[:3, :3], axis=0), 8 * np.linalg.norm(aff[:3, :3], axis=0)
    )
    # identity, factor 4: voxel 0 of the coarse grid sits at fine coordinate 1.5
    ident = layer_affine(None, (8, 8, 8), (2, 2, 2))
    np.testing.assert_allclose(ident, np.diag([4.0, 4.0, 4.0, 1.0]) + np.c_[np.zeros((4, 3)), [1.5, 1.5, 1.5, 0]])
    # same shape: unchanged; channel axis first is tolerated
    np.testing.assert_allclose(layer_affine(aff, (1, 4, 4, 4), (1, 4, 4, 4)), aff)


# --------------------------------------------------------------------------- #
# figures
# --------------------------------------------------------------------------- #
def _read_png(path):
    import matplotlib.image as mpimg

    assert path.stat().st_size > 0
    return mpimg.imread(str(path))


def _check_png(path, fig_inches=None):
    px = _read_png(path)
    assert px.ndim == 3 and px.shape[2] in (3, 4)
    h, w = px.shape[:2]
    if fig_inches is not None:
        assert (w, h) == (round(fig_inches[0] * DPI), round(fig_inches[1] * DPI))
    assert 40 <= h <= 2000 and 40 <= w <= 4000
    assert float(px[..., :3].std()) > 0.01  # not a blank canvas
    return px


def _titles(fig):
    """Every title and axis label (the 'map' mode states notes such as 'all zero' under its colour bar)."""
    return " ".join(f"{ax.get_title()} {ax.get_xlabel()}" for ax in fig.axes)


def _save(fig, path):
    inches = tuple(fig.get_size_inches())
    save_figure(fig, path, dpi=DPI)
    return _check_png(path, inches)


@pytest.fixture(scope="module")
def data2d():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:16, 0:16]
    rgb = np.stack([xx, yy, 15 - xx]) * 10.0 - 30  # arbitrary range
    attr = np.stack(
        [((xx - 10) ** 2 + (yy - 5) ** 2 < 10) * 1.0, -0.7 * ((xx - 4) ** 2 + (yy - 11) ** 2 < 8)]
    )
    attr = attr + 0.05 * rng.standard_normal(attr.shape)
    return rgb, attr


@pytest.mark.parametrize("sign", SIGNS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("channels", [1, 3])
def test_attribution_figure_2d_all_methods_signs(tmp_path, data2d, method, sign, channels):
    rgb, attr = data2d
    image = rgb[:channels]
    a = attr[:1] if channels == 1 else np.concatenate([attr, attr[:1]])  # C' == C
    fig = attribution_figure(a, image, method, sign, title=f"{method}/{sign}", show_colorbar=False)
    _save(fig, tmp_path / "f.png")
    assert list(tmp_path.iterdir()) == [tmp_path / "f.png"]


@pytest.mark.parametrize("sign", SIGNS)
@pytest.mark.parametrize("method", METHODS)
def test_attribution_figure_3d_all_methods_signs(tmp_path, method, sign):
    rng = np.random.default_rng(2)
    image = rng.random((1, 6, 7, 8)) * 100
    attr = np.zeros((2, 6, 7, 8))
    attr[0, 1:3, 2:5, 3:6] = 1.0
    attr[1, 4:6, 1:3, 2:4] = -1.0
    projection = "mip" if sign in ("all", "negative") else "mid"
    fig = attribution_figure(attr, image, method, sign, title="3d", projection=projection,
                             show_colorbar=(method == "heat_map" and sign == "all"))
    # captum's modes: the three orthogonal views; 'map': input and map, mid-slices and MIPs
    assert len([ax for ax in fig.axes if ax.get_title()]) == (12 if method == "map" else 3)
    _save(fig, tmp_path / "v.png")


def test_attribution_figure_2d_colorbar_and_channel_mismatch(tmp_path, data2d):
    rgb, attr = data2d
    # 2 attribution channels for a 3-channel image: summed before captum
    fig = attribution_figure(attr, rgb, "blended_heat_map", "all", title="IG", show_colorbar=True)
    assert fig.axes[0].get_title() == "IG"
    assert len(fig.axes) == 2  # panel + colorbar
    _save(fig, tmp_path / "cb.png")


def test_sign_all_unsupported_by_captum_falls_back(tmp_path, data2d):
    rgb, attr = data2d
    fig = attribution_figure(attr, rgb, "masked_image", "all", title="t", show_colorbar=False)
    assert "|attr|" in fig.axes[0].get_title()


@pytest.mark.parametrize("shape", [(1, 16, 16), (3, 6, 7, 8)])
def test_zero_and_constant_attribution(tmp_path, shape):
    image = np.random.default_rng(3).random((1,) + shape[1:])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither crash nor warn
        for method in METHODS:
            fig = attribution_figure(np.zeros(shape), image, method, "all", title="zero",
                                     show_colorbar=(method == "heat_map"))
            assert "all zero" in _titles(fig)
            save_figure(fig, tmp_path / f"z_{method}.png", dpi=DPI)
        fig = attribution_figure(np.full(shape, 0.3), image, "heat_map", "positive",
                                 show_colorbar=False)
        _save(fig, tmp_path / "const.png")
        # only negative values, sign positive: nothing to show, no crash
        fig = attribution_figure(-np.ones(shape), image, "heat_map", "positive",
                                 show_colorbar=False)
        assert "no positive values" in _titles(fig)
        # tiny values (raw gradients): captum's "approximately 0" warning is silenced
        fig = attribution_figure(np.full(shape, 1e-9) * image, image, "heat_map",
                                 "absolute_value", show_colorbar=False)
        save_figure(fig, tmp_path / "tiny.png", dpi=DPI)


def test_layer_resolution_attribution(tmp_path, data2d):
    rgb = np.random.default_rng(4).random((3, 32, 32))
    attr = np.random.default_rng(5).standard_normal((1, 4, 4))
    fig = attribution_figure(attr, rgb, "blended_heat_map", "positive", title="layer")
    _save(fig, tmp_path / "layer.png")
    vol = np.random.default_rng(6).random((1, 8, 12, 16))
    fig = attribution_figure(np.random.default_rng(7).random((4, 2, 3, 4)), vol, "heat_map", "all",
                             show_colorbar=False)
    _save(fig, tmp_path / "layer3d.png")


def test_feature_visualisation_image(tmp_path):
    feat = np.random.default_rng(8).standard_normal((3, 12, 10)) * 5
    fig = attribution_figure(feat, None, title="neuron 3")
    assert fig.axes[0].get_title() == "neuron 3"
    _save(fig, tmp_path / "feat.png")
    fig = attribution_figure(np.random.default_rng(9).random((1, 5, 6, 7)), None, projection="mip")
    _save(fig, tmp_path / "feat3d.png")


def test_to_display_image_and_match_resolution():
    img = np.arange(2 * 3 * 4, dtype=float).reshape(2, 3, 4) - 5
    d = to_display_image(img)
    assert d.shape == (1, 3, 4) and d.min() == 0 and d.max() == 1  # 2 channels -> mean
    rgb = to_display_image(np.random.default_rng(0).random((3, 4, 4)) * 300)
    assert rgb.shape == (3, 4, 4) and rgb.min() == 0 and rgb.max() == 1
    assert to_display_image(np.full((1, 3, 3), 7.0)).max() == 0
    up = match_resolution(np.full((2, 2, 2), 3.0), (8, 8))
    assert up.shape == (2, 8, 8) and np.allclose(up, 3.0)
    up3 = match_resolution(np.random.default_rng(0).random((1, 2, 3, 4)), (4, 6, 8))
    assert up3.shape == (1, 4, 6, 8)
    same = np.ones((1, 5, 5), dtype=np.float32)
    assert match_resolution(same, (5, 5)).shape == (1, 5, 5)


def test_views_3d_mid_and_mip_keep_sign():
    vol = np.zeros((1, 4, 5, 6))
    vol[0, 1, 2, 3] = -5.0  # largest magnitude, negative
    vol[0, 2, 2, 3] = 2.0
    vol[0, 3, 1, 1] = 1.0
    mips = views_3d(vol, "mip", orient=False)
    assert [v.shape for v in mips] == [(1, 5, 6), (1, 4, 6), (1, 4, 5)]
    assert mips[0][0, 2, 3] == -5.0  # along x: -5 beats +2
    assert mips[1][0, 1, 3] == -5.0 and mips[1][0, 2, 3] == 2.0
    assert mips[2][0, 3, 1] == 1.0
    img_mip = views_3d(vol, "mip", kind="image", orient=False)
    assert img_mip[0][0, 2, 3] == 2.0  # plain max for images
    mids = views_3d(vol, "mid", orient=False)
    np.testing.assert_array_equal(mids[0], vol[:, 2])
    np.testing.assert_array_equal(mids[2], vol[:, :, :, 3])
    # display orientation: first remaining axis horizontal, second pointing up
    oriented = views_3d(vol, "mid")
    assert oriented[2].shape == (1, 5, 4)
    np.testing.assert_array_equal(oriented[2][0], np.flipud(vol[0, :, :, 3].T))


def test_overview_failed_and_image_cells(tmp_path, data2d):
    rgb, attr = data2d
    rng = np.random.default_rng(10)
    rows = [
        ("input 0", rgb, [
            ("IG", attr, ""),
            ("GradCAM", rng.random((1, 4, 4)), ""),
            ("Occlusion", None, "failed: RuntimeError: CUDA out of memory"),
            ("FeatureVis", rng.random((3, 8, 8)), "", "image"),
        ]),
        ("input 1", rgb[:1], [("IG", np.zeros((1, 16, 16)), ""), ("bad", np.zeros(3), "")]),
    ]
    fig = overview_figure(rows, sign="all")
    titles = [ax.get_title() for ax in fig.axes]
    for t in ("input 0", "IG", "GradCAM", "Occlusion", "FeatureVis", "input 1", "bad"):
        assert t in titles
    texts = " ".join(t.get_text().replace("\n", " ") for ax in fig.axes for t in ax.texts)
    assert "CUDA out of memory" in texts and "could not draw" in texts
    w, h = fig.get_size_inches()
    assert w == pytest.approx(5 * figures.CELL_WIDTH) and h >= 2 * figures.CELL_WIDTH
    _save(fig, tmp_path / "overview.png")


def test_overview_3d(tmp_path):
    rng = np.random.default_rng(11)
    vol = rng.random((1, 6, 7, 8))
    rows = [("vol", vol, [("IG", rng.standard_normal((1, 6, 7, 8)), ""),
                          ("layer", rng.random((1, 2, 2, 2)), ""),
                          ("failed", None, "failed: ValueError")])]
    fig = overview_figure(rows, method="heat_map", sign="absolute_value", projection="mip")
    _save(fig, tmp_path / "ov3d.png")


def test_invalid_method_or_sign():
    with pytest.raises(ValueError):
        attribution_figure(np.ones((1, 4, 4)), np.ones((1, 4, 4)), method="nope")
    with pytest.raises(ValueError):
        overview_figure([("x", np.ones((1, 4, 4)), [])], sign="nope")


def test_no_pyplot_figures_left_open(tmp_path, data2d):
    import matplotlib.pyplot as plt

    before = len(plt.get_fignums())
    rgb, attr = data2d
    save_figure(attribution_figure(attr, rgb), tmp_path / "x.png", dpi=DPI)
    assert len(plt.get_fignums()) == before
    assert figures.METHODS == METHODS


def test_save_json_streams_what_json_dump_writes(tmp_path):
    """The manifest is written item by item (issue 26: a 20,000-run manifest was held again as one
    string and its bytes); the file is the one ``json.dumps(..., indent=2)`` gives."""
    from esegeta.io.outputs import _json_default, _jsonable

    manifest = {"esegeta": "x", "runs": [{"score": np.float32(0.5), "nan": float("nan"), "shape": (1, 8), "files": {},
                                          "k": {1: 2, None: [np.arange(2)]}} for _ in range(3)] + [[]],
                "empty": {}, "none": [], "text": "ü\n", "path": tmp_path}
    text = save_json(tmp_path / "m.json", manifest).read_text(encoding="utf-8")
    assert text == json.dumps(_jsonable(manifest), indent=2, default=_json_default, allow_nan=False) + "\n"
    assert json.loads(text)["runs"][0]["nan"] is None
