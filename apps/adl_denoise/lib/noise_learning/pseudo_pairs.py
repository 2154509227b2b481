"""Pseudo low-dose / normal-dose training pairs: normal-dose images plus noise sampled from a learned model.

* :func:`synthesise_pseudo_low_dose` - ``clean + NoiseModel.synthesise_noise_field(clean)``, clipped like the
  scanner's images where the training low-dose images were clipped.
* :class:`LearnedNoiseSource` - a training source with the interface of :class:`lib.data.SyntheticNoiseSource`
  (``volumes``, ``modality``, ``noise``, ``realisations``, ``noise_on_the_fly``, ``noisy_volume``, ``set_epoch``,
  ``validation_pairs``), so :class:`lib.data.ADLPatchDataset` - and any trainer built on it - trains on TDDL pairs
  without change ("plug-and-play"). It is a subclass of ``SyntheticNoiseSource`` (file discovery, reading, the
  held-out guard and the per-volume bookkeeping are shared), with the sinogram simulation replaced by the
  learned noise: per clean slice (2D) or volume (3D) it keeps a pool of ``realisations`` pseudo low-dose versions,
  optionally regenerated each epoch.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from ..data import SyntheticNoiseSource, ValidationPair, check_not_heldout
from .noise_model import NoiseModel

__all__ = ["synthesise_pseudo_low_dose", "LearnedNoiseSource", "noise_added_line"]

log = logging.getLogger(__name__)


def _clip_range(model: NoiseModel) -> tuple[float | None, float | None]:
    """The scanner's clip floor (a clip value <= -1000 HU) and ceiling (>= 2000 HU) seen in the training data."""
    floors = [v for v in model.clip_values_hu if v <= -1000.0]
    ceilings = [v for v in model.clip_values_hu if v >= 2000.0]
    return (max(floors) if floors else None), (min(ceilings) if ceilings else None)


def synthesise_pseudo_low_dose(
    clean_hu: np.ndarray,
    noise_model: NoiseModel | str | os.PathLike,
    seed: int | np.random.SeedSequence | None = 0,
    *,
    pixel_size_mm: float | Sequence[float] | None = None,
    reference_noise_std_hu: float | None = None,
    clip_to_scanner_range: bool = True,
    stride: int | None = None,
    device: str = "cpu",
    progress: bool = False,
) -> np.ndarray:
    """Pseudo low-dose CT = normal-dose CT + learned noise field.

    Args:
        clean_hu: normal-dose CT in HU, (H, W) or (Z, H, W).
        noise_model: a :class:`NoiseModel` or the path of a saved one (loaded on ``device``).
        seed: same seed, same pseudo low-dose image.
        pixel_size_mm: pixel size of ``clean_hu`` (checked against the model's training pixel size).
        reference_noise_std_hu: noise std the normal-dose image already has (see
            :meth:`NoiseModel.synthesise_noise_field`); None adds the whole learnt low-dose noise.
        clip_to_scanner_range: clip the result at the clip values found in the training low-dose images (e.g.
            -1024 HU) so that air looks like the scanner's.
        stride: tile step of the noise field (default P / 2).
        device: device to load a model path on.
        progress: tqdm bar over slices.

    Returns:
        float32 array of the shape of ``clean_hu``, HU.
    """
    model = noise_model if isinstance(noise_model, NoiseModel) else NoiseModel.load(noise_model, device=device)
    clean = np.asarray(clean_hu, dtype=np.float32)
    field = model.synthesise_noise_field(clean, seed, stride=stride, pixel_size_mm=pixel_size_mm,
                                         reference_noise_std_hu=reference_noise_std_hu, progress=progress)
    out = clean + field
    if clip_to_scanner_range:
        floor, ceiling = _clip_range(model)
        if floor is not None or ceiling is not None:
            out = np.clip(out, floor, ceiling)
    return out.astype(np.float32, copy=False)


class LearnedNoiseSource(SyntheticNoiseSource):
    """Clean (normal-dose) CT images with noise from a learned TDDL noise model.

    Args:
        clean_paths: image files / folders (see :func:`lib.data.discover_images`); held-out files are refused.
        noise_model_path: a file written by ``cli.py learn-noise`` / :meth:`NoiseModel.save`.
        realisations: pseudo low-dose versions per clean slice (2D) or volume (3D) in the pool.
        seed: root seed of the noise.
        modality: must be "CT" (the model is learnt in HU).
        spatial_dims: 2 (pool made for the usable slices only) or 3 (whole volumes; slices get independent
            noise: the model is 2D).
        regenerate_each_epoch: a new pool each epoch (:meth:`set_epoch`).
        reference_noise_std_hu: noise std of the clean images, removed from the added noise (see
            :func:`synthesise_pseudo_low_dose`): a number for all, ``"estimate"`` for each image's own
            (:func:`lib.noise.estimate_ct_noise_std_hu`; :attr:`reference_noise_std_per_volume` keeps them), or None
            (the whole learnt noise is added). ``"estimate"`` where the clean images are real scans (normal-dose
            images carry noise of their own: added to it, the learnt noise, itself the scanner's whole low-dose
            noise, would give more noise than the scanner's, e.g. 36 HU for a learnt 32 HU over 17 HU); None where
            they are a denoiser's outputs (denoised stand-ins hold residual texture, not noise).
        clip_to_scanner_range: see :func:`synthesise_pseudo_low_dose`.
        device: device of the noise model.
        progress: tqdm bar while the pool is made.
        build_pool: make the pool now (default) or at the first :meth:`set_epoch` / :meth:`noisy_volume`.
        allow_heldout_noise_inputs: accept a noise model learnt from held-out LOW-DOSE images. Only for the
            domain-shift benchmark (``bench/tddl_domain_shift.py``), which adapts to the test scans' own low-dose
            images, reference never read, as a hospital would; its models are never shipped. The clean images
            are still checked.
        max_voxels: the voxel limit of every read of a clean image (None: :func:`lib.imaging.max_voxels`).

    Raises:
        ValueError: non-CT modality, held-out files (clean images or, unless allowed, the noise model's own
            training inputs), no images, an unreadable noise model.
    """

    def __init__(
        self,
        clean_paths: str | os.PathLike | Sequence[str | os.PathLike],
        noise_model_path: str | os.PathLike,
        realisations: int = 2,
        seed: int = 0,
        *,
        modality: str = "CT",
        spatial_dims: int = 2,
        regenerate_each_epoch: bool = False,
        reference_noise_std_hu: float | str | None = None,
        clip_to_scanner_range: bool = True,
        device: str = "cpu",
        progress: bool = True,
        build_pool: bool = True,
        allow_heldout_noise_inputs: bool = False,
        max_voxels: int | None = None,
    ) -> None:
        if modality is None or str(modality).upper() != "CT":
            raise ValueError(f"learned noise models are CT (HU) models; got modality {modality!r}")
        self.noise_model_path = Path(noise_model_path).expanduser()
        self.noise_model = NoiseModel.load(self.noise_model_path, device=device)
        inputs = self.noise_model.info.get("inputs") or []
        if inputs and not allow_heldout_noise_inputs:
            check_not_heldout(inputs)  # a model learnt on held-out scans must not feed training either
        super().__init__(clean_paths, "CT", "ct-lowdose", spatial_dims=spatial_dims, realisations=realisations,
                         regenerate_each_epoch=regenerate_each_epoch, seed=seed, device=device, progress=progress,
                         build_pool=False, max_voxels=max_voxels)
        self.noise = "learned"
        if isinstance(reference_noise_std_hu, str) and reference_noise_std_hu != "estimate":
            raise ValueError(f"reference_noise_std_hu must be a number, 'estimate' or None, got "
                             f"{reference_noise_std_hu!r}")
        self.reference_noise_std_hu = reference_noise_std_hu
        #: per volume (the order of ``volumes``): the noise std (HU) taken off the added noise (None: none)
        self.reference_noise_std_per_volume: list[float | None] = []
        for vol in self.volumes:
            if reference_noise_std_hu == "estimate":
                from ..noise import estimate_ct_noise_std_hu

                std = estimate_ct_noise_std_hu(vol.clean)
            else:
                std = None if reference_noise_std_hu is None else float(reference_noise_std_hu)
            self.reference_noise_std_per_volume.append(std)
        self._reference_std = {id(vol): std for vol, std in zip(self.volumes, self.reference_noise_std_per_volume)}
        self.clip_to_scanner_range = bool(clip_to_scanner_range)
        if build_pool:
            self.set_epoch(0)

    # --- the interface ADLPatchDataset uses
    @property
    def noise_on_the_fly(self) -> bool:
        return False

    def noisy_volume(self, index: int, realisation: int = 0) -> np.ndarray:
        """Pseudo low-dose volume (Z, H, W) HU of clean volume ``index``, realisation ``realisation``."""
        if not self._pool:
            self.set_epoch(0)
        return self._pool[index][realisation]

    def set_epoch(self, epoch: int) -> None:
        """Make the pool of this epoch (only once unless ``regenerate_each_epoch``)."""
        epoch = int(epoch) if self.regenerate_each_epoch else 0
        if self.epoch == epoch and self._pool:
            return
        self._pool = self._make_pool(epoch)
        self.epoch = epoch

    def add_noise(self, volume_index: int, clean: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Learned noise on a clean patch or image (HU), seeded from ``rng``."""
        seed = np.random.SeedSequence(int(rng.integers(2**63 - 1)))
        return self._pseudo(self.volumes[volume_index], clean, seed)

    def _pseudo(self, vol, clean: np.ndarray, seed: np.random.SeedSequence) -> np.ndarray:
        return synthesise_pseudo_low_dose(clean, self.noise_model, seed, pixel_size_mm=vol.pixel_size_mm,
                                          reference_noise_std_hu=self._reference_std.get(id(vol)),
                                          clip_to_scanner_range=self.clip_to_scanner_range)

    def _make_pool(self, epoch: int) -> list[np.ndarray]:
        from tqdm.auto import tqdm

        pool = []
        total = sum(len(v.usable_slices) if self.spatial_dims == 2 else v.clean.shape[0] for v in self.volumes)
        bar = tqdm(total=total * self.realisations, desc=f"learned-noise pool (epoch {epoch})", unit="slice",
                   disable=not self.progress, dynamic_ncols=True)
        try:
            for v, vol in enumerate(self.volumes):
                noisy = np.repeat(vol.clean[None], self.realisations, axis=0)
                slices = vol.usable_slices if self.spatial_dims == 2 else np.arange(vol.clean.shape[0])
                for r in range(self.realisations):
                    seed = np.random.SeedSequence([self.seed, epoch, v, r])
                    noisy[r][slices] = self._pseudo(vol, vol.clean[slices], seed)
                    bar.update(len(slices))
                pool.append(noisy)
        finally:
            bar.close()
        return pool

    def noise_per_image(self) -> list[dict]:
        """Per clean image (the order of ``volumes``), in HU: ``learnt_noise_std_hu``, the learnt low-dose noise
        std at the image's soft tissue (the model's std-vs-intensity curve at the median of its -100..200 HU
        voxels, the pooled std where it has none); ``own_noise_std_hu``, the noise the image already carries, taken
        off (None: nothing taken off); ``added_noise_std_hu``, what is added there, ``sqrt(learnt^2 - own^2)`` (0
        where the image is as noisy already: its pseudo pairs then hold no noise to learn to remove). What
        ``cli.py adapt`` reports (``pseudo_pairs.noise_per_image``) and the server's ``adapt_noise`` status."""
        lo, hi = self.noise_model.condition_range_hu
        pooled = float(self.noise_model.training_stats.get("noise_std_hu", self.noise_model.noise_scale_hu))
        rows = []
        for vol, own in zip(self.volumes, self.reference_noise_std_per_volume):
            tissue = vol.clean[(vol.clean >= -100.0) & (vol.clean <= 200.0)]
            learnt = (float(self.noise_model.noise_std_at(np.clip(np.median(tissue), lo, hi)))
                      if tissue.size else pooled)
            added = learnt if own is None else float(np.sqrt(max(0.0, learnt ** 2 - float(own) ** 2)))
            rows.append({"image": str(vol.path), "learnt_noise_std_hu": round(learnt, 1),
                         "own_noise_std_hu": None if own is None else round(float(own), 1),
                         "added_noise_std_hu": round(added, 1)})
        return rows

    def validation_pairs(self, seed: int | None = None) -> list[ValidationPair]:
        """One fixed pseudo low-dose realisation of every whole image (default seed: the source's + 1_000_003)."""
        seed = self.seed + 1_000_003 if seed is None else int(seed)
        pairs = []
        for v, vol in enumerate(self.volumes):
            noisy = self._pseudo(vol, vol.clean, np.random.SeedSequence([seed, v]))
            squeeze = (lambda a: a[0] if a.ndim == 3 and a.shape[0] == 1 else a)
            pairs.append(ValidationPair(vol.name, squeeze(noisy), squeeze(vol.clean), self.modality,
                                        vol.pixel_size_mm))
        return pairs


def noise_added_line(rows: Sequence[dict]) -> str:
    """One line of :meth:`LearnedNoiseSource.noise_per_image` rows: the learnt noise, the images' own noise taken
    off and the noise added (ranges over the images, HU), and the images to which nothing is added (as noisy as the
    learnt noise already: low-dose scans given as normal-dose ones?)."""
    if not rows:
        return "no clean images"

    def span(key: str) -> str:
        values = sorted(float(r[key]) for r in rows if r.get(key) is not None)
        return f"{values[0]:.1f}" if values[0] == values[-1] else f"{values[0]:.1f}-{values[-1]:.1f}"

    learnt = span("learnt_noise_std_hu")
    if all(r.get("own_noise_std_hu") is None for r in rows):
        return f"pseudo pairs: learnt noise {learnt} HU added whole (nothing taken off: the clean images are a " \
               f"denoiser's outputs, or carry no soft tissue to measure their own noise in)"
    line = (f"pseudo pairs: learnt noise {learnt} HU in soft tissue, less each clean image's own noise "
            f"{span('own_noise_std_hu')} HU: {span('added_noise_std_hu')} HU added ({len(rows)} image(s))")
    unmeasured = sum(r.get("own_noise_std_hu") is None for r in rows)
    if unmeasured:
        line += f"; {unmeasured} image(s) with no soft tissue to measure their own noise in: the whole noise added"
    nothing = [Path(str(r["image"])).name for r in rows if float(r["added_noise_std_hu"]) == 0.0]
    if nothing:
        line += (f"; WARNING: nothing added to {len(nothing)} image(s) as noisy as the learnt noise already "
                 f"({', '.join(nothing[:3])}{', ...' if len(nothing) > 3 else ''}): are they low-dose scans?")
    return line
