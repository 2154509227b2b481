"""Classical (non-learned) denoisers: the baselines every learned model must beat.

All take a float32 array in the modality's units, (H, W) or (Z, H, W), and return the same shape and
units (HU for CT). Noise levels are estimated from the NOISY INPUT ONLY (a user has no reference image):

* CT: median 5x5 local std inside a soft-tissue mask of the noisy slice. Two simpler estimators fail on CT:
  the wavelet (finest Haar subband) MAD sees only the highest frequencies of the correlated FBP noise, and a
  whole-image local-std quantile lands in the air around the patient; both gave 7-9 HU on a simulated
  quarter-dose abdomen whose body noise is 30-50 HU, so NLM and BM3D barely smoothed.
* MR: wavelet MAD (Rician noise is white) over the foreground (> 10 % of the maximum): the Rayleigh
  background has only ~0.66 sigma of spread and would bias the estimate low.

MR's "maximum" (the foreground threshold above and BM3D / BM4D's scale) is :func:`mr_top`: the largest value that is
not above MR_OUTLIER_FACTOR x the 99.5th percentile. With the plain maximum one bright voxel (a spike, or a vessel far
above the rest) moved the noise estimate of its whole slice: at 8 x the maximum, 12.6 -> 21.5 on a Colin27 slice (NLM
then smoothed all of it, lesions included, changing it by up to 32 of 187 far from the voxel) and 12.6 -> 0 on a
96 x 96 block of it (NLM and BM3D left it as noisy as it came); BM4D's median over the slices moved with a vessel
through most of them. Real slices stay under 3 x (the held-out Gd brain: 2.8 at most; every slice of the MR volumes
of sample_data and ../shared/data), where the top is the maximum as before. Values above the top are not clipped:
they are denoised in their own units.

Parameters:
* ``gaussian``: in-plane Gaussian, sigma 1 pixel, none along z (fixed, not tuned on any benchmark).
* ``nlm``: scikit-image non-local means per slice, fast mode, patch 5, search distance 6, h = 0.8 sigma.
* ``bm3d``: PyPI ``bm3d`` (both stages) per slice on the image normalised to [0, 1] (its thresholds assume
  that scale; CT by [-1024, 3071] HU, MR by [0, :func:`mr_top`]), sigma_psd = the per-slice estimate (white-noise model).
* ``bm4d``: PyPI ``bm4d`` on the whole normalised volume, sigma = median of the per-slice estimates.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from scipy import ndimage
from tqdm.auto import tqdm

from ..noise import estimate_noise_sigma, soft_tissue_mask

GAUSSIAN_SIGMA_PX = 1.0
NLM_PATCH_SIZE = 5
NLM_PATCH_DISTANCE = 6
NLM_H_FACTOR = 0.8
CT_NORMALISATION_HU = (-1024.0, 3071.0)
CT_SIGMA_KW = dict(method="local_std", window=5, quantile=0.5)
MR_FOREGROUND_FRACTION = 0.1
#: MR values above this many times the 99.5th percentile are outliers for the scale (:func:`mr_top`)
MR_OUTLIER_FACTOR = 4.0
MR_TOP_PERCENTILE = 99.5
MIN_MASK_PIXELS = 64


def mr_top(image: np.ndarray) -> float:
    """The largest value of ``image`` (any shape) not above MR_OUTLIER_FACTOR x its 99.5th percentile: its
    maximum unless a few voxels lie far above the rest (see the module notes)."""
    values = np.asarray(image, np.float32).ravel()
    limit = MR_OUTLIER_FACTOR * float(np.percentile(values, MR_TOP_PERCENTILE))
    top = float(values.max())
    if top <= limit or limit <= 0.0:  # the usual image, or one that is mostly empty: the plain maximum
        return top
    return float(values[values <= limit].max())


def blind_noise_sigma(slice2d: np.ndarray, modality: str) -> float:
    """Noise std of one slice in its own units, from the noisy slice alone (see the module notes)."""
    image = np.ascontiguousarray(slice2d, dtype=np.float32)
    if modality.upper() == "CT":
        mask = soft_tissue_mask(image)
        return float(estimate_noise_sigma(image, mask=mask if mask.sum() >= MIN_MASK_PIXELS else None, **CT_SIGMA_KW))
    mask = image > MR_FOREGROUND_FRACTION * mr_top(image)
    return float(estimate_noise_sigma(image, method="wavelet", mask=mask if mask.sum() >= MIN_MASK_PIXELS else None))


def _as_volume(image: np.ndarray) -> np.ndarray:
    if image.ndim not in (2, 3):
        raise ValueError(f"expected a 2D slice or a 3D volume, got an array of shape {image.shape}")
    return np.asarray(image, np.float32).reshape((-1, *image.shape[-2:]))


def _normalisation(image: np.ndarray, modality: str) -> tuple[float, float]:
    if modality.upper() == "CT":
        return CT_NORMALISATION_HU
    high = mr_top(image)
    return 0.0, high if high > 0 else 1.0


def gaussian_denoise(image: np.ndarray, modality: str = "CT", progress: bool = False) -> np.ndarray:
    """In-plane Gaussian, sigma GAUSSIAN_SIGMA_PX pixels along y and x, none along z."""
    volume = _as_volume(image)
    out = ndimage.gaussian_filter(volume, sigma=(0.0, GAUSSIAN_SIGMA_PX, GAUSSIAN_SIGMA_PX), mode="reflect")
    return out.astype(np.float32).reshape(image.shape)


def nlm_denoise(image: np.ndarray, modality: str = "CT", progress: bool = False) -> np.ndarray:
    """Non-local means per slice with h = 0.8 sigma_est (fast mode, patch 5, distance 6)."""
    from skimage.restoration import denoise_nl_means

    volume = _as_volume(image)
    out = np.empty_like(volume)
    for z, s in enumerate(tqdm(volume, disable=not progress, desc="nlm", unit="slice")):
        sigma = max(blind_noise_sigma(s, modality), 1e-6)
        out[z] = denoise_nl_means(s.astype(np.float64), h=NLM_H_FACTOR * sigma, sigma=sigma,
                                  patch_size=NLM_PATCH_SIZE, patch_distance=NLM_PATCH_DISTANCE, fast_mode=True)
    return out.reshape(image.shape)


def bm3d_denoise(image: np.ndarray, modality: str = "CT", progress: bool = False) -> np.ndarray:
    """BM3D per slice on the [0, 1]-normalised image with the per-slice noise estimate."""
    import bm3d

    volume = _as_volume(image)
    low, high = _normalisation(volume, modality)
    out = np.empty_like(volume)
    for z, s in enumerate(tqdm(volume, disable=not progress, desc="bm3d", unit="slice")):
        sigma = max(blind_noise_sigma(s, modality) / (high - low), 1e-9)
        normalised = (s.astype(np.float64) - low) / (high - low)
        out[z] = np.asarray(bm3d.bm3d(normalised, sigma_psd=sigma, stage_arg=bm3d.BM3DStages.ALL_STAGES)) * (high - low) + low
    return out.reshape(image.shape)


def bm4d_denoise(image: np.ndarray, modality: str = "MR", progress: bool = False) -> np.ndarray:
    """BM4D on the whole [0, 1]-normalised volume, sigma = median of the per-slice noise estimates."""
    import bm4d

    if image.ndim != 3:
        raise ValueError(f"BM4D needs a 3D volume, got shape {image.shape}")
    volume = _as_volume(image)
    low, high = _normalisation(volume, modality)
    sigma = max(float(np.median([blind_noise_sigma(s, modality) for s in volume])) / (high - low), 1e-9)
    normalised = (volume.astype(np.float64) - low) / (high - low)
    result = np.asarray(bm4d.bm4d(normalised, sigma_psd=sigma, stage_arg=bm4d.BM4DStages.ALL_STAGES))
    return (result * (high - low) + low).astype(np.float32).reshape(image.shape)


CLASSICAL_DENOISERS: dict[str, Callable[..., np.ndarray]] = {
    "gaussian": gaussian_denoise,
    "nlm": nlm_denoise,
    "bm3d": bm3d_denoise,
    "bm4d": bm4d_denoise,
}


def denoise_classical(name: str, image: np.ndarray, modality: str = "CT", progress: bool = False) -> np.ndarray:
    """Run the classical denoiser `name` (one of CLASSICAL_DENOISERS) on `image`."""
    if name not in CLASSICAL_DENOISERS:
        raise ValueError(f"unknown classical denoiser {name!r}; choose one of {sorted(CLASSICAL_DENOISERS)}")
    if not np.isfinite(image).all():
        raise ValueError("input contains NaN or infinite values")
    return CLASSICAL_DENOISERS[name](image, modality=modality, progress=progress)
