"""ROAD: RemOve And Debias (Rong et al. 2022), without retraining, in 2D and 3D, on the device.

Removed pixels (voxels) are filled by noisy linear imputation: each removed value is the
weighted mean of its neighbours (known or themselves removed), plus Gaussian noise. This is a
sparse linear system on the pixel grid (a weighted graph Laplacian restricted to the removed
pixels). On the CPU it is solved exactly, as Quantus and the ROAD authors do, by scipy's SuperLU:
all channels as right-hand sides, the rows of a batch stacked into one block-diagonal system, built
vectorised from a per-grid neighbour table (no per-pixel Python), the pixels in a geometric
nested-dissection order computed once per grid shape (1.3-1.8x faster to factorise than SuperLU's
own minimum-degree order; 224² RGB, 9 percentages: 0.74 against 1.2 s per input; at 32² grey ~10
ms per input, as fast as conjugate gradients on random maps, 2x on smooth ones); a removed pixel
with no removed neighbour is solved in closed form. The factorisation is the floor: ~0.4 s of the
~0.55 s per 224² RGB input (9 percentages, one thread). Measured and not faster there: Jacobi-
preconditioned CG on the CPU, all channels at once (1.4x the factorisation on random maps, ~9x on
smooth ones: 300 iterations at 90 %), pyamg's
smoothed aggregation (its setup alone ~55 ms per 90 % mask), SuperLU in float32 with refinement, its
supernode parameters, other dissection leaf sizes, and a multifrontal Cholesky of the whole grid
(known pixels as identity rows, so every mask has the same fronts, factored in batches by torch's
BLAS): equal to SuperLU within 1e-14 but ~86 ms per 224² RGB row at any fraction, bound by moving
the small fronts' update matrices, not by the dense work (SuperLU 50/92/123/152 ms at 50/70/80/90 %),
so 1.2x faster in all for a 0.3 s plan and ~140 MB cached per grid shape: not adopted. On an
accelerator it is solved for all inputs, channels and percentages at once by Jacobi-preconditioned
conjugate gradients written as convolutions, so nothing is copied to the CPU (on the CPU those cost
1-4 times the direct solve: one channel per convolution is oneDNN's slowest case, and smooth maps
take hundreds of iterations).
Neighbourhoods: 4 or 8 neighbours in 2D, 6 or 26 in 3D, weighted by 1/d² (d
the neighbour's distance) and normalised to sum to 1 — in 2D with 8 neighbours that is 1/6 for
the direct and 1/12 for the diagonal ones, the weights of the ROAD authors and Quantus.
"""
from __future__ import annotations

import functools
import itertools
import math

import numpy as np
import scipy.sparse
import scipy.sparse.linalg
import torch
import torch.nn.functional as F
from torch import Tensor

from esegeta.errors import ConfigError
from esegeta.evaluation.base import Context, MetricResult, MetricSpec, Rule, keyword_defaults, register
from esegeta.evaluation.faithfulness import rank_map

NEIGHBOURS = {2: (4, 8), 3: (6, 26)}
#: What ROAD's parameters accept (checked with the config, before a run).
RULES = {"percentages": Rule("list", 0, 100), "order": Rule("str", choices=("morf", "lerf", "random")),
         "noise": Rule("float", 0), "neighbours": Rule("int", 4, 26, optional=True), "softmax": Rule("bool"),
         "tol": Rule("float", 0, open_low=True), "max_iter": Rule("int", 1)}
#: How the imputation's linear system is solved: ``direct`` (sparse LU on the CPU), ``cg``
#: (conjugate gradients on the input's device), ``auto`` (direct for CPU inputs, else cg).
SOLVERS = ("auto", "direct", "cg")


def neighbour_kernel(dims: int, neighbours: int, device=None, dtype=torch.float32) -> Tensor:
    """(1, 1, 3, 3[, 3]) imputation weights: 1/d² over the chosen neighbours, summing to 1, centre 0."""
    if neighbours not in NEIGHBOURS.get(dims, ()):
        raise ConfigError("params.neighbours", f"{dims}D inputs take {' or '.join(map(str, NEIGHBOURS[dims]))} "
                          f"neighbours, got {neighbours!r}")
    kernel = torch.zeros((3,) * dims, dtype=torch.float64)
    for offset in itertools.product((-1, 0, 1), repeat=dims):
        d2 = sum(o * o for o in offset)
        if d2 == 0 or (neighbours == 2 * dims and d2 > 1):
            continue
        kernel[tuple(o + 1 for o in offset)] = 1.0 / d2
    kernel /= kernel.sum()
    return kernel.reshape(1, 1, *kernel.shape).to(device=device, dtype=dtype)


def _conv(v: Tensor, kernel: Tensor) -> Tensor:
    conv = F.conv2d if v.dim() == 4 else F.conv3d
    return conv(v, kernel, padding=1)


def linear_imputation(x: Tensor, removed: Tensor, neighbours: int | None = None, tol: float = 1e-6,
                      max_iter: int = 2000, solver: str = "auto") -> Tensor:
    """``x`` (N, C, *S) with the pixels where ``removed`` (N, 1, *S) is true replaced by the solution of
    v_i = sum_j w_ij u_j (u = v on removed pixels, x elsewhere; neighbours outside the image are
    left out and the weights of the rest kept, as in the ROAD authors' code). A removed region that
    touches no known pixel is set to 0. ``solver`` (:data:`SOLVERS`): ``direct`` solves exactly
    (float64, then cast back), ``cg`` to a relative residual ``tol`` in at most ``max_iter``
    iterations."""
    if solver not in SOLVERS:
        raise ConfigError("params.solver", f"unknown solver {solver!r}; valid: {', '.join(SOLVERS)}")
    dims = x.dim() - 2
    neighbours = neighbours or (8 if dims == 2 else 26)
    kernel = neighbour_kernel(dims, neighbours, x.device, x.dtype)
    if solver == "direct" or (solver == "auto" and x.device.type == "cpu"):
        return _direct(x, removed, kernel)
    return _conjugate_gradients(x, removed, kernel, tol, max_iter)


def _direct(x: Tensor, removed: Tensor, kernel: Tensor) -> Tensor:
    """:func:`linear_imputation` by sparse LU factorisations (CPU tensors): the rows' systems are
    stacked block-diagonally, up to :data:`UNKNOWNS_PER_SOLVE` removed pixels per factorisation, so
    small images do not pay one solver call each."""
    grid = _grid(tuple(x.shape[2:]), tuple(kernel.reshape(-1).double().tolist()))
    values = x.detach().double().cpu().numpy()
    holes = removed.detach().cpu().numpy().reshape(x.shape[0], *x.shape[2:])
    per_row = np.cumsum(holes.reshape(x.shape[0], -1).sum(1))
    out = np.empty_like(values)
    start = 0
    while start < x.shape[0]:
        budget = (per_row[start - 1] if start else 0) + UNKNOWNS_PER_SOLVE
        stop = min(x.shape[0], max(start + 1, int(np.searchsorted(per_row, budget, side="right"))))
        out[start:stop] = grid.solve(values[start:stop], holes[start:stop])
        start = stop
    return torch.from_numpy(out).to(device=x.device, dtype=x.dtype)


#: Removed pixels per sparse factorisation of :func:`linear_imputation`'s direct solver (rows are
#: stacked up to this; a row with more is solved alone): bounds the factors' memory (~0.5 GB).
UNKNOWNS_PER_SOLVE = 2**18


class _Grid:
    """The imputation's operator on one pixel grid, built once per shape and kernel: ``offsets``
    (K, dims) the neighbours' offsets with their ``weights`` (K,), ``neighbours`` (pixels, K) each
    pixel's in-image neighbours (``size`` where outside), ``diagonal`` the in-image weights' sum per
    pixel, ``by_rank`` the pixels in a nested-dissection order (:func:`_dissection_rank`)."""

    def __init__(self, spatial: tuple[int, ...], kernel: tuple[float, ...]):
        weights = np.array(kernel).reshape((3,) * len(spatial))
        self.spatial = spatial
        self.size = math.prod(spatial)
        coords = np.indices(spatial).reshape(len(spatial), -1)
        bounds = np.array(spatial).reshape(-1, 1)
        self.offsets = np.argwhere(weights) - 1
        self.weights = weights[weights != 0]  # in the order of argwhere
        self.neighbours = np.full((self.size, len(self.offsets)), self.size, dtype=np.int32)
        for k, offset in enumerate(self.offsets):
            near = coords + offset.reshape(-1, 1)
            inside = np.flatnonzero(((near >= 0) & (near < bounds)).all(0))
            self.neighbours[inside, k] = np.ravel_multi_index(tuple(near[:, inside]), spatial)
        self.diagonal = self.stencil(np.ones((1,) + spatial)).reshape(-1)
        self.by_rank = np.argsort(_dissection_rank(spatial)).astype(np.int32)

    def stencil(self, a: np.ndarray) -> np.ndarray:
        """sum_k w_k a[p + offset_k] for every pixel p of ``a`` (..., *spatial), 0 outside the image."""
        dims = len(self.spatial)
        padded = np.zeros(a.shape[:-dims] + tuple(s + 2 for s in self.spatial), dtype=a.dtype)
        padded[(Ellipsis,) + (slice(1, -1),) * dims] = a
        out = np.zeros_like(a)
        for offset, w in zip(self.offsets, self.weights):
            out += w * padded[(Ellipsis,) + tuple(slice(1 + o, 1 + o + s) for o, s in zip(offset, self.spatial))]
        return out

    def solve(self, values: np.ndarray, holes: np.ndarray) -> np.ndarray:
        """``values`` (R, C, *spatial) with the pixels where ``holes`` (R, *spatial) is true imputed:
        per row (D - W_uu) v = W_uk x, D the in-image neighbour weights. A removed pixel with no
        removed neighbour is its known neighbours' weighted mean (closed form); a removed region
        with no known neighbour is closed under in-image adjacency, so on a connected grid it is a
        wholly removed image (0); the other removed pixels, of all rows, form one block-diagonal
        system solved exactly by SuperLU, each row's pixels in nested-dissection order (no pivoting:
        the matrix is symmetric, positive definite and diagonally dominant). The right-hand sides
        and the closed form come from stencils over the whole grid; the matrix is assembled from
        the neighbour table directly (CSC; no graph search, no transpose)."""
        count, channels, n = values.shape[0], values.shape[1], self.size
        known_sum = self.stencil(np.where(holes[:, None], 0.0, values)).reshape(count, channels, n)
        linked = (self.stencil(holes.astype(np.float32)) > 0).reshape(count, n)
        holes = holes.reshape(count, n)
        whole = holes.all(1)
        alone = holes & ~linked & ~whole[:, None]
        out = np.where(alone[:, None], known_sum / self.diagonal, values.reshape(count, channels, n))
        out[whole] = 0.0
        rows, rank = np.nonzero((holes & linked & ~whole[:, None])[:, self.by_rank])  # by row, then rank
        if rows.size:
            index = np.int32 if count * (n + 1) < 2**31 else np.int64  # int32: scipy's own index type
            pixels, rows, m = self.by_rank[rank], rows.astype(index), rows.size
            variable = np.full((count, n + 1), -1, dtype=index)  # column n: outside the image
            variable[rows, pixels] = np.arange(m, dtype=index)
            coupled = variable.reshape(-1)[rows[:, None] * (n + 1) + self.neighbours[pixels]]  # (m, K), -1 none
            columns = np.concatenate([np.arange(m, dtype=index)[:, None], coupled], 1)
            entries = np.concatenate([self.diagonal[pixels, None], np.broadcast_to(-self.weights, coupled.shape)], 1)
            present = columns >= 0
            pointers = np.concatenate([[0], np.cumsum(present.sum(1), dtype=index)])
            # symmetric: its rows, stored as CSR, are its columns stored as CSC
            system = scipy.sparse.csc_matrix((entries[present], columns[present], pointers), shape=(m, m))
            lu = scipy.sparse.linalg.splu(system, permc_spec="NATURAL", diag_pivot_thresh=0,
                                          options={"SymmetricMode": True})
            out[rows, :, pixels] = lu.solve(known_sum[rows, :, pixels])
        return out.reshape(values.shape)


@functools.lru_cache(maxsize=8)
def _grid(spatial: tuple[int, ...], kernel: tuple[float, ...]) -> _Grid:
    return _Grid(spatial, kernel)


def _dissection_rank(spatial: tuple[int, ...], leaf: int = 16) -> np.ndarray:
    """The rank of each flat pixel in a geometric nested-dissection order of the grid: a box is
    split across its longest axis by a one-pixel plane (which separates the two halves for 8 and
    26 neighbours too), the halves ordered first, recursively, and the plane last. Any subset of the
    pixels keeps the separators, so sorting a mask's pixels by this rank gives SuperLU a fill-reducing
    order without computing one per mask (1.3-1.8x faster than its minimum degree order at 224²)."""
    order: list[np.ndarray] = []

    def flat(box: list[tuple[int, int]]) -> np.ndarray:
        return np.ravel_multi_index(tuple(np.indices([hi - lo for lo, hi in box]).reshape(len(box), -1)
                                          + np.array([lo for lo, _ in box]).reshape(-1, 1)), spatial)

    def split(box: list[tuple[int, int]]) -> None:
        sizes = [hi - lo for lo, hi in box]
        if math.prod(sizes) <= leaf or max(sizes) < 3:
            order.append(flat(box))
            return
        axis = int(np.argmax(sizes))
        lo, hi = box[axis]
        middle = (lo + hi) // 2
        split(box[:axis] + [(lo, middle)] + box[axis + 1:])
        split(box[:axis] + [(middle + 1, hi)] + box[axis + 1:])
        order.append(flat(box[:axis] + [(middle, middle + 1)] + box[axis + 1:]))

    split([(0, s) for s in spatial])
    rank = np.empty(math.prod(spatial), dtype=np.int64)
    rank[np.concatenate(order)] = np.arange(rank.size)
    return rank


def _conjugate_gradients(x: Tensor, removed: Tensor, kernel: Tensor, tol: float, max_iter: int) -> Tensor:
    """:func:`linear_imputation` by Jacobi-preconditioned conjugate gradients, all rows and channels at once."""
    n, c = x.shape[:2]
    flat = (n * c, 1) + tuple(x.shape[2:])
    u = removed.to(x.dtype).expand(n, c, *x.shape[2:]).reshape(flat)
    xv = x.reshape(flat)
    diag = _conv(torch.ones_like(u[:1]), kernel).expand_as(u)  # sum of in-image neighbour weights
    diag = torch.where(u > 0, diag, torch.ones_like(diag))

    def apply(v: Tensor) -> Tensor:
        return u * (diag * v - _conv(u * v, kernel))

    rhs = u * _conv((1 - u) * xv, kernel)
    axes = tuple(range(1, u.dim()))
    v = rhs / diag
    r = rhs - apply(v)
    z = r / diag
    p = z
    rz = (r * z).sum(axes, keepdim=True)
    limit = (tol * rhs.flatten(1).norm(dim=1)).reshape(rz.shape) ** 2
    for it in range(max_iter):
        if x.device.type == "meta" and it:
            break  # shapes only: one iteration proves the device path
        if it % 8 == 0 and x.device.type != "meta" and bool(((r * r).sum(axes, keepdim=True) <= limit).all()):
            break  # checked every 8 iterations: each check waits for the device
        ap = apply(p)
        pap = (p * ap).sum(axes, keepdim=True)
        alpha = torch.where(pap > 0, rz / torch.where(pap > 0, pap, torch.ones_like(pap)), torch.zeros_like(pap))
        v = v + alpha * p
        r = r - alpha * ap
        z = r / diag
        rz_new = (r * z).sum(axes, keepdim=True)
        beta = torch.where(rz > 0, rz_new / torch.where(rz > 0, rz, torch.ones_like(rz)), torch.zeros_like(rz))
        p = z + beta * p
        rz = rz_new
    return torch.where(u > 0, v, xv).reshape(x.shape)


def noisy_linear_imputation(ctx: Context, x: Tensor, removed: Tensor, neighbours: int | None = None,
                            noise: float = 0.01, tol: float = 1e-6, max_iter: int = 2000,
                            seeds: list[int] | None = None) -> Tensor:
    """:func:`linear_imputation` plus N(0, noise²) on the removed pixels, drawn from the context (row i
    from a generator seeded with ``seeds[i]`` where given, so chunking does not change the draws)."""
    imputed = linear_imputation(x, removed, neighbours, tol, max_iter)
    if noise:
        if seeds is None:
            draws = ctx.randn(x.shape, x.device, x.dtype)
        else:
            draws = ctx.randn_seeded(seeds, x.shape[1:], x.device, x.dtype)
        imputed = imputed + noise * removed * draws
    return imputed


def road(ctx: Context, x: Tensor, attribution: Tensor, target: Tensor, *,
         percentages: tuple = (10, 20, 30, 40, 50, 60, 70, 80, 90), order: str = "morf", noise: float = 0.01,
         neighbours: int | None = None, softmax: bool = True, tol: float = 1e-6, max_iter: int = 2000) -> MetricResult:
    """ROAD (Rong et al. 2022) without retraining: for each percentage p, the p % most relevant pixels
    (voxels; ``order="lerf"``: least relevant) are removed by noisy linear imputation over
    ``neighbours`` (default 8 in 2D, 26 in 3D) and the target score is read. Curves: ``score`` and
    ``correct`` (the model still predicts the target) per percentage; the value is the mean score
    over the percentages (MoRF: lower is better; LeRF: higher is better)."""
    percentages = [float(p) for p in percentages]
    if not percentages or any(not 0 <= p <= 100 for p in percentages):
        raise ConfigError("params.percentages", f"must be percentages in [0, 100], got {percentages!r}")
    dims = x.dim() - 2
    if neighbours is not None:
        neighbour_kernel(dims, neighbours)
    ranks, n = rank_map(ctx, attribution, order)
    counts = torch.tensor([int(n * p / 100) for p in percentages], device=x.device)
    b, steps = x.shape[0], counts.numel()
    view = (-1,) + (1,) * (x.dim() - 1)
    scores = torch.empty(b * steps, device=x.device, dtype=x.dtype)
    correct = torch.empty(b * steps, device=x.device, dtype=torch.bool)
    streams = ctx.streams(b)  # one per input: its noise is the same in any stack and chunk
    chunk = ctx.batch(x)
    for start in range(0, b * steps, chunk):
        idx = torch.arange(start, min(start + chunk, b * steps), device=x.device)
        bi, ti = idx // steps, idx % steps
        removed = ranks[bi] < counts[ti].reshape(view)
        xs = noisy_linear_imputation(ctx, x[bi], removed, neighbours, noise, tol, max_iter,
                                     [streams[r // steps] + r % steps for r in range(start, start + idx.numel())])
        out = ctx.scores(xs)
        correct[start:start + idx.numel()] = out.argmax(1) == target[bi]
        if softmax:
            out = out.softmax(1)
        scores[start:start + idx.numel()] = out.gather(1, target[bi].reshape(-1, 1)).squeeze(1)
    scores, correct = scores.reshape(b, steps), correct.reshape(b, steps)
    fraction = torch.tensor(percentages, device=x.device, dtype=x.dtype).expand(b, -1) / 100
    return MetricResult(scores.mean(1), {"score": scores, "correct": correct.to(x.dtype), "fraction": fraction})


register(MetricSpec(
    "road", "faithfulness", "Rong, Leemann, Borisov, Kasneci, Kasneci 2022, A Consistent and Efficient Evaluation "
    "Strategy for Attribution Methods (ICML)", road, keyword_defaults(road),
    higher_is_better=lambda p: p["order"] != "morf", passes=lambda p, s: len(p["percentages"]),
    summary="target score after removing the top p % by noisy linear imputation (ROAD, no retraining)", rules=RULES))

__all__ = ["SOLVERS", "road", "linear_imputation", "noisy_linear_imputation", "neighbour_kernel"]
