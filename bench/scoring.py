"""What the benchmark measures on one denoised volume of a pair.

* fidelity: PSNR / SSIM / RMSE in the pair's stated windows (``lib.evaluation``, :meth:`bench.pairs.Pair.windows`):
  CT in [-160, 240] ("soft_tissue") and [-1000, 1000] HU ("wide"); MR in [0, max(reference)] ("full", and
  "foreground" restricted to :meth:`bench.pairs.Pair.masks`);
* uniform regions, found on the REFERENCE (:data:`ROI_COUNT` ROIs of :data:`ROI_SIZE` x :data:`ROI_SIZE` px,
  at most :data:`ROI_MAX_PER_SLICE` per slice; soft tissue -100..200 HU for CT, foreground for MR): mean bias
  (denoised - reference) and the noise std of the denoised image.
"""
from __future__ import annotations

import numpy as np

from bench.pairs import Pair
from lib.evaluation import CT_WINDOWS, evaluate_windows, find_uniform_regions, uniform_region_statistics

__all__ = ["ROI_SIZE", "ROI_MAX_PER_SLICE", "ROI_COUNT", "CT_ROI_HU_RANGE", "scored_windows", "pair_rois", "score",
           "added_noise_std"]

# Uniform-region settings (found on the reference).
ROI_SIZE = 15
ROI_MAX_PER_SLICE = 2
ROI_COUNT = 40
CT_ROI_HU_RANGE = (-100.0, 200.0)


def scored_windows(pair: Pair, masks: dict[str, np.ndarray]) -> dict[str, tuple[float, float]]:
    """The windows a pair is scored in: the CT windows, MR "full", and a masked window only where its mask
    exists (an MR reference without foreground has no "foreground" score)."""
    return {k: v for k, v in pair.windows().items() if k in masks or k in CT_WINDOWS or k == "full"}


def pair_rois(pair: Pair) -> list:
    """The uniform ROIs of ``pair.reference``: index tuples ``(slice_z, slice_y, slice_x)``."""
    hu_range = CT_ROI_HU_RANGE if pair.modality == "CT" else None
    return find_uniform_regions(pair.reference, roi_size=ROI_SIZE, n_rois=ROI_COUNT, hu_range=hu_range,
                                max_rois_per_slice=ROI_MAX_PER_SLICE)


def score(pred: np.ndarray, pair: Pair, rois: list, masks: dict | None = None) -> dict:
    """``{"windows": {name: {"psnr" dB, "ssim", "rmse" (image units)}}, "uniform": UniformRegionStats as dict}``
    for ``pred`` (Z, H, W) against ``pair.reference``."""
    masks = pair.masks() if masks is None else masks
    res = {"windows": evaluate_windows(pred, pair.reference, scored_windows(pair, masks).items(), masks=masks)}
    res["uniform"] = uniform_region_statistics(pred, pair.reference, rois).as_dict()
    return res


def added_noise_std(pair: Pair, rois: list) -> float:
    """Mean over the uniform ROIs of std(noisy - reference): the noise the simulation ADDED (image units)."""
    if not rois:
        return float("nan")
    d = pair.noisy.astype(np.float64) - pair.reference
    return float(np.mean([d[tuple(r)].std() for r in rois]))
