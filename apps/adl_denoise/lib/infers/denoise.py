"""The MONAI Label infer task of a learned denoiser (ADL or TDDL-GCN): volume in, denoised volume out.

Image-to-image, so it does not use MONAI Label's segmentation pipeline (LoadImage -> Orientation -> ... ->
Restored -> Writer): that pipeline needs workarounds for today's monai (``image_path`` under Spacingd, a
non-RAS input coming back flipped, a uint8 cast requested by the official Slicer plugin). Instead :func:`lib.imaging.read_volume` reads the request's image (NIfTI, NRRD,
MHA, a DICOM file or series folder), :func:`lib.predict.denoise_array` denoises it with bounded memory
(slice-wise or 3D sliding window), and :func:`lib.imaging.write_volume` writes the result on exactly the input's
grid (spacing, origin, direction, any orientation), CT in HU.

Request keys (all optional, besides MONAI Label's own ``image``): ``modality`` (``auto`` | ``ct`` | ``mr``),
``result_extension`` (``.nii.gz`` | ``.nii`` | ``.nrrd`` | ``.mha`` | ``dicom``: a derived DICOM series of a
DICOM input, zipped), ``result_dtype`` (``float32``, or ``int16`` for CT in whole HU), ``device``
(``auto`` | ``cpu`` | ``cuda``), ``low_frequency_restoration`` (learned models: ``auto`` = the served weight file's
own width, else the modality's default, or the in-plane Gaussian width in pixels of the removed content given back,
0 = the network's output alone; :mod:`lib.lesions.low_frequency_restoration`). The response says which width was
applied.

Bad input raises ``fastapi.HTTPException`` with a 4xx status and a one-line reason; the server keeps
serving. A result holding NaN or infinite values is never returned (HTTP 500, nothing written or recorded).

Concurrent requests share one cached network per (weights file, device): inference only reads it (eval mode,
``torch.inference_mode``), so its parameters and batch-norm statistics are never written while it serves.
"""
from __future__ import annotations

import difflib
import logging
import os
import shutil
import tempfile
import threading
import time
import zipfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from fastapi import HTTPException
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from ..imaging import (ImageReadError, ImageWriteError, denoising_derivation, guess_modality, read_volume,
                       write_volume)
from ..imaging.errors import ImageTooLargeError
from ..imaging.guards import check_plausible
from ..imaging.io import nifti_grid_problem
from ..lesions.low_frequency_restoration import apply_restoration, check_sigma_px
from ..predict import (NonFiniteOutputError, check_device_name, check_finite_output, denoise_array, load_denoiser,
                       resolve_device, uses_orthogonal_planes)
from ..runtime.hashing import file_sha256
from ..weights.format import UnusableWeightsError, restoration_of
from ..weights.store import ModelStore, WeightsVersion

log = logging.getLogger(__name__)

__all__ = ["DenoiseInferTask", "ClassicalInferTask", "RESULT_EXTENSIONS", "INFER_PARAMS", "http_error_for_image"]

RESULT_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha", "dicom")
#: the request keys the app reads (``store_to_pacs`` in main.py, ``timeout`` by MONAI Label); other keys are
#: ignored (MONAI Label's clients send their own), but one that looks like a misspelling of these is refused
INFER_PARAMS = ("modality", "result_extension", "result_dtype", "device", "low_frequency_restoration",
                "store_to_pacs", "timeout")
RESULT_DTYPES = ("float32", "int16")
MODALITIES = ("CT", "MR")


def http_error_for_image(error: Exception) -> HTTPException:
    """4xx for an image that cannot be used: 413 when too large, 422 otherwise (corrupt, not an image, 4D,
    NaN, empty, constant ...)."""
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    status = 413 if "too large" in message else 422
    return HTTPException(status_code=status, detail=f"cannot denoise this image: {message}")


class _WeightsReplaced(ValueError):
    """The served weight file changed between hashing it and loading it."""


def check_param_names(request: dict) -> None:
    """HTTP 422 for a key that looks like a misspelling of one of :data:`INFER_PARAMS` (``Modality``,
    ``low_frequency_restauration``, ``restoration``, ``dtype``): it would be ignored, and the result made with the
    default the client meant to change (restoration on, a guessed modality) returned as if it had been honoured."""
    for key in request:
        if not isinstance(key, str) or key in INFER_PARAMS:
            continue
        word = key.strip().lower()
        near = difflib.get_close_matches(word, INFER_PARAMS, n=1, cutoff=0.75) or \
            [name for name in INFER_PARAMS if len(word) >= 4 and name.endswith("_" + word)]
        if near:
            raise HTTPException(status_code=422, detail=f"params.{key} is not a parameter of this app: did you mean "
                                                        f"{near[0]}? (parameters: {', '.join(INFER_PARAMS)})")


def device_name(asked: Any, present: bool = True) -> str:
    """``asked`` (a request's or the conf's ``device``; None = ``auto``) as ``auto``, ``cpu``, ``cuda`` or
    ``cuda:N`` (with ``present``: of a GPU this server has); HTTP 422 naming the choices otherwise
    (:func:`lib.predict.check_device_name`)."""
    try:
        return check_device_name(asked, present)
    except ValueError as error:
        raise HTTPException(status_code=422, detail=str(error)) from None


class DenoiseInferTask(InferTask):
    """Denoise with a learned model; the weights follow the model store (published beats shipped).

    Args:
        model: ``"adl"`` or ``"tddl_gcn"``.
        method: what the method is, for ``/info``.
        modalities: the modalities this model may serve (weights are looked up per modality).
        store: the :class:`~lib.weights.store.ModelStore` of the app's model folder.
        device: ``auto`` (GPU when present), ``cpu`` or ``cuda``.
        default_modality: used when the request says ``auto`` and the file carries no DICOM modality
            (``auto``: guessed from the values, HU-like -> CT).
        result_extension: default output format.
        preload: load the served weights at start-up instead of on the first request.
        max_concurrent: requests denoised at the same time by this model; more wait their turn. Each running
            request holds its network activations (about 1 GB per 512 x 512 slice in flight for the full 2D ADL
            on a CPU) besides its volume, so a bound keeps 8 parallel requests from exhausting memory. As many
            again may read their image and wait with it; the rest wait before reading theirs (a volume each).
        max_voxels: largest image a request may send (HTTP 413 above, naming the model, its limit and
            ``voxel_limit_setting``); None: the default of :func:`lib.imaging.read_volume`.
        voxel_limit_setting: the conf key that sets ``max_voxels`` (``max_voxels_<model>`` or ``max_voxels``).
    """

    #: learned models give back the low-frequency content they removed (lesion contrast); classical ones do not
    restores_low_frequencies = True

    def __init__(self, model: str, method: str, modalities: tuple[str, ...], store: ModelStore,
                 device: str = "auto", default_modality: str = "auto", result_extension: str = ".nii.gz",
                 preload: bool = False, max_concurrent: int = 2, max_voxels: int | None = None,
                 voxel_limit_setting: str = "max_voxels") -> None:
        super().__init__(type=InferType.OTHERS, labels=[], dimension=3,
                         description=f"{method}: denoises {', '.join(modalities)} volumes, returns the denoised "
                                     f"volume on the input's grid (CT in HU)",
                         config={"modality": ["auto", *[m.lower() for m in modalities]],
                                 "result_extension": list(RESULT_EXTENSIONS),
                                 "result_dtype": list(RESULT_DTYPES), "device": ["auto", "cpu", "cuda"],
                                 **({"low_frequency_restoration": "auto"} if self.restores_low_frequencies else {})})
        self.model = model
        self.method = method
        self.modalities = tuple(m.upper() for m in modalities)
        self.store = store
        self.device = device
        self.default_modality = default_modality.upper()
        if result_extension not in RESULT_EXTENSIONS:
            raise ValueError(f"result_extension must be one of {RESULT_EXTENSIONS}, got {result_extension!r}")
        self.result_extension = result_extension
        self.max_voxels = max_voxels
        self.voxel_limit_setting = voxel_limit_setting
        self._cache: dict[tuple, Any] = {}
        self._lock = threading.Lock()
        if int(max_concurrent) < 1:
            raise ValueError(f"max_concurrent must be >= 1, got {max_concurrent}")
        self._slots = threading.BoundedSemaphore(int(max_concurrent))
        # requests past their checks that may hold their volume: those denoising and as many reading or waiting
        self._admitted = threading.BoundedSemaphore(2 * int(max_concurrent))
        if preload:
            for modality in self.modalities:
                served = self.store.served(model, modality)
                if served is not None:
                    self._denoiser(served, self._device(None))

    # --- MONAI Label interface
    def is_valid(self) -> bool:
        return True  # listed even without weights: /info says which modalities have them

    def info(self) -> dict[str, Any]:
        info = super().info()
        info["method"] = self.method
        info["model"] = self.model
        info["weights"] = {m.lower(): self.describe_weights(m) for m in self.modalities}
        return info

    def describe_weights(self, modality: str) -> dict:
        """Weights version, file and training summary for ``modality`` (``{"available": False}`` if none)."""
        served = self.store.served(self.model, modality)
        if served is None:
            return {"available": False, "modality": modality.upper()}
        try:
            metadata = self._denoiser(served, "cpu").metadata
        except ValueError as error:
            return {"available": False, "modality": modality.upper(), "error": str(error)}
        training = metadata.get("training") or {}
        validation = training.get("validation") or []
        return {
            "available": True, "modality": modality.upper(), "version": served.version,
            "sha256": served.sha256[:16], "file": served.path.name, "created_utc": metadata.get("created_utc"),
            "spatial_dims": metadata.get("spatial_dims"), "network": (metadata.get("network") or {}).get("class"),
            "training": {"steps": training.get("steps"), "data": training.get("data"),
                         "hardware": training.get("hardware"),
                         "final_validation": validation[-1] if validation else None,
                         "fine_tuned_from": training.get("fine_tuned_from")},
        }

    def __call__(self, request: dict) -> tuple[str | None, dict]:
        started = time.perf_counter()
        check_param_names(request)
        image = request.get("image")
        if not isinstance(image, (str, os.PathLike)) or not str(image):
            raise HTTPException(status_code=422, detail="no image given (datastore id, session or uploaded file)")
        result_extension = str(request.get("result_extension") or self.result_extension)
        if result_extension in (".dcm", "dcm", "DICOM"):
            result_extension = "dicom"
        if result_extension not in RESULT_EXTENSIONS:
            raise HTTPException(status_code=422, detail=f"result_extension must be one of {', '.join(RESULT_EXTENSIONS)},"
                                                        f" got {result_extension!r}")
        result_dtype = str(request.get("result_dtype") or "float32").lower()
        if result_dtype not in RESULT_DTYPES:
            raise HTTPException(status_code=422, detail=f"result_dtype must be one of {', '.join(RESULT_DTYPES)} "
                                                        f"(a denoised volume is not a label map), got {result_dtype!r}")
        # every parameter is checked before the image is read (seconds for a large one)
        if str(request.get("modality") or "auto").upper() not in ("AUTO", *MODALITIES):
            raise HTTPException(status_code=422, detail=f"modality must be auto, ct or mr, got {request.get('modality')!r}")
        device = self._device(request.get("device"))
        restoration = self._restoration(request)
        # at most twice as many requests as denoise at once hold a volume: the others wait before reading theirs
        with self._admitted:
            return self._read_denoise_write(request, image, result_extension, result_dtype, device, restoration,
                                            started)

    def _read_denoise_write(self, request: dict, image: Any, result_extension: str, result_dtype: str, device: Any,
                            restoration: Any, started: float) -> tuple[str, dict]:
        """The checked request's image read, denoised in one of the model's slots and written; (path, result)."""
        # an upload sits in a server-side temporary file: name it as such, not by its temporary path
        uploaded = Path(str(image)).parent == Path(tempfile.gettempdir())
        try:
            volume = read_volume(image, max_voxels=self.max_voxels)
        except ImageTooLargeError as error:  # the limit is this model's: the models need different memory a voxel
            what = "the uploaded file" if uploaded else Path(str(image)).name
            raise HTTPException(status_code=413, detail=(
                f"cannot denoise this image with {self.model}: {what} is too large: "
                f"{' x '.join(map(str, error.shape))} = {error.voxels:,} voxels exceeds {self.model}'s limit of "
                f"{error.limit:,} voxels (raise it with --conf {self.voxel_limit_setting} on the server, or crop "
                "the volume)")) from None
        except ImageReadError as error:
            raise http_error_for_image(ValueError(str(error).replace(str(image), "the uploaded file"))
                                       if uploaded else error) from None
        if volume.is_constant:
            raise HTTPException(status_code=422, detail="cannot denoise this image: it is constant (empty or blank)")
        modality, modality_from = self._modality(request, volume)
        try:  # read_volume checked the values for the modality it guessed; the request or the conf may name another
            check_plausible(volume.array, modality, "the image")
        except ImageReadError as error:
            raise http_error_for_image(error) from None
        if result_dtype == "int16" and modality != "CT":
            raise HTTPException(status_code=422, detail="result_dtype int16 is for CT in HU; MR results are float32")
        problem = nifti_grid_problem(volume.direction) if result_extension in (".nii.gz", ".nii") else None
        if problem:  # refused before the work, not when writing the result
            raise HTTPException(status_code=422, detail=f"cannot write the result as {result_extension}: the input's "
                                                        f"{problem}")
        if result_extension == "dicom" and not volume.dicom_headers:
            raise HTTPException(status_code=422, detail="a DICOM result needs a DICOM input (a derived series is "
                                                        "built on the input's headers)")
        with self._slots:
            try:
                denoised, version = self.denoise(volume.array, modality, device, spacing=volume.spacing)
                # the input was checked finite: a NaN / Inf result is the model's fault, an error, never a result
                check_finite_output(denoised, f"{self.model} (weights {version.get('weights_version')})")
            except UnusableWeightsError as error:  # the server's fault, not the image's (a ValueError too)
                log.error("no result returned: %s", error)
                raise HTTPException(status_code=500, detail=f"not denoised: the served {self.model} weights are "
                                                            f"unusable: {error}") from None
            except ValueError as error:
                raise http_error_for_image(error) from None
            except NonFiniteOutputError as error:
                log.error("no result returned: %s", error)
                raise HTTPException(status_code=500, detail=f"not denoised: {error}; no result returned") from None
            # "auto": the served file's own width where it names one, else the modality's (never another file's)
            denoised, restoration = apply_restoration(volume.array, denoised, modality, restoration,
                                                      weights_sigma_px=version.pop("weights_restoration_px", None))
        out = volume.with_array(denoised)
        try:
            derivation = denoising_derivation(self.model, version.get("weights_version"), version.get("weights_sha256"),
                                              restoration if self.restores_low_frequencies else None)
            path = self._write(out, volume, result_extension, result_dtype, derivation)
        except ImageWriteError as error:
            raise HTTPException(status_code=422, detail=f"cannot write the result: {error}") from None
        seconds = time.perf_counter() - started
        result = {
            "model": self.model, "method": self.method, "modality": modality, "modality_from": modality_from,
            **version, "device": str(device),
            "seconds": round(seconds, 3),
            "shape": list(volume.array.shape), "spacing": list(volume.spacing), "result_dtype": result_dtype,
            "result_extension": result_extension,
            **({"low_frequency_restoration": restoration} if self.restores_low_frequencies else {}),
        }
        log.info("denoised %s with %s (%s, weights %s) in %.2f s", Path(str(image)).name, self.model, modality,
                 version["weights_version"], seconds)
        return str(path), result

    def denoise(self, array: np.ndarray, modality: str, device, spacing: Sequence[float] | None = None
                ) -> tuple[np.ndarray, dict]:
        """Denoise ``array`` (modality units, voxel ``spacing`` in mm) with the weights served now; returns the
        result and ``{"weights_version", "weights_sha256" (whole, hex), "planes", "weights_restoration_px"}``
        (``planes``: "slices" slice by slice, "orthogonal" the mean over the three orthogonal planes where
        :func:`lib.predict.uses_orthogonal_planes` says so, "volume" for a 3D network; ``weights_restoration_px``:
        the served file's own restoration width, None where it names none). HTTP 404 when no weights are installed
        for ``modality``."""
        for _ in range(3):
            served = self.store.served(self.model, modality)
            if served is None:
                raise HTTPException(status_code=404, detail=f"no {self.model} weights for {modality} are installed in "
                                                            f"{self.store.model_dir}: train or fine-tune first")
            try:
                loaded = self._denoiser(served, device)
                break
            except _WeightsReplaced:  # published or restored while being read: ask the store again
                log.info("%s weights for %s replaced while loading; reading them again", self.model, modality)
        else:
            raise HTTPException(status_code=503, detail=f"not denoised: the {self.model} weights for {modality} are "
                                                        f"being replaced; try again")
        orthogonal = uses_orthogonal_planes(loaded, modality, array.shape, spacing)
        planes = "volume" if loaded.spatial_dims == 3 else "orthogonal" if orthogonal else "slices"
        # denoise_array's default batch: 4 slices (or 3D windows) per pass on CUDA, 1 on a CPU
        denoised = denoise_array(loaded, array, modality, device=device, orthogonal_planes=orthogonal)
        return denoised, {"weights_version": served.version, "weights_sha256": served.sha256, "planes": planes,
                          "weights_restoration_px": restoration_of(loaded.metadata)}

    # --- helpers
    def _restoration(self, request: dict) -> float | None:
        """The low-frequency restoration width (pixels) asked for, None for ``auto`` (the served file's default, as
        :func:`apply_restoration` takes it), 0 for a classical model; HTTP 422 for a bad value or a width asked of
        a classical model."""
        asked = request.get("low_frequency_restoration")
        if asked is None or (isinstance(asked, str) and asked.strip().lower() in ("", "auto")):
            return None if self.restores_low_frequencies else 0.0
        if isinstance(asked, str):
            try:
                asked = float(asked)
            except ValueError:
                raise HTTPException(status_code=422, detail=f"low_frequency_restoration must be auto or a width in "
                                                            f"pixels, got {asked!r}") from None
        try:
            sigma = check_sigma_px(asked)
        except ValueError as error:
            raise HTTPException(status_code=422, detail=f"low_frequency_restoration: {error}") from None
        if sigma > 0 and not self.restores_low_frequencies:
            raise HTTPException(status_code=422, detail=f"low_frequency_restoration applies to the learned models; "
                                                        f"{self.model} is a classical method")
        return sigma

    def _modality(self, request: dict, volume) -> tuple[str, str]:
        """(modality, where it came from: "request", "DICOM Modality", "server conf" or "guessed from the values"),
        for a request whose ``modality`` :meth:`__call__` has checked (auto, ct or mr)."""
        asked, source = str(request.get("modality") or "auto").upper(), "request"
        tag = str(volume.metadata.get("dicom_modality") or "").strip().upper() if volume.dicom_headers else ""
        if asked == "AUTO":
            if volume.dicom_headers and volume.modality in MODALITIES:
                asked, source = volume.modality, "DICOM Modality"
            elif tag:  # a segmentation, a dose grid, NM ...: not an image these models denoise, whatever its values
                raise HTTPException(status_code=422, detail=f"this DICOM file's Modality is {tag}, not CT or MR: send "
                                                            f"modality ct or mr if it holds a CT or MR image")
            elif self.default_modality in MODALITIES:
                asked, source = self.default_modality, "server conf"
            else:
                asked, source = guess_modality(volume.array), "guessed from the values"  # HU-like values -> CT
        if source == "request" and volume.dicom_headers and volume.modality in MODALITIES and asked != volume.modality:
            # a CT denoised as MR comes back biased (soft tissue some 20 HU off), an MR as CT barely denoised
            raise HTTPException(status_code=422, detail=f"modality {asked.lower()} asked for, but this DICOM series "
                                                        f"is {volume.modality} (its Modality tag): leave modality at "
                                                        f"auto")
        if asked not in self.modalities:
            raise HTTPException(status_code=422, detail=f"{self.model} denoises {', '.join(self.modalities)} only, "
                                                        f"this image is {asked}")
        return asked, source

    def _device(self, asked: Any) -> Any:
        """The torch device of a request's ``device`` (or the server's): ``auto``, ``cpu``, ``cuda`` or ``cuda:N``
        of a GPU this server has; HTTP 422 naming the choices otherwise (torch accepts more names, e.g. ``meta`` or
        ``mps``, which fail half-way through the network)."""
        return resolve_device(device_name(asked or self.device))

    def _denoiser(self, served: WeightsVersion, device):
        """The loaded network of ``served`` on ``device``: cached, reloaded when the file changes (a new
        version published by a training run is picked up by the next request). :class:`_WeightsReplaced` when the
        file is no longer the one ``served`` hashed (a publication between the two): the network would be another
        version than the answer and the audit entry name."""
        try:
            mtime = served.path.stat().st_mtime_ns
        except FileNotFoundError:  # a restore removed the published file since
            raise _WeightsReplaced(f"{served.path} was replaced since it was hashed") from None
        key = (str(served.path), mtime, served.sha256, str(device))
        with self._lock:
            loaded = self._cache.get(key)
            if loaded is None:
                try:
                    loaded = load_denoiser(served.path, device=device)
                    # the bytes read are the served ones: no rename over the file since ``mtime``, same content
                    replaced = served.path.stat().st_mtime_ns != mtime or file_sha256(served.path) != served.sha256
                except UnusableWeightsError:
                    raise
                except FileNotFoundError:  # renamed away (a restore) between the two
                    raise _WeightsReplaced(f"{served.path} was replaced since it was hashed") from None
                except (ValueError, OSError) as error:  # a damaged served file: the server's fault, not the image's
                    raise UnusableWeightsError(f"version {served.version}: {error}") from None
                if replaced:
                    raise _WeightsReplaced(f"{served.path} was replaced since it was hashed")
                # keep one entry per (file, device): the old network of a replaced file is released
                self._cache = {k: v for k, v in self._cache.items() if (k[0], k[3]) != (key[0], key[3])}
                self._cache[key] = loaded
                log.info("loaded %s weights %s (%s) on %s", self.model, served.version, served.path.name, device)
            return loaded

    def _write(self, out, source, result_extension: str, result_dtype: str, derivation: str) -> Path:
        if result_extension == "dicom":
            folder = Path(tempfile.mkdtemp(prefix=f"{self.model}_result_"))
            name = None
            try:
                series = write_volume(out, folder / "series", series_description_suffix=f" [denoised {self.model}]",
                                      derivation=derivation)
                fd, name = tempfile.mkstemp(prefix=f"{self.model}_", suffix=".zip")
                os.close(fd)
                with zipfile.ZipFile(name, "w", zipfile.ZIP_DEFLATED) as zf:
                    for file in sorted(series.iterdir()):
                        zf.write(file, file.name)
                return Path(name)
            except BaseException:  # a ZIP cut short (a full disk) is no result: not left in the temp folder
                if name is not None:
                    Path(name).unlink(missing_ok=True)
                raise
            finally:
                shutil.rmtree(folder, ignore_errors=True)
        fd, name = tempfile.mkstemp(prefix=f"{self.model}_", suffix=result_extension)
        os.close(fd)
        os.unlink(name)  # write_volume never overwrites
        return write_volume(out, name, output_dtype=np.int16 if result_dtype == "int16" else np.float32)


class ClassicalInferTask(DenoiseInferTask):
    """A classical denoiser (no learned weights) behind the same interface, so that the whole workflow works on
    a machine where no learned weights are installed yet. The noise level is estimated blindly per slice
    (:mod:`lib.denoisers.classical`); CPU only."""

    restores_low_frequencies = False

    def __init__(self, model: str, method: str, modalities: tuple[str, ...], store: ModelStore, algorithm: str,
                 **kwargs) -> None:
        super().__init__(model, method, modalities, store, **kwargs)
        self.algorithm = algorithm
        self._config["device"] = ["cpu"]

    def describe_weights(self, modality: str) -> dict:
        return {"available": True, "modality": modality.upper(), "version": f"classical-{self.algorithm}",
                "sha256": "", "file": None, "network": None,
                "training": {"steps": 0, "data": "none: a classical method with a blind noise estimate"}}

    def denoise(self, array: np.ndarray, modality: str, device, spacing: Sequence[float] | None = None
                ) -> tuple[np.ndarray, dict]:
        from ..denoisers.classical import denoise_classical

        return denoise_classical(self.algorithm, array, modality), {"weights_version": f"classical-{self.algorithm}",
                                                                   "weights_sha256": ""}

    def _device(self, asked):
        device_name(asked, present=False)  # 422 for a name that is no device; a GPU asked for is not an error
        return torch.device("cpu")
