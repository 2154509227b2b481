"""A copy of a weight file that can leave the site: its training record names no datastore image and no folder.

Files that fine-tuning publishes since 2026-12-05 already name images by keyed pseudonyms
(:mod:`lib.weights.pseudonyms`) and files, not folders (:func:`lib.weights.format.portable_record`). Files published
before still name the images by their datastore ids (file names of a local datastore, which may name the patient;
SeriesInstanceUIDs of a DICOMweb one), in the record and in its lineage. Rewriting them where they are would change
their SHA-256, which the audit trail names for every result they produced; so the served files stay as they are
and :func:`shareable_copy` writes a separate copy for sharing, its weights bit for bit the source's.

The ids to replace are those the server knows it trained on: every image of the model folder's version histories
(``versions/*/history.jsonl``: ``images``, ``validation_images`` and the ids of ``record_pseudonyms`` of every
event, published or rejected, since the first version of the store) and any extra ids given (e.g. every image of
the datastore). Names that the record lists but the site never held (the public training data of the shipped
files in their lineage) are kept. Each id becomes the pseudonym the server gives it with its key, so the copy names
an image as the site's newer files do.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

from ..runtime.atomic import atomic_torch_save
from .format import WEIGHTS_FORMAT, portable_record
from .pseudonyms import KEY_FILE, PSEUDONYM_PREFIX, ids_in_record, pseudonym_map, pseudonymise_record, site_key

__all__ = ["history_image_ids", "shareable_copy"]


def _is_id(text: Any) -> bool:
    return isinstance(text, str) and bool(text.strip()) and not text.startswith(PSEUDONYM_PREFIX)


def _listed_ids(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [k for k in value if _is_id(k)]
    if isinstance(value, (list, tuple)):
        return [v for v in value if _is_id(v)]
    return []


def history_image_ids(model_dir: str | os.PathLike) -> set[str]:
    """Every image id that the version histories under ``model_dir/versions`` name (``images``,
    ``validation_images`` and the ids of ``record_pseudonyms`` of every event). Unreadable lines are skipped."""
    found: set[str] = set()
    for path in sorted(Path(model_dir).glob("versions/*/history.jsonl")):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if not isinstance(entry, dict):
                    continue
                for key in ("images", "validation_images"):
                    found.update(_listed_ids(entry.get(key)))
                pseudonyms = entry.get("record_pseudonyms")
                if isinstance(pseudonyms, dict):
                    found.update(v for v in pseudonyms.values() if _is_id(v))
    return found


def shareable_copy(source: str | os.PathLike, output: str | os.PathLike, model_dir: str | os.PathLike,
                   extra_ids: Iterable[str] = ()) -> dict:
    """Write to ``output`` a copy of the weight file ``source`` whose record names every known image id by its
    pseudonym (the key of ``model_dir``, the server's model folder) and every absolute path by its last component.

    Returns ``{"output", "ids_known", "ids_replaced"}`` (``ids_replaced``: the ids that the source's record held).
    Raises ``ValueError`` (nothing written) when ``model_dir`` holds no pseudonym key, ``source`` is not a weight
    file, ``output`` exists or is the source, or a known id is still in the copy's record
    (:func:`~lib.weights.pseudonyms.ids_in_record`: e.g. an id inside a longer word, which
    :func:`~lib.weights.pseudonyms.pseudonymise_record` leaves alone; such a copy is refused rather than shared).
    """
    import torch

    source, output = Path(source), Path(output)
    if not (Path(model_dir) / KEY_FILE).is_file():  # never make a key here: its pseudonyms would match nothing
        raise ValueError(f"no pseudonym key ({KEY_FILE}) in {model_dir}: give the server's model folder")
    if output.exists() or output.resolve() == source.resolve():
        raise ValueError(f"{output} exists (or is the source): choose a new file for the copy")
    try:
        payload = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - anything unreadable is "not a weight file"
        raise ValueError(f"cannot read {source} as a weight file: {error}") from None
    if not isinstance(payload, dict) or payload.get("format") != WEIGHTS_FORMAT or "state_dict" not in payload:
        raise ValueError(f"{source} is not a denoiser weight file (format {WEIGHTS_FORMAT!r})")
    record = {k: v for k, v in payload.items() if k != "state_dict"}
    ids = history_image_ids(model_dir) | {str(i) for i in extra_ids if _is_id(str(i))}
    held = ids_in_record(record, ids)
    names = pseudonym_map(site_key(model_dir), ids)
    clean = portable_record(pseudonymise_record(record, names))
    left = ids_in_record(clean, held)
    if left:
        raise ValueError(f"{source}: {len(left)} image id(s) could not be replaced in the record; not shared")
    atomic_torch_save({**clean, "state_dict": payload["state_dict"]}, output)
    return {"output": str(output), "ids_known": len(ids), "ids_replaced": len(held)}
