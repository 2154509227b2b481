"""Noise physics: low-dose CT in the projection domain, MR Rician noise, generic noise, noise spectra.

Pure numpy/torch, no file I/O in the physics (only :func:`plot_noise_power_spectra` writes a PNG).

  projector    parallel-beam forward projection and filtered back-projection in torch (CPU or CUDA)
  ct_lowdose   low-dose CT simulation from a normal-dose image (Poisson + electronic noise in the sinogram)
  mr           Rician noise of magnitude MR images
  generic      Gaussian, Poisson and speckle noise
  spectrum     noise power spectrum, noise std per HU band, noise ROIs
  estimate     blind noise-level estimate (e.g. the sigma for BM3D)
"""
from .ct_lowdose import (
    MU_WATER_PER_MM,
    LowDoseCTDetails,
    LowDoseCTSettings,
    hu_to_mu,
    mu_to_hu,
    quarter_dose_settings,
    sample_low_dose_settings,
    simulate_low_dose_ct,
    soft_tissue_mask,
    tube_current_modulation_factors,
)
from .estimate import estimate_ct_noise_std_hu, estimate_noise_sigma, flat_window_noise_std
from .generic import add_gaussian_noise, add_poisson_noise, add_speckle_noise
from .mr import add_rician_noise, rician_bias_corrected, rician_expected_magnitude
from .projector import (
    RECONSTRUCTION_FILTERS,
    ParallelBeamGeometry,
    back_project,
    filtered_back_project,
    forward_project,
    reconstruction_filter,
)
from .spectrum import (
    DEFAULT_HU_BANDS,
    NoisePowerSpectrum,
    extract_noise_rois,
    noise_std_by_band,
    plot_noise_power_spectra,
    radial_noise_power_spectrum,
)

__all__ = [
    "MU_WATER_PER_MM",
    "LowDoseCTDetails",
    "LowDoseCTSettings",
    "hu_to_mu",
    "mu_to_hu",
    "quarter_dose_settings",
    "sample_low_dose_settings",
    "simulate_low_dose_ct",
    "soft_tissue_mask",
    "tube_current_modulation_factors",
    "estimate_ct_noise_std_hu",
    "estimate_noise_sigma",
    "flat_window_noise_std",
    "add_gaussian_noise",
    "add_poisson_noise",
    "add_speckle_noise",
    "add_rician_noise",
    "rician_bias_corrected",
    "rician_expected_magnitude",
    "RECONSTRUCTION_FILTERS",
    "ParallelBeamGeometry",
    "back_project",
    "filtered_back_project",
    "forward_project",
    "reconstruction_filter",
    "DEFAULT_HU_BANDS",
    "NoisePowerSpectrum",
    "extract_noise_rois",
    "noise_std_by_band",
    "plot_noise_power_spectra",
    "radial_noise_power_spectrum",
]
