"""MONAI Label's local datastore, kept in step with its folder at once and by one thread at a time.

MONAI Label's ``LocalDatastore`` (``auto_reload``, the server's default) removes a study's file and leaves the
id to its file watcher: for a moment after ``DELETE /datastore/?id=X`` the id stays listed, so an infer of X
failed with a misleading 422 and a new study uploaded under X got a 409. The watcher reconciles the listing in
its own thread while request threads add and remove studies in the same dictionary; when one changed it during
the watcher's loop, the watcher thread died ("dictionary changed size during iteration") and from then on the
listing never followed the folder again (deleted ids listed for good).

:func:`steady_datastore` swaps a local datastore's class for a subclass that (1) reconciles the listing in the
request that removes a study, before answering; (2) runs every change and reconciliation, and the lookups the
app's routes make (``list_images``, ``get_image_uri``), under one lock; (3) logs and survives a failed watcher
event instead of losing the watcher; (4) saves a label whole or not at all
(:meth:`SteadyLocalDatastoreMixin.save_label`). Other datastores (DICOMweb) are returned unchanged.

:func:`image_modality`: the modality of a datastore image, read from its file once and kept in its info (the
fine-tuning data and the review queue's modality filter both ask for it).
"""
from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any, Dict, List

if TYPE_CHECKING:
    from monailabel.interfaces.datastore import Datastore

__all__ = ["image_modality", "steady_datastore"]

log = logging.getLogger(__name__)


class SteadyLocalDatastoreMixin:
    """Mixed in front of ``LocalDatastore`` by :func:`steady_datastore` (see the module docstring)."""

    _steady_lock: threading.RLock

    def refresh(self) -> None:
        with self._steady_lock:
            super().refresh()

    def _on_any_event(self, event) -> None:
        try:
            with self._steady_lock:
                super()._on_any_event(event)
        except Exception:  # noqa: BLE001 - an exception here would end the watcher thread for good
            log.exception("datastore: reconciling after %s failed; the listing is reconciled again on the next "
                          "change", event)

    def _on_modify_event(self, event) -> None:
        try:
            with self._steady_lock:
                super()._on_modify_event(event)
        except Exception:  # noqa: BLE001 - as above
            log.exception("datastore: reloading after %s failed", event)

    def list_images(self) -> List[str]:
        with self._steady_lock:
            return super().list_images()

    def get_image_uri(self, image_id: str) -> str:
        with self._steady_lock:
            return super().get_image_uri(image_id)

    def add_image(self, image_id: str, image_filename: str, image_info: Dict[str, Any]) -> str:
        with self._steady_lock:
            return super().add_image(image_id, image_filename, image_info)

    def remove_image(self, image_id: str) -> None:
        with self._steady_lock:
            super().remove_image(image_id)
            if getattr(self, "_auto_reload", False):  # the stock code leaves it to the watcher: now, not later
                super().refresh()

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: Dict[str, Any]) -> str:
        """MONAI Label's ``save_label`` but for its copy: it copied the upload onto the label's file in place
        (``shutil.copy``), so a disk that filled during the copy left half a file under the label's name and the
        correction saved before was lost. The file is written beside it and renamed over it
        (:func:`lib.runtime.atomic.atomic_copy`), the label written before kept aside (a hard link: no space taken)
        until the index (``datastore_v2.json``, :meth:`_update_datastore_file`) is written: a save that fails
        (OSError: the copy or the index did not fit) leaves the earlier label, file, info and index, as they were,
        and nothing of the new one."""
        import os
        import time

        from filelock import FileLock
        from monailabel.datastore.local import DataModel

        from .runtime.atomic import atomic_copy

        with self._steady_lock:
            obj = self._datastore.objects.get(image_id)
            if not obj:  # MONAI Label's ImageNotFoundException
                return super().save_label(image_id, label_filename, label_tag, label_info)
            _, label_ext = self._to_id(os.path.basename(label_filename))
            name = self._filename(image_id, label_ext)
            target = os.path.join(self._datastore.label_path(label_tag), name)
            with FileLock(self._lock_file):
                kept = _kept_aside(target)
                try:
                    # staged as .<name>.<random>.tmp<ext>: no image has that id, so the folder's watcher adds no label
                    atomic_copy(label_filename, target)
                    before = obj.labels.get(label_tag)
                    label_info = label_info if label_info else {}
                    label_info["ts"] = int(time.time())
                    label_info["name"] = name
                    obj.labels[label_tag] = DataModel(info=label_info, ext=label_ext)
                    try:
                        self._update_datastore_file(lock=False)
                    except BaseException:  # the index as it was: the label as it was too
                        if before is None:
                            obj.labels.pop(label_tag, None)
                        else:
                            obj.labels[label_tag] = before
                        if kept is not None:
                            os.replace(kept, target)
                            kept = None
                        else:
                            os.unlink(target)
                        raise
                finally:
                    if kept is not None:
                        os.unlink(kept)
            return image_id

    def _update_datastore_file(self, lock: bool = True) -> None:
        """MONAI Label's, but written beside the index and renamed over it (:func:`lib.runtime.atomic.atomic_write`):
        it rewrote ``datastore_v2.json`` in place, so a full disk left it truncated (invalid JSON: MONAI Label then
        rebuilt it from the files, every label's info and review copy lost). It raises (OSError) with the index as
        it was. The rename is a move event for the folders' watchers (:meth:`_on_index_replaced`), not a modification:
        nothing to ignore here."""
        import json
        import os

        from filelock import FileLock

        from .runtime.atomic import atomic_write_text

        def write() -> None:
            atomic_write_text(self._datastore_config_path,
                              json.dumps(self._datastore.model_dump(exclude={"base_path"}), indent=2, default=str))
            self._config_ts = os.stat(self._datastore_config_path).st_mtime

        if lock:
            with FileLock(self._lock_file):
                write()
        else:
            write()

    def _on_index_replaced(self, event) -> None:
        """The folder watcher's move event of an index renamed over ``datastore_v2.json`` (another instance's
        :meth:`_update_datastore_file`: a second server or a process on the same folder): reloaded as MONAI Label
        reloads a modified one (its handler knows no moves: the other instance kept a stale index and overwrote the
        change at its next write); this instance's own write already has its timestamp, nothing is read again."""
        if getattr(event, "dest_path", None) == self._datastore_config_path:
            self._init_from_datastore_file()

    def remove_label(self, label_id: str, label_tag: str) -> None:
        with self._steady_lock:
            super().remove_label(label_id, label_tag)
            if getattr(self, "_auto_reload", False):
                super().refresh()

    def update_image_info(self, image_id: str, info: Dict[str, Any]) -> None:
        with self._steady_lock:
            super().update_image_info(image_id, info)

    def update_label_info(self, label_id: str, label_tag: str, info: Dict[str, Any]) -> None:
        with self._steady_lock:
            super().update_label_info(label_id, label_tag, info)


def _kept_aside(path: str) -> str | None:
    """A second name for the file ``path`` (a hard link beside it, ``.<name>.<random>.kept``: no image has that
    id, so the folder's watcher adds no label; a copy where links cannot be made), None when there is no file."""
    import os
    import secrets
    import shutil

    if not os.path.exists(path):
        return None
    folder, name = os.path.split(path)
    aside = os.path.join(folder, f".{name}.{secrets.token_hex(4)}.kept")
    try:
        os.link(path, aside)
    except OSError:  # a file system without hard links: a copy (on a full disk, the save fails here, nothing changed)
        try:
            shutil.copy2(path, aside)
        except BaseException:
            if os.path.exists(aside):
                os.unlink(aside)
            raise
    return aside


_classes: Dict[type, type] = {}


def steady_datastore(datastore):
    """``datastore`` itself; a ``LocalDatastore`` (exactly: not DICOMweb, which lists the PACS's series) gets its
    class swapped for one with :class:`SteadyLocalDatastoreMixin` in front."""
    from monailabel.datastore.local import LocalDatastore

    cls = type(datastore)
    if cls is LocalDatastore:
        if cls not in _classes:
            _classes[cls] = type(f"Steady{cls.__name__}", (SteadyLocalDatastoreMixin, cls), {})
        datastore._steady_lock = threading.RLock()
        datastore.__class__ = _classes[cls]
        handler = getattr(datastore, "_handler", None)
        if handler is not None:  # the watcher holds the methods bound before the swap
            handler.on_created = handler.on_deleted = datastore._on_any_event
            handler.on_modified = datastore._on_modify_event
            handler.on_moved = datastore._on_index_replaced
    return datastore


def image_modality(datastore: Datastore, image_id: str, path: str | None = None,
                   max_voxels: int | None = None) -> str:
    """CT / MR (``OT`` for a DICOM image of another modality) of the datastore image ``image_id``: its info's
    ``modality`` when CT or MR, else read from its file (``path``, default the image's URI;
    :func:`lib.imaging.read_volume`: the DICOM Modality, else guessed from the values) and kept in the info as
    ``modality``. An image over ``max_voxels`` (None: :func:`lib.imaging.max_voxels`) has its modality read from
    its headers alone (:func:`lib.imaging.io.header_modality`: a DICOM image's Modality), its voxels never loaded.
    The write is a datastore info update like any other (on the server an audited one: the value
    decides which model a study's corrections fine-tune and which review requests get the study); a datastore that
    cannot keep it (DICOMweb, an audit log that refuses entries) does not, and the file is read again next time.

    Raises:
        lib.imaging.ImageReadError: the file cannot be read as an image (missing, corrupt);
            :class:`lib.imaging.errors.ImageTooLargeError` when it is over the voxel limit and its headers do not
            name its modality (NIfTI, NRRD, MetaImage: the values decide it).
    """
    from .imaging import read_volume
    from .imaging.errors import ImageTooLargeError
    from .imaging.io import header_modality

    info = datastore.get_image_info(image_id) or {}
    if info.get("modality") in ("CT", "MR"):
        return str(info["modality"])
    path = path or datastore.get_image_uri(image_id)
    try:
        modality = read_volume(path, max_voxels=max_voxels).modality
    except ImageTooLargeError:
        modality = header_modality(path)
        if modality is None:
            raise
    try:
        datastore.update_image_info(image_id, {"modality": modality})
    except Exception:  # noqa: BLE001 - a datastore that cannot keep it (see above): read again next time
        log.debug("modality %s of %s not kept in its info", modality, image_id, exc_info=True)
    return modality
