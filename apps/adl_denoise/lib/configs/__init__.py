"""One TaskConfig per model (the model's name is the module's name)."""
from .adl import ADL
from .adl_3d import ADL3D
from .nlm import NLM
from .tddl_gcn import TDDLGCN

MODEL_CONFIGS = {"adl": ADL, "adl_3d": ADL3D, "tddl_gcn": TDDLGCN, "nlm": NLM}
#: served only when named (``--conf models all,adl_3d``), not by ``all``: the 3D network is 4.3 dB below the 2.5D
#: one on the held-out MR (bench/README.md), so a clinician's default list should not offer it
OPT_IN_MODELS = frozenset({"adl_3d"})

__all__ = ["ADL", "ADL3D", "NLM", "TDDLGCN", "MODEL_CONFIGS", "OPT_IN_MODELS"]
