"""Weights of the learned denoisers: the file format, where the app finds them, and the versioned store that
publishes fine-tuned weights atomically."""
from .format import TRAINING_CHECKPOINT_FORMATS, WEIGHTS_FORMAT, WEIGHTS_VERSION
from .lookup import MODEL_DIR, candidate_weights, find_weights
from .store import ModelStore, WeightsVersion

__all__ = ["TRAINING_CHECKPOINT_FORMATS", "WEIGHTS_FORMAT", "WEIGHTS_VERSION", "MODEL_DIR", "candidate_weights",
           "find_weights", "ModelStore", "WeightsVersion"]
