"""Wall time of every method on the 2D segmentation sample, with default parameters.

The sample: VesselUNet2D on the full 128×128 held-out retina crop, threshold wrapper
(sigmoid, 0.5), target 1 (the vessel score), layer ``enc2`` (``enc2.3`` where a method
needs a leaf). Parameters are upstream's defaults plus the few esegeta fills where upstream
has none (``esegeta methods --json`` lists them); neuron methods get the most active neuron
of the layer; Lucent gets the class objective (it has no default). The prepared model copy is
made by a warm-up call and the method's library imported before the clock starts;
the rule-map composites get an all-ε map. Each method runs in a fresh process (imports excluded from the time, one
warm-up-free call) under a wall-clock limit; a method over it is reported as ``> limit``.

    python benchmarks/method_times.py [--limit 60] [--only ID ...] > times.md
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, sys, time
sys.path[:0] = [{root!r}, {tests!r}]
import numpy as np, torch
import esegeta
from esegeta import registry
from conftest import retina_case

case = retina_case(size=128)
spec = registry.get({method!r})
layer = case.layer_for(spec)
params = dict({required!r}.get(spec.id, {{}}))
if spec.kind == "neuron":
    seen = []
    h = case.model.get_submodule(layer).register_forward_hook(lambda m, i, o: seen.append(o[0]))
    with torch.no_grad():
        case.model(case.x)
    h.remove()
    params["neuron_selector"] = [int(i) for i in torch.unravel_index(seen[0].argmax(), seen[0].shape)]
# warm-up: the prepared copy (cached per model), torch's first autograd call and importing the
# method's library (grad-cam takes ~3 s) are not the method's cost
esegeta.explain(case.model, case.x, "captum.Saliency", target=case.target, wrapper=case.wrapper)
import importlib
spec.adapter.parameters(spec)
for module in spec.requires:
    importlib.import_module(module)
torch.manual_seed(0); np.random.seed(0)
start = time.perf_counter()
attr = esegeta.explain(case.model, case.x, spec.id, target=case.target if spec.needs_target else None,
                       wrapper=case.wrapper, layer=layer, **params)
print(json.dumps({{"seconds": time.perf_counter() - start, "shape": list(attr.shape)}}))
"""


#: Parameters upstream requires and esegeta cannot choose for the user.
_EPSILON = {"layer_map": {"types.Linear": "epsilon", "Activation": "pass"}}
REQUIRED = {"lucent.render_vis": {"objective": "class"}, "zennit.LayerMapComposite": _EPSILON,
            "zennit.SpecialFirstLayerMapComposite": {**_EPSILON, "first_map": {"types.Linear": "zbox"}}}


def run_one(method: str, limit: float) -> dict:
    code = CHILD.format(root=str(ROOT), tests=str(ROOT / "tests"), method=method, required=REQUIRED)
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=limit + 30)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "wall": time.perf_counter() - start}
    if proc.returncode != 0:
        lines = [x for x in proc.stderr.strip().splitlines() if x.strip()]
        return {"status": "failed", "error": lines[-1] if lines else f"exit {proc.returncode}"}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"status": "ok", **result}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--limit", type=float, default=60.0, help="seconds per method (plus 30 s for imports)")
    parser.add_argument("--only", nargs="*")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from esegeta.spec import registry

    methods = [s for s in registry.all_methods().values() if 2 in s.dims and "segmentation" in s.tasks]
    if args.only:
        methods = [s for s in methods if s.id in args.only]
    print("| method | seconds | note |\n|---|---|---|", flush=True)
    for spec in methods:
        r = run_one(spec.id, args.limit)
        if r["status"] == "ok":
            print(f"| {spec.id} | {r['seconds']:.2f} | |", flush=True)
        elif r["status"] == "timeout":
            print(f"| {spec.id} | > {args.limit:.0f} | stopped at the limit |", flush=True)
        else:
            print(f"| {spec.id} | - | failed: {r['error'][:120]} |", flush=True)


if __name__ == "__main__":
    main()
