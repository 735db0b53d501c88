"""Sample models shipped with esegeta (pure torch).

* :class:`DigitResNet`   -- tiny torchvision-style ResNet for scikit-learn's 8x8 digits.
* :class:`VesselUNet2D`  -- 2D U-Net for retinal vessel segmentation (RGB in [0, 1]).
* :class:`TissueUNet3D`  -- 3D U-Net for 3-class tissue segmentation of an MRI volume.

The two U-Nets share one implementation (:class:`UNet`), parameterised by the
number of spatial dimensions.  Inputs of any spatial size (>= 4 per axis) are
accepted: decoder feature maps are resized to the size of their skip
connection with ``F.interpolate`` before concatenation, so odd sizes work.
"""

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["BasicBlock", "DigitResNet", "UNet", "VesselUNet2D", "TissueUNet3D"]


# --------------------------------------------------------------------------- #
# DigitResNet
# --------------------------------------------------------------------------- #
class BasicBlock(nn.Module):
    """torchvision-style ResNet basic block.

    conv1-bn1-relu-conv2-bn2, + identity (or ``downsample(x)``), then relu.
    NOTE: one ``self.relu`` (inplace) module is deliberately called twice in
    ``forward``, exactly as in torchvision.  Module-hook based explainers
    break on this reuse; esegeta must handle it (on a copy of the model).
    """

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: Optional[nn.Module] = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out = out + identity
        out = self.relu(out)
        return out


class DigitResNet(nn.Module):
    """Tiny ResNet for ``sklearn.datasets.load_digits``.

    Input: (B, 1, 8, 8) float32, pixel values divided by 16 (range [0, 1]).
    Output: logits (B, num_classes).
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1, bias=False),
            nn.BatchNorm2d(16),
        )
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = BasicBlock(16, 16)
        self.layer2 = BasicBlock(16, 32, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(32, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.relu(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.pool(x)
        x = self.flatten(x)
        return self.fc(x)


# --------------------------------------------------------------------------- #
# U-Net (2D / 3D)
# --------------------------------------------------------------------------- #
_LAYERS = {
    2: dict(conv=nn.Conv2d, bn=nn.BatchNorm2d, pool=nn.MaxPool2d, up=nn.ConvTranspose2d),
    3: dict(conv=nn.Conv3d, bn=nn.BatchNorm3d, pool=nn.MaxPool3d, up=nn.ConvTranspose3d),
}


def _double_conv(dims: int, cin: int, cout: int) -> nn.Sequential:
    """(conv, BN, ReLU, conv, BN, ReLU) with separate, non-inplace ReLUs."""
    L = _LAYERS[dims]
    return nn.Sequential(
        L["conv"](cin, cout, 3, padding=1, bias=False),
        L["bn"](cout),
        nn.ReLU(inplace=False),
        L["conv"](cout, cout, 3, padding=1, bias=False),
        L["bn"](cout),
        nn.ReLU(inplace=False),
    )


class UNet(nn.Module):
    """Two-level U-Net for ``dims`` = 2 or 3 spatial dimensions.

    Submodules: ``enc1``, ``pool1``, ``enc2``, ``pool2``, ``bottleneck``,
    ``up2``, ``dec2``, ``up1``, ``dec1``, ``head`` (1x1 conv, logits).
    Input: (B, in_channels, *spatial) with every spatial size >= 4.
    Output: logits (B, out_channels, *spatial) -- same spatial size as the input.
    """

    def __init__(self, dims: int, in_channels: int, out_channels: int, base: int = 8) -> None:
        super().__init__()
        if dims not in _LAYERS:
            raise ValueError(f"dims must be 2 or 3, got {dims}")
        L = _LAYERS[dims]
        self.dims = dims
        b = base
        self.enc1 = _double_conv(dims, in_channels, b)
        self.pool1 = L["pool"](2)
        self.enc2 = _double_conv(dims, b, 2 * b)
        self.pool2 = L["pool"](2)
        self.bottleneck = _double_conv(dims, 2 * b, 4 * b)
        self.up2 = L["up"](4 * b, 2 * b, 2, stride=2)
        self.dec2 = _double_conv(dims, 4 * b, 2 * b)
        self.up1 = L["up"](2 * b, b, 2, stride=2)
        self.dec1 = _double_conv(dims, 2 * b, b)
        self.head = L["conv"](b, out_channels, 1)

    @staticmethod
    def _match(x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """Resize ``x`` to the spatial size of ``skip`` (no-op when equal)."""
        if x.shape[2:] != skip.shape[2:]:
            x = F.interpolate(x, size=skip.shape[2:], mode="nearest")
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(self.pool1(e1))
        bn = self.bottleneck(self.pool2(e2))
        d2 = self._match(self.up2(bn), e2)
        d2 = self.dec2(torch.cat([d2, e2], dim=1))
        d1 = self._match(self.up1(d2), e1)
        d1 = self.dec1(torch.cat([d1, e1], dim=1))
        return self.head(d1)


class VesselUNet2D(UNet):
    """2D U-Net for retinal vessel segmentation.

    Input: (B, 3, H, W) RGB float32 in [0, 1] (uint8 / 255), H, W >= 4.
    Output: vessel logits (B, 1, H, W); ``sigmoid`` gives the probability.
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 1, base: int = 8) -> None:
        super().__init__(2, in_channels, out_channels, base)


class TissueUNet3D(UNet):
    """3D U-Net for 3-class tissue segmentation of a z-scored MRI volume.

    Input: (B, 1, X, Y, Z) float32, z-scored over the whole volume, sizes >= 4.
    Output: class logits (B, 3, X, Y, Z); ``softmax(dim=1)`` gives probabilities.
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 3, base: int = 8) -> None:
        super().__init__(3, in_channels, out_channels, base)
