"""Data plumbing shared by the models: intensity scaling, training sources and patch datasets."""
from .datasets import (
    NOISE_KINDS,
    ADLPatchDataset,
    PairedFolderSource,
    SyntheticNoiseSource,
    TrainingVolume,
    ValidationPair,
    check_not_heldout,
    discover_images,
    image_stem,
    list_folder_images,
)
from .intensity import CT_RANGE_HU, IntensityScaling, intensity_scaling_for

__all__ = [
    "CT_RANGE_HU",
    "IntensityScaling",
    "intensity_scaling_for",
    "NOISE_KINDS",
    "ADLPatchDataset",
    "PairedFolderSource",
    "SyntheticNoiseSource",
    "TrainingVolume",
    "ValidationPair",
    "check_not_heldout",
    "discover_images",
    "image_stem",
    "list_folder_images",
]
