"""A batch run whose record file hits the real kernel file size limit (RLIMIT_FSIZE) at chosen appends: shared by
the batch tests of a record that cannot be written (test_batch_denoise, test_batch_dicomweb)."""
from __future__ import annotations

from pathlib import Path

_LIMITER = """
import resource, runpy, signal, sys
from lib.batch.manifest import Manifest
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write at the limit fails with EFBIG instead of killing
append, seen = Manifest.append, []
def limited_append(self, record):
    if not ({limited}):
        return append(self, record)
    seen.append(record)
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (self.path.stat().st_size + 16, limits[1]))
    try:
        return append(self, record)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
Manifest.append = limited_append
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def write_limiter(path: Path, limited: str) -> Path:
    """Write at ``path`` a script that runs the script its first argument names (the CLI, with the arguments after
    it) with ``Manifest.append`` limited: for each record for which ``limited`` holds (a Python expression of
    ``record`` and ``seen``, the records limited before it), the file size limit is lowered to a few bytes past the
    record file's size for that append alone, so the kernel writes part of the line and refuses the rest."""
    path.write_text(_LIMITER.replace("{limited}", limited))
    return path
