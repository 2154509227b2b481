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

A correction's stamp (:func:`lib.trainers.correction_stamp`) gets the identity of the series it corrects, read from
its downloaded DICOM files (:func:`correction_binding`: SeriesInstanceUID, StudyInstanceUID, PatientID): a local
correction is bound to its image file's SHA-256, which a PACS series (a folder of files, downloaded again after the
cache is cleared) does not have. Fine-tuning uses a PACS correction only while the series it downloads still has
that identity (:func:`binding_problem`).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, Dict, List, Optional

from .runtime.atomic import atomic_write_json, fsync_path

log = logging.getLogger(__name__)

__all__ = ["KeptLabels", "ServerKeptLabelsMixin", "server_kept_labels", "correction_binding", "binding_problem",
           "SERIES_IDENTITY_KEY", "LABEL_EXTENSIONS"]

#: the correction stamp's key holding the identity of the PACS series it corrects (:func:`correction_binding`)
SERIES_IDENTITY_KEY = "series_identity"
#: the label file extensions kept (those the label route takes)
LABEL_EXTENSIONS = (".nii.gz", ".nii", ".nrrd")


def _extension(path: str | os.PathLike) -> str:
    name = os.path.basename(os.fspath(path)).lower()
    return next((ext for ext in LABEL_EXTENSIONS if name.endswith(ext)), ".nii.gz")


class KeptLabels:
    """Labels kept in ``root``: ``<root>/<tag>/<image_id>.json`` (the label's info, ``file`` naming its file) and
    ``<root>/<tag>/<image_id>.<token>/<image_id><ext>`` (the file). A save writes the new file into a folder of its
    own, then replaces the info (atomically) and removes the earlier file: a reader sees the earlier label or the new
    one, never one's info with the other's file; a save that fails leaves the earlier label as it was. Every read
    goes to the disk (the training subprocess, another server process on the same folder, see the same)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self._lock = threading.RLock()

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
        info = self.info(image_id, tag)
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

    def save(self, image_id: str, label_filename: str, tag: str, info: Dict[str, Any]) -> str:
        """Keep a copy of ``label_filename`` as ``image_id``'s label ``tag`` with ``info`` (replacing an earlier
        one); returns ``image_id`` (the label's id, as a local datastore's)."""
        folder = self.root / tag
        ext = _extension(label_filename)
        with self._lock:
            folder.mkdir(parents=True, exist_ok=True)
            version = Path(tempfile.mkdtemp(prefix=f"{image_id}.", dir=folder))
            try:
                target = version / f"{image_id}{ext}"
                shutil.copyfile(label_filename, target)
                fsync_path(target)
                fsync_path(version)
                earlier = self.path(image_id, tag)
                atomic_write_json(self._info_path(image_id, tag),
                                  {**info, "name": target.name, "file": str(target.relative_to(self.root))})
            except BaseException:
                shutil.rmtree(version, ignore_errors=True)
                raise
            if earlier is not None and earlier.parent != version:
                shutil.rmtree(earlier.parent, ignore_errors=True)
        return image_id

    def update_info(self, image_id: str, tag: str, info: Dict[str, Any]) -> None:
        with self._lock:
            current = self.info(image_id, tag)
            if current is None:
                raise KeyError(f"no label {image_id} of tag {tag}")
            file = current["file"]
            current.update(info)
            current["file"] = file  # the file stays the one kept
            atomic_write_json(self._info_path(image_id, tag), current)

    def remove(self, image_id: str, tag: str) -> None:
        with self._lock:
            path = self.path(image_id, tag)
            self._info_path(image_id, tag).unlink(missing_ok=True)
            if path is not None:
                shutil.rmtree(path.parent, ignore_errors=True)


class ServerKeptLabelsMixin:
    """Mixed in front of MONAI Label's ``DICOMWebDatastore`` by :func:`server_kept_labels` (see the module
    docstring). A label id is its image's id (a series' SeriesInstanceUID), as in a local datastore; an id the server
    keeps no label of is asked of MONAI Label's own (a DICOM SEG series of the PACS for ``final``)."""

    _kept: KeptLabels

    def holds_label(self, label_id: str, label_tag: str) -> bool:
        """Whether ``label_id`` (an image's id) has a label ``label_tag`` kept on this server."""
        return self._kept.path(label_id, label_tag) is not None

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: Dict[str, Any],
                   label_id: str = "") -> str:
        return self._kept.save(image_id, label_filename, label_tag, dict(label_info or {}))

    def get_label_uri(self, label_id: str, label_tag: str, image_id: str = "") -> str:
        path = self._kept.path(label_id, label_tag)
        if path is not None:
            return str(path)
        return super().get_label_uri(label_id, label_tag, image_id)

    def get_label_info(self, label_id: str, label_tag: str) -> Dict[str, Any]:
        info = self._kept.info(label_id, label_tag)
        if info is not None:
            return {key: value for key, value in info.items() if key != "file"}
        return super().get_label_info(label_id, label_tag)

    def get_labels_by_image_id(self, image_id: str) -> Dict[str, str]:
        labels = dict(super().get_labels_by_image_id(image_id) or {})
        labels.update({tag: image_id for tag in self._kept.tags(image_id)})
        return labels

    def get_labeled_images(self, label_tag: Optional[str] = None, labels: Optional[List[str]] = None) -> List[str]:
        """The series with a ``final`` label: those whose correction this server keeps (while the PACS lists
        them) and those a DICOM SEG of the PACS labels (MONAI Label's)."""
        kept = self._kept_finals()
        return sorted(set(kept) | set(super().get_labeled_images(label_tag, labels)))

    def _kept_finals(self) -> List[str]:
        kept = self._kept.images("final")
        if not kept:
            return []
        listed = set(self.list_images())
        gone = [image_id for image_id in kept if image_id not in listed]
        if gone:
            log.info("corrections kept of series the PACS no longer lists (not used): %s", ", ".join(gone))
        return [image_id for image_id in kept if image_id in listed]

    def remove_label(self, label_id: str, label_tag: str) -> None:
        if self.holds_label(label_id, label_tag):
            self._kept.remove(label_id, label_tag)
            return
        super().remove_label(label_id, label_tag)

    def update_label_info(self, label_id: str, label_tag: str, info: Dict[str, Any]) -> None:
        if self.holds_label(label_id, label_tag):
            self._kept.update_info(label_id, label_tag, info)
            return
        super().update_label_info(label_id, label_tag, info)

    def datalist(self, full_path: bool = True) -> List[Dict[str, Any]]:
        """MONAI Label's pairs (SEG-labelled series of the PACS) and each kept correction's: the series' file as
        ``get_image_uri`` gives it (downloaded, bounded, if needed) and the kept label's."""
        pairs = list(super().datalist(full_path))
        paired = {os.path.basename(str(pair.get("image", ""))) for pair in pairs}
        for image_id in self._kept_finals():
            image = self.get_image_uri(image_id)
            if os.path.basename(image) in paired:
                continue
            pairs.append({"image": image, "label": str(self._kept.path(image_id, "final"))})
        return pairs


_classes: Dict[type, type] = {}


def server_kept_labels(datastore, folder: str | os.PathLike):
    """``datastore`` itself; a DICOMweb one gets its class swapped for one with :class:`ServerKeptLabelsMixin` in
    front, its labels kept in ``folder``."""
    from .pacs import is_dicomweb

    if not is_dicomweb(datastore):
        return datastore
    cls = type(datastore)
    if not issubclass(cls, ServerKeptLabelsMixin):
        if cls not in _classes:
            _classes[cls] = type(f"ServerKeptLabels{cls.__name__}", (ServerKeptLabelsMixin, cls), {})
        datastore.__class__ = _classes[cls]
    datastore._kept = KeptLabels(folder)
    return datastore


def _series_folder(datastore, image_id: str) -> Path:
    return Path(datastore._datastore.image_path()) / image_id  # noqa: SLF001 - MONAI Label's own cache layout


def _downloaded_identity(datastore, image_id: str) -> Dict[str, str]:
    """SeriesInstanceUID, StudyInstanceUID and PatientID of the downloaded series ``image_id`` (its first file that
    reads as DICOM; downloading it first if needed)."""
    import pydicom

    datastore.get_image_uri(image_id)  # downloads (bounded) when it is not in the cache
    for path in sorted(_series_folder(datastore, image_id).iterdir()):
        try:
            header = pydicom.dcmread(str(path), stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - not a DICOM file: the next one
            continue
        return {"series_instance_uid": str(header.get("SeriesInstanceUID", "")),
                "study_instance_uid": str(header.get("StudyInstanceUID", "")),
                "patient_id": str(header.get("PatientID", ""))}
    raise FileNotFoundError(f"series {image_id}: no DICOM file in its download")


def correction_binding(datastore, image_id: str) -> Dict[str, Any]:
    """The stamp keys binding a correction to the PACS series ``image_id`` (``{SERIES_IDENTITY_KEY: {...}}``); ``{}``
    for another datastore (a local correction is bound by its image file's SHA-256)."""
    if not isinstance(datastore, ServerKeptLabelsMixin):
        return {}
    return {SERIES_IDENTITY_KEY: _downloaded_identity(datastore, image_id)}


def binding_problem(datastore, image_id: str, info: Dict[str, Any] | None) -> Optional[str]:
    """Why the PACS correction of ``image_id`` (its label ``info``) is not that series' any more (the downloaded
    series has another study or patient, or the stamp names none), None when it is, or for another datastore."""
    if not isinstance(datastore, ServerKeptLabelsMixin):
        return None
    bound = (info or {}).get(SERIES_IDENTITY_KEY)
    if not isinstance(bound, dict):
        return f"the correction of series {image_id} names no series identity (not saved by this server's label route)"
    current = _downloaded_identity(datastore, image_id)
    changed = [key for key in ("series_instance_uid", "study_instance_uid", "patient_id")
               if str(bound.get(key)) != current[key]]
    if changed:
        return (f"the correction of series {image_id} was saved for {', '.join(f'{k} {bound.get(k)!r}' for k in changed)}; "
                f"the PACS's series now has {', '.join(f'{k} {current[k]!r}' for k in changed)}")
    return None
