"""Generalisation check: does a denoiser trained WITHOUT a reconstruction-kernel family work on it?

Gains measured on the noise a model was trained on say little about a scanner it never saw. This check holds one
kernel family out of training (default the smooth ones, ``hann`` and ``smooth``: the coarse-grained noise of
clinical kernels such as Siemens B30, which the shipped weights handle worst on real scans) and compares, on the
held-out abdomen (``bench/pairs.py``), two ADL models trained identically but for that:

* ``seen_all``: trained on simulated low-dose noise of every filter of :data:`lib.noise.RECONSTRUCTION_FILTERS`;
* ``held_out``: trained on every filter but the held-out family.

Both are scored on the held-out abdomen at quarter dose reconstructed with a held-out filter and with a filter both
saw (``shepp-logan``): PSNR / SSIM in [-160, 240] HU and the contrast kept of synthetic lesions planted in the noisy
slices (:mod:`lib.evaluation.planted_lesions`). The gap ``seen_all - held_out`` on the held-out filter is what an
unseen kernel costs; on the seen filter it should be about zero (the control). Training runs through
``cli.py train`` (the real path), on the training CT of ``../shared/data`` (never the held-out series).

Usage (CPU: two short runs; a GPU run would use far more steps)::

    OMP_NUM_THREADS=1 .venv/bin/python bench/kernel_generalisation.py --steps 300 --out bench/results/kernel_gen
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "apps" / "adl_denoise"
sys.path.insert(0, str(APP))
sys.path.insert(0, str(REPO))

from lib.evaluation import CT_WINDOWS, psnr, ssim  # noqa: E402
from lib.evaluation.planted_lesions import plant_lesions, planted_contrast_kept  # noqa: E402
from lib.noise import RECONSTRUCTION_FILTERS, quarter_dose_settings, simulate_low_dose_ct  # noqa: E402
from lib.runtime.machine import describe_machine, machine_line  # noqa: E402

TRAINING_CT = "ct_thorax_philips_2mm.nii.gz"
SEEN_TEST_FILTER = "shepp-logan"


def made_with(path: Path, settings: dict) -> bool:
    """Whether ``path`` exists and was made with ``settings`` (recorded next to it by :func:`record_settings`): only
    then may a later run reuse it. A file made with other settings (another ``--steps``, ``--training-slices``, ...)
    was reused before, and its figures were reported under the new settings."""
    sidecar = path.with_name(path.name + ".settings.json")
    if not (path.is_file() and sidecar.is_file()):
        return False
    try:
        return json.loads(sidecar.read_text()) == json.loads(json.dumps(settings))
    except ValueError:
        return False


def record_settings(path: Path, settings: dict) -> None:
    """Record the settings ``path`` was made with (see :func:`made_with`)."""
    path.with_name(path.name + ".settings.json").write_text(json.dumps(settings, indent=1))


def train(name: str, filters: list[str], training: Path, out: Path, args: argparse.Namespace) -> Path:
    """One ADL run through ``cli.py train`` (G warm-up only: the same for both arms, cheap on a CPU)."""
    weights = out / f"{name}.pt"
    settings = {"ct_filters": filters, "steps": args.steps, "filters": args.filters, "seed": args.seed,
                "training_slices": args.training_slices}
    if made_with(weights, settings) and not args.retrain:
        return weights
    command = [sys.executable, str(APP / "cli.py"), "train", "--model", "adl", "--modality", "ct",
               "--clean", str(training), "--ct-filters", ",".join(filters), "--output", str(weights),
               "--steps-g-warmup", str(args.steps), "--steps-d-warmup", "0", "--steps-adversarial", "0",
               "--patch-size", "64", "--batch-size", "4", "--filters", args.filters, "--seed", str(args.seed),
               "--device", "cpu", "--checkpoint-dir", str(out / f"{name}_checkpoints"), "--overwrite",
               "--validation-every", "0"]
    start = time.perf_counter()
    subprocess.run(command, check=True)
    record_settings(weights, settings)
    print(f"trained {name} in {time.perf_counter() - start:.0f} s")
    return weights


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--held-out-filters", default="hann,smooth", help="the kernel family held out of training")
    parser.add_argument("--steps", type=int, default=300, help="training steps per arm")
    parser.add_argument("--filters", default="16,32,48,64", help="ADL channel widths (small: a CPU run)")
    parser.add_argument("--training-slices", default="0:40:2", help="slices of the training CT, start:stop:step")
    parser.add_argument("--test-slices", type=int, default=4, help="central slices of the held-out abdomen")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--retrain", action="store_true", help="train again even if the weights exist")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "kernel_generalisation")
    args = parser.parse_args()

    import SimpleITK as sitk

    from bench.pairs import heldout_ct_pair, require_shared_data
    from lib.data.heldout import HELDOUT_CT_SERIES
    from lib.predict import denoise_array, load_denoiser

    held_out = [f.strip() for f in args.held_out_filters.split(",") if f.strip()]
    unknown = [f for f in held_out if f not in RECONSTRUCTION_FILTERS]
    if unknown or not held_out or SEEN_TEST_FILTER in held_out:
        parser.error(f"--held-out-filters: choose from {RECONSTRUCTION_FILTERS} except {SEEN_TEST_FILTER}")
    seen = [f for f in RECONSTRUCTION_FILTERS if f not in held_out]
    training = args.out / "training_ct.nii.gz"
    # the test data (and the training CT unless cut out already) checked before minutes of training
    training_settings = {"source": TRAINING_CT, "slices": args.training_slices}
    shared = require_shared_data(HELDOUT_CT_SERIES,
                                 *([] if made_with(training, training_settings) else [TRAINING_CT]))
    args.out.mkdir(parents=True, exist_ok=True)

    # training data: slices of the Philips thorax CT (upper abdomen and lower thorax), written once per selection
    if not made_with(training, training_settings):
        start, stop, step = (int(v) for v in args.training_slices.split(":"))
        image = sitk.ReadImage(str(shared / TRAINING_CT))
        sitk.WriteImage(image[:, :, start:stop:step], str(training))
        record_settings(training, training_settings)
    arms = {"seen_all": train("seen_all", list(RECONSTRUCTION_FILTERS), training, args.out, args),
            "held_out": train("held_out", seen, training, args.out, args)}

    # test data: the held-out abdomen (full dose), quarter dose simulated with each test filter
    pair = heldout_ct_pair(max_slices=args.test_slices)
    reference, pixel = pair.reference, (float(pair.spacing[1]), float(pair.spacing[0]))
    window = CT_WINDOWS["soft_tissue"]
    base = quarter_dose_settings(30.0, 1.5e6)
    rows = []
    for test_filter in (held_out[0], SEEN_TEST_FILTER):
        settings = dataclasses.replace(base, reconstruction_filter=test_filter)
        noisy = simulate_low_dose_ct(reference, pixel, settings, seed=2016, device="cpu")
        planted = plant_lesions(list(noisy), pixel, seed=1)
        candidates = {"noisy": lambda stack: stack}
        for name, weights in arms.items():
            loaded = load_denoiser(weights)
            candidates[name] = (lambda model: lambda stack: np.stack(
                [denoise_array(model, s, "CT", amp=False) for s in stack]))(loaded)
        for name, run in candidates.items():
            out = run(noisy)
            lesions = planted_contrast_kept(run, list(noisy), planted)
            rows.append({"test_filter": test_filter, "filter_held_out": test_filter in held_out, "model": name,
                         "psnr": psnr(out, reference, window), "ssim": ssim(out, reference, window),
                         "contrast_kept_percent": lesions["mean_percent"], "lesions": lesions["lesions"],
                         "by_diameter_percent": lesions["by_diameter_percent"]})
            print(f"{test_filter:12s} {name:9s} PSNR {rows[-1]['psnr']:.2f}  SSIM {rows[-1]['ssim']:.4f}  "
                  f"lesion contrast kept {lesions['mean_percent']:.1f} % ({lesions['lesions']} lesions)")
    machine = describe_machine()
    result = {"held_out_filters": held_out, "training_filters_held_out_arm": seen, "steps": args.steps,
              "network_filters": args.filters, "training": f"{TRAINING_CT}[{args.training_slices}]",
              "test": f"{pair.name}, {args.test_slices} central slices, quarter dose, 30 HU added",
              "rows": rows, "machine": machine, "omp_threads": os.environ.get("OMP_NUM_THREADS")}
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    print(machine_line(machine))
    return 0


if __name__ == "__main__":
    sys.exit(main())
