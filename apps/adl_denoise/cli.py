#!/usr/bin/env python
"""Command line for the denoising app: ``python apps/adl_denoise/cli.py VERB ...``.

Verbs:
  simulate   make a noisy version of a volume (low-dose CT in the sinogram domain, MR Rician, generic noise)
  denoise    denoise a volume with one of the available models (classical baselines or a trained ADL or
             TDDL-GCN network)
  denoise-batch  denoise every series of a folder tree or DICOMweb server (resumable; one process or torchrun)
  train      train an ADL or TDDL-GCN denoiser on clean images (synthetic physics noise or a learned noise
             model) or on noisy/clean pairs
  learn-noise  learn a CT scanner's noise from its low-dose images alone (TDDL noise model for train --noise-model)
  adapt      adapt an ADL or TDDL-GCN model to a site's own low-dose CT scans alone (learn-noise, pseudo pairs,
             fine-tune, then a self-supervised no-worse check on held-out low-dose slices)
  train-lesion-detector  train the lesion detector of lesion-aware training (train --lesion-aware)
  share-weights  copy a weight file for another site: its training record names no image id and no folder

Every verb reads and writes DICOM series folders, NIfTI, NRRD and MHA, keeps the input's geometry and value
convention (CT in HU), never overwrites without ``--overwrite`` and exits non-zero with a one-line reason
on bad input.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

from lib.model_dispatch import (ADL_3D_MODEL, ADL_MODEL, AUTO_MODEL, DENOISE_LEARNED_MODELS, GCN_MODEL,
                                LEARNED_MODELS, MODEL_LABELS, DenoiseOptions, choose_model, denoise_volume,
                                refuse_constant)
from lib.imaging import ImageReadError, ImageWriteError, Volume, denoising_derivation, read_volume, write_volume

EXIT_BAD_INPUT = 2
#: exit status of an unexpected failure (a bug; --debug shows the traceback)
EXIT_FAILURE = 1
MODALITY_CHOICES = ("auto", "ct", "mr", "other")
NOISE_KINDS = ("ct-lowdose", "rician", "gaussian", "poisson", "speckle")
RECONSTRUCTION_FILTERS = ("ramp", "shepp-logan", "cosine", "hamming", "hann", "smooth")

log = logging.getLogger("adl_denoise.cli")


class CommandError(Exception):
    """A user-facing failure: printed as one line, exit status 2."""


# --------------------------------------------------------------------------------------------- helpers
def _positive_float(text: str) -> float:
    value = float(text)
    if not np.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not np.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def _dose_fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"dose fraction must be in (0, 1], got {text}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def _odd_window(text: str) -> int:
    value = _positive_int(text)
    if value < 3 or value % 2 == 0:
        raise argparse.ArgumentTypeError(f"must be an odd number >= 3, got {text}")
    return value


def _restoration_width(text: str) -> float:
    from lib.lesions.low_frequency_restoration import check_sigma_px

    try:
        return check_sigma_px(float(text))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _overlap(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"overlap must be in [0, 1), got {text}")
    return value


def _resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise CommandError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    return name


def _read_input(args: argparse.Namespace) -> Volume:
    modality = None if args.modality == "auto" else {"ct": "CT", "mr": "MR", "other": "OT"}[args.modality]
    series_uid = getattr(args, "series_uid", None)
    if series_uid and not _is_dicom_source(Path(args.input).expanduser()):
        raise CommandError(f"--series-uid picks a series of a DICOM folder, but {args.input} is not one")
    volume = read_volume(args.input, series_uid=series_uid, modality=modality)
    if modality is not None and volume.metadata.get("modality_source") == "dicom" and volume.modality != modality:
        # the tag decides: a CT denoised as MR (or the reverse) would also be written as an object of the other kind
        raise CommandError(f"{args.input} is a DICOM {volume.modality} (its Modality tag): --modality "
                           f"{args.modality} contradicts it; leave --modality out for DICOM input")
    if modality is not None:
        volume.modality = modality
    refuse_constant(volume, str(args.input))
    log.info("read %s: %s %s, spacing %s mm", args.input, volume.modality, volume.array.shape,
             tuple(round(s, 4) for s in volume.spacing))
    return volume


def _is_dicom_source(path: Path) -> bool:
    """A folder (of DICOM files: the reader says so if not) or a DICOM file."""
    from lib.imaging.dicom_read import is_dicom_file

    return path.is_dir() or (path.is_file() and is_dicom_file(path))


def _check_output(args: argparse.Namespace) -> None:
    """Refuse an output that cannot be written before any work is done (reading and denoising a series can take
    hours): the input itself, an existing file without --overwrite, an extension no writer takes, a folder (a
    derived DICOM series) for an input that is not DICOM, a parent that is a file or cannot be written to."""
    from lib.imaging import WRITE_SUFFIXES

    out, inp = Path(args.output).expanduser().resolve(), Path(args.input).expanduser().resolve()
    if out == inp:
        raise CommandError("--output is the input itself: refusing to overwrite the original")
    if out.exists() and not args.overwrite:
        raise CommandError(f"{args.output} already exists (add --overwrite to replace it)")
    name = out.name.lower()
    suffix = ".nii.gz" if name.endswith(".nii.gz") else out.suffix.lower()
    if out.is_dir() or not suffix:
        if inp.exists() and not _is_dicom_source(inp):
            raise CommandError(f"--output {args.output} is a folder (a derived DICOM series), but {args.input} is not "
                               f"DICOM: give a file name ending in {', '.join(WRITE_SUFFIXES)}")
    elif suffix not in WRITE_SUFFIXES:
        raise CommandError(f"--output {args.output}: unsupported extension {suffix!r}; use {', '.join(WRITE_SUFFIXES)} "
                           "or a folder for a derived DICOM series")
    _check_writable_parent(out.parent, args.output)


def _check_weight_output(output: Path, given: str) -> None:
    """Before any work: a weight-file output that is no folder and whose folder this process can write."""
    if output.is_dir():
        raise CommandError(f"--output {given} is a folder: give a .pt file name")
    _check_writable_parent(output.parent, given)


def _check_writable_parent(folder: Path, output: str, option: str = "--output") -> None:
    """The nearest existing folder of ``folder`` (where the output's missing folders would be made) is a folder
    this process can write to; CommandError naming ``option`` and ``output`` otherwise."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise CommandError(f"{option} {output}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CommandError(f"{option} {output}: {folder} cannot be written to (permission denied)")


def _write_output(volume: Volume, args: argparse.Namespace, description_suffix: str, derivation: str,
                  derived_image_type: str = "DENOISED") -> None:
    """Write the result; ``derivation`` and ``derived_image_type`` go to a derived DICOM series (what made it)."""
    path = write_volume(volume, args.output, overwrite=args.overwrite, series_description_suffix=description_suffix,
                        derivation=derivation, derived_image_type=derived_image_type, durable=True)
    print(f"wrote {path}")


# --------------------------------------------------------------------------------------------- simulate
def simulate_noise(volume: Volume, args: argparse.Namespace) -> tuple[np.ndarray, str]:
    """Apply the noise model chosen on the command line; returns (noisy array, description suffix)."""
    from lib import noise

    kind = args.noise or {"CT": "ct-lowdose", "MR": "rician"}.get(volume.modality)
    if kind is None:
        raise CommandError(f"modality of {args.input} is unknown: give --modality ct|mr or --noise {'|'.join(NOISE_KINDS)}")
    image = volume.array.astype(np.float32)
    if kind == "ct-lowdose":
        if volume.modality != "CT":
            raise CommandError(f"low-dose CT simulation needs a CT in HU, but {args.input} is {volume.modality}")
        geometry = noise.ParallelBeamGeometry(n_views=args.views, detector_bin_mm=args.detector_bin_mm)
        settings = noise.LowDoseCTSettings(
            dose_fraction=args.dose,
            full_dose_photons=args.full_dose_photons,
            electronic_noise_std=args.electronic_noise,
            reconstruction_filter=args.filter,
            filter_cutoff=args.filter_cutoff,
            geometry=geometry,
            target_noise_std_hu=args.target_noise_hu,
            reference_has_noise=not args.reference_noise_free,
        )
        pixel_size = (float(volume.spacing[1]), float(volume.spacing[0]))  # (row, column) = (y, x) in mm
        noisy = noise.simulate_low_dose_ct(image, pixel_size, settings, seed=args.seed,
                                           device=_resolve_device(args.device), progress=True)
        suffix = f" [simulated {args.dose:.0%} dose]"
    elif kind == "rician":
        noisy = noise.add_rician_noise(image, args.noise_percent, seed=args.seed)
        suffix = f" [Rician {args.noise_percent:g}%]"
    elif kind == "gaussian":
        noisy = noise.add_gaussian_noise(image, args.sigma, seed=args.seed)
        suffix = f" [Gaussian sigma {args.sigma:g}]"
    elif kind == "poisson":
        noisy = noise.add_poisson_noise(image, args.peak, seed=args.seed)
        suffix = f" [Poisson peak {args.peak:g}]"
    else:
        noisy = noise.add_speckle_noise(image, args.sigma, seed=args.seed)
        suffix = f" [speckle {args.sigma:g}]"
    return noisy, suffix


def cmd_simulate(args: argparse.Namespace) -> int:
    _check_output(args)
    volume = _read_input(args)
    start = time.perf_counter()
    noisy, suffix = simulate_noise(volume, args)
    log.info("simulated in %.1f s", time.perf_counter() - start)
    _write_output(volume.with_array(noisy), args, suffix, f"Noise simulation: {suffix.strip(' []')}", "SIMULATED")
    return 0


# --------------------------------------------------------------------------------------------- denoise
def _int_list(text: str, name: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in str(text).replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise CommandError(f"{name} must be integers separated by commas, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise CommandError(f"{name} must be positive integers, got {text!r}")
    return values


def _min_max(text: str | None, name: str) -> tuple[float, float] | None:
    """``"MIN,MAX"`` -> (min, max) floats; None stays None."""
    if not text:
        return None
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise CommandError(f"{name} must be MIN,MAX, got {text!r}") from None
    return lo, hi


def _denoise_options(args: argparse.Namespace, model: str) -> DenoiseOptions:
    """The denoising options of ``denoise`` / ``denoise-batch`` for ``model`` (``args.model``, or it resolved)."""
    return DenoiseOptions(model=model, weights=Path(args.weights) if args.weights else None,
                          roi_size=_int_list(args.roi_size, "--roi-size") if args.roi_size else None,
                          overlap=args.overlap, sw_batch_size=args.sw_batch_size, fp32=args.fp32, planes=args.planes,
                          search_window=args.search_window,
                          low_frequency_restoration=args.low_frequency_restoration)


def _check_denoise_arguments(args: argparse.Namespace) -> None:
    """Refuse learned-model options given with a classical model, and --search-window without the TDDL-GCN."""
    if args.model not in DENOISE_LEARNED_MODELS + (AUTO_MODEL,):
        given = [o for o, v in (("--weights", args.weights), ("--roi-size", args.roi_size), ("--overlap", args.overlap),
                                ("--sw-batch-size", args.sw_batch_size), ("--fp32", args.fp32 or None),
                                ("--planes", None if args.planes == "auto" else args.planes),
                                ("--low-frequency-restoration", args.low_frequency_restoration))
                 if v is not None]
        if given:
            raise CommandError(f"{', '.join(given)} only appl{'y' if len(given) > 1 else 'ies'} to the learned models "
                               f"({', '.join(DENOISE_LEARNED_MODELS)})")
    if args.search_window is not None and args.model != GCN_MODEL:
        raise CommandError(f"--search-window only applies to --model {GCN_MODEL}")


def cmd_denoise(args: argparse.Namespace) -> int:
    _check_denoise_arguments(args)
    _check_output(args)
    volume = _read_input(args)
    device = _resolve_device(args.device)  # fail early on an unavailable GPU, before any work
    if volume.metadata.get("modality_source") == "guessed":
        # the choice of model, weights and CT's HU handling follow it: say so where a wrong guess can be seen
        other = "mr" if volume.modality == "CT" else "ct"
        print(f"modality: {volume.modality} (guessed from the values: the file carries no modality; "
              f"add --modality {other} if it is {other.upper()})")
    if args.model == AUTO_MODEL:
        args.model, note = choose_model(_denoise_options(args, AUTO_MODEL), volume)
        print(f"model: {args.model}" + (f" ({note})" if note else ""))
    start = time.perf_counter()
    result = denoise_volume(volume, _denoise_options(args, args.model), device, name=str(args.input))
    log.info("denoised with %s in %.1f s", args.model, time.perf_counter() - start)
    _write_output(volume.with_array(result.array), args, f" [denoised {args.model}]",
                  denoising_derivation(result.model, result.weights_version, result.weights_sha256,
                                       result.low_frequency_restoration))
    return 0


# --------------------------------------------------------------------------------------------- parser
def _add_io_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", "-i", required=True, help="DICOM series folder, or a .dcm/.nii/.nii.gz/.nrrd/.mha file")
    parser.add_argument("--output", "-o", required=True,
                        help="output file (.nii.gz, .nrrd, .mha) or a folder for a derived DICOM series (DICOM input only)")
    parser.add_argument("--series-uid", help="SeriesInstanceUID to read when the input folder holds several series")
    parser.add_argument("--modality", choices=MODALITY_CHOICES, default="auto",
                        help="override the modality (default: from DICOM, else guessed from the values)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="compute device (default: GPU when present)")
    parser.add_argument("--overwrite", action="store_true", help="replace the output if it exists (never the input)")


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model and the learned models' options (``denoise`` and ``denoise-batch``)."""
    parser.add_argument("--model", default=AUTO_MODEL,
                        choices=(AUTO_MODEL, "bm3d", "nlm", "gaussian", "bm4d") + DENOISE_LEARNED_MODELS,
                        help="denoising model (default auto: adl where weights for the input's modality are "
                             f"installed, else bm3d; {ADL_3D_MODEL}: ADL's 3D network; {GCN_MODEL}: the graph-"
                             "convolutional TDDL-GCN, a CT model)")
    adl = parser.add_argument_group("learned models (ADL, TDDL-GCN)")
    adl.add_argument("--weights", help="weight file (default by model and modality: model/<model>_ct.pt or "
                                       "<model>_mr.pt, else model/pretrained_<model>_ct.pt / _mr.pt)")
    adl.add_argument("--roi-size", help="sliding-window size, multiples of 8: N or N,N[,N] (default 512x512 for a "
                                        "2D network, 96^3 for a 3D one)")
    adl.add_argument("--overlap", type=_overlap, help="sliding-window overlap fraction in [0, 1) (default 0.25)")
    adl.add_argument("--sw-batch-size", type=_positive_int,
                     help="windows (2D: slices) per forward pass (default 4 on a GPU, 1 on a CPU; tddl_gcn 1)")
    adl.add_argument("--fp32", action="store_true",
                     help="float32 throughout; by default ADL runs in bfloat16 on a CPU with native bfloat16 (AMX / "
                          "AVX512-BF16, 2-4x faster, within a fraction of a HU) and in fp16 on a GPU")
    adl.add_argument("--planes", choices=("auto", "slices", "orthogonal"), default="auto",
                     help=f"2D {ADL_MODEL} on a volume: 'slices' denoises slice by slice; 'orthogonal' averages the "
                          "axial, coronal and sagittal passes (3x the time, better on near-isotropic MR); 'auto' "
                          "(default) does that for MR with near-cubic voxels and at least 32 along every axis")
    adl.add_argument("--search-window", type=_odd_window,
                     help=f"{GCN_MODEL}: side of the non-local search window (odd; default: the one stored with the "
                          "weights, e.g. 21; up to 49 as in the TDDL code, ~1.5x the time on CPU)")
    adl.add_argument("--low-frequency-restoration", type=_restoration_width, metavar="SIGMA_PX",
                     help="give back the low-pass (in-plane Gaussian of this width in pixels) of what the network "
                          "removed, where a small low-contrast lesion's lost contrast lies, for some noise (default: "
                          "0.8 for CT, off for MR, where a width is applied inside the imaged body only; 0 = the network "
                          "alone; larger restores less; see bench/README.md)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cli.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--verbose", "-v", action="store_true", help="log details")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    sim = verbs.add_parser("simulate", help="simulate a noisy (e.g. low-dose) version of a volume",
                           description="Simulate a noisy version of a volume. CT: low dose in the sinogram domain "
                                       "(HU -> attenuation, parallel-beam projection, Poisson + electronic noise, FBP). "
                                       "MR: Rician noise at a percentage of the maximum. Generic: Gaussian, Poisson, speckle.")
    _add_io_arguments(sim)
    sim.add_argument("--noise", choices=NOISE_KINDS, help="noise model (default: ct-lowdose for CT, rician for MR)")
    sim.add_argument("--seed", type=_non_negative_int, default=0, help="random seed (same seed, same noise)")
    ct = sim.add_argument_group("low-dose CT")
    ct.add_argument("--dose", type=_dose_fraction, default=0.25, help="dose fraction of the input scan (default 0.25)")
    ct.add_argument("--full-dose-photons", type=_positive_float, default=1e6,
                    help="incident photons per detector bin at full dose (default 1e6)")
    ct.add_argument("--target-noise-hu", type=_positive_float,
                    help="calibrate the photon count per slice so the ADDED soft-tissue noise has this std (HU)")
    ct.add_argument("--electronic-noise", type=float, default=10.0, help="electronic noise std in counts (default 10)")
    ct.add_argument("--filter", choices=RECONSTRUCTION_FILTERS, default="hann", help="FBP reconstruction filter (default hann)")
    ct.add_argument("--filter-cutoff", type=_positive_float, default=1.0, help="filter cut-off as a fraction of Nyquist")
    ct.add_argument("--views", type=int, default=720, help="projections over 180 degrees (default 720)")
    ct.add_argument("--detector-bin-mm", type=_positive_float, help="detector bin width in mm (default: the pixel size)")
    ct.add_argument("--reference-noise-free", action="store_true",
                    help="the input has no noise of its own (a phantom): add the full low-dose noise, not the difference")
    mr = sim.add_argument_group("MR and generic noise")
    mr.add_argument("--noise-percent", type=_positive_float, default=5.0, help="Rician sigma as %% of the maximum (default 5)")
    mr.add_argument("--sigma", type=_positive_float, default=25.0, help="Gaussian std (image units) or speckle std (fraction)")
    mr.add_argument("--peak", type=_positive_float, default=1000.0, help="Poisson: counts at the image maximum")
    sim.set_defaults(func=cmd_simulate)

    den = verbs.add_parser("denoise", help="denoise a volume",
                           description="Denoise a CT or MR volume; the output keeps the input's geometry, CT stays in HU.")
    _add_io_arguments(den)
    _add_model_arguments(den)
    den.set_defaults(func=cmd_denoise)

    _add_batch_parser(verbs)
    _add_train_parser(verbs)
    _add_learn_noise_parser(verbs)
    _add_adapt_parser(verbs)
    _add_lesion_detector_parser(verbs)
    _add_share_weights_parser(verbs)
    return parser


# --------------------------------------------------------------------------------------------- denoise-batch
#: exit status of denoise-batch when some series failed (the others were denoised; see the manifest)
EXIT_SERIES_FAILED = 1


def cmd_denoise_batch(args: argparse.Namespace) -> int:
    """Every series of a folder tree or DICOMweb server (:mod:`lib.batch`): thin argument checking."""
    from lib.batch.discovery import SeriesFilter, parse_date_range
    from lib.batch.dicomweb import is_dicomweb_url
    from lib.batch.runner import BatchSettings, JobNotStarted, run_batch
    from lib.imaging import READ_SUFFIXES

    _check_denoise_arguments(args)
    if args.store_to_pacs and not is_dicomweb_url(args.input):
        raise CommandError("--store-to-pacs sends the results back to the DICOMweb server they came from: give a "
                           "DICOMweb --input URL (http://HOST/dicom-web)")
    if not is_dicomweb_url(args.input) and not Path(args.input).expanduser().is_dir():
        raise CommandError(f"--input {args.input} is neither a folder nor a DICOMweb URL (http://...)")
    output = Path(args.output).expanduser().resolve()
    if output.exists() and not output.is_dir():
        raise CommandError(f"--output {args.output} is a file: give a folder (the results mirror the input tree)")
    _check_writable_parent(output if output.exists() else output.parent, args.output)
    series_filter = SeriesFilter(modality=args.modality, description=args.series_description,
                                 study_dates=parse_date_range(args.study_date) if args.study_date else None)
    settings = BatchSettings(source=args.input, output=Path(args.output).expanduser(),
                             options=_denoise_options(args, args.model), device=args.device,
                             series_filter=series_filter, store_to_pacs=args.store_to_pacs,
                             progress=not args.no_progress,
                             file_modality=args.file_modality.upper() if args.file_modality else None)
    try:
        summary, main_rank = run_batch(settings, report=lambda line: print(line, flush=True),
                                       report_error=lambda line: print(f"error: {line}", file=sys.stderr, flush=True))
    except JobNotStarted:  # torchrun: a rank could not start, the ranks do not see the same series, ...
        return EXIT_BAD_INPUT  # every rank said it before any rank ended (see run_batch)
    except RuntimeError as error:  # another run writes to the same --output
        raise CommandError(str(error)) from None
    if not main_rank:
        return 0  # rank 0 reports the job and sets its exit status
    print(f"summary: {summary.line()}; manifest {Path(args.output) / '_denoise_batch' / 'manifest.jsonl'}",
          flush=True)
    if summary.incomplete:  # a rank failed or its summary file was not written (said above): whatever it counted
        failed = [str(rank) for rank, kind, _ in summary.incomplete if kind == "failed"]
        unwritten = [str(rank) for rank, kind, _ in summary.incomplete if kind == "summary file"]
        counted = "no series was counted" if summary.total == 0 else f"{summary.total} series counted"
        if failed:  # said even when nothing was counted: not "no series found", which would hide the failure
            print(f"error: the run is incomplete ({counted}): rank{'s' * (len(failed) > 1)} {', '.join(failed)} failed, said above; the "
                  "manifest holds what it recorded, a rerun does the rest", file=sys.stderr)
        if unwritten:
            print(f"error: the summary file of rank{'s' * (len(unwritten) > 1)} {', '.join(unwritten)} was not written ({counted}), said above",
                  file=sys.stderr)
        return EXIT_FAILURE
    if summary.total == 0:
        if series_filter.active or is_dicomweb_url(args.input):  # a query that matches nothing today can be right
            from lib.pacs_corrections import without_credentials

            print(f"warning: no series in {without_credentials(args.input)} matched", file=sys.stderr)  # no password
            return 0
        print(f"error: no series found in {args.input} (DICOM series folders, {', '.join(READ_SUFFIXES)} files; "
              "hidden folders are not searched)", file=sys.stderr)
        return EXIT_BAD_INPUT
    return EXIT_SERIES_FAILED if summary.failed else 0


def _add_batch_parser(verbs) -> None:
    bat = verbs.add_parser(
        "denoise-batch", help="denoise every series of a folder tree or a DICOMweb server (resumable, torchrun)",
        description="Denoise every series of a folder tree (DICOM series folders, several series per folder, "
                    "NIfTI, NRRD, MHA) or of a DICOMweb server, each written as 'denoise' would: a derived DICOM "
                    "series for DICOM input, the same file type otherwise, under --output mirroring the input. "
                    "A manifest (--output/_denoise_batch/) records every series; a rerun skips what is done and "
                    "retries what failed. Under 'torchrun --nproc_per_node N' the series are shared out over the "
                    "processes (largest first, balanced by voxels), one GPU each when there are GPUs. Exit status "
                    "1 when some series failed or the run is incomplete (under torchrun rank 0's process: a rank "
                    "failed or its summary file was not written, said on stderr; the other ranks exit 0); 2 on bad "
                    "arguments, while another run writes to the same --output, or, each rank's process, when a "
                    "torchrun job stops before any work (a rank could not start, the ranks see different series "
                    "lists, --output is not shared by all machines). torchrun itself exits 1 when any of its "
                    "processes exits non-zero; its failure report gives each one's status ('exitcode : 2'; -15 "
                    "for a process it stopped once another had ended).")
    bat.add_argument("--input", "-i", required=True, metavar="FOLDER_OR_URL",
                     help="folder tree, or a DICOMweb service root (http://HOST:PORT/dicom-web)")
    bat.add_argument("--output", "-o", required=True, help="output folder (shared by all machines of a job)")
    _add_model_arguments(bat)
    flt = bat.add_argument_group("which series (DICOM tags; NIfTI/NRRD/MHA files are left out when a filter is set)")
    flt.add_argument("--modality", help="only series of this Modality (e.g. CT, MR)")
    flt.add_argument("--study-date", metavar="FIRST-LAST",
                     help="only studies dated within YYYYMMDD-YYYYMMDD (inclusive; either end may be left out)")
    flt.add_argument("--series-description", metavar="PATTERN",
                     help="only series whose SeriesDescription matches this pattern (* and ?, case-insensitive)")
    bat.add_argument("--file-modality", choices=("ct", "mr"),
                     help="modality of the NIfTI/NRRD/MHA files, which carry no tag (default: guessed from the values; "
                          "DICOM series use their Modality tag)")
    bat.add_argument("--store-to-pacs", action="store_true",
                     help="DICOMweb input: also send each derived series back to the server (STOW-RS; checked by "
                          "asking the server for it; a rerun re-sends series whose store failed, and sends those an "
                          "earlier run without this option only wrote; a derived series an earlier run sent, even one "
                          "killed before recording it, is found on the server and never stored twice)")
    bat.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                     help="compute device (default: GPU when present; under torchrun the GPU of LOCAL_RANK)")
    bat.add_argument("--no-progress", action="store_true", help="no progress bars (they show on a terminal only)")
    bat.set_defaults(func=cmd_denoise_batch)


# --------------------------------------------------------------------------------------------- train
def _given(**values):
    """The values the user gave (not None): the library's defaults apply to the rest."""
    return {name: value for name, value in values.items() if value is not None}


def cmd_train(args: argparse.Namespace) -> int:
    import os

    from lib.data import TrainingDataRecipe, build_training_data
    from lib.engines import train_adl, train_gcn

    rank = int(os.environ.get("RANK", "0"))
    main_rank = rank == 0
    output = Path(args.output).expanduser()
    if output.suffix not in (".pt", ".pth"):
        raise CommandError(f"--output must be a .pt weight file, got {args.output}")
    if output.exists() and not args.overwrite:  # --resume too: it continues a run, it does not own this file
        raise CommandError(f"{args.output} already exists (add --overwrite to replace it)")
    _check_weight_output(output, args.output)
    if args.resume:
        resume = Path(args.resume).expanduser()
        if not (resume / "last.pt" if resume.is_dir() else resume).is_file():
            raise CommandError(f"--resume {args.resume}: no checkpoint there (a run's checkpoint folder, holding "
                               "last.pt, or a checkpoint file)")
    paired = args.noisy_dir is not None or args.clean_dir is not None
    if paired and args.clean:
        raise CommandError("give either --clean (synthetic noise) or --noisy-dir with --clean-dir (real pairs), not both")
    if paired and (args.noisy_dir is None or args.clean_dir is None):
        raise CommandError("--noisy-dir and --clean-dir go together")
    if not paired and not args.clean:
        raise CommandError("no training data: give --clean FILES_OR_FOLDERS or --noisy-dir D --clean-dir C")
    if paired and args.noise not in (None, "auto"):
        raise CommandError("--noise applies to --clean (synthetic noise) only; paired data bring their own noise")
    if args.noise_model is not None:  # TDDL: pseudo pairs from a learned noise model
        if paired:
            raise CommandError("--noise-model makes pseudo pairs from --clean images; it does not apply to "
                               "--noisy-dir/--clean-dir")
        if args.noise not in (None, "auto"):
            raise CommandError("give either --noise (physics noise) or --noise-model (learned noise), not both")
        if args.modality.upper() != "CT":
            raise CommandError("--noise-model is a CT noise model (learned in HU): use --modality ct")
        if not Path(args.noise_model).expanduser().is_file():
            raise CommandError(f"noise model {args.noise_model} not found (make one with 'cli.py learn-noise')")
    if (args.val_noisy_dir is None) != (args.val_clean_dir is None):
        raise CommandError("--val-noisy-dir and --val-clean-dir go together")
    gcn = args.model == GCN_MODEL
    _check_gcn_train_arguments(args, gcn)
    if args.resume:  # a cut or foreign checkpoint: said now, not after the training data are built (minutes)
        from lib.engines.adl_training import load_adl_checkpoint
        from lib.engines.gcn_training import load_gcn_checkpoint

        try:
            (load_gcn_checkpoint if gcn else load_adl_checkpoint)(Path(args.resume).expanduser())
        except ValueError as error:
            raise CommandError(str(error)) from None
    modality = args.modality.upper()
    device = _resolve_device(args.device)
    filters = _int_list(args.filters, "--filters") if args.filters else None
    disc_filters = _int_list(args.disc_filters, "--disc-filters") if args.disc_filters else None
    if any(f is not None and len(f) != 4 for f in (filters, disc_filters)):
        raise CommandError("--filters and --disc-filters take 4 channel counts, e.g. 96,128,160,192")
    patch = _int_list(args.patch_size, "--patch-size") if args.patch_size else ()
    ct_filters, ct_cutoff = _ct_noise_arguments(args, modality, paired)
    initial_weights = None
    if args.initial_weights:
        if args.resume:
            raise CommandError("give either --initial-weights (start a new run from a weight file) or --resume "
                               "(continue a run from its checkpoint), not both")
        initial_weights = Path(args.initial_weights).expanduser()
        if not initial_weights.is_file():
            raise CommandError(f"--initial-weights {args.initial_weights} not found")
    checkpoint_dir = Path(args.checkpoint_dir).expanduser() if args.checkpoint_dir else \
        output.with_name(output.stem + "_checkpoints")
    if not args.resume and (checkpoint_dir / "last.pt").is_file() and not args.overwrite:
        raise CommandError(f"{checkpoint_dir} holds the checkpoint of an earlier run: add --resume {checkpoint_dir} to "
                           "continue it, --overwrite to start over (its checkpoints are replaced), or choose another "
                           "--checkpoint-dir")
    lesion_args = _lesion_aware_arguments(args, modality, paired)
    run = _given(norm=args.norm, patch_size=(patch[0] if len(patch) == 1 else patch) if patch else None,
                 batch_size=args.batch_size, num_workers=args.num_workers, lr_step_size=args.lr_step,
                 lr_gamma=args.lr_gamma, slices=args.slices, seed=args.seed, amp=False if args.no_amp else None,
                 checkpoint_every=args.checkpoint_every, validation_every=args.validation_every,
                 **{k: v for k, v in lesion_args.items() if k != "lesions_per_slice"})
    config = _gcn_config(args, modality, device, checkpoint_dir, run) if gcn else \
        _adl_config(args, modality, device, checkpoint_dir, run, filters, disc_filters)
    if patch and (any(p % 8 for p in patch) or len(patch) not in (1, config.spatial_dims)):
        raise CommandError(f"--patch-size must be one or {config.spatial_dims} multiples of 8, got {args.patch_size}")

    # every input is checked against the held-out benchmark split before anything is read
    recipe = TrainingDataRecipe(modality, **_given(
        clean=args.clean, noisy_dir=args.noisy_dir, clean_dir=args.clean_dir, noise=args.noise,
        noise_model=args.noise_model, noise_level_range=_min_max(args.noise_level, "--noise-level"),
        ct_filters=ct_filters, ct_cutoff_range=ct_cutoff, realisations=args.realisations,
        noise_cache=args.noise_cache, regenerate_noise=args.regenerate_noise or None, val=args.val,
        val_noisy_dir=args.val_noisy_dir, val_clean_dir=args.val_clean_dir, spatial_dims=config.spatial_dims,
        lesions_per_slice=lesion_args.get("lesions_per_slice"), seed=args.seed))
    data = build_training_data(recipe, device=_rank_device(device), progress=main_rank)
    dataset = data.patches(config.patch_size, slices=config.slices,
                           **_given(samples_per_epoch=args.samples_per_epoch))
    label = "TDDL-GCN" if gcn else "ADL"
    if gcn:
        slices = f", {config.slices} slices{' linked' if config.link_slices else ''}" if config.slices > 1 else ""
        what = f"{modality}{slices}"
    else:
        what = f"{config.spatial_dims}D, {modality}"
    if main_rank:
        print(f"training {label} ({what}, {data.noise_kind} noise) on {len(data.source.volumes)} image(s), "
              f"{config.total_steps} steps; checkpoints in {checkpoint_dir}", flush=True)
    train = train_gcn if gcn else train_adl
    try:
        result = train(config, dataset, val_pairs=data.validation_pairs or None, resume=args.resume,
                       progress=main_rank, initial_weights=initial_weights)
    except ValueError as error:
        if initial_weights is None:
            raise
        raise CommandError(str(error)) from None
    if not main_rank:
        return 0
    return _export_trained(result, result.network if gcn else result.generator, output, config, data,
                           initial_weights)


#: lesion-aware training defaults (``--lesion-aware``): see apps/adl_denoise/README.md and bench/README.md
LESION_AWARE_DEFAULTS = {"lesions_per_slice": 4, "roi_l1_weight": 5.0, "roi_perceptual_weight": 0.1}


def _lesion_aware_arguments(args: argparse.Namespace, modality: str, paired: bool) -> dict:
    """The lesion-aware settings of a training run (empty without ``--lesion-aware``)."""
    given = [name for name in ("lesions_per_slice", "roi_l1_weight", "roi_perceptual_weight", "lesion_detector",
                               "collaborative_every") if getattr(args, name, None) is not None]
    if not args.lesion_aware:
        if given:
            raise CommandError(f"--{given[0].replace('_', '-')} needs --lesion-aware")
        return {}
    if paired or args.noise_model is not None:
        raise CommandError("--lesion-aware inserts synthetic lesions into --clean images before physics noise; it "
                           "does not apply to real pairs or --noise-model")
    if args.spatial_dims == 3:
        raise CommandError("--lesion-aware trains 2D (and 2.5D) networks: drop --spatial-dims 3")
    settings = dict(LESION_AWARE_DEFAULTS)
    settings.update({name: getattr(args, name) for name in given})
    if settings["roi_perceptual_weight"] > 0:
        from lib.weights import MODEL_DIR

        detector = Path(settings.get("lesion_detector") or MODEL_DIR / f"lesion_detector_{modality.lower()}.pt")
        if not detector.expanduser().is_file():
            raise CommandError(f"lesion detector {detector} not found: train one with 'cli.py train-lesion-detector', "
                               "or give --roi-perceptual-weight 0")
        settings["lesion_detector"] = str(detector.expanduser())
    return settings


def _ct_noise_arguments(args: argparse.Namespace, modality: str, paired: bool
                        ) -> tuple[tuple[str, ...] | None, tuple[float, float] | None]:
    """``--ct-filters`` and ``--ct-cutoff`` checked: (filter names, (min, max) cut-off), None where not given."""
    if not (args.ct_filters or args.ct_cutoff):
        return None, None
    if modality != "CT" or args.noise not in (None, "auto", "ct-lowdose") or paired or args.noise_model is not None:
        raise CommandError("--ct-filters and --ct-cutoff apply to simulated low-dose CT noise only "
                           "(--modality ct --clean ...)")
    names = cutoff = None
    if args.ct_filters:
        from lib.noise.projector import RECONSTRUCTION_FILTERS

        names = tuple(name.strip() for name in args.ct_filters.split(",") if name.strip())
        unknown = [name for name in names if name not in RECONSTRUCTION_FILTERS]
        if unknown or not names:
            raise CommandError(f"--ct-filters: unknown filter(s) {', '.join(unknown) or args.ct_filters!r}; "
                               f"choose from {', '.join(RECONSTRUCTION_FILTERS)}")
    if args.ct_cutoff:
        cutoff = _min_max(args.ct_cutoff, "--ct-cutoff")
        if not 0 < cutoff[0] <= cutoff[1] <= 1:
            raise CommandError(f"--ct-cutoff must be MIN,MAX with 0 < MIN <= MAX <= 1 (fractions of Nyquist), "
                               f"got {args.ct_cutoff!r}")
    return names, cutoff


def _adl_config(args: argparse.Namespace, modality: str, device: str, checkpoint_dir: Path, run: dict,
                filters: tuple[int, ...] | None, disc_filters: tuple[int, ...] | None):
    """The ADL run: what the user gave on top of :class:`lib.engines.ADLTrainingConfig`'s defaults."""
    from lib.engines import ADLTrainingConfig

    return ADLTrainingConfig(
        modality=modality, device=device, checkpoint_dir=str(checkpoint_dir), **run, **_given(
            spatial_dims=args.spatial_dims, filters=filters, disc_filters=disc_filters,
            enhancer_filters=args.enhancer_filters, steps_g_warmup=args.steps_g_warmup,
            steps_d_warmup=args.steps_d_warmup, steps_adversarial=args.steps_adversarial, lr_warmup=args.lr_warmup,
            lr_adversarial=args.lr_adversarial, lambda_adversarial=args.lambda_adversarial,
            keep_all_checkpoints=args.keep_checkpoints or None,
            bn_recalibration_batches=args.bn_recalibration_batches))


def _gcn_config(args: argparse.Namespace, modality: str, device: str, checkpoint_dir: Path, run: dict):
    """The TDDL-GCN run: what the user gave on top of :class:`lib.engines.GCNTrainingConfig`'s defaults."""
    from lib.engines import GCNTrainingConfig

    try:
        return GCNTrainingConfig(
            modality=modality, device=device, checkpoint_dir=str(checkpoint_dir), **run, **_given(
                link_slices=args.link_slices or None, features=args.features, k=args.neighbours,
                search_window=args.search_window, inference_search_window=args.inference_search_window,
                n_blocks=args.blocks, layers_per_block=args.layers_per_block, rank=args.rank, steps=args.steps,
                lr=args.lr, loss=args.loss))
    except ValueError as error:
        raise CommandError(f"TDDL-GCN settings: {error}") from None


#: TDDL-GCN options of 'train' (default None: refused with --model adl, GCN defaults otherwise)
GCN_TRAIN_OPTIONS = ("link_slices", "features", "neighbours", "search_window", "inference_search_window",
                     "blocks", "layers_per_block", "rank", "loss", "steps", "lr")


def _check_gcn_train_arguments(args: argparse.Namespace, gcn: bool) -> None:
    if args.slices not in (None, 1) and args.spatial_dims == 3:
        raise CommandError("--slices feeds adjacent slices to a 2D network: drop --spatial-dims 3 (a 3D network "
                           "sees them anyway)")
    if gcn and args.slices not in (None, 1, 3):
        raise CommandError(f"--model {GCN_MODEL} takes --slices 1 or 3")
    if not gcn:
        given = ["--" + name.replace("_", "-") for name in GCN_TRAIN_OPTIONS
                 if getattr(args, name, None) not in (None, False)]
        if given:
            raise CommandError(f"{', '.join(given)} only appl{'y' if len(given) > 1 else 'ies'} to --model {GCN_MODEL}")
        return
    if args.spatial_dims == 3:
        raise CommandError(f"--model {GCN_MODEL} is a 2D network (adjacent slices via --slices 3): "
                           "drop --spatial-dims 3")
    if args.link_slices and args.slices not in (3, 5):
        raise CommandError("--link-slices needs adjacent slices: add --slices 3")
    if args.modality == "mr":
        log.warning("the TDDL-GCN was designed for low-dose CT; training it on MR works but is untested")


def _export_trained(result, network, output: Path, config, data, initial_weights: Path | None = None) -> int:
    """Write the trained network as a small weight file with its training record, and report validation."""
    from lib.weights import NonFiniteWeightsError, export_weights, scaling_rule_for, start_lineage

    record = result.training_record()
    record["data"] = data.record(config.patch_size)
    if initial_weights is not None:
        record["data"]["initial_weights"] = initial_weights.name
        # the start file's record and its own lineage travel with the new file (oldest first, the start last)
        record["lineage"] = start_lineage(initial_weights)
        record["initial_weights"] = f"{initial_weights.name} (sha256 {record['lineage'][-1]['sha256'][:12]})"
    try:
        restoration = _served_restoration(network, config, data, record, initial_weights)
        path = export_weights(network, output, config, scaling_rule_for(config.modality), record,
                              low_frequency_restoration=restoration)
    except NonFiniteWeightsError as error:
        raise CommandError(f"{error}; train again with a lower learning rate or another --seed, and --overwrite: "
                           f"{config.checkpoint_dir} holds the diverged run's checkpoint") from None
    if result.validation:
        last = result.validation[-1]
        print(f"validation PSNR {last['psnr']:.2f} dB (noisy input {last['psnr_noisy']:.2f} dB) at step {last['step']}")
    print(f"wrote {path}")
    return 0


def _served_restoration(network, config, data, record: dict, initial_weights: Path | None) -> dict | None:
    """The restoration entry of a trained file (``lib.weights.format.RESTORATION_KEY``), for a CT 2D network with
    validation images measured on lesions planted in their noisy slices
    (:mod:`lib.evaluation.restoration_width`, the network as served: written in fp16 and read back):

    * trained from scratch: the widest width keeping 90 % of a 6 mm lesion's contrast;
    * trained from ``initial_weights``: that file's width (its modality's default where it names none) or the
      measured one, whichever gives more back.

    Otherwise (MR, a 3D network, no validation images, too few lesion sites) the start file's entry, or None (the
    modality's default)."""
    import tempfile

    from lib.evaluation.restoration_width import (choose_restoration_width, served_restoration,
                                                  validation_slice_groups)
    from lib.lesions.low_frequency_restoration import default_sigma_px
    from lib.predict import load_denoiser, slice_denoiser
    from lib.weights import export_weights, scaling_rule_for
    from lib.weights.format import restoration_inherited_from

    inherited = restoration_inherited_from(initial_weights) if initial_weights is not None else None
    if config.modality != "CT" or config.spatial_dims != 2:
        return inherited
    groups = validation_slice_groups(data.validation_pairs)
    if not groups:
        print("restoration width: no CT validation images (--val or --val-noisy-dir) to plant lesions in; the file "
              "is served at " + ("its start file's width" if initial_weights is not None else "the CT default"))
        return inherited
    slices = sum(len(group) for group, _ in groups)
    with tempfile.TemporaryDirectory(prefix="adl-width-") as folder:
        served = export_weights(network, Path(folder) / "measured.pt", config, scaling_rule_for("CT"), record)
        denoise = slice_denoiser(load_denoiser(served, device=config.device), "CT", config.device)
        if initial_weights is not None:
            entry = served_restoration(inherited, default_sigma_px("CT"), denoise, groups,
                                       f"{slices} noisy validation slice(s)")
            if entry is not None:
                print(f"restoration width {entry['sigma_px']:g} px: {entry['chosen']}")
            return entry
        choice = choose_restoration_width(denoise, groups)
    if choice["sigma_px"] is None:
        print(f"restoration width: {choice['reason']}; the file is served at the CT default")
        return None
    kept = choice["kept_percent"][f"{choice['sigma_px']:g}"]
    print(f"restoration width {choice['sigma_px']:g} px: {choice['reason']} on {slices} validation slice(s); "
          "contrast kept " + " / ".join(f"{v:.0f}" for v in kept.values()) + f" % at {' / '.join(kept)} mm")
    if not choice["met"]:
        log.warning("the lesion target is not met at any restoration width: this network erases small lesions")
    return {"sigma_px": choice["sigma_px"],
            "chosen": f"cli.py train: {choice['reason']}, lesions planted in {slices} noisy validation slice(s)",
            "lesion_target_met": choice["met"], "target": choice["target"], "lesions": choice["lesions"],
            "kept_percent": choice["kept_percent"]}


def _rank_device(device: str) -> str:
    """Under torchrun every process simulates on its own GPU (LOCAL_RANK)."""
    import os

    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if device == "cuda" else device


def _add_train_parser(verbs) -> None:
    tr = verbs.add_parser(
        "train", help="train an ADL or TDDL-GCN denoiser",
        description="Train ADL (Efficient-UNet denoiser + discriminator; phases: denoiser warm-up, discriminator "
                    "warm-up, adversarial) or the TDDL-GCN (graph-convolutional denoiser, supervised L1/MSE) on "
                    "clean images with noise synthesised by the physics (low-dose CT in the sinogram domain, MR "
                    "Rician, generic noise) or sampled from a learned TDDL noise model (--noise-model), or on real "
                    "noisy/clean pairs matched by file name. Writes a small fp16 weight file for 'denoise --model "
                    "MODEL --weights'. Checkpoints allow --resume. Multi-GPU: torchrun --nproc_per_node=N cli.py "
                    "train ...")
    tr.add_argument("--model", choices=LEARNED_MODELS, default=ADL_MODEL, help="model to train (default adl)")
    tr.add_argument("--output", "-o", required=True, help="weight file to write (.pt)")
    tr.add_argument("--modality", choices=("ct", "mr"), required=True, help="modality of the images")
    data = tr.add_argument_group("data")
    data.add_argument("--clean", nargs="+", metavar="PATH", help="clean images or folders (noise is synthesised)")
    data.add_argument("--noisy-dir", help="folder of real noisy images (pairs matched by file name with --clean-dir)")
    data.add_argument("--clean-dir", help="folder of the matching clean images")
    data.add_argument("--noise", choices=("auto",) + NOISE_KINDS,
                      help="synthetic noise (default auto: ct-lowdose for CT, rician for MR)")
    data.add_argument("--noise-model", metavar="FILE",
                      help="CT: add noise sampled from a learned TDDL noise model ('cli.py learn-noise') to the "
                           "--clean images instead of physics noise (pseudo low-dose / normal-dose pairs), less the "
                           "noise each image already carries (estimated in its soft tissue)")
    data.add_argument("--noise-level", metavar="MIN,MAX",
                      help="range of the pixel-domain noise level: rician/gaussian(MR) %% of max, gaussian(CT) HU, "
                           "ct-lowdose added noise std in soft tissue in HU (default 10,60), poisson counts, "
                           "speckle relative std")
    data.add_argument("--ct-cutoff", metavar="MIN,MAX",
                      help="low-dose CT: range of the reconstruction filter's cut-off as a fraction of Nyquist, drawn "
                           "per slice (default 0.5,1.0; lower = smoother noise, like softer clinical kernels)")
    data.add_argument("--ct-filters", metavar="NAME[,NAME]",
                      help="low-dose CT: reconstruction filters of the simulated noise, e.g. shepp-logan to match a "
                           "scanner's kernel (default: all, drawn per slice)")
    data.add_argument("--realisations", type=_positive_int,
                      help="low-dose CT: noisy realisations per clean slice in the pool (default 2)")
    data.add_argument("--noise-cache", help="low-dose CT: folder caching simulated slices as .npy")
    data.add_argument("--regenerate-noise", action="store_true", help="low-dose CT: new noise pool every epoch")
    data.add_argument("--samples-per-epoch", type=_positive_int, help="patches per epoch (default 2000)")
    data.add_argument("--val", nargs="+", metavar="PATH", help="clean validation images (fixed synthetic noise)")
    data.add_argument("--val-noisy-dir", help="folder of real noisy validation images")
    data.add_argument("--val-clean-dir", help="folder of the matching clean validation images")
    net = tr.add_argument_group("network and optimisation")
    net.add_argument("--spatial-dims", type=int, choices=(2, 3), help="2D (slices) or 3D network (default 2)")
    net.add_argument("--patch-size", help="patch size, multiple(s) of 8: N or N,N[,N] (default 96; tddl_gcn 48)")
    # the command line's own default, for both models (the TDDL-GCN engine alone would take 8)
    net.add_argument("--batch-size", type=_positive_int, default=4, help="patches per step and process (default 4)")
    net.add_argument("--filters", help="denoiser filters (default 96,128,160,192)")
    net.add_argument("--disc-filters", help="discriminator filters (default 16,32,64,128)")
    net.add_argument("--enhancer-filters", type=_positive_int, help="content-enhancer filters (default 48)")
    net.add_argument("--norm", choices=("batch", "instance"), help="normalisation layers (default batch)")
    net.add_argument("--steps-g-warmup", type=_non_negative_int, help="denoiser warm-up steps (2000)")
    net.add_argument("--steps-d-warmup", type=_non_negative_int, help="discriminator warm-up steps (500)")
    net.add_argument("--steps-adversarial", type=_non_negative_int, help="adversarial steps (4000)")
    net.add_argument("--lr-warmup", type=_positive_float, help="learning rate of the warm-ups (1e-4)")
    net.add_argument("--lr-adversarial", type=_positive_float, help="adversarial learning rate (5e-5)")
    net.add_argument("--lr-step", type=_positive_int, help="StepLR step size in steps (adl 2000, tddl_gcn 5000)")
    net.add_argument("--lr-gamma", type=_positive_float, help="StepLR decay factor (0.5)")
    net.add_argument("--lambda-adversarial", type=float, help="weight of the adversarial term (0.01)")
    net.add_argument("--no-amp", action="store_true",
                     help="float32 throughout (default: mixed precision, fp16 on CUDA, bfloat16 on a CPU with native "
                          "bfloat16)")
    net.add_argument("--bn-recalibration-batches", type=_non_negative_int,
                     help="adl: after the last step, recompute the denoiser's batch-norm statistics over this many "
                          "further training batches, at most the run's steps (default 200; 0: keep the moving "
                          "averages)")
    net.add_argument("--slices", type=int, choices=(1, 3, 5),
                     help="2D: adjacent slices the network sees as input channels (default 1; adl: 3 or 5 = 2.5D, "
                          f"{GCN_MODEL}: 3)")
    les = tr.add_argument_group("lesion-aware training (LIDnet-style, both models)")
    les.add_argument("--lesion-aware", action="store_true",
                     help="insert synthetic low-contrast lesions into the clean slices before the noise and weight "
                          "them in the loss: ROI L1 and a lesion detector's ROI perceptual loss")
    les.add_argument("--lesions-per-slice", type=_positive_int, help="synthetic lesions per slice (default 4)")
    les.add_argument("--roi-l1-weight", type=_non_negative_float, help="weight of the L1 inside lesions (default 5)")
    les.add_argument("--roi-perceptual-weight", type=_non_negative_float,
                     help="weight of the detector-feature loss inside lesions (default 0.1; 0 = no detector)")
    les.add_argument("--lesion-detector", metavar="FILE",
                     help="detector weight file (default model/lesion_detector_<modality>.pt)")
    les.add_argument("--collaborative-every", type=_non_negative_int,
                     help="LIDnet's collaborative schedule: update the detector on the denoiser's outputs every K "
                          "steps (default 0: frozen detector)")
    g = tr.add_argument_group(f"TDDL-GCN (--model {GCN_MODEL}; the adl-only options above are ignored)")
    g.add_argument("--link-slices", action="store_true",
                   help="with --slices 3: link each pixel to the same pixel in the adjacent slices in every graph "
                        "convolution (slice-based 3D variant, 3x the cost) instead of feeding them as channels")
    g.add_argument("--features", type=_positive_int, help="feature channels (default 32)")
    g.add_argument("--neighbours", type=_positive_int, help="non-local neighbours per pixel (default 16)")
    g.add_argument("--search-window", type=_odd_window, help="search window side in training (default 21)")
    g.add_argument("--inference-search-window", type=_odd_window,
                   help="search window side stored for inference (default: the training one; 'denoise "
                        "--search-window' overrides it)")
    g.add_argument("--blocks", type=_positive_int, help="graph blocks, one k-NN graph each (default 2)")
    g.add_argument("--layers-per-block", type=_positive_int, help="local/non-local layers per block (default 2)")
    g.add_argument("--rank", type=_positive_int, help="rank of the edge-conditioned weights (default 4)")
    g.add_argument("--loss", choices=("l1", "mse"), help="training loss on the clean target (default l1)")
    g.add_argument("--steps", type=_positive_int, help="training steps (default 20000)")
    g.add_argument("--lr", type=_positive_float, help="Adam learning rate (default 1e-4)")
    run = tr.add_argument_group("run")
    run.add_argument("--resume", help="checkpoint file or folder to continue from")
    run.add_argument("--initial-weights", metavar="FILE",
                     help="start the network from this weight file (same architecture) instead of at random: "
                          "fine-tune shipped weights to other data or noise; the optimiser starts fresh")
    run.add_argument("--checkpoint-dir", help="checkpoint folder (default: <output stem>_checkpoints next to --output)")
    run.add_argument("--checkpoint-every", type=_non_negative_int, help="steps between checkpoints (500)")
    run.add_argument("--keep-checkpoints", action="store_true",
                     help="ADL: also keep step_NNNNNNN.pt at every checkpoint besides last.pt (to pick a step later)")
    run.add_argument("--validation-every", type=_non_negative_int,
                     help="steps between validations (500; 0: only at the end)")
    run.add_argument("--num-workers", type=_non_negative_int, help="data loader workers (default 0)")
    run.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="compute device (default: GPU when present)")
    run.add_argument("--seed", type=_non_negative_int, help="random seed")
    run.add_argument("--overwrite", action="store_true",
                     help="replace an existing --output (and start over where --checkpoint-dir holds an earlier run)")
    tr.set_defaults(func=cmd_train)


# --------------------------------------------------------------------------------------------- learn-noise
def cmd_learn_noise(args: argparse.Namespace) -> int:
    """TDDL step 1: noise patches from low-dose CT images alone -> conditional noise VAE -> noise-model file."""
    from lib.data import check_not_heldout, discover_images
    from lib.noise_learning.workflow import learn_noise_model

    output = Path(args.output).expanduser()
    if output.suffix not in (".pt", ".pth"):
        raise CommandError(f"--output must be a .pt noise-model file, got {args.output}")
    if output.exists() and not args.overwrite:
        raise CommandError(f"{args.output} already exists (add --overwrite to replace it)")
    _check_weight_output(output, args.output)
    if args.patch_size is not None and (args.patch_size % 8 or args.patch_size < 16):
        raise CommandError(f"--patch-size must be a multiple of 8 and >= 16, got {args.patch_size}")
    paths = discover_images(args.input)
    check_not_heldout(paths)
    if any(p.resolve() == output.resolve() for p in paths):
        raise CommandError("--output is one of the inputs: refusing to overwrite it")
    device = _resolve_device(args.device)
    try:
        model = learn_noise_model(paths, force_ct=args.modality == "ct", device=device, progress=True,
                                  report=lambda line: print(line, flush=True),
                                  info={"command": "learn-noise", "inputs": [p.name for p in paths]},
                                  calibrate_level=not args.no_level_calibration,
                                  **_given(patch_size=args.patch_size, steps=args.steps, batch_size=args.batch_size,
                                           lr=args.lr, max_patches=args.max_patches, detrend=args.detrend,
                                           seed=args.seed))
    except ValueError as error:
        message = str(error).replace("say it is CT if it is", "add --modality ct if it is")
        # the image reader's refusals (NaN/Inf, implausible values) end "... before denoising": nothing is denoised here
        message = message.replace("before denoising", "before learning noise from it")
        raise CommandError(message.replace("smaller patches", "a smaller --patch-size")) from None
    path = model.save(output)
    print(model.summary())
    print(f"wrote {path}")
    return 0


def _add_learn_noise_parser(verbs) -> None:
    ln = verbs.add_parser(
        "learn-noise", help="learn a CT scanner's noise from low-dose images alone (TDDL)",
        description="TDDL noise learning: cut noise patches out of uniform regions of LOW-DOSE CT images (no "
                    "normal-dose images needed), learn their distribution with a conditional VAE (noise depends on "
                    "the local intensity), scale its level so that its soft-tissue noise is the one measured in the "
                    "images' soft tissue (both levels are printed; --no-level-calibration keeps the learnt level), "
                    "and write a noise model. 'train --model adl --noise-model FILE' then "
                    "adds sampled noise to normal-dose images to make pseudo low-dose / normal-dose pairs.")
    ln.add_argument("--input", "-i", nargs="+", required=True, metavar="PATH",
                    help="low-dose CT images or folders (DICOM series, NIfTI, NRRD, MHA)")
    ln.add_argument("--output", "-o", required=True, help="noise-model file to write (.pt)")
    ln.add_argument("--modality", choices=("auto", "ct"), default="auto",
                    help="ct: treat the inputs as CT in HU (default: from DICOM, else guessed from the values)")
    ln.add_argument("--patch-size", type=_positive_int, help="noise patch size, multiple of 8 (32)")
    ln.add_argument("--steps", type=_positive_int, help="training steps (2000)")
    ln.add_argument("--batch-size", type=_positive_int, help="patches per step (64)")
    ln.add_argument("--lr", type=_positive_float, help="Adam learning rate (2e-3, cosine decay)")
    ln.add_argument("--max-patches", type=_positive_int,
                    help="at most this many noise patches (random subset; default 20000)")
    ln.add_argument("--detrend", choices=("mean", "plane", "quadratic"),
                    help="trend removed from each noise patch (default quadratic: right for filtered back-projection "
                         "noise; mean or plane for blotchy iterative-reconstruction noise)")
    ln.add_argument("--no-level-calibration", action="store_true",
                    help="keep the learnt noise level as it is: do not scale it to the soft-tissue noise measured in "
                         "the images (the model file records that calibration was turned off)")
    ln.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="compute device (default: GPU when present)")
    ln.add_argument("--seed", type=_non_negative_int, help="random seed")
    ln.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    ln.set_defaults(func=cmd_learn_noise)


# --------------------------------------------------------------------------------------------- adapt
#: exit status when the adapted model fails its no-worse check (nothing written)
EXIT_CHECK_FAILED = 3


def cmd_adapt(args: argparse.Namespace) -> int:
    """TDDL self-adaptation (:func:`lib.noise_learning.adaptation.adapt_to_low_dose`): thin argument checking."""
    from lib.data import discover_images
    from lib.noise_learning.adaptation import (AdaptationRefused, AdaptSettings, adapt_to_low_dose, blocking_files,
                                               report_path)

    output = Path(args.output).expanduser()
    if output.suffix not in (".pt", ".pth"):
        raise CommandError(f"--output must be a .pt weight file, got {args.output}")
    existing = blocking_files(output)
    if existing and not args.overwrite:
        raise CommandError(f"{existing[0]} already exists (add --overwrite to replace it)")
    _check_weight_output(output, args.output)
    if args.initial_weights:
        start = Path(args.initial_weights).expanduser()
        if not start.is_file():
            raise CommandError(f"--initial-weights {args.initial_weights} not found")
    else:
        from lib.weights import candidate_weights, find_weights

        start = find_weights(args.model, "CT")
        if start is None:
            expected = candidate_weights(args.model, "CT")[0]
            raise CommandError(f"no {MODEL_LABELS[args.model]} CT weights installed ({expected}): give "
                               "--initial-weights FILE")
    if start.resolve() == output.resolve():
        raise CommandError("--output is the starting weight file: write the adapted model elsewhere")
    if args.patch_size is not None and args.patch_size % 8:
        raise CommandError(f"--patch-size must be a multiple of 8, got {args.patch_size}")
    if args.work_dir:  # before any work: the scratch files are written minutes into the run
        work_dir = Path(args.work_dir).expanduser()
        if work_dir.exists() and not work_dir.is_dir():
            raise CommandError(f"--work-dir {args.work_dir} is a file, not a folder")
        _check_writable_parent(work_dir, args.work_dir, "--work-dir")
    device = _resolve_device(args.device)
    settings = AdaptSettings(device=device, calibrate_noise_level=not args.no_level_calibration, **_given(
        holdout_every=args.holdout_every, noise_steps=args.noise_steps, noise_patch_size=args.noise_patch_size,
        steps=args.steps, patch_size=args.patch_size, batch_size=args.batch_size, lr=args.lr,
        samples_per_epoch=args.samples_per_epoch, grid=args.grid, check_radius=args.check_radius,
        check_shifts=args.check_shifts, tolerance=args.tolerance, lesions_per_slice=args.lesions_per_slice,
        lesion_tolerance_pp=args.lesion_tolerance, seed=args.seed))
    try:
        summary = adapt_to_low_dose(discover_images(args.lowdose), args.model, start, output, settings,
                                    normal_dose=args.normal_dose, work_dir=args.work_dir, force=args.force,
                                    overwrite=args.overwrite, report=lambda line: print(line, flush=True))
    except AdaptationRefused as refused:
        print(f"error: {refused}", file=sys.stderr)
        return EXIT_CHECK_FAILED
    check, lesions = summary["check"], summary["lesion_check"]
    if not summary["passed"]:
        print("warning: the adapted model failed the checks; written anyway (--force)", file=sys.stderr)
    print(f"wrote {output} (report {report_path(output)}; J-invariant loss {check['baseline_loss']:.1f} -> "
          f"{check['adapted_loss']:.1f} HU^2; planted-lesion contrast kept {lesions['baseline_percent']:.1f} -> "
          f"{lesions['candidate_percent']:.1f} %)")
    return 0


def _add_adapt_parser(verbs) -> None:
    ad = verbs.add_parser(
        "adapt", help="adapt ADL or TDDL-GCN to a site's own low-dose CT scans alone (TDDL)",
        description="Learn the noise of the site's low-dose CT scans, add it to normal-dose images (given, or the "
                    "starting model's denoised low-dose slices) to make pseudo pairs, fine-tune the starting "
                    "weights on them, and write the result only if it is no worse than the start on held-out "
                    "low-dose slices (every --holdout-every-th slice, never used before), judged by a "
                    "self-supervised J-invariant (Noise2Self) loss, and keeps the contrast of synthetic 4-10 mm "
                    "lesions planted in those slices' real noise as well, as served (each file with its low-"
                    "frequency restoration width): no model output is used as a reference. "
                    "A JSON report goes next to the output (OUTPUT.adapt.json; that of a refused --overwrite run whose "
                    "OUTPUT already holds weights goes to OUTPUT.adapt.refused.json, leaving theirs as it was). "
                    "Exit status 3 when a check fails.")
    ad.add_argument("--lowdose", nargs="+", required=True, metavar="PATH",
                    help="the site's low-dose CT images or folders (DICOM series, NIfTI, NRRD, MHA), in HU")
    ad.add_argument("--model", choices=LEARNED_MODELS, required=True, help="model to adapt")
    ad.add_argument("--output", "-o", required=True, help="adapted weight file to write (.pt)")
    ad.add_argument("--initial-weights", metavar="FILE", help="weights to start from (default: the installed CT ones)")
    ad.add_argument("--normal-dose", nargs="+", metavar="PATH",
                    help="normal-dose CT images for the clean side of the pseudo pairs; the noise each already "
                         "carries (estimated in its soft tissue) is taken off the learnt noise (default: the "
                         "starting model's denoised low-dose training slices)")
    ad.add_argument("--holdout-every", type=_positive_int, help="hold out every n-th low-dose slice for the check (5)")
    ad.add_argument("--noise-steps", type=_positive_int, help="noise-model training steps (500)")
    ad.add_argument("--noise-patch-size", type=_positive_int, help="noise patch size, multiple of 8 (32)")
    ad.add_argument("--no-level-calibration", action="store_true",
                    help="keep the learnt noise level: do not scale it to the soft-tissue noise measured in the "
                         "low-dose scans (as learn-noise --no-level-calibration; the report records it)")
    ad.add_argument("--steps", type=_positive_int, help="fine-tuning steps (200)")
    ad.add_argument("--patch-size", type=_positive_int, help="fine-tuning patch size (adl 96, tddl_gcn 48)")
    ad.add_argument("--batch-size", type=_positive_int, help="fine-tuning patches per step (4)")
    ad.add_argument("--lr", type=_positive_float, help="fine-tuning learning rate (5e-5)")
    ad.add_argument("--samples-per-epoch", type=_positive_int, help="patches per epoch (512)")
    ad.add_argument("--grid", type=_positive_int, help="check: masking grid spacing (4: 16 shifts)")
    ad.add_argument("--check-radius", type=_non_negative_int,
                    help="check: half-size of the blind square around each scored pixel (1; 0 = plain Noise2Self)")
    ad.add_argument("--check-shifts", type=_positive_int, help="check: shifts scored (default all grid^2)")
    ad.add_argument("--tolerance", type=_non_negative_float,
                    help="check: relative loss increase still accepted (default 0: not worse)")
    ad.add_argument("--lesions-per-slice", type=_positive_int,
                    help="lesion check: synthetic lesions planted per held-out slice (6)")
    ad.add_argument("--lesion-tolerance", type=_non_negative_float,
                    help="lesion check: percentage points of planted-lesion contrast the adapted model may lose "
                         "against the starting one (default 2)")
    ad.add_argument("--force", action="store_true",
                    help="write the adapted model even if it fails a check (never one whose training diverged to NaN)")
    ad.add_argument("--work-dir", help="keep the scratch files (split slices, noise model, pseudo pairs) here")
    ad.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="compute device")
    ad.add_argument("--seed", type=_non_negative_int, help="random seed")
    ad.add_argument("--overwrite", action="store_true", help="replace an existing --output and its report")
    ad.set_defaults(func=cmd_adapt)


def cmd_train_lesion_detector(args: argparse.Namespace) -> int:
    import torch

    from lib.data import TrainingDataRecipe, build_training_data
    from lib.lesions.detector import save_lesion_detector, train_lesion_detector

    output = Path(args.output).expanduser()
    if output.suffix not in (".pt", ".pth"):
        raise CommandError(f"--output must be a .pt weight file, got {args.output}")
    if output.exists() and not args.overwrite:
        raise CommandError(f"{args.output} already exists (add --overwrite to replace it)")
    _check_weight_output(output, args.output)
    if args.patch_size % 16:
        raise CommandError(f"--patch-size must be a multiple of 16, got {args.patch_size}")
    modality = args.modality.upper()
    device = _resolve_device(args.device)
    recipe = TrainingDataRecipe(modality, clean=args.clean, lesions_per_slice=args.lesions_per_slice,
                                noise_cache=args.noise_cache, seed=args.seed)
    data = build_training_data(recipe, device=device)
    dataset = data.patches(args.patch_size, samples_per_epoch=args.steps * args.batch_size, min_foreground=0.5)

    def batches():
        for step in range(args.steps):
            items = [dataset[step * args.batch_size + j] for j in range(args.batch_size)]
            yield {k: torch.stack([item[k] for item in items]) for k in items[0]}

    detector, record = train_lesion_detector(batches(), modality, args.steps, lr=args.lr, device=device,
                                             seed=args.seed)
    record["data"] = data.record(args.patch_size)
    path = save_lesion_detector(detector, output, record)
    print(f"lesion detector: Dice {record['dice_noisy_last50']:.3f} on noisy, {record['dice_clean_last50']:.3f} on "
          f"clean patches (last 50 training batches)")
    print(f"wrote {path}")
    return 0


def _add_lesion_detector_parser(verbs) -> None:
    det = verbs.add_parser(
        "train-lesion-detector",
        help="train the lesion detector of lesion-aware training (train --lesion-aware)",
        description="Train a small lesion segmenter on synthetic low-contrast lesions inserted into clean images "
                    "(and their simulated noisy versions). Its features give lesion-aware training's ROI "
                    "perceptual loss (LIDnet-style).")
    det.add_argument("--clean", nargs="+", required=True, metavar="PATH", help="clean images or folders")
    det.add_argument("--modality", choices=("ct", "mr"), required=True, help="modality of the images")
    det.add_argument("--output", "-o", required=True, help="detector weight file to write (.pt)")
    det.add_argument("--steps", type=_positive_int, default=600, help="training steps (default 600)")
    det.add_argument("--batch-size", type=_positive_int, default=8, help="patches per step (default 8)")
    det.add_argument("--patch-size", type=_positive_int, default=64, help="patch side, multiple of 16 (default 64)")
    det.add_argument("--lesions-per-slice", type=_positive_int, default=6, help="synthetic lesions per slice (6)")
    det.add_argument("--lr", type=_positive_float, default=1e-3, help="Adam learning rate (1e-3, cosine decay)")
    det.add_argument("--noise-cache", help="low-dose CT: folder caching simulated slices as .npy")
    det.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="compute device")
    det.add_argument("--seed", type=_non_negative_int, default=0, help="random seed")
    det.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    det.set_defaults(func=cmd_train_lesion_detector)


def _datastore_ids(folder: Path) -> list[str]:
    """The ids of a folder's images as training and the datastore name them: its files' names without an image
    suffix and its DICOM series subfolders' names (``lib.data.image_stem``), and any other file's name."""
    from lib.data import image_stem
    from lib.data.files import list_folder_images

    if not folder.is_dir():
        raise CommandError(f"--names-from {folder}: no such folder")
    names = {image_stem(path) for path in list_folder_images(folder)}
    names |= {image_stem(path) for path in folder.iterdir() if path.is_file() and not path.name.startswith(".")}
    return sorted(names)


def cmd_share_weights(args: argparse.Namespace) -> int:
    from lib.weights.sharing import shareable_copy

    output = Path(args.output).expanduser()
    if output.suffix not in (".pt", ".pth"):
        raise CommandError(f"--output must be a .pt weight file, got {args.output}")
    _check_weight_output(output, args.output)
    extra = [name for folder in args.names_from or [] for name in _datastore_ids(Path(folder))]
    summary = shareable_copy(args.input, args.output, args.model_dir, extra)
    print(f"wrote {summary['output']} ({summary['ids_replaced']} image id(s) of the record replaced by pseudonyms, "
          f"{summary['ids_known']} known; weights unchanged)")
    return 0


def _add_share_weights_parser(verbs) -> None:
    sh = verbs.add_parser(
        "share-weights", help="copy a weight file for another site: its record names no image id and no folder",
        description="Write a copy of a weight file whose training record names every image the site trained on by "
                    "its keyed pseudonym (the key of the server's model folder, as fine-tuning does since "
                    "2026-12-05) and every path by its file name; the weights are copied bit for bit and the "
                    "source is not changed (the audit trail names its SHA-256). The ids replaced: those of the "
                    "model folder's version histories and the file names of the --names-from folders. Refused "
                    "(nothing written) if an id would remain.")
    sh.add_argument("--input", "-i", required=True, help="the weight file to share (.pt)")
    sh.add_argument("--output", "-o", required=True, help="the copy to write (.pt; must not exist)")
    sh.add_argument("--model-dir", required=True,
                    help="the server's model folder (its .record_pseudonym_key and versions/ histories)")
    sh.add_argument("--names-from", nargs="+", metavar="FOLDER",
                    help="folders whose files' names (without image suffix) are replaced too: the server's local "
                         "datastore, the low-dose or training folders given to adapt / train")
    sh.set_defaults(func=cmd_share_weights)


#: what a command does with the images it reads, for the image reader's refusals (NaN/Inf, implausible or
#: out-of-range values), which end "... before denoising": said to 'adapt' or 'train', that blamed a step they never take
READ_PURPOSE = {"simulate": "simulating noise on it", "train": "training on it",
                "train-lesion-detector": "training on it", "learn-noise": "learning noise from it",
                "adapt": "adaptation uses it"}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.func(args)
    except (CommandError, ImageReadError, ImageWriteError, ValueError, OSError) as error:
        if args.debug:
            raise
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if args.verb in READ_PURPOSE:
            message = message.replace("before denoising", f"before {READ_PURPOSE[args.verb]}")
        print(f"error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - a bug: one line, not a traceback; --debug shows it
        if args.debug:
            raise
        text = " ".join(str(error).split())[:300]
        print(f"error: unexpected failure ({type(error).__name__}: {text}); run again with --debug for the "
              "traceback and report it", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
