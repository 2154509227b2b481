"""Low-frequency restoration: give back what a denoiser removed at low spatial frequencies.

``restored = denoised + G_sigma * (noisy - denoised)``, with ``G_sigma`` an in-plane Gaussian of ``sigma`` pixels.

Why: a denoiser that cannot tell a small low-contrast lesion from noise removes part of its contrast with the
noise (the lesion detectability benchmark in ``bench/README.md``: every denoiser there, the shipped ones
included, makes such lesions harder to see than the low-dose input). The removed content ``noisy - denoised`` is
noise plus lost signal. A 3-10 mm lesion's lost contrast lies at low spatial frequencies, which a Gaussian of one
or two pixels passes, while it passes only part of the removed noise (the finer-grained part is held back); so
adding the low-pass part back restores most of the lesion's contrast for part of the noise. This is a trade, not
a free gain: contrast kept, model-observer d', noise and PSNR against ``sigma`` are measured in ``bench/README.md``
("Low-frequency restoration"), and the defaults below are what that benchmark chose, lesions first.

The filter runs per slice in the (H, W) plane, in pixels: the 2D networks work in pixels, so the band in which
they erase a lesion is a band of pixel frequencies, whatever the pixel size.

Arrays: (H, W) or (Z, H, W) float, in the modality's units (CT in HU); the result has the input's shape, float32.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

__all__ = ["DEFAULT_SIGMA_PX", "MAX_SIGMA_PX", "check_sigma_px", "default_sigma_px", "restore_low_frequencies"]

#: the default in-plane Gaussian width (pixels) per modality for the learned denoisers' output; 0 = off.
#: Chosen on the lesion detectability benchmark (bench/README.md, "Low-frequency restoration").
DEFAULT_SIGMA_PX: dict[str, float] = {"CT": 1.0, "MR": 0.0}
#: widest accepted filter: at 16 px only the local mean over tens of pixels comes back (wider means nothing new)
MAX_SIGMA_PX = 16.0


def default_sigma_px(modality: str | None) -> float:
    """The default restoration width for ``modality`` ("CT", "MR"; anything else: 0 = off)."""
    return DEFAULT_SIGMA_PX.get(str(modality or "").upper(), 0.0)


def check_sigma_px(sigma_px: float) -> float:
    """``sigma_px`` as a float in [0, :data:`MAX_SIGMA_PX`]; ``ValueError`` saying what is wrong otherwise."""
    if isinstance(sigma_px, bool) or not isinstance(sigma_px, (int, float, np.floating, np.integer)):
        raise ValueError(f"low-frequency restoration width must be a number of pixels, got {sigma_px!r}")
    value = float(sigma_px)
    if not math.isfinite(value) or not 0.0 <= value <= MAX_SIGMA_PX:
        raise ValueError(f"low-frequency restoration width must be in [0, {MAX_SIGMA_PX:g}] pixels "
                         f"(0 = off), got {sigma_px!r}")
    return value


def restore_low_frequencies(noisy: np.ndarray, denoised: np.ndarray, sigma_px: float) -> np.ndarray:
    """``denoised + G_sigma * (noisy - denoised)``, slice by slice in the (H, W) plane.

    Args:
        noisy: the denoiser's input, (H, W) or (Z, H, W).
        denoised: its output, same shape and units.
        sigma_px: standard deviation of the in-plane Gaussian in pixels; 0 returns ``denoised`` (as float32).
            Larger = a narrower band given back (less noise and less lesion contrast restored).

    Returns:
        float32 array of the input's shape. Memory: the result plus one slice.

    Raises:
        ValueError: shapes differ, not 2D/3D, non-finite values, ``sigma_px`` outside [0, 16].
    """
    sigma = check_sigma_px(sigma_px)
    noisy = np.asarray(noisy)
    denoised = np.asarray(denoised)
    if noisy.shape != denoised.shape:
        raise ValueError(f"noisy {noisy.shape} and denoised {denoised.shape} images differ in shape")
    if noisy.ndim not in (2, 3):
        raise ValueError(f"expected a slice (H, W) or a volume (Z, H, W), got shape {noisy.shape}")
    restored = np.array(denoised, dtype=np.float32, copy=True)
    if sigma == 0.0:
        return restored
    stack = restored.reshape((-1,) + restored.shape[-2:])
    source = noisy.reshape(stack.shape)
    for z in range(stack.shape[0]):
        removed = source[z].astype(np.float32) - stack[z]
        if not np.isfinite(removed).all():
            raise ValueError(f"slice {z}: non-finite values in the noisy or denoised image")
        stack[z] += ndimage.gaussian_filter(removed, sigma, mode="reflect")
    return restored
