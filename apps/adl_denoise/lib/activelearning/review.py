"""Radiologist review of denoised studies: verdicts with reviewer and time, the review queue, and the trail of
results and verdicts read back from the audit log (:mod:`lib.audit`).

The full history lives in the append-only audit log, never in the datastore: every result (``result`` entries,
written by the app's infer) and every verdict (``verdict`` entries) is one line there. The datastore's per-image
info keeps only the CURRENT verdict (``review``: a few hundred bytes), which the review queue
(:class:`NextUnreviewed`) reads; MONAI Label rewrites its whole ``datastore_v2.json`` on every info update, so
nothing that grows with the history is kept in it. A verdict names the result it judges (model, weights version
and SHA-256, audit entry of the latest result of the image), so the trail says which weights produced what a
radiologist accepted or rejected.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter, OrderedDict
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Callable, Collection, Optional

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.strategy import Strategy

from ..audit import AuditError, AuditLog
from ..audit.context import request_actor

__all__ = ["VERDICTS", "MAX_REASON_CHARS", "HANDOUT_EVENT", "NextUnreviewed", "NotThisStudysResult", "NothingToJudge",
           "QUEUE_LEFT", "ambiguous_images", "has_image",
           "record_handout", "record_result",
           "reconcile_reviews", "record_verdict", "refuse_unreviewable", "removals", "review_of", "audit_trail",
           "results_of", "stored_results", "study_modality", "unreviewable_reason", "UNREADABLE_REMEMBERED",
           "NOT_DOWNLOADED_RETRY_S"]

VERDICTS = ("unreviewed", "accepted", "corrected", "rejected")
MAX_REASON_CHARS = 2000  # a reason is a sentence or two; the log keeps every one of them for ever
MAX_REVIEWER_CHARS = 200

log = logging.getLogger(__name__)

#: What the review queue has left when it hands out no study (``remaining_unreviewed``, ``too_large_to_review``,
#: ``not_downloaded``),
#: set by :class:`NextUnreviewed` for its request: MONAI Label answers ``{}`` whenever a strategy picks no id, so the
#: route (:func:`lib.endpoints.guards.guarded_sample`) answers this instead, and series skipped as too large are not
#: lost from sight when nothing else is left.
QUEUE_LEFT: ContextVar[Optional[dict]] = ContextVar("QUEUE_LEFT", default=None)


def has_image(datastore: Datastore, image_id: str) -> bool:
    """Whether ``image_id`` names an image of the datastore. On a PACS an id missing from the series list made
    earlier has the PACS asked again (at most every :data:`lib.pacs.LISTING_RETRY_S`): a series may have reached
    it since."""
    if image_id in datastore.list_images():
        return True
    from .. import pacs

    return pacs.refresh_listing(datastore, pacs.LISTING_RETRY_S, missing_id=True) and \
        image_id in datastore.list_images()


def ambiguous_images(datastore: Datastore) -> set[str]:
    """Ids the datastore lists more than once: on a PACS, one SeriesInstanceUID in several studies (a copy, a
    UID reused by a faulty modality or anonymiser). Which series such an id fetches is the PACS's choice, so it is
    neither handed out for review nor denoised."""
    return {image_id for image_id, count in Counter(datastore.list_images()).items() if count > 1}


_STORED_TO_PACS = ("result_stored_to_pacs", "result_storing_to_pacs")  # the entries :func:`stored_results` reads


def stored_results(audit: AuditLog, entries: Optional[list[dict]] = None, strict: bool = False) -> set[str]:
    """SeriesInstanceUIDs of the derived (denoised) series this app stored into the PACS (``result_stored_to_pacs``
    entries) or began to store (``result_storing_to_pacs``, written before the STOW: a store cut short by a failure
    or by a server killed before its confirmation leaves instances in the PACS): listed by a DICOMweb datastore
    like any series, but results, not studies to review or denoise. ``entries``: the log's entries already read.
    An unreadable log is no result, or with ``strict`` raises (``AuditError`` / ``OSError``): a caller that would
    take a result for a study (training on its correction) must not."""
    uids = set()
    try:
        entries = _selected(audit, entries, lambda e: e.get("event") in _STORED_TO_PACS)
    except (AuditError, OSError):  # an unreadable log: whatever needs a record fails on its own, saying why
        if strict:
            raise
        return uids
    for entry in entries:
        fields = entry.get("fields") or {}
        stored = fields.get("stored_series") or {}
        if isinstance(stored, dict) and stored.get("series_instance_uid"):
            uids.add(str(stored["series_instance_uid"]))
        if fields.get("series_instance_uid"):
            uids.add(str(fields["series_instance_uid"]))
    return uids


def refuse_unreviewable(audit: AuditLog, datastore: Datastore, image_id: str) -> None:
    """ValueError naming why ``image_id`` is no study to review or denoise: a result this app stored, or an id
    that names several series (:func:`ambiguous_images`). Both exist on a PACS only (a local datastore's ids are
    its files' names): elsewhere nothing is read, so an infer does not scan the audit log."""
    from ..pacs import is_dicomweb

    if not is_dicomweb(datastore):
        return
    problem = unreviewable_reason(image_id, stored_results(audit), ambiguous_images(datastore))
    if problem:
        raise ValueError(problem)


def unreviewable_reason(image_id: str, stored: set[str], ambiguous: set[str]) -> Optional[str]:
    """Why ``image_id`` is no study (:func:`refuse_unreviewable`), given the results this app stored in the PACS
    (:func:`stored_results`) and the ids naming several series (:func:`ambiguous_images`); None when it is one."""
    if image_id in stored:
        return (f"{image_id} is a denoised series this server stored in the PACS, not a study: review or denoise its "
                "source series")
    if image_id in ambiguous:
        return (f"{image_id} names several series (one SeriesInstanceUID in more than one study of the PACS): which "
                "one it fetches is the PACS's choice; fix the duplicate UID first")
    return None


def record_result(audit: AuditLog, fields: dict) -> dict:
    """Append a ``result`` entry (the app's infer builds ``fields``: input identity, model, weights, params,
    user); returns the entry. Raises :class:`lib.audit.AuditError` when it cannot be written."""
    return audit.append("result", fields)


#: the entry of a study handed out by the review queue (:func:`record_handout`)
HANDOUT_EVENT = "review_queue_handout"


def record_handout(audit: AuditLog, image_id: str, strategy: str, request: dict, answer: dict) -> dict:
    """Append the ``review_queue_handout`` entry of the study ``image_id`` handed out by ``strategy`` (an access
    record: who was given which study to review): the ``modality`` and ``client_id`` the client asked with (None when
    not given), the queue's ``remaining_unreviewed`` (``answer``) and who asked (:func:`request_actor`). One entry per
    hand-out; nothing the queue reads (which study it hands out next depends on the verdicts alone). Returns the
    entry; raises :class:`lib.audit.AuditError` when it cannot be written."""
    request = request if isinstance(request, dict) else {}
    return audit.append(HANDOUT_EVENT, {
        "image": image_id, "strategy": strategy, "modality": request.get("modality") or None,
        "client_id": request.get("client_id"), "remaining_unreviewed": answer.get("remaining_unreviewed"),
        **request_actor()})


def _image_of(entry: dict) -> Optional[str]:
    fields = entry.get("fields") or {}
    if entry.get("event") == "result":
        return (fields.get("input") or {}).get("image")
    return fields.get("image")


def _flat(entry: dict) -> dict:
    """An entry as the trail shows it: its fields plus ``seq``, ``time_utc`` and ``hash``."""
    return {**(entry.get("fields") or {}), "seq": entry.get("seq"), "time_utc": entry.get("time_utc"),
            "hash": entry.get("hash")}


_STUDY_CHANGES = ("image_removed", "image_removed_failed", "image_added")  # the entries :func:`removals` reads


def _selected(audit: AuditLog, entries: Optional[list[dict]], where) -> list[dict]:
    """``audit.entries(where=where)``, or the same selection from ``entries`` already read from the log (a verdict
    reads the log once: :func:`_verdict_entries`)."""
    return audit.entries(where=where) if entries is None else [e for e in entries if where(e)]


def _verdict_entries(audit: AuditLog, image_id: str, result_seq: Optional[int]) -> list[dict]:
    """What a verdict on ``image_id`` reads of the log, in one read: the image's removals, results and verdicts,
    and the entry ``result_seq`` (a result of an upload names no image). The log was read four times per verdict,
    each read parsing every entry (0.1 s per 5000 entries)."""
    events = (*_STUDY_CHANGES, "result", "verdict")
    return audit.entries(where=lambda e: (e.get("event") in events and _image_of(e) == image_id)
                         or (result_seq is not None and e.get("seq") == result_seq))


def removals(audit: AuditLog, image_ids: set[str], entries: Optional[list[dict]] = None) -> dict[str, int]:
    """Per image id, the ``seq`` from which the study stored under it now has its entries (absent: since the
    start): its last completed removal from the datastore, or its last completed upload (``image_added``), which
    only a free id takes. The entries of an id up to then belong to a study that is gone: an id freed by
    ``DELETE /datastore/image`` can be given to another patient's upload, which must not inherit the old study's
    results or verdicts. ``image_removed`` is written once the files are gone (after an ``image_removing`` entry,
    whose ``seq`` it names as ``pending_seq``): a server killed half way leaves a pending entry, not a removal
    that hides a study still stored; a removal cut short after the files went is settled by the id's next
    upload. Logs written before that (``image_removed`` first, ``image_removed_failed`` after it when the removal
    failed) are read as they were meant. ``entries``: the log's entries already read (:func:`_selected`)."""
    last: dict[str, int] = {}
    before: dict[str, int | None] = {}
    for entry in _selected(audit, entries, lambda e: e.get("event") in _STUDY_CHANGES
                           and _image_of(e) in image_ids):
        image, fields = _image_of(entry), entry.get("fields") or {}
        if entry["event"] == "image_added":
            if "pending_seq" in fields:  # confirmed once stored (older logs: written before, maybe not stored)
                last[image] = int(entry["seq"])
        elif entry["event"] == "image_removed":
            before[image] = last.get(image)
            last[image] = int(entry["seq"])
        elif "pending_seq" in fields:  # a failure after its pending entry: nothing was recorded as removed
            continue
        elif before.get(image) is None:  # an older log's removal that then failed: the study stayed
            last.pop(image, None)
        else:
            last[image] = before[image]
    return last


def results_of(audit: AuditLog, image_id: str, model: Optional[str] = None,
               entries: Optional[list[dict]] = None) -> list[dict]:
    """The ``result`` entries of the study now stored as ``image_id`` (after the id's last removal; optionally of
    one model), oldest first, flattened. ``entries``: the log's entries already read (:func:`_selected`)."""
    since = removals(audit, {image_id}, entries).get(image_id, -1)
    return [_flat(e) for e in _selected(audit, entries, lambda e: e.get("event") == "result"
                                        and _image_of(e) == image_id and int(e.get("seq", -1)) > since
                                        and (model is None or (e.get("fields") or {}).get("model") == model))]


class NotThisStudysResult(ValueError):
    """A verdict names a result (``result_seq``) that is not a result of the study stored under its id now."""


class NothingToJudge(ValueError):
    """A verdict judges a result the study stored under its id does not have: none of the model it names, or none
    at all (``accepted`` / ``rejected``, and ``corrected`` without a saved correction)."""


def _has_correction(datastore: Datastore, image_id: str) -> bool:
    """Whether ``image_id``'s ``final`` label is a clinician's correction of the image stored under it now
    (:func:`lib.trainers.finetune.is_clinician_correction`). A kept correction of a PACS series that is not sent
    (:class:`lib.pacs_corrections.CorrectionNotServed`: its series changed, 409) and a PACS that cannot be reached
    (``requests``' errors, 503) are raised: they said "no saved correction"."""
    from requests.exceptions import RequestException

    from ..pacs_corrections import CorrectionNotServed
    from ..trainers.finetune import is_clinician_correction

    try:
        info = datastore.get_label_info(image_id, "final")
        if not isinstance(info, dict) or info.get("correction") is not True:
            return False  # before any path: a PACS study's image is fetched to be found
        return is_clinician_correction(info, datastore.get_label_uri(image_id, "final"),
                                       datastore.get_image_uri(image_id))
    except (CorrectionNotServed, RequestException):
        raise
    except (OSError, KeyError, ValueError):  # a label or image the datastore cannot resolve: no correction
        return False


def _upload_result_of_the_stored_volume(audit: AuditLog, datastore: Datastore, image_id: str,
                                        result_seq: int, entries: Optional[list[dict]] = None) -> Optional[dict]:
    """The ``result`` entry ``result_seq`` (flattened) when it was made from an uploaded file or a session (no
    datastore id) whose voxels and geometry (``content_sha256``) are those of the image stored under ``image_id``
    now, else None. The Slicer module denoises a volume the server does not hold by uploading it, and stores the
    study itself only with the verdict: that result is what the reviewer saw, of these very voxels."""
    from ..audit.identity import volume_content_sha256
    from ..audit.recording import voxel_limit_of
    from ..pacs import is_dicomweb

    if is_dicomweb(datastore):  # a PACS series is known by its UID (and reading it here would download it)
        return None
    found = _selected(audit, entries, lambda e: e.get("event") == "result" and e.get("seq") == result_seq)
    if not found:
        return None
    entry = _flat(found[0])
    source = entry.get("input") or {}
    if source.get("image") is not None or not source.get("content_sha256"):
        return None  # a result of a datastore id is judged on that study only (results_of)
    try:
        uri = datastore.get_image_uri(image_id)
        current = volume_content_sha256(uri, voxel_limit_of(datastore)) if uri and os.path.isfile(uri) else None
    except Exception:  # noqa: BLE001 - unreadable (or over the voxel limit) now: not shown to be these voxels
        current = None
    return entry if current is not None and current == source["content_sha256"] else None


def _current_verdict(audit: AuditLog, image_id: str, entries: Optional[list[dict]] = None) -> Optional[dict]:
    """The latest ``verdict`` entry (flattened) of the study stored under ``image_id`` now, or None."""
    since = removals(audit, {image_id}, entries).get(image_id, -1)
    found = _selected(audit, entries, lambda e: e.get("event") == "verdict" and _image_of(e) == image_id
                      and int(e.get("seq", -1)) > since)
    return _flat(found[-1]) if found else None


def _of_the_stored_volume(results: list[dict], datastore: Datastore, image_id: str,
                          judging: bool = True) -> list[dict]:
    """``results`` (of ``image_id``) less those made from other voxels than the image file stored under the id now:
    a file replaced on disk under the same name (an export job, a restore) is another volume, whose verdict must
    not judge the earlier volume's result. Results without a voxel hash (DICOM series, by their UID) and an image
    that cannot be read now are kept; :class:`NothingToJudge` when ``judging`` (a verdict other than a reset to
    ``unreviewed``) an image over the server's voxel limit now (not hashed: a larger volume put in its place would
    have been judged by the earlier one's result); without ``judging``, none of the hashed results then."""
    from ..audit.identity import volume_content_sha256
    from ..audit.recording import voxel_limit_of

    hashed = [r for r in results if ((r.get("input") or {}).get("content_sha256"))]
    if not hashed:
        return results
    from ..imaging.errors import ImageTooLargeError

    try:
        uri = datastore.get_image_uri(image_id)
        current = volume_content_sha256(uri, voxel_limit_of(datastore)) if uri and os.path.isfile(uri) else None
    except ImageTooLargeError as error:  # not hashed: whether a result was made of these voxels cannot be told
        # (the file may have been replaced by another, larger volume): no verdict, rather than one on another's result
        if not judging:
            return [r for r in results if not (r.get("input") or {}).get("content_sha256")]
        raise NothingToJudge(f"the study stored as {image_id!r} is over the server's voxel limit now ({error}): "
                             "whether its recorded results were made of these voxels cannot be checked; nothing was "
                             "recorded") \
            from None
    except Exception:  # noqa: BLE001 - unreadable now: judged as before, infer says why
        current = None
    if current is None:
        return results
    return [r for r in results if (r.get("input") or {}).get("content_sha256") in (None, current)]


def record_verdict(audit: AuditLog, datastore: Datastore, image_id: str, verdict: Any, reviewer: Any,
                   reason: Any = None, model: Any = None, reviewer_from: str = "request body",
                   result_seq: Any = None, models: Optional[Collection[str]] = None,
                   confirmed: Optional[dict] = None) -> dict:
    """Record a verdict: first its audit entry, then the current verdict in the image's info (for the queue).
    ``rejected`` needs a reason (at most :data:`MAX_REASON_CHARS` characters); ``result_seq`` (the ``audit_seq``
    infer answered) names the result judged, which must be a result of the study stored under ``image_id`` now
    (:class:`NotThisStudysResult` otherwise: the study was removed and re-added since, or the number is another
    study's); without it ``model`` picks which model's latest result is judged (default: the latest result of any
    model), which may be newer than the one the reviewer saw. ``result_seq`` may also name a result of an
    uploaded file (or session) of the same voxels and geometry as the image stored under ``image_id`` now (a volume
    denoised before it was stored). A verdict naming ``model`` judges that model's result: refused when
    ``models`` (the server's model names) does not know the model and the study has no result of it (ValueError),
    or when the study has no result of it (:class:`NothingToJudge`; ``unreviewed`` judges nothing and is
    recorded). A verdict naming neither judges the latest result of the study; a study without one gets only
    ``unreviewed`` (a reset) or ``corrected`` when its ``final`` label is a clinician's correction of the image
    stored now (imported without a recorded result), both with ``result`` null (:class:`NothingToJudge`
    otherwise: denoise it first).
    ``reviewer_from`` says where the reviewer's name comes from (``token`` with authentication on). Returns the
    verdict (``verdict``, ``reviewer``, ``reason``, ``time_utc``, ``result``, ``seq``, ``replaces``: the study's
    verdict it replaces as current one, or None; both stay in the history). ValueError / KeyError on bad input,
    :class:`lib.audit.AuditError` when the entry cannot be written (then nothing is changed). On a PACS the verdict
    is recorded with the series' identity as the PACS lists it now (``series_identity``,
    :func:`lib.pacs_corrections.verdict_binding`: one QIDO-RS search for the whole verdict, its correction's check
    included): :class:`lib.pacs_corrections.CorrectionNotServed` (409, 404, 502, 504) when what was reviewed is not
    that series now, and what the client raises when the PACS cannot be reached (503); nothing recorded then.
    ``confirmed``: the patient and study the reviewer opened (``patient_id``, ``study_instance_uid``), checked
    against the PACS's (:func:`lib.pacs_corrections.verdict_binding`)."""
    from ..pacs_corrections import one_search_per_series

    with one_search_per_series():
        return _record_verdict(audit, datastore, image_id, verdict, reviewer, reason, model, reviewer_from,
                               result_seq, models, confirmed)


def _record_verdict(audit: AuditLog, datastore: Datastore, image_id: str, verdict: Any, reviewer: Any,
                    reason: Any, model: Any, reviewer_from: str, result_seq: Any,
                    models: Optional[Collection[str]], confirmed: Optional[dict] = None) -> dict:
    from ..pacs_corrections import series_refresh_locked, verdict_binding

    verdict = str(verdict or "").strip().lower()
    if verdict not in VERDICTS:
        raise ValueError(f"verdict must be one of {', '.join(VERDICTS)}, got {verdict[:40]!r}")
    reviewer = str(reviewer or "").strip()
    if not reviewer:
        raise ValueError("a verdict needs the reviewer's name")
    if len(reviewer) > MAX_REVIEWER_CHARS:
        raise ValueError(f"the reviewer's name is {len(reviewer)} characters long (at most {MAX_REVIEWER_CHARS})")
    if reason is not None and not isinstance(reason, str):
        raise ValueError(f"reason must be text, got {type(reason).__name__}")
    reason = reason.strip() if reason else None
    if reason and len(reason) > MAX_REASON_CHARS:
        raise ValueError(f"reason is {len(reason)} characters long (at most {MAX_REASON_CHARS})")
    if verdict == "rejected" and not reason:
        raise ValueError("a rejection needs a reason")
    if model is not None and not isinstance(model, str):
        raise ValueError(f"model must be a model name, got {type(model).__name__}")
    if result_seq is not None and (isinstance(result_seq, bool) or not isinstance(result_seq, int)):
        raise ValueError(f"result_seq must be the audit_seq of the result judged (a whole number), got "
                         f"{str(result_seq)[:40]!r}")
    if not has_image(datastore, image_id):
        raise KeyError(f"no image {image_id!r} in the datastore")
    refuse_unreviewable(audit, datastore, image_id)
    read = _verdict_entries(audit, image_id, result_seq)  # the log, read once
    results = _of_the_stored_volume(results_of(audit, image_id, model, read), datastore, image_id,
                                    judging=verdict != "unreviewed")
    if result_seq is not None:
        results = [r for r in results if r.get("seq") == result_seq]
        if not results:
            uploaded = _upload_result_of_the_stored_volume(audit, datastore, image_id, result_seq, read)
            if uploaded is not None and (model is None or uploaded.get("model") == model):
                results = [uploaded]
        if not results:
            raise NotThisStudysResult(
                f"result {result_seq} is not a result of the study stored as {image_id!r} now"
                + (f" by model {model!r}" if model else "")
                + ": the study was removed and stored again (or its file replaced) since it was denoised, or the "
                "number names another study's result (or an upload of other voxels); denoise the study again and "
                "judge that result")
    if not results and model is not None:
        if models is not None and model not in models:
            raise ValueError(f"unknown model {model[:60]!r}: this server's models are {', '.join(sorted(models))}")
        if verdict != "unreviewed":
            raise NothingToJudge(f"the study stored as {image_id!r} has no result of model {model!r} to judge: "
                                 f"denoise it with {model} (by its id) first, then give the verdict")
    if not results and model is None and verdict != "unreviewed" \
            and not (verdict == "corrected" and _has_correction(datastore, image_id)):
        # a verdict judges a result: one with none would sit in the trail as if a result had been reviewed (and
        # take the study off the queue); a correction saved without a recorded result (imported) is its own record
        raise NothingToJudge(
            f"the study stored as {image_id!r} has no denoising result to judge"
            + (" and no saved correction" if verdict == "corrected" else "")
            + ": denoise it first, then give the verdict"
            + (" (or save its correction as the 'final' label first)" if verdict == "corrected" else ""))
    last = results[-1] if results else None
    # a PACS series: bound to the study and patient the PACS lists it under now, as a correction is (409 when what
    # was reviewed is another's, 503 when the PACS cannot be reached: nothing recorded); {} elsewhere
    # a result the client did not name (the latest) may have been made after the PACS moved the series: on a moved
    # series such a verdict confirms the patient judged, as one judging no result does.
    # The refresh's lock (across processes) is held from the binding's checks through the entry, as a correction's
    # save holds it: a refresh recording the move and removing the download between them let a verdict on the old
    # patient's volume (no result named, nothing confirmed) be recorded with the new patient's identity. The
    # binding downloads nothing: the series' reads wait for the lock no longer than a PACS search and the entry
    with series_refresh_locked(datastore, image_id):
        binding = verdict_binding(datastore, image_id, None if last is None else (last.get("input") or {}),
                                  confirmed, result_named=result_seq is not None)
        entry = _append_verdict(audit, image_id, verdict, reviewer, reviewer_from, reason, last, binding, read)
    current = entry["current"]
    setter = getattr(datastore, "set_review", None)
    if setter is not None:  # the info keeps the current verdict only (no history, so not whom it replaced)
        setter(image_id, current)
    else:  # a datastore without the audit wrapper (library use)
        datastore.update_image_info(image_id, {"review": current})
    return {**current, "replaces": entry["replaces"]}


def _append_verdict(audit: AuditLog, image_id: str, verdict: str, reviewer: str, reviewer_from: str,
                    reason: Optional[str], last: Optional[dict], binding: dict, read: list) -> dict:
    """The ``verdict`` entry written (``current``: the verdict as the info keeps it; ``replaces``: the study's
    verdict it replaces as current one, or None); ``last``: the result judged, ``binding``: the PACS identity."""
    judged = None
    if last is not None:
        judged = {"model": last.get("model"), "modality": last.get("modality"),
                  "weights_version": last.get("weights_version"), "weights_sha256": last.get("weights_sha256"),
                  "result_seq": last.get("seq"), "time_utc": last.get("time_utc"),
                  "source": (last.get("input") or {}).get("source")}
    earlier = _current_verdict(audit, image_id, read)
    replaces = None
    if earlier is not None:  # said in the answer and the entry: a reviewer sees whose verdict they replaced
        replaces = {"verdict": earlier.get("verdict"), "reviewer": earlier.get("reviewer"),
                    "reason": earlier.get("reason"), "time_utc": earlier.get("time_utc"), "seq": earlier.get("seq"),
                    "result_seq": (earlier.get("result") or {}).get("result_seq")}
    fields = {"image": image_id, "verdict": verdict, "reviewer": reviewer, "reviewer_from": reviewer_from,
              "reason": reason, "result": judged, **binding}
    entry = audit.append("verdict", {**fields, "replaces": replaces, **request_actor()})
    return {"current": {**fields, "time_utc": entry["time_utc"], "seq": entry["seq"]}, "replaces": replaces}


def _latest_verdicts(audit: AuditLog, image_ids: set[str], entries: Optional[list[dict]] = None) -> dict[str, dict]:
    """Per image id of ``image_ids``, the log's latest ``verdict`` entry of the study stored under it now (after the
    id's last removal); ids without one are absent. ``entries``: the log's entries already read."""
    read = _selected(audit, entries, lambda e: e.get("event") in (*_STUDY_CHANGES, "verdict")
                     and _image_of(e) in image_ids)
    since = removals(audit, image_ids, read)
    latest: dict[str, dict] = {}
    for entry in read:
        if entry.get("event") == "verdict" and int(entry.get("seq", -1)) > since.get(_image_of(entry), -1):
            latest[_image_of(entry)] = entry
    return latest


def reconcile_reviews(audit: AuditLog, datastore: Datastore) -> list[str]:
    """Put in each study's info the current verdict the log holds for it when the info holds another (an older
    verdict, or none); returns the ids set. A verdict is written to the log first, then to the info (the review
    queue's copy): a server killed between the two left the queue handing out a study already judged, or keeping
    off it a study whose verdict was reset to ``unreviewed``. Run at start-up (one read of the log). On a PACS
    (DICOMweb datastore) a series' info lives in the server's local cache of the series it has downloaded
    (:func:`lib.pacs.cached_images`): those are set, without a request to the PACS; the review queue there reads
    the verdicts from the log anyway (:class:`NextUnreviewed`), so a series not in the cache needs nothing."""
    from ..pacs import cached_images, is_dicomweb

    ids = set(cached_images(datastore) if is_dicomweb(datastore) else datastore.list_images())
    if not ids:
        return []
    latest = _latest_verdicts(audit, ids)
    fixed = []
    for image_id, entry in sorted(latest.items()):
        if (review_of(datastore.get_image_info(image_id) or {})).get("seq") == entry["seq"]:
            continue
        fields = entry.get("fields") or {}
        current = {**{k: fields.get(k) for k in ("image", "verdict", "reviewer", "reviewer_from", "reason", "result")},
                   "time_utc": entry.get("time_utc"), "seq": entry["seq"]}
        setter = getattr(datastore, "set_review", None)
        if setter is not None:
            setter(image_id, current)
        else:
            datastore.update_image_info(image_id, {"review": current})
        fixed.append(image_id)
    return fixed


def _known_modality(value: Any) -> Optional[str]:
    """A modality value as the queue compares it (upper case); None for none or MONAI Label's ``UNK``."""
    text = str(value or "").strip().upper()
    return None if text in ("", "UNK", "NONE") else text


def study_modality(datastore: Datastore, image_id: str, info: Optional[dict] = None,
                   read_image: bool = False, max_voxels: Optional[int] = None) -> Optional[str]:
    """The modality of the study ``image_id`` (``CT``, ``MR``, another DICOM Modality), None when unknown: the
    info's ``modality`` (this app's: read from the image, :func:`lib.datastore.image_modality`, or set by an
    admin), else its ``Modality`` (MONAI Label's DICOMweb datastore writes the series' DICOM attributes into the
    info of a series it downloaded, under their DICOM names), else, for a PACS series, the Modality its listing
    gave (:func:`lib.pacs.listed_series`: a series not downloaded has no info). ``info``: the image's info already
    read. No request is made; no file is read unless ``read_image``: then a local study that none of these name
    (a NIfTI uploaded without modality) has its file read once, the modality kept in its info
    (:func:`lib.datastore.image_modality`; over ``max_voxels``, None: :func:`lib.imaging.max_voxels`, from its
    headers alone). A PACS series is never downloaded for it.

    Raises:
        Exception: with ``read_image``, the local study's file cannot be read (:class:`lib.imaging.ImageReadError`
            and whatever the reader raises; :class:`lib.imaging.errors.ImageTooLargeError`: over ``max_voxels``,
            and its headers name no modality).
    """
    from ..datastore import image_modality
    from ..pacs import is_dicomweb, listed_series

    info = (datastore.get_image_info(image_id) or {}) if info is None else info
    known = (_known_modality(info.get("modality")) or _known_modality(info.get("Modality"))
             or _known_modality(listed_series(datastore, image_id).get("modality")))
    if known is None and read_image and not is_dicomweb(datastore):
        known = _known_modality(image_modality(datastore, image_id, max_voxels=max_voxels))
    return known


#: local studies whose modality the queue could not read (unreadable, too large) that it remembers
#: (:meth:`NextUnreviewed._of_modality`)
UNREADABLE_REMEMBERED = 4096
#: seconds the review queue skips a PACS series whose download failed (:meth:`NextUnreviewed._too_large`) without
#: trying it again, while the PACS lists it with the same instance count: a PACS that failed to deliver may since
#: have recovered, a setting may have been changed
NOT_DOWNLOADED_RETRY_S = 600.0
#: series whose failed download the review queue remembers (the least recently failed go first)
NOT_DOWNLOADED_REMEMBERED = 4096


def _file_identity(path: str) -> tuple:
    """What tells whether a study's file (or folder of DICOM files) changed: its resolved path, then size and
    modification time (ns) of the file, or of each file under the folder."""
    p = Path(path).resolve()
    if not p.is_dir():
        st = p.stat()
        return str(p), st.st_size, st.st_mtime_ns
    files = []
    for root, _, names in os.walk(p):
        for name in names:
            st = os.stat(os.path.join(root, name))
            files.append((os.path.relpath(os.path.join(root, name), p), st.st_size, st.st_mtime_ns))
    return str(p), tuple(sorted(files))


def review_of(info: dict) -> dict:
    """The current review of an image's info (``unreviewed`` when it has none)."""
    return info.get("review") or {"verdict": "unreviewed"}


def audit_trail(audit: AuditLog, datastore: Datastore, image_id: str | None = None) -> list[dict]:
    """Per image (all, or ``image_id``): ``review`` (the latest verdict in the log, else the info's),
    ``review_history`` (every verdict in the log) and ``denoise_results`` (every result in the log), oldest
    first, of the study stored under the id now (entries before the id's last removal belong to a study that is
    gone). Entries of images no longer in the datastore are kept in the log (GET /review/audit/entries)."""
    ids = sorted(datastore.list_images()) if image_id is None else [image_id]
    wanted = set(ids)
    since = removals(audit, wanted)
    verdicts: dict[str, list] = {i: [] for i in ids}
    results: dict[str, list] = {i: [] for i in ids}
    for entry in audit.entries(where=lambda e: e.get("event") in ("verdict", "result") and _image_of(e) in wanted):
        if int(entry.get("seq", -1)) > since.get(_image_of(entry), -1):
            (verdicts if entry["event"] == "verdict" else results)[_image_of(entry)].append(_flat(entry))
    out = []
    for i in ids:
        current = verdicts[i][-1] if verdicts[i] else review_of(datastore.get_image_info(i) or {})
        out.append({"image": i, "review": current, "review_history": verdicts[i], "denoise_results": results[i]})
    return out


class NextUnreviewed(Strategy):
    """Active learning for review: the next study nobody has given a verdict yet (by id, so the queue is
    stable and shared by reviewers). Request keys: ``exclude`` (ids to skip, e.g. studies open elsewhere),
    ``modality`` (ct | mr, only studies of that modality: :func:`study_modality`; it read the info's
    ``modality`` alone, which a PACS series never has, so a request for MR had CT series handed out; a local study
    whose info names none, a NIfTI uploaded without modality, went to CT and MR requests alike: its file is read
    once now, the modality kept in its info, and one that cannot be read is skipped for such requests, with a
    warning, and not read again until its file changes; one over the voxel limit has its modality read from its
    headers, and is listed in ``too_large_to_review`` when they name none: :meth:`_of_modality`). With the
    app's ``audit`` log, the derived series it stored into a PACS are no studies (:func:`stored_results`); ids that
    name several series (:func:`ambiguous_images`) are left out too. On a PACS the current verdict of each series
    is the log's (its info, the queue's copy, lives in the server's local cache: a cache cleared, a server moved or
    started with another cache folder, or a series never downloaded into it
    (``MONAI_LABEL_DICOMWEB_CONVERT_TO_NIFTI=false``) had the queue hand out series already judged); the info's
    only where the log has no verdict of the series.
    With ``voxel_limit`` (the app's largest ``max_voxels``), a PACS series over it that is not downloaded yet is
    skipped, not downloaded (:meth:`_too_large`): the answer lists each one skipped on the way in
    ``too_large_to_review`` (id, instances, voxels, limit), also when no other study is left (:data:`QUEUE_LEFT`);
    ``remaining_unreviewed`` still counts them; a series found too large is not asked again on the next request
    while the PACS lists it with the same instance count (:func:`lib.pacs.known_size`). A series whose download is
    stopped over the limit (it grew since its size was asked) is skipped and listed the same way, and the next
    study handed out. A series the server cannot download (:meth:`_too_large`: multi-frame under
    ``MONAI_LABEL_DICOMWEB_FETCH_BY_FRAME``, or not delivered by the PACS) is skipped too, with a warning, and listed
    in ``not_downloaded`` (id, detail), also when no other study is left: one such series failed every hand-out.
    Its failure is remembered (:data:`NOT_DOWNLOADED_RETRY_S`): each hand-out paid the failing download again."""

    def __init__(self, audit: AuditLog | None = None, voxel_limit: Optional[Callable[[], int]] = None) -> None:
        super().__init__("Next study without a review verdict (radiologist review queue)")
        self.audit = audit
        self.voxel_limit = voxel_limit
        # (id, limit, file identity) -> a local study's modality read that gave no modality (:meth:`_of_modality`)
        self._outcomes: OrderedDict[tuple, bool | dict] = OrderedDict()
        self._outcomes_lock = threading.Lock()
        # (id, instances listed or None) -> (detail, time.monotonic()) of a PACS series whose download failed
        self._failed_downloads: OrderedDict[tuple, tuple[str, float]] = OrderedDict()

    def _too_large(self, datastore: Datastore, image_id: str) -> Optional[dict]:
        """What the answer says of a PACS series over :attr:`voxel_limit` not downloaded yet, else None (the series
        then downloaded). MONAI Label downloads the series handed out whole, into memory, and
        converts it (``next_sample`` asks for its path): one over the limit is skipped instead (the size check of
        infer by id, :func:`lib.pacs.known_size`), with a warning, and listed in the answer. One under it is
        downloaded here (:func:`lib.pacs.download_within`, which ``next_sample``'s download would call): a series
        that grew past the limit since its size was asked is stopped there (:class:`lib.pacs.SeriesTooLarge`),
        skipped and listed the same way (``download_stopped``: its ``instances`` and ``voxels`` are the size the
        PACS gives after the stop, or those it had sent by then when it gives less: :func:`lib.pacs.download_within`),
        where the whole hand-out answered 413; its size is remembered, so the next requests do not download it
        again. A series that does not fit on the disk of the cache (:class:`lib.pacs.SeriesDoesNotFit`) fails the
        request (507): the disk, not the series, is at fault, and the next series would not fit either. One with
        multi-frame instances under ``MONAI_LABEL_DICOMWEB_FETCH_BY_FRAME``
        (:class:`lib.pacs.SeriesNotFetchableByFrame`) or not delivered whole (:class:`lib.pacs.SeriesNotDelivered`)
        is answered ``{"id", "not_downloaded": detail}`` (nothing of it kept): the series, not the disk, is at fault
        there, and each failed the whole hand-out (501, 502). That failure is remembered under the series' id and
        the instance count the PACS lists it with (:func:`lib.pacs.listed_series`): the next requests answer it
        without asking the PACS anything (every hand-out paid the failing download again) until
        :data:`NOT_DOWNLOADED_RETRY_S` have passed, the PACS lists the series with another count, or the series is
        in the cache (another route downloaded it)."""
        from .. import pacs

        if self.voxel_limit is None or not pacs.is_dicomweb(datastore):
            return None
        limit = self.voxel_limit()
        failed_key = (image_id, pacs.listed_series(datastore, image_id).get("instances") or None)
        if not pacs.is_downloaded(datastore, image_id):
            detail = self._failed_download(failed_key)
            if detail is not None:
                log.info("review queue: series %s skipped: its download failed within the last %d s (%s); it is "
                         "tried again after that, or once the PACS lists it with another instance count", image_id,
                         NOT_DOWNLOADED_RETRY_S, detail)
                return {"id": image_id, "not_downloaded": detail}
        size = pacs.known_size(datastore, image_id, limit)
        if size is None or size.voxels <= limit:
            try:  # the size asked handed on: one download asks it once
                pacs.download_within(datastore, image_id, limit, size)
                return None
            except (pacs.SeriesNotFetchableByFrame, pacs.SeriesNotDelivered) as error:
                log.warning("review queue: series %s skipped: %s; it stays unreviewed and is listed in the queue's "
                            "not_downloaded; not tried again for %d s", image_id, error, NOT_DOWNLOADED_RETRY_S)
                self._remember_failed_download(failed_key, str(error))
                return {"id": image_id, "not_downloaded": str(error)}
            except pacs.SeriesTooLarge as error:
                size = error.size
                log.warning("review queue: series %s skipped: %s; it stays unreviewed and is listed in the queue's "
                            "too_large_to_review", image_id, error)
        else:
            log.warning("review queue: series %s skipped, not downloaded: %d instances, %s voxels%s%s over the limit "
                        "of %s (--conf max_voxels); it stays unreviewed and is listed in the queue's "
                        "too_large_to_review", image_id, size.instances, f"{size.voxels:,}",
                        " (estimated)" if size.listed < size.instances else "",
                        " (where an earlier download of it was stopped)" if size.stopped else "", f"{limit:,}")
        return {"id": image_id, "instances": size.instances, "voxels": size.voxels,
                "estimated": size.listed < size.instances, "limit": limit,
                **({"download_stopped": True} if size.stopped else {})}

    def _failed_download(self, key: tuple) -> Optional[str]:
        """The detail of the failed download remembered under ``key`` (:meth:`_too_large`) when it failed less than
        :data:`NOT_DOWNLOADED_RETRY_S` ago, else None (one older is forgotten)."""
        with self._outcomes_lock:
            detail, since = self._failed_downloads.get(key, (None, 0.0))
            if detail is not None and time.monotonic() - since >= NOT_DOWNLOADED_RETRY_S:
                del self._failed_downloads[key]
                return None
            return detail

    def _remember_failed_download(self, key: tuple, detail: str) -> None:
        with self._outcomes_lock:
            self._failed_downloads[key] = (detail, time.monotonic())
            self._failed_downloads.move_to_end(key)
            while len(self._failed_downloads) > NOT_DOWNLOADED_REMEMBERED:
                self._failed_downloads.popitem(last=False)

    def _queue_limit(self) -> int:
        """The voxel limit of the studies the queue reads: :attr:`voxel_limit`, else :func:`lib.imaging.max_voxels`."""
        from ..imaging import max_voxels

        return self.voxel_limit() if self.voxel_limit is not None else max_voxels()

    def _of_modality(self, datastore: Datastore, image_id: str, info: dict, modality: str) -> bool | dict:
        """Whether the study ``image_id`` may go to a request for ``modality`` (CT | MR): its modality
        (:func:`study_modality`) is that one, or unknown (a PACS series whose listing names none). A local study
        that nothing names has its file read (:func:`lib.datastore.image_modality`): one that cannot be read is
        not (skipped, with a warning, and the queue goes on); one over the voxel limit has its modality read from
        its headers (a DICOM image's), and when they name none (NIfTI, NRRD: the values decide it) is answered
        as the queue's entry of a study too large to review here (a dict: id, voxels, limit), as a PACS series
        over the limit is (:meth:`_too_large`). The outcome of each such read is remembered under the file's
        identity (:func:`_file_identity`), one warning per file: every request read such a study again, with a
        warning each time. A changed file is read again."""
        from ..imaging.errors import ImageTooLargeError, one_line
        from ..pacs import is_dicomweb

        found = study_modality(datastore, image_id, info)
        if found is not None or is_dicomweb(datastore):
            return found in (None, modality)
        limit = self._queue_limit()
        try:
            key: Optional[tuple] = (image_id, limit, *_file_identity(datastore.get_image_uri(image_id)))
        except (OSError, TypeError, ValueError):  # no file to know it by: read (and fail) every time, as before
            key = None
        with self._outcomes_lock:
            remembered = self._outcomes.get(key) if key is not None else None
            if remembered is not None:
                self._outcomes.move_to_end(key)
        if remembered is not None:
            return dict(remembered) if isinstance(remembered, dict) else remembered
        try:
            found = study_modality(datastore, image_id, info, read_image=True, max_voxels=limit)
        except ImageTooLargeError as error:
            log.warning("review queue: %s listed as too large to review for a request for %s: %s voxels over the "
                        "limit of %s (--conf max_voxels, else ADL_MAX_VOXELS), and its modality is known from its "
                        "voxels alone; it stays unreviewed", image_id, modality, f"{error.voxels:,}", f"{limit:,}")
            outcome: bool | dict = {"id": image_id, "voxels": error.voxels, "limit": limit}
        except Exception as error:  # noqa: BLE001 - one unreadable study is no failure of the whole queue
            log.warning("review queue: %s skipped for a request for %s: its modality is not known and its image "
                        "cannot be read (%s: %s); skipped for such requests until its file changes", image_id,
                        modality, type(error).__name__, one_line(error))
            outcome = False
        else:
            return found in (None, modality)
        if key is not None:
            with self._outcomes_lock:
                self._outcomes[key] = outcome
                while len(self._outcomes) > UNREADABLE_REMEMBERED:
                    self._outcomes.popitem(last=False)
        return outcome

    def __call__(self, request: dict, datastore: Datastore) -> dict[str, Any] | None:
        from .. import pacs

        exclude = set(request.get("exclude") or [])
        modality = str(request.get("modality") or "").upper()
        pacs.refresh_listing(datastore, pacs.LISTING_MAX_AGE_S)  # a PACS's series sent since the last listing
        listed = set(datastore.list_images())
        not_studies = set()  # results and ambiguous ids exist on a PACS only (see refuse_unreviewable)
        logged: dict[str, dict] = {}  # a PACS's verdicts, from the log
        if pacs.is_dicomweb(datastore):
            read: Optional[list[dict]] = None
            if self.audit is not None:
                try:  # one read of the log for both
                    read = self.audit.entries(where=lambda e: e.get("event") in (
                        *_STORED_TO_PACS, *_STUDY_CHANGES, "verdict"))
                except (AuditError, OSError):  # unreadable: the info's verdicts, as on a local datastore
                    read = None
            not_studies = ambiguous_images(datastore) | (stored_results(self.audit, read) if read is not None
                                                         else set())
            if read is not None:
                logged = {image_id: (entry.get("fields") or {})
                          for image_id, entry in _latest_verdicts(self.audit, listed, read).items()}
        unreviewed = []  # (id, info), read once for the choice and the count
        for image_id in sorted(listed - not_studies):
            info = datastore.get_image_info(image_id) or {}
            current = logged[image_id] if image_id in logged else review_of(info)
            if current.get("verdict") == "unreviewed":
                unreviewed.append((image_id, info))
        too_large = []  # series over the voxel limit, skipped: listed in the answer (never dropped in silence)
        not_downloaded = []  # series the server cannot download, skipped: listed the same way
        for image_id, info in unreviewed:
            if image_id in exclude:
                continue
            if modality in ("CT", "MR"):
                fits = self._of_modality(datastore, image_id, info, modality)
                if isinstance(fits, dict):  # too large to read its modality: listed, as a PACS series over it is
                    too_large.append(fits)
                if fits is not True:
                    continue
            skipped = self._too_large(datastore, image_id)
            if skipped is not None:
                if "not_downloaded" in skipped:
                    not_downloaded.append({"id": image_id, "detail": skipped["not_downloaded"]})
                else:
                    too_large.append(skipped)
                continue
            return {"id": image_id, "remaining_unreviewed": len(unreviewed),
                    **({"too_large_to_review": too_large} if too_large else {}),
                    **({"not_downloaded": not_downloaded} if not_downloaded else {})}
        if too_large or not_downloaded:
            QUEUE_LEFT.set({"remaining_unreviewed": len(unreviewed),
                            **({"too_large_to_review": too_large} if too_large else {}),
                            **({"not_downloaded": not_downloaded} if not_downloaded else {})})
        return None
