"""Lesion contrast a denoiser keeps on real noisy CT slices: synthetic lesions planted in the slices themselves.

Where no clean image exists (a site's own low-dose scans), a denoiser can still be asked whether it keeps a small
low-contrast lesion: add a known lesion signal ``c * profile`` (:func:`lib.lesions.lesion_profile`) to the real
noisy slice ``y`` and compare the outputs with and without it,

    kept = sum(profile * (f(y + c * profile) - f(y))) / sum(profile * c * profile)

(:func:`lib.evaluation.detectability.contrast_kept`). The noise around the lesion is the scanner's own, the same in
both images (the paired design of the detectability benchmark), so the difference is the denoiser's response to
the lesion alone; no model output serves as a reference. Sites are drawn in uniform soft tissue of a Gaussian-
smoothed copy of the slice (so that noise does not pass for structure), several lesion diameters and signs, with
a fixed seed: two denoisers are scored on the very same lesions and noise.

Pure numpy / scipy: no server, no CLI, no GUI.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from scipy import ndimage

from ..lesions import Lesion, insert_lesions, lesion_profile
from ..lesions.synthesis import pick_sites, site_candidates
from .detectability import contrast_kept

__all__ = ["DIAMETERS_MM", "CONTRASTS_HU", "PlantedLesions", "lesion_contrast_check", "plant_lesions",
           "planted_contrast_kept"]

#: lesion diameters (mm) and contrasts (HU) planted: the 6 mm / -25 HU lesion of the product's target among them
DIAMETERS_MM: tuple[float, ...] = (4.0, 6.0, 10.0)
CONTRASTS_HU: tuple[float, ...] = (-25.0, 25.0)
#: Gaussian sigma (mm) of the copy on which sites are chosen, and the local standard deviation (HU) allowed there
SITE_SMOOTHING_MM = 1.5
SITE_MAX_LOCAL_STD_HU = 30.0


@dataclass(frozen=True)
class PlantedLesions:
    """Lesions planted in a stack of slices: ``lesions[i]`` are those of slice ``i`` (possibly none)."""

    lesions: tuple[tuple[Lesion, ...], ...]
    spacing_mm: tuple[float, float]

    @property
    def count(self) -> int:
        return sum(len(per_slice) for per_slice in self.lesions)

    def to_dict(self) -> dict:
        return {"spacing_mm": list(self.spacing_mm),
                "lesions": [[lesion.to_dict() for lesion in per_slice] for per_slice in self.lesions]}


def plant_lesions(slices: Sequence[np.ndarray], spacing_mm: float | Sequence[float], *, per_slice: int = 6,
                  diameters_mm: Sequence[float] = DIAMETERS_MM, contrasts_hu: Sequence[float] = CONTRASTS_HU,
                  seed: int = 0) -> PlantedLesions:
    """Choose lesion sites and contrasts in noisy CT slices (HU, each (H, W)).

    Per slice up to ``per_slice`` lesions, cycling through the diameters (each one's contrasts in turn) so that every
    (diameter, contrast) combination appears about equally often; a diameter with no room left in a slice loses its
    turn there (the next one takes the slot), and a slice is done when none has room. Sites in uniform soft tissue
    (:func:`lib.lesions.lesion_sites` on a Gaussian-smoothed copy, sigma :data:`SITE_SMOOTHING_MM`, local std up
    to :data:`SITE_MAX_LOCAL_STD_HU`), at least 3 diameters (>= 15 mm) apart. Deterministic for a given ``seed``.
    """
    if isinstance(spacing_mm, (int, float, np.integer, np.floating)):
        spacing = (float(spacing_mm), float(spacing_mm))
    else:
        spacing = tuple(float(s) for s in spacing_mm)[-2:]
    contrasts = [float(c) for c in contrasts_hu]
    # each diameter's turn comes once per contrast; its contrasts alternate over its own lesions (below), so both
    # stay balanced where a size often finds room for only one lesion per slice
    cycle = [float(d) for d in diameters_mm for _ in contrasts]
    if not cycle:
        raise ValueError("plant_lesions needs at least one diameter and one contrast")
    planted: list[tuple[Lesion, ...]] = []
    turn = 0
    placed = {diameter: 0 for diameter in cycle}
    for index, image in enumerate(slices):
        hu = np.asarray(image, dtype=np.float32)
        if hu.ndim != 2:
            raise ValueError(f"plant_lesions expects 2D slices, slice {index} has shape {hu.shape}")
        if not np.all(np.isfinite(hu)):
            raise ValueError(f"slice {index} contains NaN or infinite values")
        smooth = ndimage.gaussian_filter(hu, [SITE_SMOOTHING_MM / s for s in spacing])
        rng = np.random.default_rng([int(seed), index])
        chosen: list[Lesion] = []
        candidates: dict[float, np.ndarray] = {}  # per diameter: the costly part of a site, the same all slice long
        full: set[float] = set()  # diameters with no room left here (lesions are only added: it stays so)
        while len(chosen) < int(per_slice) and len(full) < len(placed):
            # the cycle moves on whether or not the size finds room, so that a size with none on this slice does
            # not take every later turn (and slot) from the others
            diameter = cycle[turn % len(cycle)]
            turn += 1
            if diameter in full:
                continue
            if diameter not in candidates:
                candidates[diameter] = site_candidates(smooth, spacing, diameter, modality="CT",
                                                       max_local_std=SITE_MAX_LOCAL_STD_HU)
            sites = pick_sites(candidates[diameter], spacing, diameter, 1, rng,
                               avoid=[lesion.centre for lesion in chosen])
            if not sites:
                full.add(diameter)
                continue
            contrast = contrasts[placed[diameter] % len(contrasts)]
            placed[diameter] += 1
            chosen.append(Lesion(centre=tuple(float(c) for c in sites[0]), diameter_mm=diameter, contrast=contrast))
        planted.append(tuple(chosen))
    return PlantedLesions(tuple(planted), spacing)


def planted_contrast_kept(denoise: Callable[[np.ndarray], np.ndarray], slices: Sequence[np.ndarray],
                          planted: PlantedLesions) -> dict:
    """Contrast kept by ``denoise`` ((N, H, W) -> (N, H, W), HU) of the lesions ``planted`` in ``slices``.

    Each slice with lesions is denoised with and without them (all of a slice's lesions together; they are at
    least 15 mm apart). Returns ``{"lesions": n, "mean_percent": %, "by_diameter_percent": {"6": %, ...},
    "per_lesion_percent": [...]}``; ``mean_percent`` is None when no lesion could be placed, and -inf when the
    denoiser returned a non-finite value.
    """
    if len(slices) != len(planted.lesions):
        raise ValueError(f"{len(slices)} slices but lesions for {len(planted.lesions)}")
    used = [i for i, per_slice in enumerate(planted.lesions) if per_slice]
    if not used:
        return {"lesions": 0, "mean_percent": None, "by_diameter_percent": {}, "per_lesion_percent": []}
    absent = np.stack([np.asarray(slices[i], dtype=np.float32) for i in used])
    present = np.stack([insert_lesions(absent[k], planted.lesions[i], planted.spacing_mm, "CT")
                        for k, i in enumerate(used)])
    out_present, out_absent = np.asarray(denoise(present)), np.asarray(denoise(absent))
    if not (np.isfinite(out_present).all() and np.isfinite(out_absent).all()):
        return {"lesions": planted.count, "mean_percent": float("-inf"), "by_diameter_percent": {},
                "per_lesion_percent": [], "non_finite_output": True}
    kept: list[float] = []
    by_diameter: dict[str, list[float]] = {}
    for k, i in enumerate(used):
        for lesion in planted.lesions[i]:
            profile = lesion_profile(absent[k].shape, lesion, planted.spacing_mm)
            value = 100.0 * contrast_kept(out_present[k], out_absent[k], profile, lesion.contrast * profile,
                                          np.zeros_like(profile))
            kept.append(value)
            by_diameter.setdefault(f"{lesion.diameter_mm:g}", []).append(value)
    return {"lesions": len(kept), "mean_percent": float(np.mean(kept)),
            "by_diameter_percent": {d: float(np.mean(v)) for d, v in sorted(by_diameter.items(),
                                                                             key=lambda kv: float(kv[0]))},
            "per_lesion_percent": kept}


def lesion_contrast_check(baseline: Callable[[np.ndarray], np.ndarray], candidate: Callable[[np.ndarray], np.ndarray],
                          groups: Sequence[tuple[Sequence[np.ndarray], Sequence[float]]], *, per_slice: int = 6,
                          tolerance_pp: float = 2.0, seed: int = 0) -> dict:
    """Does ``candidate`` keep planted lesions' contrast as well as ``baseline``? Both (N, H, W) -> (N, H, W) in HU.

    ``groups``: (noisy slices, (row, column) spacing in mm) per volume; the same lesions (:func:`plant_lesions`,
    ``per_slice``, ``seed``) in the same slices for both. Passes when the candidate's mean contrast kept is at
    least the baseline's minus ``tolerance_pp`` percentage points; fails when no lesion could be placed (nothing
    is known) or the candidate's output is not finite. Returns the verdict with both means, per-diameter means
    (mm -> %), per-lesion values and the lesions planted.
    """
    planted = [(list(slices), plant_lesions(slices, spacing, per_slice=per_slice, seed=seed))
               for slices, spacing in groups if len(slices)]
    diameters = [f"{lesion.diameter_mm:g}" for _, p in planted for per in p.lesions for lesion in per]
    scores = {}
    for name, denoise in (("baseline", baseline), ("candidate", candidate)):
        kept: list[float] = []
        for slices, lesions in planted:
            result = planted_contrast_kept(denoise, slices, lesions)
            if result.get("non_finite_output"):
                kept = [float("-inf")] * len(diameters)
                break
            kept += result["per_lesion_percent"]
        scores[name] = {
            "mean": float(np.mean(kept)) if kept else None,
            "by_diameter": {d: float(np.mean([v for dv, v in zip(diameters, kept) if dv == d]))
                            for d in sorted(set(diameters), key=float)},
            "per_lesion": kept}
    base, cand = scores["baseline"]["mean"], scores["candidate"]["mean"]
    passed = bool(diameters) and bool(cand >= base - float(tolerance_pp))
    return {"criterion": "contrast kept of synthetic lesions planted in the noisy slices (paired: output with "
                         "minus output without the lesions, over the lesion signal added)",
            "unit": "percent", "lesions": len(diameters), "baseline_percent": base, "candidate_percent": cand,
            "tolerance_pp": float(tolerance_pp), "passed": passed,
            "baseline_by_diameter_mm": scores["baseline"]["by_diameter"],
            "candidate_by_diameter_mm": scores["candidate"]["by_diameter"],
            "baseline_per_lesion": scores["baseline"]["per_lesion"],
            "candidate_per_lesion": scores["candidate"]["per_lesion"],
            "lesions_planted": [p.to_dict() for _, p in planted]}
