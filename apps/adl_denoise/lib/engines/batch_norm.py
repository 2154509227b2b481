"""Batch-norm recalibration: exact population statistics for a trained network's batch-norm layers.

During training each batch-norm layer keeps an exponential moving average of its batch statistics (momentum 0.1:
about the last 10 batches). The weights move under it at every step, so at the end of a run those averages describe
a mix of the last few networks and of the last few batches, and at eval time the network normalises with statistics
that are not its own. With batches of a few small patches the mismatch is large enough to make the validation PSNR
jump from one validation to the next (bench/README.md). Recomputing the statistics of the final weights over many
training batches ("precise BN") removes that noise at the cost of forward passes only.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, ContextManager, Iterable

import torch
from torch import nn

__all__ = ["batch_norm_layers", "recalibrate_batch_norm"]


def batch_norm_layers(network: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The batch-norm layers of ``network`` that track running statistics (BatchNorm1d/2d/3d, SyncBatchNorm)."""
    return [m for m in network.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def recalibrate_batch_norm(
    network: nn.Module,
    batches: Iterable[torch.Tensor],
    autocast: Callable[[], ContextManager] | None = None,
) -> int:
    """Replace every batch-norm layer's running mean and variance by the plain average of its batch statistics over
    ``batches`` (each an input tensor for ``network``, e.g. (B, C, H, W) noisy patches on the network's device).

    The weights are not touched (no gradients); the network is left in the train / eval mode it was in. A network
    without batch norm is returned unchanged. Returns the number of batches used (0 leaves the statistics as they
    were).
    """
    layers = batch_norm_layers(network)
    if not layers:
        return 0
    saved = [(m, m.momentum, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
             for m in layers]
    was_training = network.training
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: the equal-weight mean over all batches seen
    count = 0
    network.train()
    try:
        with torch.no_grad():
            for x in batches:
                with (autocast() if autocast is not None else nullcontext()):
                    network(x)
                count += 1
    finally:
        network.train(was_training)
        for m, momentum, mean, var, tracked in saved:
            m.momentum = momentum
            if count == 0:  # nothing seen (or an error before the first batch): keep the old statistics
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(tracked)
    return count
