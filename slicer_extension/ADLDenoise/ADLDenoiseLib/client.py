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
"""
from __future__ import annotations

import email.message
import email.parser
import email.policy
import hashlib
import json
import logging
import os
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Sequence

__all__ = ["CHUNK", "DenoiseServerClient", "DenoiseServerError"]

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


class DenoiseServerError(RuntimeError):
    """A request failed. ``status`` is the HTTP status (None when the server could not be reached)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class _MultipartBody:
    """A ``multipart/form-data`` body streamed from its files: iterating yields the bytes in pieces of at most
    :data:`CHUNK` (urllib sends an iterable body piece by piece once Content-Length is set); ``len()`` is the
    exact byte count, known before anything is read."""

    def __init__(self, fields: dict[str, str], files: dict[str, Path]) -> None:
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


def _copy_to_file(response: BinaryIO, target: Path) -> Path:
    """Write the body of ``response`` to ``target`` in :data:`CHUNK` pieces (via ``target.part``, so a failed
    download never leaves a partial file under the final name); checks Content-Length when the server sent one."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    written = 0
    try:
        with open(partial, "wb") as out:
            while chunk := response.read(CHUNK):
                out.write(chunk)
                written += len(chunk)
        expected = getattr(response, "headers", {}).get("Content-Length")
        if expected is not None and expected.isdigit() and int(expected) != written:
            raise DenoiseServerError(f"the download of {target.name} was cut off ({written} of {expected} bytes)")
        os.replace(partial, target)
    finally:
        if partial.exists():
            partial.unlink()
    return target


class _MultipartReader:
    """Reads a ``multipart/*`` answer from a stream, one part at a time, without holding a part whole: file parts
    go to disk chunk by chunk, other parts (JSON) are kept up to :data:`MAX_FIELD_BYTES`."""

    def __init__(self, stream: BinaryIO, boundary: str) -> None:
        self.stream = stream
        self.delimiter = b"--" + boundary.encode("latin-1")
        self.buffer = b""

    def _fill(self) -> bool:
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
                output_dir.mkdir(parents=True, exist_ok=True)
                target = output_dir / _safe_name(filename, "result.nii.gz")
                partial = target.with_name(target.name + ".part")
                try:
                    with open(partial, "wb") as out:
                        self._body(out.write)
                    os.replace(partial, target)
                finally:
                    if partial.exists():
                        partial.unlink()
                result_path = target
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


class DenoiseServerClient:
    """Talks to the app at ``server_url`` (e.g. ``http://127.0.0.1:8000``).

    Args:
        server_url: the server's address.
        timeout: seconds to wait for an answer (denoising a large volume on a CPU takes minutes).
        token: an access token of the server's authentication (MONAI Label's, e.g. from Keycloak), or None; see
            :meth:`login`. Sent as ``Authorization: Bearer <token>``; never shown in messages, ``repr`` or logs.
    """

    def __init__(self, server_url: str, timeout: float = 1800.0, token: str | None = None) -> None:
        url = (server_url or "").strip().rstrip("/")
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise DenoiseServerError(f"server address must look like http://host:port, got {server_url!r}")
        self.server_url = url
        self.timeout = timeout
        self._token: str | None = None
        self.token = token

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
                raw = response.read(MAX_FIELD_BYTES)
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
        logger.info("logged in to %s as %s", self.server_url, username)
        return self._token

    def logout(self) -> None:
        """Forget the token (MONAI Label has no server-side logout; the token expires on its own)."""
        self._token = None

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
                 secrets: Sequence[str] = ()):
        """Send a request; returns the open response (a context manager; read it in chunks for large answers).

        ``action`` names what the user tried, for the 403 message; ``secrets`` are hidden from error messages.
        """
        url = self.server_url + path + (("?" + urllib.parse.urlencode(query)) if query else "")
        request = urllib.request.Request(url, data=body, method=method)
        if isinstance(body, _MultipartBody):
            request.add_header("Content-Length", str(len(body)))  # streamed: urllib needs the length up front
        if content_type:
            request.add_header("Content-Type", content_type)
        if send_token and self._token:
            request.add_header("Authorization", f"Bearer {self._token}")
        logger.debug("%s %s", method, path)  # never the headers: they hold the token
        try:
            return urllib.request.urlopen(request, timeout=timeout or self.timeout)
        except urllib.error.HTTPError as error:
            raw = error.read(MAX_ERROR_BYTES)
            error.close()
            try:
                detail = json.loads(raw).get("detail")
            except (ValueError, AttributeError):
                detail = raw.decode("utf-8", "replace").strip()[:300]
            detail = self._scrub(str(detail), secrets) if detail else ""
            logger.debug("%s %s -> %s", method, path, error.code)
            if error.code == 401:
                raise DenoiseServerError(MSG_UNAUTHORIZED, 401) from None
            if error.code == 403:
                raise DenoiseServerError(f"your account lacks the role needed for {action}: ask the server's "
                                         f"administrator" + (f" (server: {detail})" if detail else ""), 403) from None
            if error.code == 404 and not detail:
                detail = f"{path} not found: is {self.server_url} the denoising app?"
            reason = self._scrub(str(error.reason or ""), secrets)
            raise DenoiseServerError(f"server said {error.code}: {detail or reason}", error.code) from None
        except urllib.error.URLError as error:
            raise DenoiseServerError(f"cannot reach the server at {self.server_url} "
                                     f"({self._scrub(str(error.reason), secrets)}); is it running?") from None
        except (TimeoutError, OSError) as error:
            raise DenoiseServerError(f"no answer from {self.server_url} ({self._scrub(str(error), secrets)})"
                                     ) from None

    def _json(self, method: str, path: str, query: dict | None = None, payload: Any = None,
              timeout: float | None = None, action: str = "this request", send_token: bool = True) -> Any:
        body = None if payload is None else json.dumps(payload).encode()
        with self._request(method, path, query, body, "application/json" if body is not None else None,
                           timeout, action, send_token) as response:
            try:
                raw = response.read()
            except (TimeoutError, OSError) as error:
                raise DenoiseServerError(f"no answer from {self.server_url} ({error})") from None
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            raise DenoiseServerError(f"{self.server_url}{path} did not answer JSON: is it the denoising app?") from None

    def _send_file(self, method: str, path: str, query: dict, fields: dict[str, str], files: dict[str, Path],
                   action: str) -> dict:
        """A streamed multipart upload whose answer is a small JSON object."""
        body = _MultipartBody(fields, files)
        with self._request(method, path, query, body, body.content_type, action=action) as response:
            raw = response.read(MAX_FIELD_BYTES)
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
    def denoise(self, model: str, image_path: str | os.PathLike, output_dir: str | os.PathLike,
                params: dict | None = None) -> tuple[Path, dict]:
        """Upload ``image_path`` (NRRD / NIfTI), denoise it with ``model``; returns the result file (written in
        ``output_dir``) and the server's JSON (model, modality, weights version, seconds ...). The upload and the
        result are streamed (O(:data:`CHUNK`) memory whatever the volume's size)."""
        path = Path(image_path)
        if not path.is_file():
            raise DenoiseServerError(f"{path} does not exist")
        body = _MultipartBody({"params": json.dumps(params or {})}, {"file": path})
        with self._request("POST", f"/infer/{urllib.parse.quote(model)}", {"output": "all"}, body,
                           body.content_type, action="denoising") as response:
            return self._save_multipart(response.headers.get("Content-Type", ""), response, Path(output_dir))

    @staticmethod
    def _save_multipart(content_type: str, stream: BinaryIO, output_dir: Path) -> tuple[Path, dict]:
        """Parse the multipart answer of ``/infer?output=all`` from ``stream`` to a file in ``output_dir``."""
        if not content_type.startswith("multipart/"):
            raise DenoiseServerError("the server answered without a result image")
        header = email.message.Message()
        header["Content-Type"] = content_type
        boundary = header.get_param("boundary")
        if not boundary or not isinstance(boundary, str):
            raise DenoiseServerError("the server's multipart answer has no boundary")
        try:
            result_path, result_json = _MultipartReader(stream, boundary).save(output_dir)
        except (TimeoutError, OSError) as error:
            raise DenoiseServerError(f"the result download failed ({error})") from None
        if result_path is None:
            raise DenoiseServerError("the server's answer held no result image")
        return result_path, result_json

    # --- datastore, corrections, review
    def datastore_ids(self) -> list[str]:
        return sorted((self._json("GET", "/datastore/", {"output": "all"}, action="listing studies") or {})
                      .get("objects", {}))

    def upload_image(self, image_path: str | os.PathLike, image_id: str) -> str:
        """Upload a volume file to the datastore as ``image_id`` (streamed); returns the id the server kept."""
        answer = self._send_file("PUT", "/datastore/image", {"image": image_id}, {"params": "{}"},
                                 {"file": Path(image_path)}, "uploading studies")
        return str(answer.get("image", image_id))

    def save_correction(self, image_id: str, corrected_path: str | os.PathLike,
                        regions_sha256: str | None = None) -> dict:
        """Save a corrected denoised volume as the ``final`` label of ``image_id`` (a training pair).

        ``regions_sha256``: the ``sha256`` that :meth:`save_regions` returned for the region map sent with this
        correction (send the map first). The server binds the two; a correction saved without it is trained
        without regions, whatever map an earlier correction of the image had."""
        params = {"regions_sha256": regions_sha256} if regions_sha256 else {}
        return self._send_file("PUT", "/datastore/label", {"image": image_id, "tag": "final"},
                               {"params": json.dumps(params)}, {"label": Path(corrected_path)}, "saving corrections")

    def save_regions(self, image_id: str, labelmap_path: str | os.PathLike, regions: Sequence[Any]) -> dict:
        """Save the marked regions of ``image_id``'s correction as its ``regions`` label.

        Args:
            image_id: the datastore image.
            labelmap_path: uint8 label map on the image's grid, NIfTI (``regions.write_region_map``); value ``i``
                is ``regions[i - 1]``, 0 no region.
            regions: :class:`ADLDenoiseLib.regions.Region` objects (anything with ``to_params(value)``) in
                label order.

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
        params = {"regions": [region.to_params(value) for value, region in enumerate(regions, start=1)]}
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

    def download_label(self, image_id: str, tag: str, target: str | os.PathLike) -> Path:
        """Download ``image_id``'s label ``tag`` to the file ``target`` (streamed to disk)."""
        with self._request("GET", "/datastore/label", {"label": image_id, "tag": tag},
                           action="downloading studies") as response:
            return self._download(response, Path(target))

    def download_image(self, image_id: str, output_dir: str | os.PathLike) -> Path:
        """Download the datastore image ``image_id`` into ``output_dir`` under its datastore file name (streamed
        to disk)."""
        info = self._json("GET", "/datastore/image/info", {"image": image_id}, action="downloading studies")
        name = _safe_name((info or {}).get("name"), f"{_safe_name(image_id, 'image')}.nii.gz")
        with self._request("GET", "/datastore/image", {"image": image_id}, action="downloading studies") as response:
            return self._download(response, Path(output_dir) / name)

    def _download(self, response: BinaryIO, target: Path) -> Path:
        try:
            return _copy_to_file(response, target)
        except (TimeoutError, OSError) as error:
            raise DenoiseServerError(f"the download of {target.name} from {self.server_url} failed ({error})"
                                     ) from None

    def next_study(self, exclude: list[str] | None = None) -> dict | None:
        """The next study without a review verdict, or None when the queue is empty."""
        answer = self._json("POST", "/activelearning/next_unreviewed", payload={"exclude": exclude or []},
                            action="the review queue")
        return answer if answer and answer.get("id") else None

    def review(self, image_id: str, verdict: str, reviewer: str, reason: str | None = None,
               model: str | None = None) -> dict:
        return self._json("POST", f"/review/{urllib.parse.quote(image_id)}",
                          payload={"verdict": verdict, "reviewer": reviewer, "reason": reason, "model": model},
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
