"""Training of the TDDL noise model on noise samples extracted from low-dose images.

:func:`train_noise_model` fits a :class:`~lib.noise_learning.vae.ConditionalNoiseVAE` with Adam (cosine decay to
10 % of the learning rate) on the negative ELBO (+ spectral matching), then measures how well its samples
reproduce the training noise (std by condition band, NPS mean frequency) and returns a
:class:`~lib.noise_learning.noise_model.NoiseModel` with those statistics.

Details: the patches are divided by their pooled RMS (``noise_scale_hu``) so the network sees unit-variance noise;
the base log spectrum of the decoder starts at the mean power spectrum of the data (so the sampled noise has the
right level and texture from the first step, and training refines its dependence on the condition and the
latent); the condition range is the 0.5-99.5 % range of the sample conditions. All randomness (initialisation,
batches, reparameterisation) comes from ``seed`` through a forked RNG: the global torch RNG is left untouched and
a run is reproducible on a given device.
"""
from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch

from .extraction import AIR_HU, NoiseSamples
from .noise_model import MIN_AIR_SAMPLES, NoiseModel, torch_generator
from .vae import ConditionalNoiseVAE, VAEConfig
from .validation import NOISE_BANDS, patch_statistics

__all__ = ["train_noise_model", "air_policy_for", "MIN_TRAINING_SAMPLES"]

#: Fewer accepted noise patches than this cannot train a model.
MIN_TRAINING_SAMPLES = 32


def air_policy_for(samples: NoiseSamples) -> str:
    """``"learned"`` (enough noisy air samples), ``"none"`` (the air was mostly clipped or constant) or
    ``"nearest"`` (no air seen); see :mod:`lib.noise_learning.noise_model`."""
    n_air = int(np.count_nonzero(samples.condition_hu < AIR_HU))
    if n_air >= MIN_AIR_SAMPLES:
        return "learned"
    candidates = int(samples.stats.get("air_candidates", 0))
    rejected = int(samples.stats.get("air_rejected_clipped_or_constant", 0))
    if candidates > 0 and rejected >= 0.5 * candidates:
        return "none"
    return "nearest"


def _sampling_weights(condition_hu: np.ndarray, balance: bool) -> np.ndarray:
    """Per-sample draw probabilities (float64, sum 1): uniform, or band-balanced: each HU band's total weight
    proportional to the square root of its number of samples (a band of 10 000 air patches no longer drowns one of
    100 soft-tissue patches, and a band of 7 doubtful patches does not get a full share either)."""
    n = condition_hu.shape[0]
    if not balance:
        return np.full(n, 1.0 / n)
    group = np.full(n, -1, dtype=np.int64)
    for k, (lo, hi) in enumerate(NOISE_BANDS):
        group[(condition_hu >= lo) & (condition_hu < hi)] = k
    _, inverse, counts = np.unique(group, return_inverse=True, return_counts=True)
    w = 1.0 / np.sqrt(counts[inverse])
    return w / w.sum()


def _fit_statistics(model: NoiseModel, samples: NoiseSamples, train_stats: dict, seed: int,
                    max_samples: int = 4000) -> dict:
    """Samples of the model at (a subset of) the training conditions against the training statistics."""
    rng = np.random.default_rng(seed)
    idx = np.arange(len(samples)) if len(samples) <= max_samples else rng.choice(len(samples), max_samples, False)
    cond = samples.condition_hu[idx]
    gen = model.sample_patches(cond, seed=seed + 17)
    gen_stats = patch_statistics(gen, cond, samples.pixel_size_mm)
    real_stats = patch_statistics(samples.patches[idx], cond, samples.pixel_size_mm)
    by_band = {}
    for label, entry in real_stats["std_by_band"].items():
        g = gen_stats["std_by_band"][label]["std_hu"]
        r = entry["std_hu"]
        by_band[label] = {"training_std_hu": r, "sampled_std_hu": g,
                          "relative_error": float(g / r - 1) if np.isfinite(g) and np.isfinite(r) and r > 0 else
                          float("nan")}
    f_gen, f_real = gen_stats["nps"]["mean_frequency"], real_stats["nps"]["mean_frequency"]
    return {
        "n_patches": int(len(idx)),
        "std_relative_error": float(gen_stats["noise_std_hu"] / real_stats["noise_std_hu"] - 1.0),
        "mean_frequency_relative_error": float(f_gen / f_real - 1.0),
        "sampled_std_hu": gen_stats["noise_std_hu"],
        "sampled_nps": gen_stats["nps"],
        "std_by_band": by_band,
        "sampled_std_curve": gen_stats["std_curve"],
    }


def train_noise_model(
    samples: NoiseSamples,
    steps: int = 2000,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    progress: bool = True,
    device: str | torch.device = "cpu",
    *,
    latent_channels: int = 4,
    width: int = 32,
    beta: float = 1.0,
    spectral_weight: float = 0.1,
    log_every: int = 50,
    balance_bands: bool = True,
    info: dict | None = None,
) -> NoiseModel:
    """Train a conditional noise VAE on extracted noise samples.

    Args:
        samples: noise patches (N, P, P) HU with conditions (:func:`lib.noise_learning.extract_noise_samples`).
        steps: optimiser steps.
        batch_size: patches per step.
        lr: Adam learning rate (cosine decay to 10 %).
        seed: seed of everything random in the run.
        progress: tqdm progress bar.
        device: "cpu", "cuda", "cuda:1" ...
        latent_channels: latent channels (latent is latent_channels x P/8 x P/8).
        width: channels of the first convolution.
        beta: weight of the KL term.
        spectral_weight: weight of the spectral-matching term (see :meth:`ConditionalNoiseVAE.loss`).
        log_every: steps between loss records in ``info["history"]``.
        balance_bands: draw batches so that each HU band of the condition
            (:data:`~lib.noise_learning.validation.NOISE_BANDS`) has a total probability proportional to the square
            root of its sample count, so that e.g. the air around the patient, often most of the uniform patches,
            does not crowd out soft tissue; False draws patches uniformly.
        info: extra provenance stored in the model (e.g. the input files).

    Returns:
        The trained :class:`NoiseModel` (eval mode, on ``device``) with training statistics and the fit of its
        samples (``training_stats["fit"]``).

    Raises:
        ValueError: fewer than :data:`MIN_TRAINING_SAMPLES` samples, or bad arguments.
    """
    if len(samples) < MIN_TRAINING_SAMPLES:
        raise ValueError(f"only {len(samples)} noise patches: at least {MIN_TRAINING_SAMPLES} are needed to learn "
                         "a noise model (give more or larger low-dose images)")
    if int(steps) < 1 or int(batch_size) < 2 or not float(lr) > 0:
        raise ValueError(f"need steps >= 1, batch_size >= 2 and lr > 0; got {steps}, {batch_size}, {lr}")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda was asked for but CUDA is not available")
    start_time = time.perf_counter()
    cond_np = samples.condition_hu.astype(np.float32)
    lo, hi = (float(v) for v in np.quantile(cond_np, [0.005, 0.995]))
    if hi - lo < 1.0:
        lo, hi = lo - 0.5, hi + 0.5
    config = VAEConfig(patch_size=samples.patch_size, latent_channels=int(latent_channels), width=int(width),
                       condition_range_hu=(lo, hi))
    scale = float(np.sqrt(np.mean(samples.patches.astype(np.float64) ** 2)))
    if not scale > 0:
        raise ValueError("the noise samples are all zero")

    fork_devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    history: list[dict[str, Any]] = []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(int(seed))
        vae = ConditionalNoiseVAE(config)
        vae.noise_scale_hu.fill_(scale)
        vae.to(device)
        data = torch.from_numpy(samples.patches / np.float32(scale)).to(device)
        cond = torch.from_numpy(cond_np).to(device)
        vae.init_spectrum(data)
        vae.train()
        optimiser = torch.optim.Adam(vae.parameters(), lr=float(lr))
        total_steps = int(steps)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimiser, lambda s: 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(s, total_steps) / total_steps)))
        gen = torch_generator(int(seed) + 1)
        weights = torch.from_numpy(_sampling_weights(cond_np, balance_bands))
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=total_steps, desc="noise model", unit="step", dynamic_ncols=True)
        try:
            running: dict[str, float] = {}
            for step in range(total_steps):
                idx = torch.multinomial(weights, int(batch_size), replacement=True, generator=gen).to(device)
                out = vae.loss(data[idx], cond[idx], beta=beta, spectral_weight=spectral_weight, generator=gen)
                optimiser.zero_grad(set_to_none=True)
                out.total.backward()
                torch.nn.utils.clip_grad_norm_(vae.parameters(), 10.0)
                optimiser.step()
                schedule.step()
                for key in ("total", "nll", "kl", "spectral"):
                    running[key] = running.get(key, 0.0) + float(getattr(out, key).detach())
                if (step + 1) % int(log_every) == 0 or step + 1 == total_steps:
                    n = (step % int(log_every)) + 1
                    record = {"step": step + 1, **{k: v / n for k, v in running.items()}}
                    history.append(record)
                    running = {}
                    if bar is not None:
                        bar.set_postfix(nll=f"{record['nll']:.3f}", kl=f"{record['kl']:.3f}")
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
    vae.eval()
    train_stats = patch_statistics(samples.patches, samples.condition_hu, samples.pixel_size_mm)
    model = NoiseModel(
        vae, samples.pixel_size_mm, air_policy_for(samples),
        list(samples.stats.get("clip_values_hu", [])), train_stats,
        {"steps": total_steps, "batch_size": int(batch_size), "lr": float(lr), "seed": int(seed), "beta": float(beta),
         "spectral_weight": float(spectral_weight), "balance_bands": bool(balance_bands), "n_samples": len(samples),
         "sources": list(samples.sources),
         "extraction": dict(samples.stats), "history": history, **(info or {})},
    )
    model.training_stats["fit"] = _fit_statistics(model, samples, train_stats, int(seed))
    model.info["training_seconds"] = round(time.perf_counter() - start_time, 2)
    return model
