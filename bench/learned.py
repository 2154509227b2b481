"""Learned denoisers for the benchmark, run in-process like the baselines (so time per slice compares like
for like: no interpreter start-up or file I/O in the figure; use ``--cli`` for the whole command's cost).

Each is a module-level callable ``denoise(noisy (Z, H, W) float32, spacing, modality) -> array`` that loads
the app's weights for the pair's modality (published ``model/<name>_<m>.pt`` if present, else the shipped
``model/pretrained_<name>_<m>.pt``) and denoises on the CPU (or the GPU when ``BENCH_DEVICE=cuda``).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

_APP_DIR = str(Path(__file__).resolve().parents[1] / "apps" / "adl_denoise")
if _APP_DIR not in sys.path:
    sys.path.insert(0, _APP_DIR)


def adl(noisy: np.ndarray, spacing=None, modality: str = "CT") -> np.ndarray:
    """ADL (2D Efficient-UNet) with the app's weights for ``modality``, slice-wise, whole-slice window."""
    from lib.inference import candidate_weights, denoise_array, find_weights, load_denoiser

    path = find_weights("adl", modality)
    if path is None:
        raise FileNotFoundError(f"no ADL weights for {modality}: expected one of {candidate_weights('adl', modality)}")
    device = os.environ.get("BENCH_DEVICE", "cpu")
    model = load_denoiser(path, device=device)
    return denoise_array(model, np.asarray(noisy, np.float32), modality=modality, device=device)


LEARNED = {"adl": adl}
