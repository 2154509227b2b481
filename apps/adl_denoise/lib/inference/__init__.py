"""Inference with trained learned denoisers (ADL): weight loading and whole-image sliding-window denoising."""
from .denoise import (
    DEFAULT_ROI_2D,
    ORTHOGONAL_MAX_ANISOTROPY,
    ORTHOGONAL_MIN_VOXELS,
    DEFAULT_ROI_3D,
    WEIGHTS_FORMAT,
    MODEL_DIR,
    LoadedDenoiser,
    candidate_weights,
    denoise_array,
    find_weights,
    load_denoiser,
    resolve_device,
    uses_orthogonal_planes,
)

__all__ = [
    "DEFAULT_ROI_2D",
    "ORTHOGONAL_MAX_ANISOTROPY",
    "ORTHOGONAL_MIN_VOXELS",
    "DEFAULT_ROI_3D",
    "WEIGHTS_FORMAT",
    "MODEL_DIR",
    "LoadedDenoiser",
    "candidate_weights",
    "denoise_array",
    "find_weights",
    "load_denoiser",
    "resolve_device",
    "uses_orthogonal_planes",
]
