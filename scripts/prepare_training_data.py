#!/usr/bin/env python
"""Prepare the clean training volumes of the shipped ADL weights (a record of what they were trained on).

Reads the real CT and MR volumes of ``../shared/data`` that are NOT in the benchmark's held-out split
(``bench/heldout.py`` refuses those) plus the package-built sample studies, keeps every k-th axial slice
(neighbouring slices are nearly identical, and on a CPU the low-dose noise pool costs ~2 s per slice), and
writes them as NIfTI under ``.cache/training/{ct,mr}/`` for ``cli.py train --clean``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO_ROOT / "apps" / "adl_denoise"), str(REPO_ROOT)]

from bench.heldout import assert_not_heldout  # noqa: E402
from lib.imaging import read_volume, write_volume  # noqa: E402

SHARED = REPO_ROOT.parent / "shared" / "data"
SAMPLES = REPO_ROOT / "sample_data" / "studies"
# (source, modality, keep every k-th slice)
SOURCES = [
    (SHARED / "ct_thorax_philips_2mm.nii.gz", "CT", 3),
    (SHARED / "ct_head_phantom_philips_1mm.nii.gz", "CT", 3),  # iterative recon, sigma ~3 HU: a clean target
    (SAMPLES / "ct_head_invesalius.nii.gz", "CT", 3),
    (SHARED / "mr_t1gd_head_siemens_1p5mm.nii.gz", "MR", 3),
    (SAMPLES / "mr_head_colin27.nii.gz", "MR", 4),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / ".cache" / "training")
    args = parser.parse_args(argv)
    for source, modality, stride in SOURCES:
        if not source.exists():
            print(f"skip {source} (absent)")
            continue
        assert_not_heldout([source])
        volume = read_volume(source, modality=modality)
        image = volume.to_sitk()[:, :, ::stride]  # SimpleITK slicing keeps the geometry (spacing x stride)
        kept = type(volume).from_sitk(image, modality=modality, source_dtype=volume.source_dtype)
        out = args.out / modality.lower() / source.name.replace(".nii.gz", f"_every{stride}.nii.gz")
        out.parent.mkdir(parents=True, exist_ok=True)
        write_volume(kept, out, overwrite=True)
        print(f"{out.relative_to(REPO_ROOT)}: {kept.array.shape}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
