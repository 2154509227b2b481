"""Synthetic low-contrast lesions: smooth-edged spheres placed in uniform soft tissue of a clean image.

The lesion model is the one of CT detectability studies (e.g. the low-contrast inserts of ACR / Catphan
phantoms and the lesion-insertion studies behind model observers): a sphere of diameter ``d`` whose edge
falls off over ``edge_mm`` (a logistic profile, so no ringing after resampling or reconstruction), with a
constant contrast ``c`` inside. CT contrast is in HU (hypodense liver-lesion-like -5..-30, hyperdense
+10..+40); MR contrast is relative to the local tissue intensity (a Gd-enhancing blob of +10..+40 %; training also uses
hypointense ones, -40..-10 %: :func:`training_contrast_ranges`).

Lesions are inserted into the CLEAN image before any noise is simulated: for CT, the low-dose simulator then
projects the lesion with the anatomy (:func:`lib.noise.simulate_low_dose_ct` works in the sinogram domain), so
the noise around a lesion is the noise its attenuation produces. Simulating the same slice with and without
lesions from the same seed gives lesion-present / lesion-absent images with the same noise realisation, which
is what a paired observer study needs.

Arrays are (H, W) slices or (Z, H, W) volumes; positions are in pixels, (y, x) or (z, y, x); spacings in mm
in the same order.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage

__all__ = [
    "CT_HYPODENSE_HU",
    "CT_HYPERDENSE_HU",
    "MR_ENHANCING_FRACTION",
    "MR_HYPOINTENSE_FRACTION",
    "Lesion",
    "lesion_profile",
    "lesion_sites",
    "site_candidates",
    "pick_sites",
    "insert_lesions",
    "lesion_mask",
    "random_lesions",
    "training_contrast_ranges",
]

#: Contrast ranges of the synthetic lesions: CT in HU, MR as a fraction of the local tissue intensity.
CT_HYPODENSE_HU: tuple[float, float] = (-30.0, -5.0)
CT_HYPERDENSE_HU: tuple[float, float] = (10.0, 40.0)
MR_ENHANCING_FRACTION: tuple[float, float] = (0.10, 0.40)
#: MR lesions darker than their tissue (T1-hypointense: necrotic cores, cysts, chronic lesions), same fraction.
MR_HYPOINTENSE_FRACTION: tuple[float, float] = (-0.40, -0.10)
#: Soft tissue where CT lesions may sit (liver ~50-70 HU, kidney cortex, spleen, muscle), HU of the clean image.
CT_SITE_HU: tuple[float, float] = (0.0, 120.0)


@dataclass(frozen=True)
class Lesion:
    """One synthetic lesion.

    Attributes:
        centre: position in pixels, (y, x) in a slice or (z, y, x) in a volume.
        diameter_mm: sphere diameter in mm.
        contrast: CT: HU added inside the lesion; MR: fraction of the local tissue intensity added.
        edge_mm: width in mm over which the logistic edge rises from 10 % to 90 %.
    """

    centre: tuple[float, ...]
    diameter_mm: float
    contrast: float
    edge_mm: float = 0.5

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> "Lesion":
        return cls(centre=tuple(float(c) for c in data["centre"]), diameter_mm=float(data["diameter_mm"]),
                   contrast=float(data["contrast"]), edge_mm=float(data.get("edge_mm", 0.5)))


def _spacing(spacing_mm: float | Sequence[float], ndim: int) -> tuple[float, ...]:
    if isinstance(spacing_mm, (int, float, np.integer, np.floating)):
        values = (float(spacing_mm),) * ndim
    else:
        values = tuple(float(s) for s in spacing_mm)[-ndim:]
    if len(values) != ndim or not all(math.isfinite(s) and s > 0 for s in values):
        raise ValueError(f"spacing must be {ndim} finite values > 0 mm, got {spacing_mm!r}")
    return values


def lesion_profile(shape: Sequence[int], lesion: Lesion, spacing_mm: float | Sequence[float]) -> np.ndarray:
    """The lesion's shape on the image grid: 1 inside, 0 outside, a logistic edge (float32, ``shape``).

    A 2D ``shape`` with a 3-element centre uses only (y, x); a 3D shape with a 2-element centre is not allowed.
    """
    ndim = len(shape)
    if ndim not in (2, 3):
        raise ValueError(f"shape must be 2D or 3D, got {tuple(shape)}")
    centre = tuple(lesion.centre)[-ndim:]
    if len(centre) != ndim:
        raise ValueError(f"a {ndim}D image needs a {ndim}D lesion centre, got {lesion.centre}")
    spacing = _spacing(spacing_mm, ndim)
    radius = lesion.diameter_mm / 2.0
    reach = radius + 4.0 * lesion.edge_mm  # where the profile is below 2e-4: nothing to add beyond
    lo = [max(0, int(math.floor(c - reach / s))) for c, s in zip(centre, spacing)]
    hi = [min(n, int(math.ceil(c + reach / s)) + 1) for c, n, s in zip(centre, shape, spacing)]
    out = np.zeros(tuple(shape), dtype=np.float32)
    if any(h <= l for l, h in zip(lo, hi)):
        return out
    grids = np.meshgrid(*[(np.arange(l, h) - c) * s for l, h, c, s in zip(lo, hi, centre, spacing)], indexing="ij")
    distance = np.sqrt(sum(g * g for g in grids))
    edge = max(float(lesion.edge_mm), 1e-3) / (2.0 * math.log(9.0))  # logistic scale: 10-90 % over edge_mm
    out[tuple(slice(l, h) for l, h in zip(lo, hi))] = 1.0 / (1.0 + np.exp((distance - radius) / edge))
    return out


def lesion_mask(shape: Sequence[int], lesions: Sequence[Lesion], spacing_mm: float | Sequence[float]) -> np.ndarray:
    """Union of the lesions' profiles (float32 in [0, 1], ``shape``): the ROI of lesion-aware losses."""
    mask = np.zeros(tuple(shape), dtype=np.float32)
    for lesion in lesions:
        np.maximum(mask, lesion_profile(shape, lesion, spacing_mm), out=mask)
    return mask


def insert_lesions(image: np.ndarray, lesions: Sequence[Lesion], spacing_mm: float | Sequence[float],
                   modality: str = "CT") -> np.ndarray:
    """``image`` with the lesions added (float32 copy; the input is not modified).

    CT: ``image + contrast * profile`` (HU). MR: ``image * (1 + contrast * profile)``, i.e. relative to the local
    intensity, as contrast uptake scales with the tissue's signal.
    """
    arr = np.asarray(image, dtype=np.float32)
    if arr.ndim not in (2, 3) or arr.size == 0:
        raise ValueError(f"image must be a non-empty 2D or 3D array, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("image contains NaN or infinite values")
    out = arr.copy()
    modality = modality.upper()
    for lesion in lesions:
        profile = lesion_profile(arr.shape, lesion, spacing_mm)
        if modality == "CT":
            out += lesion.contrast * profile
        elif modality == "MR":
            out *= 1.0 + lesion.contrast * profile
        else:
            raise ValueError(f"modality must be CT or MR, got {modality!r}")
    return out


def lesion_sites(
    image: np.ndarray,
    spacing_mm: float | Sequence[float],
    diameter_mm: float,
    count: int,
    rng: np.random.Generator,
    *,
    modality: str = "CT",
    intensity_range: tuple[float, float] | None = None,
    max_local_std: float | None = None,
    min_separation_mm: float | None = None,
    avoid: Sequence[tuple[float, ...]] = (),
) -> list[tuple[int, int]]:
    """Up to ``count`` (y, x) centres in a (H, W) clean slice where a lesion of ``diameter_mm`` sits in uniform tissue.

    A site qualifies when the whole disc of twice the lesion's diameter lies in tissue of ``intensity_range``
    (CT default :data:`CT_SITE_HU`, soft tissue such as liver, kidney, spleen and muscle; MR default 30-95 % of
    the slice's robust maximum), and the local standard deviation over that disc is at most ``max_local_std``
    (CT default 25 HU; MR 15 % of the robust maximum), so lesions are not put on vessels, edges or bowel gas.
    Centres are drawn at random among qualifying pixels, at least ``min_separation_mm`` (default 3 diameters,
    at least 15 mm) from each other and from ``avoid``. Fewer are returned when the slice has no room.
    :func:`site_candidates` then :func:`pick_sites` (callers placing several lesions in one slice keep the first's
    result: it is most of the cost).
    """
    hu = np.asarray(image, dtype=np.float32)
    if hu.ndim != 2:
        raise ValueError(f"lesion_sites expects a 2D slice, got shape {hu.shape}")
    if count < 1:
        return []
    candidates = site_candidates(hu, spacing_mm, diameter_mm, modality=modality, intensity_range=intensity_range,
                                 max_local_std=max_local_std)
    return pick_sites(candidates, spacing_mm, diameter_mm, count, rng, min_separation_mm=min_separation_mm,
                      avoid=avoid)


def site_candidates(
    image: np.ndarray,
    spacing_mm: float | Sequence[float],
    diameter_mm: float,
    *,
    modality: str = "CT",
    intensity_range: tuple[float, float] | None = None,
    max_local_std: float | None = None,
) -> np.ndarray:
    """The (N, 2) (y, x) pixels of a (H, W) clean slice where a lesion of ``diameter_mm`` qualifies as a site of
    :func:`lesion_sites` (row-major order), before any separation from other lesions."""
    hu = np.asarray(image, dtype=np.float32)
    if hu.ndim != 2:
        raise ValueError(f"lesion_sites expects a 2D slice, got shape {hu.shape}")
    dy, dx = _spacing(spacing_mm, 2)
    modality = modality.upper()
    if modality == "CT":
        lo, hi = intensity_range or CT_SITE_HU
        max_std = 25.0 if max_local_std is None else float(max_local_std)
    elif modality == "MR":
        peak = float(np.percentile(hu, 99.5)) or 1.0
        lo, hi = intensity_range or (0.30 * peak, 0.95 * peak)
        max_std = 0.15 * peak if max_local_std is None else float(max_local_std)
    else:
        raise ValueError(f"modality must be CT or MR, got {modality!r}")
    # disc of twice the diameter: the lesion and a ring of background around it (what an observer compares)
    ry, rx = max(1, int(round(diameter_mm / dy))), max(1, int(round(diameter_mm / dx)))
    yy, xx = np.mgrid[-ry:ry + 1, -rx:rx + 1]
    footprint = (yy / ry) ** 2 + (xx / rx) ** 2 <= 1.0
    inside = (hu >= lo) & (hu <= hi)
    inside = ndimage.binary_erosion(inside, structure=footprint, border_value=0)
    smooth = ndimage.uniform_filter(hu, size=(2 * ry + 1, 2 * rx + 1), mode="nearest")
    smooth_sq = ndimage.uniform_filter(hu * hu, size=(2 * ry + 1, 2 * rx + 1), mode="nearest")
    local_std = np.sqrt(np.maximum(smooth_sq - smooth * smooth, 0.0))
    return np.argwhere(inside & (local_std <= max_std))


def pick_sites(
    candidates: np.ndarray,
    spacing_mm: float | Sequence[float],
    diameter_mm: float,
    count: int,
    rng: np.random.Generator,
    *,
    min_separation_mm: float | None = None,
    avoid: Sequence[tuple[float, ...]] = (),
) -> list[tuple[int, int]]:
    """Up to ``count`` of ``candidates`` (:func:`site_candidates`) drawn at random, at least ``min_separation_mm``
    (default 3 diameters, at least 15 mm) from each other and from ``avoid``; fewer when there is no room."""
    if count < 1 or len(candidates) == 0:
        return []
    dy, dx = _spacing(spacing_mm, 2)
    separation = float(min_separation_mm) if min_separation_mm is not None else max(15.0, 3.0 * diameter_mm)
    chosen: list[tuple[int, int]] = []
    taken = [tuple(float(v) for v in p[-2:]) for p in avoid]
    for idx in rng.permutation(len(candidates)):
        y, x = (int(v) for v in candidates[idx])
        if all(math.hypot((y - ty) * dy, (x - tx) * dx) >= separation for ty, tx in taken):
            chosen.append((y, x))
            taken.append((float(y), float(x)))
            if len(chosen) == count:
                break
    return chosen


def training_contrast_ranges(modality: str) -> list[tuple[float, float]]:
    """The contrast ranges of lesion-aware training data: darker and brighter lesions for both modalities (CT in
    HU, MR as a fraction of the local tissue). Both signs matter: a lesion loss on brighter lesions only teaches
    the network that bright blobs are likely, and it brightens uniform tissue (bench/README.md, "Lesion-aware
    ADL MR")."""
    if modality.upper() == "CT":
        return [CT_HYPODENSE_HU, CT_HYPERDENSE_HU]
    if modality.upper() == "MR":
        return [MR_HYPOINTENSE_FRACTION, MR_ENHANCING_FRACTION]
    raise ValueError(f"modality must be CT or MR, got {modality!r}")


def random_lesions(
    image: np.ndarray,
    spacing_mm: float | Sequence[float],
    rng: np.random.Generator,
    *,
    modality: str = "CT",
    count: int = 4,
    diameters_mm: tuple[float, float] = (3.0, 10.0),
    contrast_ranges: Sequence[tuple[float, float]] | None = None,
) -> list[Lesion]:
    """Random lesions for one (H, W) clean slice: diameters uniform in ``diameters_mm``, contrasts from
    ``contrast_ranges`` (one range drawn per lesion; CT default hypo- and hyperdense, MR enhancing), placed by
    :func:`lesion_sites`. Used to make lesion-aware training data; may return fewer than ``count`` lesions.
    """
    if contrast_ranges is None:
        contrast_ranges = [CT_HYPODENSE_HU, CT_HYPERDENSE_HU] if modality.upper() == "CT" else [MR_ENHANCING_FRACTION]
    lesions: list[Lesion] = []
    for _ in range(int(count)):
        diameter = float(rng.uniform(*diameters_mm))
        sites = lesion_sites(image, spacing_mm, diameter, 1, rng, modality=modality,
                             avoid=[lesion.centre for lesion in lesions])
        if not sites:
            continue
        low, high = contrast_ranges[int(rng.integers(len(contrast_ranges)))]
        lesions.append(Lesion(centre=tuple(float(c) for c in sites[0]), diameter_mm=diameter,
                              contrast=float(rng.uniform(low, high))))
    return lesions
