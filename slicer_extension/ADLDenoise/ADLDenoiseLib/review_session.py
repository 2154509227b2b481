"""The review workflow's state, free of Slicer and Qt: which study is selected (by a stable identity), its server
datastore id, its denoised result, the blended correction made from that result, its verdict, the running
fine-tuning, and the temporary files that hold patient volumes.

Why a stable identity: MRML node IDs restart after Close Scene (``vtkMRMLScene::Clear``) and node names repeat
("3: CT HEAD" for two series), so keying results, corrections or verdicts by either attaches them to the wrong
patient. A study is identified by its DICOM SeriesInstanceUID and the SOP Instance UIDs of its files (from the
subject-hierarchy item; Slicer keeps the DICOM Modality there too; one series may be loaded as several volumes)
or, for a volume that did not come from DICOM, by a SHA-256 of its voxels and geometry; for a frame of a 4D
sequence the frame index is part of the identity. A DICOM volume edited in place (Segment Editor's "Mask volume",
a filter writing into the same node) keeps its UIDs but no longer holds the series' voxels:
:meth:`ReviewSession.as_loaded` makes it a new study identified by its content then (no result of the series, never
denoised by the series' id), also when the edit was made before the module first saw the volume (its voxels are
compared with the series' files on disk: :mod:`series_files`). That comparison also tells the frames of a
multi-frame file whose own rescale Slicer's reader ignored (their values in the volume are wrong): the status line
says so, nothing is sent for the volume until the user confirms (:meth:`ReviewSession.require_study`,
:class:`RescaleNotApplied`), and a result denoised from it carries the warning too
(:meth:`ReviewSession.result_warning`, :meth:`ReviewSession.describe_result`).

The content hash is computed in the background from a copy of the voxels (:class:`VolumeSnapshot`); until it is in
the volume has no identity (:meth:`ReviewSession.identifying`, :meth:`ReviewSession.identified`), and an answer for
a volume no longer selected, or changed since its copy, is dropped.

The module only wires Qt to :class:`ReviewSession`; every transition below is tested without Slicer
(``tests/test_slicer_workflow_state.py``).
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import re
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from .client import SKIPPED_KEYS, DenoiseServerError, TransferCancelled
from .series_files import IgnoredRescale, NoReference, read_series_values

__all__ = ["FILES_PENDING", "StudyIdentity", "ResultRecord", "BlendRecord", "ReviewSession", "TempFiles",
           "WorkflowError", "VolumeSnapshot", "PendingIdentity", "VolumeChanged", "snapshot_matches_files",
           "FilesCheck", "RescaleNotApplied", "NotConfirmed",
           "verify_snapshot",
           "VerdictRefused", "SeriesMoved", "content_identity", "dicom_identity", "describe_error", "describe_verdict",
           "send_verdict", "refused_as_moved", "VERDICTS", "hashed_grid"]

VERDICTS = ("accepted", "rejected", "corrected")
#: what a ``files_match`` of :meth:`ReviewSession.as_loaded` answers while the series' files are still being read
#: in the background (:meth:`ReviewSession.files_read` gives the answer later)
FILES_PENDING = "pending"
#: longest readable part of a datastore id (the hash part makes it unique)
_PREFIX_CHARS = 40


class WorkflowError(RuntimeError):
    """A step the workflow refuses, with a message the user can act on."""


class NotConfirmed(WorkflowError):
    """The user declined to confirm a step (:class:`RescaleNotApplied`): nothing was done. They have just answered
    the question, so the module says it on the status line only, without another dialog."""


class RescaleNotApplied(WorkflowError):
    """Nothing is sent for a volume some of whose frames Slicer's reader loaded through another frame's rescale
    (``warning``: which, :meth:`ReviewSession.rescale_warning`) until the user confirms
    (:meth:`ReviewSession.accept_ignored_rescale` with ``identity``)."""

    def __init__(self, identity: StudyIdentity, warning: str) -> None:
        self.identity, self.warning = identity, warning
        super().__init__(f"{identity.name or 'the volume'} was not sent: {warning}. Sending it needs your "
                         "confirmation")

    @property
    def question(self) -> str:
        """What the module asks before sending the volume anyway."""
        return (f"{self.warning}.\n\nSend {self.identity.name or 'the volume'} to the server anyway? The denoiser "
                "works on the values the volume holds (the CT model on its HU range), and its result, windows and "
                "lesion contrast on those frames will be as wrong as they are.")

    def declined(self) -> NotConfirmed:
        """The refusal to raise when the user does not confirm."""
        return NotConfirmed(f"not sent: {self.identity.name or 'the volume'} holds frames with wrong values (a "
                            "rescale Slicer's reader ignored); load it with a reader that applies each frame's rescale")


class VerdictRefused(WorkflowError):
    """The server refused a verdict because the result it names is not (or no longer) a result of the study it
    holds under that id (HTTP 409): nothing was recorded. ``status`` is 409."""

    status = 409


class SeriesMoved(WorkflowError):
    """The server refused a verdict (or a correction, its regions) on a PACS series that its PACS moved to another
    patient or study since the volume was opened (HTTP 409): nothing was recorded; the series is to be opened again
    (Next study), not denoised again from this volume (the server holds it under its id: an upload of it is
    refused). ``status`` is 409; ``what``: what was refused ("verdict", "correction")."""

    status = 409

    def __init__(self, message: str, what: str = "verdict") -> None:
        super().__init__(message)
        self.what = what


#: words of the server's 409 refusing a correction or verdict drawn on a series that its PACS moved since it was
#: opened (``lib.pacs_corrections``)
_MOVED_WORDS = ("the PACS moved series", "the request says the series was opened as")


#: the end of the server's account in its 409 for a moved series, before the remedy it gives API clients in
#: parentheses: ``"...; nothing was saved (open the series again and save it with params ..."`` (a verdict's: "the
#: verdict was not recorded (...")
_ACCOUNT_END = re.compile(r"(?:nothing was saved|the verdict was not recorded)(?=\s*\()")
#: the remedy's start where the account's end is not found
_REMEDY_START = re.compile(r"\s*\(open the series again\b")


def _moved_detail(error: BaseException) -> str | None:
    """The server's words when ``error`` is its 409 for a series its PACS moved since the volume was opened, without
    the remedy it gives API clients ("... save it with params patient_id and study_instance_uid ...": words of the
    server's API, which the module sends itself); None for any other error. The remedy is cut where it starts, not
    matched to its end: the client keeps at most 1000 characters of the server's words, and a move of both patient
    and study with long UIDs filled them before the remedy's closing parenthesis (it was shown, cut, API words
    and all)."""
    if getattr(error, "status", None) != 409:
        return None
    detail = re.sub(r"^server said 409: ", "", str(error))
    if not any(words in detail for words in _MOVED_WORDS):
        return None
    ended = _ACCOUNT_END.search(detail)
    if ended is not None:
        return detail[:ended.end()]
    remedy = _REMEDY_START.search(detail)
    return (detail[:remedy.start()] if remedy is not None else detail).rstrip()  # else: cut before its remedy


@contextlib.contextmanager
def refused_as_moved(image_id: str, what: str = "correction", done_before: str = "") -> Iterator[None]:
    """Within it, the server's 409 refusing ``what`` (a correction, its marked regions) because the PACS moved the
    series since the volume was opened is :class:`SeriesMoved`, saying in the module's words what to do: open the
    series again (Next study) and redo it there (the server's text told an API client to send ``params``, which
    a module user cannot do); ``done_before``: what was done before it. Any other error goes through as it is."""
    try:
        yield
    except Exception as error:  # noqa: BLE001 - turned into words here when it is the server's "moved" 409
        detail = _moved_detail(error)
        if detail is None:
            raise
        raise SeriesMoved(
            (f"{done_before}, but " if done_before else "") + f"the {what} was NOT saved: the PACS lists the series "
            f"{image_id} under another patient or study than it had when this volume was opened (server: {detail}). "
            f"Open it again (Next study) and redo the {what} on the volume it opens", what) from None


@dataclass(frozen=True)
class StudyIdentity:
    """What a study *is*, independent of the scene: ``kind`` "dicom" (``key`` = SeriesInstanceUID) or "content"
    (``key`` = SHA-256 hex of voxels + geometry); ``frame`` the 0-based item of a 4D sequence (None for a 3D
    volume); ``modality`` the DICOM Modality of the series ("CT", "MR", ...) or ""; ``name`` a readable label
    (never part of equality: two series may share a name)."""

    kind: str
    key: str
    frame: int | None = None
    modality: str = field(default="", compare=False)
    name: str = field(default="", compare=False)
    #: for a DICOM volume, a SHA-256 hex of the SOP Instance UIDs it was loaded from (""; unknown). Slicer loads one
    #: series as several volumes (subseries split by acquisition number, image type, orientation, content or
    #: trigger time, or all files besides): all carry the series' UID, so the UID alone would give, say, the
    #: post-contrast volume the pre-contrast one's result, blend and server id
    part: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ("dicom", "content"):
            raise WorkflowError(f"unknown study identity kind {self.kind!r}")
        if not self.key or not str(self.key).strip():
            raise WorkflowError("a study identity needs a SeriesInstanceUID or a content hash")
        if self.frame is not None and (not isinstance(self.frame, int) or self.frame < 0):
            raise WorkflowError(f"a sequence frame index must be an integer >= 0, got {self.frame!r}")

    @property
    def digest(self) -> str:
        """SHA-256 hex of kind, key and frame (what the datastore id's unique part derives from)."""
        text = f"{self.kind}:{self.key}:{'' if self.frame is None else self.frame}"
        if self.part:  # (an identity without one keeps the id it always had)
            text += f":{self.part}"
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def datastore_id(self) -> str:
        """The id this study gets in the server's datastore: a readable prefix (its name, frame) + 20 hex
        characters of :attr:`digest`, so two series with the same name never share an id while the same study
        always maps to the same id."""
        prefix = re.sub(r"[^A-Za-z0-9]+", "_", self.name).strip("_")[:_PREFIX_CHARS] or "study"
        if self.frame is not None:
            prefix += f"_f{self.frame}"
        return f"{prefix}_{self.digest[:20]}"

    def describe(self) -> str:
        what = f"series {self.key}" if self.kind == "dicom" else f"volume {self.key[:12]}"
        if self.part:
            what += f" (images {self.part[:8]})"
        return what + ("" if self.frame is None else f", frame {self.frame}")


def dicom_identity(series_instance_uid: str, modality: str = "", name: str = "",
                   frame: int | None = None, instance_uids: str | Sequence[str] = ()) -> StudyIdentity:
    """The identity of a volume loaded from DICOM: its subject-hierarchy item's UID "DICOM" (the series) and
    "DICOMInstanceUID" (the SOP Instance UIDs of its files, space-separated as Slicer stores them, in any order):
    two volumes of one series made from different files are two studies (:attr:`StudyIdentity.part`)."""
    uids = instance_uids.split() if isinstance(instance_uids, str) else [str(uid).strip() for uid in instance_uids]
    uids = sorted(uid for uid in uids if uid)
    part = hashlib.sha256(" ".join(uids).encode("utf-8")).hexdigest() if uids else ""
    return StudyIdentity("dicom", str(series_instance_uid).strip(), frame, (modality or "").strip().upper(), name,
                         part)


def hashed_grid(ijk_to_ras: np.ndarray) -> bytes:
    """The bytes of the 4x4 IJK-to-RAS matrix (mm) that :func:`content_identity` hashes: float64, rounded to 1e-6 mm
    (two matrices give the same identity exactly when these bytes are equal; -0.0 and 0.0 differ)."""
    return np.round(np.asarray(ijk_to_ras, np.float64), 6).tobytes()


def content_identity(voxels: np.ndarray, ijk_to_ras: np.ndarray, name: str = "",
                     frame: int | None = None) -> StudyIdentity:
    """The identity of a volume without DICOM UID: SHA-256 over the voxel dtype, the (z, y, x) shape, the 4x4
    IJK-to-RAS matrix (mm; rounded to 1e-6 mm so float noise of a re-read file does not change it) and the voxel
    bytes. Streams the array in slices, so no copy of a large volume is made."""
    voxels = np.asarray(voxels)
    matrix = np.asarray(ijk_to_ras, np.float64)
    if matrix.shape != (4, 4) or not np.all(np.isfinite(matrix)):
        raise WorkflowError(f"the IJK-to-RAS matrix must be a finite 4x4 matrix, got shape {matrix.shape}")
    if voxels.ndim != 3 or voxels.size == 0:
        raise WorkflowError(f"a study volume must be a non-empty 3D array, got shape {voxels.shape}")
    digest = hashlib.sha256()
    digest.update(f"{voxels.dtype.str}|{voxels.shape}|".encode())
    digest.update(hashed_grid(matrix))
    if voxels.flags.c_contiguous:  # the same bytes in one call, without a copy; hashlib lets other threads run
        digest.update(voxels.reshape(-1).view(np.uint8))
    else:
        for plane in voxels:  # one slice at a time: a contiguous copy of at most one slice
            digest.update(np.ascontiguousarray(plane).tobytes())
    return StudyIdentity("content", digest.hexdigest(), frame, "", name)


@dataclass(frozen=True, eq=False)
class VolumeSnapshot:
    """A copy of a volume node's voxels and grid, taken on the GUI thread (``mrml.volume_snapshot``) so that its
    content identity is computed in the background (:meth:`content`; 0.2-0.8 s for 512 x 512 x 400 voxels, which
    froze Slicer at every selection): Slicer's own array may change, be replaced or be freed (a 4D frame copied into
    the node, an edit in place) while a thread reads it, and a hash of half-old half-new voxels would name no
    study. Copying takes about a tenth of the hash's time. ``series``: the volume's DICOM identity (its UIDs), None
    for a volume identified by its content alone."""

    voxels: np.ndarray = field(repr=False)
    ijk_to_ras: np.ndarray = field(repr=False)
    name: str = ""
    frame: int | None = None
    series: StudyIdentity | None = None

    def content(self, report: Any = None, cancelled: Any = None) -> StudyIdentity:
        """Background: the :func:`content_identity` of the copy (``report``, ``cancelled``: a
        :class:`~ADLDenoiseLib.background.BackgroundTask`'s, unused)."""
        return content_identity(self.voxels, self.ijk_to_ras, self.name, self.frame)


@dataclass(frozen=True)
class FilesCheck:
    """What the comparison of a DICOM volume with its files found (:func:`snapshot_matches_files`): ``matches``
    True / False, None when the files cannot tell (``untold`` says why: a
    :class:`~ADLDenoiseLib.series_files.NoReference`'s reason); ``ignored_rescales``: frames of its multi-frame
    files whose own rescale Slicer's reader ignored (:class:`~ADLDenoiseLib.series_files.IgnoredRescale`)."""

    matches: bool | None
    untold: str = ""
    ignored_rescales: tuple[IgnoredRescale, ...] = ()


def snapshot_matches_files(snapshot: VolumeSnapshot, files: Sequence[str]) -> FilesCheck:
    """Background: whether ``snapshot`` holds the voxel values of its series' DICOM ``files``
    (:mod:`series_files`), why not when the files cannot tell, and which frames' rescales Slicer's reader ignored
    (from the headers the same read holds). Compares the copy the identity was computed from, not the node, so
    the answer is that of those very voxels (the node may have changed meanwhile)."""
    values = read_series_values(files)
    return FilesCheck(values.matches(snapshot.voxels), values.reason if isinstance(values, NoReference) else "",
                      values.ignored_rescales)


class VolumeChanged(WorkflowError):
    """The voxels a request was about to send are not those the selected study was identified from
    (:func:`verify_snapshot`): nothing was sent."""


def verify_snapshot(snapshot: VolumeSnapshot | None, identified_from: StudyIdentity | None,
                    report: Any = None) -> None:
    """Background, first step of a request sent for a study (Denoise, a verdict, a correction): ``snapshot``, the
    copy of the volume taken on the GUI thread when the user started it (with the file exported then), must hash to
    ``identified_from``, the content the study was identified from (:attr:`ReviewSession.study_content`). The
    module identifies a volume again when Slicer says it changed (:meth:`ReviewSession.input_modified`); a script
    writing into the node's array without telling Slicer (no ``arrayFromVolumeModified``) fires nothing, and the
    export would send other voxels under the study's identity. Raises :class:`VolumeChanged` then; nothing to
    check without both."""
    if snapshot is None or identified_from is None:
        return
    if report:
        report(None, f"checking that {snapshot.name or 'the volume'} still holds the voxels identified ...")
    content = snapshot.content()
    if content.key != identified_from.key or content.frame != identified_from.frame:
        raise VolumeChanged(f"{snapshot.name or 'the volume'} no longer holds the voxels it was identified from (they "
                            "were changed without Slicer being told): nothing was sent; it is being identified again, "
                            "try again in a moment")


@dataclass(frozen=True)
class PendingIdentity:
    """A volume whose identity is being computed in the background (:meth:`ReviewSession.identifying`)."""

    ticket: int
    node_id: str
    series: StudyIdentity | None = None
    name: str = ""


@dataclass(frozen=True)
class ResultRecord:
    """A denoised result of ``identity``. ``node_id`` finds its node in the *current* scene only (the whole
    record is forgotten when the scene closes); ``serial`` tells two results of the same study apart."""

    identity: StudyIdentity
    serial: int
    node_id: str
    model: str = ""
    weights_version: str = ""
    #: the server's audit entry of this result (``audit_seq`` of its answer; None: the server gave none): a verdict
    #: names it as ``result_seq``, so the server records it against this result or refuses it
    result_seq: int | None = None
    #: the server that made it (a verdict is sent only there: another server's entry numbers are other results)
    server_url: str | None = None


@dataclass(frozen=True)
class BlendRecord:
    """A blended correction: made from ``result_serial`` of ``identity`` at ``strength`` (0..1), held in node
    ``node_id``."""

    identity: StudyIdentity
    result_serial: int
    strength: float
    node_id: str


class TempFiles:
    """Folders holding patient volumes written for the server (exports, downloads, results); all deleted by
    :meth:`cleanup` (scene closed, module closed)."""

    def __init__(self, root: str | Path | None = None, prefix: str = "ADLDenoise_") -> None:
        self._root = Path(root) if root else None
        self._prefix = prefix
        self._dirs: list[Path] = []

    def new_dir(self, purpose: str = "work") -> Path:
        """A fresh folder (``tempfile.mkdtemp``) that :meth:`cleanup` deletes."""
        if self._root is not None:
            self._root.mkdir(parents=True, exist_ok=True)
        path = Path(tempfile.mkdtemp(prefix=f"{self._prefix}{purpose}_", dir=self._root))
        self._dirs.append(path)
        return path

    @property
    def dirs(self) -> list[Path]:
        """The folders made so far that exist now."""
        return [path for path in self._dirs if path.exists()]

    def cleanup(self) -> list[Path]:
        """Delete every folder ever made here; returns those that could not be deleted. All are remembered and
        swept again by the next call: a request cancelled at scene close may still recreate its output folder
        (the client makes it) after this call, and the next one (another scene close, the module closing)
        deletes it then."""
        left = []
        for path in self._dirs:
            shutil.rmtree(path, ignore_errors=True)
            if path.exists():
                left.append(path)
        return left


def describe_error(error: BaseException) -> str:
    """The message to show for a failed request: 401 asks to log in again, 403 names the missing role, others
    are shown as they are (the client keeps tokens out of its messages)."""
    status = getattr(error, "status", None)
    text = str(error) or error.__class__.__name__
    if status == 401 and "log in" not in text:
        return f"not logged in or the session expired: log in again ({text})"
    if status == 403 and "role" not in text:
        return f"your account lacks the role for this action: ask the server's administrator ({text})"
    return text


def send_verdict(client: Any, image_id: str, request: dict, verdict: str | None = None,
                 done_before: str = "") -> dict:
    """Background: send the verdict of ``request`` (:meth:`ReviewSession.verdict_request`; ``verdict``
    overrides its verdict, e.g. "corrected") on ``image_id`` with ``client`` (``DenoiseServerClient``). A 409
    (the result named is no result of the study the server holds under that id now) becomes
    :class:`VerdictRefused` with a message saying that nothing was recorded and what to do; ``done_before`` says
    what was done before it (e.g. the correction saved): any other failure then says so too (an annotator may
    save corrections but not give verdicts: their 403 must not read as if the correction was lost).
    ``request["opened"]``: the patient and study the volume was opened as (``ReviewSession.opened_as``; none when
    absent, never the client's latest download of the id)."""
    try:
        return client.review(image_id, verdict or request["verdict"], request["reviewer"], request.get("reason"),
                             model=request.get("model"), result_seq=request.get("result_seq"),
                             opened=request.get("opened", {}))
    except Exception as error:  # noqa: BLE001 - turned into words here, the type kept where it matters
        status = getattr(error, "status", None)
        if status != 409:
            if done_before and isinstance(error, DenoiseServerError) and not isinstance(error, TransferCancelled):
                raise DenoiseServerError(f"{done_before}, but the verdict was NOT recorded: {describe_error(error)}",
                                         status) from None
            raise
        detail = re.sub(r"^server said 409: ", "", str(error))
        moved = _moved_detail(error)  # without the remedy the server gives API clients
        if moved is not None:
            raise SeriesMoved(
                (f"{done_before}, but " if done_before else "") + "the verdict was NOT recorded: the PACS lists the "
                f"series {image_id} under another patient or study than it had when this volume was opened (server: "
                f"{moved}). Open it again (Next study) and review it as it is listed now") from None
        raise VerdictRefused(
            (f"{done_before}, but " if done_before else "") + f"the verdict was NOT recorded: the server's study "
            f"{image_id} no longer holds the result you looked at (server: {detail}). Denoise the volume again, look "
            "at the new result and give your verdict on it") from None


def describe_verdict(entry: dict, what: str = "") -> str:
    """The status line after a recorded verdict: ``what`` (default: the verdict), when, and whose earlier verdict
    on the study it replaced (both stay in the server's history; a reset to ``unreviewed`` judged nothing)."""
    text = f"{what or entry.get('verdict')} ({entry.get('time_utc', '')})"
    earlier = entry.get("replaces")
    if isinstance(earlier, dict) and earlier.get("verdict") not in (None, "", "unreviewed"):
        text += (f"; replaces {earlier.get('reviewer') or '?'}'s '{earlier['verdict']}' of "
                 f"{earlier.get('time_utc') or '?'}" + (f" ({earlier['reason']})" if earlier.get("reason") else ""))
    return text


def _shortened(text: str, limit: int = 90) -> str:
    """``text`` on one line, cut to ``limit`` characters (with "...")."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3].rstrip() + "..."


def _listed(entries: list[dict], shown: int = 3) -> str:
    """The ids of the first ``shown`` skipped series, each with its shortened ``detail`` where it has one, "..."
    after."""
    names = [f"{entry.get('id')} ({_shortened(str(entry['detail']))})" if entry.get("detail") else str(entry.get("id"))
             for entry in entries[:shown]]
    return ", ".join(names) + (" ..." if len(entries) > shown else "")


class ReviewSession:
    """The workflow's state and its transitions (see the module docstring). Not thread-safe: the module calls it
    on the GUI thread only; background tasks receive plain values and hand theirs back through the GUI thread.

    Args:
        temp_root: where temporary folders go (None: the system's temp folder).
    """

    def __init__(self, temp_root: str | Path | None = None) -> None:
        self.temp = TempFiles(temp_root)
        self._serials = itertools.count(1)
        #: tickets of background identifications (:meth:`identifying`); never restarted, so that the late answer of a
        #: closed scene's volume never matches a ticket of the next scene
        self._tickets = itertools.count(1)
        self._reset_studies()
        self.training_model: str | None = None
        #: the address of the server the datastore ids and verdicts below were recorded on (None: not connected)
        self.server_url: str | None = None
        #: how the module signed in to that server: the user name it logged in with, "" for a token given without
        #: one, None for no login (the server then records the reviewer name the verdict gives)
        self.login: str | None = None

    def _reset_studies(self) -> None:
        self.study: StudyIdentity | None = None
        #: the node :attr:`study` was identified from (:meth:`identified`; None for a study selected without one):
        #: the volume on screen must be this node before anything is done or sent for the study
        #: (:meth:`require_on_screen`)
        self.study_node: str | None = None
        self.study_stale = False  # the selected volume changed in the scene since :attr:`study` was computed
        #: the content identity :attr:`study` was identified from (its voxels and grid; :meth:`identified`)
        self.study_content: StudyIdentity | None = None
        #: the selected volume whose identity is being computed in the background (:meth:`identifying`)
        self.pending: PendingIdentity | None = None
        #: why the last background identification of the selected volume failed (:meth:`identification_failed`)
        self.identify_error: str | None = None
        self._reset_server_records()
        self.results: dict[StudyIdentity, ResultRecord] = {}
        self.blend: BlendRecord | None = None
        self._work: Path | None = None
        #: DICOM identity -> content key of its voxels when first identified in this scene (:meth:`as_loaded`)
        self.loaded_content: dict[StudyIdentity, str] = {}
        #: (DICOM identity, content hash) -> whether those voxels are the series' files' (True / False; None: could
        #: not be told), so that the files are read once per content, not per click
        self.files_checked: dict[tuple[StudyIdentity, str], bool | None] = {}
        #: (DICOM identity, content hash) whose files are being read in the background (:data:`FILES_PENDING`)
        self.files_pending: set[tuple[StudyIdentity, str]] = set()
        #: DICOM identity -> why its files could not tell (:class:`NoReference`'s reason; for the status line)
        self.files_untold: dict[StudyIdentity, str] = {}
        #: DICOM identity -> frames of its files whose own rescale Slicer's reader ignored (:meth:`rescale_warning`)
        self.rescales_ignored: dict[StudyIdentity, tuple[IgnoredRescale, ...]] = {}
        #: DICOM identities the user confirmed sending despite :attr:`rescales_ignored` (:meth:`require_study`)
        self.rescales_accepted: set[StudyIdentity] = set()
        #: content identity of a DICOM volume edited in place -> that DICOM identity (for the status line)
        self.edited_from: dict[StudyIdentity, StudyIdentity] = {}

    def _reset_server_records(self) -> None:
        """Forget what one server holds: its datastore ids of the studies, their files, the verdicts it recorded."""
        self.known_ids: dict[StudyIdentity, str] = {}  # identity -> datastore id the server holds it under
        self.study_files: dict[StudyIdentity, Path] = {}  # identity -> file the server holds (its grid)
        self.verdicts: dict[StudyIdentity, dict] = {}
        #: node ID -> (datastore id, patient and study) of the review-queue download the node was made from
        #: (:meth:`record_opened`): per node, since a series opened again after its PACS moved it to another patient
        #: gives the same voxels and id under the new patient, while the first node is still the old one's
        self.opened_nodes: dict[str, tuple[str, dict[str, str]]] = {}

    def connected_to(self, server_url: str, login: str | None = None) -> bool:
        """The module (re)connected to ``server_url``, signed in as ``login`` (see :attr:`login`). Returns True
        when that is another server than the one the datastore ids were recorded on: they are forgotten then.
        Another server's datastore knows none of them, or holds another patient under the same id (review-queue
        ids are the server's own names, e.g. "case_07"): a verdict or correction must never be sent there without
        uploading the study first. Results and the blend stay (they are images in this scene, whatever server
        made them)."""
        url = str(server_url or "").strip().rstrip("/")
        changed = self.server_url is not None and url != self.server_url
        if changed:
            self._reset_server_records()
        self.server_url = url
        self.login = None if login is None else str(login).strip()
        return changed

    def reviewer_name(self, reviewer: str | None) -> str:
        """The reviewer name a verdict sends: the one entered, else (signed in) the login's user name, or "" with a
        token alone. With a login the server records the token's user whatever name is sent, so the field may stay
        empty; without one the name entered is the only record of who judged, so it is required."""
        reviewer = (reviewer or "").strip()
        if not reviewer and self.login is None:
            raise WorkflowError("enter your name as reviewer first")
        return reviewer or self.login or ""

    # ---------------------------------------------------------------------------------------------- files
    @property
    def work_dir(self) -> Path:
        """The temporary folder for this scene's patient files (made on first use, deleted with the scene)."""
        if self._work is None or not self._work.is_dir():
            self._work = self.temp.new_dir("work")
        return self._work

    # ---------------------------------------------------------------------------------------------- studies
    def select(self, identity: StudyIdentity | None, node_id: str | None = None) -> bool:
        """The user selected a volume (None: none), ``node_id`` the node it was identified from (see
        :meth:`require_on_screen`). Returns True when the study changed; then the blended correction is dropped (it
        belongs to the previous study)."""
        if identity is not None and not isinstance(identity, StudyIdentity):
            raise WorkflowError("select() takes a StudyIdentity or None")
        changed = identity != self.study
        self.study = identity
        self.study_node = None if identity is None or node_id is None else str(node_id)
        self.study_stale = False
        self.study_content = None
        self.pending = None  # an identification still running is for what was selected before: dropped
        self.identify_error = None
        if changed:
            self.blend = None
        return changed

    def identifying(self, node_id: str, series: StudyIdentity | None = None, name: str = "") -> int:
        """The selected volume, node ``node_id``, is being identified in the background: its content hashed from a
        :class:`VolumeSnapshot` (``series``: its DICOM identity, None when its content is its identity; ``name``: its
        label). Returns the ticket that :meth:`identified` must bring back. Until then no study is selected: nothing
        is denoised, uploaded, judged or blended for the volume (:meth:`require_study` says to wait) and a result
        arriving meanwhile is not attached (:meth:`result_arrived`). A new ticket (another selection, the node
        changed again) replaces the last one, whose answer is then dropped."""
        if not node_id or not str(node_id).strip():
            raise WorkflowError("identifying a volume needs its node ID")
        if series is not None and (not isinstance(series, StudyIdentity) or series.kind != "dicom"):
            raise WorkflowError("the series of a volume being identified must be a DICOM StudyIdentity")
        self.select(None)
        self.pending = PendingIdentity(next(self._tickets), str(node_id), series,
                                       name or (series.name if series is not None else ""))
        return self.pending.ticket

    def identifying_node(self, node_id: str | None) -> bool:
        """Whether node ``node_id`` is being identified now (and has not changed since its snapshot)."""
        return self.pending is not None and node_id is not None and self.pending.node_id == node_id

    def identified(self, ticket: int, content: StudyIdentity,
                   files_match: Callable[[], bool | None] | None = None) -> StudyIdentity | None:
        """The background hash of ticket ``ticket`` (:meth:`identifying`) gave ``content``. The volume's study
        (``content``, or for a DICOM volume its series unless it was edited: :meth:`as_loaded`, with
        ``files_match``) is selected and returned, when that ticket is still the one awaited. Else None, and nothing
        changes: another volume was selected meanwhile, the node changed after its voxels were copied
        (:meth:`input_modified`), or the scene closed; those voxels are not the selection's any more."""
        pending = self.pending
        if pending is None or ticket != pending.ticket:
            return None
        if not isinstance(content, StudyIdentity) or content.kind != "content":
            raise WorkflowError("identified() takes the content identity of the volume's voxels")
        study = content if pending.series is None else self.as_loaded(pending.series, content, files_match)
        self.select(study, pending.node_id)
        self.study_content = content
        return study

    def identification_failed(self, ticket: int, error: BaseException | str) -> bool:
        """The background hash of ticket ``ticket`` failed (or was cancelled): nothing is selected, and
        :meth:`require_study` says why. False (nothing changes) when that ticket is no longer awaited."""
        pending = self.pending
        if pending is None or ticket != pending.ticket:
            return False
        self.select(None)
        reason = describe_error(error) if isinstance(error, BaseException) else str(error)
        self.identify_error = f"could not identify {pending.name or 'the volume'}: {reason}"
        return True

    def require_identified(self) -> StudyIdentity:
        """The selected study, or a :class:`WorkflowError` that says why there is none: being identified (wait),
        its identification failed, changed since it was identified, nothing selected."""
        if self.pending is not None:
            raise WorkflowError(f"{self.pending.name or 'the volume'} is still being identified (its voxels are hashed "
                                "in the background): wait a moment, then try again")
        if self.identify_error:
            raise WorkflowError(self.identify_error)
        if self.study_stale:
            raise WorkflowError("the volume changed since it was identified (other voxels or 4D frame): it is being "
                                "identified again, wait a moment, then try again")
        if self.study is None:
            raise WorkflowError("select a volume first")
        return self.study

    def as_loaded(self, identity: StudyIdentity, content: StudyIdentity,
                  files_match: Callable[[], bool | None] | None = None) -> StudyIdentity:
        """The study a DICOM volume is now: ``identity`` (its UIDs) while its voxels and grid (``content``, its
        :func:`content_identity`) are those it had when that identity was first seen in this scene; else it was
        edited in place (Segment Editor's "Mask volume", a filter writing into the same node), which keeps the
        UIDs: ``content`` is returned then, a new study (keeping the DICOM modality), so the series' result is
        neither compared nor blended with other voxels and the series' server id (the server's unedited copy) is
        never denoised or corrected for it. Undoing the edit gives ``identity`` back. A volume identified by content
        is returned as it is (an edit changes its identity anyway).

        ``files_match``: asked (once per content) before the first voxels seen become the reference: whether the
        node still holds the voxels of the series' files on disk (:mod:`series_files`). False: the volume was
        edited before the module first saw it, and is a new study although no earlier content was seen (a
        :class:`FilesCheck` answers the same in its ``matches``, and its ignored rescales are kept for
        :meth:`rescale_warning`); None, a :class:`NoReference` (its reason kept for :meth:`describe_study`) or no
        ``files_match``: cannot be told,
        the voxels seen now are the reference; :data:`FILES_PENDING`: the files are being read in the background:
        ``identity`` is returned, but nothing may be done for it (:meth:`require_checked`) until :meth:`files_read`
        gives the answer and it is identified again."""
        if identity.kind != "dicom":
            return identity
        loaded = self.loaded_content.get(identity)
        if loaded is None:
            key = (identity, content.key)
            if files_match is not None and key not in self.files_checked and key not in self.files_pending:
                answer = files_match()
                if answer == FILES_PENDING:
                    self.files_pending.add(key)
                else:
                    self.files_checked[key] = self._told(identity, answer)
            if key in self.files_pending:
                return identity  # not a reference yet: require_checked refuses to act on it
            if self.files_checked.get(key) is False:  # not the files' voxels: edited before first seen
                return self._edited(identity, content)
            loaded = self.loaded_content[identity] = content.key
        if content.key == loaded and content.frame == identity.frame:
            return identity
        return self._edited(identity, content)

    def files_read(self, identity: StudyIdentity, content_key: str,
                   answer: bool | FilesCheck | NoReference | None) -> StudyIdentity | None:
        """The background read of ``identity``'s files for the voxels ``content_key`` ended: ``answer`` as
        ``files_match`` would have given it (a :class:`FilesCheck`; True, False, or a :class:`NoReference` or None
        when it could not tell). When the selected study is ``identity`` identified from those very voxels
        (:meth:`identified`), its study is decided now (the series, or a new study when edited: :meth:`as_loaded`),
        selected and returned; else None (the answer is kept for the next identification of those voxels)."""
        key = (identity, content_key)
        self.files_pending.discard(key)
        self.files_checked[key] = self._told(identity, answer)
        content = self.study_content
        if self.study == identity and content is not None and content.key == content_key and \
                self.pending is None and not self.study_stale:
            # the selected volume is these voxels: its study follows from the answer now (no second hash)
            self.select(self.as_loaded(identity, content), self.study_node)
            self.study_content = content
            return self.study
        return None

    def _told(self, identity: StudyIdentity, answer: bool | FilesCheck | NoReference | None) -> bool | None:
        """``answer`` of a files check as kept in :attr:`files_checked`; a :class:`NoReference`'s reason kept for
        the status line (:meth:`describe_study`), and the frames whose rescale Slicer's reader ignored for
        :meth:`rescale_warning`."""
        if isinstance(answer, FilesCheck):
            if answer.ignored_rescales:
                self.rescales_ignored[identity] = answer.ignored_rescales
            answer = NoReference(answer.untold) if answer.untold else answer.matches
        if isinstance(answer, NoReference):
            self.files_untold[identity] = answer.reason
            return None
        return answer

    def rescale_warning(self, identity: StudyIdentity | None) -> str:
        """"" unless ``identity`` (a DICOM volume, or a new study made of one by an edit in place) was loaded from
        multi-frame files some of whose frames carry their own rescale that Slicer's reader ignored (it applies one
        rescale to all the frames of a file): then which frames, and that their values in the volume are wrong
        (in HU for CT: windows, lesion contrast and the CT model's HU range all see wrong values)."""
        frames = self._ignored_frames(identity)
        if not frames:
            return ""
        return (frames + ": their values in this volume are wrong; load the series with a reader that applies each "
                "frame's rescale (or convert the file to single-frame images), or send it only knowing that those "
                "frames are wrong")

    def result_warning(self, identity: StudyIdentity | None) -> str:
        """"" unless ``identity``'s voxels hold frames with wrong values (:meth:`rescale_warning`): then the warning
        a result denoised from them carries (its status line: :meth:`describe_result`; a note on its node), since
        the denoiser saw those wrong values and its result on those frames is as wrong."""
        frames = self._ignored_frames(identity)
        if not frames:
            return ""
        return (f"WARNING: denoised from wrong values: {frames}: their values in the volume sent were wrong, and so "
                "are this result's on those frames; load the series with a reader that applies each frame's rescale "
                "(or convert the file to single-frame images) and denoise it again")

    def describe_result(self, identity: StudyIdentity, line: str) -> str:
        """The status line of a result of ``identity`` (``line``: what the module says of it): first of all the
        warning when it was denoised from wrong values (:meth:`result_warning`)."""
        warning = self.result_warning(identity)
        return f"{warning}. {line}" if warning else line

    def _ignored_frames(self, identity: StudyIdentity | None) -> str:
        """Which frames of ``identity``'s files (of the series a volume edited in place came from) carry their own
        rescale that Slicer's reader ignored, in words; "" when none."""
        series = self.edited_from.get(identity, identity) if identity is not None else None
        ignored = self.rescales_ignored.get(series) if series is not None else None
        return "; ".join(item.describe() for item in ignored) if ignored else ""

    def require_rescale_accepted(self, identity: StudyIdentity) -> StudyIdentity:
        """``identity``, unless some of its frames carry a rescale Slicer's reader ignored (:meth:`rescale_warning`)
        and the user has not confirmed sending it anyway (:meth:`accept_ignored_rescale`):
        :class:`RescaleNotApplied` then."""
        warning = self.rescale_warning(identity)
        if warning and self.edited_from.get(identity, identity) not in self.rescales_accepted:
            raise RescaleNotApplied(identity, warning)
        return identity

    def accept_ignored_rescale(self, identity: StudyIdentity) -> None:
        """The user confirmed sending ``identity`` although frames of its files carry a rescale Slicer's reader
        ignored (:class:`RescaleNotApplied`): not asked again for these files in this scene (also once edited)."""
        self.rescales_accepted.add(self.edited_from.get(identity, identity))

    def checking(self, identity: StudyIdentity | None) -> bool:
        """Whether ``identity`` (a DICOM series seen for the first time) waits for its files to be compared."""
        return identity is not None and identity not in self.loaded_content and \
            any(key[0] == identity for key in self.files_pending)

    def require_checked(self, identity: StudyIdentity) -> StudyIdentity:
        """``identity``, unless its files are still being compared with the volume (:meth:`checking`): nothing is
        denoised, uploaded or judged for a DICOM volume before it is known whether it still holds its series'
        voxels."""
        if self.checking(identity):
            raise WorkflowError(f"{identity.name or 'the volume'} is being compared with its DICOM files (an edit made "
                                "before it was selected would make it a new study): wait a moment, then try again")
        return identity

    def _edited(self, identity: StudyIdentity, content: StudyIdentity) -> StudyIdentity:
        """``content`` as the new study a DICOM volume ``identity`` edited in place is (see :meth:`as_loaded`)."""
        edited = replace(content, modality=identity.modality, name=f"{identity.name or 'volume'} edited")
        self.edited_from[edited] = identity
        return edited

    def describe_study(self, identity: StudyIdentity, frame_text: str = "") -> str:
        """The status line of ``identity``; for a DICOM volume edited in place, says that it is a new study now; for
        one whose files could not be compared with it (:class:`NoReference`), why, and what stands in for them;
        first of all, a warning when frames of its files carry a rescale Slicer's reader ignored
        (:meth:`rescale_warning`). ``frame_text``: for the frame of a 4D sequence, which frame is sent (the
        module's words), said in place of the identity, followed by the same reason and warning."""
        warning = self.rescale_warning(identity)
        warning = f"WARNING: {warning} (sending it asks for your confirmation). " if warning else ""
        original = self.edited_from.get(identity)
        if original is None:
            what = frame_text or identity.describe()
            untold = self.files_untold.get(identity)
            if untold is not None and identity in self.loaded_content:
                return (f"{warning}{what} (not compared with its DICOM files: {untold}; an edit made before it was "
                        "first selected is not seen, later ones are)")
            return warning + what
        return (f"{warning}{identity.describe()}: the DICOM {original.describe()} was edited in place (its voxels are "
                "not the series' any more), so it is a new study: the series' result and the server's copy are not "
                "used for it; denoise it again")

    def input_modified(self) -> None:
        """The selected volume's voxels, geometry or shown 4D frame changed in the scene (a sequence browser copies
        each frame into the same proxy node, so no other volume is selected): :attr:`study` may no longer be what
        the node holds. The blend is dropped (it was made from the old voxels) and nothing is done for the study
        until it is identified again (:meth:`identifying`, :meth:`select`); :meth:`result` answers None until then."""
        self.study_stale = True
        self.blend = None
        # an identification still running hashes a copy taken before the change: its answer names other voxels
        self.pending = None

    def require_on_screen(self, node_id: str | None) -> None:
        """Asked first by every action that sends data about the study on screen (Denoise, a verdict, a correction),
        before its volume is identified again or anything is read, confirmed or sent for it: the volume on screen,
        node ``node_id`` (the module's selection; None: no volume), must be the node the session's study was
        identified from, or the one being identified. Else the study, its result and server id belong to another
        volume (the selection changed without the module being told, e.g. a handler failed half-way): a verdict
        would judge, and be recorded for, another patient's study. Refused then, the study marked stale (the blend
        dropped; :meth:`input_modified`), so that the volume on screen is identified afresh; nothing to refuse while
        no study is handed out (:meth:`require_study` says why)."""
        if node_id is None or not str(node_id).strip():
            raise WorkflowError("select a CT or MR volume first")
        if self.pending is not None:
            owner, what = self.pending.node_id, f"{self.pending.name or 'the volume'} being identified"
        elif self.study is not None:
            owner, what = self.study_node, self.study.describe()
        else:
            return
        if owner != str(node_id):
            self.input_modified()
            raise WorkflowError(f"the volume on screen is not the one whose study the module holds ({what}): "
                                "nothing was sent; it is being identified, wait a moment, then try again")

    def require_study(self) -> StudyIdentity:
        """The selected study, identified and checked against its DICOM files (:meth:`require_identified`,
        :meth:`require_checked`), and confirmed by the user when frames of its files carry a rescale Slicer's
        reader ignored (:meth:`require_rescale_accepted`): what anything sent to the server is sent for."""
        return self.require_rescale_accepted(self.require_checked(self.require_identified()))

    def datastore_id(self, identity: StudyIdentity | None = None) -> str:
        """The id the server holds (or will hold) ``identity`` under: the id it came with from the review
        queue, else the one derived from the identity."""
        identity = identity or self.require_study()
        return self.known_ids.get(identity) or identity.datastore_id()

    def is_on_server(self, identity: StudyIdentity | None = None) -> bool:
        return (identity or self.require_study()) in self.known_ids

    def server_id(self, identity: StudyIdentity | None = None) -> str | None:
        """The datastore id the connected server holds ``identity`` under, or None when it does not hold it (then
        the study is uploaded: to be denoised as a file, or before a verdict)."""
        return self.known_ids.get(identity or self.require_study())

    def record_upload(self, identity: StudyIdentity, datastore_id: str, study_file: Path | None = None) -> None:
        """The server holds ``identity`` as ``datastore_id`` (uploaded, or downloaded from the review queue)."""
        if not datastore_id or not str(datastore_id).strip():
            raise WorkflowError("the server answered the upload without a study id")
        known = self.known_ids.get(identity)
        if known is not None and known != datastore_id:
            raise WorkflowError(f"{identity.describe()} is already stored as {known!r}, not {datastore_id!r}")
        self.known_ids[identity] = str(datastore_id)
        if study_file is not None:
            self.study_files[identity] = Path(study_file)

    def record_opened(self, node_id: str, datastore_id: str, opened: dict[str, str] | None) -> None:
        """Node ``node_id`` was made from the server's ``datastore_id`` downloaded as the patient and study
        ``opened`` (``DenoiseServerClient.download_opened``; empty: no PACS series)."""
        if not node_id or not str(node_id).strip():
            raise WorkflowError("recording a downloaded study needs its node ID")
        self.opened_nodes[str(node_id)] = (str(datastore_id), dict(opened or {}))

    def opened_as(self, identity: StudyIdentity, node_id: str | None) -> dict[str, str]:
        """The patient and study a correction or verdict of ``identity`` on node ``node_id`` confirms: those of the
        download the node was made from (:meth:`record_opened`) while the server holds ``identity`` under that id,
        else none (``{}``: the server then refuses it if its PACS moved the series; never another download's)."""
        datastore_id, opened = self.opened_nodes.get(str(node_id), (None, {}))
        return dict(opened) if datastore_id is not None and self.server_id(identity) == datastore_id else {}

    # ---------------------------------------------------------------------------------------------- results
    def result_arrived(self, identity: StudyIdentity, node_id: str, model: str = "",
                       weights_version: str = "", result_seq: Any = None) -> ResultRecord | None:
        """A denoising result for ``identity`` came back (from the connected server; ``result_seq``: the
        ``audit_seq`` of its answer). Attached (and returned) only when ``identity`` is still the selected study; a
        late result for another study returns None and the caller discards its node. A new result drops the blend
        made from an older one."""
        if identity != self.study:
            return None
        if not node_id:
            raise WorkflowError("a result needs the node that shows it")
        if isinstance(result_seq, bool) or not isinstance(result_seq, int):
            result_seq = None  # an older server answers none: the verdict then names the model only
        record = ResultRecord(identity, next(self._serials), node_id, model or "", weights_version or "",
                              result_seq, self.server_url)
        self.results[identity] = record
        self.blend = None
        return record

    def result(self, identity: StudyIdentity | None = None) -> ResultRecord | None:
        """The result of ``identity`` (default: the selected study; None while it is stale), or None."""
        if identity is None:
            if self.study_stale:
                return None
            identity = self.study
        return self.results.get(identity) if identity is not None else None

    def require_result(self) -> ResultRecord:
        record = self.result(self.require_study())
        if record is None:
            raise WorkflowError("denoise the volume first")
        return record

    def forget_result(self, node_id: str) -> None:
        """The node showing a result was removed from the scene: forget that result (and its blend)."""
        for identity, record in list(self.results.items()):
            if record.node_id == node_id:
                del self.results[identity]
                if self.blend is not None and self.blend.result_serial == record.serial:
                    self.blend = None

    # ---------------------------------------------------------------------------------------------- correction
    def blended(self, strength: float, node_id: str) -> BlendRecord:
        """The user blended the selected study's current result at ``strength`` into node ``node_id``."""
        strength = float(strength)
        if not 0.0 <= strength <= 1.0:
            raise WorkflowError(f"blend strength must be within [0, 1], got {strength}")
        record = self.require_result()
        self.blend = BlendRecord(record.identity, record.serial, strength, node_id)
        return self.blend

    def require_correctable(self, identity: StudyIdentity | None = None,
                            on_screen: str | None = None) -> StudyIdentity | None:
        """``identity`` (default: the selected study), unless frames of its files hold wrong values (a rescale
        Slicer's reader ignored, :meth:`rescale_warning`): a correction of it is refused then, also once the user
        confirmed sending the volume. Asked before anything else of a correction, so the user is not asked to
        confirm sending a volume whose correction is refused anyway; ``on_screen``: the node on screen, which must
        be the study's (:meth:`require_on_screen`, asked before anything else)."""
        if on_screen is not None:
            self.require_on_screen(on_screen)
        identity = identity if identity is not None else self.study
        frames = self._ignored_frames(identity)
        if frames:
            raise WorkflowError(f"a correction of this volume is not sent: {frames}; fine-tuning must not learn from "
                                "wrong values. Load the series with a reader that applies each frame's rescale (or "
                                "convert the file to single-frame images), denoise it again, then correct it")
        return identity

    def require_judgeable(self, identity: StudyIdentity | None = None,
                          on_screen: str | None = None) -> StudyIdentity | None:
        """``identity`` (default: the selected study), unless frames of its files hold wrong values (a rescale
        Slicer's reader ignored, :meth:`rescale_warning`): a verdict on its result is refused then, also once the
        user confirmed sending the volume, since that result was denoised from an input the model should never have
        had: the verdict would judge the model on it, and the review queue and fine-tuning would take it as a
        reviewer's judgement. Asked before the user is asked to confirm sending the volume (:meth:`verdict_request`,
        the module's verdict buttons); ``on_screen``: the node on screen, which must be the study's
        (:meth:`require_on_screen`, asked before anything else)."""
        if on_screen is not None:
            self.require_on_screen(on_screen)
        identity = identity if identity is not None else self.study
        frames = self._ignored_frames(identity)
        if frames:
            raise WorkflowError(f"a verdict on this volume's result is not sent: {frames}; that result was denoised "
                                "from wrong values, and a verdict on it would judge the model on an input it should "
                                "never have had. Load the series with a reader that applies each frame's rescale (or "
                                "convert the file to single-frame images), denoise it again, then give the verdict")
        return identity

    def correction_to_submit(self, identity: StudyIdentity | None = None) -> BlendRecord | None:
        """The blend to submit for the selected study, or None (no blend made: the caller blends now at the
        slider's strength). Refuses a blend of another study or of an older result, and any correction of a
        volume whose frames hold wrong values (a rescale Slicer's reader ignored, :meth:`rescale_warning`), also
        once the user confirmed sending it: fine-tuning would learn those wrong values as a clinician's target."""
        study = self.require_correctable(self.require_study())
        if identity is not None and identity != study:
            raise WorkflowError(f"the volume changed: {identity.describe()} is not the selected "
                                f"{study.describe()}; select it again")
        record = self.require_result()
        blend = self.blend
        if blend is None:
            return None
        if blend.identity != study:
            raise WorkflowError(f"the blended correction belongs to {blend.identity.describe()}, not to the selected "
                                f"{study.describe()}: blend again")
        if blend.result_serial != record.serial:
            raise WorkflowError("the blended correction was made from an earlier result of this study: blend again")
        return blend

    # ---------------------------------------------------------------------------------------------- verdicts
    def verdict_request(self, verdict: str, reviewer: str, reason: str | None = None,
                        on_screen: str | None = None) -> dict:
        """Validate a verdict on the selected study; returns what to send (identity captured now, so an answer
        arriving after the user moved on is still recorded for the right study), with ``result_seq``: the server's
        entry of the study's result shown here, so that the server records the verdict against that very result
        (or refuses it) and never against a newer run's (someone denoised the study again meanwhile), and
        ``model``: that result's model. Refused without a result of the study (a verdict judges a denoised image
        the reviewer saw), and for a result another server made (its entry numbers name other results here).
        ``reviewer``: see :meth:`reviewer_name` (may be empty when signed in). Refused for a volume whose frames
        hold wrong values (:meth:`require_judgeable`), confirmed or not, before the confirmation is asked.
        ``on_screen``: the node on screen (the module's selection), refused first of all when it is not the node
        the study was identified from (:meth:`require_on_screen`)."""
        if on_screen is not None:
            self.require_on_screen(on_screen)
        self.require_judgeable(self.require_identified())
        study = self.require_study()
        if verdict not in VERDICTS:
            raise WorkflowError(f"verdict must be one of {', '.join(VERDICTS)}, got {verdict!r}")
        reviewer = self.reviewer_name(reviewer)
        reason = (reason or "").strip() or None
        if verdict == "rejected" and not reason:
            raise WorkflowError("give a reason for the rejection")
        record = self.result(study)
        if record is None:
            raise WorkflowError("denoise the volume first: a verdict judges the denoised result you looked at")
        if record.server_url is not None and self.server_url is not None and record.server_url != self.server_url:
            raise WorkflowError(f"the result on screen was made by {record.server_url}, not by {self.server_url} "
                                "you are connected to now: denoise the volume again here, then give the verdict")
        return {"identity": study, "image_id": self.datastore_id(study), "verdict": verdict, "reviewer": reviewer,
                "reason": reason, "model": record.model or None, "result_seq": record.result_seq}

    def verdict_refused(self, identity: StudyIdentity) -> None:
        """The server refused a verdict on ``identity`` (:class:`VerdictRefused`): the result on screen is no result
        of the study the server holds under that id now (removed and stored again, perhaps another patient's
        volume, or its file replaced). The result record and the server id are forgotten: the next Denoise sends
        this volume again instead of denoising what the server holds under the id, and the next verdict judges
        that new result."""
        record = self.results.pop(identity, None)
        if record is not None and self.blend is not None and self.blend.result_serial == record.serial:
            self.blend = None
        self.known_ids.pop(identity, None)
        self.study_files.pop(identity, None)

    def verdict_recorded(self, identity: StudyIdentity, entry: Any) -> dict:
        """The server's answer to a verdict on ``identity``: refused when empty or not an object."""
        entry = self.require_answer(entry, "the verdict")
        if not isinstance(entry, dict) or not entry.get("verdict"):
            raise WorkflowError("the server's answer to the verdict holds no verdict")
        self.verdicts[identity] = entry  # keyed by the study it was sent for, whatever is selected now
        return entry

    # ---------------------------------------------------------------------------------------------- review queue
    @staticmethod
    def queue_answer(answer: Any) -> dict | None:
        """The review queue's next study, or None when the queue is empty or holds only series it skipped
        (``too_large_to_review``, ``not_downloaded``: :meth:`describe_skipped`); a study without an id is refused."""
        if answer is None or answer == {}:
            return None
        if isinstance(answer, dict) and not answer.get("id") and any(answer.get(key) for key in SKIPPED_KEYS):
            return None
        if not isinstance(answer, dict) or not str(answer.get("id") or "").strip():
            raise WorkflowError("the review queue answered a study without an id")
        return answer

    @staticmethod
    def describe_skipped(answer: Any) -> str:
        """What the review queue skipped, not downloaded: PACS series over the server's voxel limit
        (``too_large_to_review``) and series it could not download (``not_downloaded``: each with the server's
        ``detail``, shortened). They stay unreviewed: a reviewer must know they exist; "" when none."""
        if not isinstance(answer, dict):
            return ""
        parts = []
        too_large = answer.get("too_large_to_review") or []
        if too_large:
            parts.append(f"{len(too_large)} unreviewed series too large for this server (over its max_voxels), "
                         f"skipped: {_listed(too_large)}")
        not_downloaded = answer.get("not_downloaded") or []
        if not_downloaded:
            parts.append(f"{len(not_downloaded)} unreviewed series the server could not download, skipped: "
                         f"{_listed(not_downloaded)}")
        return "; ".join(parts) + "; ask the server's administrator" if parts else ""

    @staticmethod
    def require_answer(answer: Any, what: str) -> Any:
        """``answer`` unless the server answered with an empty body (None, "" or {})."""
        if answer is None or answer == "" or answer == {}:
            raise WorkflowError(f"the server answered {what} with an empty body: is it the denoising app, "
                                "and is it healthy?")
        return answer

    # ---------------------------------------------------------------------------------------------- fine-tuning
    def start_training(self, model: str) -> None:
        """A fine-tuning run of ``model`` is being started; refused while another one runs."""
        if not model:
            raise WorkflowError("connect to a server and choose a model first")
        if self.training_model is not None:
            raise WorkflowError(f"fine-tuning of {self.training_model} is still running: wait for it or press Stop")
        self.training_model = model

    def training_finished(self) -> None:
        """The run ended (done, failed, interrupted), or starting it failed."""
        self.training_model = None

    # ---------------------------------------------------------------------------------------------- scene / module
    def scene_closed(self) -> None:
        """The scene was closed: node IDs restart, so every per-study record is forgotten and the patient files
        are deleted. A fine-tuning run continues on the server and stays watched (it belongs to no scene)."""
        self.temp.cleanup()
        self._reset_studies()

    def close(self) -> list[Path]:
        """The module closes: forget everything and delete the temporary files; returns folders left behind."""
        self._reset_studies()
        self.training_model = None
        return self.temp.cleanup()
