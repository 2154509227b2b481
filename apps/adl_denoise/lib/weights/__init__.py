"""Weights of the learned denoisers: the file format (export, initial weights for fine-tuning), where the app finds
them, and the versioned store that publishes fine-tuned weights atomically."""
from .format import (
    TRAINING_CHECKPOINT_FORMATS,
    NonFiniteWeightsError,
    UnusableWeightsError,
    WEIGHTS_FORMAT,
    WEIGHTS_VERSION,
    export_weights,
    inflate_input_channels,
    load_initial_weights,
    non_finite_tensors,
    plain_json,
    portable_record,
    scaling_rule_for,
)
from .lineage import MAX_LINEAGE, start_lineage
from .lookup import MODEL_DIR, candidate_weights, find_weights
from .store import ModelStore, WeightsVersion

__all__ = ["NonFiniteWeightsError", "UnusableWeightsError", "TRAINING_CHECKPOINT_FORMATS", "WEIGHTS_FORMAT", "WEIGHTS_VERSION",
           "export_weights", "inflate_input_channels", "load_initial_weights", "non_finite_tensors", "plain_json",
           "portable_record", "scaling_rule_for", "MAX_LINEAGE", "start_lineage", "MODEL_DIR", "candidate_weights", "find_weights", "ModelStore", "WeightsVersion"]
