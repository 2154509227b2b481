#!/usr/bin/env python
"""The TDDL noise model's level calibration on REAL scanner noise: the Philips thorax of ../shared/data alone.

No low-dose / normal-dose pair is needed (nor available): the model learns the scan's own noise and is compared with
the same scan's other slices, measured with the same estimator. Protocol (bench/README.md, "Level calibration",
paragraph "REAL noise"):

1. Learn: ``learn-noise`` (:func:`lib.noise_learning.workflow.learn_noise_model`, the function ``cli.py learn-noise``
   calls, with the CLI's arguments ``--modality ct --steps 300 --patch-size 32 --seed 0``) on slices 0..69 every
   7th of ``ct_thorax_philips_2mm.nii.gz`` (written to ``<out>/train_slices.nii.gz``; abdomen and lower thorax).
2. The scan's soft-tissue level: :func:`lib.noise.estimate_ct_noise_std_hu` on the training slices (what the
   calibration aims at), on the held-apart slices 70..140 every 9th (thorax, lungs, shoulders) and on each of them.
3. The extracted noise patches (:func:`lib.noise_learning.extract_noise_samples`, as ``learn_noise_model`` cuts them;
   soft tissue = patch mean -100..200 HU): their pixel std (RMS of the zero-mean patches) and their estimate
   (:func:`lib.noise.flat_window_noise_std`, the estimator's windows inside each patch).
4. The model's generated level before (``level_correction`` 1) and after calibration: the draw
   :meth:`NoiseModel.soft_tissue_level_hu` measures (its ``n`` patches, its seed, at the soft-tissue patches'
   conditions cycled, clamped to the trained range): estimate and pixel std; per HU band the pixel std of the same
   number of patches with the same seed at that band's extracted conditions (a band above the trained conditions,
   e.g. bone, is sampled at the top trained condition). The calibration factor is the model's ``level_correction``.
5. Fields: :meth:`NoiseModel.synthesise_noise_field` (seed ``--seed``) on the held-apart slices themselves (as the
   normal-dose image), measured with the estimator in each slice's soft-tissue mask, next to the slice's own level.
6. The replaced estimator (median 5 x 5 local std, ``bench/noise_level_estimate.py``'s ``before``; on the model's
   samples their inner pixels, as ``soft_tissue_level_hu`` measured them until 2026-12-07) on the same data, and the
   factor it would give.

Outputs ``--out`` (default ``bench/results/noise_calibration_real/``, git-ignored): ``results.json``, ``results.md``,
``noise_model.pt``, ``train_slices.nii.gz``. Run (its duration is in ``bench/README.md``)::

    OMP_NUM_THREADS=1 .venv/bin/python bench/noise_calibration_real.py
"""
from __future__ import annotations

import argparse
import inspect
import json
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "apps" / "adl_denoise")]

from bench.noise_level_estimate import before as five_by_five  # noqa: E402
from bench.noise_model_validation import slice_indices  # noqa: E402
from bench.pairs import require_shared_data  # noqa: E402

VOLUME = "ct_thorax_philips_2mm.nii.gz"
DEFAULT_OUT = ROOT / "bench" / "results" / "noise_calibration_real"
SOFT_TISSUE_HU = (-100.0, 200.0)
#: fewest soft-tissue pixels for a slice to count, as ``estimate_ct_noise_std_hu``'s ``min_pixels``
MIN_PIXELS = 500


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train-slices", default="0:70:7", help="START:STOP:STEP of the training slices (0:70:7)")
    ap.add_argument("--held-slices", default="70:141:9", help="START:STOP:STEP of the held-apart slices (70:141:9)")
    ap.add_argument("--steps", type=int, default=300, help="noise-model training steps (300)")
    ap.add_argument("--patch-size", type=int, default=32, help="noise patch size (32)")
    ap.add_argument("--seed", type=int, default=0, help="seed of learn-noise and of the synthesised fields (0)")
    ap.add_argument("--device", default="cpu", help="device of the noise model (cpu, cuda)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    return ap.parse_args(argv)


def five_by_five_scan(image_hu: np.ndarray) -> float | None:
    """The replaced scan estimate: median over the slices (those with >= MIN_PIXELS soft-tissue pixels; every one, where
    it took at most 32: the same for the few slices here) of the median 5 x 5 local std in each slice's soft-tissue
    mask."""
    from lib.noise import soft_tissue_mask

    values = [five_by_five(s) for s in image_hu if np.count_nonzero(soft_tissue_mask(s)) >= MIN_PIXELS]
    return float(np.median(values)) if values else None


def five_by_five_patches(patches: np.ndarray) -> float:
    """The replaced model-side estimate: median 5 x 5 local std of (N, P, P) patches, their inner pixels."""
    p = patches.astype(np.float64)
    mean = ndimage.uniform_filter(p, size=(1, 5, 5), mode="reflect")
    sq = ndimage.uniform_filter(p * p, size=(1, 5, 5), mode="reflect")
    return float(np.median(np.sqrt(np.maximum(sq - mean * mean, 0.0) * 25.0 / 24.0)[:, 2:-2, 2:-2]))


def rms(patches: np.ndarray) -> float:
    """Pixel std (HU) of zero-mean noise patches."""
    return float(np.sqrt(np.mean(np.asarray(patches, dtype=np.float64) ** 2)))


def model_levels(model, condition_hu: np.ndarray) -> dict:
    """The model's generated level at its current ``level_correction``: the draw ``soft_tissue_level_hu`` measures
    (estimate, pixel std, the replaced 5 x 5 estimate) and the pixel std per HU band at that band's conditions."""
    from lib.noise import flat_window_noise_std
    from lib.noise_learning import NOISE_BANDS, band_label

    # the same draw as NoiseModel.soft_tissue_level_hu (its defaults), so the estimate here is the calibration's own
    defaults = inspect.signature(model.soft_tissue_level_hu).parameters
    n, seed = int(defaults["n"].default), int(defaults["seed"].default)
    lo, hi = model.condition_range_hu

    def draw(conditions: np.ndarray) -> np.ndarray:
        return model.sample_patches(np.clip(np.resize(conditions.astype(np.float32), n), lo, hi), seed=seed)

    soft = condition_hu[(condition_hu >= SOFT_TISSUE_HU[0]) & (condition_hu < SOFT_TISSUE_HU[1])]
    patches = draw(soft)
    bands = {}
    for band in NOISE_BANDS:
        inside = condition_hu[(condition_hu >= band[0]) & (condition_hu < band[1])]
        bands[band_label(band)] = {"extracted_patches": int(inside.size),
                                   "pixel_std_hu": rms(draw(inside)) if inside.size else None,
                                   "conditions_hu": [float(np.clip(inside.min(), lo, hi)),
                                                     float(np.clip(inside.max(), lo, hi))] if inside.size else None}
    return {"level_correction": float(model.level_correction),
            "soft_tissue_estimate_hu": flat_window_noise_std(patches), "soft_tissue_pixel_std_hu": rms(patches),
            "soft_tissue_5x5_hu": five_by_five_patches(patches),
            "soft_tissue_level_hu": model.soft_tissue_level_hu(soft), "bands": bands}


def _f(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def write_markdown(r: dict, path: Path) -> str:
    b, a, x = r["model"]["before"], r["model"]["after"], r["extracted"]
    lo, hi = r["model"]["condition_range_hu"]
    lines = ["# TDDL noise-level calibration on the real Philips thorax", "",
             f"Command: `{r['command']}`  ", f"Machine: {r['machine']}  ",
             f"Training slices {r['train_slices']}, held-apart slices {r['held_slices']}. Times (s): {r['times_s']}",
             "", "## The scan's soft-tissue level (HU)", "",
             "| slices | estimate | 5 x 5 (replaced) |", "|---|---|---|",
             f"| training | {_f(r['scan']['train_hu'])} | {_f(r['scan']['train_5x5_hu'])} |",
             f"| held-apart | {_f(r['scan']['held_hu'])} | {_f(r['scan']['held_5x5_hu'])} |", "",
             "## Extracted patches and the model", "",
             f"Extracted: {x['patches']} patches, {x['soft_tissue_patches']} in soft tissue, pixel std "
             f"{_f(x['soft_tissue_pixel_std_hu'])} HU, estimate {_f(x['soft_tissue_estimate_hu'])} HU. Trained "
             f"conditions {_f(lo, 0)}..{_f(hi, 0)} HU. "
             f"Calibration factor x{a['level_correction']:.2f} ({a['level_correction']:.4f}); with the 5 x 5 estimator "
             f"x{r['model']['factor_5x5']:.2f}.", "",
             "| model | soft-tissue estimate | pixel std | 5 x 5 | " + " | ".join(b["bands"]) + " |",
             "|---" * (4 + len(b["bands"])) + "|"]
    for name, m in (("before (x1)", b), (f"after (x{a['level_correction']:.2f})", a)):
        lines.append(f"| {name} | {_f(m['soft_tissue_estimate_hu'])} | {_f(m['soft_tissue_pixel_std_hu'])} | "
                     f"{_f(m['soft_tissue_5x5_hu'])} | " +
                     " | ".join(_f(v["pixel_std_hu"]) for v in m["bands"].values()) + " |")
    lines += ["", "## Held-apart slices: the slice's level and the calibrated model's field on it (HU)", "",
              "| slice | slice estimate | slice 5 x 5 | field estimate (slice's soft-tissue mask) |",
              "|---|---|---|---|"]
    for row in r["held"]:
        lines.append(f"| {row['slice']} | {_f(row['slice_hu'])} | {_f(row['slice_5x5_hu'])} | {_f(row['field_hu'])} |")
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def main(argv=None) -> int:
    args = parse_args(argv)
    path = require_shared_data(VOLUME) / VOLUME
    from lib.data.heldout import assert_not_heldout
    from lib.imaging import Volume, read_volume, write_volume
    from lib.noise import estimate_ct_noise_std_hu, flat_window_noise_std, soft_tissue_mask
    from lib.noise_learning import extract_noise_samples
    from lib.noise_learning.workflow import learn_noise_model
    from lib.runtime.clock import Stopwatch
    from lib.runtime.machine import describe_machine, machine_line

    assert_not_heldout(path)
    watch, times = Stopwatch(), {}
    volume = read_volume(path, modality="CT")
    n = volume.array.shape[0]
    train, held = slice_indices(args.train_slices, n), slice_indices(args.held_slices, n)
    if set(train) & set(held):
        raise SystemExit("error: training and held-apart slices overlap")
    pixel = (float(volume.spacing[1]), float(volume.spacing[0]))
    args.out.mkdir(parents=True, exist_ok=True)
    train_path = args.out / "train_slices.nii.gz"
    write_volume(Volume(np.ascontiguousarray(volume.array[train]), volume.spacing, volume.origin, volume.direction,
                        modality="CT"), train_path, overwrite=True)

    # 1. learn-noise as the CLI runs it (cmd_learn_noise: force_ct for --modality ct, level calibration on)
    watch.restart()
    model = learn_noise_model([train_path], patch_size=args.patch_size, steps=args.steps, seed=args.seed,
                              force_ct=True, device=args.device, progress=False,
                              report=lambda line: print(line, flush=True),
                              info={"command": "learn-noise", "inputs": [train_path.name]})
    times["learn_noise"] = round(watch.seconds, 1)
    model.save(args.out / "noise_model.pt")
    print(model.summary(), flush=True)

    # 2. the scan's level; 3. the patches learn_noise_model cut (same image as read back, same arguments)
    watch.restart()
    train_hu = read_volume(train_path, modality="CT").array
    held_hu = volume.array[held]
    samples = extract_noise_samples(train_hu, args.patch_size, seed=args.seed, pixel_size_mm=pixel,
                                    source_name=train_path.name)
    cond = samples.condition_hu
    soft = (cond >= SOFT_TISSUE_HU[0]) & (cond < SOFT_TISSUE_HU[1])
    extracted = {"patches": len(samples), "soft_tissue_patches": int(soft.sum()),
                 "soft_tissue_pixel_std_hu": rms(samples.patches[soft]),
                 "soft_tissue_estimate_hu": flat_window_noise_std(samples.patches[soft])}

    # 4. the model before and after its calibration
    calibrated = model.level_correction
    model.level_correction = 1.0
    before = model_levels(model, cond)
    model.level_correction = calibrated
    after = model_levels(model, cond)
    scan = {"train_hu": estimate_ct_noise_std_hu(train_hu), "held_hu": estimate_ct_noise_std_hu(held_hu),
            "train_5x5_hu": five_by_five_scan(train_hu), "held_5x5_hu": five_by_five_scan(held_hu)}

    # 5. the calibrated model's fields on the held-apart slices, in each slice's soft-tissue mask
    fields = model.synthesise_noise_field(held_hu, seed=args.seed, pixel_size_mm=pixel)
    rows = []
    for k, z in enumerate(held):
        mask = soft_tissue_mask(held_hu[k])
        rows.append({"slice": z, "soft_tissue_pixels": int(mask.sum()),
                     "slice_hu": estimate_ct_noise_std_hu(held_hu[k]),
                     "slice_5x5_hu": five_by_five_scan(held_hu[k:k + 1]),
                     "field_hu": flat_window_noise_std(fields[k], mask)})
    times["measures"] = round(watch.seconds, 1)

    results = {
        "command": " ".join(["bench/noise_calibration_real.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine_line(describe_machine()), "volume": VOLUME, "train_slices": train, "held_slices": held,
        "pixel_size_mm": list(pixel), "steps": args.steps, "patch_size": args.patch_size, "seed": args.seed,
        "times_s": times, "scan": scan, "extracted": extracted,
        "model": {"condition_range_hu": list(model.condition_range_hu), "level_calibration": model.level_record(),
                  "factor_5x5": scan["train_5x5_hu"] / before["soft_tissue_5x5_hu"], "before": before, "after": after,
                  "summary": model.summary()},
        "held": rows,
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=2, default=float))
    print(write_markdown(results, args.out / "results.md"))
    print(f"wrote {args.out / 'results.md'}, results.json, noise_model.pt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
