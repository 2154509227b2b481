"""The learned noise model of one scanner/protocol: the VAE plus what is needed to use and judge it.

A :class:`NoiseModel` holds the trained :class:`~lib.noise_learning.vae.ConditionalNoiseVAE` and its metadata
(patch size, pixel size of the training images, HU range of the conditioning, air policy, clip values of the
scanner, training statistics: noise std by HU band, std against the condition, noise power spectrum, and how
well the model's samples reproduce them). It synthesises whole noise fields for normal-dose images
(:meth:`NoiseModel.synthesise_noise_field`).

File format (``torch.save`` of a dict, loadable with ``torch.load(weights_only=True)``; no code, no network):
``format`` = ``"tddl-noise-model"``, ``version``, ``vae_config`` (plain dict), ``state_dict`` (float32 tensors),
``pixel_size_mm``, ``air_policy``, ``clip_values_hu``, ``training_stats`` and ``info`` (JSON-like values),
``created_utc`` and library versions; since level calibration, ``level_correction`` (a float, 1.0 when absent).

Level calibration (:meth:`NoiseModel.calibrate_level`, done by :func:`lib.noise_learning.learn_noise_model`): the
smooth patches of real scans still hold anatomy weaker than the noise (fat/muscle texture, vessels) and sit where
the noise is higher than the band's average, so the learnt soft-tissue noise comes out too high (figures: bench/README
"Level calibration"). The soft-tissue noise of the low-dose scans themselves is
measured with :func:`lib.noise.estimate_ct_noise_std_hu` (plane-fit variance in wide windows, over the mask; see its
notes for how close it reads), the model's samples at soft-tissue conditions are measured with the same estimator
(:func:`lib.noise.flat_window_noise_std`), and the ratio is stored
as ``level_correction``: every sample is multiplied by it (all HU bands alike: the texture, i.e. the normalised
NPS, and the ratios between bands are the learnt ones; only soft tissue is calibrated in absolute terms). Files
without the key sample exactly as before.

Air policy (what the model does where the normal-dose image is air, HU < -900):

* ``"learned"``: the low-dose training images had noisy air (>= ``MIN_AIR_SAMPLES`` accepted air patches): the
  model's conditioning covers air and the noise there is what it learnt.
* ``"none"``: the training images' air was constant or clipped (e.g. stored clipped at -1024 HU): the scanner's
  output carries no usable noise in air, so none is synthesised there (a ramp from -900 to -950 HU).
* ``"nearest"``: no air in the training data at all (e.g. the field of view lay inside the body): the condition is
  clamped to the trained range, so air gets the noise of the lowest trained intensity.
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from scipy import ndimage

from ..runtime.atomic import atomic_torch_save
from ..runtime.clock import utc_timestamp
from ..runtime.machine import library_version

from .tiling import TileLayout
from .vae import ConditionalNoiseVAE, VAEConfig

__all__ = ["NOISE_MODEL_FORMAT", "NOISE_MODEL_VERSION", "AIR_POLICIES", "NoiseModel", "torch_generator"]

log = logging.getLogger(__name__)

NOISE_MODEL_FORMAT = "tddl-noise-model"
NOISE_MODEL_VERSION = 1
AIR_POLICIES = ("learned", "none", "nearest")
MIN_AIR_SAMPLES = 20
_AIR_HU = -900.0
_AIR_ZERO_HU = -950.0


def torch_generator(seed: int | np.random.SeedSequence | None) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded from an int or a numpy SeedSequence (fresh entropy for None)."""
    ss = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
    state = ss.generate_state(2, dtype=np.uint32)
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(state[0]) << 32 | int(state[1]))
    return gen


def _plain(value: Any) -> Any:
    """JSON-able copy (numbers, strings, lists, dicts): what ``torch.load(weights_only=True)`` accepts."""
    def default(o: Any) -> Any:
        if isinstance(o, np.ndarray):
            return o.tolist()
        if hasattr(o, "item"):
            return o.item()
        return str(o)

    return json.loads(json.dumps(value, default=default, allow_nan=True))


@dataclass
class NoiseModel:
    """A trained TDDL noise model (see the module docstring).

    Attributes:
        vae: the network (its buffer ``noise_scale_hu`` converts to HU).
        pixel_size_mm: (dy, dx) of the training images in mm, or None if unknown.
        air_policy: one of :data:`AIR_POLICIES`.
        clip_values_hu: values at which the training images were clipped or padded (e.g. [-1024.0]).
        training_stats: statistics of the training noise and of the model's fit (plain values).
        info: provenance (sources, steps, losses ...), plain values.
    """

    vae: ConditionalNoiseVAE
    pixel_size_mm: tuple[float, float] | None = None
    air_policy: str = "nearest"
    clip_values_hu: list[float] = field(default_factory=list)
    training_stats: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    level_correction: float = 1.0

    def __post_init__(self) -> None:
        if not (math.isfinite(float(self.level_correction)) and float(self.level_correction) > 0):
            raise ValueError(f"level_correction must be finite and > 0, got {self.level_correction!r}")
        self.level_correction = float(self.level_correction)
        if self.air_policy not in AIR_POLICIES:
            raise ValueError(f"air_policy must be one of {AIR_POLICIES}, got {self.air_policy!r}")
        if self.pixel_size_mm is not None:
            self.pixel_size_mm = (float(self.pixel_size_mm[0]), float(self.pixel_size_mm[1]))
        self.clip_values_hu = [float(v) for v in self.clip_values_hu]

    # ------------------------------------------------------------------------------------------ properties
    @property
    def patch_size(self) -> int:
        return int(self.vae.patch_size)

    @property
    def condition_range_hu(self) -> tuple[float, float]:
        lo, hi = self.vae.config.condition_range_hu
        return float(lo), float(hi)

    @property
    def noise_scale_hu(self) -> float:
        return float(self.vae.noise_scale_hu)

    @property
    def device(self) -> torch.device:
        return self.vae.log_spectrum_base.device

    def to(self, device: str | torch.device) -> "NoiseModel":
        self.vae.to(device)
        return self

    # ------------------------------------------------------------------------------------------ file
    def save(self, path: str | os.PathLike) -> Path:
        """Write the model (atomically) to ``path``; returns the path."""
        payload = {
            "format": NOISE_MODEL_FORMAT,
            "version": NOISE_MODEL_VERSION,
            "vae_config": self.vae.config.to_dict(),
            "state_dict": {k: v.detach().cpu().float().clone() for k, v in self.vae.state_dict().items()},
            "pixel_size_mm": None if self.pixel_size_mm is None else [float(v) for v in self.pixel_size_mm],
            "air_policy": self.air_policy,
            "clip_values_hu": [float(v) for v in self.clip_values_hu],
            "training_stats": _plain(self.training_stats),
            "info": _plain(self.info),
            "level_correction": float(self.level_correction),
            "created_utc": utc_timestamp(),
            "software": {"torch": str(torch.__version__), "monai": str(library_version("monai"))},
        }
        out = Path(path).expanduser()
        return atomic_torch_save(payload, out)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "NoiseModel":
        """Read a model written by :meth:`save` (``weights_only=True``) onto ``device``.

        Raises:
            FileNotFoundError: no such file.
            ValueError: not a noise-model file, or an unsupported version.
        """
        p = Path(path).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"noise model {p} not found")
        try:
            payload = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as error:  # pickle/zip errors of a file that is not a torch file
            raise ValueError(f"{p} is not a noise-model file ({type(error).__name__})") from None
        if not isinstance(payload, dict) or payload.get("format") != NOISE_MODEL_FORMAT:
            raise ValueError(f"{p} is not a TDDL noise-model file (format {NOISE_MODEL_FORMAT!r} expected)")
        if int(payload.get("version", -1)) > NOISE_MODEL_VERSION:
            raise ValueError(f"{p} has noise-model version {payload.get('version')}; this code reads up to "
                             f"{NOISE_MODEL_VERSION}")
        vae = ConditionalNoiseVAE(VAEConfig.from_dict(payload["vae_config"]))
        vae.load_state_dict(payload["state_dict"])
        vae.eval()
        pixel = payload.get("pixel_size_mm")
        model = cls(vae, None if pixel is None else tuple(pixel), payload.get("air_policy", "nearest"),
                    list(payload.get("clip_values_hu", [])), dict(payload.get("training_stats", {})),
                    dict(payload.get("info", {})), float(payload.get("level_correction", 1.0)))
        return model.to(device)

    # ------------------------------------------------------------------------------------------ sampling
    def sample_patches(self, condition_hu: np.ndarray | Sequence[float], seed: int | None = 0,
                       batch_size: int = 256) -> np.ndarray:
        """Noise patches (N, P, P) float32 HU at the conditions (N,) HU; reproducible for a seed."""
        cond = np.asarray(condition_hu, dtype=np.float32).reshape(-1)
        gen = torch_generator(seed)
        return self._sample(cond, gen, batch_size)

    def _sample(self, cond: np.ndarray, gen: torch.Generator, batch_size: int) -> np.ndarray:
        out = np.empty((cond.shape[0], self.patch_size, self.patch_size), dtype=np.float32)
        was_training = self.vae.training
        self.vae.eval()
        try:
            for start in range(0, cond.shape[0], int(batch_size)):
                c = torch.from_numpy(cond[start:start + int(batch_size)]).to(self.device)
                out[start:start + c.shape[0]] = self.vae.sample(c, gen).cpu().numpy()
        finally:
            self.vae.train(was_training)
        if self.level_correction != 1.0:  # 1.0 (files without calibration): bit-identical to before
            out *= np.float32(self.level_correction)
        return out

    def soft_tissue_level_hu(self, condition_hu: np.ndarray | Sequence[float] | None = None, n: int = 512,
                             seed: int = 12345) -> float:
        """The model's soft-tissue noise level as :func:`lib.noise.estimate_ct_noise_std_hu` measures a scan's: its
        estimator (:func:`lib.noise.flat_window_noise_std`, windows inside each patch) on ``n`` sampled patches at
        the given soft-tissue conditions (cycled; default 0..100 HU), clamped to the trained range; level
        correction included."""
        from ..noise import flat_window_noise_std

        lo, hi = self.condition_range_hu
        cond = np.asarray(condition_hu if condition_hu is not None and len(condition_hu) else
                          np.linspace(0.0, 100.0, 11), dtype=np.float32).reshape(-1)
        cond = np.clip(np.resize(cond, int(n)), lo, hi)
        level = flat_window_noise_std(self.sample_patches(cond, seed=seed))
        if level is None:  # a patch smaller than the smallest window: cannot happen for patch sizes >= 16
            raise ValueError(f"patches of {self.patch_size} px are too small to measure the noise level")
        return level

    def calibrate_level(self, measured_soft_tissue_std_hu: float,
                        condition_hu: np.ndarray | Sequence[float] | None = None) -> dict:
        """Set :attr:`level_correction` so that the model's soft-tissue level (:meth:`soft_tissue_level_hu`)
        equals ``measured_soft_tissue_std_hu`` (the low-dose scans' own, from
        :func:`lib.noise.estimate_ct_noise_std_hu`); the record is stored in ``training_stats["level_calibration"]``
        and returned. The std-vs-condition curve of the training statistics (used to take a normal-dose scan's own
        noise off, :meth:`noise_std_at`) is scaled alike."""
        measured = float(measured_soft_tissue_std_hu)
        if not (math.isfinite(measured) and measured > 0):
            raise ValueError(f"measured soft-tissue noise must be finite and > 0 HU, got {measured_soft_tissue_std_hu!r}")
        self.level_correction = 1.0
        learnt = self.soft_tissue_level_hu(condition_hu)
        if not learnt > 0:
            raise ValueError("the noise model samples no noise at soft-tissue conditions: cannot calibrate its level")
        self.level_correction = measured / learnt
        record = {"measured_soft_tissue_std_hu": measured, "learnt_soft_tissue_std_hu": learnt,
                  "calibrated_soft_tissue_std_hu": self.soft_tissue_level_hu(condition_hu),
                  "level_correction": self.level_correction,
                  "estimator": "median plane-fit variance in 25 x 25 windows carried over the mask by 5 x 5 windows "
                              "(lib.noise.estimate_ct_noise_std_hu)"}
        self.training_stats["level_calibration"] = record
        return record

    def noise_std_at(self, condition_hu: np.ndarray) -> np.ndarray:
        """Training-noise std (HU) at the given conditions, interpolated from the std-vs-condition curve of the
        training statistics (constant beyond its ends); the pooled std if the curve is missing."""
        curve = self.training_stats.get("std_curve") or {}
        c = np.asarray(curve.get("condition_hu", []), dtype=np.float64)
        s = np.asarray(curve.get("std_hu", []), dtype=np.float64)
        cond = np.asarray(condition_hu, dtype=np.float64)
        if c.size == 0:
            return np.full(cond.shape, float(self.training_stats.get("noise_std_hu", self.noise_scale_hu)) *
                           self.level_correction)
        return np.interp(cond, c, s) * self.level_correction

    def synthesise_noise_field(
        self,
        clean_hu: np.ndarray,
        seed: int | np.random.SeedSequence | None = 0,
        *,
        stride: int | None = None,
        pixel_size_mm: float | Sequence[float] | None = None,
        reference_noise_std_hu: float | None = None,
        batch_size: int = 256,
        progress: bool = False,
    ) -> np.ndarray:
        """Spatially correlated noise for a whole normal-dose image, conditioned on its local intensity.

        Tiles of ``P x P`` on a grid of step ``stride`` (default P / 2) are sampled independently, each at the
        Hann-weighted mean of ``clean_hu`` over the tile (clamped to the trained condition range), and overlap-
        added with variance-preserving weights (:class:`~lib.noise_learning.tiling.TileLayout`): the field has the
        sampled noise std at every pixel and no seams. Air follows the model's ``air_policy``.

        Args:
            clean_hu: normal-dose CT in HU, (H, W) or (Z, H, W); slices get independent noise.
            seed: int or SeedSequence (each slice gets its own child seed); same seed, same field.
            stride: tile step in pixels (a divisor of P, at most P / 2).
            pixel_size_mm: pixel size of ``clean_hu`` (number or (dy, dx)); a warning is logged if it differs from
                the training images' by more than 10 % (the noise texture is learnt in pixels).
            reference_noise_std_hu: noise std the normal-dose image already has; the field is scaled per pixel by
                ``sqrt(1 - sigma_ref^2 / sigma_model(c)^2)`` (0 where the model's noise is smaller) so that
                normal-dose noise plus field has the learnt low-dose noise variance.
            batch_size: tiles per network call.
            progress: tqdm bar over slices.

        Returns:
            float32 noise in HU, same shape as ``clean_hu``.
        """
        arr = np.asarray(clean_hu)
        if arr.ndim not in (2, 3):
            raise ValueError(f"clean_hu must be (H, W) or (Z, H, W), got shape {arr.shape}")
        vol = arr.astype(np.float32, copy=False)
        if not np.all(np.isfinite(vol)):
            raise ValueError("clean_hu contains NaN or infinite values")
        self._check_pixel_size(pixel_size_mm)
        squeeze = vol.ndim == 2
        if squeeze:
            vol = vol[None]
        p = self.patch_size
        s = int(stride) if stride is not None else p // 2
        ss = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
        children = ss.spawn(vol.shape[0])
        out = np.empty(vol.shape, dtype=np.float32)
        iterator = range(vol.shape[0])
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(iterator, desc="noise field", unit="slice")
        for z in iterator:
            out[z] = self._field_2d(vol[z], children[z], s, reference_noise_std_hu, batch_size)
        return out[0] if squeeze else out

    def _field_2d(self, clean: np.ndarray, seed: np.random.SeedSequence, stride: int,
                  reference_noise_std_hu: float | None, batch_size: int) -> np.ndarray:
        layout = TileLayout(clean.shape[0], clean.shape[1], self.patch_size, stride)
        lo, hi = self.condition_range_hu
        cond = np.clip(layout.window_means(clean), lo, hi).astype(np.float32)
        tiles = self._sample(cond, torch_generator(seed), batch_size)
        noise = layout.overlap_add(tiles)
        if reference_noise_std_hu is not None and float(reference_noise_std_hu) > 0:
            sigma = np.maximum(self.noise_std_at(layout.blend_values(cond)), 1e-6)
            noise *= np.sqrt(np.clip(1.0 - (float(reference_noise_std_hu) / sigma) ** 2, 0.0, 1.0)).astype(np.float32)
        if self.air_policy == "none":
            local = ndimage.uniform_filter(clean.astype(np.float32), size=5, mode="nearest")
            noise *= np.clip((local - _AIR_ZERO_HU) / (_AIR_HU - _AIR_ZERO_HU), 0.0, 1.0).astype(np.float32)
        return noise

    def _check_pixel_size(self, pixel_size_mm: float | Sequence[float] | None) -> None:
        if pixel_size_mm is None or self.pixel_size_mm is None:
            return
        given = [float(pixel_size_mm)] * 2 if np.isscalar(pixel_size_mm) else [float(v) for v in pixel_size_mm][-2:]
        ratio = math.sqrt(given[0] * given[1]) / math.sqrt(self.pixel_size_mm[0] * self.pixel_size_mm[1])
        if abs(ratio - 1.0) > 0.1:
            log.warning("noise model learnt at %.3f mm pixels, used on %.3f mm pixels: the noise texture "
                        "(learnt in pixels) will be %s than the scanner's", math.sqrt(
                            self.pixel_size_mm[0] * self.pixel_size_mm[1]), math.sqrt(given[0] * given[1]),
                        "finer" if ratio < 1 else "coarser")

    def level_record(self) -> dict:
        """The soft-tissue level calibration as reports give it: ``training_stats["level_calibration"]`` (the
        learnt and the scans' measured soft-tissue levels, HU, and ``level_correction``), else
        ``{"level_correction": ..., "skipped": why it was not calibrated}``."""
        return dict(self.training_stats.get("level_calibration") or {
            "level_correction": float(self.level_correction),
            "skipped": self.training_stats.get("level_calibration_skipped")})

    def summary(self) -> str:
        """One paragraph describing the model (for the command line)."""
        st = self.training_stats
        parts = [f"patch {self.patch_size} px", f"noise std {st.get('noise_std_hu', float('nan')):.1f} HU",
                 f"conditions {self.condition_range_hu[0]:.0f}..{self.condition_range_hu[1]:.0f} HU",
                 f"air policy {self.air_policy}"]
        nps = st.get("nps") or {}
        if "mean_frequency_cycles_per_pixel" in nps:
            parts.append(f"NPS mean frequency {nps['mean_frequency_cycles_per_pixel']:.3f} cycles/pixel")
        cal = st.get("level_calibration") or {}
        if cal:
            parts.append(f"soft-tissue noise {cal['calibrated_soft_tissue_std_hu']:.1f} HU = the low-dose scans' "
                         f"measured {cal['measured_soft_tissue_std_hu']:.1f} HU (learnt "
                         f"{cal['learnt_soft_tissue_std_hu']:.1f} HU, level x{cal['level_correction']:.2f})")
        elif st.get("level_calibration_skipped"):
            parts.append(f"soft-tissue level not calibrated ({st['level_calibration_skipped']})")
        fit = st.get("fit") or {}
        if fit:
            parts.append(f"samples vs training: std {100 * fit.get('std_relative_error', float('nan')):+.1f} %, "
                         f"NPS mean frequency {100 * fit.get('mean_frequency_relative_error', float('nan')):+.1f} %")
        return "; ".join(parts)
