"""Denoise one :class:`~lib.imaging.Volume` with a named model: the classical baselines or a learned network
(ADL 2D/3D, TDDL-GCN) with its weights. Shared by ``cli.py denoise`` (one volume) and ``cli.py denoise-batch``
(whole archives), so both choose the model, find and check the weights and run the network the same way.

Arrays are float32 (z, y, x) or (y, x) in the modality's units (CT in HU); the result has the input's shape and
units. No file is written here (I/O stays with the callers). A module of ``lib`` rather than of
``lib.denoisers``: importing that package loads torch and the classical denoisers, and the command line imports
this module's names at start-up (``cli.py --help`` stays fast); they are loaded here only when a volume is denoised.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .imaging import Volume

__all__ = [
    "ADL_3D_MODEL",
    "ADL_MODEL",
    "AUTO_MODEL",
    "DENOISE_LEARNED_MODELS",
    "DenoiseOptions",
    "DenoiseRefused",
    "DenoiseResult",
    "GCN_MODEL",
    "LEARNED_MODELS",
    "MODEL_LABELS",
    "MODEL_NETWORKS",
    "ModelCache",
    "choose_model",
    "denoise_volume",
    "refuse_constant",
    "weights_for",
]

log = logging.getLogger(__name__)

ADL_MODEL = "adl"
AUTO_MODEL = "auto"
GCN_MODEL = "tddl_gcn"
LEARNED_MODELS = (ADL_MODEL, GCN_MODEL)
#: the app's 3D ADL weights (model/pretrained_adl_3d_<modality>.pt); trained with 'train --model adl --spatial-dims 3'
ADL_3D_MODEL = "adl_3d"
DENOISE_LEARNED_MODELS = (ADL_MODEL, ADL_3D_MODEL, GCN_MODEL)
#: what each learned model is called in messages, and the network class its weight files must hold
MODEL_LABELS = {ADL_MODEL: "ADL", ADL_3D_MODEL: "ADL 3D", GCN_MODEL: "TDDL-GCN"}
MODEL_NETWORKS = {ADL_MODEL: "EfficientUNetDenoiser", ADL_3D_MODEL: "EfficientUNetDenoiser", GCN_MODEL: "GCNDenoiser"}


class DenoiseRefused(ValueError):
    """The volume cannot be denoised with the options given (one line saying what is wrong and what to do)."""


@dataclass(frozen=True)
class DenoiseOptions:
    """How to denoise. ``model``: "auto" (adl where weights for the volume's modality are installed, else bm3d),
    a classical name (bm3d, nlm, gaussian, bm4d) or a learned one (adl, adl_3d, tddl_gcn). The other fields apply
    to the learned models only: ``weights`` (file; None = the installed default for the modality), ``roi_size``
    (sliding window in pixels), ``overlap`` (fraction in [0, 1)), ``sw_batch_size``, ``fp32`` (no reduced
    precision), ``planes`` ("auto", "slices", "orthogonal"), ``search_window`` (TDDL-GCN, odd),
    ``low_frequency_restoration`` (in-plane Gaussian width in pixels of the removed content given back,
    :mod:`lib.lesions.low_frequency_restoration`; None = the modality's default, 0 = off)."""

    model: str = AUTO_MODEL
    weights: Path | None = None
    roi_size: tuple[int, ...] | None = None
    overlap: float | None = None
    sw_batch_size: int | None = None
    fp32: bool = False
    planes: str = "auto"
    search_window: int | None = None
    low_frequency_restoration: float | None = None
    progress: bool = True


@dataclass
class DenoiseResult:
    """The denoised array (input shape and units), the model that ran (``auto`` resolved), and for a learned
    model its weight file, version id and SHA-256 and the low-frequency restoration width applied in pixels (None
    for the classical ones)."""

    array: np.ndarray
    model: str
    weights: Path | None = None
    weights_version: str | None = None
    weights_sha256: str | None = None
    low_frequency_restoration: float | None = None


@dataclass
class ModelCache:
    """Loaded networks by (weight file, device): a batch loads each model once, not once per series."""

    loaded: dict = field(default_factory=dict)

    def get(self, path: Path, device: str):
        from .predict import load_denoiser

        key = (str(Path(path).resolve()), str(device))
        if key not in self.loaded:
            self.loaded[key] = load_denoiser(path, device=device)
        return self.loaded[key]


def refuse_constant(volume: Volume, name: str) -> None:
    """Raise :class:`DenoiseRefused` for a constant image (nothing to denoise)."""
    if float(np.ptp(volume.array)) == 0.0:
        raise DenoiseRefused(f"{name} holds a constant image (every voxel {float(volume.array.flat[0]):g}): "
                             "nothing to process")


def choose_model(options: DenoiseOptions, volume: Volume) -> tuple[str, str]:
    """The model to run for ``volume`` (``auto`` resolved) and a note for the user ("" when nothing to say)."""
    if options.model != AUTO_MODEL:
        return options.model, ""
    from .weights import find_weights

    has_adl = options.weights or (volume.modality in ("CT", "MR") and find_weights(ADL_MODEL, volume.modality))
    if has_adl:
        return ADL_MODEL, ""
    return "bm3d", f"no ADL weights installed for {volume.modality}"


def weights_for(model: str, modality: str | None, weights: Path | None, name: str) -> Path:
    """The weight file of the learned ``model``: ``weights`` when given, else the published or shipped default
    for ``modality`` (:func:`lib.weights.find_weights`). ``name`` names the input in messages."""
    label = MODEL_LABELS[model]
    if weights:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise DenoiseRefused(f"{label} weights {path} not found")
        return path
    if modality not in ("CT", "MR"):
        raise DenoiseRefused(f"cannot tell whether {name} is CT or MR: give --modality ct|mr (or --weights)")
    from .weights import candidate_weights, find_weights

    path = find_weights(model, modality)
    if path is not None:
        return path
    candidates = candidate_weights(model, modality)
    hint = ""
    if model == GCN_MODEL and modality == "MR":
        hint = " (the TDDL-GCN is a CT model; for MR train one on MR data)"
    train = f"--model {ADL_MODEL} --spatial-dims 3" if model == ADL_3D_MODEL else f"--model {model}"
    raise DenoiseRefused(f"no {label} weights for {modality}: neither {candidates[0]} nor {candidates[1]} exists; "
                         f"pass --weights PATH or train one with 'cli.py train {train}'{hint}")


def _weights_version(model: str, path: Path, modality: str | None, given: bool) -> tuple[str, str]:
    """(version id, SHA-256) of a weight file: the store's id for the app's installed weights, else the file name."""
    from .runtime.hashing import file_sha256

    if not given and modality in ("CT", "MR"):
        from .weights import ModelStore

        served = ModelStore(path.parent).served(model, modality)
        if served is not None and served.path == path:
            return served.version, served.sha256
    return f"file:{path.name}", file_sha256(path)


def _denoise_learned(volume: Volume, model_name: str, options: DenoiseOptions, device: str, name: str,
                     cache: ModelCache | None) -> DenoiseResult:
    from .lesions.low_frequency_restoration import apply_restoration
    from .weights.format import restoration_of
    from .predict import (NonFiniteOutputError, check_finite_output, denoise_array, load_denoiser,
                          uses_orthogonal_planes)

    modality = volume.modality if volume.modality in ("CT", "MR") else None
    path = weights_for(model_name, modality, options.weights, name)
    model = cache.get(path, device) if cache is not None else load_denoiser(path, device=device)
    label = MODEL_LABELS[model_name]
    held = model.metadata.get("network_class")
    if held != MODEL_NETWORKS[model_name]:
        other = next((m for m, c in MODEL_NETWORKS.items() if c == held), None)
        raise DenoiseRefused(f"{path.name} holds a {held} network, not {label}"
                             + (f": use --model {other}" if other else ""))
    if model_name == ADL_3D_MODEL and model.spatial_dims != 3:  # (--model adl takes either)
        raise DenoiseRefused(f"{path.name} holds a {model.spatial_dims}D network: use --model {ADL_MODEL}")
    if options.search_window is not None:
        model.network.inference_search_window = options.search_window
    if modality is None:
        log.info("modality of %s unknown: using the weights' modality %s", name, model.modality)
        modality = model.modality
    if model.modality != modality:
        guessed = volume.metadata.get("modality_source") == "guessed"
        hint = (f" (guessed from its values; add --modality {model.modality.lower()} if it is {model.modality})"
                if guessed else "")
        raise DenoiseRefused(f"the {label} weights {path.name} were trained for {model.modality} but the input is "
                             f"{modality}{hint}")
    if options.planes == "auto":
        orthogonal = uses_orthogonal_planes(model, modality, volume.array.shape, volume.spacing)
    else:
        orthogonal = options.planes == "orthogonal"
        if orthogonal and (model.spatial_dims != 2 or model_name == GCN_MODEL):
            raise DenoiseRefused(f"--planes orthogonal is for the 2D {MODEL_LABELS[ADL_MODEL]} network, not {label}")
        if orthogonal and (volume.array.ndim != 3 or min(volume.array.shape) < 2):
            raise DenoiseRefused(f"--planes orthogonal needs a volume, but {name} is a single slice "
                                 f"{volume.array.shape}")
    log.info("%s weights %s (%dD, %s)%s", label, path, model.spatial_dims, model.modality,
             ", mean over the three orthogonal planes" if orthogonal else "")
    # the GCN runs a whole slice per pass with bounded memory; one slice at a time keeps it at ~1 GB
    sw_batch = options.sw_batch_size or (1 if model_name == GCN_MODEL else None)  # None: 4 on CUDA, 1 on a CPU
    array = denoise_array(model, volume.array, modality, device=device, roi_size=options.roi_size,
                          overlap=0.25 if options.overlap is None else options.overlap,
                          sw_batch_size=sw_batch, progress=options.progress, amp=not options.fp32,
                          orthogonal_planes=orthogonal)
    version, sha = _weights_version(model_name, path, modality, options.weights is not None)
    try:  # a diverged or damaged network: say so, rather than let the writer blame the file
        check_finite_output(array, f"{label} (weights {path.name}, version {version})")
    except NonFiniteOutputError as error:
        raise DenoiseRefused(f"not denoised: {error}") from None
    # give back the lesion contrast the network removed with the noise (lesions before PSNR); None = the default
    array, sigma = apply_restoration(volume.array, array, modality, options.low_frequency_restoration,
                                     weights_sigma_px=restoration_of(model.metadata))
    return DenoiseResult(array, model_name, path, version, sha, sigma)


def denoise_volume(volume: Volume, options: DenoiseOptions, device: str, *, name: str = "the input",
                   cache: ModelCache | None = None) -> DenoiseResult:
    """Denoise ``volume`` (array (z, y, x) or (y, x), modality units) with ``options.model`` on ``device``
    ("cpu", "cuda", "cuda:1"); ``name`` names the input in messages, ``cache`` keeps loaded networks between
    calls. Memory: one copy of the volume plus the model's working set.

    Raises:
        DenoiseRefused: constant image, unknown modality for a model that needs it, missing or wrong weights.
    """
    refuse_constant(volume, name)
    model_name, _ = choose_model(options, volume)
    if model_name in DENOISE_LEARNED_MODELS:
        return _denoise_learned(volume, model_name, options, device, name, cache)
    from .denoisers import CLASSICAL_DENOISERS, denoise_classical  # here: torch, scipy, skimage only when used

    if model_name not in CLASSICAL_DENOISERS:
        raise DenoiseRefused(f"unknown model {model_name!r}: use {AUTO_MODEL}, "
                             f"{', '.join(sorted(CLASSICAL_DENOISERS))} or {', '.join(DENOISE_LEARNED_MODELS)}")
    if volume.modality not in ("CT", "MR"):
        raise DenoiseRefused(f"cannot tell whether {name} is CT or MR: give --modality ct|mr")
    array = denoise_classical(model_name, volume.array, modality=volume.modality, progress=options.progress)
    return DenoiseResult(np.asarray(array, np.float32), model_name)
