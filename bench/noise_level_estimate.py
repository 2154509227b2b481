#!/usr/bin/env python
"""How close ``lib.noise.estimate_ct_noise_std_hu`` reads the soft-tissue noise std of CT slices with noise of a
KNOWN std added: white, correlated (white noise Gaussian-filtered over 0.7-3 pixels) and sinogram-domain
quarter-dose noise reconstructed by FBP with each filter of ``lib.noise.RECONSTRUCTION_FILTERS`` (plus Hann with
detector bins twice the pixel: smoother), at 10, 30 and 60 HU.

"before" is the estimator it replaced (median 5 x 5 local std in the soft-tissue mask, which is
``estimate_noise_sigma(slice, "local_std", window=5, quantile=0.5, mask=soft_tissue_mask(slice))``), "after"
the current one. Images:

* ``flat``: a synthetic 256 x 256 plane (40 HU with a gradient), no anatomy.
* ``head``: the real head CT slice of ``sample_data/studies/ct_head_pydicom693.nii.gz`` (0.4785 mm pixels).
* ``phantom``: slice 70 of ``../shared/data/ct_head_phantom_philips_1mm.nii.gz`` (0.451 mm pixels), a real
  scan of a head phantom (iterative reconstruction).

The truth is the std of the added noise in the soft-tissue mask, with the real scan's own noise (its "after"
estimate: a few HU) added in quadrature. FBP noise is calibrated to the target level per slice
(``target_noise_std_hu``); 360 views.

Outputs ``--out`` (default ``bench/results/noise_level_estimate/``, git-ignored): ``results.json``,
``results.md``. Run::

    OMP_NUM_THREADS=1 .venv/bin/python bench/noise_level_estimate.py
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "apps" / "adl_denoise"))

from lib.data.heldout import shared_data_dir  # noqa: E402
from lib.noise import (LowDoseCTSettings, ParallelBeamGeometry, estimate_ct_noise_std_hu,  # noqa: E402
                       estimate_noise_sigma, simulate_low_dose_ct, soft_tissue_mask)

LEVELS_HU = (10.0, 30.0, 60.0)
GAUSSIAN_PX = (0.0, 0.7, 1.0, 1.5, 2.0, 3.0)
FBP = (("ramp", 1), ("shepp-logan", 1), ("hann", 1), ("smooth", 1), ("hann", 2))


def before(image: np.ndarray) -> float:
    """The replaced estimator on one slice."""
    return estimate_noise_sigma(image, "local_std", window=5, quantile=0.5, mask=soft_tissue_mask(image))


def filtered_noise(shape: tuple[int, int], sigma_px: float, std: float, rng: np.random.Generator) -> np.ndarray:
    white = rng.standard_normal((shape[0] + 64, shape[1] + 64))
    field = (ndimage.gaussian_filter(white, sigma_px) if sigma_px > 0 else white)[32:-32, 32:-32]
    return (field / field.std() * std).astype(np.float32)


def images(shared: Path) -> dict[str, tuple[np.ndarray, float]]:
    import SimpleITK as sitk

    yy, xx = np.mgrid[0:256, 0:256].astype(np.float32)
    out = {"flat": (40.0 + 0.2 * xx - 0.1 * yy, 1.0)}
    head = sitk.GetArrayFromImage(sitk.ReadImage(str(ROOT / "sample_data/studies/ct_head_pydicom693.nii.gz")))
    out["head"] = (head.reshape(-1, *head.shape[-2:])[0].astype(np.float32), 0.4785)
    phantom = shared / "ct_head_phantom_philips_1mm.nii.gz"
    if phantom.is_file():
        out["phantom"] = (sitk.GetArrayFromImage(sitk.ReadImage(str(phantom)))[70].astype(np.float32), 0.451)
    else:  # the table is still useful without it, but must not look complete
        print(f"{phantom} not found: the phantom rows are left out (set ADL_SHARED_DATA or --shared)", flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", default=str(shared_data_dir()),
                        help="the shared data folder ($ADL_SHARED_DATA, else ../shared/data)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "noise_level_estimate"))
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    t0 = time.perf_counter()
    for name, (clean, pixel_mm) in images(Path(args.shared)).items():
        own = 0.0 if name == "flat" else float(estimate_ct_noise_std_hu(clean))
        mask = np.ones(clean.shape, bool) if name == "flat" else soft_tissue_mask(clean)
        cases = [(f"gaussian {s:g} px" if s else "white", level, filtered_noise(clean.shape, s, level, rng))
                 for s in GAUSSIAN_PX for level in LEVELS_HU]
        if name != "flat":
            for filt, bins in FBP:
                for level in LEVELS_HU:
                    settings = LowDoseCTSettings(dose_fraction=0.25, reconstruction_filter=filt,
                                                 target_noise_std_hu=level,
                                                 geometry=ParallelBeamGeometry(n_views=360,
                                                                               detector_bin_mm=bins * pixel_mm))
                    low = simulate_low_dose_ct(clean, pixel_mm, settings, seed=int(level))
                    cases.append((f"FBP {filt}" + (f", {bins}-px bins" if bins > 1 else ""), level, low - clean))
        for noise, level, added in cases:
            noisy = clean + added
            inside = mask if name == "flat" else mask & soft_tissue_mask(noisy)
            truth = float(np.hypot(added[inside].std(), own))
            old = before(noisy)
            new = float(estimate_ct_noise_std_hu(noisy, min_pixels=500))
            rows.append({"image": name, "noise": noise, "level_hu": level, "own_hu": own, "truth_hu": truth,
                         "before_hu": old, "after_hu": new})
            print(f"{name:8s} {noise:26s} {level:4.0f}  truth {truth:5.1f}  before {old:5.1f} "
                  f"({100 * (old / truth - 1):+5.1f} %)  after {new:5.1f} ({100 * (new / truth - 1):+5.1f} %)",
                  flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"rows": rows, "seconds": time.perf_counter() - t0}, indent=2))
    lines = ["| image | noise | level HU | truth HU | before HU (error) | after HU (error) |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['image']} | {r['noise']} | {r['level_hu']:.0f} | {r['truth_hu']:.1f} | "
                     f"{r['before_hu']:.1f} ({100 * (r['before_hu'] / r['truth_hu'] - 1):+.0f} %) | "
                     f"{r['after_hu']:.1f} ({100 * (r['after_hu'] / r['truth_hu'] - 1):+.0f} %) |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
