"""The compare-and-correct maths on numpy arrays (no Slicer): blend, difference, ROI statistics, windows.

Arrays are (z, y, x) as ``slicer.util.arrayFromVolume`` gives them; CT in HU.
"""
from __future__ import annotations

import numpy as np

__all__ = ["WINDOW_PRESETS", "WINDOW_SAMPLE_VOXELS", "blend", "difference", "roi_statistics", "strided_sample",
           "window_for"]

#: (window width, window level) per preset. CT in HU (the usual radiology presets); MR "auto" uses percentiles.
WINDOW_PRESETS: dict[str, tuple[float, float] | None] = {
    "CT soft tissue": (400.0, 40.0),
    "CT liver": (150.0, 60.0),
    "CT brain": (80.0, 40.0),
    "CT lung": (1500.0, -600.0),
    "CT bone": (1800.0, 400.0),
    "MR auto": None,
}
#: at most this many voxels are looked at for "MR auto"'s percentiles (:func:`strided_sample`): the preset runs on
#: the GUI thread, where percentiles of a whole 512 x 512 x 400 volume (a float64 copy of it, then a partition) froze
#: Slicer; a million evenly spread voxels estimate the 1st / 99th percentiles far closer than a window needs
WINDOW_SAMPLE_VOXELS = 1 << 20


def _same_shape(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"original {a.shape} and denoised {b.shape} volumes differ in shape")
    return a, b


def blend(original: np.ndarray, denoised: np.ndarray, strength: float) -> np.ndarray:
    """``strength`` * denoised + (1 - ``strength``) * original, float32: 0 = original, 1 = fully denoised.
    Radiologists use it to take back part of the smoothing (noise texture they are used to)."""
    original, denoised = _same_shape(original, denoised)
    s = float(strength)
    if not 0.0 <= s <= 1.0:
        raise ValueError(f"blend strength must be within [0, 1], got {strength}")
    return (s * denoised.astype(np.float32) + (1.0 - s) * original.astype(np.float32)).astype(np.float32)


def difference(original: np.ndarray, denoised: np.ndarray) -> np.ndarray:
    """original - denoised (what was removed: noise, and any structure that should not have been), float32."""
    original, denoised = _same_shape(original, denoised)
    return (original.astype(np.float32) - denoised.astype(np.float32)).astype(np.float32)


def roi_statistics(original: np.ndarray, denoised: np.ndarray, mask: np.ndarray) -> dict:
    """Mean and standard deviation inside ``mask`` for both volumes, the mean shift and the noise reduction
    ``100 * (1 - std_denoised / std_original)`` (%); meaningful in a uniform region (liver, fat, water)."""
    original, denoised = _same_shape(original, denoised)
    mask = np.asarray(mask, bool)
    if mask.shape != original.shape:
        raise ValueError(f"ROI mask {mask.shape} does not match the volume {original.shape}")
    count = int(mask.sum())
    if count < 2:
        raise ValueError("the ROI holds fewer than 2 voxels: place it inside the volume")
    o, d = original[mask].astype(np.float64), denoised[mask].astype(np.float64)
    std_o, std_d = float(o.std(ddof=1)), float(d.std(ddof=1))
    return {"voxels": count, "mean_original": float(o.mean()), "std_original": std_o, "mean_denoised": float(d.mean()),
            "std_denoised": std_d, "mean_shift": float(d.mean() - o.mean()),
            "noise_reduction_percent": float(100.0 * (1.0 - std_d / std_o)) if std_o > 0 else 0.0}


def strided_sample(values: np.ndarray, cap: int) -> np.ndarray:
    """At most ``cap`` voxels of ``values`` (any shape), evenly spread: every ``ceil(size / cap)``-th voxel in C
    order. A view of a C-contiguous array (Slicer's ``arrayFromVolume`` is), so its cost is that of the sample, not
    of the volume; the sample keeps ``values``' dtype."""
    if cap < 1:
        raise ValueError(f"the sample needs at least one voxel, got cap {cap}")
    flat = np.asarray(values).reshape(-1)  # a view when contiguous; a copy (of what was asked for) otherwise
    return flat[:: max(1, -(-flat.size // int(cap)))]


def window_for(preset: str, values: np.ndarray | None = None,
               sample_voxels: int = WINDOW_SAMPLE_VOXELS) -> tuple[float, float]:
    """(width, level) of a preset; ``MR auto`` from the 1st-99th percentiles of ``values``, estimated on at most
    ``sample_voxels`` of them (:func:`strided_sample`): cheap enough for the GUI thread at any volume size."""
    if preset not in WINDOW_PRESETS:
        raise ValueError(f"unknown window preset {preset!r}; choose from {', '.join(WINDOW_PRESETS)}")
    fixed = WINDOW_PRESETS[preset]
    if fixed is not None:
        return fixed
    if values is None or np.asarray(values).size == 0:
        raise ValueError("MR auto needs the volume's values")
    sample = strided_sample(values, sample_voxels).astype(np.float64)
    low, high = np.percentile(sample, [1.0, 99.0])
    return float(max(high - low, 1e-6)), float((high + low) / 2.0)
