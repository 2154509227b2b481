"""One rank's batch loop, and the job around it (process group, plan check, merged summary).

Per rank: find every series (the same list on every rank), keep this rank's share (:mod:`.sharding`), and for
each series in turn: its identity, skip it when the manifest says it is done and its output exists (or, with
``--store-to-pacs``, the server still holds the derived series stored), resume it when an earlier run wrote (and
perhaps sent) its derived series (:meth:`_Rank._resume`: nothing denoised again, nothing stored twice), else read
it, denoise it (:func:`lib.model_dispatch.denoise_volume`), write it with the app's writers (a temporary file or
folder next to the output, flushed to the disk and renamed into place: a killed run or a power cut leaves no
half-written output under the final name) and record the outcome with the output's sizes and SHA-256, and the
SHA-256 of the input it came from. An output of this batch found empty, of other sizes than recorded (a write cut
short before these flushes) or of other contents (overwritten, a slice replaced, another result copied over it) is
set aside and done again as a missing one; a DICOM series whose files changed under the same UID and slices is
denoised again (a file input is its contents, a MetaImage or detached NRRD header with its data files: another content
is another job), and so is a DICOMweb series whose instances the server replaced or stored again under the same count
(its SOP Instance UIDs and creation dates and times, :func:`.dicomweb.series_identity`, asked once per series and run);
the record of the redone series says why (``redone``) and names an earlier derived series of it that the server still
lists (``superseded_derived_series``, :meth:`_Rank._superseded`: reported at the end, never deleted). Every later
run asks the server again for each superseded derived series its records name (``superseded_on_server``, a chain of
redos whole: one QIDO-RS search per such series and run, none for one found gone, none once any request of the
run found the server unreachable), and reports it "still there" until the server lists it no more
(:meth:`_Rank._recheck_superseded`).
A file is read for these checks only when its stat key (path, size, modification and change times, inode) differs
from the recorded one, so that a rerun of an untouched archive reads none of it (and hashes no input file either,
which it did before; the header of a NRRD or MetaImage input is read to find its data files); one found unchanged
gets its new key recorded. Any error of one series is
recorded as failed with its message and the loop goes on, except that a rank stops after :data:`UNREACHABLE_LIMIT`
series in a row failed for want of the DICOMweb server (the rest are "not tried": a rerun does them). One series is
in memory at a time.

Under ``torchrun`` (``WORLD_SIZE > 1``) the process group is the training engine's
(:func:`lib.engines.engine.setup_distributed`: Gloo on CPU, NCCL with one GPU per ``LOCAL_RANK``), and the only
collectives are all-gathers after planning (:func:`_start_together`: whether each rank could plan, lock its manifest
and write its plan file, its series list's digest and the nonce in that file; then whether each rank reads every
rank's plan file of this job in the output folder, which must be shared: when a rank could not start, two ranks
planned different series lists or the folder is not shared, every rank says so (rank 0 naming the ranks that could
not start) and stops before any work, at once, with the same error), and a gather at the end:
every rank sends rank 0 its summary, or the error that stopped it after planning, and whether its summary file was
written; rank 0 merges the manifests (also when rank 0 itself failed: what every rank recorded) and says every
rank's failed series, superseded derived series and left outputs, and each rank that failed or could not write its
summary file (the run then exits non-zero). A rank that raises still reaches the collective at once, so no rank
waits for it; a rank process that dies is noticed by its peers when its connection closes (Gloo) or when torchrun
stops the others on its machine, else after :data:`BATCH_TIMEOUT`, how long the collectives wait: ranks finish at
different times (a resumed run may leave one rank with nothing to do).
"""
from __future__ import annotations

import datetime as _dt
import errno
import gc
import hashlib
import json
import logging
import os
import shutil
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

from ..model_dispatch import (DENOISE_LEARNED_MODELS, DenoiseOptions, DenoiseRefused, ModelCache, denoise_volume,
                              weights_for)
from ..imaging import denoising_derivation, read_volume, write_dicom_derived_series, write_volume
from ..imaging.errors import one_line
from ..imaging.guards import image_files
from ..pacs import pacs_read_timeout_s
from ..runtime.atomic import atomic_write_text
from ..runtime.hashing import file_sha256
from . import dicomweb
from .discovery import SeriesFilter, SeriesItem, discover_tree
from .manifest import Manifest, OutputInUse, job_key, latest_by_job
from .sharding import shard_items

__all__ = ["BATCH_TIMEOUT", "BatchSettings", "BatchSummary", "JobNotStarted", "plan_series", "run_batch", "run_rank"]

log = logging.getLogger(__name__)

#: how long a rank waits at a barrier for the others (a whole archive can take days)
BATCH_TIMEOUT = _dt.timedelta(days=7)
#: series in a row that failed because the DICOMweb server could not be reached, after which a rank stops: each
#: costs the client's retries (about 30 s), so a server that is down would otherwise take hours per thousand series
UNREACHABLE_LIMIT = 3


@dataclass
class BatchSettings:
    """A batch: ``source`` (folder or DICOMweb service root URL), ``output`` root, denoising ``options``
    (``options.model`` is the model asked for, e.g. "auto"), ``device`` ("auto", "cpu", "cuda"),
    ``series_filter``, ``store_to_pacs`` (STOW-RS the derived series back; DICOMweb source only), ``progress``
    (one bar per rank, on a terminal only), ``file_modality`` ("CT" or "MR" for NIfTI/NRRD/MHA files, which carry
    no modality tag; None guesses it from the values as ``denoise`` does)."""

    source: str
    output: Path
    options: DenoiseOptions
    device: str = "auto"
    series_filter: SeriesFilter = field(default_factory=SeriesFilter)
    store_to_pacs: bool = False
    progress: bool = True
    file_modality: str | None = None


@dataclass
class BatchSummary:
    """Counts of a rank (or, on rank 0 after the end, of the whole job) and its wall time in seconds."""

    done: int = 0
    skipped: int = 0
    failed: int = 0
    seconds: float = 0.0
    ranks: int = 1
    #: series not tried: the rank stopped because the DICOMweb server could not be reached (a rerun tries them)
    untried: int = 0
    #: why this rank stopped before its last series ("" when it did not)
    stopped: str = ""
    #: (series key, error) of this rank's failed series (every rank's, in rank order, once merged)
    failures: list = field(default_factory=list, repr=False)
    #: (series key, :meth:`_Rank._superseded` entry) of derived series on the server that this rank's redone series
    #: superseded (merged likewise): the PACS administrator removes them
    superseded: list = field(default_factory=list, repr=False)
    #: (series key, sentence) of local outputs an earlier run wrote of this rank's DICOMweb series under the study it
    #: was listed in then (:meth:`_Rank._left_outputs`; merged likewise): the user removes them
    left_outputs: list = field(default_factory=list, repr=False)
    #: (rank, kind, sentence) of the ranks whose summary rank 0 lacks (kind "failed": the rank raised) or got only
    #: over the process group (kind "summary file": its file was not written) (merged summary only): the run failed
    #: even when no series did
    incomplete: list = field(default_factory=list, repr=False)

    @property
    def total(self) -> int:
        return self.done + self.skipped + self.failed + self.untried

    @property
    def series_per_hour(self) -> float:
        """Series denoised (not skipped) per hour of wall time."""
        return 3600.0 * self.done / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        untried = f", {self.untried} not tried (server unreachable: rerun)" if self.untried else ""
        return (f"{self.total} series: {self.done} done, {self.skipped} skipped, {self.failed} failed{untried} in "
                f"{self.seconds:.1f} s ({self.series_per_hour:.1f} series/hour, {self.ranks} process"
                f"{'es' if self.ranks > 1 else ''})")


# ------------------------------------------------------------------------------------------------ planning
def plan_series(settings: BatchSettings, client=None) -> list[SeriesItem]:
    """Every series of the source with its output (the same list on every rank)."""
    if dicomweb.is_dicomweb_url(settings.source):
        return dicomweb.discover_dicomweb(client, Path(settings.output), settings.series_filter)
    if settings.store_to_pacs:
        raise ValueError("--store-to-pacs sends the results back to the DICOMweb server they came from: it needs a "
                         "DICOMweb --input URL")
    return discover_tree(settings.source, settings.output, settings.series_filter)


def _plan_digest(items: list[SeriesItem]) -> str:
    text = "\n".join(f"{i.key}\t{i.output}\t{i.voxels}" for i in items)
    return hashlib.sha256(text.encode()).hexdigest()


def _stat_key(files: list[Path]) -> str:
    """A digest of the files' paths, sizes, modification and change times and inodes: equal while no one wrote,
    replaced or moved any of them (a file's change time cannot be set back), and cheap (no byte read). A rerun
    compares it with the recorded one and reads a file again only when it differs."""
    digest = hashlib.sha256()
    for path in files:
        info = os.stat(path)
        digest.update(f"{path}\t{info.st_size}\t{info.st_mtime_ns}\t{info.st_ctime_ns}\t{info.st_ino}\n".encode())
    return digest.hexdigest()


def _input_sha256(item: SeriesItem) -> str:
    """The SHA-256 of the file; of the series' files, in name order, when it is a DICOM series; of a header and its
    data file(s) (:func:`_files_sha256`) when the voxels are in other files (a MetaImage ``.mhd``, a NRRD ``.nhdr``):
    a header alone left a changed ``.raw`` taken for the input denoised."""
    if item.kind == "dicom":
        digest = hashlib.sha256()
        for path in sorted(item.files):
            digest.update(file_sha256(path).encode())
        return digest.hexdigest()
    files = image_files(item.source)
    return file_sha256(item.source) if len(files) == 1 else _files_sha256(files)


def _input_gone(error: OSError) -> bool:
    """Whether ``error`` says an input is no longer there (no such file or folder), not that it could not be read
    now (EIO, EACCES, ESTALE, a dropped network share, a link loop): only the former is evidence that an output
    made from it no longer belongs to the name."""
    return isinstance(error, FileNotFoundError) or error.errno in (errno.ENOENT, errno.ENOTDIR)


def _input_files(item: SeriesItem) -> list[Path]:
    """The files an input is read from: a DICOM series' files, an image file with its data file(s)."""
    return [Path(p) for p in sorted(item.files)] if item.kind == "dicom" else image_files(item.source)


# ------------------------------------------------------------------------------------------------ one rank
def _remove_stale_temporaries(output: Path) -> None:
    """Temporary files and folders of a write of ``output`` cut short by a killed run (the writers use
    ``.<name>.tmp-*`` and ``.<name>.old-*`` next to the output)."""
    if not output.parent.is_dir():
        return
    for pattern in (f".{output.name}.tmp-*", f".{output.name}.old-*"):
        for stale in output.parent.glob(pattern):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)


def _output_files(output: Path) -> list[Path]:
    """The files of an output: the file itself (a MetaImage header with its data file), or a derived series
    folder's files."""
    if output.is_dir():
        return sorted(p for p in output.iterdir() if p.is_file())
    # this app writes a detached data file for .mhd only (its ElementDataFile line names it)
    return image_files(output) if output.name.lower().endswith(".mhd") else [output]


def _files_sha256(files: list[Path]) -> str:
    """The SHA-256 of the names and SHA-256 of each file (an output's files: a series folder, a MetaImage header
    and its data file; an input header and its data files)."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.name}\t{file_sha256(path)}\n".encode())
    return digest.hexdigest()


def _output_size(output: Path) -> dict:
    """``{"output_files", "output_bytes", "output_sha256", "output_stat"}`` of an output just written, for a rerun
    to check it against (:func:`_output_damage`, :meth:`_Rank._output_changed`): the stat key first, so that a write
    during the hashing shows as a change."""
    files = _output_files(output)
    stat = _stat_key(files)
    return {"output_files": len(files), "output_bytes": sum(p.stat().st_size for p in files),
            "output_sha256": _files_sha256(files), "output_stat": stat}


def _output_damage(record: dict, output: Path) -> str:
    """Why the existing output of a series is not whole ("" when it looks so): an empty file (a write that a power
    cut or a full disk cut short: the name reached the disk, the data did not), no file in a series folder, or
    other sizes than the run that wrote it recorded (``record``'s ``output_files`` / ``output_bytes``; runs
    before they were recorded are checked for empty files only)."""
    try:
        files = _output_files(output)
        sizes = [p.stat().st_size for p in files]
    except OSError as error:
        return f"{output} cannot be read ({one_line(error)})"
    if not files:
        return f"{output} holds no file"
    empty = [p.name for p, size in zip(files, sizes) if size == 0]
    if empty:
        return f"{output} holds an empty file ({empty[0]}): its write was cut short"
    if record.get("output_bytes") is not None and record.get("output") == str(output.resolve()) and \
            (len(files), sum(sizes)) != (record.get("output_files"), record["output_bytes"]):
        return (f"{output} holds {len(files)} file(s) of {sum(sizes)} bytes, not the {record.get('output_files')} "
                f"of {record['output_bytes']} bytes written: cut short or changed since")
    return ""


def _set_aside(output: Path) -> None:
    """Move a damaged output of this batch out of the way (``.<name>.old-*``, removed before the series is written
    again, :func:`_remove_stale_temporaries`): it is then redone as a missing output is, and nothing of it is sent
    to a server or kept beside the new one. A MetaImage header's data file (written beside it) goes with it: left
    there, it refused every rewrite ("already exists")."""
    aside = output.parent / f".{output.name}.old-{uuid.uuid4().hex[:12]}"
    data: list[Path] = []
    if output.is_file() and output.name.lower().endswith(".mhd"):
        try:
            data = [p for p in _output_files(output)[1:] if p.parent == output.parent and p.exists()]
        except Exception:  # noqa: BLE001 - a header that cannot be read: it alone is moved
            data = []
    os.replace(output, aside)
    for path in data:
        os.replace(path, output.parent / f"{aside.name}.{path.name}")


def _unreachable(error: BaseException) -> bool:
    """Whether ``error`` (or an error it was raised from) is a failure to reach the server (connection refused,
    reset, DNS, timed out, no answer in time...), not an answer: then the next series would fail the same way."""
    from requests.exceptions import ConnectionError as RequestsConnectionError, Timeout

    return _caused_by(error, (RequestsConnectionError, Timeout, ConnectionError, TimeoutError))


def _caused_by(error: BaseException | None, kinds) -> bool:
    """Whether ``error``, or an error it was raised from, is one of ``kinds``."""
    seen = 0
    while error is not None and seen < 10:
        if isinstance(error, kinds):
            return True
        error, seen = error.__cause__ or error.__context__, seen + 1
    return False


#: what a run does of the superseded derived series once the server was found unreachable
#: (:meth:`_Rank._instances_on_server`)
_NOT_ASKED = ("superseded derived series recorded are not asked in this run, each reported as one the server may "
              "still hold (PACS unreachable)")


def superseded_sentence(key: str, entry: dict) -> str:
    """What the run says of the derived series ``entry`` (:meth:`_Rank._superseded`) that series ``key``'s redo
    superseded on the server: the same sentence in the warning when it is found and in the end-of-run report. An
    entry a later run found there again (``still``, :meth:`_Rank._recheck_superseded`) says so, with the time it was
    first reported (``first_reported``, Unix seconds); one not asked for want of the server (``pacs_unreachable``)
    says that."""
    held = "may still hold" if entry["instances_on_server"] is None else "still holds"
    if entry["instances_on_server"] is None and entry.get("pacs_unreachable"):
        held += " (PACS unreachable)"
    since = ""
    if entry.get("still") and entry.get("first_reported"):
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(entry["first_reported"])))
        since = f"; {'still there, ' if entry['instances_on_server'] is not None else ''}first reported at {when}"
    return (f"{key}: the server {held} the derived series {entry['series_instance_uid']} (study "
            f"{entry['study_instance_uid']}) that an earlier run stored, superseded: {entry['why']}{since}; the PACS "
            "administrator must remove it (DICOMweb cannot delete; nothing was deleted)")


def _superseded_ledgers(records: list[dict]) -> dict[str, dict[str, dict]]:
    """Per job, every derived series that a redo of it superseded on the server (its UID -> the entry of
    :meth:`_Rank._superseded` with ``first_reported``, and ``gone``, Unix seconds, once a run found it removed),
    read from all ``records`` (oldest first): a record's ``superseded_on_server`` (the list a run keeps) and its
    ``superseded_derived_series`` (the one its redo superseded: all that records before the list name, so that a
    chain of redos is read back whole). The latest record naming a series gives its state; ``first_reported`` is
    the earliest."""
    ledgers: dict[str, dict[str, dict]] = {}
    for record in records:
        single = record.get("superseded_derived_series")
        listed = record.get("superseded_on_server")
        entries = ([single] if isinstance(single, dict) else []) + (listed if isinstance(listed, list) else [])
        for entry in entries:
            uid = entry.get("series_instance_uid") if isinstance(entry, dict) else None
            if not uid:
                continue
            ledger = ledgers.setdefault(record["job"], {})
            known = ledger.get(uid, {})
            first = [t for t in (known.get("first_reported"), entry.get("first_reported"), record.get("time"))
                     if isinstance(t, (int, float))]
            state = {**entry} if entry is not single or not known else {**known}  # a copied dict keeps the list's
            state.pop("still", None)
            if first:
                state["first_reported"] = min(first)
            ledger[uid] = state
    return ledgers


def _uid_identity(series_uid: str) -> str:
    """The identity of a series that has a SeriesInstanceUID (the jobs of :func:`job_key` are keyed by it)."""
    return f"dicom:{series_uid}"


class _StoreUnrecorded(Exception):
    """The derived series was written (``extra``: what :meth:`_Rank._denoise` records) but the record written ahead
    of its store (``error``) could not be: nothing was sent."""

    def __init__(self, extra: dict, error: OSError) -> None:
        super().__init__(str(error))
        self.extra, self.error = extra, error


class _StoreFailed(Exception):
    """The derived series was written (``extra``: what :meth:`_Rank._denoise` records) but not stored."""

    def __init__(self, extra: dict, message: str) -> None:
        super().__init__(message)
        self.extra = extra


@dataclass
class _Recheck:
    """What a rerun found of a series' earlier output and done record (:meth:`_Rank._recheck`)."""

    #: why the output this batch wrote is not whole or not what it wrote: set aside, then written again
    damaged: str = ""
    #: why the done record no longer holds for this input (other slices, weights or contents; another input)
    stale: str = ""
    #: the output was made from another input than the one there now (other contents, slices, DICOMweb instances,
    #: patient or study; not other weights): moved aside before the redo, so that a redo that fails leaves no output
    #: under this input's name made from another scan
    replaced: bool = False
    #: why an input file could not be compared (the series fails), and the error that said so
    unreadable: str = ""
    read_error: OSError | None = None
    #: the done record holds for this input and output: the series is skipped
    holds: bool = False
    #: new stat keys of files read again and found as recorded, for the skip to record
    refresh: dict = field(default_factory=dict)


#: what a record keeps of the denoising of a series whose store failed, for the rerun that only re-sends it
_DENOISED_FIELDS = ("model", "weights_version", "weights_sha256", "low_frequency_restoration", "modality", "shape",
                    "modality_from")
#: on a failed record that moved no output of its job aside (a transient read error, a refusal that found the output
#: still made from its input or had none of its own, a store not recorded): not its job's last record for a rerun
#: (_Rank.latest). A read error or refusal comes before any record of its run: the job's done record stays its last,
#: and a rerun compares that output with it again instead of denoising it again. A store not recorded
#: (_Rank._unrecorded) comes after its run's own "started" record, which becomes the last instead: a rerun finds no
#: done record to compare, nor the denoising to store again (_Rank._store_only), and resumes a DICOMweb series'
#: derived series from the server (_Rank._resume) or denoises the series again
_KEPT = {"output_kept": True}
#: what a record names of the derived series written for a DICOMweb series (:func:`.dicomweb.derived_series`)
_DERIVED_FIELDS = ("derived_study_uid", "derived_series_uid", "derived_instances")


class _Rank:
    """State of one rank's loop: manifest, what earlier runs did, loaded models, DICOMweb client."""

    def __init__(self, settings: BatchSettings, rank: int, world: int, device: str, client) -> None:
        self.settings, self.rank, self.world, self.device, self.client = settings, rank, world, device, client
        self.manifest = Manifest(settings.output, rank, world)
        records = self.manifest.records()
        self.latest = latest_by_job(r for r in records if not r.get("output_kept"))
        # the last record of each job and output: two files or folders of one content (a file copied, a series without
        # UID in two folders) are one job, and each output is checked against its own record, never the other's
        self.latest_at = {(r["job"], str(r.get("output"))): r for r in records if not r.get("output_kept")}
        # :func:`_stat_key` of input files -> their SHA-256, as runs hashed them: a rerun reads only changed inputs
        self.known_inputs = {str(r["input_stat"]): str(r["input_sha256"]) for r in records
                             if r.get("input_stat") and r.get("input_sha256")}
        # outputs some run of this batch wrote or started to write: a rerun may replace them
        self.ours = {str(r["output"]) for r in records if r.get("output")}
        # the last done record of each output: why an output of another job is written again (another input)
        self.done_outputs = {str(r["output"]): r for r in records if r.get("output") and r.get("status") == "done"}
        # per job, the derived series (DICOMweb sources) that earlier runs wrote (the last record naming each), and
        # among them those that may be on the server: recorded before their STOW-RS (stage "store"), so that a run
        # killed after the store and before its "done" record is known to have sent them
        self.written: dict[str, dict[str, dict]] = {}
        self.sent: dict[str, dict[str, dict]] = {}
        for record in records:
            stored = record.get("stored") or {}
            if stored.get("series_instance_uid") and not record.get("derived_series_uid"):  # an older record
                record = {**record, "derived_series_uid": stored["series_instance_uid"],
                          "derived_instances": stored.get("instances")}
            uid = record.get("derived_series_uid")
            if uid and record.get("model"):
                self.written.setdefault(record["job"], {}).pop(uid, None)
                self.written[record["job"]][uid] = record  # insertion order: the newest last
                if record.get("stage") == "store" or record.get("stored"):
                    self.sent.setdefault(record["job"], {}).pop(uid, None)
                    self.sent[record["job"]][uid] = record
        # per job, the derived series its redos superseded on the server (:func:`_superseded_ledgers`), re-checked by
        # every run (:meth:`_recheck_superseded`) until the server lists them no more
        self.ledgers = _superseded_ledgers(records)
        # per job of a DICOMweb series, every output a record names -> the key (study/series) it was written under
        self.outputs_of: dict[str, dict[str, str]] = {}
        for record in records:
            if str(record.get("key", "")).startswith("dicomweb:") and record.get("output"):
                self.outputs_of.setdefault(record["job"], {})[str(record["output"])] = record["key"]
        self.planned_outputs: set[str] = set()  # the outputs of every series of this run (:meth:`run`)
        self.cache = ModelCache()
        self.file_widths: dict[str, float | None] = {}  # weight file SHA-256 -> the restoration width it names
        self.options = replace(settings.options, progress=False)  # the rank's own bar is the progress shown
        self.weights_requested = str(settings.options.weights) if settings.options.weights else None
        # an explicit restoration width is part of the job: a rerun with another width redoes the series
        restoration = settings.options.low_frequency_restoration
        self.model_requested = settings.options.model + ("" if restoration is None else f"|lfr={restoration:g}")
        self.scratch = Path(settings.output) / ".denoise_batch_download" / f"rank-{rank:05d}"
        self.last_error = ""
        self.last_unreachable = False  # the last failure: the server could not be reached
        self.last_silent = False  # a request of the last series was not answered in time (dicomweb.PacsDidNotAnswer)
        # a request of this run found the server unreachable (_note_unreachable): no superseded-series check asks it
        # after that (_instances_on_server)
        self.pacs_unreachable = False
        self.last_superseded: list[dict] = []  # the last series' superseded derived series still on the server
        self.last_left: list[str] = []  # the last series' earlier outputs left under another study (_left_outputs)
        self._identity: tuple[str, dict] | None = None  # (series key, its _series_identity): asked once a series
        self._sources: tuple[str, str | None] | None = None  # (series key, its _made_from)

    def _server_name(self) -> str:
        """The DICOMweb server as logs and summaries name it: its URL without user name, password or query."""
        from ..pacs_corrections import without_credentials

        url = getattr(self.client, "base_url", None)
        return without_credentials(url) if url else "the server"

    def run(self, items: list[SeriesItem], bar, planned: list[SeriesItem] | None = None) -> BatchSummary:
        """Denoise ``items`` (this rank's share of ``planned``, every rank's series); rank 0 then re-checks the
        superseded derived series of the jobs outside this run's series (:meth:`_recheck_unplanned`)."""
        summary = BatchSummary(ranks=1)
        start = time.perf_counter()
        self.planned_outputs = {str(i.output.resolve()) for i in (items if planned is None else planned)}
        unreachable = 0  # failures in a row for want of the server
        silent = 0  # of them, the last ones in a row whose server accepted the request and did not answer in time
        for index, item in enumerate(items):
            self.last_unreachable, self.last_silent, self.last_superseded, self.last_left = False, False, [], []
            outcome = self.one(item)
            if outcome == "failed":
                summary.failures.append((item.key, self.last_error))
            summary.superseded.extend((item.key, entry) for entry in self.last_superseded)
            summary.left_outputs.extend((item.key, sentence) for sentence in self.last_left)
            setattr(summary, outcome, getattr(summary, outcome) + 1)
            bar.set_postfix(done=summary.done, skipped=summary.skipped, failed=summary.failed, refresh=False)
            bar.update(1)
            unreachable = unreachable + 1 if outcome == "failed" and self.last_unreachable else 0
            silent = silent + 1 if unreachable and self.last_silent else 0
            if unreachable >= UNREACHABLE_LIMIT and index + 1 < len(items):
                summary.untried = len(items) - index - 1
                why = (f"did not answer within {pacs_read_timeout_s():g} s" if silent == unreachable else
                       "could not be reached")
                summary.stopped = (f"{self._server_name()} {why} for "
                                   f"{unreachable} series in a row: the remaining {summary.untried} series were not "
                                   "tried; rerun to resume")
                break
        if self.rank == 0 and not summary.stopped:
            summary.superseded.extend(self._recheck_unplanned(items if planned is None else planned))
        summary.seconds = time.perf_counter() - start
        shutil.rmtree(self.scratch, ignore_errors=True)
        return summary

    def one(self, item: SeriesItem) -> str:
        """Denoise one series; returns "done", "skipped" or "failed"."""
        base = {"key": item.key, "input": item.source, "output": str(item.output.resolve()),
                "model_requested": self.settings.options.model, "weights_requested": self.weights_requested,
                "voxels": item.voxels}
        started = time.perf_counter()
        digest: dict = {}
        try:
            # a series with a UID is that UID (its contents are checked against a done record's, _input_changed);
            # without one (a file, a hard-anonymised series), its contents
            if not item.series_uid:
                digest = self._input_digest(item)
            identity = _uid_identity(item.series_uid) if item.series_uid else f"sha256:{digest['input_sha256']}"
        except OSError as error:
            identity = f"unreadable:{item.key}"
            moved, kept = self._refused_output(item, base, error)
            return self._failed(base, identity, started, f"cannot read {item.source}: {one_line(error)}{moved}", kept)
        job = job_key(identity, self.model_requested, self.weights_requested)
        base.update(job=job, identity=identity)
        # a DICOMweb series' record under another output is its own (moved to another study: _instances_changed)
        previous = self.latest.get(job) if item.kind == "dicomweb" else self.latest_at.get((job, base["output"]))
        if item.uid_reused:  # one UID in two studies or patients: the job mixes both, nothing of it is asked or said
            moved, kept = self._refused_output(item, base) if item.input_refused else ("", {})
            return self._failed(base, identity, started, item.problem + moved, kept)
        # every derived series an earlier redo superseded, asked again: reported while the server lists it
        ledger = self._recheck_superseded(job, item.key, previous, item.kind == "dicomweb")
        if ledger:  # on every record of the series from now on (the state of each: still there, or gone when)
            base["superseded_on_server"] = ledger
        self.last_left = self._left_outputs(job, item, base)
        if item.problem:  # refused now, whatever an earlier run did
            moved, kept = self._refused_output(item, base, keep=item.keeps_output) \
                if item.input_refused or item.keeps_output else ("", {})
            return self._failed(base, identity, started, item.problem + moved, kept)
        ours = base["output"] in self.ours
        recheck = self._recheck(item, identity, previous, digest, ours)
        if recheck.damaged:  # a power cut or a copy cut short: done again as if it were missing, never skipped or sent
            log.warning("%s: denoising again: %s", item.key, recheck.damaged)
            base["redone"] = recheck.damaged
            try:
                _set_aside(item.output)
            except OSError as error:
                return self._failed(base, identity, started, f"{recheck.damaged}; it cannot be moved aside to be "
                                                             f"written again: {one_line(error)}")
        if recheck.unreadable:  # (a DICOMweb server that cannot be reached says nothing of the input: kept)
            moved, kept = self._refused_output(item, base, recheck.read_error) if item.kind != "dicomweb" else ("", {})
            return self._failed(base, identity, started, recheck.unreadable + moved, kept)
        if recheck.holds and not (self.settings.store_to_pacs and not previous.get("stored")):
            if ledger != (previous.get("superseded_on_server") or []):  # one found gone, or an older record's list
                recheck.refresh["superseded_on_server"] = ledger
            if recheck.refresh:  # the next rerun compares the files' stat keys again, reading none of them
                self._append_note(item.key, {**previous, **recheck.refresh})
            return "skipped"
        if recheck.stale:
            log.warning("%s: denoising again: %s", item.key, recheck.stale)
            base["redone"] = recheck.stale
            if recheck.replaced and ours and item.output.exists():
                try:
                    _set_aside(item.output)
                except OSError as error:
                    return self._failed(base, identity, started, f"{recheck.stale}; its output, made from the earlier "
                                                                 f"input, cannot be moved aside: {one_line(error)}")
            superseded = self._superseded(previous, item, recheck.stale)
            if superseded:  # on every record of this redo, failed ones too
                self.last_superseded.append(self._as_reported(superseded))
                base["superseded_derived_series"] = superseded
                known = self.ledgers.setdefault(job, {}).get(superseded["series_instance_uid"], {})
                self.ledgers[job][superseded["series_instance_uid"]] = {
                    **superseded, "first_reported": known.get("first_reported") or time.time()}
                base["superseded_on_server"] = list(self.ledgers[job].values())
        if item.output.exists() and not ours:
            return self._failed(base, identity, started,
                                f"{item.output} exists and was not written by this batch (no manifest record): "
                                "move it away or choose another --output")
        try:  # what the output comes from, taken before it is read, for a rerun to compare (_input_changed)
            if item.kind == "dicomweb":  # on every record of the series: _resume compares those it finds too
                base.update(self._series_identity(item))
                source = {}
            else:
                source = self._input_digest(item)
        except OSError as error:  # (requests' errors are OSErrors)
            self.last_unreachable = self._note_unreachable(error)
            moved, kept = self._refused_output(item, base, error) if item.kind != "dicomweb" else ("", {})
            return self._failed(base, identity, started, f"cannot read {item.source}: {one_line(error)}{moved}", kept)
        try:
            self.manifest.append({**base, "status": "started"})
        except OSError as error:  # nothing written yet: no output without a record naming it
            return self._failed(base, identity, started, f"its record cannot be written to {self.manifest.path} "
                                                         f"({one_line(error)}): it was not denoised")
        self.ours.add(base["output"])
        written = False  # this run wrote the output (_denoise): else an earlier run's, recorded done or sent
        try:
            resumed = self._resume(job, item, base) if item.kind == "dicomweb" else None
            if resumed is not None:
                extra = resumed
            elif self._store_only(previous, item):
                # denoised, but the store failed: the same files (same UIDs) again, so that the server completes
                # that derived series instead of keeping a partial one beside a second, whole one
                extra = self._store({k: previous.get(k) for k in _DENOISED_FIELDS}, item, base)
            else:
                written = True
                extra = self._denoise(item, base, overwrite=item.output.exists())
            extra.update(source)
            if "output_sha256" not in extra and item.output.exists():  # resumed or only stored: as it is now
                extra.update(_output_size(item.output))
        except _StoreUnrecorded as error:  # as a done record that cannot be written: not left looking done
            return self._unrecorded(base, identity, started, error.extra, item, error.error, written,
                                    "its record ahead of the store to the server")
        except _StoreFailed as error:
            self.last_unreachable = self._note_unreachable(error)
            return self._failed(base, identity, started, str(error), {**error.extra, "stage": "store"})
        except Exception as error:  # noqa: BLE001 - one bad series is recorded, never stops the batch
            log.debug("series %s failed", item.key, exc_info=True)
            self.last_unreachable = self._note_unreachable(error)
            # a refused download's reason whole: a 64-character UID and a folder took most of one_line's 300
            limit = 1000 if isinstance(error, dicomweb.DownloadRefused) else 300
            return self._failed(base, identity, started, one_line(error, limit) or type(error).__name__)
        finally:
            gc.collect()  # the series' arrays go now: one series in memory at a time
        try:
            self.manifest.append({**base, **extra, "status": "done",
                                  "seconds": round(time.perf_counter() - started, 3), "error": None})
        except OSError as error:  # an output no record names is not done (a rerun would not skip it)
            return self._unrecorded(base, identity, started, extra, item, error, written)
        return "done"

    def _unrecorded(self, base: dict, identity: str, started: float, extra: dict, item: SeriesItem,
                    error: OSError, written: bool, record: str = "its done record") -> str:
        """The series was denoised and written (``extra``: what its done record held) but that record (``record``:
        or the one written ahead of its store, :meth:`_store`: then nothing was sent) could not be written: failed,
        saying so. An output this run wrote (``written``) is moved aside (:func:`_set_aside`; the rerun that writes
        it again removes it), not left under its name looking done, except a derived series the server stored, or
        that an earlier run sent (perhaps in part): a rerun finds that one there by its UIDs (:meth:`_resume`) and
        records it, or completes it from these files, without storing a second copy. One an earlier run wrote and
        recorded (resumed, or only stored now) is left in place: its record still names it, and a rerun stores it."""
        why = f"denoised, but {record} cannot be written to {self.manifest.path} ({one_line(error)})"
        if record != "its done record":
            why += ": it was not stored"
        sent = self.sent.get(base["job"], {}).get(str(extra.get("derived_series_uid")))
        if sent and not extra.get("stored"):
            why += (f"; an earlier run sent its derived series {extra['derived_series_uid']} (the server may hold it, "
                    f"in part): {item.output} is left in place and a rerun completes it from these files")
        elif extra.get("stored"):
            why += (f"; the server stored it (derived series {extra['stored'].get('series_instance_uid')}): "
                    f"{item.output} is left in place and a rerun records it without storing it again")
        elif not written:
            why += (f"; {item.output}, written by an earlier run, is left in place and a rerun stores it from these "
                    "files")
            extra = {**extra, **_KEPT}
        elif item.output.exists():
            try:
                _set_aside(item.output)
                why += "; its output was moved aside (not done: a rerun denoises it again)"
            except OSError as moved:
                why += f"; its output {item.output} could not be moved aside ({one_line(moved)}): it is not done"
        return self._failed(base, identity, started, why, extra)

    def _left_outputs(self, job: str, item: SeriesItem, base: dict) -> list[str]:
        """What the run says of each output an earlier run wrote of the DICOMweb series ``item`` (its ``job``) under
        another study than the one the server lists it in now (a study split or merged: the output folder is
        ``<study>/<series>``), that is still there and no series of this run writes: left in place (a user's files
        are never deleted) and reported by every run until removed, as a superseded derived series on the server
        is; warned of when found."""
        left = []
        for output, key in self.outputs_of.get(job, {}).items():
            if output == base["output"] or output in self.planned_outputs or not Path(output).exists():
                continue
            study = key[len("dicomweb:"):].split("/")[0]
            left.append(f"{output} holds its output that an earlier run wrote when the server listed it in study "
                        f"{study}; it is now in study {item.study_uid} (its output: {item.output}): remove it once "
                        "no longer needed (nothing was deleted)")
            log.warning("%s: %s", item.key, left[-1])
        return left

    def _refused_output(self, item: SeriesItem, base: dict, error: OSError | None = None, keep: bool = False
                        ) -> tuple[str, dict]:
        """What became of the output an earlier run of this batch wrote under the name of a series refused now before
        its input could be compared with the one that output was made from: moved aside (:func:`_set_aside`, as that
        of a replaced input is) on evidence that the input it was made from is gone or another, so that no output
        stays attached to an input it was not made from; else left in place (a rerun checks it again). ``error``: the
        input could not be read: evidence only when it is gone (:func:`_input_gone`), not for a read that failed
        now (EIO, EACCES, a dropped share). None: refused at discovery (split over folders, its UID in two studies,
        damaged DICOM files, a folder gone): evidence unless its files still hash to the done record's
        ``input_sha256`` (the folder its output was made from, as it was); ``keep`` (a file the storage cannot read
        now, a slice copied twice: :attr:`SeriesItem.keeps_output`): no evidence. The sentence the failure ends with
        ("" when there is no such output), and what its failed record adds (:data:`_KEPT` unless an output was moved
        aside)."""
        if base["output"] not in self.ours or not item.output.exists():
            return "", _KEPT  # (no output of its own: e.g. the folder of a stray copy of a done series' slice)
        kept = (f"; its output {item.output} is left in place (not found gone nor changed: a rerun checks it "
                "again)")
        if keep or (error is not None and not _input_gone(error)):
            return kept, _KEPT
        record = self.done_outputs.get(base["output"]) or {}
        if error is None and record.get("input_sha256"):
            try:
                if self._input_digest(item)["input_sha256"] == record["input_sha256"]:
                    return (f"; its output {item.output}, made from these files as they are now, is left in "
                            "place"), _KEPT
            except OSError as unread:
                if not _input_gone(unread):
                    return kept, _KEPT
        try:
            _set_aside(item.output)
        except OSError as moved:
            return (f"; its output {item.output}, written from an earlier input, cannot be moved aside: "
                    f"{one_line(moved)}"), {}
        log.warning("%s: its output %s, written from an earlier input, moved aside", item.key, item.output)
        return (f"; its output {item.output}, written from an earlier input, was moved aside (a rerun that denoises "
                "the series writes it again)"), {}

    def _input_digest(self, item: SeriesItem, stat: str | None = None) -> dict:
        """``{"input_sha256", "input_stat"}`` of a file or DICOM series input: its files read (hashed) only when no
        run hashed them as they are now (their :func:`_stat_key` ``stat``, computed when not given)."""
        stat = stat or _stat_key(_input_files(item))
        sha = self.known_inputs.get(stat) or _input_sha256(item)
        self.known_inputs[stat] = sha
        return {"input_sha256": sha, "input_stat": stat}

    def _series_identity(self, item: SeriesItem) -> dict:
        """:func:`.dicomweb.series_identity` of a DICOMweb series, asked once per series and run (before its
        download): what a rerun compares with the done record, and what a new record keeps.

        Raises:
            requests.exceptions.ConnectionError, Timeout: the server cannot be reached.
        """
        if self._identity is None or self._identity[0] != item.key:
            self._identity = (item.key, dicomweb.series_identity(self.client, item))
        return self._identity[1]

    def _recheck(self, item: SeriesItem, identity: str, previous: dict | None, digest: dict, ours: bool
                 ) -> _Recheck:
        """Whether the done record ``previous`` (the last record of the series' job, if any) still holds for this input
        and its output, and if not why not. The one place a rerun decides it; in this order:

        1. The output exists and some run of this batch wrote it (``ours``): it is ``damaged`` when it is not whole
           (unreadable, no file in a series folder, an empty file, other file count or bytes than the record's;
           records before sizes were kept: empty files only, :func:`_output_damage`) or, for a done record that
           hashed it, holds other contents (:meth:`_output_changed`). A damaged output is no output: the record holds
           only if the server still holds its stored derived series.
        2. A done record whose output is there (or, with ``--store-to-pacs``, whose derived series the server still
           holds whole, :meth:`_kept_on_server`) is ``stale`` when the series has other slices (a DICOM series' voxels,
           a DICOMweb series' instance count), a DICOMweb series other instances (other SOP Instance UIDs, or stored
           again: :meth:`_instances_changed`), other weights or restoration width would be used
           (:meth:`_changed_since`), or a DICOM series with a UID has other contents under the same slices
           (:meth:`_input_changed`; records before inputs were hashed: not compared). An input that cannot be read
           (or a server that cannot be reached) for this is ``unreadable``. Else it ``holds``; a file (with the data
           files its header names) or a series without a UID is its contents (``digest``, its job's identity): another
           content is another job, with no done record.
        3. No record of this job, but a done record of another input at the same output (a file replaced by another
           volume, a series without a UID whose contents changed): ``stale``, the output is written again.

        Files are read (hashed) only when their stat keys differ from the record's; those found as recorded have their
        new keys in ``refresh``, for the skip to record (a file input's or a series without UID's ``digest`` when its
        key changed; a DICOMweb series' identity when its record kept none)."""
        recheck = _Recheck()
        present = item.output.exists()
        done = bool(previous and previous.get("status") == "done")
        if ours and present:
            recheck.damaged = _output_damage(previous or {}, item.output)
            if not recheck.damaged and done:
                recheck.damaged = self._output_changed(previous, item.output, recheck.refresh)
            present = not recheck.damaged  # set aside: redone as a missing one
        if done and (present or self._kept_on_server(previous, item)):
            try:  # _changed_since, then the contents of a DICOM series
                other = self._other_input(previous, item)
                weights = "" if other else self._weights_changed(previous, item)
                contents = "" if other or weights else self._input_changed(previous, item, recheck.refresh)
                recheck.stale, recheck.replaced = other or weights or contents, bool(other or contents)
            except OSError as error:  # (a DICOMweb server that cannot be reached too: requests' errors are OSErrors)
                recheck.unreadable, recheck.read_error = f"cannot read {item.source}: {one_line(error)}", error
                self.last_unreachable = self._note_unreachable(error)
                return recheck
            if not recheck.stale:
                recheck.holds = True
                if digest and digest["input_stat"] != previous.get("input_stat"):  # read again (touched, moved)
                    recheck.refresh.update(digest)
            return recheck
        prior = self.done_outputs.get(str(item.output.resolve()))
        if prior and not previous and prior.get("identity") != identity and present:
            recheck.stale = (f"its input changed since its output was written ({prior.get('identity', '?')[:19]} -> "
                             f"{identity[:19]})")
            recheck.replaced = True
        return recheck

    def _input_changed(self, record: dict, item: SeriesItem, refresh: dict) -> str:
        """Why the input of a DICOM series with a UID is not the one ``record`` (done) denoised ("" when it is): the
        same UID and slices with other contents (a series sent again after a correction, files replaced). Its files
        are read only when their stat key differs from the record's; found unchanged, the new key goes to
        ``refresh``. (A file or a series without a UID is its contents: another content is another job. A DICOMweb
        series is compared by :meth:`_changed_since`; a record of it that keeps no identity gets the one found now.)

        Raises:
            OSError: an input file cannot be read, the DICOMweb server cannot be reached.
        """
        if item.kind == "dicomweb" and not record.get("input_instances_sha256"):
            # a record without the identity, found to hold (_instances_changed): the identity found now is recorded,
            # so that a later change is told by it (input_instances_adopted: recorded by a rerun, not the download)
            now = self._series_identity(item)
            if now:
                refresh.update(now, input_instances_adopted=True)
            return ""
        if item.kind == "dicomweb" and not record.get("input_patient_sha256"):
            # a record of a run before patients were kept, found to hold: the patient listed now, likewise
            patient = self._series_identity(item).get("input_patient_sha256")
            if patient:
                refresh["input_patient_sha256"] = patient
            return ""
        if item.kind != "dicom" or not item.series_uid or not record.get("input_sha256"):
            return ""
        stat = _stat_key(_input_files(item))
        if stat == record.get("input_stat"):
            return ""
        now = self._input_digest(item, stat)["input_sha256"]
        if now != record["input_sha256"]:
            return (f"the series' files changed since (same SeriesInstanceUID and slices, other contents: SHA-256 "
                    f"{now[:12]}, denoised {str(record['input_sha256'])[:12]})")
        refresh["input_stat"] = stat
        return ""

    def _instances_changed(self, record: dict, item: SeriesItem) -> str:
        """Why the instances the server holds of a DICOMweb series are not those ``record`` says were downloaded (""
        when they are, or when it cannot be told): other SOP Instance UIDs under the same count (a corrected series
        sent again, an instance deleted and another stored), or the same UIDs with other InstanceCreationDate or
        InstanceCreationTime (stored again), or filed under another patient (``input_patient_sha256``: the output
        names its patient) or listed in another study (the record's ``key``: the output is filed under its study):
        its ``input_instances_sha256``, ``input_created_sha256`` and ``input_patient_sha256`` against
        :func:`.dicomweb.series_identity` now. A record without them (a run before identities were kept, a server that
        did not list the instances whole) is told by the SOP Instance UIDs that its output names as its sources
        (SourceImageSequence, :func:`.dicomweb.source_instances_sha256`; the output at ``item.output`` is the latest
        any run wrote); no output: only its instance count tells, as before.

        Raises:
            requests.exceptions.ConnectionError, Timeout: the server cannot be reached.
        """
        if item.kind != "dicomweb":
            return ""
        listed = str(record.get("key", ""))  # "dicomweb:<study>/<series>": the job is the series UID alone
        if listed.startswith("dicomweb:") and listed != item.key:
            return (f"the server lists the series in another study since ({listed[9:].split('/')[0]} -> "
                    f"{item.study_uid}: a study split or merged; the output was filed under the earlier one)")
        now = self._series_identity(item)
        if not now:
            return ""  # not listed whole now (warned): its instance count only, as before
        if not record.get("input_instances_sha256"):
            made_from = self._made_from(item)
            if made_from and made_from != now["input_instances_sha256"]:
                return ("the server holds other instances of the series than its output was made from (the SOP "
                        "Instance UIDs its SourceImageSequence names: instances replaced or a corrected series sent "
                        "again)")
            return ""
        if now["input_instances_sha256"] != record["input_instances_sha256"]:
            return ("the server holds other instances of the series since (other SOP Instance UIDs: instances "
                    "replaced or a corrected series sent again)")
        created = record.get("input_created_sha256")
        if created and now.get("input_created_sha256") and now["input_created_sha256"] != created:
            return ("the server holds the series' instances stored again since (same SOP Instance UIDs, other "
                    "InstanceCreationDate/Time)")
        patient = record.get("input_patient_sha256")
        if patient and now.get("input_patient_sha256") and now["input_patient_sha256"] != patient:
            return ("the server lists the series under another patient since (PatientID, PatientName or "
                    "PatientBirthDate: a misfiled series corrected; the output named the earlier one)")
        return ""

    def _made_from(self, item: SeriesItem) -> str | None:
        """:func:`.dicomweb.source_instances_sha256` of the output of a DICOMweb series, read once per series and
        run (only for records that keep no identity)."""
        if self._sources is None or self._sources[0] != item.key:
            self._sources = (item.key, dicomweb.source_instances_sha256(item.output))
        return self._sources[1]

    def _output_changed(self, record: dict, output: Path, refresh: dict) -> str:
        """Why the output that ``record`` (done) says this batch wrote does not hold what it wrote ("" when it does):
        another content of the same sizes (overwritten, a slice swapped, another series' result copied over it).
        Read only when its stat key differs from the record's; found unchanged, the new key goes to ``refresh``."""
        sha = record.get("output_sha256")
        if not sha or record.get("output") != str(output.resolve()):
            return ""  # a record of a run before outputs were hashed: its sizes were checked
        try:
            files = _output_files(output)
            stat = _stat_key(files)
            if stat == record.get("output_stat"):
                return ""
            now = _files_sha256(files)
        except OSError as error:
            return f"{output} cannot be read ({one_line(error)})"
        if now != sha:
            return (f"{output} does not hold what this batch wrote (SHA-256 {now[:12]}, written {str(sha)[:12]}): "
                    "overwritten or replaced since")
        refresh["output_stat"] = stat
        return ""

    def _changed_since(self, record: dict, item: SeriesItem) -> str:
        """Why a series that an earlier run denoised must be denoised again ("" when it need not): its slices
        changed in number or size (a slice arrived late: the UID stays, the voxels do not), a DICOMweb series' instances
        are other ones (:meth:`_instances_changed`), the weight file this run
        would use for the record's model and modality holds other weights than the record's (new shipped or
        published weights under the same name), or the default restoration width changed. An archive then ends
        up denoised by one model, not by whichever was installed when each series happened to run. Records of runs
        before the modality was recorded are matched to the modality whose weight file holds their weights."""
        return self._other_input(record, item) or self._weights_changed(record, item)

    def _other_input(self, record: dict, item: SeriesItem) -> str:
        """Why the series is no longer the input ``record`` denoised ("" when it is, as far as slices and a DICOMweb
        series' listing tell): other slices, or other DICOMweb instances, patient or study
        (:meth:`_instances_changed`)."""
        done_voxels = record.get("voxels")
        if item.voxels and isinstance(done_voxels, int) and done_voxels and done_voxels != item.voxels:
            return f"the series has other slices since ({done_voxels} -> {item.voxels} voxels)"
        return self._instances_changed(record, item)

    def _weights_changed(self, record: dict, item: SeriesItem) -> str:
        """Why the weights or restoration width this run would use differ from ``record``'s ("" when they do not):
        the second half of :meth:`_changed_since`."""
        from ..lesions.low_frequency_restoration import restoration_width
        from ..weights.format import restoration_of_file
        from ..weights.store import file_sha256 as cached_file_sha256  # read once per file version, not per series

        model, modality, sha = record.get("model"), record.get("modality"), record.get("weights_sha256")
        if model not in DENOISE_LEARNED_MODELS or not sha:
            return ""  # classical models have no weights
        installed = {}  # modality -> (file, SHA-256) this run would use
        for candidate in ((modality,) if modality in ("CT", "MR") else ("CT", "MR")):
            try:
                path = weights_for(model, candidate, self.settings.options.weights, record.get("key", "the series"))
            except DenoiseRefused:
                continue  # no weights to run now: keep what was done
            installed[candidate] = (path, cached_file_sha256(path))
        if not installed:
            return ""
        if modality not in ("CT", "MR"):
            # a record of a run before records named the modality: the one whose file holds the record's weights;
            # none of them does: the weights changed
            matching = [m for m, (_, now) in installed.items() if now == sha]
            if not matching:
                files = ", ".join(sorted({str(path) for path, _ in installed.values()}))
                return f"the {model} weights changed since ({sha[:12]} is in none of {files})"
            if len(matching) > 1:
                return ""  # one file for both (--weights): the width's modality is unknown; keep what was done
            modality = matching[0]
        path, now = installed[modality]
        if now != sha:
            return f"the {model} weights changed since ({sha[:12]} -> {now[:12]} in {path})"
        if now not in self.file_widths:
            self.file_widths[now] = restoration_of_file(path)
        width = restoration_width(modality, self.settings.options.low_frequency_restoration, self.file_widths[now])
        done_width = record.get("low_frequency_restoration")
        if done_width is not None and abs(float(done_width) - width) > 1e-9:
            return f"the low-frequency restoration width changed since ({float(done_width):g} -> {width:g} px)"
        return ""

    def _kept_on_server(self, record: dict, item: SeriesItem) -> bool:
        """Whether the server still holds the whole derived series that ``record`` (done) says was stored: then a
        deleted local output is not a reason to denoise and store it again (a second copy on the server)."""
        stored = record.get("stored") or {}
        study = record.get("derived_study_uid") or item.study_uid  # the source's (older records do not name it)
        if not (self.settings.store_to_pacs and item.kind == "dicomweb" and stored.get("series_instance_uid")
                and study):
            return False
        try:
            found = dicomweb.instances_on_server(self.client, str(study), str(stored["series_instance_uid"]))
        except dicomweb.PacsStoreError as error:
            self._note_unreachable(error)
            return False  # asked again, and the failure recorded, on the way to storing it
        return found >= int(stored.get("instances") or 1)

    def _superseded(self, record: dict | None, item: SeriesItem, why: str) -> dict | None:
        """The derived series that ``record`` (the done record of a DICOMweb series now redone for ``why``) says was
        stored on the server, when the server still lists it (QIDO-RS, :func:`.dicomweb.instances_on_server`): made
        from data (or weights) no longer current, it stays there beside the new one, and standard DICOMweb cannot
        delete it, so it is reported for the PACS administrator to remove (warned, recorded, listed at the end);
        nothing is deleted. ``{"series_instance_uid", "study_instance_uid", "why", "other_patient",
        "instances_on_server"}`` (None when unknown: the server could not be asked); None when there is none or the
        server lists none of it. ``other_patient``: the server lists the source under another patient than the
        one the record's download had (``input_patient_sha256``), whose name and ID the derived series carries."""
        stored = (record or {}).get("stored") or {}
        uid = stored.get("series_instance_uid")
        study = (record or {}).get("derived_study_uid") or item.study_uid  # the source's (older records: not named)
        if item.kind != "dicomweb" or not uid or not study or self.client is None:
            return None
        try:
            now = self._series_identity(item).get("input_patient_sha256")
        except OSError as error:  # asked again, and a failure recorded, before the download
            self._note_unreachable(error)
            now = None
        before = record.get("input_patient_sha256")
        other_patient = bool(before and now and before != now)
        if other_patient:
            why = f"stored under another patient: {why}"
        found = self._instances_on_server(item.key, str(study), str(uid))
        if found == 0:
            return None  # removed already
        entry = {"series_instance_uid": str(uid), "study_instance_uid": str(study), "why": why,
                 "other_patient": other_patient, "instances_on_server": found}
        log.warning("%s", superseded_sentence(item.key, self._as_reported(entry)))
        return entry

    def _instances_on_server(self, key: str, study_uid: str, series_uid: str) -> int | None:
        """How many instances of the derived series ``series_uid`` the server lists
        (:func:`.dicomweb.instances_on_server`); None, with a warning naming the series ``key``, when it cannot be
        asked (the series is then reported, for the administrator to check). Once any request of this run found the
        server unreachable (:meth:`_note_unreachable`: this check, a series' download, search or store; refused, timed
        out, after the client's retries), None at once for every other one (``pacs_unreachable``): each would spend
        the client's retries to fail the same way. One warning says so; a rerun asks again."""
        if self.pacs_unreachable:
            return None
        try:
            return dicomweb.instances_on_server(self.client, study_uid, series_uid)
        except dicomweb.PacsStoreError as error:
            unreachable = self._note_unreachable(error, said=True)
            log.warning("%s: %s%s", key, error, f"; the server cannot be reached: the other {_NOT_ASKED}"
                        if unreachable else "")
            return None

    def _note_unreachable(self, error: BaseException, said: bool = False) -> bool:
        """Whether ``error`` is a failure to reach the server (:func:`_unreachable`); the first of the run turns the
        superseded-series checks off for the rest of it (``pacs_unreachable``, :meth:`_instances_on_server`), with
        one warning saying so (``said``: the caller's own warning says it)."""
        unreachable = _unreachable(error)
        self.last_silent = self.last_silent or _caused_by(error, dicomweb.PacsDidNotAnswer)
        if unreachable and not self.pacs_unreachable:
            self.pacs_unreachable = True
            if not said:
                log.warning("%s cannot be reached (%s): the %s", self._server_name(),
                            one_line(error), _NOT_ASKED)
        return unreachable

    def _as_reported(self, entry: dict) -> dict:
        """``entry`` (:meth:`_superseded`) as the run reports it: with ``pacs_unreachable`` when the server could not
        be asked of it because it cannot be reached (never recorded: a rerun asks again)."""
        return {**entry, "pacs_unreachable": True} if entry["instances_on_server"] is None and self.pacs_unreachable \
            else entry

    def _recheck_superseded(self, job: str, key: str, latest: dict | None, asked: bool = True) -> list[dict]:
        """Every derived series that a redo of ``job`` superseded (:meth:`_superseded`, as recorded:
        :func:`_superseded_ledgers`), with what the server says of it now: one QIDO-RS search per series not yet
        found gone (:func:`.dicomweb.instances_on_server`; those only, so that a rerun asks the server no more than
        once for each superseded series recorded; none once one check found the server unreachable,
        :meth:`_instances_on_server`). One it still lists (or that cannot be asked) is warned of and reported again,
        "still there" since it was first reported (``self.last_superseded``); one it lists no more gets ``gone``
        (Unix seconds) and is neither asked nor reported again. The derived series that ``latest`` (the
        job's latest record) says is stored is its current one: not asked. ``asked`` False (the source is not this
        server): the recorded state, unasked. [] when the job superseded none."""
        ledger = self.ledgers.get(job)
        if not ledger:
            return []
        current = ((latest or {}).get("stored") or {}).get("series_instance_uid")
        for uid, entry in ledger.items():
            if entry.get("gone") or uid == current or not asked or self.client is None:
                continue
            found = self._instances_on_server(key, str(entry.get("study_instance_uid")), uid)
            if found == 0:
                log.info("%s: the superseded derived series %s is no longer on the server", key, uid)
                entry["gone"] = time.time()
                continue
            entry["instances_on_server"] = found
            still = self._as_reported({**entry, "still": True})
            log.warning("%s", superseded_sentence(key, still))
            self.last_superseded.append(still)
        return list(ledger.values())

    def _recheck_unplanned(self, planned: list[SeriesItem]) -> list[tuple[str, dict]]:
        """:meth:`_recheck_superseded` for every job with a superseded derived series not yet found gone that no
        series of this run (``planned``: every rank's) is: its series no longer listed or filtered out, or asked with
        another model; a job whose series came from another server is left. Each whose state changed gets a record
        (its latest one, with ``superseded_on_server``). Returns (series key, entry) of those to report."""
        jobs = {job_key(_uid_identity(item.series_uid), self.model_requested, self.weights_requested)
                for item in planned if item.series_uid}
        base_url = self._server_name() if getattr(self.client, "base_url", None) else ""  # as inputs are recorded
        found: list[tuple[str, dict]] = []
        for job, ledger in self.ledgers.items():
            latest = self.latest.get(job)
            if job in jobs or latest is None or not any(not entry.get("gone") for entry in ledger.values()):
                continue
            if not base_url or not str(latest.get("input", "")).startswith(base_url + "/"):
                continue
            self.last_superseded = []
            entries = self._recheck_superseded(job, str(latest.get("key")), latest)
            found.extend((str(latest.get("key")), entry) for entry in self.last_superseded)
            if entries != (latest.get("superseded_on_server") or []):
                self._append_note(str(latest.get("key")), {**latest, "superseded_on_server": entries})
        return found

    def _resume(self, job: str, item: SeriesItem, base: dict) -> dict | None:
        """What to record as done for a DICOMweb series whose derived series an earlier run wrote (and perhaps sent)
        with the weights and slices of now, without denoising it again; None when there is none (denoise it).

        With ``--store-to-pacs`` the server is asked first (QIDO-RS) for every derived series of the job that an
        earlier run may have sent, newest first: a run killed after its STOW-RS and before its "done" record left it
        there, perhaps in part. Whole: recorded as stored, nothing sent. In part: completed by sending the same files
        again (same UIDs) when the output still holds them, else the series fails (a second, whole derived series
        beside the partial one would show the reader two denoised copies; new UIDs for the missing slices are not
        possible). Else the derived series the output holds is sent (once more), or without ``--store-to-pacs``
        recorded as done: never denoised again, so that the UIDs of what may be on the server stay those of the
        output.

        Raises:
            _StoreFailed: the server holds part of it and the output no longer does, or cannot be asked.
        """
        local = dicomweb.derived_series(item.output)
        if self.settings.store_to_pacs:
            for prior in reversed(list(self.sent.get(job, {}).values())):
                if self._changed_since(prior, item):
                    continue  # an older result: denoised again (as a done one would be)
                fields = {**{k: prior.get(k) for k in _DENOISED_FIELDS + _DERIVED_FIELDS},
                          "derived_study_uid": prior.get("derived_study_uid") or item.study_uid}
                uid, expected = prior["derived_series_uid"], int(prior.get("derived_instances") or 0)
                try:
                    found = dicomweb.instances_on_server(  # the source's study (older records do not name it)
                        self.client, str(fields["derived_study_uid"]), uid)
                except dicomweb.PacsStoreError as error:
                    raise _StoreFailed(fields, str(error)) from error
                if found and found >= expected:
                    log.warning("%s: the server already holds its derived series %s (%d instances, sent by an "
                                "earlier run): not stored again", item.key, uid, found)
                    return {**fields, "stored": {"series_instance_uid": uid, "instances": found},
                            "found_on_server": True}
                if found and (local or {}).get("derived_series_uid") == uid:
                    return self._store(fields, item, base)  # the same files: the server completes that series
                if found:
                    raise _StoreFailed(fields, f"the server holds {found} of the {expected} instances of the derived "
                                               f"series {uid} that an earlier run sent, and {item.output} no longer "
                                               "holds its files: delete that series on the server, then rerun")
        if local is None:
            return None
        written = self.written.get(job, {}).get(local["derived_series_uid"])
        if written is None or int(written.get("derived_instances") or 0) != local["derived_instances"] \
                or self._changed_since(written, item):
            return None
        fields = {k: written.get(k) for k in _DENOISED_FIELDS + _DERIVED_FIELDS}
        return self._store(fields, item, base) if self.settings.store_to_pacs else fields

    def _store_only(self, previous: dict | None, item: SeriesItem) -> bool:
        """Whether the series was denoised and written by an earlier run whose store to the server failed or was
        cut short by a kill (``stage`` "store"), or that was run without ``--store-to-pacs``, with the same weights and
        slices as now: then only the store is done (again)."""
        if not (self.settings.store_to_pacs and previous and previous.get("model") and item.output.is_dir()):
            return False
        cut_short = previous.get("status") in ("failed", "started") and previous.get("stage") == "store"
        unsent = previous.get("status") == "done" and not previous.get("stored")
        return (cut_short or unsent) and not self._changed_since(previous, item)

    def _failed(self, base: dict, identity: str, started: float, error: str, extra: dict | None = None) -> str:
        """Record the series as failed with ``error`` (the reason in the summary; when this record cannot be written
        either, the reason says so: a rerun tries the series again as it would one never tried)."""
        try:
            self.manifest.append({**base, **(extra or {}),
                                  "job": job_key(identity, self.model_requested, self.weights_requested),
                                  "identity": identity, "status": "failed",
                                  "seconds": round(time.perf_counter() - started, 3), "error": error})
        except OSError as unwritten:
            error += f" (not recorded: {one_line(unwritten)})"
        self.last_error = error
        return "failed"

    def _append_note(self, key: str, record: dict) -> None:
        """Append ``record``, an update of a done record that still holds (new stat keys, superseded series' state):
        one that cannot be written is warned of and costs only work a rerun does again (hashing, asking the server)."""
        try:
            self.manifest.append(record)
        except OSError as error:
            log.warning("%s: its record cannot be updated in %s (%s): a rerun checks it again", key,
                        self.manifest.path, one_line(error))

    def _read(self, item: SeriesItem):
        if item.kind == "file":
            volume = read_volume(item.source, modality=self.settings.file_modality)
            if self.settings.file_modality:
                volume.modality = self.settings.file_modality
            return volume
        if item.kind == "dicom":
            return read_volume(item.source, series_uid=item.series_uid)
        shutil.rmtree(self.scratch, ignore_errors=True)
        return read_volume(dicomweb.download_series(self.client, item, self.scratch / "series"))

    def _denoise(self, item: SeriesItem, base: dict, overwrite: bool) -> dict:
        volume = self._read(item)
        tag = volume.metadata.get("dicom_modality")
        if item.kind != "file" and volume.modality not in ("CT", "MR"):
            # "give --modality ct|mr" (denoise's advice) would mislead here: in denoise-batch it only picks series
            raise DenoiseRefused(f"its Modality is {tag or 'empty'}: only CT and MR series are denoised "
                                 "(--modality CT or MR takes only those)")
        result = denoise_volume(volume, self.options, self.device, name=item.source, cache=self.cache)
        denoised = volume.with_array(result.array)
        del volume
        _remove_stale_temporaries(item.output)
        suffix = f" [denoised {result.model}]"
        derivation = denoising_derivation(result.model, result.weights_version, result.weights_sha256,
                                          result.low_frequency_restoration)
        # durable: on the disk before the "done" record (fsync'ed) that makes a rerun skip the series
        if item.kind == "file":
            write_volume(denoised, item.output, overwrite=overwrite, series_description_suffix=suffix,
                         derivation=derivation, durable=True)
        else:  # a folder named by UIDs (dots: not a file suffix), built on the input's own headers
            write_dicom_derived_series(denoised, item.output, denoised, series_description_suffix=suffix,
                                       derivation=derivation, overwrite=overwrite, durable=True)
        extra = {"model": result.model, "weights_version": result.weights_version or f"classical-{result.model}",
                 "weights_sha256": result.weights_sha256,
                 "low_frequency_restoration": result.low_frequency_restoration,
                 "modality": denoised.modality, "shape": list(denoised.array.shape),
                 # "dicom" (the Modality tag), "argument" (--modality), "guessed" (from the values: check those)
                 "modality_from": denoised.metadata.get("modality_source"),
                 **_output_size(item.output)}
        if item.kind == "dicomweb":  # the derived series' UIDs, recorded before any store (see _resume)
            extra.update(dicomweb.derived_series(item.output) or {})
        del denoised, result
        return self._store(extra, item, base) if self.settings.store_to_pacs else extra

    def _store(self, extra: dict, item: SeriesItem, base: dict) -> dict:
        """``extra`` with ``stored``: the derived series at ``item.output`` sent to the server (STOW-RS). Recorded
        first as started at ``stage`` "store": a run killed during the store leaves a partial series on the server,
        which the rerun completes with the same files.

        Raises:
            _StoreFailed: the server did not store it all (or could not be reached).
            _StoreUnrecorded: the record ahead of the store cannot be written (nothing was sent).
        """
        if not extra.get("derived_series_uid"):  # a record of a run before derived series were named
            extra = {**extra, **(dicomweb.derived_series(item.output) or {})}
        # written ahead of the STOW-RS: a run killed after it and before the "done" record is known to have sent it
        try:
            self.manifest.append({**base, **extra, "status": "started", "stage": "store"})
        except OSError as error:  # not sent: a store no record announces would be unknown to a rerun
            raise _StoreUnrecorded(extra, error) from error
        try:
            return {**extra, "stored": dicomweb.store_series(self.client, item.output)}
        except Exception as error:  # noqa: BLE001 - recorded with what was written: a rerun re-sends it
            raise _StoreFailed(extra, one_line(error) or type(error).__name__) from error


def run_rank(settings: BatchSettings, items: list[SeriesItem], rank: int, world: int, device: str,
             client=None) -> BatchSummary:
    """Denoise this rank's share of ``items`` (all ranks' list) with one progress bar (position ``rank``,
    shown on a terminal only). Returns this rank's summary."""
    from tqdm.auto import tqdm

    mine = shard_items(items, rank, world)
    with tqdm(total=len(mine), position=rank, desc=f"rank {rank}", unit="series", leave=True, dynamic_ncols=True,
              disable=None if settings.progress else True) as bar:
        return _Rank(settings, rank, world, device, client).run(mine, bar, items)


# ------------------------------------------------------------------------------------------------ the job
@dataclass(frozen=True)
class _DeviceConfig:
    """What :func:`lib.engines.engine.setup_distributed` reads from a configuration."""

    device: str


def _plan_files_problem(folder: Path, plans: list[tuple[str, str]], rank: int) -> str:
    """After the first exchange of :func:`_start_together` (every rank has written its plan file): why this rank
    does not find each rank's plan file in the output folder as that rank wrote it in this job ("" when it does):
    the folder is not one folder shared by all machines. ``plans``: (digest, nonce) by rank, the nonce drawn afresh
    by each rank for this job, so that a file left in a machine's own folder by an earlier run with the same series
    list does not pass. The digests themselves were compared in memory. Never raises: a rank that raised here would
    skip the second exchange, which the other ranks then wait in."""
    for other, plan in enumerate(plans):
        path = folder / f"plan-rank-{other:05d}.sha256"
        try:
            theirs = path.read_text(encoding="utf-8").strip()
        except Exception as error:  # not only OSError: a file of other bytes raises UnicodeDecodeError
            return (f"rank {rank} cannot read {path} ({one_line(error) or type(error).__name__}): the --output "
                    "folder must be one folder shared by all machines (a network file system)")
        if theirs != _plan_text(*plan):  # a file left in a folder of this machine alone by an earlier run
            return (f"rank {rank} finds in {path} a plan that rank {other} did not write in this job (left by an "
                    "earlier run): the --output folder must be one folder shared by all machines (a network file "
                    "system)")
    return ""


def _plan_text(digest: str, nonce: str) -> str:
    """A rank's plan file: the digest of its series list and the nonce it drew for this job."""
    return f"{digest} {nonce}"


def _ranks_text(ranks: list[int]) -> str:
    """"rank 3", "ranks 0-7", "ranks 0, 2, 5": runs of consecutive ranks joined."""
    runs: list[list[int]] = []
    for rank in sorted(ranks):
        if runs and rank == runs[-1][-1] + 1:
            runs[-1].append(rank)
        else:
            runs.append([rank])
    text = ", ".join(f"{run[0]}-{run[-1]}" if len(run) > 2 else ", ".join(map(str, run)) for run in runs)
    return f"rank{'s' * (len(ranks) > 1)} {text}"


def _start_error_lines(errors: list[tuple[str, str, str]]) -> list[str]:
    """One line per error of the ranks that could not start (``errors``: (text, general, holder) by rank, ("", "",
    "") for a rank that could; ``general`` the text without what differs from rank to rank, ``holder`` that part):
    ranks whose errors are alike (the same ``general``) share one line: eight ranks that find the same PACS
    unreachable say it once. When their texts differ (each rank's lock held by another process, or host), the line
    says the general text and each rank's holder, not the lowest rank's for all."""
    groups: dict[str, list[int]] = {}
    for rank, (text, general, _) in enumerate(errors):
        if text:
            groups.setdefault(general or text, []).append(rank)
    lines = []
    for general, ranks in groups.items():
        if len({errors[rank][0] for rank in ranks}) == 1:
            lines.append(f"{_ranks_text(ranks)}: could not start: {errors[ranks[0]][0]}")
        else:
            holders = "; ".join(f"rank {rank}: {errors[rank][2]}" for rank in ranks)
            lines.append(f"{_ranks_text(ranks)}: could not start: {general} (holders: {holders})")
    return lines


def _report_lines(summary: BatchSummary) -> list[str]:
    """What the run says of ``summary``'s series beyond its counts: each failed one with its error, each derived
    series superseded on the PACS, each output left in another study's folder, and why the rank stopped."""
    lines = [f"failed: {key}: {error}" for key, error in summary.failures]
    lines += [f"superseded on the PACS: {superseded_sentence(key, entry)}" for key, entry in summary.superseded]
    lines += [f"left in another study's folder: {key}: {sentence}" for key, sentence in summary.left_outputs]
    lines += [f"rank {rank}: {sentence}" for rank, _, sentence in summary.incomplete]
    return lines + ([f"stopped: {summary.stopped}"] if summary.stopped else [])


def _merged_summary(parts: list[dict], seconds: float) -> BatchSummary:
    """The ranks' reports (:func:`_job`'s ``outcome``, gathered in rank order) added up, their lists (failures,
    superseded series, left outputs) joined in rank order; ``stopped`` names each rank that stopped and
    ``incomplete`` each rank whose summary is missing (it raised) or whose summary file was not written."""
    world = len(parts)
    total = BatchSummary(seconds=seconds, ranks=world)
    stopped = []
    for rank, outcome in enumerate(parts):
        if outcome["error"]:
            total.incomplete.append((rank, "failed", f"failed: {outcome['error']}; its series are not in these "
                                                     "counts (what it recorded is in the manifest, a rerun does the "
                                                     "rest)"))
        elif outcome["summary_file_error"]:
            total.incomplete.append((rank, "summary file", f"its summary file was not written "
                                                           f"({outcome['summary_file_error']}); its counts came over "
                                                           "the process group"))
        part = outcome["summary"]
        if part is None:
            continue
        total.done += part["done"]
        total.skipped += part["skipped"]
        total.failed += part["failed"]
        total.untried += part.get("untried", 0)
        for name in ("failures", "superseded", "left_outputs"):
            getattr(total, name).extend(tuple(pair) for pair in part.get(name, []))
        if part.get("stopped"):
            stopped.append(f"rank {rank}: {part['stopped']}" if world > 1 else part["stopped"])
    total.stopped = "; ".join(stopped)
    return total


def _say_error(line: str) -> None:
    print(f"error: {line}", file=sys.stderr, flush=True)


def run_batch(settings: BatchSettings, report: Callable[[str], None] = print,
              report_error: Callable[[str], None] = _say_error) -> tuple[BatchSummary, bool]:
    """The whole job on this process: one process, or one rank of a ``torchrun`` job. Returns (summary, main):
    on rank 0 the merged summary of all ranks (``main`` True; a rank that failed, rank 0 included, is in its
    ``incomplete``), elsewhere this rank's own (a rank that failed: an empty one; rank 0 reports it). ``report``
    takes the lines of the run, ``report_error`` why a torchrun job stopped before any work (every rank says it before
    any rank ends: see :func:`_start_together`).

    Raises:
        ValueError: bad source or output (before any work), CUDA asked for but absent.
        RuntimeError: another run is writing to the same output (:class:`~lib.batch.manifest.OutputInUse`), one
            process.
        JobNotStarted: under torchrun, a rank could not start (said on rank 0's stdout), the ranks do not see the same
            series or the output folder is not shared by all (checked before any work, the same on every rank).
    """
    from ..engines.engine import setup_distributed

    wall = time.perf_counter()
    context, device = setup_distributed(_DeviceConfig(settings.device), timeout=BATCH_TIMEOUT)
    import torch.distributed as dist

    try:
        outcome = _job(settings, context, device, report, report_error, wall)
    except JobNotStarted:
        # raised by every rank past the same barrier: the group is torn down as after a normal end (left to the
        # process's exit, Gloo's threads could abort it: "terminate called without an active exception", exit -6)
        if context.initialised_here:
            dist.destroy_process_group()
        raise
    if context.initialised_here:  # only after a normal end: see lib.engines.engine on tearing down after errors
        dist.destroy_process_group()
    return outcome


def _job(settings: BatchSettings, context, device, report: Callable[[str], None],
         report_error: Callable[[str], None], wall: float) -> tuple[BatchSummary, bool]:
    import torch.distributed as dist

    from ..pacs_corrections import without_credentials

    try:
        client = dicomweb.make_client(settings.source) if dicomweb.is_dicomweb_url(settings.source) else None
        items = plan_series(settings, client)
        manifest = Manifest(settings.output, context.rank, context.world)
        manifest.lock()  # before reading what earlier runs did: a run still going on is refused, not raced
        if context.distributed:
            plan = (_plan_digest(items), uuid.uuid4().hex)  # the nonce: this job's file, not an earlier run's
            atomic_write_text(manifest.folder / f"plan-rank-{context.rank:05d}.sha256", _plan_text(*plan))
    except Exception as error:
        if not context.distributed:
            raise
        text = one_line(error) or type(error).__name__
        start_error = ((text, error.general, error.holder) if isinstance(error, OutputInUse) else (text, text, ""))
        _start_together(context, report, report_error, start_error, ("", ""), None)
        raise  # not reached: _start_together raises
    if context.distributed:  # every rank has planned: nothing is written yet
        _start_together(context, report, report_error, ("", "", ""), plan, manifest.folder)
    # what this rank tells rank 0 at the end: with several ranks, an error of one rank is carried to the final
    # collective (every rank reaches it) instead of leaving the others waiting there for BATCH_TIMEOUT
    outcome = {"summary": None, "error": "", "summary_file_error": ""}
    try:
        if context.main:
            report(f"{len(items)} series found in {without_credentials(settings.source)}; "  # no password in the log
                   f"{context.world} process"
                   f"{'es' if context.world > 1 else ''} on {device.type}")
        own = run_rank(settings, items, context.rank, context.world, str(device), client)
        outcome["summary"] = asdict(own)
        if not context.distributed:  # before the summary file: a manifest folder that cannot be written stops there
            for line in _report_lines(own):
                report(line)
        try:  # for whoever reads the folder; rank 0 merges what the ranks send it at the end
            atomic_write_text(manifest.folder / f"summary-rank-{context.rank:05d}.json",
                              json.dumps(asdict(own), default=str))
        except OSError as error:
            if not context.distributed:
                raise
            outcome["summary_file_error"] = one_line(error) or type(error).__name__
            report(f"rank {context.rank}: error: its summary file was not written: {outcome['summary_file_error']}")
        if context.distributed:
            report(f"rank {context.rank}: {own.line()}")
    except Exception as error:
        if not context.distributed:
            raise
        outcome["error"] = one_line(error) or type(error).__name__
        report(f"rank {context.rank}: error: {outcome['error']}")
        failure = error
    else:
        failure = None
    if not context.distributed:
        manifest.merge()
        return _merged_summary([outcome], time.perf_counter() - wall), True
    parts = [None] * context.world if context.main else None
    # every rank's records are on disk; waits up to BATCH_TIMEOUT (ranks finish at different times), less when a
    # peer process is gone (Gloo: the closed connection; one machine: torchrun stops the others)
    dist.gather_object(outcome, parts, dst=0)
    if not context.main:
        # a failure of this rank was said above and went to rank 0, which says it and sets the job's exit status:
        # raised here, it would end this process with an error, and torchrun stops the other ranks (within 0.1 s)
        # when one does, rank 0 while it merges and reports
        if failure is not None:
            log.debug("rank %d failed", context.rank, exc_info=failure)
            return BatchSummary(ranks=1), False
        return own, False
    # rank 0's own failure too is one rank's (said, ``incomplete``, a non-zero exit): what every rank recorded, rank
    # 0's series before its error and the other ranks' finished ones, is merged all the same
    total = _merged_summary(parts, time.perf_counter() - wall)
    for line in _report_lines(total):
        report(line)
    manifest.merge()
    return total, True


class JobNotStarted(RuntimeError):
    """Under torchrun: the job stopped before any work, every rank alike (a rank could not start, the ranks planned
    different series lists, the output folder is not shared). Every rank has already said it on ``report_error``
    (:func:`_start_together`), before any rank ended: not to be said again."""


def _start_verdict(gathered: list[tuple[tuple[str, str, str], tuple[str, str]]], rank: int) -> tuple[list[str], str]:
    """What the first exchange of :func:`_start_together` decides, the same on every rank (``gathered``: (error,
    plan) by rank): (the lines rank 0 says of the ranks that could not start, the job's error as this ``rank``
    says it), or ([], "") when every rank could start and planned the same series list (the file check follows)."""
    errors = [error for error, _ in gathered]
    failed = [other for other, (text, _, _) in enumerate(errors) if text]
    if failed:  # the lines are on rank 0's stdout alone: another rank's log (another machine) points there
        where = "said on rank 0's stdout"
        return _start_error_lines(errors), (f"{len(failed)} of {len(gathered)} ranks could not start ({where}): no "
                                            "series was denoised; fix that and run again")
    digests = [digest for _, (digest, _) in gathered]
    other = next((other for other, digest in enumerate(digests) if digest != digests[0]), None)
    if other is not None:
        return [], (f"ranks 0 and {other} found different series lists (is the input the same on every machine, and "
                    "not changing?): nothing was denoised")
    return [], ""


def _start_together(context, report: Callable[[str], None], report_error: Callable[[str], None],
                    error: tuple[str, str, str], plan: tuple[str, str], folder: Path | None) -> None:
    """Instead of a barrier after planning: every rank tells the others whether it could plan, lock its manifest and
    write its plan file (``error``: (its one-line error, the same without what differs from rank to rank, that part:
    the lock's holder), ("", "", "") when it could) and its plan (the digest of its series list, the nonce it wrote
    in its plan file). Then, the same answer on every rank (:func:`_start_verdict`): a rank that could not start, two
    digests that differ, or (a second exchange) a rank that does not find every rank's plan file of this job in
    ``folder``, its manifest folder (not one folder shared by all machines), stops the job. Where a barrier left the
    others waiting for a rank that could not start until its process ended (Gloo's "Connection closed by peer",
    naming no rank) or, while it lingered, for :data:`BATCH_TIMEOUT`, and where each rank checked the plan files
    alone (a rank's mismatch was then a failed rank, the others working on), every rank now raises
    :class:`JobNotStarted` once every rank has said why on ``report_error`` (and rank 0 the lines of the ranks that
    could not start on ``report``; the other ranks' error points there): torchrun stops the other ranks within 0.1 s
    of one ending with an error.

    Raises:
        JobNotStarted: the job stops before any work.
    """
    import torch.distributed as dist

    text = error[0]
    if text and not context.main:  # its own log names its own error (rank 0's names every rank's), said at once:
        # should the exchange below break off (a peer gone), it is said all the same
        _say(report_error, f"rank {context.rank}: could not start: {text}")
    gathered: list = [None] * context.world
    dist.all_gather_object(gathered, (error, plan))
    lines, message = _start_verdict(gathered, context.rank)
    if not message:  # every rank wrote its plan file before the exchange above: each must read them all
        problems: list = [None] * context.world
        dist.all_gather_object(problems, _plan_files_problem(folder, [plan_ for _, plan_ in gathered], context.rank))
        message = next((problem for problem in problems if problem), "")
        if not message:
            return
    if context.main:
        for line in lines:
            report(line)
    # on every rank's log (another machine's log is all its user may read), before any rank ends: torchrun stops the
    # others within 0.1 s of one ending with an error
    _say(report_error, message)
    dist.barrier()
    raise JobNotStarted(message)


def _say(report_error: Callable[[str], None], message: str) -> None:
    """``report_error(message)``, where a log that cannot be written (a closed pipe, a full disk) must not keep this
    rank from the exchange or barrier that every other rank makes next."""
    try:
        report_error(message)
    except OSError:
        pass
