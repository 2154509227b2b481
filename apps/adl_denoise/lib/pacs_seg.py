"""A DICOM SEG series of a PACS (saved by another tool) served as a ``final`` label: ``GET /datastore/label?label=
<SEG SeriesInstanceUID>&tag=final``. MONAI Label's training list, which paired each SEG with the series it
references by saving the SEG as that series' label, gets no such pair (:func:`seg_label_uri`).

MONAI Label's DICOMweb datastore converted the SEG into a temp ``tmp*.seg.nrrd`` (``dicom_seg_to_itk_image``) that it
never deleted, saved a copy as ``<image>.nrrd`` but looked for ``<image>.nii.gz`` on the next read (so converted,
and left a patient's segmentation in the server's temp folder, on every read), and without the image's id (how its
label route asks) failed with ImageNotFoundException, a 500. Here the SEG's download (in MONAI Label's label cache,
``labels/final/<SEG uid>/``) is converted once, with the same reader (pydicom_seg's ``MultiClassReader``: one label
value a segment, on the SEG's own grid), into ``labels/final/<SEG uid>.seg-<content key>.nii.gz`` (named by the
content it was made from, :func:`_source_key`: a conversion's file never changes, so the file a read answers is the
conversion of the SEG it checked, whatever another read converts meanwhile), written there under a temporary name
then renamed (nothing in the temp folder; a conversion cut short leaves no half file under the label's name, and a
server killed meanwhile leaves ``.converting-*`` temps that :func:`remove_stale_conversions` removes). The label
route opens that file before it answers (:func:`open_seg_label`): a conversion of a replaced SEG removed meanwhile
stays readable from the open file.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

#: the file name ending of a SEG's conversion in the label cache (MONAI Label's datastore reads .nii.gz labels)
SEG_LABEL_SUFFIX = ".nii.gz"
_CONVERTING_PREFIX = ".converting-"
#: a SEG's conversion is ``<SEG uid><_KEYED_INFIX><the first _KEY_CHARS of its content key>.nii.gz`` (no UID holds
#: a letter: never another SEG's UID)
_KEYED_INFIX = ".seg-"
_KEY_CHARS = 32
#: the downloads of a SEG a read makes at most while the PACS lists other instances than it sends
DOWNLOAD_TRIES = 3


class SegNotServed(ValueError):
    """A SEG series of the PACS that cannot be served as a label: what is wrong with it, nothing of it converted or
    saved. ``status``: the route's answer (422: no label volume; 409: it references another patient's or study's
    series, or its file names another patient or study than the PACS lists it under; 413: its label volume is over
    the voxel limit; 404: the PACS no longer lists it; 503: the PACS kept sending other instances than it lists;
    507 / 500: its conversion could not be written, the disk full / another reason)."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


def seg_label_uri(datastore, seg_uid: str, image_id: str, download: Callable[[], object], voxel_limit: int) -> str:
    """The ``final`` label of the DICOM SEG series ``seg_uid`` of the PACS: downloaded by ``download`` into MONAI
    Label's label cache folder ``labels/final/<seg_uid>/`` (where it is not yet, or holds other instances than the
    PACS lists now, or its file names another study or patient than the PACS lists it under: a SEG replaced under the
    same SeriesInstanceUID is downloaded again), converted to a label volume (``<seg_uid>.seg-<key>.nii.gz`` beside
    it, named by the download's SOPInstanceUID and bytes, :func:`_source_key`: made on the first read of a content,
    then answered as it is; the conversions of the SEG's other contents are removed). Each read asks the PACS for
    the SEG's instances (one QIDO-RS instance search: none listed is a 404, its download not answered from the
    cache) and checks, from the PACS's series search (one for the SEG's modality and identity,
    :func:`lib.pacs_corrections.searched_series`, made before the download) and the SEG's own file (its
    SeriesInstanceUID, StudyInstanceUID and PatientID), that they name the same series, study and patient, and that
    every series its ReferencedSeriesSequence names that the PACS lists is of that study and patient; and, before
    the conversion, that the volume pydicom_seg would decode (its size from the frames' positions and the slice
    spacing, not the frame count the download was bounded by) is within ``voxel_limit``. Nothing is saved as the
    label of another series: MONAI Label saved each SEG's conversion as the label of the image it references
    (``<image>.nii.gz``), which then stayed that image's label when the PACS's SEG was replaced, and made a SEG of
    one patient's study the label of another patient's series (those an earlier version saved are not used:
    :func:`remove_earlier_seg_labels`). So MONAI Label's training list, which asks each SEG with its
    image's id (``image_id``) only to save that pairing, gets "" and nothing is downloaded for it (this app trains
    on the corrections it keeps, never on a PACS's SEG: they carry no correction stamp). ``seg_uid`` an image
    MONAI Label's datastore holds, or any series the PACS does not hold as a SEG (a fine-tune request asks the
    label of each labelled image by the image's id, as in a local datastore): "", nothing downloaded (MONAI Label
    downloaded the image series into the label cache as if a SEG, then failed).

    Raises:
        SegNotServed: the series is no DICOM SEG, holds several instances, references no series, or pydicom_seg
            cannot read it as a label volume (overlapping segments, a fractional SEG, no geometry), 422; it
            references a series of another study or patient, or its file names another study or patient than
            the PACS lists it under, 409; its label volume is over ``voxel_limit``, 413 (not converted; its
            download stays in the cache, as any series' the PACS holds); the PACS no longer lists it or an
            instance of it, 404; the PACS listed other instances than it sent in :data:`DOWNLOAD_TRIES` downloads,
            503; its conversion could not be written, 507 (disk full) / 500.
        lib.pacs_corrections.CorrectionNotServed: the PACS's identity or instance search failed (502) or was not
            answered (504).
    """
    from monailabel.datastore.local import LocalDatastore

    layout = datastore._datastore  # noqa: SLF001 - MONAI Label's own cache layout
    if layout.objects.get(seg_uid) is not None:  # an image's id, not a SEG's: its index label is no label here
        return ""  # (an earlier version's SEG conversion saved as its label: not used)
    if image_id:  # MONAI Label's training list pairing the SEG with its image: not done (see above)
        log.debug("DICOM SEG %s not saved as the label of series %s", seg_uid, image_id)
        return ""
    cache = Path(layout.label_path("final"))
    if _modalities(datastore, seg_uid) != ["SEG"]:  # an image series not downloaded (yet): no label of it
        return LocalDatastore.get_label_uri(datastore, seg_uid, "final")
    listed = _listed_instances(datastore, seg_uid)
    if not listed:  # deleted since the series search: its cached download is no SEG of the PACS any more
        raise SegNotServed(f"series {seg_uid} is not served as a label: the PACS no longer lists an instance of it",
                           404)
    own = _own_identity(datastore, seg_uid)  # the series search (the route's one search of it)
    downloaded = _read_download(cache / seg_uid)
    fetched = False  # by this read: a file naming another identity than the search is then no stale cache
    for attempt in range(DOWNLOAD_TRIES + 1):  # downloaded again while the PACS lists other instances (replaced)
        if downloaded and sorted(downloaded) == listed and (fetched or not _header_changes(downloaded, own)):
            break
        if attempt == DOWNLOAD_TRIES:
            raise SegNotServed(
                f"series {seg_uid} is not served as a label: the PACS kept changing it (it listed other instances "
                f"than it sent, {DOWNLOAD_TRIES} downloads in a row); nothing was sent: try again later", 503)
        if downloaded:
            log.info("DICOM SEG %s: the PACS lists other instances than those downloaded, or another study or "
                     "patient than their files name (replaced): downloaded again", seg_uid)
            _discard(cache / seg_uid)
        download()
        fetched = True
        downloaded = _read_download(cache / seg_uid)
    contents = list(downloaded.values())
    header = _header(contents[0])
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
    # each read, as the PACS lists the series now and as the SEG's own file names it; the download stays in the
    # cache (concurrent reads use it, the next read is not a download again), no label volume is made of it
    _check_same_identity(datastore, seg_uid, own, header, [uid for uid in referenced if uid])
    source = _source_key(downloaded)
    converted = _conversion_path(cache, seg_uid, source)
    if not converted.is_file():  # none yet, or removed by a read of another content of the SEG (replaced)
        _check_decoded_size(header, seg_uid, voxel_limit)
        _convert(contents[0], seg_uid, converted, source)
    _remove_other_conversions(cache, seg_uid, converted)
    return str(converted)


def _listed_instances(datastore, seg_uid: str) -> list:
    """The SOPInstanceUIDs the PACS lists in the series ``seg_uid`` now (one QIDO-RS instance search, within
    :data:`lib.pacs_corrections.PACS_SEARCH_TIMEOUT_S`), sorted.

    Raises:
        lib.pacs_corrections.CorrectionNotServed: the search failed (502) or was not answered (504).
    """
    from .pacs import _first_str
    from .pacs_corrections import bounded_search

    client = datastore._client  # noqa: SLF001 - the datastore's authenticated DICOMweb client
    found = bounded_search(
        datastore, lambda: client.search_for_instances(search_filters={"SeriesInstanceUID": seg_uid},
                                                       fields=["SOPInstanceUID"]) or [],
        f"the instances of series {seg_uid}", "its DICOM SEG cannot be told from the one converted; nothing was sent")
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


def _conversion_path(cache: Path, seg_uid: str, source: str) -> Path:
    """The conversion of the SEG ``seg_uid`` made from the content ``source`` (:func:`_source_key`)."""
    return cache / f"{seg_uid}{_KEYED_INFIX}{source[:_KEY_CHARS]}{SEG_LABEL_SUFFIX}"


def _remove_other_conversions(cache: Path, seg_uid: str, kept: Path) -> None:
    """Remove the conversions of the SEG ``seg_uid`` in ``cache`` other than ``kept`` (of a content the PACS no
    longer holds under its UID: a patient's segmentation that is no label any more) and an earlier version's
    (``<uid>.nii.gz`` and its ``.source``). A read that answers one of them holds it open (:func:`open_seg_label`);
    one about to open it finds none and asks again."""
    keyed = re.compile(re.escape(seg_uid + _KEYED_INFIX) + f"[0-9a-f]{{{_KEY_CHARS}}}" + re.escape(SEG_LABEL_SUFFIX))
    earlier = {f"{seg_uid}{SEG_LABEL_SUFFIX}", f"{seg_uid}{SEG_LABEL_SUFFIX}.source"}
    try:
        names = [name for name in os.listdir(cache) if name != kept.name and (name in earlier or keyed.fullmatch(name))]
    except OSError:
        return
    for name in names:
        try:
            os.unlink(cache / name)
        except FileNotFoundError:  # removed by another read
            continue
        except OSError as error:
            log.warning("could not remove %s, an earlier conversion of the DICOM SEG %s: %s", name, seg_uid, error)
            continue
        log.info("removed %s, a conversion of the DICOM SEG %s of a content the PACS no longer holds", name, seg_uid)


def _own_identity(datastore, seg_uid: str) -> dict:
    """The one identity (``series_instance_uid``, ``study_instance_uid``, ``patient_id``) the PACS's series search
    lists the SEG ``seg_uid`` under (:func:`lib.pacs_corrections.pacs_identities`).

    Raises:
        SegNotServed: 404, the PACS no longer lists it; 409, it lists it under several studies or patients.
    """
    from .pacs_corrections import pacs_identities

    own = pacs_identities(datastore, seg_uid)
    if not own:
        raise SegNotServed(f"series {seg_uid} is not served as a label: the PACS no longer lists it", 404)
    if len(own) > 1:
        raise SegNotServed(f"series {seg_uid} is not served as a label: the PACS lists it under {len(own)} studies or "
                           "patients, so which image it labels cannot be told", 409)
    return own[0]


def _file_identity(header) -> dict:
    """The identity the DICOM ``header`` names itself by (as :func:`lib.pacs_corrections.pacs_identities`' keys;
    DICOM padding dropped)."""
    from .audit.identity import dicom_text

    return {key: dicom_text(header.get(keyword)) for key, keyword in (
        ("series_instance_uid", "SeriesInstanceUID"), ("study_instance_uid", "StudyInstanceUID"),
        ("patient_id", "PatientID"))}


def _identity_changes(header, own: dict) -> str:
    """What the DICOM ``header`` names otherwise than the PACS's listing ``own`` ("" when nothing)."""
    mine = _file_identity(header) if header is not None else {}
    return ", ".join(f"{key} {mine.get(key)!r}" for key in ("series_instance_uid", "study_instance_uid",
                                                            "patient_id") if mine.get(key) != own[key])


def _header_changes(downloaded: dict, own: dict) -> str:
    """What the first file of ``downloaded`` names otherwise than the PACS's listing ``own`` ("" when nothing)."""
    return _identity_changes(_header(next(iter(downloaded.values()))), own)


def _check_same_identity(datastore, seg_uid: str, own: dict, header, referenced: list) -> None:
    """Nothing when the SEG's own file (``header``) names the series, study and patient the PACS lists it under
    (``own``, its series search: made before the download, the file tells a SEG moved to another patient
    meanwhile) and the PACS lists each ``referenced`` series (searched now) under the same study and patient (a
    referenced series the PACS does not list is no other patient's image here).

    Raises:
        SegNotServed: 409, its file names another series, study or patient than the PACS lists it under, or a
            referenced series is listed under another study or patient (the SEG would label another patient's image).
    """
    from .pacs_corrections import pacs_identities

    study, patient = own["study_instance_uid"], own["patient_id"]
    changed = _identity_changes(header, own)
    if changed:
        raise SegNotServed(
            f"series {seg_uid} is not served as a label: its DICOM SEG's file names {changed}, and the PACS lists it "
            f"under patient_id {patient!r}, study {study!r} (changed while it was read?); it is not served: ask "
            "again", 409)
    for uid in referenced:
        for other in pacs_identities(datastore, uid):
            moved = [f"{what} {other[key]!r}" for key, what, mine in (("patient_id", "patient_id", patient),
                                                                     ("study_instance_uid", "study", study))
                     if other[key] != mine]
            if moved:
                raise SegNotServed(
                    f"series {seg_uid} is not served as a label: its DICOM SEG (patient_id {patient!r}, study "
                    f"{study!r}) references series {uid}, which the PACS lists under {', '.join(moved)}: a SEG "
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
    """``seg_bytes`` (a DICOM SEG instance, of the content ``source``: :func:`_source_key`) as a label volume at
    ``converted`` (:func:`_conversion_path`, named by ``source``), written beside it under a temporary name, then
    renamed: another read converting the same content meanwhile writes the same volume; one of another content
    (the SEG replaced in the PACS) writes another file. Under one name for every content, a read converting the
    SEG's earlier content after a read of its new one could leave the earlier volume recorded as the new one's,
    served for ever.

    Raises:
        SegNotServed: 422, pydicom_seg cannot read it; 507, the label cache's disk is full; 500, the volume could
            not be written there for another reason (named).
    """
    import io

    import pydicom
    import pydicom_seg
    import SimpleITK as sitk

    from .pacs import disk_full

    try:
        image = pydicom_seg.MultiClassReader().read(pydicom.dcmread(io.BytesIO(seg_bytes))).image
    except Exception as error:  # pydicom_seg's refusals are ValueError, KeyError, AttributeError...
        raise SegNotServed(f"series {seg_uid} is not served as a label: its DICOM SEG cannot be read as a label "
                           f"volume ({type(error).__name__}: {error})") from None
    partial = None
    try:
        handle, partial = tempfile.mkstemp(prefix=_CONVERTING_PREFIX, suffix=SEG_LABEL_SUFFIX, dir=converted.parent)
        os.close(handle)
        sitk.WriteImage(image, partial, True)
        os.replace(partial, converted)
    except BaseException as error:
        if partial is not None:
            try:
                os.unlink(partial)
            except FileNotFoundError:
                pass
        if isinstance(error, OSError):
            full = disk_full(error)
            log.error("DICOM SEG %s: its label volume could not be written into the label cache %s: %s", seg_uid,
                      converted.parent, error)
            raise SegNotServed(
                f"series {seg_uid} is not served as a label: its label volume could not be written into the server's "
                f"label cache ({'the disk is full: no space left' if full else error.strerror or type(error).__name__}"
                "); nothing of it was kept", 507 if full else 500) from None
        if isinstance(error, RuntimeError):  # SimpleITK's write failed (its message names no errno)
            log.error("DICOM SEG %s: its label volume could not be written into the label cache %s: %s", seg_uid,
                      converted.parent, error)
            raise SegNotServed(
                f"series {seg_uid} is not served as a label: its label volume could not be written into the server's "
                "label cache (SimpleITK could not write it: is its disk full?); nothing of it was kept", 500) from None
        raise
    log.info("DICOM SEG %s converted to the label volume %s", seg_uid, converted)


def open_seg_label(datastore, seg_uid: str):
    """The label volume of the DICOM SEG ``seg_uid`` (the datastore's ``get_label_uri``, :func:`seg_label_uri`),
    opened for reading: sent from the open file, it is the one its read checked, whatever another read removes
    meanwhile (a conversion of the SEG's earlier content, :func:`_remove_other_conversions`; removed before it was
    opened, it is asked again). None when there is none (no file).

    Raises:
        SegNotServed: 503, removed before it was opened at each of :data:`DOWNLOAD_TRIES` tries (the PACS kept
            changing the SEG).
    """
    for _ in range(DOWNLOAD_TRIES):
        path = datastore.get_label_uri(seg_uid, "final")
        if not path:
            return None
        try:
            return open(path, "rb")
        except FileNotFoundError:  # another content's read removed it since: the SEG as the PACS holds it now
            continue
        except IsADirectoryError:  # a download not converted (MONAI_LABEL_DICOMWEB_CONVERT_TO_NIFTI off)
            return None
        except OSError as error:  # permissions, too many open files: said, not a bare 500
            raise SegNotServed(f"series {seg_uid} is not served as a label: its label volume cannot be opened "
                               f"({type(error).__name__}: {error.strerror or error}); nothing was sent", 500) from None
    raise SegNotServed(f"series {seg_uid} is not served as a label: the PACS kept changing it (each label volume "
                       "made of it was of a content replaced meanwhile); nothing was sent: try again later", 503)


def remove_earlier_seg_labels(datastore) -> list:
    """At start-up, for a DICOMweb datastore: the conversions an earlier version of this app saved of the PACS's
    DICOM SEGs under a SEG's UID alone in MONAI Label's label cache (``labels/final/<SEG uid>.nii.gz`` and its
    ``.source``, beside the SEG's download: never read now) are removed. The labels in MONAI Label's index
    (``<image>.nii.gz``: a SEG's conversion saved as the label of the image it references, or a label another
    MONAI Label app on the same cache saved) are kept, not used: a WARNING names them (neither this server's
    training list nor its label route reads them; its corrections are :mod:`lib.pacs_corrections`'). Returns the
    paths removed."""
    layout = datastore._datastore  # noqa: SLF001 - MONAI Label's own cache layout
    cache = Path(layout.label_path("final"))
    paired = sorted(image_id for image_id, entry in layout.objects.items() if entry.labels.get("final"))
    removed = []
    if paired:
        log.warning("MONAI Label's label cache %s holds 'final' labels of %d PACS series (%s) that this server does "
                    "not use (not listed for training, not sent as their label): saved by an earlier version (a "
                    "DICOM SEG's conversion as the label of the series it references) or by another MONAI Label app "
                    "on the same cache; they are left as they are", cache, len(paired), ", ".join(paired))
    try:
        names = sorted(os.listdir(cache))
    except OSError:
        return removed
    for name in names:  # <SEG uid>.nii.gz (.source) beside its download <SEG uid>/: an earlier version's
        stem = name[: -len(".source")] if name.endswith(SEG_LABEL_SUFFIX + ".source") else name
        if stem.endswith(SEG_LABEL_SUFFIX) and (cache / stem[: -len(SEG_LABEL_SUFFIX)]).is_dir() \
                and _KEYED_INFIX not in stem and not name.startswith("."):
            try:
                os.unlink(cache / name)
            except OSError:
                continue
            removed.append(cache / name)
    return removed


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
