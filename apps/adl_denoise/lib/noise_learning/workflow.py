"""TDDL step 1 end to end: low-dose CT images -> noise patches -> a trained noise model.

Shared by ``cli.py learn-noise`` and the MONAI Label app's adaptation task (no normal-dose image is needed).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .extraction import NoiseSamples, extract_noise_samples
from .noise_model import NoiseModel
from .training import MIN_TRAINING_SAMPLES, train_noise_model

log = logging.getLogger(__name__)

__all__ = ["learn_noise_model"]


def learn_noise_model(
    inputs: Sequence[str | os.PathLike],
    *,
    patch_size: int = 32,
    steps: int = 2000,
    batch_size: int = 64,
    lr: float = 2e-3,
    max_patches: int = 20000,
    detrend: str = "quadratic",
    force_ct: bool = False,
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: bool = True,
    report: Callable[[str], None] = log.info,
    info: dict | None = None,
) -> NoiseModel:
    """Learn the noise of low-dose CT images (files or DICOM series folders, in HU).

    Args:
        inputs: the low-dose images.
        patch_size: noise patch size in pixels (multiple of 8, >= 16).
        steps, batch_size, lr: VAE training (see :func:`train_noise_model`).
        max_patches: random subset of at most this many patches.
        detrend: trend removed from each patch (``quadratic`` for FBP noise).
        force_ct: treat non-DICOM inputs as CT in HU without checking their modality.
        device: compute device of the VAE.
        seed: seed of the patch subset and the training.
        progress: tqdm progress bar.
        report: receives one line per input and one before training (print for a CLI).
        info: stored in the model's metadata.

    Raises:
        ValueError: an input is not CT, constant, smaller than a patch, or too few smooth patches were found.
    """
    from ..imaging import read_volume

    if patch_size % 8 or patch_size < 16:
        raise ValueError(f"patch size must be a multiple of 8 and >= 16, got {patch_size}")
    per_file = []
    for path in map(Path, inputs):
        volume = read_volume(path, modality="CT" if force_ct else None)
        if volume.modality != "CT":
            guessed = volume.metadata.get("modality_source") == "guessed"
            how = " (guessed from its values; say it is CT if it is a CT in HU)" if guessed else ""
            raise ValueError(f"{path} is {volume.modality}, not CT: the noise model learns CT noise in HU{how}")
        if volume.is_constant:
            raise ValueError(f"{path} holds a constant image: no noise to learn from")
        height, width = volume.array.shape[-2:]
        if min(height, width) < patch_size:
            raise ValueError(f"{path}: slices of {height} x {width} pixels are smaller than the {patch_size}-pixel "
                             "noise patches")
        pixel = (float(volume.spacing[1]), float(volume.spacing[0]))  # (row, column) = (y, x) mm
        samples = extract_noise_samples(volume.array, patch_size, max_patches=max_patches, seed=seed,
                                        pixel_size_mm=pixel, source_name=str(path), detrend=detrend)
        st = samples.stats
        report(f"{path.name}: {len(samples)} noise patches ({st['accepted']} smooth of {st['candidates']} "
               f"candidates), noise std {samples.noise_std_hu:.1f} HU")
        per_file.append(samples)
    if not per_file:
        raise ValueError("no low-dose images given")
    samples = NoiseSamples.concatenate(per_file)
    sizes = [s.pixel_size_mm for s in per_file if s.pixel_size_mm is not None and len(s)]
    if sizes and max(p[0] for p in sizes) > 1.1 * min(p[0] for p in sizes):
        log.warning("the inputs have different pixel sizes (%s mm): noise texture is learnt in pixels; prefer one "
                    "reconstruction protocol per noise model", ", ".join(f"{p[0]:.3f}" for p in sizes))
    if len(samples) > max_patches:
        rng = np.random.default_rng(seed)
        samples = samples.subset(np.sort(rng.choice(len(samples), max_patches, replace=False)))
    if len(samples) < MIN_TRAINING_SAMPLES:
        raise ValueError(f"only {len(samples)} smooth noise patches of {patch_size} x {patch_size} found (need >= "
                         f"{MIN_TRAINING_SAMPLES}): give more or larger low-dose images, or smaller patches")
    report(f"learning the noise from {len(samples)} patches ({100 * samples.air_fraction:.0f} % in air), "
           f"{steps} steps on {device}")
    return train_noise_model(samples, steps=steps, batch_size=batch_size, lr=lr, seed=seed, progress=progress,
                             device=device, info=info)
