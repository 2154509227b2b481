"""Noisy / clean training patches drawn from a training source (:mod:`lib.data.sources`).

:class:`ADLPatchDataset` (a map-style torch ``Dataset``) draws patches from a source with MONAI dictionary
transforms (``RandSpatialCropd``, ``RandFlipd``, ``RandRotate90d``, applied identically to noisy and clean),
normalised to [0, 1] by :func:`lib.data.intensity_scaling_for` (one scaling per volume for noisy and clean,
derived from the CLEAN volume), skipping patches that are almost all air / background. Sample ``i`` depends
only on ``(seed, i)`` and the source's current epoch, so training is reproducible and resumable without any
sampler state, and ranks of a multi-GPU run draw disjoint sample ids.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .sources import PairedFolderSource, SyntheticNoiseSource, foreground_threshold

__all__ = ["ADLPatchDataset"]


def _as_patch_size(patch_size: int | Sequence[int], spatial_dims: int) -> tuple[int, ...]:
    size = (int(patch_size),) * spatial_dims if isinstance(patch_size, (int, np.integer)) else tuple(int(s) for s in patch_size)
    if len(size) != spatial_dims:
        raise ValueError(f"patch size {patch_size} does not have {spatial_dims} dimensions")
    if any(s <= 0 or s % 8 for s in size):
        raise ValueError(f"patch size {size} must be positive multiples of 8 (the network down-samples three times)")
    return size


def _pad_to(array: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Reflect-pad the trailing spatial dims of (C, *spatial) up to at least ``size``."""
    spatial = array.shape[1:]
    if all(s >= t for s, t in zip(spatial, size)):
        return array
    pad = [(0, 0)] + [((max(t - s, 0)) // 2, max(t - s, 0) - max(t - s, 0) // 2) for s, t in zip(spatial, size)]
    mode = "reflect" if all(s > 1 for s in spatial) else "edge"
    return np.pad(array, pad, mode=mode)


class ADLPatchDataset(Dataset):
    """Noisy / clean training patches from a :class:`PairedFolderSource` or :class:`SyntheticNoiseSource`.

    Item ``i`` is a dict ``{"noisy": (1, *patch), "clean": (1, *patch)}`` of float32 tensors in [0, 1], plus
    ``"roi": (1, *patch)`` (lesion-aware weights in [0, 1] of the target slice) when any volume has a ``roi``
    (:func:`lib.data.intensity_scaling_for` of the clean volume, applied to both). It depends only on
    ``(seed, i)`` and the source's epoch: ``__getitem__`` accepts ANY non-negative index (``len`` is only the
    nominal epoch length, ``samples_per_epoch``), so a trainer can address samples by a global counter and
    resume exactly.

    Sampling: a volume with probability proportional to its number of usable (not all-air) slices; in 2D a
    slice of it; a low-dose CT realisation from the pool; then MONAI ``RandSpatialCropd`` (same crop of noisy
    and clean), re-drawn up to ``max_tries`` times while less than ``min_foreground`` of the clean patch is
    foreground (CT above -800 HU, MR above 5 % of the robust maximum; the best try is kept); pixel-domain
    noise on the clean patch where the source makes noise on the fly; with ``augment``, ``RandFlipd`` on every
    axis and ``RandRotate90d`` in-plane, identically for both keys. Images smaller than the patch are reflect-
    padded.

    Args:
        source: the volumes.
        spatial_dims: 2 (patches from slices) or 3 (patches from volumes).
        patch_size: int or per-axis sizes, multiples of 8 (3D: (Z, H, W)).
        samples_per_epoch: nominal length; also the epoch length over which a trainer regenerates the
            low-dose CT pool (:meth:`set_epoch`).
        seed: sampling seed.
        augment: random flips and 90-degree rotations.
        min_foreground: minimum foreground fraction of a patch.
        max_tries: crop attempts per sample.
        slice_context: 2D only: also give the ``slice_context`` slices on either side of the drawn slice as
            extra channels, for networks that see adjacent slices (``{"noisy", "clean"}`` are then
            (2 * slice_context + 1, *patch), the drawn slice in the middle; the volume's end slices are
            repeated beyond its ends). Slices are drawn where the whole stack is usable, so that every slice of
            a low-dose CT pool stack is a simulated one.
        roi_fraction: the fraction of samples (0..1) drawn around a region of interest (a lesion or a region a
            clinician marked "keep", ``TrainingVolume.roi`` > 0.5): a volume and a slice holding one, and a crop
            containing a random pixel of it, anywhere in the patch. A small marked structure would otherwise
            rarely fall in a random patch and its ROI loss would hardly act. 0 (default): plain random crops.
    """

    index_deterministic = True  # items depend on (seed, index) only: trainers may use global sample ids

    def __init__(
        self,
        source: PairedFolderSource | SyntheticNoiseSource,
        spatial_dims: int = 2,
        patch_size: int | Sequence[int] = 96,
        samples_per_epoch: int = 2000,
        seed: int = 0,
        augment: bool = True,
        min_foreground: float = 0.2,
        max_tries: int = 10,
        slice_context: int = 0,
        roi_fraction: float = 0.0,
    ) -> None:
        from monai.transforms import Compose, RandFlipd, RandRotate90d, RandSpatialCropd

        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if not source.volumes:
            raise ValueError("the training source holds no images")
        self.source = source
        self.spatial_dims = spatial_dims
        self.patch_size = _as_patch_size(patch_size, spatial_dims)
        self.samples_per_epoch = int(samples_per_epoch)
        if self.samples_per_epoch < 1:
            raise ValueError("samples_per_epoch must be >= 1")
        self.seed = int(seed)
        self.augment = bool(augment)
        self.min_foreground = float(min_foreground)
        self.max_tries = max(1, int(max_tries))
        self.modality = source.modality
        if spatial_dims == 3:
            too_thin = [v.name for v in source.volumes if v.clean.shape[0] < 2]
            if too_thin:
                raise ValueError(f"3D training needs volumes, but {', '.join(too_thin)} are single 2D slices")
        weights = np.array([len(v.usable_slices) for v in source.volumes], dtype=np.float64)
        self._volume_p = weights / weights.sum()
        self.slice_context = int(slice_context)
        if self.slice_context < 0 or (self.slice_context and spatial_dims != 2):
            raise ValueError(f"slice_context must be >= 0 and needs 2D patches, got {slice_context} ({spatial_dims}D)")
        self._centres = [_stack_centres(v.usable_slices, v.clean.shape[0], self.slice_context)
                         for v in source.volumes]
        self._has_noisy = not source.noise_on_the_fly
        # "roi": lesion-aware training weights (TrainingVolume.roi), cropped and augmented with the images
        self._has_roi = any(v.roi is not None for v in source.volumes)
        if not 0.0 <= float(roi_fraction) <= 1.0:
            raise ValueError(f"roi_fraction must be in [0, 1], got {roi_fraction}")
        self.roi_fraction = float(roi_fraction)
        # per volume, the slices (2D: centre slices) holding a region of interest
        self._roi_slices = [np.flatnonzero(v.roi.reshape(v.roi.shape[0], -1).max(axis=1) > 0.5)
                            if v.roi is not None else np.zeros(0, dtype=np.int64) for v in source.volumes]
        self._roi_volumes = np.array([i for i, z in enumerate(self._roi_slices) if z.size], dtype=np.int64)
        keys = ["noisy", "clean", "roi"] if self._has_roi else ["noisy", "clean"]
        self._crop_both = RandSpatialCropd(keys=keys, roi_size=self.patch_size, random_size=False)
        self._crop_clean = RandSpatialCropd(keys=[k for k in keys if k != "noisy"], roi_size=self.patch_size,
                                            random_size=False)
        augment_transforms = [RandFlipd(keys=keys, prob=0.5, spatial_axis=axis) for axis in range(spatial_dims)]
        inplane = (0, 1) if spatial_dims == 2 else (1, 2)
        augment_transforms.append(RandRotate90d(keys=keys, prob=0.75, max_k=3, spatial_axes=inplane))
        self._augment = Compose(augment_transforms)

    def __len__(self) -> int:
        return self.samples_per_epoch

    def set_epoch(self, epoch: int) -> None:
        """Forwarded to the source (regenerates the low-dose CT pool when configured to)."""
        self.source.set_epoch(epoch)

    def _draw_window(self, rng: np.random.Generator, around_roi: bool = False
                     ) -> tuple[int, np.ndarray, np.ndarray | None, np.ndarray | None]:
        if around_roi:
            v = int(rng.choice(self._roi_volumes))
        else:
            v = int(rng.choice(len(self.source.volumes), p=self._volume_p))
        vol = self.source.volumes[v]
        noisy_full = None
        if self._has_noisy:
            if isinstance(self.source, SyntheticNoiseSource):
                noisy_full = self.source.noisy_volume(v, int(rng.integers(self.source.realisations)))
            else:
                noisy_full = self.source.noisy_volume(v)
        if self.spatial_dims == 2:
            z = int(rng.choice(self._roi_slices[v] if around_roi else self._centres[v]))
            zs = np.clip(np.arange(z - self.slice_context, z + self.slice_context + 1), 0, vol.clean.shape[0] - 1)
            clean = vol.clean[zs]
            noisy = None if noisy_full is None else noisy_full[zs]
            roi = None if vol.roi is None else vol.roi[z:z + 1]  # the target's (centre slice's) regions
        else:
            clean = vol.clean[None]
            noisy = None if noisy_full is None else noisy_full[None]
            roi = None if vol.roi is None else vol.roi[None]
        return v, clean, noisy, roi

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        index = int(index)
        if index < 0:
            raise IndexError(f"sample index must be >= 0, got {index}")
        rng = np.random.default_rng([self.seed, index])
        # the extra draw only when ROI sampling is on, so that plain datasets keep their samples
        around_roi = bool(self.roi_fraction and self._roi_volumes.size and rng.random() < self.roi_fraction)
        v, clean, noisy, roi = self._draw_window(rng, around_roi)
        vol = self.source.volumes[v]
        scaling = vol.scaling
        threshold = foreground_threshold(scaling)
        clean = _pad_to(clean, self.patch_size)
        data = {"clean": clean} if noisy is None else {"clean": clean, "noisy": _pad_to(noisy, self.patch_size)}
        if self._has_roi:
            # the ROI has one channel (the target slice's) whatever the slice context of the images
            data["roi"] = _pad_to(np.zeros((1, *clean.shape[1:]), np.float32) if roi is None else roi, self.patch_size)
        crop = self._crop_clean if noisy is None else self._crop_both

        best, best_fraction = None, -1.0
        if around_roi:
            best = _crop_around(data, np.argwhere(data["roi"][0] > 0.5), self.patch_size, rng)
        for _ in range(0 if around_roi else self.max_tries):
            crop.set_random_state(seed=int(rng.integers(2**31 - 1)))
            patch = {k: np.asarray(_to_numpy(t), dtype=np.float32) for k, t in crop(dict(data)).items()}
            fraction = float((scaling.normalise(patch["clean"]) > threshold).mean())
            if fraction > best_fraction:
                best, best_fraction = patch, fraction
            if fraction >= self.min_foreground:
                break
        assert best is not None
        if "noisy" not in best:
            best["noisy"] = self.source.add_noise(v, best["clean"], rng)
        sample = {k: scaling.normalise(best[k]) for k in ("noisy", "clean")}
        out_keys = ("noisy", "clean")
        if self._has_roi:
            sample["roi"] = np.clip(best["roi"], 0.0, 1.0)
            out_keys = ("noisy", "clean", "roi")
        if self.augment:
            self._augment.set_random_state(seed=int(rng.integers(2**31 - 1)))
            sample = self._augment(sample)
        return {k: torch.as_tensor(np.ascontiguousarray(_to_numpy(sample[k]), dtype=np.float32)) for k in out_keys}


def _crop_around(data: dict[str, np.ndarray], points: np.ndarray, size: Sequence[int],
                 rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The same ``size`` crop of every (C, *spatial) array of ``data``, placed so that it contains one of ``points``
    (N, spatial_dims), drawn at random, at a random position within the patch."""
    point = points[int(rng.integers(len(points)))]
    spatial = next(iter(data.values())).shape[1:]
    starts = [int(np.clip(int(p) - int(rng.integers(t)), 0, n - t)) for p, t, n in zip(point, size, spatial)]
    window = (slice(None),) + tuple(slice(a, a + t) for a, t in zip(starts, size))
    return {k: np.ascontiguousarray(a[window], dtype=np.float32) for k, a in data.items()}


def _stack_centres(usable: np.ndarray, depth: int, context: int) -> np.ndarray:
    """Usable slices whose whole stack (+-``context``, clipped to the volume) is usable; all usable if none is."""
    if context == 0:
        return usable
    allowed = set(int(z) for z in usable)
    centres = [int(z) for z in usable
               if all(int(c) in allowed for c in np.clip(np.arange(z - context, z + context + 1), 0, depth - 1))]
    return np.asarray(centres, dtype=np.int64) if centres else usable


def _to_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)
