"""Where a datastore's audit log lives when ``--conf audit_dir`` does not say."""
from __future__ import annotations

import hashlib
import os

__all__ = ["default_audit_dir"]


def default_audit_dir(studies: str, model_dir: str) -> str:
    """``<studies>/.audit`` for a local datastore: a hidden folder, which MONAI Label's local datastore neither
    lists nor serves (it lists only files matching its image extensions at the top of the studies folder, and the
    app's routes refuse names starting with a dot), so each datastore has its own log. For a DICOMweb datastore
    (``studies`` is a URL; its local folder is only a cache): ``<model_dir>/audit/dicomweb-<first 16 hex of the
    SHA-256 of the URL without its trailing slash>``."""
    if studies.startswith(("http://", "https://")):
        key = hashlib.sha256(studies.rstrip("/").strip().encode()).hexdigest()[:16]
        return os.path.join(model_dir, "audit", f"dicomweb-{key}")
    return os.path.join(os.path.abspath(studies), ".audit")
