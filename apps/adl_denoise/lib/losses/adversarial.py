"""Hinge-GAN losses of ADL, with the fake sample being the denoiser's output.

The released code feeds the *noisy input* to D as the fake sample and never adds an adversarial term to
the denoiser, so the adversarial game never reaches G. Here:

- D is trained to score clean images x above +1 and denoised images G(y) below -1, with G(y) DETACHED
  (D's update must not move G);
- G is trained to raise D's score of G(y) (hinge-GAN generator term -mean D(G(y))), with gradients
  flowing through D (whose parameters the trainer does not step in G's update) into G.

Logits are lists over D's output scales (see :class:`lib.networks.EfficientUNetDiscriminator`); every
scale counts equally. A single tensor is accepted as a one-scale list.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "adversarial_generator_loss",
    "discriminator_hinge_loss",
    "discriminator_loss",
    "generator_adversarial_loss",
]

Logits = torch.Tensor | Sequence[torch.Tensor]


def _as_list(logits: Logits) -> list[torch.Tensor]:
    items = [logits] if isinstance(logits, torch.Tensor) else list(logits)
    if not items:
        raise ValueError("expected at least one logit map")
    return items


def discriminator_hinge_loss(real_logits: Logits, fake_logits: Logits) -> torch.Tensor:
    """Mean over scales of mean(relu(1 - D(x))) + mean(relu(1 + D(G(y)))).

    Args:
        real_logits: D's logit maps for clean images, each (B, 1, *spatial_k).
        fake_logits: D's logit maps for denoised images; these must come from ``G(y).detach()`` (use
            :func:`discriminator_loss`, which detaches for you).

    Returns:
        Scalar tensor >= 0; 0 once D separates real and fake with margin 1 everywhere.
    """
    real, fake = _as_list(real_logits), _as_list(fake_logits)
    if len(real) != len(fake):
        raise ValueError(f"{len(real)} real vs {len(fake)} fake logit scales")
    terms = [F.relu(1.0 - r).mean() + F.relu(1.0 + f).mean() for r, f in zip(real, fake)]
    return torch.stack(terms).mean()


def generator_adversarial_loss(fake_logits: Logits) -> torch.Tensor:
    """Hinge-GAN generator term: mean over scales of -mean(D(G(y))), G(y) NOT detached.

    Unbounded below by design (G keeps gaining by fooling D more); its weight in the total loss keeps it
    from dominating fidelity (see :class:`lib.losses.ADLDenoiserLoss`).
    """
    return torch.stack([-f.mean() for f in _as_list(fake_logits)]).mean()


def _real_and_fake_logits(
    discriminator: nn.Module,
    clean: torch.Tensor,
    fake: torch.Tensor,
    noisy: torch.Tensor | None,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """D's logit maps for ``clean`` and ``fake`` judged in ONE concatenated batch, so that batch-normalisation
    statistics are shared and cannot by themselves reveal which half is fake; as float32 (the hinge terms stay in
    float32 when D runs under autocast)."""
    batch = clean.shape[0]
    candidates = torch.cat([clean, fake], dim=0)
    condition = None if noisy is None else torch.cat([noisy, noisy], dim=0).detach()
    logits = _as_list(discriminator(candidates) if condition is None else discriminator(candidates, condition))
    return [l[:batch].float() for l in logits], [l[batch:].float() for l in logits]


def discriminator_loss(
    discriminator: nn.Module,
    clean: torch.Tensor,
    denoised: torch.Tensor,
    noisy: torch.Tensor | None = None,
) -> torch.Tensor:
    """D's hinge loss for one batch: runs D on clean and on ``denoised.detach()`` in one batch.

    Args:
        discriminator: e.g. :class:`lib.networks.EfficientUNetDiscriminator`.
        clean: clean images x (B, C, *spatial) in [0, 1].
        denoised: G(y), same shape (full-resolution output); detached here.
        noisy: the noisy inputs y for a conditional D (the same y conditions real and fake), else None.
    """
    real, fake = _real_and_fake_logits(discriminator, clean, denoised.detach(), noisy)
    return discriminator_hinge_loss(real, fake)


def adversarial_generator_loss(
    discriminator: nn.Module,
    denoised: torch.Tensor,
    noisy: torch.Tensor | None = None,
    clean: torch.Tensor | None = None,
) -> torch.Tensor:
    """G's adversarial term: :func:`generator_adversarial_loss` of D(G(y)[, y]), gradients reach G.

    With ``clean`` (B, C, *spatial) given, D judges G(y) in the same concatenated batch with the clean images as in
    :func:`discriminator_loss` (the batch-norm statistics D was trained with) and only the G(y) half counts.

    D's parameters also receive gradients here; the trainer steps only G's optimiser in G's update (and
    may set ``requires_grad_(False)`` on D to save the work).
    """
    if clean is not None:
        _, fake = _real_and_fake_logits(discriminator, clean, denoised, noisy)
        return generator_adversarial_loss(fake)
    logits = discriminator(denoised) if noisy is None else discriminator(denoised, noisy.detach())
    return generator_adversarial_loss([l.float() for l in _as_list(logits)])
