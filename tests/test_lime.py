"""LIME adapter against LIME called directly (2D), and its 3D supervoxel path, on the sample models."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import esegeta
from esegeta.errors import ConfigError

lime_image = pytest.importorskip("lime.lime_image")
from lime.wrappers.scikit_image import SegmentationAlgorithm  # noqa: E402

ID = "lime.LimeImageExplainer"


def _weight_map(explanation, label):
    weights = dict(explanation.local_exp[label])
    return np.vectorize(lambda s: weights.get(s, 0.0))(explanation.segments).astype(np.float32)


def test_lime_equals_direct_lime_on_grayscale_digits(digits):
    """A one-channel image: LIME's own grayscale path (gray2rgb, classifier sees RGB)."""
    seg = {"algo_type": "slic", "n_segments": 10, "compactness": 0.1}
    attr = esegeta.explain(digits.model, digits.x, ID, 3, segmentation_fn=seg, num_samples=100, random_state=0)
    model = copy.deepcopy(digits.model)

    def classifier_fn(images):  # (N, 8, 8, 3), three equal channels → the model's one channel
        with torch.no_grad():
            return model(torch.from_numpy(images[..., :1]).permute(0, 3, 1, 2).float()).numpy()

    explanation = lime_image.LimeImageExplainer(random_state=0).explain_instance(
        digits.x[0, 0].numpy(), classifier_fn, labels=(3,), top_labels=None, num_samples=100,
        segmentation_fn=SegmentationAlgorithm("slic", n_segments=10, compactness=0.1, start_label=0))
    direct = _weight_map(explanation, 3)
    assert len(np.unique(explanation.segments)) > 1 and len(np.unique(direct)) > 1
    assert attr.shape == (1, 1, 8, 8)
    assert torch.allclose(attr[0, 0], torch.from_numpy(direct), rtol=1e-4, atol=1e-5)


def test_lime_equals_direct_lime_on_retina_with_wrapper(retina):
    """RGB, quickshift, and the wrapped scores (sums, no softmax) as the classifier output.

    (LIME's default quickshift, kernel_size 4 and max_dist 200, makes one segment of a 48×48 crop.)"""
    quickshift = {"kernel_size": 2, "max_dist": 6, "ratio": 0.5, "rng": 0}
    attr = esegeta.explain(retina.model, retina.x, ID, 1, wrapper=retina.wrapper, num_samples=64, random_state=0,
                           segmentation_fn={"algo_type": "quickshift", **quickshift})
    model = copy.deepcopy(retina.model)
    with torch.no_grad():
        mask = (torch.sigmoid(model(retina.x))[:, 0] > 0.5).float()

    def classifier_fn(images):
        with torch.no_grad():
            a = torch.sigmoid(model(torch.from_numpy(images).permute(0, 3, 1, 2).float()))[:, 0]
            return torch.stack([(a * (1 - mask)).sum((1, 2)), (a * mask).sum((1, 2))], dim=1).numpy()

    explanation = lime_image.LimeImageExplainer(random_state=0).explain_instance(
        retina.x[0].permute(1, 2, 0).numpy(), classifier_fn, labels=(1,), top_labels=None, num_samples=64,
        segmentation_fn=SegmentationAlgorithm("quickshift", **quickshift))
    direct = _weight_map(explanation, 1)
    assert len(np.unique(direct)) > 1
    assert torch.allclose(attr[0, 0], torch.from_numpy(direct), rtol=1e-4, atol=1e-3)


def test_lime_3d_supervoxels(tissue):
    """3D: one weight per SLIC supervoxel of the whole volume (segments span slices)."""
    from skimage.segmentation import slic

    attr = esegeta.explain(tissue.model, tissue.x, ID, 2, wrapper=tissue.wrapper, num_samples=64, random_state=0,
                           segmentation_fn={"algo_type": "slic", "n_segments": 20})
    assert attr.shape == tissue.x.shape
    volume = tissue.x[0, 0].numpy()
    scaled = (volume - volume.min()) / (volume.max() - volume.min())  # scaled for the segmentation only
    segments = slic(scaled, n_segments=20, channel_axis=None, start_label=0)
    assert any(len(np.unique(np.nonzero(segments == s)[0])) > 1 for s in np.unique(segments))
    for s in np.unique(segments):
        inside = attr[0, 0][torch.from_numpy(segments == s)]
        assert torch.all(inside == inside[0])
    assert len(torch.unique(attr)) > 1


@pytest.mark.parametrize("params,match", [
    ({"segmentation_fn": "slick"}, r"params\.segmentation_fn: unknown segmentation 'slick'; did you mean slic"),
    ({"segmentation_fn": {"algo_type": "slic", "n_segment": 5}},
     r"params\.segmentation_fn\.n_segment: .*did you mean n_segments"),
    ({"segmentation_fn": {"n_segments": 5}}, r"params\.segmentation_fn: write segmentation_fn"),
    ({"feature_selection": "lasso"}, r"params\.feature_selection: feature_selection must be one of"),
    ({"num_sample": 10}, r"params\.num_sample: unknown parameter.*did you mean num_samples"),
    ({"top_labels": 5}, r"params\.top_labels: unknown parameter"),
])
def test_bad_values_are_config_errors(digits, params, match):
    with pytest.raises(ConfigError, match=match):
        esegeta.explain(digits.model, digits.x, ID, 3, **params)


def test_2d_only_segmentations_are_refused_in_3d(tissue):
    with pytest.raises(ConfigError, match=r"params\.segmentation_fn: felzenszwalb segments 2D images only"):
        esegeta.explain(tissue.model, tissue.x, ID, 2, wrapper=tissue.wrapper, segmentation_fn="felzenszwalb")
