"""Losses of ADL (Adversarial Distortion Learning, Ghahremani et al., arXiv 2204.14100).

`pyramid`: pyramidal textural loss (L1 over a trous wavelet bands, all levels); `histogram`:
differentiable histogram loss with log-cosh distance; `adversarial`: hinge-GAN losses with G(y) as the
fake sample; `adl`: the total denoiser loss over the three deep-supervision outputs; `lesion`: lesion-aware
terms inside lesion regions (ROI L1 and LIDnet's detector-feature ROI perceptual loss).
"""
from .adl import ADLDenoiserLoss
from .adversarial import (
    adversarial_generator_loss,
    discriminator_hinge_loss,
    discriminator_loss,
    generator_adversarial_loss,
)
from .histogram import HistogramLoss, log_cosh, soft_histogram
from .lesion import ROIPerceptualLoss, roi_l1_loss
from .pyramid import PyramidalTexturalLoss, atrous_wavelet_decomposition

__all__ = [
    "ADLDenoiserLoss",
    "HistogramLoss",
    "PyramidalTexturalLoss",
    "ROIPerceptualLoss",
    "adversarial_generator_loss",
    "atrous_wavelet_decomposition",
    "discriminator_hinge_loss",
    "discriminator_loss",
    "generator_adversarial_loss",
    "log_cosh",
    "roi_l1_loss",
    "soft_histogram",
]
