"""Runtime: worker threads and seeds, mixed precision, out-of-memory back-off, time limits,
devices and input batching (esegeta.attribution.scheduling, esegeta.run.timeouts, the runner), all on the CPU.

Real models and real Captum calls throughout; the out-of-memory and slow models are small
models of this file's own (written to a model file the config names), not mocks."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from esegeta.attribution import scheduling
from esegeta.errors import ConfigError
from esegeta.run.runner import Pipeline
from esegeta.run.timeouts import TimeLimitExceeded, call_with_limit
from helpers_cli import DIGITS, FACTORY, WEIGHTS

from conftest import hook_count

ALL_DIGITS = sorted(DIGITS.glob("*.npy"))
STOCHASTIC = [
    {"id": "captum.Saliency"},
    {"id": "captum.Saliency", "label": "smoothgrad", "noise_tunnel": {"nt_type": "smoothgrad", "nt_samples": 4}},
    {"id": "captum.GradientShap", "params": {"baselines": "zeros", "n_samples": 3}},
    {"id": "captum.FeatureAblation", "params": {"feature_mask": {"grid": [4, 4]}}},
]

OWN_MODELS = '''
import time
import torch
from torch import nn


class PickyNet(nn.Module):
    """Runs out of (pretend CUDA) memory on batches of more than ``limit`` inputs."""

    def __init__(self, limit=4):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(64, 10)
        self.limit = limit

    def forward(self, x):
        if x.shape[0] > self.limit:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {x.shape[0]} inputs")
        return self.fc(x.flatten(1))


class SlowNet(nn.Module):
    """0.2 s per forward pass."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        time.sleep(0.2)
        return self.fc(x.flatten(1))


class AccumulatingNet(nn.Module):
    """Adds its scores into an fp32 buffer with index_add_, which refuses the bf16 of autocast."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        scores = self.fc(x.flatten(1))
        out = torch.zeros(x.shape[0], 10, device=x.device)
        return out.index_add_(1, torch.arange(10, device=x.device), scores)
'''


def digits_config(tmp_path: Path, methods: list[dict], inputs=None, **runtime) -> dict:
    return {
        "model": {"factory": FACTORY, "weights": str(WEIGHTS)},
        "inputs": {"paths": [str(p) for p in (inputs or ALL_DIGITS)], "spatial_dims": 2},
        "target": "predicted",
        "runtime": {"devices": "cpu", "seed": 0, **runtime},
        "output": {"dir": str(tmp_path / "out"), "formats": ["npy"]},
        "methods": methods,
    }


def own_config(tmp_path: Path, model: str, methods: list[dict], **runtime) -> dict:
    (tmp_path / "own_models.py").write_text(OWN_MODELS)
    cfg = digits_config(tmp_path, methods, inputs=ALL_DIGITS[:1], **runtime)
    cfg["model"] = {"factory": f"{tmp_path / 'own_models.py'}:{model}"}
    cfg["target"] = 3
    return cfg


def results(result) -> dict[tuple[str, str], np.ndarray]:
    return {(r["label"], r["input"]): result.result(r["label"], r["input"]) for r in result.runs}


# -- workers and seeds -----------------------------------------------------------------
def test_job_seed_depends_on_method_and_input_only():
    seeds = {scheduling.job_seed(0, m, i) for m in range(5) for i in range(5)}
    assert len(seeds) == 25
    assert scheduling.job_seed(0, 2, 3) == scheduling.job_seed(0, 2, 3) != scheduling.job_seed(1, 2, 3)


def test_job_randomness_is_per_thread():
    """Two threads drawing at once each get their own job's numbers, equal to a lone draw."""
    def draw(seed, out):
        with scheduling.JobRandomness(seed):
            out.append([torch.randn(3), torch.normal(0.0, torch.ones(3)), torch.empty(3).uniform_()])

    alone: list = []
    draw(7, alone)
    together: dict[int, list] = {7: [], 8: []}
    threads = [threading.Thread(target=draw, args=(s, together[s])) for s in (7, 8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(alone[0], together[7][0]):
        assert torch.equal(a, b)
    assert not torch.equal(together[7][0][0], together[8][0][0])
    from esegeta.spec import registry

    assert registry.get("captum.GradientShap").uses_global_rng and registry.get("lime.LimeImageExplainer").uses_global_rng
    assert not registry.get("captum.Saliency").uses_global_rng


def test_several_workers_give_the_results_of_one(tmp_path):
    """Stochastic methods (torch RNG: NoiseTunnel; numpy RNG: GradientShap) on 4 inputs with
    1 and 3 worker threads: the same manifest order, and bitwise identical results when torch
    uses one intra-op thread in both. (With 1 worker torch keeps its 2 intra-op threads, and a
    different summation order moves GradientShap by ~4e-7: equal to float rounding.)"""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = Pipeline(digits_config(tmp_path / "one", STOCHASTIC, threads_per_device=1)).run()
    finally:
        torch.set_num_threads(before)
    three = Pipeline(digits_config(tmp_path / "three", STOCHASTIC, threads_per_device=3)).run()
    default = Pipeline(digits_config(tmp_path / "default", STOCHASTIC, threads_per_device=1)).run()
    assert one.exit_code == three.exit_code == 0
    assert [(r["label"], r["input"]) for r in one.runs] == [(r["label"], r["input"]) for r in three.runs]
    a, b, c = results(one), results(three), results(default)
    for key in a:
        assert np.array_equal(a[key], b[key]), key
        assert np.allclose(a[key], c[key], rtol=1e-5, atol=1e-6), key
    # the seed matters: a different run seed gives other noise
    other = Pipeline(digits_config(tmp_path / "other", STOCHASTIC[1:2], inputs=ALL_DIGITS[:1], seed=1)).run()
    assert not np.array_equal(other.result("smoothgrad"), a[("smoothgrad", ALL_DIGITS[0].stem)])


def test_hook_based_methods_in_parallel_with_time_limits(tmp_path):
    """Methods that hook or swap modules (DeepLift, GuidedBackprop, LRP, LayerGradCam) on two
    threads with the time-limit hooks on: the results of a plain sequential run. Each worker
    has its own model copy, so one method's hooks never reach another's forward."""
    methods = [{"id": "captum.DeepLift"}, {"id": "captum.GuidedBackprop"}, {"id": "captum.LRP"},
               {"id": "captum.LayerGradCam", "layer": "layer2"}]
    plain = Pipeline(digits_config(tmp_path / "plain", methods, inputs=ALL_DIGITS[:2])).run()
    parallel = Pipeline(digits_config(tmp_path / "parallel", methods, inputs=ALL_DIGITS[:2], timeout_s=120,
                                      threads_per_device=2)).run()
    assert parallel.exit_code == 0
    a, b = results(plain), results(parallel)
    for key in a:
        assert np.array_equal(a[key], b[key]), key


# -- mixed precision -------------------------------------------------------------------
def test_amp_runs_in_bf16_on_cpu(tmp_path):
    methods = [{"id": "captum.IntegratedGradients", "params": {"n_steps": 16}}]
    fp32 = Pipeline(digits_config(tmp_path / "fp32", methods)).run()
    bf16 = Pipeline(digits_config(tmp_path / "bf16", methods, amp=True)).run()
    assert [r["precision"] for r in fp32.runs] == ["fp32"] * 4
    assert [r["precision"] for r in bf16.runs] == ["bf16"] * 4
    for key, a in results(fp32).items():
        b = results(bf16)[key]
        assert b.dtype == np.float32 and np.isfinite(b).all()
        assert not np.array_equal(a, b)  # autocast did change the arithmetic...
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.95  # ...but not the explanation


def test_amp_failure_is_recomputed_in_fp32(tmp_path):
    cfg = own_config(tmp_path, "AccumulatingNet", [{"id": "captum.Saliency"}], amp=True)
    result = Pipeline(cfg).run()
    record = result.runs[0]
    assert record["status"] == "ok" and record["precision"] == "fp32"
    log = (Path(cfg["output"]["dir"]) / "esegeta.log").read_text()
    assert "failed under bf16" in log and "index_add_" in log


# -- out of memory ---------------------------------------------------------------------
def test_out_of_memory_halves_the_internal_batch(tmp_path):
    from captum.attr import IntegratedGradients

    methods = [{"id": "captum.IntegratedGradients", "params": {"n_steps": 16}},
               {"id": "captum.FeatureAblation", "params": {"perturbations_per_eval": 1}, "label": "fa"}]
    cfg = own_config(tmp_path, "PickyNet", methods)
    result = Pipeline(cfg).run()
    ig, fa = result.runs
    assert ig["status"] == "ok" and ig["oom_retries"] == 2 and ig["params"]["internal_batch_size"] == 4
    assert fa["status"] == "ok" and fa["oom_retries"] == 0 and "params" not in fa
    import importlib.util

    spec = importlib.util.spec_from_file_location("own_models", tmp_path / "own_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    x = torch.from_numpy(np.load(ALL_DIGITS[0])).float()[None]
    direct = IntegratedGradients(module.PickyNet()).attribute(x, target=3, n_steps=16, internal_batch_size=4)
    assert np.allclose(result.result("captum.IntegratedGradients"), direct[0].numpy(), rtol=1e-5, atol=1e-7)


def test_out_of_memory_without_batch_parameter_fails_cleanly(tmp_path):
    cfg = own_config(tmp_path, "PickyNet", [{"id": "captum.Saliency"}, {"id": "captum.InputXGradient"}],
                     batch_size=4)
    cfg["inputs"]["paths"] = [str(p) for p in ALL_DIGITS]  # 4 inputs of one shape: one batch of 4
    cfg["model"]["kwargs"] = {"limit": 2}
    result = Pipeline(cfg).run()
    assert result.exit_code == 1
    assert {r["status"] for r in result.runs} == {"failed"}
    assert all("out of memory" in r["error"] for r in result.runs)


# -- time limits -----------------------------------------------------------------------
def test_time_limit_stops_a_python_loop():
    def spin():
        while True:
            pass

    start = time.monotonic()
    with pytest.raises(TimeLimitExceeded):
        call_with_limit(spin, 0.5)
    assert time.monotonic() - start < 10  # generous: the limit is 0.5 s


def test_time_limit_hook_stops_forward_loops_and_is_removed(digits):
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    before = hook_count(model)
    calls = []

    def loop():
        while True:
            model(digits.x)
            calls.append(1)

    with pytest.raises(TimeLimitExceeded):
        call_with_limit(loop, 0.3, model.modules())
    assert hook_count(model) == before and calls
    assert call_with_limit(lambda: 42, 5, model.modules()) == 42
    with pytest.raises(ZeroDivisionError):
        call_with_limit(lambda: 1 / 0, 5)


def test_timeout_recorded_others_go_on(tmp_path):
    """A method over its limit (SlowNet: 0.2 s per forward; FeatureAblation: 64 forwards) is
    stopped and recorded as 'timeout' without files; the next method runs."""
    methods = [{"id": "captum.FeatureAblation", "timeout_s": 1}, {"id": "captum.Saliency"}]
    cfg = own_config(tmp_path, "SlowNet", methods)
    pipeline = Pipeline(cfg)
    start = time.monotonic()
    result = pipeline.run()
    elapsed = time.monotonic() - start
    slow, quick = result.runs
    assert slow["status"] == "timeout" and slow["files"] == {} and "time limit" in slow["error"]
    assert slow["seconds"] < 8  # generous: the limit is 1 s
    assert quick["status"] == "ok" and result.exit_code == 1
    assert elapsed < 30
    out = Path(cfg["output"]["dir"])
    assert not list(out.rglob("captum.FeatureAblation*")) and not list(out.rglob(".tmp-*"))


def test_timed_out_job_frees_the_global_rng(tmp_path):
    """GradientShap (numpy's global RNG: runs under the RNG lock) stopped at its limit; the next
    GradientShap entry gets the lock and runs."""
    methods = [{"id": "captum.GradientShap", "params": {"baselines": "zeros"}, "timeout_s": 0.1},
               {"id": "captum.GradientShap", "label": "gs", "params": {"baselines": "zeros"}}]
    first, second = Pipeline(own_config(tmp_path, "SlowNet", methods, threads_per_device=2)).run().runs
    assert first["status"] == "timeout" and second["status"] == "ok"


def test_run_wide_timeout(tmp_path):
    cfg = own_config(tmp_path, "SlowNet", [{"id": "captum.FeatureAblation"}], timeout_s=0.5)
    assert Pipeline(cfg).run().runs[0]["status"] == "timeout"


# -- devices and batching --------------------------------------------------------------
def test_devices():
    expected = ([torch.device("cuda", i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available()
                else [torch.device("cpu")])
    assert scheduling.resolve_devices("auto") == expected
    assert scheduling.resolve_devices(["cpu", "cpu"]) == [torch.device("cpu")]
    with pytest.raises(ConfigError, match=r"runtime.devices\[1\]"):
        scheduling.resolve_devices(["cpu", "gpu7"])
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            scheduling.resolve_devices("cuda:0")


def test_method_device_override_and_manifest(tmp_path):
    cfg = digits_config(tmp_path, [{"id": "captum.Saliency", "device": "cpu"}], inputs=ALL_DIGITS[:1],
                        devices=["cpu"], threads_per_device=2)
    result = Pipeline(cfg).run()
    assert result.manifest["devices"] == ["cpu"] and result.runs[0]["device"] == "cpu"


def test_batched_inputs_equal_one_at_a_time(tmp_path):
    methods = [{"id": "captum.Saliency"}, {"id": "captum.IntegratedGradients", "params": {"n_steps": 8}}]
    single = Pipeline(digits_config(tmp_path / "single", methods)).run()
    batched = Pipeline(digits_config(tmp_path / "batched", methods, batch_size=4)).run()
    assert all(r.get("batch") == 4 for r in batched.runs)
    assert [r["score"] for r in single.runs] == pytest.approx([r["score"] for r in batched.runs], rel=1e-5)
    for key, a in results(single).items():
        assert np.allclose(a, results(batched)[key], rtol=1e-4, atol=1e-5), key  # batched convolutions round differently


def test_runtime_config_errors(tmp_path):
    from esegeta.spec.config import parse

    for runtime, path in [({"threads_per_device": 0}, "runtime.threads_per_device"),
                          ({"timeout_s": -1}, "runtime.timeout_s"), ({"amp": "yes"}, "runtime.amp"),
                          ({"batch_size": 0}, "runtime.batch_size")]:
        with pytest.raises(ConfigError, match=path.replace(".", r"\.")):
            parse(digits_config(tmp_path, [{"id": "captum.Saliency"}], **runtime))
    cfg = digits_config(tmp_path, [{"id": "captum.Saliency", "timeout_s": 0}])
    with pytest.raises(ConfigError, match=r"methods\[0\]\.timeout_s"):
        parse(cfg)
    assert json.dumps(cfg)  # the config stays plain JSON


class _Stop(BaseException):
    """Raised in the main thread by a signal handler, as a harness's time limit (the fuzzer's) raises."""


def test_any_exit_of_the_main_thread_stops_the_workers(tmp_path):
    """Not only SIGINT/SIGTERM: whatever ends the main thread's wait (here a BaseException raised by a
    SIGALRM handler, sent once a worker is computing: an event, not a timer) stops the worker threads
    before it propagates, instead of leaving them computing."""
    import signal

    slow = [{"id": "captum.IntegratedGradients", "label": f"ig{n}", "params": {"n_steps": 4000, "internal_batch_size": 50}}
            for n in range(2)]
    cfg = digits_config(tmp_path, slow, threads_per_device=2)
    computing, finished = threading.Event(), threading.Event()

    def seen(module, args):  # any module's forward pass: one off the main thread is a job's
        if threading.current_thread() is not threading.main_thread():
            computing.set()

    def stop(signum, frame):
        raise _Stop()

    def alarm_when_computing():
        if computing.wait(600) and not finished.is_set():
            signal.pthread_kill(threading.main_thread().ident, signal.SIGALRM)

    previous = signal.signal(signal.SIGALRM, stop)
    hook = torch.nn.modules.module.register_module_forward_pre_hook(seen)
    alarm = threading.Thread(target=alarm_when_computing, daemon=True)
    alarm.start()
    try:
        with pytest.raises(_Stop):
            Pipeline(cfg).run()
    finally:
        hook.remove()
        finished.set()
        computing.set()
        alarm.join()
        signal.signal(signal.SIGALRM, previous)
    workers = [t for t in threading.enumerate() if t.name.startswith("esegeta-worker-")]
    assert not [t for t in workers if t.is_alive()], workers
