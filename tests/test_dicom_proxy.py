"""The PACS proxy (``/proxy/dicom/...``) of a server whose studies are on a DICOMweb server, with authentication on.

MONAI Label's stock proxy forwards a POST to ``{studies}/{path}`` whichever of ``wado/``, ``qido/`` or ``stow/``
it names (the prefixes are empty by default), copies every request header of a POST (the caller's realm token
with it), and joins any path, ``..`` included, onto the DICOMweb root. The app's guards: a POST needs the annotator
role, the caller's credentials stay here, and the path stays under the DICOMweb root.

The PACS here is a small DICOMweb server on loopback that records every request it gets (method, path, headers,
body), since the point is what reaches the PACS; Orthanc would not show the headers it received.
"""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator

import pytest
import requests

from mlserver import copy_weights, free_port, start_server, stop_server
from realm import USER_OF_ROLE, Realm

pytestmark = [pytest.mark.server, pytest.mark.slow]

STOW_BODY = (b"--BOUNDARY\r\nContent-Type: application/dicom\r\n\r\nnot really DICOM\r\n--BOUNDARY--\r\n")
STOW_TYPE = 'multipart/related; type="application/dicom"; boundary=BOUNDARY'


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class RecordingPacs:
    """A DICOMweb server on 127.0.0.1 at ``/dicom-web``: QIDO searches answer ``[]``, a POST answers a STOW-RS
    success; every request is kept in :attr:`received`."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        pacs = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _answer(self, body: bytes) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                pacs.received.append(Received("GET", self.path, {k.lower(): v for k, v in self.headers.items()}, b""))
                self._answer(b"[]")

            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                pacs.received.append(Received("POST", self.path, {k.lower(): v for k, v in self.headers.items()},
                                              body))
                self._answer(json.dumps({"00081199": {"vr": "SQ", "Value": []}}).encode())

        self.port = free_port()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.dicomweb = f"http://127.0.0.1:{self.port}/dicom-web"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def pacs() -> Iterator[RecordingPacs]:
    server = RecordingPacs()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_weights, pacs, realm):
    root = tmp_path_factory.mktemp("dicom_proxy")
    srv = start_server(pacs.dicomweb, copy_weights(tiny_weights, root / "model"), root / "work",
                       env={"MONAI_LABEL_AUTH_ENABLE": "true", "MONAI_LABEL_AUTH_REALM_URI": realm.url})
    yield srv
    stop_server(srv)


def _as(realm: Realm, role: str, **extra) -> dict[str, str]:
    return dict({"Authorization": f"Bearer {realm.token(USER_OF_ROLE[role])}"}, **extra)


def test_a_user_searches_through_the_proxy_and_the_pacs_never_gets_the_callers_token(server, pacs, realm):
    start = len(pacs.received)
    response = requests.get(server.url + "/proxy/dicom/qido/studies", headers=_as(realm, "user"), timeout=120)
    assert response.status_code == 200 and response.json() == [], response.text[:300]
    got = pacs.received[start:]
    assert [(r.method, r.path) for r in got] == [("GET", "/dicom-web/studies")]
    assert "authorization" not in got[0].headers


def test_a_search_for_one_patient_reaches_the_pacs_with_its_query_and_accept_header(server, pacs, realm):
    # MONAI Label's stock proxy dropped the query string: a viewer's search for one patient got every study
    start = len(pacs.received)
    query = "PatientID=MRN%204711&StudyDate=20260101-20261231&includefield=00081030&limit=25"
    response = requests.get(f"{server.url}/proxy/dicom/qido/studies?{query}",
                            headers=_as(realm, "user", Accept="application/dicom+json"), timeout=120)
    assert response.status_code == 200 and response.json() == [], response.text[:300]
    got = pacs.received[start:]
    assert [(r.method, r.path) for r in got] == [("GET", f"/dicom-web/studies?{query}")]
    assert got[0].headers["accept"] == "application/dicom+json"
    assert "authorization" not in got[0].headers


@pytest.mark.parametrize("prefix", ["", "wado/", "qido/", "stow/"])
def test_a_post_through_any_prefix_stores_into_the_pacs_so_a_user_is_refused(server, pacs, realm, prefix):
    start = len(pacs.received)
    response = requests.post(f"{server.url}/proxy/dicom/{prefix}studies", data=STOW_BODY,
                             headers=_as(realm, "user", **{"Content-Type": STOW_TYPE}), timeout=120)
    assert response.status_code == 403, (response.status_code, response.text[:300])
    assert pacs.received[start:] == []


def test_an_annotators_store_reaches_the_pacs_without_the_callers_credentials(server, pacs, realm):
    start = len(pacs.received)
    headers = _as(realm, "annotator", **{"Content-Type": STOW_TYPE, "Cookie": "session=secret"})
    response = requests.post(server.url + "/proxy/dicom/stow/studies", data=STOW_BODY, headers=headers, timeout=120)
    assert response.status_code == 200, response.text[:300]
    got = pacs.received[start:]
    assert [(r.method, r.path, r.body) for r in got] == [("POST", "/dicom-web/studies", STOW_BODY)]
    assert got[0].headers["content-type"] == STOW_TYPE
    assert not {"authorization", "cookie", "proxy-authorization"} & set(got[0].headers)
    assert got[0].headers["host"] == f"127.0.0.1:{pacs.port}"  # the PACS's, not this server's


@pytest.mark.parametrize("method,path", [
    ("GET", "/proxy/dicom/..%2Fpatients"),
    ("GET", "/proxy/dicom/wado/..%2F..%2Fsystem"),
    ("GET", "/proxy/dicom/wado/%2E%2E/system"),
    ("GET", "/proxy/dicom/qido/studies%2F..%2F..%2Fpatients"),
    ("GET", "/proxy/dicom/wado/%252E%252E/system"),  # decoded once here, a PACS could decode it again
    ("POST", "/proxy/dicom/qido/..%2Ftools%2Fexecute-script"),
])
def test_proxy_paths_stay_under_the_dicomweb_root(server, pacs, realm, method, path):
    start = len(pacs.received)
    response = requests.request(method, server.url + path, data=b"" if method == "POST" else None,
                                headers=_as(realm, "admin"), timeout=120)
    assert response.status_code == 422, (response.status_code, response.text[:300])
    assert "proxy path" in response.json()["detail"]
    assert pacs.received[start:] == []
