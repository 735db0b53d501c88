"""A tiny trained nnU-Net v2 model folder, built with nnU-Net's own code (for tests/test_nnunet.py).

:func:`trained_folder` writes the trained-model folder nnU-Net's training leaves for one configuration
(``nnUNetTrainer__nnUNetPlans__3d_fullres``, ``..__2d``, or ``..__3d_resenc``, a residual encoder):
``plans.json``, ``dataset.json``, ``dataset_fingerprint.json``, ``fold_0/checkpoint_final.pth``;
:func:`write_cases` writes 2-channel synthetic 3D NIfTI cases named as nnU-Net names them
(``case_000_0000.nii.gz``, ``case_000_0001.nii.gz``).

The plans are those nnU-Net's ``ExperimentPlanner`` wrote for this synthetic dataset (20×20×12 voxels,
spacing 1×1×2, a CT and a T2 channel, 3 classes; the planner takes 90 s on a shared 2-core machine,
too long for a test), with narrower stages (4, 8, 16 features) so the networks are small. The
checkpoint holds a freshly initialised network built by the trainer's own
``build_network_architecture``, in the form ``nnUNetTrainer.save_checkpoint`` writes.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np

SHAPE = (20, 20, 12)  # x, y, z voxels of the synthetic cases
SPACING = (1.0, 1.0, 2.0)
DATASET = {"channel_names": {"0": "CT", "1": "T2"}, "labels": {"background": 0, "outer": 1, "inner": 2},
           "numTraining": 3, "file_ending": ".nii.gz"}
INTENSITIES = {  # the fingerprint's foreground intensity statistics (the planner copies them into the plans)
    "0": {"max": 803.61, "mean": 173.87, "median": 108.29, "min": -28.18, "percentile_00_5": 1.55,
          "percentile_99_5": 777.18, "std": 201.57},
    "1": {"max": 211.48, "mean": 170.31, "median": 178.71, "min": 72.42, "percentile_00_5": 78.11,
          "percentile_99_5": 206.61, "std": 28.25}}
_RESAMPLING = {
    "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_seg": "resample_data_or_seg_to_shape",
    "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
    "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
    "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
    "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None}}


def _configuration(dims: int) -> dict:
    conv, norm = (("Conv3d", "InstanceNorm3d") if dims == 3 else ("Conv2d", "InstanceNorm2d"))
    kernels = [[1, 3, 3], [3, 3, 3], [3, 3, 3]] if dims == 3 else [[3, 3]] * 3
    strides = [[1, 1, 1], [1, 2, 2], [2, 2, 2]] if dims == 3 else [[1, 1], [2, 2], [2, 2]]
    name = "3d_fullres" if dims == 3 else "2d"
    return {
        "data_identifier": f"nnUNetPlans_{name}", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
        "patch_size": [12, 16, 16] if dims == 3 else [16, 16],
        "median_image_size_in_voxels": [12.0, 20.0, 20.0] if dims == 3 else [20.0, 20.0],
        "spacing": [2.0, 1.0, 1.0] if dims == 3 else [1.0, 1.0],
        "normalization_schemes": ["CTNormalization", "ZScoreNormalization"], "use_mask_for_norm": [False, False],
        **copy.deepcopy(_RESAMPLING),
        "architecture": {
            "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": {"n_stages": 3, "features_per_stage": [4, 8, 16], "conv_op": f"torch.nn.modules.conv.{conv}",
                            "kernel_sizes": kernels, "strides": strides, "n_conv_per_stage": [2, 2, 2],
                            "n_conv_per_stage_decoder": [2, 2], "conv_bias": True,
                            "norm_op": f"torch.nn.modules.instancenorm.{norm}",
                            "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None,
                            "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}},
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]},
        "batch_dice": dims == 2}


def _residual() -> dict:
    """3d_fullres with the residual encoder of nnU-Net's ResEnc presets (``nnUNetResEncUNetMPlans``)."""
    config = _configuration(3)
    kwargs = config["architecture"]["arch_kwargs"]
    kwargs["n_blocks_per_stage"] = [1, 2, 2]
    del kwargs["n_conv_per_stage"]
    config["architecture"]["network_class_name"] = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
    config["data_identifier"] = "nnUNetResEncUNetMPlans_3d_fullres"
    return config


PLANS = {"dataset_name": "Dataset901_Tiny", "plans_name": "nnUNetPlans",
         "original_median_spacing_after_transp": [2.0, 1.0, 1.0], "original_median_shape_after_transp": [12, 20, 20],
         "image_reader_writer": "SimpleITKIO", "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
         "configurations": {"2d": _configuration(2), "3d_fullres": _configuration(3), "3d_resenc": _residual()},
         "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
         "foreground_intensity_properties_per_channel": INTENSITIES}


def write_cases(folder: Path, cases: int = 1, shape: tuple[int, int, int] = SHAPE, seed: int = 0,
                spacing: tuple[float, float, float] = SPACING) -> list[Path]:
    """``cases`` 2-channel cases (``case_XXX_0000.nii.gz``: CT-like, ``_0001``: T2-like) with an origin,
    so a map written back must carry this affine (another ``spacing`` than the plans' is resampled)."""
    import nibabel as nib

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = (-10.0, 5.0, 3.0)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")).astype(np.float64)
    files = []
    for k in range(cases):
        centre = np.array(shape) / 2 + rng.uniform(-2, 2, 3)
        scale = np.array(spacing)[:, None, None, None]
        distance = np.sqrt((((grid - centre[:, None, None, None]) * scale) ** 2).sum(0))
        label = (distance < 6).astype(np.float64) + (distance < 3)
        ct = -500 + 600 * label + rng.normal(0, 40, shape)
        mr = 100 + 80 * (label == 1) + rng.normal(0, 10, shape)
        for channel, image in enumerate((ct, mr)):
            path = folder / f"case_{k:03d}_{channel:04d}.nii.gz"
            nib.save(nib.Nifti1Image(image.astype(np.float32), affine), path)
            files.append(path)
    return files


def trained_folder(root: Path, configuration: str, seed: int = 0) -> Path:
    """A trained-model folder with a fold-0 checkpoint of a freshly initialised network."""
    import torch
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    folder = root / f"nnUNetTrainer__nnUNetPlans__{configuration}"
    (folder / "fold_0").mkdir(parents=True, exist_ok=True)
    (folder / "plans.json").write_text(json.dumps(PLANS, indent=1))
    (folder / "dataset.json").write_text(json.dumps(DATASET, indent=1))
    (folder / "dataset_fingerprint.json").write_text(json.dumps(
        {"foreground_intensity_properties_per_channel": INTENSITIES, "spacings": [list(SPACING[::-1])] * 3,
         "shapes_after_crop": [list(SHAPE[::-1])] * 3}, indent=1))
    plans = PlansManager(copy.deepcopy(PLANS))
    config = plans.get_configuration(configuration)
    trainer = recursive_find_trainer_class_by_name("nnUNetTrainer")
    torch.manual_seed(seed)
    network = trainer.build_network_architecture(plans, config, determine_num_input_channels(plans, config, DATASET),
                                                 plans.get_label_manager(DATASET).num_segmentation_heads,
                                                 enable_deep_supervision=True)  # as the trainer trains it
    torch.save({"network_weights": network.state_dict(), "optimizer_state": None, "grad_scaler_state": None,
                # the trainer logs NumPy floats (np.nanmean of its Dice scores)
                "logging": {"mean_fg_dice": [np.float64(0.5)], "ema_fg_dice": [np.float64(0.5)],
                            "epoch_start_timestamps": [0.0]},
                "_best_ema": np.float64(0.5), "current_epoch": 1,
                "init_args": {"plans": copy.deepcopy(PLANS), "configuration": configuration, "fold": 0,
                              "dataset_json": DATASET, "device": torch.device("cpu")},
                "trainer_name": "nnUNetTrainer",
                "inference_allowed_mirroring_axes": (0, 1) if configuration == "2d" else (0, 1, 2)},
               folder / "fold_0" / "checkpoint_final.pth")
    return folder
