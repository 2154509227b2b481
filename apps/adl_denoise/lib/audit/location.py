"""Where a datastore's durable state lives on the server: its audit log when ``--conf audit_dir`` does not say, and a
DICOMweb datastore's corrections (labels saved on the server, never sent to the PACS)."""
from __future__ import annotations

import hashlib
import os

__all__ = ["default_audit_dir", "dicomweb_folder_name", "default_corrections_dir"]


def default_audit_dir(studies: str, model_dir: str) -> str:
    """``<studies>/.audit`` for a local datastore: a hidden folder, which MONAI Label's local datastore neither
    lists nor serves (it lists only files matching its image extensions at the top of the studies folder, and the
    app's routes refuse names starting with a dot), so each datastore has its own log. For a DICOMweb datastore
    (``studies`` is a URL; its local folder is only a cache): ``<model_dir>/audit/dicomweb-<first 16 hex of the
    SHA-256 of the URL without its trailing slash>``."""
    if studies.startswith(("http://", "https://")):
        return os.path.join(model_dir, "audit", dicomweb_folder_name(studies))
    return os.path.join(os.path.abspath(studies), ".audit")


def dicomweb_folder_name(studies: str) -> str:
    """``dicomweb-<first 16 hex of the SHA-256 of the URL without its trailing slash>``: the folder name of a
    DICOMweb datastore's state under the weights folder (one per PACS URL)."""
    return f"dicomweb-{hashlib.sha256(studies.rstrip('/').strip().encode()).hexdigest()[:16]}"


def default_corrections_dir(studies: str, model_dir: str) -> str:
    """``<model_dir>/corrections/dicomweb-<hash of the URL>`` (beside the audit log's ``<model_dir>/audit/...``): where
    a DICOMweb datastore's corrections and region maps are kept (:mod:`lib.pacs_corrections`). A local datastore keeps
    them in its own ``labels/`` folders."""
    return os.path.join(model_dir, "corrections", dicomweb_folder_name(studies))
