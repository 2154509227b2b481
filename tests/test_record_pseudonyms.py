"""A fine-tuned weight file's record names datastore images by keyed pseudonyms (lib.weights.pseudonyms): the
site key, the pseudonyms, and their replacement wherever an id appears in a record. The server end to end (a
published file names no image, the history maps the pseudonyms back) is in test_regional_corrections.py."""
from __future__ import annotations

import hashlib
import json
import stat
from pathlib import Path

import pytest

from lib.weights.pseudonyms import (KEY_FILE, MIN_EMBEDDED_ID, ids_in_record, pseudonym, pseudonym_map,
                                    pseudonymise_record, site_key)

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


def test_a_short_id_is_replaced_only_where_a_whole_string_is_that_id():
    """A datastore of numbered images (``1.nii.gz``): the id ``1`` must not rewrite the digits of UIDs and version
    numbers in the record; a name that short cannot name a person, so a file name holding it may stay."""
    names = pseudonym_map(b"k" * 32, ["1", "DOE_JANE"])
    record = {"train_images": ["1", "DOE_JANE"], "regions": {"1": {"keep": 1}},
              "validation_images": ["1.2.840.10008.5.1"], "software": {"torch": "2.1.0"},
              "files": ["1.nii.gz", "DOE_JANE.nii.gz"]}
    out = pseudonymise_record(record, names)
    assert out["train_images"] == [names["1"], names["DOE_JANE"]] and out["regions"] == {names["1"]: {"keep": 1}}
    assert out["validation_images"] == ["1.2.840.10008.5.1"] and out["software"] == {"torch": "2.1.0"}
    assert out["files"] == ["1.nii.gz", names["DOE_JANE"] + ".nii.gz"]
    assert ids_in_record(record, ["1", "DOE_JANE", "ROE"]) == ["1", "DOE_JANE"]
    assert ids_in_record(out, ["1", "DOE_JANE"]) == []
    assert MIN_EMBEDDED_ID > len("1")


def test_share_weights_writes_a_copy_naming_no_image_id_or_folder(tmp_path):
    """cli.py share-weights on a file published before records were pseudonymised: the copy names the images by
    the server's pseudonyms (ids from the version histories and the datastore), paths by file names, keeps the
    shipped lineage's names,
    holds the source's weights bit for bit and loads; the source is untouched; refusals write nothing."""
    import os
    import sys

    import processes
    import torch
    from conftest import APP_DIR

    from lib.predict import load_denoiser

    model_dir, studies = tmp_path / "model", tmp_path / "studies"
    studies.mkdir()
    (studies / "SMITH_JOHN_chest.nii.gz").write_bytes(b"")  # an image of the datastore, not in the history
    from pydicom.data import get_testdata_file

    (studies / "DOE_JANE_MRN999").mkdir()  # a DICOM series folder: training names it by the folder
    (studies / "DOE_JANE_MRN999" / "CT.1.2.840.99.1").write_bytes(Path(get_testdata_file("CT_small.dcm")).read_bytes())
    key = site_key(model_dir)
    history = model_dir / "versions" / "tddl_gcn_ct" / "history.jsonl"
    history.parent.mkdir(parents=True)
    history.write_text(json.dumps({"event": "published", "images": ["DOE_JANE_abdomen"], "validation_images": [UID]})
                       + "\n" + json.dumps({"event": "rejected", "record_pseudonyms": {"image-0": "ROE_RICHARD"}})
                       + "\n")
    payload = torch.load(APP_DIR / "model" / "pretrained_tddl_gcn_ct.pt", map_location="cpu", weights_only=True)
    payload["training"] = dict(payload["training"], config=dict(
        payload["training"].get("config") or {}, checkpoint_dir="site/DOE_JOHN_MRN4711/adl_ct_checkpoints",
        lesion_detector="site/DOE_JOHN_MRN4711/detector.pt"), data={
        "train_images": ["DOE_JANE_abdomen", "ROE_RICHARD", "DOE_JANE_MRN999"], "validation_images": [UID],
        "files": ["/data/DOE_JANE_abdomen/final.nii.gz", "SMITH_JOHN_chest_final.nrrd"],
        "regions": {"DOE_JANE_abdomen": {"keep": 1}}})
    source = tmp_path / "tddl_gcn_ct.pt"
    torch.save(payload, source)
    before = source.read_bytes()
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def share(*args):
        return processes.run([sys.executable, APP_DIR / "cli.py", "share-weights", *map(str, args)], 300, env=env)

    output = tmp_path / "shared.pt"
    result = share("--input", source, "--output", output, "--model-dir", model_dir, "--names-from", studies)
    assert result.returncode == 0, result.stderr
    # DOE_JANE_abdomen, ROE_RICHARD and the UID from the history, SMITH_JOHN_chest from the datastore
    assert "5 image id(s)" in result.stdout and "5 known" in result.stdout
    copy = torch.load(output, map_location="cpu", weights_only=True)
    text = json.dumps({k: v for k, v in copy.items() if k != "state_dict"})
    for identifier in ("DOE_JANE", "ROE_RICHARD", UID, "SMITH_JOHN", "/data", "DOE_JOHN"):
        assert identifier not in text, identifier
    # a relative path in the record (from a relative --output) keeps its file name only
    assert copy["training"]["config"]["checkpoint_dir"] == "adl_ct_checkpoints"
    assert copy["training"]["config"]["lesion_detector"] == "detector.pt"
    data = copy["training"]["data"]
    assert data["train_images"] == [pseudonym(key, "DOE_JANE_abdomen"), pseudonym(key, "ROE_RICHARD"),
                                    pseudonym(key, "DOE_JANE_MRN999")]
    assert data["validation_images"] == [pseudonym(key, UID)]
    assert data["files"] == ["final.nii.gz", pseudonym(key, "SMITH_JOHN_chest") + "_final.nrrd"]
    assert copy["training"]["lineage"] == payload["training"]["lineage"]  # the shipped file's own history, kept
    assert set(copy["state_dict"]) == set(payload["state_dict"])
    assert all(torch.equal(copy["state_dict"][k], v) for k, v in payload["state_dict"].items())
    assert load_denoiser(output).metadata["training"]["data"]["regions"] == {pseudonym(key, "DOE_JANE_abdomen"):
                                                                            {"keep": 1}}
    assert source.read_bytes() == before
    # refusals, nothing written: an existing output, a folder without the server's key, not a weight file
    again = share("--input", source, "--output", output, "--model-dir", model_dir)
    assert again.returncode == 2 and "exists" in again.stderr
    elsewhere = share("--input", source, "--output", tmp_path / "b.pt", "--model-dir", tmp_path / "typo")
    assert elsewhere.returncode == 2 and "no pseudonym key" in elsewhere.stderr
    assert not (tmp_path / "b.pt").exists() and not (tmp_path / "typo").exists()
    (tmp_path / "notes.pt").write_text("not a weight file")
    wrong = share("--input", tmp_path / "notes.pt", "--output", tmp_path / "c.pt", "--model-dir", model_dir)
    assert wrong.returncode == 2 and "weight file" in wrong.stderr and not (tmp_path / "c.pt").exists()
