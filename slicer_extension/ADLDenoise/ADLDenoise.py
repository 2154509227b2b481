"""3D Slicer module: denoise CT / MR volumes on the ADL / TDDL-GCN MONAI Label server, compare, correct, review,
fine-tune.

Thin Qt glue over ``ADLDenoiseLib`` (Slicer-free client, background runner, workflow maths, MRML helpers). Every
network call, the content hash of the selected volume (of a copy of its voxels), the writing of the volume files
sent (from such a copy), the reading of the result file and of a review-queue study's file, the difference
volume's values (from copies) and the reading of a DICOM series' files run in a
:class:`ADLDenoiseLib.BackgroundTask` polled by a ``qt.QTimer``, so Slicer never freezes; MRML is only touched on
the GUI thread.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import qt
import slicer
import vtk
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from ADLDenoiseLib import (
    WINDOW_PRESETS,
    BackgroundTask,
    DenoiseServerClient,
    DenoiseServerError,
    LocalTasks,
    window_for,
)
from ADLDenoiseLib.regions import CHOICES, MAX_STRENGTH, SegmentMarks, build_region_map, prepare_region_file
from ADLDenoiseLib.review_session import (
    FILES_PENDING,
    FilesCheck,
    NotConfirmed,
    RescaleNotApplied,
    ReviewSession,
    SeriesMoved,
    StudyIdentity,
    VerdictRefused,
    VolumeChanged,
    WorkflowError,
    describe_error,
    describe_verdict,
    refused_as_moved,
    send_verdict,
    snapshot_matches_files,
)
from ADLDenoiseLib.series_files import NoReference, find_series_files
from ADLDenoiseLib.settings import (
    DEFAULT_SERVER_URL,
    MAX_RESTORATION_PX,
    MODALITY_AUTO,
    MODALITY_CHOICES,
    RESTORATION_AUTO,
    RESTORATION_SPIN_AUTO,
    RESTORATION_SPIN_STEP,
    applied_restoration,
    denoise_params,
    describe_modality,
    describe_restoration,
    request_modality,
    restoration_from_spin,
    supports_restoration,
)
from ADLDenoiseLib.volume_files import ResultRead, VolumeExport, prepare_upload, read_result, read_study, study_content
from ADLDenoiseLib.workflow import auto_window, difference

SETTINGS_PREFIX = "ADLDenoise/"
RESULT_SUFFIX = " denoised"
#: node attribute of a result: the lesion contrast restoration width the server applied, pixels ("0.0" = off)
RESTORATION_ATTRIBUTE = "ADLDenoise.lowFrequencyRestoration"
#: node attribute of a result: the modality the server denoised it as ("CT" / "MR")
MODALITY_ATTRIBUTE = "ADLDenoise.modality"
#: the Modality combo box's text per choice (``ADLDenoiseLib.settings.MODALITY_CHOICES``, its item data)
MODALITY_LABELS = {MODALITY_AUTO: "auto: the server decides", "ct": "CT", "mr": "MR"}


class ADLDenoise(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "ADL Denoise"
        self.parent.categories = ["Filtering.Denoising"]
        self.parent.contributors = ["ADL / TDDL-GCN denoising team"]
        self.parent.helpText = (
            "Denoise CT and MR volumes on a MONAI Label server running the ADL / TDDL-GCN app, compare the result "
            "with the original, correct it, review studies and fine-tune the models.")
        self.parent.acknowledgementText = (
            "ADL: Ghahremani et al., Adversarial Distortion Learning for Medical Image Denoising. TDDL-GCN: Chen, Pu, "
            "Ren et al. Built on MONAI Label.")


# ------------------------------------------------------------------------------------------------------ logic
class ADLDenoiseLogic(ScriptedLoadableModuleLogic):
    """Everything the widget does, callable without the widget (the module test uses it directly). The workflow
    state (study identity, result, correction, verdicts, fine-tuning, temporary patient files) lives in
    :class:`ADLDenoiseLib.review_session.ReviewSession`; methods marked "background" touch neither MRML nor Qt
    nor the session, so they may run in a :class:`BackgroundTask`."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self.client: DenoiseServerClient | None = None
        #: the connected server's denoising models by name (``DenoiseServerClient.denoising_models``)
        self.models: dict[str, dict] = {}
        self.session = ReviewSession()
        #: background hashes of selected volumes (``identify``): ticket -> (task, node ID, snapshot, server id, file)
        self.identifications: dict[int, tuple] = {}
        #: background reads of DICOM series' files: (identity, content hash) -> (task, node ID) (``identify``)
        self.files_checks: dict[tuple, tuple[BackgroundTask, str]] = {}

    @property
    def work_dir(self) -> Path:
        return self.session.work_dir

    # settings remembered between sessions (Slicer's settings file); GUI thread only (QSettings is not shared
    # between threads): nothing that runs in a BackgroundTask calls these
    @staticmethod
    def setting(key: str, default: str = "") -> str:
        value = qt.QSettings().value(SETTINGS_PREFIX + key)
        return str(value) if value not in (None, "") else default

    @staticmethod
    def set_setting(key: str, value: str) -> None:
        qt.QSettings().setValue(SETTINGS_PREFIX + key, value)

    def open_client(self, url: str, token: str | None = None, username: str = "", password: str = "",
                    report=None, cancelled=None) -> tuple[DenoiseServerClient, list[dict]]:
        """Background: a client of ``url`` (logged in first when a user name is given) and its denoising models.
        Changes nothing: :meth:`use_client` makes it the connected one, on the GUI thread, once the answer is
        taken, so that a Connect cancelled (or dropped by Close Scene) after the server answered leaves the
        module on the server it showed, not silently on the new one."""
        client = DenoiseServerClient(url, token=token or None)
        if username:
            client.login(username, password)
        return client, client.denoising_models()

    def use_client(self, client: DenoiseServerClient, models: list[dict]) -> None:
        """GUI thread: ``client`` becomes the connected server. Another server: the datastore ids recorded on the
        last one are forgotten before the new client is used, so nothing is sent there under an id it may give
        another patient. Signed in (a login or a token), a verdict may leave the reviewer name empty: the server
        records the token's user."""
        self.session.connected_to(client.server_url, (client.username or "") if client.token else None)
        self.client = client
        self.models = {m["name"]: m for m in models}

    def connect(self, url: str, token: str | None = None, username: str = "", password: str = "") -> list[dict]:
        """:meth:`open_client` then :meth:`use_client` in one call (the self-test; the widget runs the first in
        the background). Writes no setting: the widget remembers the address, and the self-test never does."""
        client, models = self.open_client(url, token, username, password)
        self.use_client(client, models)
        return models

    def refresh_models(self, report=None, cancelled=None) -> list[dict]:
        """Background: the connected server's denoising models again (the served weight versions after a
        fine-tuning run), with the client already connected: no new login (the password is not kept for one)."""
        models = self.require_client().denoising_models()
        self.models = {m["name"]: m for m in models}
        return models

    def require_client(self) -> DenoiseServerClient:
        if self.client is None:
            raise DenoiseServerError("connect to a server first")
        return self.client

    # --- identity (GUI thread; the hashing and the reading of files run in the background)
    def identify(self, node, server_id: str | None = None, study_file=None,
                 content: StudyIdentity | None = None) -> int:
        """Start identifying ``node`` (SeriesInstanceUID or content hash, plus the sequence frame): its voxels are
        copied here (``mrml.volume_snapshot``: Slicer's array may change under a thread) and hashed in a
        :class:`BackgroundTask` (0.2-0.8 s for 512 x 512 x 400 voxels, which froze Slicer at every selection); the
        session has no study until :meth:`poll_identifications` gives it the answer, and refuses to act meanwhile.
        A DICOM volume edited in place is a new study identified by its content (``ReviewSession.as_loaded``).
        ``server_id`` / ``study_file``: a review-queue study just loaded: the server holds these voxels under that id
        (recorded once hashed). ``content``: the node's content identity hashed already, in the background, from the
        array the node was just made of (``mrml.loaded_identity``): nothing is copied or hashed here, the answer
        goes through the same ticket. Returns the session's ticket."""
        from ADLDenoiseLib.mrml import volume_snapshot

        if node is None:
            raise WorkflowError("select a CT or MR volume first")
        if content is None:
            snapshot = volume_snapshot(node)
            ticket = self.session.identifying(node.GetID(), snapshot.series, snapshot.name)
            task = BackgroundTask(snapshot.content, name="ADLDenoise identity")
        else:  # no DICOM series (loaded_identity checked it): no files check, so no snapshot is kept for one
            snapshot = None
            ticket = self.session.identifying(node.GetID(), None, content.name)
            task = BackgroundTask(lambda report, cancelled: content, name="ADLDenoise identity (hashed when read)")
        self.identifications[ticket] = (task, node.GetID(), snapshot, server_id, study_file)
        return ticket

    def identify_and_wait(self, node, timeout: float = 600.0) -> StudyIdentity:
        """:meth:`identify`, then wait for the answer (the self-test; the widget polls instead)."""
        task = self.identifications[self.identify(node)][0]
        task.wait(timeout)
        self.poll_identifications()
        return self.session.require_study()

    def poll_identifications(self) -> list[str]:
        """GUI thread: hand the session the identities hashed in the background (``ReviewSession.identified``: an
        answer for a volume no longer selected, or changed since its copy, is dropped there) and the answers of the
        series' files read (``ReviewSession.files_read``); returns the IDs of the nodes concerned."""
        ended = []
        for ticket, (task, node_id, snapshot, server_id, study_file) in list(self.identifications.items()):
            if not task.finished:
                continue
            del self.identifications[ticket]
            if task.state != "done":
                if self.session.identification_failed(ticket, task.error or "cancelled"):
                    ended.append(node_id)
                continue
            content = task.result
            if server_id:  # the copy was taken right after loading the server's file: these are its voxels
                try:
                    self.session.record_upload(content, server_id, study_file)
                except WorkflowError as error:
                    logging.warning("ADLDenoise: %s", error)
            # the reference of a DICOM volume seen for the first time is its series' files, compared with the same
            # copy in the background, so that an edit made before this first look is seen too
            if self.session.identified(ticket, content, lambda: self.start_files_check(node_id, snapshot,
                                                                                       content.key)) is not None:
                ended.append(node_id)
        for key, (task, node_id) in list(self.files_checks.items()):
            if not task.finished:
                continue
            del self.files_checks[key]
            if task.state == "failed":
                logging.warning("ADLDenoise: could not compare %s with its files: %s", node_id, task.error)
            elif isinstance(task.result, FilesCheck) and task.result.untold:  # said on the status line too
                logging.info("ADLDenoise: %s not compared with its DICOM files: %s", node_id, task.result.untold)
            self.session.files_read(*key, task.result if task.state == "done" else None)
            warning = self.session.rescale_warning(key[0])  # wrong values: on the status line too, and asked
            if warning:  # before anything is sent (ReviewSession.require_study)
                logging.warning("ADLDenoise: %s: %s", node_id, warning)
            ended.append(node_id)
        return ended

    @staticmethod
    def series_files_of(node, identity: StudyIdentity) -> list[str] | NoReference:
        """GUI thread: the files a DICOM volume was loaded from, found in Slicer's DICOM database by the SOP
        Instance UIDs of its subject-hierarchy item; a ``NoReference`` saying why when they cannot be
        (``find_series_files``: a 4D sequence frame, not loaded from DICOM files, no open DICOM database, an
        instance not in it)."""
        from ADLDenoiseLib.mrml import dicom_instance_uids

        database = getattr(slicer, "dicomDatabase", None)
        lookup = database.fileForInstance if database is not None and database.isOpen else None
        return find_series_files(dicom_instance_uids(node), lookup, identity.frame)

    def start_files_check(self, node_id: str, snapshot, content_key: str):
        """GUI thread (``ReviewSession.as_loaded``'s ``files_match``): compare the series' files with the copy of
        the voxels hashed (``snapshot``) in the background (``snapshot_matches_files``: pydicom and numpy, SimpleITK
        for JPEG Lossless);
        FILES_PENDING, or a ``NoReference`` saying why the files cannot be found (the voxels seen now are the
        reference then, and the status line says why: ``ReviewSession.describe_study``; None: the node is gone)."""
        node = slicer.mrmlScene.GetNodeByID(node_id)
        files = self.series_files_of(node, snapshot.series) if node is not None else None
        if not isinstance(files, list):
            if files is not None:
                logging.info("ADLDenoise: %s not compared with its DICOM files: %s", node_id, files.reason)
            return files
        task = BackgroundTask(lambda report, cancelled: snapshot_matches_files(snapshot, files),
                              name="ADLDenoise series files")
        self.files_checks[(snapshot.series, content_key)] = (task, node_id)
        return FILES_PENDING

    def cancel_files_checks(self) -> None:
        """Scene closed or module closed: the identifications and reads still running are dropped (node IDs
        restart)."""
        for task, *_ in [*self.identifications.values(), *self.files_checks.values()]:
            task.cancel()
        self.identifications.clear()
        self.files_checks.clear()

    # --- denoise (a copy of the voxels on the GUI thread; check, file, request and reading of the result in the
    # background; a new node from the result's array on the GUI thread)
    def export_input(self, identity: StudyIdentity, snapshot) -> VolumeExport:
        """GUI thread, no file written: the file the original is sent as, written in the background
        (``prepare_upload``) from ``snapshot``, the copy of its voxels the request's check hashes
        (:meth:`request_check`): the file holds the very voxels verified."""
        return VolumeExport(snapshot, self.work_dir / "exports" / f"{identity.datastore_id()}.nrrd")

    def export_correction(self, node, identity: StudyIdentity) -> VolumeExport:
        """GUI thread, no file written: a copy of the corrected volume's voxels and grid (the blend slider updates
        the node in place meanwhile), written in the background by :meth:`submit_correction`."""
        from ADLDenoiseLib.mrml import volume_copy

        return VolumeExport(volume_copy(node), self.work_dir / "corrections" / f"{identity.datastore_id()}.nrrd")

    def request_check(self, node) -> tuple:
        """GUI thread, when a request for the selected study starts: a copy of ``node``'s voxels now (the file sent
        is written from it) and the content the study was identified from, for ``verify_snapshot`` in the
        background (``prepare_upload``)."""
        from ADLDenoiseLib.mrml import volume_snapshot

        return volume_snapshot(node), self.session.study_content

    def denoise_file(self, model: str, upload: VolumeExport | Path | None, modality: str, output_dir: Path,
                     restoration: str | float = RESTORATION_AUTO, image_id: str | None = None, check=None,
                     report=None, cancelled=None):
        """Background. ``restoration``: lesion contrast restoration, "auto" or a width in pixels (0 = off); sent
        only when ``model`` takes it (``ADLDenoiseLib.settings.denoise_params``). ``image_id``: the datastore id
        of a study the server holds (``ReviewSession.server_id``): it is denoised there by id, so the server
        records the result as that study's and a verdict judges it; otherwise ``upload`` is written
        (:meth:`export_input`) and uploaded. ``check``: :meth:`request_check`'s, verified before the file is
        written and anything is sent; its copy's grid is the one the result is put on when read. Returns the
        result file read here (:class:`ResultRead`, for :meth:`load_result`) and the server's JSON."""
        client = self.require_client()
        path = prepare_upload(check, upload, report, cancelled)
        params = denoise_params(self.models.get(model), modality, restoration)
        if report:
            report(None, f"denoising with {model} on {client.server_url} ...")
        result_path, result = client.denoise(model, path, output_dir, params, image_id=image_id)
        if cancelled and cancelled():
            return None
        snapshot = check[0] if check is not None else None
        grid = (snapshot.voxels.shape, snapshot.ijk_to_ras) if snapshot is not None else None
        return read_result(result_path, grid, report, cancelled), result

    def load_result(self, original, identity: StudyIdentity, loaded: ResultRead, result: dict):
        """GUI thread: show the result of ``identity`` when that study is still selected; a late result of another
        study is not loaded (returns None). ``loaded``: the result file read in the background
        (:meth:`denoise_file`); no file is read here, its array becomes a new node's voxels (``take_voxels``: not
        copied)."""
        from ADLDenoiseLib.mrml import load_result

        if identity != self.session.study:
            return None
        # tagged as this study's result: never taken for a study itself, and may hold its marked regions
        # denoised from frames with wrong values (a rescale Slicer's reader ignored): the result says so too
        node = load_result(slicer.mrmlScene, loaded, original, RESULT_SUFFIX, study=identity.datastore_id(),
                           warning=self.session.result_warning(identity))
        node.SetAttribute("ADLDenoise.model", str(result.get("model")))
        node.SetAttribute("ADLDenoise.weightsVersion", str(result.get("weights_version")))
        width = applied_restoration(result)
        if width is not None:  # learned models only: a classical model's result has no such width
            node.SetAttribute(RESTORATION_ATTRIBUTE, str(width))
        if result.get("modality"):  # what it was denoised as: the server's default or guess, for a non-DICOM volume
            node.SetAttribute(MODALITY_ATTRIBUTE, str(result["modality"]))
        # its audit entry: the verdict names it, so the server records the verdict against this very result
        self.session.result_arrived(identity, node.GetID(), str(result.get("model") or ""),
                                    str(result.get("weights_version") or ""), result.get("audit_seq"))
        return node

    @staticmethod
    def modality_of(identity: StudyIdentity, choice: str = MODALITY_AUTO) -> str:
        """The request's modality: "ct" / "mr" from the DICOM series' Modality (subject hierarchy), else the user's
        choice under Modality, by default "auto": the server's own default modality decides (its conf ``modality``,
        else its guess from the values), never a guess of the module's that would override it."""
        return request_modality(identity.modality, choice)

    # --- corrections and review
    def prepare_study(self, node, identity: StudyIdentity) -> dict:
        """On the GUI thread: what the background upload needs (no MRML access happens off this thread)."""
        session = self.session
        on_server = session.is_on_server(identity)
        check = self.request_check(node)
        upload = None if on_server else self.export_input(identity, check[0])  # written in the background
        return {"identity": identity, "image_id": session.datastore_id(identity), "on_server": on_server,
                "opened": session.opened_as(identity, node.GetID()), "name": identity.datastore_id(), "path": upload,
                "grid_file": session.study_files.get(identity) or (upload.path if upload else None), "check": check}

    def record_study(self, study: dict, image_id: str) -> None:
        """GUI thread: the server holds the study as ``image_id`` (after an upload done in the background)."""
        self.session.record_upload(study["identity"], image_id, study.get("grid_file"))

    def prepare_regions(self, segmentation_node, reference, marks: SegmentMarks, study: dict) -> dict | None:
        """On the GUI thread: the marked segments as a label map on ``reference``'s grid and their declarations
        (None when no segment is marked). Validation errors (a segmentation drawn on another study, empty
        segment, bad strength) are raised here, before anything is uploaded."""
        from ADLDenoiseLib.mrml import check_segmentation_reference, segment_masks, segments_of, volume_grid

        if segmentation_node is None:
            return None
        marks.sync(segments_of(segmentation_node))
        marked = marks.marked()
        if not marked:
            return None
        # the export below would resample a segmentation of any study onto this one's grid
        check_segmentation_reference(segmentation_node, reference, study["identity"].datastore_id())
        grid = volume_grid(reference)
        masks = segment_masks(segmentation_node, [segment_id for segment_id, _ in marked], reference)
        region_map, _ = build_region_map(masks, [region for _, region in marked], grid.shape)
        return {"map": region_map, "grid": grid, "regions": [region for _, region in marked],
                "study_file": study.get("grid_file"),
                "path": self.work_dir / "regions" / f"{study['name']}.nii.gz"}

    def study_id_for(self, study: dict, report=None) -> str:
        """Background: the datastore id of the original, uploading it first (under the id derived from its
        identity, its file written here: ``prepare_study``) when the server does not hold it. The server answers 409
        when that id holds other content. First of all, the volume must still hold the voxels it was identified from
        (``study["check"]``)."""
        path = prepare_upload(study.get("check"), study["path"], report)
        if study["on_server"]:
            return study["image_id"]
        if report:
            report(None, f"uploading the original as {study['image_id']} ...")
        image_id = self.require_client().upload_image(path, study["image_id"])
        if image_id != study["image_id"]:
            raise DenoiseServerError(f"the server stored the upload as {image_id!r}, not {study['image_id']!r}")
        return image_id

    def next_study(self, studies_dir: Path, report=None, cancelled=None) -> dict:
        """Background: the review queue's next study, downloaded into ``studies_dir`` and read there
        (``read_study``: the voxels and grid Slicer's loader gives the file, this file alone) with the window Slicer's
        automatic window/level gives it (``auto_window``) and the content identity of its node hashed from the array
        read (``study_content``), for :meth:`load_study`. ``{"empty": True, "skipped": ...}`` when nothing is left
        to review (``skipped``: the series the queue skipped, ``ReviewSession.describe_skipped``). An unreadable file
        raises ``VolumeUnreadable`` (nothing is loaded)."""
        client = self.require_client()
        answer = client.next_study()
        study = ReviewSession.queue_answer(answer)
        if study is None:
            return {"empty": True, "skipped": ReviewSession.describe_skipped(answer)}
        if report:
            report(None, f"downloading {study['id']} ...")
        path, opened = client.download_opened(study["id"], studies_dir)  # this download's patient and study
        volume = read_study(path, study["id"], report, cancelled)
        if report:
            report(None, f"identifying {study['id']} (hashing its voxels) ...")
        return {"study": study, "path": path, "opened": opened, "volume": volume,
                "window": auto_window(volume.voxels), "content": study_content(volume, study["id"])}

    def load_study(self, answer: dict):
        """GUI thread: the node of a study :meth:`next_study` read (no file is read here), named after the server's
        id, and its identification started with that id, from the identity hashed in the background from the array
        the node is made of (``loaded_identity``: no copy, no hash here; a copy of the node hashed as for any volume
        when the node's grid reads back otherwise), so the server's id is recorded for the very voxels it sent
        (``poll_identifications``)."""
        from ADLDenoiseLib.mrml import load_study, loaded_identity

        study, path = answer["study"], answer["path"]
        node = load_study(slicer.mrmlScene, answer["volume"], study["id"], answer["window"])
        content = loaded_identity(node, answer["volume"], answer["content"])
        # the server's id is kept for this content (recorded once identified): corrections and verdicts go there
        self.identify(node, server_id=study["id"], study_file=path, content=content)
        # the patient and study this node was opened as: its corrections and verdicts confirm them, not a later
        # download's of the same series (moved to another patient meanwhile)
        self.session.record_opened(node.GetID(), study["id"], answer.get("opened"))
        return node

    def submit_correction(self, study: dict, corrected: VolumeExport | Path, reviewer: str,
                          regions: dict | None = None, model: str | None = None, result_seq: int | None = None,
                          report=None, cancelled=None) -> tuple[str, dict]:
        """Background: write the correction's file (:meth:`export_correction`) before anything is sent, upload the
        original if needed, then the marked regions (``prepare_regions``), the correction, the verdict; returns
        (datastore id, verdict entry). Regions go first and the correction names their SHA-256, so that the server
        binds the two: a correction is never stored without the regions sent with it, and a later correction sent
        without regions is not trained with this one's. ``result_seq`` and ``model``: the server's entry and the
        model of the result corrected (``ReviewSession.verdict_request``): the verdict judges that very result, or
        is refused (:class:`VerdictRefused`), never another run's. Nothing is sent for a study whose frames hold
        wrong values (``ReviewSession.require_correctable``), whoever calls this (the widget asks it first)."""
        self.session.require_correctable(study["identity"])
        client = self.require_client()
        corrected_path = prepare_upload(None, corrected, report, cancelled)
        image_id = self.study_id_for(study, report)
        opened = study.get("opened", {})  # the patient and study the node was opened as (ReviewSession.opened_as)
        regions_sha256 = None
        if regions is not None:
            if report:
                report(None, f"saving {len(regions['regions'])} marked region(s) ...")
            path = prepare_region_file(regions["map"], regions["grid"], regions["path"], regions["study_file"])
            with refused_as_moved(image_id, "correction"):  # a moved series: said in the module's words
                regions_sha256 = client.save_regions(image_id, path, regions["regions"], opened=opened)["sha256"]
        if report:
            report(None, "saving the correction ...")
        with refused_as_moved(image_id, "correction"):
            client.save_correction(image_id, corrected_path, regions_sha256=regions_sha256, opened=opened)
        request = {"verdict": "corrected", "reviewer": reviewer, "model": model, "result_seq": result_seq,
                   "opened": opened}
        return image_id, send_verdict(client, image_id, request,
                                      done_before=f"the correction was saved as {image_id}'s final label")

    def submit_verdict(self, study: dict, request: dict, report=None, cancelled=None) -> tuple[str, dict]:
        """Background: upload the study if the server does not hold it, then send the verdict of ``request``
        (``ReviewSession.verdict_request``: it names the result on screen, so a 409 is :class:`VerdictRefused`);
        returns (datastore id, verdict entry). Nothing is sent for a study whose frames hold wrong values
        (``ReviewSession.require_judgeable``: its result was denoised from them), whoever calls this (the widget
        asks it first)."""
        self.session.require_judgeable(study["identity"])
        client = self.require_client()
        image_id = self.study_id_for(study, report)
        opened = study.get("opened", {})  # the patient and study the node was opened as (ReviewSession.opened_as)
        return image_id, send_verdict(client, image_id, dict(request, opened=opened))


# ------------------------------------------------------------------------------------------------------ widget
class ADLDenoiseWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Qt wiring only: the workflow's state and rules are in ``self.logic.session`` (:class:`ReviewSession`)."""

    #: ms the blend slider must rest before the volume is re-blended (no re-blend per drag step)
    BLEND_DELAY_MS = 300
    #: ms a selected volume changed in place must rest before it is identified again
    REIDENTIFY_DELAY_MS = 500

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: ADLDenoiseLogic | None = None
        self.task: BackgroundTask | None = None
        self.on_done = None
        self.on_fail = None
        self.train_poll: BackgroundTask | None = None
        #: what is computed locally from copies (the difference), beside the one request ``self.task``
        self.local_tasks = LocalTasks()
        self.roi_node = None
        self.corrected_node = None
        self.marks = SegmentMarks()
        self.segmentation_node = None
        #: what to do once the selected volume is identified (``whenIdentified``): a review-queue study's Denoise, a
        #: result that came back while the volume was being identified again
        self.identity_waiters = []

    def setup(self):
        from ADLDenoiseLib.mrml import EXCLUDED_VOLUME_TYPES

        ScriptedLoadableModuleWidget.setup(self)
        ui_widget = slicer.util.loadUI(self.resourcePath("UI/ADLDenoise.ui"))
        self.layout.addWidget(ui_widget)
        self.ui = slicer.util.childWidgetVariables(ui_widget)
        ui_widget.setMRMLScene(slicer.mrmlScene)
        self.logic = ADLDenoiseLogic()

        self.ui.serverUrlEdit.text = self.logic.setting("serverUrl", DEFAULT_SERVER_URL)
        self.ui.usernameEdit.text = self.logic.setting("username", "")  # the password and token are never stored
        self.ui.passwordEdit.echoMode = qt.QLineEdit.Password
        self.ui.tokenEdit.echoMode = qt.QLineEdit.Password
        self.ui.reviewerEdit.text = self.logic.setting("reviewer", "")
        # scalar CT / MR volumes only: no subclass (label maps, vector / RGB, tensor, DWI / DTI volumes all derive
        # from vtkMRMLScalarVolumeNode; qMRMLNodeComboBox.showChildNodeTypes false hides them, hideChildNodeTypes
        # names them in case a later Slicer changes the default)
        self.ui.inputVolumeSelector.nodeTypes = ["vtkMRMLScalarVolumeNode"]
        self.ui.inputVolumeSelector.showChildNodeTypes = False
        self.ui.inputVolumeSelector.hideChildNodeTypes = list(EXCLUDED_VOLUME_TYPES)
        self.ui.inputVolumeSelector.addEnabled = False
        self.ui.inputVolumeSelector.removeEnabled = False
        self.ui.inputVolumeSelector.noneEnabled = True
        self.ui.inputVolumeSelector.setMRMLScene(slicer.mrmlScene)
        for slider in (self.ui.fadeSlider, self.ui.blendSlider):
            slider.minimum, slider.maximum, slider.singleStep = 0.0, 1.0, 0.05
        self.ui.fadeSlider.value = 1.0
        self.ui.blendSlider.value = 1.0
        self.ui.blendSlider.tracking = False  # ctkSliderWidget: valueChanged on release, not per drag step
        self.ui.presetCombo.addItems(list(WINDOW_PRESETS))
        for choice in MODALITY_CHOICES:  # item data: the request's value
            self.ui.modalityCombo.addItem(MODALITY_LABELS[choice], choice)
        self.ui.trainModeCombo.addItems(["corrections", "adapt_noise"])
        self.ui.segmentationSelector.nodeTypes = ["vtkMRMLSegmentationNode"]
        self.ui.segmentationSelector.addEnabled = False
        self.ui.segmentationSelector.removeEnabled = False
        self.ui.segmentationSelector.noneEnabled = True
        self.ui.segmentationSelector.setMRMLScene(slicer.mrmlScene)
        self.ui.regionsTable.setColumnCount(3)
        self.ui.regionsTable.setHorizontalHeaderLabels(["Segment", "Intent", "Strength"])
        self.ui.regionsTable.horizontalHeader().setSectionResizeMode(0, qt.QHeaderView.Stretch)
        self.ui.regionsTable.verticalHeader().setVisible(False)
        self.ui.trainStepsSpin.minimum, self.ui.trainStepsSpin.maximum, self.ui.trainStepsSpin.value = 1, 100000, 200
        # lesion contrast restoration: the minimum, one step below 0 = off, reads "auto" (specialValueText)
        spin = self.ui.restorationSpin
        spin.decimals, spin.singleStep = 2, RESTORATION_SPIN_STEP
        spin.minimum, spin.maximum = RESTORATION_SPIN_AUTO, MAX_RESTORATION_PX
        spin.specialValueText = RESTORATION_AUTO
        spin.value = RESTORATION_SPIN_AUTO
        spin.enabled = False  # until a model that takes it is chosen (onModelChanged)

        self.ui.connectButton.connect("clicked(bool)", self.onConnect)
        self.ui.modelsCombo.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.inputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onVolumeChanged)
        self.ui.denoiseButton.connect("clicked(bool)", self.onDenoise)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.compareButton.connect("clicked(bool)", self.onCompare)
        self.ui.fadeSlider.connect("valueChanged(double)", self.onFade)
        self.ui.differenceButton.connect("clicked(bool)", self.onDifference)
        self.ui.presetCombo.connect("currentIndexChanged(int)", self.onPreset)
        self.ui.placeRoiButton.connect("clicked(bool)", self.onPlaceRoi)
        self.ui.roiStatsButton.connect("clicked(bool)", self.onRoiStatistics)
        self.ui.blendSlider.connect("valueChanged(double)", self.onBlendSliderMoved)
        self.ui.submitCorrectionButton.connect("clicked(bool)", self.onSubmitCorrection)
        self.ui.segmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onSegmentationChanged)
        self.ui.nextStudyButton.connect("clicked(bool)", self.onNextStudy)
        self.ui.acceptButton.connect("clicked(bool)", lambda checked=False: self.onVerdict("accepted"))
        self.ui.rejectButton.connect("clicked(bool)", lambda checked=False: self.onVerdict("rejected"))
        self.ui.trainButton.connect("clicked(bool)", self.onTrain)
        self.ui.stopTrainButton.connect("clicked(bool)", self.onStopTrain)
        self.ui.reviewerEdit.connect("editingFinished()", lambda: self.logic.set_setting("reviewer",
                                                                                         self.ui.reviewerEdit.text))

        self.timer = qt.QTimer()
        self.timer.setInterval(200)
        self.timer.connect("timeout()", self.onPoll)
        self.train_timer = qt.QTimer()
        self.train_timer.setInterval(2000)
        self.train_timer.connect("timeout()", self.onTrainPoll)
        # the difference is computed beside a request (no server call): its answer is collected here
        self.local_timer = qt.QTimer()
        self.local_timer.setInterval(200)
        self.local_timer.connect("timeout()", self.onLocalTasks)
        # the selected volume is hashed, and a DICOM volume's files compared with it, in the background
        # (logic.identify): their answers are collected here
        self.files_timer = qt.QTimer()
        self.files_timer.setInterval(200)
        self.files_timer.connect("timeout()", self.onIdentified)
        self.files_timer.start()
        # a volume changed in place (4D frame, edit) is identified again once it rests (not per frame of a playing
        # sequence)
        self.reidentify_timer = qt.QTimer()
        self.reidentify_timer.setSingleShot(True)
        self.reidentify_timer.setInterval(self.REIDENTIFY_DELAY_MS)
        self.reidentify_timer.connect("timeout()", self.onReidentify)
        # typing a strength or pressing arrow keys also emits valueChanged: blend once the slider rests
        self.blend_timer = qt.QTimer()
        self.blend_timer.setSingleShot(True)
        self.blend_timer.setInterval(self.BLEND_DELAY_MS)
        self.blend_timer.connect("timeout()", self.onBlend)
        # Close Scene (vtkMRMLScene::Clear) restarts node IDs: forget every per-study record and delete the files
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

    def cleanup(self):
        self.timer.stop()
        self.blend_timer.stop()
        self.train_timer.stop()
        self.local_timer.stop()
        self.local_tasks.cancel_all()
        self.files_timer.stop()
        self.reidentify_timer.stop()
        self.identity_waiters = []
        if self.logic is not None:
            self.logic.cancel_files_checks()
        if self.task is not None:
            self.task.cancel()
        self.segmentation_node = None
        self.removeObservers()
        if self.logic is not None:
            left = self.logic.session.close()  # deletes the temporary patient files
            if left:
                logging.warning("ADLDenoise: could not delete %s", ", ".join(str(p) for p in left))

    # --- scene
    def onSceneStartClose(self, caller=None, event=None):
        if self.task is not None:
            self.task.cancel()  # its answer belongs to a study of the closing scene
        self.local_tasks.cancel_all()  # so does a difference's
        self.blend_timer.stop()
        self.reidentify_timer.stop()
        self.identity_waiters = []
        self.logic.cancel_files_checks()  # node IDs restart: a late answer would name another scene's node

    def onSceneEndClose(self, caller=None, event=None):
        self.logic.session.scene_closed()
        self.corrected_node = None
        self.roi_node = None
        self.removeObservers(self.onOriginalWindowChanged)
        self.removeObservers(self.onInputModified)
        self.ui.statusLabel.text = ""
        self.ui.reviewStatusLabel.text = ""
        self.ui.roiStatsLabel.text = ""

    def onVolumeChanged(self, node=None):
        """Another volume selected: a new study (its identity computed now; a volume this module made is refused
        there); the blend and the regions table's choices of the last one are dropped."""
        from ADLDenoiseLib.mrml import INPUT_CHANGE_EVENTS

        self.blend_timer.stop()
        self.reidentify_timer.stop()
        self.identity_waiters = []  # they were for the volume selected before
        self.corrected_node = None
        # the table's choices were made for the last study's segments: none is carried into this one
        self.marks = SegmentMarks()
        self.onSegmentsChanged()
        # a 4D sequence's browser copies each frame into this same node, and modules may edit it in place: no
        # other node is selected then, so the node itself is watched
        self.removeObservers(self.onInputModified)
        if node is not None:
            for event in INPUT_CHANGE_EVENTS:
                self.addObserver(node, event, self.onInputModified)
        if node is None:
            self.logic.session.select(None)
            self.showModality(None)
            return
        try:
            if not self.logic.session.identifying_node(node.GetID()):  # (a review-queue study is already)
                self.logic.identify(node)  # in the background: the status line says so meanwhile
        except Exception as error:  # noqa: BLE001
            self.logic.session.select(None)
            self.showModality(None)
            self.error(describe_error(error))
            return
        self.showModality(self.logic.session.pending.series)  # a DICOM series' Modality is known before its hash
        self.ui.statusLabel.text = self.studyText(node, None)

    def showModality(self, identity) -> None:
        """The Modality choice for a newly selected volume: a DICOM CT / MR series shows its Modality, fixed; any
        other volume starts at "auto" (the server's default decides), never at the last volume's choice."""
        combo = self.ui.modalityCombo
        series = identity.modality if identity is not None and identity.modality in ("CT", "MR") else ""
        combo.setCurrentIndex(combo.findData(series.lower() if series else MODALITY_AUTO))
        combo.enabled = not series
        combo.toolTip = (f"{series}: the series' DICOM Modality" if series else
                         "This volume carries no DICOM Modality. auto: the server's default modality decides (its "
                         "conf 'modality', else a guess from the values: HU-like CT); choose CT or MR to decide "
                         "yourself. The status line says which one was used.")

    def onIdentified(self):
        """A background identification (or comparison of a DICOM volume with its files) ended: for the selected
        volume the status line says what it is now (a new study when it no longer holds its series' voxels), and
        what waited for its identity runs (``whenIdentified``)."""
        if not (self.logic.identifications or self.logic.files_checks):
            return
        ended = self.logic.poll_identifications()
        node = self.ui.inputVolumeSelector.currentNode()
        if node is None or node.GetID() not in ended:
            return
        session = self.logic.session
        try:
            identity = session.require_identified()
        except WorkflowError as error:  # its hash failed: no dialog from a timer, actions refuse with the reason
            self.identity_waiters = []
            self.ui.statusLabel.text = describe_error(error)
            return
        self.ui.statusLabel.text = self.studyText(node, identity)
        if session.checking(identity):
            return  # its files are still compared with it: nothing is done for it before the answer
        waiting, self.identity_waiters = self.identity_waiters, []
        for action in waiting:
            try:
                action()
            except Exception as error:  # noqa: BLE001 - shown like any failed action
                self.error(error)

    def whenIdentified(self, action) -> None:
        """Run ``action`` once the selected volume's identity is known (now if it is): dropped when another volume
        is selected or the scene closes."""
        session = self.logic.session
        if session.pending is None and not session.study_stale and not session.checking(session.study):
            action()
        else:
            self.identity_waiters.append(action)

    def onInputModified(self, caller=None, event=None):
        """The selected volume's voxels, geometry or 4D frame changed: its result and blend may belong to other
        voxels now. Marked here (this runs for every frame of a playing sequence); the volume is identified again
        in the background once it rests (or by the next action that needs it: :meth:`refreshStaleIdentity`)."""
        self.blend_timer.stop()
        self.logic.session.input_modified()
        self.reidentify_timer.start()

    def onReidentify(self):
        try:
            self.refreshStaleIdentity()
        except Exception as error:  # noqa: BLE001 - no dialog from a timer
            self.ui.statusLabel.text = describe_error(error)

    def refreshStaleIdentity(self) -> None:
        """Start identifying the selected volume again (in the background) if it changed in place since it was
        identified (its study may now be another frame or other voxels, with no result); nothing is done for it
        until the answer is in (``ReviewSession.require_study``)."""
        session = self.logic.session
        if session.study_stale and session.pending is None:
            node = self.ui.inputVolumeSelector.currentNode()
            if node is None:
                session.select(None)
            else:
                self.logic.identify(node)
                self.ui.statusLabel.text = self.studyText(node, None)

    def studyText(self, node, identity) -> str:
        """The status line of a selected study (``ReviewSession.describe_study``): the 4D frame sent, else its
        identity, with why it was not compared with its DICOM files (a 4D frame never is) and the warning of frames
        with wrong values; always the note that a DICOM volume was edited in place (its earlier result and server
        copy are not used). ``identity`` None: being identified."""
        if identity is None:
            pending = self.logic.session.pending
            return f"identifying {pending.name if pending else node.GetName()} (hashing its voxels) ..."
        if self.logic.session.checking(identity):
            return f"{identity.describe()}: comparing it with its DICOM files (an edit made before it was selected " \
                   "would make it a new study) ..."
        return self.logic.session.describe_study(identity, self.frameText(node))

    @staticmethod
    def frameText(node) -> str:
        """For a 4D sequence's proxy node: which frame is sent (the result is kept for that frame only)."""
        from ADLDenoiseLib.mrml import sequence_frame

        info = sequence_frame(node) if node is not None else None
        if not info:
            return ""
        return (f"4D sequence: frame {info['frame'] + 1} of {info['count']}"
                + (f" ({info['index']})" if info["index"] else "") + " is sent; its result is kept for that frame")

    # --- helpers
    def error(self, message) -> None:
        declined = isinstance(message, NotConfirmed)  # the user just answered a question: no second dialog
        message = describe_error(message) if isinstance(message, BaseException) else str(message)
        self.ui.statusLabel.text = message
        if not declined:
            slicer.util.errorDisplay(message, windowTitle="ADL Denoise")

    def model(self) -> str:
        combo = self.ui.modelsCombo
        return combo.itemData(combo.currentIndex) or combo.currentText if combo.count else ""

    def onScreen(self):
        """The volume on screen (the selection), refused unless it is the node the session's study belongs to
        (``ReviewSession.require_on_screen``): asked first by every action that sends data about the study, before
        anything is identified again, confirmed or sent. Refused, the volume on screen is taken as newly selected
        (:meth:`onVolumeChanged`): identified afresh, its input watched, and the last volume's region choices,
        correction and identity waiters dropped, none of them carried over to this patient's study."""
        original = self.ui.inputVolumeSelector.currentNode()
        try:
            self.logic.session.require_on_screen(original.GetID() if original is not None else None)
        except WorkflowError:
            self.onVolumeChanged(original)
            raise
        return original

    def selected(self):
        """(original node, its identity) of the selection; refused while it is being identified (also again, after
        it changed in place: content, frame) and while a DICOM volume is compared with its files (it may be an
        edited one): nothing is sent for it with an identity not its own; first of all, unless it is the node the
        session's study belongs to (:meth:`onScreen`). A volume with frames whose rescale Slicer's reader ignored
        (wrong values) is sent only once the user confirms (``RescaleNotApplied``)."""
        original = self.onScreen()
        self.refreshStaleIdentity()
        session = self.logic.session
        try:
            return original, session.require_study()
        except RescaleNotApplied as refusal:
            if not slicer.util.confirmOkCancelDisplay(refusal.question, windowTitle="ADL Denoise"):
                raise refusal.declined() from None
            session.accept_ignored_rescale(refusal.identity)
            logging.warning("ADLDenoise: sending %s confirmed by the user although %s", refusal.identity.describe(),
                            refusal.warning)
            return original, session.require_study()

    def sliceView(self, name: str):
        """The slice view ``name`` ("Red" or "Yellow") shown in the layout. A layout that does not show it (3D
        only, one view, a custom layout) is switched to side by side, Red and Yellow
        (``vtkMRMLLayoutNode::SlicerLayoutSideBySideView``): Slicer creates a view's widget only for a layout
        that holds it (``sliceWidget`` is None before), and a volume set in a hidden view is never seen."""
        layout_manager = slicer.app.layoutManager()
        widget = layout_manager.sliceWidget(name)
        if widget is None or not widget.mrmlSliceNode().IsViewVisibleInLayout():
            layout_manager.setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutSideBySideView)
            widget = layout_manager.sliceWidget(name)
        if widget is None:
            raise WorkflowError(f"Slicer shows no {name} slice view: choose a layout with the {name} view "
                                "(e.g. Conventional or Side by side)")
        return widget

    def original_and_result(self):
        """The selected node and the node of its study's result (None when not denoised); refused while the volume
        is being identified (no hashing here: this runs per slider step), and unless the volume on screen is the
        node the session's study belongs to (:meth:`onScreen`: else the result shown would be another volume's)."""
        original = self.onScreen()
        self.refreshStaleIdentity()
        self.logic.session.require_identified()
        record = self.logic.session.result()
        result = slicer.mrmlScene.GetNodeByID(record.node_id) if record else None
        if record is not None and result is None:  # the user deleted the result node
            self.logic.session.forget_result(record.node_id)
        return original, result

    def run(self, function, *args, on_done=None, on_fail=None, busy_text="working ..."):
        """Start a background call; ``on_done(result)`` runs on the GUI thread when it succeeds (also with a None
        result: an empty answer is for ``on_done`` to judge), ``on_fail(error)`` when it fails."""
        if self.task is not None and self.task.finished:
            # the last request ended but the timer has not delivered it yet (a click within its 200 ms): deliver it
            # now, or starting this one would replace its task and callbacks and drop its answer without a word
            self.onPoll()
        if self.task is not None and not self.task.finished:
            self.error("another request is still running: wait for it or press Cancel")
            if on_fail is not None:
                on_fail(None)
            return
        self.task = BackgroundTask(function, *args)
        self.on_done, self.on_fail = on_done, on_fail
        self.ui.progressBar.setRange(0, 0)  # busy indicator
        self.ui.statusLabel.text = busy_text
        self.ui.cancelButton.enabled = True
        self.timer.start()

    def onPoll(self):
        if self.task is None:
            self.timer.stop()
            return
        state = self.task.poll()
        self.ui.statusLabel.text = f"{state['message']} ({state['seconds']:.0f} s)"
        if state["progress"] is not None:
            self.ui.progressBar.setRange(0, 100)
            self.ui.progressBar.value = int(100 * state["progress"])
        if not self.task.finished:
            return
        self.timer.stop()
        self.ui.cancelButton.enabled = False
        self.ui.progressBar.setRange(0, 100)
        task, self.task = self.task, None
        on_done, on_fail, self.on_done, self.on_fail = self.on_done, self.on_fail, None, None
        if task.state == "failed":
            self.ui.progressBar.value = 0
            if on_fail is not None:
                on_fail(task.error)
            self.error(task.error)
        elif task.state == "cancelled":
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = "cancelled (the scene is unchanged)"
            if on_fail is not None:
                on_fail(None)
        elif on_done is not None:
            self.ui.progressBar.value = 100
            try:
                on_done(task.result)
            except Exception as error:  # noqa: BLE001 - shown to the user; the scene keeps what it had
                logging.error("ADLDenoise: %s", describe_error(error))  # the client's messages hold no token
                if on_fail is not None:  # an answer refused (e.g. an empty body) is a failure too: undo the start
                    on_fail(error)
                self.error(error)

    # --- server
    def onConnect(self):
        url = self.ui.serverUrlEdit.text.strip()
        username = self.ui.usernameEdit.text.strip()
        password = self.ui.passwordEdit.text
        token = self.ui.tokenEdit.text.strip() or None

        def done(answer):
            client, models = ReviewSession.require_answer(answer, "the connection")
            models = ReviewSession.require_answer(models, "the list of models")
            self.logic.use_client(client, models)  # only now, with the answer taken: Cancel leaves the last server
            # settings are written here, on the GUI thread, once the address proved right
            self.logic.set_setting("serverUrl", url)
            self.logic.set_setting("username", username)
            self.ui.passwordEdit.text = ""  # not kept in the widget longer than needed
            self.showModels(models)
            who = f" as {username}" if username else (" with a token" if token else "")
            # signed in, the server records the login's user as reviewer: the name field may stay empty
            self.ui.reviewerEdit.placeholderText = (f"optional: recorded as your login ({username})" if username else
                                                   "optional: recorded as the token's user" if token else "your name")
            self.ui.statusLabel.text = f"connected to {url}{who}: {len(models)} denoising model(s)"

        self.run(self.logic.open_client, url, token, username, password, on_done=done,
                 busy_text=f"connecting to {url} ...")

    def showModels(self, models: list[dict]) -> None:
        """Fill the model list, keeping the model chosen so far selected when the server still offers it."""
        chosen = self.model()
        self.ui.modelsCombo.clear()
        for model in models:
            self.ui.modelsCombo.addItem(f"{model['name']}: {model['method']}", model["name"])
        index = self.ui.modelsCombo.findData(chosen) if chosen else -1
        if index >= 0:
            self.ui.modelsCombo.setCurrentIndex(index)
        self.models = {m["name"]: m for m in models}
        self.onModelChanged()
        self.showVersion()

    def refreshModels(self):
        """After a fine-tuning run: the served versions again, from the connected server without a new login (the
        password field was emptied at Connect, so Connect again would fail with "enter a user name and a
        password"). While another request runs nothing is started and no dialog pops up: the label says to press
        Connect."""
        if self.task is not None and not self.task.finished:
            self.ui.versionLabel.text = "a new version may be served: press Connect to see it"
            return

        def done(models):
            self.showModels(ReviewSession.require_answer(models, "the list of models"))

        self.run(self.logic.refresh_models, on_done=done, busy_text="reading the served versions ...")

    def onModelChanged(self, *_):
        model = getattr(self, "models", {}).get(self.model())
        self.ui.restorationSpin.enabled = supports_restoration(model)  # learned models only
        if not model:
            self.ui.modelInfoLabel.text = "no model"
            return
        parts = []
        for modality, weights in model["weights"].items():
            parts.append(f"{modality.upper()}: " + (f"weights {weights['version']}" if weights.get("available")
                                                    else "no weights installed"))
        self.ui.modelInfoLabel.text = "; ".join(parts)

    def showVersion(self):
        model = getattr(self, "models", {}).get(self.model())
        if model:
            self.ui.versionLabel.text = "serving " + ", ".join(
                f"{m.upper()} {w.get('version', '-')}" for m, w in model["weights"].items())

    # --- denoise
    def onDenoise(self):
        from ADLDenoiseLib.mrml import looks_like_ct

        model = self.model()
        try:
            if not model:
                raise DenoiseServerError("connect to a server and choose a model first")
            original, identity = self.selected()
            # a study the server holds (review queue, uploaded) is denoised there by id: its result is then
            # recorded as that study's, which is what a verdict judges; any other volume is uploaded
            image_id = self.logic.session.server_id(identity)
            # a copy of the voxels now; the background task checks it, writes the file from it and sends it
            check = self.logic.request_check(original)
            path = None if image_id else self.logic.export_input(identity, check[0])
            modality = self.logic.modality_of(identity, self.ui.modalityCombo.itemData(
                self.ui.modalityCombo.currentIndex))
            # the module's own look at the values, to warn when the server's default or guess disagrees with it
            looks_ct = looks_like_ct(original) if modality == MODALITY_AUTO else None
            output_dir = self.logic.work_dir / "results"
            frame = self.frameText(original)
            restoration = restoration_from_spin(self.ui.restorationSpin.value, self.ui.restorationSpin.minimum)
        except Exception as error:  # noqa: BLE001
            self.error(error)
            return

        def done(answer):
            if answer is None:
                raise WorkflowError("the server answered the denoising request with an empty body")
            loaded, result = answer  # the result file, read in the background
            self.refreshStaleIdentity()  # the node changed in place meanwhile (4D frame): is it still this study?
            if self.logic.session.pending is not None:  # being identified: attached once known to be this study
                self.ui.statusLabel.text = f"{self.studyText(original, None)} (a result came back for it)"
                self.whenIdentified(lambda: done(answer))
                return None
            node = self.logic.load_result(original, identity, loaded, result)
            if node is None:  # the user moved on (other volume, closed scene): not attached to another study
                self.ui.statusLabel.text = f"a result for {identity.describe()} arrived late and was discarded"
                return None
            self.corrected_node = None  # a new result: a blend of the old one is no correction of this one
            restored = describe_restoration(result)  # the width the server applied (learned models)
            # which modality was used and why (DICOM, the user's choice, the server's default or guess)
            used = describe_modality(result, identity.modality, modality, looks_ct)
            line = (f"denoised with {result.get('model')} ({used}; weights {result.get('weights_version')}) in "
                    f"{result.get('seconds')} s" + (f"; {restored}" if restored else "")
                    + (f"; {frame}" if frame else ""))
            # first of all the warning of a result denoised from wrong values (ReviewSession.describe_result)
            self.ui.statusLabel.text = self.logic.session.describe_result(identity, line)
            self.onCompare()
            return node

        self.run(self.logic.denoise_file, model, path, modality, output_dir, restoration, image_id, check,
                 on_done=done, on_fail=self.requestFailed, busy_text=f"denoising with {model} ..." + (f" ({frame})" if frame else ""))

    def onCancel(self):
        if self.task is not None:
            self.task.cancel()

    # --- compare
    def onCompare(self):
        from ADLDenoiseLib.mrml import match_orientation_and_link

        try:
            original, result = self.original_and_result()
            if result is None:
                raise WorkflowError("denoise the volume first")
        except WorkflowError as error:
            self.error(error)
            return
        slicer.app.layoutManager().setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutSideBySideView)
        try:
            views = {name: self.sliceView(name) for name in ("Red", "Yellow")}
        except WorkflowError as error:
            self.error(error)
            return
        composites = []
        for view, volume in (("Red", original), ("Yellow", result)):
            composite = views[view].mrmlSliceCompositeNode()
            composite.SetBackgroundVolumeID(volume.GetID())
            composite.SetForegroundVolumeID(None)
            composites.append(composite)
        # the layout's "Axial" applies to new views only: Yellow keeps e.g. sagittal. Give it Red's orientation
        # first, then link (slice position, zoom and orientation follow each other)
        match_orientation_and_link(views["Red"].mrmlSliceNode(), views["Yellow"].mrmlSliceNode(), composites)
        for view in ("Red", "Yellow"):
            views[view].sliceLogic().FitSliceToAll()
        # window/level of the denoised view follows the original's
        self.removeObservers(self.onOriginalWindowChanged)
        if original.GetDisplayNode() is not None:  # a volume added without display nodes has no window to follow
            self.addObserver(original.GetDisplayNode(), vtk.vtkCommand.ModifiedEvent, self.onOriginalWindowChanged)
        self.onOriginalWindowChanged()

    def onOriginalWindowChanged(self, *_):
        try:
            original, result = self.original_and_result()
        except Exception:  # noqa: BLE001 - no dialog per slider step or window change
            return
        if result is not None and original.GetDisplayNode() and result.GetDisplayNode():
            source, target = original.GetDisplayNode(), result.GetDisplayNode()
            target.SetAutoWindowLevel(False)
            target.SetWindowLevel(source.GetWindow(), source.GetLevel())

    def onFade(self, value):
        try:
            original, result = self.original_and_result()
        except Exception:  # noqa: BLE001 - no dialog per slider step or window change
            return
        if result is None:
            return
        try:
            composite = self.sliceView("Red").mrmlSliceCompositeNode()
        except WorkflowError as error:  # no dialog per slider step
            self.ui.statusLabel.text = describe_error(error)
            return
        composite.SetBackgroundVolumeID(original.GetID())
        composite.SetForegroundVolumeID(result.GetID())
        composite.SetForegroundOpacity(float(value))

    def onDifference(self):
        """Copies of both volumes' voxels here; their difference in the background; a new node from it here. Nothing
        is sent to a server and no workflow state changes, so it runs at once, also while a request runs, in a task of
        its own (``LocalTasks``) that leaves the request's task, answer, progress bar and Cancel button alone."""
        from ADLDenoiseLib.mrml import difference_inputs, difference_volume

        try:
            if self.local_tasks.running("difference"):
                raise WorkflowError("the difference is still being computed: wait a moment")
            original, result = self.original_and_result()
            if result is None:
                raise WorkflowError("denoise the volume first")
            copies = difference_inputs(original, result)
        except Exception as error:  # noqa: BLE001
            self.error(error)
            return
        ids = (original.GetID(), result.GetID())

        def done(values):
            try:
                now = self.original_and_result()
            except WorkflowError:  # another volume, being identified (e.g. the next study loaded meanwhile)
                now = (None, None)
            if (now[0].GetID() if now[0] is not None else None, now[1].GetID() if now[1] is not None else None) != ids:
                self.localStatus("the volumes changed meanwhile: press Difference again")
                return
            node = difference_volume(slicer.mrmlScene, original, result, values=values)
            slicer.util.setSliceViewerLayers(background=node)
            self.localStatus(f"{node.GetName()}: what the denoiser removed")

        self.local_tasks.start("difference", lambda report, cancelled: difference(*copies), done,
                               name="ADLDenoise difference")
        self.local_timer.start()
        self.localStatus("computing the difference ...")

    def onLocalTasks(self):
        """The answers of what runs beside a request (``LocalTasks``): shown, failures in a dialog."""
        errors = self.local_tasks.poll()
        if not self.local_tasks.busy:
            self.local_timer.stop()
        for error in errors:
            self.error(error)

    def localStatus(self, text: str) -> None:
        """The status line of a local task, unless a request runs: the request's progress is shown there then."""
        if self.task is None:
            self.ui.statusLabel.text = text

    def onPreset(self, *_):
        preset = self.ui.presetCombo.currentText
        try:
            original, result = self.original_and_result()
            width, level = window_for(preset, slicer.util.arrayFromVolume(original))
        except Exception as error:  # noqa: BLE001
            self.ui.statusLabel.text = describe_error(error)
            return
        for node in (original, result):
            if node is not None and node.GetDisplayNode() is not None:
                node.GetDisplayNode().SetAutoWindowLevel(False)
                node.GetDisplayNode().SetWindowLevel(width, level)

    def onPlaceRoi(self):
        original = self.ui.inputVolumeSelector.currentNode()
        if original is None:
            self.error("select a volume first")
            return
        try:
            slice_node = self.sliceView("Red").mrmlSliceNode()
        except WorkflowError as error:
            self.error(error)
            return
        if self.roi_node is None or slicer.mrmlScene.GetNodeByID(self.roi_node.GetID()) is None:
            self.roi_node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "noise ROI")
        # a 20 mm box at the centre of the current red slice; the user drags it into a uniform region
        center = [slice_node.GetSliceToRAS().GetElement(i, 3) for i in range(3)]
        self.roi_node.SetCenter(center)
        self.roi_node.SetSize(20.0, 20.0, 6.0)
        self.ui.roiStatsLabel.text = "drag the box into a uniform region, then press ROI statistics"

    def onRoiStatistics(self):
        from ADLDenoiseLib.mrml import roi_statistics_for_roi_node

        try:
            original, result = self.original_and_result()
            if result is None or self.roi_node is None:
                raise WorkflowError("denoise the volume and place the ROI first")
            stats = roi_statistics_for_roi_node(original, result, self.roi_node)
        except Exception as error:  # noqa: BLE001
            self.error(error)
            return
        self.ui.roiStatsLabel.text = (
            f"original: mean {stats['mean_original']:.1f}, std {stats['std_original']:.1f}; denoised: mean "
            f"{stats['mean_denoised']:.1f}, std {stats['std_denoised']:.1f}; noise reduction "
            f"{stats['noise_reduction_percent']:.0f} % ({stats['voxels']} voxels)")

    # --- correct
    def onBlendSliderMoved(self, value=None):
        """Every slider change only (re)starts a short timer; :meth:`onBlend` runs once the slider rests. With
        no volume or no result there is nothing to blend: a hint, no dialog."""
        try:
            self.refreshStaleIdentity()
        except Exception as error:  # noqa: BLE001 - no dialog per slider step
            self.ui.statusLabel.text = describe_error(error)
            return
        node = self.ui.inputVolumeSelector.currentNode()
        if node is None or self.logic.session.result() is None:
            self.blend_timer.stop()
            self.ui.statusLabel.text = (self.studyText(node, None) if node is not None and self.logic.session.pending
                                        else "select and denoise a volume to blend")
            return
        self.blend_timer.start()

    def onBlend(self):
        from ADLDenoiseLib.mrml import blended_volume

        try:
            original, result = self.original_and_result()
            if result is None:
                return
            strength = float(self.ui.blendSlider.value)
            self.corrected_node = blended_volume(slicer.mrmlScene, original, result, strength,
                                                 node=self.corrected_node)
            self.logic.session.blended(strength, self.corrected_node.GetID())
            view = self.sliceView("Yellow")
        except Exception as error:  # noqa: BLE001
            self.ui.statusLabel.text = describe_error(error)
            return
        view.mrmlSliceCompositeNode().SetBackgroundVolumeID(self.corrected_node.GetID())

    def onSubmitCorrection(self):
        from ADLDenoiseLib.mrml import blended_volume

        try:
            reviewer = self.logic.session.reviewer_name(self.ui.reviewerEdit.text)  # optional when signed in
            self.blend_timer.stop()
            # the volume on screen must be the study's, then its frames right: refused before selected() would
            # identify it again or ask to confirm sending it
            self.logic.session.require_correctable(on_screen=self.onScreen().GetID())
            original, identity = self.selected()  # re-identified: a changed volume or frame drops the blend
            original, result = self.original_and_result()
            if result is None:
                raise WorkflowError("denoise the volume first")
            blend = self.logic.session.correction_to_submit(identity)
            # the verdict names the result corrected (its model and server entry): judged, or refused, never another
            request = self.logic.session.verdict_request("corrected", reviewer, on_screen=original.GetID())
            corrected = slicer.mrmlScene.GetNodeByID(blend.node_id) if blend is not None else None
            if corrected is None:  # nothing blended for this study and result: blend now at the slider's value
                corrected = blended_volume(slicer.mrmlScene, original, result, float(self.ui.blendSlider.value),
                                           node=self.corrected_node)
                self.corrected_node = corrected
                blend = self.logic.session.blended(float(self.ui.blendSlider.value), corrected.GetID())
            path = self.logic.export_correction(corrected, identity)  # a copy: written in the background
            study = self.logic.prepare_study(original, identity)
            regions = self.logic.prepare_regions(self.ui.segmentationSelector.currentNode(), original, self.marks,
                                                 study)
        except Exception as error:  # noqa: BLE001
            self.error(error)
            return
        what = (f"correction (strength {blend.strength:.2f}) saved"
                + (f" with {len(regions['regions'])} marked region(s)" if regions else ""))

        def done(answer):
            image_id, entry = ReviewSession.require_answer(answer, "the correction")
            self.logic.record_study(study, image_id)
            self.afterVerdict(identity, entry, what)

        self.run(self.logic.submit_correction, study, path, request["reviewer"], regions, request["model"],
                 request["result_seq"], on_done=done, on_fail=lambda error: self.verdictFailed(identity, error),
                 busy_text="submitting ...")

    # --- marked regions
    def onSegmentationChanged(self, node=None):
        if self.segmentation_node is not None:
            self.removeObservers(self.onSegmentsChanged)
        self.segmentation_node = node
        if node is not None:
            segmentation = node.GetSegmentation()
            for event in (slicer.vtkSegmentation.SegmentAdded, slicer.vtkSegmentation.SegmentRemoved,
                          slicer.vtkSegmentation.SegmentModified, slicer.vtkSegmentation.SegmentsOrderModified):
                self.addObserver(segmentation, event, self.onSegmentsChanged)
        self.onSegmentsChanged()

    def onSegmentsChanged(self, *_):
        from ADLDenoiseLib.mrml import segments_of

        segments = segments_of(self.segmentation_node)
        if [(r["id"], r["name"]) for r in self.marks.rows()] == segments and \
                self.ui.regionsTable.rowCount == len(segments):
            return  # painting modifies segments all the time: rebuild only when ids, names or order change
        self.marks.sync(segments)
        self.fillRegionsTable()

    def fillRegionsTable(self):
        table = self.ui.regionsTable
        table.setRowCount(0)
        rows = self.marks.rows()
        table.setRowCount(len(rows))
        for index, row in enumerate(rows):
            item = qt.QTableWidgetItem(row["name"])
            item.setFlags(qt.Qt.ItemIsEnabled | qt.Qt.ItemIsSelectable)
            table.setItem(index, 0, item)
            combo = qt.QComboBox()
            combo.addItems(list(CHOICES))
            combo.setCurrentIndex(list(CHOICES).index(row["choice"]))
            spin = qt.QDoubleSpinBox()
            spin.minimum, spin.maximum, spin.singleStep, spin.decimals = 0.0, MAX_STRENGTH, 0.1, 2
            spin.value = row["strength"]
            spin.enabled = row["choice"] == "strength"
            spin.toolTip = "0 = original input, 1 = as corrected, 2 = smoother"
            combo.connect("currentIndexChanged(int)",
                          lambda _, sid=row["id"], c=combo, s=spin: self.onRegionChoice(sid, c, s))
            spin.connect("valueChanged(double)", lambda value, sid=row["id"]: self.marks.set_strength(sid, value))
            table.setCellWidget(index, 1, combo)
            table.setCellWidget(index, 2, spin)

    def onRegionChoice(self, segment_id: str, combo, spin):
        self.marks.choose(segment_id, combo.currentText)
        spin.enabled = combo.currentText == "strength"

    # --- review queue
    def onNextStudy(self):
        """The next study is downloaded and read in the background (``next_study``); here only its node is made
        from the array read, shown, and denoised once identified."""
        studies_dir = self.logic.work_dir / "studies"  # made on the GUI thread; deleted with the scene

        def done(answer):
            answer = ReviewSession.require_answer(answer, "the review queue")
            if answer.get("empty"):
                self.ui.reviewStatusLabel.text = (f"nothing to review here: {answer['skipped']}"
                                                  if answer.get("skipped") else "the review queue is empty")
                return
            study = answer["study"]
            node = self.logic.load_study(answer)  # identified with the server's id before anything else sees it
            self.ui.inputVolumeSelector.setCurrentNode(node)  # -> onVolumeChanged: blend dropped
            # shown in the slice views, as slicer.util.loadVolume shows a volume it loads (qSlicerVolumesReader)
            application = slicer.app.applicationLogic()
            application.GetSelectionNode().SetActiveVolumeID(node.GetID())
            application.PropagateVolumeSelection()
            skipped = ReviewSession.describe_skipped(study)
            self.ui.reviewStatusLabel.text = (f"study {study['id']} ({study.get('remaining_unreviewed', '?')} "
                                              "unreviewed)" + (f"; {skipped}" if skipped else ""))
            self.whenIdentified(self.onDenoise)

        self.run(self.logic.next_study, studies_dir, on_done=done, busy_text="asking for the next study ...")

    def onVerdict(self, verdict: str):
        try:
            # the volume on screen must be the study's, then its frames right: refused before selected() would
            # identify it again or ask to confirm sending it
            self.logic.session.require_judgeable(on_screen=self.onScreen().GetID())
            original, identity = self.selected()
            request = self.logic.session.verdict_request(verdict, self.ui.reviewerEdit.text,
                                                         self.ui.rejectReasonEdit.text, on_screen=original.GetID())
            study = self.logic.prepare_study(original, identity)
        except Exception as error:  # noqa: BLE001
            self.error(error)
            return

        def done(answer):
            image_id, entry = ReviewSession.require_answer(answer, "the verdict")
            self.logic.record_study(study, image_id)
            self.afterVerdict(request["identity"], entry, verdict)

        self.run(self.logic.submit_verdict, study, request, on_done=done,
                 on_fail=lambda error: self.verdictFailed(request["identity"], error),
                 busy_text="recording the verdict ...")

    def afterVerdict(self, identity: StudyIdentity, entry, what):
        entry = self.logic.session.verdict_recorded(identity, entry)
        self.ui.reviewStatusLabel.text = f"{describe_verdict(entry, what)}; press Next study to go on"
        self.ui.rejectReasonEdit.text = ""

    def requestFailed(self, error) -> None:
        """A request refused because the volume's voxels changed without Slicer being told (``VolumeChanged``):
        identified again, as for a change Slicer reports (any other failure is only shown)."""
        if isinstance(error, VolumeChanged):
            self.logic.session.input_modified()
            self.reidentify_timer.start()

    def verdictFailed(self, identity: StudyIdentity, error) -> None:
        """A verdict was refused because the result on screen is not the server's study's result (any other
        failure is only shown): its result and server id are forgotten, so Denoise sends the volume again; one
        refused because the PACS moved the series says to open it again (its id kept)."""
        self.requestFailed(error)
        if isinstance(error, VerdictRefused):
            self.logic.session.verdict_refused(identity)
            self.ui.reviewStatusLabel.text = "verdict not recorded: denoise the volume again"
        elif isinstance(error, SeriesMoved):  # its id stays: the series is opened again, not uploaded
            self.ui.reviewStatusLabel.text = \
                f"{error.what} not {'saved' if error.what == 'correction' else 'recorded'}: the PACS moved the " \
                "series; open it again (Next study)"

    # --- fine-tune
    def onTrain(self):
        model = self.model()
        params = {"mode": self.ui.trainModeCombo.currentText, "steps": int(self.ui.trainStepsSpin.value)}
        try:
            self.logic.session.start_training(model)  # refused while a run of this module is still watched
        except WorkflowError as error:
            self.error(error)
            return

        def done(answer):
            ReviewSession.require_answer(answer, "the fine-tuning request")
            self.ui.trainStatusLabel.text = f"training {model} started"
            self.ui.stopTrainButton.enabled = True
            self.train_timer.start()

        self.run(lambda report, cancelled: self.logic.require_client().start_training(model, params), on_done=done,
                 on_fail=lambda error: self.logic.session.training_finished(),
                 busy_text=f"starting fine-tuning of {model} ...")

    def onStopTrain(self):
        self.run(lambda report, cancelled: self.logic.require_client().stop_training(),
                 on_done=lambda _: setattr(self.ui.trainStatusLabel, "text", "stop requested"),
                 busy_text="stopping the training ...")

    def onTrainPoll(self):
        if self.train_poll is not None and not self.train_poll.finished:
            return
        model = self.logic.session.training_model or self.model()
        if self.train_poll is not None and self.train_poll.state == "failed":
            self.ui.trainStatusLabel.text = describe_error(self.train_poll.error)
        if self.train_poll is not None and self.train_poll.state == "done":
            stats = self.train_poll.result or {}
            text = f"{stats.get('status', '?')}: {stats.get('phase', '')}"
            if stats.get("step") is not None:
                text += f", step {stats['step']} of {stats.get('total_steps')}"
            if stats.get("baseline_psnr") is not None:
                text += f"; served {stats['baseline_psnr']:.2f} dB"
            if stats.get("candidate_psnr") is not None:
                text += f", new {stats['candidate_psnr']:.2f} dB"
            decision = stats.get("decision")
            if decision:
                text += "; published " + str(decision["version"]) if decision.get("published") else \
                    "; not published (no better than the served model)"
            self.ui.trainStatusLabel.text = text
            if stats.get("status") in ("done", "failed", "interrupted"):
                self.train_timer.stop()
                self.train_poll = None
                self.logic.session.training_finished()
                self.ui.stopTrainButton.enabled = False
                self.refreshModels()  # the served versions (no new login: the password is not kept)
                return
        self.train_poll = BackgroundTask(lambda report, cancelled: self.logic.require_client().training_stats(model))


# ------------------------------------------------------------------------------------------------------ test
class ADLDenoiseTest(ScriptedLoadableModuleTest):
    """The whole workflow inside Slicer against a running server: set ADL_DENOISE_SERVER (default
    http://127.0.0.1:8000; start one with ./run.sh). Uses a synthetic CT phantom in HU built here, so no data
    is downloaded."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_workflow()

    def test_workflow(self):
        import numpy as np

        from ADLDenoiseLib.mrml import blended_volume, difference_volume, roi_statistics_for_roi_node

        url = os.environ.get("ADL_DENOISE_SERVER", DEFAULT_SERVER_URL)
        logic = ADLDenoiseLogic()
        self.addCleanup(logic.session.close)  # the test's patient-like files go too
        try:
            # connect() writes no setting: the user's saved server address is never replaced by the test's
            models = logic.connect(url, os.environ.get("ADL_DENOISE_TOKEN") or None)
        except DenoiseServerError as error:
            if error.status is not None:
                raise
            self.skipTest(f"ADLDenoise test skipped: no server at {url} ({error}); start one with ./run.sh or set "
                          "ADL_DENOISE_SERVER")
        self.assertTrue(models, "the server offers no denoising model")
        model = next((m["name"] for m in models if m["weights"].get("ct", {}).get("available")), None)
        self.assertIsNotNone(model, "no model with CT weights on the server")

        rng = np.random.default_rng(0)
        zz, yy, xx = np.mgrid[0:8, 0:128, 0:128]
        phantom = np.where((yy - 64) ** 2 + (xx - 64) ** 2 < 50 ** 2, 40.0, -1000.0).astype(np.float32)
        noisy = phantom + rng.normal(0, 30, phantom.shape).astype(np.float32)
        original = slicer.util.addVolumeFromArray(noisy, name="phantom CT")
        original.SetSpacing(0.8, 0.8, 2.0)

        identity = logic.identify_and_wait(original)
        self.assertEqual(identity.kind, "content")  # not from DICOM: keyed by voxels + geometry
        check = logic.request_check(original)  # written in the background by the widget; here, by denoise_file
        upload = logic.export_input(identity, check[0])
        loaded, result = logic.denoise_file(model, upload, "ct", logic.work_dir / "results", check=check)
        self.assertTrue(upload.path.is_file())
        self.assertEqual(loaded.error, "")  # read in the background (here: by denoise_file)
        denoised = logic.load_result(original, identity, loaded, result)
        self.assertEqual(logic.session.result().node_id, denoised.GetID())
        self.assertEqual(denoised.GetName(), "phantom CT" + RESULT_SUFFIX)
        self.assertEqual(slicer.util.arrayFromVolume(denoised).shape, noisy.shape)
        if supports_restoration(logic.models[model]):  # the width applied is kept on the result
            self.assertEqual(denoised.GetAttribute(RESTORATION_ATTRIBUTE),
                             str(float(result["low_frequency_restoration"])))

        difference_volume(slicer.mrmlScene, original, denoised)
        roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
        roi.SetCenter([0.0, 0.0, 0.0])
        roi.SetSize(10.0, 10.0, 4.0)
        stats = roi_statistics_for_roi_node(original, denoised, roi)
        self.assertGreater(stats["voxels"], 10)
        corrected = blended_volume(slicer.mrmlScene, original, denoised, 0.7)

        # marked regions: a "keep" lesion and a strength region that overlaps it (the later segment wins)
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "marks")
        segmentation.CreateDefaultDisplayNodes()
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(original)
        lesion, soft = np.zeros(noisy.shape, np.uint8), np.zeros(noisy.shape, np.uint8)
        lesion[3:5, 60:70, 60:70] = 1
        soft[:, 66:90, 40:90] = 1
        for name, mask in (("lesion 1", lesion), ("soft tissue", soft)):
            segment_id = segmentation.GetSegmentation().AddEmptySegment("", name)
            slicer.util.updateSegmentBinaryLabelmapFromArray(mask, segmentation, segment_id, original)
        marks = SegmentMarks()
        from ADLDenoiseLib.mrml import segments_of

        (lesion_id, _), (soft_id, _) = segments_of(segmentation)
        marks.sync(segments_of(segmentation))
        marks.choose(lesion_id, "keep structure")
        marks.choose(soft_id, "strength")
        marks.set_strength(soft_id, 0.5)
        study = logic.prepare_study(original, identity)
        regions = logic.prepare_regions(segmentation, original, marks, study)
        self.assertEqual(int((regions["map"] == 1).sum()), int((lesion & (soft == 0)).sum()))
        self.assertEqual(int((regions["map"] == 2).sum()), int(soft.sum()))
        request = logic.session.verdict_request("corrected", "slicer-test")
        self.assertEqual(request["result_seq"], result["audit_seq"])
        image_id, entry = logic.submit_correction(study, logic.export_correction(corrected, identity),
                                                  request["reviewer"], regions, request["model"],
                                                  request["result_seq"])
        self.assertEqual(entry["verdict"], "corrected")
        # the volume was denoised as an uploaded file, then stored with the correction: the verdict judges that
        # result (the same voxels), not nothing
        self.assertEqual(entry["result"]["result_seq"], result["audit_seq"])
        self.assertEqual(image_id, identity.datastore_id())
        logic.record_study(study, image_id)
        info = logic.require_client().label_info(logic.session.datastore_id(identity), "regions")
        self.assertEqual(info["regions"], [{"value": 1, "name": "lesion 1", "intent": "keep"},
                                           {"value": 2, "name": "soft tissue", "intent": "strength",
                                            "strength": 0.5}])
        self.delayDisplay("ADL Denoise workflow passed")
