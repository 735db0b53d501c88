"""Architectures nobody here wrote, at small sizes: torchvision classifiers and MONAI segmenters.

Random weights (nothing can be downloaded), BatchNorm running statistics calibrated on a few
random batches in train mode (weights untouched): at default initialisation they are (0, 1),
BatchNorm is then the identity in eval mode and bias-free ReLU nets are positively
homogeneous, which makes IG and DeepLift look trivially exact. Used by tests/test_zoo.py and
benchmarks/zoo.py.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class ZooModel:
    """A model, one input, its task and where its layer methods look."""

    name: str
    model: nn.Module
    x: torch.Tensor
    layer: str  # a late feature layer (Grad-CAM style methods)
    leaf_layer: str  # a leaf module (LayerLRP, neuron methods)
    wrapper: dict | None = None
    target: int = 0
    reshape_transform: str | None = None  # gradcam's reshape for a token layer

    @property
    def task(self) -> str:
        return "classification" if self.wrapper is None else "segmentation"

    @property
    def dims(self) -> int:
        return self.x.ndim - 2


def calibrate(model: nn.Module, shape: tuple[int, ...], batches: int = 3, seed: int = 0) -> nn.Module:
    """Calibrate BatchNorm running statistics on random batches in train mode; then eval mode."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return model.eval()
    generator = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None  # cumulative average over the batches
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(torch.randn((4, *shape[1:]), generator=generator))
    return model.eval()


def _torchvision():
    from esegeta.compat import import_torchvision

    return import_torchvision()


def _input(shape: tuple[int, ...], seed: int = 1) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _classifier(name: str, build: Callable[[], nn.Module], size: int, layer: str, leaf: str,
                reshape: str | None = None) -> ZooModel:
    torch.manual_seed(0)
    shape = (1, 3, size, size)
    model = calibrate(build(), shape)
    return ZooModel(name, model, _input(shape), layer, leaf, reshape_transform=reshape)


SEG_WRAPPER = {"name": "threshold", "channel": 1, "threshold": 0.0, "activation": "none"}


def _segmenter(name: str, build: Callable[[], nn.Module], shape: tuple[int, ...], layer: str, leaf: str) -> ZooModel:
    torch.manual_seed(0)
    model = calibrate(build(), shape)
    return ZooModel(name, model, _input(shape), layer, leaf, wrapper=dict(SEG_WRAPPER), target=0)


def resnet18() -> ZooModel:
    tv = _torchvision()
    return _classifier("resnet18", lambda: tv.models.resnet18(num_classes=5), 64, "layer4", "layer4.1.conv2")


def densenet121() -> ZooModel:
    tv = _torchvision()
    return _classifier("densenet121", lambda: tv.models.DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16,
                                                                 bn_size=2, num_classes=5),
                       32, "features", "features.denseblock2.denselayer2.conv2")


def efficientnet_b0() -> ZooModel:
    tv = _torchvision()
    from torchvision.models.efficientnet import _efficientnet_conf

    setting, last = _efficientnet_conf("efficientnet_b0", width_mult=0.25, depth_mult=0.25)
    return _classifier("efficientnet_b0", lambda: tv.models.EfficientNet(setting, 0.2, num_classes=5, last_channel=last),
                       64, "features", "features.8.0")


def mobilenet_v3_small() -> ZooModel:
    tv = _torchvision()
    return _classifier("mobilenet_v3_small", lambda: tv.models.mobilenet_v3_small(num_classes=5, width_mult=0.25),
                       64, "features", "features.12.0")


def convnext_tiny() -> ZooModel:
    tv = _torchvision()
    from torchvision.models.convnext import CNBlockConfig

    config = [CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)]
    return _classifier("convnext_tiny", lambda: tv.models.convnext.ConvNeXt(config, num_classes=5),
                       32, "features.3", "features.3.0.block.0")


def vit() -> ZooModel:
    tv = _torchvision()
    def build():
        model = tv.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16,
                                            mlp_dim=32, num_classes=5)
        nn.init.normal_(model.heads.head.weight, std=0.5)  # torchvision starts the head at zero: nothing to explain
        return model

    return _classifier("vit", build, 32, "encoder.layers.encoder_layer_1.ln_1", "conv_proj", reshape="vit")


def vit8() -> ZooModel:
    """An 8-block torchvision ViT (hidden 96) whose ε-LRP relevance grows over the blocks (seeded)."""
    tv = _torchvision()
    torch.manual_seed(0)
    net = tv.models.VisionTransformer(image_size=32, patch_size=8, num_layers=8, num_heads=2, hidden_dim=96,
                                      mlp_dim=192, num_classes=5).eval()
    nn.init.normal_(net.heads.head.weight, std=0.02)
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return ZooModel("vit8", net, x, "encoder", "conv_proj")


def _monai():
    import monai.networks.nets as nets

    return nets


def unet2d() -> ZooModel:
    nets = _monai()
    return _segmenter("unet2d", lambda: nets.UNet(2, 1, 2, channels=(4, 8, 16), strides=(2, 2), num_res_units=1),
                      (1, 1, 32, 32), "model.1.submodule.1", "model.0.conv.unit0.conv")


def unet3d() -> ZooModel:
    nets = _monai()
    return _segmenter("unet3d", lambda: nets.UNet(3, 1, 2, channels=(4, 8), strides=(2,), num_res_units=1),
                      (1, 1, 16, 16, 16), "model.1.submodule", "model.0.conv.unit0.conv")


def basicunet() -> ZooModel:
    nets = _monai()
    return _segmenter("basicunet", lambda: nets.BasicUNet(2, 1, 2, features=(4, 4, 8, 8, 16, 4)),
                      (1, 1, 32, 32), "down_4", "conv_0.conv_0.conv")


def attentionunet() -> ZooModel:
    nets = _monai()
    return _segmenter("attentionunet", lambda: nets.AttentionUnet(2, 1, 2, channels=(4, 8, 16), strides=(2, 2)),
                      (1, 1, 32, 32), "model.1.submodule.1", "model.0.conv.0.conv")


def dynunet() -> ZooModel:
    nets = _monai()

    def build():
        model = nets.DynUNet(2, 1, 2, kernel_size=[3, 3, 3], strides=[1, 2, 2], upsample_kernel_size=[2, 2],
                             filters=[4, 8, 16], deep_supervision=True, deep_supr_num=1)
        # one training step: deep supervision keeps graph tensors in attributes afterwards
        model.train()
        out = model(_input((2, 1, 32, 32), seed=5))
        out.sum().backward()
        model.zero_grad()
        return model

    return _segmenter("dynunet", build, (1, 1, 32, 32), "bottleneck", "input_block.conv1.conv")


def segresnet() -> ZooModel:
    nets = _monai()
    return _segmenter("segresnet", lambda: nets.SegResNet(3, init_filters=4, in_channels=1, out_channels=2,
                                                          blocks_down=(1, 1), blocks_up=(1,), num_groups=2,
                                                          norm=("GROUP", {"num_groups": 2})),
                      (1, 1, 16, 16, 16), "down_layers.1", "convInit.conv")


def unetr() -> ZooModel:
    nets = _monai()
    return _segmenter("unetr", lambda: nets.UNETR(1, 2, img_size=(16, 16, 16), feature_size=4, hidden_size=16, mlp_dim=32,
                                                  num_heads=2),
                      (1, 1, 16, 16, 16), "encoder4", "encoder1.layer.conv1.conv")


def swinunetr() -> ZooModel:
    nets = _monai()
    return _segmenter("swinunetr", lambda: nets.SwinUNETR(1, 2, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), feature_size=12,
                                                          window_size=4, spatial_dims=2),
                      (1, 1, 64, 64), "encoder10", "encoder1.layer.conv1.conv")


def method_params(method: str, z: ZooModel) -> dict:
    """What the zoo gives a method beyond its quick params: settings that random-noise inputs and
    the small models' tiny late layers need (each flattened the map to one constant before)."""
    if method == "captum.LayerFeatureAblation":  # late layers are 2x2 to 4x4: the quick 4-cell grid is one group
        return {"layer_mask": {"grid": [1] * z.dims}}
    if method == "gradcam.FEM":  # on a 2x2 layer no position lies 2 std above the mean of 4 (at most 1.5)
        return {"k": 1}
    if method == "shap.KernelExplainer" and z.x.shape[1] == 3:  # SLIC on RGB noise: one segment at compactness 10
        return {"compactness": 100}
    if method == "lime.LimeImageExplainer" and z.dims == 2 and z.x.shape[1] == 1 and max(z.x.shape[2:]) <= 32:
        # LIME's quickshift: one segment on a 32-pixel grey image
        return {"segmentation_fn": {"algo_type": "slic", "n_segments": 8}}
    return {}


def method_wrapper(method: str, z: ZooModel) -> dict | None:
    """The wrapper the zoo gives a method: RISE scores ``sigmoid(model(x))``, saturated on summed
    masks (the runner warns and advises the mean)."""
    if z.wrapper is not None and method == "torchray.rise":
        return {**z.wrapper, "reduction": "mean"}
    return z.wrapper


ZOO: dict[str, Callable[[], ZooModel]] = {f.__name__: f for f in (
    resnet18, densenet121, efficientnet_b0, mobilenet_v3_small, convnext_tiny, vit,
    unet2d, unet3d, basicunet, attentionunet, dynunet, segresnet, unetr, swinunetr)}
