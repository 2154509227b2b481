"""Lesion-aware losses: extra fidelity and a detector's perceptual judgement inside lesion regions.

A denoiser trained only on whole-image losses treats a small low-contrast lesion as a few pixels of noise: it
costs little to flatten. These terms put weight where the lesions are (``roi``: the lesion profiles of
:func:`lib.lesions.lesion_mask`, or the regions a clinician marked "keep"):

* :func:`roi_l1_loss`: L1 between output and clean target inside the ROI, normalised by the ROI's size, so a
  6 mm lesion weighs as much as a whole patch would.
* :class:`ROIPerceptualLoss`: LIDnet's region-of-interest perceptual loss (Chen et al., ACM MM 2021): the
  distance between a frozen lesion detector's encoder features of the output and of the clean target, inside
  the ROI (resized to each feature map), each layer normalised by the target features' magnitude.

Shapes: ``output``, ``target`` and ``roi`` are (B, 1, H, W) (or (B, 1, D, H, W) for :func:`roi_l1_loss`), images
in [0, 1], ``roi`` in [0, 1]. A batch without any ROI gives 0.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["roi_l1_loss", "ROIPerceptualLoss"]

_EPS = 1e-6


def roi_l1_loss(output: torch.Tensor, target: torch.Tensor, roi: torch.Tensor) -> torch.Tensor:
    """ROI-weighted mean absolute error: sum(roi |output - target|) / sum(roi); 0 when the ROI is empty."""
    if output.shape != target.shape or roi.shape != output.shape:
        raise ValueError(f"roi_l1_loss: shapes differ: {tuple(output.shape)}, {tuple(target.shape)}, {tuple(roi.shape)}")
    weight = roi.float()
    total = weight.sum()
    if float(total) <= _EPS:
        return output.sum() * 0.0  # keeps the graph, adds nothing
    return (weight * (output.float() - target.float()).abs()).sum() / total


class ROIPerceptualLoss(nn.Module):
    """Detector-feature distance inside the ROI, averaged over the detector's encoder layers.

    Args:
        detector: a :class:`lib.networks.LesionDetector` (its ``encoder_features`` are used); its parameters
            get no gradient from this loss (frozen, or updated by its own optimiser in the collaborative schedule).

    ``forward(output, target, roi)`` -> scalar. The target's features are computed without a gradient.
    """

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, output: torch.Tensor, target: torch.Tensor, roi: torch.Tensor) -> torch.Tensor:
        if output.shape != target.shape or roi.shape != output.shape or output.ndim != 4:
            raise ValueError(f"ROIPerceptualLoss expects equal (B, 1, H, W) shapes, got {tuple(output.shape)}, "
                             f"{tuple(target.shape)}, {tuple(roi.shape)}")
        if float(roi.sum()) <= _EPS:
            return output.sum() * 0.0
        params = list(self.detector.parameters())
        flags = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(False)
        try:
            with torch.no_grad():
                target_features = self.detector.encoder_features(target.float())
            output_features = self.detector.encoder_features(output.float())
        finally:
            for p, flag in zip(params, flags):
                p.requires_grad_(flag)
        terms = []
        for fo, ft in zip(output_features, target_features):
            weight = F.adaptive_avg_pool2d(roi.float(), fo.shape[-2:]) if fo.shape[-2:] != roi.shape[-2:] else roi.float()
            total = weight.sum() * fo.shape[1]
            if float(total) <= _EPS:
                continue
            scale = (ft.abs() * weight).sum() / total + _EPS
            terms.append(((fo - ft).abs() * weight).sum() / total / scale)
        if not terms:
            return output.sum() * 0.0
        return torch.stack(terms).mean()
