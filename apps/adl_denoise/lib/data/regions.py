"""Corrections that say where: regions a clinician marks with a correction, and what fine-tuning makes of them.

A correction (the ``final`` label of an image: the denoised volume as the clinician wants it) may come with a
REGION MAP: a uint8 label map on the image's grid (0 = no region) and a declaration of each value::

    {"regions": [{"value": 1, "name": "lesion 1", "intent": "keep"},
                 {"value": 2, "name": "liver", "intent": "strength", "strength": 0.5}]}

* ``keep``: a structure (lesion, vessel) the denoiser must not blur. The target there is the correction; the
  region becomes the training volume's ``roi`` (lesion-aware ROI L1, :func:`lib.losses.lesion.roi_l1_loss`), and
  the publication gate holds the candidate to it (:mod:`lib.engines.gated_fine_tuning`).
* ``strength`` ``s`` in [0, 2]: local denoising strength. 0 = the original input unchanged, 1 = as corrected,
  2 = smoother than the correction (:func:`regional_target`).

Everything here is plain numpy / SciPy on arrays in the modality's units (CT in HU), shape (Z, H, W) or (H, W);
the server side (where the map and its declaration are stored) is in :mod:`lib.trainers.finetune` and
:mod:`lib.endpoints.guards`.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

__all__ = [
    "INTENTS",
    "MAX_STRENGTH",
    "REGIONS_TAG",
    "SMOOTH_SIGMA_PX",
    "CorrectionRegions",
    "Region",
    "RegionsError",
    "apply_regions",
    "check_region_map",
    "keep_mask",
    "load_correction_regions",
    "parse_regions",
    "regional_target",
    "smooth_in_plane",
]

#: datastore label tag of a correction's region map (the correction itself is the ``final`` label)
REGIONS_TAG = "regions"
#: what a region asks for
INTENTS = ("keep", "strength")
#: the largest local strength: 2 = the correction smoothed once more (see :func:`regional_target`)
MAX_STRENGTH = 2.0
#: in-plane Gaussian of the "smoother than the correction" end of the strength scale, in pixels (why: see
#: :func:`regional_target`)
SMOOTH_SIGMA_PX = 1.0


class RegionsError(ValueError):
    """A region map or its declaration is unusable (the message names the image and what is wrong)."""


@dataclass(frozen=True)
class Region:
    """One declared region: its ``value`` in the map (1..255), a ``name`` for people, its ``intent`` and, for
    ``strength`` regions, the ``strength`` in [0, 2]."""

    value: int
    name: str
    intent: str
    strength: float | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def parse_regions(params: Any, where: str = "regions") -> list[Region]:
    """The declared regions of a ``params`` object (``{"regions": [...]}``, its JSON text, or the list itself).

    Raises:
        RegionsError: not that shape; a value outside 1..255 or declared twice; an unknown intent; a strength
            region without a strength in [0, 2] (or a keep region with one). ``where`` starts the message
            (e.g. ``"image ct_1, regions"``).
    """
    if isinstance(params, (str, bytes)):
        try:
            params = json.loads(params or "{}")
        except ValueError as error:
            raise RegionsError(f"{where}: params is not JSON ({error})") from None
    entries = params.get("regions") if isinstance(params, dict) else params
    if not isinstance(entries, list) or not entries:
        raise RegionsError(f"{where}: params must hold a non-empty list 'regions' of {{value, name, intent[, "
                           f"strength]}}, got {type(entries).__name__ if entries is not None else 'nothing'}")
    regions: list[Region] = []
    seen: set[int] = set()
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise RegionsError(f"{where}: region #{i + 1} must be an object, got {entry!r}")
        value = entry.get("value")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) \
                or not 1 <= int(value) <= 255:
            raise RegionsError(f"{where}: region #{i + 1} has value {value!r}; values are integers 1..255 "
                               "(0 is 'no region')")
        value = int(value)
        if value in seen:
            raise RegionsError(f"{where}: value {value} is declared twice")
        seen.add(value)
        name = str(entry.get("name") or f"region {value}")
        intent = entry.get("intent")
        if intent not in INTENTS:
            raise RegionsError(f"{where}: region {value} ({name}) has intent {intent!r}; known intents: "
                               f"{', '.join(INTENTS)}")
        strength = entry.get("strength")
        if intent == "strength":
            if isinstance(strength, bool) or not isinstance(strength, (int, float)) \
                    or not math.isfinite(float(strength)) or not 0.0 <= float(strength) <= MAX_STRENGTH:
                raise RegionsError(f"{where}: region {value} ({name}) needs a strength in [0, {MAX_STRENGTH:g}] "
                                   f"(0 = the input unchanged, 1 = as corrected, 2 = smoother), got {strength!r}")
            strength = float(strength)
        elif strength is not None:
            raise RegionsError(f"{where}: region {value} ({name}) is a keep region; a strength belongs to "
                               "intent 'strength'")
        regions.append(Region(value, name, str(intent), strength))
    return regions


def check_region_map(region_map: np.ndarray, regions: Sequence[Region], image_shape: Sequence[int],
                     where: str = "regions") -> np.ndarray:
    """The map as uint8 (same shape as the image) after checking it against the image and the declaration.

    Raises:
        RegionsError: another shape than the image's; values that are not integers 0..255; values in the map
            that the declaration does not name.
    """
    array = np.asarray(region_map)
    if tuple(array.shape) != tuple(image_shape):
        raise RegionsError(f"{where}: the region map has shape {tuple(array.shape)} but the image has "
                           f"{tuple(image_shape)}: it must be on the image's grid")
    if not np.all(np.isfinite(array)) or np.any(array < 0) or np.any(array > 255) or np.any(array != np.round(array)):
        raise RegionsError(f"{where}: the region map must hold integers 0..255 (a label map)")
    array = array.astype(np.uint8)
    declared = {r.value for r in regions}
    undeclared = sorted(int(v) for v in np.unique(array) if v and int(v) not in declared)
    if undeclared:
        raise RegionsError(f"{where}: the region map holds value(s) {undeclared} that params does not declare "
                           f"(declared: {sorted(declared)})")
    return array


def smooth_in_plane(volume: np.ndarray, sigma_px: float = SMOOTH_SIGMA_PX) -> np.ndarray:
    """Gaussian smoothing of each (H, W) slice of a (Z, H, W) volume (or of one (H, W) slice), float32.

    In-plane only: the denoisers work slice by slice and slice thickness varies between series, so smoothing
    across slices would mix anatomy the networks never see together."""
    array = np.asarray(volume, dtype=np.float32)
    sigma = (0.0,) * (array.ndim - 2) + (float(sigma_px), float(sigma_px))
    return ndimage.gaussian_filter(array, sigma=sigma, mode="nearest").astype(np.float32)


def regional_target(noisy: np.ndarray, correction: np.ndarray, region_map: np.ndarray,
                    regions: Sequence[Region], sigma_px: float = SMOOTH_SIGMA_PX) -> np.ndarray:
    """The fine-tuning target of a correction with regions (float32, the correction's shape and units).

    * outside any region and inside ``keep`` regions: the correction;
    * inside a ``strength`` region with ``s <= 1``: ``input + s * (correction - input)`` (0 = the input
      unchanged, 1 = the correction);
    * with ``1 < s <= 2``: ``correction + (s - 1) * (smooth(correction) - correction)``, ``smooth`` an in-plane
      Gaussian of ``sigma_px`` (default 1 pixel).

    Why a 1-pixel Gaussian: "smoother than the correction" should take away what remains of the fine-grained
    noise (a sigma of 1 px cuts white noise's standard deviation to about 0.28 of its value) while moving an
    edge by no more than about a pixel; wider kernels would erase the small structures the clinician keeps
    elsewhere, and a pixel is the scale the network sees (millimetres would differ between a 0.5 mm head and a
    0.9 mm abdomen grid without changing what the network must learn). The blend is linear in ``s``, so the
    strength scale is continuous at 1 (both formulas give the correction there).

    Args:
        noisy: the original (input) image; correction: the corrected denoised image; region_map: uint8 label
            map; all the same shape, (Z, H, W) or (H, W).
        regions: the declared regions (:func:`parse_regions`).
    """
    noisy = np.asarray(noisy, dtype=np.float32)
    correction = np.asarray(correction, dtype=np.float32)
    region_map = np.asarray(region_map)
    if not noisy.shape == correction.shape == region_map.shape:
        raise ValueError(f"regional_target: shapes differ: input {noisy.shape}, correction {correction.shape}, "
                         f"regions {region_map.shape}")
    target = correction.copy()
    smoothed = None
    for region in regions:
        if region.intent != "strength":
            continue
        inside = region_map == region.value
        if not inside.any():
            continue
        s = float(region.strength)
        if s <= 1.0:
            target[inside] = noisy[inside] + s * (correction[inside] - noisy[inside])
        else:
            if smoothed is None:
                smoothed = smooth_in_plane(correction, sigma_px)
            target[inside] = correction[inside] + (s - 1.0) * (smoothed[inside] - correction[inside])
    return target


def keep_mask(region_map: np.ndarray, regions: Sequence[Region]) -> np.ndarray:
    """float32 mask (1 inside every ``keep`` region, 0 elsewhere), the shape of ``region_map``: the ``roi`` of
    lesion-aware training."""
    values = [r.value for r in regions if r.intent == "keep"]
    return np.isin(np.asarray(region_map), values).astype(np.float32)


@dataclass
class CorrectionRegions:
    """A correction's validated region map (uint8, the image's array shape, (Z, H, W) for volumes read as 3D
    or (H, W)) and its declared regions."""

    image: str
    region_map: np.ndarray
    regions: list[Region]

    @property
    def keep_regions(self) -> list[Region]:
        return [r for r in self.regions if r.intent == "keep"]

    def describe(self) -> list[dict]:
        """The declaration, with each region's voxel count, for the training record."""
        return [dict(r.to_dict(), voxels=int((self.region_map == r.value).sum())) for r in self.regions]


def load_correction_regions(image_id: str, image_path: str | os.PathLike, regions_path: str | os.PathLike,
                            params: Any, max_voxels: int | None = None) -> CorrectionRegions:
    """Read and validate a region map against its image: same grid (shape, spacing, origin, direction within
    1e-3 mm), values declared, intents known, strengths in [0, 2]. ``max_voxels``: the voxel limit of both reads
    (None: :func:`lib.imaging.max_voxels`).

    Raises:
        RegionsError: naming ``image_id`` and what is wrong (also for an unreadable map).
    """
    from ..imaging import read_volume

    where = f"image {image_id!r}, regions"
    regions = parse_regions(params, where)
    try:
        label = read_volume(Path(regions_path), modality="OT", fill_padding=False, max_voxels=max_voxels)
    except Exception as error:  # noqa: BLE001 - any unreadable file is the same complaint
        raise RegionsError(f"{where}: cannot read the region map {Path(regions_path).name}: {error}") from None
    image = read_volume(Path(image_path), max_voxels=max_voxels)
    if not image.same_grid(label, tol=1e-3):
        raise RegionsError(f"{where}: the region map is not on the image's grid (map: shape {label.shape}, spacing "
                           f"{_rounded(label.spacing)}, origin {_rounded(label.origin)}; image: shape {image.shape}, "
                           f"spacing {_rounded(image.spacing)}, origin {_rounded(image.origin)}); save it on the "
                           "image's grid")
    region_map = check_region_map(label.array, regions, image.shape, where)
    return CorrectionRegions(str(image_id), region_map, regions)


def _rounded(values: Sequence[float]) -> list[float]:
    return [round(float(v), 3) for v in values]


def apply_regions(volume, regions: CorrectionRegions, sigma_px: float = SMOOTH_SIGMA_PX) -> None:
    """Make a correction's :class:`lib.data.sources.TrainingVolume` (``noisy`` = the input, ``clean`` = the
    correction, (Z, H, W)) learn its regions, in place: ``clean`` becomes :func:`regional_target`, ``roi`` the
    :func:`keep_mask` (None when there is no keep region), and the intensity scaling follows the new target."""
    from .intensity import intensity_scaling_for

    if volume.noisy is None:
        raise ValueError(f"{volume.name}: regions need the paired input image")
    region_map = regions.region_map.reshape(volume.clean.shape)
    volume.clean = regional_target(volume.noisy, volume.clean, region_map, regions.regions, sigma_px)
    mask = keep_mask(region_map, regions.regions)
    volume.roi = mask if mask.any() else None
    volume.scaling = intensity_scaling_for(volume.clean, volume.modality)
