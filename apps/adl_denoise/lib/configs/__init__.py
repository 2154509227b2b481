"""One TaskConfig per model (the model's name is the module's name)."""
from .adl import ADL
from .adl_3d import ADL3D
from .nlm import NLM
from .tddl_gcn import TDDLGCN

MODEL_CONFIGS = {"adl": ADL, "adl_3d": ADL3D, "tddl_gcn": TDDLGCN, "nlm": NLM}

__all__ = ["ADL", "ADL3D", "NLM", "TDDLGCN", "MODEL_CONFIGS"]
