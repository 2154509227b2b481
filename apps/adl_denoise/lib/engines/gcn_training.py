"""Training of the TDDL-GCN denoiser (:class:`lib.networks.GCNDenoiser`): supervised, resumable, AMP and
multi-GPU, on the training engine (:mod:`lib.engines.engine`: data stream, checkpoints, RNG state, validation).

Data: any dataset of ``{"noisy", "clean"}`` patches in [0, 1] (:class:`lib.data.ADLPatchDataset`, with
``slice_context`` when the network sees adjacent slices): pseudo-LDCT / NDCT pairs from a learned TDDL noise
model (``lib.noise_learning.LearnedNoiseSource``), plain simulated pairs (:class:`lib.data.SyntheticNoiseSource`)
or real pairs (:class:`lib.data.PairedFolderSource`). The target is the clean CENTRE slice.

Loss: L1 (default) or MSE between the network output (noisy input minus the predicted noise) and the clean
target, on the [0, 1] scale. L1 is the default: it is less dominated by the few large errors at edges and
metal, and penalises the over-smoothing that MSE rewards (GCDN trained with MSE; choose ``loss="mse"`` for it).

Optimisation: Adam (``lr``, ``adam_betas``), step decay (``StepLR``: ``lr_step_size`` steps, ``lr_gamma``),
optional gradient clipping; fp16 autocast + ``GradScaler`` on CUDA (the k-NN search itself always runs in
float32). Under ``torchrun`` the network is wrapped in ``DistributedDataParallel``, each rank draws its own
sample ids, every rank validates its share of the validation images and rank 0 logs and checkpoints
(:mod:`lib.engines.engine`).

Checkpoints (``checkpoint_dir/last.pt``, format ``"gcn-training-checkpoint"``) hold the network (class,
arguments, state), the optimiser, the scheduler, the AMP scaler, the step, the RNG states, the loss history
and the validation record: ``train_gcn(..., resume=path)`` continues exactly (the data are addressed by global
sample id). :func:`lib.predict.load_denoiser` reads them as well as the exported weight files
(:func:`lib.weights.export_weights`, format ``"adl-denoiser-weights"``, network class ``"GCNDenoiser"``).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..networks import GCNDenoiser
from ..runtime.clock import Stopwatch
from ..runtime.machine import describe_machine
from ..weights.format import load_initial_weights, plain_json
from .lesion_aware import LesionAwareTerms, check_lesion_aware
from .engine import (TrainingLoop, as_validation_pairs, data_parallel, dataset_batches, distributed_run,
                     load_checkpoint, optimiser_step, resume_progress, seed_everything, step_seconds_total)

__all__ = [
    "GCN_CHECKPOINT_FORMAT",
    "GCN_CHECKPOINT_VERSION",
    "GCNTrainingConfig",
    "GCNTrainingResult",
    "load_gcn_checkpoint",
    "train_gcn",
]

log = logging.getLogger(__name__)

GCN_CHECKPOINT_FORMAT = "gcn-training-checkpoint"
GCN_CHECKPOINT_VERSION = 1
LOSSES = ("l1", "mse")


@dataclass
class GCNTrainingConfig:
    """Everything that defines a GCN training run.

    Network (see :class:`lib.networks.GCNDenoiser`): ``slices`` (adjacent slices seen, odd; 1 = 2D),
    ``link_slices`` (slice-based 3D variant), ``features``, ``k``, ``search_window`` (training),
    ``inference_search_window`` (eval; None = ``search_window``), ``n_blocks``, ``layers_per_block``, ``rank``,
    ``edge_hidden``, ``norm``.
    Data: ``patch_size`` (informational; the dataset makes the patches; 48 by default, GCDN used 42),
    ``batch_size`` (per process), ``num_workers``.
    Optimisation: ``steps``, ``lr``, ``lr_step_size`` / ``lr_gamma`` (step decay), ``adam_betas``,
    ``grad_clip_norm``, ``loss`` ("l1" or "mse").
    Run: ``modality`` (CT by default; MR works with MR data), ``amp``, ``seed``, ``device``, ``checkpoint_dir``,
    ``checkpoint_every``, ``keep_all_checkpoints``, ``validation_every`` (0 = only at the end),
    ``val_roi_size``. Lesion-aware terms as in :class:`lib.engines.adl_training.ADLTrainingConfig`:
    ``roi_l1_weight``, ``roi_perceptual_weight``, ``lesion_detector``, ``collaborative_every``.
    """

    network_class: ClassVar[str] = "GCNDenoiser"
    model_name: ClassVar[str] = "tddl_gcn"
    spatial_dims: ClassVar[int] = 2

    modality: str = "CT"
    slices: int = 1
    link_slices: bool = False
    features: int = 32
    k: int = 16
    search_window: int = 21
    inference_search_window: int | None = None
    n_blocks: int = 2
    layers_per_block: int = 2
    rank: int = 4
    edge_hidden: int | None = None
    norm: str = "batch"
    patch_size: int | tuple[int, ...] = 48
    batch_size: int = 8
    num_workers: int = 0
    steps: int = 20000
    lr: float = 1e-4
    lr_step_size: int = 5000
    lr_gamma: float = 0.5
    adam_betas: tuple[float, float] = (0.9, 0.999)
    grad_clip_norm: float | None = None
    loss: str = "l1"
    amp: bool = True
    seed: int = 0
    device: str = "auto"
    checkpoint_dir: str | None = None
    checkpoint_every: int = 500
    keep_all_checkpoints: bool = False
    validation_every: int = 500
    val_roi_size: int | tuple[int, ...] | None = None
    roi_l1_weight: float = 0.0
    roi_perceptual_weight: float = 0.0
    lesion_detector: str | None = None
    collaborative_every: int = 0

    def __post_init__(self) -> None:
        self.modality = str(self.modality).upper()
        if self.modality not in ("CT", "MR"):
            raise ValueError(f"modality must be CT or MR, got {self.modality!r}")
        check_lesion_aware(self)
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if isinstance(self.patch_size, (list, tuple)):
            self.patch_size = tuple(int(s) for s in self.patch_size)
        if isinstance(self.val_roi_size, list):
            self.val_roi_size = tuple(int(s) for s in self.val_roi_size)
        self.adam_betas = tuple(float(b) for b in self.adam_betas)  # type: ignore[assignment]
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be >= 1")
        if self.lr_step_size < 1 or not 0 < self.lr_gamma <= 1:
            raise ValueError("lr_step_size must be >= 1 and lr_gamma in (0, 1]")
        if self.checkpoint_every < 0 or self.validation_every < 0:
            raise ValueError("checkpoint_every and validation_every must be >= 0")
        GCNDenoiser(**self.network_kwargs())  # validates the network arguments early

    @property
    def total_steps(self) -> int:
        return int(self.steps)

    @property
    def slice_context(self) -> int:
        return int(self.slices) // 2

    def network_kwargs(self) -> dict:
        return {"in_channels": int(self.slices), "features": int(self.features), "k": int(self.k),
                "search_window": int(self.search_window),
                "inference_search_window": None if self.inference_search_window is None
                else int(self.inference_search_window),
                "n_blocks": int(self.n_blocks), "layers_per_block": int(self.layers_per_block), "rank": int(self.rank),
                "edge_hidden": None if self.edge_hidden is None else int(self.edge_hidden),
                "link_slices": bool(self.link_slices), "norm": self.norm}

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, data: dict) -> "GCNTrainingConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class GCNTrainingResult:
    """Outcome of :func:`train_gcn`: the trained network (eval mode, on the training device), the step reached,
    the per-step history, the validation record, the best validation PSNR, the last checkpoint and the wall
    time of the call."""

    network: GCNDenoiser
    config: GCNTrainingConfig
    step: int
    history: list[dict] = field(default_factory=list)
    validation: list[dict] = field(default_factory=list)
    best_psnr: float | None = None
    checkpoint_path: Path | None = None
    seconds: float = 0.0

    @property
    def generator(self) -> GCNDenoiser:  # the name the ADL helpers use for "the denoiser"
        return self.network

    def training_record(self) -> dict:
        """A compact summary for :func:`lib.weights.export_weights` (``hardware``: where it was trained,
        :func:`lib.runtime.machine.describe_machine`)."""
        last = self.history[-1] if self.history else {}
        return {
            "model": GCNTrainingConfig.model_name,
            "steps": self.step,
            "config": self.config.to_dict(),
            "final_losses": {k: v for k, v in last.items() if k == "loss"},
            "betas": self.network.betas(),
            "validation": self.validation[-20:],
            "best_psnr": self.best_psnr,
            "seconds": self.seconds,
            "step_seconds_total": step_seconds_total(self.history),
            "hardware": describe_machine(),
        }


def load_gcn_checkpoint(path: str | os.PathLike) -> dict:
    """Read a GCN training checkpoint (file, or folder holding ``last.pt``) onto the CPU."""
    return load_checkpoint(path, GCN_CHECKPOINT_FORMAT, GCN_CHECKPOINT_VERSION)


def _check_batch(batch: dict, config: GCNTrainingConfig) -> None:
    for key in ("noisy", "clean"):
        if key not in batch:
            raise ValueError(f"training samples must be dicts with 'noisy' and 'clean', missing {key!r}")
    noisy, clean = batch["noisy"], batch["clean"]
    if noisy.ndim != 4 or noisy.shape[1] != config.slices or noisy.shape != clean.shape:
        raise ValueError(f"batches must be (B, {config.slices}, H, W) for a network seeing {config.slices} slice(s) "
                         f"(ADLPatchDataset(..., slice_context={config.slice_context})), noisy and clean alike; got "
                         f"{tuple(noisy.shape)} and {tuple(clean.shape)}")


def train_gcn(
    config: GCNTrainingConfig,
    train_dataset: Dataset,
    val_pairs: Sequence | None = None,
    resume: str | os.PathLike | None = None,
    progress: bool = True,
    initial_weights: str | os.PathLike | None = None,
) -> GCNTrainingResult:
    """Train a :class:`lib.networks.GCNDenoiser` (see the module docstring).

    Args:
        config: the run's settings.
        train_dataset: yields ``{"noisy", "clean"}`` of (slices, *patch) tensors in [0, 1] (e.g.
            :class:`lib.data.ADLPatchDataset` with ``slice_context = config.slices // 2``).
        val_pairs: full images for validation (:class:`lib.data.ValidationPair` or ``(noisy, clean)`` in the
            modality's units), PSNR through :func:`lib.predict.denoise_array` every ``validation_every``
            steps and at the end.
        resume: a checkpoint file or folder to continue from; the network arguments must match ``config``
            (``steps`` may be raised to train on).
        progress: tqdm progress bar (rank 0).
        initial_weights: a weight file to start from (fine-tuning); ignored when resuming.
    """
    stopwatch = Stopwatch()
    with distributed_run(config) as (context, device):
        use_amp = bool(config.amp) and device.type == "cuda"
        seed_everything(config.seed)
        network = GCNDenoiser(**config.network_kwargs()).to(device)
        optimiser = torch.optim.Adam(network.parameters(), lr=config.lr, betas=config.adam_betas)
        for group in optimiser.param_groups:
            group["initial_lr"] = config.lr
        scheduler = torch.optim.lr_scheduler.StepLR(optimiser, step_size=config.lr_step_size, gamma=config.lr_gamma)
        scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
        step, history, validation, best = 0, [], [], None
        lesion_state: dict | None = None

        if initial_weights is not None and resume is None:
            load_initial_weights(network, initial_weights, optional_prefixes=())
        if resume is not None:
            ckpt = load_gcn_checkpoint(resume)
            if ckpt["network_kwargs"] != plain_json(config.network_kwargs()):
                raise ValueError(f"checkpoint {ckpt['path']} holds another network ({ckpt['network_kwargs']}) "
                                 "than this configuration")
            if ckpt["config"].get("seed") != config.seed:
                log.warning("resuming with seed %d, the checkpoint was trained with seed %s: the data stream differs",
                            config.seed, ckpt["config"].get("seed"))
            network.load_state_dict(ckpt["denoiser"])
            optimiser.load_state_dict(ckpt["optimiser"])
            scheduler.load_state_dict(ckpt["scheduler"])
            for group, lr in zip(optimiser.param_groups, scheduler.get_last_lr()):
                group["lr"] = lr
            scaler.load_state_dict(ckpt.get("scaler") or {})
            step, history, validation, best = resume_progress(ckpt)
            lesion_state = ckpt.get("lesion_detector")
            if context.main:
                log.info("resumed from %s at step %d", ckpt["path"], step)
            del ckpt

        model = data_parallel(network, context, device)
        loss_fn = F.l1_loss if config.loss == "l1" else F.mse_loss
        centre = config.slice_context
        lesion_terms = LesionAwareTerms(config, device)
        if lesion_terms.optimiser is not None and context.world > 1:
            raise ValueError("the collaborative detector schedule (collaborative_every) runs in one process only")
        lesion_terms.load_state_dict(lesion_state)

        def checkpoint_state(loop: TrainingLoop) -> dict:
            return {
                "network_class": GCNTrainingConfig.network_class,
                "network_kwargs": plain_json(config.network_kwargs()),
                "denoiser": network.state_dict(),
                "optimiser": optimiser.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "lesion_detector": lesion_terms.state_dict(),
            }

        pairs = as_validation_pairs(val_pairs, config.modality)
        loop = TrainingLoop(config, context, device, network, pairs, step, history, validation, best,
                            checkpoint_state, GCN_CHECKPOINT_FORMAT, GCN_CHECKPOINT_VERSION, progress, "TDDL-GCN")
        first_batch = True
        with loop:
            batches = dataset_batches(train_dataset, config, loop.step, loop.total, context, device.type == "cuda")
            for batch_step, batch in batches:
                assert batch_step == loop.step
                if first_batch:
                    _check_batch(batch, config)
                    first_batch = False
                noisy = batch["noisy"].to(device, non_blocking=True)
                target = batch["clean"][:, centre:centre + 1].to(device, non_blocking=True)
                roi = batch["roi"].to(device, non_blocking=True) if "roi" in batch else None
                step_time = Stopwatch()
                model.train()
                with torch.autocast(device_type="cuda", dtype=torch.float16, enabled=use_amp):
                    output = model(noisy)
                loss = loss_fn(output.float(), target)
                lesion_loss, lesion_logged = lesion_terms.loss(output.float(), target, roi)
                if not torch.isfinite(loss + lesion_loss):
                    raise FloatingPointError(f"non-finite training loss at step {loop.step + 1}")
                optimiser_step(loss + lesion_loss, optimiser, scaler, network.parameters(), config.grad_clip_norm)
                scheduler.step()
                record: dict[str, Any] = {"step": loop.step + 1, "loss": float(loss.detach()),
                                          "lr": float(optimiser.param_groups[0]["lr"]),
                                          "seconds": step_time.seconds, **lesion_logged,
                                          **lesion_terms.detector_step(loop.step, output.float(), roi)}
                loop.end_step(record, {"loss": f"{record['loss']:.5f}"})
        loop.finish()
        del model  # before the process group goes (lib.engines.engine: a live DDP wrapper can deadlock its teardown)
        network.eval()
        return GCNTrainingResult(network, config, loop.step, history, validation, loop.best, loop.last_checkpoint,
                                 stopwatch.seconds)
