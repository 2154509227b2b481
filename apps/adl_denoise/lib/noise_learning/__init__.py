"""TDDL noise learning: learn a scanner's CT noise from its low-dose images alone, make pseudo training pairs.

Task-driven deep learning for LDCT denoising (K. Chen, J. Huang, J. Sun, Y. Ren, X. Pu, H. Qiu, ISICDM 2020; the
graph-convolutional denoiser: K. Chen, X. Pu, Y. Ren et al., ICONIP 2020): noise patches
are extracted from low-dose scans (no normal-dose scan needed), a conditional VAE learns their distribution
(conditioned on the local intensity, so noise may depend on attenuation), and sampled noise is added to plentiful
normal-dose scans to make pseudo low-dose / normal-dose pairs on which any denoiser trains.

  extraction     smooth-patch selection in the low-dose image, trend removed -> NoiseSamples
  vae            ConditionalNoiseVAE: FiLM-conditioned conv VAE with a learned coloured (spectral) decoder noise
  tiling         variance-preserving overlap-add of independent noise tiles (no seams, right std)
  noise_model    NoiseModel: VAE + metadata, save/load, synthesise_noise_field for whole images, level calibration
                 to the low-dose scans' measured soft-tissue noise (calibrate_level; done by learn_noise_model)
  training       train_noise_model (Adam, tqdm) -> NoiseModel with training and fit statistics
  pseudo_pairs   synthesise_pseudo_low_dose, LearnedNoiseSource (plugs into lib.data.ADLPatchDataset)
  validation     patch_statistics, compare_noise (std by HU band, NPS), plot_noise_comparison
  adaptation     adapt_to_low_dose: ``cli.py adapt`` (learn noise, pseudo pairs, fine-tune, J-invariant check)
"""
from .adaptation import AdaptationRefused, AdaptSettings, adapt_to_low_dose, holdout_indices
from .extraction import (
    DETREND_MODES,
    NoiseSamples,
    SelectionThresholds,
    detect_clip_values,
    extract_noise_samples,
    remove_trend,
)
from .noise_model import AIR_POLICIES, NOISE_MODEL_FORMAT, NOISE_MODEL_VERSION, NoiseModel, torch_generator
from .pseudo_pairs import LearnedNoiseSource, synthesise_pseudo_low_dose
from .tiling import TileLayout, hann_window_2d
from .training import MIN_TRAINING_SAMPLES, air_policy_for, train_noise_model
from .vae import ConditionalNoiseVAE, VAEConfig, VAELoss
from .validation import NOISE_BANDS, band_label, compare_noise, patch_statistics, plot_noise_comparison

__all__ = [
    "AdaptationRefused",
    "AdaptSettings",
    "adapt_to_low_dose",
    "holdout_indices",
    "DETREND_MODES",
    "NoiseSamples",
    "SelectionThresholds",
    "detect_clip_values",
    "extract_noise_samples",
    "remove_trend",
    "AIR_POLICIES",
    "NOISE_MODEL_FORMAT",
    "NOISE_MODEL_VERSION",
    "NoiseModel",
    "torch_generator",
    "LearnedNoiseSource",
    "synthesise_pseudo_low_dose",
    "TileLayout",
    "hann_window_2d",
    "MIN_TRAINING_SAMPLES",
    "air_policy_for",
    "train_noise_model",
    "ConditionalNoiseVAE",
    "VAEConfig",
    "VAELoss",
    "NOISE_BANDS",
    "band_label",
    "compare_noise",
    "patch_statistics",
    "plot_noise_comparison",
]
