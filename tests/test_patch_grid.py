"""The patch grid (issue 22): torchio's ``GridSampler`` locations, computed without importing
torchio (~100 MiB resident, a third of what a 192³ run grew beyond one patch)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from esegeta.attribution.patcher import Grid
from esegeta.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("shape, size, overlap", [
    ((16, 20, 12), [8, 8, 4], [4, 2, 2]),
    ((17, 23, 9), [8, 6, 4], [2, 0, 2]),  # sizes that do not divide: the last patch shifted back
    ((192, 192, 155), [64, 64, 64], None),
    ((40, 30), [16, 12], [6, 4]),  # 2D: a volume of depth 1
    ((8, 8, 8), [8, 8, 8], [0, 0, 0]),
    ((10, 12, 6), [16, 5, 6], [4, 2, 2]),  # a size over the input clipped to it, overlap dropped there
])
def test_grid_locations_are_torchios(shape, size, overlap):
    import torchio as tio

    grid = Grid.over(shape, size, overlap, "average")
    image = tio.ScalarImage(tensor=torch.empty(1, *grid.shape, dtype=torch.uint8))
    sampler = tio.GridSampler(tio.Subject(image=image), grid.size, grid.overlap)
    assert grid.locations.dtype == np.int64
    np.testing.assert_array_equal(grid.locations, np.asarray(sampler.locations, dtype=np.int64))


def test_an_odd_overlap_is_refused_naming_the_field():
    with pytest.raises(ConfigError, match="even overlaps.*e.g. \\[4, 2, 2\\]") as caught:
        Grid.over((16, 16, 16), [8, 8, 8], [5, 2, 3], "average")
    assert caught.value.path == "patch.overlap"


def test_global_patches_do_not_import_torchio():
    """A global-mode explanation (grid, stitching, streamed Saliency) leaves torchio unimported."""
    code = ("import sys, torch, esegeta\n"
            "m = torch.nn.Sequential(torch.nn.Conv3d(1, 3, 3, padding=1)).eval()\n"
            "esegeta.explain(m, torch.randn(1, 1, 16, 16, 8), 'captum.Saliency', 1, "
            "wrapper={'name': 'multiclass', 'activation': 'softmax'}, "
            "patch={'size': [8, 8, 8], 'overlap': [2, 2, 2], 'mode': 'global'})\n"
            "print('torchio' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"
