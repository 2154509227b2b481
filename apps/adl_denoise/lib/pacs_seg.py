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
#: beside a SEG's conversion (``<SEG uid>.nii.gz.source``): the content it was made from (:func:`_source_key`)
_SOURCE_SUFFIX = ".source"


class SegNotServed(ValueError):
    """A SEG series of the PACS that cannot be served as a label: what is wrong with it, nothing of it converted or
    saved. ``status``: the route's answer (422: no label volume; 409: it references another patient's or study's
    series; 413: its label volume is over the voxel limit; 404: the PACS no longer lists it)."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


def seg_label_uri(datastore, seg_uid: str, image_id: str, download: Callable[[], object], voxel_limit: int) -> str:
    """The ``final`` label of the DICOM SEG series ``seg_uid`` of the PACS: downloaded by ``download`` into MONAI
    Label's label cache folder ``labels/final/<seg_uid>/`` (where it is not yet, or holds other instances than
    the PACS lists now: a SEG replaced under the same SeriesInstanceUID is downloaded again), converted to a label
    volume (``<seg_uid>.nii.gz`` beside it, made on the first read of a content, then answered as it is while the
    download's SOPInstanceUID and bytes are those it was made from, :func:`_source_key`). Each read checks, from
    the PACS's series search (one for the SEG's modality and identity, :func:`lib.pacs_corrections.searched_series`,
    and one of its instances), that every series its ReferencedSeriesSequence names that the PACS lists is of the SEG's
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
        lib.pacs_corrections.CorrectionNotServed: the PACS's identity or instance search failed (502) or was not
            answered (504).
    """
    from monailabel.datastore.local import LocalDatastore

    layout = datastore._datastore  # noqa: SLF001 - MONAI Label's own cache layout
    if layout.objects.get(seg_uid) is not None:  # an image's id, not a SEG's
        return LocalDatastore.get_label_uri(datastore, seg_uid, "final")
    if image_id:  # MONAI Label's training list pairing the SEG with its image: not done (see above)
        log.debug("DICOM SEG %s not saved as the label of series %s", seg_uid, image_id)
        return ""
    cache = Path(layout.label_path("final"))
    if _modalities(datastore, seg_uid) != ["SEG"]:  # an image series not downloaded (yet): no label of it
        return LocalDatastore.get_label_uri(datastore, seg_uid, "final")
    listed = _listed_instances(datastore, seg_uid)
    downloaded = _read_download(cache / seg_uid)
    for _ in range(3):  # downloaded again while the PACS lists other instances (a SEG replaced under its UID)
        if downloaded and (not listed or sorted(downloaded) == listed):
            break
        if downloaded:
            log.info("DICOM SEG %s: the PACS lists other instances than those downloaded (replaced): downloaded "
                     "again", seg_uid)
            _discard(cache / seg_uid)
        download()
        downloaded = _read_download(cache / seg_uid)
    contents = list((downloaded or {}).values())
    header = _header(contents[0]) if contents else None
    if header is None or str(header.get("Modality", "")) != "SEG":
        _discard(cache / seg_uid)  # an image series in the label cache
        raise SegNotServed(f"series {seg_uid} is not served as a label: it is no DICOM SEG (Modality "
                           f"{str(header.get('Modality', '')) if header is not None else 'unknown'!r})")
    if len(contents) != 1:
        raise SegNotServed(f"series {seg_uid} is not served as a label: the PACS holds it as {len(contents)} "
                           "instances, and a DICOM SEG label is one instance")
    referenced = [str(item.get("SeriesInstanceUID", "")) for item in header.get("ReferencedSeriesSequence", [])]
    if not any(referenced):
        raise SegNotServed(f"series {seg_uid} is not served as a label: its DICOM SEG references no image series "
                           "(no ReferencedSeriesSequence), so there is no image it labels")
    # each read, as the PACS lists the series now; the download stays in the cache (concurrent reads use it, the
    # next read is not a download again), no label volume is made of it
    _check_same_identity(datastore, seg_uid, [uid for uid in referenced if uid])
    converted = cache / f"{seg_uid}{SEG_LABEL_SUFFIX}"
    source = _source_key(downloaded)
    if not (converted.is_file() and _converted_from(converted) == source):  # none, or of a SEG since replaced
        _check_decoded_size(header, seg_uid, voxel_limit)
        _convert(contents[0], seg_uid, converted, source)
    return str(converted)


def _listed_instances(datastore, seg_uid: str) -> list:
    """The SOPInstanceUIDs the PACS lists in the series ``seg_uid`` now (one QIDO-RS instance search, within
    :data:`lib.pacs_corrections.PACS_SEARCH_TIMEOUT_S`), sorted.

    Raises:
        lib.pacs_corrections.CorrectionNotServed: the search failed (502) or was not answered (504).
    """
    import requests
    import retrying

    from .pacs import _first_str, answered_within, error_answer
    from .pacs_corrections import PACS_SEARCH_TIMEOUT_S, CorrectionNotServed, without_credentials

    client = datastore._client  # noqa: SLF001 - the datastore's authenticated DICOMweb client
    try:
        with answered_within(client, PACS_SEARCH_TIMEOUT_S):
            found = client.search_for_instances(search_filters={"SeriesInstanceUID": seg_uid},
                                                fields=["SOPInstanceUID"]) or []
    except requests.ReadTimeout:
        raise CorrectionNotServed(f"the PACS ({without_credentials(client.base_url)}) did not answer the search for "
                                  f"the instances of series {seg_uid} within {PACS_SEARCH_TIMEOUT_S:g} s: its DICOM "
                                  "SEG cannot be told from the one converted; nothing was sent", 504) from None
    except (requests.HTTPError, retrying.RetryError) as error:  # an error status (retried ones: RetryError)
        status = getattr(error_answer(error), "status_code", None)
        raise CorrectionNotServed(f"the PACS answered the search for the instances of series {seg_uid} with an error "
                                  f"(HTTP {status}): its DICOM SEG cannot be told from the one converted; nothing "
                                  "was sent", 502) from None
    return sorted({_first_str(entry, "00080018") or "" for entry in found
                   if _first_str(entry, "0020000E") in (None, seg_uid)} - {""})


def _read_download(folder: Path) -> dict:
    """SOPInstanceUID -> bytes of each file of the download ``folder``, read whole (a SEG is one instance, within
    the voxel limit): the read goes on from them when another request removes the folder meanwhile
    (:func:`_discard`). ``{}`` when there is none, or it was removed while it was read. A file that is no DICOM
    file is under its name."""
    try:
        paths = sorted(path for path in folder.iterdir() if path.is_file())
        contents = {path.name: path.read_bytes() for path in paths}
    except FileNotFoundError:  # removed meanwhile (a replaced SEG's download, or no SEG): downloaded again
        return {}
    keyed = {}
    for name, data in contents.items():
        header = _header(data)
        keyed[str(header.get("SOPInstanceUID", "")) if header is not None else name] = data
    return keyed


def _header(data: bytes):
    """The DICOM header of ``data`` (without its pixels), None when it is no DICOM file."""
    import io

    import pydicom

    try:
        return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    except Exception:  # noqa: BLE001 - pydicom's refusals of a non-DICOM file vary
        return None


def _discard(folder: Path) -> None:
    """Remove the download ``folder``: renamed first (a partial download's name, :data:`lib.pacs.
    PARTIAL_DOWNLOAD_PREFIX`, which a start-up removes if the server is killed meanwhile), then deleted. A concurrent
    read of it holds its files' bytes (:func:`_read_download`) or finds no folder and downloads it again: it never
    sees part of it, nor does a download taking the name meanwhile lose files to this removal."""
    import uuid

    from .pacs import PARTIAL_DOWNLOAD_PREFIX

    doomed = folder.with_name(f"{PARTIAL_DOWNLOAD_PREFIX}{folder.name}-removed-{uuid.uuid4().hex}")
    try:
        os.rename(folder, doomed)
    except FileNotFoundError:  # removed by another request
        return
    shutil.rmtree(doomed, ignore_errors=True)


def _source_key(downloaded: dict) -> str:
    """What identifies the downloaded SEG's content: a SHA-256 of its SOPInstanceUIDs and of their files' bytes."""
    import hashlib

    digest = hashlib.sha256()
    for sop_uid in sorted(downloaded):
        digest.update(sop_uid.encode() + b"\0" + hashlib.sha256(downloaded[sop_uid]).digest())
    return digest.hexdigest()


def _source_path(converted: Path) -> Path:
    """Where the conversion ``converted`` records the content it was made from (:func:`_source_key`)."""
    return converted.with_name(converted.name + _SOURCE_SUFFIX)


def _converted_from(converted: Path) -> str:
    """The content key (:func:`_source_key`) the conversion ``converted`` was made from; "" when not recorded (an
    earlier version's conversion: converted again)."""
    try:
        return _source_path(converted).read_text().strip()
    except OSError:
        return ""


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
    """The modalities the PACS lists the series ``series_uid`` under; [] when it holds none (the series search of
    :func:`lib.pacs_corrections.searched_series`: within the label route, the one its check made)."""
    from .pacs_corrections import searched_series

    return sorted({entry["modality"] for entry in searched_series(datastore, series_uid)})


def _convert(seg_bytes: bytes, seg_uid: str, converted: Path, source: str) -> None:
    """``seg_bytes`` (a DICOM SEG instance) as a label volume at ``converted``, written beside it under a temporary
    name, then renamed (another request converting it meanwhile writes the same volume); then ``source``, the
    content it was made from (:func:`_source_key`), recorded beside it: a read finding another key converts again
    (a SEG replaced in the PACS under the same SeriesInstanceUID kept its first conversion, served as its label)."""
    import io

    import pydicom
    import pydicom_seg
    import SimpleITK as sitk

    from .runtime.atomic import atomic_write_text

    try:
        image = pydicom_seg.MultiClassReader().read(pydicom.dcmread(io.BytesIO(seg_bytes))).image
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
    atomic_write_text(_source_path(converted), source)  # after the volume: a cut between them converts again
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
