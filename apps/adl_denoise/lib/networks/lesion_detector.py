"""A small lesion segmenter whose features judge whether a denoiser kept a lesion (LIDnet-style).

LIDnet (Chen, Long, Ren, Sun, Pu, ACM MM 2021) trains the denoiser with a perceptual loss taken from a lesion
detector inside the lesions' regions of interest, so that what a detector needs to find a lesion survives
denoising. Here the detector is MONAI's ``BasicUNet`` (a well-kept U-Net; no reason to write another) at a
small width, trained to segment the synthetic lesions of :mod:`lib.lesions` from noisy and clean patches.
Its encoder features at full, 1/2 and 1/4 resolution are the perceptual features.

Input: images in the denoisers' [0, 1] intensity scaling (:mod:`lib.data.intensity`). The detector first maps
its ``window`` (in those units: for CT the soft-tissue window [-160, 240] HU) to [0, 1], so the small HU
differences of low-contrast lesions are not lost in the wide CT range; values outside are clipped.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

__all__ = ["LesionDetector"]


class LesionDetector(nn.Module):
    """Lesion segmenter (logits) with access to its encoder features.

    Args:
        spatial_dims: 2 (slices).
        features: BasicUNet's six channel counts (encoder x5, last decoder).
        window: (low, high) of the input in the [0, 1] intensity scaling mapped to [0, 1] before the network.

    ``forward(x)``: (B, 1, H, W) -> lesion logits (B, 1, H, W); H and W multiples of 16.
    ``encoder_features(x)``: the list of encoder feature maps at full, 1/2 and 1/4 resolution
    ((B, C_k, H / 2**k, W / 2**k), k = 0, 1, 2).
    """

    def __init__(self, spatial_dims: int = 2, features: Sequence[int] = (16, 16, 32, 64, 128, 16),
                 window: tuple[float, float] = (0.0, 1.0)) -> None:
        super().__init__()
        from monai.networks.nets import BasicUNet

        if window[1] <= window[0]:
            raise ValueError(f"window must be (low, high) with low < high, got {window}")
        self.spatial_dims = int(spatial_dims)
        self.features = tuple(int(f) for f in features)
        self.window = (float(window[0]), float(window[1]))
        self.unet = BasicUNet(spatial_dims=self.spatial_dims, in_channels=1, out_channels=1, features=self.features,
                              act=("LeakyReLU", {"negative_slope": 0.1, "inplace": True}), norm=("instance", {"affine": True}))

    def kwargs(self) -> dict:
        """The constructor arguments (stored with the weights)."""
        return {"spatial_dims": self.spatial_dims, "features": list(self.features), "window": list(self.window)}

    def _windowed(self, x: torch.Tensor) -> torch.Tensor:
        low, high = self.window
        return ((x - low) / (high - low)).clamp(0.0, 1.0)

    def encoder_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        u = self.unet
        x0 = u.conv_0(self._windowed(x))
        x1 = u.down_1(x0)
        x2 = u.down_2(x1)
        return [x0, x1, x2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.unet(self._windowed(x))
