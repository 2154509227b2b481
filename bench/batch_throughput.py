#!/usr/bin/env python
"""Batch denoising throughput: series per hour of ``cli.py denoise-batch`` with 1 and with 2 CPU processes
(``torchrun --standalone --nproc_per_node 2``, Gloo) on the same small series.

The series: ``--series`` crops of ``--size`` x ``--size`` x ``--slices`` voxels cut at different places out of
the real thorax CT of ``../shared/data`` (NIfTI, int16 HU), in a temporary folder. Each run starts from an empty
output folder. Reported per run: the batch's own figure (series per hour over the job's wall time after start-up,
as its summary line prints it) and the end-to-end figure (wall time of the whole command, Python and torch
start-up and torchrun's rendezvous included), and the speed-up of 2 processes over 1.

Each process runs one thread (``OMP_NUM_THREADS=1``), so 2 processes use 2 cores: on a machine shared with other
work the figures are lower bounds. Results: a JSON file and a markdown table in ``bench/results/batch/``.

    .venv/bin/python bench/batch_throughput.py [--series 16] [--model nlm] [--repeats 1]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLI = REPO / "apps" / "adl_denoise" / "cli.py"
SHARED = Path(os.environ.get("ADL_SHARED_DATA", REPO.parent / "shared" / "data"))
SOURCE = SHARED / "ct_thorax_philips_2mm.nii.gz"
SUMMARY = re.compile(r"summary: (\d+) series: (\d+) done, (\d+) skipped, (\d+) failed in ([\d.]+) s")


def make_series(folder: Path, count: int, size: int, slices: int) -> list[Path]:
    """``count`` crops of the thorax CT, each ``size`` x ``size`` x ``slices``, at different positions."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(SOURCE))
    nx, ny, nz = image.GetSize()
    if not (0 < size <= min(nx, ny) and 0 < slices <= nz):
        raise SystemExit(f"error: --size {size} / --slices {slices} do not fit in {SOURCE.name} ({nx} x {ny} x {nz})")
    folder.mkdir(parents=True)
    paths = []
    for k in range(count):
        # shifted by quarters of the crop around the centre, kept inside the image: a negative start (any --size
        # above half the image) was read by SimpleITK as counted from the end and gave empty crops
        x0 = min(max((nx - size) // 2 + (k % 4 - 2) * size // 4, 0), nx - size)
        y0 = min(max((ny - size) // 2 + (k // 4 % 4 - 2) * size // 4, 0), ny - size)
        z0 = (k * slices) % max(1, nz - slices)
        crop = image[x0:x0 + size, y0:y0 + size, z0:z0 + slices]
        path = folder / f"patient{k:03d}" / "ct.nii.gz"
        path.parent.mkdir()
        sitk.WriteImage(crop, str(path))
        paths.append(path)
    return paths


def run(processes: int, tree: Path, out: Path, model: str) -> dict:
    """One batch run from an empty output folder; its summary and wall time."""
    shutil.rmtree(out, ignore_errors=True)
    base = [str(CLI), "denoise-batch", "--input", str(tree), "--output", str(out), "--model", model, "--no-progress"]
    if processes == 1:
        command = [sys.executable, *base]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                   *base]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, start_new_session=True)
    wall = time.perf_counter() - start
    match = SUMMARY.search(result.stdout)
    if result.returncode != 0 or match is None:
        raise RuntimeError(f"{processes} process(es) failed ({result.returncode}):\n{result.stdout}\n"
                           f"{result.stderr[-3000:]}")
    total, done, _, failed, seconds = (float(v) for v in match.groups())
    if failed or done != total:
        raise RuntimeError(f"not every series was denoised:\n{result.stdout}")
    return {"processes": processes, "series": int(done), "batch_seconds": seconds, "wall_seconds": round(wall, 2),
            "series_per_hour_batch": round(3600 * done / seconds, 1),
            "series_per_hour_end_to_end": round(3600 * done / wall, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--series", type=int, default=16, help="number of series (default 16)")
    parser.add_argument("--size", type=int, default=256, help="in-plane crop size (default 256)")
    parser.add_argument("--slices", type=int, default=8, help="slices per series (default 8)")
    parser.add_argument("--model", default="nlm", help="denoise-batch --model (default nlm: CPU-bound, no weights)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per process count; the best is kept")
    parser.add_argument("--output", type=Path, default=REPO / "bench" / "results" / "batch",
                        help="folder for batch_throughput.json and .md")
    args = parser.parse_args(argv)
    if not SOURCE.is_file():
        print(f"error: {SOURCE} not found (the real data folder, see ../shared/data)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="batch_bench_") as tmp:
        tree = Path(tmp) / "tree"
        make_series(tree, args.series, args.size, args.slices)
        rows = []
        for processes in (1, 2):
            runs = [run(processes, tree, Path(tmp) / f"out{processes}", args.model) for _ in range(args.repeats)]
            best = max(runs, key=lambda r: r["series_per_hour_batch"])
            rows.append(best)
            print(json.dumps(best), flush=True)
    speedup = rows[1]["series_per_hour_batch"] / rows[0]["series_per_hour_batch"]
    report = {
        "series": args.series, "series_shape": [args.slices, args.size, args.size], "model": args.model,
        "runs": rows, "speedup_2_over_1_batch": round(speedup, 2),
        "speedup_2_over_1_end_to_end": round(rows[1]["series_per_hour_end_to_end"]
                                             / rows[0]["series_per_hour_end_to_end"], 2),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "threads_per_process": 1,
    }
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "batch_throughput.json").write_text(json.dumps(report, indent=1))
    lines = ["| processes | series | batch s | series/hour (batch) | wall s | series/hour (end to end) |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['processes']} | {r['series']} | {r['batch_seconds']:.1f} | {r['series_per_hour_batch']:.0f} | "
              f"{r['wall_seconds']:.1f} | {r['series_per_hour_end_to_end']:.0f} |" for r in rows]
    lines.append(f"\nspeed-up 2 over 1: {report['speedup_2_over_1_batch']}x (batch), "
                 f"{report['speedup_2_over_1_end_to_end']}x (end to end); {args.series} series of "
                 f"{args.slices}x{args.size}x{args.size}, --model {args.model}, {os.cpu_count()} CPUs")
    (args.output / "batch_throughput.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
