"""Studies from a real PACS: Orthanc on loopback, the app with --studies pointing at its DICOMweb root.

A real CT series is uploaded to Orthanc, denoised through the app by its SeriesInstanceUID, and the result is
stored back to Orthanc as a derived series, which is then read back from Orthanc and checked.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import time
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
import pytest
from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelClientException
from monailabel.utils.others.generic import md5_digest

import processes
from ADLDenoiseLib import DenoiseServerClient, ReviewSession
from conftest import SAMPLE_STUDIES
from mlserver import copy_weights, queue_hand_outs, start_server, stop_server
from orthanc import (QIDO_LOG, available, failing_server, grow_on_retrieval, holding_back, log_size, qido_searches,
                     silent_server, slow_relay, start_orthanc, start_orthanc_logging_requests, stop_orthanc,
                     without_instance_counts)

pytestmark = [pytest.mark.server, pytest.mark.slow,
              pytest.mark.skipif(available() is not None, reason=str(available()))]


def real_ct_series(folder: Path, slices: int = 3) -> list[Path]:
    """A 3-slice CT series made of the real pydicom-data head slice (693_UNCR), positioned 5 mm apart, with
    proper UIDs (the file itself is a single real CT image)."""
    import data_store

    return real_series(Path(data_store.__file__).parent / "data" / "693_UNCR.dcm", folder, slices)


def real_mr_series(folder: Path, slices: int = 3) -> list[Path]:
    """A 3-slice MR series made of pydicom's real MR slice (MR_small, 64 x 64), as :func:`real_ct_series`."""
    from pydicom.data import get_testdata_file

    return real_series(Path(get_testdata_file("MR_small.dcm")), folder, slices)


def real_series(slice_file: Path, folder: Path, slices: int = 3) -> list[Path]:
    """A series of ``slices`` copies of the real DICOM image ``slice_file``, positioned 5 mm apart, with proper
    UIDs, written to ``folder``."""
    from pydicom.uid import generate_uid

    source = pydicom.dcmread(slice_file)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    folder.mkdir(parents=True)
    paths = []
    for k in range(slices):
        ds = source.copy()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = k + 1
        position = [float(v) for v in ds.ImagePositionPatient]
        ds.ImagePositionPatient = [position[0], position[1], position[2] + 5.0 * k]
        ds.SliceLocation = position[2] + 5.0 * k
        ds.PatientID = ds.PatientID or "TEST"
        path = folder / f"slice{k}.dcm"
        ds.save_as(path, write_like_original=False)
        paths.append(path)
    return paths


def upload_real_ct_series(pacs, folder: Path) -> str:
    """:func:`real_ct_series` written to ``folder`` and uploaded to ``pacs``; its SeriesInstanceUID."""
    files = real_ct_series(folder)
    pacs.upload_files(files)
    return str(pydicom.dcmread(files[0]).SeriesInstanceUID)


def test_denoise_a_pacs_series_store_the_result_back_and_fine_tune_from_corrections_kept_on_the_server(
        tmp_path, tiny_weights):
    """A PACS series denoised by its SeriesInstanceUID and the result stored back as a derived series; a store the
    PACS refuses (a Lua filter) is a 502; neither leaves anything in the server's temp folder (the series' NIfTI
    conversion was left there, and the denoised volume after every failure of the store or of its audit entry);
    then the review loop on two PACS series (:func:`_correct_and_fine_tune`)."""
    import requests

    refuse = tmp_path / "refuse_derived"  # while it exists, the PACS drops every instance of a derived series
    script = tmp_path / "refuse_derived.lua"
    script.write_text(f"""
function ReceivedInstanceFilter(dicom, origin, info)
  local flag = io.open("{refuse}", "r")
  if flag == nil then return true end
  io.close(flag)
  return not string.find(dicom.SeriesDescription or "", "[denoised", 1, true)
end
""")
    pacs = start_orthanc(tmp_path / "orthanc", extra_config={"LuaScripts": [str(script)]})
    try:
        files = real_ct_series(tmp_path / "series")
        second = real_ct_series(tmp_path / "second")
        pacs.upload_files(files + second)
        uid = str(pydicom.dcmread(files[0]).SeriesInstanceUID)
        model_dir = copy_weights(tiny_weights, tmp_path / "model")
        # a server of its own: its studies are the PACS's DICOMweb root
        server = start_server(pacs.dicomweb, model_dir, tmp_path / "work")
        try:
            client = MONAILabelClient(server.url, tmpdir=str(tmp_path))
            for extension in ("dicom", "DICOM", "dcm"):  # each names the zipped DICOM result the task writes
                with pytest.raises(MONAILabelClientException, match="store_to_pacs already writes DICOM"):
                    client.infer("adl", uid, {"store_to_pacs": True, "result_extension": extension})
            path, result = client.infer("adl", uid, {"store_to_pacs": True})
            stored = result["stored_series"]
            assert stored["instances"] == 3 and stored["series_instance_uid"] != uid
            # read the derived series back from Orthanc
            series = [s for s in pacs.get("/series?expand") if
                      s["MainDicomTags"]["SeriesInstanceUID"] == stored["series_instance_uid"]]
            assert len(series) == 1 and len(series[0]["Instances"]) == 3
            instance = series[0]["Instances"][0]
            with urllib.request.urlopen(f"{pacs.url}/instances/{instance}/file", timeout=60) as r:
                derived = pydicom.dcmread(io.BytesIO(r.read()))
            original = pydicom.dcmread(files[0])
            assert derived.StudyInstanceUID == original.StudyInstanceUID and "DERIVED" in derived.ImageType
            assert "denoised adl" in derived.SeriesDescription
            assert derived.DerivationDescription.startswith(
                f"Denoised with adl (weights {result['weights_version']} sha256 {result['weights_sha256'][:16]}; "
                f"low-frequency restoration {result['low_frequency_restoration']:g} px)")
            hu = derived.pixel_array * float(derived.RescaleSlope) + float(derived.RescaleIntercept)
            assert np.isfinite(hu).all() and hu.min() < -900 and 0 < np.median(hu[hu > -500]) < 100  # still HU
            assert result["modality"] == "CT" and result["weights_version"] == "pretrained"
            temp = tmp_path / "work" / "tmp"  # the server's TMPDIR (mlserver.start_server)

            def left_in_temp(wait: float) -> list[str]:  # MONAI Label's log configuration (tmp*.json) included
                deadline = time.monotonic() + wait  # a result sent is deleted just after its last byte
                while True:
                    left = sorted(p.name for p in temp.iterdir())
                    if not left or time.monotonic() > deadline:
                        return left
                    time.sleep(0.2)

            assert left_in_temp(20) == []  # the series' conversion to NIfTI (MONAI Label's) was left there
            refuse.write_text("")
            answer = requests.post(f"{server.url}/infer/adl", params={"image": uid, "output": "image"},
                                   data={"params": json.dumps({"store_to_pacs": True})}, timeout=600)
            assert answer.status_code == 502, (answer.status_code, answer.text[:500])
            assert "denoised, but not stored in the PACS" in answer.json()["detail"], answer.text
            assert left_in_temp(0) == []  # the result: deleted before the refusal is answered
            refuse.unlink()
            _correct_and_fine_tune(server, pacs, model_dir, [uid, str(pydicom.dcmread(second[0]).SeriesInstanceUID)],
                                   files, second, tmp_path, stored["series_instance_uid"])
            assert server.alive()
        finally:
            stop_server(server)
    finally:
        stop_orthanc(pacs)


def _correct_and_fine_tune(server, pacs, model_dir: Path, uids: list[str], first: list[Path], second: list[Path],
                           tmp_path: Path, derived: str) -> None:
    """The review loop on a PACS, as on a local datastore: a region map and a correction of each series in ``uids``
    (``PUT /datastore/label``, tags ``regions`` then ``final``) are kept by the server in its corrections folder
    (``<model_dir>/corrections/dicomweb-<hash of the URL>``), nothing sent to the PACS (MONAI Label converted a
    ``final`` label to a DICOM SEG for the PACS: a bare 500 with this app's placeholder converter, and a region map
    went to the DICOMweb cache); with the cache cleared, ``GET /datastore/label`` sends back each file as it was
    sent (it was a 404: "is no label"), the training list holds both pairs and ``POST /train/{model}`` fine-tunes
    from them (it was a 422: no corrected studies). Each save is a ``label_saved`` entry. A correction is bound to
    its series' study and patient as the PACS lists them (asked of the PACS: the server's download of a series is
    never refreshed, and was what the check read): the series ``second`` (``uids[1]``) sent to the PACS again under
    another PatientID, its old download still in the cache, is no training data any more (422: one corrected study
    left; it trained on it), out of the training list and the dataset ZIP, and its correction, region map and info
    are not sent nor judged by a 'corrected' verdict (409 naming the patients; they were sent, the verdict said "no
    saved correction"), nor is its info changed (409, nothing written nor recorded: it was updated); a correction of
    the derived series saved by an older version is no training data either, a WARNING saying why (it was trained
    on); a correction PUT for it while the cache holds the old patient's download is refused (409,
    nothing saved), also with the download's folder alone removed (MONAI Label's conversion of the old download,
    never rebuilt, is what is sent: it was saved; the 409 says to open the series again, where it named both cached
    files to remove by hand), so is one of the derived series
    this server stored (409: it was kept); the series removed from the PACS, its correction is 404 (it was sent),
    kept on the server all the same; the PACS stopped, 503 (nothing sent unchecked), and a 'corrected' verdict
    judging a kept correction is a 503 with nothing recorded. A verdict is bound as a correction is: recorded with
    the series' identity the PACS lists (``series_identity``); on the series moved to another patient (its old
    download still cached) 'accepted' and 'corrected' are 409 naming both patients, nothing recorded, and with the
    PACS stopped an 'accepted' verdict on a denoised series is a 503 (both were recorded, 200, from the server's
    cached series list). A result's entry names the patient it was denoised for: with both cached files removed, a
    verdict on the result made before the move is 409 for that result alone (it was recorded, bound to the new
    patient; the removed conversion's info, kept by the running server, was named too until the series was
    downloaded again); denoised again, its verdict and correction are recorded, the header's ``' ANOTHER-PATIENT'``
    being the PACS's ``'ANOTHER-PATIENT'`` (DICOM padding: it was a 409), the old patient's correction it replaces
    kept aside, file and info (it was removed), never listed for training. The first series moved to another patient
    with its old download cached: ``GET /datastore/image`` downloads it anew (header and info of the new patient; the
    old download was served until the cache was emptied by hand), its corrections stay the old patient's (409); moved
    once more, infer downloads it anew too (its result named the old patient). The series not moved is served from
    its cache as it is."""
    import hashlib
    import shutil
    import urllib.request

    import requests
    import SimpleITK as sitk

    from lib.audit import AuditLog
    from lib.audit.location import default_audit_dir, default_corrections_dir
    from ADLDenoiseLib import DenoiseServerError
    from ADLDenoiseLib.review_session import SeriesMoved, VerdictRefused, send_verdict
    from lib.pacs_corrections import KeptLabels

    def sha256(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    def put(uid: str, tag: str, path: Path, params: dict) -> dict:
        with open(path, "rb") as handle:
            answer = requests.put(f"{server.url}/datastore/label", params={"image": uid, "tag": tag},
                                  data={"params": json.dumps(params)}, files={"label": (path.name, handle)},
                                  timeout=600)
        assert answer.status_code == 200, (tag, answer.status_code, answer.text[:1000], server.log_tail())
        return answer.json()

    def clear_cache() -> None:  # the series' downloads, conversions and MONAI Label's label cache: evicted
        cache = tmp_path / "work" / "dicomweb_cache"
        for path in [p for p in cache.glob("*/*") if p.name == "labels" or any(u in p.name for u in uids)]:
            shutil.rmtree(path) if path.is_dir() else path.unlink()

    series_before = sorted(pacs.get("/series"))
    sent: dict[tuple[str, str], bytes] = {}
    for uid in uids:
        answer = requests.get(f"{server.url}/datastore/image", params={"image": uid}, timeout=600)
        assert answer.status_code == 200, answer.text[:500]
        (tmp_path / "image.nii.gz").write_bytes(answer.content)
        image = sitk.Cast(sitk.ReadImage(str(tmp_path / "image.nii.gz")), sitk.sitkFloat32)
        voxels = sitk.GetArrayFromImage(image)
        voxels[:, :16, :16] += 20.0  # a clinician's local edit of the denoised volume
        mask = np.zeros(voxels.shape, np.uint8)
        mask[:, 200:260, 200:260] = 1
        for tag, array in (("regions", mask), ("final", voxels)):
            volume = sitk.GetImageFromArray(array)
            volume.CopyInformation(image)
            sitk.WriteImage(volume, str(tmp_path / f"{tag}.nii.gz"))
            sent[uid, tag] = (tmp_path / f"{tag}.nii.gz").read_bytes()
        put(uid, "regions", tmp_path / "regions.nii.gz", {"regions": [{"value": 1, "name": "lesion", "intent": "keep"}]})
        assert put(uid, "final", tmp_path / "final.nii.gz", {"regions_sha256": sha256(sent[uid, "regions"])}) == \
            {"image": uid, "label": uid}
    assert sorted(pacs.get("/series")) == series_before  # no SEG, nothing of a correction sent to the PACS
    kept = Path(default_corrections_dir(pacs.dicomweb, str(model_dir)))
    assert sorted(p.name for p in kept.glob("*/*.json")) == sorted(f"{uid}.json" for uid in uids for _ in "ab")
    clear_cache()
    for (uid, tag), data in sent.items():
        answer = requests.get(f"{server.url}/datastore/label", params={"label": uid, "tag": tag}, timeout=600)
        assert answer.status_code == 200 and sha256(answer.content) == sha256(data), (uid, tag, answer.text[:500])
    answer = requests.head(f"{server.url}/datastore/label", params={"label": uids[0], "tag": "final"}, timeout=600)
    assert answer.status_code == 200 and answer.headers["content-length"] == str(len(sent[uids[0], "final"])), \
        (answer.status_code, answer.headers)
    info = requests.get(f"{server.url}/datastore/label/info", params={"label": uids[1], "tag": "final"},
                        timeout=600).json()
    header = pydicom.dcmread(second[0])
    assert info["correction"] is True and info["regions_sha256"] == sha256(sent[uids[1], "regions"]), info
    assert info["series_identity"] == {"series_instance_uid": uids[1], "study_instance_uid": header.StudyInstanceUID,
                                       "patient_id": header.PatientID}, info
    answer = requests.post(f"{server.url}/review/{uids[1]}", json={"verdict": "corrected", "reviewer": "dr_a"},
                           timeout=600)  # a series not denoised here: its correction is what the verdict judges
    assert answer.status_code == 200 and answer.json()["verdict"] == "corrected", answer.text[:500]
    assert answer.json()["series_identity"] == info["series_identity"], answer.json()  # bound as its correction
    answer = requests.post(f"{server.url}/infer/adl", params={"image": uids[1], "output": "json"},
                           data={"params": "{}"}, timeout=600)  # a result of it, for the verdicts below
    assert answer.status_code == 200, answer.text[:500]
    pairs = requests.get(f"{server.url}/datastore/", params={"output": "train"}, timeout=600).json()
    assert sorted(Path(pair["label"]).name for pair in pairs) == sorted(f"{uid}.nii.gz" for uid in uids), pairs
    clear_cache()
    answer = requests.post(f"{server.url}/train/adl", params={"run_sync": "true"},
                           json={"steps": 4, "patch_size": 32, "device": "cpu"}, timeout=600)
    assert answer.status_code == 200, (answer.status_code, answer.text[:1000], server.log_tail())
    stats = requests.get(f"{server.url}/info/", timeout=600).json()["train_stats"]["adl"]
    assert stats["status"] == "done" and stats["mode"] == "corrections", stats
    assert set(stats["decision"]["validation_images"]) | set(stats["data"]["train_images"]) == set(uids), stats
    audit = AuditLog(default_audit_dir(pacs.dicomweb, str(model_dir)))
    saved = sorted((e["fields"]["image"], e["fields"]["tag"]) for e in audit.entries("label_saved"))
    assert saved == sorted(sent) and audit.entries("label_saved_failed") == [], saved
    def remove_second_from_the_pacs() -> None:
        for series in pacs.get("/series?expand"):
            if series["MainDicomTags"]["SeriesInstanceUID"] == uids[1]:
                urllib.request.urlopen(urllib.request.Request(f"{pacs.url}/series/{series['ID']}", method="DELETE"),
                                       timeout=60)

    # the second series sent again under another patient: its correction is not that series' any more (the leading
    # space is DICOM padding: the PACS's search answers 'ANOTHER-PATIENT', the headers keep ' ANOTHER-PATIENT')
    remove_second_from_the_pacs()
    for path in second:
        dataset = pydicom.dcmread(path)
        dataset.PatientID = " ANOTHER-PATIENT"
        dataset.save_as(path, write_like_original=False)
    pacs.upload_files(second)
    cache = tmp_path / "work" / "dicomweb_cache"
    conversion = next(cache.glob(f"*/{uids[0]}.nii.gz"))  # the first series, not moved: its cache served as it is
    before = conversion.stat()
    assert requests.get(f"{server.url}/datastore/image", params={"image": uids[0]}, timeout=600).status_code == 200
    assert (conversion.stat().st_ino, conversion.stat().st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    # uids[1] is not opened again until below: the cache holds the old patient's download of it
    answer = requests.post(f"{server.url}/train/adl", params={"run_sync": "true"},
                           json={"steps": 4, "patch_size": 32, "device": "cpu"}, timeout=600)
    assert answer.status_code == 422 and "only 1 corrected CT study" in answer.text, (answer.status_code, answer.text)
    changed = f"the correction of series {uids[1]} was saved for patient_id {header.PatientID!r}"
    assert changed in server.log_tail(20000) and "now has patient_id 'ANOTHER-PATIENT'" in server.log_tail(20000)
    for route, params in (("label", {"label": uids[1], "tag": "final"}),
                          ("label", {"label": uids[1], "tag": "regions"}),
                          ("label/info", {"label": uids[1], "tag": "final"})):
        answer = requests.get(f"{server.url}/datastore/{route}", params=params, timeout=600)
        assert answer.status_code == 409 and changed in answer.json()["detail"], (route, params, answer.text[:500])
    kept_info = (kept / "final" / f"{uids[1]}.json").read_text()
    for route, form in (("label/info", "info"), ("updatelabelinfo", "params")):  # its info is not changed either
        answer = requests.put(f"{server.url}/datastore/{route}", params={"label": uids[1], "tag": "final"},
                              data={form: json.dumps({"note": "checked"})}, timeout=600)
        assert answer.status_code == 409 and changed in answer.json()["detail"], (route, answer.text[:500])
        assert "its info was not changed" in answer.json()["detail"], answer.text[:500]
    assert (kept / "final" / f"{uids[1]}.json").read_text() == kept_info
    assert not [e for e in audit.entries() if e["event"].startswith("label_info_up")], "an info update on record"
    verdicts = len(audit.entries("verdict"))  # nor is a verdict recorded: what was reviewed is another patient's
    moved = (f"series {uids[1]} changed since this server downloaded it (what was reviewed): its download has "
             f"patient_id {header.PatientID!r}")
    for verdict in ("corrected", "accepted"):  # recorded (200), beside the cached patient and study, it was
        answer = requests.post(f"{server.url}/review/{uids[1]}", json={"verdict": verdict, "reviewer": "dr_a"},
                               timeout=600)
        detail = answer.json().get("detail", "")
        assert answer.status_code == 409 and moved in detail and "'ANOTHER-PATIENT'" in detail, answer.text[:500]
        assert "the verdict was not recorded" in detail, detail
        # denoising again downloads the series anew (the result judged is the old patient's): nothing to remove by
        # hand (it was the advice)
        assert "(denoise the series again and judge that result)" in detail and "cache" not in detail, detail
    assert len(audit.entries("verdict")) == verdicts
    pairs = requests.get(f"{server.url}/datastore/", params={"output": "train"}, timeout=600).json()
    assert [Path(pair["label"]).name for pair in pairs] == [f"{uids[0]}.nii.gz"], pairs
    answer = requests.get(f"{server.url}/datastore/dataset", timeout=600)
    assert answer.status_code == 200, answer.text[:500]
    with zipfile.ZipFile(io.BytesIO(answer.content)) as archive:
        assert [n for n in archive.namelist() if n.startswith("label/")] == [f"label/{uids[0]}.nii.gz"]
    for uid, why in ((uids[1], "changed since this server downloaded it"), (derived, "denoised series this server")):
        with open(tmp_path / "final.nii.gz", "rb") as handle:
            answer = requests.put(f"{server.url}/datastore/label", params={"image": uid, "tag": "final"},
                                  files={"label": ("final.nii.gz", handle)}, timeout=600)
        assert answer.status_code == 409 and why in answer.json()["detail"], (uid, answer.status_code, answer.text)
        assert "nothing was saved" in answer.json()["detail"], answer.text
        assert uid == derived or "open the series again, GET /datastore/image" in answer.json()["detail"], answer.text
    assert (kept / "final" / f"{uids[1]}.json").read_text() == kept_info
    assert not (kept / "final" / f"{derived}.json").exists()
    # a correction of the derived series this server stored, as an older version saved it (its PUT was not refused;
    # the PUT above listed it), bound to the study and patient the PACS lists it under: no training data (it was
    # trained on)
    derived_study = next(series["ParentStudy"] for series in pacs.get("/series?expand")
                         if series["MainDicomTags"]["SeriesInstanceUID"] == derived)
    study = pacs.get(f"/studies/{derived_study}")
    (tmp_path / "derived_final.nii.gz").write_bytes(sent[uids[0], "final"])  # on the derived series' grid
    KeptLabels(kept).save(derived, str(tmp_path / "derived_final.nii.gz"), "final", {
        "correction": True, "saved_by": "dr_a", "sha256": sha256(sent[uids[0], "final"]),
        "series_identity": {"series_instance_uid": derived, "study_instance_uid": study["MainDicomTags"][
            "StudyInstanceUID"], "patient_id": study["PatientMainDicomTags"]["PatientID"]}})
    answer = requests.post(f"{server.url}/train/adl", params={"run_sync": "true"},
                           json={"steps": 4, "patch_size": 32, "device": "cpu"}, timeout=600)
    assert answer.status_code == 422 and "only 1 corrected CT study" in answer.text, (answer.status_code, answer.text)
    assert f"not training data: the correction kept of series {derived}: {derived} is a denoised series this " \
        "server stored in the PACS" in server.log_tail(20000), server.log_tail(4000)
    pairs = requests.get(f"{server.url}/datastore/", params={"output": "train"}, timeout=600).json()
    assert [Path(pair["label"]).name for pair in pairs] == [f"{uids[0]}.nii.gz"], pairs
    # the download's folder alone removed by hand (as the 409 once said): downloaded again (the new patient's), but the
    # image sent and trained on is MONAI Label's conversion of the old one, never rebuilt (the PUT was saved, bound to
    # the new patient)
    shutil.rmtree(next(cache.glob(f"*/{uids[1]}")))
    with open(tmp_path / "final.nii.gz", "rb") as handle:
        answer = requests.put(f"{server.url}/datastore/label", params={"image": uids[1], "tag": "final"},
                              files={"label": ("final.nii.gz", handle)}, timeout=600)
    detail = answer.json().get("detail", "")
    assert answer.status_code == 409 and f"was converted from patient_id {header.PatientID!r}" in detail, answer.text
    assert "open the series again, GET /datastore/image" in detail and "cache folder" not in detail, detail
    assert (kept / "final" / f"{uids[1]}.json").read_text() == kept_info
    # the old conversion removed by hand too (a cache cleared): a verdict on the result denoised before the move is
    # refused for that result alone (it was recorded, bound to the new patient: the result's entry named no
    # patient); the conversion's info the running server kept was named too ("the image sent was converted from"),
    # and every verdict refused so until the series was downloaded again
    judged = [e for e in audit.entries("result") if e["fields"]["input"].get("image") == uids[1]][-1]
    assert judged["fields"]["input"]["patient_id"] == header.PatientID, judged
    next(cache.glob(f"*/{uids[1]}.nii.gz")).unlink()
    verdicts = len(audit.entries("verdict"))
    answer = requests.post(f"{server.url}/review/{uids[1]}", timeout=600,
                           json={"verdict": "accepted", "reviewer": "dr_a", "result_seq": judged["seq"]})
    detail = answer.json().get("detail", "")
    assert answer.status_code == 409 and "the verdict was not recorded" in detail, answer.text[:500]
    assert f"the result judged was denoised from patient_id {header.PatientID!r}" in detail, detail
    assert "denoise the series again and judge that result" in detail, detail
    assert "its download has" not in detail and "converted from" not in detail, detail  # the new patient's
    assert len(audit.entries("verdict")) == verdicts
    assert requests.get(f"{server.url}/datastore/image", params={"image": uids[1]}, timeout=600).status_code == 200
    # denoised again: the new patient's result, verdict and correction; the download's ' ANOTHER-PATIENT' is the
    # PACS's 'ANOTHER-PATIENT' (both were a 409: "its download has patient_id ' ANOTHER-PATIENT'")
    answer = requests.post(f"{server.url}/infer/adl", params={"image": uids[1], "output": "json"},
                           data={"params": "{}"}, timeout=600)
    assert answer.status_code == 200, answer.text[:500]
    answer = requests.post(f"{server.url}/review/{uids[1]}", json={"verdict": "accepted", "reviewer": "dr_a"},
                           timeout=600)
    assert answer.status_code == 200, answer.text[:500]
    assert answer.json()["series_identity"]["patient_id"] == "ANOTHER-PATIENT", answer.json()
    assert answer.json()["result"]["result_seq"] > judged["seq"], answer.json()
    put(uids[1], "final", tmp_path / "final.nii.gz", {})
    # the old patient's correction it replaces is kept aside, file and info (it was removed: lost), and is no label
    aside = [*(kept / "final" / "superseded").iterdir()]
    assert len(aside) == 1, aside
    aside_info = json.loads((aside[0] / f"{uids[1]}.json").read_text())
    assert aside_info["series_identity"]["patient_id"] == header.PatientID, aside_info
    assert sha256((kept / aside_info["file"]).read_bytes()) == sha256(sent[uids[1], "final"]) == \
        json.loads(kept_info)["sha256"], aside_info
    assert f"kept label {uids[1]} (final) replaced by one saved for patient_id 'ANOTHER-PATIENT'" in \
        server.log_tail(20000) and f"saved for patient_id {header.PatientID!r}" in server.log_tail(20000)
    pairs = requests.get(f"{server.url}/datastore/", params={"output": "train"}, timeout=600).json()
    assert sorted(pair["label"] for pair in pairs) == \
        sorted(str(KeptLabels(kept).path(uid, "final")) for uid in uids), pairs  # the new patient's, not the old
    assert "superseded" not in str(pairs) and KeptLabels(kept).images("final") == sorted([*uids, derived]), pairs
    remove_second_from_the_pacs()
    answer = requests.get(f"{server.url}/datastore/label", params={"label": uids[1], "tag": "final"}, timeout=600)
    assert answer.status_code == 404 and f"the PACS no longer lists series {uids[1]}" in answer.text, answer.text
    # the first series moved to another patient as well, its old download untouched in the cache: opened again, it
    # is downloaded anew (the old patient's files and info were served until the cache was emptied by hand and the
    # server restarted); its corrections stay the old patient's (409), never the new one's
    def send_first_under(patient: str) -> None:  # the PACS's copy of the first series replaced by one of patient's
        for series in pacs.get("/series?expand"):
            if series["MainDicomTags"]["SeriesInstanceUID"] == uids[0]:
                urllib.request.urlopen(urllib.request.Request(f"{pacs.url}/series/{series['ID']}", method="DELETE"),
                                       timeout=60)
        for path in first:
            dataset = pydicom.dcmread(path)
            dataset.PatientID = patient
            dataset.save_as(path, write_like_original=False)
        pacs.upload_files(first)

    old_patient = str(pydicom.dcmread(first[0]).PatientID)
    study = str(pydicom.dcmread(first[0]).StudyInstanceUID)
    opened_before = DenoiseServerClient(server.url)  # the Slicer module's client, the series opened before the move
    (tmp_path / "opened_before").mkdir()
    opened_before.download_image(uids[0], tmp_path / "opened_before")
    assert opened_before.opened_identity[uids[0]] == {"patient_id": old_patient, "study_instance_uid": study}
    send_first_under("THIRD-PATIENT")
    assert requests.get(f"{server.url}/datastore/image", params={"image": uids[0]}, timeout=600).status_code == 200
    folder = next(path for path in cache.glob(f"*/{uids[0]}") if path.is_dir())
    assert {pydicom.dcmread(path, stop_before_pixels=True).PatientID for path in folder.iterdir()} == \
        {"THIRD-PATIENT"}
    info = requests.get(f"{server.url}/datastore/image/info", params={"image": uids[0]}, timeout=600).json()
    assert info["PatientID"] == "THIRD-PATIENT", info
    assert f"series {uids[0]}: this server's cached download was not the series the PACS lists now (its download " \
        f"has patient_id {old_patient!r}" in server.log_tail(20000), server.log_tail(4000)
    for tag in ("regions", "final"):
        answer = requests.get(f"{server.url}/datastore/label", params={"label": uids[0], "tag": tag}, timeout=600)
        assert answer.status_code == 409 and f"was saved for patient_id {old_patient!r}" in answer.text, answer.text
    # re-opened by another request, the series' download is the new patient's: a correction that does not confirm
    # it was drawn on the new patient's series, or confirms the old one, is refused (it was saved, bound to the new
    # patient: drawn on the old one's record); one confirming the new patient is saved for it
    final_first = tmp_path / "final_first.nii.gz"
    final_first.write_bytes(sent[uids[0], "final"])
    moved = f"the PACS moved series {uids[0]} from patient_id {old_patient!r}"
    for confirmed in ({}, {"patient_id": old_patient, "study_instance_uid": study}):
        with open(final_first, "rb") as handle:
            answer = requests.put(f"{server.url}/datastore/label", params={"image": uids[0], "tag": "final"},
                                  data={"params": json.dumps(confirmed)}, timeout=600,
                                  files={"label": (final_first.name, handle)})
        detail = answer.json().get("detail", "")
        assert answer.status_code == 409 and moved in detail and "to patient_id 'THIRD-PATIENT'" in detail, detail
        assert "nothing was saved" in detail and "save it with params patient_id and study_instance_uid" in detail
    with pytest.raises(DenoiseServerError) as refused:  # the client sends the identity it opened: the old one
        opened_before.save_correction(uids[0], final_first)
    assert refused.value.status == 409 and moved in str(refused.value), refused.value
    assert KeptLabels(kept).info(uids[0], "final")["series_identity"]["patient_id"] == old_patient
    answer = requests.post(f"{server.url}/review/{uids[0]}", timeout=600, json={
        "verdict": "corrected", "reviewer": "dr_a", "patient_id": old_patient, "study_instance_uid": study})
    assert answer.status_code == 409 and f"opened as patient_id {old_patient!r}" in answer.text, answer.text
    # the Slicer module says to open the series again (Next study), not to denoise this volume again (it would
    # upload it, which the server refuses for a PACS series): its id is kept (SeriesMoved is no VerdictRefused)
    with pytest.raises(SeriesMoved, match="NOT recorded: the PACS lists the series .* Open it again") as moved_verdict:
        send_verdict(opened_before, uids[0], {"verdict": "accepted", "reviewer": "dr_a",
                                              "opened": {"patient_id": old_patient, "study_instance_uid": study}})
    assert not isinstance(moved_verdict.value, VerdictRefused)
    # the module's client opens the series again (a second node; the first stays in the scene): each node's
    # correction confirms its own download's patient, a call naming none confirms none (never the latest download's)
    (tmp_path / "opened_now").mkdir()
    _, opened_now = opened_before.download_opened(uids[0], tmp_path / "opened_now")
    assert opened_now == {"patient_id": "THIRD-PATIENT", "study_instance_uid": study}
    for first_node in ({"patient_id": old_patient, "study_instance_uid": study}, None):
        with pytest.raises(DenoiseServerError) as refused:
            opened_before.save_correction(uids[0], final_first, opened=first_node)
        assert refused.value.status == 409 and moved in str(refused.value), refused.value
    assert opened_before.save_correction(uids[0], final_first, opened=opened_now)["label"] == uids[0]
    assert KeptLabels(kept).info(uids[0], "final")["series_identity"] == \
        {"series_instance_uid": uids[0], "study_instance_uid": study, "patient_id": "THIRD-PATIENT"}
    assert "patient_id" not in KeptLabels(kept).info(uids[0], "final"), "the confirmation is no label params"
    # moved once more: denoised again, it is downloaded anew first (it was denoised from the old patient's download,
    # the result's entry naming the old patient)
    send_first_under("FOURTH-PATIENT")
    answer = requests.post(f"{server.url}/infer/adl", params={"image": uids[0], "output": "json"},
                           data={"params": "{}"}, timeout=600)
    assert answer.status_code == 200, answer.text[:500]
    denoised = [e for e in audit.entries("result") if e["fields"]["input"].get("image") == uids[0]][-1]
    assert denoised["fields"]["input"]["patient_id"] == "FOURTH-PATIENT", denoised
    # a verdict naming no result judges the latest, made after the move: one from a reviewer who saw the series
    # before it (no confirmation) was recorded against the new patient
    answer = requests.post(f"{server.url}/review/{uids[0]}", timeout=600, json={"verdict": "accepted",
                                                                             "reviewer": "dr_a"})
    assert answer.status_code == 409 and f"the PACS moved series {uids[0]}" in answer.text, answer.text
    assert "the verdict was not recorded" in answer.text, answer.text
    for tag in ("regions", "final"):  # an admin removes a correction: gone from the server, the PACS untouched
        answer = requests.delete(f"{server.url}/datastore/label", params={"id": uids[0], "tag": tag}, timeout=600)
        assert answer.status_code == 200, answer.text[:500]
        answer = requests.get(f"{server.url}/datastore/label", params={"label": uids[0], "tag": tag}, timeout=600)
        assert answer.status_code == 404, (tag, answer.status_code, answer.text[:500])
    assert "this server keeps no correction of it" in answer.json()["detail"], answer.text
    assert sorted(p.name for p in kept.glob("[!.]*/*.json")) == \
        sorted([f"{uids[1]}.json"] * 2 + [f"{derived}.json"])
    assert sorted((e["fields"]["image"], e["fields"]["tag"]) for e in audit.entries("label_removed")) == \
        [(uids[0], "final"), (uids[0], "regions")]
    # the first series listed under two studies, then no longer listed: neither its image, its info nor a result is
    # made from the cached download (it was sent and denoised, and a result stored with the old header's patient)
    (tmp_path / "other_study").mkdir()
    other_study = pydicom.uid.generate_uid()
    for path in first:
        dataset = pydicom.dcmread(path)
        dataset.StudyInstanceUID = other_study
        dataset.save_as(tmp_path / "other_study" / path.name, write_like_original=False)
    pacs.upload_files(sorted((tmp_path / "other_study").iterdir()))
    for answer in (requests.get(f"{server.url}/datastore/image", params={"image": uids[0]}, timeout=600),
                   requests.get(f"{server.url}/datastore/image/info", params={"image": uids[0]}, timeout=600),
                   requests.post(f"{server.url}/infer/adl", params={"image": uids[0], "output": "json"},
                                 data={"params": "{}"}, timeout=600)):
        assert answer.status_code == 409 and f"lists series {uids[0]} under 2 studies" in answer.text, answer.text
    for series in pacs.get("/series?expand"):
        if series["MainDicomTags"]["SeriesInstanceUID"] == uids[0]:
            urllib.request.urlopen(urllib.request.Request(f"{pacs.url}/series/{series['ID']}", method="DELETE"),
                                   timeout=60)
    answer = requests.get(f"{server.url}/datastore/image", params={"image": uids[0]}, timeout=600)
    assert answer.status_code == 404 and f"the PACS no longer lists series {uids[0]}" in answer.text, answer.text
    stop_orthanc(pacs)  # a PACS that is down: nothing sent unchecked
    answer = requests.get(f"{server.url}/datastore/label", params={"label": uids[1], "tag": "regions"}, timeout=600)
    assert answer.status_code == 503 and "cannot be reached" in answer.text, (answer.status_code, answer.text[:500])
    verdicts = len(audit.entries("verdict"))  # nor a verdict on a correction whose series cannot be checked
    answer = requests.post(f"{server.url}/review/{uids[1]}", json={"verdict": "corrected", "reviewer": "dr_a"},
                           timeout=600)
    assert answer.status_code == 503 and "cannot be reached" in answer.text, (answer.status_code, answer.text[:500])
    answer = requests.post(f"{server.url}/review/{uids[0]}", json={"verdict": "accepted", "reviewer": "dr_a"},
                           timeout=600)  # its result judged: recorded (200) from the cached series list, it was
    assert answer.status_code == 503 and "cannot be reached" in answer.text, (answer.status_code, answer.text[:500])
    assert len(audit.entries("verdict")) == verdicts


def test_the_review_queue_hands_out_studies_never_results_or_a_uid_of_two_studies(tmp_path, tiny_weights):
    """A DICOMweb datastore lists every series of the PACS: the app's own derived series (stored with
    store_to_pacs) are results, not studies; a SeriesInstanceUID found in two studies names no one series. Neither
    is handed out for review, given a verdict or denoised, and the queue keeps working. A hard-anonymised source
    (empty PatientID) gets a derived series with an empty PatientID too, filed with its source."""
    import requests

    pacs = start_orthanc(tmp_path / "orthanc")
    try:
        series = {name: real_ct_series(tmp_path / name) for name in ("plain", "anon", "dup1", "dup2")}
        for path in series["anon"]:
            ds = pydicom.dcmread(path)
            ds.PatientID, ds.PatientName = "", ""
            ds.save_as(path, write_like_original=False)
        shared_uid = str(pydicom.dcmread(series["dup1"][0]).SeriesInstanceUID)
        for path in series["dup2"]:  # another patient's study, the same series UID
            ds = pydicom.dcmread(path)
            ds.SeriesInstanceUID, ds.PatientID, ds.PatientName = shared_uid, "OTHER", "Other^Patient"
            ds.save_as(path, write_like_original=False)
        for files in series.values():
            pacs.upload_files(files)
        uid = {name: str(pydicom.dcmread(files[0]).SeriesInstanceUID) for name, files in series.items()}
        model = copy_weights(tiny_weights, tmp_path / "model")
        server = start_server(pacs.dicomweb, model, tmp_path / "work1")
        try:
            client = MONAILabelClient(server.url, tmpdir=str(tmp_path))
            _, result = client.infer("adl", uid["anon"], {"store_to_pacs": True})
            derived_uid = result["stored_series"]["series_instance_uid"]
            stored = [s for s in pacs.get("/series?expand")
                      if s["MainDicomTags"]["SeriesInstanceUID"] == derived_uid]
            source = [s for s in pacs.get("/series?expand") if s["MainDicomTags"]["SeriesInstanceUID"] == uid["anon"]]
            assert stored[0]["ParentStudy"] == source[0]["ParentStudy"]  # filed with its source, same patient
            ambiguous = requests.post(f"{server.url}/infer/adl", params={"image": shared_uid, "output": "json"},
                                      data={"params": "{}"}, timeout=600)
            assert ambiguous.status_code == 409 and "names several series" in ambiguous.text, ambiguous.text
        finally:
            stop_server(server)
        # a new server (a fresh series list, the same audit log): the derived series is listed now
        server = start_server(pacs.dicomweb, model, tmp_path / "work2")
        try:
            listed = requests.get(f"{server.url}/review/{derived_uid}", timeout=120)  # 404 for an unknown id
            assert listed.status_code == 200, listed.text
            handed, exclude = [], []
            for _ in range(10):
                answer = requests.post(f"{server.url}/activelearning/next_unreviewed", json={"exclude": exclude},
                                       timeout=600)
                assert answer.status_code == 200, answer.text
                picked = answer.json().get("id")
                if not picked:
                    break
                handed.append(picked)
                exclude.append(picked)
            assert sorted(handed) == sorted([uid["plain"], uid["anon"]]), handed
            for image_id, words in ((derived_uid, "denoised series this server stored"),
                                    (shared_uid, "names several series")):
                verdict = requests.post(f"{server.url}/review/{image_id}",
                                        json={"verdict": "accepted", "reviewer": "dr_a"}, timeout=60)
                assert verdict.status_code == 422 and words in verdict.text, verdict.text
            # a viewer's search through the app's PACS proxy finds that patient's study alone (the stock proxy
            # dropped the query string and answered every study), and its series metadata comes back through it
            found = requests.get(f"{server.url}/proxy/dicom/qido/studies", params={"PatientID": "OTHER"},
                                 headers={"Accept": "application/dicom+json"}, timeout=120)
            assert found.status_code == 200, found.text[:300]
            assert [s.get("00100020", {}).get("Value") for s in found.json()] == [["OTHER"]], found.json()
            plain = pydicom.dcmread(series["plain"][0])
            metadata = requests.get(f"{server.url}/proxy/dicom/wado/studies/{plain.StudyInstanceUID}/series/"
                                    f"{uid['plain']}/metadata", headers={"Accept": "application/dicom+json"},
                                    timeout=120)
            assert metadata.status_code == 200 and len(metadata.json()) == 3, metadata.text[:300]
            assert {m["0020000E"]["Value"][0] for m in metadata.json()} == {uid["plain"]}
            again = requests.post(f"{server.url}/infer/adl", params={"image": derived_uid, "output": "json"},
                                  data={"params": "{}"}, timeout=600)
            assert again.status_code == 409 and "not a study" in again.text, again.text
        finally:
            stop_server(server)
    finally:
        stop_orthanc(pacs)


@contextlib.contextmanager
def _big_and_small_series(tmp_path: Path, tiny_weights: Path, orthanc_config: dict | None = None):
    """A real Orthanc (``orthanc_config`` added to its configuration) holding two real CT series, 6 and 3 slices of
    512 x 512 (1.57 M and 0.79 M voxels), and the app serving it with ``max_voxels`` 1,000,000, between the two;
    yields (server, the big series' UID, the small one's, the server's DICOMweb download cache)."""
    pacs = start_orthanc(tmp_path / "orthanc", extra_config=orthanc_config)
    try:
        big, small = real_ct_series(tmp_path / "big", slices=6), real_ct_series(tmp_path / "small", slices=3)
        pacs.upload_files(big + small)
        big_uid, small_uid = (str(pydicom.dcmread(files[0]).SeriesInstanceUID) for files in (big, small))
        server = start_server(pacs.dicomweb, copy_weights(tiny_weights, tmp_path / "model"), tmp_path / "work",
                              conf={"max_voxels": 1_000_000})
        try:
            yield server, big_uid, small_uid, tmp_path / "work" / "dicomweb_cache"
        finally:
            stop_server(server)
    finally:
        stop_orthanc(pacs)


def test_a_series_over_the_voxel_limit_is_refused_before_it_is_downloaded(tmp_path, tiny_weights):
    """The app refuses volumes over ``max_voxels`` (413); a PACS series was downloaded whole (and converted to
    NIfTI) before that check could refuse it. Its size now comes from the PACS's QIDO-RS answer first: a series
    over the limit is refused with nothing downloaded, one under it is denoised as before. Uploads to and removals
    from a PACS-backed datastore are refused (422), not answered 200 and left undone."""
    import requests

    # 6 x 512 x 512 = 1.57 M voxels over the limit, 3 x 512 x 512 = 0.79 M under it
    with _big_and_small_series(tmp_path, tiny_weights) as (server, big_uid, small_uid, cache):
        answer = requests.post(f"{server.url}/infer/nlm", params={"image": big_uid, "output": "json"},
                               timeout=600)
        assert answer.status_code == 413, answer.text
        detail = answer.json()["detail"]
        assert "too large" in detail and "1,572,864" in detail and "nothing was downloaded" in detail, detail
        assert not [p for p in cache.rglob(f"{big_uid}*")], sorted(map(str, cache.rglob("*")))
        answer = requests.post(f"{server.url}/infer/nlm", params={"image": small_uid, "output": "json"},
                               timeout=600)
        assert answer.status_code == 200 and answer.json()["shape"] == [3, 512, 512], answer.text[:500]
        # MONAI Label added an upload to its local cache only (200, then never listed: infer 404) and removed a
        # series from that cache only (200, the PACS series still listed and denoised): both are refused
        volume = SAMPLE_STUDIES / "ct_head_pydicom693_ld25.nii.gz"
        answer = requests.put(f"{server.url}/datastore/image", params={"image": "uploaded"},
                              files={"file": ("uploaded.nii.gz", volume.read_bytes())}, timeout=600)
        assert answer.status_code == 422 and "PACS" in answer.json()["detail"], answer.text
        answer = requests.delete(f"{server.url}/datastore/image", params={"id": small_uid}, timeout=600)
        assert answer.status_code == 422 and "remove it in the PACS" in answer.json()["detail"], answer.text
        # the info of a series never downloaded has nowhere to go (the server's local cache): a bare 500 was
        # answered; the info of one in the cache is set
        answer = requests.put(f"{server.url}/datastore/image/info", params={"image": big_uid},
                              data={"info": '{"note": "x"}'}, timeout=600)
        assert answer.status_code == 409 and "local cache" in answer.json()["detail"], answer.text
        answer = requests.put(f"{server.url}/datastore/image/info", params={"image": small_uid},
                              data={"info": '{"note": "x"}'}, timeout=600)
        assert answer.status_code == 200, answer.text
        answer = requests.get(f"{server.url}/datastore/image/info", params={"image": small_uid}, timeout=600)
        assert answer.json()["note"] == "x", answer.text
        assert server.alive()


def test_a_series_the_queue_hands_out_at_the_conf_limit_above_the_environments_is_denoised_and_stored(
        tmp_path, tiny_weights):
    """``--conf max_voxels`` (1,000,000) above ``ADL_MAX_VOXELS`` (500,000), on a real Orthanc and server: the
    server's limit is its conf, for every read of a request. The queue hands out a 3 x 512 x 512 series (786,432
    voxels, between the two) and infer by id denoises it; storing the result read the series again at the
    environment's limit, so it was denoised (and recorded) and then refused as too large, nothing stored. It is
    stored now."""
    import requests

    pacs = start_orthanc(tmp_path / "orthanc")
    try:
        files = real_ct_series(tmp_path / "series", slices=3)
        pacs.upload_files(files)
        uid = str(pydicom.dcmread(files[0]).SeriesInstanceUID)
        server = start_server(pacs.dicomweb, copy_weights(tiny_weights, tmp_path / "model"), tmp_path / "work",
                              conf={"max_voxels": 1_000_000}, env={"ADL_MAX_VOXELS": "500000"})
        try:
            assert queue_hand_outs(server.url, "") == [uid]
            answer = requests.post(f"{server.url}/infer/nlm", params={"image": uid, "output": "json"},
                                   data={"params": json.dumps({"store_to_pacs": True})}, timeout=600)
            assert answer.status_code == 200, answer.text
            stored = answer.json()["stored_series"]
            assert stored["instances"] == 3 and stored["series_instance_uid"] != uid, stored
        finally:
            stop_server(server)
    finally:
        stop_orthanc(pacs)


def test_the_review_queue_skips_a_series_over_the_voxel_limit_without_downloading_it(tmp_path, tiny_weights):
    """The review queue handed out a PACS series over ``max_voxels`` like any other, and MONAI Label then
    downloaded it whole (into memory) and converted it, the download infer by id refuses (413). It is skipped now
    (the same size check, before any download), with a warning, and listed in the answer as too large to review
    here, also when no other study is left: the reviewer keeps working and the study is not lost from sight."""
    import requests

    # 6 x 512 x 512 = 1.57 M voxels over the limit, 3 x 512 x 512 = 0.79 M under it
    with _big_and_small_series(tmp_path, tiny_weights) as (server, big_uid, small_uid, cache):
        answer = requests.post(f"{server.url}/activelearning/next_unreviewed", json={}, timeout=600)
        assert answer.status_code == 200 and answer.json().get("id") == small_uid, answer.text
        assert answer.json()["remaining_unreviewed"] == 2, answer.text
        # the small series handed out, the big one left: nothing but the small one reviewable
        answer = requests.post(f"{server.url}/activelearning/next_unreviewed", json={"exclude": [small_uid]},
                               timeout=600)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert not body.get("id") and body["remaining_unreviewed"] == 2, body
        assert body["too_large_to_review"] == [{"id": big_uid, "instances": 6, "voxels": 1_572_864,
                                                "estimated": False, "limit": 1_000_000}], body
        assert not [p for p in cache.rglob(f"{big_uid}*")], sorted(map(str, cache.rglob("*")))
        assert f"review queue: series {big_uid} skipped, not downloaded" in server.log_tail(20000)
        assert server.alive()


def test_a_pacs_that_lists_part_of_a_series_instances_does_not_let_an_oversized_series_through(tmp_path,
                                                                                                tiny_weights):
    """The size check before a PACS series is downloaded summed the instances the PACS listed; Orthanc's
    LimitFindInstances lists that many plus one and says nothing, so a series of any length looked small and was
    downloaded whole (into memory) and converted before the reader refused it. Its instance count is now asked at the
    series level (never cut) and the size estimated from it: refused with nothing downloaded, saying it is an
    estimate; a series the PACS lists whole is denoised as before."""
    import requests

    # the PACS lists 3 of the big series' 6 instances: 3 x 512 x 512 = 0.79 M voxels, under the limit
    with _big_and_small_series(tmp_path, tiny_weights, {"LimitFindInstances": 2}) as found:
        server, big_uid, small_uid, cache = found
        answer = requests.post(f"{server.url}/infer/nlm", params={"image": big_uid, "output": "json"},
                               timeout=600)
        assert answer.status_code == 413, answer.text[:500]
        detail = answer.json()["detail"]
        assert "6 instances, 1,572,864 voxels (estimated: the PACS lists 3 of its instances)" in detail, detail
        assert "nothing was downloaded" in detail, detail
        assert not [p for p in cache.rglob(f"{big_uid}*")], sorted(map(str, cache.rglob("*")))
        answer = requests.post(f"{server.url}/infer/nlm", params={"image": small_uid, "output": "json"},
                               timeout=600)
        assert answer.status_code == 200 and answer.json()["shape"] == [3, 512, 512], answer.text[:500]


def test_a_series_that_grows_past_the_voxel_limit_during_its_download_is_stopped_with_nothing_kept(tmp_path,
                                                                                                   tiny_weights):
    """The size asked of the PACS (QIDO-RS) and MONAI Label's download (WADO-RS) are two requests: a series still
    being sent to the PACS grows in between, and was then downloaded whole, into memory, saved into the cache and
    converted before the reader refused it. Here the real Orthanc's request filter (Lua) stores 3 more slices of a
    series when its retrieval arrives: 3 slices (0.79 M voxels) pass the check under ``max_voxels`` 1,000,000, the
    retrieval sends 6 (1.57 M). The download stops at the instance that takes it over the limit: infer by id answers
    413 saying so; the review queue's hand-out, which answered the same 413 for the whole request, skips the series,
    lists it in ``too_large_to_review`` and hands out the next study; nothing of either series is in the cache. The
    size a stopped download found (the PACS's, asked after the stop) is remembered: the next queue request asks the
    PACS nothing of that series, and infer by id refuses it without a download."""
    import requests

    series = {}
    for name in ("a", "b", "c"):
        files = real_ct_series(tmp_path / name, slices=6)
        series[str(pydicom.dcmread(files[0]).SeriesInstanceUID)] = files
    queued, inferred, small = sorted(series)  # the queue goes in id order: the two that grow come first
    growing = (queued, inferred)
    requests_log = tmp_path / "orthanc_requests.log"
    script = grow_on_retrieval(tmp_path / "grow.lua", {uid: series[uid][3:] for uid in growing}, requests_log)
    pacs = start_orthanc(tmp_path / "orthanc", extra_config={"LuaScripts": [str(script)]})
    try:
        for files in series.values():
            pacs.upload_files(files[:3])
        server = start_server(pacs.dicomweb, copy_weights(tiny_weights, tmp_path / "model"), tmp_path / "work",
                              conf={"max_voxels": 1_000_000})
        cache = tmp_path / "work" / "dicomweb_cache"
        queue = f"{server.url}/activelearning/next_unreviewed"
        try:
            answer = requests.post(f"{server.url}/infer/nlm", params={"image": inferred, "output": "json"},
                                   timeout=600)
            assert answer.status_code == 413, answer.text[:500]
            detail = answer.json()["detail"]
            assert (f"cannot denoise this image: series {inferred} is too large: the 4 instances the PACS sent so "
                    "far hold 1,048,576 voxels, over the limit of 1,000,000 (it grew since its size was asked, or the "
                    "PACS did not tell it); the download was stopped and nothing of it was kept (raise the limit "
                    "with --conf max_voxels on the server)") == detail, detail
            # the queue: the first series passes the size check, grows during its download, is stopped and skipped;
            # both are listed with the size the PACS gave after the stop (6 instances), marked stopped; the small
            # one is handed out
            stopped = {"id": queued, "instances": 6, "voxels": 1_572_864, "estimated": False, "limit": 1_000_000,
                       "download_stopped": True}
            grown = dict(stopped, id=inferred)
            answer = requests.post(queue, json={}, timeout=600)
            assert answer.status_code == 200, answer.text[:500]
            body = answer.json()
            assert (body.get("id"), body["remaining_unreviewed"], body["too_large_to_review"]) == \
                (small, 3, [stopped, grown]), body
            assert f"review queue: series {queued} skipped: series {queued} is too large" in server.log_tail(20000)
            # the next request asks the PACS nothing of the stopped series (neither its size nor its files)
            before = len(requests_log.read_text().splitlines())
            answer = requests.post(queue, json={"exclude": [small]}, timeout=600)
            assert answer.status_code == 200, answer.text[:500]
            assert answer.json() == {"remaining_unreviewed": 3, "too_large_to_review": [stopped, grown]}, answer.text
            asked = [line for line in requests_log.read_text().splitlines()[before:]
                     if queued in line or line.split("?")[0].rstrip("/").endswith("/instances")]
            assert not asked, asked
            # the Slicer module's client and workflow state: not an empty queue, the reviewer is told of both
            answer_seen = DenoiseServerClient(server.url).next_study(exclude=[small])
            assert ReviewSession.queue_answer(answer_seen) is None
            assert ReviewSession.describe_skipped(answer_seen) == (
                f"2 unreviewed series too large for this server (over its max_voxels), skipped: {queued}, {inferred}; "
                "ask the server's administrator")
            answer = requests.post(f"{server.url}/infer/nlm", params={"image": queued, "output": "json"},
                                   timeout=600)
            assert answer.status_code == 413, answer.text[:500]
            detail = answer.json()["detail"]
            assert (f"series {queued} is too large: at least 6 instances, 1,572,864 voxels (an earlier download of it "
                    "was stopped over the limit) exceed the limit of 1,000,000") in detail, detail
            assert len(pacs.get("/instances")) == 15  # both grew (the filter ran)
            kept = sorted(str(p) for p in cache.rglob("*") if any(uid in p.name for uid in growing))
            assert not kept, kept
            assert (cache / md5_digest(pacs.dicomweb) / small).is_dir()  # handed out: downloaded
            assert server.alive()
        finally:
            stop_server(server)
    finally:
        stop_orthanc(pacs)


def test_a_partial_download_left_by_a_stopped_server_is_removed_at_the_next_start(tmp_path, tiny_weights):
    """A server stopped during a PACS download (killed, a power cut) left its ``.partial-<uid>-*`` folder in the
    cache folder for ever. The next start-up removes those whose newest write is older than
    ``PARTIAL_DOWNLOAD_STALE_S`` (an hour), logging each; it keeps a younger one (a download in progress, of another
    server sharing the cache, writes at every instance), a downloaded series' folder, and a file or a link of such
    a name (the link's target too). The same in the label cache (``labels/final``, where a final label's download
    writes its partial folder), which was never cleaned. A server killed while it gave a downloaded file its DICOM
    file meta left the hidden temp ``.<name>.<random>.file-meta`` in the series' folder for ever: those untouched for
    ``FILE_META_TEMP_STALE_S`` (10 minutes) are removed too, in the image and the label cache; a younger one (being
    written) is kept, and so is the series' own file."""
    import os
    import time

    from lib.pacs import FILE_META_TEMP_STALE_S, PARTIAL_DOWNLOAD_PREFIX, PARTIAL_DOWNLOAD_STALE_S
    from pydicom.uid import generate_uid

    pacs = start_orthanc(tmp_path / "orthanc")
    try:
        cache = tmp_path / "work" / "dicomweb_cache" / md5_digest(pacs.dicomweb)  # MONAI Label's cache of the PACS
        old = time.time() - PARTIAL_DOWNLOAD_STALE_S - 600

        def folder(name: str, files: dict[str, float], mtime: float) -> Path:
            """``cache / name`` holding ``files`` (name: modification time), itself modified at ``mtime``."""
            made = cache / name
            made.mkdir(parents=True)
            for file, when in files.items():
                (made / file).write_bytes(b"DICM")
                os.utime(made / file, (when, when))
            os.utime(made, (mtime, mtime))  # last: a file written into it changes it
            return made

        uid = generate_uid()
        stale = folder(f"{PARTIAL_DOWNLOAD_PREFIX}{uid}-k3j2x9", {"1.dcm": old, "2.dcm": old - 60}, old)
        stale_empty = folder(f"{PARTIAL_DOWNLOAD_PREFIX}{generate_uid()}-a8c1q0", {}, old)
        in_progress = folder(f"{PARTIAL_DOWNLOAD_PREFIX}{generate_uid()}-p0w7e2", {"1.dcm": old, "2.dcm": time.time()},
                             old)
        meta_old = time.time() - FILE_META_TEMP_STALE_S - 60
        downloaded = folder(uid, {"1.dcm": old, ".1.dcm.k2j4.file-meta": meta_old,
                                  ".2.dcm.x9q1.file-meta": time.time()}, old)
        labels = "labels/final"  # MONAI Label's label cache in the cache folder
        stale_label = folder(f"{labels}/{PARTIAL_DOWNLOAD_PREFIX}{uid}-q4m1z8", {"1.dcm": old}, old)
        label_in_progress = folder(f"{labels}/{PARTIAL_DOWNLOAD_PREFIX}{generate_uid()}-r5t6y7",
                                   {"1.dcm": time.time()}, old)
        label_other = folder(f"{labels}/.other-w2", {"1.dcm": old}, old)
        label_downloaded = folder(f"{labels}/{generate_uid()}", {"1.dcm": old, ".1.dcm.p0z3.file-meta": meta_old}, old)
        other = folder(".other-w1", {"1.dcm": old}, old)
        (cache / f"{PARTIAL_DOWNLOAD_PREFIX}file").write_bytes(b"kept")
        os.utime(cache / f"{PARTIAL_DOWNLOAD_PREFIX}file", (old, old))
        target = tmp_path / "elsewhere"
        target.mkdir()
        (target / "1.dcm").write_bytes(b"kept")
        os.utime(target / "1.dcm", (old, old))
        os.utime(target, (old, old))
        (cache / f"{PARTIAL_DOWNLOAD_PREFIX}link").symlink_to(target, target_is_directory=True)
        server = start_server(pacs.dicomweb, copy_weights(tiny_weights, tmp_path / "model"), tmp_path / "work")
        try:
            assert not stale.exists() and not stale_empty.exists() and not stale_label.exists()
            assert [p.name for p in label_in_progress.iterdir()] == [p.name for p in label_other.iterdir()] == ["1.dcm"]
            assert sorted(p.name for p in in_progress.iterdir()) == ["1.dcm", "2.dcm"]
            assert sorted(p.name for p in downloaded.iterdir()) == [".2.dcm.x9q1.file-meta", "1.dcm"]  # young kept
            assert [p.name for p in other.iterdir()] == [p.name for p in label_downloaded.iterdir()] == ["1.dcm"]
            assert (cache / f"{PARTIAL_DOWNLOAD_PREFIX}file").read_bytes() == b"kept"
            assert (cache / f"{PARTIAL_DOWNLOAD_PREFIX}link").is_symlink()
            assert (target / "1.dcm").read_bytes() == b"kept"
            log = server.log_tail(200000)
            for removed in (stale, stale_empty, stale_label):
                assert f"removed the partial download {removed}: a server stopped during the download left it" in log
            assert log.count("removed the partial download") == 3, log[-4000:]
            for removed in (downloaded / ".1.dcm.k2j4.file-meta", label_downloaded / ".1.dcm.p0z3.file-meta"):
                assert f"removed the file meta temp {removed}: a server stopped while it wrote it left it" in log
            assert log.count("removed the file meta temp") == 2, log[-4000:]
            assert server.alive()
        finally:
            stop_server(server)
    finally:
        stop_orthanc(pacs)


def test_a_pacs_that_lists_part_of_its_series_is_an_error_not_studies_missing_in_silence(tmp_path, tiny_weights):
    """MONAI Label's DICOMweb datastore lists one answer of the PACS: Orthanc's LimitFindResults cuts it to that many
    series plus one and says nothing, so the app listed part of the studies (here 3 of 5): the others answered 404
    "no image" to an infer and were never handed out for review. The listing now fails loudly: an ERROR in the
    server's log and a 503 naming the setting from the routes that list (``/info/`` included), until the PACS lists
    them all. (The server starts while the PACS holds 2 series, all listed; 3 more arrive while it runs.)"""
    import time

    import requests

    pacs = start_orthanc(tmp_path / "orthanc", extra_config={"LimitFindResults": 2})
    try:
        uids = [upload_real_ct_series(pacs, tmp_path / f"series{k}") for k in range(2)]
        server = start_server(pacs.dicomweb, copy_weights(tiny_weights, tmp_path / "model"), tmp_path / "work",
                              env={"MONAI_LABEL_DICOMWEB_CACHE_EXPIRY": "1"})  # each listing asks the PACS
        try:
            answer = requests.get(f"{server.url}/datastore/", timeout=600)
            assert answer.status_code == 200 and answer.json()["total"] == 2, answer.text[:500]
            uids += [upload_real_ct_series(pacs, tmp_path / f"series{k}") for k in range(2, 5)]
            time.sleep(2)
            answer = requests.get(f"{server.url}/datastore/", timeout=600)
            assert answer.status_code == 503, answer.text[:500]
            detail = answer.json()["detail"]
            assert "lists only part of its series (3 given)" in detail and "LimitFindResults 2" in detail, detail
            assert "no study is listed, denoised or reviewed" in detail, detail
            answer = requests.post(f"{server.url}/infer/nlm", params={"image": uids[-1], "output": "json"},
                                   timeout=600)
            assert answer.status_code == 503 and "LimitFindResults 2" in answer.text, answer.text[:500]
            answer = requests.get(f"{server.url}/info/", timeout=600)
            assert answer.status_code == 503 and "LimitFindResults 2" in answer.text, answer.text[:500]
            assert "cannot list the PACS's studies" in server.log_path.read_text()
            assert server.alive()
        finally:
            stop_server(server)
    finally:
        stop_orthanc(pacs)


def test_a_pacs_that_is_down_never_answers_or_fails_is_a_503_504_or_502_in_seconds(tmp_path, tiny_weights):
    """The PACS goes down while the server runs: an infer by id asked it twice (the series' size, then its files),
    each request tried 5 times with waits of 2, 4, 8 and 16 s (MONAI Label's client): a minute before the 503. The
    size query's failure to connect now answers at once, after 3 tries (2 + 4 s). A PACS that accepts connections
    and never answers (a socket server on its port) held the infer and the review queue's hand-out for ever: each is
    a 504 saying so after ``ADL_PACS_READ_TIMEOUT_S`` (here 2 s); so is a search through the DICOMweb proxy (it said
    502, as for a PACS that cannot be reached), and one whose answer stops half way. One that answers with an error
    status (a server on its port answering 502, then 503) had ``POST /train/{model}`` and infer answer a bare 500:
    each is now a 502 (503) naming the PACS's status. The --studies URL carries a user name and password: neither is
    in the audit log's ``server_started`` entry (the URL was recorded whole) nor in a line the app logs (the 503's
    ERROR named the PACS request's URL whole, and so did the proxy's)."""
    import time
    from urllib.parse import urlsplit

    import requests

    from lib.audit import AuditLog
    from lib.audit.location import default_audit_dir

    pacs = start_orthanc(tmp_path / "orthanc")
    try:
        uid = upload_real_ct_series(pacs, tmp_path / "series")
        studies = pacs.dicomweb.replace("://", "://dr_admin:s3cret-pw@", 1)  # Orthanc here asks none: ignored
        model_dir = copy_weights(tiny_weights, tmp_path / "model")
        server = start_server(studies, model_dir, tmp_path / "work", env={"ADL_PACS_READ_TIMEOUT_S": "2"})
    finally:
        stop_orthanc(pacs)
    try:
        started = time.monotonic()
        answer = requests.post(f"{server.url}/infer/adl", params={"image": uid, "output": "json"},
                               data={"params": "{}"}, timeout=600)
        elapsed = time.monotonic() - started
        assert answer.status_code == 503 and "the PACS (DICOMweb server) holding the studies cannot be reached" \
            in answer.json()["detail"], answer.text
        assert elapsed < 25, f"{elapsed:.0f} s before the 503 (was 60 s)"
        with silent_server(urlsplit(pacs.url).port):  # the PACS's port: connections accepted, nothing answered
            for method, route, kwargs in (
                    ("post", "/infer/adl", {"params": {"image": uid, "output": "json"}, "data": {"params": "{}"}}),
                    ("post", "/activelearning/next_unreviewed", {"json": {}})):
                started = time.monotonic()
                answer = getattr(requests, method)(f"{server.url}{route}", timeout=120, **kwargs)
                elapsed = time.monotonic() - started
                assert answer.status_code == 504, (route, answer.status_code, answer.text[:500])
                assert answer.json()["detail"].startswith("the PACS (DICOMweb server) holding the studies did not "
                                                          "answer within 2 s"), answer.text
                assert elapsed < 30, f"{route}: {elapsed:.0f} s before the 504"
        assert "the PACS did not answer within 2 s" in server.log_tail(20000)
        # the DICOMweb proxy (a viewer's search and retrievals) said 502, as if the PACS could not be reached, to one
        # that sends nothing, or stops half way through its answer
        for answer_start in (b"", b"HTTP/1.1 200 OK\r\nContent-Type: application/dicom+json\r\n"
                                  b"Content-Length: 1000\r\n\r\n[{"):
            with silent_server(urlsplit(pacs.url).port, answer_start):
                started = time.monotonic()
                answer = requests.get(f"{server.url}/proxy/dicom/qido/studies?PatientID=x", timeout=120)
                elapsed = time.monotonic() - started
            assert answer.status_code == 504, (answer_start, answer.status_code, answer.text[:500])
            assert answer.json()["detail"].startswith("the PACS (DICOMweb server) holding the studies did not answer "
                                                      "within 2 s"), answer.text
            assert elapsed < 30, f"proxy: {elapsed:.0f} s before the 504"
            assert "whether it stored" not in answer.text
        # a store that the PACS took and never answered may have been kept: a viewer is told so, not only "try again"
        with silent_server(urlsplit(pacs.url).port):
            part = Path(get_testdata_file("CT_small.dcm")).read_bytes()
            answer = requests.post(f"{server.url}/proxy/dicom/stow/studies", timeout=120,
                                   data=b"--B\r\nContent-Type: application/dicom\r\n\r\n" + part + b"\r\n--B--\r\n",
                                   headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=B'})
        assert answer.status_code == 504, (answer.status_code, answer.text[:500])
        assert "whether it stored what was sent is unknown: look for the series on the PACS" in answer.text, answer.text
        # one that stops taking the store half way (40 MB, more than the sockets hold) said 502 "did not answer",
        # after the 10 s connect timeout: the same 504, after the read timeout
        big = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        big.Rows = big.Columns = 4096
        big.PixelData = bytes(4096 * 4096 * 2)
        part = io.BytesIO()
        big.save_as(part)
        with silent_server(urlsplit(pacs.url).port):
            started = time.monotonic()
            answer = requests.post(f"{server.url}/proxy/dicom/stow/studies", timeout=120, data=b"".join((
                b"--B\r\nContent-Type: application/dicom\r\n\r\n", part.getvalue(), b"\r\n--B--\r\n")),
                headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=B'})
            elapsed = time.monotonic() - started
        assert answer.status_code == 504, (answer.status_code, answer.text[:500])
        assert answer.json()["detail"].startswith("the PACS (DICOMweb server) holding the studies did not answer "
                                                  "within 2 s"), answer.text
        assert "whether it stored what was sent is unknown" in answer.text, answer.text
        assert elapsed < 9, f"proxy: {elapsed:.0f} s before the 504 of a store not taken (the read timeout is 2 s)"
        assert "PACS proxy: GET http://127.0.0.1:" in server.log_tail(20000)
        # a PACS that answers with an error: POST /train/{model} (which reads each CT series' modality of the PACS)
        # and infer said a bare 500; the PACS's status is named, a gateway failure 502, one overloaded (503, tried
        # 3 times) 503
        train = {"mode": "adapt_noise", "steps": 2, "patch_size": 32, "device": "cpu"}
        for status in (502, 503):
            with failing_server(urlsplit(pacs.url).port, status) as received:
                for route, kwargs in (("/train/adl", {"json": train}),
                                      ("/infer/adl", {"params": {"image": uid, "output": "json"},
                                                      "data": {"params": "{}"}})):
                    answer = requests.post(f"{server.url}{route}", timeout=120, **kwargs)
                    assert answer.status_code == status, (route, answer.status_code, answer.text[:500])
                    assert answer.json()["detail"].startswith(
                        "the PACS (DICOMweb server) holding the studies answered the server's request with an error "
                        f"(HTTP {status}"), (route, answer.text)
                assert received, "the PACS was not asked"
        failures = [line for line in server.log_tail(200000).splitlines()
                    if any(said in line for said in ("the PACS cannot be reached", "the PACS did not answer within",
                                                     "the PACS answered"))]
        assert {said for said in ("cannot be reached", "did not answer", "answered") if any(
            f"the PACS {said}" in line and f"http://127.0.0.1:{urlsplit(pacs.url).port}/" in line
            for line in failures)} == {"cannot be reached", "did not answer", "answered"}, failures
        assert not [line for line in failures if "s3cret-pw" in line], failures
        assert server.alive()
        started_entries = AuditLog(default_audit_dir(studies, str(model_dir))).entries("server_started")
        assert [e["fields"]["studies"] for e in started_entries] == [pacs.dicomweb], started_entries
        log = server.log_tail(400000)
        assert "the PACS cannot be reached" in log, log[-3000:]
        # MONAI Label's own start-up lines print --studies as given (two before the app is loaded): none of the app's
        assert [line for line in log.splitlines() if "s3cret-pw" in line and "(monailabel." not in line
                and "(__main__:" not in line] == [], log[-3000:]
    finally:
        stop_server(server)


def test_every_pacs_request_waits_for_each_read_of_its_answer_not_for_ever(tmp_path, monkeypatch):
    """Only the series identity searches had a read deadline: a PACS that accepts the connection and never answers
    held any other request (a series' size, its download, its metadata and frames, a store) and its worker thread
    for ever. Every request of the datastore's client now waits ``ADL_PACS_READ_TIMEOUT_S`` (here 2 s) for each read
    of the answer, and is not tried again (dicomweb-client's 3 tries would wait 12 s): a real socket server on
    loopback that accepts and never answers fails the size search and the download in about 2 s, an answer that
    stalls half way (a relay in front of the real Orthanc) as well, nothing of the series kept. Per read, not in
    all: the same series sent by a slow relay, 128 KiB every 0.2 s (a tenth of the read timeout), is downloaded
    whole. Frame by frame (``MONAI_LABEL_DICOMWEB_FETCH_BY_FRAME``), a PACS that answers the series' metadata and
    holds back its frames (a relay) stops the download at the first frames asked (MONAI Label's 2 workers: the third
    is not asked, each would wait as long), a read timeout (the routes' 504, not a 502 "not delivered"), nothing of
    the series left in the cache; asked again once the PACS answers, it is downloaded whole. A series identity search
    has a total deadline (``PACS_SEARCH_TIMEOUT_S``, here 1 s): a relay that sends its answer 16 bytes every 0.2 s,
    each read in time, held it some 16 s; it is a 504 at the deadline."""
    import threading
    import time

    from dicomweb_client.api import DICOMwebClient
    from monailabel.datastore.dicom import DICOMWebDatastore
    from requests.exceptions import ReadTimeout

    import lib.pacs_corrections as pacs_corrections
    from lib.pacs import bound_waits, download_within, failed_method, read_timed_out, series_voxels, stow_datasets
    from lib.pacs_corrections import CorrectionNotServed, pacs_identities

    monkeypatch.setenv("ADL_PACS_READ_TIMEOUT_S", "2")

    def store_of(url: str, name: str, fetch_by_frame: bool = False):
        store = DICOMWebDatastore(DICOMwebClient(url), search_filter={"Modality": "CT"},
                                  cache_path=str(tmp_path / name), fetch_by_frame=fetch_by_frame)
        bound_waits(store)
        return store

    def outcome(call, *args) -> tuple[object, float]:
        """(what ``call(*args)`` returned or raised, seconds it took); in a thread: a request that hangs fails."""
        done: list = []

        def run() -> None:
            try:
                done.append(call(*args))
            except Exception as error:  # noqa: BLE001 - the outcome checked
                done.append(error)

        started = time.monotonic()
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        thread.join(60)
        assert not thread.is_alive(), f"{getattr(call, '__name__', call)} still waits for the PACS after 60 s"
        return done[0], time.monotonic() - started

    with silent_server() as port:
        store = store_of(f"http://127.0.0.1:{port}/dicom-web", "silent")
        for call, args in ((series_voxels, (store, "1.2.3")), (download_within, (store, "1.2.3", 10**9))):
            error, seconds = outcome(call, *args)
            assert isinstance(error, ReadTimeout) and read_timed_out(error), (call.__name__, repr(error))
            assert seconds < 7, f"{call.__name__}: {seconds:.1f} s (3 tries would take over 12)"
        # a store the PACS stops taking (40 MB, more than the sockets hold) is a read timeout too, after the read
        # timeout, not the 10 s connect timeout (it was a "cannot be reached" 503, after 10 s, tried 3 times); the
        # error names its method (the 504's "whether it stored what was sent is unknown")
        big = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        big.Rows = big.Columns = 4096
        big.PixelData = bytes(4096 * 4096 * 2)
        error, seconds = outcome(stow_datasets, store._client, [big])
        assert read_timed_out(error) and failed_method(error) == "POST", repr(error)
        assert seconds < 7, f"the store waited {seconds:.1f} s for the PACS to take it (the read timeout is 2 s)"
    # a store whose answer stalls half way: requests' error carries no request, its method is noted all the same
    with silent_server(answer_start=b"HTTP/1.1 200 OK\r\nContent-Type: application/dicom+json\r\n"
                                    b"Content-Length: 1000\r\n\r\n[{") as port:
        store = store_of(f"http://127.0.0.1:{port}/dicom-web", "stalled_store")
        error, seconds = outcome(stow_datasets, store._client, [pydicom.dcmread(get_testdata_file("CT_small.dcm"))])
        assert read_timed_out(error) and getattr(error, "request", None) is None, repr(error)
        assert failed_method(error) == "POST", repr(error)
    pacs = start_orthanc(tmp_path / "orthanc")
    try:
        files = real_ct_series(tmp_path / "series")  # 3 slices, about 1.5 MB to send
        pacs.upload_files(files)
        uid = str(pydicom.dcmread(files[0]).SeriesInstanceUID)
        with slow_relay(pacs, chunk=2**18, pause_s=0.2, stall_after=2**18) as studies:
            store = store_of(studies, "stalled")
            error, seconds = outcome(download_within, store, uid, 10**9, series_voxels(store, uid))
            assert read_timed_out(error) and seconds < 10, (repr(error), seconds)
            assert not list((tmp_path / "stalled").rglob(f"*{uid}*"))  # nothing of it kept
        with slow_relay(pacs, chunk=2**17, pause_s=0.2) as studies:
            store = store_of(studies, "slow")
            folder, seconds = outcome(download_within, store, uid, 10**9)
            assert isinstance(folder, Path) and len(list(folder.iterdir())) == 3, repr(folder)
            assert seconds > 1.5, f"{seconds:.1f} s: the relay was not slow"
        with holding_back(pacs, lambda path: "/frames/" in path) as relay:  # metadata answered, frames not
            store = store_of(relay.dicomweb, "by_frame", fetch_by_frame=True)
            error, seconds = outcome(download_within, store, uid, 10**9)
            assert read_timed_out(error) and seconds < 10, (repr(error), seconds)
            assert 1 <= len(relay.held) <= 2, relay.held  # the 2 workers' first frames: the third was not asked
            assert not list((tmp_path / "by_frame").rglob(f"*{uid}*")), list((tmp_path / "by_frame").rglob("*"))
            relay.holding = False  # the PACS answers again
            folder, _ = outcome(download_within, store, uid, 10**9)
            assert isinstance(folder, Path) and len(list(folder.iterdir())) == 3, repr(folder)
            assert [pydicom.dcmread(path).pixel_array.shape for path in sorted(folder.iterdir())] == \
                [pydicom.dcmread(files[0]).pixel_array.shape] * 3
        monkeypatch.setattr(pacs_corrections, "PACS_SEARCH_TIMEOUT_S", 1.0)
        with slow_relay(pacs, chunk=16, pause_s=0.2) as studies:  # each read in time, the answer never whole
            error, seconds = outcome(pacs_identities, store_of(studies, "trickle"), uid)
            assert isinstance(error, CorrectionNotServed) and error.status == 504, repr(error)
            assert "did not answer the search for series" in str(error) and "within 1 s" in str(error), str(error)
            assert seconds < 6, f"the identity search with a 1 s deadline took {seconds:.1f} s"
    finally:
        stop_orthanc(pacs)


def test_no_correction_of_a_pacs_is_trained_on_while_the_audit_log_cannot_be_read(tmp_path):
    """The audit log names the denoised series this server stored in the PACS, whose corrections are no training
    data. A log that could not be read named none: every kept correction, one of the server's own output included,
    was listed for training in silence. The training list (:func:`correction_pairs`, the datastore's ``datalist``)
    is now refused (503 naming the audit log) until the log can be read, while ``get_labeled_images`` (MONAI
    Label's ``/info/`` and datastore statistics count through it) lists none of the kept corrections instead of
    failing; a readable one lists the correction."""
    from dicomweb_client.api import DICOMwebClient
    from monailabel.datastore.dicom import DICOMWebDatastore

    from lib.audit import LOG_NAME, AuditLog
    from lib.pacs import bound_waits
    from lib.pacs_corrections import SERIES_IDENTITY_KEY, CorrectionNotServed, KeptLabels, server_kept_labels
    from lib.trainers.finetune import correction_pairs

    pacs = start_orthanc(tmp_path / "orthanc")
    try:
        files = real_ct_series(tmp_path / "series")
        pacs.upload_files(files)
        header = pydicom.dcmread(files[0], stop_before_pixels=True)
        uid = str(header.SeriesInstanceUID)
        store = DICOMWebDatastore(DICOMwebClient(pacs.dicomweb), search_filter={"Modality": "CT"},
                                  cache_path=str(tmp_path / "cache"))
        bound_waits(store)
        (tmp_path / "audit" / LOG_NAME).mkdir(parents=True)  # there, and no file to read
        server_kept_labels(store, tmp_path / "kept", AuditLog(tmp_path / "audit"))
        (tmp_path / "final.nii.gz").write_bytes(b"a correction")
        KeptLabels(tmp_path / "kept").save(uid, str(tmp_path / "final.nii.gz"), "final", {SERIES_IDENTITY_KEY: {
            "series_instance_uid": uid, "study_instance_uid": str(header.StudyInstanceUID),
            "patient_id": str(header.PatientID)}})
        for listing in (lambda: correction_pairs(store), store.datalist):
            with pytest.raises(CorrectionNotServed) as refused:
                listing()
            assert refused.value.status == 503 and "the corrections kept on this server are not used: the audit " \
                "log" in str(refused.value) and "cannot be read" in str(refused.value), str(refused.value)
        assert store.get_labeled_images() == [] and store.status()["completed"] == 0  # /info/ keeps answering
        (tmp_path / "audit" / LOG_NAME).rmdir()  # no log yet: no result stored
        assert store.get_labeled_images() == [uid]
    finally:
        stop_orthanc(pacs)


def test_a_moved_series_check_takes_no_attribute_the_pacs_left_out_for_a_change_nor_fails_on_a_removed_folder(
        tmp_path, caplog, monkeypatch):
    """Before a cached series is opened, :func:`refresh_moved_series` compares its download with the PACS's series
    search. A PACS that leaves PatientID out of that answer (an attribute it does not return is unknown) was taken
    for one that moved the series to patient '': every open removed the cache and downloaded the series again, a
    wrong 'moved' WARNING each time. And a download another process (a batch infer or training subprocess running
    the same code) removed between the check and the removal was a bare 500 leaving an empty partial folder."""
    import logging
    import shutil

    from dicomweb_client.api import DICOMwebClient
    from monailabel.datastore.dicom import DICOMWebDatastore

    from lib import pacs_corrections
    from lib.pacs import bound_waits, cached_series_folder
    from lib.pacs_corrections import moved_record, refresh_moved_series, server_kept_labels

    pacs = start_orthanc(tmp_path / "orthanc")
    try:
        files = real_ct_series(tmp_path / "series")
        pacs.upload_files(files)
        uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
        store = DICOMWebDatastore(DICOMwebClient(pacs.dicomweb), search_filter={"Modality": "CT"},
                                  cache_path=str(tmp_path / "cache"))
        bound_waits(store)
        server_kept_labels(store, tmp_path / "kept")
        store.get_image_uri(uid)  # downloaded and converted
        folder = cached_series_folder(store, uid)
        converted = folder.parent / f"{uid}.nii.gz"
        before = converted.stat()
        searched = store._client.search_for_series  # the PACS's real answer, PatientID left out of it

        def without_patient_id(*args, **kwargs):
            return [{tag: value for tag, value in entry.items() if tag != "00100020"}
                    for entry in searched(*args, **kwargs)]

        monkeypatch.setattr(store._client, "search_for_series", without_patient_id)
        with caplog.at_level(logging.WARNING):
            assert refresh_moved_series(store, uid) is None
        assert (converted.stat().st_ino, converted.stat().st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
        assert "cached download was not the series" not in caplog.text and moved_record(store, uid) is None
        monkeypatch.undo()
        # the cached download removed by another process between this one's check and its removal: gone, nothing
        # left behind, no error
        made = pacs_corrections.tempfile.mkdtemp

        def removed_meanwhile(*args, **kwargs):
            aside = made(*args, **kwargs)
            shutil.rmtree(folder)  # as another process's refresh of the series did
            return aside

        monkeypatch.setattr(pacs_corrections.tempfile, "mkdtemp", removed_meanwhile)
        pacs_corrections._remove_cached_download(store, uid, folder, converted)
        monkeypatch.undo()
        assert sorted(p.name for p in folder.parent.iterdir() if uid in p.name) == [], list(folder.parent.iterdir())
        assert uid not in json.loads(Path(store._datastore_config_path).read_text())["objects"]
    finally:
        stop_orthanc(pacs)


def test_what_a_killed_server_left_of_a_series_is_removed_when_the_series_is_asked_again(tmp_path, caplog):
    """A partial download (``.partial-<uid>-*``) and a file meta temp (``.<name>.*.file-meta``) that a server killed
    meanwhile left were removed at start-up only (the temp never): a server that runs for months kept them. The
    series' next download removes its own partial folders untouched for ``PARTIAL_DOWNLOAD_STALE_S`` (not a younger
    one: another server's download in progress; not another series'), and the next use of its downloaded folder the
    temps in it untouched for ``FILE_META_TEMP_STALE_S`` (not a younger one), each logged. Real Orthanc, the
    datastore's bounded download."""
    import logging
    import os
    import time

    from dicomweb_client.api import DICOMwebClient
    from monailabel.datastore.dicom import DICOMWebDatastore

    from lib.pacs import (FILE_META_TEMP_STALE_S, PARTIAL_DOWNLOAD_PREFIX, PARTIAL_DOWNLOAD_STALE_S, bound_waits,
                          cached_series_folder, download_within)

    pacs = start_orthanc(tmp_path / "orthanc")
    try:
        files = real_ct_series(tmp_path / "series", slices=2)
        pacs.upload_files(files)
        uid = str(pydicom.dcmread(files[0]).SeriesInstanceUID)
        store = DICOMWebDatastore(DICOMwebClient(pacs.dicomweb), search_filter={"Modality": "CT"},
                                  cache_path=str(tmp_path / "cache"))
        bound_waits(store)
        folder = cached_series_folder(store, uid)

        def left(name: str, age_s: float, file: str | None = None) -> Path:
            """A folder ``name`` in the cache (or the file ``file`` in it) last written ``age_s`` seconds ago."""
            path = folder.parent / name
            path.mkdir(parents=True, exist_ok=True)
            if file is not None:
                path = path / file
                path.write_bytes(b"\0" * 128 + b"DICM")
            when = time.time() - age_s
            os.utime(path, (when, when))
            return path

        stale = left(f"{PARTIAL_DOWNLOAD_PREFIX}{uid}-k3j2x9", PARTIAL_DOWNLOAD_STALE_S + 60)
        young = left(f"{PARTIAL_DOWNLOAD_PREFIX}{uid}-p0w7e2", 60)
        other = left(f"{PARTIAL_DOWNLOAD_PREFIX}{uid}9-a8c1q0", PARTIAL_DOWNLOAD_STALE_S + 60)  # another series'
        caplog.set_level(logging.INFO, logger="lib.pacs")
        assert download_within(store, uid, 10**9) == folder and len(list(folder.iterdir())) == 2
        assert not stale.exists() and young.is_dir() and other.is_dir()
        assert any(f"removed the partial download {stale}" in line for line in caplog.messages), caplog.messages
        name = sorted(folder.iterdir())[0].name
        stale_temp = left(uid, FILE_META_TEMP_STALE_S + 60, f".{name}.k2j4.file-meta")
        young_temp = left(uid, 5, f".{name}.x9q1.file-meta")
        assert download_within(store, uid, 10**9) == folder  # the folder used again, nothing asked of the PACS
        assert not stale_temp.exists() and young_temp.exists() and (folder / name).is_file()
        assert any(f"removed the file meta temp {stale_temp}" in line for line in caplog.messages), caplog.messages
    finally:
        stop_orthanc(pacs)


class _Killed(BaseException):
    """The server killed at this point (no ``except Exception`` of the app runs, as with SIGKILL)."""


def test_a_derived_series_stored_by_a_server_killed_before_its_record_is_no_study(tmp_path, tiny_weights,
                                                                                  monkeypatch):
    """The derived series was recorded (``result_stored_to_pacs``) only AFTER the STOW: a server killed in between
    (or a store that failed half way, 502) left the app's result in the PACS unrecorded, and the next server listed
    it as a study, handed out for review and denoised as one. ``result_storing_to_pacs`` names its UID before the
    STOW now."""
    from monailabel.config import settings

    from conftest import import_app_main
    from lib.activelearning import NextUnreviewed

    pacs = start_orthanc(tmp_path / "orthanc")
    try:
        uid = upload_real_ct_series(pacs, tmp_path / "series")
        model = copy_weights(tiny_weights, tmp_path / "model")
        monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the app's result files: not in the machine's /tmp
        monkeypatch.setattr(settings, "MONAI_LABEL_DICOMWEB_CACHE_PATH", str(tmp_path / "dicomweb_cache"))
        for name in ("app", "app2"):  # MONAI Label downloads dcmqi's converter unless the app has it
            (tmp_path / name / "bin").mkdir(parents=True)
            (tmp_path / name / "bin" / "itkimage2segimage").write_text("")
        main = import_app_main()
        app = main.DenoisingApp(str(tmp_path / "app"), pacs.dicomweb, {"model_dir": str(model)})
        append = app.audit.append

        def killed_before_the_record(event, fields=None):
            if event == "result_stored_to_pacs":
                raise _Killed()
            return append(event, fields)

        with monkeypatch.context() as patch:
            patch.setattr(app.audit, "append", killed_before_the_record)
            with pytest.raises(_Killed):
                app.infer({"model": "adl", "image": uid, "store_to_pacs": True})
        derived = [s["MainDicomTags"]["SeriesInstanceUID"] for s in pacs.get("/series?expand")
                   if s["MainDicomTags"]["SeriesInstanceUID"] != uid]
        assert len(derived) == 1, derived  # stored, its record never written
        restarted = main.DenoisingApp(str(tmp_path / "app2"), pacs.dicomweb, {"model_dir": str(model)})
        assert sorted(restarted.datastore().list_images()) == sorted([uid, derived[0]])
        queue = NextUnreviewed(restarted.audit)
        assert queue({}, restarted.datastore())["id"] == uid
        assert queue({"exclude": [uid]}, restarted.datastore()) is None
    finally:
        stop_orthanc(pacs)


def test_the_review_queue_of_a_pacs_follows_the_audit_log_whatever_the_cache(tmp_path, tiny_weights, monkeypatch):
    """A PACS series' info (the review queue's copy of its verdict) lives in the server's local cache of the
    series it downloaded. The queue read it there alone: a server started with another cache folder (a cache
    cleared, a server moved) handed out series already judged; with ``MONAI_LABEL_DICOMWEB_CONVERT_TO_NIFTI=false``
    (no series is ever added to the cache) a verdict answered a bare 500 after it was recorded, and the queue never
    moved; the start-up did not set a verdict cut short (a server killed between the log and the info) on a PACS.
    The queue reads a PACS's verdicts from the log now, and the start-up sets the cached series' info from it."""
    from monailabel.config import settings

    from conftest import import_app_main
    from lib.activelearning import NextUnreviewed, record_result, record_verdict
    from lib.pacs_corrections import CorrectionNotServed

    pacs = start_orthanc(tmp_path / "orthanc")
    try:
        a, b, c = sorted(upload_real_ct_series(pacs, tmp_path / name) for name in ("a", "b", "c"))
        model = copy_weights(tiny_weights, tmp_path / "model")
        monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the app's result files: not in the machine's /tmp
        main = import_app_main()

        def app(name: str, cache: str, convert: bool = True):
            (tmp_path / name / "bin").mkdir(parents=True)  # MONAI Label downloads dcmqi's converter otherwise
            (tmp_path / name / "bin" / "itkimage2segimage").write_text("")
            monkeypatch.setattr(settings, "MONAI_LABEL_DICOMWEB_CACHE_PATH", str(tmp_path / cache))
            monkeypatch.setattr(settings, "MONAI_LABEL_DICOMWEB_CONVERT_TO_NIFTI", convert)
            return main.DenoisingApp(str(tmp_path / name), pacs.dicomweb, {"model_dir": str(model), "models": "nlm"})

        first = app("app1", "cache1")
        for uid in (a, b):
            first.infer({"model": "nlm", "image": uid})
        record_verdict(first.audit, first.datastore(), a, "accepted", "dr_a")
        store = first.datastore()
        with monkeypatch.context() as patch:  # the server killed between the verdict's entry and its copy
            patch.setattr(store, "set_review", lambda image_id, review: (_ for _ in ()).throw(_Killed()))
            with pytest.raises(_Killed):
                record_verdict(first.audit, store, b, "accepted", "dr_a")
        assert NextUnreviewed(first.audit)({}, store)["id"] == c
        # restarted on the same cache: the cut-short verdict is set in the cached series' info
        again = app("app2", "cache1")
        assert "review" not in again.datastore().get_image_info(b)
        again._reconcile_reviews()
        assert again.datastore().get_image_info(b)["review"]["verdict"] == "accepted"
        assert NextUnreviewed(again.audit)({}, again.datastore()) == {"id": c, "remaining_unreviewed": 1}
        # another cache folder: nothing cached, the judged series are not handed out again
        moved = app("app3", "cache2")
        assert NextUnreviewed(moved.audit)({}, moved.datastore()) == {"id": c, "remaining_unreviewed": 1}
        # no NIfTI conversion, so no series in the cache: the verdict is recorded and answered, the queue moves
        plain = app("app4", "cache3", convert=False)
        plain.infer({"model": "nlm", "image": c})
        verdict = record_verdict(plain.audit, plain.datastore(), c, "rejected", "dr_b", reason="streaks")
        assert verdict["verdict"] == "rejected"
        assert NextUnreviewed(plain.audit)({}, plain.datastore()) is None
        # a reset to unreviewed puts the series back in the queue
        record_verdict(plain.audit, plain.datastore(), a, "unreviewed", "dr_b")
        assert NextUnreviewed(plain.audit)({}, plain.datastore()) == {"id": a, "remaining_unreviewed": 1}
        # a result recorded by an earlier version (its input names no patient): whose it was cannot be told, so
        # its verdict is refused (it was recorded unchecked)
        made = [e for e in plain.audit.entries("result") if e["fields"]["input"]["image"] == a][-1]
        assert made["fields"]["input"]["patient_id"], made
        older = record_result(plain.audit, {**made["fields"], "input": {
            k: v for k, v in made["fields"]["input"].items() if k != "patient_id"}})
        verdicts = len(plain.audit.entries("verdict"))
        with pytest.raises(CorrectionNotServed, match="denoise the series again and judge that result") as refused:
            record_verdict(plain.audit, plain.datastore(), a, "accepted", "dr_b", result_seq=older["seq"])
        assert refused.value.status == 409 and "the result judged names no patient" in str(refused.value)
        assert len(plain.audit.entries("verdict")) == verdicts
        judged = record_verdict(plain.audit, plain.datastore(), a, "accepted", "dr_b", result_seq=made["seq"])
        assert judged["result"]["result_seq"] == made["seq"], judged  # one naming its patient: recorded
    finally:
        stop_orthanc(pacs)


def test_a_hand_out_of_a_series_not_in_the_local_cache_is_one_access_entry_not_a_failure(tmp_path, tiny_weights):
    """With ``MONAI_LABEL_DICOMWEB_CONVERT_TO_NIFTI=false`` a PACS series is never in the server's local cache (MONAI
    Label adds one only once converted to NIfTI): it has no info. The stock active-learning route notes each
    hand-out in the image's info, which failed there: every hand-out left an ``image_info_updating`` entry and an
    ``image_info_updated_failed`` one (ImageNotFoundException), failures an auditor must chase that were none. Each
    hand-out is now one ``review_queue_handout`` entry and nothing else, and the log verifies."""
    import requests

    from lib.activelearning import HANDOUT_EVENT
    from lib.audit import AuditLog

    pacs = start_orthanc(tmp_path / "orthanc")
    try:
        uid = upload_real_ct_series(pacs, tmp_path / "ct")
        audit_dir = tmp_path / "audit"
        server = start_server(pacs.dicomweb, copy_weights(tiny_weights, tmp_path / "model"), tmp_path / "work",
                              conf={"audit_dir": audit_dir},
                              env={"MONAI_LABEL_DICOMWEB_CONVERT_TO_NIFTI": "false"})
        try:
            for _ in range(2):  # the queue's choice as before: the one unreviewed series, each time
                answer = requests.post(f"{server.url}/activelearning/next_unreviewed", json={}, timeout=600)
                assert answer.status_code == 200 and answer.json()["id"] == uid, answer.text[:500]
            verify = requests.get(f"{server.url}/review/audit/verify", timeout=60).json()
            assert verify["ok"] and not verify["refusing_entries"], verify
            server_log = server.log_tail(200_000)
        finally:
            stop_server(server)
    finally:
        stop_orthanc(pacs)
    audit = AuditLog(audit_dir)
    assert audit.verify().ok
    entries = [json.loads(line) for line in audit.path.read_text().splitlines()]  # the file the server wrote
    assert [e["event"] for e in entries] == ["server_started", HANDOUT_EVENT, HANDOUT_EVENT], \
        [(e["event"], e["fields"].get("error")) for e in entries]
    assert all(e["fields"]["image"] == uid and e["fields"]["strategy"] == "next_unreviewed" for e in entries[1:])
    assert "Failed to update Image info" not in server_log  # the stock route's warning: nothing was attempted


def _send_again_under(pacs, files: list[Path], patient: str, study: str | None = None) -> None:
    """The PACS's copy of the series of ``files`` replaced by one of ``patient`` (and of ``study`` when given: a
    merge, a re-sent series): the series removed from the PACS, its files' PatientID (StudyInstanceUID) changed and
    sent again."""
    uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    for series in pacs.get("/series?expand"):
        if series["MainDicomTags"]["SeriesInstanceUID"] == uid:
            urllib.request.urlopen(urllib.request.Request(f"{pacs.url}/series/{series['ID']}", method="DELETE"),
                                   timeout=60)
    for path in files:
        dataset = pydicom.dcmread(path)
        dataset.PatientID = patient
        if study is not None:
            dataset.StudyInstanceUID = study
        dataset.save_as(path, write_like_original=False)
    pacs.upload_files(files)


def test_the_info_of_a_series_not_converted_names_its_patient_for_the_confirmation_after_a_move(tmp_path,
                                                                                                tiny_weights):
    """With ``MONAI_LABEL_DICOMWEB_CONVERT_TO_NIFTI=false`` MONAI Label records no image info (only a conversion
    does): ``GET /datastore/image/info`` answered ``{}``, so a client (the Slicer module's reads PatientID and
    StudyInstanceUID there) had no patient and study to confirm, and once the PACS moved the series every correction
    and verdict of it was a 409 with no way out. The info of a downloaded series now names them, from its download's
    header; after the move it names the new patient (the series downloaded anew), a correction and a verdict
    confirming it are recorded for it, ones confirming the old patient or none are refused. The old patient's
    correction that the new one replaces, kept aside in ``superseded/``, is a ``label_superseded`` audit entry
    (who, when, which series, both patients, where it is kept; there was none). The move here changes both patient
    and study (64-character UIDs): the server's refusal of a correction confirming the old ones is over the 1000
    characters the client keeps, cut within its remedy for API clients, which the module's words still leave out
    (it showed them: the end of the remedy was looked for). A download whose files name two patients (a retrieve
    taken while the PACS merged them) is refused for a verdict (it was named after its first file) and downloaded
    anew when the series is opened again."""
    import requests
    from pydicom.uid import generate_uid

    from ADLDenoiseLib import DenoiseServerError
    from ADLDenoiseLib.client import opened_identity_of
    from ADLDenoiseLib.review_session import SeriesMoved, refused_as_moved, send_verdict
    from lib.audit import AuditLog
    from lib.audit.location import default_audit_dir, default_corrections_dir
    from lib.imaging import read_volume, write_volume
    from lib.pacs_corrections import LABEL_SUPERSEDED, KeptLabels

    pacs = start_orthanc(tmp_path / "orthanc")
    try:
        files = real_ct_series(tmp_path / "ct")
        pacs.upload_files(files)
        header = pydicom.dcmread(files[0], stop_before_pixels=True)
        uid, study, old_patient = str(header.SeriesInstanceUID), str(header.StudyInstanceUID), str(header.PatientID)
        volume = read_volume(tmp_path / "ct", fill_padding=False)  # a correction on the series' grid, in HU
        volume.array[:, :16, :16] += 20.0
        write_volume(volume, tmp_path / "final.nii.gz", output_dtype="float32")
        model_dir = copy_weights(tiny_weights, tmp_path / "model")
        server = start_server(pacs.dicomweb, model_dir, tmp_path / "work",
                              env={"MONAI_LABEL_DICOMWEB_CONVERT_TO_NIFTI": "false"})
        try:
            client = DenoiseServerClient(server.url)

            def info() -> dict:
                answer = requests.get(f"{server.url}/datastore/image/info", params={"image": uid}, timeout=600)
                assert answer.status_code == 200, answer.text[:500]
                return answer.json()

            assert client.next_study()["id"] == uid  # handed out: downloaded into the server's cache
            assert [p for p in (tmp_path / "work" / "dicomweb_cache").glob(f"*/{uid}") if p.is_dir()]
            first = info()
            assert opened_identity_of(first) == {"patient_id": old_patient, "study_instance_uid": study}, first
            assert first["SeriesInstanceUID"] == uid and first["Modality"] == "CT" and "path" not in first, first
            assert client.save_correction(uid, tmp_path / "final.nii.gz")["label"] == uid  # the old patient's
            kept = KeptLabels(default_corrections_dir(pacs.dicomweb, str(model_dir)))
            old_saved = {key: kept.info(uid, "final")[key] for key in ("sha256", "saved_by", "saved_utc")}
            new_study = generate_uid()
            assert len(uid) == len(study) == len(new_study) == 64  # the longest UIDs: the longest refusal
            _send_again_under(pacs, files, "MOVED-PATIENT", new_study)
            now = info()  # the series downloaded anew: the new patient's
            opened = opened_identity_of(now)
            assert opened == {"patient_id": "MOVED-PATIENT", "study_instance_uid": new_study}, now
            moved = f"the PACS moved series {uid} from patient_id {old_patient!r}"
            for before in ({"patient_id": old_patient, "study_instance_uid": study}, {}):
                with pytest.raises(DenoiseServerError) as refused:
                    client.save_correction(uid, tmp_path / "final.nii.gz", opened=before)
                assert refused.value.status == 409 and moved in str(refused.value), refused.value
                if before:  # both changed: the server's words cut by the client within the remedy (its 1000 chars)
                    assert "save it with params" in str(refused.value), refused.value
                    assert not str(refused.value).endswith("StudyInstanceUID))"), refused.value
                # the Slicer module's words: open the series again (the server's told an API client to send params)
                with pytest.raises(SeriesMoved) as refused, refused_as_moved(uid, "correction"):
                    client.save_correction(uid, tmp_path / "final.nii.gz", opened=before)
                said = str(refused.value)
                assert refused.value.what == "correction" and moved in said, said
                assert "correction was NOT saved" in said and "Open it again (Next study) and redo the correction" \
                    in said and "params" not in said and "image info" not in said, said
            assert client.save_correction(uid, tmp_path / "final.nii.gz", opened=opened)["label"] == uid
            assert kept.info(uid, "final")["series_identity"] == \
                {"series_instance_uid": uid, "study_instance_uid": new_study, "patient_id": "MOVED-PATIENT"}
            for before in ({}, {"patient_id": old_patient, "study_instance_uid": study}):
                with pytest.raises(SeriesMoved) as refused:
                    send_verdict(client, uid, {"verdict": "corrected", "reviewer": "dr_a", "opened": before})
                said = str(refused.value)
                assert moved in said and "Open it again (Next study)" in said and "image info" not in said, said
            verdict = client.review(uid, "corrected", "dr_a", opened=opened)
            assert verdict["series_identity"]["patient_id"] == "MOVED-PATIENT", verdict
            # a download whose files name two patients (a retrieve taken while the PACS merged them): a verdict is
            # refused (it was named after the first file's patient; a correction's read of the files refuses them
            # too), the series downloaded anew once opened
            cache = next(p for p in (tmp_path / "work" / "dicomweb_cache").glob(f"*/{uid}") if p.is_dir())
            last = sorted(cache.iterdir())[-1]
            dataset = pydicom.dcmread(last)
            dataset.PatientID = "OTHER-PATIENT"
            dataset.save_as(last, write_like_original=False)
            with pytest.raises(DenoiseServerError) as refused:
                client.review(uid, "unreviewed", "dr_b", opened=opened)
            said = str(refused.value)
            assert refused.value.status == 409 and "files that name several patients or studies" in said and \
                "'OTHER-PATIENT'" in said and "the verdict was not recorded (open the series again" in said, said
            assert opened_identity_of(info()) == opened  # downloaded anew: one patient's files
            assert {str(pydicom.dcmread(path, stop_before_pixels=True).PatientID) for path in cache.iterdir()} == \
                {"MOVED-PATIENT"}
        finally:
            stop_server(server)
    finally:
        stop_orthanc(pacs)
    # the old patient's correction, replaced, is kept aside: an audit entry says so (who, when, which series, both
    # patients, where), between the save's pending entry and its confirmation (there was none)
    audit = AuditLog(default_audit_dir(pacs.dicomweb, str(model_dir)))
    aside = audit.entries(LABEL_SUPERSEDED)
    assert len(aside) == 1, aside
    fields = aside[0]["fields"]
    assert fields["image"] == uid and fields["tag"] == "final" and fields["moved"] is True, fields
    assert fields["superseded_identity"]["patient_id"] == old_patient, fields
    assert fields["by_identity"]["patient_id"] == "MOVED-PATIENT", fields
    assert fields["route"] == "PUT /datastore/label" and fields["client"] == "127.0.0.1", fields
    assert {key: fields[key] for key in old_saved} == old_saved, fields  # the correction aside: whose, when
    assert (kept.root / fields["kept_in"] / f"{uid}.json").is_file(), fields
    assert [entry["fields"]["reviewer"] for entry in audit.entries("verdict")] == ["dr_a"]  # dr_b's: refused
    events = [(e["event"], e["fields"].get("image")) for e in audit.entries() if e["seq"] > aside[0]["seq"] - 2]
    assert [event for event, _ in events[:3]] == ["label_saving", LABEL_SUPERSEDED, "label_saved"], events
    assert audit.verify().ok


def _waiting_on(lock_file: Path, waiters: int = 1) -> bool:
    """Whether (at least) ``waiters`` requests wait for a ``flock`` of ``lock_file`` (``->`` lines of
    ``/proc/locks`` on its inode)."""
    inode = lock_file.stat().st_ino
    return sum(line.split("->", 1)[1].split()[4].endswith(f":{inode}")
               for line in Path("/proc/locks").read_text().splitlines() if "->" in line) >= waiters


@pytest.mark.skipif(not Path("/proc/locks").is_file(), reason="needs Linux's /proc/locks to see a waiting lock")
def test_a_correction_save_and_a_refresh_of_its_moved_series_never_interleave(tmp_path, tiny_weights):
    """A correction's save checked the series' move record and download, then saved, holding no lock: a refresh
    (another request, or another process on the same folders, downloading the moved series anew) could record the
    move and replace the download between the checks and the save. The save now holds the refresh's lock from its
    checks to the save. A real refresh (this test's process, on the server's folders) is held inside that lock while
    the series moved to another patient; a correction PUT meanwhile (confirming nothing, as a client that opened the
    series before the move) waits for the lock (it was saved at once, 200), then sees the move and is refused (409),
    nothing saved; so does a verdict judging no result, confirming nothing (it was checked against the old download
    while the refresh held the lock: a refresh between its checks and its entry recorded it for the new patient).
    Under the lock the save downloads nothing (it downloaded the series the refresh had just removed, the series'
    reads waiting meanwhile): a download removed by a refresh (here: a conversion older than its download, no move)
    before the save took the lock is a 409 saying to open the series again (it was downloaded anew and saved)."""
    import threading

    import requests
    from dicomweb_client.api import DICOMwebClient
    from monailabel.datastore.dicom import DICOMWebDatastore

    from lib import pacs_corrections
    from lib.audit.location import default_corrections_dir
    from lib.imaging import read_volume, write_volume
    from lib.pacs import bound_waits, cached_series_folder
    from lib.pacs_corrections import KeptLabels, moved_record, refresh_moved_series, server_kept_labels

    pacs = start_orthanc(tmp_path / "orthanc")
    try:
        files = real_ct_series(tmp_path / "ct")
        pacs.upload_files(files)
        uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
        old_patient = str(pydicom.dcmread(files[0], stop_before_pixels=True).PatientID)
        volume = read_volume(tmp_path / "ct", fill_padding=False)  # a correction on the series' grid, in HU
        volume.array[:, :16, :16] += 20.0
        write_volume(volume, tmp_path / "final.nii.gz", output_dtype="float32")
        model_dir = copy_weights(tiny_weights, tmp_path / "model")
        server = start_server(pacs.dicomweb, model_dir, tmp_path / "work")
        try:
            answer = requests.get(f"{server.url}/datastore/image", params={"image": uid}, timeout=600)
            assert answer.status_code == 200, answer.text[:500]  # opened (downloaded, converted) before the move
            kept = Path(default_corrections_dir(pacs.dicomweb, str(model_dir)))
            # another process on the server's folders (as a batch infer or training subprocess)
            store = DICOMWebDatastore(DICOMwebClient(pacs.dicomweb), search_filter={"Modality": "CT"},
                                      cache_path=str(tmp_path / "work" / "dicomweb_cache"))
            bound_waits(store)
            server_kept_labels(store, kept)
            assert cached_series_folder(store, uid).is_dir()  # the server's download
            _send_again_under(pacs, files, "MOVED-PATIENT")
            inside, go_on = threading.Event(), threading.Event()
            record_move = pacs_corrections._record_move

            def held_in_the_lock(*args, **kwargs):  # the refresh holds its lock here: it has found the move
                inside.set()
                assert go_on.wait(600)
                return record_move(*args, **kwargs)

            refreshed: dict = {}
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(pacs_corrections, "_record_move", held_in_the_lock)
                refresh = threading.Thread(target=lambda: refreshed.update(said=refresh_moved_series(store, uid)))
                refresh.start()
                try:
                    assert inside.wait(600), "the refresh did not find the move"
                    saved: dict = {}

                    def save() -> None:
                        with open(tmp_path / "final.nii.gz", "rb") as handle:
                            saved["answer"] = requests.put(
                                f"{server.url}/datastore/label", params={"image": uid, "tag": "final"},
                                data={"params": "{}"}, files={"label": ("final.nii.gz", handle)}, timeout=600)

                    def judge() -> None:  # a verdict judging no result, confirming nothing
                        saved["verdict"] = requests.post(f"{server.url}/review/{uid}", json={
                            "verdict": "unreviewed", "reviewer": "dr_a"}, timeout=600)

                    saving, judging = threading.Thread(target=save), threading.Thread(target=judge)
                    saving.start()
                    judging.start()
                    lock_file = kept / ".locks" / ".refresh" / f"{uid}.lock"
                    deadline = time.monotonic() + 600
                    while saving.is_alive() and judging.is_alive() and not _waiting_on(lock_file, 2) and \
                            time.monotonic() < deadline:
                        time.sleep(0.2)
                    assert saving.is_alive() and judging.is_alive() and _waiting_on(lock_file, 2), \
                        ("the save and the verdict did not both wait for the refresh's lock",
                         *(getattr(saved.get(key), "text", None) for key in ("answer", "verdict")))
                finally:
                    go_on.set()
                    refresh.join(600)
            saving.join(600)
            judging.join(600)
            assert "removed, the series is downloaded again" in (refreshed.get("said") or ""), refreshed
            assert moved_record(store, uid)["from"]["patient_id"] == old_patient
            for answer in (saved["answer"], saved["verdict"]):
                assert answer.status_code == 409, answer.text[:1000]
                detail = answer.json()["detail"]
                assert f"the PACS moved series {uid} from patient_id {old_patient!r}" in detail, detail
            assert "nothing was saved" in saved["answer"].json()["detail"]
            assert KeptLabels(kept).info(uid, "final") is None
            assert not cached_series_folder(store, uid).exists()  # the save downloaded nothing under the lock

            # a download removed by a refresh (no move: a conversion older than its download) just before the save
            # took the lock: a 409 saying to open the series again (it was downloaded anew under the lock and saved)
            answer = requests.get(f"{server.url}/datastore/image", params={"image": uid}, timeout=600)
            assert answer.status_code == 200, answer.text[:500]  # the new patient's series, downloaded, converted
            conversion = cached_series_folder(store, uid).parent / f"{uid}.nii.gz"
            older = conversion.stat().st_mtime - 3600
            os.utime(conversion, (older, older))
            inside.clear()
            go_on.clear()
            remove_download = pacs_corrections._remove_cached_download

            def removing_in_the_lock(*args, **kwargs):
                inside.set()
                assert go_on.wait(600)
                return remove_download(*args, **kwargs)

            refreshed.clear()
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(pacs_corrections, "_remove_cached_download", removing_in_the_lock)
                refresh = threading.Thread(target=lambda: refreshed.update(said=refresh_moved_series(store, uid)))
                refresh.start()
                try:
                    assert inside.wait(600), "the refresh did not find the old conversion"
                    opened = {"patient_id": "MOVED-PATIENT",
                              "study_instance_uid": str(pydicom.dcmread(files[0]).StudyInstanceUID)}

                    def save_confirmed() -> None:
                        with open(tmp_path / "final.nii.gz", "rb") as handle:
                            saved["answer"] = requests.put(
                                f"{server.url}/datastore/label", params={"image": uid, "tag": "final"},
                                data={"params": json.dumps(opened)}, files={"label": ("final.nii.gz", handle)},
                                timeout=600)

                    saving = threading.Thread(target=save_confirmed)
                    saving.start()
                    deadline = time.monotonic() + 600
                    while saving.is_alive() and not _waiting_on(lock_file) and time.monotonic() < deadline:
                        time.sleep(0.2)
                    assert saving.is_alive() and _waiting_on(lock_file), \
                        ("the save did not wait for the refresh's lock", getattr(saved.get("answer"), "text", None))
                finally:
                    go_on.set()
                    refresh.join(600)
            saving.join(600)
            assert "made from an earlier download" in (refreshed.get("said") or ""), refreshed
            answer = saved["answer"]
            assert answer.status_code == 409, answer.text[:1000]
            detail = answer.json()["detail"]
            assert f"this server's download of series {uid}, which the correction was drawn on, is no longer in " \
                   "its cache" in detail and "nothing was saved (open the series again" in detail, detail
            assert KeptLabels(kept).info(uid, "final") is None
            assert not cached_series_folder(store, uid).exists()
        finally:
            stop_server(server)
    finally:
        stop_orthanc(pacs)


def test_a_series_sent_to_the_pacs_after_the_listing_is_found_and_queued(tmp_path, tiny_weights, monkeypatch):
    """MONAI Label keeps a DICOMweb datastore's series list for MONAI_LABEL_DICOMWEB_CACHE_EXPIRY (2 hours): a series
    that reached the PACS after the server had listed it (a scan of the day) was "no image in the datastore" (404)
    to infer and to a verdict, and absent from the review queue, for up to 2 hours. An id not in the list has the
    PACS asked again (at most every few seconds), and the queue lists the PACS afresh after a minute."""
    from fastapi import HTTPException
    from monailabel.config import settings

    from conftest import import_app_main
    from lib.activelearning import NextUnreviewed, has_image
    from lib.pacs import LISTING_MAX_AGE_S

    pacs = start_orthanc(tmp_path / "orthanc")
    try:
        first = upload_real_ct_series(pacs, tmp_path / "first")
        model = copy_weights(tiny_weights, tmp_path / "model")
        monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the app's result files: not in the machine's /tmp
        monkeypatch.setattr(settings, "MONAI_LABEL_DICOMWEB_CACHE_PATH", str(tmp_path / "dicomweb_cache"))
        (tmp_path / "app" / "bin").mkdir(parents=True)  # MONAI Label downloads dcmqi's converter otherwise
        (tmp_path / "app" / "bin" / "itkimage2segimage").write_text("")
        app = import_app_main().DenoisingApp(str(tmp_path / "app"), pacs.dicomweb,
                                             {"model_dir": str(model), "models": "nlm"})
        store = app.datastore()
        queue = NextUnreviewed(app.audit)
        assert queue({}, store)["id"] == first  # listed now
        later = upload_real_ct_series(pacs, tmp_path / "later")
        assert has_image(store, later)
        result = app.infer({"model": "nlm", "image": later})
        assert result["params"]["shape"] == [3, 512, 512], result
        with pytest.raises(HTTPException) as unknown:
            app.infer({"model": "nlm", "image": "1.2.3.4.5.6.7.8.9"})
        assert unknown.value.status_code == 404
        third = upload_real_ct_series(pacs, tmp_path / "third")
        import lib.pacs

        monkeypatch.setattr(lib.pacs, "LISTING_MAX_AGE_S", 0.0)  # the minute gone by
        assert queue({"exclude": [first, later]}, store)["id"] == third
        assert LISTING_MAX_AGE_S <= 120
    finally:
        stop_orthanc(pacs)


def test_the_review_queue_asked_for_one_modality_hands_out_that_modality_only(tmp_path, tiny_weights):
    """The queue's ``modality`` read the info's ``modality``, which a PACS series never has (MONAI Label keeps a
    downloaded series' DICOM attributes under their own names, ``Modality``; one not downloaded has no info): a
    request for MR handed out CT series. It reads the series' Modality now (the info's, else the PACS's listing):
    a PACS holding a CT and an MR series hands out the MR one alone to MR, the CT one alone to CT, before and after
    both are downloaded (denoised by id)."""
    import requests

    pacs = start_orthanc(tmp_path / "orthanc")
    try:
        uid = {"CT": upload_real_ct_series(pacs, tmp_path / "ct")}
        pacs.upload_files(real_mr_series(tmp_path / "mr"))
        uid["MR"] = str(pydicom.dcmread(next((tmp_path / "mr").iterdir())).SeriesInstanceUID)
        # the datastore lists both modalities (MONAI Label's default filter lists CT only)
        server = start_server(pacs.dicomweb, copy_weights(tiny_weights, tmp_path / "model"), tmp_path / "work",
                              env={"MONAI_LABEL_DICOMWEB_SEARCH_FILTER": "{}"})
        try:
            def handed_out(modality: str) -> list[str]:
                return queue_hand_outs(server.url, modality, most=5)

            answer = requests.get(f"{server.url}/datastore/", timeout=600)
            assert answer.status_code == 200 and answer.json()["total"] == 2, answer.text[:500]
            assert handed_out("mr") == [uid["MR"]] and handed_out("ct") == [uid["CT"]]
            for series in uid.values():  # downloaded into the server's cache: their info is MONAI Label's now
                answer = requests.post(f"{server.url}/infer/nlm", params={"image": series, "output": "json"},
                                       timeout=600)
                assert answer.status_code == 200, answer.text[:500]
            answer = requests.get(f"{server.url}/datastore/image/info", params={"image": uid["MR"]}, timeout=600)
            assert answer.json().get("Modality") == "MR", answer.text[:500]
            assert handed_out("mr") == [uid["MR"]] and handed_out("ct") == [uid["CT"]]
            assert sorted(handed_out("")) == sorted(uid.values())
            assert server.alive()
        finally:
            stop_server(server)
    finally:
        stop_orthanc(pacs)


def _counting_orthanc(tmp_path: Path):
    """A real Orthanc logging every HTTP request (:func:`orthanc.start_orthanc_logging_requests`); returns (pacs, a
    function answering the QIDO-RS searches so far)."""
    pacs, requests_log = start_orthanc_logging_requests(tmp_path)

    def qido_searches() -> list[str]:
        lines = requests_log.read_text().splitlines() if requests_log.exists() else []
        return [line for line in lines if line.startswith("GET /dicom-web/")
                and line.rstrip("/").endswith(("/studies", "/series", "/instances"))]

    return pacs, qido_searches


def test_the_review_queue_asks_the_pacs_the_size_of_an_oversized_series_once(tmp_path, tiny_weights, monkeypatch):
    """Each queue request passing a PACS series over the voxel limit asked the PACS its size again (QIDO-RS
    searches of its instances and of the series): a queue with many of them ahead made every request a burst of
    searches. The verdict is remembered per series and instance count: a second request asks the PACS nothing,
    and says the same; a series that grows (listed with another count) is asked again."""
    from monailabel.config import settings

    import lib.pacs
    from lib.activelearning.review import QUEUE_LEFT

    pacs, qido_searches = _counting_orthanc(tmp_path)
    try:
        big = real_ct_series(tmp_path / "big", slices=6)  # 6 x 512 x 512 = 1.57 M voxels, over the limit
        pacs.upload_files(big)
        big_uid = str(pydicom.dcmread(big[0]).SeriesInstanceUID)
        small_uid = upload_real_ct_series(pacs, tmp_path / "small")  # 0.79 M voxels, under it
        monkeypatch.setattr(settings, "MONAI_LABEL_DICOMWEB_CACHE_PATH", str(tmp_path / "dicomweb_cache"))
        _, store, queue = _nlm_app_and_queue(tmp_path, pacs.dicomweb, tiny_weights)

        def ask() -> tuple[list, list[str]]:
            """One queue request that passes the big series: (its too_large_to_review, the QIDO-RS searches)."""
            before = len(qido_searches())
            QUEUE_LEFT.set(None)
            assert queue({"exclude": [small_uid]}, store) is None
            return QUEUE_LEFT.get()["too_large_to_review"], qido_searches()[before:]

        too_large, searched = ask()
        assert [(s["id"], s["instances"], s["voxels"]) for s in too_large] == [(big_uid, 6, 1_572_864)], too_large
        assert any("/instances" in line for line in searched), searched  # its size asked (and counted here)
        again, searched = ask()
        assert again == too_large and searched == [], searched
        # the series grows: listed afresh (the minute gone by) with 7 instances, its size is asked again
        grown = real_ct_series(tmp_path / "more", slices=1)[0]
        ds = pydicom.dcmread(grown)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = pydicom.dcmread(big[0]).StudyInstanceUID, big_uid
        ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], float(ds.ImagePositionPatient[2]) + 30.0]
        ds.save_as(grown, write_like_original=False)
        pacs.upload(grown)
        monkeypatch.setattr(lib.pacs, "LISTING_MAX_AGE_S", 0.0)
        too_large, searched = ask()
        assert [(s["id"], s["instances"]) for s in too_large] == [(big_uid, 7)], too_large
        assert any("/instances" in line for line in searched), searched
        assert not [p for p in (tmp_path / "dicomweb_cache").rglob(f"{big_uid}*")]  # never downloaded
    finally:
        stop_orthanc(pacs)


def _size_searches(uid: str, searches: list[str]) -> list[str]:
    """The QIDO-RS searches of ``searches`` (:func:`orthanc.qido_searches`) that ask the size of the series ``uid``:
    its instances with their Rows (``lib.pacs.series_size``), first pages only (a search goes on with ``offset``
    until a page is empty)."""
    return [search for search in searches if f"SeriesInstanceUID={uid}" in search.split()
            and "00280010" in search and not any(arg.startswith("offset=") and arg != "offset=0"
                                                  for arg in search.split())]


def test_one_download_of_a_pacs_series_asks_its_size_once(tmp_path, tiny_weights):
    """Infer by id and the review queue ask a PACS series' size before its download (QIDO-RS, instance level: a
    series over the voxel limit is refused with nothing downloaded), and the download asked it again for the free
    space check of the cache's disk: two size searches of the PACS per series. The size asked is handed on to the
    download: one each. Counted in the real Orthanc's log (its DICOMweb plugin logs every search's arguments)."""
    import requests

    pacs = start_orthanc(tmp_path / "orthanc", log_options=QIDO_LOG)
    try:
        denoised = upload_real_ct_series(pacs, tmp_path / "denoised")
        handed_out = upload_real_ct_series(pacs, tmp_path / "handed_out")
        server = start_server(pacs.dicomweb, copy_weights(tiny_weights, tmp_path / "model"), tmp_path / "work",
                              conf={"max_voxels": 1_000_000})
        try:
            start = log_size(pacs)
            answer = requests.post(f"{server.url}/infer/nlm", params={"image": denoised, "output": "json"},
                                   timeout=600)
            assert answer.status_code == 200 and answer.json()["shape"] == [3, 512, 512], answer.text[:500]
            searches = qido_searches(pacs, start)
            assert len(_size_searches(denoised, searches)) == 1, searches
            start = log_size(pacs)
            answer = requests.post(f"{server.url}/activelearning/next_unreviewed", json={"exclude": [denoised]},
                                   timeout=600)
            assert answer.status_code == 200 and answer.json()["id"] == handed_out, answer.text[:500]
            searches = qido_searches(pacs, start)
            assert len(_size_searches(handed_out, searches)) == 1, searches
            assert [p for p in (tmp_path / "work" / "dicomweb_cache").rglob(handed_out) if p.is_dir()]  # downloaded
        finally:
            stop_server(server)
    finally:
        stop_orthanc(pacs)


def without_pixels(slice_file: Path, path: Path) -> Path:
    """A copy of the real DICOM slice ``slice_file`` in its series, as a new instance without an image (no Rows,
    Columns nor pixel data: a non-image entry of the series, one key image note or dose report could be), at
    ``path``."""
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(slice_file)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    for keyword in ("PixelData", "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
                    "SamplesPerPixel", "PhotometricInterpretation"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.save_as(path, write_like_original=False)
    return path


def new_instance(slice_file: Path, pixels: np.ndarray, path: Path, **attributes) -> Path:
    """A copy of the real DICOM slice ``slice_file`` as the one instance of a new series, its pixel data the bytes
    of ``pixels`` and its header given ``attributes`` (NumberOfFrames, BitsAllocated, ...), at ``path``."""
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(slice_file)
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, write_like_original=False)
    return path


def multi_frame(slice_file: Path, path: Path, frames: int) -> Path:
    """The real DICOM slice ``slice_file`` as one instance of ``frames`` frames (its pixels in each), in a new
    series, at ``path``."""
    pixels = pydicom.dcmread(slice_file).pixel_array
    return new_instance(slice_file, np.repeat(pixels[None], frames, axis=0), path, NumberOfFrames=frames)


def bit_packed(slice_file: Path, path: Path) -> Path:
    """The real DICOM slice ``slice_file``'s pixels over their mean as a mask of 1 bit a voxel (BitsAllocated 1,
    packed 8 voxels a byte, as a DICOM SEG's frames are), in a new series, at ``path``."""
    from pydicom.pixel_data_handlers.numpy_handler import pack_bits

    pixels = pydicom.dcmread(slice_file).pixel_array
    mask = pack_bits((pixels > pixels.mean()).astype(np.uint8))
    return new_instance(slice_file, np.frombuffer(mask, np.uint8), path, BitsAllocated=1, BitsStored=1, HighBit=0,
                        PixelRepresentation=0, PhotometricInterpretation="MONOCHROME2")


def test_a_download_frame_by_frame_is_bounded_by_the_voxel_limit(tmp_path, tiny_weights):
    """With ``MONAI_LABEL_DICOMWEB_FETCH_BY_FRAME`` the app left every download to MONAI Label's own, frame by frame,
    without a limit: a route other than infer by id and the review queue (which ask the series' size first), here
    the image download, fetched a series over ``max_voxels`` whole into the cache. MONAI Label's frame-by-frame
    download now runs bounded: the series' metadata is checked before any frame is fetched. On a real server and
    Orthanc (its request log): the 6-slice series (1.57 M voxels, over 1,000,000) is a 413 naming its size and the
    limit, no frame of it fetched, nothing of it in the cache.

    No frame-by-frame download ever succeeded: MONAI Label asks frames with dicomweb-client's default ``Accept:
    multipart/related; type="*/*"``, which Orthanc's DICOMweb plugin answers 400 ("DICOMweb RetrieveFrames: Transfer
    syntax "" is incompatible with media type "*/*""). They are asked uncompressed now (``application/octet-stream``,
    Explicit VR Little Endian, what MONAI Label writes them as): the 3-slice series (3 images and an instance without
    pixel data) is served (200, its 3 voxel planes those of the PACS's instances), has the frames of its 3 images
    asked, not of the instance without pixel data (which has none), and its cache holds each of the 3 instances,
    checked one by one: its header's UIDs and position, its pixel data byte for byte the PACS's. MONAI Label writes
    each file as Implicit VR Little Endian without preamble or file meta, whose pixel data the app's reader refused
    ("unknown transfer syntax"): infer by id of the series was a 422. Each file now has its file meta (that transfer
    syntax, its SOP Class and Instance UIDs) and infer by id denoises it (200); a file left in the cache without one
    (an earlier version's download) is given it when the series is asked again (200, the file as downloaded now). A
    series whose
    frames the PACS refuses (403, a Lua filter) was an empty folder left in the cache and converted (a 500 at every
    request for the series), then a bare 500; it is a 502 naming the series and how many of its image instances are
    missing (infer by id too), and leaves nothing. MONAI Label's download asks frame 1 of each instance only: a
    series of one 3-frame instance (786,432 voxels, under the limit) was a 502 blaming the PACS; it is a 501 naming
    the setting to turn off, before any frame is asked (infer by id too)."""
    import struct

    import requests
    import SimpleITK as sitk
    from pydicom.uid import ImplicitVRLittleEndian

    big, small = real_ct_series(tmp_path / "big", slices=6), distinct_slices(real_ct_series(tmp_path / "small"))
    refused = real_ct_series(tmp_path / "refused", slices=3)
    big_uid, small_uid, refused_uid = (str(pydicom.dcmread(files[0]).SeriesInstanceUID)
                                       for files in (big, small, refused))
    pacs, requests_log = start_orthanc_logging_requests(tmp_path, refuse_frames_of=[refused_uid])
    try:
        frames3 = multi_frame(small[0], tmp_path / "frames3.dcm", 3)
        pacs.upload_files(big + small + refused + [without_pixels(small[0], tmp_path / "no_image.dcm"), frames3])
        multi_uid = str(pydicom.dcmread(frames3).SeriesInstanceUID)
        cache = tmp_path / "work" / "dicomweb_cache"
        server = start_server(pacs.dicomweb, copy_weights(tiny_weights, tmp_path / "model"), tmp_path / "work",
                              conf={"max_voxels": 1_000_000}, env={"MONAI_LABEL_DICOMWEB_FETCH_BY_FRAME": "true"})

        def frames(uid: str) -> list[str]:  # WADO-RS frame retrievals of the series uid
            return [line for line in requests_log.read_text().splitlines()
                    if f"/series/{uid}/" in line and "/frames/" in line]

        try:
            answer = requests.get(f"{server.url}/datastore/image", params={"image": big_uid}, timeout=600)
            assert answer.status_code == 413, (answer.status_code, answer.text[:500])
            assert answer.json()["detail"] == (f"series {big_uid} is too large: its 6 instances hold 1,572,864 voxels, "
                                               "over the limit of 1,000,000; nothing of it was downloaded (raise the "
                                               "limit with --conf max_voxels on the server)"), answer.text
            assert frames(big_uid) == []
            assert not [p for p in cache.rglob(f"*{big_uid}*")], sorted(map(str, cache.rglob("*")))

            answer = requests.get(f"{server.url}/datastore/image", params={"image": small_uid}, timeout=600)
            assert answer.status_code == 200, (answer.status_code, answer.text[:500])
            assert len(frames(small_uid)) == 3, frames(small_uid)  # its images: asked frame by frame
            served = tmp_path / "served.nii.gz"
            served.write_bytes(answer.content)
            originals = {str(ds.SOPInstanceUID): ds for ds in map(pydicom.dcmread, small)}
            planes = sitk.GetArrayFromImage(sitk.ReadImage(str(served)))
            stored = sorted((float(ds.ImagePositionPatient[2]), ds.pixel_array * float(ds.RescaleSlope)
                             + float(ds.RescaleIntercept)) for ds in originals.values())
            assert planes.shape == (3, 512, 512) and all(
                np.array_equal(plane, hu) for plane, (_, hu) in zip(planes, stored)), planes.shape
            folders = [p for p in cache.rglob(small_uid) if p.is_dir()]
            assert len(folders) == 1, sorted(map(str, cache.rglob("*")))
            written = sorted(folders[0].iterdir())
            assert sorted(p.name for p in written) == sorted(f"{uid}.dcm" for uid in originals), written
            for path in written:  # instance by instance: the PACS's header and pixel data
                ds, original = pydicom.dcmread(path, force=True), originals[path.stem]
                assert (ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.ImagePositionPatient,
                        ds.Rows, ds.Columns) == (original.SOPInstanceUID, original.SeriesInstanceUID,
                                                 original.StudyInstanceUID, original.ImagePositionPatient,
                                                 original.Rows, original.Columns), path
                assert ds.PixelData == original.PixelData, path
                meta = ds.file_meta  # MONAI Label writes no preamble nor file meta: the reader decoded no pixel
                assert path.read_bytes()[128:132] == b"DICM" and (
                    meta.TransferSyntaxUID, meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID) == (
                    ImplicitVRLittleEndian, original.SOPClassUID, original.SOPInstanceUID), (path, meta)
            answer = requests.post(f"{server.url}/infer/nlm", params={"image": small_uid, "output": "json"},
                                   timeout=600)
            assert answer.status_code == 200 and answer.json()["shape"] == [3, 512, 512], answer.text[:500]
            # a file an earlier version left in the cache as MONAI Label wrote it (the data set alone) is repaired
            whole = written[0].read_bytes()
            meta_length = struct.unpack("<I", whole[140:144])[0]  # (0002,0000) UL after the preamble and DICM
            written[0].write_bytes(whole[144 + meta_length:])
            answer = requests.post(f"{server.url}/infer/nlm", params={"image": small_uid, "output": "json"},
                                   timeout=600)
            assert answer.status_code == 200 and answer.json()["shape"] == [3, 512, 512], answer.text[:500]
            assert written[0].read_bytes() == whole and sorted(folders[0].iterdir()) == written

            answer = requests.get(f"{server.url}/datastore/image", params={"image": refused_uid}, timeout=600)
            assert answer.status_code == 502, (answer.status_code, answer.text[:500])
            assert answer.json()["detail"] == (f"the PACS did not deliver series {refused_uid}: 3 of its 3 image "
                                               "instances are missing or cut short in its frame-by-frame download "
                                               "(MONAI_LABEL_DICOMWEB_FETCH_BY_FRAME); nothing of it was kept")
            assert len(frames(refused_uid)) == 3, frames(refused_uid)
            assert not [p for p in cache.rglob(f"*{refused_uid}*")], sorted(map(str, cache.rglob("*")))
            answer = requests.post(f"{server.url}/infer/nlm", params={"image": refused_uid, "output": "json"},
                                   timeout=600)  # infer by id maps it itself
            assert answer.status_code == 502, (answer.status_code, answer.text[:500])
            assert answer.json()["detail"].startswith(f"not denoised: the PACS did not deliver series {refused_uid}: "
                                                      "3 of its 3 image instances"), answer.text
            assert not [p for p in cache.rglob(f"*{refused_uid}*")], sorted(map(str, cache.rglob("*")))

            not_by_frame = (f"series {multi_uid} has multi-frame instances (1 of its 1 image instances, up to 3 "
                            "frames each), which MONAI_LABEL_DICOMWEB_FETCH_BY_FRAME downloads only the first frame "
                            "of; nothing of it was downloaded: turn that setting off on the server")
            answer = requests.get(f"{server.url}/datastore/image", params={"image": multi_uid}, timeout=600)
            assert answer.status_code == 501, (answer.status_code, answer.text[:500])
            assert answer.json()["detail"] == not_by_frame, answer.text
            answer = requests.post(f"{server.url}/infer/nlm", params={"image": multi_uid, "output": "json"},
                                   timeout=600)
            assert answer.status_code == 501, (answer.status_code, answer.text[:500])
            assert answer.json()["detail"] == f"not denoised: {not_by_frame}", answer.text
            assert frames(multi_uid) == []  # refused from its metadata
            assert not [p for p in cache.rglob(f"*{multi_uid}*")], sorted(map(str, cache.rglob("*")))
            assert server.alive()
        finally:
            stop_server(server)
    finally:
        stop_orthanc(pacs)


def distinct_slices(paths: list[Path]) -> list[Path]:
    """The real DICOM slices ``paths`` rewritten in place, each with its own pixels (the k-th one's values shifted by
    k: copies of one slice would not tell one instance from another); returns them."""
    for k, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        ds.PixelData = (ds.pixel_array + k).astype(ds.pixel_array.dtype).tobytes()
        ds.save_as(path, write_like_original=False)
    return paths


def with_series_uid(paths: list[Path], uid: str) -> list[Path]:
    """The DICOM files ``paths`` rewritten in place as instances of the series ``uid``; returns them."""
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = uid
        ds.save_as(path, write_like_original=False)
    return paths


def test_the_review_queue_skips_a_series_it_cannot_download_frame_by_frame(tmp_path, tiny_weights):
    """The review queue skipped (and listed) a PACS series over the voxel limit, but not one the server cannot
    download: with ``MONAI_LABEL_DICOMWEB_FETCH_BY_FRAME`` a series of multi-frame instances (501) or one the PACS
    does not deliver whole (502; this Orthanc refuses its frames, a Lua filter) failed every hand-out of the queue
    while it came first. On a real server and Orthanc (its request log), by id: the multi-frame series, the
    undelivered one, then one the PACS delivers. The queue now skips the first two, with a warning each, lists them
    in ``not_downloaded`` (id and the route's detail) and hands out the third, downloaded frame by frame; with it
    excluded, the answer lists them with no id, and the Slicer module's client and workflow state name them (not an
    empty queue). Nothing of either is kept in the cache. Each hand-out tried both downloads again (the metadata of
    both, the frames of the undelivered one): their failures are remembered, and the second hand-out asks the PACS
    nothing of them (nothing at all but, at most, its series listing)."""
    import requests

    prefix = "1.2.826.0.1.3680043.8.498.4242"  # ids in the queue's order
    multi_uid, undelivered_uid, delivered_uid = f"{prefix}1", f"{prefix}2", f"{prefix}3"
    pacs, requests_log = start_orthanc_logging_requests(tmp_path, refuse_frames_of=[undelivered_uid])
    try:
        delivered = with_series_uid(real_ct_series(tmp_path / "delivered", slices=3), delivered_uid)
        undelivered = with_series_uid(real_ct_series(tmp_path / "undelivered", slices=3), undelivered_uid)
        frames3 = with_series_uid([multi_frame(delivered[0], tmp_path / "frames3.dcm", 3)], multi_uid)
        pacs.upload_files(delivered + undelivered + frames3)
        work, model = tmp_path / "work", copy_weights(tiny_weights, tmp_path / "model")
        cache = work / "dicomweb_cache"

        def requests_since(count: int) -> list[str]:
            return requests_log.read_text().splitlines()[count:]

        server = start_server(pacs.dicomweb, model, work, conf={"max_voxels": 1_000_000},
                              env={"MONAI_LABEL_DICOMWEB_FETCH_BY_FRAME": "true"})
        try:
            skipped = [
                {"id": multi_uid, "detail": (
                    f"series {multi_uid} has multi-frame instances (1 of its 1 image instances, up to 3 frames each), "
                    "which MONAI_LABEL_DICOMWEB_FETCH_BY_FRAME downloads only the first frame of; nothing of it was "
                    "downloaded: turn that setting off on the server")},
                {"id": undelivered_uid, "detail": (
                    f"the PACS did not deliver series {undelivered_uid}: 3 of its 3 image instances are missing or "
                    "cut short in its frame-by-frame download (MONAI_LABEL_DICOMWEB_FETCH_BY_FRAME); nothing of it "
                    "was kept")}]
            before = len(requests_since(0))
            answer = requests.post(f"{server.url}/activelearning/next_unreviewed", json={}, timeout=600)
            assert answer.status_code == 200, (answer.status_code, answer.text[:500])
            body = answer.json()
            assert (body.get("id"), body["remaining_unreviewed"], body.get("not_downloaded"),
                    body.get("too_large_to_review")) == (delivered_uid, 3, skipped, None), answer.text
            asked = requests_since(before)
            for uid in (multi_uid, undelivered_uid, delivered_uid):  # each one's metadata, then the frames
                assert any(f"/series/{uid}/metadata" in line for line in asked), (uid, asked)
            assert len([line for line in asked if f"/series/{undelivered_uid}/" in line and "/frames/" in line]) == 3
            assert len([line for line in asked if f"/series/{delivered_uid}/" in line and "/frames/" in line]) == 3
            folders = [p for p in cache.rglob(delivered_uid) if p.is_dir()]  # downloaded frame by frame
            assert len(folders) == 1 and len(list(folders[0].iterdir())) == 3, sorted(map(str, cache.rglob("*")))
            before = len(requests_since(0))
            answer = requests.post(f"{server.url}/activelearning/next_unreviewed", json={"exclude": [delivered_uid]},
                                   timeout=600)
            assert answer.status_code == 200, (answer.status_code, answer.text[:500])
            assert answer.json() == {"remaining_unreviewed": 3, "not_downloaded": skipped}, answer.text
            asked = requests_since(before)
            assert [line for line in asked if line != "GET /dicom-web/series"] == [], asked  # at most its listing
            # the Slicer module's client and workflow state: not an empty queue, the reviewer is told of both
            client = DenoiseServerClient(server.url)
            assert client.next_study(exclude=[delivered_uid]) == answer.json()
            assert ReviewSession.queue_answer(client.next_study(exclude=[delivered_uid])) is None
            described = ReviewSession.describe_skipped(client.next_study(exclude=[delivered_uid]))
            assert described.startswith(f"2 unreviewed series the server could not download, skipped: {multi_uid} "
                                        f"(series {multi_uid} has multi-frame"), described
            assert f", {undelivered_uid} (the PACS did not deliver" in described, described
            assert client.next_study()["id"] == delivered_uid
            log = server.log_tail(20000)
            for uid in (multi_uid, undelivered_uid):
                assert f"review queue: series {uid} skipped" in log
                assert not [p for p in cache.rglob(f"*{uid}*")], sorted(map(str, cache.rglob("*")))
            assert server.alive()
        finally:
            stop_server(server)
    finally:
        stop_orthanc(pacs)


def test_a_failed_frame_by_frame_download_is_tried_again_after_a_while_or_once_the_series_changes(
        tmp_path, tiny_weights, monkeypatch):
    """The review queue remembers a series whose download failed (the hand-out after asks the PACS nothing of it:
    :func:`test_the_review_queue_skips_a_series_it_cannot_download_frame_by_frame`), for
    ``NOT_DOWNLOADED_RETRY_S`` and while the PACS lists it with the same instance count: a PACS that recovered, or
    a series sent again whole, is not skipped for ever. In-process queue and app
    (``MONAI_LABEL_DICOMWEB_FETCH_BY_FRAME``) on a real Orthanc refusing the frames of a 1-slice series (its request
    log): asked again, it is listed from
    memory (no request naming it), while an explicit request for it (infer by id's download) tries it again (a
    clinician asking again expects a new try, and is told the PACS's failure again: 502); once the time is up, its
    download is tried again by the queue (its metadata and frame asked);
    remembered anew; once the series has a second instance (listed afresh), tried again, the detail naming 2
    instances."""
    from monailabel.config import settings

    import lib.activelearning.review as review
    import lib.pacs
    from lib.activelearning.review import QUEUE_LEFT

    files = real_ct_series(tmp_path / "series", slices=2)
    uid = str(pydicom.dcmread(files[0]).SeriesInstanceUID)
    pacs, requests_log = start_orthanc_logging_requests(tmp_path, refuse_frames_of=[uid])
    try:
        pacs.upload(files[0])
        monkeypatch.setattr(settings, "MONAI_LABEL_DICOMWEB_CACHE_PATH", str(tmp_path / "dicomweb_cache"))
        monkeypatch.setattr(settings, "MONAI_LABEL_DICOMWEB_FETCH_BY_FRAME", True)
        _, store, queue = _nlm_app_and_queue(tmp_path, pacs.dicomweb, tiny_weights)

        def ask() -> tuple[list, list[str]]:
            """One queue request: (its not_downloaded, the requests naming the series)."""
            before = len(requests_log.read_text().splitlines())
            QUEUE_LEFT.set(None)
            assert queue({}, store) is None
            return QUEUE_LEFT.get()["not_downloaded"], [line for line in requests_log.read_text().splitlines()[before:]
                                                        if f"/series/{uid}/" in line]

        def not_delivered(count: int) -> list[dict]:
            return [{"id": uid, "detail": f"the PACS did not deliver series {uid}: {count} of its {count} image "
                                          "instances are missing or cut short in its frame-by-frame download "
                                          "(MONAI_LABEL_DICOMWEB_FETCH_BY_FRAME); nothing of it was kept"}]

        skipped, asked = ask()
        assert skipped == not_delivered(1) and any("/frames/" in line for line in asked), asked
        assert ask() == (not_delivered(1), [])  # remembered
        # an explicit request for it (infer by id: a clinician asking again) tries the download again, whatever the
        # queue remembers, and leaves the queue's memory as it was
        before = len(requests_log.read_text().splitlines())
        with pytest.raises(lib.pacs.SeriesNotDelivered):
            lib.pacs.series_folder(store, uid, 10**9)
        assert any(f"/series/{uid}/" in line and "/frames/" in line
                   for line in requests_log.read_text().splitlines()[before:])
        assert ask() == (not_delivered(1), [])
        monkeypatch.setattr(review, "NOT_DOWNLOADED_RETRY_S", 0.0)
        skipped, asked = ask()  # the time is up: tried again
        assert skipped == not_delivered(1) and any("/frames/" in line for line in asked), asked
        monkeypatch.setattr(review, "NOT_DOWNLOADED_RETRY_S", 600.0)
        assert ask() == (not_delivered(1), [])
        pacs.upload(files[1])  # the series changes: listed afresh with 2 instances, tried again
        monkeypatch.setattr(lib.pacs, "LISTING_MAX_AGE_S", 0.0)
        skipped, asked = ask()
        assert skipped == not_delivered(2) and len([line for line in asked if "/frames/" in line]) == 2, asked
        assert not [p for p in (tmp_path / "dicomweb_cache").rglob(f"*{uid}*")]  # nothing kept
    finally:
        stop_orthanc(pacs)


def test_a_frame_by_frame_download_is_checked_instance_by_instance(tmp_path):
    """MONAI Label's frame-by-frame download was judged whole when it wrote as many files as the series' metadata
    lists: a file cut short (a full disk: that mode has no per-instance disk check) counted, and the cut series was
    kept in the cache as downloaded; a series with an instance without pixel data (no frame to fetch) never was.
    :func:`lib.pacs.check_by_frame` on the real WADO-RS metadata of Orthanc (3 CT images and one instance without
    pixel data) and real files in a folder: the 3 images written whole, named by their SOP Instance UIDs, pass
    (the non-image entry not needed); one cut short, one missing, or one under another name, do not. An instance of
    1 bit a voxel (BitsAllocated 1, a DICOM SEG's packing: 32,768 bytes for 512 x 512) was expected to hold a byte a
    voxel, and always looked cut short: whole it passes, cut it does not."""
    from dicomweb_client.api import DICOMwebClient

    from lib.pacs import SeriesNotDelivered, check_by_frame

    pacs = start_orthanc(tmp_path / "orthanc")
    try:
        files = real_ct_series(tmp_path / "series", slices=3)
        mask = bit_packed(files[0], tmp_path / "mask.dcm")
        pacs.upload_files(files + [without_pixels(files[0], tmp_path / "no_image.dcm"), mask])
        first, packed = pydicom.dcmread(files[0]), pydicom.dcmread(mask)
        client = DICOMwebClient(pacs.dicomweb)
        metadata = client.retrieve_series_metadata(str(first.StudyInstanceUID), str(first.SeriesInstanceUID))
        mask_metadata = client.retrieve_series_metadata(str(packed.StudyInstanceUID), str(packed.SeriesInstanceUID))
    finally:
        stop_orthanc(pacs)
    assert len(metadata) == 4
    series = str(first.SeriesInstanceUID)
    written = tmp_path / "written"
    written.mkdir()
    names = [f"{pydicom.dcmread(path).SOPInstanceUID}.dcm" for path in files]
    for path, name in zip(files, names):
        (written / name).write_bytes(path.read_bytes())
    assert check_by_frame(written, metadata, series) == 3
    whole = (written / names[1]).read_bytes()

    def refused() -> str:
        with pytest.raises(SeriesNotDelivered) as error:
            check_by_frame(written, metadata, series)
        return str(error.value)

    (written / names[1]).write_bytes(whole[:-1000])  # cut in its pixel data: the file still parses
    assert refused() == (f"the PACS did not deliver series {series}: 1 of its 3 image instances are missing or cut "
                         "short in its frame-by-frame download (MONAI_LABEL_DICOMWEB_FETCH_BY_FRAME); nothing of it "
                         "was kept")
    (written / names[1]).write_bytes(whole[:300])  # cut in its header
    assert "1 of its 3 image instances" in refused()
    (written / names[1]).rename(written / "other.dcm")  # as many files as images, one of them not listed
    (written / "other.dcm").write_bytes(whole)
    assert "1 of its 3 image instances" in refused()
    (written / "other.dcm").unlink()
    assert "1 of its 3 image instances" in refused()
    (written / names[1]).write_bytes(whole)
    assert check_by_frame(written, metadata, series) == 3

    assert len(packed.PixelData) == 512 * 512 // 8 and mask_metadata[0]["00280100"]["Value"] == [1]
    mask_folder = tmp_path / "mask_written"
    mask_folder.mkdir()
    (mask_folder / f"{packed.SOPInstanceUID}.dcm").write_bytes(mask.read_bytes())
    assert check_by_frame(mask_folder, mask_metadata, str(packed.SeriesInstanceUID)) == 1
    (mask_folder / f"{packed.SOPInstanceUID}.dcm").write_bytes(mask.read_bytes()[:-100])
    with pytest.raises(SeriesNotDelivered, match="1 of its 1 image instances are missing or cut short"):
        check_by_frame(mask_folder, mask_metadata, str(packed.SeriesInstanceUID))


def test_disk_full_is_no_space_or_a_spent_quota_wrapped_or_not():
    """:func:`lib.pacs.disk_full` (the downloads' and the dataset ZIP's 507) took ENOSPC only: a disk quota spent
    (EDQUOT) is the same for the writer. A real ENOSPC (a write to /dev/full), bare and raised from as pydicom's
    save_as does (a new OSError without errno), and EDQUOT bare and wrapped, are disk full; another OSError is
    not."""
    import errno
    import os

    from lib.pacs import disk_full

    def wrapped(error: OSError) -> OSError:
        try:
            try:
                raise error
            except OSError as cause:
                raise OSError("writing the element (7FE0,0010) failed") from cause
        except OSError as outer:
            return outer

    with pytest.raises(OSError) as full:
        with open("/dev/full", "wb", buffering=0) as handle:
            handle.write(b"x")
    quota = OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
    assert full.value.errno == errno.ENOSPC and disk_full(full.value) and disk_full(wrapped(full.value))
    assert disk_full(quota) and disk_full(wrapped(quota))
    assert not disk_full(OSError(errno.EACCES, os.strerror(errno.EACCES)))
    assert not disk_full(wrapped(OSError(errno.EIO, os.strerror(errno.EIO))))


def test_a_frame_by_frame_check_reads_no_pixel(tmp_path):
    """:func:`lib.pacs.check_by_frame` read each instance whole, pixels and all: a large multi-frame file took its
    whole size in memory. On a real 96-frame CT instance (48 MiB of pixel data) and its DICOM JSON, the check's
    peak memory (tracemalloc) stays under a sixteenth of its pixel data, whole (passes) and cut by one byte
    (refused)."""
    import tracemalloc

    import data_store

    from lib.pacs import SeriesNotDelivered, check_by_frame

    folder = tmp_path / "written"
    folder.mkdir()
    path = multi_frame(Path(data_store.__file__).parent / "data" / "693_UNCR.dcm", tmp_path / "large.dcm", 96)
    header = pydicom.dcmread(path, stop_before_pixels=True)
    listed = [header.to_json_dict()]
    pixel_bytes = 96 * 512 * 512 * 2
    whole = path.read_bytes()
    target = folder / f"{header.SOPInstanceUID}.dcm"
    target.write_bytes(whole)
    del whole

    def peak_of_check() -> tuple[int | Exception, int]:
        tracemalloc.start()
        try:
            try:
                outcome: int | Exception = check_by_frame(folder, listed, str(header.SeriesInstanceUID))
            except SeriesNotDelivered as error:
                outcome = error
            return outcome, tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    outcome, peak = peak_of_check()
    assert outcome == 1 and peak < pixel_bytes / 16, (outcome, peak, pixel_bytes)
    with open(target, "r+b") as handle:
        handle.truncate(target.stat().st_size - 1)
    outcome, peak = peak_of_check()
    assert isinstance(outcome, SeriesNotDelivered) and peak < pixel_bytes / 16, (outcome, peak, pixel_bytes)


def seg_of(series: list[Path], path: Path) -> Path:
    """A DICOM SEG instance (Segmentation Storage, Modality SEG) of the real series ``series`` in its study: one
    1-bit frame a slice (its pixels over their mean, bit-packed as a SEG's frames are), referencing the series
    (ReferencedSeriesSequence, which MONAI Label reads to pair a PACS's labels with their images), at ``path``."""
    from pydicom.pixel_data_handlers.numpy_handler import pack_bits
    from pydicom.uid import generate_uid

    slices = [pydicom.dcmread(file) for file in series]
    ds = slices[0].copy()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.66.4"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID, ds.Modality, ds.SeriesNumber = generate_uid(), "SEG", 99
    ds.NumberOfFrames, ds.BitsAllocated, ds.BitsStored, ds.HighBit = len(slices), 1, 1, 0
    ds.PixelRepresentation, ds.PhotometricInterpretation = 0, "MONOCHROME2"
    for keyword in ("RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth"):
        if keyword in ds:
            delattr(ds, keyword)
    referenced = pydicom.Dataset()
    referenced.SeriesInstanceUID = slices[0].SeriesInstanceUID
    referenced.ReferencedInstanceSequence = []
    for slice_ in slices:
        item = pydicom.Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = slice_.SOPClassUID, slice_.SOPInstanceUID
        referenced.ReferencedInstanceSequence.append(item)
    ds.ReferencedSeriesSequence = [referenced]
    masks = np.stack([slice_.pixel_array > slice_.pixel_array.mean() for slice_ in slices]).astype(np.uint8)
    ds.PixelData = pack_bits(masks)
    ds.save_as(path, write_like_original=False)
    return path


def pydicom_seg_of(series: list[Path], mask: np.ndarray, path: Path) -> Path:
    """A DICOM SEG of the real series ``series`` as another tool saves one: written by pydicom_seg (MONAI Label's
    own SEG writer and reader), one segment (label value 1) where ``mask`` (z, y, x on the series' grid) is set, at
    ``path``."""
    import pydicom_seg
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(file) for file in series])
    label = sitk.GetImageFromArray(mask.astype(np.uint8))
    label.CopyInformation(reader.Execute())
    code = {"CodeValue": "T-D0050", "CodingSchemeDesignator": "SRT", "CodeMeaning": "Tissue"}
    template = pydicom_seg.template.from_dcmqi_metainfo({
        "ContentCreatorName": "another tool", "SeriesDescription": "segmentation", "SeriesNumber": "300",
        "InstanceNumber": "1", "ContentLabel": "SEG", "ContentDescription": "segmentation", "BodyPartExamined": "",
        "ClinicalTrialSeriesID": "1", "ClinicalTrialTimePointID": "1", "ClinicalTrialCoordinatingCenterName": "x",
        "segmentAttributes": [[{"labelID": 1, "SegmentDescription": "lesion", "SegmentLabel": "lesion",
                                "SegmentAlgorithmType": "MANUAL", "SegmentedPropertyCategoryCodeSequence": code,
                                "SegmentedPropertyTypeCodeSequence": code}]]})
    pydicom_seg.MultiClassWriter(template=template).write(label, [pydicom.dcmread(f) for f in series]).save_as(path)
    return path


def test_final_labels_and_the_training_list_of_a_pacs_are_bounded_before_any_retrieval(tmp_path, tiny_weights):
    """``GET /datastore/label?tag=final`` on a DICOMweb datastore names a series of the PACS, a DICOM SEG. On a real
    server and Orthanc (its request log) holding a 6-slice CT series (1.57 M voxels, over ``max_voxels`` 1,000,000)
    and a SEG of it (6 frames, as many voxels):

    * the CT series asked as a label (the image's id, as the Slicer client asks a correction) was downloaded into
      the label cache, left there, and answered a bare 500 (MONAI Label's SEG reader: "not a DICOM-SEG"); it is a
      404 saying the PACS holds it as a CT series, no SEG, and a SeriesInstanceUID the PACS does not hold a 404 too;
    * ``HEAD`` answers as ``GET``, without a body (the stock ``HEAD`` route took the label as ``image`` only: 422);
    * the SEG (over the limit) was retrieved up to the limit, then stopped (413); it is a 413 before any retrieval,
      naming the series and its size, for ``GET`` and ``HEAD``;
    * the training list (``GET /datastore/?output=train``: MONAI Label downloaded every series a SEG labels, and
      the SEG) and a fine-tune request (``POST /train/{model}``, whose check read the labelled images) retrieved
      the CT series up to the limit, then a 413 before any retrieval, for series that are no training data here
      (a SEG is no correction); they download no series (an empty list; "no corrected studies").

    No retrieval of either series reaches Orthanc, nothing of them lands in the cache, and nothing of them is
    recorded as sent. A SEG within the limit, written by pydicom_seg for a 3-slice CT series, is answered as its label
    volume (a .nii.gz on the series' grid, one value a segment), for ``GET`` and ``HEAD``, each an entry: MONAI
    Label's conversion was a 500 (ImageNotFoundException: the route names no image) and left a ``tmp*.seg.nrrd`` in
    the server's temp folder on every read. It is converted once (the SEG retrieved once, its conversion not
    rewritten) and nothing is left in the temp folder. A SEG pydicom_seg cannot read (no plane positions) is a 422
    saying so (it was a 500). Each read searches the SEG's series once (QIDO-RS: the route's check, the SEG's
    modality and its identity were three searches). The SEG replaced in the PACS under its SeriesInstanceUID
    (deleted, another SEG stored) is downloaded and converted again: its first conversion was served for ever.

    Nothing is saved as the label of another series: the SEG's conversion was also saved as the label of the
    (downloaded) image it references, ``labels/final/<image>.nii.gz``, which stayed that image's label when the
    PACS's SEG was replaced, and a SEG of one patient's study referencing another patient's series made a label of
    that patient's image; such a SEG is a 409 naming both, not converted. A 3-frame SEG within the limit whose
    declared slice spacing (0.05 mm, frames 5 mm apart) makes pydicom_seg decode it to 512 x 512 x 201 voxels was
    converted (52.7 M voxels past the 1 M limit); it is a 413 naming the limit, not converted. The conversion
    temps a killed server left in the label cache (``.converting-*.nii.gz``) are removed at start-up once untouched
    for ``FILE_META_TEMP_STALE_S``; a younger one (being written) is kept."""
    import os
    import time

    import requests
    import SimpleITK as sitk

    from lib.audit import AuditLog
    from lib.pacs import FILE_META_TEMP_STALE_S
    from pydicom.uid import generate_uid

    pacs, requests_log = start_orthanc_logging_requests(tmp_path, log_options=QIDO_LOG)
    try:
        big = real_ct_series(tmp_path / "big", slices=6)
        seg = seg_of(big, tmp_path / "seg.dcm")
        small = real_ct_series(tmp_path / "small")
        mask = np.zeros((3, 512, 512), np.uint8)
        for k in range(3):  # a different region each slice: the slices' order and the axes are checked
            mask[k, 100 + 20 * k:300, 150:250 + 30 * k] = 1
        small_seg = pydicom_seg_of(small, mask, tmp_path / "small_seg.dcm")
        image_grid = sitk.ImageSeriesReader()
        image_grid.SetFileNames([str(file) for file in small])
        image_grid = image_grid.Execute()
        unreadable = seg_of(real_ct_series(tmp_path / "not_sent"), tmp_path / "unreadable_seg.dcm")  # no geometry
        thin = pydicom.dcmread(pydicom_seg_of(small, mask, tmp_path / "thin_seg.dcm"))
        thin.SeriesInstanceUID = generate_uid()
        for measures in thin.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence:  # 5 mm apart, told 0.05 mm
            measures.SpacingBetweenSlices = measures.SliceThickness = 0.05
        thin.save_as(tmp_path / "thin_seg.dcm")
        other_patient = real_ct_series(tmp_path / "other_patient")
        for path in other_patient:
            dataset = pydicom.dcmread(path)
            dataset.PatientID = "ANOTHER-PATIENT"
            dataset.save_as(path)
        crossing = pydicom.dcmread(pydicom_seg_of(other_patient, mask, tmp_path / "crossing_seg.dcm"))
        own = pydicom.dcmread(small[0])  # a SEG of the small series' study and patient, of the other patient's image
        crossing.PatientID, crossing.StudyInstanceUID = own.PatientID, own.StudyInstanceUID
        crossing.save_as(tmp_path / "crossing_seg.dcm")
        uploaded = pacs.upload_files(big + [seg] + small + [small_seg, unreadable, tmp_path / "thin_seg.dcm"] +
                                     other_patient + [tmp_path / "crossing_seg.dcm"])
        big_uid, seg_uid, small_seg_uid, unreadable_uid, small_uid, other_uid = (
            str(pydicom.dcmread(files).SeriesInstanceUID)
            for files in (big[0], seg, small_seg, unreadable, small[0], other_patient[0]))
        thin_uid, crossing_uid = str(thin.SeriesInstanceUID), str(crossing.SeriesInstanceUID)
        cache = tmp_path / "work" / "dicomweb_cache"
        label_cache = cache / md5_digest(pacs.dicomweb) / "labels" / "final"  # MONAI Label's, of the PACS
        label_cache.mkdir(parents=True)
        converting = {which: label_cache / f".converting-{which}.nii.gz" for which in ("stale", "young")}
        for which, path in converting.items():  # a server killed while it converted a SEG
            path.write_bytes(b"half a label volume")
            when = time.time() - (FILE_META_TEMP_STALE_S + 60 if which == "stale" else 0)
            os.utime(path, (when, when))
        audit_dir = tmp_path / "audit"
        server = start_server(pacs.dicomweb, copy_weights(tiny_weights, tmp_path / "model"), tmp_path / "work",
                              conf={"max_voxels": 1_000_000, "audit_dir": audit_dir})

        def retrievals(uid: str) -> list[str]:  # WADO-RS retrievals of the series (its metadata is no retrieval)
            return [line for line in requests_log.read_text().splitlines() if line.startswith("GET ") and
                    (line.split("?")[0].rstrip("/").endswith(f"/series/{uid}") or f"/series/{uid}/instances" in line
                     or f"/series/{uid}/rendered" in line)]

        def series_searches(uid: str, start: int) -> list[str]:  # QIDO-RS: its modality, study and patient
            return [search for search in qido_searches(pacs, start) if f"SeriesInstanceUID={uid}" in search.split()
                    and {"includefield=Modality", "includefield=PatientID"} & set(search.split())]

        def label(method: str, uid: str) -> requests.Response:
            return requests.request(method, f"{server.url}/datastore/label", params={"label": uid, "tag": "final"},
                                    timeout=600)

        try:
            for method in ("GET", "HEAD"):
                answer = label(method, big_uid)
                assert answer.status_code == 404, (method, answer.status_code, answer.text[:500])
                if method == "GET":
                    assert answer.json()["detail"].startswith(
                        f"series {big_uid} is no label: the PACS holds it as a CT series, not a DICOM SEG"), answer.text
                else:
                    assert answer.content == b""
            unknown = generate_uid()
            answer = label("GET", unknown)
            assert answer.status_code == 404, (answer.status_code, answer.text[:500])
            assert answer.json()["detail"] == (f"no label {unknown}: the PACS holds no series of that "
                                               "SeriesInstanceUID"), answer.text
            assert not converting["stale"].exists() and converting["young"].read_bytes() == b"half a label volume"
            for uid in (small_uid, other_uid):  # the images the SEGs reference, downloaded (viewed)
                answer = requests.get(f"{server.url}/datastore/image", params={"image": uid}, timeout=600)
                assert answer.status_code == 200, (answer.status_code, answer.text[:500])
            converted = []
            for method in ("GET", "GET", "HEAD"):  # a real SEG: its label volume, converted once
                start = log_size(pacs)
                answer = label(method, small_seg_uid)
                # its series searched once a read: the route's check, the SEG's modality and its identity were 3
                assert len(series_searches(small_seg_uid, start)) == 1, qido_searches(pacs, start)
                assert answer.status_code == 200, (method, answer.status_code, answer.text[:500], server.log_tail())
                assert answer.headers["content-disposition"].endswith(f'filename="{small_seg_uid}.nii.gz"'), \
                    answer.headers
                if method == "GET":
                    (tmp_path / "label.nii.gz").write_bytes(answer.content)
                    volume = sitk.ReadImage(str(tmp_path / "label.nii.gz"))
                    assert np.array_equal(sitk.GetArrayFromImage(volume), mask)
                    assert np.allclose(volume.GetOrigin(), image_grid.GetOrigin()) and np.allclose(
                        volume.GetSpacing(), image_grid.GetSpacing()), (volume.GetOrigin(), volume.GetSpacing())
                else:
                    assert answer.content == b"" and answer.headers["content-length"] == str(converted[0][2])
                converted += [(path.name, path.stat().st_mtime_ns, path.stat().st_size) for path in cache.glob(
                    f"*/labels/final/{small_seg_uid}.seg-*.nii.gz")]  # named by the content it was made from
            assert len(converted) == 3 and len(set(converted)) == 1, converted  # not converted again
            assert len(retrievals(small_seg_uid)) == 1, requests_log.read_text()
            seg_files = [small_seg_uid, converted[0][0]]
            assert sorted(p.name for p in label_cache.iterdir()) == sorted(  # no label saved for the image
                seg_files + [converting["young"].name]), sorted(label_cache.iterdir())
            # the SEG replaced in the PACS under its SeriesInstanceUID (deleted, another one stored): the other one's
            # label volume (the first one's conversion was served for ever), downloaded and converted once more
            replaced = pydicom.dcmread(pydicom_seg_of(small, mask[::-1].copy(), tmp_path / "replaced_seg.dcm"))
            replaced.SeriesInstanceUID = small_seg_uid
            replaced.save_as(tmp_path / "replaced_seg.dcm")
            seg_index = len(big) + 1 + len(small)
            urllib.request.urlopen(urllib.request.Request(f"{pacs.url}/instances/{uploaded[seg_index]['ID']}",
                                                          method="DELETE"), timeout=120).close()
            pacs.upload(tmp_path / "replaced_seg.dcm")
            answer = label("GET", small_seg_uid)
            assert answer.status_code == 200, (answer.status_code, answer.text[:500], server.log_tail())
            (tmp_path / "label.nii.gz").write_bytes(answer.content)
            assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "label.nii.gz"))),
                                  mask[::-1]), "the replaced SEG's label volume was served"
            assert len(retrievals(small_seg_uid)) == 2, requests_log.read_text()
            assert sorted(p.name for p in (label_cache / small_seg_uid).iterdir()) == [
                f"{replaced.SOPInstanceUID}.dcm"], sorted((label_cache / small_seg_uid).iterdir())
            conversions = sorted(p.name for p in label_cache.glob(f"{small_seg_uid}.seg-*.nii.gz"))
            assert len(conversions) == 1 and conversions[0] != converted[0][0], conversions  # the first one removed
            seg_files = [small_seg_uid, conversions[0]]
            answer = label("GET", crossing_uid)
            assert answer.status_code == 409, (answer.status_code, answer.text[:500])
            assert answer.json()["detail"] == (
                f"series {crossing_uid} is not served as a label: its DICOM SEG (patient_id {own.PatientID!r}, study "
                f"{own.StudyInstanceUID!r}) references series {other_uid}, which the PACS lists under patient_id "
                f"'ANOTHER-PATIENT', study {pydicom.dcmread(other_patient[0]).StudyInstanceUID!r}: a SEG labels an "
                "image of its own study; it is not served"), answer.text
            answer = label("GET", thin_uid)
            assert answer.status_code == 413, (answer.status_code, answer.text[:500])
            assert answer.json()["detail"] == (
                f"series {thin_uid} is too large as a label volume: its 3 frames span 10 mm at a slice spacing of "
                "0.05 mm, a 512 x 512 x 201 volume of 52,690,944 voxels, over the limit of 1,000,000; it was not "
                "converted (raise the limit with --conf max_voxels on the server)"), answer.text
            assert sorted(p.name for p in label_cache.iterdir()) == sorted(  # their downloads only: no label volume
                seg_files + [converting["young"].name, crossing_uid, thin_uid]), \
                sorted(label_cache.iterdir())
            answer = label("GET", unreadable_uid)
            assert answer.status_code == 422, (answer.status_code, answer.text[:500])
            assert answer.json()["detail"].startswith(f"series {unreadable_uid} is not served as a label: its DICOM "
                                                      "SEG cannot be read as a label volume ("), answer.text
            too_large = (f"series {seg_uid} is too large: its 1 instances hold 1,572,864 voxels, over the limit of "
                         "1,000,000; nothing of it was downloaded (raise the limit with --conf max_voxels on the "
                         "server)")
            for method in ("GET", "HEAD"):
                answer = label(method, seg_uid)
                assert answer.status_code == 413, (method, answer.status_code, answer.text[:500])
                assert answer.json()["detail"] == too_large if method == "GET" else answer.content == b""
            retrieved = requests_log.read_text().splitlines()
            answer = requests.get(f"{server.url}/datastore/", params={"output": "train"}, timeout=600)
            assert answer.status_code == 200 and answer.json() == [], (answer.status_code, answer.text[:500])
            answer = requests.post(f"{server.url}/train/adl", json={}, timeout=600)
            assert answer.status_code == 422 and "no corrected studies" in answer.text, (answer.status_code,
                                                                                       answer.text[:500])
            assert [line for line in requests_log.read_text().splitlines()[len(retrieved):]  # no series downloaded
                    if any(f"/series/{uid}" in line and "/metadata" not in line for uid in
                           (big_uid, seg_uid, small_uid, small_seg_uid, other_uid))] == [], requests_log.read_text()
            assert retrievals(big_uid) == [] and retrievals(seg_uid) == [], requests_log.read_text()
            assert not [p for p in cache.rglob("*") if big_uid in p.name or seg_uid in p.name], \
                sorted(map(str, cache.rglob("*")))
            assert server.alive()
            temp = tmp_path / "work" / "tmp"  # the server's TMPDIR (mlserver.start_server)
            assert sorted(p.name for p in temp.iterdir()) == []
        finally:
            stop_server(server)
    finally:
        stop_orthanc(pacs)
    assert [(entry["fields"]["image"], entry["fields"]["route"]) for entry in
            AuditLog(audit_dir).entries("label_downloaded")] == \
        [(small_seg_uid, "GET /datastore/label")] * 2 + [(small_seg_uid, "HEAD /datastore/label")] + \
        [(small_seg_uid, "GET /datastore/label")]


def test_a_pacs_seg_label_is_the_seg_the_pacs_holds_as_its_read_checked_it(tmp_path, monkeypatch, caplog):
    """A DICOM SEG of a real Orthanc read as a label (:func:`lib.pacs_seg.seg_label_uri`, the label route's read),
    its steps interleaved as concurrent reads and a PACS changing meanwhile can interleave them (no sleep):

    * a read of the SEG's earlier content putting its volume in place after a read of its new content had (the SEG
      replaced meanwhile) left the earlier volume recorded as the new content's conversion, served for ever; each
      content now has a file of its own, and the route sends the file its read checked (opened first);
    * its volume not written (the place taken by a folder: an OSError) was a bare 500: a 500 naming why;
    * the SEG deleted between the route's series search and the instance search was answered from the cached
      download: a 404;
    * a PACS sending other instances than it lists in 3 downloads in a row: the last one was converted; a 503;
    * the SEG moved to another patient between the series search and the download was served as the searched
      patient's label: a 409 naming the patient its file names;
    * the labels an earlier version saved in MONAI Label's index (a SEG's conversion as the label of the image it
      references) were listed for training and answered as the image's label: neither, kept at start-up
      (:func:`lib.pacs.remove_stale_downloads`: they may be another MONAI Label app's, on the same cache) with a
      WARNING naming them; the conversions named by a SEG's UID alone are removed."""
    import logging
    import os
    import shutil
    import threading

    import SimpleITK as sitk
    from dicomweb_client.api import DICOMwebClient
    from monailabel.datastore.dicom import DICOMWebDatastore
    from monailabel.datastore.local import LocalDatastore
    from pydicom.uid import generate_uid

    from lib.pacs import bound_waits, bounded_downloads, download_within, remove_stale_downloads
    from lib.pacs_corrections import one_search_per_series, searched_series, server_kept_labels
    from lib.pacs_seg import SegNotServed, open_seg_label, seg_label_uri

    pacs = start_orthanc(tmp_path / "orthanc")
    try:
        small = real_ct_series(tmp_path / "small")
        masks = [np.zeros((3, 512, 512), np.uint8) for _ in range(2)]
        masks[0][:, 100:200, 100:200] = 1
        masks[1][:, 300:400, 250:450] = 1
        first = pydicom_seg_of(small, masks[0], tmp_path / "first.dcm")
        seg_uid = str(pydicom.dcmread(first).SeriesInstanceUID)
        second = pydicom.dcmread(pydicom_seg_of(small, masks[1], tmp_path / "second.dcm"))
        second.SeriesInstanceUID = seg_uid  # the SEG replaced under its SeriesInstanceUID
        second.save_as(tmp_path / "second.dcm")
        header = pydicom.dcmread(small[0], stop_before_pixels=True)
        small_uid, patient = str(header.SeriesInstanceUID), str(header.PatientID)
        in_pacs = pacs.upload_files(small + [first])[-1]["ID"]
        store = DICOMWebDatastore(DICOMwebClient(pacs.dicomweb), search_filter={"Modality": "CT"},
                                  cache_path=str(tmp_path / "cache"))
        bound_waits(store)
        server_kept_labels(store, tmp_path / "kept")
        bounded_downloads(store, lambda: 10**8)
        label_cache = Path(store._datastore.label_path("final"))

        def replace_in_pacs(path: Path | None) -> str | None:  # the SEG deleted, ``path`` stored (its Orthanc id)
            urllib.request.urlopen(urllib.request.Request(f"{pacs.url}/instances/{in_pacs}", method="DELETE"),
                                   timeout=120).close()
            return pacs.upload(path)["ID"] if path is not None else None

        def read(download=None) -> str:
            return seg_label_uri(store, seg_uid, "", download or (lambda: download_within(
                store, seg_uid, 10**8, folder=label_cache / seg_uid)), 10**8)

        def volume(path) -> np.ndarray:
            return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))

        def conversions() -> list[str]:
            return sorted(p.name for p in label_cache.iterdir() if p.is_file() and p.name.startswith(seg_uid))

        # a read of the first content (A) puts its volume in place only once a read of the second (B) has
        real_replace = os.replace
        a_holds_first, b_in_place, a_done = threading.Event(), threading.Event(), threading.Event()

        def replace(source, target, *args, **kwargs):
            if Path(target).parent != label_cache or not str(target).endswith(".nii.gz"):
                return real_replace(source, target, *args, **kwargs)
            if threading.current_thread().name == "A":
                a_holds_first.set()
                assert b_in_place.wait(120)
                return real_replace(source, target, *args, **kwargs)
            done = real_replace(source, target, *args, **kwargs)
            b_in_place.set()
            assert a_done.wait(120)
            return done

        answered: dict = {}

        def run(name: str) -> None:
            try:
                answered[name] = read()
            except BaseException as error:  # noqa: BLE001 - asserted below
                answered[name] = error

        monkeypatch.setattr(os, "replace", replace)
        reads = {name: threading.Thread(target=run, args=(name,), name=name) for name in "AB"}
        reads["A"].start()
        assert a_holds_first.wait(120), answered
        in_pacs = replace_in_pacs(tmp_path / "second.dcm")
        reads["B"].start()
        assert b_in_place.wait(120), answered
        reads["A"].join(120)
        a_done.set()
        reads["B"].join(120)
        monkeypatch.setattr(os, "replace", real_replace)
        for name, mask in zip("AB", masks):
            assert isinstance(answered[name], str), answered
            if os.path.exists(answered[name]):  # what a read answers is the content it read
                assert np.array_equal(volume(answered[name]), mask), name
        served = read()
        assert np.array_equal(volume(served), masks[1]), "the SEG's earlier content was served as its new one"
        with open_seg_label(store, seg_uid) as sent:
            assert sent.read() == Path(served).read_bytes()
        assert conversions() == [Path(served).name], conversions()  # the earlier content's removed

        # its volume not written: a 500 naming why, nothing left
        os.unlink(served)
        os.mkdir(served)
        (Path(served) / "taken").write_bytes(b"")
        with pytest.raises(SegNotServed) as refused:
            read()
        assert refused.value.status == 500 and str(refused.value) == (
            f"series {seg_uid} is not served as a label: its label volume could not be written into the server's "
            "label cache (Is a directory); nothing of it was kept"), str(refused.value)
        assert not [p for p in label_cache.iterdir() if p.name.startswith(".converting-")]
        shutil.rmtree(served)

        # deleted after the route's series search: a 404, not its cached download
        with one_search_per_series():
            assert searched_series(store, seg_uid)  # the route's check (lib.pacs.final_label_problem)
            in_pacs = replace_in_pacs(None)
            with pytest.raises(SegNotServed) as refused:
                read()
        assert refused.value.status == 404 and str(refused.value) == (
            f"series {seg_uid} is not served as a label: the PACS no longer lists an instance of it"), refused.value

        # a PACS (a cache in front of it) that keeps sending the earlier instance: a 503, nothing converted
        in_pacs = pacs.upload(tmp_path / "second.dcm")["ID"]
        shutil.rmtree(label_cache / seg_uid)  # not downloaded yet

        def stale_download() -> None:
            (label_cache / seg_uid).mkdir(exist_ok=True)
            shutil.copyfile(first, label_cache / seg_uid / "first.dcm")

        with pytest.raises(SegNotServed) as refused:
            read(stale_download)
        assert refused.value.status == 503 and str(refused.value) == (
            f"series {seg_uid} is not served as a label: the PACS kept changing it (it listed other instances than "
            "it sent, 3 downloads in a row); nothing was sent: try again later"), str(refused.value)
        assert conversions() == [], conversions()

        # moved to another patient after the route's series search: its file names the other patient, a 409
        moved = pydicom.dcmread(tmp_path / "second.dcm")
        moved.PatientID = "ANOTHER-PATIENT"
        moved.SOPInstanceUID = moved.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        moved.save_as(tmp_path / "moved.dcm")
        with one_search_per_series():
            assert [entry["patient_id"] for entry in searched_series(store, seg_uid)] == [patient]
            in_pacs = replace_in_pacs(tmp_path / "moved.dcm")
            with pytest.raises(SegNotServed) as refused:
                read()
        assert refused.value.status == 409 and str(refused.value).startswith(
            f"series {seg_uid} is not served as a label: its DICOM SEG's file names patient_id 'ANOTHER-PATIENT', "
            f"and the PACS lists it under patient_id {patient!r}"), str(refused.value)
        assert conversions() == [], conversions()

        # an earlier version's labels in MONAI Label's index: the SEG's conversion saved as its image's label
        # (MONAI Label's DICOMweb datastore saved it so), and the SEG's conversion named by its UID alone
        in_pacs = replace_in_pacs(tmp_path / "second.dcm")
        served = read()
        store.get_image_uri(small_uid)
        shutil.copyfile(served, tmp_path / "paired.nii.gz")
        LocalDatastore.save_label(store, small_uid, str(tmp_path / "paired.nii.gz"), "final", {})
        paired = Path(LocalDatastore.get_label_uri(store, small_uid, "final"))
        earlier = [label_cache / f"{seg_uid}.nii.gz", label_cache / f"{seg_uid}.nii.gz.source"]
        for path in earlier:
            shutil.copyfile(served, path)
        assert paired.is_file() and store.get_labeled_images() == [small_uid]  # (the PACS's SEG references it)
        assert store.datalist() == [] and store.get_label_uri(small_uid, "final") == ""
        caplog.set_level(logging.WARNING, logger="lib.pacs_seg")
        kept = paired.read_bytes()
        removed = remove_stale_downloads(store)
        assert sorted(removed) == sorted(earlier), removed
        assert any(f"holds 'final' labels of 1 PACS series ({small_uid}) that this server does not use" in line
                   for line in caplog.messages), caplog.messages
        assert paired.read_bytes() == kept and store._datastore.objects[small_uid].labels.get("final")
        assert store.datalist() == [] and store.get_label_uri(small_uid, "final") == ""
        assert conversions() == [Path(served).name]
    finally:
        stop_orthanc(pacs)


def test_a_kept_correction_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    """The server's store of a PACS's corrections (:class:`lib.pacs_corrections.KeptLabels`): a correction sent again
    replaces the earlier one whole (its file, its info; the earlier file removed), one whose copy fails leaves the
    earlier one as it was and nothing of itself, and an info naming a file outside the label's own folder is not
    followed (no label), nor is that file removed. Two servers on one folder (two stores: the lock was one of each
    process) change a label one after the other: a correction saved by one while the other updates its info was
    lost, its file and the earlier one both removed. A label opened to be sent is read whole after a save replaced
    it (the GET was a 500). A read of a label that is not kept creates nothing (a lock file each: any label id read
    filled the disk). A PACS that accepts connections and never answers is a 504 naming it after
    ``PACS_SEARCH_TIMEOUT_S`` (the label's read hung for ever), no file of the label opened meanwhile."""
    import os
    import socket
    import threading
    import time

    from dicomweb_client.api import DICOMwebClient
    from monailabel.datastore.dicom import DICOMWebDatastore

    import lib.pacs_corrections as pacs_corrections
    from lib.pacs import bound_waits
    from lib.pacs_corrections import SERIES_IDENTITY_KEY, CorrectionNotServed, KeptLabels, server_kept_labels

    kept = KeptLabels(tmp_path / "corrections")
    for tag in ("final", "regions", "any"):
        assert kept.open("1.2.3", tag) is None
    assert not (tmp_path / "corrections").exists()
    first, second = tmp_path / "first.nii.gz", tmp_path / "second.nii.gz"
    first.write_bytes(b"first")
    second.write_bytes(b"second")
    assert kept.save("1.2.3", str(first), "final", {"sha256": "a"}) == "1.2.3"
    assert kept.path("1.2.3", "final").read_bytes() == b"first"
    kept.save("1.2.3", str(second), "final", {"sha256": "b"})
    assert kept.path("1.2.3", "final").read_bytes() == b"second" and kept.info("1.2.3", "final")["sha256"] == "b"
    assert len([p for p in (tmp_path / "corrections" / "final").iterdir() if p.is_dir()]) == 1
    with pytest.raises(FileNotFoundError):
        kept.save("1.2.3", str(tmp_path / "missing.nii.gz"), "final", {"sha256": "c"})
    assert kept.path("1.2.3", "final").read_bytes() == b"second" and kept.info("1.2.3", "final")["sha256"] == "b"
    assert len([p for p in (tmp_path / "corrections" / "final").iterdir() if p.is_dir()]) == 1
    assert kept.images("final") == ["1.2.3"] and kept.tags("1.2.3") == ["final"]
    info_file = tmp_path / "corrections" / "final" / "1.2.3.json"
    info_file.write_text(json.dumps({**json.loads(info_file.read_text()), "file": "../first.nii.gz"}))
    assert kept.path("1.2.3", "final") is None
    kept.remove("1.2.3", "final")
    assert first.read_bytes() == b"first" and kept.images("final") == []

    server_1, server_2 = KeptLabels(tmp_path / "shared"), KeptLabels(tmp_path / "shared")  # one model_dir
    server_1.save("1.2.3", str(first), "final", {"sha256": "a"})
    opened, info = server_1.open("1.2.3", "final")
    in_update, go_on = threading.Event(), threading.Event()
    write = pacs_corrections.atomic_write_json

    def paused_write(path, obj):  # server 1's info update: held between its read and its write
        if obj.get("note") == "reviewed":
            in_update.set()
            assert go_on.wait(60)
        return write(path, obj)

    monkeypatch.setattr(pacs_corrections, "atomic_write_json", paused_write)
    update = threading.Thread(target=server_1.update_info, args=("1.2.3", "final", {"note": "reviewed"}))
    update.start()
    assert in_update.wait(60)
    save = threading.Thread(target=server_2.save, args=("1.2.3", str(second), "final", {"sha256": "b"}))
    save.start()
    save.join(2)  # waits for the update's lock (it ran through and was lost)
    go_on.set()
    update.join(60)
    save.join(60)
    assert server_1.info("1.2.3", "final")["sha256"] == "b" and "note" not in server_1.info("1.2.3", "final")
    assert server_1.path("1.2.3", "final").read_bytes() == b"second"
    assert len([p for p in (tmp_path / "shared" / "final").iterdir() if p.is_dir()]) == 1
    with opened:  # opened before the new save: still the earlier file, whole, with its own info
        assert opened.read() == b"first" and info["sha256"] == "a"
    assert server_2.tags("1.2.3") == ["final"] and server_2.images("final") == ["1.2.3"]

    silent = socket.socket()  # a PACS that accepts connections and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    accepted: list = []
    threading.Thread(target=lambda: [accepted.append(silent.accept()) for _ in range(16)], daemon=True).start()
    store = DICOMWebDatastore(DICOMwebClient(f"http://127.0.0.1:{silent.getsockname()[1]}/dicom-web"),
                              search_filter={"Modality": "CT"}, cache_path=str(tmp_path / "cache"))
    bound_waits(store)
    server_kept_labels(store, tmp_path / "shared")
    locks = sorted(p.relative_to(tmp_path) for p in (tmp_path / "shared").rglob("*"))
    assert store.open_checked_label("1.2.4", "final") is None and store.open_checked_label("1.2.3", "any") is None
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "shared").rglob("*")) == locks and not accepted
    identity = {"series_instance_uid": "1.2.4", "study_instance_uid": "1.2", "patient_id": "P"}
    server_2.save("1.2.4", str(first), "final", {SERIES_IDENTITY_KEY: identity})
    label_file = server_2.path("1.2.4", "final")
    monkeypatch.setattr(pacs_corrections, "PACS_SEARCH_TIMEOUT_S", 2.0)
    outcome: list = []
    started = time.monotonic()
    read = threading.Thread(target=lambda: outcome.append(pytest.raises(CorrectionNotServed, store.open_checked_label,
                                                                        "1.2.4", "final")), daemon=True)
    read.start()
    while not accepted and time.monotonic() - started < 60:  # the search sent, not answered
        time.sleep(0.05)
    open_files = {os.path.realpath(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")}
    assert os.path.realpath(label_file) not in open_files, "the label's file is open while its series is checked"
    read.join(120)
    assert not read.is_alive() and time.monotonic() - started < 60, "the label's read hangs"
    refused = outcome[0].value
    assert refused.status == 504 and "did not answer the search for series 1.2.4 within 2 s" in str(refused)
    assert f"127.0.0.1:{silent.getsockname()[1]}" in str(refused)
    silent.close()


def test_a_kept_correction_of_another_patient_is_kept_aside_when_replaced(tmp_path, caplog, monkeypatch):
    """A correction saved for a series the PACS moved to another patient (opened again, downloaded anew) replaces the
    kept one of the old patient: that one (file and info) is kept aside in ``<tag>/superseded/``, a WARNING naming
    both patients (it was removed: the old patient's correction lost); nothing there is listed or counted. Saved
    again for the same patient and study, the earlier correction is removed as before. A save that fails leaves the
    earlier one as it was, nothing aside. One moved aside whose folders then fail to sync to the disk is said to be
    aside (``moved`` true, where it is; it was said to stay in its own folder, which was gone), a WARNING."""
    from lib import pacs_corrections
    from lib.pacs_corrections import SERIES_IDENTITY_KEY, SUPERSEDED, KeptLabels, corrections_of_other_urls

    root = tmp_path / "corrections" / "dicomweb-this"
    kept = KeptLabels(root)
    files = {name: tmp_path / f"{name}.nii.gz" for name in ("old", "old_again", "new")}
    for name, path in files.items():
        path.write_bytes(name.encode() * 100)

    def identity(patient: str) -> dict:
        return {SERIES_IDENTITY_KEY: {"series_instance_uid": "1.2.3", "study_instance_uid": "9.8", "patient_id": patient}}

    def versions() -> list:
        return sorted(p.name for p in (root / "final").iterdir() if p.is_dir() and p.name != SUPERSEDED)

    kept.save("1.2.3", str(files["old"]), "final", {"sha256": "old", **identity("PAT1")})
    kept.save("1.2.3", str(files["old_again"]), "final", {"sha256": "old_again", **identity("PAT1")})  # same patient
    assert kept.path("1.2.3", "final").read_bytes() == files["old_again"].read_bytes() and len(versions()) == 1
    assert not (root / "final" / SUPERSEDED).exists()
    with pytest.raises(FileNotFoundError):  # a failed save for the new patient: nothing aside, nothing changed
        kept.save("1.2.3", str(tmp_path / "missing.nii.gz"), "final", {"sha256": "x", **identity("PAT2")})
    assert kept.info("1.2.3", "final")["sha256"] == "old_again" and len(versions()) == 1
    assert not [*(root / "final").glob(f"{SUPERSEDED}/*")]
    with caplog.at_level("WARNING", logger="lib.pacs_corrections"):
        kept.save("1.2.3", str(files["new"]), "final", {"sha256": "new", **identity(" PAT2")})
    assert kept.path("1.2.3", "final").read_bytes() == files["new"].read_bytes() and len(versions()) == 1
    assert kept.info("1.2.3", "final")[SERIES_IDENTITY_KEY]["patient_id"] == " PAT2"
    aside = [*(root / "final" / SUPERSEDED).iterdir()]
    assert len(aside) == 1 and aside[0].name.startswith("1.2.3."), aside
    info = json.loads((aside[0] / "1.2.3.json").read_text())
    assert info[SERIES_IDENTITY_KEY]["patient_id"] == "PAT1" and info["sha256"] == "old_again", info
    assert (root / info["file"]).read_bytes() == files["old_again"].read_bytes()
    assert info["superseded"]["by_" + SERIES_IDENTITY_KEY]["patient_id"] == " PAT2", info
    warning = [r.getMessage() for r in caplog.records if "kept aside" in r.getMessage()]
    assert len(warning) == 1 and "1.2.3" in warning[0] and "'PAT1'" in warning[0] and "' PAT2'" in warning[0], \
        caplog.messages
    # not listed nor counted: one label of one image, and the start-up's count of this URL's labels is one
    assert kept.images("final") == ["1.2.3"] and kept.tags("1.2.3") == ["final"]
    other = KeptLabels(tmp_path / "corrections" / "dicomweb-other")
    assert other.images("final") == []
    assert "dicomweb-this (its URL not recorded: 1 label(s))" in corrections_of_other_urls(other.root, "http://o/")
    kept.remove("1.2.3", "final")  # the current one removed: the one aside stays, still not a label
    assert kept.images("final") == [] and kept.tags("1.2.3") == [] and kept.path("1.2.3", "final") is None
    assert (root / info["file"]).read_bytes() == files["old_again"].read_bytes()
    assert corrections_of_other_urls(other.root, "http://o/") is None  # the one aside is no label
    # moved aside, then its folders' sync fails (an I/O error of the disk): it is aside, and said to be
    kept.save("1.2.3", str(files["new"]), "final", {"sha256": "new", **identity("PAT2")})
    synced = pacs_corrections.fsync_path

    def failing_sync(path) -> None:
        if Path(path).name == SUPERSEDED:
            raise OSError(5, "Input/output error")
        synced(path)

    monkeypatch.setattr(pacs_corrections, "fsync_path", failing_sync)
    said: list = []
    with caplog.at_level("WARNING", logger="lib.pacs_corrections"):
        kept.save("1.2.3", str(files["old"]), "final", {"sha256": "old", **identity("PAT3")}, superseded=said.append)
    assert len(said) == 1 and said[0]["moved"] is True, said
    assert said[0]["kept_in"].startswith(f"final/{SUPERSEDED}/1.2.3."), said
    assert json.loads((root / said[0]["kept_in"] / "1.2.3.json").read_text())["sha256"] == "new"
    assert any("could not be synced" in message for message in caplog.messages), caplog.messages
    assert not any("stays in" in message for message in caplog.messages), caplog.messages


def test_a_download_that_cannot_be_listed_is_a_clear_error_not_a_bare_500(tmp_path):
    """A series' download folder that cannot be listed (no permission, an I/O error; here a symbolic link to itself)
    was an OSError through the routes: a bare 500. It is a 500 saying that this server cannot read its download of
    the series and what to check, without the folder's path."""
    from lib.pacs_corrections import CorrectionNotServed, _download_header

    folder = tmp_path / "cache" / "1.2.3"
    folder.parent.mkdir()
    folder.symlink_to(folder)
    with pytest.raises(CorrectionNotServed) as refused:
        _download_header(folder, "1.2.3")
    assert refused.value.status == 500, refused.value
    said = str(refused.value)
    assert "this server cannot read its download of series 1.2.3" in said and "symbolic links" in said, said
    assert str(tmp_path) not in said, said


def _nlm_app_and_queue(tmp_path: Path, studies: str, tiny_weights: Path, max_voxels: int = 1_000_000):
    """(app, its datastore, its review queue): the app (``DenoisingApp``, in this process, the nlm model, a copy of
    ``tiny_weights``) serving the DICOMweb root ``studies`` with ``max_voxels``."""
    from conftest import import_app_main
    from lib.activelearning import NextUnreviewed

    (tmp_path / "app" / "bin").mkdir(parents=True)  # MONAI Label downloads dcmqi's converter otherwise
    (tmp_path / "app" / "bin" / "itkimage2segimage").write_text("")
    app = import_app_main().DenoisingApp(str(tmp_path / "app"), studies,
                                         {"model_dir": str(copy_weights(tiny_weights, tmp_path / "model")),
                                          "models": "nlm", "max_voxels": str(max_voxels)})
    store = app.datastore()
    return app, store, NextUnreviewed(app.audit, app._queue_voxel_limit)  # noqa: SLF001 - the app's own limit


def _in_process_app(tmp_path: Path, studies: str, tiny_weights: Path, monkeypatch, max_voxels: int = 1_000_000):
    """The app (``DenoisingApp``, in this process) serving the DICOMweb root ``studies`` with ``max_voxels``, its
    download cache in ``tmp_path / "dicomweb_cache"``; returns (its datastore, one review queue request: a function
    of the ids to exclude answering the queue's ``too_large_to_review``, no study handed out)."""
    from monailabel.config import settings

    from lib.activelearning.review import QUEUE_LEFT

    monkeypatch.setattr(settings, "MONAI_LABEL_DICOMWEB_CACHE_PATH", str(tmp_path / "dicomweb_cache"))
    _, store, queue = _nlm_app_and_queue(tmp_path, studies, tiny_weights, max_voxels)

    def ask(exclude: list[str]) -> list[dict]:
        QUEUE_LEFT.set(None)
        assert queue({"exclude": exclude}, store) is None
        return QUEUE_LEFT.get()["too_large_to_review"]

    return store, ask


def test_a_series_stopped_over_the_limit_is_not_downloaded_again_when_the_pacs_gives_no_instance_count(
        tmp_path, tiny_weights, monkeypatch):
    """A series whose download was stopped over the voxel limit is remembered under its UID and the instance count
    the PACS's listing gives it; a PACS that gives no count had it downloaded again, up to the limit, on every review
    queue request. Here the real Orthanc lists 3 of a series' 6 instances (LimitFindInstances 2: 0.79 M voxels, under
    ``max_voxels`` 1,000,000) and, through a relay that drops NumberOfSeriesRelatedInstances from its answers, gives
    no count: the first queue request downloads it and stops at the 4th instance; the second one lists it the same
    way without a WADO-RS retrieval (counted in Orthanc's own request log), and after ``OVERSIZED_UNCOUNTED_S``
    (no count tells a change) with one."""
    import lib.pacs
    from lib.pacs import listed_series

    pacs, requests_log = start_orthanc_logging_requests(tmp_path, {"LimitFindInstances": 2})
    try:
        big = real_ct_series(tmp_path / "big", slices=6)  # 6 x 512 x 512 = 1.57 M voxels
        pacs.upload_files(big)
        big_uid = str(pydicom.dcmread(big[0]).SeriesInstanceUID)
        with without_instance_counts(pacs) as studies:
            store, ask = _in_process_app(tmp_path, studies, tiny_weights, monkeypatch)

            def retrievals() -> int:  # WADO-RS retrievals of the series: GET .../studies/X/series/<uid>
                return sum(line.startswith("GET ") and line.rstrip("/").endswith(f"/series/{big_uid}")
                           for line in requests_log.read_text().splitlines())

            stopped = {"id": big_uid, "instances": 4, "voxels": 1_048_576, "estimated": False, "limit": 1_000_000,
                       "download_stopped": True}
            assert ask([]) == [stopped]
            assert listed_series(store, big_uid) == {"modality": "CT", "instances": None}  # no count given
            assert retrievals() == 1
            assert ask([]) == [stopped]
            assert retrievals() == 1, "downloaded again"
            # no count tells whether it changed: it is checked again (downloaded up to the limit) now and then
            monkeypatch.setattr(lib.pacs, "OVERSIZED_UNCOUNTED_S", 0.0)
            assert ask([]) == [stopped]
            assert retrievals() == 2
        assert not [p for p in (tmp_path / "dicomweb_cache").rglob(f"*{big_uid}*")]
    finally:
        stop_orthanc(pacs)


def test_a_series_stopped_over_the_limit_is_listed_with_its_size_on_the_pacs_at_once(tmp_path, tiny_weights,
                                                                                     monkeypatch):
    """A series stopped during its download over the voxel limit (it grew since the listing) was listed in the
    review queue's ``too_large_to_review`` with the counts where the download stopped (4 instances of the 6 the PACS
    then held) until the queue's listing was made again (a minute later), when the series was asked again and listed
    with 6, no longer marked ``download_stopped``. The PACS is asked its size once after the stop: the queue lists
    it with 6 instances, marked stopped, at once, and neither the next request nor one after the listing is made
    again asks the PACS anything of it (the real Orthanc's request filter stores 3 more slices when the retrieval
    arrives, and logs every request)."""
    import lib.pacs

    files = real_ct_series(tmp_path / "grows", slices=6)
    uid = str(pydicom.dcmread(files[0]).SeriesInstanceUID)
    requests_log = tmp_path / "orthanc_requests.log"
    script = grow_on_retrieval(tmp_path / "grow.lua", {uid: files[3:]}, requests_log)
    pacs = start_orthanc(tmp_path / "orthanc", extra_config={"LuaScripts": [str(script)]})
    try:
        pacs.upload_files(files[:3])  # 3 x 512 x 512 = 0.79 M voxels listed, under 1,000,000; 6 sent
        _, ask = _in_process_app(tmp_path, pacs.dicomweb, tiny_weights, monkeypatch)

        def asked_since(before: int) -> list[str]:
            lines = requests_log.read_text().splitlines()[before:]
            return [line for line in lines if uid in line or line.split("?")[0].rstrip("/").endswith("/instances")]

        entry = {"id": uid, "instances": 6, "voxels": 1_572_864, "estimated": False, "limit": 1_000_000,
                 "download_stopped": True}
        assert ask([]) == [entry]
        assert len(pacs.get("/instances")) == 6  # it grew (the filter ran)
        before = len(requests_log.read_text().splitlines())
        assert ask([]) == [entry]
        monkeypatch.setattr(lib.pacs, "LISTING_MAX_AGE_S", 0.0)  # the listing made again: it lists 6 instances now
        assert ask([]) == [entry]
        assert asked_since(before) == [], asked_since(before)
        assert not [p for p in (tmp_path / "dicomweb_cache").rglob(f"*{uid}*")]
    finally:
        stop_orthanc(pacs)


@pytest.mark.skipif(processes.private_tmpfs_problem() is not None,
                    reason=str(processes.private_tmpfs_problem()))
def test_a_series_that_does_not_fit_on_the_cache_disk_is_stopped_before_the_disk_is_full(tmp_path, tiny_weights):
    """The app's download of a PACS series counted voxels, not bytes: a series under ``max_voxels`` larger than the
    free space of the DICOMweb cache's disk was written until the disk was full (a bare 500, and every other writer
    on that disk failed too). The free space is now checked before each instance is written, as the batch's
    download does, and, where the PACS gives the series' size (QIDO-RS), against the whole series before anything is
    retrieved, as the batch's check_download does (the instance check alone downloaded part of it first). Here the
    server's cache folder is a real 3 MiB tmpfs (a mount namespace of the server's own): a 6-slice series (6 x 0.5
    MiB, the NIfTI conversion beside it) does not fit: infer by id and the review queue's hand-out answer 507 saying
    how many bytes were needed and free, with no WADO-RS retrieval of it (the real Orthanc's request log); a series
    listed with 1 slice that grows to 6 when its retrieval arrives (a Lua request filter) is stopped at the instance
    that does not fit; nothing of either is left in the cache, and a 1-slice series that fits is denoised. The same
    start-up names, in a WARNING, the corrections folders of other PACS URLs (this URL's holding none: a changed
    --studies URL hid them in silence), never a URL's credentials; its own corrections folder is a 1 MiB tmpfs of its
    own too (:func:`_correction_on_a_full_disk`)."""
    import re
    import subprocess

    from lib.audit.location import default_corrections_dir

    import requests

    big, small = real_ct_series(tmp_path / "big", slices=6), real_ct_series(tmp_path / "small", slices=1)
    grows = real_ct_series(tmp_path / "grows", slices=6)
    big_uid, small_uid, grows_uid = (str(pydicom.dcmread(files[0]).SeriesInstanceUID) for files in (big, small, grows))
    requests_log = tmp_path / "orthanc_requests.log"
    script = grow_on_retrieval(tmp_path / "grow.lua", {grows_uid: grows[1:]}, requests_log)
    pacs = start_orthanc(tmp_path / "orthanc", extra_config={"LuaScripts": [str(script)]})
    try:
        pacs.upload_files(big + small + grows[:1])
        cache = tmp_path / "work" / "dicomweb_cache"  # the server's MONAI_LABEL_DICOMWEB_CACHE_PATH (mlserver)
        cache.mkdir(parents=True)
        model_dir = copy_weights(tiny_weights, tmp_path / "model")
        corrections = Path(default_corrections_dir(pacs.dicomweb, str(model_dir)))  # a 1 MiB tmpfs of its own
        corrections.mkdir(parents=True)
        for name, tag, note in (("dicomweb-0123456789abcdef", "final", "http://user:secret@old-alias:8042/dicom-web"),
                                ("dicomweb-fedcba9876543210", "regions", None)):  # other URLs' (one older: no note)
            (corrections.parent / name / tag).mkdir(parents=True)
            (corrections.parent / name / tag / "1.2.3.json").write_text("{}")
            if note:
                (corrections.parent / name / "studies.json").write_text(json.dumps({"studies": note}))
        server = start_server(pacs.dicomweb, model_dir, tmp_path / "work", conf={"max_voxels": 10_000_000},
                              wrap=lambda args: processes.on_tmpfs(cache, 3, args, also=((corrections, 1),)))
        def in_cache(folder: Path = cache) -> list[str]:
            """What the server's cache folder holds, seen from its mount namespace (the tmpfs is its alone)."""
            found = subprocess.run(["nsenter", "--target", str(server.process.pid), "--mount", "find", str(folder)],
                                   capture_output=True, text=True, timeout=60)
            assert found.returncode == 0, found.stderr
            return found.stdout.split()

        def retrieved(uid: str) -> list[str]:
            """The WADO-RS requests of the series ``uid`` (paths ``.../series/<uid>[/...]``; searches name it in
            their query string only)."""
            return [line for line in requests_log.read_text().splitlines()
                    if line.startswith("GET ") and f"/series/{uid}" in line.split("?")[0]]

        try:
            folder = re.escape(md5_digest(pacs.dicomweb))  # the cache folder's name: answers name no server path
            refused = (rf"series {re.escape(big_uid)} does not fit on the disk of the server's DICOMweb cache "
                       rf"{folder}: its 6 instances need about [\d,]+ bytes with their conversion, [\d,]+ are free; "
                       r"nothing of it was downloaded: free some space there \(MONAI_LABEL_DICOMWEB_CACHE_PATH\)")
            answer = requests.post(f"{server.url}/infer/nlm", params={"image": big_uid, "output": "json"},
                                   timeout=600)
            assert answer.status_code == 507, answer.text[:2000]
            assert re.fullmatch(f"not denoised: {refused}", answer.json()["detail"]), answer.json()["detail"]
            answer = requests.post(f"{server.url}/activelearning/next_unreviewed",
                                   json={"exclude": [small_uid, grows_uid]}, timeout=600)
            assert answer.status_code == 507 and re.fullmatch(refused, answer.json()["detail"]), answer.text[:2000]
            assert retrieved(big_uid) == [], retrieved(big_uid)
            assert not [name for name in in_cache() if big_uid in name], in_cache()
            stopped = (rf"not denoised: series {re.escape(grows_uid)} does not fit on the disk of the server's "
                       rf"DICOMweb cache {folder}: instance \d+ needs about [\d,]+ bytes with the conversion of those "
                       r"downloaded, [\d,]+ are free; the download was stopped and nothing of it was kept: free some "
                       r"space there \(MONAI_LABEL_DICOMWEB_CACHE_PATH\)")
            answer = requests.post(f"{server.url}/infer/nlm", params={"image": grows_uid, "output": "json"},
                                   timeout=600)
            assert answer.status_code == 507 and re.fullmatch(stopped, answer.json()["detail"]), answer.text[:2000]
            assert len(pacs.get("/instances")) == 6 + 1 + 6  # it grew when its retrieval arrived (the filter ran)
            assert retrieved(grows_uid), "the growing series was not retrieved"
            assert not [name for name in in_cache() if grows_uid in name], in_cache()
            answer = requests.post(f"{server.url}/infer/nlm", params={"image": small_uid, "output": "json"},
                                   timeout=600)
            assert answer.status_code == 200 and answer.json()["shape"] == [512, 512], answer.text[:2000]
            assert [name for name in in_cache() if name.endswith(f"/{small_uid}")], in_cache()  # on the tmpfs
            assert not [name for name in in_cache() if big_uid in name or grows_uid in name], in_cache()
            log = server.log_tail(200000)
            assert "No space left on device" not in log, log[-4000:]
            hidden = (f"no correction is kept for this PACS URL ({pacs.dicomweb}, folder {corrections}), but "
                      f"{corrections.parent} keeps corrections of other PACS URLs: dicomweb-0123456789abcdef (kept "
                      "for http://old-alias:8042/dicom-web: 1 label(s)); dicomweb-fedcba9876543210 (its URL not "
                      "recorded: 1 label(s)).")
            assert hidden in log and "secret" not in log, log[-4000:]
            _correction_on_a_full_disk(server, pacs.dicomweb, small_uid, corrections, in_cache, tmp_path)
            assert server.alive()
        finally:
            stop_server(server)
    finally:
        stop_orthanc(pacs)


def _correction_on_a_full_disk(server, studies: str, uid: str, corrections: Path, in_corrections,
                               tmp_path: Path) -> None:
    """The corrections folder of the server of the PACS ``studies`` (``corrections``, a 1 MiB tmpfs of its own;
    ``in_corrections``: what a folder holds, seen by the server) keeps a first correction of the series ``uid`` (a compressed NIfTI), not a
    second one (an uncompressed NIfTI of 1 MiB): 507 saying the disk is full (it was a bare 500), nothing of it left
    there, the first correction sent as it was, the failure on record."""
    import requests
    import SimpleITK as sitk

    from lib.audit import AuditLog
    from lib.audit.location import default_audit_dir

    answer = requests.get(f"{server.url}/datastore/image", params={"image": uid}, timeout=600)
    assert answer.status_code == 200, answer.text[:500]
    (tmp_path / "image.nii.gz").write_bytes(answer.content)
    image = sitk.Cast(sitk.ReadImage(str(tmp_path / "image.nii.gz")), sitk.sitkFloat32)
    voxels = sitk.GetArrayFromImage(image)
    voxels[..., :16, :16] += 20.0  # a clinician's local edit
    corrected = sitk.GetImageFromArray(voxels)
    corrected.CopyInformation(image)
    for name in ("first.nii.gz", "second.nii"):
        sitk.WriteImage(corrected, str(tmp_path / name), useCompression=name.endswith(".gz"))

    def put(name: str):
        with open(tmp_path / name, "rb") as handle:
            return requests.put(f"{server.url}/datastore/label", params={"image": uid, "tag": "final"},
                                files={"label": (name, handle)}, timeout=600)

    answer = put("first.nii.gz")
    assert answer.status_code == 200, (answer.status_code, answer.text[:1000])
    kept = sorted(in_corrections(corrections))
    answer = put("second.nii")
    assert answer.status_code == 507, (answer.status_code, answer.text[:1000], server.log_tail(3000))
    assert answer.json()["detail"] == (
        f"the final label of {uid} was not saved: the disk where this server keeps labels is full (no space left); "
        "nothing of it was kept and the label saved before (if any) is unchanged: free some space there and send it "
        "again"), answer.text
    assert sorted(in_corrections(corrections)) == kept  # nothing of the second left, the first's files all there
    answer = requests.get(f"{server.url}/datastore/label", params={"label": uid, "tag": "final"}, timeout=600)
    assert answer.status_code == 200 and answer.content == (tmp_path / "first.nii.gz").read_bytes()
    failed = AuditLog(default_audit_dir(studies, str(corrections.parent.parent))).entries("label_saved_failed")
    assert len(failed) == 1 and "No space left on device" in failed[0]["fields"]["error"], failed


def test_a_server_that_cannot_write_its_dicomweb_cache_or_corrections_does_not_start_and_says_which(tmp_path,
                                                                                                   tiny_weights):
    """MONAI Label's DICOMweb datastore downloads every series denoised or reviewed into its cache folder
    (``<MONAI_LABEL_DICOMWEB_CACHE_PATH>/<hash of the URL>``) first: that folder was missing from the start-up's
    write check, so a server whose cache (made by an earlier start) had become read-only started, and failed every
    series it was asked for. The real start-up with that folder read-only (``chattr +i`` where this machine allows
    it, which stops root too; else a regular file there) exits, its error naming the folder. So does one whose
    corrections folder (``<model_dir>/corrections/dicomweb-<hash of the URL>``, where the corrections of the PACS's
    series are kept) is a regular file."""
    import shutil
    import subprocess

    from dicomweb_client import DICOMwebClient
    from monailabel.datastore.dicom import DICOMWebDatastore

    from lib.audit.location import default_corrections_dir

    pacs = start_orthanc(tmp_path / "orthanc")
    try:
        upload_real_ct_series(pacs, tmp_path / "series")
        cache = tmp_path / "dicomweb_cache"
        earlier = DICOMWebDatastore(DICOMwebClient(pacs.dicomweb), {}, cache_path=str(cache))  # an earlier start's
        earlier._observer.stop()  # noqa: SLF001 - its file watcher, not needed here
        earlier._observer.join()  # noqa: SLF001
        folder = cache / md5_digest(pacs.dicomweb)  # MONAI Label's cache of this PACS
        assert folder.is_dir()
        immutable = subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
        try:
            if not immutable:
                shutil.rmtree(folder)
                folder.write_text("kept")
            try:
                started = start_server(pacs.dicomweb, copy_weights(tiny_weights, tmp_path / "model"),
                                       tmp_path / "work", timeout=300,
                                       env={"MONAI_LABEL_DICOMWEB_CACHE_PATH": str(cache)})
            except RuntimeError as error:
                assert "exited with" in str(error)
            else:
                stop_server(started)
                pytest.fail("the server started")
        finally:
            if immutable:
                subprocess.run(["chattr", "-i", str(folder)], check=True)
        log = (tmp_path / "work" / "server.log").read_text(errors="replace")
        assert f"not started: the DICOMweb datastore's cache folder (MONAI_LABEL_DICOMWEB_CACHE_PATH) {folder}: " \
            in log, log[-4000:]
        assert ("Operation not permitted" if immutable else "not a folder") in log, log[-4000:]
        model_dir = copy_weights(tiny_weights, tmp_path / "model_2")
        corrections = Path(default_corrections_dir(pacs.dicomweb, str(model_dir)))
        corrections.parent.mkdir(parents=True)
        corrections.write_text("kept")
        with pytest.raises(RuntimeError, match="exited with"):
            stop_server(start_server(pacs.dicomweb, model_dir, tmp_path / "work_2", timeout=300))
        log = (tmp_path / "work_2" / "server.log").read_text(errors="replace")
        assert f"not started: the DICOMweb datastore's corrections folder {corrections}: not a folder" in log, \
            log[-4000:]
    finally:
        stop_orthanc(pacs)


def _unwritable_audit_log(audit_dir: Path) -> contextlib.AbstractContextManager:
    """The audit log ``audit_dir / "audit.jsonl"`` replaced by a folder while the ``with`` block runs (every append
    fails, for root too), then put back as it was."""

    @contextlib.contextmanager
    def unwritable():
        audit_file = audit_dir / "audit.jsonl"
        kept = audit_file.read_bytes()
        audit_file.unlink()
        audit_file.mkdir()
        try:
            yield
        finally:
            audit_file.rmdir()
            audit_file.write_bytes(kept)

    return unwritable()


@contextlib.contextmanager
def _proxy_of_orthanc_logging_requests(tmp_path: Path, tiny_weights: Path):
    """A real Orthanc logging each request it is sent and this app's server on it, the audit log in
    ``tmp_path / "audit"``: (orthanc, its request log, server, audit folder); both stopped when the block ends."""
    pacs, requests_log = start_orthanc_logging_requests(tmp_path)
    try:
        audit_dir = tmp_path / "audit"
        server = start_server(pacs.dicomweb, copy_weights(tiny_weights, tmp_path / "model"), tmp_path / "work",
                              conf={"audit_dir": audit_dir})
        try:
            yield pacs, requests_log, server, audit_dir
        finally:
            stop_server(server)
    finally:
        stop_orthanc(pacs)


def _posts(requests_log: Path) -> list[str]:
    """The POST requests (stores) in Orthanc's request log."""
    return [line for line in requests_log.read_text().splitlines() if line.startswith("POST")]


def test_a_store_through_the_proxy_is_on_record_before_it_reaches_the_pacs_and_refused_unrecorded(tmp_path,
                                                                                                  tiny_weights):
    """A POST through the PACS proxy (STOW-RS, patient data stored into the PACS) wrote no audit entry. It is now a
    ``dicomweb_storing`` entry (who, the studies and series of the body's DICOM files, how many) written before it
    is forwarded, then ``dicomweb_stored`` with the PACS's status; with the log unwritable it is refused, 503, and
    nothing reaches the real Orthanc (its own request log shows no POST, it holds no instance). One file holds a 2
    MiB private element before its UIDs and the boundary parameter is spelled ``Boundary=``: the entry still names
    the series and its 3 instances (it named none). A body with a part sent as DICOM that is none is refused, 422
    naming the part, and nothing reaches Orthanc either (it was forwarded, that part not on record)."""
    import requests

    from lib.audit import AuditLog
    from test_dicom_proxy import STOW_BODY, stow_body, with_large_private_element

    files = real_ct_series(tmp_path / "ct")
    first = pydicom.dcmread(files[0])
    with_large_private_element(files[1], files[1])
    body = stow_body(files)
    headers = {"Content-Type": 'multipart/related; type="application/dicom"; Boundary=BOUNDARY',
               "Accept": "application/dicom+json"}
    with _proxy_of_orthanc_logging_requests(tmp_path, tiny_weights) as (pacs, requests_log, server, audit_dir):
        with _unwritable_audit_log(audit_dir):
            refused = requests.post(f"{server.url}/proxy/dicom/stow/studies", data=body, headers=headers,
                                    timeout=120)
        assert refused.status_code == 503, (refused.status_code, refused.text[:300])
        assert "nothing was stored in the PACS: the audit log could not be written" in refused.json()["detail"]
        assert _posts(requests_log) == []
        assert pacs.get("/instances") == []
        bad = body.replace(b"--BOUNDARY--\r\n", b"") + STOW_BODY  # the 4th part is no DICOM file
        refused = requests.post(f"{server.url}/proxy/dicom/stow/studies", data=bad, headers=headers, timeout=120)
        assert refused.status_code == 422, (refused.status_code, refused.text[:300])
        assert "part 4 of the body (sent as application/dicom) is no DICOM file" in refused.json()["detail"]
        assert _posts(requests_log) == []
        assert pacs.get("/instances") == []
        stored = requests.post(f"{server.url}/proxy/dicom/stow/studies", data=body, headers=headers, timeout=120)
        assert stored.status_code == 200, (stored.status_code, stored.text[:300])
        assert len(pacs.get("/instances")) == 3
    audit = AuditLog(audit_dir)
    assert audit.verify().ok
    [storing] = audit.entries("dicomweb_storing")
    [done] = audit.entries("dicomweb_stored")
    fields = storing["fields"]
    assert (fields["study_instance_uids"], fields["series_instance_uids"], fields["instances"]) == (
        [str(first.StudyInstanceUID)], [str(first.SeriesInstanceUID)], 3), fields
    forwarded = stow_body(files, boundary="adl-stow-" + "0" * 32)  # rebuilt under a boundary of that length
    assert fields["path"] == "studies" and fields["bytes"] == len(forwarded) and "parts" not in fields, fields
    assert fields["client"] == "127.0.0.1" and fields["route"] == "POST /proxy/dicom/stow/studies", fields
    assert (done["fields"]["pending_seq"], done["fields"]["status"]) == (storing["seq"], 200)
    assert done["seq"] == storing["seq"] + 1


def test_a_download_or_hand_out_that_cannot_be_recorded_retrieves_nothing_from_the_pacs(tmp_path, tiny_weights):
    """An image download, a final label's download or HEAD (on a PACS a label is a series too) and a review-queue
    hand-out of a PACS series retrieve it from the PACS (into the server's cache) before their audit entry is
    written; with the log unwritable each is refused (503) before that: the real Orthanc gets no WADO-RS retrieval of
    the series (its own request log) and nothing lands in the cache. Once the log is writable the download retrieves
    it."""
    import requests

    pacs, requests_log = start_orthanc_logging_requests(tmp_path)
    try:
        uid = upload_real_ct_series(pacs, tmp_path / "ct")
        audit_dir = tmp_path / "audit"
        server = start_server(pacs.dicomweb, copy_weights(tiny_weights, tmp_path / "model"), tmp_path / "work",
                              conf={"audit_dir": audit_dir})
        cache = tmp_path / "work" / "dicomweb_cache"  # mlserver.start_server's MONAI_LABEL_DICOMWEB_CACHE_PATH

        def retrievals() -> int:  # WADO-RS retrievals of the series: GET .../studies/X/series/<uid>
            return sum(line.startswith("GET ") and line.split("?")[0].rstrip("/").endswith(f"/series/{uid}")
                       for line in requests_log.read_text().splitlines())

        try:
            with _unwritable_audit_log(audit_dir):
                image = requests.get(f"{server.url}/datastore/image", params={"image": uid}, timeout=600)
                assert image.status_code == 503 and "the image was not sent" in image.text, image.text[:300]
                assert retrievals() == 0 and not list(cache.rglob(f"*{uid}*"))
                label = requests.get(f"{server.url}/datastore/label", params={"label": uid, "tag": "final"},
                                     timeout=600)
                assert label.status_code == 503 and "the label was not sent" in label.text, label.text[:300]
                assert retrievals() == 0 and not list(cache.rglob(f"*{uid}*"))
                # HEAD is refused as GET (the stock route took the label as image, retrieved it, recorded nothing)
                for query in ({"label": uid, "tag": "final"}, {"image": uid, "tag": "final"}):
                    label = requests.head(f"{server.url}/datastore/label", params=query, timeout=600)
                    assert label.status_code == 503, (query, label.status_code)
                assert retrievals() == 0 and not list(cache.rglob(f"*{uid}*"))
                handed = requests.post(f"{server.url}/activelearning/next_unreviewed", json={}, timeout=600)
                assert handed.status_code == 503 and "no study was handed out" in handed.text, handed.text[:300]
                assert retrievals() == 0 and not list(cache.rglob(f"*{uid}*"))
            image = requests.get(f"{server.url}/datastore/image", params={"image": uid}, timeout=600)
            assert image.status_code == 200, image.text[:300]
            assert retrievals() == 1 and list(cache.rglob(f"*{uid}*"))
        finally:
            stop_server(server)
    finally:
        stop_orthanc(pacs)


def test_a_store_through_the_proxy_stores_in_the_pacs_only_what_its_entry_names(tmp_path, tiny_weights):
    """The proxy forwarded a store's body and headers as sent, and the real Orthanc reads them otherwise: with
    ``boundary=BOUNDARY; boundary=OTHER`` it reads the last (it stored the MR file of the OTHER parts, the entry
    naming the CT file of the BOUNDARY ones); with a part's second or indented Content-Length it reads past the
    proxy's close delimiter and stores the MR part the proxy took for epilogue (answering 400); a body sent chunked
    was forwarded de-chunked under ``Transfer-Encoding: chunked`` (Orthanc: 400, nothing stored). The repeated
    parameter and header are a 422, nothing reaching Orthanc; a store is forwarded as the proxy rebuilt it from the
    parts on record: the real Orthanc holds the CT series its entry names, not the MR file of its epilogue. A CT
    file holding ``--BOUNDARYX`` at a line's start (in ImageComments) was split there (422): it is stored as it is,
    byte for byte. A delimiter without the CRLF before it (the part before it lost 2 bytes) is a 422 saying the body
    cannot be framed exactly, nothing reaching Orthanc."""
    import urllib.request

    import requests

    from lib.audit import AuditLog
    from test_dicom_proxy import stow_body

    ct, mr = real_ct_series(tmp_path / "ct", 2), real_mr_series(tmp_path / "mr", 1)
    ct_series = str(pydicom.dcmread(ct[0]).SeriesInstanceUID)
    holding = pydicom.dcmread(ct[1])
    holding.ImageComments = "a line that starts as a delimiter:\r\n--BOUNDARYX\r\n"
    holding.save_as(ct[1])
    ct_part = ct[0].read_bytes()
    epilogue = (b"--BOUNDARY\r\nContent-Type: application/dicom\r\n\r\n" + mr[0].read_bytes()
                + b"\r\n--BOUNDARY--\r\n")  # after the close delimiter: no part
    stow_type = 'multipart/related; type="application/dicom"; boundary=BOUNDARY'
    with _proxy_of_orthanc_logging_requests(tmp_path, tiny_weights) as (pacs, requests_log, server, audit_dir):
        def post(body: bytes, content_type: str) -> requests.Response:  # sent chunked (an iterable body)
            return requests.post(f"{server.url}/proxy/dicom/stow/studies", data=iter([body[:64], body[64:]]),
                                 headers={"Content-Type": content_type, "Accept": "application/dicom+json"},
                                 timeout=120)

        twice = post(stow_body(ct) + stow_body(mr, boundary="OTHER"), stow_type + "; boundary=OTHER")
        assert twice.status_code == 422, (twice.status_code, twice.text[:300])
        assert "gives the boundary parameter more than once" in twice.json()["detail"]
        assert pacs.get("/instances") == []
        for second in ("Content-Length", " Content-Length"):
            sized = (f"--BOUNDARY\r\nContent-Type: application/dicom\r\nContent-Length: {len(ct_part)}\r\n"
                     f"{second}: {len(ct_part) + 14}\r\n\r\n").encode() + ct_part + b"\r\n--BOUNDARY--\r\n"
            refused = post(sized + epilogue, stow_type)
            assert refused.status_code == 422, (refused.status_code, refused.text[:300])
            assert "part 1 of the body gives more than one Content-Length header" in refused.json()["detail"]
            assert pacs.get("/instances") == []
        unframed = stow_body(ct).replace(b"\r\n--BOUNDARY\r\n", b"--BOUNDARY\r\n")  # no CRLF before a delimiter
        refused = post(unframed, stow_type)
        assert refused.status_code == 422, (refused.status_code, refused.text[:300])
        assert "the body's parts cannot be framed exactly (RFC 2046): the delimiter --BOUNDARY at byte" in (
            refused.json()["detail"])
        assert _posts(requests_log) == []
        stored = post(stow_body(ct) + epilogue, stow_type)
        assert stored.status_code == 200, (stored.status_code, stored.text[:300])
        held = [pacs.get(f"/series/{one}") for one in pacs.get("/series")]
        assert [(s["MainDicomTags"]["SeriesInstanceUID"], len(s["Instances"])) for s in held] == [(ct_series, 2)]
        files = {}
        for instance in held[0]["Instances"]:
            with urllib.request.urlopen(f"{pacs.url}/instances/{instance}/file", timeout=120) as answer:
                files[pacs.get(f"/instances/{instance}")["MainDicomTags"]["SOPInstanceUID"]] = answer.read()
        assert files == {str(pydicom.dcmread(path).SOPInstanceUID): path.read_bytes() for path in ct}
    audit = AuditLog(audit_dir)
    assert audit.verify().ok
    [storing] = audit.entries("dicomweb_storing")
    assert (storing["fields"]["series_instance_uids"], storing["fields"]["instances"]) == ([ct_series], 2)
    assert [entry["fields"]["status"] for entry in audit.entries("dicomweb_stored")] == [200]


def test_a_confirmed_unk_patient_is_a_series_without_patient_id_not_another_patient():
    """MONAI Label's image info names a series without PatientID "UNK", which the Slicer module confirms with its
    corrections and verdicts; the PACS's search answers no PatientID (""): every correction and verdict of such a
    series, never moved, was a 409 "opened as patient_id 'UNK'". Another patient confirmed is still refused."""
    from lib.pacs_corrections import CorrectionNotServed, _refuse_unconfirmed, confirmed_identity

    current = {"series_instance_uid": "1.3", "study_instance_uid": "1.2", "patient_id": ""}

    def check(patient: str) -> None:
        confirmed = confirmed_identity({"patient_id": patient, "study_instance_uid": "1.2"}, "params")
        _refuse_unconfirmed(object(), "1.3", current, confirmed, "correction", "nothing was saved", "open it again")

    check("UNK")
    with pytest.raises(CorrectionNotServed,
                       match="opened as patient_id 'PAT1'; the PACS lists it under patient_id ''"):
        check("PAT1")
