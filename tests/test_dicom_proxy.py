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
import re
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
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
    success; every request is kept in :attr:`received`. While :attr:`cut_answers` is set each answer declares more
    bytes than it sends and the connection is closed (an answer cut short)."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.cut_answers = False
        pacs = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _answer(self, body: bytes) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(body) + (1000 if pacs.cut_answers else 0)))
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
    from pydicom.data import get_testdata_file

    start = len(pacs.received)
    body = stow_body([get_testdata_file("CT_small.dcm")])
    headers = _as(realm, "annotator", **{"Content-Type": STOW_TYPE, "Cookie": "session=secret"})
    response = requests.post(server.url + "/proxy/dicom/stow/studies", data=body, headers=headers, timeout=120)
    assert response.status_code == 200, response.text[:300]
    got = pacs.received[start:]
    assert [(r.method, r.path) for r in got] == [("POST", "/dicom-web/studies")]
    assert got[0].body == rebuilt_as_forwarded([get_testdata_file("CT_small.dcm")], got[0])
    assert not {"authorization", "cookie", "proxy-authorization"} & set(got[0].headers)
    assert got[0].headers["host"] == f"127.0.0.1:{pacs.port}"  # the PACS's, not this server's


def test_a_store_whose_dicom_part_names_no_series_is_refused_and_never_reaches_the_pacs(server, pacs, realm):
    """A part sent as ``application/dicom`` whose header yields no StudyInstanceUID / SeriesInstanceUID was not
    counted and the store was forwarded, its entry naming no study and 0 instances: it is a 422 naming the part,
    nothing forwarded, no entry."""
    from pydicom.data import get_testdata_file

    audit = _audit_of(server)
    start, before = len(pacs.received), len(audit.entries("dicomweb_storing"))
    body = stow_body([get_testdata_file("CT_small.dcm")]).replace(b"--BOUNDARY--\r\n", b"") + STOW_BODY
    response = requests.post(server.url + "/proxy/dicom/stow/studies", data=body,
                             headers=_as(realm, "annotator", **{"Content-Type": STOW_TYPE}), timeout=120)
    assert response.status_code == 422, (response.status_code, response.text[:300])
    assert response.json()["detail"] == ("nothing was stored in the PACS: part 2 of the body (sent as "
                                         "application/dicom) is no DICOM file with a StudyInstanceUID and a "
                                         "SeriesInstanceUID")
    assert pacs.received[start:] == []
    assert len(audit.entries("dicomweb_storing")) == before


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "identity"])
def test_a_store_with_an_encoded_body_is_refused_and_never_reaches_the_pacs(server, pacs, realm, encoding):
    """A body sent with ``Content-Encoding: gzip`` (forwarded to the PACS as it is) shows no delimiter of its
    boundary: its parts were not found, and it was forwarded with an entry naming no study or series, 0 instances
    (Orthanc 1.10 answers such a store 200 and stores nothing). Any Content-Encoding but identity is a 415 naming
    it, nothing forwarded, no entry; ``identity`` (the body as it is) is stored."""
    import gzip
    import zlib

    from pydicom.data import get_testdata_file

    body = stow_body([get_testdata_file("CT_small.dcm")])
    sent = {"gzip": gzip.compress, "deflate": zlib.compress, "identity": bytes}[encoding](body)
    audit = _audit_of(server)
    start, before = len(pacs.received), len(audit.entries("dicomweb_storing"))
    response = requests.post(server.url + "/proxy/dicom/stow/studies", data=sent, timeout=120, headers=_as(
        realm, "annotator", **{"Content-Type": STOW_TYPE, "Content-Encoding": encoding}))
    if encoding == "identity":
        assert response.status_code == 200, (response.status_code, response.text[:300])
        [got] = pacs.received[start:]
        assert got.body == rebuilt_as_forwarded([get_testdata_file("CT_small.dcm")], got)
        assert "content-encoding" not in got.headers
        assert len(audit.entries("dicomweb_storing")) == before + 1
        return
    assert response.status_code == 415, (response.status_code, response.text[:300])
    assert response.json()["detail"] == (
        f"nothing was stored in the PACS: the body is sent with Content-Encoding {encoding}; the proxy reads each "
        "part's UIDs for its audit entry: send the body unencoded (no Content-Encoding, or identity)")
    assert pacs.received[start:] == []
    assert len(audit.entries("dicomweb_storing")) == before
    assert audit.verify().ok


@pytest.mark.parametrize("content_type", ["application/dicom", "multipart/mixed; boundary=BOUNDARY", None])
def test_a_store_that_is_no_multipart_related_body_is_refused_and_never_reaches_the_pacs(server, pacs, realm,
                                                                                        content_type):
    """A STOW-RS store is a ``multipart/related`` body (DICOM PS3.18); the proxy did not check the media type: a
    ``multipart/mixed`` body with a boundary was read and stored, an ``application/dicom`` one was a 422 "names no
    boundary". Any other media type (or none) is a 415 naming it, nothing forwarded, no entry."""
    from pydicom.data import get_testdata_file

    body = stow_body([get_testdata_file("CT_small.dcm")])
    audit = _audit_of(server)
    start, before = len(pacs.received), len(audit.entries())
    extra = {} if content_type is None else {"Content-Type": content_type}
    response = requests.post(server.url + "/proxy/dicom/stow/studies", data=body,
                             headers=_as(realm, "annotator", **extra), timeout=120)
    assert response.status_code == 415, (response.status_code, response.text[:300])
    sent = "sent without a Content-Type" if content_type is None else f"sent as {content_type.split(';')[0]}"
    assert response.json()["detail"] == (
        f"nothing was stored in the PACS: the body is {sent}; a STOW-RS store is a multipart/related body (DICOM "
        "PS3.18): send each instance as one of its parts, sent as application/dicom")
    assert pacs.received[start:] == []
    assert len(audit.entries()) == before


EMPTY_STORE = ("nothing was stored in the PACS: empty body: nothing to store (a STOW-RS store is a multipart/related "
               "body (DICOM PS3.18), each instance one of its parts, sent as application/dicom)")


@pytest.mark.parametrize("body, content_type, status, detail", [
    (b"", None, 422, EMPTY_STORE),
    (b"", STOW_TYPE, 422, EMPTY_STORE),
    (b"", "application/json", 415, "nothing was stored in the PACS: the body is sent as application/json; a STOW-RS "
                                   "store is a multipart/related body"),
    (b"LF", STOW_TYPE, 422, "nothing was stored in the PACS: the body uses bare LF line ends where CRLF is required "
                            "(RFC 2046): the delimiter --BOUNDARY at byte 0 ends its line with LF alone"),
], ids=["empty without Content-Type", "empty multipart", "empty json", "LF line ends"])
def test_an_empty_store_or_one_with_lf_line_ends_is_refused_saying_so(server, pacs, realm, body, content_type, status,
                                                                      detail):
    """A POST without a body and without a Content-Type was a 415 "sent without a Content-Type", one sent as
    multipart/related was forwarded (a real Orthanc answers it 200, storing nothing) with an entry naming nothing:
    both are a 422 "empty body: nothing to store"; an empty body sent as another media type stays a 415 naming it
    (Orthanc's answer too). A body written with LF line ends (RFC 2046 needs CRLF; Orthanc answers it 200, storing
    nothing) was a 422 "no delimiter --BOUNDARY (its boundary) starts one": it says what is wrong. Nothing is
    forwarded, no entry written."""
    from pydicom.data import get_testdata_file

    if body == b"LF":
        body = stow_body([get_testdata_file("CT_small.dcm")]).replace(b"\r\n", b"\n")
    audit = _audit_of(server)
    start, before = len(pacs.received), len(audit.entries())
    extra = {} if content_type is None else {"Content-Type": content_type}
    response = requests.post(server.url + "/proxy/dicom/stow/studies", data=body,
                             headers=_as(realm, "annotator", **extra), timeout=120)
    assert response.status_code == status, (response.status_code, response.text[:300])
    assert response.json()["detail"].startswith(detail), response.json()["detail"]
    assert pacs.received[start:] == []
    assert len(audit.entries()) == before


JSON_STOW_TYPE = 'multipart/related; type="application/dicom+json"; boundary=BOUNDARY'


def json_stow_body(path: str) -> tuple[bytes, bytes]:
    """A STOW-RS body of the real DICOM file ``path`` as DICOM JSON metadata (its pixel data a BulkDataURI) and its
    pixel data as a bulk data part: (the metadata part, the bulk data part and the closing delimiter). The metadata
    part names the file's study and series."""
    import pydicom

    ds = pydicom.dcmread(path)
    metadata = ds.to_json_dict(bulk_data_threshold=1024, bulk_data_element_handler=lambda element: "bulk/1")
    assert metadata["0020000D"]["Value"] == [str(ds.StudyInstanceUID)]
    return (b"--BOUNDARY\r\nContent-Type: application/dicom+json\r\n\r\n" + json.dumps([metadata]).encode() + b"\r\n",
            b"--BOUNDARY\r\nContent-Type: application/octet-stream\r\nContent-Location: bulk/1\r\n\r\n"
            + ds.PixelData + b"\r\n--BOUNDARY--\r\n")


@pytest.mark.parametrize("kind", ["json", "json untyped parts", "xml", "dicom and json"])
def test_a_store_of_dicom_metadata_and_bulk_data_is_refused_and_never_reaches_the_pacs(server, pacs, realm, kind):
    """A STOW-RS store sent as DICOM JSON (or XML) metadata and bulk data parts was forwarded with its
    ``dicomweb_storing`` entry naming no study or series and 0 instances (only ``application/dicom`` parts were
    read); its metadata part without a Content-Type of its own (the body's multipart type says it) was a 422 "no
    DICOM file". The proxy stores DICOM files only: a 415 naming the metadata type (the body's, or a part's in a
    store otherwise of DICOM files), nothing forwarded, no entry (as the 422 of a part that is no DICOM file). Orthanc's
    DICOMweb plugin refuses such a store (415) as well; OHIF and Slicer store application/dicom."""
    from pydicom.data import get_testdata_file

    ct = get_testdata_file("CT_small.dcm")
    metadata, bulk = json_stow_body(ct)
    if kind == "json untyped parts":  # the parts' types left to the body's multipart type
        body = (metadata + bulk).replace(b"Content-Type: application/dicom+json\r\n", b"")
        content_type, named = JSON_STOW_TYPE, "the body's multipart type is application/dicom+json"
    elif kind == "json":
        body, content_type = metadata + bulk, JSON_STOW_TYPE
        named = "the body's multipart type is application/dicom+json"
    elif kind == "xml":
        body = (b"--BOUNDARY\r\nContent-Type: application/dicom+xml\r\n\r\n<?xml version=\"1.0\"?>"
                b"<NativeDicomModel/>\r\n" + bulk)
        content_type, named = (JSON_STOW_TYPE.replace("+json", "+xml"),
                               "the body's multipart type is application/dicom+xml")
    else:  # "dicom and json": a store of DICOM files (its type application/dicom), a metadata part among them
        body = stow_body([ct]).replace(b"--BOUNDARY--\r\n", b"") + metadata + bulk
        content_type, named = STOW_TYPE, "part 2 of the body is sent as application/dicom+json"
    audit = _audit_of(server)
    start, before = len(pacs.received), len(audit.entries())
    response = requests.post(server.url + "/proxy/dicom/stow/studies", data=body,
                             headers=_as(realm, "annotator", **{"Content-Type": content_type}), timeout=120)
    assert response.status_code == 415, (response.status_code, response.text[:300])
    assert response.json()["detail"] == (
        f"nothing was stored in the PACS: {named}; the proxy stores DICOM files only (each part sent as "
        "application/dicom), so that its audit entry names the studies and series stored: send each instance as "
        "application/dicom")
    assert pacs.received[start:] == []
    assert len(audit.entries()) == before
    assert audit.verify().ok


def test_an_answer_the_pacs_cuts_short_is_a_502_and_a_stores_failure_is_on_record(server, pacs, realm):
    """The PACS closes the connection before the whole answer it declared (a real server on loopback): urllib3's
    error while the body was read is no ``requests`` error, so it was a bare 500, and the store's
    ``dicomweb_storing`` entry had no outcome. It is a 502 saying the answer was cut short, for a search as for a
    store, and the store's ``dicomweb_store_failed`` names its entry, the status and why."""
    from pydicom.data import get_testdata_file

    audit = _audit_of(server)
    body = stow_body([get_testdata_file("CT_small.dcm")])
    start = len(pacs.received)
    pacs.cut_answers = True
    try:
        stored = requests.post(server.url + "/proxy/dicom/stow/studies", data=body,
                               headers=_as(realm, "annotator", **{"Content-Type": STOW_TYPE}), timeout=120)
        search = requests.get(server.url + "/proxy/dicom/qido/studies?PatientID=cut", headers=_as(realm, "user"),
                              timeout=120)
    finally:
        pacs.cut_answers = False
    assert [r.method for r in pacs.received[start:]] == ["POST", "GET"]
    for answer in (stored, search):
        assert answer.status_code == 502, (answer.status_code, answer.text[:300])
        assert answer.json()["detail"] == "the PACS's answer (200) was cut short (ProtocolError)"
    storing, failed = audit.entries("dicomweb_storing")[-1], audit.entries("dicomweb_store_failed")[-1]
    assert storing["fields"]["instances"] == 1
    assert (failed["fields"]["pending_seq"], failed["fields"]["status"]) == (storing["seq"], 502)
    assert failed["fields"]["detail"] == stored.json()["detail"]
    assert audit.verify().ok


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


def _audit_of(server):
    """The audit log of the server (a DICOMweb datastore's default folder, under its model folder)."""
    from lib.audit import AuditLog

    folders = list((server.model_dir / "audit").glob("dicomweb-*"))
    assert len(folders) == 1, folders
    return AuditLog(folders[0])


def test_reads_through_the_proxy_are_one_access_entry_per_reader_and_series_and_refused_unrecorded(server, pacs,
                                                                                                   realm):
    """A viewer reads a series through the proxy one request per instance, frame and metadata file: who read which
    study and series is one ``dicomweb_read`` entry per reader (the token's user) and series in the server process,
    a search one per reader and query (its answer names patients); the proxy wrote none. With the log unwritable (a
    folder where the file is) a series not yet on record is refused, 503 "the audit log could not be written", and
    the PACS's answer is not sent; it is recorded once the log is writable again. The chain verifies."""
    audit = _audit_of(server)
    before = len(audit.entries("dicomweb_read"))
    study, series, other = "1.2.826.0.1.77", "1.2.826.0.1.77.1", "1.2.826.0.1.77.2"
    viewer = [f"wado/studies/{study}/series/{series}/metadata"] + [
        f"wado/studies/{study}/series/{series}/instances/1.2.826.0.1.77.1.{i}/frames/1" for i in range(4)]
    for path in viewer:
        answer = requests.get(f"{server.url}/proxy/dicom/{path}", headers=_as(realm, "user"), timeout=120)
        assert answer.status_code == 200, (path, answer.text[:300])
    for who, path in (("reviewer", viewer[2]), ("user", f"wado/studies/{study}/series/{other}/metadata"),
                      ("user", "qido/studies?PatientID=MRN%204711&limit=25")):
        answer = requests.get(f"{server.url}/proxy/dicom/{path}", headers=_as(realm, who), timeout=120)
        assert answer.status_code == 200, (path, answer.text[:300])
    reads = [e["fields"] for e in audit.entries("dicomweb_read")][before:]
    assert [(r["user"], r["study_instance_uid"], r["series_instance_uid"], r["search"]) for r in reads] == [
        (USER_OF_ROLE["user"], study, series, None), (USER_OF_ROLE["reviewer"], study, series, None),
        (USER_OF_ROLE["user"], study, other, None),
        (USER_OF_ROLE["user"], None, None, "studies?PatientID=MRN%204711&limit=25")], reads
    assert all(r["authenticated"] is True and r["client"] == "127.0.0.1" for r in reads), reads
    assert reads[0]["path"] == viewer[0].removeprefix("wado/")

    kept = audit.path.read_bytes()
    audit.path.unlink()
    audit.path.mkdir()  # a folder where the log is: every append fails (chmod would not stop root)
    try:
        new_series = f"wado/studies/{study}/series/1.2.826.0.1.77.3/metadata"
        refused = requests.get(f"{server.url}/proxy/dicom/{new_series}", headers=_as(realm, "user"), timeout=120)
        assert refused.status_code == 503, (refused.status_code, refused.text[:300])
        assert "the PACS's answer was not sent: the audit log could not be written" in refused.json()["detail"]
        # a series already on record in this process is read without a new entry
        assert requests.get(f"{server.url}/proxy/dicom/{viewer[3]}", headers=_as(realm, "user"),
                            timeout=120).status_code == 200
    finally:
        audit.path.rmdir()
        audit.path.write_bytes(kept)
    again = requests.get(f"{server.url}/proxy/dicom/{new_series}", headers=_as(realm, "user"), timeout=120)
    assert again.status_code == 200, again.text[:300]
    assert audit.verify().ok
    last = audit.entries("dicomweb_read")[-1]["fields"]
    assert (last["user"], last["series_instance_uid"]) == (USER_OF_ROLE["user"], "1.2.826.0.1.77.3")
    assert len(audit.entries("dicomweb_read")) == before + 5


def test_a_proxy_reads_key_is_the_study_and_series_it_names_or_the_search():
    from lib.endpoints.guards import proxy_read_key

    assert proxy_read_key("studies/1.2/series/3.4/instances/5.6/frames/1,2", "x=1") == ("1.2", "3.4", None)
    assert proxy_read_key("studies/1.2/metadata", "") == ("1.2", None, None)
    assert proxy_read_key("studies/1.2/series", "Modality=CT") == ("1.2", None, None)
    assert proxy_read_key("series", "StudyInstanceUID=1.2") == (None, None, "series?StudyInstanceUID=1.2")
    assert proxy_read_key("studies", "") == (None, None, "studies")


def with_large_private_element(source: str, target: Path) -> Path:
    """``source`` (a real DICOM file) written to ``target`` with a 2 MiB private element (0009,1010) before its
    StudyInstanceUID (0020,000D) and SeriesInstanceUID (0020,000E)."""
    import pydicom

    ds = pydicom.dcmread(source)
    block = ds.private_block(0x0009, "ADL TEST", create=True)
    block.add_new(0x10, "OB", bytes(range(256)) * 8192)
    ds.save_as(target, write_like_original=False)
    return target


def stow_body(files: list[Path], boundary: str = "BOUNDARY") -> bytes:
    """A STOW-RS body of ``files``, each a part sent as ``application/dicom``, closed."""
    return b"".join(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + Path(f).read_bytes()
                    + b"\r\n" for f in files) + f"--{boundary}--\r\n".encode()


def rebuilt_as_forwarded(files: list, got: Received) -> bytes:
    """The body the proxy forwards for a store of ``files`` (:func:`stow_body` of them under the fresh boundary of
    the request ``got`` the PACS received), after checking ``got``'s Content-Type and length, and that its boundary
    is found in no file."""
    found = re.fullmatch(r'multipart/related; type="application/dicom"; boundary=(adl-stow-[0-9a-f]{32})',
                         got.headers["content-type"])
    assert found is not None, got.headers
    assert not any(f"--{found.group(1)}".encode() in Path(f).read_bytes() for f in files)
    assert int(got.headers["content-length"]) == len(got.body) and "transfer-encoding" not in got.headers
    return stow_body(files, boundary=found.group(1))


def test_a_store_is_forwarded_as_the_proxy_rebuilt_it_whatever_its_framing(server, pacs, realm):
    """The client's framing reached the PACS: a body sent chunked (``Transfer-Encoding: chunked``) was forwarded
    de-chunked under that header, its Content-Type and part headers as sent (a PACS may read them otherwise than the
    proxy). The PACS receives the parts on record only, rebuilt under a fresh boundary, with a Content-Type and
    length of the proxy's own; its entry names them and counts the ``bytes`` forwarded (it counted the client's
    body, its preamble and epilogue included; and ``parts``, always its ``instances``). A request with two
    Content-Type headers is a 422, nothing forwarded, no entry."""
    import http.client
    import urllib.parse

    import pydicom
    from pydicom.data import get_testdata_file

    ct, mr = get_testdata_file("CT_small.dcm"), get_testdata_file("MR_small.dcm")
    smuggled = stow_body([mr], boundary='"BOUNDARY"')  # Orthanc keeps the quotes of boundary="BOUNDARY"
    body = b"preamble\r\n" + stow_body([ct]) + smuggled
    audit = _audit_of(server)
    start, before = len(pacs.received), len(audit.entries("dicomweb_storing"))
    response = requests.post(server.url + "/proxy/dicom/stow/studies", data=iter([body[:100], body[100:]]),
                             timeout=120, headers=_as(realm, "annotator", **{
                                 "Content-Type": STOW_TYPE.replace("=BOUNDARY", '="BOUNDARY"')}))
    assert response.status_code == 200, (response.status_code, response.text[:300])
    assert response.request.headers["Transfer-Encoding"] == "chunked"
    [got] = pacs.received[start:]
    assert got.body == rebuilt_as_forwarded([ct], got)
    [entry] = audit.entries("dicomweb_storing")[before:]
    header = pydicom.dcmread(ct)
    assert (entry["fields"]["series_instance_uids"], entry["fields"]["instances"]) == (
        [str(header.SeriesInstanceUID)], 1)
    assert (entry["fields"]["bytes"], "parts" in entry["fields"]) == (len(got.body), False)

    url = urllib.parse.urlsplit(server.url)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=120)
    try:
        connection.putrequest("POST", "/proxy/dicom/stow/studies")
        for name, value in [*_as(realm, "annotator").items(), ("Content-Type", STOW_TYPE),
                            ("Content-Type", STOW_TYPE.replace("BOUNDARY", "OTHER")),
                            ("Content-Length", str(len(body)))]:
            connection.putheader(name, value)
        connection.endheaders(body)
        answer = connection.getresponse()
        detail = json.loads(answer.read())["detail"]
    finally:
        connection.close()
    assert answer.status == 422, (answer.status, detail)
    assert detail == ("nothing was stored in the PACS: the request has 2 Content-Type headers; the PACS may read "
                      "another one than the proxy (its audit entry would not name what is stored)")
    assert pacs.received[start + 1:] == []
    assert len(audit.entries("dicomweb_storing")) == before + 1


def test_a_stores_rebuilt_body_holds_the_parts_on_record_and_no_other(tmp_path):
    """A PACS (Orthanc's multipart reader) may read a body otherwise than the proxy: the last ``boundary`` parameter
    (the proxy read the first), its quotes kept, a part's last Content-Length (the proxy read the first, at a line's
    start only: an indented or spaced one let the PACS read past the close delimiter into a DICOM part the proxy took
    for epilogue). A repeated parameter or part header is refused; what is forwarded is rebuilt from the parts on
    record (real DICOM files), so a part in the preamble or epilogue, however framed, is never forwarded."""
    import pydicom
    from pydicom.data import get_testdata_file

    from lib.endpoints.guards import rebuilt_stow_body, stow_parts

    ct, mr = get_testdata_file("CT_small.dcm"), get_testdata_file("MR_small.dcm")
    ct_uids = [[str(getattr(pydicom.dcmread(ct), key))] for key in ("StudyInstanceUID", "SeriesInstanceUID")]
    ambiguous = "; the PACS may read another one than the proxy"
    for content_type, name in ((STOW_TYPE + "; boundary=OTHER", "boundary"),
                               ("multipart/related; boundary=OTHER;BOUNDARY=BOUNDARY", "boundary"),
                               (STOW_TYPE + "; Type=application/dicom", "type")):
        with pytest.raises(ValueError, match=rf"^its Content-Type gives the {name} parameter more than once"
                                             rf"{ambiguous}"):
            stow_parts(stow_body([ct]) + stow_body([mr], boundary="OTHER"), content_type)

    ct_part, mr_part = Path(ct).read_bytes(), Path(mr).read_bytes()
    smuggled = b"\r\n--BOUNDARY--\r\n--BOUNDARY\r\nContent-Type: application/dicom\r\n\r\n" + mr_part
    for second, header in ((b"Content-Length: 999999", "Content-Length"),
                           (b"  Content-Length: 999999", "Content-Length"),
                           (b"Content-Length : 999999", "Content-Length"),
                           (b"content-type: application/dicom", "Content-Type")):
        first = f"Content-Length: {len(ct_part)}" if header == "Content-Length" else "Content-Type: application/dicom"
        body = (f"--BOUNDARY\r\n{first}\r\n".encode() + second + b"\r\n\r\n" + ct_part + smuggled
                + b"\r\n--BOUNDARY--\r\n")
        with pytest.raises(ValueError, match=rf"^part 1 of the body gives more than one {header} header{ambiguous}"):
            stow_parts(body, STOW_TYPE)
    body = b"--BOUNDARY\r\n Content-Length: 999999\r\n\r\n" + ct_part + smuggled + b"\r\n--BOUNDARY--\r\n"
    with pytest.raises(ValueError, match=r"^part 1 of the body gives Content-Length 999999, but its delimiter"):
        stow_parts(body, STOW_TYPE)  # an indented Content-Length was not read

    quoted = stow_body([mr], boundary='"BOUNDARY"')  # a PACS that keeps the quotes finds this part, not the first
    preamble = stow_body([mr], boundary="OTHER").replace(b"--OTHER--", b"")
    for body, content_type in ((stow_body([ct]) + quoted, STOW_TYPE.replace("=BOUNDARY", '="BOUNDARY"')),
                               (preamble + stow_body([ct]) + smuggled + b"\r\n--BOUNDARY--\r\n", STOW_TYPE)):
        studies, series, spans = stow_parts(body, content_type)
        assert ([studies, series], [body[start:end] for start, end in spans]) == (ct_uids, [ct_part])
        rebuilt_type, rebuilt = rebuilt_stow_body(body, spans)
        boundary = rebuilt_type.rpartition("boundary=")[2]
        assert rebuilt_type == f'multipart/related; type="application/dicom"; boundary={boundary}'
        assert rebuilt == stow_body([ct], boundary=boundary)
        assert [list(stow_parts(rebuilt, rebuilt_type)[:2]), len(stow_parts(rebuilt, rebuilt_type)[2])] == [ct_uids, 1]
    two = stow_body([ct, mr])
    studies, series, spans = stow_parts(two, STOW_TYPE)
    rebuilt_type, rebuilt = rebuilt_stow_body(two, spans)
    assert rebuilt == stow_body([ct, mr], boundary=rebuilt_type.rpartition("boundary=")[2])
    assert rebuilt_stow_body(b"", [])[1] == b""


def stow_contents(body: bytes, content_type: str) -> tuple[list[str], list[str], list[bytes]]:
    """The StudyInstanceUIDs and SeriesInstanceUIDs :func:`lib.endpoints.guards.stow_parts` reads in ``body``, and
    the content of each DICOM part it found (what the proxy forwards)."""
    from lib.endpoints.guards import stow_parts

    studies, series, spans = stow_parts(body, content_type)
    return studies, series, [body[start:end] for start, end in spans]


def test_a_stores_audit_entry_names_the_studies_and_series_of_its_dicom_files(tmp_path):
    """The UIDs of a STOW-RS body (real DICOM files of pydicom's test data, two of one series) come from each
    part's header, one with a 2 MiB private element before them (the header was read up to 1 MiB: not counted);
    the boundary parameter's name is case-insensitive (``Boundary=``: nothing was counted). A part sent as DICOM
    that is none is refused naming it (it was not counted and the store went on), and so is a body with no boundary.
    A part of another type (JSON metadata, bulk data) or a body whose multipart type is JSON or XML metadata is
    refused as such (:class:`StowMediaTypeError`): its UIDs were not read, the store was counted 0 instances. So is a
    body whose media type is not multipart/related (in any case)."""
    import pydicom
    from pydicom.data import get_testdata_file

    from lib.endpoints.guards import StowMediaTypeError, stow_parts

    ct, mr = get_testdata_file("CT_small.dcm"), get_testdata_file("MR_small.dcm")
    large = with_large_private_element(mr, tmp_path / "mr_large_private.dcm")
    body = stow_body([ct, large, ct])
    headers = [pydicom.dcmread(path) for path in (ct, mr)]
    expected = (sorted(str(h.StudyInstanceUID) for h in headers), sorted(str(h.SeriesInstanceUID) for h in headers))
    contents = [Path(path).read_bytes() for path in (ct, large, ct)]
    assert stow_contents(body, STOW_TYPE) == (*expected, contents)
    assert stow_contents(body, STOW_TYPE.replace("boundary=", "Boundary=")) == (*expected, contents)
    assert stow_contents(body, 'Multipart/Related; BOUNDARY="BOUNDARY"; TYPE=application/dicom') == (*expected,
                                                                                                      contents)
    json_part = b"--BOUNDARY\r\nContent-Type: application/dicom+json\r\n\r\n[{}]\r\n"
    with pytest.raises(StowMediaTypeError, match=r"^part 2 of the body is sent as application/dicom\+json; the "
                                                  r"proxy stores DICOM files only"):
        stow_parts(stow_body([ct]).replace(b"--BOUNDARY--\r\n", b"") + json_part + b"--BOUNDARY--\r\n", STOW_TYPE)
    metadata, bulk = json_stow_body(ct)
    with pytest.raises(StowMediaTypeError, match=r"^the body's multipart type is application/dicom\+json; "):
        stow_parts(metadata + bulk, JSON_STOW_TYPE)
    with pytest.raises(StowMediaTypeError, match=r"^part 2 of the body is sent as application/octet-stream; "):
        stow_parts(stow_body([ct]).replace(b"--BOUNDARY--\r\n", b"") + bulk, STOW_TYPE)
    with pytest.raises(StowMediaTypeError, match=r"^the body's multipart type is application/dicom\+xml; "):
        stow_parts(b"", STOW_TYPE.replace("application/dicom", "application/dicom+xml"))
    with pytest.raises(ValueError, match=r"part 2 of the body \(sent as application/dicom\) is no DICOM file"):
        stow_parts(stow_body([ct]).replace(b"--BOUNDARY--\r\n", b"") + STOW_BODY, STOW_TYPE)
    with pytest.raises(ValueError, match="part 1 of the body"):  # cut short before its series UID
        stow_parts(b"--BOUNDARY\r\n\r\n" + Path(ct).read_bytes()[:400] + b"\r\n--BOUNDARY--\r\n", STOW_TYPE)
    with pytest.raises(ValueError, match="names no boundary"):
        stow_parts(body, 'multipart/related; type="application/dicom"')
    for content_type, sent in (("application/dicom", "sent as application/dicom"),
                               ("multipart/mixed; boundary=BOUNDARY", "sent as multipart/mixed"),
                               ("", "sent without a Content-Type")):
        with pytest.raises(StowMediaTypeError, match=rf"^the body is {sent}; a STOW-RS store is a multipart/related "
                                                      r"body \(DICOM PS3.18\)"):
            stow_parts(body, content_type)
    for content_type in ("multipart/related", STOW_TYPE, "", None):  # nothing sent: no media type to be wrong
        with pytest.raises(ValueError, match=r"^empty body: nothing to store \(a STOW-RS store is a "):
            stow_parts(b"", content_type)


def test_a_stores_parts_lie_between_its_first_delimiter_and_its_close_delimiter():
    """RFC 2046: the preamble before the first delimiter (``--BOUNDARY``) and the epilogue after the close delimiter
    (``--BOUNDARY--``) are no parts. The close delimiter was not recognised: an epilogue holding a blank line was
    read as a part, and a valid store of real DICOM files refused (422 "part 3 ... is no DICOM file"). A delimiter
    that does not start a line (``x --BOUNDARY`` in a preamble line: a real Orthanc stores the DICOM file after it)
    cannot be framed exactly and is refused. A part's Content-Length (a PACS may read that many bytes) must end it at
    its delimiter. A non-empty body in which no part is found (compressed, a close delimiter only) gave 0 instances
    and was forwarded, its entry naming nothing: it is refused."""
    import gzip

    import pydicom
    from pydicom.data import get_testdata_file

    from lib.endpoints.guards import stow_parts

    ct, mr = get_testdata_file("CT_small.dcm"), get_testdata_file("MR_small.dcm")
    headers = [pydicom.dcmread(path) for path in (ct, mr)]
    expected = (sorted(str(h.StudyInstanceUID) for h in headers), sorted(str(h.SeriesInstanceUID) for h in headers))
    body = stow_body([ct, mr])
    epilogue = b"This is the epilogue.\r\n\r\nIt is ignored.\r\n--BOUNDARY\r\n\r\nnot DICOM\r\n"
    contents = [Path(path).read_bytes() for path in (ct, mr)]
    assert stow_contents(body + epilogue, STOW_TYPE) == (*expected, contents)
    preamble = b"This is the preamble.\r\n\r\nIt is ignored.\r\n"
    assert stow_contents(preamble + body, STOW_TYPE) == (*expected, contents)
    assert stow_contents(preamble + body + epilogue, STOW_TYPE) == (*expected, contents)
    with pytest.raises(ValueError, match=r"^the body's parts cannot be framed exactly \(RFC 2046\): the delimiter "
                                         r"--BOUNDARY at byte 6 does not start a line \(no CRLF before it\)$"):
        stow_parts(b"see x --BOUNDARY\r\n\r\nbelow\r\n" + body, STOW_TYPE)
    ct_part = Path(ct).read_bytes()
    sized = f"--BOUNDARY\r\nContent-Length: {len(ct_part)}\r\n\r\n".encode() + ct_part + b"\r\n--BOUNDARY--\r\n"
    assert stow_contents(sized, STOW_TYPE)[2] == [ct_part]
    with pytest.raises(ValueError, match=rf"^part 1 of the body gives Content-Length {len(ct_part) - 2}, but its "
                                         rf"delimiter ends it after {len(ct_part)} bytes$"):
        stow_parts(sized.replace(str(len(ct_part)).encode(), str(len(ct_part) - 2).encode(), 1), STOW_TYPE)
    for nothing in (gzip.compress(body), b"--BOUNDARY--\r\n", preamble, preamble + b"--BOUNDARY--\r\n" + epilogue):
        with pytest.raises(ValueError, match=r"^the body holds no part: no delimiter --BOUNDARY \(its boundary\) "
                                             r"starts one$"):
            stow_parts(nothing, STOW_TYPE)


def test_a_stores_parts_are_split_exactly_as_rfc_2046_frames_them(tmp_path):
    """RFC 2046: a delimiter is CRLF ``--boundary`` followed by ``--`` (the close delimiter) or by optional linear
    whitespace and CRLF. ``--BOUNDARY`` followed by anything else (``--BOUNDARYX``) was taken for a delimiter, a real
    DICOM file holding it in a value split in two (422 "part 2 ... is no DICOM file"): it is data, the file's content
    forwarded whole. A delimiter without the CRLF before it cost the part before it its last 2 bytes, and a body
    without its close delimiter was stored, its last part's CRLF kept: neither can be framed exactly, and both are
    refused saying so (no byte lost or added)."""
    import pydicom
    from pydicom.data import get_testdata_file

    from lib.endpoints.guards import stow_parts

    ct, mr = get_testdata_file("CT_small.dcm"), get_testdata_file("MR_small.dcm")
    ds = pydicom.dcmread(ct)
    ds.ImageComments = "see\r\n--BOUNDARYX\r\nand --BOUNDARY-x or\r\n--BOUNDARY x\r\n--BOUNDARY--x\r\n--BOUNDARY"
    ds.save_as(tmp_path / "ct_holding_the_boundary.dcm")
    holding = tmp_path / "ct_holding_the_boundary.dcm"
    headers = [pydicom.dcmread(path) for path in (ct, mr)]
    expected = (sorted(str(h.StudyInstanceUID) for h in headers), sorted(str(h.SeriesInstanceUID) for h in headers))
    contents = [Path(path).read_bytes() for path in (holding, mr)]
    assert b"\r\n--BOUNDARYX\r\n" in contents[0] and b"\r\n--BOUNDARY--x\r\n" in contents[0]
    assert stow_contents(stow_body([holding, mr]), STOW_TYPE) == (*expected, contents)
    padded = stow_body([holding, mr]).replace(b"--BOUNDARY\r\n", b"--BOUNDARY \t \r\n")  # transport padding
    assert stow_contents(padded, STOW_TYPE) == (*expected, contents)
    assert stow_body([holding, mr]).endswith(b"\r\n--BOUNDARY--\r\n")
    for close in (b"--BOUNDARY-- \t\r\n", b"--BOUNDARY--"):  # padded, or ending the body (dicomweb-client)
        closed = stow_body([holding, mr])[:-len(b"--BOUNDARY--\r\n")] + close
        assert stow_contents(closed, STOW_TYPE) == (*expected, contents)

    body = stow_body([ct, mr])
    second = body.index(b"\r\n--BOUNDARY\r\n", 20)
    for unframed, at in ((body[:second] + body[second + 2:], second),  # no CRLF before the second delimiter
                         (body.replace(b"\r\n--BOUNDARY--", b"--BOUNDARY--"), len(body) - 16)):  # nor the close one
        with pytest.raises(ValueError, match=rf"^the body's parts cannot be framed exactly \(RFC 2046\): the "
                                             rf"delimiter --BOUNDARY at byte {at} does not start a line"):
            stow_parts(unframed, STOW_TYPE)
    for unclosed in (body.replace(b"--BOUNDARY--\r\n", b""), body.replace(b"--BOUNDARY--\r\n", b"--BOUNDARYX")):
        with pytest.raises(ValueError, match=r"^the body's parts cannot be framed exactly \(RFC 2046\): no close "
                                             r"delimiter --BOUNDARY-- ends its last part \(cut short\?\)$"):
            stow_parts(unclosed, STOW_TYPE)
    with pytest.raises(ValueError, match=r"^the body's parts cannot be framed exactly \(RFC 2046\): the delimiter "
                                         r"--BOUNDARY at byte 12 does not start a line"):
        stow_parts(b"--BOUNDARY\r\n--BOUNDARY\r\n\r\n" + Path(ct).read_bytes() + b"\r\n--BOUNDARY--\r\n",
                   STOW_TYPE)  # its CRLF is the line end of the delimiter before it: no empty part between them

    # LF line ends where RFC 2046 needs CRLF (a client that wrote the body as text): said so, not blamed on a
    # delimiter ("no delimiter --BOUNDARY starts one", "does not start a line", "no close delimiter")
    lf = ("the body uses bare LF line ends where CRLF is required (RFC 2046): the delimiter --BOUNDARY at byte {} "
          "ends its line with LF alone; send each line of the multipart framing (delimiters, part headers, the blank "
          "line after them) ended by CRLF")
    first_line = body.index(b"\r\n") + 2  # after the first delimiter's line
    after_first = body[:first_line] + body[first_line:].replace(b"\r\n", b"\n")
    close = len(body) - len(b"--BOUNDARY--\r\n")
    for bare, at in ((body.replace(b"\r\n", b"\n"), 0),  # every line end LF: no part found
                     (after_first, after_first.index(b"\n--BOUNDARY\n") + 1),  # all but the first: no close one
                     (body[:close - 2] + b"\n--BOUNDARY--\n", close - 1)):  # the close delimiter's
        with pytest.raises(ValueError, match="^" + re.escape(lf.format(at)) + "$"):
            stow_parts(bare, STOW_TYPE)
    headers_lf = body.replace(b"Content-Type: application/dicom\r\n\r\n", b"Content-Type: application/dicom\n\n", 1)
    with pytest.raises(ValueError, match=r"^part 1 of the body uses bare LF line ends where CRLF is required "
                                         r"\(RFC 2046\): its headers end with LF LF, not CRLF CRLF"):
        stow_parts(headers_lf, STOW_TYPE)


def test_the_proxy_forgets_its_oldest_reads_past_its_limit():
    import collections

    from lib.endpoints.guards import remember_recent

    memo = collections.OrderedDict()
    for key in ("a", "b", "c"):
        remember_recent(memo, key, 3)
    remember_recent(memo, "a", 3)  # read again: most recent
    remember_recent(memo, "d", 3)
    assert list(memo) == ["c", "a", "d"]


def test_a_slow_audit_write_of_one_proxy_read_holds_up_no_other_read_and_a_refused_one_is_not_remembered():
    """The proxy's once-per-key record (:class:`lib.endpoints.guards.OnceEach`) with real threads: while the entry
    of one key is being written (blocked here), a read of a key already on record returns at once, and a second
    read of the key being written waits and writes nothing once the first succeeded. A write that fails (a 503)
    leaves its key unremembered: the next read of it writes."""
    from lib.endpoints.guards import OnceEach

    once = OnceEach(10)
    writes: list[str] = []
    once.run("other", lambda: writes.append("other"))
    started, gate = threading.Event(), threading.Event()

    def slow_write() -> None:
        started.set()
        assert gate.wait(120)
        writes.append("slow")

    first = threading.Thread(target=once.run, args=("slow", slow_write), daemon=True)
    first.start()
    assert started.wait(60)
    other = threading.Thread(target=once.run, args=("other", lambda: writes.append("other again")), daemon=True)
    other.start()
    other.join(30)
    blocked = other.is_alive()
    same = threading.Thread(target=once.run, args=("slow", lambda: writes.append("slow again")), daemon=True)
    same.start()
    gate.set()
    first.join(60)
    same.join(60)
    other.join(60)
    assert not blocked, "a read of a key on record waited for another key's audit write"
    assert writes == ["other", "slow"]

    def refused() -> None:
        raise RuntimeError("the audit log could not be written")

    with pytest.raises(RuntimeError):
        once.run("refused", refused)
    once.run("refused", lambda: writes.append("refused, then written"))
    assert writes[-1] == "refused, then written" and list(once.done) == ["other", "slow", "refused"]
