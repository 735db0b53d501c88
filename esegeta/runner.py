"""The runner: a config's methods over its inputs, with failure isolation and outputs.

``Pipeline(config).validate()`` checks everything a run needs without running a method
(config, files, model load, layer and parameter names, wrapper and target);
``Pipeline(config).run()`` then explains every (input, method) pair. A failing method is
recorded (status, error, traceback in the log) and the others go on; the manifest is
rewritten atomically after every pair, so nothing computed is lost.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import logging
import random
import time
import traceback
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__, config as config_mod, registry, wrappers
from .errors import ConfigError, did_you_mean
from .explainer import check_task, find_layer, resolve_target, run_method
from .loading import InputItem, load_inputs, load_model
from .prepare import PreparedModel, prepared

log = logging.getLogger("esegeta")
LIBRARIES = ("torch", "torchvision", "numpy", "captum", "torchray", "grad-cam", "zennit", "shap", "lime",
             "torch-lucent", "torchio", "pydantic", "nibabel", "matplotlib")


def resolve_device(name: str | list[str] | None, where: str = "runtime.devices") -> torch.device:
    """``auto`` → the first CUDA device if there is one, else the CPU; errors name ``where``."""
    if isinstance(name, list):
        name = name[0] if name else "auto"
    if name in (None, "auto"):
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(where, f"{name!r} is not a device; use 'auto', 'cpu' or 'cuda:N'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(where, f"{name} requested but CUDA is not available here; use 'cpu' or 'auto'")
    return device


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"esegeta": __version__}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


@dataclass
class RunResult:
    """What a run produced: the manifest (as written), its folder and the exit code."""

    output_dir: Path
    manifest: dict[str, Any]

    @property
    def runs(self) -> list[dict[str, Any]]:
        return self.manifest["runs"]

    @property
    def exit_code(self) -> int:
        return 0 if all(r["status"] in ("ok", "skipped") for r in self.runs) else 1

    def result(self, method: str, input_name: str | None = None) -> np.ndarray:
        """The saved ``.npy`` of (method label or id, input) as an array."""
        for r in self.runs:
            if method in (r["label"], r["method"]) and input_name in (None, r["input"]) and "npy" in r["files"]:
                return np.load(self.output_dir / r["files"]["npy"])
        raise KeyError(f"no saved result for {method!r} on {input_name!r}")


@dataclass
class _Validated:
    config: config_mod.Config
    base_dir: Path | None
    model: torch.nn.Module
    inputs: list[InputItem]
    device: torch.device
    prepared: PreparedModel
    methods: list[tuple[int, config_mod.MethodEntry]] = field(default_factory=list)


class Pipeline:
    """A configured run. ``config`` is a JSON file path or a dict (paths then relative to
    ``base_dir``, default the working directory)."""

    def __init__(self, config: str | Path | dict, *, output_dir: str | Path | None = None,
                 device: str | None = None, only: list[str] | None = None, base_dir: str | Path | None = None):
        if isinstance(config, dict):
            self.config = config_mod.parse(config)
            self.base_dir = Path(base_dir).resolve() if base_dir else Path.cwd()
        else:
            self.config, self.base_dir = config_mod.read(config)
        self.output_override = Path(output_dir) if output_dir else None
        self.device_override = device
        self.only = list(only or [])

    # -- validation ---------------------------------------------------------------
    def _selected(self) -> list[tuple[int, config_mod.MethodEntry]]:
        selected = [(i, m) for i, m in enumerate(self.config.methods) if m.enabled]
        if self.only:
            names = {n for m in self.config.methods for n in (m.id, m.name)}
            for wanted in self.only:
                if wanted not in names:
                    raise ConfigError("--only", f"no method with id or label {wanted!r}" + did_you_mean(wanted, names))
            selected = [(i, m) for i, m in enumerate(self.config.methods) if {m.id, m.name} & set(self.only)]
        return selected

    def validate(self) -> _Validated:
        """Everything but running methods: raises ConfigError naming the field at fault."""
        cfg = self.config
        config_mod.check_methods(cfg)
        methods = self._selected()
        device = (resolve_device(self.device_override, "--device") if self.device_override
                  else resolve_device(cfg.runtime.devices))
        model = load_model(cfg.model.model_dump(), self.base_dir)
        inputs = load_inputs(cfg.inputs.model_dump(), self.base_dir)
        first = inputs[0].tensor.to(device)
        try:
            ready = prepared(model, first)
        except Exception as exc:
            raise ConfigError("inputs", f"the model fails on {inputs[0].path.name} (shape "
                                        f"{tuple(inputs[0].tensor.shape)}): {type(exc).__name__}: {exc}") from exc
        for i, entry in methods:
            where = f"methods[{i}]"
            spec = registry.get(entry.id)
            check_task(spec, entry.wrapper or cfg.wrapper, f"{where}.wrapper" if entry.wrapper else "wrapper")
            if entry.layer:
                find_layer(ready, entry.layer, f"{where}.layer", spec)
            if entry.device:
                resolve_device(entry.device, f"{where}.device")
            wrapper = entry.wrapper or cfg.wrapper
            target = entry.target if entry.target is not None else cfg.target
            forward = ready
            if wrapper is not None:
                forward = wrappers.build(ready, first, wrapper.model_dump(), self.base_dir)
            if spec.needs_target:
                resolve_target(forward, first, target, f"{where}.target" if entry.target is not None else "target",
                               check=True)
        return _Validated(cfg, self.base_dir, model, inputs, device, ready, methods)

    # -- running ------------------------------------------------------------------
    @property
    def output_dir(self) -> Path:
        if self.output_override is not None:
            return self.output_override
        return ((self.base_dir or Path.cwd()) / self.config.output.dir).resolve()

    def run(self) -> RunResult:
        """Validate, then explain every (input, method) pair; see :class:`RunResult`."""
        from . import outputs

        v = self.validate()
        out = self.output_dir
        out.mkdir(parents=True, exist_ok=True)
        with _log_file(out / "esegeta.log"):
            log.info("esegeta %s: %d method(s) x %d input(s) on %s -> %s", __version__, len(v.methods),
                     len(v.inputs), v.device, out)
            for change in v.prepared.changes:
                log.info("prepared copy: %s", change)
            manifest = {
                "esegeta": __version__,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "libraries": library_versions(),
                "config": v.config.model_dump(mode="json", by_alias=True, exclude_none=True),
                "config_dir": str(v.base_dir),
                "device": str(v.device),
                "prepared_model": v.prepared.changes,
                "inputs": [{"name": item.name, "path": str(item.path), "shape": list(item.tensor.shape[1:])}
                           for item in v.inputs],
                "runs": [],
            }
            jobs = [(item, i, entry) for item in v.inputs for i, entry in v.methods]
            from tqdm import tqdm

            for item, i, entry in tqdm(jobs, desc="esegeta", unit="job", disable=None):
                manifest["runs"].append(self._job(v, item, entry, out))
                outputs.save_json(out / "manifest.json", manifest)
            self._overview(v, manifest, out)
            outputs.save_json(out / "manifest.json", manifest)
            failed = [r for r in manifest["runs"] if r["status"] != "ok"]
            log.info("done: %d ok, %d failed", len(manifest["runs"]) - len(failed), len(failed))
        return RunResult(out, manifest)

    def _job(self, v: _Validated, item: InputItem, entry: config_mod.MethodEntry, out: Path) -> dict[str, Any]:
        from . import outputs

        cfg = v.config
        device = resolve_device(entry.device) if entry.device else v.device
        record: dict[str, Any] = {"method": entry.id, "label": entry.name, "input": item.name, "status": "ok",
                                  "seconds": None, "device": str(device), "error": None, "score": None,
                                  "shape": None, "files": {}}
        x = item.tensor.detach().to(device)  # a fresh tensor: upstream code may set requires_grad on it
        seed = cfg.runtime.seed
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)
        wrapper = entry.wrapper or cfg.wrapper
        target = entry.target if entry.target is not None else cfg.target
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                model = v.prepared if device == v.device else prepared(v.model, x)
                extras: dict[str, Any] = {}
                attr, score = run_method(registry.get(entry.id), model, x, target=target,
                                         wrapper=wrapper.model_dump() if wrapper else None, layer=entry.layer,
                                         params=entry.params, noise_tunnel=entry.noise_tunnel, base_dir=v.base_dir,
                                         with_score=True, samples=_samples(v.inputs, device), extras=extras)
                record["seconds"] = round(time.perf_counter() - start, 4)
                if not torch.isfinite(attr).all():
                    log.warning("%s on %s: the result has non-finite values", entry.name, item.name)
                record["score"], record["shape"] = score, list(attr.shape[1:])
                record["files"] = outputs.save_result(out, item, entry.name, attr[0].cpu().numpy(),
                                                      cfg.output, registry.get(entry.id).kind)
                record["files"].update(outputs.save_extras(out, item, entry.name, extras))
                log.info("%s on %s: ok in %.2fs", entry.name, item.name, record["seconds"])
            except Exception as exc:  # isolation: one failing method never stops the others
                record["seconds"] = round(time.perf_counter() - start, 4)
                record["status"], record["error"] = "failed", f"{type(exc).__name__}: {exc}"
                log.error("%s on %s failed: %s", entry.name, item.name, record["error"])
                log.debug("traceback of %s on %s:\n%s", entry.name, item.name, traceback.format_exc())
        for message in dict.fromkeys(str(w.message).split("\n")[0] for w in caught):
            log.debug("%s on %s: warning: %s", entry.name, item.name, message)
        return record

    def _overview(self, v: _Validated, manifest: dict[str, Any], out: Path) -> None:
        from . import figures, outputs

        if "png" not in v.config.output.formats:
            return
        rows = []
        for item in v.inputs:
            cells = []
            for r in (r for r in manifest["runs"] if r["input"] == item.name):
                attr = np.load(out / r["files"]["npy"]) if r["status"] == "ok" and "npy" in r["files"] else None
                note = "" if attr is not None else f"{r['status']}: {(r['error'] or '')[:60]}"
                kind = registry.get(r["method"]).kind
                cells.append((r["label"], attr, note, "image" if kind == "image" else "attribution"))
            rows.append((item.name, item.tensor[0].detach().cpu().numpy(), cells))
        fig_cfg = v.config.output.figure
        try:
            fig = figures.overview_figure(rows, method=fig_cfg.method, sign=fig_cfg.sign, projection=fig_cfg.projection)
            outputs.save_figure(fig, out / "overview.png")
            manifest["overview"] = "overview.png"
        except Exception as exc:
            log.error("overview figure failed: %s: %s", type(exc).__name__, exc)
            log.debug("%s", traceback.format_exc())


def _samples(inputs: list[InputItem], device: torch.device) -> torch.Tensor:
    """The run's inputs as one batch (those shaped like the first), for methods that fit on data."""
    shape = inputs[0].tensor.shape
    return torch.cat([i.tensor for i in inputs if i.tensor.shape == shape]).to(device)


@contextmanager
def _log_file(path: Path):
    """Log to ``path`` (DEBUG and up) for the duration of a run."""
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    previous = log.level
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(previous)
        handler.close()
