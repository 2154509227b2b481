"""Pyramidal textural loss of ADL: L1 between multi-scale band-pass decompositions.

The decomposition is the undecimated ("a trous") wavelet transform with the B3-spline scaling kernel
(the "starlet"), which the reference code intends: smoothing with the separable kernel
[1, 4, 6, 4, 1] / 16, dilated by 2**j at level j,

    c_0 = image,   c_{j+1} = h_j * c_j,   w_j = c_j - c_{j+1}   (j = 0 .. J-1),

so that ``image = w_0 + ... + w_{J-1} + c_J`` exactly. w_0 holds the finest detail (noise, fine edges),
w_{J-1} the coarsest band. Being undecimated, every band keeps the image size: no aliasing, and the
same code serves 2D and 3D and small images (the deep-supervision outputs at 1/4 resolution).

The loss SUMS the per-band L1 over all J levels (the released code, by a bug, keeps only the last).
The low-pass residual c_J is left out by default: its content is what the plain L1 term of the ADL
loss already constrains, and the point of this term is texture and edges.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["PyramidalTexturalLoss", "atrous_wavelet_decomposition"]

_B3_SPLINE = (1.0 / 16, 4.0 / 16, 6.0 / 16, 4.0 / 16, 1.0 / 16)


def _smooth(x: torch.Tensor, level: int, spatial_dims: int) -> torch.Tensor:
    """Separable B3-spline smoothing of (B, C, *spatial) with holes 2**level, replicate-padded borders.

    Replicate (not reflect) padding: it is defined for any axis length, also for coarse levels whose
    kernel (4 * 2**level + 1 taps) is wider than a small image.
    """
    dilation = 2**level
    channels = x.shape[1]
    kernel_1d = torch.tensor(_B3_SPLINE, dtype=x.dtype, device=x.device)
    conv = (F.conv2d, F.conv3d)[spatial_dims - 2]
    for axis in range(spatial_dims):
        shape = [1, 1] + [1] * spatial_dims
        shape[2 + axis] = len(_B3_SPLINE)
        weight = kernel_1d.view(shape).repeat(channels, *([1] * (spatial_dims + 1)))  # depthwise
        pad = [0] * (2 * spatial_dims)
        # F.pad lists the last spatial axis first
        pad[2 * (spatial_dims - 1 - axis)] = pad[2 * (spatial_dims - 1 - axis) + 1] = 2 * dilation
        dil = [1] * spatial_dims
        dil[axis] = dilation
        x = conv(F.pad(x, pad, mode="replicate"), weight, dilation=tuple(dil), groups=channels)
    return x


def atrous_wavelet_decomposition(
    x: torch.Tensor, levels: int = 3, spatial_dims: int = 2
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Starlet decomposition of ``x`` (B, C, *spatial).

    Returns:
        ``(bands, lowpass)``: ``levels`` band-pass tensors w_0 (finest) .. w_{J-1} and the residual c_J,
        all shaped like ``x``; ``sum(bands) + lowpass == x`` up to rounding.
    """
    bands = []
    current = x
    for j in range(levels):
        smoother = _smooth(current, j, spatial_dims)
        bands.append(current - smoother)
        current = smoother
    return bands, current


class PyramidalTexturalLoss(nn.Module):
    """Sum over J levels of mean |w_j(pred) - w_j(target)|, optionally plus the low-pass residual's L1.

    Args:
        levels: number of band-pass levels J (3 in the reference code).
        spatial_dims: 2 or 3; None infers it from the inputs' rank.
        include_lowpass: also add mean |c_J(pred) - c_J(target)| (default False, see module docstring).

    ``forward(pred, target)``: both (B, C, *spatial), typically in [0, 1]; returns a scalar tensor.
    """

    def __init__(self, levels: int = 3, spatial_dims: int | None = 2, include_lowpass: bool = False) -> None:
        super().__init__()
        if levels < 1:
            raise ValueError(f"levels must be >= 1, got {levels}")
        if spatial_dims not in (2, 3, None):
            raise ValueError(f"spatial_dims must be 2, 3 or None, got {spatial_dims}")
        self.levels = levels
        self.spatial_dims = spatial_dims
        self.include_lowpass = include_lowpass

    def band_losses(self, pred: torch.Tensor, target: torch.Tensor) -> list[torch.Tensor]:
        """Per-level L1 terms [w_0, ..., w_{J-1}] (then the low-pass term if ``include_lowpass``)."""
        if pred.shape != target.shape:
            raise ValueError(f"pred shape {tuple(pred.shape)} differs from target {tuple(target.shape)}")
        spatial_dims = pred.ndim - 2 if self.spatial_dims is None else self.spatial_dims
        if pred.ndim != spatial_dims + 2:
            raise ValueError(f"expected (B, C, *spatial) with {spatial_dims} spatial dims, got {tuple(pred.shape)}")
        # Decomposing the difference equals differencing the decompositions (the transform is linear)
        # and costs one decomposition instead of two.
        bands, lowpass = atrous_wavelet_decomposition(pred - target, self.levels, spatial_dims)
        terms = [band.abs().mean() for band in bands]
        if self.include_lowpass:
            terms.append(lowpass.abs().mean())
        return terms

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.stack(self.band_losses(pred, target)).sum()
