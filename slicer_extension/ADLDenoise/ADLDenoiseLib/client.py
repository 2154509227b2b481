"""Client of the ADL / TDDL-GCN MONAI Label app, with the Python standard library only (Slicer's Python has no
MONAI Label client, and a module must not depend on packages users would have to install).

Every failure becomes :class:`DenoiseServerError` with a message a radiologist can act on (server down, wrong
address, the server's own 4xx reason, a model failure).
"""
from __future__ import annotations

import email.parser
import email.policy
import json
import os
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Sequence

__all__ = ["DenoiseServerClient", "DenoiseServerError"]


class DenoiseServerError(RuntimeError):
    """A request failed. ``status`` is the HTTP status (None when the server could not be reached)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def _multipart(fields: dict[str, str], files: dict[str, Path]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts: list[bytes] = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, path in files.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{path.name}"\r\n'
                     f"Content-Type: application/octet-stream\r\n\r\n".encode())
        parts.append(path.read_bytes())
        parts.append(b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


class DenoiseServerClient:
    """Talks to the app at ``server_url`` (e.g. ``http://127.0.0.1:8000``).

    Args:
        server_url: the server's address.
        timeout: seconds to wait for an answer (denoising a large volume on a CPU takes minutes).
    """

    def __init__(self, server_url: str, timeout: float = 1800.0) -> None:
        url = (server_url or "").strip().rstrip("/")
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise DenoiseServerError(f"server address must look like http://host:port, got {server_url!r}")
        self.server_url = url
        self.timeout = timeout

    # --- transport
    def _request(self, method: str, path: str, query: dict | None = None, body: bytes | None = None,
                 content_type: str | None = None, timeout: float | None = None):
        url = self.server_url + path + (("?" + urllib.parse.urlencode(query)) if query else "")
        request = urllib.request.Request(url, data=body, method=method)
        if content_type:
            request.add_header("Content-Type", content_type)
        try:
            return urllib.request.urlopen(request, timeout=timeout or self.timeout)
        except urllib.error.HTTPError as error:
            raw = error.read()
            try:
                detail = json.loads(raw).get("detail")
            except (ValueError, AttributeError):
                detail = raw.decode("utf-8", "replace").strip()[:300]
            if error.code == 404 and not detail:
                detail = f"{path} not found: is {self.server_url} the denoising app?"
            raise DenoiseServerError(f"server said {error.code}: {detail or error.reason}", error.code) from None
        except urllib.error.URLError as error:
            raise DenoiseServerError(f"cannot reach the server at {self.server_url} ({error.reason}); is it running?"
                                     ) from None
        except (TimeoutError, OSError) as error:
            raise DenoiseServerError(f"no answer from {self.server_url} ({error})") from None

    def _json(self, method: str, path: str, query: dict | None = None, payload: Any = None,
              timeout: float | None = None) -> Any:
        body = None if payload is None else json.dumps(payload).encode()
        with self._request(method, path, query, body, "application/json" if body is not None else None,
                           timeout) as response:
            raw = response.read()
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            raise DenoiseServerError(f"{self.server_url}{path} did not answer JSON: is it the denoising app?") from None

    # --- models
    def info(self) -> dict:
        info = self._json("GET", "/info/", timeout=30)
        if not isinstance(info, dict) or "models" not in info:
            raise DenoiseServerError(f"{self.server_url} is not a MONAI Label server")
        return info

    def denoising_models(self) -> list[dict]:
        """``[{"name", "method", "weights": {modality: {"available", "version", ...}}}]`` of the server's
        denoising models (MONAI Label type ``others`` with a ``weights`` description)."""
        models = []
        for name, model in sorted(self.info()["models"].items()):
            if model.get("type") == "others" and "weights" in model:
                models.append({"name": name, "method": model.get("method", name), "weights": model["weights"]})
        return models

    # --- denoising
    def denoise(self, model: str, image_path: str | os.PathLike, output_dir: str | os.PathLike,
                params: dict | None = None) -> tuple[Path, dict]:
        """Upload ``image_path`` (NRRD / NIfTI), denoise it with ``model``; returns the result file (written in
        ``output_dir``) and the server's JSON (model, modality, weights version, seconds ...)."""
        path = Path(image_path)
        if not path.is_file():
            raise DenoiseServerError(f"{path} does not exist")
        body, content_type = _multipart({"params": json.dumps(params or {})}, {"file": path})
        with self._request("POST", f"/infer/{urllib.parse.quote(model)}", {"output": "all"}, body,
                           content_type) as response:
            header = response.headers.get("Content-Type", "")
            raw = response.read()
        return self._save_multipart(header, raw, Path(output_dir))

    @staticmethod
    def _save_multipart(content_type: str, raw: bytes, output_dir: Path) -> tuple[Path, dict]:
        if not content_type.startswith("multipart/"):
            raise DenoiseServerError("the server answered without a result image")
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + raw)
        result_json: dict = {}
        result_path: Path | None = None
        output_dir.mkdir(parents=True, exist_ok=True)
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            filename = part.get_filename()
            payload = part.get_payload(decode=True)
            if filename:
                result_path = output_dir / Path(filename).name
                result_path.write_bytes(payload)
            elif name == "params":
                result_json = json.loads(payload or b"{}")
        if result_path is None:
            raise DenoiseServerError("the server's answer held no result image")
        return result_path, result_json

    # --- datastore, corrections, review
    def datastore_ids(self) -> list[str]:
        return sorted((self._json("GET", "/datastore/", {"output": "all"}) or {}).get("objects", {}))

    def upload_image(self, image_path: str | os.PathLike, image_id: str) -> str:
        body, content_type = _multipart({"params": "{}"}, {"file": Path(image_path)})
        with self._request("PUT", "/datastore/image", {"image": image_id}, body, content_type) as response:
            answer = json.loads(response.read() or b"{}")
        return str(answer.get("image", image_id))

    def save_correction(self, image_id: str, corrected_path: str | os.PathLike) -> dict:
        """Save a corrected denoised volume as the ``final`` label of ``image_id`` (a training pair)."""
        body, content_type = _multipart({"params": "{}"}, {"label": Path(corrected_path)})
        with self._request("PUT", "/datastore/label", {"image": image_id, "tag": "final"}, body,
                           content_type) as response:
            return json.loads(response.read() or b"{}")

    def save_regions(self, image_id: str, labelmap_path: str | os.PathLike, regions: Sequence[Any]) -> dict:
        """Save the marked regions of ``image_id``'s correction as its ``regions`` label.

        Args:
            image_id: the datastore image.
            labelmap_path: uint8 label map on the image's grid, NIfTI (``regions.write_region_map``); value ``i``
                is ``regions[i - 1]``, 0 no region.
            regions: :class:`ADLDenoiseLib.regions.Region` objects (anything with ``to_params(value)``) in
                label order.

        The form field ``params`` is ``{"regions": [{"value", "name", "intent"[, "strength"]}, ...]}``.
        """
        path = Path(labelmap_path)
        if not path.is_file():
            raise DenoiseServerError(f"{path} does not exist")
        if not path.name.endswith((".nii.gz", ".nii")):
            raise DenoiseServerError(f"the region map must be NIfTI (.nii.gz), got {path.name}")
        if not regions:
            raise DenoiseServerError("no marked region to save")
        params = {"regions": [region.to_params(value) for value, region in enumerate(regions, start=1)]}
        body, content_type = _multipart({"params": json.dumps(params)}, {"label": path})
        with self._request("PUT", "/datastore/label", {"image": image_id, "tag": "regions"}, body,
                           content_type) as response:
            return json.loads(response.read() or b"{}")

    def label_info(self, image_id: str, tag: str) -> dict:
        """The info the datastore keeps with ``image_id``'s label ``tag`` (the ``params`` it was saved with)."""
        return self._json("GET", "/datastore/label/info", {"label": image_id, "tag": tag}) or {}

    def download_label(self, image_id: str, tag: str, target: str | os.PathLike) -> Path:
        """Download ``image_id``'s label ``tag`` to the file ``target``."""
        target = Path(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        with self._request("GET", "/datastore/label", {"label": image_id, "tag": tag}) as response:
            target.write_bytes(response.read())
        return target

    def download_image(self, image_id: str, output_dir: str | os.PathLike) -> Path:
        info = self._json("GET", "/datastore/image/info", {"image": image_id})
        name = Path(str((info or {}).get("name") or f"{image_id}.nii.gz")).name
        target = Path(output_dir) / name
        target.parent.mkdir(parents=True, exist_ok=True)
        with self._request("GET", "/datastore/image", {"image": image_id}) as response:
            target.write_bytes(response.read())
        return target

    def next_study(self, exclude: list[str] | None = None) -> dict | None:
        """The next study without a review verdict, or None when the queue is empty."""
        answer = self._json("POST", "/activelearning/next_unreviewed", payload={"exclude": exclude or []})
        return answer if answer and answer.get("id") else None

    def review(self, image_id: str, verdict: str, reviewer: str, reason: str | None = None,
               model: str | None = None) -> dict:
        return self._json("POST", f"/review/{urllib.parse.quote(image_id)}",
                          payload={"verdict": verdict, "reviewer": reviewer, "reason": reason, "model": model})

    # --- training and versions
    def start_training(self, model: str, params: dict | None = None) -> dict:
        return self._json("POST", f"/train/{urllib.parse.quote(model)}", payload=params or {})

    def training_status(self) -> dict:
        """MONAI Label's task status (``status``: SUBMITTED, RUNNING, DONE, ERROR, STOPPED) or ``{}``."""
        try:
            return self._json("GET", "/train/", {"check_if_running": "false"}) or {}
        except DenoiseServerError as error:
            if error.status == 404:  # no training ever ran
                return {}
            raise

    def training_stats(self, model: str) -> dict:
        """The app's progress record of ``model``: status, phase, step, PSNR scores, publication decision."""
        return (self.info().get("train_stats") or {}).get(model, {})

    def stop_training(self) -> Any:
        return self._json("DELETE", "/train/")

    def versions(self, model: str, modality: str = "ct") -> dict:
        return self._json("GET", f"/versions/{urllib.parse.quote(model)}", {"modality": modality})
