"""Lesions: synthetic low-contrast lesions (:mod:`.synthesis`) for the detectability benchmark and lesion-aware
training."""
from .synthesis import (
    CT_HYPERDENSE_HU,
    CT_HYPODENSE_HU,
    MR_ENHANCING_FRACTION,
    MR_HYPOINTENSE_FRACTION,
    Lesion,
    insert_lesions,
    lesion_mask,
    lesion_profile,
    lesion_sites,
    random_lesions,
    training_contrast_ranges,
)

__all__ = [
    "CT_HYPERDENSE_HU",
    "CT_HYPODENSE_HU",
    "MR_ENHANCING_FRACTION",
    "MR_HYPOINTENSE_FRACTION",
    "Lesion",
    "insert_lesions",
    "lesion_mask",
    "lesion_profile",
    "lesion_sites",
    "random_lesions",
    "training_contrast_ranges",
]
