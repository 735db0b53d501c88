"""Progress inside a method call: forward rows counted by a hook on the real model, out of the
expected total of esegeta.spec.cost, with an ETA, in the log and a console bar; the hook never stays."""
import logging
import re

import numpy as np
import pytest
import torch

import esegeta.attribution.explainer
from esegeta.spec import cost
from esegeta.run import progress
from esegeta.spec.registry import all_methods
from esegeta.spec.request import Request
from esegeta.run.runner import Pipeline
from helpers_cli import DIGITS, REPO, valid_config


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


@pytest.fixture(scope="module")
def model():
    from samples.models import DigitResNet

    m = DigitResNet()
    m.load_state_dict(torch.load(REPO / "samples" / "checkpoints" / "digit_resnet.pt", weights_only=True))
    return m.eval()


def test_line_eta_and_log_every_interval(caplog):
    clock = Clock()
    p = progress.Progress("IG on x", 400, bar_after_s=1e9, log_every_s=10, clock=clock)
    with caplog.at_level(logging.INFO, logger="esegeta"):
        clock.now += 5
        p.add(100)  # before the first interval: no line
        assert not caplog.records
        clock.now += 5
        p.add(100)  # 10 s, 200 of 400: 10 s left
        assert p.line() == "IG on x: 200/400 forward passes (50 %), 10 s, ETA 10 s"
        assert caplog.records[-1].getMessage() == p.line()
        p.add(1)  # within the next interval: no new line
        assert len(caplog.records) == 1
        p.close()
        assert caplog.records[-1].getMessage() == "IG on x: 201 forward passes in 10 s"
    unknown = progress.Progress("LIME", None, clock=clock)
    unknown.add(30)
    assert unknown.line() == "LIME: 30 forward passes, 0 s" and unknown.eta() is None


def test_bar_opens_only_for_long_calls(monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")  # what the command line sets for upstream bars
    clock = Clock()
    p = progress.Progress("x", 10, bar_after_s=2, log_every_s=1e9, clock=clock)
    p.add(1)
    assert p._bar is None
    clock.now += 3
    p.add(1)
    assert p._bar is not None and p._bar.total == 10 and p._bar.n == 2
    p.close()
    assert p._bar is None


def test_counts_the_rows_cost_expects(model):
    x = torch.from_numpy(np.stack([np.load(p) for p in sorted(DIGITS.glob("*.npy"))[:2]]))
    spec = all_methods()["captum.IntegratedGradients"]
    request = Request(spec, {"n_steps": 12, "internal_batch_size": 5}, target=3)
    expected = progress.expected_passes(request, x)
    # IG's 12 steps and, as a run does, the explained score on the unperturbed input and the
    # completeness check's baseline: per input
    assert expected == (cost.expected_passes(spec, request.params, x).forward + 2) * 2 == 28
    assert progress.expected_passes(request, x, with_scores=False) == 24
    from esegeta.attribution.prepare import prepared

    ready = prepared(model, x)
    with progress.tracked(ready, "IG", expected) as p:
        esegeta.attribution.explainer.run(request, ready, x, with_scores=True)
    assert p.done == expected
    assert not ready._forward_hooks


def test_hook_removed_on_error_and_scripted_models_run(model):
    with pytest.raises(RuntimeError, match="boom"):
        with progress.tracked(model, "x", 5):
            model(torch.zeros(1, 1, 8, 8))
            raise RuntimeError("boom")
    assert not model._forward_hooks
    scripted = torch.jit.script(torch.nn.Linear(2, 2))
    with progress.tracked(scripted, "scripted", 1) as p:
        scripted(torch.zeros(1, 2))
    assert p.done in (0, 1)


def test_run_logs_progress_with_total_and_eta(tmp_path, monkeypatch):
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    cfg = valid_config(tmp_path, methods=[{"id": "captum.Occlusion", "params": {"sliding_window_shapes": [1, 2, 2],
                                                                                 "strides": [1, 1, 1]}}],
                       output={"dir": str(tmp_path / "out"), "formats": ["npy"]})
    result = Pipeline(cfg).run()
    assert result.exit_code == 0
    log = (tmp_path / "out" / "esegeta.log").read_text()
    lines = [line for line in log.splitlines() if "forward passes" in line]
    # 7 x 7 window positions, Occlusion's unperturbed input and the run's score: 51 rows, logged with
    # their share and ETA, never past the total
    assert any("/51 forward passes (" in line and "ETA" in line for line in lines)
    assert not any(re.search(r"(\d+)/(\d+)", line) and int(re.search(r"(\d+)/(\d+)", line)[1])
                   > int(re.search(r"(\d+)/(\d+)", line)[2]) for line in lines)
    assert any("forward passes in" in line for line in lines)


def test_count_past_the_total_drops_it_and_eta_waits_for_a_rate(caplog):
    """A short estimate never shows 3/2 (150 %); set-up time before the first pass is not extrapolated
    (a call that sets up for 9 s, counts 1 of 50, then does 49 at once got "ETA 7.4 min")."""
    clock = Clock()
    p = progress.Progress("DeepLift on x", 2, bar_after_s=1e9, log_every_s=1e9, clock=clock)
    p.add(2)
    assert p.line() == "DeepLift on x: 2/2 forward passes (100 %), 0 s"
    p.add(1)
    assert p.line() == "DeepLift on x: 3 forward passes (more than the 2 expected), 0 s" and p.eta() is None
    slow = progress.Progress("Occlusion on x", 50, bar_after_s=1e9, log_every_s=1e9, clock=clock)
    clock.now += 9
    slow.add(1)
    assert slow.eta() is None and "ETA" not in slow.line()
    clock.now += 1
    slow.add(9)  # 9 passes in 1 s: 40 left, 4.4 s
    assert abs(slow.eta() - 40 / 9) < 1e-9
