"""TDDL end to end: low-dose CT images -> a trained noise model -> pseudo training pairs.

* :func:`learn_noise_model` - step 1: noise patches of low-dose CT images -> a trained :class:`NoiseModel` (no
  normal-dose image is needed). Shared by ``cli.py learn-noise``, the MONAI Label app's adaptation task and the
  bench.
* :func:`adaptation_data` - adapt a denoiser to a scanner: learn the noise of its low-dose images and add it to
  normal-dose images (given, or the current denoiser's outputs for the low-dose images themselves:
  :func:`denoised_stand_ins`) to make pseudo low-dose / normal-dose training and validation pairs.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from ..data import ValidationPair
from .extraction import NoiseSamples, extract_noise_samples
from .noise_model import NoiseModel
from .pseudo_pairs import LearnedNoiseSource, noise_added_line
from .training import MIN_TRAINING_SAMPLES, train_noise_model

log = logging.getLogger(__name__)

__all__ = ["LEVEL_CALIBRATION_OFF", "AdaptationData", "adaptation_data", "denoised_stand_ins", "learn_noise_model"]

PathLike = str | os.PathLike

#: ``training_stats["level_calibration_skipped"]`` of a model learnt with ``calibrate_level=False``
LEVEL_CALIBRATION_OFF = "turned off by request"

#: central slices of each held-out image whose denoised stand-in gives self-adaptation's validation PSNR
HELD_OUT_STAND_IN_SLICES = 8


def learn_noise_model(
    inputs: Sequence[str | os.PathLike],
    *,
    patch_size: int = 32,
    steps: int = 2000,
    batch_size: int = 64,
    lr: float = 2e-3,
    max_patches: int = 20000,
    detrend: str = "quadratic",
    force_ct: bool = False,
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: bool = True,
    report: Callable[[str], None] = log.info,
    info: dict | None = None,
    calibrate_level: bool = True,
    max_voxels: int | None = None,
) -> NoiseModel:
    """Learn the noise of low-dose CT images (files or DICOM series folders, in HU).

    The learnt level is then calibrated (``calibrate_level``): the smooth patches of real scans hold weak anatomy
    and sit in noisier places, so the model's soft-tissue noise came out 1.1-2x what the scans carry; the scans'
    own soft-tissue noise (:func:`lib.noise.estimate_ct_noise_std_hu`, median over the inputs) sets the model's
    ``level_correction`` (:meth:`NoiseModel.calibrate_level`; all HU bands are scaled alike, the texture is kept).
    ``report`` gets the learnt and the measured level.

    Args:
        inputs: the low-dose images.
        patch_size: noise patch size in pixels (multiple of 8, >= 16).
        steps, batch_size, lr: VAE training (see :func:`train_noise_model`).
        max_patches: random subset of at most this many patches.
        detrend: trend removed from each patch (``quadratic`` for FBP noise).
        force_ct: treat non-DICOM inputs as CT in HU without checking their modality.
        device: compute device of the VAE.
        seed: seed of the patch subset and the training.
        progress: tqdm progress bar.
        report: receives one line per input and one before training (print for a CLI).
        info: stored in the model's metadata. The model names its inputs by file name only (a noise-model file
            may travel; a site's folders may name patients): keep folder paths out of ``info`` too.
        calibrate_level: scale the model's noise so that its soft-tissue level is the scans' measured one (skipped,
            with a line to ``report``, where no input has enough soft tissue to measure it). False: the learnt level
            is kept (``level_correction`` 1.0) and ``training_stats["level_calibration_skipped"]`` says
            :data:`LEVEL_CALIBRATION_OFF`.
        max_voxels: the voxel limit of every read (None: :func:`lib.imaging.max_voxels`).

    Raises:
        ValueError: an input is not CT, constant, smaller than a patch, or too few smooth patches were found.
    """
    from ..imaging import read_volume
    from ..noise import estimate_ct_noise_std_hu

    if patch_size % 8 or patch_size < 16:
        raise ValueError(f"patch size must be a multiple of 8 and >= 16, got {patch_size}")
    per_file, measured_levels = [], []
    for path in map(Path, inputs):
        volume = read_volume(path, modality="CT" if force_ct else None, max_voxels=max_voxels)
        if volume.modality != "CT":
            guessed = volume.metadata.get("modality_source") == "guessed"
            how = " (guessed from its values; say it is CT if it is a CT in HU)" if guessed else ""
            raise ValueError(f"{path} is {volume.modality}, not CT: the noise model learns CT noise in HU{how}")
        if volume.is_constant:
            raise ValueError(f"{path} holds a constant image: no noise to learn from")
        height, width = volume.array.shape[-2:]
        if min(height, width) < patch_size:
            raise ValueError(f"{path}: slices of {height} x {width} pixels are smaller than the {patch_size}-pixel "
                             "noise patches")
        pixel = (float(volume.spacing[1]), float(volume.spacing[0]))  # (row, column) = (y, x) mm
        samples = extract_noise_samples(volume.array, patch_size, max_patches=max_patches, seed=seed,
                                        pixel_size_mm=pixel, source_name=path.name, detrend=detrend)
        st = samples.stats
        level = estimate_ct_noise_std_hu(volume.array) if calibrate_level else None
        if level is not None:
            measured_levels.append(level)
        measured = "" if level is None else f"; soft-tissue noise of the scan {level:.1f} HU"
        report(f"{path.name}: {len(samples)} noise patches ({st['accepted']} smooth of {st['candidates']} "
               f"candidates), noise std {samples.noise_std_hu:.1f} HU{measured}")
        per_file.append(samples)
    if not per_file:
        raise ValueError("no low-dose images given")
    samples = NoiseSamples.concatenate(per_file)
    sizes = [s.pixel_size_mm for s in per_file if s.pixel_size_mm is not None and len(s)]
    if sizes and max(p[0] for p in sizes) > 1.1 * min(p[0] for p in sizes):
        log.warning("the inputs have different pixel sizes (%s mm): noise texture is learnt in pixels; prefer one "
                    "reconstruction protocol per noise model", ", ".join(f"{p[0]:.3f}" for p in sizes))
    if len(samples) > max_patches:
        rng = np.random.default_rng(seed)
        samples = samples.subset(np.sort(rng.choice(len(samples), max_patches, replace=False)))
    if len(samples) < MIN_TRAINING_SAMPLES:
        raise ValueError(f"only {len(samples)} smooth noise patches of {patch_size} x {patch_size} found (need >= "
                         f"{MIN_TRAINING_SAMPLES}): give more or larger low-dose images, or smaller patches")
    report(f"learning the noise from {len(samples)} patches ({100 * samples.air_fraction:.0f} % in air), "
           f"{steps} steps on {device}")
    model = train_noise_model(samples, steps=steps, batch_size=batch_size, lr=lr, seed=seed, progress=progress,
                              device=device, info=info)
    if not calibrate_level:
        model.training_stats["level_calibration_skipped"] = LEVEL_CALIBRATION_OFF
        report(f"soft-tissue level NOT calibrated ({LEVEL_CALIBRATION_OFF}): the learnt level is kept")
        return model
    if not measured_levels:
        model.training_stats["level_calibration_skipped"] = "no input has enough soft tissue to measure its noise"
        report("soft-tissue level NOT calibrated: no input has enough soft tissue (-100..200 HU) to measure its "
               "noise; the learnt level may be too high")
        return model
    soft = samples.condition_hu[(samples.condition_hu >= -100.0) & (samples.condition_hu < 200.0)]
    cal = model.calibrate_level(float(np.median(measured_levels)), soft if soft.size >= 16 else None)
    report(f"soft-tissue noise: learnt {cal['learnt_soft_tissue_std_hu']:.1f} HU, measured in the low-dose scans "
           f"{cal['measured_soft_tissue_std_hu']:.1f} HU: level scaled x{cal['level_correction']:.2f} (all HU bands)")
    return model


@dataclass
class AdaptationData:
    """Pseudo pairs that adapt a denoiser to a scanner's noise (:func:`adaptation_data`).

    Attributes:
        source: the training pseudo pairs (a :class:`LearnedNoiseSource` over the training normal-dose images).
        validation_pairs: one fixed pseudo low-dose realisation of each validation normal-dose image.
        noise_model: the noise model learnt from the low-dose images (saved in the work folder).
        description: for the training record and status: ``kind`` (in words), ``low_dose_images``,
            ``train_images``, ``validation_images`` (ids or file names) and ``noise_model`` (its summary).
        held_out_low_dose: self-adaptation only (no normal-dose images): id -> the low-dose images of the
            validation ids, which neither the noise model nor the pseudo pairs used. The validation pairs' clean side
            is then the served model's own output, so these images, not the pairs, must judge the result
            (:func:`lib.noise_learning.adaptation.held_out_low_dose_check`). Empty with normal-dose images.
    """

    source: LearnedNoiseSource
    validation_pairs: list[ValidationPair]
    noise_model: NoiseModel
    description: dict[str, Any]
    held_out_low_dose: dict[str, PathLike] = field(default_factory=dict)


def denoised_stand_ins(low_dose: Mapping[str, PathLike], denoiser_weights: PathLike, out_dir: PathLike,
                       device: str = "cpu", max_slices: int | None = None,
                       max_voxels: int | None = None) -> dict[str, str]:
    """Self-adaptation without normal-dose scans: the denoiser's outputs for the low-dose CT images stand in for
    normal-dose images.

    Args:
        low_dose: id -> low-dose CT image (file or DICOM series folder, HU).
        denoiser_weights: weight file of the denoiser (:func:`lib.predict.load_denoiser`).
        out_dir: where the denoised images are written, as float32 ``<id>.nii.gz`` on the input's grid.
        device: compute device of the denoiser.
        max_slices: only that many central, contiguous slices of each volume (each denoised with its neighbours, so
            a 2.5D network sees real ones), written on their own grid: for images that only give a figure to report,
            where denoising whole volumes would cost minutes per volume on a CPU. None: whole images.
        max_voxels: the voxel limit of every read (None: :func:`lib.imaging.max_voxels`).

    Returns:
        id -> path of its denoised image.
    """
    from ..imaging import read_volume, write_volume
    from ..predict import denoise_array, load_denoiser

    loaded = load_denoiser(denoiser_weights, device=device)
    context = int(getattr(loaded.network, "slice_context", 0)) if loaded.spatial_dims == 2 else 0

    def denoise(array: np.ndarray) -> np.ndarray:
        # every pixel: a stand-in is the clean side of pseudo pairs, so its air must be denoised too (left as acquired,
        # patches of it would teach the network to keep the noise there)
        return denoise_array(loaded, array, "CT", device=device, skip_air=False)

    stand_ins = {}
    for image_id, path in low_dose.items():
        volume = read_volume(path, modality="CT", max_voxels=max_voxels)
        if max_slices is not None and volume.array.ndim == 3 and volume.array.shape[0] > int(max_slices):
            volume, denoised = _central_slices_denoised(volume, int(max_slices), context, denoise)
        else:
            denoised = denoise(volume.array)
        target = Path(out_dir) / f"{image_id}.nii.gz"
        target.parent.mkdir(parents=True, exist_ok=True)
        write_volume(volume.with_array(denoised), target, output_dtype="float32")
        stand_ins[image_id] = str(target)
    return stand_ins


def _central_slices_denoised(volume, count: int, context: int, denoise: Callable[[np.ndarray], np.ndarray]):
    """(the ``count`` central slices of ``volume`` as a volume on their own grid, their denoised values): denoised
    with ``context`` neighbouring slices on either side where the volume has them."""
    import dataclasses

    depth = volume.array.shape[0]
    first = (depth - count) // 2
    low, high = max(0, first - context), min(depth, first + count + context)
    denoised = np.asarray(denoise(volume.array[low:high]))[first - low:first - low + count]
    # the first kept slice's position: the origin moved along the slice axis (third column of the direction)
    direction = np.asarray(volume.direction, dtype=float).reshape(3, 3)
    origin = np.asarray(volume.origin, dtype=float) + direction[:, 2] * float(volume.spacing[2]) * first
    part = dataclasses.replace(volume, array=np.ascontiguousarray(volume.array[first:first + count]),
                               origin=tuple(float(v) for v in origin), dicom_headers=None,
                               metadata=dict(volume.metadata))
    return part, denoised


def adaptation_data(
    low_dose: Mapping[str, PathLike],
    work_dir: PathLike,
    *,
    normal_dose: str | Sequence[PathLike] | None = None,
    denoiser_weights: PathLike | None = None,
    noise_steps: int = 500,
    noise_patch_size: int = 32,
    seed: int = 0,
    device: str = "cpu",
    noise_info: dict | None = None,
    split: Callable[[list[str]], tuple[list[str], list[str]]] | None = None,
    calibrate_noise_level: bool = True,
    max_voxels: int | None = None,
) -> AdaptationData:
    """TDDL adaptation data: learn the noise of the low-dose CT images, add it to normal-dose images.

    Without normal-dose images (self-adaptation) the low-dose ids are split first: the noise model and the pseudo
    pairs use the training ids only, and the validation ids' low-dose images are returned as
    ``held_out_low_dose`` for the check that must judge the result.

    Args:
        low_dose: id -> low-dose CT image of the scanner (HU); at least 2 images in all.
        work_dir: scratch folder: ``noise_model.pt`` and, for self-adaptation, ``pseudo_normal_dose/``.
        normal_dose: normal-dose images (files or folders; a string may list several, comma-separated). None:
            the denoiser's outputs for the low-dose images stand in (:func:`denoised_stand_ins`; for the held-out
            images, which give only the circular validation PSNR, their :data:`HELD_OUT_STAND_IN_SLICES` central
            slices).
        denoiser_weights: the denoiser being adapted; needed when ``normal_dose`` is None.
        noise_steps, noise_patch_size: noise-model training steps and patch size (:func:`learn_noise_model`).
        seed: seed of the noise model and of the pseudo pairs (validation: ``seed + 1``).
        device: compute device of the noise model and of the denoiser.
        noise_info: extra metadata stored with the noise model (besides the low-dose ``images`` ids).
        split: names -> (training names, validation names); default
            :func:`lib.engines.gated_fine_tuning.split_validation` (an image's side depends on its name alone).
        calibrate_noise_level: scale the learnt noise to the low-dose images' measured soft-tissue noise
            (:func:`learn_noise_model`'s ``calibrate_level``); the description's ``noise_level`` says what was done
            (:meth:`NoiseModel.level_record`).
        max_voxels: the voxel limit of every read, low-dose, normal-dose and stand-in images alike (None:
            :func:`lib.imaging.max_voxels`); a server's adaptation reads at the server's limit.

    Raises:
        ValueError: no normal-dose image and no denoiser, too few images to split, unusable images (see
            :func:`learn_noise_model`, :class:`LearnedNoiseSource`).
    """
    if not normal_dose and denoiser_weights is None:
        raise ValueError("adaptation needs normal-dose images or the weights of the denoiser to adapt")
    if split is None:
        from ..engines.gated_fine_tuning import split_validation as split

    work = Path(work_dir)
    if normal_dose:
        noise_ids = list(low_dose)
    else:  # self-adaptation: the held-out low-dose images judge the result, so nothing learns from them
        noise_ids, held_out_ids = split(list(low_dose))
    noise_model = learn_noise_model([low_dose[i] for i in noise_ids], steps=noise_steps, patch_size=noise_patch_size,
                                    force_ct=True, device=device, seed=seed, progress=False,
                                    info={**(noise_info or {}), "images": noise_ids},
                                    calibrate_level=bool(calibrate_noise_level), max_voxels=max_voxels)
    noise_path = noise_model.save(work / "noise_model.pt")
    if normal_dose:
        from ..data import discover_images

        inputs = str(normal_dose).split(",") if isinstance(normal_dose, str) else list(normal_dose)
        # keyed by path: folders of one patient each often hold the same file name (A/scan.nii.gz, B/scan.nii.gz),
        # and keyed by name one patient's image silently replaced the other's
        clean = {str(p): str(p) for p in discover_images(inputs)}
        named = normal_dose if isinstance(normal_dose, str) else ", ".join(map(str, inputs))
        kind = f"normal-dose images from {named}"
        train_ids, val_ids = split(list(clean))
    else:
        clean = denoised_stand_ins({i: low_dose[i] for i in noise_ids}, denoiser_weights, work / "pseudo_normal_dose",
                                   device=device, max_voxels=max_voxels)
        # the held-out images' stand-ins give only the validation PSNR, circular, reported and never deciding (the
        # held-out low-dose images themselves judge): a few slices each, not whole volumes
        clean.update(denoised_stand_ins({i: low_dose[i] for i in held_out_ids}, denoiser_weights,
                                        work / "pseudo_normal_dose", device=device,
                                        max_slices=HELD_OUT_STAND_IN_SLICES, max_voxels=max_voxels))
        kind = "served model's denoised low-dose images (no normal-dose images given)"
        train_ids, val_ids = noise_ids, held_out_ids
    # real normal-dose scans carry noise of their own, taken off the learnt noise; the stand-ins are denoised
    reference = "estimate" if normal_dose else None
    source = LearnedNoiseSource([clean[i] for i in train_ids], noise_path, seed=seed, device=device, progress=False,
                                reference_noise_std_hu=reference, max_voxels=max_voxels)
    val_source = LearnedNoiseSource([clean[i] for i in val_ids], noise_path, seed=seed + 1, device=device,
                                    progress=False, build_pool=False, reference_noise_std_hu=reference,
                                    max_voxels=max_voxels)
    val_pairs = val_source.validation_pairs()
    # the noise each clean image carried, taken off the learnt noise, and what was added: as cli.py adapt reports it
    noise_per_image = source.noise_per_image() + val_source.noise_per_image()
    description = {"kind": f"TDDL pseudo pairs: learned noise + {kind}", "low_dose_images": list(low_dose),
                   "train_images": train_ids, "validation_images": val_ids, "noise_model": noise_model.summary(),
                   "noise_level": noise_model.level_record(),
                   "noise_added": noise_added_line(noise_per_image), "noise_per_image": noise_per_image}
    log.info("%s", description["noise_added"])
    if normal_dose:
        return AdaptationData(source, val_pairs, noise_model, description)
    description["held_out_low_dose"] = held_out_ids
    return AdaptationData(source, val_pairs, noise_model, description, {i: low_dose[i] for i in held_out_ids})
