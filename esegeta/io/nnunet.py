"""Trained nnU-Net v2 models (``"model": {"nnunet": FOLDER, "fold": 0, "checkpoint": "checkpoint_final.pth"}``).

Everything is done with nnU-Net's own code, as its predictor does
(``nnUNetPredictor.initialize_from_trained_model_folder``, ``DefaultPreprocessor.run_case`` and
``export_prediction``), without its file output:

- **the network**: the plans (``plans.json``, ``dataset.json``) through ``PlansManager``; the
  checkpoint's ``trainer_name`` and ``init_args['configuration']``; the trainer class's
  ``build_network_architecture`` with deep supervision off; its ``network_weights``; eval mode.
  A 2D configuration is wrapped in :class:`SliceWise`, so it explains a 3D case slice by slice, as
  nnU-Net predicts one (2D inputs go straight through).
- **the input transform**: a case is one file per channel (``case_0000.nii.gz``, ``case_0001.nii.gz``,
  dataset.json's ``file_ending``), read by the plans' reader, transposed, cropped to its nonzero
  region, normalised by the configuration's schemes with the fingerprint's foreground intensities
  (``CTNormalization``, ``ZScoreNormalization``...) and resampled to the configuration's spacing.
- **padding**: a case is padded with zeros (as nnU-Net pads one smaller than its patch) to at least the
  patch and a multiple of the network's downsampling, so the network also runs on the whole case.
- **maps back in the source geometry**: :class:`CaseGeometry` undoes it (the padding cut, resampling as nnU-Net
  resamples probabilities, the crop re-inserted, the transpose reverted) into the first channel
  file's voxel grid, so a NIfTI map carries that file's affine.
- **patch defaults**: the configuration's patch size and nnU-Net's sliding-window step
  (``tile_step_size`` 0.5: half a patch of overlap).

nnunetv2 is imported where it is used: a missing install is a ConfigError naming the extra.
The checkpoint is read with ``weights_only=True`` (NumPy scalars of the trainer's log allowed):
nothing pickled runs.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from esegeta.errors import ConfigError

EXTRA = "pip install 'esegeta[nnunet]'"
#: nnU-Net's sliding-window step, a fraction of the patch (``nnUNetPredictor(tile_step_size=0.5)``).
TILE_STEP = 0.5


def _nnunet(what: str = "model.nnunet") -> None:
    try:
        import nnunetv2  # noqa: F401
    except ImportError as exc:
        raise ConfigError(what, f"a trained nnU-Net model needs nnU-Net v2, which is not installed: {EXTRA}") from exc


def _resolve(path: str, base_dir: Path | None) -> Path:
    path = Path(path).expanduser()
    return path if path.is_absolute() or base_dir is None else base_dir / path


@functools.lru_cache(maxsize=2)
def _checkpoint(path: Path, stamp: tuple[int, int]) -> dict:
    """The checkpoint as nnU-Net's trainer saved it (cached by path, mtime and size: the network, the
    inputs and the patch defaults of one run read it once)."""
    allowed: list = [np.dtype, *{type(np.dtype(t)) for t in ("f8", "f4", "i8", "i4", "u1", "b1")}]
    scalar = (np._core if hasattr(np, "_core") else np.core).multiarray.scalar
    allowed += [scalar, (scalar, "numpy.core.multiarray.scalar")]  # NumPy 2's name, and NumPy 1's in older checkpoints
    try:
        with torch.serialization.safe_globals(allowed):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a pickle that would run code, or not a checkpoint at all
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError("model.checkpoint", f"cannot load {path.name} with weights_only=True (nothing pickled "
                                              f"runs): {text[:300]}") from exc
    missing = [k for k in ("network_weights", "init_args", "trainer_name") if not isinstance(state, dict) or k not in state]
    if not missing and not (isinstance(state["init_args"], dict) and "configuration" in state["init_args"]):
        missing = ["init_args['configuration']"]
    if missing:
        raise ConfigError("model.checkpoint", f"{path.name} is not an nnU-Net v2 checkpoint: it lacks {', '.join(missing)}")
    return state


@dataclass(frozen=True)
class TrainedModel:
    """A trained-model folder: plans, dataset.json, and one fold's checkpoint."""
    folder: Path
    checkpoint_path: Path
    plans: dict
    dataset: dict

    @property
    def checkpoint(self) -> dict:
        stat = self.checkpoint_path.stat()
        return _checkpoint(self.checkpoint_path, (stat.st_mtime_ns, stat.st_size))

    @property
    def configuration(self) -> str:
        return self.checkpoint["init_args"]["configuration"]

    @functools.cached_property
    def managers(self) -> tuple[Any, Any]:
        """nnU-Net's (PlansManager, ConfigurationManager) of the checkpoint's configuration."""
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        plans = PlansManager(self.plans)
        name = self.configuration
        if name not in self.plans.get("configurations", {}):
            raise ConfigError("model.nnunet", f"the checkpoint was trained with configuration {name!r}, which "
                                              f"plans.json lacks (it has {', '.join(self.plans.get('configurations', {}))})")
        return plans, plans.get_configuration(name)

    @property
    def spatial_dims(self) -> int:
        return len(self.managers[1].patch_size)

    @property
    def channels(self) -> list[str]:
        """The channel names, in the order of the ``_0000``, ``_0001``... files."""
        names = self.dataset.get("channel_names", self.dataset.get("modality", {}))
        return [names[k] for k in sorted(names, key=int)]

    @property
    def file_ending(self) -> str:
        return self.dataset.get("file_ending", ".nii.gz")

    def network(self) -> nn.Module:
        """The network as nnU-Net's predictor builds it, with the checkpoint's weights, deep supervision off,
        in eval mode (a 2D configuration inside :class:`SliceWise`)."""
        import inspect

        from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
        from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

        plans, config = self.managers
        state = self.checkpoint
        trainer = recursive_find_trainer_class_by_name(state["trainer_name"])
        if trainer is None:
            raise ConfigError("model.checkpoint", f"the checkpoint's trainer {state['trainer_name']!r} is not among "
                                                  "nnU-Net's trainers; install the package that defines it (or set "
                                                  "nnUNet_extTrainer)")
        inputs = determine_num_input_channels(plans, config, self.dataset)
        outputs = plans.get_label_manager(self.dataset).num_segmentation_heads
        if "plans_manager" in inspect.signature(trainer.build_network_architecture).parameters:
            network = trainer.build_network_architecture(plans, config, inputs, outputs, enable_deep_supervision=False)
        else:  # the signature of nnU-Net < 2.6
            network = trainer.build_network_architecture(config.network_arch_class_name, config.network_arch_init_kwargs,
                                                         config.network_arch_init_kwargs_req_import, inputs, outputs,
                                                         enable_deep_supervision=False)
        try:
            network.load_state_dict(state["network_weights"])
        except RuntimeError as exc:
            raise ConfigError("model.checkpoint", f"the checkpoint's weights do not fit the network plans.json "
                                                  f"describes: {str(exc).splitlines()[0][:300]}") from exc
        network.eval()
        return SliceWise(network).eval() if self.spatial_dims == 2 else network

    def patch(self, mode: str, spatial_dims: int) -> dict[str, Any]:
        """The ``patch`` block nnU-Net's sliding window implies: its patch size, half a patch of overlap
        (``tile_step_size`` 0.5, rounded down to the even numbers torchio's grid takes), Hann blending
        (the nearest of torchio's to nnU-Net's Gaussian). A 2D configuration's patches of a 3D case are
        one slice deep."""
        size = [int(s) for s in self.managers[1].patch_size]
        overlap = [2 * int(s * (1 - TILE_STEP) // 2) for s in size]
        if len(size) < spatial_dims:
            size, overlap = [1, *size], [0, *overlap]
        return {"size": size, "overlap": overlap, "mode": mode, "blend": "hann"}

    def cases(self, files: list[Path], where: str = "inputs.paths") -> list[tuple[str, list[Path]]]:
        """(case id, one file per channel) for every case among ``files``, in order of first appearance:
        ``<case>_<XXXX><file_ending>``; a case must have every channel dataset.json names."""
        pattern = re.compile(r"(.+)_(\d{4})" + re.escape(self.file_ending) + r"$")
        channels = self.channels
        found: dict[str, dict[int, Path]] = {}
        for file in files:
            match = pattern.match(file.name)
            if match is None:
                raise ConfigError(where, f"{file.name} is not named as nnU-Net names a case's channel files: "
                                         f"'<case>_0000{self.file_ending}' (channel 0: {channels[0]})")
            found.setdefault(match.group(1), {})[int(match.group(2))] = file
        cases = []
        for case, by_channel in found.items():
            missing = [f"{case}_{c:04d}{self.file_ending} ({name})" for c, name in enumerate(channels) if c not in by_channel]
            extra = sorted(c for c in by_channel if c >= len(channels))
            if missing or extra:
                raise ConfigError(where, f"case {case!r} " + (f"lacks {', '.join(missing)}" if missing else
                                  f"has channel files {extra} the model does not take") +
                                  f"; the model takes {len(channels)} channel(s): {', '.join(channels)} (dataset.json)")
            cases.append((case, [by_channel[c] for c in range(len(channels))]))
        return cases

    def load_case(self, files: list[Path], spatial_dims: int) -> tuple[torch.Tensor, np.ndarray | None, CaseGeometry]:
        """A case as the network gets it, (1, C, *spatial) float32, with the first file's affine (NIfTI) and
        the geometry that writes maps back into that file's voxel grid."""
        from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor

        plans, config = self.managers
        try:
            data, _, properties = DefaultPreprocessor(verbose=False).run_case([str(f) for f in files], None, plans,
                                                                              config, self.dataset)
        except Exception as exc:  # unreadable files, channels of different shapes
            raise ConfigError("inputs.paths", f"nnU-Net cannot preprocess {files[0].name}: {type(exc).__name__}: "
                                              f"{str(exc).splitlines()[0][:300] if str(exc) else ''}") from exc
        flat = spatial_dims == 2
        if flat and data.shape[1] != 1:
            raise ConfigError("inputs.spatial_dims", f"{files[0].name} is a volume of {data.shape[1]} slices: explain it "
                                                     "with spatial_dims 3 (a 2D configuration runs slice by slice)")
        if spatial_dims == 2 and self.spatial_dims == 3:
            raise ConfigError("inputs.spatial_dims", f"the model's configuration {self.configuration!r} is 3D; "
                                                     "set inputs.spatial_dims to 3")
        shape = tuple(data.shape[1:])
        padded = self.padded_shape(shape)
        whole = np.zeros((data.shape[0], *padded), dtype=np.float32)
        whole[(slice(None), *[slice(0, s) for s in shape])] = data
        tensor = torch.from_numpy(whole[:, 0] if flat else whole)[None]
        return tensor, _affine(files[0]), CaseGeometry(self, properties, shape, padded, flat)

    def padded_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """``shape`` (3 axes) padded with zeros, as nnU-Net's predictor pads a case smaller than its patch,
        to at least the patch and to a multiple of the network's downsampling on every axis, so the network
        runs on the whole case as on each patch (the padding is cut off the maps)."""
        config = self.managers[1]
        patch = [int(s) for s in config.patch_size]
        strides = config.network_arch_init_kwargs.get("strides") if isinstance(config.network_arch_init_kwargs, dict) else None
        total = [int(v) for v in np.prod(np.asarray(strides), axis=0)] if strides else [1] * len(patch)
        if len(patch) < len(shape):  # a 2D configuration: slices are not downsampled
            patch, total = [1, *patch], [1, *total]
        return tuple(max(p, -(-s // t) * t) for s, p, t in zip(shape, patch, total))


def _affine(path: Path) -> np.ndarray | None:
    if not path.name.lower().endswith((".nii", ".nii.gz")):
        return None
    import nibabel as nib

    return nib.load(str(path)).affine


class SliceWise(nn.Module):
    """A 2D nnU-Net network on 3D cases, one slice (along the first axis) at a time, as nnU-Net's
    predictor runs a 2D configuration; 2D inputs go straight through. Its one submodule, ``network``,
    is nnU-Net's network (layer names: ``network.encoder...``)."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 4:
            return self.network(x)
        b, c, d = x.shape[:3]
        out = self.network(x.movedim(2, 1).reshape(b * d, c, *x.shape[3:]))
        return out.reshape(b, d, *out.shape[1:]).movedim(1, 2)


@dataclass(eq=False)
class CaseGeometry:
    """How a preprocessed case maps to its source files (nnU-Net's ``properties``): :meth:`own_order`
    writes a result back into the first file's voxel grid (x, y, z for NIfTI), :meth:`model_order` reads
    one back as the network saw the case."""
    trained: TrainedModel
    properties: dict
    shape: tuple[int, ...]  # the preprocessed spatial shape (3 axes; the first is 1 for a flat 2D case)
    padded: tuple[int, ...]  # the shape the network gets (:meth:`TrainedModel.padded_shape`)
    flat: bool

    def _spacings(self) -> tuple[list[float], list[float]]:
        """(preprocessed spacing, source spacing), in nnU-Net's transposed axis order (export_prediction's)."""
        plans, config = self.trained.managers
        source = [self.properties["spacing"][i] for i in plans.transpose_forward]
        current = list(config.spacing) if len(config.spacing) == len(self.shape) else [source[0], *config.spacing]
        return current, source

    def own_order(self, result: np.ndarray, channels: bool = True) -> np.ndarray:
        """A result (K, *spatial) as the network saw the case → the source file's voxel grid (K, x, y, z)
        (a flat 2D case: (K, x, y)); a layer-resolution map is first interpolated to the case's shape."""
        from acvl_utils.cropping_and_padding.bounding_boxes import insert_crop_into_image

        plans, config = self.trained.managers
        result = np.asarray(result, dtype=np.float32)
        if self.flat:
            result = result[:, None]
        if result.shape[1:] != self.padded:
            result = torch.nn.functional.interpolate(torch.from_numpy(result)[None], size=self.padded,
                                                     mode="trilinear", align_corners=False)[0].numpy()
        result = result[(slice(None), *[slice(0, s) for s in self.shape])]
        current, source = self._spacings()
        result = np.asarray(config.resampling_fn_probabilities(
            result, self.properties["shape_after_cropping_and_before_resampling"], current, source), dtype=np.float32)
        whole = np.zeros((result.shape[0], *self.properties["shape_before_cropping"]), dtype=np.float32)
        whole = insert_crop_into_image(whole, result, self.properties["bbox_used_for_cropping"])
        whole = whole.transpose([0, *[i + 1 for i in plans.transpose_backward]])
        whole = whole.transpose([0, *range(whole.ndim - 1, 0, -1)])  # the reader's (z, y, x) → the file's (x, y, z)
        return np.ascontiguousarray(whole[..., 0] if self.flat and whole.shape[-1] == 1 else whole)

    def model_order(self, saved: np.ndarray) -> np.ndarray:
        """The inverse of :meth:`own_order`: a saved map in the source grid → as the network saw the case."""
        from acvl_utils.cropping_and_padding.bounding_boxes import bounding_box_to_slice

        plans, config = self.trained.managers
        saved = np.asarray(saved, dtype=np.float32)
        if saved.ndim == len(self.shape):  # a flat case saved as (K, x, y)
            saved = saved[..., None]
        saved = saved.transpose([0, *range(saved.ndim - 1, 0, -1)])
        saved = saved.transpose([0, *[i + 1 for i in plans.transpose_forward]])
        saved = saved[(slice(None), *bounding_box_to_slice(self.properties["bbox_used_for_cropping"]))]
        current, source = self._spacings()
        saved = np.asarray(config.resampling_fn_probabilities(saved, self.shape, source, current), dtype=np.float32)
        whole = np.zeros((saved.shape[0], *self.padded), dtype=np.float32)
        whole[(slice(None), *[slice(0, s) for s in self.shape])] = saved
        return whole[:, 0] if self.flat else whole


def open_trained(model: Any, base_dir: Path | None) -> TrainedModel:
    """The trained-model folder ``model.nnunet`` names (the config's ``model`` section), checked: the
    folder, its plans.json and dataset.json, the fold's folder and its checkpoint, each fault naming
    its field and what is there."""
    _nnunet()
    folder = _resolve(model.nnunet, base_dir)
    if not folder.is_dir():
        raise ConfigError("model.nnunet", f"{folder} is not a folder; give a trained nnU-Net model folder (e.g. "
                                          "nnUNet_results/Dataset001_X/nnUNetTrainer__nnUNetPlans__3d_fullres; "
                                          "paths are relative to the config's folder)")
    import json

    read = {}
    for name in ("plans.json", "dataset.json"):
        if not (folder / name).is_file():
            raise ConfigError("model.nnunet", f"{folder} has no {name}: it is not a trained nnU-Net model folder "
                                              "(one holds plans.json, dataset.json and fold_N folders)")
        try:
            read[name] = json.loads((folder / name).read_text(encoding="utf-8"))
        except (ValueError, OSError) as exc:
            raise ConfigError("model.nnunet", f"{folder / name} cannot be read as JSON: {exc}") from exc
    fold = folder / f"fold_{model.fold}"
    if not fold.is_dir():
        there = sorted(p.name[len("fold_"):] for p in folder.glob("fold_*") if p.is_dir())
        raise ConfigError("model.fold", f"{folder} has no fold_{model.fold} folder; its folds: "
                                        f"{', '.join(there) or 'none'}")
    checkpoint = fold / model.checkpoint
    if not checkpoint.is_file():
        there = sorted(p.name for p in fold.glob("*.pth"))
        raise ConfigError("model.checkpoint", f"{fold} has no {model.checkpoint}; checkpoints there: "
                                              f"{', '.join(there) or 'none'}")
    trained = TrainedModel(folder, checkpoint, read["plans.json"], read["dataset.json"])
    trained.managers  # noqa: B018 (the configuration must be in the plans)
    return trained
