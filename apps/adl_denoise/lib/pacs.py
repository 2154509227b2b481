"""Studies from a PACS through DICOMweb: read the series itself, and store the denoised result back.

MONAI Label's DICOMweb datastore downloads a series into ``<cache>/<SeriesInstanceUID>/`` and converts it to
``<cache>/<SeriesInstanceUID>.nii.gz`` for its own pipelines. A denoiser does better to read the DICOM files
(:func:`lib.imaging.read_volume`: HU rescale, padding, exact geometry, the headers a derived series needs), and
MONAI Label only knows how to store segmentations back, so :func:`store_derived_series` writes the denoised
volume as a new DICOM series derived from the original (new series UID, same study and patient, ImageType
DERIVED) and sends it with STOW-RS, checking the answer's ``FailedSOPSequence`` / ``ReferencedSOPSequence``
rather than the HTTP status (a PACS can answer 200 and store nothing), then that the server lists every instance
(QIDO-RS: a PACS can also list an instance as stored in its answer and drop it).
"""
from __future__ import annotations

import contextlib
import contextvars
import errno
import functools
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple, Optional

import pydicom

from .imaging import read_volume, write_dicom_derived_series
from .imaging.errors import one_line
from .pacs_corrections import without_credentials

log = logging.getLogger(__name__)

__all__ = ["is_dicomweb", "cached_images", "refresh_listing", "LISTING_MAX_AGE_S", "LISTING_RETRY_S",
           "start_up_warnings", "urls_redacted", "one_line_redacted", "cached_series_folder", "series_folder",
           "series_voxels", "series_size",
           "series_instance_count", "known_size", "SeriesSize", "is_downloaded", "stow_datasets",
           "store_derived_series", "PacsStoreError", "bound_waits", "is_pacs_url", "PACS_TRIES",
           "PACS_CONNECT_TIMEOUT_S", "PACS_READ_TIMEOUT_ENV", "PACS_READ_TIMEOUT_DEFAULT_S", "pacs_read_timeout_s",
           "read_timed_out", "send_timed_out", "failed_method", "error_answer", "failed_url", "bounded_client",
           "answered_within", "sends_wait_read_timeout", "PacsListingCut",
           "all_pages", "search_whole", "whole_listing", "LISTING_CUT_RETRY_S", "listed_series",
           "OVERSIZED_REMEMBERED", "OVERSIZED_UNCOUNTED_S", "cache_folder", "instance_voxels", "instance_bytes",
           "HEADER_BYTES", "disk_shortfall", "series_disk_shortfall", "disk_full", "save_instance", "SeriesTooLarge",
           "SeriesDoesNotFit", "SeriesNotDelivered", "SeriesNotFetchableByFrame", "check_by_frame",
           "PARTIAL_DOWNLOAD_PREFIX", "download_within", "bounded_downloads", "PARTIAL_DOWNLOAD_STALE_S",
           "FILE_META_TEMP_SUFFIX", "FILE_META_TEMP_STALE_S", "remove_stale_downloads", "final_label_problem"]

#: tries of one DICOMweb request that cannot connect or is answered 429 / 503 / 504: the first and two retries,
#: after 2 then 4 s. MONAI Label's client keeps dicomweb-client's default of 5 tries (waits of 2, 4, 8 and 16 s), so
#: every request to a PACS that is down took 30 s to fail, and an infer by id, which asks it twice (the series'
#: size, then its files), a minute
PACS_TRIES = 3
#: seconds to wait for a connection to the PACS (requests waits as long as the system does, minutes for a host that
#: drops packets, on every try)
PACS_CONNECT_TIMEOUT_S = 10.0
#: environment variable: seconds the PACS may stay silent while a request waits for its answer, or for the next bytes
#: of it (:func:`pacs_read_timeout_s`)
PACS_READ_TIMEOUT_ENV = "ADL_PACS_READ_TIMEOUT_S"
#: :data:`PACS_READ_TIMEOUT_ENV`'s default: a PACS answers a search at once and sends a series as it reads it, but a
#: store of a large series is answered once every instance is stored
PACS_READ_TIMEOUT_DEFAULT_S = 300.0


def pacs_read_timeout_s() -> float:
    """Seconds every request to the PACS waits for each read of its answer (the first byte, then each next part of a
    series being sent): ``ADL_PACS_READ_TIMEOUT_S``, else :data:`PACS_READ_TIMEOUT_DEFAULT_S`. Per read, not for the
    whole answer: a slow download that goes on arriving is never cut; a PACS that accepts the connection and then
    says nothing held the request (and a worker thread) for ever.

    Raises:
        ValueError: ``ADL_PACS_READ_TIMEOUT_S`` is not a number of seconds > 0.
    """
    value = os.environ.get(PACS_READ_TIMEOUT_ENV, "").strip()
    if not value:
        return PACS_READ_TIMEOUT_DEFAULT_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not (seconds > 0 and seconds != float("inf")):
        raise ValueError(f"{PACS_READ_TIMEOUT_ENV}={value!r}: the time the PACS may stay silent must be seconds > 0")
    return seconds


def read_timed_out(error: BaseException) -> bool:
    """Whether ``error`` (a failed request to a server) is its read timeout: requests' ``ReadTimeout`` (no answer in
    time), the ``ConnectionError`` requests raises from urllib3's ``ReadTimeoutError`` when an answer being read
    (a series streamed) stalls, or the one it raises from urllib3's ``ProtocolError('Connection aborted.',
    TimeoutError)`` when the server accepted the connection and stopped taking the request's body (a store: whether
    it kept what it read is unknown; :func:`sends_wait_read_timeout`)."""
    import urllib3
    from requests.exceptions import ConnectionError as RequestsConnectionError, ReadTimeout

    if isinstance(error, ReadTimeout):
        return True
    if isinstance(error, RequestsConnectionError) and error.args and \
            isinstance(error.args[0], urllib3.exceptions.ReadTimeoutError):
        return True
    return send_timed_out(error)


def send_timed_out(error: BaseException) -> bool:
    """Whether ``error`` is a request's send that timed out (:func:`read_timed_out`): urllib3's
    ``ProtocolError('Connection aborted.', TimeoutError)``, bare or in requests' ``ConnectionError``."""
    import urllib3
    from requests.exceptions import ConnectionError as RequestsConnectionError

    cause = error.args[0] if isinstance(error, RequestsConnectionError) and error.args else error
    return isinstance(cause, urllib3.exceptions.ProtocolError) and \
        any(isinstance(part, TimeoutError) for part in cause.args)


def sends_wait_read_timeout(session) -> None:
    """Each send of ``session``'s requests (the headers, each part of the body: a store's series) waits
    :func:`pacs_read_timeout_s` for the server to take it: urllib3 sends under the connect timeout (10 s,
    :data:`PACS_CONNECT_TIMEOUT_S`), requests having no timeout of its own for it, so a PACS busy storing what it
    read was cut off after 10 s whatever ``ADL_PACS_READ_TIMEOUT_S`` said. Connecting keeps the connect timeout."""
    adapter = _send_waiting_adapter()
    for prefix in ("http://", "https://"):
        session.mount(prefix, adapter())


@functools.lru_cache(maxsize=None)
def _send_waiting_adapter() -> type:
    """requests' adapter class of :func:`sends_wait_read_timeout` (built once, requests imported when needed)."""
    import urllib3
    from requests.adapters import HTTPAdapter

    def sending_under_read_timeout(connection_class: type) -> type:
        class Connection(connection_class):
            def send(self, data) -> None:
                if self.sock is None:  # http.client connects at the first send (plain HTTP): the connect timeout
                    self.connect()
                self.sock.settimeout(pacs_read_timeout_s())
                super().send(data)

        return Connection

    pools = {"http": type("HTTPPool", (urllib3.HTTPConnectionPool,), {
                 "ConnectionCls": sending_under_read_timeout(urllib3.connection.HTTPConnection)}),
             "https": type("HTTPSPool", (urllib3.HTTPSConnectionPool,), {
                 "ConnectionCls": sending_under_read_timeout(urllib3.connection.HTTPSConnection)})}

    class Adapter(HTTPAdapter):
        def init_poolmanager(self, *args, **kwargs) -> None:
            super().init_poolmanager(*args, **kwargs)
            self.poolmanager.pool_classes_by_scheme = pools

    return Adapter


def failed_method(error: BaseException) -> str | None:
    """The HTTP method (``GET``, ``POST``...) of the request that failed with ``error``: requests' exceptions carry
    the request, except the ``ConnectionError`` of an answer that stalled half way; :func:`bounded_client` notes it on
    every error of its requests. None when unknown."""
    method = getattr(getattr(error, "request", None), "method", None) or getattr(error, "adl_pacs_method", None)
    return str(method).upper() if method else None


def error_answer(error: BaseException):
    """The server's answer (a ``requests.Response``) that ``error`` reports: an ``HTTPError``'s, or the last one of
    a request dicomweb-client tried :data:`PACS_TRIES` times (``retrying.RetryError``: answered 429, 503 or 504 each
    time); None for another error."""
    answer = getattr(error, "response", None)
    if answer is None:
        answer = getattr(getattr(error, "last_attempt", None), "value", None)
    return answer if hasattr(answer, "status_code") else None


def failed_url(error: BaseException) -> str | None:
    """The URL of the request that failed with ``error`` (requests' exceptions carry it, an error answer too:
    :func:`error_answer`; a stalled answer's ``ConnectionError`` names only urllib3's connection pool and path), or
    None."""
    url = getattr(getattr(error, "request", None), "url", None) or getattr(error_answer(error), "url", None)
    if url:
        return str(url)
    cause = error.args[0] if getattr(error, "args", None) else None
    pool = getattr(cause, "pool", None)
    if pool is not None and getattr(pool, "host", None):
        return f"{pool.scheme}://{pool.host}:{pool.port}{getattr(cause, 'url', None) or '/'}"
    return None


def all_pages(search: Callable[[int], list]) -> list:
    """Every match of a QIDO-RS search, ``search(offset)`` answering one page from ``offset``: page after page until
    an empty one, or one that holds only matches of earlier pages (a server that ignores ``offset`` answers its first
    page again: dicomweb-client's ``get_remaining`` then asked it for ever, its list growing until memory ran out). A
    match listed twice within one page (a SeriesInstanceUID in two studies) is kept twice."""
    import json

    results: list = []
    seen: set[str] = set()
    while True:
        page = search(len(results))
        keys = [json.dumps(entry, sort_keys=True) for entry in page or []]
        if not keys or seen.issuperset(keys):
            return results
        seen.update(keys)
        results.extend(page)


class PacsStoreError(RuntimeError):
    """The PACS did not store the derived series (message: how many instances failed, and why if known)."""


def stow_datasets(client, datasets: list, server: str = "the DICOMweb server") -> dict:
    """STOW-RS ``datasets`` (one series) with a ``dicomweb_client.DICOMwebClient`` and check the answer instance by
    instance. Returns ``{"series_instance_uid", "instances"}``.

    Raises:
        PacsStoreError: ``server`` did not store every instance (how many did, and the failure reasons).
    """
    response = client.store_instances(datasets=datasets)
    failed = getattr(response, "FailedSOPSequence", None) or []
    stored = getattr(response, "ReferencedSOPSequence", None) or []
    if failed or len(stored) != len(datasets):
        reasons = sorted({str(getattr(entry, "FailureReason", "?")) for entry in failed})
        raise PacsStoreError(f"{server} stored {len(stored)} of {len(datasets)} instances"
                             + (f" (failure reasons {', '.join(reasons)})" if reasons else ""))
    _check_listed(client, datasets, server)
    return {"series_instance_uid": str(datasets[0].SeriesInstanceUID), "instances": len(datasets)}


def _check_listed(client, datasets: list, server: str) -> None:
    """Ask the server (QIDO-RS) for the instances of the series just stored: an answer that lists every instance as
    stored is not enough (Orthanc 1.10 does so for an instance its ``ReceivedInstanceFilter`` dropped), and a
    derived series short of a slice must not pass for a whole one.

    Raises:
        PacsStoreError: the server does not list every instance sent (or cannot be asked).
    """
    first = datasets[0]
    sent = {str(ds.SOPInstanceUID) for ds in datasets}
    try:
        listed = all_pages(lambda offset: client.search_for_instances(
            study_instance_uid=str(first.StudyInstanceUID), series_instance_uid=str(first.SeriesInstanceUID),
            offset=offset))
    except Exception as error:  # noqa: BLE001 - HTTP or connection error: whether it is all there is unknown
        raise PacsStoreError(f"{server} answered the store, but listing the stored series failed: "
                             f"{one_line_redacted(error)}") from None
    found = {str((entry.get("00080018") or {}).get("Value", [""])[0]) for entry in listed}
    # a server may list part of a series' instances (Orthanc's LimitFindInstances: that many plus one, whatever the
    # offset): those it did not list are asked one by one (one match each, never cut)
    missing = [uid for uid in sorted(sent - found) if not _listed_alone(client, first, uid)]
    if missing:
        raise PacsStoreError(f"{server} answered that it stored all {len(sent)} instances but lists "
                             f"{len(sent) - len(missing)} of them (missing e.g. {missing[0]})")


def _listed_alone(client, first, uid: str) -> bool:
    """Whether the server lists the instance ``uid`` of ``first``'s series when asked for it alone (QIDO-RS)."""
    try:
        listed = client.search_for_instances(study_instance_uid=str(first.StudyInstanceUID),
                                             series_instance_uid=str(first.SeriesInstanceUID),
                                             search_filters={"SOPInstanceUID": uid})
    except Exception:  # noqa: BLE001 - not known to be there: reported missing
        return False
    return any(str(((entry.get("00080018") or {}).get("Value") or [""])[0]) == uid for entry in listed)


def is_dicomweb(datastore) -> bool:
    from monailabel.datastore.dicom import DICOMWebDatastore

    return isinstance(datastore, DICOMWebDatastore)


#: seconds the review queue uses a DICOMweb datastore's series list before it asks the PACS again. MONAI Label keeps
#: the list for MONAI_LABEL_DICOMWEB_CACHE_EXPIRY (2 hours by default): a series that reached the PACS after it was
#: listed (the day's scans) was missing from the queue, and 404 to infer and to a verdict, for up to that long
LISTING_MAX_AGE_S = 60.0
#: at least this many seconds between two new listings asked for an id that is not in the list (a client asking for
#: ids the PACS does not hold must not have the server list the whole PACS on every request)
LISTING_RETRY_S = 10.0


def refresh_listing(datastore, max_age_s: float, missing_id: bool = False) -> bool:
    """Have a DICOMweb datastore's next ``list_images`` ask the PACS again (MONAI Label's cached series list of it
    is dropped) when this was last done more than ``max_age_s`` ago (or never); returns whether it was. With
    ``missing_id`` (asked for an id not in the list) only such refreshes count: a listing made for the queue a
    moment before a series reached the PACS does not make a request for that series wait. Nothing for another
    datastore."""
    if not is_dicomweb(datastore):
        return False
    from monailabel.datastore.dicom import DICOMWebDatastore

    now = time.monotonic()
    last = getattr(datastore, "_adl_listing_for_missing_id" if missing_id else "_adl_listing_refreshed", None)
    if last is not None and now - last < max_age_s:
        return False
    listing = DICOMWebDatastore.list_images  # cachetools' wrapper: its cache is keyed by the datastore
    listing.cache.pop(listing.cache_key(datastore), None)
    forget = getattr(datastore, "adl_forget_listing", None)  # the paged listing's own (whole_listing)
    if forget is not None:
        forget()
    datastore._adl_listing_refreshed = now
    if missing_id:
        datastore._adl_listing_for_missing_id = now
    return True


def cached_images(datastore) -> list[str]:
    """The series of a DICOMweb datastore that are in the server's local cache (downloaded, and converted to NIfTI,
    MONAI Label's ``MONAI_LABEL_DICOMWEB_CACHE_PATH``): the only ones with an info of their own (a review's copy),
    listed without a request to the PACS."""
    from monailabel.datastore.local import LocalDatastore

    return LocalDatastore.list_images(datastore)


def bound_waits(datastore) -> None:
    """A DICOMweb datastore's client (MONAI Label's) with :data:`PACS_TRIES` tries per request,
    :data:`PACS_CONNECT_TIMEOUT_S` to connect and :func:`pacs_read_timeout_s` for each read of an answer
    (:func:`bounded_client`), so that a PACS that is down is told in seconds (503), not after half a minute per
    request, and one that never answers in :func:`pacs_read_timeout_s` (504). Nothing for another datastore."""
    if not is_dicomweb(datastore):
        return
    client = datastore._client  # noqa: SLF001 - the datastore's DICOMweb client
    client.set_http_retry_params(retry=True, max_attempts=PACS_TRIES)  # the same codes retried, the same waits
    bounded_client(client)


#: the time (``time.monotonic()``) by which the PACS must have answered the requests made within
#: :func:`answered_within`; None outside it: each read waits :func:`pacs_read_timeout_s`
_answer_deadline: contextvars.ContextVar[Optional[float]] = contextvars.ContextVar("adl_pacs_answer_deadline",
                                                                                   default=None)
#: whether the client's request method running in this context is wrapped by :func:`_one_timeout_per_call`
_in_call: contextvars.ContextVar[bool] = contextvars.ContextVar("adl_pacs_in_call", default=False)


class _NotTriedAgain(BaseException):
    """Carries a read timeout past dicomweb-client's tries (``retrying`` retries every ``Exception``, after waits of
    2 and 4 s) to :func:`_one_timeout_per_call`, which raises it as it was."""

    def __init__(self, error: Exception) -> None:
        super().__init__(error)
        self.error = error


def bounded_client(client) -> None:
    """``client``'s requests (dicomweb-client gives them no timeout) wait :data:`PACS_CONNECT_TIMEOUT_S` to connect
    and :func:`pacs_read_timeout_s` for each read of the answer (within :func:`answered_within` no longer than its
    deadline); a request whose answer did not come in time is not tried again (dicomweb-client tries a request that
    raised :data:`PACS_TRIES` times: a PACS that never answers held it three times that long, and the 504 could not
    say how long it waited). Installed once per client."""
    session = getattr(client, "_session", None)
    if session is None or getattr(session, "adl_connect_timeout", None) is not None:
        return
    send = session.request

    def request(method, url, **kwargs):
        if kwargs.get("timeout") is not None:  # a request of this app's own that says how long it waits
            return send(method, url, **kwargs)
        deadline = _answer_deadline.get()
        read_s = pacs_read_timeout_s()
        if deadline is not None:
            if deadline - time.monotonic() <= 0:  # the tries so far took all of it
                from requests.exceptions import ReadTimeout

                raise ReadTimeout(f"no answer from {url} in time")
            read_s = min(read_s, max(deadline - time.monotonic(), 0.1))
        kwargs["timeout"] = (PACS_CONNECT_TIMEOUT_S, read_s)
        try:
            if deadline is not None:  # a PACS whose answer keeps trickling in is cut at the deadline too
                return _read_by(send, method, url, kwargs, deadline, read_s)
            return send(method, url, **kwargs)
        except Exception as error:
            with contextlib.suppress(AttributeError):  # the 504 of a store that timed out says so (failed_method)
                error.adl_pacs_method = method
            if _in_call.get() and read_timed_out(error):
                raise _NotTriedAgain(error) from None
            raise

    session.request = request
    session.adl_connect_timeout = PACS_CONNECT_TIMEOUT_S
    sends_wait_read_timeout(session)
    for name in ("_http_get", "_http_post", "_http_delete"):  # each holds dicomweb-client's tries of one request
        method = getattr(client, name, None)
        if method is not None:
            setattr(client, name, _one_timeout_per_call(method))


def _read_by(send: Callable, method: str, url: str, kwargs: dict, deadline: float, read_s: float):
    """``send(method, url, **kwargs)`` with its answer's body read whole by ``deadline`` (``time.monotonic()``), each
    read waiting no longer than ``read_s`` nor the time left: a per-read timeout alone let a PACS that sends a few
    bytes at a time hold the request far past the deadline (a 2 s search answered after 13 s, each read in time).
    The status line and headers are read with the per-read timeout only.

    Raises:
        requests.exceptions.ReadTimeout: the deadline passed before the whole answer came (or a read stalled).
    """
    import urllib3
    from requests.exceptions import ChunkedEncodingError, ContentDecodingError, ReadTimeout

    response = send(method, url, **{**kwargs, "stream": True})  # the body is read here, the clock checked between
    try:
        sock = getattr(getattr(response.raw, "connection", None), "sock", None)
        body = bytearray()
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ReadTimeout(f"the answer of {without_credentials(url)} was not whole by its deadline "
                                  f"({len(body):,} bytes of its body came)", response=response)
            if sock is not None:  # the next read waits no longer than the time left
                sock.settimeout(min(read_s, left))
            try:
                part = response.raw.read1(2**16, decode_content=True)  # what has come, not a full block
            except urllib3.exceptions.ReadTimeoutError as error:
                raise ReadTimeout(error, response=response) from None
            except urllib3.exceptions.DecodeError as error:  # as requests reads a body
                raise ContentDecodingError(error, response=response) from None
            except urllib3.exceptions.ProtocolError as error:
                raise ChunkedEncodingError(error, response=response) from None
            if not part:
                break
            body += part
    except BaseException:
        response.close()
        raise
    response._content, response._content_consumed = bytes(body), True  # as requests keeps a body it read
    return response


def _one_timeout_per_call(method: Callable) -> Callable:
    """``method`` (a client's request method, its tries included) that raises the read timeout of a try at once."""
    import functools

    @functools.wraps(method)
    def call(*args, **kwargs):
        token = _in_call.set(True)
        try:
            return method(*args, **kwargs)
        except _NotTriedAgain as stop:
            raise stop.error from None
        finally:
            _in_call.reset(token)

    return call


@contextlib.contextmanager
def answered_within(client, seconds: float) -> Iterator[None]:
    """Within it, ``client``'s requests (all their tries together) raise ``requests.exceptions.ReadTimeout`` when the
    PACS has not answered ``seconds`` after it began: a PACS that accepts connections but never answers held a
    request (a label's read, its series' check) for ever."""
    bounded_client(client)
    token = _answer_deadline.set(time.monotonic() + seconds)
    try:
        yield
    finally:
        _answer_deadline.reset(token)


class _HeaderWarnings(logging.Handler):
    """The ``Warning`` headers of the answers that dicomweb-client received while installed (it only logs them)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


#: a ``Warning`` header that says the answer holds part of the matches (PS3.18: "There are N additional results
#: that can be requested"; other servers: more matches than their maximum, a cut answer), not one about a
#: parameter ("the limit parameter is not supported": the whole answer)
_MORE_MATCHES = re.compile(r"(additional|more|remaining) (results|matches)|exceed|truncat", re.I)


def _orthanc_find_limit(client, level: str, answered: int) -> int | None:
    """For an Orthanc server (its REST API at the parent of the DICOMweb root) whose finds at ``level`` ("Series",
    "Instance") stop at ``answered`` results or fewer while it holds more: the number its finds stop at
    (``LimitFindResults`` / ``LimitFindInstances`` + 1). None when the answer is whole, or the server is no Orthanc
    or its REST API cannot be asked (then only a ``Warning`` header tells a cut answer)."""
    import requests

    root = str(client.base_url).rstrip("/").rsplit("/", 1)[0]
    session = getattr(client, "_session", None) or requests.Session()
    try:
        statistics = session.get(f"{root}/statistics", timeout=60)
        held = int(statistics.json()["CountSeries" if level == "Series" else "CountInstances"]) \
            if statistics.ok else -1
        if held <= answered:
            return None
        found = session.post(f"{root}/tools/find", json={"Level": level, "Query": {}, "Limit": answered + 1},
                             timeout=300)
        listed = found.json() if found.ok else None
    except Exception:  # noqa: BLE001 - no Orthanc REST API there (another server, a proxy): not known
        log.debug("no Orthanc REST API at %s", without_credentials(root), exc_info=True)
        return None
    if isinstance(listed, list) and len(listed) <= answered:
        return len(listed)
    return None


def search_whole(client, search, level: str, what: str, outcome: str = "", batch: bool = True) -> list[dict]:
    """The answer of ``search()`` (a QIDO-RS search of ``level`` matches, all pages), checked to hold every match;
    ``what`` names the matches in a message, ``outcome`` says what it means for the run, ``batch`` whether to advise
    narrowing the batch (a listing of the app's datastore has no filters to narrow).

    Used by the batch's searches (:mod:`lib.batch.dicomweb`) and the app's datastore listing (:func:`whole_listing`).

    Raises:
        ValueError: the server said, or its Orthanc configuration shows, that it answered part of the matches.
    """
    warnings = _HeaderWarnings()
    client_log = logging.getLogger("dicomweb_client.web")
    client_log.addHandler(warnings)
    try:
        results = search()
    finally:
        client_log.removeHandler(warnings)
    cut = [message for message in warnings.messages if _MORE_MATCHES.search(message)]
    if cut:
        raise ValueError(f"{without_credentials(client.base_url)} lists only part of {what} ({len(results)} given; "
                         f"its Warning: {cut[0]}){outcome}: raise the server's limit on search results"
                         + (", or narrow the batch (--study-date, --modality) below it" if batch else ""))
    limit = _orthanc_find_limit(client, level, len(results))
    if limit is not None:
        option = "LimitFindInstances" if level == "Instance" else "LimitFindResults"
        narrow = (f", or narrow the batch (--study-date, --modality) to at most {limit - 1} series"
                  if level == "Series" and batch else "")
        raise ValueError(f"{without_credentials(client.base_url)} lists only part of {what} ({len(results)} given): "
                         f"its Orthanc configuration cuts every search at {limit} matches ({option} {limit - 1})"
                         f"{outcome}: set "
                         f"{option} to 0 (no limit) or above the number it holds{narrow}")
    return results


#: seconds a listing found cut is answered with its error before the PACS is asked again (its limit may be raised)
LISTING_CUT_RETRY_S = 60.0


class PacsListingCut(RuntimeError):
    """The PACS answered the datastore's series search with part of its matches (the routes answer 503)."""


def whole_listing(datastore) -> None:
    """A DICOMweb datastore's ``list_images`` that lists every series its search filter matches, or fails. MONAI
    Label's asks the PACS for one page of series: a PACS that caps its search answers (Orthanc's
    ``LimitFindResults``, which says nothing; others with a ``Warning`` header or by paging) had the app list part of
    its studies in silence: the others answered 404 "no image" to an infer, were never handed out for review, and
    the review counts looked complete. The listing is now paged (``offset``) and checked as the batch's is
    (:func:`search_whole`); a cut one raises :class:`PacsListingCut`, logged as an ERROR, and the
    routes that list answer 503 naming the PACS setting. A whole listing is kept as long as MONAI Label keeps its
    own (``MONAI_LABEL_DICOMWEB_CACHE_EXPIRY``) or until :func:`refresh_listing` drops it, a cut one
    :data:`LISTING_CUT_RETRY_S`. What the listing says of each series (its Modality and instance count, asked with
    it: no request more) is kept with it for :func:`listed_series`. Nothing for another datastore."""
    if not is_dicomweb(datastore) or getattr(datastore, "adl_whole_listing", False):
        return
    from monailabel.config import settings
    from pydicom import Dataset

    client = datastore._client  # noqa: SLF001 - the datastore's DICOMweb client
    search_filter = getattr(datastore, "_search_filter", None) or None
    lock = threading.Lock()
    kept: dict = {}  # "until": monotonic time, then "ids" and "series" (listed_series), or "error"

    def list_images() -> list:
        with lock:
            if kept and time.monotonic() < kept["until"]:
                if "error" in kept:
                    raise PacsListingCut(kept["error"])
                return list(kept["ids"])
            kept.clear()
            try:
                found = search_whole(
                    client, lambda: all_pages(lambda offset: client.search_for_series(
                        search_filters=search_filter, fields=list(_LISTED_FIELDS), offset=offset)),
                    "Series", "its series", "; until then no study is listed, denoised or reviewed (a part of the "
                    "list would hide the others)", batch=False)
            except ValueError as error:
                log.error("the datastore cannot list the PACS's studies: %s", error)
                kept.update(until=time.monotonic() + LISTING_CUT_RETRY_S, error=str(error))
                raise PacsListingCut(str(error)) from None
            # as MONAI Label's own listing: every match, a SeriesInstanceUID listed twice kept twice (ambiguous)
            ids = [str(Dataset.from_json(entry)["SeriesInstanceUID"].value) for entry in found]
            series = {uid: {"modality": _first_str(entry, "00080060"), "instances": _first_int(entry, "00201209")}
                      for uid, entry in zip(ids, found)}
            kept.update(until=time.monotonic() + settings.MONAI_LABEL_DICOMWEB_CACHE_EXPIRY, ids=ids, series=series)
            return list(ids)

    def forget() -> None:  # refresh_listing: the next listing asks the PACS
        with lock:
            kept.clear()

    def listed(image_id: str) -> dict:
        with lock:
            return dict((kept.get("series") or {}).get(image_id) or {})

    datastore.list_images = list_images
    datastore.adl_forget_listing = forget
    datastore.adl_listed_series = listed
    datastore.adl_whole_listing = True


#: what the datastore's series listing asks of each series besides its UID (Modality is a default return key of a
#: series search, asked anyway for a PACS that returns only what it is asked)
_LISTED_FIELDS = ("Modality", "NumberOfSeriesRelatedInstances")


def listed_series(datastore, image_id: str) -> dict:
    """What the datastore's latest listing of its PACS said of the series ``image_id`` (:func:`whole_listing`):
    ``modality`` (its DICOM Modality) and ``instances`` (NumberOfSeriesRelatedInstances), each None when the PACS
    did not say; ``{}`` for a series not in that listing, or a datastore without it (local, or MONAI Label's own
    listing). No request to the PACS."""
    listed = getattr(datastore, "adl_listed_series", None)
    return listed(image_id) if listed is not None else {}


def cache_folder(studies: str) -> str:
    """The local folder where MONAI Label's DICOMweb datastore for the PACS at ``studies`` (its URL) keeps the series
    it downloads, their NIfTI conversions and their info (the review queue's copy of each verdict):
    ``<MONAI_LABEL_DICOMWEB_CACHE_PATH or ~/.cache/monailabel/dicom>/<MD5 of the URL>``, as MONAI Label names it."""
    from monailabel.config import settings
    from monailabel.utils.others.generic import md5_digest

    root = str(settings.MONAI_LABEL_DICOMWEB_CACHE_PATH or "").strip() or \
        os.path.join(Path.home(), ".cache", "monailabel", "dicom")
    return os.path.join(root, md5_digest(studies.rstrip("/").strip()))


def _origin(url: str) -> tuple[str, str, int | None]:
    from urllib.parse import urlsplit

    parts = urlsplit(str(url))
    scheme = parts.scheme.lower()
    try:
        port = parts.port or {"http": 80, "https": 443}.get(scheme)
    except ValueError:
        port = None
    return scheme, (parts.hostname or "").lower(), port


def is_pacs_url(url: str | None, datastore) -> bool:
    """Whether ``url`` (of a failed request) is on the server of the datastore's PACS (scheme, host and port of
    its DICOMweb root), as opposed to another service (the sign-in realm, a download); False when the datastore is
    no DICOMweb datastore or ``url`` is unknown."""
    if not url or not is_dicomweb(datastore):
        return False
    return _origin(url) == _origin(datastore._client.base_url)  # noqa: SLF001 - the datastore's client


# QIDO-RS attributes of an instance that give its size: Rows, Columns, NumberOfFrames, SamplesPerPixel, BitsAllocated
_SIZE_FIELDS = ("00280010", "00280011", "00280008", "00280002", "00280100")


_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://\S+")
_QUERY_IN_TEXT = re.compile(r"(/[^\s?'\"]*)\?[^\s'\"]*")  # a path's query (urllib3's "with url: /path?token")
_URL_TAIL = ")]}>'\",.;"


def urls_redacted(text: str) -> str:
    """``text`` (an error message) with each URL in it as :func:`without_credentials` gives it (no user name,
    password, query nor fragment) and each path's query removed: requests' errors name the URL asked, with the
    PACS's ``user:password@`` and a query token (``?access_token=...``)."""
    def redacted(found: re.Match) -> str:
        url = found.group()
        core = url.rstrip(_URL_TAIL)
        return without_credentials(core) + url[len(core):]

    return _QUERY_IN_TEXT.sub(r"\1", _URL_IN_TEXT.sub(redacted, str(text)))


def one_line_redacted(error: BaseException) -> str:
    """:func:`one_line` of an error of a request to the PACS, its URLs redacted (:func:`urls_redacted`); a URL
    that does not parse (requests' ``InvalidURL`` quotes the part it took for the host: part of a password with an
    unencoded ``/``, ``?`` or ``#``) is said so, without its text."""
    from requests.exceptions import InvalidURL

    if isinstance(error, InvalidURL):
        return ("the URL does not parse: a '/', '?', '#' or '@' in its user name or password must be percent-encoded "
                "(%2F, %3F, %23, %40)")
    return one_line(urls_redacted(str(error)))


def start_up_warnings(datastore) -> list[str]:
    """What a server on ``datastore`` should warn about at start-up (nothing unless it is a DICOMweb datastore):
    a search filter that lists only one of CT and MR (MONAI Label's default lists CT only), and a PACS that does not
    answer a one-study QIDO-RS query within 10 s (MONAI Label starts without asking it, and a wrong URL or a PACS
    that is down showed only at the first request). Warnings, not errors: the PACS may come up later; until then the
    routes that need it answer 503."""
    client = getattr(datastore, "_client", None)
    session = getattr(client, "_session", None)
    if session is None or not is_dicomweb(datastore):
        return []
    warnings: list[str] = []
    listed = (getattr(datastore, "_search_filter", None) or {}).get("Modality")
    if listed is not None and not {"CT", "MR"} <= set(str(listed).upper().replace("\\", ",").split(",")):
        missing = [m for m in ("CT", "MR") if m not in str(listed).upper()]
        warnings.append(f"the DICOMweb datastore lists only the PACS's series with Modality {listed} "
                        f"(MONAI_LABEL_DICOMWEB_SEARCH_FILTER; MONAI Label's default is CT): the "
                        f"{' and '.join(missing)} series are not served; a server for them needs "
                        f"MONAI_LABEL_DICOMWEB_SEARCH_FILTER='{{\"Modality\": \"{missing[0]}\"}}'")
    prefix = str(getattr(client, "qido_url_prefix", None) or "").strip("/")
    url = "/".join(part for part in (client.base_url.rstrip("/"), prefix, "studies") if part)
    try:
        response = session.get(url, params={"limit": 1}, headers={"Accept": "application/dicom+json"}, timeout=10)
        problem = None if response.status_code in (200, 204) else f"it answered HTTP {response.status_code}"
    except Exception as error:  # noqa: BLE001 - whatever fails, the same warning
        problem = f"{type(error).__name__}: {one_line_redacted(error)}"  # no password nor token
    if problem:
        warnings.append(f"the PACS at {without_credentials(client.base_url)} does not answer a QIDO-RS query "
                        f"({problem}): studies cannot "
                        "be listed, denoised or reviewed until it does (those requests answer 503); check --studies "
                        "and MONAI_LABEL_DICOMWEB_USERNAME / _PASSWORD")
    return warnings


def _first_str(entry: dict, tag: str) -> str | None:
    values = (entry.get(tag) or {}).get("Value") or []
    return (str(values[0]).strip() or None) if values else None


def _first_int(entry: dict, tag: str) -> int | None:
    values = (entry.get(tag) or {}).get("Value") or []
    try:
        return int(float(values[0])) if values else None
    except (TypeError, ValueError):
        return None


class SeriesSize(NamedTuple):
    """What :func:`series_size` tells of a PACS series before it is downloaded."""

    #: instances the series holds (the PACS's series-level count, or the number listed when it gives none)
    instances: int
    #: its voxels; when the PACS listed fewer instances than it holds (a limit on search results), estimated as
    #: ``instances`` times the largest instance listed
    voxels: int
    #: instances the PACS listed with their size
    listed: int
    #: bytes of its pixel data uncompressed (``Rows x Columns x NumberOfFrames x SamplesPerPixel x BitsAllocated / 8``
    #: per instance; 1 sample of 16 bits where the PACS does not say), estimated as ``voxels`` is
    pixel_bytes: int = 0
    #: a size found when a download was stopped over a limit (:func:`download_within`): ``instances`` and ``voxels``
    #: are the PACS's answer after the stop, or those it had sent by then when it told fewer; the series holds at
    #: least that many
    stopped: bool = False


def series_instance_count(client, series_uid: str, study_uid: str | None = None) -> int | None:
    """How many instances the server holds of the series ``series_uid`` (in the study ``study_uid`` when given): its
    series-level QIDO-RS ``NumberOfSeriesRelatedInstances``. One match, never cut by a server's limit on search
    results, as a list of its instances is (Orthanc's ``LimitFindInstances``: that many plus one, whatever the
    ``offset``). 0 when no series matches; None when the server matches it without the count. The one way the app
    (:func:`series_size`) and the batch (:func:`lib.batch.dicomweb.instances_on_server`) ask it.

    Raises:
        Exception: what the client raises (requests' ``ConnectionError`` / ``Timeout``, ``HTTPError``).
    """
    matches = client.search_for_series(study_instance_uid=study_uid, search_filters={"SeriesInstanceUID": series_uid},
                                       fields=["NumberOfSeriesRelatedInstances"])
    for entry in matches or []:
        if _first_str(entry, "0020000E") == series_uid:
            return _first_int(entry, "00201209")
    return 0


def _entry_size(entry: dict) -> tuple[int, int] | None:
    """``(voxels, pixel bytes)`` of one instance from its DICOM JSON (a QIDO-RS match, a WADO-RS metadata entry):
    ``Rows x Columns x NumberOfFrames`` voxels, their bytes ``ceil(voxels x SamplesPerPixel x BitsAllocated / 8)``
    (1 sample of 16 bits where it does not say; a bit-packed BitsAllocated of 1, a DICOM SEG's, takes an eighth of
    a byte a voxel); None without Rows or Columns."""
    rows, columns = _first_int(entry, "00280010"), _first_int(entry, "00280011")
    if not rows or not columns:
        return None
    voxels = rows * columns * _entry_frames(entry)
    bits = _first_int(entry, "00280100") or 16
    return voxels, _packed_bytes(voxels * max(1, _first_int(entry, "00280002") or 1), bits)


def _entry_frames(entry: dict) -> int:
    """NumberOfFrames of one instance's DICOM JSON (1 where it does not say, or says 0)."""
    return max(1, _first_int(entry, "00280008") or 1)


def _packed_bytes(samples: int, bits: int) -> int:
    """Bytes of ``samples`` pixel values of ``bits`` bits each, packed as DICOM stores them (``ceil(samples x bits /
    8)``: values of 1 bit share their bytes)."""
    return -(-samples * bits // 8)


def series_size(client, series_uid: str, study_uid: str | None = None) -> SeriesSize | None:
    """``(instances, voxels, listed, pixel_bytes)`` of the series ``series_uid`` (in the study ``study_uid`` when
    given) on the DICOMweb server of ``client``, from a QIDO-RS search of its instances (``Rows x Columns x
    NumberOfFrames`` voxels each): known before any instance is downloaded. None when the server does not tell (an
    instance without Rows or Columns in its answer, or the search was answered with an error: the size is then
    checked from the downloaded files, as for any image). A server that cannot be reached raises (requests'
    ``ConnectionError`` / ``Timeout``): the download would only fail the same way, later.

    A server may list part of a series' instances and say nothing (Orthanc's ``LimitFindInstances``: that many plus
    one, whatever the ``offset``): a series of thousands of slices then looked small, and was downloaded whole before
    the reader refused it. The series' instance count is asked at the series level (:func:`series_instance_count`);
    when it is above the number listed, the voxels (and bytes) are that count times the largest instance listed
    (logged as an estimate)."""
    from requests.exceptions import ConnectionError as RequestsConnectionError, Timeout

    def held() -> int | None:
        try:
            return series_instance_count(client, series_uid, study_uid)
        except (RequestsConnectionError, Timeout):
            raise
        except Exception as error:  # noqa: BLE001 - an HTTP error answered: the listed instances are the size
            log.warning("series %s: the PACS did not give its instance count (%s)", series_uid,
                        one_line_redacted(error))
            return None

    try:
        found = all_pages(lambda offset: client.search_for_instances(
            study_instance_uid=study_uid, search_filters={"SeriesInstanceUID": series_uid}, fields=list(_SIZE_FIELDS),
            offset=offset))
        count = held() if found else None  # (raises only when the PACS is unreachable)
    except (RequestsConnectionError, Timeout):
        raise  # the PACS cannot be reached: the download would try again for nothing
    except Exception as error:  # noqa: BLE001 - an HTTP error answered: the download checks the size instead
        log.warning("series %s: the PACS did not give the series size (%s)", series_uid, one_line_redacted(error))
        return None
    sizes, sizes_bytes = [], []
    for entry in found or []:
        size = _entry_size(entry)
        if size is None:
            return None
        sizes.append(size[0])
        sizes_bytes.append(size[1])
    if not sizes:
        return None
    if count is not None and count > len(sizes):
        voxels = count * max(sizes)
        log.warning("series %s: the PACS lists %d of its %d instances (a limit on search results, e.g. Orthanc's "
                    "LimitFindInstances): its size is estimated as %d x the largest listed, %s voxels", series_uid,
                    len(sizes), count, count, f"{voxels:,}")
        return SeriesSize(count, voxels, len(sizes), count * max(sizes_bytes))
    return SeriesSize(len(sizes), sum(sizes), len(sizes), sum(sizes_bytes))


def series_voxels(datastore, image_id: str) -> SeriesSize | None:
    """:func:`series_size` of the series ``image_id`` on the datastore's PACS (its authenticated DICOMweb client).
    MONAI Label's datastore downloads a series whole (into memory) and converts it before any reader could refuse
    it: infer by id and the review queue ask this first (:func:`known_size`)."""
    return series_size(datastore._client, image_id)  # noqa: SLF001 - the datastore's authenticated DICOMweb client


#: series found over a voxel limit that :func:`known_size` remembers per datastore (the least recently asked go first)
OVERSIZED_REMEMBERED = 4096
#: seconds :func:`known_size` trusts a series' size where its download was stopped when the datastore's listing gives
#: no instance count for it (a count tells a series that changed at once; without one it is checked again after this)
OVERSIZED_UNCOUNTED_S = 3600.0
_memo_lock = threading.Lock()


def known_size(datastore, image_id: str, limit: int) -> SeriesSize | None:
    """The size of the series ``image_id`` when it is not downloaded yet (:func:`series_voxels`, or remembered over
    ``limit``), else None (in the cache already, or a size the PACS does not tell). MONAI Label's DICOMweb datastore
    downloads a series whole, into memory, and converts it on its first use, before any reader could refuse it:
    infer by id and the review queue ask this first, and hand a size under the limit on to the
    download (:func:`download_within`'s ``size``), which asked it again.

    A series found too large is remembered (at most :data:`OVERSIZED_REMEMBERED`) under its UID and the instance
    count the datastore's listing gives it (:func:`listed_series`): the review queue passes every oversized series
    ahead of the next study on each request, and asked the PACS its size (QIDO-RS, instance and series level) every
    time. A series whose count changes is asked again; one the listing gives no count for is asked every time. A
    series whose download was stopped over a limit (:func:`download_within`: it grew since its size was asked, or the
    PACS under-tells it) is remembered the same way, with its size then (``stopped``): it is not downloaded again.
    Such a series is remembered also when the listing gives no count (its download, up to the limit, would otherwise
    be repeated on every queue request): for :data:`OVERSIZED_UNCOUNTED_S`, after which it is downloaded again (it
    may have changed, and no listed count tells)."""
    if is_downloaded(datastore, image_id):
        return None
    key = _oversized_key(datastore, image_id)
    memo = _oversized_memo(datastore)
    with _memo_lock:
        known, since = memo.get(key, (None, 0.0))
        if known is not None and key[1] is None and time.monotonic() - since > OVERSIZED_UNCOUNTED_S:
            del memo[key]  # no count to tell a change: checked again (downloaded up to the limit) now and then
            known = None
        if known is not None:
            memo.move_to_end(key)
    if known is not None and known.voxels > limit:
        return known
    size = series_voxels(datastore, image_id)
    if size is not None and size.voxels > limit:
        _remember_oversized(datastore, [key], size)
    return size


def _oversized_key(datastore, image_id: str) -> tuple[str, int | None]:
    """What :func:`known_size` remembers a series under: its UID and the instance count the datastore's listing gives
    it (None when the listing gives none)."""
    return image_id, listed_series(datastore, image_id).get("instances") or None


def _remember_oversized(datastore, keys: Iterable[tuple[str, int | None]], size: SeriesSize) -> None:
    """Keep ``size`` of a series found over a limit for :func:`known_size`, under each of ``keys``
    (:func:`_oversized_key`). Under a key without a count, only a size where a download was stopped (``stopped``):
    the one that costs a download to learn again."""
    memo = _oversized_memo(datastore)
    now = time.monotonic()
    with _memo_lock:
        for key in dict.fromkeys(keys):
            if key[1] is None and not size.stopped:
                continue
            memo[key] = (size, now)
            memo.move_to_end(key)
        while len(memo) > OVERSIZED_REMEMBERED:
            memo.popitem(last=False)


def _oversized_memo(datastore) -> OrderedDict:
    """The datastore's remembered oversized series (:func:`known_size`): ``(uid, instances or None)`` ->
    ``(`` :class:`SeriesSize`, ``time.monotonic()`` when remembered ``)``."""
    with _memo_lock:
        memo = getattr(datastore, "_adl_oversized", None)
        if memo is None:
            memo = datastore._adl_oversized = OrderedDict()
        return memo


def is_downloaded(datastore, image_id: str) -> bool:
    """Whether the series' DICOM files are in the datastore's cache already."""
    folder = cached_series_folder(datastore, image_id)
    return folder.is_dir() and any(folder.iterdir())


def instance_voxels(dataset) -> int:
    """Voxels of one DICOM instance: ``Rows x Columns x NumberOfFrames`` (0 without Rows or Columns)."""
    return int(dataset.get("Rows", 0) or 0) * int(dataset.get("Columns", 0) or 0) * \
        max(1, int(dataset.get("NumberOfFrames", 1) or 1))


def instance_bytes(dataset) -> int:
    """Bytes of ``dataset``'s pixel data as received (uncompressed, as WADO-RS sends it by default); computed from
    Rows, Columns, NumberOfFrames, SamplesPerPixel and BitsAllocated (16 when absent) without one."""
    for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
        value = dataset.get(keyword, None)
        if value is not None:
            return len(value)
    samples = instance_voxels(dataset) * max(1, int(dataset.get("SamplesPerPixel", 1) or 1))
    return _packed_bytes(samples, int(dataset.get("BitsAllocated", 16) or 16))


#: bytes allowed for the header of each downloaded or written file (beside its pixel data) when the disk space a
#: download needs is estimated
HEADER_BYTES = 64 * 1024


def disk_shortfall(dataset, folder: Path, count: int, voxels: int) -> tuple[int, int] | None:
    """``(needed, free)`` bytes when ``dataset``, the ``count``-th instance of a series being downloaded into
    ``folder`` (``voxels``: those of the instances so far, its own included), does not fit on ``folder``'s file
    system as it is now, else None. Needed: its file (:func:`instance_bytes` and :data:`HEADER_BYTES`) and a copy of
    every instance so far at 16 bits a voxel, with a header each (the batch's derived series, the app's NIfTI
    conversion of the series). The free space is read at each call: other processes write on that disk too. The
    one check of the batch's downloads (:func:`lib.batch.dicomweb.download_series`) and the app's
    (:func:`download_within`)."""
    return _shortfall(folder, instance_bytes(dataset), 1, voxels, count)


def series_disk_shortfall(size: SeriesSize, folder: Path) -> tuple[int, int] | None:
    """``(needed, free)`` bytes when the series of ``size`` (:func:`series_size`, before any instance is downloaded)
    does not fit on ``folder``'s file system as it is now, else None. Needed: its files (``pixel_bytes``, uncompressed
    as WADO-RS sends them, and :data:`HEADER_BYTES` each) and a copy of them at 16 bits a voxel with a header each
    (the batch's derived series, the app's NIfTI conversion), as :func:`disk_shortfall` counts them instance by
    instance. The one check before a download starts, of the batch's (:func:`lib.batch.dicomweb.check_download`)
    and of the app's (:func:`download_within`)."""
    return _shortfall(folder, size.pixel_bytes, size.instances, size.voxels, size.instances)


def _shortfall(folder: Path, pixel_bytes: int, files: int, voxels: int, derived_files: int) -> tuple[int, int] | None:
    """``(needed, free)`` bytes when ``files`` downloaded files of ``pixel_bytes`` pixel data in all, and a derived
    copy of ``voxels`` at 16 bits a voxel in ``derived_files`` files (each file with :data:`HEADER_BYTES` of header),
    do not fit in the free space of ``folder``'s file system now, else None: the one estimate of
    :func:`disk_shortfall` and :func:`series_disk_shortfall`."""
    needed = pixel_bytes + files * HEADER_BYTES + 2 * voxels + derived_files * HEADER_BYTES
    free = shutil.disk_usage(folder).free
    return (needed, free) if needed > free else None


def save_instance(dataset, path: Path) -> None:
    """Write one instance received by WADO-RS to ``path`` as a DICOM file (Explicit VR Little Endian named in its
    file meta when the server sent none)."""
    if not getattr(dataset, "file_meta", None) or "TransferSyntaxUID" not in dataset.file_meta:
        dataset.file_meta = dataset.file_meta if getattr(dataset, "file_meta", None) else pydicom.Dataset()
        dataset.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    dataset.save_as(str(path), write_like_original=False)


class SeriesTooLarge(ValueError):
    """A PACS series whose download was stopped: over the voxel limit (message: how many voxels, nothing kept).
    ``size``: what the PACS had sent by then (:class:`SeriesSize` with ``stopped``), ``limit``: the limit."""

    def __init__(self, message: str, size: SeriesSize, limit: int) -> None:
        super().__init__(message)
        self.size, self.limit = size, limit


class SeriesDoesNotFit(RuntimeError):
    """A PACS series whose download into the datastore's cache was stopped: the next instance would not fit on the
    cache's disk (:func:`disk_shortfall`; message: how many bytes were needed and free, nothing kept). The routes
    answer 507 Insufficient Storage: the server's disk, not the series, is at fault."""


class SeriesNotFetchableByFrame(RuntimeError):
    """A PACS series with multi-frame instances asked of a datastore set to download frame by frame
    (``MONAI_LABEL_DICOMWEB_FETCH_BY_FRAME``): MONAI Label's frame-by-frame download fetches only the first frame of
    each instance, so it cannot download the series whole (message: the series, how many such instances, the
    setting to turn off; nothing fetched). The routes answer 501 Not Implemented: the server's setting, not the
    PACS nor the request, is at fault."""


class SeriesNotDelivered(OSError):
    """A PACS series downloaded frame by frame (:func:`_download_by_frame`) with instances of it missing or cut short
    (message: the series, how many of its image instances, nothing kept). The routes answer 502 Bad Gateway: the
    PACS did not deliver the series."""


#: name prefix of the folder a series is downloaded into, in the datastore's cache, before it takes its own name
PARTIAL_DOWNLOAD_PREFIX = ".partial-"
#: seconds since its last write after which a partial download folder in the cache is left over from a server
#: stopped during the download (:func:`remove_stale_downloads`); a download in progress, of this server or of another
#: one sharing the cache folder, writes its folder at every instance
PARTIAL_DOWNLOAD_STALE_S = 3600.0
#: name suffix of the temp :func:`add_file_meta` writes beside a file of a series' folder (``.<name>.<random>``
#: before it), renamed over the file once written
FILE_META_TEMP_SUFFIX = ".file-meta"
#: seconds since its last write after which such a temp is left over from a server stopped while it wrote it
#: (:func:`remove_stale_downloads`, :func:`download_within`): one being written is written at every block
FILE_META_TEMP_STALE_S = 600.0


def _study_of(client, series_uid: str) -> str:
    """The StudyInstanceUID of the series ``series_uid`` (QIDO-RS; WADO-RS needs it).

    Raises:
        FileNotFoundError: the PACS lists no such series.
    """
    for entry in client.search_for_series(search_filters={"SeriesInstanceUID": series_uid},
                                          fields=["StudyInstanceUID"]) or []:
        if _first_str(entry, "0020000E") == series_uid and _first_str(entry, "0020000D"):
            return str(_first_str(entry, "0020000D"))
    raise FileNotFoundError(f"the PACS lists no series {series_uid}")


def disk_full(error: BaseException) -> bool:
    """Whether ``error`` or one it was raised from is ENOSPC or EDQUOT (a disk quota spent: the same for the writer;
    pydicom raises a new OSError without errno, naming the element whose write failed, from the one of the write): a
    download that found the disk full all the same (another writer took the space after :func:`disk_shortfall`),
    the app's and the batch's, and the dataset ZIP's (:func:`lib.endpoints.guards.guarded_download_dataset`)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def _stopped_size(datastore, image_id: str, count: int, voxels: int) -> SeriesSize:
    """The size of the series ``image_id`` whose download was stopped over a limit at its ``count``-th instance
    (``voxels`` sent by then), remembered for :func:`known_size` (``stopped``). The PACS is asked its size once more
    (:func:`series_voxels`): the series grew since it was listed, and what was sent is only part of it (the review
    queue listed it with those partial counts until its listing was made again, a minute later); when the PACS
    tells more than was sent, that size is kept, also under the instance count the next listing will give (the
    series is then neither asked nor downloaded again when the listing is made again). What was sent otherwise (a
    PACS that under-tells the size, or cannot be asked)."""
    sent = SeriesSize(count, voxels, count, stopped=True)
    keys = [_oversized_key(datastore, image_id)]
    try:
        now = series_voxels(datastore, image_id)
    except Exception as error:  # noqa: BLE001 - the PACS gone meanwhile: what was sent is known
        log.debug("series %s: its size after a stopped download not asked: %s", image_id, one_line(error))
        now = None
    size = now._replace(stopped=True) if now is not None and now.voxels > voxels else sent
    if size is not sent and keys[0][1] is not None:  # a listing that gives counts will give the PACS's
        keys.append((image_id, size.instances))
    _remember_oversized(datastore, keys, size)
    return size


def download_within(datastore, image_id: str, limit: int, size: SeriesSize | None = None,
                    folder: Path | None = None) -> Path:
    """The folder of the series ``image_id`` in a DICOMweb datastore's cache (MONAI Label's layout,
    ``<cache>/<SeriesInstanceUID>/``, one file per instance named by its SOP Instance UID), downloaded first when it
    is not there: WADO-RS, one instance in memory at a time, into a folder of its own beside it
    (:data:`PARTIAL_DOWNLOAD_PREFIX`) that takes the series' name once every instance is written. The voxels
    (:func:`instance_voxels`) are counted as the instances arrive: a series over ``limit`` is stopped at the instance
    that takes it over, and what it wrote removed; its size then is remembered as :func:`known_size`'s are (the next
    request for it is refused without a download while the PACS lists it with the same instance count). A partial
    folder left by a server stopped during the download is removed at the next start-up
    (:func:`remove_stale_downloads`). Before the download starts, the series' size the PACS gives
    (:func:`known_size`, :func:`series_size`: QIDO-RS, no instance retrieved) is checked against ``limit`` (a series
    over it is refused, nothing retrieved: every route that downloads, the label route and the training list
    included, as infer by id and the review queue refuse it) and against the free space of the cache's disk
    (:func:`series_disk_shortfall`, as the batch's :func:`lib.batch.dicomweb.check_download`): a series that does not
    fit is refused there, nothing of it downloaded. Before each instance is written, the free space is checked again
    (:func:`disk_shortfall`, as the batch's download does; the series may have grown since, or its size is not
    told): a series that does not fit is stopped there,
    and what it wrote removed, before the disk is full (every other writer on it would fail too); a write that
    finds the disk full all the same (another writer took the space) is stopped the same way. The size asked
    before a download (:func:`known_size`) and the download are two requests, and a series still being sent to the
    PACS grows in between: MONAI Label's own download holds the whole series in memory, and saves it into the cache
    folder, before any size is checked. A datastore set to fetch frame by frame
    (``MONAI_LABEL_DICOMWEB_FETCH_BY_FRAME``) downloads with MONAI Label's frame-by-frame download, into the same
    partial folder, bounded by :func:`_download_by_frame` (it was left to that download, unbounded, by every route
    but infer and the review queue). ``size``: the series' size the caller asked just before (:func:`known_size`),
    not asked again. ``folder``: where the series goes instead (a ``final`` label's in MONAI Label's label cache:
    :func:`bounded_downloads`), downloaded when it holds nothing. A folder that holds files is served as it is, once
    each of them written without DICOM file meta (downloaded frame by frame by an earlier version) has been given
    one (:func:`add_file_meta`).

    Raises:
        SeriesTooLarge: over ``limit`` voxels (before any retrieval when the PACS gives its size; nothing of it left
            in the cache).
        SeriesDoesNotFit: the series, or an instance of it, would not fit on the cache's disk (nothing of it left in
            the cache).
        SeriesNotDelivered: fetched frame by frame, instances of it are missing or cut short (nothing kept).
        SeriesNotFetchableByFrame: fetched frame by frame, instances of it are multi-frame (nothing fetched).
        FileNotFoundError: the PACS lists no such series, or sent no instance of it.
        requests.exceptions.ConnectionError, Timeout, HTTPError: the PACS cannot be reached or refused a request.
    """
    if folder is None:
        folder = cached_series_folder(datastore, image_id)
    if folder.is_dir() and any(folder.iterdir()):
        _remove_stale_file_meta_temps(folder)  # a server killed while it gave a file its file meta left one
        # one downloaded frame by frame before its files got a file meta (:func:`add_file_meta`) is repaired here:
        # else every infer of it was a 422 "cannot decode the pixel data" until the cache was emptied by hand
        _add_file_meta_in(folder, image_id)
        return folder
    client = datastore._client  # noqa: SLF001 - the datastore's authenticated DICOMweb client
    study = _study_of(client, image_id)
    folder.parent.mkdir(parents=True, exist_ok=True)
    if size is None:  # None when the PACS does not tell: checked instance by instance
        # known_size: the remembered size of a series stopped before (not downloaded again); it answers None for a
        # series in the image cache (here only when the folder is a label's): asked then
        size = series_size(client, image_id, study) if is_downloaded(datastore, image_id) else \
            known_size(datastore, image_id, limit)
    if size is not None and size.voxels > limit:  # the label route, the train list, MONAI Label's own routes
        _remember_oversized(datastore, [_oversized_key(datastore, image_id)], size)
        estimate = f" (estimated: the PACS lists {size.listed} of them)" if size.listed < size.instances else ""
        stopped = " (an earlier download of it was stopped over the limit)" if size.stopped else ""
        raise SeriesTooLarge(f"series {image_id} is too large: its {'at least ' if size.stopped else ''}"
                             f"{size.instances} instances hold {size.voxels:,} voxels{estimate}{stopped}, over the "
                             f"limit of {limit:,}; nothing of it was downloaded", size, limit)
    short = series_disk_shortfall(size, folder.parent) if size is not None else None
    if short is not None:
        estimate = f" (estimated: the PACS lists {size.listed})" if size.listed < size.instances else ""
        raise SeriesDoesNotFit(f"series {image_id} does not fit on the disk of the server's DICOMweb cache "
                               f"{folder.parent}: its {size.instances} instances{estimate} need about {short[0]:,} "
                               f"bytes with their conversion, {short[1]:,} are free; nothing of it was downloaded: "
                               "free some space there (MONAI_LABEL_DICOMWEB_CACHE_PATH)")
    with contextlib.suppress(OSError):  # an earlier download of it that a server stopped left: removed when stale
        _remove_stale_partials(list(os.scandir(folder.parent)), f"{PARTIAL_DOWNLOAD_PREFIX}{image_id}-",
                               PARTIAL_DOWNLOAD_STALE_S)
    partial = Path(tempfile.mkdtemp(prefix=f"{PARTIAL_DOWNLOAD_PREFIX}{image_id}-", dir=folder.parent))
    try:
        count, voxels = 0, 0
        by_frame = bool(getattr(datastore, "_fetch_by_frame", False))  # MONAI Label's download, bounded
        if by_frame:
            count = _download_by_frame(datastore, study, image_id, partial, limit)
        for count, dataset in enumerate(() if by_frame else client.iter_series(study, image_id), start=1):
            voxels += instance_voxels(dataset)
            if voxels > limit:
                size = _stopped_size(datastore, image_id, count, voxels)  # remembered: not downloaded again
                raise SeriesTooLarge(f"series {image_id} is too large: the {count} instances the PACS sent so far "
                                     f"hold {voxels:,} voxels, over the limit of {limit:,} (it grew since its size "
                                     "was asked, or the PACS did not tell it); the download was stopped and nothing "
                                     "of it was kept", size, limit)
            short = disk_shortfall(dataset, partial, count, voxels)
            if short is not None:
                raise SeriesDoesNotFit(f"series {image_id} does not fit on the disk of the server's DICOMweb cache "
                                       f"{folder.parent}: instance {count} needs about {short[0]:,} bytes with the "
                                       f"conversion of those downloaded, {short[1]:,} are free; the download was "
                                       "stopped and nothing of it was kept: free some space there "
                                       "(MONAI_LABEL_DICOMWEB_CACHE_PATH)")
            try:
                save_instance(dataset, partial / f"{dataset.SOPInstanceUID}.dcm")
            except OSError as error:
                if not disk_full(error):
                    raise
                raise SeriesDoesNotFit(f"series {image_id} does not fit on the disk of the server's DICOMweb cache "
                                       f"{folder.parent}: the disk was full at instance {count}; the download was "
                                       "stopped and nothing of it was kept: free some space there "
                                       "(MONAI_LABEL_DICOMWEB_CACHE_PATH)") from None
        if count == 0:
            raise FileNotFoundError(f"the PACS sent no instance of series {image_id}")
        try:
            partial.rename(folder)  # whole or not at all: MONAI Label takes a folder holding files as downloaded
        except OSError:
            if not (folder.is_dir() and any(folder.iterdir())):  # else another request's download took the name
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return folder


#: the media type the frames of a frame-by-frame download are asked in (WADO-RS, PS3.18 8.7.3.5): uncompressed
#: (native little-endian pixel bytes), as MONAI Label stores them: its ``save_from_frame`` puts the bytes as native
#: pixel data into a file it writes as Implicit VR Little Endian, without file meta (given one: :func:`add_file_meta`)
UNCOMPRESSED_FRAMES = (("application/octet-stream", "1.2.840.10008.1.2.1"),)


def _download_by_frame(datastore, study: str, image_id: str, partial: Path, limit: int) -> int:
    """MONAI Label's frame-by-frame download (``MONAI_LABEL_DICOMWEB_FETCH_BY_FRAME``: the series' WADO-RS metadata,
    then the pixel data of each instance it lists) of the series ``image_id`` into ``partial``, bounded: the
    metadata is checked before any frame is fetched, its instances' voxels (:func:`_entry_size`) against ``limit``,
    their bytes against the free space of the disk (:func:`series_disk_shortfall`), and their frames (MONAI Label
    fetches the first frame of each instance: a multi-frame one would be cut); only the image instances it
    lists (Rows and Columns: one without has no frame to fetch) are fetched, each file is given the DICOM file meta
    MONAI Label writes none of (:func:`add_file_meta`: the app's reader decodes no pixel data without its transfer
    syntax), and each must be written whole (:func:`check_by_frame`). Returns how many were written.

    Raises:
        SeriesTooLarge: over ``limit`` (nothing fetched; its size remembered as :func:`known_size`'s are).
        SeriesDoesNotFit: it would not fit on the disk (nothing fetched).
        SeriesNotFetchableByFrame: an image instance listed has more than one frame (MONAI Label's download fetches
            frame 1 of each: nothing fetched).
        SeriesNotDelivered: an image instance listed is missing or cut short (MONAI Label's download drops a failed
            one in silence, and writes no more than the disk takes).
        requests.exceptions.ReadTimeout (or the ConnectionError of a stalled answer, :func:`read_timed_out`): the
            PACS did not answer a frame's request within :func:`pacs_read_timeout_s` (the frames not fetched yet
            are not asked).
    """
    from monailabel.datastore.utils.dicom import dicom_web_download_series

    client = datastore._client  # noqa: SLF001 - the datastore's authenticated DICOMweb client
    listed: list = []

    class Bounded:  # the client, whose metadata answer is checked before MONAI Label fetches a frame of it
        def __getattr__(self, name: str):
            return getattr(client, name)

        def retrieve_series_metadata(self, *args, **kwargs) -> list:
            metadata = client.retrieve_series_metadata(*args, **kwargs)
            sizes = [_entry_size(entry) or (0, 0) for entry in metadata]
            size = SeriesSize(len(sizes), sum(v for v, _ in sizes), len(sizes), sum(b for _, b in sizes))
            if size.voxels > limit:
                _remember_oversized(datastore, [_oversized_key(datastore, image_id)], size)
                raise SeriesTooLarge(f"series {image_id} is too large: its {size.instances} instances hold "
                                     f"{size.voxels:,} voxels, over the limit of {limit:,}; nothing of it was "
                                     "downloaded", size, limit)
            short = series_disk_shortfall(size, partial.parent)
            if short is not None:
                raise SeriesDoesNotFit(f"series {image_id} does not fit on the disk of the server's DICOMweb cache "
                                       f"{partial.parent}: its {size.instances} instances need about {short[0]:,} "
                                       f"bytes with their conversion, {short[1]:,} are free; nothing of it was "
                                       "downloaded: free some space there (MONAI_LABEL_DICOMWEB_CACHE_PATH)")
            frames = [_entry_frames(entry) for entry in metadata if _entry_size(entry) is not None]
            multi = [count for count in frames if count > 1]
            if multi:  # MONAI Label's save_from_frame asks frame_numbers=[1] only
                raise SeriesNotFetchableByFrame(
                    f"series {image_id} has multi-frame instances ({len(multi)} of its {len(frames)} image "
                    f"instances, up to {max(multi)} frames each), which MONAI_LABEL_DICOMWEB_FETCH_BY_FRAME downloads "
                    "only the first frame of; nothing of it was downloaded: turn that setting off on the server")
            listed.extend(metadata)
            return [entry for entry in metadata if _entry_size(entry) is not None]  # no frame to fetch without

        def retrieve_instance_frames(self, *args, media_types=None, **kwargs) -> list[bytes]:
            if silent:  # the PACS left a frame unanswered: the others are not asked (each would wait as long)
                raise silent[0]
            # dicomweb-client asks with type="*/*" by default, which Orthanc's DICOMweb plugin answers 400 (no
            # transfer syntax goes with it); MONAI Label writes the bytes as uncompressed pixel data: ask for those.
            # Its frames are bytearrays, which pydicom takes as a list of values (the file's write then fails)
            try:
                return [bytes(frame) for frame in client.retrieve_instance_frames(
                    *args, media_types=media_types or UNCOMPRESSED_FRAMES, **kwargs)]
            except Exception as error:
                if read_timed_out(error):
                    silent.append(error)
                raise

    silent: list = []  # MONAI Label's download drops a failed frame in silence: a PACS that did not answer is told
    dicom_web_download_series(study, image_id, str(partial), Bounded(), True)
    if silent:
        raise silent[0]  # the routes' 504, not a 502 "not delivered"
    _add_file_meta_in(partial, image_id)
    return check_by_frame(partial, listed, image_id)


def add_file_meta(path: Path) -> bool:
    """Give the DICOM file ``path``, written without preamble and file meta, both (atomically: a new file beside
    it, hidden, renamed over it); returns whether it did. MONAI Label's frame-by-frame download
    (``save_from_frame``) writes each instance so, as Implicit VR Little Endian: a file without a Transfer Syntax
    UID, whose pixel data the app's reader refuses to decode ("unknown transfer syntax"), so that no series
    downloaded so could be denoised. The file meta names the transfer syntax the data set is written in (as pydicom
    finds it from the bytes: Implicit VR Little Endian from MONAI Label) and the data set's SOP Class and Instance
    UIDs; the data set's bytes are kept as they are (one cut short stays so, for :func:`check_by_frame`). A file that
    has its preamble already, or whose header does not parse or lacks those UIDs, is left as it is.

    Raises:
        OSError: it cannot be read or written (a full disk: :func:`disk_full`).
    """
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info

    from .imaging.dicom_read import has_dicom_magic

    if has_dicom_magic(path):
        return False
    try:
        header = pydicom.dcmread(str(path), stop_before_pixels=True, force=True)
    except OSError:
        raise
    except Exception as error:  # noqa: BLE001 - not DICOM, or cut in its header: the check or the reader says so
        log.debug("%s: no file meta given: its header does not parse (%s)", path, one_line(error))
        return False
    if "SOPClassUID" not in header or "SOPInstanceUID" not in header or header.is_little_endian is None:
        return False
    syntax = (pydicom.uid.ImplicitVRLittleEndian if header.is_implicit_VR else
              pydicom.uid.ExplicitVRLittleEndian if header.is_little_endian else pydicom.uid.ExplicitVRBigEndian)
    meta = pydicom.dataset.FileMetaDataset()
    meta.MediaStorageSOPClassUID = header.SOPClassUID
    meta.MediaStorageSOPInstanceUID = header.SOPInstanceUID
    meta.TransferSyntaxUID = syntax
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    encoded = DicomBytesIO()
    encoded.is_little_endian, encoded.is_implicit_VR = True, False  # the file meta's own encoding (PS3.10 7.1)
    write_file_meta_info(encoded, meta, enforce_standard=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=FILE_META_TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as out, open(path, "rb") as data_set:
            out.write(b"\0" * 128 + b"DICM" + encoded.getvalue())
            shutil.copyfileobj(data_set, out)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return True


def _add_file_meta_in(folder: Path, image_id: str) -> int:
    """:func:`add_file_meta` for each DICOM file (``*.dcm``, not hidden) of the series ``image_id``'s ``folder``;
    returns how many it gave one (logged).

    Raises:
        SeriesDoesNotFit: the disk of the folder is full (nothing of a file lost).
        OSError: a file cannot be read or written.
    """
    given = 0
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.suffix != ".dcm" or not path.is_file():
            continue
        try:
            given += add_file_meta(path)
        except FileNotFoundError:  # removed meanwhile (another request's download): nothing to give
            continue
        except OSError as error:
            if not disk_full(error):
                raise
            raise SeriesDoesNotFit(f"series {image_id} does not fit on the disk of the server's DICOMweb cache "
                                   f"{folder.parent}: the disk was full while its files downloaded frame by frame "
                                   "were given their DICOM file meta; free some space there "
                                   "(MONAI_LABEL_DICOMWEB_CACHE_PATH)") from None
    if given:
        log.info("series %s: %d file(s) written without DICOM file meta (MONAI Label's frame-by-frame download) "
                 "given one, in %s", image_id, given, folder)
    return given


def check_by_frame(folder: Path, listed: list[dict], image_id: str) -> int:
    """How many instances of the series ``image_id`` MONAI Label's frame-by-frame download wrote into ``folder``,
    checked against ``listed`` (the series' WADO-RS metadata, DICOM JSON): each image instance's (Rows and Columns:
    :func:`_entry_size`; one without has no frame, and is not fetched) ``<SOPInstanceUID>.dcm`` is there, its header
    parses as DICOM, and its pixel data element holds all the pixel bytes its entry gives (a write cut short by a
    full disk leaves a file that parses, its pixel data short). No pixel is read: the header is read up to the pixel
    data element, whose length is compared with what the file holds after it
    (:func:`lib.imaging.dicom_read.uncompressed_pixel_bytes`); MONAI Label writes the frames as fetched, asked
    uncompressed (:data:`UNCOMPRESSED_FRAMES`), so encapsulated pixel data is not counted as delivered. A file given
    its file meta (:func:`add_file_meta`) is checked as one without.

    Raises:
        SeriesNotDelivered: an instance listed is missing, unreadable or cut short.
    """
    from .imaging.dicom_read import uncompressed_pixel_bytes
    from .imaging.errors import ImageReadError

    written = {path.name for path in folder.iterdir()}
    images = [entry for entry in listed if _entry_size(entry) is not None]
    missing = 0
    for entry in images:
        name = f"{_first_str(entry, '00080018')}.dcm"
        try:
            held = uncompressed_pixel_bytes(folder / name) if name in written else None
        except (ImageReadError, OSError):  # its header does not parse, or it went meanwhile
            held = None
        if held is None or held < _entry_size(entry)[1]:  # None: missing, compressed or without pixel data
            missing += 1
    if missing:
        raise SeriesNotDelivered(f"the PACS did not deliver series {image_id}: {missing} of its {len(images)} image "
                                 "instances are missing or cut short in its frame-by-frame download "
                                 "(MONAI_LABEL_DICOMWEB_FETCH_BY_FRAME); nothing of it was kept")
    return len(images)


def remove_stale_downloads(datastore, max_age_s: float = PARTIAL_DOWNLOAD_STALE_S,
                           file_meta_age_s: float = FILE_META_TEMP_STALE_S) -> list[Path]:
    """Remove the partial download folders (:data:`PARTIAL_DOWNLOAD_PREFIX`, :func:`download_within`) in a DICOMweb
    datastore's cache folder, and in its label cache folder (``labels/final``: a ``final`` label's download,
    :func:`bounded_downloads`), whose newest write (the folder's or any file's in it, modification time) is more than
    ``max_age_s`` seconds old: a server stopped during a download (killed, a power cut) never removes its own, which
    then held part of a series for ever. A younger one may be a download in progress, of another server sharing the
    cache folder: kept. Only folders directly in those two folders whose name has the prefix (not a link, not a file
    of that name); each removal is logged. Also the file meta temps (:func:`add_file_meta`) left in the series
    folders there, untouched for ``file_meta_age_s`` (:func:`_remove_stale_file_meta_temps`), and a DICOM SEG's
    conversion temps in the label cache (``.converting-*.nii.gz``, :func:`lib.pacs_seg.remove_stale_conversions`),
    untouched for as long (a server killed while it converted one), and the SEG conversions an earlier version saved
    under a SEG's UID alone (:func:`lib.pacs_seg.remove_earlier_seg_labels`; the labels in MONAI Label's index are
    kept, unused, a WARNING naming them). Returns those removed. Nothing for another
    datastore. :func:`download_within` does the same for the one series it is asked for, when its folder is used
    again or it is downloaded again."""
    if not is_dicomweb(datastore):
        return []
    layout = datastore._datastore  # noqa: SLF001 - MONAI Label's own cache layout
    removed = []
    for cache in (Path(layout.image_path()), Path(layout.label_path("final"))):
        try:
            entries = sorted(os.scandir(cache), key=lambda entry: entry.name)
        except OSError:  # no such folder yet: nothing left over
            continue
        removed += _remove_stale_partials(entries, PARTIAL_DOWNLOAD_PREFIX, max_age_s)
        for entry in entries:  # a series' folder: the file meta temps a server killed meanwhile left there
            if not entry.name.startswith(".") and entry.is_dir(follow_symlinks=False):
                removed += _remove_stale_file_meta_temps(Path(entry.path), file_meta_age_s)
    from .pacs_seg import remove_earlier_seg_labels, remove_stale_conversions

    removed += remove_stale_conversions(Path(layout.label_path("final")), file_meta_age_s)
    removed += remove_earlier_seg_labels(datastore)  # SEG conversions an earlier version named by a SEG's UID
    return removed


def _remove_stale_partials(entries: Iterable[os.DirEntry], prefix: str, max_age_s: float) -> list[Path]:
    """Remove the folders among ``entries`` whose name starts with ``prefix`` (a partial download's,
    :func:`remove_stale_downloads`) and whose newest write is more than ``max_age_s`` seconds old (logged); returns
    those removed."""
    removed = []
    now = time.time()
    for entry in entries:
        if not entry.name.startswith(prefix) or not entry.is_dir(follow_symlinks=False):
            continue
        try:
            idle_s = now - _newest_write(Path(entry.path))
        except OSError:  # removed meanwhile (another server's start-up)
            continue
        if idle_s <= max_age_s:
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        if os.path.lexists(entry.path):
            log.warning("could not remove the partial download %s (a server stopped during the download left it, "
                        "%.1f h ago)", entry.path, idle_s / 3600)
            continue
        removed.append(Path(entry.path))
        log.info("removed the partial download %s: a server stopped during the download left it (last written "
                 "%.1f h ago)", entry.path, idle_s / 3600)
    return removed


def _remove_stale_file_meta_temps(folder: Path, max_age_s: float = FILE_META_TEMP_STALE_S) -> list[Path]:
    """Remove the temps :func:`add_file_meta` writes beside a file of the series ``folder`` (``.<name>.*.file-meta``)
    not written for more than ``max_age_s`` seconds (:func:`remove_stale_files`): a server killed while it wrote one
    left it there for ever, a partial copy of a DICOM file among the series' files. Returns those removed."""
    return remove_stale_files(folder, lambda name: name.startswith(".") and name.endswith(FILE_META_TEMP_SUFFIX),
                              max_age_s, "the file meta temp")


def remove_stale_files(folder: Path, is_temp: Callable[[str], bool], max_age_s: float, what: str) -> list[Path]:
    """Remove the plain files (not links) of ``folder`` whose name ``is_temp`` and that were not written for more
    than ``max_age_s`` seconds, each logged as ``what`` a server stopped while it wrote it left: a younger one may be
    being written (another request, another server sharing the cache) and is kept. Returns those removed."""
    removed = []
    now = time.time()
    try:
        entries = list(os.scandir(folder))
    except OSError:  # gone meanwhile, or no folder
        return removed
    for entry in entries:
        if not is_temp(entry.name) or not entry.is_file(follow_symlinks=False):
            continue
        try:
            idle_s = now - entry.stat(follow_symlinks=False).st_mtime
            if idle_s <= max_age_s:
                continue
            os.unlink(entry.path)
        except FileNotFoundError:  # removed meanwhile
            continue
        except OSError as error:
            log.warning("could not remove %s %s (a server stopped while it wrote it left it): %s", what, entry.path,
                        error)
            continue
        removed.append(Path(entry.path))
        log.info("removed %s %s: a server stopped while it wrote it left it (last written %.0f s ago)", what,
                 entry.path, idle_s)
    return removed


def _newest_write(folder: Path) -> float:
    """The latest modification time (seconds since the epoch) of ``folder`` and of everything in it, links not
    followed."""
    newest = folder.lstat().st_mtime
    for root, folders, files in os.walk(folder):  # links to folders are not entered
        for name in (*folders, *files):
            try:
                newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
            except FileNotFoundError:
                continue
    return newest


def bounded_downloads(datastore, voxel_limit: Callable[[], int]) -> None:
    """A DICOMweb datastore's ``get_image_uri`` (every route's and MONAI Label's way to a series' files) that
    downloads a series not in the cache with :func:`download_within` (at most ``voxel_limit()`` voxels) before
    MONAI Label's own, which then finds its files and converts them; its ``get_label_uri`` the same for a ``final``
    label (``GET /datastore/label?tag=final`` names any series of the PACS: MONAI Label downloaded it whole, into
    its label cache). A series' conversion to NIfTI is answered by the cache's copy, the temp file MONAI Label wrote
    it to deleted (:func:`_record_conversions`). Nothing for another datastore."""
    if not is_dicomweb(datastore) or getattr(datastore, "adl_bounded_downloads", False):
        return
    _record_conversions()

    def get_image_uri(image_id: str) -> str:
        download_within(datastore, image_id, voxel_limit())
        own = type(datastore).get_image_uri  # the class's as it is now (mixins swapped in)
        with _conversions_removed() as converted:
            uri = own(datastore, image_id)
            if uri in converted:  # the temp file the first read answers: the cache's copy of it instead
                uri = own(datastore, image_id)
            if uri in converted:
                raise RuntimeError(f"series {image_id}: its NIfTI conversion was not kept in the DICOMweb cache")
        return uri

    def get_label_uri(label_id: str, label_tag: str, image_id: str = "") -> str:
        kept = getattr(datastore, "holds_label", None)  # a correction kept on this server: no PACS series to fetch
        if label_tag == "final" and not (kept is not None and kept(label_id, label_tag)):  # others: local files
            label_cache = Path(datastore._datastore.label_path(label_tag))  # noqa: SLF001 - MONAI Label's layout
            if getattr(datastore, "_convert_to_nifti", True):  # a SEG: converted once, into the cache, not TMPDIR
                from .pacs_seg import seg_label_uri

                limit = voxel_limit()
                return seg_label_uri(datastore, label_id, image_id, lambda: download_within(
                    datastore, label_id, limit, folder=label_cache / label_id), limit)
            download_within(datastore, label_id, voxel_limit(), folder=label_cache / label_id)
        return type(datastore).get_label_uri(datastore, label_id, label_tag, image_id)

    datastore.get_image_uri = get_image_uri
    datastore.get_label_uri = get_label_uri
    datastore.adl_bounded_downloads = True


_conversions = threading.local()


def _record_conversions() -> None:
    """MONAI Label's DICOMweb datastore converts a series to NIfTI in a temp file (``dicom_to_nifti``), copies it
    into its cache and never deletes it: each series' first read left a whole patient volume in the server's temp
    folder. Its module's ``dicom_to_nifti`` is wrapped (once) to name the files it makes to
    :func:`_conversions_removed`, in the thread that asked."""
    import monailabel.datastore.dicom as dicomweb_module

    original = dicomweb_module.dicom_to_nifti
    if getattr(original, "adl_recorded", False):
        return

    def dicom_to_nifti(*args, **kwargs):
        path = original(*args, **kwargs)
        made = getattr(_conversions, "made", None)
        if made is not None and path:
            made.append(path)
        return path

    dicom_to_nifti.adl_recorded = True
    dicomweb_module.dicom_to_nifti = dicom_to_nifti


@contextlib.contextmanager
def _conversions_removed() -> Iterator[list]:
    """The temp files MONAI Label's conversions made in this thread inside the block (:func:`_record_conversions`),
    deleted when it ends, however it ends."""
    outer = getattr(_conversions, "made", None)
    made: list = []
    _conversions.made = made
    try:
        yield made
    finally:
        _conversions.made = outer
        for path in made:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as error:
                log.warning("could not remove the converted series %s: %s", path, error)


def final_label_problem(datastore, label_id: str) -> str | None:
    """Why ``label_id`` is no ``final`` label of a DICOMweb datastore (``GET`` / ``HEAD /datastore/label?label=
    &tag=final``), asked of the PACS (QIDO-RS, series level) before anything is retrieved; None when this server keeps
    a correction of the series ``label_id`` that the PACS still lists under the study and patient it was saved for
    (:mod:`lib.pacs_corrections`; :class:`lib.pacs_corrections.CorrectionNotServed`, 409 / 404, when it does not),
    when the PACS holds it as a DICOM SEG series (saved by another tool), or for another datastore (the series
    search, :func:`lib.pacs_corrections.searched_series`, is the one the SEG's read uses within the route's
    :func:`lib.pacs_corrections.one_search_per_series`). MONAI Label
    downloaded any series named so into its label cache, then failed to read it as a SEG: a bare 500, the series left
    there.

    Raises:
        requests.exceptions.ConnectionError, Timeout, HTTPError: the PACS cannot be reached or refused the search.
    """
    if not is_dicomweb(datastore):
        return None
    kept = getattr(datastore, "checked_label", None)  # a correction this server keeps (lib.pacs_corrections)
    if kept is not None and kept(label_id, "final") is not None:  # still its series': the PACS asked (one search)
        return None
    from .pacs_corrections import searched_series

    found = searched_series(datastore, label_id)  # the route's one search of it (one_search_per_series)
    if not found:
        return f"no label {label_id}: the PACS holds no series of that SeriesInstanceUID"
    modalities = sorted({entry["modality"] or "unknown" for entry in found})
    if modalities == ["SEG"]:
        return None
    return (f"series {label_id} is no label: the PACS holds it as a {'/'.join(modalities)} series, not a DICOM SEG, "
            "and this server keeps no correction of it (PUT /datastore/label?image=...&tag=final saves one here); an "
            "image series is downloaded with GET /datastore/image?image=...")


def cached_series_folder(datastore, image_id: str) -> Path:
    """Where MONAI Label's DICOMweb datastore keeps the downloaded files of the series ``image_id`` (whether or not
    they are there)."""
    return Path(datastore._datastore.image_path()) / image_id  # noqa: SLF001 - MONAI Label's own cache layout


def series_folder(datastore, image_id: str, limit: int | None = None, size: SeriesSize | None = None) -> Path:
    """The downloaded DICOM files of a series (downloading them if needed; with ``limit``, at most that many voxels:
    :func:`download_within`, ``size`` the one its caller asked).

    Raises:
        SeriesTooLarge: the download was stopped over ``limit``.
        SeriesDoesNotFit, SeriesNotDelivered: as :func:`download_within`.
    """
    if limit is not None:
        download_within(datastore, image_id, limit, size)
    datastore.get_image_uri(image_id)  # downloads (and converts) on first use
    folder = cached_series_folder(datastore, image_id)
    if not folder.is_dir() or not any(folder.iterdir()):
        raise FileNotFoundError(f"series {image_id} was not downloaded into {folder}")
    return folder


def store_derived_series(datastore, source_folder: Path, denoised_path: str | Path, description: str,
                         derivation: str = "Denoised", before_store: Callable[[str], None] | None = None,
                         max_voxels: int | None = None) -> dict:
    """Write the denoised volume (a result file on the source's grid) as a derived series of the DICOM series in
    ``source_folder`` and STOW it to the datastore's DICOMweb server. Returns ``{"series_instance_uid",
    "instances"}``; raises :class:`PacsStoreError` when the server did not store every instance. ``description``
    ends the series description; ``derivation`` (what made it: :func:`lib.imaging.dicom_write.denoising_derivation`)
    begins its DerivationDescription. ``before_store``: called with the derived series' SeriesInstanceUID once its
    files are written, before the STOW (the app records it there: a store cut short, or a server killed after it,
    leaves a series in the PACS that must be known as a result, not listed as a study); what it raises stops the
    store. ``max_voxels``: the voxel limit of both reads, the one the series was denoised under (None:
    :func:`lib.imaging.max_voxels`); a server's conf above ``ADL_MAX_VOXELS`` had a series it denoised refused here."""
    reference = read_volume(source_folder, max_voxels=max_voxels)
    denoised = read_volume(denoised_path, modality=reference.modality, max_voxels=max_voxels)
    if denoised.array.shape != reference.array.shape:
        raise PacsStoreError(f"result shape {denoised.array.shape} differs from the series {reference.array.shape}")
    work = Path(tempfile.mkdtemp(prefix="derived_series_"))
    try:
        out = write_dicom_derived_series(reference.with_array(denoised.array), work / "series", reference,
                                         series_description_suffix=f" [{description}]", derivation=derivation)
        datasets = [pydicom.dcmread(p) for p in sorted(out.iterdir())]  # FileDatasets, preamble included
        if before_store is not None and datasets:
            before_store(str(datasets[0].SeriesInstanceUID))
        client = datastore._client  # noqa: SLF001 - the datastore's authenticated DICOMweb client
        stored = stow_datasets(client, datasets, "the PACS")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info("stored derived series %s (%d instances) to %s", stored["series_instance_uid"], stored["instances"],
             without_credentials(str(client.base_url)))
    return stored
