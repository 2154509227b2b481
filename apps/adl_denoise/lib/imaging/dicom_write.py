"""Writing a derived DICOM series: denoised values on the grid of a series read from DICOM, with new series and
instance UIDs and the source's patient, study and frame of reference (:func:`write_dicom_derived_series`)."""
from __future__ import annotations

import copy
import datetime as _dt
import inspect
import math
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from pydicom.valuerep import DSfloat

from ..runtime.atomic import fsync_path
from .dicom_geometry import grid_slice_plane
from .dicom_read import has_dicom_magic
from .dicom_tags import identity_conflict, str_or_empty
from .errors import ImageWriteError, one_line
from .guards import check_finite, check_not_input, make_temp_dir
from .volume import Volume, value_range_for_output

__all__ = ["DERIVED_SERIES_NUMBER_OFFSET", "denoising_derivation", "derived_series_description",
           "write_dicom_derived_series"]

#: Derived DICOM series get SeriesNumber = original + this (1000 when the original has none), capped to IS range.
DERIVED_SERIES_NUMBER_OFFSET = 1000

# Pixel-related or instance-specific elements of the source that no longer apply to derived pixels.
_DROP_KEYWORDS = (
    "PixelData", "FloatPixelData", "DoubleFloatPixelData", "PixelPaddingValue", "PixelPaddingRangeLimit",
    "SmallestImagePixelValue", "LargestImagePixelValue", "SmallestPixelValueInSeries", "LargestPixelValueInSeries",
    "NumberOfFrames", "FrameIncrementPointer", "PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence",
    "DimensionOrganizationSequence", "DimensionIndexSequence", "IconImageSequence", "ModalityLUTSequence",
    "VOILUTSequence", "PlanarConfiguration", "RedPaletteColorLookupTableDescriptor",
    "GreenPaletteColorLookupTableDescriptor", "BluePaletteColorLookupTableDescriptor",
    "RedPaletteColorLookupTableData", "GreenPaletteColorLookupTableData", "BluePaletteColorLookupTableData",
    "PixelAspectRatio", "SourceImageSequence", "DerivationCodeSequence", "RescaleType", "PixelDataProviderURL",
    "ExtendedOffsetTable", "ExtendedOffsetTableLengths", "DataSetTrailingPadding",
    "RealWorldValueMappingSequence", "PresentationLUTShape",
)

_MULTIFRAME_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT
    "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR
    "1.2.840.10008.5.1.4.1.1.2.2",  # Legacy Converted Enhanced CT
    "1.2.840.10008.5.1.4.1.1.4.4",  # Legacy Converted Enhanced MR
}


def _ds_text(value: float) -> str:
    """A DS string (<= 16 chars) for value; callers re-parse it so stored values use exactly what is written."""
    return str(DSfloat(float(value), auto_format=True))


# --------------------------------------------------------------------------------------------------------------
# Pixel encoding
# --------------------------------------------------------------------------------------------------------------


class _Encoding(NamedTuple):
    stored: np.ndarray  # int16 or uint16, same shape as the values
    slope: float
    intercept: float
    signed: bool


def _encode_dicom_values(values: np.ndarray, integral: bool) -> _Encoding:
    """16-bit stored values with RescaleSlope/Intercept for physical ``values``.

    Integral data (CT in HU, integer MR): slope 1, intercept 0 when the rounded values fit int16 (uint16 for
    non-negative data); a wider integer range keeps slope 1 and shifts the intercept, and only a range beyond
    65535 needs an integer slope > 1. Non-integral (float) data: the full 16-bit range is used, uint16 with
    intercept 0 for non-negative data, else int16 centred on the data; precision is slope / 2.
    """
    v = values.astype(np.float64)
    if integral:
        r = np.rint(v)
        lo, hi = float(r.min()), float(r.max())
        if lo >= -32768 and hi <= 32767:
            return _Encoding(r.astype(np.int16), 1.0, 0.0, True)
        if lo >= 0 and hi <= 65535:
            return _Encoding(r.astype(np.uint16), 1.0, 0.0, False)
        slope = float(max(1, math.ceil((hi - lo) / 65535.0)))
        intercept = float(math.floor(lo + 32768 * slope))
        stored = np.clip(np.rint((r - intercept) / slope), -32768, 32767).astype(np.int16)
        return _Encoding(stored, slope, intercept, True)
    lo, hi = float(v.min()), float(v.max())
    if lo >= 0:
        slope = float(_ds_text(hi / 65535.0)) if hi > 0 else 1.0
        if slope * 65535.0 < hi:  # DS rounding went down: nudge so the maximum still fits
            slope = float(_ds_text(slope * (1 + 1e-6)))
        stored = np.clip(np.rint(v / slope), 0, 65535).astype(np.uint16)
        return _Encoding(stored, slope, 0.0, False)
    intercept = float(_ds_text((hi + lo) / 2.0))
    half = max(hi - intercept, intercept - lo)
    slope = float(_ds_text(half / 32767.0 * (1 + 1e-6))) if half > 0 else 1.0
    stored = np.clip(np.rint((v - intercept) / slope), -32768, 32767).astype(np.int16)
    return _Encoding(stored, slope, intercept, True)


# --------------------------------------------------------------------------------------------------------------
# UIDs and classes
# --------------------------------------------------------------------------------------------------------------


def _sop_class_for(volume: Volume, source_class: str) -> str:
    if volume.modality == "CT":
        return str(CTImageStorage)
    if volume.modality == "MR":
        return str(MRImageStorage)
    if source_class and source_class not in _MULTIFRAME_SOP_CLASSES:
        return source_class
    return str(SecondaryCaptureImageStorage)


def _source_sop(header: Dataset) -> tuple[str, str]:
    """(SOPClassUID, SOPInstanceUID) of a source header, falling back to the file meta (hard-anonymised data)."""
    meta = getattr(header, "file_meta", None)
    sop_class = str_or_empty(header.get("SOPClassUID")) or str_or_empty(
        meta.get("MediaStorageSOPClassUID") if meta is not None else None
    )
    sop_uid = str_or_empty(header.get("SOPInstanceUID")) or str_or_empty(
        meta.get("MediaStorageSOPInstanceUID") if meta is not None else None
    )
    return sop_class, sop_uid


def _derived_series_number(value: Any) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        return DERIVED_SERIES_NUMBER_OFFSET
    return min(number + DERIVED_SERIES_NUMBER_OFFSET, int(np.iinfo(np.int32).max))


# --------------------------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------------------------


def denoising_derivation(model: str, weights_version: str | None = None, weights_sha256: str | None = None,
                         restoration_px: float | None = None) -> str:
    """What made a denoised series, for its DerivationDescription: the model, and for a learned one the weights
    (version, first 16 hex digits of the file's SHA-256) and the low-frequency restoration width in pixels, so that
    a reader of the series in a PACS can tell which network and settings produced it."""
    details = []
    if weights_version or weights_sha256:
        details.append("weights " + " ".join(filter(None, [weights_version, weights_sha256 and
                                                           f"sha256 {weights_sha256[:16]}"])))
    if restoration_px is not None:
        details.append(f"low-frequency restoration {restoration_px:g} px")
    return f"Denoised with {model}" + (f" ({'; '.join(details)})" if details else "")


def derived_series_description(original: str, suffix: str) -> str:
    """``original + suffix`` within the 64 characters of a LO value: the ORIGINAL is cut, never the suffix, which
    is what tells a reader that the series is derived (denoised, simulated) and not the acquired one."""
    suffix = suffix[:64]
    room = 64 - len(suffix)
    return (original if len(original) <= room else original[:room].rstrip()) + suffix


def _build_derived_datasets(volume: Volume, reference: Volume, suffix: str, derivation: str, image_type: str
                            ) -> list[tuple[str, Dataset]]:
    """(file name, dataset) per slice of the derived series, in array z order: each with its file meta and no
    encoding of its own (written as its Transfer Syntax UID says, :func:`_write_dicom_file`)."""
    headers = reference.dicom_headers or []
    n_slices = 1 if volume.ndim == 2 else int(volume.array.shape[0])
    multiframe = bool(reference.metadata.get("multiframe")) or (len(headers) == 1 and n_slices > 1)
    if not multiframe and len(headers) != n_slices:
        raise ImageWriteError(
            f"the reference has {len(headers)} DICOM headers for {n_slices} slices; cannot derive a series"
        )
    conflict = identity_conflict(headers) if not multiframe else None
    if conflict is not None:  # the reader refuses such a series; a reference made some other way is refused here
        raise ImageWriteError(f"the reference's DICOM headers are not one patient's series: {conflict}")
    first = headers[0]
    integral = volume.modality == "CT" or np.issubdtype(volume.source_dtype, np.integer)
    values = volume.array.astype(np.float64)
    vr = value_range_for_output(volume, np.float64)  # the MR >= 0 rule; the 16-bit encoding handles the rest
    if vr.low is not None:
        values = np.maximum(values, vr.low)
    encoding = _encode_dicom_values(values, integral)
    stored = encoding.stored if volume.ndim == 3 else encoding.stored[np.newaxis]

    # One set of UIDs per write: every slice shares the new series, the study and the frame of reference.
    series_uid = generate_uid()
    study_uid = str_or_empty(first.get("StudyInstanceUID")) or generate_uid()
    frame_uid = str_or_empty(first.get("FrameOfReferenceUID")) or generate_uid()
    # kept as the source has it, empty included (type 2): a made-up ID would file the derived series under
    # another patient (and pool every anonymised source's results under that one) in the PACS
    patient_id = str_or_empty(first.get("PatientID"))
    source_series = str_or_empty(first.get("SeriesInstanceUID")) or "(empty SeriesInstanceUID)"
    description = derived_series_description(str_or_empty(first.get("SeriesDescription")), suffix)
    series_number = _derived_series_number(first.get("SeriesNumber"))
    # DICOM dates and times are the local time of the creating site (the standard has no time zone by default)
    now = _dt.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S.%f")
    lossy_source = bool(reference.metadata.get("lossy_compressed")) or any(
        str_or_empty(h.get("LossyImageCompression")) == "01" for h in headers
    )

    out: list[tuple[str, Dataset]] = []
    for k in range(n_slices):
        src = headers[0 if multiframe else k]
        ds = Dataset()
        for elem in copy.deepcopy(src):
            if elem.tag.is_private or elem.tag.element == 0 or elem.tag.group == 0x0002:
                continue  # private tags describe the original reconstruction; group lengths would be stale
            if elem.keyword in _DROP_KEYWORDS:
                continue
            ds.add(elem)
        src_class, src_uid = _source_sop(src)
        sop_class = _sop_class_for(volume, src_class)
        sop_uid = generate_uid()

        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = sop_uid
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.PatientID = patient_id
        if "PatientName" not in ds:
            ds.PatientName = ""
        ds.Modality = str_or_empty(src.get("Modality")) or volume.modality
        ds.SeriesDescription = description
        ds.SeriesNumber = series_number
        ds.InstanceNumber = k + 1
        original_type = [str(v) for v in (src.get("ImageType") or [])]
        ds.ImageType = ["DERIVED", "SECONDARY"] + original_type[2:3] + [image_type]
        ds.DerivationDescription = f"{derivation} from series {source_series}"[:1024]
        if src_uid and src_class:
            item = Dataset()
            item.ReferencedSOPClassUID = src_class
            item.ReferencedSOPInstanceUID = src_uid
            if multiframe:
                item.ReferencedFrameNumber = int(reference.metadata.get("frame_order", list(range(n_slices)))[k]) + 1
            ds.SourceImageSequence = [item]
        for keyword in ("StudyDate", "StudyTime", "AccessionNumber", "ReferringPhysicianName", "StudyID",
                        "PatientBirthDate", "PatientSex"):
            if keyword not in ds:
                setattr(ds, keyword, "")  # type 2 attributes must be present, possibly empty
        ds.SeriesDate, ds.SeriesTime = date, time
        ds.ContentDate, ds.ContentTime = date, time
        ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
        if lossy_source:
            ds.LossyImageCompression = "01"  # once lossy, always flagged lossy (our pixels are uncompressed)

        if multiframe or "ImagePositionPatient" not in ds:
            # positions and orientation from the volume grid (multi-frame sources have them per frame only)
            if volume.ndim == 3:
                position, orientation = grid_slice_plane(volume.origin, volume.spacing, volume.direction, k)
                ds.ImagePositionPatient = [_ds_text(v) for v in position]
                ds.ImageOrientationPatient = [_ds_text(v) for v in orientation]
                if "SliceThickness" not in ds:  # an enhanced source has it per frame; else the slice step
                    thickness = reference.metadata.get("slice_thickness")
                    ds.SliceThickness = _ds_text(thickness if thickness and math.isfinite(thickness)
                                                 else volume.spacing[2])
                if "WindowCenter" not in ds and "window_center" in reference.metadata:
                    ds.WindowCenter = _ds_text(reference.metadata["window_center"])
                    ds.WindowWidth = _ds_text(reference.metadata["window_width"])
            elif volume.metadata.get("image_position_patient") and volume.metadata.get("image_orientation_patient"):
                # a one-frame enhanced slice: its plane is in the functional groups, which are not copied
                ds.ImagePositionPatient = [_ds_text(v) for v in volume.metadata["image_position_patient"]]
                ds.ImageOrientationPatient = [_ds_text(v) for v in volume.metadata["image_orientation_patient"]]
        ds.PixelSpacing = [_ds_text(volume.spacing[1]), _ds_text(volume.spacing[0])]
        if ds.SOPClassUID == str(SecondaryCaptureImageStorage) and "ConversionType" not in ds:
            ds.ConversionType = "WSD"
        if ds.SOPClassUID == str(CTImageStorage):
            for keyword in ("KVP", "AcquisitionNumber"):
                if keyword not in ds:
                    setattr(ds, keyword, None)
        if ds.SOPClassUID == str(MRImageStorage):
            # Type 1 MR Image Module attributes absent from enhanced sources: the generic "research mode" values
            defaults = {"ScanningSequence": "RM", "SequenceVariant": "NONE", "ScanOptions": "",
                        "MRAcquisitionType": "", "EchoTime": None, "EchoTrainLength": None,
                        "RepetitionTime": None}
            for keyword, value in defaults.items():
                if keyword not in ds:
                    setattr(ds, keyword, value)

        pixels = np.ascontiguousarray(stored[k])
        ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
        ds.SamplesPerPixel = 1
        # MONOCHROME1 (e.g. CR/DX: low values white) is kept: the values are the source's, so MONOCHROME2 would
        # show the derived image inverted next to its source
        ds.PhotometricInterpretation = (
            "MONOCHROME1" if str_or_empty(src.get("PhotometricInterpretation")) == "MONOCHROME1" else "MONOCHROME2")
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1 if encoding.signed else 0
        ds.RescaleIntercept = _ds_text(encoding.intercept)
        ds.RescaleSlope = _ds_text(encoding.slope)
        if volume.modality == "CT":
            ds.RescaleType = "HU"
        ds.PixelData = pixels.astype("<i2" if encoding.signed else "<u2").tobytes()
        ds["PixelData"].VR = "OW"

        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        meta.ImplementationVersionName = "ADL_DENOISE"
        ds.file_meta = meta
        out.append((f"IM{k + 1:05d}.dcm", ds))
    return out


#: pydicom 3+ writes a dataset as its Transfer Syntax UID says with ``enforce_file_format``; pydicom 2 (pinned by
#: MONAI Label's pydicom-seg) has no such argument
_ENFORCE_FILE_FORMAT = "enforce_file_format" in inspect.signature(dcmwrite).parameters


def _write_dicom_file(path: Path, ds: Dataset) -> None:
    """Write ``ds`` (made here: no encoding of its own) as a DICOM file: a preamble of zeros, the file meta completed,
    the dataset encoded as its ``file_meta.TransferSyntaxUID`` says. pydicom 3+: ``enforce_file_format=True``;
    pydicom 2: ``write_like_original=False``, which takes the encoding from the transfer syntax when the dataset has
    none. Neither sets the dataset's ``is_little_endian`` / ``is_implicit_VR`` (deprecated in pydicom 3, removed in
    4) nor passes pydicom 3's deprecated ``write_like_original``."""
    if _ENFORCE_FILE_FORMAT:
        dcmwrite(str(path), ds, enforce_file_format=True)
    else:
        dcmwrite(str(path), ds, write_like_original=False)


# --------------------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------------------


def write_dicom_derived_series(
    volume: Volume,
    out_dir: str | Path,
    reference: Volume,
    *,
    series_description_suffix: str = " [denoised]",
    derivation: str = "Denoised",
    derived_image_type: str = "DENOISED",
    overwrite: bool = False,
    durable: bool = False,
) -> Path:
    """Write ``volume`` as a new DICOM series derived from ``reference`` (read from DICOM) into ``out_dir``.

    One file per slice (array z order = InstanceNumber order), Explicit VR Little Endian, 16-bit pixels:
    CT in HU as int16 with RescaleSlope 1 / RescaleIntercept 0 (a shifted intercept or integer slope only when
    the values exceed int16); float MR uses the full 16-bit range (see ``_encode_dicom_values``). New
    SeriesInstanceUID and SOPInstanceUIDs; patient, study and frame of reference kept (empty ones in
    hard-anonymised data are filled once per write: generated StudyInstanceUID/FrameOfReferenceUID; an empty
    PatientID stays empty); ImageType DERIVED\\SECONDARY\\<original's third value>\\``derived_image_type``;
    SeriesDescription + suffix (:func:`derived_series_description`: the original is cut to fit, not the suffix);
    DerivationDescription ``derivation`` + " from series <source SeriesInstanceUID>" (e.g. from
    :func:`denoising_derivation`); SeriesNumber + 1000; private tags and pixel-specific tags (padding, LUTs, icon)
    dropped; SourceImageSequence points at the source slices.

    ``volume`` must be on the reference grid (same shape, spacing, origin, direction): the slices reuse the
    reference's positions. Written atomically (temporary folder renamed into place); ``durable``: its files and
    folder flushed to the disk before the rename and the parent folder after it (see :func:`lib.imaging.write_volume`).

    Raises:
        ImageWriteError: no DICOM reference, different grid, NaN/Inf, output exists (overwrite=False) or is the
            input, write failure.
    """
    out_dir = Path(out_dir).expanduser()
    if reference is None or not reference.dicom_headers:
        raise ImageWriteError(
            f"{out_dir}: DICOM output needs a DICOM input (reference without DICOM headers); write .nii.gz instead"
        )
    check_not_input(out_dir, volume, reference)
    if not volume.same_grid(reference):
        raise ImageWriteError(
            f"{out_dir}: the volume (shape {volume.shape}, spacing {volume.spacing}) is not on the reference DICOM "
            f"grid (shape {reference.shape}, spacing {reference.spacing}); write .nii.gz instead"
        )
    check_finite(volume, out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ImageWriteError(f"{out_dir} exists and is a file; DICOM output needs a folder")
    existing = sorted(out_dir.iterdir()) if out_dir.is_dir() else []
    if existing and not overwrite:
        raise ImageWriteError(f"{out_dir} already exists and is not empty; pass overwrite=True to replace it")
    if existing:
        foreign = [p for p in existing if not (p.is_file() and has_dicom_magic(p))]
        if foreign:
            raise ImageWriteError(
                f"refusing to replace {out_dir}: it holds non-DICOM entries (e.g. {foreign[0].name})"
            )

    datasets = _build_derived_datasets(volume, reference, series_description_suffix, derivation, derived_image_type)
    parent = out_dir.parent
    temp = make_temp_dir(out_dir, f"cannot create a folder next to {out_dir}")
    backup: Path | None = None
    try:
        for name, ds in datasets:
            _write_dicom_file(temp / name, ds)
            if durable:
                fsync_path(temp / name)
        if durable:
            fsync_path(temp)
        if out_dir.exists():
            if existing:  # overwrite: move the old series aside, put the new one in place, then delete the old
                backup = parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:12]}"
                os.rename(out_dir, backup)
            else:
                os.rmdir(out_dir)  # an empty folder given as the destination
        os.rename(temp, out_dir)
        if durable:
            fsync_path(parent)
    except ImageWriteError:
        raise
    except Exception as exc:  # noqa: BLE001 - report any failure uniformly, after cleaning up
        if backup is not None and backup.exists() and not out_dir.exists():
            os.rename(backup, out_dir)
            backup = None
        raise ImageWriteError(f"cannot write the DICOM series {out_dir}: {one_line(exc)}") from exc
    finally:
        shutil.rmtree(temp, ignore_errors=True)
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
    return out_dir
