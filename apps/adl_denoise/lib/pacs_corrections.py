"""Corrections of a PACS's series, kept on the server: never converted to a DICOM SEG nor sent to the PACS.

MONAI Label's DICOMweb datastore saves a ``final`` label by converting it to a DICOM SEG (dcmqi's
``itkimage2segimage``) and storing that in the PACS; its other labels go to its local download cache. A denoising
correction is an intensity volume, not a segmentation (a SEG would quantise it to a label map, or be refused), this
app ships no converter (``bin/itkimage2segimage`` is a placeholder), and the cache may be cleared: a correction of a
PACS series failed (a bare 500), and a region map was kept only until the cache was cleared.

:func:`server_kept_labels` swaps a DICOMweb datastore's class for one with :class:`ServerKeptLabelsMixin` in front:
every label saved (``PUT /datastore/label``, any tag) is kept in :class:`KeptLabels`, a folder of the server's own
(``<model_dir>/corrections/dicomweb-<hash of the URL>``, :func:`lib.audit.location.default_corrections_dir`), under
the series' id, and read back from there by the label routes, the training list and fine-tuning, as a local
datastore's labels are. A DICOM SEG the PACS holds (saved by another tool) is still read as MONAI Label reads it.

A correction's stamp (:func:`lib.trainers.correction_stamp`) gets the identity of the series it corrects as the PACS
lists it when it is saved (:func:`correction_binding`: SeriesInstanceUID, StudyInstanceUID, PatientID, one QIDO-RS
series search): a local correction is bound to its image file's SHA-256, which a PACS series (a folder of files,
downloaded again after the cache is cleared) does not have. A kept label is sent (``GET /datastore/label``, its
info), listed for training (the training list, the dataset ZIP, fine-tuning) only while the PACS lists its series,
once, under that identity (:func:`check_binding`, one series search per series and request; MONAI Label never
refreshes a downloaded series, so its cached files cannot tell): :class:`CorrectionNotServed` otherwise (409 when the
series changed study or patient, or is listed in several; 404 when the PACS no longer lists it; 502 when the PACS
answered the search with an error; 504 when it did not answer within :data:`PACS_SEARCH_TIMEOUT_S`; a PACS that cannot
be reached is the routes' 503); nor is its info updated. A correction of a denoised series this server stored in the
PACS (saved by an older version; the label route refuses one) is not listed for training, a WARNING saying why.
Opening or denoising a series whose cached download is of another study or patient than the PACS lists now downloads
it anew first (:func:`refresh_moved_series`); what was recorded before stays bound to the identity it names, and a
correction saved then for the new patient keeps the old patient's aside, never removed (:class:`KeptLabels`). The
move is recorded (:func:`moved_record`): a correction, or a verdict judging no result, is saved from then on only when
the request confirms the patient and study it was drawn on (:func:`confirmed_identity`) and they are the PACS's now.

The folder's name is a hash of the URL: :func:`note_studies_url` records the URL (without credentials) in it, and
:func:`corrections_of_other_urls` is the start-up's WARNING when this URL keeps none and other URLs' folders do (a
host alias hid every correction in silence).

Every change of a kept label (save, info update, removal) holds a file lock of its own (``fcntl.flock`` on
``<root>/.locks/<tag>/<image_id>.lock``): two server processes on one ``model_dir`` change it one after the other (a
lock of one process lost an update, or both files). A label is sent from a file opened under that lock
(:meth:`KeptLabels.open`): a save replacing it meanwhile removes the earlier file's name, not the open file.
"""
from __future__ import annotations

import contextlib
import contextvars
import datetime
import fcntl
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Dict, Iterator, List, Optional, Tuple

from .audit.identity import dicom_text
from .runtime.atomic import atomic_write_json, fsync_path

log = logging.getLogger(__name__)

__all__ = ["KeptLabels", "ServerKeptLabelsMixin", "server_kept_labels", "correction_binding", "binding_problem",
           "check_binding", "CorrectionNotServed", "one_search_per_series", "pacs_identities", "searched_series",
           "bounded_search", "SERIES_IDENTITY_KEY", "LABEL_EXTENSIONS", "STUDIES_NOTE", "note_studies_url",
           "corrections_of_other_urls", "without_credentials", "verdict_binding", "refresh_moved_series",
           "SUPERSEDED", "MOVED", "moved_record", "confirmed_identity", "CONFIRMED_KEYS", "unconverted_series_info",
           "LABEL_SUPERSEDED", "series_refresh_locked"]

#: the correction stamp's key holding the identity of the PACS series it corrects (:func:`correction_binding`)
SERIES_IDENTITY_KEY = "series_identity"
#: the label file extensions kept (those the label route takes)
LABEL_EXTENSIONS = (".nii.gz", ".nii", ".nrrd")
#: ``<root>/<tag>/superseded/``: the labels a save for another series identity replaced (:meth:`KeptLabels.save`),
#: each in a folder of its own with its info; no label is read from there (never listed, sent, trained on, counted)
SUPERSEDED = "superseded"
#: the audit event of a kept label moved aside to :data:`SUPERSEDED` by a save for another series identity
LABEL_SUPERSEDED = "label_superseded"


def _identity_of(info: Optional[Dict[str, Any]]) -> Optional[Dict[str, str]]:
    """The series identity a kept label's ``info`` records (without DICOM padding), None when it records none."""
    bound = (info or {}).get(SERIES_IDENTITY_KEY)
    if not isinstance(bound, dict):
        return None
    return {key: dicom_text(bound.get(key)) for key in _IDENTITY_KEYS}


def _identity_words(bound: Any) -> str:
    if not isinstance(bound, dict):
        return "no recorded series identity"
    return f"patient_id {bound.get('patient_id')!r} (study {bound.get('study_instance_uid')!r})"


def _extension(path: str | os.PathLike) -> str:
    name = os.path.basename(os.fspath(path)).lower()
    return next((ext for ext in LABEL_EXTENSIONS if name.endswith(ext)), ".nii.gz")


class KeptLabels:
    """Labels kept in ``root``: ``<root>/<tag>/<image_id>.json`` (the label's info, ``file`` naming its file) and
    ``<root>/<tag>/<image_id>.<token>/<image_id><ext>`` (the file). A save writes the new file into a folder of its
    own, then replaces the info (atomically) and removes the earlier file: a reader sees the earlier label or the new
    one, never one's info with the other's file; a save that fails leaves the earlier label as it was. An earlier
    label recorded for another series identity (:data:`SERIES_IDENTITY_KEY`: a series the PACS moved to another
    patient or study, saved again for its new one) is not removed but kept aside, its file and info, in
    ``<root>/<tag>/superseded/<image_id>.<UTC time>.<token>/`` (:data:`SUPERSEDED`; a WARNING names both patients):
    another patient's correction was lost. Nothing there is read as a label. Every read goes to the disk (the
    training subprocess, another server process on the same folder, see the same)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    @contextlib.contextmanager
    def _locked(self, image_id: str, tag: str, shared: bool = False) -> Iterator[None]:
        """The label's own file lock (exclusive to change it, shared to open its file): held across processes
        (``flock`` on ``<root>/.locks/<tag>/<image_id>.lock``; never removed, so that two holders lock one file)
        and across threads (each call opens the lock file anew)."""
        path = self.root / ".locks" / tag / f"{image_id}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a+b") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            yield  # closing the file releases the lock

    def _info_path(self, image_id: str, tag: str) -> Path:
        return self.root / tag / f"{image_id}.json"

    def info(self, image_id: str, tag: str) -> Optional[Dict[str, Any]]:
        """The label's info (what it was saved with, its ``file`` name relative to ``root``), None without one."""
        try:
            info = json.loads(self._info_path(image_id, tag).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as error:  # damaged: no label, said once in the log
            log.warning("kept label %s (%s) unreadable: %s", image_id, tag, error)
            return None
        return info if isinstance(info, dict) and isinstance(info.get("file"), str) else None

    def path(self, image_id: str, tag: str) -> Optional[Path]:
        """The label's file: ``<root>/<tag>/<image_id>.<token>/<name>`` as its info names it; None without a label
        or when the info names another place (a damaged or hand-edited info: never followed, nor removed)."""
        return self._file_of(image_id, tag, self.info(image_id, tag))

    def entry(self, image_id: str, tag: str) -> Optional[Tuple[Path, Dict[str, Any]]]:
        """``(file, info)`` of the label from one read of its info (:meth:`path`, :meth:`info`); None without one."""
        info = self.info(image_id, tag)
        path = self._file_of(image_id, tag, info)
        return None if path is None else (path, info)

    def open(self, image_id: str, tag: str) -> Optional[Tuple[IO[bytes], Dict[str, Any]]]:
        """The label's file opened for reading, and its info, both read under the label's lock: a save or removal
        meanwhile removes the file's name, never the open file (a sent label is the one whose info was read). None
        without a label; the caller closes the file. Nothing is created for a label that is not kept (a lock file
        each: every read of a label id, any, filled the disk)."""
        if self.info(image_id, tag) is None:
            return None
        with self._locked(image_id, tag, shared=True):
            found = self.entry(image_id, tag)
            if found is None:
                return None
            return open(found[0], "rb"), found[1]

    def _file_of(self, image_id: str, tag: str, info: Optional[Dict[str, Any]]) -> Optional[Path]:
        if info is None:
            return None
        path = self.root / info["file"]
        if path.parent.parent != self.root / tag or not path.parent.name.startswith(f"{image_id}.") or \
                ".." in Path(info["file"]).parts:
            log.warning("kept label %s (%s) names %s, not a file of its own: ignored", image_id, tag, info["file"])
            return None
        return path

    def tags(self, image_id: str) -> List[str]:
        if not self.root.is_dir():
            return []
        return sorted(entry.name for entry in self.root.iterdir()
                      if entry.is_dir() and self.info(image_id, entry.name) is not None)

    def images(self, tag: str) -> List[str]:
        folder = self.root / tag
        if not folder.is_dir():
            return []
        return sorted(p.name[: -len(".json")] for p in folder.glob("*.json") if self.info(p.name[:-5], tag))

    def save(self, image_id: str, label_filename: str, tag: str, info: Dict[str, Any],
             superseded: Optional[Callable[[Dict[str, Any]], None]] = None) -> str:
        """Keep a copy of ``label_filename`` as ``image_id``'s label ``tag`` with ``info`` (replacing an earlier
        one: removed when it records the same series identity, else kept aside with its info, see the class);
        returns ``image_id`` (the label's id, as a local datastore's). ``superseded``: called, under the label's
        lock, with what was kept aside (:meth:`_move_aside`) when an earlier label of another identity was (the
        audit entry of it: :meth:`ServerKeptLabelsMixin.save_label`)."""
        folder = self.root / tag
        ext = _extension(label_filename)
        with self._locked(image_id, tag):  # another process's save / info update: before or after, never between
            folder.mkdir(parents=True, exist_ok=True)
            version = Path(tempfile.mkdtemp(prefix=f"{image_id}.", dir=folder))
            aside = None
            try:
                target = version / f"{image_id}{ext}"
                shutil.copyfile(label_filename, target)
                fsync_path(target)
                fsync_path(version)
                earlier_info = self.info(image_id, tag)
                earlier = self._file_of(image_id, tag, earlier_info)
                if earlier is not None and earlier.parent != version and \
                        _identity_of(earlier_info) != _identity_of(info):
                    aside = self._prepare_aside(image_id, tag, earlier, earlier_info, info)
                atomic_write_json(self._info_path(image_id, tag),
                                  {**info, "name": target.name, "file": str(target.relative_to(self.root))})
            except BaseException:
                shutil.rmtree(version, ignore_errors=True)
                if aside is not None:  # the earlier label stays as it was; its reserved place aside goes
                    (earlier.parent / f"{image_id}.json").unlink(missing_ok=True)
                    shutil.rmtree(aside, ignore_errors=True)
                raise
            if aside is not None:
                kept_aside = self._move_aside(image_id, tag, earlier, aside, earlier_info, info)
                if superseded is not None:
                    superseded(kept_aside)
            elif earlier is not None and earlier.parent != version:
                shutil.rmtree(earlier.parent, ignore_errors=True)
        return image_id

    def _prepare_aside(self, image_id: str, tag: str, earlier: Path, earlier_info: Dict[str, Any],
                       info: Dict[str, Any]) -> Path:
        """An empty folder of its own under ``<root>/<tag>/superseded/`` (the earlier version's folder is renamed
        onto it) and the earlier info, naming the file where it will be, written into the earlier version's folder
        first: a server stopped before the rename leaves that folder with its info beside the file, never one
        without the other."""
        superseded = self.root / tag / SUPERSEDED
        superseded.mkdir(parents=True, exist_ok=True)
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        aside = Path(tempfile.mkdtemp(prefix=f"{image_id}.{stamp}.", dir=superseded))
        try:
            atomic_write_json(earlier.parent / f"{image_id}.json", {
                **earlier_info, "file": str((aside / earlier.name).relative_to(self.root)),
                "superseded": {"at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                               "by_" + SERIES_IDENTITY_KEY: info.get(SERIES_IDENTITY_KEY)}})
        except BaseException:
            shutil.rmtree(aside, ignore_errors=True)
            raise
        return aside

    def _move_aside(self, image_id: str, tag: str, earlier: Path, aside: Path, earlier_info: Dict[str, Any],
                    info: Dict[str, Any]) -> Dict[str, Any]:
        """The earlier version's folder (its file and info) renamed onto ``aside``, said in the log. The new label is
        saved by now: a rename that fails leaves the earlier one where it was, with its info (an ERROR says where).
        Returns what was kept aside: ``superseded_identity`` (the earlier label's series identity),
        ``by_identity`` (the new one's), ``kept_in`` (its folder, relative to the root), ``moved`` (False when the
        rename failed), and the earlier label's ``saved_by``, ``saved_utc``, ``sha256``."""
        before, after = _identity_words(earlier_info.get(SERIES_IDENTITY_KEY)), \
            _identity_words(info.get(SERIES_IDENTITY_KEY))
        said = {"superseded_identity": earlier_info.get(SERIES_IDENTITY_KEY),
                "by_identity": info.get(SERIES_IDENTITY_KEY),
                **{key: earlier_info.get(key) for key in ("saved_by", "saved_utc", "sha256")}}
        try:
            os.rename(earlier.parent, aside)  # one rename onto the empty folder reserved for it: file and info
        except OSError as error:
            log.error("kept label %s (%s) replaced by one saved for %s; the earlier one, saved for %s, could not be "
                      "moved aside (%s): it stays in %s with its info (%s.json), not listed, sent nor trained on",
                      image_id, tag, after, before, error, earlier.parent, image_id)
            return {**said, "kept_in": str(earlier.parent.relative_to(self.root)), "moved": False}
        try:  # the rename made durable; it is done whatever this says (it said the label stayed where it was)
            fsync_path(aside.parent)
            fsync_path(earlier.parent.parent)
        except OSError as error:
            log.warning("kept label %s (%s): the earlier one is moved aside to %s, but the folders could not be "
                        "synced to the disk (%s): a power cut now may leave it in %s", image_id, tag, aside, error,
                        earlier.parent)
        log.warning("kept label %s (%s) replaced by one saved for %s; the earlier one, saved for %s, is kept aside in "
                    "%s (never listed, sent nor trained on)", image_id, tag, after, before, aside)
        return {**said, "kept_in": str(aside.relative_to(self.root)), "moved": True}

    def update_info(self, image_id: str, tag: str, info: Dict[str, Any]) -> None:
        with self._locked(image_id, tag):
            current = self.info(image_id, tag)
            if current is None:
                raise KeyError(f"no label {image_id} of tag {tag}")
            file = current["file"]
            current.update(info)
            current["file"] = file  # the file stays the one kept
            atomic_write_json(self._info_path(image_id, tag), current)

    def remove(self, image_id: str, tag: str) -> None:
        with self._locked(image_id, tag):
            path = self.path(image_id, tag)
            self._info_path(image_id, tag).unlink(missing_ok=True)
            if path is not None:
                shutil.rmtree(path.parent, ignore_errors=True)


class CorrectionNotServed(ValueError):
    """A kept label of a PACS series that is not sent, listed nor used (:func:`check_binding`), or a label that is
    not saved (:func:`correction_binding`); ``status`` is the HTTP status the routes answer (409: the series changed
    study or patient, or is listed in several; 404: the PACS no longer lists it; 502: the PACS's search failed; 504:
    the PACS did not answer it within :data:`PACS_SEARCH_TIMEOUT_S`)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class ServerKeptLabelsMixin:
    """Mixed in front of MONAI Label's ``DICOMWebDatastore`` by :func:`server_kept_labels` (see the module
    docstring). A label id is its image's id (a series' SeriesInstanceUID), as in a local datastore; an id the server
    keeps no label of is asked of MONAI Label's own (a DICOM SEG series of the PACS for ``final``). A kept label's
    file and info are given only after :func:`check_binding` (:class:`CorrectionNotServed` otherwise)."""

    _kept: KeptLabels
    _results_audit: Any = None  # the audit log naming the results this server stored in the PACS (stored_results)

    def holds_label(self, label_id: str, label_tag: str) -> bool:
        """Whether ``label_id`` (an image's id) has a label ``label_tag`` kept on this server."""
        return self._kept.path(label_id, label_tag) is not None

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: Dict[str, Any],
                   label_id: str = "") -> str:
        """The label kept (:meth:`KeptLabels.save`); an earlier label of another patient or study that it replaces,
        kept aside, is a :data:`LABEL_SUPERSEDED` audit entry (:meth:`_record_superseded`)."""
        return self._kept.save(image_id, label_filename, label_tag, dict(label_info or {}),
                               superseded=lambda aside: self._record_superseded(image_id, label_tag, aside))

    def _record_superseded(self, image_id: str, label_tag: str, aside: Dict[str, Any]) -> None:
        """A :data:`LABEL_SUPERSEDED` entry in the app's audit log (``_results_audit``; none without one): the
        series and tag, what :meth:`KeptLabels._move_aside` returned (the earlier label's and the new one's
        identities, where the earlier one is kept) and who saved the new one
        (:func:`lib.audit.context.request_actor`); the entry's time is when. Written once the earlier label is aside
        (the new one saved, between the save's ``label_saving`` and ``label_saved`` entries); one that cannot be
        written is an ERROR (the save stands, as for its ``label_saved`` entry)."""
        if self._results_audit is None:
            return
        from .audit import AuditError
        from .audit.context import request_actor

        try:
            self._results_audit.append(LABEL_SUPERSEDED, {"image": image_id, "tag": label_tag, **aside,
                                                          **request_actor()})
        except AuditError:
            log.exception("kept label %s (%s): the earlier one, of another patient or study, is kept in %s, but its "
                          "audit entry (%s) could not be written", image_id, label_tag, aside.get("kept_in"),
                          LABEL_SUPERSEDED)

    def checked_label(self, label_id: str, label_tag: str,
                      refused: Optional[str] = None) -> Optional[Tuple[Path, Dict[str, Any]]]:
        """``(file, info)`` of the kept label, checked to be its series' (:func:`check_binding`; ``refused``: what
        is not done when it is not, the refusal's end); None when none is kept. Raises :class:`CorrectionNotServed`."""
        found = self._kept.entry(label_id, label_tag)
        if found is not None:
            check_binding(self, label_id, found[1], *([refused] if refused else []))
        return found

    def open_checked_label(self, label_id: str, label_tag: str) -> Optional[Tuple[IO[bytes], Dict[str, Any]]]:
        """The kept label's file, opened (:meth:`KeptLabels.open`), and its info, checked to be its series'
        (:func:`check_binding`, before the file is opened: a PACS slow to answer holds no open file); None when none is
        kept. Raises :class:`CorrectionNotServed`."""
        info = self._kept.info(label_id, label_tag)
        if info is None:
            return None
        check_binding(self, label_id, info)
        opened = self._kept.open(label_id, label_tag)
        if opened is not None and opened[1].get(SERIES_IDENTITY_KEY) != info.get(SERIES_IDENTITY_KEY):
            try:  # saved again meanwhile, for another identity: that one checked
                check_binding(self, label_id, opened[1])
            except BaseException:
                opened[0].close()
                raise
        return opened

    def get_label_uri(self, label_id: str, label_tag: str, image_id: str = "") -> str:
        found = self.checked_label(label_id, label_tag)
        if found is not None:
            return str(found[0])
        return super().get_label_uri(label_id, label_tag, image_id)

    def get_label_info(self, label_id: str, label_tag: str) -> Dict[str, Any]:
        found = self.checked_label(label_id, label_tag)
        if found is not None:
            return {key: value for key, value in found[1].items() if key != "file"}
        return super().get_label_info(label_id, label_tag)

    def get_labels_by_image_id(self, image_id: str) -> Dict[str, str]:
        labels = dict(super().get_labels_by_image_id(image_id) or {})
        labels.update({tag: image_id for tag in self._kept.tags(image_id)})
        return labels

    def get_labeled_images(self, label_tag: Optional[str] = None, labels: Optional[List[str]] = None) -> List[str]:
        """The series with a ``final`` label: those whose correction this server keeps (while the PACS lists
        them; their binding is checked when their label is read) and those a DICOM SEG of the PACS labels. None of
        the kept ones while the audit log cannot be read (an ERROR says so): MONAI Label's ``/info/`` and datastore
        statistics list them through here and must keep answering; training asks :meth:`check_training_data`."""
        kept = self._kept_finals(strict=False)
        return sorted(set(kept) | set(super().get_labeled_images(label_tag, labels)))

    def check_training_data(self) -> None:
        """Raises :class:`CorrectionNotServed` (503) when the kept corrections cannot be told from the server's own
        stored results (the audit log cannot be read): called before a training list is made from them."""
        self._kept_finals(strict=True)

    def _kept_finals(self, strict: bool = True) -> List[str]:
        """The series with a correction kept here that the PACS lists and that are studies: a denoised series this
        server stored in the PACS, or a UID of several series, is left out with a WARNING saying why
        (:func:`lib.activelearning.review.unreviewable_reason`, as the label route refuses to save one: an older
        version saved them, and training learnt from a correction of the model's own output). When the audit log
        naming those series cannot be read: raises :class:`CorrectionNotServed` (503) if ``strict``, else none of
        them (logged)."""
        from collections import Counter

        from .activelearning.review import stored_results, unreviewable_reason
        from .audit import AuditError
        from .imaging.errors import one_line

        kept = self._kept.images("final")
        if not kept:
            return []
        listing = self.list_images()
        listed = set(listing)
        gone = [image_id for image_id in kept if image_id not in listed]
        if gone:
            log.info("corrections kept of series the PACS no longer lists (not used): %s", ", ".join(gone))
        try:
            stored = stored_results(self._results_audit, strict=True) if self._results_audit is not None else set()
        except (AuditError, OSError) as error:  # each correction would pass for a study's: trained on in silence
            problem = CorrectionNotServed(
                f"the corrections kept on this server are not used: the audit log, which names the denoised series "
                f"this server stored in the PACS (whose corrections are no training data), cannot be read "
                f"({one_line(error)}); make it readable and try again", 503)
            if strict:
                raise problem from None
            log.error("%s", problem)
            return []
        ambiguous = {image_id for image_id, count in Counter(listing).items() if count > 1}
        finals = []
        for image_id in kept:
            if image_id not in listed:
                continue
            problem = unreviewable_reason(image_id, stored, ambiguous)
            if problem:
                log.warning("not training data: the correction kept of series %s: %s", image_id, problem)
                continue
            finals.append(image_id)
        return finals

    def remove_label(self, label_id: str, label_tag: str) -> None:
        if self.holds_label(label_id, label_tag):
            self._kept.remove(label_id, label_tag)
            return
        super().remove_label(label_id, label_tag)

    def update_label_info(self, label_id: str, label_tag: str, info: Dict[str, Any]) -> None:
        """A kept label's info updated only while it is its series' (:func:`check_binding`: a correction of a series
        now another patient's or study's had its info changed, as if still that series'); raises
        :class:`CorrectionNotServed`, nothing written."""
        if self.holds_label(label_id, label_tag):
            check_binding(self, label_id, self._kept.info(label_id, label_tag), "its info was not changed")
            self._kept.update_info(label_id, label_tag, info)
            return
        super().update_label_info(label_id, label_tag, info)

    def datalist(self, full_path: bool = True) -> List[Dict[str, Any]]:
        """Each kept correction's pair whose series the PACS lists under its stamped identity (:func:`check_binding`,
        one series search each; a WARNING names each one left out and why): the series' file as ``get_image_uri``
        gives it (downloaded, bounded, if needed) and the kept label's. Raises :class:`CorrectionNotServed` (502)
        when the PACS's search fails. MONAI Label's own listing first downloaded every series a SEG of the PACS
        references, and asked each SEG as its label, which pairs nothing (:func:`lib.pacs_seg.seg_label_uri`): each
        listing downloaded those series for nothing (a 413 when one was over the voxel limit); it is skipped, and so
        are the pairs in its index (``labels/final/<image>.nii.gz``): this server saves none there, an earlier
        version saved each SEG's conversion as the label of the image it references, stale once the SEG was
        replaced, possibly another patient's (kept, unused: :func:`lib.pacs_seg.remove_earlier_seg_labels`)."""
        pairs: List[Dict[str, Any]] = []
        with one_search_per_series():
            for image_id in self._kept_finals():
                try:
                    found = self.checked_label(image_id, "final")
                except CorrectionNotServed as problem:
                    if problem.status >= 500:
                        raise
                    log.warning("not training data: %s", problem)
                    continue
                if found is None:  # removed meanwhile
                    continue
                pairs.append({"image": self.get_image_uri(image_id), "label": str(found[0])})
        return pairs


_classes: Dict[type, type] = {}


def server_kept_labels(datastore, folder: str | os.PathLike, audit=None):
    """``datastore`` itself; a DICOMweb one gets its class swapped for one with :class:`ServerKeptLabelsMixin` in
    front, its labels kept in ``folder``; ``audit``: the app's audit log, whose records of the results this server
    stored in the PACS keep their corrections out of training (None: not read)."""
    from .pacs import is_dicomweb

    if not is_dicomweb(datastore):
        return datastore
    cls = type(datastore)
    if not issubclass(cls, ServerKeptLabelsMixin):
        if cls not in _classes:
            _classes[cls] = type(f"ServerKeptLabels{cls.__name__}", (ServerKeptLabelsMixin, cls), {})
        datastore.__class__ = _classes[cls]
    datastore._kept = KeptLabels(folder)
    datastore._results_audit = audit
    return datastore


#: the file of a corrections folder naming the PACS URL it is kept for (without credentials): the folder's name is
#: a hash of the URL (:func:`lib.audit.location.dicomweb_folder_name`), which a warning cannot name otherwise
STUDIES_NOTE = "studies.json"


def note_studies_url(folder: str | os.PathLike, studies: str) -> None:
    """``<folder>/studies.json``: ``{"studies": the URL without its credentials nor query}``, unless it says so
    already. Not written (a WARNING) when it cannot be: it only names the folder's URL to an admin."""
    note = Path(folder) / STUDIES_NOTE
    url = without_credentials(studies.strip().rstrip("/"))
    try:
        if json.loads(note.read_text(encoding="utf-8")).get("studies") == url:
            return
    except (OSError, ValueError, AttributeError):
        pass
    try:
        atomic_write_json(note, {"studies": url})
    except OSError as error:
        log.warning("could not write %s (it names the PACS URL of the corrections kept there): %s", note, error)


def _labels_in(folder: Path) -> int:  # <tag>/<image_id>.json: one per label kept (no tag starts with a dot)
    return sum(1 for path in folder.glob("*/*.json") if not path.parent.name.startswith("."))


def corrections_of_other_urls(folder: str | os.PathLike, studies: str) -> Optional[str]:
    """The WARNING to log at start-up when the corrections folder of this PACS URL, ``folder``
    (``<model_dir>/corrections/dicomweb-<hash of the URL>``), keeps no label and the folder above it holds folders
    of other URLs that do: a PACS reached by another URL (a host alias, a port, a path: another hash) found none of
    its kept corrections, and said nothing. Names each folder, the URL it was kept for where recorded
    (:data:`STUDIES_NOTE`; never credentials) and how many labels it keeps; None otherwise."""
    folder = Path(folder)
    if _labels_in(folder) if folder.is_dir() else 0:
        return None
    others = []
    for other in sorted(folder.parent.glob("dicomweb-*")) if folder.parent.is_dir() else []:
        count = _labels_in(other) if other.is_dir() and other != folder else 0
        if not count:
            continue
        try:
            url = json.loads((other / STUDIES_NOTE).read_text(encoding="utf-8")).get("studies")
            url = without_credentials(str(url)) if url else None  # a hand-edited note: its credentials not logged
        except (OSError, ValueError, AttributeError):
            url = None
        others.append(f"{other.name} ({f'kept for {url}' if url else 'its URL not recorded'}: {count} label(s))")
    if not others:
        return None
    return (f"no correction is kept for this PACS URL ({without_credentials(studies.strip().rstrip('/'))}, folder "
            f"{folder}), but {folder.parent} keeps corrections of other PACS URLs: {'; '.join(others)}. A PACS's "
            "corrections are kept under a hash of its --studies URL: if one of those is this PACS under another URL "
            f"(a host alias, a port), stop the server and move that folder's contents into {folder.name}, else they "
            "stay unused (its audit log's default folder, <model_dir>/audit/<same name>, is keyed the same way)")


_IDENTITY_KEYS = ("series_instance_uid", "study_instance_uid", "patient_id")
#: seconds the PACS has to answer a series' identity search (all its tries): one that accepts connections but never
#: answers held a label's read for ever (504 then)
PACS_SEARCH_TIMEOUT_S = 30.0


def _unreadable_download(image_id: str, folder: Path, error: OSError) -> CorrectionNotServed:
    """500 saying that the download of ``image_id`` in ``folder`` cannot be read (``error``), without its path (an
    ERROR in the log names it)."""
    log.error("series %s: this server's download of it (%s) cannot be read: %s", image_id, folder, error)
    return CorrectionNotServed(
        f"this server cannot read its download of series {image_id} in its DICOMweb cache ("
        f"{error.strerror or type(error).__name__}): nothing was done with it; ask the server's administrator to "
        "check the cache folder's permissions and disk (the server's log names the folder)", 500)


def _download_files(folder: Path, image_id: str) -> List[Path]:
    """The entries of the series ``image_id``'s download folder, sorted; ``[]`` when it is gone. A folder that
    cannot be listed (no permission, an I/O error) is a 500 saying so (:func:`_unreadable_download`; a bare 500
    before)."""
    try:
        return sorted(folder.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as error:  # e.g. PermissionError: the cache folder's owner or mode changed
        raise _unreadable_download(image_id, folder, error) from None


class MixedDownload(CorrectionNotServed):
    """409: the DICOM files of a series' download here do not all name that series under one study and patient
    (a retrieve taken while the PACS moved or merged the series, or files of other series only): which patient's
    voxels it holds cannot be told. ``identities``: the distinct identities (:data:`_IDENTITY_KEYS`) its files
    name, this series' first; ``said``: what is wrong, as a part of a sentence about the download ("its files
    name ...")."""

    def __init__(self, message: str, identities: List[Dict[str, str]], said: str) -> None:
        super().__init__(message, 409)
        self.identities = identities
        self.said = said


def _download_header(folder: Path, image_id: str) -> Dict[str, str]:
    """The header of the series ``image_id``'s download in ``folder`` (:data:`_HEADER_INFO_KEYS`, DICOM padding
    dropped, "" for one a file lacks), read from the first of its files, once every DICOM file in the folder was
    read (headers only: ``stop_before_pixels``) and found to name that series under one StudyInstanceUID and
    PatientID. The one reader of a download's identity (the refresh, a correction's and a verdict's checks, the info
    of a series not converted): each read the first file it found and they need not have read the same one (the
    info skipped files of other series, the checks did not), and a download whose files name several patients (a
    retrieve taken while the PACS merged them) was named after whichever file came first.

    Raises:
        FileNotFoundError: the folder is gone or holds no DICOM file.
        MixedDownload: 409, its files name several studies or patients, or only other series.
        CorrectionNotServed: 500, the folder or a file in it cannot be read (no permission, an I/O error: the
            DICOMweb cache folder's permissions or disk; it was a bare 500).
    """
    import pydicom

    paths = _download_files(folder, image_id)
    first: Optional[Dict[str, str]] = None
    identities: List[Dict[str, str]] = []
    others: List[Dict[str, str]] = []
    for path in paths:
        try:
            header = pydicom.dcmread(str(path), stop_before_pixels=True)
        except (FileNotFoundError, IsADirectoryError):  # removed meanwhile; a folder: no file of the series
            continue
        except PermissionError as error:
            raise _unreadable_download(image_id, folder, error) from None
        except Exception:  # noqa: BLE001 - not a DICOM file: not a part of the series
            continue
        identity = {key: dicom_text(header.get(name)) for key, name in _RECORDED_KEYS.items()}
        if identity["series_instance_uid"] != image_id:
            if identity not in others:
                others.append(identity)
            continue
        if identity not in identities:
            identities.append(identity)
        if first is None:
            first = {key: dicom_text(header.get(key)) for key in _HEADER_INFO_KEYS}
    if first is None and not others:
        raise FileNotFoundError(f"series {image_id}: no DICOM file in its download")
    if first is None or len(identities) > 1:
        named = "; ".join(f"series {i['series_instance_uid']!r}, {_who(i)}" for i in identities + others)
        said = ("its files name several patients or studies" if first is not None
                else "its files are of other series only") + f" ({named})"
        raise MixedDownload(f"this server's download of series {image_id} is not one series of one patient: {said}: "
                            "a retrieve taken while the PACS moved or merged the series; whose voxels it holds cannot "
                            "be told", identities + others, said)
    return first


#: the image info keys MONAI Label records when it converts a downloaded series (``DICOMWebDatastore._dicom_info``),
#: the header's keywords
_RECORDED_KEYS = {"series_instance_uid": "SeriesInstanceUID", "study_instance_uid": "StudyInstanceUID",
                  "patient_id": "PatientID"}


def _recorded_identity(info: Dict[str, Any]) -> Dict[str, str]:
    """The identity MONAI Label recorded in a converted series' ``info`` (the keys it holds), without DICOM padding
    (:func:`lib.audit.identity.dicom_text`: the header's ``' PAT1'`` is the PACS's ``'PAT1'``)."""
    return {key: dicom_text(info[name]) for key, name in _RECORDED_KEYS.items() if name in info}


def _header_identity(folder: Path, image_id: str) -> Dict[str, str]:
    """The identity (:data:`_IDENTITY_KEYS`) the series ``image_id``'s download in ``folder`` names, every file
    checked (:func:`_download_header`, whose errors it raises)."""
    header = _download_header(folder, image_id)
    return {key: header[name] for key, name in _RECORDED_KEYS.items()}


def _served_problems(datastore, image_id: str, current: Dict[str, str], thing: str, nothing: str) -> List[str]:
    """Why the image the server sends (and trains on) as the series ``image_id`` is not the series the PACS lists
    now under ``current``: its downloaded folder's header and, when MONAI Label converts series
    (``MONAI_LABEL_DICOMWEB_CONVERT_TO_NIFTI``, on by default), its conversion ``<image_id>.nii.gz``, which MONAI
    Label never rebuilds once it exists (the folder alone re-downloaded, the old conversion was still served;
    opening or denoising the series again replaces both: :func:`refresh_moved_series`). ``[]`` when it is that
    series'. Nothing is downloaded nor converted (its caller holds the refresh's lock, which the series' reads and
    infers wait for: a download there held them for as long as it took): a download (or conversion) no longer in
    the cache, removed by a refresh since the ``thing`` was checked against it (``nothing``: what is not done), is a
    409 (:class:`CorrectionNotServed`) saying to open the series again, as one whose files name several
    patients or studies (:class:`MixedDownload`)."""
    from .pacs import cached_series_folder

    folder = cached_series_folder(datastore, image_id)
    conversion = folder.parent / f"{image_id}.nii.gz"  # MONAI Label's name for it (DICOMWebDatastore.get_image_uri)
    remedy = (f"open the series again (GET /datastore/image?image={image_id}) or denoise it again: this server then "
              f"downloads it anew as the PACS lists it now; review that and send the {thing} again")
    try:
        downloaded = _header_identity(folder, image_id)
    except FileNotFoundError:
        downloaded = None
    except MixedDownload as error:
        raise CorrectionNotServed(f"{error}; {nothing} ({remedy})", 409) from None
    if downloaded is None or (getattr(datastore, "_convert_to_nifti", True) and not conversion.is_file()):
        raise CorrectionNotServed(
            f"this server's download of series {image_id}, which the {thing} was drawn on, is no longer in its "
            f"cache (removed since: the PACS moved or changed the series, and a request downloads it anew); "
            f"{nothing} ({remedy})", 409)
    problems: List[str] = []
    changed = _download_changes(downloaded, current)
    if changed:
        problems.append(f"its download has {changed}")
    if conversion.is_file() and getattr(datastore, "_convert_to_nifti", True):  # what is sent and trained on
        changed = _conversion_changes(datastore, image_id, current)
        if changed:
            problems.append(f"the image sent ({conversion.name}) was converted from {changed}")
        newest = max((p.stat().st_mtime for p in _download_files(folder, image_id)), default=0.0)
        if conversion.stat().st_mtime < newest:
            problems.append(f"the image sent ({conversion.name}) was converted from an earlier download")
    return problems


#: the PACS's answers of one request or listing (:func:`one_search_per_series`): series id -> its entries
_searched: contextvars.ContextVar[Optional[Dict[str, List[Dict[str, str]]]]] = \
    contextvars.ContextVar("adl_pacs_series_identities", default=None)


@contextlib.contextmanager
def one_search_per_series() -> Iterator[None]:
    """Within it, :func:`searched_series` (so :func:`pacs_identities`, :func:`lib.pacs.final_label_problem` and a
    SEG's modality check) asks the PACS once per series (a training list reads each correction's info, file and
    region map; a SEG's label read checked its modality twice and its identity once: one search, not one per
    read); outside it every call asks."""
    token = _searched.set({}) if _searched.get() is None else None
    try:
        yield
    finally:
        if token is not None:
            _searched.reset(token)


#: a host as a URL names it, with its port: a name or IPv4 address, or an IPv6 address in brackets
_HOST = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~-]+)(:[0-9]*)?")


def without_credentials(url: str) -> str:
    """``url`` as it may be logged or recorded: without its user name and password (``user:password@``), query
    (a token) nor fragment; a folder (no ``scheme://``) as it is. The URL is taken as a parser (and requests)
    takes it, unless that leaves no host or an ``@`` in the path: a password with an unencoded ``/``, ``?``, ``#``
    or ``@`` (the parser takes part of it for the host or path: it was logged), whose user name and password then
    end at the last ``@`` before a host. An ``@`` in the query (``?user=a@b``) is no credentials' end."""
    from urllib.parse import urlsplit

    text = str(url)
    scheme, sep, rest = text.partition("://")
    if not sep:
        return text
    try:
        parts = urlsplit(text)
        host = parts.netloc.rpartition("@")[2]
        if _HOST.fullmatch(host) and "@" not in parts.path:
            return f"{scheme.lower()}://{host}{parts.path}"
    except ValueError:  # an unbalanced [ in what it took for the host
        pass
    for at in reversed([i for i, char in enumerate(rest) if char == "@"]):
        found = _HOST.match(rest, at + 1)
        if found and (found.end() == len(rest) or rest[found.end()] in "/?#"):
            path = re.split(r"[?#]", rest[found.end():], maxsplit=1)[0]
            return f"{scheme.lower()}://{found.group()}{path}"
    return f"{scheme.lower()}://(a URL that does not parse)"


def studies_url_problem(url: str) -> Optional[str]:
    """Why a ``--studies`` URL cannot be used as written, or None: a user name or password holding an unencoded
    ``/``, ``?``, ``#`` or ``@`` makes requests take part of it for the host, port or path (its requests then
    failed, their errors quoting that part of the password)."""
    from urllib.parse import urlsplit

    text = str(url or "")
    if not text.lower().startswith(("http://", "https://")):
        return None
    problem = ("its user name or password holds an unencoded '/', '?', '#' or '@': percent-encode them (%2F, %3F, "
               "%23, %40)")
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises on a port that is no number (the start of a password)
    except ValueError:
        return problem
    if not _HOST.fullmatch(parts.netloc.rpartition("@")[2]) or "@" in parts.path:
        return problem
    return None


def bounded_search(datastore, search: Callable[[], Any], what: str, unchecked: str) -> Any:
    """``search()`` (a QIDO-RS search of the datastore's PACS for ``what``, e.g. "series <uid>") within
    :data:`PACS_SEARCH_TIMEOUT_S`, its answer returned; ``unchecked``: what its failure leaves undone, said.

    Raises:
        CorrectionNotServed: 502, the PACS answered the search with an error; 504, it did not answer in time.
        requests.ConnectionError: the PACS cannot be reached (the routes' 503).
    """
    import requests
    import retrying

    from .pacs import answered_within, error_answer

    client = datastore._client  # noqa: SLF001 - the datastore's authenticated DICOMweb client (bounded waits)
    try:
        with answered_within(client, PACS_SEARCH_TIMEOUT_S):
            return search()
    except requests.ReadTimeout:
        raise CorrectionNotServed(f"the PACS ({without_credentials(client.base_url)}) did not answer the search for "
                                  f"{what} within {PACS_SEARCH_TIMEOUT_S:g} s: {unchecked}", 504) from None
    except (requests.HTTPError, retrying.RetryError) as error:  # an error status (retried ones: RetryError)
        status = getattr(error_answer(error), "status_code", None)
        raise CorrectionNotServed(f"the PACS answered the search for {what} with an error (HTTP {status}): "
                                  f"{unchecked}", 502) from None


def pacs_identities(datastore, image_id: str) -> List[Dict[str, str]]:
    """The identities (``series_instance_uid``, ``study_instance_uid``, ``patient_id``) under which the PACS lists
    the series ``image_id`` now: one QIDO-RS series search (:func:`searched_series`, within
    :data:`PACS_SEARCH_TIMEOUT_S`: :func:`bounded_search`; no instance retrieved), each distinct identity once:
    ``[]`` when it lists none, two or more for one UID in several studies or patients.

    Raises:
        CorrectionNotServed: 502, the PACS answered the search with an error; 504, it did not answer within
            :data:`PACS_SEARCH_TIMEOUT_S`.
        requests.ConnectionError: the PACS cannot be reached (the routes' 503).
    """
    found = bounded_search(datastore, lambda: searched_series(datastore, image_id), f"series {image_id}",
                           "its study and patient cannot be checked; nothing was sent or saved")
    identities: List[Dict[str, str]] = []
    for entry in found:
        identity = {key: entry[key] for key in _IDENTITY_KEYS}
        if identity not in identities:
            identities.append(identity)
    return identities


#: :func:`searched_series`'s entry key listing the identity keys the PACS's answer left out
UNRETURNED = "unreturned"


def searched_series(datastore, series_uid: str) -> List[Dict[str, Any]]:
    """The PACS's entries of the series ``series_uid`` (``series_instance_uid``, ``study_instance_uid``,
    ``patient_id``, ``modality``; DICOM padding dropped), one a series it lists under that UID: one QIDO-RS series
    search, asked once per series within :func:`one_search_per_series` (a failed search is not kept: the next call
    asks again). Its callers set its deadline and answer its errors (those of the DICOMweb client, raised as they
    are)."""
    from .pacs import _first_str

    memo = _searched.get()
    if memo is not None and series_uid in memo:
        return memo[series_uid]
    client = datastore._client  # noqa: SLF001 - the datastore's authenticated DICOMweb client (bounded waits)
    found = client.search_for_series(search_filters={"SeriesInstanceUID": series_uid},
                                     fields=["StudyInstanceUID", "PatientID", "Modality"]) or []
    entries = [{"series_instance_uid": series_uid, "study_instance_uid": dicom_text(_first_str(entry, "0020000D")),
                "patient_id": dicom_text(_first_str(entry, "00100020")),  # padding dropped, as every side's
                "modality": dicom_text(_first_str(entry, "00080060")),
                # the identity attributes the PACS left out of its answer (unknown, not empty: a PACS may leave out
                # PatientID from a series search): :func:`refresh_moved_series` compares only what it returned
                UNRETURNED: [key for key, tag in (("study_instance_uid", "0020000D"), ("patient_id", "00100020"))
                             if tag not in entry]}
               for entry in found if _first_str(entry, "0020000E") == series_uid]
    if memo is not None:
        memo[series_uid] = entries
    return entries


def _one_identity(datastore, image_id: str, what: str) -> Dict[str, str]:
    """The one identity the PACS lists ``image_id`` under; :class:`CorrectionNotServed` (404 / 409) naming ``what``
    is refused otherwise."""
    identities = pacs_identities(datastore, image_id)
    if not identities:
        raise CorrectionNotServed(f"the PACS no longer lists series {image_id}: {what}", 404)
    if len(identities) > 1:
        listed = "; ".join(f"study {i['study_instance_uid']!r}, patient_id {i['patient_id']!r}" for i in identities)
        raise CorrectionNotServed(f"the PACS lists series {image_id} under {len(identities)} studies or patients "
                                  f"({listed}): which one it is cannot be told; {what}", 409)
    return identities[0]


def correction_binding(datastore, image_id: str, confirmed: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    """The stamp keys binding a label saved for the PACS series ``image_id`` to it (``{SERIES_IDENTITY_KEY: {...}}``:
    the one identity the PACS lists it under now); ``{}`` for another datastore (a local correction is bound by its
    image file's SHA-256). ``confirmed``: the patient and study the client drew the label on
    (:func:`confirmed_identity`), None when it says none. The caller holds :func:`series_refresh_locked` from
    this check to the label's save (the label route does, within :func:`one_search_per_series`): a refresh then
    never records a move or replaces the download checked in between. One PACS search; nothing downloaded nor
    converted (the series' reads wait for that lock: a download there held them for as long as it took).

    Raises:
        CorrectionNotServed: 404, the PACS no longer lists the series; 409, it lists it under several studies or
            patients, or the server's download of it (the image the label was drawn on) is no longer in the cache
            (a refresh removed it: open the series again), names several studies or patients in its files, or has
            another study or patient than the PACS lists now, or ``confirmed`` names another, or this server
            downloaded the series anew because the PACS moved it (:func:`moved_record`) and ``confirmed`` does not
            name the identity of now (a label drawn before the move was of the old patient's record: once any
            request had opened the series again it was saved for the new one); 502, the PACS's search failed.
    """
    if not isinstance(datastore, ServerKeptLabelsMixin):
        return {}
    nothing = "nothing was saved"
    current = _one_identity(datastore, image_id, nothing)
    _refuse_unconfirmed(datastore, image_id, current, confirmed, "correction", nothing,
                        "open the series again and save it with params patient_id and study_instance_uid of the "
                        "series as opened (its image info's PatientID and StudyInstanceUID)")
    problems = _served_problems(datastore, image_id, current, "correction", nothing)  # never downloads
    if problems:
        raise CorrectionNotServed(
            f"series {image_id} changed since this server downloaded it: {'; '.join(problems)}; the PACS now lists "
            f"{', '.join(f'{k} {current[k]!r}' for k in _IDENTITY_KEYS)}; {nothing} (open the series again, GET "
            f"/datastore/image?image={image_id}, or denoise it again: this server then downloads it anew as the PACS "
            "lists it now; review that and save the correction again)", 409)
    return {SERIES_IDENTITY_KEY: current}


#: the request keys (a label's ``params``, a verdict's body) naming the identity a client drew on or judged
CONFIRMED_KEYS = ("patient_id", "study_instance_uid")
#: the folder of a kept-corrections root recording the series this server downloaded anew because the PACS moved
#: them (:func:`refresh_moved_series`): ``<root>/.moved/<image_id>.json`` (no label tag starts with a dot)
MOVED = ".moved"


def confirmed_identity(values: Dict[str, Any], where: str) -> Optional[Dict[str, str]]:
    """The identity a request confirms it drew on (``patient_id``, ``study_instance_uid`` of ``values``, popped
    from it, padding dropped), None when it names neither; ValueError (a 422 naming ``where``) for one that is not
    text."""
    confirmed = {}
    for key in CONFIRMED_KEYS:
        if key in values:
            value = values.pop(key)
            if not isinstance(value, str):
                raise ValueError(f"{where} {key} must be text (the {key} of the series as opened), got "
                                 f"{type(value).__name__}")
            confirmed[key] = dicom_text(value)
    return confirmed or None


def _moved_path(datastore, image_id: str) -> Path:
    return datastore._kept.root / MOVED / f"{image_id}.json"  # noqa: SLF001 - the kept-corrections root


def moved_record(datastore, image_id: str) -> Optional[Dict[str, Any]]:
    """The record of the last time this server removed its download of the series ``image_id`` because the PACS
    listed it under another study or patient (``from``, ``to``: identities; ``time_utc``), None when none (or for
    another datastore). An unreadable record counts as a move from an unknown identity (the safe side)."""
    if not isinstance(datastore, ServerKeptLabelsMixin):
        return None
    path = _moved_path(datastore, image_id)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        log.warning("series %s: its record of a move by the PACS (%s) is unreadable: %s", image_id, path, error)
        return {"from": {}, "to": {}, "time_utc": "an unknown time"}
    return record if isinstance(record, dict) else {"from": {}, "to": {}, "time_utc": "an unknown time"}


def _record_move(datastore, image_id: str, before: Dict[str, str], after: Dict[str, str]) -> None:
    """``<root>/.moved/<image_id>.json`` (atomic): the series moved by the PACS from ``before`` to ``after`` now."""
    path = _moved_path(datastore, image_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {"series_instance_uid": image_id, "from": before, "to": after,
                             "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})


def _who(identity: Dict[str, Any]) -> str:
    return (f"patient_id {identity.get('patient_id', '(unknown)')!r} (study "
            f"{identity.get('study_instance_uid', '(unknown)')!r})")


def _refuse_unconfirmed(datastore, image_id: str, current: Dict[str, str], confirmed: Optional[Dict[str, str]],
                        thing: str, nothing: str, remedy: str, need_confirmation: bool = True) -> None:
    """409 (:class:`CorrectionNotServed`) when the request says it drew on (judged) another identity than the PACS
    lists now, or when this server downloaded the series anew because the PACS moved it and the request does not
    confirm both keys of the identity of now (``need_confirmation``): the client sends nothing else telling which
    identity it had open."""
    # MONAI Label's image info says "UNK" for a series without PatientID (what the Slicer module confirms): none
    changed = [key for key in CONFIRMED_KEYS if confirmed and key in confirmed and confirmed[key] != current[key]
               and not (confirmed[key] == "UNK" and current[key] == "")]
    moved = moved_record(datastore, image_id) if need_confirmation or changed else None
    if not changed and (moved is None or (confirmed and all(key in confirmed for key in CONFIRMED_KEYS))):
        return
    said = ""
    if moved is not None:
        said = (f"the PACS moved series {image_id} from {_who(moved.get('from') or {})} to "
                f"{_who(moved.get('to') or {})}, this server downloaded it anew at {moved.get('time_utc')}: a {thing} "
                f"drawn on the series opened before then was of {_who(moved.get('from') or {})}'s record; ")
    if changed:
        said += (f"the request says the series was opened as {', '.join(f'{k} {confirmed[k]!r}' for k in changed)}; "
                 f"the PACS lists it under {', '.join(f'{k} {current[k]!r}' for k in changed)} now; ")
    else:
        said += "the request does not say which patient and study it was drawn on (patient_id, study_instance_uid); "
    raise CorrectionNotServed(f"{said}{nothing} ({remedy})", 409)


def _download_changes(downloaded: Dict[str, str], current: Dict[str, str],
                      keys: Tuple[str, ...] = _IDENTITY_KEYS) -> str:
    """The identity values (of ``keys``) of a series' download (its header) that the PACS lists otherwise now, as
    ``key 'value'`` pairs; "" when none."""
    return ", ".join(f"{k} {downloaded[k]!r}" for k in keys if downloaded[k] != current[k])


def _conversion_changes(datastore, image_id: str, current: Dict[str, str],
                        keys: Tuple[str, ...] = _IDENTITY_KEYS) -> str:
    """The identity values (of ``keys``) MONAI Label recorded when it converted the series ``image_id`` (its image
    info) that the PACS lists otherwise now, as ``key 'value'`` pairs; "" when none (a recorded ``UNK`` is an empty
    value listed)."""
    recorded = _recorded_identity(datastore.get_image_info(image_id) or {})
    return ", ".join(f"{k} {value!r}" for k, value in recorded.items()
                     if k in keys and value != current[k] and not (value == "UNK" and current[k] == ""))


def verdict_binding(datastore, image_id: str, judged_input: Optional[Dict[str, Any]] = None,
                    confirmed: Optional[Dict[str, str]] = None, result_named: bool = True) -> Dict[str, Any]:
    """The identity a verdict on the PACS series ``image_id`` is recorded with (``{SERIES_IDENTITY_KEY: {...}}``:
    the one identity the PACS lists it under now, one QIDO-RS search, as a correction's: :func:`correction_binding`),
    checked against what the reviewer saw: the server's download of the series and MONAI Label's conversion of it
    (the image sent) where the cache holds them (nothing is downloaded for a verdict), and the judged result's
    input (``judged_input``, from its audit entry: the series, study and patient it was denoised from; one naming
    no patient, recorded by an earlier version, is refused: denoise again). Every identity is compared without its
    DICOM padding (:func:`lib.audit.identity.dicom_text`). ``{}`` for another datastore. A verdict read only the
    server's cached series list and the audit log: one on a series moved to another patient was recorded (beside
    the cached patient and study), and one given while the PACS was down too; a result's input named no patient
    (its verdict was recorded for the other patient once the cache was cleared), and a header's ``' PAT1'`` was
    another patient than the PACS's ``'PAT1'`` (409). ``confirmed``: the patient and study the client judged
    (:func:`confirmed_identity`): one of another is refused, and so is a verdict judging no result, or the latest
    result without naming it (``result_named`` False), without it on a series this server downloaded anew because
    the PACS moved it (:func:`moved_record`; a result the client named names its own patient).

    Raises:
        CorrectionNotServed: 404, the PACS no longer lists the series; 409, it lists it under several studies or
            patients, or the cached download (or conversion), or the result judged, has another study or patient
            (or the result names none), or ``confirmed`` does not name the identity of now where it must; 502 / 504,
            its search
            failed or was not answered in time.
        requests.ConnectionError: the PACS cannot be reached (the routes' 503).
    """
    if not isinstance(datastore, ServerKeptLabelsMixin):
        return {}
    from .pacs import cached_images, cached_series_folder

    nothing = "the verdict was not recorded"
    current = _one_identity(datastore, image_id, nothing)
    _refuse_unconfirmed(datastore, image_id, current, confirmed, "verdict", nothing,
                        "open the series again and give the verdict with patient_id and study_instance_uid of the "
                        "series as opened (its image info's PatientID and StudyInstanceUID)",
                        # a result the client named names the patient it was made for; the latest one taken for
                        # a verdict naming none may postdate the move
                        need_confirmation=judged_input is None or not result_named)
    problems: List[str] = []
    folder = cached_series_folder(datastore, image_id)
    if _download_files(folder, image_id):
        try:
            changed = _download_changes(_header_identity(folder, image_id), current)
        except FileNotFoundError:  # no DICOM file left in it: nothing reviewed from it to compare
            changed = ""
        except MixedDownload as error:  # which patient's voxels were reviewed cannot be told
            changed = error.said.replace("its files", "files that", 1)
        if changed:
            problems.append(f"its download has {changed}")
    if image_id in cached_images(datastore) and (folder.parent / f"{image_id}.nii.gz").is_file():
        # converted: its info holds what MONAI Label recorded then (an info whose conversion was removed describes
        # nothing sent: the running server kept it until the series was downloaded again, each verdict a 409)
        changed = _conversion_changes(datastore, image_id, current)
        if changed:
            problems.append(f"the image sent was converted from {changed}")
    head = "changed since this server downloaded it (what was reviewed)" if problems else \
        "is not shown to be what the result judged was denoised from"
    remedy = (f"open the series again (GET /datastore/image?image={image_id}) or denoise it again: this server "
              "then downloads it anew as the PACS lists it now; review that and give the verdict again") \
        if problems else ""
    if judged_input is not None:  # the result judged: denoised from this series of this patient?
        judged = {key: dicom_text(judged_input[key]) for key in _IDENTITY_KEYS if key in judged_input}
        if "patient_id" not in judged:  # recorded before results named their patient (or its input unreadable)
            problems.append("the result judged names no patient (recorded by an earlier version of this server): "
                            "whether it was denoised from this patient's series cannot be told")
        changed = [key for key, value in judged.items() if value != current[key]]
        if changed:
            problems.append(f"the result judged was denoised from {', '.join(f'{k} {judged[k]!r}' for k in changed)}")
        if "patient_id" not in judged or changed:  # denoising again also downloads a moved series anew
            remedy = "denoise the series again and judge that result"
    if problems:
        raise CorrectionNotServed(
            f"series {image_id} {head}: {'; '.join(problems)}; "
            f"the PACS now lists {', '.join(f'{k} {current[k]!r}' for k in _IDENTITY_KEYS)}; {nothing} ({remedy})",
            409)
    return {SERIES_IDENTITY_KEY: current}


#: the lock of one series' check-and-remove of its stale cache (:func:`refresh_moved_series`), under the
#: kept-corrections root's ``.locks``: held across threads and processes (MONAI Label's batch infer and training
#: subprocesses run the same code), so a request that found the same stale files never removes the download
#: another one made meanwhile
_REFRESH_LOCK_TAG = ".refresh"


def refresh_moved_series(datastore, image_id: str, what: str = "nothing was sent") -> Optional[str]:
    """Before the series ``image_id`` is opened, its info read or denoised (``GET /datastore/image``,
    ``GET /datastore/image/info``, infer): when the server's cached download of it (its files' header, MONAI Label's
    conversion and the image info recorded with it) has another series, study or patient than the PACS lists it
    under now (one QIDO-RS series search, within :data:`PACS_SEARCH_TIMEOUT_S`, made only when the series is
    cached; the PACS moved it to another patient or study), or the conversion was made from an earlier download,
    the cached download, its conversion and the info are removed, so that the request downloads the series the PACS
    holds now; a move is recorded (:func:`moved_record`), after which a correction or a verdict without a result is
    saved only when the request confirms the identity of now (:func:`correction_binding`). Only what the PACS
    returned is compared (an attribute it leaves out of its answer is unknown, not changed). An info whose
    conversion is gone (a cache cleared by hand) is dropped too: it described nothing sent. Returns what was
    removed and why (also a WARNING), None when nothing was. Corrections and verdicts are not touched: each stays
    bound to the identity it was recorded with (:func:`check_binding`, :func:`verdict_binding`). Nothing is removed
    when the PACS cannot be asked (the cache is served as before, a WARNING says the check was not made), nor for
    another datastore. MONAI Label never downloads a cached series again: a moved series was served, and judged,
    with the old patient's identity until the cache was emptied by hand and the server restarted.

    Raises:
        CorrectionNotServed: 404, the PACS no longer lists the cached series; 409, it lists it under several
            studies or patients (``what``: what is not done): its cached download was served (and denoised, and a
            result stored in the PACS with the old header's patient).
    """
    if not isinstance(datastore, ServerKeptLabelsMixin):
        return None
    import requests

    from .pacs import cached_images, cached_series_folder, one_line_redacted

    folder = cached_series_folder(datastore, image_id)
    conversion = folder.parent / f"{image_id}.nii.gz"  # MONAI Label's name for it (DICOMWebDatastore.get_image_uri)
    if not (image_id in cached_images(datastore) or conversion.exists() or folder.is_dir()):
        return None
    try:
        with one_search_per_series():  # one search: the identities, then which attributes it returned
            identities = pacs_identities(datastore, image_id)
            unreturned = {key for entry in searched_series(datastore, image_id) for key in entry.get(UNRETURNED, ())}
    except (CorrectionNotServed, requests.RequestException) as error:
        log.warning("series %s: whether the PACS still lists it under the study and patient of this server's cached "
                    "download could not be checked (%s): the cache is used as it is", image_id,
                    one_line_redacted(error))
        return None
    if len(identities) != 1:
        _one_identity(datastore, image_id, f"{what} (this server's cached download of it is not served)")
    current = identities[0]
    keys = tuple(key for key in _IDENTITY_KEYS if key not in unreturned)
    with datastore._kept._locked(image_id, _REFRESH_LOCK_TAG):  # noqa: SLF001 - across threads and processes
        problems: List[str] = []
        before: Dict[str, str] = {}
        if _download_files(folder, image_id):
            try:
                downloaded = _header_identity(folder, image_id)
                changed = _download_changes(downloaded, current, keys)
                before = downloaded if changed else before
            except FileNotFoundError:  # no DICOM file in it: nothing to serve from it
                changed = "no DICOM file"
            except MixedDownload as error:  # files of several patients (a retrieve taken mid-merge): downloaded
                changed = error.said.replace("its files", "files that", 1)  # anew; one of another is a move
                before = next((identity for identity in error.identities
                               if _download_changes(identity, current, keys)), before)
            if changed:
                problems.append(f"its download has {changed}")
        converted = conversion.is_file()
        if image_id in cached_images(datastore):
            changed = _conversion_changes(datastore, image_id, current, keys) if converted else ""
            if changed:
                problems.append(f"its conversion was made from {changed}")
                before = before or {**current, **_recorded_identity(datastore.get_image_info(image_id) or {})}
            elif not converted:
                _forget_image(datastore, image_id)  # an info without its file: no download to refresh
        if converted and not problems and folder.is_dir() and conversion.stat().st_mtime < \
                max((p.stat().st_mtime for p in _download_files(folder, image_id)), default=0.0):
            problems.append("its conversion was made from an earlier download")
        if not problems:
            return None
        if before and any(before.get(key) != current[key] for key in ("study_instance_uid", "patient_id")
                          if key in keys):  # moved: what was drawn on it before is another's record
            _record_move(datastore, image_id, {key: before[key] for key in CONFIRMED_KEYS if key in before},
                         {key: current[key] for key in CONFIRMED_KEYS})
        _remove_cached_download(datastore, image_id, folder, conversion)
        said = (f"series {image_id}: this server's cached download was not the series the PACS lists now "
                f"({'; '.join(problems)}; the PACS lists {', '.join(f'{k} {current[k]!r}' for k in _IDENTITY_KEYS)}): "
                "removed, the series is downloaded again; the corrections and verdicts recorded before stay bound to "
                "the identity they were recorded with, and a correction is saved now only with the patient_id and "
                "study_instance_uid of the series as opened")
        log.warning("%s", said)
        return said


#: the keys of :func:`unconverted_series_info`: those MONAI Label records when it converts a downloaded series
#: (``DICOMWebDatastore._dicom_info``) that a downloaded file's header holds
_HEADER_INFO_KEYS = ("SeriesInstanceUID", "StudyInstanceUID", "PatientID", "Modality", "StudyDate", "StudyTime")


def unconverted_series_info(datastore, image_id: str) -> Dict[str, Any]:
    """The image info of a PACS series this server downloaded but MONAI Label does not convert
    (``MONAI_LABEL_DICOMWEB_CONVERT_TO_NIFTI=false``: it records an info only with a conversion, so the info route
    answered ``{}``): MONAI Label's keys (:data:`_HEADER_INFO_KEYS`, ``"UNK"`` for one the header lacks, as MONAI
    Label writes) read from the header of the cached download (:func:`_download_header`: every file's, one series,
    study and patient), under the refresh's lock (a refresh replacing the download meanwhile: never half of each).
    The header, not the PACS's series search: the download is what this server denoises (in this mode it sends no
    series' file: ``GET /datastore/image`` of a PACS series is a 404, a client gets only the results made from it)
    and what :func:`correction_binding` compares with the PACS, so the patient and study a client confirms from
    this info are those of the download its results were made from; the PACS's answer of now would let a client
    confirm the new patient for a result made from the old patient's download. The routes refresh a moved series'
    download before reading this (:func:`refresh_moved_series`); when the PACS cannot be asked the download is read
    as it is. ``{}`` for a series not downloaded (as MONAI Label's info of a series not in its cache), a converted
    one (MONAI Label's own info) and another datastore; 409 (:class:`CorrectionNotServed`) for a download whose
    files name several patients or studies (:class:`MixedDownload`), 500 for one that cannot be read."""
    if not isinstance(datastore, ServerKeptLabelsMixin) or getattr(datastore, "_convert_to_nifti", True):
        return {}
    from .pacs import cached_series_folder

    folder = cached_series_folder(datastore, image_id)
    if not folder.is_dir():  # nothing downloaded: no lock file made for an id that is none (any id may be asked)
        return {}
    with series_refresh_locked(datastore, image_id):
        try:
            header = _download_header(folder, image_id)  # every file checked: one series, study and patient
        except FileNotFoundError:  # removed meanwhile, or no DICOM file in it
            return {}
        except MixedDownload as error:
            raise CorrectionNotServed(
                f"{error}; its info was not sent (open the series again, GET /datastore/image?image={image_id}: this "
                "server then downloads it anew as the PACS lists it now)", 409) from None
    return {key: header[key] or "UNK" for key in _HEADER_INFO_KEYS}


@contextlib.contextmanager
def series_refresh_locked(datastore, image_id: str) -> Iterator[None]:
    """The lock :func:`refresh_moved_series` holds while it checks and replaces the series' cached download and
    records a move, held across threads and processes (``flock``); nothing for another datastore. A correction's
    checks and its save hold it (:func:`correction_binding` and the label route), and a verdict's checks and its
    entry (:func:`lib.activelearning.review.record_verdict`), so that a refresh never records a move, nor replaces
    the download, between the checks and the save. Nothing downloads under it (the series' reads wait for it)."""
    if not isinstance(datastore, ServerKeptLabelsMixin):
        yield
        return
    with datastore._kept._locked(image_id, _REFRESH_LOCK_TAG):  # noqa: SLF001 - the refresh's own lock
        yield


def _forget_image(datastore, image_id: str) -> None:
    """MONAI Label's info of the cached series ``image_id`` dropped from the running server and its index file
    (``datastore_v2.json``), read again under MONAI Label's lock first (another process, a batch infer or training
    subprocess, may have added entries since this one read it): its file watcher drops the info only when it sees
    the conversion go, if ever."""
    from filelock import FileLock

    with FileLock(datastore._lock_file):  # noqa: SLF001 - MONAI Label's lock of its index
        index = Path(datastore._datastore_config_path)  # noqa: SLF001
        if index.is_file():  # as LocalDatastore._init_from_datastore_file does, its lock held here
            model = type(datastore._datastore).model_validate_json(index.read_text())  # noqa: SLF001
            model.base_path = datastore._datastore_path  # noqa: SLF001
            datastore._datastore = model  # noqa: SLF001
            datastore._config_ts = index.stat().st_mtime  # noqa: SLF001
        if datastore._datastore.objects.pop(image_id, None) is not None:  # noqa: SLF001
            datastore._update_datastore_file(lock=False)  # noqa: SLF001


def _remove_cached_download(datastore, image_id: str, folder: Path, conversion: Path) -> None:
    """The series' cached download (renamed aside first: a reader of it meanwhile keeps its open files; one a
    server stopped here leaves is a stale partial download, removed at its next start), conversion and info. A
    download another process removed meanwhile is gone already: nothing is left behind (it was a bare 500 and an
    empty partial folder)."""
    from .pacs import PARTIAL_DOWNLOAD_PREFIX

    if folder.exists():
        aside = Path(tempfile.mkdtemp(prefix=f"{PARTIAL_DOWNLOAD_PREFIX}{image_id}-", dir=folder.parent))
        try:
            os.rename(folder, aside / folder.name)
        except FileNotFoundError:  # removed by another process since it was seen
            pass
        finally:
            shutil.rmtree(aside, ignore_errors=True)
    conversion.unlink(missing_ok=True)
    _forget_image(datastore, image_id)


def check_binding(datastore, image_id: str, info: Dict[str, Any] | None,
                  what: str = "its correction kept on this server is not sent nor used for training") -> None:
    """Nothing when the kept label of ``image_id`` (its ``info``) is still that series' (the PACS lists the series,
    once, with the SeriesInstanceUID, StudyInstanceUID and PatientID stamped when it was saved), or for another
    datastore. ``what``: what is not done (the refusal's end).

    Raises:
        CorrectionNotServed: 409 naming what changed (or a stamp naming no identity, or several listed); 404 when
            the PACS no longer lists the series; 502 when its search failed.
    """
    if not isinstance(datastore, ServerKeptLabelsMixin):
        return
    bound = (info or {}).get(SERIES_IDENTITY_KEY)
    if not isinstance(bound, dict):
        raise CorrectionNotServed(f"the correction of series {image_id} names no series identity (not saved by this "
                                  f"server's label route): {what}", 409)
    current = _one_identity(datastore, image_id, what)
    changed = [key for key in _IDENTITY_KEYS if dicom_text(bound.get(key)) != current[key]]
    if changed:
        raise CorrectionNotServed(
            f"the correction of series {image_id} was saved for {', '.join(f'{k} {bound.get(k)!r}' for k in changed)}; "
            f"the PACS's series now has {', '.join(f'{k} {current[k]!r}' for k in changed)}: {what}", 409)


def binding_problem(datastore, image_id: str, info: Dict[str, Any] | None) -> Optional[str]:
    """Why the kept label of ``image_id`` (its ``info``) is not that series' any more (:func:`check_binding`'s
    404 / 409), None when it is, or for another datastore. Raises :class:`CorrectionNotServed` (502) when the
    PACS's search failed, and what the client raises when the PACS cannot be reached."""
    try:
        check_binding(datastore, image_id, info)
    except CorrectionNotServed as problem:
        if problem.status >= 500:
            raise
        return str(problem)
    return None
