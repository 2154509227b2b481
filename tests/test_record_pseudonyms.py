"""A fine-tuned weight file's record names datastore images by keyed pseudonyms (lib.weights.pseudonyms): the
site key, the pseudonyms, and their replacement wherever an id appears in a record. The server end to end (a
published file names no image, the history maps the pseudonyms back) is in test_regional_corrections.py."""
from __future__ import annotations

import hashlib
import json
import stat

import pytest

from lib.weights.pseudonyms import KEY_FILE, pseudonym, pseudonym_map, pseudonymise_record, site_key

UID = "1.2.826.0.1.3680043.8.498.10246"


def test_site_key_is_made_once_private_and_kept(tmp_path):
    key = site_key(tmp_path / "model")
    path = tmp_path / "model" / KEY_FILE
    assert len(key) == 32 and path.read_bytes() == key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert site_key(tmp_path / "model") == key  # read back, not made again
    assert site_key(tmp_path / "other") != key  # random per site


def test_a_damaged_key_is_refused_naming_the_file(tmp_path):
    (tmp_path / KEY_FILE).write_bytes(b"short")
    with pytest.raises(ValueError, match=KEY_FILE):
        site_key(tmp_path)
    assert (tmp_path / KEY_FILE).read_bytes() == b"short"  # nothing overwritten


def test_pseudonyms_are_keyed_and_stable():
    a, b = b"a" * 32, b"b" * 32
    assert pseudonym(a, "DOE_JANE") == pseudonym(a, "DOE_JANE") != pseudonym(b, "DOE_JANE")
    assert pseudonym(a, "DOE_JANE") != pseudonym(a, "DOE_JANE2")
    assert pseudonym(a, UID).startswith("image-") and len(pseudonym(a, UID)) == len("image-") + 16
    # not a plain hash: whoever holds the UID cannot test it against the record without the site key
    assert pseudonym(a, UID)[6:] not in hashlib.sha256(UID.encode()).hexdigest()


def test_every_id_is_replaced_at_any_depth_and_nothing_else():
    ids = ["DOE_JANE", "DOE_JANE_2", UID, "ct"]
    names = pseudonym_map(b"k" * 32, ids)
    record = {
        "kind": "clinician corrections",  # "ct" inside a word stays
        "modality": "CT",
        "train_images": ["DOE_JANE", "DOE_JANE_2"],
        "validation_images": [UID],
        "regions": {"DOE_JANE": {"keep": 1}},
        "noise_model": {"images": ("ct",), "files": ["DOE_JANE_2.nii.gz", f"{UID}_final.nrrd"]},
        "lineage": [{"data": {"train_images": ["DOE_JANE"]}}],
        "steps": 40,
    }
    out = pseudonymise_record(record, names)
    text = json.dumps(out)
    assert "DOE_JANE" not in text and UID not in text
    assert out["kind"] == "clinician corrections" and out["modality"] == "CT" and out["steps"] == 40
    assert out["train_images"] == [names["DOE_JANE"], names["DOE_JANE_2"]]  # the longer id is not cut in two
    assert out["validation_images"] == [names[UID]]
    assert out["regions"] == {names["DOE_JANE"]: {"keep": 1}}
    assert out["noise_model"] == {"images": [names["ct"]],
                                  "files": [names["DOE_JANE_2"] + ".nii.gz", names[UID] + "_final.nrrd"]}
    assert out["lineage"][0]["data"]["train_images"] == [names["DOE_JANE"]]
    assert record["train_images"] == ["DOE_JANE", "DOE_JANE_2"]  # the input is not changed
    assert pseudonymise_record(record, {}) == record
