"""Global patch mode: peak memory ÷ one patch's peak, and seconds per patch, as the volume grows.

Each measurement runs in a fresh subprocess (glibc's ``MALLOC_MMAP_THRESHOLD_`` fixed at 64 KiB,
so that the resident set follows the live tensors). ``patch``: the method on one patch-sized input,
unpatched (the reference peak ``P``). ``global``: the method on the whole volume in global patch
mode (patches of ``--patch``, overlap 0: torchio still overlaps the last patch of an axis the
patch does not divide, ``patch.batch_size`` ``--patch-batch``). Memory is the
growth of the process's peak resident set (``ru_maxrss``) over the peak after imports, model load,
the input volume, a forward pass on one patch and a warm-up call of the method on a 16³ crop; on CUDA (``--device cuda``)
``torch.cuda.max_memory_allocated`` over the same baseline. The ratio printed is
``(global growth − result volume) ÷ P``: the issue's target is ≤ 1.5 (the input is in the
baseline, the result is subtracted). Beside it, ``esegeta check``'s predicted peak of the global
call (:func:`esegeta.run.check.planned_peak`, computed after the measurement) against the
measured growth plus the input. ``--model tiny`` is a three-layer 3D convolutional segmenter,
``micro`` a two-layer one (a tenth of the compute: a 512×512×300 volume on a loaded CPU), ``tissue``
the sample TissueUNet3D. A patch that tiles the volume (``--patch 64x64x60`` for 512×512×300)
keeps global mode's masks per patch; one that does not (64³ on 300 slices: torchio shifts the last
patch back, overlapping its neighbour) freezes them on the stitched output.

    python benchmarks/patch_memory.py --sizes 128 256 --steps 4 --methods saliency ig smoothgrad occlusion
    python benchmarks/patch_memory.py --model micro --patch 64x64x60 --sizes 512x512x300 --methods saliency ig
    python benchmarks/patch_memory.py --steps 4 --sizes 128 256 --methods deeplift lrp
    python benchmarks/patch_memory.py --sizes 128 256 --methods zennit-epsilonplus zennit-epsilongammabox
    python benchmarks/patch_memory.py --esegeta /tmp/base   # the same on another checkout of esegeta (before/after)
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: method name → (id, keyword arguments of esegeta.explain)
METHODS = {
    "ig": ("captum.IntegratedGradients", {"n_steps": 16, "internal_batch_size": 4}),
    "saliency": ("captum.Saliency", {}),
    "inputxgradient": ("captum.InputXGradient", {}),
    "smoothgrad": ("captum.Saliency", {"noise_tunnel": {"nt_type": "smoothgrad", "nt_samples": 4, "stdevs": 0.1}}),
    "deeplift": ("captum.DeepLift", {}),
    "lrp": ("captum.LRP", {}),
    "zennit-epsilonplus": ("zennit.EpsilonPlus", {}),
    "zennit-epsilongammabox": ("zennit.EpsilonGammaBox", {}),
    "zennit-epsilonalpha2beta1": ("zennit.EpsilonAlpha2Beta1", {}),
    "occlusion": ("captum.Occlusion", {"sliding_window_shapes": (1, 32, 32, 32), "strides": (1, 32, 32, 32),
                                       "perturbations_per_eval": 2}),
}


def _shape(text: str) -> tuple[int, int, int]:
    parts = [int(p) for p in text.lower().split("x")]
    return tuple(parts * 3 if len(parts) == 1 else parts)


def _peak(device: str) -> float:
    """Peak bytes so far: CUDA allocator's, or the process's resident set (Linux: KiB)."""
    import torch

    if device == "cuda":
        return float(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0


def tiny_segmenter():
    """Three 3×3×3 convolutions, 8 channels, 2 classes: a small 3D segmenter."""
    from torch import nn

    return nn.Sequential(nn.Conv3d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv3d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.Conv3d(8, 2, 3, padding=1))


def micro_segmenter():
    """One 3×3×3 convolution to 8 channels and a 1×1×1 one to 2 classes: about a tenth of the tiny
    segmenter's compute, to measure a 512×512×300 volume on a loaded CPU."""
    from torch import nn

    return nn.Sequential(nn.Conv3d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv3d(8, 2, 1))


def measure(case: str, method: str, shape: tuple[int, int, int], model_name: str, patch: tuple[int, int, int],
            patch_batch: int,
            device: str, threads: int, steps: int, internal_batch_size: int) -> dict:
    import torch
    import torchio  # noqa: F401  (~120 MiB resident: the patcher imports it; in every baseline)

    sys.path.insert(0, os.environ.get("ESEGETA_CHECKOUT", str(ROOT)))  # the checkout measured (--esegeta)
    import esegeta

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    if model_name == "tissue":
        from samples.models import TissueUNet3D

        model = TissueUNet3D()
        model.load_state_dict(torch.load(ROOT / "samples/checkpoints/tissue_unet3d.pt", weights_only=True))
        wrapper = {"name": "multiclass", "activation": "softmax"}
    else:
        model = tiny_segmenter() if model_name == "tiny" else micro_segmenter()
        wrapper = {"name": "multiclass", "activation": "softmax"}
    model = model.eval().to(device)
    side = patch if case == "patch" else shape
    x = torch.randn(1, 1, 8, 8, 8, device=device)
    x = torch.nn.functional.interpolate(x, size=side, mode="trilinear", align_corners=False)
    with torch.no_grad():
        model(x[..., :patch[0], :patch[1], :patch[2]])
    method_id, kwargs = METHODS[method]
    kwargs = dict(kwargs)
    if method == "ig":
        kwargs.update(n_steps=steps, internal_batch_size=internal_batch_size)
    # warm-up: the same call on a 16³ crop (global: in 8³ patches), so that what the first call
    # imports and caches (libraries, the registry) is in the baseline, not in the growth
    small = {**kwargs, **({"patch": {"size": [8, 8, 8], "mode": "global"}} if case == "global" else {}),
             **({"sliding_window_shapes": (1, 8, 8, 8), "strides": (1, 8, 8, 8)} if method == "occlusion" else {})}
    esegeta.explain(model, x[..., :16, :16, :16], method_id, 1, wrapper=wrapper, **small)
    if case == "global":
        kwargs["patch"] = {"size": list(patch), "overlap": [0, 0, 0], "mode": "global", "batch_size": patch_batch}
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    baseline = _peak(device)
    start = time.perf_counter()
    attr = esegeta.explain(model, x, method_id, 1, wrapper=wrapper, **kwargs)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    growth = _peak(device) - baseline
    n_patches = 1 if case == "patch" else len(esegeta_grid(shape, patch))
    predicted = predicted_peak(model, x, patch, method_id, wrapper, kwargs) if case == "global" else None
    return {"case": case, "method": method, "shape": list(side), "seconds": round(seconds, 2),
            "seconds_per_patch": round(seconds / n_patches, 3), "patches": n_patches,
            "growth_mib": round(growth / 2**20, 1), "result_mib": round(attr.numel() * 4 / 2**20, 1),
            "input_mib": round(x.numel() * 4 / 2**20, 1), "predicted_mib": predicted,
            "finite": bool(torch.isfinite(attr).all())}


def predicted_peak(model, x, patch: tuple[int, int, int], method_id: str, wrapper: dict, kwargs: dict) -> float | None:
    """``esegeta check``'s estimate of the global call's peak (MiB; input and weights included):
    its forward pass on one patch, then :func:`esegeta.run.check.planned_peak`. None where this
    checkout's check has no such estimate."""
    import math

    try:
        from esegeta.attribution.prepare import prepared
        from esegeta.run.check import _forward_pass, planned_peak
        from esegeta.spec.params import effective_batch
        from esegeta.spec.request import from_arguments
    except ImportError:
        return None
    kwargs = dict(kwargs)
    patch_config, noise_tunnel = kwargs.pop("patch"), kwargs.pop("noise_tunnel", None)
    request = from_arguments(method_id, target=1, wrapper=wrapper, patch=patch_config, noise_tunnel=noise_tunnel,
                             params=kwargs)
    probe = x[..., :patch[0], :patch[1], :patch[2]]
    forward = _forward_pass(prepared(model, probe), probe)
    forward.voxels = math.prod(probe.shape[2:])
    batch = effective_batch(request.spec, dict(request.params), request.noise_tunnel)
    try:
        peak = planned_peak(forward, x, batch, request.patch, request=request)
    except TypeError:  # a checkout before streamed methods
        peak = planned_peak(forward, x, batch, request.patch)
    return round(peak / 2**20, 1)


def esegeta_grid(shape: tuple[int, int, int], patch: tuple[int, int, int]):
    from esegeta.attribution.patcher import Grid

    return Grid.over(shape, list(patch), None, "average").locations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["128", "256", "512x512x300"])
    parser.add_argument("--methods", nargs="+", default=["ig"], choices=sorted(METHODS))
    parser.add_argument("--model", choices=("tiny", "micro", "tissue"), default="tiny")
    parser.add_argument("--patch", default="64", help="patch size: 64 (a cube) or 64x64x60")
    parser.add_argument("--patch-batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=16, help="Integrated Gradients' n_steps")
    parser.add_argument("--internal-batch-size", type=int, default=4, help="Integrated Gradients' internal batch")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--esegeta", type=Path, default=ROOT, help="the checkout of esegeta to measure")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        case, method, size = args.measure.split(":")
        print(json.dumps(measure(case, method, _shape(size), args.model, _shape(args.patch), args.patch_batch, args.device,
                                 args.threads, args.steps, args.internal_batch_size)))
        return
    # glibc's malloc raises its mmap threshold after a large free, then serves large tensors from
    # the heap, whose freed pages stay resident: the peak RSS then counts memory no tensor holds.
    # A fixed threshold maps every tensor over 64 KiB on its own, so RSS follows the live tensors.
    env = {"PYTHONPATH": str(args.esegeta.resolve()), "ESEGETA_CHECKOUT": str(args.esegeta.resolve()),
           "PATH": "/usr/bin:/bin", "MALLOC_MMAP_THRESHOLD_": "65536"}
    common = ["--model", args.model, "--patch", str(args.patch), "--patch-batch", str(args.patch_batch),
              "--device", args.device, "--threads", str(args.threads), "--steps", str(args.steps),
              "--internal-batch-size", str(args.internal_batch_size)]
    print(f"esegeta at {args.esegeta}; model {args.model}; patch {args.patch}, patch batch {args.patch_batch}; "
          f"{args.device}; IG n_steps {args.steps}, internal_batch_size {args.internal_batch_size}")
    print("method | volume | one patch: MiB, s | global: MiB growth (result MiB), s, s/patch | ratio | "
          "check's predicted peak vs measured growth + input, MiB")
    for method in args.methods:
        one = None
        for size in args.sizes:
            rows = {}
            for case in ("patch", "global") if one is None else ("global",):
                out = subprocess.run([sys.executable, __file__, "--measure", f"{case}:{method}:{size}", *common],
                                     capture_output=True, text=True, cwd=ROOT, env=env)
                if out.returncode:
                    print(f"{method} {size} {case}: failed\n{out.stderr[-2000:]}", flush=True)
                    break
                rows[case] = json.loads(out.stdout.strip().splitlines()[-1])
            one = rows.get("patch", one)
            if "global" not in rows or one is None:
                continue
            g = rows["global"]
            ratio = (g["growth_mib"] - g["result_mib"]) / max(one["growth_mib"], 1e-9)
            predicted = "—" if g.get("predicted_mib") is None else f"{g['predicted_mib']:.0f}"
            print(f"{method} | {size} | {one['growth_mib']:.0f}, {one['seconds']:.2f} | {g['growth_mib']:.0f} "
                  f"({g['result_mib']:.0f}), {g['seconds']:.1f}, {g['seconds_per_patch']:.3f} | {ratio:.2f} | "
                  f"{predicted} vs {g['growth_mib'] + g['input_mib']:.0f}", flush=True)


if __name__ == "__main__":
    main()
