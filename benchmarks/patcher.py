"""Peak memory and time of patch-wise Integrated Gradients in global mode.

Integrated Gradients (``n_steps`` 32) on the sample 3D U-Net (TissueUNet3D, multiclass
softmax wrapper, target 2), on a volume ``scale`` times the patch size per axis explained in
global mode (patches of ``patch``³, no overlap), against the same call on a single patch-sized
input (no patching), and with ``--whole`` on the whole volume without patching. Each
measurement runs in a fresh subprocess and reads the process's peak resident memory
(``resource.getrusage(...).ru_maxrss``: tracemalloc does not see torch's CPU allocations);
``baseline`` is the peak after imports (torchio included, which the patcher needs: about
120 MiB), model load and a warm-up forward on a patch, so ``peak - baseline`` is what the run
itself added.

    python benchmarks/patcher.py [--patch 16] [--scale 4] [--steps 32] [--internal-batch-size 32 4 1]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def measure(case: str, patch: int, scale: int, steps: int, internal_batch_size: int, threads: int) -> dict:
    """One measurement, in this process (run by :func:`main` in a subprocess)."""
    import nibabel as nib
    import numpy as np
    import torch
    import torchio  # noqa: F401  (~120 MiB resident once imported: in both baselines, not in the global run's share)

    sys.path.insert(0, str(ROOT))
    import esegeta
    from samples.models import TissueUNet3D

    torch.set_num_threads(threads)
    model = TissueUNet3D()
    model.load_state_dict(torch.load(ROOT / "samples/checkpoints/tissue_unet3d.pt", weights_only=True))
    model.eval()
    volume = np.asarray(nib.load(str(ROOT / "samples/data/anatomical.nii.gz")).dataobj, dtype=np.float32)
    volume = torch.from_numpy((volume - volume.mean()) / volume.std())[None, None]
    side = patch * (1 if case == "patch" else scale)
    x = torch.nn.functional.interpolate(volume, size=(side,) * 3, mode="trilinear", align_corners=False)
    wrapper = {"name": "multiclass", "activation": "softmax"}
    with torch.no_grad():
        model(x[..., :patch, :patch, :patch])
    baseline = _peak_mib()
    kwargs = {"n_steps": steps, "internal_batch_size": internal_batch_size}
    if case == "global":
        kwargs["patch"] = {"size": [patch] * 3, "overlap": [0, 0, 0], "mode": "global", "batch_size": 1}
    start = time.perf_counter()
    attr = esegeta.explain(model, x, "captum.IntegratedGradients", 2, wrapper=wrapper, **kwargs)
    seconds = time.perf_counter() - start
    peak = _peak_mib()
    return {"case": case, "shape": list(x.shape[2:]), "internal_batch_size": internal_batch_size,
            "seconds": round(seconds, 2), "baseline_mib": round(baseline, 1), "peak_mib": round(peak, 1),
            "run_mib": round(peak - baseline, 1), "finite": bool(torch.isfinite(attr).all())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patch", type=int, default=16)
    parser.add_argument("--scale", type=int, default=4)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--internal-batch-size", type=int, nargs="+", default=[32, 4, 1])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--whole", action="store_true", help="also the whole volume without patching")
    parser.add_argument("--measure", choices=("patch", "global", "whole"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        ibs = args.internal_batch_size[0]
        print(json.dumps(measure(args.measure, args.patch, args.scale, args.steps, ibs, args.threads)))
        return
    rows = []
    for ibs in args.internal_batch_size:
        pair = {}
        for case in ("patch", "global") + (("whole",) if args.whole else ()):
            command = [sys.executable, __file__, "--measure", case, "--patch", str(args.patch), "--scale",
                       str(args.scale), "--steps", str(args.steps), "--internal-batch-size", str(ibs),
                       "--threads", str(args.threads)]
            out = subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT).stdout
            pair[case] = json.loads(out.strip().splitlines()[-1])
            print(json.dumps(pair[case]), flush=True)
        rows.append((ibs, pair))
    print(f"\nIntegrated Gradients, {args.steps} steps, patch {args.patch}^3, volume {args.patch * args.scale}^3 "
          "(global mode) vs one patch")
    print("internal_batch_size | one patch: peak MiB (run MiB), s | global: peak MiB (run MiB), s | peak ratio")
    for ibs, pair in rows:
        p, g = pair["patch"], pair["global"]
        print(f"{ibs:>19} | {p['peak_mib']:>8.0f} ({p['run_mib']:>6.0f}), {p['seconds']:>6.2f} | "
              f"{g['peak_mib']:>8.0f} ({g['run_mib']:>6.0f}), {g['seconds']:>7.2f} | {g['peak_mib'] / p['peak_mib']:.2f}"
              + (f" | unpatched whole volume: {pair['whole']['peak_mib']:.0f} MiB, {pair['whole']['seconds']:.2f} s"
                 if "whole" in pair else ""))


if __name__ == "__main__":
    main()
