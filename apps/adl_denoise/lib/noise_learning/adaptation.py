"""TDDL self-adaptation: adapt a denoiser to a site's own low-dose CT scans alone (``cli.py adapt``).

Recipe (:func:`adapt_to_low_dose`):

1. Split the low-dose slices: every ``holdout_every``-th slice (counted over all inputs, at least one) is held
   out; nothing below ever reads it except the final check.
2. Learn the scanner's noise from the remaining slices (:func:`learn_noise_model`).
3. Pseudo pairs: the learnt noise added to normal-dose images, given (less the noise each already carries,
   estimated in its soft tissue: the learnt noise is the scanner's whole low-dose noise), or else the starting
   model's denoised training slices (:func:`denoised_stand_ins`; the clean side of *training* pairs only).
4. Fine-tune the starting weights on those pairs (ADL: discriminator warm-up then adversarial; TDDL-GCN:
   supervised; the settings of :mod:`lib.engines.gated_fine_tuning`).
5. The restoration width it is served at (:func:`lib.evaluation.restoration_width.served_restoration`): measured
   for the adapted network on lesions planted in (at most 8 of) the held-out slices, the widest that keeps 90 % of
   a 6 mm lesion's contrast in the scanner's own noise, or the start file's width, whichever gives more back.
6. The no-worse check, not circular: the J-invariant (Noise2Self) loss
   (:func:`lib.evaluation.self_supervised.j_invariant_loss`) of the adapted and of the starting network on the
   held-out low-dose slices themselves. No model output is used as a reference anywhere in the check.
7. The lesion check: synthetic low-contrast lesions (4-10 mm, +-25 HU) planted in the same held-out slices
   (:mod:`lib.evaluation.planted_lesions`: the scanner's real noise around them, the same for both models); the
   adapted file must keep their contrast as well as the starting one, both as served (each with its restoration
   width; at most ``lesion_tolerance_pp`` percentage points less, mean over the lesions). A lower J-invariant
   loss bought by erasing small lesions does not count. When no lesion site can be found in the held-out slices
   the check fails (nothing is known).
   The adapted weights are written only when both checks pass (or with ``force``; never when training diverged to
   NaN or infinite weights), atomically (temp file in the output's folder, then rename), with a JSON report
   ``<output>.adapt.json`` either way; a refused run whose output already holds weights (``overwrite``) writes
   its report to ``<output>.adapt.refused.json`` instead, leaving the report of the weights in place as it was.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from ..runtime.atomic import atomic_copy, atomic_write_json

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)

__all__ = ["AdaptSettings", "AdaptationRefused", "adapt_to_low_dose", "blocking_files", "held_out_low_dose_check",
           "held_out_refusal",
           "holdout_indices", "no_worse_checks", "refused_report_path", "report_path"]

PathLike = str | os.PathLike
#: network class held by the weight file of each model name
NETWORK_CLASSES = {"adl": "EfficientUNetDenoiser", "tddl_gcn": "GCNDenoiser"}


class AdaptationRefused(ValueError):
    """The adapted model failed the no-worse check: nothing was written but the report."""

    def __init__(self, message: str, report: dict) -> None:
        super().__init__(message)
        self.report = report


@dataclass
class AdaptSettings:
    """Settings of one adaptation.

    ``holdout_every``: every n-th low-dose slice is held out for the check (>= 2); ``noise_steps``,
    ``noise_patch_size``: noise-model training (:func:`learn_noise_model`); ``steps``, ``patch_size``, ``batch_size``,
    ``lr``, ``samples_per_epoch``: fine-tuning (:class:`lib.engines.gated_fine_tuning.FineTuneSettings`);
    ``grid``, ``check_radius``, ``check_shifts``: the J-invariant check (masking grid; half-size of the blind square
    around each scored pixel, :func:`lib.evaluation.self_supervised.mask_pixels`; number of the ``grid**2`` shifts
    scored, None = all); ``tolerance``: relative loss increase still accepted (0 = strictly not worse);
    ``lesions_per_slice``, ``lesion_tolerance_pp``: the lesion check (lesions planted per held-out slice;
    percentage points of contrast kept the adapted model may lose against the starting one);
    ``calibrate_noise_level``: scale the learnt noise to the low-dose scans' measured soft-tissue noise
    (:func:`learn_noise_model`'s ``calibrate_level``); ``seed``, ``device``.
    """

    holdout_every: int = 5
    noise_steps: int = 500
    noise_patch_size: int = 32
    steps: int = 200
    patch_size: int | None = None
    batch_size: int = 4
    lr: float = 5e-5
    samples_per_epoch: int = 512
    grid: int = 4
    check_radius: int = 1
    check_shifts: int | None = None
    tolerance: float = 0.0
    lesions_per_slice: int = 6
    lesion_tolerance_pp: float = 2.0
    calibrate_noise_level: bool = True
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if int(self.holdout_every) < 2:
            raise ValueError(f"holdout_every must be >= 2, got {self.holdout_every}")
        if int(self.check_radius) < 0 or int(self.grid) < 2 * int(self.check_radius) + 2:
            raise ValueError(f"grid must be >= 2 check_radius + 2, got grid {self.grid}, radius {self.check_radius}")
        if self.check_shifts is not None and not 1 <= int(self.check_shifts) <= int(self.grid) ** 2:
            raise ValueError(f"check_shifts must be in 1..{int(self.grid) ** 2}, got {self.check_shifts}")
        if not 0 <= float(self.tolerance) < 1:
            raise ValueError(f"tolerance must be in [0, 1), got {self.tolerance}")
        if int(self.lesions_per_slice) < 1:
            raise ValueError(f"lesions_per_slice must be >= 1, got {self.lesions_per_slice}")
        if not 0 <= float(self.lesion_tolerance_pp) <= 100:
            raise ValueError(f"lesion_tolerance_pp must be in [0, 100], got {self.lesion_tolerance_pp}")


def report_path(output: PathLike) -> Path:
    """``<output>.adapt.json``: the JSON report next to the adapted weights."""
    output = Path(output)
    return output.with_name(output.name + ".adapt.json")


def refused_report_path(output: PathLike) -> Path:
    """``<output>.adapt.refused.json``: the report of a refused run when ``output`` already holds weights (their
    own report, :func:`report_path`, must keep describing them)."""
    output = Path(output)
    return output.with_name(output.name + ".adapt.refused.json")


def _write_refusal(output: Path, summary: dict) -> Path:
    """Write a refused run's report where it describes no weights in place: :func:`report_path` when ``output``
    holds none, else :func:`refused_report_path` (an ``--overwrite`` run that is refused replaces nothing)."""
    path = refused_report_path(output) if output.exists() else report_path(output)
    atomic_write_json(path, summary, indent=2)
    return path


def blocking_files(output: PathLike) -> list[Path]:
    """The files an adaptation would replace: the output and its report, except a report of a refused run
    (no weights written), which a new attempt may replace without ``--overwrite``."""
    output, json_path = Path(output), report_path(output)
    blocking = [output] if output.exists() else []
    if json_path.exists():
        try:
            refused = json.loads(json_path.read_text()).get("written") is False and not output.exists()
        except (OSError, ValueError):
            refused = False
        if not refused:
            blocking.append(json_path)
    return blocking


def holdout_indices(slice_counts: Sequence[int], every: int) -> list[list[int]]:
    """Held-out slice indices of each input: global slice k (counted over all inputs in order) is held out when
    ``k % every == every - 1``; when that holds out nothing (fewer than ``every`` slices), the last slice is.

    Raises:
        ValueError: fewer than 2 slices in all (one is needed to adapt, one to check).
    """
    if sum(slice_counts) < 2:
        raise ValueError(f"adaptation needs at least 2 low-dose slices (one is held out for the check), got "
                         f"{sum(slice_counts)}")
    held, k = [], 0
    for count in slice_counts:
        held.append([z for z in range(count) if (k + z) % every == every - 1])
        k += count
    if not any(held):
        held[-1] = [slice_counts[-1] - 1] if slice_counts[-1] else held[-1]
    return held


def _runs(indices: Sequence[int]) -> list[tuple[int, int]]:
    """Contiguous runs [start, stop) of sorted slice indices."""
    runs: list[tuple[int, int]] = []
    for z in indices:
        if runs and runs[-1][1] == z:
            runs[-1] = (runs[-1][0], z + 1)
        else:
            runs.append((z, z + 1))
    return runs


def _check_loss(run: Callable[[np.ndarray], np.ndarray], slices: Sequence[np.ndarray],
                settings: AdaptSettings) -> dict:
    """J-invariant loss (HU^2) of a slice denoiser over the held-out slices (pixel-weighted mean)."""
    from ..evaluation.self_supervised import grid_shifts, j_invariant_loss

    shifts = grid_shifts(settings.grid)
    if settings.check_shifts is not None:  # an evenly spread subset (unbiased estimate of the full loss)
        shifts = [shifts[i] for i in np.linspace(0, len(shifts) - 1, int(settings.check_shifts)).round().astype(int)]
    total = pixels = 0.0
    per_slice = []
    for s in slices:
        scored = j_invariant_loss(run, s, grid=settings.grid, shifts=shifts, radius=int(settings.check_radius))
        if not np.isfinite(scored["loss"]):
            return {"loss": float("inf"), "per_slice": [], "non_finite_output": True}
        total += scored["loss"] * scored["pixels"]
        pixels += scored["pixels"]
        per_slice.append(scored["loss"])
    return {"loss": float(total / pixels), "per_slice": per_slice, "grid": settings.grid, "shifts": len(shifts)}


def no_worse_checks(start: Callable[[np.ndarray], np.ndarray], adapted: Callable[[np.ndarray], np.ndarray],
                    held_out: Sequence[tuple[Sequence[np.ndarray], tuple[float, float]]],
                    settings: AdaptSettings,
                    lesion_denoisers: tuple[Callable[[np.ndarray], np.ndarray],
                                            Callable[[np.ndarray], np.ndarray]] | None = None) -> dict:
    """Steps 5 and 6 of the recipe: the starting vs the adapted slice denoiser ((N, H, W) -> (N, H, W), HU) on the
    held-out low-dose slices, given as (slices, (row, column) spacing in mm) per input volume.

    ``lesion_denoisers``: (start, adapted) for the lesion check where it should see other outputs than the
    J-invariant loss (e.g. both as served, with their restoration; the loss needs the bare networks, whose output
    at a pixel does not depend on that pixel's input). Default: ``start`` and ``adapted``.

    Returns ``{"check": J-invariant loss verdict, "lesion_check": planted-lesion verdict, "passed": both}``.
    """
    from ..evaluation.planted_lesions import lesion_contrast_check

    slices = [s for group, _ in held_out for s in group]
    baseline, candidate = _check_loss(start, slices, settings), _check_loss(adapted, slices, settings)
    change = (candidate["loss"] - baseline["loss"]) / baseline["loss"] if baseline["loss"] > 0 else float("nan")
    loss_passed = bool(np.isfinite(candidate["loss"])
                       and candidate["loss"] <= baseline["loss"] * (1 + settings.tolerance))
    lesion_start, lesion_adapted = lesion_denoisers or (start, adapted)
    lesion_check = lesion_contrast_check(lesion_start, lesion_adapted, [(list(g), sp) for g, sp in held_out],
                                         per_slice=int(settings.lesions_per_slice),
                                         tolerance_pp=float(settings.lesion_tolerance_pp), seed=int(settings.seed))
    check = {"criterion": "J-invariant (Noise2Self, Batson & Royer 2019) loss on held-out low-dose slices: mean "
                          "squared difference, at grid pixels blinded with the square of radius check_radius around "
                          "them, between the network's output for the masked slice and the noisy slice; lower is "
                          "better",
             "unit": "HU^2", "baseline_loss": baseline["loss"], "adapted_loss": candidate["loss"],
             "relative_change": change, "tolerance": settings.tolerance, "passed": loss_passed,
             "baseline_per_slice": baseline["per_slice"], "adapted_per_slice": candidate["per_slice"]}
    return {"check": check, "lesion_check": lesion_check, "passed": loss_passed and lesion_check["passed"]}


def held_out_low_dose_check(start: PathLike, candidate: PathLike,
                            held_out: Sequence[tuple[np.ndarray, tuple[float, float]]],
                            settings: AdaptSettings | None = None, max_slices: int = 4) -> dict:
    """Steps 5 and 6 as a publication check of gated fine-tuning (:func:`lib.engines.gated_fine_tuning.
    decide_publication`), for the app's self-adaptation: there the validation pairs' clean side is the served
    model's own output, which cannot judge it, so the held-out low-dose images themselves do.

    Args:
        start, candidate: the served and the candidate weight files (CT).
        held_out: the held-out low-dose images, each ((Z, H, W) or (H, W) in HU, (row, column) pixel size in mm);
            at most ``max_slices`` slices in all are scored, spread over them
            (:func:`lib.evaluation.restoration_width.spread_slices`).
        settings: the J-invariant loss and lesion settings of :class:`AdaptSettings`.

    The loss compares the bare networks (the restoration would give each pixel's own noise back); the lesion check
    compares both files as served (each with its restoration width). Returns ``{"check": "held_out_low_dose",
    "passed", "slices", "j_invariant": the loss verdict, "lesions": the lesion verdict}``.
    """
    from ..evaluation.restoration_width import spread_slices
    from ..predict import load_denoiser, slice_denoiser

    settings = settings or AdaptSettings()
    groups = spread_slices([(list(image[None] if image.ndim == 2 else image), spacing) for image, spacing in held_out],
                           max_slices)
    loaded = [load_denoiser(path, device=settings.device) for path in (start, candidate)]
    networks = [slice_denoiser(m, "CT", settings.device) for m in loaded]
    served = tuple(slice_denoiser(m, "CT", settings.device, served=True) for m in loaded)
    verdict = no_worse_checks(networks[0], networks[1], groups, settings, lesion_denoisers=served)
    result = {"check": "held_out_low_dose", "passed": verdict["passed"], "slices": sum(len(g) for g, _ in groups),
              "j_invariant": verdict["check"], "lesions": verdict["lesion_check"]}
    if not verdict["passed"]:
        result["reason"] = held_out_refusal(verdict["check"], verdict["lesion_check"], "the served model",
                                            "held-out low-dose images")
    return result


def held_out_refusal(check: dict, lesion_check: dict, other: str, where: str) -> str:
    """Why the held-out checks refuse a model, in one line: worse than ``other`` (on the J-invariant loss or the
    planted lesions), or not checkable where no lesion site fits in the held-out slices (``where`` names them)."""
    reasons = []
    if not check["passed"]:
        reasons.append(f"J-invariant loss {_loss_line(check)}")
    if not lesion_check["passed"]:
        reasons.append(_lesion_line(lesion_check))
    measured_worse = not check["passed"] or bool(lesion_check["lesions"])
    verdict = f"worse than {other}" if measured_worse else "not checkable"
    return f"{verdict} on the {where} ({'; '.join(reasons)})"


def _loss_line(check: dict) -> str:
    return (f"start {check['baseline_loss']:.1f} HU^2, adapted {check['adapted_loss']:.1f} HU^2 "
            f"({100 * check['relative_change']:+.2f} %)")


def _lesion_line(check: dict) -> str:
    """One line on the lesion check for the log and the refusal."""
    if not check["lesions"]:
        return ("no site for a synthetic lesion in the held-out slices (too small, or no uniform soft tissue): "
                "lesion contrast unknown")
    return (f"contrast kept of {check['lesions']} planted 4-10 mm lesions: start {check['baseline_percent']:.1f} %, "
            f"adapted {check['candidate_percent']:.1f} %, at most {check['tolerance_pp']:g} points less allowed")


def _read_low_dose_ct(path: Path):
    """A low-dose input as CT in HU; ValueError for a DICOM series of another modality, or values that cannot be HU
    (none below 0: MR magnitudes). A CT crop without air is guessed MR from its values: it is read as CT when it
    holds negative values (fat, air)."""
    from ..imaging import read_volume

    volume = read_volume(path)
    if volume.modality == "CT":
        return volume
    if volume.metadata.get("modality_source") == "dicom":
        raise ValueError(f"{path} is a DICOM {volume.modality} (its Modality tag), not CT: adaptation learns CT "
                         "noise in HU")
    if float(np.min(volume.array)) >= 0.0:
        raise ValueError(f"{path} holds no value below 0, so it is no CT in HU (MR magnitudes?): adaptation learns CT "
                         "noise in HU")
    return read_volume(path, modality="CT")


def _voxels_sha256(array: np.ndarray) -> str:
    """SHA-256 of a volume's values as read (HU, float32) and shape: the same scan given as two files, or as a DICOM
    series and its NIfTI conversion, has the same one."""
    values = np.ascontiguousarray(array, dtype=np.float32)
    return hashlib.sha256(repr(values.shape).encode() + values.tobytes()).hexdigest()


def _refuse_repeated_scans(inputs: Sequence[Path], volumes: Sequence) -> dict[str, Path]:
    """{voxel hash: input} of the low-dose inputs; ValueError when one scan is given twice. The held-out slices are
    counted over all inputs in order, so the copies would hold out different slices and each copy's check slices
    would be trained on through the other: the no-worse check would score slices the model was tuned on."""
    seen: dict[str, Path] = {}
    for path, volume in zip(inputs, volumes):
        key = _voxels_sha256(volume.array)
        if key in seen:
            raise ValueError(f"{path} and {seen[key]} hold the same scan: give each low-dose scan once (its "
                             "held-out check slices would be trained on through the other copy)")
        seen[key] = path
    return seen


def _checked_normal_dose(normal_dose: Sequence[PathLike], low_dose: dict[str, Path]) -> list[Path]:
    """The normal-dose images, each read once before anything is learnt (a missing, unreadable or non-CT one fails
    in seconds, not after the noise model's training); ValueError for one that is a low-dose input: its held-out
    check slices would become the clean side of the training pairs."""
    from ..data import discover_images

    files = discover_images([str(p) for p in normal_dose])
    for path in files:
        key = _voxels_sha256(_read_low_dose_ct(Path(path)).array)
        if key in low_dose:
            raise ValueError(f"normal-dose image {path} is the low-dose input {low_dose[key]}: the normal-dose "
                             "images must be other scans (its held-out check slices would be trained on)")
    return files


def adapt_to_low_dose(
    low_dose: Sequence[PathLike],
    model: str,
    initial_weights: PathLike,
    output: PathLike,
    settings: AdaptSettings | None = None,
    *,
    normal_dose: Sequence[PathLike] | None = None,
    work_dir: PathLike | None = None,
    force: bool = False,
    overwrite: bool = False,
    report: Callable[[str], None] = log.info,
    tamper_for_tests: Callable[[nn.Module], None] | None = None,
) -> dict:
    """Adapt ``initial_weights`` to the noise of low-dose CT images (HU) and write ``output`` if it is no worse.

    Args:
        low_dose: the site's low-dose CT images (files or DICOM series folders), read as CT in HU.
        model: ``adl`` or ``tddl_gcn``; must match the network of ``initial_weights``.
        initial_weights: the weight file to start from (also the reference of the check).
        output: the adapted weight file (.pt); its report goes to :func:`report_path`.
        settings: :class:`AdaptSettings`.
        normal_dose: normal-dose CT images for the clean side of the pseudo pairs; default the starting model's
            denoised training slices.
        work_dir: scratch folder (kept); default a temporary folder (removed).
        force: write the output even when the check fails.
        overwrite: replace an existing output / report.
        report: receives progress lines.
        tamper_for_tests: test hook, None in use: called with the fine-tuned network (changed in place) after
            training, before it is exported and checked, so that a test can make the candidate worse by a known
            amount (the checks' refusal then does not hang on training dynamics).

    Returns:
        The report (also written as JSON): ``held_out`` slices, ``train_slices``, ``check`` (``criterion``,
        ``baseline_loss``, ``adapted_loss``, ``relative_change``, ``passed``), ``lesion_check`` (baseline and
        candidate contrast kept, ``passed``), ``passed`` (both), ``written``, ``settings``, ``seconds``.

    Raises:
        FileExistsError: output or report exist without ``overwrite`` (nothing is touched).
        AdaptationRefused: the check failed, or training diverged to NaN or infinite weights (the report is
            written, the weights are not; a diverged model not even with ``force``). Where ``output`` already
            holds weights, the report goes to :func:`refused_report_path` and theirs is left alone.
        ValueError: bad inputs (model mismatch, too few slices or noise patches, a low-dose scan given twice, a
            normal-dose image that is a low-dose input or no CT), before anything is learnt where the inputs show it.
    """
    from ..data import check_not_heldout, image_stem
    from ..engines.gated_fine_tuning import FineTuneSettings, adl_fine_tune_config, gcn_fine_tune_config
    from ..imaging import write_volume
    from ..evaluation.restoration_width import served_restoration, spread_slices
    from ..lesions.low_frequency_restoration import default_sigma_px
    from ..predict import load_denoiser, slice_denoiser
    from .pseudo_pairs import LearnedNoiseSource, noise_added_line
    from .workflow import denoised_stand_ins, learn_noise_model

    settings = settings or AdaptSettings()
    output, start_path = Path(output), Path(initial_weights)
    json_path = report_path(output)
    if model not in NETWORK_CLASSES:
        raise ValueError(f"model must be one of {', '.join(NETWORK_CLASSES)}, got {model!r}")
    existing = blocking_files(output)
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} already exists (add --overwrite to replace it)")
    inputs = [Path(p) for p in low_dose]
    if any(p.resolve() == output.resolve() or p.resolve() == start_path.resolve() for p in inputs):
        raise ValueError("the output or the initial weights are among the low-dose inputs")
    check_not_heldout(inputs)
    loaded = load_denoiser(start_path, device="cpu")
    held_class = loaded.metadata.get("network_class")
    if held_class != NETWORK_CLASSES[model]:
        raise ValueError(f"{start_path.name} holds a {held_class} network, not the {model} model's "
                         f"{NETWORK_CLASSES[model]}")
    if loaded.modality != "CT":
        raise ValueError(f"{start_path.name} is a {loaded.modality} model: adaptation learns CT noise in HU")
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    # 1. the split, fixed before anything is learnt
    volumes = [_read_low_dose_ct(Path(p)) for p in inputs]
    for path, volume in zip(inputs, volumes):
        if volume.array.ndim not in (2, 3):
            raise ValueError(f"{path}: expected a slice or a volume, got shape {volume.array.shape}")
    low_dose_scans = _refuse_repeated_scans(inputs, volumes)
    normal_files = _checked_normal_dose(normal_dose, low_dose_scans) if normal_dose else []
    stacks = [v.array[None] if v.array.ndim == 2 else v.array for v in volumes]
    held = holdout_indices([len(s) for s in stacks], int(settings.holdout_every))
    scratch = tempfile.TemporaryDirectory(prefix="adapt-") if work_dir is None else None
    work = Path(scratch.name if scratch else work_dir)
    try:
        train_dir = work / "train_low_dose"
        train_dir.mkdir(parents=True, exist_ok=True)
        train_files: dict[str, str] = {}
        held_groups: list[tuple[list[np.ndarray], tuple[float, float]]] = []  # per volume, for the lesion check
        held_record, train_record = [], []
        for index, (path, volume, stack, held_z) in enumerate(zip(inputs, volumes, stacks, held)):
            keep = [z for z in range(len(stack)) if z not in set(held_z)]
            held_groups.append(([np.asarray(stack[z], dtype=np.float32) for z in held_z],
                                (float(volume.spacing[1]), float(volume.spacing[0]))))  # (row, column) mm
            held_record.append({"input": str(path), "slices": held_z})
            train_record.append({"input": str(path), "slices": keep})
            stem = f"{index:04d}_{image_stem(path)}"  # unique: scan.2024 / scan.2025, or UID-named folders
            for start, stop in _runs(keep):  # contiguous training slices only, so 2.5D neighbours are real ones
                name = f"{stem}_z{start:04d}-{stop - 1:04d}"
                block = stack[start:stop] if volume.array.ndim == 3 else stack[start]  # a 2D input stays 2D
                part = dataclasses.replace(volume, array=np.ascontiguousarray(block), metadata=dict(volume.metadata))
                target = train_dir / f"{name}.nii.gz"
                write_volume(part, target, output_dtype="float32")
                train_files[name] = str(target)
        if not train_files:
            raise ValueError("no low-dose slice left to adapt on after holding out the check slices")
        report(f"{sum(len(h) for h in held)} held-out slice(s) for the check, "
               f"{sum(len(t['slices']) for t in train_record)} for adaptation")

        # 2. the scanner's noise, from the training slices only
        t0 = time.perf_counter()
        noise_model = learn_noise_model(list(train_files.values()), patch_size=int(settings.noise_patch_size),
                                        steps=int(settings.noise_steps), force_ct=True, device=settings.device,
                                        seed=int(settings.seed), progress=False, report=report,
                                        info={"command": "adapt", "images": list(train_files)},
                                        calibrate_level=bool(settings.calibrate_noise_level))
        noise_path = noise_model.save(work / "noise_model.pt")
        seconds["learn_noise"] = time.perf_counter() - t0

        # 3. pseudo pairs
        t0 = time.perf_counter()
        if normal_files:
            clean = [str(p) for p in normal_files]
            clean_kind = "given normal-dose images"
        else:
            clean = list(denoised_stand_ins(train_files, start_path, work / "pseudo_normal_dose",
                                            device=settings.device).values())
            clean_kind = "starting model's denoised training slices"
        # a real normal-dose scan carries noise of its own: only the rest of the learnt low-dose noise is added
        source = LearnedNoiseSource(clean, noise_path, seed=int(settings.seed), device=settings.device,
                                    progress=False, reference_noise_std_hu="estimate" if normal_files else None)
        noise_per_image = source.noise_per_image()
        report(noise_added_line(noise_per_image))
        seconds["pseudo_pairs"] = time.perf_counter() - t0

        # 4. fine-tuning from the starting weights
        t0 = time.perf_counter()
        tune = FineTuneSettings(steps=int(settings.steps), patch_size=settings.patch_size,
                                batch_size=int(settings.batch_size), lr=float(settings.lr),
                                samples_per_epoch=int(settings.samples_per_epoch), device=settings.device,
                                seed=int(settings.seed))
        kwargs = dict(loaded.metadata.get("network", {}).get("kwargs") or {})
        if model == "adl":
            from ..engines import train_adl as train

            config = adl_fine_tune_config(kwargs, "CT", tune, None)
            slice_context = config.slices // 2
        else:
            from ..engines import train_gcn as train

            config = gcn_fine_tune_config(kwargs, "CT", tune, None)
            slice_context = config.slice_context
        from ..data import ADLPatchDataset
        from ..weights.format import (NonFiniteWeightsError, export_weights, restoration_inherited_from,
                                      scaling_rule_for)
        from ..weights.lineage import start_lineage

        dataset = ADLPatchDataset(source, config.spatial_dims, int(config.patch_size),
                                  samples_per_epoch=tune.samples_per_epoch, seed=tune.seed,
                                  slice_context=slice_context)
        result = train(config, dataset, val_pairs=None, progress=False, initial_weights=start_path)
        if tamper_for_tests is not None:
            tamper_for_tests(result.generator)
        seconds["fine_tune"] = time.perf_counter() - t0
        record = result.training_record()
        record["adapted_from"] = {"file": Path(start_path).name}
        record["lineage"] = start_lineage(start_path)  # the start's record and its own lineage, start last
        # the weight file names inputs by file name (it travels; the site's folders may name patients), the
        # report next to it keeps the full paths
        record["data"] = {"kind": f"TDDL pseudo pairs: learned noise + {clean_kind}",
                          "low_dose_train": [dict(t, input=Path(t["input"]).name) for t in train_record],
                          "held_out": [dict(h, input=Path(h["input"]).name) for h in held_record]}
        # what the report says about the run, whatever the verdict
        run = {"model": model, "initial_weights": str(start_path), "output": str(output),
               "low_dose": [str(p) for p in inputs], "held_out": held_record, "train_slices": train_record,
               "pseudo_pairs": {"clean_side": clean_kind, "clean_images": clean,
                                "clean_noise_std_hu": source.reference_noise_std_per_volume,
                                "noise_per_image": noise_per_image, "noise_added": noise_added_line(noise_per_image)},
               "noise_model": noise_model.summary(),
               # the learnt soft-tissue level and the low-dose scans' measured one, or why it was not calibrated
               "noise_level": noise_model.level_record(),
               "settings": dataclasses.asdict(settings)}
        try:
            candidate = export_weights(result.generator, work / "adapted.pt", config, scaling_rule_for("CT"), record)
        except NonFiniteWeightsError as error:  # never written, not even with force: it would answer NaN
            seconds["total"] = time.perf_counter() - clock
            summary = {**run, "diverged": str(error), "check": None, "lesion_check": None, "passed": False,
                       "forced": False, "written": False, "seconds": seconds}
            written = _write_refusal(output, summary)
            raise AdaptationRefused(f"the adaptation's training diverged ({error}): nothing written, not even with "
                                    f"--force (report {written})", summary) from None

        # 5. the width it is served at, on the site's own noise: lesions planted in held-out low-dose slices (first,
        # so that the lesion check compares what each file serves)
        t0 = time.perf_counter()
        adapted_net = slice_denoiser(load_denoiser(candidate, device=settings.device), "CT", settings.device)
        restoration = served_restoration(restoration_inherited_from(start_path), default_sigma_px("CT"),
                                         adapted_net, spread_slices(held_groups), "held-out low-dose slices",
                                         seed=int(settings.seed))
        candidate = export_weights(result.generator, work / "adapted.pt", config, scaling_rule_for("CT"), record,
                                   low_frequency_restoration=restoration)
        seconds["restoration"] = time.perf_counter() - t0
        if restoration is not None:
            report(f"restoration width {restoration['sigma_px']:g} px ({restoration['chosen']})")

        # 6. the non-circular checks on the held-out low-dose slices: the loss on the bare networks, the lesions as
        # served (each file with its restoration width)
        t0 = time.perf_counter()
        loaded = [load_denoiser(path, device=settings.device) for path in (start_path, candidate)]
        start_net = slice_denoiser(loaded[0], "CT", settings.device)
        served = tuple(slice_denoiser(m, "CT", settings.device, served=True) for m in loaded)
        verdict = no_worse_checks(start_net, adapted_net, held_groups, settings, lesion_denoisers=served)
        seconds["check"] = time.perf_counter() - t0
        check, lesion_check, passed = verdict["check"], verdict["lesion_check"], verdict["passed"]
        seconds["total"] = time.perf_counter() - clock
        summary = {**run, "check": check, "lesion_check": lesion_check, "passed": passed,
                   "forced": bool(force and not passed), "written": bool(passed or force), "seconds": seconds,
                   "low_frequency_restoration": restoration}
        report(f"check (J-invariant loss on {sum(len(group) for group, _ in held_groups)} held-out slice(s)): "
               f"{_loss_line(check)}")
        report(f"lesion check, as served ({_lesion_line(lesion_check)})")
        if not (passed or force):
            written = _write_refusal(output, summary)
            refusal = held_out_refusal(check, lesion_check, "the starting one", "held-out low-dose slices")
            kept = f"; {output} and {json_path} kept as they were" if written != json_path else ""
            raise AdaptationRefused(f"the adapted model is {refusal}: nothing written (report {written}{kept}; "
                                    f"--force writes it anyway)", summary)
        # an earlier run's report (a refused one's "written": false, or the replaced weights') goes first: a run
        # killed between the two writes below then leaves new weights without a report, never with another's
        json_path.unlink(missing_ok=True)
        atomic_copy(candidate, output)  # a temp file in the output's folder, renamed over the target
        atomic_write_json(json_path, summary, indent=2)
        return summary
    finally:
        if scratch is not None:
            scratch.cleanup()
