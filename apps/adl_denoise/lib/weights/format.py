"""The weight-file format: the small file shipped to users, written by :func:`export_weights` and read by
:func:`lib.predict.load_denoiser`; the intensity rule it records (:func:`scaling_rule_for`); and starting a
network from such a file for fine-tuning (:func:`load_initial_weights`), a 2D network possibly from one that saw
fewer adjacent slices (:func:`inflate_input_channels`).

torch is imported where it is used: finding weights (:mod:`lib.weights.lookup`) stays light.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from ..runtime.atomic import atomic_torch_save
from ..runtime.clock import utc_timestamp
from ..runtime.machine import library_version

if TYPE_CHECKING:
    import torch
    import torch.nn as nn

__all__ = [
    "RESTORATION_KEY",
    "NonFiniteWeightsError",
    "TRAINING_CHECKPOINT_FORMATS",
    "UnusableWeightsError",
    "WEIGHTS_FORMAT",
    "WEIGHTS_VERSION",
    "describe_non_finite",
    "export_weights",
    "inflate_input_channels",
    "load_initial_weights",
    "non_finite_tensors",
    "plain_json",
    "portable_record",
    "restoration_of",
    "restoration_of_file",
    "restoration_inherited_from",
    "scaling_rule_for",
]


class UnusableWeightsError(ValueError):
    """A weight file that cannot be served as it is (the file's fault, not the image's): e.g. an entry that names no
    valid restoration width."""


class NonFiniteWeightsError(UnusableWeightsError):
    """A network holds NaN or infinite values (its training diverged, or values beyond float16): never written,
    never loaded, since served it would answer NaN for every voxel."""


WEIGHTS_FORMAT = "adl-denoiser-weights"
WEIGHTS_VERSION = 1
#: Training checkpoints that load_denoiser also accepts (ADL and TDDL-GCN, :mod:`lib.engines`).
TRAINING_CHECKPOINT_FORMATS = ("adl-training-checkpoint", "gcn-training-checkpoint")
#: The weight-file entry of the low-frequency restoration width (pixels) that the network is served with when a request
#: names none (``lib.lesions.low_frequency_restoration``): ``{"sigma_px": 0.6, "chosen": "<where it was measured>"}``,
#: or ``{"sigma_px": ..., "inherited_from": "<start file> (sha256 ...)"}`` in a file trained from one that had it. A
#: file without it is served at its modality's default. Per file, not per model name: a network fine-tuned from an
#: older file of the same model keeps that file's width, not the width measured for a newer one.
RESTORATION_KEY = "low_frequency_restoration"
#: The ADL denoiser's training-only deep-supervision heads (1/2 and 1/4 resolution): not in weight files.
_TRAINING_ONLY_HEADS = ("heads.1.", "heads.2.")


def plain_json(value: Any) -> Any:
    """A JSON-able copy of ``value`` (numbers, strings, lists, dicts: what ``torch.load(weights_only=True)``
    accepts); tensors and numpy scalars become numbers, anything else its text."""
    return json.loads(json.dumps(value, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


_WINDOWS_ABSOLUTE = re.compile(r"^[A-Za-z]:[\\/]|^\\\\")


def _is_absolute_path(text: str) -> bool:
    return text.startswith(("/", "~")) or bool(_WINDOWS_ABSOLUTE.match(text))


#: record keys whose values are paths (relative ones too: ``--output site/DOE_JOHN/adl.pt`` gives a relative
#: ``checkpoint_dir``); :func:`portable_record` keeps only their last component
PATH_KEYS = frozenset({"checkpoint_dir", "lesion_detector", "lineage", "initial_weights", "noise_model", "output",
                       "clean", "val", "noisy_dir", "clean_dir", "normal_dose", "lowdose", "work_dir", "resume",
                       "input", "weights", "path", "file", "source", "folder"})


def portable_record(value: Any) -> Any:
    """``value`` (a JSON-able training record) with every absolute path, and every relative one under a key of
    :data:`PATH_KEYS`, cut to its last component, at any depth.

    A weight file travels (published to every user of a site, copied to another one); the folders it was trained
    from do not, and a site's folder names may name people (``/data/DOE_JOHN/...``, ``site/DOE_JOHN/...``). The
    file name is kept so a site can still match the record with its own training report, which keeps the full
    paths.
    """
    def last(text: str) -> str:
        return re.split(r"[\\/]", text.rstrip("/\\"))[-1] or text[:1]

    def walk(item: Any, path_key: bool) -> Any:
        if isinstance(item, dict):
            return {k: walk(v, path_key or (isinstance(k, str) and k in PATH_KEYS)) for k, v in item.items()}
        if isinstance(item, (list, tuple)):
            return [walk(v, path_key) for v in item]
        if isinstance(item, str) and (_is_absolute_path(item) or (
                path_key and re.search(r"[\\/]", item) and not re.search(r"\s", item))):  # a path, not a sentence
            return last(item)
        return item

    return walk(value, False)


def map_record_strings(value: Any, fn: Callable[[str], str], keys: bool = False) -> Any:
    """``value`` (a JSON-able record) with ``fn`` applied to every string at any depth (and to dict keys that are
    strings when ``keys``); tuples become lists, as JSON has them."""
    if isinstance(value, dict):
        return {(fn(k) if keys and isinstance(k, str) else k): map_record_strings(v, fn, keys)
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [map_record_strings(v, fn, keys) for v in value]
    if isinstance(value, str):
        return fn(value)
    return value


def restoration_of(payload: Mapping[str, Any] | None) -> float | None:
    """The restoration width in pixels that a weight file's payload (or a loaded denoiser's ``metadata``) names under
    :data:`RESTORATION_KEY`, or None when it names none. ``ValueError`` when the entry is not a width in [0, 16]."""
    from ..lesions.low_frequency_restoration import check_sigma_px

    entry = payload.get(RESTORATION_KEY) if isinstance(payload, Mapping) else None
    if entry is None:
        return None
    if not isinstance(entry, Mapping) or "sigma_px" not in entry:
        raise ValueError(f"the weight file's {RESTORATION_KEY} entry {entry!r} names no width (sigma_px)")
    return check_sigma_px(entry["sigma_px"])


def restoration_of_file(path: str | os.PathLike) -> float | None:
    """:func:`restoration_of` of the weight file at ``path`` (read without building its network)."""
    import torch

    return restoration_of(torch.load(Path(path).expanduser(), map_location="cpu", weights_only=True))


def restoration_inherited_from(start: str | os.PathLike) -> dict | None:
    """The :data:`RESTORATION_KEY` entry of a file trained from the weight file ``start``: ``start``'s width with
    ``inherited_from`` naming it (file name and the first 12 hex digits of its SHA-256); None when ``start`` names
    no width (or is not a weight file), so that the new file gets its modality's default."""
    from ..runtime.hashing import file_sha256

    path = Path(start).expanduser()
    try:
        sigma = restoration_of_file(path)
    except Exception:  # noqa: BLE001 - unreadable, or no valid width: no width to inherit
        return None
    if sigma is None:
        return None
    return {"sigma_px": sigma, "inherited_from": f"{path.name} (sha256 {file_sha256(path)[:12]})"}


def scaling_rule_for(modality: str) -> dict:
    """The intensity rule of :func:`lib.data.intensity_scaling_for` for ``modality``, as recorded in weights."""
    from ..data.intensity import CT_RANGE_HU, MR_HEADROOM, MR_LOW_PERCENTILE, MR_PERCENTILE

    if modality.upper() == "CT":
        return {"modality": "CT", "rule": "fixed-range", "range_hu": list(CT_RANGE_HU), "clip": [0.0, 1.0]}
    return {"modality": modality.upper(), "rule": "robust-percentile", "low": f"min(percentile {MR_LOW_PERCENTILE}, 0)",
            "percentile": MR_PERCENTILE, "headroom": MR_HEADROOM, "clip": [0.0, 1.0]}


def non_finite_tensors(state: Mapping[str, Any]) -> list[str]:
    """Names of the floating-point tensors of ``state`` (a state dict) that hold NaN or infinite values."""
    import torch

    return [key for key, value in state.items()
            if torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value).all())]


def describe_non_finite(names: Sequence[str]) -> str:
    """``"N tensor(s) hold NaN or infinite values (a, b, c, ...)"`` for error messages and records."""
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    return f"{len(names)} tensor(s) hold NaN or infinite values ({shown})"


def _unwrap(module: nn.Module) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    return module.module if isinstance(module, DistributedDataParallel) else module


def export_weights(
    generator: nn.Module,
    path: str | os.PathLike,
    config: Any,
    scaling_rule: dict | None = None,
    training_record: dict | None = None,
    half: bool = True,
    low_frequency_restoration: Mapping[str, Any] | None = None,
) -> Path:
    """Write the weight file shipped to users (atomically); read it with :func:`lib.predict.load_denoiser`.

    Contents (a ``torch.save`` dict, loadable with ``weights_only=True``): ``format``
    (:data:`WEIGHTS_FORMAT`), ``version``, ``model`` (``config.model_name``: "adl", "tddl_gcn"),
    ``network`` (class name, a key of :data:`lib.networks.DENOISER_NETWORKS`, and keyword arguments; ADL's
    with ``deep_supervision=False``), ``state_dict`` (ADL: G without its training-only 1/2 and 1/4 heads;
    floating tensors in fp16 when ``half``), ``dtype``, ``modality``, ``spatial_dims``, ``scaling_rule``
    (default :func:`scaling_rule_for`), ``training`` (the record, e.g.
    :meth:`lib.engines.TrainingResult.training_record`; absolute paths cut to their last component,
    :func:`portable_record`), ``created_utc`` and library versions, and, when ``low_frequency_restoration`` is
    given, its default restoration width (:data:`RESTORATION_KEY`; e.g. :func:`restoration_inherited_from` for a
    file trained from another one). About 9.5 MB for the default 2D ADL network in fp16.

    ``config`` is a :class:`lib.engines.ADLTrainingConfig` (``generator_kwargs()``) or any configuration with
    ``network_class``, ``network_kwargs()``, ``model_name``, ``modality`` and ``spatial_dims`` (e.g.
    :class:`lib.engines.GCNTrainingConfig`).

    Raises:
        NonFiniteWeightsError: a parameter or buffer holds NaN or infinite values (after the float16 cast when
            ``half``: values beyond float16 count too); nothing is written.
    """
    import torch

    net = _unwrap(generator)
    network_class = getattr(config, "network_class", "EfficientUNetDenoiser")
    if hasattr(config, "network_kwargs"):
        kwargs = dict(config.network_kwargs())
    else:
        kwargs = dict(config.generator_kwargs(), deep_supervision=False)
    state = {}
    for key, value in net.state_dict().items():
        if network_class == "EfficientUNetDenoiser" and key.startswith(_TRAINING_ONLY_HEADS):
            continue
        value = value.detach().cpu().clone()
        if half and value.is_floating_point():
            value = value.half()
        state[key] = value
    # a diverged network is never written: served, it answers NaN for every voxel (issue 20's all-NaN 3D volumes)
    broken = non_finite_tensors(state)
    if broken:
        raise NonFiniteWeightsError(
            f"{Path(path).name} not written: {describe_non_finite(broken)}: training diverged"
            + (" or values exceed float16" if half else ""))
    payload = {
        "format": WEIGHTS_FORMAT,
        "version": WEIGHTS_VERSION,
        "model": str(getattr(config, "model_name", "adl")),
        "network": {"class": network_class, "kwargs": plain_json(kwargs)},
        "state_dict": state,
        "dtype": "float16" if half else "float32",
        "modality": config.modality,
        "spatial_dims": config.spatial_dims,
        "scaling_rule": plain_json(scaling_rule if scaling_rule is not None else scaling_rule_for(config.modality)),
        "training": portable_record(plain_json(training_record or {})),
        "created_utc": utc_timestamp(),
        "software": {"torch": str(torch.__version__), "monai": str(library_version("monai"))},
    }
    if low_frequency_restoration is not None:
        entry = plain_json(dict(low_frequency_restoration))
        restoration_of({RESTORATION_KEY: entry})  # a valid width, or ValueError before anything is written
        payload[RESTORATION_KEY] = entry
    return atomic_torch_save(payload, Path(path).expanduser())


def load_initial_weights(network: nn.Module, path: str | os.PathLike,
                         optional_prefixes: Sequence[str] = _TRAINING_ONLY_HEADS) -> dict:
    """Start ``network`` from a weight file (fine-tuning), not from a training checkpoint (trainers resume those).

    The file's network must be the same class with the same arguments, except that a 2D network may start one
    that takes more adjacent slices (:func:`inflate_input_channels`); parameters it lacks may only be under
    ``optional_prefixes`` (ADL weight files drop the 1/2 and 1/4 deep-supervision heads, which then start
    fresh: with residual heads, as the identity). Returns the file's metadata (its training record etc.).

    Raises:
        ValueError: the file holds another network.
    """
    from ..predict import load_denoiser

    loaded = load_denoiser(path, device="cpu")
    target = _unwrap(network)
    if type(loaded.network) is not type(target):
        raise ValueError(f"initial weights {path} hold a {type(loaded.network).__name__}, not a "
                         f"{type(target).__name__}")
    state = inflate_input_channels(loaded.network.state_dict(), target.state_dict())
    try:
        missing, unexpected = target.load_state_dict(state, strict=False)
    except RuntimeError as error:
        first = str(error).strip().splitlines()[-1].strip()
        raise ValueError(f"initial weights {path} do not fit this network ({first})") from None
    missing = [k for k in missing if not k.startswith(tuple(optional_prefixes))]
    if missing or unexpected:
        raise ValueError(f"initial weights {path} do not fit this network (missing {missing[:3]}, "
                         f"unexpected {list(unexpected)[:3]})")
    return loaded.metadata


def inflate_input_channels(state: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict:
    """A 2j + 1-slice network's weights ``state`` for a network (state dict ``target``) that takes 2k + 1 > 2j + 1
    slices (1 -> 3, 3 -> 5, ...): each convolution kernel (out, in, *kernel) that reads the image keeps its kernels
    on the centre 2j + 1 input channels and gets zeros on the outer new ones, so the wider network starts as exactly
    the narrower one and learns from there what the further neighbours add. Other entries are returned as given."""
    import torch

    out = dict(state)
    for key, value in state.items():
        want = target.get(key)
        if want is None or value.ndim < 3 or value.shape == want.shape:
            continue
        have, need = value.shape[1], want.shape[1]
        if have % 2 == 1 and need % 2 == 1 and need > have and \
                value.shape[:1] + value.shape[2:] == want.shape[:1] + want.shape[2:]:
            inflated = torch.zeros(want.shape, dtype=value.dtype)
            first = (need - have) // 2
            inflated[:, first:first + have] = value
            out[key] = inflated
    return out
