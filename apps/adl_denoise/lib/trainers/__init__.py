"""MONAI Label train tasks."""
from .finetune import DenoiserTrainTask, TrainingDataError

__all__ = ["DenoiserTrainTask", "TrainingDataError"]
