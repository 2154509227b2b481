"""Rician noise of magnitude MR images.

A magnitude image is ``|(A + n1) + i n2|`` with ``n1, n2 ~ N(0, sigma^2)`` independent: Rician distributed around the
true signal ``A >= 0``. At high SNR it is close to Gaussian with std ``sigma``; in the background (A = 0) it is
Rayleigh with mean ``sigma * sqrt(pi / 2)`` (the noise floor bias). Noise levels are usually quoted as a percentage
of the maximum intensity (BrainWeb convention, 1-9 %).
"""
from __future__ import annotations

import numpy as np
from scipy import special

from ._validation import SeedLike, as_rng, check_image, check_non_negative

__all__ = ["add_rician_noise", "rician_expected_magnitude", "rician_bias_corrected"]


def add_rician_noise(
    image: np.ndarray,
    noise_percent: float,
    seed: SeedLike = None,
    reference_max: float | None = None,
) -> np.ndarray:
    """Add Rician noise to a magnitude image.

    Args:
        image: magnitude image (any shape, e.g. (H, W) or (Z, H, W)), values >= 0.
        noise_percent: noise level in percent: ``sigma = noise_percent / 100 * reference``.
        seed: int, SeedSequence, Generator or None.
        reference_max: intensity the percentage refers to; None means ``image.max()`` (pass the volume maximum
            when noising slices separately so they share one sigma).

    Returns:
        ``|(image + n1) + i n2|`` as float32, same shape, with ``n1, n2 ~ N(0, sigma^2)``.

    Raises:
        ValueError: negative or non-finite input, negative noise level or reference.
    """
    arr = check_image(image, non_negative=True)
    pct = check_non_negative(noise_percent, "noise_percent")
    ref = float(arr.max()) if reference_max is None else check_non_negative(reference_max, "reference_max")
    sigma = pct / 100.0 * ref
    if sigma == 0:
        return arr.astype(np.float32, copy=True)
    rng = as_rng(seed)
    real = arr.astype(np.float64) + rng.normal(0.0, sigma, size=arr.shape)
    imag = rng.normal(0.0, sigma, size=arr.shape)
    return np.hypot(real, imag).astype(np.float32)


def rician_expected_magnitude(signal: np.ndarray | float, sigma: float) -> np.ndarray:
    """Mean of the Rician magnitude for true signal ``signal >= 0`` and noise ``sigma`` (same units).

    ``E[M] = sigma sqrt(pi/2) L_{1/2}(-A^2 / (2 sigma^2))`` with the Laguerre function
    ``L_{1/2}(x) = exp(x/2) [(1 - x) I0(-x/2) - x I1(-x/2)]``, evaluated with exponentially scaled Bessel functions
    so that it is stable at high SNR (where it tends to ``A``). Returns float64 of the broadcast shape.
    """
    a = np.asarray(signal, dtype=np.float64)
    s = check_non_negative(sigma, "sigma")
    if s == 0:
        return a.copy()
    x = a**2 / (2.0 * s**2)  # = -argument of L_{1/2}
    # exp(-x/2) I_k(x/2) = ive(k, x/2): the exponential factors cancel.
    laguerre = (1.0 + x) * special.i0e(x / 2.0) + x * special.i1e(x / 2.0)
    return s * np.sqrt(np.pi / 2.0) * laguerre


def rician_bias_corrected(magnitude: np.ndarray, sigma: float) -> np.ndarray:
    """Simple Rician bias correction ``sqrt(max(M^2 - 2 sigma^2, 0))`` (Gudbjartsson & Patz), float32.

    Unbiased for ``M^2`` (``E[M^2] = A^2 + 2 sigma^2``); useful to compare denoised magnitude images with the truth.
    """
    m = check_image(magnitude, "magnitude", non_negative=True).astype(np.float64)
    s = check_non_negative(sigma, "sigma")
    return np.sqrt(np.maximum(m**2 - 2.0 * s**2, 0.0)).astype(np.float32)
