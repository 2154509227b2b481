"""HTTP routes the app adds to MONAI Label's server: review verdicts, model versions and rollback, and guards
that turn bad requests into 4xx answers before MONAI Label's own handlers (which answer 500) see them.

MONAI Label has no hook for app routes, so :func:`install` adds them to the running FastAPI application
(``monailabel.app.app``) when the app starts inside the server; the guards are placed in front of the stock
``POST /infer/{model}``, ``POST /train/{model}`` and ``PUT /datastore/label`` routes and hand valid requests on to
the stock functions. The label guard checks a region map (tag ``regions``, :mod:`lib.data.regions`) against its
image and its ``params`` declaration before MONAI Label stores it (the stock route keeps ``params`` as the label's
info); other tags pass unchanged.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

from fastapi import APIRouter, BackgroundTasks, Body, Depends, File, Form, HTTPException, UploadFile
from monailabel.config import settings as _settings
from monailabel.endpoints.user.auth import RBAC, User

log = logging.getLogger(__name__)

__all__ = ["install"]


def _app():
    from monailabel.interfaces.utils.app import app_instance

    return app_instance()


def _model_task(kind: str, model: str):
    app = _app()
    tasks = app._infers if kind == "infer" else app._trainers  # noqa: SLF001 - MONAI Label keeps them private
    if model not in tasks:
        known = ", ".join(sorted(tasks)) or "none"
        raise HTTPException(status_code=404, detail=f"unknown model {model!r} (this server has: {known})")
    return tasks[model]


# ----------------------------------------------------------------------------------------------- guards
guards = APIRouter()


@guards.post("/infer/{model}", include_in_schema=False)
def guarded_infer(
    background_tasks: BackgroundTasks,
    model: str,
    image: str = "",
    session_id: str = "",
    params: str = Form("{}"),
    file: UploadFile = File(None),
    label: UploadFile = File(None),
    output: Optional[str] = None,
):
    from monailabel.endpoints.infer import ResultType, run_inference

    from .activelearning import has_image

    _model_task("infer", model)
    if not file and not image and not session_id:
        raise HTTPException(status_code=422, detail="give an image: a datastore id, a session id or an uploaded file")
    if output is not None and output not in ("image", "json", "all"):
        raise HTTPException(status_code=422, detail=f"output must be image, json or all, got {output!r}")
    app = _app()
    if session_id and not file and not image and app.sessions() is not None:
        if app.sessions().get_session(session_id) is None:
            raise HTTPException(status_code=404, detail=f"no session {session_id!r} (expired or never created)")
    if image and not file and not session_id and not has_image(app.datastore(), image):
        raise HTTPException(status_code=404, detail=f"no image {image!r} in the datastore")
    try:
        json.loads(params or "{}")
    except ValueError:
        raise HTTPException(status_code=422, detail="params must be a JSON object") from None
    return run_inference(background_tasks, model, image, session_id, params, file, label,
                         ResultType(output) if output else None)


@guards.post("/train/{model}", include_in_schema=False)
def guarded_train(model: str, params: Optional[dict] = None, run_sync: Optional[bool] = False,
                  enqueue: Optional[bool] = False):
    from monailabel.endpoints.train import run_model

    from .trainers import TrainingDataError

    task = _model_task("train", model)
    try:
        task.validate_request(dict(params or {}), _app().datastore())
    except TrainingDataError as error:
        raise HTTPException(status_code=422, detail=str(error)) from None
    return run_model(model, params, run_sync, enqueue)


@guards.put("/datastore/label", include_in_schema=False)
def guarded_save_label(
    background_tasks: BackgroundTasks,
    image: str,
    params: str = Form("{}"),
    tag: str = "final",
    label: UploadFile = File(...),
    user: User = Depends(RBAC(_settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR)),
):
    """MONAI Label's save-label route; a ``regions`` label is validated first (422 naming the image and the
    problem: not on the image's grid, undeclared values, unknown intent, strength outside [0, 2])."""
    from monailabel.endpoints.datastore import save_label

    from .activelearning import has_image
    from .data.regions import REGIONS_TAG, RegionsError, load_correction_regions

    if tag == REGIONS_TAG:
        datastore = _app().datastore()
        if not has_image(datastore, image):
            raise HTTPException(status_code=404, detail=f"no image {image!r} in the datastore")
        suffix = "".join(Path(label.filename or "regions.nii.gz").suffixes) or ".nii.gz"
        with tempfile.TemporaryDirectory() as folder:
            uploaded = Path(folder) / f"regions{suffix}"
            with open(uploaded, "wb") as handle:
                shutil.copyfileobj(label.file, handle)
            try:
                load_correction_regions(image, datastore.get_image_uri(image), uploaded, params)
            except RegionsError as error:
                raise HTTPException(status_code=422, detail=str(error)) from None
        label.file.seek(0)
    return save_label(background_tasks, image, params, tag, label, user.username)


# ----------------------------------------------------------------------------------------------- review
review = APIRouter(prefix="/review", tags=["Review"])


@review.get("/", summary="Audit trail: every study's verdict, review history and the results produced")
def api_audit() -> list:
    from .activelearning import audit_trail

    return audit_trail(_app().datastore())


@review.get("/{image_id}", summary="One study's verdict, review history and results")
def api_audit_one(image_id: str) -> dict:
    from .activelearning import audit_trail, has_image

    datastore = _app().datastore()
    if not has_image(datastore, image_id):
        raise HTTPException(status_code=404, detail=f"no image {image_id!r} in the datastore")
    return audit_trail(datastore, image_id)[0]


@review.post("/{image_id}", summary="Record a verdict: accepted, corrected, rejected (with a reason) or unreviewed")
def api_review(image_id: str, body: dict = Body(...)) -> dict:
    from .activelearning import record_verdict

    try:
        return record_verdict(_app().datastore(), image_id, body.get("verdict"), body.get("reviewer"),
                              body.get("reason"), body.get("model"))
    except KeyError as error:
        raise HTTPException(status_code=404, detail=str(error).strip("'\"")) from None
    except ValueError as error:
        raise HTTPException(status_code=422, detail=str(error)) from None


# ----------------------------------------------------------------------------------------------- versions
versions = APIRouter(prefix="/versions", tags=["Model versions"])


def _store_and_modality(model: str, modality: str):
    task = _model_task("infer", model)
    modality = modality.upper()
    if modality not in task.modalities:
        raise HTTPException(status_code=422, detail=f"{model} serves {', '.join(task.modalities)}, not {modality!r}")
    return task.store, modality


@versions.get("/{model}", summary="Weights versions of a model: served, previous, history of decisions")
def api_versions(model: str, modality: str = "ct") -> dict[str, Any]:
    store, modality = _store_and_modality(model, modality)
    served = store.served(model, modality)
    return {"model": model, "modality": modality, "served": served.to_dict() if served else None,
            "versions": store.versions(model, modality), "history": store.history(model, modality)}


@versions.post("/{model}/restore", summary="Serve an earlier weights version again (rollback)")
def api_restore(model: str, version: str, modality: str = "ct") -> dict[str, Any]:
    store, modality = _store_and_modality(model, modality)
    try:
        served = store.restore(model, modality, version)
    except KeyError as error:
        raise HTTPException(status_code=404, detail=str(error).strip("'\"")) from None
    log.info("%s %s: restored version %s", model, modality, version)
    return {"model": model, "modality": modality, "served": served.to_dict() if served else None}


def install(fastapi_app) -> None:
    """Add the routes to the server's FastAPI application; guards go in front of the stock routes."""
    from monailabel.config import settings

    prefix = settings.MONAI_LABEL_API_STR
    if getattr(fastapi_app.state, "adl_denoise_routes", False):
        return
    for router in (review, versions):
        fastapi_app.include_router(router, prefix=prefix)
    routes = fastapi_app.router.routes
    before = len(routes)
    fastapi_app.include_router(guards, prefix=prefix)
    # whatever include_router added (routes, or one included-router entry in recent FastAPI) goes first, so the
    # guards see POST /infer/{model}, /train/{model} and PUT /datastore/label before the stock handlers
    added = routes[before:]
    del routes[before:]
    routes[0:0] = added
    fastapi_app.state.adl_denoise_routes = True
    log.info("installed review, versions and request-guard routes (pid %d)", os.getpid())
