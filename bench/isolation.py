"""Run one denoiser call alone and measure its wall time and peak memory.

Two kinds of denoiser, both given the noisy (Z, H, W) float32 volume of a pair:

* A Python callable ``denoise(noisy (Z,H,W) float32, spacing (x,y,z) mm, modality) -> array`` runs in a fresh
  ``multiprocessing`` *spawn* worker per call. The worker loads the input (.npy) and imports the usual heavy
  modules (numpy, scipy, scikit-image, bm3d, bm4d, torch via lib.noise) first, then records its RSS, resets the
  kernel's peak-RSS counter (``echo 5 > /proc/self/clear_refs``, Linux >= 4.0), calls the denoiser, and reads
  ``VmHWM`` from ``/proc/self/status``. ``peak_mb`` = VmHWM after the call - RSS before it: the extra memory
  the call needed (all threads of the worker; native allocations included). A 10 ms psutil poller is the
  fallback if clear_refs is not writable. ``time_s`` = wall clock around the call only (no process start, no
  imports done before, no file I/O).
* A :class:`CliDenoiser` runs a command (``{input}`` / ``{output}`` NIfTI paths) as a child process.
  ``time_s`` = wall clock of the whole process (interpreter start, imports, model loading, reading and
  writing the files: what a user of the command waits for). The command is started by the small launcher
  ``bench/_rusage_exec.py`` (Linux keeps the pre-``exec`` high-water mark in ``ru_maxrss``, so a command forked
  straight from this big process would inherit its RSS); ``peak_mb`` = the larger of the command's
  ``ru_maxrss`` from ``os.wait4`` in the launcher (the command and its reaped descendants; floor: the
  launcher's own small footprint) and a 20 ms psutil poll of the summed RSS of the command's process tree. Its
  baseline is zero (a fresh process), so it INCLUDES the interpreter and library footprint, unlike ``peak_mb``
  of in-process callables; ``peak_rss_mb`` (absolute peak RSS of the worker / process) is reported for both
  for a like-for-like view.

:func:`run_isolated` runs either kind and returns ``(denoised (Z,H,W) float32 or None, info)``; ``info`` holds
``ok``, ``time_s``, ``peak_mb``, ``peak_rss_mb``, ``rss_before_mb``, ``method``, ``memory_method`` and, on
failure, ``error`` (and ``traceback`` for callables).
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import threading
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from lib.runtime.clock import Stopwatch

__all__ = ["Denoiser", "DenoiserInput", "CliDenoiser", "RssPoller", "run_isolated", "run_in_worker",
           "run_command"]

REPO_ROOT = Path(__file__).resolve().parents[1]

#: ``denoise(noisy (Z,H,W) float32, spacing (x,y,z) mm, modality "CT"/"MR") -> (Z,H,W) array``
Denoiser = Callable[[np.ndarray, Sequence[float], str], np.ndarray]

# Modules a worker imports before the measured call, so that import time/memory is not charged to it.
_PRELOAD_MODULES = ("scipy.ndimage", "skimage.restoration", "bm3d", "bm4d", "lib.noise")

# The launcher of command-line denoisers: a separate small script, so that the command's ru_maxrss does not
# start from this process's footprint.
_LAUNCHER = Path(__file__).with_name("_rusage_exec.py")


class DenoiserInput(Protocol):
    """What an isolated call needs of a pair (``bench.pairs.Pair`` has it): the noisy volume and its geometry."""

    noisy: np.ndarray  # (Z, H, W) float32
    modality: str  # "CT" or "MR"
    spacing: tuple[float, float, float]  # (x, y, z) mm
    origin: tuple[float, float, float]
    direction: tuple[float, ...]  # 9 values, row-major 3x3


@dataclass
class CliDenoiser:
    """A denoiser run as a command line on temporary NIfTI files.

    ``template`` is split with shlex; the placeholders ``{input}``, ``{output}``, ``{modality}`` (``ct`` or
    ``mr``, lower case: what the app's ``cli.py --modality`` takes) and ``{python}`` (this interpreter) are
    substituted in each token. A leading ``python``/``python3`` token is
    replaced by this interpreter so that the project's virtual environment is used. The command runs in the
    repository root; its stdout/stderr go to log files kept next to the results when it fails.
    ``timeout_s`` (seconds) overrides the run's timeout; ``env`` is added to the environment.
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
        # lower case: the app's CLI rejects "--modality CT" (its choices are ct, mr), so an upper-case value made
        # every "--modality {modality}" command fail
        subs = {"input": input_path, "output": output_path, "modality": modality.lower(), "python": sys.executable}
        out = []
        for tok in tokens:
            for key, val in subs.items():
                tok = tok.replace("{" + key + "}", val)
            out.append(tok)
        return out


# --------------------------------------------------------------------------------------------------
# memory: Linux /proc and a psutil poller
# --------------------------------------------------------------------------------------------------
def _proc_status_kb(field_name: str) -> float | None:
    """A ``/proc/self/status`` field in kB (``VmRSS``, ``VmHWM``), None where unavailable."""
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
            watch = Stopwatch()
            out = fn(arr, tuple(spacing), modality)
            seconds = watch.seconds
        hwm_kb = _proc_status_kb("VmHWM") if reset_ok else None
        peak_kb = max(hwm_kb or 0.0, poller.peak / 1024.0)
        out = np.asarray(out, dtype=np.float32)
        if out.shape != arr.shape:
            raise ValueError(f"denoiser returned shape {out.shape} for input {arr.shape}")
        np.save(out_path, out)
        result = {
            "ok": True,
            "time_s": seconds,
            "rss_before_mb": rss_before_kb / 1024.0,
            "peak_rss_mb": peak_kb / 1024.0,
            "peak_mb": max(peak_kb - rss_before_kb, 0.0) / 1024.0,
            "memory_method": "VmHWM after clear_refs" if reset_ok else "psutil poll 10 ms",
        }
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    with open(result_path, "w") as fh:
        json.dump(result, fh)


def run_in_worker(fn: Denoiser, pair: DenoiserInput, work_dir: Path,
                  timeout_s: float | None) -> tuple[np.ndarray | None, dict]:
    """``fn`` on ``pair.noisy`` in a fresh spawn worker; files go to ``work_dir``. See the module docstring."""
    import multiprocessing as mp

    in_path, out_path, res_path = work_dir / "in.npy", work_dir / "out.npy", work_dir / "result.json"
    np.save(in_path, pair.noisy)
    ctx = mp.get_context("spawn")
    proc = ctx.Process(target=_worker_main,
                       args=(fn, str(in_path), str(out_path), str(res_path), pair.spacing, pair.modality))
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
def _write_nifti(arr: np.ndarray, pair: DenoiserInput, path: Path) -> None:
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


def run_command(cli: CliDenoiser, pair: DenoiserInput, work_dir: Path, timeout_s: float | None,
                log_dir: Path | None, label: str) -> tuple[np.ndarray | None, dict]:
    """``cli`` on ``pair.noisy`` through NIfTI files in ``work_dir``; on failure its stdout/stderr are copied to
    ``<log_dir>/<label>.std{out,err}.txt``. See the module docstring for what is measured."""
    in_path, out_path = work_dir / "input.nii.gz", work_dir / "output.nii.gz"
    _write_nifti(pair.noisy, pair, in_path)
    cmd = cli.command(str(in_path), str(out_path), pair.modality)
    env = dict(os.environ)
    if cli.env:
        env.update(cli.env)
    timeout = cli.timeout_s if cli.timeout_s is not None else timeout_s
    stdout_path, stderr_path = work_dir / "stdout.txt", work_dir / "stderr.txt"
    rusage_path = work_dir / "rusage.json"
    launcher = [sys.executable, str(_LAUNCHER), str(rusage_path), "--"]
    timed_out = False
    with open(stdout_path, "wb") as so, open(stderr_path, "wb") as se:
        watch = Stopwatch()
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
        seconds = watch.seconds
    ru = json.loads(rusage_path.read_text()) if rusage_path.exists() else {}
    peak_mb = max(float(ru.get("maxrss_mb", 0.0)), poller.peak / 2**20)
    info: dict[str, Any] = {
        "method": "CLI process",
        "command": shlex.join(cmd),
        "time_s": float(ru.get("wall_s", seconds)),
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
        # only axes of length 1 may differ (a one-slice volume written as a 2D image): a reshape of permuted axes,
        # e.g. a command that wrote its (x, y, z) array as (z, y, x), would scramble the voxels into a silent score
        if [n for n in out.shape if n != 1] == [n for n in pair.noisy.shape if n != 1]:
            out = out.reshape(pair.noisy.shape)
        else:
            info.update(ok=False, error=f"CLI output shape {out.shape} (z, y, x) != input {pair.noisy.shape}")
            return None, info
    info["ok"] = True
    return out, info


def run_isolated(denoiser: Denoiser | CliDenoiser, pair: DenoiserInput, work_dir: Path, timeout_s: float | None,
                 log_dir: Path | None, label: str) -> tuple[np.ndarray | None, dict]:
    """One call of either kind: :func:`run_command` for a :class:`CliDenoiser`, else :func:`run_in_worker`.
    ``timeout_s`` seconds (None: no limit); ``log_dir`` / ``label`` name a failed command's logs."""
    if isinstance(denoiser, CliDenoiser):
        return run_command(denoiser, pair, work_dir, timeout_s, log_dir, label)
    return run_in_worker(denoiser, pair, work_dir, timeout_s)
