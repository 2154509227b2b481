"""The batch manifest: what was done to which series, so that a rerun skips it.

Layout under the output root: ``_denoise_batch/rank-<rank>.jsonl``, one file per rank, each appended to by that
rank alone, and ``_denoise_batch/manifest.jsonl``, the merge (the latest record of every job and series), written
atomically (temporary file + rename) by rank 0 at the end of a run.

Each rank holds an exclusive ``flock`` on ``_denoise_batch/lock-rank-<rank>`` while it runs: a second run on the
same output (every job has a rank 0) is refused at once, naming the process that holds it, instead of denoising
every series again and recording each as failed over the first run's results. (A file system without locks, e.g.
an NFS mount with ``nolock``: the run goes on unlocked, with a warning.)

Why one file per rank rather than one file with ``fcntl`` locks: a rank's appends then need no lock at all
(one writer per file), which holds on every shared file system a multi-machine job may write to (``fcntl``
locks are unreliable or slow on some NFS and Lustre set-ups). Each record is one ``write`` of a whole line,
flushed and fsync'ed; a process killed mid-write leaves at most a cut last line, which readers skip and the
next append starts after (a newline is written first).

Record (one JSON object per line): ``job`` (identity + model asked for + weights asked for), ``identity``
(``dicom:<SeriesInstanceUID>``, or ``sha256:<hex>`` of the file(s) when there is no UID), ``key`` (the series in
the input, see :class:`~lib.batch.discovery.SeriesItem`), ``input``, ``output``, ``model`` (the model run),
``model_requested``, ``weights_version``, ``weights_sha256``, ``low_frequency_restoration`` (pixels),
``modality``, ``status`` ("started", "done" or "failed"), ``seconds``, ``error``, ``rank``, ``world``, ``host``,
``time`` (Unix seconds), on a done record ``output_files``, ``output_bytes``, ``output_sha256`` and ``output_stat``
(the output's stat key, :func:`lib.batch.runner._stat_key`) and, for a file or DICOM folder input, ``input_sha256``
and ``input_stat`` (a MetaImage or detached NRRD header with its data files), for a DICOMweb series (on each of its
records) ``input_instances_sha256`` and, where the server returns them, ``input_created_sha256`` and
``input_patient_sha256`` (its SOP Instance UIDs, their InstanceCreationDate/Time, the PatientID / PatientName /
PatientBirthDate its instances are filed under, listed before the download: :func:`lib.batch.dicomweb.series_identity`;
``input_instances_adopted`` when a rerun recorded them for an older record), with ``redone`` (why an earlier output
was not kept) where it applies, ``superseded_derived_series`` on a redone one whose earlier derived series the server
still lists (its UIDs, why, ``other_patient``, ``instances_on_server``: for the PACS administrator to remove,
:meth:`lib.batch.runner._Rank._superseded`) and, on every record of a series from then on, ``superseded_on_server``
(every derived series its redos superseded, each such entry with ``first_reported`` and, once a rerun found it removed,
``gone``, Unix seconds; records before it: read back from their ``superseded_derived_series``), plus e.g. ``stored`` (STOW-RS) and ``stage`` ("store" on a failed record:
the series was denoised and written, the server did not store it all; a rerun sends the same files again, same UIDs, so
that the server completes that derived series), and for a DICOMweb series ``derived_study_uid``, ``derived_series_uid``,
``derived_instances`` (the derived series written; recorded before its STOW-RS, so that a rerun after a run killed
between the store and its "done" record asks the server for that series rather than storing a second one) and
``found_on_server`` (the rerun found it whole there and stored nothing). A done job is skipped by a rerun unless the
weights it would run now (same name, other contents) or the default restoration width differ from the record's.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Iterable

from ..runtime.atomic import atomic_write_text
from .discovery import MANIFEST_DIR

__all__ = ["MERGED_NAME", "Manifest", "OutputInUse", "job_key", "latest_by_job", "read_records"]

MERGED_NAME = "manifest.jsonl"

log = logging.getLogger(__name__)


class OutputInUse(RuntimeError):
    """Another batch run holds this rank's lock on the output folder (``holder``: what its lock file says, which
    differs from rank to rank; ``general``: the message without it, alike on every rank of a job)."""

    def __init__(self, folder: Path, holder: str) -> None:
        self.folder, self.holder = folder, holder
        self.general = (f"another denoise-batch run is writing to {folder}: wait for it to end, or choose another "
                        "--output")
        super().__init__(f"another denoise-batch run ({holder}) is writing to {folder}: wait for it to end, or "
                         "choose another --output")


def job_key(identity: str, model_requested: str, weights_requested: str | None) -> str:
    """What makes two runs the same job: the same series content, model and weight file asked for."""
    return f"{identity}|{model_requested}|{weights_requested or ''}"


def read_records(folder: Path) -> list[dict]:
    """Every readable record of the per-rank files in ``folder``, oldest first (cut or corrupt lines skipped)."""
    records = []
    for path in sorted(folder.glob("rank-*.jsonl")):
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        for line in text.splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a killed process
            if isinstance(record, dict) and "job" in record and "status" in record:
                records.append(record)
    records.sort(key=lambda r: float(r.get("time", 0.0)))
    return records


def latest_by_job(records: Iterable[dict]) -> dict[str, dict]:
    """The last record of each job (records oldest first)."""
    latest: dict[str, dict] = {}
    for record in records:
        latest[record["job"]] = record
    return latest


class Manifest:
    """This rank's manifest file under ``out_root`` and the records of every rank."""

    def __init__(self, out_root: str | os.PathLike, rank: int = 0, world: int = 1) -> None:
        self.folder = Path(out_root).expanduser() / MANIFEST_DIR
        self.rank, self.world = rank, world
        self.path = self.folder / f"rank-{rank:05d}.jsonl"
        self.host = socket.gethostname()
        self._checked_end = False
        self._lock_fd: int | None = None

    def lock(self) -> None:
        """Take this rank's lock on the output folder for the life of the process (released when it ends, killed
        too); the lock file names the holder.

        Raises:
            OutputInUse: another run holds it.
        """
        if self._lock_fd is not None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"lock-rank-{self.rank:05d}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "another process"
                os.close(fd)
                raise OutputInUse(self.folder.parent, holder) from None
            log.warning("cannot lock %s (%s): make sure no other run writes to this output folder", path,
                        error.strerror)
            os.close(fd)
            return
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {self.host}, rank {self.rank} of {self.world}, since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        self._lock_fd = fd  # kept open (and locked) until the process ends

    def append(self, record: dict) -> dict:
        """Append ``record`` (with rank, world, host and time added) as one line; returns the full record.

        Raises:
            OSError: it could not be written whole and flushed (disk full, file size limit, I/O error): nothing of it
                is kept in the file.
        """
        full = {**record, "rank": self.rank, "world": self.world, "host": self.host, "time": time.time()}
        line = json.dumps(full, default=str) + "\n"
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)  # read: the last byte
        try:
            size = os.fstat(fd).st_size
            if not self._checked_end:  # a previous run killed mid-line: start on a line of our own
                self._checked_end = True
                if size and os.pread(fd, 1, size - 1) != b"\n":
                    line = "\n" + line
            try:
                data = memoryview(line.encode("utf-8"))
                while data:  # a short write (disk or file size limit reached) is no record: the rest, or its error
                    data = data[os.write(fd, data):]
                os.fsync(fd)
            except OSError:
                # not recorded: the part written is cut off (one writer per file), else the next record starts on a
                # line of its own rather than after the cut one (a line both would lose)
                self._checked_end = False
                try:
                    os.ftruncate(fd, size)
                except OSError:
                    pass
                raise
        finally:
            os.close(fd)
        return full

    def records(self) -> list[dict]:
        """Every rank's records, oldest first."""
        return read_records(self.folder)

    def merge(self) -> Path:
        """Write ``manifest.jsonl`` (the latest record of every job and series: one series found in two folders is
        two lines under one job) atomically; returns its path."""
        latest: dict[tuple[str, str], dict] = {}
        for record in self.records():
            latest[(record["job"], record["key"])] = record
        text = "".join(json.dumps(r, default=str) + "\n" for r in sorted(latest.values(), key=lambda r: r["key"]))
        return atomic_write_text(self.folder / MERGED_NAME, text)
