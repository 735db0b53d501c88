"""torchvision on a CPU-only torch (ENVIRONMENT.md): esegeta imports it for the adapters
that need it, declaring the two missing operator schemas only when that is what breaks."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

CHILD = """
import sys
from pathlib import Path
try:
    import torchvision  # noqa: F401
    plain = "ok"
except RuntimeError as exc:
    plain = str(exc)
for name in [m for m in sys.modules if m.startswith("torchvision")]:
    del sys.modules[name]
from esegeta.compat import declared_missing_ops, import_torchvision
tv = import_torchvision()
import torch
model = tv.models.resnet18(num_classes=3).eval()
out = model(torch.zeros(1, 3, 32, 32))
print(plain)
print(declared_missing_ops(), tuple(out.shape))
try:
    tv.ops.nms(torch.zeros(1, 4), torch.zeros(1), 0.5)
    print("nms ok")
except Exception as exc:
    print("nms fails:", type(exc).__name__)
"""


def test_torchvision_models_run_whatever_the_torchvision_build():
    proc = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    plain, declared, nms = proc.stdout.strip().splitlines()[-3:]
    if plain == "ok":  # a torchvision built for this torch: esegeta changes nothing
        assert declared.startswith("False") and nms == "nms ok"
    else:  # the CUDA torchvision next to a CPU torch, as on these machines
        assert "torchvision::nms does not exist" in plain
        assert declared == "True (1, 3)"
        assert nms.startswith("nms fails")


@pytest.mark.parametrize("module", ["pytorch_grad_cam", "zennit.torchvision", "lucent.optvis.render",
                                    "torchray.attribution.excitation_backprop"])
def test_every_library_that_needs_torchvision_imports(module):
    code = f"from esegeta.compat import import_torchvision; import_torchvision(); import {module}"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


USER_MODEL = """
import torchvision  # a user's model file that imports torchvision, as most do
from models import DigitResNet


def make():
    assert torchvision.models is not None
    return DigitResNet()
"""


def test_a_user_model_importing_torchvision_loads_in_every_command(tmp_path):
    """The shim is in place before a factory file is imported: validate and check of a
    Captum-only config (no adapter imports torchvision), and the Python API, all load it."""
    import json

    from helpers_cli import SAMPLES, valid_config

    (tmp_path / "user_model.py").write_text(USER_MODEL)
    cfg = valid_config(tmp_path, model={"factory": f"{tmp_path / 'user_model.py'}:make",
                                        "weights": str(SAMPLES / "checkpoints" / "digit_resnet.pt")})
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    env_path = f"{SAMPLES}:{Path(__file__).resolve().parent.parent}"
    for argv in (["validate", str(tmp_path / "c.json")], ["check", str(tmp_path / "c.json")]):
        proc = subprocess.run([sys.executable, "-m", "esegeta", *argv], capture_output=True, text=True, timeout=300,
                              env={**os.environ, "PYTHONPATH": env_path})
        assert proc.returncode == 0, proc.stderr[-2000:]
    api = f"import esegeta; print(esegeta.Pipeline({str(tmp_path / 'c.json')!r}).validate().model.__class__.__name__)"
    proc = subprocess.run([sys.executable, "-c", api], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": env_path})
    assert proc.returncode == 0 and proc.stdout.strip() == "DigitResNet", proc.stderr[-2000:]


def test_importing_esegeta_first_lets_torchvision_import():
    code = "import esegeta, torchvision, torch; print(torchvision.models.resnet18().eval()(torch.zeros(1, 3, 32, 32)).shape)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "1000" in proc.stdout, proc.stderr[-2000:]
