"""Reading DICOM: a series from a folder, a single slice, or a multi-frame (enhanced) file, as a
:class:`~lib.imaging.Volume`.

pydicom decodes the pixels (JPEG 2000 via pylibjpeg, JPEG Lossless and JPEG-LS via python-gdcm); the stored values
are rescaled to physical units (CT in HU), padding is set to air, and the geometry comes from
:mod:`lib.imaging.dicom_geometry`. The headers (without pixel data) stay on the volume as templates for a derived
series (:mod:`lib.imaging.dicom_write`).
"""
from __future__ import annotations

import bisect
import errno
import math
import os
import re
import stat
import struct
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple, Sequence

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileDataset
from pydicom.encaps import get_frame_offsets
from pydicom.errors import InvalidDicomError
from pydicom.filebase import DicomFileLike
from pydicom.pixel_data_handlers.util import apply_modality_lut
from pydicom.uid import JPEG2000TransferSyntaxes, JPEGLSTransferSyntaxes, JPEGTransferSyntaxes, RLELossless

from .dicom_geometry import orientation_direction, plane_geometry_2d, stack_geometry
from .dicom_tags import (as_signed_stored, first_number, float_list, float_or, identity_conflict, sequence_item,
                         str_or_empty)
from .errors import ImageReadError, UnreadableDicomError, one_line
from .guards import check_plausible, check_size, check_values
from .volume import Volume, fill_padding, integral_dtype_for

__all__ = ["declared_shape", "has_dicom_magic", "is_dicom_file", "list_dicom_series", "probe_dicom_header",
           "read_dicom_file", "read_dicom_folder", "uncompressed_pixel_bytes"]


# --------------------------------------------------------------------------------------------------------------
# Finding DICOM files and series
# --------------------------------------------------------------------------------------------------------------


def has_dicom_magic(path: Path) -> bool:
    """True when ``path`` has the 128-byte preamble followed by 'DICM'."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def probe_dicom_header(path: Path) -> tuple[Dataset | None, str | None]:
    """(header without pixel data, None) for a DICOM file; (None, None) for a file that is not DICOM; (None,
    why) for a file marked DICOM ('DICM' after the preamble) that cannot be read, or whose header stops before
    the image size although it names an image SOP class (a cut or damaged slice: never silently left out).

    Files without the 128-byte preamble are accepted only when they start with a group 0002/0008 tag and parse
    into something with an SOP class or image size, so that junk next to a series is ignored instead of being
    force-parsed into garbage."""
    header, problem, _ = _probe(path)
    return header, problem


def _probe(path: Path) -> tuple[Dataset | None, str | None, bool]:
    """:func:`probe_dicom_header` and whether its problem is a read error of the storage (an OSError: EIO, EACCES, a
    dropped share), not a damaged file: a read that may work tomorrow, which says nothing of the file's contents."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError as error:  # a slice that cannot be opened must not leave its series one slice short
        return None, f"cannot be read from the storage ({one_line(error, 120)})", True
    magic = len(head) == 132 and head[128:132] == b"DICM"
    if not magic and len(head) < 132 and _named_like_dicom(path):
        return None, f"holds {len(head)} bytes, too few for a DICOM image (an interrupted copy?)", False
    if not magic and head[:2] not in (b"\x02\x00", b"\x08\x00"):
        return None, None, False
    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True, force=not magic)
    except OSError as error:
        if error.errno is None:
            # pydicom's own IOError on the file's contents (a file cut inside a sequence: "No tag to read at file
            # position ..."), with or without preamble: a damaged slice, never a read error nor "not DICOM"
            return None, f"cannot be read ({one_line(error, 120)})", False
        return None, f"cannot be read from the storage ({one_line(error, 120)})", True  # the storage, not the file
    except Exception as error:  # noqa: BLE001 - any parse failure means "not a usable DICOM file"
        return None, (f"cannot be read ({one_line(error, 120)})" if magic else None), False
    if not magic and "SOPClassUID" not in ds and "Rows" not in ds:
        return None, None, False
    if magic and not _is_image_header(ds):
        sop_class = str_or_empty(ds.get("SOPClassUID")) or str_or_empty(
            getattr(ds, "file_meta", Dataset()).get("MediaStorageSOPClassUID"))
        if "Image Storage" in _uid_name(sop_class):
            return (None, f"is a {_uid_name(sop_class)} file whose header ends before the image size (cut short?)",
                    False)
    return ds, None, False


#: a name a DICOM slice file has: a DICOM suffix, or a UID (PACS exports name files by their SOPInstanceUID)
_DICOM_FILE_NAME = re.compile(r"(?i).*\.(dcm|dicom|ima)|[0-9]+(\.[0-9]+){3,}")


def _named_like_dicom(path: Path) -> bool:
    """True for a file named as DICOM slices are: an empty or cut file of that name is a lost slice, not junk."""
    return _DICOM_FILE_NAME.fullmatch(path.name) is not None


def _uid_name(uid: str) -> str:
    try:
        return pydicom.uid.UID(uid).name if uid else ""
    except Exception:  # noqa: BLE001 - an odd UID is just not a known image class
        return ""


def is_dicom_file(path: Path) -> bool:
    """True when ``path`` is a DICOM file (with the 'DICM' marker, or a header that parses without it)."""
    return has_dicom_magic(path) or probe_dicom_header(path)[0] is not None


def _is_image_header(ds: Dataset) -> bool:
    return "Rows" in ds and "Columns" in ds


class _Unreadable(NamedTuple):
    """A file of a folder that cannot be read: ``why``; ``read_error``: the storage failed (an OSError), not the
    file's contents."""

    path: Path
    why: str
    read_error: bool


def _scan_dicom_folder(folder: Path) -> tuple[list[tuple[Path, Dataset]], int, list[_Unreadable]]:
    """(path, header) of every DICOM image file directly in ``folder`` (sorted by name), the number of other
    files ignored (junk, DICOMDIR, non-image DICOM objects, folders, FIFOs), and the DICOM files that cannot be
    read (:func:`probe_dicom_header`), with every entry whose kind cannot even be told (its stat fails: EIO, a link
    loop, a link to a missing file named as a slice): it may be a slice, and is never passed over as "not a file".
    Hidden entries (name starting with "."), never looked at nor counted: an editor's lock link (``.#0.dcm``, to
    nothing), a copy's or repair's temporary file; a slice is not hidden."""
    found: list[tuple[Path, Dataset]] = []
    ignored = 0
    unreadable: list[_Unreadable] = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):  # before the stat: a dangling lock link is no slice the storage lost
            continue
        try:
            regular = stat.S_ISREG(entry.stat().st_mode)
        except OSError as error:
            # a link to nothing, not named as a slice (a stale shortcut): junk; anything else may be a slice
            if not (error.errno == errno.ENOENT and not _named_like_dicom(entry)):
                unreadable.append(_Unreadable(entry, f"cannot be read from the storage ({one_line(error, 120)})",
                                              True))
            continue
        if not regular:
            continue
        header, problem, read_error = _probe(entry)
        if problem is not None:
            unreadable.append(_Unreadable(entry, problem, read_error))
        elif header is None or not _is_image_header(header):
            ignored += 1
        else:
            found.append((entry, header))
    return found, ignored, unreadable


def _unreadable_message(folder: Path, unreadable: list[_Unreadable]) -> str:
    """What a folder's unreadable files (:func:`_scan_dicom_folder`) mean for its series: which files, why, and what
    to do (a damaged file: replace or remove it; a read error of the storage: check it, then read again)."""
    shown = "; ".join(f"{u.path.name} {u.why}" for u in unreadable[:3])
    more = f" (and {len(unreadable) - 3} more)" if len(unreadable) > 3 else ""
    advice = []
    if any(not u.read_error for u in unreadable):
        advice.append("a series with a damaged slice is not read (it would come out with the slice missing): "
                      "replace or remove the file")
    if any(u.read_error for u in unreadable):
        advice.append("a read error of the disk or share, not a damaged file: the series is not read without it; "
                      "check the storage, then try again")
    return f"{folder}: {len(unreadable)} DICOM file(s) cannot be read: {shown}{more}; {'; '.join(advice)}"


def _unreadable_error(folder: Path, unreadable: list[_Unreadable]) -> UnreadableDicomError:
    return UnreadableDicomError(_unreadable_message(folder, unreadable),
                                read_error=any(u.read_error for u in unreadable))


def _group_series(files: list[tuple[Path, Dataset]]) -> list[dict]:
    groups: dict[str, list[tuple[Path, Dataset]]] = {}
    for path, header in files:
        # hard-anonymised data has an empty SeriesInstanceUID: those files form one series with uid ""
        groups.setdefault(str_or_empty(header.get("SeriesInstanceUID")), []).append((path, header))
    series = []
    for uid, members in groups.items():
        first = members[0][1]
        number = first.get("SeriesNumber")
        series.append(
            {
                "uid": uid,
                "description": str_or_empty(first.get("SeriesDescription")),
                "modality": str_or_empty(first.get("Modality")),
                "n_files": len(members),
                "series_number": int(number) if number not in (None, "") else None,
                "files": [m[0] for m in members],
                "study_uids": sorted({str_or_empty(m[1].get("StudyInstanceUID")) for m in members}),
                "patient_ids": sorted({str_or_empty(m[1].get("PatientID")) for m in members}),
                "instances": sorted({str_or_empty(m[1].get("SOPInstanceUID")) for m in members} - {""}),
                "_headers": [m[1] for m in members],
            }
        )
    series.sort(key=lambda s: (s["series_number"] is None, s["series_number"] or 0, s["uid"]))
    return series


def _describe_series(s: dict) -> str:
    uid = s["uid"] or '"" (empty SeriesInstanceUID)'
    return f"{uid} ({s['description'] or 'no description'!r}, {s['modality'] or '?'}, {s['n_files']} files)"


def list_dicom_series(folder: str | Path) -> list[dict]:
    """The DICOM image series directly inside ``folder`` (subfolders are not searched).

    Each entry: ``uid`` (SeriesInstanceUID, "" when empty), ``description``, ``modality``, ``n_files``,
    ``series_number`` (int or None), ``files`` (paths), ``study_uids`` and ``patient_ids`` (the distinct
    StudyInstanceUIDs and PatientIDs of its files, sorted: one each in a sound series), ``instances`` (its distinct
    non-empty SOPInstanceUIDs, sorted), ``unreadable_files`` (the
    folder's files marked DICOM that cannot be read, or whose kind cannot be told: while there are any, reading any
    of its series fails), ``unreadable`` (the sentence that says which and why, "" when none), ``read_error``
    (one of them is a read error of the storage, not a damaged file) and ``same_instance`` ((first file, copy,
    SOPInstanceUID) of files holding one SOPInstanceUID: reading the series fails). Non-DICOM files are ignored.

    Raises:
        ImageReadError: the folder is missing, not a folder, or holds no DICOM image file.
    """
    folder = Path(folder).expanduser()
    if not folder.exists():
        raise ImageReadError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise ImageReadError(f"{folder} is not a folder")
    files, ignored, unreadable = _scan_dicom_folder(folder)
    if not files and unreadable:
        raise _unreadable_error(folder, unreadable)
    if not files:
        entries = list(folder.iterdir())
        if not entries:
            raise ImageReadError(f"{folder} is an empty folder (no DICOM files)")
        subdirs = [e.name for e in entries if e.is_dir()]
        hint = (
            f"; subfolders are not searched, point to the one holding the slices (e.g. {subdirs[0]})" if subdirs else ""
        )
        raise ImageReadError(f"{folder} contains no DICOM image files ({ignored} other files ignored){hint}")
    series = []
    for group in _group_series(files):
        first: dict[str, Path] = {}
        copies = []
        for path, header in zip(group["files"], group["_headers"]):
            sop = str_or_empty(header.get("SOPInstanceUID"))
            if sop and sop in first:
                copies.append((first[sop], path, sop))
            first.setdefault(sop, path)
        s = {k: v for k, v in group.items() if not k.startswith("_")}
        # which series a damaged file belonged to is unknown: each of the folder's is suspect
        s["unreadable_files"] = [u.path for u in unreadable]
        s["unreadable"] = _unreadable_message(folder, unreadable) if unreadable else ""
        s["read_error"] = any(u.read_error for u in unreadable)
        s["same_instance"] = copies
        series.append(s)
    return series


# --------------------------------------------------------------------------------------------------------------
# Pixel values
# --------------------------------------------------------------------------------------------------------------


def _check_samples(ds: Dataset, path: Path) -> None:
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples != 1:
        raise ImageReadError(
            f"{path} has {samples} samples per pixel ({ds.get('PhotometricInterpretation', '?')}); 4D or "
            f"multi-component (colour) images are not supported, give one 3D volume"
        )


def _check_pixel_format(ds: Dataset, path: Path) -> None:
    _check_samples(ds, path)
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise ImageReadError(f"{path} is a DICOM file without pixel data ({ds.get('SOPClassUID', 'unknown class')})")


def _decode_pixels(ds: Dataset, path: Path) -> np.ndarray:
    """Stored pixel values ((rows, cols) or (frames, rows, cols)); decoder failures become ImageReadError."""
    try:
        array = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - truncated data, missing decoder ... all mean "cannot read"
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", str(syntax)) if syntax is not None else "unknown transfer syntax"
        raise ImageReadError(f"cannot decode the pixel data of {path} ({name}): {one_line(exc)}") from exc
    return _correct_unused_bits(ds, np.asarray(array))


def _correct_unused_bits(ds: Dataset, array: np.ndarray) -> np.ndarray:
    """Stored integers reduced to their BitsStored bits, sign-extended when PixelRepresentation is 1.

    pydicom 2 returns the whole BitsAllocated word: a signed 12-bit value written without sign extension (-5 as
    0x0FFB) read as 4091, and bits above HighBit (old overlay planes) made a -24 HU voxel 61416. GDCM (ITK,
    Slicer), DCMTK and Orthanc mask and sign-extend like this. Values already within the BitsStored range (the
    usual case, and what the JPEG decoders return) are left as they are, without a copy."""
    if not np.issubdtype(array.dtype, np.integer):
        return array
    width = array.dtype.itemsize * 8
    bits = int(float_or(ds.get("BitsStored"), width))
    high_bit = int(float_or(ds.get("HighBit"), bits - 1))
    if not 0 < bits < width or high_bit != bits - 1:
        return array  # no unused bits, or data shifted within the word (not used by CT/MR): left to the handler
    signed = int(float_or(ds.get("PixelRepresentation"), 0)) == 1
    low, high = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    if array.size == 0 or (int(array.min()) >= low and int(array.max()) <= high):
        return array
    values = array.astype(np.int64) & ((1 << bits) - 1)
    if signed:
        values = np.where(values > high, values - (1 << bits), values)
    return values.astype(np.dtype(f"{'int' if signed else 'uint'}{width}"))


def _rescale_value(source: Dataset, keyword: str, default: float, path: Path) -> float:
    """``source``'s ``keyword`` (RescaleSlope / RescaleIntercept) as a float, ``default`` when absent or empty;
    ImageReadError naming ``path`` for a value that is not a finite number, or a slope of 0."""
    value = source.get(keyword)
    if value is None or str_or_empty(value) == "":
        return default
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    # a slope of 0 makes every pixel the intercept, a broken value leaves the units unknown: replacing them by 1 and 0
    # gave a CT 1024 HU off or an image of another scale, denoised and written back as if it were right
    if not math.isfinite(number) or (keyword == "RescaleSlope" and number == 0):
        raise ImageReadError(f"{path}: {keyword} is {str_or_empty(value)!r}, not a usable value"
                             f"{' (a slope of 0 maps every pixel to one value)' if math.isfinite(number) else ''}: "
                             "the pixel values cannot be converted to physical units; fix the header or re-export "
                             "the series")
    return number


def _rescale_of(item: Dataset | None, fallback: Dataset, path: Path) -> tuple[float, float]:
    """(RescaleSlope, RescaleIntercept) of a per-frame item when it has them, else of ``fallback``; (1, 0) when
    absent. ImageReadError for a slope of 0, or a slope or intercept that is not a finite number."""
    source = item if item is not None and "RescaleSlope" in item else fallback
    return (_rescale_value(source, "RescaleSlope", 1.0, path),
            _rescale_value(source, "RescaleIntercept", 0.0, path))


def _modality_lut(ds: Dataset, stored: np.ndarray, path: Path) -> np.ndarray:
    """Stored values through the Modality LUT Sequence when the object has one instead of RescaleSlope/Intercept
    (XA, DX, SC): without it the values were the raw stored ones. Unchanged otherwise."""
    if "ModalityLUTSequence" not in ds or "RescaleSlope" in ds:
        return stored
    try:
        return np.asarray(apply_modality_lut(stored, ds))
    except Exception as exc:  # noqa: BLE001 - a malformed LUT: refuse rather than read unmapped values
        raise ImageReadError(f"{path}: its Modality LUT Sequence cannot be applied ({one_line(exc)})") from exc


def _padding_mask(ds: Dataset, stored: np.ndarray) -> np.ndarray | None:
    """Pixels equal to PixelPaddingValue (or within [PixelPaddingValue, PixelPaddingRangeLimit]), in stored
    values (the tags are defined before rescale)."""
    if "PixelPaddingValue" not in ds:
        return None
    rep = int(ds.get("PixelRepresentation", 0) or 0)
    bits = int(ds.get("BitsAllocated", 16) or 16)
    value = as_signed_stored(ds["PixelPaddingValue"].value, rep, bits)
    if value is None:
        return None
    limit = as_signed_stored(ds["PixelPaddingRangeLimit"].value, rep, bits) if "PixelPaddingRangeLimit" in ds else None
    if limit is None:
        return stored == value
    lo, hi = min(value, limit), max(value, limit)
    return (stored >= lo) & (stored <= hi)


def _modality_of(ds: Dataset, modality_arg: str | None) -> tuple[str, str]:
    tag = str_or_empty(ds.get("Modality")).upper()
    if tag in ("CT", "MR"):
        return tag, "dicom"
    if modality_arg is not None:
        return modality_arg, "argument"
    return "OT", "dicom"


def _source_dtype_from_rescale(
    rescales: Sequence[tuple[float, float]], stored_integer: bool, lo: float, hi: float
) -> np.dtype:
    """Values are integers when stored integers go through integer slopes and intercepts (the common CT case
    slope 1, intercept -1024): then int16 if it fits (uint16 / int32 otherwise), else float32."""
    integral = stored_integer and all(float(s).is_integer() and float(i).is_integer() for s, i in rescales)
    return integral_dtype_for(lo, hi) if integral else np.dtype(np.float32)


def _is_lossy_syntax(syntax: Any) -> bool:
    try:
        return syntax is not None and not syntax.is_lossless
    except (AttributeError, ValueError):  # private or unknown transfer syntax: no claim either way
        return False


def _dicom_metadata(ds: Dataset) -> dict:
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    meta = {
        "format": "dicom",
        "series_instance_uid": str_or_empty(ds.get("SeriesInstanceUID")),
        "series_description": str_or_empty(ds.get("SeriesDescription")),
        "series_number": ds.get("SeriesNumber"),
        "study_instance_uid": str_or_empty(ds.get("StudyInstanceUID")),
        "study_description": str_or_empty(ds.get("StudyDescription")),
        "study_date": str_or_empty(ds.get("StudyDate")),
        "patient_id": str_or_empty(ds.get("PatientID")),
        "patient_name": str_or_empty(ds.get("PatientName")),
        "frame_of_reference_uid": str_or_empty(ds.get("FrameOfReferenceUID")),
        "dicom_modality": str_or_empty(ds.get("Modality")),
        "manufacturer": str_or_empty(ds.get("Manufacturer")),
        "convolution_kernel": str_or_empty(ds.get("ConvolutionKernel")),
        "slice_thickness": first_number(ds.get("SliceThickness") or (
            _frame_item(ds, 0, "PixelMeasuresSequence") or Dataset()).get("SliceThickness")),
        "transfer_syntax": str(syntax) if syntax is not None else "",
        "lossy_compressed": str_or_empty(ds.get("LossyImageCompression")) == "01" or _is_lossy_syntax(syntax),
        "photometric_interpretation": str_or_empty(ds.get("PhotometricInterpretation")),
    }
    # an enhanced object has its window in the functional groups (FrameVOILUTSequence)
    window = ds if "WindowCenter" in ds else (_frame_item(ds, 0, "FrameVOILUTSequence") or Dataset())
    center, width = first_number(window.get("WindowCenter")), first_number(window.get("WindowWidth"))
    if center is not None and width is not None and math.isfinite(center) and math.isfinite(width):
        meta["window_center"], meta["window_width"] = center, width
    tilt = ds.get("GantryDetectorTilt")
    if tilt not in (None, ""):
        meta["gantry_tilt_deg"] = float_or(tilt, 0.0)
    return meta


def _refuse_unscaled_ct(ds: Dataset, modality: str, stored: np.ndarray, path: Path) -> None:
    """ImageReadError for a CT that declares no rescale (RescaleIntercept, the enhanced objects' Pixel Value
    Transformation, a Modality LUT; Type 1 in a CT image) and whose stored values are all >= 0: its units are unknown
    and most likely the scanner's unsigned ones (air near 0, water near 1024), which read as HU would be denoised
    1024 HU off, as if air were water. A CT in HU holds air (-1000) or fat (-100) somewhere."""
    if modality != "CT" or stored.size == 0 or float(stored.min()) < 0:
        return
    if ("RescaleIntercept" in ds or "ModalityLUTSequence" in ds
            or _frame_item(ds, 0, "PixelValueTransformationSequence") is not None):
        return
    raise ImageReadError(f"{path}: a CT without RescaleIntercept / RescaleSlope whose stored values are all >= 0 "
                         f"({int(stored.min())} to {int(stored.max())}): their units are unknown (air would read as "
                         f"{int(stored.min())} HU, not -1000); add the scanner's rescale (usually RescaleIntercept "
                         "-1024, RescaleSlope 1) or re-export the series")


def _strip_pixels(ds: Dataset) -> Dataset:
    for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
        if keyword in ds:
            delattr(ds, keyword)
    return ds


def _finish_dicom_volume(
    stored_slices: list[np.ndarray],
    rescales: list[tuple[float, float]],
    pad_masks: list[np.ndarray | None],
    ds0: Dataset,
    path: Path,
    modality_arg: str | None,
    fill: bool,
) -> tuple[np.ndarray, str, np.dtype, dict]:
    """Rescale stored slices to physical values, fill padding; returns (float32 values, modality, source
    dtype, metadata facts)."""
    stored = np.stack(stored_slices)
    stored_integer = np.issubdtype(stored.dtype, np.integer)
    check_values(stored, path)
    values = np.empty(stored.shape, dtype=np.float64)
    for k, (slope, intercept) in enumerate(rescales):
        values[k] = stored[k].astype(np.float64) * slope + intercept  # float math, exact for 16-bit integers
    modality, modality_source = _modality_of(ds0, modality_arg)
    mask = None
    if any(m is not None for m in pad_masks):
        mask = np.stack([m if m is not None else np.zeros(stored.shape[1:], dtype=bool) for m in pad_masks])
    check_plausible(values, modality, path, exempt=mask)  # padding the header declares is air whatever its value
    _refuse_unscaled_ct(ds0, modality, stored, path)
    values, pad_info = fill_padding(values, modality, mask, fill)
    lo, hi = float(values.min()), float(values.max())
    source_dtype = _source_dtype_from_rescale(rescales, stored_integer, lo, hi)
    info = {
        "modality_source": modality_source,
        "rescale_slope": rescales[0][0],
        "rescale_intercept": rescales[0][1],
        "input_min": lo,
        "input_max": hi,
        **pad_info,
    }
    return values.astype(np.float32), modality, source_dtype, info


# --------------------------------------------------------------------------------------------------------------
# A single file (2D slice or multi-frame)
# --------------------------------------------------------------------------------------------------------------


_PARSE_ERRORS = (InvalidDicomError, OSError, EOFError, ValueError, KeyError, AttributeError, TypeError,
                 struct.error)


def _dcmread_full(path: Path) -> FileDataset:
    try:
        return pydicom.dcmread(str(path), force=not has_dicom_magic(path))
    except _PARSE_ERRORS as exc:
        raise ImageReadError(f"cannot parse the DICOM file {path}: {one_line(exc)}") from exc


#: the pixel data elements (PixelData, FloatPixelData, DoubleFloatPixelData)
_PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)
#: explicit-VR VRs whose value length takes 4 bytes (after 2 reserved ones)
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}


def _native_syntax(ds: Dataset) -> bool:
    """True when ``ds``'s pixel data is stored as it is (uncompressed, not deflated, or no transfer syntax given: read
    as implicit little endian); False for encapsulated, deflated, private or unknown transfer syntaxes."""
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is None or not str(syntax):
        return True
    try:
        return not (syntax.is_encapsulated or syntax.is_deflated)
    except ValueError:  # not a transfer syntax pydicom knows
        return False


class _Fragments(NamedTuple):
    """The items of encapsulated (compressed) pixel data as they lie in a file, none of them decoded."""

    #: where each frame starts (bytes from the first fragment's item tag) by the Basic or Extended Offset Table;
    #: None when both are empty
    offsets: list[int] | None
    #: the end of each fragment item whose bytes are all there, bytes from the first fragment's item tag
    ends: list[int]
    #: the first bytes (up to :data:`_HEAD_BYTES`) of each of those fragments: where a frame's codestream begins,
    #: its start marker
    heads: list[bytes]
    #: the data ends inside an item (a cut copy)
    cut: bool
    #: the items end with the Sequence Delimitation Item, not with the file (without it pydicom drops the element)
    delimited: bool
    #: the table ``offsets`` come from: "Basic Offset Table", "Extended Offset Table", or "" without one
    table: str = ""


#: how many first bytes of each fragment are kept to tell a frame's start (the JP2 signature box is 12)
_HEAD_BYTES = 12


def _table_offsets(listed: bool, basic: list[int], header: Dataset) -> tuple[list[int], str]:
    """(where each frame starts, bytes from the first fragment's item tag; the table's name): the Basic Offset Table
    (``basic``, as pydicom's ``get_frame_offsets`` gives it, ``listed`` False when empty), else ``header``'s
    Extended Offset Table; ([], "") when both are empty."""
    if listed:
        return basic, "Basic Offset Table"
    extended = header.get("ExtendedOffsetTable")
    if isinstance(extended, bytes) and extended and len(extended) % 8 == 0:
        return list(struct.unpack(f"<{len(extended) // 8}Q", extended)), "Extended Offset Table"
    return [], ""


def _walk_fragments(stream: BinaryIO, end: int, header: Dataset) -> _Fragments | None:
    """The items of encapsulated pixel data (PS3.5 A.4) read from ``stream``, positioned at the Basic Offset Table
    item, up to ``end`` (bytes, the stream's end) or the sequence delimiter: offsets and fragment lengths only, the
    fragments skipped. The Extended Offset Table, when the Basic one is empty, comes from ``header``. None when the
    items are not laid out as the standard says (left to the decoder, which names it)."""
    fp = DicomFileLike(stream)
    fp.is_little_endian = True  # encapsulated transfer syntaxes are all explicit VR little endian
    try:
        listed, offsets = get_frame_offsets(fp)
    except (EOFError, struct.error):  # the data ends inside the Basic Offset Table
        return _Fragments(None, [], [], True, False)
    except ValueError:  # no Basic Offset Table item first
        return None
    offsets, table = _table_offsets(listed, offsets, header)
    first = stream.tell()
    ends: list[int] = []
    heads: list[bytes] = []
    while True:
        item = stream.read(8)
        if len(item) < 8:  # the items end with the file
            return _Fragments(offsets or None, ends, heads, len(item) > 0, False, table)
        group, element, length = struct.unpack("<HHI", item)
        tag = group << 16 | element
        if tag == 0xFFFEE0DD:
            return _Fragments(offsets or None, ends, heads, False, True, table)
        if tag != 0xFFFEE000 or length == 0xFFFFFFFF:
            return None
        if stream.tell() + length > end:
            return _Fragments(offsets or None, ends, heads, True, False, table)
        heads.append(stream.read(min(length, _HEAD_BYTES)))
        stream.seek(length - len(heads[-1]), os.SEEK_CUR)
        ends.append(stream.tell() - first)


def _encapsulated_syntax(ds: Dataset) -> bool:
    """True when ``ds``'s transfer syntax is an encapsulated (compressed) one pydicom knows, not deflated."""
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    try:
        return syntax is not None and bool(str(syntax)) and syntax.is_encapsulated and not syntax.is_deflated
    except ValueError:  # not a transfer syntax pydicom knows
        return False


def _dcmread_header(path: Path) -> tuple[FileDataset, tuple[int, int] | _Fragments | None]:
    """(header without pixel data, its pixel data element) of a DICOM file, without reading any pixel: pydicom
    stops in front of the pixel data element, whose own 8 or 12 header bytes are read here. The element, when
    uncompressed: (declared length, bytes the file holds after its header); when encapsulated (compressed): its
    items (:class:`_Fragments`, the fragments skipped, not read); None when the element is absent, or not where its
    bytes can be counted (a deflated transfer syntax)."""
    try:
        with open(path, "rb") as handle:
            header = pydicom.dcmread(handle, stop_before_pixels=True, force=not has_dicom_magic(path))
            encapsulated = _encapsulated_syntax(header)
            if not (encapsulated or _native_syntax(header)):
                return header, None  # deflated: parsed from an inflated copy, not at the handle's position
            start = handle.tell()
            element = handle.read(12)
            if encapsulated:
                group, number = struct.unpack("<HH", element[:4]) if len(element) == 12 else (0, 0)
                if (group << 16 | number) != 0x7FE00010 or element[8:12] != b"\xff\xff\xff\xff":
                    return header, None  # no pixel data, or not encapsulated as its transfer syntax says
                return header, _walk_fragments(handle, os.path.getsize(path), header)
    except _PARSE_ERRORS as exc:
        raise ImageReadError(f"cannot parse the DICOM file {path}: {one_line(exc)}") from exc
    order = "<" if header.is_little_endian in (None, True) else ">"
    if len(element) < 8:
        return header, None
    group, number = struct.unpack(order + "HH", element[:4])
    if (group << 16 | number) not in _PIXEL_TAGS:
        return header, None
    if header.is_implicit_VR:
        length, value_start = struct.unpack(order + "I", element[4:8])[0], start + 8
    elif element[4:6] in _LONG_VRS:
        if len(element) < 12:
            return header, None
        length, value_start = struct.unpack(order + "I", element[8:12])[0], start + 12
    else:
        length, value_start = struct.unpack(order + "H", element[6:8])[0], start + 8
    if length == 0xFFFFFFFF:
        return header, None  # encapsulated (compressed) frames: their decoder checks them
    return header, (length, max(0, os.path.getsize(path) - value_start))


def _held_bytes(element: tuple[int, int] | _Fragments | None) -> int | None:
    """The bytes of uncompressed pixel data a file holds (``element``: from :func:`_dcmread_header`): its declared
    length, or what the file holds after the element's header when that is less; None for encapsulated (compressed)
    pixel data, or none that can be counted."""
    if element is None or isinstance(element, _Fragments):
        return None
    length, available = element
    return min(length, available)


def uncompressed_pixel_bytes(path: Path) -> int | None:
    """The bytes of uncompressed pixel data the DICOM file ``path`` holds (its pixel data element's declared length,
    or what the file holds after that element's header when it is cut short), read without any pixel; None when its
    pixel data is encapsulated (compressed), absent, or cannot be counted (a deflated transfer syntax). What a
    reader checks a file's pixel data against (:func:`_check_pixel_bytes`), and a frame-by-frame download its
    instances (:func:`lib.pacs.check_by_frame`).

    Raises:
        ImageReadError: its header does not parse as DICOM.
        OSError: it cannot be opened.
    """
    return _held_bytes(_dcmread_header(path)[1])


def declared_shape(ds: Dataset, path: Path) -> tuple[int, ...]:
    """(frames, rows, columns), with the samples per pixel last when more than 1, from a header. A NumberOfFrames
    of 0 or empty is one frame, as pydicom decodes it."""
    text = str_or_empty(ds.get("NumberOfFrames"))
    frames = float_or(text, float("nan")) if text else 1.0
    frames = 1.0 if frames == 0 else frames
    if not (math.isfinite(frames) and frames >= 1 and float(frames).is_integer()):
        raise ImageReadError(f"{path}: NumberOfFrames is {str_or_empty(ds.get('NumberOfFrames'))!r}, not a number "
                             "of frames >= 1: the header is corrupt")
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    return (int(frames), int(ds.Rows), int(ds.Columns)) + ((samples,) if samples > 1 else ())


def _check_frames(ds: Dataset, path: Path, shape: Sequence[int], items: _Fragments) -> None:
    """Refuse encapsulated (compressed) pixel data (``items``: from :func:`_dcmread_header`) that holds fewer whole
    frames than the ``shape[0]`` the header declares (a cut copy, a NumberOfFrames too large: the decoder's message
    was a failed reshape, or "without pixel data"), whose offset table lists more frames than declared (the decoder
    returns the first ones: frames lost), or whose last fragment is cut (naming the frame it is in where the table
    tells), or that ends without its Sequence Delimitation Item (a copy cut at a fragment's boundary: pydicom drops
    the whole element, and the last frame may have lost fragments), or frames in more fragments than frames whose
    starts are not known (:func:`_first_fragments`: a table entry that is not a fragment's start; without a table,
    RLE Lossless, or JPEG whose fragments beginning a codestream are not one a frame), or an offset table that
    disagrees with fragments one a frame where that is not certain (:func:`_table_set_aside`; where it is, the table
    is set aside). Counted from the offset table (a frame is whole when the next one's start, or for the last frame
    the delimiter, is in the file); without one, from the fragments (each frame takes one or more: fewer fragments
    than frames is frames missing). The fragments are never decoded (their first bytes are looked at)."""
    declared = int(shape[0])
    size = " x ".join(str(int(v)) for v in shape)
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    what = f"its compressed ({getattr(syntax, 'name', syntax)}) pixel data"
    whole_bytes = items.ends[-1] if items.ends else 0
    truncated = items.cut or not items.delimited
    starts = [0, *items.ends[:-1]]
    offsets = items.offsets
    if not truncated and _table_set_aside(ds, path, shape, items.table, offsets or [], starts, items.heads):
        offsets = None
    if offsets is not None:
        bounds = [*offsets[1:], None]
        held = sum(1 for start, stop in zip(offsets, bounds)
                   if (stop is not None and stop <= whole_bytes) or (stop is None and not truncated
                                                                     and start < whole_bytes))
        counted = f"holds {held} whole frame(s) of the {len(offsets)} its offset table lists"
    else:
        held = len(items.ends)
        counted = f"holds {held} whole fragment(s), and a frame takes one or more"
    if not items.delimited and not items.cut:
        counted += "; it ends without its sequence delimiter (FFFE,E0DD), so its last frame may lack fragments"
    # the frame the cut fragment is in: the last whose start is at or before that fragment's item tag
    cut_frame = bisect.bisect_right(offsets, whole_bytes) if offsets is not None else 0
    if items.cut and 1 <= cut_frame <= declared:
        raise ImageReadError(
            f"{path} is truncated: {what} ends inside frame {cut_frame} of the {declared} its header declares "
            f"({size} voxels), in a fragment cut short (a cut copy): {held} whole frame(s) found, by its offset table")
    if items.cut and offsets is None and items.ends:
        raise ImageReadError(
            f"{path} is truncated: {what} ends inside its fragment {len(items.ends) + 1}, cut short (a cut copy): its "
            f"header declares {declared} frame(s) ({size} voxels), at most {min(len(items.ends), declared - 1)} of "
            "them whole (without an offset table, which frame a fragment belongs to is unknown)")
    if held < declared:
        raise ImageReadError(
            f"{path} is truncated or corrupt: its header declares {declared} frame(s) ({size} voxels), but {what} "
            f"{counted} (a cut copy, or NumberOfFrames is wrong)")
    if offsets is not None and len(offsets) > declared:
        raise ImageReadError(
            f"{path} is corrupt: {what} holds {len(offsets)} frames by its offset table, "
            f"{len(offsets) - declared} more than its header declares ({size} voxels): NumberOfFrames is "
            "wrong, and reading it would leave frames out; fix the header or re-export the image")
    if truncated:  # without a table: fragments enough, but the last frame's may be cut off after any of them
        raise ImageReadError(
            f"{path} is truncated or corrupt: its header declares {declared} frame(s) ({size} voxels), but {what} "
            f"{counted} (a cut copy)")
    _first_fragments(ds, path, shape, offsets or [], starts, items.heads, items.table)


#: the bytes each frame's codestream begins with, by transfer syntax: JPEG's and JPEG-LS's start of image marker
#: and the next marker's first byte, JPEG 2000's start of codestream and image and tile size markers. JPEG's coded
#: data cannot hold FFD8 (an FF in it is followed by 00, or by a byte under 80 in JPEG-LS), JPEG 2000's rarely
#: holds them; every frame's first fragment begins with them, so exactly one such fragment a frame tells the starts.
#: PS3.5 A.4.4 forbids the JP2 file format header in pixel data, but some writers put it there and GDCM and
#: OpenJPEG read such frames: a frame beginning with the JP2 signature box (12 bytes) is a frame start too.
_CODESTREAM_STARTS: dict[str, tuple[tuple[bytes, ...], str]] = {
    **dict.fromkeys(JPEGTransferSyntaxes + JPEGLSTransferSyntaxes,
                    ((b"\xff\xd8\xff",), "a start of image marker (FFD8)")),
    **dict.fromkeys(JPEG2000TransferSyntaxes,
                    ((b"\xff\x4f\xff\x51", b"\x00\x00\x00\x0cjP  \r\n\x87\n"),
                     "a start of codestream marker (FF4F) or a JP2 signature box")),
}


def _table_set_aside(ds: Dataset, path: Path, shape: Sequence[int], table: str, offsets: Sequence[int],
                     starts: Sequence[int], heads: Sequence[bytes]) -> bool:
    """True when ``ds``'s ``table`` (Basic or Extended Offset Table; ``offsets``, [] when there is none) disagrees
    with fragments (``starts``, ``heads`` as for :func:`_first_fragments`) as many as the ``shape[0]`` frames the
    header declares, which are then one a frame (a frame takes one or more), the table set aside: pydicom's
    pylibjpeg decoding follows the Basic table, so a wrong one read other frames' bytes as a frame, silently. A
    table of as many entries or more cannot be right; one of fewer frames is set aside where one a frame is certain
    (RLE Lossless: one fragment a frame by the standard; JPEG: each fragment begins with its codec's start marker),
    else it is ImageReadError: the table or NumberOfFrames is wrong, which is unknown. False when the table agrees,
    or there is none, or the fragments are not as many as the frames."""
    n_frames = int(shape[0])
    if not offsets or len(starts) != n_frames or list(offsets) == list(starts):
        return False
    if len(offsets) >= n_frames:
        return True
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    markers, name = _CODESTREAM_STARTS.get(str(syntax), ((), ""))
    unmarked = next((j for j, head in enumerate(heads) if not head.startswith(markers)), None) if markers else None
    if syntax == RLELossless or (markers and unmarked is None):
        return True
    reason = (f"its fragment {unmarked + 1} does not begin with {name}, as each frame does" if markers else
              "its codec has no start marker to tell where a frame begins")
    raise ImageReadError(
        f"{path} is corrupt: its {table} lists {len(offsets)} frame(s), but its header declares {n_frames} and its "
        f"compressed ({getattr(syntax, 'name', syntax)}) pixel data holds {n_frames} fragments, one a frame, and "
        f"{reason}: whether the table or NumberOfFrames is wrong is unknown; re-export the image")


def _first_fragments(ds: Dataset, path: Path, shape: Sequence[int], offsets: Sequence[int], starts: Sequence[int],
                     heads: Sequence[bytes], table: str = "") -> list[int] | None:
    """The index of each frame's first fragment, for ``ds``'s encapsulated pixel data of ``shape[0]`` frames in
    more fragments than frames (``starts``: each fragment's item tag, bytes from the first one's; ``heads``: its
    first bytes, up to :data:`_HEAD_BYTES`): by the Basic or Extended Offset Table (``offsets``, ``table`` its
    name; [] when there is none), else, for JPEG, JPEG-LS and JPEG 2000, the fragments that begin with the codec's
    start marker (each frame's codestream does), when they are one a frame and the first fragment is one of them.
    None when each frame
    takes one fragment (or one frame all), or a table lists another number of frames (:func:`_check_frames` counts
    them), or the codec has no start marker (left to the decoder). ImageReadError when a table puts a frame where no
    fragment starts (or not after the previous frame's), or, without a table, for RLE Lossless (a frame's fragments
    cannot be told apart), or JPEG whose fragments beginning a codestream are not one a frame: where each frame
    starts is unknown.
    Shared by the header check and the join before decoding."""
    n_frames = int(shape[0])
    if n_frames < 2 or len(starts) <= n_frames or (offsets and len(offsets) != n_frames):
        return None
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    what = f"its compressed ({getattr(syntax, 'name', syntax)}) pixel data"
    if offsets:
        index = {start: k for k, start in enumerate(starts)}
        for k, offset in enumerate(offsets):  # the first frame at the first fragment, each next one at a later one
            if offset not in index or (offset <= offsets[k - 1] if k else offset != 0):
                raise ImageReadError(
                    f"{path} is corrupt: its {table or 'offset table'} puts frame {k + 1} of {n_frames} at byte "
                    f"{offset}, not at the start of a fragment of its compressed pixel data after the previous "
                    "frame's (the first frame at byte 0): where its frames start is unknown; re-export the image")
        return [index[offset] for offset in offsets]
    size = " x ".join(str(int(v)) for v in shape)
    held = f"{what} holds {len(starts)} fragments for the {n_frames} frames its header declares ({size} voxels)"
    if syntax == RLELossless:
        raise ImageReadError(
            f"{path} cannot be read: {held} and no offset table: RLE Lossless puts each frame in one fragment, and "
            "without a Basic or Extended Offset Table where each frame starts is unknown; re-export the image (one "
            "fragment a frame, or with an offset table)")
    markers, name = _CODESTREAM_STARTS.get(str(syntax), ((), ""))
    if not markers:
        return None
    first = [k for k, head in enumerate(heads) if head.startswith(markers)]
    if len(first) != n_frames or first[0] != 0:
        raise ImageReadError(
            f"{path} cannot be read: {held} and no offset table, and {len(first)} of its fragments begin with {name}, "
            f"as each frame does{'' if first[:1] == [0] else ', not the first one'}: where each frame starts is "
            "unknown (NumberOfFrames is wrong, or the data is damaged); re-export the image (one fragment a frame, "
            "or with an offset table)")
    return first


_ITEM_TAG = b"\xfe\xff\x00\xe0"  # (FFFE,E000), little endian


def _fragment_spans(data: bytes) -> tuple[list[int], list[tuple[int, int]]] | None:
    """(the Basic Offset Table's entries, [] when it is empty; (where its value starts in ``data``, its length) of
    each fragment) of encapsulated pixel data ``data`` (PS3.5 A.4), up to the Sequence Delimitation Item or the
    end; nothing copied. None when the items are not laid out as the standard says, or the data ends inside one."""
    if len(data) < 8 or data[:4] != _ITEM_TAG:
        return None
    table_length = struct.unpack_from("<I", data, 4)[0]
    if table_length % 4 or 8 + table_length > len(data):
        return None
    basic = list(struct.unpack_from(f"<{table_length // 4}I", data, 8))
    spans: list[tuple[int, int]] = []
    position = 8 + table_length
    while position + 8 <= len(data):
        group, element, length = struct.unpack_from("<HHI", data, position)
        if (group << 16 | element) == 0xFFFEE0DD:
            break
        if (group << 16 | element) != 0xFFFEE000 or position + 8 + length > len(data):
            return None
        spans.append((position + 8, length))
        position += 8 + length
    return basic, spans


def _join_frame_fragments(ds: Dataset, path: Path, shape: Sequence[int]) -> None:
    """``ds``'s encapsulated pixel data of ``shape[0]`` frames rewritten with one fragment a frame (each frame's
    fragments joined, in order) and an empty Basic Offset Table, where a frame takes several and
    :func:`_first_fragments` tells where each starts (its Basic or Extended Offset Table, or the JPEG start
    markers): pydicom 2's RLE and GDCM decoders take each fragment for a frame, so a frame in two failed with a
    decoder's message (RLE: about segment lengths; JPEG-LS: a missing plugin); and where fragments one a frame have
    a table that disagrees with them (:func:`_table_set_aside`: pydicom's pylibjpeg decoding would follow it).
    ImageReadError as those two (the header check refuses those first). Left as it is otherwise (one fragment a
    frame and a table that agrees, not encapsulated, or items not laid out as the standard says: left to the
    decoder). The new value is written once, at its full length, from views of the old one."""
    data = ds.get("PixelData")
    if int(shape[0]) < 2 or not _encapsulated_syntax(ds) or not isinstance(data, bytes):
        return
    walked = _fragment_spans(data)
    if walked is None or not walked[1]:
        return
    basic, spans = walked
    starts = [start - spans[0][0] for start, _ in spans]  # each fragment's item tag, bytes from the first one's
    offsets, table = _table_offsets(bool(basic), basic, ds)
    heads = [data[start:start + min(length, _HEAD_BYTES)] for start, length in spans]
    if _table_set_aside(ds, path, shape, table, offsets, starts, heads):
        first: list[int] | None = list(range(len(spans)))
    else:
        first = _first_fragments(ds, path, shape, offsets, starts, heads, table)
    if first is None:
        return
    first.append(len(spans))
    view = memoryview(data)
    # an empty Basic Offset Table: one fragment a frame needs none (and its 32-bit entries stop at 4 GiB)
    pieces: list[bytes | memoryview] = [_ITEM_TAG, b"\x00\x00\x00\x00"]
    for k in range(len(first) - 1):
        frame = spans[first[k]:first[k + 1]]
        length = sum(size for _, size in frame)
        pieces += [_ITEM_TAG, struct.pack("<I", length + length % 2)]
        pieces += [view[start:start + size] for start, size in frame]
        if length % 2:  # an item's value has an even length
            pieces.append(b"\x00")
    ds.PixelData = b"".join(pieces)  # one allocation: join sums the lengths first
    del pieces, view
    for keyword in ("ExtendedOffsetTable", "ExtendedOffsetTableLengths"):  # they describe the old fragments
        if keyword in ds:
            delattr(ds, keyword)


def _check_pixel_bytes(ds: Dataset, path: Path, shape: Sequence[int],
                       element: tuple[int, int] | _Fragments | None) -> None:
    """Refuse uncompressed pixel data (``element``: from :func:`_dcmread_header`) shorter than ``shape`` at
    BitsAllocated bits a value (a file cut short, or a header declaring more frames than it holds), or longer by
    one whole frame or more (NumberOfFrames too small: pydicom drops the excess as padding, frames were lost);
    encapsulated pixel data as :func:`_check_frames` does."""
    if isinstance(element, _Fragments):
        _check_frames(ds, path, shape, element)
        return
    held = _held_bytes(element)
    if held is None:
        return
    bits = int(float_or(ds.get("BitsAllocated"), 0.0))
    if bits < 1:
        return  # the decoder reports it
    length, available = element
    frame_bits = int(np.prod([int(v) for v in shape[1:]], dtype=np.float64)) * bits
    declared_bits = int(shape[0]) * frame_bits
    size = " x ".join(str(int(v)) for v in shape)
    declared = -(-declared_bits // 8)
    if held < declared:
        cut = f"the file holds {held:,}" if available < length else f"its pixel data element holds {held:,}"
        raise ImageReadError(
            f"{path} is truncated or corrupt: its header declares {size} voxels ({declared:,} bytes of pixel "
            f"data at {bits} bits), but {cut} bytes (a cut copy, or NumberOfFrames / Rows / Columns are wrong)")
    padded = declared + declared % 2  # an element's value has an even length: one byte may pad it
    extra = (held - padded) * 8 // frame_bits if frame_bits and held > padded else 0
    if extra >= 1:
        raise ImageReadError(
            f"{path} is corrupt: its pixel data holds {held:,} bytes, {extra} whole frame(s) more than its header "
            f"declares ({size} voxels, {declared:,} bytes): NumberOfFrames (or Rows / Columns) is wrong, and "
            "reading it would leave frames out; fix the header or re-export the image")


def check_pixel_data(path: Path) -> None:
    """Refuse a DICOM file whose pixel data is cut short (or holds whole frames more than its header declares), as
    :func:`read_dicom_file` and :func:`read_dicom_folder` refuse it, from its header and the pixel data element's
    own header (:func:`_check_pixel_bytes`): no pixel is read."""
    header, element = _dcmread_header(path)
    _check_pixel_bytes(header, path, declared_shape(header, path), element)


def read_dicom_file(
    path: Path, series_uid: str | None, modality_arg: str | None, fill: bool, limit: int
) -> Volume:
    """One DICOM file: a 2D slice (y, x), or a 3D volume (z, y, x) when it is multi-frame.

    ``series_uid`` (None: any) must match the file's series; ``modality_arg`` fills in when the Modality tag is
    neither CT nor MR; ``fill`` sets padding to air / 0; ``limit`` is the voxel limit (Rows x Columns x
    NumberOfFrames x SamplesPerPixel), checked from the header before any pixel data is read, after the refusal of
    colour (SamplesPerPixel other than 1, refused whatever the size), as the length of uncompressed pixel data and
    the frames of compressed pixel data (:func:`_check_pixel_bytes`)."""
    header, element = _dcmread_header(path)
    if not _is_image_header(header):
        raise ImageReadError(
            f"{path} is a DICOM file without image attributes (no Rows/Columns: truncated, or not an image object; "
            f"SOP class {header.get('SOPClassUID', 'unknown')})"
        )
    if series_uid is not None and str_or_empty(header.get("SeriesInstanceUID")) != series_uid:
        raise ImageReadError(
            f"{path} belongs to series {str_or_empty(header.get('SeriesInstanceUID'))!r}, not the requested "
            f"{series_uid!r}"
        )
    # colour first: refused whatever its size, it was refused as too large when only its 3 samples took it over
    _check_samples(header, path)
    shape = declared_shape(header, path)
    check_size(shape, path, limit)
    _check_pixel_bytes(header, path, shape, element)
    ds = _dcmread_full(path)
    if not _is_image_header(ds) or declared_shape(ds, path) != shape:
        raise ImageReadError(f"{path} changed while it was being read (its header no longer declares {shape}); "
                             "read it again once it is complete")
    _check_pixel_format(ds, path)
    n_frames = int(float_or(ds.get("NumberOfFrames", 1), 1.0))
    if n_frames > 1:
        return _read_multiframe(ds, path, modality_arg, fill)

    stored = _decode_pixels(ds, path)
    if stored.ndim != 2:
        raise ImageReadError(f"{path}: unexpected pixel array shape {stored.shape} for a single-frame image")
    # an enhanced (CT/MR) object of one frame keeps its rescale and geometry in the functional groups, not at the
    # top level: without them its CT values came out 1024 above HU, with 1 mm pixels and no position
    rescale = _rescale_of(_frame_item(ds, 0, "PixelValueTransformationSequence"), ds, path)
    mask = _padding_mask(ds, stored)
    values, modality, source_dtype, info = _finish_dicom_volume(
        [_modality_lut(ds, stored, path)], [rescale], [mask], ds, path, modality_arg, fill
    )
    ipp, iop, ps = _slice_plane(ds)
    measures = _frame_item(ds, 0, "PixelMeasuresSequence") or Dataset()
    origin, direction, plane = plane_geometry_2d(ipp, iop, str(path))
    metadata = _dicom_metadata(ds)
    metadata.update(info)
    # a slice's extent along its normal, for writing it as a one-slice 3D image (the order SimpleITK uses, then
    # the nominal thickness)
    slice_step = (float_or(ds.get("SpacingBetweenSlices"), 0.0) or float_or(measures.get("SpacingBetweenSlices"), 0.0)
                  or float_or(ds.get("SliceThickness"), 0.0) or float_or(measures.get("SliceThickness"), 0.0) or 1.0)
    metadata.update(
        {
            "image_position_patient": ipp,
            "image_orientation_patient": iop,
            "plane_geometry": plane,
            "slice_spacing": abs(slice_step),
            "multiframe": False,
        }
    )
    if ps is None:
        metadata["spacing_note"] = "no PixelSpacing: 1 mm assumed"
    header = _strip_pixels(ds)
    return Volume(
        array=values[0],
        spacing=(ps[1], ps[0]) if ps else (1.0, 1.0),
        origin=origin,
        direction=direction,
        modality=modality,
        source_dtype=source_dtype,
        source_path=path,
        dicom_headers=[header],
        metadata=metadata,
    )


def _frame_item(ds: Dataset, k: int, *keywords: str) -> Dataset | None:
    """The functional group item ``keywords`` of frame ``k`` (0-based) of an enhanced object: per-frame, else
    shared; None when neither has it (classic objects)."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    item = sequence_item(per_frame[k], *keywords) if k < len(per_frame) else None
    if item is None and "SharedFunctionalGroupsSequence" in ds:
        item = sequence_item(ds, "SharedFunctionalGroupsSequence", *keywords)
    return item


def _slice_plane(ds: Dataset) -> tuple[list[float] | None, list[float] | None, list[float] | None]:
    """(ImagePositionPatient, ImageOrientationPatient, PixelSpacing (or ImagerPixelSpacing)) of a one-frame
    object, each None when absent: from the top level, or from the functional groups of an enhanced object."""
    position = _frame_item(ds, 0, "PlanePositionSequence") or Dataset()
    orientation = _frame_item(ds, 0, "PlaneOrientationSequence") or Dataset()
    measures = _frame_item(ds, 0, "PixelMeasuresSequence") or Dataset()
    ipp = float_list(ds.get("ImagePositionPatient"), 3) or float_list(position.get("ImagePositionPatient"), 3)
    iop = float_list(ds.get("ImageOrientationPatient"), 6) or float_list(orientation.get("ImageOrientationPatient"), 6)
    ps = (float_list(ds.get("PixelSpacing"), 2) or float_list(measures.get("PixelSpacing"), 2)
          or float_list(ds.get("ImagerPixelSpacing"), 2))
    return ipp, iop, ps


def _read_multiframe(ds: FileDataset, path: Path, modality_arg: str | None, fill: bool) -> Volume:
    """A multi-frame object (enhanced CT/MR or legacy multi-frame) as a 3D volume."""
    n = int(float_or(ds.get("NumberOfFrames", 1), 1.0))
    _join_frame_fragments(ds, path, declared_shape(ds, path))
    frames = _decode_pixels(ds, path)
    if frames.ndim != 3 or frames.shape[0] != n:
        raise ImageReadError(f"{path}: pixel array shape {frames.shape} does not match NumberOfFrames {n}")

    positions, orientations, spacings, rescales = [], [], [], []
    geometry_complete = True
    for k in range(n):
        pos_item = _frame_item(ds, k, "PlanePositionSequence")
        ori_item = _frame_item(ds, k, "PlaneOrientationSequence")
        mea_item = _frame_item(ds, k, "PixelMeasuresSequence")
        ipp = float_list(pos_item.get("ImagePositionPatient") if pos_item else None, 3)
        iop = float_list(ori_item.get("ImageOrientationPatient") if ori_item else ds.get("ImageOrientationPatient"), 6)
        ps = float_list(mea_item.get("PixelSpacing") if mea_item else ds.get("PixelSpacing"), 2)
        if ipp is None or iop is None or ps is None:
            geometry_complete = False
        positions.append(ipp)
        orientations.append(iop)
        spacings.append(ps)
        rescales.append(_rescale_of(_frame_item(ds, k, "PixelValueTransformationSequence"), ds, path))

    metadata = _dicom_metadata(ds)
    if geometry_complete:
        geom = stack_geometry(
            np.asarray(positions), np.asarray(orientations), np.asarray(spacings),
            [float_or(ds.get("GantryDetectorTilt"), 0.0)], str(path), None,
        )
        order, spacing, origin, direction = geom
        metadata["geometry_source"] = "per-frame functional groups"
    else:
        # legacy multi-frame (e.g. NM) or incomplete headers: frames in file order, spacing from the header
        order = np.arange(n)
        ps = float_list(ds.get("PixelSpacing"), 2) or [1.0, 1.0]
        step = float_or(ds.get("SpacingBetweenSlices"), 0.0) or float_or(ds.get("SliceThickness"), 0.0) or 1.0
        ipp = float_list(ds.get("ImagePositionPatient"), 3) or [0.0, 0.0, 0.0]
        iop = float_list(ds.get("ImageOrientationPatient"), 6)
        if iop is not None:
            direction = orientation_direction(iop, str(path))
        else:
            direction = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
        spacing, origin = (ps[1], ps[0], abs(step)), tuple(ipp)
        metadata["geometry_source"] = "header fallback (no per-frame positions): frames in file order"
    stored = [frames[k] for k in order]
    values, modality, source_dtype, info = _finish_dicom_volume(
        stored, [rescales[k] for k in order], [_padding_mask(ds, s) for s in stored], ds, path, modality_arg,
        fill,
    )
    metadata.update(info)
    metadata.update({"multiframe": True, "frame_order": [int(k) for k in order]})
    return Volume(
        array=values,
        spacing=spacing,
        origin=origin,
        direction=direction,
        modality=modality,
        source_dtype=source_dtype,
        source_path=path,
        dicom_headers=[_strip_pixels(ds)],
        metadata=metadata,
    )


# --------------------------------------------------------------------------------------------------------------
# A folder (one series)
# --------------------------------------------------------------------------------------------------------------


#: MR ImageType values naming the complex component: magnitude and phase images are never one volume
_COMPLEX_COMPONENTS = ("M", "P", "R", "I", "MAGNITUDE", "PHASE", "REAL", "IMAGINARY")


def _volume_key(header: Dataset) -> dict[str, str]:
    """The attributes that every slice of one 3D volume shares, as text: the modality, the echo (number and
    time), the time point, the reconstruction kernel and the complex component (MR ImageType M/P/R/I)."""
    echo_time = float_or(header.get("EchoTime"), float("nan"))
    image_type = [str(v).strip().upper() for v in (header.get("ImageType") or [])]
    return {
        "Modality": str_or_empty(header.get("Modality")).upper(),
        "EchoNumbers": str_or_empty(header.get("EchoNumbers")),
        "EchoTime": f"{echo_time:.3f}" if math.isfinite(echo_time) else "",
        "TemporalPositionIdentifier": str_or_empty(header.get("TemporalPositionIdentifier")),
        "ConvolutionKernel": str_or_empty(header.get("ConvolutionKernel")),
        "ImageType (complex component)": next((v for v in image_type[2:] if v in _COMPLEX_COMPONENTS), ""),
    }


def _mixed_volumes(headers: list[Dataset], names: list[str]) -> str | None:
    """Why the slices of one SeriesInstanceUID are not one 3D volume, naming files, or None.

    A localizer (scout) kept in a CT series, two MR echoes or a magnitude and a phase image, two time points or
    two reconstruction kernels under one uid (or under the empty uid of hard-anonymised data) would otherwise be
    stacked into one volume when their positions interleave, or be refused as "different sizes" or "share a
    position" without saying what is mixed."""
    localizers = [name for header, name in zip(headers, names)
                  if "LOCALIZER" in [str(v).strip().upper() for v in (header.get("ImageType") or [])]]
    if localizers and len(localizers) < len(headers):
        shown = ", ".join(localizers[:3]) + (f" and {len(localizers) - 3} more" if len(localizers) > 3 else "")
        return (f"{len(localizers)} of {len(headers)} slices are localizer (scout) images ({shown}, ImageType "
                "LOCALIZER): they are not part of the volume; move them out of the folder")
    keys = [_volume_key(header) for header in headers]
    for attribute in keys[0]:
        first_seen: dict[str, str] = {}
        for key, name in zip(keys, names):
            first_seen.setdefault(key[attribute], name)
        if len(first_seen) > 1:
            shown = "; ".join(f"{value or '(none)'!r} in {name}" for value, name in list(first_seen.items())[:4])
            return (f"{attribute} differs between slices ({shown}): the series holds several volumes (echoes, "
                    "time points, reconstructions, magnitude/phase), not one 3D volume; put the slices of one "
                    "volume in a folder of their own")
    return _mixed_thickness(headers, names)


#: slice thicknesses closer than this (mm) are one: scanners write "1" and "1.0", 0.625 and 0.6250, rounded floats
_THICKNESS_TOLERANCE_MM = 0.01


def _mixed_thickness(headers: list[Dataset], names: list[str]) -> str | None:
    """Why slices of different SliceThickness are not one volume, or None. A 1 mm and a 5 mm reconstruction of
    one acquisition under one series uid, whose positions interleave evenly, were stacked into one volume (thin and
    thick slices alternating). Thicknesses are compared as numbers (an absent or unreadable value is left out), and
    only groups whose ranges of positions along the slice normal overlap are refused: a sequential head CT has
    thin slices through the posterior fossa and thick ones above, one block each (its uneven spacing is refused
    by the geometry, with that reason)."""
    groups: dict[float, dict] = {}  # thickness -> its text, the first file with it, its positions along the normal
    normal = None
    for header, name in zip(headers, names):
        value = header.get("SliceThickness")
        thickness = float_or(value, float("nan")) if str_or_empty(value) else float("nan")
        ipp, iop, _ = _slice_plane(header)
        if ipp is None or iop is None:
            return None  # no order: the geometry refuses the series, naming the file
        if normal is None:
            normal = np.cross(np.asarray(iop[:3]), np.asarray(iop[3:]))
        if not math.isfinite(thickness):
            continue
        key = next((t for t in groups if abs(thickness - t) <= _THICKNESS_TOLERANCE_MM), thickness)
        group = groups.setdefault(key, {"text": str_or_empty(value), "name": name, "positions": []})
        group["positions"].append(float(np.dot(ipp, normal)))
    ranges = [(min(g["positions"]), max(g["positions"])) for g in groups.values()]
    # overlapping ranges (a single thick slice among thin ones too); blocks one after the other do not overlap
    interleaved = any(max(a[0], b[0]) <= min(a[1], b[1]) for i, a in enumerate(ranges) for b in ranges[i + 1:])
    if not interleaved:
        return None
    shown = "; ".join(f"{g['text']!r} mm in {g['name']}" for g in list(groups.values())[:4])
    return (f"SliceThickness differs between slices at interleaved positions ({shown}): the series holds several "
            "reconstructions (e.g. thin and thick slices of one acquisition), not one 3D volume; put the slices "
            "of one reconstruction in a folder of their own")


def read_dicom_folder(
    folder: Path, series_uid: str | None, modality_arg: str | None, fill: bool, limit: int
) -> Volume:
    """The one series in ``folder`` (or the one with ``series_uid``) as a 3D volume (z, y, x) sorted along the
    slice normal (a series of one file: as :func:`read_dicom_file`). Arguments as :func:`read_dicom_file`."""
    files, ignored, unreadable = _scan_dicom_folder(folder)
    if unreadable:
        raise _unreadable_error(folder, unreadable)
    if not files:
        list_dicom_series(folder)  # raises the right "empty folder" / "no DICOM" message
    series = _group_series(files)
    if series_uid is None:
        if len(series) > 1:
            listing = "; ".join(_describe_series(s) for s in series)
            raise ImageReadError(f"{folder} holds {len(series)} DICOM series; choose one with --series-uid "
                                 f"(series_uid= in Python): {listing}")
        chosen = series[0]
    else:
        matches = [s for s in series if s["uid"] == series_uid]
        if not matches:
            listing = "; ".join(_describe_series(s) for s in series)
            raise ImageReadError(f"{folder} has no series with uid {series_uid!r}; available: {listing}")
        chosen = matches[0]

    paths: list[Path] = chosen["files"]
    headers: list[Dataset] = chosen["_headers"]
    # colour first, from the headers: it was refused only once its slice was read, after the checks of the
    # geometry and the size had refused it for another reason
    for path, header in zip(paths, headers):
        _check_samples(header, path)
    if len(paths) == 1:
        volume = read_dicom_file(paths[0], None, modality_arg, fill, limit)
        volume.metadata["n_files_ignored"] = ignored
        return volume
    multi = [p for p, h in zip(paths, headers) if int(float_or(h.get("NumberOfFrames", 1), 1.0)) > 1]
    if multi:
        raise ImageReadError(
            f"{folder}: series {chosen['uid']!r} mixes {len(multi)} multi-frame files with other files; read one "
            f"multi-frame file directly (e.g. {multi[0]})"
        )
    where = f"{folder} (series {chosen['uid'] or 'with empty SeriesInstanceUID'})"
    seen: dict[str, str] = {}
    for path, header in zip(paths, headers):
        sop = str_or_empty(header.get("SOPInstanceUID"))
        if sop and sop in seen:
            raise ImageReadError(f"{where}: {seen[sop]} and {path.name} are the same image (SOPInstanceUID {sop}): "
                                 "remove the copy")
        seen.setdefault(sop, path.name)
    conflict = identity_conflict(headers, [p.name for p in paths])
    if conflict is not None:
        raise ImageReadError(f"{where}: {conflict}: these files are not one patient's series; put each series in "
                             "a folder of its own")
    mixed = _mixed_volumes(headers, [p.name for p in paths])
    if mixed is not None:
        raise ImageReadError(f"{where}: {mixed}")
    sizes: dict[tuple[int, int], str] = {}
    for path, header in zip(paths, headers):
        sizes.setdefault((int(header.Rows), int(header.Columns)), path.name)
    if len(sizes) > 1:
        shown = "; ".join(f"{rows} x {columns} in {name}" for (rows, columns), name in list(sizes.items())[:4])
        raise ImageReadError(f"{where}: slices have different sizes (rows x columns: {shown}); not one volume")
    check_size((len(paths), *declared_shape(headers[0], paths[0])[1:]), folder, limit)  # samples as a file's

    positions, orientations, spacings, tilts = [], [], [], []
    for path, header in zip(paths, headers):
        ipp, iop, ps = _slice_plane(header)
        if ipp is None or iop is None:
            raise ImageReadError(
                f"{where}: {path.name} has no ImagePositionPatient/ImageOrientationPatient, so the slices cannot be "
                f"ordered; read files one by one as 2D"
            )
        positions.append(ipp)
        orientations.append(iop)
        spacings.append(ps or [1.0, 1.0])
        tilt = header.get("GantryDetectorTilt")
        tilts.append(float_or(tilt, 0.0) if tilt not in (None, "") else None)
    geom = stack_geometry(
        np.asarray(positions), np.asarray(orientations), np.asarray(spacings), tilts, where, paths[0],
        [p.name for p in paths],
    )

    stored_slices, rescales, masks, full_headers = [], [], [], []
    for k in geom.order:
        # the pixel data element from the file, before it is read: pydicom drops compressed pixel data cut short
        header, element = _dcmread_header(paths[k])
        _check_pixel_bytes(header, paths[k], declared_shape(header, paths[k]), element)
        ds = _dcmread_full(paths[k])
        _check_pixel_format(ds, paths[k])
        stored = _decode_pixels(ds, paths[k])
        if stored.shape != (int(ds.Rows), int(ds.Columns)):
            raise ImageReadError(f"{paths[k]}: pixel array shape {stored.shape} does not match Rows x Columns")
        masks.append(_padding_mask(ds, stored))
        stored_slices.append(_modality_lut(ds, stored, paths[k]))
        rescales.append(_rescale_of(_frame_item(ds, 0, "PixelValueTransformationSequence"), ds, paths[k]))
        full_headers.append(_strip_pixels(ds))
    ds0 = full_headers[0]
    values, modality, source_dtype, info = _finish_dicom_volume(
        stored_slices, rescales, masks, ds0, folder, modality_arg, fill
    )
    metadata = _dicom_metadata(ds0)
    metadata.update(info)
    metadata.update(
        {
            "multiframe": False,
            "n_files_ignored": ignored,
            "files": [str(paths[k]) for k in geom.order],
        }
    )
    if any(float_list(h.get("PixelSpacing"), 2) is None
           and float_list((_frame_item(h, 0, "PixelMeasuresSequence") or Dataset()).get("PixelSpacing"), 2) is None
           for h in headers):
        metadata["spacing_note"] = "no PixelSpacing on some slices: ImagerPixelSpacing or 1 mm used"
    return Volume(
        array=values,
        spacing=geom.spacing,
        origin=geom.origin,
        direction=geom.direction,
        modality=modality,
        source_dtype=source_dtype,
        source_path=folder,
        dicom_headers=full_headers,
        metadata=metadata,
    )
