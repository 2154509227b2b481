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
Compressed pixel data pydicom has no decoder for (JPEG Lossless: Slicer's Python has neither pylibjpeg-libjpeg nor
GDCM's Python wrapping) is decoded by SimpleITK's GDCM, which Slicer also ships.

Files with different rescales (one per file: PET, some CT and MR exports): Slicer's scalar volume reader
(vtkITKArchetypeImageSeriesScalarReader, GDCM's ImageIO) rescales each file with its own slope and intercept, in
double precision (``slope * v + intercept``), into one type for the whole volume: double when a slope or intercept is
not a whole number, else an integer type wide enough. The reference is then the multiset of those real-world values
(:class:`RescaledValues`), compared within a few units in the last place of ``|slope * v| + |intercept|`` (a build
that fuses the multiply-add, as clang does on arm64, may differ from the unfused product in the last bit).

Not compared: the geometry (the node's IJK-to-RAS), which the content identity covers from the first
identification on. Files this cannot read the same way as Slicer (compressed without a decoder, one rescale per
frame, enhanced multi-frame, MONOCHROME1, colour, 32-bit or float pixels) give no reference (None): the first voxels
seen stay the reference then, as before.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

__all__ = ["RescaledValues", "SeriesValues", "read_series_values"]

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


@dataclass(frozen=True)
class RescaledValues:
    """The voxel values of a series whose files have different rescales: ``counts[k]`` voxels hold the real-world
    value ``values[k]`` (``slope * v + intercept`` of a file's stored value ``v``, in double precision as Slicer's
    reader computes it; ``values`` sorted, distinct). ``magnitudes[k]``: the largest ``|slope * v| + |intercept|``
    giving ``values[k]``, the scale of its rounding error."""

    voxels: int
    values: np.ndarray = field(repr=False, compare=False)
    counts: np.ndarray = field(repr=False, compare=False)
    magnitudes: np.ndarray = field(repr=False, compare=False)

    def matches(self, voxels: np.ndarray) -> bool:
        """Whether ``voxels`` (a volume's array, any order of its voxels) holds exactly these values, as many times
        each: each voxel within ``4 * eps * magnitude`` of a value (``eps`` of the array's float type, double's for
        an integer array), values that close to each other counted together. Streams the array one slice at a time
        (no full-size copy)."""
        voxels = np.asarray(voxels)
        if voxels.size != self.voxels or voxels.dtype.kind not in "iuf":
            return False
        # a float type narrower than double rounded the values when they were stored in it
        narrow = voxels.dtype.kind == "f" and voxels.dtype.itemsize < 8
        eps = float(np.finfo(voxels.dtype if narrow else np.float64).eps)
        tolerance = 4 * eps * self.magnitudes
        # values within each other's tolerance cannot be told apart: one group, its voxels counted together
        low, high = self.values - tolerance, self.values + tolerance
        starts = np.concatenate(([True], low[1:] > np.maximum.accumulate(high)[:-1]))
        group = np.cumsum(starts) - 1
        group_low = low[starts]
        group_high = np.maximum.reduceat(high, np.flatnonzero(starts))
        expected = np.bincount(group, weights=self.counts, minlength=group_low.size).astype(np.int64)
        counts = np.zeros(group_low.size, np.int64)
        planes = voxels.reshape(-1, *voxels.shape[-2:]) if voxels.ndim >= 2 else voxels.reshape(1, -1)
        for plane in planes:
            values = plane.astype(np.float64).ravel()
            index = np.searchsorted(group_low, values, side="right") - 1
            if np.any(index < 0) or not np.all(values <= group_high[np.maximum(index, 0)]):
                return False  # a value (or NaN) no file gives: written by something else than the reader
            counts += np.bincount(index, minlength=group_low.size)
        return bool(np.array_equal(counts, expected))


def read_series_values(paths: Sequence[str | os.PathLike]) -> SeriesValues | RescaledValues | None:
    """The values of the DICOM files ``paths`` (one volume's files): a :class:`SeriesValues` when they share one
    rescale, a :class:`RescaledValues` when it differs between files; None when they cannot be read as Slicer's
    scalar volume reader reads them: a file missing or unreadable, pixel data neither pydicom nor SimpleITK can
    decode here, an enhanced multi-frame object (rescale per frame), MONOCHROME1 or colour images, pixels of 32 bits
    or floats, a slope of 0 or a rescale that is not a finite number."""
    import pydicom  # shipped with Slicer; imported here so that the rest of the library does not need it

    # per file: its rescale, and the stored values it holds with their counts (only those present: a series of
    # hundreds of files with as many rescales must not hold a 98,304-bin histogram per file)
    files: list[tuple[float, float, np.ndarray, np.ndarray]] = []
    if not paths:
        return None
    for path in paths:
        try:
            dataset = pydicom.dcmread(os.fspath(path))
            if "PixelData" not in dataset or "PerFrameFunctionalGroupsSequence" in dataset or \
                    int(dataset.get("NumberOfFrames", 1) or 1) != 1 or \
                    str(dataset.get("PhotometricInterpretation", "")).strip() != "MONOCHROME2":
                return None
            slope = float(dataset.get("RescaleSlope", 1) or 1)
            intercept = float(dataset.get("RescaleIntercept", 0) or 0)
            if slope == 0 or not np.isfinite(slope) or not np.isfinite(intercept):
                return None
            pixels = _stored_values(dataset, os.fspath(path), slope, intercept)
        except Exception:  # noqa: BLE001 - unreadable or undecodable here: no reference, not an error
            return None
        if pixels is None or pixels.dtype.kind not in "iu" or pixels.dtype.itemsize > 2:
            return None
        histogram = np.bincount((pixels.astype(np.int64) + _OFFSET).ravel(), minlength=_BINS)
        present = np.flatnonzero(histogram)
        files.append((slope, intercept, present - _OFFSET, histogram[present]))
    voxels = int(sum(int(counts.sum()) for *_, counts in files))
    rescales = {(slope, intercept) for slope, intercept, *_ in files}
    if len(rescales) == 1:
        (slope, intercept), = rescales
        histogram = np.zeros(_BINS, np.int64)
        for _, _, stored, counts in files:
            histogram[stored + _OFFSET] += counts
        return SeriesValues(slope, intercept, voxels, histogram)
    # GDCM's rescale, per file: slope * v + intercept in double precision
    values = np.concatenate([slope * stored.astype(np.float64) + intercept for slope, intercept, stored, _ in files])
    magnitudes = np.concatenate([np.abs(slope * stored.astype(np.float64)) + abs(intercept)
                                 for slope, intercept, stored, _ in files])
    counts = np.concatenate([counts for *_, counts in files])
    distinct, index = np.unique(values, return_inverse=True)
    summed = np.bincount(index, weights=counts, minlength=distinct.size).astype(np.int64)
    largest = np.zeros(distinct.size)
    np.maximum.at(largest, index, magnitudes)
    return RescaledValues(voxels, distinct, summed, largest)


def _stored_values(dataset, path: str, slope: float, intercept: float) -> np.ndarray | None:
    """The stored values of one file's pixel data (rows x columns, its stored type): pydicom's decoders, else, for
    compressed pixel data none of them decodes (JPEG Lossless in Slicer's Python, which has no such decoder),
    SimpleITK's GDCM (shipped with Slicer; the library Slicer's reader decodes with), whose values come rescaled:
    the stored values are recovered from them, and None when they are not ``slope * v + intercept`` of whole
    ``v`` of the stored type (to a few units in the last place) or SimpleITK is missing."""
    try:
        return dataset.pixel_array
    except Exception:  # noqa: BLE001 - no decoder here for it: GDCM may have one
        if not dataset.file_meta.TransferSyntaxUID.is_compressed:
            return None
    bits, signed = int(dataset.BitsAllocated), int(dataset.get("PixelRepresentation", 0)) == 1
    if bits not in (8, 16) or int(dataset.get("SamplesPerPixel", 1)) != 1:
        return None
    try:
        import SimpleITK as sitk
    except ImportError:
        return None
    reader = sitk.ImageFileReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileName(path)
    image = reader.Execute()
    values = sitk.GetArrayFromImage(image).astype(np.float64)
    if image.GetNumberOfComponentsPerPixel() != 1 or values.size != int(dataset.Rows) * int(dataset.Columns):
        return None
    stored = np.rint((values - intercept) / slope)
    # GDCM's rescale in double, perhaps with a fused multiply-add: exact, or a few units in the last place off
    tolerance = 4 * np.finfo(np.float64).eps * (np.abs(slope * stored) + abs(intercept))
    dtype = np.dtype(f"{'i' if signed else 'u'}{bits // 8}")
    if not np.all(np.abs(slope * stored + intercept - values) <= tolerance) or \
            stored.min() < np.iinfo(dtype).min or stored.max() > np.iinfo(dtype).max:
        return None
    return stored.astype(dtype).reshape(int(dataset.Rows), int(dataset.Columns))
