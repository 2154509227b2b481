"""Denoisers usable from the command line, the server and the benchmark.

`classical`: non-learned baselines (Gaussian, non-local means, BM3D, BM4D). The learned models (ADL,
TDDL-GCN) register here too as they land.
"""
from .classical import CLASSICAL_DENOISERS, denoise_classical

__all__ = ["CLASSICAL_DENOISERS", "denoise_classical"]
