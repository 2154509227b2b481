"""Variance-preserving overlap-add of independent noise tiles into a whole slice.

A noise field is assembled from independent zero-mean tiles ``n_k`` (``P x P``) on a regular grid of step ``s``
(``P / s`` an integer >= 2) with the weights

    field(x) = sum_k w_k(x) n_k(x) / sqrt(sum_k w_k(x)^2),     w = sqrt(Hann_P(y) Hann_P(x))

(periodic Hann windows). For independent tiles of variance ``sigma^2`` the field variance is exactly ``sigma^2``
at every pixel (the normalisation is the sum of *squared* weights, not of the weights, which would lower the
variance where tiles overlap: averaging independent noise cancels part of it), so there are no seams in the noise
level. On the grid used here (``P - s`` pixels of padding before the image) the sum of Hann windows is constant
over the image, so the normalisation is a constant and the window only tapers each tile smoothly: the texture
(covariance at short lags) is kept, with a small loss of correlation at lags comparable to ``P``.

Shapes: images (H, W); tiles (T, P, P); conditions (T,).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

__all__ = ["TileLayout", "hann_window_2d"]


def hann_window_2d(patch_size: int) -> np.ndarray:
    """Periodic 2D Hann window ``hann(y) hann(x)`` (P, P), float64, values in [0, 1]."""
    p = int(patch_size)
    h = 0.5 - 0.5 * np.cos(2.0 * math.pi * np.arange(p) / p)
    return np.outer(h, h)


@dataclass(frozen=True)
class TileLayout:
    """Tile grid covering an (H, W) image.

    Attributes:
        height, width: image size in pixels.
        patch_size: P.
        stride: s, a divisor of P with P / s >= 2 (default P / 2).
    """

    height: int
    width: int
    patch_size: int
    stride: int

    def __post_init__(self) -> None:
        p, s = int(self.patch_size), int(self.stride)
        if s < 1 or p % s or p // s < 2:
            raise ValueError(f"stride must divide patch_size {p} at least twice, got {s}")
        if int(self.height) < 1 or int(self.width) < 1:
            raise ValueError(f"image size must be positive, got {self.height} x {self.width}")

    @property
    def pad_before(self) -> int:
        """Padding before the image on each axis, P - s (so that the window sum is constant over the image)."""
        return int(self.patch_size) - int(self.stride)

    def _count(self, length: int) -> int:
        return int(math.ceil((self.pad_before + int(length)) / int(self.stride)))

    @property
    def grid(self) -> tuple[int, int]:
        """Number of tiles along (y, x)."""
        return self._count(self.height), self._count(self.width)

    @property
    def canvas_shape(self) -> tuple[int, int]:
        ny, nx = self.grid
        s, p = int(self.stride), int(self.patch_size)
        return (ny - 1) * s + p, (nx - 1) * s + p

    @property
    def n_tiles(self) -> int:
        ny, nx = self.grid
        return ny * nx

    def pad(self, image: np.ndarray, mode: str = "edge") -> np.ndarray:
        """The (H, W) image on the canvas (padded with ``mode``), float64."""
        ch, cw = self.canvas_shape
        b = self.pad_before
        return np.pad(np.asarray(image, dtype=np.float64),
                      ((b, ch - b - int(self.height)), (b, cw - b - int(self.width))), mode=mode)

    def window_means(self, image: np.ndarray) -> np.ndarray:
        """Hann-weighted mean of the (H, W) image over every tile (edge-padded), (T,) float64.

        The Hann weight (= the squared overlap-add weight) emphasises the tile centre, where the tile's noise
        counts most in the field.
        """
        canvas = self.pad(image)
        s, p = int(self.stride), int(self.patch_size)
        windows = sliding_window_view(canvas, (p, p))[::s, ::s]
        w = hann_window_2d(p)
        return (np.einsum("yxij,ij->yx", windows, w) / w.sum()).reshape(-1)

    def overlap_add(self, tiles: np.ndarray) -> np.ndarray:
        """Variance-preserving overlap-add of independent tiles (T, P, P) into the (H, W) field, float32."""
        tiles = np.asarray(tiles)
        p, s = int(self.patch_size), int(self.stride)
        ny, nx = self.grid
        if tiles.shape != (ny * nx, p, p):
            raise ValueError(f"expected tiles of shape {(ny * nx, p, p)}, got {tiles.shape}")
        w2 = hann_window_2d(p)
        w = np.sqrt(w2)
        canvas = np.zeros(self.canvas_shape, dtype=np.float64)
        weight = np.zeros(self.canvas_shape, dtype=np.float64)
        k = 0
        for iy in range(ny):
            for ix in range(nx):
                sl = (slice(iy * s, iy * s + p), slice(ix * s, ix * s + p))
                canvas[sl] += w * tiles[k]
                weight[sl] += w2
                k += 1
        b = self.pad_before
        crop = (slice(b, b + int(self.height)), slice(b, b + int(self.width)))
        return (canvas[crop] / np.sqrt(np.maximum(weight[crop], 1e-12))).astype(np.float32)

    def blend_values(self, values: np.ndarray) -> np.ndarray:
        """Per-pixel Hann-weighted blend of one value per tile (T,), (H, W) float64 (e.g. the tile conditions)."""
        values = np.asarray(values, dtype=np.float64).reshape(-1)
        p, s = int(self.patch_size), int(self.stride)
        ny, nx = self.grid
        if values.shape[0] != ny * nx:
            raise ValueError(f"expected {ny * nx} values, got {values.shape[0]}")
        w2 = hann_window_2d(p)
        canvas = np.zeros(self.canvas_shape, dtype=np.float64)
        weight = np.zeros(self.canvas_shape, dtype=np.float64)
        for k in range(ny * nx):
            iy, ix = divmod(k, nx)
            sl = (slice(iy * s, iy * s + p), slice(ix * s, ix * s + p))
            canvas[sl] += w2 * values[k]
            weight[sl] += w2
        b = self.pad_before
        crop = (slice(b, b + int(self.height)), slice(b, b + int(self.width)))
        return canvas[crop] / np.maximum(weight[crop], 1e-12)
