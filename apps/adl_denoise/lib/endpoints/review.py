"""Routes of the radiologist review: verdicts, one study's history, the audit trail and its verification.

The reviewer of a verdict is the authenticated user (:func:`.access.current_user`) whenever authentication is on;
the ``reviewer`` of the body is used only when it is off (the single-user loopback demo). History is read from the
audit log (:mod:`lib.audit`), which the datastore routes cannot rewrite. The verification names the log's ``path`` on
the server to admins only (:func:`.common.for_caller`); so does the trail the address of each client that denoised
or gave a verdict (:data:`TRAIL_INTERNAL`).
"""
from __future__ import annotations

import logging
from typing import Callable, Optional

from fastapi import APIRouter, Body, HTTPException, Request

from .common import app, for_caller

__all__ = ["router", "audit_log", "audit_http_error", "recorded_access"]

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/review", tags=["Review"])

#: what the trail's entries keep for admins only (:func:`.common.for_caller`): the client's network address of a
#: result or verdict (an IP address is personal data, and tells where each colleague works from) and the
#: ``process`` (pid) of one written outside an HTTP request
TRAIL_INTERNAL = ("client", "process")


def audit_log():
    """The running app's audit log (:class:`lib.audit.AuditLog`)."""
    audit = getattr(app(), "audit", None)
    if audit is None:
        raise HTTPException(status_code=503, detail="this server keeps no audit log")
    return audit


def audit_http_error(error: Exception, what: str) -> HTTPException:
    """503 when the log refuses entries (broken chain), 500 when an entry could not be written; ``what`` names
    what was therefore not done (e.g. ``"the verdict was not recorded"``)."""
    from ..audit import AuditBrokenError

    status = 503 if isinstance(error, AuditBrokenError) else 500
    return HTTPException(status_code=status, detail=f"{what}: {error}")


def recorded_access(record: Callable[[], dict], refused: str, about: str) -> dict:
    """The audit entry of an access to patient data, written by ``record`` (appends it, returns the entry) BEFORE
    anything is handed out. Access that cannot be audited is refused, whatever stops the entry (a log that refuses
    entries, a log file or folder the server cannot write): 503 ``<refused>: the audit log could not be written
    (<why>)``, paths cut to their last part as in every error answer, and an ERROR in the server's log naming
    ``about`` (which study, for whom), which the answer does not. Changes that cannot be recorded fail through
    :func:`audit_http_error`; access to data (the review queue's hand-out, downloads of images, labels, sessions and
    the dataset, reads and stores through the PACS proxy: :func:`.guards._recorded_read`; an infer's result)
    through this, never answered without its entry."""
    from ..audit import AuditError

    try:
        return record()
    except AuditError as error:
        logger.error("access refused, its audit entry could not be written: %s: %s", about, error)
        raise HTTPException(status_code=503, detail=(
            f"{refused}: the audit log could not be written ({error}); access to patient data is not given "
            "unrecorded: ask an administrator to check the audit log's folder (GET /review/audit/verify)")) from None


@router.get("/", summary="Audit trail: every study's verdict, review history and the results produced")
def api_audit(request: Request) -> list:
    from ..activelearning import audit_trail
    from ..audit import AuditError

    try:
        return for_caller(request, audit_trail(audit_log(), app().datastore()), internal_keys=TRAIL_INTERNAL)
    except AuditError as error:
        raise audit_http_error(error, "the audit trail cannot be shown") from None


@router.get("/audit/verify", summary="Verify the audit log's hash chain; names the first broken entry")
def api_audit_verify(request: Request) -> dict:
    audit = audit_log()
    verification = audit.verify()
    if not verification.ok and audit.broken is None:
        # broken since start-up (edited, lines removed while the server ran): as at start-up, nothing more is
        # chained onto it until an administrator has examined it
        logger.error("AUDIT TRAIL BROKEN (found by GET /review/audit/verify): %s. Nothing that needs a record is "
                     "done until an administrator has examined the log and moved it aside.", verification.summary())
        audit.refuse_appends(verification)
    report = verification.to_dict()
    report["refusing_entries"] = audit.broken is not None
    report["at_start_up"] = getattr(app(), "audit_at_start", None)
    return for_caller(request, report, internal_keys=("path",))


@router.get("/audit/entries", summary="Entries of the audit log, oldest first (filter by event or image)")
def api_audit_entries(since: int = 0, limit: int = 1000, event: Optional[str] = None,
                      image: Optional[str] = None) -> dict:
    if limit < 1 or limit > 10000:
        raise HTTPException(status_code=422, detail=f"limit must be 1 to 10000, got {limit}")

    def about_image(entry: dict) -> bool:
        fields = entry.get("fields") or {}
        return image is None or fields.get("image") == image or (fields.get("input") or {}).get("image") == image

    from ..audit import AuditError

    try:
        entries = audit_log().entries(event=event, where=about_image, since=max(0, since), limit=limit)
    except AuditError as error:
        raise audit_http_error(error, "the audit entries cannot be shown") from None
    return {"entries": entries, "next_since": (entries[-1]["seq"] + 1) if entries else max(0, since)}


@router.get("/{image_id}", summary="One study's verdict, review history and results")
def api_audit_one(image_id: str, request: Request) -> dict:
    from ..activelearning import audit_trail, has_image

    datastore = app().datastore()
    if not has_image(datastore, image_id):
        raise HTTPException(status_code=404, detail=f"no image {image_id!r} in the datastore")
    from ..audit import AuditError

    try:
        return for_caller(request, audit_trail(audit_log(), datastore, image_id)[0], internal_keys=TRAIL_INTERNAL)
    except AuditError as error:
        raise audit_http_error(error, f"the audit trail of {image_id!r} cannot be shown") from None


@router.post("/{image_id}", summary="Record a verdict: accepted, corrected, rejected (with a reason) or unreviewed")
def api_review(image_id: str, request: Request, body: dict = Body(...)) -> dict:
    from ..activelearning import NothingToJudge, NotThisStudysResult, record_verdict
    from ..audit import AuditError
    from ..pacs_corrections import CorrectionNotServed, confirmed_identity
    from .access import current_user

    if not isinstance(body, dict):
        raise HTTPException(status_code=422, detail="the body must be a JSON object")
    user = current_user(request)  # the token's user with auth on (401 without one); None with auth off
    reviewer, source = (user, "token") if user is not None else (body.get("reviewer"), "request body")
    if user is None and reviewer is not None and not isinstance(reviewer, str):
        raise HTTPException(status_code=422, detail="reviewer must be a name (text)")
    served = getattr(app(), "models", None)  # the app's model names: a verdict naming another model is refused
    try:
        confirmed = confirmed_identity(dict(body), "the verdict's")  # the patient and study the reviewer opened
        return record_verdict(audit_log(), app().datastore(), image_id, body.get("verdict"), reviewer,
                              body.get("reason"), body.get("model"), reviewer_from=source,
                              result_seq=body.get("result_seq"), models=None if served is None else sorted(served),
                              confirmed=confirmed)
    except KeyError as error:
        raise HTTPException(status_code=404, detail=str(error).strip("'\"")) from None
    except (NotThisStudysResult, NothingToJudge) as error:
        raise HTTPException(status_code=409, detail=str(error)) from None
    except CorrectionNotServed:  # a PACS series' correction not its series' any more: the app's answer (409 / 404)
        raise
    except ValueError as error:
        raise HTTPException(status_code=422, detail=str(error)) from None
    except AuditError as error:
        raise audit_http_error(error, "the verdict was not recorded") from None
