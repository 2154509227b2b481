"""Winograd and FFT convolutions (NNPACK) for float32 inference on CPUs without native bfloat16.

Where the CPU has no native bfloat16 (:mod:`lib.runtime.precision`: no AMX, no AVX512-BF16, e.g. a machine that
offers AVX2 only), the 2D ADL denoiser runs in float32, and oneDNN's direct convolutions are bound by the
multiply-adds (about 290 G per 512 x 512 slice). NNPACK, which PyTorch's CPU wheels include, computes 3 x 3 to
7 x 7 convolutions with Winograd and FFT transforms, i.e. with fewer multiplications: the shipped CT network's pass
took about 45 % less time on such a CPU, its output within a thousandth of a HU of oneDNN's (bench/README.md,
"Measurements behind design choices"). PyTorch uses NNPACK by itself only for batches of 16 or more, so the call is
made here, for inference only (autograd off, float32, no autocast, on a CPU); anything else, and any input NNPACK
declines, goes to the usual convolution. NNPACK reads NCHW tensors, so a network using it keeps its default
(contiguous) memory format rather than channels-last. 1 x 1 convolutions stay with oneDNN (slower in NNPACK).
The cost: NNPACK's transform buffers, about 200-350 MB more peak memory for a 512 x 512 slice. Set
``ADL_NNPACK_CONVOLUTIONS=0`` to keep oneDNN's convolutions everywhere.
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn

from .switches import switched_off

__all__ = ["NNPACKConv2d", "nnpack_available", "use_nnpack_convolutions"]


@functools.lru_cache(maxsize=1)
def nnpack_available() -> bool:
    """True when this PyTorch build has NNPACK, it runs on this CPU (the query also initialises it: NNPACK's calls
    fail before it) and ``ADL_NNPACK_CONVOLUTIONS`` does not switch it off."""
    if switched_off("ADL_NNPACK_CONVOLUTIONS"):
        return False
    try:
        return bool(torch.backends.nnpack.is_available())
    except (AttributeError, RuntimeError):
        return False


class NNPACKConv2d(nn.Conv2d):
    """A plain :class:`torch.nn.Conv2d` (same parameters and state-dict keys) whose inference in float32 on a CPU
    goes through NNPACK's Winograd / FFT convolution; see the module docstring for when it does not."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (not torch.is_grad_enabled() and x.dtype == torch.float32 and self.weight.dtype == torch.float32
                and x.device.type == "cpu" and x.ndim == 4 and not torch.is_autocast_enabled("cpu")):
            try:
                return torch._nnpack_spatial_convolution(x.contiguous(), self.weight.contiguous(), self.bias,
                                                         list(self.padding))
            except RuntimeError:  # an input NNPACK declines (e.g. smaller than the kernel): the usual convolution
                pass
        return super().forward(x)


def _eligible(module: nn.Module) -> bool:
    """A plain 2D convolution NNPACK computes, and faster than oneDNN: square kernel of 3 or more, stride 1, no
    dilation, no groups, zero padding given as numbers."""
    return (type(module) is nn.Conv2d and module.kernel_size[0] == module.kernel_size[1] >= 3
            and module.stride == (1, 1) and module.dilation == (1, 1) and module.groups == 1
            and module.padding_mode == "zeros" and not isinstance(module.padding, str))


def use_nnpack_convolutions(network: nn.Module) -> int:
    """Turn every eligible convolution of ``network`` into an :class:`NNPACKConv2d` in place (its parameters, state
    dict and training behaviour unchanged) where NNPACK is available; returns how many (0 without NNPACK)."""
    if not nnpack_available():
        return 0
    count = 0
    for module in network.modules():
        if _eligible(module):
            module.__class__ = NNPACKConv2d  # the same object and parameters, another forward
            count += 1
    return count
