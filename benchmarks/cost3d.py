"""The 3D cost table: model passes, peak memory and seconds per method on a MONAI UNet, CPU (or CUDA).

The model is MONAI's ``UNet`` at its usual depth (``spatial_dims=3``, 4 input channels as BraTS's MR
sequences, 3 classes, ``channels=(16, 32, 64, 128, 256)``, ``strides=(2, 2, 2, 2)``,
``num_res_units=2``), freshly initialised (seed 0: cost does not depend on the weights), wrapped by
esegeta's ``multiclass`` wrapper (softmax, target column 1). Volumes: 96³ explained whole, and a
BraTS-sized 240×240×155 volume in global patch mode (``--big-patch``³ patches, no overlap): the whole
volume at once needs about 10× the 96³ memory (above the ~4 GB this machine can lend one benchmark).

Per (method, volume), in a fresh subprocess:

- **passes**: the forward and backward rows :mod:`esegeta.spec.cost` predicts (plus the run's score
  rows, as ``esegeta.run.progress`` adds them), and those counted during the call: a counting
  module around the network adds every forward batch's rows, and a gradient hook on its output every
  backward batch's rows (in global patch mode the method's rows are whole-volume rows, each computed
  patch by patch: the counted rows are patches);
- **memory**: the growth of the process's peak resident set (``ru_maxrss``) over the peak after
  imports, model, input and a warm-up forward; on CUDA ``torch.cuda.max_memory_allocated`` over the
  same baseline. PyTorch keeps no peak counter for its CPU allocator (``torch.cuda.memory_stats`` has
  no CPU twin), so on the CPU the resident set is the number;
- **seconds**: wall time of the ``esegeta.explain`` call, and the CPU seconds the process spent in it
  (user + system; with one thread, the wall time a quiet machine would show).

Few steps on purpose (IG 8 steps, SmoothGrad 4 samples; see :data:`METHODS`). Methods too slow for
the big volume on a CPU (``--big-methods`` chooses those measured) are *predicted* there: seconds =
the measured big-volume Saliency seconds per weighted row × the method's weighted rows per patch
(forward + 2 × backward, :data:`esegeta.spec.cost.BACKWARD_COST`; in global mode each whole-volume
row runs patch by patch); their memory is not predicted. The table says which numbers are predicted.

    nice -n 10 python benchmarks/cost3d.py                       # the README's table (~35 min on a loaded 2-core machine)
    python benchmarks/cost3d.py --methods saliency ig --sizes 96  # a subset
    python benchmarks/cost3d.py --device cuda --big-methods all  # on a GPU: every row measured
    python benchmarks/cost3d.py --reuse benchmarks/cost3d.json --big-methods saliency smoothgrad  # add rows

Writes ``benchmarks/cost3d.json`` (every row, measured and predicted) and prints a Markdown table.
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
JSON_PATH = ROOT / "benchmarks" / "cost3d.json"
SIZES = {"96": (96, 96, 96), "brats": (240, 240, 155)}
GRADCAM_LAYER = "net.model.1.submodule.2"  # the last decoder block before the output (16 channels, ½ resolution)

#: name → (table label, method id, esegeta.explain keyword arguments)
METHODS = {
    "saliency": ("Saliency", "captum.Saliency", {}),
    "ig": ("Integrated Gradients (8 steps)", "captum.IntegratedGradients", {"n_steps": 8, "internal_batch_size": 2}),
    "deeplift": ("DeepLIFT", "captum.DeepLift", {}),
    "smoothgrad": ("SmoothGrad (NoiseTunnel, 4 samples)", "captum.Saliency",
                   {"noise_tunnel": {"nt_type": "smoothgrad", "nt_samples": 4, "nt_samples_batch_size": 1,
                                     "stdevs": 0.1}}),
    "occlusion": ("Occlusion (32³ windows, stride 32)", "captum.Occlusion",
                  {"sliding_window_shapes": (4, 32, 32, 32), "strides": (4, 32, 32, 32), "perturbations_per_eval": 2}),
    "lrp": ("LRP (zennit EpsilonPlus)", "zennit.EpsilonPlus", {}),
    "gradcam": ("GradCAM (captum LayerGradCam)", "captum.LayerGradCam", {"layer": GRADCAM_LAYER}),
    "monai_occlusion": ("MONAI OcclusionSensitivity (mask 32, overlap 0)", "monai.OcclusionSensitivity",
                        {"mask_size": 32, "overlap": 0.0, "n_batch": 2}),
}
#: Measured on the big volume by default (the others predicted from their pass counts; see the docstring).
BIG_MEASURED = ("saliency", "lrp")
COUNT = {"forward": 0, "backward": 0}


def unet():
    """MONAI's UNet at its usual depth, inside a module that counts the rows it computes."""
    import torch
    from monai.networks.nets import UNet
    from torch import nn

    class Counted(nn.Module):
        """``net`` with every forward row and every backward row counted in :data:`COUNT`."""

        def __init__(self, net: nn.Module):
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            COUNT["forward"] += x.shape[0]
            y = self.net(x)
            if y.requires_grad:
                y.register_hook(lambda g: COUNT.__setitem__("backward", COUNT["backward"] + g.shape[0]))
            return y

    torch.manual_seed(0)
    return Counted(UNet(spatial_dims=3, in_channels=4, out_channels=3, channels=(16, 32, 64, 128, 256),
                        strides=(2, 2, 2, 2), num_res_units=2))


def _cpu_seconds() -> float:
    """CPU seconds this process has used (user + system): on a shared machine, wall time includes waiting."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _peak(device: str) -> float:
    import torch

    if device == "cuda":
        return float(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0  # Linux: KiB


def measure(method: str, size: str, big_patch: int, device: str, threads: int, patch_batch: int = 4) -> dict:
    """One (method, volume) in this process: passes predicted and counted, peak memory growth, seconds."""
    import torch
    import torchio  # noqa: F401  (the patcher imports it: in every baseline)

    sys.path.insert(0, str(ROOT))
    import esegeta

    torch.set_num_threads(threads)
    model = unet().eval().to(device)
    shape = SIZES[size]
    x = torch.randn(1, 4, *shape, device=device)
    warm = x[..., :32, :32, :32]
    with torch.no_grad():
        model(warm)
    label, method_id, kwargs = METHODS[method]
    kwargs = dict(kwargs)
    patch = None
    if size != "96":
        patch = {"size": [big_patch] * 3, "overlap": [0, 0, 0], "mode": "global", "batch_size": patch_batch}
        kwargs["patch"] = patch
    wrapper = {"name": "multiclass", "activation": "softmax"}
    layer = kwargs.pop("layer", None)
    noise_tunnel = kwargs.pop("noise_tunnel", None)
    predicted = predicted_passes(method, shape)  # global mode: rows of the whole volume, each run patch by patch
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    baseline = _peak(device)
    COUNT.update(forward=0, backward=0)
    cpu = _cpu_seconds()
    start = time.perf_counter()
    attr = esegeta.explain(model, x, method_id, 1, wrapper=wrapper, layer=layer, noise_tunnel=noise_tunnel, **kwargs)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    cpu = _cpu_seconds() - cpu
    growth = _peak(device) - baseline
    patches = 1 if patch is None else patch_count(shape, big_patch)
    return {"method": method, "label": label, "id": method_id, "size": size, "shape": list(shape),
            "mode": "whole" if patch is None else f"global patches {big_patch}³ ({patches}, batch {patch_batch})",
            "patches": patches,
            "measured": True, "device": device, "threads": threads,
            "predicted_passes": predicted,
            "counted_passes": dict(COUNT), "seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2),
            "peak_growth_mib": round(growth / 2**20, 1),
            "result_shape": list(attr.shape), "finite": bool(torch.isfinite(attr).all())}


def predicted_passes(method: str, shape) -> dict:
    """The rows :mod:`esegeta.spec.cost` predicts for ``method`` on one 4-channel input of ``shape`` (a
    whole volume, or one patch in global mode), and with the run's score rows (``esegeta.run.progress``)."""
    import torch

    sys.path.insert(0, str(ROOT))
    from esegeta.run import progress
    from esegeta.spec import cost
    from esegeta.spec.request import from_arguments

    _, method_id, kwargs = METHODS[method]
    kwargs = dict(kwargs)
    layer, noise_tunnel = kwargs.pop("layer", None), kwargs.pop("noise_tunnel", None)
    request = from_arguments(method_id, target=1, wrapper={"name": "multiclass", "activation": "softmax"},
                             layer=layer, noise_tunnel=noise_tunnel, params=kwargs)
    x = torch.empty(1, 4, *shape, device="meta")  # only its shape is read
    rows = cost.expected_passes(request.spec, request.params, x, noise_tunnel=noise_tunnel)
    return {"forward": rows.forward, "backward": rows.backward, "forward_with_scores": progress.expected_passes(request, x),
            "exact": rows.exact, "note": rows.note}


def patch_count(shape, patch: int) -> int:
    sys.path.insert(0, str(ROOT))
    from esegeta.attribution.patcher import Grid

    return len(Grid.over(tuple(shape), [patch] * 3, None, "average").locations)


def global_refusal(method: str) -> str | None:
    """Why esegeta refuses ``method`` in global patch mode (the big volume's mode), or None."""
    sys.path.insert(0, str(ROOT))
    from esegeta.attribution.patcher import check_global
    from esegeta.errors import ConfigError
    from esegeta.spec import registry

    try:
        check_global(registry.get(METHODS[method][1]), {"name": "multiclass"})
    except ConfigError as exc:
        return f"refused in global patch mode: {exc.message}"
    return None


def predicted_big(row96: dict, saliency_big: dict) -> dict:
    """A big-volume row's seconds predicted from the method's rows per patch (:func:`predicted_passes`) and
    the measured big-volume Saliency row's seconds per row; its memory is not predicted."""
    from esegeta.spec.cost import BACKWARD_COST

    def weight(passes: dict) -> float:
        return (passes["forward_with_scores"] or passes["forward"] or 0) + BACKWARD_COST * (passes["backward"] or 0)

    per_unit = saliency_big["seconds"] / weight(saliency_big["predicted_passes"])
    cpu_unit = saliency_big["cpu_seconds"] / weight(saliency_big["predicted_passes"])
    passes = predicted_passes(row96["method"], tuple(saliency_big["shape"]))
    return {**{k: row96[k] for k in ("method", "label", "id", "device", "threads")},
            "size": saliency_big["size"], "shape": saliency_big["shape"], "mode": saliency_big["mode"],
            "patches": saliency_big["patches"], "measured": False,
            "predicted_passes": passes, "counted_passes": None,
            "seconds": round(per_unit * weight(passes), 1), "cpu_seconds": round(cpu_unit * weight(passes), 1),
            "peak_growth_mib": None,
            "basis": "seconds: the measured big-volume Saliency row's seconds per weighted whole-volume row "
                     "(forward + 2 x backward; in global mode each row runs patch by patch) x this method's weighted "
                     "rows; memory: not predicted"}


def markdown(rows: list[dict]) -> str:
    def passes(r: dict) -> str:
        p, c = r["predicted_passes"], r["counted_passes"]
        text = f"{p['forward_with_scores'] or p['forward']} F + {p['backward']} B"
        if c is not None:
            text += f" / {c['forward']} F + {c['backward']} B"
            if r["patches"] > 1:
                text += f" patch rows ({r['patches']} patches)"
        return text

    lines = ["| method | volume | model rows per input: predicted / counted | peak memory MiB | seconds "
             "(CPU seconds) |", "|---|---|---|---:|---:|"]
    for r in rows:
        mark = "" if r["measured"] else " (predicted)"
        volume = "×".join(map(str, r["shape"])) + ("" if r["mode"] == "whole" else f", {r['mode']}")
        if r.get("error"):
            lines.append(f"| {r['label']} | {volume} | failed: {r['error'][:120]} | | |")
            continue
        memory = "not predicted" if r["peak_growth_mib"] is None else f"{r['peak_growth_mib']:,.0f}"
        lines.append(f"| {r['label']} | {volume} | {passes(r)} | {memory} | "
                     f"{r['seconds']:,.1f} ({r['cpu_seconds']:,.1f}){mark} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--big-methods", nargs="+", default=list(BIG_MEASURED),
                        help="methods measured on the big volume ('all': every one); the others are predicted")
    parser.add_argument("--big-patch", type=int, default=128, help="patch side on the big volume (global mode)")
    parser.add_argument("--patch-batch", type=int, default=4,
                        help="patches per model call on the big volume (esegeta.explain's default: 4)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=JSON_PATH)
    parser.add_argument("--reuse", type=Path, help="a JSON this benchmark wrote: its measured rows are kept, "
                        "only the missing ones measured")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    common = ["--big-patch", str(args.big_patch), "--patch-batch", str(args.patch_batch), "--device", args.device,
              "--threads", str(args.threads)]
    if args.measure:
        method, size = args.measure.split(":")
        print(json.dumps(measure(method, size, args.big_patch, args.device, args.threads, args.patch_batch)))
        return
    big = list(METHODS) if "all" in args.big_methods else args.big_methods
    wanted = [(m, s) for s in args.sizes for m in args.methods if s == "96" or m in big]
    if "brats" in args.sizes and set(args.methods) - set(big):  # predictions need both Saliency rows
        wanted += [(m, s) for m, s in (("saliency", "96"), ("saliency", "brats")) if (m, s) not in wanted]
    measured: dict[tuple[str, str], dict] = {}
    if args.reuse:
        measured = {(r["method"], r["size"]): r for r in json.loads(args.reuse.read_text())["rows"]
                    if r.get("measured") and not r.get("error")}
    for method, size in wanted:
        if (method, size) in measured:
            continue
        out = subprocess.run([sys.executable, __file__, "--measure", f"{method}:{size}", *common],
                             capture_output=True, text=True, cwd=ROOT)
        if out.returncode:
            error = (out.stderr.strip().splitlines() or ["?"])[-1]
            measured[(method, size)] = {"method": method, "label": METHODS[method][0], "id": METHODS[method][1],
                                        "size": size, "shape": list(SIZES[size]), "mode": "", "measured": True,
                                        "error": error}
        else:
            measured[(method, size)] = json.loads(out.stdout.strip().splitlines()[-1])
        print(json.dumps(measured[(method, size)]), flush=True)
    rows = []
    for size in args.sizes:
        for method in args.methods:
            if (method, size) in measured:
                rows.append(measured[(method, size)])
            elif refused := global_refusal(method):
                rows.append({**{k: measured[(method, "96")].get(k) for k in ("method", "label", "id")},
                             "size": size, "shape": list(SIZES[size]), "mode": "", "measured": False, "error": refused})
            elif not any(measured.get(k, {}).get("error") for k in ((method, "96"), ("saliency", "96"),
                                                                    ("saliency", size))):
                rows.append(predicted_big(measured[(method, "96")], measured[("saliency", size)]))
    table = markdown(rows)
    print(table)
    args.json.write_text(json.dumps({"command": " ".join(["python", "benchmarks/cost3d.py", *sys.argv[1:]]),
                                     "rows": rows, "table": table}, indent=1) + "\n")


if __name__ == "__main__":
    main()
