"""The lesion-aware terms of a denoiser's training step (LIDnet-style), shared by the ADL and GCN engines.

``loss = roi_l1_weight * roi_l1(output, clean, roi) + roi_perceptual_weight * ROIPerceptual(output, clean, roi)``,
added to the denoiser's own losses. The detector is loaded from its weight file (:mod:`lib.lesions.detector`)
and frozen, or, with ``collaborative_every = k > 0``, updated every k-th step on the denoiser's current outputs
(detached) to segment the ROI: LIDnet's collaborative schedule, where the detector learns to find lesions in
denoised images while the denoiser learns to keep what the detector needs.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..losses.lesion import ROIPerceptualLoss, roi_l1_loss

__all__ = ["LesionAwareTerms", "check_lesion_aware"]


def check_lesion_aware(config: Any) -> None:
    """Validate a training config's lesion-aware fields (ValueError with the reason)."""
    for name in ("roi_l1_weight", "roi_perceptual_weight"):
        value = float(getattr(config, name))
        if not value >= 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if int(config.collaborative_every) < 0:
        raise ValueError(f"collaborative_every must be >= 0, got {config.collaborative_every}")
    if float(config.roi_perceptual_weight) > 0 and not config.lesion_detector:
        raise ValueError("roi_perceptual_weight > 0 needs lesion_detector (a detector weight file)")
    if int(config.collaborative_every) > 0 and not float(config.roi_perceptual_weight) > 0:
        raise ValueError("collaborative_every needs the detector's ROI perceptual loss (roi_perceptual_weight > 0)")


class LesionAwareTerms:
    """Built from a training config with ``roi_l1_weight``, ``roi_perceptual_weight``, ``lesion_detector`` (a
    detector weight file) and ``collaborative_every``; :attr:`active` is False when both weights are 0."""

    def __init__(self, config: Any, device: torch.device) -> None:
        self.roi_l1_weight = float(getattr(config, "roi_l1_weight", 0.0))
        self.roi_perceptual_weight = float(getattr(config, "roi_perceptual_weight", 0.0))
        self.collaborative_every = int(getattr(config, "collaborative_every", 0))
        self.detector = None
        self.perceptual = None
        self.optimiser = None
        if self.roi_perceptual_weight > 0:
            from ..lesions.detector import load_lesion_detector

            path = getattr(config, "lesion_detector", None)
            if not path:
                raise ValueError("roi_perceptual_weight > 0 needs a lesion detector weight file (lesion_detector)")
            self.detector = load_lesion_detector(path).to(device)
            self.detector.eval()
            self.perceptual = ROIPerceptualLoss(self.detector)
            if self.collaborative_every > 0:
                self.optimiser = torch.optim.Adam(self.detector.parameters(), lr=1e-4)

    @property
    def active(self) -> bool:
        return self.roi_l1_weight > 0 or self.roi_perceptual_weight > 0

    def loss(self, output: torch.Tensor, clean: torch.Tensor, roi: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
        """The weighted terms for a (B, 1, *patch) output, its target and ROI; ``(0, {})`` without an ROI."""
        if roi is None or not self.active:
            return output.sum() * 0.0, {}
        terms: dict[str, float] = {}
        total = output.sum() * 0.0
        if self.roi_l1_weight > 0:
            l1 = roi_l1_loss(output.float(), clean.float(), roi)
            total = total + self.roi_l1_weight * l1
            terms["roi_l1"] = float(l1.detach())
        if self.perceptual is not None:
            perceptual = self.perceptual(output.float(), clean.float(), roi)
            total = total + self.roi_perceptual_weight * perceptual
            terms["roi_perceptual"] = float(perceptual.detach())
        return total, terms

    def detector_step(self, step: int, output: torch.Tensor, roi: torch.Tensor | None) -> dict:
        """Collaborative schedule: every ``collaborative_every``-th step, one detector update on the denoised
        ``output`` (detached) against the ROI (> 0.5 is lesion). Returns the logged terms."""
        if self.optimiser is None or roi is None or (step + 1) % self.collaborative_every:
            return {}
        self.detector.train()
        logits = self.detector(output.detach().float())
        loss = F.binary_cross_entropy_with_logits(logits, (roi > 0.5).float(), pos_weight=torch.tensor(10.0, device=logits.device))
        self.optimiser.zero_grad(set_to_none=True)
        loss.backward()
        self.optimiser.step()
        self.detector.eval()
        return {"detector_loss": float(loss.detach())}

    def state_dict(self) -> dict | None:
        if self.optimiser is None:
            return None
        return {"detector": self.detector.state_dict(), "optimiser": self.optimiser.state_dict()}

    def load_state_dict(self, state: dict | None) -> None:
        if state and self.optimiser is not None:
            self.detector.load_state_dict(state["detector"])
            self.optimiser.load_state_dict(state["optimiser"])
