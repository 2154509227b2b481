"""MONAI Label train tasks, and the stamp that makes a saved label a clinician's correction (training data)."""
from .finetune import (CORRECTION_KEYS, DenoiserTrainTask, TrainingDataError, correction_stamp,
                       is_clinician_correction, remove_stale_work, stored_regions)

__all__ = ["CORRECTION_KEYS", "DenoiserTrainTask", "TrainingDataError", "correction_stamp", "is_clinician_correction",
           "remove_stale_work", "stored_regions"]
