"""Helpers shared by the app's routes: the running app and its tasks."""
from __future__ import annotations

from fastapi import HTTPException

__all__ = ["app", "model_task"]


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
