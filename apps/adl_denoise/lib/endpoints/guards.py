"""Guards in front of MONAI Label's stock routes (``install`` places every route of :data:`router` before them):
they refuse hostile or bad requests with a 4xx answer naming the parameter and the reason (the stock handlers
answer 500, or act on them), and hand valid requests on to the stock functions. Each guard keeps its stock
route's query / form parameters and its role (``RBAC``), so nothing is less protected than before.

* Names (:mod:`.names`): image ids, label tags and session ids are plain names, never paths, in every
  datastore, session and infer route (MONAI Label joins them with its folders).
* ``POST /infer/{model}``: the URL picks the model, the image (``?image=``, ``?session_id=`` or the upload) and
  nothing in ``params`` may override them; ``params`` cannot save labels (``save_label``, ``label_tag``);
  ``params`` must be a JSON object, ``store_to_pacs`` a boolean. An uploaded file is removed whatever the answer.
* ``PUT /datastore/image``, ``DELETE /datastore/image``: 422 on a DICOMweb datastore (MONAI Label would add or remove
  the study in its local cache only, answer 200, and go on serving the PACS's series as before).
* ``PUT /datastore/image``: the upload must be an intact image (header, declared size, gzip stream checked before
  any voxel is read); an id already taken answers as that study when the content is the same (same file, or same
  voxels and geometry: 200, nothing replaced, labels kept) and 409 when it differs (MONAI Label would replace the
  file and drop its labels).
* ``PUT /datastore/label``: an intact image; a ``final`` correction on its image's grid, holding its values (no
  label map); a ``regions`` map checked against its image and declaration (:mod:`lib.data.regions`); the label's
  info gets the server's correction stamp (:func:`lib.trainers.correction_stamp`: who saved it, when, the file's
  SHA-256; on a PACS the series' SeriesInstanceUID, StudyInstanceUID and PatientID), overriding any client keys of
  the same names, and the label-info routes refuse those keys: only corrections saved here are training data. On a
  PACS the label is kept in the server's corrections folder (:mod:`lib.pacs_corrections`), never sent to the PACS.
* ``POST /train/{model}``: :meth:`DenoiserTrainTask.validate_request` first (422 naming what is missing, or the
  file of a correction or its study that cannot be read and why; 413 for a correction or its study over the voxel
  limit, from their headers, naming the study); one run
  at a time (429, a ``run_sync`` run included); the request an audit entry naming who asked; a ``run_sync`` run
  trains in MONAI Label's training subprocess (not in the server process), the request waiting for it, so that
  ``DELETE /train/`` can stop it (then 409). ``POST /train/`` (MONAI Label's run-all, none of those checks): 422
  pointing to ``POST /train/{model}``.
* ``DELETE /train/``: the stop is an audit entry (``training_stopping``: who stops which run) written before the
  run is killed, confirmed (``training_stopped``) once it is, and the run's status (``interrupted``) says it was
  stopped and by whom.
* ``PUT /model/{model}``, ``DELETE /model/{model}``: 405. Served weights change only through a fine-tune that passed
  its checks and the rollback route, each recorded; the stock routes would copy an upload over a served file (no
  check, no version, no record) or move it away.
* ``GET /model/{model}``, ``GET /model/info/{model}`` (admin, as the stock routes): the weight file the model serves
  for ``?modality=`` (needed where it serves several) and its details; the stock routes answered 404 for every
  model (they ask the infer task for a single file, which these tasks do not name).
* ``POST /activelearning/{strategy}``, ``GET /datastore/image/info``: the answer has no ``path`` (the server's
  absolute file path; a study is downloaded by its id); a session's ``path`` and ``image`` (``PUT /session/``,
  ``GET /session/{id}``) are cut to their last part.
* ``POST /activelearning/{strategy}``: a study handed out is one audit entry, ``review_queue_handout`` (who was
  given which study, by which strategy), written before the answer; the stock route's note of the hand-out in the
  image's info (``strategy``) writes no info-update entries of its own, is kept only once that entry is written,
  and is not attempted for a PACS series not in the server's local cache (:func:`lib.audit.recording.handing_out`):
  every hand-out left two info-update entries, and on such a series a pending entry and a failed one. A hand-out
  whose entry cannot be written is refused (503: access to patient data is never given unrecorded), no note kept.
* ``GET /datastore/image``, ``GET /datastore/label``, ``GET /datastore/dataset``, ``GET /session/{id}?image=true``,
  the image and label info (``GET /datastore/image/info``, ``/datastore/label/info``), the whole datastore listing
  (``GET /datastore/?output=all``) and the PACS proxy's reads: who read which patient's data is an audit entry
  (``image_downloaded``, ``label_downloaded``, ``dataset_downloaded``, ``session_image_downloaded``,
  ``image_info_read``, ``label_info_read``, ``datastore_listed``, ``dicomweb_read``) written before the answer is
  sent, through :func:`.review.recorded_access`: a read whose entry cannot be written is refused (503), nothing
  sent. The proxy, asked once per DICOM instance, frame and metadata file by a viewer, records one entry per
  reader (user and client) and study / series (or search) per server process (:func:`proxy_read_key`). A store
  through the proxy (``POST``, STOW-RS) is a ``dicomweb_storing`` entry written before it is forwarded (503, nothing
  forwarded, when it cannot be written; 422 for an empty body and when a part sent as DICOM yields no study and
  series UID or the parts cannot be framed exactly; 415 for a body that is not multipart/related and for JSON or
  XML metadata and bulk data parts, whose UIDs are not read), then its outcome.
* ``GET /info/``, ``GET /train/``, ``GET /batch/infer``, ``GET /scoring/``, ``GET /datastore/?output=train``: below
  admin (with authentication on), the answer names none of the server's folders and files (the audit log's
  ``audit.dir``, a training run's ``work_dir``; the training list's files and paths in texts cut to their last
  part), no process id, and no task log lines (``details``: the subprocess's log, which names the server's folders
  and configuration; ``GET /logs/`` is admin only).
* ``PUT /session/``: no archive unpacking (``uncompress``): a session is one uploaded volume. A session whose
  upload or save fails (a file name too long: 422; a full disk: 507) leaves nothing in the server's temp folder
  nor in its session store (MONAI Label's route left the uploaded volume in the temp folder). A file named
  ``meta.info`` (the store's info file), one with no name or named like another of the request gets a unique name.
* ``POST /infer/wsi/{model}``, ``/infer/wsi_v2/{model}``: 404 for everyone. This app serves no whole-slide images,
  and the stock routes take ``image`` as any path the server can read and ``params`` that save labels under any
  tag, none of the checks above.
* ``/proxy/dicom/...`` (the PACS proxy): the path stays under the DICOMweb root (DICOMweb path segments only: no
  ``.`` or ``..``, no empty segment, no percent sign or other characters that a PACS could decode into one); a
  POST (STOW-RS stores into the PACS, whichever of ``wado/``, ``qido/`` or ``stow/`` it is sent to, since MONAI
  Label's prefixes are empty by default) needs the annotator role; the caller's ``Authorization``, cookies and
  ``Host`` are not forwarded to the PACS (the stock proxy copies every header of a POST, so a user's realm token
  would reach a third party). The forwarding is the app's own (:func:`_forward_to_pacs`): it keeps a search's
  query string and the viewer's ``Accept`` header (the stock proxy drops both: a QIDO search for one patient
  answered every study), waits for the PACS in a worker thread with a timeout (502 when it cannot be reached or its
  answer is cut short, 504 when it accepts the request and then sends nothing, or nothing more, within
  ``ADL_PACS_READ_TIMEOUT_S``), and does not follow the PACS's redirects.
* ``GET /ohif/...``: a path naming a folder (``..``, ``.``, ``assets``) is a 404 (the stock route tried to send the
  folder as a file: a bare 500).
"""
from __future__ import annotations

import collections
import contextlib
import errno
import io
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional

from fastapi import APIRouter, BackgroundTasks, Depends, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import FileResponse
from monailabel.config import settings as _settings
from monailabel.endpoints.user.auth import RBAC, User

from ..runtime.hashing import file_sha256
from ..runtime.switches import parse_bool
from .common import app, for_caller, model_task, scrub_paths, sees_internals
from .names import check_name

__all__ = ["router", "DATASTORE_SUFFIXES", "FORBIDDEN_INFER_PARAMS", "PROXY_HEADERS_NOT_FORWARDED",
           "proxy_path_problem"]

log = logging.getLogger(__name__)

router = APIRouter()

_USER = _settings.MONAI_LABEL_AUTH_ROLE_USER
_ANNOTATOR = _settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR
_ADMIN = _settings.MONAI_LABEL_AUTH_ROLE_ADMIN

# image files the datastore keeps and this app reads (MONAI Label's local datastore lists *.nii.gz, *.nii, *.nrrd)
DATASTORE_SUFFIXES = (".nii.gz", ".nii", ".nrrd")

# infer params that would pick another image, session or model than the URL's, or save a label: refused (422)
_ROUTING = "the URL chooses the image (?image=, ?session_id= or the uploaded file) and the model (/infer/{model})"
_SAVING = "an infer request does not save labels: corrections are saved with PUT /datastore/label"
FORBIDDEN_INFER_PARAMS = {
    "image": _ROUTING, "image_path": _ROUTING, "session_id": _ROUTING, "session": _ROUTING, "model": _ROUTING,
    "model_filename": _ROUTING, "model_path": _ROUTING, "path": _ROUTING, "file": _ROUTING, "label": _ROUTING,
    "description": _ROUTING, "save_label": _SAVING, "label_tag": _SAVING,
}
#: training-request keys the server sets (who asked, and the audit entry of the request): a client's are dropped
TRAINING_REQUEST_KEYS = ("requested_by", "training_request_seq")

# a training request's check that no other run is going on, and its start, are one step (and a stop's record and
# kill: no run starts between them); a run_sync run (whose request waits for its subprocess, outside MONAI Label's
# executor queue) holds _sync_training while it trains
_train_start_lock = threading.Lock()
_sync_training = threading.Lock()

# an id's check-then-add is one step: two uploads under one new id cannot both pass the check
_add_lock = threading.Lock()


# ------------------------------------------------------------------------------------------------ helpers
def _json_object(text: Optional[str], parameter: str) -> dict:
    """The JSON object of a form field; 422 saying why otherwise (not JSON, or JSON but not an object)."""
    try:
        value = json.loads(text) if text else {}
    except ValueError as error:
        raise HTTPException(status_code=422, detail=f"{parameter} is not JSON ({error})") from None
    if not isinstance(value, dict):
        raise HTTPException(status_code=422, detail=f"{parameter} must be a JSON object ({{...}}), got "
                                                    f"{type(value).__name__ if value is not None else 'null'}")
    return value


def _check_infer_params(params: dict) -> None:
    for key in params:
        if key in FORBIDDEN_INFER_PARAMS:
            raise HTTPException(status_code=422, detail=f"params.{key} is not accepted: {FORBIDDEN_INFER_PARAMS[key]}")
    if "store_to_pacs" in params:
        try:
            parse_bool(params["store_to_pacs"], "params.store_to_pacs")
        except ValueError as error:
            raise HTTPException(status_code=422, detail=str(error)) from None
    if "timeout" in params:
        value = params["timeout"]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1e6:
            raise HTTPException(status_code=422, detail=f"params.timeout must be a number of seconds, got {value!r}")


def _upload_suffix(filename: Optional[str], parameter: str) -> str:
    """The image suffix of an uploaded file's name (.nii.gz, .nii, .nrrd); 422 otherwise."""
    name = os.path.basename(filename or "").lower()
    for suffix in DATASTORE_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    raise HTTPException(status_code=422, detail=f"{parameter} {os.path.basename(filename or '')!r} is not a "
                                                f"{', '.join(DATASTORE_SUFFIXES)} file")


def _save_upload(upload: UploadFile, suffix: str) -> Path:
    """The upload in a new temporary file (the caller removes it)."""
    fd, name = tempfile.mkstemp(suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as handle:
            while True:
                chunk = upload.file.read(1 << 20)
                if not chunk:
                    break
                handle.write(chunk)
    except BaseException:
        _remove(Path(name))
        raise
    return Path(name)


def _sniffed_suffix(upload: UploadFile) -> str:
    """The suffix an upload named without one is read by, from its first bytes: a gzip stream is a .nii.gz, NRRD
    and NIfTI-1 by their magic; anything else none, which the reader takes for a DICOM file (a PACS or a CD names
    them IM0001 or by UID) or refuses as not DICOM."""
    head = upload.file.read(348)
    upload.file.seek(0)
    if head[:2] == b"\x1f\x8b":
        return ".nii.gz"
    if head[:4] == b"NRRD":
        return ".nrrd"
    if head[344:348] == b"n+1\x00":
        return ".nii"
    return ""


def _remove(path: Optional[Path]) -> None:
    if path is not None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError:
            log.warning("could not remove the temporary file %s", path)


def _max_voxels() -> Optional[int]:
    """The largest voxel limit of the served models (``--conf max_voxels_<model>``, else ``max_voxels``, checked at
    start-up): an upload or a correction of a study that one of them denoises is taken; None when none is set."""
    from ..configs.conf import ConfError, model_voxel_limit

    conf = getattr(app(), "conf", None) or {}
    try:
        limits = [model_voxel_limit(conf, model) for model in getattr(app(), "_infers", None) or {}]
    except ConfError:  # refused at start-up: not reached on a running server
        return None
    if any(limit is None for limit in limits) or not limits:  # a model at the default limit (ADL_MAX_VOXELS)
        from ..imaging import max_voxels

        limits = [limit for limit in limits if limit is not None] + [max_voxels()]
    return max(limits)


def _checked_image(path: Path, what: str) -> tuple[int, ...]:
    """``path``'s size from its header after the reading checks; 422 (413 when too large) naming ``what``."""
    from ..imaging import ImageReadError
    from ..imaging.io import check_image_file

    try:
        return check_image_file(path, _max_voxels())
    except ImageReadError as error:
        message = str(error).replace(str(path), what)
        raise HTTPException(status_code=413 if "too large" in message else 422,
                            detail=f"cannot store {what}: {message}") from None


def _same_study(existing: str, uploaded: Path) -> bool:
    """Whether an upload holds the study stored at ``existing``: the same file, or the same voxels and geometry
    (spacing, origin, direction to 1e-5 mm / 1e-6)."""
    import numpy as np

    from ..imaging import ImageReadError, read_volume

    if not existing or not os.path.isfile(existing):
        return False
    if os.path.getsize(existing) == uploaded.stat().st_size and file_sha256(existing) == file_sha256(uploaded):
        return True
    try:
        a = read_volume(existing, fill_padding=False, max_voxels=_max_voxels())
        b = read_volume(uploaded, fill_padding=False, max_voxels=_max_voxels())
    except ImageReadError:
        return False
    return (a.array.shape == b.array.shape and np.allclose(a.spacing, b.spacing, rtol=0, atol=1e-5)
            and np.allclose(a.origin, b.origin, rtol=0, atol=1e-5)
            and np.allclose(a.direction, b.direction, rtol=0, atol=1e-6)
            and np.array_equal(a.array, b.array))


def _need_image(image: str) -> None:
    from ..activelearning import has_image

    if not has_image(app().datastore(), image):
        raise HTTPException(status_code=404, detail=f"no image {image!r} in the datastore")


def _need_label(image: str, tag: str) -> None:
    """404 unless ``image`` has a label of ``tag``: MONAI Label's label-info update answers 500 for a missing label
    (after its audit entry), and its label removal answers 200, recorded as the removal of a label that never
    was."""
    datastore = app().datastore()
    if tag not in (datastore.get_labels_by_image_id(image) or {}):
        raise HTTPException(status_code=404, detail=f"image {image!r} has no label of tag {tag!r}")


def _refuse_modality_below_admin(info: dict, parameter: str, user: Optional[User]) -> None:
    """403 when ``info`` sets ``modality`` and ``user`` is no admin: the image info's modality decides which model
    and modality a study's corrections fine-tune (:func:`lib.datastore.image_modality`) and where the
    review queue files it, so an annotator's ``"MR"`` on a CT study had its correction train the MR model. The
    server reads it from the image itself; an admin may still correct a wrong guess."""
    if "modality" in info and _ADMIN not in (getattr(user, "roles", None) or []):
        raise HTTPException(status_code=403, detail=(
            f"{parameter}.modality may be set by an admin only ({_ADMIN!r}): it decides which model a study's "
            "corrections fine-tune; the server reads it from the image"))


#: audit events of reads of patient data through the datastore, session and PACS-proxy routes (each written through
#: :func:`_recorded_read` before the answer); the review queue's hand-out is ``review_queue_handout``
IMAGE_DOWNLOADED = "image_downloaded"
LABEL_DOWNLOADED = "label_downloaded"
DATASET_DOWNLOADED = "dataset_downloaded"
SESSION_IMAGE_DOWNLOADED = "session_image_downloaded"
DICOMWEB_READ = "dicomweb_read"
#: a store into the PACS through the proxy (STOW-RS), written before it is forwarded (refused, 503, when it cannot
#: be), then its outcome: ``dicomweb_stored`` (the PACS answered with success) or ``dicomweb_store_failed``
DICOMWEB_STORING = "dicomweb_storing"
#: reads of a study's or a label's stored info, and of the datastore listing that holds every study's info: on a
#: PACS MONAI Label keeps each series' PatientID, StudyInstanceUID and StudyDate there, and clients may store any
#: keys with PUT .../info
IMAGE_INFO_READ = "image_info_read"
LABEL_INFO_READ = "label_info_read"
DATASTORE_LISTED = "datastore_listed"


def _recorded_read(event: str, fields: dict, refused: str) -> Optional[dict]:
    """Write the audit entry ``event`` of a read of patient data, ``fields`` and who asked
    (:func:`lib.audit.context.request_actor`), before the answer is returned: a read whose entry cannot be written
    is refused, 503 ``<refused>: the audit log could not be written (<why>)`` (:func:`.review.recorded_access`).
    Returns the entry; None on a server without an audit log (no setting makes one), which reads as MONAI Label
    does."""
    from ..audit.context import request_actor
    from .review import recorded_access

    audit = getattr(app(), "audit", None)
    if audit is None:
        return None
    actor = request_actor()
    return recorded_access(lambda: audit.append(event, {**fields, **actor}), refused,
                           f"{event} {fields} not given to {actor.get('user')} ({actor.get('client')})")


def _refuse_unrecordable(refused: str, about: str) -> None:
    """503 as :func:`_recorded_read` answers when the audit log would refuse an entry now
    (:meth:`lib.audit.AuditLog.check_appendable`), before a read's work (a PACS series retrieved, the datastore
    zipped); the entry written after the work still decides."""
    from .review import recorded_access

    audit = getattr(app(), "audit", None)
    if audit is not None:
        recorded_access(lambda: audit.check_appendable() or {}, refused, about)


def _refuse_stamp_keys(info: dict, parameter: str) -> None:
    from ..trainers import CORRECTION_KEYS

    forged = sorted(set(info) & set(CORRECTION_KEYS))
    if forged:
        raise HTTPException(status_code=422, detail=f"{parameter} may not set {', '.join(forged)}: the server "
                                                    "stamps corrections saved with PUT /datastore/label")


# ------------------------------------------------------------------------------------------------ info, task status
#: what the app's info shows of a training run to admins only: its scratch folder and its process
_TRAIN_STATS_INTERNAL = ("work_dir", "pid")
#: what MONAI Label's task status shows to admins only: the last lines the task's subprocess logged (the server's
#: folders, its configuration; the logs themselves are GET /logs/, admin only)
_TASK_STATUS_INTERNAL = ("details",)


@router.get("/info/", include_in_schema=False)
def guarded_app_info(request: Request, user: User = Depends(RBAC(_USER))):
    """MONAI Label's app info; below admin without the audit log's folder (``audit.dir``), a training run's
    ``work_dir`` and ``pid``, and with the server's paths cut from every text (a broken log's warning names it)."""
    from monailabel.endpoints.info import app_info

    info = app_info()
    if sees_internals(request):
        return info
    audit = info.get("audit")
    info = dict(info, audit={k: v for k, v in audit.items() if k != "dir"} if isinstance(audit, dict) else audit)
    return for_caller(request, info, internal_keys=_TRAIN_STATS_INTERNAL)


def _task_status(request: Request, kind: str, all: bool, check_if_running: bool):
    from monailabel.utils.async_tasks.task import AsyncTask

    answer, why = AsyncTask.status(kind, all, check_if_running)
    if answer is None:
        raise HTTPException(status_code=404, detail=why)
    return for_caller(request, answer, internal_keys=_TASK_STATUS_INTERNAL)


@router.get("/train/", include_in_schema=False)
def guarded_train_status(request: Request, all: bool = False, check_if_running: bool = False,
                         user: User = Depends(RBAC(_USER))):
    """MONAI Label's training status; below admin without the run's log lines (``details``)."""
    return _task_status(request, "train", all, check_if_running)


@router.get("/batch/infer", include_in_schema=False)
def guarded_batch_infer_status(request: Request, all: bool = False, check_if_running: bool = False,
                               user: User = Depends(RBAC(_USER))):
    """MONAI Label's batch-inference status; below admin without the run's log lines (``details``)."""
    return _task_status(request, "batch_infer", all, check_if_running)


@router.get("/scoring/", include_in_schema=False)
def guarded_scoring_status(request: Request, all: bool = False, check_if_running: bool = False,
                           user: User = Depends(RBAC(_USER))):
    """MONAI Label's scoring status; below admin without the run's log lines (``details``)."""
    return _task_status(request, "scoring", all, check_if_running)


# ------------------------------------------------------------------------------------------------ infer, train
@router.post("/infer/{model}", include_in_schema=False)
def guarded_infer(
    background_tasks: BackgroundTasks,
    model: str,
    image: str = "",
    session_id: str = "",
    params: str = Form("{}"),
    file: UploadFile = File(None),
    label: UploadFile = File(None),
    output: Optional[str] = None,
    user: User = Depends(RBAC(_USER)),
):
    """MONAI Label's ``run_inference``, after the checks of the module docstring; the uploaded file is removed
    whether the request succeeds or fails (the stock route leaves it behind on an error), and so is the result file
    when its answer cannot be made."""
    from monailabel.endpoints.infer import send_response

    from ..audit.recording import discard_result

    model_task("infer", model)
    if image:
        check_name(image, "image")
    if session_id:
        check_name(session_id, "session_id")
    if not file and not image and not session_id:
        raise HTTPException(status_code=422, detail="give an image: a datastore id, a session id or an uploaded file")
    if label:
        raise HTTPException(status_code=422, detail="label: the denoising models take no label input")
    if output is not None and output not in ("image", "json", "all"):
        raise HTTPException(status_code=422, detail=f"output must be image, json or all, got {output!r}")
    request_params = _json_object(params, "params")
    _check_infer_params(request_params)
    running = app()
    session = None
    if session_id and not file:
        if running.sessions() is None:
            raise HTTPException(status_code=406, detail="sessions are not enabled on this server")
        session = running.sessions().get_session(session_id)
        if session is None:
            raise HTTPException(status_code=404, detail=f"no session {session_id!r} (expired or never created)")
    if image and not file and session is None:
        _need_image(image)
    request: dict[str, Any] = {"model": model, "image": image}
    upload, result = None, None
    try:
        if file:
            upload = _save_upload(file, "".join(Path(file.filename or "").suffixes) or _sniffed_suffix(file))
            request["image"] = str(upload)
        request.update(running.info().get("config", {}).get("infer", {}))
        request.update(request_params)
        if session is not None:
            request["image"] = session.image
            request["session"] = session.to_json()
        result = running.infer(request)
        if result is None:
            raise HTTPException(status_code=500, detail="the inference produced no result")
        response = send_response(running.datastore(), result, output, background_tasks)
    except BaseException:
        _remove(upload)
        if result:  # no answer carries it: the background removal send_response queued never runs
            discard_result(result)
        raise
    if upload is not None:
        background_tasks.add_task(_remove, upload)
    return response


@router.post("/train/{model}", include_in_schema=False)
def guarded_train(model: str, params: Optional[dict] = None, run_sync: Optional[bool] = False,
                  enqueue: Optional[bool] = False, user: User = Depends(RBAC(_ADMIN))):
    """MONAI Label's ``run_model`` after :meth:`DenoiserTrainTask.validate_request`, one run at a time
    (:func:`_start_training`), the request an audit entry (``training_requested``, who asked) whose seq and user
    the run's weights entry names."""
    from ..audit import AuditError
    from ..audit.context import request_actor
    from ..trainers import TrainingDataError
    from .review import audit_http_error

    task = model_task("train", model)
    params = {k: v for k, v in (params or {}).items() if k not in TRAINING_REQUEST_KEYS}
    try:
        task.validate_request(dict(params), app().datastore())
    except TrainingDataError as error:  # a file that cannot be read is named, not the server's folders
        raise HTTPException(status_code=422, detail=scrub_paths(str(error))) from None
    # The run (a subprocess of its own, outside this request) publishes or rejects weights: its entries name the
    # admin who asked through this entry, whose seq and user travel with the request; a client's values of those
    # keys were dropped above.
    audit = app().audit
    fields = {"model": model, "params": params, "run_sync": bool(run_sync), "enqueue": bool(enqueue)}
    try:
        entry = audit.append("training_requested", {**fields, **request_actor()})
    except AuditError as error:
        raise audit_http_error(error, f"{model}: the training was not started") from None
    # the verified token's user, None with authentication off (MONAI Label's placeholder user is called "admin")
    params.update({"requested_by": entry["fields"].get("user"), "training_request_seq": entry["seq"]})
    try:
        return _start_training(model, params, bool(run_sync), bool(enqueue))
    except Exception as error:  # e.g. 429: another run is going on; the request entry must not stand alone
        try:
            audit.append("training_requested_failed", {**fields, "training_request_seq": entry["seq"],
                                                       "error": getattr(error, "detail", None) or str(error)})
        except AuditError:
            log.exception("could not record that the training request %s was not started", entry["seq"])
        raise


@router.post("/train/", include_in_schema=False)
def refused_train_all(user: User = Depends(RBAC(_ADMIN))):
    """Never handed on: MONAI Label's (deprecated) run-all route starts every model's run with none of the checks
    of ``POST /train/{model}`` (its request's data, one run at a time, the audit entry of who asked)."""
    trainers = ", ".join(sorted(getattr(app(), "_trainers", None) or {})) or "none"  # noqa: SLF001
    raise HTTPException(status_code=422, detail=f"train one model at a time: POST /train/{{model}} (this server "
                                                f"has: {trainers})")


def _training_going_on(queued_too: bool) -> Optional[str]:
    """What training is going on in this server (a run in MONAI Label's subprocess, or a synchronous run in the
    server itself; with ``queued_too`` also a subprocess run submitted but not started), or None."""
    from monailabel.utils.async_tasks.utils import processes, tasks

    if _sync_training.locked():
        return "a synchronous training run (run_sync) is going on in the server"
    if processes("train"):
        return "a training run is going on"
    if queued_too and any(task.get("status") == "SUBMITTED" for task in tasks("train")):
        return "a training run is waiting to start"
    return None


def _start_training(model: str, params: dict, run_sync: bool, enqueue: bool):
    """MONAI Label's ``run_model``, one fine-tune at a time: its own check sees only the runs of its subprocess,
    so a ``run_sync`` run and a subprocess run, or two synchronous runs, trained at once (each from the weights
    served at its start, publishing over the other). 429 while another run is going on; ``enqueue`` still queues
    subprocess runs behind a subprocess run. A ``run_sync`` run trains in the training subprocess too, the request
    waiting for it (:func:`_run_and_wait`): MONAI Label trains it in the server process, where ``DELETE /train/``
    cannot stop it."""
    from monailabel.endpoints.train import run_model

    with _train_start_lock:
        # subprocess runs queue one after the other (MONAI Label's executor has one worker): a synchronous run
        # cannot join that queue
        busy = _training_going_on(queued_too=run_sync)
        if busy is not None and (run_sync or not enqueue or _sync_training.locked()):
            raise HTTPException(status_code=429, detail=f"{model} not started: {busy}; wait for it to finish (GET "
                                                        "/train/) or stop it (DELETE /train/)")
        if not run_sync:
            return run_model(model, params, False, enqueue)
        _sync_training.acquire()
    try:
        return _run_and_wait(model, params)
    finally:
        _sync_training.release()


def _run_and_wait(model: str, params: dict) -> dict:
    """A ``run_sync`` run: MONAI Label's training subprocess, started as for any run and waited for in this
    request's thread, so that ``DELETE /train/`` stops it. Returns the run's status (``train_stats``); 409 when it
    was stopped, 500 with the run's error when it failed."""
    from monailabel.utils.async_tasks.utils import run_background_task

    task = run_background_task({"model": model, **params}, "train", debug=True)  # returns when the process ends
    stats = model_task("train", model).stats()
    if task.get("status") == "STOPPED":
        who = f" by {stats['stopped_by']}" if stats.get("stopped_by") else ""
        raise HTTPException(status_code=409, detail=f"{model}: the training run was stopped (DELETE /train/){who} "
                                                    f"before it finished; GET /versions/{model} shows what is served")
    if task.get("status") != "DONE":
        raise HTTPException(status_code=500, detail=f"{model}: the training run failed: "
                                                    f"{stats.get('error') or 'see the server log'}")
    return stats


@router.delete("/train/", include_in_schema=False)
def guarded_stop_training(user: User = Depends(RBAC(_ADMIN))):
    """MONAI Label's stop of the training run (a ``run_sync`` one too, :func:`_run_and_wait`), recorded: the audit
    entry ``training_stopping`` (who, which model and training request) is written before the run's process is
    killed (a stop whose entry cannot be written is refused), ``training_stopped`` once it is killed
    (``training_stopped_failed`` when it was not: it had ended by itself, or the kill failed), and the run's status
    then says it was stopped and by whom. Nothing going on: MONAI Label's answer
    (null)."""
    import psutil
    from monailabel.endpoints.train import stop
    from monailabel.utils.async_tasks.utils import processes, tasks

    from ..audit import AuditError
    from ..audit.context import request_actor
    from .review import audit_http_error

    with _train_start_lock:
        running = processes("train")
        if not running:
            return stop()
        task_id, process = next(iter(running.items()))  # the one MONAI Label's stop kills
        request = next((t.get("request") or {} for t in tasks("train") if t.get("id") == task_id), {})
        fields = {"model": request.get("model"), "pid": process.pid,
                  **{key: request.get(key) for key in TRAINING_REQUEST_KEYS}}
        audit, actor = app().audit, request_actor()
        try:
            pending = audit.append("training_stopping", {**fields, **actor})
        except AuditError as error:
            raise audit_http_error(error, "the training run was not stopped") from None
        try:
            answer = stop()
        except Exception as error:  # a run that ended by itself, or a stop that failed: it was not stopped
            ended = isinstance(error, psutil.NoSuchProcess)
            try:
                audit.append("training_stopped_failed", {**fields, "pending_seq": pending["seq"], "error": (
                    "the training run ended before it could be stopped" if ended
                    else f"{type(error).__name__}: {error}")})
            except AuditError:
                log.exception("could not record that the training run %s was not stopped", process.pid)
            if ended:  # nothing to kill
                return {"status": "ENDED", "detail": "the training run ended before it could be stopped"}
            raise
        try:  # once killed: a server killed before leaves the pending entry, never a stop that did not happen
            entry = audit.append("training_stopped", {**fields, **actor, "pending_seq": pending["seq"]})
        except AuditError:
            log.exception("the training run %s was stopped, but the entry confirming it could not be written; the "
                          "pending entry %s (training_stopping) names it", process.pid, pending["seq"])
            entry = pending
    try:
        process.wait(timeout=60)  # killed: gone at once (its status file and scratch folder are updated next)
    except Exception:  # noqa: BLE001 - a process that outlives SIGKILL: stats() notices it later
        log.warning("training process %s still running after it was killed", process.pid)
    _mark_stopped(request.get("model"), process.pid, entry)
    return answer


def _mark_stopped(model: Optional[str], pid: int, entry: dict) -> None:
    """The stopped run's status file says ``interrupted``, phase ``stopped (DELETE /train/)``, by whom
    (``stopped_by``, ``stop_seq``: the audit entry), and its scratch folder goes; only while the file is still that
    process's running status."""
    from ..runtime.atomic import atomic_write_json
    from ..runtime.clock import utc_timestamp
    from ..trainers.finetune import remove_stale_work

    task = (getattr(app(), "_trainers", None) or {}).get(model)  # noqa: SLF001
    if task is None or not hasattr(task, "status_path"):
        return
    try:
        status = json.loads(task.status_path.read_text(encoding="utf-8"))
        if status.get("status") != "running" or status.get("pid") != pid:
            return
        # "interrupted" as any run killed half way (clients wait for done, failed or interrupted)
        status.update(status="interrupted", phase="stopped (DELETE /train/)", finished_utc=utc_timestamp(),
                      stopped_by=entry["fields"].get("user"), stop_seq=entry["seq"])
        atomic_write_json(task.status_path, status)
        remove_stale_work(task.store.model_dir / "work")
    except (OSError, ValueError) as error:
        log.warning("could not mark the stopped %s run in its status file: %s", model, error)


# ------------------------------------------------------------------------------------------------ model files
_MODEL_FILES_REFUSED = (
    "the served weights are not uploaded, replaced or deleted here: they change only when a fine-tune that passed its "
    "checks publishes them (POST /train/{model}) or an admin rolls back to a version (POST "
    "/versions/{model}/restore; GET /versions/{model} lists them), each kept as a version and recorded in the audit "
    "trail; weights from elsewhere are placed in the model folder with the server stopped")


@router.put("/model/{model}", include_in_schema=False)
@router.delete("/model/{model}", include_in_schema=False)
def refused_model_file(model: str, request: Request, user: User = Depends(RBAC(_ADMIN))):
    """Never handed on: MONAI Label's routes would copy an upload over the served file (no check of the file, no
    version kept, no audit entry, the fine-tune's publication gates bypassed) or move it away; with this app's
    several files per model they answered 500 / 404."""
    raise HTTPException(status_code=405, detail=f"{request.method} /model/{model}: {_MODEL_FILES_REFUSED}",
                        headers={"Allow": "GET"})


def _served_weights(model: str, modality: Optional[str]):
    """(store, the :class:`lib.weights.store.WeightsVersion` that ``model`` serves for ``modality``): 404 for an
    unknown model, a classical one (no weight file) or a modality without weights; 422 for a modality the model
    does not serve, or none named where it serves several."""
    from ..infers.denoise import ClassicalInferTask

    task = model_task("infer", model)
    if isinstance(task, ClassicalInferTask):
        raise HTTPException(status_code=404, detail=f"{model} is a classical method ({task.method}): it has no "
                                                    "weight file")
    served_modalities = tuple(task.modalities)
    if modality is None or not str(modality).strip():
        if len(served_modalities) != 1:
            raise HTTPException(status_code=422, detail=(
                f"{model} serves {' and '.join(served_modalities)}, one weight file each: name one with "
                + " or ".join(f"?modality={m.lower()}" for m in served_modalities)))
        modality = served_modalities[0]
    modality = str(modality).strip().upper()
    if modality not in served_modalities:
        raise HTTPException(status_code=422, detail=f"{model} serves {', '.join(served_modalities)}, not "
                                                    f"{modality[:20]!r}")
    served = task.store.served(model, modality)
    if served is None:
        raise HTTPException(status_code=404, detail=f"{model} has no {modality} weights on this server: none "
                                                    "published and none shipped (GET /versions/{model} lists them)")
    return task.store, served


@router.get("/model/{model}", include_in_schema=False)
def served_model_file(model: str, modality: Optional[str] = None, user: User = Depends(RBAC(_ADMIN))):
    """The weight file ``model`` serves for ``modality`` now, as the server reads it: the published
    ``<model>_<modality>.pt`` or else the shipped ``pretrained_<model>_<modality>.pt`` (the stock route asked the
    infer task for a single file, which these tasks do not name, and answered 404 for every model). The headers
    name its version and SHA-256; the bytes sent are those hashed (a publication renaming a new file over it
    while it is read is read again). A published file may name the images it was fine-tuned on (files published
    before 2026-12-05): ``cli.py share-weights`` writes a copy to give away."""
    import hashlib

    from fastapi.responses import Response

    for _ in range(3):
        _, served = _served_weights(model, modality)
        try:
            content = served.path.read_bytes()
        except FileNotFoundError:  # renamed away between the look-up and the read: look again
            continue
        if hashlib.sha256(content).hexdigest() == served.sha256:
            return Response(content=content, media_type="application/octet-stream", headers={
                "Content-Disposition": f'attachment; filename="{served.path.name}"',
                "X-Weights-Version": served.version, "X-Weights-SHA256": served.sha256})
    raise HTTPException(status_code=503, detail=f"{model}: the served weight file changed while it was read (a "
                                                "publication or rollback going on): try again")


@router.get("/model/info/{model}", include_in_schema=False)
def served_model_info(model: str, modality: Optional[str] = None, user: User = Depends(RBAC(_ADMIN))):
    """What the stock route says of a model's file (``checksum``, ``modified_time``, the training status), for the
    weight file ``model`` serves for ``modality`` (see :func:`served_model_file`), with its version and name; the
    stock route answered 404 for every model."""
    from monailabel.utils.others.generic import file_checksum

    _, served = _served_weights(model, modality)
    task = (getattr(app(), "_trainers", None) or {}).get(model)  # noqa: SLF001 - MONAI Label keeps them private
    info = {"model": model, "modality": served.modality, "version": served.version, "file": served.path.name,
            "sha256": served.sha256, "checksum": file_checksum(served.path),
            "modified_time": int(served.path.stat().st_mtime)}
    stats = task.stats() if task is not None else None
    if stats:
        info["train_stats"] = stats
    return info


# ------------------------------------------------------------------------------------------------ images
@router.get("/datastore/", include_in_schema=False)
def guarded_datastore(request: Request, output: Optional[str] = None, user: User = Depends(RBAC(_USER))):
    """MONAI Label's datastore listing; below admin, its training list (``output=train``: each corrected image's and
    label's absolute file path on the server) names the files by their last part. The whole datastore
    (``output=all``: every study's and label's info) is one ``datastore_listed`` entry written before it is sent
    (503, nothing sent, when it cannot be written); the counts (``stats``, the default) and the training list
    (ids and file names) hold no info and write none."""
    from monailabel.endpoints.datastore import ResultType, datastore

    try:
        kind = ResultType(output) if output else None
    except ValueError:
        kinds = ", ".join(t.value for t in ResultType)
        raise HTTPException(status_code=422, detail=f"output must be one of {kinds}, got {output!r}") from None
    answer = datastore(kind)
    if kind == ResultType.all:  # every study's and label's info (patient identity on a PACS): on record first
        _recorded_read(DATASTORE_LISTED, {"output": kind.value}, "the datastore listing was not sent")
    return for_caller(request, answer) if kind == ResultType.train else answer


@router.put("/datastore/", include_in_schema=False)
@router.put("/datastore/image", include_in_schema=False)
def guarded_add_image(
    background_tasks: BackgroundTasks,
    image: Optional[str] = None,
    params: str = Form("{}"),
    file: UploadFile = File(...),
    user: User = Depends(RBAC(_ANNOTATOR)),
):
    """Store an uploaded study under a plain id (the file name's stem without ``image``); the same study again
    answers as the stored one, another study under a taken id is a 409."""
    _refuse_on_pacs("an upload would be kept in this server's cache, never listed, denoised or reviewed: store the "
                    "series in the PACS, or denoise the file itself with POST /infer/{model} (file upload)")
    suffix = _upload_suffix(file.filename, "file")
    image_id = image if image else os.path.basename(file.filename or "")[: -len(suffix)]
    check_name(image_id, "image")
    save_params = _json_object(params, "params")
    _refuse_modality_below_admin(save_params, "params", user)
    upload = _save_upload(file, suffix)
    try:
        _checked_image(upload, "the uploaded image")
        datastore = app().datastore()
        with _add_lock:
            if image_id in datastore.list_images():
                if _same_study(datastore.get_image_uri(image_id), upload):
                    log.info("upload of %s: same study as the stored one, kept as it is", image_id)
                    return {"image": image_id, "existing": True}
                raise HTTPException(status_code=409, detail=(
                    f"image id {image_id!r} is taken by a different study (other voxels or geometry); nothing was "
                    "replaced: upload it under another id (e.g. its SeriesInstanceUID or a content hash)"))
            save_params.pop("user", None)  # the token's user, never the body's
            if user and user.username:
                save_params["user"] = user.username
            return {"image": datastore.add_image(image_id, str(upload), save_params)}
    finally:
        _remove(upload)


@router.delete("/datastore/", include_in_schema=False)
@router.delete("/datastore/image", include_in_schema=False)
def guarded_remove_image(id: str, user: User = Depends(RBAC(_ADMIN))):
    from monailabel.endpoints.datastore import remove_image

    check_name(id, "id")
    _refuse_on_pacs("the series stays in the PACS, listed and denoised as before: remove it in the PACS itself")
    _need_image(id)
    return remove_image(id, user.username)


def _refuse_on_pacs(why: str) -> None:
    """422 on a DICOMweb datastore, where MONAI Label adds and removes studies in its local cache only (answering
    200 while the PACS's list of series, which is what the server serves, stays as it was)."""
    from ..pacs import is_dicomweb

    if is_dicomweb(app().datastore()):
        raise HTTPException(status_code=422, detail=f"this server's studies are the PACS's series: {why}")


@router.head("/datastore/image", include_in_schema=False)
def guarded_check_image(image: str, check_sum: Optional[str] = None, user: User = Depends(RBAC(_USER))):
    from monailabel.endpoints.datastore import download_image

    check_name(image, "image")
    return download_image(image, check_only=True, check_sum=check_sum)


@router.get("/datastore/image", include_in_schema=False)
def guarded_download_image(image: str, user: User = Depends(RBAC(_USER))):
    """MONAI Label's image download, one ``image_downloaded`` audit entry (who read which study) written once the
    file is found and before it is sent; 503 and nothing sent when the entry cannot be written. A PACS series whose
    cached download is not the series the PACS lists now (moved to another patient or study) is downloaded anew
    (:func:`lib.pacs_corrections.refresh_moved_series`): it was sent from the old download until the cache was
    emptied by hand. A cached series the PACS no longer lists (404) or lists under several studies or patients (409)
    is not sent (its old download was)."""
    from monailabel.endpoints.datastore import download_image

    from ..pacs_corrections import refresh_moved_series

    check_name(image, "image")
    _refuse_unrecordable("the image was not sent", f"image {image}")  # before a PACS series is retrieved
    refresh_moved_series(app().datastore(), image, "the image was not sent")
    answer = download_image(image)  # 404 for an image that is not there: nothing read, nothing recorded
    _recorded_read(IMAGE_DOWNLOADED, {"image": image}, "the image was not sent")
    return answer


@router.get("/datastore/image/info", include_in_schema=False)
def guarded_get_image_info(image: str, user: User = Depends(RBAC(_USER))):
    """MONAI Label's image info without ``path``; one ``image_info_read`` entry per request that finds the study,
    written before the answer (503, nothing sent, when it cannot be written). An id that is not there answers
    ``{}``: nothing read, nothing recorded. A cached PACS series the PACS moved to another patient or study is
    downloaded anew first (:func:`lib.pacs_corrections.refresh_moved_series`: its info named the old patient until
    the series was opened, and a client confirms a correction with it); 404 / 409 for a cached series the PACS no
    longer lists, or lists under several identities. With ``MONAI_LABEL_DICOMWEB_CONVERT_TO_NIFTI=false`` (MONAI
    Label records no info then: it answered ``{}``) a downloaded series' info is read from its download's header
    (:func:`lib.pacs_corrections.unconverted_series_info`): it names the series' PatientID and StudyInstanceUID,
    which a client confirms a correction or verdict with once the PACS moved the series (it had none to confirm:
    every one was a 409)."""
    from monailabel.endpoints.datastore import get_image_info

    from ..pacs_corrections import refresh_moved_series, unconverted_series_info

    check_name(image, "image")
    datastore = app().datastore()
    if refresh_moved_series(datastore, image, "its info was not sent"):
        datastore.get_image_uri(image)  # downloaded (bounded) and converted anew: the info of the series of now
    answer = _without_path(get_image_info(image)) or unconverted_series_info(datastore, image)
    if answer:
        _recorded_read(IMAGE_INFO_READ, {"image": image}, "the image's info was not sent")
    return answer


def _without_path(answer: Any) -> Any:
    """``answer`` without the ``path`` MONAI Label adds (the server's absolute file path): clients download a
    study by its id (``GET /datastore/image?image=``), and a client that loaded the path when its own disk has a
    file there (MONAI Label's Slicer module does) would open whatever that file is."""
    if isinstance(answer, dict):
        return {key: value for key, value in answer.items() if key != "path"}
    return answer


# ------------------------------------------------------------------------------------------------ active learning
@router.post("/activelearning/{strategy}", include_in_schema=False)
def guarded_sample(strategy: str, params: Optional[dict] = None, user: User = Depends(RBAC(_USER))):
    """MONAI Label's active-learning route (the next study of ``strategy``): its answer without ``path``
    (:func:`_without_path`); ``id`` names the study. When the review queue hands out none but skipped series too large
    to review here or that it could not download, the answer (no ``id``) lists them
    (:data:`lib.activelearning.review.QUEUE_LEFT`), where MONAI Label answered ``{}``, as for an empty queue. A study
    handed out is one ``review_queue_handout`` audit entry (:func:`lib.activelearning.record_handout`), written before
    the answer and before the stock route's note of it in the image's info, which is not an entry of its own
    (:func:`lib.audit.recording.handing_out`). A hand-out whose entry cannot be written is refused (503,
    :func:`.review.recorded_access`) and leaves no note: the study is handed out to the next request once the log takes
    entries again."""
    from monailabel.endpoints.activelearning import sample

    from ..activelearning import record_handout
    from ..activelearning.review import QUEUE_LEFT
    from ..audit.recording import handing_out
    from .review import recorded_access

    strategies = getattr(app(), "_strategies", None) or {}  # noqa: SLF001 - MONAI Label keeps them private
    if strategy not in strategies:  # the stock route answers 500
        raise HTTPException(status_code=404, detail=f"unknown strategy {strategy!r} (this server has: "
                                                    f"{', '.join(sorted(strategies)) or 'none'})")
    _refuse_unrecordable("no study was handed out for review", f"review queue: {strategy} for {user.username}")
    token = QUEUE_LEFT.set(None)
    try:
        with handing_out() as handout:
            answer = _without_path(sample(strategy, params, user.username))
        left = QUEUE_LEFT.get()
    finally:
        QUEUE_LEFT.reset(token)
    audit = getattr(app(), "audit", None)
    if isinstance(answer, dict) and answer.get("id"):
        if audit is not None:  # a server without an audit log hands out as MONAI Label does
            recorded_access(lambda: record_handout(audit, answer["id"], strategy, params or {}, answer),
                            "no study was handed out for review",
                            f"review queue: {answer['id']} not handed out to {user.username}")
        handout.keep_notes()
    return answer if answer or left is None else left


@router.put("/datastore/image/info", include_in_schema=False)
def guarded_put_image_info(image: str, info: str = Form("{}"), user: User = Depends(RBAC(_ANNOTATOR))):
    from monailabel.endpoints.datastore import update_image_info

    check_name(image, "image")
    _refuse_modality_below_admin(_json_object(info, "info"), "info", user)
    _need_image(image)
    _need_cached_series(image)
    return update_image_info(image, info, user.username)


def _need_cached_series(image: str) -> None:
    """409 for a PACS series not in the server's local cache: its info is kept there (MONAI Label adds a series
    once it is downloaded and converted to NIfTI), and the stock update answered a bare 500."""
    from ..pacs import cached_images, is_dicomweb

    datastore = app().datastore()
    if is_dicomweb(datastore) and image not in cached_images(datastore):
        raise HTTPException(status_code=409, detail=(
            f"series {image} has no info on this server yet: a PACS series' info is kept in the server's local "
            "cache, which holds a series once it has been denoised or handed out for review (never with "
            "MONAI_LABEL_DICOMWEB_CONVERT_TO_NIFTI=false); nothing was changed"))


# ------------------------------------------------------------------------------------------------ labels
@router.put("/datastore/label", include_in_schema=False)
def guarded_save_label(
    background_tasks: BackgroundTasks,
    image: str,
    params: str = Form("{}"),
    tag: str = "final",
    label: UploadFile = File(...),
    user: User = Depends(RBAC(_ANNOTATOR)),
):
    """MONAI Label's save-label route for a checked upload: an intact image; a ``final`` correction on its
    image's grid; a ``regions`` map validated against its image and ``params`` (422 naming the image and the
    problem: not on the image's grid, undeclared values, unknown intent, strength outside [0, 2]). The label's
    info is ``params`` plus the server's correction stamp (on a PACS also the series' identity as the PACS lists it
    now, :func:`lib.pacs_corrections.correction_binding`; the label is kept on the server, never sent to the PACS).
    On a PACS, 409 and nothing saved for a series this server stored (a denoised result), one listed in several
    studies or patients, or one whose download here has another study or patient than the PACS lists now; 404 for
    a series the PACS no longer lists. ``params`` ``patient_id`` and ``study_instance_uid`` (not kept in the info):
    the patient and study of the series as the client opened it (its image info's PatientID and
    StudyInstanceUID); required (409 without them, or with another identity than the PACS lists now) once this
    server downloaded the series anew because the PACS moved it (a correction drawn before was the old patient's
    record: it was saved for the new one). The checks and the save hold the series' refresh lock
    (:func:`lib.pacs_corrections.series_refresh_locked`), one PACS search serving every check; nothing is downloaded
    under it: a download a refresh removed before the lock was taken is a 409 saying to open the series again. A disk
    too full to keep the label is a 507 (it was a bare 500): nothing of it kept, the label saved before left as it
    was."""
    from ..activelearning import refuse_unreviewable
    from ..data.regions import REGIONS_TAG, RegionsError, load_correction_regions
    from ..pacs import disk_full
    from ..pacs_corrections import (confirmed_identity, correction_binding, one_search_per_series,
                                    series_refresh_locked)
    from ..trainers import CORRECTION_KEYS, correction_stamp

    check_name(image, "image")
    tag = check_name(tag or "final", "tag")
    save_params = _json_object(params, "params")
    try:  # the identity the client drew on: checked, never kept as the label's params
        confirmed = confirmed_identity(save_params, "params")
    except ValueError as error:
        raise HTTPException(status_code=422, detail=str(error)) from None
    _need_image(image)
    datastore = app().datastore()
    try:  # a PACS series this server stored (a result), or a UID of several series: no correction of a study
        refuse_unreviewable(app().audit, datastore, image)
    except ValueError as error:
        raise HTTPException(status_code=409, detail=f"{error}; nothing was saved") from None
    upload = _save_upload(label, _upload_suffix(label.filename, "label"))
    try:
        _checked_image(upload, "the uploaded label")
        if tag == "final":
            upload = _on_image_grid(upload, image, datastore.get_image_uri(image) or "")
            _refuse_values_not_of_the_image(upload, image, datastore.get_image_uri(image) or "")
        if tag == REGIONS_TAG:
            try:
                load_correction_regions(image, datastore.get_image_uri(image), upload, params, _max_voxels())
            except RegionsError as error:
                raise HTTPException(status_code=422, detail=str(error)) from None
        # a PACS series: the refresh's lock held from the checks to the save (across processes), so that another
        # request re-downloading the moved series never records the move, nor replaces the download checked,
        # between them (the save then bound a correction drawn before the move to the identity checked). The series'
        # reads and infers wait for it: one PACS search serves every check (the binding's, the region map's), and
        # the binding runs first, refusing a download a refresh removed before the lock was taken (409: open the
        # series again), so that nothing under it downloads or converts the series (the stamp's image read below)
        with series_refresh_locked(datastore, image), one_search_per_series():
            binding = correction_binding(datastore, image, confirmed)  # a PACS series: its series, study, patient
            stamp = correction_stamp(upload, user.username if user else None, datastore.get_image_uri(image))
            stamp.update(binding)
            save_params.pop("user", None)  # who saved it is the token's user (the stamp's saved_by), never the body's
            if user and user.username:
                stamp["user"] = user.username
            if tag == "final":
                stamp["regions_sha256"] = _regions_sent_with(image, save_params.pop("regions_sha256", None))
            for key in CORRECTION_KEYS:  # the server's stamp alone: a client's value of a key it does not set: dropped
                save_params.pop(key, None)
            save_params.update(stamp)
            try:
                label_id = datastore.save_label(image, str(upload), tag, save_params)
            except OSError as error:
                if not disk_full(error):  # ENOSPC or EDQUOT, wrapped or not
                    raise
                log.error("PUT /datastore/label %s (%s): the label did not fit on the disk: %s", image, tag, error)
                raise HTTPException(status_code=507, detail=(
                    f"the {tag} label of {image} was not saved: the disk where this server keeps labels is full (no "
                    "space left); nothing of it was kept and the label saved before (if any) is unchanged: free some "
                    "space there and send it again")) from None
        answer = app().on_save_label(image, label_id) or {}
        answer.update({"image": image, "label": label_id})
        return answer
    finally:
        _remove(upload)


def _on_image_grid(upload: Path, image: str, image_uri: str) -> Path:
    """The uploaded correction of ``image`` on the image's grid: the upload itself when it is on it; a new file
    with its voxels in the image's order when it holds the same voxel centres in another index order (a tool that
    keeps the index-to-RAS matrix right-handed saves a left-handed grid reversed; the upload is removed); 422
    naming both grids when it holds other voxel centres (shape, spacing, origin or direction), which training would
    otherwise pair voxel by voxel with the wrong anatomy. A DICOM study (a folder of DICOM files) is compared with
    the grid the app reads from its files."""
    import numpy as np

    from ..imaging import ImageReadError, Volume, read_volume, write_volume
    from ..imaging.io import read_grid

    if not image_uri or not os.path.exists(image_uri):
        return upload
    try:
        image_grid = read_grid(image_uri, _max_voxels())
        upload_grid = read_grid(upload, _max_voxels())
    except ImageReadError as error:
        raise HTTPException(status_code=422, detail=f"cannot compare the correction with image {image!r}: "
                                                    f"{str(error).replace(str(upload), 'the upload')}") from None
    flips = upload_grid.flips_onto(image_grid)
    if flips is None:
        raise HTTPException(status_code=422, detail=(
            f"the correction of image {image!r} is not on its grid: the upload has {upload_grid.describe()}; the "
            f"image has {image_grid.describe()}; save it on the image's grid"))
    if not flips:
        return upload
    label = read_volume(upload, modality="OT", fill_padding=False, max_voxels=_max_voxels())
    aligned = Volume(np.ascontiguousarray(np.flip(label.array, axis=flips)), image_grid.spacing, image_grid.origin,
                     image_grid.direction, "OT", source_dtype=label.source_dtype)
    fd, name = tempfile.mkstemp(suffix=".nii.gz")
    os.close(fd)
    os.unlink(name)  # the writer refuses to replace a file it did not make
    try:
        write_volume(aligned, name)
    except BaseException:
        _remove(Path(name))
        raise
    log.info("correction of %s: the upload's axes %s reversed onto the image's grid", image, flips)
    _remove(upload)
    return Path(name)


#: a correction's values against its image's, by least squares on a sample: a denoised volume follows them with a
#: slope near 1 and no offset; a segmentation, probabilities or an 8-bit export do not (slope near 0, or offset)
CORRECTION_SLOPE_RANGE = (0.5, 2.0)
CORRECTION_MAX_OFFSET = 0.1  # of the image's 1st-99th percentile range
_VALUE_SAMPLES = 1_000_000


def _refuse_values_not_of_the_image(upload: Path, image: str, image_uri: str) -> None:
    """422 when the ``final`` correction (on the image's grid) does not hold a denoised version of the image's
    values: a segmentation saved as ``final`` (MONAI Label's own clients save their label maps under that tag),
    probabilities, or the volume in other units (8-bit, stored values without the rescale) was stamped as a
    clinician's correction and trained on as the target intensities. Judged on the whole volume (a median offset,
    a least-squares slope), which local edits of a real correction do not move."""
    import numpy as np

    from ..imaging import ImageReadError, read_volume

    if not image_uri or not os.path.exists(image_uri):
        return
    try:
        study = read_volume(image_uri, fill_padding=False, max_voxels=_max_voxels()).array
        label = read_volume(upload, modality="OT", fill_padding=False, max_voxels=_max_voxels()).array
    except ImageReadError as error:
        raise HTTPException(status_code=422, detail=f"cannot compare the correction with image {image!r}: "
                                                    f"{str(error).replace(str(upload), 'the upload')}") from None
    if study.shape != label.shape:  # _on_image_grid has put it on the grid: nothing to compare otherwise
        return
    step = max(1, study.size // _VALUE_SAMPLES)
    x = study.reshape(-1)[::step].astype(np.float64)
    y = label.reshape(-1)[::step].astype(np.float64)
    finite = np.isfinite(x) & np.isfinite(y)
    x, y = x[finite], y[finite]
    if x.size < 2:
        return
    low, high = np.percentile(x, [1, 99])
    spread = float(high - low)
    variance = float(np.var(x))
    if spread <= 0 or variance <= 0:
        return
    slope = float(np.mean((x - x.mean()) * (y - y.mean())) / variance)
    offset = float(np.median(y - x))
    low_slope, high_slope = CORRECTION_SLOPE_RANGE
    if low_slope <= slope <= high_slope and abs(offset) <= CORRECTION_MAX_OFFSET * spread:
        return
    distinct = np.unique(y[: 100_000]).size
    kind = (f"it holds {distinct} distinct values: a segmentation or label map?" if distinct <= 16
            else "a segmentation, probabilities, or the volume in other units (8-bit, stored values)?")
    raise HTTPException(status_code=422, detail=(
        f"the correction of image {image!r} does not hold that image's values: they follow the image's with slope "
        f"{slope:.3g} and offset {offset:.4g} (a corrected denoised volume: slope about 1, offset about 0, on the "
        f"image's range of {spread:.4g}); {kind} Save the corrected volume in the image's own units (CT: HU)"))


def _regions_sent_with(image: str, regions_sha256: Any) -> Optional[str]:
    """The SHA-256 of the region map a correction is sent with (the client sends the map first, then the
    correction with ``params.regions_sha256``); 422 when no such map is stored for the image. None without one:
    a correction sent without regions is then trained without any (an earlier correction's map is not reused)."""
    from ..data.regions import REGIONS_TAG
    from ..trainers import stored_regions

    if regions_sha256 in (None, ""):
        return None
    path, _ = stored_regions(app().datastore(), image, regions_sha256)
    if path is None:
        raise HTTPException(status_code=422, detail=(
            f"params.regions_sha256: no region map with that SHA-256 is stored for image {image!r}; send the "
            f"regions (tag {REGIONS_TAG!r}) again, then the correction"))
    return str(regions_sha256)


@router.delete("/datastore/label", include_in_schema=False)
def guarded_remove_label(id: str, tag: str, user: User = Depends(RBAC(_ADMIN))):
    from monailabel.endpoints.datastore import remove_label

    check_name(id, "id")
    check_name(tag, "tag")
    _need_label(id, tag)
    return remove_label(id, tag, user.username)


@router.api_route("/datastore/label", methods=["GET", "HEAD"], include_in_schema=False)
def guarded_download_label(request: Request, tag: str, label: Optional[str] = None, image: Optional[str] = None,
                           user: User = Depends(RBAC(_USER))):
    """MONAI Label's label download (a correction, a region map), one ``label_downloaded`` entry written before it
    is sent; 503 and nothing sent when the entry cannot be written. ``HEAD`` is the same request without the body:
    the same refusals, the same entry (its ``route`` says HEAD; on a PACS the series is retrieved all the same). The
    stock ``HEAD`` route named the label ``image`` (kept for its clients) and checked nothing: a PACS series was
    retrieved unrecorded, also with the log refusing entries. On a PACS a ``final`` label must be a DICOM SEG series
    of it (:func:`lib.pacs.final_label_problem`, asked before anything is retrieved): 404 saying what the series is
    otherwise (MONAI Label downloaded an image series into its label cache, then answered a bare 500); a SEG is
    answered as its label volume, converted once into the cache (:func:`lib.pacs_seg.seg_label_uri`; the series is
    searched once for the check, the SEG's modality and its identity, which its downloaded file must name too), sent
    from the conversion of the content its read checked, opened before the answer (:func:`lib.pacs_seg.
    open_seg_label`: another read's conversion is never sent in its place). A label this
    server keeps of a PACS series (:mod:`lib.pacs_corrections`) is sent only while the PACS lists the series under
    the study and patient it was saved for (409 naming what changed, 404 when the PACS no longer lists it, 503 when
    the PACS cannot be reached, 504 when it does not answer in time: nothing sent, no entry; asked before the file is
    opened), from its file opened under the label's lock (a correction saved again meanwhile does not remove it from
    under the answer: it was a 500)."""
    from monailabel.endpoints.datastore import download_label

    from ..pacs import final_label_problem, is_dicomweb
    from ..pacs_corrections import one_search_per_series
    from ..pacs_seg import SEG_LABEL_SUFFIX, open_seg_label

    if label is not None and image is not None and label != image:
        raise HTTPException(status_code=422, detail="give the label as label (or image, as MONAI Label's HEAD "
                                                    f"route names it), not both: {label!r} and {image!r}")
    name = label if label is not None else image
    if name is None:
        raise HTTPException(status_code=422, detail="label is required: the id of the label to download")
    check_name(name, "label")
    check_name(tag, "tag")
    _refuse_unrecordable("the label was not sent", f"label {name} ({tag})")
    datastore = app().datastore()
    with one_search_per_series():  # the series' check, its modality and a SEG's identity: one search of the PACS
        open_kept = getattr(datastore, "open_checked_label", None)  # a PACS series' label kept on this server
        opened = open_kept(name, tag) if open_kept is not None else None
        if opened is not None:
            handle = opened[0]
            try:
                _recorded_read(LABEL_DOWNLOADED, {"image": name, "tag": tag}, "the label was not sent")
            except BaseException:
                handle.close()
                raise
            return _open_file_answer(handle, request.method == "HEAD")
        if tag == "final":
            problem = final_label_problem(datastore, name)
            if problem:
                raise HTTPException(status_code=404, detail=problem)
            if is_dicomweb(datastore) and getattr(datastore, "_convert_to_nifti", True):  # a SEG's label volume
                handle = open_seg_label(datastore, name)  # the file its read checked, opened before it is sent
                if handle is None:
                    raise HTTPException(status_code=404, detail="Label NOT Found")
                try:
                    _recorded_read(LABEL_DOWNLOADED, {"image": name, "tag": tag}, "the label was not sent")
                except BaseException:
                    handle.close()
                    raise
                return _open_file_answer(handle, request.method == "HEAD", f"{name}{SEG_LABEL_SUFFIX}")
        answer = download_label(name, tag)
    _recorded_read(LABEL_DOWNLOADED, {"image": name, "tag": tag}, "the label was not sent")
    return answer


def _open_file_answer(handle, head: bool, name: Optional[str] = None):
    """The answer sending the open file ``handle`` (read from where it is open, closed once sent or dropped), as
    MONAI Label's ``FileResponse`` sends a label: its type, length and file name (``name``, else the file's own);
    no body for ``HEAD``."""
    from urllib.parse import quote

    from monailabel.utils.others.generic import get_mime_type
    from starlette.responses import Response, StreamingResponse

    name = name or os.path.basename(handle.name)
    headers = {"content-length": str(os.fstat(handle.fileno()).st_size),
               "content-disposition": f"attachment; filename*=utf-8''{quote(name)}"
               if quote(name) != name else f'attachment; filename="{name}"'}
    if head:
        handle.close()
        return Response(media_type=get_mime_type(name), headers=headers)

    def chunks():
        with handle:
            while True:
                chunk = handle.read(1 << 20)
                if not chunk:
                    return
                yield chunk

    return StreamingResponse(chunks(), media_type=get_mime_type(name), headers=headers)


@router.get("/datastore/dataset", include_in_schema=False)
def guarded_download_dataset(limit_cases: Optional[int] = None, user: User = Depends(RBAC(_ANNOTATOR))):
    """MONAI Label's whole datastore as one ZIP (:func:`dataset_archive`), one ``dataset_downloaded`` entry written
    before it is sent; 503 and nothing sent when the entry cannot be written (refused before zipping when the log
    refuses entries already). The ZIP is written in a temp folder of the request's own, deleted whatever happens:
    sent, refused, cut short (a client gone mid-send) or failed half-way (MONAI Label's left its ZIP, whole or
    not, in the temp folder). One that does not fit in the temp folder's disk (no space left or a disk quota spent,
    :func:`lib.pacs.disk_full`) is a 507 Insufficient Storage (the server's disk, not the request, is at fault; it
    was a bare 500)."""
    from ..pacs import disk_full

    _refuse_unrecordable("the dataset was not sent", "the dataset")  # before every study is zipped
    folder = tempfile.mkdtemp(prefix="adl-dataset-")
    try:
        path = dataset_archive(app().datastore(), limit_cases, Path(folder))
        _recorded_read(DATASET_DOWNLOADED, {"limit_cases": limit_cases}, "the dataset was not sent")
    except OSError as error:
        shutil.rmtree(folder, ignore_errors=True)
        if not disk_full(error):  # ENOSPC or EDQUOT, wrapped or not
            raise
        log.error("GET /datastore/dataset: the dataset's ZIP did not fit in the temp folder: %s", error)
        raise HTTPException(status_code=507, detail="the dataset was not sent: its ZIP does not fit on the disk of "
                                                    "the server's temp folder (TMPDIR; no space left); nothing "
                                                    "was kept (limit_cases sends fewer studies)") from None
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return _FolderDeletedOnceSent(str(path), folder, media_type="application/zip", filename="dataset.zip")


def dataset_archive(datastore, limit_cases: Optional[int], folder: Path) -> Path:
    """``folder / "dataset.zip"``: what MONAI Label's ``get_dataset_archive`` zips (each study with a final label,
    ``image/`` and ``label/``, the first ``limit_cases`` of them, and the datastore's ``metadata.json``), written
    where the caller deletes it (the stock one writes a temp file it never deletes, nor when it fails half-way).
    404 when no study has a final label (the stock one fails an assertion, a bare 500); 409 when a listed file was
    replaced or removed before it was zipped (a correction saved again: try again). On a PACS the corrections kept
    here are those whose series the PACS still lists under the study and patient they were saved for
    (:meth:`lib.pacs_corrections.ServerKeptLabelsMixin.datalist`)."""
    pairs = datastore.datalist()
    if not pairs:
        raise HTTPException(status_code=404, detail="ZIP archive NOT Found: no study has a final label")
    if limit_cases and limit_cases in range(1, len(pairs)):
        pairs = pairs[:limit_cases]
    path = folder / "dataset.zip"
    with zipfile.ZipFile(path, mode="x") as archive:
        for pair in pairs:
            for key, file in pair.items():
                try:
                    archive.write(file, arcname=os.path.join(key, os.path.basename(file)))
                except FileNotFoundError:  # a correction saved again or removed since it was listed
                    raise HTTPException(status_code=409, detail=(
                        f"the dataset was not sent: the {key} {os.path.basename(file)} was replaced or removed while "
                        "the dataset was zipped; try again")) from None
        archive.writestr("metadata.json", json.dumps(datastore.json(), default=str))
    return path


class _FolderDeletedOnceSent(FileResponse):
    """A file response whose ``folder`` (the file's) is deleted once the response ends, however it ends: sent,
    or the client gone mid-send (a cancelled or failed send skips a background task)."""

    def __init__(self, path: str, folder: str, **kwargs: Any) -> None:
        super().__init__(path, **kwargs)
        self.folder = folder

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)


@router.get("/datastore/label/info", include_in_schema=False)
def guarded_get_label_info(label: str, tag: str, user: User = Depends(RBAC(_USER))):
    """MONAI Label's label info; one ``label_info_read`` entry per request that finds the label, written before the
    answer (503, nothing sent, when it cannot be written); none for a label that is not there (``{}``)."""
    from monailabel.endpoints.datastore import get_label_info

    check_name(label, "label")
    check_name(tag, "tag")
    answer = get_label_info(label, tag)
    if answer:
        _recorded_read(LABEL_INFO_READ, {"image": label, "tag": tag}, "the label's info was not sent")
    return answer


@router.put("/datastore/label/info", include_in_schema=False)
def guarded_put_label_info(label: str, tag: str, info: str = Form("{}"), user: User = Depends(RBAC(_ANNOTATOR))):
    from monailabel.endpoints.datastore import update_label_info

    check_name(label, "label")
    check_name(tag, "tag")
    _need_label(label, tag)
    _refuse_stamp_keys(_json_object(info, "info"), "info")
    with _kept_label_checked(label, tag):
        return update_label_info(label, tag, info, user.username)


@router.put("/datastore/updatelabelinfo", include_in_schema=False)
def guarded_update_label_info(label: str, tag: str, params: str = Form("{}"),
                              user: User = Depends(RBAC(_ANNOTATOR))):
    from monailabel.endpoints.datastore import update_label_info

    check_name(label, "label")
    check_name(tag, "tag")
    _need_label(label, tag)
    _refuse_stamp_keys(_json_object(params, "params"), "params")
    with _kept_label_checked(label, tag):
        return update_label_info(label, tag, params, user.username)


@contextlib.contextmanager
def _kept_label_checked(label: str, tag: str) -> Iterator[None]:
    """Within it, a label info update of a correction kept of a PACS series that is not its series' any more
    (:meth:`lib.pacs_corrections.ServerKeptLabelsMixin.checked_label`: moved to another study or patient, listed in
    several, gone) is refused before anything is written or recorded (409 / 404 naming what changed, the app's
    handler of :class:`lib.pacs_corrections.CorrectionNotServed`): it was updated as if still that series'. The
    series is searched once for the check and the update's own."""
    from ..pacs_corrections import one_search_per_series

    datastore = app().datastore()
    with one_search_per_series():
        checked = getattr(datastore, "checked_label", None)
        if checked is not None:
            checked(label, tag, "its info was not changed")
        yield


# ------------------------------------------------------------------------------------------------ sessions
@router.put("/session/", include_in_schema=False)
def guarded_create_session(
    uncompress: bool = False,
    expiry: int = 0,
    files: List[UploadFile] = File(...),
    user: User = Depends(RBAC(_USER)),
):
    """MONAI Label's session create, done here so that a failed one leaves nothing: the stock route left its upload
    folder (the patient's volume) in the server's temp folder when the upload or the session's save failed, and a
    half-copied session in the session store."""
    import uuid

    from ..pacs import disk_full

    if uncompress:
        raise HTTPException(status_code=422, detail="uncompress is not accepted: upload the volume file itself "
                                                    "(archives could unpack outside the session folder)")
    sessions = app().sessions()
    if sessions is None:
        raise HTTPException(status_code=406, detail="sessions are not enabled on this server")
    session_id = str(uuid.uuid1()).lower()  # MONAI Label's kind of id, chosen here to remove a half-saved session
    received: Optional[Path] = None
    try:
        received = Path(tempfile.mkdtemp(prefix="session_upload_"))
        names = _session_file_names([upload.filename for upload in files])
        for upload, name in zip(files, names):
            image = received / name
            try:
                with open(image, "wb") as handle:
                    shutil.copyfileobj(upload.file, handle)
            except OSError as error:
                if error.errno == errno.ENAMETOOLONG:
                    raise HTTPException(status_code=422, detail=(
                        f"files: the file name {name[:60]!r}... is too long ({len(os.fsencode(name))} bytes; the "
                        "server's disk takes 255 at most): rename the file and send it again")) from None
                raise
        # several files: the folder of them is the session's image (MONAI Label's choice: a DICOM series)
        _, info = sessions.add_session(str(image if len(files) == 1 else received), expiry, False,
                                       session_id=session_id)
    except BaseException as error:
        sessions.remove_session(session_id)
        if isinstance(error, OSError):
            full = disk_full(error)
            log.error("PUT /session/: the session was not created: %s", error)
            raise HTTPException(status_code=507 if full else 500, detail=(
                "the session was not created: " + (
                    "the server's disk is full (no space left)" if full else
                    f"its volume could not be saved on the server ({error.strerror or type(error).__name__})")
                + "; nothing of it was kept")) from None
        raise
    finally:
        if received is not None:
            shutil.rmtree(received, ignore_errors=True)  # moved into the session store when it was saved
    log.info("session %s created", session_id)
    return {"session_id": session_id, "session_info": _session_info(info.to_json())}


#: the file MONAI Label's session store keeps a session's info in, in the session's folder (``Sessions``)
_SESSION_META_FILE = "meta.info"


def _session_file_names(given: List[Optional[str]]) -> List[str]:
    """The names the files of a ``PUT /session/`` are saved under: each file's own name (its last part), but a
    unique ``upload_N`` name, its suffix kept, for a file with no name, one named ``.`` / ``..``, one named like an
    earlier file of the request (it would overwrite that one), and ``meta.info`` (the session store's info file, in
    the same folder: the volume was overwritten by it, and its image download then sent the info, the server's
    folder in it). 422 for a name holding a NUL (no file can be named so)."""
    names: List[str] = []
    own = [os.path.basename((filename or "").rstrip("/")) for filename in given]
    for number, name in enumerate(own, start=1):
        if "\x00" in name:
            raise HTTPException(status_code=422, detail=(
                f"files: the file name {name[:60]!r} is not valid (it holds a NUL character): rename the file "
                "and send it again"))
        if name in ("", ".", "..", _SESSION_META_FILE) or name in names:
            suffix = "".join(Path(name).suffixes) if name not in ("", ".", "..") else ""
            candidate, extra = f"upload_{number}{suffix}", number
            while candidate in names or candidate in own:
                extra += len(given)
                candidate = f"upload_{extra}{suffix}"
            name = candidate
        names.append(name)
    return names


def _session_info(info: dict) -> dict:
    """A session's info with its ``path`` and ``image`` (the server's folder and file) cut to their last part: a
    session is used by its id (``?session_id=``), its image downloaded with ``GET /session/{id}?image=true``."""
    return {key: (os.path.basename(str(value).rstrip("/")) if key in ("path", "image") and value else value)
            for key, value in info.items()}


@router.get("/session/{session_id}", include_in_schema=False)
def guarded_get_session(session_id: str, update_ts: bool = False, image: bool = False,
                        user: User = Depends(RBAC(_USER))):
    from monailabel.endpoints.session import get_session

    check_name(session_id, "session_id")
    if image:
        _refuse_unrecordable("the session's image was not sent", f"session {session_id}'s image")
    answer = get_session(session_id, update_ts, image)
    if isinstance(answer, dict):
        return _session_info(answer)
    # the session's volume (?image=true): one session_image_downloaded entry before it is sent, 503 without it
    _recorded_read(SESSION_IMAGE_DOWNLOADED, {"session_id": session_id}, "the session's image was not sent")
    return answer


@router.delete("/session/{session_id}", include_in_schema=False)
def guarded_remove_session(session_id: str, user: User = Depends(RBAC(_USER))):
    from monailabel.endpoints.session import remove_session

    check_name(session_id, "session_id")
    return remove_session(session_id)


# ------------------------------------------------------------------------------------------------ whole-slide infer
@router.post("/infer/wsi/{model}", include_in_schema=False)
@router.post("/infer/wsi_v2/{model}", include_in_schema=False)
def refused_wsi_infer(model: str, user: User = Depends(RBAC(_USER))):
    """Never handed on: the stock routes read ``?image=`` as any path on the server and save labels from
    ``params`` under any tag (no role beyond infer's), and this app has no whole-slide model."""
    raise HTTPException(status_code=404, detail="this app serves no whole-slide images: denoise with "
                                                f"POST /infer/{model} (image = a datastore id, a session or an upload)")


# ------------------------------------------------------------------------------------------------ PACS proxy
# DICOMweb resource paths (studies/{uid}/series/{uid}/instances/{uid}/frames/1,2, .../metadata, .../rendered,
# bulk data such as bulk/7fe00010): UIDs, keywords, numbers and commas
_DICOMWEB_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._,\-]*")
_PROXY_OPS = ("wado", "qido", "stow")
#: request headers the proxy does not pass to the PACS: the caller's credentials for this server, and its Host
PROXY_HEADERS_NOT_FORWARDED = frozenset({"authorization", "proxy-authorization", "cookie", "host"})


def proxy_path_problem(path: str) -> Optional[str]:
    """Why ``path`` (the part after ``/proxy/dicom/[wado|qido|stow/]``, percent-decoded by the server) is not a
    DICOMweb resource path under the PACS's DICOMweb root, or None when it is one (empty: the root itself)."""
    segments = path.split("/")
    if segments and segments[-1] == "":
        segments = segments[:-1]  # one trailing slash
    for segment in segments:
        if segment in (".", ".."):
            return f"holds a {segment!r} segment: the proxy only reaches the PACS's DICOMweb resources"
        if not segment:
            return "holds an empty segment ('//')"
        if segment.startswith("."):
            return f"segment {segment[:40]!r} starts with a dot"
        if not _DICOMWEB_SEGMENT.fullmatch(segment):
            bad = sorted({c for c in segment if not re.match(r"[A-Za-z0-9._,\-]", c)})
            return (f"segment {segment[:40]!r} holds characters that are not in DICOMweb paths"
                    + (f" ({', '.join(repr(c) for c in bad)})" if bad else ""))
    return None


#: request headers of a store (POST) the proxy does not pass to the PACS: they frame the client's body, and the proxy
#: forwards one it rebuilt (:func:`rebuilt_stow_body`)
_STOW_FRAMING_NOT_FORWARDED = frozenset({"content-type", "content-length", "transfer-encoding", "content-encoding"})


#: response headers of the PACS that describe its connection to this server, not this server's answer
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
                         "transfer-encoding", "upgrade"})
def _proxy_timeout_s() -> tuple[float, float]:
    """Seconds to connect to the PACS, and to wait for each part of its answer: the app's own requests' (10 s,
    ``ADL_PACS_READ_TIMEOUT_S``: :func:`lib.pacs.pacs_read_timeout_s`)."""
    from ..pacs import PACS_CONNECT_TIMEOUT_S, pacs_read_timeout_s

    return PACS_CONNECT_TIMEOUT_S, pacs_read_timeout_s()


def _pacs_url_and_auth(op: str, path: str) -> tuple[str, Any, dict[str, str]]:
    """The PACS URL for ``op`` (``wado``, ``qido``, ``stow`` or ``""``) and ``path``, with the credentials MONAI
    Label's stock proxy uses (its settings' user and password, or Google Cloud's token for a Healthcare API)."""
    auth = ((_settings.MONAI_LABEL_DICOMWEB_USERNAME, _settings.MONAI_LABEL_DICOMWEB_PASSWORD)
            if _settings.MONAI_LABEL_DICOMWEB_USERNAME and _settings.MONAI_LABEL_DICOMWEB_PASSWORD else None)
    headers: dict[str, str] = {}
    if "googleapis.com" in _settings.MONAI_LABEL_STUDIES:
        import google.auth
        import google.auth.transport.requests

        credentials, _ = google.auth.default(scopes=["https://www.googleapis.com/auth/cloud-platform"])
        credentials.refresh(google.auth.transport.requests.Request())
        headers["Authorization"] = f"Bearer {credentials.token}"
        auth = None
    prefix = {"wado": _settings.MONAI_LABEL_WADO_PREFIX, "qido": _settings.MONAI_LABEL_QIDO_PREFIX,
              "stow": _settings.MONAI_LABEL_STOW_PREFIX}.get(op, "")
    if op == "qido" and path.endswith("metadata"):  # some OHIF versions ask QIDO for metadata (stock behaviour)
        prefix = _settings.MONAI_LABEL_WADO_PREFIX
    proxy_path = f"{prefix}/{path}" if prefix else path
    return f"{_settings.MONAI_LABEL_STUDIES.rstrip('/')}/{proxy_path}", auth, headers


def _forward_to_pacs(method: str, url: str, query: str, auth: Any, headers: dict[str, str], body: bytes):
    """One request to the PACS (blocking: run in a worker thread) and its answer as a response of this server;
    504 when the PACS accepted the request and sent no answer, or no next part of it, within
    :func:`lib.pacs.pacs_read_timeout_s` (it was a 502, as if it could not be reached: a viewer was told the PACS is
    broken, not that it is slow); 502 when it cannot be reached, or its answer was cut short (urllib3's errors while
    the body is read, which are no ``requests`` errors). The log names the PACS's URL without its credentials."""
    import requests
    import urllib3
    from fastapi.responses import Response

    from ..pacs import one_line_redacted, pacs_read_timeout_s, read_timed_out, sends_wait_read_timeout, urls_redacted
    from . import pacs_silent

    shown = urls_redacted(url)  # the --studies URL may hold the PACS's user name and password

    def silent(error: BaseException) -> HTTPException:
        seconds = pacs_read_timeout_s()
        log.error("PACS proxy: %s %s: the PACS did not answer within %g s (%s)", method, shown, seconds,
                  type(error).__name__)
        return HTTPException(status_code=504, detail=pacs_silent(seconds, storing=method == "POST"))

    with requests.Session() as session:  # a store's body sent waiting the read timeout for the PACS to take it
        sends_wait_read_timeout(session)
        try:
            answer = session.request(method, url + (f"?{query}" if query else ""), auth=auth, headers=headers,
                                     # a file, not bytes: urllib3 sends it in 16 KiB blocks, each under the
                                     # read timeout (bytes go in one send, whose timeout bounds the whole upload)
                                     data=io.BytesIO(body) if method == "POST" else None, stream=True,
                                     timeout=_proxy_timeout_s(), allow_redirects=False)
        except requests.RequestException as e:
            if read_timed_out(e):  # no answer in time, or the request's body not taken (send_timed_out)
                raise silent(e) from None
            log.warning("PACS proxy: %s %s failed: %s", method, shown, one_line_redacted(e))
            raise HTTPException(status_code=502, detail=f"the PACS did not answer ({type(e).__name__})") from None
        try:
            content = answer.raw.read()  # as sent (its Content-Encoding kept)
        except urllib3.exceptions.ReadTimeoutError as e:  # its answer stalled half way
            raise silent(e) from None
        except urllib3.exceptions.HTTPError as e:  # ProtocolError (cut short), ...
            log.warning("PACS proxy: the answer to %s %s failed: %s", method, shown, one_line_redacted(e))
            raise HTTPException(status_code=502, detail=f"the PACS's answer ({answer.status_code}) was cut short "
                                                        f"({type(e).__name__})") from None
        finally:
            answer.close()
    kept = {k: v for k, v in answer.headers.items() if k.lower() not in _HOP_BY_HOP}
    return Response(content=content, status_code=answer.status_code, headers=kept)


#: how many reads through the proxy are remembered as on record (:data:`_proxy_reads`)
PROXY_READS_REMEMBERED = 100_000


def proxy_read_key(path: str, query: str) -> tuple[Optional[str], Optional[str], Optional[str]]:
    """What a proxy GET reads, as its audit entry names it: (StudyInstanceUID, SeriesInstanceUID, search) for
    ``path`` (under the DICOMweb root, checked by :func:`proxy_path_problem`) and its ``query`` string. The UIDs are
    the segments after ``studies/`` and ``series/`` (None where the path names none: ``studies/{uid}/metadata``
    reads a whole study); a path that names no study (a search of the PACS's studies, series or instances, whose
    answer names patients) is keyed by its ``search``, the path and query string as asked."""
    segments = [segment for segment in path.split("/") if segment]

    def after(keyword: str) -> Optional[str]:
        for at, segment in enumerate(segments[:-1]):
            if segment == keyword:
                return segments[at + 1]
        return None

    study = after("studies")
    if study is not None:
        return study, after("series"), None
    return None, None, path + (f"?{query}" if query else "")


def remember_recent(memo: "collections.OrderedDict", key: Any, limit: int) -> None:
    """Put ``key`` last in ``memo`` (most recent) and forget the oldest keys past ``limit``."""
    memo[key] = None
    memo.move_to_end(key)
    while len(memo) > limit:
        memo.popitem(last=False)


class OnceEach:
    """Run a write once per key, remembering the ``limit`` most recent keys written (:func:`remember_recent`).
    The write runs outside the lock, so a slow one holds up only the requests of its own key: they wait for it
    and return once it succeeded; after a failed one (nothing remembered) the next of them writes."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.done: "collections.OrderedDict[Any, None]" = collections.OrderedDict()
        self._writing: dict[Any, threading.Event] = {}
        self._lock = threading.Lock()

    def run(self, key: Any, write: Callable[[], Any]) -> None:
        """``write()`` unless ``key`` is remembered; its exception propagates and ``key`` stays unremembered."""
        while True:
            with self._lock:
                if key in self.done:
                    self.done.move_to_end(key)
                    return
                writing = self._writing.get(key)
                if writing is None:
                    writing = self._writing[key] = threading.Event()
                    break
            writing.wait()  # another request writes this key: on record once it is set, else this one writes
        written = False
        try:
            write()
            written = True
        finally:
            with self._lock:
                if written:
                    remember_recent(self.done, key, self.limit)
                del self._writing[key]
            writing.set()


#: the reads through the proxy already on record in this server process, (user, client, study UID, series UID,
#: search): a viewer asks the proxy once per DICOM instance, frame and metadata file, which is one entry per series
#: and reader (a restart writes them again). Least recently read first; the oldest are forgotten past
#: PROXY_READS_REMEMBERED (every distinct search is a key), which only writes their entry again when next read.
_proxy_reads = OnceEach(PROXY_READS_REMEMBERED)


def _record_proxy_read(path: str, query: str) -> None:
    """The ``dicomweb_read`` entry of a proxy GET the PACS answered, unless the same reader (user and client) has
    already read the same study / series (or made the same search) in this server process. Written before the
    answer is sent; 503 when it cannot be written (and that read is recorded at the next request). Concurrent
    requests of one viewer for one series write one entry; a slow write holds up no other key's reads."""
    from ..audit.context import request_actor

    actor = request_actor()
    study, series, search = proxy_read_key(path, query)
    _proxy_reads.run((actor.get("user"), actor.get("client"), study, series, search), lambda: _recorded_read(
        DICOMWEB_READ, {"study_instance_uid": study, "series_instance_uid": series, "search": search, "path": path},
        "the PACS's answer was not sent"))


#: values longer than this (bytes) in a STOW-RS part's header are skipped, not read (:func:`stow_parts`): UIDs are
#: at most 64 bytes, a private element before them may hold megabytes
STOW_SKIPPED_VALUE_BYTES = 1024


class _PartReader:
    """A read-only binary file over ``data`` (a memoryview of one part of a request body): only what is read is
    copied, and nothing past the part's end is read (pydicom's reader asks ``read``, ``seek`` and ``tell``)."""

    def __init__(self, data: memoryview) -> None:
        self.data, self.at = data, 0

    def read(self, size: Optional[int] = -1) -> bytes:
        end = len(self.data) if size is None or size < 0 else min(len(self.data), self.at + size)
        chunk = bytes(self.data[self.at:end])
        self.at = max(self.at, end)
        return chunk

    def seek(self, offset: int, whence: int = 0) -> int:
        self.at = max(0, offset + (0, self.at, len(self.data))[whence])
        return self.at

    def tell(self) -> int:
        return self.at


class StowMediaTypeError(ValueError):
    """A STOW-RS body sent as something other than ``multipart/related``, or its parts as other than
    ``application/dicom``."""


#: why the proxy stores multipart/related bodies only: no other is a STOW-RS store, its parts cannot be read
STOW_MULTIPART_ONLY = ("a STOW-RS store is a multipart/related body (DICOM PS3.18): send each instance as one of its "
                       "parts, sent as application/dicom")


#: why the proxy stores DICOM files only: metadata (``application/dicom+json``, ``+xml``) and bulk data parts are not
#: read, so an entry would not name the studies and series stored; Orthanc's DICOMweb plugin refuses them as well
STOW_DICOM_ONLY = ("the proxy stores DICOM files only (each part sent as application/dicom), so that its audit entry "
                   "names the studies and series stored: send each instance as application/dicom")


#: why the proxy stores unencoded bodies only: the UIDs of an encoded (compressed) body's parts are not read
STOW_UNENCODED = ("the proxy reads each part's UIDs for its audit entry: send the body unencoded (no Content-Encoding, "
                  "or identity)")


#: why a POST without a body is refused (a 422, not the 415 of a wrong media type: there is none to be wrong)
STOW_EMPTY = ("empty body: nothing to store (a STOW-RS store is a multipart/related body (DICOM PS3.18), each "
              "instance one of its parts, sent as application/dicom)")


#: why a STOW-RS request whose headers or parameters are given twice is refused: the PACS may read the other one
STOW_AMBIGUOUS = "the PACS may read another one than the proxy (its audit entry would not name what is stored)"


#: what follows ``--boundary`` in a delimiter (RFC 2046): ``--`` (the close delimiter) then optional linear
#: whitespace and CRLF or the body's end, or optional linear whitespace and CRLF; after anything else
#: (``--BOUNDARYX``, ``--BOUNDARY--x``) it is data
_STOW_DELIMITER_TAIL = re.compile(rb"--[ \t]*(?:\r\n|\Z)|[ \t]*\r\n")

#: a delimiter line ended by a bare LF (``--boundary\n``, ``--boundary--\n``): a body written with LF line ends,
#: which RFC 2046 does not frame (its line ends are CRLF)
_STOW_LF_DELIMITER_TAIL = re.compile(rb"(?:--)?[ \t]*\n")


def _stow_bare_lf(body: bytes, dash_boundary: bytes) -> str:
    """Why ``body`` cannot be framed when its delimiters end their lines with a bare LF instead of CRLF (a client
    that wrote the body with LF line ends: RFC 2046 finds no part in it, Orthanc answers 200 and stores nothing);
    "" when none does."""
    at = body.find(dash_boundary)
    while at >= 0:
        if (_STOW_LF_DELIMITER_TAIL.match(body, at + len(dash_boundary))
                and (at == 0 or (body[at - 1:at] == b"\n" and body[at - 2:at] != b"\r\n"))):
            return (f"the body uses bare LF line ends where CRLF is required (RFC 2046): the delimiter "
                    f"{dash_boundary[:80].decode('latin-1')} at byte {at} ends its line with LF alone; send each "
                    "line of the multipart framing (delimiters, part headers, the blank line after them) ended by "
                    "CRLF")
        at = body.find(dash_boundary, at + 1)
    return ""


def _stow_part_bounds(body: bytes, dash_boundary: bytes) -> list[tuple[int, int]]:
    """Where each part of a multipart ``body`` lies, split exactly as RFC 2046 frames it: (the CRLF ending its
    delimiter's line, the CRLF before the next delimiter), ``dash_boundary`` being ``--boundary``. A delimiter starts
    the body or a line (the CRLF before it is the delimiter's, not the part's) and is followed by ``--`` (the close
    delimiter: what follows is the epilogue) or by optional linear whitespace and CRLF; ``--boundary`` followed by
    anything else is data. What comes before the first delimiter (the preamble) is no part. No delimiter: no part.

    Raises:
        ValueError: the parts cannot be framed exactly: a delimiter that does not start a line (a client that left
            out the CRLF before it: a PACS finds it there, RFC 2046 does not, and its part would lose or keep bytes
            either way), or parts without a close delimiter (the last part's end is unknown); either, or no part
            found, in a body whose delimiter lines end with a bare LF: said so (:func:`_stow_bare_lf`), not
            blamed on a delimiter."""
    delimiters, at = [], body.find(dash_boundary)
    while at >= 0:
        tail = _STOW_DELIMITER_TAIL.match(body, at + len(dash_boundary))
        if tail is None:  # "--BOUNDARYX": data
            at = body.find(dash_boundary, at + 1)
            continue
        line_start = delimiters[-1][1] if delimiters else 0  # its CRLF may not be the previous delimiter's
        if at > 0 and (at - 2 < line_start or body[at - 2:at] != b"\r\n"):
            raise ValueError(_stow_bare_lf(body, dash_boundary) or (
                f"the body's parts cannot be framed exactly (RFC 2046): the delimiter "
                f"{dash_boundary[:80].decode('latin-1')} at byte {at} does not start a line (no CRLF before it)"))
        if tail.group().startswith(b"--"):
            if not delimiters:
                break  # a close delimiter only: no part
            return [(line - 2, end - 2) for (_, line), (end, _) in zip(delimiters, delimiters[1:] + [(at, 0)])]
        delimiters.append((at, tail.end()))
        at = body.find(dash_boundary, tail.end())
    if delimiters:
        raise ValueError(_stow_bare_lf(body, dash_boundary) or (
            f"the body's parts cannot be framed exactly (RFC 2046): no close delimiter "
            f"{dash_boundary[:80].decode('latin-1')}-- ends its last part (cut short?)"))
    bare_lf = _stow_bare_lf(body, dash_boundary)
    if bare_lf:  # no part RFC 2046 recognises, but LF-ended delimiters: not "no part"
        raise ValueError(bare_lf)
    return []


def stow_parts(body: bytes, content_type: str) -> tuple[list[str], list[str], list[tuple[int, int]]]:
    """(StudyInstanceUIDs, SeriesInstanceUIDs, spans) of a STOW-RS ``body`` (``multipart/related`` with the
    boundary of ``content_type``, its media type and parameter names in any case). Each part is sent as DICOM (its
    own Content-Type ``application/dicom``, or none) and is one instance, its UIDs read from its header up to the
    series UID, values longer than :data:`STOW_SKIPPED_VALUE_BYTES` skipped (no pixel data, no large private element
    read). UIDs sorted, without repeats. The parts are split exactly as RFC 2046 frames them
    (:func:`_stow_part_bounds`; a body that cannot be is refused, never a byte lost or added), a part's content
    ending with the CRLF before the next delimiter (its Content-Length, where it gives one, must say so: a PACS may
    read that many bytes instead). ``spans`` are the (start, end) byte offsets in ``body`` of each DICOM part's
    content, one per instance (what :func:`rebuilt_stow_body` forwards). A ``boundary`` or ``type`` parameter given
    twice, or a part with two Content-Length or Content-Type headers (a header name indented or spaced before its
    colon counts: Orthanc strips the spaces), is refused: a PACS may read the other one.

    Raises:
        StowMediaTypeError: the body is not sent as ``multipart/related``, naming its media type; the body's
            multipart ``type`` or a part's Content-Type is not ``application/dicom`` (JSON or XML metadata, bulk
            data: their UIDs are not read), naming it and the part (1 = the first).
        ValueError: an empty body, sent as multipart/related or without a Content-Type (:data:`STOW_EMPTY`); a
            part sent as DICOM yields no StudyInstanceUID and SeriesInstanceUID (not DICOM, cut short), or its
            Content-Length disagrees with its delimiter, or its headers end with LF LF, naming the part; a body
            without a boundary or without any part (an encoded body: none can be read from it), or whose parts
            cannot be framed exactly (LF line ends where CRLF is required: said so); a repeated parameter or part
            header.
    """
    from pydicom.filereader import read_partial

    media_type = (content_type or "").partition(";")[0].strip()
    if not body and not media_type:  # nothing sent at all: no media type to be wrong
        raise ValueError(STOW_EMPTY)
    if media_type.lower() != "multipart/related":  # RFC 7231: type and subtype in any case
        sent = f"sent as {media_type[:80]}" if media_type else "sent without a Content-Type"
        raise StowMediaTypeError(f"the body is {sent}; {STOW_MULTIPART_ONLY}")
    for name in ("boundary", "type"):
        if len(re.findall(rf";\s*{name}\s*=", content_type or "", re.IGNORECASE)) > 1:
            raise ValueError(f"its Content-Type gives the {name} parameter more than once; {STOW_AMBIGUOUS}")
    root = re.search(r';\s*type\s*=\s*"?([^";]+)"?', content_type or "", re.IGNORECASE)
    if root is not None and root.group(1).strip().lower() != "application/dicom":
        raise StowMediaTypeError(f"the body's multipart type is {root.group(1).strip()[:80]}; {STOW_DICOM_ONLY}")
    if not body:  # a PACS answers it 200, storing nothing: the entry would name nothing stored
        raise ValueError(STOW_EMPTY)
    found = re.search(r';\s*boundary\s*=\s*"?([^";]+)"?', content_type or "", re.IGNORECASE)
    if found is None:
        raise ValueError("it is no multipart body: its Content-Type names no boundary")
    delimiter = b"--" + found.group(1).strip().encode()
    view = memoryview(body)
    studies, series, spans = set(), set(), []
    # each part, found in place: only what pydicom reads of it is copied
    for parts, (after, end) in enumerate(_stow_part_bounds(body, delimiter), start=1):
        start = body.find(b"\r\n\r\n", after, end)  # the part's own headers end here (none: at once)
        blank = body.find(b"\n\n", after, end)  # CRLF-ended headers hold no LF LF before their end
        if blank >= 0 and (start < 0 or blank < start):
            raise ValueError(f"part {parts} of the body uses bare LF line ends where CRLF is required (RFC 2046): "
                             "its headers end with LF LF, not CRLF CRLF; send each header line and the blank line "
                             "after them ended by CRLF")
        headers = body[after:max(start, after)].decode("latin-1")
        for name in ("content-type", "content-length"):
            if len(re.findall(rf"^[ \t]*{name}[ \t]*:", headers, re.IGNORECASE | re.MULTILINE)) > 1:
                raise ValueError(f"part {parts} of the body gives more than one {name.title()} header; "
                                 f"{STOW_AMBIGUOUS}")
        kind = re.search(r"^[ \t]*content-type[ \t]*:\s*([^;\r\n]*)", headers, re.IGNORECASE | re.MULTILINE)
        if kind is not None and kind.group(1).strip().lower() != "application/dicom":
            raise StowMediaTypeError(f"part {parts} of the body is sent as {kind.group(1).strip()[:80]}; "
                                     f"{STOW_DICOM_ONLY}")
        length = re.search(r"^[ \t]*content-length[ \t]*:[ \t]*(\S*)", headers, re.IGNORECASE | re.MULTILINE)
        if length is not None and start >= 0 and length.group(1) != str(end - start - 4):
            raise ValueError(f"part {parts} of the body gives Content-Length {length.group(1)[:20]}, but its "
                             f"delimiter ends it after {end - start - 4} bytes")
        study = one = ""  # no end of its headers (no content), not DICOM, cut short: refused below
        if start >= 0:
            try:
                header = read_partial(_PartReader(view[start + 4:end]), force=True,
                                      defer_size=STOW_SKIPPED_VALUE_BYTES,
                                      stop_when=lambda tag, vr, length: tag > 0x0020000E)
                study, one = str(header.get("StudyInstanceUID") or ""), str(header.get("SeriesInstanceUID") or "")
            except Exception:  # noqa: BLE001 - whatever pydicom raised, the part is refused below
                pass
        if not (study and one):
            raise ValueError(f"part {parts} of the body (sent as application/dicom) is no DICOM file with a "
                             "StudyInstanceUID and a SeriesInstanceUID")
        studies.add(study)
        series.add(one)
        spans.append((start + 4, end))
    if body and not spans:  # its entry would name nothing stored (an encoded body, another boundary)
        raise ValueError(f"the body holds no part: no delimiter {delimiter[:80].decode('latin-1')} (its boundary) "
                         "starts one")
    return sorted(studies), sorted(series), spans


def rebuilt_stow_body(body: bytes, spans: list[tuple[int, int]]) -> tuple[str, bytes]:
    """(Content-Type, body) of the STOW-RS store the proxy forwards: each DICOM part of ``body`` that
    :func:`stow_parts` counted (``spans``: byte offsets of its content), under a part header of its own
    (``Content-Type: application/dicom`` only), delimited by a fresh random boundary found in no part. Nothing of the
    client's framing reaches the PACS (its boundary, part headers, preamble, epilogue): the PACS cannot find a part
    the audit entry does not name. No part (an empty body): an empty body."""
    import secrets

    parts = [memoryview(body)[start:end] for start, end in spans]
    while True:
        boundary = f"adl-stow-{secrets.token_hex(16)}"
        delimiter = f"--{boundary}".encode()
        if all(body.find(delimiter, start, end) < 0 for start, end in spans):
            break
    head = delimiter + b"\r\nContent-Type: application/dicom\r\n\r\n"
    rebuilt = b"".join(chunk for part in parts for chunk in (head, part, b"\r\n")) + delimiter + b"--\r\n"
    return f'multipart/related; type="application/dicom"; boundary={boundary}', rebuilt if parts else b""


def _record_proxy_store(path: str, content_type: str, body: bytes) -> tuple[Optional[dict], str, bytes]:
    """The ``dicomweb_storing`` entry of a proxy POST (a STOW-RS store into the PACS), written before it is
    forwarded: the study the path names and the studies and series of the body's DICOM parts (:func:`stow_parts`),
    ``instances``, ``bytes`` (of the body forwarded) and ``path``; with the Content-Type and body to forward, rebuilt
    from the parts it names (:func:`rebuilt_stow_body`). 415 naming the media type when the body is not
    multipart/related, or the part when one is not sent as DICOM (metadata, bulk data), 422 for an empty body, and
    naming it when a DICOM part's UIDs cannot be read, the parts cannot be framed exactly or a header is ambiguous
    (none writes an entry), 503 when the entry cannot be written: nothing is forwarded. (A body sent encoded, gzip,
    is refused before: :func:`_proxy`.)"""
    try:
        studies, series, spans = stow_parts(body, content_type)
    except StowMediaTypeError as error:  # its entry would not say what was stored
        raise HTTPException(status_code=415, detail=f"nothing was stored in the PACS: {error}") from None
    except ValueError as error:  # its entry would not say what was stored
        raise HTTPException(status_code=422, detail=f"nothing was stored in the PACS: {error}") from None
    named, _, _ = proxy_read_key(path, "")
    forwarded_type, forwarded = rebuilt_stow_body(body, spans)
    pending = _recorded_read(DICOMWEB_STORING, {
        "study_instance_uids": sorted(set(studies) | ({named} if named else set())), "series_instance_uids": series,
        "instances": len(spans), "bytes": len(forwarded), "path": path}, "nothing was stored in the PACS")
    return pending, forwarded_type, forwarded


def _record_proxy_store_outcome(pending: dict, status: int, detail: Optional[str]) -> None:
    """``dicomweb_stored`` (``status`` 2xx) or ``dicomweb_store_failed`` naming the ``pending`` entry's seq and the
    PACS's HTTP status, or this server's answer and its ``detail`` when the PACS's answer never came whole (502: it
    did not answer, or its answer was cut short: whether the PACS stored it is unknown). Once the store was forwarded
    it may be done either way: an entry that cannot be written is an ERROR in the server's log, the answer still
    sent."""
    from ..audit import AuditError
    from ..audit.context import request_actor

    event = "dicomweb_stored" if 200 <= status < 300 else "dicomweb_store_failed"
    try:
        app().audit.append(event, {"pending_seq": pending["seq"], "status": status, "detail": detail,
                                   **request_actor()})
    except AuditError as error:
        log.error("PACS proxy: the %s entry of store entry %s could not be written: %s", event, pending["seq"],
                  error)


async def _proxy(request: Request, path: str):
    from starlette.concurrency import run_in_threadpool

    from ..pacs import is_dicomweb

    if not is_dicomweb(app().datastore()):
        raise HTTPException(status_code=404, detail="this server's studies are not on a PACS: there is no DICOMweb "
                                                    "server to proxy (start it with --studies http://.../dicom-web)")
    op, _, rest = path.partition("/")
    if op not in _PROXY_OPS:  # the stock routes: /dicom/{wado|qido|stow}/{path} first, then /dicom/{path}
        op, rest = "", path
    problem = proxy_path_problem(rest)
    if problem is not None:
        raise HTTPException(status_code=422, detail=f"proxy path {rest[:80]!r} {problem}")
    url, auth, headers = _pacs_url_and_auth(op, rest)
    pending = None
    if request.method == "POST":  # a STOW-RS store: its content type (multipart boundary) must reach the PACS
        encoding = request.headers.get("content-encoding", "").strip()
        if encoding.lower() not in ("", "identity"):  # its parts cannot be read (Orthanc stores none of them either)
            raise HTTPException(status_code=415, detail=f"nothing was stored in the PACS: the body is sent with "
                                                        f"Content-Encoding {encoding[:80]}; {STOW_UNENCODED}")
        types = request.headers.getlist("content-type")
        if len(types) > 1:  # the proxy would read one, the PACS maybe another
            raise HTTPException(status_code=422, detail=f"nothing was stored in the PACS: the request has "
                                                        f"{len(types)} Content-Type headers; {STOW_AMBIGUOUS}")
        # The body is rebuilt from the parts on record, framed anew: the client's framing headers describe a body
        # that is not forwarded (the HTTP library sets the length).
        forwarded = {k: v for k, v in request.headers.items()
                     if k.lower() not in PROXY_HEADERS_NOT_FORWARDED | _STOW_FRAMING_NOT_FORWARDED}
        received = await request.body()
        # patient data into the PACS: on record before it is forwarded, refused (503) when it cannot be
        pending, content_type, body = await run_in_threadpool(_record_proxy_store, rest, "".join(types), received)
        forwarded["Content-Type"] = content_type
    else:  # a search or a retrieval: what the viewer accepts (JSON, a frame's transfer syntax, ...) and no more
        forwarded = {k: v for k, v in request.headers.items() if k.lower() == "accept"}
        body = b""
    # The query string is forwarded (MONAI Label's stock proxy drops it, so a QIDO search for one patient answered
    # every study on the PACS); the PACS's own credentials win over anything of the caller's.
    try:
        answer = await run_in_threadpool(_forward_to_pacs, request.method, url, request.url.query, auth,
                                         {**forwarded, **headers}, body)
    except Exception as error:  # the PACS did not answer, or its answer was cut short (502); anything else (500)
        if pending is not None:
            status = error.status_code if isinstance(error, HTTPException) else 500
            await run_in_threadpool(_record_proxy_store_outcome, pending, status,
                                    str(getattr(error, "detail", type(error).__name__)))
        raise
    if pending is not None:
        await run_in_threadpool(_record_proxy_store_outcome, pending, answer.status_code, None)
    if request.method == "GET" and 200 <= answer.status_code < 300:  # patient data read: on record before it is sent
        await run_in_threadpool(_record_proxy_read, rest, request.url.query)
    return answer


@router.get("/proxy/dicom/{path:path}", include_in_schema=False)
async def guarded_proxy_get(request: Request, path: str, user: User = Depends(RBAC(_USER))):
    """MONAI Label's DICOMweb proxy (QIDO-RS, WADO-RS) for a path checked by :func:`proxy_path_problem`."""
    return await _proxy(request, path)


@router.post("/proxy/dicom/{path:path}", include_in_schema=False)
async def guarded_proxy_post(request: Request, path: str, user: User = Depends(RBAC(_ANNOTATOR))):
    """A POST through the proxy is a STOW-RS store into the PACS, whatever prefix it names: annotators only,
    without the caller's credentials."""
    return await _proxy(request, path)


# ------------------------------------------------------------------------------------------------------ OHIF viewer
@router.get("/ohif/{path:path}", include_in_schema=False)
def guarded_ohif(path: str, user: User = Depends(RBAC(_USER))):
    """MONAI Label's OHIF viewer files, except a folder: the stock route joins the path to its folder as it is and
    answers a file response for a folder that exists (``/ohif/..``, ``/ohif/.``, ``/ohif/assets``), which fails as
    a bare 500. Those are a 404, as a missing file of the stock route is; everything else is the stock route's."""
    from monailabel.endpoints import ohif

    folder = os.path.join(os.path.dirname(os.path.realpath(ohif.__file__)), "static", "ohif")
    if path:  # the stock route's own resolution (it serves index.html for a path that does not exist)
        candidate = os.path.join(folder, path.replace("/", os.pathsep))
        if os.path.exists(candidate) and not os.path.isfile(candidate):
            raise HTTPException(status_code=404, detail="Resource NOT Found")
    return ohif.get_ohif(path)
