"""Hostile clients (issue 19): plain HTTP requests against a real MONAI Label server on 127.0.0.1 that try to
write, read or delete files outside the datastore, override the URL's image / session / model, save the model's
own output as training data, send corrupt or lying files, overwrite another study, or leave scratch folders.

Two servers for the module, auth off (``hostile``) and on (``hostile_auth``, an admin's token); tests reach them
only through the ``api`` fixture (the server, its base URL and the headers to send), parametrised by
:data:`SERVERS`, so every hostile request is tried against both.
Every test checks afterwards (``untouched``) that nothing outside the datastore changed: a canary folder next to
the studies folder (a victim study, a planted session ``meta.info``), the server's model folder, the server's
temporary folder (no leaked uploads), and that the server still answers.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import requests
import SimpleITK as sitk

from conftest import SAMPLE_STUDIES
from lib.audit import AuditLog
from mlserver import Server, copy_weights, shared_studies, start_server, stop_server, write_crop

pytestmark = [pytest.mark.server]

STUDY = "ct_slab_b"  # a 4-slice CT slab of the shared studies
TIMEOUT = 300  # seconds per request: generous, a 2-core machine trains a model next to these tests


@dataclass
class Api:
    """The server under test (``server``: its folders and process), where the requests go and what they carry
    (``headers``: none with auth off; a bearer token with auth on)."""
    server: Server
    base_url: str
    headers: dict = field(default_factory=dict)

    def call(self, method: str, path: str, **kwargs) -> requests.Response:
        headers = dict(self.headers, **kwargs.pop("headers", {}))
        return requests.request(method, self.base_url + path, headers=headers, timeout=TIMEOUT, **kwargs)


# ------------------------------------------------------------------------------------------------ fixtures
def _hostile_server(root: Path, tiny_weights: Path, env: dict | None = None) -> Server:
    """A server of this module: shared studies, no ``max_voxels`` conf (the default limit, 1e9 voxels, so that a
    lying header is refused by the declared-size check, not by the voxel limit); ``root/canary`` next to
    ``root/studies`` holds what an attacker aims at."""
    studies = shared_studies(root / "studies")
    canary = root / "canary"
    (canary / "session_dir").mkdir(parents=True)
    shutil.copy(studies / f"{STUDY}.nii.gz", canary / "victim.nii.gz")
    (canary / "notes.txt").write_text("not for the server")
    # a session meta.info planted outside the session store: an infer with session_id=<this folder> used to
    # find it, see its image missing and delete the whole folder
    (canary / "session_dir" / "meta.info").write_text(json.dumps({"name": "x", "path": str(canary / "session_dir"),
                                                                  "image": str(canary / "gone.nii.gz"),
                                                                  "meta": {}, "create_ts": 0, "last_access_ts": 0,
                                                                  "expiry": 3600}))
    server = start_server(studies, copy_weights(tiny_weights, root / "model"), root / "work", env=env)
    server.canary = canary
    return server


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, tiny_weights) -> Server:
    """Auth off (the loopback demo)."""
    server = _hostile_server(tmp_path_factory.mktemp("hostile"), tiny_weights)
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def hostile_auth(tmp_path_factory, tiny_weights):
    """MONAI Label's authentication on, against a realm stood up on loopback (``realm.py``); the requests carry
    an admin's token, so that every check below is the content check, not the role check."""
    from realm import USER_OF_ROLE, Realm

    realm = Realm()
    try:
        # MONAI Label's infer thread pool too (off by default): an infer that times out answers before its result
        server = _hostile_server(tmp_path_factory.mktemp("hostile_auth"), tiny_weights,
                                 env={"MONAI_LABEL_AUTH_ENABLE": "true", "MONAI_LABEL_AUTH_REALM_URI": realm.url,
                                      "MONAI_LABEL_INFER_CONCURRENCY": "1"})
        server.token = realm.token(USER_OF_ROLE["admin"])
        yield server
        stop_server(server)
    finally:
        realm.stop()


# param -> the server fixture of that variant
SERVERS = {"auth_off": "hostile", "auth_on": "hostile_auth"}


@pytest.fixture(scope="module", params=sorted(SERVERS))
def api(request) -> Api:
    """The server under test with its base URL and headers; every test reaches the server only through this."""
    server = request.getfixturevalue(SERVERS[request.param])
    token = getattr(server, "token", None)
    return Api(server, server.url, {"Authorization": f"Bearer {token}"} if token else {})


def _tree(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, tuple[int, str]]:
    """{relative path: (mtime ns, sha256)} of every file under ``folder`` (folders as ``(0, "dir")``)."""
    state: dict[str, tuple[int, str]] = {}
    if not folder.exists():
        return state
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder).as_posix()
        if relative.split("/")[0] in skip:
            continue
        if path.is_dir():
            state[relative + "/"] = (0, "dir")
        else:
            state[relative] = (path.stat().st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
    return state


def _outside_state(server: Server, model_skip: tuple[str, ...] = ()) -> dict:
    root = server.studies.parent
    return {"canary": _tree(server.canary),
            "root": sorted(p.name for p in root.iterdir()),
            "model": _tree(server.model_dir, model_skip)}


def _tmp_files(server: Server) -> set[str]:
    # torch's own compile cache (torchinductor_<user>), made in TMPDIR when a training run first builds its
    # optimizer, is no upload
    return {p.name for p in (server.log_path.parent / "tmp").iterdir() if not p.name.startswith("torchinductor_")}


def _settled_tmp(server: Server, expected: set[str], wait: float = 20.0) -> set[str]:
    """The server's temporary folder once background removals ran (they run after the answer is sent)."""
    deadline = time.monotonic() + wait
    while True:
        now = _tmp_files(server)
        if now <= expected or time.monotonic() > deadline:
            return now
        time.sleep(0.25)


@pytest.fixture()
def untouched(api):
    """Nothing outside the datastore changes during the test: canary, model folder (scratch ``work`` and the
    status files ``train_stats`` excepted: training tests check those themselves), no file left in the server's
    TMPDIR; and the server still answers."""
    hostile = api.server
    skip = ("work", "train_stats")
    before, tmp_before = _outside_state(hostile, skip), _tmp_files(hostile)
    yield
    assert _outside_state(hostile, skip) == before
    assert _settled_tmp(hostile, tmp_before) <= tmp_before, "uploads left behind in the server's TMPDIR"
    assert hostile.alive(), hostile.log_tail()
    assert api.call("GET", "/info/").status_code == 200


def _study_bytes(server: Server, image_id: str = STUDY) -> bytes:
    return (server.studies / f"{image_id}.nii.gz").read_bytes()


def _refused(response: requests.Response, status: int, *words: str) -> str:
    assert response.status_code == status, (response.status_code, response.text[:500])
    detail = response.json().get("detail")
    assert isinstance(detail, str), response.text[:500]
    for word in words:
        assert word.lower() in detail.lower(), (word, detail)
    return detail


def _labels(api: Api, image_id: str) -> dict:
    return api.call("GET", "/datastore/", params={"output": "all"}).json()["objects"][image_id]["labels"]


def _wait_labels(api: Api, image_id: str, present: set[str], absent: set[str] = frozenset(), wait: float = 60.0):
    """The datastore sees label files through its file watcher: wait until ``present`` are listed, ``absent`` not."""
    deadline = time.monotonic() + wait
    while True:
        labels = _labels(api, image_id)
        if present <= set(labels) and not (absent & set(labels)):
            return labels
        assert time.monotonic() < deadline, labels
        time.sleep(0.25)


def _remove_labels(api: Api, image_id: str, tags=("final", "regions", "original")) -> None:
    for tag in tags:
        api.call("DELETE", "/datastore/label", params={"id": image_id, "tag": tag})
    _wait_labels(api, image_id, set(), set(tags))


def _correction(server: Server, image_id: str, folder: Path, offset: float = 0.0) -> Path:
    """A float correction of ``image_id`` on its grid (the study itself, shifted by ``offset`` HU)."""
    image = sitk.Cast(sitk.ReadImage(str(server.studies / f"{image_id}.nii.gz")), sitk.sitkFloat32)
    path = folder / f"{image_id}_final_{offset:g}.nii.gz"
    sitk.WriteImage(image + offset, str(path))
    return path


# ------------------------------------------------------------------------------------------------ 1. plain names
def _bad_names(canary: Path) -> dict[str, str]:
    """A bad name -> a word of the reason the server must give."""
    return {"../canary/victim": "path separator", str(canary / "victim"): "path separator", "..": "'..'",
            "a..b": "'..'", ".hidden": "dot", "ct\\slab": "path separator", "ct\x00slab": "NUL",
            "x" * 300: "characters long", "C:victim": "absolute", "na me": "not allowed"}


def _name_routes(api: Api, study: bytes, bad: str) -> list[tuple[str, requests.Response]]:
    """(parameter, answer) of every route that takes an image id, label tag or session id, given ``bad``."""
    upload = {"file": ("upload.nii.gz", study)}
    label = {"label": ("label.nii.gz", study)}
    calls = [
        ("image", "PUT", "/datastore/image", dict(params={"image": bad}, files=upload)),
        ("image", "PUT", "/datastore/", dict(params={"image": bad}, files=upload)),
        ("id", "DELETE", "/datastore/image", dict(params={"id": bad})),
        ("id", "DELETE", "/datastore/", dict(params={"id": bad})),
        ("image", "GET", "/datastore/image", dict(params={"image": bad})),
        ("image", "HEAD", "/datastore/image", dict(params={"image": bad})),
        ("image", "GET", "/datastore/image/info", dict(params={"image": bad})),
        ("image", "PUT", "/datastore/image/info", dict(params={"image": bad}, data={"info": "{}"})),
        ("image", "PUT", "/datastore/label", dict(params={"image": bad, "tag": "final"}, files=label)),
        ("tag", "PUT", "/datastore/label", dict(params={"image": STUDY, "tag": bad}, files=label)),
        ("id", "DELETE", "/datastore/label", dict(params={"id": bad, "tag": "final"})),
        ("tag", "DELETE", "/datastore/label", dict(params={"id": STUDY, "tag": bad})),
        ("label", "GET", "/datastore/label", dict(params={"label": bad, "tag": "final"})),
        ("tag", "GET", "/datastore/label", dict(params={"label": STUDY, "tag": bad})),
        ("tag", "HEAD", "/datastore/label", dict(params={"image": STUDY, "tag": bad})),
        ("label", "GET", "/datastore/label/info", dict(params={"label": bad, "tag": "final"})),
        ("tag", "PUT", "/datastore/label/info", dict(params={"label": STUDY, "tag": bad}, data={"info": "{}"})),
        ("tag", "PUT", "/datastore/updatelabelinfo", dict(params={"label": STUDY, "tag": bad}, data={"params": "{}"})),
        ("image", "POST", "/infer/adl", dict(params={"image": bad}, data={"params": "{}"})),
        ("session_id", "POST", "/infer/adl", dict(params={"session_id": bad}, data={"params": "{}"})),
    ]
    return [(parameter, api.call(method, path, **kwargs)) for parameter, method, path, kwargs in calls]


def test_ids_tags_and_session_ids_must_be_plain_names(api, untouched):
    hostile = api.server
    study = _study_bytes(hostile)
    for bad, why in _bad_names(hostile.canary).items():
        for parameter, response in _name_routes(api, study, bad):
            where = (parameter, bad[:40], response.request.method, response.request.path_url[:80])
            assert response.status_code == 422, (where, response.status_code, response.text[:300])
            if response.request.method != "HEAD":  # HEAD answers carry no body
                detail = response.json()["detail"]
                assert detail.startswith(parameter + " ") and why in detail, (where, detail)
    # session ids in the URL path: '..' would be the session store's parent folder
    for bad in ("..", ".hidden"):
        for method in ("GET", "DELETE"):
            response = api.call(method, f"/session/{bad.replace('.', '%2E')}")
            assert response.status_code == 422 and "session_id" in response.json()["detail"], response.text
    # the planted session folder outside the store survives an infer naming it (checked by ``untouched`` too)
    response = api.call("POST", "/infer/adl", params={"session_id": str(hostile.canary / "session_dir")})
    _refused(response, 422, "session_id", "path separator")
    assert (hostile.canary / "session_dir" / "meta.info").is_file()
    # nothing was added to the datastore under any of these names
    stored = set(api.call("GET", "/datastore/", params={"output": "all"}).json()["objects"])
    assert {"ct_slab_b", "ct_slab_c", "ct_slice_a", "mr_slab_d"} <= stored
    assert not [name for name in stored if any(c in name for c in "/\\\x00:") or ".." in name or name[0] == "."]
    # a plain name still works end to end
    assert api.call("GET", "/datastore/image", params={"image": STUDY}).content == study
    assert api.call("HEAD", "/datastore/image", params={"image": STUDY}).status_code == 200


def test_archive_sessions_are_refused_and_plain_ones_work(api, untouched):
    hostile = api.server
    study = _study_bytes(hostile)
    response = api.call("PUT", "/session/", params={"uncompress": "true"},
                        files={"files": ("study.nii.gz", study)})
    _refused(response, 422, "uncompress")
    created = api.call("PUT", "/session/", files={"files": ("study.nii.gz", study)})
    assert created.status_code == 200, created.text
    session_id = created.json()["session_id"]
    response = api.call("POST", "/infer/nlm", params={"session_id": session_id, "output": "json"})
    assert response.status_code == 200 and response.json()["modality"] == "CT", response.text[:300]
    assert api.call("DELETE", f"/session/{session_id}").status_code == 200
    # a volume named meta.info (the session store's own info file, in the same folder) overwrote the volume: its
    # image download sent the info, the server's folders in it. Files without names, or named alike, were one file
    store = hostile.log_path.parent / "sessions"
    created = api.call("PUT", "/session/", files={"files": ("meta.info", study)})
    assert created.status_code == 200, created.text
    session_id = created.json()["session_id"]
    assert created.json()["session_info"]["image"] != "meta.info", created.text
    image = api.call("GET", f"/session/{session_id}", params={"image": "true"})
    assert image.status_code == 200 and image.content == study, image.content[:200]
    assert api.call("DELETE", f"/session/{session_id}").status_code == 200
    for names in (("", ""), ("slice.dcm", "slice.dcm"), ("slice.dcm", "upload_2.dcm", "slice.dcm")):
        body = b"".join(b'--B\r\nContent-Disposition: form-data; name="files"; filename="' + name.encode()
                        + f'"\r\n\r\npart {n}\r\n'.encode() for n, name in enumerate(names)) + b"--B--\r\n"
        created = api.call("PUT", "/session/", data=body,
                           headers={"Content-Type": "multipart/form-data; boundary=B"})
        assert created.status_code == 200, (names, created.text)
        session_id = created.json()["session_id"]
        folder = store / session_id / created.json()["session_info"]["image"]
        assert sorted(p.read_bytes() for p in folder.iterdir()) == [f"part {n}".encode() for n in range(len(names))]
        assert api.call("DELETE", f"/session/{session_id}").status_code == 200
    response = api.call("PUT", "/session/", files={"files": ("a\x00b.nii.gz", study)})
    _refused(response, 422, "file name", "not valid")
    # a session that fails leaves nothing in the server's TMPDIR (MONAI Label's route left its upload folder there,
    # the volume in it) nor in the session store: a file name the disk cannot take, a session store that cannot
    # be written (a file where its folder is)
    temp_before = _tmp_files(hostile)
    stored_before = sorted(p.name for p in store.iterdir())
    response = api.call("PUT", "/session/", files={"files": ("s" * 300 + ".nii.gz", study)})
    _refused(response, 422, "file name", "too long")
    assert _settled_tmp(hostile, temp_before) == temp_before
    store.rename(store.with_name("sessions_away"))
    try:
        store.write_text("not a folder")
        response = api.call("PUT", "/session/", files={"files": ("study.nii.gz", study)})
        _refused(response, 500, "the session was not created", "nothing of it was kept")
        assert _settled_tmp(hostile, temp_before) == temp_before
    finally:
        store.unlink(missing_ok=True)
        store.with_name("sessions_away").rename(store)
    temp = hostile.log_path.parent / "tmp"  # a TMPDIR the upload cannot be put in (a file where its folder is)
    temp.rename(temp.with_name("tmp_away"))
    try:
        temp.write_text("not a folder")  # a small upload: one over 1 MiB is spooled to TMPDIR before the route
        response = api.call("PUT", "/session/", files={"files": ("study.nii.gz", b"small")})
        _refused(response, 500, "the session was not created", "nothing of it was kept")
    finally:
        temp.unlink(missing_ok=True)
        temp.with_name("tmp_away").rename(temp)
    assert sorted(p.name for p in store.iterdir()) == stored_before


def test_the_servers_temp_folder_holds_no_logging_configuration(api):
    """MONAI Label writes its logging configuration (``tmp*.json``) into the server's TMPDIR at every start: the
    app deletes it once read."""
    assert not [name for name in _tmp_files(api.server) if name.endswith(".json")], _tmp_files(api.server)


def test_an_infer_that_times_out_is_a_504_and_its_late_result_is_deleted(api, untouched):
    """With MONAI Label's infer thread pool (``MONAI_LABEL_INFER_CONCURRENCY`` >= 1; the auth-on server), an infer
    that outlasts its timeout is answered while it goes on: a 504 saying so (it was a bare 500), and its result, a
    patient's volume, deleted when it comes (it stayed in the server's TMPDIR). One that timed out while queued
    behind another is cancelled: it ran all the same, for nobody."""
    hostile = api.server
    if not getattr(hostile, "token", None):
        pytest.skip("the auth-off server has no infer thread pool")
    before = _tmp_files(hostile)
    deleted_before = hostile.log_tail(10**7).count("result of an infer that was not sent deleted")
    # the pool runs one task at a time: the ones sent while the first runs wait in its queue; each that timed out
    # there is cancelled (all of them ran, one after the other, for nobody). The first one usually runs (its late
    # result deleted), but the idle worker may not have taken it within 0.001 s: then it is cancelled too.
    sent = [api.call("POST", "/infer/nlm", params={"image": STUDY, "output": "image"},
                     data={"params": json.dumps({"timeout": 0.001})}) for _ in range(4)]
    details = [_refused(r, 504, "not denoised within the timeout of 0.001 s") for r in sent]
    assert all("deleted" in d or "the denoising had not started" in d for d in details), details
    cancelled = sum("the denoising had not started" in d for d in details)
    assert cancelled >= 1, details
    # one task at a time: once the next infer is answered, the one that timed out has ended
    response = api.call("POST", "/infer/nlm", params={"image": STUDY, "output": "json"}, data={"params": "{}"})
    assert response.status_code == 200, response.text[:300]
    assert _settled_tmp(hostile, before) <= before
    # only the denoisings that ran had a result to delete
    deleted = hostile.log_tail(10**7).count("result of an infer that was not sent deleted") - deleted_before
    assert deleted == 4 - cancelled, (deleted, cancelled)



def test_a_timeout_error_of_the_denoising_itself_is_no_timed_out_wait():
    """The infer pool's task tells a wait that timed out (the 504 of :meth:`DenoisingApp.infer`, the task cancelled
    or its late result deleted) from a ``TimeoutError`` the denoising raised itself (the same class since Python
    3.11): that one is the request's failure as it is, not "not denoised within the timeout"."""
    import concurrent.futures
    import threading

    from conftest import import_app_main

    main = import_app_main()
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as executor:
        pool = main._InferPool(executor)

        def fails() -> None:
            raise TimeoutError("the denoising's own")

        task = pool.submit(fails)
        with pytest.raises(TimeoutError, match="the denoising's own"):
            task.result(60)
        assert not task.wait_timed_out and pool.take_submitted() is task
        release = threading.Event()
        running = pool.submit(release.wait, 60)
        queued = pool.submit(lambda: ("result", {}))
        with pytest.raises(TimeoutError):
            queued.result(0.01)
        assert queued.wait_timed_out and queued.future.cancel()  # queued behind the running one: never runs
        release.set()
        assert running.result(60) is True and not running.wait_timed_out

# ------------------------------------------------------------------------------------------------ 2. URL decides
def test_params_cannot_pick_another_image_session_or_model(api, untouched):
    hostile = api.server
    victim = str(hostile.canary / "victim.nii.gz")
    folder = str(hostile.canary)
    cases = {"image": victim, "image_path": victim, "session_id": "x", "session": {"image": victim},
             "model": "adl", "model_filename": victim, "model_path": victim, "path": victim, "file": victim,
             "label": victim}
    for key, value in cases.items():
        response = api.call("POST", "/infer/nlm", params={"image": STUDY, "output": "json"},
                            data={"params": json.dumps({key: value})})
        _refused(response, 422, f"params.{key}", "URL")
    # a folder: refused without its listing in the answer
    response = api.call("POST", "/infer/adl", params={"image": STUDY}, data={"params": json.dumps({"image": folder})})
    detail = _refused(response, 422, "params.image")
    assert not any(name in detail for name in ("victim", "notes.txt", "session_dir"))
    # an uploaded file with params.image = another file: refused (the upload is not left behind: ``untouched``)
    response = api.call("POST", "/infer/adl", data={"params": json.dumps({"image": victim})},
                        files={"file": ("mine.nii.gz", _study_bytes(hostile))})
    _refused(response, 422, "params.image")
    # the URL's model is the one that runs; a device override is fine
    response = api.call("POST", "/infer/nlm", params={"image": STUDY, "output": "json"},
                        data={"params": json.dumps({"device": "cpu"})})
    assert response.status_code == 200 and response.json()["model"] == "nlm", response.text[:300]


def test_whole_slide_infer_routes_are_refused_and_read_or_write_nothing(api, untouched):
    """MONAI Label's /infer/wsi and /infer/wsi_v2 take ``?image=`` as any path the server can read and save
    labels from ``params`` under any tag: this app has no whole-slide model, so both answer 404 to everyone."""
    hostile = api.server
    victim = str(hostile.canary / "victim.nii.gz")
    wsi = {"params": {"result_extension": ".nii.gz", "result_dtype": "float32", "modality": "ct", "device": "cpu"}}
    saving = {"params": dict(wsi["params"], save_label=True, label_tag="../../canary/pwn")}
    for image, body in ((victim, wsi), (STUDY, saving), (STUDY, wsi)):
        answers = [api.call("POST", "/infer/wsi/adl", params={"image": image, "output": "json"}, json=body),
                   api.call("POST", "/infer/wsi_v2/adl", params={"image": image, "output": "json"},
                            data={"wsi": json.dumps(body)})]
        for response in answers:
            _refused(response, 404, "no whole-slide", "/infer/adl")
    assert _labels(api, STUDY) == {}  # nothing saved (and ``untouched``: nothing written outside)


# ------------------------------------------------------------------------------------------------ 3. training data
def test_label_routes_on_a_label_that_does_not_exist_are_404_and_leave_no_record(api, untouched):
    """The label-info updates answered 500 for a label that does not exist (after writing an audit entry), and
    a label removal answered 200, recorded in the audit log as the removal of a label that never was."""
    audit = AuditLog(api.server.studies / ".audit")
    before = len(audit.entries())
    for method, path, extra in (("PUT", "/datastore/label/info", {"data": {"info": '{"note": "x"}'}}),
                                ("PUT", "/datastore/updatelabelinfo", {"data": {"params": '{"note": "x"}'}}),
                                ("DELETE", "/datastore/label", {})):
        key = "id" if method == "DELETE" else "label"
        response = api.call(method, path, params={key: STUDY, "tag": "never_saved"}, **extra)
        _refused(response, 404, STUDY, "never_saved")
    assert len(audit.entries()) == before
    assert "never_saved" not in _labels(api, STUDY)


def test_infer_cannot_save_labels_and_only_stamped_corrections_are_training_data(api, untouched, tmp_path):
    hostile = api.server
    for params in ({"save_label": True}, {"save_label": "true", "label_tag": "final"}, {"label_tag": "../../x"}):
        response = api.call("POST", "/infer/nlm", params={"image": STUDY}, data={"params": json.dumps(params)})
        _refused(response, 422, "not accepted", "PUT /datastore/label")
    assert _labels(api, STUDY) == {}
    # a correction saved through the label route is stamped by the server, whatever the client claims
    forged = {"correction": False, "saved_by": "mallory", "sha256": "0" * 64, "user": "mallory", "note": "kept"}
    correction = _correction(hostile, STUDY, tmp_path, 5.0)
    saved = api.call("PUT", "/datastore/label", params={"image": STUDY, "tag": "final"},
                     data={"params": json.dumps(forged)}, files={"label": (correction.name, correction.read_bytes())})
    assert saved.status_code == 200, saved.text
    info = api.call("GET", "/datastore/label/info", params={"label": STUDY, "tag": "final"}).json()
    assert info["correction"] is True and info["saved_by"] != "mallory" and info["note"] == "kept"
    assert info.get("user") != "mallory"  # the token's user (auth on) or none: never the body's
    assert info["sha256"] == hashlib.sha256(correction.read_bytes()).hexdigest()
    # ... and the stamp cannot be forged or changed through the label-info routes
    for path, field_name in (("/datastore/label/info", "info"), ("/datastore/updatelabelinfo", "params")):
        for key in ("correction", "saved_by", "sha256"):
            response = api.call("PUT", path, params={"label": STUDY, "tag": "final"},
                                data={field_name: json.dumps({key: "x"})})
            _refused(response, 422, key, "stamps corrections")
    # a 'final' label that did not come through the route (the model's output written by another path) is
    # not training data: one stamped correction + one unstamped label = only 1 corrected study
    output = api.call("POST", "/infer/adl", params={"image": "ct_slab_c", "output": "image"})
    assert output.status_code == 200
    planted = hostile.studies / "labels" / "final" / "ct_slab_c.nii.gz"
    planted.write_bytes(output.content)
    try:
        _wait_labels(api, "ct_slab_c", {"final"})
        response = api.call("POST", "/train/adl", json={"steps": 2, "device": "cpu"})
        _refused(response, 422, "only 1 corrected")
        # a stamped correction whose file was changed behind the server's back is no longer one
        stamped = hostile.studies / "labels" / "final" / f"{STUDY}.nii.gz"
        stamped.write_bytes(output.content)
        response = api.call("POST", "/train/adl", json={"steps": 2, "device": "cpu"})
        _refused(response, 422, "no corrected studies", "not saved as corrections")
    finally:
        _remove_labels(api, "ct_slab_c")
        _remove_labels(api, STUDY)


def _on_other_grid(server: Server, image_id: str, folder: Path, how: str) -> Path:
    """A correction of ``image_id`` (the study + 5 HU) with its grid changed: ``shifted`` (origin + 100 mm),
    ``coarse`` (double spacing), or ``reversed`` (the same voxel centres, slice order reversed, as a tool that keeps
    the index-to-RAS matrix right-handed saves a left-handed grid)."""
    image = sitk.Cast(sitk.ReadImage(str(server.studies / f"{image_id}.nii.gz")), sitk.sitkFloat32) + 5.0
    if how == "shifted":
        image.SetOrigin([v + 100.0 for v in image.GetOrigin()])
    elif how == "coarse":
        image.SetSpacing([2 * v for v in image.GetSpacing()])
    else:
        array = sitk.GetArrayFromImage(image)[::-1]
        direction = np.array(image.GetDirection()).reshape(3, 3)
        origin = np.array(image.GetOrigin()) + direction[:, 2] * image.GetSpacing()[2] * (array.shape[0] - 1)
        direction[:, 2] *= -1
        reversed_image = sitk.GetImageFromArray(np.ascontiguousarray(array))
        reversed_image.SetSpacing(image.GetSpacing())
        reversed_image.SetOrigin(tuple(origin))
        reversed_image.SetDirection(tuple(direction.ravel()))
        image = reversed_image
    path = folder / f"{image_id}_final_{how}.nii.gz"
    sitk.WriteImage(image, str(path))
    return path


def test_a_correction_on_another_grid_is_refused_or_put_on_the_images_grid(api, untouched, tmp_path):
    """Same voxel count, other place or spacing: 422 (training would pair it voxel by voxel with other anatomy).
    Same voxel centres in another index order: stored on the image's grid, voxels reordered."""
    hostile = api.server
    try:
        for how in ("shifted", "coarse"):
            path = _on_other_grid(hostile, STUDY, tmp_path, how)
            response = api.call("PUT", "/datastore/label", params={"image": STUDY, "tag": "final"},
                                files={"label": (path.name, path.read_bytes())})
            _refused(response, 422, "not on its grid", "origin")
        assert _labels(api, STUDY) == {}
        path = _on_other_grid(hostile, STUDY, tmp_path, "reversed")
        response = api.call("PUT", "/datastore/label", params={"image": STUDY, "tag": "final"},
                            files={"label": (path.name, path.read_bytes())})
        assert response.status_code == 200, response.text[:300]
        _wait_labels(api, STUDY, {"final"})
        stored = sitk.ReadImage(str(hostile.studies / "labels" / "final" / f"{STUDY}.nii.gz"))
        study = sitk.ReadImage(str(hostile.studies / f"{STUDY}.nii.gz"))
        np.testing.assert_allclose(stored.GetOrigin(), study.GetOrigin(), atol=1e-3)
        np.testing.assert_allclose(stored.GetDirection(), study.GetDirection(), atol=1e-6)
        np.testing.assert_allclose(sitk.GetArrayFromImage(stored), sitk.GetArrayFromImage(study) + 5.0, atol=1e-3)
    finally:
        _remove_labels(api, STUDY)


def test_a_segmentation_or_an_8_bit_export_saved_as_final_is_no_correction(api, untouched, tmp_path):
    """MONAI Label's own clients save their label maps under ``final``: a body mask (0/1) of the study, or the study
    squeezed to 8 bits, was stamped as a clinician's correction and trained on as target intensities (CT from HU to
    0/1). Refused with 422 saying why; the study's own values (shifted 5 HU) pass."""
    hostile = api.server
    study = sitk.ReadImage(str(hostile.studies / f"{STUDY}.nii.gz"))
    array = sitk.GetArrayFromImage(study).astype(np.float32)
    try:
        for name, values, words in (
                ("mask", (array > -500).astype(np.uint8), ("distinct values", "segmentation")),
                ("8bit", np.round((array - array.min()) / np.ptp(array) * 255).astype(np.uint8), ("other units",))):
            image = sitk.GetImageFromArray(values)
            image.CopyInformation(study)
            path = tmp_path / f"{STUDY}_{name}.nii.gz"
            sitk.WriteImage(image, str(path))
            response = api.call("PUT", "/datastore/label", params={"image": STUDY, "tag": "final"},
                                files={"label": (path.name, path.read_bytes())})
            _refused(response, 422, "does not hold that image's values", *words)
        assert _labels(api, STUDY) == {}
        correction = _correction(hostile, STUDY, tmp_path, 5.0)
        saved = api.call("PUT", "/datastore/label", params={"image": STUDY, "tag": "final"},
                         files={"label": (correction.name, correction.read_bytes())})
        assert saved.status_code == 200, saved.text[:300]
    finally:
        _remove_labels(api, STUDY)


def test_a_correction_is_no_training_data_once_its_image_is_replaced_on_disk(api, untouched, tmp_path):
    """The stamp names the image file it corrects: another volume of the same size put under the id (an export
    job, a restore) leaves the old correction behind, which training must not pair with the new voxels."""
    hostile = api.server
    victim = "ct_slab_c"
    original = (hostile.studies / f"{victim}.nii.gz").read_bytes()
    correction = _correction(hostile, victim, tmp_path, 5.0)
    saved = api.call("PUT", "/datastore/label", params={"image": victim, "tag": "final"},
                     files={"label": (correction.name, correction.read_bytes())})
    assert saved.status_code == 200, saved.text
    try:
        info = api.call("GET", "/datastore/label/info", params={"label": victim, "tag": "final"}).json()
        assert info["image_sha256"] == hashlib.sha256(original).hexdigest()
        other = sitk.ReadImage(str(hostile.studies / f"{victim}.nii.gz")) * 0 + 40  # same grid, other voxels
        sitk.WriteImage(sitk.Cast(other, sitk.sitkInt16), str(hostile.studies / f"{victim}.nii.gz"))
        response = api.call("POST", "/train/adl", json={"steps": 2, "device": "cpu"})
        _refused(response, 422, "no corrected studies")
    finally:
        (hostile.studies / f"{victim}.nii.gz").write_bytes(original)
        _remove_labels(api, victim)


# ------------------------------------------------------------------------------------------------ 4. corrupt input
def _nifti_header(shape: tuple[int, ...], dtype=np.int16) -> bytes:
    import nibabel

    header = nibabel.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    return header.binaryblock + b"\0" * 4  # 348-byte header + the 4-byte extension flag, no voxels


def _server_memory_kib(server: Server) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{server.process.pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


def test_corrupt_and_lying_files_are_422_before_any_voxel_is_read(api, untouched):
    hostile = api.server
    study = _study_bytes(hostile)
    truncated = study[: len(study) * 2 // 3]  # the gzip stream cut: ITK used to fill the missing slices with 0
    lying_gz = gzip.compress(_nifti_header((1000, 1000, 250)))  # 2.5e8 voxels declared in ~60 bytes
    assert len(lying_gz) < 100
    lying_nii = _nifti_header((1000, 1000, 250))
    lying_nrrd = (b"NRRD0004\ntype: short\ndimension: 3\nsizes: 1000 1000 250\nencoding: raw\nendian: little\n"
                  b"spacings: 1 1 1\n\n" + b"\0" * 64)
    memory_before = _server_memory_kib(hostile)
    files = {"truncated.nii.gz": (truncated, "truncated or corrupt"), "lying.nii.gz": (lying_gz, "declares"),
             "lying.nii": (lying_nii, "declares"), "lying.nrrd": (lying_nrrd, "declares")}
    for name, (content, words) in files.items():
        response = api.call("POST", "/infer/adl", files={"file": (name, content)})
        _refused(response, 422, words)
        response = api.call("PUT", "/datastore/image", params={"image": "corrupt_upload"},
                            files={"file": (name, content)})
        _refused(response, 422, words)
        response = api.call("PUT", "/datastore/label", params={"image": STUDY, "tag": "final"},
                            files={"label": (name, content)})
        _refused(response, 422, words)
    # refused from the header: no 2.5e8-voxel buffer (0.5 GB as int16, 1 GB as float32) was allocated
    grown_mib = (_server_memory_kib(hostile)["VmHWM"] - memory_before["VmHWM"]) / 1024
    assert grown_mib < 200, f"the server's peak memory grew by {grown_mib:.0f} MiB"
    assert "corrupt_upload" not in api.call("GET", "/datastore/", params={"output": "all"}).json()["objects"]
    assert _labels(api, STUDY) == {}
    # params that are JSON but not an object, and a store_to_pacs that is not a boolean: 422 with the reason
    for params, words in (("[1,2]", "got list"), ("5", "got int"), ("null", "got null"), ('"x"', "got str"),
                          ("{not json", "not JSON")):
        response = api.call("POST", "/infer/nlm", params={"image": STUDY}, data={"params": params})
        _refused(response, 422, "params", words)
    # a word the guard takes is read as the same boolean by the infer (one parser; " T " was a 500 there): true, so
    # refused on this datastore of files
    response = api.call("POST", "/infer/nlm", params={"image": STUDY},
                        data={"params": json.dumps({"store_to_pacs": " T "})})
    _refused(response, 422, "store_to_pacs needs a study of a DICOMweb datastore")
    response = api.call("POST", "/infer/nlm", params={"image": STUDY},
                        data={"params": json.dumps({"store_to_pacs": "maybe"})})
    _refused(response, 422, "params.store_to_pacs", "true or false", "y, yes, t, true, on, 1 / n, no, f, false, off, 0")
    response = api.call("PUT", "/datastore/image", params={"image": "x"}, data={"params": "[1]"},
                        files={"file": ("x.nii.gz", study)})
    _refused(response, 422, "params must be a JSON object")
    response = api.call("PUT", "/datastore/image", params={"image": "x"}, files={"file": ("x.txt", study)})
    _refused(response, 422, "file", ".nii.gz")


# ------------------------------------------------------------------------------------------------ 5. no overwrite
def test_an_upload_never_replaces_another_study(api, untouched, tmp_path):
    hostile = api.server
    stored = hostile.studies / f"{STUDY}.nii.gz"
    original = stored.read_bytes()
    correction = _correction(hostile, STUDY, tmp_path, 3.0)
    assert api.call("PUT", "/datastore/label", params={"image": STUDY, "tag": "final"},
                    files={"label": (correction.name, correction.read_bytes())}).status_code == 200
    try:
        _wait_labels(api, STUDY, {"final"})
        # the same file again: the existing study, nothing replaced, its label kept
        response = api.call("PUT", "/datastore/image", params={"image": STUDY}, files={"file": ("a.nii.gz", original)})
        assert response.status_code == 200 and response.json() == {"image": STUDY, "existing": True}, response.text
        # the same voxels and geometry in other bytes (uncompressed NIfTI): the same study
        same = tmp_path / "same.nii"
        sitk.WriteImage(sitk.ReadImage(str(stored)), str(same))
        response = api.call("PUT", "/datastore/image", params={"image": STUDY},
                            files={"file": ("b.nii", same.read_bytes())})
        assert response.status_code == 200 and response.json()["existing"] is True, response.text
        # different content under the taken id (another series named alike; the same voxels moved 1 mm): 409
        other = write_crop(SAMPLE_STUDIES / "ct_head_invesalius_ld25.nii.gz", tmp_path / "other.nii.gz",
                           z=slice(50, 54))
        moved = sitk.ReadImage(str(stored))
        moved.SetOrigin(tuple(np.add(moved.GetOrigin(), (0.0, 0.0, 1.0))))
        sitk.WriteImage(moved, str(tmp_path / "moved.nii.gz"))
        for path in (other, tmp_path / "moved.nii.gz"):
            response = api.call("PUT", "/datastore/image", params={"image": STUDY},
                                files={"file": (path.name, path.read_bytes())})
            _refused(response, 409, "taken by a different study", "another id")
        assert stored.read_bytes() == original
        assert "final" in _labels(api, STUDY)
        assert [p.name for p in hostile.studies.glob(f"{STUDY}.*")] == [f"{STUDY}.nii.gz"]
        # under a new id the other study is stored (and then removed again)
        response = api.call("PUT", "/datastore/image", params={"image": "ct_slab_b_2"},
                            files={"file": ("other.nii.gz", other.read_bytes())})
        assert response.status_code == 200 and response.json() == {"image": "ct_slab_b_2"}, response.text
        assert api.call("DELETE", "/datastore/image", params={"id": "ct_slab_b_2"}).status_code == 200
        assert api.call("DELETE", "/datastore/image", params={"id": "no_such_study"}).status_code == 404
    finally:
        _remove_labels(api, STUDY)


def test_a_removed_study_is_gone_at_once_and_the_listing_keeps_following_the_folder(api, untouched, tmp_path):
    """MONAI Label's local datastore left a removed id to its file watcher: right after the DELETE an infer of it
    answered a 422 and a new study under the id a 409; an upload during the watcher's reconciliation killed the
    watcher thread, after which removed ids stayed listed for good. Now the removal is in the listing when its
    answer comes, and the watcher still picks up a file copied into the folder afterwards."""
    hostile = api.server
    first, second = _study_bytes(hostile, STUDY), _study_bytes(hostile, "ct_slab_c")
    try:
        for round_ in range(6):
            image_id = f"removed_{round_}"
            response = api.call("PUT", "/datastore/image", params={"image": image_id},
                                files={"file": ("a.nii.gz", first)})
            assert response.status_code == 200, response.text
            assert api.call("DELETE", "/datastore/image", params={"id": image_id}).status_code == 200
            _refused(api.call("POST", "/infer/nlm", params={"image": image_id}), 404, "no image", image_id)
            response = api.call("PUT", "/datastore/image", params={"image": image_id},
                                files={"file": ("b.nii.gz", second)})
            assert response.status_code == 200 and response.json() == {"image": image_id}, response.text
            assert (hostile.studies / f"{image_id}.nii.gz").read_bytes() == second
            assert api.call("DELETE", "/datastore/image", params={"id": image_id}).status_code == 200
        shutil.copy(hostile.studies / f"{STUDY}.nii.gz", hostile.studies / "copied_in.nii.gz")
        deadline = time.monotonic() + 60
        while "copied_in" not in api.call("GET", "/datastore/", params={"output": "all"}).json()["objects"]:
            assert time.monotonic() < deadline, "the datastore no longer follows its folder: " + hostile.log_tail()
            time.sleep(0.5)
        assert "dictionary changed size" not in hostile.log_tail(200_000)
        # a file removed from the folder by hand: until the watcher has seen it, infer answers 404 all the same
        for round_ in range(12):
            image_id = f"removed_by_hand_{round_}"
            shutil.copy(hostile.studies / f"{STUDY}.nii.gz", hostile.studies / f"{image_id}.nii.gz")
            while image_id not in api.call("GET", "/datastore/", params={"output": "all"}).json()["objects"]:
                assert time.monotonic() < deadline + 60, hostile.log_tail()
                time.sleep(0.2)
            (hostile.studies / f"{image_id}.nii.gz").unlink()
            _refused(api.call("POST", "/infer/nlm", params={"image": image_id}), 404, "no image", image_id)
    finally:
        for path in hostile.studies.glob("removed_*.nii.gz"):
            path.unlink()
        if (hostile.studies / "copied_in.nii.gz").exists():
            assert api.call("DELETE", "/datastore/image", params={"id": "copied_in"}).status_code == 200


def test_answers_never_show_the_servers_file_paths(api, untouched):
    """A corrupt study in the datastore folder was refused with a message naming its absolute path on the server,
    and the review queue and the image info answered the study's absolute path (MONAI Label's ``path``): now the
    file is named by its name, and the study by its id."""
    hostile = api.server
    roots = {str(hostile.studies), str(hostile.studies.resolve()), str(hostile.studies.parent),
             str(hostile.model_dir), str(hostile.log_path.parent), "/sessions/"}

    def no_path(text: str) -> None:
        assert not [root for root in roots if root in text], text

    corrupt = hostile.studies / "scrambled.nii.gz"
    corrupt.write_bytes(gzip.compress(b"not an image " * 100))
    try:
        deadline = time.monotonic() + 60
        while "scrambled" not in api.call("GET", "/datastore/", params={"output": "all"}).json()["objects"]:
            assert time.monotonic() < deadline, hostile.log_tail()
            time.sleep(0.5)
        response = api.call("POST", "/infer/nlm", params={"image": "scrambled"})
        no_path(_refused(response, 422, "cannot denoise", "scrambled.nii.gz"))
        response = api.call("GET", "/datastore/image/info", params={"image": STUDY})
        assert response.status_code == 200 and response.json()["name"] == f"{STUDY}.nii.gz", response.text
        assert "path" not in response.json()
        no_path(response.text)
        response = api.call("POST", "/activelearning/next_unreviewed", json={})
        assert response.status_code == 200 and response.json()["id"] and "path" not in response.json(), response.text
        no_path(response.text)
        _refused(api.call("POST", "/activelearning/no_such_strategy", json={}), 404, "unknown strategy",
                 "next_unreviewed")
        # a session is used by its id: its answers name its folder and file by their last part
        response = api.call("PUT", "/session/", files={"files": (f"{STUDY}.nii.gz", _study_bytes(hostile))})
        assert response.status_code == 200, response.text
        session_id = response.json()["session_id"]
        try:
            assert response.json()["session_info"]["image"] == f"{STUDY}.nii.gz", response.text
            no_path(response.text)
            response = api.call("GET", f"/session/{session_id}")
            assert response.status_code == 200 and response.json()["path"] == session_id, response.text
            no_path(response.text)
            response = api.call("POST", "/infer/nlm", params={"session_id": session_id, "output": "json"})
            assert response.status_code == 200, response.text[:300]
        finally:
            assert api.call("DELETE", f"/session/{session_id}").status_code == 200
    finally:
        assert api.call("DELETE", "/datastore/image", params={"id": "scrambled"}).status_code == 200


# ------------------------------------------------------------------------------------------------ 6. scratch folders
def test_scratch_folders_of_dead_runs_are_removed_and_live_ones_kept(tmp_path):
    from lib.trainers import remove_stale_work

    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    dead = tmp_path / "adl" / f"20260101T000000-{finished.pid}"
    live = tmp_path / "adl" / f"20260101T000001-{os.getppid()}"
    other = tmp_path / "tddl_gcn" / "notes"
    for folder in (dead / "checkpoints", live, other):
        folder.mkdir(parents=True)
    (dead / "checkpoints" / "last.pt").write_bytes(b"x" * 10)
    assert remove_stale_work(tmp_path) == [dead]
    assert not dead.exists() and live.is_dir() and other.is_dir()


def _save_corrections(api, tmp_path: Path) -> None:
    """Corrections of ct_slab_b and ct_slab_c saved as their ``final`` labels: what a fine-tune trains on."""
    for image_id in ("ct_slab_b", "ct_slab_c"):
        correction = _correction(api.server, image_id, tmp_path, 2.0)
        response = api.call("PUT", "/datastore/label", params={"image": image_id, "tag": "final"},
                            files={"label": (correction.name, correction.read_bytes())})
        assert response.status_code == 200, response.text


@pytest.mark.slow
def test_a_killed_training_run_leaves_no_work_folder(api, untouched, tmp_path):
    hostile = api.server
    _save_corrections(api, tmp_path)
    work = hostile.model_dir / "work" / "adl"
    published = sorted(p.name for p in hostile.model_dir.glob("*.pt"))
    try:
        response = api.call("POST", "/train/adl", json={"steps": 100000, "patch_size": 32, "device": "cpu"})
        assert response.status_code == 200, response.text
        deadline = time.monotonic() + 600
        while True:
            stats = api.call("GET", "/info/").json()["train_stats"]["adl"]
            if stats.get("phase") == "training" and stats.get("step") is not None:
                break
            assert time.monotonic() < deadline, hostile.log_tail()
            time.sleep(0.5)
        assert [p.name for p in work.iterdir()] == [stats["run_id"]]
        api.call("DELETE", "/train/")
        deadline = time.monotonic() + 300
        while api.call("GET", "/train/").json().get("status") in ("RUNNING", "SUBMITTED", "QUEUED"):
            assert time.monotonic() < deadline, hostile.log_tail()
            time.sleep(0.5)
        # the run was killed (no finally ran); the stop (or else the next status read) removes its scratch folder
        deadline = time.monotonic() + 60
        while True:
            stats = api.call("GET", "/info/").json()["train_stats"]["adl"]
            if not list(work.iterdir()):
                break
            assert time.monotonic() < deadline, (stats, list(work.iterdir()))
            time.sleep(0.5)
        assert stats["status"] == "interrupted" and stats["phase"] == "stopped (DELETE /train/)", stats
        assert sorted(p.name for p in hostile.model_dir.glob("*.pt")) == published
    finally:
        _remove_labels(api, "ct_slab_b")
        _remove_labels(api, "ct_slab_c")


@pytest.mark.slow
def test_a_run_sync_training_is_stopped_by_delete_and_the_stop_names_who(api, tmp_path):
    """A run_sync fine-tune trained in the server process, where DELETE /train/ (MONAI Label's stop: it kills its
    training subprocess) did not reach it: the run went on to the end. It now trains in the training subprocess
    with the request waiting: DELETE /train/ stops it, its request answers 409, its status says so and by whom,
    and the audit trail records who stopped which run before it was killed. Nothing is published, no scratch left."""
    import threading

    from realm import USER_OF_ROLE

    hostile = api.server
    _save_corrections(api, tmp_path)
    work = hostile.model_dir / "work" / "adl"
    published = {p.name: p.read_bytes() for p in hostile.model_dir.glob("*.pt")}
    answers: dict = {}

    def sync_run() -> None:
        answers["sync"] = requests.post(f"{api.base_url}/train/adl", params={"run_sync": "true"},
                                        json={"steps": 100000, "patch_size": 32, "device": "cpu"},
                                        headers=api.headers, timeout=1800)  # it answers when the run ends

    runner = threading.Thread(target=sync_run, daemon=True)
    try:
        runner.start()
        deadline = time.monotonic() + 600
        while True:
            stats = api.call("GET", "/info/").json()["train_stats"]["adl"]
            if stats.get("status") == "running" and stats.get("phase") == "training" or not runner.is_alive():
                break
            assert time.monotonic() < deadline, hostile.log_tail()
            time.sleep(0.5)
        assert runner.is_alive(), answers
        stopped = api.call("DELETE", "/train/")
        assert stopped.status_code == 200 and stopped.json()["status"] == "STOPPED", stopped.text
        runner.join(timeout=300)
        assert not runner.is_alive(), "DELETE /train/ did not stop the run_sync run"
        answer = answers["sync"]
        assert answer.status_code == 409 and "stopped" in answer.json()["detail"], answer.text
        stats = api.call("GET", "/info/").json()["train_stats"]["adl"]
        user = USER_OF_ROLE["admin"] if api.headers else None
        assert (stats["status"], stats["phase"], stats["stopped_by"]) == ("interrupted", "stopped (DELETE /train/)",
                                                                          user), stats
        assert not list(work.iterdir())
        assert {p.name: p.read_bytes() for p in hostile.model_dir.glob("*.pt")} == published
        audit = AuditLog(hostile.studies / ".audit")
        requested = audit.entries("training_requested")[-1]
        stop = audit.entries("training_stopped")[-1]
        assert stop["seq"] > requested["seq"] and stop["seq"] == stats["stop_seq"], (requested, stop)
        assert (stop["fields"]["model"], stop["fields"]["training_request_seq"], stop["fields"]["user"]) == \
            ("adl", requested["seq"], user), stop
        assert stop["fields"]["pid"] == stats["pid"] and stop["fields"]["requested_by"] == user
        # nothing going on: MONAI Label's answer, nothing recorded
        assert api.call("DELETE", "/train/").status_code == 200
        assert audit.entries("training_stopped")[-1]["seq"] == stop["seq"]
    finally:
        if runner.is_alive():
            api.call("DELETE", "/train/")
            runner.join(timeout=300)
        _remove_labels(api, "ct_slab_b")
        _remove_labels(api, "ct_slab_c")


def test_the_served_weight_file_of_a_model_is_downloaded_by_its_modality(api, untouched):
    """MONAI Label's GET /model/{model} (and /model/info/{model}) answered 404 "Model File NOT Found" for every
    model of this app (the stock route asks the infer task for one file, which these tasks do not name), while the
    405 of PUT says ``Allow: GET``. It sends the file the model serves for the modality now, and says clearly why
    not where there is none or the modality is missing."""
    import hashlib

    shipped = (api.server.model_dir / "pretrained_adl_ct.pt").read_bytes()
    response = api.call("GET", "/model/adl", params={"modality": "ct"})
    assert response.status_code == 200, response.text[:300]
    assert response.content == shipped
    assert response.headers["X-Weights-Version"] == "pretrained"
    assert response.headers["X-Weights-SHA256"] == hashlib.sha256(shipped).hexdigest()
    assert 'filename="pretrained_adl_ct.pt"' in response.headers["Content-Disposition"]
    gcn = api.call("GET", "/model/tddl_gcn")  # one modality: no need to name it
    assert gcn.status_code == 200 and gcn.content == (api.server.model_dir / "pretrained_tddl_gcn_ct.pt").read_bytes()
    info = api.call("GET", "/model/info/adl", params={"modality": "MR"})
    assert info.status_code == 200, info.text[:300]
    shipped_mr = (api.server.model_dir / "pretrained_adl_mr.pt").read_bytes()
    assert info.json()["sha256"] == hashlib.sha256(shipped_mr).hexdigest() and info.json()["version"] == "pretrained"
    for path, params, status, words in (
            ("/model/adl", {}, 422, ("adl serves CT and MR", "?modality=ct")),
            ("/model/adl", {"modality": "xray"}, 422, ("not 'XRAY'",)),
            ("/model/info/adl", {}, 422, ("?modality=mr",)),
            ("/model/nlm", {}, 404, ("classical method", "no weight file")),
            ("/model/no_such_model", {}, 404, ("unknown model",))):
        _refused(api.call("GET", path, params=params), status, *words)


def test_model_files_cannot_be_uploaded_over_or_deleted_from_the_served_weights(api, untouched):
    """MONAI Label's PUT /model/{model} answered 500 (and would copy an upload over a served file with no check,
    version or audit entry where a model has one file); DELETE moved the file away. Both are 405 saying how weights
    change here; the model folder is unchanged (``untouched``)."""
    served = (api.server.model_dir / "pretrained_adl_ct.pt").read_bytes()
    for method, kwargs in (("PUT", {"files": {"file": ("adl.pt", served)}}), ("DELETE", {})):
        for model in ("adl", "no_such_model"):
            response = api.call(method, f"/model/{model}", **kwargs)
            detail = _refused(response, 405, "POST /versions/{model}/restore", "POST /train/{model}")
            assert detail.startswith(f"{method} /model/{model}:") and response.headers["Allow"] == "GET", detail
