"""The Slicer module's server client (``ADLDenoiseLib/client.py``) where transfers go wrong: an upload the server
refuses before reading it, concurrent downloads of one study, cancelling (``BackgroundTask``), redirects, and
transport faults (cut-off bodies, a peer that is no HTTP server, HTML error pages, bad addresses and tokens).

The refusals, the concurrent downloads and the cancelled download run against the real app with MONAI Label's
authentication on (the loopback realm of ``tests/realm.py``). A small ``http.server`` on loopback produces only what
the real server never does: a redirect to another port, a body cut off or stalled mid-way, a non-HTTP peer, a
proxy's HTML 502 page, a FastAPI validation list."""
from __future__ import annotations

import json
import re
import socket
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler

import pytest
from ADLDenoiseLib import BackgroundTask, DenoiseServerClient, DenoiseServerError
from ADLDenoiseLib import client as client_module
from ADLDenoiseLib.client import Cancellation, TransferCancelled, cancel_scope

from conftest import SAMPLE_STUDIES
from mlserver import start_server, stop_server, write_crop
from test_slicer_client import MIB, LoopbackServer, sha256, write_nifti

WAIT = 120  # seconds: generous for a loaded 2-core machine; the steps take milliseconds when all is well


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    """The app with authentication on against the loopback realm (``anna``: annotator, may up- and download;
    ``uma``: user, may not upload; ``nora``: no role), and a 32 MiB study ``big_study`` in its datastore."""
    from realm import Realm

    realm = Realm()
    root = tmp_path_factory.mktemp("transport_server")
    write_crop(SAMPLE_STUDIES / "ct_head_invesalius_ld25.nii.gz", root / "studies" / "head_a.nii.gz", z=slice(50, 52))
    (root / "model").mkdir()
    server = start_server(root / "studies", root / "model", root / "work", conf={"max_voxels": 40_000_000},
                          env={"MONAI_LABEL_AUTH_ENABLE": "true", "MONAI_LABEL_AUTH_REALM_URI": realm.url})
    try:
        volume = write_nifti(root / "big_study.nii", 32)
        client = DenoiseServerClient(server.url, timeout=600, token=realm.token("anna"))
        assert client.upload_image(volume, "big_study") == "big_study"
        yield server, realm, volume
    finally:
        stop_server(server)
        realm.stop()


# --------------------------------------------------------------------------------------------------- real server
@pytest.mark.server
def test_a_large_upload_refused_before_it_is_read_reports_the_servers_401_or_403(auth_server, tmp_path):
    """The server answers 401 / 403 before reading a 16 MiB body and closes: the client's send fails (EPIPE /
    ECONNRESET) but the answer it got is what the user must see, not 'cannot reach the server'."""
    server, realm, _ = auth_server
    volume = write_nifti(tmp_path / "study.nii", 16)
    client = DenoiseServerClient(server.url, timeout=600)
    expired = realm.token("anna", expires_in=-120)
    cases = [  # (token, call, status, message start)
        (expired, lambda: client.upload_image(volume, "refused"), 401, client_module.MSG_UNAUTHORIZED),
        (None, lambda: client.upload_image(volume, "refused"), 401, client_module.MSG_UNAUTHORIZED),
        (realm.token("uma"), lambda: client.upload_image(volume, "refused"), 403,
         "your account lacks the role needed for uploading studies"),
        (expired, lambda: client.denoise("nlm", volume, tmp_path / "out", {"modality": "ct"}), 401,
         client_module.MSG_UNAUTHORIZED),
        (realm.token("nora"), lambda: client.denoise("nlm", volume, tmp_path / "out", {"modality": "ct"}), 403,
         "your account lacks the role needed for denoising"),
    ]
    for token, call, status, message in cases:
        client.token = token
        with pytest.raises(DenoiseServerError) as refused:
            call()
        assert refused.value.status == status and str(refused.value).startswith(message), (status, refused.value)
        assert not token or token not in str(refused.value)
    assert not (tmp_path / "out").exists()
    client.token = realm.token("anna")  # the same upload with a good token goes through
    assert client.upload_image(volume, "accepted") == "accepted"


@pytest.mark.server
def test_two_downloads_of_one_study_into_one_folder_both_get_the_whole_file(auth_server, tmp_path):
    """A retry while a cancelled download still runs: each writes a temporary file of its own. The two are made
    to overlap for sure: each waits for the other at its 8th chunk (the ``cancelled`` check is called per chunk)."""
    server, realm, volume = auth_server
    client = DenoiseServerClient(server.url, timeout=600, token=realm.token("anna"))
    barrier = threading.Barrier(2, timeout=WAIT)
    results: dict[str, object] = {}

    def download(name: str) -> None:
        calls = 0

        def meet_the_other() -> bool:
            nonlocal calls
            calls += 1
            if calls == 8:
                barrier.wait()
            return False

        try:
            path = client.download_image("big_study", tmp_path / "studies", cancelled=meet_the_other)
            results[name] = (path.name, sha256(path))  # checked the moment the call returns
        except Exception as error:  # noqa: BLE001 - reported by the assertion below
            results[name] = error

    threads = [threading.Thread(target=download, args=(name,)) for name in ("first", "second")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT * 3)
    expected = ("big_study.nii", sha256(volume))
    assert results == {"first": expected, "second": expected}
    assert [p.name for p in (tmp_path / "studies").iterdir()] == ["big_study.nii"]  # no temporary file left


@pytest.mark.server
def test_a_download_cancelled_midway_raises_cancelled_and_leaves_no_file(auth_server, tmp_path):
    server, realm, _ = auth_server
    client = DenoiseServerClient(server.url, timeout=600, token=realm.token("anna"))
    calls = 0

    def cancelled_after_a_few_chunks() -> bool:
        nonlocal calls
        calls += 1
        return calls > 6

    with pytest.raises(TransferCancelled):
        client.download_image("big_study", tmp_path / "studies", cancelled=cancelled_after_a_few_chunks)
    assert calls > 6 and list((tmp_path / "studies").iterdir()) == []  # it had started writing; nothing is left
    with pytest.raises(TransferCancelled):  # cancelled before: no request sent, no folder made
        client.download_image("big_study", tmp_path / "later", cancelled=lambda: True)
    assert not (tmp_path / "later").exists()
    answered = iter([False])  # cancelled once the answer began (Close Scene deleted the folder meanwhile)
    with pytest.raises(TransferCancelled):
        client.download_image("big_study", tmp_path / "closed", cancelled=lambda: next(answered, True))
    assert not (tmp_path / "closed").exists()  # the deleted folder is not made again


# --------------------------------------------------------------------------------------------------- cancelling
def test_a_cancelled_task_is_finished_only_once_its_thread_has_ended():
    """The widget starts no new request while ``not task.finished``: a cancelled call may still be writing."""
    gate = threading.Event()
    task = BackgroundTask(lambda report, cancelled: gate.wait(WAIT) and "late result")
    task.cancel()
    assert task.state == "cancelled" and not task.finished
    gate.set()
    assert task.wait(WAIT) == "cancelled" and task.finished and task.result is None


class StallServer(LoopbackServer):
    """Answers a GET with the start of a 64 MiB body and then stalls; reads a POST's whole body and never answers.
    It holds each connection until the test ends (``with``): only the client can end the call early."""

    def __init__(self) -> None:
        self.sent_part, self.read_upload, self.release = threading.Event(), threading.Event(), threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(64 * MIB))
                self.end_headers()
                self.wfile.write(b"\0" * (2 * MIB))
                self.wfile.flush()
                outer.sent_part.set()
                outer.release.wait(WAIT * 3)

            def do_POST(self):
                left = int(self.headers["Content-Length"])
                while left > 0 and (chunk := self.rfile.read(min(left, MIB))):
                    left -= len(chunk)
                outer.read_upload.set()
                outer.release.wait(WAIT * 3)

            def log_message(self, *args):
                pass

        self.serve(Handler)
        self.httpd.daemon_threads = True

    def __exit__(self, *exc):
        self.release.set()
        super().__exit__(*exc)


def test_cancel_stops_a_stalled_download_and_a_call_waiting_for_the_answer_without_leaving_files(tmp_path):
    """What the widget's Cancel and Close Scene do (``BackgroundTask.cancel``): the client's calls in the task
    (given no ``cancelled`` of their own, as the widget calls them) stop although the server sends nothing more."""
    study = tmp_path / "study.nrrd"
    study.write_bytes(b"NRRD0004\n" + b"\1" * (3 * MIB))
    with StallServer() as server:
        client = DenoiseServerClient(server.url, timeout=WAIT * 5)
        download = BackgroundTask(lambda report, cancelled: client.download_label("x", "final", tmp_path / "dl" / "x"))
        assert server.sent_part.wait(WAIT)
        download.cancel()
        assert download.wait(WAIT) == "cancelled" and download.finished  # ended with the server still stalling
        assert list(tmp_path.glob("dl/*")) == []  # (the folder exists if the body had begun to arrive)
        # called directly in a cancel scope: the call itself ends with TransferCancelled (not "cut off")
        cancellation, raised = Cancellation(), []

        def direct() -> None:
            with cancel_scope(cancellation):
                try:
                    client.download_label("x", "final", tmp_path / "direct" / "x")
                except Exception as error:  # noqa: BLE001 - checked below
                    raised.append(error)

        thread = threading.Thread(target=direct)
        thread.start()
        deadline = time.monotonic() + WAIT  # until all that was sent is on disk: the call then waits in recv
        while sum(p.stat().st_size for p in tmp_path.glob("direct/.x.*.part")) < 2 * MIB:
            assert time.monotonic() < deadline, "the client did not write what the server sent"
            time.sleep(0.01)
        time.sleep(0.2)
        cancellation.cancel()
        thread.join(WAIT)
        assert not thread.is_alive() and [type(e) for e in raised] == [TransferCancelled], raised
        assert list(tmp_path.glob("direct/*")) == []
        denoise = BackgroundTask(lambda report, cancelled: client.denoise("nlm", study, tmp_path / "results"))
        assert server.read_upload.wait(WAIT)  # the upload is done: the call waits for the server's answer
        denoise.cancel()
        assert denoise.wait(WAIT) == "cancelled" and denoise.finished
        assert not (tmp_path / "results").exists()


# --------------------------------------------------------------------------------------------------- faults
class FaultServer(LoopbackServer):
    """Answers each path with one fault the real server never produces; records what it was sent."""

    def __init__(self, location: str = "") -> None:
        self.requests: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _send(self, status: int, content_type: str, body: bytes, **headers: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def _cut(self, headers: dict[str, str], body: bytes) -> None:
                self.send_response(200)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True

            def _handle(self):
                left = int(self.headers.get("Content-Length") or 0)
                while left > 0 and (chunk := self.rfile.read(min(left, MIB))):
                    left -= len(chunk)
                path = urllib.parse.urlsplit(self.path).path
                outer.requests.append({"method": self.command, "path": self.path,
                                       "authorization": self.headers.get("Authorization")})
                mode = path.strip("/").split("/")[0] if location == "" else "redirect"
                if mode == "redirect":
                    code = {"GET": 302, "PUT": 307, "POST": 302}[self.command]
                    return self._send(code, "text/plain", b"", Location=location)
                if mode in ("info", "auth"):  # Content-Length 1000, 20 bytes sent
                    return self._cut({"Content-Type": "application/json", "Content-Length": "1000"},
                                     b'{"models": {"nlm": {')
                if mode == "datastore":  # a chunked download cut off inside a chunk
                    return self._cut({"Content-Type": "application/octet-stream", "Transfer-Encoding": "chunked"},
                                     b"100000\r\n" + b"x" * 5000)
                if mode == "infer":  # a chunked multipart result cut off inside its file part
                    part = (b'--bnd\r\nContent-Disposition: form-data; name="params"\r\n\r\n{"model": "nlm"}\r\n'
                            b'--bnd\r\nContent-Disposition: form-data; name="file"; filename="r.nrrd"\r\n\r\n')
                    part += b"y" * 5000
                    return self._cut({"Content-Type": "multipart/form-data; boundary=bnd",
                                      "Transfer-Encoding": "chunked"}, b"%x\r\n" % (len(part) + 500) + part)
                if mode == "train":  # a proxy's error page
                    return self._send(502, "text/html", b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n"
                                      b"<body><center><h1>502 Bad Gateway</h1></center><hr>nginx</body></html>\r\n")
                if mode == "review":  # FastAPI's validation answer
                    detail = [{"loc": ["body", "verdict"], "msg": "field required", "type": "value_error.missing"},
                              {"loc": ["body", "reviewer"], "msg": "str type expected", "type": "type_error.str"}]
                    return self._send(422, "application/json", json.dumps({"detail": detail}).encode())
                return self._send(404, "application/json", b'{"detail": "Not Found"}')

            do_GET = do_POST = do_PUT = _handle

            def log_message(self, *args):
                pass

        self.serve(Handler)
        self.httpd.daemon_threads = True


def test_redirects_are_refused_and_the_token_never_reaches_another_host(tmp_path):
    study = tmp_path / "study.nrrd"
    study.write_bytes(b"NRRD0004\n" + bytes(range(256)) * 64)
    with FaultServer() as elsewhere:
        target = f"{elsewhere.url}/steal?token=in-the-query"
        with FaultServer(location=target) as server:
            client = DenoiseServerClient(server.url, timeout=WAIT, token="SECRET.TOKEN.VALUE")
            calls = [(client.info, 302), (lambda: client.upload_image(study, "x"), 307),
                     (lambda: client.denoise("nlm", study, tmp_path / "out"), 302),
                     (lambda: client.download_label("x", "final", tmp_path / "dl" / "x.nii.gz"), 302)]
            for call, code in calls:
                with pytest.raises(DenoiseServerError) as redirected:
                    call()
                assert redirected.value.status == code
                assert f"redirects to {elsewhere.url}/steal (HTTP {code})" in str(redirected.value)
                assert "SECRET" not in str(redirected.value) and "in-the-query" not in str(redirected.value)
            assert len(server.requests) == 4
        assert elsewhere.requests == []  # nothing followed the redirects: the token went nowhere else
    assert not (tmp_path / "out").exists() and not (tmp_path / "dl").exists()


def test_transport_faults_become_denoise_server_errors_that_say_what_happened(tmp_path):
    study = tmp_path / "study.nrrd"
    study.write_bytes(b"NRRD0004\n" + bytes(range(256)) * 64)
    with FaultServer() as server:
        client = DenoiseServerClient(server.url, timeout=WAIT)
        with pytest.raises(DenoiseServerError, match=r"was cut off \(20 bytes arrived\)") as cut:
            client.info()
        assert cut.value.status is None
        with pytest.raises(DenoiseServerError, match=r"was cut off \(20 bytes arrived\)"):  # read up to a limit
            client.login("dr_a", "pass-w0rd")
        with pytest.raises(DenoiseServerError, match=r"download of x\.nii\.gz .* failed \(IncompleteRead"):
            client.download_label("x", "final", tmp_path / "dl" / "x.nii.gz")
        assert list(tmp_path.glob("dl/*")) == []
        with pytest.raises(DenoiseServerError, match=r"result download failed \(IncompleteRead"):
            client.denoise("nlm", study, tmp_path / "out")
        assert list(tmp_path.glob("out/*")) == []
        # a proxy's HTML page: its status and reason, not its markup
        with pytest.raises(DenoiseServerError) as page:
            client.start_training("adl")
        assert page.value.status == 502 and str(page.value) == "server said 502: Bad Gateway"
        # FastAPI's validation list: its messages, not a Python repr
        with pytest.raises(DenoiseServerError) as invalid:
            client.review("x", "accepted", "dr_a")
        assert invalid.value.status == 422
        assert str(invalid.value) == "server said 422: verdict: field required; reviewer: str type expected"

    # a peer that is no HTTP server (an SSH banner)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)

        def banner() -> None:
            for _ in range(2):
                connection, _ = listener.accept()
                with connection:
                    connection.sendall(b"SSH-2.0-OpenSSH_8.9\r\n")
                    connection.recv(65536)

        threading.Thread(target=banner, daemon=True).start()
        client = DenoiseServerClient(f"http://127.0.0.1:{listener.getsockname()[1]}", timeout=WAIT)
        for call in (client.info, lambda: client.upload_image(study, "x")):
            with pytest.raises(DenoiseServerError, match="did not answer as an HTTP server does") as peer:
                call()
            assert peer.value.status is None


@pytest.mark.parametrize("url, message", [
    ("http://127.0.0.1:8a0", "http://host:port"),
    ("http://127.0.0.1:99999", "http://host:port"),
    ("http://127.0.0.1:8000/my prefix", "without spaces"),
    ("http://127.0.0.1:8000/?model=adl", "without ?query or #fragment"),
    ("http://127.0.0.1:8000/#top", "without ?query or #fragment"),
    ("http://dr_a:pass-w0rd@127.0.0.1:8000", "must not hold a user name or password"),
    ("dr_a:pass-w0rd@127.0.0.1:8000", "must not hold a user name or password"),
])
def test_addresses_that_would_send_requests_elsewhere_are_refused_without_echoing_a_password(url, message):
    with pytest.raises(DenoiseServerError, match=re.escape(message)) as refused:
        DenoiseServerClient(url)
    assert "pass-w0rd" not in str(refused.value)


def test_accepted_addresses_and_tokens_that_http_cannot_carry():
    assert DenoiseServerClient(" http://127.0.0.1:8000/monai/ ").server_url == "http://127.0.0.1:8000/monai"
    assert DenoiseServerClient("HTTPS://denoise.example.org").server_url == "HTTPS://denoise.example.org"
    client = DenoiseServerClient("http://127.0.0.1:8000")
    for token in ("eyJhbGciOi\u2026truncated", "token with spaces", "jeton\u00e9"):
        with pytest.raises(DenoiseServerError, match="paste it again") as refused:
            client.token = token
        assert token not in str(refused.value)
    client.token = "Bearer eyJ.abc-_~+/=.xyz"
    assert client.token == "eyJ.abc-_~+/=.xyz"
