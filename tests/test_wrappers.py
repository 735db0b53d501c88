"""Wrapper details: dict/tuple outputs, Otsu, mean reduction, region masks, custom wrappers."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import esegeta
from esegeta.attribution import wrappers
from esegeta.errors import ConfigError
from esegeta.spec.request import wrapper_config

from conftest import ROOT


class DictOutput(nn.Module):
    """A torchvision-style segmenter returning {"out": ..., "aux": ...}."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        out = self.inner(x)
        return {"aux": out * 0.5, "out": out}


class TupleOutput(DictOutput):
    def forward(self, x):
        out = self.inner(x)
        return out, out * 0.5


THRESHOLD = {"name": "threshold", "threshold": 0.5, "activation": "sigmoid"}


@pytest.mark.parametrize("wrap", [DictOutput, TupleOutput])
def test_dict_and_tuple_outputs_equal_the_plain_tensor(retina, wrap):
    plain = esegeta.explain(retina.model, retina.x, "captum.Saliency", target=1, wrapper=THRESHOLD)
    other = esegeta.explain(wrap(retina.model).eval(), retina.x, "captum.Saliency", target=1, wrapper=THRESHOLD)
    torch.testing.assert_close(plain, other)


def test_output_key_selects_another_entry(retina):
    model = DictOutput(retina.model).eval()
    aux = esegeta.explain(model, retina.x, "captum.Saliency", target=1, wrapper={**THRESHOLD, "output": "aux"})
    out = esegeta.explain(model, retina.x, "captum.Saliency", target=1, wrapper=THRESHOLD)
    assert not torch.allclose(aux, out)
    with pytest.raises(ConfigError, match="no key 'nope'"):
        esegeta.explain(model, retina.x, "captum.Saliency", target=1, wrapper={**THRESHOLD, "output": "nope"})


def test_otsu_threshold_matches_scikit_image(retina):
    from skimage.filters import threshold_otsu

    with torch.no_grad():
        prob = torch.sigmoid(retina.model(retina.x))[0, 0]
    score = wrappers.threshold_score(retina.model(retina.x), wrapper_config({**THRESHOLD, "threshold": "otsu"}))
    expected = (prob > threshold_otsu(prob.numpy())).float()
    assert torch.equal(score.masks[0, 1], expected)


def test_mean_reduction_divides_by_mask_size(retina):
    with torch.no_grad():
        out = retina.model(retina.x)
        total = wrappers.threshold_score(out, wrapper_config(THRESHOLD))(out)
        mean = wrappers.threshold_score(out, wrapper_config({**THRESHOLD, "reduction": "mean"}))(out)
        mask = (torch.sigmoid(out)[0, 0] > 0.5).float()
    torch.testing.assert_close(mean[0, 1], total[0, 1] / mask.sum())
    torch.testing.assert_close(mean[0, 0], total[0, 0] / (1 - mask).sum())


def test_multiclass_columns_are_class_sums_over_argmax_regions(tissue):
    with torch.no_grad():
        out = tissue.model(tissue.x)
        scores = wrappers.multiclass_score(out, wrapper_config({"name": "multiclass", "activation": "softmax"}))(out)
        prob = torch.softmax(out, 1)[0]
        labels = prob.argmax(0)
    for k in range(3):
        torch.testing.assert_close(scores[0, k], (prob[k] * (labels == k)).sum())


def test_region_mask_must_match_the_output(retina):
    with pytest.raises(ConfigError, match="does not match"):
        esegeta.explain(retina.model, retina.x, "captum.Saliency", target=0,
                        wrapper={"name": "region", "mask": str(ROOT / "samples/data/retina_crop_vessels.png")})


def test_component_wrapper_picks_the_largest_component(retina):
    from scipy import ndimage

    from esegeta.io.loading import load_callable

    component = load_callable("wrappers/connected_component.py:component", ROOT, "wrapper.name")
    with torch.no_grad():
        out = retina.model(retina.x)
    score = component(out, threshold=0.5, activation="sigmoid")
    fg = (torch.sigmoid(out)[0, 0] > 0.5).numpy()
    labels, n = ndimage.label(fg, structure=np.ones((3, 3)))
    sizes = np.bincount(labels.ravel())[1:]
    chosen = score.masks[0, 1].numpy().astype(bool)
    assert chosen.sum() == sizes.max()
    assert not (chosen & score.masks[0, 0].numpy().astype(bool)).any()
    assert ((chosen | score.masks[0, 0].numpy().astype(bool)) == fg).all()


def test_custom_wrapper_settings_go_in_options():
    from esegeta.spec.config import WrapperConfig

    with pytest.raises(ValueError, match="options"):
        WrapperConfig(name="x.py:make", threshold=0.3)
    with pytest.raises(ValueError, match="custom wrappers"):
        WrapperConfig(name="threshold", options={"a": 1})
