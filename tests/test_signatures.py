"""The cache of upstream parameters (esegeta.spec.signatures): what ``validate`` reads instead of
importing the libraries.

- For every available method, the cached parameters give the same names, kinds, defaults and
  the same verdict (accepted, or the same message) on a set of JSON values as the live ones.
- The shipped tables (esegeta/signatures.json) equal what the adapters say for the installed
  versions, so a fresh install validates without importing the libraries.
- In a fresh process with a current cache file, validating a Captum-only config imports no
  explainer library; a stale, corrupt or unwritable cache is ignored (the live answer is used).
"""
from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from esegeta.spec import registry, signatures
from esegeta.errors import ConfigError
from esegeta.spec.values import annotation_of, annotation_text, check_parameter
from helpers_cli import REPO, valid_config, write_config

#: JSON values of every kind a config can give a parameter.
PROBES = [None, True, False, 0, 1, -1, 3, 2.5, -0.5, 10**7, "x", "smoothgrad", "l2", "mean", [], [1], [1, 2],
          [0.5, 2.0], ["a"], [[1, 2], [3, 4]], {}, {"a": 1}]
AVAILABLE = sorted(s.id for s in registry.all_methods().values() if s.unavailable_reason() is None)


def _verdict(name: str, value, parameter: inspect.Parameter) -> str:
    try:
        check_parameter(name, value, parameter, "params." + name)
    except ConfigError as exc:
        return str(exc)
    return "ok"


def _same(live: dict[str, inspect.Parameter], cached: dict[str, inspect.Parameter], where: str) -> None:
    assert list(cached) == list(live), where
    for name, p in live.items():
        c = cached[name]
        assert c.kind == p.kind, (where, name)
        if p.default is p.empty:
            assert c.default is c.empty, (where, name)
        elif isinstance(c.default, signatures.Opaque):
            assert repr(c.default) == re.sub(r" at 0x[0-9a-fA-F]+", "", repr(p.default)), (where, name)
        else:
            assert c.default == p.default and type(c.default) is type(p.default), (where, name, p.default)
        probes = PROBES + ([list(p.default)] if isinstance(p.default, tuple) else [])
        for value in probes:
            assert _verdict(name, value, c) == _verdict(name, value, p), (where, name, value, p.annotation)


@pytest.mark.parametrize("method_id", AVAILABLE)
def test_cached_parameters_give_the_live_verdicts(method_id):
    spec = registry.get(method_id)
    live = dict(spec.adapter.parameters(spec))
    _same(live, signatures._decode(json.loads(json.dumps(signatures._encode(live)))), method_id)
    if spec.noise_tunnel is not None:
        live = dict(spec.noise_tunnel())
        _same(live, signatures._decode(json.loads(json.dumps(signatures._encode(live)))), method_id + " noise_tunnel")


@pytest.mark.parametrize("annotation", [
    "Optional[int]", "Union[int, Tuple[int, ...]]", "Literal['a', 'b']", "List[float]", "Sequence[int]",
    "Tuple[float, float]", "Union[None, torch.Tensor, int]", "Callable[..., Tensor]", "int | None", "dict",
    "Optional[Union[str, Tuple[int, float]]]",
])
def test_annotation_text_reads_back_to_the_same_verdicts(annotation):
    p = inspect.Parameter("x", inspect.Parameter.KEYWORD_ONLY, annotation=annotation)
    text = annotation_text(annotation_of(p))
    q = inspect.Parameter("x", inspect.Parameter.KEYWORD_ONLY, annotation=text)
    assert annotation_text(annotation_of(q)) == text
    for value in PROBES:
        assert _verdict("x", value, q) == _verdict("x", value, p), (annotation, text, value)


def test_the_shipped_tables_are_current():
    shipped = json.loads(signatures.SHIPPED.read_text())["libraries"]
    current = [name for name, t in shipped.items()
               if t["version"] == signatures.installed_version(registry.libraries()[name])]
    if not current:
        pytest.skip(f"the shipped tables are for other versions ({ {n: t['version'] for n, t in shipped.items()} })")
    for name in current:
        live = json.loads(json.dumps(signatures.table(registry.libraries()[name])))
        assert live == shipped[name], f"{name}: the adapter changed; write the tables again: python -m esegeta.spec.shipped"


def _validate_in_a_fresh_process(config: Path, cache: Path | str, shipped: bool = False) -> dict:
    """The explainer libraries a fresh process imports to validate ``config`` (without the
    shipped tables unless ``shipped``: the cache is what is tested then)."""
    off = "" if shipped else "import pathlib, esegeta.spec.signatures as s; s.SHIPPED = pathlib.Path('/nonexistent'); "
    code = (off + "import json, sys; from esegeta.run.runner import Pipeline; Pipeline(sys.argv[1]).validate(); "
            f"print(json.dumps(sorted(m for m in {sorted({m for lib in registry.libraries().values() for m in lib.requires})!r} "
            "if m in sys.modules)))")
    env = {**os.environ, "ESEGETA_CACHE_DIR": str(cache)}
    proc = subprocess.run([sys.executable, "-c", code, str(config)], capture_output=True, text=True, timeout=300,
                          cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_current_cache_spares_validate_the_library_import(tmp_path):
    methods = [{"id": "captum.IntegratedGradients", "params": {"n_steps": 8}}, {"id": "captum.Saliency"},
               {"id": "captum.Saliency", "label": "sg", "noise_tunnel": {"nt_samples": 2}}]
    config = write_config(tmp_path, valid_config(tmp_path, methods))
    cache = tmp_path / "cache"
    assert _validate_in_a_fresh_process(config, cache) == ["captum"]  # the first time: imported, then written
    (written_file,) = cache.glob("signatures-captum-*.json")
    written = json.loads(written_file.read_text())
    assert written["fingerprint"] == signatures.fingerprint(registry.libraries()["captum"])
    assert {"params", "noise_tunnel"} <= set(written["methods"]["captum.Saliency"])
    assert _validate_in_a_fresh_process(config, cache) == []  # then read from the file

    written["fingerprint"] = "another installation"  # stale: ignored, the library is imported again
    written_file.write_text(json.dumps(written))
    assert _validate_in_a_fresh_process(config, cache) == ["captum"]
    written_file.write_text("{not json")  # corrupt: ignored and rewritten
    assert _validate_in_a_fresh_process(config, cache) == ["captum"]
    assert _validate_in_a_fresh_process(config, cache) == []


def test_a_fresh_install_validates_from_the_shipped_tables(tmp_path):
    library = registry.libraries()["captum"]
    if json.loads(signatures.SHIPPED.read_text())["libraries"]["captum"]["version"] != signatures.installed_version(library):
        pytest.skip("the shipped captum table is for another version")
    config = write_config(tmp_path, valid_config(tmp_path, [{"id": "captum.IntegratedGradients"}]))
    assert _validate_in_a_fresh_process(config, tmp_path / "empty-cache", shipped=True) == []
    assert not (tmp_path / "empty-cache").exists()  # nothing to write


def test_a_cache_that_cannot_be_written_or_is_off_changes_nothing(tmp_path):
    config = write_config(tmp_path, valid_config(tmp_path, [{"id": "captum.Saliency"}]))
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    assert _validate_in_a_fresh_process(config, blocked / "cache") == ["captum"]
    assert _validate_in_a_fresh_process(config, "") == ["captum"]  # ESEGETA_CACHE_DIR="": off


def test_a_wrong_parameter_is_refused_from_the_cache_as_without_it(tmp_path):
    methods = [{"id": "captum.IntegratedGradients", "params": {"n_steps": "32", "method": "gausslegendre"}}]
    config = write_config(tmp_path, valid_config(tmp_path, methods))
    cache = tmp_path / "cache"
    env = {**os.environ, "ESEGETA_CACHE_DIR": str(cache)}
    answers = []
    for _ in range(2):  # the first fills the cache, the second reads it (the shipped tables left out)
        code = ("import pathlib, sys, esegeta.spec.signatures as s; s.SHIPPED = pathlib.Path('/nonexistent'); "
                "from esegeta.cli.commands import main; sys.exit(main(sys.argv[1:]))")
        proc = subprocess.run([sys.executable, "-c", code, "validate", str(config)], capture_output=True,
                              text=True, timeout=300, cwd=REPO, env=env)
        answers.append((proc.returncode, proc.stderr))
    assert answers[0] == answers[1]
    assert len(list(cache.glob("signatures-captum-*.json"))) == 1
    assert answers[0][0] == 2 and "methods[0].params.n_steps" in answers[0][1] and "Traceback" not in answers[0][1]
