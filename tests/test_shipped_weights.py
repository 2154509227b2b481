"""The weights and the noise model shipped in ``apps/adl_denoise/model/`` load without network access, say how
they were trained, never came from the held-out split, and do their job on the sample data (built by
``sample_data/build_sample_data.py``, which test.sh runs first)."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import APP_DIR, SAMPLE_STUDIES

from lib.data import check_not_heldout
from lib.evaluation.metrics import CT_WINDOWS, psnr
from lib.imaging import read_volume
from lib.inference import denoise_array, load_denoiser
from lib.noise_learning import NoiseModel

MODEL_DIR = APP_DIR / "model"
SOFT_TISSUE = CT_WINDOWS["soft_tissue"]


def _sample_ct_pair() -> tuple[np.ndarray, np.ndarray]:
    noisy = read_volume(SAMPLE_STUDIES / "ct_head_pydicom693_ld25.nii.gz", modality="CT").array
    reference = read_volume(SAMPLE_STUDIES / "ct_head_pydicom693.nii.gz", modality="CT").array
    return noisy, reference


def test_shipped_tddl_gcn_ct_weights_denoise_the_sample_quarter_dose_slice() -> None:
    loaded = load_denoiser(MODEL_DIR / "pretrained_tddl_gcn_ct.pt", device="cpu")
    assert loaded.metadata["network_class"] == "GCNDenoiser" and loaded.modality == "CT"
    record = loaded.metadata["training"]
    assert record["steps"] >= 1000 and record["hardware"] and record["data"]["images"]
    check_not_heldout(record["data"]["images"])  # names of the training images; raises on held-out ones

    noisy, reference = _sample_ct_pair()
    denoised = denoise_array(loaded, noisy, modality="CT", device="cpu")
    assert denoised.shape == noisy.shape and denoised.dtype == np.float32
    gain = psnr(denoised, reference, SOFT_TISSUE) - psnr(noisy, reference, SOFT_TISSUE)
    assert gain > 1.0, f"the shipped TDDL-GCN gains only {gain:.2f} dB on the sample quarter-dose slice"
    tissue = (reference > -100) & (reference < 200)  # brain and soft tissue of the head slice
    bias = float((denoised - reference)[tissue].mean())
    assert abs(bias) < 5.0, f"mean HU shift {bias:+.1f} HU in soft tissue"


def test_shipped_ct_noise_model_makes_ct_like_noise() -> None:
    model = NoiseModel.load(MODEL_DIR / "pretrained_noise_model_ct.pt")
    check_not_heldout(model.info["inputs"])
    _, reference = _sample_ct_pair()
    field = model.synthesise_noise_field(reference, np.random.SeedSequence(7), pixel_size_mm=(0.488, 0.488))
    assert field.shape == reference.shape and np.isfinite(field).all()
    tissue = (reference > -100) & (reference < 200)
    # learnt from simulated quarter-dose thorax slices: tens of HU, zero mean
    assert 15.0 < float(field[tissue].std()) < 80.0
    assert abs(float(field[tissue].mean())) < 3.0
    again = model.synthesise_noise_field(reference, np.random.SeedSequence(7), pixel_size_mm=(0.488, 0.488))
    assert np.array_equal(field, again)
