"""Learned denoisers for the benchmark, run in-process like the baselines (so time per slice compares like
for like: no interpreter start-up or image file I/O in the figure, but loading the weights (a fraction of a second)
and the first forward pass are in it; use ``--cli`` for the whole command's cost).

Each is a module-level callable ``denoise(noisy (Z, H, W) float32, spacing, modality) -> array`` that loads
the app's weights for the pair's modality (published ``model/<name>_<m>.pt`` if present, else the shipped
``model/pretrained_<name>_<m>.pt``) and denoises on the CPU (or the GPU when ``BENCH_DEVICE=cuda``).

``adl`` and ``tddl_gcn`` are the networks' own output; ``adl_lfr`` and ``tddl_gcn_lfr`` add the modality's default
low-frequency restoration (:mod:`lib.lesions.low_frequency_restoration`), i.e. what ``cli.py denoise`` and the
app return.
"""
from __future__ import annotations

import os

import numpy as np


def from_weights(noisy: np.ndarray, spacing=None, modality: str = "CT", *, path: str, amp: bool = True,
                 planes: str = "auto", low_frequency_restoration: float | None = 0.0) -> np.ndarray:
    """The network of the weight file ``path`` (ADL or TDDL-GCN), slice-wise (2D) or by 3D patches.

    ``amp``: mixed precision as the app uses it (:mod:`lib.runtime.precision`: bfloat16 on a CPU with native bfloat16, fp16
    on CUDA); False runs float32 throughout (what a CPU without native bfloat16 gets).
    ``planes``: "auto" averages the three orthogonal planes where the app does
    (:func:`lib.predict.uses_orthogonal_planes`: 2D ADL on near-isotropic MR), "slices" never does.
    ``low_frequency_restoration``: in-plane Gaussian width in pixels of the removed content given back; 0 (default)
    = the network alone, None = the default as served (the weight file's own width, else the modality's).
    Bind ``path`` (and ``amp``) with ``functools.partial`` (picklable, so the harness's worker process can run it)."""
    from lib.lesions.low_frequency_restoration import apply_restoration
    from lib.predict import denoise_array, load_denoiser, uses_orthogonal_planes
    from lib.weights.format import restoration_of

    device = os.environ.get("BENCH_DEVICE", "cpu")
    model = load_denoiser(path, device=device)
    noisy = np.asarray(noisy, np.float32)
    orthogonal = planes == "auto" and uses_orthogonal_planes(model, modality, noisy.shape, spacing)
    out = denoise_array(model, noisy, modality=modality, device=device, amp=amp, orthogonal_planes=orthogonal)
    return apply_restoration(noisy, out, modality, low_frequency_restoration,
                             weights_sigma_px=restoration_of(model.metadata))[0]


def _installed(model_name: str, modality: str) -> str:
    from lib.weights import candidate_weights, find_weights

    path = find_weights(model_name, modality)
    if path is None:
        raise FileNotFoundError(f"no {model_name} weights for {modality}: expected one of "
                                f"{candidate_weights(model_name, modality)}")
    return str(path)


def adl(noisy: np.ndarray, spacing=None, modality: str = "CT") -> np.ndarray:
    """ADL (2D Efficient-UNet) with the app's weights for ``modality`` as the app runs it: slice-wise with a
    whole-slice window, and on a near-isotropic MR volume the mean of its three orthogonal planes."""
    return from_weights(noisy, spacing, modality, path=_installed("adl", modality))


def adl_slices(noisy: np.ndarray, spacing=None, modality: str = "CT") -> np.ndarray:
    """:func:`adl` on axial slices alone (no orthogonal-plane average): a third of the time on MR."""
    return from_weights(noisy, spacing, modality, path=_installed("adl", modality), planes="slices")


def adl_fp32(noisy: np.ndarray, spacing=None, modality: str = "CT") -> np.ndarray:
    """:func:`adl` in float32 throughout: what a CPU without native bfloat16 runs."""
    return from_weights(noisy, spacing, modality, path=_installed("adl", modality), amp=False)


def adl_3d(noisy: np.ndarray, spacing=None, modality: str = "CT") -> np.ndarray:
    """ADL's 3D Efficient-UNet with the app's ``adl_3d`` weights for ``modality``, by 96^3 patches."""
    return from_weights(noisy, spacing, modality, path=_installed("adl_3d", modality))


def tddl_gcn(noisy: np.ndarray, spacing=None, modality: str = "CT") -> np.ndarray:
    """TDDL-GCN with the app's weights for ``modality`` (CT), slice-wise, whole slices (windowed k-NN)."""
    return from_weights(noisy, spacing, modality, path=_installed("tddl_gcn", modality))


def adl_lfr(noisy: np.ndarray, spacing=None, modality: str = "CT") -> np.ndarray:
    """:func:`adl` with the default low-frequency restoration (the weight file's own width, else the modality's):
    what the app and ``cli.py denoise`` return."""
    return from_weights(noisy, spacing, modality, path=_installed("adl", modality), low_frequency_restoration=None)


def tddl_gcn_lfr(noisy: np.ndarray, spacing=None, modality: str = "CT") -> np.ndarray:
    """:func:`tddl_gcn` with the default low-frequency restoration for CT, as served."""
    return from_weights(noisy, spacing, modality, path=_installed("tddl_gcn", modality),
                        low_frequency_restoration=None)


LEARNED = {"adl": adl, "adl_slices": adl_slices, "adl_fp32": adl_fp32, "adl_3d": adl_3d, "tddl_gcn": tddl_gcn,
           "adl_lfr": adl_lfr, "tddl_gcn_lfr": tddl_gcn_lfr}
#: the app's model name whose weights each learned denoiser uses
LEARNED_MODEL_NAMES = {"adl": "adl", "adl_slices": "adl", "adl_fp32": "adl", "adl_3d": "adl_3d",
                       "tddl_gcn": "tddl_gcn", "adl_lfr": "adl", "tddl_gcn_lfr": "tddl_gcn"}


def has_weights(name: str, modality: str) -> bool:
    """Whether the learned denoiser ``name`` has installed weights for ``modality``."""
    from lib.weights import find_weights

    return find_weights(LEARNED_MODEL_NAMES[name], modality) is not None
