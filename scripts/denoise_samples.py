#!/usr/bin/env python
"""The README's main job on the embedded sample data: denoise every noisy sample study with the
command-line denoiser and report PSNR/SSIM against its full-dose / noise-free original.

Runs ``apps/adl_denoise/cli.py denoise`` exactly as a user would (one process per study), writes the
results to ``sample_data/output/`` and prints a table. CT metrics use the [-160, 240] HU window; MR the
0..max range of the reference.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from lib.evaluation import CT_WINDOWS, psnr, ssim
from lib.imaging import read_volume
from lib.runtime.clock import Stopwatch
from lib.weights import find_weights

REPO_ROOT = Path(__file__).resolve().parents[1]

STUDIES = REPO_ROOT / "sample_data" / "studies"
OUTPUT = REPO_ROOT / "sample_data" / "output"
CLI = REPO_ROOT / "apps" / "adl_denoise" / "cli.py"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None,
                        help="model passed to cli.py denoise (default: adl where weights for the study's modality "
                             "are installed, else bm3d)")
    parser.add_argument("--only", help="only the sample whose name contains this text")
    args = parser.parse_args(argv)

    if not (STUDIES / "manifest.json").is_file():
        parser.error(f"{STUDIES / 'manifest.json'} not found: build the sample data first "
                     "(.venv/bin/python sample_data/build_sample_data.py)")
    manifest = json.loads((STUDIES / "manifest.json").read_text())
    pairs = [pair for pair in manifest["pairs"] if not args.only or args.only in pair["name"]]
    if not pairs:  # a typo must not look like a run that denoised nothing and succeeded
        parser.error(f"--only {args.only!r} matches no sample study; the studies: "
                     f"{', '.join(pair['name'] for pair in manifest['pairs'])}")
    OUTPUT.mkdir(parents=True, exist_ok=True)
    rows = []
    for pair in pairs:
        model = args.model or ("adl" if find_weights("adl", pair["modality"]) else "bm3d")
        noisy_path = STUDIES / pair["noisy"]
        out_path = OUTPUT / pair["noisy"].replace(".nii.gz", f"_{model}.nii.gz")
        command = [sys.executable, str(CLI), "denoise", "--model", model, "--input", str(noisy_path),
                   "--output", str(out_path), "--modality", pair["modality"].lower(), "--overwrite"]
        print(f"$ {' '.join(Path(c).name if c.startswith(str(REPO_ROOT)) else c for c in command)}", flush=True)
        watch = Stopwatch()
        status = subprocess.run(command).returncode
        if status != 0:  # cli.py printed why, in one line
            print(f"error: cli.py denoise failed on {pair['name']} (exit status {status})", file=sys.stderr)
            return status
        seconds = watch.seconds
        reference = read_volume(STUDIES / pair["reference"]).array
        noisy = read_volume(noisy_path).array
        denoised = read_volume(out_path).array
        window = CT_WINDOWS["soft_tissue"] if pair["modality"] == "CT" else (0.0, float(reference.max()))
        rows.append((pair["name"], model, window, psnr(noisy, reference, window), psnr(denoised, reference, window),
                     ssim(noisy, reference, window), ssim(denoised, reference, window), seconds, out_path))

    print(f"\n{'study':24s} {'model':>8s} {'window':>14s} {'PSNR noisy':>10s} {'PSNR model':>10s} {'SSIM noisy':>10s} "
          f"{'SSIM model':>10s} {'time s':>7s}")
    for name, model, window, p0, p1, s0, s1, seconds, out_path in rows:
        window_text = f"[{window[0]:g},{window[1]:g}]"
        print(f"{name:24s} {model:>8s} {window_text:>14s} {p0:10.2f} {p1:10.2f} {s0:10.3f} {s1:10.3f} {seconds:7.1f}")
    print(f"\ndenoised volumes in {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
