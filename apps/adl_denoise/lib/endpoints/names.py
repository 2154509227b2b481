"""Plain names for what a client may name on the server: image ids, label tags, session ids.

MONAI Label joins these with its folders (``os.path.join(images, id + ext)``, ``os.path.join(labels, tag)``,
``os.path.join(sessions, session_id)``), so a ``..`` or an absolute path reaches files outside the datastore.
A plain name here is 1 to :data:`MAX_NAME_LENGTH` characters of ``A-Z a-z 0-9 _ - . +``, not starting with a dot
or a dash, without ``..``: a name that passes stays a single path component inside its folder. Anything else
is an HTTP 422 naming the parameter and the reason.
"""
from __future__ import annotations

import os
import re

from fastapi import HTTPException

__all__ = ["MAX_NAME_LENGTH", "check_name", "name_problem"]

# 128 characters: a DICOM UID is at most 64, a content hash 64 hex digits; room for a prefix
MAX_NAME_LENGTH = 128
_PLAIN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+\-]*$")


def name_problem(value: object) -> str | None:
    """Why ``value`` is not a plain name (one phrase), or None when it is one."""
    if not isinstance(value, str):
        return f"must be a text name, got {type(value).__name__}"
    if not value:
        return "is empty"
    if len(value) > MAX_NAME_LENGTH:
        return f"is {len(value)} characters long (at most {MAX_NAME_LENGTH})"
    if "\x00" in value:
        return "holds a NUL character"
    if "/" in value or "\\" in value:
        return "holds a path separator ('/' or '\\'): give a plain name, not a path"
    if ".." in value:
        return "holds '..': give a plain name, not a path"
    if value.startswith("."):
        return "starts with a dot (hidden files are not names)"
    if os.path.isabs(value) or re.match(r"^[A-Za-z]:", value):
        return "is an absolute path: give a plain name"
    if not _PLAIN.match(value):
        bad = sorted({c for c in value if not re.match(r"[A-Za-z0-9_.+\-]", c)})
        shown = ", ".join(repr(c) for c in bad) if bad else "its first character"
        return f"holds characters not allowed in a name ({shown}); use letters, digits, '_', '-', '.', '+'"
    return None


def check_name(value: object, parameter: str) -> str:
    """``value`` when it is a plain name; else HTTP 422 ``"<parameter> <value>: <why>"``."""
    problem = name_problem(value)
    if problem is not None:
        shown = repr(value) if not isinstance(value, str) or len(value) <= 80 else repr(value[:80] + "...")
        raise HTTPException(status_code=422, detail=f"{parameter} {shown} {problem}")
    return value  # type: ignore[return-value]

