"""Layer classes by spatial dims and layers by name, as MONAI's layer factories make them.

The networks' common layers (convolutions, max pooling, ``"batch"`` / ``"instance"`` normalisation, ``"relu"`` /
``"leakyrelu"`` / ``"prelu"``) are taken from ``torch.nn`` directly, identical to what
``monai.networks.layers.factories`` and ``get_norm_layer`` / ``get_act_layer`` return for them; any other name (or a
``(name, args)`` tuple) goes to MONAI's factories. Why not MONAI always: importing any part of the ``monai`` package
imports all of it, seconds per command on a small CPU (``bench/README.md``, "Measurements behind design choices"),
and ``cli.py denoise`` needs nothing else of it for a 2D network on slices of up to 512 x 512 pixels.
"""
from __future__ import annotations

import torch.nn as nn

__all__ = ["act_layer", "conv_transpose_type", "conv_type", "max_pool_type", "norm_layer"]

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONV_TRANSPOSE = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_MAX_POOL = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}
_NORMS = {"batch": {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d},
          "instance": {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}}
_ACTS = {"relu": nn.ReLU, "leakyrelu": nn.LeakyReLU, "prelu": nn.PReLU}


def _by_dims(table: dict[int, type[nn.Module]], spatial_dims: int) -> type[nn.Module]:
    if spatial_dims not in table:
        raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims}")
    return table[spatial_dims]


def conv_type(spatial_dims: int) -> type[nn.Module]:
    """``nn.Conv1d`` / ``Conv2d`` / ``Conv3d`` (MONAI's ``Conv[Conv.CONV, spatial_dims]``)."""
    return _by_dims(_CONV, spatial_dims)


def conv_transpose_type(spatial_dims: int) -> type[nn.Module]:
    """``nn.ConvTranspose{1,2,3}d`` (MONAI's ``Conv[Conv.CONVTRANS, spatial_dims]``)."""
    return _by_dims(_CONV_TRANSPOSE, spatial_dims)


def max_pool_type(spatial_dims: int) -> type[nn.Module]:
    """``nn.MaxPool{1,2,3}d`` (MONAI's ``Pool[Pool.MAX, spatial_dims]``)."""
    return _by_dims(_MAX_POOL, spatial_dims)


def norm_layer(name: str | tuple, spatial_dims: int, channels: int) -> nn.Module:
    """A normalisation layer over ``channels`` features, as ``monai.networks.layers.get_norm_layer`` makes it."""
    if isinstance(name, str) and name.lower() in _NORMS:
        return _by_dims(_NORMS[name.lower()], spatial_dims)(num_features=channels)
    from monai.networks.layers.utils import get_norm_layer

    return get_norm_layer(name, spatial_dims=spatial_dims, channels=channels)


def act_layer(name: str | tuple) -> nn.Module:
    """An activation layer, as ``monai.networks.layers.get_act_layer`` makes it."""
    if isinstance(name, str) and name.lower() in _ACTS:
        return _ACTS[name.lower()]()
    from monai.networks.layers.utils import get_act_layer

    return get_act_layer(name)
