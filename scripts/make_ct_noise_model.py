#!/usr/bin/env python
"""Make the shipped TDDL CT noise model (``apps/adl_denoise/model/pretrained_noise_model_ct.pt``); a record of how
it was made, and the command to make it again.

No real low-dose scan is available to us, so the "hospital's low-dose scans" are a simulation: the Philips thorax
training slices (``scripts/prepare_training_data.py``: every 3rd slice of ``ct_thorax_philips_2mm``, NOT the
benchmark's held-out split) at the benchmark's quarter-dose protocol (``lib.noise.quarter_dose_settings``:
Shepp-Logan FBP, 30 HU of added soft-tissue noise, tube-current modulation), seed 2020. The noise model is learnt
from those low-dose images ALONE (``lib.noise_learning.learn_noise_model``, as ``cli.py learn-noise`` does); the
normal-dose slices are never shown to it. What it learns is the whole noise of the low-dose images: the thorax's
own noise plus the added quarter-dose noise.

A hospital replaces it with a model of its own scanner: ``cli.py learn-noise --input ITS_LOW_DOSE_SCANS``, or the
MONAI Label app's ``adapt_noise`` training mode.

Run (about 10 minutes on one CPU thread)::

    .venv/bin/python scripts/prepare_training_data.py   # if .cache/training/ct is missing
    OMP_NUM_THREADS=1 .venv/bin/python scripts/make_ct_noise_model.py
"""
from __future__ import annotations

import argparse
from pathlib import Path

from lib.data.heldout import assert_not_heldout

REPO_ROOT = Path(__file__).resolve().parents[1]

DEFAULT_INPUT = REPO_ROOT / ".cache" / "training" / "ct" / "ct_thorax_philips_2mm_every3.nii.gz"
DEFAULT_OUTPUT = REPO_ROOT / "apps" / "adl_denoise" / "model" / "pretrained_noise_model_ct.pt"
SEED = 2020


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", type=Path, default=DEFAULT_INPUT, help="normal-dose CT (HU) to simulate from")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--lowdose-dir", type=Path, default=REPO_ROOT / ".cache" / "training" / "ct_lowdose")
    parser.add_argument("--steps", type=int, default=2000, help="VAE training steps")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    lowdose_path = args.lowdose_dir / (args.input.name.split(".")[0] + "_quarter_dose.nii.gz")
    if not args.input.exists() and not lowdose_path.is_file():
        parser.error(f"--input {args.input} not found (make it with: .venv/bin/python scripts/prepare_training_data.py)")

    import torch

    torch.set_num_threads(args.threads)
    from lib.imaging import read_volume, write_volume
    from lib.imaging import Volume
    from lib.noise import quarter_dose_settings, simulate_low_dose_ct
    from lib.noise_learning.workflow import learn_noise_model

    assert_not_heldout([args.input])
    if not lowdose_path.is_file():
        volume = read_volume(args.input, modality="CT")
        pixel = (float(volume.spacing[1]), float(volume.spacing[0]))
        print(f"simulating quarter dose of {args.input.name} ({volume.array.shape[0]} slices)", flush=True)
        noisy = simulate_low_dose_ct(volume.array, pixel, quarter_dose_settings(), seed=SEED, progress=True)
        args.lowdose_dir.mkdir(parents=True, exist_ok=True)
        write_volume(Volume(noisy, volume.spacing, volume.origin, volume.direction, modality="CT"), lowdose_path,
                     overwrite=True)
    settings = quarter_dose_settings()
    model = learn_noise_model([lowdose_path], steps=args.steps, force_ct=True, seed=SEED, report=print,
                              info={"inputs": [str(args.input)], "low_dose": "simulated quarter dose (no real low-"
                                    "dose scan available): lib.noise.quarter_dose_settings, seed 2020",
                                    "settings": {k: str(v) for k, v in vars(settings).items()},
                                    "made_by": "scripts/make_ct_noise_model.py"})
    args.output.parent.mkdir(parents=True, exist_ok=True)
    model.save(args.output)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
