"""The config's sections that loading reads (``model``, ``inputs``), and :func:`section`, the one
boundary where a dict from Python becomes one. Apart from :mod:`esegeta.spec.config` (which
re-exports them) so that loading, and the call path through it, import pydantic only, not the
registry, request and evaluation settings the whole config needs.
"""
from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from esegeta.errors import ConfigError
from esegeta.spec.validation import validation_error

#: Most pixels (voxels) per channel ``inputs.resize`` may ask for (512³, 512 MiB per channel as float32).
MAX_VOXELS = 512**3


class Strict(BaseModel):
    """A config section: unknown keys refused, no type coercion (``"32"`` is not a number)."""
    model_config = ConfigDict(extra="forbid", strict=True)


class ModelConfig(Strict):
    """How to build the model: a factory (``file.py:callable`` or ``module:callable``) and a
    state dict loaded with ``weights_only=True``; or ``weights`` alone as a TorchScript file; or
    ``nnunet``, a trained nnU-Net v2 model folder (:mod:`esegeta.io.nnunet`), with its ``fold`` and
    ``checkpoint``."""
    factory: str | None = Field(None, description="'file.py:callable' (relative to the config) or 'module:callable'")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for the factory")
    weights: str | None = Field(None, description="state dict file (or TorchScript file without factory)")
    nnunet: str | None = Field(None, min_length=1, description="a trained nnU-Net v2 model folder (plans.json, "
                               "dataset.json, fold_N/); its plans give the input transform and the patch defaults "
                               "(pip install esegeta[nnunet])")
    fold: Annotated[int, Field(ge=0, le=999)] | Literal["all"] | None = Field(
        None, description="with 'nnunet': the fold whose checkpoint to load (fold_N), default 0")
    checkpoint: str | None = Field(None, min_length=1, pattern=r"^[^/\\]+$", description="with 'nnunet': the "
                                   "checkpoint file in the fold's folder, default 'checkpoint_final.pth'")

    @model_validator(mode="after")
    def _one_kind(self) -> "ModelConfig":
        if self.nnunet is not None:
            given = [k for k in ("factory", "weights") if getattr(self, k) is not None] + (["kwargs"] if self.kwargs else [])
            if given:
                raise ValueError(f"{given[0]}: 'nnunet' loads the network from its trained-model folder; remove "
                                 f"{' and '.join(repr(k) for k in given)} (or 'nnunet')")
            self.fold = 0 if self.fold is None else self.fold
            self.checkpoint = self.checkpoint or "checkpoint_final.pth"
        else:
            for key in ("fold", "checkpoint"):
                if getattr(self, key) is not None:
                    raise ValueError(f"{key}: belongs to a trained nnU-Net model; give 'nnunet' (its folder) or "
                                     f"remove {key!r}")
        return self


class Normalize(Strict):
    mean: float | list[float]
    std: float | list[float]

    @field_validator("std")
    @classmethod
    def _positive(cls, value: float | list[float]) -> float | list[float]:
        if any(v <= 0 for v in (value if isinstance(value, list) else [value])):
            raise ValueError(f"std {value} must be positive (the input is divided by it)")
        return value


class InputsConfig(Strict):
    """Files to explain (paths, globs or folders; .png/.jpg/.npy/.pt/.nii/.nii.gz) and their preprocessing.

    Images load as (C, H, W) in [0, 1]; arrays and NIfTI volumes keep their values. The model
    gets (C, *spatial) with 3D volumes depth last, as torchio and NIfTI order them: NIfTI
    stays in its voxel order (x, y, z) (affine kept in and out); a ``.npy``/``.pt`` volume
    stored depth first, (D, H, W), declares ``depth_axis: "first"`` and is fed as (H, W, D).
    Results are written back in the file's own axis order (depth first again; channels last
    with ``channel_axis: "last"``)."""
    paths: list[str] | None = Field(None, min_length=1, description="files, globs or folders (streamed, never "
                                    "all in memory); or give 'dataset'")
    dataset: str | None = Field(None, description="'file.py:callable' or 'module:callable' returning a torch "
                                "Dataset of inputs, or of (input, label) pairs or {'input', 'label'} dicts")
    dataset_kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for 'dataset'")
    spatial_dims: Literal[2, 3]
    depth_axis: Literal["first", "last"] = Field(
        "last", description="3D .npy/.pt arrays: depth axis first (D, H, W) or last (H, W, D); the model gets depth "
                            "last; NIfTI keeps its (x, y, z) order")
    channel_axis: Literal["auto", "first", "last", "none"] = Field(
        "auto", description="where files keep channels; 'auto': first for arrays, last for images and 4D NIfTI; "
                            "'none': no channel axis (one channel)")
    color: Literal["keep", "grayscale", "rgb"] = "keep"
    normalize: Literal["none", "zscore", "minmax"] | Normalize = "none"
    resize: list[Annotated[int, Field(gt=0)]] | None = Field(None, description="resize to these sizes (one per "
                                                             "spatial axis; at most 512³ pixels in all)")

    @field_validator("paths", mode="before")
    @classmethod
    def _one_path(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _one_source(self) -> "InputsConfig":
        if (self.paths is None) == (self.dataset is None):
            raise ValueError("paths: give either 'paths' (files, globs or folders) or 'dataset' "
                             "('file.py:callable' returning a torch Dataset), not both" if self.paths
                             else "paths: required key is missing (or give 'dataset')")
        return self

    @model_validator(mode="after")
    def _resize_rank(self) -> "InputsConfig":
        if self.resize is not None and len(self.resize) != self.spatial_dims:
            raise ValueError(f"resize: needs {self.spatial_dims} sizes (one per spatial axis)")
        if self.resize is not None and math.prod(self.resize) > MAX_VOXELS:
            raise ValueError(f"resize: {self.resize} is {math.prod(self.resize):,} pixels per channel "
                             f"({math.prod(self.resize) * 4 / 2**30:.1f} GiB each as float32); at most {MAX_VOXELS:,} "
                             "(512³); explain large inputs with 'patch'")
        return self


def section(cls: type[Strict], value: Any, path: str) -> Any:
    """``value`` as the config section ``cls`` (e.g. :class:`InputsConfig`): returned as it is when
    already one, else a mapping from Python validated once, here, its faults named under ``path``.
    Loaders take the typed section and read its attributes, so no default is stated twice."""
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise ConfigError(path, f"give an object of {', '.join(cls.model_fields)}, not {type(value).__name__}")
    try:
        return cls.model_validate(value)
    except ValidationError as exc:
        raise validation_error(exc, value, cls, prefix=path) from None
