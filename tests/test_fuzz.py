"""Any config gets a clear answer: ``esegeta validate`` exits 0, or 2 naming a JSON path.

Hypothesis mutates the sample configs (structure, values, text, bytes; see
``tests/fuzz_cases.py``) for about a minute; ``benchmarks/fuzz.py`` is the long run. The
named cases below are the faults that once gave tracebacks or were accepted and failed later.
"""
from __future__ import annotations

import copy
import json
import zipfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings

from fuzz_cases import cases, run_case, samples

BASES = samples()


@settings(max_examples=400, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(cases(BASES))
def test_validate_answers_exit_0_or_2_naming_a_json_path(tmp_path_factory, content):
    answer = run_case(content, tmp_path_factory.mktemp("fuzz"))
    assert answer.kind != "other", f"{answer.error}\n{answer.stderr}\nconfig: {content[:600]!r}"


def _digits(**changes) -> dict:
    data = copy.deepcopy(BASES["digits.json"])
    data["methods"] = [{"id": "captum.Saliency"}]
    for path, value in changes.items():
        *parents, last = path.split("__")
        here = data
        for p in parents:
            here = here.setdefault(p, {})
        here[last] = value
    return data


def _method(entry: dict) -> dict:
    return _digits(methods=[entry])


NAMED = {
    # once tracebacks
    # the JSON parser's own depth limit follows the recursion limit (which other tests in the process
    # may have raised): either it refuses the text, or esegeta's nesting check refuses the path
    "nested 2,000 deep": (b'{"methods": ' + b"[" * 2000 + b"]" * 2000 + b"}",
                          ("config.json: ", "nested more than 32 levels deep")),
    "not UTF-8": (b'\xff\xfe{"model": 1}', "not UTF-8"),
    "5,001-digit number": (b'{"target": ' + b"9" * 5001 + b"}", "target: an integer of 5001 digits"),
    "hyphen key": (_digits(**{"top-level": 1}), '["top-level"]: unknown key'),
    "hyphen key nested": ({**_digits(), "inputs": {**_digits()["inputs"], "a-b": 1}}, 'inputs["a-b"]: unknown key'),
    # the long run's last finds: keys that are names only to Unicode, or $schema below the top
    "unicode key": (_digits(**{"$\u00b9": 1}), '["$\\u00b9"]: unknown key'),
    "nested $schema": ({**_digits(), "runtime": {"$schema": 1}}, 'runtime["$schema"]: unknown key'),
    "$schema as a parameter": (_method({"id": "captum.Saliency", "params": {"$schema": 1}}),
                               'methods[0].params["$schema"]: unknown parameter'),
    "device ipu": (_digits(runtime__devices="ipu"), "runtime.devices: 'ipu'"),
    "device xla": (_digits(runtime__devices="xla"), "runtime.devices: 'xla'"),
    "device vulkan": (_digits(runtime__devices=["vulkan"]), "runtime.devices[0]: 'vulkan'"),
    "device lazy": (_digits(runtime__devices="lazy"), "runtime.devices: 'lazy'"),
    "300-character path": (_digits(inputs__paths=["a" * 300]), "inputs.paths[0]: "),
    "upper-case factory file": (_digits(model__factory="../SAMPLES/MODELS.PY:X"), "model.factory: "),
    "builtins wrapper": (_digits(wrapper={"name": "builtins:print"}), "wrapper.name: 'builtins:print'"),
    "zennit composite [null]": (_method({"id": "zennit.EpsilonPlus", "params": {"composite": [None]}}),
                                "methods[0].params.composite: "),
    "gradcam base_method -1": (_method({"id": "gradcam.GradCAM", "layer": "layer2", "params": {"base_method": -1}}),
                               "methods[0].params.base_method: "),
    "resize 60000²": (_digits(inputs__resize=[60000, 60000]), "inputs.resize: "),
    # once accepted, then failed at run time
    "label of 240 characters": (_method({"id": "captum.Saliency", "label": "x" * 240}), "methods[0].label: "),
    "timeout 1e999": (b'{"runtime": {"timeout_s": 1e999}}', "runtime.timeout_s: inf is not a finite number"),
    "n_steps '32'": (_method({"id": "captum.IntegratedGradients", "params": {"n_steps": "32"}}),
                     "methods[0].params.n_steps: n_steps counts"),
    "n_steps '~'": (_method({"id": "captum.IntegratedGradients", "params": {"n_steps": "~"}}),
                    "methods[0].params.n_steps: "),
    "nt_samples 0": (_method({"id": "captum.Saliency", "noise_tunnel": {"nt_samples": 0}}),
                     "methods[0].noise_tunnel.nt_samples: "),
    "stdevs negative": (_method({"id": "captum.Saliency", "noise_tunnel": {"stdevs": -1}}),
                        "methods[0].noise_tunnel.stdevs: "),
    "devices meta": (_digits(runtime__devices="meta"), "runtime.devices: 'meta'"),
    "entry device meta": (_method({"id": "captum.Saliency", "device": "meta"}), "methods[0].device: 'meta'"),
    "duplicate key": (b'{"target": 1, "target": 2}', "config.json: key 'target' appears more than once"),
    "duplicate nested key": (b'{"runtime": {"seed": 1, "seed": 2}}', "runtime: key 'seed' appears more than once"),
    "unknown wrapper": (_digits(wrapper={"name": "treshold"}), "unknown wrapper 'treshold'"),
    "RGB input to a gray model": (_digits(inputs__color="rgb"), "inputs.color: "),
}


@pytest.mark.parametrize("name", list(NAMED))
def test_named_fault_exits_2_naming_its_field(name, tmp_path):
    content, expected = NAMED[name]
    if isinstance(content, dict):
        content = json.dumps(content).encode()
    answer = run_case(content, tmp_path)
    assert answer.kind == "exit 2", f"{answer.kind}: {answer.error}\n{answer.stderr}"
    assert any(e in answer.stderr for e in (expected if isinstance(expected, tuple) else (expected,))), answer.stderr


def test_a_zip_that_looks_like_torchscript_is_refused_as_weights(tmp_path):
    fake = tmp_path / "fake.pt"
    with zipfile.ZipFile(fake, "w") as archive:
        archive.writestr("archive/code/x.py", "junk")
        archive.writestr("archive/constants.pkl", "junk")
    for model in ({"factory": BASES["digits.json"]["model"]["factory"], "weights": str(fake)}, {"weights": str(fake)}):
        answer = run_case(json.dumps(_digits(model=model)).encode(), tmp_path)
        assert answer.kind == "exit 2" and "model.weights: fake.pt" in answer.stderr, answer.stderr


def test_wrong_weights_are_summarised(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    weights = tmp_path / "other.pt"
    torch.save(model.state_dict(), weights)
    answer = run_case(json.dumps(_digits(model__weights=str(weights))).encode(), tmp_path)
    assert answer.kind == "exit 2"
    message = answer.stderr
    assert "0 of the model's" in message and "missing (" in message and "2 unexpected (0.weight, 0.bias)" in message
    assert len(message) < 600, message


def test_the_sample_configs_still_validate(tmp_path):
    for name, data in BASES.items():
        answer = run_case(json.dumps(data).encode(), tmp_path)
        assert answer.kind == "exit 0", f"{name}: {answer.stderr}"
