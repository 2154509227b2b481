"""A DICOM SEG series of a PACS (saved by another tool) served as a ``final`` label: ``GET /datastore/label?label=
<SEG SeriesInstanceUID>&tag=final``, and MONAI Label's training list, which pairs each SEG with the series it
references.

MONAI Label's DICOMweb datastore converted the SEG into a temp ``tmp*.seg.nrrd`` (``dicom_seg_to_itk_image``) that it
never deleted, saved a copy as ``<image>.nrrd`` but looked for ``<image>.nii.gz`` on the next read (so converted,
and left a patient's segmentation in the server's temp folder, on every read), and without the image's id (how its
label route asks) failed with ImageNotFoundException, a 500. Here the SEG's download (in MONAI Label's label cache,
``labels/final/<SEG uid>/``) is converted once, with the same reader (pydicom_seg's ``MultiClassReader``: one label
value a segment, on the SEG's own grid), into ``labels/final/<SEG uid>.nii.gz``, written there under a temporary
name then renamed (nothing in the temp folder; a conversion cut short leaves no half file under the label's name).
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
    """A SEG series of the PACS that cannot be served as a label (422): what is wrong with it, nothing converted."""


def seg_label_uri(datastore, seg_uid: str, image_id: str, download: Callable[[], object]) -> str:
    """The ``final`` label of the DICOM SEG series ``seg_uid`` of the PACS: downloaded by ``download`` into MONAI
    Label's label cache folder ``labels/final/<seg_uid>/`` (where it is not yet), converted to a label volume
    (``<seg_uid>.nii.gz`` beside it, made on the first read, then answered as it is). The image it labels is the
    series its ReferencedSeriesSequence names (``image_id`` when given: MONAI Label's training list passes it); when
    MONAI Label's datastore holds that image (downloaded), the label is also saved for it there (``<image>.nii.gz``,
    once), as MONAI Label's own conversion did, for its training list. ``seg_uid`` an image MONAI Label's datastore
    holds, or any series the PACS does not hold as a SEG (a fine-tune request asks the label of each labelled image
    by the image's id, as in a local datastore): the label saved for it, "" when none, nothing downloaded (MONAI Label
    downloaded the image series into the label cache as if a SEG, then failed). The PACS is asked (a series search) only while the
    SEG's conversion is not in the cache.

    Raises:
        SegNotServed: the series is no DICOM SEG, holds several instances, references no series, or pydicom_seg
            cannot read it as a label volume (overlapping segments, a fractional SEG, no geometry).
    """
    import pydicom
    from monailabel.datastore.local import LocalDatastore

    layout = datastore._datastore  # noqa: SLF001 - MONAI Label's own cache layout
    if layout.objects.get(seg_uid) is not None:  # an image's id, not a SEG's
        return LocalDatastore.get_label_uri(datastore, seg_uid, "final")
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
    image_id = image_id or next((uid for uid in referenced if uid), "")
    if not image_id:
        raise SegNotServed(f"series {seg_uid} is not served as a label: its DICOM SEG references no image series "
                           "(no ReferencedSeriesSequence), so there is no image it labels")
    if not converted.is_file():
        _convert(files[0], seg_uid, converted)
    if layout.objects.get(image_id) is not None and not (cache / f"{image_id}{SEG_LABEL_SUFFIX}").exists():
        # MONAI Label's own record (its training list pairs it with the image); not the app's save_label, which
        # keeps a correction on this server, nor the DICOMweb one, which sends a SEG to the PACS
        LocalDatastore.save_label(datastore, image_id, str(converted), "final",
                                  {"SeriesInstanceUID": seg_uid, "Modality": "SEG",
                                   "ReferencedSeriesInstanceUID": image_id})
    return str(converted)


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
