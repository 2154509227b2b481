"""Judging a noise model: noise std by HU band and noise power spectrum (NPS), generated against real noise.

* :func:`patch_statistics` - statistics of a set of noise patches with their conditions (what the noise model
  stores about its training noise and about its own samples).
* :func:`compare_noise` - generated noise fields against real noise fields on the same reference image: std per
  HU band of the reference (:func:`lib.noise.noise_std_by_band`) and radial NPS in uniform ROIs of each band
  (:func:`lib.noise.extract_noise_rois`, the same ROI positions for both,
  :func:`lib.noise.radial_noise_power_spectrum`), with relative errors ``generated / real - 1``.
* :func:`plot_noise_comparison` - a PNG with the NPS curves (generated dashed, real solid) and the std per band.
"""
from __future__ import annotations

from os import PathLike
from pathlib import Path
from typing import Sequence

import numpy as np

from ..noise import extract_noise_rois, noise_std_by_band, radial_noise_power_spectrum

__all__ = ["NOISE_BANDS", "band_label", "patch_statistics", "compare_noise", "plot_noise_comparison"]

#: HU bands of the reference (or of the condition) used to report noise: air, lung, fat, soft tissue, bone.
NOISE_BANDS: tuple[tuple[float, float], ...] = (
    (-1100.0, -900.0), (-900.0, -500.0), (-500.0, -100.0), (-100.0, 200.0), (200.0, 3000.0))
BAND_NAMES = {(-1100.0, -900.0): "air", (-900.0, -500.0): "lung", (-500.0, -100.0): "fat",
              (-100.0, 200.0): "soft tissue", (200.0, 3000.0): "bone"}


def band_label(band: tuple[float, float]) -> str:
    """``"-100..200 HU (soft tissue)"``-style label of a band."""
    lo, hi = float(band[0]), float(band[1])
    name = BAND_NAMES.get((lo, hi))
    return f"{lo:g}..{hi:g} HU" + (f" ({name})" if name else "")


def _nps_dict(spec, pixel: tuple[float, float] | None) -> dict:
    px = max(pixel) if pixel is not None else 1.0
    return {"frequencies": spec.frequencies.tolist(), "nps": spec.nps.tolist(), "mean_frequency": spec.mean_frequency,
            "mean_frequency_cycles_per_pixel": spec.mean_frequency * px, "peak_frequency": spec.peak_frequency,
            "variance": spec.variance, "n_rois": spec.n_rois, "units": "cycles/mm" if pixel is not None else
            "cycles/pixel"}


def _rel(a: float, b: float) -> float:
    return float(a / b - 1.0) if np.isfinite(a) and np.isfinite(b) and b > 0 else float("nan")


def patch_statistics(
    patches: np.ndarray,
    condition_hu: np.ndarray,
    pixel_size_mm: tuple[float, float] | None = None,
    bands: Sequence[tuple[float, float]] = NOISE_BANDS,
    min_count: int = 5,
) -> dict:
    """Statistics of zero-mean noise patches (N, P, P) HU with conditions (N,) HU.

    Returns a plain dict: ``noise_std_hu`` (pooled RMS), ``std_by_band`` ({label: {"band", "std_hu", "count"}},
    bands with fewer than ``min_count`` patches have NaN), ``std_curve`` (``condition_hu``, ``std_hu``, ``count``
    over quantile bins of the condition: std against local intensity) and ``nps`` (radial NPS of all patches, mean
    removed only; frequencies in cycles/mm if ``pixel_size_mm`` is given, else cycles/pixel).
    """
    x = np.asarray(patches, dtype=np.float64)
    c = np.asarray(condition_hu, dtype=np.float64).reshape(-1)
    if x.ndim != 3 or x.shape[0] != c.shape[0] or x.shape[0] == 0:
        raise ValueError(f"need patches (N, P, P) and conditions (N,), got {x.shape} and {c.shape}")
    power = (x ** 2).mean(axis=(1, 2))  # per-patch variance (zero-mean patches)
    out: dict = {"noise_std_hu": float(np.sqrt(power.mean())), "n_patches": int(x.shape[0])}
    by_band = {}
    for lo, hi in bands:
        sel = (c >= lo) & (c < hi)
        n = int(sel.sum())
        std = float(np.sqrt(power[sel].mean())) if n >= min_count else float("nan")
        by_band[band_label((lo, hi))] = {"band": [float(lo), float(hi)], "count": n, "std_hu": std}
    out["std_by_band"] = by_band
    n_bins = int(np.clip(x.shape[0] // 40, 1, 24))
    edges = np.unique(np.quantile(c, np.linspace(0, 1, n_bins + 1)))
    which = np.clip(np.searchsorted(edges, c, side="right") - 1, 0, max(len(edges) - 2, 0))
    centres, stds, counts = [], [], []
    for k in range(max(len(edges) - 1, 1)):
        sel = which == k
        if sel.sum() >= 1:
            centres.append(float(np.median(c[sel])))
            stds.append(float(np.sqrt(power[sel].mean())))
            counts.append(int(sel.sum()))
    out["std_curve"] = {"condition_hu": centres, "std_hu": stds, "count": counts}
    spec = radial_noise_power_spectrum(x, pixel_size_mm if pixel_size_mm is not None else 1.0, detrend=False)
    out["nps"] = _nps_dict(spec, pixel_size_mm)
    return out


def compare_noise(
    generated: np.ndarray,
    real: np.ndarray,
    reference_hu: np.ndarray,
    pixel_size_mm: float | Sequence[float],
    *,
    bands: Sequence[tuple[float, float]] = NOISE_BANDS,
    roi_size: int = 32,
    n_rois: int = 300,
    min_rois: int = 10,
    seed: int = 0,
) -> dict:
    """Generated against real noise on the same reference image.

    Args:
        generated: synthesised noise in HU, same shape as ``reference_hu``.
        real: real noise (e.g. low dose - normal dose), same shape.
        reference_hu: the normal-dose image, (H, W) or (Z, H, W), that defines the HU bands and uniform ROIs.
        pixel_size_mm: in-plane pixel size (number or (dy, dx)).
        bands: HU bands of the reference.
        roi_size: side of the NPS ROIs (pixels).
        n_rois: at most this many ROIs per band (same positions for generated and real).
        min_rois: a band's NPS is reported only with at least this many ROIs.
        seed: ROI placement seed.

    Returns:
        Plain dict: ``std_by_band`` ({label: {"band", "generated", "real", "relative_error", "pixels"}}), ``nps``
        ({label: {"generated": nps dict, "real": nps dict, "n_rois", "mean_frequency_relative_error",
        "variance_relative_error"}}), ``summary`` (largest absolute std error over bands, soft-tissue errors),
        ``pixel_size_mm``.
    """
    gen = np.asarray(generated, dtype=np.float32)
    rea = np.asarray(real, dtype=np.float32)
    ref = np.asarray(reference_hu, dtype=np.float32)
    if gen.shape != ref.shape or rea.shape != ref.shape:
        raise ValueError(f"generated {gen.shape}, real {rea.shape} and reference {ref.shape} must have one shape")
    pixel = (float(pixel_size_mm),) * 2 if np.isscalar(pixel_size_mm) else tuple(float(v) for v in pixel_size_mm)[-2:]
    std_gen = noise_std_by_band(gen, ref, bands)
    std_real = noise_std_by_band(rea, ref, bands)
    result: dict = {"pixel_size_mm": list(pixel), "std_by_band": {}, "nps": {}}
    for band in bands:
        key = (float(band[0]), float(band[1]))
        pixels = int(np.count_nonzero((ref >= key[0]) & (ref < key[1])))
        result["std_by_band"][band_label(key)] = {
            "band": list(key), "generated": std_gen[key], "real": std_real[key],
            "relative_error": _rel(std_gen[key], std_real[key]), "pixels": pixels}
        rois_real = extract_noise_rois(ref + rea, ref, roi_size, n_rois, hu_range=key, seed=seed)
        if rois_real.shape[0] < min_rois:
            continue
        rois_gen = extract_noise_rois(ref + gen, ref, roi_size, n_rois, hu_range=key, seed=seed)
        nps_g = radial_noise_power_spectrum(rois_gen, pixel)
        nps_r = radial_noise_power_spectrum(rois_real, pixel)
        result["nps"][band_label(key)] = {
            "band": list(key), "n_rois": int(rois_real.shape[0]), "generated": _nps_dict(nps_g, pixel),
            "real": _nps_dict(nps_r, pixel),
            "mean_frequency_relative_error": _rel(nps_g.mean_frequency, nps_r.mean_frequency),
            "variance_relative_error": _rel(nps_g.variance, nps_r.variance)}
    errors = [abs(v["relative_error"]) for v in result["std_by_band"].values() if np.isfinite(v["relative_error"])]
    soft = band_label((-100.0, 200.0))
    result["summary"] = {
        "max_abs_std_relative_error": float(max(errors)) if errors else float("nan"),
        "soft_tissue_std_relative_error": result["std_by_band"].get(soft, {}).get("relative_error", float("nan")),
        "soft_tissue_mean_frequency_relative_error":
            result["nps"].get(soft, {}).get("mean_frequency_relative_error", float("nan")),
    }
    return result


def plot_noise_comparison(comparison: dict, path: str | PathLike[str], title: str | None = None) -> Path:
    """PNG of a :func:`compare_noise` result: NPS per band (generated dashed, real solid) and std per band."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.6), dpi=110)
    ax_nps, ax_std = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    colours = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]
    for k, (label, entry) in enumerate(comparison.get("nps", {}).items()):
        colour = colours[k % len(colours)]
        for kind, style in (("real", "-"), ("generated", "--")):
            spec = entry[kind]
            ax_nps.plot(spec["frequencies"], spec["nps"], style, color=colour,
                        label=f"{label} {kind} (f_av {spec['mean_frequency']:.3f})")
    ax_nps.set_xlabel("spatial frequency (cycles/mm)")
    ax_nps.set_ylabel("NPS (HU$^2$ mm$^2$)")
    ax_nps.set_title("noise power spectrum in uniform ROIs")
    ax_nps.grid(True, alpha=0.3)
    ax_nps.legend(fontsize=6)
    labels = list(comparison.get("std_by_band", {}).keys())
    real = [comparison["std_by_band"][lb]["real"] for lb in labels]
    gen = [comparison["std_by_band"][lb]["generated"] for lb in labels]
    pos = np.arange(len(labels))
    ax_std.bar(pos - 0.2, real, 0.4, label="real")
    ax_std.bar(pos + 0.2, gen, 0.4, label="generated")
    ax_std.set_xticks(pos)
    ax_std.set_xticklabels([lb.replace(" HU ", "\n") for lb in labels], fontsize=7)
    ax_std.set_ylabel("noise std (HU)")
    ax_std.set_title("noise std by HU band of the reference")
    ax_std.legend(fontsize=8)
    ax_std.grid(True, axis="y", alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out
