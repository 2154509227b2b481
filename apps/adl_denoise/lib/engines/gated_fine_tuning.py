"""Fine-tuning a served denoiser on new pairs, and the rule that a worse model is never published.

Used by the MONAI Label app's train tasks (clinician corrections; TDDL adaptation to a scanner's own low-dose
noise), but free of server code so it can be tested and run alone:

1. :func:`split_validation` fixes the validation images *before* the run, by a hash of each image's name, so
   the comparison is on images neither model was fine-tuned on (and, beyond tiny sets, the split is stable
   between runs).
2. :func:`score_weights` scores the served weights and the candidate on those images (PSNR in the modality's
   window: CT [-160, 240] HU, MR 0..max of the target). Every check scores a file as it is served: its network
   and its own low-frequency restoration width (:func:`lib.predict.denoise_as_served`), not the bare network.
3. :func:`fine_tune` starts from the served weights and trains on the rest: ADL with a discriminator warm-up
   (weight files do not carry D) followed by the adversarial phase, i.e. the paper's G / D alternation with
   the adversarial term reaching G; the TDDL-GCN supervised.
4. :func:`decide_publication` publishes the candidate only when it is no worse than what is served, through
   :class:`lib.weights.store.ModelStore` (atomic replace, previous versions kept), and when every further check
   passes: :func:`keep_region_check` (no structure a clinician marked "keep" is blurred more than by the served
   model) and :func:`lib.engines.reference_set.reference_check` (no loss on a fixed reference set that the
   corrections cannot move). A CT candidate is served at its start's restoration width or at the width measured
   for it on lesions planted in the validation images, whichever gives more back. A run whose training diverged
   (NaN or infinite weights) writes no candidate and is rejected as "finite_weights".
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from ..data import ADLPatchDataset, ValidationPair
from ..runtime.clock import Stopwatch
from ..weights.format import (NonFiniteWeightsError, export_weights, restoration_inherited_from,
                              scaling_rule_for)
from ..weights.lineage import start_lineage
from ..weights.pseudonyms import pseudonymise_record
from .adl_training import ADLTrainingConfig, train_adl
from .gcn_training import GCNTrainingConfig, train_gcn

log = logging.getLogger(__name__)

__all__ = ["KEEP_TOLERANCE", "FineTuneSettings", "FineTuneResult", "KeepRegionCase", "split_validation",
           "score_weights", "fine_tune", "keep_region_check", "decide_publication", "adl_fine_tune_config",
           "gcn_fine_tune_config"]

#: relative tolerance of :func:`keep_region_check`: a candidate's error inside a marked structure may exceed the
#: served model's by at most 2 % (run-to-run jitter of a few fine-tuning steps), not more
KEEP_TOLERANCE = 0.02


@dataclass
class FineTuneSettings:
    """Settings of one fine-tuning run.

    ``steps``: optimiser steps (ADL: the first quarter warms the fresh discriminator up, the rest is adversarial);
    ``patch_size`` (multiples of 8; default 96 for the 2D ADL network, 48 for the 3D one and the GCN), ``batch_size``, ``lr`` (ADL's
    adversarial learning rate, the GCN's rate), ``lambda_adversarial`` (ADL), ``samples_per_epoch``,
    ``device`` ("cpu", "cuda" or "auto"), ``seed``, ``validation_every`` (steps; 0 = only at the end),
    ``roi_l1_weight`` (weight of the L1 inside the regions a clinician marked "keep", :func:`lib.losses.roi_l1_loss`,
    added to the generator's loss; it acts only where a training volume has such regions),
    ``keep_region_fraction`` (fraction of the patches drawn around a marked "keep" region where a training volume
    has one, :class:`lib.data.ADLPatchDataset` ``roi_fraction``: a few-millimetre structure would otherwise rarely be
    in a random patch).
    """

    steps: int = 200
    patch_size: int | None = None
    batch_size: int = 4
    lr: float = 5e-5
    lambda_adversarial: float = 0.01
    samples_per_epoch: int = 512
    device: str = "auto"
    seed: int = 0
    validation_every: int = 0
    roi_l1_weight: float = 5.0
    keep_region_fraction: float = 0.0

    def __post_init__(self) -> None:
        if int(self.steps) < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.patch_size is not None and (int(self.patch_size) < 8 or int(self.patch_size) % 8):
            raise ValueError(f"patch_size must be a multiple of 8, got {self.patch_size}")
        if int(self.batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not float(self.lr) > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= float(self.roi_l1_weight) < float("inf"):
            raise ValueError(f"roi_l1_weight must be >= 0, got {self.roi_l1_weight}")
        if not 0 <= float(self.keep_region_fraction) <= 1:
            raise ValueError(f"keep_region_fraction must be in [0, 1], got {self.keep_region_fraction}")


@dataclass
class FineTuneResult:
    """What a run produced: the ``candidate`` weight file, both models' validation scores, the record.

    ``candidate`` is None when training diverged (``diverged`` says how): no file was written, its score is -inf.
    ``restoration``: the candidate file's restoration entry (the width it is served at, how it was chosen), None
    where it names none.
    """

    candidate: Path | None
    baseline_score: dict
    candidate_score: dict
    record: dict = field(default_factory=dict)
    diverged: str | None = None
    restoration: dict | None = None

    @property
    def no_worse(self) -> bool:
        # explicit, not left to comparisons with NaN: a diverged run is never "no worse"
        if self.candidate is None or not np.isfinite(self.candidate_score["psnr"]):
            return False
        return self.candidate_score["psnr"] >= self.baseline_score["psnr"]


def split_validation(names: Sequence[str], fraction: float = 0.25, salt: str = "adl-denoise-validation"
                     ) -> tuple[list[str], list[str]]:
    """(train, validation) names. An image's side depends on its name alone (a SHA-1 hash against
    ``fraction``), so adding images never moves an earlier image across, and a later run never trains on an
    earlier run's validation image. The one exception is a tiny set: at least one image must be on each side, so
    when no image hashes below ``fraction`` the lowest-hashing one validates (and when all do, the highest one
    trains) until the set grows.

    Raises:
        ValueError: fewer than two images (one is needed to train and one to judge the result).
    """
    unique = sorted(set(map(str, names)))
    if len(unique) < 2:
        raise ValueError(f"fine-tuning needs at least 2 images (one is kept for validation), got {len(unique)}")
    keyed = sorted(unique, key=lambda n: hashlib.sha1(f"{salt}:{n}".encode()).hexdigest())
    score = {n: int(hashlib.sha1(f"{salt}:{n}".encode()).hexdigest()[:8], 16) / 2**32 for n in unique}
    validation = [n for n in unique if score[n] < fraction]
    if not validation:
        validation = [keyed[0]]
    if len(validation) == len(unique):
        validation = [n for n in validation if n != keyed[-1]]
    train = [n for n in unique if n not in validation]
    return train, validation


def score_weights(weights, pairs: Sequence[ValidationPair], device: str = "cpu") -> dict:
    """Mean PSNR (dB) of a denoiser's served output (:func:`lib.predict.denoise_as_served`: the network and the
    file's own restoration width) on full validation images, in each modality's window.

    ``weights``: a weight file or a :class:`lib.predict.LoadedDenoiser`. Returns ``{"psnr", "psnr_input",
    "images": {name: {...}}}``, ``psnr_input`` being the noisy input's own score.
    """
    from ..evaluation import psnr, window_for
    from ..predict import LoadedDenoiser, denoise_as_served, load_denoiser

    loaded = weights if isinstance(weights, LoadedDenoiser) else load_denoiser(weights, device=device)
    images = {}
    for pair in pairs:
        window = window_for(pair.modality, pair.clean)
        denoised = denoise_as_served(loaded, pair.noisy, pair.modality, device=device)
        entry = {"psnr_input": float(psnr(pair.noisy, pair.clean, window=window)),
                 "window": [float(w) for w in window]}
        if np.isfinite(denoised).all():
            entry["psnr"] = float(psnr(denoised, pair.clean, window=window))
        else:  # a diverged network: the worst possible score, not a crash
            entry.update(psnr=float("-inf"), non_finite_output=True)
        images[pair.name] = entry
    if not images:
        raise ValueError("no validation images to score on")
    return {"psnr": float(np.mean([v["psnr"] for v in images.values()])),
            "psnr_input": float(np.mean([v["psnr_input"] for v in images.values()])), "images": images}


def adl_fine_tune_config(kwargs: dict, modality: str, settings: FineTuneSettings, checkpoint_dir: Path | None
                         ) -> ADLTrainingConfig:
    """The ADL training config of a fine-tuning run from weights built with ``kwargs`` (the file's network
    arguments): discriminator warm-up, then adversarial steps, with ``settings``."""
    steps = int(settings.steps)
    d_warmup = max(1, steps // 4) if steps > 1 else 0
    spatial_dims = int(kwargs.get("spatial_dims", 2))
    # 3D: 48^3 patches by default (one 96^3 patch holds 24 times the voxels of a 2D batch of four 96^2 patches)
    patch = int(settings.patch_size or (96 if spatial_dims == 2 else 48))
    return ADLTrainingConfig(
        modality=modality, spatial_dims=spatial_dims, filters=tuple(kwargs["filters"]),
        enhancer_filters=int(kwargs.get("enhancer_filters", 48)), norm=str(kwargs.get("norm", "batch")),
        residual=bool(kwargs.get("residual", False)), slices=int(kwargs.get("in_channels", 1)), patch_size=patch,
        batch_size=int(settings.batch_size), steps_g_warmup=0, steps_d_warmup=d_warmup,
        steps_adversarial=steps - d_warmup, lr_warmup=float(settings.lr) * 2, lr_adversarial=float(settings.lr),
        lr_step_size=max(steps, 1), lambda_adversarial=float(settings.lambda_adversarial), seed=int(settings.seed),
        device=settings.device, checkpoint_dir=None if checkpoint_dir is None else str(checkpoint_dir),
        checkpoint_every=max(steps, 1), validation_every=int(settings.validation_every) or steps + 1,
        roi_l1_weight=float(settings.roi_l1_weight))


def gcn_fine_tune_config(kwargs: dict, modality: str, settings: FineTuneSettings, checkpoint_dir: Path | None
                         ) -> GCNTrainingConfig:
    """The TDDL-GCN training config of a fine-tuning run from weights built with ``kwargs``, with ``settings``."""
    names = {"in_channels": "slices", "k": "k"}
    fields_ = {names.get(k, k): v for k, v in kwargs.items() if k not in ("spatial_dims",)}
    fields_.pop("size_multiple", None)
    steps = int(settings.steps)
    return GCNTrainingConfig(
        modality=modality, **fields_, patch_size=int(settings.patch_size or 48), batch_size=int(settings.batch_size),
        steps=steps, lr=float(settings.lr), lr_step_size=max(steps, 1), seed=int(settings.seed), device=settings.device,
        checkpoint_dir=None if checkpoint_dir is None else str(checkpoint_dir), checkpoint_every=max(steps, 1),
        validation_every=int(settings.validation_every) or steps + 1, roi_l1_weight=float(settings.roi_l1_weight))


def fine_tune(
    initial_weights: str | os.PathLike,
    train_source,
    val_pairs: Sequence[ValidationPair],
    output: str | os.PathLike,
    settings: FineTuneSettings | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    data_description: dict | None = None,
    progress: bool = False,
    on_scored: Callable[[str, dict], None] | None = None,
    pseudonyms: Mapping[str, str] | None = None,
    width_images: tuple[str, Sequence[tuple[Sequence[np.ndarray], tuple[float, float]]]] | None = None,
) -> FineTuneResult:
    """Fine-tune the network of ``initial_weights`` on ``train_source`` and score it against the start.

    Args:
        initial_weights: the weights served now (an ADL or TDDL-GCN weight file).
        train_source: a source for :class:`lib.data.ADLPatchDataset` (e.g. ``PairedFolderSource.from_files``
            for corrections, :class:`lib.noise_learning.LearnedNoiseSource` for TDDL pseudo-pairs).
        val_pairs: the fixed validation images (full images in the modality's units).
        output: where the candidate weight file goes (never the served path: publishing is separate).
        settings: :class:`FineTuneSettings`.
        checkpoint_dir: training checkpoints (resumable), or None.
        data_description: stored in the candidate's training record (e.g. the image ids).
        progress: tqdm progress bars.
        on_scored: called with ``("baseline" | "candidate", score)`` as soon as each score is known.
        pseudonyms: ``{image id: pseudonym}``: the ids the candidate's training record must not name (datastore ids,
            :mod:`lib.weights.pseudonyms`), replaced wherever they appear in it. The scores keep the ids.
        width_images: (what they are, in words; (noisy CT slices (H, W) in HU, (row, column) pixel size in mm) per
            image, e.g. :func:`lib.evaluation.restoration_width.spread_slices` of a scanner's held-out low-dose
            images) to measure a CT 2D candidate's restoration width on; default the noisy side of ``val_pairs``.
    """
    from ..predict import load_denoiser

    settings = settings or FineTuneSettings()
    stopwatch = Stopwatch()
    loaded = load_denoiser(initial_weights, device="cpu")
    kwargs = dict(loaded.metadata.get("network", {}).get("kwargs") or {})
    network_class = loaded.metadata.get("network_class", "EfficientUNetDenoiser")
    modality = loaded.modality
    score_device = "cpu" if settings.device == "auto" else settings.device
    baseline = score_weights(loaded, val_pairs, device=score_device)
    if on_scored:
        on_scored("baseline", baseline)
    ckpt = None if checkpoint_dir is None else Path(checkpoint_dir)
    if network_class == "EfficientUNetDenoiser":
        config, train = adl_fine_tune_config(kwargs, modality, settings, ckpt), train_adl
        slice_context = config.slices // 2  # a 2.5D network trains on slice stacks
    elif network_class == "GCNDenoiser":
        config, train = gcn_fine_tune_config(kwargs, modality, settings, ckpt), train_gcn
        slice_context = config.slice_context
    else:
        raise ValueError(f"{initial_weights} holds a {network_class}, which cannot be fine-tuned here")
    patch = int(config.patch_size)
    dataset = ADLPatchDataset(train_source, config.spatial_dims, patch, samples_per_epoch=settings.samples_per_epoch,
                              seed=settings.seed, slice_context=slice_context,
                              roi_fraction=float(settings.keep_region_fraction))
    result = train(config, dataset, val_pairs=None, progress=progress, initial_weights=initial_weights)
    network = result.generator  # the denoiser of either result type
    record = result.training_record()
    record["fine_tuned_from"] = {"file": Path(initial_weights).name,
                                 "training": loaded.metadata.get("training", {}).get("data")}
    record["lineage"] = start_lineage(initial_weights)  # the start's record and its own lineage, start last
    record["data"] = dict(data_description or {}, validation_images=[p.name for p in val_pairs])
    record = pseudonymise_record(record, pseudonyms or {})
    restoration = restoration_inherited_from(initial_weights)
    try:
        candidate = export_weights(network, output, config, scaling_rule_for(modality), record,
                                   low_frequency_restoration=restoration)
    except NonFiniteWeightsError as error:  # diverged: nothing written, the worst score, never published
        candidate_score = {"psnr": float("-inf"), "psnr_input": baseline["psnr_input"], "non_finite_weights": True,
                           "images": {name: {**entry, "psnr": float("-inf"), "non_finite_weights": True}
                                      for name, entry in baseline["images"].items()}}
        if on_scored:
            on_scored("candidate", candidate_score)
        record["seconds_total"] = stopwatch.seconds
        return FineTuneResult(None, baseline, candidate_score, record, diverged=str(error))
    measured = _measured_restoration(candidate, restoration, width_images or _noisy_validation_side(val_pairs),
                                     config, score_device, settings.seed)
    if measured != restoration:
        candidate = export_weights(network, output, config, scaling_rule_for(modality), record,
                                   low_frequency_restoration=measured)
    candidate_score = score_weights(candidate, val_pairs, device=score_device)
    if on_scored:
        on_scored("candidate", candidate_score)
    record["seconds_total"] = stopwatch.seconds
    return FineTuneResult(Path(candidate), baseline, candidate_score, record, restoration=measured)


def _noisy_validation_side(val_pairs: Sequence[ValidationPair]
                           ) -> tuple[str, list[tuple[list[np.ndarray], tuple[float, float]]]]:
    """``fine_tune``'s default ``width_images``: the noisy side of the validation images (at most 8 slices)."""
    from ..evaluation.restoration_width import validation_slice_groups

    return "validation images' noisy side", validation_slice_groups(val_pairs)


def _measured_restoration(candidate: Path, inherited: dict | None,
                          images: tuple[str, Sequence[tuple[Sequence[np.ndarray], tuple[float, float]]]], config,
                          device: str, seed: int) -> dict | None:
    """The restoration entry a fine-tuned CT 2D candidate is served with: its start's width, or the width measured
    for it on lesions planted in ``images`` ((what they are, slice groups): the site's own scans), whichever gives
    more back (:func:`lib.evaluation.restoration_width.served_restoration`). ``inherited`` as it is for MR, a 3D
    network or images without a pixel size."""
    from ..evaluation.restoration_width import served_restoration
    from ..lesions.low_frequency_restoration import default_sigma_px
    from ..predict import load_denoiser, slice_denoiser

    measured_on, groups = images
    groups = list(groups) if config.modality == "CT" and config.spatial_dims == 2 else []
    if not groups:
        return inherited
    network = slice_denoiser(load_denoiser(candidate, device=device), "CT", device)
    return served_restoration(inherited, default_sigma_px("CT"), network, groups, measured_on, seed=seed)


@dataclass
class KeepRegionCase:
    """One correction with regions marked "keep", for :func:`keep_region_check`.

    ``noisy``: the original input; ``target``: the fine-tuning target (the correction inside keep regions);
    ``region_map``: uint8 label map; all (Z, H, W) or (H, W) in the modality's units. ``regions``: the keep
    regions (:class:`lib.data.regions.Region`); ``held_out``: True for a validation image (for the record).
    """

    name: str
    noisy: np.ndarray
    target: np.ndarray
    region_map: np.ndarray
    regions: list
    modality: str
    held_out: bool = False


def _keep_crop(case: KeepRegionCase, margin: int = 4) -> tuple[slice, ...]:
    """Slices of a volume around its keep regions (their z range +- ``margin`` slices; whole slices in-plane):
    the denoisers see whole slices as they do when serving, but only the slices that matter are denoised."""
    if case.region_map.ndim == 2:
        return (slice(None), slice(None))
    values = [r.value for r in case.regions]
    zs = np.nonzero(np.isin(case.region_map, values).any(axis=(1, 2)))[0]
    return (slice(max(0, int(zs.min()) - margin), int(zs.max()) + margin + 1), slice(None), slice(None))


def keep_region_check(served, candidate, cases: Sequence[KeepRegionCase], device: str = "cpu",
                      tolerance: float = KEEP_TOLERANCE) -> dict:
    """Does the candidate blur any marked structure more than the served model?

    Measure: for every keep region of every case (held-out AND training corrections), the mean absolute
    difference between the denoised image and the target inside the region (modality units: HU for CT), for
    the served and the candidate weights on the same input, each as served
    (:func:`lib.predict.denoise_as_served`: a structure the network blurs but its file's restoration gives back
    is not blurred for the reader, and a candidate served at a narrower width is judged with the noise that
    width gives back). A structure flattened, shifted or with invented
    texture raises it; it needs no background ring (which would be ill-defined for a vessel next to another
    marked region or an image border) and it measures what the clinician asked for: look like the correction
    there. A region fails when ``candidate > served * (1 + tolerance)``; the check passes when none fails.
    Regions are judged one by one, so a small lesion cannot hide behind a large region that improved.

    Returns ``{"check": "keep_regions", "passed", "tolerance", "regions": [{"image", "region", "name",
    "held_out", "voxels", "served_mae", "candidate_mae", "passed"}], "failed": [names]}``; with no case it
    passes with an empty list.
    """
    from ..predict import LoadedDenoiser, denoise_as_served, load_denoiser

    rows: list[dict] = []
    if cases:
        models = [w if isinstance(w, LoadedDenoiser) else load_denoiser(w, device=device) for w in (served, candidate)]
        for case in cases:
            crop = _keep_crop(case)
            noisy, target, region_map = case.noisy[crop], case.target[crop], case.region_map[crop]
            outputs = [denoise_as_served(m, noisy, case.modality, device=device, amp=False) for m in models]
            for region in case.regions:
                inside = region_map == region.value
                if not inside.any():
                    continue
                errors = [float(np.mean(np.abs(o[inside] - target[inside]))) if np.isfinite(o[inside]).all()
                          else float("inf") for o in outputs]
                passed = errors[1] <= errors[0] * (1.0 + tolerance)
                rows.append({"image": case.name, "region": int(region.value), "name": region.name,
                             "held_out": bool(case.held_out), "voxels": int(inside.sum()),
                             "served_mae": finite_or_none(errors[0]), "candidate_mae": finite_or_none(errors[1]),
                             "passed": bool(passed)})
    failed = [f"{r['image']}: {r['name']}" for r in rows if not r["passed"]]
    return {"check": "keep_regions", "passed": not failed, "tolerance": tolerance, "unit": "mean |output - target| "
            "inside the region, modality units (CT: HU)", "regions": rows, "failed": failed}


def decide_publication(result: FineTuneResult, store, model: str, modality: str, checks: Sequence[dict] = (),
                       validation_psnr_decides: bool = True, started_from_sha256: str | None = None,
                       **details) -> dict:
    """Publish ``result.candidate`` through ``store`` (:class:`lib.weights.store.ModelStore`) only if
    it scores no worse than the baseline on the fixed validation set AND every check in ``checks`` passed
    (each a dict with ``"check"`` (its name) and ``"passed"``, e.g. :func:`keep_region_check`,
    :func:`lib.engines.reference_set.reference_check`); record the decision either way.

    ``validation_psnr_decides``: False where the validation pairs' clean side is the served model's own output
    (the app's self-adaptation): the PSNR is then reported (``validation_psnr_role`` says why it does not count)
    and a check in ``checks`` must judge the candidate instead
    (:func:`lib.noise_learning.adaptation.held_out_low_dose_check`).

    ``started_from_sha256``: the SHA-256 of the served weights the run started from and was judged against; when
    the store serves other weights now (an admin rolled back, or another run published, while this one trained),
    the candidate is rejected (``served_changed``): publishing it would undo that change with weights never
    compared with what is served.

    Returns ``{"published": bool, "version": id or None, "baseline_psnr", "candidate_psnr", "checks": {name:
    check}, "rejected_by": [names of what failed: "finite_weights" (training diverged, no candidate file),
    "validation_psnr" and/or the checks, "served_changed"], "reason", ...}``.
    """
    summary = {"baseline_psnr": finite_or_none(result.baseline_score["psnr"]),
               "candidate_psnr": finite_or_none(result.candidate_score["psnr"]),
               "input_psnr": finite_or_none(result.candidate_score["psnr_input"]),
               "validation_images": sorted(result.candidate_score["images"]), **details}
    if not validation_psnr_decides:
        if not checks and result.candidate is not None:
            raise ValueError("a candidate whose validation PSNR does not decide needs another check to judge it")
        summary["validation_psnr_role"] = ("reported only: the validation targets are the served model's own "
                                           "outputs, which cannot judge it")
    if result.candidate is None:
        rejected_by = ["finite_weights"]
        summary["diverged"] = result.diverged
    else:
        rejected_by = [] if result.no_worse or not validation_psnr_decides else ["validation_psnr"]
    rejected_by += [str(c["check"]) for c in checks if not c["passed"]]
    summary["checks"] = {str(c["check"]): dict(c) for c in checks}
    # the check of what is served and the publication are one step: a rollback in the server (another process)
    # between them would be undone by the publication
    with store.changing():
        if started_from_sha256 is not None:
            served = store.served(model, modality)
            if served is None or served.sha256 != started_from_sha256:
                rejected_by.append("served_changed")
                summary["served_now"] = served.version if served is not None else None
        summary["rejected_by"] = rejected_by
        if not rejected_by:
            version = store.publish(result.candidate, model, modality, **summary)
            return {"published": True, "version": version.version, **summary}
    reasons = {"finite_weights": "training diverged: the candidate's weights hold NaN or infinite values (not written)",
               "validation_psnr": "worse than the served model on the fixed validation set",
               "keep_regions": "blurs a structure marked 'keep' more than the served model",
               "reference_set": "worse than the served model on the fixed reference set",
               "held_out_low_dose": "worse than the served model on the held-out low-dose images (J-invariant loss "
                                    "or planted lesions' contrast)",
               "served_changed": "the served weights changed while it trained (a rollback or another publication): "
                                 "it was judged against weights no longer served; fine-tune again"}
    # a check that says why in its own words (e.g. what was worse, or that it could not measure) is quoted
    summary["reason"] = "; ".join(summary["checks"].get(name, {}).get("reason")
                                  or reasons.get(name, f"failed the {name} check") for name in rejected_by)
    store.record(model, modality, "rejected", **summary)
    return {"published": False, "version": None, **summary}


def finite_or_none(value: float) -> float | None:
    """JSON has no infinities: a diverged model's -inf score is reported as None."""
    return float(value) if np.isfinite(value) else None


def settings_from_dict(values: dict) -> FineTuneSettings:
    """:class:`FineTuneSettings` from request parameters (strings allowed); unknown keys are ignored."""
    known = {f: type(getattr(FineTuneSettings(), f)) for f in asdict(FineTuneSettings())}
    out = {}
    for key, value in values.items():
        if key not in known or value is None or value == "":
            continue
        if key == "patch_size":
            out[key] = int(value)
        elif key == "device":
            out[key] = str(value)
        else:
            out[key] = known[key](value)
    return FineTuneSettings(**out)
