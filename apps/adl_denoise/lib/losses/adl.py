"""ADL's total denoiser loss over the three deep-supervision outputs.

    L = sum_k w_k [ l_1 L1(G_k, x_k) + l_p L_pyr(G_k, x_k) + l_H L_hist(G_k, x_k) ] + l_adv L_adv

G_k is the denoiser's output at scale 1/2**k (k = 0, 1, 2), x_k the clean target area-averaged to that
scale, w_k the scale weights, and L_adv the hinge-GAN generator term on the full-resolution output.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .adversarial import adversarial_generator_loss
from .histogram import HistogramLoss
from .pyramid import PyramidalTexturalLoss

__all__ = ["ADLDenoiserLoss"]


class ADLDenoiserLoss(nn.Module):
    """Weighted L1 + pyramidal textural + histogram loss at every output scale, plus the adversarial term.

    Args:
        lambda_l1: weight of the L1 fidelity term (1 in the paper's code).
        lambda_pyramid: weight of :class:`PyramidalTexturalLoss` (1 in the paper's code).
        lambda_histogram: weight of :class:`HistogramLoss` (1 in the paper's code).
        lambda_adversarial: weight of the generator's hinge term -mean D(G(y)). Default 0.01, not the
            code's 1 (which never mattered there: its adversarial term did not reach G). The hinge term is
            unbounded and its gradient does not shrink as G improves, while the fidelity terms are
            O(0.01 - 0.1) for a good denoiser; at weight 1 D's opinion would outweigh fidelity and G would
            trade PSNR for "realistic" texture, i.e. hallucination - unacceptable in medical images.
            0.01 relative to a unit-weight L1 is the usual balance of image-to-image GANs (pix2pix uses
            L1 weight 100 against GAN weight 1), enough to sharpen texture without steering content.
        scale_weights: weights w_k of the outputs at full, 1/2 and 1/4 resolution (code: all 1).
        pyramid_levels: band-pass levels J of the pyramidal loss (3).
        histogram_bins: bins of the histogram loss (64).
        value_range: intensity range of the images, for the histogram bins ((0, 1)).
        histogram_max_voxels: voxel budget per sample for the soft histogram (see :class:`HistogramLoss`).

    ``forward(outputs, target, adversarial=None, discriminator=None, noisy=None)``:

    - ``outputs``: the denoiser's training output, a list ``[full, half, quarter]`` of (B, C, *spatial_k),
      or one full-resolution tensor (then only w_0 applies).
    - ``target``: clean image (B, C, *spatial) in ``value_range``, the size of ``outputs[0]``; resized
      to each output's size by area averaging (the same operation as the image pyramid of the output).
    - the adversarial term, in one of two ways: ``adversarial``, a scalar the trainer computed itself
      (e.g. with :func:`lib.losses.generator_adversarial_loss`), or ``discriminator`` (with ``noisy``
      for a conditional D), then the term is computed here from D(outputs[0], noisy). With neither
      (denoiser warm-up phase, or no GAN) the term is 0. Terms with weight 0 are not computed.

    Returns:
        ``(total, terms)``: ``total`` the scalar tensor to back-propagate; ``terms`` a dict of floats for
        logging: ``"l1"``, ``"pyramid"``, ``"histogram"`` (each summed over scales with the scale weights,
        before its lambda), ``"adversarial"`` (before its lambda) and ``"total"``.
    """

    def __init__(
        self,
        lambda_l1: float = 1.0,
        lambda_pyramid: float = 1.0,
        lambda_histogram: float = 1.0,
        lambda_adversarial: float = 0.01,
        scale_weights: Sequence[float] = (1.0, 1.0, 1.0),
        pyramid_levels: int = 3,
        histogram_bins: int = 64,
        value_range: tuple[float, float] = (0.0, 1.0),
        histogram_max_voxels: int | None = 65536,
    ) -> None:
        super().__init__()
        self.lambda_l1 = float(lambda_l1)
        self.lambda_pyramid = float(lambda_pyramid)
        self.lambda_histogram = float(lambda_histogram)
        self.lambda_adversarial = float(lambda_adversarial)
        self.scale_weights = tuple(float(w) for w in scale_weights)
        self.pyramid = PyramidalTexturalLoss(levels=pyramid_levels, spatial_dims=None)
        self.histogram = HistogramLoss(bins=histogram_bins, value_range=value_range, max_voxels=histogram_max_voxels)

    def forward(
        self,
        outputs: torch.Tensor | Sequence[torch.Tensor],
        target: torch.Tensor,
        adversarial: torch.Tensor | None = None,
        discriminator: nn.Module | None = None,
        noisy: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        outputs = [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)
        if len(outputs) > len(self.scale_weights):
            raise ValueError(f"{len(outputs)} outputs but only {len(self.scale_weights)} scale weights")
        if outputs[0].shape != target.shape:
            raise ValueError(f"full-resolution output {tuple(outputs[0].shape)} differs from target {tuple(target.shape)}")
        if adversarial is not None and discriminator is not None:
            raise ValueError("pass either a precomputed `adversarial` term or a `discriminator`, not both")

        zero = target.new_zeros(())
        l1, pyramid, histogram = zero, zero, zero
        for weight, output in zip(self.scale_weights, outputs):
            if weight == 0:
                continue
            # area averaging = the low-pass + decimation that relates a coarse output to the full image
            scaled = target if output.shape == target.shape else F.interpolate(target, size=output.shape[2:], mode="area")
            if self.lambda_l1:
                l1 = l1 + weight * F.l1_loss(output, scaled)
            if self.lambda_pyramid:
                pyramid = pyramid + weight * self.pyramid(output, scaled)
            if self.lambda_histogram:
                histogram = histogram + weight * self.histogram(output, scaled)

        if discriminator is not None and self.lambda_adversarial:
            adversarial = adversarial_generator_loss(discriminator, outputs[0], noisy)
        if adversarial is None:
            adversarial = zero

        total = (
            self.lambda_l1 * l1
            + self.lambda_pyramid * pyramid
            + self.lambda_histogram * histogram
            + self.lambda_adversarial * adversarial
        )
        terms = {
            "l1": float(l1.detach()),
            "pyramid": float(pyramid.detach()),
            "histogram": float(histogram.detach()),
            "adversarial": float(adversarial.detach()),
            "total": float(total.detach()),
        }
        return total, terms
