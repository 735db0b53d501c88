"""esegeta's metrics against Quantus 0.6.0, side by side in one process (run on demand).

    OMP_NUM_THREADS=1 python benchmarks/evaluation_vs_quantus.py [--n 64] [--size 8] [--repeats 3] [--device cpu]

Same model (the digits sample's DigitResNet with its checkpoint, or with ``--model lenet`` a
seeded LeNet-5 as in Quantus's tutorials; ``--size`` > 8 upsamples the digits bilinearly, which
both adaptive-pooling classifiers accept; or with ``--model resnet18`` (``mobilenet_v3_small``,
``densenet121``) that torchvision classifier on ``--n`` random RGB images of ``--size``², the
issue's realistic size being 224), same inputs (the first ``--n`` of sklearn's digits), same
attributions (Saliency for MPRT, random otherwise) and same settings on both sides. Quantus
batches over inputs (its ``batch_size`` = n) and loops over steps in numpy; esegeta stacks the
steps of all inputs into chunks of ``--max-batch`` forward passes (by default 64, on the CPU at most 8
RGB 224² images per call: ``esegeta.evaluation.base.CPU_FORWARD_VALUES``).
Prints, per metric, the best-of-``repeats`` time of each (this process's CPU time by default,
``--clock wall`` for wall time), the ratio, and the largest
difference of the values where both are deterministic (pixel flipping, region perturbation,
MPRT, sparseness; faithfulness correlation and SmoothMPRT draw random numbers on each side;
Quantus's ROAD returns only the batch's accuracy per percentage). ROAD imputes with scipy's
sparse solver per image and percentage in Quantus, with one SuperLU factorisation per chunk of rows
(nested-dissection order) in esegeta. esegeta scores on its inference copy of the model (BatchNorm folded,
channels last: :func:`esegeta.evaluation.base.inference_copy`, made once, before the timings; its cost is
printed); ``--plain`` scores with the model itself.
Quantus's SmoothMPRT explains with its own ``quantus.explain`` (plain gradient) whatever the
``explain_func``; esegeta's side uses Saliency, which equals |gradient| as the metric compares.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


clock = time.process_time  # --clock: this process's CPU time, or wall time


def _best(fn, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        start = clock()
        out = fn()
        best = min(best, clock() - start)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=64, help="inputs")
    parser.add_argument("--size", type=int, default=8, help="image side (digits upsampled when > 8)")
    parser.add_argument("--clock", default="cpu", choices=("cpu", "wall"),
                        help="cpu: this process's CPU time (time.process_time; steady on a shared machine, with "
                             "OMP_NUM_THREADS=1); wall: time.perf_counter")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--step", type=int, default=0, help="pixel flipping's features per step (default: 64 steps)")
    parser.add_argument("--max-batch", type=int, default=None,
                        help="esegeta's forward chunk (default: esegeta's default)")
    parser.add_argument("--device", default="cpu", help="esegeta's device (Quantus runs on the CPU)")
    parser.add_argument("--only", default="", help="comma-separated metric names")
    parser.add_argument("--model", default="digits",
                        choices=("digits", "lenet", "resnet18", "mobilenet_v3_small", "densenet121"),
                        help="digits: the sample DigitResNet; lenet: a seeded LeNet-5 (Quantus's tutorial model); "
                             "resnet18, mobilenet_v3_small, densenet121: torchvision's, random weights, on random "
                             "RGB images")
    parser.add_argument("--scale", type=float, default=1.0, help="fewer steps/runs (0.25: a quarter) for big inputs")
    parser.add_argument("--plain", action="store_true",
                        help="score with the model itself, not esegeta's inference copy (evaluation.inference_copy false)")
    args = parser.parse_args()
    global clock
    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    import numpy as np
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    from esegeta.compat import import_torchvision

    import_torchvision()
    import quantus
    from captum.attr import Saliency
    from quantus.functions.similarity_func import correlation_spearman

    from esegeta.evaluation import Context, metric
    from esegeta.evaluation.base import inference_copy
    from samples.models import DigitResNet

    if args.model == "digits":
        model = DigitResNet()
        model.load_state_dict(torch.load(ROOT / "samples" / "checkpoints" / "digit_resnet.pt", weights_only=True))
    else:
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Conv2d(1, 6, 5, padding=2), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(6, 16, 5), torch.nn.ReLU(), torch.nn.AdaptiveMaxPool2d(5), torch.nn.Flatten(),
            torch.nn.Linear(400, 120), torch.nn.ReLU(), torch.nn.Linear(120, 84), torch.nn.ReLU(), torch.nn.Linear(84, 10))
    model.eval()
    layers = sum(1 for m in model.modules() if hasattr(m, "reset_parameters"))
    data = load_digits()
    x = torch.tensor(data.images[: args.n] / 16.0, dtype=torch.float32)[:, None]
    if args.size != 8:
        x = F.interpolate(x, size=(args.size, args.size), mode="bilinear", align_corners=False)
    y = torch.tensor(data.target[: args.n])
    if args.model not in ("digits", "lenet"):
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from evaluation_models import model_and_inputs

        model, x = model_and_inputs(args.model, args.n, args.size)
        with torch.no_grad():
            y = model(x).argmax(1)
        layers = sum(1 for m in model.modules() if hasattr(m, "reset_parameters"))
    # one relevance per pixel (Quantus flips the elements of a multi-channel map one by one)
    a = torch.randn((x.shape[0], 1, *x.shape[2:]), generator=torch.Generator().manual_seed(0))
    device = torch.device(args.device)
    dev_model = model.to(device) if device.type != "cpu" else model

    def saliency(m, inputs, target):
        inputs = inputs.detach().clone().requires_grad_(True)
        return Saliency(m).attribute(inputs, target=target).detach()

    def q_saliency(model, inputs, targets, **kwargs):
        return saliency(model, torch.as_tensor(inputs), torch.as_tensor(targets)).numpy()

    a_sal = saliency(model, x, y)
    xn, yn, an, asn = x.numpy(), y.numpy(), a.numpy(), a_sal.numpy()
    features = args.size * args.size
    def scaled(k: int) -> int:
        return max(2, round(k * args.scale))

    step = args.step or max(1, features // scaled(64))
    # Quantus's pixel flipping flips single elements of a map broadcast to the input's channels (its step must
    # divide H x W): on RGB the same number of steps, esegeta flipping whole pixels (values not comparable)
    flips = x.shape[1] * features // step
    pixel_step = math.ceil(features / flips)
    patch = max(2, args.size // 8)
    regions = 1000 if args.scale == 1 else scaled(64)
    runs = scaled(100)
    common = dict(normalise=False, abs=False, disable_warnings=True)

    def quantus_call(q, a_np, **kw):
        return q(model=model, x_batch=xn, y_batch=yn, a_batch=a_np, channel_first=True, device="cpu",
                 batch_size=args.n, **kw)

    def ours(name, attribution, **params):
        ctx = Context(model=dev_model, explain=saliency, max_batch=args.max_batch, use_inference_copy=not args.plain)

        def run():
            out = metric(name)(ctx, x.to(device), attribution.to(device), y.to(device), **params)
            if device.type == "cuda":
                torch.cuda.synchronize()
            return out

        return run

    cases = {
        "pixel_flipping": (
            f"{flips} steps of {step} px" if x.shape[1] == 1 else f"{flips} steps ({step} elements; esegeta {pixel_step} px)",
            lambda: np.asarray(quantus_call(quantus.PixelFlipping(features_in_step=step, perturb_baseline="black", **common),
                                            an, softmax=True)),
            ours("pixel_flipping", a, features_in_step=pixel_step, baseline="min", softmax=True),
            (lambda r: r.curves["score"]) if x.shape[1] == 1 else None),
        "region_perturbation": (
            f"{min(regions, (args.size // patch) ** 2)} patches of {patch}x{patch}",
            lambda: np.asarray(quantus_call(quantus.RegionPerturbation(patch_size=patch, regions_evaluation=regions,
                                                                       perturb_baseline=0.0, **common), an, softmax=True)),
            ours("region_perturbation", a, patch_size=patch, regions_evaluation=regions, baseline="value", softmax=True),
            lambda r: r.curves["drop"]),
        "faithfulness_correlation": (
            f"{runs} runs of {features // 4} px",
            lambda: np.asarray(quantus_call(quantus.FaithfulnessCorrelation(nr_runs=runs, subset_size=features // 4,
                                                                            perturb_baseline="black",
                                                                            return_aggregate=False, **common),
                                            an, softmax=False)),
            ours("faithfulness_correlation", a, nr_runs=runs, subset_size=features // 4, baseline="min"),
            None),
        "road": (
            "9 percentages, 8 neighbours, noise 0",
            lambda: quantus_call(quantus.ROAD(percentages=list(range(10, 100, 10)), noise=0.0, **common), an,
                                 softmax=True),
            ours("road", a, noise=0.0),
            None),
        "mprt": (
            f"{layers} layers, top-down, Saliency",
            lambda: np.stack([v for k, v in quantus_call(
                quantus.MPRT(layer_order="top_down", similarity_func=correlation_spearman, normalise=False, abs=True,
                             disable_warnings=True), asn, explain_func=q_saliency).items() if k != "original"], 1),
            ours("mprt", a_sal),
            lambda r: r.curves["similarity"]),
        "smooth_mprt": (
            f"{layers} layers, bottom-up, gradient, 10 noisy samples",
            lambda: np.asarray(quantus_call(
                quantus.SmoothMPRT(layer_order="bottom_up", nr_samples=10, similarity_func=correlation_spearman,
                                   normalise=False, abs=True, return_last_correlation=True, disable_warnings=True),
                asn, explain_func=q_saliency)),
            ours("smooth_mprt", a_sal, nr_samples=10),
            None),
        "sparseness": (
            "Gini of |a|",
            lambda: np.asarray(quantus_call(quantus.Sparseness(normalise=False, abs=True, disable_warnings=True), an)),
            ours("sparseness", a),
            lambda r: r.values),
    }
    only = [c for c in args.only.split(",") if c]
    torch_threads = torch.get_num_threads()
    label = {"digits": "DigitResNet (digits sample) on digits", "lenet": "LeNet-5 on digits"}.get(
        args.model, f"torchvision {args.model} (random weights) on random RGB images")
    print(f"{label}, n={args.n}, {args.size}x{args.size}, torch threads {torch_threads}, "
          f"esegeta on {device} (max_batch {args.max_batch or 'default'}), Quantus {quantus.__version__} on cpu\n")
    if device.type == "cpu" and not args.plain:
        start = clock()
        inference_copy(model)
        print(f"esegeta's inference copy (BatchNorm folded, channels last): {clock() - start:.3f} s, made once per "
              "evaluation (per metric here, before its timing)\n")
    print("| metric | setting | Quantus s | esegeta s | ratio | max abs diff |")
    print("|---|---|---:|---:|---:|---:|")
    for name, (setting, q_fn, e_fn, values) in cases.items():
        if only and name not in only:
            continue
        if name == "road" and x.shape[1] > 1:
            # Quantus 0.6.0's ROAD with this one-channel map on a multi-channel input: IndexError in its
            # noisy_linear_imputation (indices past the map's pixel count)
            print(f"| {name} | {setting} | - | - | - | Quantus fails: 1-channel map, {x.shape[1]}-channel input |",
                  flush=True)
            continue
        e_fn()  # warm-up (first-call allocations)
        q_time, q_out = _best(q_fn, args.repeats)
        e_time, e_out = _best(e_fn, args.repeats)
        diff = "-" if values is None else f"{np.abs(values(e_out).cpu().numpy() - np.asarray(q_out)).max():.1e}"
        print(f"| {name} | {setting} | {q_time:.3f} | {e_time:.3f} | {q_time / e_time:.2f}x | {diff} |", flush=True)


if __name__ == "__main__":
    main()
