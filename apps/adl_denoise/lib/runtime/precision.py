"""Mixed precision per device: fp16 on CUDA, bfloat16 on CPUs that compute it natively, float32 elsewhere.

On a CPU with native bfloat16 (Intel AMX or AVX512-BF16: oneDNN runs the convolutions on those units), the 2D ADL
denoiser runs two to four times faster than in float32 (bench/README.md, "Measurements behind design choices").
Without native support bfloat16 is emulated and slower than float32, so it is never chosen there; there the 2D ADL
network's float32 convolutions go through NNPACK instead (:mod:`lib.runtime.cpu_convolution`).

What stays float32 under autocast, because bfloat16 keeps only 8 mantissa bits (a CT value of 0.25 on the
[-1024, 3072] HU scale to 1/512 of itself, 8 HU): the convolutions that read the image
(:class:`lib.networks.blocks._ImageInputConv2d`: without them the network saw the image rounded to 8 HU and
its output moved by more than a HU on average from float32), the residual heads'
``logit`` of the input and the final ``sigmoid`` (the correction a head adds is small, so its bfloat16
rounding is a fraction of a HU), and the losses (computed on ``.float()`` outputs). With those, a CT slice
denoised in bfloat16 stays within a fraction of a HU of float32 (tests/test_shipped_weights.py checks it).
"""
from __future__ import annotations

import contextlib
import functools

import torch

__all__ = ["autocast_dtype", "autocast_for", "cpu_has_native_bf16"]


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True when oneDNN reports native bfloat16 on this CPU (AMX or AVX512-BF16)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # older or stripped builds without the query
        return False


def autocast_dtype(device: torch.device | str, enabled: bool = True) -> torch.dtype | None:
    """The autocast dtype for ``device``: float16 on CUDA, bfloat16 on a CPU with native bfloat16, else None
    (float32). ``enabled=False`` always gives None."""
    if not enabled:
        return None
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.float16
    if kind == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return None


def autocast_for(device: torch.device | str, enabled: bool = True) -> contextlib.AbstractContextManager:
    """``torch.autocast`` with :func:`autocast_dtype` (a no-op context where that is None)."""
    dtype = autocast_dtype(device, enabled)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)
