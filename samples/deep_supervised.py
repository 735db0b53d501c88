"""A deep-supervision variant of the retina U-Net, for the deep-supervision wrapper.

Deep-supervision models (nnU-Net, UNet++) return a list of outputs at several scales.
This one returns ``[full-resolution logits, half-resolution logits]`` from the trained
:class:`VesselUNet2D` weights (the second head is the first, average-pooled), so it loads
``checkpoints/vessel_unet2d.pt`` unchanged.
"""
import torch.nn.functional as F

from models import VesselUNet2D


class DeepSupervisedVesselUNet(VesselUNet2D):
    def forward(self, x):
        out = super().forward(x)
        return [out, F.avg_pool2d(out, 2)]
