"""Generic pixel-domain noise models (Gaussian, Poisson, speckle).

These are stand-ins for quick experiments and for modalities without a physics model here; for CT use
:mod:`lib.noise.ct_lowdose` (projection-domain noise is correlated and streaky, unlike these), for MR magnitude
images :mod:`lib.noise.mr`. All functions return float32 arrays of the input shape.
"""
from __future__ import annotations

import numpy as np

from ._validation import SeedLike, as_rng, check_image, check_non_negative

__all__ = ["add_gaussian_noise", "add_poisson_noise", "add_speckle_noise"]


def add_gaussian_noise(image: np.ndarray, sigma: float, seed: SeedLike = None) -> np.ndarray:
    """``image + N(0, sigma^2)``, i.i.d. per pixel; ``sigma`` in image units (e.g. HU). Returns float32."""
    arr = check_image(image)
    s = check_non_negative(sigma, "sigma")
    if s == 0:
        return arr.astype(np.float32, copy=True)
    return (arr.astype(np.float64) + as_rng(seed).normal(0.0, s, size=arr.shape)).astype(np.float32)


def add_poisson_noise(image: np.ndarray, peak: float, seed: SeedLike = None) -> np.ndarray:
    """Photon-count noise: scale so the maximum is ``peak`` counts, draw Poisson, scale back. Returns float32.

    Lower ``peak`` means noisier (SNR at the maximum is ``sqrt(peak)``); the noise variance at value ``v`` is
    ``v * max / peak``. The image must be >= 0 (shift HU images first, e.g. ``hu + 1024``).
    """
    arr = check_image(image, non_negative=True)
    pk = check_non_negative(peak, "peak", strict=True)
    vmax = float(arr.max())
    if vmax == 0:
        return arr.astype(np.float32, copy=True)
    scale = pk / vmax
    counts = as_rng(seed).poisson(arr.astype(np.float64) * scale)
    return (counts / scale).astype(np.float32)


def add_speckle_noise(image: np.ndarray, sigma: float, seed: SeedLike = None) -> np.ndarray:
    """Multiplicative noise ``image * (1 + n)``, ``n ~ N(0, sigma^2)`` (relative std ``sigma``). Returns float32."""
    arr = check_image(image)
    s = check_non_negative(sigma, "sigma")
    if s == 0:
        return arr.astype(np.float32, copy=True)
    return (arr.astype(np.float64) * (1.0 + as_rng(seed).normal(0.0, s, size=arr.shape))).astype(np.float32)
