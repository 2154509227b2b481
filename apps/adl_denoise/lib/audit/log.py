"""An append-only, tamper-evident audit log: JSON lines chained by SHA-256.

One line per event, written once and never rewritten, trimmed or reordered::

    {"event": "result", "fields": {...}, "hash": "<sha256>", "prev": "<hash of the line before>", "seq": 7,
     "time_utc": "2026-12-04T05:01:02.123456+00:00"}

``hash`` is the SHA-256 of the entry's canonical JSON (:func:`canonical_json`: sorted keys, no spaces, UTF-8,
no NaN) without its ``hash`` key; ``prev`` is the hash of the entry before (64 zeros for the first); ``seq`` counts
from 0. Editing a field, deleting or reordering lines, or a line cut short breaks the chain at that line:
:meth:`AuditLog.verify` walks it and names the first broken entry. Lines removed from the END leave a valid
chain, so the head (last ``seq`` and ``hash``) is also kept in a second file, ``<log>.head``, and a log shorter
than its head is reported too.

Appending takes a thread lock and an exclusive ``fcntl`` lock on the log file (other processes, e.g. a training
subprocess, append to the same file safely), reads the last line to chain onto it (checking that line's own hash),
writes the new line with one ``write`` on an ``O_APPEND`` descriptor, then ``flush`` + ``fsync``. Any failure
raises :class:`AuditWriteError`: callers fail their request rather than act without a record. After a failed
verification the log refuses appends (:class:`AuditBrokenError`) until an administrator has dealt with it.

Science-free and server-free: the standard library only (plus the project's atomic file write for the head).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import threading
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from ..runtime.atomic import atomic_write_text

__all__ = ["AuditLog", "AuditError", "AuditWriteError", "AuditReadError", "AuditBrokenError", "Verification",
           "GENESIS", "LOG_NAME", "canonical_json", "entry_hash", "sanitise"]

GENESIS = "0" * 64  # ``prev`` of the first entry
LOG_NAME = "audit.jsonl"
MAX_TEXT = 4000  # characters kept of any one text value in an entry (longer ones are cut, saying so)
_ENTRY_KEYS = ("event", "fields", "hash", "prev", "seq", "time_utc")


class AuditError(RuntimeError):
    """Base of the audit log's errors."""


class AuditWriteError(AuditError):
    """An entry could not be written (disk, permissions, a damaged last line): nothing was recorded."""


class AuditReadError(AuditError):
    """The log could not be read."""


class AuditBrokenError(AuditError):
    """The chain failed its verification: the log refuses new entries."""


def sanitise(value: Any, depth: int = 0) -> Any:
    """``value`` as plain JSON: dicts with text keys, lists, text cut to :data:`MAX_TEXT` characters, finite
    numbers (NaN / inf as text), anything else as its ``str``; nesting deeper than 6 levels as text."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, str):
        return value if len(value) <= MAX_TEXT else value[:MAX_TEXT] + f"...[{len(value) - MAX_TEXT} more characters]"
    if depth >= 6:
        return sanitise(str(value), depth)
    if isinstance(value, dict):
        return {str(k): sanitise(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [sanitise(v, depth + 1) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        try:
            return sanitise(value.item(), depth)
        except (TypeError, ValueError):
            pass
    return sanitise(str(value), depth)


def canonical_json(value: Any) -> bytes:
    """The bytes that are hashed: sorted keys, no whitespace, UTF-8, NaN refused."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def entry_hash(entry: dict) -> str:
    """SHA-256 (hex) of an entry's canonical JSON without its ``hash`` key."""
    return hashlib.sha256(canonical_json({k: v for k, v in entry.items() if k != "hash"})).hexdigest()


@dataclass
class Verification:
    """What :meth:`AuditLog.verify` found. ``ok``: the whole chain holds; ``entries``: intact entries before the
    first problem; ``broken_line`` (1-based line of the file) and ``broken_seq`` (the ``seq`` expected there) name
    the first broken entry, ``problem`` says what is wrong with it."""

    ok: bool
    path: str
    entries: int
    head_seq: Optional[int] = None
    head_hash: Optional[str] = None
    broken_line: Optional[int] = None
    broken_seq: Optional[int] = None
    problem: Optional[str] = None
    warnings: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        if self.ok:
            return f"audit log {self.path}: {self.entries} entries, chain intact"
        return (f"audit log {self.path} is BROKEN at line {self.broken_line} (entry {self.broken_seq}): "
                f"{self.problem}; {self.entries} entries before it are intact")


class AuditLog:
    """The log file ``<folder>/audit.jsonl`` (created with its folder on the first append) and its head file."""

    def __init__(self, folder: str | os.PathLike, clock: Callable[[], datetime] | None = None) -> None:
        self.folder = Path(folder).expanduser()
        self.path = self.folder / LOG_NAME
        self.head_path = self.folder / (LOG_NAME + ".head")
        self._clock = clock or (lambda: datetime.now(timezone.utc))
        self._lock = threading.Lock()
        self._broken: Optional[Verification] = None

    # ------------------------------------------------------------------------------------------ state
    @property
    def broken(self) -> Optional[Verification]:
        """The failed verification that made the log refuse appends, or None."""
        return self._broken

    def refuse_appends(self, verification: Verification) -> None:
        """From now on, :meth:`append` raises :class:`AuditBrokenError` naming ``verification``'s problem."""
        self._broken = verification

    def check_writable(self) -> None:
        """Raise :class:`AuditBrokenError` when appends are refused (to fail a request before doing its work)."""
        if self._broken is not None:
            raise AuditBrokenError(f"the audit trail is broken, nothing can be recorded: {self._broken.summary()}")

    def check_appendable(self) -> None:
        """Raise what :meth:`append` would (:class:`AuditBrokenError`, :class:`AuditWriteError`) for a log that
        refuses entries, a log file that cannot be opened for appending, or a damaged last line; writes nothing.
        A cheap refusal before a request's work: the append after the work still decides."""
        self.check_writable()
        if not self.path.exists():  # the first append creates it (and its folder)
            return
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        except OSError as error:
            raise AuditWriteError(f"cannot open the audit log {self.path}: {error}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)  # no append half-seen
            self._tail()
        except OSError as error:
            raise AuditWriteError(f"cannot read the audit log {self.path}: {error}") from None
        finally:
            os.close(fd)

    # ------------------------------------------------------------------------------------------ writing
    def append(self, event: str, fields: dict | None = None) -> dict:
        """Write one entry (``event``: a short name such as ``result``; ``fields``: JSON-able, see
        :func:`sanitise`) chained onto the last line; returns it (with ``seq`` and ``hash``). Durable when this
        returns (fsync). :class:`AuditWriteError` / :class:`AuditBrokenError` when nothing was written."""
        self.check_writable()
        if not isinstance(event, str) or not event:
            raise ValueError("an audit event needs a name")
        body = sanitise(dict(fields or {}))
        with self._lock:
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            except OSError as error:
                raise AuditWriteError(f"cannot open the audit log {self.path}: {error}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)  # other processes append to the same file
                seq, prev = self._tail()
                entry = {"seq": seq, "time_utc": self._clock().isoformat(timespec="microseconds"), "event": event,
                         "fields": body, "prev": prev}
                entry["hash"] = entry_hash(entry)
                line = canonical_json(entry) + b"\n"
                written = os.write(fd, line)
                if written != len(line):
                    raise AuditWriteError(f"the audit log {self.path} took {written} of {len(line)} bytes")
                os.fsync(fd)
                self._write_head(entry)
            except AuditError:
                raise
            except (OSError, ValueError) as error:
                raise AuditWriteError(f"cannot write the audit log {self.path}: {error}") from None
            finally:
                os.close(fd)  # closing releases the flock
        return entry

    def _tail(self) -> tuple[int, str]:
        """(``seq`` and ``prev`` of the next entry) from the file's last line, which must be a whole entry whose
        hash holds (the chain is never extended from a damaged line)."""
        with open(self.path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            if size == 0:
                return 0, GENESIS
            block, data = 4096, b""
            while True:
                start = max(0, size - block)
                handle.seek(start)
                data = handle.read(size - start)
                if data.rstrip(b"\n").count(b"\n") >= 1 or start == 0:
                    break
                block *= 4
        if not data.endswith(b"\n"):
            raise AuditWriteError(f"the audit log {self.path} ends with a partial line: run the verification")
        last = data.rstrip(b"\n").rsplit(b"\n", 1)[-1]
        try:
            entry = json.loads(last)
        except ValueError:
            raise AuditWriteError(f"the last line of the audit log {self.path} is not JSON") from None
        if (not isinstance(entry, dict) or not isinstance(entry.get("seq"), int)
                or entry.get("hash") != entry_hash(entry)):
            raise AuditWriteError(f"the last entry of the audit log {self.path} fails its hash check")
        return entry["seq"] + 1, entry["hash"]

    def _write_head(self, entry: dict) -> None:
        atomic_write_text(self.head_path, json.dumps({"seq": entry["seq"], "hash": entry["hash"]}))

    # ------------------------------------------------------------------------------------------ reading
    @contextmanager
    def _shared_lock(self) -> Iterator[None]:
        """A shared ``fcntl`` lock on the log while reading: no append (exclusive lock) is half-seen, and the log
        and its head file are read at the same point of the chain."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:  # no log yet (or not a file): nothing to keep still
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)

    def _lines(self) -> Iterator[tuple[int, bytes]]:
        if not self.path.exists():
            return
        try:
            handle = open(self.path, "rb")
        except OSError as error:
            raise AuditReadError(f"cannot read the audit log {self.path}: {error}") from None
        with handle:
            for number, line in enumerate(handle, start=1):
                yield number, line

    def verify(self) -> Verification:
        """Walk the chain from the first line: each line a whole JSON entry with exactly the entry keys,
        ``seq`` counting from 0, ``prev`` the hash of the line before, ``hash`` its own; then the head file.
        Reports the first broken entry (see :class:`Verification`)."""
        result = Verification(ok=True, path=str(self.path), entries=0)
        if self.path.exists() and not self.path.is_file():
            return self._broken_at(result, 1, 0, f"{self.path} is not a file")
        with self._shared_lock():
            return self._walk(result)

    def _walk(self, result: Verification) -> Verification:
        prev, seq = GENESIS, 0
        try:
            for number, raw in self._lines():
                if not raw.endswith(b"\n"):
                    return self._broken_at(result, number, seq, "the line is cut short (no line end): a partial "
                                                                "or truncated write")
                try:
                    entry = json.loads(raw)
                except ValueError:
                    return self._broken_at(result, number, seq, "the line is not JSON (edited or truncated)")
                if not isinstance(entry, dict) or sorted(entry) != sorted(_ENTRY_KEYS):
                    return self._broken_at(result, number, seq, "the line is not an audit entry (keys differ)")
                if entry["hash"] != entry_hash(entry):
                    return self._broken_at(result, number, seq, "its content does not match its hash (edited)")
                if entry["seq"] != seq:
                    return self._broken_at(result, number, seq, f"its seq is {entry['seq']!r}, expected {seq} "
                                                                "(entries deleted, inserted or reordered)")
                if entry["prev"] != prev:
                    return self._broken_at(result, number, seq, "its prev hash is not the hash of the entry before "
                                                                "(entries deleted, inserted or reordered)")
                prev, seq = entry["hash"], seq + 1
                result.entries, result.head_seq, result.head_hash = seq, entry["seq"], entry["hash"]
        except (OSError, AuditReadError) as error:
            return self._broken_at(result, result.entries + 1, seq, f"cannot read the log: {error}")
        return self._check_head(result)

    def _check_head(self, result: Verification) -> Verification:
        if not self.head_path.exists():
            if result.entries:
                result.warnings.append(f"no head file {self.head_path.name}: removal of the last entries cannot be "
                                       "detected")
            return result
        try:
            head = json.loads(self.head_path.read_text(encoding="utf-8"))
            head_seq, head_hash = int(head["seq"]), str(head["hash"])
        except (OSError, ValueError, KeyError, TypeError):
            result.warnings.append(f"the head file {self.head_path.name} is unreadable")
            return result
        last = result.entries - 1
        if head_seq > last:
            return self._broken_at(result, result.entries + 1, result.entries,
                                   f"the log ends at entry {last} but its head file says entry {head_seq} was "
                                   "written: entries were removed from the end")
        if head_seq == last and head_hash != result.head_hash:
            return self._broken_at(result, result.entries, last, "the last entry's hash differs from the head file's")
        if head_seq < last:  # an append whose head update did not happen (process killed between the two)
            result.warnings.append(f"the head file names entry {head_seq}, the log continues to {last}")
        return result

    @staticmethod
    def _broken_at(result: Verification, line: int, seq: int, problem: str) -> Verification:
        result.ok, result.broken_line, result.broken_seq, result.problem = False, line, seq, problem
        return result

    def entries(self, event: str | None = None, where: Callable[[dict], bool] | None = None,
                since: int = 0, limit: int | None = None) -> list[dict]:
        """Entries (``seq`` >= ``since``) in order, optionally of one ``event`` and passing ``where(entry)``;
        at most ``limit`` (the first ones). Lines that are not JSON are skipped (:meth:`verify` reports them)."""
        with self._shared_lock():
            return self._select(event, where, since, limit)

    def _select(self, event, where, since: int, limit: int | None) -> list[dict]:
        out: list[dict] = []
        for _, raw in self._lines():
            try:
                entry = json.loads(raw)
            except ValueError:
                continue
            if not isinstance(entry, dict) or not isinstance(entry.get("seq"), int) or entry["seq"] < since:
                continue
            if event is not None and entry.get("event") != event:
                continue
            if where is not None and not where(entry):
                continue
            out.append(entry)
            if limit is not None and len(out) >= limit:
                break
        return out
