"""Low-dose CT simulation in the projection (sinogram) domain from a normal-dose image.

Model (Zeng et al. 2015, as in TIGRE / LoDoPaB): HU -> attenuation mu, parallel-beam forward projection to line
integrals p, expected counts ``lambda = I0 exp(-p)``, Poisson photon noise plus Gaussian electronic noise, counts
clipped to >= 1, ``-log`` minus its second-order bias ``(lambda + sigma_e^2) / (2 lambda^2)`` (so the added noise is
zero-mean wherever the counts are not starved), filtered back-projection. Only the reconstructed *noise* is added to
the input:

    low_dose = hu + 1000 / mu_water * FBP(p_noisy - p_clean)

because the FBP of the clean sinogram is not the input grid image (it is blurred by the filter and the
interpolation), while the input already carries the full-dose noise and detail we want to keep.

Choosing the flux of the added noise (the dose-ratio idea of Zeng et al. 2015): post-log variance of a ray is
about ``1 / lambda + sigma_e^2 / lambda^2``.

* ``reference_has_noise=True`` (a real normal-dose scan, which already has the full-dose noise): the noise to add
  is the *difference* between dose-fraction ``d`` and full-dose variance, ``(1/d - 1) / lambda_full + ...``.
  That is exactly the noise of a scan at the effective flux ``I0 * d / (1 - d)``, with the electronic noise
  raised to ``sigma_e * sqrt((1 + d) / (1 - d))`` so that its ``1 / lambda^2`` term also matches the difference.
  ``d = 1`` adds nothing.
* ``reference_has_noise=False`` (a noise-free phantom): the whole low-dose noise is added, flux ``I0 * d`` and
  electronic noise ``sigma_e``.

Because the noise that a given ``I0`` produces depends strongly on the patient size (a larger abdomen needs ~10x the
counts of a thorax for the same noise), ``target_noise_std_hu`` calibrates the flux per slice instead: the standard
deviation of the added noise in soft tissue (eroded mask of reference HU in ``tissue_hu_range``) is measured, the flux
rescaled (noise std ~ flux^-1/2; the exponent is re-estimated from the last two iterations) and the slice
re-simulated with the same noise realisation seed, until within ``calibration_tolerance``. The calibrated flux is an
*effective* flux of this simplified geometry (no bowtie, no tube-current modulation), so the electronic noise std is
scaled with its square root: electronic noise then keeps the share of the variance it has at the nominal dose.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from scipy import ndimage, special

from ._validation import SeedLike
from .projector import RECONSTRUCTION_FILTERS, ParallelBeamGeometry, filtered_back_project, forward_project

__all__ = [
    "MU_WATER_PER_MM",
    "LowDoseCTSettings",
    "LowDoseCTDetails",
    "hu_to_mu",
    "mu_to_hu",
    "soft_tissue_mask",
    "poisson_by_inversion",
    "simulate_low_dose_ct",
    "sample_low_dose_settings",
]

#: Linear attenuation coefficient of water at ~70 keV (effective energy of a 120 kVp spectrum), 1/mm.
MU_WATER_PER_MM: float = 0.0192

def hu_to_mu(hu: np.ndarray | torch.Tensor, mu_water: float = MU_WATER_PER_MM) -> np.ndarray | torch.Tensor:
    """Hounsfield units -> linear attenuation in 1/mm, ``mu_water * (1 + HU / 1000)`` clipped at 0.

    HU below -1000 (air, or padding such as -3024 outside the field of view) become 0: attenuation cannot be
    negative. Works on numpy arrays (float32 out) and torch tensors (dtype kept if floating).
    """
    if isinstance(hu, torch.Tensor):
        hu_t = hu if hu.is_floating_point() else hu.float()
        return torch.clamp(mu_water * (1.0 + hu_t / 1000.0), min=0.0)
    return np.maximum(mu_water * (1.0 + np.asarray(hu, dtype=np.float32) / 1000.0), 0.0).astype(np.float32)


def mu_to_hu(mu: np.ndarray | torch.Tensor, mu_water: float = MU_WATER_PER_MM) -> np.ndarray | torch.Tensor:
    """Linear attenuation in 1/mm -> Hounsfield units, ``1000 * (mu / mu_water - 1)``."""
    if isinstance(mu, torch.Tensor):
        return 1000.0 * (mu / mu_water - 1.0)
    return (1000.0 * (np.asarray(mu, dtype=np.float32) / mu_water - 1.0)).astype(np.float32)


@dataclass(frozen=True)
class LowDoseCTSettings:
    """Parameters of :func:`simulate_low_dose_ct`.

    Attributes:
        dose_fraction: simulated dose relative to the reference scan, in (0, 1].
        full_dose_photons: incident photons per detector bin and view at full dose (I0), typically 1e5 to 1e6.
        electronic_noise_std: standard deviation of the Gaussian electronic noise in counts (at full-dose scale).
        reconstruction_filter: FBP filter of the *added* noise, one of
            :data:`~lib.noise.projector.RECONSTRUCTION_FILTERS`; sets the noise texture.
        filter_cutoff: filter cutoff as a fraction of Nyquist, in (0, 1].
        geometry: parallel-beam geometry (views, detector bins).
        target_noise_std_hu: if set, the flux is calibrated per slice so that the std of the added noise inside
            soft tissue equals this value (HU); ``dose_fraction`` then only sets the starting flux (and the
            electronic noise is scaled with the calibrated flux, see the module docstring).
        reference_has_noise: True when the input is a real (noisy) normal-dose scan: add only the *extra* noise
            of the lower dose (Zeng's dose ratio). False for noise-free phantoms: add the whole low-dose noise.
        tissue_hu_range: HU interval of the reference that counts as soft tissue for calibration.
        mu_water_per_mm: attenuation of water in 1/mm used for HU <-> mu.
        calibration_tolerance: relative tolerance on the calibrated noise std.
        max_calibration_iterations: maximum number of simulations per slice when calibrating (>= 2).
        tube_current_modulation: modulate the flux per view as the square root of that view's attenuation
            (Gies et al. 1999, the angular automatic exposure control of clinical scanners), keeping the mean
            flux over views, hence the dose, unchanged. Without it, a fixed flux starves the lateral rays
            through shoulders, arms or pelvis and the added noise is dominated by horizontal streaks that real
            scans with AEC do not show.
    """

    dose_fraction: float = 0.25
    full_dose_photons: float = 1e6
    electronic_noise_std: float = 10.0
    reconstruction_filter: str = "hann"
    filter_cutoff: float = 1.0
    geometry: ParallelBeamGeometry = field(default_factory=ParallelBeamGeometry)
    target_noise_std_hu: float | None = None
    reference_has_noise: bool = True
    tissue_hu_range: tuple[float, float] = (-100.0, 200.0)
    mu_water_per_mm: float = MU_WATER_PER_MM
    calibration_tolerance: float = 0.03
    max_calibration_iterations: int = 4
    tube_current_modulation: bool = True

    def __post_init__(self) -> None:
        d = float(self.dose_fraction)
        if not (0.0 < d <= 1.0) or not math.isfinite(d):
            raise ValueError(f"dose_fraction must be in (0, 1], got {self.dose_fraction}")
        if not (float(self.full_dose_photons) > 0) or not math.isfinite(float(self.full_dose_photons)):
            raise ValueError(f"full_dose_photons must be > 0, got {self.full_dose_photons}")
        if not (float(self.electronic_noise_std) >= 0) or not math.isfinite(float(self.electronic_noise_std)):
            raise ValueError(f"electronic_noise_std must be >= 0, got {self.electronic_noise_std}")
        name = str(self.reconstruction_filter).lower()
        if name not in RECONSTRUCTION_FILTERS:
            raise ValueError(
                f"unknown reconstruction_filter {self.reconstruction_filter!r}; choose from {RECONSTRUCTION_FILTERS}"
            )
        if not (0.0 < float(self.filter_cutoff) <= 1.0):
            raise ValueError(f"filter_cutoff must be in (0, 1], got {self.filter_cutoff}")
        if not isinstance(self.geometry, ParallelBeamGeometry):
            raise ValueError(f"geometry must be a ParallelBeamGeometry, got {type(self.geometry).__name__}")
        if self.target_noise_std_hu is not None:
            t = float(self.target_noise_std_hu)
            if not (t > 0) or not math.isfinite(t):
                raise ValueError(f"target_noise_std_hu must be > 0 or None, got {self.target_noise_std_hu}")
        lo, hi = (float(v) for v in self.tissue_hu_range)
        if not lo < hi:
            raise ValueError(f"tissue_hu_range must be (low, high) with low < high, got {self.tissue_hu_range}")
        if not (float(self.mu_water_per_mm) > 0):
            raise ValueError(f"mu_water_per_mm must be > 0, got {self.mu_water_per_mm}")
        if not (0 < float(self.calibration_tolerance) < 1):
            raise ValueError(f"calibration_tolerance must be in (0, 1), got {self.calibration_tolerance}")
        if int(self.max_calibration_iterations) < 2:
            raise ValueError(f"max_calibration_iterations must be >= 2, got {self.max_calibration_iterations}")

    @property
    def added_noise_photons(self) -> float:
        """Incident flux (photons per bin) of the simulated *added* noise before calibration; inf if none."""
        d, i0 = float(self.dose_fraction), float(self.full_dose_photons)
        if not self.reference_has_noise:
            return i0 * d
        if d >= 1.0:
            return math.inf
        return i0 * d / (1.0 - d)

    @property
    def added_electronic_noise_std(self) -> float:
        """Electronic noise (counts) of the added-noise simulation, matched to the variance difference."""
        d, sigma = float(self.dose_fraction), float(self.electronic_noise_std)
        if not self.reference_has_noise:
            return sigma
        if d >= 1.0:
            return 0.0
        return sigma * math.sqrt((1.0 + d) / (1.0 - d))


@dataclass
class LowDoseCTDetails:
    """Per-slice record of a simulation (arrays of shape (Z,); Z = 1 for a 2D input).

    Attributes:
        photons: incident flux per detector bin used for the added noise (inf where nothing was added).
        added_noise_std_hu: std of the added noise in the calibration mask (NaN where the mask is empty).
        mask_pixels: number of pixels of the calibration mask (soft tissue, or body as a fallback).
        iterations: number of simulations run for the slice.
    """

    photons: np.ndarray
    added_noise_std_hu: np.ndarray
    mask_pixels: np.ndarray
    iterations: np.ndarray


def soft_tissue_mask(
    hu: np.ndarray,
    hu_range: tuple[float, float] = (-100.0, 200.0),
    *,
    smooth_px: int = 5,
    erode_px: int = 3,
) -> np.ndarray:
    """Mask of uniform-ish soft tissue in a (H, W) HU slice (bool, same shape).

    The slice is box-smoothed over ``smooth_px`` pixels before thresholding so that the reference's own noise does
    not punch holes into the mask, then the mask is eroded by ``erode_px`` pixels to drop partial-volume borders.
    """
    hu = np.asarray(hu, dtype=np.float32)
    if hu.ndim != 2:
        raise ValueError(f"soft_tissue_mask expects a 2D slice, got shape {hu.shape}")
    smooth = ndimage.uniform_filter(hu, size=max(1, int(smooth_px)), mode="nearest") if smooth_px > 1 else hu
    mask = (smooth >= hu_range[0]) & (smooth <= hu_range[1])
    if erode_px > 0:
        mask = ndimage.binary_erosion(mask, iterations=int(erode_px), border_value=0)
    return mask


def _calibration_mask(hu: np.ndarray, hu_range: tuple[float, float], min_pixels: int = 64) -> np.ndarray:
    """Soft-tissue mask, or the body (HU > -500) when a slice has too little soft tissue."""
    mask = soft_tissue_mask(hu, hu_range)
    if mask.sum() < min_pixels:
        mask = soft_tissue_mask(hu, (-500.0, np.inf))
    return mask


def _check_input(hu: np.ndarray, pixel_size_mm: float | Sequence[float]) -> tuple[np.ndarray, tuple[float, float]]:
    arr = np.asarray(hu)
    if arr.ndim not in (2, 3):
        raise ValueError(f"hu must be a 2D (H, W) slice or a 3D (Z, H, W) volume, got shape {arr.shape}")
    if min(arr.shape[-2:]) < 2 or arr.shape[0] < 1:  # one slice of a volume is fine: slices are simulated alone
        raise ValueError(f"hu must have at least 2 pixels along each in-plane axis, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise ValueError(f"hu must be a real numeric array, got dtype {arr.dtype}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("hu contains NaN or infinite values")
    if isinstance(pixel_size_mm, (int, float, np.floating, np.integer)):
        dy = dx = float(pixel_size_mm)
    else:
        values = [float(v) for v in pixel_size_mm]
        if len(values) not in (2, 3):
            raise ValueError(f"pixel_size_mm must be a number, (dy, dx) or (dz, dy, dx); got {pixel_size_mm!r}")
        dy, dx = values[-2], values[-1]
    if not (dy > 0 and dx > 0) or not (math.isfinite(dy) and math.isfinite(dx)):
        raise ValueError(f"pixel size must be finite and > 0 mm, got {pixel_size_mm!r}")
    return arr, (dy, dx)


def _slice_seeds(seed: SeedLike, n: int) -> list[np.random.SeedSequence]:
    """One independent seed sequence per slice, so a slice's noise does not depend on the batching."""
    if isinstance(seed, np.random.SeedSequence):
        root = seed
    elif isinstance(seed, np.random.Generator):
        # Draw the root entropy from the generator: reproducible for a seeded generator, and advances it.
        root = np.random.SeedSequence(int(seed.integers(0, 2**63 - 1)))
    else:
        root = np.random.SeedSequence(seed)
    return root.spawn(n)


# Below this mean count the Poisson quantile is found exactly by summing the pmf; above it a Cornish-Fisher
# expansion of the quantile is accurate to well under one count.
_EXACT_POISSON_BELOW = 40.0


def poisson_by_inversion(expected: np.ndarray, uniform: np.ndarray) -> np.ndarray:
    """Poisson counts as the quantile function of ``Poisson(expected)`` at the given uniforms (float64).

    Inversion (rather than ``Generator.poisson``, whose rejection sampler consumes a variable number of random
    numbers) makes a fixed set of uniforms give a realisation that changes smoothly and monotonically with the
    flux: the flux calibration relies on that. Exact for ``expected < 40`` (sequential search of the CDF); above,
    the third-order Cornish-Fisher quantile ``lam + sqrt(lam) z + (z^2 - 1)/6 + (z - z^3)/(72 sqrt(lam))`` rounded to
    an integer (its mean, variance and skewness match the Poisson's to O(1/lam)).

    Args:
        expected: Poisson means >= 0, any shape.
        uniform: uniforms in [0, 1), same shape.
    """
    lam = np.asarray(expected, dtype=np.float64)
    u = np.asarray(uniform, dtype=np.float64)
    counts = np.empty_like(lam)

    large = lam >= _EXACT_POISSON_BELOW
    if large.any():
        ll = lam[large]
        z = special.ndtri(np.clip(u[large], 1e-12, 1.0 - 1e-12))
        root = np.sqrt(ll)
        q = ll + root * z + (z * z - 1.0) / 6.0 + (z - z**3) / (72.0 * root)
        counts[large] = np.maximum(np.floor(q + 0.5), 0.0)

    small = ~large
    if small.any():
        ls, us = lam[small], u[small]
        k = np.zeros_like(ls)
        pmf = np.exp(-ls)
        cdf = pmf.copy()
        todo = np.nonzero(us >= cdf)[0]
        # Bounded loop: the CDF reaches 1 - 1e-12 well within lam + 12 sqrt(lam) + 30 terms for lam < 40.
        for step in range(1, int(_EXACT_POISSON_BELOW + 12 * math.sqrt(_EXACT_POISSON_BELOW) + 30)):
            if todo.size == 0:
                break
            k[todo] = step
            pmf[todo] *= ls[todo] / step
            cdf[todo] += pmf[todo]
            todo = todo[us[todo] >= cdf[todo]]
        counts[small] = k
    return counts


# Relative count variance up to which the second-order log bias is removed exactly (relative std 0.2: the expansion
# is then within ~10 % of the true bias, measured with and without 10 counts of electronic noise).
_MAX_DEBIASED_RELATIVE_VARIANCE = 0.04


def tube_current_modulation_factors(p_clean: np.ndarray) -> np.ndarray:
    """Relative flux per view, (..., n_views), mean 1: sqrt of the view's attenuation (Gies et al. 1999).

    The attenuation of a view is exp of a high percentile (98th) of its line integrals, i.e. of the rays
    through the thickest part of the body, which set that view's noise.
    """
    thickest = np.percentile(p_clean, 98, axis=-1)
    factors = np.exp(0.5 * (thickest - thickest.max(axis=-1, keepdims=True)))  # sqrt(A), shifted to avoid overflow
    return factors / factors.mean(axis=-1, keepdims=True)


def _noise_sinograms(
    p_clean: np.ndarray,
    photons: np.ndarray,
    electronic_std: np.ndarray,
    seeds: Sequence[np.random.SeedSequence],
    modulate: bool = False,
) -> np.ndarray:
    """Post-log noise ``p_noisy - p_clean`` for each slice, float32 (B, n_views, n_bins).

    A fresh generator per call from the slice's seed sequence, and Poisson draws by inversion of its uniforms: the
    same seed gives the same noise realisation at any flux (only its amplitude changes), which the calibration
    relies on.
    """
    out = np.empty(p_clean.shape, dtype=np.float32)
    for k in range(p_clean.shape[0]):
        rng = np.random.default_rng(seeds[k])
        uniform = rng.random(p_clean[k].shape)
        gaussian = rng.standard_normal(p_clean[k].shape)
        flux = float(photons[k])
        if modulate:
            flux = flux * tube_current_modulation_factors(p_clean[k].astype(np.float64))[:, None]
        expected = flux * np.exp(-p_clean[k].astype(np.float64))
        counts = poisson_by_inversion(expected, uniform)
        if electronic_std[k] > 0:
            counts += float(electronic_std[k]) * gaussian
        # Clip to >= 1 count before the log (photon starvation); -log(counts / I0) - p = -log(counts / expected).
        # Where the expected count itself is below 1 the clean value is also starved: compare with the clipped one.
        delta = -np.log(np.maximum(counts, 1.0) / np.maximum(expected, 1.0))
        # -log of a noisy count is biased upwards by about half its relative variance, (lam + sigma_e^2) / (2 lam^2)
        # (second-order Taylor term): uncorrected, the added noise is not zero-mean but brightens the centre of a
        # large body (+6 HU at 60 HU of soft-tissue noise in a 38 x 28 cm pelvis) and a denoiser learns to darken
        # it. Removed where the expansion holds (relative count std <= 0.2); starved rays keep the capped term.
        relative_var = (np.maximum(expected, 1.0) + float(electronic_std[k]) ** 2) / np.maximum(expected, 1.0) ** 2
        out[k] = delta - 0.5 * np.minimum(relative_var, _MAX_DEBIASED_RELATIVE_VARIANCE)
    return out


def _added_noise_hu(
    p_clean: np.ndarray,
    photons: np.ndarray,
    settings: LowDoseCTSettings,
    electronic_std: np.ndarray,
    seeds: Sequence[np.random.SeedSequence],
    pixel_size: tuple[float, float],
    image_shape: tuple[int, int],
    device: torch.device,
    memory_budget_bytes: int | None = None,
) -> np.ndarray:
    """FBP of the post-log noise in HU, float32 (B, H, W)."""
    delta = _noise_sinograms(p_clean, photons, electronic_std, seeds, modulate=settings.tube_current_modulation)
    recon = filtered_back_project(
        torch.from_numpy(delta).to(device),
        pixel_size,
        settings.geometry,
        settings.reconstruction_filter,
        settings.filter_cutoff,
        image_shape=image_shape,
        memory_budget_bytes=memory_budget_bytes,
    )
    return (recon * (1000.0 / settings.mu_water_per_mm)).cpu().numpy().astype(np.float32)


def _masked_std(values: np.ndarray, mask: np.ndarray) -> float:
    return float(values[mask].std()) if mask.any() else float("nan")


def simulate_low_dose_ct(
    hu: np.ndarray,
    pixel_size_mm: float | Sequence[float],
    settings: LowDoseCTSettings = LowDoseCTSettings(),
    seed: SeedLike = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
    *,
    batch_size: int = 8,
    return_details: bool = False,
    memory_budget_bytes: int | None = None,
) -> np.ndarray | tuple[np.ndarray, LowDoseCTDetails]:
    """Simulate a low-dose CT image from a normal-dose one by adding projection-domain noise.

    ``low_dose = hu + 1000 / mu_water * FBP(p_noisy - p_clean)``; see the module docstring for the physics and
    for how the flux of the *added* noise follows from ``dose_fraction`` (Zeng's dose ratio: effective flux
    ``I0 d / (1 - d)`` when ``settings.reference_has_noise``, else ``I0 d``) or, with
    ``settings.target_noise_std_hu``, from a per-slice calibration to that soft-tissue noise std.

    Args:
        hu: normal-dose CT in HU, shape (H, W) or (Z, H, W) (slices are simulated independently).
        pixel_size_mm: in-plane pixel size in mm: a number, (dy, dx), or (dz, dy, dx) (dz ignored).
        settings: simulation parameters.
        seed: int, ``np.random.SeedSequence``, ``np.random.Generator`` or None. Each slice gets its own child
            seed, so the result is reproducible for a given seed and independent of ``batch_size`` and ``device``
            (up to float rounding of the reconstruction).
        device: torch device for projection and reconstruction ("cpu", "cuda", ...).
        progress: show a tqdm progress bar over slices.
        batch_size: slices projected and reconstructed together.
        return_details: also return a :class:`LowDoseCTDetails` (per-slice flux, noise std, ...).
        memory_budget_bytes: per-chunk memory bound of the projector (default 256 MiB; raise it on a GPU).

    Calibration (``settings.target_noise_std_hu``) measures the added noise in the eroded soft-tissue mask of each
    reference slice (:func:`soft_tissue_mask` with ``settings.tissue_hu_range``), or in the body (HU > -500) when a
    slice has fewer than 64 soft-tissue pixels; a slice with neither (only air) keeps the dose-based flux.

    Returns:
        Low-dose image in HU, float32, same shape as ``hu`` (not clipped: air keeps its zero-mean noise);
        with ``return_details`` a tuple (image, details).

    Raises:
        ValueError: wrong dimensionality, NaN/inf values, non-positive pixel size, or invalid settings.
    """
    arr, pixel_size = _check_input(hu, pixel_size_mm)
    if not isinstance(settings, LowDoseCTSettings):
        raise ValueError(f"settings must be a LowDoseCTSettings, got {type(settings).__name__}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device)
    volume = np.ascontiguousarray(arr, dtype=np.float32)
    squeeze = volume.ndim == 2
    if squeeze:
        volume = volume[None]
    n_slices, h, w = volume.shape
    seeds = _slice_seeds(seed, n_slices)

    calibrate = settings.target_noise_std_hu is not None
    photons0 = settings.added_noise_photons
    electronic_std = settings.added_electronic_noise_std
    if calibrate and not math.isfinite(photons0):
        # Dose 1 of a noisy reference adds nothing by itself; the target still asks for noise: start at I0.
        photons0 = float(settings.full_dose_photons)
        electronic_std = float(settings.electronic_noise_std)

    out = volume.copy()
    details = LowDoseCTDetails(
        photons=np.full(n_slices, photons0, dtype=np.float64),
        added_noise_std_hu=np.full(n_slices, np.nan),
        mask_pixels=np.zeros(n_slices, dtype=np.int64),
        iterations=np.zeros(n_slices, dtype=np.int64),
    )
    if not math.isfinite(photons0):  # reference_has_noise and dose 1: nothing to add
        result = out[0] if squeeze else out
        return (result, details) if return_details else result

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_slices, desc="low-dose CT", unit="slice")
    try:
        for start in range(0, n_slices, int(batch_size)):
            stop = min(n_slices, start + int(batch_size))
            ref = volume[start:stop]
            mu = hu_to_mu(torch.tensor(ref, device=device), settings.mu_water_per_mm)  # a copy: input may be read-only
            p_clean = forward_project(
                mu, pixel_size, settings.geometry, memory_budget_bytes=memory_budget_bytes
            ).cpu().numpy()
            masks = [_calibration_mask(ref[k], settings.tissue_hu_range) for k in range(stop - start)]
            details.mask_pixels[start:stop] = [int(m.sum()) for m in masks]
            noise, photons, stds, iters = _simulate_batch(
                p_clean, ref.shape[1:], masks, photons0, electronic_std, settings,
                seeds[start:stop], pixel_size, device, calibrate, memory_budget_bytes,
            )
            out[start:stop] = ref + noise
            details.photons[start:stop] = photons
            details.added_noise_std_hu[start:stop] = stds
            details.iterations[start:stop] = iters
            if bar is not None:
                bar.update(stop - start)
    finally:
        if bar is not None:
            bar.close()
    result = out[0] if squeeze else out
    return (result, details) if return_details else result


def _simulate_batch(
    p_clean: np.ndarray,
    image_shape: tuple[int, int],
    masks: list[np.ndarray],
    photons0: float,
    electronic_std: float,
    settings: LowDoseCTSettings,
    seeds: Sequence[np.random.SeedSequence],
    pixel_size: tuple[float, float],
    device: torch.device,
    calibrate: bool,
    memory_budget_bytes: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Added noise (B, H, W) in HU plus per-slice flux, measured std and number of simulations."""
    b = p_clean.shape[0]
    photons = np.full(b, photons0, dtype=np.float64)

    def sim(idx: np.ndarray, ph: np.ndarray) -> np.ndarray:
        # In calibration the flux is an effective one (it absorbs what this simple geometry lacks: bowtie, tube
        # current modulation, detector size), so the electronic noise follows it: with sigma_e ~ sqrt(flux) the
        # post-log variance 1/lambda + sigma_e^2/lambda^2 scales as 1/flux in both terms, i.e. the electronic
        # noise keeps its nominal share and the noise std stays ~ flux^-1/2 (the calibration's model) instead of
        # electronic noise swamping a few counts at low flux.
        electronic = electronic_std * (np.sqrt(ph / photons0) if calibrate else 1.0)
        return _added_noise_hu(
            p_clean[idx], ph, settings, np.broadcast_to(electronic, ph.shape), [seeds[i] for i in idx],
            pixel_size, tuple(image_shape), device, memory_budget_bytes,
        )

    all_idx = np.arange(b)
    noise = sim(all_idx, photons)
    stds = np.array([_masked_std(noise[k], masks[k]) for k in range(b)])
    iters = np.ones(b, dtype=np.int64)
    if not calibrate:
        return noise, photons, stds, iters

    target = float(settings.target_noise_std_hu)
    tol = float(settings.calibration_tolerance)
    # Slices without any usable mask (e.g. only air) cannot be calibrated and keep the dose-based flux.
    active = np.array([np.isfinite(s) and s > 0 for s in stds])
    exponent = np.full(b, 0.5)  # noise std ~ flux^-exponent (0.5 for pure Poisson noise)
    for _ in range(int(settings.max_calibration_iterations) - 1):
        todo = np.nonzero(active & (np.abs(stds / target - 1.0) > tol))[0]
        if todo.size == 0:
            break
        new_photons = photons.copy()
        for k in todo:
            new_photons[k] = photons[k] * (stds[k] / target) ** (1.0 / exponent[k])
        trial = sim(todo, new_photons[todo])
        for j, k in enumerate(todo):
            s_new = _masked_std(trial[j], masks[k])
            # Re-estimate the local power law from the last two points (photon starvation at very low flux bends
            # it away from 1/2). Clamp to keep the update stable.
            if s_new > 0 and new_photons[k] != photons[k] and stds[k] > 0:
                slope = math.log(stds[k] / s_new) / math.log(new_photons[k] / photons[k])
                exponent[k] = float(np.clip(slope, 0.3, 1.5))
            photons[k], stds[k] = new_photons[k], s_new
            noise[k] = trial[j]
            iters[k] += 1
    return noise, photons, stds, iters


def quarter_dose_settings(
    target_noise_std_hu: float = 30.0, full_dose_photons: float = 1.5e6
) -> LowDoseCTSettings:
    """The fixed quarter-dose protocol of the benchmark and of CT validation during training.

    Dose fraction 0.25, Shepp-Logan-apodised FBP of the added noise (the filter whose noise texture is closest
    to real quarter-dose scans), electronic noise 10 counts, angular tube-current modulation, and the flux
    calibrated per slice so that the added noise has ``target_noise_std_hu`` (HU) in soft tissue; 30 HU lies
    inside the 22-65 HU (quarter minus full dose, soft tissue) that real quarter-dose abdominal scans show.
    ``full_dose_photons`` is only the calibration's starting flux.
    """
    return LowDoseCTSettings(dose_fraction=0.25, full_dose_photons=full_dose_photons, electronic_noise_std=10.0,
                             reconstruction_filter="shepp-logan", target_noise_std_hu=target_noise_std_hu,
                             tube_current_modulation=True)


def sample_low_dose_settings(
    rng: SeedLike = None,
    dose_range: tuple[float, float] = (0.05, 0.5),
    filters: Sequence[str] = RECONSTRUCTION_FILTERS,
    cutoff_range: tuple[float, float] = (0.5, 1.0),
    noise_std_range_hu: tuple[float, float] | None = None,
    *,
    full_dose_photons_range: tuple[float, float] = (2e5, 2e6),
    electronic_noise_range: tuple[float, float] = (5.0, 15.0),
    n_views_range: tuple[int, int] = (360, 1080),
    pixel_size_mm: float | None = None,
    bin_to_pixel_range: tuple[float, float] = (0.75, 1.5),
    reference_has_noise: bool = True,
    tissue_hu_range: tuple[float, float] = (-100.0, 200.0),
) -> LowDoseCTSettings:
    """Random :class:`LowDoseCTSettings` for training-time augmentation.

    Wide ranges on purpose: a denoiser trained on one dose, one sharp filter and one grid learns that texture only
    and transfers poorly to real low-dose scans, whose noise is usually coarser (smooth clinical kernels, other
    pixel sizes). Dose fraction, full-dose flux and (if given) the target
    noise std are drawn log-uniformly (they act multiplicatively on the noise variance); the filter uniformly from
    ``filters``; cutoff, electronic noise and the detector-bin/pixel ratio uniformly; the view count uniformly
    among integers.

    Args:
        rng: seed or generator.
        dose_range: (min, max) dose fraction, within (0, 1].
        filters: reconstruction filters to choose from.
        cutoff_range: (min, max) filter cutoff as a fraction of Nyquist, within (0, 1].
        noise_std_range_hu: if given, (min, max) of ``target_noise_std_hu`` (calibrated mode), e.g. (10, 60).
        full_dose_photons_range: (min, max) full-dose photons per bin.
        electronic_noise_range: (min, max) electronic noise std in counts.
        n_views_range: (min, max) number of views over 180 degrees, inclusive.
        pixel_size_mm: pixel size of the images to be simulated; when given, the detector bin width is drawn as
            ``pixel_size_mm * U(bin_to_pixel_range)``, otherwise it stays None (= pixel size).
        bin_to_pixel_range: (min, max) ratio of detector bin width to pixel size.
        reference_has_noise: passed through (True for real normal-dose scans).
        tissue_hu_range: passed through.
    """
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)

    def _range(r: tuple[float, float], name: str, low: float = -math.inf, high: float = math.inf) -> tuple[float, float]:
        a, b = float(r[0]), float(r[1])
        if not (low <= a <= b <= high):
            raise ValueError(f"{name} must be (min, max) with {low} <= min <= max <= {high}, got {r}")
        return a, b

    def _log_uniform(r: tuple[float, float]) -> float:
        return float(math.exp(gen.uniform(math.log(r[0]), math.log(r[1])))) if r[0] < r[1] else float(r[0])

    dose = _range(dose_range, "dose_range", 1e-6, 1.0)
    if dose[0] <= 0:
        raise ValueError(f"dose_range must be within (0, 1], got {dose_range}")
    cutoff = _range(cutoff_range, "cutoff_range", 1e-6, 1.0)
    photons = _range(full_dose_photons_range, "full_dose_photons_range", 1e-9)
    electronic = _range(electronic_noise_range, "electronic_noise_range", 0.0)
    views = _range(n_views_range, "n_views_range", 1)
    ratio = _range(bin_to_pixel_range, "bin_to_pixel_range", 1e-6)
    filters = tuple(filters)
    if not filters:
        raise ValueError("filters must not be empty")
    for name in filters:
        if name not in RECONSTRUCTION_FILTERS:
            raise ValueError(f"unknown filter {name!r}; choose from {RECONSTRUCTION_FILTERS}")

    target = None
    if noise_std_range_hu is not None:
        target = _log_uniform(_range(noise_std_range_hu, "noise_std_range_hu", 1e-9))
    bin_mm = None
    if pixel_size_mm is not None:
        if not float(pixel_size_mm) > 0:
            raise ValueError(f"pixel_size_mm must be > 0, got {pixel_size_mm}")
        bin_mm = float(pixel_size_mm) * float(gen.uniform(*ratio))
    geometry = ParallelBeamGeometry(
        n_views=int(gen.integers(int(views[0]), int(views[1]) + 1)), detector_bin_mm=bin_mm
    )
    return LowDoseCTSettings(
        dose_fraction=_log_uniform(dose),
        full_dose_photons=_log_uniform(photons),
        electronic_noise_std=float(gen.uniform(*electronic)),
        reconstruction_filter=str(filters[int(gen.integers(len(filters)))]),
        filter_cutoff=float(gen.uniform(*cutoff)),
        geometry=geometry,
        target_noise_std_hu=target,
        reference_has_noise=reference_has_noise,
        tissue_hu_range=tuple(tissue_hu_range),
    )

