"""Training of ADL (Adversarial Distortion Learning): the paper's three phases, resumable, AMP and multi-GPU.

Phases, run in this order over one global step counter:

1. ``g_warmup`` - the denoiser G alone: L1 + pyramidal textural + histogram loss on all three output scales
   (:class:`lib.losses.ADLDenoiserLoss` without the adversarial term), Adam at ``lr_warmup``.
2. ``d_warmup`` - the discriminator D alone, on clean x (real) against G(y) (fake) with G frozen (eval mode,
   no gradients, its parameters and BN statistics untouched), hinge loss (:func:`lib.losses.discriminator_loss`),
   Adam at ``lr_warmup``.
3. ``adversarial`` - per step one D update (clean vs G(y) detached) and then one G update with the
   adversarial term added (:func:`lib.losses.adversarial_generator_loss`, D's parameters frozen for that update),
   both at ``lr_adversarial``.

After the last step G's batch-norm statistics are recomputed over ``bn_recalibration_batches`` further training
batches (:mod:`lib.engines.batch_norm`: the moving averages trail the weights) and the run is validated again.

Each phase starts a ``StepLR`` schedule (``lr_step_size`` steps, ``lr_gamma``) from its base learning rate;
the Adam moments carry over between phases of the same network.

Checkpoints (``checkpoint_dir/last.pt``, every ``checkpoint_every`` steps and at the end; read with
:func:`load_adl_checkpoint`) hold G, D, both optimisers, the running schedulers, the AMP scalers, the step (the
phase follows from it), the RNG states, the loss history and the validation record; ``train_adl(...,
resume=path)`` continues exactly where it stopped: the data are addressed by global sample id
(:class:`lib.data.ADLPatchDataset` items depend only on ``(seed, id)``), so no sampler state is needed.

Mixed precision (``config.amp``, :mod:`lib.runtime.precision`): ``torch.autocast`` fp16 + ``GradScaler`` on CUDA,
bfloat16 on a CPU with native bfloat16, float32 on other CPUs. Networks and batches are kept channels-last (NHWC /
NDHWC). Multi-GPU (``torchrun``): G and D are wrapped in ``DistributedDataParallel`` and every rank draws its own
samples; the process group, the data stream, validation and checkpoints are the engine's (:mod:`lib.engines.engine`).

:func:`lib.weights.export_weights` writes the small file shipped to users; read it with
:func:`lib.predict.load_denoiser`.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from ..losses import ADLDenoiserLoss, adversarial_generator_loss, discriminator_loss
from ..networks import EfficientUNetDenoiser, EfficientUNetDiscriminator
from ..runtime.clock import Stopwatch
from ..runtime.machine import describe_machine
from ..runtime.precision import autocast_dtype, autocast_for
from ..weights.format import load_initial_weights
from .batch_norm import recalibrate_batch_norm
from .lesion_aware import LesionAwareTerms, check_lesion_aware
from .engine import (DistributedContext, TrainingLoop, as_validation_pairs, data_parallel, dataset_batches,
                     distributed_run, load_checkpoint, optimiser_step, resume_progress, seed_everything,
                     step_seconds_total)

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "PHASES",
    "ADLTrainingConfig",
    "TrainingResult",
    "build_networks",
    "load_adl_checkpoint",
    "train_adl",
]

log = logging.getLogger(__name__)

PHASES = ("g_warmup", "d_warmup", "adversarial")
CHECKPOINT_FORMAT = "adl-training-checkpoint"
CHECKPOINT_VERSION = 1


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
    Lesion-aware (LIDnet-style, :mod:`lib.engines.lesion_aware`; needs batches with an ``"roi"``): ``roi_l1_weight``,
    ``roi_perceptual_weight`` (with ``lesion_detector``, a detector weight file), ``collaborative_every`` (k > 0:
    the detector is updated every k-th step on G's outputs; 0: frozen). The terms act on G's full-resolution
    output in every phase that updates G.
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
    roi_l1_weight: float = 0.0
    roi_perceptual_weight: float = 0.0
    lesion_detector: str | None = None
    collaborative_every: int = 0

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
        check_lesion_aware(self)

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
        """A compact summary for :func:`lib.weights.export_weights` (``hardware``: where it was trained,
        :func:`lib.runtime.machine.describe_machine`)."""
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
            "hardware": describe_machine(),
        }


def load_adl_checkpoint(path: str | os.PathLike) -> dict:
    """Read an ADL training checkpoint (file, or folder holding ``last.pt``) onto the CPU."""
    return load_checkpoint(path, CHECKPOINT_FORMAT, CHECKPOINT_VERSION, "an ADL training checkpoint")


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
        train_dataset: yields dicts ``{"noisy", "clean"}`` of (slices, *patch) tensors in [0, 1], e.g.
            :class:`lib.data.ADLPatchDataset` (map-style, addressed by global sample id; exact resume). Any
            other map-style dataset is walked through seeded permutations (also resumable); an
            ``IterableDataset`` restarts on resume.
        val_pairs: full images for validation: :class:`lib.data.ValidationPair` objects or ``(noisy, clean)``
            tuples in the modality's units; PSNR in the modality's window (CT [-160, 240] HU, MR 0..max)
            through :func:`lib.predict.denoise_array`, every ``validation_every`` steps and at the end.
        resume: a checkpoint file, or a checkpoint folder (its ``last.pt``), to continue from. The network
            arguments must match ``config``; the step counts may be raised to train on.
        progress: tqdm progress bar (rank 0).
        initial_weights: a weight file (:func:`lib.weights.export_weights`) to start the denoiser from, for
            fine-tuning; D starts fresh (weight files do not carry it), so a fine-tuning run should give it a
            warm-up phase. Ignored when resuming.

    Returns:
        :class:`TrainingResult`.
    """
    stopwatch = Stopwatch()
    with distributed_run(config) as (context, device):
        use_scaler = autocast_dtype(device, config.amp) == torch.float16  # bfloat16 needs no loss scaling
        # channels-last (NHWC / NDHWC): faster convolution kernels (oneDNN on the CPU, tensor cores on CUDA)
        memory_format = torch.channels_last if config.spatial_dims == 2 else torch.channels_last_3d
        seed_everything(config.seed)
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
        lesion_state: dict | None = None

        if initial_weights is not None and resume is None:
            load_initial_weights(generator_net, initial_weights)
        if resume is not None:
            ckpt = load_adl_checkpoint(resume)
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
            sched_states = ckpt.get("schedulers") or None
            step, history, validation, best = resume_progress(ckpt)
            lesion_state = ckpt.get("lesion_detector")
            if context.main:
                log.info("resumed from %s at step %d (%s)", ckpt["path"], step, config.phase_of(step))
            del ckpt

        G = data_parallel(generator_net, context, device)
        D = data_parallel(discriminator_net, context, device)
        loss_fn = ADLDenoiserLoss(lambda_l1=config.lambda_l1, lambda_pyramid=config.lambda_pyramid,
                                  lambda_histogram=config.lambda_histogram,
                                  lambda_adversarial=config.lambda_adversarial)
        lesion_terms = LesionAwareTerms(config, device)
        if lesion_terms.optimiser is not None and context.world > 1:
            raise ValueError("the collaborative detector schedule (collaborative_every) runs in one process only")
        if resume is not None:
            lesion_terms.load_state_dict(lesion_state)

        def checkpoint_state(loop: TrainingLoop) -> dict:
            return {
                "network_kwargs": config.generator_kwargs(),
                "discriminator_kwargs": config.discriminator_kwargs(),
                "phase": config.phase_of(loop.step),
                "generator": generator_net.state_dict(),
                "discriminator": discriminator_net.state_dict(),
                "opt_g": opt_g.state_dict(),
                "opt_d": opt_d.state_dict(),
                "schedulers": schedules.state_dict(),
                "scaler_g": scaler_g.state_dict(),
                "scaler_d": scaler_d.state_dict(),
                "lesion_detector": lesion_terms.state_dict(),
            }

        def autocast():
            return autocast_for(device, config.amp)

        def g_step(loss: torch.Tensor) -> None:
            optimiser_step(loss, opt_g, scaler_g, generator_net.parameters(), config.grad_clip_norm)

        def d_step(loss: torch.Tensor) -> None:
            optimiser_step(loss, opt_d, scaler_d, discriminator_net.parameters(), config.grad_clip_norm)

        loop = TrainingLoop(config, context, device, generator_net, as_validation_pairs(val_pairs, config.modality),
                            step, history, validation, best, checkpoint_state, CHECKPOINT_FORMAT, CHECKPOINT_VERSION,
                            progress, f"ADL {config.phase_of(step)}")
        first_batch = True
        centre = int(config.slices) // 2
        with loop:
            batches = dataset_batches(train_dataset, config, loop.step, loop.total, context, device.type == "cuda")
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
                roi = batch["roi"].to(device, non_blocking=True) if "roi" in batch else None
                # the noisy slice stack goes to G; its centre slice is the target and D's condition
                clean, condition = clean[:, centre:centre + 1], noisy[:, centre:centre + 1]
                step_time = Stopwatch()
                record: dict[str, Any] = {"step": loop.step + 1, "phase": phase}
                if phase == "g_warmup":
                    G.train()
                    with autocast():
                        outputs = G(noisy)
                    outputs = [o.float() for o in outputs]
                    total_loss, terms = loss_fn(outputs, clean)
                    lesion_loss, lesion_logged = lesion_terms.loss(outputs[0], clean, roi)
                    g_step(total_loss + lesion_loss)
                    record.update({f"g_{k}": v for k, v in terms.items()})
                    record.update(lesion_logged)
                    record.update(lesion_terms.detector_step(loop.step, outputs[0], roi))
                elif phase == "d_warmup":
                    generator_net.eval()  # G frozen: no gradients, BN statistics untouched
                    with torch.no_grad(), autocast():
                        fake = generator_net(noisy).float()
                    generator_net.train()
                    D.train()
                    with autocast():
                        d_loss = discriminator_loss(D, clean, fake, condition)
                    d_step(d_loss)
                    record["d_loss"] = float(d_loss.detach())
                else:  # adversarial
                    G.train()
                    D.train()
                    with autocast():
                        outputs = G(noisy)
                    outputs = [o.float() for o in outputs]
                    with autocast():
                        d_loss = discriminator_loss(D, clean, outputs[0], condition)
                    d_step(d_loss)
                    # G update: D's parameters frozen; the bare module (not DDP) so that D expects no gradients. D
                    # judges G(y) beside the clean batch, as in its own update (the same batch-norm statistics).
                    discriminator_net.requires_grad_(False)
                    try:
                        with autocast():
                            adversarial = adversarial_generator_loss(discriminator_net, outputs[0], condition,
                                                                     clean=clean)
                        total_loss, terms = loss_fn(outputs, clean, adversarial=adversarial)
                        lesion_loss, lesion_logged = lesion_terms.loss(outputs[0], clean, roi)
                        g_step(total_loss + lesion_loss)
                    finally:
                        discriminator_net.requires_grad_(True)
                    record["d_loss"] = float(d_loss.detach())
                    record.update({f"g_{k}": v for k, v in terms.items()})
                    record.update(lesion_logged)
                    record.update(lesion_terms.detector_step(loop.step, outputs[0], roi))
                schedules.step()
                record["lr_g"] = schedules.lr("G")
                record["lr_d"] = schedules.lr("D")
                record["seconds"] = step_time.seconds
                shown = {k: v for k, v in record.items() if k in ("g_total", "g_l1", "g_adversarial", "d_loss")}
                loop.end_step(record, {k: f"{v:.4f}" for k, v in shown.items()})
        recalibrated = 0
        if loop.complete and config.bn_recalibration_batches > 0:
            loop.set_description("ADL batch-norm recalibration")
            recalibrated = _recalibrate_generator(generator_net, train_dataset, config, loop.total, device,
                                                  memory_format, autocast)
            if recalibrated and context.main:
                log.info("recalibrated G's batch-norm statistics over %d training batches", recalibrated)
        loop.finish(revalidate=bool(recalibrated))
        del G, D  # before the process group goes (lib.engines.engine: a live DDP wrapper can deadlock its teardown)
        generator_net.eval()
        return TrainingResult(generator_net, discriminator_net, config, loop.step,
                              config.phase_of(max(loop.step - 1, 0)), history, validation, loop.best,
                              loop.last_checkpoint, stopwatch.seconds)


def _recalibrate_generator(generator: nn.Module, dataset: Dataset, config: ADLTrainingConfig, total: int,
                           device: torch.device, memory_format: torch.memory_format, autocast) -> int:
    """Recompute G's batch-norm statistics over the ``bn_recalibration_batches`` batches after the last step's (fresh
    patches, the same stream on every rerun and on every rank). Every rank of a distributed run computes them itself
    from the same batches and weights, so the replicas agree without a collective (see :mod:`lib.engines.engine` on
    why the engine hands no tensor of its own to a collective). Returns the number of batches used."""
    count = min(int(config.bn_recalibration_batches), total)
    extra = dataset_batches(dataset, config, total, total + count, DistributedContext(), False)
    return recalibrate_batch_norm(
        generator, (b["noisy"].to(device, memory_format=memory_format) for _, b in extra), autocast)
