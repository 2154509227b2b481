"""The training-data recipe of a denoiser run: which source the patches come from and which validation pairs
are watched, in one place for the command line (``cli.py train``), the app and the bench.

A :class:`TrainingDataRecipe` says WHAT the run learns from (clean images with synthetic physics noise, clean
images with noise from a learned TDDL noise model, or real noisy / clean pairs; clean validation images and/or
real validation pairs); :func:`build_training_data` reads the images and makes the source, its patch dataset
and the validation pairs (:class:`TrainingData`). Every input is checked against the held-out benchmark split
(:func:`lib.data.heldout.check_not_heldout`) before anything is read.

Defaults live here (and in the sources and :class:`~lib.data.patches.ADLPatchDataset` they are passed to): a
caller sets only what it wants to differ.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, Union

from .heldout import check_not_heldout
from .patches import ADLPatchDataset
from .sources import NOISE_KINDS, PairedFolderSource, SyntheticNoiseSource, ValidationPair

__all__ = ["TrainingData", "TrainingDataRecipe", "build_training_data", "validation_pairs"]

PathLike = Union[str, os.PathLike]


@dataclass
class TrainingDataRecipe:
    """What a denoiser trains and validates on.

    Training data, exactly one of:

    * ``clean`` images (files or folders, :func:`lib.data.discover_images`) with synthetic ``noise``
      (:data:`lib.data.NOISE_KINDS`; ``auto``: low-dose CT for CT, Rician for MR) - :class:`SyntheticNoiseSource`;
    * ``clean`` images with noise sampled from a learned TDDL ``noise_model`` file (CT only) -
      :class:`lib.noise_learning.LearnedNoiseSource`;
    * real pairs in ``noisy_dir`` / ``clean_dir``, matched by file-name stem - :class:`PairedFolderSource`.

    Attributes:
        modality: "CT" or "MR" (upper-cased).
        clean, noisy_dir, clean_dir, noise, noise_model: the training data (above).
        noise_level_range: (min, max) of the synthetic noise level, in the units of
            :class:`SyntheticNoiseSource` (None: its default for the noise kind).
        ct_filters: simulated low-dose CT only: reconstruction filters to draw from (None: all).
        ct_cutoff_range: simulated low-dose CT only: (min, max) filter cut-off, fractions of Nyquist (None: the
            simulator's default range).
        realisations: noisy versions per clean slice (or volume) in a low-dose CT or learned-noise pool.
        noise_cache: simulated low-dose CT only: folder caching simulated slices as ``.npy``.
        regenerate_noise: a new low-dose CT / learned-noise pool every epoch.
        val: clean validation images; their noise is one fixed realisation of the training noise (paired
            training: ``auto`` noise of the modality), seeded ``seed + 1``.
        val_noisy_dir, val_clean_dir: real validation pairs (both or neither).
        spatial_dims: 2 (slices) or 3 (volumes).
        lesions_per_slice: lesion-aware training: synthetic lesions inserted per clean slice before the noise
            (:class:`SyntheticNoiseSource`; 2D synthetic noise only); 0 = none.
        seed: root seed of the noise (and, in :meth:`TrainingData.patches`, of the patch sampling).

    Raises:
        ValueError: (at construction) no training data, two kinds of it, half a pair of folders, a noise
            setting that does not apply to the chosen data.
    """

    modality: str
    clean: Sequence[PathLike] = ()
    noisy_dir: PathLike | None = None
    clean_dir: PathLike | None = None
    noise: str = "auto"
    noise_model: PathLike | None = None
    noise_level_range: tuple[float, float] | None = None
    ct_filters: tuple[str, ...] | None = None
    ct_cutoff_range: tuple[float, float] | None = None
    realisations: int = 2
    noise_cache: PathLike | None = None
    regenerate_noise: bool = False
    val: Sequence[PathLike] = ()
    val_noisy_dir: PathLike | None = None
    val_clean_dir: PathLike | None = None
    spatial_dims: int = 2
    lesions_per_slice: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        self.modality = str(self.modality).upper()
        self.clean = tuple(self.clean or ())
        self.val = tuple(self.val or ())
        if self.modality not in ("CT", "MR"):
            raise ValueError(f"modality must be CT or MR, got {self.modality!r}")
        if self.noise not in NOISE_KINDS:
            raise ValueError(f"unknown noise {self.noise!r}; choose from {', '.join(NOISE_KINDS)}")
        if (self.noisy_dir is None) != (self.clean_dir is None):
            raise ValueError("real training pairs need both a noisy and a clean folder")
        if (self.val_noisy_dir is None) != (self.val_clean_dir is None):
            raise ValueError("real validation pairs need both a noisy and a clean folder")
        if self.paired and self.clean:
            raise ValueError("give either clean images (synthetic or learned noise) or noisy and clean folders "
                             "(real pairs), not both")
        if not self.paired and not self.clean:
            raise ValueError("no training data: give clean images or noisy and clean folders")
        if self.noise != "auto" and (self.paired or self.noise_model is not None):
            raise ValueError(f"noise {self.noise!r} applies to clean images with synthetic noise only")
        if self.noise_model is not None and self.modality != "CT":
            raise ValueError("a learned noise model is a CT noise model (learned in HU)")
        if self.lesions_per_slice and (self.paired or self.noise_model is not None or self.spatial_dims != 2):
            raise ValueError("synthetic lesions are inserted into clean slices before physics noise: they need "
                             "2D training on clean images with synthetic noise (not real pairs or a noise model)")
        if self.ct_settings is not None and not self.simulated_low_dose_ct:
            raise ValueError("CT filters and cut-offs apply to simulated low-dose CT noise only")

    # --- what the recipe describes
    @property
    def paired(self) -> bool:
        """Real noisy / clean training pairs."""
        return self.noisy_dir is not None

    @property
    def simulated_low_dose_ct(self) -> bool:
        """Clean CT images with low-dose noise simulated in the sinogram domain."""
        return not self.paired and self.noise_model is None and self.modality == "CT" \
            and self.noise in ("auto", "ct-lowdose")

    @property
    def ct_settings(self) -> dict[str, Any] | None:
        """Keyword arguments of :func:`lib.noise.sample_low_dose_settings` set by the recipe (None: none)."""
        if self.ct_filters is None and self.ct_cutoff_range is None:
            return None
        settings: dict[str, Any] = {}
        if self.ct_filters is not None:
            settings["filters"] = tuple(self.ct_filters)
        if self.ct_cutoff_range is not None:
            settings["cutoff_range"] = tuple(self.ct_cutoff_range)
        return settings

    def input_paths(self) -> list[PathLike]:
        """Every file and folder the recipe reads images from."""
        folders = (self.noisy_dir, self.clean_dir, self.val_noisy_dir, self.val_clean_dir)
        return [*self.clean, *self.val, *(f for f in folders if f is not None)]


@dataclass
class TrainingData:
    """The data of a run, made by :func:`build_training_data`.

    Attributes:
        recipe: what it was made from.
        source: the training volumes (``volumes``, ``modality``; the interface of :class:`ADLPatchDataset`).
        validation_pairs: full noisy / clean images watched during training (may be empty).
        noise_kind: the noise in words, for logs and the training record: ``paired``, a synthetic noise kind
            (``ct-lowdose``, ``rician``, ...) or ``learned (<noise model file name>)``.
    """

    recipe: TrainingDataRecipe
    source: Any
    validation_pairs: list[ValidationPair] = field(default_factory=list)
    noise_kind: str = ""

    def patches(self, patch_size: int | Sequence[int], *, slices: int = 1, **dataset_kwargs: Any) -> ADLPatchDataset:
        """The patch dataset of the source for a network seeing ``slices`` adjacent slices (2D), sampled with
        the recipe's seed; ``dataset_kwargs`` (e.g. ``samples_per_epoch``) go to :class:`ADLPatchDataset`."""
        return ADLPatchDataset(self.source, self.recipe.spatial_dims, patch_size, seed=self.recipe.seed,
                               slice_context=int(slices) // 2, **dataset_kwargs)

    def record(self, patch_size: int | Sequence[int]) -> dict[str, Any]:
        """The ``data`` entry of a weight file's training record: noise, image names, patch size, validation
        images and, for simulated low-dose CT, the settings the recipe restricted."""
        record: dict[str, Any] = {"noise": self.noise_kind, "images": [v.name for v in self.source.volumes],
                                  "patch_size": patch_size,
                                  "validation_images": [p.name for p in self.validation_pairs]}
        lesions = sum(len(v.lesions.get(z, [])) for v in self.source.volumes for z in v.lesions)
        if lesions:
            from ..lesions import training_contrast_ranges

            record["synthetic_lesions"] = {"per_slice": self.recipe.lesions_per_slice, "inserted": lesions,
                                           "contrast_ranges": [list(r) for r in
                                                               training_contrast_ranges(self.source.modality)]}
        reference = getattr(self.source, "reference_noise_std_per_volume", None)
        if reference:  # learned noise: the noise each clean image carried, taken off the added noise (in the order
            # of "images": a list, so that no image name is a key that a pseudonymised copy would have to rewrite)
            record["clean_noise_std_hu"] = list(reference)
        if getattr(self.source, "ct_settings", None):
            record["ct_settings"] = {k: list(v) if isinstance(v, tuple) else v
                                     for k, v in self.source.ct_settings.items()}
        return record


def build_training_data(recipe: TrainingDataRecipe, *, device: str = "cpu", progress: bool = True) -> TrainingData:
    """Read the recipe's images and make its training source and validation pairs.

    Args:
        recipe: what to train and validate on.
        device: torch device of the noise simulation (the CT projector or the learned noise model); under
            torchrun, each process's own GPU.
        progress: tqdm bars while noise pools are made (the main process of a multi-GPU run only).

    Raises:
        ValueError: a held-out input, no images found, unreadable or mismatched images.
    """
    check_not_heldout(recipe.input_paths())  # before anything is read
    common = {"spatial_dims": recipe.spatial_dims, "device": device, "progress": progress}
    if recipe.paired:
        source = PairedFolderSource(recipe.noisy_dir, recipe.clean_dir, modality=recipe.modality)
        noise_kind = "paired"
    elif recipe.noise_model is not None:
        from ..noise_learning import LearnedNoiseSource

        # the clean images are scans (normal-dose, or cleaned ones): the noise each carries is taken off the learnt
        # low-dose noise, which is the scanner's whole noise
        source = LearnedNoiseSource(recipe.clean, recipe.noise_model, realisations=recipe.realisations,
                                    seed=recipe.seed, regenerate_each_epoch=recipe.regenerate_noise,
                                    reference_noise_std_hu="estimate", **common)
        noise_kind = f"learned ({Path(recipe.noise_model).name})"
    else:
        source = SyntheticNoiseSource(recipe.clean, recipe.modality, recipe.noise, realisations=recipe.realisations,
                                      noise_level_range=recipe.noise_level_range, ct_settings=recipe.ct_settings,
                                      cache_dir=recipe.noise_cache, regenerate_each_epoch=recipe.regenerate_noise,
                                      seed=recipe.seed, lesions_per_slice=recipe.lesions_per_slice, **common)
        noise_kind = source.noise
    return TrainingData(recipe, source, validation_pairs(recipe, device=device, progress=progress), noise_kind)


def validation_pairs(recipe: TrainingDataRecipe, *, device: str = "cpu", progress: bool = True
                     ) -> list[ValidationPair]:
    """The recipe's validation pairs: its clean validation images with one fixed realisation of the training
    noise (seed ``recipe.seed + 1``), then its real validation pairs."""
    pairs: list[ValidationPair] = []
    common = {"seed": recipe.seed + 1, "spatial_dims": recipe.spatial_dims, "device": device, "progress": progress,
              "build_pool": False}
    if recipe.val and recipe.noise_model is not None:
        from ..noise_learning import LearnedNoiseSource

        pairs += LearnedNoiseSource(recipe.val, recipe.noise_model, reference_noise_std_hu="estimate",
                                    **common).validation_pairs()
    elif recipe.val:
        pairs += SyntheticNoiseSource(recipe.val, recipe.modality, recipe.noise,
                                      noise_level_range=recipe.noise_level_range, **common).validation_pairs()
    if recipe.val_noisy_dir is not None:
        pairs += PairedFolderSource(recipe.val_noisy_dir, recipe.val_clean_dir,
                                    modality=recipe.modality).validation_pairs()
    return pairs
