"""Noise samples from low-dose CT images alone: smooth-patch selection (GCBD-style), low-order trend removed.

Why this method (and not "image minus a smoothed image"): CT noise is spatially correlated, most of its power
lying at 0.1-0.4 cycles/pixel for clinical kernels. The residual of a structure-preserving smoother (Gaussian,
bilateral, NLM) also removes the low-frequency part of the noise, so it under-estimates the noise std and shifts its
noise power spectrum (NPS) to high frequencies. In a patch that holds no structure, the image is the local mean
(or a slow trend) plus noise: subtracting the patch mean keeps every frequency of the noise above ``1 / patch``.

Trend removal (``detrend``): ``"mean"``, ``"plane"`` or ``"quadratic"`` (default: least-squares quadratic surface,
6 coefficients). Uniform-looking regions of real images still carry slow anatomical trends (and the residual
texture of whatever made them look uniform) that leak into the samples as low-frequency "noise". CT noise from
filtered back-projection has almost no power near zero frequency (the ramp filter vanishes there), so a quadratic
costs it almost nothing. Measured (``bench/noise_model_validation.py`` data: Hamming-FBP noise, ~20-30 HU, on an
NLM-cleaned thorax; extracted soft-tissue patches against the true noise at the same positions): mean +17 % std /
-24 % NPS mean frequency, plane +14 % / -18 %, quadratic +11 % / -10 %; on the true noise alone the quadratic
removes 0.3-0.5 % of the std. Noise with much power near zero frequency (Gaussian-filtered white noise, blotchy
iterative reconstructions) loses more: -3.5 % std / +11 % mean frequency for white noise filtered with a 1.2-pixel
Gaussian (f_av 0.11 cycles/pixel); use ``"mean"`` or ``"plane"`` there.

Selection (after Chen et al., GCBD, CVPR 2018, adapted to HU, where a mean-relative threshold makes no sense):
candidate ``P x P`` patches on a grid are split into ``b x b`` blocks (``P / b`` pixels each). For pure noise of a
given texture two scale-free statistics have a fixed distribution whatever the noise level:

* ``mean_spread = var(block means) / mean(block variances)``: a trend, an edge or an organ boundary inside the
  patch raises it;
* ``var_spread = max |log(block variance) - median(log(block variances))|``: a small high-contrast object in
  one block raises it (the std of the log variances, used before, hardly moved for a single such block).

The reference value of each statistic is its ``reference_quantile`` (default the 25th percentile) over all
candidates of the input (noise-only patches are the lowest-scoring ones); a patch is kept when both statistics are
below ``factor x`` their reference. ``factor`` (default 1.7 for both) trades structure rejection against selection
bias. Measured on pure Gaussian-filtered (correlated) noise, 256 x 256 x 4, P = 32: it keeps 66-73 % of the
patches, and the kept ones have a 1-2 % lower std and a 2-4 % higher NPS mean frequency than all patches (factor
2.5: 95 % kept, < 1 % bias, but twice the structure leaking into soft-tissue samples of a real thorax). With 25 HU
noise holding 1-pixel +300 HU dots (calcification-like), 6 % of the kept patches hold a dot (18 % with the former
std-of-log-variances statistic): such dots, learnt as noise, would be added to pseudo low-dose images and teach a
denoiser to erase small bright findings. Patches touching clipped or padded values (a value that occurs in many
pixels at the image minimum or maximum, or next to such a value there, e.g. air clipped at -1024 HU, -3024 outside
the field of view, or both) and constant patches are rejected: clipped noise is not the scanner's noise.

The conditioning of each sample is the patch mean of the low-dose image in HU: in a structure-free patch it
estimates the local normal-dose intensity (the noise has zero mean), the quantity the noise model is conditioned on
when it synthesises noise for a normal-dose image.

Known limits: patches are taken only in uniform regions, so the noise of heterogeneous regions (lung parenchyma,
bone) is represented by their most uniform parts; anatomical texture weaker than the noise passes the test and is
learnt as noise; the noise of the low-dose image is the *total* noise (including what a normal-dose scan would also
have): see :func:`lib.noise_learning.synthesise_pseudo_low_dose` (``reference_noise_std_hu``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

__all__ = ["DETREND_MODES", "NoiseSamples", "SelectionThresholds", "detect_clip_values", "extract_noise_samples",
           "remove_trend"]

#: Default HU interval of patch means that may give noise samples (air ... dense bone).
DEFAULT_HU_RANGE: tuple[float, float] = (-1100.0, 3000.0)
#: Conditions below this HU are "air" (outside the body, trachea): bookkept for the model's air policy.
AIR_HU = -900.0
#: What :func:`extract_noise_samples` may remove from a patch.
DETREND_MODES = ("mean", "plane", "quadratic")


@dataclass(frozen=True)
class SelectionThresholds:
    """Thresholds of the smooth-patch test (see the module docstring).

    Attributes:
        blocks: blocks per side (``patch_size`` must be divisible by it; blocks of >= 4 pixels).
        reference_quantile: quantile of the candidates' statistics taken as the noise-only reference.
        mean_factor: keep a patch when ``mean_spread <= mean_factor * reference``.
        var_factor: keep a patch when ``var_spread <= var_factor * reference``.
        min_std_hu: patches with a smaller std are constant (padding, clipped air) and rejected.
    """

    blocks: int = 4
    reference_quantile: float = 0.25
    mean_factor: float = 1.7
    var_factor: float = 1.7
    min_std_hu: float = 0.5


@dataclass
class NoiseSamples:
    """Noise patches extracted from low-dose images, with their conditioning and bookkeeping.

    Attributes:
        patches: float32 (N, P, P) noise in HU, each patch with zero mean.
        condition_hu: float32 (N,) local signal level in HU (patch mean of the low-dose image).
        positions: int64 (N, 4): (source index, slice z, row y, column x) of each patch's top-left pixel.
        patch_size: P in pixels.
        pixel_size_mm: (dy, dx) in mm of the images the patches came from (None if unknown).
        sources: names of the input images (indexed by ``positions[:, 0]``).
        stats: bookkeeping of the selection (candidates, rejections by reason, thresholds, reference values,
            clip values found, air candidates and accepted air samples).
    """

    patches: np.ndarray
    condition_hu: np.ndarray
    positions: np.ndarray
    patch_size: int
    pixel_size_mm: tuple[float, float] | None = None
    sources: list[str] = field(default_factory=list)
    stats: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.patches = np.asarray(self.patches, dtype=np.float32)
        self.condition_hu = np.asarray(self.condition_hu, dtype=np.float32).reshape(-1)
        self.positions = np.asarray(self.positions, dtype=np.int64).reshape(-1, 4)
        if self.patches.ndim != 3 or self.patches.shape[1:] != (self.patch_size, self.patch_size):
            raise ValueError(f"patches must be (N, {self.patch_size}, {self.patch_size}), got {self.patches.shape}")
        n = self.patches.shape[0]
        if self.condition_hu.shape[0] != n or self.positions.shape[0] != n:
            raise ValueError("patches, condition_hu and positions must have the same length")

    def __len__(self) -> int:
        return int(self.patches.shape[0])

    @property
    def noise_std_hu(self) -> float:
        """Pooled standard deviation of all patches (HU)."""
        return float(np.sqrt(np.mean(self.patches.astype(np.float64) ** 2))) if len(self) else float("nan")

    @property
    def air_fraction(self) -> float:
        """Fraction of samples whose condition is below -900 HU (air)."""
        return float(np.mean(self.condition_hu < AIR_HU)) if len(self) else 0.0

    def subset(self, index: np.ndarray) -> "NoiseSamples":
        """A new :class:`NoiseSamples` with the samples at ``index`` (same bookkeeping)."""
        index = np.asarray(index)
        return NoiseSamples(self.patches[index], self.condition_hu[index], self.positions[index], self.patch_size,
                            self.pixel_size_mm, list(self.sources), dict(self.stats))

    @staticmethod
    def concatenate(items: Sequence["NoiseSamples"]) -> "NoiseSamples":
        """Join samples of several extractions (same patch size); sources are renumbered, stats summed."""
        items = [s for s in items]
        if not items:
            raise ValueError("nothing to concatenate")
        sizes = {s.patch_size for s in items}
        if len(sizes) != 1:
            raise ValueError(f"samples have different patch sizes {sorted(sizes)}")
        pixel_sizes = [s.pixel_size_mm for s in items if s.pixel_size_mm is not None]
        pixel = None
        if pixel_sizes:
            pixel = (float(np.median([p[0] for p in pixel_sizes])), float(np.median([p[1] for p in pixel_sizes])))
        positions, sources, offset = [], [], 0
        for s in items:
            pos = s.positions.copy()
            pos[:, 0] += offset
            positions.append(pos)
            sources += s.sources or [f"input{offset + k}" for k in range(max(1, int(pos[:, 0].max(initial=0)) + 1))]
            offset = len(sources)
        stats = _merge_stats([s.stats for s in items])
        stats["pixel_sizes_mm"] = [list(p) for p in pixel_sizes]
        return NoiseSamples(np.concatenate([s.patches for s in items]), np.concatenate([s.condition_hu for s in items]),
                            np.concatenate(positions), items[0].patch_size, pixel, sources, stats)


def _merge_stats(stats: Sequence[dict]) -> dict:
    out: dict = {}
    for st in stats:
        for key, value in st.items():
            if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
                out[key] = int(out.get(key, 0)) + int(value)
            elif key == "clip_values_hu":
                out[key] = sorted(set(out.get(key, [])) | set(value))
            else:
                out.setdefault(key, value)
    return out


def detect_clip_values(image: np.ndarray, min_fraction: float = 1e-3, min_count: int = 20) -> list[float]:
    """Values where the image was clipped or padded: its minimum and/or maximum when held by many pixels.

    A padding value found at an extreme is set aside and the next extreme value checked too: a scan padded at
    -3024 HU outside the field of view may also have its air clipped at -1024 HU, and only the padding would be
    found otherwise (the clipped air then passed as noise, half its distribution cut off).

    Args:
        image: (H, W) or (Z, H, W) HU.
        min_fraction: the extreme value must be held by at least this fraction of the pixels ...
        min_count: ... and by at least this many pixels.

    Returns:
        The clip values found (0 to 4 floats, HU): at most two at each end.
    """
    arr = np.asarray(image)
    need = max(int(min_count), int(min_fraction * arr.size))
    out: list[float] = []
    for low_end in (True, False):
        value = float(arr.min() if low_end else arr.max())
        for level in range(2):
            if level:  # the next extreme beyond the one found (no copy of a large volume)
                beyond = arr > value if low_end else arr < value
                if not beyond.any():
                    break
                value = float(np.min(arr, where=beyond, initial=np.inf) if low_end else
                              np.max(arr, where=beyond, initial=-np.inf))
            if int(np.count_nonzero(arr == value)) < need:
                break
            if value not in out:
                out.append(value)
    return out


def remove_trend(patches: np.ndarray, detrend: str = "quadratic") -> np.ndarray:
    """(N, P, P) patches minus their least-squares ``"mean"``, ``"plane"`` or ``"quadratic"`` surface, float32."""
    x = np.asarray(patches, dtype=np.float64)
    if x.ndim != 3 or x.shape[0] == 0:
        return x.astype(np.float32)
    if detrend == "mean":
        return (x - x.mean(axis=(1, 2), keepdims=True)).astype(np.float32)
    n, ph, pw = x.shape
    yy, xx = np.mgrid[0:ph, 0:pw]
    yy = yy.ravel() / max(ph - 1, 1) - 0.5
    xx = xx.ravel() / max(pw - 1, 1) - 0.5
    columns = [np.ones(ph * pw), yy, xx]
    if detrend == "quadratic":
        columns += [yy * yy, xx * xx, yy * xx]
    elif detrend != "plane":
        raise ValueError(f"detrend must be one of {DETREND_MODES}, got {detrend!r}")
    basis = np.stack(columns, axis=1)
    coef, *_ = np.linalg.lstsq(basis, x.reshape(n, -1).T, rcond=None)
    residual = x - (basis @ coef).T.reshape(n, ph, pw)
    return (residual - residual.mean(axis=(1, 2), keepdims=True)).astype(np.float32)


def _block_statistics(patches: np.ndarray, blocks: int) -> tuple[np.ndarray, np.ndarray]:
    """``mean_spread`` and ``var_spread`` of (N, P, P) patches split into ``blocks x blocks`` blocks."""
    n, p, _ = patches.shape
    s = p // blocks
    b = patches.reshape(n, blocks, s, blocks, s).astype(np.float64)
    block_mean = b.mean(axis=(2, 4)).reshape(n, -1)
    block_var = b.var(axis=(2, 4), ddof=1).reshape(n, -1)
    mean_var = block_var.mean(axis=1)
    tiny = 1e-12
    mean_spread = block_mean.var(axis=1, ddof=1) / np.maximum(mean_var, tiny)
    # The largest deviation of one block's log variance from the median, not the std over all blocks: a small
    # bright object (a calcification) lies in one block, and one outlier among b^2 blocks moves the std by only
    # about 1/b of its size, so with the std 18 % of the patches accepted from noise with 1-pixel +300 HU dots held one.
    log_var = np.log(np.maximum(block_var, tiny))
    var_spread = np.abs(log_var - np.median(log_var, axis=1, keepdims=True)).max(axis=1)
    return mean_spread, var_spread


def _pixel_size(pixel_size_mm: float | Sequence[float] | None) -> tuple[float, float] | None:
    if pixel_size_mm is None:
        return None
    if np.isscalar(pixel_size_mm):
        v = float(pixel_size_mm)  # type: ignore[arg-type]
        values = (v, v)
    else:
        vals = [float(v) for v in pixel_size_mm]  # type: ignore[union-attr]
        if len(vals) not in (2, 3):
            raise ValueError(f"pixel_size_mm must be a number, (dy, dx) or (dz, dy, dx); got {pixel_size_mm!r}")
        values = (vals[-2], vals[-1])
    if not all(v > 0 and np.isfinite(v) for v in values):
        raise ValueError(f"pixel size must be finite and > 0 mm, got {pixel_size_mm!r}")
    return values


def extract_noise_samples(
    ldct_hu: np.ndarray,
    patch_size: int = 32,
    stride: int | None = None,
    max_patches: int | None = 20000,
    hu_range: tuple[float, float] = DEFAULT_HU_RANGE,
    seed: int | np.random.Generator | None = 0,
    *,
    pixel_size_mm: float | Sequence[float] | None = None,
    thresholds: SelectionThresholds = SelectionThresholds(),
    source_name: str = "input0",
    detrend: str = "quadratic",
) -> NoiseSamples:
    """Noise patches of a low-dose CT image, found without any normal-dose image (see the module docstring).

    Args:
        ldct_hu: low-dose CT in HU, (H, W) or (Z, H, W) (slices are handled independently).
        patch_size: P, side of the square noise patches in pixels (>= 8, divisible by ``thresholds.blocks``; the
            noise model needs a multiple of 8).
        stride: grid step of the candidate patches (default ``P // 2``; candidates overlap).
        max_patches: keep at most this many accepted patches (a seeded random subset); None keeps all.
        hu_range: (low, high) HU interval of candidate patch means.
        seed: seed of the random subset.
        pixel_size_mm: in-plane pixel size (number, (dy, dx) or (dz, dy, dx)), stored for the noise model.
        thresholds: the smooth-patch test.
        source_name: name of the input in the bookkeeping.
        detrend: what is removed from each accepted patch: ``"mean"``, ``"plane"`` or ``"quadratic"`` (least-squares
            surface; see the module docstring for the measured trade-off).

    Returns:
        :class:`NoiseSamples` (patches (N, P, P) HU with zero mean, conditions (N,) HU = patch means).

    Raises:
        ValueError: bad shape or values, patch larger than the image, bad thresholds.
    """
    arr = np.asarray(ldct_hu)
    if arr.ndim not in (2, 3):
        raise ValueError(f"ldct_hu must be (H, W) or (Z, H, W), got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise ValueError(f"ldct_hu must be real and numeric, got dtype {arr.dtype}")
    vol = arr.astype(np.float32, copy=False)
    if not np.all(np.isfinite(vol)):
        raise ValueError("ldct_hu contains NaN or infinite values")
    if vol.ndim == 2:
        vol = vol[None]
    p = int(patch_size)
    blocks = int(thresholds.blocks)
    if blocks < 2 or p % blocks or p // blocks < 4:
        raise ValueError(f"patch_size {p} must be divisible by {blocks} blocks of >= 4 pixels")
    if p > min(vol.shape[1:]):
        raise ValueError(f"patch_size {p} is larger than the image ({vol.shape[1]} x {vol.shape[2]})")
    step = int(stride) if stride is not None else max(1, p // 2)
    if step < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    lo, hi = float(hu_range[0]), float(hu_range[1])
    if not lo < hi:
        raise ValueError(f"hu_range must be (low, high) with low < high, got {hu_range}")
    if detrend not in DETREND_MODES:
        raise ValueError(f"detrend must be one of {DETREND_MODES}, got {detrend!r}")
    if not 0 < thresholds.reference_quantile < 1 or thresholds.mean_factor <= 0 or thresholds.var_factor <= 0:
        raise ValueError(f"invalid thresholds {thresholds}")

    clip_values = detect_clip_values(vol)
    # Pass 1: per-slice block statistics of every usable candidate (only statistics and positions are kept, so
    # memory does not grow with the number of slices).
    spreads, positions_list = [], []
    stats = {"slices": int(vol.shape[0]), "candidates": 0, "rejected_hu_range": 0, "rejected_clipped": 0,
             "rejected_constant": 0, "air_candidates": 0, "air_rejected_clipped_or_constant": 0}
    for z in range(vol.shape[0]):
        windows = sliding_window_view(vol[z], (p, p))[::step, ::step]  # (ny, nx, P, P) view
        ny, nx = windows.shape[:2]
        patches = windows.reshape(ny * nx, p, p)
        ys, xs = np.meshgrid(np.arange(ny) * step, np.arange(nx) * step, indexing="ij")
        stats["candidates"] += patches.shape[0]
        means = patches.mean(axis=(1, 2), dtype=np.float64)
        stds = patches.std(axis=(1, 2), dtype=np.float64)
        clipped = np.zeros(patches.shape[0], dtype=bool)
        for value in clip_values:
            clipped |= (patches == value).any(axis=(1, 2))
        constant = stds < float(thresholds.min_std_hu)
        in_range = (means >= lo) & (means <= hi)
        air = means < AIR_HU
        stats["air_candidates"] += int(np.count_nonzero(air))
        stats["air_rejected_clipped_or_constant"] += int(np.count_nonzero(air & (clipped | constant)))
        stats["rejected_hu_range"] += int(np.count_nonzero(~in_range))
        stats["rejected_clipped"] += int(np.count_nonzero(in_range & clipped))
        stats["rejected_constant"] += int(np.count_nonzero(in_range & ~clipped & constant))
        ok = in_range & ~clipped & ~constant
        if ok.any():
            spreads.append(np.stack(_block_statistics(patches[ok], blocks), axis=1))
            positions_list.append(np.stack([np.zeros(ok.sum(), np.int64), np.full(ok.sum(), z), ys.ravel()[ok],
                                            xs.ravel()[ok]], axis=1))

    stats["clip_values_hu"] = [float(v) for v in clip_values]
    stats["thresholds"] = {k: float(v) for k, v in vars(thresholds).items()}
    stats["detrend"] = detrend
    if not spreads:
        stats.update(accepted=0, rejected_structure=0, kept=0, air_accepted=0)
        return NoiseSamples(np.zeros((0, p, p), np.float32), np.zeros(0, np.float32), np.zeros((0, 4), np.int64),
                            p, _pixel_size(pixel_size_mm), [source_name], stats)
    # Pass 2: thresholds relative to the noise-only reference of the whole input, then the accepted patches.
    spread = np.concatenate(spreads)
    positions = np.concatenate(positions_list)
    mean_spread, var_spread = spread[:, 0], spread[:, 1]
    ref_mean = float(np.quantile(mean_spread, thresholds.reference_quantile))
    ref_var = float(np.quantile(var_spread, thresholds.reference_quantile))
    smooth = (mean_spread <= thresholds.mean_factor * ref_mean) & (var_spread <= thresholds.var_factor * ref_var)
    stats["reference_mean_spread"] = ref_mean
    stats["reference_var_spread"] = ref_var
    stats["rejected_structure"] = int(np.count_nonzero(~smooth))
    stats["accepted"] = int(np.count_nonzero(smooth))
    positions = positions[smooth]
    if max_patches is not None and positions.shape[0] > int(max_patches):
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        positions = positions[np.sort(rng.choice(positions.shape[0], size=int(max_patches), replace=False))]
    stats["kept"] = int(positions.shape[0])
    patches = np.stack([vol[z, y:y + p, x:x + p] for _, z, y, x in positions]) if positions.shape[0] else \
        np.zeros((0, p, p), np.float32)
    means = patches.mean(axis=(1, 2), dtype=np.float64)
    noise = remove_trend(patches, detrend)
    stats["air_accepted"] = int(np.count_nonzero(means < AIR_HU))
    return NoiseSamples(noise, means.astype(np.float32), positions, p, _pixel_size(pixel_size_mm),
                        [source_name], stats)
