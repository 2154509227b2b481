"""The restoration width `cli.py train` would choose for a CT weight file, on the validation images it is given.

`cli.py train` from scratch serves a CT 2D network at the widest low-frequency restoration width that keeps 90 % of
a 6 mm lesion's contrast, lesions planted in its noisy validation slices
(:func:`lib.evaluation.restoration_width.choose_restoration_width`). This script runs the same choice on any weight
file (e.g. the shipped ones, whose widths were chosen on the lesion detectability benchmark instead) and the same
validation noise as `train` (:class:`lib.data.SyntheticNoiseSource` validation pairs: quarter dose, Shepp-Logan,
30 HU), so that the two ways of choosing can be compared.

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python bench/restoration_width.py \\
        --weights apps/adl_denoise/model/pretrained_adl_ct.pt --val .cache/training/val_ct
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "apps" / "adl_denoise"))

from lib.data import SyntheticNoiseSource, check_not_heldout  # noqa: E402
from lib.evaluation.restoration_width import choose_restoration_width, validation_slice_groups  # noqa: E402
from lib.predict import load_denoiser, slice_denoiser  # noqa: E402
from lib.weights.format import restoration_of  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", required=True, help="CT weight file (.pt)")
    parser.add_argument("--val", nargs="+", required=True, help="clean CT validation images or folders (as train)")
    parser.add_argument("--seed", type=int, default=0, help="the training seed whose validation noise to use (0)")
    parser.add_argument("--json", help="write the choice here")
    args = parser.parse_args(argv)
    check_not_heldout(args.val)
    for path in (args.weights, *args.val):
        if not Path(path).exists():
            parser.error(f"no such file or folder: {path}")
    loaded = load_denoiser(args.weights)
    source = SyntheticNoiseSource(args.val, "CT", "ct-lowdose", seed=args.seed, progress=False)
    groups = validation_slice_groups(source.validation_pairs())
    started = time.perf_counter()
    choice = choose_restoration_width(slice_denoiser(loaded, "CT"), groups)
    seconds = time.perf_counter() - started
    print(f"{Path(args.weights).name}: file's own width {restoration_of(loaded.metadata)}; chosen "
          f"{choice['sigma_px']} px ({choice['reason']}; {choice['lesions']} lesions of 6 mm, "
          f"{sum(len(g) for g, _ in groups)} slice(s), {seconds:.0f} s)")
    for width, kept in choice["kept_percent"].items():
        print(f"  {width:>4} px: " + ", ".join(f"{d} mm {v:.1f} %" for d, v in kept.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({**choice, "seconds": seconds}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
