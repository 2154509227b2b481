"""Sources of noisy / clean training volumes for the denoisers, and full-image validation pairs.

* :class:`PairedFolderSource` - real pairs (e.g. low-dose / normal-dose scans) in two folders matched by file-name
  stem, or given explicitly (a datastore's images and their corrected labels).
* :class:`SyntheticNoiseSource` - clean images only; the noise is synthesised by the physics in
  :mod:`lib.noise` at randomly drawn levels: low-dose CT in the sinogram domain (dose, reconstruction filter,
  cut-off, view count and detector bin drawn per slice over wide ranges), Rician MR noise, or generic
  Gaussian / Poisson / speckle noise. Low-dose CT is expensive to simulate, so it is generated per whole slice
  into a POOL of ``realisations`` noisy versions per clean slice (optionally regenerated each epoch and cached
  as .npy files keyed by a hash of the seed, the settings and the slice content); the cheap pixel-domain
  noises are drawn on the fly for every patch (:class:`lib.data.patches.ADLPatchDataset`).

Every source holds :class:`TrainingVolume` objects (modality units, CT in HU, (Z, H, W)) with the intensity
scaling of their clean image, and checks every input path against the held-out benchmark split
(:func:`lib.data.heldout.check_not_heldout`) before reading it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ..imaging import read_volume
from ..runtime.atomic import atomic_numpy_save
from .files import discover_images, image_stem, list_folder_images
from .heldout import check_not_heldout
from .intensity import CT_RANGE_HU, MR_HEADROOM, IntensityScaling, intensity_scaling_for

__all__ = [
    "CT_FOREGROUND_HU",
    "DEFAULT_NOISE_LEVELS",
    "MR_FOREGROUND_FRACTION",
    "NOISE_KINDS",
    "RICIAN_VALIDATION_PERCENT",
    "PairedFolderSource",
    "SyntheticNoiseSource",
    "TrainingVolume",
    "ValidationPair",
    "foreground_threshold",
]

log = logging.getLogger(__name__)

#: Synthetic noise kinds of :class:`SyntheticNoiseSource` (``auto``: low-dose CT for CT, Rician for MR).
NOISE_KINDS = ("auto", "ct-lowdose", "rician", "gaussian", "poisson", "speckle")
#: 2: the simulated low-dose CT noise lost its log bias (lib.noise.ct_lowdose), so version-1 slices are stale
_CACHE_VERSION = 2

#: Rician level of validation pairs, % of the maximum: fixed (as CT's quarter dose) so validations compare
RICIAN_VALIDATION_PERCENT = 5.0

#: Default noise-level ranges per noise kind (and modality where the unit differs). See SyntheticNoiseSource.
DEFAULT_NOISE_LEVELS: dict[str, tuple[float, float]] = {
    "rician": (1.0, 9.0),  # sigma in % of the volume maximum (BrainWeb convention)
    "gaussian-CT": (5.0, 50.0),  # sigma in HU
    "gaussian": (1.0, 9.0),  # sigma in % of the volume maximum
    "poisson": (50.0, 2000.0),  # counts at the image maximum (log-uniform)
    "speckle": (0.02, 0.15),  # relative std
    # added-noise std in soft tissue, HU (calibrated flux, log-uniform): from a mild dose reduction to
    # well beyond the 22-65 HU of real quarter-dose abdominal scans
    "ct-lowdose": (10.0, 60.0),
}
#: Foreground (non-air) limit used to reject background patches: CT in HU; MR as a fraction of the
#: robust maximum (the 99.5th percentile).
CT_FOREGROUND_HU = -800.0
MR_FOREGROUND_FRACTION = 0.05


@dataclass
class TrainingVolume:
    """One training image held in memory.

    Attributes:
        name: file-name stem.
        clean: clean image in the modality's units (CT in HU), float32 (Z, H, W) (a 2D image has Z = 1).
        noisy: matching noisy image (paired data) or None (synthetic noise).
        modality: "CT" or "MR" (or "OT", scaled like MR).
        spacing: voxel size in mm, (x, y, z) order.
        scaling: intensity scaling of noisy and clean, from the clean image.
        path: where the clean image was read from.
        usable_slices: indices of slices with enough foreground to draw 2D patches from.
        roi: optional (Z, H, W) float32 weights in [0, 1], the regions where lesion-aware losses apply: the
            profiles of inserted synthetic lesions, or structures a clinician marked "keep"; None = none.
        lesions: the synthetic lesions inserted into ``clean`` (per slice index), for the record.
    """

    name: str
    clean: np.ndarray
    noisy: np.ndarray | None
    modality: str
    spacing: tuple[float, float, float]
    scaling: IntensityScaling
    path: Path | None = None
    usable_slices: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    roi: np.ndarray | None = None
    lesions: dict[int, list] = field(default_factory=dict)

    @property
    def pixel_size_mm(self) -> tuple[float, float]:
        """In-plane (row, column) = (y, x) pixel size."""
        return float(self.spacing[1]), float(self.spacing[0])


@dataclass
class ValidationPair:
    """A full noisy / clean image (modality units, (H, W) or (Z, H, W)) for validation; ``pixel_size_mm``: its
    in-plane (row, column) pixel size, None where unknown (arrays given without their image)."""

    name: str
    noisy: np.ndarray
    clean: np.ndarray
    modality: str
    pixel_size_mm: tuple[float, float] | None = None


def foreground_threshold(scaling: IntensityScaling) -> float:
    """Normalised value above which a voxel counts as foreground (not air / background)."""
    if scaling.modality == "CT":
        return float((CT_FOREGROUND_HU - scaling.offset) / scaling.scale)
    return MR_FOREGROUND_FRACTION / MR_HEADROOM


def _resolve_modality(modality: str | None, read_modality: str, path: Path) -> str:
    if modality is not None:
        m = modality.upper()
        if m not in ("CT", "MR", "OT"):
            raise ValueError(f"modality must be CT or MR, got {modality!r}")
        return m
    if read_modality in ("CT", "MR"):
        return read_modality
    raise ValueError(f"cannot tell whether {path} is CT or MR: give the modality")


def _load_volume(path: Path, modality: str | None,
                 max_voxels: int | None = None) -> tuple[np.ndarray, str, tuple[float, float, float]]:
    volume = read_volume(path, modality=None if modality is None else modality.upper(), max_voxels=max_voxels)
    if modality is not None and volume.metadata.get("modality_source") == "dicom" and \
            volume.modality != modality.upper():  # the tag decides: an MR trained as CT learns the wrong noise
        raise ValueError(f"{path} is a DICOM {volume.modality} (its Modality tag), not {modality.upper()}: train "
                         "one model per modality")
    mod = _resolve_modality(modality, volume.modality, path)
    array = volume.array.astype(np.float32)
    spacing = tuple(float(s) for s in volume.spacing)
    if array.ndim == 2:
        array = array[None]
        spacing = spacing + (1.0,)
    if volume.is_constant:
        raise ValueError(f"{path} holds a constant image: nothing to learn from")
    return np.ascontiguousarray(array), mod, spacing  # type: ignore[return-value]


def _usable_slices(clean: np.ndarray, scaling: IntensityScaling, min_fraction: float = 0.02) -> np.ndarray:
    threshold = foreground_threshold(scaling)
    fractions = np.array([(scaling.normalise(s) > threshold).mean() for s in clean])
    usable = np.nonzero(fractions >= min_fraction)[0]
    return usable if usable.size else np.arange(clean.shape[0])


def _check_same_modality(volumes: Sequence[TrainingVolume]) -> str:
    modalities = sorted({v.modality for v in volumes})
    if len(modalities) > 1:
        names = ", ".join(f"{v.name} ({v.modality})" for v in volumes)
        raise ValueError(f"training images mix modalities {modalities}: one model per modality ({names})")
    return modalities[0]


class PairedFolderSource:
    """Real noisy / clean pairs from two folders, matched by file-name stem.

    Each folder holds images in any format :func:`lib.imaging.read_volume` reads (NIfTI, NRRD, MHA, single
    DICOM files) and/or DICOM series as subfolders. ``noisy/case1.nii.gz`` pairs with ``clean/case1.nrrd``;
    a series folder ``noisy/case2/`` with ``clean/case2/``. Every name must have a partner and both images of
    a pair the same shape (ValueError listing what is wrong otherwise).

    Args:
        noisy_dir, clean_dir: the two folders.
        modality: "CT" or "MR"; None takes it from the files (DICOM tag, else guessed from the values).
        load: read the images now (default); ``volumes`` is empty until :meth:`load` otherwise.
        max_voxels: the voxel limit of every read (None: :func:`lib.imaging.max_voxels`); a server's fine-tuning
            reads at the server's limit (``--conf max_voxels``).
    """

    def __init__(self, noisy_dir: str | os.PathLike, clean_dir: str | os.PathLike, modality: str | None = None,
                 load: bool = True, max_voxels: int | None = None) -> None:
        self.noisy_dir, self.clean_dir = Path(noisy_dir).expanduser(), Path(clean_dir).expanduser()
        for folder, what in ((self.noisy_dir, "noisy"), (self.clean_dir, "clean")):
            if not folder.is_dir():
                raise ValueError(f"{what} folder {folder} does not exist or is not a folder")
        check_not_heldout([self.noisy_dir, self.clean_dir])
        noisy = self._by_stem(self.noisy_dir)
        clean = self._by_stem(self.clean_dir)
        if not noisy:
            raise ValueError(f"no images in the noisy folder {self.noisy_dir}")
        if not clean:
            raise ValueError(f"no images in the clean folder {self.clean_dir}")
        only_noisy, only_clean = sorted(set(noisy) - set(clean)), sorted(set(clean) - set(noisy))
        if only_noisy or only_clean:
            parts = []
            if only_noisy:
                parts.append(f"noisy only: {', '.join(only_noisy)}")
            if only_clean:
                parts.append(f"clean only: {', '.join(only_clean)}")
            raise ValueError(f"unmatched noisy/clean names ({'; '.join(parts)}); pairs are matched by file-name stem")
        self._use_pairs([(n, noisy[n], clean[n]) for n in sorted(noisy)], modality, load, max_voxels)

    def _use_pairs(self, pairs: list[tuple[str, Path, Path]], modality: str | None, load: bool,
                   max_voxels: int | None) -> None:
        self.pairs = pairs
        self.max_voxels = max_voxels
        check_not_heldout([p for _, a, b in self.pairs for p in (a, b)])
        self.modality = None if modality is None else modality.upper()
        self.volumes: list[TrainingVolume] = []
        if load:
            self.load()

    @classmethod
    def from_files(cls, pairs: Sequence[tuple[str, str | os.PathLike, str | os.PathLike]],
                   modality: str | None = None, load: bool = True,
                   max_voxels: int | None = None) -> "PairedFolderSource":
        """Pairs given explicitly as ``(name, noisy_path, clean_path)``, e.g. a datastore's images and their
        corrected labels, instead of two folders matched by name; ``max_voxels`` as for the folders."""
        if not pairs:
            raise ValueError("no noisy/clean pairs given")
        names = [str(n) for n, _, _ in pairs]
        if len(set(names)) != len(names):
            raise ValueError(f"pair names must be unique, got {names}")
        resolved = [(str(n), Path(a).expanduser(), Path(b).expanduser()) for n, a, b in pairs]
        for name, noisy, clean in resolved:
            for path, what in ((noisy, "noisy"), (clean, "clean")):
                if not path.exists():
                    raise ValueError(f"pair {name!r}: {what} image {path} does not exist")
        self = cls.__new__(cls)
        self.noisy_dir = self.clean_dir = None
        self._use_pairs(resolved, modality, load, max_voxels)
        return self

    @staticmethod
    def _by_stem(folder: Path) -> dict[str, Path]:
        out: dict[str, Path] = {}
        for path in list_folder_images(folder):
            stem = image_stem(path)
            if stem in out:
                raise ValueError(f"two images in {folder} share the name {stem!r}: {out[stem].name}, {path.name}")
            out[stem] = path
        return out

    def load(self) -> list[TrainingVolume]:
        volumes = []
        for name, noisy_path, clean_path in self.pairs:
            clean, modality, spacing = _load_volume(clean_path, self.modality, self.max_voxels)
            noisy, _, _ = _load_volume(noisy_path, modality, self.max_voxels)
            if noisy.shape != clean.shape:
                raise ValueError(f"pair {name!r}: noisy {noisy_path.name} has shape {noisy.shape[-3:]} but clean "
                                 f"{clean_path.name} has {clean.shape}")
            _check_same_grid(name, noisy_path, clean_path, self.max_voxels)
            scaling = intensity_scaling_for(clean, modality)
            volumes.append(TrainingVolume(name, clean, noisy, modality, spacing, scaling, clean_path,
                                          _usable_slices(clean, scaling)))
        self.modality = _check_same_modality(volumes)
        self.volumes = volumes
        return volumes

    # --- the interface ADLPatchDataset uses
    def noisy_volume(self, index: int) -> np.ndarray | None:
        return self.volumes[index].noisy

    def set_epoch(self, epoch: int) -> None:  # nothing to regenerate for real pairs
        return None

    @property
    def noise_on_the_fly(self) -> bool:
        return False

    def validation_pairs(self) -> list[ValidationPair]:
        """Every pair as a full-image :class:`ValidationPair` (2D images as (H, W))."""
        return [ValidationPair(v.name, _squeeze(v.noisy), _squeeze(v.clean), v.modality, v.pixel_size_mm)
                for v in self.volumes]


def _check_same_grid(name: str, noisy_path: Path, clean_path: Path, max_voxels: int | None = None) -> None:
    """ValueError unless the two images of a pair lie on one grid (spacing, origin, direction within 1e-3): pairs
    are trained voxel by voxel, so a mirrored or shifted partner teaches the network other anatomy."""
    from ..imaging.io import read_grid

    noisy, clean = read_grid(noisy_path, max_voxels), read_grid(clean_path, max_voxels)
    flips = noisy.flips_onto(clean)
    if flips == ():
        return
    how = (f"the same voxels in another order (array axes {list(flips)} reversed)" if flips is not None else
           f"another grid ({noisy.describe()}; clean: {clean.describe()})")
    raise ValueError(f"pair {name!r}: noisy {noisy_path.name} lies on {how}: save both on one grid")


def _squeeze(array: np.ndarray) -> np.ndarray:
    return array[0] if array.ndim == 3 and array.shape[0] == 1 else array


class SyntheticNoiseSource:
    """Clean images with noise synthesised by the physics of :mod:`lib.noise`.

    Args:
        clean_paths: image files / folders (see :func:`discover_images`).
        modality: "CT" or "MR".
        noise: ``"auto"`` (CT -> ``"ct-lowdose"``, MR -> ``"rician"``), ``"ct-lowdose"``, ``"rician"``,
            ``"gaussian"``, ``"poisson"`` or ``"speckle"``.
        spatial_dims: 2 (2D patches from slices; low-dose CT settings drawn per slice) or 3 (3D patches; one
            setting per volume and realisation, as a real scan has one dose and one kernel).
        realisations: low-dose CT only: noisy versions per clean slice (or volume) in the pool.
        noise_level_range: (min, max) of the pixel-domain noise level, drawn uniformly (Poisson:
            log-uniformly) per patch. Units: rician and gaussian (MR) - sigma in % of the volume maximum
            (default 1-9 %); gaussian (CT) - sigma in HU (default 5-50); poisson - counts at the maximum
            (default 50-2000); speckle - relative std (default 0.02-0.15); ct-lowdose - the added noise std in
            soft tissue in HU, drawn log-uniformly per slice, the flux calibrated to it (default 10-60).
        ct_settings: keyword arguments of :func:`lib.noise.sample_low_dose_settings` (e.g. ``dose_range``,
            ``noise_std_range_hu``, ``filters``); its wide defaults apply otherwise. The detector bin is drawn
            relative to each image's own pixel size.
        cache_dir: low-dose CT only: keep each simulated slice as ``.npy`` here, keyed by a hash of the seed,
            epoch, realisation, settings and the clean slice's content; reused across runs.
        regenerate_each_epoch: low-dose CT only: a new pool (new settings and noise) each epoch
            (:meth:`set_epoch`); otherwise the pool of epoch 0 serves the whole run.
        seed: root seed of the noise.
        device: torch device of the CT projector (a GPU makes the simulation much faster).
        progress: tqdm progress bar while the pool is simulated.
        build_pool: simulate the low-dose CT pool now (default); False defers it to the first
            :meth:`set_epoch` (e.g. a source used only for :meth:`validation_pairs`).
        lesions_per_slice: lesion-aware training (2D only): insert up to this many synthetic low-contrast lesions
            (:func:`lib.lesions.random_lesions`: 3-10 mm, CT -30..-5 and +10..+40 HU, MR -40..-10 and +10..+40 %) into every
            usable clean slice before any noise is simulated (so low-dose CT noise is the noise of the lesioned
            anatomy) and record their profiles as each volume's ``roi``. The lesions are drawn from ``seed`` and
            stay the same for the whole run; validation pairs keep the images without lesions. 0 = off.
        max_voxels: the voxel limit of every read (None: :func:`lib.imaging.max_voxels`).
    """

    def __init__(
        self,
        clean_paths: str | os.PathLike | Sequence[str | os.PathLike],
        modality: str,
        noise: str = "auto",
        *,
        spatial_dims: int = 2,
        realisations: int = 2,
        noise_level_range: tuple[float, float] | None = None,
        ct_settings: dict | None = None,
        cache_dir: str | os.PathLike | None = None,
        regenerate_each_epoch: bool = False,
        seed: int = 0,
        device: str = "cpu",
        progress: bool = True,
        build_pool: bool = True,
        lesions_per_slice: int = 0,
        max_voxels: int | None = None,
    ) -> None:
        if modality is None or modality.upper() not in ("CT", "MR"):
            raise ValueError(f"modality must be CT or MR, got {modality!r}")
        self.modality = modality.upper()
        if noise not in NOISE_KINDS:
            raise ValueError(f"unknown noise {noise!r}; choose from {', '.join(NOISE_KINDS)}")
        self.noise = {"CT": "ct-lowdose", "MR": "rician"}[self.modality] if noise == "auto" else noise
        if self.noise == "ct-lowdose" and self.modality != "CT":
            raise ValueError("ct-lowdose noise needs CT images in HU")
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if int(realisations) < 1:
            raise ValueError(f"realisations must be >= 1, got {realisations}")
        self.spatial_dims = spatial_dims
        self.realisations = int(realisations)
        key = f"gaussian-{self.modality}" if self.noise == "gaussian" and self.modality == "CT" else self.noise
        self.noise_level_range = tuple(float(v) for v in (noise_level_range or DEFAULT_NOISE_LEVELS.get(key, (0, 0))))
        if not (0 <= self.noise_level_range[0] <= self.noise_level_range[1]):
            raise ValueError(f"noise_level_range must be (min, max) with 0 <= min <= max, got {noise_level_range}")
        self.ct_settings = dict(ct_settings or {})
        if self.noise == "ct-lowdose" and "noise_std_range_hu" not in self.ct_settings:
            # calibrated mode: the flux is solved per slice for the drawn added-noise std, so the training noise
            # spans a known clinical range whatever the patient size (an uncalibrated flux range does not)
            if self.noise_level_range[0] <= 0:
                raise ValueError(f"low-dose CT noise levels are added-noise std in HU > 0, got {self.noise_level_range}")
            self.ct_settings["noise_std_range_hu"] = self.noise_level_range
        self.cache_dir = None if cache_dir is None else Path(cache_dir).expanduser()
        self.regenerate_each_epoch = bool(regenerate_each_epoch)
        self.seed = int(seed)
        self.device = device
        self.progress = progress

        self.paths = discover_images(clean_paths)
        check_not_heldout(self.paths)
        volumes = []
        for path in self.paths:
            clean, modality_read, spacing = _load_volume(path, self.modality, max_voxels)
            scaling = intensity_scaling_for(clean, self.modality)
            volumes.append(TrainingVolume(image_stem(path), clean, None, self.modality, spacing, scaling, path,
                                          _usable_slices(clean, scaling)))
        self.volumes = volumes
        self.lesions_per_slice = int(lesions_per_slice)
        if self.lesions_per_slice < 0:
            raise ValueError(f"lesions_per_slice must be >= 0, got {lesions_per_slice}")
        if self.lesions_per_slice and spatial_dims != 2:
            raise ValueError("synthetic lesions (lesions_per_slice) are inserted per slice: 2D training only")
        self._lesion_free = [vol.clean for vol in volumes]  # what validation pairs are made of
        if self.lesions_per_slice:
            for v, vol in enumerate(volumes):
                _insert_training_lesions(vol, self.lesions_per_slice, np.random.SeedSequence([self.seed, v, 7]))
        self.epoch: int | None = None
        self._pool: list[np.ndarray] = []  # per volume: (realisations, Z, H, W) noisy, modality units
        if self.noise == "ct-lowdose" and build_pool:
            self.set_epoch(0)

    # --- the interface ADLPatchDataset uses
    @property
    def noise_on_the_fly(self) -> bool:
        return self.noise != "ct-lowdose"

    def noisy_volume(self, index: int, realisation: int = 0) -> np.ndarray | None:
        """The pooled noisy volume (low-dose CT) or None (noise made per patch)."""
        if self.noise != "ct-lowdose":
            return None
        if not self._pool:
            self.set_epoch(0)
        return self._pool[index][realisation]

    def set_epoch(self, epoch: int) -> None:
        """Low-dose CT: make (or read from the cache) the pool of this epoch; a no-op for on-the-fly noise,
        and for later epochs unless ``regenerate_each_epoch``."""
        if self.noise != "ct-lowdose":
            return
        epoch = int(epoch) if self.regenerate_each_epoch else 0
        if self.epoch == epoch and self._pool:
            return
        self._pool = self._simulate_pool(epoch)
        self.epoch = epoch

    def add_noise(self, volume_index: int, clean: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Pixel-domain noise on a clean patch (modality units) at a level drawn from ``noise_level_range``."""
        from .. import noise as physics

        vol = self.volumes[volume_index]
        lo, hi = self.noise_level_range
        if self.noise == "poisson":
            level = float(math.exp(rng.uniform(math.log(max(lo, 1e-6)), math.log(max(hi, 1e-6)))))
        else:
            level = float(rng.uniform(lo, hi))
        vmax = float(vol.clean.max())
        if self.noise == "rician":
            return physics.add_rician_noise(np.maximum(clean, 0.0), level, seed=rng, reference_max=max(vmax, 0.0))
        if self.noise == "gaussian":
            sigma = level if self.modality == "CT" else level / 100.0 * max(vmax, 1e-6)
            return physics.add_gaussian_noise(clean, sigma, seed=rng)
        if self.noise == "speckle":
            return physics.add_speckle_noise(clean, level, seed=rng)
        # Poisson: counts need a non-negative image, CT is shifted so that -1024 HU is zero counts
        shift = -CT_RANGE_HU[0] if self.modality == "CT" else max(0.0, -float(vol.clean.min()))
        # scale so that the VOLUME maximum gets `level` counts (the patch's own maximum would vary per patch)
        scale = level / max(vmax + shift, 1e-6)
        counts = rng.poisson(np.maximum(clean + shift, 0.0).astype(np.float64) * scale)
        return (counts / scale - shift).astype(np.float32)

    # --- the low-dose CT pool
    def _simulate_pool(self, epoch: int) -> list[np.ndarray]:
        from tqdm.auto import tqdm

        jobs = []  # (volume index, realisation, slice index or None for the whole volume)
        for v, vol in enumerate(self.volumes):
            for r in range(self.realisations):
                if self.spatial_dims == 2:
                    jobs += [(v, r, int(z)) for z in vol.usable_slices]
                else:
                    jobs.append((v, r, None))
        pool = [np.repeat(vol.clean[None], self.realisations, axis=0) for vol in self.volumes]
        bar = tqdm(jobs, desc=f"low-dose CT pool (epoch {epoch})", unit="job", disable=not self.progress,
                   dynamic_ncols=True)
        for v, r, z in bar:
            vol = self.volumes[v]
            if z is None:
                pool[v][r] = self._simulate(vol, vol.clean, epoch, v, r, None)
            else:
                pool[v][r][z] = self._simulate(vol, vol.clean[z], epoch, v, r, z)
        return pool

    def _simulate(self, vol: TrainingVolume, clean: np.ndarray, epoch: int, v: int, r: int, z: int | None) -> np.ndarray:
        from .. import noise as physics

        z_key = 2**31 - 1 if z is None else z
        entropy = [self.seed, epoch, v, r, z_key]
        settings = physics.sample_low_dose_settings(
            np.random.default_rng(np.random.SeedSequence(entropy + [0])),
            pixel_size_mm=float(np.sqrt(vol.pixel_size_mm[0] * vol.pixel_size_mm[1])),
            **self.ct_settings,
        )
        noise_seed = np.random.SeedSequence(entropy + [1])
        cache_path = None
        if self.cache_dir is not None:
            digest = hashlib.sha1(np.ascontiguousarray(clean).tobytes()).hexdigest()
            key = json.dumps({"v": _CACHE_VERSION, "entropy": entropy, "clean": digest, "shape": clean.shape,
                              "pixel": vol.pixel_size_mm, "settings": _settings_dict(settings)},
                             sort_keys=True, default=str)
            name = hashlib.sha1(key.encode()).hexdigest()[:20]
            cache_path = self.cache_dir / f"ldct_{name}.npy"
            if cache_path.is_file():
                try:
                    cached = np.load(cache_path)
                    if cached.shape == clean.shape:
                        return cached.astype(np.float32)
                except (OSError, ValueError):
                    log.warning("unreadable cache file %s: simulating again", cache_path)
        noisy = physics.simulate_low_dose_ct(_squeeze(clean), vol.pixel_size_mm, settings, seed=noise_seed,
                                             device=self.device)
        noisy = np.asarray(noisy, dtype=np.float32).reshape(clean.shape)
        if cache_path is not None:
            atomic_numpy_save(cache_path, noisy)
        return noisy

    # --- validation
    def validation_pairs(self, seed: int | None = None) -> list[ValidationPair]:
        """One fixed noisy realisation of every whole image (deterministic for ``seed``; default the source's
        seed + 1_000_003, a stream the training pool never uses). Low-dose CT: the benchmark's quarter-dose
        protocol (:func:`lib.noise.quarter_dose_settings`); Rician: 5 % of the image maximum; other noise: a level
        drawn from the range."""
        from .. import noise as physics

        seed = self.seed + 1_000_003 if seed is None else int(seed)
        pairs = []
        for v, vol in enumerate(self.volumes):
            rng = np.random.default_rng([seed, v])
            clean = self._lesion_free[v]
            if self.noise == "ct-lowdose":
                # one fixed clinical protocol, not a random draw: a drawn setting can be nearly noise-free and
                # then says nothing about denoising
                settings = physics.quarter_dose_settings()
                noisy = physics.simulate_low_dose_ct(_squeeze(clean), vol.pixel_size_mm, settings,
                                                     seed=[seed, v, 1], device=self.device, progress=self.progress)
            elif self.noise == "rician":
                # likewise fixed: the benchmark's and the sample studies' 5 % of the maximum
                noisy = physics.add_rician_noise(np.maximum(clean, 0.0), RICIAN_VALIDATION_PERCENT, seed=rng,
                                                 reference_max=max(float(clean.max()), 0.0))
            else:
                noisy = self.add_noise(v, clean, rng)
            pairs.append(ValidationPair(vol.name, _squeeze(np.asarray(noisy, np.float32)), _squeeze(clean),
                                        self.modality, vol.pixel_size_mm))
        return pairs


def _insert_training_lesions(vol: TrainingVolume, per_slice: int, seed: np.random.SeedSequence) -> None:
    """Insert synthetic lesions into every usable slice of ``vol.clean`` (a new array) and set ``vol.roi``."""
    from ..lesions import insert_lesions, lesion_mask, random_lesions, training_contrast_ranges

    ranges = training_contrast_ranges(vol.modality)
    clean = vol.clean.copy()
    roi = np.zeros(clean.shape, dtype=np.float32)
    pixel = vol.pixel_size_mm
    for z, child in zip(vol.usable_slices, seed.spawn(len(vol.usable_slices))):
        z = int(z)
        lesions = random_lesions(clean[z], pixel, np.random.default_rng(child), modality=vol.modality, count=per_slice,
                                 contrast_ranges=ranges)
        if lesions:
            clean[z] = insert_lesions(clean[z], lesions, pixel, vol.modality)
            roi[z] = lesion_mask(clean[z].shape, lesions, pixel)
            vol.lesions[z] = [lesion.to_dict() for lesion in lesions]
    vol.clean = clean
    vol.roi = roi


def _settings_dict(settings) -> dict:
    d = asdict(settings)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}
