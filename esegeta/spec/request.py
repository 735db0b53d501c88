"""One request: what a single explanation computes, resolved once and passed whole.

A :class:`Request` holds the method spec, its parameters (upstream names), layer, wrapper,
target, patch and noise tunnel. It is made in one of two places: :func:`resolve`, from a
config's method entry and the config's defaults (the one place where "the entry's value,
else the config's" is decided), or :func:`from_arguments`, from ``explain``'s arguments.
It is immutable: a retry with a smaller batch is a new request (:meth:`Request.replace`).

The pydantic parts a request holds (:class:`WrapperConfig`, :class:`PatchConfig`,
:data:`Target`) are defined here, their defaults stated once; :mod:`esegeta.spec.config` uses
them in its schema. This module imports neither torch nor the config.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from esegeta.spec import registry
from esegeta.errors import did_you_mean, shown
from esegeta.spec.validation import validation_error

if TYPE_CHECKING:
    from esegeta.spec.registry import MethodSpec


class Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class WrapperConfig(Frozen):
    """Turns a segmentation output into (B, K') scores (see :mod:`esegeta.attribution.wrappers`)."""
    name: str = Field(description="'threshold', 'multiclass', 'region' or 'file.py:callable'")
    channel: int = Field(0, ge=0, description="threshold: the output channel")
    threshold: float | Literal["otsu"] = Field(0.5, description="threshold: a number or 'otsu'")
    activation: Literal["none", "sigmoid", "softmax"] = "none"
    reduction: Literal["sum", "mean"] = "sum"
    mask: str | None = Field(None, description="region: the mask file")
    output: str | int | None = Field(None, description="key or index of the segmentation tensor in a dict/tuple output")
    options: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of a custom wrapper")

    @field_validator("name")
    @classmethod
    def _known(cls, value: str) -> str:
        if value in ("threshold", "multiclass", "region") or re.fullmatch(r".+:[A-Za-z_]\w*", value):
            return value
        raise ValueError(f"unknown wrapper {shown(value)}; use 'threshold', 'multiclass', 'region' or 'file.py:callable'"
                         + did_you_mean(value, ("threshold", "multiclass", "region")))

    @model_validator(mode="after")
    def _mask(self) -> "WrapperConfig":
        if self.name == "region" and not self.mask:
            raise ValueError("mask: the region wrapper needs a mask file with the input's spatial shape")
        if self.mask and self.name != "region":
            raise ValueError("mask: only the region wrapper uses a mask")
        builtin_only = {"channel", "threshold", "activation", "reduction", "mask", "output"} & self.model_fields_set
        if ":" in self.name and builtin_only:
            raise ValueError(f"a custom wrapper takes its settings in 'options': move {', '.join(sorted(builtin_only))} "
                             "into 'options'")
        if ":" not in self.name and self.options:
            raise ValueError("'options' are for custom wrappers ('file.py:callable'); built-in wrappers take "
                             "channel, threshold, activation, reduction, mask and output")
        return self


Target = Union[Annotated[int, Field(ge=0)], Literal["predicted"], None]


class PatchConfig(Frozen):
    """Explain the input patch by patch on torchio's grid (see :mod:`esegeta.attribution.patcher`)."""
    size: list[Annotated[int, Field(gt=0)]] = Field(min_length=2, max_length=3,
                                                    description="patch size per spatial axis (clipped to the input)")
    overlap: list[Annotated[int, Field(ge=0)]] | None = Field(
        None, description="overlap per spatial axis, even numbers smaller than size (torchio); default none")
    mode: Literal["local", "global"] = Field(
        "local", description="'local': each patch explained on its own, results blended; 'global': the score of "
                             "the stitched whole-input prediction, computed patch by patch")
    blend: Literal["average", "hann"] = Field("average", description="overlap blending (torchio's overlap_mode)")
    batch_size: int = Field(4, gt=0, description="patches per model call")

    @model_validator(mode="after")
    def _overlap(self) -> PatchConfig:
        if self.overlap is not None:
            if len(self.overlap) != len(self.size):
                raise ValueError(f"overlap: needs {len(self.size)} values, one per axis of size")
            if any(o % 2 for o in self.overlap):
                raise ValueError(f"overlap: {self.overlap} must be even numbers (torchio's grid)")
            if any(o >= s for o, s in zip(self.overlap, self.size)):
                raise ValueError(f"overlap: {self.overlap} must be smaller than size {self.size} on every axis")
        return self


def wrapper_config(value: WrapperConfig | Mapping[str, Any], where: str = "wrapper") -> WrapperConfig:
    """A validated wrapper. From Python a region ``mask`` may also be a tensor (configs name
    files): it is validated as a file name would be, then kept as given."""
    if isinstance(value, WrapperConfig):
        return value
    data = dict(value)
    mask = data.get("mask")
    tensor_mask = mask is not None and not isinstance(mask, (str, Path))
    if isinstance(mask, Path) or tensor_mask:
        data["mask"] = str(mask) if isinstance(mask, Path) else "<tensor>"
    try:
        config = WrapperConfig.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc, data, WrapperConfig, where) from None
    return config.model_copy(update={"mask": mask}) if tensor_mask else config


def patch_config(value: PatchConfig | Mapping[str, Any], where: str = "patch") -> PatchConfig:
    """A validated patch setting."""
    if isinstance(value, PatchConfig):
        return value
    try:
        return PatchConfig.model_validate(dict(value))
    except ValidationError as exc:
        raise validation_error(exc, dict(value), PatchConfig, where) from None


def _frozen_mapping(value: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    return None if value is None else MappingProxyType(dict(value))


@dataclass(frozen=True)
class Request:
    """One method on one model and input batch: everything but the data, immutable.

    ``params`` are upstream keyword arguments as given (defaults are the adapter's);
    ``target`` a class (or wrapped column) index, ``"predicted"``, or None."""
    spec: MethodSpec
    params: Mapping[str, Any] = field(default_factory=dict)
    layer: str | tuple[str, ...] | None = None
    wrapper: WrapperConfig | None = None
    target: int | Literal["predicted"] | None = None
    patch: PatchConfig | None = None
    noise_tunnel: Mapping[str, Any] | None = None

    def __post_init__(self):
        object.__setattr__(self, "params", _frozen_mapping(self.params))
        object.__setattr__(self, "noise_tunnel", _frozen_mapping(self.noise_tunnel))
        if isinstance(self.layer, list):  # several layers (a method that fuses them), immutable as the rest
            object.__setattr__(self, "layer", tuple(self.layer))

    def replace(self, **changes: Any) -> Request:
        """A copy with ``changes`` (e.g. ``params=`` halved after out-of-memory)."""
        return dataclasses.replace(self, **changes)

    def key_settings(self) -> dict[str, Any]:
        """What of the request decides its numbers, as JSON (part of the resume key)."""
        return {"id": self.spec.id, "params": dict(self.params),
                "layer": list(self.layer) if isinstance(self.layer, tuple) else self.layer,
                "noise_tunnel": dict(self.noise_tunnel) if self.noise_tunnel is not None else None,
                "wrapper": self.wrapper.model_dump(mode="json") if self.wrapper else None, "target": self.target,
                "patch": self.patch.model_dump(mode="json") if self.patch else None}


def from_arguments(method: str, *, target: Any = None, wrapper: Mapping[str, Any] | WrapperConfig | None = None,
                   layer: str | list[str] | None = None, noise_tunnel: Mapping[str, Any] | None = None,
                   patch: Mapping[str, Any] | PatchConfig | None = None,
                   params: Mapping[str, Any] | None = None) -> Request:
    """The request ``explain(model, x, method, target, wrapper=..., ...)`` stands for."""
    spec = registry.get(method, "method")
    return Request(spec, params or {}, layer, wrapper_config(wrapper) if wrapper is not None else None, target,
                   patch_config(patch) if patch is not None else None, noise_tunnel)
