"""Routes of the model versions: served, previous and history of decisions; rollback.

``GET /versions/{model}`` names each file's ``path`` on the server to admins only (and to everyone with
authentication off): lower roles get the versions without it (:func:`.common.for_caller`).

The app's weights store is :class:`lib.audit.recording.AuditedModelStore`: a restore (and a publication by a
training run) is an entry of the audit log, with the user who asked; none happens while the log refuses entries.
"""
from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, HTTPException, Request

from .common import for_caller, model_task

__all__ = ["router"]

log = logging.getLogger(__name__)

router = APIRouter(prefix="/versions", tags=["Model versions"])


def _store_and_modality(model: str, modality: str):
    task = model_task("infer", model)
    modality = modality.upper()
    if modality not in task.modalities:
        raise HTTPException(status_code=422, detail=f"{model} serves {', '.join(task.modalities)}, not {modality!r}")
    return task.store, modality


@router.get("/{model}", summary="Weights versions of a model: served, previous, history of decisions")
def api_versions(request: Request, model: str, modality: str = "ct") -> dict[str, Any]:
    store, modality = _store_and_modality(model, modality)
    served = store.served(model, modality)
    return for_caller(request, {"model": model, "modality": modality, "served": served.to_dict() if served else None,
                                "versions": store.versions(model, modality),
                                "history": store.history(model, modality)}, internal_keys=("path",))


@router.post("/{model}/restore", summary="Serve an earlier weights version again (rollback)")
def api_restore(model: str, version: str, modality: str = "ct") -> dict[str, Any]:
    from ..audit import AuditError
    from .review import audit_http_error

    store, modality = _store_and_modality(model, modality)
    try:
        served = store.restore(model, modality, version)  # an audited store: the restore is an audit entry
    except KeyError as error:
        raise HTTPException(status_code=404, detail=str(error).strip("'\"")) from None
    except AuditError as error:
        raise audit_http_error(error, f"{model} {modality}: version {version!r} was not restored") from None
    except OSError as error:  # a weights folder the server cannot write (a warning at start-up): not a bare 500
        raise HTTPException(status_code=500, detail=f"{model} {modality}: version {version!r} was not restored: "
                                                    f"the weights folder cannot be written ({error})") from None
    log.info("%s %s: restored version %s", model, modality, version)
    return {"model": model, "modality": modality, "served": served.to_dict() if served else None}

