"""Building blocks of ADL's Efficient-UNet (Ghahremani et al., arXiv 2204.14100).

All blocks work for ``spatial_dims`` 2 and 3 and keep the spatial size of their input: tensors are
(B, C, H, W) in 2D and (B, C, D, H, W) in 3D.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from .layers import act_layer, conv_type, norm_layer

__all__ = ["ResidualBlock", "ContentEnhancer", "TransformerHead"]


class _ImageInputConv2d(nn.Conv2d):
    """A convolution that reads the image itself: always float32, also under fp16 / bfloat16 autocast.

    Autocast would round the normalised image to the reduced type before the convolution: bfloat16 keeps 8
    mantissa bits, so a CT value of 0.25 (soft tissue on the [-1024, 3072] HU scale) is stored to 1/512 of its
    size, 8 HU, which buries much of the 30 HU noise the network has to see. These convolutions have one input
    channel (a few hundred multiply-adds per voxel of the network's million), so float32 costs nothing; their
    output is handed on in the autocast type. Same parameters and state-dict keys as the plain convolution.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _float32_convolution(self, x)


class _ImageInputConv3d(nn.Conv3d):
    """3D :class:`_ImageInputConv2d`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _float32_convolution(self, x)


class _NarrowInputSafeConv3d(nn.Conv3d):
    """A 3D convolution that runs in float32 under CPU autocast when its input is narrower than its kernel.

    oneDNN's bfloat16 weight-gradient kernel for 3D convolutions (PyTorch 2.13 CPU) reads and writes outside its
    buffers when a spatial axis of the input is smaller than the kernel (measured: 3x3x3 on a 2-voxel axis, 5x5x5
    on 1-4 voxels, 7x7x7 on 1-6; the depth axis triggers it; 2D, 1x1x1 and dilated kernels were clean): the
    gradient then holds whatever the heap held, NaN in some runs, and the heap can be corrupted ("double free").
    The 3D network meets it at its 1/8 bridge on 16^3 patches (2^3 voxels), where Adam turned a NaN gradient into
    NaN weights that batch-norm recalibration spread to the running statistics, with every loss finite.
    Such layers have a handful of voxels, so float32 costs little there; the output goes on in the autocast type.
    Same parameters and state-dict keys as the plain convolution.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and torch.is_autocast_enabled("cpu") and narrower_than_kernel(self, x):
            return _float32_convolution(self, x)
        return super().forward(x)


def narrower_than_kernel(conv: nn.Conv2d | nn.Conv3d, x: torch.Tensor) -> bool:
    """True when a spatial axis of ``x`` (B, C, *spatial) is shorter than ``conv``'s kernel extent
    ((kernel - 1) * dilation + 1 voxels) on that axis."""
    extents = [(k - 1) * d + 1 for k, d in zip(conv.kernel_size, conv.dilation)]
    return any(s < e for s, e in zip(x.shape[2:], extents))


def _float32_convolution(conv: nn.Conv2d | nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    device = x.device.type
    with torch.autocast(device, enabled=False):
        y = conv._conv_forward(x.float(), conv.weight, conv.bias)
    # the features go on in the autocast type like any other layer's: rounding them costs nothing measurable
    # (0.11 vs 0.10 HU mean difference to float32 on a CT slice), float32 features doubled the full-resolution
    # blocks' memory traffic (+25 % training step time)
    return y.to(torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else y


def _conv(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    dilation: int = 1,
    bias: bool = False,
    image_input: bool = False,
) -> nn.Module:
    """'Same' convolution (odd ``kernel_size``): the output has the input's spatial size. ``image_input``: it reads
    the image, so it runs in float32 under autocast (:class:`_ImageInputConv2d`). 3D convolutions run in float32
    under CPU autocast where their input is narrower than the kernel (:class:`_NarrowInputSafeConv3d`)."""
    if image_input:
        layer = _ImageInputConv2d if spatial_dims == 2 else _ImageInputConv3d
    else:  # 3D: float32 where the input is narrower than the kernel (a oneDNN bfloat16 bug, see the class)
        layer = conv_type(spatial_dims) if spatial_dims == 2 else _NarrowInputSafeConv3d
    return layer(
        in_channels,
        out_channels,
        kernel_size=kernel_size,
        padding=dilation * (kernel_size - 1) // 2,
        dilation=dilation,
        bias=bias,
    )


class ResidualBlock(nn.Module):
    """conv(k) -> norm -> act -> conv(k) -> norm, plus a 1x1 convolution shortcut, then act.

    The paper's basic unit. Convolutions carry no bias: every one is followed by a normalisation whose
    shift makes a bias redundant. The shortcut is always a 1x1 convolution (as in the paper), also when
    ``in_channels == out_channels``, so that every block can re-mix channels on the identity path.

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of the input (B, in_channels, *spatial).
        out_channels: channels of the output (B, out_channels, *spatial).
        kernel_size: odd kernel size of the two main convolutions (3 in the paper).
        norm: MONAI normalisation name or (name, args), e.g. ``"batch"`` (paper) or ``"instance"``.
        act: MONAI activation name or (name, args); ``"relu"`` in the paper.
        image_input: the block reads the image itself (the first encoder block): its input convolutions run in
            float32 under autocast (see :class:`_ImageInputConv2d`).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        norm: str | tuple = "batch",
        act: str | tuple = "relu",
        image_input: bool = False,
    ) -> None:
        super().__init__()
        self.conv1 = _conv(spatial_dims, in_channels, out_channels, kernel_size, image_input=image_input)
        self.norm1 = norm_layer(norm, spatial_dims, out_channels)
        self.act1 = act_layer(act)
        self.conv2 = _conv(spatial_dims, out_channels, out_channels, kernel_size)
        self.norm2 = norm_layer(norm, spatial_dims, out_channels)
        self.shortcut = _conv(spatial_dims, in_channels, out_channels, 1, image_input=image_input)
        self.act2 = act_layer(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm2(self.conv2(self.act1(self.norm1(self.conv1(x)))))
        return self.act2(y + self.shortcut(x))


class ContentEnhancer(nn.Module):
    """Multi-dilation context block applied to the noisy input.

    Parallel convolutions with dilations ``dilations`` (1, 2, 4 in the paper), ``out_channels`` filters
    each, are concatenated -> norm -> act -> conv(k) -> norm; a 1x1 convolution of the concatenation
    is added as shortcut and the sum passes an activation (the residual-block convention). With
    k = 7 and dilation 4 the receptive field is 31 pixels wide before the fusing convolution, so the
    block hands the decoder's last stage a wide view of the *input* at full resolution: fine detail
    that would otherwise have to survive the encoder's three down-samplings.

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of the noisy input (B, in_channels, *spatial).
        out_channels: filters per dilated branch and of the output (B, out_channels, *spatial).
        kernel_size: odd kernel size of every convolution but the 1x1 shortcut (7 in the paper).
        dilations: dilation of each parallel branch.
        norm: MONAI normalisation name.
        act: MONAI activation name.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int = 48,
        kernel_size: int = 7,
        dilations: Sequence[int] = (1, 2, 4),
        norm: str | tuple = "batch",
        act: str | tuple = "relu",
    ) -> None:
        super().__init__()
        self.branches = nn.ModuleList(  # they read the image: float32 under autocast
            _conv(spatial_dims, in_channels, out_channels, kernel_size, dilation=d, image_input=True)
            for d in dilations
        )
        merged = out_channels * len(dilations)
        self.norm1 = norm_layer(norm, spatial_dims, merged)
        self.act1 = act_layer(act)
        self.fuse = _conv(spatial_dims, merged, out_channels, kernel_size)
        self.norm2 = norm_layer(norm, spatial_dims, out_channels)
        self.shortcut = _conv(spatial_dims, merged, out_channels, 1)
        self.act2 = act_layer(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        merged = torch.cat([branch(x) for branch in self.branches], dim=1)
        y = self.norm2(self.fuse(self.act1(self.norm1(merged))))
        return self.act2(y + self.shortcut(merged))


class TransformerHead(nn.Module):
    """The paper's "transformer": maps decoder features to an image. (No attention is involved.)

    ``num_blocks`` residual blocks, each halving the channels, then a 1x1 convolution (with bias: no
    normalisation follows it) and a sigmoid, because intensities are scaled to [0, 1].

    Args:
        spatial_dims: 2 or 3.
        in_channels: decoder channels (B, in_channels, *spatial).
        out_channels: image channels of the output (B, out_channels, *spatial), values in (0, 1).
        num_blocks: number of channel-halving residual blocks.
        norm: MONAI normalisation name.
        act: MONAI activation name.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        num_blocks: int = 2,
        norm: str | tuple = "batch",
        act: str | tuple = "relu",
    ) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        channels = in_channels
        for _ in range(num_blocks):
            blocks.append(ResidualBlock(spatial_dims, channels, max(channels // 2, 1), norm=norm, act=act))
            channels = max(channels // 2, 1)
        self.blocks = nn.Sequential(*blocks)
        self.out = _conv(spatial_dims, channels, out_channels, 1, bias=True)

    def forward(self, x: torch.Tensor, base_logit: torch.Tensor | None = None) -> torch.Tensor:
        """``base_logit`` (B, out_channels, *spatial), optional: added before the sigmoid, so the head
        predicts a correction of that image in logit space (see ``EfficientUNetDenoiser(residual=True)``)."""
        # float32 from here on: under bfloat16 autocast a bfloat16 sigmoid would quantise the image to ~1/256
        logit = self.out(self.blocks(x)).float()
        return torch.sigmoid(logit if base_logit is None else logit + base_logit.float())
