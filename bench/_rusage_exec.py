"""Run a command as a child of this small process and record its wall time and peak RSS.

Usage: python bench/_rusage_exec.py RESULT.json -- COMMAND [ARGS...]

Why a separate launcher: Linux carries a process's peak-RSS record across ``exec`` (the old address
space's high-water mark is kept in ``ru_maxrss``). A command forked directly from the large benchmark
process would therefore inherit the benchmark's own RSS as its "peak". Forked from this small launcher,
the inherited floor is only the launcher's ~10-20 MB (``launcher_rss_mb`` in the result).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time


def _rss_mb() -> float:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return float(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0


def main() -> int:
    result_path = sys.argv[1]
    if len(sys.argv) < 4 or sys.argv[2] != "--":
        print(__doc__, file=sys.stderr)
        return 2
    cmd = sys.argv[3:]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    _, status, rusage = os.wait4(proc.pid, 0)
    t1 = time.perf_counter()
    code = os.waitstatus_to_exitcode(status)
    proc.returncode = code
    with open(result_path, "w") as fh:
        json.dump({"returncode": code, "wall_s": t1 - t0, "maxrss_mb": rusage.ru_maxrss / 1024.0,
                   "launcher_rss_mb": _rss_mb()}, fh)
    return code if code >= 0 else 1


if __name__ == "__main__":
    sys.exit(main())
