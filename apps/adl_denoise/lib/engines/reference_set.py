"""A fixed reference set that no correction can move, and the publication check that holds a candidate to it.

Fine-tuning validates on held-out corrections, but a handful of corrections are a tiny, biased sample: two toy
corrections once published a CT model that served every patient worse (issue 18). So a candidate must also be
no worse than the served model on images the corrections cannot touch, built deterministically from code:

* a numerical abdomen-like phantom (:func:`phantom_slices`): 3 slices of 256 x 256 pixels of 1.5 mm (body
  outline, fat layer, muscle, liver, spleen, kidneys, aorta, spine, bowel gas), piecewise constant with
  half-pixel-smooth edges, organ sizes changing from slice to slice;
* fixed-seed synthetic low-contrast lesions (:func:`lib.lesions.random_lesions`, 5-10 mm, darker and brighter
  than their tissue as in lesion-aware training, :func:`lib.lesions.training_contrast_ranges`: CT -30..-5 HU and
  +10..+40 HU, MR -40..-10 % and +10..+40 %) in its soft tissue: a candidate that erases one kind is caught;
* the modality's simulated noise with a fixed seed: CT the benchmark's quarter-dose sinogram-domain protocol
  (:func:`lib.noise.quarter_dose_settings`), MR Rician noise of 5 % of the maximum. Each slice is made with and
  without its lesions from the SAME noise seed (the paired design of :mod:`lib.evaluation.detectability`), so a
  denoiser's response to the lesions alone is ``out(present) - out(absent)``.

:func:`reference_check` scores served and candidate weights on it, each as served (the network and its file's
restoration width): PSNR (dB, in the modality's window, mean over the lesion-present slices) and the lesions'
contrast kept (:func:`lib.evaluation.detectability.contrast_kept`, mean over lesions, in %), and rejects a
candidate that loses more than :data:`PSNR_TOLERANCE_DB` (0.1 dB) or more than :data:`CONTRAST_TOLERANCE_PP` (2
percentage points) against the served model. The set takes seconds to simulate (CT), so it is cached as ``.npz``
under the model folder, keyed by a hash of everything that defines it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

log = logging.getLogger(__name__)

__all__ = ["CONTRAST_TOLERANCE_PP", "PSNR_TOLERANCE_DB", "ReferenceSet", "build_reference_set", "phantom_slices",
           "reference_check", "score_on_reference"]

#: a candidate may lose at most this much PSNR (dB) on the reference set against the served model
PSNR_TOLERANCE_DB = 0.1
#: ... and at most this many percentage points of the reference lesions' contrast kept
CONTRAST_TOLERANCE_PP = 2.0
#: bump when anything below changes what the set holds (invalidates caches)
REFERENCE_VERSION = 2  # 2: MR lesions of both signs (1: enhancing only)
PIXEL_MM = 1.5
SHAPE = (256, 256)
SLICES = 3
LESIONS_PER_SLICE = 4
LESION_DIAMETERS_MM = (5.0, 10.0)
SEED = 20240618
MR_RICIAN_PERCENT = 5.0

# tissue values: CT in HU; MR in arbitrary units (a T1-weighted-like ordering: fat bright, fluid-filled kidney
# medium, cortical bone and air dark)
_TISSUES = {
    "air": (-1000.0, 0.0), "fat": (-100.0, 900.0), "muscle": (45.0, 350.0), "soft": (35.0, 420.0),
    "liver": (60.0, 400.0), "spleen": (50.0, 480.0), "kidney": (30.0, 550.0), "aorta": (160.0, 250.0),
    "bone": (700.0, 60.0), "marrow": (220.0, 600.0), "gas": (-900.0, 10.0),
}


@dataclass
class ReferenceSet:
    """The reference images of one modality, all (S, H, W) float32 in the modality's units (CT in HU).

    ``clean_present`` / ``clean_absent``: phantom slices with / without the lesions; ``noisy_present`` /
    ``noisy_absent``: the same with the same noise realisation; ``lesions``: per slice, the lesions' dicts
    (:meth:`lib.lesions.Lesion.to_dict`, centres (y, x) in pixels); ``pixel_mm``: in-plane pixel size.
    """

    modality: str
    clean_present: np.ndarray
    clean_absent: np.ndarray
    noisy_present: np.ndarray
    noisy_absent: np.ndarray
    lesions: list[list[dict]]
    pixel_mm: float
    key: str

    @property
    def n_lesions(self) -> int:
        return sum(len(s) for s in self.lesions)


def _ellipse(shape: tuple[int, int], cy: float, cx: float, ry: float, rx: float, angle_deg: float = 0.0) -> np.ndarray:
    yy, xx = np.mgrid[:shape[0], :shape[1]].astype(np.float64)
    a = np.deg2rad(angle_deg)
    y, x = yy - cy, xx - cx
    u, v = x * np.cos(a) + y * np.sin(a), -x * np.sin(a) + y * np.cos(a)
    return (u / rx) ** 2 + (v / ry) ** 2 <= 1.0


def phantom_slices(modality: str) -> np.ndarray:
    """The lesion-free phantom, (3, 256, 256) float32 in the modality's units (pixel :data:`PIXEL_MM` mm).

    Each slice is drawn as tissue labels (later ellipses over earlier ones), mapped to the tissue values above,
    then smoothed by a 0.5-pixel Gaussian so edges are not aliased for the CT projector."""
    column = 0 if modality.upper() == "CT" else 1
    if modality.upper() not in ("CT", "MR"):
        raise ValueError(f"modality must be CT or MR, got {modality!r}")
    out = np.empty((SLICES, *SHAPE), dtype=np.float32)
    for s in range(SLICES):
        grow = 1.0 + 0.08 * (s - 1)  # organs change size from slice to slice
        image = np.full(SHAPE, _TISSUES["air"][column], dtype=np.float64)
        layers = [
            ("fat", _ellipse(SHAPE, 128, 128, 88, 112)),
            ("muscle", _ellipse(SHAPE, 128, 128, 80, 104)),
            ("soft", _ellipse(SHAPE, 128, 128, 74, 98)),
            ("liver", _ellipse(SHAPE, 110, 88, 46 * grow, 52 * grow, angle_deg=-20)),
            ("spleen", _ellipse(SHAPE, 100, 182, 22 * grow, 16 * grow, angle_deg=30)),
            ("kidney", _ellipse(SHAPE, 160, 84, 17, 11 * grow, angle_deg=15)),
            ("kidney", _ellipse(SHAPE, 160, 172, 17, 11 * grow, angle_deg=-15)),
            ("aorta", _ellipse(SHAPE, 150, 138, 8, 8)),
            ("bone", _ellipse(SHAPE, 182, 128, 16, 17)),
            ("marrow", _ellipse(SHAPE, 182, 128, 10, 11)),
            ("gas", _ellipse(SHAPE, 120 + 6 * s, 150, 6, 9)),
        ]
        for tissue, mask in layers:
            image[mask] = _TISSUES[tissue][column]
        out[s] = ndimage.gaussian_filter(image, 0.5, mode="nearest")
    return out


def _definition(modality: str) -> dict:
    from ..lesions import training_contrast_ranges

    return {"version": REFERENCE_VERSION, "modality": modality, "pixel_mm": PIXEL_MM, "shape": list(SHAPE),
            "slices": SLICES, "lesions_per_slice": LESIONS_PER_SLICE, "diameters_mm": list(LESION_DIAMETERS_MM),
            "seed": SEED, "noise": "quarter-dose sinogram" if modality == "CT" else f"rician {MR_RICIAN_PERCENT}%",
            "contrast_ranges": [list(r) for r in training_contrast_ranges(modality)]}


def build_reference_set(modality: str, cache_dir: str | os.PathLike | None = None) -> ReferenceSet:
    """The reference set of ``modality`` ("CT" or "MR"): read from ``cache_dir`` when a file of the same
    definition is there, else simulated (CT: a few seconds per slice on a CPU) and cached there."""
    from ..lesions import insert_lesions, random_lesions, training_contrast_ranges
    from ..noise import add_rician_noise, quarter_dose_settings, simulate_low_dose_ct

    modality = modality.upper()
    definition = _definition(modality)
    key = hashlib.sha1(json.dumps(definition, sort_keys=True).encode()).hexdigest()[:16]
    cache = None if cache_dir is None else Path(cache_dir) / f"reference_{modality.lower()}_{key}.npz"
    if cache is not None and cache.is_file():
        try:
            with np.load(cache, allow_pickle=False) as data:
                return ReferenceSet(modality, data["clean_present"], data["clean_absent"], data["noisy_present"],
                                    data["noisy_absent"], json.loads(str(data["lesions"])), PIXEL_MM, key)
        except (OSError, ValueError, KeyError):
            log.warning("unreadable reference-set cache %s: building it again", cache)
    absent = phantom_slices(modality)
    present = np.empty_like(absent)
    lesions: list[list[dict]] = []
    for s in range(SLICES):
        rng = np.random.default_rng([SEED, s])
        drawn = random_lesions(absent[s], PIXEL_MM, rng, modality=modality, count=LESIONS_PER_SLICE,
                               diameters_mm=LESION_DIAMETERS_MM, contrast_ranges=training_contrast_ranges(modality))
        if not drawn:
            raise RuntimeError(f"reference phantom slice {s} has no room for lesions (a bug in the phantom)")
        present[s] = insert_lesions(absent[s], drawn, PIXEL_MM, modality)
        lesions.append([lesion.to_dict() for lesion in drawn])
    if modality == "CT":
        settings = quarter_dose_settings()
        noisy_present = np.stack([simulate_low_dose_ct(present[s], PIXEL_MM, settings, seed=[SEED, s, 1])
                                  for s in range(SLICES)])
        noisy_absent = np.stack([simulate_low_dose_ct(absent[s], PIXEL_MM, settings, seed=[SEED, s, 1])
                                 for s in range(SLICES)])
    else:
        top = float(absent.max())
        noisy_present = np.stack([add_rician_noise(present[s], MR_RICIAN_PERCENT, seed=[SEED, s, 1], reference_max=top)
                                  for s in range(SLICES)])
        noisy_absent = np.stack([add_rician_noise(absent[s], MR_RICIAN_PERCENT, seed=[SEED, s, 1], reference_max=top)
                                 for s in range(SLICES)])
    reference = ReferenceSet(modality, present.astype(np.float32), absent.astype(np.float32),
                             noisy_present.astype(np.float32), noisy_absent.astype(np.float32), lesions, PIXEL_MM, key)
    if cache is not None:
        from ..runtime.atomic import atomic_write

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as handle:
                np.savez_compressed(handle, clean_present=reference.clean_present, clean_absent=reference.clean_absent,
                                    noisy_present=reference.noisy_present, noisy_absent=reference.noisy_absent,
                                    lesions=np.array(json.dumps(lesions)))

        atomic_write(cache, write)
    return reference


def score_on_reference(weights: Any, reference: ReferenceSet, device: str = "cpu") -> dict:
    """PSNR and lesion contrast kept of a denoiser (a weight file or :class:`lib.predict.LoadedDenoiser`) as it
    is served: the network and its file's restoration width (:func:`lib.predict.denoise_as_served`).

    Every slice is denoised alone as a 2D image (the phantom's slices are not neighbours), in float32 (no mixed
    precision: bfloat16 rounding alone moves CT values by a few HU, more than the tolerances allow).
    Returns ``{"psnr": dB, "contrast_kept_percent": %, "psnr_input": dB, "lesions": n}``.
    """
    from ..evaluation import psnr, window_for
    from ..evaluation.detectability import contrast_kept
    from ..lesions import Lesion, lesion_profile
    from ..predict import LoadedDenoiser, denoise_as_served, load_denoiser

    loaded = weights if isinstance(weights, LoadedDenoiser) else load_denoiser(weights, device=device)
    psnrs, inputs, kept = [], [], []
    for s in range(reference.clean_present.shape[0]):
        clean_p, clean_a = reference.clean_present[s], reference.clean_absent[s]
        out_p = denoise_as_served(loaded, reference.noisy_present[s], reference.modality, device=device, amp=False)
        out_a = denoise_as_served(loaded, reference.noisy_absent[s], reference.modality, device=device, amp=False)
        window = window_for(reference.modality, clean_p)
        if not (np.isfinite(out_p).all() and np.isfinite(out_a).all()):
            return {"psnr": float("-inf"), "contrast_kept_percent": float("-inf"), "non_finite_output": True}
        psnrs.append(psnr(out_p, clean_p, window=window))
        inputs.append(psnr(reference.noisy_present[s], clean_p, window=window))
        for entry in reference.lesions[s]:
            profile = lesion_profile(clean_p.shape, Lesion.from_dict(entry), reference.pixel_mm)
            kept.append(contrast_kept(out_p, out_a, profile, clean_p, clean_a))
    return {"psnr": float(np.mean(psnrs)), "psnr_input": float(np.mean(inputs)),
            "contrast_kept_percent": float(100.0 * np.mean(kept)), "lesions": len(kept)}


def reference_check(served: Any, candidate: Any, reference: ReferenceSet, device: str = "cpu",
                    psnr_tolerance_db: float = PSNR_TOLERANCE_DB,
                    contrast_tolerance_pp: float = CONTRAST_TOLERANCE_PP) -> dict:
    """The candidate against the served weights on the reference set.

    Passes when ``candidate_psnr >= served_psnr - psnr_tolerance_db`` AND ``candidate_contrast_kept >=
    served_contrast_kept - contrast_tolerance_pp``. Returns ``{"check": "reference_set", "passed", "failed": [which
    of "psnr" / "contrast_kept"], "served": {...}, "candidate": {...}, tolerances, "reference": key}``.
    """
    base = score_on_reference(served, reference, device)
    cand = score_on_reference(candidate, reference, device)
    failed = []
    if not cand["psnr"] >= base["psnr"] - psnr_tolerance_db:
        failed.append("psnr")
    if not cand["contrast_kept_percent"] >= base["contrast_kept_percent"] - contrast_tolerance_pp:
        failed.append("contrast_kept")
    return {"check": "reference_set", "passed": not failed, "failed": failed, "served": _finite(base),
            "candidate": _finite(cand), "psnr_tolerance_db": psnr_tolerance_db,
            "contrast_tolerance_pp": contrast_tolerance_pp, "modality": reference.modality,
            "reference": f"phantom v{REFERENCE_VERSION} ({reference.key}): {reference.clean_present.shape[0]} slices, "
                         f"{reference.n_lesions} lesions"}


def _finite(score: dict) -> dict:
    """JSON has no infinities: a diverged model's scores are reported as None."""
    return {k: (None if isinstance(v, float) and not np.isfinite(v) else
                (round(v, 4) if isinstance(v, float) else v)) for k, v in score.items()}
