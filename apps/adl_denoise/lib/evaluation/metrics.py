"""Image-quality metrics in a stated intensity window, and uniform-region (bias / noise) statistics.

Conventions (the low-dose CT literature's: RED-CNN, CTformer, DU-GAN, ...):

* Every fidelity metric is computed on a display *window* ``(lo, hi)``: both the prediction and the
  reference are clipped to the window first, and the data range is the window width ``hi - lo``.
  Values outside the window therefore do not count beyond the window edge. The window changes the
  numbers a lot, so always report it next to the figures.
* CT windows are in Hounsfield units (:data:`CT_WINDOWS`); for MR the window is ``(0, max(reference))``
  (:func:`mr_window`).
* PSNR and RMSE are computed over the whole array (all voxels of a volume pooled into one MSE), not
  averaged per slice. SSIM is computed per 2D slice (axis 0 of a ``(z, y, x)`` volume) and averaged over
  the slices, with the Gaussian-weighted window of Wang et al. 2004 (sigma 1.5, 11x11,
  K1 = 0.01, K2 = 0.03, population covariance), via :func:`skimage.metrics.structural_similarity`.
* Arrays are ``(y, x)`` slices or ``(z, y, x)`` volumes in numpy order. Inputs must have the same shape
  and be finite; anything else raises :class:`ValueError`.

No file I/O here: this module is pure array science.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
from scipy import ndimage

__all__ = [
    "CT_WINDOWS",
    "Window",
    "mr_window",
    "window_for",
    "psnr",
    "psnr_from_squared_error",
    "squared_error_sum",
    "ssim",
    "rmse",
    "find_uniform_regions",
    "uniform_region_statistics",
    "UniformRegionStats",
    "evaluate_windows",
]

Window = tuple[float, float]

#: Standard CT windows (HU). ``soft_tissue`` is the RED-CNN / CTformer abdomen window [-160, 240].
CT_WINDOWS: dict[str, Window] = {"soft_tissue": (-160.0, 240.0), "wide": (-1000.0, 1000.0)}

#: SSIM as in Wang et al. 2004 (Gaussian window, sigma 1.5 -> an 11x11 support in scikit-image).
_SSIM_KWARGS = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, K1=0.01, K2=0.03)
_SSIM_MIN_SIDE = 11


# --------------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------------
def _as_float(name: str, a) -> np.ndarray:
    arr = np.asarray(a)
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{name}: expected a real numeric array, got dtype {arr.dtype}")
    arr = arr.astype(np.float64, copy=False)
    if arr.ndim not in (2, 3):
        raise ValueError(f"{name}: expected a 2D (y, x) slice or 3D (z, y, x) volume, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name}: empty array")
    if not np.all(np.isfinite(arr)):
        n_bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        raise ValueError(f"{name}: contains {n_bad} NaN/Inf value(s); metrics need finite inputs")
    return arr


def _check_pair(pred, ref) -> tuple[np.ndarray, np.ndarray]:
    p = _as_float("pred", pred)
    r = _as_float("ref", ref)
    if p.shape != r.shape:
        raise ValueError(f"shape mismatch: pred {p.shape} vs ref {r.shape}")
    return p, r


def _check_window(window) -> Window:
    if window is None:
        raise ValueError("a window (lo, hi) is required, e.g. CT_WINDOWS['soft_tissue'] or mr_window(ref)")
    try:
        lo, hi = (float(v) for v in window)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"window must be a pair (lo, hi), got {window!r}") from exc
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        raise ValueError(f"window must satisfy lo < hi (finite), got {window!r}")
    return lo, hi


def _clip_pair(pred, ref, window) -> tuple[np.ndarray, np.ndarray, float]:
    p, r = _check_pair(pred, ref)
    lo, hi = _check_window(window)
    return np.clip(p, lo, hi), np.clip(r, lo, hi), hi - lo


# --------------------------------------------------------------------------------------------------
# windows
# --------------------------------------------------------------------------------------------------
def mr_window(reference) -> Window:
    """MR window: ``(0, max(reference))`` (raises for a reference whose maximum is not positive)."""
    r = _as_float("ref", reference)
    top = float(r.max())
    if top <= 0:
        raise ValueError(f"MR window needs a reference with a positive maximum, got max {top}")
    return 0.0, top


def window_for(modality: str, reference=None, name: str = "soft_tissue") -> Window:
    """The evaluation window for a modality: ``CT_WINDOWS[name]`` for CT, :func:`mr_window` for MR."""
    mod = (modality or "").upper()
    if mod == "CT":
        return CT_WINDOWS[name]
    if mod == "MR":
        if reference is None:
            raise ValueError("the MR window needs the reference image")
        return mr_window(reference)
    raise ValueError(f"no standard window for modality {modality!r} (expected 'CT' or 'MR')")


# --------------------------------------------------------------------------------------------------
# fidelity metrics
# --------------------------------------------------------------------------------------------------
def _check_mask(mask, shape) -> np.ndarray | None:
    if mask is None:
        return None
    m = np.asarray(mask, dtype=bool)
    if m.shape != tuple(shape):
        raise ValueError(f"shape mismatch: mask {m.shape} vs images {tuple(shape)}")
    if not m.any():
        raise ValueError("mask selects no voxel")
    return m


def _mse(pred, ref, window, mask) -> tuple[float, float]:
    p, r, width = _clip_pair(pred, ref, window)
    m = _check_mask(mask, p.shape)
    d2 = (p - r) ** 2
    return float(np.mean(d2 if m is None else d2[m])), width


def rmse(pred, ref, window, mask=None) -> float:
    """Root-mean-square error, in the image's units (HU for CT), after clipping both arrays to ``window``.

    Pooled over all voxels of a volume (not averaged per slice), or over the voxels of ``mask``.
    """
    mse, _ = _mse(pred, ref, window, mask)
    return float(np.sqrt(mse))


def psnr(pred, ref, window, mask=None) -> float:
    """Peak signal-to-noise ratio in dB: ``10 log10(W^2 / MSE)`` with ``W = hi - lo`` (window width).

    Both arrays are clipped to ``window`` first. The MSE is pooled over the whole array (all voxels of
    a volume), not averaged per slice; with a boolean ``mask`` over the masked voxels only. Identical
    (after clipping) inputs give ``math.inf``; no cap.
    """
    mse, width = _mse(pred, ref, window, mask)
    if mse == 0.0:
        return math.inf
    return float(10.0 * np.log10(width * width / mse))


def squared_error_sum(pred, ref, window) -> float:
    """Sum over all voxels of the squared difference of ``pred`` and ``ref`` (same shape, modality units) after
    clipping both to ``window``, accumulated in float64: the part of :func:`psnr`'s pooled MSE that a share of a
    volume's slices contributes (:func:`psnr_from_squared_error` turns the shares' total into the PSNR)."""
    p, r, _ = _clip_pair(pred, ref, window)
    d = p.astype(np.float64) - r.astype(np.float64)
    return float(np.square(d).sum())


def psnr_from_squared_error(total: float, count: int, window) -> float:
    """:func:`psnr` (dB) from the :func:`squared_error_sum` ``total`` over ``count`` voxels in ``window``
    (``math.inf`` for a zero total, as :func:`psnr`)."""
    lo, hi = _check_window(window)
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if total == 0.0:
        return math.inf
    width = hi - lo
    return float(10.0 * np.log10(width * width / (total / count)))


def ssim(pred, ref, window, mask=None) -> float:
    """Structural similarity (Wang et al. 2004) after clipping both arrays to ``window``.

    ``data_range`` is the window width; Gaussian weights (sigma 1.5, 11x11), K1 0.01, K2 0.03,
    population covariance. A 3D ``(z, y, x)`` volume is scored per axial slice (axis 0) and the slice
    SSIMs are averaged (unweighted). Each slice must be at least 11x11. With a boolean ``mask`` the
    per-slice value is the mean of the SSIM map over the masked pixels, averaged over the slices that
    have masked pixels (scikit-image's unmasked value is the map's mean over the image minus a 5-pixel
    border).
    """
    from skimage.metrics import structural_similarity

    p, r, width = _clip_pair(pred, ref, window)
    m = _check_mask(mask, p.shape)
    if min(p.shape[-2:]) < _SSIM_MIN_SIDE:
        raise ValueError(f"SSIM needs slices of at least {_SSIM_MIN_SIDE}x{_SSIM_MIN_SIDE}, got {p.shape[-2:]}")
    if p.ndim == 2:
        p, r = p[None], r[None]
        m = None if m is None else m[None]
    if m is None:
        values = [structural_similarity(ps, rs, data_range=width, **_SSIM_KWARGS) for ps, rs in zip(p, r)]
    else:
        values = []
        for ps, rs, ms in zip(p, r, m):
            if ms.any():
                _, smap = structural_similarity(ps, rs, data_range=width, full=True, **_SSIM_KWARGS)
                values.append(float(smap[ms].mean()))
    return float(np.mean(values))


# --------------------------------------------------------------------------------------------------
# uniform regions: HU bias and noise where the anatomy is flat
# --------------------------------------------------------------------------------------------------
RoiSlices = tuple  # (slice_y, slice_x) for 2D input, (slice_z, slice_y, slice_x) for 3D input


def find_uniform_regions(
    reference,
    roi_size: int = 15,
    n_rois: int = 12,
    hu_range: Window | None = (-100.0, 200.0),
    max_rois_per_slice: int = 3,
    stride: int | None = None,
) -> list[RoiSlices]:
    """Square ROIs (``roi_size`` x ``roi_size`` pixels, in-plane) where the reference is most uniform.

    For every slice the local mean and local standard deviation over a ``roi_size`` box are computed
    (box filters). Candidate ROI centres lie on a grid with ``stride`` (default ``roi_size // 3``) and
    must keep the ROI inside the image and have a local mean inside ``hu_range`` (CT default
    ``(-100, 200)`` HU: soft tissue, excluding air, lung, fat and bone). With ``hu_range=None`` (MR) the
    range is the foreground ``(0.1 * max(reference), max(reference))``, so the flat zero background of a
    skull-stripped or masked image is not taken as "uniform". Candidates are ranked by local std
    (ascending; ties broken by z, y, x) and picked greedily, skipping any that overlaps an already chosen
    ROI, with at most ``max_rois_per_slice`` per slice, until ``n_rois`` are chosen (fewer if not
    enough candidates). Deterministic.

    Returns a list of index tuples usable as ``array[roi]``: ``(slice_y, slice_x)`` for a 2D reference,
    ``(slice_z, slice_y, slice_x)`` (one z) for a 3D one.
    """
    ref = _as_float("reference", reference)
    if roi_size < 2:
        raise ValueError(f"roi_size must be >= 2, got {roi_size}")
    if n_rois < 1 or max_rois_per_slice < 1:
        raise ValueError("n_rois and max_rois_per_slice must be >= 1")
    vol = ref[None] if ref.ndim == 2 else ref
    _, h, w = vol.shape
    if h < roi_size or w < roi_size:
        raise ValueError(f"roi_size {roi_size} does not fit in slices of shape {(h, w)}")
    if hu_range is None:
        top = float(vol.max())
        if top <= 0:
            return []
        lo_v, hi_v = 0.1 * top, top
    else:
        lo_v, hi_v = _check_window(hu_range)
    step = max(1, stride if stride is not None else roi_size // 3)
    half = roi_size // 2
    # candidate top-left corners on the grid
    ys = np.arange(0, h - roi_size + 1, step)
    xs = np.arange(0, w - roi_size + 1, step)

    cand_std, cand_z, cand_y, cand_x = [], [], [], []
    for z, sl in enumerate(vol):
        mean = ndimage.uniform_filter(sl, size=roi_size, mode="reflect")
        mean_sq = ndimage.uniform_filter(sl * sl, size=roi_size, mode="reflect")
        std = np.sqrt(np.maximum(mean_sq - mean * mean, 0.0))
        # the box filter is centred: the ROI with top-left (y, x) has its centre at (y + half, x + half)
        # (exact for odd sizes; for even sizes scipy's centre is off by one, so recompute exactly below)
        cy, cx = np.meshgrid(ys + half, xs + half, indexing="ij")
        m = mean[cy, cx]
        s = std[cy, cx]
        ok = (m >= lo_v) & (m <= hi_v)
        if not np.any(ok):
            continue
        cand_std.append(s[ok])
        cand_z.append(np.full(int(ok.sum()), z))
        cand_y.append((cy - half)[ok])
        cand_x.append((cx - half)[ok])
    if not cand_std:
        return []
    s_all = np.concatenate(cand_std)
    z_all = np.concatenate(cand_z)
    y_all = np.concatenate(cand_y)
    x_all = np.concatenate(cand_x)
    if roi_size % 2 == 0:  # recompute the std exactly over the ROI for even sizes
        s_all = np.array([vol[z, y:y + roi_size, x:x + roi_size].std() for z, y, x in zip(z_all, y_all, x_all)])
    order = np.lexsort((x_all, y_all, z_all, np.round(s_all, 9)))

    chosen: list[tuple[int, int, int]] = []
    per_slice: dict[int, int] = {}
    for i in order:
        z, y, x = int(z_all[i]), int(y_all[i]), int(x_all[i])
        if per_slice.get(z, 0) >= max_rois_per_slice:
            continue
        if any(cz == z and abs(cy - y) < roi_size and abs(cx - x) < roi_size for cz, cy, cx in chosen):
            continue
        chosen.append((z, y, x))
        per_slice[z] = per_slice.get(z, 0) + 1
        if len(chosen) >= n_rois:
            break
    if ref.ndim == 2:
        return [(slice(y, y + roi_size), slice(x, x + roi_size)) for _, y, x in chosen]
    return [(slice(z, z + 1), slice(y, y + roi_size), slice(x, x + roi_size)) for z, y, x in chosen]


@dataclass(frozen=True)
class UniformRegionStats:
    """Statistics over uniform ROIs (units of the image: HU for CT).

    ``mean_bias``: mean over ROIs of ``mean(pred) - mean(ref)`` (signed; HU shift).
    ``mean_abs_bias``: mean over ROIs of ``|mean(pred) - mean(ref)|``.
    ``noise_std``: mean over ROIs of ``std(pred)`` (residual noise + texture of the prediction).
    ``ref_noise_std``: the same for the reference (its own noise; NDCT is never noise-free).
    ``n_rois``: how many ROIs were used.
    """

    mean_bias: float
    mean_abs_bias: float
    noise_std: float
    ref_noise_std: float
    n_rois: int

    def as_dict(self) -> dict:
        return {
            "mean_bias": self.mean_bias,
            "mean_abs_bias": self.mean_abs_bias,
            "noise_std": self.noise_std,
            "ref_noise_std": self.ref_noise_std,
            "n_rois": self.n_rois,
        }


def uniform_region_statistics(pred, ref, rois: Sequence[RoiSlices]) -> UniformRegionStats:
    """HU bias and noise of ``pred`` against ``ref`` inside ``rois`` (from :func:`find_uniform_regions`).

    No clipping/window: raw values. Returns NaN fields and ``n_rois=0`` for an empty ROI list.
    """
    p, r = _check_pair(pred, ref)
    rois = list(rois)
    if not rois:
        nan = float("nan")
        return UniformRegionStats(nan, nan, nan, nan, 0)
    biases, stds, ref_stds = [], [], []
    for roi in rois:
        if len(roi) != p.ndim:
            raise ValueError(f"ROI {roi} has {len(roi)} index entries for a {p.ndim}D array")
        pr, rr = p[tuple(roi)], r[tuple(roi)]
        if pr.size == 0:
            raise ValueError(f"ROI {roi} is empty for array of shape {p.shape}")
        biases.append(float(pr.mean() - rr.mean()))
        stds.append(float(pr.std()))
        ref_stds.append(float(rr.std()))
    b = np.asarray(biases)
    return UniformRegionStats(
        mean_bias=float(b.mean()),
        mean_abs_bias=float(np.abs(b).mean()),
        noise_std=float(np.mean(stds)),
        ref_noise_std=float(np.mean(ref_stds)),
        n_rois=len(rois),
    )


def evaluate_windows(pred, ref, windows: Iterable[tuple[str, Window]], masks: dict | None = None
                     ) -> dict[str, dict[str, float]]:
    """``{window_name: {"psnr", "ssim", "rmse", "window"}}`` for several named windows.

    ``masks`` may map a window name to a boolean mask restricting that window's metrics.
    """
    out = {}
    for name, win in windows:
        m = (masks or {}).get(name)
        out[name] = {
            "window": list(_check_window(win)),
            "psnr": psnr(pred, ref, win, mask=m),
            "ssim": ssim(pred, ref, win, mask=m),
            "rmse": rmse(pred, ref, win, mask=m),
        }
    return out
