"""Client of the ADL / TDDL-GCN MONAI Label app, with the Python standard library only (Slicer's Python has no
MONAI Label client, and a module must not depend on packages users would have to install).

Every failure becomes :class:`DenoiseServerError` with a message a radiologist can act on (server down, wrong
address, not logged in, a missing role, the server's own 4xx reason, a model failure).

Memory: volumes are never held whole in memory. Uploads stream the file from disk in :data:`CHUNK` pieces
(a multipart body with a precomputed Content-Length); downloads, the multipart answer of ``/infer`` included,
are written to disk chunk by chunk. The client's extra memory is O(:data:`CHUNK`), not O(volume): a 300 MiB
float32 result needs a few MiB, not gigabytes (measured: ``bench/client_memory.py``).

Authentication (MONAI Label's own, ``MONAI_LABEL_AUTH_ENABLE``): :meth:`DenoiseServerClient.login` fetches a token
from the server's ``/auth/token`` (as MONAI Label's own client and Slicer plugin do), or a token is given; it is
sent as ``Authorization: Bearer ...`` on every request and never appears in a message, ``repr`` or log line.
Redirects are refused, not followed (urllib would forward the token to whatever host the ``Location`` names).

Cancelling: the long calls take ``cancelled`` (a callable; by default the one of the :func:`cancel_scope` around
the call, which :class:`ADLDenoiseLib.BackgroundTask` sets). They stop at their next chunk, remove their partial
files and raise :class:`TransferCancelled`; a :class:`Cancellation` also shuts down the connections of its scope, so
a call waiting for the server's answer stops at once.
"""
from __future__ import annotations

import contextlib
import email.message
import email.parser
import email.policy
import hashlib
import http.client
import json
import logging
import os
import socket
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
import uuid
import weakref
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Mapping, Sequence

__all__ = ["CHUNK", "Cancellation", "DenoiseServerClient", "DenoiseServerError", "TransferCancelled", "cancel_check",
           "cancel_scope", "opened_identity_of", "stop_if", "write_atomically"]

logger = logging.getLogger(__name__)

#: bytes read from disk or from the network at a time (uploads and downloads)
CHUNK = 1 << 20
#: largest non-file part of a multipart answer kept in memory (the result's JSON)
MAX_FIELD_BYTES = 16 << 20
#: most bytes of an error answer read (its ``detail``)
MAX_ERROR_BYTES = 64 << 10

MSG_UNAUTHORIZED = "not logged in or the session expired: log in again"
MSG_BAD_LOGIN = "user name or password not accepted"
MSG_NO_LOGIN = "this server has no login (its authentication is off): connect without one"
# the keys of a review queue answer listing PACS series it skipped (over max_voxels; could not download): not
# downloaded, still unreviewed
SKIPPED_KEYS = ("too_large_to_review", "not_downloaded")


class DenoiseServerError(RuntimeError):
    """A request failed. ``status`` is the HTTP status (None when the server could not be reached)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class TransferCancelled(DenoiseServerError):
    """The call was cancelled: it stopped at its next chunk and left no partial file (a subclass of
    :class:`DenoiseServerError`, so callers that handle failures handle it too)."""

    def __init__(self) -> None:
        super().__init__("cancelled", None)


# --- cancellation
class Cancellation:
    """A flag another thread sets (the GUI's Cancel) to stop the transfers of a :func:`cancel_scope`.

    :meth:`cancel` also shuts down the sockets the scope's requests opened: a call blocked waiting for the server
    (denoising takes minutes) would otherwise notice the flag only when the answer comes."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._sockets: weakref.WeakSet[socket.socket] = weakref.WeakSet()

    def is_set(self) -> bool:
        return self._event.is_set()

    def cancel(self) -> None:
        with self._lock:
            self._event.set()
            sockets = list(self._sockets)
        for sock in sockets:
            with contextlib.suppress(OSError):  # already closed: nothing to wake
                sock.shutdown(socket.SHUT_RDWR)

    def _attach(self, sock: socket.socket) -> bool:
        """Track ``sock``; False when already cancelled (the caller must not use it)."""
        with self._lock:
            if self._event.is_set():
                return False
            self._sockets.add(sock)
            return True


_scope = threading.local()


@contextlib.contextmanager
def cancel_scope(cancellation: Cancellation | None) -> Iterator[None]:
    """Calls of any client made in this thread inside the block stop once ``cancellation`` is set (so code run in
    a :class:`ADLDenoiseLib.BackgroundTask` needs not pass ``cancelled`` down itself)."""
    previous = getattr(_scope, "cancellation", None)
    _scope.cancellation = cancellation
    try:
        yield
    finally:
        _scope.cancellation = previous


def cancel_check(cancelled: Callable[[], bool] | None) -> Callable[[], bool] | None:
    """The ``cancelled`` callable of a call: the one given, else its thread's :func:`cancel_scope`'s, else None."""
    if cancelled is not None:
        return cancelled
    cancellation = getattr(_scope, "cancellation", None)
    return cancellation.is_set if cancellation is not None else None


def stop_if(cancelled: Callable[[], bool] | None) -> None:
    """Raise :class:`TransferCancelled` once ``cancelled`` (a :func:`cancel_check`) says so; called before each
    chunk of a long call."""
    if cancelled is not None and cancelled():
        raise TransferCancelled() from None  # (raised in an except clause: a cancel, not what it broke)


# --- transport: urllib with connections that read an early answer, and no redirects
class _EarlyAnswer:
    """Mixed into http.client's connections: a server that refuses a request (401, 403, 413) before reading the
    upload answers and closes, so sending the rest fails (EPIPE / ECONNRESET) although the answer is there to read.
    The send error is kept and the answer read; the send error is raised when there is no such refusal to read.
    The socket is also registered with the thread's :class:`Cancellation`."""

    _send_error: OSError | None = None

    def connect(self) -> None:
        super().connect()  # type: ignore[misc]
        cancellation = getattr(_scope, "cancellation", None)
        if cancellation is not None and not cancellation._attach(self.sock):
            raise TransferCancelled()

    def request(self, *args: Any, **kwargs: Any) -> None:
        self._send_error = None
        try:
            super().request(*args, **kwargs)  # type: ignore[misc]
        except (BrokenPipeError, ConnectionResetError) as error:
            if self.sock is None:  # nothing was sent: there is no answer to read
                raise
            self._send_error = error

    def getresponse(self) -> http.client.HTTPResponse:
        if self._send_error is None:
            return super().getresponse()  # type: ignore[misc]
        try:
            response = super().getresponse()  # type: ignore[misc]
        except OSError:  # RemoteDisconnected included: no answer at all (an answer not HTTP is told as such)
            raise self._send_error from None
        if response.status < 400:  # the upload did not arrive whole: never a success
            response.close()
            raise self._send_error
        return response


class _HTTPConnection(_EarlyAnswer, http.client.HTTPConnection):
    pass


class _HTTPSConnection(_EarlyAnswer, http.client.HTTPSConnection):
    pass


class _HTTPHandler(urllib.request.HTTPHandler):
    def do_open(self, http_class, req, **kwargs):  # type: ignore[override]
        return super().do_open(_HTTPConnection, req, **kwargs)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def do_open(self, http_class, req, **kwargs):  # type: ignore[override]
        return super().do_open(_HTTPSConnection, req, **kwargs)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Redirects come back as their 3xx HTTPError (see ``_request``): urllib would follow them with the
    Authorization header to any host, and turn an upload into a GET."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[override]
        return None


_OPENER = urllib.request.build_opener(_NoRedirect, _HTTPHandler, _HTTPSHandler)


class _MultipartBody:
    """A ``multipart/form-data`` body streamed from its files: iterating yields the bytes in pieces of at most
    :data:`CHUNK` (urllib sends an iterable body piece by piece once Content-Length is set); ``len()`` is the
    exact byte count, known before anything is read."""

    def __init__(self, fields: dict[str, str], files: dict[str, Path]) -> None:
        self.cancelled: Callable[[], bool] | None = None  # checked before each chunk (set by ``_request``)
        self.boundary = uuid.uuid4().hex
        self.content_type = f"multipart/form-data; boundary={self.boundary}"
        self._pieces: list[bytes | tuple[Path, int]] = []
        for name, value in fields.items():
            self._pieces.append(f'--{self.boundary}\r\nContent-Disposition: form-data; name="{_quote(name)}"'
                                f"\r\n\r\n{value}\r\n".encode())
        for name, path in files.items():
            path = Path(path)
            if not path.is_file():
                raise DenoiseServerError(f"{path} does not exist")
            self._pieces.append(f'--{self.boundary}\r\nContent-Disposition: form-data; name="{_quote(name)}"; '
                                f'filename="{_quote(path.name)}"\r\nContent-Type: application/octet-stream'
                                f"\r\n\r\n".encode())
            self._pieces.append((path, path.stat().st_size))
            self._pieces.append(b"\r\n")
        self._pieces.append(f"--{self.boundary}--\r\n".encode())

    def __len__(self) -> int:
        return sum(len(p) if isinstance(p, bytes) else p[1] for p in self._pieces)

    def __iter__(self) -> Iterator[bytes]:
        for piece in self._pieces:
            if isinstance(piece, bytes):
                yield piece
                continue
            path, size = piece
            sent = 0
            with open(path, "rb") as handle:
                while chunk := handle.read(CHUNK):
                    stop_if(self.cancelled)
                    sent += len(chunk)
                    yield chunk
            if sent != size:  # the Content-Length already sent would be wrong: fail rather than send garbage
                raise DenoiseServerError(f"{path} changed while it was being uploaded")


def _quote(text: str) -> str:
    """A name or file name inside a quoted Content-Disposition parameter (as browsers escape them)."""
    return text.replace("\\", "%5C").replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")


def _safe_name(filename: str | None, default: str) -> str:
    """The base name of a file name the server sent, never a path (``..``, ``/x`` or empty give ``default``)."""
    name = Path(str(filename or "").replace("\\", "/")).name
    return name if name not in ("", ".", "..") else default


def write_atomically(target: Path, fill: Callable[[BinaryIO], None],
                     cancelled: Callable[[], bool] | None) -> Path:
    """``fill(file)`` writes a temporary file of its own in ``target``'s folder, renamed to ``target`` only once
    complete: a failed or cancelled download (or volume file: ``volume_files``) leaves no partial file, and two
    writes of one target (a retry while a cancelled one still runs) never write into one file."""
    stop_if(cancelled)  # a cancelled call does not recreate a folder deleted meanwhile (scene closed)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    partial = Path(name)
    try:
        try:
            with os.fdopen(handle, "wb") as out:
                fill(out)
        except Exception:
            stop_if(cancelled)  # a cancel that shut the socket down shows as a body cut off
            raise
        stop_if(cancelled)
        os.replace(partial, target)
    finally:
        if partial.exists():
            partial.unlink()
    return target


def _copy_to_file(response: BinaryIO, target: Path, cancelled: Callable[[], bool] | None = None) -> Path:
    """Write the body of ``response`` to ``target`` in :data:`CHUNK` pieces (``write_atomically``); checks
    Content-Length when the server sent one."""

    def fill(out: BinaryIO) -> None:
        written = 0
        while True:
            stop_if(cancelled)
            chunk = response.read(CHUNK)
            if not chunk:
                break
            out.write(chunk)
            written += len(chunk)
        expected = getattr(response, "headers", {}).get("Content-Length")
        if expected is not None and expected.isdigit() and int(expected) != written:
            raise DenoiseServerError(f"the download of {target.name} was cut off ({written} of {expected} bytes)")

    return write_atomically(target, fill, cancelled)


class _MultipartReader:
    """Reads a ``multipart/*`` answer from a stream, one part at a time, without holding a part whole: file parts
    go to disk chunk by chunk, other parts (JSON) are kept up to :data:`MAX_FIELD_BYTES`."""

    def __init__(self, stream: BinaryIO, boundary: str, cancelled: Callable[[], bool] | None = None) -> None:
        self.stream = stream
        self.delimiter = b"--" + boundary.encode("latin-1")
        self.buffer = b""
        self.cancelled = cancelled

    def _fill(self) -> bool:
        stop_if(self.cancelled)
        chunk = self.stream.read(CHUNK)
        if not chunk:
            return False
        self.buffer += chunk
        return True

    def _need(self, count: int) -> None:
        while len(self.buffer) < count:
            if not self._fill():
                raise DenoiseServerError("the server's answer was cut off (incomplete multipart body)")

    def _skip_to_first_delimiter(self) -> None:
        while (index := self.buffer.find(self.delimiter)) < 0:
            self.buffer = self.buffer[-len(self.delimiter):]  # the preamble is dropped, not kept
            if not self._fill():
                raise DenoiseServerError("the server's answer is not the multipart result it announced")
        self.buffer = self.buffer[index + len(self.delimiter):]

    def _at_end(self) -> bool:
        """After a delimiter: True at the closing ``--``, else consumes the line end before the part's headers."""
        self._need(2)
        if self.buffer.startswith(b"--"):
            return True
        end = self._find(b"\r\n", MAX_ERROR_BYTES)
        self.buffer = self.buffer[end + 2:]  # (transport padding before the line end is allowed and ignored)
        return False

    def _find(self, token: bytes, limit: int) -> int:
        while (index := self.buffer.find(token)) < 0:
            if len(self.buffer) > limit or not self._fill():
                raise DenoiseServerError("the server's answer has a malformed multipart part")
        return index

    def _part_headers(self) -> email.message.Message:
        end = self._find(b"\r\n\r\n", MAX_ERROR_BYTES)
        raw, self.buffer = self.buffer[:end + 4], self.buffer[end + 4:]
        return email.parser.BytesHeaderParser(policy=email.policy.HTTP).parsebytes(raw)

    def _body(self, write) -> None:
        """Pass the part's body to ``write`` in pieces, up to the next delimiter (consumed)."""
        separator = b"\r\n" + self.delimiter
        keep = len(separator) - 1  # a separator may straddle two reads: hold back its possible start
        while (index := self.buffer.find(separator)) < 0:
            if len(self.buffer) > keep:
                write(self.buffer[:-keep])
                self.buffer = self.buffer[-keep:]
            if not self._fill():
                raise DenoiseServerError("the server's answer was cut off (incomplete multipart body)")
        write(self.buffer[:index])
        self.buffer = self.buffer[index + len(separator):]

    def save(self, output_dir: Path) -> tuple[Path | None, dict]:
        """Writes the (last) file part into ``output_dir``; returns its path and the ``params`` part's JSON."""
        result_json: dict = {}
        result_path: Path | None = None
        self._skip_to_first_delimiter()
        while not self._at_end():
            headers = self._part_headers()
            name = headers.get_param("name", header="content-disposition")
            filename = headers.get_filename()
            if filename:
                target = output_dir / _safe_name(filename, "result.nii.gz")
                result_path = write_atomically(target, lambda out: self._body(out.write), self.cancelled)
            else:
                field = bytearray()

                def keep(data: bytes) -> None:
                    if len(field) + len(data) > MAX_FIELD_BYTES:
                        raise DenoiseServerError(f"the server's answer has an oversized field {name!r}")
                    field.extend(data)

                self._body(keep)
                if name == "params":
                    try:
                        result_json = json.loads(bytes(field) or b"{}")
                    except ValueError:
                        raise DenoiseServerError("the server's result description is not JSON") from None
        return result_path, result_json


def _check_server_url(server_url: str) -> str:
    """The server's address without a trailing ``/``; refused when requests could not go where it says (a query,
    a fragment, a bad port, spaces) or when it holds a user name or password (never echoed: log in instead)."""
    url = (server_url or "").strip().rstrip("/")
    if "@" in url:
        raise DenoiseServerError("the server address must not hold a user name or password (the address is not "
                                 "shown here for that reason): give http://host:port and log in")
    shape = f"server address must look like http://host:port, got {url!r}"
    try:
        parsed = urllib.parse.urlsplit(url)
        parsed.port  # noqa: B018 - raises ValueError on a port that is not a number in 0..65535
    except ValueError as error:
        raise DenoiseServerError(f"{shape} ({error})") from None
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise DenoiseServerError(shape)
    if parsed.query or parsed.fragment or "?" in url or "#" in url:
        raise DenoiseServerError(f"{shape}: without ?query or #fragment (requests add their own)")
    if any(not "!" <= c <= "~" for c in url):
        raise DenoiseServerError(f"{shape}: without spaces or characters outside ASCII (percent-encode them)")
    return url


def _shown_location(location: str | None) -> str:
    """A redirect's target as shown to the user: scheme, host, port and path (no user info, query or fragment)."""
    if not location:
        return "(no Location)"
    parts = urllib.parse.urlsplit(location)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", "")) or "(an empty Location)"


def _error_detail(raw: bytes, content_type: str) -> str:
    """What an error answer's body says, in one line: FastAPI's ``detail`` (a string, or the ``msg`` of each item
    of a validation list), a short plain text; nothing for an HTML page (the status and reason say it)."""
    text = raw.decode("utf-8", "replace").strip()
    if not text or "html" in content_type.lower() or text[:1] == "<":
        return ""
    try:
        detail = json.loads(text).get("detail")
    except (ValueError, AttributeError):
        return " ".join(text.split())[:300]
    if isinstance(detail, list):
        items = []
        for item in detail:
            if isinstance(item, dict) and "msg" in item:
                where = [str(part) for part in item.get("loc") or () if part not in ("body", "query", "path")]
                items.append(f"{'.'.join(where)}: {item['msg']}" if where else str(item["msg"]))
            else:
                items.append(str(item))
        return "; ".join(items)[:1000]
    return " ".join(str(detail).split())[:1000] if detail else ""


def opened_identity_of(info: Mapping[str, Any] | None) -> dict[str, str]:
    """The patient and study a correction or verdict of a volume confirms (``patient_id``, ``study_instance_uid``),
    read from the image info (``GET /datastore/image/info``) of the download it was made from: its ``PatientID`` and
    ``StudyInstanceUID`` (a PACS series' info names them, also on a server that does not convert series to NIfTI);
    ``{}`` for an info naming no such text (a file's: no PACS series)."""
    opened = {key: (info or {}).get(keyword) for key, keyword in (("patient_id", "PatientID"),
                                                                ("study_instance_uid", "StudyInstanceUID"))}
    return opened if all(isinstance(value, str) for value in opened.values()) else {}


class DenoiseServerClient:
    """Talks to the app at ``server_url`` (e.g. ``http://127.0.0.1:8000``).

    Args:
        server_url: the server's address.
        timeout: seconds to wait for an answer (denoising a large volume on a CPU takes minutes).
        token: an access token of the server's authentication (MONAI Label's, e.g. from Keycloak), or None; see
            :meth:`login`. Sent as ``Authorization: Bearer <token>``; never shown in messages, ``repr`` or logs.
    """

    def __init__(self, server_url: str, timeout: float = 1800.0, token: str | None = None) -> None:
        self.server_url = _check_server_url(server_url)
        self.timeout = timeout
        self._token: str | None = None
        self.token = token
        #: the user name :meth:`login` logged in with (None: no login; a token given is anonymous here)
        self.username: str | None = None
        #: per datastore id, the patient and study of the series as :meth:`download_image` opened it (its image info's
        #: PatientID and StudyInstanceUID): sent with its corrections and verdicts, so that a server whose PACS moved
        #: the series to another patient since refuses what was drawn on the old one (and takes what was not). Only
        #: while every download of the id gave that identity: the module's nodes pass their own (``opened=``)
        self.opened_identity: dict[str, dict[str, str]] = {}
        #: per datastore id, the identities its downloads gave (None: no PACS identity), for :attr:`opened_identity`
        self._downloads_opened: dict[str, set[tuple[str, str] | None]] = {}

    def __repr__(self) -> str:
        return f"DenoiseServerClient({self.server_url!r}, token={'<set>' if self._token else None})"

    # --- authentication
    @property
    def token(self) -> str | None:
        """The access token sent with every request (None: none sent)."""
        return self._token

    @token.setter
    def token(self, value: str | None) -> None:
        value = (value or "").strip()
        if value[:7].lower() == "bearer ":  # pasted with its scheme
            value = value[7:].strip()
        if any(c in value for c in "\r\n\0"):
            raise DenoiseServerError("the access token holds a line break: paste it again")
        if any(not "!" <= c <= "~" for c in value):  # HTTP headers are latin-1; tokens (JWT) are printable ASCII
            raise DenoiseServerError("the access token holds a space or a character no token has: paste it again")
        self._token = value or None

    def auth_enabled(self) -> bool:
        """Whether the server asks for a login (MONAI Label's ``GET /auth/``; False where the route is absent)."""
        try:
            answer = self._json("GET", "/auth/", timeout=30, action="checking the login", send_token=False)
        except DenoiseServerError as error:
            if error.status == 404:
                return False
            raise
        return bool(isinstance(answer, dict) and answer.get("enabled"))

    def login(self, username: str, password: str) -> str:
        """Log in with the server's ``/auth/token`` (form-encoded ``username``, ``password``,
        ``grant_type=password``, as MONAI Label's client does); keeps the token for later requests and returns it.

        Raises DenoiseServerError: ``"user name or password not accepted"`` (status 401) when refused; a clear
        message when the server has no login (its authentication is off).
        """
        if not username or not password:
            raise DenoiseServerError("enter a user name and a password")
        body = urllib.parse.urlencode({"username": username, "password": password, "grant_type": "password"})
        try:
            with self._request("POST", "/auth/token", body=body.encode(), timeout=60,
                               content_type="application/x-www-form-urlencoded", action="logging in",
                               send_token=False, secrets=(password,)) as response:
                raw = self._read(response, MAX_FIELD_BYTES, (password,))
        except DenoiseServerError as error:
            if error.status in (400, 401, 403):
                raise DenoiseServerError(MSG_BAD_LOGIN, 401) from None
            if error.status == 404:  # MONAI Label serves /auth/* only with its authentication on
                raise DenoiseServerError(MSG_NO_LOGIN, 404) from None
            if error.status is not None and error.status >= 500:
                # stock MONAI Label turns the login service's refusal into a 500
                raise DenoiseServerError(f"the server could not log you in ({error}): check the user name and "
                                         "password; if they are right, the server's login service is failing",
                                         error.status) from None
            raise
        try:
            answer = json.loads(raw)
        except ValueError:
            raise DenoiseServerError(f"{self.server_url}/auth/token did not answer JSON") from None
        token = answer.get("access_token") if isinstance(answer, dict) else None
        if not token:
            raise DenoiseServerError(MSG_NO_LOGIN)
        self.token = str(token)
        self.username = username
        logger.info("logged in to %s as %s", self.server_url, username)
        return self._token

    def logout(self) -> None:
        """Forget the token (MONAI Label has no server-side logout; the token expires on its own)."""
        self._token = None
        self.username = None

    def token_valid(self) -> bool:
        """Whether the server accepts the current token (``GET /auth/token/valid``; True when auth is off)."""
        try:
            self._json("GET", "/auth/token/valid", timeout=30, action="checking the login")
        except DenoiseServerError as error:
            if error.status in (401, 403):
                return False
            if error.status == 404:  # MONAI Label serves /auth/* only with its authentication on
                return True
            raise
        return True

    # --- transport
    def _scrub(self, text: str, secrets: Sequence[str] = ()) -> str:
        """``text`` without the token or any of ``secrets`` (a server may echo what it was sent)."""
        for secret in (self._token, *secrets):
            if secret:
                text = text.replace(secret, "[hidden]")
        return text

    def _request(self, method: str, path: str, query: dict | None = None,
                 body: bytes | _MultipartBody | None = None, content_type: str | None = None,
                 timeout: float | None = None, action: str = "this request", send_token: bool = True,
                 secrets: Sequence[str] = (), cancelled: Callable[[], bool] | None = None):
        """Send a request; returns the open response (a context manager; read it in chunks for large answers).

        ``action`` names what the user tried, for the 403 message; ``secrets`` are hidden from error messages;
        ``cancelled`` (default: the thread's :func:`cancel_scope`) stops a streamed upload at its next chunk.
        """
        cancelled = cancel_check(cancelled)
        stop_if(cancelled)  # a cancelled task sends no further request
        url = self.server_url + path + (("?" + urllib.parse.urlencode(query)) if query else "")
        request = urllib.request.Request(url, data=body, method=method)
        if isinstance(body, _MultipartBody):
            body.cancelled = cancelled
            request.add_header("Content-Length", str(len(body)))  # streamed: urllib needs the length up front
        if content_type:
            request.add_header("Content-Type", content_type)
        if send_token and self._token:
            request.add_header("Authorization", f"Bearer {self._token}")
        logger.debug("%s %s", method, path)  # never the headers: they hold the token
        try:
            return _OPENER.open(request, timeout=timeout or self.timeout)
        except urllib.error.HTTPError as error:
            stop_if(cancelled)
            raise self._http_error(error, method, path, action, secrets) from None
        except DenoiseServerError:
            raise
        except Exception as error:  # noqa: BLE001 - urllib and http.client raise many kinds: all become ours
            stop_if(cancelled)  # a cancel shuts the socket down: whatever broke is the cancel
            raise self._transport_error(error, secrets) from None

    def _transport_error(self, error: BaseException, secrets: Sequence[str] = ()) -> DenoiseServerError:
        """The message of a request that got no HTTP answer (``status`` None)."""
        reason = error.reason if isinstance(error, urllib.error.URLError) else error
        text = self._scrub(str(reason) or type(reason).__name__, secrets)
        if not isinstance(reason, BaseException):  # urllib's own reasons are words
            return DenoiseServerError(f"cannot reach the server at {self.server_url} ({text}); is it running?")
        if isinstance(reason, (TimeoutError, socket.timeout)):
            return DenoiseServerError(f"no answer from {self.server_url} ({text})")
        if isinstance(reason, (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected)):
            return DenoiseServerError(f"{self.server_url} closed the connection ({text}): try again; if it "
                                      "persists, look at the server's log")
        if isinstance(reason, http.client.HTTPException):  # BadStatusLine, IncompleteRead, LineTooLong ...
            return DenoiseServerError(f"{self.server_url} did not answer as an HTTP server does "
                                      f"({type(reason).__name__}): is it the denoising app?")
        if isinstance(reason, OSError):
            return DenoiseServerError(f"cannot reach the server at {self.server_url} ({text}); is it running?")
        return DenoiseServerError(f"the request to {self.server_url} failed ({type(reason).__name__}: {text})")

    def _http_error(self, error: urllib.error.HTTPError, method: str, path: str, action: str,
                    secrets: Sequence[str]) -> DenoiseServerError:
        """The message of an HTTP error answer: 401 / 403 / redirects in words, else the server's reason."""
        try:
            raw = error.read(MAX_ERROR_BYTES)
        except (OSError, http.client.HTTPException):  # the error body itself was cut off
            raw = b""
        finally:
            error.close()
        detail = self._scrub(_error_detail(raw, error.headers.get("Content-Type", "")), secrets)
        logger.debug("%s %s -> %s", method, path, error.code)
        if error.code == 401:
            return DenoiseServerError(MSG_UNAUTHORIZED, 401)
        if error.code == 403:
            return DenoiseServerError(f"your account lacks the role needed for {action}: ask the server's "
                                      f"administrator" + (f" (server: {detail})" if detail else ""), 403)
        if 300 <= error.code < 400:
            location = _shown_location(error.headers.get("Location"))
            return DenoiseServerError(f"{self.server_url} redirects to {self._scrub(location, secrets)} (HTTP "
                                      f"{error.code}); redirects are not followed: if that is the server, connect "
                                      "to that address", error.code)
        if error.code == 404 and not detail:
            detail = f"{path} not found: is {self.server_url} the denoising app?"
        reason = self._scrub(str(error.reason or ""), secrets)
        return DenoiseServerError(f"server said {error.code}: {detail or reason}", error.code)

    def _read(self, response: BinaryIO, limit: int | None = None, secrets: Sequence[str] = (),
              cancelled: Callable[[], bool] | None = None) -> bytes:
        """A small answer's body, whole or up to ``limit`` bytes (cut off bodies and broken connections as
        DenoiseServerError)."""
        try:
            data = response.read() if limit is None else response.read(limit)
        except (OSError, http.client.HTTPException) as error:
            stop_if(cancel_check(cancelled))
            if isinstance(error, http.client.IncompleteRead):
                data = error.partial
            else:
                raise self._transport_error(error, secrets) from None
        else:
            # http.client's read(limit) returns a body cut short without a word: its Content-Length says so
            if (limit is not None and len(data) >= limit) or not getattr(response, "length", None):
                return data
        raise DenoiseServerError(f"the answer of {self.server_url} was cut off ({len(data)} bytes arrived): "
                                 "try again")

    def _json(self, method: str, path: str, query: dict | None = None, payload: Any = None,
              timeout: float | None = None, action: str = "this request", send_token: bool = True) -> Any:
        body = None if payload is None else json.dumps(payload).encode()
        with self._request(method, path, query, body, "application/json" if body is not None else None,
                           timeout, action, send_token) as response:
            raw = self._read(response)
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            raise DenoiseServerError(f"{self.server_url}{path} did not answer JSON: is it the denoising app?") from None

    def _send_file(self, method: str, path: str, query: dict, fields: dict[str, str], files: dict[str, Path],
                   action: str, cancelled: Callable[[], bool] | None = None) -> dict:
        """A streamed multipart upload whose answer is a small JSON object."""
        body = _MultipartBody(fields, files)
        with self._request(method, path, query, body, body.content_type, action=action,
                           cancelled=cancelled) as response:
            raw = self._read(response, MAX_FIELD_BYTES, cancelled=cancelled)
        try:
            answer = json.loads(raw or b"{}")
        except ValueError:
            raise DenoiseServerError(f"{self.server_url}{path} did not answer JSON: is it the denoising app?") from None
        return answer if isinstance(answer, dict) else {}

    # --- models
    def info(self) -> dict:
        info = self._json("GET", "/info/", timeout=30, action="reading the server's models")
        if not isinstance(info, dict) or "models" not in info:
            raise DenoiseServerError(f"{self.server_url} is not a MONAI Label server")
        return info

    def denoising_models(self) -> list[dict]:
        """``[{"name", "method", "weights": {modality: {"available", "version", ...}}, "config": {...}}]`` of the
        server's denoising models (MONAI Label type ``others`` with a ``weights`` description). ``config`` is the
        model's request options with their defaults (e.g. ``low_frequency_restoration``, learned models only)."""
        models = []
        for name, model in sorted(self.info()["models"].items()):
            if model.get("type") == "others" and "weights" in model:
                config = model.get("config")
                models.append({"name": name, "method": model.get("method", name), "weights": model["weights"],
                               "config": config if isinstance(config, dict) else {}})
        return models

    # --- denoising
    def denoise(self, model: str, image_path: str | os.PathLike | None, output_dir: str | os.PathLike,
                params: dict | None = None, cancelled: Callable[[], bool] | None = None,
                image_id: str | None = None) -> tuple[Path, dict]:
        """Upload ``image_path`` (NRRD / NIfTI), denoise it with ``model``; returns the result file (written in
        ``output_dir``) and the server's JSON (model, modality, weights version, seconds ...). The upload and the
        result are streamed (O(:data:`CHUNK`) memory whatever the volume's size). ``cancelled``: see the module's
        docstring (:class:`TransferCancelled`, and no result file, once it is True).

        ``image_id``: denoise the datastore's study of that id instead (nothing is uploaded; ``image_path`` is
        ignored). The server then records the result as that study's; an uploaded file's result belongs to no
        study until the same voxels are stored. The answer's ``audit_seq`` names the result: a verdict with
        ``review(..., result_seq=audit_seq)`` judges it (or is refused), never another run's."""
        query = {"output": "all"}
        files: dict[str, Path] = {}
        if image_id:
            query["image"] = str(image_id)
        else:
            path = Path(image_path) if image_path else None
            if path is None or not path.is_file():
                raise DenoiseServerError(f"{path} does not exist")
            files["file"] = path
        cancelled = cancel_check(cancelled)
        body = _MultipartBody({"params": json.dumps(params or {})}, files)
        with self._request("POST", f"/infer/{urllib.parse.quote(model)}", query, body,
                           body.content_type, action="denoising", cancelled=cancelled) as response:
            return self._save_multipart(response.headers.get("Content-Type", ""), response, Path(output_dir),
                                        cancelled)

    @staticmethod
    def _save_multipart(content_type: str, stream: BinaryIO, output_dir: Path,
                        cancelled: Callable[[], bool] | None = None) -> tuple[Path, dict]:
        """Parse the multipart answer of ``/infer?output=all`` from ``stream`` to a file in ``output_dir``."""
        if not content_type.startswith("multipart/"):
            raise DenoiseServerError("the server answered without a result image")
        header = email.message.Message()
        header["Content-Type"] = content_type
        boundary = header.get_param("boundary")
        if not boundary or not isinstance(boundary, str):
            raise DenoiseServerError("the server's multipart answer has no boundary")
        try:
            result_path, result_json = _MultipartReader(stream, boundary, cancelled).save(output_dir)
        except DenoiseServerError:
            stop_if(cancelled)  # "cut off" after a cancel shut the socket down is the cancel
            raise
        except (OSError, http.client.HTTPException) as error:
            stop_if(cancelled)
            raise DenoiseServerError(f"the result download failed ({type(error).__name__}: {error})") from None
        if result_path is None:
            raise DenoiseServerError("the server's answer held no result image")
        return result_path, result_json

    # --- datastore, corrections, review
    def datastore_ids(self) -> list[str]:
        return sorted((self._json("GET", "/datastore/", {"output": "all"}, action="listing studies") or {})
                      .get("objects", {}))

    def upload_image(self, image_path: str | os.PathLike, image_id: str,
                     cancelled: Callable[[], bool] | None = None) -> str:
        """Upload a volume file to the datastore as ``image_id`` (streamed); returns the id the server kept."""
        answer = self._send_file("PUT", "/datastore/image", {"image": image_id}, {"params": "{}"},
                                 {"file": Path(image_path)}, "uploading studies", cancelled)
        return str(answer.get("image", image_id))

    def _opened(self, image_id: str, opened: Mapping[str, str] | None) -> dict[str, str]:
        """The patient and study a correction or verdict confirms: ``opened`` (the identity of the download the
        volume was made from, ``{}``: none), or None: this client's :attr:`opened_identity` of the id (none for an id
        downloaded under several identities: the server then refuses it if its PACS moved the series)."""
        opened = dict(self.opened_identity.get(image_id, {}) if opened is None else opened)
        if opened and (set(opened) != {"patient_id", "study_instance_uid"}
                       or not all(isinstance(value, str) and value for value in opened.values())):
            raise DenoiseServerError(f"the opened series must name patient_id and study_instance_uid (text), got "
                                     f"{sorted(opened)}: nothing was sent")
        return opened

    def save_correction(self, image_id: str, corrected_path: str | os.PathLike,
                        regions_sha256: str | None = None, cancelled: Callable[[], bool] | None = None,
                        opened: Mapping[str, str] | None = None) -> dict:
        """Save a corrected denoised volume as the ``final`` label of ``image_id`` (a training pair).

        ``regions_sha256``: the ``sha256`` that :meth:`save_regions` returned for the region map sent with this
        correction (send the map first). The server binds the two; a correction saved without it is trained
        without regions, whatever map an earlier correction of the image had. ``opened``: see :meth:`_opened`."""
        params = {"regions_sha256": regions_sha256} if regions_sha256 else {}
        params.update(self._opened(image_id, opened))
        return self._send_file("PUT", "/datastore/label", {"image": image_id, "tag": "final"},
                               {"params": json.dumps(params)}, {"label": Path(corrected_path)}, "saving corrections",
                               cancelled)

    def save_regions(self, image_id: str, labelmap_path: str | os.PathLike, regions: Sequence[Any],
                     opened: Mapping[str, str] | None = None) -> dict:
        """Save the marked regions of ``image_id``'s correction as its ``regions`` label.

        Args:
            image_id: the datastore image.
            labelmap_path: uint8 label map on the image's grid, NIfTI (``regions.write_region_map``); value ``i``
                is ``regions[i - 1]``, 0 no region.
            regions: :class:`ADLDenoiseLib.regions.Region` objects (anything with ``to_params(value)``) in
                label order.
            opened: the patient and study the volume was opened as (see :meth:`_opened`).

        The form field ``params`` is ``{"regions": [{"value", "name", "intent"[, "strength"]}, ...]}``. Returns the
        server's answer plus ``sha256``, the SHA-256 of the map's file, for :meth:`save_correction`.
        """
        path = Path(labelmap_path)
        if not path.is_file():
            raise DenoiseServerError(f"{path} does not exist")
        if not path.name.endswith((".nii.gz", ".nii")):
            raise DenoiseServerError(f"the region map must be NIfTI (.nii.gz), got {path.name}")
        if not regions:
            raise DenoiseServerError("no marked region to save")
        params = {"regions": [region.to_params(value) for value, region in enumerate(regions, start=1)],
                  **self._opened(image_id, opened)}
        answer = self._send_file("PUT", "/datastore/label", {"image": image_id, "tag": "regions"},
                                 {"params": json.dumps(params)}, {"label": path}, "saving corrections")
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        return dict(answer or {}, sha256=digest.hexdigest())

    def label_info(self, image_id: str, tag: str) -> dict:
        """The info the datastore keeps with ``image_id``'s label ``tag`` (the ``params`` it was saved with)."""
        return self._json("GET", "/datastore/label/info", {"label": image_id, "tag": tag},
                          action="reading corrections") or {}

    def download_label(self, image_id: str, tag: str, target: str | os.PathLike,
                       cancelled: Callable[[], bool] | None = None) -> Path:
        """Download ``image_id``'s label ``tag`` to the file ``target`` (streamed to disk)."""
        cancelled = cancel_check(cancelled)
        with self._request("GET", "/datastore/label", {"label": image_id, "tag": tag},
                           action="downloading studies", cancelled=cancelled) as response:
            return self._download(response, Path(target), cancelled)

    def download_image(self, image_id: str, output_dir: str | os.PathLike,
                       cancelled: Callable[[], bool] | None = None) -> Path:
        """Download the datastore image ``image_id`` into ``output_dir`` under its datastore file name (streamed
        to disk; a temporary file of its own until complete, so concurrent downloads of one study do not mix). The
        patient and study its info names: :meth:`download_opened`."""
        return self.download_opened(image_id, output_dir, cancelled)[0]

    def download_opened(self, image_id: str, output_dir: str | os.PathLike,
                        cancelled: Callable[[], bool] | None = None) -> tuple[Path, dict[str, str]]:
        """:meth:`download_image`, returning also the patient and study of this download (its image info's
        PatientID and StudyInstanceUID; ``{}`` for an image that is no PACS series): what a correction or verdict of
        the volume made from it confirms (``opened=``), whatever later downloads of the id give. Kept as
        :attr:`opened_identity` too while every download of the id gave the same identity."""
        cancelled = cancel_check(cancelled)
        info = self._json("GET", "/datastore/image/info", {"image": image_id}, action="downloading studies")
        name = _safe_name((info or {}).get("name"), f"{_safe_name(image_id, 'image')}.nii.gz")
        self.opened_identity.pop(image_id, None)  # an earlier opening's identity is not this download's
        with self._request("GET", "/datastore/image", {"image": image_id}, action="downloading studies",
                           cancelled=cancelled) as response:
            path = self._download(response, Path(output_dir) / name, cancelled)
        opened = opened_identity_of(info)
        seen = self._downloads_opened.setdefault(image_id, set())
        seen.add((opened["patient_id"], opened["study_instance_uid"]) if opened else None)
        if opened and len(seen) == 1:  # another identity before: whose volume a call without opened= is, unknown
            self.opened_identity[image_id] = opened
        return path, dict(opened)

    def _download(self, response: BinaryIO, target: Path, cancelled: Callable[[], bool] | None) -> Path:
        try:
            return _copy_to_file(response, target, cancelled)
        except (OSError, http.client.HTTPException) as error:
            stop_if(cancelled)
            raise DenoiseServerError(f"the download of {target.name} from {self.server_url} failed "
                                     f"({type(error).__name__}: {error})") from None

    def next_study(self, exclude: list[str] | None = None) -> dict | None:
        """The next study without a review verdict, or None when the queue is empty. An answer without ``id`` that
        lists PACS series the queue skipped (``too_large_to_review``: over the server's voxel limit;
        ``not_downloaded``: series it could not download; nothing else is left) is returned as it is
        (``ReviewSession.queue_answer`` / ``describe_skipped``)."""
        answer = self._json("POST", "/activelearning/next_unreviewed", payload={"exclude": exclude or []},
                            action="the review queue")
        return answer if answer and (answer.get("id") or any(answer.get(key) for key in SKIPPED_KEYS)) else None

    def review(self, image_id: str, verdict: str, reviewer: str, reason: str | None = None,
               model: str | None = None, result_seq: int | None = None,
               opened: Mapping[str, str] | None = None) -> dict:
        """Record a verdict on ``image_id``. ``result_seq``: the ``audit_seq`` of the result judged (the answer of
        :meth:`denoise`): the server records the verdict against that result or refuses it (409) when it is no
        result of the study stored under ``image_id`` now (removed and stored again, its file replaced), never
        against another. ``model``: without ``result_seq``, the model whose latest result of this study is judged
        (the server's default, None, judges the latest result of any model, which may be another run's). The
        answer's ``replaces`` names the study's earlier verdict that this one replaced (None: the first).
        ``opened``: the patient and study the volume judged was opened as (:meth:`_opened`)."""
        payload: dict[str, Any] = {"verdict": verdict, "reviewer": reviewer, "reason": reason, "model": model,
                                   **self._opened(image_id, opened)}
        if result_seq is not None:
            payload["result_seq"] = result_seq
        return self._json("POST", f"/review/{urllib.parse.quote(image_id)}", payload=payload,
                          action="recording verdicts")

    # --- training and versions
    def start_training(self, model: str, params: dict | None = None) -> dict:
        return self._json("POST", f"/train/{urllib.parse.quote(model)}", payload=params or {},
                          action="fine-tuning")

    def training_status(self) -> dict:
        """MONAI Label's task status (``status``: SUBMITTED, RUNNING, DONE, ERROR, STOPPED) or ``{}``."""
        try:
            return self._json("GET", "/train/", {"check_if_running": "false"}, action="watching fine-tuning") or {}
        except DenoiseServerError as error:
            if error.status == 404:  # no training ever ran
                return {}
            raise

    def training_stats(self, model: str) -> dict:
        """The app's progress record of ``model``: status, phase, step, PSNR scores, publication decision."""
        return (self.info().get("train_stats") or {}).get(model, {})

    def stop_training(self) -> Any:
        return self._json("DELETE", "/train/", action="stopping fine-tuning")

    def versions(self, model: str, modality: str = "ct") -> dict:
        return self._json("GET", f"/versions/{urllib.parse.quote(model)}", {"modality": modality},
                          action="reading model versions")
