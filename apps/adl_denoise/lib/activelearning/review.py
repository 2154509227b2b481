"""Radiologist review of denoised studies: verdicts with reviewer and time, an audit trail, a queue.

Everything lives in the datastore's per-image info (MONAI Label keeps it in ``datastore_v2.json`` next to the
studies), so it survives restarts and travels with the studies:

* ``denoise_results``: one entry per result produced for the image (model, modality, weights version, time).
* ``review``: the current verdict, ``review_history``: every verdict ever given, oldest first. A verdict names
  the result it judges (model and weights version of the latest result), so the audit trail says which
  weights produced what a radiologist accepted or rejected.
"""
from __future__ import annotations

import threading
from typing import Any

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.strategy import Strategy

from ..runtime.clock import utc_timestamp

__all__ = ["VERDICTS", "NextUnreviewed", "has_image", "record_result", "record_verdict", "review_of", "audit_trail"]

VERDICTS = ("unreviewed", "accepted", "corrected", "rejected")
MAX_RESULTS_KEPT = 50  # per image; the review history itself is never truncated

_lock = threading.Lock()  # read-modify-write of an image's info from concurrent requests


def has_image(datastore: Datastore, image_id: str) -> bool:
    """Whether ``image_id`` names an image of the datastore."""
    return image_id in datastore.list_images()


def record_result(datastore: Datastore, image_id: str, result: dict) -> dict:
    """Note that ``result`` (the infer task's JSON) was produced for ``image_id``."""
    entry = {"time_utc": utc_timestamp(), **{k: result.get(k) for k in ("model", "modality", "weights_version",
                                                                 "weights_sha256", "device", "seconds")}}
    with _lock:
        info = datastore.get_image_info(image_id) or {}
        results = list(info.get("denoise_results") or [])[-(MAX_RESULTS_KEPT - 1):] + [entry]
        datastore.update_image_info(image_id, {"denoise_results": results})
    return entry


def record_verdict(datastore: Datastore, image_id: str, verdict: str, reviewer: str, reason: str | None = None,
                   model: str | None = None) -> dict:
    """Store a verdict. ``rejected`` needs a reason; ``model`` picks which model's latest result is judged
    (default: the latest result of any model). Raises ValueError / KeyError on bad input."""
    verdict = str(verdict or "").strip().lower()
    if verdict not in VERDICTS:
        raise ValueError(f"verdict must be one of {', '.join(VERDICTS)}, got {verdict!r}")
    reviewer = str(reviewer or "").strip()
    if not reviewer:
        raise ValueError("a verdict needs the reviewer's name")
    if verdict == "rejected" and not (reason and str(reason).strip()):
        raise ValueError("a rejection needs a reason")
    if not has_image(datastore, image_id):
        raise KeyError(f"no image {image_id!r} in the datastore")
    with _lock:
        info = datastore.get_image_info(image_id) or {}
        results = [r for r in (info.get("denoise_results") or []) if model is None or r.get("model") == model]
        judged = results[-1] if results else None
        entry = {"verdict": verdict, "reviewer": reviewer, "reason": (str(reason).strip() if reason else None),
                 "time_utc": utc_timestamp(), "result": judged}
        history = list(info.get("review_history") or []) + [entry]
        datastore.update_image_info(image_id, {"review": entry, "review_history": history})
    return entry


def review_of(info: dict) -> dict:
    """The current review of an image's info (``unreviewed`` when it has none)."""
    return info.get("review") or {"verdict": "unreviewed"}


def audit_trail(datastore: Datastore, image_id: str | None = None) -> list[dict]:
    """Per image: id, current verdict, full review history and the results produced (optionally one image)."""
    ids = sorted(datastore.list_images()) if image_id is None else [image_id]
    out = []
    for i in ids:
        info = datastore.get_image_info(i) or {}
        out.append({"image": i, "review": review_of(info), "review_history": info.get("review_history") or [],
                    "denoise_results": info.get("denoise_results") or []})
    return out


class NextUnreviewed(Strategy):
    """Active learning for review: the next study nobody has given a verdict yet (by id, so the queue is
    stable and shared by reviewers). Request keys: ``exclude`` (ids to skip, e.g. studies open elsewhere),
    ``modality`` (ct | mr, only studies of that modality when known)."""

    def __init__(self) -> None:
        super().__init__("Next study without a review verdict (radiologist review queue)")

    def __call__(self, request: dict, datastore: Datastore) -> dict[str, Any] | None:
        exclude = set(request.get("exclude") or [])
        modality = str(request.get("modality") or "").upper()
        unreviewed = []  # (id, info), read once for the choice and the count
        for image_id in sorted(datastore.list_images()):
            info = datastore.get_image_info(image_id) or {}
            if review_of(info)["verdict"] == "unreviewed":
                unreviewed.append((image_id, info))
        for image_id, info in unreviewed:
            if image_id in exclude:
                continue
            if modality in ("CT", "MR") and info.get("modality") not in (None, modality):
                continue
            return {"id": image_id, "remaining_unreviewed": len(unreviewed)}
        return None
