"""The weight-file format: the small file shipped to users and read by :func:`lib.predict.load_denoiser`."""
from __future__ import annotations

__all__ = ["WEIGHTS_FORMAT", "WEIGHTS_VERSION", "TRAINING_CHECKPOINT_FORMATS"]

WEIGHTS_FORMAT = "adl-denoiser-weights"
WEIGHTS_VERSION = 1
#: Training checkpoints that load_denoiser also accepts (ADL and TDDL-GCN, :mod:`lib.engines`).
TRAINING_CHECKPOINT_FORMATS = ("adl-training-checkpoint", "gcn-training-checkpoint")
