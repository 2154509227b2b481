"""What the server records in the audit log (:mod:`.log`), and who asked.

* :func:`audited_datastore`: the app's datastore, of its own class still (``isinstance`` checks keep working), with
  ``add_image``, ``remove_image``, ``save_label``, ``remove_label``, ``update_image_info`` and ``update_label_info``
  recording a pending entry BEFORE they act (``image_removing``, ``label_saving``...: an action whose entry cannot
  be written does not happen) and the entry of what was done AFTER (``image_removed``, ``label_saved``...; one
  that fails leaves a ``..._failed`` entry instead), so a server killed in between never leaves a removal or a
  saved correction on record that did not happen. MONAI Label's stock datastore routes call these methods, so
  they leave records too. ``update_image_info`` refuses the keys the review keeps (:data:`PROTECTED_INFO_KEYS`):
  the current verdict in the datastore info is written only through :meth:`set_review`, after its entry is in
  the log. The one info update with no entries of its own is the note MONAI Label's active-learning route makes of
  a hand-out (``strategy``: its time and client) while :func:`handing_out` is in force: the hand-out is recorded
  once, as a ``review_queue_handout`` entry (:func:`lib.activelearning.record_handout`), and a PACS series not in
  the server's local cache, which has no info to note it in, is not noted (the stock update failed there, leaving a
  pending entry and a failed one on every hand-out). The note is held (:class:`HandOut`) until that entry is
  written: a hand-out whose entry cannot be written is refused and leaves no note.
* :class:`AuditedModelStore`: the weights store, each event of its history (publishing, published, rejected,
  restoring, restored) also an audit entry; publishing and restoring are refused while the log refuses entries.
* Who asked: :func:`.context.request_actor` (the authenticated user, the client's address), read from the request
  that :class:`.context.RequestContextMiddleware` keeps in a context variable.
"""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

from ..runtime.hashing import file_sha256
from ..weights.store import ModelStore
from .context import RequestContextMiddleware, request_actor
from .identity import input_identity
from .log import AuditError, AuditLog, sanitise

__all__ = ["PENDING_EVENTS", "PROTECTED_INFO_KEYS", "HANDOUT_NOTE_KEY", "AuditedModelStore", "HandOut",
           "RequestContextMiddleware", "audited_datastore", "discard_result", "handing_out", "install_request_context",
           "request_actor", "result_fields", "voxel_limit_of"]

# request keys that are not the client's parameters (paths, sessions, routing): left out of a result's entry
_NOT_PARAMS = ("image", "session", "description", "model", "label", "file", "result_file")

log = logging.getLogger(__name__)

PROTECTED_INFO_KEYS = ("review", "review_history", "denoise_results")

# each datastore change: the entry written before it (pending) -> the one written once it is done
PENDING_EVENTS = {"image_added": "image_adding", "image_removed": "image_removing", "label_saved": "label_saving",
                  "label_removed": "label_removing", "image_info_updated": "image_info_updating",
                  "label_info_updated": "label_info_updating"}


#: the key of the image info in which MONAI Label's active-learning route notes each hand-out (per strategy: time
#: and client); written while :func:`handing_out` is in force, it is recorded by the hand-out's own entry
HANDOUT_NOTE_KEY = "strategy"


class HandOut:
    """A study being handed out by MONAI Label's active-learning route (:func:`handing_out`): the route's note of
    the hand-out in the image's info (:data:`HANDOUT_NOTE_KEY`), held until :meth:`keep_notes`, called once the
    hand-out's own entry is written. A hand-out refused because its entry cannot be written leaves no note: nothing
    says the study was handed out, and the queue hands it out to the next request as before."""

    def __init__(self) -> None:
        self._notes: List[Callable[[], None]] = []

    def hold(self, keep: Callable[[], None]) -> None:
        """Hold ``keep`` (writes one note) until :meth:`keep_notes`."""
        self._notes.append(keep)

    def keep_notes(self) -> None:
        """Write the held notes (the hand-out is on record); one that fails is a warning, as in the stock route (a
        note is no record: the hand-out's entry is)."""
        notes, self._notes = self._notes, []
        for keep in notes:
            try:
                keep()
            except Exception:  # noqa: BLE001 - the stock route goes on without its note too
                log.warning("review queue: the hand-out note could not be kept in the image's info", exc_info=True)


_handing_out: ContextVar[Optional[HandOut]] = ContextVar("adl_denoise_handing_out", default=None)


@contextmanager
def handing_out() -> Iterator[HandOut]:
    """While MONAI Label's active-learning route hands out a study (:func:`lib.endpoints.guards.guarded_sample`):
    its note of the hand-out in the image's info (:data:`HANDOUT_NOTE_KEY` alone) writes no ``image_info_updating``
    / ``image_info_updated`` entries (the route records the hand-out once) and is held in the :class:`HandOut`
    yielded, written by :meth:`HandOut.keep_notes` once the hand-out's entry is (skipped for a PACS series not in
    the local cache). Any other info update is recorded as always."""
    handout = HandOut()
    token = _handing_out.set(handout)
    try:
        yield handout
    finally:
        _handing_out.reset(token)


def voxel_limit_of(datastore) -> Optional[int]:
    """The largest image the server reads (voxels) that :func:`audited_datastore` was given for ``datastore``; None
    (:func:`lib.imaging.max_voxels`) for another datastore. The content hash of a study checks it from the header
    first (:func:`.identity.volume_content_sha256`): every study the server denoised is hashed, none over it loaded."""
    limit = getattr(datastore, "_voxel_limit", None)
    return limit() if callable(limit) else None


def _identity_or_error(path: str, datastore) -> Dict[str, Any]:
    try:
        return input_identity(path, voxel_limit_of(datastore))
    except Exception as error:  # noqa: BLE001 - the record says it could not identify the file, and why
        return {"identity_error": f"{type(error).__name__}: {error}"}


# ------------------------------------------------------------------------------------------------ datastore
class AuditedDatastoreMixin:
    """Mixed in front of the datastore's own class by :func:`audited_datastore` (see the module docstring)."""

    _audit: AuditLog

    def _recorded(self, event: str, fields: dict, action):
        """Do ``action`` between two entries: the pending one (``image_removing`` for ``image_removed``, see
        :data:`PENDING_EVENTS`) BEFORE it (an action whose entry cannot be written does not happen), ``event``
        once it is done (naming the pending entry's seq, ``pending_seq``), ``<event>_failed`` if it fails. A server
        killed in between leaves the pending entry alone: ``event`` is only ever on record for what was done (a
        removal for a study that is still stored hid its results and verdicts; a correction on record that was
        never stored). A confirmation that cannot be written after the action is logged (the pending entry
        stands)."""
        actor = request_actor()
        pending = self._audit.append(PENDING_EVENTS[event], {**fields, **actor})
        try:
            result = action()
        except Exception as error:
            try:
                self._audit.append(f"{event}_failed", {**fields, "pending_seq": pending["seq"],
                                                       "error": f"{type(error).__name__}: {error}"})
            except AuditError:
                log.exception("could not record the failure of %s", event)
            raise
        try:
            self._audit.append(event, {**fields, **actor, "pending_seq": pending["seq"]})
        except AuditError:
            log.exception("%s of %s is done, but the entry confirming it could not be written; the pending entry "
                          "%s (%s) names it", event, fields.get("image"), pending["seq"], pending["event"])
        return result

    def add_image(self, image_id: str, image_filename: str, image_info: Dict[str, Any]) -> str:
        fields = {"image": image_id, "file_name": os.path.basename(str(image_filename)),
                  "file_sha256": file_sha256(image_filename), **_identity_or_error(image_filename, self),
                  "info": image_info}
        return self._recorded("image_added", fields,
                              lambda: super(AuditedDatastoreMixin, self).add_image(image_id, image_filename,
                                                                                   image_info))

    def remove_image(self, image_id: str) -> None:
        fields: Dict[str, Any] = {"image": image_id}
        try:
            uri = super().get_image_uri(image_id)
            if uri and os.path.isfile(uri):
                fields["file_sha256"] = file_sha256(uri)
        except Exception:  # noqa: BLE001 - an unknown id: the removal itself says so
            pass
        return self._recorded("image_removed", fields,
                              lambda: super(AuditedDatastoreMixin, self).remove_image(image_id))

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: Dict[str, Any]) -> str:
        fields = {"image": image_id, "tag": label_tag, "file_sha256": file_sha256(label_filename),
                  "info": label_info}
        return self._recorded("label_saved", fields, lambda: super(AuditedDatastoreMixin, self).save_label(
            image_id, label_filename, label_tag, label_info))

    def remove_label(self, label_id: str, label_tag: str) -> None:
        return self._recorded("label_removed", {"image": label_id, "tag": label_tag},
                              lambda: super(AuditedDatastoreMixin, self).remove_label(label_id, label_tag))

    def update_image_info(self, image_id: str, info: Dict[str, Any]) -> None:
        protected = sorted(set(info or {}) & set(PROTECTED_INFO_KEYS))
        if protected:
            from fastapi import HTTPException

            raise HTTPException(status_code=422, detail=(
                f"image info may not set {', '.join(protected)}: verdicts are given with POST /review/{{id}} and "
                "kept in the audit log"))
        handout = _handing_out.get()
        if handout is not None and set(info or {}) == {HANDOUT_NOTE_KEY}:  # recorded as the hand-out (handing_out)
            handout.hold(lambda: self._update_cached_info(image_id, info, "the hand-out is recorded in the audit log"))
            return None
        return self._recorded("image_info_updated", {"image": image_id, "info": info},
                              lambda: super(AuditedDatastoreMixin, self).update_image_info(image_id, info))

    def update_label_info(self, label_id: str, label_tag: str, info: Dict[str, Any]) -> None:
        return self._recorded("label_info_updated", {"image": label_id, "tag": label_tag, "info": info},
                              lambda: super(AuditedDatastoreMixin, self).update_label_info(label_id, label_tag, info))

    def set_review(self, image_id: str, review: Dict[str, Any]) -> None:
        """Keep ``review`` (the current verdict, already in the audit log) in the image's info for the queue. A
        PACS series that is not in the server's local cache has no info to keep it in (MONAI Label adds a series to
        its cache only once converted to NIfTI: never with ``MONAI_LABEL_DICOMWEB_CONVERT_TO_NIFTI=false``): the
        queue reads a PACS's verdicts from the log (:class:`lib.activelearning.NextUnreviewed`), so nothing is
        lost; the verdict answered a bare 500 after it was recorded."""
        self._update_cached_info(image_id, {"review": review}, "the verdict is recorded in the audit log")

    def _update_cached_info(self, image_id: str, info: Dict[str, Any], recorded: str) -> None:
        """The datastore's own ``update_image_info`` (no entries: ``recorded`` says where the change is on record),
        nothing for a PACS series not in the server's local cache (it has no info)."""
        from monailabel.interfaces.exception import ImageNotFoundException

        try:
            super().update_image_info(image_id, info)
        except ImageNotFoundException:
            from ..pacs import is_dicomweb

            if not is_dicomweb(self):
                raise
            log.info("%s not kept in the info of %s: %s; the series is not in the local cache (no info to keep it in)",
                     ", ".join(sorted(info)), image_id, recorded)


_classes: Dict[type, type] = {}


def audited_datastore(datastore, audit: AuditLog, voxel_limit: Optional[Callable[[], int]] = None):
    """``datastore`` itself, its class swapped for a subclass with :class:`AuditedDatastoreMixin` in front (so
    every attribute, the file watcher and ``isinstance`` checks stay as they were). ``voxel_limit`` gives the
    server's voxel limit (:func:`voxel_limit_of`), asked when a study is hashed."""
    cls = type(datastore)
    if not issubclass(cls, AuditedDatastoreMixin):
        if cls not in _classes:
            _classes[cls] = type(f"Audited{cls.__name__}", (AuditedDatastoreMixin, cls), {})
        datastore.__class__ = _classes[cls]
    datastore._audit = audit
    datastore._voxel_limit = voxel_limit
    return datastore


# ------------------------------------------------------------------------------------------------ weights
class AuditedModelStore(ModelStore):
    """The weights store (:class:`lib.weights.store.ModelStore`), every event of its history (publishing,
    published, rejected, restoring, restored) also an audit entry ``weights_<event>``; publishing and restoring
    are refused while the audit log refuses entries."""

    def __init__(self, model_dir: str | os.PathLike, audit: AuditLog) -> None:
        super().__init__(model_dir)
        self.audit = audit

    def publish(self, candidate, model: str, modality: str, **details):
        self.audit.check_writable()
        return super().publish(candidate, model, modality, **details)

    def restore(self, model: str, modality: str, version: str):
        self.audit.check_writable()
        return super().restore(model, modality, version)

    def record(self, model: str, modality: str, event: str, **details) -> dict:
        self.audit.append(f"weights_{event}", {"model": model, "modality": str(modality).upper(), **details,
                                               **request_actor()})
        return super().record(model, modality, event, **details)


def install_request_context(fastapi_app) -> None:
    """Add :class:`RequestContextMiddleware` to the server's FastAPI application (inside the access control), once."""
    if getattr(fastapi_app.state, "adl_denoise_request_context", False):
        return
    from starlette.middleware import Middleware

    fastapi_app.user_middleware.append(Middleware(RequestContextMiddleware))
    if fastapi_app.middleware_stack is not None:  # built already (the app is made during the server's start-up)
        fastapi_app.middleware_stack = fastapi_app.build_middleware_stack()
    fastapi_app.state.adl_denoise_request_context = True


def result_fields(request: dict, result: dict, datastore, image_id: str | None, source_folder) -> dict[str, Any]:
    """The ``result`` entry of one inference: where the input came from (``datastore``, ``upload``, ``session``,
    ``dicomweb``) and its identity (:func:`.identity.input_identity`), the weights (version, whole SHA-256), the
    request's parameters (without paths and sessions), the result file's SHA-256 and who asked."""
    params = result.get("params") or {}
    session = request.get("session") if isinstance(request.get("session"), dict) else None
    if source_folder is not None:
        source, path = "dicomweb", str(source_folder)
    elif image_id is not None:
        source, path = "datastore", datastore.get_image_uri(image_id)
    else:
        source, path = ("session" if session else "upload"), str(request.get("image"))
    try:
        identity = input_identity(path, voxel_limit_of(datastore))
    except Exception as error:  # noqa: BLE001 - recorded as such: the denoiser read it, the hash could not
        identity = {"identity_error": f"{type(error).__name__}: {error}"}
    source_info: dict[str, Any] = {"source": source, "image": image_id, **identity}
    if session:
        source_info["session_id"] = session.get("name")  # MONAI Label's SessionInfo: the id is its name
    result_file = result.get("file")
    weights = {k: params.get(k) for k in ("model", "method", "modality", "weights_version", "weights_sha256",
                                          "low_frequency_restoration", "device", "seconds", "shape", "spacing",
                                          "result_dtype", "result_extension")}
    return {
        "input": source_info,
        **weights,
        "result_sha256": file_sha256(result_file) if result_file and os.path.isfile(result_file) else None,
        "params": sanitise({k: v for k, v in request.items() if k not in _NOT_PARAMS}),
        **request_actor(),
    }


def discard_result(result: dict) -> None:
    """Delete the result file of an inference that must not be returned (its audit entry could not be written)."""
    path = result.get("file")
    if path and os.path.isfile(path):
        try:
            Path(path).unlink()
        except OSError:
            log.warning("could not remove the unrecorded result %s", path)
