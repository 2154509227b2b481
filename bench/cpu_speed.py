#!/usr/bin/env python
"""CPU time per 512 x 512 CT slice of the learned denoisers against BM3D, side by side in one run (issue 20).

Protocol:

* Input: ``--slices`` central slices (default 4) of the held-out CT pair (:func:`bench.pairs.heldout_ct_pair`:
  the real 512 x 512 Siemens abdomen slab with simulated quarter-dose noise, cached in ``bench/results/cache``).
* Methods, each as the app runs it: ``bm3d`` = :func:`lib.denoisers.classical.bm3d_denoise` (what ``cli.py
  denoise --model bm3d`` calls, both stages, per-slice noise estimate); ``adl`` and ``tddl_gcn`` =
  :func:`lib.predict.denoise_array` with its defaults on the weights :func:`lib.predict.load_denoiser` reads
  (``--adl-weights`` / ``--gcn-weights``, default the shipped ``model/pretrained_<name>_ct.pt``), i.e. the code
  path of ``cli.py denoise``. Every call gets ONE slice (Z = 1), so each figure is seconds per slice.
* Thread settings: one worker process per entry of ``--threads`` (default ``1,2``). A worker with T threads is
  pinned to T CPUs (``os.sched_setaffinity``, set before torch starts its thread pool) and runs torch with
  ``torch.set_num_threads(T)`` (and OMP/MKL_NUM_THREADS=T). BM3D (the PyPI ``bm3d``/``bm4d`` binary) starts its
  own pthreads, one per online CPU, whatever OMP_NUM_THREADS says; the pinning confines them to the same T CPUs,
  so BM3D and the networks always share the same cores. T = all CPUs is what the CLI does by default.
* Memory: each method once more alone in a fresh process (one CPU, one slice): its peak RSS over the RSS after
  imports and model loading (``VmHWM`` with the kernel's peak counter reset first, as in :mod:`bench.isolation`).
* In a worker: every model is loaded and run once on the first slice (warm-up, reported apart), then for
  ``--repeats`` rounds every slice is denoised by every method, the order of the methods rotated from slice to
  slice (so load changes hit all methods alike). Per call: wall time and process CPU time (all threads).
* Ratios: median over the calls of a method's wall time divided by the median of BM3D's wall time IN THE SAME
  WORKER (same cores, same minutes). Wall time, not CPU time, is what the targets compare (a user waits for
  it); CPU-time ratios are reported too. The load average (``os.getloadavg``) before and after each worker is
  recorded, since the machine may be shared: rerun when ``uptime`` is low before trusting a close call.

Examples (from the repository root)::

    .venv/bin/python bench/cpu_speed.py                               # 4 slices, 1 and 2 threads
    .venv/bin/python bench/cpu_speed.py --slices 2 --threads 2 --methods bm3d,adl

Writes ``<out>/results.json`` and ``<out>/results.md`` (default ``bench/results/cpu_speed``) and prints the table.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "bench" / "results" / "cpu_speed"
MODEL_DIR = REPO_ROOT / "apps" / "adl_denoise" / "model"
METHODS = ("bm3d", "adl", "tddl_gcn")
REFERENCE = "bm3d"
#: the issue-20 targets: wall time per slice as a fraction of BM3D's
TARGETS = {"adl": 0.25, "tddl_gcn": 0.5}


# ---- worker (one thread setting) -----------------------------------------------------------------------------

def _pin(threads: int) -> list[int]:
    """Pin this process to its first ``threads`` usable CPUs (before torch starts threads); returns them."""
    usable = sorted(os.sched_getaffinity(0))
    if threads > len(usable):
        raise ValueError(f"{threads} threads asked, but only {len(usable)} CPUs are usable: {usable}")
    cpus = usable[:threads]
    os.sched_setaffinity(0, cpus)
    return cpus


def _method_callables(names: Sequence[str], adl_weights: Path, gcn_weights: Path) -> dict[str, Callable]:
    """``name -> f(slice (1, H, W) float32 HU) -> denoised``, each as the CLI runs it."""
    from lib.denoisers.classical import bm3d_denoise
    from lib.predict import denoise_array, load_denoiser

    calls: dict[str, Callable] = {}
    for name in names:
        if name == "bm3d":
            calls[name] = lambda s: bm3d_denoise(s, "CT")
        elif name in ("adl", "tddl_gcn"):
            model = load_denoiser(adl_weights if name == "adl" else gcn_weights)
            calls[name] = lambda s, m=model: denoise_array(m, s, "CT")
        else:
            raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return calls


def _timed(fn: Callable, x: np.ndarray) -> dict[str, float]:
    from bench.isolation import _proc_status_kb, _reset_peak_rss

    rss_before = _proc_status_kb("VmRSS") or 0.0
    reset = _reset_peak_rss()
    wall, cpu = time.perf_counter(), time.process_time()
    fn(x)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    record = {"wall_s": wall, "cpu_s": cpu}
    if reset:
        record["peak_mb"] = ((_proc_status_kb("VmHWM") or 0.0) - rss_before) / 1024
    return record


def worker(slices_path: Path, threads: int, names: Sequence[str], repeats: int, adl_weights: Path,
           gcn_weights: Path) -> dict[str, Any]:
    """Run every method on every slice of ``slices_path`` ((Z, H, W) float32 HU .npy) with ``threads`` CPUs."""
    cpus = _pin(threads)
    import torch

    torch.set_num_threads(threads)
    from lib.runtime.machine import describe_machine

    volume = np.load(slices_path)
    load_before = os.getloadavg()
    calls = _method_callables(names, adl_weights, gcn_weights)
    warmup = {name: _timed(fn, volume[:1]) for name, fn in calls.items()}
    calls_log: list[dict[str, Any]] = []
    order = list(calls)
    for r in range(repeats):
        for z in range(volume.shape[0]):
            shift = (r * volume.shape[0] + z) % len(order)
            for name in order[shift:] + order[:shift]:
                record = _timed(calls[name], volume[z:z + 1])
                calls_log.append({"method": name, "slice": z, "repeat": r, **record})
    return {"threads": threads, "cpus": cpus, "torch_threads": torch.get_num_threads(), "warmup": warmup,
            "calls": calls_log, "load_average_before": list(os.getloadavg() if load_before is None else load_before),
            "load_average_after": list(os.getloadavg()), "machine": describe_machine()}


def memory_probe(slices_path: Path, name: str, adl_weights: Path, gcn_weights: Path) -> dict[str, float]:
    """Peak memory of ONE method on one slice in a fresh process (pinned to one CPU, one torch thread): extra
    ``VmHWM`` over the RSS after imports and model loading, and the process's absolute peak RSS."""
    from bench.isolation import _proc_status_kb

    _pin(1)
    import torch

    torch.set_num_threads(1)
    volume = np.load(slices_path)
    call = _method_callables([name], adl_weights, gcn_weights)[name]
    record = _timed(call, volume[:1])
    record["peak_rss_mb"] = (_proc_status_kb("VmHWM") or 0.0) / 1024
    return record


# ---- summary ---------------------------------------------------------------------------------------------------

def summarise(run: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per method: median / min / max wall and median CPU seconds per slice, and the ratios of the median wall and
    CPU times to BM3D's (when BM3D ran)."""
    out: dict[str, dict[str, float]] = {}
    methods = list(dict.fromkeys(c["method"] for c in run["calls"]))
    for name in methods:
        rows = [c for c in run["calls"] if c["method"] == name]
        wall = [c["wall_s"] for c in rows]
        cpu = [c["cpu_s"] for c in rows]
        out[name] = {"calls": len(rows), "wall_median_s": statistics.median(wall), "wall_min_s": min(wall),
                     "wall_max_s": max(wall), "cpu_median_s": statistics.median(cpu)}
    if REFERENCE in out:
        for name, row in out.items():
            row["wall_ratio_to_bm3d"] = row["wall_median_s"] / out[REFERENCE]["wall_median_s"]
            row["cpu_ratio_to_bm3d"] = row["cpu_median_s"] / out[REFERENCE]["cpu_median_s"]
    return out


def markdown(results: dict[str, Any]) -> str:
    from lib.runtime.machine import machine_line

    lines = [f"# CPU time per 512 x 512 CT slice ({results['started']})", "",
             f"Machine: {machine_line(results['machine'])}.", "",
             f"Input: {results['input']}. Each call denoises one slice; medians over "
             f"{results['slices']} slices x {results['repeats']} repeat(s). Ratio = median wall time / BM3D's median "
             "wall time in the same worker (same CPUs). BM3D starts its own pthreads; the pinning confines them "
             "to the worker's CPUs.", ""]
    if results.get("memory"):
        lines += ["## Peak memory of one 512 x 512 slice (each method alone in a fresh process, 1 thread)", "",
                  "| method | extra peak over the loaded model, MB | process peak RSS, MB |", "|---|---|---|"]
        for name, record in results["memory"].items():
            lines.append(f"| {name} | {record.get('peak_mb', float('nan')):.0f} | {record['peak_rss_mb']:.0f} |")
        lines.append("")
    for run in results["runs"]:
        lines += [f"## {run['threads']} thread(s), CPUs {run['cpus']} (load average before "
                  f"{', '.join(f'{x:.2f}' for x in run['load_average_before'])}, after "
                  f"{', '.join(f'{x:.2f}' for x in run['load_average_after'])})", "",
                  "| method | wall s/slice (median) | min - max | CPU s/slice | x BM3D (wall) | x BM3D (CPU) | "
                  "target | warm-up s |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, row in run["summary"].items():
            target = f"<= {TARGETS[name]}x" if name in TARGETS else "-"
            ratio = row.get("wall_ratio_to_bm3d", float("nan"))
            met = "" if name not in TARGETS or ratio != ratio else \
                (" (met)" if ratio <= TARGETS[name] else " (NOT met)")
            cpu_ratio = row.get("cpu_ratio_to_bm3d", float("nan"))
            lines.append(f"| {name} | {row['wall_median_s']:.2f} | {row['wall_min_s']:.2f} - {row['wall_max_s']:.2f} | "
                         f"{row['cpu_median_s']:.2f} | {ratio:.3f}{met} | {cpu_ratio:.3f} | "
                         f"{target} | {run['warmup'][name]['wall_s']:.2f} |")
        lines.append("")
    return "\n".join(lines)


# ---- command line ----------------------------------------------------------------------------------------------

def _parse_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=4, help="central slices of the held-out CT slab (default 4)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts, one worker each")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--adl-weights", type=Path, default=MODEL_DIR / "pretrained_adl_ct.pt")
    parser.add_argument("--gcn-weights", type=Path, default=MODEL_DIR / "pretrained_tddl_gcn_ct.pt")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--no-memory", action="store_true", help="skip the per-method peak-memory processes")
    parser.add_argument("--worker", nargs=2, metavar=("SLICES_NPY", "RESULT_JSON"), help=argparse.SUPPRESS)
    parser.add_argument("--memory-probe", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    names = _parse_list(args.methods)
    unknown = sorted(set(names) - set(METHODS))
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    try:
        thread_counts = [int(t) for t in _parse_list(args.threads)]
    except ValueError:
        parser.error(f"--threads must be comma-separated integers, got {args.threads!r}")
    if not thread_counts or min(thread_counts) < 1 or args.slices < 1 or args.repeats < 1:
        parser.error("--threads, --slices and --repeats must be >= 1")
    for flag, path in (("--adl-weights", args.adl_weights), ("--gcn-weights", args.gcn_weights)):
        used = (flag == "--adl-weights" and "adl" in names) or (flag == "--gcn-weights" and "tddl_gcn" in names)
        if used and not path.is_file():
            parser.error(f"{flag}: no weight file at {path}")

    if args.worker and args.memory_probe:
        record = memory_probe(Path(args.worker[0]), args.memory_probe, args.adl_weights, args.gcn_weights)
        Path(args.worker[1]).write_text(json.dumps(record))
        return 0
    if args.worker:
        run = worker(Path(args.worker[0]), thread_counts[0], names, args.repeats, args.adl_weights, args.gcn_weights)
        Path(args.worker[1]).write_text(json.dumps(run))
        return 0

    from bench.pairs import heldout_ct_pair, require_shared_data
    from lib.data.heldout import HELDOUT_CT_SERIES
    from lib.runtime.atomic import atomic_write_json, atomic_write_text
    from lib.runtime.clock import utc_timestamp

    require_shared_data(HELDOUT_CT_SERIES)
    pair = heldout_ct_pair(max_slices=args.slices)
    if pair.noisy.shape[1:] != (512, 512):
        raise SystemExit(f"expected 512 x 512 slices, the held-out CT has {pair.noisy.shape[1:]}")
    results: dict[str, Any] = {"started": utc_timestamp(), "slices": int(pair.noisy.shape[0]), "repeats": args.repeats,
                               "methods": names,
                               "weights": {"adl": str(args.adl_weights), "tddl_gcn": str(args.gcn_weights)},
                               "input": f"{pair.name}, slices {pair.meta.get('slices')} of {pair.meta.get('source')}",
                               "runs": []}
    with tempfile.TemporaryDirectory(prefix="cpu_speed_") as tmp:
        slices_path = Path(tmp) / "slices.npy"
        np.save(slices_path, np.ascontiguousarray(pair.noisy, dtype=np.float32))
        common = ["--adl-weights", str(args.adl_weights), "--gcn-weights", str(args.gcn_weights)]
        env1 = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        results["memory"] = {}
        for name in ([] if args.no_memory else names):
            result_path = Path(tmp) / f"memory_{name}.json"
            print(f"peak memory of {name} ...", flush=True)
            subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", str(slices_path),
                            str(result_path), "--memory-probe", name, *common], cwd=REPO_ROOT, env=env1, check=True)
            results["memory"][name] = json.loads(result_path.read_text())
        for threads in thread_counts:
            result_path = Path(tmp) / f"run_{threads}.json"
            env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
            command = [sys.executable, str(Path(__file__).resolve()), "--worker", str(slices_path), str(result_path),
                       "--threads", str(threads), "--methods", ",".join(names), "--repeats", str(args.repeats),
                       "--adl-weights", str(args.adl_weights), "--gcn-weights", str(args.gcn_weights)]
            print(f"{threads} thread(s): running {', '.join(names)} on {results['slices']} slices ...", flush=True)
            subprocess.run(command, cwd=REPO_ROOT, env=env, check=True)
            run = json.loads(result_path.read_text())
            run["summary"] = summarise(run)
            results["runs"].append(run)
    from lib.runtime.machine import describe_machine

    results["machine"] = describe_machine()  # here, unpinned (the workers' own records are in their runs)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "results.json", results)
    text = markdown(results)
    atomic_write_text(args.out / "results.md", text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
