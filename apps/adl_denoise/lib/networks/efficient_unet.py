"""ADL's Efficient-UNet denoiser (Ghahremani et al., "Adversarial Distortion Learning for Medical Image
Denoising", arXiv 2204.14100), in 2D and true 3D.

Layout (``filters = (f0, f1, f2, f3)``, ``spatial_dims`` 2 or 3)::

    x ─ Res(f0) ─ pool ─ Res(f1) ─ pool ─ Res(f2) ─ pool ─ Res(f3)  (bridge, 1/8)
          │skip0          │skip1           │skip2            │
          │               │                └─ cat ─ Res(f2) ◄─ up ┘            (1/4) ─ head ─► quarter
          │               └─ cat ─ Res(f1) ◄─ up ───────────┘                 (1/2) ─ head ─► half
          └─ cat ─ Res(f0) ◄─ up ────────┘                                    (1/1) ─ head ─► full
    x ─ ContentEnhancer ─┘ (joins skip0 in the last decoder block)

``Res`` is :class:`~lib.networks.blocks.ResidualBlock`, ``pool`` a 2x max-pool, ``up`` a stride-2
transposed convolution, ``head`` a :class:`~lib.networks.blocks.TransformerHead` (sigmoid output).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .blocks import ContentEnhancer, ResidualBlock, TransformerHead
from .layers import conv_transpose_type, max_pool_type

# inputs are clamped to [eps, 1 - eps] before the logit: 1e-4 of the CT range is 0.4 HU
_LOGIT_EPS = 1e-4

__all__ = [
    "EfficientUNetBackbone",
    "EfficientUNetDenoiser",
    "check_spatial_size",
    "count_parameters",
    "pad_to_multiple",
]

#: Three 2x down-samplings: every spatial size must be a multiple of 2**3.
SIZE_MULTIPLE = 8


def check_spatial_size(x: torch.Tensor, spatial_dims: int, multiple: int = SIZE_MULTIPLE) -> None:
    """Raise a ValueError unless ``x`` is (B, C, *spatial) with every spatial size divisible by ``multiple``."""
    if x.ndim != spatial_dims + 2:
        raise ValueError(
            f"expected a {spatial_dims + 2}D tensor (B, C, {'D, ' if spatial_dims == 3 else ''}H, W), "
            f"got shape {tuple(x.shape)}"
        )
    spatial = tuple(x.shape[2:])
    if any(s % multiple for s in spatial):
        raise ValueError(
            f"spatial size {spatial} is not divisible by {multiple} (the network down-samples three times); "
            "pad the input first, e.g. with lib.networks.pad_to_multiple"
        )


def pad_to_multiple(
    x: torch.Tensor, multiple: int = SIZE_MULTIPLE, mode: str = "reflect"
) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """Pad the spatial dims of ``x`` (B, C, *spatial) up to multiples of ``multiple``.

    Padding is split evenly between both ends of each axis so that the network's border behaviour is
    symmetric. ``mode`` is ``"reflect"`` (default: continues texture without a seam) or
    ``"replicate"``; reflection needs the padding to be smaller than the axis, and small axes fall back to
    replication.

    Returns:
        ``(padded, crop)`` where ``padded[crop]`` is ``x`` again and ``model(padded)[crop]`` is the output
        for the original extent (``crop`` keeps the batch and channel dims whole).
    """
    if mode not in ("reflect", "replicate"):
        raise ValueError(f"mode must be 'reflect' or 'replicate', got {mode!r}")
    spatial = x.shape[2:]
    totals = [(-s) % multiple for s in spatial]
    befores = [t // 2 for t in totals]
    crop = (slice(None), slice(None)) + tuple(slice(b, b + s) for b, s in zip(befores, spatial))
    if not any(totals):
        return x, crop
    if mode == "reflect" and any(t - t // 2 >= s for t, s in zip(totals, spatial)):
        mode = "replicate"
    pad: list[int] = []
    for t, b in zip(reversed(totals), reversed(befores)):  # F.pad lists the last axis first
        pad += [b, t - b]
    return F.pad(x, pad, mode=mode), crop


def _upsample(spatial_dims: int, in_channels: int, out_channels: int, kernel_size: int) -> nn.Module:
    """Stride-2 transposed convolution that exactly doubles every spatial size (any kernel size >= 2)."""
    return conv_transpose_type(spatial_dims)(
        in_channels,
        out_channels,
        kernel_size=kernel_size,
        stride=2,
        padding=(kernel_size - 1) // 2,
        output_padding=kernel_size % 2,
        bias=False,  # a residual block with normalisation follows: a bias would be absorbed anyway
    )


class EfficientUNetBackbone(nn.Module):
    """Encoder-decoder shared by the ADL denoiser and discriminator.

    Encoder: residual blocks at ``filters[0..2]``, each followed by a 2x max-pool, then the bridge block
    at ``filters[3]`` (1/8 resolution). Max-pooling (not strided convolution) is used for down-sampling
    as in the reference implementation: it adds no parameters and keeps the strongest response, which
    favours edges over noise-driven averages. Decoder: stride-2 transposed convolutions; each decoder
    level concatenates the encoder features of the same resolution (concatenation keeps encoder and
    decoder features separate for the following residual block to weigh, rather than summing them).

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        filters: four channel counts, encoder levels 0-2 and the bridge.
        extra_skip_channels: channels of an optional extra full-resolution tensor concatenated into the
            last decoder block (the denoiser's content enhancer output).
        up_kernel_size: kernel of the transposed convolutions.
        norm: MONAI normalisation name.
        act: MONAI activation name.

    ``forward(x, extra_skip)`` returns the decoder features ``[full, half, quarter, bridge]`` with
    ``filters[0], filters[1], filters[2], filters[3]`` channels at 1, 1/2, 1/4, 1/8 of the input size.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        filters: Sequence[int],
        extra_skip_channels: int = 0,
        up_kernel_size: int = 2,
        norm: str | tuple = "batch",
        act: str | tuple = "relu",
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if len(filters) != 4:
            raise ValueError(f"filters must list 4 channel counts (3 levels and the bridge), got {filters}")
        f0, f1, f2, f3 = (int(f) for f in filters)
        self.spatial_dims = spatial_dims
        self.pool = max_pool_type(spatial_dims)(kernel_size=2, stride=2)
        self.enc0 = ResidualBlock(spatial_dims, in_channels, f0, norm=norm, act=act, image_input=True)
        self.enc1 = ResidualBlock(spatial_dims, f0, f1, norm=norm, act=act)
        self.enc2 = ResidualBlock(spatial_dims, f1, f2, norm=norm, act=act)
        self.bridge = ResidualBlock(spatial_dims, f2, f3, norm=norm, act=act)
        self.up2 = _upsample(spatial_dims, f3, f2, up_kernel_size)
        self.dec2 = ResidualBlock(spatial_dims, 2 * f2, f2, norm=norm, act=act)
        self.up1 = _upsample(spatial_dims, f2, f1, up_kernel_size)
        self.dec1 = ResidualBlock(spatial_dims, 2 * f1, f1, norm=norm, act=act)
        self.up0 = _upsample(spatial_dims, f1, f0, up_kernel_size)
        self.dec0 = ResidualBlock(spatial_dims, 2 * f0 + extra_skip_channels, f0, norm=norm, act=act)

    def forward(self, x: torch.Tensor, extra_skip: torch.Tensor | None = None) -> list[torch.Tensor]:
        s0 = self.enc0(x)
        s1 = self.enc1(self.pool(s0))
        s2 = self.enc2(self.pool(s1))
        b = self.bridge(self.pool(s2))
        d2 = self.dec2(torch.cat([self.up2(b), s2], dim=1))
        d1 = self.dec1(torch.cat([self.up1(d2), s1], dim=1))
        last = [self.up0(d1), s0] + ([extra_skip] if extra_skip is not None else [])
        d0 = self.dec0(torch.cat(last, dim=1))
        return [d0, d1, d2, b]


class EfficientUNetDenoiser(nn.Module):
    """ADL's denoiser G: an Efficient-UNet with a content enhancer and three "transformer" heads.

    Args:
        spatial_dims: 2 (slices) or 3 (volumes, true 3D convolutions).
        in_channels: channels of the noisy input.
        out_channels: channels of the denoised output.
        filters: encoder channels at levels 0, 1, 2 and the bridge; (96, 128, 160, 192) in the paper.
        enhancer_filters: filters of each dilated branch of the content enhancer (48 in the paper).
        enhancer_kernel_size: kernel of the content enhancer; default 7 in 2D (paper) and 5 in 3D. In 3D
            the enhancer's fusing convolution (144 -> 48 channels at full resolution) costs 343 taps per
            voxel at 7x7x7 against 125 at 5x5x5 and becomes the network's largest layer: with 7x7x7 a
            64^3 training step took ~1.4x as long on CPU (43 s vs 31 s, one thread) for +1.5 M
            parameters. Pass 7 for the paper's kernel.
        enhancer_dilations: dilations of the enhancer's parallel branches (1, 2, 4 in the paper).
        head_blocks: channel-halving residual blocks per transformer head.
        up_kernel_size: kernel of the decoder's stride-2 transposed convolutions. 2 (default): the
            up-sampling tiles without overlap, so it cannot produce checkerboard artefacts.
        norm: MONAI normalisation name; ``"batch"`` as in the paper (``"instance"`` for batch size 1).
        act: MONAI activation name; ``"relu"`` as in the paper.
        deep_supervision: build the 1/2 and 1/4 heads and return their outputs in training mode.
        residual: each head predicts a correction of the noisy input (area-averaged to the head's scale) in
            logit space: ``out = sigmoid(logit(y) + head(features))``, the heads' last convolutions starting at
            zero so an untrained network is the identity. Outputs stay sigmoid images in (0, 1) as in the
            paper, but the network only has to learn the noise. Without it (the paper's code) the heads must
            rebuild every intensity from scratch: on CT scaled over [-1024, 3072] HU, 4 HU is 0.001 of the
            output range, and a CPU-length run left a +12 HU tissue bias and no gain over the noisy input.
            Residual (noise-predicting) learning is the standard cure (DnCNN, RED-CNN). Weight files written
            before this option load with ``residual=False``.
        slice_context: 2D only: the input is a slice with ``slice_context`` neighbours on either side as channels
            (``in_channels = 2 * slice_context + 1``; "2.5D"), the output its centre slice. The neighbours carry
            independent noise over nearly the same anatomy, which a single slice cannot offer, at the cost of
            the first convolutions only. :func:`lib.predict.denoise_array` feeds the stacks (reads this
            attribute); 0 (default): plain 2D, as in the paper.

    Input: (B, in_channels, *spatial), intensities scaled to [0, 1], every spatial size divisible by 8
    (a ValueError otherwise; see :func:`pad_to_multiple`).

    Output, following MONAI's DynUNet deep-supervision convention:

    - training mode (``model.train()``) with ``deep_supervision``: a list ``[full, half, quarter]`` of
      tensors (B, out_channels, *spatial / 2**k), k = 0, 1, 2, all in (0, 1). All three enter the loss
      (:class:`lib.losses.ADLDenoiserLoss`).
    - evaluation mode (``model.eval()``), or ``deep_supervision=False``: only the full-resolution tensor
      (B, out_channels, *spatial), so that ``monai.inferers.sliding_window_inference`` can call the
      model directly.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 1,
        filters: Sequence[int] = (96, 128, 160, 192),
        enhancer_filters: int = 48,
        enhancer_kernel_size: int | None = None,
        enhancer_dilations: Sequence[int] = (1, 2, 4),
        head_blocks: int = 2,
        up_kernel_size: int = 2,
        norm: str | tuple = "batch",
        act: str | tuple = "relu",
        deep_supervision: bool = True,
        residual: bool = True,
        slice_context: int = 0,
    ) -> None:
        super().__init__()
        if slice_context and (spatial_dims != 2 or in_channels != 2 * slice_context + 1 or out_channels != 1):
            raise ValueError(f"slice_context {slice_context} needs a 2D network with in_channels = "
                             f"{2 * slice_context + 1} and one output channel, got {spatial_dims}D, "
                             f"{in_channels} -> {out_channels}")
        self.slice_context = int(slice_context)
        if residual and out_channels > in_channels:
            raise ValueError(f"residual output needs out_channels <= in_channels, got {out_channels} > {in_channels}")
        if enhancer_kernel_size is None:
            enhancer_kernel_size = 7 if spatial_dims == 2 else 5
        self.spatial_dims = spatial_dims
        self.deep_supervision = deep_supervision
        self.enhancer = ContentEnhancer(
            spatial_dims,
            in_channels,
            enhancer_filters,
            kernel_size=enhancer_kernel_size,
            dilations=enhancer_dilations,
            norm=norm,
            act=act,
        )
        self.backbone = EfficientUNetBackbone(
            spatial_dims,
            in_channels,
            filters,
            extra_skip_channels=enhancer_filters,
            up_kernel_size=up_kernel_size,
            norm=norm,
            act=act,
        )
        heads = [TransformerHead(spatial_dims, filters[0], out_channels, head_blocks, norm=norm, act=act)]
        if deep_supervision:
            heads += [
                TransformerHead(spatial_dims, filters[k], out_channels, head_blocks, norm=norm, act=act)
                for k in (1, 2)
            ]
        self.heads = nn.ModuleList(heads)
        self.residual = residual
        self._residual_channels = ((in_channels - out_channels) // 2, out_channels)
        if residual:
            for head in self.heads:
                nn.init.zeros_(head.out.weight)
                nn.init.zeros_(head.out.bias)

    def _input_logit(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor | None:
        """logit of the (centre channels of the) input, area-averaged to ``size``; None without ``residual``."""
        if not self.residual:
            return None
        first, count = self._residual_channels
        image = x[:, first:first + count]
        if tuple(image.shape[2:]) != tuple(size):
            image = F.interpolate(image, size=tuple(size), mode="area")  # the loss's target pyramid uses "area" too
        return torch.logit(image.clamp(_LOGIT_EPS, 1.0 - _LOGIT_EPS))

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        check_spatial_size(x, self.spatial_dims)
        features = self.backbone(x, extra_skip=self.enhancer(x))
        if self.training and self.deep_supervision:
            return [head(f, self._input_logit(x, f.shape[2:])) for head, f in zip(self.heads, features)]
        return self.heads[0](features[0], self._input_logit(x, features[0].shape[2:]))


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters of ``module``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)

