"""Whether a volume loaded from DICOM still holds the voxels of the files it was loaded from.

A DICOM volume edited in place (Segment Editor's "Mask volume", a filter writing into the same node) keeps the
series' UIDs. :meth:`ReviewSession.as_loaded` tells such an edit by comparing the node's voxels with a reference;
taking as reference the voxels seen when the module first identified the volume misses an edit made before that
(the edited voxels become the reference, and the series' result and server copy are used for them). The reference
here is the series' files on disk instead: the stored pixel values of every file, mapped through the series'
rescale (slope, intercept), as a multiset (a count per stored value). Slicer's DICOM readers may reverse the slice
order (a left-handed series) and order slices by position, so only the multiset, not the order, is compared; any
edit that changes a voxel's value changes it. Slicer-free (pydicom, which Slicer ships, and numpy): the module
finds the files in Slicer's DICOM database (the SOP Instance UIDs on the volume's subject-hierarchy item).

Not compared: the geometry (the node's IJK-to-RAS), which the content identity covers from the first
identification on. Files this cannot read the same way as Slicer (compressed without a decoder, one rescale per
file or per frame, enhanced multi-frame, MONOCHROME1, colour, 32-bit or float pixels) give no reference (None):
the first voxels seen stay the reference then, as before.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

__all__ = ["SeriesValues", "read_series_values"]

#: stored values are 8- or 16-bit, signed or not: -32768 .. 65535, counted at index value + _OFFSET
_OFFSET = 32768
_BINS = 65536 + _OFFSET


@dataclass(frozen=True)
class SeriesValues:
    """The voxel values of a series' files: ``counts[v + 32768]`` voxels hold the stored value ``v``, shown as
    ``slope * v + intercept`` (what Slicer's reader gives, in HU for CT)."""

    slope: float
    intercept: float
    voxels: int
    counts: np.ndarray = field(repr=False, compare=False)

    def matches(self, voxels: np.ndarray) -> bool:
        """Whether ``voxels`` (a volume's array, any order of its voxels) holds exactly these values: as many
        voxels, each ``slope * v + intercept`` for a stored value ``v`` (to the precision of the array's float type),
        as many times each. Streams the array one slice at a time (no full-size copy)."""
        voxels = np.asarray(voxels)
        if voxels.size != self.voxels or voxels.dtype.kind not in "iuf":
            return False
        counts = np.zeros(_BINS, np.int64)
        planes = voxels.reshape(-1, *voxels.shape[-2:]) if voxels.ndim >= 2 else voxels.reshape(1, -1)
        # slope 1 and a whole intercept (CT in HU): every voxel is a whole number, its stored value the voxel minus
        # the intercept, exactly (also in a float array: whole numbers up to 2**24 are exact in float32)
        whole = self.slope == 1.0 and float(self.intercept).is_integer()
        for plane in planes:
            if whole:
                if voxels.dtype.kind == "f" and not np.array_equal(np.rint(plane), plane):
                    return False  # a fraction (or NaN): no stored value gives it
                stored = plane.astype(np.int64) - int(self.intercept)
            else:
                values = plane.astype(np.float64)
                stored_f = np.rint((values - self.intercept) / self.slope)
                # float voxels were rounded to their type when read: allow that, relative to the value
                eps = np.finfo(voxels.dtype).eps if voxels.dtype.kind == "f" else 0.0
                tolerance = 8 * eps * np.maximum(np.abs(values), 1.0) + 1e-9
                if not np.all(np.abs(stored_f * self.slope + self.intercept - values) <= tolerance):
                    return False  # a value no stored value gives: written by something else than the reader
                stored = stored_f.astype(np.int64)
            if stored.size and (stored.min() < -_OFFSET or stored.max() >= _BINS - _OFFSET):
                return False
            counts += np.bincount((stored + _OFFSET).ravel(), minlength=_BINS)
        return bool(np.array_equal(counts, self.counts))


def read_series_values(paths: Sequence[str | os.PathLike]) -> SeriesValues | None:
    """The :class:`SeriesValues` of the DICOM files ``paths`` (one volume's files), or None when they cannot be
    read as Slicer's scalar volume reader reads them: a file missing or unreadable, pixel data pydicom cannot
    decode here, files with different rescales, an enhanced multi-frame object (rescale per frame), MONOCHROME1 or
    colour images, pixels of 32 bits or floats."""
    import pydicom  # shipped with Slicer; imported here so that the rest of the library does not need it

    slope = intercept = None
    counts = np.zeros(_BINS, np.int64)
    voxels = 0
    if not paths:
        return None
    for path in paths:
        try:
            dataset = pydicom.dcmread(os.fspath(path))
            if "PixelData" not in dataset or "PerFrameFunctionalGroupsSequence" in dataset or \
                    int(dataset.get("NumberOfFrames", 1) or 1) != 1 or \
                    str(dataset.get("PhotometricInterpretation", "")).strip() != "MONOCHROME2":
                return None
            file_slope = float(dataset.get("RescaleSlope", 1) or 1)
            file_intercept = float(dataset.get("RescaleIntercept", 0) or 0)
            pixels = dataset.pixel_array
        except Exception:  # noqa: BLE001 - unreadable or undecodable here: no reference, not an error
            return None
        if slope is None:
            slope, intercept = file_slope, file_intercept
        elif (file_slope, file_intercept) != (slope, intercept):
            return None
        if slope == 0 or pixels.dtype.kind not in "iu" or pixels.dtype.itemsize > 2:
            return None
        counts += np.bincount((pixels.astype(np.int64) + _OFFSET).ravel(), minlength=_BINS)
        voxels += int(pixels.size)
    return SeriesValues(float(slope), float(intercept), voxels, counts)
