"""HTTP routes the app adds to MONAI Label's server: review verdicts, model versions and rollback, and guards
that turn bad requests into 4xx answers before MONAI Label's own handlers (which answer 500) see them.

MONAI Label has no hook for app routes, so :func:`install` adds them to the running FastAPI application
(``monailabel.app.app``) when the app starts inside the server; the guards (:mod:`.guards`) are placed in front of
the stock routes they protect. With MONAI Label's authentication on, :mod:`.access` puts its access control in
front of every route (stock and the app's) and its login in front of MONAI Label's.

Every 4xx / 5xx answer's ``detail`` goes out without the server's file paths (:func:`.common.scrub_paths`: a corrupt
study is named ``corrupt.nii.gz``, not by where the datastore keeps it), the stock routes' answers included.
"""
from __future__ import annotations

import logging
import os

from . import access, guards, review, versions
from .common import scrub_paths

log = logging.getLogger(__name__)

__all__ = ["install"]


def install(fastapi_app) -> None:
    """Add the routes to the server's FastAPI application; guards go in front of the stock routes."""
    from monailabel.config import settings

    prefix = settings.MONAI_LABEL_API_STR
    if getattr(fastapi_app.state, "adl_denoise_routes", False):
        return
    for router in (review.router, versions.router):
        fastapi_app.include_router(router, prefix=prefix)
    routes = fastapi_app.router.routes
    before = len(routes)
    fastapi_app.include_router(guards.router, prefix=prefix)
    if access.install_access_control(fastapi_app):  # auth on: the middleware, and the login in front of the stock one
        fastapi_app.include_router(access.login_router, prefix=prefix)
    # whatever include_router added (routes, or one included-router entry in recent FastAPI) goes first, so the
    # guards see POST /infer/{model}, /train/{model} and PUT /datastore/label before the stock handlers
    added = routes[before:]
    del routes[before:]
    routes[0:0] = added
    _install_path_scrubbing(fastapi_app)
    _install_read_failure_answers(fastapi_app)
    fastapi_app.state.adl_denoise_routes = True
    log.info("installed review, versions and request-guard routes%s (pid %d)",
             ", access control" if access.auth_enabled() else "", os.getpid())


def _install_path_scrubbing(fastapi_app) -> None:
    """The HTTP errors' handler (FastAPI's), each message first without the server's file paths."""
    from fastapi.exception_handlers import http_exception_handler
    from starlette.exceptions import HTTPException as StarletteHTTPException

    async def scrubbed(request, error: StarletteHTTPException):
        if isinstance(error.detail, str):
            error = StarletteHTTPException(error.status_code, scrub_paths(error.detail),
                                           getattr(error, "headers", None))
        return await http_exception_handler(request, error)

    fastapi_app.add_exception_handler(StarletteHTTPException, scrubbed)
    if fastapi_app.middleware_stack is not None:  # built already: the handlers are read when the stack is built
        fastapi_app.middleware_stack = fastapi_app.build_middleware_stack()


#: what a client is told when a route needs the PACS and it does not answer
PACS_UNREACHABLE = ("the PACS (DICOMweb server) holding the studies cannot be reached: try again when it is back "
                    "(the server's log names the error)")


def pacs_silent(seconds: float, storing: bool = False) -> str:
    """What a client is told when a route waited ``seconds`` for the PACS's answer (or its next part) in vain;
    ``storing``: the unanswered request stored something (a STOW), which the PACS may or may not have kept."""
    unknown = ("; whether it stored what was sent is unknown: look for the series on the PACS before sending it "
               "again" if storing else "")
    return (f"the PACS (DICOMweb server) holding the studies did not answer within {seconds:g} s: it accepted the "
            f"request but sent nothing more{unknown}; try again later (the server's log names the request; "
            "ADL_PACS_READ_TIMEOUT_S sets how long the server waits)")


def _install_read_failure_answers(fastapi_app) -> None:
    """503 with a one-line reason when a route's call to the PACS fails to connect (a DICOMweb datastore whose PACS is
    down): MONAI Label's routes answered a bare 500 "Internal Server Error"; 504 when the PACS accepted the request
    but sent no answer, or no next part of one, within :func:`lib.pacs.pacs_read_timeout_s` (the request hung for
    ever: :func:`lib.pacs.bounded_client`); when the PACS answered a request with an error status that no route
    answers itself (``requests.HTTPError``, or ``retrying.RetryError`` after its tries of a 429 / 503 / 504), 502
    naming the PACS and its status (503 / 504 for its own 429 / 503 / 504): a series' retrieval refused, or a search
    failed, during ``POST /train/{model}``, an infer by id or any other route answered a bare 500. Only a
    request to the datastore's PACS (:func:`lib.pacs.is_pacs_url`): a failure to reach any other service is the
    server's error (500) as before, not news about the PACS. A PACS that lists part of its series
    (:class:`lib.pacs.PacsListingCut`) is a 503 too, with the reason; a series whose download was stopped over the
    voxel limit (:class:`lib.pacs.SeriesTooLarge`: it grew since its size was asked) a 413, as one refused before;
    one stopped because it did not fit on the disk of the server's cache (:class:`lib.pacs.SeriesDoesNotFit`) a 507
    Insufficient Storage (the review queue's hand-out, MONAI Label's own download); one fetched frame by frame with
    instances missing (:class:`lib.pacs.SeriesNotDelivered`) a 502 naming the series and how many; one with
    multi-frame instances asked frame by frame (:class:`lib.pacs.SeriesNotFetchableByFrame`: only their first frames
    would come) a 501 naming the setting to turn off. Any read over the voxel limit
    that a route does not answer itself (:class:`lib.imaging.errors.ImageTooLargeError`: the PACS store's reads, a
    fine-tune request's correction of a study over a limit lowered since) is a 413 with the reader's message (what
    is too large, the limit, how to raise it), without the server's paths; it was a bare 500. A kept correction of
    a PACS series that is not that series' any more (:class:`lib.pacs_corrections.CorrectionNotServed`: its series
    changed study or patient, 409; left the PACS, 404; the PACS's search failed, 502, or was not answered in time,
    504) is answered with its status and reason, nothing of it sent. A DICOM SEG of the PACS asked as a ``final``
    label that cannot be one (:class:`lib.pacs_seg.SegNotServed`: no referenced series, several instances,
    unreadable by pydicom_seg) is a 422 saying why, one referencing another patient's or study's series a 409, one
    whose label volume is over the voxel limit a 413 naming the limit, one the PACS kept changing while it was read
    a 503, one whose conversion could not be written a 507 (disk full) or 500 naming why; MONAI Label answered a bare
    500."""
    from fastapi.responses import JSONResponse
    from requests.exceptions import ConnectionError as RequestsConnectionError, HTTPError, Timeout
    from retrying import RetryError

    from ..imaging.errors import ImageTooLargeError
    from ..pacs import (PACS_TRIES, PacsListingCut, SeriesDoesNotFit, SeriesNotDelivered, SeriesNotFetchableByFrame,
                        SeriesTooLarge, error_answer, failed_method, failed_url, is_pacs_url, pacs_read_timeout_s,
                        read_timed_out)
    from ..pacs_corrections import CorrectionNotServed, without_credentials
    from ..pacs_seg import SegNotServed
    from .common import app

    async def unreachable(request, error: Exception):
        target = failed_url(error)
        if not is_pacs_url(target, app().datastore()):
            raise error  # to the server's own handling: a 500, logged with its traceback
        target = without_credentials(target)  # the log names the PACS, never its user name and password
        if read_timed_out(error):  # connected, then nothing (more) came, or the request was not taken
            seconds = pacs_read_timeout_s()
            log.error("%s %s: the PACS did not answer within %g s (%s, %s)", request.method, request.url.path,
                      seconds, type(error).__name__, target)
            storing = failed_method(error) == "POST"  # a STOW of a result
            return JSONResponse(status_code=504, content={"detail": pacs_silent(seconds, storing)})
        log.error("%s %s: the PACS cannot be reached (%s%s)", request.method, request.url.path,
                  type(error).__name__, f", {target}" if target else "")
        return JSONResponse(status_code=503, content={"detail": PACS_UNREACHABLE})

    async def pacs_error(request, error: Exception):  # the PACS answered, with an error status
        target, answer = failed_url(error), error_answer(error)
        if answer is None or not is_pacs_url(target, app().datastore()):
            raise error  # to the server's own handling: a 500, logged with its traceback
        target = without_credentials(target)
        status = int(answer.status_code)
        reason = str(getattr(answer, "reason", "") or "").strip()
        tried = f" (tried {PACS_TRIES} times)" if isinstance(error, RetryError) else ""
        method = getattr(answer.request, "method", "") if answer.request is not None else ""
        log.error("%s %s: the PACS answered %s %s with HTTP %d %s%s", request.method, request.url.path, method,
                  without_credentials(target), status, reason, tried)
        # its being busy or down is said as such (503, 504); any other error status is the PACS's failure (502)
        return JSONResponse(status_code={429: 503, 503: 503, 504: 504}.get(status, 502), content={"detail": (
            f"the PACS (DICOMweb server) holding the studies answered the server's request with an error (HTTP "
            f"{status}{' ' + reason if reason else ''}){tried}: nothing was done with it; try again later, or ask "
            "the PACS's administrator (the server's log names the request)")})

    async def listing_cut(request, error: Exception):  # logged where found (lib.pacs.whole_listing)
        return JSONResponse(status_code=503, content={"detail": f"the PACS's studies cannot be listed: {error}"})

    async def too_large(request, error: Exception):  # nothing of the series kept (lib.pacs.download_within)
        # the downloads' limit is the largest of the served models' (main.DenoisingApp._queue_voxel_limit)
        setting = getattr(app(), "_queue_voxel_limit_setting", lambda: "max_voxels")()
        return JSONResponse(status_code=413, content={"detail": f"{error} (raise the limit with --conf {setting} "
                                                                "on the server)"})

    async def does_not_fit(request, error: Exception):  # nothing of the series kept (lib.pacs.download_within)
        log.error("%s %s: %s", request.method, request.url.path, error)
        return JSONResponse(status_code=507, content={"detail": scrub_paths(str(error))})  # names the cache folder

    async def not_delivered(request, error: Exception):  # nothing of the series kept (lib.pacs.download_within)
        log.error("%s %s: %s", request.method, request.url.path, error)
        return JSONResponse(status_code=502, content={"detail": str(error)})

    async def not_by_frame(request, error: Exception):  # nothing of the series fetched (lib.pacs._download_by_frame)
        log.error("%s %s: %s", request.method, request.url.path, error)
        return JSONResponse(status_code=501, content={"detail": str(error)})

    async def image_too_large(request, error: Exception):  # found from the header: no voxel of it was read
        log.warning("%s %s: %s", request.method, request.url.path, error)
        return JSONResponse(status_code=413, content={"detail": scrub_paths(str(error))})

    async def not_served(request, error: Exception):  # a kept correction not its series' any more: nothing sent
        log.warning("%s %s: %s", request.method, request.url.path, error)
        return JSONResponse(status_code=getattr(error, "status", 409), content={"detail": str(error)})

    async def seg_not_served(request, error: Exception):  # a PACS SEG not served as a label: nothing converted
        status = getattr(error, "status", 422)
        log.log(logging.ERROR if status >= 500 else logging.WARNING, "%s %s: %s", request.method, request.url.path,
                error)
        if status == 413:  # over the voxel limit: which setting raises it, as for a series' download (too_large)
            setting = getattr(app(), "_queue_voxel_limit_setting", lambda: "max_voxels")()
            return JSONResponse(status_code=413, content={
                "detail": f"{error} (raise the limit with --conf {setting} on the server)"})
        return JSONResponse(status_code=status, content={"detail": str(error)})

    for kind in (RequestsConnectionError, Timeout):
        fastapi_app.add_exception_handler(kind, unreachable)
    for kind in (HTTPError, RetryError):
        fastapi_app.add_exception_handler(kind, pacs_error)
    fastapi_app.add_exception_handler(SegNotServed, seg_not_served)
    fastapi_app.add_exception_handler(CorrectionNotServed, not_served)
    fastapi_app.add_exception_handler(PacsListingCut, listing_cut)
    fastapi_app.add_exception_handler(SeriesTooLarge, too_large)
    fastapi_app.add_exception_handler(SeriesDoesNotFit, does_not_fit)
    fastapi_app.add_exception_handler(SeriesNotDelivered, not_delivered)
    fastapi_app.add_exception_handler(SeriesNotFetchableByFrame, not_by_frame)
    fastapi_app.add_exception_handler(ImageTooLargeError, image_too_large)
    if fastapi_app.middleware_stack is not None:
        fastapi_app.middleware_stack = fastapi_app.build_middleware_stack()
