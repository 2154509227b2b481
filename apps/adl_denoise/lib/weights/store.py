"""Versioned weight files: what a model serves, what it served before, atomic publishing and rollback.

Layout under a model folder (``apps/adl_denoise/model`` or ``ADL_MODEL_DIR``)::

    pretrained_<model>_<modality>.pt      shipped with the repository (never modified here)
    <model>_<modality>.pt                 published by fine-tuning; served when present
    versions/<model>_<modality>/<id>.pt   every file ever published, kept for rollback
    versions/<model>_<modality>/history.jsonl   one line per event (publishing, published, rejected, restoring,
                                                restored, publish_failed, restore_failed)

A version id is ``<UTC time>-<first 8 hex of the file's SHA-256>``; the shipped file's id is ``pretrained``.
Publishing writes the new file next to the served one and renames it over it (``os.replace``), so a reader
sees the old file or the new one, never a partial one; a process killed half way leaves the served file as
it was. Each change of the served file is recorded before it (``publishing`` / ``restoring``) and confirmed after
it (``published`` / ``restored``): a ``published`` event always names weights that were served. Servers pick a new file up by its modification time (hot reload).

Changes of what is served (publish, restore, and a fine-tune's check that the weights it started from are still
served followed by its publication: :meth:`ModelStore.changing`) hold an exclusive lock on
``versions/.lock`` (``fcntl``): the server (rollback) and MONAI Label's training subprocess (publication) are two
processes, each with its own store.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..runtime.atomic import atomic_copy
from ..runtime.clock import utc_compact_stamp
from ..runtime.hashing import file_sha256 as sha256_of_file
from .lookup import find_weights

__all__ = ["ModelStore", "WeightsVersion", "file_sha256"]

PRETRAINED_VERSION = "pretrained"

log = logging.getLogger(__name__)

_hash_cache: dict[tuple[str, int, int], str] = {}
_hash_lock = threading.Lock()


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file, cached by (path, size, mtime) so that servers can ask on every request."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    with _hash_lock:
        if key in _hash_cache:
            return _hash_cache[key]
    value = sha256_of_file(p)
    with _hash_lock:
        _hash_cache[key] = value
    return value


@dataclass(frozen=True)
class WeightsVersion:
    """The weights a model serves for one modality: ``version`` id, ``path``, ``sha256``."""

    model: str
    modality: str
    version: str
    path: Path
    sha256: str

    def to_dict(self) -> dict:
        return {"model": self.model, "modality": self.modality, "version": self.version, "path": str(self.path),
                "sha256": self.sha256}


class ModelStore:
    """Published and previous weight files of the models in ``model_dir`` (see the module docstring)."""

    def __init__(self, model_dir: str | os.PathLike) -> None:
        self.model_dir = Path(model_dir).expanduser()
        self._lock = threading.RLock()
        self._changing = False  # this store holds versions/.lock (read and set under _lock, by its holder)

    # --- paths
    def published_path(self, model: str, modality: str) -> Path:
        return self.model_dir / f"{model}_{modality.lower()}.pt"

    def pretrained_path(self, model: str, modality: str) -> Path:
        return self.model_dir / f"pretrained_{model}_{modality.lower()}.pt"

    def versions_dir(self, model: str, modality: str) -> Path:
        return self.model_dir / "versions" / f"{model}_{modality.lower()}"

    # --- queries
    def served(self, model: str, modality: str) -> WeightsVersion | None:
        """The weights served now (published beats pretrained), or None when there are none."""
        path = find_weights(model, modality, self.model_dir)
        if path is None:
            return None
        sha = file_sha256(path)
        if path == self.pretrained_path(model, modality):
            version = PRETRAINED_VERSION
        else:
            version = self._version_of(model, modality, sha) or f"unversioned-{sha[:8]}"
        return WeightsVersion(model, modality.upper(), version, path, sha)

    def _version_of(self, model: str, modality: str, sha: str) -> str | None:
        for entry in reversed(self.history(model, modality)):
            if entry.get("sha256") == sha and entry.get("version"):
                return str(entry["version"])
        return None

    def versions(self, model: str, modality: str) -> list[dict]:
        """Every version that can be restored, oldest first (``pretrained`` first when shipped)."""
        out = []
        pretrained = self.pretrained_path(model, modality)
        if pretrained.is_file():
            out.append({"version": PRETRAINED_VERSION, "path": str(pretrained), "sha256": file_sha256(pretrained)})
        folder = self.versions_dir(model, modality)
        if folder.is_dir():
            for path in sorted(folder.glob("*.pt")):
                if path.name.startswith("."):  # an atomic write's temporary file, not a version
                    continue
                out.append({"version": path.stem, "path": str(path), "sha256": file_sha256(path)})
        served = self.served(model, modality)
        for entry in out:
            entry["served"] = served is not None and entry["sha256"] == served.sha256
        return out

    def history(self, model: str, modality: str) -> list[dict]:
        path = self.versions_dir(model, modality) / "history.jsonl"
        if not path.is_file():
            return []
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]

    def record(self, model: str, modality: str, event: str, **details) -> dict:
        """Append an event (e.g. ``rejected`` with the validation scores) to the model's history."""
        entry = {"time_utc": utc_compact_stamp(microseconds=True), "event": event, "model": model,
                 "modality": modality.upper(), **details}
        folder = self.versions_dir(model, modality)
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "history.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(entry, default=str) + "\n")
        return entry

    # --- changes
    @contextmanager
    def changing(self) -> Iterator[None]:
        """Hold the store's lock: no publication or restore, in this process or another one on the same folder,
        changes what is served until the block ends. Re-entrant in one thread (:meth:`publish` inside it)."""
        with self._lock:
            if self._changing:
                yield
                return
            folder = self.model_dir / "versions"
            folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                self._changing = True
                try:
                    yield
                finally:
                    self._changing = False
            finally:
                os.close(fd)  # releases the flock

    def publish(self, candidate: str | os.PathLike, model: str, modality: str, **details) -> WeightsVersion:
        """Serve ``candidate`` from now on: keep a copy under ``versions/`` and replace the served file
        atomically. The caller decides whether the candidate deserves it (see ``lib.engines.gated_fine_tuning``)."""
        source = Path(candidate)
        with self.changing():
            sha = file_sha256(source)
            version = f"{utc_compact_stamp(microseconds=True)}-{sha[:8]}"
            folder = self.versions_dir(model, modality)
            folder.mkdir(parents=True, exist_ok=True)
            kept = folder / f"{version}.pt"
            atomic_copy(source, kept)
            self._recorded_change(model, modality, "publish", version, sha,
                                  lambda: atomic_copy(source, self.published_path(model, modality)), **details)
        return WeightsVersion(model, modality.upper(), version, self.published_path(model, modality), sha)

    def _recorded_change(self, model: str, modality: str, change: str, version: str, sha: str, action,
                         **details) -> None:
        """Change the served file (``action``) of a ``change`` (``publish`` or ``restore``) between two records:
        ``publishing`` / ``restoring`` BEFORE it (a record that cannot be written, e.g. the app's audit log,
        leaves the served file as it was), ``published`` / ``restored`` once it is done. A process killed in
        between leaves the pending event alone, never a ``published`` for weights that are not served (the pending
        event names the version and SHA-256, so a file served by a change cut short after the rename is still
        known by its version). An action that fails is recorded as ``publish_failed`` / ``restore_failed`` and
        raises; a confirmation that cannot be written after the change is logged (the pending event stands)."""
        pending, done = {"publish": ("publishing", "published"), "restore": ("restoring", "restored")}[change]
        self.record(model, modality, pending, version=version, sha256=sha, **details)
        try:
            action()
        except Exception as error:
            self.record(model, modality, f"{change}_failed", version=version,
                        error=f"{type(error).__name__}: {error}")
            raise
        try:
            self.record(model, modality, done, version=version, sha256=sha, **details)
        except Exception as error:  # noqa: BLE001 - done: the served file changed, its pending record names it
            log.error("%s %s version %s is served, but the record confirming it (%s) could not be written: %s; "
                      "its '%s' record names it", model, modality.upper(), version, done, error, pending)

    def restore(self, model: str, modality: str, version: str) -> WeightsVersion | None:
        """Serve an earlier version again (``pretrained``: remove the published file so the shipped one
        serves). Returns what is served afterwards. KeyError for an unknown version."""
        with self.changing():
            published = self.published_path(model, modality)
            if version == PRETRAINED_VERSION:
                if not self.pretrained_path(model, modality).is_file():
                    raise KeyError(f"{model} has no shipped {modality.upper()} weights to restore")
                self._recorded_change(model, modality, "restore", version,
                                      file_sha256(self.pretrained_path(model, modality)),
                                      lambda: published.unlink(missing_ok=True))
            else:
                kept = self.versions_dir(model, modality) / f"{version}.pt"
                if not kept.is_file() or "/" in version or "\\" in version:
                    known = ", ".join(v["version"] for v in self.versions(model, modality)) or "none"
                    raise KeyError(f"{model} has no {modality.upper()} version {version!r} (known: {known})")
                self._recorded_change(model, modality, "restore", version, file_sha256(kept),
                                      lambda: atomic_copy(kept, published))
        return self.served(model, modality)

