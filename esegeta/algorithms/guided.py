"""Guided backpropagation of one channel's mean activation at a layer (Springenberg et al. 2015,
arXiv:1412.6806), the "layer activation with guided backprop" of TorchEsegeta's CNN
visualisations. Captum's ``NeuronGuidedBackprop`` computes it when given a callable neuron
selector, which a JSON config cannot express: this method passes
``lambda out: out[:, channel].mean(spatial)`` and otherwise returns Captum's result.
"""
from __future__ import annotations

import torch

from esegeta.errors import ConfigError
from esegeta.spec.registry import Call
from esegeta.attribution.architectures import token_grid


def layer_activation_guided_backprop(call: Call, *, channel: int | None = None) -> torch.Tensor:
    """Guided backprop of the mean of ``channel`` of ``call.layer``'s output, (B, C, *spatial).

    ``channel``: the channel index; null (default) takes, per input, the channel with the
    largest mean activation. A token layer's channels are its features, averaged over the token
    grid (:func:`esegeta.attribution.architectures.token_grid`): a token's mean after LayerNorm is constant.
    """
    if call.layer is None:
        raise ConfigError("layer", "esegeta.LayerActivationGuidedBackprop needs a layer (with patches: mode 'local')")
    with token_grid(call) as on_grid:  # a token layer: its features are the channels, over the token grid
        return _guided(on_grid, channel)


def _guided(call: Call, channel: int | None) -> torch.Tensor:
    from captum.attr import NeuronGuidedBackprop

    out = call.layer_output()
    if not torch.is_tensor(out) or out.ndim < 2:
        raise ConfigError("layer", "the layer's output is not a tensor (batch, channels, ...)")
    dims = tuple(range(2, out.ndim))
    if channel is None:
        index = (out.mean(dim=dims) if dims else out).argmax(dim=1)
    elif channel >= out.shape[1]:
        raise ConfigError("params.channel", f"channel {channel} does not exist: the layer has {out.shape[1]} channels")
    else:
        index = torch.full((out.shape[0],), channel, device=out.device)
    rows = torch.arange(out.shape[0], device=out.device)

    def selector(activation: torch.Tensor) -> torch.Tensor:
        chosen = activation[rows, index]
        return chosen.mean(dim=tuple(range(1, chosen.ndim))) if chosen.ndim > 1 else chosen

    return NeuronGuidedBackprop(call.forward, call.layer).attribute(call.inputs, neuron_selector=selector)
