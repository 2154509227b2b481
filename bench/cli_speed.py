#!/usr/bin/env python
"""Whole ``cli.py denoise`` commands against BM3D's, side by side in one run: what a user waits for (issue 20).

:mod:`bench.cpu_speed` times the denoising call per slice inside one process; a user (and the issue's own check)
times the command: Python and library start-up, reading, the network, the restoration and writing. Start-up is
paid once per command, so on a short series it weighs on the networks' ratio and barely on BM3D's.

Protocol:

* Input: ``--slices`` central slices (default 8, the issue's count) of the held-out CT pair
  (:func:`bench.pairs.heldout_ct_pair`: the real 512 x 512 Siemens abdomen with simulated quarter-dose noise),
  written once as a float32 NIfTI with the pair's spacing; or ``--input``: a CT file or DICOM series folder of
  your own, used as it is (a DICOM input gives a derived DICOM series, as ``cli.py denoise`` writes it).
* Each command: ``cli.py denoise -i IN -o OUT --model M --modality ct --overwrite`` in a fresh process, every
  thread setting the CLI picks by default (all CPUs) unless ``--threads`` is given (then OMP / MKL_NUM_THREADS).
  Wall time of the whole command (``time.perf_counter`` around the subprocess) and its CPU time (the child's
  user + system time).
* ``--repeats`` rounds; the order of the methods is rotated from round to round (so load changes hit all alike).
* Ratio: a method's median wall time over BM3D's median in the same run; per slice = command time / slices.

Example (from the repository root)::

    .venv/bin/python bench/cli_speed.py --repeats 2

Writes ``<out>/results.json`` and ``<out>/results.md`` (default ``bench/results/cli_speed``) and prints the table.
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
CLI = REPO_ROOT / "apps" / "adl_denoise" / "cli.py"
DEFAULT_OUT = REPO_ROOT / "bench" / "results" / "cli_speed"
METHODS = ("bm3d", "adl", "tddl_gcn")
#: any of these may be timed (``--methods``); the default is :data:`METHODS`
ALLOWED_METHODS = (*METHODS, "nlm", "gaussian", "adl_3d")
REFERENCE = "bm3d"
#: the issue-20 targets: time as a fraction of BM3D's
TARGETS = {"adl": 0.25, "tddl_gcn": 0.5}
#: no command of 8 slices takes near this on a 2-core CPU; a hung one is stopped (its process group) and reported
TIMEOUT_S = 3600


def run_command(method: str, source: Path, output: Path, env: dict[str, str]) -> dict[str, float]:
    """One ``cli.py denoise`` command; its wall and CPU seconds. Raises when it fails."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, str(CLI), "denoise", "-i", str(source), "-o", str(output), "--model",
                                method, "--modality", "ct", "--overwrite"], cwd=REPO_ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)
        process.communicate()
        raise RuntimeError(f"cli.py denoise --model {method} ran past {TIMEOUT_S} s") from None
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if process.returncode != 0:
        raise RuntimeError(f"cli.py denoise --model {method} failed ({process.returncode}): {stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": wall, "cpu_s": cpu}


def summarise(calls: list[dict[str, Any]], slices: int) -> dict[str, dict[str, float]]:
    """Per method: :func:`bench.cpu_speed.summarise` of the commands (median / min / max wall and median CPU seconds
    of a command, their ratios to BM3D's medians), and the median wall seconds per slice."""
    from bench.cpu_speed import summarise as summarise_calls

    table = summarise_calls({"calls": calls})
    for row in table.values():
        row["wall_s_per_slice"] = row["wall_median_s"] / slices
    return table


def markdown(results: dict[str, Any]) -> str:
    from lib.runtime.machine import machine_line

    lines = [f"`cli.py denoise` on {results['slices']} slice(s) ({results['input']}), "
             f"{results['repeats']} round(s), threads: {results['threads']}; {machine_line(results['machine'])}; "
             f"load average before / after: {results['load_before']} / {results['load_after']}", "",
             "| method | command wall s (median) | per slice s | x BM3D (wall) | x BM3D (CPU) | target |",
             "|---|---|---|---|---|---|"]
    for name, row in results["table"].items():
        target = TARGETS.get(name)
        ratio = row.get("wall_ratio_to_bm3d")
        verdict = "" if target is None or ratio is None else f"<= {target} ({'met' if ratio <= target else 'NOT met'})"
        lines.append(f"| {name} | {row['wall_median_s']:.2f} | {row['wall_s_per_slice']:.2f} | "
                     f"{row.get('wall_ratio_to_bm3d', float('nan')):.3f} | "
                     f"{row.get('cpu_ratio_to_bm3d', float('nan')):.3f} | {verdict} |")
    return "\n".join(lines) + "\n"


def command_environment(threads: int | None, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of every timed command: ``threads`` as OMP / MKL_NUM_THREADS, else none of them, so that the
    CLI picks its own default (all CPUs). Inherited from a shell that set ``OMP_NUM_THREADS=1`` (as the other
    benchmarks are run), it gave the networks one thread while BM3D's own pthreads took every CPU, under a report
    saying "the CLI's default (all CPUs)"."""
    env = dict(os.environ if base is None else base)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.pop(name, None)
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=8, help="central slices of the held-out CT (default 8)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--threads", type=int, help="OMP / MKL_NUM_THREADS of every command (default: the CLI's own)")
    parser.add_argument("--input", type=Path, help="a CT file or DICOM series folder to time instead of the "
                                                  "held-out slices (--slices is then ignored)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(ALLOWED_METHODS))
    if unknown or not methods:
        parser.error(f"unknown or no method(s) {', '.join(unknown)}; choose from {', '.join(ALLOWED_METHODS)}")
    if args.slices < 1 or args.repeats < 1 or (args.threads is not None and args.threads < 1):
        parser.error("--slices, --repeats and --threads must be >= 1")

    sys.path.insert(0, str(REPO_ROOT / "apps" / "adl_denoise"))
    import numpy as np
    import SimpleITK as sitk

    from bench.pairs import heldout_ct_pair, require_shared_data
    from lib.data.heldout import HELDOUT_CT_SERIES
    from lib.runtime.atomic import atomic_write_json, atomic_write_text
    from lib.runtime.clock import utc_timestamp
    from lib.runtime.machine import describe_machine

    if args.input is None:
        require_shared_data(HELDOUT_CT_SERIES, hint="or time a CT of your own with --input")
    elif not args.input.exists():
        parser.error(f"--input: no such file or folder: {args.input}")
    env = command_environment(args.threads)
    results: dict[str, Any] = {"started": utc_timestamp(), "repeats": args.repeats, "methods": methods,
                               "threads": args.threads or "the CLI's default (all CPUs)",
                               "machine": describe_machine(), "load_before": os.getloadavg()}
    calls: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="cli_speed_") as tmp:
        if args.input is not None:
            from lib.imaging import read_volume

            source = args.input.resolve()
            shape = read_volume(source, modality="CT").array.shape
            results.update(slices=int(shape[0]) if len(shape) == 3 else 1, input=str(source))
            suffix = "" if source.is_dir() else "".join(source.suffixes)  # DICOM in: a derived series folder out
        else:
            pair = heldout_ct_pair(max_slices=args.slices)
            source, suffix = Path(tmp) / "low_dose.nii.gz", ".nii.gz"
            image = sitk.GetImageFromArray(np.ascontiguousarray(pair.noisy, dtype=np.float32))
            image.SetSpacing(tuple(float(s) for s in pair.spacing))
            sitk.WriteImage(image, str(source))
            results.update(slices=int(pair.noisy.shape[0]),
                           input=f"{pair.name}, slices {pair.meta.get('slices')} of {pair.meta.get('source')}")
        for r in range(args.repeats):
            order = methods[r % len(methods):] + methods[:r % len(methods)]
            for name in order:
                print(f"round {r + 1}: cli.py denoise --model {name} ...", flush=True)
                calls.append({"round": r, "method": name,
                              **run_command(name, source, Path(tmp) / f"{name}{suffix}", env)})
    results.update(load_after=os.getloadavg(), calls=calls, table=summarise(calls, results["slices"]))
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "results.json", results, indent=2)
    text = markdown(results)
    atomic_write_text(args.out / "results.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
