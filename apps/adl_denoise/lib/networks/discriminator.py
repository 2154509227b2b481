"""ADL's discriminator D: a light Efficient-UNet that maps an image to per-pixel realness logits.

D judges, pixel by pixel and at four scales, whether an image is a clean image or a denoiser output.
Its per-pixel ("mapper") outputs are what the paper calls binary masks; here they are LOGITS (no
sigmoid) because the hinge losses in :mod:`lib.losses.adversarial` act on unbounded scores.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from .efficient_unet import EfficientUNetBackbone, check_spatial_size
from .layers import conv_type

__all__ = ["EfficientUNetDiscriminator"]


class EfficientUNetDiscriminator(nn.Module):
    """Conditional Efficient-UNet discriminator with a 1x1 "mapper" head at every decoder scale.

    Conditional by default (``conditional=True``): D sees the candidate image (clean x or denoised G(y))
    concatenated with the noisy input y, i.e. it judges "is this a plausible clean version of *this*
    noisy image", as in pix2pix-style image-to-image GANs. An unconditional D can only judge whether a
    candidate looks clean in general, so it rewards any realistic texture, including texture that is not
    in y (hallucination); the condition ties the adversarial signal to the measurement. The cost is one
    extra input channel.

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of ONE image (candidate); with ``conditional`` the first convolution sees
            ``2 * in_channels`` channels.
        filters: encoder channels at levels 0, 1, 2 and the bridge. Default (16, 32, 64, 128) as in the
            released code (about 0.5 M parameters in 2D); the paper's text gives (48, 64, 80, 96).
        conditional: concatenate the noisy input to the candidate (see above).
        up_kernel_size: kernel of the decoder's transposed convolutions.
        norm: MONAI normalisation name. ``"batch"`` as in the paper; run real and fake samples through D
            in ONE batch (as :func:`lib.losses.discriminator_loss` does) so that batch statistics cannot
            tell them apart by themselves.
        act: MONAI activation name.

    ``forward(x, condition=None)``: ``x`` (B, in_channels, *spatial) in [0, 1], every spatial size
    divisible by 8; ``condition`` the noisy input of the same shape (required when conditional).
    Returns a list of 4 logit maps ``[full, half, quarter, eighth]``, each (B, 1, *spatial / 2**k):
    positive = judged real (clean), negative = judged fake (denoised).
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        filters: Sequence[int] = (16, 32, 64, 128),
        conditional: bool = True,
        up_kernel_size: int = 2,
        norm: str | tuple = "batch",
        act: str | tuple = "relu",
    ) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims
        self.conditional = conditional
        self.backbone = EfficientUNetBackbone(
            spatial_dims,
            in_channels * (2 if conditional else 1),
            filters,
            up_kernel_size=up_kernel_size,
            norm=norm,
            act=act,
        )
        # 1x1 mappers with bias: no normalisation follows, the bias sets each scale's decision threshold.
        self.mappers = nn.ModuleList(conv_type(spatial_dims)(f, 1, kernel_size=1, bias=True) for f in filters)

    def forward(self, x: torch.Tensor, condition: torch.Tensor | None = None) -> list[torch.Tensor]:
        if self.conditional:
            if condition is None:
                raise ValueError("this discriminator is conditional: pass the noisy input as `condition`")
            if condition.shape != x.shape:
                raise ValueError(f"condition shape {tuple(condition.shape)} differs from input {tuple(x.shape)}")
            x = torch.cat([x, condition], dim=1)
        elif condition is not None:
            raise ValueError("this discriminator is unconditional: `condition` must be None")
        check_spatial_size(x, self.spatial_dims)
        return [mapper(f) for mapper, f in zip(self.mappers, self.backbone(x))]
