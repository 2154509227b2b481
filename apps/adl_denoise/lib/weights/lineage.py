"""The lineage of a weight file trained from another one: the start file's training record, summarised, and the
start's own lineage, so that a chain of fine-tunes stays traceable from the newest file alone.

The shape is that of the shipped CT file (``training.lineage``): a list of entries, OLDEST FIRST, the direct
start last; each entry is a record (``steps``, ``steps_per_phase``, ``config``, ``data``, ``best_psnr``, ...)
with the file's ``file`` name and ``sha256`` in front.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..runtime.hashing import file_sha256
from .format import portable_record

__all__ = ["MAX_LINEAGE", "start_lineage"]

#: entries kept; beyond this the oldest are dropped (a chain of automated fine-tunes could grow without bound)
MAX_LINEAGE = 20
#: run-housekeeping settings left out of a summary's ``config`` (they do not change the network; paths of the
#: training machine besides)
_HOUSEKEEPING = ("device", "checkpoint_dir", "checkpoint_every", "keep_all_checkpoints", "num_workers",
                 "validation_every")


def _summary(name: str, sha256: str, payload: Any) -> dict:
    """One lineage entry for a start file (``payload``: what ``torch.load`` gave)."""
    entry: dict[str, Any] = {"file": name, "sha256": sha256}
    record = payload.get("training") if isinstance(payload, dict) else None
    if not isinstance(record, dict) or not record:
        if not isinstance(payload, dict):
            kind = "not readable as a weight file"
        elif "format" in payload:
            kind = f"format {payload['format']!r}"
        else:
            kind = "a plain state dict"
        entry["note"] = f"no training record in the start file ({kind})"
        return entry
    entry.update({k: payload[k] for k in ("created_utc", "model", "modality", "spatial_dims") if k in payload})
    entry.update({k: record[k] for k in ("steps", "phase", "steps_per_phase", "best_psnr") if k in record})
    if isinstance(record.get("config"), dict):
        entry["config"] = {k: v for k, v in record["config"].items() if k not in _HOUSEKEEPING}
    if "data" in record:
        entry["data"] = record["data"]
    scored = [v for v in record.get("validation") or [] if isinstance(v, dict) and "psnr" in v]
    if scored:  # the best validation point, without the per-image table
        best = max(scored, key=lambda v: v["psnr"])
        entry["validation_best"] = {k: best[k] for k in ("step", "psnr", "psnr_noisy") if k in best}
    return entry


def start_lineage(start: str | os.PathLike) -> list[dict]:
    """The ``lineage`` of a new training record whose run started from the weight file ``start``.

    Returns ``start``'s own lineage entries followed by an entry for ``start`` itself (oldest first, as in the
    shipped files): ``file`` (its name only), ``sha256`` (of the file's bytes), ``created_utc``, ``model``,
    ``modality``, ``spatial_dims``, ``steps``, ``phase``, ``steps_per_phase``, ``config`` (without run
    housekeeping such as the device or the checkpoint folder), ``data``, ``best_psnr`` and ``validation_best``
    (``step``, ``psnr``, ``psnr_noisy`` in dB) where its record has them. A start without a record (e.g. a plain
    state dict) gets ``file``, ``sha256`` and a ``note`` saying so. At most :data:`MAX_LINEAGE` entries: the
    oldest are dropped and the oldest one kept says how many in ``older_entries_dropped``. Absolute paths in
    any entry are cut to file names.
    """
    import torch

    path = Path(start).expanduser()
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - unreadable as a plain payload: the entry says there is no record
        payload = None
    record = payload.get("training") if isinstance(payload, dict) else None
    earlier = [dict(e) for e in (record or {}).get("lineage") or [] if isinstance(e, dict)] \
        if isinstance(record, dict) else []
    chain = earlier + [_summary(path.name, file_sha256(path), payload)]
    dropped = len(chain) - MAX_LINEAGE
    if dropped > 0:
        already = int(chain[0].get("older_entries_dropped", 0))
        chain = chain[dropped:]
        chain[0]["older_entries_dropped"] = dropped + already
    return portable_record(chain)  # the record travels with the weights: file names, no folders
