"""Benchmark harness: run several denoisers side by side on the same (noisy, reference) pairs.

``evaluate(pairs, denoisers, out_dir)`` runs every denoiser on every pair in the same run and scores the
results against the reference:

* fidelity: PSNR / SSIM / RMSE in stated windows (``lib.evaluation``): CT in [-160, 240] ("soft_tissue")
  and [-1000, 1000] HU ("wide"); MR in [0, max(reference)] ("full");
* uniform regions (found on the REFERENCE, 15x15 px, soft tissue -100..200 HU for CT, foreground for MR):
  mean bias (denoised - reference) and the noise std of the denoised image;
* wall-clock time per volume and per slice, and peak memory.

Isolation, time and memory:

* A Python callable ``denoise(noisy (Z,H,W) float32, spacing (x,y,z), modality) -> array`` runs in a fresh
  ``multiprocessing`` *spawn* worker per (pair, denoiser). The worker loads the input (.npy) and imports the
  usual heavy modules (numpy, scipy, scikit-image, bm3d, bm4d, torch via lib.noise) first, then records its
  RSS, resets the kernel's peak-RSS counter (``echo 5 > /proc/self/clear_refs``, Linux >= 4.0), calls the
  denoiser, and reads ``VmHWM`` from ``/proc/self/status``. ``peak_mb`` = VmHWM after the call - RSS before it:
  the extra memory the call needed (all threads of the worker; native allocations included). A 10 ms psutil
  poller is the fallback if clear_refs is not writable. ``time_s`` = wall clock (``time.perf_counter``)
  around the call only (no process start, no imports done before, no file I/O).
* A :class:`CliDenoiser` runs a command (``{input}`` / ``{output}`` NIfTI paths) as a child process.
  ``time_s`` = wall clock of the whole process (interpreter start, imports, model loading, reading and
  writing the files: what a user of the command waits for). The command is started by the small launcher
  ``bench/_rusage_exec.py`` (Linux keeps the pre-``exec`` high-water mark in ``ru_maxrss``, so a command forked
  straight from this big process would inherit its RSS); ``peak_mb`` = the larger of the command's
  ``ru_maxrss`` from ``os.wait4`` in the launcher (the command and its reaped descendants; floor: the
  launcher's ~15 MB) and a 20 ms psutil poll of the summed RSS of the command's process tree. Its baseline is zero (a fresh process), so it INCLUDES the
  interpreter and library footprint (~100-500 MB for torch) unlike ``peak_mb`` of in-process callables;
  ``peak_rss_mb`` (absolute peak RSS of the worker / process) is reported for both for a like-for-like view.
"""
from __future__ import annotations

import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from lib.evaluation import (
    CT_WINDOWS,
    evaluate_windows,
    find_uniform_regions,
    mr_window,
    uniform_region_statistics,
)

REPO_ROOT = Path(__file__).resolve().parents[1]

Denoiser = Callable[[np.ndarray, Sequence[float], str], np.ndarray]

# Uniform-region settings (found on the reference).
ROI_SIZE = 15
ROI_MAX_PER_SLICE = 2
ROI_COUNT = 40
CT_ROI_HU_RANGE = (-100.0, 200.0)
MR_FOREGROUND_FRACTION = 0.05

# Modules a worker imports before the measured call, so that import time/memory is not charged to it.
_PRELOAD_MODULES = ("scipy.ndimage", "skimage.restoration", "bm3d", "bm4d", "lib.noise")


# --------------------------------------------------------------------------------------------------
# data containers
# --------------------------------------------------------------------------------------------------
@dataclass
class Pair:
    """A (noisy, reference) pair. Arrays are (Z, H, W) float32 in the modality's units (HU for CT)."""

    name: str
    modality: str
    noisy: np.ndarray
    reference: np.ndarray
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)  # (x, y, z) mm
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    meta: dict = field(default_factory=dict)
    #: MR window top; None -> max of ``reference`` (pairs.py sets the whole volume's max, so that the window
    #: does not change with --max-slices)
    mr_window_max: float | None = None

    def __post_init__(self) -> None:
        self.modality = self.modality.upper()
        self.noisy = _as_volume(self.noisy, "noisy")
        self.reference = _as_volume(self.reference, "reference")
        if self.noisy.shape != self.reference.shape:
            raise ValueError(f"pair {self.name}: noisy {self.noisy.shape} and reference {self.reference.shape} differ")
        if self.modality not in ("CT", "MR"):
            raise ValueError(f"pair {self.name}: modality must be CT or MR, got {self.modality}")
        self.spacing = tuple(float(s) for s in self.spacing)
        if len(self.spacing) == 2:
            self.spacing = (*self.spacing, 1.0)

    @property
    def n_slices(self) -> int:
        return int(self.noisy.shape[0])

    def windows(self) -> dict[str, tuple[float, float]]:
        """CT: soft_tissue [-160, 240] and wide [-1000, 1000] HU. MR: [0, max(reference)] over the whole
        volume ("full") and over the foreground only ("foreground", see :meth:`masks`)."""
        if self.modality == "CT":
            return dict(CT_WINDOWS)
        win = (0.0, float(self.mr_window_max)) if self.mr_window_max else mr_window(self.reference)
        return {"full": win, "foreground": win}

    def masks(self) -> dict[str, np.ndarray]:
        """Masks restricting some windows' metrics. MR "foreground": reference > 5 % of its maximum, holes
        filled per slice (the head/brain). Without it the Rician noise floor of the background (Rayleigh,
        mean 1.25 sigma, which no denoiser here removes) dominates the MR error."""
        if self.modality != "MR":
            return {}
        from scipy import ndimage

        fg = self.reference > MR_FOREGROUND_FRACTION * self.windows()["full"][1]
        fg = np.stack([ndimage.binary_fill_holes(s) for s in fg])
        return {"foreground": fg} if fg.any() else {}

    def display_window(self) -> tuple[float, float]:
        return CT_WINDOWS["soft_tissue"] if self.modality == "CT" else self.windows()["full"]


def _as_volume(a, what: str) -> np.ndarray:
    arr = np.asarray(a, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ValueError(f"{what}: expected (H, W) or (Z, H, W), got {arr.shape}")
    return np.ascontiguousarray(arr)


@dataclass
class CliDenoiser:
    """A denoiser run as a command line on temporary NIfTI files.

    ``template`` is split with shlex; the placeholders ``{input}``, ``{output}``, ``{modality}`` and
    ``{python}`` (this interpreter) are substituted in each token. A leading ``python``/``python3`` token is
    replaced by this interpreter so that the project's virtual environment is used. The command runs in the
    repository root; its stdout/stderr go to log files kept next to the results when it fails.
    """

    template: str
    timeout_s: float | None = None
    env: dict | None = None

    def command(self, input_path: str, output_path: str, modality: str) -> list[str]:
        tokens = shlex.split(self.template)
        if not tokens:
            raise ValueError("empty CLI template")
        if tokens[0] in ("python", "python3"):
            tokens[0] = sys.executable
        subs = {"input": input_path, "output": output_path, "modality": modality, "python": sys.executable}
        out = []
        for tok in tokens:
            for key, val in subs.items():
                tok = tok.replace("{" + key + "}", val)
            out.append(tok)
        return out


# --------------------------------------------------------------------------------------------------
# memory helpers (Linux /proc)
# --------------------------------------------------------------------------------------------------
def _proc_status_kb(field_name: str) -> float | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field_name + ":"):
                    return float(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class RssPoller:
    """Polls the RSS of a process (and optionally its children) in a thread; keeps the maximum (bytes).
    :meth:`rss` is one reading."""

    def __init__(self, pid: int, interval_s: float, children: bool, include_root: bool = True) -> None:
        import psutil

        self._proc = psutil.Process(pid)
        self._interval = interval_s
        self._children = children
        self._include_root = include_root
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        """Resident memory now (bytes), 0 when the process is gone."""
        import psutil

        try:
            total = self._proc.memory_info().rss if self._include_root else 0
            if self._children:
                for ch in self._proc.children(recursive=True):
                    try:
                        total += ch.memory_info().rss
                    except psutil.Error:
                        pass
            return total
        except psutil.Error:
            return 0

    def _sample(self) -> None:
        self.peak = max(self.peak, self.rss())

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self._interval)

    def __enter__(self):
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


# --------------------------------------------------------------------------------------------------
# in-process callables: one spawned worker per call
# --------------------------------------------------------------------------------------------------
def _worker_main(fn: Denoiser, in_path: str, out_path: str, result_path: str, spacing, modality: str) -> None:
    import importlib

    result: dict[str, Any] = {}
    try:
        for mod in _PRELOAD_MODULES:
            try:
                importlib.import_module(mod)
            except Exception:  # noqa: BLE001 - optional speed-up only
                pass
        arr = np.load(in_path)
        rss_before_kb = _proc_status_kb("VmRSS") or 0.0
        reset_ok = _reset_peak_rss()
        with RssPoller(os.getpid(), 0.01, children=False) as poller:
            t0 = time.perf_counter()
            out = fn(arr, tuple(spacing), modality)
            t1 = time.perf_counter()
        hwm_kb = _proc_status_kb("VmHWM") if reset_ok else None
        peak_kb = max(hwm_kb or 0.0, poller.peak / 1024.0)
        out = np.asarray(out, dtype=np.float32)
        if out.shape != arr.shape:
            raise ValueError(f"denoiser returned shape {out.shape} for input {arr.shape}")
        np.save(out_path, out)
        result = {
            "ok": True,
            "time_s": t1 - t0,
            "rss_before_mb": rss_before_kb / 1024.0,
            "peak_rss_mb": peak_kb / 1024.0,
            "peak_mb": max(peak_kb - rss_before_kb, 0.0) / 1024.0,
            "memory_method": "VmHWM after clear_refs" if reset_ok else "psutil poll 10 ms",
        }
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    with open(result_path, "w") as fh:
        json.dump(result, fh)


def _run_callable(fn: Denoiser, pair: Pair, tmp: Path, timeout_s: float | None) -> tuple[np.ndarray | None, dict]:
    import multiprocessing as mp

    in_path, out_path, res_path = tmp / "in.npy", tmp / "out.npy", tmp / "result.json"
    np.save(in_path, pair.noisy)
    ctx = mp.get_context("spawn")
    proc = ctx.Process(target=_worker_main, args=(fn, str(in_path), str(out_path), str(res_path), pair.spacing, pair.modality))
    proc.start()
    proc.join(timeout_s)
    if proc.is_alive():
        proc.terminate()
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join()
        return None, {"ok": False, "error": f"timed out after {timeout_s} s"}
    if not res_path.exists():
        return None, {"ok": False, "error": f"worker died (exit code {proc.exitcode}) without a result"}
    info = json.loads(res_path.read_text())
    info["method"] = "spawn worker"
    if not info.get("ok"):
        return None, info
    return np.load(out_path), info


# --------------------------------------------------------------------------------------------------
# command-line denoisers
# --------------------------------------------------------------------------------------------------
def _write_nifti(arr: np.ndarray, pair: Pair, path: Path) -> None:
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(arr.astype(np.float32))
    img.SetSpacing(pair.spacing)
    img.SetOrigin(pair.origin)
    try:
        img.SetDirection(pair.direction)
    except RuntimeError:  # a non-orthonormal direction from some source: keep identity
        pass
    sitk.WriteImage(img, str(path))


def _read_nifti(path: Path) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(np.float32)


def _run_cli(cli: CliDenoiser, pair: Pair, tmp: Path, timeout_s: float | None, log_dir: Path | None, label: str) -> tuple[np.ndarray | None, dict]:
    in_path, out_path = tmp / "input.nii.gz", tmp / "output.nii.gz"
    _write_nifti(pair.noisy, pair, in_path)
    cmd = cli.command(str(in_path), str(out_path), pair.modality)
    env = dict(os.environ)
    if cli.env:
        env.update(cli.env)
    timeout = cli.timeout_s if cli.timeout_s is not None else timeout_s
    stdout_path, stderr_path, rusage_path = tmp / "stdout.txt", tmp / "stderr.txt", tmp / "rusage.json"
    launcher = [sys.executable, str(Path(__file__).with_name("_rusage_exec.py")), str(rusage_path), "--"]
    timed_out = False
    with open(stdout_path, "wb") as so, open(stderr_path, "wb") as se:
        t0 = time.perf_counter()
        proc = subprocess.Popen(launcher + cmd, cwd=str(REPO_ROOT), env=env, stdout=so, stderr=se,
                                start_new_session=True)
        with RssPoller(proc.pid, 0.02, children=True, include_root=False) as poller:
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                try:
                    os.killpg(proc.pid, 9)  # the launcher's own session: it and the command
                except ProcessLookupError:
                    pass
                proc.wait()
        t1 = time.perf_counter()
    ru = json.loads(rusage_path.read_text()) if rusage_path.exists() else {}
    peak_mb = max(float(ru.get("maxrss_mb", 0.0)), poller.peak / 2**20)
    info: dict[str, Any] = {
        "method": "CLI process",
        "command": shlex.join(cmd),
        "time_s": float(ru.get("wall_s", t1 - t0)),
        "peak_mb": peak_mb,
        "peak_rss_mb": peak_mb,
        "rss_before_mb": 0.0,
        "memory_method": "max(ru_maxrss of the command via wait4 in bench/_rusage_exec.py, psutil tree poll 20 ms)",
    }
    returncode = ru.get("returncode", proc.returncode)
    err_tail = stderr_path.read_text(errors="replace")[-2000:]
    if timed_out or returncode != 0 or not out_path.exists():
        if log_dir is not None:
            log_dir.mkdir(parents=True, exist_ok=True)
            (log_dir / f"{label}.stderr.txt").write_text(stderr_path.read_text(errors="replace"))
            (log_dir / f"{label}.stdout.txt").write_text(stdout_path.read_text(errors="replace"))
        why = f"timed out after {timeout} s" if timed_out else (
            f"exit code {returncode}" if returncode != 0 else "no output file written")
        info.update(ok=False, error=f"CLI failed ({why}): {err_tail.strip().splitlines()[-1] if err_tail.strip() else ''}")
        return None, info
    out = _read_nifti(out_path)
    if out.shape != pair.noisy.shape:
        if out.size == pair.noisy.size:
            out = out.reshape(pair.noisy.shape)
        else:
            info.update(ok=False, error=f"CLI output shape {out.shape} != input {pair.noisy.shape}")
            return None, info
    info["ok"] = True
    return out, info


# --------------------------------------------------------------------------------------------------
# scoring
# --------------------------------------------------------------------------------------------------
def pair_rois(pair: Pair) -> list:
    hu_range = CT_ROI_HU_RANGE if pair.modality == "CT" else None
    return find_uniform_regions(pair.reference, roi_size=ROI_SIZE, n_rois=ROI_COUNT, hu_range=hu_range,
                                max_rois_per_slice=ROI_MAX_PER_SLICE)


def score(pred: np.ndarray, pair: Pair, rois: list, masks: dict | None = None) -> dict:
    masks = pair.masks() if masks is None else masks
    wins = {k: v for k, v in pair.windows().items() if k in masks or k in CT_WINDOWS or k == "full"}
    res = {"windows": evaluate_windows(pred, pair.reference, wins.items(), masks=masks)}
    res["uniform"] = uniform_region_statistics(pred, pair.reference, rois).as_dict()
    return res


def added_noise_std(pair: Pair, rois: list) -> float:
    """Mean over the uniform ROIs of std(noisy - reference): the noise the simulation ADDED."""
    if not rois:
        return float("nan")
    d = pair.noisy.astype(np.float64) - pair.reference
    return float(np.mean([d[tuple(r)].std() for r in rois]))


# --------------------------------------------------------------------------------------------------
# machine
# --------------------------------------------------------------------------------------------------
def describe_machine() -> dict:
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version()}
    cpu = None
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info["cpu_model"] = cpu or platform.processor() or "unknown"
    info["logical_cpus"] = os.cpu_count()
    try:
        info["usable_cpus"] = len(os.sched_getaffinity(0))
    except AttributeError:
        info["usable_cpus"] = os.cpu_count()
    try:
        with open("/proc/meminfo") as fh:
            mem = {ln.split(":")[0]: float(ln.split()[1]) for ln in fh if ln.split()}
        info["ram_gb"] = round(mem.get("MemTotal", 0.0) / 2**20, 1)
    except OSError:
        info["ram_gb"] = None
    info["omp_num_threads"] = os.environ.get("OMP_NUM_THREADS")
    try:
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        info["load_average_at_start"] = None
    versions = {}
    for mod in ("numpy", "scipy", "skimage", "torch", "monai", "bm3d", "bm4d", "SimpleITK"):
        try:
            m = __import__(mod)
            versions[mod] = getattr(m, "__version__", None) or getattr(m, "Version_VersionString", lambda: "?")()
        except Exception:  # noqa: BLE001
            versions[mod] = None
    info["versions"] = versions
    try:
        import torch

        info["cuda_available"] = bool(torch.cuda.is_available())
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        info["torch_threads"] = torch.get_num_threads()
    except Exception:  # noqa: BLE001
        info["cuda_available"], info["gpu"] = False, None
    return info


def machine_line(m: Mapping) -> str:
    gpu = m.get("gpu") or "no GPU (CUDA not available)"
    return (f"{m.get('cpu_model')}, {m.get('usable_cpus')} usable of {m.get('logical_cpus')} logical CPUs, "
            f"{m.get('ram_gb')} GB RAM, {gpu}; Python {m.get('python')}, torch {m['versions'].get('torch')}, "
            f"OMP_NUM_THREADS={m.get('omp_num_threads')}")


# --------------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------------
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
    ``<pair>_comparison.png`` per pair when ``out_dir`` is given). ``select(pair, name)`` may skip a
    denoiser on a pair (e.g. a 3D-only method on a CT slab); ``extra`` is stored in the results as is.
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
    results: dict[str, Any] = {"title": title, "machine": machine, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                               **dict(extra or {}), "pairs": []}
    t_start = time.perf_counter()
    for pair in pairs:
        rois = pair_rois(pair)
        masks = pair.masks()
        pres: dict[str, Any] = {
            "name": pair.name, "modality": pair.modality, "shape_zyx": list(pair.noisy.shape),
            "spacing_xyz_mm": list(pair.spacing),
            "windows": {k: list(v) for k, v in pair.windows().items() if k in masks or k in CT_WINDOWS or k == "full"},
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
                    if isinstance(den, CliDenoiser):
                        pred, info = _run_cli(den, pair, Path(td), timeout_s, out / "logs" if out else None,
                                              f"{pair.name}_{name}")
                    else:
                        pred, info = _run_callable(den, pair, Path(td), timeout_s)
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
    results["total_wall_s"] = time.perf_counter() - t_start
    try:
        results["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    if out is not None:
        (out / "results.json").write_text(json.dumps(_jsonable(results), indent=2))
        (out / "results.md").write_text(results_markdown(results))
    return results


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _jsonable(obj):
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


# --------------------------------------------------------------------------------------------------
# reporting
# --------------------------------------------------------------------------------------------------
def _fmt(v, nd=2) -> str:
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
