"""Networks of ADL (Adversarial Distortion Learning, Ghahremani et al., arXiv 2204.14100).

`efficient_unet`: the denoiser G (Efficient-UNet with content enhancer and three output heads) and the
padding helper for whole-image inference; `discriminator`: the conditional discriminator D; `blocks`:
their residual, content-enhancer and output-head ("transformer") blocks. 2D and 3D alike.
"""
from .blocks import ContentEnhancer, ResidualBlock, TransformerHead
from .discriminator import EfficientUNetDiscriminator
from .efficient_unet import (
    EfficientUNetBackbone,
    EfficientUNetDenoiser,
    check_spatial_size,
    count_parameters,
    pad_to_multiple,
)

__all__ = [
    "ContentEnhancer",
    "EfficientUNetBackbone",
    "EfficientUNetDenoiser",
    "EfficientUNetDiscriminator",
    "ResidualBlock",
    "TransformerHead",
    "check_spatial_size",
    "count_parameters",
    "pad_to_multiple",
]
