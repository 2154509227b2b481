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

MR is restored inside the imaged object only (:func:`foreground_weight`, a soft mask from the noisy input): in
the air around a head the network removes the Rician noise floor (a positive, low-frequency bias of magnitude
images) and an unmasked restoration gives that bias back. The default for MR stays off: even masked it costs
more whole-image PSNR than the lesion gain justifies, mostly noise given back inside the brain (both measured in
``bench/README.md``, "Low-frequency restoration"). CT is restored everywhere: its air
is -1000 HU with zero-mean noise, which the networks do not bias, so a mask would change nothing there but could
cut off tissue.

Arrays: (H, W) or (Z, H, W) float, in the modality's units (CT in HU); the result has the input's shape, float32.
Widths, dilations and smoothing are in pixels of the (H, W) plane.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

__all__ = ["DEFAULT_SIGMA_PX", "FOREGROUND_ONLY", "MAX_SIGMA_PX", "apply_restoration",
           "check_sigma_px", "default_sigma_px", "foreground_only", "foreground_threshold", "foreground_weight",
           "restoration_width", "restore_low_frequencies"]

#: the default in-plane Gaussian width (pixels) per modality for the learned denoisers' output where the weight file
#: names none of its own (``lib.weights.format.RESTORATION_KEY``: a network measured to need another width carries
#: it, e.g. the TDDL-GCN CT file shipped 2026-12-05, 0.6 px); 0 = off. Chosen on the lesion detectability benchmark
#: with the shipped CT networks (bench/README.md, "Low-frequency restoration", "Longer lesion-aware fine-tunes" and
#: "TDDL-GCN, lesion-aware fine-tune": the earlier GCN file needed 0.8 as well); MR off: even inside the imaged body
#: only it costs far more whole-image PSNR than issue 18 allows (0.3 dB).
DEFAULT_SIGMA_PX: dict[str, float] = {"CT": 0.8, "MR": 0.0}
#: widest accepted filter: at 16 px only the local mean over tens of pixels comes back (wider means nothing new)
MAX_SIGMA_PX = 16.0
#: modalities restored inside the imaged object only (MR: the Rician floor in air is a bias not to give back)
FOREGROUND_ONLY: dict[str, bool] = {"CT": False, "MR": True}
#: foreground mask, in pixels: pre-smoothing of the noisy slice (so that noise neither breaks the object's edge nor
#: leaves specks in the air), dilation, and the Gaussian feather of the mask's edge (no step in the output where the
#: restoration stops). No dilation: a threshold of 2 noise sigmas, far below tissue, already puts the smoothed
#: edge outside the tissue's, and every pixel of band around a head gives the air's floor back (whole-image PSNR
#: against dilation in bench/README.md, same lesion contrast kept)
FOREGROUND_SMOOTH_PX = 2.0
FOREGROUND_DILATE_PX = 0
FOREGROUND_FEATHER_PX = 1.0
#: a slice's components at least this fraction of its largest are kept: axial slices at the skull base cut a head
#: into several pieces (temporal lobes, cerebellum), all of them tissue
FOREGROUND_KEEP_FRACTION = 0.05
#: the object is above this multiple of the air's (smoothed) level: 1.6 x the Rayleigh mean = 2 noise sigmas
FOREGROUND_FLOOR_FACTOR = 1.6
#: histogram bins of the threshold (over [min, max]: a noise sigma at 5 % Rician noise spans ~20 bins)
FOREGROUND_BINS = 512


def default_sigma_px(modality: str | None, weights_sigma_px: float | None = None) -> float:
    """The default restoration width: the one the weight file names (``weights_sigma_px``,
    :func:`lib.weights.format.restoration_of`), else that of ``modality`` ("CT", "MR"; anything else: 0 = off)."""
    if weights_sigma_px is not None:
        return check_sigma_px(weights_sigma_px)
    return DEFAULT_SIGMA_PX.get(str(modality or "").upper(), 0.0)


def foreground_only(modality: str | None) -> bool:
    """Whether ``modality``'s restoration is limited to the imaged object (:data:`FOREGROUND_ONLY`; MR yes)."""
    return FOREGROUND_ONLY.get(str(modality or "").upper(), False)


def check_sigma_px(sigma_px: float) -> float:
    """``sigma_px`` as a float in [0, :data:`MAX_SIGMA_PX`]; ``ValueError`` saying what is wrong otherwise."""
    if isinstance(sigma_px, bool) or not isinstance(sigma_px, (int, float, np.floating, np.integer)):
        raise ValueError(f"low-frequency restoration width must be a number of pixels, got {sigma_px!r}")
    value = float(sigma_px)
    if not math.isfinite(value) or not 0.0 <= value <= MAX_SIGMA_PX:
        raise ValueError(f"low-frequency restoration width must be in [0, {MAX_SIGMA_PX:g}] pixels "
                         f"(0 = off), got {sigma_px!r}")
    return value


def foreground_threshold(noisy: np.ndarray, smooth_px: float = FOREGROUND_SMOOTH_PX) -> float:
    """Threshold between air and object over the whole of ``noisy`` ((H, W) or (Z, H, W), MR magnitude, values
    >= 0: not for HU, where the air's level is negative), on the
    slices smoothed in-plane by a Gaussian of ``smooth_px`` pixels; units of ``noisy``.

    The lower of Otsu's threshold and :data:`FOREGROUND_FLOOR_FACTOR` times the air's level (the mode of the
    smoothed values below Otsu's threshold: the Rician noise floor, sigma * sqrt(pi / 2) in pure noise). Otsu alone
    splits the brightest class off where the tissue is bimodal (fat against muscle in a limb: measured on the
    sample shoulder slice it left 3/4 of the muscle out); twice the noise sigma is above every air pixel once
    smoothed (the smoothed floor's spread is under a tenth of sigma at 2 px) and below tissue at MR's SNR. One
    threshold per volume, so that a slice of air alone (above a head) gets no mask. The histogram is accumulated
    slice by slice (memory: one slice). A constant image has no object: its threshold is its value."""
    from skimage.filters import threshold_otsu

    noisy = np.asarray(noisy)
    stack = noisy.reshape((-1,) + noisy.shape[-2:])
    low, high = float(np.min(noisy)), float(np.max(noisy))
    if not high > low:
        return high
    edges = np.linspace(low, high, FOREGROUND_BINS + 1)
    centres = 0.5 * (edges[:-1] + edges[1:])
    counts = np.zeros(FOREGROUND_BINS, np.int64)
    for z in range(stack.shape[0]):  # smoothing stays within [low, high]: every pixel lands in a bin
        counts += np.histogram(ndimage.gaussian_filter(stack[z].astype(np.float32), smooth_px), bins=edges)[0]
    otsu = float(threshold_otsu(hist=(counts, centres)))
    dark = centres < otsu
    if not dark.any():
        return otsu
    floor = float(centres[dark][np.argmax(counts[dark])])
    return min(otsu, FOREGROUND_FLOOR_FACTOR * floor)


def foreground_weight(noisy_slice: np.ndarray, threshold: float, *, smooth_px: float = FOREGROUND_SMOOTH_PX,
                      dilate_px: int = FOREGROUND_DILATE_PX, feather_px: float = FOREGROUND_FEATHER_PX
                      ) -> np.ndarray:
    """Soft mask of the imaged object in one noisy slice: float32 (H, W) in [0, 1], 1 inside, 0 in the air.

    The slice smoothed by ``smooth_px`` above ``threshold`` (:func:`foreground_threshold`), its components of at
    least :data:`FOREGROUND_KEEP_FRACTION` of the largest, holes filled (dark ventricles, CSF), dilated by a disc
    of ``dilate_px`` pixels (0: none) and feathered by a Gaussian of ``feather_px`` pixels. An empty slice gives
    zeros. Memory: a few slices."""
    from skimage.morphology import disk

    image = np.asarray(noisy_slice, dtype=np.float32)
    if image.ndim != 2:
        raise ValueError(f"expected one slice (H, W), got shape {image.shape}")
    mask = ndimage.gaussian_filter(image, smooth_px) > threshold
    labels, count = ndimage.label(mask)
    if count == 0:
        return np.zeros(image.shape, np.float32)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0  # the background
    mask = (sizes >= FOREGROUND_KEEP_FRACTION * sizes.max())[labels] & (labels > 0)
    mask = ndimage.binary_fill_holes(mask)
    if dilate_px > 0:
        mask = ndimage.binary_dilation(mask, structure=disk(int(dilate_px)))
    weight = mask.astype(np.float32)
    if feather_px > 0:
        weight = ndimage.gaussian_filter(weight, feather_px)
    return np.clip(weight, 0.0, 1.0, out=weight)


def restore_low_frequencies(noisy: np.ndarray, denoised: np.ndarray, sigma_px: float, *,
                            foreground: bool = False) -> np.ndarray:
    """``denoised + G_sigma * (noisy - denoised)``, slice by slice in the (H, W) plane.

    Args:
        noisy: the denoiser's input, (H, W) or (Z, H, W).
        denoised: its output, same shape and units.
        sigma_px: standard deviation of the in-plane Gaussian in pixels; 0 returns ``denoised`` (as float32).
            Larger = a narrower band given back (less noise and less lesion contrast restored).
        foreground: give back only inside the imaged object: the low-passed removed content is multiplied by
            :func:`foreground_weight` of each noisy slice (one :func:`foreground_threshold` for the volume), so
            the air stays as the denoiser left it (for MR).

    Returns:
        float32 array of the input's shape. Memory: the result plus a few slices.

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
    threshold = None
    for z in range(stack.shape[0]):
        removed = source[z].astype(np.float32) - stack[z]
        if not np.isfinite(removed).all():
            raise ValueError(f"slice {z}: non-finite values in the noisy or denoised image")
        low_pass = ndimage.gaussian_filter(removed, sigma, mode="reflect")
        if foreground:
            threshold = foreground_threshold(noisy) if threshold is None else threshold
            low_pass *= foreground_weight(source[z], threshold)
        stack[z] += low_pass
    return restored


def restoration_width(modality: str | None, sigma_px: float | None = None,
                      weights_sigma_px: float | None = None) -> float:
    """The width in pixels that :func:`apply_restoration` applies: ``sigma_px`` checked, or when None the weight
    file's own default (``weights_sigma_px``) or the modality's (0 = off)."""
    return default_sigma_px(modality, weights_sigma_px) if sigma_px is None else check_sigma_px(sigma_px)


def apply_restoration(noisy: np.ndarray, denoised: np.ndarray, modality: str | None,
                      sigma_px: float | None = None, *, weights_sigma_px: float | None = None
                      ) -> tuple[np.ndarray, float]:
    """The restoration as the app, the CLI and the benchmark apply it to a learned denoiser's output.

    Args:
        noisy: the denoiser's input, (H, W) or (Z, H, W), modality units.
        denoised: its output, same shape and units.
        modality: "CT" or "MR" (anything else: default off, unmasked); picks the default width and whether the
            restoration is limited to the foreground (:data:`FOREGROUND_ONLY`).
        sigma_px: in-plane Gaussian width in pixels; None = the default: the weight file's own
            (``weights_sigma_px``) where it names one, else the modality's (:data:`DEFAULT_SIGMA_PX`); 0 = off.
        weights_sigma_px: the width the denoiser's weight file names (:func:`lib.weights.format.restoration_of`
            of its metadata), None where it names none.

    Returns:
        ``(image, width applied in pixels)``: with width 0, ``denoised`` itself (not copied); otherwise a float32
        array of the input's shape (:func:`restore_low_frequencies`).

    Raises:
        ValueError: a width outside [0, 16], or what :func:`restore_low_frequencies` refuses.
    """
    sigma = restoration_width(modality, sigma_px, weights_sigma_px)
    if sigma == 0.0:
        return denoised, 0.0
    return restore_low_frequencies(noisy, denoised, sigma, foreground=foreground_only(modality)), sigma
