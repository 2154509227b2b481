"""Intensity normalisation per modality, undone exactly on the way out.

Networks work on [0, 1] (ADL's heads end in a sigmoid). CT maps a fixed HU range, so a value means the
same tissue in every scan and the output returns to HU; MR has no absolute scale, so each volume is
scaled from a robust low (a low percentile, at most 0) to a robust upper percentile of its own values, with
headroom so bright structures are not squeezed by the sigmoid. Values outside [offset, offset + scale] are clipped
on the way in; :func:`lib.predict.denoise_array` adds the part above the top back at its own voxels on the way out
(metal above 3072 HU, an MR vessel above twice the 99.5th percentile), so no bright structure is capped.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

CT_RANGE_HU = (-1024.0, 3072.0)
MR_PERCENTILE = 99.5
# the percentile maps to 1 / MR_HEADROOM, leaving room for brighter voxels: at 1.5 gadolinium-enhanced vessels
# (often > 1.5x the 99.5th percentile of a brain) were squeezed against the sigmoid's ceiling and came out dimmed;
# what lies above 2x still reaches the network clipped, and lib.predict adds that excess back after it
MR_HEADROOM = 2.0
# the low end of an MR's scale: its minimum moved the whole image's scale, so that one stray negative voxel (a
# resampling's ringing reaches -47 on a 0-700 abdomen) changed the denoising of every voxel (by up to 30 of 255)
MR_LOW_PERCENTILE = 0.1


@dataclass(frozen=True)
class IntensityScaling:
    """value_normalised = (value - offset) / scale, clipped to [0, 1]."""

    modality: str
    offset: float
    scale: float

    def normalise(self, image: np.ndarray) -> np.ndarray:
        return np.clip((np.asarray(image, np.float32) - self.offset) / self.scale, 0.0, 1.0).astype(np.float32)

    def denormalise(self, image: np.ndarray) -> np.ndarray:
        return (np.asarray(image, np.float32) * self.scale + self.offset).astype(np.float32)

    def to_dict(self) -> dict:
        return asdict(self)


def intensity_scaling_for(image: np.ndarray, modality: str) -> IntensityScaling:
    """The scaling to use for `image` (any shape) of `modality` ("CT" in HU, "MR", or "OT" like MR)."""
    modality = modality.upper()
    if modality == "CT":
        low, high = CT_RANGE_HU
        return IntensityScaling("CT", low, high - low)
    values = np.asarray(image, np.float32)
    if not np.isfinite(values).all():
        raise ValueError("image contains NaN or infinite values")
    low, high = (float(v) for v in np.percentile(values, [MR_LOW_PERCENTILE, MR_PERCENTILE]))  # one partition pass
    low = min(low, 0.0)  # 0 for magnitude images (the usual case)
    if high <= low:
        high = float(values.max())
    if high <= low:
        raise ValueError("image is constant: cannot derive an intensity scale")
    return IntensityScaling(modality, low, (high - low) * MR_HEADROOM)
