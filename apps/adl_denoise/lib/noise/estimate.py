"""Blind estimation of the noise level of an image (e.g. to set the sigma of BM3D/BM4D)."""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from ._validation import check_image

__all__ = ["CT_NOISE_WINDOW", "estimate_ct_noise_std_hu", "estimate_noise_sigma", "flat_window_noise_std"]

# MAD -> std for a Gaussian: sigma = median(|x|) / Phi^-1(3/4).
_MAD_TO_STD = 1.0 / 0.6744897501960817

#: window side (pixels) of the CT soft-tissue noise estimate (:func:`flat_window_noise_std`): wide enough that the
#: plane removed with each window's mean takes little of the noise of smooth reconstruction kernels
CT_NOISE_WINDOW = 25
#: fewer window positions than this inside the mask: try the next smaller window (see :func:`flat_window_noise_std`)
MIN_WINDOWS = 500
#: the smaller windows tried, in turn, where the mask holds too few of the wide one (thin or small soft tissue)
_FALLBACK_WINDOWS = (19, 15, 9, 5)
#: window side of the level of the whole mask in :func:`flat_window_noise_std` (fits nearly everywhere in it)
LEVEL_WINDOW = 5


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


def _plane_fit_variance_map(images: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Residual variance about a least-squares plane in the ``window`` x ``window`` window centred on each pixel,
    unbiased for white noise (divided by ``window**2 - 3``).

    Args:
        images: (N, H, W) float array; windows never straddle two images.
        window: odd window side, <= H and W.

    Returns:
        The variances, (N, H, W) float64 (image units squared; meaningless where the window leaves the image or
        holds a NaN or infinite value), and the (N, H, W) bool map of the finite pixels.
    """
    a = images.astype(np.float64, copy=False)
    finite = np.isfinite(a)
    if not finite.all():  # one NaN / inf would spread along the filters' running sums: windows holding one are dropped
        a = np.where(finite, a, 0.0)
    size = (1, window, window)
    mean = ndimage.uniform_filter(a, size, mode="reflect")
    var = ndimage.uniform_filter(a * a, size, mode="reflect") - mean * mean
    # the window's offsets -r..r are centred, so x and y fits are independent: remove cov(a, x)^2 / var(x) each
    offsets = np.arange(window, dtype=np.float64) - window // 2
    var_offset = float(np.mean(offsets ** 2))
    for axis in (1, 2):
        shape = [1, 1, 1]
        shape[axis] = a.shape[axis]
        coord = np.broadcast_to(np.arange(a.shape[axis], dtype=np.float64).reshape(shape), a.shape)
        cov = ndimage.uniform_filter(a * coord, size, mode="reflect") - mean * coord
        var -= cov * cov / var_offset
    return np.maximum(var, 0.0) * (window * window / (window * window - 3.0)), finite


def _window_centres(region: np.ndarray, window: int) -> np.ndarray:
    """(N, H, W) bool: the pixels whose ``window`` x ``window`` window lies entirely inside ``region`` (the region
    eroded by the window; border_value=0 drops image edges)."""
    return ndimage.binary_erosion(region, np.ones((1, window, window), dtype=bool), border_value=0)


def flat_window_noise_std(images: np.ndarray, mask: np.ndarray | None = None, *, window: int = CT_NOISE_WINDOW,
                          min_windows: int = MIN_WINDOWS) -> float | None:
    """Noise std of flat regions in two scales: the wide windows' reading of correlated noise, at the level of the
    whole mask, pooled over the images.

    Correlated noise (smooth reconstruction kernels) keeps much of its variance at low spatial frequencies, which a
    small window's own mean takes away (the median 5 x 5 local std read it low; bench/README.md, "Level
    calibration"). A wide window with a plane fit keeps almost all of it while still removing the anatomy's
    gradients, but wide windows fit only in wide regions, and there CT noise is not that of the whole mask (FBP
    noise is highest in the middle of the body). So:

    * ``wide``: the median residual variance about a plane in the ``window`` x ``window`` windows lying entirely
      inside ``mask`` (the median ignores those that hold edges or vessels); where the mask holds fewer than
      ``min_windows`` positions of it, the next of 19, 15, 9, 5 pixels that fits (the few wide windows of a narrow
      region sit in one or two organs and read their anatomy; small windows read correlated noise low again);
    * ``small``: the same with 5 x 5 windows, which fit nearly all over the mask: its median over all of them,
      ``small(mask)``, and over those lying inside some wide window (the part of the mask the wide windows read),
      ``small(wide)``;
    * the estimate: ``sqrt(wide * small(mask) / small(wide))``. ``wide / small(wide)`` is how much of the variance
      the small windows miss, measured in the same part of the mask (a property of the noise's correlation, i.e. of
      the kernel, which changes far less across the body than the level); ``small(mask) / small(wide)`` carries
      the wide windows' reading over to the whole mask. Where the wide windows cover (nearly) the whole mask, or the
      noise is stationary, it is ``sqrt(wide)`` (in expectation).

    The median over the wide windows still weighs the middle of a wide region more than its borders (every window
    there holds the middle), so where the noise peaks in the middle it still reads somewhat high.

    Args:
        images: (H, W) or (N, H, W) image(s), e.g. HU.
        mask: bool array of the same shape (e.g. soft tissue), or None for everywhere; windows holding a NaN or
            infinite value are left out either way (the filters would carry it along its whole row).
        window: odd window side in pixels (>= 3); at most 5: one scale, no level correction.
        min_windows: fewest window positions an estimate needs.

    Returns:
        The std in image units, or None where no window size fits ``min_windows`` times.
    """
    arr = np.asarray(images)
    if arr.ndim == 2:
        arr = arr[None]
        mask = None if mask is None else np.asarray(mask)[None]
    if arr.ndim != 3:
        raise ValueError(f"images must be (H, W) or (N, H, W), got shape {np.shape(images)}")
    if mask is not None and np.shape(mask) != arr.shape:
        raise ValueError(f"mask shape {np.shape(mask)} differs from the images' {arr.shape}")
    if int(window) < 3 or int(window) % 2 == 0:
        raise ValueError(f"window must be odd and >= 3, got {window}")
    for side in (int(window),) + tuple(w for w in _FALLBACK_WINDOWS if w < int(window)):
        if side > min(arr.shape[1:]):
            continue
        variances, finite = _plane_fit_variance_map(arr, side)
        inside = finite if mask is None else np.asarray(mask, dtype=bool) & finite
        centres = _window_centres(inside, side)
        if np.count_nonzero(centres) >= int(min_windows):
            break
    else:
        return None
    wide = float(np.median(variances[centres]))
    if side <= LEVEL_WINDOW:
        return float(np.sqrt(wide))
    small, _ = _plane_fit_variance_map(arr, LEVEL_WINDOW)
    everywhere = _window_centres(inside, LEVEL_WINDOW)
    # a small window lies inside some wide window where a wide window's centre is within (side - LEVEL_WINDOW) / 2
    # pixels of its own: a box filter of the centres
    reach = side - LEVEL_WINDOW + 1
    held = everywhere & (ndimage.uniform_filter(centres.astype(np.float64), (1, reach, reach), mode="constant")
                         * (reach * reach) > 0.5)
    in_wide = float(np.median(small[held]))
    if not in_wide > 0:  # no noise in the wide windows (a constant region): nothing to rescale
        return float(np.sqrt(wide))
    return float(np.sqrt(wide * float(np.median(small[everywhere])) / in_wide))


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
            a soft-tissue mask is far closer to the pixel noise std than the wavelet estimate (27 HU on the thorax
            scan of shared/data, where the wavelet estimate says 10 HU because the noise is correlated) but still
            reads correlated noise low: :func:`estimate_ct_noise_std_hu` gives the pixel std.

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

    Per slice, :func:`flat_window_noise_std` (median residual variance about a plane in 25 x 25 windows, carried
    over to the whole mask by 5 x 5 windows) in the slice's eroded soft-tissue mask
    (:func:`lib.noise.soft_tissue_mask`, -100..200 HU); the median over at most ``max_slices`` slices spread over
    the volume, skipping those with fewer than ``min_pixels`` soft-tissue pixels or too few windows inside them.
    Unbiased on white noise, and on noise correlated by smooth reconstruction kernels (FBP with smooth filters, noise
    low-pass filtered over a pixel or so); noise correlated over several pixels still reads low, and noise that
    peaks where the soft tissue is widest still reads somewhat high (see bench/README.md, "Level calibration"). Not
    the wavelet estimate, which sees only the finest frequencies, nor the median 5 x 5 local std, which read
    correlated noise low, nor the 25 x 25 windows alone, which read the wide regions only.

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
            value = flat_window_noise_std(arr[z], mask)
            if value is not None:
                values.append(value)
    return float(np.median(values)) if values else None
