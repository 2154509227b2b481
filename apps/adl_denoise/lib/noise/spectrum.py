"""Noise power spectrum (NPS) and noise statistics: the texture of noise, not just its magnitude.

Standard 2D NPS (ICRU 87, AAPM TG-233): for zero-mean noise ROIs ``n`` of ``Ny x Nx`` pixels of size ``dy x dx``,
``NPS(fy, fx) = dx dy / (Nx Ny) |FFT2(n)|^2`` averaged over ROIs, in HU^2 mm^2 for HU noise. Its integral over the
frequency plane is the pixel variance (Parseval). The 1D radial NPS averages it over annuli of radial frequency;
its NPS-weighted mean frequency ``f_av = sum f NPS(f) / sum NPS(f)`` summarises the texture (CT noise from a sharp
kernel: high ``f_av``; smooth kernel: low).
"""
from __future__ import annotations

from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from scipy import ndimage

from ._validation import SeedLike, as_rng, check_image

__all__ = [
    "NoisePowerSpectrum",
    "radial_noise_power_spectrum",
    "noise_std_by_band",
    "extract_noise_rois",
    "plot_noise_power_spectra",
    "DEFAULT_HU_BANDS",
]

#: HU bands of the reference for :func:`noise_std_by_band`: lung/air, fat, soft tissue, bone.
DEFAULT_HU_BANDS: tuple[tuple[float, float], ...] = ((-1000, -500), (-500, -100), (-100, 200), (200, 3000))


@dataclass
class NoisePowerSpectrum:
    """Radially averaged noise power spectrum.

    Attributes:
        frequencies: radial bin centres in cycles/mm, shape (K,) (bins without any frequency sample dropped).
        nps: radial NPS in (image unit)^2 mm^2 (HU^2 mm^2 for CT), shape (K,).
        mean_frequency: NPS-weighted mean radial frequency of the 1D radial NPS, cycles/mm.
        peak_frequency: frequency of the radial NPS maximum, cycles/mm.
        variance: integral of the 2D NPS over the whole frequency plane = mean noise variance (unit^2).
        pixel_size_mm: (dy, dx) in mm.
        n_rois: number of ROIs averaged.
        nps_2d: the 2D NPS, zero frequency centred (fftshift), shape (Ny, Nx).
    """

    frequencies: np.ndarray
    nps: np.ndarray
    mean_frequency: float
    peak_frequency: float
    variance: float
    pixel_size_mm: tuple[float, float]
    n_rois: int
    nps_2d: np.ndarray

    @property
    def nyquist(self) -> float:
        """Radial Nyquist frequency used for the binning, cycles/mm."""
        return 0.5 / max(self.pixel_size_mm)

    def mean_frequency_cycles_per_pixel(self) -> float:
        """``mean_frequency`` in cycles/pixel (for comparing grids of different pixel size, square pixels)."""
        return self.mean_frequency * max(self.pixel_size_mm)


def _pixel_size(pixel_size_mm: float | Sequence[float]) -> tuple[float, float]:
    if np.isscalar(pixel_size_mm):
        dy = dx = float(pixel_size_mm)  # type: ignore[arg-type]
    else:
        values = [float(v) for v in pixel_size_mm]  # type: ignore[union-attr]
        if len(values) not in (2, 3):
            raise ValueError(f"pixel_size_mm must be a number or (dy, dx); got {pixel_size_mm!r}")
        dy, dx = values[-2], values[-1]
    if not (dy > 0 and dx > 0 and np.isfinite(dy) and np.isfinite(dx)):
        raise ValueError(f"pixel size must be finite and > 0 mm, got {pixel_size_mm!r}")
    return dy, dx


def _detrend(rois: np.ndarray, plane: bool) -> np.ndarray:
    """Remove each ROI's mean, or its least-squares plane a + b y + c x (slow trends are not noise)."""
    n, ny, nx = rois.shape
    if not plane:
        return rois - rois.mean(axis=(1, 2), keepdims=True)
    yy, xx = np.mgrid[0:ny, 0:nx]
    basis = np.stack([np.ones(ny * nx), yy.ravel() - (ny - 1) / 2, xx.ravel() - (nx - 1) / 2], axis=1)
    coef, *_ = np.linalg.lstsq(basis, rois.reshape(n, -1).T, rcond=None)  # (3, n)
    return rois - (basis @ coef).T.reshape(n, ny, nx)


def radial_noise_power_spectrum(
    noise: np.ndarray,
    pixel_size_mm: float | Sequence[float],
    n_bins: int = 64,
    detrend: bool = True,
) -> NoisePowerSpectrum:
    """Noise power spectrum of noise images or ROIs, radially averaged.

    Args:
        noise: noise realisation(s) (e.g. noisy - reference, or a flat-region ROI), shape (H, W) or (N, H, W);
            all ROIs of one call have the same size.
        pixel_size_mm: pixel size in mm, a number or (dy, dx).
        n_bins: number of radial bins between 0 and the Nyquist frequency ``0.5 / max(dy, dx)``.
        detrend: remove a least-squares plane from each ROI (True) or only its mean (False).

    Returns:
        :class:`NoisePowerSpectrum` (frequencies in cycles/mm, NPS in unit^2 mm^2).
    """
    arr = check_image(noise, "noise").astype(np.float64)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or min(arr.shape[1:]) < 4:
        raise ValueError(f"noise must be (H, W) or (N, H, W) with H, W >= 4, got shape {np.shape(noise)}")
    if int(n_bins) < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    dy, dx = _pixel_size(pixel_size_mm)
    n, ny, nx = arr.shape
    rois = _detrend(arr, bool(detrend))
    power = np.abs(np.fft.fft2(rois)) ** 2
    nps_2d = power.mean(axis=0) * (dx * dy) / (nx * ny)
    variance = float(nps_2d.sum() / (nx * dx * ny * dy))  # integral over the plane, df = 1 / (N d)

    fy = np.fft.fftfreq(ny, d=dy)
    fx = np.fft.fftfreq(nx, d=dx)
    fr = np.hypot(fy[:, None], fx[None, :])
    f_max = 0.5 / max(dy, dx)
    edges = np.linspace(0.0, f_max, int(n_bins) + 1)
    # Frequencies beyond the radial Nyquist (the corners of the square spectrum) are left out of the radial NPS.
    which = np.digitize(fr.ravel(), edges) - 1
    inside = (which >= 0) & (which < int(n_bins)) & (fr.ravel() <= f_max)
    counts = np.bincount(which[inside], minlength=int(n_bins))
    sums = np.bincount(which[inside], weights=nps_2d.ravel()[inside], minlength=int(n_bins))
    fsum = np.bincount(which[inside], weights=fr.ravel()[inside], minlength=int(n_bins))
    keep = counts > 0
    freqs = fsum[keep] / counts[keep]  # mean radial frequency of the samples in each bin
    radial = sums[keep] / counts[keep]
    total = radial.sum()
    mean_f = float((freqs * radial).sum() / total) if total > 0 else float("nan")
    peak_f = float(freqs[int(np.argmax(radial))]) if radial.size else float("nan")
    return NoisePowerSpectrum(
        frequencies=freqs,
        nps=radial,
        mean_frequency=mean_f,
        peak_frequency=peak_f,
        variance=variance,
        pixel_size_mm=(dy, dx),
        n_rois=n,
        nps_2d=np.fft.fftshift(nps_2d),
    )


def noise_std_by_band(
    noise: np.ndarray,
    reference: np.ndarray,
    bands: Sequence[tuple[float, float]] = DEFAULT_HU_BANDS,
) -> dict[tuple[float, float], float]:
    """Standard deviation of ``noise`` where ``reference`` lies in each band ``[low, high)``.

    Args:
        noise: noise image (e.g. low dose - normal dose), any shape.
        reference: reference image of the same shape (HU) that defines the bands.
        bands: (low, high) intervals of the reference.

    Returns:
        {band: std}; NaN for bands with fewer than 2 pixels.
    """
    n = check_image(noise, "noise")
    ref = check_image(reference, "reference")
    if n.shape != ref.shape:
        raise ValueError(f"noise and reference shapes differ: {n.shape} vs {ref.shape}")
    out: dict[tuple[float, float], float] = {}
    for low, high in bands:
        sel = (ref >= low) & (ref < high)
        out[(float(low), float(high))] = float(n[sel].astype(np.float64).std()) if sel.sum() >= 2 else float("nan")
    return out


def extract_noise_rois(
    noisy: np.ndarray,
    reference: np.ndarray,
    roi_size: int,
    n: int,
    *,
    hu_range: tuple[float, float] = (-100.0, 200.0),
    seed: SeedLike = 0,
    smooth_px: int = 5,
) -> np.ndarray:
    """Square ROIs of the noise ``noisy - reference`` lying entirely in a uniform-ish region of the reference.

    A pixel is eligible when the box-smoothed reference is inside ``hu_range``; an ROI position is eligible when
    all its pixels are. Up to ``n`` distinct positions are drawn at random (seeded).

    Args:
        noisy, reference: images of the same shape, (H, W) or (Z, H, W).
        roi_size: ROI side in pixels.
        n: maximum number of ROIs.

    Returns:
        float32 array (M, roi_size, roi_size), M <= n (M = 0 if no position fits).
    """
    a = check_image(noisy, "noisy")
    ref = check_image(reference, "reference")
    if a.shape != ref.shape:
        raise ValueError(f"noisy and reference shapes differ: {a.shape} vs {ref.shape}")
    if a.ndim == 2:
        a, ref = a[None], ref[None]
    if a.ndim != 3:
        raise ValueError(f"expected (H, W) or (Z, H, W), got shape {np.shape(noisy)}")
    r = int(roi_size)
    if r < 4 or r > min(a.shape[1:]):
        raise ValueError(f"roi_size must be in [4, {min(a.shape[1:])}], got {roi_size}")
    noise = a - ref
    candidates: list[tuple[int, int, int]] = []
    for z in range(a.shape[0]):
        smooth = ndimage.uniform_filter(ref[z], size=max(1, int(smooth_px)), mode="nearest")
        ok = (smooth >= hu_range[0]) & (smooth <= hu_range[1])
        # Top-left corners whose r x r window is entirely eligible, from a summed-area table.
        sat = np.pad(ok.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
        window = sat[r:, r:] - sat[:-r, r:] - sat[r:, :-r] + sat[:-r, :-r]
        ys, xs = np.nonzero(window == r * r)
        candidates.extend((z, int(y), int(x)) for y, x in zip(ys, xs))
    if not candidates:
        return np.zeros((0, r, r), dtype=np.float32)
    rng = as_rng(seed)
    pick = rng.choice(len(candidates), size=min(int(n), len(candidates)), replace=False)
    return np.stack([noise[z, y : y + r, x : x + r] for z, y, x in (candidates[i] for i in pick)]).astype(np.float32)


def plot_noise_power_spectra(
    spectra: Mapping[str, NoisePowerSpectrum],
    path: str | PathLike[str],
    *,
    title: str | None = None,
    normalize: bool = False,
) -> Path:
    """Plot radial NPS curves (one per entry, mean frequency in the legend) to a PNG file.

    Args:
        spectra: {label: spectrum}.
        path: output PNG path (parent folders are created).
        title: optional figure title.
        normalize: divide each curve by its area so textures of different magnitude compare.

    Returns:
        The written path.
    """
    # A bare Figure renders with the Agg canvas and touches no pyplot/global backend state (safe in servers).
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4.5), dpi=110)
    ax = fig.add_subplot(1, 1, 1)
    for label, spec in spectra.items():
        y = spec.nps
        if normalize:
            trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy 2 renamed trapz
            area = trapezoid(y, spec.frequencies) if y.size > 1 else y.sum()
            y = y / area if area > 0 else y
        ax.plot(spec.frequencies, y, label=f"{label} (f_av {spec.mean_frequency:.3f} /mm)")
    ax.set_xlabel("spatial frequency (cycles/mm)")
    ax.set_ylabel("NPS (normalised)" if normalize else "NPS (HU$^2$ mm$^2$)")
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out
