"""MONAI Label app: ADL and TDDL-GCN denoising of CT and MR volumes.

    python -m monailabel.main start_server --app apps/adl_denoise --studies STUDIES -i 127.0.0.1 -p 8000 \
        --conf models all

Conf keys (``--conf key value``; see README.md in this folder): ``models`` (all | adl | adl_3d | tddl_gcn | nlm |
a comma list; ``all`` is adl, tddl_gcn and nlm: ``adl_3d``, the 3D network, infers only and is served only when
named, e.g. ``all,adl_3d``), ``model_dir`` (weights folder; default ``model/`` here, or
``ADL_MODEL_DIR``), ``device``, ``preload``,
``modality``, ``result_extension``, ``train_steps``, ``normal_dose``, ``max_voxels``, ``max_voxels_<model>`` (one
model's own limit, over ``max_voxels``), ``audit_dir`` (the audit log's
folder; default ``<studies>/.audit``, or ``<model_dir>/audit/dicomweb-<hash of the URL>`` for a DICOMweb datastore).
They are all checked before anything is built (:mod:`lib.configs.conf`): a wrong value, or a key that looks like a
misspelling of one of them, stops the start-up with an error naming the key; another key is a warning.

The audit trail (:mod:`lib.audit`): every result, verdict, datastore change and weights publication / restore, and
every access to patient data (review-queue hand-outs, downloads, reads through the PACS proxy), is an entry of an
append-only, hash-chained log, verified at start-up. A broken chain is logged as an ERROR, shown in ``/info/``
(``audit.warning``) and ``GET /review/audit/verify``, and the server then refuses everything that must be recorded
(503): it keeps serving the reads that write no entry, it does not produce unrecorded results nor send patient data
unrecorded.

Settings reach the tasks through the conf (:class:`lib.configs.base.DenoiserTaskConfig` reads it and hands each
task its values), not through environment variables set here. MONAI Label runs training in a subprocess that
builds this app again from the same conf (the server exports it as ``MONAI_LABEL_APP_CONF``), so both processes
resolve the same ``model_dir``.
"""
from __future__ import annotations

import concurrent.futures
import logging
import os
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Dict, Optional

import monailabel
from fastapi import HTTPException
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.config import TaskConfig
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from requests.exceptions import RequestException

from lib.activelearning import NextUnreviewed, has_image, reconcile_reviews, record_result, refuse_unreviewable
from lib.audit import AuditBrokenError, AuditError, AuditLog
from lib.audit.location import default_audit_dir, default_corrections_dir
from lib.audit.recording import (AuditedModelStore, audited_datastore, discard_result, install_request_context,
                                 request_actor, result_fields)
from lib.configs import MODEL_CONFIGS, OPT_IN_MODELS
from lib.configs.conf import ConfError, check_conf, check_environment, check_writable, model_names
from lib.datastore import steady_datastore
from lib.imaging import denoising_derivation, max_voxels
from lib.imaging.errors import ImageTooLargeError
from lib.weights import MODEL_DIR
from lib.weights.pseudonyms import site_key
from lib.pacs import (PacsStoreError, SeriesDoesNotFit, SeriesNotDelivered, SeriesNotFetchableByFrame, SeriesSize,
                      SeriesTooLarge, bound_waits, bounded_downloads, cache_folder, is_dicomweb, known_size,
                      pacs_read_timeout_s, read_timed_out, remove_stale_downloads, series_folder, start_up_warnings,
                      store_derived_series, whole_listing)
from lib.pacs_corrections import (corrections_of_other_urls, note_studies_url, refresh_moved_series, server_kept_labels,
                                  studies_url_problem, without_credentials)
from lib.runtime.switches import parse_bool

logger = logging.getLogger(__name__)


class _InferPool:
    """MONAI Label's infer thread pool (``MONAI_LABEL_INFER_CONCURRENCY`` >= 1), which keeps each request thread's
    last submitted task and whether MONAI Label's wait for it timed out: MONAI Label waits for it ``timeout``
    seconds and then answers, the task going on (or staying queued behind the others) and writing its result file in
    the temp folder, which nobody deleted (:meth:`DenoisingApp.infer` cancels it, or deletes its result)."""

    def __init__(self, pool: concurrent.futures.Executor):
        self._pool = pool
        self._submitted = threading.local()

    def submit(self, fn, /, *args, **kwargs) -> "_WaitedTask":
        task = _WaitedTask(self._pool.submit(fn, *args, **kwargs))
        self._submitted.task = task
        return task

    def take_submitted(self) -> Optional["_WaitedTask"]:
        """The task this thread submitted last (None when none since the last call)."""
        task = getattr(self._submitted, "task", None)
        self._submitted.task = None
        return task

    def __getattr__(self, name: str):  # shutdown and the rest: the pool's
        return getattr(self._pool, name)


class _WaitedTask:
    """A task of :class:`_InferPool` (its ``future``) and whether a wait for its result timed out (``wait_timed_out``):
    a ``TimeoutError`` out of MONAI Label's infer is the task's own, or raised after its result came, otherwise."""

    def __init__(self, future: concurrent.futures.Future):
        self.future = future
        self.wait_timed_out = False

    def result(self, timeout: Optional[float] = None):
        try:
            return self.future.result(timeout)
        except concurrent.futures.TimeoutError as error:
            if not (self.future.done() and self.future.exception() is error):  # the wait's, not the task's own
                self.wait_timed_out = True
            raise

    def __getattr__(self, name: str):  # done, cancel and the rest: the future's
        return getattr(self.future, name)


def _discard_late_result(future: concurrent.futures.Future) -> None:
    """Delete the result file of an infer task whose request failed (a 504 when it timed out)."""
    if future.cancelled() or future.exception() is not None:
        return
    result_file = future.result()[0]
    logger.info("result of an infer that was not sent deleted: %s", result_file)
    discard_result({"file": result_file})


def _remove_start_up_log_config() -> None:
    """Delete the logging configuration MONAI Label's ``start_server`` writes into the temp folder
    (``init_log_config``: a ``tmp*.json`` left there at every start) when no ``--log_config`` file was given. Its
    path is only a local variable of ``start_server`` (on this thread's stack: the app is built in the server's
    start-up); uvicorn has read it before the app is built, and reads it again only in the worker processes of
    ``--workers`` > 1, for which it is kept."""
    frame = sys._getframe(1)
    main_file = os.path.join("monailabel", "main.py")  # run as ``python -m monailabel.main`` its module is __main__
    while frame is not None and not (frame.f_code.co_name == "action_start_server"
                                     and frame.f_code.co_filename.endswith(main_file)):
        frame = frame.f_back
    if frame is None:
        return
    args, written = frame.f_locals.get("args"), frame.f_locals.get("log_config")
    del frame
    if (not isinstance(written, str) or written == getattr(args, "log_config", None)
            or (getattr(args, "workers", None) or 1) > 1
            or os.path.dirname(os.path.abspath(written)) != os.path.abspath(tempfile.gettempdir())):
        return
    try:
        os.unlink(written)
    except FileNotFoundError:
        pass
    except OSError as error:
        logger.warning("could not remove MONAI Label's logging configuration %s: %s", written, error)


class DenoisingApp(MONAILabelApp):
    def __init__(self, app_dir: str, studies: str, conf: Dict[str, str]):
        conf = conf or {}
        in_server = "monailabel.app" in sys.modules  # not the training subprocess
        try:  # every key checked before anything is built: a wrong value stops the start-up, naming the key
            check_conf(conf, MODEL_CONFIGS)
            if in_server:
                from monailabel.config import settings

                check_environment(os.environ, settings)
            problem = studies_url_problem(studies)
            if problem:  # requests would take part of the password for the host: no request made with it
                raise ConfError(f"--studies {without_credentials(studies)}: {problem}")
            try:
                max_voxels()  # the default limit of every read, from ADL_MAX_VOXELS
                pacs_read_timeout_s()  # how long a PACS may stay silent, from ADL_PACS_READ_TIMEOUT_S
            except ValueError as error:
                raise ConfError(str(error)) from None
            if not conf.get("model_dir") and os.environ.get("ADL_MODEL_DIR") and \
                    not os.path.isdir(os.environ["ADL_MODEL_DIR"]):
                raise ConfError(f"ADL_MODEL_DIR {os.environ['ADL_MODEL_DIR']!r}: no such folder (the weights folder "
                                f"when --conf model_dir is not given)")
        except ConfError as error:
            logger.error("not started: %s", error)
            raise
        names = model_names(conf, MODEL_CONFIGS)
        self.model_dir = os.path.abspath(conf.get("model_dir") or os.environ.get("ADL_MODEL_DIR") or str(MODEL_DIR))
        self.audit_dir = os.path.abspath(conf.get("audit_dir") or default_audit_dir(studies, self.model_dir))
        # a DICOMweb datastore's corrections and region maps: on this server, beside its audit log's default folder
        self.corrections_dir = default_corrections_dir(studies or "", self.model_dir) \
            if (studies or "").startswith(("http://", "https://")) else None
        self.audit = AuditLog(self.audit_dir)
        self.audit_at_start = self._verify_audit(in_server)
        try:  # the folders every request that leaves a record writes: before anything is built
            check_writable(*self._written_folders(studies))
        except ConfError as error:
            logger.error("not started: %s", error)
            raise
        self.store = AuditedModelStore(self.model_dir, self.audit)
        self.models: Dict[str, TaskConfig] = {}
        for name, config_class in MODEL_CONFIGS.items():
            if name in names or ("all" in names and name not in OPT_IN_MODELS):
                config = config_class()
                config.init(name, self.model_dir, conf, None, store=self.store)
                self.models[name] = config
        logger.info("models: %s; weights in %s", ", ".join(self.models), self.model_dir)
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name="ADL / TDDL-GCN denoising",
                         description="Deep-learning denoising of CT and MR volumes (ADL, TDDL-GCN) with "
                                     "fine-tuning from radiologists' corrections",
                         version=monailabel.__version__)
        self._check_model_dir_writable()
        if self._infers_threadpool is not None:  # MONAI_LABEL_INFER_CONCURRENCY >= 1
            self._infers_threadpool = _InferPool(self._infers_threadpool)
        limits = [key for key in conf if key.startswith("max_voxels_") and key[len("max_voxels_"):] not in self.models]
        if limits:
            logger.warning("--conf %s ignored: not a served model's (%s)", ", ".join(limits), ", ".join(self.models))
        unused = [key for key in ("train_steps", "normal_dose") if key in conf]
        if unused and not self._trainers:  # nlm and adl_3d infer only (or MONAI_LABEL_TASKS_TRAIN is off)
            logger.warning("--conf %s ignored: none of the served models (%s) is trained by this server",
                           ", ".join(unused), ", ".join(self.models))
        if in_server:
            from monailabel.app import app as fastapi_app

            from lib.endpoints import install

            install(fastapi_app)
            install_request_context(fastapi_app)
            _remove_start_up_log_config()
            self._make_pseudonym_key()
            for problem in start_up_warnings(self._datastore):  # a PACS that is down, or lists one modality
                logger.warning(problem)
            if self.corrections_dir:  # a changed --studies URL (another hash) hid every kept correction in silence
                hidden = corrections_of_other_urls(self.corrections_dir, studies)
                if hidden:
                    logger.warning(hidden)
                note_studies_url(self.corrections_dir, studies)
            if self.audit.broken is None:
                self._reconcile_reviews()
                # a PACS URL's user name, password or token (query) kept out of the log: readers of it need none
                self.audit.append("server_started", {"studies": without_credentials(studies or ""),
                                                     "model_dir": self.model_dir,
                                                     "models": sorted(self.models), "pid": os.getpid(),
                                                     "entries_verified": self.audit_at_start["entries"]})

    def _written_folders(self, studies: str) -> tuple[list, list]:
        """The folders (and the files appended to) that results, verdicts and corrections write, for
        :func:`lib.configs.conf.check_writable`: the audit log's (unless the log refuses entries anyway: broken), and
        a local datastore's folder and its label folders (uploads, MONAI Label's index, corrections, region
        maps), or a DICOMweb datastore's cache folder (:func:`lib.pacs.cache_folder`: every series denoised or
        reviewed is downloaded there first; one it cannot write failed each of them with a traceback)."""
        folders, files = [], []
        if self.audit.broken is None:
            folders.append(("the audit log's folder (--conf audit_dir)", self.audit_dir,
                            "the audit log (every result, verdict, datastore change and weights publication is "
                            "recorded before it is done)"))
            files.append(("the audit log", self.audit.path, "an entry per result, verdict and datastore change"))
        if studies and studies.startswith(("http://", "https://")):
            from monailabel.config import settings

            if settings.MONAI_LABEL_DATASTORE.lower() not in ("xnat", "dsa"):  # MONAI Label's choice of datastore
                folders.append(("the DICOMweb datastore's cache folder (MONAI_LABEL_DICOMWEB_CACHE_PATH)",
                                cache_folder(studies), "the series downloaded from the PACS, their NIfTI conversions "
                                "and info (the review queue's copy of each verdict)"))
                folders.append(("the DICOMweb datastore's corrections folder", self.corrections_dir,
                                "clinicians' corrections of the PACS's series and their region maps "
                                "(PUT /datastore/label)"))
        elif studies:
            folders.append(("the studies folder (--studies)", studies, "uploaded studies and MONAI Label's "
                            "datastore index"))
            for tag, purpose in (("final", "clinicians' corrections (PUT /datastore/label)"),
                                 ("regions", "the regions marked on corrections")):
                folders.append((f"the datastore's {tag} labels folder", os.path.join(studies, "labels", tag), purpose))
        return folders, files

    def _check_model_dir_writable(self) -> None:
        """A server that fine-tunes writes its weights folder (published weights, ``versions/`` and their history,
        ``work/``, ``train_stats/``, ``reference_set/``, the pseudonym key): one it cannot write does not start
        (it failed after minutes of training, at the publication). Without training it is a warning: only
        rollbacks (``POST /versions/{model}/restore``) need it."""
        from pathlib import Path

        root = Path(self.model_dir)
        purpose = "fine-tuned weights, their versions and history, training runs' work and status"
        folders = [("the weights folder (--conf model_dir)", root, purpose)]
        folders += [(f"the weights folder's {name}/", root / name, purpose)
                    for name in ("versions", "work", "train_stats", "reference_set")]
        kept = [self.store.versions_dir(model, modality) for model in sorted(self.models) for modality in ("ct", "mr")]
        folders += [("the versions folder", p, "the versions of one model and their history") for p in kept]
        files = [("the version history", p / "history.jsonl", "one line per publication, rejection and rollback")
                 for p in kept]
        try:
            check_writable(folders, files)
        except ConfError as error:
            if self._trainers:
                error = ConfError(f"{error}; or start a server that does not train (MONAI_LABEL_TASKS_TRAIN=false)")
                logger.error("not started: %s", error)
                raise error from None
            logger.warning("%s; rollbacks (POST /versions/{model}/restore) will fail", error)

    def _make_pseudonym_key(self) -> None:
        """The key of the pseudonyms that fine-tuned files name images by (:mod:`lib.weights.pseudonyms`), made at
        start-up: a training run (which may be killed) then never adds files to the model folder. Without it (a
        folder this server cannot write) fine-tuning fails rather than write a file that names patients. A server
        that does not train never needs it: a folder it cannot write is said once (:meth:`_check_model_dir_writable`),
        not again as an ERROR about fine-tuning; a damaged key stays an ERROR (a server that trains may share the
        folder)."""
        try:
            site_key(self.model_dir)
        except (OSError, ValueError) as error:
            if isinstance(error, OSError) and not self._trainers:  # cannot be made here: never needed here
                logger.info("no pseudonym key in %s (%s): not needed, this server does not fine-tune", self.model_dir,
                            error)
                return
            logger.error("no pseudonym key in %s (%s): fine-tuning from corrections will fail until it can be made",
                         self.model_dir, error)

    def _reconcile_reviews(self) -> None:
        """The review queue's copy of each study's verdict (its info) made the log's again where a server killed
        between writing a verdict to the log and to the info left them apart (:func:`lib.activelearning
        .reconcile_reviews`). On a PACS: the series in the server's local cache, which hold their info (no request
        to the PACS); its review queue reads the verdicts from the log in any case."""
        try:
            fixed = reconcile_reviews(self.audit, self._datastore)
        except Exception as error:  # noqa: BLE001 - the server still starts; the trail (the log) is right anyway
            logger.warning("could not check the review queue's verdicts against the audit log: %s", error)
            return
        if fixed:
            logger.warning("the review queue's verdict of %s was not the audit log's latest (a server stopped between "
                           "the two writes): set from the log", ", ".join(fixed))

    def _verify_audit(self, in_server: bool) -> dict[str, Any]:
        """Verify the audit log's chain; a broken one is an ERROR in the log and makes the log refuse entries."""
        report = self.audit.verify()
        if report.ok:
            logger.info("%s%s", report.summary(), f" ({'; '.join(report.warnings)})" if report.warnings else "")
        else:
            logger.error("AUDIT TRAIL BROKEN: %s. Nothing that needs a record (results, verdicts, datastore changes, "
                         "weights) is done until an administrator has examined the log and moved it aside "
                         "(keep it as evidence); GET /review/audit/verify reports it.", report.summary())
            self.audit.refuse_appends(report)
        return report.to_dict()

    def init_datastore(self):
        """MONAI Label's datastore, each change of it an audit entry (:func:`lib.audit.recording.audited_datastore`);
        a local one lists a removed study no more once the removal is answered
        (:func:`lib.datastore.steady_datastore`); a DICOMweb one tells a PACS that is down in seconds
        (:func:`lib.pacs.bound_waits`), lists every series or fails (:func:`lib.pacs.whole_listing`), stops a
        download over the largest voxel limit of the served models (:func:`lib.pacs.bounded_downloads`), and has the
        partial downloads that a server stopped during them left in its cache folder removed
        (:func:`lib.pacs.remove_stale_downloads`), and keeps the labels saved for its series (corrections, region
        maps) in :attr:`corrections_dir`, never converted to a DICOM SEG nor sent to the PACS
        (:func:`lib.pacs_corrections.server_kept_labels`)."""
        datastore = steady_datastore(super().init_datastore())
        remove_stale_downloads(datastore)  # a killed server's partial series, untouched for an hour or more
        bound_waits(datastore)  # a PACS that is down: 503 in seconds, not 30 s per request
        whole_listing(datastore)  # a PACS that lists part of its series: an error, not studies missing in silence
        bounded_downloads(datastore, self._queue_voxel_limit)  # a series that grew: stopped, not held whole in memory
        # corrections kept here: no SEG, nothing sent to the PACS; those of the results stored in it not trained on
        server_kept_labels(datastore, self.corrections_dir, self.audit)
        return audited_datastore(datastore, self.audit, self._queue_voxel_limit)  # a study is hashed under it

    def info(self):
        """MONAI Label's app info plus ``audit``: the log's folder, its state at start-up and, when its chain is
        broken, a ``warning`` (``GET /info/`` shows the folder to admins only:
        :func:`lib.endpoints.guards.guarded_app_info`)."""
        meta = super().info()
        audit: dict[str, Any] = {"dir": self.audit_dir, "ok_at_start": self.audit_at_start["ok"],
                                 "entries_at_start": self.audit_at_start["entries"],
                                 "refusing_entries": self.audit.broken is not None}
        if self.audit.broken is not None:
            audit["warning"] = ("AUDIT TRAIL BROKEN: " + self.audit.broken.summary() + ". Results, verdicts and "
                                "datastore changes are refused until an administrator has dealt with it.")
        meta["audit"] = audit
        return meta

    def init_infers(self) -> Dict[str, InferTask]:
        return {name: config.infer() for name, config in self.models.items()}

    def init_trainers(self) -> Dict[str, TrainTask]:
        trainers = {name: config.trainer() for name, config in self.models.items()}
        return {name: task for name, task in trainers.items() if task is not None}

    def init_strategies(self) -> Dict[str, Strategy]:
        return {"next_unreviewed": NextUnreviewed(self.audit, self._queue_voxel_limit)}

    def _queue_voxel_limit(self) -> int:
        """The largest image the review queue hands out of a PACS: the largest any served model denoises
        (``--conf max_voxels_<model>``, else ``max_voxels``, else :func:`lib.imaging.max_voxels`); a series over it is
        skipped, not downloaded."""
        return max((getattr(task, "max_voxels", None) or max_voxels() for task in self._infers.values()),
                   default=max_voxels())

    def _queue_voxel_limit_setting(self) -> str:
        """The conf key that raises :meth:`_queue_voxel_limit`, for the 413 of a download stopped over it: the
        ``max_voxels_<model>`` of the model with the largest limit, ``max_voxels`` where a model at that limit has
        none of its own."""
        limit = self._queue_voxel_limit()
        settings = {getattr(task, "voxel_limit_setting", "max_voxels") for task in self._infers.values()
                    if (getattr(task, "max_voxels", None) or max_voxels()) == limit}
        return "max_voxels" if "max_voxels" in settings or not settings else sorted(settings)[0]

    def _model_voxel_limit(self, model) -> int:
        """The largest image the model ``model`` denoises (``--conf max_voxels_<model>``, else ``max_voxels``, else
        :func:`lib.imaging.max_voxels`)."""
        task = self._infers.get(model) if isinstance(model, str) else None
        return getattr(task, "max_voxels", None) or max_voxels()

    def _model_voxel_limit_words(self, model) -> tuple[str, str]:
        """("the limit" or "<model>'s limit", the conf key that raises it) of the model ``model``, for the 413s: a
        model with a limit of its own (``max_voxels_<model>``) is named."""
        task = self._infers.get(model) if isinstance(model, str) else None
        setting = getattr(task, "voxel_limit_setting", "max_voxels")
        return ("the limit" if setting == "max_voxels" else f"{model}'s limit"), setting

    def _refuse_oversized_series(self, store, image_id: str, model) -> SeriesSize | None:
        """413 before a PACS series over the model's voxel limit is downloaded: MONAI Label's DICOMweb datastore
        fetches a series whole (and converts it to NIfTI) before the reader's size check could refuse it. The size
        comes from the PACS's QIDO-RS answer; a series already downloaded, or one the PACS gives no size for, is
        checked by the reader as any image. A PACS that lists part of a series' instances (a limit on search
        results) gives its instance count: the size is then estimated from those listed
        (:func:`lib.pacs.series_voxels`). Returns the size asked (:func:`lib.pacs.known_size`; None: downloaded
        already, or not told), for the download not to ask it again."""
        limit = self._model_voxel_limit(model)
        whose, setting = self._model_voxel_limit_words(model)
        size = known_size(store, image_id, limit)
        if size is not None and size.voxels > limit:
            estimate = (f" (estimated: the PACS lists {size.listed} of its instances)"
                        if size.listed < size.instances else "")
            at_least = "at least " if size.stopped else ""  # where an earlier download was stopped: it holds more
            stopped = " (an earlier download of it was stopped over the limit)" if size.stopped else ""
            raise HTTPException(status_code=413, detail=(
                f"cannot denoise this image: series {image_id} is too large: {at_least}{size.instances} instances, "
                f"{size.voxels:,} voxels{estimate}{stopped} exceed {whose} of {limit:,} (raise it with --conf "
                f"{setting} on the server); nothing was downloaded"))
        return size

    def infer(self, request, datastore=None):
        """MONAI Label's infer, plus: a DICOMweb study is denoised from its DICOM files (not the datastore's NIfTI
        conversion); ``store_to_pacs`` sends the result back to the PACS as a derived series; every result is an
        audit entry (input identity, model, weights version and SHA-256, parameters, user, time) written before
        the result is returned: when it cannot be written the request fails (503 when the log cannot take it,
        :func:`lib.endpoints.review.recorded_access`). A request that fails once the result file exists (its entry,
        its store to the PACS, that store's entry) deletes it: it lay in the temp folder, a patient's volume nobody
        was sent. A PACS series whose cached download is of another study or patient than the PACS lists now is
        downloaded anew first (:func:`lib.pacs_corrections.refresh_moved_series`)."""
        try:
            self.audit.check_writable()
        except AuditBrokenError as error:
            raise HTTPException(status_code=503, detail=f"not denoised: {error}") from None
        store = datastore or self.datastore()
        image_id = request.get("image")
        # a datastore id is a plain name (the routes check it); uploads and sessions come as absolute paths. An id is
        # looked up in the datastore even when a file or folder of that name sits in the server's working
        # directory: MONAI Label's infer would read that instead (another patient's series, recorded as an upload).
        plain_name = (isinstance(image_id, str) and bool(image_id) and not os.path.isabs(image_id)
                      and os.sep not in image_id)
        known_id = plain_name and has_image(store, image_id)
        if plain_name and not known_id:  # removed since the route checked it (MONAI Label would answer 422)
            raise HTTPException(status_code=404, detail=f"no image {image_id!r} in the datastore")
        if known_id:
            try:
                refuse_unreviewable(self.audit, store, image_id)
            except ValueError as error:
                raise HTTPException(status_code=409, detail=str(error)) from None
        try:  # checked by the route's guard already: this is the same parser
            to_pacs = parse_bool(request.get("store_to_pacs", False), "store_to_pacs")
        except ValueError as error:
            raise HTTPException(status_code=422, detail=str(error)) from None
        source_folder = None
        if known_id and is_dicomweb(store):
            refresh_moved_series(store, image_id)  # a cached download of another patient than the PACS lists now
            size = self._refuse_oversized_series(store, image_id, request.get("model"))
            limit = self._model_voxel_limit(request.get("model"))
            try:  # the series may have grown since its size was asked: the download stops over the limit
                source_folder = series_folder(store, image_id, limit, size)
            except SeriesTooLarge as error:
                setting = self._model_voxel_limit_words(request.get("model"))[1]
                raise HTTPException(status_code=413, detail=f"cannot denoise this image: {error} (raise the limit "
                                                            f"with --conf {setting} on the server)") from None
            except SeriesDoesNotFit as error:  # the server's disk is short, not the series at fault
                logger.error("infer %s: %s", image_id, error)
                raise HTTPException(status_code=507, detail=f"not denoised: {error}") from None
            except SeriesNotDelivered as error:  # the PACS's failure, not the request's
                logger.error("infer %s: %s", image_id, error)
                raise HTTPException(status_code=502, detail=f"not denoised: {error}") from None
            except SeriesNotFetchableByFrame as error:  # the server's setting, not the PACS nor the request
                logger.error("infer %s: %s", image_id, error)
                raise HTTPException(status_code=501, detail=f"not denoised: {error}") from None
            request = dict(request, image=str(source_folder))
        elif known_id:
            uri = store.get_image_uri(image_id)  # the datastore's file, by absolute path
            if not uri or not os.path.exists(uri):  # removed from the folder, not yet from the listing
                raise HTTPException(status_code=404, detail=f"no image {image_id!r} in the datastore (its file was "
                                                            "removed)")
            request = dict(request, image=uri)
        if to_pacs and source_folder is None:
            raise HTTPException(status_code=422, detail="store_to_pacs needs a study of a DICOMweb datastore "
                                                        "(start the server with --studies http://.../dicom-web)")
        if to_pacs and str(request.get("result_extension", "")).strip().lower() in ("dicom", ".dcm", "dcm"):
            raise HTTPException(status_code=422, detail="store_to_pacs already writes DICOM: leave result_extension "
                                                        "at an image format")
        pool = self._infers_threadpool if isinstance(self._infers_threadpool, _InferPool) else None
        if pool is not None:
            pool.take_submitted()  # none of an earlier request of this thread
        try:
            result = super().infer(request, datastore)
        except BaseException as error:
            task = pool.take_submitted() if pool is not None else None
            if task is None:
                raise
            if not (task.wait_timed_out and isinstance(error, concurrent.futures.TimeoutError)):
                # the task's own error, or one raised after its result came: that result is nobody's
                if task.future.done():
                    _discard_late_result(task.future)
                raise
            from monailabel.config import settings

            seconds = request.get("timeout", settings.MONAI_LABEL_INFER_TIMEOUT)
            if task.future.cancel():  # not started yet (queued behind other denoisings): it never runs
                raise HTTPException(status_code=504, detail=(
                    f"not denoised within the timeout of {seconds:g} s (params.timeout, or MONAI_LABEL_INFER_TIMEOUT "
                    "on the server): the denoising had not started and will not run; send the request again with a "
                    "longer timeout")) from None
            # the task goes on in its thread: its result, a patient's volume nobody will be sent, is deleted when
            # it comes (at once if it just came)
            task.future.add_done_callback(_discard_late_result)
            raise HTTPException(status_code=504, detail=(
                f"not denoised within the timeout of {seconds:g} s (params.timeout, or MONAI_LABEL_INFER_TIMEOUT on "
                "the server): the result will not be sent (it is deleted when the server ends the denoising); send "
                "the request again with a longer timeout")) from None
        try:  # the result file (in the temp folder) goes with any failure from here: no caller gets it
            return self._recorded_and_stored(request, result, store, image_id if known_id else None, source_folder,
                                             to_pacs)
        except BaseException:
            discard_result(result)
            raise

    def _recorded_and_stored(self, request: dict, result: dict, store, image_id: Optional[str],
                             source_folder: Optional[Path], to_pacs: bool) -> dict:
        """:meth:`infer`'s ``result`` once its audit entry is written and, with ``to_pacs``, once it is stored in
        the PACS; what it raises, the caller deletes the result file for. ``image_id``: the datastore id, None for
        an upload or session."""
        params = result.get("params") or {}
        from lib.endpoints.review import recorded_access

        try:  # a result is access to patient data: never returned without its entry (503 when the log refuses it)
            entry = recorded_access(
                lambda: record_result(self.audit, result_fields(request, result, store, image_id, source_folder)),
                "denoised, but the result is not returned",
                f"result of {request.get('model')} for {image_id or 'an upload or session'}")
        except HTTPException:
            raise
        except Exception as error:  # noqa: BLE001 - whatever else stops the record stops the result
            logger.error("result of %s not returned: %s", request.get("model"), error)
            raise HTTPException(status_code=500, detail=f"denoised, but the result is not returned: its audit entry "
                                                        f"could not be written ({error})") from None
        params["audit_seq"] = entry["seq"]
        if to_pacs:
            pending: dict = {}

            def storing(series_uid: str) -> None:  # before the STOW: a store cut short is known as a result
                pending.update(self.audit.append("result_storing_to_pacs", {
                    "image": image_id, "result_seq": entry["seq"], "series_instance_uid": series_uid,
                    **request_actor()}))

            try:
                description = f"denoised {params.get('model')} {params.get('weights_version')}"
                params["stored_series"] = store_derived_series(
                    store, source_folder, result["file"], description,
                    denoising_derivation(params.get("model"), params.get("weights_version"),
                                         params.get("weights_sha256"), params.get("low_frequency_restoration")),
                    before_store=storing, max_voxels=self._model_voxel_limit(request.get("model")))
            except PacsStoreError as error:
                raise HTTPException(status_code=502, detail=f"denoised, but not stored in the PACS: {error}") from None
            except RequestException as error:
                if not read_timed_out(error):
                    raise  # cannot be reached: the routes' 503
                seconds = pacs_read_timeout_s()
                logger.error("infer %s: the PACS did not answer the store of the result within %g s", image_id, seconds)
                raise HTTPException(status_code=504, detail=(
                    f"denoised, but the PACS did not answer the store of the result within {seconds:g} s: whether it "
                    "stored the derived series is not known (the audit log's result_storing_to_pacs entry names it); "
                    "ADL_PACS_READ_TIMEOUT_S sets how long the server waits")) from None
            except ImageTooLargeError as error:  # a 413 (lib.endpoints), naming the model's own limit where it has one
                whose, setting = self._model_voxel_limit_words(request.get("model"))
                if setting == "max_voxels":
                    raise
                raise error.naming_limit(whose, f"--conf {setting} on the server") from None
            except AuditError as error:
                raise HTTPException(status_code=500, detail=f"denoised, but not stored in the PACS: its audit entry "
                                                            f"could not be written ({error})") from None
            try:
                self.audit.append("result_stored_to_pacs", {"image": image_id, "result_seq": entry["seq"],
                                                            "stored_series": params["stored_series"],
                                                            "pending_seq": pending.get("seq"), **request_actor()})
            except AuditError as error:
                raise HTTPException(status_code=500, detail=f"stored in the PACS as "
                                                            f"{params['stored_series'].get('series_instance_uid')}, "
                                                            f"but its audit entry could not be written ({error})"
                                    ) from None
        return result
