"""Whether a volume loaded from DICOM still holds the voxels of the files it was loaded from.

A DICOM volume edited in place (Segment Editor's "Mask volume", a filter writing into the same node) keeps the
series' UIDs. :meth:`ReviewSession.as_loaded` tells such an edit by comparing the node's voxels with a reference;
taking as reference the voxels seen when the module first identified the volume misses an edit made before that
(the edited voxels become the reference, and the series' result and server copy are used for them). The reference
here is the series' files on disk instead: the stored pixel values of every file, mapped through the series'
rescale (slope, intercept), as a multiset (a count per stored value). Slicer's DICOM readers may reverse the slice
order (a left-handed series) and order slices by position, so only the multiset, not the order, is compared; any
edit that changes a voxel's value changes it. Slicer-free (pydicom, which Slicer ships, and numpy): the module
finds the files in Slicer's DICOM database (the SOP Instance UIDs on the volume's subject-hierarchy item:
:func:`find_series_files`, which says why when they cannot be found).
Compressed pixel data pydicom has no decoder for (JPEG Lossless: Slicer's Python has neither pylibjpeg-libjpeg nor
GDCM's Python wrapping) is decoded by SimpleITK's GDCM, which Slicer also ships.

What Slicer's scalar volume reader (vtkITKArchetypeImageSeriesScalarReader, ITK's GDCMImageIO) makes of the files,
and so what the reference reproduces:

- files with different rescales (one per file: PET, some CT and MR exports): each file is rescaled with its own
  slope and intercept, in double precision (``slope * v + intercept``), into one type for the whole volume: double
  when a slope or intercept is not a whole number, else an integer type wide enough. The reference is then the
  multiset of those real-world values (:class:`RescaledValues`), compared within a few units in the last place of
  ``|slope * v| + |intercept|`` (a build that fuses the multiply-add, as clang does on arm64, may differ from the
  unfused product in the last bit);
- a multi-frame file (enhanced CT / MR / PET, legacy converted): GDCM applies **one** rescale to all its frames:
  for the enhanced classes the Pixel Value Transformation of the shared functional group, else that of the first
  frame's per-frame group, else the top-level Rescale Slope / Intercept. Frames whose own per-frame rescale differs
  are loaded through the first frame's (their values in Slicer are off by the difference): the reference does the
  same, since it must be what the node holds, not what the frames mean. Those frames are named
  (:class:`IgnoredRescale`, in the ``ignored_rescales`` of what :func:`read_series_values` returns, from the headers
  it reads anyway; those of every file, also after one that gives no reference) so that the module warns that their
  values are wrong; so are the later frames whose own rescale is malformed (a Rescale Slope or Intercept missing,
  not a number, or a slope of 0), which GDCM never reads either: they are loaded through the first frame's too,
  whatever they hold;
- MONOCHROME1: GDCM inverts the stored values to MONOCHROME2 before the rescale (``gdcm::ImageCodec``'s
  DoInvertMonochrome: ``~v`` when signed, ``255 - v`` for 8 unsigned bits, ``2**BitsStored - 1 - v`` for 16, values
  above that clamped first); the reference inverts them the same way.

No reference (:class:`NoReference`, with the reason the module shows): colour (3 samples per pixel, PALETTE COLOR,
YBR): Slicer's scalar reader refuses them and the DICOM plugin loads them as a vector volume, which the module does
not take, so a scalar volume that names these files was made from them otherwise; Float / Double Float Pixel Data
(parametric maps): no ImageIO of Slicer's scalar reader reads them (the Parametric Map plugin converts them with
dcmqi, whose values this cannot reproduce here); 32-bit integer pixels; a file missing or unreadable; compressed
pixel data neither pydicom nor SimpleITK decodes here; a rescale slope of 0 or a rescale that is not a finite
number; a malformed rescale in the functional group Slicer's reader applies to all the frames of a multi-frame
file (the shared group's, else frame 1's: named, with what is wrong in it). The first voxels seen stay the reference
then, as before.

Not compared: the geometry (the node's IJK-to-RAS), which the content identity covers from the first
identification on.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import numpy as np

__all__ = ["IgnoredRescale", "NoReference", "RescaledValues", "SeriesValues", "find_series_files",
           "read_series_values"]

#: stored values are 8- or 16-bit, signed or not: -32768 .. 65535, counted at index value + _OFFSET
_OFFSET = 32768
_BINS = 65536 + _OFFSET
#: values larger than this (pixel data) are not read when only a file's header is needed (pydicom's defer_size:
#: read from the file only if accessed)
_HEADER_ONLY = "64 KB"

#: SOP classes whose rescale GDCM reads from the functional groups (gdcm::ImageHelper::GetRescaleInterceptSlopeValue)
_FUNCTIONAL_GROUP_RESCALE = frozenset({
    "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT
    "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR
    "1.2.840.10008.5.1.4.1.1.130",  # Enhanced PET
    "1.2.840.10008.5.1.4.1.1.13.1.1",  # X-Ray 3D Angiographic
    "1.2.840.10008.5.1.4.1.1.13.1.2",  # X-Ray 3D Craniofacial
    "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation
    "1.2.840.10008.5.1.4.1.1.13.1.3",  # Breast Tomosynthesis
    "1.2.840.10008.5.1.4.1.1.13.1.4",  # Breast Projection X-Ray, for presentation
    "1.2.840.10008.5.1.4.1.1.13.1.5",  # Breast Projection X-Ray, for processing
    "1.2.840.10008.5.1.4.1.1.2.2",  # Legacy Converted Enhanced CT
    "1.2.840.10008.5.1.4.1.1.4.4",  # Legacy Converted Enhanced MR
    "1.2.840.10008.5.1.4.1.1.128.1",  # Legacy Converted Enhanced PET
})


@dataclass(frozen=True)
class IgnoredRescale:
    """Frames of one multi-frame file whose own rescale (Pixel Value Transformation: per-frame functional group,
    else shared, else top-level) is not the one Slicer's reader applied to all its frames (:func:`_gdcm_rescale`):
    in the volume their values are ``applied`` slope * stored + intercept, not their own, so they are wrong (in HU
    for CT). ``frames``: their 1-based frame numbers (as DICOM numbers frames; not the volume's slice order);
    ``rescales``: their distinct own (slope, intercept), sorted; ``total``: the file's number of frames."""

    file: str
    frames: tuple[int, ...]
    total: int
    applied: tuple[float, float]
    rescales: tuple[tuple[float, float], ...]
    #: frames (1-based) whose own Pixel Value Transformation is malformed, each with what is wrong in it (a Rescale
    #: Slope or Intercept missing, not a number, or a slope of 0): Slicer's reader applied ``applied`` to them too,
    #: and what their values mean cannot be told from the file
    malformed: tuple[tuple[int, str], ...] = ()

    @staticmethod
    def _named(frames: Sequence[int]) -> str:
        """E.g. "frames 2-5, 8" (runs of consecutive frames; the first six runs)."""
        runs, start = [], frames[0]
        for previous, frame in zip(frames, frames[1:]):
            if frame != previous + 1:  # a run of consecutive frames ends at previous
                runs.append((start, previous))
                start = frame
        runs.append((start, frames[-1]))
        named = ", ".join(f"{first}" if first == last else f"{first}-{last}" for first, last in runs[:6])
        return f"frame{'s' if len(frames) > 1 else ''} {named}" + (", ..." if len(runs) > 6 else "")

    def describe(self) -> str:
        """E.g. "frames 2-5, 8 of ct.dcm (5 of 8) carry their own rescale (slope 2, intercept -1024) ..."; then the
        frames with a malformed rescale, e.g. "frame 6 of ct.dcm (1 of 8) has a malformed rescale (frame 6: no
        RescaleSlope) ..."."""
        applied = f"slope {self.applied[0]:g}, intercept {self.applied[1]:g}"
        parts = []
        if self.frames:
            own = "; ".join(f"slope {slope:g}, intercept {intercept:g}" for slope, intercept in self.rescales[:3])
            if len(self.rescales) > 3:
                own += f"; ... {len(self.rescales)} different ones"
            several = len(self.frames) > 1
            parts.append(f"{self._named(self.frames)} of {self.file} ({len(self.frames)} of {self.total}) "
                         f"{'carry their' if several else 'carries its'} own rescale ({own}) that Slicer's reader "
                         f"ignored (it applied {applied} to all the file's frames)")
        if self.malformed:
            frames = [number for number, _ in self.malformed]
            wrong = "; ".join(f"frame {number}: {what}" for number, what in self.malformed[:3])
            if len(self.malformed) > 3:
                wrong += "; ..."
            several = len(frames) > 1
            parts.append(f"{self._named(frames)} of {self.file} ({len(frames)} of {self.total}) "
                         f"{'have' if several else 'has'} a malformed rescale ({wrong}): Slicer's reader applied "
                         f"{applied} to {'them' if several else 'it'} as to all the file's frames, which may not be "
                         f"what {'they mean' if several else 'it means'}")
        return "; ".join(parts)


@dataclass(frozen=True)
class NoReference:
    """The series' files cannot be read as Slicer's scalar volume reader reads them: ``reason`` says why, in words
    for the status line (the voxels first seen stay the reference). ``ignored_rescales``: see
    :attr:`SeriesValues.ignored_rescales` (of all the files whose header can be read, also those after the one
    that gave no reference)."""

    reason: str
    ignored_rescales: tuple[IgnoredRescale, ...] = ()

    def matches(self, voxels: np.ndarray) -> None:
        """Cannot tell (no reference)."""
        return None


@dataclass(frozen=True)
class SeriesValues:
    """The voxel values of a series' files: ``counts[v + 32768]`` voxels hold the stored value ``v``, shown as
    ``slope * v + intercept`` (what Slicer's reader gives, in HU for CT)."""

    slope: float
    intercept: float
    voxels: int
    counts: np.ndarray = field(repr=False, compare=False)
    #: frames of multi-frame files whose own rescale Slicer's reader did not apply (their values in the volume are
    #: wrong; :class:`IgnoredRescale`), one entry per such file; () when every frame is read with its own rescale
    ignored_rescales: tuple[IgnoredRescale, ...] = ()

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
    #: see :attr:`SeriesValues.ignored_rescales`
    ignored_rescales: tuple[IgnoredRescale, ...] = ()

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


def find_series_files(instance_uids: str | Sequence[str], file_for_instance: Callable[[str], str] | None,
                      frame: int | None = None) -> list[str] | NoReference:
    """The files a DICOM volume was loaded from: ``file_for_instance`` (Slicer's DICOM database's
    ``fileForInstance``; None when no database is open) of each of its SOP Instance UIDs (``instance_uids``, as
    its subject-hierarchy item holds them: space-separated). A :class:`NoReference` saying why when they cannot be
    found, so that the status line says the volume was not compared with its files: ``frame`` (0-based) of a 4D
    sequence (the series' files hold all its frames), no instance UIDs (the volume was not loaded from DICOM files,
    e.g. a scene file or a volume a module made, which keep the series' UID), no open database, instances the
    database does not hold."""
    uids = instance_uids.split() if isinstance(instance_uids, str) else [str(uid) for uid in instance_uids]
    if frame is not None:
        return NoReference(f"it is frame {frame + 1} of a 4D sequence, whose DICOM files hold all its frames")
    if not uids:
        return NoReference("it was not loaded from DICOM files (its subject-hierarchy item names no DICOM "
                           "instances: e.g. loaded from a scene file, or made by a module)")
    if file_for_instance is None:
        return NoReference("Slicer's DICOM database is not open, so its files cannot be found")
    files = [file_for_instance(uid) or "" for uid in uids]
    missing = sum(1 for path in files if not path)
    if missing:
        return NoReference(f"{missing} of its {len(files)} DICOM instances are not in Slicer's DICOM database (e.g. "
                           "loaded from a scene file, or removed from the database since), so its files cannot be "
                           "found")
    return files


def read_series_values(paths: Sequence[str | os.PathLike]) -> SeriesValues | RescaledValues | NoReference:
    """The values of the DICOM files ``paths`` (one volume's files; a multi-frame file holds all its frames) as
    Slicer's scalar volume reader gives them: a :class:`SeriesValues` when the files share one rescale, a
    :class:`RescaledValues` when it differs between files; a :class:`NoReference` saying why when they cannot be
    read as that reader reads them (see the module's docstring). Each carries the frames whose own rescale that
    reader ignored (``ignored_rescales``), found in the headers read here."""
    ignored: list[IgnoredRescale] = []
    values = _read_series_values(paths, ignored)
    return replace(values, ignored_rescales=tuple(ignored)) if ignored else values


def _read_series_values(paths: Sequence[str | os.PathLike],
                        ignored: list[IgnoredRescale]) -> SeriesValues | RescaledValues | NoReference:
    """:func:`read_series_values`, the frames with an ignored rescale appended to ``ignored`` file by file. Once a
    file gives no reference (missing, unreadable, refused, undecodable here) the answer is that file's
    :class:`NoReference`, but the headers of the files after it are still read (their pixel data neither read nor
    decoded), so that the frames named do not depend on the files' order."""
    import pydicom  # shipped with Slicer; imported here so that the rest of the library does not need it

    # per file: its rescale, and the stored values it holds with their counts (only those present: a series of
    # hundreds of files with as many rescales must not hold a 98,304-bin histogram per file)
    files: list[tuple[float, float, np.ndarray, np.ndarray]] = []
    if not paths:
        return NoReference("no files")
    untold: NoReference | None = None  # the first file that gave no reference
    for path in paths:
        name = os.path.basename(os.fspath(path))
        try:  # after a file without reference only its header is needed: large values (pixel data) are skipped
            dataset = pydicom.dcmread(os.fspath(path), defer_size=None if untold is None else _HEADER_ONLY)
        except Exception as error:  # noqa: BLE001 - missing or not DICOM: no reference, not an error
            if untold is None:
                untold = NoReference(f"its file {name} cannot be read ({type(error).__name__})")
            continue
        refused, rescale, frames = _header_of(dataset, name)
        if frames is not None:  # told even when the pixel data cannot be decoded here: Slicer's GDCM may
            ignored.append(frames)
        if untold is None and refused:
            untold = NoReference(refused)
        if untold is not None:
            continue
        slope, intercept = rescale
        try:
            pixels = _stored_values(dataset, os.fspath(path), slope, intercept)
        except Exception:  # noqa: BLE001 - undecodable here: no reference, not an error
            pixels = None
        if pixels is None or pixels.dtype.kind not in "iu" or pixels.dtype.itemsize > 2:
            syntax = dataset.file_meta.get("TransferSyntaxUID", "")
            syntax = getattr(syntax, "name", "") or str(syntax) or "unknown transfer syntax"
            untold = NoReference(f"the pixel data of {name} ({syntax}) cannot be decoded here as Slicer decodes it")
            continue
        histogram = np.bincount((pixels.astype(np.int64) + _OFFSET).ravel(), minlength=_BINS)
        present = np.flatnonzero(histogram)
        files.append((slope, intercept, present - _OFFSET, histogram[present]))
    if untold is not None:
        return untold
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


def _header_of(dataset, name: str) -> tuple[str, tuple[float, float] | None, IgnoredRescale | None]:
    """From the header of one file (``dataset``, named ``name``): why Slicer's scalar volume reader cannot have made
    the volume of it, as the series' files are compared ("" when it can), the rescale it applies to all its frames
    (:func:`_gdcm_rescale`; None when there is a reason) and the frames whose own rescale it ignored
    (:func:`_ignored_rescale`; None when none, or when the file is refused before its rescale is known)."""
    try:
        refused, rescale = _not_as_slicer_reads(dataset), _gdcm_rescale(dataset)
    except (TypeError, ValueError, AttributeError, IndexError) as error:  # malformed image attributes
        return f"the image attributes of {name} cannot be read ({type(error).__name__})", None, None
    if refused:
        return refused, None, None
    if isinstance(rescale, str):  # the one GDCM applies to all the frames: which group, and what is wrong in it
        return (f"{name} has a malformed rescale ({rescale}), the one Slicer's reader applies to all its frames",
                None, None)
    slope, intercept = rescale
    if slope == 0 or not np.isfinite(slope) or not np.isfinite(intercept):
        return f"{name} has a rescale slope of 0 or a rescale that is not a finite number", None, None
    try:
        frames = _ignored_rescale(dataset, name, rescale)
    except (TypeError, ValueError, AttributeError, IndexError) as error:  # a malformed per-frame group
        return f"the functional groups of {name} cannot be read ({type(error).__name__})", None, None
    return "", rescale, frames


def _not_as_slicer_reads(dataset) -> str:
    """Why Slicer's scalar volume reader cannot have made a scalar volume of ``dataset``'s pixels ("" when it
    can): colour, float or 32-bit pixels, or none at all."""
    if "FloatPixelData" in dataset or "DoubleFloatPixelData" in dataset:
        return ("its files hold float pixel data (Float / Double Float Pixel Data, a parametric map): Slicer's "
                "scalar volume reader cannot read it (the Parametric Map plugin converts it with dcmqi), so the "
                "volume's values cannot be compared with the files")
    if "PixelData" not in dataset:
        return "its files hold no pixel data"
    photometric = str(dataset.get("PhotometricInterpretation", "")).strip()
    if int(dataset.get("SamplesPerPixel", 1) or 1) != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        return (f"its files are colour images ({photometric or 'no Photometric Interpretation'}): Slicer loads them "
                "as a vector (RGB) volume, not as this scalar volume, so its values cannot be compared with the files")
    if int(dataset.get("BitsAllocated", 0) or 0) not in (8, 16):
        return f"its files have {dataset.get('BitsAllocated')}-bit pixels (only 8 and 16 bits are compared)"
    return ""


def _gdcm_rescale(dataset) -> tuple[float, float] | str:
    """The (slope, intercept) GDCM (Slicer's reader) applies to every frame of ``dataset``: for the SOP classes of
    :data:`_FUNCTIONAL_GROUP_RESCALE`, the Pixel Value Transformation of the shared functional group, else of the
    first frame's per-frame group (one rescale for all frames, even where later frames have others); else, and
    where neither has one, the top-level Rescale Slope / Intercept (1 and 0 when absent). When the group found is
    malformed (:func:`_transformation`): which group and what is wrong in it, e.g. "frame 1: no RescaleSlope",
    "shared functional group: RescaleSlope 0"."""
    if str(dataset.get("SOPClassUID", "")) in _FUNCTIONAL_GROUP_RESCALE:
        for groups, where in (("SharedFunctionalGroupsSequence", "shared functional group"),
                              ("PerFrameFunctionalGroupsSequence", "frame 1")):
            items = dataset.get(groups) or []
            own = _transformation(items[0] if items else None)
            if isinstance(own, str):
                return f"{where}: {own}"
            if own is not None:
                return own
    return float(dataset.get("RescaleSlope", 1) or 1), float(dataset.get("RescaleIntercept", 0) or 0)


def _transformation(group) -> tuple[float, float] | str | None:
    """The (slope, intercept) of the Pixel Value Transformation of a functional group item ``group``; None when it has
    none; else what is malformed in it, in words: a Rescale Slope or Intercept missing (both are Type 1 there), not a
    number, not finite, or a slope of 0."""
    items = (group.get("PixelValueTransformationSequence") or []) if group is not None else []
    if not items:
        return None
    values = []
    for keyword in ("RescaleSlope", "RescaleIntercept"):
        value = items[0].get(keyword)
        if value is None or str(value).strip() == "":
            return f"no {keyword}"
        try:
            number = float(value)
        except (TypeError, ValueError):
            return f"{keyword} {str(value)[:24]!r} is not a number"
        if not np.isfinite(number):
            return f"{keyword} {number:g} is not a finite number"
        values.append(number)
    if values[0] == 0:
        return "RescaleSlope 0"
    return values[0], values[1]


def _ignored_rescale(dataset, name: str, applied: tuple[float, float]) -> IgnoredRescale | None:
    """The frames of ``dataset`` (a file named ``name``) whose own rescale is not ``applied``, the one GDCM applies to
    all (:func:`_gdcm_rescale`), and those whose own rescale is malformed (:func:`_transformation`; GDCM applies
    ``applied`` to them as well, never reading it); None when there is none. A frame's own rescale, as DICOM defines
    it: its per-frame functional group's Pixel Value Transformation, else the shared group's, else the top-level
    Rescale Slope / Intercept (1 and 0 when absent). From the header already read: no pixel data is touched."""
    per_frame = dataset.get("PerFrameFunctionalGroupsSequence") or []
    if not per_frame:
        return None
    shared = dataset.get("SharedFunctionalGroupsSequence") or []
    shared_own = _transformation(shared[0] if shared else None)
    top_level = None  # read only for a frame without a transformation of its own or a shared one
    wrong: dict[int, tuple[float, float]] = {}
    malformed: list[tuple[int, str]] = []
    for number, group in enumerate(per_frame, 1):
        own = _transformation(group)
        if own is None:
            own = shared_own
        if own is None:
            if top_level is None:
                top_level = (float(dataset.get("RescaleSlope", 1) or 1), float(dataset.get("RescaleIntercept", 0) or 0))
            own = top_level
        if isinstance(own, str):
            malformed.append((number, own))
        elif own != applied:
            wrong[number] = own
    if not wrong and not malformed:
        return None
    total = int(dataset.get("NumberOfFrames", len(per_frame)) or len(per_frame))
    return IgnoredRescale(name, tuple(wrong), total, applied, tuple(sorted(set(wrong.values()))), tuple(malformed))


def _as_monochrome2(pixels: np.ndarray, dataset) -> np.ndarray:
    """``pixels`` (stored values as pydicom decodes them) as GDCM hands them to the rescale: MONOCHROME1 inverted to
    MONOCHROME2 (gdcm::ImageCodec::DoInvertMonochrome on the raw buffer: ``~v`` when signed, ``255 - v`` for 8
    unsigned bits, ``2**BitsStored - 1 - min(v, 2**BitsStored - 1)`` for 16), MONOCHROME2 as it is."""
    if str(dataset.get("PhotometricInterpretation", "")).strip() != "MONOCHROME1":
        return pixels
    if pixels.dtype.kind == "i":
        return np.invert(pixels)
    if pixels.dtype.itemsize == 1:
        return (255 - pixels).astype(pixels.dtype)
    mask = (1 << int(dataset.get("BitsStored", 16) or 16)) - 1
    return (mask - np.minimum(pixels, mask)).astype(pixels.dtype)


def _stored_values(dataset, path: str, slope: float, intercept: float) -> np.ndarray | None:
    """The stored values of one file's pixel data (frames x rows x columns or rows x columns, its stored type) as
    GDCM hands them to the rescale (:func:`_as_monochrome2`): pydicom's decoders, else, for compressed pixel data
    none of them decodes (JPEG Lossless in Slicer's Python, which has no such decoder), SimpleITK's GDCM (shipped
    with Slicer; the library Slicer's reader decodes with), whose values come inverted and rescaled: the stored
    values are recovered from them, and None when they are not ``slope * v + intercept`` of whole ``v`` of the
    stored type (to a few units in the last place) or SimpleITK is missing."""
    try:
        return _as_monochrome2(dataset.pixel_array, dataset)
    except Exception:  # noqa: BLE001 - no decoder here for it: GDCM may have one
        if not dataset.file_meta.TransferSyntaxUID.is_compressed:
            return None
    bits, signed = int(dataset.BitsAllocated), int(dataset.get("PixelRepresentation", 0)) == 1
    try:
        import SimpleITK as sitk
    except ImportError:
        return None
    reader = sitk.ImageFileReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileName(path)
    image = reader.Execute()
    values = sitk.GetArrayFromImage(image).astype(np.float64)
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    if image.GetNumberOfComponentsPerPixel() != 1 or values.size != frames * int(dataset.Rows) * int(dataset.Columns):
        return None
    stored = np.rint((values - intercept) / slope)
    # GDCM's rescale in double, perhaps with a fused multiply-add: exact, or a few units in the last place off
    tolerance = 4 * np.finfo(np.float64).eps * (np.abs(slope * stored) + abs(intercept))
    dtype = np.dtype(f"{'i' if signed else 'u'}{bits // 8}")
    if not np.all(np.abs(slope * stored + intercept - values) <= tolerance) or \
            stored.min() < np.iinfo(dtype).min or stored.max() > np.iinfo(dtype).max:
        return None
    return stored.astype(dtype)
