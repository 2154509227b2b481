"""The compare-and-correct maths on numpy arrays (no Slicer): blend, difference, ROI statistics, windows.

Arrays are (z, y, x) as ``slicer.util.arrayFromVolume`` gives them; CT in HU.
"""
from __future__ import annotations

import numpy as np

__all__ = ["AUTO_WINDOW_PERCENTILES", "WINDOW_PRESETS", "WINDOW_SAMPLE_VOXELS", "auto_window", "blend", "difference",
           "roi_statistics", "strided_sample", "window_for"]

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
#: lower / upper percentile of Slicer's automatic window/level (vtkMRMLScalarVolumeDisplayNode::CalculateAutoLevels:
#: the range of the volume's histogram without its thinnest 0.1 % tails)
AUTO_WINDOW_PERCENTILES = (0.1, 99.9)


def _same_shape(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"original {a.shape} and denoised {b.shape} volumes differ in shape")
    return a, b


def blend(original: np.ndarray, denoised: np.ndarray, strength: float, out: np.ndarray | None = None) -> np.ndarray:
    """``strength`` * denoised + (1 - ``strength``) * original, float32: 0 = original, 1 = fully denoised.
    Radiologists use it to take back part of the smoothing (noise texture they are used to).

    ``out``: a float32 array of the volumes' shape to write the blend into (a corrected node's own voxels, updated
    in place at each slider move), computed one slice (first axis) at a time with a one-slice scratch array, so no
    volume-sized array is made; returned. Without it a new array is returned. Same values either way."""
    original, denoised = _same_shape(original, denoised)
    s = float(strength)
    if not 0.0 <= s <= 1.0:
        raise ValueError(f"blend strength must be within [0, 1], got {strength}")
    if out is None:
        out = np.empty(original.shape, np.float32)
    elif out.shape != original.shape or out.dtype != np.float32:
        raise ValueError(f"the blend goes into a float32 array of shape {original.shape}, got {out.dtype} "
                         f"{out.shape}")
    if out.ndim == 0 or out.size == 0:
        out[...] = s * denoised.astype(np.float32) + (1.0 - s) * original.astype(np.float32)
        return out
    scratch = np.empty(out.shape[1:], np.float32)
    for index in range(out.shape[0]):  # in float32, as s * d + (1 - s) * o of float32 copies: the same values
        np.multiply(denoised[index], s, out=out[index], dtype=np.float32)
        np.multiply(original[index], 1.0 - s, out=scratch, dtype=np.float32)
        np.add(out[index], scratch, out=out[index])
    return out


def difference(original: np.ndarray, denoised: np.ndarray) -> np.ndarray:
    """original - denoised (what was removed: noise, and any structure that should not have been), float32 (both
    cast to float32 as they are read, without float32 copies of the volumes)."""
    original, denoised = _same_shape(original, denoised)
    return np.subtract(original, denoised, dtype=np.float32)


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
    return _percentile_window(values, (1.0, 99.0), sample_voxels)


def auto_window(values: np.ndarray, sample_voxels: int = WINDOW_SAMPLE_VOXELS) -> tuple[float, float]:
    """(width, level) that Slicer's automatic window/level gives a new volume of ``values``
    (:data:`AUTO_WINDOW_PERCENTILES`), estimated on at most ``sample_voxels`` of them, so that it can be computed
    in the background: the display node's own computation runs on the GUI thread, over the whole volume."""
    if np.asarray(values).size == 0:
        raise ValueError("an automatic window needs the volume's values")
    return _percentile_window(values, AUTO_WINDOW_PERCENTILES, sample_voxels)


def _percentile_window(values: np.ndarray, percentiles: tuple[float, float],
                       sample_voxels: int) -> tuple[float, float]:
    """(width, level) spanning the ``percentiles`` (low, high; %) of at most ``sample_voxels`` of ``values``."""
    sample = strided_sample(values, sample_voxels).astype(np.float64)
    low, high = np.percentile(sample, list(percentiles))
    return float(max(high - low, 1e-6)), float((high + low) / 2.0)
