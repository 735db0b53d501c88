"""The JSON config (SPEC §3), validated with pydantic before any model runs.

Two stages: :func:`parse` checks structure and types (no imports beyond pydantic);
:func:`esegeta.params.check_method` then checks one method's id, layer use and parameter
names against the upstream signatures (imports the explainer libraries). The wrapper, patch and target
settings are :mod:`esegeta.request`'s (shared with ``explain``). Every fault is reported with
its JSON path, e.g. ``methods[2].params.n_step: unknown parameter ...; did you mean n_steps?``.
"""
from __future__ import annotations

import json
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, field_validator, model_validator

from .errors import ConfigError, did_you_mean
from .evaluation.settings import EvaluationConfig
from .request import PatchConfig, Target, WrapperConfig

FIGURE_METHODS = ("heat_map", "blended_heat_map", "masked_image", "alpha_scaling")
FIGURE_SIGNS = ("all", "positive", "negative", "absolute_value")

#: Keys of the SPEC that later releases bring (wherever they appear), with what to say until then.
NOT_YET = {
}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _comment() -> Any:
    """``_comment``: any JSON value, read by people only (the TorchEsegeta converter keeps what it could not map there)."""
    return Field(None, alias="_comment", description="notes for people; esegeta ignores it")


class ModelConfig(Strict):
    """How to build the model: a factory (``file.py:callable`` or ``module:callable``) and a
    state dict loaded with ``weights_only=True``; or ``weights`` alone as a TorchScript file."""

    factory: str | None = Field(None, description="'file.py:callable' (relative to the config) or 'module:callable'")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for the factory")
    weights: str | None = Field(None, description="state dict file (or TorchScript file without factory)")


class Normalize(Strict):
    mean: float | list[float]
    std: float | list[float]


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
    resize: list[Annotated[int, Field(gt=0)]] | None = None

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
        return self


class MethodEntry(Strict):
    """One method to run. ``params`` are the upstream keyword names."""

    id: str = Field(description="'<library>.<UpstreamName>', see `esegeta methods`")
    params: dict[str, Any] = Field(default_factory=dict)
    layer: str | None = Field(None, description="submodule name, for layer and neuron methods")
    noise_tunnel: dict[str, Any] | None = Field(None, description="wrap in captum NoiseTunnel: nt_type, nt_samples, stdevs, ...")
    label: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]*$", description="names the outputs (default: the id)")
    enabled: StrictBool = True
    wrapper: WrapperConfig | None = None
    target: Target = None
    patch: PatchConfig | None = Field(None, description="overrides the config's 'patch' for this method")
    device: str | None = Field(None, description="run this method on this device ('cpu', 'cuda:N'), "
                               "overriding runtime.devices")
    timeout_s: Annotated[float, Field(gt=0)] | None = Field(None, description="time limit of this method per "
                                                            "input, in seconds (overrides runtime.timeout_s)")
    comment: Any = _comment()

    @property
    def name(self) -> str:
        return self.label or self.id


class RuntimeConfig(Strict):
    """Where and how jobs run (see :mod:`esegeta.scheduling`)."""

    devices: str | list[str] = Field("auto", description="'auto' (every CUDA device, else the CPU), 'cpu', "
                                     "'cuda:N', or a list of devices")
    threads_per_device: Annotated[int, Field(ge=1)] = Field(1, description="worker threads per device, "
                                                            "each with its own copy of the model")
    amp: StrictBool = Field(False, description="mixed precision: autocast to bf16 on the CPU, fp16 on CUDA, for "
                            "methods measured safe there (esegeta methods --json: amp); the others, and a failed "
                            "or non-finite result, compute in fp32")
    tf32: StrictBool = Field(False, description="let CUDA compute float32 convolutions and matmuls in TF32 (10-bit "
                             "mantissa; faster on Ampere and newer GPUs, but every number changes); off: fp32 means fp32")
    timeout_s: Annotated[float, Field(gt=0)] | None = Field(None, description="time limit per (method, input) "
                                                            "in seconds; a method over it is stopped, status 'timeout'")
    batch_size: Annotated[int, Field(ge=1)] = Field(1, description="inputs of one shape explained in one upstream "
                                                    "call, for methods without a wrapper")
    seed: int = 0
    backend: Literal["local", "ray"] = Field("local", description="'local': worker threads in this process; 'ray': "
                                             "Ray Data actors, one model replica each (pip install esegeta[ray])")
    ray_address: str | None = Field(None, description="the Ray cluster to join ('auto', 'ray://host:10001'); "
                                    "none: a local cluster on this machine")


class FigureConfig(Strict):
    """How figures draw results (see :mod:`esegeta.figures`)."""

    method: Literal["map", "heat_map", "blended_heat_map", "masked_image", "alpha_scaling"] = Field(
        "map", description="'map': the input beside the map in raw units (diverging colours centred at zero for "
        "signed values, colour bar, clipping stated, frozen-mask outline); the others are captum's "
        "visualize_image_attr modes (values normalised)")
    sign: Literal["all", "positive", "negative", "absolute_value"] = "all"
    projection: Literal["mid", "mip"] = Field("mid", description="3D overview and captum-mode figures: mid-slices or "
                                          "max-intensity projections ('map' figures show both)")
    clip: Annotated[float, Field(gt=0, le=100)] | None = Field(
        99.5, description="'map' colours end at this percentile of |value| (outliers saturate; stated on the "
        "figure); null: the full range")


class OutputConfig(Strict):
    dir: str = "results"
    formats: list[Literal["npy", "png", "nii", "zarr"]] = Field(
        ["npy", "png", "nii"], description="per result: .npy, .png figure, .nii.gz (3D); 'zarr': per method one "
                                           "attribution dataset of every result (attributions/<label>.zarr)")
    figure: FigureConfig = Field(default_factory=FigureConfig)


class Config(Strict):
    """An esegeta run: a model, inputs, an optional wrapper and target, and methods."""

    schema_: str | None = Field(None, alias="$schema")
    model: ModelConfig
    inputs: InputsConfig
    wrapper: WrapperConfig | None = None
    target: Target = Field("predicted", description="class index or 'predicted'; with a wrapper, the wrapped column")
    patch: PatchConfig | None = Field(None, description="explain patch by patch (large 2D/3D inputs)")
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    methods: list[MethodEntry] = Field(min_length=1)
    evaluation: EvaluationConfig | None = Field(None, description="score the attributions with metrics and rank "
                                                "the methods (esegeta metrics; esegeta evaluate)")
    comment: Any = _comment()

    @model_validator(mode="after")
    def _unique_labels(self) -> "Config":
        seen: dict[str, int] = {}
        for i, method in enumerate(self.methods):
            if method.name in seen:
                raise ValueError(f"methods[{i}].label: {method.name!r} is already used by methods[{seen[method.name]}]; "
                                 "give each entry a unique 'label'")
            seen[method.name] = i
        for where, patch in [("patch", self.patch)] + [(f"methods[{i}].patch", m.patch)
                                                       for i, m in enumerate(self.methods)]:
            if patch is not None and len(patch.size) != self.inputs.spatial_dims:
                raise ValueError(f"{where}.size: needs {self.inputs.spatial_dims} sizes for "
                                 f"{self.inputs.spatial_dims}D inputs, got {patch.size}")
        return self


def json_schema() -> dict[str, Any]:
    schema = Config.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "esegeta config"
    return schema


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The pydantic model class that owns the key at ``loc`` (for 'did you mean' hints)."""
    model: Any = Config
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return None
        annotation = model.model_fields[part].annotation
        model = None
        for candidate in _flatten(annotation):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                model = candidate
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _flatten(annotation: Any) -> list[Any]:
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType, list):
        return [c for arg in typing.get_args(annotation) for c in _flatten(arg)]
    return [annotation]


def _message(error: dict) -> str:
    # Drop pydantic's union-member tags ('constrained-int', "literal['predicted']") from the path.
    loc = tuple(p for p in error["loc"] if not isinstance(p, str) or p.isidentifier() or p == "$schema")
    if error["type"] == "extra_forbidden" and loc and loc[-1] in NOT_YET:
        return f"{_loc(loc)}: {NOT_YET[loc[-1]]}"
    message = error["msg"].removeprefix("Value error, ")
    # Validators of a whole section name the key at fault as 'key: message'.
    owner = _model_at(loc + ("",))
    key, sep, rest = message.partition(": ")
    if sep and owner is not None and key in owner.model_fields:
        loc, message = loc + (key,), rest
    path = _loc(loc)
    if error["type"] == "extra_forbidden":
        owner = _model_at(loc)
        keys = [f.alias or n for n, f in owner.model_fields.items()] if owner else []
        return f"{path}: unknown key" + did_you_mean(str(loc[-1]), keys)
    if error["type"] == "missing":
        message = "required key is missing"
    return f"{path}: {message}" if path else message


def parse(data: Any) -> Config:
    """Validate the structure of a config dict (no imports, no files)."""
    if not isinstance(data, dict):
        raise ConfigError("", "a config is a JSON object")
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        by_path: dict[str, list[str]] = {}
        for error in exc.errors():
            path, message = _split(_message(error))
            if message not in by_path.setdefault(path, []):
                by_path[path].append(message)
        # A union (e.g. target: index or 'predicted') reports each member: one line per field.
        lines = [f"{path}: {' | or: '.join(messages)}" if path else "; ".join(messages)
                 for path, messages in by_path.items()]
        raise ConfigError("", "\n".join(lines)) from None


def _split(line: str) -> tuple[str, str]:
    """'path: message' → (path, message); a line without a path → ('', line)."""
    head, sep, tail = line.partition(": ")
    if sep and " " not in head:
        return head, tail
    return "", line


def read(path: str | Path) -> tuple[Config, Path]:
    """Load and validate a config file; returns it with the folder its paths are relative to."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("", f"config file {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise ConfigError("", f"{path} is not valid JSON: {exc}") from None
    return parse(data), path.resolve().parent


