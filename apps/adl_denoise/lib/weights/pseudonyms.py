"""Keyed pseudonyms for the datastore ids that a fine-tuned weight file's training record would otherwise name.

A server fine-tunes on its datastore's images, whose ids are file names of a local datastore (which may name the
patient: ``DOE_JANE_abdomen``) or the series UIDs of a DICOMweb one (which DICOM's de-identification profiles
replace, PS3.15 Annex E: anyone holding the study can link a UID back to the patient). The weight file travels
(to every user of the site, to other sites); the ids must not. The record names each image by
``image-<16 hex of HMAC-SHA-256(site key, id)>`` instead:

* the same image gets the same pseudonym in every run of the site (lineages show when an image trained twice);
* without the site key, a pseudonym cannot be tested against a guessed name or a known UID (a plain hash could);
* the server keeps the ids next to the pseudonyms where only the site reads them (the model's version history,
  ``versions/<model>_<modality>/history.jsonl``), and can recompute the pseudonym of any id with its key.

The key is 32 random bytes in ``<model folder>/.record_pseudonym_key`` (mode 0600), made when the server starts (or on
first use); it must stay with the server and never be copied with the weight files.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from pathlib import Path
from typing import Any, Iterable, Mapping

from .format import map_record_strings

__all__ = ["KEY_FILE", "MIN_EMBEDDED_ID", "PSEUDONYM_PREFIX", "ids_in_record", "pseudonym", "pseudonym_map",
           "pseudonymise_record", "site_key"]

KEY_FILE = ".record_pseudonym_key"
#: an id shorter than this is replaced only where a whole string or key is the id: inside longer text so short an id
#: (``1``, ``ct``) matches digits of UIDs and version numbers and parts of words, and cannot name a person
MIN_EMBEDDED_ID = 4
PSEUDONYM_PREFIX = "image-"
KEY_BYTES = 32


def site_key(folder: str | os.PathLike) -> bytes:
    """The site's pseudonym key, read from ``folder/.record_pseudonym_key`` or made there (0600) on first use.

    Two processes making it at once agree: the file is created exclusively, and the loser reads the winner's key.
    Raises ``ValueError`` when the file exists but does not hold a key of :data:`KEY_BYTES` bytes (a truncated or
    replaced key would silently give every image new pseudonyms).
    """
    path = Path(folder) / KEY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        key = path.read_bytes()
        if len(key) != KEY_BYTES:
            raise ValueError(f"{path} holds {len(key)} bytes, not a {KEY_BYTES}-byte pseudonym key: restore it from "
                             f"the server's backup (a new key gives every image a new pseudonym)") from None
        return key
    key = secrets.token_bytes(KEY_BYTES)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(key)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return key


def pseudonym(key: bytes, identifier: str) -> str:
    """``image-`` and the first 16 hex digits of HMAC-SHA-256(``key``, ``identifier`` as UTF-8)."""
    digest = hmac.new(key, str(identifier).encode("utf-8"), hashlib.sha256).hexdigest()
    return PSEUDONYM_PREFIX + digest[:16]


def pseudonym_map(key: bytes, identifiers: Iterable[str]) -> dict[str, str]:
    """``{id: pseudonym}`` for every distinct id."""
    return {str(i): pseudonym(key, str(i)) for i in identifiers}


def pseudonymise_record(value: Any, pseudonyms: Mapping[str, str]) -> Any:
    """``value`` (a JSON-able record) with every id of ``pseudonyms`` replaced by its pseudonym, at any depth, in
    dict keys and in strings: a string that is the id, or holds it between non-alphanumeric characters
    (``<id>.nii.gz``, ``<id>_final``; an id inside a word, ``ct`` in ``corrections``, is left alone). Longer ids are
    replaced first, so an id that begins another one does not cut it in two. Ids shorter than
    :data:`MIN_EMBEDDED_ID` characters are replaced only where a whole string or key is the id."""
    if not pseudonyms:
        return value
    embedded = sorted((i for i in pseudonyms if len(i) >= MIN_EMBEDDED_ID), key=len, reverse=True)
    pattern = (re.compile(r"(?<![A-Za-z0-9])(?:" + "|".join(map(re.escape, embedded)) + r")(?![A-Za-z0-9])")
               if embedded else None)

    def replace(text: str) -> str:
        if text in pseudonyms:
            return pseudonyms[text]
        return pattern.sub(lambda match: pseudonyms[match.group(0)], text) if pattern is not None else text

    return map_record_strings(value, replace, keys=True)


def ids_in_record(value: Any, ids: Iterable[str]) -> list[str]:
    """Those of ``ids`` that ``value`` (a JSON-able record) still holds: an id of :data:`MIN_EMBEDDED_ID` characters
    or more anywhere inside a string or key, a shorter one as a whole string or key (where
    :func:`pseudonymise_record` replaces it). Sorted."""
    strings: set[str] = set()
    map_record_strings(value, lambda text: strings.add(text) or text, keys=True)
    return sorted(i for i in set(ids) if (i in strings if len(i) < MIN_EMBEDDED_ID
                                           else any(i in text for text in strings)))
