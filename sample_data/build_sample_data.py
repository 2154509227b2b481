#!/usr/bin/env python
"""Build the embedded sample studies from what a fresh machine can get (never from ../shared/data).

Sources (each used when present):
  - pydicom-data (pip): a real 512x512 head CT slice (``693_UNCR.dcm``, 5 mm) and a real 1024x1024 MR
    slice (``MR2_UNCR.dcm``).
  - Debian ``invesalius-examples``: a real head CT, 256x256x108, 0.957x0.957x1.5 mm, int16 HU
    (GPL-2: read from the installed package, never committed).
  - Debian ``mricron-data``: the Colin27 T1 MR (``ch2.nii.gz``), 181x217x181 at 1 mm.

For every original it writes a simulated noisy twin: CT at a simulated quarter dose (sinogram-domain
simulation, Hann filter), MR with 5 % Rician noise. Output: ``sample_data/studies/*.nii.gz`` (a MONAI Label
studies folder) plus ``manifest.json`` listing the (noisy, reference) pairs and how each was made.
Re-running skips what exists unless ``--force``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import plistlib
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk

from lib.imaging import Volume, read_volume, write_volume
from lib.noise import LowDoseCTSettings, ParallelBeamGeometry, add_rician_noise, simulate_low_dose_ct
from lib.runtime.atomic import atomic_write_text

REPO_ROOT = Path(__file__).resolve().parents[1]

DEFAULT_OUT = REPO_ROOT / "sample_data" / "studies"
INVESALIUS_PROJECT = Path("/usr/share/doc/invesalius-examples/examples/Cranium.inv3")
COLIN27_T1 = Path("/usr/share/mricron/templates/ch2.nii.gz")

# Quarter dose, calibrated so the ADDED soft-tissue noise is 35 HU: inside the 22-65 HU that real
# quarter-dose abdominal scans show (shared notes), and clearly visible in a viewer.
CT_LOW_DOSE = dict(dose_fraction=0.25, target_noise_std_hu=35.0, reconstruction_filter="hann")
MR_RICIAN_PERCENT = 5.0
SEED = 20261121


@dataclass
class SampleSource:
    name: str
    modality: str
    description: str
    load: Callable[[], Volume | None]


def _pydicom_data_file(name: str) -> Path | None:
    try:
        import data_store  # the import name of the pydicom-data package
    except ImportError:
        return None
    path = Path(data_store.__file__).parent / "data" / name
    return path if path.is_file() else None


def load_pydicom_ct_slice() -> Volume | None:
    path = _pydicom_data_file("693_UNCR.dcm")
    return read_volume(path) if path else None


def load_pydicom_mr_slice() -> Volume | None:
    path = _pydicom_data_file("MR2_UNCR.dcm")
    return read_volume(path) if path else None


def load_invesalius_head_ct() -> Volume | None:
    """The InVesalius project is a tar.gz holding a raw int16 matrix and a plist with its shape and spacing."""
    if not INVESALIUS_PROJECT.is_file():
        return None
    with tarfile.open(INVESALIUS_PROJECT) as archive:
        members = {Path(m.name).name: m for m in archive.getmembers()}
        info = plistlib.load(archive.extractfile(members["main.plist"]))
        matrix = info["matrix"]
        raw = archive.extractfile(members[matrix["filename"]]).read()
    array = np.frombuffer(raw, dtype=np.dtype(matrix["dtype"]).newbyteorder("<")).reshape(matrix["shape"])
    image = sitk.GetImageFromArray(array.astype(np.int16))
    image.SetSpacing(tuple(float(s) for s in info["spacing"]))
    return Volume.from_sitk(image, modality="CT", source_dtype=np.dtype(np.int16))


def load_colin27_mr() -> Volume | None:
    return read_volume(COLIN27_T1, modality="MR") if COLIN27_T1.is_file() else None


SOURCES = [
    SampleSource("ct_head_pydicom693", "CT", "real head CT slice, 512x512, 0.48 mm, 5 mm (pydicom-data 693_UNCR)", load_pydicom_ct_slice),
    SampleSource("ct_head_invesalius", "CT", "real head CT 256x256x108, 0.96x0.96x1.5 mm (Debian invesalius-examples)", load_invesalius_head_ct),
    SampleSource("mr_slice_pydicom_mr2", "MR", "real MR slice, 1024x1024, 0.2 mm (pydicom-data MR2_UNCR)", load_pydicom_mr_slice),
    SampleSource("mr_head_colin27", "MR", "Colin27 T1 MR 181x217x181 at 1 mm (Debian mricron-data)", load_colin27_mr),
]


def _simulate(volume: Volume) -> tuple[np.ndarray, dict, str]:
    if volume.modality == "CT":
        views = 720 if max(volume.array.shape[-2:]) > 256 else 512
        settings = LowDoseCTSettings(geometry=ParallelBeamGeometry(n_views=views), **CT_LOW_DOSE)
        pixel_size = (float(volume.spacing[1]), float(volume.spacing[0]))
        noisy = simulate_low_dose_ct(volume.array, pixel_size, settings, seed=SEED, progress=True)
        return noisy, {"kind": "ct-lowdose", "views": views, "seed": SEED, **CT_LOW_DOSE}, "ld25"
    noisy = add_rician_noise(volume.array, MR_RICIAN_PERCENT, seed=SEED)
    return noisy, {"kind": "rician", "noise_percent": MR_RICIAN_PERCENT, "seed": SEED}, "rician5"


def _builder_fingerprint() -> str:
    """Changes when this builder or the noise physics change, so stale samples are rebuilt."""
    digest = hashlib.sha256()
    for path in [Path(__file__), *sorted((REPO_ROOT / "apps/adl_denoise/lib/noise").glob("*.py"))]:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def build(out_dir: Path, force: bool = False) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = out_dir / "manifest.json"
    fingerprint = _builder_fingerprint()
    if manifest_path.is_file() and not force:
        manifest = json.loads(manifest_path.read_text())
        complete = all((out_dir / p[k]).is_file() for p in manifest.get("pairs", []) for k in ("noisy", "reference"))
        # a source installed since (e.g. the Debian packages after a first build without them) means a rebuild
        was_skipped = {line.split(":", 1)[0] for line in manifest.get("skipped", [])}
        now_available = [s.name for s in SOURCES if s.name in was_skipped and s.load() is not None]
        if manifest.get("fingerprint") == fingerprint and complete and manifest.get("pairs") and not now_available:
            print(f"sample data up to date in {out_dir} ({len(manifest['pairs'])} pairs)")
            return manifest
    pairs, skipped = [], []
    for source in SOURCES:
        volume = source.load()
        if volume is None:
            skipped.append(f"{source.name}: source not installed ({source.description})")
            continue
        volume.modality = source.modality
        reference_name = f"{source.name}.nii.gz"
        write_volume(volume, out_dir / reference_name, overwrite=True)
        print(f"[sample] {source.name}: {volume.array.shape} {source.modality}, simulating noise ...", flush=True)
        noisy, simulation, suffix = _simulate(volume)
        noisy_name = f"{source.name}_{suffix}.nii.gz"
        write_volume(volume.with_array(noisy), out_dir / noisy_name, overwrite=True)
        pairs.append({"name": source.name, "modality": source.modality, "description": source.description,
                      "reference": reference_name, "noisy": noisy_name, "simulation": simulation})
    if not pairs:
        raise SystemExit("no sample source is available: is pydicom-data installed in the environment?")
    manifest = {"fingerprint": fingerprint, "pairs": pairs, "skipped": skipped}
    atomic_write_text(manifest_path, json.dumps(manifest, indent=2))
    for line in skipped:
        print(f"[sample] skipped {line}")
    print(f"sample data: {len(pairs)} pairs in {out_dir}")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"studies folder (default {DEFAULT_OUT})")
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    args = parser.parse_args(argv)
    build(args.out, force=args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
