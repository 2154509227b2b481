"""Classical baseline denoisers for the benchmark: the app's own implementations
(``lib.denoisers.classical``, documented there) plus ``noisy``, the identity ("do nothing") row.

Every denoiser is a module-level callable (so that it can be pickled into a spawned worker process)::

    denoise(noisy: np.ndarray (Z, H, W) float32, spacing: (x, y, z) mm, modality: "CT" | "MR") -> np.ndarray
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from lib.denoisers.classical import bm3d_denoise, bm4d_denoise, gaussian_denoise, nlm_denoise

Denoiser = Callable[[np.ndarray, Sequence[float], str], np.ndarray]


def _check(noisy: np.ndarray) -> np.ndarray:
    arr = np.asarray(noisy, dtype=np.float32)
    if arr.ndim != 3:
        raise ValueError(f"baselines take a (Z, H, W) volume, got shape {arr.shape}")
    return arr


def noisy(noisy: np.ndarray, spacing=None, modality: str = "CT") -> np.ndarray:
    """Identity: returns (a copy of) the noisy input."""
    return _check(noisy).copy()


def gaussian(noisy: np.ndarray, spacing=None, modality: str = "CT") -> np.ndarray:
    return gaussian_denoise(_check(noisy), modality)


def nlm(noisy: np.ndarray, spacing=None, modality: str = "CT") -> np.ndarray:
    return nlm_denoise(_check(noisy), modality)


def bm3d(noisy: np.ndarray, spacing=None, modality: str = "CT") -> np.ndarray:
    return bm3d_denoise(_check(noisy), modality)


def bm4d(noisy: np.ndarray, spacing=None, modality: str = "MR") -> np.ndarray:
    return bm4d_denoise(_check(noisy), modality)


BASELINES: dict[str, Denoiser] = {"noisy": noisy, "gaussian": gaussian, "nlm": nlm, "bm3d": bm3d, "bm4d": bm4d}


def get_baseline(name: str) -> Denoiser:
    try:
        return BASELINES[name]
    except KeyError:
        raise ValueError(f"unknown baseline {name!r}; choose from {sorted(BASELINES)}") from None
