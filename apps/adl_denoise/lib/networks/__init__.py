"""Networks of ADL (Adversarial Distortion Learning, Ghahremani et al., arXiv 2204.14100).

`efficient_unet`: the denoiser G (Efficient-UNet with content enhancer and three output heads) and the
padding helper for whole-image inference; `discriminator`: the conditional discriminator D; `blocks`:
their residual, content-enhancer and output-head ("transformer") blocks. 2D and 3D alike. `layers`: layer classes by
name and spatial dims, as MONAI's factories make them, without importing MONAI for the common ones.

`lesion_detector`: the small lesion segmenter whose features give the lesion-aware (LIDnet-style) ROI
perceptual loss.

`gcn`: the graph-convolutional denoiser of TDDL-GCN (local 3x3 convolutions fused with edge-conditioned graph
convolutions over non-local neighbours); `graph`: its memory-bounded windowed k-NN graph construction.

:data:`DENOISER_NETWORKS` maps the class names stored in weight files to the denoiser classes.
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
from .gcn import EdgeConditionedGraphConv, GCNDenoiser, NeighbourGraph, build_neighbour_graph
from .graph import window_offsets, windowed_knn
from .lesion_detector import LesionDetector

#: Denoiser classes by the name recorded in weight files and checkpoints (``network.class``).
DENOISER_NETWORKS = {
    "EfficientUNetDenoiser": EfficientUNetDenoiser,
    "GCNDenoiser": GCNDenoiser,
}

__all__ = [
    "DENOISER_NETWORKS",
    "EdgeConditionedGraphConv",
    "GCNDenoiser",
    "LesionDetector",
    "NeighbourGraph",
    "build_neighbour_graph",
    "window_offsets",
    "windowed_knn",
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
