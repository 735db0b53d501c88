"""LRP-conservative substitutes: attention and normalisation as linear maps for fixed constants.

LRP's rules (and DeepLIFT's) are exact for layers that are linear in their input. Attention and
normalisation layers are not: a LayerNorm divides by the standard deviation of its own input,
attention multiplies values by softmax weights computed from the same input. AttnLRP / CP-LRP
(Achtibat et al. 2024, arXiv:2402.05602; Ali et al. 2022, arXiv:2202.07304) hold those factors
constant in the backward pass, which makes each block linear in its input for fixed constants, so
gradient×input rules conserve relevance through it:

- normalisation (LayerNorm, torchvision's/timm's LayerNorm2d, GroupNorm, InstanceNorm1/2/3d with
  input statistics): ``y = (x - mean(x)) / std(x).detach() * w + b``; the mean stays live (the
  centring is linear, and a detached mean would act as a bias that absorbs relevance);
- attention (``nn.MultiheadAttention``, and every module :func:`esegeta.attribution.architectures.attention`
  finds: torchvision's ViT, timm's ``Attention``, MONAI's ``SABlock`` and Swin's ``WindowAttention``):
  ``A = softmax(q·kᵀ)`` held constant, ``out = A @ v``: relevance reaches the input through the
  value projection only (``nn.MultiheadAttention`` becomes :class:`ConstantAttention`, whose value and
  output projections are ``nn.Linear`` modules, so rules see them; the others keep their code, which
  runs under :class:`_ConstantWeights`, a torch function mode scoped to their forward);
- gates (GELU, SiLU: ``x·g(x)``): no substitute is needed: the adapters give them the identity
  rule (Captum) or ``Pass`` (zennit's composites), which is what ``x·g(x).detach()`` gives under ε;
- branches of the graph, for LRP only (:data:`BRANCHES`, by default in models that get substitutes:
  a transformer's residual stream, a normalised U-Net's skips): each layer reads its inputs
  through a view of its own (:func:`_separate_inputs`), and a sum of two computed tensors
  (``x + f(x)``) splits relevance by each term's share (:class:`_ProportionalSum`), where the
  gradient copies it to both terms. Other models run as upstream computes them (zennit's
  ResNetCanonizer splits torchvision's own blocks) unless ``branches`` is "split".

LRP's rule for the normalisations themselves passes each element's relevance on unchanged
(zennit's ``Pass``; for Captum's ε rule the substitute's backward is ``diag(y/x)``, which gives the
same: :func:`_elementwise`), not ε through the centred map: that is exact in exact arithmetic, but
divides by outputs that centring puts near zero by construction, and the ±10⁹ terms it makes cancel
only on paper (measured: Σ relevance ÷ score of −350 on a two-layer ViT, ±10¹⁵ on UNETR).

Forward values are those of the original modules to float rounding (tests/test_rules.py).

DeepLIFT (``pairs``: the methods that run the input and its baseline as the two halves of one
batch: Captum's DeepLift/DeepLiftShap and SHAP's DeepExplainer) needs more: each half has its own
statistics, so a gradient at either one misses ``Δ(1/std)``. The normalisation's multiplier is then
exact: with ``u`` the centred input and ``w = 1/std``, ``Δ(u·w) = w_x·Δu + u_b·Δw``, ``Δw = ρ·Δ(std²)``,
``Δ(std²) = (1/n)·Σ (u_x + u_b)·Δu``, where ρ = −1/(s_x·s_b·(s_x + s_b)) is the secant of
``v ↦ v^(-1/2)``: one scalar per normalised group (a rescale over the whole vector, never per
element: an elementwise Δy/Δx divides by small differences, and multiplied −23,000× on MONAI's
UNet). The order matters: the symmetric form (mean ``w`` and mean ``u``) is just as exact but,
against a zero baseline (``u_b = 0``, ``s_b = √eps``), splits ``Δy`` into two terms ~300× larger
that cancel, and float32 loses the sum over a few layers; this one is ``w_x·Δu`` there. The forward
keeps the exact values and carries that multiplier as its gradient. Attention, the same way: the
products of two input-dependent tensors (``q·kᵀ``, ``A·v``) as ``Δ(a·b) = Δa·b̄ + ā·Δb``, and the
softmax as ``ΔA = g·(Δs − c·Δs)`` (:func:`_softmax_paired`: ``g`` the secant of exp between the
log-probabilities, ``c`` the convex combination of the two softmaxes that makes ``Δ logsumexp``
exact); an ``nn.Softmax`` inside attention becomes :class:`PlainSoftmax` meanwhile, so the
libraries' own elementwise softmax rule does not overwrite it. Summation to delta then holds
through normalisation and attention to float rounding (tests/test_rules.py).

Every change is made to the prepared copy only, within :func:`substituted`, logged, and undone on
exit (also on error); nothing process-wide changes.
"""
from __future__ import annotations

import contextlib
import logging
import math
import weakref
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from esegeta.attribution.architectures import attention, normalisation
from esegeta.errors import ConfigError

log = logging.getLogger("esegeta")

#: The axioms whose methods run on the substitutes (rule-based methods): LRP's conservation and
#: DeepLIFT's summation to delta; ``PAIRED`` ones run input and baseline as two halves of a batch.
AXIOMS = frozenset({"conservation", "summation-to-delta"})
PAIRED = frozenset({"summation-to-delta"})
#: How the manifest's conservation record names what the substitutes do.
SUMMARY = ("AttnLRP/CP-LRP: normalisations' std and attention's softmax weights constant; exact DeepLIFT "
           "multipliers through both")
#: esegeta's own parameter of the LRP methods (Captum's LRP/LayerLRP, zennit's LRP composites): how
#: relevance crosses branches of the graph (a tensor read by several layers, residual sums):
#: "split" keeps each consumer's relevance apart and splits sums by each term's share; "upstream"
#: leaves the graph to the library; "auto" (the default) splits in models that get substitutes
#: (normalised or attention models) and leaves the others (plain CNNs) equal to the upstream call.
BRANCHES = "branches"
BRANCH_MODES = ("auto", "split", "upstream")
#: How the manifest's conservation record names each way branches were crossed.
BRANCH_RECORD = {True: "split: each layer reads its inputs through its own view; sums split by |term| share",
                 False: "upstream: the library's gradient at branches and sums"}


def _pairs(x: torch.Tensor, pairs: bool) -> bool:
    return pairs and x.ndim > 0 and x.shape[0] % 2 == 0 and x.shape[0] > 0


def _normalise(x: torch.Tensor, dims: tuple[int, ...], eps: float, pairs: bool) -> torch.Tensor:
    """``(x - mean) / std`` over ``dims`` with the std a constant of the backward pass; with
    ``pairs``, DeepLIFT's exact multiplier between the batch's halves (see the module docstring)."""
    u = x - x.mean(dims, keepdim=True)
    std = (u.detach().pow(2).mean(dims, keepdim=True) + eps).sqrt()
    if not _pairs(x, pairs):
        return u / std
    (ua, ub), (sa, sb) = u.chunk(2), std.chunk(2)
    # Δ(u·w) = w_x·Δu + u_b·Δw with Δw = ρ·Δ(std²), ρ = (1/s_x − 1/s_b)/(s_x² − s_b²) = −1/(s_x·s_b·(s_x + s_b))
    # (the secant, in a form without differences), Δ(std²) = (1/n)·Σ (u_x + u_b)·Δu
    rho = -1 / (sa * sb * (sa + sb))
    n = math.prod(x.shape[d] for d in dims)
    both = (ua + ub).detach()

    def multiplied(t):  # the same linear map on either half: Captum reads the input half's gradient, SHAP the baseline's
        return t / sa + ub.detach() * rho * (both * t).sum(dims, keepdim=True) / n

    exact = torch.cat([ua / sa, ub / sb]).detach()
    paired = torch.cat([multiplied(ua), multiplied(ub)])
    return exact + paired - paired.detach()


def _affine(y: torch.Tensor, weight, bias, shape: tuple[int, ...]) -> torch.Tensor:
    if weight is not None:
        y = y * weight.view(shape)
    if bias is not None:
        y = y + bias.view(shape)
    return y


def _elementwise(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``y`` (a normalisation's output) with the Jacobian ``diag(y / x)``: under the ε rule (``x ·
    Jᵀ(R / y)``) each element keeps its relevance, ``R_in = R_out``; Captum's identity rule would do
    that too, but it replaces whatever reaches the input, and so drops the relevance a residual
    stream brings there past the norm (a transformer block's ``x + f(norm(x))``)."""
    ratio = torch.where(x != 0, y.detach() / torch.where(x != 0, x.detach(), torch.ones_like(x)), torch.zeros_like(x))
    return y.detach() + (x - x.detach()) * ratio


def _norm_forward(module: nn.Module, state: dict):
    """The substitute forward of normalisation ``module`` (same values; std constant for DeepLIFT,
    elementwise in relevance terms for LRP: :func:`_elementwise`)."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        y = _norm_values(module, x, state["pairs"])
        return y if state["pairs"] else _elementwise(x, y)

    return forward


def _norm_values(module: nn.Module, x: torch.Tensor, pairs: bool) -> torch.Tensor:
    """What normalisation ``module`` computes, with its std constant (:func:`_normalise`)."""
    name = type(module).__name__
    if name == "LayerNorm2d":  # channels of (N, C, *spatial)
        y = _normalise(x, (1,), module.eps, pairs)
        return _affine(y, module.weight, module.bias, (1, -1, *([1] * (x.ndim - 2))))
    if isinstance(module, nn.LayerNorm):
        dims = tuple(range(x.ndim - len(module.normalized_shape), x.ndim))
        y = _normalise(x, dims, module.eps, pairs)
        return _affine(y, module.weight, module.bias, tuple(module.normalized_shape))
    channel_shape = (1, -1, *([1] * (x.ndim - 2)))
    if isinstance(module, nn.GroupNorm):
        grouped = x.reshape(x.shape[0], module.num_groups, -1)
        y = _normalise(grouped, (2,), module.eps, pairs).reshape(x.shape)
        return _affine(y, module.weight if module.affine else None, module.bias if module.affine else None,
                       channel_shape)
    y = _normalise(x, tuple(range(2, x.ndim)), module.eps, pairs)  # InstanceNorm
    return _affine(y, module.weight if module.affine else None, module.bias if module.affine else None,
                   channel_shape)


# ---------------------------------------------------------------------------- attention

def _constant(weights: torch.Tensor) -> torch.Tensor:
    """Attention weights held constant: their values, with a zero gradient (not none: a library's
    hooks on the queries and keys, Captum's on timm's ``q_norm``, then see zeros rather than nothing)."""
    return weights.detach() + weights * 0 if weights.requires_grad else weights


def _halves_mean(t: torch.Tensor) -> torch.Tensor:
    a, b = t.detach().chunk(2)
    mean = (a + b) / 2
    return torch.cat([mean, mean])


def _live(args: tuple) -> list[int]:
    """Positions of the tensor arguments that depend on the input (require gradients)."""
    return [i for i, a in enumerate(args) if torch.is_tensor(a) and a.requires_grad]


def _paired(func, args: tuple, kwargs: dict) -> torch.Tensor:
    """``func`` (a product) of two input-dependent tensors with DeepLIFT's exact multipliers between
    the batch's halves: ``Δ(a·b) = Δa·b̄ + ā·Δb`` (bars: the mean of input and baseline); values exact."""
    exact = func(*args, **kwargs)
    i, j = _live(args)
    first = func(*(_halves_mean(a) if k == j else a for k, a in enumerate(args)), **kwargs)
    second = func(*(_halves_mean(a) if k == i else a for k, a in enumerate(args)), **kwargs)
    return exact.detach() + (first - first.detach()) + (second - second.detach())


def _product(func, args: tuple, kwargs: dict, pairs: bool) -> torch.Tensor:
    live = _live(args)
    if pairs and len(live) == 2 and all(_pairs(args[i], True) for i in live) \
            and args[live[0]].shape[0] == args[live[1]].shape[0]:
        return _paired(func, args, kwargs)
    return func(*args, **kwargs)


def _softmax_paired(scores: torch.Tensor, dim: int) -> torch.Tensor:
    """``softmax(scores)`` over ``dim`` with DeepLIFT's exact multiplier between the batch's halves.

    With ``l = log softmax(s)``: ``ΔA = g·Δl`` (g the secant of exp between the halves' ``l ≤ 0``,
    bounded by 1) and ``Δl = Δs − Δlse``; by convexity ``Δlse`` lies between ``A_b·Δs`` and ``A_x·Δs``,
    so ``Δlse = c·Δs`` with ``c`` the convex combination of the two softmaxes that makes it exact.
    No coefficient is a ratio of small differences without a bound."""
    weights = scores.softmax(dim)
    if not _pairs(scores, True) or not scores.requires_grad:
        return _constant(weights)
    s_a, s_b = scores.detach().chunk(2)
    a_a, a_b = weights.detach().chunk(2)
    finite = torch.isfinite(s_a) & torch.isfinite(s_b)  # masked entries (−inf in both halves) take no part
    ds = torch.where(finite, s_a - s_b, torch.zeros_like(s_a))
    l_a, l_b = s_a.log_softmax(dim), s_b.log_softmax(dim)
    dl = torch.where(finite, l_a - l_b, torch.zeros_like(l_a))
    dlse = torch.logsumexp(s_a, dim, keepdim=True) - torch.logsumexp(s_b, dim, keepdim=True)
    p_a, p_b = (a_a * ds).sum(dim, keepdim=True), (a_b * ds).sum(dim, keepdim=True)
    gap = p_a - p_b
    theta = torch.where(gap.abs() > 1e-12, (dlse - p_b) / torch.where(gap.abs() > 1e-12, gap, torch.ones_like(gap)),
                        torch.full_like(gap, 0.5)).clamp(0, 1)
    c = theta * a_a + (1 - theta) * a_b
    g = torch.where(dl.abs() > 1e-6, (a_a - a_b) / torch.where(dl.abs() > 1e-6, dl, torch.ones_like(dl)),
                    (a_a + a_b) / 2)

    def multiplied(t):
        t = torch.where(finite, t, torch.zeros_like(t))
        return g * (t - (c * t).sum(dim, keepdim=True))

    live_a, live_b = scores.chunk(2)
    paired = torch.cat([multiplied(live_a), multiplied(live_b)])
    return weights.detach() + paired - paired.detach()


def _weights(func, args: tuple, kwargs: dict, pairs: bool) -> torch.Tensor:
    """A softmax inside attention: constant (LRP), or with its exact DeepLIFT multiplier (``pairs``)."""
    dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
    if pairs and isinstance(dim, int) and kwargs.get("dtype") is None and torch.is_tensor(args[0]):
        return _softmax_paired(args[0], dim)
    return _constant(func(*args, **kwargs))


_PRODUCTS = frozenset({"matmul", "__matmul__", "__rmatmul__", "bmm", "einsum"})


def _sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
          *, pairs: bool = False):
    """``F.scaled_dot_product_attention`` written out, its softmax weights constant (eval: no dropout)."""
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        repeat = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(repeat, -3), value.repeat_interleave(repeat, -3)
    scores = _product(torch.matmul, (query, key.transpose(-2, -1)), {}, pairs) * scale
    if is_causal:
        causal = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    weights = _weights(torch.softmax, (scores, -1), {}, pairs)
    return _product(torch.matmul, (weights, value), {}, pairs)


class _ConstantWeights(torch.overrides.TorchFunctionMode):
    """Within an attention module's forward: softmax weights held constant (:func:`_constant`),
    fused attention written out with them (:func:`_sdpa`); with ``pairs`` (DeepLIFT), the softmax
    and the products of two input-dependent tensors carry their exact multipliers instead."""

    def __init__(self, pairs: bool):
        super().__init__()
        self.pairs = pairs

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name == "softmax":
            return _weights(func, args, kwargs, self.pairs)
        if name == "scaled_dot_product_attention":
            return _sdpa(*args, **kwargs, pairs=self.pairs)
        if self.pairs and name in _PRODUCTS:
            return _product(func, args, kwargs, True)
        return func(*args, **kwargs)


class PlainSoftmax(nn.Module):
    """``nn.Softmax`` under another name, inside attention while a rule-based method runs: Captum's
    and SHAP's DeepLIFT replace an ``nn.Softmax``'s gradient by their own elementwise rescale, which
    would overwrite the exact multiplier :func:`_softmax_paired` carries; and the identity rule LRP
    gives ``nn.Softmax`` would hand the relevance at the (constant) attention weights on to the
    queries and keys, where it does not belong (Swin's ``WindowAttention``: Σ ÷ score 2·10¹³ on a
    small bias-free SwinUNETR with Captum's LRP). Captum's LRP gives this module the ε rule, under
    which a constant passes nothing; zennit's composites map it to no rule."""

    def __init__(self, dim: int | None):
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(x, self.dim)


class PairedSoftmax(nn.Module):
    """A wrapper's ``nn.Softmax`` (over the classes of a segmenter's output) while DeepLIFT runs:
    with the input and its baseline as the batch's halves and gradients on, the exact multiplier of
    :func:`_softmax_paired` (the libraries' own rule for ``nn.Softmax`` rescales each element by
    ``Δy/Δx`` as if it were elementwise, so the summation to delta fails: 2.5× on a MONAI SegResNet
    with the ``multiclass`` wrapper); otherwise the plain softmax."""

    def __init__(self, dim: int | None):
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.dim, int) and torch.is_grad_enabled() and x.requires_grad and _pairs(x, True):
            return _softmax_paired(x, self.dim)
        return torch.softmax(x, self.dim)


def _wrapper_softmaxes(forward: nn.Module | None, network: nn.Module) -> list[str]:
    """The names of the ``nn.Softmax`` modules of ``forward`` (the wrapped model) outside ``network``."""
    if forward is None or forward is network:
        return []
    inside = {id(m) for m in network.modules()}
    return [name for name, m in forward.named_modules() if type(m) is nn.Softmax and id(m) not in inside]


def _scoped_forward(module: nn.Module, state: dict):
    """``module``'s own forward, run under :class:`_ConstantWeights`."""
    forward = module.forward

    def scoped(*args, **kwargs):
        with _ConstantWeights(state["pairs"]):
            return forward(*args, **kwargs)

    return scoped


def _projection(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An ``nn.Linear`` over ``weight`` and ``bias`` (views of the attention's own parameters)."""
    linear = nn.Linear(1, 1, bias=False, device="meta")
    linear.in_features, linear.out_features = weight.shape[1], weight.shape[0]
    linear.weight = nn.Parameter(weight.detach(), requires_grad=weight.requires_grad)
    linear.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=bias.requires_grad)
    return linear


class ConstantAttention(nn.Module):
    """``nn.MultiheadAttention`` with its softmax weights constant: queries and keys give the
    weights, the values pass through ``value`` (an ``nn.Linear`` over the slice of ``in_proj_weight``
    it uses) and ``out_proj`` (the original's), so LRP rules see both projections. Same values,
    same call signature (``need_weights`` returns the constant weights)."""

    def __init__(self, original: nn.MultiheadAttention, state: dict):
        super().__init__()
        e = original.embed_dim
        if original._qkv_same_embed_dim:
            w, b = original.in_proj_weight, original.in_proj_bias
            self.query_weight, self.key_weight, value_weight = w[:e], w[e:2 * e], w[2 * e:]
            bq, bk, bv = (None, None, None) if b is None else (b[:e], b[e:2 * e], b[2 * e:])
        else:
            self.query_weight, self.key_weight = original.q_proj_weight, original.k_proj_weight
            value_weight = original.v_proj_weight
            b = original.in_proj_bias
            bq, bk, bv = (None, None, None) if b is None else (b[:e], b[e:2 * e], b[2 * e:])
        self.query_bias, self.key_bias = bq, bk
        self.value = _projection(value_weight, bv)
        self.out_proj = original.out_proj
        self.num_heads, self.embed_dim, self.batch_first = original.num_heads, e, original.batch_first
        self.state = state

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if not self.batch_first and query.ndim == 3:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        n, length, e = query.shape
        heads = self.num_heads

        def split(t):
            return t.reshape(n, t.shape[1], heads, e // heads).transpose(1, 2)

        q = split(F.linear(query, self.query_weight, self.query_bias))
        k = split(F.linear(key, self.key_weight, self.key_bias))
        v = split(self.value(value))
        mask = None
        if attn_mask is not None:
            mask = attn_mask.view(n, heads, *attn_mask.shape[-2:]) if attn_mask.ndim == 3 else attn_mask
            if mask.dtype == torch.bool:
                mask = ~mask  # MultiheadAttention's True means "not allowed"; SDPA's means "allowed"
        if key_padding_mask is not None:
            padding = key_padding_mask.view(n, 1, 1, -1)
            padding = torch.zeros_like(padding, dtype=q.dtype).masked_fill(padding, float("-inf")) \
                if padding.dtype == torch.bool else padding.to(q.dtype)
            if mask is None:
                mask = padding
            else:
                mask = (torch.zeros_like(mask, dtype=q.dtype).masked_fill(~mask, float("-inf"))
                        if mask.dtype == torch.bool else mask) + padding
        out = _sdpa(q, k, v, attn_mask=mask, is_causal=is_causal and mask is None, pairs=self.state["pairs"])
        out = self.out_proj(out.transpose(1, 2).reshape(n, length, e))
        if not self.batch_first and out.ndim == 3:
            out = out.transpose(0, 1)
        if need_weights:
            scores = (q @ k.transpose(-2, -1) * (e // heads) ** -0.5)
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
            weights = scores.softmax(-1).detach()
            return out, weights.mean(1) if average_attn_weights else weights
        return out, None


def _supported_mha(module: nn.MultiheadAttention) -> bool:
    """Whether :class:`ConstantAttention` computes what ``module`` does (no extra key/value biases,
    no zero-attention row, eval mode)."""
    return module.bias_k is None and not module.add_zero_attn and not module.training


class _ProportionalSum(torch.autograd.Function):
    """``a + b`` whose backward splits what arrives (relevance, for LRP) by each term's share
    ``|a| / (|a| + |b|)``, where the gradient would copy it whole to both terms; both terms zero: halves.

    Not the signed z-rule ``a / (a + b)`` (zennit's ``Norm`` on its ``Sum``): where the terms
    nearly cancel (a residual branch undoing its input) its shares are unbounded, ±400 measured on
    SwinUNETR's first block, and the next layer that absorbs any relevance (z⁺ = 0 under ``ZPlus``,
    ε) turns the cancelling halves into a sum of −557 for a seed of 1. The magnitude shares are
    in [0, 1] and still add up to the relevance that arrived.

    A term that is the input of a layer Captum's LRP hooks (it marks it ``hook_registered``) gets
    its share divided by itself: Captum's hook on that tensor multiplies whatever arrives there by
    the tensor (relevance = gradient × input), so the share must arrive as a gradient."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.terms = (a, b)  # the tensors themselves: Captum's mark is an attribute of the Python object
        return a + b

    @staticmethod
    def backward(ctx, relevance):
        a, b = ctx.terms
        magnitude = (a.detach().abs() + b.detach().abs())
        nonzero = magnitude != 0
        per_unit = torch.where(nonzero, relevance / torch.where(nonzero, magnitude, torch.ones_like(magnitude)),
                               torch.zeros_like(magnitude))

        def share(term, half):
            if getattr(term, "hook_registered", False):
                return torch.where(nonzero, per_unit * term.detach().sign(),
                                   relevance * half / torch.where(term != 0, term, 1).detach())
            return torch.where(nonzero, per_unit * term.detach().abs(), relevance * half)

        ctx.terms = None
        return share(a, 0.5), share(b, 0.5)


_SUMS = frozenset({"add", "__add__", "__radd__", "__iadd__"})


#: esegeta's own parameter of Captum's LRP methods: the rule on convolutions (:class:`SignSplit`).
#: "epsilon" is Captum's own ε rule; "zplus" and "gamma" are zennit's ``ZPlus`` and ``Gamma`` on inputs
#: of either sign (biases left out of the denominators); "auto" (the default) takes "gamma" in the
#: models :func:`splits` splits by default (normalised or attention models, whose convolutions read
#: inputs of mixed sign) and Captum's ε elsewhere (plain ReLU CNNs stay equal to the upstream call).
#: γ rather than z⁺ for "auto": z⁺ drops the relevance of every output whose z⁺ is 0 (all its
#: products x·w negative: frequent in a strided transposed convolution, where an output sees one or
#: two inputs), so it adds up to 0.48 on a small SegResNet and 0.65 on SwinUNETR (bias-free, as
#: zennit's EpsilonPlus); γ's denominator ``z + γ·z⁺`` (``z − γ·z⁻`` for z < 0) holds every term and is
#: 0 only where z is: 1.00 on both.
CONV_RULE = "conv_rule"
CONV_RULES = ("auto", "epsilon", "zplus", "gamma")
#: γ of the "gamma" convolution rule (zennit's ``Gamma`` default).
CONV_GAMMA = 0.25
#: The convolutions :class:`SignSplit` covers (and ``nn.Linear`` with ``params.gamma``).
CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _convolved(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor, output_padding=None) -> torch.Tensor:
    """``layer``'s convolution (or linear map) of ``x`` with ``weight`` in place of its own, without
    bias (a transposed convolution: with ``output_padding`` where its call gave an output size)."""
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight)
    if isinstance(layer, nn.modules.conv._ConvTransposeNd):
        functional = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[x.ndim - 3]
        return functional(x, weight, None, layer.stride, layer.padding,
                          layer.output_padding if output_padding is None else output_padding, layer.groups,
                          layer.dilation)
    return layer._conv_forward(x, weight, None)


def _both(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a + b`` with the gradient copied to both (not a residual sum that :class:`_WholeModel` splits)."""
    return torch.stack((a, b)).sum(0)


class SignSplitPart(nn.Module):
    """The leaf of :class:`SignSplit`: the denominator of the z⁺ (or γ) rule as a convolution of the
    input, ``z⁺ = conv(x⁺; W⁺) + conv(x⁻; W⁻)``, each term ≥ 0. Captum's LRP gives it the ε rule: it
    divides the relevance at this output by ``z⁺``, the gradient through the two terms routes each
    input to its own weights (``x⁺·W⁺``, ``x⁻·W⁻``), and the product with the input gives
    ``R_i = Σ_j x_i·w±_ij·R_j / z⁺_j``, zennit's ``ZPlus`` on inputs of either sign: Σ_i R_i = Σ_j R_j
    wherever z⁺_j > 0 (the bias takes none). γ: zennit's generalised ``Gamma``, the weights
    ``W + γW⁺`` on x⁺ and ``W + γW⁻`` on x⁻ where z > 0, the other way round where z < 0 (z without
    the bias, as the denominators). The layer is held outside ``_modules``: Captum's LRP hooks
    leaves only, and this is the leaf it hooks."""

    def __init__(self, layer: nn.Module, gamma: float | None):
        super().__init__()
        self.__dict__["layer"] = layer
        self.gamma = gamma
        #: a transposed convolution's output padding for the call under way (its output size given):
        #: an attribute, as Captum's hooks take every argument of a leaf for a tensor
        self.output_padding = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.layer.weight

        def conv(t, weight):
            return _convolved(self.layer, t, weight, self.output_padding)

        up, down = x.clamp(min=0), x.clamp(max=0)
        w_up, w_down = w.clamp(min=0), w.clamp(max=0)
        z_plus = _both(conv(up, w_up), conv(down, w_down))  # the products x·w ≥ 0
        if self.gamma is None:
            return z_plus
        # zennit's groups, x⁺(W + γW⁺) + x⁻(W + γW⁻) = z + γz⁺ and x⁺(W + γW⁻) + x⁻(W + γW⁺) = z + γz⁻,
        # from z⁺ and z⁻ (z = z⁺ + z⁻, bias left out as from the denominators: its sign picks the group)
        z_minus = _both(conv(up, w_down), conv(down, w_up))
        z = (z_plus + z_minus).detach()
        positive = _both(z_plus * (1 + self.gamma), z_minus)
        negative = _both(z_plus, z_minus * (1 + self.gamma))
        return torch.where(z > 0, positive, torch.where(z < 0, negative, torch.zeros_like(positive)))


class _ValueOf(torch.autograd.Function):
    """The value of ``exact`` with the gradient of ``part``: the layer's output as computed, its
    relevance through :class:`SignSplitPart`."""

    @staticmethod
    def forward(ctx, part, exact):
        return exact.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class SignSplit(nn.Module):
    """A convolution while Captum's LRP runs with ``params.conv_rule`` "zplus" or "gamma" (a dense
    layer with ``params.gamma``): its output is the layer's own (bit for bit), its relevance goes
    back through :class:`SignSplitPart`.

    Why: Captum's ε rule (ε = 1e-9) on a convolution whose input has mixed sign (after a
    normalisation, PReLU, GELU, or the image itself) sends ``x_i·w_ij·R_j / z_j`` back, terms of
    both signs whose sum is ``R_j``: each 3×3×3 convolution multiplies Σ|R| by about √(fan-in), and
    over a deep U-Net the sum is decided by rounding (Σ ÷ score −10 on the MONAI UNet of issue 21,
    bias-free; −2.3·10⁵ on a small SwinUNETR). z⁺'s terms all have the relevance's sign; γ's
    denominator outweighs the terms of the other sign."""

    def __init__(self, layer: nn.Module, gamma: float | None = None):
        super().__init__()
        self.__dict__["original"] = layer  # not a child: its parameters stay the user's, unhooked by Captum
        self.part = SignSplitPart(layer, gamma)

    def forward(self, x: torch.Tensor, output_size=None) -> torch.Tensor:
        with torch.no_grad():
            exact = self.original(x) if output_size is None else self.original(x, output_size)
        if output_size is not None:  # a transposed convolution's call with an output size
            o = self.original
            self.part.output_padding = o._output_padding(x, output_size, o.stride, o.padding, o.kernel_size,
                                                         x.ndim - 2, o.dilation)
        try:
            return _ValueOf.apply(self.part(x.view_as(x)), exact)
        finally:
            self.part.output_padding = None


def _affine_batchnorm(module: nn.Module) -> bool:
    """A BatchNorm that uses its running statistics (an elementwise affine map: eval mode)."""
    return (isinstance(module, nn.modules.batchnorm._BatchNorm) and not module.training
            and module.track_running_stats and module.running_mean is not None)


def _passing_forward(module: nn.Module):
    """``module``'s own forward, each element keeping its relevance (:func:`_elementwise`)."""
    forward = module.forward

    def passing(x: torch.Tensor) -> torch.Tensor:
        return _elementwise(x, forward(x))

    return passing


class _GradientTimes(torch.autograd.Function):
    """``t`` itself, with its gradient multiplied by ``factor`` in the backward pass."""

    @staticmethod
    def forward(ctx, t, factor):
        ctx.factor = factor
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        factor, ctx.factor = ctx.factor, None
        return grad * factor, None


#: Functional poolings in model code (DenseNet's head: ``F.adaptive_avg_pool2d(F.relu(x), 1)``).
_POOLS = frozenset({"adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
                    "avg_pool1d", "avg_pool2d", "avg_pool3d"})


class _LeavesRunning:
    """How many of ``network``'s leaf modules are running (forward hooks count them; :meth:`remove`)."""

    def __init__(self, network: nn.Module):
        self.count = 0
        leaves = [m for m in network.modules() if not m._modules]
        self.handles = ([m.register_forward_pre_hook(self._enter) for m in leaves]
                        + [m.register_forward_hook(self._leave, always_call=True) for m in leaves])

    def _enter(self, module, args):
        self.count += 1

    def _leave(self, module, args, output):
        self.count -= 1

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _pool_with_epsilon(func, args: tuple, kwargs: dict) -> torch.Tensor:
    """An average pooling called as a function (no module a rule could sit on) with the ε rule its
    module has under Captum's LRP, ``R_i = x_i·Σ_j J_ji·R_j / y_j`` (relevance as the gradient
    between Captum's hooks): its gradient spread each output's relevance evenly over its window, and
    a ReLU before it (DenseNet-121's head, ``F.adaptive_avg_pool2d(F.relu(x), 1)``) dropped the share
    of the inactive units: Σ ÷ score 0.53, bias-free, with γ on the convolutions."""
    x = args[0]
    y = func(_GradientTimes.apply(x, x.detach()), *args[1:], **kwargs)
    stable = y.detach() + torch.where(y.detach() >= 0, 1e-9, -1e-9)
    return _GradientTimes.apply(y, 1 / stable)


def check_conv_rule(value: Any, path: str) -> None:
    """The JSON check of :data:`CONV_RULE`."""
    if value not in CONV_RULES:
        raise ConfigError(path, f"conv_rule must be one of {', '.join(map(repr, CONV_RULES))} (\"gamma\" keeps "
                                f"relevance conserved through convolutions of mixed-sign inputs), not {value!r}")


def conv_rule(network: nn.Module, x: torch.Tensor, mode: str = "auto") -> str:
    """The rule Captum's LRP puts on ``network``'s convolutions for ``params.conv_rule`` ``mode``."""
    if mode != "auto":
        return mode
    return "gamma" if splits(network, x, "auto") else "epsilon"


@contextlib.contextmanager
def sign_split(network: nn.Module, x: torch.Tensor, mode: str = "auto",
               keep: Any = None, dense_gamma: float = 0.0) -> Iterator[list[str]]:
    """Within the block, ``network``'s convolutions (but those in ``keep``: LayerLRP's layer) as
    :class:`SignSplit` where :func:`conv_rule` says "zplus" or "gamma", and its BatchNorms (eval
    mode) passing each element's relevance on, as the other normalisations do (:func:`_elementwise`:
    the ε rule on ``(x − μ)·s + b`` let the shift take relevance, Σ ÷ score 256 on ResNet-18 with
    its biases zeroed; the same as folding the BatchNorm into the convolution before it, whose
    positive per-channel scale the z⁺ and γ rules cancel); yields the changes made, undone on exit,
    also on error. With ``dense_gamma`` > 0 (``params.gamma``), the dense layers (``nn.Linear``) take the
    same generalised γ rule (AttnLRP's for a transformer's projections; Captum's own ``GammaRule``
    assumes inputs ≥ 0, and on a transformer's mixed-sign activations made ViT-B/16's Σ ÷ score
    −1.4e8, bias-free)."""
    rule = conv_rule(network, x, mode)
    kept = {id(m) for m in (keep if isinstance(keep, (list, tuple)) else [keep]) if m is not None}
    swapped: list[tuple[str, nn.Module]] = []
    patched: list[nn.Module] = []
    try:
        convs = dense = 0
        for name, module in list(network.named_modules()):
            if not name or id(module) in kept:
                continue
            if rule != "epsilon" and isinstance(module, CONVOLUTIONS):
                _set(network, name, SignSplit(module, CONV_GAMMA if rule == "gamma" else None))
                swapped.append((name, module))
                convs += 1
            elif dense_gamma > 0 and isinstance(module, nn.Linear):
                _set(network, name, SignSplit(module, dense_gamma))
                swapped.append((name, module))
                dense += 1
            elif rule != "epsilon" and _affine_batchnorm(module) and "forward" not in vars(module):
                module.forward = _passing_forward(module)
                patched.append(module)
        said = ([f"{convs} convolutions: {rule}"] if convs else []) + \
            ([f"{dense} dense layers: gamma {dense_gamma:g}"] if dense else []) + \
            ([f"{len(patched)} BatchNorms: relevance passes"] if patched else [])
        if said:
            log.debug("LRP rules on the prepared copy: %s", "; ".join(said))
        yield said
    finally:
        for module in patched:
            vars(module).pop("forward", None)
        for name, module in reversed(swapped):
            _set(network, name, module)


def _functional_norm(name: str, args: tuple, kwargs: dict, pairs: bool) -> torch.Tensor:
    """``F.layer_norm`` / ``F.group_norm`` called by the model's code (SwinUNETR's ``proj_out``): no
    module a rule could sit on. For DeepLIFT, :func:`_normalise`'s exact multiplier; for LRP, the
    identity in the backward pass (each element keeps its relevance, as the norm modules' rule)."""
    x = args[0]
    if name == "layer_norm":
        shape = tuple(args[1] if len(args) > 1 else kwargs["normalized_shape"])
        weight = args[2] if len(args) > 2 else kwargs.get("weight")
        bias = args[3] if len(args) > 3 else kwargs.get("bias")
        eps = args[4] if len(args) > 4 else kwargs.get("eps", 1e-5)
        exact = F.layer_norm(x, list(shape), weight, bias, eps)
        if not pairs:
            return exact.detach() + x - x.detach()
        y = _normalise(x, tuple(range(x.ndim - len(shape), x.ndim)), eps, True)
        return _affine(y, weight, bias, shape)
    groups = args[1] if len(args) > 1 else kwargs["num_groups"]
    weight = args[2] if len(args) > 2 else kwargs.get("weight")
    bias = args[3] if len(args) > 3 else kwargs.get("bias")
    eps = args[4] if len(args) > 4 else kwargs.get("eps", 1e-5)
    exact = F.group_norm(x, groups, weight, bias, eps)
    if not pairs:
        return exact.detach() + x - x.detach()
    y = _normalise(x.reshape(x.shape[0], groups, -1), (2,), eps, True).reshape(x.shape)
    return _affine(y, weight, bias, (1, -1, *([1] * (x.ndim - 2))))


class _WholeModel(torch.overrides.TorchFunctionMode):
    """While a rule-based method runs: functional normalisations in the model's code as
    :func:`_functional_norm`; for LRP (not ``pairs``), the sum of two computed tensors of one shape
    (a residual or skip connection, ``x + f(x)``) a :class:`_ProportionalSum`. Sums with a
    parameter or a broadcast term (biases, position embeddings) are left alone; ``a.add_(b)`` too (a
    statement relying on its side effect). With ``leaves`` (Captum's LRP with z⁺ or γ on the
    convolutions), an average pooling called as a function outside every leaf module takes the ε
    rule (:func:`_pool_with_epsilon`)."""

    def __init__(self, pairs: bool, split_sums: bool = True, leaves: "_LeavesRunning | None" = None):
        super().__init__()
        self.pairs = pairs
        self.split_sums = split_sums and not pairs
        self.leaves = leaves

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if (self.leaves is not None and not self.leaves.count and name in _POOLS and args and torch.is_tensor(args[0])
                and args[0].requires_grad and torch.is_grad_enabled()):
            return _pool_with_epsilon(func, args, kwargs)
        if (name in ("layer_norm", "group_norm") and args and torch.is_tensor(args[0]) and args[0].requires_grad
                and torch.is_grad_enabled()):
            return _functional_norm(name, args, kwargs, self.pairs)
        if (self.split_sums and name in _SUMS and not kwargs and len(args) == 2
                and all(torch.is_tensor(a) and a.grad_fn is not None for a in args)
                and args[0].shape == args[1].shape and args[0].dtype == args[1].dtype and torch.is_grad_enabled()):
            return _ProportionalSum.apply(*args)
        return func(*args, **kwargs)


def _set(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    (root.get_submodule(parent) if parent else root)._modules[child] = module


def _own_view(module: nn.Module, args: tuple):
    """A forward pre-hook: ``module`` reads each tensor input through a view of its own."""
    if not any(torch.is_tensor(a) and a.requires_grad for a in args):
        return None
    return tuple(a.view_as(a) if torch.is_tensor(a) and a.requires_grad else a for a in args)


def _separate_inputs(network: nn.Module) -> list:
    """Every leaf module of ``network`` reads its tensor inputs through a view of its own, so what
    each layer's rule sends back stays its own until the views meet at the tensor: Captum's LRP
    multiplies the gradient at a layer's input by the input (relevance = gradient × input) once
    per tensor, and where the tensor also feeds a ``torch.cat`` skip connection or a sum, it
    multiplied their relevance by the input again (Σ ÷ score −2043 on a small MONAI UNet, bias-free;
    1.00 with the views). Values unchanged. Returns the hooks' handles."""
    return [m.register_forward_pre_hook(_own_view, prepend=True) for m in network.modules() if not m._modules]


def splits(network: nn.Module, x: torch.Tensor, branches: str = "auto") -> bool:
    """Whether LRP splits relevance at ``network``'s branches (:data:`BRANCHES`)."""
    if branches != "auto":
        return branches == "split"
    return any(normalisation(m) or isinstance(m, (nn.MultiheadAttention, ConstantAttention))
               for m in network.modules()) or bool(attention_names(network, x))


def check_branches(value: Any, path: str) -> None:
    """The JSON check of :data:`BRANCHES`."""
    if value not in BRANCH_MODES:
        raise ConfigError(path, f"branches must be one of {', '.join(map(repr, BRANCH_MODES))} (\"split\" makes "
                                f"relevance add up across skip connections and residual sums), not {value!r}")


@contextlib.contextmanager
def substituted(network: nn.Module, x: torch.Tensor, *, pairs: bool = False,
                branches: str = "auto", forward: nn.Module | None = None,
                conv_rule_used: str = "epsilon") -> Iterator[list[str]]:
    """Within the block, the substitutes on ``network`` (the prepared copy: see the module
    docstring), and for LRP (not ``pairs``) where :func:`splits` says so, relevance split at
    branches (:func:`_separate_inputs`, :class:`_ProportionalSum`); with ``pairs`` (DeepLIFT) a
    :class:`PairedSoftmax` for each softmax of the wrapper ``forward`` puts around ``network``;
    with ``conv_rule_used`` "zplus" or "gamma" (Captum's LRP: :func:`conv_rule`; the convolutions
    themselves are swapped by :func:`sign_split`), functional average poolings with the ε rule;
    yields the changes made (logged), undone on exit, also on error."""
    state = {"pairs": pairs}
    changes: list[str] = []
    swapped: list[tuple[str, nn.Module]] = []
    patched: list[nn.Module] = []
    views: list = []
    wrapper_swaps: list[tuple[str, nn.Module]] = []
    leaves: _LeavesRunning | None = None
    try:
        for name, module in list(network.named_modules()):
            if isinstance(module, nn.MultiheadAttention) and _supported_mha(module):
                swapped.append((name, module))
                _set(network, name, ConstantAttention(module, state))
                changes.append(f"{name}: attention weights constant (ConstantAttention)")
            elif normalisation(module) and "forward" not in vars(module):
                module.forward = _norm_forward(module, state)
                patched.append(module)
                changes.append(f"{name}: {type(module).__name__} with its standard deviation constant")
        for name in attention_names(network, x):
            module = network.get_submodule(name)
            if "forward" not in vars(module):
                module.forward = _scoped_forward(module, state)
                patched.append(module)
                changes.append(f"{name}: {type(module).__name__}'s attention weights constant")
            for inner, softmax in list(module.named_modules()):
                if type(softmax) is nn.Softmax:
                    swapped.append((f"{name}.{inner}", softmax))
                    _set(network, f"{name}.{inner}", PlainSoftmax(softmax.dim))
        for name in _wrapper_softmaxes(forward, network) if pairs else ():
            swapped_in = forward.get_submodule(name)
            _set(forward, name, PairedSoftmax(swapped_in.dim))
            wrapper_swaps.append((name, swapped_in))
            changes.append(f"the wrapper's {name}: softmax with DeepLIFT's exact multiplier (PairedSoftmax)")
        if changes:
            log.debug("substitutes on the prepared copy%s: %s", " (DeepLIFT pairs)" if pairs else "",
                      "; ".join(changes))
        split = not pairs and splits(network, x, branches)
        if split:
            views = _separate_inputs(network)
        if not pairs and conv_rule_used != "epsilon":
            leaves = _LeavesRunning(network)
        with _WholeModel(pairs, split_sums=split, leaves=leaves):
            yield changes
    finally:
        for handle in views:
            handle.remove()
        if leaves is not None:
            leaves.remove()
        for module in patched:
            vars(module).pop("forward", None)
        for name, module in reversed(swapped):
            _set(network, name, module)
        for name, module in reversed(wrapper_swaps):
            _set(forward, name, module)


_attention_cache: "weakref.WeakKeyDictionary[nn.Module, tuple[str, ...]]" = weakref.WeakKeyDictionary()


def attention_names(network: nn.Module, x: torch.Tensor) -> tuple[str, ...]:
    """The attention modules of ``network`` other than ``nn.MultiheadAttention`` (found on one
    forward pass of ``x``: :func:`esegeta.attribution.architectures.attention`), by name;
    remembered per network (the prepared copy is cached: its structure does not change)."""
    if any(isinstance(m, (nn.MultiheadAttention, ConstantAttention)) for m in network.modules()):
        return ()
    if network not in _attention_cache:
        _attention_cache[network] = tuple(label.rsplit(" (", 1)[0] for label in attention(network, x)
                                          if not label.startswith("("))
    return _attention_cache[network]


def unsupported_attention(network: nn.Module) -> list[str]:
    """The ``nn.MultiheadAttention`` modules the substitute does not cover (by name), with why."""
    return [f"{name} (MultiheadAttention with {'bias_k/bias_v' if m.bias_k is not None else 'add_zero_attn'})"
            for name, m in network.named_modules()
            if isinstance(m, nn.MultiheadAttention) and (m.bias_k is not None or m.add_zero_attn)]


def applies(spec: Any) -> bool:
    """Whether ``spec``'s method runs on the substitutes (its axiom is one of :data:`AXIOMS`)."""
    return getattr(spec, "axiom", "") in AXIOMS


@contextlib.contextmanager
def for_method(spec: Any, network: nn.Module | None, x: torch.Tensor,
               params: dict | None = None, forward: nn.Module | None = None) -> Iterator[list[str]]:
    """:func:`substituted` where ``spec``'s method needs it (:func:`applies`), else nothing;
    ``params`` (the call's) may set :data:`BRANCHES` and :data:`CONV_RULE`; ``forward`` is the wrapped model."""
    if network is None or not applies(spec):
        yield []
        return
    params = params or {}
    branches = params.get(BRANCHES, "auto")
    convs = conv_rule(network, x, params[CONV_RULE]) if CONV_RULE in params else "epsilon"
    with substituted(network, x, pairs=spec.axiom in PAIRED, branches=branches, forward=forward,
                     conv_rule_used=convs) as changes:
        yield changes
