"""The benchmark's report: the per-pair markdown table, ``results.md`` and the comparison figure.

Everything here reads the results dict of :func:`bench.harness.evaluate` (one ``pres`` entry per pair:
``windows``, ``denoisers`` -> ``{ok, windows -> {psnr, ssim, rmse}, uniform, time_s, time_per_slice_s,
peak_mb, peak_rss_mb}``); nothing is measured here.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping

import numpy as np

from bench.pairs import Pair
from bench.scoring import ROI_SIZE
from lib.runtime.machine import machine_line

__all__ = ["RATIO_BASELINE", "pair_table", "results_markdown", "comparison_figure"]


def _fmt(v, nd: int = 2) -> str:
    """``v`` with ``nd`` decimals; "-" for None, "inf" / "nan" spelled out, non-numbers as text."""
    if v is None:
        return "-"
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    if math.isinf(f):
        return "inf"
    if math.isnan(f):
        return "nan"
    return f"{f:.{nd}f}"


#: The baseline that the learned models' targets are stated against (PSNR gain and time ratio columns).
RATIO_BASELINE = "bm3d"


def pair_table(pres: Mapping) -> str:
    """One pair's markdown table: a row per denoiser (PSNR dB / SSIM / RMSE per window, ROI bias and noise std,
    s/slice, s/volume, peak MB, peak RSS MB), and, when :data:`RATIO_BASELINE` ran, the PSNR gain over it in the
    first window and the time ratio to it. A failed denoiser's row shows its error."""
    ct = pres["modality"] == "CT"
    wnames = list(pres["windows"])
    unit = "HU" if ct else ""
    head = ["denoiser"]
    for w in wnames:
        lo, hi = pres["windows"][w]
        tag = f"{w} [{lo:g},{hi:g}]" if ct else f"{w} [0,{hi:.0f}]"
        head += [f"PSNR {tag}", f"SSIM {tag}", f"RMSE {tag}"]
    head += [f"ROI bias {unit}".strip(), f"ROI noise std {unit}".strip(), "s/slice", "s/volume", "peak MB", "peak RSS MB"]
    # the targets are stated against BM3D measured in the same run: its PSNR (first window) and time
    baseline = pres["denoisers"].get(RATIO_BASELINE)
    baseline = baseline if baseline and baseline.get("ok") else None
    if baseline is not None:
        head += [f"PSNR - {RATIO_BASELINE} ({wnames[0]})", f"time / {RATIO_BASELINE}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, e in pres["denoisers"].items():
        if not e.get("ok"):
            lines.append(f"| {name} | " + " | ".join(["-"] * (len(head) - 2)) + f" | FAILED: {e.get('error', '')[:80]} |")
            continue
        row = [name]
        for w in wnames:
            m = e["windows"][w]
            row += [_fmt(m["psnr"]), _fmt(m["ssim"], 4), _fmt(m["rmse"], 1 if ct else 2)]
        u = e["uniform"]
        row += [_fmt(u["mean_bias"], 1 if ct else 2), _fmt(u["noise_std"], 1 if ct else 2), _fmt(e["time_per_slice_s"], 3),
                _fmt(e["time_s"], 2), _fmt(e["peak_mb"], 0), _fmt(e.get("peak_rss_mb"), 0)]
        if baseline is not None:
            gain = e["windows"][wnames[0]]["psnr"] - baseline["windows"][wnames[0]]["psnr"]
            row += [f"{gain:+.2f}", _fmt(e["time_s"] / baseline["time_s"] if baseline["time_s"] else None, 2)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def results_markdown(results: Mapping) -> str:
    """The whole ``results.md``: title, run time, machine, command, then per pair its description and table."""
    m = results["machine"]
    parts = [f"# {results['title']}", "", f"Run started {results['started']}; total wall time "
             f"{_fmt(results.get('total_wall_s'), 1)} s.", "", f"Machine: {machine_line(m)}.", ""]
    if m.get("load_average_at_start") is not None:
        parts += [f"Load average (1/5/15 min) at start {m['load_average_at_start']}, at end "
                  f"{results.get('load_average_at_end')}: other jobs on the machine slow the timings.", ""]
    if results.get("command"):
        parts += [f"Command: `{results['command']}`", ""]
    for pres in results["pairs"]:
        z, h, w = pres["shape_zyx"]
        sp = pres["spacing_xyz_mm"]
        parts += [f"## {pres['name']} ({pres['modality']}, {z} x {h} x {w} voxels, "
                  f"{sp[0]:.3g} x {sp[1]:.3g} x {sp[2]:.3g} mm)", ""]
        sim = pres.get("meta", {}).get("simulation")
        if sim:
            parts += [f"Simulation: `{json.dumps(sim, sort_keys=True)}`", ""]
        parts += [f"Uniform ROIs (on the reference): {pres['n_uniform_rois']} x {ROI_SIZE}x{ROI_SIZE} px; "
                  f"added noise std (noisy - reference) in them: {_fmt(pres['added_noise_std_in_rois'], 2)}"
                  f"{' HU' if pres['modality'] == 'CT' else ''}.", ""]
        if pres.get("masks"):
            parts += ["Masked windows: " + "; ".join(f"{k}: {v}" for k, v in pres["masks"].items())
                      + " (MR foreground: reference > 5 % of max, holes filled per slice).", ""]
        parts += [pair_table(pres), ""]
        if pres.get("figure"):
            parts += [f"![{pres['name']}]({pres['figure']})", ""]
    parts += ["Time: wall clock of the denoise call in a fresh spawn worker (after imports and input loading); "
              "for CLI denoisers the whole process (start, imports, model, file I/O). "
              "peak MB: peak RSS during the call minus RSS just before it (VmHWM after clear_refs); for CLI "
              "denoisers the peak RSS of the whole process tree (includes the interpreter). peak RSS MB: absolute "
              "peak RSS of the worker/process.", ""]
    return "\n".join(parts)


def _zoom_box(ref2d: np.ndarray, window, size: int) -> tuple[int, int]:
    """Top-left of the ``size`` box with the most reference structure inside the display window."""
    from scipy import ndimage

    lo, hi = window
    r = np.clip(ref2d.astype(np.float64), lo, hi)
    gy, gx = np.gradient(r)
    energy = ndimage.uniform_filter(np.hypot(gy, gx), size=size, mode="constant")
    h, w = r.shape
    half = size // 2
    sub = energy[half:h - size + half + 1, half:w - size + half + 1]
    if sub.size == 0:
        return 0, 0
    iy, ix = np.unravel_index(int(np.argmax(sub)), sub.shape)
    return int(iy), int(ix)


def comparison_figure(pair: Pair, outputs: Mapping[str, np.ndarray], pres: Mapping, path: Path) -> None:
    """noisy | each denoiser | reference; rows: full slice, zoom, difference (column - reference)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    z = pair.n_slices // 2
    lo, hi = pair.display_window()
    ref = pair.reference[z]
    cols = [("noisy input", pair.noisy[z], "noisy")]
    cols += [(n, o[z], n) for n, o in outputs.items() if n != "noisy"]
    cols += [("reference", ref, None)]
    h, w = ref.shape
    size = max(16, min(h, w) // 4)
    y0, x0 = _zoom_box(ref, (lo, hi), size)
    dnoise = pair.noisy[z].astype(np.float64) - ref
    dlim = float(max(np.percentile(np.abs(dnoise), 99), 1e-6)) if pair.modality == "MR" else float(
        max(50.0, 10.0 * round(2.5 * np.std(np.clip(dnoise, -500, 500)) / 10.0)))
    n = len(cols)
    fig, axes = plt.subplots(3, n, figsize=(2.6 * n, 8.2), squeeze=False)
    unit = " HU" if pair.modality == "CT" else ""
    first_w = "foreground" if "foreground" in pres["windows"] else next(iter(pres["windows"]))
    for j, (label, img, key) in enumerate(cols):
        ax = axes[0, j]
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
        ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), size, size, fill=False, edgecolor="yellow", linewidth=1))
        sub = label
        if key is not None and key in pres["denoisers"] and pres["denoisers"][key].get("ok"):
            m = pres["denoisers"][key]["windows"][first_w]
            sub += f"\n{m['psnr']:.2f} dB / {m['ssim']:.3f}"
        ax.set_title(sub, fontsize=9)
        axes[1, j].imshow(img[y0:y0 + size, x0:x0 + size], cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
        if key is not None or label == "noisy input":
            diff = img.astype(np.float64) - ref
            im = axes[2, j].imshow(diff, cmap="RdBu_r", vmin=-dlim, vmax=dlim, interpolation="nearest")
            axes[2, j].set_title(f"{label} - reference", fontsize=8)
        else:
            axes[2, j].set_visible(False)
        for r in range(3):
            axes[r, j].set_xticks([])
            axes[r, j].set_yticks([])
    axes[1, 0].set_ylabel(f"zoom {size}x{size} px", fontsize=8)
    axes[2, 0].set_ylabel(f"difference, ±{dlim:.0f}{unit}", fontsize=8)
    fig.colorbar(im, ax=axes[2, :].tolist(), shrink=0.8, pad=0.01)
    wtxt = f"window [{lo:g}, {hi:g}]{unit}"
    fig.suptitle(f"{pair.name}: slice {z} of {pair.n_slices}, {wtxt}; titles: PSNR / SSIM in {first_w} window",
                 fontsize=10)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
