#!/usr/bin/env python
"""Validate a TDDL noise model against held-out low-dose noise it never saw (std by HU band, NPS).

Protocol (the "real" low-dose data here is a SIMULATION, because no real low-dose scan with a known noise-free
reference is available; the noise model is never told how it was made):

1. Normal-dose CT: ``../shared/data/ct_thorax_philips_2mm.nii.gz`` (a training volume, NOT the benchmark's
   held-out split), 141 slices of 512 x 512, 0.977 mm. Its own noise (~27 HU) is removed with the app's NLM
   (``lib.denoisers.classical.nlm_denoise``) so that the image can serve as a near noise-free "clean" reference:
   the low-dose noise below is then (almost) the whole noise of the low-dose image, and a model that learns
   from the low-dose image alone can be compared with it. (Residual texture of the NLM image is counted as
   "clean" anatomy; it is small next to the low-dose noise.)
2. "Real" low-dose CT: ``lib.noise.simulate_low_dose_ct(clean, 0.977 mm, settings, reference_has_noise=False)``
   with settings the model does not know: dose fraction 0.2 of 1e6 photons per bin (fixed flux, so noise
   follows the patient's attenuation from slice to slice) or, with ``--flux calibrated``, the flux calibrated per
   slice to 35 HU of soft-tissue noise (what automatic exposure control aims at); Hamming-apodised FBP, 720 views,
   electronic noise 10 counts, angular tube-current modulation.
3. Learn: ``cli.py learn-noise`` on the LOW-DOSE images of the training slices only (default every 7th of slices
   0..69: abdomen and lower thorax).
4. Validate on other slices (default every 9th of 70..140: thorax, lungs, shoulders): generated noise =
   ``NoiseModel.synthesise_noise_field(clean slice)``; real noise = low dose - clean. Compared: noise std per HU
   band of the clean image and radial NPS in uniform 32 x 32 ROIs of each band (same positions for both),
   ``lib.noise_learning.compare_noise``. Baselines: white Gaussian noise with the model's pooled std (texture
   check) and the training slices' own noise (what a perfect extraction would learn, before generalisation to
   other anatomy).
5. Also reported: extraction accuracy on the training slices (extracted patches against the true noise at the same
   positions, per band) and the VAE's fit to its training patches.

Outputs in ``--out`` (default ``bench/results/noise_model/``, git-ignored): ``results.json``, ``results.md``,
``noise_comparison.png`` (NPS curves and std by band, generated vs real), ``example_slice.png`` (clean, real
low dose, pseudo low dose of one validation slice), ``noise_model.pt``; simulations are cached in ``--cache``.

Run (its duration is in ``bench/README.md``)::

    OMP_NUM_THREADS=2 .venv/bin/python bench/noise_model_validation.py
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from lib.data.heldout import assert_not_heldout, shared_data_dir
from bench.pairs import cached_noisy

REPO_ROOT = Path(__file__).resolve().parents[1]
APP_DIR = REPO_ROOT / "apps" / "adl_denoise"

DEFAULT_OUT = REPO_ROOT / "bench" / "results" / "noise_model"
VOLUME = "ct_thorax_philips_2mm.nii.gz"
SIM_SEED = 2020  # the year of the TDDL papers
NOTE = ("The 'real' low-dose data in this validation is a SIMULATION (sinogram-domain Poisson + electronic noise, "
        "Hamming FBP, lib.noise.simulate_low_dose_ct) on NLM-cleaned normal-dose slices; the noise model only saw "
        "the simulated low-dose images of other slices.")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train-slices", default="0:70:7", help="START:STOP:STEP of the training slices (0:70:7)")
    ap.add_argument("--val-slices", default="70:141:9", help="START:STOP:STEP of the validation slices (70:141:9)")
    ap.add_argument("--flux", choices=("fixed", "calibrated"), default="fixed",
                    help="fixed: dose 0.2 of 1e6 photons/bin for every slice; calibrated: 35 HU soft-tissue noise "
                         "per slice")
    ap.add_argument("--steps", type=int, default=1000, help="noise-model training steps (1000)")
    ap.add_argument("--batch-size", type=int, default=64, help="noise-model batch size (64)")
    ap.add_argument("--patch-size", type=int, default=32, help="noise patch size (32)")
    ap.add_argument("--detrend", choices=("mean", "plane", "quadratic"), default="quadratic",
                    help="trend removed from the extracted noise patches (learn-noise --detrend)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the noise model and of the generated noise")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    ap.add_argument("--cache", type=Path, default=None, help="simulation cache (default <out>/cache)")
    ap.add_argument("--device", default="cpu", help="device of the simulation and the noise model (cpu, cuda)")
    return ap.parse_args(argv)


def slice_indices(text: str, n: int) -> list[int]:
    """The indices of ``n`` slices a ``START:STOP:STEP`` range (a command-line option) selects."""
    parts = [int(p) if p else None for p in text.split(":")]
    if len(parts) != 3:
        raise SystemExit(f"error: slice ranges are START:STOP:STEP, got {text!r}")
    return list(range(n))[slice(*parts)]


def simulation_settings(flux: str):
    from lib.noise import LowDoseCTSettings, ParallelBeamGeometry

    common = dict(dose_fraction=0.2, full_dose_photons=1e6, electronic_noise_std=10.0,
                  reconstruction_filter="hamming", geometry=ParallelBeamGeometry(n_views=720),
                  tube_current_modulation=True, reference_has_noise=False)
    if flux == "calibrated":
        return LowDoseCTSettings(**common, target_noise_std_hu=35.0, max_calibration_iterations=3)
    return LowDoseCTSettings(**common)


def load_case(args, log=print) -> dict:
    """Clean (NLM) and simulated low-dose slices for training and validation, cached."""
    from lib.denoisers.classical import nlm_denoise
    from lib.imaging import read_volume
    from lib.noise import simulate_low_dose_ct

    path = shared_data_dir() / VOLUME
    if not path.is_file():
        raise SystemExit(f"{path} not found: this validation needs ../shared/data (or $ADL_SHARED_DATA)")
    assert_not_heldout(path)
    volume = read_volume(path, modality="CT")
    pixel = (float(volume.spacing[1]), float(volume.spacing[0]))
    n = volume.array.shape[0]
    train, val = slice_indices(args.train_slices, n), slice_indices(args.val_slices, n)
    if set(train) & set(val):
        raise SystemExit("training and validation slices overlap")
    cache = args.cache or (args.out / "cache")
    settings = simulation_settings(args.flux)
    out = {"pixel_size_mm": pixel, "train_slices": train, "val_slices": val, "settings": settings}
    for name, idx in (("train", train), ("val", val)):
        base = {"source": VOLUME, "slices": idx, "size": path.stat().st_size}
        clean, _ = cached_noisy({**base, "kind": "nlm-clean"}, lambda: (nlm_denoise(volume.array[idx], "CT"), {}),
                                cache, log)
        low, info = cached_noisy(
            {**base, "kind": "low-dose", "settings": repr(settings), "seed": SIM_SEED},
            lambda: (simulate_low_dose_ct(clean, pixel, settings, seed=[SIM_SEED, *idx], device=args.device,
                                          progress=True), {}), cache, log)
        out[f"{name}_clean"], out[f"{name}_low"] = clean, low
        out[f"{name}_simulation_s"] = info.get("simulation_s")
    return out


def extraction_accuracy(low: np.ndarray, clean: np.ndarray, pixel, patch: int, detrend: str) -> dict:
    """Extracted noise patches (low-dose image only) against the true noise at the same positions, per band."""
    from lib.noise import radial_noise_power_spectrum
    from lib.noise_learning import NOISE_BANDS, band_label, extract_noise_samples

    samples = extract_noise_samples(low, patch, max_patches=None, pixel_size_mm=pixel, detrend=detrend)
    truth = low - clean
    same = np.stack([truth[z, y:y + patch, x:x + patch] for _, z, y, x in samples.positions])
    same = same - same.mean(axis=(1, 2), keepdims=True)
    rows = {}
    for band in NOISE_BANDS:
        sel = (samples.condition_hu >= band[0]) & (samples.condition_hu < band[1])
        band_px = (clean >= band[0]) & (clean < band[1])
        row = {"patches": int(sel.sum()), "true_std_in_band_hu": float(truth[band_px].std()) if band_px.any()
               else float("nan")}
        if sel.sum() >= 5:
            e, t = samples.patches[sel], same[sel]
            fe = radial_noise_power_spectrum(e, pixel, detrend=False).mean_frequency
            ft = radial_noise_power_spectrum(t, pixel, detrend=False).mean_frequency
            row.update(extracted_std_hu=float(np.sqrt((e.astype(np.float64) ** 2).mean())),
                       true_std_same_patches_hu=float(np.sqrt((t.astype(np.float64) ** 2).mean())),
                       extracted_mean_frequency=fe, true_mean_frequency_same_patches=ft)
            row["std_relative_error"] = row["extracted_std_hu"] / row["true_std_same_patches_hu"] - 1
            row["mean_frequency_relative_error"] = fe / ft - 1
        rows[band_label(band)] = row
    return {"bands": rows, "stats": {k: v for k, v in samples.stats.items() if not isinstance(v, dict)}}


def _fmt(v, pct=False) -> str:
    if v is None or not np.isfinite(v):
        return "-"
    return f"{100 * v:+.1f} %" if pct else f"{v:.1f}" if abs(v) >= 1 else f"{v:.3f}"


def write_markdown(results: dict, path: Path) -> str:
    cmp, lines = results["comparison"], []
    lines += ["# TDDL noise model validation", "", f"**{NOTE}**", "",
              f"Command: `{results['command']}`  ", f"Machine: {results['machine']}  ",
              f"Settings of the 'real' low dose (hidden from the model): `{results['simulation_settings']}`  ",
              f"Training slices {results['train_slices']}, validation slices {results['val_slices']}, "
              f"pixel {results['pixel_size_mm'][0]:.3f} mm. Times: {results['times_s']}", "",
              "## Generated vs real noise on the validation slices", "",
              "| HU band (clean) | real std HU | generated std HU | error | white-noise baseline | "
              "training slices' true std | NPS f_av real (cyc/mm) | generated | error | white |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for label, row in cmp["std_by_band"].items():
        nps = cmp["nps"].get(label, {})
        white = results["white_noise_baseline"]["nps"].get(label, {})
        train_std = results["training_noise_std_by_band"].get(label)
        white_std = results["white_noise_baseline"]["std_by_band"][label]["generated"]
        lines.append(f"| {label} | {_fmt(row['real'])} | {_fmt(row['generated'])} "
                     f"| {_fmt(row['relative_error'], True)} | {_fmt(white_std)} | {_fmt(train_std)} "
                     f"| {_fmt(nps.get('real', {}).get('mean_frequency'))} "
                     f"| {_fmt(nps.get('generated', {}).get('mean_frequency'))} "
                     f"| {_fmt(nps.get('mean_frequency_relative_error'), True)} "
                     f"| {_fmt(white.get('generated', {}).get('mean_frequency'))} |")
    lines += ["", "## Extraction on the training slices (low-dose image only vs the true noise at the same patches)",
              "", "| HU band (patch mean) | patches | extracted std HU | true std same patches | error "
              "| true std whole band | f_av extracted | f_av true | error |", "|---|---|---|---|---|---|---|---|---|"]
    for label, row in results["extraction"]["bands"].items():
        lines.append(f"| {label} | {row['patches']} | {_fmt(row.get('extracted_std_hu'))} | "
                     f"{_fmt(row.get('true_std_same_patches_hu'))} | {_fmt(row.get('std_relative_error'), True)} | "
                     f"{_fmt(row.get('true_std_in_band_hu'))} | {_fmt(row.get('extracted_mean_frequency'))} | "
                     f"{_fmt(row.get('true_mean_frequency_same_patches'))} | "
                     f"{_fmt(row.get('mean_frequency_relative_error'), True)} |")
    fit = results["model_fit"]
    lines += ["", "## VAE fit to its training patches", "",
              f"pooled std error {_fmt(fit.get('std_relative_error'), True)}, NPS mean-frequency error "
              f"{_fmt(fit.get('mean_frequency_relative_error'), True)}; per band: " + ", ".join(
                  f"{k}: {_fmt(v.get('relative_error'), True)}" for k, v in fit.get("std_by_band", {}).items()), ""]
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def example_figure(clean: np.ndarray, low: np.ndarray, pseudo: np.ndarray, path: Path, title: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 4.6), dpi=100)
    for k, (img, name) in enumerate(((clean, "clean (NLM of normal dose)"), (low, "'real' low dose (simulated)"),
                                     (pseudo, "pseudo low dose (clean + learned noise)"))):
        ax = fig.add_subplot(1, 3, k + 1)
        ax.imshow(np.clip(img, -160, 240), cmap="gray", vmin=-160, vmax=240)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.suptitle(title + "  (window -160..240 HU)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png")


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from lib.runtime.clock import Stopwatch
    from lib.runtime.machine import describe_machine, machine_line
    from lib.noise_learning import NoiseModel, compare_noise, plot_noise_comparison

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    args.out.mkdir(parents=True, exist_ok=True)
    print(NOTE, flush=True)
    times = {}
    watch = Stopwatch()
    case = load_case(args)
    times["data"] = round(watch.seconds, 1)
    pixel = case["pixel_size_mm"]

    # 1. learn the noise from the training slices' LOW-DOSE images only, through the command line
    from lib.imaging import Volume, write_volume

    low_path = args.out / "train_low_dose.nii.gz"
    write_volume(Volume(case["train_low"], (pixel[1], pixel[0], 2.0), (0.0, 0.0, 0.0),
                        (1, 0, 0, 0, 1, 0, 0, 0, 1), modality="CT"), low_path, overwrite=True)
    model_path = args.out / "noise_model.pt"
    command = [sys.executable, str(APP_DIR / "cli.py"), "learn-noise", "--input", str(low_path), "--output",
               str(model_path), "--modality", "ct", "--steps", str(args.steps), "--batch-size", str(args.batch_size),
               "--patch-size", str(args.patch_size), "--seed", str(args.seed), "--device", args.device,
               "--detrend", args.detrend, "--overwrite"]
    print("$ " + " ".join(command[1:]), flush=True)
    watch.restart()
    subprocess.run(command, check=True)
    times["learn_noise"] = round(watch.seconds, 1)
    model = NoiseModel.load(model_path, device=args.device)

    # 2. generated vs real noise on the validation slices
    watch.restart()
    clean, low = case["val_clean"], case["val_low"]
    real = low - clean
    generated = model.synthesise_noise_field(clean, seed=args.seed, pixel_size_mm=pixel, progress=True)
    times["synthesis"] = round(watch.seconds, 1)
    comparison = compare_noise(generated, real, clean, pixel)
    rng = np.random.default_rng(args.seed)
    white = (rng.standard_normal(clean.shape) * model.training_stats["noise_std_hu"]).astype(np.float32)
    white_cmp = compare_noise(white, real, clean, pixel)
    train_real = case["train_low"] - case["train_clean"]
    train_std = {label: row["real"] for label, row in
                 compare_noise(train_real, train_real, case["train_clean"], pixel, n_rois=1)["std_by_band"].items()}
    extraction = extraction_accuracy(case["train_low"], case["train_clean"], pixel, args.patch_size, args.detrend)

    results = {
        "note": NOTE, "command": " ".join(["bench/noise_model_validation.py", *(argv or sys.argv[1:])]),
        "machine": machine_line(describe_machine()), "simulation_settings": repr(case["settings"]),
        "train_slices": case["train_slices"], "val_slices": case["val_slices"], "pixel_size_mm": list(pixel),
        "times_s": times, "comparison": comparison, "white_noise_baseline": white_cmp,
        "training_noise_std_by_band": train_std, "extraction": extraction,
        "model_fit": model.training_stats.get("fit", {}), "model_summary": model.summary(),
        "model_air_policy": model.air_policy,
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=2, default=float))
    plot_noise_comparison(comparison, args.out / "noise_comparison.png",
                          "TDDL noise model vs held-out simulated low-dose noise (validation slices)")
    mid = clean.shape[0] // 2
    example_figure(clean[mid], low[mid], clean[mid] + generated[mid], args.out / "example_slice.png",
                   f"validation slice {case['val_slices'][mid]}")
    print(write_markdown(results, args.out / "results.md"))
    print(f"model: {model.summary()}")
    print(f"wrote {args.out / 'results.md'}, results.json, noise_comparison.png, example_slice.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
