"""Whole-image inference with a trained learned denoiser (ADL's Efficient-UNet or the TDDL-GCN): loading
shipped weights, tiling, intensity units.

:func:`load_denoiser` reads the small weight file written by :func:`lib.weights.export_weights`
(fp16 state dict + network class and arguments + modality + training record; the class is looked up in
:data:`lib.networks.DENOISER_NETWORKS`); :func:`denoise_array` denoises a slice or a volume in its own units
(CT stays in HU):

* CT with a 2D network: keep only :func:`body_crop`'s box (everything but the air around the patient, with a
  margin; one box per volume); the air outside it is returned as acquired;
* normalise with :func:`lib.data.intensity_scaling_for` (the rule the model was trained with);
* 2D model: slice by slice, ``sw_batch_size`` slices at a time, in windows of at most ``roi_size`` (default
  512x512, clamped to the image: a typical CT slice is one window, since smaller overlapping windows recompute their
  overlaps, and one window goes to the network directly, without importing MONAI; a larger slice is tiled by
  :func:`even_windows` and blended by MONAI's ``sliding_window_inference``). 3D model:
  3D sliding window (default 96^3 windows). The image is first reflect-padded to multiples of 8 (the
  network down-samples three times) and the padding is cropped off again. The GCN
  (:class:`lib.networks.GCNDenoiser`) needs no padding (``size_multiple = 1``), gets each slice with its
  ``slice_context`` neighbours as channels, and runs a whole 512x512 slice in one pass (its k-NN search and
  graph convolutions are chunked internally, so memory stays bounded without tiling seams);
* undo the normalisation; voxels above the top of the range (CT: 3072 HU, metal on an extended-HU scale; MR: twice
  the volume's 99.5th percentile, a bright gadolinium-enhanced vessel) get the part the network never saw added back
  at their own voxels (:func:`_add_back_above_range`).

Runs on CPU or CUDA under ``torch.inference_mode``; on CUDA the network runs under fp16 autocast, on a CPU with
native bfloat16 the 2D Efficient-UNet under bfloat16 autocast (``amp=False``: float32 everywhere).
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn

from .data.intensity import IntensityScaling, intensity_scaling_for
from .networks import DENOISER_NETWORKS, EfficientUNetDenoiser, pad_to_multiple
from .runtime.cpu_convolution import use_nnpack_convolutions
from .runtime.cpu_memory import keep_freed_cpu_memory
from .runtime.precision import autocast_dtype
from .weights.format import (TRAINING_CHECKPOINT_FORMATS, WEIGHTS_FORMAT, WEIGHTS_VERSION, NonFiniteWeightsError,
                             UnusableWeightsError, describe_non_finite, non_finite_tensors, restoration_of)

__all__ = [
    "AIR_MARGIN_PX",
    "AIR_THRESHOLD_HU",
    "DEFAULT_ROI_2D",
    "DEFAULT_ROI_3D",
    "LoadedDenoiser",
    "NonFiniteOutputError",
    "body_crop",
    "check_finite_output",
    "denoise_array",
    "denoise_as_served",
    "even_windows",
    "load_denoiser",
    "resolve_device",
    "slice_batch_size",
    "slice_denoiser",
]

log = logging.getLogger(__name__)

DEFAULT_ROI_2D = (512, 512)
DEFAULT_ROI_3D = (96, 96, 96)

#: CT: a pixel whose 5 x 5 mean lies above this (HU) is body, table or clothing, not air (air is about -1000 HU,
#: lung parenchyma -900 to -700 lies inside the body's outline, fat and skin above -150)
AIR_THRESHOLD_HU = -500.0
#: air kept on every side of the body's bounding box when the 2D networks skip the air around it: with a third of it
#: the crop's edges moved ADL's output inside the body by tens of HU (tests/test_predict_air.py, bench/README.md)
AIR_MARGIN_PX = 48
#: the air crop is skipped when it would keep more than this fraction of the slice (no time to gain)
AIR_CROP_MAX_FRACTION = 0.9


def check_device_name(asked: object, present: bool = True) -> str:
    """``asked`` (a request's or a conf's ``device``; None = ``auto``) as ``auto``, ``cpu``, ``cuda`` or ``cuda:N``;
    ValueError naming the choices otherwise (torch accepts more names, e.g. ``meta`` or ``mps``, which fail half-way
    through a network), and with ``present`` for a GPU this machine does not have."""
    name = str(asked or "auto").strip().lower()
    kind, colon, index = name.partition(":")
    if kind not in ("auto", "cpu", "cuda") or (colon and not (kind != "auto" and index.isdigit())):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {asked!r}")
    if present and kind == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda asked for, but this machine has no usable GPU")
    if present and kind == "cuda" and index and int(index) >= torch.cuda.device_count():
        raise ValueError(f"device {name}: this machine has {torch.cuda.device_count()} GPU(s), cuda:0 to "
                         f"cuda:{torch.cuda.device_count() - 1}")
    return name


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"``/None -> CUDA when available else CPU; anything else as given."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass
class LoadedDenoiser:
    """A denoiser ready for inference.

    Attributes:
        network: the denoiser G in eval mode (full-resolution output only), float32, on ``device``.
        spatial_dims: 2 (slice-wise) or 3 (volumetric).
        modality: "CT" or "MR": the intensity rule it was trained with.
        metadata: everything else from the weight file (network kwargs, scaling rule, training record,
            version, ...).
        device: where ``network`` lives.
        path: the weight file, if loaded from one.
    """

    network: nn.Module
    spatial_dims: int
    modality: str
    metadata: dict = field(default_factory=dict)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    path: Path | None = None

    def to(self, device: str | torch.device) -> "LoadedDenoiser":
        self.device = resolve_device(device)
        self.network.to(self.device)
        return self


def load_denoiser(path: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedDenoiser:
    """Read a weight file written by :func:`lib.weights.export_weights` (no network access).

    The tensors are mapped to the CPU first, fp16 weights are converted to float32, the network is rebuilt
    from the stored keyword arguments and the state dict loaded strictly. A training checkpoint
    (:mod:`lib.engines.adl_training`) is accepted too (its generator is used).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not an ADL weight file, or weights that do not fit the stored network arguments.
        NonFiniteWeightsError: (a ValueError) the weights hold NaN or infinite values: served, they would answer
            NaN for every voxel.
        UnusableWeightsError: (a ValueError) the file's restoration entry names no valid width.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"ADL weights {p} not found")
    try:
        payload = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unpickling failure means "not a weight file"
        raise ValueError(f"{p} is not a readable ADL weight file ({type(error).__name__}: {error})") from None
    if not isinstance(payload, dict):
        raise ValueError(f"{p} is not an ADL weight file")
    if payload.get("format") in TRAINING_CHECKPOINT_FORMATS:
        class_name = str(payload.get("network_class", "EfficientUNetDenoiser"))
        kwargs = dict(payload["network_kwargs"])
        state = payload["generator"] if "generator" in payload else payload["denoiser"]
        metadata = {k: payload.get(k) for k in ("config", "step", "phase", "validation", "scaling_rule")}
        modality = str(payload.get("config", {}).get("modality", "CT")).upper()
    elif payload.get("format") == WEIGHTS_FORMAT:
        if int(payload.get("version", 0)) > WEIGHTS_VERSION:
            raise ValueError(f"{p} has weight-file version {payload.get('version')}; this code reads up to {WEIGHTS_VERSION}")
        class_name = str(payload["network"].get("class", "EfficientUNetDenoiser"))
        kwargs = dict(payload["network"]["kwargs"])
        state = payload["state_dict"]
        modality = str(payload["modality"]).upper()
        metadata = {k: v for k, v in payload.items() if k != "state_dict"}
    else:
        raise ValueError(f"{p} is not an ADL weight file (format {payload.get('format')!r})")

    try:  # served without a valid width, it would fail on every request as if the image were at fault
        restoration_of(metadata)
    except ValueError as error:
        raise UnusableWeightsError(f"{p} is not usable: {error}") from None
    network_class = DENOISER_NETWORKS.get(class_name)
    if network_class is None:
        raise ValueError(f"{p} holds an unknown network {class_name!r} (known: {', '.join(DENOISER_NETWORKS)})")
    metadata["network_class"] = class_name
    broken = non_finite_tensors(state)
    if broken:
        raise NonFiniteWeightsError(f"{p} is not usable: {describe_non_finite(broken)}; the training that wrote it "
                                    "diverged")
    if network_class is EfficientUNetDenoiser:
        kwargs["deep_supervision"] = any(k.startswith("heads.1.") for k in state)
        kwargs.setdefault("residual", False)  # files written before the residual heads existed
    network = network_class(**kwargs)
    state = {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in state.items()}
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0]
        raise ValueError(f"{p}: weights do not match the stored network arguments ({first})") from None
    dev = resolve_device(device)
    network.to(dev).eval()
    spatial_dims = int(kwargs.get("spatial_dims", 2))
    if network_class is EfficientUNetDenoiser:
        # float32 on a CPU without native bfloat16: NNPACK's Winograd / FFT convolutions, which read NCHW weights
        # (lib.runtime.cpu_convolution); else channels-last weights, with which the convolutions pick faster
        # kernels, identical output (bench/README.md, "Measurements behind design choices")
        nnpack = spatial_dims == 2 and dev.type == "cpu" and autocast_dtype(dev) is None
        if not (nnpack and use_nnpack_convolutions(network)):
            network.to(memory_format=torch.channels_last if spatial_dims == 2 else torch.channels_last_3d)
    return LoadedDenoiser(network, spatial_dims, modality, metadata, dev, p)


class NonFiniteOutputError(RuntimeError):
    """A denoiser's output holds NaN or infinite values: an error, never a result (the input was checked finite, so
    the fault is the model's or the arithmetic's, not the image's)."""


def check_finite_output(result: np.ndarray, source: str) -> np.ndarray:
    """``result`` itself when every value is finite; else :class:`NonFiniteOutputError` naming ``source`` (e.g. the
    model and its weights) and how many of the ``result.size`` values are NaN and how many infinite."""
    values = np.asarray(result)
    if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
        nan = int(np.isnan(values).sum())
        inf = int(np.isinf(values).sum())
        raise NonFiniteOutputError(f"{source} returned {nan} NaN and {inf} infinite values of {values.size}")
    return result


def _network_and_dims(model: LoadedDenoiser | nn.Module) -> tuple[nn.Module, int]:
    """The network of a :class:`LoadedDenoiser` or a bare network, and whether it is 2D or 3D (a bare network's
    ``spatial_dims`` attribute, default 2)."""
    if isinstance(model, LoadedDenoiser):
        return model.network, model.spatial_dims
    return model, int(getattr(model, "spatial_dims", 2))


# orthogonal-plane averaging (MR): only where the three planes look alike to a network trained on axial slices
ORTHOGONAL_MIN_VOXELS = 32
ORTHOGONAL_MAX_ANISOTROPY = 1.25


def uses_orthogonal_planes(model: LoadedDenoiser | nn.Module, modality: str, shape: Sequence[int],
                           spacing: Sequence[float] | None) -> bool:
    """Whether the app denoises this image by averaging its three orthogonal planes
    (``denoise_array(..., orthogonal_planes=True)``): a 2D Efficient-UNet (ADL) on an MR volume with at least
    ``ORTHOGONAL_MIN_VOXELS`` voxels along every axis and near-cubic voxels (largest / smallest spacing at most
    ``ORTHOGONAL_MAX_ANISOTROPY``), so the coronal and sagittal slices look like the axial ones the network learnt
    on. Not for CT: its weights learnt the in-plane texture of axial FBP noise, which the other planes lack.
    The gain over axial slices alone, at 3x the time, is in bench/README.md."""
    network, dims = _network_and_dims(model)
    if not isinstance(network, EfficientUNetDenoiser) or dims != 2 or str(modality).upper() != "MR":
        return False
    if len(shape) != 3 or min(int(n) for n in shape) < ORTHOGONAL_MIN_VOXELS:
        return False
    if spacing is None or len(spacing) != 3 or min(float(s) for s in spacing) <= 0:
        return False
    return max(float(s) for s in spacing) / min(float(s) for s in spacing) <= ORTHOGONAL_MAX_ANISOTROPY


def _roi(roi_size: int | Sequence[int] | None, spatial_dims: int, padded: Sequence[int]) -> tuple[int, ...]:
    if roi_size is None:
        roi = DEFAULT_ROI_2D if spatial_dims == 2 else DEFAULT_ROI_3D
    elif isinstance(roi_size, (int, np.integer)):
        roi = (int(roi_size),) * spatial_dims
    else:
        roi = tuple(int(r) for r in roi_size)
        if len(roi) == 1:
            roi = roi * spatial_dims
    if len(roi) != spatial_dims:
        raise ValueError(f"roi_size {roi_size} does not have {spatial_dims} dimensions")
    if any(r <= 0 or r % 8 for r in roi):
        raise ValueError(f"roi_size {roi} must be positive multiples of 8")
    return tuple(min(r, s) for r, s in zip(roi, padded))  # both multiples of 8


def even_windows(roi: Sequence[int], size: Sequence[int], overlap: float) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Windows of at most ``roi`` (multiples of 8) that cover ``size`` in as few as ``overlap`` allows, spread evenly.

    MONAI's sliding window steps by ``roi * (1 - overlap)`` and adds a last window flush with the end: a 1024-pixel
    slice in 512-pixel windows at 0.25 overlap takes 3 x 3 windows (2.25 times the slice's pixels). Here each axis
    longer than its window gets the fewest windows that still overlap by at least ``roi * overlap`` pixels, each one
    shrunk to what they need (a multiple of 8, never larger than ``roi``: memory stays bounded), and the overlap
    fraction per axis that makes MONAI place exactly those: 3 x 3 windows of 432 pixels for the 1024-pixel slice
    (1.6 times its pixels), which overlap by at least 128 pixels as before. Returns ``(roi, overlap per axis)`` for
    ``sliding_window_inference``.
    """
    windows, overlaps = [], []
    for r, n_pixels in zip(roi, size):
        r, n_pixels = int(r), int(n_pixels)
        shared = int(round(r * overlap))
        if n_pixels <= r or shared >= r:
            windows.append(min(r, n_pixels))
            overlaps.append(float(overlap))
            continue
        count = math.ceil((n_pixels - shared) / (r - shared))
        width = min(r, 8 * math.ceil(math.ceil((n_pixels + (count - 1) * shared) / count) / 8))
        step = math.ceil((n_pixels - width) / (count - 1))
        windows.append(width)
        overlaps.append(1.0 - (step + 0.5) / width)  # MONAI takes int(width * (1 - overlap)) = step
    return tuple(windows), tuple(overlaps)


def body_crop(image_hu: np.ndarray, margin: int = AIR_MARGIN_PX, max_fraction: float = AIR_CROP_MAX_FRACTION,
              multiple: int = 1) -> tuple[slice, slice] | None:
    """The in-plane box of a CT slice or volume that holds everything but the air around the patient, or None.

    Args:
        image_hu: (H, W) or (Z, H, W) in HU.
        margin: pixels of air kept on every side of the bounding box of the non-air pixels (clamped to the image).
        max_fraction: None when the box would keep more than this fraction of the slice.
        multiple: each side of the box is grown (inside the image) to a multiple of this, the network's size
            multiple: then the network needs no padding of the box, and where the body reaches the image's edge
            it sees that edge as in a whole-slice pass (a reflect padding there moved ADL's output by up to 34 HU).

    Returns:
        ``(rows, columns)`` slices of the box, one for the whole volume (the union of every slice's), or None when
        nothing is above :data:`AIR_THRESHOLD_HU` (no body found: an image not in HU, or all air) or the box is
        nearly the whole slice. A 5 x 5 mean is thresholded, so isolated noise or streak pixels in the air do not
        count.
    """
    from scipy import ndimage

    volume = np.asarray(image_hu, dtype=np.float32)
    volume = volume[None] if volume.ndim == 2 else volume
    above = np.zeros(volume.shape[1:], dtype=bool)
    for plane in volume:
        above |= ndimage.uniform_filter(plane, size=5, mode="nearest") > AIR_THRESHOLD_HU
    rows, columns = np.flatnonzero(above.any(axis=1)), np.flatnonzero(above.any(axis=0))
    if rows.size == 0:
        return None
    height, width = above.shape
    box = (_grown(int(rows[0]) - margin, int(rows[-1]) + 1 + margin, height, multiple),
           _grown(int(columns[0]) - margin, int(columns[-1]) + 1 + margin, width, multiple))
    kept = (box[0].stop - box[0].start) * (box[1].stop - box[1].start)
    return None if kept > max_fraction * height * width else box


def _grown(start: int, stop: int, size: int, multiple: int) -> slice:
    """[start, stop) clamped to [0, size) and grown to a multiple of ``multiple`` (the whole axis where that does not
    fit), towards the start first: an end at the image's edge stays there."""
    start, stop, multiple = max(0, start), min(size, stop), max(1, int(multiple))
    length = -(-(stop - start) // multiple) * multiple
    if length >= size:
        return slice(0, size)
    start = max(0, stop - length)
    return slice(start, start + length)


def slice_denoiser(loaded: LoadedDenoiser, modality: str, device: str | torch.device = "cpu", *,
                   served: bool = False) -> Callable[[np.ndarray], np.ndarray]:
    """``loaded`` as a function (N, H, W) -> (N, H, W) in ``modality``'s units that denoises each slice alone.

    For checks on slices that are not neighbours (held-out or validation slices of several volumes): a 2.5D
    network must not see one as another's adjacent slice. Full precision, so that two networks are scored alike.
    ``served``: each slice as served (:func:`denoise_as_served`: with the file's restoration width), else the
    network alone.
    """
    denoise = denoise_as_served if served else denoise_array

    def run(stack: np.ndarray) -> np.ndarray:
        return np.stack([denoise(loaded, s, modality, device=device, amp=False) for s in stack])

    return run


def denoise_array(
    model: LoadedDenoiser | nn.Module,
    array: np.ndarray,
    modality: str | None = None,
    device: str | torch.device | None = "cpu",
    roi_size: int | Sequence[int] | None = None,
    overlap: float = 0.25,
    sw_batch_size: int | None = None,
    progress: bool = False,
    *,
    mode: str = "gaussian",
    amp: bool = True,
    orthogonal_planes: bool = False,
    skip_air: bool = True,
    slices: Sequence[int] | None = None,
) -> np.ndarray:
    """Denoise a 2D slice (H, W) or a volume (Z, H, W) given in its modality's units; returns float32 of the
    same shape and units (CT in HU), or with ``slices`` of shape (len(slices), H, W).

    Args:
        model: a :class:`LoadedDenoiser`, or a bare network such as :class:`~lib.networks.EfficientUNetDenoiser`
            or :class:`~lib.networks.GCNDenoiser` (then its ``spatial_dims`` attribute decides 2D / 3D and
            ``modality`` must be given). The network is put in eval mode (and left there). Optional network
            attributes: ``size_multiple`` (the image is reflect-padded to multiples of it; default 8, the
            GCN's 1 means no padding) and ``slice_context`` (a 2D network that sees ``2 * slice_context + 1``
            adjacent slices as channels gets them, the volume's end slices repeated; default 0).
        array: the noisy image.
        modality: "CT" or "MR"; default the model's.
        device: "cpu", "cuda", "auto" or None (= where the model is).
        roi_size: sliding-window size (multiples of 8; clamped to the padded image): default 512x512 for a 2D
            model, 96^3 for a 3D model. An image no larger than the window is processed whole.
        overlap: window overlap fraction in [0, 1).
        sw_batch_size: windows per forward pass; a 2D model also takes this many slices at a time (memory is
            bounded by ``sw_batch_size`` windows). Default 4 on CUDA, 1 on a CPU: there batching slices was slower
            per slice, at several times the activation memory.
        progress: tqdm progress bar.
        mode: MONAI blending of overlapping windows, ``"gaussian"`` (default, no seams) or ``"constant"``.
        amp: mixed precision: fp16 autocast on CUDA; bfloat16 for the 2D Efficient-UNet on a CPU with native
            bfloat16 (:mod:`lib.runtime.precision`; 2-4x faster there, within a fraction of a HU of float32).
        orthogonal_planes: a 2D model on a volume: denoise it as stacks of axial, coronal and sagittal slices and
            return the voxel-wise mean of the three (3x the time; each plane's errors are partly independent of the
            others', so the mean is closer to the truth on near-isotropic volumes; see
            :func:`uses_orthogonal_planes` for when the app does this).
        skip_air: CT with a 2D network: the network sees only :func:`body_crop`'s box (the body, table and
            clothing with :data:`AIR_MARGIN_PX` pixels of air around them; one box for the whole volume) and the
            air outside it is returned as acquired. The network's time falls with the air it skips (a fifth of a
            typical abdomen slice, more on heads and children), and its output inside the body is what a
            whole-slice pass gives but for float rounding and a few pixels on the body's outline whose output
            depends on context beyond any margin (bench/README.md "Skipping the air"). False: every pixel.
            MR (no fixed intensity for air) and the 3D network always see everything.
        slices: a 2D model on a volume: denoise only these slices (indices along Z, increasing), e.g. one rank's
            share of a validation volume. Each comes out as in the whole volume's pass: the body box, the
            intensity scaling and the neighbouring slices a 2.5D network sees are the whole volume's, and the
            slices go through the network in the whole pass's batches of ``sw_batch_size`` (those of them that
            were asked for), so a share made of whole batches (:func:`slice_batch_size`) gives the same values.

    Raises:
        ValueError: NaN/inf values, wrong dimensionality, unknown modality, bad window settings, a 3D model
            given a single slice that is too small, ``orthogonal_planes`` with a 3D model or a single slice.
    """
    from tqdm.auto import tqdm

    image = np.asarray(array)
    if image.ndim not in (2, 3):
        raise ValueError(f"expected a 2D slice (H, W) or a 3D volume (Z, H, W), got shape {image.shape}")
    if image.size == 0:
        raise ValueError("empty image")
    if not np.issubdtype(image.dtype, np.number) or np.issubdtype(image.dtype, np.complexfloating):
        raise ValueError(f"image must be real and numeric, got dtype {image.dtype}")
    image = image.astype(np.float32, copy=False)
    if not np.isfinite(image).all():
        raise ValueError("image contains NaN or infinite values")
    if not 0.0 <= float(overlap) < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if sw_batch_size is not None and int(sw_batch_size) < 1:
        raise ValueError(f"sw_batch_size must be >= 1, got {sw_batch_size}")
    if orthogonal_planes:
        if _network_and_dims(model)[1] != 2:
            raise ValueError("orthogonal_planes needs a 2D (slice-wise) model; a 3D model sees all planes already")
        if image.ndim != 3 or min(image.shape) < 2:
            raise ValueError(f"orthogonal_planes needs a volume (Z, H, W) with at least 2 voxels along every axis, "
                             f"got shape {image.shape}")
        if slices is not None:
            raise ValueError("slices and orthogonal_planes cannot be combined")
        kwargs = dict(modality=modality, device=device, roi_size=roi_size, overlap=overlap,
                      sw_batch_size=sw_batch_size, progress=progress, mode=mode, amp=amp, skip_air=skip_air)
        # each plane in turn as the slice axis (slices of (Z, W), then of (Z, H)); one running sum bounds the memory
        total = denoise_array(model, image, **kwargs)
        total += denoise_array(model, image.transpose(1, 0, 2), **kwargs).transpose(1, 0, 2)
        total += denoise_array(model, image.transpose(2, 0, 1), **kwargs).transpose(1, 2, 0)
        total /= 3.0
        return total

    network, spatial_dims = _network_and_dims(model)
    if isinstance(model, LoadedDenoiser):
        modality = modality or model.modality
    elif modality is None:
        raise ValueError("modality is required with a bare network")
    modality = str(modality).upper()
    if modality not in ("CT", "MR", "OT"):
        raise ValueError(f"modality must be CT or MR, got {modality!r}")
    chosen = None
    if slices is not None:
        chosen = np.asarray(slices, dtype=np.int64).reshape(-1)
        if spatial_dims != 2 or image.ndim != 3:
            raise ValueError("slices needs a 2D (slice-wise) model and a volume (Z, H, W)")
        if chosen.size and (chosen.min() < 0 or chosen.max() >= image.shape[0] or np.any(np.diff(chosen) <= 0)):
            raise ValueError(f"slices must be increasing indices in [0, {image.shape[0]}), got {chosen.tolist()}")
    dev = next(network.parameters()).device if device is None else resolve_device(device)
    network.to(dev).eval()
    if isinstance(model, LoadedDenoiser):
        model.device = dev
    if sw_batch_size is None:
        sw_batch_size = slice_batch_size(dev)
    if dev.type == "cpu":
        keep_freed_cpu_memory()  # large feature maps reuse heap memory instead of fresh mmaps (lib.runtime.cpu_memory)
    # reduced precision: fp16 on CUDA; bfloat16 on a CPU with native bfloat16 for the 2D Efficient-UNet only (its
    # residual heads keep the input's logit and the sigmoid in float32; validated against float32 on CT). The GCN's
    # k-NN distances stay float32, and so does the 3D network, whose bfloat16 output was never validated.
    amp_dtype = autocast_dtype(dev, amp)
    if dev.type == "cpu" and not (isinstance(network, EfficientUNetDenoiser) and network.spatial_dims == 2):
        amp_dtype = None

    multiple = int(getattr(network, "size_multiple", 8))
    box = body_crop(image, multiple=multiple) if skip_air and modality == "CT" and spatial_dims == 2 else None
    region = image if box is None else image[(Ellipsis, *box)]
    scaling = intensity_scaling_for(region, modality)
    normalised = scaling.normalise(region)
    volume = normalised[None] if normalised.ndim == 2 else normalised  # (Z, H, W)

    def predictor(x: torch.Tensor) -> torch.Tensor:
        if amp_dtype is None:
            return network(x).float()
        with torch.autocast(device_type=dev.type, dtype=amp_dtype):
            y = network(x)
        return y.float()

    context = int(getattr(network, "slice_context", 0)) if spatial_dims == 2 else 0
    wanted = np.arange(volume.shape[0]) if chosen is None else chosen
    out = np.empty((len(wanted), *volume.shape[1:]), volume.dtype)
    with torch.inference_mode():
        if spatial_dims == 2:
            step = int(sw_batch_size)
            batches = []  # the whole pass's batches (slices start .. start + step - 1), cut to the wanted slices
            for start in range(0, volume.shape[0], step):
                first, stop = (int(i) for i in np.searchsorted(wanted, [start, start + step]))
                if stop > first:
                    batches.append((first, stop))
            desc = "TDDL-GCN denoise" if type(network).__name__ == "GCNDenoiser" else "ADL denoise"
            for first, stop in tqdm(batches, desc=desc, unit="batch", disable=not progress, dynamic_ncols=True):
                centres = wanted[first:stop]
                # (n, 2 * context + 1, H, W): each slice with its neighbours, end slices repeated
                stack = np.clip(centres[:, None] + np.arange(-context, context + 1), 0, volume.shape[0] - 1)
                chunk = torch.from_numpy(np.ascontiguousarray(volume[stack])).to(dev)
                padded, crop = pad_to_multiple(chunk, multiple)
                roi, overlaps = even_windows(_roi(roi_size, 2, padded.shape[2:]), padded.shape[2:], float(overlap))
                if tuple(roi) == tuple(padded.shape[2:]):  # one window: what MONAI's blending would return
                    result = predictor(padded)
                else:
                    from monai.inferers import sliding_window_inference

                    result = sliding_window_inference(padded, roi, step, predictor, overlap=overlaps, mode=mode)
                out[first:stop] = result[crop][:, 0].cpu().numpy()
        else:
            from monai.inferers import sliding_window_inference

            tensor = torch.from_numpy(np.ascontiguousarray(volume))[None, None].to(dev)
            padded, crop = pad_to_multiple(tensor, multiple)
            roi = _roi(roi_size, 3, padded.shape[2:])
            result = sliding_window_inference(padded, roi, int(sw_batch_size), predictor, overlap=float(overlap),
                                              mode=mode, progress=progress)
            out[:] = result[crop][0, 0].cpu().numpy()
    if chosen is not None:
        region, image = region[chosen], image[chosen]
    denoised = scaling.denormalise(out).reshape(region.shape).astype(np.float32)
    _add_back_above_range(denoised, region, scaling)  # every modality: MR is clipped at its ceiling as CT is
    if box is None:
        return denoised
    whole = image.copy()  # the air outside the box as acquired
    whole[(Ellipsis, *box)] = denoised
    return whole


def slice_batch_size(device: torch.device) -> int:
    """:func:`denoise_array`'s default ``sw_batch_size`` on ``device``: 4 on CUDA, 1 on a CPU (there batching slices
    was slower per slice, at several times the activation memory)."""
    return 4 if torch.device(device).type == "cuda" else 1


def _add_back_above_range(denoised: np.ndarray, noisy: np.ndarray, scaling: IntensityScaling) -> None:
    """Add to ``denoised`` (in place) the part of ``noisy`` above the top of the network's intensity range.

    The normalisation (:class:`lib.data.intensity.IntensityScaling`) clips to [0, 1], whose top is ``offset +
    scale`` in the modality's units, so a voxel above it reaches the network at the ceiling and comes out at most
    there: it lost its value, and the low-frequency restoration, which gives back a low-pass of ``noisy - denoised``,
    spread the lost excess over the tissue around it. CT is normalised over [-1024, 3072] HU, so metal on an
    extended-HU scale (up to 30710) came out near 3072 (+960 HU one pixel beside a 3 x 3 pixel 8000 HU object after
    the restoration with the shipped ADL file, +3000 HU at 20000 HU). MR's top is offset + 2 x (p99.5 - offset) of
    the volume, offset = min(p0.1, 0) (:func:`lib.data.intensity.intensity_scaling_for`), so a gadolinium-enhanced
    vessel brighter than twice the 99.5th percentile was capped there (a 546 voxel served as 314). With the excess
    added back at its own voxels the output keeps the structure's value and the removed content the restoration
    sees is what the network removed. The bottom of the range is left alone: CT values below -1024 HU are air whose
    noise the network removes; MR values below min(p0.1, 0) are the lowest 0.1 % of a volume with negative values
    (a resampling's ringing), not anatomy. Shapes: ``denoised`` and ``noisy`` alike, modality units."""
    ceiling = float(scaling.offset + scaling.scale)
    if noisy.size and float(noisy.max()) > ceiling:  # one pass when nothing is above (every usual CT)
        denoised += np.maximum(noisy - np.float32(ceiling), np.float32(0.0)).astype(np.float32, copy=False)


def denoise_as_served(loaded: LoadedDenoiser, array: np.ndarray, modality: str | None = None,
                      device: str | torch.device | None = "cpu", **kwargs) -> np.ndarray:
    """What the app, ``cli.py denoise`` and the batch runner return by default for ``array`` with ``loaded``:
    :func:`denoise_array` (``kwargs`` go to it), then the low-frequency restoration at the width the weight file
    names, else its modality's default (CT 0.8 px; MR off), as :func:`lib.lesions.low_frequency_restoration.
    apply_restoration` gives it back.

    For checks that decide what is served (fine-tuning's publication gate): two files are compared as a reader
    would see them, each at its own width, not as bare networks. A non-finite network output is returned as it is
    (the caller scores it as the worst; the restoration refuses it).

    Returns:
        float32 array of ``array``'s shape, in the modality's units.
    """
    from .lesions.low_frequency_restoration import apply_restoration

    modality = modality or loaded.modality
    denoised = denoise_array(loaded, array, modality, device=device, **kwargs)
    if not np.isfinite(denoised).all():
        return denoised
    served, _ = apply_restoration(array, denoised, modality, weights_sigma_px=restoration_of(loaded.metadata))
    return np.asarray(served, dtype=np.float32)
