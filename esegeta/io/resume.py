"""``esegeta run --resume``: keep the results of an earlier run that are still valid.

A (method, input) result of the existing ``manifest.json`` is kept, and not recomputed, when

- its status is ``ok``, its record is in ``manifest.json`` or the run's journal, and every file
  it lists is present (files are written atomically, so a present file is complete);
- its ``key`` equals the key of the job now: a hash of everything that decides the numbers
  (:func:`job_key`): the method entry as it applies (id, label, params, layer, noise tunnel,
  wrapper, target, patch), the model section and a hash of the model's weights and buffers,
  the loaded input tensor (so its file content and preprocessing), ``runtime.seed``,
  ``runtime.amp`` and ``runtime.batch_size``, and the output formats and figure settings;
  for methods that may fit on the run's inputs (``Call.samples``: SHAP backgrounds, esegeta's
  own pattern methods; every library whose record says ``reads_samples``), also all the run's
  inputs.

What does not change the numbers (devices, threads, time limits) may differ. Which earlier
records exist, and when a record counts as done (its files and its journal line durable), is
the output folder's business: :mod:`esegeta.run.writer`.
"""
from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

import torch

log = logging.getLogger("esegeta")


def tensor_digest(tensors) -> str:
    """sha256 over tensors' dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def model_digest(model: torch.nn.Module) -> str:
    state = model.state_dict()
    return hashlib.sha256("".join(f"{k}:{tensor_digest([v])}" for k, v in state.items()).encode()).hexdigest()


def job_key(settings: dict[str, Any], model_hash: str, input_hash: str) -> str:
    """The key of one (method, input) result: equal keys, equal numbers (up to the device)."""
    text = json.dumps({"settings": settings, "model": model_hash, "input": input_hash}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class JobKeys:
    """:func:`job_key` of one method entry's settings on the model, for input after input: the settings
    are encoded once (a run of 20,000 inputs asks for a key per input and entry, and for some twice)."""

    def __init__(self, settings: dict[str, Any], model_hash: str):
        # the text job_key hashes, keys sorted: {"input": ..., "model": ..., "settings": ...}
        self._head = '{"input": '
        self._tail = (", " + json.dumps({"model": model_hash, "settings": settings}, sort_keys=True,
                                        default=str)[1:])

    def key(self, input_hash: str) -> str:
        text = self._head + json.dumps(input_hash) + self._tail
        return hashlib.sha256(text.encode()).hexdigest()[:32]


def reusable(previous: dict[tuple[str, str], dict[str, Any]], label: str, input_name: str,
             key: str) -> dict[str, Any] | None:
    """The earlier record for this job if it can stand for it now, else None."""
    record = previous.get((label, input_name))
    return record if record is not None and record["key"] == key else None
