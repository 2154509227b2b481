"""The benchmark run: several denoisers side by side on the same (noisy, reference) pairs.

``evaluate(pairs, denoisers, out_dir)`` runs every denoiser on every pair in the same run, one call after the
other, each call isolated in its own process (:mod:`bench.isolation`: wall time and peak memory), scores the
result against the reference (:mod:`bench.scoring`: PSNR / SSIM / RMSE in stated windows, uniform-region bias
and noise) and writes the report (:mod:`bench.report`: ``results.md``, one comparison figure per pair) next to
``results.json``. The pairs are :class:`bench.pairs.Pair`.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from bench.isolation import CliDenoiser, Denoiser, run_isolated
from bench.pairs import Pair
from bench.report import comparison_figure, results_markdown
from bench.scoring import added_noise_std, pair_rois, score, scored_windows
from lib.runtime.clock import Stopwatch, utc_timestamp
from lib.runtime.machine import describe_machine

__all__ = ["evaluate"]


def evaluate(
    pairs: Sequence[Pair],
    denoisers: Mapping[str, Denoiser | CliDenoiser],
    out_dir: str | os.PathLike | None = None,
    *,
    timeout_s: float | None = None,
    figures: bool = True,
    machine: dict | None = None,
    title: str = "Denoising benchmark",
    select: Callable[[Pair, str], bool] | None = None,
    extra: Mapping[str, Any] | None = None,
    log: Callable[[str], None] | None = print,
) -> dict:
    """Run every denoiser on every pair (sequentially, each call isolated) and score the results.

    Returns the results dict (also written to ``<out_dir>/results.json`` with ``results.md`` and one
    ``<pair>_comparison.png`` per pair when ``out_dir`` is given). ``timeout_s``: seconds allowed per call
    (None: no limit). ``select(pair, name)`` may skip a denoiser on a pair (e.g. a 3D-only method on a CT
    slab); ``extra`` is stored in the results as is; ``machine`` defaults to
    :func:`lib.runtime.machine.describe_machine`.
    """
    if not pairs:
        raise ValueError("no pairs to evaluate")
    if not denoisers:
        raise ValueError("no denoisers to evaluate")
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    machine = machine or describe_machine()
    log = log or (lambda s: None)
    results: dict[str, Any] = {"title": title, "machine": machine, "started": utc_timestamp(),
                               **dict(extra or {}), "pairs": []}
    watch = Stopwatch()
    for pair in pairs:
        rois = pair_rois(pair)
        masks = pair.masks()
        pres: dict[str, Any] = {
            "name": pair.name, "modality": pair.modality, "shape_zyx": list(pair.noisy.shape),
            "spacing_xyz_mm": list(pair.spacing),
            "windows": {k: list(v) for k, v in scored_windows(pair, masks).items()},
            "masks": {k: f"{int(v.sum())} voxels" for k, v in masks.items()},
            "n_uniform_rois": len(rois), "added_noise_std_in_rois": added_noise_std(pair, rois),
            "meta": pair.meta, "denoisers": {},
        }
        outputs: dict[str, np.ndarray] = {}
        for name, den in denoisers.items():
            if select is not None and not select(pair, name):
                continue
            log(f"[bench] {pair.name}: {name} ...")
            with tempfile.TemporaryDirectory(prefix="adl_bench_") as td:
                try:
                    pred, info = run_isolated(den, pair, Path(td), timeout_s, out / "logs" if out else None,
                                              f"{pair.name}_{name}")
                except Exception as exc:  # noqa: BLE001 - one failing denoiser must not stop the run
                    pred, info = None, {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            entry = {k: v for k, v in info.items() if k != "traceback"}
            if pred is not None and not np.all(np.isfinite(pred)):
                entry.update(ok=False, error="output contains NaN/Inf")
                pred = None
            if pred is not None:
                entry["time_per_slice_s"] = entry["time_s"] / pair.n_slices
                entry.update(score(pred, pair, rois, masks))
                outputs[name] = pred
                st = entry["windows"][next(iter(entry["windows"]))]
                log(f"[bench]   {name}: PSNR {st['psnr']:.2f} dB, SSIM {st['ssim']:.4f}, "
                    f"{entry['time_s']:.2f} s, peak {entry['peak_mb']:.0f} MB")
            else:
                log(f"[bench]   {name}: FAILED: {entry.get('error')}")
                if info.get("traceback"):
                    log(info["traceback"])
            pres["denoisers"][name] = entry
        if out is not None and figures and outputs:
            fig_path = out / f"{_safe(pair.name)}_comparison.png"
            try:
                comparison_figure(pair, outputs, pres, fig_path)
                pres["figure"] = fig_path.name
            except Exception as exc:  # noqa: BLE001
                log(f"[bench] figure for {pair.name} failed: {exc}")
        results["pairs"].append(pres)
    results["total_wall_s"] = watch.seconds
    try:
        results["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    if out is not None:
        (out / "results.json").write_text(json.dumps(_jsonable(results), indent=2))
        (out / "results.md").write_text(results_markdown(results))
    return results


def _safe(name: str) -> str:
    """``name`` usable as a file name: characters other than letters, digits, ``-_.`` become ``_``."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _jsonable(obj):
    """``obj`` with numpy scalars as Python numbers, paths as text and non-finite floats as "inf" / "nan"."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if math.isfinite(f) else str(f)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj
