"""Data plumbing shared by the models.

  intensity  intensity scaling of a modality to [0, 1] (the rule a model is trained and served with)
  heldout    the held-out benchmark split that no training, tuning or calibration may read
  files      image discovery: which files and folders are images, their names
  sources    noisy / clean training volumes (real pairs, synthetic physics noise) and validation pairs
  patches    ADLPatchDataset: reproducible noisy / clean training patches from a source
  recipes    the training-data recipe of a run (which source, which validation pairs), shared by the CLI,
             the app and the bench
"""
from .files import discover_images, image_stem, list_folder_images
from .heldout import check_not_heldout
from .intensity import CT_RANGE_HU, IntensityScaling, intensity_scaling_for
from .patches import ADLPatchDataset
from .recipes import TrainingData, TrainingDataRecipe, build_training_data
from .sources import NOISE_KINDS, PairedFolderSource, SyntheticNoiseSource, TrainingVolume, ValidationPair

__all__ = [
    "CT_RANGE_HU",
    "IntensityScaling",
    "intensity_scaling_for",
    "NOISE_KINDS",
    "ADLPatchDataset",
    "PairedFolderSource",
    "SyntheticNoiseSource",
    "TrainingData",
    "TrainingDataRecipe",
    "TrainingVolume",
    "ValidationPair",
    "build_training_data",
    "check_not_heldout",
    "discover_images",
    "image_stem",
    "list_folder_images",
]
