"""Training of the learned denoisers: ADL's three-phase adversarial training, the TDDL-GCN's supervised training,
checkpoints and weight export."""
from .adl_training import (
    CHECKPOINT_FORMAT,
    PHASES,
    ADLTrainingConfig,
    TrainingResult,
    build_networks,
    export_weights,
    load_checkpoint,
    load_initial_weights,
    save_checkpoint,
    scaling_rule_for,
    train_adl,
    validation_window,
)
from .gcn_training import (
    GCN_CHECKPOINT_FORMAT,
    GCNTrainingConfig,
    GCNTrainingResult,
    load_gcn_checkpoint,
    train_gcn,
)

__all__ = [
    "GCN_CHECKPOINT_FORMAT",
    "GCNTrainingConfig",
    "GCNTrainingResult",
    "load_gcn_checkpoint",
    "train_gcn",
    "CHECKPOINT_FORMAT",
    "PHASES",
    "ADLTrainingConfig",
    "TrainingResult",
    "build_networks",
    "export_weights",
    "load_checkpoint",
    "load_initial_weights",
    "save_checkpoint",
    "scaling_rule_for",
    "train_adl",
    "validation_window",
]
