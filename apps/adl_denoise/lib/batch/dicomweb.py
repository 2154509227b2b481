"""A DICOMweb server as a batch source and sink, through the ``dicomweb-client`` library: the series to denoise
(QIDO-RS, with filters), their instances (WADO-RS, streamed one instance at a time into a folder) and the
derived series sent back (STOW-RS, checked instance by instance: a server can answer 200 and store nothing).

Outputs of a DICOMweb source go to ``OUT/<StudyInstanceUID>/<SeriesInstanceUID>/`` (a derived DICOM series,
as for a DICOM folder). Series this app derived (SeriesDescription holding "[denoised", or, for a series without
a description (an anonymised copy), ImageType DERIVED\\...\\DENOISED where the server returns it) are never taken
as inputs, so a rerun after STOW-RS does not denoise its own results; nor are series of a modality that holds no
images (structured reports, presentation states, key-object selections, RT structure sets and plans, encapsulated
documents...: :data:`NON_IMAGE_MODALITIES`), which a folder tree's discovery passes over too (no image size).

A server may answer a search with part of its matches: Orthanc's ``LimitFindResults`` (series, studies) and
``LimitFindInstances`` cut every QIDO-RS answer to that many matches plus one, however the ``offset`` pages, and says
nothing; other servers may say so in a ``Warning`` header (DICOM PS3.18 6.7.1.2). A batch over such an answer
processed part of the archive and reported success. The series list is paged (``offset``; a page of matches
already listed ends it: a server that ignores ``offset`` was asked for ever, :func:`lib.pacs.all_pages`) and
checked: a ``Warning`` that more matches exist, or an Orthanc server (its REST API beside the DICOMweb root) whose
finds stop at or below the number of series answered, stops the batch before any work, saying how to get the whole list
(:func:`discover_dicomweb`). How many instances the server holds of a derived series is asked at the series level
(``NumberOfSeriesRelatedInstances``: one match, never cut) rather than by listing them (:func:`instances_on_server`).

The derived series' UIDs are recorded before its STOW-RS; a rerun asks the server for a series an earlier run may
have sent (:func:`instances_on_server`) before it stores anything, so that a run killed after the store and before
its "done" record never leads to a second derived series of the same source on the server (see
:meth:`lib.batch.runner._Rank._resume`).

A series is known by its UID and, beyond its instance count, by its SOP Instance UIDs and their creation dates and
times as the server lists them (:func:`series_identity`, recorded before its download): a rerun denoises again a
series whose instances were replaced (a corrected series sent again) or stored again under the same count.

A series is downloaded only once the server's QIDO-RS answer shows it within the readers' voxel limit
(``ADL_MAX_VOXELS``) and the free disk space of the download folder (:func:`check_download`): a series of thousands of
slices filled the disk, or was downloaded whole before the reader refused it. A refused series fails with its reason
(nothing downloaded) and the batch goes on. The check and the download are two requests (a series still arriving
at the server grows in between): each instance is counted again as it arrives, against the voxel limit and the free
disk space as it is then; a series that grows past either is stopped there, its files removed, and fails the same way.

Every request waits :data:`lib.pacs.PACS_CONNECT_TIMEOUT_S` to connect and ``ADL_PACS_READ_TIMEOUT_S``
(:func:`lib.pacs.pacs_read_timeout_s`) for each read of its answer (:func:`lib.pacs.bounded_client`, as the server's
requests): a PACS that accepted the connection and never answered hung the whole batch for ever. One that does not
answer in time raises :class:`PacsDidNotAnswer`, naming what was asked and how long it waited; a slow download that
keeps arriving is never cut.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from pathlib import Path

import pydicom

from ..imaging.errors import one_line
from ..imaging.guards import max_voxels
from ..pacs import (PACS_READ_TIMEOUT_ENV, PacsStoreError, SeriesSize, all_pages, bounded_client, disk_full,
                    disk_shortfall, instance_voxels, one_line_redacted, pacs_read_timeout_s, read_timed_out,
                    save_instance, search_whole, series_disk_shortfall, series_instance_count, series_size,
                    stow_datasets)
from ..pacs_corrections import without_credentials
from .discovery import DERIVED_MARK, SeriesFilter, SeriesItem, is_our_result, refuse_collisions, refuse_reused_uids

__all__ = ["DERIVED_MARK", "NON_IMAGE_MODALITIES", "DownloadRefused", "PacsDidNotAnswer", "PacsStoreError",
           "check_download", "derived_series", "discover_dicomweb", "download_series", "instances_on_server",
           "is_dicomweb_url", "make_client", "series_identity", "source_instances_sha256", "store_series"]

log = logging.getLogger(__name__)

#: Modality values (DICOM PS3.3 C.7.3.1.1.1) of series without images: never downloaded nor counted as failed
NON_IMAGE_MODALITIES = frozenset({"AU", "DOC", "ECG", "EPS", "FID", "HD", "KO", "PLAN", "PR", "REG", "RESP",
                                  "RTPLAN", "RTRECORD", "RTSTRUCT", "RWV", "SMR", "SR"})
#: voxels per instance assumed for sharding (series-level QIDO does not return Rows and Columns)
VOXELS_PER_INSTANCE = 512 * 512
#: instance attributes of a series' identity (:func:`series_identity`): SOPInstanceUID, InstanceCreationDate,
#: InstanceCreationTime, and the patient's PatientID, PatientName, PatientBirthDate (standard; kept in a server's
#: index, e.g. among Orthanc's main DICOM tags: no file read)
IDENTITY_FIELDS = ("00080018", "00080012", "00080013", "00100020", "00100010", "00100030")
#: environment variable: the first wait (seconds) of the client's retries, each later wait twice the one before
#: (dicomweb-client's default is 2 s: 2 + 4 + 8 + 16 = 30 s before a request to an unreachable server fails)
RETRY_WAIT_ENV = "ADL_DICOMWEB_RETRY_WAIT_S"


def is_dicomweb_url(text: str) -> bool:
    return str(text).lower().startswith(("http://", "https://"))


def make_client(url: str):
    """A ``DICOMwebClient`` for the service root ``url`` (e.g. ``http://pacs:8042/dicom-web``). It retries a failed
    request 4 times, waiting 2, 4, 8 then 16 s; ``ADL_DICOMWEB_RETRY_WAIT_S`` sets the first wait (the tests
    shorten it; the number of tries stays). Each request waits :data:`lib.pacs.PACS_CONNECT_TIMEOUT_S` to connect and
    ``ADL_PACS_READ_TIMEOUT_S`` for each read of its answer (:func:`lib.pacs.bounded_client`; a read timeout is not
    tried again).

    Raises:
        ValueError: ``ADL_DICOMWEB_RETRY_WAIT_S`` is not a number >= 0, or ``ADL_PACS_READ_TIMEOUT_S`` not seconds > 0.
    """
    pacs_read_timeout_s()  # a bad ADL_PACS_READ_TIMEOUT_S is told before any request
    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(url=url.rstrip("/"))
    value = os.environ.get(RETRY_WAIT_ENV, "").strip()
    if value:
        try:
            first_wait = float(value)
        except ValueError:
            first_wait = -1.0
        if not first_wait >= 0:
            raise ValueError(f"{RETRY_WAIT_ENV}={value!r}: the first wait between retries must be seconds >= 0")
        # retrying waits multiplier * 2**attempt milliseconds after each failed attempt (1, 2, ...)
        client.set_http_retry_params(wait_exponential_multiplier=first_wait * 1000 / 2)
    bounded_client(client)
    return client


class PacsDidNotAnswer(TimeoutError):
    """The DICOMweb server accepted a request and did not answer it (or stopped sending its answer) within
    ``ADL_PACS_READ_TIMEOUT_S``; the message says what was asked and how long it waited. A ``TimeoutError``: the
    batch counts it as a server that cannot be reached (the next series would wait the same)."""


@contextlib.contextmanager
def _answered(client, what: str):
    """Within it, a request to ``client``'s server that timed out reading its answer (:func:`lib.pacs.read_timed_out`)
    raises :class:`PacsDidNotAnswer` saying that the server did not answer ``what`` in time (requests' own message
    names a connection pool and a number only)."""
    try:
        yield
    except Exception as error:
        if not read_timed_out(error):
            raise
        raise PacsDidNotAnswer(f"the PACS {without_credentials(client.base_url)} did not answer {what} within "
                               f"{pacs_read_timeout_s():g} s (it accepted the request, then sent nothing for that "
                               f"long; {PACS_READ_TIMEOUT_ENV} sets how long it may stay silent)") from error


def _value(result: dict, keyword: str, default=""):
    from pydicom.datadict import tag_for_keyword

    element = result.get(f"{tag_for_keyword(keyword):08X}") or {}
    values = element.get("Value") or []
    if not values:
        return default
    value = values[0]
    if isinstance(value, dict):  # PN: {"Alphabetic": ...}
        value = value.get("Alphabetic", "")
    return value


def _image_type(client, study: str, series: str) -> list:
    """ImageType of one instance of the series (QIDO-RS, instance level), [] when the server does not return it,
    answers the search with an error or cannot be reached (the series' next request tells it). Asked only for series
    without a SeriesDescription (an anonymiser removes it and keeps ImageType): ImageType is an instance attribute,
    which a server reads from a file, so asking it for every series of an archive would cost one file read per
    series.

    Raises:
        PacsDidNotAnswer: the server did not answer the search within ``ADL_PACS_READ_TIMEOUT_S`` (it was taken as
            [] in silence: the series was taken as an input without knowing whether it is a result of this app).
    """
    try:
        with _answered(client, f"the search of the ImageType of series {series} (QIDO-RS)"):
            found = client.search_for_instances(study_instance_uid=study, series_instance_uid=series,
                                                fields=["ImageType"], limit=1)
    except PacsDidNotAnswer:
        raise
    except Exception:  # noqa: BLE001 - unknown: the series stays an input (as before anonymised copies were told)
        log.debug("cannot ask the ImageType of series %s", series, exc_info=True)
        return []
    return list(((found[0] if found else {}).get("00080008") or {}).get("Value") or [])


def discover_dicomweb(client, out_root: Path, series_filter: SeriesFilter | None = None) -> list[SeriesItem]:
    """Every series the server lists (QIDO-RS ``/series``, all pages), filtered, sorted by key, with its output
    folder. Modality and the StudyDate range go to the server and are checked again here (a server may ignore a
    filter it does not support); the description pattern is matched here only, case-insensitively (DICOM
    wildcard matching of SeriesDescription is case-sensitive). A SeriesInstanceUID the answer lists in more than one
    study or under more than one PatientID (Orthanc keeps each apart, and lists the same study and series twice
    under two patients) is refused in each (:func:`.discovery.refuse_reused_uids`; among the series the server
    lists for the run's Modality and StudyDate filters). A series without a SeriesDescription whose ImageType search
    the server does not answer within ``ADL_PACS_READ_TIMEOUT_S`` is refused saying so (it was taken as an input in
    silence), and so is every such series after it, without asking (each search would wait as long)."""
    series_filter = series_filter or SeriesFilter()
    filters: dict[str, str] = {}
    if series_filter.modality:
        filters["Modality"] = series_filter.modality.upper()
    if series_filter.study_dates:
        first, last = series_filter.study_dates
        filters["StudyDate"] = f"{first or ''}-{last or ''}"

    def search() -> list[dict]:
        try:
            with _answered(client, "the search of its series (QIDO-RS)"):
                return all_pages(lambda offset: client.search_for_series(
                    search_filters=filters or None, offset=offset,
                    fields=["StudyDate", "SeriesDescription", "Modality", "SeriesNumber",
                            "NumberOfSeriesRelatedInstances", "PatientID"]))
        except PacsDidNotAnswer as error:
            raise ValueError(f"{error}: nothing was denoised") from None
        except Exception as error:  # noqa: BLE001 - connection refused, HTTP error, not a DICOMweb answer
            raise ValueError(f"cannot list the series of {without_credentials(client.base_url)} (QIDO-RS): "
                             f"{one_line_redacted(error)}") from None

    results = search_whole(client, search, "Series", "the series", "; nothing was denoised")
    items = []
    listed = []  # (series, study, patient) of every series listed, taken or not: one UID in two studies is refused
    silent_at = None  # the series whose ImageType search the server did not answer in time (_image_type)
    for result in results:
        study, series = str(_value(result, "StudyInstanceUID")), str(_value(result, "SeriesInstanceUID"))
        patient = str(_value(result, "PatientID"))
        listed.append((series, study, patient))
        description = str(_value(result, "SeriesDescription"))
        if not study or not series or is_our_result(description, None):
            continue
        modality = str(_value(result, "Modality"))
        if modality.upper() in NON_IMAGE_MODALITIES:
            continue
        if not series_filter.accepts(modality, str(_value(result, "StudyDate")), description):
            continue
        image_type, problem = [], None
        if not description and silent_at:  # not asked: each search would wait as long
            problem = (f"its ImageType was not asked (whether it is a result of this app is not known): the PACS "
                       f"{without_credentials(client.base_url)} did not answer that of series {silent_at} within "
                       f"{pacs_read_timeout_s():g} s; not denoised")
        elif not description:
            try:
                image_type = _image_type(client, study, series)
            except PacsDidNotAnswer as error:  # this series fails saying so, as the rest of the batch's requests
                silent_at = series
                problem = f"{error}: not denoised (whether it is a result of this app is not known)"
        if is_our_result(description, image_type):  # an anonymised copy of a result (no description)
            log.warning("not denoised: series %s is a result of this app (ImageType %s, no SeriesDescription)",
                        series, "\\".join(str(v) for v in image_type))
            continue
        instances = int(_value(result, "NumberOfSeriesRelatedInstances", 0) or 0)
        items.append(SeriesItem(key=f"dicomweb:{study}/{series}", kind="dicomweb",
                                source=f"{without_credentials(client.base_url)}/studies/{study}/series/{series}",
                                output=out_root / study / series, voxels=instances * VOXELS_PER_INSTANCE,
                                series_uid=series, study_uid=study, studies=(study,), patients=(patient,),
                                problem=problem))
    return refuse_reused_uids(refuse_collisions(sorted(items, key=lambda item: item.key), out_root), listed)


def _uids_sha256(uids) -> str:
    """The SHA-256 of a set of UIDs: sorted, one a line (the same whatever order a server lists them in)."""
    return hashlib.sha256("".join(f"{uid}\n" for uid in sorted(set(uids))).encode()).hexdigest()


def series_identity(client, item: SeriesItem) -> dict:
    """What the server holds of the series ``item`` now, beyond its instance count: ``input_instances_sha256``, the
    SHA-256 of its SOP Instance UIDs (sorted), and, when the server returns InstanceCreationDate or
    InstanceCreationTime, ``input_created_sha256``, of each UID with them; when it returns the patient,
    ``input_patient_sha256``, of the PatientID, PatientName and PatientBirthDate its instances are filed under.
    Recorded before the series is downloaded and compared by a rerun, they tell a series whose instances were
    replaced under the same count (a corrected series sent again: other UIDs; the same UIDs stored again, with new
    creation times), or that was filed under another patient (a misfiled series corrected in place: the derived
    copy names its patient), from the one denoised. One QIDO-RS
    search of its instances (all pages, standard attributes only). {} when the server cannot list them all (an error
    answered, a search cut by its limit on results: :func:`lib.pacs.search_whole`): the series is then known by its
    instance count only, with a warning.

    Raises:
        requests.exceptions.ConnectionError, Timeout: the server cannot be reached.
        PacsDidNotAnswer: the server did not answer the search within ``ADL_PACS_READ_TIMEOUT_S``.
    """
    from requests.exceptions import ConnectionError as RequestsConnectionError, Timeout

    try:
        with _answered(client, f"the search of the instances of series {item.series_uid}"):
            found = search_whole(client, lambda: all_pages(lambda offset: client.search_for_instances(
                study_instance_uid=item.study_uid or None, search_filters={"SeriesInstanceUID": item.series_uid},
                fields=list(IDENTITY_FIELDS), offset=offset)), "Instance",
                f"the instances of series {item.series_uid}")
    except (RequestsConnectionError, Timeout, PacsDidNotAnswer):
        raise  # the download would fail the same way: the series fails as unreachable
    except Exception as error:  # noqa: BLE001 - an HTTP error answered, a cut listing
        log.warning("series %s: its instances cannot be listed whole (%s): a rerun tells a change by its instance "
                    "count only", item.series_uid, one_line_redacted(error))
        return {}
    instances = [(str(_value(entry, "SOPInstanceUID")), str(_value(entry, "InstanceCreationDate")),
                  str(_value(entry, "InstanceCreationTime"))) for entry in found or []]
    instances = [entry for entry in instances if entry[0]]
    if not instances:
        return {}
    identity = {"input_instances_sha256": _uids_sha256(uid for uid, _, _ in instances)}
    if any(date or time for _, date, time in instances):
        identity["input_created_sha256"] = _uids_sha256("\t".join(entry) for entry in instances)
    patients = {"\t".join(str(_value(entry, keyword)) for keyword in ("PatientID", "PatientName", "PatientBirthDate"))
                for entry in found or [] if _value(entry, "SOPInstanceUID")}
    if any(patient.strip("\t") for patient in patients):
        identity["input_patient_sha256"] = _uids_sha256(patients)
    return identity


def source_instances_sha256(folder: Path) -> str | None:
    """:func:`series_identity`'s ``input_instances_sha256`` of the instances that the derived series in ``folder``
    was made from (their SOP Instance UIDs, which each file names in its SourceImageSequence; headers only): what a
    run that recorded no identity denoised. None when the folder holds no file naming one."""
    files = sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
    uids = set()
    try:
        for path in files:
            head = pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=["SourceImageSequence"])
            for source in head.get("SourceImageSequence", None) or []:
                uids.add(str(source.get("ReferencedSOPInstanceUID", "") or ""))
    except Exception:  # noqa: BLE001 - not (all) DICOM: unknown
        return None
    uids.discard("")
    return _uids_sha256(uids) if uids else None


class DownloadRefused(ValueError):
    """A series not downloaded: over the voxel limit, or more than the free disk space holds (message: why)."""


def check_download(client, item: SeriesItem, folder: Path, limit: int | None = None) -> SeriesSize | None:
    """Refuse to download ``item`` into ``folder`` (an existing folder) when the server's QIDO-RS answer
    (:func:`lib.pacs.series_size`: its instances' Rows, Columns and frames, its series-level instance count) shows it
    over ``limit`` voxels (None: :func:`lib.imaging.guards.max_voxels`, the readers' limit, ``ADL_MAX_VOXELS``) or
    larger than the free space of ``folder``'s file system: the download (uncompressed, as WADO-RS sends it by
    default) and the derived series written from it (16 bits a voxel) beside it. Returns the size, None when the
    server does not tell it (then :func:`download_series` counts its voxels as they arrive).

    Raises:
        DownloadRefused: too large, or it does not fit (nothing was downloaded).
        requests.exceptions.ConnectionError, Timeout: the server cannot be reached.
        PacsDidNotAnswer: the server did not answer the size search within ``ADL_PACS_READ_TIMEOUT_S``.
    """
    limit = max_voxels() if limit is None else int(limit)
    with _answered(client, f"the size search of series {item.series_uid}"):
        size = series_size(client, item.series_uid, item.study_uid or None)
    if size is None:
        log.warning("series %s: the server does not tell its size (QIDO-RS Rows, Columns): its voxels are counted "
                    "as it is downloaded", item.series_uid)
        return None
    estimate = (f" (estimated: the server lists {size.listed} of its instances)"
                if size.listed < size.instances else "")
    if size.voxels > limit:
        raise DownloadRefused(f"series {item.series_uid} is too large: {size.instances} instances, {size.voxels:,} "
                              f"voxels{estimate} exceed the limit of {limit:,} (raise it with ADL_MAX_VOXELS); "
                              "nothing was downloaded")
    short = series_disk_shortfall(size, folder)
    if short is not None:
        needed, free = short
        raise DownloadRefused(f"series {item.series_uid} does not fit on the disk of {folder}: {size.instances} "
                              f"instances need about {needed:,} bytes{estimate} (the download and its derived "
                              f"series), {free:,} are free; nothing was downloaded: free some space or choose "
                              "another --output")
    return size


def download_series(client, item: SeriesItem, folder: Path, limit: int | None = None) -> Path:
    """The instances of ``item`` (WADO-RS), one file each in ``folder`` (created), one instance in memory at a
    time, after :func:`check_download` (``limit``: the voxel limit, None: the readers'). Returns ``folder``.

    The check and the retrieval are two requests: a series still arriving at the server grows in between. Each
    instance is therefore counted before it is written: its voxels against ``limit``, and its bytes (and the
    derived series of the instances so far, as :func:`check_download` reserves it) against the free space of
    ``folder``'s file system as it is then (other processes, other ranks of the batch, write there too). A download
    stopped, or failed, removes the files it wrote (and ``folder`` when it created it; nothing else).

    Raises:
        DownloadRefused: too large for the voxel limit or the free disk space (nothing was downloaded), or the
            series grew past the voxel limit, or past the free disk space, during the download, or the disk was
            full all the same (:func:`lib.pacs.disk_full`: another writer took the space; stopped at the instance
            that took it over; the files written removed).
        ValueError: the server returned no instance.
        PacsDidNotAnswer: the server did not answer, or stopped sending the series, for ``ADL_PACS_READ_TIMEOUT_S``
            (the files written removed).
    """
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    try:
        limit = max_voxels() if limit is None else int(limit)
        size = check_download(client, item, folder, limit)
        count, voxels = 0, 0
        with _answered(client, f"the download of series {item.series_uid} (WADO-RS)"):
            for count, dataset in enumerate(client.iter_series(item.study_uid, item.series_uid), start=1):
                voxels += instance_voxels(dataset)
                if voxels > limit:
                    what = (f"grew during its download: {size.instances} instances when its size was checked, {count}"
                            if size is not None else
                            f"is too large (the server did not tell its size): the {count} instances")
                    raise DownloadRefused(f"series {item.series_uid} {what} sent so far hold {voxels:,} voxels, over "
                                          f"the limit of {limit:,} (raise it with ADL_MAX_VOXELS); the download was "
                                          "stopped and its files removed")
                # this file, and the derived series of every instance so far (16 bits a voxel), as check_download counts
                short = disk_shortfall(dataset, folder, count, voxels)
                if short is not None:
                    needed, free = short
                    what = (f"grew past the free disk space during its download ({size.instances} instances when its "
                            f"size was checked, {count} sent so far)" if size is not None else
                            f"is larger than the free disk space (the server did not tell its size; {count} instances "
                            "sent so far)")
                    raise DownloadRefused(f"series {item.series_uid} {what}: instance {count} needs about "
                                          f"{needed:,} bytes with the derived series of those downloaded, {free:,} "
                                          f"are free on the disk of {folder}; the download was stopped and its files "
                                          "removed: free some space or choose another --output")
                path = folder / f"{count:06d}.dcm"
                written.append(path)  # before the write: a write cut short (disk full) leaves part of a file
                try:
                    save_instance(dataset, path)
                except OSError as error:  # the disk full all the same: another writer took the space since the check
                    if not disk_full(error):
                        raise
                    raise DownloadRefused(f"series {item.series_uid} does not fit on the disk of {folder}: the disk "
                                          f"was full at instance {count}; the download was stopped and its files "
                                          "removed: free some space or choose another --output") from None
        if count == 0:
            raise ValueError(f"the DICOMweb server returned no instance for series {item.series_uid}")
    except BaseException:
        _remove_written(folder, written, created)
        raise
    return folder


def _remove_written(folder: Path, written: list[Path], created: bool) -> None:
    """Remove the files ``written`` of a download stopped or failed, and ``folder`` when the download ``created``
    it and it is then empty; logs what cannot be removed."""
    for path in written:
        try:
            path.unlink(missing_ok=True)
        except OSError as error:
            log.warning("cannot remove %s of a stopped download: %s", path, one_line(error))
    if created:
        try:
            folder.rmdir()
        except OSError:  # not empty (something else wrote there) or gone: left as it is
            pass


def derived_series(folder: Path) -> dict | None:
    """``{"derived_study_uid", "derived_series_uid", "derived_instances"}`` of the derived series written in
    ``folder`` (headers only), or None when the folder holds no DICOM file of one series."""
    files = sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
    if not files:
        return None
    try:
        heads = [pydicom.dcmread(str(p), stop_before_pixels=True,
                                 specific_tags=["StudyInstanceUID", "SeriesInstanceUID"]) for p in files]
    except Exception:  # noqa: BLE001 - not (all) DICOM: not a derived series this batch wrote
        return None
    series = {str(h.get("SeriesInstanceUID", "")) for h in heads}
    if len(series) != 1 or "" in series:
        return None
    return {"derived_study_uid": str(heads[0].get("StudyInstanceUID", "")), "derived_series_uid": series.pop(),
            "derived_instances": len(files)}


def instances_on_server(client, study_uid: str, series_uid: str) -> int:
    """How many instances of the series the server lists (0 when it holds none): its series-level count
    (:func:`lib.pacs.series_instance_count`), else, from a server that does not return it, its instances listed
    (checked to be all of them).

    Raises:
        PacsStoreError: the server cannot be asked (then whether it holds the series is unknown).
    """
    try:
        with _answered(client, f"the search of the derived series {series_uid}"):
            count = series_instance_count(client, series_uid, study_uid)
            if count is not None:
                return count
            listed = search_whole(  # a server that does not return the count: its instances, checked to be all
                client, lambda: all_pages(lambda offset: client.search_for_instances(
                    study_instance_uid=study_uid, series_instance_uid=series_uid, offset=offset)),
                "Instance", f"the instances of the derived series {series_uid}")
    except Exception as error:  # noqa: BLE001 - connection refused, HTTP error, a cut answer
        raise PacsStoreError(f"cannot ask {without_credentials(client.base_url)} whether it holds the derived series "
                             f"{series_uid} "
                             f"(QIDO-RS): {one_line_redacted(error)}") from error
    return len({str(((entry.get("00080018") or {}).get("Value") or [""])[0]) for entry in listed} - {""})


def store_series(client, folder: Path) -> dict:
    """STOW-RS every DICOM file of ``folder`` (one derived series). Returns ``{"series_instance_uid",
    "instances"}``.

    Raises:
        PacsStoreError: the server did not store every instance (how many did, and the failure reasons).
        PacsDidNotAnswer: the server did not answer the store, or its check, within ``ADL_PACS_READ_TIMEOUT_S``
            (whether it stored the series is unknown: a rerun asks it, :func:`instances_on_server`).
    """
    datasets = [pydicom.dcmread(str(p)) for p in sorted(folder.iterdir()) if p.is_file()]
    with _answered(client, f"the store of the derived series {folder.name} (STOW-RS)"):
        return stow_datasets(client, datasets)

