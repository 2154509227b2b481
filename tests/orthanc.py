"""A real Orthanc PACS (Debian's orthanc + orthanc-dicomweb + orthanc-gdcm) on loopback, for tests.

Runs in the foreground with its own configuration and storage in a temporary folder; no DICOM port, no remote
access, no authentication. Started in a process group of its own and stopped as a group (``processes.py``).
"""
from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import processes
from mlserver import free_port

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
PLUGINS = Path("/usr/share/orthanc/plugins")
#: Orthanc's log options under which its DICOMweb plugin logs the arguments (query string) of every QIDO-RS search
#: (:func:`qido_searches`); Orthanc's HTTP log and a Lua request filter see the path only
QIDO_LOG = ("--verbose-plugins",)


def available() -> str | None:
    """None when Orthanc and its DICOMweb plugin are installed, else why not."""
    if not Path(ORTHANC).exists():
        return "Orthanc is not installed (apt-get install orthanc orthanc-dicomweb orthanc-gdcm)"
    if not (PLUGINS / "libOrthancDicomWeb.so").exists():
        return "the Orthanc DICOMweb plugin is not installed (apt-get install orthanc-dicomweb)"
    return None


@dataclass
class Orthanc:
    url: str
    process: subprocess.Popen
    log_path: Path

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    def upload(self, path: Path) -> dict:
        request = urllib.request.Request(f"{self.url}/instances", data=path.read_bytes(), method="POST",
                                         headers={"Content-Type": "application/dicom"})
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.loads(response.read())

    def upload_files(self, paths: Iterable[Path]) -> list[dict]:
        """Each of ``paths``, in the order given (:meth:`upload`); Orthanc's answers."""
        return [self.upload(path) for path in paths]

    def upload_folder(self, folder: Path) -> list[dict]:
        """Every file directly in ``folder``, in name order (:meth:`upload`)."""
        return self.upload_files(sorted(folder.iterdir()))

    def get(self, path: str):
        with urllib.request.urlopen(f"{self.url}{path}", timeout=120) as response:
            return json.loads(response.read())


def start_orthanc(work: Path, timeout: float = 300.0, extra_config: dict | None = None,
                  log_options: Sequence[str] = ()) -> Orthanc:
    """Start Orthanc on a free loopback port; returns once ``/system`` answers (RuntimeError otherwise, with
    Orthanc stopped). ``extra_config``: more configuration entries (e.g. ``LuaScripts``); ``log_options``: Orthanc's
    command-line log options (e.g. :data:`QIDO_LOG`). Its log is ``work / "orthanc.log"``."""
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    plugins = [str(PLUGINS / name) for name in ("libOrthancDicomWeb.so", "libOrthancGdcm.so")
               if (PLUGINS / name).exists()]
    config = {
        "Name": "adl-test-pacs", "StorageDirectory": str(work / "storage"), "IndexDirectory": str(work / "index"),
        "HttpServerEnabled": True, "HttpPort": port, "DicomServerEnabled": False, "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False, "SaveJobs": False, "Plugins": plugins,
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}, **(extra_config or {}),
    }
    config_path = work / "orthanc.json"
    config_path.write_text(json.dumps(config))
    log_path = work / "orthanc.log"
    url = f"http://127.0.0.1:{port}"
    return Orthanc(url, processes.start_service([ORTHANC, *log_options, config_path], log_path, f"{url}/system",
                                                timeout), log_path)


def log_size(server: Orthanc) -> int:
    """Bytes of ``server``'s log so far: where :func:`qido_searches` starts to read what comes next."""
    return server.log_path.stat().st_size


def qido_searches(server: Orthanc, offset: int = 0) -> list[str]:
    """The arguments of every QIDO-RS search ``server`` (started with :data:`QIDO_LOG`) received, from byte
    ``offset`` of its log on, one string a search, e.g. ``"SeriesInstanceUID=1.2.3 includefield=00201209"``."""
    with open(server.log_path, "rb") as log:
        log.seek(offset)
        text = log.read().decode(errors="replace")
    return [" ".join(re.findall(r"\[([^\]]*)\]", line.split("Arguments of QIDO-RS request:", 1)[1]))
            for line in text.splitlines() if "Arguments of QIDO-RS request:" in line]


def start_orthanc_logging_requests(work: Path, extra_config: dict | None = None,
                                   refuse_frames_of: Iterable[str] = (),
                                   log_options: Sequence[str] = ()) -> tuple[Orthanc, Path]:
    """A real Orthanc (in ``work / "orthanc"``, ``extra_config`` added to its configuration, ``log_options`` its
    command-line log options, e.g. :data:`QIDO_LOG`) whose
    IncomingHttpRequestFilter (a Lua script) appends ``METHOD URI`` of every HTTP request it receives, DICOMweb
    included, to the returned file: what a client searched for or downloaded is read there. The WADO-RS frame
    retrievals of the series ``refuse_frames_of`` are refused (Orthanc answers 403): a PACS that does not deliver
    them (logged all the same)."""
    work.mkdir(parents=True, exist_ok=True)
    requests_log = work / "orthanc_requests.log"
    script = work / "log_requests.lua"
    refused = "".join(f'"/series/{uid}/", ' for uid in refuse_frames_of)
    script.write_text(f"""
refused = {{{refused}}}
function IncomingHttpRequestFilter(method, uri, ip, username, httpHeaders)
  local log = io.open("{requests_log}", "a")
  log:write(method .. " " .. uri .. "\\n")
  log:close()
  for _, series in ipairs(refused) do
    if string.find(uri, series, 1, true) and string.find(uri, "/frames/", 1, true) then
      return false
    end
  end
  return true
end
""")
    return start_orthanc(work / "orthanc", extra_config={**(extra_config or {}), "LuaScripts": [str(script)]},
                         log_options=log_options), requests_log


def grow_on_retrieval(script: Path, late: dict[str, list[Path]], requests_log: Path | None = None) -> Path:
    """``script``: a Lua request filter for the real Orthanc that stores the files ``late[uid]`` when the WADO-RS
    retrieval of the series ``uid`` first arrives, before it is answered: the series grows between a size check
    (QIDO-RS) and its download, as a series still being sent to the PACS (a scanner sending slice by slice) does.
    With ``requests_log``, it also appends ``METHOD URI`` of every request to that file, as
    :func:`start_orthanc_logging_requests` does (Orthanc has one request filter). Returns ``script``."""
    table = "".join(f'["{uid}"] = {{{"".join(f"{chr(34)}{path}{chr(34)}, " for path in paths)}}}, '
                    for uid, paths in late.items())
    log_lines = "" if requests_log is None else f"""
  local log = io.open("{requests_log}", "a")
  log:write(method .. " " .. uri .. "\\n")
  log:close()"""
    script.write_text(f"""
late = {{{table}}}
function IncomingHttpRequestFilter(method, uri, ip, username, httpHeaders){log_lines}
  if method == "GET" then
    for uid, paths in pairs(late) do
      if string.sub(uri, -string.len("/series/" .. uid)) == "/series/" .. uid then
        late[uid] = nil
        for _, path in ipairs(paths) do
          local f = io.open(path, "rb")
          RestApiPost("/instances", f:read("*a"))
          f:close()
        end
      end
    end
  end
  return true
end
""")
    return script


@contextlib.contextmanager
def _serving(handler: type[BaseHTTPRequestHandler], port: int = 0,
             daemon_threads: bool = False) -> Iterator[ThreadingHTTPServer]:
    """An HTTP server of ``handler`` on 127.0.0.1 (``port``, or a free one) served from a thread while the block
    runs, then stopped and closed."""
    server = ThreadingHTTPServer(("127.0.0.1", port or free_port()), handler)
    server.daemon_threads = daemon_threads
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=60)


def _forwarded(handler: BaseHTTPRequestHandler, target: str) -> tuple[int, Any, bytes]:
    """The request ``handler`` received, sent to Orthanc at ``target`` (its answer read whole and uncompressed:
    urllib does not undo gzip, so the relays ask for none): status, headers and body, an error status included."""
    length = int(handler.headers.get("Content-Length") or 0)
    headers = {k: v for k, v in handler.headers.items() if k.lower() not in ("host", "connection", "accept-encoding")}
    request = urllib.request.Request(f"{target}{handler.path}", data=handler.rfile.read(length) if length else None,
                                     method=handler.command, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=300) as answer:
            return answer.status, answer.headers, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


def _send_head(handler: BaseHTTPRequestHandler, status: int, headers: Any, length: int) -> None:
    """The status line and Orthanc's ``headers`` of a relayed answer of ``length`` bytes (its own framing dropped)."""
    handler.send_response(status)
    for key, value in headers.items():
        if key.lower() not in ("content-length", "transfer-encoding", "connection"):
            handler.send_header(key, value)
    handler.send_header("Content-Length", str(length))
    handler.end_headers()


@contextlib.contextmanager
def without_instance_counts(server: Orthanc) -> Iterator[str]:
    """A plain HTTP relay on loopback in front of the real Orthanc ``server`` whose JSON answers leave out
    NumberOfSeriesRelatedInstances (0020,1209): a PACS that gives no series' instance count, which Orthanc always
    gives (asked or not). Every other byte (WADO-RS retrievals, REST calls) passes unchanged. Yields the relay's
    DICOMweb root (``http://127.0.0.1:PORT/dicom-web``)."""
    target = server.url

    class Relay(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def _relay(self) -> None:
            status, kept, body = _forwarded(self, target)
            if "json" in (kept.get("Content-Type") or ""):
                found = json.loads(body or b"null")
                for entry in found if isinstance(found, list) else []:
                    if isinstance(entry, dict):
                        entry.pop("00201209", None)
                body = json.dumps(found).encode()
            _send_head(self, status, kept, len(body))
            self.wfile.write(body)

        do_GET = do_POST = do_PUT = do_DELETE = _relay  # noqa: N815 - http.server's names

    with _serving(Relay) as relay:
        yield f"http://127.0.0.1:{relay.server_address[1]}/dicom-web"


def stop_orthanc(server: Orthanc) -> None:
    """``server`` gone: its process group killed (SIGKILL) and waited for. Not SIGTERM: Orthanc's clean shutdown
    spends 2-3 s stopping its HTTP server, at every test's end, and nothing needs it: the storage is a test's
    temporary folder, and Orthanc started again on it (a PACS that went away and came back) reads an index that
    SQLite keeps consistent through a kill, as after a crash (each REST call's change is committed before it
    answers)."""
    processes.kill_group(server.process)


@contextlib.contextmanager
def slow_relay(server: Orthanc, chunk: int, pause_s: float, stall_after: int | None = None) -> Iterator[str]:
    """A plain HTTP relay on loopback in front of the real Orthanc ``server`` that sends each answer (read whole from
    Orthanc, its headers kept) in parts of ``chunk`` bytes, ``pause_s`` before each: a slow PACS whose answer keeps
    arriving. With ``stall_after``, an answer longer than that stops after that many bytes and sends nothing more
    until the relay closes: an answer that stalls half way. Yields the relay's DICOMweb root."""
    target = server.url
    closing = threading.Event()

    class Relay(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def _relay(self) -> None:
            status, kept, body = _forwarded(self, target)
            _send_head(self, status, kept, len(body))
            for start in range(0, len(body), chunk):
                if stall_after is not None and start >= stall_after:
                    closing.wait(600)  # nothing more
                    return
                if closing.wait(pause_s):
                    return
                self.wfile.write(body[start:start + chunk])
                self.wfile.flush()

        do_GET = do_POST = _relay  # noqa: N815 - http.server's names

    with _serving(Relay, daemon_threads=True) as relay:
        try:
            yield f"http://127.0.0.1:{relay.server_address[1]}/dicom-web"
        finally:
            closing.set()  # the answers it holds back end before the server stops


@dataclass
class HoldingRelay:
    """:func:`holding_back`'s relay: its DICOMweb root, the paths of the requests it held back, and whether it holds
    them back (set ``holding`` to False: the PACS answers them again)."""

    dicomweb: str
    held: list
    holding: bool = True


@contextlib.contextmanager
def holding_back(server: Orthanc, holds: Callable[[str], bool]) -> Iterator[HoldingRelay]:
    """A plain HTTP relay on loopback in front of the real Orthanc ``server`` that never answers a request whose path
    ``holds(path)`` while its ``holding`` is set (a PACS that accepts it and then says nothing, e.g. for its frames
    only), each such path kept in ``held``; every other request is relayed as :func:`slow_relay` does, at once."""
    target = server.url
    closing = threading.Event()
    relay = HoldingRelay("", [])

    class Relay(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def _relay(self) -> None:
            if relay.holding and holds(self.path):
                relay.held.append(self.path)
                closing.wait(600)  # nothing, until the relay closes
                self.close_connection = True
                return
            status, kept, body = _forwarded(self, target)
            _send_head(self, status, kept, len(body))
            self.wfile.write(body)

        do_GET = do_POST = _relay  # noqa: N815 - http.server's names

    with _serving(Relay, daemon_threads=True) as serving:
        relay.dicomweb = f"http://127.0.0.1:{serving.server_address[1]}/dicom-web"
        try:
            yield relay
        finally:
            closing.set()  # the requests it holds end before the server stops


@contextlib.contextmanager
def silent_server(port: int = 0, answer_start: bytes = b"") -> Iterator[int]:
    """A server on 127.0.0.1 (``port``, or a free one) that accepts every connection and never answers, nor reads:
    a PACS that hangs (its HTTP server stuck, a firewall that keeps the connection open). With ``answer_start``, it
    sends those bytes on each connection (the start of an answer, e.g. a status line, headers and part of the body
    they announce), then nothing more: an answer that stalls half way. Yields its port."""
    import socket

    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(64)
    accepted: list = []

    def accept() -> None:
        while True:
            try:
                accepted.append(listener.accept()[0])
                if answer_start:
                    accepted[-1].sendall(answer_start)
            except OSError:  # closed
                return

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)  # wakes the accept
        listener.close()
        for connection in accepted:
            connection.close()
        thread.join(timeout=60)


@contextlib.contextmanager
def failing_server(port: int, status: int) -> Iterator[list[str]]:
    """An HTTP server on 127.0.0.1:``port`` that answers every request with ``status`` and an empty body: a PACS
    behind a gateway that fails (502), or one that is overloaded (503). Yields the list of ``METHOD PATH`` it
    received."""
    received: list[str] = []

    class Failing(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def _fail(self) -> None:
            received.append(f"{self.command} {self.path}")
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_POST = do_PUT = do_DELETE = _fail  # noqa: N815 - http.server's names

    ThreadingHTTPServer.allow_reuse_address = True
    with _serving(Failing, port):
        yield received
