"""esegeta.spec.params (checks, defaults, batches, the entry check), esegeta.spec.targets and the
library records the registry finds."""
from __future__ import annotations

import ast
import importlib
import pkgutil
import tomllib

import pytest
import torch

import esegeta.adapters
from esegeta.spec import params, registry
from esegeta.errors import ConfigError
from esegeta.spec.targets import Target

from conftest import ROOT


def test_value_predicates():
    assert params.positive_int(3) and not params.positive_int(0) and not params.positive_int(True)
    assert params.index(0) and not params.index(-1) and params.seed(None) and not params.seed(1.5)
    assert params.number(0.5) and not params.number(False) and params.boolean(False) and not params.boolean(0)
    with pytest.raises(ConfigError, match=r"params\.k: k must be a positive integer, not 0"):
        params.check_table({"k": params.POSITIVE_INT}, "k", 0, "params.k")
    params.check_table({"k": params.POSITIVE_INT}, "other", 0, "params.other")  # no check: nothing raised
    with pytest.raises(ConfigError, match="n must be a positive integer"):
        params.check_number("n", 2.5, "p", integers=frozenset({"n"}))


def test_with_defaults_fills_only_what_is_unset_and_returns_a_new_dict():
    spec = registry.get("captum.Occlusion")
    x = torch.zeros(1, 3, 32, 16)
    given = {"strides": [3, 2, 2]}
    filled = params.with_defaults(spec, given, x)
    assert filled == {"sliding_window_shapes": [3, 4, 2], "strides": [3, 2, 2]}
    assert given == {"strides": [3, 2, 2]}


def test_halve_batch_returns_new_params():
    spec = registry.get("captum.IntegratedGradients")
    given = {"n_steps": 10}
    assert params.halve_batch(spec, given, None) == ({"n_steps": 10, "internal_batch_size": 5}, None)
    assert given == {"n_steps": 10}
    assert params.halve_batch(spec, {"internal_batch_size": 1}, None) is None
    saliency = registry.get("captum.Saliency")
    assert params.halve_batch(saliency, {}, {"nt_samples": 6}) == ({}, {"nt_samples": 6, "nt_samples_batch_size": 3})
    assert params.halve_batch(registry.get("zennit.EpsilonPlus"), {}, None) is None


def test_effective_batch_from_the_library_record():
    assert params.effective_batch(registry.get("captum.IntegratedGradients"), {"n_steps": 16}, None) == 16
    assert params.effective_batch(registry.get("captum.IntegratedGradients"),
                                  {"n_steps": 16, "internal_batch_size": 4}, None) == 4
    assert params.effective_batch(registry.get("lime.LimeImageExplainer"), {"num_samples": 50}, None) == 10
    assert params.effective_batch(registry.get("captum.Saliency"), {}, {"nt_samples": 7}) == 7
    # perturbation methods send perturbations_per_eval copies at once (Captum's default: 1)
    assert params.effective_batch(registry.get("captum.Occlusion"), {"perturbations_per_eval": 8}, None) == 8
    assert params.effective_batch(registry.get("captum.Occlusion"), {}, None) == 1
    assert params.effective_batch(registry.get("captum.Saliency"), {}, None) == 1


def test_check_method_names_the_field():
    assert params.check_method("captum.Saliency", {}, None, None, "m").id == "captum.Saliency"
    with pytest.raises(ConfigError, match=r"m\.noise_tunnel: gradcam.GradCAM cannot be wrapped in a noise tunnel"):
        params.check_method("gradcam.GradCAM", {}, "enc2", {"nt_samples": 2}, "m")
    with pytest.raises(ConfigError, match="did you mean nt_samples"):
        params.check_method("captum.Saliency", {}, None, {"nt_sample": 2}, "m")


def test_target_forms():
    t = Target.of(torch.tensor([2, 0, 2]), 3)
    assert t.ints() == [2, 0, 2] and t[1] == 0 and t.uniform() is None and len(t) == 3
    scores = torch.arange(12.).view(3, 4)
    assert t.column(scores).tolist() == [2., 4., 10.]
    assert t.one_hot(scores).tolist() == [[0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 1, 0]]
    one = Target.of(1, 2)
    assert one.ints() == [1, 1] and one.uniform() == 1 and one.index().tolist() == [1, 1]
    assert Target.of(None, 2) is None and Target.of(torch.tensor(3), 1).ints() == [3]


# -- library records ---------------------------------------------------------------
def test_every_adapter_module_states_its_library_and_is_found():
    names = [m.name for m in pkgutil.iter_modules(esegeta.adapters.__path__)]
    for name in names:
        library = importlib.import_module(f"esegeta.adapters.{name}").LIBRARY
        assert registry.libraries()[library.name] is library
    assert {spec.library.name for spec in registry.all_methods().values()} == set(registry.libraries())


def test_every_library_extra_is_in_pyproject():
    """A new library is its adapter module plus its extra: the extra (and 'all') must install it."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for library in registry.libraries().values():
        if library.extra:
            assert library.extra in extras, library.name
            if library.distribution:
                assert any(library.distribution in r for r in extras[library.extra]), library.name


def test_adapter_modules_import_neither_torch_nor_their_library_at_module_level():
    for found in pkgutil.iter_modules(esegeta.adapters.__path__):
        tree = ast.parse((ROOT / "esegeta" / "adapters" / f"{found.name}.py").read_text())
        for node in (n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            if isinstance(node, ast.ImportFrom) and (node.level or names[0].split(".")[0] == "esegeta"):
                continue  # esegeta's own modules (the library id "esegeta" names its own methods, no upstream)
            assert not any(n.split(".")[0] in ("torch", "numpy", *registry.libraries()) for n in names), found.name


def test_spec_facts_moved_from_side_tables():
    methods = registry.all_methods()
    assert {i for i, s in methods.items() if s.exclusive} == {
        "torchray.deconvnet", "torchray.guided_backprop", "torchray.excitation_backprop",
        "torchray.contrastive_excitation_backprop"}
    assert methods["captum.GradientShap"].uses_global_rng and not methods["captum.Saliency"].uses_global_rng
    assert methods["gradcam.RandomCAM"].uses_global_rng and not methods["gradcam.GradCAM"].uses_global_rng
    assert methods["captum.LRP"].preflight is not None and methods["captum.Saliency"].preflight is None
    assert [i for i, s in methods.items() if s.noise_tunnel is not None] == [
        i for i in methods if i.startswith("captum.")]


def test_from_python_writes_values_as_a_config_would():
    """explain's values in Python's forms (tuples, NumPy and torch scalars) as JSON writes them; what
    JSON cannot hold (tensors, callables, a tuple holding a tensor) is kept, and the caller's
    containers are not changed."""
    import numpy as np
    import torch

    from esegeta.spec.values import from_python

    given = {"window": (np.int64(1), 3, torch.tensor(3)), "nested": [(1, 2), {"a": np.float32(0.5)}],
             "flag": np.bool_(True), "size": torch.Size([2, 2])}
    assert from_python(given) == {"window": [1, 3, 3], "nested": [[1, 2], {"a": 0.5}], "flag": True, "size": [2, 2]}
    assert type(from_python(given)["window"][0]) is int and type(from_python(np.array(2.5))) is float
    assert given["window"][0].dtype == np.int64 and isinstance(given["nested"][0], tuple)
    mask = torch.ones(1, 8, 8)
    assert from_python(mask) is mask and from_python(np.ones(3)).shape == (3,)
    kept = from_python((mask, 0.0))
    assert isinstance(kept, tuple) and kept[0] is mask
    assert from_python(print) is print and from_python("32") == "32"
