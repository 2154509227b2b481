"""glibc malloc settings for the CPU path: keep freed large tensors' memory for reuse instead of unmapping it.

glibc serves every allocation above its mmap threshold (at most 32 MB, dynamically) with a fresh ``mmap`` and
unmaps it on free. The Efficient-UNet's full-resolution feature maps of a 512 x 512 slice are 25-75 MB each, so
every layer's output was new memory that the kernel had to fault in and zero page by page; kept in the heap, a
512 x 512 CT slice ran about a fifth faster (bench/README.md), with the same output: only where the memory comes
from changes. PyTorch's CPU performance guide gets the same
effect by preloading jemalloc or tcmalloc; this does it in-process, so the CLI, the benchmark and the MONAI Label
server all get it without a launcher.

The settings: allocations up to 1 GiB come from the heap (larger ones, e.g. a whole CT volume, still use mmap),
the heap is trimmed back to the OS only when more than 1 GiB at its top is free, and all threads share one arena
(MONAI Label runs inference in a worker thread, whose own arena would map blocks over 64 MB directly). The cost
is a process that keeps up to about 1 GiB of freed memory for its next image. Set ``ADL_KEEP_FREED_CPU_MEMORY=0``
to keep glibc's defaults; other C libraries and operating systems are left alone.
"""
from __future__ import annotations

import ctypes
import functools
import sys

from .switches import switched_off

__all__ = ["keep_freed_cpu_memory"]

# mallopt parameters, from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
_ONE_GIB = 1 << 30


@functools.lru_cache(maxsize=1)
def keep_freed_cpu_memory() -> bool:
    """Apply the settings above once per process; True when glibc accepted all of them."""
    if switched_off("ADL_KEEP_FREED_CPU_MEMORY"):
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and other C libraries: no glibc mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    settings = ((_M_MMAP_THRESHOLD, _ONE_GIB), (_M_TRIM_THRESHOLD, _ONE_GIB), (_M_ARENA_MAX, 1))
    return all(mallopt(option, value) == 1 for option, value in settings)
