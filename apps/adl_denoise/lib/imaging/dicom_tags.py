"""Plain Python values out of DICOM element values, tolerant of absent or malformed elements (each helper
returns None or a default instead of raising)."""
from __future__ import annotations

import math
from typing import Any

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

__all__ = ["IDENTITY_KEYWORDS", "as_signed_stored", "first_number", "float_list", "float_or", "identity_conflict",
           "sequence_item", "str_or_empty"]

#: the tags that say whose images these are and where they lie: every slice of one volume must agree on them
IDENTITY_KEYWORDS = ("PatientID", "PatientName", "PatientBirthDate", "StudyInstanceUID", "FrameOfReferenceUID")


def float_list(value: Any, n: int) -> list[float] | None:
    """A DICOM multi-valued numeric element as n finite floats, or None when absent/malformed."""
    if value is None:
        return None
    try:
        values = [float(v) for v in (value if isinstance(value, (list, tuple, MultiValue)) else [value])]
    except (TypeError, ValueError):
        return None
    return values if len(values) == n and all(math.isfinite(v) for v in values) else None


def float_or(value: Any, default: float) -> float:
    """``float(value)``, or ``default`` when that fails or is not finite."""
    try:
        result = float(value)
    except (TypeError, ValueError):
        return default
    return result if math.isfinite(result) else default


def str_or_empty(value: Any) -> str:
    """The stripped text of a value, "" for None."""
    return "" if value is None else str(value).strip()


def first_number(value: Any) -> float | None:
    """First value of a possibly multi-valued DS (e.g. WindowCenter '40\\300'); NaN when not a number."""
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple, MultiValue)):
        value = value[0] if len(value) else None
    return float_or(value, float("nan")) if value is not None else None


def sequence_item(ds: Dataset, *keywords: str) -> Dataset | None:
    """ds.K1[0].K2[0]... or None."""
    item: Any = ds
    for keyword in keywords:
        seq = item.get(keyword) if item is not None else None
        if not seq:
            return None
        item = seq[0]
    return item


def as_signed_stored(value: Any, pixel_representation: int, bits: int) -> int | None:
    """PixelPaddingValue & co. as a stored integer; pydicom may hand us raw bytes or an unsigned reading of an
    ambiguous 'US or SS' element."""
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        if len(value) < 2:
            return None
        value = int.from_bytes(bytes(value[:2]), "little", signed=bool(pixel_representation))
    try:
        value = int(value)
    except (TypeError, ValueError):
        return None
    if pixel_representation == 1 and value >= 2 ** (bits - 1) and value < 2**bits:
        value -= 2**bits
    return value


def identity_conflict(headers: list[Dataset], names: list[str] | None = None) -> str | None:
    """Which identity tag (:data:`IDENTITY_KEYWORDS`) the ``headers`` of one volume disagree on, with the values and
    a file of each (``names``: one per header, e.g. file names), or None when they all agree. Two patients' or
    studies' slices in one volume are never merged: hard-anonymised series (empty SeriesInstanceUID) and series
    copied with the same UID fall into one group by SeriesInstanceUID alone."""
    names = names if names is not None else [f"slice {k + 1}" for k in range(len(headers))]
    for keyword in IDENTITY_KEYWORDS:
        first_seen: dict[str, str] = {}
        for header, name in zip(headers, names):
            first_seen.setdefault(str_or_empty(header.get(keyword)), name)
        if len(first_seen) > 1:
            shown = "; ".join(f"{value or '(empty)'!r} in {name}" for value, name in list(first_seen.items())[:4])
            more = f" and {len(first_seen) - 4} more values" if len(first_seen) > 4 else ""
            return f"{keyword} differs between slices ({shown}{more})"
    return None
