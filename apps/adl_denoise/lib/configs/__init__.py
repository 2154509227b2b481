"""One TaskConfig per model (the model's name is the module's name)."""
from .adl import ADL
from .nlm import NLM
from .tddl_gcn import TDDLGCN

MODEL_CONFIGS = {"adl": ADL, "tddl_gcn": TDDLGCN, "nlm": NLM}

__all__ = ["ADL", "NLM", "TDDLGCN", "MODEL_CONFIGS"]
