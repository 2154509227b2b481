"""Training of ADL (Adversarial Distortion Learning): the paper's three phases, resumable, AMP and multi-GPU.

Phases, run in this order over one global step counter:

1. ``g_warmup`` - the denoiser G alone: L1 + pyramidal textural + histogram loss on all three output scales
   (:class:`lib.losses.ADLDenoiserLoss` without the adversarial term), Adam at ``lr_warmup``.
2. ``d_warmup`` - the discriminator D alone, on clean x (real) against G(y) (fake) with G frozen (eval mode,
   no gradients, its parameters and BN statistics untouched), hinge loss, Adam at ``lr_warmup``.
3. ``adversarial`` - per step one D update (clean vs G(y) detached) and then one G update with the
   adversarial term added (D's parameters frozen for that update), both at ``lr_adversarial``.

After the last step G's batch-norm statistics are recomputed over ``bn_recalibration_batches`` further training
batches (:mod:`lib.engines.batch_norm`: the moving averages trail the weights) and the run is validated again.

Each phase starts a ``StepLR`` schedule (``lr_step_size`` steps, ``lr_gamma``) from its base learning rate;
the Adam moments carry over between phases of the same network.

Checkpoints (:func:`save_checkpoint`, ``checkpoint_dir/last.pt``, every ``checkpoint_every`` steps and at the
end) hold G, D, both optimisers, the running schedulers, the AMP scalers, the step (the phase follows from
it), the RNG states, the loss history and the validation record; ``train_adl(..., resume=path)`` continues
exactly where it stopped: the data are addressed by global sample id (:class:`lib.data.ADLPatchDataset`
items depend only on ``(seed, id)``), so no sampler state is needed.

Mixed precision (``config.amp``, :mod:`lib.runtime.precision`): ``torch.autocast`` fp16 + ``GradScaler`` on CUDA, bfloat16
on a CPU with native bfloat16 (3.6x faster steps with AMX, 2.1x with AVX512-BF16 alone), float32 on other CPUs. Networks and
batches are kept channels-last (NHWC / NDHWC). Multi-GPU: launched with
``torchrun`` (``WORLD_SIZE > 1``) the process group is initialised (NCCL on CUDA, Gloo on CPU), G and D are
wrapped in ``DistributedDataParallel``, every rank draws its own sample ids (rank r of W takes ids
``(step * W + r) * B ... + B - 1``), and only rank 0 validates, logs and writes checkpoints.

:func:`export_weights` writes the small file shipped to users (fp16 state dict of G without its training-only
heads, network arguments, modality, intensity rule, version, training record); read it with
:func:`lib.predict.load_denoiser`.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from ..data.datasets import ValidationPair
from ..data.intensity import CT_RANGE_HU, MR_HEADROOM, MR_PERCENTILE
from ..losses import ADLDenoiserLoss, discriminator_hinge_loss, generator_adversarial_loss
from ..networks import EfficientUNetDenoiser, EfficientUNetDiscriminator
from ..runtime.precision import autocast_dtype, autocast_for
from .batch_norm import batch_norm_layers, recalibrate_batch_norm

__all__ = [
    "CHECKPOINT_FORMAT",
    "PHASES",
    "ADLTrainingConfig",
    "TrainingResult",
    "build_networks",
    "export_weights",
    "load_checkpoint",
    "save_checkpoint",
    "scaling_rule_for",
    "train_adl",
    "validation_window",
]

log = logging.getLogger(__name__)

PHASES = ("g_warmup", "d_warmup", "adversarial")
CHECKPOINT_FORMAT = "adl-training-checkpoint"
CHECKPOINT_VERSION = 1
WEIGHTS_FORMAT = "adl-denoiser-weights"  # same value as lib.weights.WEIGHTS_FORMAT
WEIGHTS_VERSION = 1
#: Display windows of the validation PSNR (CT in HU); MR uses 0 .. the clean image's maximum.
CT_VALIDATION_WINDOW = (-160.0, 240.0)


# ----------------------------------------------------------------------------------------------- configuration
@dataclass
class ADLTrainingConfig:
    """Everything that defines an ADL training run.

    Network: ``spatial_dims`` (2 slices / 3 volumes), ``filters`` (G's encoder channels, paper 96-192),
    ``disc_filters`` (D's, released code 16-128), ``enhancer_filters`` (content enhancer branch width, 48),
    ``norm`` (``"batch"``, or ``"instance"`` for batch size 1), ``residual`` (heads correct the noisy input in
    logit space, see :class:`~lib.networks.EfficientUNetDenoiser`; True), ``slices`` (2D: 1, or 3 / 5 adjacent
    slices as input channels, "2.5D"; the batches then hold ``slices`` channels, the centre one is the target and
    the discriminator's condition).
    Data: ``patch_size`` (informational for the trainer: the dataset makes the patches), ``batch_size`` (per
    process), ``num_workers`` (DataLoader workers).
    Phases: ``steps_g_warmup``, ``steps_d_warmup``, ``steps_adversarial`` (optimiser steps).
    Optimisation: ``lr_warmup`` (1e-4), ``lr_adversarial`` (5e-5), ``lr_step_size`` / ``lr_gamma`` (StepLR
    within each phase), ``adam_betas``, ``grad_clip_norm`` (None = no clipping).
    Loss: ``lambda_l1``, ``lambda_pyramid``, ``lambda_histogram``, ``lambda_adversarial`` (see
    :class:`lib.losses.ADLDenoiserLoss`).
    Run: ``modality`` ("CT"/"MR"), ``amp`` (mixed precision: fp16 autocast + GradScaler on CUDA, bfloat16 on a CPU
    with native bfloat16, see :mod:`lib.runtime.precision`), ``seed``, ``device``
    ("auto", "cpu", "cuda", "cuda:1"), ``checkpoint_dir`` (None: no checkpoints), ``checkpoint_every``,
    ``keep_all_checkpoints`` (also keep ``step_0000500.pt`` ... besides ``last.pt``),
    ``validation_every`` (steps; 0 = only at the end), ``val_roi_size`` (sliding window of validation),
    ``bn_recalibration_batches`` (after the last step, G's batch-norm statistics are recomputed over this many
    further training batches, at most ``total_steps``: :mod:`lib.engines.batch_norm`; 0 keeps the moving averages).
    """

    modality: str = "CT"
    spatial_dims: int = 2
    filters: tuple[int, ...] = (96, 128, 160, 192)
    disc_filters: tuple[int, ...] = (16, 32, 64, 128)
    enhancer_filters: int = 48
    norm: str = "batch"
    residual: bool = True
    slices: int = 1
    patch_size: int | tuple[int, ...] = 96
    batch_size: int = 4
    num_workers: int = 0
    steps_g_warmup: int = 2000
    steps_d_warmup: int = 500
    steps_adversarial: int = 4000
    lr_warmup: float = 1e-4
    lr_adversarial: float = 5e-5
    lr_step_size: int = 2000
    lr_gamma: float = 0.5
    adam_betas: tuple[float, float] = (0.9, 0.999)
    grad_clip_norm: float | None = None
    lambda_l1: float = 1.0
    lambda_pyramid: float = 1.0
    lambda_histogram: float = 1.0
    lambda_adversarial: float = 0.01
    amp: bool = True
    seed: int = 0
    device: str = "auto"
    checkpoint_dir: str | None = None
    checkpoint_every: int = 500
    keep_all_checkpoints: bool = False
    validation_every: int = 500
    val_roi_size: int | tuple[int, ...] | None = None
    bn_recalibration_batches: int = 200

    def __post_init__(self) -> None:
        self.modality = str(self.modality).upper()
        if self.modality not in ("CT", "MR"):
            raise ValueError(f"modality must be CT or MR, got {self.modality!r}")
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {self.spatial_dims}")
        self.filters = tuple(int(f) for f in self.filters)
        self.disc_filters = tuple(int(f) for f in self.disc_filters)
        for name in ("filters", "disc_filters"):
            value = getattr(self, name)
            if len(value) != 4 or any(f < 1 for f in value):
                raise ValueError(f"{name} must be 4 positive channel counts, got {value}")
        if isinstance(self.patch_size, (list, tuple)):
            self.patch_size = tuple(int(s) for s in self.patch_size)
        if isinstance(self.val_roi_size, list):
            self.val_roi_size = tuple(int(s) for s in self.val_roi_size)
        self.adam_betas = tuple(float(b) for b in self.adam_betas)  # type: ignore[assignment]
        for name in ("steps_g_warmup", "steps_d_warmup", "steps_adversarial"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.total_steps < 1:
            raise ValueError("the three phases have no steps at all")
        if self.slices < 1 or self.slices % 2 == 0 or (self.slices > 1 and self.spatial_dims != 2):
            raise ValueError(f"slices must be odd (1, 3, 5, ...) and above 1 only in 2D, got {self.slices} "
                             f"({self.spatial_dims}D)")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.lr_step_size < 1 or not 0 < self.lr_gamma <= 1:
            raise ValueError("lr_step_size must be >= 1 and lr_gamma in (0, 1]")
        if self.checkpoint_every < 0 or self.validation_every < 0:
            raise ValueError("checkpoint_every and validation_every must be >= 0")
        if self.bn_recalibration_batches < 0:
            raise ValueError(f"bn_recalibration_batches must be >= 0, got {self.bn_recalibration_batches}")

    @property
    def total_steps(self) -> int:
        return int(self.steps_g_warmup) + int(self.steps_d_warmup) + int(self.steps_adversarial)

    def phase_of(self, step: int) -> str:
        """Phase of the step with 0-based index ``step`` (``"done"`` past the end)."""
        if step < self.steps_g_warmup:
            return "g_warmup"
        if step < self.steps_g_warmup + self.steps_d_warmup:
            return "d_warmup"
        if step < self.total_steps:
            return "adversarial"
        return "done"

    def phase_start(self, phase: str) -> int:
        return {"g_warmup": 0, "d_warmup": self.steps_g_warmup,
                "adversarial": self.steps_g_warmup + self.steps_d_warmup}[phase]

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, data: dict) -> "ADLTrainingConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def generator_kwargs(self) -> dict:
        kwargs = {"spatial_dims": self.spatial_dims, "in_channels": int(self.slices), "out_channels": 1,
                  "filters": list(self.filters), "enhancer_filters": int(self.enhancer_filters), "norm": self.norm,
                  "residual": bool(self.residual)}
        if self.slices > 1:
            kwargs["slice_context"] = int(self.slices) // 2
        return kwargs

    def discriminator_kwargs(self) -> dict:
        return {"spatial_dims": self.spatial_dims, "in_channels": 1, "filters": list(self.disc_filters),
                "conditional": True, "norm": self.norm}


def build_networks(config: ADLTrainingConfig) -> tuple[EfficientUNetDenoiser, EfficientUNetDiscriminator]:
    """G (with its deep-supervision heads) and the conditional D of ``config``."""
    return (EfficientUNetDenoiser(**config.generator_kwargs(), deep_supervision=True),
            EfficientUNetDiscriminator(**config.discriminator_kwargs()))


def scaling_rule_for(modality: str) -> dict:
    """The intensity rule of :func:`lib.data.intensity_scaling_for` for ``modality``, as recorded in weights."""
    if modality.upper() == "CT":
        return {"modality": "CT", "rule": "fixed-range", "range_hu": list(CT_RANGE_HU), "clip": [0.0, 1.0]}
    return {"modality": modality.upper(), "rule": "robust-percentile", "low": "min(image minimum, 0)",
            "percentile": MR_PERCENTILE, "headroom": MR_HEADROOM, "clip": [0.0, 1.0]}


def validation_window(modality: str, clean: np.ndarray) -> tuple[float, float]:
    """PSNR window: CT [-160, 240] HU; MR 0 .. the clean image's maximum."""
    if modality.upper() == "CT":
        return CT_VALIDATION_WINDOW
    return 0.0, float(np.max(clean))


# ----------------------------------------------------------------------------------------------- results
@dataclass
class TrainingResult:
    """Outcome of :func:`train_adl`.

    Attributes:
        generator, discriminator: the trained networks (unwrapped from DDP; G in eval mode).
        config: the run's configuration.
        step: optimiser steps completed (over all phases).
        phase: phase of the last step.
        history: one dict per step (``step``, ``phase``, learning rates, loss terms, ``seconds``).
        validation: one dict per validation (``step``, ``psnr``, ``psnr_noisy``, per-image values).
        best_psnr: best mean validation PSNR (None without validation data).
        checkpoint_path: the last checkpoint written (None without ``checkpoint_dir``).
        seconds: wall time of this call.
    """

    generator: nn.Module
    discriminator: nn.Module
    config: ADLTrainingConfig
    step: int
    phase: str
    history: list[dict] = field(default_factory=list)
    validation: list[dict] = field(default_factory=list)
    best_psnr: float | None = None
    checkpoint_path: Path | None = None
    seconds: float = 0.0

    def training_record(self) -> dict:
        """A compact summary for :func:`export_weights`."""
        last = self.history[-1] if self.history else {}
        return {
            "steps": self.step,
            "phase": self.phase,
            "steps_per_phase": {p: getattr(self.config, f"steps_{p}") for p in PHASES},
            "config": self.config.to_dict(),
            "final_losses": {k: v for k, v in last.items() if isinstance(v, float)},
            "validation": self.validation[-20:],
            "best_psnr": self.best_psnr,
            "seconds": self.seconds,
            "step_seconds_total": step_seconds_total(self.history),
            "hardware": describe_hardware(),
        }


def step_seconds_total(history: Sequence[dict]) -> float:
    """Time spent in training steps over the whole run, resumed parts included (the history is checkpointed);
    ``seconds`` of a result is only its own call's wall time."""
    return float(sum(float(h.get("seconds", 0.0)) for h in history))


def describe_hardware() -> dict:
    """Where a model was trained: CPU model and count, GPU(s), torch version (for the training record)."""
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
    except OSError:
        pass
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpus": gpus,
            "world_size": int(os.environ.get("WORLD_SIZE", "1")), "torch": torch.__version__,
            "platform": platform.platform()}


# ----------------------------------------------------------------------------------------------- distributed
@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    initialised_here: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def _setup(config: ADLTrainingConfig) -> tuple[_Dist, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    want = config.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {config.device!r} was asked for but no CUDA GPU is available")
    if world <= 1:
        return _Dist(), torch.device(want)
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if want.startswith("cuda"):
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    initialised_here = False
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
        initialised_here = True
    return _Dist(dist.get_rank(), dist.get_world_size(), local_rank, initialised_here), device


def _broadcast_batch_norm(network: nn.Module) -> None:
    """Every process takes rank 0's batch-norm statistics (recalibrated there alone)."""
    import torch.distributed as dist

    for layer in batch_norm_layers(network):
        for buffer in (layer.running_mean, layer.running_var, layer.num_batches_tracked):
            dist.broadcast(buffer, src=0)


def _unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


# ----------------------------------------------------------------------------------------------- RNG state
def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------- checkpoints
def _atomic_save(payload: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def load_initial_weights(network: nn.Module, path: str | os.PathLike,
                         optional_prefixes: Sequence[str] = ("heads.1.", "heads.2.")) -> dict:
    """Start ``network`` from a weight file (fine-tuning), not from a training checkpoint (use ``resume``).

    The file's network must be the same class with the same arguments, except that a 2D network may
    start one that takes more adjacent slices (:func:`_inflated_input_channels`); parameters it lacks may only be under
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
    state = _inflated_input_channels(loaded.network.state_dict(), target.state_dict())
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


def _inflated_input_channels(state: dict, target: dict) -> dict:
    """A 2j + 1-slice network's weights for a network that takes 2k + 1 > 2j + 1 slices (1 -> 3, 3 -> 5, ...): each
    convolution that reads the image keeps its kernels on the centre 2j + 1 channels and gets zeros on the outer
    new ones, so the wider network starts as exactly the narrower one and learns from there what the further
    neighbours add."""
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


def save_checkpoint(path: str | os.PathLike, state: dict, fmt: str = CHECKPOINT_FORMAT,
                    version: int = CHECKPOINT_VERSION) -> Path:
    """Write a training checkpoint atomically (see :func:`train_adl` for the keys); ``fmt`` / ``version`` tag
    it (the GCN trainer writes ``"gcn-training-checkpoint"``)."""
    payload = {"format": fmt, "version": int(version), **state}
    return _atomic_save(payload, Path(path))


def load_checkpoint(path: str | os.PathLike, fmt: str = CHECKPOINT_FORMAT, version: int = CHECKPOINT_VERSION) -> dict:
    """Read a training checkpoint of format ``fmt`` (a file, or a checkpoint folder holding ``last.pt``) onto
    the CPU."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "last.pt"
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint {p} not found")
    payload = torch.load(p, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != fmt:
        found = payload.get("format") if isinstance(payload, dict) else None
        what = "an ADL training checkpoint" if fmt == CHECKPOINT_FORMAT else f"a {fmt!r} file"
        raise ValueError(f"{p} is not {what}" + (f" (its format is {found!r})" if found else ""))
    if int(payload.get("version", 0)) > version:
        raise ValueError(f"{p} has checkpoint version {payload.get('version')}; this code reads up to {version}")
    payload["path"] = str(p)
    return payload


def _plain(value: Any) -> Any:
    """JSON-able copy (what ``torch.load(weights_only=True)`` accepts)."""
    return json.loads(json.dumps(value, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def export_weights(
    generator: nn.Module,
    path: str | os.PathLike,
    config: ADLTrainingConfig,
    scaling_rule: dict | None = None,
    training_record: dict | None = None,
    half: bool = True,
) -> Path:
    """Write the weight file shipped to users; read it with :func:`lib.predict.load_denoiser`.

    Contents (a ``torch.save`` dict, loadable with ``weights_only=True``): ``format``
    (``"adl-denoiser-weights"``), ``version``, ``model`` (``config.model_name``: "adl", "tddl_gcn"),
    ``network`` (class name, a key of :data:`lib.networks.DENOISER_NETWORKS`, and keyword arguments; ADL's
    with ``deep_supervision=False``), ``state_dict`` (ADL: G without its training-only 1/2 and 1/4 heads;
    floating tensors in fp16 when ``half``), ``dtype``, ``modality``, ``spatial_dims``, ``scaling_rule``
    (default :func:`scaling_rule_for`), ``training`` (the record, e.g. :meth:`TrainingResult.training_record`),
    ``created_utc`` and library versions. About 9.5 MB for the default 2D ADL network in fp16.

    ``config`` is an :class:`ADLTrainingConfig` or any configuration with ``network_class``,
    ``network_kwargs()``, ``model_name``, ``modality`` and ``spatial_dims`` (e.g.
    :class:`lib.engines.GCNTrainingConfig`).
    """
    import monai

    net = _unwrap(generator)
    network_class = getattr(config, "network_class", "EfficientUNetDenoiser")
    if hasattr(config, "network_kwargs"):
        kwargs = dict(config.network_kwargs())
    else:
        kwargs = dict(config.generator_kwargs(), deep_supervision=False)
    state = {}
    for key, value in net.state_dict().items():
        if network_class == "EfficientUNetDenoiser" and key.startswith(("heads.1.", "heads.2.")):
            continue
        value = value.detach().cpu().clone()
        if half and value.is_floating_point():
            value = value.half()
        state[key] = value
    payload = {
        "format": WEIGHTS_FORMAT,
        "version": WEIGHTS_VERSION,
        "model": str(getattr(config, "model_name", "adl")),
        "network": {"class": network_class, "kwargs": _plain(kwargs)},
        "state_dict": state,
        "dtype": "float16" if half else "float32",
        "modality": config.modality,
        "spatial_dims": config.spatial_dims,
        "scaling_rule": _plain(scaling_rule if scaling_rule is not None else scaling_rule_for(config.modality)),
        "training": _plain(training_record or {}),
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "software": {"torch": str(torch.__version__), "monai": str(monai.__version__)},
    }
    return _atomic_save(payload, Path(path).expanduser())


# ----------------------------------------------------------------------------------------------- data
def _dataset_batches(dataset: Dataset, config: ADLTrainingConfig, start: int, total: int, dist_info: _Dist,
                     pin_memory: bool) -> Iterator[tuple[int, dict]]:
    """Yield ``(step, batch)`` for steps ``start .. total - 1``; resumable for map-style datasets."""
    B, W, R = int(config.batch_size), dist_info.world, dist_info.rank
    generator = torch.Generator().manual_seed(int(config.seed))  # keeps DataLoader seeding off the global RNG
    if isinstance(dataset, IterableDataset):
        log.warning("an IterableDataset cannot be resumed exactly: it restarts from its beginning")
        loader = DataLoader(dataset, batch_size=B, num_workers=config.num_workers, pin_memory=pin_memory,
                            generator=generator)
        step = start
        while step < total:
            produced = False
            for batch in loader:
                produced = True
                yield step, batch
                step += 1
                if step >= total:
                    return
            if not produced:
                raise ValueError("the training dataset is empty")
        return

    n = len(dataset)  # type: ignore[arg-type]
    if n < 1:
        raise ValueError("the training dataset is empty")
    direct = bool(getattr(dataset, "index_deterministic", False))

    def sample_index(g: int) -> int:
        if direct:
            return g
        rng = np.random.default_rng([int(config.seed), g // n])  # a fresh permutation per pass
        return int(rng.permutation(n)[g % n])

    steps_per_epoch = max(1, math.ceil(n / (B * W)))
    step = start
    while step < total:
        epoch = step // steps_per_epoch
        stop = min(total, (epoch + 1) * steps_per_epoch)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        batches = [[sample_index((s * W + R) * B + j) for j in range(B)] for s in range(step, stop)]
        loader = DataLoader(dataset, batch_sampler=batches, num_workers=config.num_workers, pin_memory=pin_memory,
                            generator=generator, persistent_workers=False)
        for batch in loader:
            yield step, batch
            step += 1


def _check_batch(batch: dict, config: ADLTrainingConfig) -> None:
    for key in ("noisy", "clean"):
        if key not in batch:
            raise ValueError(f"training samples must be dicts with 'noisy' and 'clean', missing {key!r}")
    x = batch["noisy"]
    if x.ndim != config.spatial_dims + 2 or x.shape != batch["clean"].shape:
        raise ValueError(f"batches must be (B, 1, *patch) with {config.spatial_dims} spatial dims and equal noisy/"
                         f"clean shapes; got {tuple(x.shape)} and {tuple(batch['clean'].shape)}")
    if any(s % 8 for s in x.shape[2:]):
        raise ValueError(f"patch size {tuple(x.shape[2:])} must be a multiple of 8")
    if x.shape[1] != config.slices:
        raise ValueError(f"batches hold {x.shape[1]} channel(s) but the network takes {config.slices} slice(s): build "
                         f"the dataset with slice_context={config.slices // 2}")


# ----------------------------------------------------------------------------------------------- validation
def _as_pairs(val_pairs: Sequence | None, modality: str) -> list[ValidationPair]:
    pairs = []
    for k, item in enumerate(val_pairs or []):
        if isinstance(item, ValidationPair):
            pairs.append(item)
        else:
            noisy, clean = item[0], item[1]
            pairs.append(ValidationPair(f"val{k}", np.asarray(noisy, np.float32), np.asarray(clean, np.float32), modality))
    return pairs


def _validate(generator: nn.Module, pairs: list[ValidationPair], config: ADLTrainingConfig, device: torch.device,
              step: int) -> dict:
    from ..evaluation import psnr
    from ..predict import denoise_array

    was_training = generator.training
    images = {}
    try:
        for pair in pairs:
            window = validation_window(pair.modality, pair.clean)
            denoised = denoise_array(generator, pair.noisy, pair.modality, device=device,
                                     roi_size=config.val_roi_size, amp=config.amp)
            images[pair.name] = {"psnr": psnr(denoised, pair.clean, window=window),
                                 "psnr_noisy": psnr(pair.noisy, pair.clean, window=window), "window": list(window)}
    finally:
        generator.train(was_training)
    mean = lambda key: float(np.mean([v[key] for v in images.values()]))  # noqa: E731
    return {"step": step, "psnr": mean("psnr"), "psnr_noisy": mean("psnr_noisy"), "images": images}


# ----------------------------------------------------------------------------------------------- training
class _TrainingLoop:
    """The bookkeeping both trainers share around their own optimisation step: step count, per-step history and
    log (``train_log.jsonl``), progress bar, validation and checkpoint cadence, the final validation and
    checkpoint, and the DDP barrier at the end. The trainer keeps what differs: its networks, the step itself and
    what its checkpoints hold (``checkpoint_state``, called with this loop).

    Use as a context manager around the batch loop (it closes the bar, and the log on an error), then call
    :meth:`finish`.
    """

    def __init__(self, config, dist_info: _Dist, device: torch.device, network: nn.Module, pairs: list,
                 step: int, history: list, validation: list, best: float | None,
                 checkpoint_state: Callable[["_TrainingLoop"], dict], checkpoint_format: str, checkpoint_version: int,
                 progress: bool, description: str) -> None:
        self.config, self.dist_info, self.device, self.network, self.pairs = config, dist_info, device, network, pairs
        self.step, self.history, self.validation, self.best = step, history, validation, best
        self.total = config.total_steps
        self.checkpoint_state = checkpoint_state
        self.checkpoint_format, self.checkpoint_version = checkpoint_format, checkpoint_version
        self.ckpt_dir = Path(config.checkpoint_dir).expanduser() if config.checkpoint_dir else None
        self.last_checkpoint: Path | None = None
        self.log_file = None
        if self.ckpt_dir is not None and dist_info.main:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            self.log_file = open(self.ckpt_dir / "train_log.jsonl", "a", encoding="utf-8")
        self.bar = None
        if progress and dist_info.main:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, initial=min(step, self.total), desc=description, unit="step",
                            dynamic_ncols=True)

    def __enter__(self) -> "_TrainingLoop":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if self.bar is not None:
            self.bar.close()
        if error is not None and self.log_file is not None:
            self.log_file.close()

    def set_description(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_description(text)

    def write_checkpoint(self) -> Path:
        assert self.ckpt_dir is not None
        state = self.checkpoint_state(self)
        if self.config.keep_all_checkpoints:
            save_checkpoint(self.ckpt_dir / f"step_{self.step:07d}.pt", state, self.checkpoint_format,
                            self.checkpoint_version)
        return save_checkpoint(self.ckpt_dir / "last.pt", state, self.checkpoint_format, self.checkpoint_version)

    def run_validation(self) -> None:
        if not self.pairs or not self.dist_info.main:
            return
        record = _validate(self.network, self.pairs, self.config, self.device, self.step)
        self.validation.append(record)
        self.best = record["psnr"] if self.best is None else max(self.best, record["psnr"])
        if self.log_file is not None:
            self.log_file.write(json.dumps({"validation": _plain(record)}) + "\n")
            self.log_file.flush()
        log.info("step %d: validation PSNR %.2f dB (noisy %.2f dB)", self.step, record["psnr"], record["psnr_noisy"])

    def end_step(self, record: dict, postfix: dict[str, str]) -> None:
        """Count the step just taken, record it, and validate / checkpoint when due."""
        self.step += 1
        self.history.append(record)
        if self.log_file is not None:
            self.log_file.write(json.dumps(record) + "\n")
        if self.bar is not None:
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(1)
        config, step = self.config, self.step
        if config.validation_every and step % config.validation_every == 0 and step < self.total:
            self.run_validation()
        if self.ckpt_dir is not None and config.checkpoint_every and step % config.checkpoint_every == 0 \
                and step < self.total and self.dist_info.main:
            self.last_checkpoint = self.write_checkpoint()

    def finish(self, revalidate: bool = False) -> None:
        """After the batch loop: final validation and checkpoint when the run is complete, then the barrier.
        ``revalidate``: validate again even if the last step was just validated (the network changed since, e.g.
        its batch-norm statistics were recalibrated; the new record replaces that step's)."""
        if self.step >= self.total:
            if revalidate and self.validation and self.validation[-1]["step"] == self.step:
                self.validation.pop()
                self.best = max((r["psnr"] for r in self.validation), default=None)
            if not self.validation or self.validation[-1]["step"] != self.step:
                self.run_validation()
            if self.ckpt_dir is not None and self.dist_info.main:
                self.last_checkpoint = self.write_checkpoint()
        if self.log_file is not None:
            self.log_file.close()
        if self.dist_info.world > 1:
            import torch.distributed as dist

            dist.barrier()  # rank 0 may still be validating / writing the last checkpoint


class _Schedules:
    """Per-phase StepLR schedules of the two optimisers."""

    def __init__(self, config: ADLTrainingConfig, opt_g: torch.optim.Optimizer, opt_d: torch.optim.Optimizer):
        self.config, self.opt = config, {"G": opt_g, "D": opt_d}
        self.phase: str | None = None
        self.sched: dict[str, torch.optim.lr_scheduler.StepLR] = {}

    @staticmethod
    def networks_of(phase: str) -> tuple[str, ...]:
        return {"g_warmup": ("G",), "d_warmup": ("D",), "adversarial": ("D", "G")}[phase]

    def start(self, phase: str, states: dict | None = None) -> None:
        base = self.config.lr_adversarial if phase == "adversarial" else self.config.lr_warmup
        self.phase, self.sched = phase, {}
        for name in self.networks_of(phase):
            opt = self.opt[name]
            for group in opt.param_groups:
                group["lr"] = base
                group["initial_lr"] = base
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=self.config.lr_step_size, gamma=self.config.lr_gamma)
            if states and states.get(name) is not None:
                sched.load_state_dict(states[name])
                for group, lr in zip(opt.param_groups, sched.get_last_lr()):
                    group["lr"] = lr  # the optimiser's own lr is not part of the scheduler state
            self.sched[name] = sched

    def step(self) -> None:
        for sched in self.sched.values():
            sched.step()

    def state_dict(self) -> dict:
        return {"phase": self.phase, **{name: s.state_dict() for name, s in self.sched.items()}}

    def lr(self, name: str) -> float:
        return float(self.opt[name].param_groups[0]["lr"])


def train_adl(
    config: ADLTrainingConfig,
    train_dataset: Dataset,
    val_pairs: Sequence | None = None,
    resume: str | os.PathLike | None = None,
    progress: bool = True,
    initial_weights: str | os.PathLike | None = None,
) -> TrainingResult:
    """Train ADL's denoiser and discriminator through the three phases (see the module docstring).

    Args:
        config: the run's settings.
        train_dataset: yields dicts ``{"noisy", "clean"}`` of (1, *patch) tensors in [0, 1], e.g.
            :class:`lib.data.ADLPatchDataset` (map-style, addressed by global sample id; exact resume). Any
            other map-style dataset is walked through seeded permutations (also resumable); an
            ``IterableDataset`` restarts on resume.
        val_pairs: full images for validation: :class:`lib.data.ValidationPair` objects or ``(noisy, clean)``
            tuples in the modality's units; PSNR in the modality's window (CT [-160, 240] HU, MR 0..max)
            through :func:`lib.predict.denoise_array`, every ``validation_every`` steps and at the end.
        resume: a checkpoint file, or a checkpoint folder (its ``last.pt``), to continue from. The network
            arguments must match ``config``; the step counts may be raised to train on.
        progress: tqdm progress bar (rank 0).
        initial_weights: a weight file (:func:`export_weights`) to start the denoiser from, for fine-tuning; D
            starts fresh (weight files do not carry it), so a fine-tuning run should give it a warm-up phase.
            Ignored when resuming.

    Returns:
        :class:`TrainingResult`.
    """
    started = time.perf_counter()
    dist_info, device = _setup(config)
    use_scaler = autocast_dtype(device, config.amp) == torch.float16  # bfloat16 needs no loss scaling
    # channels-last (NHWC / NDHWC): faster convolution kernels (oneDNN on the CPU, tensor cores on CUDA); a bfloat16
    # 3D step of batch 2 x 48^3 took 6.0 s instead of 11 s on one CPU thread
    memory_format = torch.channels_last if config.spatial_dims == 2 else torch.channels_last_3d
    try:
        torch.manual_seed(config.seed)
        np.random.seed(config.seed % 2**32)
        random.seed(config.seed)
        generator_net, discriminator_net = build_networks(config)
        generator_net.to(device, memory_format=memory_format)
        discriminator_net.to(device, memory_format=memory_format)
        opt_g = torch.optim.Adam(generator_net.parameters(), lr=config.lr_warmup, betas=config.adam_betas)
        opt_d = torch.optim.Adam(discriminator_net.parameters(), lr=config.lr_warmup, betas=config.adam_betas)
        scaler_g = torch.amp.GradScaler("cuda", enabled=use_scaler)
        scaler_d = torch.amp.GradScaler("cuda", enabled=use_scaler)
        schedules = _Schedules(config, opt_g, opt_d)
        step = 0
        history: list[dict] = []
        validation: list[dict] = []
        best: float | None = None
        sched_states: dict | None = None

        if initial_weights is not None and resume is None:
            load_initial_weights(generator_net, initial_weights)
        if resume is not None:
            ckpt = load_checkpoint(resume)
            saved = ADLTrainingConfig.from_dict(ckpt["config"])
            if saved.generator_kwargs() != config.generator_kwargs() or \
                    saved.discriminator_kwargs() != config.discriminator_kwargs():
                raise ValueError(f"checkpoint {ckpt['path']} holds other networks ({saved.generator_kwargs()}, "
                                 f"D {saved.discriminator_kwargs()['filters']}) than this configuration")
            if saved.seed != config.seed:
                log.warning("resuming with seed %d, the checkpoint was trained with seed %d: the data stream differs",
                            config.seed, saved.seed)
            generator_net.load_state_dict(ckpt["generator"])
            discriminator_net.load_state_dict(ckpt["discriminator"])
            opt_g.load_state_dict(ckpt["opt_g"])
            opt_d.load_state_dict(ckpt["opt_d"])
            scaler_g.load_state_dict(ckpt.get("scaler_g") or {})
            scaler_d.load_state_dict(ckpt.get("scaler_d") or {})
            step = int(ckpt["step"])
            history = list(ckpt.get("history") or [])
            validation = list(ckpt.get("validation") or [])
            best = ckpt.get("best_psnr")
            sched_states = ckpt.get("schedulers") or None
            _set_rng_state(ckpt["rng"])
            if dist_info.main:
                log.info("resumed from %s at step %d (%s)", ckpt["path"], step, config.phase_of(step))
            del ckpt

        if dist_info.world > 1:
            ddp_args = {"device_ids": [device.index]} if device.type == "cuda" else {}
            G: nn.Module = nn.parallel.DistributedDataParallel(generator_net, **ddp_args)
            D: nn.Module = nn.parallel.DistributedDataParallel(discriminator_net, **ddp_args)
        else:
            G, D = generator_net, discriminator_net

        loss_fn = ADLDenoiserLoss(lambda_l1=config.lambda_l1, lambda_pyramid=config.lambda_pyramid,
                                  lambda_histogram=config.lambda_histogram,
                                  lambda_adversarial=config.lambda_adversarial)
        def checkpoint_state(loop: _TrainingLoop) -> dict:
            return {
                "config": config.to_dict(),
                "network_kwargs": config.generator_kwargs(),
                "discriminator_kwargs": config.discriminator_kwargs(),
                "step": loop.step,
                "phase": config.phase_of(loop.step),
                "generator": generator_net.state_dict(),
                "discriminator": discriminator_net.state_dict(),
                "opt_g": opt_g.state_dict(),
                "opt_d": opt_d.state_dict(),
                "schedulers": schedules.state_dict(),
                "scaler_g": scaler_g.state_dict(),
                "scaler_d": scaler_d.state_dict(),
                "rng": _rng_state(),
                "history": _plain(loop.history),
                "validation": _plain(loop.validation),
                "best_psnr": loop.best,
                "world_size": dist_info.world,
                "scaling_rule": scaling_rule_for(config.modality),
            }

        def autocast():
            return autocast_for(device, config.amp)

        def optimiser_step(loss: torch.Tensor, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                           params) -> None:
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if config.grad_clip_norm:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip_norm)
            scaler.step(opt)
            scaler.update()

        def d_loss_of(clean: torch.Tensor, fake: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
            # as lib.losses.discriminator_loss: real and fake in ONE batch (shared BN statistics), fake detached;
            # the hinge loss itself in float32 outside autocast
            b = clean.shape[0]
            with autocast():
                logits = D(torch.cat([clean, fake.detach()]), torch.cat([condition, condition]))
            return discriminator_hinge_loss([l[:b].float() for l in logits], [l[b:].float() for l in logits])

        loop = _TrainingLoop(config, dist_info, device, generator_net, _as_pairs(val_pairs, config.modality), step,
                             history, validation, best, checkpoint_state, CHECKPOINT_FORMAT, CHECKPOINT_VERSION,
                             progress, f"ADL {config.phase_of(step)}")
        first_batch = True
        centre = int(config.slices) // 2
        with loop:
            batches = _dataset_batches(train_dataset, config, loop.step, loop.total, dist_info, device.type == "cuda")
            for batch_step, batch in batches:
                assert batch_step == loop.step
                phase = config.phase_of(loop.step)
                if schedules.phase != phase:
                    states = sched_states if (sched_states and sched_states.get("phase") == phase) else None
                    schedules.start(phase, states)
                    sched_states = None
                    loop.set_description(f"ADL {phase}")
                if first_batch:
                    _check_batch(batch, config)
                    first_batch = False
                noisy = batch["noisy"].to(device, non_blocking=True, memory_format=memory_format)
                clean = batch["clean"].to(device, non_blocking=True, memory_format=memory_format)
                # the noisy slice stack goes to G; its centre slice is the target and D's condition
                clean, condition = clean[:, centre:centre + 1], noisy[:, centre:centre + 1]
                t0 = time.perf_counter()
                record: dict[str, Any] = {"step": loop.step + 1, "phase": phase}
                if phase == "g_warmup":
                    G.train()
                    with autocast():
                        outputs = G(noisy)
                    total_loss, terms = loss_fn([o.float() for o in outputs], clean)
                    optimiser_step(total_loss, opt_g, scaler_g, generator_net.parameters())
                    record.update({f"g_{k}": v for k, v in terms.items()})
                elif phase == "d_warmup":
                    generator_net.eval()  # G frozen: no gradients, BN statistics untouched
                    with torch.no_grad(), autocast():
                        fake = generator_net(noisy).float()
                    generator_net.train()
                    D.train()
                    d_loss = d_loss_of(clean, fake, condition)
                    optimiser_step(d_loss, opt_d, scaler_d, discriminator_net.parameters())
                    record["d_loss"] = float(d_loss.detach())
                else:  # adversarial
                    G.train()
                    D.train()
                    with autocast():
                        outputs = G(noisy)
                    outputs = [o.float() for o in outputs]
                    d_loss = d_loss_of(clean, outputs[0], condition)
                    optimiser_step(d_loss, opt_d, scaler_d, discriminator_net.parameters())
                    # G update: D's parameters frozen; the bare module (not DDP) so that D expects no gradients
                    discriminator_net.requires_grad_(False)
                    try:
                        b = clean.shape[0]
                        with autocast():
                            logits = discriminator_net(torch.cat([clean, outputs[0]]),
                                                       torch.cat([condition, condition]))
                        adversarial = generator_adversarial_loss([l[b:].float() for l in logits])
                        total_loss, terms = loss_fn(outputs, clean, adversarial=adversarial)
                        optimiser_step(total_loss, opt_g, scaler_g, generator_net.parameters())
                    finally:
                        discriminator_net.requires_grad_(True)
                    record["d_loss"] = float(d_loss.detach())
                    record.update({f"g_{k}": v for k, v in terms.items()})
                schedules.step()
                record["lr_g"] = schedules.lr("G")
                record["lr_d"] = schedules.lr("D")
                record["seconds"] = time.perf_counter() - t0
                shown = {k: v for k, v in record.items() if k in ("g_total", "g_l1", "g_adversarial", "d_loss")}
                loop.end_step(record, {k: f"{v:.4f}" for k, v in shown.items()})
        recalibrated = 0
        recalibrate = loop.step >= loop.total and config.bn_recalibration_batches > 0
        if recalibrate and dist_info.main:
            # the batches after the last step's: fresh patches, the same stream on every rerun
            count = min(int(config.bn_recalibration_batches), loop.total)
            extra = _dataset_batches(train_dataset, config, loop.total, loop.total + count, _Dist(), False)
            loop.set_description("ADL batch-norm recalibration")
            recalibrated = recalibrate_batch_norm(
                generator_net, (b["noisy"].to(device, memory_format=memory_format) for _, b in extra), autocast)
            if recalibrated:
                log.info("recalibrated G's batch-norm statistics over %d training batches", recalibrated)
        if recalibrate and dist_info.world > 1:
            _broadcast_batch_norm(generator_net)
        loop.finish(revalidate=bool(recalibrated))
        generator_net.eval()
        return TrainingResult(generator_net, discriminator_net, config, loop.step,
                              config.phase_of(max(loop.step - 1, 0)), history, validation, loop.best,
                              loop.last_checkpoint, time.perf_counter() - started)
    finally:
        if dist_info.initialised_here:
            import torch.distributed as dist

            dist.destroy_process_group()
