"""Concept Relevance Propagation (Achtibat et al. 2023, "From attribution maps to human-understandable
explanations through Concept Relevance Propagation", Nature Machine Intelligence, arXiv:2206.03208), on zennit >= 0.5.

``zennit-crp`` 0.6 declares ``zennit<=0.4.6`` and cannot be installed beside esegeta's zennit. This
is its ``CondAttribution`` for channel concepts with ``exclude_parallel=True``: under a zennit
composite (``composite``, a name of zennit's registry, e.g. ``EpsilonPlusFlat``), the relevance
is initialised with the target's output, propagated to each conditioned layer's output, kept on
the ``conditions`` channels only (``{layer: [channels]}``), and propagated on from there to the
input (paths that bypass the layer are excluded); the heatmap is the input relevance summed over
channels, ``(B, 1, *spatial)``. Extras: per ``record_layers`` layer, the channels' relevance
(``ChannelConcept.attribute``: summed over space, divided by the sum of its absolute values) and
the ``top_k`` concepts; and, relevance maximisation over the run's inputs
(``ChannelConcept.reference_sampling`` with ``max_target="sum"``), the index of the input that
maximises each top concept for the explained class: its reference image (classifiers: a wrapper's
masks are frozen on the explained inputs only).
"""
from __future__ import annotations

import torch

from esegeta.attribution.architectures import network
from esegeta.compat import import_torchvision
from esegeta.errors import ConfigError, did_you_mean
from esegeta.hooks import removing
from esegeta.spec.registry import Call


def channel_relevance(relevance: torch.Tensor) -> torch.Tensor:
    """``ChannelConcept.attribute(relevance, abs_norm=True)``: (B, C) relevance per channel, L1-normalised."""
    per_channel = relevance.reshape(*relevance.shape[:2], -1).sum(-1)
    return per_channel / (per_channel.abs().sum(-1, keepdim=True) + 1e-10)


def _composite(name: str):
    """A zennit composite by its class name (``EpsilonPlusFlat``, as esegeta's ``zennit.*`` ids) or registry name."""
    import_torchvision()
    import zennit.composites as composites

    by_class = {cls.__name__: cls for cls in composites.COMPOSITES.values()}
    found = by_class.get(name) or composites.COMPOSITES.get(name)
    if found is None:
        raise ConfigError("params.composite", f"{name!r} is not a zennit composite" + did_you_mean(name, by_class))
    return found()


def conditional(call: Call, model, x: torch.Tensor, composite: str, conditions: dict, record: list[str],
                columns: list[int] | None = None):
    """(input relevance (B, C, *spatial), {layer: its relevance}) of one conditional attribution."""
    modules = dict(model.named_modules())
    for name in list(conditions) + list(record):
        if name not in modules:
            raise ConfigError("params.conditions" if name in conditions else "params.record_layers",
                              f"no layer {name!r} in the model" + did_you_mean(name, modules))
    outputs: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(module, args, output):
            outputs[name] = output
            output.retain_grad()
        return hook

    x = x.detach().clone().requires_grad_(True)
    with removing() as handles, _composite(composite).context(call.forward) as modified, torch.enable_grad():
        handles.extend(modules[n].register_forward_hook(keep(n)) for n in {*conditions, *record})
        out = modified(x)
        init = torch.zeros_like(out)
        columns = torch.as_tensor(columns, device=out.device) if columns is not None else out.argmax(1)
        rows = torch.arange(out.shape[0], device=out.device)
        init[rows, columns] = out.detach()[rows, columns]
        tensor, grad = out, init
        for name, channels in conditions.items():  # ordered from the output towards the input, as zennit-crp asks
            relevance = torch.autograd.grad(tensor, outputs[name], grad_outputs=grad, retain_graph=True)[0]
            mask = torch.zeros_like(relevance)
            mask[:, channels] = 1
            tensor, grad = outputs[name], relevance * mask
        torch.autograd.backward(tensor, grad)
    recorded = {n: (outputs[n].grad.detach() if outputs[n].grad is not None else torch.zeros_like(outputs[n]))
                for n in record}
    return x.grad.detach(), recorded


def crp(call: Call, *, composite: str = "EpsilonPlusFlat", conditions: dict | None = None,
        record_layers: list | None = None, top_k: int = 5) -> torch.Tensor:
    """Concept-conditional relevance of the target, (B, 1, *spatial); top concepts and references in ``call.extras``."""
    model = network(call.network)
    conditions = dict(conditions or {})
    record = list(record_layers or [])
    for name, channels in conditions.items():
        if not (isinstance(channels, list) and channels and all(isinstance(c, int) and c >= 0 for c in channels)):
            raise ConfigError(f"params.conditions.{name}", "give a non-empty list of channel indices")
    target = call.targets
    columns = target.ints() if target is not None else None
    relevance, recorded = conditional(call, model, call.inputs, composite, conditions, record, columns)
    for name, rel in recorded.items():
        per_channel = channel_relevance(rel)
        k = min(top_k, per_channel.shape[1])
        top = per_channel.topk(k, dim=1)
        call.extras.setdefault("concepts", {})[name] = torch.stack([top.indices.to(per_channel.dtype), top.values], 1)
        if call.samples is not None and call.forward is call.network and columns is not None:
            # a classifier (a wrapper's masks are frozen on the explained inputs only): the explained class
            _, sample_rel = conditional(call, model, call.samples, composite, {}, [name],
                                        [columns[0]] * call.samples.shape[0])
            sampled = channel_relevance(sample_rel[name])  # (N, C): the run's inputs, as reference_sampling
            call.extras.setdefault("references", {})[name] = sampled.argmax(0)[top.indices]
    return relevance.sum(1, keepdim=True)
