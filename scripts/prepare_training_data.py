#!/usr/bin/env python
"""Prepare the clean training volumes of the shipped ADL weights (a record of what they were trained on).

Reads the real CT and MR volumes of ``../shared/data`` that are NOT in the benchmark's held-out split
(``lib/data/heldout.py`` refuses those) plus the package-built sample studies and writes NIfTI files for
``cli.py train --clean``:

* ``.cache/training/ct/``: every 3rd axial slice of each CT (neighbouring slices are nearly identical, and on a CPU
  the low-dose noise pool costs ~2-5 s per slice). The Philips thorax carries ~27 HU of its own noise, as much as
  the low-dose noise to be removed: trained on it as the target, the network learnt to keep that much noise (on the
  held-out abdomen its output kept 20 HU of error in flat tissue, where the reference itself has ~8-13 HU), so the
  thorax is cleaned first with BM3D at its own blindly estimated noise level (``*_bm3d.nii.gz``; the notes'
  "cleaner targets"). The head phantom (iterative reconstruction, ~3 HU) and the InVesalius head are used as
  they are.
* ``.cache/training/mr/``: the MR volumes whole at 1 mm isotropic voxels (the held-out brain's grid), for the 2D
  network (any axial slice) and the 3D one alike. The Siemens head (0.41 x 0.41 x 1.5 mm) is smoothed in-plane
  before it is resampled, as a 1 mm acquisition would be (a Gaussian of 0.5 mm, half the new spacing): trained at
  0.41 mm, where anatomy is smooth from pixel to pixel, the 2D network blurred the 1 mm brain's detail.
  Each MR volume is also written skull-stripped (``*_brain.nii.gz``: the brain, zero elsewhere), because a clinical
  brain series is often read (and the benchmark's held-out brain is stored) that way, and whole heads alone never
  show the network a brain edge against a zero background. Colin27's brain is MRIcron's own ``ch2bet``; the
  Siemens head gets that brain mask through an affine registration of Colin27 onto it (Mattes mutual information,
  single-threaded with a fixed sampling seed so that a rebuild gives the same mask).
* ``.cache/training/val_ct/`` and ``val_mr/``: the slices that ``cli.py train --val`` watches during training (for
  the learning curve and the best checkpoint; they are NOT held out: the benchmark's held-out split is). CT: two
  thorax slices that the every-3rd-slice training set skips (cleaned with BM3D like the training thorax) and one
  InVesalius slice; MR: 5-slice slabs (so a 2.5D network has its neighbours) of the 1 mm volumes, whole and
  skull-stripped.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from lib.data.heldout import assert_not_heldout, shared_data_dir
from lib.denoisers import denoise_classical
from lib.imaging import read_volume, write_volume

REPO_ROOT = Path(__file__).resolve().parents[1]

SHARED = shared_data_dir()  # $ADL_SHARED_DATA, else ../shared/data
SAMPLES = REPO_ROOT / "sample_data" / "studies"
CT_STRIDE = 3
# (source, clean it with BM3D first)
CT_SOURCES = [
    (SHARED / "ct_thorax_philips_2mm.nii.gz", True),  # ~27 HU of its own noise
    (SHARED / "ct_head_phantom_philips_1mm.nii.gz", False),  # iterative recon, ~3 HU: already a clean target
    (SAMPLES / "ct_head_invesalius.nii.gz", False),
]
MR_SOURCES = [
    SHARED / "mr_t1gd_head_siemens_1p5mm.nii.gz",
    SAMPLES / "mr_head_colin27.nii.gz",
]
# Colin27 (the sample study's source) and its brain extraction, both from Debian's mricron-data, on one grid
COLIN27_HEAD = Path("/usr/share/mricron/templates/ch2.nii.gz")
COLIN27_BRAIN = Path("/usr/share/mricron/templates/ch2bet.nii.gz")
MR_SPACING_MM = 1.0
# validation: (source index in CT_SOURCES, axial slice) -- slices off the every-3rd training grid
CT_VALIDATION_SLICES = [(0, 40), (0, 100), (2, 50)]
# (source index in MR_SOURCES, centre slice of a 5-slice axial slab on the 1 mm grid)
MR_VALIDATION_SLABS = [(0, 100), (1, 90), (1, 120)]
MR_SLAB_HALF = 2


def resample_isotropic(image: sitk.Image, spacing_mm: float) -> sitk.Image:
    """Resample onto ``spacing_mm`` cubic voxels over the same field of view and orientation (B-spline, clamped at
    0 against undershoot). Axes finer than ``spacing_mm`` are first smoothed with a Gaussian of ``spacing_mm / 2``
    (physical units) so that the new grid does not alias their detail and noise."""
    sigma = [spacing_mm / 2 if s < spacing_mm else 0.0 for s in image.GetSpacing()]
    image = sitk.Cast(image, sitk.sitkFloat32)
    if any(sigma):
        image = sitk.SmoothingRecursiveGaussian(image, [max(s, 1e-6) for s in sigma])
    size = [max(1, int(round(n * s / spacing_mm))) for n, s in zip(image.GetSize(), image.GetSpacing())]
    resampled = sitk.Resample(image, size, sitk.Transform(), sitk.sitkBSpline, image.GetOrigin(), (spacing_mm,) * 3,
                              image.GetDirection(), 0.0, sitk.sitkFloat32)
    return sitk.Clamp(resampled, lowerBound=0.0)


def register_brain_mask(head: sitk.Image) -> sitk.Image:
    """Colin27's brain mask (``ch2bet`` > 0) carried onto ``head`` (a T1 head volume) by an affine registration of
    Colin27's head: multi-resolution Mattes mutual information, so the two scanners' contrasts need not match.
    Returns a 0/1 uint8 image on ``head``'s grid."""
    fixed = sitk.Cast(head, sitk.sitkFloat32)
    moving = sitk.Cast(sitk.ReadImage(str(COLIN27_HEAD)), sitk.sitkFloat32)
    initial = sitk.CenteredTransformInitializer(fixed, moving, sitk.AffineTransform(3),
                                                sitk.CenteredTransformInitializerFilter.MOMENTS)
    registration = sitk.ImageRegistrationMethod()
    registration.SetMetricAsMattesMutualInformation(numberOfHistogramBins=50)
    registration.SetMetricSamplingStrategy(registration.RANDOM)
    registration.SetMetricSamplingPercentage(0.1, seed=2030)
    registration.SetInterpolator(sitk.sitkLinear)
    registration.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-4, numberOfIterations=300,
                                                          gradientMagnitudeTolerance=1e-8)
    registration.SetOptimizerScalesFromPhysicalShift()
    registration.SetShrinkFactorsPerLevel([4, 2, 1])
    registration.SetSmoothingSigmasPerLevel([2.0, 1.0, 0.0])
    registration.SetInitialTransform(initial, inPlace=False)
    # a multithreaded metric sums in a thread-dependent order: one thread makes the mask the same on every rebuild
    threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    try:
        transform = registration.Execute(fixed, moving)
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    print(f"  registration: {registration.GetOptimizerStopConditionDescription()} "
          f"(metric {registration.GetMetricValue():.3f})")
    mask = sitk.Cast(sitk.ReadImage(str(COLIN27_BRAIN)) > 0, sitk.sitkFloat32)
    moved = sitk.Resample(mask, head, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return sitk.Cast(moved > 0.5, sitk.sitkUInt8)


def skull_stripped(volume, source: Path):
    """``volume`` (an MR :class:`~lib.imaging.Volume` on the 1 mm grid) with everything outside the brain set to 0,
    or None where mricron-data is not installed."""
    if not (COLIN27_HEAD.is_file() and COLIN27_BRAIN.is_file()):
        print(f"skip the skull-stripped {source.name} ({COLIN27_BRAIN} absent: Debian mricron-data)")
        return None
    image = volume.to_sitk()
    if source.name.startswith("mr_head_colin27"):  # the sample study IS ch2: its own brain extraction
        brain = sitk.ReadImage(str(COLIN27_BRAIN))
        brain = sitk.Resample(sitk.Cast(brain > 0, sitk.sitkFloat32), image, sitk.Transform(), sitk.sitkLinear, 0.0)
        mask = sitk.Cast(brain > 0.5, sitk.sitkUInt8)
    else:
        mask = register_brain_mask(image)
    stripped = sitk.Mask(sitk.Cast(image, sitk.sitkFloat32), mask, outsideValue=0.0)
    print(f"  brain: {int(sitk.GetArrayViewFromImage(mask).sum())} voxels")
    return type(volume).from_sitk(stripped, modality="MR")


def write_validation_slabs(volume, centres: list[int], out_dir: Path, stem: str) -> None:
    """5-slice axial slabs of ``volume`` around each of ``centres`` as ``<stem>_z<centre>.nii.gz``."""
    for z in centres:
        image = volume.to_sitk()[:, :, z - MR_SLAB_HALF:z + MR_SLAB_HALF + 1]
        val = type(volume).from_sitk(image, modality="MR")
        out = out_dir / f"{stem}_z{z}.nii.gz"
        out.parent.mkdir(parents=True, exist_ok=True)
        write_volume(val, out, overwrite=True)
        print(f"{_shown(out)}: {val.array.shape}")


def _shown(path: Path) -> str:
    """``path`` relative to the repository where it lies inside it (the printout), else as given."""
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / ".cache" / "training")
    parser.add_argument("--only", choices=("ct", "mr"), help="prepare only the CT or only the MR data")
    args = parser.parse_args(argv)
    ct_validation = {i: [z for j, z in CT_VALIDATION_SLICES if j == i] for i in range(len(CT_SOURCES))}
    mr_validation = {i: [z for j, z in MR_VALIDATION_SLABS if j == i] for i in range(len(MR_SOURCES))}
    for index, (source, clean) in enumerate(CT_SOURCES if args.only != "mr" else []):
        if not source.exists():
            print(f"skip {source} (absent)")
            continue
        assert_not_heldout([source])
        volume = read_volume(source, modality="CT")
        image = volume.to_sitk()[:, :, ::CT_STRIDE]  # SimpleITK slicing keeps the geometry (spacing x stride)
        kept = type(volume).from_sitk(image, modality="CT", source_dtype=volume.source_dtype)
        name = source.name.replace(".nii.gz", f"_every{CT_STRIDE}{'_bm3d' if clean else ''}.nii.gz")
        if clean:
            print(f"{source.name}: BM3D on {kept.array.shape[0]} slices ...", flush=True)
            kept = kept.with_array(denoise_classical("bm3d", kept.array.astype(np.float32), modality="CT",
                                                     progress=True))
        out = args.out / "ct" / name
        out.parent.mkdir(parents=True, exist_ok=True)
        write_volume(kept, out, overwrite=True)
        print(f"{_shown(out)}: {kept.array.shape}")
        for z in ct_validation[index]:
            if z % CT_STRIDE == 0:
                raise ValueError(f"validation slice {z} of {source.name} is a training slice")
            image = volume.to_sitk()[:, :, z:z + 1]
            val = type(volume).from_sitk(image, modality="CT", source_dtype=volume.source_dtype)
            if clean:
                val = val.with_array(denoise_classical("bm3d", val.array.astype(np.float32), modality="CT"))
            out = args.out / "val_ct" / source.name.replace(".nii.gz", f"_z{z}{'_bm3d' if clean else ''}.nii.gz")
            out.parent.mkdir(parents=True, exist_ok=True)
            write_volume(val, out, overwrite=True)
            print(f"{_shown(out)}: {val.array.shape}")
    for index, source in enumerate(MR_SOURCES if args.only != "ct" else []):
        if not source.exists():
            print(f"skip {source} (absent)")
            continue
        assert_not_heldout([source])
        volume = read_volume(source, modality="MR")
        kept = type(volume).from_sitk(resample_isotropic(volume.to_sitk(), MR_SPACING_MM), modality="MR")
        stem = source.name.replace(".nii.gz", f"_{MR_SPACING_MM:g}mm")
        brain = skull_stripped(kept, source)
        for version, suffix in ((kept, ""), (brain, "_brain")):
            if version is None:
                continue
            out = args.out / "mr" / f"{stem}{suffix}.nii.gz"
            out.parent.mkdir(parents=True, exist_ok=True)
            write_volume(version, out, overwrite=True)
            print(f"{_shown(out)}: {version.array.shape}")
            write_validation_slabs(version, mr_validation[index], args.out / "val_mr", f"{stem}{suffix}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
