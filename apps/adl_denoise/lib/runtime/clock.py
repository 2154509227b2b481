"""Time stamps and elapsed time, in one place: UTC for every record written (audit trail, training records,
weights versions) and a monotonic stopwatch for durations."""
from __future__ import annotations

import datetime as _dt
import time

__all__ = ["utc_now", "utc_timestamp", "utc_compact_stamp", "Stopwatch"]


def utc_now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def utc_timestamp() -> str:
    """ISO 8601 to the second with its offset, e.g. ``2026-12-03T08:01:02+00:00`` (records, audit notes)."""
    return utc_now().isoformat(timespec="seconds")


def utc_compact_stamp(microseconds: bool = False) -> str:
    """``20261203T080102`` (``20261203T080102.123456Z`` with microseconds): sortable, safe in file names."""
    now = utc_now()
    return now.strftime("%Y%m%dT%H%M%S.%fZ") if microseconds else now.strftime("%Y%m%dT%H%M%S")


class Stopwatch:
    """Seconds since construction (or the last :meth:`restart`), from the monotonic performance counter."""

    def __init__(self) -> None:
        self.started = time.perf_counter()

    def restart(self) -> None:
        self.started = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started
