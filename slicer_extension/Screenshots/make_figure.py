"""Render ``1.png``: the sample low-dose head CT next to the app's ADL result and their difference, as the module's
side-by-side view shows them (brain window). Not a Slicer screenshot (no Slicer where this was made): a real one
is still needed for the Extensions Manager (see ../README.md).

Usage (repository root, after ``./run.sh`` wrote sample_data/output/): ``.venv/bin/python
slicer_extension/Screenshots/make_figure.py``
"""
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
ORIGINAL = ROOT / "sample_data" / "studies" / "ct_head_invesalius_ld25.nii.gz"
DENOISED = ROOT / "sample_data" / "output" / "ct_head_invesalius_ld25_adl.nii.gz"


def main() -> None:
    original = sitk.GetArrayFromImage(sitk.ReadImage(str(ORIGINAL))).astype(np.float32)
    denoised = sitk.GetArrayFromImage(sitk.ReadImage(str(DENOISED))).astype(np.float32)
    k = original.shape[0] // 2
    spacing = sitk.ReadImage(str(ORIGINAL)).GetSpacing()
    aspect = spacing[1] / spacing[0]
    width, level = 80.0, 40.0  # brain window (HU)
    panels = [("original (25 % dose)", original[k], (level - width / 2, level + width / 2)),
              ("ADL denoised", denoised[k], (level - width / 2, level + width / 2)),
              ("difference (removed noise)", original[k] - denoised[k], (-60, 60))]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.6), facecolor="black")
    for ax, (title, image, (lo, hi)) in zip(axes, panels):
        ax.imshow(image[::-1], cmap="gray", vmin=lo, vmax=hi, aspect=aspect, interpolation="nearest")
        ax.set_title(title, color="white", fontsize=12)
        ax.axis("off")
    fig.suptitle("ADL Denoise: side by side, linked slices (sample head CT, slice %d, W %d L %d HU)"
                 % (k, width, level), color="white", fontsize=12)
    fig.text(0.5, 0.02, "rendered with matplotlib from the app's output, not a 3D Slicer screenshot",
             ha="center", color="#aaaaaa", fontsize=9)
    fig.tight_layout(rect=(0, 0.05, 1, 0.95))
    fig.savefig(Path(__file__).with_name("1.png"), dpi=80, facecolor="black")


if __name__ == "__main__":
    main()
