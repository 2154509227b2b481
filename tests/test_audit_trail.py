"""The audit trail (issue 19): an append-only, hash-chained log of results, verdicts, datastore changes and
weights events, kept outside the datastore info, verified at start-up and by GET /review/audit/verify.

Fast tests of the chain itself (no server), then a real MONAI Label server on loopback: results (datastore id and
upload), verdicts, the stock image-info and delete routes, a restart on the same folders, tampering (an edited
field, a deleted line) reported after a restart, a result whose entry cannot be written is not returned, and a
review-queue hand-out or a download (image, label, session, dataset) whose entry cannot be written is refused
(503), nothing handed out or sent.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import multiprocessing
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
import requests
import SimpleITK as sitk

from conftest import SAMPLE_STUDIES
from lib.audit import GENESIS, AuditBrokenError, AuditLog, AuditWriteError, canonical_json, entry_hash, sanitise
from lib.audit.identity import input_identity, volume_content_sha256

# ------------------------------------------------------------------------------------------------ the chain
def _log_with(tmp_path: Path, n: int) -> AuditLog:
    audit = AuditLog(tmp_path / "audit")
    for i in range(n):
        audit.append("result" if i % 2 else "verdict", {"image": f"study_{i}", "reviewer": "dr_a", "i": i})
    return audit


def _lines(audit: AuditLog) -> list[bytes]:
    return audit.path.read_bytes().splitlines(keepends=True)


def test_entries_are_chained_by_sha256_of_their_canonical_json(tmp_path):
    audit = _log_with(tmp_path, 4)
    entries = [json.loads(line) for line in _lines(audit)]
    assert [e["seq"] for e in entries] == [0, 1, 2, 3]
    assert entries[0]["prev"] == GENESIS
    for before, entry in zip(entries, entries[1:]):
        assert entry["prev"] == before["hash"]
    for entry in entries:
        body = {k: v for k, v in entry.items() if k != "hash"}
        assert entry["hash"] == hashlib.sha256(canonical_json(body)).hexdigest() == entry_hash(entry)
        assert entry["time_utc"].endswith("+00:00")
    report = audit.verify()
    assert report.ok and report.entries == 4 and report.head_seq == 3 and report.problem is None
    assert json.loads(audit.head_path.read_text()) == {"seq": 3, "hash": entries[-1]["hash"]}


@pytest.mark.parametrize("damage, line, words", [
    ("edit", 2, "does not match its hash"),
    ("delete", 2, "expected 1"),
    ("reorder", 2, "expected 1"),
    ("cut", 4, "cut short"),
    ("drop_last", 4, "removed from the end"),
    ("garbage", 3, "not JSON"),
    ("rehash", 3, "prev hash"),  # an edited entry given a fresh hash of its own: the next entry's prev breaks
])
def test_verification_names_the_first_broken_entry(tmp_path, damage, line, words):
    audit = _log_with(tmp_path, 4)
    lines = _lines(audit)
    if damage == "edit":  # a field changed, the line otherwise intact
        lines[1] = lines[1].replace(b'"dr_a"', b'"dr_x"')
    elif damage == "delete":
        del lines[1]
    elif damage == "reorder":
        lines[1], lines[2] = lines[2], lines[1]
    elif damage == "cut":
        lines[3] = lines[3][:-20]
    elif damage == "drop_last":  # a valid chain, one entry short of its head
        del lines[3]
    elif damage == "garbage":
        lines[2] = b"{not json\n"
    elif damage == "rehash":
        forged = json.loads(lines[1])
        forged["fields"]["reviewer"] = "dr_x"
        forged["hash"] = entry_hash(forged)
        lines[1] = canonical_json(forged) + b"\n"
    audit.path.write_bytes(b"".join(lines))
    report = AuditLog(audit.folder).verify()
    assert not report.ok
    assert report.broken_line == line and words in report.problem, report
    assert f"line {line}" in report.summary() and "BROKEN" in report.summary()


def test_an_entry_is_never_chained_onto_a_damaged_last_line(tmp_path):
    audit = _log_with(tmp_path, 3)
    lines = _lines(audit)
    lines[-1] = lines[-1].replace(b'"dr_a"', b'"dr_x"')
    audit.path.write_bytes(b"".join(lines))
    with pytest.raises(AuditWriteError, match="hash check"):
        AuditLog(audit.folder).append("verdict", {"image": "x"})
    audit.path.write_bytes(b"".join(lines)[:-5])  # a partial last line
    with pytest.raises(AuditWriteError, match="partial line"):
        AuditLog(audit.folder).append("verdict", {"image": "x"})


def test_a_broken_log_refuses_entries_and_a_missing_folder_is_a_write_error(tmp_path):
    audit = _log_with(tmp_path, 2)
    audit.refuse_appends(audit.verify())
    with pytest.raises(AuditBrokenError):
        audit.append("verdict", {})
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "audit.jsonl").mkdir()  # a folder where the log should be: the write fails, saying where
    with pytest.raises(AuditWriteError, match="audit.jsonl"):
        AuditLog(blocked).append("verdict", {})


def test_a_log_that_would_refuse_an_entry_is_found_before_the_work_and_nothing_is_written(tmp_path):
    """``check_appendable`` (a request's refusal before its work) raises what ``append`` would, writing nothing: a
    folder where the log should be, a damaged last line; a healthy log and one not written yet pass unchanged."""
    audit = _log_with(tmp_path, 2)
    kept = audit.path.read_bytes()
    audit.check_appendable()
    AuditLog(tmp_path / "not_yet").check_appendable()
    assert audit.path.read_bytes() == kept and not (tmp_path / "not_yet").exists()
    audit.path.write_bytes(kept[:-5])  # the last line cut short
    with pytest.raises(AuditWriteError, match="partial line"):
        audit.check_appendable()
    audit.path.unlink()
    audit.path.mkdir()  # a folder where the log is (chmod would not stop root)
    with pytest.raises(AuditWriteError, match="audit.jsonl"):
        audit.check_appendable()


def test_every_append_is_fsynced(tmp_path, monkeypatch):
    """A spy on os.fsync (it still syncs): each append syncs the log file's descriptor before returning."""
    audit = AuditLog(tmp_path / "audit")
    synced: list[str] = []
    real_fsync = os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    for i in range(3):
        audit.append("verdict", {"i": i})
        assert synced.count(str(audit.path)) == i + 1


def test_concurrent_threads_append_one_unbroken_chain(tmp_path):
    """Six writers and a reader verifying all along (as GET /review/audit/verify during requests): every
    verification sees an intact chain, never a half-written line or a head ahead of the log."""
    audit = AuditLog(tmp_path / "audit")
    audit.append("server_started", {})
    writers = [threading.Thread(target=lambda k=k: [audit.append("result", {"thread": k, "i": i}) for i in range(30)])
               for k in range(6)]
    seen: list = []

    def reader() -> None:
        while any(w.is_alive() for w in writers) or not seen:
            seen.append(AuditLog(audit.folder).verify())

    verifier = threading.Thread(target=reader)
    for t in writers + [verifier]:
        t.start()
    for t in writers + [verifier]:
        t.join()
    assert all(report.ok for report in seen), next(r for r in seen if not r.ok)
    report = audit.verify()
    assert report.ok and report.entries == 181, report


def test_reading_waits_for_an_append_in_progress(tmp_path):
    """A reader takes a shared lock: while a writer (here the test, as another process would) holds the exclusive
    lock of an append, verification waits instead of reading a half-written line or a head ahead of the log."""
    import fcntl
    import time

    audit = _log_with(tmp_path, 2)
    fd = os.open(audit.path, os.O_WRONLY | os.O_APPEND)
    fcntl.flock(fd, fcntl.LOCK_EX)
    reports: list = []
    reader = threading.Thread(target=lambda: reports.append(AuditLog(audit.folder).verify()))
    try:
        reader.start()
        time.sleep(1.0)
        assert reader.is_alive() and not reports, "verification read the log during an append"
    finally:
        os.close(fd)  # releases the lock
    reader.join(timeout=60)
    assert reports and reports[0].ok


def _append_many(folder: str, tag: str, n: int) -> None:
    audit = AuditLog(folder)
    for i in range(n):
        audit.append("result", {"process": tag, "i": i})


def test_concurrent_processes_append_one_unbroken_chain(tmp_path):
    """Two processes (as the server and a training run) appending to one log: the fcntl lock keeps the chain."""
    folder = str(tmp_path / "audit")
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_append_many, args=(folder, tag, 150)) for tag in ("a", "b", "c")]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=300)
        assert w.exitcode == 0
    report = AuditLog(folder).verify()
    assert report.ok and report.entries == 450, report


def test_sanitise_keeps_entries_plain_json():
    value = sanitise({"nan": float("nan"), "long": "x" * 5000, "path": Path("/a"), 3: (1, 2)})
    assert value["nan"] == "nan" and value["path"] == "/a" and value["3"] == [1, 2]
    assert len(value["long"]) < 4100 and "more characters" in value["long"]
    canonical_json(value)  # NaN-free


def test_weights_publications_and_restores_are_audit_entries(tmp_path):
    """The app's weights store (as the training subprocess uses it): every history event is also an entry, and
    nothing is published while the log refuses entries."""
    from lib.audit.recording import AuditedModelStore

    audit = AuditLog(tmp_path / "audit")
    store = AuditedModelStore(tmp_path / "model", audit)
    candidate = tmp_path / "candidate.pt"
    candidate.write_bytes(b"weights v1")
    published = store.publish(candidate, "adl", "ct", psnr=31.5)
    store.restore("adl", "ct", published.version)
    events = [(e["event"], e["fields"]["version"]) for e in audit.entries()]
    assert events == [(f"weights_{event}", published.version)
                      for event in ("publishing", "published", "restoring", "restored")]
    assert audit.entries()[1]["fields"]["sha256"] == hashlib.sha256(b"weights v1").hexdigest()
    assert audit.entries()[1]["fields"]["user"] is None  # no HTTP request: the training process
    audit.refuse_appends(audit.verify())
    with pytest.raises(AuditBrokenError):
        store.publish(candidate, "adl", "ct")
    assert len(store.history("adl", "ct")) == 4


def _store_with_weights_v1(tmp_path: Path):
    """An audited weights store under ``tmp_path`` that has published ``candidate.pt`` (b"weights v1") for adl / CT:
    (audit log, store, candidate file, that publication's entry, the served file)."""
    from lib.audit.recording import AuditedModelStore

    audit = AuditLog(tmp_path / "audit")
    store = AuditedModelStore(tmp_path / "model", audit)
    candidate = tmp_path / "candidate.pt"
    candidate.write_bytes(b"weights v1")
    first = store.publish(candidate, "adl", "ct")
    return audit, store, candidate, first, store.published_path("adl", "ct")


@pytest.mark.parametrize("killed", ["before the rename", "after the rename"])
def test_a_publication_cut_short_never_records_weights_as_published_that_are_not_served(tmp_path, monkeypatch,
                                                                                        killed):
    """The entry ``weights_published`` was written before the new file was renamed over the served one: a run
    killed in between left a publication on record of weights that were never served. Now ``weights_publishing``
    comes first and ``weights_published`` only once they are served; a run killed after the rename leaves its
    pending entry, which names the version now served."""
    import lib.weights.store as store_module

    audit, store, candidate, first, served = _store_with_weights_v1(tmp_path)
    real_copy = store_module.atomic_copy

    def killed_at_the_rename(source, target, *args, **kwargs):
        if Path(target) == served and killed == "before the rename":
            raise KeyboardInterrupt  # the run is killed (Ctrl-C, not an error it records)
        out = real_copy(source, target, *args, **kwargs)
        if Path(target) == served:
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(store_module, "atomic_copy", killed_at_the_rename)
    candidate.write_bytes(b"weights v2")
    with pytest.raises(KeyboardInterrupt):
        store.publish(candidate, "adl", "ct")
    monkeypatch.undo()
    published = [e["fields"]["sha256"] for e in audit.entries("weights_published")]
    assert published == [first.sha256], "a publication on record of weights that are not (yet) served"
    pending = (audit.entries("weights_publishing") or [{}])[-1].get("fields") or {}
    assert pending.get("sha256") == hashlib.sha256(b"weights v2").hexdigest(), "no pending entry"
    if killed == "before the rename":
        assert served.read_bytes() == b"weights v1" and store.served("adl", "ct").version == first.version
        assert [e["event"] for e in store.history("adl", "ct")][-1] == "publishing"
    else:  # served, and known by its version
        assert served.read_bytes() == b"weights v2" and store.served("adl", "ct").version == pending["version"]
    assert audit.verify().ok


def test_weights_whose_audit_entry_cannot_be_written_are_not_served(tmp_path):
    """A publication or restore whose entry cannot be written (disk full, the log's folder lost its rights) left
    the new file served with no record anywhere (the file was replaced before the entry was written): the entry
    comes first now, and the served file stays as it was."""
    audit, store, candidate, first, served = _store_with_weights_v1(tmp_path)
    candidate.write_bytes(b"weights v2")
    second = store.publish(candidate, "adl", "ct")
    assert served.read_bytes() == b"weights v2"
    kept = audit.path.read_bytes()
    audit.path.unlink()
    audit.path.mkdir()  # a folder where the log is: every append fails (chmod would not stop root)
    candidate.write_bytes(b"weights v3")
    with pytest.raises(AuditWriteError):
        store.publish(candidate, "adl", "ct")
    assert served.read_bytes() == b"weights v2"
    with pytest.raises(AuditWriteError):
        store.restore("adl", "ct", first.version)
    assert served.read_bytes() == b"weights v2"
    assert store.served("adl", "ct").version == second.version
    audit.path.rmdir()
    audit.path.write_bytes(kept)
    assert audit.verify().ok and [e["event"] for e in audit.entries()] == ["weights_publishing",
                                                                           "weights_published"] * 2


# ------------------------------------------------------------------------------------------------ identity
def test_content_hash_is_voxels_and_geometry_not_the_file(tmp_path):
    source = sitk.ReadImage(str(SAMPLE_STUDIES / "ct_head_pydicom693_ld25.nii.gz"))
    sitk.WriteImage(source, str(tmp_path / "a.nii.gz"))
    sitk.WriteImage(source, str(tmp_path / "b.nrrd"))  # another format and name, the same volume
    moved = sitk.Image(source)
    moved.SetOrigin(tuple(o + 1.0 for o in source.GetOrigin()))
    sitk.WriteImage(moved, str(tmp_path / "moved.nii.gz"))
    edited = sitk.Image(source)
    edited[10, 10, 0] = edited[10, 10, 0] + 1
    sitk.WriteImage(edited, str(tmp_path / "edited.nii.gz"))
    a = volume_content_sha256(tmp_path / "a.nii.gz")
    assert a == volume_content_sha256(tmp_path / "b.nrrd")
    assert a != volume_content_sha256(tmp_path / "moved.nii.gz")
    assert a != volume_content_sha256(tmp_path / "edited.nii.gz")
    assert input_identity(tmp_path / "a.nii.gz")["content_sha256"] == a


def _gzipped_nifti(path: Path, shape: tuple[int, ...], stored_bytes: int) -> Path:
    """A uint8 NIfTI-1 ``.nii.gz`` declaring ``shape``, holding ``stored_bytes`` zeros (little on disk)."""
    import nibabel
    import numpy as np

    header = nibabel.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.uint8)
    chunk = bytes(1 << 24)
    with gzip.open(path, "wb", compresslevel=1) as out:
        out.write(header.binaryblock + bytes(4))  # voxels from byte 352 (vox_offset)
        for start in range(0, stored_bytes, len(chunk)):
            out.write(chunk[:min(len(chunk), stored_bytes - start)])
    return path


def _peak_memory_mib_after(action) -> tuple[float, object]:
    """How much this process's peak resident memory grew during ``action()`` (Linux's VmHWM, reset first), and
    what it returned."""
    def peak_kib() -> int:
        with open("/proc/self/status") as status:
            return int(next(line.split()[1] for line in status if line.startswith("VmHWM:")))

    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # the peak starts again from the memory in use now
    before = peak_kib()
    value = action()
    return (peak_kib() - before) / 1024, value


def test_a_study_over_the_servers_voxel_limit_is_refused_from_its_header_never_loaded_to_be_hashed(tmp_path,
                                                                                                  monkeypatch):
    """The content hash of an image file (a result's identity, a verdict's check of the study stored now) read the
    file with ITK whatever its header declares: a study copied by hand into a local datastore over the server's
    voxel limit was loaded whole at each verdict, and a header declaring 10^12 voxels had ITK allocate them (a
    bad_alloc here, what the machine holds elsewhere). Now the header is checked first, at the server's limit (given
    to the audited datastore): refused naming the file and the limit, nothing loaded."""
    from monailabel.datastore.local import LocalDatastore

    from lib.activelearning import record_verdict
    from lib.activelearning.review import NothingToJudge
    from lib.audit.recording import audited_datastore
    from lib.imaging.errors import ImageTooLargeError

    monkeypatch.delenv("ADL_MAX_VOXELS", raising=False)
    studies = tmp_path / "studies"
    studies.mkdir()
    # 2e8 voxels, whole (200 MB of zeros, 200 kB compressed), over the server's limit of 1e6: the verdict hashes the
    # study stored now to judge the recorded result
    _gzipped_nifti(studies / "huge.nii.gz", (1000, 1000, 200), 200_000_000)
    audit = AuditLog(tmp_path / "audit")
    store = audited_datastore(LocalDatastore(str(studies), extensions=("*.nii.gz",), auto_reload=False), audit,
                              lambda: 1_000_000)
    # its result, denoised while the limit was higher (another path: the hash cache is by path)
    voxels = volume_content_sha256(shutil.copy(studies / "huge.nii.gz", tmp_path / "earlier.nii.gz"), 10 ** 9)
    audit.append("result", {"input": {"source": "datastore", "image": "huge", "content_sha256": voxels},
                            "model": "adl"})
    def verdict():
        with pytest.raises(NothingToJudge, match=r"'huge' is over the server's voxel limit now .*nothing was recorded"):
            record_verdict(audit, store, "huge", "accepted", "dr_a")

    # not hashed, its results cannot be told to be of these voxels (another, larger volume put in its place would
    # have been judged by the earlier one's result): refused, nothing recorded
    grown, _ = _peak_memory_mib_after(verdict)
    assert grown < 100, f"the verdict loaded the 200 MB study to hash it: peak memory grew by {grown:.0f} MiB"
    assert not audit.entries("verdict")
    record_verdict(audit, store, "huge", "unreviewed", "dr_a")  # a reset judges nothing: taken
    assert [e["fields"]["verdict"] for e in audit.entries("verdict")] == ["unreviewed"]
    with pytest.raises(ImageTooLargeError, match=r"huge\.nii\.gz is too large: .*exceeds the limit of 1,000,000 "):
        volume_content_sha256(studies / "huge.nii.gz", 1_000_000)

    _gzipped_nifti(tmp_path / "declared.nii.gz", (10000, 10000, 10000), 1000)
    (tmp_path / "declared.mha").write_bytes(b"ObjectType = Image\nNDims = 3\nDimSize = 10000 10000 10000\n"
                                            b"ElementType = MET_UCHAR\nElementDataFile = LOCAL\n" + bytes(1000))
    for name in ("declared.nii.gz", "declared.mha"):
        with pytest.raises(ImageTooLargeError) as refused:
            volume_content_sha256(tmp_path / name)
        assert f"{name} is too large: 10000 x 10000 x 10000 = 1,000,000,000,000 voxels exceeds the limit of " \
               "1,000,000,000" in str(refused.value)


def test_dicom_series_identity_is_its_series_instance_uid(tmp_path):
    import pydicom

    from pydicom.data import get_testdata_file

    dicoms = [Path(get_testdata_file("CT_small.dcm"))]  # a real CT slice shipped with pydicom
    dataset = pydicom.dcmread(str(dicoms[0]))
    dataset.PatientID = " PAT1"  # padding: the PACS's search answers 'PAT1', the header keeps it
    dataset.save_as(tmp_path / "slice.dcm")
    uid = dataset.SeriesInstanceUID
    identity = input_identity(tmp_path)
    assert identity["kind"] == "dicom_series" and identity["series_instance_uid"] == uid
    # the patient a result was denoised for (a verdict on it is refused once the PACS lists another)
    assert identity["patient_id"] == "PAT1", identity


def test_default_audit_folder_is_hidden_in_the_studies_and_not_a_study(tmp_path):
    from monailabel.datastore.local import LocalDatastore

    from lib.audit.location import default_audit_dir

    studies = tmp_path / "studies"
    studies.mkdir()
    shutil.copy(SAMPLE_STUDIES / "ct_head_pydicom693_ld25.nii.gz", studies / "ct_a.nii.gz")
    folder = Path(default_audit_dir(str(studies), str(tmp_path / "model")))
    assert folder == studies / ".audit"
    AuditLog(folder).append("server_started", {})
    (folder / "copy.nii.gz").write_bytes((studies / "ct_a.nii.gz").read_bytes())  # even an image-named file
    store = LocalDatastore(str(studies), extensions=("*.nii.gz", "*.nii", "*.nrrd"))
    assert store.list_images() == ["ct_a"]
    remote = default_audit_dir("https://pacs.example/dicom-web/", str(tmp_path / "model"))
    assert remote.startswith(str(tmp_path / "model" / "audit" / "dicomweb-"))
    assert remote == default_audit_dir("https://pacs.example/dicom-web", str(tmp_path / "model"))


def test_a_verdict_reads_the_audit_log_once(tmp_path):
    """A verdict read the whole log four times (the study's removals twice, its results, its verdicts), parsing
    every entry each time: 0.4 s per verdict on a log of 5000 entries, growing with the log. One read now, with
    the same judgement: the latest result of the study stored now (not of the study removed under the same id),
    an upload of the same voxels named by its seq, and the verdict it replaces."""
    from monailabel.datastore.local import LocalDatastore

    from lib.activelearning import record_verdict

    class CountingLog(AuditLog):
        reads = 0

        def entries(self, *args, **kwargs):
            CountingLog.reads += 1
            return super().entries(*args, **kwargs)

    studies = tmp_path / "studies"
    studies.mkdir()
    shutil.copy(SAMPLE_STUDIES / "ct_head_pydicom693_ld25.nii.gz", studies / "ct_a.nii.gz")
    store = LocalDatastore(str(studies), extensions=("*.nii.gz",), auto_reload=False)
    audit = CountingLog(tmp_path / "audit")
    voxels = volume_content_sha256(studies / "ct_a.nii.gz")

    def result(image, model: str) -> dict:
        return audit.append("result", {"input": {"source": "datastore" if image else "upload", "image": image,
                                                 "content_sha256": voxels}, "model": model})

    result("ct_a", "adl")  # the study removed since: its results are not this study's
    audit.append("image_removed", {"image": "ct_a"})
    for i in range(50):
        result(f"other_{i}", "adl")
    latest = result("ct_a", "tddl_gcn")
    upload = result(None, "nlm")  # denoised before it was stored: named by its seq
    CountingLog.reads = 0
    first = record_verdict(audit, store, "ct_a", "accepted", "dr_a")
    assert CountingLog.reads == 1, f"the log was read {CountingLog.reads} times for one verdict"
    assert first["result"]["result_seq"] == latest["seq"] and first["replaces"] is None
    CountingLog.reads = 0
    second = record_verdict(audit, store, "ct_a", "rejected", "dr_b", reason="streaks", result_seq=upload["seq"])
    assert CountingLog.reads == 1, f"the log was read {CountingLog.reads} times for one verdict"
    assert second["result"]["model"] == "nlm" and second["replaces"]["seq"] == first["seq"]


class _Killed(BaseException):
    """The server killed at this point (no ``except Exception`` of the app runs, as with SIGKILL)."""


def _killable_datastore(tmp_path: Path, audit: AuditLog, kill: dict):
    """An audited local datastore on real files whose ``remove_image`` / ``save_label`` / ``update_image_info``
    (which writes the review queue's copy of a verdict) raise :class:`_Killed`
    before (``kill[name] == "before"``) or after (``"after"``) the stock method does its work."""
    from monailabel.datastore.local import LocalDatastore

    from lib.audit.recording import audited_datastore

    class KillableDatastore(LocalDatastore):
        def remove_image(self, image_id):
            if kill.get("remove_image") == "before":
                raise _Killed()
            super().remove_image(image_id)
            if kill.get("remove_image") == "after":
                raise _Killed()

        def save_label(self, image_id, label_filename, label_tag, label_info):
            if kill.get("save_label") == "before":
                raise _Killed()
            return super().save_label(image_id, label_filename, label_tag, label_info)

        def update_image_info(self, image_id, info):
            if kill.get("update_image_info") == "before":
                raise _Killed()
            super().update_image_info(image_id, info)

    return audited_datastore(KillableDatastore(str(tmp_path / "studies"), extensions=("*.nii.gz",),
                                               auto_reload=False), audit)


def test_a_server_killed_between_a_datastore_entry_and_its_action_leaves_no_false_record(tmp_path):
    """The datastore's entries were written BEFORE it acted: a server killed between the entry and the removal of
    a study left ``image_removed`` for a study still stored, which hid its results and verdicts (and took the
    verdict's result away: "no result to judge"); one killed before a correction was stored left ``label_saved``
    for a correction that is not there. A pending entry comes first now, the entry of what was done after it; a
    removal cut short after the files went is settled by the id's next upload, which never inherits the trail."""
    from lib.activelearning import audit_trail, record_verdict

    studies = tmp_path / "studies"
    studies.mkdir()
    shutil.copy(SAMPLE_STUDIES / "ct_head_pydicom693_ld25.nii.gz", studies / "ct_a.nii.gz")
    audit = AuditLog(tmp_path / "audit")
    kill: dict = {}
    store = _killable_datastore(tmp_path, audit, kill)
    voxels = volume_content_sha256(studies / "ct_a.nii.gz")
    result = audit.append("result", {"input": {"source": "datastore", "image": "ct_a", "content_sha256": voxels},
                                      "model": "adl"})
    verdict = record_verdict(audit, store, "ct_a", "accepted", "dr_a")

    # killed before the files went: the study is there, with its trail
    kill["remove_image"] = "before"
    with pytest.raises(_Killed):
        store.remove_image("ct_a")
    store = _killable_datastore(tmp_path, audit, kill)  # the restarted server
    assert store.list_images() == ["ct_a"] and (studies / "ct_a.nii.gz").is_file()
    trail = audit_trail(audit, store, "ct_a")[0]
    assert [r["seq"] for r in trail["denoise_results"]] == [result["seq"]]
    assert [v["seq"] for v in trail["review_history"]] == [verdict["seq"]]
    again = record_verdict(audit, store, "ct_a", "rejected", "dr_b", reason="smoothed a lesion")
    assert again["result"]["result_seq"] == result["seq"] and again["replaces"]["seq"] == verdict["seq"]
    assert not _events(audit, "image_removed") and [e["image"] for e in _events(audit, "image_removing")] == ["ct_a"]

    # killed before the correction was stored: no correction on record
    correction = tmp_path / "ct_a_final.nii.gz"
    shutil.copy(studies / "ct_a.nii.gz", correction)
    kill["save_label"] = "before"
    with pytest.raises(_Killed):
        store.save_label("ct_a", str(correction), "final", {"correction": True})
    assert not _events(audit, "label_saved") and len(_events(audit, "label_saving")) == 1
    kill.pop("save_label")
    store.save_label("ct_a", str(correction), "final", {"correction": True})
    saved = audit.entries("label_saved")
    assert len(saved) == 1 and saved[0]["fields"]["pending_seq"] == audit.entries("label_saving")[-1]["seq"]

    # killed after the files went, before the removal was confirmed: another patient's study under the freed id
    # does not inherit the removed study's results and verdicts
    kill["remove_image"] = "after"
    with pytest.raises(_Killed):
        store.remove_image("ct_a")
    store = _killable_datastore(tmp_path, audit, kill)
    assert store.list_images() == [] and not _events(audit, "image_removed")
    other = tmp_path / "other.nii.gz"
    shutil.copy(SAMPLE_STUDIES / "ct_head_invesalius_ld25.nii.gz", other)
    store.add_image("ct_a", str(other), {})
    trail = audit_trail(audit, store, "ct_a")[0]
    assert trail["denoise_results"] == [] and trail["review_history"] == [], trail
    assert trail["review"]["verdict"] == "unreviewed"


def test_a_verdict_cut_short_before_the_queues_copy_is_set_from_the_log_at_start_up(tmp_path):
    """A verdict is written to the log, then to the study's info (the review queue's copy): a server killed between
    the two left the queue handing out a study already judged (and a reset to ``unreviewed`` kept the study off the
    queue). The start-up sets the info from the log where they differ."""
    from lib.activelearning import NextUnreviewed, reconcile_reviews, record_verdict

    studies = tmp_path / "studies"
    studies.mkdir()
    for name in ("ct_a", "ct_b"):
        shutil.copy(SAMPLE_STUDIES / "ct_head_pydicom693_ld25.nii.gz", studies / f"{name}.nii.gz")
    audit = AuditLog(tmp_path / "audit")
    kill: dict = {}
    store = _killable_datastore(tmp_path, audit, kill)
    for name in ("ct_a", "ct_b"):
        audit.append("result", {"input": {"source": "datastore", "image": name}, "model": "adl"})
    record_verdict(audit, store, "ct_b", "accepted", "dr_a")
    kill["update_image_info"] = "before"
    with pytest.raises(_Killed):
        record_verdict(audit, store, "ct_a", "accepted", "dr_a")
    with pytest.raises(_Killed):
        record_verdict(audit, store, "ct_b", "unreviewed", "dr_b")  # a reset, to be reviewed again
    kill.clear()
    store = _killable_datastore(tmp_path, audit, kill)  # the restarted server
    fixed = reconcile_reviews(audit, store)
    queue = NextUnreviewed(audit)
    assert queue({}, store) == {"id": "ct_b", "remaining_unreviewed": 1}
    assert fixed == ["ct_a", "ct_b"]
    judged = audit.entries("verdict")[1]
    assert store.get_image_info("ct_a")["review"] == {**{k: judged["fields"][k] for k in (
        "image", "verdict", "reviewer", "reviewer_from", "reason", "result")}, "time_utc": judged["time_utc"],
        "seq": judged["seq"]}
    assert reconcile_reviews(audit, store) == []  # in step: nothing written


def test_the_review_queue_of_a_local_datastore_hands_out_the_modality_asked(tmp_path):
    """On a local datastore a study's modality is its info's: this app's ``modality`` (read from the image, where
    fine-tuning and the admin put it) or the DICOM-named ``Modality`` (what MONAI Label writes for a DICOM series,
    and importers too). The queue read ``modality`` alone: a study whose info said ``Modality: MR`` was handed out
    to a request for CT."""
    from monailabel.datastore.local import LocalDatastore

    from lib.activelearning import NextUnreviewed
    from lib.trainers.finetune import image_modality

    studies = tmp_path / "studies"
    studies.mkdir()
    shutil.copy(SAMPLE_STUDIES / "ct_head_pydicom693_ld25.nii.gz", studies / "a_ct.nii.gz")
    shutil.copy(SAMPLE_STUDIES / "mr_slice_pydicom_mr2_rician5.nii.gz", studies / "b_mr.nii.gz")
    shutil.copy(SAMPLE_STUDIES / "mr_slice_pydicom_mr2.nii.gz", studies / "c_mr.nii.gz")
    store = LocalDatastore(str(studies), auto_reload=False)
    assert image_modality(store, "a_ct") == "CT" and image_modality(store, "b_mr") == "MR"  # read, kept in the info
    store.update_image_info("c_mr", {"Modality": "MR"})
    queue = NextUnreviewed()

    def handed_out(modality: str) -> list[str]:
        handed: list[str] = []
        while (answer := queue({"modality": modality, "exclude": handed}, store)) is not None:
            handed.append(answer["id"])
        return handed

    assert handed_out("ct") == ["a_ct"]
    assert handed_out("mr") == ["b_mr", "c_mr"]
    assert handed_out("") == ["a_ct", "b_mr", "c_mr"]


def test_a_stop_of_a_training_run_is_on_record_once_the_run_is_killed(tmp_path, monkeypatch):
    """``DELETE /train/`` wrote ``training_stopped`` BEFORE it killed the run: a server killed in between left a stop
    on record for a run that went on (and could publish weights), and a run that had ended by itself ("ENDED") was
    on record as stopped too. ``training_stopping`` comes first now, ``training_stopped`` once the run (a real
    process here) is killed, ``training_stopped_failed`` when it had ended."""
    import subprocess
    import sys

    import monailabel.endpoints.train as train_routes
    from monailabel.config import settings
    from monailabel.interfaces.utils import app as app_utils
    from monailabel.utils.async_tasks import utils as async_utils

    from conftest import import_app_main
    from lib.endpoints.guards import guarded_stop_training

    studies = tmp_path / "studies"
    studies.mkdir()
    shutil.copy(SAMPLE_STUDIES / "mr_slice_pydicom_mr2.nii.gz", studies / "a.nii.gz")
    (tmp_path / "model").mkdir()
    app = import_app_main().DenoisingApp(str(tmp_path / "app"), str(studies),
                                         {"models": "nlm", "model_dir": str(tmp_path / "model")})
    monkeypatch.setitem(app_utils.apps, f"{settings.MONAI_LABEL_APP_DIR}{settings.MONAI_LABEL_STUDIES}", app)
    request = {"model": "nlm", "requested_by": "admin_a", "training_request_seq": 0}
    runs = []

    def running(code: str) -> subprocess.Popen:
        run = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
        runs.append(run)
        monkeypatch.setitem(async_utils.background_processes, "train", {"t1": run})
        monkeypatch.setitem(async_utils.background_tasks, "train", [{"id": "t1", "request": request}])
        return run

    def killed(*args, **kwargs):
        raise _Killed()

    stop = train_routes.stop
    try:
        run = running("import time; time.sleep(600)")
        monkeypatch.setattr(train_routes, "stop", killed)  # the server killed before it killed the run
        with pytest.raises(_Killed):
            guarded_stop_training(user=None)
        assert run.poll() is None
        assert not _events(app.audit, "training_stopped")
        assert [e["pid"] for e in _events(app.audit, "training_stopping")] == [run.pid]
        monkeypatch.setattr(train_routes, "stop", stop)
        guarded_stop_training(user=None)
        assert run.wait(timeout=60) is not None
        stopped = app.audit.entries("training_stopped")
        assert len(stopped) == 1 and stopped[0]["fields"]["pid"] == run.pid
        assert stopped[0]["fields"]["pending_seq"] == app.audit.entries("training_stopping")[-1]["seq"]

        ended = running("pass")  # a run that ends by itself before the stop
        ended.wait(timeout=60)
        answer = guarded_stop_training(user=None)
        assert answer["status"] == "ENDED", answer
        assert len(app.audit.entries("training_stopped")) == 1
        assert _events(app.audit, "training_stopped_failed")[-1]["pid"] == ended.pid
    finally:
        for run in runs:
            if run.poll() is None:
                run.kill()
                run.wait(timeout=60)


# ------------------------------------------------------------------------------------------------ real server
@pytest.fixture()
def folders(tmp_path, tiny_weights):
    from mlserver import copy_weights, shared_studies

    return {"studies": shared_studies(tmp_path / "studies"), "model": copy_weights(tiny_weights, tmp_path / "model"),
            "audit": tmp_path / "audit_log", "work": tmp_path / "work", "root": tmp_path}


def _save_final_label_of_slab_b(folders, url: str) -> Path:
    """Store a final label of ``ct_slab_b`` (its own voxels as float, written to ``folders["root"] /
    "ct_slab_b_final.nii.gz"``) on the server at ``url``; returns the study's file."""
    study = folders["studies"] / "ct_slab_b.nii.gz"
    correction = folders["root"] / "ct_slab_b_final.nii.gz"
    sitk.WriteImage(sitk.Cast(sitk.ReadImage(str(study)), sitk.sitkFloat32), str(correction))
    with open(correction, "rb") as handle:
        saved = requests.put(f"{url}/datastore/label", params={"image": "ct_slab_b", "tag": "final"},
                             files={"label": ("ct_slab_b.nii.gz", handle)}, data={"params": "{}"}, timeout=120)
    assert saved.status_code == 200, saved.text
    return study


def _start(folders, run: int):
    from mlserver import start_server

    return start_server(folders["studies"], folders["model"], folders["work"] / f"run{run}",
                        conf={"audit_dir": folders["audit"], "max_voxels": 3_000_000})


def _events(audit: AuditLog, event: str) -> list[dict]:
    return [e["fields"] for e in audit.entries(event)]


@pytest.mark.server
@pytest.mark.slow
def test_a_server_started_after_a_verdict_cut_short_does_not_hand_the_study_out_again(folders):
    """The real start-up sets the review queue's copy of a verdict from the log (a server killed between the two
    writes): the judged study is not handed out for review again."""
    from mlserver import stop_server

    from lib.activelearning import record_verdict

    audit = AuditLog(folders["audit"])
    store = _killable_datastore(folders["root"], audit, {"update_image_info": "before"})
    audit.append("result", {"input": {"source": "datastore", "image": "ct_slab_b"}, "model": "adl"})
    with pytest.raises(_Killed):
        record_verdict(audit, store, "ct_slab_b", "accepted", "dr_a")
    server = _start(folders, 1)
    try:
        answer = requests.post(f"{server.url}/activelearning/next_unreviewed", json={}, timeout=60)
        assert answer.status_code == 200 and answer.json()["id"] == "ct_slab_c", answer.text
    finally:
        stop_server(server)


@pytest.mark.server
@pytest.mark.slow
def test_a_review_queue_hand_out_is_one_access_entry_and_info_updates_stay_recorded(folders):
    """A study handed out by the review queue (MONAI Label's stock ``POST /activelearning/{strategy}``) is ONE
    ``review_queue_handout`` entry: the study, the strategy, what the client asked and who asked. The stock route's
    note of the hand-out in the image's info (``strategy``) left an ``image_info_updating`` / ``image_info_updated``
    pair on every hand-out; the note is still kept, with no entries of its own. An info update of the stock route
    (``PUT /datastore/image/info``) is still recorded as its pair, and so is the modality the queue reads once from
    the image of a study whose info names none, for the request for CT (the request's route and client), and the
    chain verifies."""
    from mlserver import stop_server

    from lib.activelearning import HANDOUT_EVENT

    server = _start(folders, 1)
    try:
        url = server.url
        handed = [requests.post(f"{url}/activelearning/next_unreviewed", json=body, timeout=60)
                  for body in ({}, {"modality": "ct", "client_id": "reading-room-3"})]
        for answer in handed:  # the queue's choice as before: the first unreviewed study, twice
            assert answer.status_code == 200 and answer.json()["id"] == "ct_slab_b", answer.text
        noted = requests.put(f"{url}/datastore/image/info", params={"image": "ct_slab_b"},
                             data={"info": json.dumps({"note": "second opinion asked"})}, timeout=60)
        assert noted.status_code == 200, noted.text
        info = requests.get(f"{url}/datastore/image/info", params={"image": "ct_slab_b"}, timeout=60).json()
        assert info["note"] == "second opinion asked" and info["strategy"]["next_unreviewed"]["client_id"] == \
            "reading-room-3", info
        verify = requests.get(f"{url}/review/audit/verify", timeout=60).json()
        assert verify["ok"] and not verify["refusing_entries"], verify
    finally:
        stop_server(server)
    audit = AuditLog(folders["audit"])
    assert audit.verify().ok
    entries = [json.loads(line) for line in audit.path.read_text().splitlines()]  # the file the server wrote
    assert [e["event"] for e in entries] == ["server_started", HANDOUT_EVENT, "image_info_updating",
                                             "image_info_updated", HANDOUT_EVENT, "image_info_updating",
                                             "image_info_updated", "image_info_read"]
    handouts = [entries[1]["fields"], entries[4]["fields"]]
    assert [(h["image"], h["strategy"], h["modality"], h["client_id"], h["remaining_unreviewed"]) for h in handouts] \
        == [("ct_slab_b", "next_unreviewed", None, None, 4),
            ("ct_slab_b", "next_unreviewed", "ct", "reading-room-3", 4)]
    assert all(h["user"] is None and h["client"] == "127.0.0.1" and h["route"] == "POST /activelearning/next_unreviewed"
               for h in handouts)
    pending, updated = (e["fields"] for e in entries[2:4])  # the modality read for the request for CT
    assert pending["info"] == updated["info"] == {"modality": "CT"} and updated["image"] == "ct_slab_b"
    assert updated["route"] == "POST /activelearning/next_unreviewed" and updated["client"] == "127.0.0.1"
    pending, updated = (e["fields"] for e in entries[5:7])
    assert pending["info"] == updated["info"] and updated["info"]["note"] == "second opinion asked"
    assert updated["pending_seq"] == entries[5]["seq"]


@pytest.mark.server
@pytest.mark.slow
def test_the_review_queue_reads_an_unknown_modality_from_the_image_once(tmp_path, tiny_weights):
    """A local study whose info names no modality (a NIfTI uploaded without one) went to a request for CT and to
    one for MR alike: a radiologist asking for MR got the CT. Its image is read once now (a real CT and a real MR
    NIfTI here, no modality in their info), the modality kept in its info by an ordinary audited update; a study
    whose file cannot be read is skipped for such requests (a warning in the server's log), not handed out, and the
    queue goes on. A request for no modality hands out every study, as before."""
    from mlserver import copy_weights, queue_hand_outs, start_server, stop_server

    studies = tmp_path / "studies"
    studies.mkdir()
    shutil.copy(SAMPLE_STUDIES / "ct_head_pydicom693_ld25.nii.gz", studies / "a_ct.nii.gz")
    mr = (SAMPLE_STUDIES / "mr_slice_pydicom_mr2_rician5.nii.gz").read_bytes()
    (studies / "b_broken.nii.gz").write_bytes(mr[:4000])  # cut short: not readable
    shutil.copy(SAMPLE_STUDIES / "mr_slice_pydicom_mr2_rician5.nii.gz", studies / "c_mr.nii.gz")
    audit_dir = tmp_path / "audit_log"
    server = start_server(studies, copy_weights(tiny_weights, tmp_path / "model"), tmp_path / "work",
                          conf={"audit_dir": audit_dir, "max_voxels": 3_000_000})

    def handed_out(modality: str) -> list[str]:
        return queue_hand_outs(server.url, modality)

    try:
        for study in ("a_ct", "c_mr"):
            info = requests.get(f"{server.url}/datastore/image/info", params={"image": study}, timeout=60).json()
            assert "modality" not in info and "Modality" not in info, info
        assert handed_out("mr") == ["c_mr"]
        assert handed_out("ct") == ["a_ct"]
        assert handed_out("mr") == ["c_mr"]  # from the info now
        assert handed_out("") == ["a_ct", "b_broken", "c_mr"]
        for study, modality in (("a_ct", "CT"), ("c_mr", "MR")):
            info = requests.get(f"{server.url}/datastore/image/info", params={"image": study}, timeout=60).json()
            assert info["modality"] == modality, info
    finally:
        stop_server(server)
    assert "review queue: b_broken skipped for a request for MR" in server.log_tail(100_000)
    audit = AuditLog(audit_dir)
    assert audit.verify().ok
    updated = _events(audit, "image_info_updated")  # each modality read once, on the request that needed it
    assert sorted((e["image"], e["info"]) for e in updated) == [("a_ct", {"modality": "CT"}),
                                                                ("c_mr", {"modality": "MR"})]
    assert all(e["route"] == "POST /activelearning/next_unreviewed" for e in updated)
    assert not _events(audit, "image_info_updated_failed")


@pytest.mark.server
@pytest.mark.slow
def test_the_review_queue_reads_an_unreadable_study_once_and_an_oversized_ones_modality_from_its_header(tmp_path,
                                                                                                       tiny_weights):
    """Two faults of the local review queue's ``modality`` filter, on real files and a real server (voxel limit
    200,000 by ``ADL_MAX_VOXELS``). (1) A study whose file cannot be read (a cut NIfTI) was read again, with a
    warning, by every request for CT or MR that passed it: it is read once (one warning in the server's log) until
    its file changes, then read again (a changed, still cut file: a second warning; a readable MR put in its place:
    handed out to MR); never handed out to CT or MR while it cannot be read. (2) A study over the voxel limit never
    went to a CT or MR request (its modality was read from its voxels, refused as too large): a DICOM file's
    modality is read from its header (a CT goes to CT requests, not to MR ones, as an unfiltered request hands it
    out); a NIfTI's, known from its voxels alone, is not guessed but listed in ``too_large_to_review``, also when
    nothing else is left, never left out in silence."""
    import data_store  # pydicom-data: a real 512 x 512 CT slice, as a DICOM file

    from mlserver import copy_weights, queue_hand_outs, start_server, stop_server, write_crop

    studies = tmp_path / "studies"
    studies.mkdir()
    write_crop(SAMPLE_STUDIES / "ct_head_invesalius_ld25.nii.gz", studies / "a_ct.nii.gz", z=slice(40, 43))
    write_crop(SAMPLE_STUDIES / "mr_head_colin27_rician5.nii.gz", studies / "c_mr.nii.gz", z=slice(80, 83))
    cut = (studies / "c_mr.nii.gz").read_bytes()  # under the limit: its header reads, its voxels do not
    (studies / "b_broken.nii.gz").write_bytes(cut[:len(cut) // 2])
    write_crop(SAMPLE_STUDIES / "ct_head_invesalius_ld25.nii.gz", studies / "d_big.nii.gz", z=slice(40, 44))
    shutil.copy(Path(data_store.__file__).parent / "data" / "693_UNCR.dcm", studies / "e_big.dcm")
    big = {"id": "d_big", "voxels": 256 * 256 * 4, "limit": 200_000}
    server = start_server(studies, copy_weights(tiny_weights, tmp_path / "model"), tmp_path / "work",
                          conf={"audit_dir": tmp_path / "audit_log"},
                          env={"ADL_MAX_VOXELS": "200000", "MONAI_LABEL_DATASTORE_FILE_EXT": '["*.nii.gz", "*.dcm"]'})

    def ask(modality: str, exclude: list[str]) -> dict:
        """The queue's answer: the study handed out (id), the count, the studies too large (no info fields)."""
        answer = requests.post(f"{server.url}/activelearning/next_unreviewed",
                               json={"modality": modality, "exclude": exclude}, timeout=600)
        assert answer.status_code == 200, answer.text
        return {k: v for k, v in answer.json().items() if k in ("id", "remaining_unreviewed", "too_large_to_review")}

    def warnings(study: str) -> int:
        return server.log_tail(1_000_000).count(f"review queue: {study} ")

    try:
        assert queue_hand_outs(server.url, "") == ["a_ct", "b_broken", "c_mr", "d_big", "e_big"]
        for _ in range(3):  # each request passes the cut study and the oversized NIfTI
            assert ask("ct", ["a_ct"]) == {"id": "e_big", "remaining_unreviewed": 5, "too_large_to_review": [big]}
            assert ask("mr", ["c_mr"]) == {"remaining_unreviewed": 5, "too_large_to_review": [big]}
            assert ask("ct", ["a_ct", "e_big"]) == {"remaining_unreviewed": 5, "too_large_to_review": [big]}
        assert ask("mr", [])["id"] == "c_mr" and ask("ct", [])["id"] == "a_ct"
        assert (warnings("b_broken"), warnings("d_big")) == (1, 1)
        info = requests.get(f"{server.url}/datastore/image/info", params={"image": "e_big"}, timeout=60).json()
        assert info["modality"] == "CT", info  # from the header, kept as a read modality is
        (studies / "b_broken.nii.gz").write_bytes(cut[:len(cut) // 3])  # changed, still cut: read again
        assert ask("mr", ["c_mr"]) == {"remaining_unreviewed": 5, "too_large_to_review": [big]}
        assert ask("ct", ["a_ct", "e_big"]) == {"remaining_unreviewed": 5, "too_large_to_review": [big]}
        assert warnings("b_broken") == 2
        shutil.copy(studies / "c_mr.nii.gz", studies / "b_broken.nii.gz")  # a readable MR now
        assert ask("ct", ["a_ct", "e_big"]) == {"remaining_unreviewed": 5, "too_large_to_review": [big]}
        assert ask("mr", ["c_mr"]) == {"id": "b_broken", "remaining_unreviewed": 5}  # before d_big
        assert warnings("b_broken") == 2
    finally:
        stop_server(server)


@pytest.mark.server
@pytest.mark.slow
def test_the_review_queue_reads_at_the_servers_conf_limit_above_the_environments(tmp_path, tiny_weights):
    """``--conf max_voxels`` above ``ADL_MAX_VOXELS`` (300,000 and 200,000), on a real server: the server's limit is
    its conf (the environment's is the default where the conf sets none, as ``read_volume(max_voxels=...)`` takes
    precedence over it), for the queue as for the denoising of what it hands out. A NIfTI study between the two
    (256 x 256 x 4 = 262,144 voxels), whose modality is known from its voxels alone, is read and handed out to a
    CT request, not listed as too large by the environment's limit, and denoised by id; one over the conf
    (393,216) is listed in ``too_large_to_review`` with the conf's limit, and its denoising refused (413)."""
    from mlserver import copy_weights, start_server, stop_server, write_crop

    studies = tmp_path / "studies"
    studies.mkdir()
    source = SAMPLE_STUDIES / "ct_head_invesalius_ld25.nii.gz"
    write_crop(source, studies / "a_ct.nii.gz", z=slice(40, 43))
    write_crop(source, studies / "b_between.nii.gz", z=slice(40, 44))
    write_crop(source, studies / "c_over.nii.gz", z=slice(40, 46))
    server = start_server(studies, copy_weights(tiny_weights, tmp_path / "model"), tmp_path / "work",
                          conf={"audit_dir": tmp_path / "audit_log", "max_voxels": 300_000},
                          env={"ADL_MAX_VOXELS": "200000"})

    def ask(exclude: list[str]) -> dict:
        answer = requests.post(f"{server.url}/activelearning/next_unreviewed",
                               json={"modality": "ct", "exclude": exclude}, timeout=600)
        assert answer.status_code == 200, answer.text
        return {k: v for k, v in answer.json().items() if k in ("id", "remaining_unreviewed", "too_large_to_review")}

    def denoise(image: str) -> requests.Response:
        return requests.post(f"{server.url}/infer/adl", params={"image": image, "output": "json"},
                             data={"params": json.dumps({"result_dtype": "float32"})}, timeout=600)

    try:
        assert ask(["a_ct"]) == {"id": "b_between", "remaining_unreviewed": 3}
        over = {"id": "c_over", "voxels": 256 * 256 * 6, "limit": 300_000}
        assert ask(["a_ct", "b_between"]) == {"remaining_unreviewed": 3, "too_large_to_review": [over]}
        info = requests.get(f"{server.url}/datastore/image/info", params={"image": "b_between"}, timeout=60).json()
        assert info["modality"] == "CT", info  # read from its voxels, at the conf's limit
        denoised = denoise("b_between")
        assert denoised.status_code == 200, denoised.text
        refused = denoise("c_over")
        assert refused.status_code == 413 and "300,000" in refused.text, refused.text
        assert "review queue: b_between " not in server.log_tail(1_000_000)
    finally:
        stop_server(server)


def _put_label(url: str, image: str, tag: str, path: Path, params: dict | None = None) -> requests.Response:
    with open(path, "rb") as handle:
        return requests.put(f"{url}/datastore/label", params={"image": image, "tag": tag},
                            files={"label": (path.name, handle)}, data={"params": json.dumps(params or {})},
                            timeout=120)


#: rows and columns of the head (its brain and skull) a slab is cut to where only its voxel count matters
BRAIN = (slice(64, 192), slice(64, 192))


def _slabs_between(studies: Path, yx: tuple[slice, slice] | None = None,
                   voxels: tuple[int, int] = (250_000, 300_000)) -> list[str]:
    """Two 4-slice CT slabs of the head (256 x 256 x 4 = 262,144 voxels: over 200,000 and 250,000, under 300,000;
    128 x 128 x 4 = 65,536 cut to ``BRAIN``) in ``studies``, named as :func:`write_full_dose` knows them; each
    slab's voxel count is checked to lie within ``voxels``."""
    from mlserver import write_crop

    for image, z in (("ct_slab_b", slice(40, 44)), ("ct_slab_c", slice(70, 74))):
        write_crop(SAMPLE_STUDIES / "ct_head_invesalius_ld25.nii.gz", studies / f"{image}.nii.gz", z=z, yx=yx)
        size = sitk.ReadImage(str(studies / f"{image}.nii.gz")).GetSize()
        assert voxels[0] < size[0] * size[1] * size[2] < voxels[1], size
    return ["ct_slab_b", "ct_slab_c"]


def _wait_for_training(url: str, model: str = "adl", timeout: float = 900) -> dict:
    """The model's train_stats once MONAI Label's training task has ended."""
    deadline = time.monotonic() + timeout
    while requests.get(f"{url}/train/", timeout=60).json().get("status") in ("RUNNING", "SUBMITTED", "QUEUED"):
        assert time.monotonic() < deadline, "training did not end in time"
        time.sleep(1.0)
    return requests.get(f"{url}/info/", timeout=60).json()["train_stats"][model]


@pytest.mark.server
@pytest.mark.slow
def test_a_fine_tune_reads_the_corrections_at_the_servers_conf_limit_above_the_environments(tmp_path, tiny_weights):
    """Fine-tuning reads what it learns from at the server's limit, ``--conf max_voxels`` (80,000), as infer and
    the review queue do, not at ``ADL_MAX_VOXELS`` (50,000). Two CT slabs between the two (65,536 voxels: the brain
    of 4 slices, so that each step of the runs sees a quarter of the whole slices' pixels), each with a clinician's
    correction, one with a keep region marked on it, are the run's training and validation images, its region read;
    then ``adapt_noise`` learns from both slabs. They were refused: the region map by its route's reads (422), the
    train request by the read of a correction's study for its modality (500), and with those read at the conf the
    runs by their reads of the pairs, and of the low-dose images (failed runs)."""
    import numpy as np

    from mlserver import copy_weights, start_server, stop_server

    studies = tmp_path / "studies"
    images = _slabs_between(studies, BRAIN, voxels=(50_000, 80_000))
    server = start_server(studies, copy_weights(tiny_weights, tmp_path / "model"), tmp_path / "work",
                          conf={"audit_dir": tmp_path / "audit_log", "max_voxels": 80_000},
                          env={"ADL_MAX_VOXELS": "50000"})
    try:
        grid = sitk.ReadImage(str(studies / "ct_slab_b.nii.gz"))
        marked = np.zeros(sitk.GetArrayFromImage(grid).shape, np.uint8)
        marked[:, 36:76, 36:76] = 1  # rows and columns 100-139 of the whole slices
        region_map = sitk.GetImageFromArray(marked)
        region_map.CopyInformation(grid)
        map_path = tmp_path / "ct_slab_b_regions.nii.gz"
        sitk.WriteImage(region_map, str(map_path))
        saved = _put_label(server.url, "ct_slab_b", "regions", map_path,
                           {"regions": [{"value": 1, "name": "nodule", "intent": "keep"}]})
        assert saved.status_code == 200, saved.text
        for image in images:  # the full-dose slab as the correction; ct_slab_b's names its region map
            sent_with = {"regions_sha256": hashlib.sha256(map_path.read_bytes()).hexdigest()} \
                if image == "ct_slab_b" else {}
            saved = _put_label(server.url, image, "final",
                               write_full_dose(tmp_path / f"{image}_final.nii.gz", image, BRAIN), sent_with)
            assert saved.status_code == 200, saved.text
        started = requests.post(f"{server.url}/train/adl", json={"steps": 6, "patch_size": 32, "device": "cpu"},
                                timeout=600)
        assert started.status_code == 200, started.text
        stats = _wait_for_training(server.url)
        assert stats["status"] == "done", (stats, server.log_tail())
        assert sorted(stats["data"]["train_images"] + stats["decision"]["validation_images"]) == images, stats
        assert list(stats["data"].get("regions", {})) == ["ct_slab_b"], stats["data"]
        started = requests.post(f"{server.url}/train/tddl_gcn", json={"mode": "adapt_noise", "steps": 2,
                                                                      "patch_size": 32, "noise_steps": 2,
                                                                      "device": "cpu"}, timeout=600)
        assert started.status_code == 200, started.text
        stats = _wait_for_training(server.url, "tddl_gcn")
        assert stats["status"] == "done", (stats, server.log_tail())
        assert sorted(stats["data"]["low_dose_images"]) == images, stats["data"]
    finally:
        stop_server(server)


@pytest.mark.server
@pytest.mark.slow
@pytest.mark.parametrize("modality_known", [False, True], ids=["modality-read", "modality-in-info"])
def test_a_read_over_the_voxel_limit_that_no_route_answers_is_a_413_with_the_readers_message(tmp_path, tiny_weights,
                                                                                            modality_known):
    """An image over the voxel limit met by a read that its route does not answer itself is a 413 with the reader's
    message (what, how large, the limit, how to raise it; no server path), by the app's one handler (which answers
    a PACS store's refusal too): it was a bare 500. Here, on a real server: two CT slabs (262,144 voxels) corrected
    under ``--conf max_voxels 300000``, the server restarted with 250,000; the train request reads a correction's
    study for its modality: 413 naming the study, and the server answers on. With the studies' modality already in
    their info (the review queue read it under 300,000), nothing was read for it: the request was accepted and its
    run failed on the oversized study; each correction pair is now checked from its headers (image and label)
    before a run is launched: the same 413, no run. There the limit is adl's own (``--conf max_voxels_adl``, over a
    ``max_voxels`` that the slabs fit in): the 413 names the model and that key (it named ``max_voxels``, which
    does not raise it)."""
    from mlserver import copy_weights, queue_hand_outs, start_server, stop_server

    studies = tmp_path / "studies"
    images = _slabs_between(studies)
    model = copy_weights(tiny_weights, tmp_path / "model")
    server = start_server(studies, model, tmp_path / "work1",
                          conf={"audit_dir": tmp_path / "audit_log", "max_voxels": 300_000})
    try:
        if modality_known:  # the review queue reads each study's modality once and keeps it in its info
            assert queue_hand_outs(server.url, "ct") == images
        for image in images:
            saved = _put_label(server.url, image, "final", write_full_dose(tmp_path / f"{image}_final.nii.gz", image))
            assert saved.status_code == 200, saved.text
            info = requests.get(f"{server.url}/datastore/image/info", params={"image": image}, timeout=60).json()
            assert info.get("modality") == ("CT" if modality_known else None), info
    finally:
        stop_server(server)
    limits, words = (({"max_voxels": 300_000, "max_voxels_adl": 250_000},
                      ("adl's limit of 250,000 voxels", "(raise it with --conf max_voxels_adl on the server")) if
                     modality_known else ({"max_voxels": 250_000}, ("the limit of 250,000", "--conf max_voxels")))
    server = start_server(studies, model, tmp_path / "work2", conf={"audit_dir": tmp_path / "audit_log", **limits})
    try:
        refused = requests.post(f"{server.url}/train/adl", json={"steps": 2, "patch_size": 32, "device": "cpu"},
                                timeout=600)
        assert refused.status_code == 413, (refused.status_code, refused.text, _wait_for_training(server.url))
        detail = refused.json()["detail"]
        assert detail.startswith("study ct_slab_b: ct_slab_b.nii.gz is too large: 256 x 256 x 4 = 262,144 voxels "
                                 f"exceeds {words[0]}") and words[1] in detail, detail
        assert requests.get(f"{server.url}/info/", timeout=60).json()["train_stats"]["adl"]["status"] == \
            "never trained"
    finally:
        stop_server(server)


@pytest.mark.server
@pytest.mark.slow
def test_a_fine_tune_request_whose_correction_cannot_be_read_is_refused_naming_the_file(tmp_path, tiny_weights):
    """A correction pair whose file the header check cannot read (missing, corrupt, not an image), whose file is
    cut short (its header declares more voxels than it holds), or whose correction is not of its study's size passed
    the train request (only the size limit was checked there), and the run failed on it later. Here, on a real
    server: two CT slabs corrected (their modality in their info: the review queue read it), one correction's stamp
    without the image's SHA-256 (as stamps written before ``image_sha256`` existed) and its study file then replaced
    by the first half of its bytes, by a 3-slice crop (the correction has 4), and by bytes that are no image: each
    ``POST /train/adl`` is a 422 naming the study and its file (no server path) and what is wrong, no run started
    (train_stats "never trained"), and no entry of the request in the audit log. Without the study's modality in its
    info, the read of its modality fails the same way (it was a bare 500)."""
    from mlserver import copy_weights, queue_hand_outs, start_server, stop_server, write_crop

    studies = tmp_path / "studies"
    images = _slabs_between(studies)
    model = copy_weights(tiny_weights, tmp_path / "model")
    conf = {"audit_dir": tmp_path / "audit_log", "max_voxels": 300_000}
    server = start_server(studies, model, tmp_path / "work1", conf=conf)
    try:
        assert queue_hand_outs(server.url, "ct") == images  # their modality kept in their info
        for image in images:
            saved = _put_label(server.url, image, "final", write_full_dose(tmp_path / f"{image}_final.nii.gz", image))
            assert saved.status_code == 200, saved.text
    finally:
        stop_server(server)
    index = studies / "datastore_v2.json"
    data = json.loads(index.read_text())
    stamp = data["objects"]["ct_slab_b"]["labels"]["final"]["info"]
    assert stamp.pop("image_sha256"), stamp  # an older stamp: the study's file not named by its hash
    index.write_text(json.dumps(data))
    study = studies / "ct_slab_b.nii.gz"
    whole = study.read_bytes()
    study.write_bytes(whole[: len(whole) // 2])  # a copy cut short: its header declares 4 slices
    server = start_server(studies, model, tmp_path / "work2", conf=conf)

    def refusal() -> str:
        refused = requests.post(f"{server.url}/train/adl", json={"steps": 2, "patch_size": 32, "device": "cpu"},
                                timeout=600)
        assert refused.status_code == 422, (refused.status_code, refused.text, _wait_for_training(server.url))
        detail = refused.json()["detail"]
        assert str(tmp_path) not in detail, detail
        return detail

    try:
        detail = refusal()
        assert detail == ("study ct_slab_b: ct_slab_b.nii.gz is truncated or corrupt: its gzip stream is broken "
                          "(Compressed file ended before the end-of-stream marker was reached); no run was started"), \
            detail
        write_crop(SAMPLE_STUDIES / "ct_head_invesalius_ld25.nii.gz", study, z=slice(40, 43))
        detail = refusal()
        assert detail == ("the correction of study ct_slab_b: ct_slab_b.nii.gz holds 256 x 256 x 4 voxels, its study "
                          "ct_slab_b.nii.gz 256 x 256 x 3 (the study was replaced since the correction was saved?); "
                          "save the correction again on the study's grid; no run was started"), detail
        study.write_bytes(b"not an image at all\n" * 100)
        detail = refusal()
        assert detail == ("study ct_slab_b: cannot read ct_slab_b.nii.gz: its content is not a NIfTI, NRRD or "
                          "MetaImage image (no image reader recognises it); no run was started"), detail
        assert requests.get(f"{server.url}/info/", timeout=60).json()["train_stats"]["adl"]["status"] == \
            "never trained"
        assert not _events(AuditLog(tmp_path / "audit_log"), "training_requested")
    finally:
        stop_server(server)
    # a study whose modality is not in its info has it read first: that read's failure was a bare 500, now the same
    from monailabel.datastore.local import LocalDatastore

    from lib.trainers import TrainingDataError
    from lib.trainers.finetune import correction_pairs

    assert data["objects"]["ct_slab_b"]["image"]["info"].pop("modality") == "CT"
    index.write_text(json.dumps(data))
    with pytest.raises(TrainingDataError) as raised:
        correction_pairs(LocalDatastore(str(studies), read_only=True), max_voxels=300_000)
    assert str(raised.value).startswith("study ct_slab_b: cannot read ") and "no run was started" in str(raised.value)


@pytest.mark.server
@pytest.mark.slow
def test_audit_trail_survives_a_restart_and_reports_tampering(folders):
    from mlserver import stop_server

    audit = AuditLog(folders["audit"])
    study = folders["studies"] / "ct_slab_b.nii.gz"
    upload = folders["root"] / "upload_crop.nii.gz"
    shutil.copy(folders["studies"] / "ct_slab_c.nii.gz", upload)
    long_reason = "r" * 2001
    server = _start(folders, 1)
    try:
        url = server.url
        by_id = requests.post(f"{url}/infer/adl", params={"image": "ct_slab_b", "output": "json"},
                              data={"params": json.dumps({"result_dtype": "float32"})}, timeout=600)
        assert by_id.status_code == 200, by_id.text
        with open(upload, "rb") as handle:
            uploaded = requests.post(f"{url}/infer/nlm", params={"output": "json"}, data={"params": "{}"},
                                     files={"file": ("3: CT HEAD.nii.gz", handle)}, timeout=600)
        assert uploaded.status_code == 200, uploaded.text
        with open(upload, "rb") as handle:
            created = requests.put(f"{url}/session/", files={"files": ("study.nii.gz", handle)}, timeout=120)
        assert created.status_code == 200, created.text
        session_id = created.json()["session_id"]
        by_session = requests.post(f"{url}/infer/nlm", params={"session_id": session_id, "output": "json"},
                                   data={"params": "{}"}, timeout=600)
        assert by_session.status_code == 200, by_session.text
        for verdict, reviewer, reason in (("accepted", "dr_a", None), ("rejected", "dr_b", "smoothed a lesion")):
            answer = requests.post(f"{url}/review/ct_slab_b", json={"verdict": verdict, "reviewer": reviewer,
                                                                    "reason": reason}, timeout=60)
            assert answer.status_code == 200, answer.text
        too_long = requests.post(f"{url}/review/ct_slab_b", json={"verdict": "rejected", "reviewer": "dr_b",
                                                                  "reason": long_reason}, timeout=60)
        assert too_long.status_code == 422 and "2000" in too_long.text
        # the stock routes: a forged verdict is refused; other info changes and a deletion leave entries
        forged = requests.put(f"{url}/datastore/image/info", params={"image": "ct_slab_b"},
                              data={"info": json.dumps({"review": {"verdict": "accepted", "reviewer": "mallory"}})},
                              timeout=60)
        assert forged.status_code == 422, forged.text
        noted = requests.put(f"{url}/datastore/image/info", params={"image": "ct_slab_b"},
                             data={"info": json.dumps({"note": "second opinion asked"})}, timeout=60)
        assert noted.status_code == 200, noted.text
        _save_final_label_of_slab_b(folders, url)
        restored = requests.post(f"{url}/versions/adl/restore", params={"modality": "ct", "version": "pretrained"},
                                 timeout=60)
        assert restored.status_code == 200, restored.text
        deleted = requests.delete(f"{url}/datastore/image", params={"id": "ct_slab_c"}, timeout=60)
        assert deleted.status_code == 200, deleted.text
        trail = requests.get(f"{url}/review/ct_slab_b", timeout=60).json()
        assert [h["reviewer"] for h in trail["review_history"]] == ["dr_a", "dr_b"]
        assert trail["review"]["verdict"] == "rejected" and trail["denoise_results"][-1]["model"] == "adl"
        assert requests.get(f"{url}/review/audit/verify", timeout=60).json()["ok"]
    finally:
        stop_server(server)

    # the file itself, server stopped: an intact chain holding every record
    report = audit.verify()
    assert report.ok, report
    results = _events(audit, "result")
    assert [r["input"]["source"] for r in results] == ["datastore", "upload", "session"]
    assert results[2]["input"]["session_id"] == session_id
    assert results[2]["input"]["content_sha256"] == results[1]["input"]["content_sha256"]  # the same volume
    assert results[0]["input"]["image"] == "ct_slab_b"
    assert results[0]["input"]["content_sha256"] == volume_content_sha256(study)
    assert results[1]["input"]["content_sha256"] == volume_content_sha256(upload) != volume_content_sha256(study)
    assert results[0]["weights_version"] == "pretrained"
    assert results[0]["weights_sha256"] == hashlib.sha256(
        (folders["model"] / "pretrained_adl_ct.pt").read_bytes()).hexdigest()
    assert results[0]["params"]["result_dtype"] == "float32" and "image" not in results[0]["params"]
    assert results[0]["user"] is None and results[0]["client"] == "127.0.0.1"
    assert by_id.json()["audit_seq"] == audit.entries("result")[0]["seq"]
    verdicts = _events(audit, "verdict")
    assert [(v["verdict"], v["reviewer"], v["reviewer_from"]) for v in verdicts] == [
        ("accepted", "dr_a", "request body"), ("rejected", "dr_b", "request body")]
    assert verdicts[1]["result"]["model"] == "adl" and verdicts[1]["result"]["weights_version"] == "pretrained"
    assert _events(audit, "image_info_updated")[0]["info"]["note"] == "second opinion asked"
    assert [e["image"] for e in _events(audit, "image_removed")] == ["ct_slab_c"]
    label = _events(audit, "label_saved")[0]
    assert label["image"] == "ct_slab_b" and label["tag"] == "final"
    correction = folders["root"] / "ct_slab_b_final.nii.gz"  # the label _save_final_label_of_slab_b stored
    assert label["file_sha256"] == hashlib.sha256(correction.read_bytes()).hexdigest()
    assert [(e["model"], e["version"]) for e in _events(audit, "weights_restored")] == [("adl", "pretrained")]
    assert long_reason not in audit.path.read_text()
    # the datastore info keeps the current verdict only, no history
    datastore_json = (folders["studies"] / "datastore_v2.json").read_text()
    assert "review_history" not in datastore_json and "denoise_results" not in datastore_json
    assert "dr_a" not in datastore_json and "dr_b" in datastore_json
    count = report.entries

    # restart on the same folders: everything is there, verified
    server = _start(folders, 2)
    try:
        verify = requests.get(f"{server.url}/review/audit/verify", timeout=60).json()
        assert verify["ok"] and verify["entries"] == count + 1 and not verify["refusing_entries"]
        assert requests.get(f"{server.url}/info/", timeout=60).json()["audit"]["refusing_entries"] is False
        entries = requests.get(f"{server.url}/review/audit/entries", timeout=60).json()["entries"]
        assert [e["seq"] for e in entries] == list(range(count + 1))
        assert entries[-1]["event"] == "server_started"
        trail = requests.get(f"{server.url}/review/ct_slab_b", timeout=60).json()
        assert [h["reviewer"] for h in trail["review_history"]] == ["dr_a", "dr_b"]
        # edited while the server runs: the verification that finds it stops the chain from growing on it, as a
        # start-up verification does (entries went on being appended onto the tampered log)
        before = audit.path.read_bytes()
        audit.path.write_bytes(before.replace(b'"reviewer":"dr_a"', b'"reviewer":"dr_x"', 1))
        verify = requests.get(f"{server.url}/review/audit/verify", timeout=60).json()
        assert not verify["ok"] and verify["refusing_entries"], verify
        assert "AUDIT TRAIL BROKEN" in requests.get(f"{server.url}/info/", timeout=60).json()["audit"]["warning"]
        refused = requests.post(f"{server.url}/review/ct_slab_b", json={"verdict": "accepted", "reviewer": "dr_c"},
                                timeout=60)
        assert refused.status_code == 503 and "broken" in refused.text, refused.text
        audit.path.write_bytes(before)
    finally:
        stop_server(server)
    intact = audit.path.read_bytes()

    # tampering, then a restart: an edited field, then a deleted line
    lines = intact.splitlines(keepends=True)
    verdict_line = next(i for i, line in enumerate(lines) if b'"reviewer":"dr_a"' in line)
    for run, damaged, expected_line in (
            (3, lines[:verdict_line] + [lines[verdict_line].replace(b"dr_a", b"dr_x")] + lines[verdict_line + 1:],
             verdict_line + 1),
            (4, lines[:verdict_line] + lines[verdict_line + 1:], verdict_line + 1)):
        audit.path.write_bytes(b"".join(damaged))
        server = _start(folders, run)
        try:
            verify = requests.get(f"{server.url}/review/audit/verify", timeout=60).json()
            assert not verify["ok"] and verify["broken_line"] == expected_line and verify["refusing_entries"]
            assert not verify["at_start_up"]["ok"]
            assert "AUDIT TRAIL BROKEN" in requests.get(f"{server.url}/info/", timeout=60).json()["audit"]["warning"]
            refused = requests.post(f"{server.url}/review/ct_slab_b", json={"verdict": "accepted", "reviewer": "dr_a"},
                                    timeout=60)
            assert refused.status_code == 503 and "broken" in refused.text
            refused = requests.post(f"{server.url}/infer/adl", params={"image": "ct_slab_b", "output": "json"},
                                    data={"params": "{}"}, timeout=600)
            assert refused.status_code == 503 and "not denoised" in refused.text
            handed = requests.post(f"{server.url}/activelearning/next_unreviewed", json={}, timeout=60)
            assert handed.status_code == 503 and "the audit log could not be written" in handed.text and \
                "broken" in handed.text, handed.text  # access that cannot be recorded is refused
            assert "AUDIT TRAIL BROKEN" in server.log_tail(200_000)
        finally:
            stop_server(server)
        assert audit.path.read_bytes() == b"".join(damaged)  # nothing appended to a broken log


@pytest.mark.server
@pytest.mark.slow
def test_a_result_or_dataset_whose_audit_entry_cannot_be_written_is_not_sent_and_no_zip_is_left_behind(folders):
    """Two checks on one server (the same set-up; one start instead of two, neither reading what the other leaves):
    :func:`_a_result_whose_audit_entry_cannot_be_written_is_not_returned`, then
    :func:`_a_dataset_download_leaves_no_copy_of_the_datastore_in_the_servers_temp_folder`."""
    from mlserver import stop_server

    server = _start(folders, 1)
    try:
        _a_result_whose_audit_entry_cannot_be_written_is_not_returned(folders, server)
        _a_dataset_download_leaves_no_copy_of_the_datastore_in_the_servers_temp_folder(folders, server)
    finally:
        stop_server(server)
    assert len(_events(AuditLog(folders["audit"]), "dataset_downloaded")) == 1


def _a_result_whose_audit_entry_cannot_be_written_is_not_returned(folders, server) -> None:
    """With the log unwritable (a folder where the file is) a result is a 503, nothing left in the server's temp
    folder, and a verdict is not recorded (the queue does not move); the log put back, infer answers again."""
    audit_file = folders["audit"] / "audit.jsonl"
    kept = audit_file.read_bytes()
    audit_file.unlink()
    audit_file.mkdir()  # a folder where the log is: every append fails (chmod would not stop root)
    response = requests.post(f"{server.url}/infer/adl", params={"image": "ct_slab_b", "output": "image"},
                             data={"params": "{}"}, timeout=600)
    assert response.status_code == 503, response.status_code
    detail = response.json()["detail"]
    assert "denoised, but the result is not returned: the audit log could not be written" in detail, detail
    assert not list((folders["work"] / "run1" / "tmp").glob("adl_*")), "the unrecorded result was left behind"
    verdict = requests.post(f"{server.url}/review/ct_slab_b", json={"verdict": "accepted", "reviewer": "dr_a"},
                            timeout=60)
    assert verdict.status_code == 500 and "not recorded" in verdict.text
    info = requests.get(f"{server.url}/datastore/image/info", params={"image": "ct_slab_b"}, timeout=60).json()
    assert "review" not in info  # the queue did not move either
    audit_file.rmdir()
    audit_file.write_bytes(kept)
    assert requests.post(f"{server.url}/infer/adl", params={"image": "ct_slab_b", "output": "json"},
                         data={"params": "{}"}, timeout=600).status_code == 200


def _a_dataset_download_leaves_no_copy_of_the_datastore_in_the_servers_temp_folder(folders, server) -> None:
    """MONAI Label zips the whole datastore into the temp folder and never deletes the ZIP: the server (its TMPDIR a
    folder of this test) deletes it once sent, and a download refused because the audit log cannot be written (a
    folder where the file is) is refused before anything is zipped, leaving no copy of every patient's data. (One
    ``dataset_downloaded`` entry: checked by the caller once the server is stopped.)"""
    study = folders["studies"] / "ct_slab_b.nii.gz"
    correction = folders["root"] / "ct_slab_b_final.nii.gz"  # the ZIP holds the labelled studies: one at least
    sitk.WriteImage(sitk.Cast(sitk.ReadImage(str(study)), sitk.sitkFloat32), str(correction))
    temp = folders["work"] / "run1" / "tmp"  # the server's TMPDIR (mlserver.start_server)

    def left_after(deadline: float) -> set[str]:
        while True:  # the ZIP is deleted just after the answer's last byte: wait for it, generously
            left = {p.name for p in temp.rglob("*")} - before
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.2)

    with open(correction, "rb") as handle:
        saved = requests.put(f"{server.url}/datastore/label", params={"image": "ct_slab_b", "tag": "final"},
                             files={"label": ("ct_slab_b.nii.gz", handle)}, data={"params": "{}"}, timeout=120)
    assert saved.status_code == 200, saved.text
    before = {p.name for p in temp.rglob("*")}
    sent = requests.get(f"{server.url}/datastore/dataset", timeout=300)
    assert sent.status_code == 200 and sent.content[:2] == b"PK", (sent.status_code, sent.text[:200])
    assert left_after(time.monotonic() + 60) == set()
    audit_file = folders["audit"] / "audit.jsonl"
    kept = audit_file.read_bytes()
    audit_file.unlink()
    audit_file.mkdir()  # a folder where the log is: every append fails (chmod would not stop root)
    refused = requests.get(f"{server.url}/datastore/dataset", timeout=300)
    assert refused.status_code == 503, (refused.status_code, refused.text[:200])
    assert "the dataset was not sent: the audit log could not be written" in refused.json()["detail"]
    assert left_after(time.monotonic() + 10) == set()
    audit_file.rmdir()
    audit_file.write_bytes(kept)


@pytest.mark.server
@pytest.mark.slow
def test_downloads_of_patient_data_are_access_entries_and_refused_when_they_cannot_be_written(folders):
    """Who read which patient's data: a download of an image, a label, a session's volume and the whole dataset
    (MONAI Label's stock routes, which wrote no entry) is one access entry each (``image_downloaded``,
    ``label_downloaded``, ``session_image_downloaded``, ``dataset_downloaded``: the study and who asked), written
    before the file is sent; one of an id that is not there writes none. With the log unwritable (a folder where the
    file is) each is refused, 503 "the audit log could not be written", and no file is sent; it was sent unrecorded.
    A refused session download does no work first: ``update_ts`` leaves the session's access time (its expiry) as it
    was. The log written before is kept, and the chain verifies. ``HEAD`` of the label is the download without its
    body (the stock route took the label as ``image`` and wrote no entry): the same headers, the same entry (route
    ``HEAD``), and refused the same way."""
    from mlserver import stop_server

    server = _start(folders, 1)
    try:
        url = server.url
        study = _save_final_label_of_slab_b(folders, url)
        with open(study, "rb") as handle:
            created = requests.put(f"{url}/session/", files={"files": ("study.nii.gz", handle)}, timeout=120)
        assert created.status_code == 200, created.text
        session_id = created.json()["session_id"]
        reads = {  # event: (route, query)
            "image_downloaded": ("/datastore/image", {"image": "ct_slab_b"}),
            "label_downloaded": ("/datastore/label", {"label": "ct_slab_b", "tag": "final"}),
            "session_image_downloaded": (f"/session/{session_id}", {"image": "true"}),
            "dataset_downloaded": ("/datastore/dataset", {}),
        }
        for route, query in reads.values():
            answer = requests.get(url + route, params=query, timeout=120)
            assert answer.status_code == 200 and len(answer.content) > 1000, (route, answer.status_code)
        label = requests.get(f"{url}/datastore/label", params=reads["label_downloaded"][1], timeout=120)
        head = requests.head(f"{url}/datastore/label", params=reads["label_downloaded"][1], timeout=120)
        assert head.status_code == 200 and head.content == b"", (head.status_code, head.content[:200])
        assert head.headers["content-length"] == str(len(label.content)) == label.headers["content-length"]
        assert head.headers["content-type"] == label.headers["content-type"]
        image = requests.get(f"{url}/datastore/image", params={"image": "ct_slab_b"}, timeout=120)
        assert image.content == study.read_bytes()
        assert requests.get(f"{url}/datastore/image", params={"image": "no_such"}, timeout=120).status_code == 404

        audit_file = folders["audit"] / "audit.jsonl"
        kept = audit_file.read_bytes()
        audit_file.unlink()
        audit_file.mkdir()  # a folder where the log is: every append fails (chmod would not stop root)
        meta = folders["work"] / "run1" / "sessions" / session_id / "meta.info"  # MONAI_LABEL_SESSION_PATH
        meta_before = meta.read_bytes()
        time.sleep(1.1)  # an access time (whole seconds) written now would differ
        for route, query in [*reads.values(), (f"/session/{session_id}", {"image": "true", "update_ts": "true"})]:
            refused = requests.get(url + route, params=query, timeout=120)
            assert refused.status_code == 503, (route, refused.status_code, refused.text[:200])
            assert refused.headers["content-type"] == "application/json", (route, refused.headers)
            detail = refused.json()["detail"]
            assert "was not sent: the audit log could not be written" in detail, detail
            assert str(folders["root"]) not in detail, detail
        head = requests.head(f"{url}/datastore/label", params=reads["label_downloaded"][1], timeout=120)
        assert head.status_code == 503, head.status_code
        assert meta.read_bytes() == meta_before
        audit_file.rmdir()
        audit_file.write_bytes(kept)
        again = requests.get(f"{url}/datastore/image", params={"image": "ct_slab_b"}, timeout=120)
        assert again.status_code == 200 and again.content == study.read_bytes()
    finally:
        stop_server(server)
    audit = AuditLog(folders["audit"])
    assert audit.verify().ok and audit.path.read_bytes().startswith(kept)
    for event, (route, _) in reads.items():
        recorded = _events(audit, event)
        methods = ["GET", "GET", "HEAD"] if event == "label_downloaded" else ["GET"] * len(recorded)
        assert len(recorded) == (3 if event in ("image_downloaded", "label_downloaded") else 1), (event, recorded)
        assert [r["route"] for r in recorded] == [f"{method} {route}" for method in methods], recorded
        assert all(r["user"] is None and r["client"] == "127.0.0.1" for r in recorded), recorded
    assert [r["image"] for r in _events(audit, "image_downloaded")] == ["ct_slab_b"] * 3
    assert (_events(audit, "label_downloaded")[0]["image"], _events(audit, "label_downloaded")[0]["tag"]) == (
        "ct_slab_b", "final")
    assert _events(audit, "session_image_downloaded")[0]["session_id"] == session_id
    entries = audit.entries()
    assert entries[-1]["event"] == "image_downloaded"  # the one after the log was writable again
    assert audit.path.read_bytes()[len(kept):].count(b"\n") == 1  # nothing written while it was not


@pytest.mark.server
@pytest.mark.slow
def test_a_dataset_zip_that_fails_half_way_or_whose_client_leaves_mid_send_leaves_no_copy_behind(folders):
    """The dataset's ZIP is written in the server's temp folder, here a real 1 MiB tmpfs (a mount namespace of the
    server's own, seen through ``/proc/PID/root``) that three labelled studies (2 MiB zipped) do not fit: the ZIP
    fails half way (no space left), a 507 saying so (it was a bare 500), and the half-written file is deleted; MONAI
    Label's stayed in the temp folder. One whose client reads a few bytes and leaves is deleted too. The studies'
    ``labels/final`` folder is a 2 MiB tmpfs of its own: a correction of ``ct_slab_b`` saved again, larger than
    the space left, is a 507 and the correction saved before is kept whole, nothing of the new one left there
    (MONAI Label copied it onto the label's file in place: half a file under its name, the earlier one lost)."""
    import socket

    import processes
    from mlserver import start_server, stop_server

    problem = processes.private_tmpfs_problem()
    if problem is not None:
        pytest.skip(problem)
    temp = folders["work"] / "run1" / "tmp"  # the server's TMPDIR (mlserver.start_server)
    labels = folders["studies"] / "labels" / "final"  # the corrections' folder: a tmpfs of its own
    labels.mkdir(parents=True)
    server = start_server(folders["studies"], folders["model"], folders["work"] / "run1",
                          conf={"audit_dir": folders["audit"], "max_voxels": 3_000_000},
                          wrap=lambda args: processes.on_tmpfs(temp, 1, args, also=((labels, 2),)))
    seen = Path(f"/proc/{server.process.pid}/root{temp}")  # the tmpfs as the server sees it

    def left(deadline: float) -> list[str]:
        while True:  # deleted as the answer ends: wait for it, generously
            names = sorted({p.name for p in seen.rglob("*")} - before)
            if not names or time.monotonic() > deadline:
                return names
            time.sleep(0.2)

    try:
        for study in ("ct_slab_b", "ct_slab_c", "ct_slice_a"):
            correction = folders["root"] / f"{study}_final.nii.gz"
            sitk.WriteImage(sitk.Cast(sitk.ReadImage(str(folders["studies"] / f"{study}.nii.gz")), sitk.sitkFloat32),
                            str(correction))
            with open(correction, "rb") as handle:
                saved = requests.put(f"{server.url}/datastore/label", params={"image": study, "tag": "final"},
                                     files={"label": (f"{study}.nii.gz", handle)}, data={"params": "{}"},
                                     timeout=120)
            assert saved.status_code == 200, saved.text
        before = {p.name for p in seen.rglob("*")}
        failed = requests.get(f"{server.url}/datastore/dataset", timeout=300)
        assert failed.status_code == 507, (failed.status_code, failed.text[:300])
        assert failed.json()["detail"].startswith("the dataset was not sent: its ZIP does not fit on the disk of the "
                                                  "server's temp folder (TMPDIR; no space left)"), failed.text
        assert left(time.monotonic() + 10) == []
        one = requests.get(f"{server.url}/datastore/dataset", params={"limit_cases": 1}, timeout=300)
        assert one.status_code == 200 and one.content[:2] == b"PK", (one.status_code, one.text[:300])
        assert left(time.monotonic() + 60) == []
        with socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1])), timeout=60) as client:
            client.sendall(b"GET /datastore/dataset?limit_cases=1 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert client.recv(64).startswith(b"HTTP/1.1 200")
        assert left(time.monotonic() + 60) == []
        _correction_saved_again_on_a_full_disk(server, Path(f"/proc/{server.process.pid}/root{labels}"), folders)
    finally:
        stop_server(server)
    assert len(_events(AuditLog(folders["audit"]), "dataset_downloaded")) == 2
    failed = _events(AuditLog(folders["audit"]), "label_saved_failed")
    assert len(failed) == 1 and "No space left on device" in failed[0]["error"], failed


def _correction_saved_again_on_a_full_disk(server, labels: Path, folders) -> None:
    """``labels``: the server's ``labels/final`` folder as it sees it (a 2 MiB tmpfs holding three corrections,
    filled up to 64 KiB free); a second correction of ``ct_slab_b`` (noise added: larger than the first one and the
    space left together; an upload under 1 MiB, the temp folder's size) does not fit."""
    import os

    import numpy as np

    kept = {p.name: p.read_bytes() for p in labels.iterdir()}
    assert "ct_slab_b.nii.gz" in kept, sorted(kept)
    space = os.statvfs(labels)
    (labels / "filler.bin").write_bytes(b"\0" * (space.f_bavail * space.f_frsize - 2**16))  # no label pattern
    kept["filler.bin"] = (labels / "filler.bin").read_bytes()
    study = sitk.Cast(sitk.ReadImage(str(folders["studies"] / "ct_slab_b.nii.gz")), sitk.sitkFloat32)
    voxels = sitk.GetArrayFromImage(study)
    voxels[:2] += np.random.default_rng(0).uniform(-2, 2, voxels[:2].shape).astype(np.float32)
    noisy = sitk.GetImageFromArray(voxels)
    noisy.CopyInformation(study)
    larger = folders["root"] / "ct_slab_b_larger.nii.gz"
    sitk.WriteImage(noisy, str(larger))
    assert 2**16 + len(kept["ct_slab_b.nii.gz"]) + 2**16 < larger.stat().st_size < 2**20 - 2**17, \
        larger.stat().st_size  # too large even in place of the first one (MONAI Label's copy failed half way)
    with open(larger, "rb") as handle:
        answer = requests.put(f"{server.url}/datastore/label", params={"image": "ct_slab_b", "tag": "final"},
                              files={"label": ("ct_slab_b.nii.gz", handle)}, data={"params": "{}"}, timeout=120)
    assert answer.status_code == 507, (answer.status_code, answer.text[:500])
    assert "the label saved before (if any) is unchanged" in answer.json()["detail"], answer.text
    assert {p.name: p.read_bytes() for p in labels.iterdir()} == kept  # the earlier one whole, nothing of the new
    sent = requests.get(f"{server.url}/datastore/label", params={"label": "ct_slab_b", "tag": "final"}, timeout=120)
    assert sent.status_code == 200 and sent.content == kept["ct_slab_b.nii.gz"], (sent.status_code, len(sent.content))


_INDEX_ON_A_FULL_DISK = """
import json, os, sys
from pathlib import Path
import numpy as np, SimpleITK as sitk
from monailabel.datastore.local import LocalDatastore
from lib.datastore import steady_datastore
studies, work = Path(sys.argv[1]), Path(sys.argv[2])
image = sitk.GetImageFromArray(np.zeros((4, 8, 8), np.int16))
sitk.WriteImage(image, str(studies / "ct_a.nii.gz"))
datastore = steady_datastore(LocalDatastore(str(studies), extensions=["*.nii.gz"], auto_reload=False))
first, second = work / "first.nii.gz", work / "second.nii.gz"
sitk.WriteImage(sitk.GetImageFromArray(np.ones((4, 8, 8), np.int16)), str(first))
sitk.WriteImage(sitk.GetImageFromArray(
    np.random.default_rng(0).integers(0, 1000, (4, 64, 64)).astype(np.int16)), str(second))
datastore.save_label("ct_a", str(first), "final", {"note": "first"})
index = studies / "datastore_v2.json"
kept = {"label": (studies / "labels" / "final" / "ct_a.nii.gz").read_bytes(), "index": index.read_bytes()}
space = os.statvfs(studies)
need = -(-second.stat().st_size // space.f_frsize) * space.f_frsize  # the new label fits; its index does not
(studies / "filler.bin").write_bytes(b"\\0" * (space.f_bavail * space.f_frsize - need))
try:
    datastore.save_label("ct_a", str(second), "final", {"note": "x" * 6000})
    error = None
except OSError as failed:
    error = failed.errno
print(json.dumps({
    "errno": error, "label_kept": (studies / "labels" / "final" / "ct_a.nii.gz").read_bytes() == kept["label"],
    "index_kept": index.read_bytes() == kept["index"],
    "note": str(datastore.get_label_info("ct_a", "final").get("note"))[:20],
    "left": sorted(p.name for p in studies.rglob(".*") if p.name != ".lock")}))  # MONAI Label's lock stays
"""


def test_a_label_whose_index_does_not_fit_on_the_disk_leaves_the_label_and_index_saved_before(tmp_path):
    """The studies' folder is a real 1 MiB tmpfs (a mount namespace of the script's own), filled so that a second
    label of ``ct_a`` fits but the index with its info (``datastore_v2.json``) does not: MONAI Label rewrote the
    index in place, truncated to invalid JSON (rebuilt from the files on the next start: every label's info and
    review copy lost), after the new label had replaced the one saved before, which the 507 said was unchanged.
    Now the save raises ENOSPC with the earlier label's file, the index and the label's info as they were, and no
    temporary or kept-aside file left."""
    import errno
    import sys

    import processes
    from conftest import APP_DIR

    problem = processes.private_tmpfs_problem()
    if problem is not None:
        pytest.skip(problem)
    studies = tmp_path / "studies"
    studies.mkdir()
    result = processes.run(processes.on_tmpfs(studies, 1, [sys.executable, "-c", _INDEX_ON_A_FULL_DISK, studies,
                                                            tmp_path]), 300,
                           env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(APP_DIR)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == {
        "errno": errno.ENOSPC, "label_kept": True, "index_kept": True, "note": "first", "left": []}, result.stdout


def test_an_index_renamed_over_by_another_instance_is_reloaded_by_the_folders_watcher(tmp_path):
    """The index is written beside and renamed over ``datastore_v2.json`` (a full disk keeps it whole): the folder's
    watcher sees a move, which MONAI Label's handler ignores (it reloads on a modification), so a second instance
    on the same folder (another server, a process of the app) kept its stale index and would overwrite the change at
    its next write. Two real auto-reloading datastores: the second sees each label info the first saves."""
    import time

    import numpy as np
    import SimpleITK as sitk
    from monailabel.datastore.local import LocalDatastore

    from lib.datastore import steady_datastore

    studies = tmp_path / "studies"
    studies.mkdir()
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 8, 8), np.int16)), str(studies / "ct_a.nii.gz"))
    label = tmp_path / "label.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((4, 8, 8), np.int16)), str(label))
    writer, reader = (steady_datastore(LocalDatastore(str(studies), extensions=["*.nii.gz"], auto_reload=True))
                      for _ in range(2))
    try:
        for note in ("one", "two"):
            writer.save_label("ct_a", str(label), "final", {"note": note})
            deadline = time.monotonic() + 60  # the watcher's thread: seconds on a loaded machine, not a minute
            while reader.get_label_info("ct_a", "final").get("note") != note and time.monotonic() < deadline:
                time.sleep(0.2)
            assert reader.get_label_info("ct_a", "final").get("note") == note, reader.get_label_info("ct_a", "final")
    finally:
        for datastore in (writer, reader):
            datastore._observer.stop()
            datastore._observer.join(30)


@pytest.mark.server
@pytest.mark.slow
def test_info_reads_and_the_whole_listing_are_access_entries_and_refused_when_they_cannot_be_written(folders):
    """A study's info, a label's info and the whole datastore listing (``output=all``: every study's and label's
    info; on a PACS MONAI Label keeps each series' PatientID, StudyInstanceUID and StudyDate there) are one access
    entry per request (``image_info_read``, ``label_info_read``, ``datastore_listed`` naming the listing), written
    before the answer; an id that is not there (``{}``), the counts (``stats``) and the training list write none,
    nor does the review trail (verdicts and hashes). With the log unwritable (a folder where the file is) each
    recorded read is refused, 503 "the audit log could not be written", no info sent; the unrecorded listings still
    answer."""
    from mlserver import stop_server

    server = _start(folders, 1)
    try:
        url = server.url
        _save_final_label_of_slab_b(folders, url)
        recorded = {  # event: (route, query, a key of the answer)
            "image_info_read": ("/datastore/image/info", {"image": "ct_slab_b"}, "name"),
            "label_info_read": ("/datastore/label/info", {"label": "ct_slab_b", "tag": "final"}, "sha256"),
            "datastore_listed": ("/datastore/", {"output": "all"}, "objects"),
        }
        unrecorded = [("/datastore/image/info", {"image": "no_such"}),
                      ("/datastore/label/info", {"label": "ct_slab_c", "tag": "final"}),
                      ("/datastore/", {}), ("/datastore/", {"output": "stats"}), ("/datastore/", {"output": "train"})]
        trail = [("/review/", {}), ("/review/ct_slab_b", {})]  # read from the log itself: not while it is a folder
        audit = AuditLog(folders["audit"])
        before = len(audit.entries())
        for route, query, key in recorded.values():
            answer = requests.get(url + route, params=query, timeout=120)
            assert answer.status_code == 200 and key in answer.json(), (route, answer.status_code, answer.text[:200])
        for route, query in unrecorded + trail:
            assert requests.get(url + route, params=query, timeout=120).status_code == 200, route
        assert len(audit.entries()) == before + len(recorded)

        audit_file = folders["audit"] / "audit.jsonl"
        kept = audit_file.read_bytes()
        audit_file.unlink()
        audit_file.mkdir()  # a folder where the log is: every append fails (chmod would not stop root)
        for route, query, key in recorded.values():
            refused = requests.get(url + route, params=query, timeout=120)
            assert refused.status_code == 503, (route, refused.status_code, refused.text[:200])
            detail = refused.json()["detail"]
            assert list(refused.json()) == ["detail"] and "not sent: the audit log could not be written" in detail
            assert str(folders["root"]) not in detail, detail
        for route, query in unrecorded:
            assert requests.get(url + route, params=query, timeout=120).status_code == 200, route
        audit_file.rmdir()
        audit_file.write_bytes(kept)
    finally:
        stop_server(server)
    audit = AuditLog(folders["audit"])
    assert audit.verify().ok and audit.path.read_bytes() == kept  # nothing written while it was not
    for event, (route, query, _) in recorded.items():
        (entry,) = _events(audit, event)
        assert entry["user"] is None and entry["client"] == "127.0.0.1" and entry["route"] == f"GET {route}", entry
    assert _events(audit, "image_info_read")[0]["image"] == "ct_slab_b"
    assert (_events(audit, "label_info_read")[0]["image"], _events(audit, "label_info_read")[0]["tag"]) == (
        "ct_slab_b", "final")
    assert _events(audit, "datastore_listed")[0]["output"] == "all"


@pytest.mark.server
@pytest.mark.slow
def test_with_authentication_on_entries_name_the_tokens_user_and_a_fine_tune_the_admin_who_started_it(folders):
    """Two checks on one server with authentication on (a realm on loopback, tests/realm.py; the same set-up, one
    start instead of two), in this order: :func:`_entries_name_the_tokens_user`, then
    :func:`_a_fine_tune_names_the_admin_who_started_it_and_runs_alone`. Neither writes an entry of the kinds the
    other's checks read (the first: results, verdicts, hand-outs and downloads; the second: training requests and
    weights decisions), and the first leaves no correction for the second's run to read."""
    from mlserver import start_server, stop_server
    from realm import USER_OF_ROLE, Realm

    user, reviewer, admin = USER_OF_ROLE["user"], USER_OF_ROLE["reviewer"], USER_OF_ROLE["admin"]
    realm = Realm()
    try:
        server = start_server(folders["studies"], folders["model"], folders["work"] / "auth",
                              conf={"audit_dir": folders["audit"], "max_voxels": 3_000_000},
                              env={"MONAI_LABEL_AUTH_ENABLE": "true", "MONAI_LABEL_AUTH_REALM_URI": realm.url})
        try:
            _entries_name_the_tokens_user(server, realm)
            _a_fine_tune_names_the_admin_who_started_it_and_runs_alone(folders, server, realm)
        finally:
            stop_server(server)
    finally:
        realm.stop()
    audit = AuditLog(folders["audit"])
    assert audit.verify().ok
    recorded = _events(audit, "result")[-1]
    assert recorded["user"] == user and recorded["authenticated"] is True
    given = _events(audit, "verdict")[-1]
    assert (given["reviewer"], given["reviewer_from"], given["user"]) == (reviewer, "token", reviewer)
    handout = _events(audit, "review_queue_handout")[-1]  # the user is the token's; client_id what the client said
    assert (handout["image"], handout["user"], handout["authenticated"], handout["client_id"]) == (
        "ct_slab_c", reviewer, True, "ws-17")
    downloaded = _events(audit, "image_downloaded")[-1]
    assert (downloaded["image"], downloaded["user"], downloaded["authenticated"]) == ("ct_slab_c", user, True)
    requests_made = audit.entries("training_requested")  # the stopped run, the one refused beside it, the finished one
    assert [(e["fields"]["model"], e["fields"]["user"]) for e in requests_made] == [
        ("adl", admin), ("tddl_gcn", admin), ("adl", admin)]
    assert "requested_by" not in requests_made[2]["fields"]["params"]
    decided = [e["fields"] for e in audit.entries() if e["event"] in ("weights_published", "weights_rejected")]
    assert len(decided) == 1, decided
    assert (decided[0]["requested_by"], decided[0]["training_request_seq"]) == (admin, requests_made[2]["seq"])
    assert "mallory" not in audit.path.read_text()
    not_started = _events(audit, "training_requested_failed")  # refused beside the run, then the run stopped
    assert [(f["model"], f["training_request_seq"]) for f in not_started] == [
        ("tddl_gcn", requests_made[1]["seq"]), ("adl", requests_made[0]["seq"])]
    assert [f["user"] for f in _events(audit, "training_stopped")] == [admin]


def _entries_name_the_tokens_user(server, realm) -> None:
    """Auth on: the result's and the verdict's user is the token's user, whatever name the body gives (the entries:
    checked by the caller once the server is stopped)."""
    from realm import USER_OF_ROLE

    user, reviewer = USER_OF_ROLE["user"], USER_OF_ROLE["reviewer"]
    result = requests.post(f"{server.url}/infer/nlm", params={"image": "ct_slab_b", "output": "json"},
                           data={"params": "{}"}, timeout=600,
                           headers={"Authorization": f"Bearer {realm.token(user)}"})
    assert result.status_code == 200, result.text
    verdict = requests.post(f"{server.url}/review/ct_slab_b", json={"verdict": "accepted", "reviewer": "mallory"},
                            headers={"Authorization": f"Bearer {realm.token(reviewer)}"}, timeout=60)
    assert verdict.status_code == 200, verdict.text
    handed = requests.post(f"{server.url}/activelearning/next_unreviewed", json={"client_id": "ws-17"},
                           headers={"Authorization": f"Bearer {realm.token(reviewer)}"}, timeout=60)
    assert handed.status_code == 200 and handed.json()["id"] == "ct_slab_c", handed.text
    image = requests.get(f"{server.url}/datastore/image", params={"image": "ct_slab_c"},
                         headers={"Authorization": f"Bearer {realm.token(user)}"}, timeout=120)
    assert image.status_code == 200, image.text[:300]


def _a_fine_tune_names_the_admin_who_started_it_and_runs_alone(folders, server, realm) -> None:
    """Auth on: the training run has no HTTP request of its own, so its ``weights_published`` /
    ``weights_rejected`` entry named no user. The train route records ``training_requested`` (the token's user)
    and the run's weights entry names that user and entry; a ``requested_by`` in the params is not believed.
    A run_sync run trains in the server process, where MONAI Label's "already running" check does not see it: a
    second run was started beside it (two fine-tunes at once); it is refused (429) and recorded as not started.
    The run it is refused beside trains until this test stops it (a fixed step count either ends before the
    second request or keeps the test waiting on a slow machine); a 2-step run then gives the weights entry.
    (The entries: checked by the caller once the server is stopped.)"""
    from realm import USER_OF_ROLE

    admin, annotator = USER_OF_ROLE["admin"], USER_OF_ROLE["annotator"]

    def auth(user: str) -> dict:
        return {"Authorization": f"Bearer {realm.token(user)}"}

    for image in ("ct_slab_b", "ct_slab_c"):  # the studies' full-dose slabs as the clinicians' corrections
        corrected = write_full_dose(folders["root"] / f"{image}_final.nii.gz", image)
        with open(corrected, "rb") as handle:
            saved = requests.put(f"{server.url}/datastore/label", params={"image": image, "tag": "final"},
                                 files={"label": (corrected.name, handle)}, data={"params": "{}"},
                                 headers=auth(annotator), timeout=120)
        assert saved.status_code == 200, saved.text
    # the run beside which the second request is made trains until the test stops it (DELETE /train/): steps no
    # machine gets through, not a step count guessed to outlast the request on a slow one
    endless = {"steps": 1_000_000, "patch_size": 32, "device": "cpu"}
    answers: dict = {}

    def sync_run() -> None:
        answers["sync"] = requests.post(f"{server.url}/train/adl", params={"run_sync": "true"}, json=endless,
                                        headers=auth(admin), timeout=1800)

    runner = threading.Thread(target=sync_run)
    runner.start()
    deadline = time.monotonic() + 600
    while True:  # until the synchronous run trains
        stats = requests.get(f"{server.url}/info/", headers=auth(admin), timeout=60).json()["train_stats"]
        if stats.get("adl", {}).get("phase") == "training" or not runner.is_alive():
            break
        assert time.monotonic() < deadline, server.log_tail()
        time.sleep(0.2)
    beside = requests.post(f"{server.url}/train/tddl_gcn", json={"steps": 2, "device": "cpu"},
                           headers=auth(admin), timeout=120)
    still_running = runner.is_alive()
    stopped = requests.delete(f"{server.url}/train/", headers=auth(admin), timeout=120)
    # checked before waiting for the run: one not stopped would train on until the server is stopped
    assert stopped.status_code == 200 and stopped.json() is not None, (stopped.text, answers.get("sync"))
    runner.join()
    assert still_running, answers["sync"].text
    assert beside.status_code == 429 and "run_sync" in beside.json()["detail"], beside.text
    assert answers["sync"].status_code == 409 and "stopped" in answers["sync"].json()["detail"], answers["sync"].text
    # a run that finishes: its weights entry names the admin who asked, not the params' requested_by
    params = {"steps": 2, "patch_size": 32, "device": "cpu", "requested_by": "mallory", "training_request_seq": 0}
    finished = requests.post(f"{server.url}/train/adl", params={"run_sync": "true"}, json=params,
                             headers=auth(admin), timeout=1800)
    assert finished.status_code == 200, finished.text
    stats = requests.get(f"{server.url}/info/", headers=auth(admin), timeout=60).json()["train_stats"]["adl"]
    assert stats["status"] == "done", stats


def _denoised_then_accepted(url: str, image_id: str, reviewer: str) -> dict:
    """Denoise ``image_id`` by its id (nlm), then accept it as ``reviewer``: the verdict judges that very result.
    Returns infer's answer."""
    denoised = requests.post(f"{url}/infer/nlm", params={"image": image_id, "output": "json"},
                             data={"params": "{}"}, timeout=600)
    assert denoised.status_code == 200, denoised.text
    verdict = requests.post(f"{url}/review/{image_id}", json={"verdict": "accepted", "reviewer": reviewer},
                            timeout=60)
    assert verdict.status_code == 200, verdict.text
    assert verdict.json()["result"]["result_seq"] == denoised.json()["audit_seq"], verdict.text
    return denoised.json()


@pytest.mark.server
@pytest.mark.slow
def test_a_hand_out_that_cannot_be_recorded_is_refused_and_an_id_freed_by_deletion_starts_a_new_trail(folders):
    """Two checks on one server (the same set-up; one start instead of two), in this order: the first needs
    ``ct_slab_b`` unreviewed and hands out nothing else, the second writes no hand-out and starts from its own
    results: :func:`_a_review_queue_hand_out_whose_audit_entry_cannot_be_written_is_refused`, then
    :func:`_an_id_freed_by_deletion_and_given_to_another_study_starts_a_new_trail`."""
    from mlserver import stop_server

    from lib.activelearning import HANDOUT_EVENT

    server = _start(folders, 1)
    try:
        kept = _a_review_queue_hand_out_whose_audit_entry_cannot_be_written_is_refused(folders, server)
        _an_id_freed_by_deletion_and_given_to_another_study_starts_a_new_trail(folders, server)
    finally:
        stop_server(server)
    audit = AuditLog(folders["audit"])
    assert audit.verify().ok and audit.path.read_bytes().startswith(kept)
    assert [(h["image"], h["client_id"]) for h in _events(audit, HANDOUT_EVENT)] == [("ct_slab_b", "ws-9")]
    # the log keeps the old study's entries
    assert [f["reviewer"] for f in _events(audit, "verdict")] == ["dr_first", "dr_second", "dr_third"]


def _a_review_queue_hand_out_whose_audit_entry_cannot_be_written_is_refused(folders, server) -> bytes:
    """Access to patient data that cannot be audited is refused: with the log unwritable (a folder where the file
    is: every append fails, for root too), the review queue's hand-out answers 503 saying the audit log could not be
    written, names neither the study nor the log's folder, and hands nothing out (no note in the study's info, no
    entry). It was answered 200 with the study and noted as handed out. Once the log is writable again the next
    request is handed that same study, and the log is the one kept, one hand-out entry longer (checked by the
    caller once the server is stopped: the log as kept here is returned)."""
    url = server.url
    audit_file = folders["audit"] / "audit.jsonl"
    index = folders["studies"] / "datastore_v2.json"
    info_before = requests.get(f"{url}/datastore/image/info", params={"image": "ct_slab_b"}, timeout=60).json()
    assert "strategy" not in info_before, info_before
    kept, index_before = audit_file.read_bytes(), index.read_bytes()
    audit_file.unlink()
    audit_file.mkdir()  # a folder where the log is: every append fails (chmod would not stop root)
    refused = requests.post(f"{url}/activelearning/next_unreviewed", json={"client_id": "ws-9"}, timeout=60)
    assert refused.status_code == 503, refused.text
    detail = refused.json()["detail"]
    assert "no study was handed out" in detail and "the audit log could not be written" in detail, detail
    assert "audit.jsonl" in detail and str(folders["root"]) not in detail and "ct_slab_b" not in detail, detail
    assert "access refused" in server.log_tail(200_000)
    assert index.read_bytes() == index_before  # not noted as handed out
    audit_file.rmdir()
    audit_file.write_bytes(kept)
    # (the info read is an access entry itself: read once the log is writable again)
    info = requests.get(f"{url}/datastore/image/info", params={"image": "ct_slab_b"}, timeout=60).json()
    assert info == info_before, info
    handed = requests.post(f"{url}/activelearning/next_unreviewed", json={"client_id": "ws-9"}, timeout=60)
    assert handed.status_code == 200 and handed.json()["id"] == "ct_slab_b", handed.text
    info = requests.get(f"{url}/datastore/image/info", params={"image": "ct_slab_b"}, timeout=60).json()
    assert info["strategy"]["next_unreviewed"]["client_id"] == "ws-9", info
    return kept


def _an_id_freed_by_deletion_and_given_to_another_study_starts_a_new_trail(folders, server) -> None:
    """DELETE /datastore/image frees an id; another patient's upload under it must not inherit the old study's
    verdict or results, nor have a new verdict recorded as judging the old study's result. (The log's verdicts:
    checked by the caller once the server is stopped.)"""
    url = server.url
    first = requests.post(f"{url}/infer/nlm", params={"image": "ct_slab_b", "output": "json"},
                          data={"params": "{}"}, timeout=600)
    assert first.status_code == 200, first.text
    # a second result comes in while dr_first looks at the first: the verdict names the one it judges
    second = requests.post(f"{url}/infer/nlm", params={"image": "ct_slab_b", "output": "json"},
                           data={"params": "{}"}, timeout=600)
    assert second.status_code == 200 and second.json()["audit_seq"] > first.json()["audit_seq"], second.text
    verdict = requests.post(f"{url}/review/ct_slab_b", json={"verdict": "accepted", "reviewer": "dr_first",
                                                             "result_seq": first.json()["audit_seq"]}, timeout=60)
    assert verdict.status_code == 200 and verdict.json()["result"]["model"] == "nlm", verdict.text
    assert verdict.json()["result"]["result_seq"] == first.json()["audit_seq"], verdict.text
    for bad in ("7", True, 1.5):
        refused = requests.post(f"{url}/review/ct_slab_b", json={"verdict": "accepted", "reviewer": "dr_first",
                                                                 "result_seq": bad}, timeout=60)
        assert refused.status_code == 422 and "result_seq" in refused.text, refused.text
    removed = requests.delete(f"{url}/datastore/image", params={"id": "ct_slab_b"}, timeout=60)
    assert removed.status_code == 200, removed.text
    other = folders["studies"].parent / "other_patient.nii.gz"
    shutil.copy(folders["studies"] / "ct_slab_c.nii.gz", other)
    deadline = time.monotonic() + 120
    while True:  # the datastore sees the removal through its file watcher
        with open(other, "rb") as handle:
            added = requests.put(f"{url}/datastore/image", params={"image": "ct_slab_b"},
                                 files={"file": ("other_patient.nii.gz", handle)}, timeout=120)
        if added.status_code != 409 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert added.status_code == 200 and not added.json().get("existing"), added.text
    trail = requests.get(f"{url}/review/ct_slab_b", timeout=60).json()
    assert trail["review"]["verdict"] == "unreviewed", trail
    assert trail["review_history"] == [] and trail["denoise_results"] == [], trail
    # a verdict on the old study's result (a client that kept its audit_seq) is not the new study's
    stale = requests.post(f"{url}/review/ct_slab_b", json={"verdict": "accepted", "reviewer": "dr_first",
                                                           "result_seq": first.json()["audit_seq"]}, timeout=60)
    assert stale.status_code == 409 and "removed and stored again" in stale.json()["detail"], stale.text
    again = requests.post(f"{url}/review/ct_slab_b", json={"verdict": "accepted", "reviewer": "dr_second"},
                          timeout=60)
    assert again.status_code == 409 and "denoise it first" in again.json()["detail"], again.text  # no result yet
    denoised = _denoised_then_accepted(url, "ct_slab_b", "dr_second")  # the verdict judges the new study's result
    # the file replaced on disk under the same name (an export job, a restore): another volume, whose verdict
    # must not judge the earlier volume's result
    from mlserver import write_crop

    stored = next(folders["studies"].glob("ct_slab_b.*"))
    write_crop(SAMPLE_STUDIES / "ct_head_invesalius_ld25.nii.gz", stored, z=slice(50, 54))
    replaced = requests.post(f"{url}/review/ct_slab_b", json={"verdict": "accepted", "reviewer": "dr_third"},
                             timeout=60)
    assert replaced.status_code == 409 and "denoise it first" in replaced.json()["detail"], replaced.text
    stale = requests.post(f"{url}/review/ct_slab_b", json={"verdict": "accepted", "reviewer": "dr_third",
                                                           "result_seq": denoised["audit_seq"]}, timeout=60)
    assert stale.status_code == 409 and "file replaced" in stale.json()["detail"], stale.text
    _denoised_then_accepted(url, "ct_slab_b", "dr_third")


def write_full_dose(target: Path, image: str, yx: tuple[slice, slice] | None = None) -> Path:
    """The full-dose slab of a shared study (``mlserver.shared_studies``: slices 40-43 or 70-73 of the head; its
    rows and columns ``yx`` where the study was cut to them), on its grid, as float: a clinician's correction of
    that study."""
    from mlserver import write_crop

    z = {"ct_slab_b": slice(40, 44), "ct_slab_c": slice(70, 74)}[image]
    write_crop(SAMPLE_STUDIES / "ct_head_invesalius.nii.gz", target, z=z, yx=yx)
    sitk.WriteImage(sitk.Cast(sitk.ReadImage(str(target)), sitk.sitkFloat32), str(target))
    return target
