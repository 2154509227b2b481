"""One TaskConfig per model (the model's name is the module's name)."""
from .adl import ADL
from .tddl_gcn import TDDLGCN

MODEL_CONFIGS = {"adl": ADL, "tddl_gcn": TDDLGCN}

__all__ = ["ADL", "TDDLGCN", "MODEL_CONFIGS"]
