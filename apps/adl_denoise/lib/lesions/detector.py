"""The lesion detector of lesion-aware training: its training on synthetic lesions, and its weight file.

:func:`train_lesion_detector` fits a :class:`lib.networks.LesionDetector` to segment the synthetic lesions of a
lesion-aware training source (``SyntheticNoiseSource(..., lesions_per_slice=N)``) from noisy AND clean patches
(half each), so that its features respond to a lesion whether or not noise surrounds it: a denoiser's output
lies between the two. Loss: binary cross-entropy (lesions weighted up, they cover a few % of a patch) + Dice.

Weight file: ``torch.save`` of ``{"format": DETECTOR_FORMAT, "version": 1, "network_kwargs", "state_dict",
"record"}`` (float32; ~1-2 MB).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F

from ..data.intensity import CT_RANGE_HU
from ..networks.lesion_detector import LesionDetector
from ..runtime.atomic import atomic_torch_save

__all__ = ["DETECTOR_FORMAT", "detector_window", "load_lesion_detector", "save_lesion_detector",
           "train_lesion_detector", "detection_dice"]

log = logging.getLogger(__name__)

DETECTOR_FORMAT = "adl-denoise-lesion-detector"
#: CT soft-tissue window (HU) that the detector sees; lesions of -30..+40 HU live in it
CT_DETECTOR_WINDOW_HU = (-160.0, 240.0)


def detector_window(modality: str) -> tuple[float, float]:
    """The detector's input window in the denoisers' [0, 1] scaling: CT [-160, 240] HU; MR (0, 0.6), i.e. up to
    1.2x the 99.5th percentile (MR scaling maps that percentile to 0.5)."""
    if modality.upper() == "CT":
        low, high = CT_RANGE_HU
        return tuple((h - low) / (high - low) for h in CT_DETECTOR_WINDOW_HU)  # type: ignore[return-value]
    return (0.0, 0.6)


def save_lesion_detector(detector: LesionDetector, path: str | os.PathLike, record: dict | None = None) -> Path:
    """Write the detector's weight file atomically; returns its path."""
    payload = {"format": DETECTOR_FORMAT, "version": 1, "network_kwargs": detector.kwargs(),
               "state_dict": {k: v.detach().cpu().float() for k, v in detector.state_dict().items()},
               "record": dict(record or {})}
    return atomic_torch_save(payload, Path(path))


def load_lesion_detector(path: str | os.PathLike) -> LesionDetector:
    """Read a detector weight file (CPU, eval mode). Raises ValueError when it is not one."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"lesion detector weights not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt file
        raise ValueError(f"{path} is not a readable lesion detector weight file: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != DETECTOR_FORMAT:
        raise ValueError(f"{path} is not a lesion detector weight file (format {DETECTOR_FORMAT!r})")
    kwargs = dict(payload["network_kwargs"])
    kwargs["window"] = tuple(kwargs["window"])
    detector = LesionDetector(**kwargs)
    detector.load_state_dict(payload["state_dict"])
    detector.eval()
    return detector


def detection_dice(logits: torch.Tensor, roi: torch.Tensor) -> float:
    """Dice of ``sigmoid(logits) > 0.5`` against ``roi > 0.5`` (both (B, 1, H, W)); 1.0 when both are empty."""
    pred = logits > 0
    true = roi > 0.5
    inter = float((pred & true).sum())
    total = float(pred.sum() + true.sum())
    return 1.0 if total == 0 else 2.0 * inter / total


def train_lesion_detector(
    batches: Iterable[dict],
    modality: str,
    steps: int,
    *,
    lr: float = 1e-3,
    features: tuple[int, ...] = (16, 16, 32, 64, 128, 16),
    device: str = "cpu",
    seed: int = 0,
    progress: bool = True,
) -> tuple[LesionDetector, dict]:
    """Train a detector for ``steps`` optimiser steps on ``batches`` (dicts with "noisy", "clean", "roi" of
    (B, C, H, W), C = 1 or a slice stack whose centre slice is used). Returns the detector (eval mode) and a
    record (losses, Dice on the last 50 batches for noisy and clean inputs)."""
    from monai.losses import DiceLoss
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    detector = LesionDetector(2, features, detector_window(modality)).to(device)
    optimiser = torch.optim.Adam(detector.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=max(1, int(steps)))
    dice_loss = DiceLoss(sigmoid=True, batch=True)
    pos_weight = torch.tensor(10.0, device=device)
    history: list[dict] = []
    dice_noisy: list[float] = []
    dice_clean: list[float] = []
    detector.train()
    iterator = iter(batches)
    bar = tqdm(range(int(steps)), desc="lesion detector", disable=not progress, dynamic_ncols=True)
    for step in bar:
        batch = next(iterator)
        if "roi" not in batch:
            raise ValueError("detector training needs batches with an 'roi' (a lesion-aware source)")
        centre = batch["noisy"].shape[1] // 2
        noisy = batch["noisy"][:, centre:centre + 1].to(device)
        clean = batch["clean"][:, centre:centre + 1].to(device)
        roi = batch["roi"].to(device)
        use_clean = torch.as_tensor(rng.random(noisy.shape[0]) < 0.5, device=device).view(-1, 1, 1, 1)
        x = torch.where(use_clean, clean, noisy)
        target = (roi > 0.5).float()
        logits = detector(x)
        loss = F.binary_cross_entropy_with_logits(logits, target, pos_weight=pos_weight) + dice_loss(logits, target)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        scheduler.step()
        history.append({"step": step + 1, "loss": float(loss.detach())})
        if step >= int(steps) - 50:
            with torch.no_grad():
                for inputs, sink in ((noisy, dice_noisy), (clean, dice_clean)):
                    sink.append(detection_dice(detector(inputs), roi))
        bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
    detector.eval()
    record = {"steps": int(steps), "lr": lr, "features": list(features), "modality": modality.upper(),
              "final_loss": history[-1]["loss"] if history else None,
              "dice_noisy_last50": float(np.mean(dice_noisy)) if dice_noisy else None,
              "dice_clean_last50": float(np.mean(dice_clean)) if dice_clean else None}
    return detector.cpu(), record
