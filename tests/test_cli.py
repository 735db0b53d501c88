"""The ``esegeta`` command line end to end (SPEC §2, §6, §7, §8).

Subprocesses only where a fresh interpreter is the point (``--help``, what importing
esegeta imports, the real process exit code); everything else runs ``esegeta.cli.commands.main``
in-process on copies of the digits config in ``tmp_path``.
"""
from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from esegeta.spec import registry
from helpers_cli import REPO, SAMPLES, output_files, run_cli, valid_config, write_config

#: Every explainer library's import names (from the adapters' library records), and torch.
LIBRARIES = tuple(sorted({m for lib in registry.libraries().values() for m in lib.requires} | {"torch"}))
CHEAP_METHODS = [
    {"id": "captum.Saliency"},
    {"id": "captum.IntegratedGradients", "params": {"n_steps": 8}},
    {"id": "captum.LayerGradCam", "layer": "layer2", "label": "gradcam-layer2"},
    {"id": "captum.Saliency", "label": "smoothgrad",
     "noise_tunnel": {"nt_type": "smoothgrad", "nt_samples": 4, "stdevs": 0.1}},
]
TWO_DIGITS = "../samples/data/digits/digit_1*.npy"  # digit_1_label0 and digit_12_label8
INPUTS = ("digit_12_label8", "digit_1_label0")


def python(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)


def digits_copy(root: Path, methods: list[dict], paths: str | list[str] = TWO_DIGITS,
                formats: tuple[str, ...] = ("npy", "png")) -> tuple[dict, Path]:
    """configs/digits.json copied to ``root/configs`` with its relative paths kept (``root/samples``
    links to the repository's samples), with ``methods``, ``paths`` and output formats replaced."""
    if not (root / "samples").exists():
        (root / "samples").symlink_to(SAMPLES, target_is_directory=True)
    (root / "configs").mkdir(exist_ok=True)
    cfg = json.loads((REPO / "configs" / "digits.json").read_text())
    cfg["inputs"]["paths"] = [paths] if isinstance(paths, str) else paths
    cfg["methods"] = methods
    cfg["runtime"] = {"devices": "cpu", "seed": 0}
    cfg["output"]["formats"] = list(formats)
    return cfg, write_config(root / "configs", cfg, "digits.json")


def manifest_of(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def statuses(manifest: dict) -> dict[tuple[str, str], str]:
    return {(r["label"], r["input"]): r["status"] for r in manifest["runs"]}


def no_temporary_files(out: Path) -> None:
    leftovers = [p for p in out.rglob("*") if p.name.startswith(".tmp-")]
    assert leftovers == [], leftovers


# --------------------------------------------------------------------------- #
# fresh interpreters: --help, import weight, the real exit code
# --------------------------------------------------------------------------- #
def test_help_in_a_fresh_interpreter():
    proc = python("-m", "esegeta", "--help")
    assert proc.returncode == 0, proc.stderr
    for command in ("run", "validate", "methods", "schema", "demo"):
        assert re.search(rf"^\s+{command}\s", proc.stdout, re.M), proc.stdout
    proc = python("-m", "esegeta", "run", "--help")
    assert proc.returncode == 0
    for option in ("--output", "--device", "--only", "--debug"):
        assert option in proc.stdout


def test_importing_esegeta_and_listing_methods_imports_no_explainer_nor_torch():
    code = ("import sys, esegeta, esegeta.cli.commands; import esegeta.spec.registry; esegeta.methods(); "
            f"print(sorted(m for m in {LIBRARIES!r} if m in sys.modules))")
    proc = python("-c", code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_bad_config_in_a_real_process_exits_2_without_traceback(tmp_path):
    cfg = write_config(tmp_path, valid_config(tmp_path, methods=[
        {"id": "captum.IntegratedGradients", "params": {"n_step": 8}}]))
    proc = python("-m", "esegeta", "validate", str(cfg))
    assert proc.returncode == 2
    assert "methods[0].params.n_step: unknown parameter for captum.IntegratedGradients; did you mean n_steps?" \
        in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_read_only_commands_end_quickly_with_all_their_output(tmp_path):
    """validate, methods and schema end with os._exit (cli.console): their output, written to a
    pipe (block-buffered), and their exit code still arrive whole."""
    proc = python("-m", "esegeta", "validate", str(write_config(tmp_path, valid_config(tmp_path))))
    assert proc.returncode == 0, proc.stderr
    assert "valid: 1 input(s), 1 method(s)" in proc.stdout
    proc = python("-m", "esegeta", "methods", "--json")
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)) == len(registry.all_methods())
    proc = python("-m", "esegeta", "schema")
    assert proc.returncode == 0 and json.loads(proc.stdout)["title"]


# --------------------------------------------------------------------------- #
# methods, schema, version
# --------------------------------------------------------------------------- #
def test_methods_json(capsys):
    code, out, _ = run_cli(["methods", "--json"], capsys)
    assert code == 0
    rows = json.loads(out)
    assert len(rows) >= 29
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids))
    for r in rows:
        assert {"id", "library", "kind", "needs_layer", "dims", "available", "reason"} <= set(r), r
        assert re.fullmatch(r"[a-z_]+\.[A-Za-z_]\w*", r["id"]), r["id"]
        assert r["id"].split(".", 1)[0] == r["library"]
        assert r["kind"] in ("attribution", "layer", "neuron", "image")
        assert isinstance(r["needs_layer"], bool)
        assert r["fuses_layers"] == 0 or r["needs_layer"]  # a layer list is a kind of layer
        assert r["dims"] and set(r["dims"]) <= {2, 3}
        assert isinstance(r["available"], bool)
        assert (r["reason"] is None) == r["available"], r
        if r["library"] == "captum":
            assert r["available"], r
    assert {"captum.Saliency", "captum.IntegratedGradients", "captum.LayerGradCam"} <= set(ids)
    import esegeta

    assert esegeta.methods() == rows


def test_methods_table(capsys):
    code, out, _ = run_cli(["methods"], capsys)
    assert code == 0
    rows = json.loads(run_cli(["methods", "--json"], capsys)[1])
    lines = out.splitlines()
    for r in rows:
        assert any(line.split()[:1] == [r["id"]] for line in lines), r["id"]
    assert re.fullmatch(rf"{len(rows)} methods, \d+ available; amp: .*", lines[-1])
    for r in rows:  # the amp column: the precisions measured safe, as --json says
        line = next(line for line in lines if line.split()[:1] == [r["id"]])
        safe = "/".join(p for p in ("bf16", "fp16") if r["amp"][p]["safe"]) or "fp32 only"
        assert f" {safe} " in line, (r["id"], safe, line)


def test_schema_is_the_committed_one(capsys):
    code, out, _ = run_cli(["schema"], capsys)
    assert code == 0
    schema = json.loads(out)
    committed = json.loads((REPO / "configs" / "schema.json").read_text())
    assert schema == committed, "configs/schema.json is stale: python -m esegeta schema > configs/schema.json"
    assert schema["$schema"].startswith("https://json-schema.org/")
    assert set(schema["required"]) >= {"model", "inputs", "methods"}
    assert schema["additionalProperties"] is False


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "configs").glob("*.json") if p.name != "schema.json"))
def test_committed_configs_use_only_schema_keys(config):
    schema = json.loads((REPO / "configs" / "schema.json").read_text())
    data = json.loads((REPO / "configs" / config).read_text())
    assert set(data) <= set(schema["properties"]), set(data) - set(schema["properties"])
    assert data.get("$schema", "schema.json") == "schema.json"
    try:
        import jsonschema
    except ImportError:
        return
    jsonschema.validate(data, schema)


def test_version_and_no_command(capsys):
    import esegeta

    code, out, _ = run_cli(["--version"], capsys)
    assert (code, out.strip()) == (0, esegeta.__version__)
    code, out, _ = run_cli([], capsys)
    assert code == 2
    assert "usage: esegeta" in out


# --------------------------------------------------------------------------- #
# esegeta run, end to end
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    """One run of four cheap methods on two digits, shared by the tests below."""
    from esegeta.cli.commands import main  # capsys is function-scoped: pytest's own capture takes the output here

    root = tmp_path_factory.mktemp("e2e")
    cfg, path = digits_copy(root, CHEAP_METHODS)
    out = root / "out"
    log = logging.getLogger("esegeta")
    before = list(log.handlers)
    try:
        code = main(["run", str(path), "--output", str(out)])
    finally:
        for handler in log.handlers[:]:
            if handler not in before:
                log.removeHandler(handler)
    return {"code": code, "cfg": cfg, "root": root, "out": out, "manifest": manifest_of(out)}


def test_run_exits_0(e2e):
    assert e2e["code"] == 0, [r for r in e2e["manifest"]["runs"] if r["status"] != "ok"]


def test_manifest_header(e2e):
    m = e2e["manifest"]
    import esegeta

    assert m["esegeta"] == esegeta.__version__
    versions = m["libraries"]
    assert versions["esegeta"] == esegeta.__version__
    assert versions["torch"] == torch.__version__
    import captum

    assert versions["captum"] == captum.__version__
    # the resolved config: what was given, defaults filled in
    resolved = m["config"]
    assert [(e["id"], e.get("label")) for e in resolved["methods"]] == \
        [(e["id"], e.get("label")) for e in CHEAP_METHODS]
    assert resolved["methods"][1]["params"] == {"n_steps": 8}
    assert resolved["methods"][0]["enabled"] is True
    assert resolved["model"]["factory"] == e2e["cfg"]["model"]["factory"]
    assert resolved["inputs"]["paths"] == [TWO_DIGITS]
    assert resolved["target"] == "predicted"
    assert resolved["output"]["formats"] == ["npy", "png"]
    assert resolved["runtime"]["seed"] == 0
    assert Path(m["config_dir"]) == (e2e["root"] / "configs").resolve()
    assert [i["name"] for i in m["inputs"]] == list(INPUTS)
    assert all(i["shape"] == [1, 8, 8] for i in m["inputs"])


def test_one_ok_run_per_method_and_input(e2e):
    m, out = e2e["manifest"], e2e["out"]
    labels = [e.get("label", e["id"]) for e in CHEAP_METHODS]
    assert sorted((r["label"], r["input"]) for r in m["runs"]) == sorted((lb, i) for lb in labels for i in INPUTS)
    for r in m["runs"]:
        assert r["status"] == "ok", r
        assert r["error"] is None
        assert r["device"] == "cpu"
        assert isinstance(r["seconds"], float) and r["seconds"] >= 0
        assert isinstance(r["score"], float) and np.isfinite(r["score"])
        assert r["method"] in {e["id"] for e in CHEAP_METHODS}
        assert set(r["files"]) == {"npy", "png"}, r["files"]
        for rel in r["files"].values():
            assert not Path(rel).is_absolute() and ".." not in Path(rel).parts
            assert (out / rel).resolve().is_relative_to(out.resolve())
        array = np.load(out / r["files"]["npy"])
        assert array.dtype == np.float32
        assert list(array.shape) == r["shape"]
        assert np.isfinite(array).all()
        assert (out / r["files"]["png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    shapes = {r["label"]: r["shape"] for r in m["runs"]}
    assert shapes["captum.Saliency"] == shapes["captum.IntegratedGradients"] == shapes["smoothgrad"] == [1, 8, 8]
    assert shapes["gradcam-layer2"] == [1, 4, 4]  # layer2 has stride 2: the layer's resolution


def test_score_and_saliency_are_what_the_model_and_captum_give(e2e):
    """score = the explained logit on the unperturbed input; Saliency's .npy = captum's own result."""
    from captum.attr import Saliency

    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from samples.models import DigitResNet

    model = DigitResNet()
    model.load_state_dict(torch.load(SAMPLES / "checkpoints" / "digit_resnet.pt", weights_only=True))
    model.eval()
    out = e2e["out"]
    for r in e2e["manifest"]["runs"]:
        if r["label"] != "captum.Saliency":
            continue
        x = torch.from_numpy(np.load(SAMPLES / "data" / "digits" / f"{r['input']}.npy")).float()[None]
        with torch.no_grad():
            logits = model(x)
        assert r["score"] == pytest.approx(float(logits.max()), rel=1e-4, abs=1e-5)
        expected = Saliency(model).attribute(x.clone().requires_grad_(), target=int(logits.argmax()))
        np.testing.assert_allclose(np.load(out / r["files"]["npy"]), expected[0].detach().numpy(), rtol=1e-4, atol=1e-6)


def test_overview_log_and_no_temporary_files(e2e):
    out = e2e["out"]
    assert (out / "overview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert e2e["manifest"].get("overview") == "overview.png"
    log = (out / "esegeta.log").read_text()
    for r in e2e["manifest"]["runs"]:
        assert f"{r['label']} on {r['input']}: ok" in log
    no_temporary_files(out)
    written = {str(p.relative_to(out)) for p in output_files(out)}
    listed = {rel for r in e2e["manifest"]["runs"] for rel in r["files"].values()}
    assert written == listed | {"manifest.json", "overview.png", "report.html", "esegeta.log", ".esegeta.lock"}


# --------------------------------------------------------------------------- #
# failures, --only, the Python API
# --------------------------------------------------------------------------- #
FAILING_METHODS = [
    {"id": "captum.Saliency"},
    {"id": "captum.IntegratedGradients", "label": "ig-broken", "params": {"n_steps": 8, "method": "nonexistent"}},
    {"id": "captum.InputXGradient"},
]
FAILING_STATUSES = {("captum.Saliency", "digit_1_label0"): "ok", ("ig-broken", "digit_1_label0"): "failed",
                    ("captum.InputXGradient", "digit_1_label0"): "ok"}
ONE_INPUT = "../samples/data/digits/digit_1_label0.npy"


def test_failing_method_does_not_stop_the_others(tmp_path, capsys):
    """IntegratedGradients with an unknown approximation method passes validation (params are
    checked by name, not value) and fails when captum runs it."""
    _, path = digits_copy(tmp_path, FAILING_METHODS, ONE_INPUT)
    code, _, err = run_cli(["validate", path], capsys)
    assert code == 0, err
    out = tmp_path / "out"
    code, _, err = run_cli(["run", path, "--output", out], capsys)
    assert code == 1, err
    assert "Traceback" not in err
    assert "2/3 ok" in err
    assert f"open {out / 'report.html'} and {out / 'overview.png'}" in err  # the last line names what to open
    m = manifest_of(out)
    assert statuses(m) == FAILING_STATUSES
    broken = next(r for r in m["runs"] if r["label"] == "ig-broken")
    assert "nonexistent" in broken["error"]
    assert broken["files"] == {} and broken["shape"] is None
    for r in m["runs"]:
        if r["status"] == "ok":
            assert r["error"] is None
            assert all((out / rel).is_file() for rel in r["files"].values())
    assert not list(out.rglob("ig-broken*"))
    log = (out / "esegeta.log").read_text()
    assert "ig-broken on digit_1_label0 failed" in log and "nonexistent" in log
    assert "Traceback" in log  # the cause, for the user who reads the log
    assert (out / "overview.png").is_file()
    no_temporary_files(out)


GRAD_SHY = """
import importlib.util

_spec = importlib.util.spec_from_file_location("grad_shy_samples_models", {models!r})
_models = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_models)


class GradShy(_models.DigitResNet):
    '''DigitResNet that fails whenever its input requires grad (an error in a gradient pass).'''

    def forward(self, x):
        if x.requires_grad:
            raise RuntimeError("simulated failure in the gradient pass")
        return super().forward(x)
"""


def test_method_failing_inside_a_gradient_pass_does_not_stop_the_others(tmp_path, capsys):
    """Captum sets requires_grad on the input and does not undo it when the method raises: the runner
    hands each method a fresh tensor, so the next method and the overview are unaffected (once a bug:
    the flag leaked, LayerActivation failed too and the overview crashed with a traceback)."""
    (tmp_path / "grad_shy.py").write_text(GRAD_SHY.format(models=str(SAMPLES / "models.py")))
    cfg = valid_config(tmp_path, methods=[
        {"id": "captum.FeatureAblation", "params": {"feature_mask": {"grid": [2, 2]}}},
        {"id": "captum.Saliency"},
        {"id": "captum.LayerActivation", "layer": "layer2"},
    ])
    cfg["model"]["factory"] = f"{tmp_path / 'grad_shy.py'}:GradShy"
    out = tmp_path / "out"
    code, _, err = run_cli(["run", write_config(tmp_path, cfg)], capsys)
    m = manifest_of(out)
    assert [r["status"] for r in m["runs"]] == ["ok", "failed", "ok"], m["runs"]
    assert code == 1
    assert (out / "overview.png").is_file()


def test_only_runs_the_named_methods(tmp_path, capsys):
    methods = CHEAP_METHODS[:3] + [{"id": "captum.InputXGradient", "enabled": False}]
    _, path = digits_copy(tmp_path, methods, ONE_INPUT, formats=("npy",))  # no figures: faster
    out = tmp_path / "only-label"
    code, _, err = run_cli(["run", path, "--output", out, "--only", "gradcam-layer2"], capsys)
    assert code == 0, err
    assert list(statuses(manifest_of(out))) == [("gradcam-layer2", "digit_1_label0")]
    results = {p.name for p in output_files(out)} - {"manifest.json", "report.html", "esegeta.log", ".esegeta.lock"}
    assert results == {"gradcam-layer2.npy"}

    out = tmp_path / "only-two"
    code, _, err = run_cli(["run", path, "--output", out, "--only", "captum.Saliency", "gradcam-layer2"], capsys)
    assert code == 0, err
    assert sorted(label for label, _ in statuses(manifest_of(out))) == ["captum.Saliency", "gradcam-layer2"]

    out = tmp_path / "all-enabled"
    code, _, err = run_cli(["run", path, "--output", out], capsys)
    assert code == 0, err
    ran = [label for label, _ in statuses(manifest_of(out))]
    assert ran == ["captum.Saliency", "captum.IntegratedGradients", "gradcam-layer2"]  # not the disabled one
    assert not list(out.rglob("captum.InputXGradient*"))


def test_default_output_dir_is_relative_to_the_config(tmp_path, capsys):
    cfg, path = digits_copy(tmp_path, [{"id": "captum.Saliency"}], ONE_INPUT)
    assert cfg["output"]["dir"] == "../results/digits"
    code, _, err = run_cli(["run", path], capsys)  # the working directory is the repository's, not tmp_path
    assert code == 0, err
    assert (tmp_path / "results" / "digits" / "manifest.json").is_file()
    no_temporary_files(tmp_path / "results")


@pytest.mark.parametrize("where", ["output.dir", "--output"])
@pytest.mark.parametrize("fault, message", [("a file", "is an existing file, not a folder"),
                                            ("under a file", "cannot create")])
def test_what_run_refuses_about_the_output_folder_validate_and_check_refuse(tmp_path, capsys, where, fault, message):
    """An output folder that is a file, or would sit under one: run exits 2 before computing, and
    validate (and check, for output.dir) say so too, naming the same field, creating nothing."""
    blocker = tmp_path / "results.txt"
    blocker.write_text("not a folder")
    out = blocker if fault == "a file" else blocker / "run"
    if where == "output.dir":
        path = write_config(tmp_path, valid_config(tmp_path, output={"dir": str(out), "formats": ["npy"]}))
        extra = []
    else:
        path = write_config(tmp_path, valid_config(tmp_path))
        extra = ["--output", out]
    before = sorted(tmp_path.rglob("*"))
    commands = [["validate", path, *extra], ["run", path, *extra]] + ([["check", path]] if not extra else [])
    for command in commands:
        code, stdout, err = run_cli(command, capsys)
        assert code == 2, (command, stdout, err)
        assert f"{where}: " in err and message in err and str(out) in err, (command, err)
        assert sorted(tmp_path.rglob("*")) == before and blocker.read_text() == "not a folder"


def test_validate_creates_no_output_folder(tmp_path, capsys):
    out = tmp_path / "not" / "yet"
    path = write_config(tmp_path, valid_config(tmp_path, output={"dir": str(out), "formats": ["npy"]}))
    for argv in (["validate", path], ["validate", path, "--output", tmp_path / "other"], ["check", path]):
        code, _, err = run_cli(argv, capsys)
        assert code == 0, err
    assert not (tmp_path / "not").exists() and not (tmp_path / "other").exists()


def test_pipeline_from_python_matches_the_cli(tmp_path, capsys):
    from esegeta import Pipeline, RunResult

    cfg, path = digits_copy(tmp_path, FAILING_METHODS, ONE_INPUT, formats=("npy",))
    cli_out = tmp_path / "cli"
    code, _, err = run_cli(["run", path, "--output", cli_out], capsys)
    assert code == 1, err

    result = Pipeline(cfg, base_dir=tmp_path / "configs", output_dir=tmp_path / "py").run()
    assert isinstance(result, RunResult)
    assert result.exit_code == code
    assert result.output_dir == tmp_path / "py"
    assert statuses(result.manifest) == statuses(manifest_of(cli_out)) == FAILING_STATUSES
    assert result.manifest == manifest_of(tmp_path / "py")
    assert result.runs == result.manifest["runs"]

    by_label = result.result("captum.Saliency", "digit_1_label0")
    assert isinstance(by_label, np.ndarray) and by_label.dtype == np.float32 and by_label.shape == (1, 8, 8)
    np.testing.assert_array_equal(by_label, np.load(cli_out / manifest_of(cli_out)["runs"][0]["files"]["npy"]))
    np.testing.assert_array_equal(result.result("captum.InputXGradient"), np.load(
        tmp_path / "py" / result.runs[2]["files"]["npy"]))
    with pytest.raises(KeyError):
        result.result("ig-broken", "digit_1_label0")  # failed: nothing saved
    with pytest.raises(KeyError):
        result.result("captum.Saliency", "no-such-input")

    only = Pipeline(cfg, base_dir=tmp_path / "configs", output_dir=tmp_path / "py-only", only=["ig-broken"]).run()
    assert statuses(only.manifest) == {("ig-broken", "digit_1_label0"): "failed"}
    assert only.exit_code == 1


def test_pipeline_from_a_file_path(tmp_path):
    from esegeta import Pipeline

    _, path = digits_copy(tmp_path, [{"id": "captum.Saliency"}], ONE_INPUT)
    result = Pipeline(path, output_dir=tmp_path / "out").run()
    assert result.exit_code == 0
    assert result.result("captum.Saliency").shape == (1, 8, 8)


def test_main_twice_in_one_process_logs_each_line_once(tmp_path, capsys):
    """main() replaces its console handler instead of adding one per call (once a bug: each line
    was printed once per earlier call, in tests, notebooks and Python drivers)."""
    from esegeta.cli.commands import main

    cfg = write_config(tmp_path, valid_config(tmp_path))
    log = logging.getLogger("esegeta")
    before = list(log.handlers)
    try:
        assert main(["run", str(cfg), "--output", str(tmp_path / "a")]) == 0
        capsys.readouterr()
        assert main(["run", str(cfg), "--output", str(tmp_path / "b")]) == 0
        err = capsys.readouterr().err
    finally:
        for handler in log.handlers[:]:
            if handler not in before:
                log.removeHandler(handler)
    assert err.count("captum.Saliency on digit_1_label0: ok") == 1, err
