"""Blind estimation of the noise level of an image (e.g. to set the sigma of BM3D/BM4D)."""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from ._validation import check_image

__all__ = ["estimate_ct_noise_std_hu", "estimate_noise_sigma"]

# MAD -> std for a Gaussian: sigma = median(|x|) / Phi^-1(3/4).
_MAD_TO_STD = 1.0 / 0.6744897501960817


def _haar_hh_sigma(slice_2d: np.ndarray, mask: np.ndarray | None) -> float:
    """Donoho's wavelet MAD estimator on the finest diagonal Haar subband (white-noise std)."""
    h2, w2 = slice_2d.shape[0] // 2 * 2, slice_2d.shape[1] // 2 * 2
    a = slice_2d[:h2, :w2].astype(np.float64)
    hh = (a[0::2, 0::2] - a[0::2, 1::2] - a[1::2, 0::2] + a[1::2, 1::2]) / 2.0
    if mask is not None:  # 2x2 blocks entirely inside the mask
        m = mask[:h2, :w2]
        hh = hh[m[0::2, 0::2] & m[0::2, 1::2] & m[1::2, 0::2] & m[1::2, 1::2]]
    # Exactly-constant areas (padding, clipped air) would drag the median to 0: ignore exact zeros.
    hh = hh[hh != 0]
    return float(np.median(np.abs(hh)) * _MAD_TO_STD) if hh.size else 0.0


def _local_std_sigma(slice_2d: np.ndarray, window: int, quantile: float, mask: np.ndarray | None) -> float:
    """Low quantile of the local standard deviation: the noise std of the flattest regions."""
    a = slice_2d.astype(np.float64)
    mean = ndimage.uniform_filter(a, window, mode="reflect")
    sq = ndimage.uniform_filter(a * a, window, mode="reflect")
    local = np.sqrt(np.maximum(sq - mean * mean, 0.0)) * np.sqrt(window * window / (window * window - 1.0))
    if mask is not None:
        local = local[mask]
    local = local[local > 0]
    return float(np.quantile(local, quantile)) if local.size else 0.0


def estimate_noise_sigma(
    image: np.ndarray,
    method: str = "wavelet",
    *,
    window: int = 7,
    quantile: float = 0.25,
    mask: np.ndarray | None = None,
) -> float:
    """Robust estimate of the noise standard deviation (image units, e.g. HU).

    Args:
        image: (H, W) slice or (Z, H, W) volume; a volume gives the median of the per-slice estimates.
        method: "wavelet": median absolute value of the finest diagonal Haar wavelet coefficients / 0.6745
            (Donoho & Johnstone, as ``skimage.restoration.estimate_sigma``); exact for white noise, but it only sees
            the highest frequencies, so it underestimates the pixel std of correlated noise (CT noise after a smooth
            reconstruction kernel). "local_std": the ``quantile`` of the local std over ``window`` x ``window``
            windows (flat regions have the smallest local std); closer to the pixel std of correlated noise, but
            biased up by fine texture.
        window: window side for "local_std".
        quantile: quantile for "local_std", in (0, 1).
        mask: optional boolean array of the image's shape: estimate only from these pixels (e.g. soft tissue from
            :func:`lib.noise.soft_tissue_mask`). For a CT slice, ``method="local_std", window=5, quantile=0.5`` in
            a soft-tissue mask gives close to the pixel noise std (27 HU on the thorax scan of shared/data, where
            the wavelet estimate says 10 HU because the noise is correlated).

    Returns:
        Estimated sigma (float >= 0).
    """
    arr = check_image(image)
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != arr.shape:
            raise ValueError(f"mask shape {mask.shape} differs from image shape {arr.shape}")
    if arr.ndim == 2:
        arr = arr[None]
        mask = None if mask is None else mask[None]
    if arr.ndim != 3 or min(arr.shape[1:]) < 4:
        raise ValueError(f"image must be (H, W) or (Z, H, W) with H, W >= 4, got shape {np.shape(image)}")
    if method == "wavelet":
        values = [_haar_hh_sigma(s, None if mask is None else mask[k]) for k, s in enumerate(arr)]
    elif method == "local_std":
        if int(window) < 2 or not 0 < float(quantile) < 1:
            raise ValueError(f"need window >= 2 and quantile in (0, 1); got {window}, {quantile}")
        values = [
            _local_std_sigma(s, int(window), float(quantile), None if mask is None else mask[k])
            for k, s in enumerate(arr)
        ]
    else:
        raise ValueError(f"unknown method {method!r}; use 'wavelet' or 'local_std'")
    return float(np.median(values))


def estimate_ct_noise_std_hu(image_hu: np.ndarray, *, max_slices: int = 32, min_pixels: int = 500) -> float | None:
    """Soft-tissue pixel noise std (HU) of a CT image: the noise a normal-dose scan already carries.

    Per slice, ``estimate_noise_sigma(method="local_std", window=5, quantile=0.5)`` in the slice's eroded soft-tissue
    mask (:func:`lib.noise.soft_tissue_mask`, -100..200 HU); the median over at most ``max_slices`` slices spread
    over the volume, skipping those with fewer than ``min_pixels`` soft-tissue pixels (an empty mask would count
    as 0 HU). Not the default wavelet estimate: it sees only the finest frequencies and gives a third to a half
    of CT noise (11.9 HU where the thorax scan of shared/data carries about 30 HU).

    Calibrated on real scans of shared/data with sinogram-domain noise of a known std added
    (:func:`lib.noise.simulate_low_dose_ct`, quarter-dose protocol, 20 and 32 HU in soft tissue): the head phantom
    (~3 HU of its own) + 20 / 32 HU gave 20.4 / 32.0 HU (truth 20.2 / 32.1); for the Philips thorax and the
    InVesalius head, estimate(scan + noise)^2 - added^2 gave 31.2 / 31.9 and 6.9 / 5.4 HU against 30.5 and 7.0 HU
    for the scans alone: within about 1-2 HU.

    Returns:
        The estimate in HU, or None where no slice has enough soft tissue to measure it.
    """
    from .ct_lowdose import soft_tissue_mask

    arr = check_image(image_hu, "image_hu")
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or min(arr.shape[1:]) < 8:
        raise ValueError(f"image_hu must be (H, W) or (Z, H, W) with H, W >= 8, got shape {np.shape(image_hu)}")
    picked = np.unique(np.linspace(0, arr.shape[0] - 1, min(arr.shape[0], int(max_slices))).round().astype(int))
    values = []
    for z in picked:
        mask = soft_tissue_mask(arr[z])
        if np.count_nonzero(mask) >= int(min_pixels):
            values.append(_local_std_sigma(arr[z], 5, 0.5, mask))
    return float(np.median(values)) if values else None
