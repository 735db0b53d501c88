"""Class activation mapping, CAM (Zhou et al. 2016, CVPR, arXiv:1512.04150).

For a network whose head is global average pooling followed by one linear layer,
``score_c = Σ_k w_{c,k} mean(A_k) + b_c`` with ``A`` the pooled feature maps, and
``CAM_c = Σ_k w_{c,k} A_k`` (no bias) at the feature maps' resolution. The head is found
by running the model once: the model's output must be the output of its last
``nn.Linear``, whose input must be the spatial mean of the named layer's output
(a pooling module or a functional mean in between, plus flatten/dropout, are all fine).
Grad-CAM generalises CAM: on such a head the gradients are ``w_{c,k} / (h·w)``, so CAM is
Grad-CAM without its ReLU times the number of positions ``h·w``.
"""
from __future__ import annotations

import torch
from torch import nn

from esegeta.errors import ConfigError
from esegeta.hooks import removing
from esegeta.spec.registry import Call


def _record(network: nn.Module, x: torch.Tensor, modules: dict[str, nn.Module]) -> tuple[torch.Tensor, list]:
    """The network's output on ``x`` and, in call order, (name, module, input, output) of ``modules``."""
    seen: list = []
    with removing() as handles, torch.no_grad():
        handles.extend(m.register_forward_hook(lambda m, i, o, n=n: seen.append((n, m, i[0], o))) for n, m in modules.items())
        out = network(x)
    return out, seen


def _is_spatial_mean(features: torch.Tensor, pooled: torch.Tensor) -> bool:
    """Whether ``pooled`` is the spatial mean of ``features`` (maps of more than one position)."""
    if not torch.is_tensor(features) or features.ndim < 3 or features.shape[2:].numel() < 2 \
            or features.shape[0] != pooled.shape[0]:
        return False
    mean = features.mean(dim=tuple(range(2, features.ndim))).flatten(1)
    flat = pooled.flatten(1)
    return mean.shape == flat.shape and torch.allclose(mean, flat, rtol=1e-4, atol=1e-5)


def _feature_layer_hint(network: nn.Module, x: torch.Tensor, pooled: torch.Tensor) -> str:
    """'; use layer X' naming the last module whose output the head pools, if any."""
    named = {n.removeprefix("model."): m for n, m in network.named_modules() if n and ".sites." not in n}
    _, seen = _record(network, x, named)
    names = [n for n, _, _, o in seen if _is_spatial_mean(o, pooled)]
    return f"; use layer {names[-1]!r}" if names else ""


def head(network: nn.Module, layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, nn.Linear]:
    """(feature maps of ``layer`` on ``x``, the linear layer of the GAP→linear head), or a ConfigError."""
    linears = {n: m for n, m in network.named_modules() if isinstance(m, nn.Linear)}
    out, seen = _record(network, x, {"layer": layer, **linears})
    calls = [(m, i, o) for n, m, i, o in seen if n != "layer"]
    if not calls or not torch.is_tensor(out) or not torch.equal(calls[-1][2], out):
        raise ConfigError("model", "esegeta.CAM needs a classifier whose output is a linear layer after global "
                                   "average pooling; this model's output is not a linear layer's output: use "
                                   "captum.LayerGradCam, which generalises CAM to any network")
    linear, pooled, _ = calls[-1]
    features = next(o for n, _, _, o in seen if n == "layer")
    if not _is_spatial_mean(features, pooled):
        hint = _feature_layer_hint(network, x, pooled)
        raise ConfigError("layer", "esegeta.CAM is defined at the feature maps that global average pooling feeds "
                                   "to the final linear layer, and the named layer's output is not what it pools"
                                   + (hint or "; this model has no GAP→linear head: use captum.LayerGradCam"))
    return features, linear


def cam(call: Call) -> torch.Tensor:
    """CAM of ``call.target`` at ``call.layer``: (B, 1, *layer spatial), ``Σ_k w_{c,k} A_k``."""
    if call.target is None:
        raise ConfigError("target", "esegeta.CAM needs a target class (an index or 'predicted')")
    features, linear = head(call.network, call.layer, call.inputs)
    target = torch.as_tensor(call.target, device=features.device).reshape(-1).expand(features.shape[0])
    weights = linear.weight.detach()[target]  # (B, K)
    return torch.einsum("bk...,bk->b...", features, weights).unsqueeze(1)
