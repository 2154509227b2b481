"""MONAI Label infer tasks."""
from .denoise import DenoiseInferTask

__all__ = ["DenoiseInferTask"]
