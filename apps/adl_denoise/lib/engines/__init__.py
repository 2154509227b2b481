"""Training of the learned denoisers: the shared engine (process group, data stream, checkpoints, RNG state,
validation, step bookkeeping: :mod:`.engine`), ADL's three-phase adversarial training (:mod:`.adl_training`), the
TDDL-GCN's supervised training (:mod:`.gcn_training`), batch-norm recalibration (:mod:`.batch_norm`) and the gated
fine-tuning the app runs (:mod:`.gated_fine_tuning`). Weight files: :mod:`lib.weights`.

The package exports the public names of the engine and of both trainers (each module's ``__all__``).
"""
from . import adl_training, engine, gcn_training
from .adl_training import *  # noqa: F401,F403
from .engine import *  # noqa: F401,F403
from .gcn_training import *  # noqa: F401,F403

__all__ = [*adl_training.__all__, *engine.__all__, *gcn_training.__all__]
