"""Helpers shared by the app's routes: the running app and its tasks, and the server's file paths kept out of what
clients are told."""
from __future__ import annotations

import os
import re

from fastapi import HTTPException

__all__ = ["app", "model_task", "scrub_paths"]

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
