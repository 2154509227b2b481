"""MONAI Label train task of a learned denoiser: fine-tune from clinician corrections, or adapt to a scanner.

Design (documented deviation from ``BasicTrainTask``): MONAI Label's ignite trainer is built for segmentation
(Dice metrics, label transforms, publishing whatever is best *within* a run). Denoising needs its own loop, so
this task drives the project's trainers (:mod:`lib.engines`), which already implement ADL's alternating
G / D steps with the adversarial term reaching G (the role of ``train_iteration_update``), resumable checkpoints,
mixed precision and DDP. Around them, :mod:`lib.engines.gated_fine_tuning` fixes the validation set before the run and
publishes through :class:`lib.weights.store.ModelStore` only a model no worse than the served one.

Modes (request ``mode``):

* ``corrections`` (default): every datastore image whose ``final`` label is a clinician's correction (a corrected
  denoised volume, float, same grid) is a pair: input = the original image, target = the correction. A
  correction is a label saved through the app's ``PUT /datastore/label`` route, which stamps its info with
  :func:`correction_stamp` (``correction``, ``saved_by``, ``saved_utc``, the file's ``sha256`` and its image
  file's ``image_sha256``; clients cannot set these keys). A ``final`` label without the stamp, or whose file (or
  image file) no longer has the stamped hash (an infer result saved as a label, a file put into the datastore
  folder by hand, an image replaced under the same id), is not training data. An image may
  also carry a ``regions`` label (corrections that say where, :mod:`lib.data.regions`): a uint8 label map on its
  grid, saved with ``PUT /datastore/label?image=ID&tag=regions`` and the form field ``params`` =
  ``{"regions": [{"value", "name", "intent": "keep" | "strength"[, "strength": 0..2]}]}``, which MONAI Label
  stores as the label's info (read back with ``datastore.get_label_info(ID, "regions")``). Strength regions
  blend the target locally; keep regions become the volume's ``roi`` (ROI L1 of weight ``roi_l1_weight``,
  default 5) and are checked before publication (:func:`lib.engines.gated_fine_tuning.keep_region_check`).
* ``adapt_noise`` (CT; TDDL): no labels at all. The datastore's low-dose CT images teach a noise model; that
  noise is added to normal-dose images to make pseudo pairs (:func:`lib.noise_learning.workflow.adaptation_data`).
  Normal-dose images come from the ``normal_dose`` request/conf key (a folder or files); without it, the served
  model's own denoised versions of the low-dose images stand in (self-adaptation).

Other request keys: ``modality`` (``auto``: the modality of the data; must be one), ``steps``, ``patch_size``,
``batch_size``, ``lr``, ``lambda_adversarial``, ``device``, ``seed``, ``noise_steps`` (noise-model training steps),
``roi_l1_weight`` (weight of the L1 inside keep regions), ``calibrate_noise_level`` (``adapt_noise``: scale the
learnt noise to the low-dose images' measured soft-tissue noise; default true, ``cli.py adapt
--no-level-calibration`` is false).

Publication (both modes): the candidate must be no worse than the served model on the held-out images, must not
blur a keep region more (held-out and training corrections), and must not lose on the fixed reference set
(:mod:`lib.engines.reference_set`, cached under ``<model_dir>/reference_set``), each file scored as it is served
(with its restoration width); the decision in the status names the checks that rejected it (``rejected_by``) with
their numbers (``checks``). Self-adaptation (``adapt_noise`` without ``normal_dose``) validates against the served
model's own outputs, which cannot judge it: there the held-out low-dose images decide instead
(:func:`lib.noise_learning.adaptation.held_out_low_dose_check`: J-invariant loss and planted lesions, as
``cli.py adapt``), and neither the noise model nor the pseudo pairs learn from them.

Identity: the published file's training record names the datastore images (which may be patient-named file names or
series UIDs) only by keyed pseudonyms (:mod:`lib.weights.pseudonyms`); the model's version history on this server
(``GET /versions/{model}``) keeps the ids and ``record_pseudonyms`` ({pseudonym: id}) of each run.

Progress and results: ``stats()`` (MONAI Label's ``train_stats`` in ``/info``) reads a status file the run
writes (phase, step of total, scores, the publication decision). The run happens in MONAI Label's training
subprocess: killing it leaves the served weights untouched (they are only ever replaced by an atomic rename at
the very end).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.train import TrainTask

from ..data.regions import REGIONS_TAG, RegionsError, apply_regions, load_correction_regions
from ..data.sources import PairedFolderSource
from ..datastore import image_modality
from ..engines.gated_fine_tuning import (
    KeepRegionCase,
    decide_publication,
    finite_or_none,
    fine_tune,
    keep_region_check,
    settings_from_dict,
    split_validation,
)
from ..engines.reference_set import build_reference_set, reference_check
from ..evaluation.restoration_width import spread_slices
from ..imaging import ImageReadError, read_volume
from ..imaging.errors import ImageTooLargeError, one_line
from ..imaging.dicom_read import is_dicom_file
from ..imaging.io import check_voxels
from ..noise_learning.adaptation import AdaptSettings, held_out_low_dose_check
from ..noise_learning.workflow import adaptation_data
from ..pacs_corrections import CorrectionNotServed, one_search_per_series
from ..predict import check_device_name
from ..runtime.atomic import atomic_write_json
from ..runtime.clock import Stopwatch, utc_compact_stamp, utc_timestamp
from ..runtime.hashing import file_sha256
from ..runtime.switches import parse_bool
from ..weights.pseudonyms import pseudonym_map, site_key
from ..weights.store import ModelStore

log = logging.getLogger(__name__)

__all__ = ["CORRECTION_KEYS", "DenoiserTrainTask", "TrainingDataError", "correction_pairs", "correction_stamp",
           "is_clinician_correction", "remove_stale_work", "stored_regions"]

MODES = ("corrections", "adapt_noise")
# label-info keys only the server writes (the label route's stamp); a client sending them is overridden / refused
CORRECTION_KEYS = ("correction", "saved_by", "saved_utc", "sha256", "regions_sha256", "image_sha256",
                   "series_identity")


def correction_stamp(label_path: str | os.PathLike, user: str | None,
                     image_path: str | os.PathLike | None = None) -> dict[str, Any]:
    """The label-info stamp of a clinician's correction saved through the label route: ``{"correction": True,
    "saved_by": user, "saved_utc": now, "sha256": hash of the label file}``, plus ``image_sha256``, the hash of
    the image file it corrects, when that is a file (a DICOMweb study is a folder): the correction belongs to those
    voxels, not to whatever is stored under the id later."""
    stamp = {"correction": True, "saved_by": str(user or "anonymous"), "saved_utc": utc_timestamp(),
             "sha256": file_sha256(label_path)}
    if image_path and os.path.isfile(image_path):
        stamp["image_sha256"] = file_sha256(image_path)
    return stamp


def is_clinician_correction(info: dict | None, label_path: str | os.PathLike | None,
                            image_path: str | os.PathLike | None = None) -> bool:
    """Whether a label (its datastore ``info`` and file) is a stamped correction whose file is still the one
    stamped (same SHA-256), of an image file that is still the one it was made for (where the stamp names one
    and ``image_path`` is given: an image replaced on disk under the same id leaves its old correction behind)."""
    if not isinstance(info, dict) or info.get("correction") is not True or not info.get("saved_by"):
        return False
    if not label_path or not os.path.isfile(label_path):
        return False
    try:
        if file_sha256(label_path) != info.get("sha256"):
            return False
        if image_path is not None and info.get("image_sha256"):
            return os.path.isfile(image_path) and file_sha256(image_path) == info["image_sha256"]
        return True
    except OSError:
        return False


def remove_stale_work(work_root: Path) -> list[Path]:
    """Remove the scratch folders ``<work_root>/<model>/<stamp>-<pid>`` of runs whose process is gone (a run
    killed by ``DELETE /train`` or a crash never reaches its ``finally``); returns those removed. A folder of a
    live process, or one whose name does not end in a pid, is kept."""
    removed = []
    for folder in sorted(Path(work_root).glob("*/*")):
        pid = folder.name.rsplit("-", 1)[-1]
        if not folder.is_dir() or not pid.isdigit() or int(pid) == os.getpid() or _pid_alive(int(pid)):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        if not folder.exists():
            removed.append(folder)
            log.info("removed the scratch folder %s of a run that was stopped or killed", folder)
    return removed


class TrainingDataError(ValueError):
    """The datastore does not hold what the requested training needs (message says what is missing)."""


def correction_pairs(datastore: Datastore, modality: str | None = None, skipped: list | None = None,
                     max_voxels: int | None = None) -> list[dict]:
    """``[{"id", "image", "label", "modality", "regions", "regions_info"}]`` for every image whose ``final`` label
    is a clinician's correction (:func:`is_clinician_correction`); ``regions`` is the path of its region map
    (label tag ``regions``) or None, and ``regions_info`` that label's info (the ``params`` it was saved with:
    ``{"regions": [...]}``). The ids of ``final`` labels that are not corrections are appended to ``skipped``.
    A PACS series' correction is a pair only while the PACS lists the series, once, with the identity stamped when
    it was saved (:func:`lib.pacs_corrections.check_binding`, one series search per series; skipped, with a WARNING
    saying what changed, otherwise; a PACS that cannot be reached or answers the search with an error raises).
    ``max_voxels``: the voxel limit of an image read for its modality, and of each pair's image and label, checked
    from their headers (:func:`lib.imaging.io.check_voxels`; None: :func:`lib.imaging.max_voxels`).

    Raises:
        lib.imaging.errors.ImageTooLargeError: a pair's image or label is over the limit (the reader's message,
            after the study it belongs to): a request is refused before a run is launched, also where the study's
            modality comes from its info and nothing else is read here.
        TrainingDataError: a pair's image or label cannot be read (its headers: missing, corrupt, not an image;
            the reader's message, after the study it belongs to): the run would fail on it.
    """
    with one_search_per_series():  # a PACS series' study and patient: asked once, for all of its labels' reads
        return _correction_pairs(datastore, modality, skipped, max_voxels)


def _correction_pairs(datastore: Datastore, modality: str | None, skipped: list | None,
                      max_voxels: int | None) -> list[dict]:
    check = getattr(datastore, "check_training_data", None)  # a PACS's kept corrections: their audit log readable
    if check is not None:
        check()
    pairs = []
    for image_id in sorted(datastore.get_labeled_images()):
        try:  # its label first: a PACS series re-sent under another study / patient is not downloaded
            info = datastore.get_label_info(image_id, "final")
            label = datastore.get_label_uri(image_id, "final")
        except CorrectionNotServed as problem:
            if problem.status >= 500:  # the PACS's search failed: no training on a part of the corrections
                raise
            log.warning("not training data: %s", problem)
            if skipped is not None:
                skipped.append(image_id)
            continue
        if not label:  # no label file (a series a DICOM SEG of the PACS references): its image not downloaded
            if skipped is not None:
                skipped.append(image_id)
            continue
        image = datastore.get_image_uri(image_id)
        if not is_clinician_correction(info, label, image):
            if skipped is not None:
                skipped.append(image_id)
            continue
        try:
            volume_modality = image_modality(datastore, image_id, image, max_voxels=max_voxels)
        except ImageTooLargeError as error:
            raise _of_study(error, f"study {image_id}") from None
        except ImageReadError as error:
            raise _unreadable(error, f"study {image_id}") from None
        if modality and volume_modality != modality.upper():
            continue
        sizes = []
        for path, what in ((image, f"study {image_id}"), (label, f"the correction of study {image_id}")):
            try:
                sizes.append(check_voxels(path, max_voxels))
            except ImageTooLargeError as error:
                raise _of_study(error, what) from None
            except ImageReadError as error:  # the run's reader would fail on it, after the request was accepted
                raise _unreadable(error, what) from None
        _check_same_size(image_id, image, label, *sizes)
        regions, info = _regions_of_correction(datastore, image_id)
        pairs.append({"id": image_id, "image": image, "label": label, "modality": volume_modality,
                      "regions": regions or None, "regions_info": info})
    return pairs


def _check_same_size(image_id: str, image: str, label: str, image_size: tuple, label_size: tuple) -> None:
    """:class:`TrainingDataError` naming both files when a correction's size (from its header) is not its study's:
    the run pairs them voxel by voxel and failed on it, after the request was accepted. Only where both are image
    files (a DICOM study's size is given in another axis order)."""
    if Path(str(image)).is_dir() or is_dicom_file(image):
        return
    image_size, label_size = _without_trailing_ones(image_size), _without_trailing_ones(label_size)
    if image_size != label_size:
        raise TrainingDataError(
            f"the correction of study {image_id}: {Path(str(label)).name} holds {' x '.join(map(str, label_size))} "
            f"voxels, its study {Path(str(image)).name} {' x '.join(map(str, image_size))} (the study was replaced "
            "since the correction was saved?); save the correction again on the study's grid; no run was started")


def _without_trailing_ones(size: tuple) -> tuple:
    """``size`` without its trailing 1s: a single slice is (x, y) in one file and (x, y, 1) in another."""
    size = tuple(int(v) for v in size)
    while len(size) > 2 and size[-1] == 1:
        size = size[:-1]
    return size


def _unreadable(error: ImageReadError, what: str) -> TrainingDataError:
    """A :class:`TrainingDataError` saying that ``what`` (the study, or its correction) cannot be read, and why (the
    reader's message: the file and what is wrong with it)."""
    return TrainingDataError(f"{what}: {one_line(error)}; no run was started")


def _of_study(error: ImageTooLargeError, what: str) -> ImageTooLargeError:
    """``error`` with ``what`` (the study, or its correction) before the reader's message."""
    return ImageTooLargeError(f"{what}: {error}", error.shape, error.voxels, error.limit)


def _regions_of_correction(datastore: Datastore, image_id: str) -> tuple[str | None, dict | None]:
    """(path, info) of the region map that was sent WITH the image's current correction, else (None, None).

    The correction's stamp names the SHA-256 of the region map it was saved with (``regions_sha256``, checked by
    the label route against the stored map); a map stored for an earlier correction, or changed since, does not
    match and is not applied to a later correction sent without regions."""
    final_info = datastore.get_label_info(image_id, "final") or {}
    return stored_regions(datastore, image_id, final_info.get("regions_sha256"))


def stored_regions(datastore: Datastore, image_id: str, regions_sha256: Any) -> tuple[str | None, dict | None]:
    """(path, info) of ``image_id``'s stored region map (label tag ``regions``) when it is a stamped correction
    whose stamp and file both have SHA-256 ``regions_sha256``; (None, None) otherwise (no hash, no map, another
    map, or a file changed since it was stamped)."""
    if not regions_sha256 or REGIONS_TAG not in (datastore.get_labels_by_image_id(image_id) or {}):
        return None, None
    path = datastore.get_label_uri(image_id, REGIONS_TAG)
    info = dict(datastore.get_label_info(image_id, REGIONS_TAG) or {})
    if not is_clinician_correction(info, path, datastore.get_image_uri(image_id)) or \
            info.get("sha256") != regions_sha256:
        return None, None
    return path, info


def pair_regions(pair: dict, max_voxels: int | None = None):
    """The validated :class:`lib.data.regions.CorrectionRegions` of a correction pair, or None without regions
    (``max_voxels``: the limit of the reads, None: :func:`lib.imaging.max_voxels`).

    Raises:
        TrainingDataError: the region map or its declaration is unusable (names the image and the problem).
    """
    if not pair.get("regions"):
        return None
    try:
        return load_correction_regions(pair["id"], pair["image"], pair["regions"], pair.get("regions_info") or {},
                                       max_voxels)
    except RegionsError as error:
        raise TrainingDataError(str(error)) from None


class DenoiserTrainTask(TrainTask):
    """Fine-tuning / adaptation of one learned denoiser (see the module docstring).

    Args:
        model: ``"adl"`` or ``"tddl_gcn"``.
        store: the app's :class:`ModelStore`.
        modalities: modalities the model serves.
        defaults: default request values (from the app's conf), e.g. ``{"steps": 200, "device": "auto"}``.
        max_voxels: the voxel limit of every image the task reads, the server's (``--conf max_voxels_<model>``,
            else ``max_voxels``, as the model's infer task has it); None: :func:`lib.imaging.max_voxels`
            (``ADL_MAX_VOXELS``).
        voxel_limit_setting: the conf key that sets ``max_voxels``: a request refused over a model's own limit
            (``max_voxels_<model>``) names the model and that key, not the generic ones.
    """

    def __init__(self, model: str, store: ModelStore, modalities: tuple[str, ...], defaults: dict | None = None,
                 max_voxels: int | None = None, voxel_limit_setting: str = "max_voxels"):
        super().__init__(f"Fine-tune {model} from clinician corrections, or adapt it to a scanner's low-dose noise")
        self.model = model
        self.store = store
        self.modalities = tuple(m.upper() for m in modalities)
        self.defaults = dict(defaults or {})
        self.max_voxels = max_voxels
        self.voxel_limit_setting = voxel_limit_setting

    # --- paths
    @property
    def status_path(self) -> Path:
        return self.store.model_dir / "train_stats" / f"{self.model}.json"

    def work_dir(self, run_id: str) -> Path:
        return self.store.model_dir / "work" / self.model / run_id

    # --- MONAI Label interface
    def config(self) -> dict[str, Any]:
        return {"mode": list(MODES), "modality": ["auto", *[m.lower() for m in self.modalities]],
                "steps": int(self.defaults.get("steps", 200)), "device": ["auto", "cpu", "cuda"],
                "patch_size": 0, "batch_size": 4, "lr": 5e-5, "normal_dose": "", "roi_l1_weight": 5.0,
                "keep_region_fraction": 0.0, "calibrate_noise_level": True}

    def stats(self) -> dict[str, Any]:
        """The last run's status file, with the current step read from the trainer's log while it runs."""
        if not self.status_path.is_file():
            return {"status": "never trained", "key_metric": "PSNR (dB)"}
        try:
            stats = json.loads(self.status_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {"status": "unknown"}
        if stats.get("status") == "running" and not _pid_alive(stats.get("pid")):
            # the run's process is gone without writing its end: stopped or killed (served weights untouched);
            # its scratch folder (checkpoints, candidate) goes now, not at the next run
            stats.update(status="interrupted", phase="interrupted")
            remove_stale_work(self.store.model_dir / "work")
        if stats.get("status") == "running" and stats.get("work_dir"):
            log_file = Path(stats["work_dir"]) / "checkpoints" / "train_log.jsonl"
            last = _last_line(log_file)
            if last:
                stats["step"] = last.get("step")
                stats["loss"] = {k: v for k, v in last.items() if k.startswith(("loss", "g_", "d_", "l1", "total"))}
        return stats

    def validate_request(self, request: dict, datastore: Datastore) -> dict:
        """Check, before a run is launched, that the request makes sense and the data is there.
        Returns the resolved request (mode, modality, ...). Raises :class:`TrainingDataError` otherwise, and
        :class:`~lib.imaging.errors.ImageTooLargeError` for an image over the limit (naming this model and its
        ``max_voxels_<model>`` where that is the limit)."""
        try:
            return self._resolved_request(request, datastore)
        except ImageTooLargeError as error:
            if self.voxel_limit_setting == "max_voxels":
                raise  # the reader's words: ADL_MAX_VOXELS or --conf max_voxels
            raise error.naming_limit(f"{self.model}'s limit",
                                     f"--conf {self.voxel_limit_setting} on the server") from None

    def _resolved_request(self, request: dict, datastore: Datastore) -> dict:
        params = dict(self.defaults)
        params.update({k: v for k, v in request.items() if v is not None and v != ""})
        mode = str(params.get("mode", "corrections"))
        if mode not in MODES:
            raise TrainingDataError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        try:
            check_device_name(params.get("device"))  # torch would take "meta" and fail at the first step
            settings = settings_from_dict(params)
        except (TypeError, ValueError) as error:
            raise TrainingDataError(f"bad training parameter: {error}") from None
        try:
            calibrate = parse_bool(params.get("calibrate_noise_level", True), "calibrate_noise_level")
        except ValueError as error:
            raise TrainingDataError(str(error)) from None
        asked = str(params.get("modality", "auto")).upper()
        if asked not in ("AUTO", *self.modalities):
            raise TrainingDataError(f"{self.model} serves {', '.join(self.modalities)}; modality {asked!r} is unknown")
        if mode == "corrections":
            skipped: list[str] = []
            pairs = correction_pairs(datastore, None if asked == "AUTO" else asked, skipped, self.max_voxels)
            modalities = sorted({p["modality"] for p in pairs})
            if skipped:
                log.warning("final labels that are not clinician corrections (not saved through PUT /datastore/label,"
                            " or changed since) are not training data: %s", ", ".join(skipped))
            if not pairs:
                unstamped = (f" ({len(skipped)} 'final' label(s) were not saved as corrections through PUT "
                             "/datastore/label and are not training data)") if skipped else ""
                raise TrainingDataError("no corrected studies to learn from: save a corrected denoised volume as the "
                                        f"'final' label of at least 2 images first{unstamped}")
            if asked == "AUTO":
                if len(modalities) > 1:
                    raise TrainingDataError(f"corrections of several modalities ({', '.join(modalities)}): say which "
                                            "one to fine-tune with 'modality'")
                asked = modalities[0]
            if asked not in self.modalities:
                raise TrainingDataError(f"the corrections are {asked}, which {self.model} does not serve")
            if len(pairs) < 2:
                raise TrainingDataError(f"only {len(pairs)} corrected {asked} study: fine-tuning needs at least 2 (one "
                                        "is kept aside to check that the new model is no worse)")
            for pair in pairs:  # regions are checked before a run starts: a bad map is a 422, not a failed run
                pair["regions_loaded"] = pair_regions(pair, self.max_voxels)
            items = pairs
        else:
            if asked == "AUTO":
                asked = "CT"
            if asked != "CT":
                raise TrainingDataError("adapt_noise learns CT noise in HU: modality must be ct")
            images = [i for i in sorted(datastore.list_images())
                      if image_modality(datastore, i, max_voxels=self.max_voxels) == "CT"]
            if len(images) < 2:
                raise TrainingDataError(f"adapt_noise needs at least 2 low-dose CT images in the datastore, found "
                                        f"{len(images)}")
            items = images
        if self.store.served(self.model, asked) is None:
            raise TrainingDataError(f"no {self.model} weights for {asked} to fine-tune: install or train them first")
        # items: the correction pairs, or the low-dose CT image ids: what the run then trains on
        return {"mode": mode, "modality": asked, "settings": settings, "items": items, "params": params,
                "calibrate_noise_level": calibrate}

    def __call__(self, request: dict, datastore: Datastore) -> dict:
        resolved = self.validate_request(request, datastore)
        run_id = f"{utc_compact_stamp()}-{os.getpid()}"
        remove_stale_work(self.store.model_dir / "work")  # what killed runs left behind
        work = self.work_dir(run_id)
        work.mkdir(parents=True, exist_ok=True)
        modality, settings, mode = resolved["modality"], resolved["settings"], resolved["mode"]
        served = self.store.served(self.model, modality)
        status: dict[str, Any] = {
            "status": "running", "model": self.model, "mode": mode, "modality": modality, "run_id": run_id,
            "started_utc": utc_timestamp(), "pid": os.getpid(), "work_dir": str(work), "total_steps": settings.steps,
            "key_metric": "PSNR (dB)", "starting_weights": served.version, "phase": "preparing data",
        }
        # who asked for the run, and the audit entry of the request (set by the server's train route): the
        # publication's or rejection's entry names them, this process serves no HTTP request of its own
        requested = {key: resolved["params"][key] for key in ("requested_by", "training_request_seq")
                     if key in resolved["params"]}
        status.update(requested)
        atomic_write_json(self.status_path, status)
        stopwatch = Stopwatch()
        try:
            keep_cases: list[KeepRegionCase] = []
            held_out_low_dose: dict = {}  # self-adaptation: the low-dose images that judge the candidate
            if mode == "corrections":
                source, val_pairs, description, keep_cases = self._corrections_data(resolved["items"], modality)
            else:
                source, val_pairs, description, held_out_low_dose = self._adaptation_data(datastore, served.path,
                                                                                          work, resolved)
            status.update(phase="training", data=description)
            atomic_write_json(self.status_path, status)

            def on_scored(which: str, score: dict) -> None:
                status[f"{which}_psnr"] = finite_or_none(score["psnr"])
                status["input_psnr"] = finite_or_none(score["psnr_input"])
                atomic_write_json(self.status_path, status)

            # the candidate file names datastore images by pseudonyms; this server's history keeps the ids
            pseudonyms = pseudonym_map(site_key(self.store.model_dir), _datastore_ids(resolved))
            # self-adaptation: slices of the held-out low-dose images (the scanner's own noise) judge the candidate
            # and give the width it is served at
            held_out_slices = _spread_low_dose_slices(held_out_low_dose, max_voxels=self.max_voxels)
            result = fine_tune(served.path, source, val_pairs, work / "candidate.pt", settings,
                               checkpoint_dir=work / "checkpoints", data_description=description, on_scored=on_scored,
                               pseudonyms=pseudonyms,
                               width_images=("held-out low-dose images", held_out_slices) if held_out_slices else None)
            status.update(phase="checking the candidate (marked regions, reference set"
                                + (", held-out low-dose images)" if held_out_low_dose else ")"))
            atomic_write_json(self.status_path, status)
            # a diverged run left no candidate file: nothing to check, decide_publication rejects it
            checks = ([] if result.candidate is None
                      else self._checks(served.path, result.candidate, keep_cases, modality, settings.device))
            if held_out_slices and result.candidate is not None:
                device = "cpu" if settings.device == "auto" else settings.device
                # 4 of the 16 J-invariant mask shifts: both networks on the same pixels, a quarter of the passes
                checks.append(held_out_low_dose_check(served.path, result.candidate,
                                                      [(np.stack(group), px) for group, px in held_out_slices],
                                                      AdaptSettings(seed=settings.seed, device=device, check_shifts=4)))
            decision = decide_publication(result, self.store, self.model, modality, checks=checks,
                                          validation_psnr_decides=not held_out_low_dose, mode=mode,
                                          candidate_restoration=result.restoration,
                                          run_id=run_id, started_from=served.version,
                                          started_from_sha256=served.sha256, **requested,
                                          images=description.get("train_images"),
                                          record_pseudonyms={v: k for k, v in sorted(pseudonyms.items())})
            status.update(status="done", phase="finished", finished_utc=utc_timestamp(), decision=decision,
                          seconds=round(stopwatch.seconds, 1),
                          serving=(self.store.served(self.model, modality) or served).version)
            atomic_write_json(self.status_path, status)
            log.info("%s %s fine-tuning: candidate %s dB vs served %s dB -> %s", self.model, modality,
                     decision["candidate_psnr"], decision["baseline_psnr"],
                     "published " + str(decision["version"]) if decision["published"] else "kept the served model")
            return status
        except BaseException as error:
            status.update(status="failed", phase="failed", finished_utc=utc_timestamp(),
                          error=f"{type(error).__name__}: {error}".splitlines()[0])
            atomic_write_json(self.status_path, status)
            raise
        finally:
            # checkpoints and the candidate are scratch: published versions are kept by the model store
            shutil.rmtree(work, ignore_errors=True)

    # --- the checks beyond the validation PSNR
    def _checks(self, served_path: Path, candidate: Path, keep_cases: list[KeepRegionCase], modality: str,
                device: str) -> list[dict]:
        """:func:`keep_region_check` on the corrections' keep regions and :func:`reference_check` on the fixed
        reference set of the modality (built once, cached under the model folder)."""
        device = "cpu" if device == "auto" else device
        reference = build_reference_set(modality, self.store.model_dir / "reference_set")
        return [keep_region_check(served_path, candidate, keep_cases, device=device),
                reference_check(served_path, candidate, reference, device=device)]

    # --- data
    def _corrections_data(self, pairs: list[dict], modality: str):
        """(training source, validation pairs, description, keep-region cases) of the corrections; regions
        make each volume's target (:func:`lib.data.regions.apply_regions`) before anything is split into
        patches or scored, so validation PSNR, training and the keep check all see the same targets."""
        by_id = {p["id"]: p for p in pairs}
        train_ids, val_ids = split_validation(list(by_id))
        regions = {i: (by_id[i]["regions_loaded"] if "regions_loaded" in by_id[i]
                       else pair_regions(by_id[i], self.max_voxels)) for i in by_id}
        source = PairedFolderSource.from_files([(i, by_id[i]["image"], by_id[i]["label"]) for i in train_ids],
                                               modality=modality, max_voxels=self.max_voxels)
        val_source = PairedFolderSource.from_files([(i, by_id[i]["image"], by_id[i]["label"]) for i in val_ids],
                                                   modality=modality, max_voxels=self.max_voxels)
        keep_cases = []
        for volumes, held_out in ((source.volumes, False), (val_source.volumes, True)):
            for volume in volumes:
                marked = regions.get(volume.name)
                if marked is None:
                    continue
                apply_regions(volume, marked)
                if marked.keep_regions:
                    keep_cases.append(KeepRegionCase(volume.name, volume.noisy, volume.clean,
                                                     marked.region_map.reshape(volume.clean.shape),
                                                     marked.keep_regions, volume.modality, held_out))
        description = {"kind": "clinician corrections", "train_images": train_ids, "validation_images": val_ids}
        marked_ids = {i: r.describe() for i, r in regions.items() if r is not None}
        if marked_ids:
            description["regions"] = marked_ids
        return source, val_source.validation_pairs(), description, keep_cases

    def _adaptation_data(self, datastore: Datastore, served_path: Path, work: Path, resolved: dict):
        """TDDL pseudo pairs from the datastore's low-dose CT images; the request's numbers where it gave them.
        Returns (source, validation pairs, description, held-out low-dose images: id -> path, self-adaptation
        only)."""
        params = resolved["params"]
        numbers = {key: int(params[key]) for key in ("noise_steps", "noise_patch_size", "seed") if key in params}
        data = adaptation_data({i: datastore.get_image_uri(i) for i in resolved["items"]}, work,
                               normal_dose=params.get("normal_dose") or None, denoiser_weights=served_path,
                               noise_info={"source": "datastore low-dose images"},
                               calibrate_noise_level=resolved["calibrate_noise_level"], max_voxels=self.max_voxels,
                               **numbers)
        return data.source, data.validation_pairs, data.description, data.held_out_low_dose


def _spread_low_dose_slices(images: dict, max_slices: int = 8,
                            max_voxels: int | None = None) -> list[tuple[list[np.ndarray], tuple[float, float]]]:
    """At most ``max_slices`` slices (HU) of the low-dose CT images ``images`` (id -> path), spread over them as
    :func:`spread_slices` spreads them, each image's with its (row, column) pixel size in mm, read under
    ``max_voxels`` (None: :func:`lib.imaging.max_voxels`). Copies: one volume is in memory at a time."""
    paths = list(images.values())[:max_slices]
    groups = []
    for path in paths:
        volume = read_volume(path, modality="CT", max_voxels=max_voxels)
        stack = volume.array[None] if volume.array.ndim == 2 else volume.array
        pixel = (float(volume.spacing[1]), float(volume.spacing[0]))
        for slices, _ in spread_slices([(list(stack), pixel)], max(1, max_slices // len(paths))):
            groups.append(([np.array(s, dtype=np.float32) for s in slices], pixel))
    return groups


def _datastore_ids(resolved: dict) -> list[str]:
    """The datastore ids a run trains or validates on: the corrections' images, or the low-dose CT images."""
    return [str(item["id"] if isinstance(item, dict) else item) for item in resolved["items"]]


def _last_line(path: Path) -> dict | None:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 8192))
            lines = [line for line in f.read().decode("utf-8", "replace").splitlines() if line.strip()]
        return json.loads(lines[-1]) if lines else None
    except (OSError, ValueError):
        return None


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (TypeError, ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    try:  # a killed child its parent has not reaped yet is a zombie: gone, though os.kill still finds it
        with open(f"/proc/{int(pid)}/stat", encoding="ascii", errors="replace") as handle:
            return handle.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except (OSError, IndexError):
        return True
