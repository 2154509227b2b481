"""Helpers shared by the app's routes: the running app and its tasks, and the server's file paths kept out of what
clients are told (:func:`scrub_paths` for every error; :func:`for_caller` for the answers that show them to admins
only)."""
from __future__ import annotations

import os
import re
from collections import deque
from typing import Any, Collection

from fastapi import HTTPException, Request

__all__ = ["app", "for_caller", "model_task", "scrub_paths", "sees_internals"]

# an absolute path in a message: a "/" not inside a word, a URL or a relative path, then anything up to a space,
# quote or bracket
_ABSOLUTE_PATH = re.compile(r"(?<![\w.~:/\-])/[^\s'\"`,;()\[\]{}<>]+")


def _file_name(match: re.Match) -> str:
    path = match.group(0)
    parts = path.split("/")
    # an API route (/infer/nlm, /datastore/label) is no file: only paths under a folder of the server's root go
    if len(parts) < 3 or not parts[1] or not os.path.isdir("/" + parts[1]):
        return path
    core = path.rstrip(".:")  # the sentence's punctuation stays
    return (os.path.basename(core.rstrip("/")) or "/") + path[len(core):]


def scrub_paths(text: str) -> str:
    """``text`` with each absolute file path of this server replaced by its last part (``corrupt.nii.gz``, a series
    UID): what a client is told never shows where the server keeps studies, weights or temporary files."""
    return _ABSOLUTE_PATH.sub(_file_name, text)


def sees_internals(request: Request) -> bool:
    """Whether the caller is shown the server's internals (its file paths and folders, process ids, task logs): an
    admin when MONAI Label's authentication is on; everyone when it is off (the single-user loopback demo, whose
    one user runs the server)."""
    from .access import ADMIN, auth_enabled, role_name

    if not auth_enabled():
        return True
    return role_name(ADMIN) in (getattr(request.state, "user_roles", None) or [])


def for_caller(request: Request, answer: Any, internal_keys: Collection[str] = ()) -> Any:
    """``answer`` as the caller may see it: unchanged for one who :func:`sees_internals`; for lower roles a copy
    without the ``internal_keys`` (wherever they stand: a file's ``path``, a run's ``work_dir``) and with every
    text's absolute server paths cut to their last part (:func:`scrub_paths`: a message that names a file)."""
    if sees_internals(request):
        return answer
    keys = frozenset(internal_keys)

    def cleaned(value: Any) -> Any:
        if isinstance(value, dict):
            return {key: cleaned(item) for key, item in value.items() if key not in keys}
        if isinstance(value, (list, tuple, deque)):
            return [cleaned(item) for item in value]
        if isinstance(value, str):
            return scrub_paths(value)
        return value

    return cleaned(answer)


def app():
    """The running MONAI Label app (the server builds it once)."""
    from monailabel.interfaces.utils.app import app_instance

    return app_instance()


def model_task(kind: str, model: str):
    """The infer (``kind="infer"``) or train task named ``model``; 404 naming the models served otherwise."""
    tasks = app()._infers if kind == "infer" else app()._trainers  # noqa: SLF001 - MONAI Label keeps them private
    if model not in tasks:
        known = ", ".join(sorted(tasks)) or "none"
        raise HTTPException(status_code=404, detail=f"unknown model {model!r} (this server has: {known})")
    return tasks[model]
