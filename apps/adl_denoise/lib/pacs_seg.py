"""A DICOM SEG series of a PACS (saved by another tool) served as a ``final`` label: ``GET /datastore/label?label=
<SEG SeriesInstanceUID>&tag=final``. MONAI Label's training list, which paired each SEG with the series it
references by saving the SEG as that series' label, gets no such pair (:func:`seg_label_uri`).

MONAI Label's DICOMweb datastore converted the SEG into a temp ``tmp*.seg.nrrd`` (``dicom_seg_to_itk_image``) that it
never deleted, saved a copy as ``<image>.nrrd`` but looked for ``<image>.nii.gz`` on the next read (so converted,
and left a patient's segmentation in the server's temp folder, on every read), and without the image's id (how its
label route asks) failed with ImageNotFoundException, a 500. Here the SEG's download (in MONAI Label's label cache,
``labels/final/<SEG uid>/``) is converted once, with the same reader (pydicom_seg's ``MultiClassReader``: one label
value a segment, on the SEG's own grid), into ``labels/final/<SEG uid>.nii.gz``, written there under a temporary
name then renamed (nothing in the temp folder; a conversion cut short leaves no half file under the label's name,
and a server killed meanwhile leaves ``.converting-*`` temps that :func:`remove_stale_conversions` removes).
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

#: the file name ending of a SEG's conversion in the label cache (MONAI Label's datastore reads .nii.gz labels)
SEG_LABEL_SUFFIX = ".nii.gz"
_CONVERTING_PREFIX = ".converting-"


class SegNotServed(ValueError):
    """A SEG series of the PACS that cannot be served as a label: what is wrong with it, nothing of it converted or
    saved. ``status``: the route's answer (422: no label volume; 409: it references another patient's or study's
    series; 413: its label volume is over the voxel limit; 404: the PACS no longer lists it)."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


def seg_label_uri(datastore, seg_uid: str, image_id: str, download: Callable[[], object], voxel_limit: int) -> str:
    """The ``final`` label of the DICOM SEG series ``seg_uid`` of the PACS: downloaded by ``download`` into MONAI
    Label's label cache folder ``labels/final/<seg_uid>/`` (where it is not yet), converted to a label volume
    (``<seg_uid>.nii.gz`` beside it, made on the first read, then answered as it is). Each read checks, from the
    PACS's series search, that every series its ReferencedSeriesSequence names that the PACS lists is of the SEG's
    own study and patient; and, before the conversion, that the volume pydicom_seg would decode (its size from the
    frames' positions and the slice spacing, not the frame count the download was bounded by) is within
    ``voxel_limit``. Nothing is saved as the label of another series: MONAI Label saved each SEG's conversion as the
    label of the image it references (``<image>.nii.gz``), which then stayed that image's label when the PACS's SEG
    was replaced, and made a SEG of one patient's study the label of another patient's series. So MONAI Label's
    training list, which asks each SEG with its image's id (``image_id``) only to save that pairing, gets "" and
    nothing is downloaded for it (this app trains on the corrections it keeps, never on a PACS's SEG: they carry no
    correction stamp). ``seg_uid`` an image MONAI Label's datastore holds, or any series the PACS does not hold as a
    SEG (a fine-tune request asks the label of each labelled image by the image's id, as in a local datastore): the
    label saved for it, "" when none, nothing downloaded (MONAI Label downloaded the image series into the label
    cache as if a SEG, then failed).

    Raises:
        SegNotServed: the series is no DICOM SEG, holds several instances, references no series, or pydicom_seg
            cannot read it as a label volume (overlapping segments, a fractional SEG, no geometry), 422; it
            references a series of another study or patient, 409; its label volume is over ``voxel_limit``, 413
            (not converted; its download stays in the cache, as any series' the PACS holds).
        lib.pacs_corrections.CorrectionNotServed: the PACS's series search failed (502) or was not answered (504).
    """
    import pydicom
    from monailabel.datastore.local import LocalDatastore

    layout = datastore._datastore  # noqa: SLF001 - MONAI Label's own cache layout
    if layout.objects.get(seg_uid) is not None:  # an image's id, not a SEG's
        return LocalDatastore.get_label_uri(datastore, seg_uid, "final")
    if image_id:  # MONAI Label's training list pairing the SEG with its image: not done (see above)
        log.debug("DICOM SEG %s not saved as the label of series %s", seg_uid, image_id)
        return ""
    cache = Path(layout.label_path("final"))
    converted = cache / f"{seg_uid}{SEG_LABEL_SUFFIX}"
    if not converted.is_file() or not (cache / seg_uid).is_dir():
        if _modalities(datastore, seg_uid) != ["SEG"]:  # an image series not downloaded (yet): no label of it
            return LocalDatastore.get_label_uri(datastore, seg_uid, "final")
        download()
    files = sorted(path for path in (cache / seg_uid).iterdir() if path.is_file())
    header = pydicom.dcmread(files[0], stop_before_pixels=True) if files else None
    if header is None or str(header.get("Modality", "")) != "SEG":
        shutil.rmtree(cache / seg_uid, ignore_errors=True)  # an image series in the label cache
        raise SegNotServed(f"series {seg_uid} is not served as a label: it is no DICOM SEG (Modality "
                           f"{str(header.get('Modality', '')) if header is not None else 'unknown'!r})")
    if len(files) != 1:
        raise SegNotServed(f"series {seg_uid} is not served as a label: the PACS holds it as {len(files)} instances, "
                           "and a DICOM SEG label is one instance")
    referenced = [str(item.get("SeriesInstanceUID", "")) for item in header.get("ReferencedSeriesSequence", [])]
    if not any(referenced):
        raise SegNotServed(f"series {seg_uid} is not served as a label: its DICOM SEG references no image series "
                           "(no ReferencedSeriesSequence), so there is no image it labels")
    # each read, as the PACS lists the series now; the download stays in the cache (concurrent reads use it, the
    # next read is not a download again), no label volume is made of it
    _check_same_identity(datastore, seg_uid, [uid for uid in referenced if uid])
    if not converted.is_file():
        _check_decoded_size(header, seg_uid, voxel_limit)
        _convert(files[0], seg_uid, converted)
    return str(converted)


def _check_same_identity(datastore, seg_uid: str, referenced: list) -> None:
    """Nothing when the PACS lists the SEG ``seg_uid`` once and each ``referenced`` series it lists under the SEG's
    own study and patient (a referenced series the PACS does not list is no other patient's image here).

    Raises:
        SegNotServed: 404, the PACS no longer lists the SEG; 409, it lists it under several studies or patients, or
            a referenced series under another study or patient (the SEG would label another patient's image).
    """
    from .pacs_corrections import pacs_identities

    own = pacs_identities(datastore, seg_uid)
    if not own:
        raise SegNotServed(f"series {seg_uid} is not served as a label: the PACS no longer lists it", 404)
    if len(own) > 1:
        raise SegNotServed(f"series {seg_uid} is not served as a label: the PACS lists it under {len(own)} studies or "
                           "patients, so which image it labels cannot be told", 409)
    study, patient = own[0]["study_instance_uid"], own[0]["patient_id"]
    for uid in referenced:
        for other in pacs_identities(datastore, uid):
            changed = [f"{what} {other[key]!r}" for key, what, mine in (("patient_id", "patient_id", patient),
                                                                       ("study_instance_uid", "study", study))
                       if other[key] != mine]
            if changed:
                raise SegNotServed(
                    f"series {seg_uid} is not served as a label: its DICOM SEG (patient_id {patient!r}, study "
                    f"{study!r}) references series {uid}, which the PACS lists under {', '.join(changed)}: a SEG "
                    "labels an image of its own study; it is not served", 409)


def _check_decoded_size(header, seg_uid: str, voxel_limit: int) -> None:
    """Nothing when the label volume pydicom_seg decodes the SEG ``header`` (read without its pixels) to is within
    ``voxel_limit``: its size as pydicom_seg's reader computes it (Columns x Rows x the frames' extent along the
    slice direction / the declared slice spacing + 1), not the frame count the download was bounded by (3 frames
    0.05 mm apart declared became a 201-slice volume).

    Raises:
        SegNotServed: 413, over the limit; 422, pydicom_seg cannot tell the volume's geometry.
    """
    import math

    from pydicom_seg import reader_utils

    try:
        spacing = reader_utils.get_declared_image_spacing(header)
        _, extent = reader_utils.get_image_origin_and_extent(header, reader_utils.get_image_direction(header))
        columns, rows, frames = int(header.Columns), int(header.Rows), int(header.get("NumberOfFrames", 1) or 1)
    except Exception as error:  # pydicom_seg's refusals are ValueError, KeyError, AttributeError...
        raise SegNotServed(f"series {seg_uid} is not served as a label: its DICOM SEG cannot be read as a label "
                           f"volume ({type(error).__name__}: {error})") from None
    step = float(spacing[-1])
    if not (math.isfinite(step) and step > 0):
        raise SegNotServed(f"series {seg_uid} is not served as a label: its DICOM SEG cannot be read as a label "
                           f"volume (its slice spacing is {step:g} mm; a label volume needs a positive one)")
    slices = int(round(extent / step)) + 1
    voxels = columns * rows * slices
    if voxels > voxel_limit:
        raise SegNotServed(
            f"series {seg_uid} is too large as a label volume: its {frames} frames span {extent:g} mm at a slice "
            f"spacing of {step:g} mm, a {columns} x {rows} x {slices} volume of {voxels:,} voxels, over the limit of "
            f"{voxel_limit:,}; it was not converted", 413)


def _modalities(datastore, series_uid: str) -> list:
    """The modalities the PACS lists the series ``series_uid`` under (a series-level search); [] when it holds none.
    """
    client = datastore._client  # noqa: SLF001 - the datastore's authenticated DICOMweb client
    found = client.search_for_series(search_filters={"SeriesInstanceUID": series_uid}, fields=["Modality"]) or []
    return sorted({str((entry.get("00080060", {}).get("Value") or [""])[0]) for entry in found
                   if (entry.get("0020000E", {}).get("Value") or [""])[0] == series_uid})


def _convert(seg_file: Path, seg_uid: str, converted: Path) -> None:
    """``seg_file`` (a DICOM SEG instance) as a label volume at ``converted``, written beside it under a temporary
    name, then renamed (another request converting it meanwhile writes the same volume)."""
    import pydicom
    import pydicom_seg
    import SimpleITK as sitk

    try:
        image = pydicom_seg.MultiClassReader().read(pydicom.dcmread(seg_file)).image
    except Exception as error:  # pydicom_seg's refusals are ValueError, KeyError, AttributeError...
        raise SegNotServed(f"series {seg_uid} is not served as a label: its DICOM SEG cannot be read as a label "
                           f"volume ({type(error).__name__}: {error})") from None
    handle, partial = tempfile.mkstemp(prefix=_CONVERTING_PREFIX, suffix=SEG_LABEL_SUFFIX, dir=converted.parent)
    os.close(handle)
    try:
        sitk.WriteImage(image, partial, True)
        os.replace(partial, converted)
    except BaseException:
        try:
            os.unlink(partial)
        except FileNotFoundError:
            pass
        raise
    log.info("DICOM SEG %s converted to the label volume %s", seg_uid, converted)


#: seconds since its last write after which a conversion's temp (``.converting-*.nii.gz``) in the label cache is
#: left over from a server killed while it wrote it (:func:`remove_stale_conversions`); one being written is
#: written at every block (as the download's file meta temps, :data:`lib.pacs.FILE_META_TEMP_STALE_S`)
CONVERTING_STALE_S = 600.0


def remove_stale_conversions(label_cache: Path, max_age_s: float = CONVERTING_STALE_S) -> list:
    """Remove the temps :func:`_convert` writes in ``label_cache`` (``.converting-*.nii.gz``) not written for more
    than ``max_age_s`` seconds (:func:`lib.pacs.remove_stale_files`): a server killed while it converted a SEG left
    one there for ever, a patient's segmentation under no label's name. Returns those removed."""
    from .pacs import remove_stale_files

    return remove_stale_files(label_cache, lambda name: name.startswith(_CONVERTING_PREFIX) and
                              name.endswith(SEG_LABEL_SUFFIX), max_age_s, "the SEG conversion temp")
