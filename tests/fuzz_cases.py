"""Fuzzed configs for ``esegeta validate``: hypothesis strategies and the one-case driver.

Shared by ``tests/test_fuzz.py`` (about a minute in CI) and ``benchmarks/fuzz.py`` (the long
run). A case starts from one of the committed sample configs (``configs/*.json``, its paths made
absolute) and mutates it: a value replaced by an awkward JSON value, a key removed, added or
misspelt, values from the faults users and testers have hit (unknown devices, huge sizes, long
labels, deep nesting), or the JSON text itself damaged (duplicate keys, huge numbers, bytes that
are not UTF-8, truncation), or random text and bytes. :func:`run_case` feeds it to
``esegeta.cli.commands.main(["validate", FILE])`` in-process and classifies the answer: exit 0, exit 2
whose every message line names a JSON path (or the config file for a document that is not a
JSON object), or anything else (a traceback, another exit code, an exit 2 without a path).
"""
from __future__ import annotations

import contextlib
import copy
import functools
import io
import json
import logging
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"
#: The sample configs cheap enough to validate thousands of times (the 3D ones load a volume).
SAMPLE_NAMES = ("digits.json", "retina_component.json", "retina_region.json", "anatomical3d_patches.json")


def _absolute(value: Any, key: str | None = None) -> Any:
    """The config's relative file references made absolute (the case is written elsewhere)."""
    if isinstance(value, dict):
        return {k: _absolute(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_absolute(v, key) for v in value]
    if isinstance(value, str) and value.startswith("../"):
        head, sep, attr = value.partition(".py:")
        return str((CONFIGS / head).resolve()) + sep + attr if sep else str((CONFIGS / value).resolve())
    return value


def samples() -> dict[str, dict]:
    """The sample configs, paths absolute, output in a scratch folder, ``$schema`` dropped."""
    out = {}
    for name in SAMPLE_NAMES:
        data = json.loads((CONFIGS / name).read_text())
        data.pop("$schema", None)
        out[name] = _absolute(data)
    return out


#: Values that broke esegeta before, or are easy to get wrong: strings where numbers go,
#: unknown devices, references that are not files, sizes that would exhaust memory.
AWKWARD = [
    None, True, False, 0, -1, 1, 2, 3, 32, 10**30, -(10**30), 1e999, -1e999, 0.5, -0.0, 1e-320, 2**63, 60000,
    "", " ", "32", "~", "nan", "inf", "-1", "none", "auto", "cpu", "cuda", "cuda:0", "cuda:99", "meta", "ipu",
    "xla", "vulkan", "lazy", "mps", "hpu", "fpga", "cpu:1", "CPU", "a" * 300, "ü" * 50, "\x00", "\ud800",
    "../SAMPLES/MODELS.PY:X", "builtins:print", "os:system", "os.path:join", "json:loads", "math:pi",
    "samples.models:DigitResNet", ":x", "x:", "file.py:", "/", ".", "..", "*", "**/*", "/dev/null", "/etc/passwd",
    "predicted", "threshold", "multiclass", "region", "treshold", "otsu", "sigmoid", "softmax", "sum", "mean",
    "smoothgrad", "vargrad", "global", "local", "hann", "rgb", "grayscale", "zscore", "minmax", "first", "last",
    "captum.Saliency", "captum.IntegratedGradients", "captum.LayerGradCam", "zennit.EpsilonPlus", "gradcam.GradCAM",
    "captum.saliency", "Saliency", "layer2", "layer4", "encoder", "fc", "", "x" * 5000,
    [], [0], [1, 1], [60000, 60000], [60000, 60000, 60000], [1, 2, 3, 4], [-1, 2], [0.5, 0.5], [None], ["a"],
    [[1]], {}, {"name": "threshold"}, {"grid": [2, 2]}, {"a": 1}, {"nt_type": "smoothgrad", "nt_samples": 0},
]

_keys = st.sampled_from(["id", "params", "layer", "label", "target", "wrapper", "patch", "device", "timeout_s",
                         "name", "size", "overlap", "mode", "paths", "spatial_dims", "resize", "normalize",
                         "devices", "threads_per_device", "batch_size", "seed", "amp", "tf32", "factory",
                         "weights", "kwargs", "n_steps", "nt_samples", "stdevs", "baselines", "composite",
                         "canonizers", "base_method", "internal_batch_size", "sliding_window_shapes",
                         "noise_tunnel", "formats", "dir", "figure", "channel", "threshold", "mask", "options",
                         "top-level", "a-b", "inputs-", "métodos", "x y", "", "$schema", "0", "__class__"])

_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                     st.text(max_size=40), st.sampled_from(AWKWARD).map(copy.deepcopy))
json_values = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                           st.dictionaries(_keys | st.text(max_size=8), inner,
                                                                           max_size=4)), max_leaves=12)


#: Files that broke esegeta (issue 26), built once by :func:`hostile_files` in a scratch folder.
HOSTILE = Path(tempfile.gettempdir()) / "esegeta-fuzz-hostile"
_DATASETS = """
import torch


class _Base(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, k):
        return torch.rand(1, 8, 8)


class Raises(_Base):
    def __getitem__(self, k):
        raise ValueError("broken item")


class Negative(_Base):
    def __len__(self):
        return -1


class Strings(_Base):
    def __getitem__(self, k):
        return "hello"


class Exits(_Base):
    def __getitem__(self, k):
        raise SystemExit(3)
"""


@functools.lru_cache(maxsize=1)
def hostile_files() -> dict[str, list[Any]]:
    """Values naming bad files, by the config key they go to: devices and FIFOs as weights, a
    TorchScript model, factories that exit or print, datasets that break, inputs named like the
    run's own files or of the wrong channel count, unbounded globs, Ray addresses with no cluster."""
    import os

    import numpy as np

    HOSTILE.mkdir(exist_ok=True)
    fifo = HOSTILE / "weights.fifo"
    if hasattr(os, "mkfifo") and not fifo.exists():
        os.mkfifo(fifo)
    (HOSTILE / "factories.py").write_text(
        "import sys\nsys.path.insert(0, %r)\nfrom models import DigitResNet\n\n"
        "def exits():\n    sys.exit(0)\n\n"
        "def prints():\n    print('hello from the factory')\n    return DigitResNet()\n\n"
        "def not_a_module():\n    return 3\n" % str(REPO / "samples"))
    (HOSTILE / "datasets.py").write_text(_DATASETS)
    names = HOSTILE / "names"
    names.mkdir(exist_ok=True)
    digit = np.load(REPO / "samples" / "data" / "digits" / "digit_1_label0.npy")
    for name in ("evaluation.csv", "explorer.html", "manifest.json", "report.html", "attributions", "..", ".x"):
        np.save(names / f"{name}.npy", digit)
    np.save(HOSTILE / "rgb.npy", np.random.default_rng(0).random((8, 8, 3), dtype=np.float32))
    factories, datasets = HOSTILE / "factories.py", HOSTILE / "datasets.py"
    return {
        "weights": ["/dev/zero", str(fifo), str(HOSTILE), str(factories)],
        "factory": [f"{factories}:exits", f"{factories}:prints", f"{factories}:not_a_module", "os:getcwd"],
        "dataset": [f"{datasets}:{n}" for n in ("Raises", "Negative", "Strings", "Exits", "_Base")],
        "paths": [[str(names)], [str(HOSTILE / "rgb.npy")], ["/**/"], ["/**/*.npy"], [f"{names}/*.npy"]],
        "ray_address": ["127.0.0.1:1", "ray://127.0.0.1:1", "auto", "host", "[::1]:1", "localhost:99999"],
    }


@st.composite
def hostile(draw, base: dict) -> dict:
    """``base`` with one to three of :func:`hostile_files`' values in their places."""
    data = copy.deepcopy(base)
    values = hostile_files()
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(sorted(values)))
        value = draw(st.sampled_from(values[key]))
        if key in ("weights", "factory"):
            data.setdefault("model", {})[key] = value
        elif key == "dataset":
            data["inputs"] = {"dataset": value, "spatial_dims": 2}
        elif key == "paths":
            data["inputs"] = {**{k: v for k, v in data.get("inputs", {}).items() if k != "dataset"}, "paths": value}
        else:
            data["runtime"] = {**data.get("runtime", {}), "backend": "ray", "ray_address": value}
    return data


def _paths(value: Any, here: tuple = ()) -> list[tuple]:
    """Every JSON path inside ``value`` (the root excluded)."""
    found = []
    if isinstance(value, dict):
        for k, v in value.items():
            found.append(here + (k,))
            found += _paths(v, here + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found.append(here + (i,))
            found += _paths(v, here + (i,))
    return found


def _containers(value: Any, here: tuple = ()) -> list[tuple]:
    found = [here] if isinstance(value, (dict, list)) else []
    if isinstance(value, dict):
        for k, v in value.items():
            found += _containers(v, here + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found += _containers(v, here + (i,))
    return found


def _at(value: Any, path: tuple) -> Any:
    for part in path:
        value = value[part]
    return value


def _typo(word: str, draw) -> str:
    if not word:
        return "x"
    i = draw(st.integers(0, len(word) - 1))
    kind = draw(st.sampled_from(["drop", "swap", "upper", "hyphen", "double"]))
    if kind == "drop":
        return word[:i] + word[i + 1:] or "x"
    if kind == "swap" and i + 1 < len(word):
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    if kind == "upper":
        return word.upper()
    if kind == "hyphen":
        return word[:i] + "-" + word[i:]
    return word + word[-1]


@st.composite
def mutated(draw, base: dict) -> Any:
    """``base`` after one to three structural mutations."""
    data = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(data)
        kind = draw(st.sampled_from(["replace", "replace", "tweak", "tweak", "tweak", "delete", "add", "rename", "nest",
                                     "method", "method"]))
        if kind == "tweak" and paths:  # a value of the same JSON type: the config likely stays valid around it
            path = draw(st.sampled_from(paths))
            parent = _at(data, path[:-1])
            old = parent[path[-1]]
            parent[path[-1]] = draw(_like(old))
            continue
        if kind in ("replace", "delete", "rename") and paths:
            path = draw(st.sampled_from(paths))
            parent = _at(data, path[:-1])
            if kind == "replace":
                parent[path[-1]] = draw(json_values)
            elif kind == "delete":
                del parent[path[-1]]
            elif isinstance(parent, dict):
                parent[_typo(str(path[-1]), draw)] = parent.pop(path[-1])
        elif kind == "add":
            where = draw(st.sampled_from(_containers(data) or [()]))
            container = _at(data, where)
            if isinstance(container, dict):
                container[draw(_keys | st.text(max_size=12))] = draw(json_values)
            elif isinstance(container, list):
                container.append(draw(json_values))
        elif kind == "nest":
            depth = draw(st.sampled_from([50, 500, 2000, 100_000]))
            where = draw(st.sampled_from(paths or [("methods",)]))
            if where and isinstance(data, dict):
                try:
                    _at(data, where[:-1])[where[-1]] = "NEST"
                except (KeyError, IndexError, TypeError):
                    pass
                data = ("NEST", depth, data)  # expanded in the text: json cannot write it
                break
        elif kind == "method" and isinstance(data, dict) and isinstance(data.get("methods"), list):
            entry = draw(st.fixed_dictionaries(
                {"id": st.sampled_from(METHOD_IDS)},
                optional={"params": st.dictionaries(st.sampled_from(PARAM_NAMES), json_values, max_size=2),
                          "layer": st.sampled_from(["layer2", "layer1", "conv", "fc", "enc1", "bottleneck", "nope"]),
                          "label": st.sampled_from(["a", "x" * 240, "b-c", "ü", "../x", "con", "a" * 90]),
                          "noise_tunnel": st.dictionaries(st.sampled_from(["nt_type", "nt_samples", "stdevs",
                                                                           "nt_samples_batch_size", "x"]),
                                                          json_values, max_size=3),
                          "device": st.sampled_from(AWKWARD).map(copy.deepcopy),
                          "timeout_s": st.sampled_from(AWKWARD).map(copy.deepcopy),
                          "target": st.sampled_from(AWKWARD).map(copy.deepcopy)}))
            data["methods"].append(entry)
    return data


METHOD_IDS = ["captum.Saliency", "captum.IntegratedGradients", "captum.NoiseTunnel", "captum.Occlusion",
              "captum.LayerGradCam", "captum.GuidedGradCam", "captum.FeatureAblation", "captum.KernelShap",
              "captum.Lime", "captum.DeepLift", "zennit.EpsilonPlus", "zennit.EpsilonGammaBox", "gradcam.GradCAM",
              "gradcam.ScoreCAM", "esegeta.CAM", "captum.saliency", "captum.Salency", "nope.Nope", "captum",
              "lime.LimeImageExplainer", "shap.GradientExplainer"]
PARAM_NAMES = ["n_steps", "method", "internal_batch_size", "baselines", "composite", "canonizers", "base_method",
               "sliding_window_shapes", "strides", "feature_mask", "n_samples", "perturbations_per_eval",
               "abs", "multiply_by_inputs", "stdevs", "num_samples", "batch_size", "nsamples", "eps", "x"]


def _like(value: Any) -> st.SearchStrategy:
    """Values of the JSON type of ``value``."""
    if isinstance(value, bool):
        return st.booleans()
    if isinstance(value, int):
        return st.one_of(st.integers(-3, 100), st.sampled_from([0, 1, 10**6, 10**9, 2**31, -(2**31)]))
    if isinstance(value, float):
        return st.one_of(st.floats(-10, 10, allow_nan=False), st.sampled_from([0.0, 1e-300, 1e300, -1.0]))
    if isinstance(value, str):
        return st.one_of(st.sampled_from([v for v in AWKWARD if isinstance(v, str)]), st.text(max_size=20))
    if isinstance(value, list):
        return st.lists(_like(value[0]) if value else json_values, max_size=4)
    return json_values


def _text(data: Any) -> str:
    if isinstance(data, tuple) and data and data[0] == "NEST":
        _, depth, inner = data
        return json.dumps(inner).replace('"NEST"', "[" * depth + "]" * depth, 1)
    return json.dumps(data, ensure_ascii=False, allow_nan=True)


@st.composite
def damaged_text(draw, base: dict) -> bytes:
    """The JSON text of ``base`` (mutated or not) damaged at the text level."""
    text = _text(draw(mutated(base)) if draw(st.booleans()) else base)
    kind = draw(st.sampled_from(["duplicate", "bignum", "bytes", "truncate", "insert", "bom", "nan", "deep"]))
    raw = text.encode("utf-8", "surrogatepass")
    if kind == "duplicate":  # the first key of an object again, with another value
        match = re.search(r'\{"([^"]+)": ', text)
        if match:
            text = text[:match.end()] + '"dup", "' + match.group(1) + '": ' + text[match.end():]
        return text.encode("utf-8", "surrogatepass")
    if kind == "bignum":
        digits = draw(st.sampled_from([400, 4301, 5001, 100_000]))
        return re.sub(rb"\b\d+\b", b"9" * digits, raw, count=draw(st.integers(1, 3)))
    if kind == "bytes":
        i = draw(st.integers(0, len(raw)))
        return raw[:i] + draw(st.binary(min_size=1, max_size=8)) + raw[i:]
    if kind == "truncate":
        return raw[:draw(st.integers(0, len(raw)))]
    if kind == "insert":
        i = draw(st.integers(0, len(text)))
        return (text[:i] + draw(st.text(max_size=6)) + text[i:]).encode("utf-8", "surrogatepass")
    if kind == "bom":
        return draw(st.sampled_from([b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff", b""])) + raw
    if kind == "nan":
        return re.sub(rb"\b\d+\b", draw(st.sampled_from([b"NaN", b"Infinity", b"-Infinity", b"1e999"])), raw, count=1)
    return b"[" * 100_000 + b"]" * 100_000


def cases(bases: dict[str, dict]) -> st.SearchStrategy[bytes]:
    """Every kind of case: mostly structural mutations of a sample, some damaged text, some noise."""
    structural = st.sampled_from(sorted(bases)).flatmap(lambda n: mutated(bases[n]).map(
        lambda d: _text(d).encode("utf-8", "surrogatepass")))
    damaged = st.sampled_from(sorted(bases)).flatmap(lambda n: damaged_text(bases[n]))
    noise = st.one_of(st.binary(max_size=200), st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
                      json_values.map(lambda v: json.dumps(v).encode()))
    bad_files = st.sampled_from(sorted(bases)).flatmap(lambda n: hostile(bases[n]).map(
        lambda d: _text(d).encode("utf-8", "surrogatepass")))
    return st.one_of(structural, structural, structural, structural, damaged, noise, bad_files)


#: A line of an exit-2 message: it starts with a JSON path (``methods[2].params.n_step``,
#: ``inputs["x y"]``) or with the config file's name (a document that is not a config).
_QUOTED = r'\["(\\.|[^"\\])*"\]'
PATH_LINE = re.compile(rf'^(\$schema|[A-Za-z_]\w*|\[\d+\]|{_QUOTED})((\.[A-Za-z_]\w*)|\[\d+\]|{_QUOTED})*: ', re.ASCII)


@dataclass
class Answer:
    """What ``esegeta validate`` answered: ``kind`` is ``"exit 0"``, ``"exit 2"`` or ``"other"``."""

    kind: str
    code: int | None
    stderr: str
    error: str = ""
    site: str = ""


def names_a_path(stderr: str, config_file: Path) -> bool:
    """Whether every line of an exit-2 message names a JSON path (or the config file)."""
    text = stderr.strip()
    start = text.find("esegeta: invalid")  # what the model's own code printed comes before (stderr under --json)
    text = text[start:] if start > 0 else text
    if text.startswith("esegeta: invalid config:\n"):
        lines = text.split("\n")[1:]
    elif text.startswith("esegeta: invalid: "):
        lines = [text.removeprefix("esegeta: invalid: ")]
    else:
        return False
    return bool(lines) and all(PATH_LINE.match(line) or line.startswith(f"{config_file}: ") for line in lines)


def _site(exc: BaseException) -> str:
    """Where ``exc`` was raised: the innermost esegeta frame (else the innermost frame) and the type."""
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "/esegeta/" in f.filename] or frames
    last = ours[-1] if ours else None
    where = f"{Path(last.filename).name}:{last.lineno} {last.name}" if last else "?"
    return f"{type(exc).__name__} at {where}"


class CaseTimeout(BaseException):
    """A case ran past its time limit (:func:`run_case`'s ``limit_s``). A ``BaseException``, as
    ``KeyboardInterrupt`` is: raised wherever the main thread is, it must not be taken by an
    ``except Exception`` that records a failed report or job and goes on (a slow case then counted
    as an answer given after its limit)."""


@contextlib.contextmanager
def _time_limit(limit_s: float | None):
    """Raise :class:`CaseTimeout` in the main thread after ``limit_s`` seconds (SIGALRM; Unix)."""
    import signal

    if not limit_s or not hasattr(signal, "setitimer"):
        yield
        return

    def expired(signum, frame):
        raise CaseTimeout(f"no answer within {limit_s:g} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, limit_s)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_case(content: bytes, folder: Path | None = None, command: str = "validate",
             limit_s: float | None = None) -> Answer:
    """``esegeta COMMAND`` (validate, check or run) on a config file holding ``content``,
    in-process, within ``limit_s`` seconds (``"timeout"`` past it). ``run`` writes under ``folder``.
    ``check`` and ``run`` may also exit 1 (methods that will not run, or failed)."""
    from esegeta.cli.commands import main

    with contextlib.ExitStack() as stack:
        if folder is None:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        file = folder / "config.json"
        file.write_bytes(content)
        err, out = io.StringIO(), io.StringIO()
        log = logging.getLogger("esegeta")
        before = list(log.handlers)
        limit = sys.getrecursionlimit()
        try:
            argv = [command, str(file)] + (["--output", str(folder / "out")] if command == "run" else [])
            if command == "check":
                argv.append("--json")
            with _time_limit(limit_s), contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
                code = main(argv)
        except BaseException as exc:  # noqa: BLE001 (a traceback is what is counted)
            if isinstance(exc, KeyboardInterrupt):
                raise
            if isinstance(exc, CaseTimeout):
                return Answer("timeout", None, err.getvalue(), str(exc), "timeout")
            return Answer("other", None, err.getvalue(), f"{type(exc).__name__}: {str(exc)[:300]}", _site(exc))
        finally:
            sys.setrecursionlimit(limit)
            for handler in log.handlers[:]:
                if handler not in before:
                    log.removeHandler(handler)
        stderr = err.getvalue()
        if command == "check" and code in (0, 1):
            try:
                json.loads(out.getvalue())
            except ValueError:
                return Answer("other", code, stderr, f"check --json printed what is not JSON: {out.getvalue()[:200]!r}")
        if code == 0:
            return Answer("exit 0", code, stderr)
        if code == 1 and command != "validate":
            return Answer("exit 1", code, stderr)
        if code == 2 and names_a_path(stderr, file):
            return Answer("exit 2", code, stderr)
        return Answer("other", code, stderr, f"exit {code} without a JSON path: {stderr[-300:]}")
