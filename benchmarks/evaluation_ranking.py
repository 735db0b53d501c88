"""Ranking tables of a sample config's methods: every metric group on the user's own model.

Runs ``configs/<sample>.json`` (its methods as configured; only ``.npy`` outputs) with the
evaluation block below, or, with ``--reuse``, evaluates the saved attributions of an earlier
run of this script (``esegeta evaluate``: no attribution recomputed). Prints the ranking and
the Kendall τ matrix (``evaluation_ranking.md``) and the time of each stage; the output
folder holds ``evaluation.csv``, ``evaluation_ranking.csv``, ``evaluation_agreement.csv``
and ``evaluation_curves.npz``.

Settings are kept cheap for a 2-core CPU: one re-explanation per method and randomisation
metric (``efficient_mprt``, ``random_logit``), three noisy re-explanations for
``max_sensitivity``, and the slow sampling methods (LIME, Shapley value sampling, KernelSHAP:
5-10 s a map here) left out of the re-explaining metrics. Localisation compares each map with the
wrapper's frozen mask of the target (the model's own predicted region).

    python benchmarks/evaluation_ranking.py retina         # configs/retina.json (the demo)
    python benchmarks/evaluation_ranking.py anatomical3d   # configs/anatomical3d.json
    python benchmarks/evaluation_ranking.py retina --reuse # re-score the saved maps only
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: Methods too slow to re-explain on these CPUs: scored by every metric that does not re-explain.
SLOW = ("lime.LimeImageExplainer", "captum.ShapleyValueSampling", "captum.KernelShap")
REEXPLAINING = ("efficient_mprt", "random_logit", "max_sensitivity")


def evaluation_block(config: dict) -> dict:
    """The evaluation block for a sample config (sizes from its dimensionality)."""
    three_d = config["inputs"]["spatial_dims"] == 3
    metrics = [
        {"id": "deletion", "params": {"steps": 20}},
        {"id": "insertion", "params": {"steps": 20}},
        {"id": "road", "params": {"percentages": [10, 30, 50, 70, 90], "tol": 1e-4, "max_iter": 300}},
        {"id": "faithfulness_correlation", "params": {"nr_runs": 50, "subset_size": 512 if three_d else 256}},
        {"id": "pixel_flipping", "params": {"features_in_step": 1024 if three_d else 256}},
        {"id": "infidelity", "params": {"n_perturbations": 16}},
        {"id": "efficient_mprt"},
        {"id": "random_logit"},
        {"id": "pointing_game"},
        {"id": "relevance_mass_accuracy"},
        {"id": "relevance_rank_accuracy"},
        {"id": "top_k_intersection", "params": {"k": 1000 if three_d else 500}},
        {"id": "max_sensitivity", "params": {"nr_samples": 3}},
        {"id": "sparseness"},
        {"id": "complexity"},
    ]
    labels = [m.get("label") or m["id"] for m in config["methods"] if m["id"] in SLOW]
    overrides = {label: {metric: False for metric in REEXPLAINING} for label in labels}
    return {"metrics": metrics, "overrides": overrides, "max_batch": 16 if three_d else 32, "seed": 0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sample", help="a config of configs/ without .json (retina, anatomical3d, digits)")
    parser.add_argument("--output", type=Path, help="output folder (default: results/evaluation/<sample>)")
    parser.add_argument("--reuse", action="store_true", help="evaluate the saved maps of an earlier run only")
    parser.add_argument("--only", nargs="+", help="only these method ids or labels")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import logging
    import os

    os.environ.setdefault("TQDM_DISABLE", "1")  # upstream progress bars (LIME) off, as the CLI does

    import esegeta
    from esegeta.run.runner import evaluate_run

    logging.basicConfig(level=logging.WARNING)
    path = ROOT / "configs" / f"{args.sample}.json"
    config = json.loads(path.read_text())
    config.pop("$schema", None)
    out = (args.output or ROOT / "results" / "evaluation" / args.sample).resolve()
    config["output"] = {**config.get("output", {}), "dir": str(out), "formats": ["npy"]}
    config["evaluation"] = evaluation_block(config)
    if args.only:
        config["methods"] = [m for m in config["methods"] if {m["id"], m.get("label")} & set(args.only)]
        config["evaluation"]["overrides"] = {k: v for k, v in config["evaluation"]["overrides"].items()
                                             if any(k in (m["id"], m.get("label")) for m in config["methods"])}
    start = time.perf_counter()
    if args.reuse:
        section = evaluate_run(config, base_dir=path.parent)
        attribution_seconds = 0.0
    else:
        result = esegeta.Pipeline(config, base_dir=path.parent).run()
        section = result.manifest.get("evaluation")
        if section is None:
            print("evaluation failed: see", out / "esegeta.log")
            return 1
        attribution_seconds = sum(r["seconds"] or 0.0 for r in result.runs)
    total = time.perf_counter() - start
    print((out / section["files"]["table"]).read_text())
    failed = [r for r in section["values"] if r.get("error")]
    print(f"{args.sample}: {len({r['label'] for r in section['values']})} methods x "
          f"{len({r['input'] for r in section['values']})} input(s) x {len(section['metrics'])} metrics; "
          f"attributions {attribution_seconds:.1f} s, evaluation {section['seconds']:.1f} s, total {total:.1f} s; "
          f"{len(failed)} failed value(s); files in {out}")
    for r in failed[:10]:
        print(f"  failed: {r['metric']} on {r['label']} ({r['input']}): {r['error'][:160]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
