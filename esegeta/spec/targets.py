"""One target value: what is explained for each input of a call, in the forms upstream wants.

A call's target (:attr:`esegeta.spec.registry.Call.target`) is what the caller resolved: a class
index for the whole batch, a tensor of one index per input (``"predicted"``), or None.
:class:`Target` turns it into what each library takes: one int per input (TorchRay, SHAP,
LIME, grad-cam's targets), one class for the batch when there is one (grad-cam's
``target_idx``), zennit's one-hot output seed, or the explained column of a score matrix.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Target:
    """The target of each of ``n`` inputs; ``value`` is the int or tensor as given."""
    value: int | torch.Tensor
    n: int

    @classmethod
    def of(cls, value: Any, n: int) -> Target | None:
        """The target of a batch of ``n`` inputs, or None when nothing is targeted."""
        if value is None:
            return None
        if torch.is_tensor(value) and value.ndim > 0:
            return cls(value.reshape(-1), n)
        return cls(int(value), n)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return int(self.value[i]) if torch.is_tensor(self.value) else self.value

    def ints(self) -> list[int]:
        """One class index per input."""
        return [int(t) for t in self.value.tolist()] if torch.is_tensor(self.value) else [self.value] * self.n

    def uniform(self) -> int | None:
        """The one class of every input, or None when they differ."""
        values = set(self.ints())
        return values.pop() if len(values) == 1 else None

    def index(self, device: torch.device | str | None = None) -> torch.Tensor:
        """``(n,)`` long tensor of the classes, on ``device``."""
        if torch.is_tensor(self.value):
            return self.value.to(device=device, dtype=torch.long)
        return torch.full((self.n,), self.value, dtype=torch.long, device=device)

    def one_hot(self, scores: torch.Tensor) -> torch.Tensor:
        """The one-hot of the classes over the ``(n, K)`` ``scores``, in their dtype and device."""
        return torch.nn.functional.one_hot(self.index(scores.device), scores.shape[1]).to(scores)

    def column(self, scores: torch.Tensor) -> torch.Tensor:
        """Each input's explained score: ``scores[i, target_i]``."""
        return scores[torch.arange(scores.shape[0], device=scores.device), self.index(scores.device)]
