"""Shared input checks and seeding for the noise modules (internal)."""
from __future__ import annotations

import math

import numpy as np

SeedLike = int | np.random.Generator | np.random.SeedSequence | None


def as_rng(seed: SeedLike) -> np.random.Generator:
    """A numpy Generator from an int / SeedSequence / Generator (used as is) / None (fresh entropy)."""
    if isinstance(seed, np.random.Generator):
        return seed
    return np.random.default_rng(seed)


def check_image(image: np.ndarray, name: str = "image", *, non_negative: bool = False) -> np.ndarray:
    """Finite real numeric array as float32 (a copy is not guaranteed); raises ValueError otherwise."""
    arr = np.asarray(image)
    if arr.ndim == 0 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty array, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise ValueError(f"{name} must be real and numeric, got dtype {arr.dtype}")
    arr = arr.astype(np.float32, copy=False)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    if non_negative and arr.min() < 0:
        raise ValueError(f"{name} must be >= 0 (minimum is {float(arr.min())})")
    return arr


def check_non_negative(value: float, name: str, *, strict: bool = False) -> float:
    """A finite float >= 0 (or > 0 when strict); raises ValueError otherwise."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or v < 0 or (strict and v == 0):
        raise ValueError(f"{name} must be finite and {'>' if strict else '>='} 0, got {value!r}")
    return v
