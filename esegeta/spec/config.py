"""The JSON config, validated with pydantic before any model runs.

Two stages: :func:`parse` checks structure and types (no imports beyond pydantic);
:func:`esegeta.spec.params.check_method` then checks one method's id, layer use and parameter
names against the upstream signatures (imports the explainer libraries). The wrapper, patch and target
settings are :mod:`esegeta.spec.request`'s (shared with ``explain``). Every fault is reported with
its JSON path, e.g. ``methods[2].params.n_step: unknown parameter ...; did you mean n_steps?``.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, StrictBool, ValidationError, field_validator, model_validator

from esegeta.errors import ConfigError, json_path
from esegeta.spec import registry
from esegeta.spec.registry import MethodSpec
from esegeta.spec.evaluation import EvaluationConfig
from esegeta.spec.request import PatchConfig, Request, Target, WrapperConfig
from esegeta.spec.validation import validation_error
from esegeta.spec.sections import MAX_VOXELS, InputsConfig, ModelConfig, Normalize, Strict, section  # noqa: F401 (their home until now)

FIGURE_METHODS = ("heat_map", "blended_heat_map", "masked_image", "alpha_scaling")
FIGURE_SIGNS = ("all", "positive", "negative", "absolute_value")

#: Longest method label: output files are named ``<label>.<input>.<ext>`` within the 255-byte name limit.
MAX_LABEL = 100
#: Longest time limit (one week); a larger one is a typo, and timers cannot wait forever.
MAX_TIMEOUT_S = 7 * 24 * 3600.0

#: Config keys that later releases bring (wherever they appear), with what to say until then.
NOT_YET = {
}


def _comment() -> Any:
    """``_comment``: any JSON value, read by people only (the TorchEsegeta converter keeps what it could not map there)."""
    return Field(None, alias="_comment", description="notes for people; esegeta ignores it")


class MethodEntry(Strict):
    """One method to run. ``params`` are the upstream keyword names."""
    id: str = Field(description="'<library>.<UpstreamName>', see `esegeta methods`")
    params: dict[str, Any] = Field(default_factory=dict)
    layer: str | list[str] | None = Field(None, description="submodule name, for layer and neuron methods; a list "
                                          "of names for a method that fuses several layers (the RefineCAMs)")
    noise_tunnel: dict[str, Any] | None = Field(None, description="wrap in captum NoiseTunnel: nt_type, nt_samples, stdevs, ...")
    label: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]*$", max_length=MAX_LABEL,
                              description="names the outputs (default: the id); letters, digits, '._+-', at most "
                                          f"{MAX_LABEL} characters, so output file names stay short enough")
    enabled: StrictBool = True
    wrapper: WrapperConfig | None = None
    target: Target = None
    patch: PatchConfig | None = Field(None, description="overrides the config's 'patch' for this method")
    device: str | None = Field(None, description="run this method on this device ('cpu', 'cuda:N'), "
                               "overriding runtime.devices")
    timeout_s: Annotated[float, Field(gt=0, le=MAX_TIMEOUT_S)] | None = Field(None, description="time limit of this method per "
                                                            "input, in seconds (overrides runtime.timeout_s)")
    comment: Any = _comment()

    @property
    def name(self) -> str:
        return self.label or self.id


class RuntimeConfig(Strict):
    """Where and how jobs run (see :mod:`esegeta.attribution.scheduling`)."""
    devices: str | list[str] = Field("auto", description="'auto' (every CUDA device, else the CPU), 'cpu', "
                                     "'cuda:N', or a list of devices")
    threads_per_device: Annotated[int, Field(ge=1, le=256)] = Field(1, description="worker threads per device, "
                                                            "each with its own copy of the model")
    amp: StrictBool = Field(False, description="mixed precision: autocast to bf16 on the CPU, fp16 on CUDA, for "
                            "methods measured safe there (esegeta methods --json: amp); the others, and a failed "
                            "or non-finite result, compute in fp32")
    tf32: StrictBool = Field(False, description="let CUDA compute float32 convolutions and matmuls in TF32 (10-bit "
                             "mantissa; faster on Ampere and newer GPUs, but every number changes); off: fp32 means fp32")
    timeout_s: Annotated[float, Field(gt=0, le=MAX_TIMEOUT_S)] | None = Field(None, description="time limit per (method, input) "
                                                            "in seconds; a method over it is stopped, status 'timeout'")
    batch_size: Annotated[int, Field(ge=1, le=65536)] = Field(1, description="inputs of one shape explained in one upstream "
                                                    "call, for methods without a wrapper")
    seed: Annotated[int, Field(ge=0, lt=2**63)] = 0
    memory_gb: Annotated[float, Field(gt=0, le=1 << 20)] | None = Field(
        None, description="the memory budget per device in GiB that `esegeta check` plans each method's batch to "
        "(global patches: patches per model call); default: what the device has free")
    backend: Literal["local", "ray"] = Field("local", description="'local': worker threads in this process; 'ray': "
                                             "Ray Data actors, one model replica each (pip install esegeta[ray])")
    ray_address: str | None = Field(None, description="the Ray cluster to join ('auto', 'ray://host:10001'); "
                                    "none: a local cluster on this machine")


class FigureConfig(Strict):
    """How figures draw results (see :mod:`esegeta.show.figures`)."""
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
    mask_outline: Literal["all", "input", "none"] = Field(
        "all", description="where a wrapper's frozen mask is outlined: on the input and the map panels, on the "
        "input only (the map's signal stays uncovered), or nowhere")


class SummariesConfig(Strict):
    """Relevance totals per region of a label map and per input channel (:mod:`esegeta.attribution.summaries`)."""
    labels: str | None = Field(None, min_length=1, description="the label map: a file (NIfTI, image, .npy, .pt; "
                               "relative to the config) with the input's spatial shape as the model sees it (no "
                               "resampling), or 'prediction': the model's predicted classes on each input; none: "
                               "channel totals only")
    names: dict[str, str] | str | None = Field(None, description="label id -> name ({\"1\": \"tumour core\"}) or a "
                                               "JSON file holding that object")
    channels: list[str] | None = Field(None, min_length=1, description="one name per input channel, e.g. the MR "
                                       "sequences [\"T1\", \"T1ce\", \"T2\", \"FLAIR\"]")


class OutputConfig(Strict):
    dir: str = Field("results", min_length=1, max_length=1024)
    formats: list[Literal["npy", "png", "nii", "zarr"]] = Field(
        ["npy", "png", "nii"], description="per result: .npy, .png figure, .nii.gz (3D); 'zarr': per method one "
                                           "attribution dataset of every result (attributions/<label>.zarr)")
    figure: FigureConfig = Field(default_factory=FigureConfig)
    summaries: SummariesConfig | None = Field(None, description="per result, relevance per region of a label map "
                                              "(sum, mean, share) and per input channel: summaries.csv, the manifest, "
                                              "the report")

    @field_validator("dir")
    @classmethod
    def _a_folder_name(cls, value: str) -> str:
        if "\x00" in value:
            raise ValueError("a folder name cannot hold a NUL character")
        return value


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


def parse(data: Any) -> Config:
    """Validate the structure of a config dict (no imports, no files)."""
    if not isinstance(data, dict):
        raise ConfigError("", f"a config is a JSON object ({{...}}), not {type(data).__name__}")
    check_values(data)
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc, data, Config, not_yet=NOT_YET) from None


#: Deepest nesting of lists and objects a config may have (a config needs about 6).
MAX_DEPTH = 32
#: Most digits of a JSON integer (no setting needs more; Python refuses over 4,300).
MAX_DIGITS = 30


class _Duplicates(dict):
    """A JSON object that had a key more than once (``duplicates`` lists them)."""
    duplicates: list[str]


class _HugeInteger(str):
    """A JSON integer with more than :data:`MAX_DIGITS` digits, kept as its text."""


def _pairs(pairs: list[tuple[str, Any]]) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) == len(keys):
        return dict(pairs)
    out = _Duplicates(pairs)
    out.duplicates = sorted({k for k in keys if keys.count(k) > 1})
    return out


def _integer(text: str) -> int | _HugeInteger:
    return _HugeInteger(text) if len(text.lstrip("-")) > MAX_DIGITS else int(text)


def _not_json(name: str) -> float:
    raise ValueError(f"{name} is not JSON (JSON numbers are finite)")


def loads(text: str) -> Any:
    """JSON text → data, keeping what :func:`check_values` refuses visible (duplicate keys,
    huge integers); ``NaN``/``Infinity`` (not JSON) are refused here."""
    return json.loads(text, object_pairs_hook=_pairs, parse_int=_integer, parse_constant=_not_json)


def check_values(data: Any) -> None:
    """ConfigError at the first value no setting can take, wherever it is: an object with a key
    twice (JSON readers disagree which wins), an integer of more than :data:`MAX_DIGITS` digits,
    a number that is not finite (``1e999``), nesting deeper than :data:`MAX_DEPTH`."""
    stack: list[tuple[Any, tuple]] = [(data, ())]
    while stack:
        value, where = stack.pop()
        if len(where) > MAX_DEPTH:
            raise ConfigError(json_path(where[:MAX_DEPTH]), f"nested more than {MAX_DEPTH} levels deep; no setting takes "
                                                       "that")
        if isinstance(value, _Duplicates):
            raise ConfigError(json_path(where), f"key {', '.join(map(repr, value.duplicates))} appears "
                              "more than once in this object; keep one (JSON readers disagree which one wins)")
        if isinstance(value, _HugeInteger):
            raise ConfigError(json_path(where), f"an integer of {len(value.lstrip('-'))} digits; no setting takes more "
                                           f"than {MAX_DIGITS}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(json_path(where), f"{value} is not a finite number; use a finite value")
        if isinstance(value, dict):
            stack += [(v, where + (k,)) for k, v in reversed(value.items())]
        elif isinstance(value, (list, tuple)):
            stack += [(v, where + (i,)) for i, v in reversed(list(enumerate(value)))]


def read(path: str | Path) -> tuple[Config, Path]:
    """Load and validate a config file; returns it with the folder its paths are relative to.

    A file that is not a JSON object (unreadable, not UTF-8, not JSON) is a ConfigError whose
    path is the file's name; every other fault names its JSON path."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("", f"config file {path} does not exist")
    where = str(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(where, f"not UTF-8 text (byte {exc.start}: {exc.reason}); save the config as UTF-8") from None
    except OSError as exc:
        raise ConfigError(where, f"cannot be read: {exc.strerror or exc}") from None
    try:
        data = loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(where, f"is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}") from None
    except RecursionError:
        raise ConfigError(where, f"nested too deeply to read (a config needs about 6 levels, at most {MAX_DEPTH})") from None
    except ValueError as exc:
        raise ConfigError(where, f"is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(where, f"a config is a JSON object ({{...}}), not a JSON {_json_type(data)}")
    try:
        check_values(data)
    except ConfigError as exc:  # a fault of the whole object: name the file
        raise ConfigError(exc.path or where, exc.message) from None
    return parse(data), path.resolve().parent


def _json_type(value: Any) -> str:
    return {list: "array", str: "string", bool: "boolean", type(None): "null", int: "number",
            float: "number", _HugeInteger: "number"}.get(type(value), "value")


#: What a method entry may set for itself instead of taking the config's value.
OVERRIDABLE = ("wrapper", "target", "patch", "timeout_s", "device")


@dataclass(frozen=True)
class Resolved:
    """A config's method entry made ready to run: its request and what the runner adds.

    ``index`` is the entry's place in ``methods`` (it seeds the jobs); ``device`` the entry's
    own device(s), or None for the run's; ``own`` the fields of :data:`OVERRIDABLE` the entry sets."""
    request: Request
    label: str
    index: int
    timeout_s: float | None
    device: str | list[str] | None
    own: frozenset[str]

    @property
    def spec(self) -> MethodSpec:
        return self.request.spec

    def where(self, name: str) -> str:
        """The JSON path of ``name``: the entry's field if it sets it, else the config's."""
        return f"methods[{self.index}].{name}" if name in self.own else name


def resolve(entry: MethodEntry, config: Config, index: int) -> Resolved:
    """``config.methods[index]`` with every unset field taken from the config (the one place)."""
    own = frozenset(name for name in OVERRIDABLE if getattr(entry, name) is not None)
    top = {"wrapper": config.wrapper, "target": config.target, "patch": config.patch,
           "timeout_s": config.runtime.timeout_s, "device": None}
    value = {name: getattr(entry, name) if name in own else top[name] for name in OVERRIDABLE}
    request = Request(registry.get(entry.id, f"methods[{index}].id"), entry.params, entry.layer, value["wrapper"],
                      value["target"], value["patch"], entry.noise_tunnel)
    return Resolved(request, entry.name, index, value["timeout_s"], value["device"], own)
