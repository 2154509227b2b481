"""Training of the learned denoisers: ADL's three-phase adversarial training, checkpoints and weight export."""
from .adl_trainer import (
    CHECKPOINT_FORMAT,
    PHASES,
    ADLTrainingConfig,
    TrainingResult,
    build_networks,
    export_weights,
    load_checkpoint,
    save_checkpoint,
    scaling_rule_for,
    train_adl,
    validation_window,
)

__all__ = [
    "CHECKPOINT_FORMAT",
    "PHASES",
    "ADLTrainingConfig",
    "TrainingResult",
    "build_networks",
    "export_weights",
    "load_checkpoint",
    "save_checkpoint",
    "scaling_rule_for",
    "train_adl",
    "validation_window",
]
